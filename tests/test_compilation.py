"""Compiled training never runs eager without saying so: a decoder layer dynamo cannot compile stops a
stage asked for `compile_layers: true` with the reason, and a stage asked for `auto` goes on eager with
the fallback recorded; graph breaks are recorded. (Compiled layers training to the eager losses, with
activation checkpointing inside them as transformers 5.25 has it: tests/test_adapt.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.llama import modeling_llama

from medllava.finetune.adapt import run_adapt
from medllava.finetune.compilation import CompileError, CompileWatch, _reason
from medllava.finetune.config import AdaptConfig
from medllava.tiny import demo_data
from medllava.config import from_dict

DATA, IMAGES = demo_data()


def config(run_dir, **stage_overrides) -> dict:
    stage = {
        "data": {"path": str(DATA), "image_root": str(IMAGES), "template": "vicuna_v1"},
        "max_steps": 2, "global_batch_size": 4, "per_device_batch_size": 2, "save_steps": 2,
        "logging_steps": 1, "dataloader_workers": 0, "gradient_checkpointing": False, "learning_rate": 1e-2,
        "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "merge": False},
    }
    stage.update(stage_overrides)
    return {"run_dir": str(run_dir), "model": {"name_or_path": "tiny"}, "bf16": False, "report_to": ["none"],
            "instruct": stage}


def train(run_dir, **stage_overrides) -> tuple[dict, list[float]]:
    record = run_adapt(from_dict(AdaptConfig, config(run_dir, **stage_overrides)), ["instruct"])["instruct"]
    state = run_dir / "instruct" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    losses = [row["loss"] for row in json.loads(state.read_text())["log_history"] if "loss" in row]
    assert json.loads((run_dir / "instruct" / "stage_complete.json").read_text()) == json.loads(json.dumps(record))
    return record, losses


@pytest.fixture
def layer_dynamo_cannot_compile(monkeypatch):
    """Each decoder layer checkpointed in its forward around a graph break, as transformers 5.25's layers
    checkpoint in theirs: dynamo cannot trace the checkpoint, and the whole layer runs eager."""
    forward = modeling_llama.LlamaDecoderLayer.forward

    def checkpointed(self, hidden_states, *args, **kwargs):
        # Without the KV cache, which the recompute would write to a second time.
        kwargs = {k: v for k, v in kwargs.items() if "past" not in k and "cache" not in k}

        def body(hidden):
            torch._dynamo.graph_break()
            return forward(self, hidden, *args, **kwargs)

        return torch.utils.checkpoint.checkpoint(body, hidden_states, use_reentrant=False)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", checkpointed)


@pytest.fixture
def mlp_with_a_graph_break(monkeypatch):
    """A graph break in the middle of each decoder layer: dynamo compiles the pieces around it."""
    forward = modeling_llama.LlamaMLP.forward

    def broken(self, x):
        torch._dynamo.graph_break()
        return forward(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", broken)


@pytest.mark.slow  # dynamo traces a training step
def test_compiled_layers_that_run_eager_stop_the_stage_with_the_reason(tmp_path, layer_dynamo_cannot_compile):
    with pytest.raises(CompileError) as error:
        train(tmp_path / "on", compile_layers=True)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("stage instruct: compile_layers is on but the decoder layers ran eager in step 1")
    assert "(Call to `torch._dynamo.graph_break()` Explanation: User-inserted graph break." in message  # dynamo's
    assert "set instruct.compile_layers=false" in message
    assert not (tmp_path / "on" / "instruct" / "stage_complete.json").exists()


@pytest.mark.slow  # dynamo traces a training step, then an eager run to compare
def test_auto_goes_on_eager_and_records_why(tmp_path, layer_dynamo_cannot_compile, capsys):
    record, losses = train(tmp_path / "auto", compile_layers="auto")
    compiled = record["compilation"]
    assert compiled["option"] == "compile_layers" and compiled["setting"] == "auto"
    assert compiled["compiled"] is False and compiled["graphs"] == 0 and compiled["step"] == 1
    assert compiled["first_break"].startswith("Call to `torch._dynamo.graph_break()`")
    assert compiled["message"].endswith("going on uncompiled (auto)")
    assert f"[instruct] warning: {compiled['message']}" in capsys.readouterr().out
    _, eager = train(tmp_path / "eager")
    assert losses == pytest.approx(eager, rel=1e-5)


@pytest.mark.slow  # inductor compiles each piece between the breaks
def test_graph_breaks_inside_compiled_layers_are_recorded(tmp_path, mlp_with_a_graph_break):
    record, _ = train(tmp_path / "run", compile_layers=True)
    compiled = record["compilation"]
    assert compiled["compiled"] is True and compiled["graphs"] >= 2 and compiled["graph_breaks"] >= 1
    assert "graph_break" in compiled["first_break"] and "graph breaks" in compiled["message"]


@pytest.mark.slow  # inductor compiles the lambda
def test_the_watch_counts_only_graphs_built_after_it_began():
    # Graphs compiled for an earlier model in this process are dropped, not counted as this stage's.
    torch.compile(lambda x: x * 2)(torch.ones(2))
    watch = CompileWatch("align", "torch_compile", True)
    with pytest.raises(CompileError, match="torch_compile is on but the model ran eager in step 7"):
        watch.check(7)


@pytest.mark.slow  # dynamo traces a training step
def test_code_dynamo_skips_without_a_reason_is_named_as_such(tmp_path, monkeypatch):
    forward = modeling_llama.LlamaDecoderLayer.forward
    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", torch.compiler.disable(forward))
    with pytest.raises(CompileError, match=r"dynamo compiled no graph \(dynamo gave no reason: it skipped the code"):
        train(tmp_path / "run", compile_layers=True)


def test_graph_break_reasons_read_as_one_line():
    reason = ("HOP: Unsafe side effect\n  Higher Order Operator: torch.utils.checkpoint.checkpoint\n"
              "  Explanation: Mutating a variable from outside the scope of this HOP is not supported.\n"
              "  Hint: If the HOP is activation checkpointing ...\n\n  Developer debug context: ...")
    assert _reason(reason) == ("HOP: Unsafe side effect Higher Order Operator: torch.utils.checkpoint.checkpoint"
                               " Explanation: Mutating a variable from outside the scope of this HOP is not supported.")
