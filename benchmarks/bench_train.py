"""Training throughput: medllava's batches against the plain-transformers way, in one process.

    python benchmarks/bench_train.py --stage align --model tiny --steps 20            # CPU, tiny model
    python benchmarks/bench_train.py --stage instruct-lora --model llava-7b --device cuda --batch 16

Every path trains the same model from the same encoded examples with `transformers.Trainer`:
- baseline: padded batches in random order, the model's own loss over full-vocabulary logits at every
  position (what a user writes with Trainer + PEFT);
- sparse: padded batches, logits only at supervised positions (`Collator(sparse_logits=True)` +
  `supervised_loss`);
- packed: as sparse, and packed rows (no padding; attention kept inside each example through position
  ids: block-diagonal masks under sdpa, varlen kernels under flash-attention or flex);
- grouped: as sparse, batches of similar length (`finetune.trainer.length_grouped_sampler`);
- cached (stage 1 only): as sparse, the frozen vision tower answered from a filled
  `finetune.vision_cache.VisionFeatureCache`: the steady state of every epoch after the first;
- compiled (`--compile`): as sparse, the model under torch.compile.
Data loading is outside the timed region (examples are encoded once), so the figures are the model's.
The optimizer is the one medllava's stages use: fused AdamW on CUDA (also transformers' default there
with torch >= 2.8), the plain loop elsewhere.

Lengths: stage 1 examples are an image plus a caption of 20-80 tokens, stage 2 examples an image plus
100-600 text tokens (uniform), or the real token lengths of a conversation file (`--lengths-from`).
FLOP convention (printed with the table): per example, 2N per token for the language model's forward
(N = its parameters, embeddings excluded), x2 with gradients flowing through a frozen LLM (stage 1,
LoRA: 4N), x3 when it is trained (6N), over every token (image + text, padding excluded); plus the
vision tower's forward, 2 x its parameters per patch token, counted even where the cache skips it, so
TFLOP/s is useful work per second and compares across paths.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.stages import apply_lora  # noqa: E402
from finetune.config import LoraConfig  # noqa: E402
from medllava.data import Collator, supervised_loss  # noqa: E402
from medllava.model import ModelConfig, build_model, num_image_tokens, set_trainable  # noqa: E402
from medllava.templates import IGNORE_INDEX  # noqa: E402

WORDS = "the chest radiograph shows a right lower lobe opacity with a small pleural effusion and no pneumothorax".split()


def llava_7b_shape(dtype):
    """LLaVA-1.5-7B's shape with random weights (`benchmarks.shapes.llava_7b_config`)."""
    from transformers import LlavaForConditionalGeneration

    from benchmarks.shapes import llava_7b_config
    from medllava.tiny import build_tiny

    _, tiny_processor = build_tiny("tiny")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(llava_7b_config()).to(dtype)
    return model, tiny_processor, 576, 32064


def synthetic_examples(n, n_image_tokens, lengths, vocab, image_token_id, image_size, seed=0):
    """Encoded examples: BOS, image tokens, a prompt of 8 tokens, then `length` supervised tokens."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.choice(lengths)
        prompt = [1] + [image_token_id] * n_image_tokens + [rng.randrange(5, vocab) for _ in range(8)]
        answer = [rng.randrange(5, vocab) for _ in range(length)] + [2]
        examples.append({
            "id": str(i),
            "input_ids": prompt + answer,
            "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [IGNORE_INDEX] * len(prompt) + answer,
            "pixel_values": torch.randn(1, 3, image_size, image_size),
            "image_keys": [f"synthetic/{i}.png"],
        })
    return examples


def lengths_for(stage, path):
    if path is None:
        return list(range(20, 81)) if stage == "align" else list(range(100, 601))
    from medllava.records import iter_records

    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in iter_records(path, skip_bad=True)]
    return [max(1, int(w * 1.3)) for w in words]  # about 1.3 tokens per English word


# Language-model FLOPs per token and parameter: 2 forward, x2 with gradients flowing through a frozen LLM, x3 trained.
FLOP_FACTOR = {"align": 4, "instruct-lora": 4, "instruct-full": 6}

# Each path: collator options, plus length grouping, a filled vision cache, torch.compile.
PATHS = {
    "baseline": dict(pack=False, sparse_logits=False),
    "sparse": dict(pack=False, sparse_logits=True),
    "packed": dict(pack=True, sparse_logits=True),
    "grouped": dict(pack=False, sparse_logits=True, grouped=True),
    "cached": dict(pack=False, sparse_logits=True, cached=True),
    "compiled": dict(pack=False, sparse_logits=True, compiled=True),
}


def run(model, examples, collator, args, loss_func, lengths=None, cache=None, compiled=False):
    """Train `args.steps` steps; returns (seconds per step after warm-up, peak GPU bytes, padding fraction)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from finetune.trainer import length_grouped_sampler, optimizer_name

    marks, tokens = [], {"pad": 0, "all": 0}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    class Bench(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs.pop("example_ids"), inputs.pop("skipped")
            keys = inputs.pop("image_keys", None)
            with cache.batch(keys) if cache else contextlib.nullcontext():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            return length_grouped_sampler(lengths, self.args.per_device_train_batch_size, seed=0)

    def counting(features):
        batch = collator(features)
        mask = batch.get("attention_mask")
        tokens["pad"] += int((mask == 0).sum()) if mask is not None else 0
        tokens["all"] += batch["input_ids"].numel()
        return batch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    targs = TrainingArguments(
        output_dir="/tmp/medllava-bench", per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-5, report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False,
        bf16=args.dtype == "bfloat16", gradient_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0, use_cpu=args.device == "cpu", disable_tqdm=True,
        optim=optimizer_name(args.device == "cuda"), torch_compile=compiled,
    )
    trainer = Bench(model=model, args=targs, train_dataset=examples, data_collator=counting,
                    compute_loss_func=loss_func, callbacks=[Clock()])
    trainer.train()
    warm = min(2, len(marks) - 1)
    per_step = (marks[-1] - marks[warm - 1]) / (len(marks) - warm) if warm else (marks[-1] - marks[0])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return per_step, peak, tokens["pad"] / max(1, tokens["all"])


def flops_per_example(model, stage, text_tokens, n_image_tokens):
    lm = model.model.language_model
    n_llm = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n)
    n_vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    factor = FLOP_FACTOR[stage]
    tokens = text_tokens + n_image_tokens
    return factor * n_llm * tokens + 2 * n_vision * (n_image_tokens + 1)


