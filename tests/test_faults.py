"""Faults: `kill -9` during curation, either training stage and evaluation, then the same command
again gives what an uninterrupted run gives (and a killed run leaves only complete files); a full
disk and a refused write end in one line naming the path, with no partial file left."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medllava.curation import pipeline
from imaging import random_png
from medllava.finetune.trainer import COMPLETE_MARKER, complete_checkpoints, read_trace
from medllava import io as mio
from medllava.cli import main
from medllava.tiny import demo_data
from medllava.commands.demo import assets as demo_assets
from medllava.io import JsonlLog, atomic_dir, describe_error, remove_stale_temps, remove_stale_temps_under

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DATA, IMAGES = demo_data()
# One thread here and in every killed process: the tiny model gains nothing from a second one on a
# busy machine, and a run resumed in this process then does the same arithmetic as the killed one.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "medllava.cli", *map(str, args)]


def kill_when(argv: list[str], ready, timeout: float = 180) -> None:
    """Start `argv` in its own process group and SIGKILL the group as soon as `ready()` holds;
    fails if the command ended first (the kill would have tested nothing)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full pipe would stall the command
        proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        deadline = time.time() + timeout
        while proc.poll() is None and not ready() and time.time() < deadline:
            time.sleep(0.005)
        running, late = proc.poll() is None, time.time() >= deadline
        if running:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    assert not late, f"the moment to kill never came in {timeout} s: {tail}"
    assert running, f"not killed mid-way (exit {proc.returncode}): {tail}"


def temps(folder: Path) -> list[Path]:
    return list(folder.rglob(".*.tmp"))


# Curation -----------------------------------------------------------------------------------------

# Captions that make the shipped article's figures imaging figures (its own show chemistry), so
# every step has work: three of four are kept by the modality filter.
CAPTIONS = {"g001": "Axial CT of the chest shows a mass.", "g002": "Photomicrograph of the biopsy (H&E, x200).",
            "g003": "Bar chart of the enzyme activities.", "g004": "Coronal MRI of the brain, T2-weighted."}
N_PACKAGES = 120


def _png(seed: int) -> bytes:
    return random_png(seed, 48)


def oa_packages(folder: Path, n: int) -> None:
    """`n` OA packages of the shipped PLoS article, each under its own PMC id with its own images."""
    xml = (demo_assets() / "pmc" / "pone.0046493.nxml").read_text(encoding="utf-8")
    for fig, caption in CAPTIONS.items():
        start = xml.index(f'<fig id="pone-0046493-{fig}"')
        cap_start, cap_end = xml.index("<caption>", start), xml.index("</caption>", start)
        xml = xml[:cap_start] + f"<caption><p>{escape(caption)}</p>" + xml[cap_end:]
    folder.mkdir(parents=True)
    for i in range(n):
        pmcid = f"PMC{9000000 + i}"
        text = xml.replace('<article-id pub-id-type="pmc">3460867</article-id>',
                           f'<article-id pub-id-type="pmc">{pmcid[3:]}</article-id>')
        files = [("pone.0046493.nxml", text.encode())]
        files += [(f"pone.0046493.{fig}.png", _png(4 * i + j)) for j, fig in enumerate(CAPTIONS)]
        with tarfile.open(folder / f"{pmcid}.tar.gz", "w:gz", compresslevel=1) as tar:
            for name, data in files:
                info = tarfile.TarInfo(f"{pmcid}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def curation_config(folder: Path) -> Path:
    """The same config text in `folder` (paths are relative to it), reading the shared packages."""
    folder.mkdir()
    config = {"out_dir": "run", "extract": {"jats": ["../packages"], "images_out": "run/images"},
              "classify": {"keep": ["ct_scan", "histology", "mri"]}, "dedupe": {"max_distance": 4},
              "align": {"seed": 0, "style": "mixed"}}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return folder / "pipeline.yaml"


def stamp_facts(path: Path, root: Path) -> dict:
    """A step's done-stamp without what differs between two good runs: the run folder and the
    input's modification time."""
    stamp = json.loads(path.read_text().replace(str(root), "ROOT"))
    if stamp["input"]:
        del stamp["input"][2]
    return stamp


def assert_complete_or_absent(run: Path, ref: Path, everything: bool = False) -> None:
    """Every output file under `run` equals the reference's (with `everything`, and none missing)."""
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    for rel in files:
        assert (ref / rel).is_file(), f"{rel}: not an output of the uninterrupted run"
        if rel.name.endswith(".done.json"):
            assert stamp_facts(run / rel, run.parent) == stamp_facts(ref / rel, ref.parent), rel
        else:
            assert (run / rel).read_bytes() == (ref / rel).read_bytes(), f"{rel}: differs (half-written?)"
    if everything:
        assert files == sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())


