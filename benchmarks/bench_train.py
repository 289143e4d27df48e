"""Training throughput: medllava's batches against the plain-transformers way, in one process.

    python benchmarks/bench_train.py --stage align --model tiny --steps 20            # CPU, tiny model
    python benchmarks/bench_train.py --stage instruct-lora --model llava-7b --device cuda --batch 16
    python benchmarks/bench_train.py --stage instruct-lora --model tiny-next --steps 4        # CPU, LLaVA-NeXT
    python benchmarks/bench_train.py --stage instruct-lora --model llava-next-7b --device cuda --batch 8
    python benchmarks/bench_eval.py --write-random-7b /tmp/llava-7b --device cuda      # then, for QLoRA:
    python benchmarks/bench_train.py --stage instruct-qlora --model /tmp/llava-7b --batch 8 --gradient-checkpointing

Stages: `align` (stage 1: the projector trains), `instruct-full` (stage 2: projector + language model),
`instruct-lora` (stage 2 with LoRA on every linear layer of the language model and the projector in full,
settings from finetune/configs/llava_med_lora.yaml) and `instruct-qlora` (the same on a 4-bit NF4
language model, settings from finetune/configs/llava_med_qlora.yaml; needs a CUDA GPU, bitsandbytes and a
checkpoint folder to load in 4-bit). Every path trains the same model from the same encoded examples with
`transformers.Trainer`:
- baseline: padded batches in random order, the model's own loss over full-vocabulary logits at every
  position (what a user writes with Trainer + PEFT, + bitsandbytes for QLoRA);
- sparse: padded batches, logits only at supervised positions (`Collator(sparse_logits=True)` +
  `supervised_loss`);
- packed: as sparse, and packed rows (no padding; attention kept inside each example through position
  ids: block-diagonal masks under sdpa, varlen kernels under flash-attention or flex);
- grouped: as sparse, batches of similar length (`medllava.finetune.trainer.length_grouped_sampler`);
- cached (stage 1 only): as sparse, the frozen vision tower answered from a filled
  `medllava.finetune.vision_cache.VisionFeatureCache` (per tile in a grid family): the steady state of every
  epoch after the first;
- compiled (`--compile`): as sparse, the model under torch.compile;
- packed-flex (CUDA only): as packed, under flex attention whatever `--attn` says;
- packed-flex-compiled (CUDA only, `--compile`): as packed-flex, each decoder layer of the language model
  compiled on its own (the stages' `compile_layers`: dynamic shapes, one compiled layer serves all 32),
  which fuses the small element-wise kernels a host-bound step launches.
How much each forward pass holds and whether activations are recomputed are set apart for the baseline
and medllava's paths, as a user of each would set them: the baseline runs `--batch` examples per forward
pass, with activation checkpointing when `--baseline-checkpointing` (or `--gradient-checkpointing`) is
given; medllava's paths run `--micro-batch` examples per pass and accumulate gradients up to the same
`--batch` per optimizer step, recomputing activations only with `--gradient-checkpointing` (its stage
configs leave checkpointing off where the micro-batch fits without it). A path that runs out of GPU
memory is retried at half its micro-batch; the micro-batch it ran at is in the table. `--paths NAME@N`
runs a path at N examples per pass whatever `--micro-batch` says, so one run can time a path at two sizes.
Data loading is outside the timed region (examples are encoded once), so the figures are the model's.
The optimizer is the one medllava's stages use: fused AdamW on CUDA (also transformers' default there
with torch >= 2.8), the plain loop elsewhere. A path that fails otherwise is reported as such and the
others still run. `--json FILE` also writes the table and its settings.

Text: real token lengths and turn structure (benchmarks/real_text.py): stage 1 the shipped real PMC figure
captions, stage 2 the shipped teacher-written multi-turn conversations, both resampled with replacement;
`--lengths-from FILE` takes a conversation file instead. Each example is encoded by medllava's template
code (plain for stage 1, vicuna_v1 for stage 2) with the model's tokenizer, so its labels supervise the
replies only; images are random pixels. The 7B shapes (llava-7b, llava-next-7b: benchmarks/shapes.py)
have random weights and no real tokenizer: they use the stand-in BPE of the random checkpoints, which on
these texts gives about 1.5x as many tokens as LLaMA-2's tokenizer (measured once on the shipped captions
and conversations), so their texts run longer than LLaVA-1.5 would see them; a real checkpoint folder
brings its own tokenizer.

Image tokens come from the model's family (medllava.families): a fixed count per image in LLaVA-1.5; in
a grid family (LLaVA-NeXT) the count of the image's size, as the processor expands it, every example's
image being `--image-size` (default: the size that fills the family's largest grid, the most tokens one
image takes, as a large square scan does: 2928 for llava-next-7b, 88 for tiny-next). The table states the
tokens per example; a path that cannot apply to the family (`Family.feature_cache` names why the vision
feature cache would not) is left out, and the reason printed.
FLOP convention (printed with the table): per example, 2N per token for the language model's forward
(N = its parameters, embeddings excluded, counted unquantised), x2 with gradients flowing through a
frozen LLM (stage 1, LoRA, QLoRA: 4N), x3 when it is trained (6N), over every token (image + text, padding
excluded); plus the vision tower's forward, 2 x its parameters per patch token, counted even where the
cache skips it, so TFLOP/s is useful work per second and compares across paths.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.real_text import TextSource, encode_examples, source_for, spread  # noqa: E402
from benchmarks.shapes import RANDOM_7B, model_class, random_7b_config, random_7b_processor  # noqa: E402
from benchmarks.train_profile import GpuProfile, summary_line  # noqa: E402
from benchmarks.train_report import flops_per_example, report  # noqa: E402
from medllava.finetune.compilation import allow_checkpointed_side_effects, compile_decoder_layers  # noqa: E402
from medllava.finetune.stages import apply_lora  # noqa: E402
from medllava.finetune.trainer import checkpointing_arguments  # noqa: E402
from medllava.data import Collator  # noqa: E402
from medllava.loss import supervised_loss  # noqa: E402
from medllava.model import TRAINABLE, ModelConfig, build_model, set_trainable  # noqa: E402
from medllava.families import (FAMILIES, Family, UnsupportedModelError, checkpoint_family,  # noqa: E402
                               image_inputs, image_tokens_for_size, processor_family)
from medllava.tiny import TINY_SPECS  # noqa: E402

CONFIGS = REPO / "finetune" / "configs"

# Each stage: what it trains, its template, the shipped config whose LoRA settings it takes, whether the
# language model is loaded in 4-bit, and its language-model FLOPs per token and parameter (2 forward, x2
# with gradients flowing through a frozen LLM, x3 when it is trained).
STAGES = {
    "align": dict(trains="align", template="plain", flops=4),
    "instruct-full": dict(trains="instruct", template="vicuna_v1", flops=6),
    "instruct-lora": dict(trains="instruct", template="vicuna_v1", flops=4, lora="llava_med_lora.yaml"),
    "instruct-qlora": dict(trains="instruct", template="vicuna_v1", flops=4, lora="llava_med_qlora.yaml",
                           quantize=True),
}

# Each path: collator options, plus length grouping, a filled vision cache, torch.compile.
PATHS = {
    "baseline": dict(pack=False, sparse_logits=False),
    "sparse": dict(pack=False, sparse_logits=True),
    "packed": dict(pack=True, sparse_logits=True),
    "grouped": dict(pack=False, sparse_logits=True, grouped=True),
    "cached": dict(pack=False, sparse_logits=True, cached=True),
    "compiled": dict(pack=False, sparse_logits=True, compiled=True),
    "packed-flex": dict(pack=True, sparse_logits=True, attn="flex_attention"),
    "packed-flex-compiled": dict(pack=True, sparse_logits=True, attn="flex_attention", regional_compile=True),
}


def qlora_refusal(args) -> str | None:
    """Why the QLoRA stage cannot run here (one line), or None."""
    missing = []
    if args.device != "cuda" or not torch.cuda.is_available():
        missing.append("a CUDA GPU (--device cuda)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install bitsandbytes, or offline: pip install --no-index .wheels/*.whl)")
    if missing:
        return f"instruct-qlora trains on 4-bit NF4 weights and needs {' and '.join(missing)}, which this machine lacks"
    if args.model in TINY_SPECS or args.model in RANDOM_7B:
        return ("instruct-qlora loads a checkpoint folder in 4-bit: write a random 7B one with `python"
                " benchmarks/bench_eval.py --write-random-7b DIR --device cuda` and pass --model DIR")
    return None


def lora_settings(config_name: str):
    """The stage-2 LoRA settings of a shipped config."""
    from medllava.finetune.config import AdaptConfig
    from medllava.config import load_config

    return load_config(AdaptConfig, CONFIGS / config_name).instruct.lora


def load_model(args, attn: str = "sdpa", checkpointing: bool = False, plain: bool = False):
    """`(model, processor, tokenizer description)` for `--model`, trainable as `--stage` trains it,
    with attention kernel `attn` (transformers' attn_implementation); `checkpointing` tells the QLoRA
    preparation whether activations will be recomputed. `plain` adapters are PEFT's defaults (the
    baseline); otherwise as medllava's stages set them up."""
    spec = STAGES[args.stage]
    dtype = getattr(torch, args.dtype)
    if args.model in RANDOM_7B:
        processor = random_7b_processor(args.model)
        tokenizer = "the random 7B checkpoints' stand-in BPE tokenizer"
        # The config takes the tokenizer's ids: its <image> token is what the examples carry.
        config = random_7b_config(args.model, processor.tokenizer)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # 7B parameters: never materialise them in float32 first
        try:
            with torch.device(args.device):
                model = model_class(config)(config)
        finally:
            torch.set_default_dtype(default)
        model.set_attn_implementation(attn)
    else:
        model, processor = build_model(ModelConfig(name_or_path=args.model, dtype=args.dtype, attn_implementation=attn),
                                       quantize_4bit=spec.get("quantize", False))
        named = args.model in TINY_SPECS
        tokenizer = f"the {args.model} model's BPE tokenizer" if named else f"the tokenizer of {args.model}"
    if spec.get("quantize"):
        from peft import prepare_model_for_kbit_training

        # The plain QLoRA recipe: freeze everything and upcast the rest to float32; the adapters and the
        # projector are made trainable by PEFT below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    else:
        set_trainable(model, spec["trains"])
    if "lora" in spec:
        autocast = not plain and args.dtype == "bfloat16"  # the runs' Trainer autocasts to bf16, as a stage does
        model = apply_lora(model, lora_settings(spec["lora"]), TRAINABLE["instruct"], autocast=autocast,
                           fold_dropout=not plain)
    return model, processor, tokenizer