def fill_cache(model, examples, batch):
    """A vision feature cache holding every example's image: what the epochs after the first see."""
    from finetune.vision_cache import VisionFeatureCache

    cache = VisionFeatureCache(model).attach()
    tower = model.model.vision_tower
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            pixels = torch.cat([e["pixel_values"] for e in chunk]).to(model.device, model.dtype)
            with cache.batch([k for e in chunk for k in e["image_keys"]]):
                tower(pixels)
    return cache


def measure(options, args):
    """Build a fresh model, train one path, return its row of the table."""
    torch.manual_seed(0)
    if args.model == "llava-7b":
        model, processor, n_img, vocab = llava_7b_shape(getattr(torch, args.dtype))
        image_size = 336
    else:
        model, processor = build_model(ModelConfig(name_or_path=args.model, dtype=args.dtype))
        n_img, vocab = num_image_tokens(processor), len(processor.tokenizer)
        image_size = model.config.vision_config.image_size
    set_trainable(model, "align" if args.stage == "align" else "instruct")
    if args.stage == "instruct-lora":
        model = apply_lora(model, LoraConfig(enabled=True, r=128, alpha=256), ("multi_modal_projector", "language_model"))
    lengths = lengths_for("align" if args.stage == "align" else "instruct", args.lengths_from)
    examples = synthetic_examples(args.batch * (args.steps + 2), n_img, lengths, vocab,
                                  model.config.image_token_index, image_size)
    base = model if args.stage != "instruct-lora" else model.base_model.model
    cache = fill_cache(base, examples, args.batch) if options.get("cached") else None
    collator = Collator(processor.tokenizer.pad_token_id, pack=options["pack"], sparse_logits=options["sparse_logits"],
                        image_keys=cache is not None)
    per_step, peak, pad = run(
        model, examples, collator, args, supervised_loss if options["sparse_logits"] else None,
        lengths=[len(e["input_ids"]) for e in examples] if options.get("grouped") else None,
        cache=cache, compiled=options.get("compiled", False),
    )
    if cache is not None and cache.computed != len(examples):
        raise RuntimeError(f"cached path ran the vision tower on {cache.computed - len(examples)} images while timed")
    text = sum(len(e["input_ids"]) - n_img for e in examples) / len(examples)
    flops = flops_per_example(base, args.stage, text, n_img)
    return {
        "samples/s": args.batch / per_step,
        "tokens/s": args.batch * (text + n_img) / per_step,
        "TFLOP/s": flops * args.batch / per_step / 1e12,
        "pad %": 100 * pad,
        "peak GiB": peak / 2**30 if peak is not None else float("nan"),
        "header": f"text lengths {min(lengths)}-{max(lengths)} tokens"
                  f"{' from ' + str(args.lengths_from) if args.lengths_from else ' (uniform)'}, {n_img} image tokens",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["align", "instruct-lora", "instruct-full"], default="align")
    p.add_argument("--model", default="tiny", help="tiny, small, llava-7b (random weights) or a checkpoint folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="also measure the sparse path under torch.compile")
    p.add_argument("--lengths-from", type=Path, help="draw text lengths from this conversation file")
    args = p.parse_args()

    paths = [name for name in PATHS if (name != "cached" or args.stage == "align")
             and (name != "compiled" or args.compile)]
    results = {name: measure(PATHS[name], args) for name in paths}
    print(f"stage {args.stage}, model {args.model}, device {args.device}, dtype {args.dtype}, batch {args.batch}, "
          f"{args.steps} steps, optimizer {'fused' if args.device == 'cuda' else 'plain'} AdamW; "
          f"{results['baseline']['header']}")
    factor = FLOP_FACTOR[args.stage]
    print(f"FLOP convention: per example, {factor}N per token for the language model's forward and backward"
          " (N = its parameters without embeddings) over image + text tokens without padding, + 2 x the vision"
          " tower's parameters per patch token (counted on every path, cached or not)")
    print(f"{'path':<10}{'samples/s':>12}{'tokens/s':>12}{'TFLOP/s':>10}{'pad %':>8}{'peak GiB':>10}")
    for name, r in results.items():
        print(f"{name:<10}{r['samples/s']:>12.2f}{r['tokens/s']:>12.0f}{r['TFLOP/s']:>10.3f}{r['pad %']:>8.1f}"
              f"{r['peak GiB']:>10.2f}")
    for name in paths[1:]:
        print(f"{name} / baseline samples/s: {results[name]['samples/s'] / results['baseline']['samples/s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
