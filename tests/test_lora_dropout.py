"""Adapters with their dropout folded into lora_A (finetune/lora_dropout.py): the same numbers as PEFT's
adapters bit for bit, the same saved weights, and a mask kept for backward instead of a copy of the input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from medllava.finetune.config import LoraConfig
from medllava.finetune.lora_dropout import DropoutLinear, _DropoutThenLinear, fold_lora_dropout
from medllava.finetune.stages import apply_lora
from medllava.model import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]


def lora_model(dtype: str, fold: bool, autocast: bool, dropout: float = 0.3):
    model, _ = build_model(ModelConfig(name_or_path="tiny", dtype=dtype))
    model = apply_lora(model, LoraConfig(enabled=True, r=8, alpha=16, dropout=dropout), ("multi_modal_projector",),
                       autocast=autocast, fold_dropout=fold)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # B starts at zero: give every adapter a gradient both ways
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, autocast: bool):
    ids = torch.randint(10, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)  # the same dropout masks for both ways
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype,autocast", [("float32", False), ("bfloat16", True)])
def test_folded_dropout_gives_peft_loss_and_gradients_bit_for_bit(dtype, autocast):
    results = {}
    for fold in (False, True):
        model = lora_model(dtype, fold, autocast)
        folded = [m for m in model.modules() if isinstance(m, DropoutLinear)]
        assert len(folded) == (14 if fold else 0)  # 7 linear layers x 2 decoder layers
        results[fold] = loss_and_grads(model, autocast)
    (loss, grads), (folded_loss, folded_grads) = results[False], results[True]
    assert torch.equal(loss, folded_loss)
    assert grads.keys() == folded_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert torch.equal(grad, folded_grads[name]), name


def test_folded_adapters_save_the_same_weights_and_predict_like_peft_in_eval_mode():
    from peft import get_peft_model_state_dict

    plain, folded = lora_model("float32", False, False), lora_model("float32", True, False)
    plain_state, folded_state = get_peft_model_state_dict(plain), get_peft_model_state_dict(folded)
    assert plain_state.keys() == folded_state.keys()
    assert all(torch.equal(plain_state[k], folded_state[k]) for k in plain_state)
    ids = torch.randint(10, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    plain.eval(), folded.eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, folded(input_ids=ids).logits)
    merged = folded.merge_and_unload()  # what lora.merge saves
    assert not any(isinstance(m, DropoutLinear) for m in merged.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_path_matches_torch_native_dropout(dtype):
    # CUDA's dropout is torch.native_dropout; run that path on the CPU against autograd's own version of it.
    # In float32 they agree bit for bit. In bf16 the CPU's native_dropout rounds its forward output otherwise
    # than its backward kernel rounds the rebuilt input, so lora_A's gradient may differ by a bf16 rounding;
    # CUDA's two kernels compute alike in float32 (benchmarks/bench_lora_memory.py checks that on a GPU).
    x0 = torch.randn(3, 5, 16, dtype=dtype)
    w0 = torch.randn(4, 16)
    got, want = [], []
    for out, fn in ((got, lambda x, w: _DropoutThenLinear.apply(x, w, 0.25, True)),
                    (want, lambda x, w: F.linear(torch.native_dropout(x, 0.25, True)[0], w))):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = fn(x, w)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
        out.extend([y.detach(), x.grad, w.grad])
    assert [t.dtype for t in got] == [dtype, dtype, torch.float32]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # output and input gradient
    if dtype == torch.float32:
        assert torch.equal(got[2], want[2])
    else:
        assert torch.allclose(got[2], want[2], rtol=0, atol=2**-6 * want[2].abs().max().item())


def saved_for_backward(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return saved


def test_folded_adapter_keeps_its_input_and_a_bool_mask_not_a_dropped_copy():
    # One adapted linear layer, frozen base weight: PEFT keeps a dropped-out copy of the input (for lora_A's
    # gradient) and dropout's mask; the folded adapter keeps the input itself and a one-byte mask.
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32, requires_grad=True)
    kept = {}
    for fold in (False, True):
        model = nn.Sequential(nn.Linear(32, 32, bias=False))
        model[0].weight.requires_grad_(False)
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        model = inject_adapter_in_model(PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["0"]),
                                        model)
        if fold:
            assert fold_lora_dropout(model) == 1
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept[fold] = [t for t in saved_for_backward(model, x) if t.untyped_storage().data_ptr() not in params]
    input_sized = lambda ts: [t for t in ts if t.shape == x.shape]  # noqa: E731
    plain, folded = input_sized(kept[False]), input_sized(kept[True])
    assert any(t.is_floating_point() and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
               for t in plain)  # a copy of the input
    assert {t.dtype for t in folded} == {torch.float32, torch.bool}
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in folded if t.is_floating_point())


def test_adapters_without_dropout_are_left_as_peft_made_them():
    model = lora_model("float32", True, False, dropout=0.0)
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())
    assert fold_lora_dropout(model) == 0


def test_lora_memory_benchmark_measures_every_way_and_checks_the_gradients(capsys):
    spec = importlib.util.spec_from_file_location("bench_lora_memory", REPO / "benchmarks" / "bench_lora_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--shape", "tiny", "--tokens", "32"]) == 0
    printed = capsys.readouterr().out
    assert "bit for bit: yes" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "kept/token" not in line]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == list(bench.ROWS)
    kept = {r.split(" | ")[0].lstrip("| "): float(r.split(" | ")[1]) for r in rows}
    assert kept["frozen layer"] < kept["medllava"] < kept["PEFT, no input cast"] <= kept["PEFT default"]
