"""`gradient_checkpointing: auto`: recompute activations only when the stage's heaviest micro-batch needs it.

Activation checkpointing costs a second forward pass through the language model (a third more compute
for stage 2, half as much again for stage 1, whose frozen model does no weight gradients), so it should be
on only where memory forces it. Whether it does depends on the card, the model, the micro-batch and the
data's lengths. Before training, the stage runs one forward and backward pass of its heaviest micro-batch
(the `per_device_batch_size` longest examples, packed or padded as training will batch them) without
checkpointing, on the training device, outside the run's random stream. Checkpointing stays off when that
pass fits with room for the optimizer's states (AdamW's two moments of every trained parameter, not yet
allocated) within HEADROOM of the device memory the process can use; it is turned on when the pass runs
out of memory or leaves no such room. Every process probes its own device and all follow the most
constrained one. On a CPU there is no device memory to measure: the pass only shows the step runs, and
checkpointing stays off.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medllava.finetune.config import StageConfig

HEADROOM = 0.9
"""Share of the usable device memory the probe's peak plus the optimizer's states may take; the rest is
left for the allocator's fragmentation and for batches a little heavier than the length estimate said."""


@dataclass
class ProbeResult:
    checkpointing: bool
    reason: str
    examples: int
    tokens: int
    peak_bytes: int | None = None
    optimizer_bytes: int | None = None
    usable_bytes: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def heaviest(lengths: list[int], k: int) -> list[int]:
    """Indices of the `k` longest examples (earliest first among equals)."""
    return sorted(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))[:k])


def optimizer_state_bytes(model) -> int:
    """AdamW's exp_avg and exp_avg_sq for every trained parameter, in the parameter's dtype."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def fits(peak: int, optimizer: int, usable: int) -> bool:
    return peak + optimizer <= HEADROOM * usable


def _forward_backward(model, batch: dict, loss_func, autocast_dtype, device) -> None:
    import torch

    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if loss_func is None:
            loss = model(**batch).loss
        else:
            labels = batch.pop("labels")
            loss = loss_func(model(**batch), labels)
    loss.backward()


def probe(model, dataset, collator, lengths: list[int], micro_batch: int, loss_func=None, autocast_dtype=None,
          device=None) -> ProbeResult:
    """Decide whether the stage needs activation checkpointing (module docstring). `collator` batches as
    training will (without vision-cache keys); `lengths` estimates each example's tokens."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = heaviest(lengths, micro_batch)
    batch = collator([dataset[i] for i in chosen])
    examples = len(batch.pop("example_ids"))  # packed, they are one row
    batch.pop("skipped", None)
    tokens = int(batch["input_ids"].numel())
    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)  # where the Trainer would put it; a 4-bit model was loaded onto its device already
    on_gpu = device.type == "cuda"
    usable = None
    if on_gpu:
        torch.cuda.synchronize(device)
        usable = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = optimizer_state_bytes(model)
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if on_gpu else []):  # the run's dropout masks stay its own
            _forward_backward(model, batch, loss_func, autocast_dtype, device)
    except torch.OutOfMemoryError:
        result = ProbeResult(True, "the heaviest micro-batch ran out of memory without it", examples, tokens,
                             optimizer_bytes=optimizer, usable_bytes=usable)
    else:
        if on_gpu:
            peak = torch.cuda.max_memory_allocated(device)
            room = fits(peak, optimizer, usable)
            result = ProbeResult(not room, "the heaviest micro-batch " + (
                "fits without it" if room else "leaves no room for the optimizer states without it"),
                examples, tokens, peak, optimizer, usable)
        else:
            result = ProbeResult(False, "no GPU memory to measure (CPU)", examples, tokens, optimizer_bytes=optimizer)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        del batch
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    if _any_rank(result.checkpointing, device) and not result.checkpointing:
        result.checkpointing = True
        result.reason += ", but another process's does not"
    return result


def _any_rank(flag: bool, device) -> bool:
    """True if any process's probe asked for checkpointing: every rank must run the same model code."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    on = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(on, op=dist.ReduceOp.MAX)
    return bool(on.item())


def probe_stage(model, processor, dataset, lengths: list[int], stage: StageConfig, args) -> ProbeResult:
    """`probe` with the collator, loss and autocast a stage configured by `stage` and `args`
    (TrainingArguments) trains with."""
    import torch

    from medllava.data import Collator
    from medllava.loss import supervised_loss

    collator = Collator(processor.tokenizer.pad_token_id, pack=stage.packing, sparse_logits=stage.sparse_logits)
    autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    return probe(model, dataset, collator, lengths, stage.per_device_batch_size,
                 loss_func=supervised_loss if stage.sparse_logits else None, autocast_dtype=autocast, device=args.device)


def describe(result: ProbeResult) -> str:
    """One line for the stage's log."""
    line = (f"activation checkpointing {'on' if result.checkpointing else 'off'} (auto): {result.reason}"
            f" ({result.examples} example{'s' if result.examples != 1 else ''} per pass, {result.tokens:,} tokens")
    if result.peak_bytes is not None:
        line += (f"; peak {result.peak_bytes / 2**30:.1f} GiB + optimizer states"
                 f" {result.optimizer_bytes / 2**30:.1f} GiB of {result.usable_bytes / 2**30:.1f} GiB usable,"
                 f" {HEADROOM:.0%} allowed")
    return line + ")"