def run(model, examples, collator, args, loss_func, lengths=None, cache=None, compiled=False, micro=None,
        checkpointing=False):
    """Train `args.steps` optimizer steps of `args.batch` examples, `micro` per forward pass (default all of
    them); returns (seconds per step after warm-up, peak GPU bytes, padding fraction, the `--profile`
    summary or None)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from medllava.finetune.trainer import length_grouped_sampler, optimizer_name

    marks, tokens = [], {"pad": 0, "all": 0}

    profiler = GpuProfile() if args.profile else None

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            if profiler is not None and len(marks) == 2:
                profiler.start()  # the timed steps only

        def on_train_end(self, a, state, control, **kw):
            if profiler is not None:
                profiler.stop()

    class Bench(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs.pop("example_ids"), inputs.pop("skipped")
            keys = inputs.pop("image_keys", None)
            with cache.batch(keys, inputs.get("image_sizes")) if cache else contextlib.nullcontext():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            return length_grouped_sampler(lengths, self.args.per_device_train_batch_size, seed=0)

    micro = micro or args.batch
    if args.batch % micro:
        raise ValueError(f"--batch {args.batch} is not a multiple of the micro-batch {micro}")

    def counting(features):
        batch = collator(features)
        mask = batch.get("attention_mask")
        tokens["pad"] += int((mask == 0).sum()) if mask is not None else 0
        tokens["all"] += batch["input_ids"].numel()
        return batch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if compiled:
        allow_checkpointed_side_effects()  # as a stage with torch_compile does
    targs = TrainingArguments(
        output_dir="/tmp/medllava-bench", per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.batch // micro, max_steps=args.steps,
        learning_rate=1e-5, report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False,
        bf16=args.dtype == "bfloat16", **checkpointing_arguments(checkpointing),
        dataloader_num_workers=0, use_cpu=args.device == "cpu", disable_tqdm=True,
        optim=optimizer_name(args.device == "cuda"), torch_compile=compiled,
    )
    trainer = Bench(model=model, args=targs, train_dataset=examples, data_collator=counting,
                    compute_loss_func=loss_func, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would land in the table's output
    trainer.train()
    per_step = (marks[-1] - marks[1]) / (len(marks) - 2)  # steps 1 and 2 pay for allocation and kernel choice
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    profile = profiler.summary() if profiler is not None else None
    return per_step, peak, tokens["pad"] / max(1, tokens["all"]), profile


def model_family_of(model: str) -> Family:
    """The family of `--model` before anything loads: a named or 7B shape's, or a checkpoint folder's."""
    if model in TINY_SPECS:
        return FAMILIES[TINY_SPECS[model].family]
    if model in RANDOM_7B:
        return FAMILIES["llava_next" if model == "llava-next-7b" else "llava"]
    return checkpoint_family(model)


def largest_grid_size(processor) -> tuple[int, int]:
    """(width, height) of the grid pinpoint whose image takes the most tokens."""
    sizes = [(w, h) for h, w in processor.image_processor.image_grid_pinpoints]
    return max(sizes, key=lambda size: image_tokens_for_size(processor, *size))


class ExampleImage(NamedTuple):
    """Every example's image, as the family's processor prepares it."""

    pixels: dict
    """The processor's pixel inputs of one image (`pixel_values` (1, 3, H, W), or (1, tiles, 3, H, W) with
    `image_sizes` (1, 2)); each example gets random pixels of this shape."""
    size: tuple[int, int]
    """(width, height) of the image given to the processor."""
    tokens: int
    """Tokens its `<image>` expands to."""
    vision_tokens: int
    """Patches plus class token of every tile the vision tower sees (LLaVA-NeXT: the downsampled view and
    each grid tile), for the FLOP count."""


def example_image(processor, args) -> ExampleImage:
    """The image of `--image-size` (a grid family's default: the size filling its largest grid; a fixed-
    resolution family resizes any image to its one size, so the size is its own)."""
    from PIL import Image

    if processor_family(processor).fixed_image_tokens:
        crop = processor.image_processor.crop_size
        size = args.image_size or (crop["width"], crop["height"])
    else:
        size = args.image_size or largest_grid_size(processor)
    got = image_inputs(processor, [Image.new("RGB", size)])
    pixels, counts = got.pixels, got.counts
    values = pixels["pixel_values"]
    tiles = values.shape[1] if values.dim() == 5 else 1
    patches = (values.shape[-1] // processor.patch_size) * (values.shape[-2] // processor.patch_size)
    return ExampleImage(pixels, tuple(size), counts[0], tiles * (patches + 1))


def fill_cache(model, examples, batch):
    """A vision feature cache holding every example's image: what the epochs after the first see."""
    from medllava.finetune.vision_cache import VisionFeatureCache

    cache = VisionFeatureCache(model).attach()
    tower = model.model.vision_tower
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            pixels = torch.cat([tower_rows(cache, e) for e in chunk]).to(model.device, model.dtype)
            sizes = torch.cat([e["image_sizes"] for e in chunk]) if "image_sizes" in chunk[0] else None
            with cache.batch([k for e in chunk for k in e["image_keys"]], sizes):
                tower(pixels)
    return cache


