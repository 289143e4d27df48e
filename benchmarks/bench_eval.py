"""Eval throughput: questions per second of `medllava eval run`'s batched path against asking the
same model the same questions one at a time with plain transformers, in the same run.

    python benchmarks/bench_eval.py                      # `small` random model on the CPU
    python benchmarks/bench_eval.py --model tiny-next     # LLaVA-NeXT, tiny, on the CPU
    python benchmarks/bench_eval.py --write-random-7b /data/llava-7b-random --device cuda   # once
    python benchmarks/bench_eval.py --model /data/llava-7b-random --device cuda --dtype bfloat16 \\
        --questions 256 --batch-size 32
    python benchmarks/bench_eval.py --write-random-7b /data/next-7b --shape llava-next-7b --device cuda

Questions are the real VQA-RAD questions and images of the embedded demo set (CC0), repeated
with fresh ids up to `--questions`, read through the in-house task loader. The batched path is
`medllava.eval.run.answer_questions`, exactly as `eval run` calls it: image loading, prompts, batches
sorted by full token length (a grid family's image tokens, by each image's size, included), left-padded,
`generate` with the KV cache, and one appended predictions row per answer.
The baseline is the plain way: per question, load the image, `processor(text, image)`, then
`model.generate` with the same greedy settings. Both are timed by the wall clock after a warm-up
call each, and the answers of the two paths are compared (greedy, so they should agree).
`--single-questions N` times the one-at-a-time path on the first N questions only (it is the slow one),
so the two are compared as questions per second; `--json FILE` also writes the figures. The image
tokens per question (min/median/max) are stated: a fixed count in LLaVA-1.5, each image's own count (by
its size) in a grid family such as LLaVA-NeXT.

`--write-random-7b DIR` saves a random-weight checkpoint shaped like LLaVA-1.5-7B (CLIP ViT-L/14 at
336 px, 576 image tokens; a Llama-2-7B language model), or with `--shape llava-next-7b` like
LLaVA-NeXT-7B (llava-v1.6-mistral-7b-hf: the same tower on 336-px tiles up to 672 px, up to 2928 image
tokens; a Mistral-7B language model), with the toolkit's small BPE tokenizer, so the GPU figures need no
download (benchmarks/shapes.py). `--layers N` shrinks its language model to check the path on a CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.real_text import spread  # noqa: E402
from benchmarks.shapes import RANDOM_7B  # noqa: E402
from medllava.eval.generate import (Asking, ensure_pad_token, greedy_config, image_token_counts,  # noqa: E402
                                    load_example_image, prompt_for)
from medllava.families import fixed_image_token_count, processor_family  # noqa: E402
from medllava.eval.run import answer_questions  # noqa: E402
from medllava.eval.tasks import load_task  # noqa: E402
from medllava.tiny import demo_data  # noqa: E402
from medllava.io import JsonlLog, atomic_write_json, read_jsonl, write_jsonl  # noqa: E402
from medllava.model import ModelConfig, build_model, save_model  # noqa: E402
from medllava.records import HUMAN  # noqa: E402


def demo_questions(folder: Path, n: int) -> Path:
    """An in-house JSONL of n questions (the demo set's human turns, repeated) on the demo images."""
    conversations, images = demo_data()
    pairs = []
    for _, rec in read_jsonl(conversations):
        turns = rec["conversations"]
        for ask, reply in zip(turns[::2], turns[1::2]):
            if ask["from"] == HUMAN:
                pairs.append((str(images / rec["image"]), ask["value"].replace("<image>", "").strip(), reply["value"]))
    rows = [{"qid": f"q{i}", "image": pairs[i % len(pairs)][0], "question": pairs[i % len(pairs)][1],
             "answer": pairs[i % len(pairs)][2]} for i in range(n)]
    write_jsonl(folder / "bench.jsonl", rows)
    return folder


def one_at_a_time(model, processor, task, examples, asking: Asking, max_new_tokens: int) -> tuple[list[str], int]:
    """The plain way: processor + generate per question. Returns the answers and the tokens generated."""
    config = greedy_config(model, processor, max_new_tokens)
    answers, tokens = [], 0
    for ex in examples:
        image = load_example_image(task, ex)
        inputs = processor(text=prompt_for(ex, asking, processor), images=image, return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)  # a grid family's image_sizes stay ints
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=config)
        new = out[0, inputs["input_ids"].shape[1]:]
        tokens += int((new != processor.tokenizer.pad_token_id).sum())
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers, tokens


def batched(model, processor, task, examples, asking: Asking, batch_size: int, max_new_tokens: int,
            folder: Path) -> tuple[list[str], float]:
    """`eval run`'s path into a fresh predictions file; returns the answers (in question order) and seconds."""
    path = folder / f"predictions_{time.monotonic_ns()}.jsonl"
    with JsonlLog(path) as log:
        stats = answer_questions(model, processor, task, examples, asking, log, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens)
        by_qid = {row["qid"]: row["prediction"] for row in log.rows()}
    return [by_qid[ex.qid] for ex in examples], stats.seconds


def measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = build_model(ModelConfig(name_or_path=args.model, dtype=args.dtype))
    model.to(args.device)
    ensure_pad_token(processor)
    asking = Asking()
    with tempfile.TemporaryDirectory() as tmp:
        folder = demo_questions(Path(tmp), args.questions)
        task = load_task("inhouse", folder, "bench")
        examples = task.examples
        image_tokens = image_tokens_per_question(processor, task, examples)
        # Warm-up: first calls pay for kernel selection and allocator growth.
        one_at_a_time(model, processor, task, examples[:1], asking, 2)
        batched(model, processor, task, examples[:args.batch_size], asking, args.batch_size, 2, folder)
        # The plain way is slow on a large set: timed on its first questions when asked, compared as a rate.
        singles = examples[:args.single_questions] if args.single_questions else examples
        _sync(args.device)
        start = time.perf_counter()
        single_answers, single_tokens = one_at_a_time(model, processor, task, singles, asking, args.max_new_tokens)
        _sync(args.device)
        single_s = time.perf_counter() - start
        batch_answers, batch_s = batched(model, processor, task, examples, asking, args.batch_size,
                                         args.max_new_tokens, folder)
    n, n_single = len(examples), len(singles)
    return {
        "model": args.model, "family": processor_family(processor).model_type,
        "image_tokens_per_question": spread(image_tokens), "device": _device_name(args.device), "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(), "questions": n, "questions_one_at_a_time": n_single,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "generated_tokens_one_at_a_time": single_tokens, "one_at_a_time_s": single_s, "batched_s": batch_s,
        "one_at_a_time_qps": n_single / single_s, "batched_qps": n / batch_s,
        "speedup": (n / batch_s) / (n_single / single_s),
        "answers_identical": sum(a == b for a, b in zip(single_answers, batch_answers)),
    }


def image_tokens_per_question(processor, task, examples) -> list[int]:
    """The tokens each question's image expands to: the family's fixed count, or each image's own (by its
    size, as `eval run` sorts by it)."""
    counts = image_token_counts(processor, task, examples)
    return counts if counts is not None else [fixed_image_token_count(processor)] * len(examples)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def write_random_7b(out: Path, layers: int | None, device: str, shape: str = "llava-7b") -> Path:
    """A random-weight llava-hf checkpoint in the 7B `shape` (benchmarks/shapes.py), saved in bfloat16."""
    from benchmarks.shapes import model_class, random_7b_config, random_7b_processor

    processor = random_7b_processor(shape)
    tokenizer = processor.tokenizer
    config = random_7b_config(shape, tokenizer, layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 7B parameters: never materialise them in float32
    try:
        with torch.device(device):
            model = model_class(config)(config)
    finally:
        torch.set_default_dtype(default)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return save_model(model, processor, out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="tiny, small, tiny-next, or a checkpoint folder of a supported"
                                                    " family (llava, llava_next; default small)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--questions", type=int, default=48, help="questions asked on each path (default 48)")
    p.add_argument("--batch-size", type=int, default=8, help="eval run batch size (default 8)")
    p.add_argument("--single-questions", type=int, metavar="N",
                   help="time the one-at-a-time path on the first N questions only (default: all); rates compared")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per answer (default 16)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--write-random-7b", type=Path, metavar="DIR",
                   help="save a random 7B-shaped checkpoint (--shape) and exit")
    p.add_argument("--shape", choices=RANDOM_7B, default="llava-7b",
                   help="with --write-random-7b: LLaVA-1.5-7B or LLaVA-NeXT-7B (Mistral, 672 px) (default llava-7b)")
    p.add_argument("--layers", type=int, help="with --write-random-7b: language-model layers (default 32)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.write_random_7b:
        print(f"wrote {write_random_7b(args.write_random_7b, args.layers, args.device, args.shape)}")
        return
    r = measure(args)
    tokens = r["image_tokens_per_question"]
    print(f"model {r['model']} ({r['family']}, {r['dtype']}) on {r['device']}, torch threads {r['torch_threads']}; "
          f"{r['questions']} questions, {r['max_new_tokens']} new tokens at most; image tokens per question "
          f"min/median/max {tokens['min']}/{tokens['median']:g}/{tokens['max']}")
    print("| path | seconds | questions/s |\n|---|---|---|")
    print(f"| one at a time (processor + generate per question; {r['questions_one_at_a_time']} questions) "
          f"| {r['one_at_a_time_s']:.2f} | {r['one_at_a_time_qps']:.2f} |")
    print(f"| eval run, batches of {r['batch_size']} | {r['batched_s']:.2f} | {r['batched_qps']:.2f} |")
    print(f"speed-up {r['speedup']:.2f}x; answers identical on {r['answers_identical']}/{r['questions_one_at_a_time']}"
          " questions asked both ways; "
          f"{r['generated_tokens_one_at_a_time']} tokens generated one at a time")
    if args.json:
        atomic_write_json(args.json, r)


if __name__ == "__main__":
    main()
