"""Typed configs: dataclasses with a docstring under each field.

The docstrings are read from the source once and reused three ways: `--help` text, comments in the
YAML written beside every run (so the run can be reproduced and read), and error messages. Loading
is strict: an unknown or mistyped field is refused with its name and the nearest valid one.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from medllava.io import atomic_write_text, read_yaml_mapping


class ConfigError(ValueError):
    """A config that does not match its dataclass; the message names the field."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the docstring written under it in the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid fields: {', '.join(choices)}"


def _fixed_values(args: tuple) -> list[str] | None:
    """'true', 'false' and each literal of a union made of bool and Literal types only; None otherwise."""
    named = []
    for arg in args:
        if arg is bool:
            named += ["true", "false"]
        elif typing.get_origin(arg) is typing.Literal:
            named += [repr(v) for v in typing.get_args(arg)]
        elif arg is not type(None):
            return None
    return named


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`, converting where the conversion is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        if named := _fixed_values(args):  # e.g. true, false or 'auto': name them all, not the first type's
            raise ConfigError(f"{where}: expected {', '.join(named[:-1])} or {named[-1]}, got {value!r}")
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):
            # YAML reads unquoted yes/no/true/false as booleans; turning them into "True" would be silent.
            raise ConfigError(f"{where}: expected a string, got the boolean {value!r} (quote it in YAML, e.g. 'yes')")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown fields and mistyped values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config field '{prefix}{key}'{_nearest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain-data form of a config dataclass (tuples become lists, for YAML)."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key=value` / `section.key=value` overrides; values are parsed as YAML scalars."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        names = key.strip().split(".")
        if not all(name.strip() for name in names):
            raise ConfigError(f"override {item!r}: the key {key!r} is not a field name like train.epochs")
        value = _override_value(item, raw)
        node = data
        *parents, leaf = names
        for i, p in enumerate(parents):
            section = node.get(p)
            if section is not None and not isinstance(section, dict):
                where = ".".join(names[:i + 1])
                raise ConfigError(f"override {item!r}: {where} is {section!r}, not a section with fields")
            node[p] = dict(section or {})
            node = node[p]
        node[leaf] = value
    return data


def _override_value(item: str, raw: str):
    """The YAML value of one override; a YAML syntax error is one line naming the override."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); "
                          "quote it, e.g. key='...'") from None


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Read a YAML file (optional) into `cls`, after applying `key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_yaml_mapping(path, error=ConfigError)
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_yaml(cfg, header: str = "") -> str:
    """YAML text of `cfg` with each field's docstring as a comment above it."""
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    _dump_into(cfg, lines, indent="")
    return "\n".join(lines) + "\n"


def _dump_into(cfg, lines: list[str], indent: str) -> None:
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for doc_line in docs.get(f.name, "").splitlines():
            lines.append(f"{indent}# {doc_line}".rstrip())
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            _dump_into(value, lines, indent + "  ")
        else:
            lines.append(f"{indent}{f.name}: {_yaml_inline(to_dict_value(value))}")


def _yaml_inline(value) -> str:
    """One-line YAML for a scalar or a small list/dict (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()


def to_dict_value(value):
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def save_config(cfg, path: str | Path, header: str = "") -> None:
    """Write `cfg` as commented YAML, atomically."""
    atomic_write_text(path, dump_yaml(cfg, header))


def add_config_help(parser, cls: type) -> None:
    """Append the config fields and their docstrings to an argparse parser's epilog."""
    docs = field_docs(cls)
    lines = ["config fields (set in the YAML or as key=value):"]
    for f in dataclasses.fields(cls):
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default!r})"
        first = docs.get(f.name, "").split("\n")[0]
        lines.append(f"  {f.name}{default}: {first}")
    parser.epilog = "\n".join(lines)


def claim_run_dir(run_dir: str | Path, cfg, started_by: str, reproduce: str, main_process: bool = True) -> None:
    """Write `cfg` as `<run_dir>/config.yaml`, or check that a run resumed there uses the same config.

    Resuming with a different config would mix two runs in one folder; it is refused, naming the
    fields that differ. Only the main process writes.
    """
    saved = Path(run_dir) / "config.yaml"
    if saved.is_file():
        before, after = _flatten(to_dict(load_config(type(cfg), saved))), _flatten(to_dict(cfg))
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:
            raise ConfigError(
                f"{saved}: this run folder holds a run with a different config ({', '.join(changed)}); "
                "use a new run_dir, or the same config to resume"
            )
        return
    if main_process:
        save_config(cfg, saved, header=f"Started by: {started_by}\nReproduce with: {reproduce}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