def tower_rows(cache, example) -> torch.Tensor:
    """An example's pixels as the vision tower sees them: `(images, 3, S, S)`, or a grid family's real tiles
    `(tiles, 3, S, S)` (the model drops the padding tiles by `image_sizes` before the tower)."""
    pixels = example["pixel_values"]
    if pixels.dim() == 4:
        return pixels
    tiles = cache.family.tiles_per_image(cache.config, example["image_sizes"])
    return torch.cat([image[:n] for image, n in zip(pixels, tiles)])


def measure(options, args, source: TextSource, describe_text: bool = False, attn: str = "sdpa", micro=None,
            checkpointing: bool = False, plain: bool = False):
    """Build a fresh model, train one path (`micro` examples per forward pass, activations recomputed with
    `checkpointing`, PEFT's own adapter setup when `plain`), return its row of the table, and with
    `describe_text` what the text it trained on was (encoding every real record whole once, for their lengths)."""
    torch.manual_seed(0)
    model, processor, tokenizer = load_model(args, attn, checkpointing, plain=plain)
    base = model.base_model.model if "lora" in STAGES[args.stage] else model
    image = example_image(processor, args)
    n_img = image.tokens
    template = STAGES[args.stage]["template"]
    examples, too_long = encode_examples(
        source.draw(args.batch * (args.steps + 2)), processor, template, n_img, base.config.image_token_index,
        image.pixels, args.max_length)
    if not examples:
        raise SystemExit(f"bench_train: --max-length {args.max_length} cuts the image or first reply of every example")
    if options.get("regional_compile"):
        compile_decoder_layers(model)  # as a stage with compile_layers does
    cache = fill_cache(base, examples, args.batch) if options.get("cached") else None
    collator = Collator(processor.tokenizer.pad_token_id, pack=options["pack"], sparse_logits=options["sparse_logits"],
                        image_keys=cache is not None)
    per_step, peak, pad, profile = run(
        model, examples, collator, args, supervised_loss if options["sparse_logits"] else None,
        lengths=[len(e["input_ids"]) for e in examples] if options.get("grouped") else None,
        cache=cache, compiled=options.get("compiled", False), micro=micro, checkpointing=checkpointing,
    )
    if cache is not None and cache.images_computed != len(examples):
        raise RuntimeError(f"cached path ran the vision tower on {cache.images_computed - len(examples)} images"
                           " while timed")
    text = [len(e["input_ids"]) - n_img for e in examples]
    mean_text = sum(text) / len(text)
    flops = flops_per_example(base.config, STAGES[args.stage]["flops"], mean_text + n_img, image.vision_tokens)
    row = {
        "samples/s": args.batch / per_step,
        "tokens/s": args.batch * (mean_text + n_img) / per_step,
        "TFLOP/s": flops * args.batch / per_step / 1e12,
        "pad %": 100 * pad,
        "peak GiB": peak / 2**30 if peak is not None else None,
        "micro-batch": micro or args.batch, "checkpointing": checkpointing,
    }
    if profile is not None:
        row["profile"] = profile
    if not describe_text:
        return row, None
    whole = encode_examples(source.records, processor, template, n_img, base.config.image_token_index, None, None)[0]
    return row, {
        "source": source.description, "template": template, "tokenizer": tokenizer, "image_tokens": n_img,
        "family": processor_family(processor).model_type, "image_size": list(image.size),
        "text_tokens_per_example": spread(text),
        "text_tokens_of_real_records": spread([len(e["input_ids"]) - n_img for e in whole]),
        "examples_too_long": too_long,
    }