@pytest.mark.slow
def test_curation_killed_at_three_moments_then_rerun_equals_an_uninterrupted_run(tmp_path, capsys):
    oa_packages(tmp_path / "packages", N_PACKAGES)
    ref_config, config = curation_config(tmp_path / "ref"), curation_config(tmp_path / "killed")
    assert pipeline.run_pipeline(ref_config) == ["extract", "classify", "dedupe", "align"]
    ref, run = ref_config.parent / "run", config.parent / "run"
    assert len((ref / "alignment.jsonl").read_text().splitlines()) == 3 * N_PACKAGES
    moments = [  # mid-extract (images half copied), as classify starts, mid-dedupe (its output open)
        lambda: len(list((run / "images").glob("PMC*"))) >= N_PACKAGES // 6,
        lambda: (run / "figures.jsonl.done.json").exists(),
        lambda: any(run.glob(".deduped.jsonl.*.tmp")),
    ]
    for i, ready in enumerate(moments):
        kill_when(cli("curate", "pipeline", "--config", config), ready)
        assert not (run / "alignment.jsonl.done.json").exists()
        assert_complete_or_absent(run, ref)
        if i == 0:
            assert not (run / "figures.jsonl").exists()
            left = temps(run)  # the records being written, maybe an image being copied
            assert any(p.parent == run and p.name.startswith(".figures.jsonl.") for p in left), left
            assert all(p.parent == run or p.parent.parent == run / "images" for p in left), left
            # For certain an image, as a kill mid-copy leaves it.
            (run / "images" / "PMC9000000" / ".pone.0046493.g001.png.0badc0de.tmp").write_bytes(b"\x89PNG")
    capsys.readouterr()
    assert main(["curate", "pipeline", "--config", str(config)]) == 0
    assert "pipeline: ran dedupe, align" in capsys.readouterr().out
    assert_complete_or_absent(run, ref, everything=True)
    assert temps(run) == []  # the killed runs' temporaries were cleared, not left to pile up


