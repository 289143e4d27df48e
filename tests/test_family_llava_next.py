"""LLaVA-NeXT (the `llava_next` family) through `eval run`, `chat` and `check` on the tiny-next random model:
batched answers and likelihood scores equal to one question asked alone, though each image takes its own
number of tokens; a folder written by transformers' own `save_pretrained` answering the demo VQA-RAD
subset, a DICOM in `chat`, and `check` stating the image-token budget; label spans exact; heads refused
on another family's base."""

from __future__ import annotations

import argparse
import json

import pytest
from pydicom.data import get_testdata_file
from transformers import LlavaNextForConditionalGeneration

from medllava.cli import main
from medllava.commands import chat
from medllava.families import image_inputs, max_image_tokens
from medllava.heads import HeadError, HeadInfo, load_with_heads
from medllava.images import load_image
from medllava.model import ModelConfig, build_model
from medllava.tiny import demo_data

from medllava.eval.generate import Asking, ensure_pad_token, generate_answers, prompt_for
from medllava.eval.likelihood import best
from medllava.eval.tasks import load_task
from random_heads import make_head

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO_VQA_RAD = demo_data()[1].parent / "vqa_rad"
CT = get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def tiny_next():
    """(model, processor) of the `tiny-next` named model, float32 on the CPU."""
    model, processor = build_model(ModelConfig(name_or_path="tiny-next"))
    ensure_pad_token(processor)
    return model, processor


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory, tiny_next):
    """tiny-next written by transformers itself (model.save_pretrained + processor.save_pretrained), as a
    LLaVA-NeXT checkpoint from the hub is laid out: a folder medllava did not make."""
    model, processor = tiny_next
    folder = tmp_path_factory.mktemp("hub") / "tiny-llava-next-hf"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo_task():
    return load_task("vqa-rad", DEMO_VQA_RAD)


def test_eval_run_on_a_hub_layout_folder(hub_folder, tiny_next, demo_task, tmp_path, monkeypatch):
    seen = []
    original = LlavaNextForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["image_sizes"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaNextForConditionalGeneration, "generate", spy)
    out = tmp_path / "run"
    assert main(["eval", "run", "--task", "vqa-rad", "--root", str(DEMO_VQA_RAD), "--model", str(hub_folder),
                 "--out", str(out), "--limit", "8", "--batch-size", "4", "--max-new-tokens", "3",
                 "--closed-scoring", "likelihood"]) == 0
    preds = {r["qid"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert len(preds) == 8
    by_likelihood = [r for r in preds.values() if r["scoring"] == "likelihood"]
    generated = [r for r in preds.values() if r["scoring"] == "generate"]
    assert by_likelihood and generated and sum(seen) == len(generated)
    assert all(r["prediction"] == best(r["scores"]) for r in by_likelihood)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["run"]["template"] == "vicuna_v1"
    assert (out / "report.md").is_file()
    # The folder holds tiny-next's weights: its answers are the in-memory model's.
    model, processor = tiny_next
    first = next(ex for ex in demo_task.examples if ex.qid in {r["qid"] for r in generated})
    image = load_image(demo_task.image_path(first))
    (direct,) = generate_answers(model, processor, [prompt_for(first, Asking(), processor)], [image], 3)
    assert preds[first.qid]["prediction"] == direct


def test_chat_on_a_hub_layout_folder_with_a_dicom_image(hub_folder, tiny_next, capsys):
    parser = argparse.ArgumentParser()
    chat.register(parser.add_subparsers())
    args = parser.parse_args(["chat", "--model", str(hub_folder), "--image", CT, "--question", "Is there a mass?",
                              "--max-new-tokens", "6"])
    assert chat.run_chat(args) == 0
    printed = capsys.readouterr().out.strip()
    model, processor = tiny_next
    (expected,) = chat.answer_batch(model, processor, [load_image(CT)], ["Is there a mass?"], "vicuna_v1", 6)
    assert printed == expected and printed


def test_check_states_the_image_token_budget_per_example(hub_folder, tiny_next, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["check", "--model", str(hub_folder), "--report", str(report)]) == 0
    budget = json.loads(report.read_text())["image_tokens"]
    # Independently: the processor's own expansion of each demo image (128 px wide, 76 to 128 px tall).
    _, processor = tiny_next
    data, root = demo_data()
    images = [load_image(root / json.loads(line)["image"]) for line in data.read_text().splitlines()]
    counts = sorted(image_inputs(processor, [im]).counts[0] for im in images)
    assert (budget["min"], budget["max"]) == (counts[0], counts[-1]) and counts[0] < counts[-1]
    assert budget["depends_on_image_shape"] is True and budget["max_per_image"] == max_image_tokens(processor)
    out = capsys.readouterr().out
    assert (f"images    min {counts[0]}, median {budget['median']}, max {counts[-1]} image tokens per example; "
            f"per image by its shape, at most {max_image_tokens(processor)}") in out
    # LLaVA-1.5 states its fixed count, the other lines as before.
    assert main(["check", "--limit", "3", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["image_tokens"] == {
        "min": 16, "median": 16, "max": 16, "depends_on_image_shape": False, "max_per_image": 16}
    out = capsys.readouterr().out
    assert "images    min 16, median 16, max 16 image tokens per example; 16 per image (fixed)" in out
    assert "records   3 read, 0 invalid, 3 usable" in out


def test_a_head_loads_onto_the_family_it_was_trained_on_only(hub_folder, tiny_checkpoint, tmp_path):
    next_head = make_head(hub_folder, tmp_path / "next_head", 1, HeadInfo(task="vqa-rad"))
    model, _, infos = load_with_heads(ModelConfig(name_or_path=str(hub_folder)), [next_head])
    assert list(infos) == ["next_head"] and type(model.get_base_model()) is LlavaNextForConditionalGeneration
    # LLaVA-1.5 and LLaVA-NeXT share module names: without the check this head would load silently.
    llava_head = make_head(tiny_checkpoint, tmp_path / "llava_head", 2, HeadInfo(task="vqa-rad"))
    with pytest.raises(HeadError, match="trained on a LlavaForConditionalGeneration base.*llava_next"):
        load_with_heads(ModelConfig(name_or_path=str(hub_folder)), [llava_head])
