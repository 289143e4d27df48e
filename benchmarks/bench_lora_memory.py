"""LoRA activation memory: what one decoder layer keeps for the backward pass, medllava's adapters against PEFT's.

    python benchmarks/bench_lora_memory.py                              # LLaVA-1.5-7B's Llama layer, CPU
    python benchmarks/bench_lora_memory.py --device cuda --repeats 20   # the same on a GPU, with time

One decoder layer of the language model (`--shape`, default llava-7b: a 4096-wide Llama layer with 11008
MLP units; the model is built with one language-model layer and one vision layer, random weights in bf16)
gets adapters on all seven linear layers with finetune/configs/llava_med_lora.yaml's settings (rank 128,
dropout 0.05) and runs forward and backward under bf16 autocast on `--tokens` causal tokens, as stage 2
trains it. Rows:
- frozen layer: no adapters (what the layer keeps anyway);
- PEFT default (the plain way): `get_peft_model` as is, which casts each adapted layer's input to the
  adapters' float32 before its dropout;
- PEFT, no input cast: as medllava set adapters up before folding dropout (under autocast the adapter
  matmuls run in bf16 anyway);
- medllava: `medllava.finetune.stages.apply_lora`, dropout folded into each adapter (finetune/lora_dropout.py).

"kept/token" is the bytes autograd holds for the backward pass per token: every tensor saved for backward
inside the layer (parameters excluded, each storage counted once), measured at `--tokens` and at half as
many, the difference divided by the difference in tokens (so per-layer constants such as the bf16 copies of
the adapter weights drop out). "32 layers" multiplies it by the language model's layers. On a GPU, "peak
MiB" is the peak allocated during forward + backward above what was allocated before, and "ms" the median
forward + backward time over `--repeats`. "same grads" compares medllava's output and gradients with the
no-cast PEFT row's, bit for bit, from the same random state.
On a CPU, torch's dropout keeps its mask in the input's dtype (2 bytes in bf16, 4 in float32); its fused
CUDA kernel keeps a 1-byte mask, so the PEFT rows keep less on a GPU than on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from medllava.io import atomic_write_json  # noqa: E402

ROWS = ("frozen layer", "PEFT default", "PEFT, no input cast", "medllava")


def build(shape: str, device: str, dtype: torch.dtype):
    """A LlavaForConditionalGeneration of `shape` with one language-model layer and one vision layer."""
    from transformers import LlavaForConditionalGeneration

    from benchmarks.shapes import llava_7b_config, shape_config

    config = llava_7b_config(layers=1) if shape == "llava-7b" else shape_config(shape)
    config.text_config.num_hidden_layers = 1
    config.vision_config.num_hidden_layers = 1
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation("sdpa")
    return model


def with_adapters(model, row: str):
    from medllava.finetune.config import AdaptConfig
    from medllava.finetune.stages import apply_lora
    from medllava.config import load_config
    from medllava.model import TRAINABLE, set_trainable

    set_trainable(model, "instruct")
    if row == "frozen layer":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    lora = load_config(AdaptConfig, REPO / "finetune" / "configs" / "llava_med_lora.yaml").instruct.lora
    model = apply_lora(model, lora, TRAINABLE["instruct"], autocast=row != "PEFT default",
                       fold_dropout=row == "medllava")
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # B starts at zero: give every adapter a gradient path both ways
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def layer_parts(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = base.model.language_model
    return lm.layers[0], lm.rotary_emb


def forward(layer, rotary, hidden: torch.Tensor) -> torch.Tensor:
    """The decoder layer on `hidden` (causal, positions 0..n-1) under bf16 autocast, as training runs it."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        out = layer(hidden, position_embeddings=rotary(hidden, positions), position_ids=positions)
    return out[0] if isinstance(out, tuple) else out


