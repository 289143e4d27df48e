"""`medllava demo` end to end on the shipped data, no patient identifier from its DICOM inputs in
anything it writes, and a demo killed while training finishes, when run again, as if never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors.torch import load_file

from medllava.finetune.trainer import COMPLETE_MARKER
from medllava.cli import main
from medllava.commands.demo import DICOM_FILES

REPO = Path(__file__).resolve().parents[1]
# Every test here runs the whole demo (and one runs it again, killed): tens of seconds.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(demo_workdir):
    return demo_workdir / "runs" / "demo"


def test_the_demo_reaches_its_report(demo_run):
    report = (demo_run / "report.md").read_text()
    assert "| figures extracted | 6 |" in report and "| kept by the modality filter | 2 |" in report
    assert (demo_run / "report_losses.png").stat().st_size > 1000 and (demo_run / "report_scores.png").is_file()
    head = json.loads((demo_run / "eval" / "head" / "vqa_rad_demo" / "metrics.json").read_text())
    assert head["n"] == 52 and head["n_closed"] == 22
    losses = json.loads((demo_run / "head" / "train" / "stage_complete.json").read_text())
    assert losses["steps"] > 0 and losses["train_loss"] < 6.0  # the head learned something


def test_running_it_again_redoes_nothing(demo_run, monkeypatch):
    outputs = [demo_run / "curation" / "alignment.jsonl", demo_run / "adapt" / "instruct" / "model" / "model.safetensors",
               demo_run / "head" / "vqa_rad_demo" / "adapter_model.safetensors",
               demo_run / "eval" / "head" / "vqa_rad_demo" / "predictions.jsonl"]
    before = [p.stat().st_mtime_ns for p in outputs]
    # Named another way (relative, from its parent), the folder is still the same run.
    monkeypatch.chdir(demo_run.parent)
    assert main(["demo", "--out", demo_run.name]) == 0
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


def test_killed_while_training_it_finishes_as_an_uninterrupted_run(demo_run, tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "adapt" / "instruct" / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the fixture's run
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full pipe would stall the demo
        proc = subprocess.Popen([sys.executable, "-m", "medllava.cli", "demo", "--out", str(out)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 600
        while (proc.poll() is None and time.time() < deadline
               and not any(checkpoints.glob(f"*/{COMPLETE_MARKER}"))):
            time.sleep(0.02)
        killed = proc.poll() is None and time.time() < deadline
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        err.seek(0)
        assert killed, f"not killed in stage 2 (exit {proc.returncode}): {err.read()[-2000:]!r}"
    assert not (out / "adapt" / "instruct" / "stage_complete.json").exists()
    assert main(["demo", "--out", str(out)]) == 0
    # Every figure, weight, answer and score equals the uninterrupted run's. What may differ: the report's
    # timings, the run facts in the metrics (what was resumed, how fast) and their paths, and a resumed
    # stage's train_loss (the Trainer averages it over the steps run since the resume).
    for rel in ("curation/alignment.jsonl", "instruct/stage2.jsonl", "eval/base/predictions.jsonl",
                "eval/base/items.jsonl", "eval/head/vqa_rad_demo/predictions.jsonl",
                "eval/head/vqa_rad_demo/items.jsonl", "adapt/instruct/data_order.jsonl", "head/train/data_order.jsonl"):
        assert (out / rel).read_bytes() == (demo_run / rel).read_bytes(), rel
    for rel in ("adapt/instruct/model/model.safetensors", "head/vqa_rad_demo/adapter_model.safetensors"):
        resumed, reference = load_file(str(out / rel)), load_file(str(demo_run / rel))
        assert resumed.keys() == reference.keys(), rel
        assert all(torch.equal(resumed[k], reference[k]) for k in resumed), rel
    for rel in ("eval/base/metrics.json", "eval/head/vqa_rad_demo/metrics.json"):
        resumed, reference = (json.loads((root / rel).read_text()) for root in (out, demo_run))
        assert {k: v for k, v in resumed.items() if k not in ("run", "predictions")} == \
            {k: v for k, v in reference.items() if k not in ("run", "predictions")}
    for stage in ("adapt/align", "adapt/instruct", "head/train"):
        steps = [json.loads((root / stage / "stage_complete.json").read_text())["steps"] for root in (out, demo_run)]
        assert steps[0] == steps[1] > 0, stage
