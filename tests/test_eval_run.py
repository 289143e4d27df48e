"""`medllava eval run` on the tiny model: end to end on VQA-RAD-format questions, resuming a
killed run, batched answers equal to one-at-a-time answers, likelihood scoring checked
against a direct per-candidate computation, and task heads."""

from __future__ import annotations

import builtins
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from medllava.cli import main
from medllava.heads import HeadInfo

from medllava.eval.generate import (Asking, encode, ensure_pad_token, generate_answers, image_size,
                                    image_token_counts, length_batches, load_example_image, prompt_for)
from medllava.eval.predictions import read_predictions
from medllava.eval.run import answer_questions, resolve_asking
from medllava.eval.tasks import load_task
from random_heads import make_head

pytestmark = pytest.mark.usefixtures("one_thread")

VQA_RAD = Path(__file__).parent / "assets" / "eval" / "vqa_rad"
DEMO_VQA_RAD = Path(__file__).resolve().parents[1] / "medllava" / "assets" / "demo" / "vqa_rad"  # real images
BROKEN, MISSING = "synpic35914.jpg", "synpic34515.jpg"  # the images of questions 733 and 47
UNREADABLE = {"733", "47"}


@pytest.fixture(scope="module")
def vqa_root(tmp_path_factory):
    """The VQA-RAD fixture questions with small generated images; one image corrupt, one missing."""
    root = tmp_path_factory.mktemp("vqa_rad")
    shutil.copy(VQA_RAD / "testset.json", root)
    (root / "images").mkdir()
    names = sorted({r["image_name"] for r in json.loads((VQA_RAD / "testset.json").read_text())})
    for i, name in enumerate(names):
        if name == BROKEN:
            (root / "images" / name).write_bytes(b"\xff\xd8 not really a JPEG")
        elif name != MISSING:
            pixels = (np.random.RandomState(i).rand(20, 24, 3) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / "images" / name, format="JPEG")
    return root


def images(n: int, size: int = 20) -> list:
    return [Image.fromarray((np.random.RandomState(100 + i).rand(size, size, 3) * 255).astype("uint8"))
            for i in range(n)]


