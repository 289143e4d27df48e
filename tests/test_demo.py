"""`medllava demo` end to end on the shipped data, and no patient identifier from its DICOM inputs
in anything it writes."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medllava.cli import main
from medllava.demo import DICOM_FILES


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out)]) == 0
    return out


def test_the_demo_reaches_its_report(demo_run):
    report = (demo_run / "report.md").read_text()
    assert "| figures extracted | 6 |" in report and "| kept by the modality filter | 2 |" in report
    assert (demo_run / "report_losses.png").stat().st_size > 1000 and (demo_run / "report_scores.png").is_file()
    head = json.loads((demo_run / "eval" / "head" / "vqa_rad_demo" / "metrics.json").read_text())
    assert head["n"] == 52 and head["n_closed"] == 22
    losses = json.loads((demo_run / "head" / "train" / "stage_complete.json").read_text())
    assert losses["steps"] > 0 and losses["train_loss"] < 6.0  # the head learned something


def test_running_it_again_redoes_nothing(demo_run):
    outputs = [demo_run / "curation" / "alignment.jsonl", demo_run / "adapt" / "instruct" / "model" / "model.safetensors",
               demo_run / "head" / "vqa_rad_demo" / "adapter_model.safetensors",
               demo_run / "eval" / "head" / "vqa_rad_demo" / "predictions.jsonl"]
    before = [p.stat().st_mtime_ns for p in outputs]
    assert main(["demo", "--out", str(demo_run)]) == 0
    assert [p.stat().st_mtime_ns for p in outputs] == before


def test_no_patient_identifier_reaches_any_output(demo_run):
    identifiers = set()
    for name in DICOM_FILES:
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
        identifiers |= {str(ds.PatientName), str(ds.PatientID)} - {""}
        identifiers |= {part for part in str(ds.PatientName).replace("^", " ").split() if len(part) > 3}
    assert identifiers
    copies = {demo_run / "curation" / "images" / "dicom" / name for name in DICOM_FILES}
    for path in demo_run.rglob("*"):
        if not path.is_file() or path in copies or path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
            continue  # the input DICOM copies themselves, and weights, are not outputs a person reads
        data = path.read_bytes()
        for value in identifiers:
            assert value.encode() not in data, f"{value!r} found in {path}"
