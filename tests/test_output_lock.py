"""One writer per output folder: a second run into a held folder is refused with one line naming the
holder's PID, a lock left by a killed process does not block, and two concurrent runs into one
folder leave exactly one run's result. On the shipped demo data (`medllava demo`'s)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from medllava.finetune.adapt import run_dir_lock
from medllava import locks
from medllava.cli import main
from medllava.commands.demo import IMAGING, assets, prepare_inputs
from medllava.locks import OutputLocked, lock_path, output_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Holds the lock of argv[1], says so on stdout, then sleeps until killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from medllava.locks import output_lock
    with output_lock(sys.argv[1], "holder for the test"):
        print("held", flush=True)
        time.sleep(600)
""")
# Imports the CLI and what `eval run` needs, says it is ready (a file in folder argv[1]), waits for
# `go` there, then runs `medllava argv[2:]`: two of these reach the lock within milliseconds.
AT_THE_GUN = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from medllava.cli import main
    import medllava.eval.run, medllava.eval.tasks, medllava.heads, medllava.model, transformers
    signals = Path(sys.argv[1])
    (signals / f"ready.{os.getpid()}").touch()
    while not (signals / "go").exists():
        time.sleep(0.005)
    sys.exit(main(sys.argv[2:]))
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lock of a folder; yields (folder, process). Killed at the end."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def curation_config(tmp_path: Path) -> tuple[Path, Path]:
    """A pipeline config over the demo's two PMC OA packages; returns (config, its output folder)."""
    prepare_inputs(tmp_path / "work")
    config = {"out_dir": "run", "extract": {"jats": ["work/inputs/oa_packages"], "images_out": "run/images"},
              "classify": {"keep": IMAGING, "min_confidence": 0.5}, "align": {"seed": 0, "style": "mixed"}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / "run"


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "medllava.cli", *map(str, args)]


def test_a_run_into_a_held_folder_is_refused_with_one_line_naming_the_holder(tmp_path, holder):
    config, out = curation_config(tmp_path)
    proc = holder(out)
    done = subprocess.run(cli("curate", "pipeline", "--config", config), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"medllava: error: {out} is in use by PID {proc.pid} on ")
    assert "(holder for the test)" in lines[0]
    assert not (out / "pipeline.yaml").exists()  # stopped before writing anything
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid  # the holder's lock is untouched


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, holder):
    config, out = curation_config(tmp_path)
    proc = holder(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid  # the file stays; the lock does not
    done = subprocess.run(cli("curate", "pipeline", "--config", config), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert (out / "alignment.jsonl").is_file()
    assert not lock_path(out).exists()  # a finished run removes its lock file


def test_a_dead_pid_in_the_lock_file_is_never_blamed(tmp_path, monkeypatch):
    """A holder that has just taken the lock but not yet written its PID over a killed run's."""
    monkeypatch.setattr(locks, "LOCK_WAIT_S", 0.2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    folder = tmp_path / "out"
    path = lock_path(folder)
    path.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "command": "killed run"}))
    with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # held, with the dead process's PID still in the file
        with pytest.raises(OutputLocked) as refused, output_lock(folder):
            pass
    assert str(dead_pid) not in str(refused.value)
    assert "its PID is not recorded yet" in str(refused.value)
    with output_lock(folder):  # released: taken, with this process's PID
        assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.mark.slow  # two eval runs in processes of their own
def test_two_concurrent_eval_runs_leave_one_runs_answers(tmp_path):
    out, signals = tmp_path / "eval", tmp_path / "signals"
    signals.mkdir()
    argv = ["eval", "run", "--task", "vqa-rad", "--root", assets() / "vqa_rad", "--model", "tiny",
            "--device", "cpu", "--max-new-tokens", "8", "--out", out]
    procs = [subprocess.Popen([sys.executable, "-c", AT_THE_GUN, str(signals), *map(str, argv)], cwd=REPO,
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.time() + 180
        while len(list(signals.glob("ready.*"))) < 2 and time.time() < deadline and \
                all(p.poll() is None for p in procs):
            time.sleep(0.05)
        (signals / "go").touch()
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(p.returncode for p in procs) == [0, 1], errors
    winner = next(p for p in procs if p.returncode == 0)
    refusal = errors[1 - procs.index(winner)].strip().splitlines()
    assert len(refusal) == 1 and refusal[0].startswith(f"medllava: error: {out} is in use by PID {winner.pid} on ")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    questions = json.loads((assets() / "vqa_rad" / "testset.json").read_text())
    assert len(rows) == len(questions) == 52
    assert len({r["qid"] for r in rows}) == 52
    assert json.loads((out / "metrics.json").read_text())["run"]["answered_now"] == 52


@pytest.mark.parametrize("command", ["adapt", "finetune", "demo"])
def test_every_training_command_refuses_a_held_folder(tmp_path, command, capsys):
    run_dir = tmp_path / "run"
    if command == "adapt":
        config = tmp_path / "adapt.yaml"
        config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "model": {"name_or_path": "tiny"}}))
        argv = ["adapt", "--config", str(config)]
    elif command == "finetune":
        argv = ["finetune", "--task", "vqa-rad", "--base", "tiny", "--root", str(assets() / "vqa_rad"),
                f"run_dir={run_dir}"]
    else:
        argv = ["demo", "--out", str(run_dir)]
    with output_lock(run_dir, "the first run"):
        assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"medllava: error: {run_dir} is in use by PID {os.getpid()} on ")
    assert not (run_dir / "config.yaml").exists()


def test_a_separate_head_folder_is_locked_too(tmp_path, capsys):
    head = tmp_path / "heads" / "vqa_rad"
    argv = ["finetune", "--task", "vqa-rad", "--base", "tiny", "--root", str(assets() / "vqa_rad"),
            f"run_dir={tmp_path / 'run'}", f"head.dir={head}"]
    with output_lock(head):
        assert main(argv) == 1
    assert f"{head} is in use by PID {os.getpid()}" in capsys.readouterr().err
    assert not lock_path(tmp_path / "run").exists()  # the run folder's lock, taken first, was given back


def test_only_rank_zero_takes_the_run_folder_lock(tmp_path):
    """Ranks of one launch share a run folder: the others take no lock, so they never refuse rank 0's."""
    with run_dir_lock(tmp_path / "run", "rank 0", main_process=True):
        with run_dir_lock(tmp_path / "run", "rank 1", main_process=False):
            pass
        with pytest.raises(OutputLocked), run_dir_lock(tmp_path / "run", "a second launch", main_process=True):
            pass