def eval_run(root, model, out, *extra: str) -> int:
    return main(["eval", "run", "--task", "vqa-rad", "--root", str(root), "--model", str(model), "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "4", *extra])


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def generated_rows(monkeypatch):
    """Counts the rows that reach `generate` (so resumed questions can be shown not to)."""
    counted = []
    original = LlavaForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        counted.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", spy)
    return counted


def test_end_to_end_with_unreadable_images_skipped(vqa_root, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert eval_run(vqa_root, tiny_checkpoint, out) == 0
    preds = rows(out / "predictions.jsonl")
    assert len(preds) == 14 and {p["qid"] for p in preds}.isdisjoint(UNREADABLE)
    assert all(isinstance(p["prediction"], str) and p["scoring"] == "generate" for p in preds)
    assert read_predictions(out / "predictions.jsonl").format == "medllava"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n"], metrics["n_closed"], metrics["n_open"]) == (16, 10, 6)
    assert metrics["pairing"]["method"] == "id" and set(metrics["pairing"]["missing"]) == UNREADABLE
    run = metrics["run"]
    assert set(run["skipped_images"]) == UNREADABLE and BROKEN in run["skipped_images"]["733"]
    assert (run["answered_now"], run["resumed"], run["template"]) == (14, 0, "vicuna_v1")
    report = (out / "report.md").read_text()
    assert "## Strict" in report and "## Run" in report and "| skipped_images | 2 |" in report
    assert (out / "report_confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert len(rows(out / "items.jsonl")) == 16
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out


def test_a_killed_run_resumes_without_regenerating(vqa_root, tiny_checkpoint, tmp_path, generated_rows, capsys):
    out = tmp_path / "run"
    assert eval_run(vqa_root, tiny_checkpoint, out, "--limit", "6") == 0
    first = rows(out / "predictions.jsonl")
    assert len(first) == 6 and sum(generated_rows) == 6
    # Mark the answers already there, and leave a half-written last line as a kill would.
    path = out / "predictions.jsonl"
    path.write_text("".join(json.dumps({**r, "prediction": "PRESET"}) + "\n" for r in first) + '{"qid": "32", "pred')
    generated_rows.clear()
    assert eval_run(vqa_root, tiny_checkpoint, out) == 0
    assert sum(generated_rows) == 16 - 6 - len(UNREADABLE)
    after = rows(path)
    assert [r["prediction"] for r in after[:6]] == ["PRESET"] * 6
    assert len(after) == 14 and len({r["qid"] for r in after}) == 14
    run = json.loads((out / "metrics.json").read_text())["run"]
    assert (run["resumed"], run["answered_now"]) == (6, 8)
    # Other settings would mix two runs in one file: refused.
    assert eval_run(vqa_root, tiny_checkpoint, out, "--max-new-tokens", "5") == 1
    assert "max_new_tokens: 3 -> 5" in capsys.readouterr().err


@pytest.fixture
def file_traffic(monkeypatch):
    """Records `(mode, name)` for every open of a file and `("replace", name)` for every atomic rename onto one."""
    seen: list[tuple[str, str]] = []
    real_open, real_replace = builtins.open, os.replace

    def spy_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            seen.append((mode, Path(file).name))
        return real_open(file, mode, *args, **kwargs)

    def spy_replace(src, dst, *args, **kwargs):
        seen.append(("replace", Path(dst).name))
        return real_replace(src, dst, *args, **kwargs)

    for module, name, spy in ((builtins, "open", spy_open), (io, "open", spy_open), (os, "replace", spy_replace)):
        monkeypatch.setattr(module, name, spy)
    return seen


def test_predictions_are_read_once_and_the_report_written_once(vqa_root, tiny_checkpoint, tmp_path, file_traffic):
    out = tmp_path / "run"
    for extra in (("--limit", "4"), ()):  # a fresh run, then one that resumes it
        file_traffic.clear()
        assert eval_run(vqa_root, tiny_checkpoint, out, *extra) == 0
        # Read once (to resume), appended to as answers come; scoring uses the rows held in memory.
        assert [m for m, name in file_traffic if name == "predictions.jsonl" and m in ("r", "rb")] == ["r"]
        assert ("a", "predictions.jsonl") in file_traffic
        assert file_traffic.count(("replace", "report.md")) == 1
        assert file_traffic.count(("replace", "metrics.json")) == 1
        assert not [m for m, name in file_traffic if name == "report.md" and m != "replace"]
    run = json.loads((out / "metrics.json").read_text())["run"]
    assert (run["resumed"], run["answered_now"]) == (4, 10)
    assert len(rows(out / "predictions.jsonl")) == 14


def test_batches_are_length_sorted():
    class Tok:
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [t.split() for t in texts]}

    prompts = ["a", "a b c", "a b", "a b c d", "a b c"]
    assert length_batches(prompts, Tok(), 2) == [[3, 1], [4, 2], [0]]


def test_image_tokens_count_in_the_sort_only_where_given():
    class Tok:
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [t.split() for t in texts]}

    prompts = ["a", "a b c", "a b", "a b c d", "a b c"]
    assert length_batches(prompts, Tok(), 2, [1] * 5) == length_batches(prompts, Tok(), 2) == [[3, 1], [4, 2], [0]]
    assert length_batches(prompts, Tok(), 2, [9, 1, 1, 1, 4]) == [[0, 4], [3, 1], [2]]
    with pytest.raises(ValueError, match="5 prompts but 4 image-token counts"):
        length_batches(prompts, Tok(), 2, [1] * 4)


def test_a_fixed_family_opens_no_image_to_sort(tiny, monkeypatch):
    def no_opening(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", no_opening)
    task = load_task("vqa-rad", DEMO_VQA_RAD)
    assert image_token_counts(tiny[1], task, task.examples) is None


@pytest.fixture(scope="module")
def tiny_next():
    from medllava.model import ModelConfig, build_model

    model, processor = build_model(ModelConfig(name_or_path="tiny-next"))
    ensure_pad_token(processor)
    return model, processor


def test_grid_family_image_sizes_are_the_loaders_and_counts_the_processors(tiny_next, tmp_path):
    from imaging import bundled

    _, processor = tiny_next
    turned = tmp_path / "turned.jpg"  # stored 60x20 with EXIF orientation 6: the loader turns it to 20x60
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 20)).save(turned, exif=exif)
    files = [DEMO_VQA_RAD / "images" / "synpic50958.jpg", turned, bundled("CT_small.dcm"), tmp_path / "gone.png"]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"qid": str(i), "image": str(f), "question": "What?",
                                                          "answer": "x"}) + "\n" for i, f in enumerate(files)))
    task = load_task("inhouse", tmp_path, "q")
    loaded = [load_example_image(task, ex) for ex in task.examples[:3]]
    assert [image_size(task, ex) for ex in task.examples] == [im.size for im in loaded] + [None]
    assert loaded[1].size == (20, 60)
    own = [encode(processor, [prompt_for(ex, Asking(), processor)], [im], "cpu", torch.float32)["input_ids"][0]
           .eq(processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum().item()
           for ex, im in zip(task.examples, loaded)]
    assert image_token_counts(processor, task, task.examples) == own + [0]  # the unreadable one is skipped later
    assert len(set(own)) == 3


def test_grid_family_batches_by_full_length_and_batched_answers_equal_one_at_a_time(tiny_next, tmp_path,
                                                                                      monkeypatch):
    from transformers import LlavaNextForConditionalGeneration

    from medllava.io import JsonlLog

    model, processor = tiny_next
    task = load_task("vqa-rad", DEMO_VQA_RAD)
    examples = task.examples[:16]
    prompts = [prompt_for(ex, Asking(), processor) for ex in examples]
    imgs = [load_example_image(task, ex) for ex in examples]
    full = [encode(processor, [p], [im], "cpu", torch.float32)["input_ids"].shape[1] for p, im in zip(prompts, imgs)]
    counts = image_token_counts(processor, task, examples)
    assert len(set(counts)) >= 3  # real images of several shapes: 52 to 88 tokens each
    batches = length_batches(prompts, processor.tokenizer, 4, counts)
    longest = sorted(full)[-4:]
    assert sorted(full[i] for i in batches[0]) == longest
    by_text = length_batches(prompts, processor.tokenizer, 4)
    assert sorted(full[i] for i in by_text[0]) != longest  # the text alone would not have put them first
    # eval run's own path: each batch reaching generate holds rows no shorter than the next batch's, and
    # the answers are those of each question asked alone.
    rows_by_batch, original = [], LlavaNextForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        rows_by_batch.append(kwargs["attention_mask"].sum(1).tolist())  # each row's own length, unpadded
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaNextForConditionalGeneration, "generate", spy)
    with JsonlLog(tmp_path / "predictions.jsonl") as log:
        answer_questions(model, processor, task, examples, Asking(), log, batch_size=4, max_new_tokens=4)
        batched = {row["qid"]: row["prediction"] for row in log.rows()}
    assert len(rows_by_batch) == 4 and sorted(rows_by_batch[0]) == longest
    assert all(min(a) >= max(b) for a, b in zip(rows_by_batch, rows_by_batch[1:]))
    alone = [generate_answers(model, processor, [p], [im], max_new_tokens=4)[0] for p, im in zip(prompts, imgs)]
    assert [batched[ex.qid] for ex in examples] == alone


