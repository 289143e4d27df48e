"""LLaVA-OneVision (the `llava_onevision` family) through `adapt`, `finetune`, `eval run`, `chat` and `check` on
the tiny random `tiny-onevision` (a SigLIP tower, Qwen2, ChatML, tiles whose features shrink past anyres_max_4):
stage 1 moves exactly the connector, full and LoRA stage 2 what the freeze table says, packed and padded
batches agree, a head trains and reloads, batched answers and likelihoods equal one question asked alone,
label spans are exact though each image shape takes its own number of tokens.

transformers 5.25's AutoProcessor builds this family's processor only with torchvision, which CPU machines here
lack: the named model is built without it (`medllava.families.new_processor`) and a checkpoint folder's processor
from its saved parts (`medllava.families.load_processor`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors.torch import load_file
from transformers import LlavaOnevisionForConditionalGeneration
from test_adapt import REPO, config, stage
from test_finetune import size
from test_finetune import config as head_config

from medllava.cli import main
from medllava.commands import chat
from medllava.config import from_dict
from medllava.families import FAMILIES, image_inputs, max_image_tokens
from medllava.finetune.adapt import run_adapt
from medllava.finetune.config import AdaptConfig
from medllava.finetune.head_training import run_finetune
from medllava.heads import load_with_heads
from medllava.images import load_image
from medllava.model import ModelConfig, build_model, module_of, save_model
from medllava.templates import prompt_text
from medllava.tiny import demo_data

from medllava.eval.generate import ensure_pad_token
from medllava.eval.tasks import load_task

pytestmark = pytest.mark.usefixtures("one_thread")

OV = FAMILIES["llava_onevision"]
DATA, IMAGES = demo_data()
DEMO_VQA_RAD = IMAGES.parent / "vqa_rad"
CT = get_testdata_file("CT_small.dcm")
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge": True}


@pytest.fixture(scope="module")
def tiny_ov():
    """(model, processor) of `tiny-onevision`, float32 on the CPU."""
    model, processor = build_model(ModelConfig(name_or_path="tiny-onevision"))
    ensure_pad_token(processor)
    return model, processor


@pytest.fixture(scope="module")
def start_weights(tiny_ov):
    return {n.removeprefix("model."): p.detach().clone() for n, p in tiny_ov[0].state_dict().items()}


def ov_config(run_dir, **overrides) -> AdaptConfig:
    chat_data = {"path": str(DATA), "image_root": str(IMAGES), "template": "chat_template"}
    return from_dict(AdaptConfig, config(run_dir, model={"name_or_path": "tiny-onevision"},
                                         **{"instruct": stage(data=chat_data), **overrides}))


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model folder's weights under the in-memory names (without the leading "model."), loaded by
    the model class alone: transformers saves this family in its original on-disk layout."""
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, use_safetensors=True)
    return {n.removeprefix("model."): p for n, p in model.state_dict().items()}