def test_stale_temporaries_are_found_by_name(tmp_path):
    for name in (".out.jsonl.1a2b.tmp", ".out.jsonl.done.json.3c4d.tmp", ".other.jsonl.5e6f.tmp", "out.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".model.77aa.tmp").mkdir()  # an atomic_dir staging folder
    (tmp_path / ".model.77aa.tmp" / "weights").write_text("x")
    assert [p.name for p in remove_stale_temps(tmp_path / "out.jsonl")] == [
        ".out.jsonl.1a2b.tmp", ".out.jsonl.done.json.3c4d.tmp"]
    assert remove_stale_temps(tmp_path / "model") and not (tmp_path / ".model.77aa.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.jsonl.5e6f.tmp", "out.jsonl"]
    (tmp_path / "images" / "PMC1").mkdir(parents=True)
    (tmp_path / "images" / "PMC1" / ".a.png.9f9f.tmp").write_bytes(b"")
    (tmp_path / "images" / "PMC1" / "a.png").write_bytes(b"")
    assert [p.name for p in remove_stale_temps_under(tmp_path / "images")] == [".a.png.9f9f.tmp"]
    assert [p.name for p in (tmp_path / "images" / "PMC1").iterdir()] == ["a.png"]


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    mio.atomic_write_text(tmp_path / "atomic.txt", "x")
    with atomic_dir(tmp_path / "atomic"):
        pass
    mode = {p.name: p.stat().st_mode for p in tmp_path.iterdir()}
    assert mode["atomic.txt"] == mode["plain.txt"] and mode["atomic"] == mode["plain"]


# Training: stage 1 of `medllava adapt`, and a `medllava finetune` head ----------------------------


def adapt_config(run_dir: Path) -> Path:
    stage = {"data": {"path": str(DATA), "image_root": str(IMAGES), "template": "vicuna_v1"},
             "max_steps": 10, "global_batch_size": 4, "per_device_batch_size": 2, "save_steps": 1,
             "save_total_limit": 2, "logging_steps": 1, "dataloader_workers": 0, "gradient_checkpointing": False,
             "learning_rate": 1e-3}
    cfg = {"run_dir": str(run_dir), "model": {"name_or_path": "tiny"}, "bf16": False, "report_to": ["none"],
           "align": stage, "instruct": stage}
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    for name in x:
        assert torch.equal(x[name], y[name]), name


def killed_after_first_checkpoint(argv: list[str], checkpoints: Path, max_steps: int) -> None:
    kill_when(argv, lambda: any(checkpoints.glob(f"checkpoint-*/{COMPLETE_MARKER}")))
    done = complete_checkpoints(checkpoints)
    assert done and int(done[-1].name.split("-")[1]) < max_steps, "the stage was not killed mid-way"
    assert not (checkpoints.parent / "stage_complete.json").exists()


@pytest.mark.slow
def test_stage1_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    killed, ref = adapt_config(tmp_path / "killed"), adapt_config(tmp_path / "ref")
    command = ["adapt", "--config", str(killed), "--stage", "align"]
    killed_after_first_checkpoint(cli(*command), tmp_path / "killed" / "align" / "checkpoints", 10)
    assert main(command) == 0
    assert main(["adapt", "--config", str(ref), "--stage", "align"]) == 0
    a, b = tmp_path / "killed" / "align", tmp_path / "ref" / "align"
    assert [json.loads((r / "stage_complete.json").read_text())["steps"] for r in (a, b)] == [10, 10]
    assert read_trace(a / "data_order.jsonl") == read_trace(b / "data_order.jsonl")
    assert_same_tensors(a / "model" / "model.safetensors", b / "model" / "model.safetensors")
    assert_same_tensors(a / "projector.safetensors", b / "projector.safetensors")


@pytest.fixture(scope="module")
def vqa_rad_train(tmp_path_factory) -> Path:
    """A VQA-RAD folder: the 26 real training rows of the finetune fixtures and their images."""
    root = tmp_path_factory.mktemp("vqa_rad")
    shutil.copy(REPO / "tests" / "assets" / "finetune" / "vqa_rad_trainset.json", root / "trainset.json")
    shutil.copytree(IMAGES, root / "images")
    return root


def finetune_argv(run_dir: Path, base: Path, root: Path) -> list[str]:
    return ["finetune", "--task", "vqa-rad", "--base", str(base), "--root", str(root), f"run_dir={run_dir}",
            "base.dtype=float32", "bf16=false", "report_to=[none]", "seed=0", "train.max_steps=8",
            "train.global_batch_size=4", "train.per_device_batch_size=4", "train.save_steps=1",
            "train.save_total_limit=2", "train.logging_steps=1", "train.dataloader_workers=0",
            "train.gradient_checkpointing=false", "train.learning_rate=1e-2", "train.warmup_ratio=0.0",
            "train.lora.r=4", "train.lora.alpha=8", "train.lora.dropout=0.0"]


@pytest.mark.slow
def test_head_killed_after_a_checkpoint_resumes_to_the_same_adapter(tmp_path, tiny_checkpoint, vqa_rad_train):
    killed = finetune_argv(tmp_path / "killed", tiny_checkpoint, vqa_rad_train)
    killed_after_first_checkpoint(cli(*killed), tmp_path / "killed" / "train" / "checkpoints", 8)
    assert main(killed) == 0
    assert main(finetune_argv(tmp_path / "ref", tiny_checkpoint, vqa_rad_train)) == 0
    a, b = tmp_path / "killed", tmp_path / "ref"
    assert [json.loads((r / "train" / "stage_complete.json").read_text())["steps"] for r in (a, b)] == [8, 8]
    assert read_trace(a / "train" / "data_order.jsonl") == read_trace(b / "train" / "data_order.jsonl")
    assert_same_tensors(a / "killed-head" / "adapter_model.safetensors", b / "ref-head" / "adapter_model.safetensors")


# Evaluation ---------------------------------------------------------------------------------------


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_eval_killed_mid_answers_resumes_to_the_same_predictions_and_metrics(tmp_path, tiny_checkpoint):
    def command(out: Path) -> list[str]:
        return ["eval", "run", "--task", "vqa-rad", "--root", str(demo_assets() / "vqa_rad"), "--model",
                str(tiny_checkpoint), "--out", str(out), "--max-new-tokens", "4", "--batch-size", "1",
                "--device", "cpu"]

    run = tmp_path / "killed"
    preds = run / "predictions.jsonl"
    kill_when(cli(*command(run)), lambda: len(lines(preds)) >= 5)
    answered = preds.read_bytes()
    assert 5 <= answered.count(b"\n") < 52 and not (run / "metrics.json").exists()
    assert main(command(run)) == 0
    assert main(command(tmp_path / "ref")) == 0
    ref = tmp_path / "ref"
    resumed = [json.loads(line) for line in lines(preds)]  # a torn last line would not parse
    assert preds.read_bytes().startswith(answered[:answered.rfind(b"\n") + 1])  # kept, not redone
    by_qid = {r["qid"]: r for r in resumed}
    assert len(by_qid) == len(resumed) == 52
    assert by_qid == {r["qid"]: r for r in map(json.loads, lines(ref / "predictions.jsonl"))}
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (run, ref)]
    assert metrics[0]["run"]["resumed"] >= 5 and metrics[1]["run"]["resumed"] == 0
    # All but where the predictions are and how the run went (timings, what was resumed).
    scores = [{k: v for k, v in m.items() if k not in ("run", "predictions")} for m in metrics]
    assert scores[0] == scores[1] and scores[0]["n"] == 52
    assert (run / "items.jsonl").read_bytes() == (ref / "items.jsonl").read_bytes()


