"""Qwen2.5-VL (`qwen2_5_vl`) and Gemma 3 / MedGemma (`gemma3`) through `adapt`, `finetune`, `eval run`, `chat`
and `check`: each stage moves what the family's freeze table says, LoRA trains adapters beside the connector,
packing is refused with the family's reason before anything loads, and a folder written by transformers'
own `save_pretrained` (model and processor, with the checkpoint's chat template, as from the hub) runs
every command, a DICOM chat included. What every family shares (label spans, batched = one at a time,
likelihood = a direct computation) is in tests/test_families.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydicom.data import get_testdata_file
from test_adapt import config, stage
from test_finetune import config as head_config

from medllava.cli import main
from medllava.config import from_dict
from medllava.families import FAMILIES
from medllava.finetune.adapt import run_adapt
from medllava.finetune.config import AdaptConfig
from medllava.finetune.head_training import run_finetune
from medllava.model import ModelConfig, build_model, module_of
from medllava.tiny import demo_data

pytestmark = pytest.mark.usefixtures("one_thread")

VQA_RAD = Path(__file__).resolve().parents[1] / "medllava" / "assets" / "demo" / "vqa_rad"
NAMED = {"qwen2_5_vl": "tiny-qwen2.5-vl", "gemma3": "tiny-gemma3"}
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge": True}


def weights(folder) -> dict[str, torch.Tensor]:
    """A checkpoint's (or named model's) weights under the in-memory parameter names."""
    model, _ = build_model(ModelConfig(name_or_path=str(folder)))
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def changed(family, before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {module_of(n, family.modules) for n in before if not torch.equal(before[n], after[n])}


@pytest.fixture(scope="module", params=sorted(NAMED))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def hub_folder(family, tmp_path_factory):
    """The family's tiny model saved by transformers itself (weights in the hub layout, the processor with
    its chat template), not by medllava."""
    model, processor = build_model(ModelConfig(name_or_path=NAMED[family.model_type]))
    folder = tmp_path_factory.mktemp(family.model_type) / "hub"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_stage_1_trains_the_connector_and_stage_2_lora_the_language_model_beside_it(family, tmp_path):
    named = NAMED[family.model_type]
    data = {"path": str(demo_data()[0]), "image_root": str(demo_data()[1]), "template": "chat_template"}
    cfg = from_dict(AdaptConfig, config(tmp_path, model={"name_or_path": named},
                                        align=stage(data=data, max_steps=2),
                                        instruct=stage(data=data, max_steps=2, lora=LORA)))
    records = run_adapt(cfg, ["align", "instruct"])
    assert records["align"]["trained_modules"] == list(family.connector)
    start, aligned = weights(named), weights(tmp_path / "align" / "model")
    assert changed(family, start, aligned) == set(family.connector)
    merged = weights(tmp_path / "instruct" / "model")
    assert changed(family, aligned, merged) == set(family.connector) | {"language_model"}


def test_packing_is_refused_with_the_familys_reason_before_loading(family, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("medllava.finetune.stages.build_model", no_loading)
    cfg = from_dict(AdaptConfig, config(tmp_path, model={"name_or_path": NAMED[family.model_type]},
                                        align=stage(packing=True)))
    with pytest.raises(ValueError, match=f"packing does not apply to {family.model_type} models: "):
        run_adapt(cfg, ["align"])
    assert family.packing and family.feature_cache


def test_a_folder_transformers_wrote_runs_eval_finetune_check_and_a_dicom_chat(family, hub_folder, tmp_path, capsys):
    """The must-show of the modern families: a hub-shaped folder, no code changes, every command."""
    assert (hub_folder / "chat_template.jinja").is_file() or (hub_folder / "chat_template.json").is_file()
    out = tmp_path / "eval"
    assert main(["eval", "run", "--task", "vqa-rad", "--root", str(VQA_RAD), "--model", str(hub_folder),
                 "--limit", "6", "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "report.md").is_file()
    record = run_finetune(head_config(tmp_path / "head", hub_folder, VQA_RAD,
                                      train={"max_steps": 2, "data": {"template": "chat_template"}}))
    head = Path(record["head"])
    assert main(["eval", "run", "--task", "vqa-rad", "--root", str(VQA_RAD), "--model", str(hub_folder),
                 "--head", str(head), "--limit", "6", "--max-new-tokens", "4", "--device", "cpu",
                 "--out", str(tmp_path / "eval_head")]) == 0
    capsys.readouterr()
    dicom = get_testdata_file("CT_small.dcm")
    assert main(["chat", "--model", str(hub_folder), "--head", str(head), "--image", dicom,
                 "--question", "Is there a mass?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    data = tmp_path / "one.jsonl"
    data.write_text('{"id": "a", "image": "synpic100132.jpg", "conversations": [{"from": "human", "value": '
                    '"<image>\\nIs it normal?"}, {"from": "gpt", "value": "No."}]}\n')
    assert main(["check", "--model", str(hub_folder), "--data", str(data), "--image-root", str(demo_data()[1]),
                 "--template", "chat_template"]) == 0
    assert "image tokens" in capsys.readouterr().out


def test_two_families_on_the_same_task_write_reports_that_compare_side_by_side(tmp_path):
    """Same questions, same prompts and protocols: metrics.json of a Qwen2.5-VL and a Gemma 3 run differ only
    in their numbers."""
    import json

    results = {}
    for named in NAMED.values():
        out = tmp_path / named
        assert main(["eval", "run", "--task", "vqa-rad", "--root", str(VQA_RAD), "--model", named, "--limit", "8",
                     "--max-new-tokens", "3", "--device", "cpu", "--out", str(out)]) == 0
        results[named] = (json.loads((out / "metrics.json").read_text()),
                          [json.loads(line)["qid"] for line in (out / "predictions.jsonl").read_text().splitlines()])
    (qwen, qwen_ids), (gemma, gemma_ids) = results.values()
    assert sorted(qwen_ids) == sorted(gemma_ids) and len(qwen_ids) == 8

    def shape(metrics):
        return {k: sorted(v) if isinstance(v, dict) else type(v).__name__ for k, v in metrics.items()}

    assert shape(qwen) == shape(gemma) and sorted(qwen["protocols"]) == sorted(gemma["protocols"])
