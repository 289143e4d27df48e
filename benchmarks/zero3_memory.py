"""Per-GPU memory of full stage-2 training (instruction tuning) under DeepSpeed ZeRO-3, from
DeepSpeed's own estimator.

    python benchmarks/zero3_memory.py                        # LLaVA-1.5-7B shape, 8 GPUs on 1 node
    python benchmarks/zero3_memory.py --shape tiny --gpus 2

The model is built on the meta device (shapes, no weights) and its parameters are counted by module.
Stage 2 trains projector + language model + lm_head (`medllava.model.TRAINABLE["instruct"]`); the vision
tower stays frozen. DeepSpeed's `estimate_zero3_model_states_mem_needs_all_cold` assumes that every
parameter it is given is trained (16-bit weights and gradients, fp32 master weights and Adam moments:
18 bytes a parameter, partitioned over the GPUs) plus a gather buffer for the largest layer, so it is
given the trained parameters and the largest layer of the whole model; the frozen tower's 16-bit
shard (2 bytes a parameter over the GPUs, on GPU unless parameters are offloaded) is printed beside
it. Model states only: activations, the CUDA context and allocator fragmentation come on top.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.shapes import SHAPES, meta_model, shape_config  # noqa: E402
from medllava.model import TRAINABLE, module_of  # noqa: E402


def count_parameters(model) -> dict:
    """Trained and frozen parameter counts of stage 2, and the largest single layer (a module's own
    parameters, which ZeRO-3 gathers at once). Tied weights count once."""
    trained_modules = TRAINABLE["instruct"]
    trained = frozen = 0
    for name, param in model.named_parameters():
        if module_of(name) in trained_modules:
            trained += param.numel()
        else:
            frozen += param.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"trained": trained, "frozen": frozen, "largest_layer": largest}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="llava-7b")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--buffer-factor", type=float, default=1.5, help="DeepSpeed's additional_buffer_factor")
    args = p.parse_args(argv)

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    counts = count_parameters(meta_model(shape_config(args.shape)))
    n_gpus = args.gpus * args.nodes
    print(f"shape {args.shape}, stage 2 (instruct), ZeRO-3 on {args.nodes} node(s) x {args.gpus} GPUs:"
          f" {counts['trained']:,} trained parameters (projector, language model, lm_head),"
          f" {counts['frozen']:,} frozen (vision tower), largest layer {counts['largest_layer']:,}")
    estimate_zero3_model_states_mem_needs_all_cold(
        total_params=counts["trained"], largest_layer_params=counts["largest_layer"],
        num_gpus_per_node=args.gpus, num_nodes=args.nodes, additional_buffer_factor=args.buffer_factor,
    )
    frozen_gib = 2 * counts["frozen"] / n_gpus / 2**30
    print(f"  + frozen vision tower, 16-bit shard: {frozen_gib:.2f}GB per GPU with offload_param=none"
          " (on the CPU with offload_param=cpu)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
