"""LoRA dropout that keeps a 1-byte mask for the backward pass instead of a copy of the dropped input.

PEFT computes an adapter as `lora_B(lora_A(dropout(x)))`: autograd then keeps, for every adapted layer, the
dropped-out input (a copy of `x`, for `lora_A`'s weight gradient) besides dropout's mask. Here dropout and
`lora_A` run as one autograd function that keeps `x` itself (shared by the three attention projections,
and by gate and up) and the boolean mask, and rebuilds the dropped input in the backward pass from the two
(one elementwise pass over the input). On a LLaVA-1.5-7B layer with rank-128 adapters on all seven linear
layers, bf16 autocast, that is 203 KiB kept per token against PEFT's 270 (340 with PEFT's float32 input
cast), measured on a CPU by benchmarks/bench_lora_memory.py; the frozen layer alone keeps 129.

It draws the same mask from the same random state as PEFT's `nn.Dropout` (the fused `native_dropout` on
CUDA, ATen's Bernoulli noise elsewhere), so losses and gradients equal PEFT's bit for bit;
tests/test_lora_dropout.py checks that on a CPU and bench_lora_memory.py on the device it runs on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


# Devices where torch's dropout runs its fused kernel (`native_dropout`); elsewhere it multiplies the input
# by a Bernoulli "noise" tensor already divided by 1 - p (ATen's Dropout.cpp).
FUSED_DROPOUT_DEVICES = ("cuda", "xpu")


def _dropout(x: torch.Tensor, p: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped input, boolean keep-mask), drawn and rounded exactly as `F.dropout(x, p, True)` on x's device."""
    if fused:
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * noise, noise != 0


def _undo_dropout(t: torch.Tensor, mask: torch.Tensor, p: float, fused: bool) -> torch.Tensor:
    """`t` times the scaled mask: dropout's backward for a gradient, or the dropped input rebuilt from `x`."""
    if fused:
        return torch.ops.aten.native_dropout_backward(t, mask, 1.0 / (1.0 - p))
    return t * mask.to(t.dtype).div_(1 - p)


class _DropoutThenLinear(torch.autograd.Function):
    """`F.linear(dropout(x, p), weight)`, keeping `x` and the mask (not the dropped input) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, fused: bool) -> torch.Tensor:
        dropped, mask = _dropout(x, p, fused)
        out = F.linear(dropped, weight)  # under autocast: in the autocast dtype, as nn.Linear would run
        ctx.p, ctx.fused, ctx.compute_dtype = p, fused, out.dtype
        ctx.save_for_backward(x, mask, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mask, weight = ctx.saved_tensors
        grad = grad.to(ctx.compute_dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_dropped = grad.matmul(weight.to(ctx.compute_dtype)).to(x.dtype)
            grad_x = _undo_dropout(grad_dropped, mask, ctx.p, ctx.fused)
        if ctx.needs_input_grad[1]:
            dropped = _undo_dropout(x, mask, ctx.p, ctx.fused).to(ctx.compute_dtype)
            # grad^T @ input, as linear's backward computes it for its (column-major) transposed weight.
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(dropped.reshape(-1, dropped.shape[-1]))
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None


class DropoutLinear(nn.Linear):
    """An adapter's `lora_A` with its dropout folded in. Same parameter (and state-dict key) as the
    `nn.Linear` it replaces; in eval mode, or without gradients, it is that plain linear layer."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return F.linear(x, self.weight, self.bias)
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(F.dropout(x, self.p, True), self.weight, self.bias)
        out = _DropoutThenLinear.apply(x, self.weight, self.p, x.device.type in FUSED_DROPOUT_DEVICES)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def fold_lora_dropout(model: nn.Module) -> int:
    """Fold each plain PEFT adapter's dropout into its `lora_A` (see the module docstring); returns how many
    adapters were changed. Adapters without dropout, or whose `lora_A` is not a plain linear layer, are left
    as PEFT made them."""
    folded = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        for adapter, dropout in list(dropouts.items()):
            linear = lora_a[adapter] if adapter in lora_a else None
            if type(dropout) is not nn.Dropout or dropout.p == 0.0 or type(linear) is not nn.Linear:
                continue
            linear.__class__ = DropoutLinear  # same object, same parameter: optimizers and hooks still see it
            linear.p = float(dropout.p)
            dropouts[adapter] = nn.Identity()
            folded += 1
    return folded