def test_closed_questions_answered_by_likelihood(vqa_root, tiny_checkpoint, tmp_path, generated_rows):
    out = tmp_path / "run"
    assert eval_run(vqa_root, tiny_checkpoint, out, "--closed-scoring", "likelihood", "--limit", "5") == 0
    preds = {r["qid"]: r for r in rows(out / "predictions.jsonl")}
    closed = [r for r in preds.values() if r["answer_type"] == "closed"]
    assert len(closed) == 4 and preds["20"]["scoring"] == "generate" and sum(generated_rows) == 1
    for r in closed:
        assert r["scoring"] == "likelihood" and list(r["scores"]) == ["yes", "no"]
        assert r["prediction"] == max(r["scores"], key=r["scores"].get)


def test_each_head_is_evaluated_in_turn_on_one_base(vqa_root, tiny_checkpoint, tmp_path, caplog):
    a = make_head(tiny_checkpoint, tmp_path / "head_a", 1, HeadInfo(task="vqa-rad", template="mistral_instruct",
                                                                    prompt_style="short"))
    b = make_head(tiny_checkpoint, tmp_path / "head_b", 2, HeadInfo(task="vqa-rad"))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="medllava.eval.run"):
        assert eval_run(vqa_root, tiny_checkpoint, out, "--head", str(a), "--head", str(b), "--limit", "3",
                        "--closed-scoring", "likelihood", "--prompt-style", "plain") == 0
    assert "--prompt-style plain overrides the head's prompt_style 'short'" in caplog.text
    settings = {h: json.loads((out / h / "run.json").read_text()) for h in ("head_a", "head_b")}
    assert settings["head_a"]["template"] == "mistral_instruct" and settings["head_b"]["template"] == "vicuna_v1"
    assert settings["head_a"]["prompt_style"] == settings["head_b"]["prompt_style"] == "plain"
    preds = {h: {r["qid"]: r for r in rows(out / h / "predictions.jsonl")} for h in ("head_a", "head_b")}
    assert all(r["head"] == h for h in preds for r in preds[h].values())
    assert (out / "head_b" / "report.md").exists()
    # Same template for both on a rerun: the scores differ only because another adapter is active.
    again = tmp_path / "again"
    assert eval_run(vqa_root, tiny_checkpoint, again, "--head", str(a), str(b), "--limit", "1",
                    "--closed-scoring", "likelihood", "--template", "vicuna_v1") == 0
    scores = [rows(again / h / "predictions.jsonl")[0]["scores"] for h in ("head_a", "head_b")]
    assert not math.isclose(scores[0]["yes"], scores[1]["yes"], abs_tol=1e-3)


def test_head_settings_apply_unless_a_flag_is_given():
    info = HeadInfo(task="t", template="mistral_instruct", prompt_style="short", closed_options=["a", "b"])
    assert resolve_asking(None, None, info) == Asking("mistral_instruct", "short", ("a", "b"))
    assert resolve_asking("vicuna_v1", None, info) == Asking("vicuna_v1", "short", ("a", "b"))
    assert resolve_asking(None, None) == Asking("vicuna_v1", "llava-med", ("yes", "no"))