def changed_modules(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {module_of(n, OV.modules) for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.slow
def test_stage_1_trains_exactly_the_connector(tmp_path, start_weights):
    record = run_adapt(ov_config(tmp_path / "run", align=stage(max_steps=2)), ["align"])["align"]
    assert record["trained_modules"] == ["multi_modal_projector", "image_newline"]
    aligned = saved_weights(tmp_path / "run" / "align" / "model")
    assert changed_modules(start_weights, aligned) == {"multi_modal_projector", "image_newline"}
    connector = load_file(str(tmp_path / "run" / "align" / "projector.safetensors"))
    assert {n.split(".")[0] for n in connector} == {"image_newline", "multi_modal_projector"}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_stage_2_trains_the_language_model_full_or_through_lora(tmp_path, start_weights, lora):
    options = {"max_steps": 2, **({"lora": LORA} if lora else {})}
    cfg = ov_config(tmp_path / "run", instruct=stage(data={"path": str(DATA), "image_root": str(IMAGES),
                                                              "template": "chat_template"}, **options))
    record = run_adapt(cfg, ["instruct"])["instruct"]
    out = tmp_path / "run" / "instruct"
    moved = changed_modules(start_weights, saved_weights(out / "model"))
    if not lora:
        assert moved == {"multi_modal_projector", "image_newline", "language_model", "lm_head"}
        return
    # LoRA: adapters merged into the language model and the projector trained; image_newline, a bare
    # parameter, stays frozen (PEFT saves submodules only).
    assert record["trained_modules"] == ["multi_modal_projector", "language_model", "lm_head"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in n for n in adapter) and any("multi_modal_projector" in n for n in adapter)
    assert not any("vision_tower" in n or "image_newline" in n for n in adapter)
    assert moved == {"multi_modal_projector", "language_model"}


@pytest.mark.slow
def test_packed_and_padded_stages_log_the_same_first_loss(tmp_path):
    first = {}
    for name, options in {"plain": dict(packing=False, sparse_logits=False),
                          "packed": dict(packing=True, sparse_logits=True)}.items():
        run_adapt(ov_config(tmp_path / name, instruct=stage(data={"path": str(DATA), "image_root": str(IMAGES),
                                                                  "template": "chat_template"},
                                                            max_steps=1, save_steps=1, **options)), ["instruct"])
        state = tmp_path / name / "instruct" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
        first[name] = json.loads(state.read_text())["log_history"][0]["loss"]
    assert first["plain"] == pytest.approx(first["packed"], abs=1e-4)


def test_the_feature_cache_under_zero3_is_refused(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("medllava.finetune.stages.build_model", no_loading)
    assert not OV.feature_cache  # the cache keeps features per tile (tests/test_vision_cache_tiles.py)
    cached = ov_config(tmp_path / "cached", align=stage(cache_vision_features="memory"),
                       deepspeed=str(REPO / "finetune/configs/zero3.json"))
    with pytest.raises(ValueError, match="stage align: cache_vision_features does not work under ZeRO-3"):
        run_adapt(cached, ["align"])


def test_a_saved_folder_loads_with_or_without_torchvision_and_prepares_the_same_inputs(tmp_path, tiny_ov):
    """Without torchvision the processor is built from the folder's parts (medllava.families.load_processor);
    either way it prepares exactly what the processor it was saved from prepares."""
    folder = save_model(*tiny_ov, tmp_path / "ov")
    _, processor = build_model(ModelConfig(name_or_path=str(folder)))
    assert type(processor) is type(tiny_ov[1]) and processor.chat_template == tiny_ov[1].chat_template
    image = load_image(next(IMAGES.iterdir()))
    text = prompt_text("Is it normal?", "chat_template", processor)
    got, want = (p(text=[text], images=[image], return_tensors="pt") for p in (processor, tiny_ov[1]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def ask(model, processor, n: int = 4) -> list[str]:
    task = load_task("vqa-rad", DEMO_VQA_RAD)
    examples = task.examples[:n]
    return chat.answer_batch(model, processor, [load_image(task.image_path(ex)) for ex in examples],
                             [ex.question for ex in examples], "chat_template", 4)


@pytest.mark.slow
def test_a_head_trains_saves_reloads_and_changes_the_answers(tmp_path, tiny_ov):
    record = run_finetune(head_config(tmp_path / "vqa", "tiny-onevision", DEMO_VQA_RAD,
                                      train={"max_steps": 4, "data": {"template": "chat_template"}}))
    head = Path(record["head"])
    adapter = load_file(str(head / "adapter_model.safetensors"))
    assert any("lora_A" in n for n in adapter) and any("multi_modal_projector" in n for n in adapter)
    assert not any("image_newline" in n for n in adapter) and size(head) < 200_000
    model, processor, infos = load_with_heads(ModelConfig(name_or_path="tiny-onevision"), [head])
    assert list(infos) == ["vqa-head"]
    with_head = ask(model, processor)
    with model.disable_adapter():
        plain = ask(model, processor)
    assert plain == ask(*tiny_ov) and with_head != plain


def test_chat_answers_about_a_dicom_and_check_states_the_image_token_budget(tiny_ov, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    chat.register(parser.add_subparsers())
    args = parser.parse_args(["chat", "--model", "tiny-onevision", "--image", CT, "--question", "Is there a mass?",
                              "--max-new-tokens", "6"])
    assert chat.run_chat(args) == 0
    printed = capsys.readouterr().out.strip()
    model, processor = tiny_ov
    (expected,) = chat.answer_batch(model, processor, [load_image(CT)], ["Is there a mass?"], "chat_template", 6)
    assert printed == expected
    report = tmp_path / "r.json"
    assert main(["check", "--model", "tiny-onevision", "--report", str(report)]) == 0
    checked = json.loads(report.read_text())
    budget = checked["image_tokens"]
    counts = sorted(image_inputs(processor, [load_image(IMAGES / json.loads(line)["image"])]).counts[0]
                    for line in DATA.read_text().splitlines())
    assert checked["template"] == "chat_template" and (budget["min"], budget["max"]) == (counts[0], counts[-1])
    assert budget["depends_on_image_shape"] is True and budget["max_per_image"] == max_image_tokens(processor)
    assert (f"images    min {counts[0]}, median {budget['median']}, max {counts[-1]} image tokens per example; "
            f"per image by its shape, at most {max_image_tokens(processor)}") in capsys.readouterr().out
