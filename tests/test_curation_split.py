"""`medllava curate split` end to end: panel records, figures kept whole with their reason, bad records
skipped and counted, the plug-ins, and the step inside the resumable pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

from medllava.cli import main
from medllava.curation import pipeline
from medllava.records import normalize_record
from test_panels import compose

GRID = [(10, 10, 150, 120), (160, 10, 300, 120), (10, 130, 150, 240), (160, 130, 300, 240)]
CAPTION = "Chest CT of one patient. (A) Axial, lung window. (B) Axial, mediastinal window. (C-D) Coronal views."


def _records(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    (images / "PMC1").mkdir(parents=True)
    compose((310, 250), GRID).save(images / "PMC1" / "f1.png")
    compose((200, 150), [(0, 0, 200, 150)]).save(images / "PMC1" / "f2.png")
    compose((310, 130), GRID[:2]).save(images / "PMC1" / "f3.png")
    rows = [
        {"id": "PMC1_f1", "image": "PMC1/f1.png", "caption": CAPTION, "licence": "CC BY"},
        {"id": "PMC1_f2", "image": "PMC1/f2.png", "caption": "(A) Axial. (B) Coronal."},
        {"id": "PMC1_f3", "image": "PMC1/f3.png", "caption": "(A) Axial. (B) Coronal. (C) Sagittal."},
        {"id": "PMC1_f4", "image": None, "caption": "A figure without its file."},
        {"id": "PMC1_f5", "image": "PMC1/missing.png", "caption": "(A) x. (B) y."},
        {"id": "PMC1_f6", "image": "PMC1/f1.png", "caption": 7},
    ]
    path = tmp_path / "figures.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    return path, images


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_writes_panel_records_and_keeps_unsure_figures_whole(tmp_path, capsys):
    figures, images = _records(tmp_path)
    out = tmp_path / "split.jsonl"
    assert main(["curate", "split", "--in", str(figures), "--out", str(out), "--image-root", str(images)]) == 0
    records = _read(out)
    assert [r["id"] for r in records] == ["PMC1_f1_A", "PMC1_f1_B", "PMC1_f1_C", "PMC1_f1_D",
                                          "PMC1_f2", "PMC1_f3", "PMC1_f4"]
    a, b, c, d = records[:4]
    assert a["caption"] == "Chest CT of one patient. Axial, lung window."
    assert c["caption"] == d["caption"] == "Chest CT of one patient. Coronal views."
    assert (a["parent"], a["panel"], a["box"], a["licence"]) == ("PMC1_f1", "A", list(GRID[0]), "CC BY")
    assert [r["box"] for r in records[:4]] == [list(box) for box in GRID]
    crop = Image.open(images / d["image"])
    assert d["image"] == "panels/PMC1/f1_D.png" and crop.size == (140, 110)
    source = Image.open(images / "PMC1" / "f1.png").convert("RGB")
    assert list(crop.convert("RGB").getdata()) == list(source.crop(GRID[3]).getdata())
    assert records[4]["split"]["kept_whole"] == "one panel found"
    assert records[5]["split"]["kept_whole"] == "2 panels but 3 caption labels (A, B, C)"
    assert records[5]["split"]["boxes"] == [list(box) for box in GRID[:2]]
    assert "split" not in records[6]  # no image: passed through as it was
    printed = capsys.readouterr().out
    assert "split: 7 records read, 7 written, 3 skipped" in printed
    assert "skipped 1: image missing or unreadable" in printed and "PMC1_f5" in printed
    assert "skipped 1: caption is not text" in printed and "record 'PMC1_f6': caption is int" in printed
    assert "skipped 1: not a JSON object" in printed
    assert "kept whole: panel and label counts differ: 1" in printed and "panels written: 4" in printed


def test_panel_records_are_figure_records_the_later_steps_take(tmp_path):
    figures, images = _records(tmp_path)
    split, classified, aligned = (tmp_path / n for n in ("split.jsonl", "cls.jsonl", "align.jsonl"))
    assert main(["curate", "split", "--in", str(figures), "--out", str(split), "--image-root", str(images)]) == 0
    assert main(["curate", "classify", "--in", str(split), "--out", str(classified), "--keep", "ct_scan"]) == 0
    assert [r["id"] for r in _read(classified)][:4] == ["PMC1_f1_A", "PMC1_f1_B", "PMC1_f1_C", "PMC1_f1_D"]
    assert main(["curate", "align", "--in", str(classified), "--out", str(aligned)]) == 0
    first = _read(aligned)[0]
    assert normalize_record(first) == first and first["image"] == "panels/PMC1/f1_A.png"


def boxes_from_plugin(path: str) -> list[list[int]]:
    """A detector plug-in: the left and right halves of the figure, given right first."""
    width, height = Image.open(path).size
    return [[width // 2, 0, width, height], [0, 0, width // 2, height]]


def ocr_reading_b_then_a(path: str, boxes: list[list[int]]) -> list[str]:
    """An OCR plug-in that reads "(B)" on the first panel and "A" on the second."""
    return ["(B)", "A"]


def test_detector_and_ocr_plug_ins(tmp_path, capsys):
    figures, images = _records(tmp_path)
    figures.write_text(json.dumps({"id": "f", "image": "PMC1/f2.png", "caption": "Pair. (A) One. (B) Two."}) + "\n")
    out = tmp_path / "split.jsonl"
    assert main(["curate", "split", "--in", str(figures), "--out", str(out), "--image-root", str(images),
                 "--detector", "test_curation_split:boxes_from_plugin",
                 "--ocr", "test_curation_split:ocr_reading_b_then_a"]) == 0
    records = _read(out)
    assert [(r["panel"], r["box"]) for r in records] == [("B", [0, 0, 100, 150]), ("A", [100, 0, 200, 150])]
    assert records[0]["caption"] == "Pair. Two."
    assert "panels ordered by ocr: 1" in capsys.readouterr().out


def test_a_plug_in_that_cannot_load_stops_before_any_work(tmp_path, capsys):
    figures, images = _records(tmp_path)
    out = tmp_path / "split.jsonl"
    assert main(["curate", "split", "--in", str(figures), "--out", str(out), "--image-root", str(images),
                 "--detector", "test_curation_split:no_such_function"]) == 1
    assert "--detector test_curation_split:no_such_function: cannot load it" in capsys.readouterr().err
    assert not out.exists()


def test_pipeline_runs_split_between_extract_and_classify_and_resumes(tmp_path, monkeypatch):
    figures, images = _records(tmp_path)
    ran = []
    monkeypatch.setattr(pipeline.extract, "run", lambda args: ran.append("extract") or
                        args.out.write_text(figures.read_text()))
    config = {"out_dir": "run", "extract": {"jats": ["unused"], "images_out": "images"},
              "split": {"min_panel_px": 48}, "classify": {"keep": ["ct_scan"]}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert pipeline.run_pipeline(path) == ["extract", "split", "classify"]
    assert [r["id"] for r in _read(tmp_path / "run" / "classified.jsonl")][:2] == ["PMC1_f1_A", "PMC1_f1_B"]
    assert pipeline.run_pipeline(path) == []
    config["split"]["min_panel_px"] = 200  # every panel is now too small: split and classify rerun
    path.write_text(yaml.safe_dump(config))
    assert pipeline.run_pipeline(path) == ["split", "classify"]
    assert _read(tmp_path / "run" / "split.jsonl")[0]["split"]["kept_whole"].startswith("panel 1 of 4 is 140x110 px")
