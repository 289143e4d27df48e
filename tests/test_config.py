"""Typed configs: strict loading with the nearest valid field named, overrides, and the commented
YAML written beside a run reproducing the same config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from medllava.config import ConfigError, dump_yaml, field_docs, from_dict, load_config, save_config
from medllava.model import ModelConfig


@dataclass
class Optim:
    lr: float = 2e-3
    """Peak learning rate."""

    warmup_ratio: float = 0.03
    """Fraction of steps spent warming up."""


@dataclass
class Run:
    output_dir: str = "runs/x"
    """Where the run writes."""

    epochs: int = 1
    """Passes over the data."""

    bf16: bool = True
    """Train in bfloat16."""

    modules: list[str] = field(default_factory=lambda: ["multi_modal_projector"])
    """Modules to train."""

    optim: Optim = field(default_factory=Optim)
    """Optimiser settings."""

    note: str | None = None
    """Free text."""

    compile: bool | Literal["auto"] = False
    """On, off, or on where it works."""


def test_field_docstrings_are_read_from_the_source():
    docs = field_docs(Run)
    assert docs["epochs"] == "Passes over the data." and docs["optim"] == "Optimiser settings."
    assert field_docs(ModelConfig)["trust_remote_code"].startswith("Allow code shipped")


def test_unknown_field_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config field 'epoch'; did you mean 'epochs'\?"):
        from_dict(Run, {"epoch": 3})
    with pytest.raises(ConfigError, match=r"'optim.learning_rate'"):
        from_dict(Run, {"optim": {"learning_rate": 1}})


@pytest.mark.parametrize(
    "data, message",
    [({"epochs": "three"}, "epochs: expected an integer"), ({"bf16": "maybe"}, "bf16: expected true or false"),
     ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"), ({"epochs": 1.5}, "epochs: expected an integer"),
     ({"modules": [True, False]}, r"modules\[0\]: expected a string, got the boolean True \(quote it"),
     ({"compile": "sometimes"}, r"compile: expected true, false or 'auto', got 'sometimes'$")],
)
def test_mistyped_values_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Run, data)


def test_a_choice_of_true_false_or_a_word_takes_each():
    assert [from_dict(Run, {"compile": v}).compile for v in (True, "false", "auto")] == [True, False, "auto"]


def test_overrides_and_yaml_round_trip(tmp_path):
    path = tmp_path / "in.yaml"
    path.write_text("epochs: 2\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(Run, path, ["optim.warmup_ratio=0.1", "modules=language_model,lm_head", "note=hello world"])
    assert cfg.epochs == 2 and cfg.optim.lr == 1e-4 and cfg.optim.warmup_ratio == 0.1
    assert cfg.modules == ["language_model", "lm_head"] and cfg.note == "hello world"
    out = tmp_path / "config.yaml"
    save_config(cfg, out, header="medllava adapt --config config.yaml")
    text = out.read_text()
    assert text.startswith("# medllava adapt --config config.yaml\n")
    assert "# Passes over the data.\nepochs: 2" in text and "  # Peak learning rate.\n  lr: 0.0001" in text
    assert load_config(Run, out) == cfg


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(Run, path)
    path.write_text("epoch: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown config field 'epoch'"):
        load_config(Run, path)


def test_dump_of_defaults_is_loadable():
    assert "name_or_path: tiny" in dump_yaml(ModelConfig())
