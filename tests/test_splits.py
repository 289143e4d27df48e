"""Grouped splits of in-house sets: no patient in two splits, rows without an id grouped by image
bytes, the same seed gives the same files, duplicates across splits and class balance reported,
bad rows skipped and counted."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from medllava.finetune import head_training as heads
from medllava.finetune.splits import SPLITS, make_split
from medllava.tiny import demo_data

IMAGES = demo_data()[1]
FIELDS = ["image", "question", "answer", "answer_type", "patient_id"]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def cases(tmp_path) -> Path:
    """30 patients with 2-3 questions each on the demo images and a DICOM file, plus rows without an
    id and one image filed under two patients (a copy with another name)."""
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    shutil.copy(get_testdata_file("CT_small.dcm"), images / "ct.dcm")
    shutil.copy(images / "synpic100132.jpg", images / "copy_of_100132.jpg")
    names = sorted(p.name for p in IMAGES.iterdir()) + ["ct.dcm"]
    rows = []
    for patient in range(30):
        image = f"images/{names[patient % len(names)]}"
        for q in range(2 + patient % 2):
            answer = ["yes", "no", "left"][(patient + q) % 3]
            rows.append({"image": image, "question": f"Question {q} about case {patient}?", "answer": answer,
                         "answer_type": "CLOSED" if q < 2 else "OPEN", "patient_id": f"P{patient:03d}"})
    rows.append({"image": "images/copy_of_100132.jpg", "question": "Is it the same?", "answer": "yes",
                 "answer_type": "", "patient_id": "P999"})
    for i in range(4):  # no patient id: grouped by image
        rows.append({"image": "images/ct.dcm", "question": f"Unlabelled question {i}?", "answer": "no",
                     "answer_type": "CLOSED", "patient_id": ""})
    return write_csv(tmp_path / "cases.csv", rows)


def read_split(folder: Path) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()] for name in SPLITS}


@pytest.mark.parametrize("stratify", [False, True])
def test_no_patient_is_in_two_splits(cases, tmp_path, stratify):
    report = make_split(cases, tmp_path / "out", val=0.2, test=0.2, seed=3, stratify=stratify)
    split = read_split(tmp_path / "out")
    patients = {name: {r["patient_id"] for r in rows if r["patient_id"]} for name, rows in split.items()}
    assert all(patients[name] for name in SPLITS)
    assert not (patients["train"] & patients["validation"] or patients["train"] & patients["test"]
                or patients["validation"] & patients["test"])
    unlabelled = {name for name, rows in split.items() for r in rows if not r["patient_id"]}
    assert len(unlabelled) == 1 and report["rows_grouped_by_image"] == 4  # one image, one split
    assert sum(len(rows) for rows in split.values()) == report["rows"] == 80
    assert report["method"] == ("StratifiedGroupKFold" if stratify else "GroupShuffleSplit")
    for name in SPLITS:
        s = report["splits"][name]
        assert s["rows"] == len(split[name]) and s["closed"] + s["open"] == s["rows"]
        closed_yes = sum(r["answer"] == "yes" and r["answer_type"] == "closed" for r in split[name])
        assert s["closed_answers"].get("yes", 0) == closed_yes


def test_the_same_seed_gives_the_same_files_and_another_seed_does_not(cases, tmp_path):
    for out in ("a", "b"):
        make_split(cases, tmp_path / out, seed=7)
    make_split(cases, tmp_path / "c", seed=8)
    files = [f"{name}.jsonl" for name in SPLITS]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_split_files_load_back_with_their_images(cases, tmp_path):
    from medllava.eval.tasks import load_task

    make_split(cases, tmp_path / "out", seed=1)
    task = load_task("inhouse", tmp_path / "out", "test")
    assert len(task) == len(read_split(tmp_path / "out")["test"])
    assert all(task.image_path(ex).is_file() for ex in task)


def test_an_image_filed_under_two_patients_is_reported(cases, tmp_path):
    # Find a seed that puts P999 (a byte copy of synpic100132) apart from the patients on the original.
    for seed in range(20):
        report = make_split(cases, tmp_path / f"s{seed}", seed=seed)
        duplicates = report["duplicate_images_across_splits"]
        if duplicates:
            break
    assert duplicates, "no seed in 20 separated the copies"
    dup = next(d for d in duplicates if "images/copy_of_100132.jpg" in d["images"])
    assert "images/synpic100132.jpg" in dup["images"] and len(dup["splits"]) >= 2


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = [{"image": f"images/{n}", "question": "Q?", "answer": "yes", "answer_type": "CLOSED", "patient_id": f"P{i}"}
            for i, n in enumerate(sorted(p.name for p in IMAGES.iterdir()))]
    rows[2]["question"] = ""
    rows[4]["image"] = "images/missing.jpg"
    shutil.copytree(IMAGES, tmp_path / "images")
    report = make_split(write_csv(tmp_path / "c.csv", rows), tmp_path / "out", val=0.2, test=0.2)
    assert report["rows"] == 8 and report["skipped_records"] == 1
    assert "c.csv:4" in report["first_skipped"][0] and "question" in report["first_skipped"][0]
    assert report["missing_images"] == [str(tmp_path / "images" / "missing.jpg")]


def test_too_few_patients_and_bad_fractions_are_refused(tmp_path):
    rows = [{"image": "images/synpic100132.jpg", "question": "Q?", "answer": "no", "answer_type": "",
             "patient_id": "P1"}]
    shutil.copytree(IMAGES, tmp_path / "images")
    with pytest.raises(ValueError, match="1 groups are too few"):
        make_split(write_csv(tmp_path / "c.csv", rows), tmp_path / "out")
    with pytest.raises(ValueError, match="leave some training data"):
        make_split(tmp_path / "c.csv", tmp_path / "out", val=0.5, test=0.5)


def test_the_command_line_writes_the_split(cases, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    heads.register(parser.add_subparsers())
    args = parser.parse_args(["finetune", "split", "--in", str(cases), "--out", str(tmp_path / "out"),
                              "--group-by", "patient_id", "--val", "0.1", "--test", "0.2", "--seed", "5"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "GroupShuffleSplit, seed 5" in printed and "validation" in printed
    report = json.loads((tmp_path / "out" / "split_report.json").read_text())
    assert report["seed"] == 5 and report["group_by"] == "patient_id"
