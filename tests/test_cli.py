"""The `medllava` command line: help lists working commands only, and `check` reads a dataset as
training would, reporting what it would skip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from medllava.cli import build_parser, main
from medllava.tiny import demo_data


def subcommands(parser):
    action = next(a for a in parser._actions if a.dest in ("command", "curate_command", "eval_command"))
    return action.choices


def test_every_listed_command_has_working_help(capsys):
    parser = build_parser()
    for name, sub in subcommands(parser).items():
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0, name
    assert "check" in subcommands(parser)


def test_console_script_help_is_fast_and_lists_check():
    exe = shutil.which("medllava")
    cmd = [exe] if exe else [sys.executable, "-m", "medllava.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "check" in out.stdout
    assert "import torch" not in out.stderr


def test_check_on_the_embedded_demo(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main(["check", "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["records_read"] == r["examples_ok"] == 9 and r["examples_skipped"] == {}
    # An untrained tiny model predicts nearly uniformly over its 512-token vocabulary: loss near ln(512) = 6.24.
    assert 5.5 < r["loss"] < 8.0
    assert "9 usable" in capsys.readouterr().out


def test_check_reports_bad_records_and_images(tmp_path, capsys):
    data, images = demo_data()
    rows = [json.loads(line) for line in data.read_text().splitlines()][:3]
    rows[1]["image"] = "missing.jpg"
    rows.append({"id": "escape", "image": "../../etc/passwd", "conversations": rows[0]["conversations"]})
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append(dict(rows[0], id="corrupt", image="broken.jpg"))
    for name in {r["image"] for r in rows[:3] if r["image"] != "missing.jpg"}:
        shutil.copy(images / name, tmp_path / name)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    report = tmp_path / "r.json"
    assert main(["check", "--data", str(path), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["records_read"] == 5 and r["records_invalid"] == 2 and r["examples_ok"] == 2
    assert r["examples_skipped"] == {"missing image": 1, "unreadable image": 1}
    problems = "\n".join(r["first_problems"])
    assert "escapes the image root" in problems and "d.jsonl:6" in problems and "missing.jpg" in problems


def test_check_fails_cleanly_on_a_missing_file(tmp_path, capsys):
    assert main(["check", "--data", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl" in capsys.readouterr().err


def test_the_deepspeed_launchers_local_rank_argument_is_accepted():
    args = build_parser().parse_args(["--local_rank=1", "adapt", "--config", "c.yaml"])
    assert args.command == "adapt" and args.local_rank == 1
