"""Task heads: small folders that specialise one adapted base model, swappable at inference.

A head folder holds a PEFT LoRA adapter (plus the projector when it was trained: PEFT keeps it as a
module to save) and `head.json`, which says how the head expects to be asked (template, prompt
style, closed options) so evaluation asks it exactly as it was taught. Several heads load onto one
base in memory; `use_head` switches between them without copying the base.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medllava.io import atomic_write_json
from medllava.model import ModelConfig, build_model

HEAD_FILE = "head.json"


@dataclass
class HeadInfo:
    """What a head was trained for and how to prompt it."""

    task: str
    template: str = "vicuna_v1"
    prompt_style: str = "llava-med"
    closed_options: list[str] = field(default_factory=lambda: ["yes", "no"])
    base: str = ""
    """The base checkpoint the head was trained on."""

    metrics: dict = field(default_factory=dict)
    """Validation numbers recorded at training time, if any."""


def write_head_info(folder: Path, info: HeadInfo) -> None:
    atomic_write_json(Path(folder) / HEAD_FILE, asdict(info))


def read_head_info(folder: str | Path) -> HeadInfo:
    folder = Path(folder)
    path = folder / HEAD_FILE
    if not path.is_file() or not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder}: not a head folder (needs {HEAD_FILE} and adapter_config.json)")
    data = json.loads(path.read_text())
    known = {f for f in HeadInfo.__dataclass_fields__}
    return HeadInfo(**{k: v for k, v in data.items() if k in known})


def head_name(folder: str | Path) -> str:
    return Path(folder).resolve().name.replace(".", "_")


def load_with_heads(base: ModelConfig, heads: list[str | Path]):
    """Load `base` once and attach every head in `heads`.

    Returns `(model, processor, infos)` where `infos` maps head name -> HeadInfo. With no heads the
    plain base model comes back. The first head is active; switch with `use_head`.
    """
    model, processor = build_model(base)
    infos: dict[str, HeadInfo] = {}
    if not heads:
        return model, processor, infos
    from peft import PeftModel

    for i, folder in enumerate(heads):
        info = read_head_info(folder)
        name = head_name(folder)
        if name in infos:
            raise ValueError(f"two heads named {name!r}: give head folders distinct names")
        if i == 0:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        infos[name] = info
    model.set_adapter(next(iter(infos)))
    return model.eval(), processor, infos


def use_head(model, name: str) -> None:
    """Make head `name` the active one."""
    model.set_adapter(name)
