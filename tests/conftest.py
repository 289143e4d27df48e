"""Shared fixtures: the tiny random model is built once per session (it takes a few seconds)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the tiny models' matrices are too small to share out (a second
    thread costs more than it saves), and one thread makes every run do the same arithmetic, so two runs
    (batched and alone, killed and resumed) can be compared bit for bit. Modules that need it say
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the `tiny` named model; do not train it in place (copy it)."""
    from medllava.model import ModelConfig, build_model

    return build_model(ModelConfig(name_or_path="tiny"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny):
    """The tiny model saved as a llava-hf checkpoint folder."""
    from medllava.model import save_model

    model, processor = tiny
    return save_model(model, processor, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """A working directory laid out like the repository root (its folders linked at the same relative
    paths) in which `medllava demo --out runs/demo` has run once. The demo tests read its outputs and the
    docs' commands run here (their `medllava demo --out runs/demo` then resumes the finished run), so the
    suite pays for one whole demo."""
    import torch

    from medllava.cli import main

    root = Path(__file__).resolve().parents[1]
    workdir = tmp_path_factory.mktemp("workdir")
    for entry in root.iterdir():
        if not entry.name.startswith(".") and entry.name != "runs":
            (workdir / entry.name).symlink_to(entry)
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--out", str(workdir / "runs" / "demo")]) == 0  # on one thread, as the demo runs
    finally:
        torch.set_num_threads(threads)
    return workdir


# The real sample data (its README says what is there) sits at ../shared/data beside the checkout, as in CI;
# MEDLLAVA_SHARED_DATA points elsewhere.
SHARED_DATA_VARIABLE = "MEDLLAVA_SHARED_DATA"
SHARED_DATA_BESIDE_REPO = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data folder; the test skips, naming the path, where it is absent beside the checkout.

    A MEDLLAVA_SHARED_DATA that names a missing folder fails the test instead: a mistyped path must not
    quietly turn the real-data checks off.
    """
    pointed = os.environ.get(SHARED_DATA_VARIABLE)
    root = Path(pointed) if pointed else SHARED_DATA_BESIDE_REPO
    if root.is_dir():
        return root
    if pointed:
        pytest.fail(f"{SHARED_DATA_VARIABLE}={pointed} is not a folder", pytrace=False)
    pytest.skip(f"no shared sample data at {root} (set {SHARED_DATA_VARIABLE} to point elsewhere)")
