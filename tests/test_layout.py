"""The package layout: curation/, finetune/ and eval/ install as medllava.curation, medllava.finetune
and medllava.eval, so a user's own folders of the same names can never shadow them."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _user_project(tmp_path: Path) -> Path:
    """A working directory like an ML repository's: its own eval/, finetune/ and curation/ packages,
    each of which fails loudly if anything imports it."""
    for name in ("eval", "finetune", "curation"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user project {name} was imported')\n")
    return tmp_path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_a_users_own_eval_and_finetune_folders_do_not_shadow_medllavas(tmp_path):
    cwd = _user_project(tmp_path)
    # `python -m` puts the working directory first on sys.path, as `torchrun -m medllava.cli` does.
    for command in (["eval", "score", "--help"], ["finetune", "--help"], ["curate", "extract", "--help"]):
        out = _run([sys.executable, "-m", "medllava.cli", *command], cwd)
        assert out.returncode == 0, out.stderr
        assert "the user project" not in out.stderr
    # Every module loads from medllava's own folders, not the user's.
    code = ("import medllava.eval.run, medllava.finetune.stages, medllava.curation.pipeline, sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('eval', 'finetune', 'curation')))")
    out = _run([sys.executable, "-c", code], cwd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_package_folder_is_installed_under_the_medllava_namespace():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"medllava." + name: ROOT / path for name, path in
               (("curation", "curation"), ("finetune", "finetune"), ("eval", "eval"))}
    assert {k: ROOT / v for k, v in config["package-dir"].items() if k != "medllava"} == folders
    found = set()
    for top, folder in {"medllava": ROOT / "medllava", **folders}.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((top, *parts)))
    assert found == set(config["packages"])