def kept_bytes(layer, rotary, hidden: torch.Tensor, params: set[int]) -> int:
    """Bytes of the storages autograd saves inside `layer` for backward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(layer, rotary, hidden)
    # The layer's input is the previous layer's output, kept by whoever made it: not this layer's cost.
    seen.pop(hidden.untyped_storage().data_ptr(), None)
    return sum(seen.values())


def step(layer, rotary, hidden: torch.Tensor, seed: int):
    """Forward + backward from a fixed random state; returns the output and the gradients."""
    hidden = hidden.detach().requires_grad_()
    torch.manual_seed(seed)
    out = forward(layer, rotary, hidden)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["input"] = hidden.grad
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


def measure_row(args, row: str) -> dict:
    dtype = getattr(torch, args.dtype)
    model = with_adapters(build(args.shape, args.device, dtype), row)
    model.train()
    layer, rotary = layer_parts(model)
    width = model.config.text_config.hidden_size
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    gen = torch.Generator(device=args.device).manual_seed(2)
    hidden = torch.randn(1, args.tokens, width, generator=gen, device=args.device, dtype=dtype)
    half = hidden[:, : args.tokens // 2].clone()
    full_bytes = kept_bytes(layer, rotary, hidden.clone().requires_grad_(), params)
    half_bytes = kept_bytes(layer, rotary, half.requires_grad_(), params)
    per_token = (full_bytes - half_bytes) / (args.tokens - args.tokens // 2)
    result = {"kept_bytes_per_token": per_token, "kept_bytes": full_bytes,
              "adapters": sum(1 for n, _ in layer.named_modules() if n.endswith("lora_A"))}
    if row != "frozen layer":
        result["step"] = step(layer, rotary, hidden, seed=3)
    if args.device == "cuda":
        times = []
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            step(layer, rotary, hidden, seed=3)
            torch.cuda.synchronize()
            if i:  # the first call warms up kernels and the allocator
                times.append(time.perf_counter() - start)
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        result["ms"] = 1000 * statistics.median(times)
    return result


def measure(args) -> dict:
    from benchmarks.shapes import shape_config

    results = {row: measure_row(args, row) for row in ROWS}
    out, grads = results["medllava"].pop("step")
    ref_out, ref_grads = results["PEFT, no input cast"].pop("step")
    results["PEFT default"].pop("step")
    same = torch.equal(out, ref_out) and grads.keys() == ref_grads.keys() and all(
        torch.equal(grads[k], ref_grads[k]) for k in grads)
    layers = shape_config(args.shape).text_config.num_hidden_layers
    plain = results["PEFT default"]["kept_bytes_per_token"]
    for row in results.values():
        row["kept_mib_per_token_all_layers"] = row["kept_bytes_per_token"] * layers / 2**20
        row["vs_plain"] = row["kept_bytes_per_token"] / plain
    return {"shape": args.shape, "device": args.device, "dtype": args.dtype, "tokens": args.tokens,
            "layers": layers, "lora": "llava_med_lora.yaml", "same_grads": same, "rows": results}


def report(result: dict) -> str:
    gpu = result["device"] == "cuda"
    lines = [
        f"LoRA activation memory: one {result['shape']} decoder layer, {result['tokens']} tokens, bf16 autocast,"
        f" {result['device']}; adapters as llava_med_lora.yaml (rank 128, dropout 0.05, all 7 linear layers)",
        "",
        f"| path | kept/token (KiB) | {result['layers']} layers (MiB/token) | vs PEFT default |"
        + (" peak MiB | ms |" if gpu else ""),
        "|---|---:|---:|---:|" + ("---:|---:|" if gpu else ""),
    ]
    for name, row in result["rows"].items():
        line = (f"| {name} | {row['kept_bytes_per_token'] / 1024:.1f} | {row['kept_mib_per_token_all_layers']:.2f}"
                f" | {row['vs_plain']:.2f}x |")
        if gpu:
            line += f" {row['peak_mib']:.0f} | {row['ms']:.2f} |"
        lines.append(line)
    lines.append("")
    lines.append(f"medllava's output and gradients equal PEFT's (no input cast) bit for bit: "
                 f"{'yes' if result['same_grads'] else 'NO'}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llava-7b", choices=("llava-7b", "tiny", "small"))
    p.add_argument("--tokens", type=int, default=512, help="tokens in the measured pass (even, at least 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the frozen weights' dtype")
    p.add_argument("--repeats", type=int, default=10, help="timed forward + backward passes (GPU only)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.tokens < 4 or args.tokens % 2:
        p.error("--tokens must be even and at least 4")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print(report(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0 if result["same_grads"] else 1


if __name__ == "__main__":
    sys.exit(main())
