"""The README and docs/ hold to what they say: links resolve, paths and commands exist, and every
```bash block (the docs' mark for "runs offline on the tiny model and shipped data") runs and exits 0.

The convention, as docs/README.md states it: ```bash blocks run, ```sh blocks need real weights, data, a
GPU or the network and are never run, ```text / ```yaml blocks are output and configs. `pip install` and
the test suite's own command are never run: a ```bash block holding either is refused.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medllava.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 170

RUN, SHOWN = "bash", "sh"
KINDS = {RUN, SHOWN, "text", "yaml", "json"}
# Never run by this test, whatever the block says: installs, and the suite running itself.
NEVER_RUN = ("pip install", "pip download", "pytest")
# Top-level folders of the repository; a backticked path starting with one of them must exist.
SHIPPED = ("medllava/", "curation/", "finetune/", "eval/", "tests/", "benchmarks/", "scripts/", "docs/")

FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def pages() -> list[Path]:
    """README.md first, then the docs pages in alphabetical order: the order tested blocks run in."""
    return [README, *sorted(DOCS.glob("*.md"))]


def blocks(page: Path) -> list[tuple[str, int, str]]:
    """Every fenced block of `page` as (kind, line number of its opening fence, body)."""
    text = page.read_text()
    return [(m["info"].strip(), text.count("\n", 0, m.start()) + 1, m["body"]) for m in FENCE.finditer(text)]


def where(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT)}:{line}"


def command_lines(body: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = (line.split(" #")[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def medllava_argvs(line: str) -> list[list[str]]:
    """The argument lists given to `medllava` (or `python -m medllava.cli`, `torchrun ... -m medllava.cli`)."""
    found = []
    for part in re.split(r"&&|\|\||;|\|", line):
        words = shlex.split(part)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]  # VAR=value before the command
        if words[:1] == ["medllava"]:
            found.append(words[1:])
        elif "-m" in words and words[words.index("-m") + 1:][:1] == ["medllava.cli"]:
            found.append(words[words.index("-m") + 2:])
    return found


# --- fast checks ---------------------------------------------------------------------------------


def test_readme_is_a_short_front_door_that_lists_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the front door keeps to {README_MAX_LINES}"
    linked = {(README.parent / target.split("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link these docs pages: {missing}"


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # http(s)://, mailto:, or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_every_block_names_its_kind_and_no_run_block_installs_or_runs_the_suite():
    wrong = []
    for page in pages():
        for kind, line, body in blocks(page):
            if kind not in KINDS:
                wrong.append(f"{where(page, line)}: fence kind {kind!r}, not one of {sorted(KINDS)}")
            elif kind == RUN and any(word in body for word in NEVER_RUN):
                wrong.append(f"{where(page, line)}: a ```bash block runs in the docs test; mark installs and "
                             "the test command ```sh")
    assert not wrong, "\n".join(wrong)


def test_every_medllava_command_in_the_docs_parses_with_the_real_command_line():
    parser = build_parser()
    seen, bad = 0, []
    for page in pages():
        for kind, line, body in blocks(page):
            if kind not in (RUN, SHOWN):
                continue
            for command in command_lines(body):
                for argv in medllava_argvs(command):
                    seen += 1
                    try:
                        parser.parse_args(argv)
                    except SystemExit as e:
                        if e.code:  # --help exits 0
                            bad.append(f"{where(page, line)}: medllava {shlex.join(argv)}")
    assert seen > 20, f"found only {seen} medllava commands in the docs: is the block parser broken?"
    assert not bad, "commands the CLI refuses:\n" + "\n".join(bad)


def _python_target_exists(words: list[str]) -> bool:
    if words[1:2] == ["-m"]:
        return importlib.util.find_spec(words[2]) is not None
    return (ROOT / words[1]).is_file()


def test_every_python_and_bash_script_named_in_a_block_exists():
    missing = []
    for page in pages():
        for kind, line, body in blocks(page):
            for command in command_lines(body) if kind in (RUN, SHOWN) else []:
                words = shlex.split(command)
                if words[0] == "python":
                    if words[1:3] != ["-m", "pytest"] and not _python_target_exists(words):
                        missing.append(f"{where(page, line)}: {command}")
                elif words[0] == "bash" and not (ROOT / words[1]).is_file():
                    missing.append(f"{where(page, line)}: {command}")
    assert not missing, "scripts or modules that do not exist:\n" + "\n".join(missing)


def _names_defined(module: str) -> set[str]:
    source = Path(importlib.util.find_spec(module).origin).read_text()
    return {node.name for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}


def _dotted_exists(name: str) -> bool:
    """`medllava.a.b` is a module, or `medllava.a.b.f` a function or class defined in module `medllava.a.b`
    (read from the source, so nothing heavy is imported)."""
    try:
        if importlib.util.find_spec(name) is not None:
            return True
    except ModuleNotFoundError:
        pass
    module, _, attr = name.rpartition(".")
    try:
        return importlib.util.find_spec(module) is not None and attr in _names_defined(module)
    except ModuleNotFoundError:
        return False


def test_every_repository_path_and_medllava_module_the_docs_name_exists():
    missing = []
    for page in pages():
        text = FENCE.sub("", page.read_text())  # blocks are checked above, by command
        for span in CODE_SPAN.findall(text):
            for word in span.split():
                word = word.split("(")[0].strip(",;:")
                if word.startswith(SHIPPED) and "<" not in word and "..." not in word:
                    path = word
                    if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                        missing.append(f"{page.relative_to(ROOT)}: {word}")
                elif re.fullmatch(r"medllava(\.\w+)+", word) and not _dotted_exists(word):
                    missing.append(f"{page.relative_to(ROOT)}: {word}")
    assert not missing, "paths or modules named in the docs that do not exist:\n" + "\n".join(missing)


# --- the runnable blocks -------------------------------------------------------------------------


@pytest.mark.slow
def test_every_bash_block_runs_offline_and_exits_0(demo_workdir):
    cwd = demo_workdir
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           # `medllava` and `python` of the interpreter running the tests
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran, timings = 0, []
    for page in pages():
        for kind, line, body in blocks(page):
            if kind != RUN:
                continue
            assert not any(word in body for word in NEVER_RUN), f"{where(page, line)} must not be run"
            started = time.monotonic()
            out = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=cwd, env=env,
                                 capture_output=True, text=True, timeout=300)
            timings.append(f"{where(page, line)} {time.monotonic() - started:.1f} s")
            assert out.returncode == 0, (
                f"{where(page, line)}: exit {out.returncode}\n{body}\n--- output (tail) ---\n"
                f"{(out.stdout + out.stderr)[-4000:]}")
            ran += 1
    print("\n".join(timings))
    assert ran >= 5, f"only {ran} ```bash blocks found"


def test_every_test_the_docs_cite_exists():
    """The family table backs each cell with a named test (`file::test`, or an abbreviation the page
    defines: "`test_x.py` is shortened to `x`"); each must be a test function of that file."""
    cited, missing = 0, []
    for page in pages():
        text = page.read_text()
        legend = re.findall(r"`(test_\w+)\.py`(?:\s+is\s+shortened)?\s+to\s+`(\w+)`", text)
        short = {abbr: name for name, abbr in legend}
        for span in CODE_SPAN.findall(text):
            match = re.fullmatch(r"(\w+)::(test_\w+)(\[[^\]]*\])?", span)
            if not match:
                continue
            cited += 1
            module = short.get(match[1], match[1])
            path = ROOT / "tests" / f"{module}.py"
            if not path.is_file() or match[2] not in _names_defined_in(path):
                missing.append(f"{page.relative_to(ROOT)}: {span}")
    assert cited > 20, f"found only {cited} cited tests: is the pattern broken?"
    assert not missing, "cited tests that do not exist:\n" + "\n".join(missing)


def _names_defined_in(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