def measure_all(paths: list[str], args, source: TextSource) -> tuple[dict, dict | None]:
    """Each path's row. The baseline runs `--batch` per forward pass; medllava's paths `--micro-batch`,
    halved after running out of GPU memory while it is above 1. A path that still runs out, or fails
    otherwise, gets an `error` row (the traceback goes to stderr) and the rest still run."""
    results, text = {}, None
    for name in paths:
        path, _, at = name.partition("@")  # NAME@N: this path at N examples per pass
        plain = path == "baseline"
        # The baseline is the plain way, sdpa; --attn (or the path itself) picks the kernel of medllava's paths.
        attn = "sdpa" if plain else PATHS[path].get("attn", args.attn)
        micro = int(at) if at else args.batch if plain else (args.micro_batch or args.batch)
        checkpointing = args.gradient_checkpointing or (plain and args.baseline_checkpointing)
        while name not in results:
            try:
                results[name], described = measure(PATHS[path], args, source, describe_text=text is None, attn=attn,
                                                   micro=micro, checkpointing=checkpointing, plain=plain)
                results[name]["attn"] = attn
                text = text or described
                r = results[name]
                # One line as each path ends: a run stopped part-way keeps the paths it finished.
                print(f"{name}: {r['samples/s']:.2f} samples/s, {r['TFLOP/s']:.1f} TFLOP/s, peak "
                      f"{r['peak GiB'] if r['peak GiB'] is None else round(r['peak GiB'], 2)} GiB, micro-batch {micro}",
                      file=sys.stderr, flush=True)
                if "profile" in r:
                    print(summary_line(name, r["profile"]), flush=True)
            except torch.OutOfMemoryError:
                if plain or micro == 1:
                    results[name] = {"error": f"out of GPU memory at {micro} examples per forward pass"}
                else:
                    print(f"{name}: out of GPU memory at micro-batch {micro}; trying {micro // 2}", file=sys.stderr)
                    micro //= 2
            except Exception as e:  # one path's failure (a kernel this GPU lacks, say) must not lose the others
                traceback.print_exc()
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                results[name] = {"error": f"failed: {type(e).__name__}: {first}"[:200]}
            gc.collect()  # the failed or finished path's model goes before the next one is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results, text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=list(STAGES), default="align")
    p.add_argument("--model", default="tiny", help=f"{', '.join(TINY_SPECS)}, {', '.join(RANDOM_7B)} (random weights)"
                                                   " or a checkpoint folder of a supported family (instruct-qlora"
                                                   " needs a folder)")
    p.add_argument("--image-size", type=image_size_arg, metavar="WxH",
                   help="every example's image size in pixels, which sets a grid family's image tokens (default:"
                        " the size filling its largest grid, the most tokens an image takes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per path; the first 2 are not timed")
    p.add_argument("--paths", help=f"comma-separated paths to run, of {', '.join(PATHS)} (default: all the stage has);"
                                  " NAME@N runs NAME at N examples per pass (e.g. packed-flex-compiled@16)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "flex_attention", "flash_attention_2", "eager"),
                   help="attention kernel of every path but the baseline (sdpa, the plain way); packed rows keep"
                        " attention inside each example under each of them")
    p.add_argument("--micro-batch", type=int, help="examples per forward pass on medllava's paths, gradients"
                                                    " accumulated up to --batch (default --batch); halved on"
                                                    " running out of GPU memory")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations on every path")
    p.add_argument("--baseline-checkpointing", action="store_true",
                   help="recompute activations on the baseline (the plain way of fitting --batch in one pass)")
    p.add_argument("--profile", action="store_true",
                   help="profile the timed steps (torch.profiler): GPU busy share and the kernels that take the time")
    p.add_argument("--compile", action="store_true", help="also offer the compiled paths: compiled (the whole"
                                                          " model, Trainer's torch_compile) and packed-flex-compiled")
    p.add_argument("--lengths-from", type=Path, help="draw the examples' text from this conversation file")
    p.add_argument("--max-length", type=int, default=2048,
                   help="cut longer examples to this many tokens as training does (left out where that would cut"
                        " the image or the first reply)")
    p.add_argument("--json", type=Path, help="also write the table and its settings to this file")
    return p


