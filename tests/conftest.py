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


def shared_data() -> Path | None:
    """The real sample data folder, when MEDLLAVA_SHARED_DATA points at it."""
    value = os.environ.get("MEDLLAVA_SHARED_DATA")
    return Path(value) if value else None
