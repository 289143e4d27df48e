"""Task heads: small folders that specialise one adapted base model, swappable at inference.

A head folder holds a PEFT LoRA adapter (plus the projector when it was trained: PEFT keeps it as a
module to save) and `head.json`, which says how the head expects to be asked (template, prompt
style, closed options) so evaluation asks it exactly as it was taught. Several heads load onto one
base in memory; `use_head` switches between them without copying the base.

`head.json` is checked field by field when read, with one-line errors naming the file and the field,
and only safetensors adapters load: a pickled adapter (`adapter_model.bin`) could run code when read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medllava.io import atomic_write_json
from medllava.families import Family
from medllava.model import ModelConfig, build_model, family_of
from medllava.question_styles import PROMPT_STYLES
from medllava.templates import DEFAULT_TEMPLATE, TEMPLATES

HEAD_FILE = "head.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")


class HeadError(ValueError):
    """A head folder or head.json that cannot be used; the message names the file and the field."""


@dataclass
class HeadInfo:
    """What a head was trained for and how to prompt it."""

    task: str
    template: str = DEFAULT_TEMPLATE
    prompt_style: str = "llava-med"
    closed_options: list[str] = field(default_factory=lambda: ["yes", "no"])
    base: str = ""
    """The base checkpoint the head was trained on."""

    metrics: dict = field(default_factory=dict)
    """Validation numbers recorded at training time, if any."""


def write_head_info(folder: Path, info: HeadInfo) -> None:
    """Write `info` as head.json, checked as it will be on reading, so no unreadable head is saved."""
    path = Path(folder) / HEAD_FILE
    data = asdict(info)
    head_info_from_dict(data, str(path))
    atomic_write_json(path, data)


def read_head_info(folder: str | Path) -> HeadInfo:
    """The checked head.json of a LoRA head folder, whose adapter must be safetensors."""
    folder = Path(folder)
    path = folder / HEAD_FILE
    if not path.is_file() or not (folder / "adapter_config.json").is_file():
        raise HeadError(f"{folder}: not a head folder (needs {HEAD_FILE} and adapter_config.json)")
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
    if pickled:
        raise HeadError(f"{folder / pickled[0]}: pickle adapter weights are refused (loading a pickle can run "
                        f"code); only {ADAPTER_WEIGHTS} loads: re-save the adapter with safe_serialization")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise HeadError(f"{folder}: no {ADAPTER_WEIGHTS} (a head's adapter weights, in safetensors)")
    return read_head_file(path)


def read_head_file(path: str | Path) -> HeadInfo:
    """HeadInfo from a head.json, each field checked; unknown fields are ignored."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HeadError(f"{path}: not valid JSON ({e})") from None
    return head_info_from_dict(data, str(path))


def head_info_from_dict(data, where: str) -> HeadInfo:
    """HeadInfo from the parsed head.json `data`; `where` (the file) starts every error."""
    if not isinstance(data, dict):
        raise HeadError(f"{where}: expected a JSON object with a 'task' field, got {type(data).__name__}")
    if "task" not in data:
        raise HeadError(f"{where}: field 'task' is missing (the task the head was trained for)")
    for name in ("task", "template", "prompt_style", "base"):
        if name in data and not isinstance(data[name], str):
            raise HeadError(f"{where}: field {name!r} must be a string, got {data[name]!r}")
    _check_choice(data, "template", TEMPLATES, where)
    _check_choice(data, "prompt_style", PROMPT_STYLES, where)
    options = data.get("closed_options", ["yes", "no"])
    # A bare string would be read as its letters ("yes" -> y, e, s), so only a list of words is taken.
    if not isinstance(options, list) or not options:
        raise HeadError(f"{where}: field 'closed_options' must be a non-empty list of strings, "
                        f"e.g. [\"yes\", \"no\"], got {options!r}")
    bad = next((o for o in options if not isinstance(o, str) or not o.strip()), None)
    if bad is not None:
        raise HeadError(f"{where}: field 'closed_options' holds {bad!r}; each option must be a non-empty string")
    if "metrics" in data and not isinstance(data["metrics"], dict):
        raise HeadError(f"{where}: field 'metrics' must be an object, got {data['metrics']!r}")
    known = {f for f in HeadInfo.__dataclass_fields__}
    return HeadInfo(**{k: v for k, v in data.items() if k in known})


def _check_choice(data: dict, name: str, choices: tuple[str, ...], where: str) -> None:
    if name in data and data[name] not in choices:
        raise HeadError(f"{where}: field {name!r} is {data[name]!r}; choose one of {', '.join(choices)}")


def head_name(folder: str | Path) -> str:
    return Path(folder).resolve().name.replace(".", "_")


def load_with_heads(base: ModelConfig, heads: list[str | Path]):
    """Load `base` once and attach every head in `heads`.

    Returns `(model, processor, infos)` where `infos` maps head name -> HeadInfo. With no heads the
    plain base model comes back. The first head is active; switch with `use_head`.
    """
    # Every head is checked (head.json, safetensors weights) before the base is loaded, so a bad head
    # fails in a second, not after minutes of loading.
    infos: dict[str, HeadInfo] = {}
    for folder in heads:
        name = head_name(folder)
        if name in infos:
            raise HeadError(f"two heads named {name!r}: give head folders distinct names")
        infos[name] = read_head_info(folder)
    family = family_of(base)
    for folder in heads:
        check_head_family(Path(folder), family)
    model, processor = build_model(base)
    if not heads:
        return model, processor, infos
    from peft import PeftModel

    for i, (folder, name) in enumerate(zip(heads, infos)):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    model.set_adapter(next(iter(infos)))
    return model.eval(), processor, infos


def check_head_family(folder: Path, family: Family) -> None:
    """Refuse a head whose adapter was trained on another family's model class than `family`'s.

    PEFT records the class of the model it wrapped (`auto_mapping.base_model_class` in
    adapter_config.json). LLaVA-1.5 and LLaVA-NeXT share module names, so a head trained on one would
    load onto the other without an error and answer with the wrong projector; an adapter config that
    does not record the class is let through.
    """
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HeadError(f"{path}: not valid JSON ({e})") from None
    mapping = config.get("auto_mapping") if isinstance(config, dict) else None
    trained_on = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if trained_on and trained_on != family.model_class:
        raise HeadError(f"{path}: the head was trained on a {trained_on} base, but the base model is "
                        f"{family.model_type} ({family.model_class}); load it onto the family it was trained on")


def use_head(model, name: str) -> None:
    """Make head `name` the active one."""
    model.set_adapter(name)