def image_size_arg(text: str) -> tuple[int, int]:
    """`--image-size WxH` as (width, height)."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give the size as WIDTHxHEIGHT in pixels, e.g. 672x672")
    return int(width), int(height)


def family_refusals(model: str) -> dict[str, str]:
    """Paths that cannot apply to the family of `--model`, each with the reason. A folder not written yet
    (benchmarks/gpu_all.sh parses its steps before the random 7B folder exists) refuses none here: loading
    it says what is wrong."""
    try:
        family = model_family_of(model)
    except UnsupportedModelError:
        return {}
    if family.feature_cache:
        return {"cached": f"cached: left out for {family.model_type} models: {family.feature_cache}"}
    return {}


def stage_paths(args, parser) -> list[str]:
    refused = family_refusals(args.model)
    available = [name for name in PATHS if (name != "cached" or args.stage == "align")
                 and (name not in ("compiled", "packed-flex-compiled") or args.compile)
                 and (not name.startswith("packed-flex") or args.device == "cuda") and name not in refused]
    if not args.paths:
        return available
    asked = [name.strip() for name in args.paths.split(",") if name.strip()]
    for name in asked:
        if name.partition("@")[0] in refused:
            parser.error(f"--paths {name}: {refused[name.partition('@')[0]]}")
    unknown = [name for name in asked if name.partition("@")[0] not in available]
    if unknown:
        parser.error(f"--paths {', '.join(unknown)}: stage {args.stage} has {', '.join(available)}")
    for name in asked:
        at = name.partition("@")[2]
        if at and not (at.isdigit() and int(at) >= 1 and args.batch % int(at) == 0):
            parser.error(f"--paths {name}: the examples per pass after @ must divide --batch {args.batch}")
    if len(set(asked)) < len(asked):
        parser.error(f"--paths {args.paths}: a path is named twice")
    return asked


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = stage_paths(args, parser)
    if args.steps < 3:
        parser.error(f"--steps {args.steps}: at least 3 (2 untimed warm-up steps, then the timed ones)")
    if args.micro_batch is not None and (args.micro_batch < 1 or args.batch % args.micro_batch):
        parser.error(f"--micro-batch {args.micro_batch}: must divide --batch {args.batch}")
    if args.attn == "flex_attention" and args.device == "cpu":
        parser.error("--attn flex_attention: torch's flex attention has no backward pass on a CPU; use --device cuda")
    if STAGES[args.stage].get("quantize") and (refusal := qlora_refusal(args)):
        print(f"bench_train: {refusal}", file=sys.stderr)
        return 2
    # Paths the stage would run but the family cannot: said once, in the table and its JSON.
    left_out = [reason for name, reason in family_refusals(args.model).items()
                if not args.paths and (name != "cached" or args.stage == "align")]
    source = source_for("align" if args.stage == "align" else "instruct", args.lengths_from)
    results, text = measure_all(paths, args, source)
    spec = STAGES[args.stage]
    report(args, paths, results, text, spec, lora_settings(spec["lora"]) if "lora" in spec else None, left_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
