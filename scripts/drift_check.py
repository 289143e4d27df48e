"""Run the test suite in a throwaway environment built with a chosen set of dependency versions.

    python scripts/drift_check.py newest    # the newest releases pyproject.toml allows today
    python scripts/drift_check.py oldest    # every dependency at its lower bound in pyproject.toml
    python scripts/drift_check.py locked    # constraints.txt, the set CI and the README install
    python scripts/drift_check.py newest --write-lock   # ... and, if the suite passes, lock what it used

Each run makes a new virtual environment (`--venv DIR` to keep it), installs torch first (`--torch`,
2.13.0 by default, the CPU build; on a GPU machine name the CUDA build's version), then medllava with
its `dev` extra under the chosen versions, prints the versions it got, runs `python -m pytest -q` (more
pytest arguments after `--`) and exits with pytest's status. `--write-lock` rewrites constraints.txt
from the environment's `pip freeze` when the suite passed: that is how the lock is refreshed.

The oldest set pins each requirement of pyproject.toml (dependencies and every extra) at its `>=`
bound, torch excepted (it is the one `--torch` names); what those pins leave open resolves to the
newest release, as it would for a user holding those versions.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
SHOWN = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "huggingface-hub", "safetensors",
         "kernels", "deepspeed", "pydicom", "numpy", "scikit-learn", "pillow", "pytest")


def lower_bounds(pyproject: Path) -> list[str]:
    """`name==X` for every `name>=X` requirement of the project and its extras (torch left out)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += [r for r in extra if not r.startswith(project["name"])]
    pins = []
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+?)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)", requirement)
        if match is None:
            raise SystemExit(f"{pyproject}: requirement {requirement!r} has no >= lower bound to check")
        name, version = match.group(1), match.group(3)
        if name != "torch":
            pins.append(f"{name}=={version}")
    return pins


def constraints_for(versions: str, torch: str, workdir: Path) -> list[str]:
    """pip arguments that install the project under `versions`, torch held at the release installed first
    (left free, the newest allowed would replace it, a CUDA build of several GB on a CPU machine)."""
    held = workdir / "torch.txt"
    held.write_text(f"torch=={torch}\n")
    if versions == "locked":
        return ["-c", str(LOCK), "-c", str(held)]
    if versions == "oldest":
        path = workdir / "oldest.txt"
        path.write_text("\n".join(lower_bounds(REPO / "pyproject.toml")) + "\n")
        return ["-c", str(path), "-c", str(held)]
    return ["-c", str(held), "--upgrade", "--upgrade-strategy", "eager"]


def pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def freeze(python: Path) -> list[str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                         check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line and not line.startswith(("-e ", "medllava"))]


def versions_of(frozen: list[str]) -> dict[str, str]:
    pinned = dict(line.split("==", 1) for line in frozen if "==" in line)
    return {name.lower().replace("_", "-"): version for name, version in pinned.items()}


def write_lock(frozen: list[str], versions: str, torch: str) -> None:
    """constraints.txt from a passing environment; torch's local build tag dropped, so the CUDA build
    of the same release satisfies it on a GPU machine."""
    lines = [re.sub(r"^torch==([^+]+)\+\S+$", r"torch==\1", line) for line in frozen]
    header = [
        "# The exact versions the test suite last passed with (scripts/drift_check.py; README, Versions).",
        f"# Made by: python scripts/drift_check.py {versions} --torch {torch} --write-lock",
        f"# On {time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}, {sys.platform}.",
    ]
    tmp = LOCK.with_suffix(".tmp")
    tmp.write_text("\n".join(header + sorted(lines, key=str.lower)) + "\n")
    os.replace(tmp, LOCK)
    print(f"wrote {LOCK} ({len(lines)} packages)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", choices=("newest", "oldest", "locked"))
    parser.add_argument("--torch", default="2.13.0", help="the torch release to install first (default 2.13.0)")
    parser.add_argument("--venv", type=Path, help="build the environment here and keep it (default: a temporary one)")
    parser.add_argument("--write-lock", action="store_true", help="rewrite constraints.txt if the suite passes")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: more arguments for pytest
    args = parser.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.pytest_args = extra
    with tempfile.TemporaryDirectory(prefix="medllava-drift-") as tmp:
        venv = args.venv or Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        pip(python, f"torch=={args.torch}")
        pip(python, *constraints_for(args.versions, args.torch, Path(tmp)), "-e", f"{REPO}[dev]")
        frozen = freeze(python)
        got = versions_of(frozen)
        print(f"[{args.versions}] " + ", ".join(f"{name} {got[name]}" for name in SHOWN if name in got), flush=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        started = time.monotonic()
        status = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args],
                                cwd=REPO, env=env, check=False).returncode
        result = "passed" if status == 0 else f"FAILED (pytest exit {status})"
        print(f"[{args.versions}] suite {result} in {time.monotonic() - started:.0f} s", flush=True)
        if status == 0 and args.write_lock:
            write_lock(frozen, args.versions, args.torch)
        return status


if __name__ == "__main__":
    sys.exit(main())
