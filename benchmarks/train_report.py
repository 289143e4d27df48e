"""The training benchmark's report: the FLOP count behind its TFLOP/s, the table it prints, and the JSON
(`--json`) that holds the table and its settings.

The FLOP convention is stated for the user in bench_train.py's docstring; here `flops_per_example` counts
by it and `flop_convention` is the line printed with the table and stored in the JSON, so the count and
its description change together.
"""

from __future__ import annotations

import torch

from benchmarks.real_text import describe
from benchmarks.shapes import meta_model
from medllava.io import atomic_write_json


def parameter_counts(config) -> tuple[int, int]:
    """(language model without embeddings, vision tower) parameters, counted unquantised on the meta device."""
    plain = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    shape = meta_model(plain).model
    n_llm = sum(p.numel() for n, p in shape.language_model.named_parameters() if "embed" not in n)
    return n_llm, sum(p.numel() for p in shape.vision_tower.parameters())


def flops_per_example(config, llm_flops: int, tokens: float, vision_tokens: int) -> float:
    """FLOPs of one example of `tokens` (image + text, mean over the examples): `llm_flops` per language-model
    parameter and token, and the vision tower's forward over `vision_tokens` (its patch and class tokens, over
    every tile it sees: 577 for LLaVA-1.5's one 336-px image)."""
    n_llm, n_vision = parameter_counts(config)
    return llm_flops * n_llm * tokens + 2 * n_vision * vision_tokens


def flop_convention(llm_flops: int) -> str:
    """The convention in one line, as printed with the table and stored in the JSON."""
    return (f"FLOP convention: per example, {llm_flops}N per token for the language model's forward and"
            " backward (N = its parameters without embeddings, unquantised) over image + text tokens without"
            " padding, + 2 x the vision tower's parameters per patch token (counted on every path, cached"
            " or not)")


def print_settings(args, device: str, spec: dict, lora, text: dict | None) -> None:
    """The lines above the table: the run's settings, then what text the examples had."""
    settings = (f"; LoRA r={lora.r} alpha={lora.alpha} on {','.join(lora.target_modules)} + projector in full"
                f" ({spec['lora']}{', language model in 4-bit NF4' if spec.get('quantize') else ''})" if lora else "")
    print(f"stage {args.stage}, model {args.model}, device {device}, dtype {args.dtype}, {args.batch} examples per"
          f" optimizer step, {args.steps} steps (timed after 2), {'fused' if args.device == 'cuda' else 'plain'} AdamW;"
          f" attention: baseline sdpa, the other paths {args.attn} unless named{settings}")
    if text is not None:
        print(f"text: {text['source']}; {text['template']} template, {text['tokenizer']}; text tokens per example"
              f" min/median/max {describe(text['text_tokens_per_example'])} (the real records whole:"
              f" {describe(text['text_tokens_of_real_records'])}), + {text['image_tokens']} image tokens per example"
              f" ({text['family']}: {text['image_size'][0]}x{text['image_size'][1]} images)"
              + (f"; {text['examples_too_long']} drawn examples left out (--max-length would cut their image or"
                 " first reply)" if text["examples_too_long"] else ""))


def print_table(paths: list[str], results: dict) -> dict:
    """One row per path (its error where it failed), then each path's speed-up over the baseline; returns
    those speed-ups."""
    print("micro: examples per forward pass (gradients accumulated up to the batch); ckpt: activations recomputed")
    print(f"{'path':<12}{'samples/s':>11}{'tokens/s':>10}{'TFLOP/s':>9}{'pad %':>7}{'peak GiB':>10}{'micro':>7}"
          f"{'ckpt':>6}  attention")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<12}  {r['error']}")
            continue
        peak = f"{r['peak GiB']:>10.2f}" if r["peak GiB"] is not None else f"{'-':>10}"
        print(f"{name:<12}{r['samples/s']:>11.2f}{r['tokens/s']:>10.0f}{r['TFLOP/s']:>9.3f}{r['pad %']:>7.1f}{peak}"
              f"{r['micro-batch']:>7}{'on' if r['checkpointing'] else 'off':>6}  {r['attn']}")
    ratios = {}
    if "samples/s" in results.get("baseline", {}):
        for name in paths[1:]:
            if "samples/s" in results[name]:
                ratios[name] = results[name]["samples/s"] / results["baseline"]["samples/s"]
                print(f"{name} / baseline samples/s: {ratios[name]:.2f}x")
    return ratios


def report(args, paths: list[str], results: dict, text: dict | None, spec: dict, lora,
           left_out: list[str] = ()) -> dict:
    """Print the table of stage `spec` (`lora`: its LoRA settings, or None; `left_out`: a line per path the
    model's family cannot run, with why) and, with `--json`, write everything it shows to that file;
    returns that."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print_settings(args, device, spec, lora, text)
    convention = flop_convention(spec["flops"])
    print(convention)
    ratios = print_table(paths, results)
    for line in left_out:
        print(line)
    table = {
        "stage": args.stage, "model": args.model, "device": device, "dtype": args.dtype, "batch": args.batch,
        "steps": args.steps, "micro_batch": args.micro_batch or args.batch,
        "gradient_checkpointing": args.gradient_checkpointing, "baseline_checkpointing": args.baseline_checkpointing,
        "lora": None if lora is None else {"config": spec["lora"], "r": lora.r, "alpha": lora.alpha,
                                           "target_modules": list(lora.target_modules),
                                           "quantize_4bit": bool(spec.get("quantize"))},
        "text": text, "flop_convention": convention, "paths": results, "vs_baseline": ratios,
        "left_out": list(left_out),
    }
    if args.json:
        atomic_write_json(args.json, table)
    return table