# A full disk and a refused write ------------------------------------------------------------------


@pytest.fixture
def figures(tmp_path) -> Path:
    path = tmp_path / "figures.jsonl"
    rows = [{"id": f"PMC1_f{i}", "caption": f"Axial CT of the chest, slice {i}.", "image": f"PMC1/f{i}.png"}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def onto_dev_full(fd: int) -> None:
    """Point `fd` at /dev/full, where every write fails with a real ENOSPC."""
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    os.close(full)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system to write a full disk to")
def test_a_full_disk_names_the_file_and_leaves_no_part_of_it(tmp_path, figures, monkeypatch, capsys):
    out = tmp_path / "out" / "alignment.jsonl"
    out.parent.mkdir()
    make_temp = mio._make_temp

    def temp_on_a_full_disk(path, create):
        fd, tmp = make_temp(path, create)
        onto_dev_full(fd)
        return fd, tmp

    monkeypatch.setattr(mio, "_make_temp", temp_on_a_full_disk)
    assert main(["curate", "align", "--in", str(figures), "--out", str(out)]) == 1
    assert error_line(capsys) == (f"medllava: error: no space left on device writing {out}: "
                                  "free some space or write somewhere else (another --out or run_dir)")
    assert list(out.parent.iterdir()) == []  # no target, no temporary
    log = JsonlLog(tmp_path / "log.jsonl")  # the resumable log names its file too, also when closed
    onto_dev_full(log._f.fileno())
    for call in (lambda: log.append({"qid": "1"}), log.close):
        with pytest.raises(OSError) as raised:
            call()
        assert describe_error(raised.value).startswith(f"no space left on device writing {log.path}: ")


def test_a_folder_without_write_permission_is_named(tmp_path, figures):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    argv = cli("curate", "align", "--in", figures, "--out", locked / "alignment.jsonl")
    if os.geteuid() == 0:  # root ignores permission bits unless it drops the capabilities that bypass them
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: root would write into the read-only folder")
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]
    try:
        done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"medllava: error: permission denied: {locked / 'alignment.jsonl'}: give this user access to it "
        "or use another path (another --out or run_dir)"]
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("code, message", [
    (errno.EACCES, "permission denied: {}: give this user access"),
    (errno.EPERM, "operation not permitted: {}: give this user access"),
    (errno.EROFS, "read-only file system: {}: write to a writable disk"),
    (errno.EDQUOT, "disk quota exceeded writing {}: free some space"),
])
def test_each_refused_write_gets_its_own_advice(tmp_path, figures, monkeypatch, capsys, code, message):
    make_temp = mio._make_temp

    def refused(path, create):
        def create_refused(name):
            raise OSError(code, os.strerror(code), name)  # OSError picks the subclass: PermissionError, ...
        return make_temp(path, create_refused)

    monkeypatch.setattr(mio, "_make_temp", refused)
    out = tmp_path / "out" / "alignment.jsonl"
    assert main(["curate", "align", "--in", str(figures), "--out", str(out)]) == 1
    assert error_line(capsys).startswith("medllava: error: " + message.format(out))
    assert list(out.parent.iterdir()) == []


def test_a_failed_write_inside_a_folder_names_the_final_path(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(OSError) as raised, atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors"))
    assert raised.value.filename == str(target / "model.safetensors")
    assert list(tmp_path.iterdir()) == []
    assert describe_error(ValueError("bad line")) == "bad line"  # other errors keep their own message


@pytest.mark.parametrize("block", [4, 1 << 16])
@pytest.mark.parametrize(("content", "kept"), [
    (b"", b""),
    (b'{"a": 1}\n', b'{"a": 1}\n'),
    (b'{"a": 1}\n{"b": 2', b'{"a": 1}\n'),
    (b'{"a": 1}\n{"b": "' + b"x" * 50 + b'"', b'{"a": 1}\n'),
    (b'{"b": 2', b""),
])
def test_a_log_reopened_after_a_kill_cuts_only_the_half_written_last_line(tmp_path, monkeypatch, block, content, kept):
    from medllava import io

    monkeypatch.setattr(io, "READ_BLOCK", block)
    path = tmp_path / "log.jsonl"
    path.write_bytes(content)
    log = io.JsonlLog(path)
    log.append({"c": 3})
    log.close()
    assert path.read_bytes() == kept + b'{"c": 3}\n'
