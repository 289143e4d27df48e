"""`medllava curate pipeline`: extract -> [split] -> classify -> dedupe -> align from one YAML config, resumable.

The split step (compound figures to panels) runs only when the config has a `split` section.

Each config section holds one step's options under their command-line names (`min_confidence`
for `--min-confidence`); the section is turned into that step's arguments and parsed by the
step's own parser, so the config accepts exactly what the command line does. A step whose
output exists with a `.done.json` stamp matching its arguments and input files is skipped, so
re-running after a crash redoes only the unfinished steps (outputs are written atomically, so
an output on disk is complete). One run writes a folder at a time (a lock beside it,
`medllava.locks.output_lock`), so the temporaries a killed run left beside the outputs are removed
first, so they do not pile up, including those of steps that are then skipped as up to date (a step
that runs also clears its own, and extract those in its images folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from medllava.io import DataError, atomic_write_json, atomic_write_text, read_yaml_mapping
from medllava.locks import output_lock

from medllava.curation import align, classify, dedupe, extract, split
from medllava.curation.common import clear_stale_temps

# (section, step module, output file, the --in of the step is the previous output)
STEPS = [
    ("extract", extract, "figures.jsonl"),
    ("split", split, "split.jsonl"),  # optional: only when the config has the section
    ("classify", classify, "classified.jsonl"),
    ("dedupe", dedupe, "deduped.jsonl"),
    ("align", align, "alignment.jsonl"),
]
# Options holding paths; relative ones are read relative to the config file's folder.
PATH_OPTIONS = {"jats", "pmc15m", "llava_med", "images_out", "image_root", "benchmark_images", "rules"}


def load_config(path: Path) -> dict:
    config = read_yaml_mapping(path, "at least 'out_dir' and 'extract'")
    if "out_dir" not in config or "extract" not in config:
        raise DataError(f"{path}: expected a mapping with at least 'out_dir' and 'extract'")
    unknown = set(config) - {"out_dir"} - {s for s, _, _ in STEPS}
    if unknown:
        raise DataError(f"{path}: unknown sections {sorted(unknown)}; expected out_dir, "
                        + ", ".join(s for s, _, _ in STEPS))
    return config


def _resolve(value, base: Path):
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    return str(base / value) if not Path(str(value)).is_absolute() else str(value)


def step_argv(section: dict, base: Path, out: Path, inp: Path | None, where: str) -> list[str]:
    """Command-line arguments of one step from its config section."""
    if not isinstance(section, dict):
        raise DataError(f"{where}: expected a mapping of options")
    argv = ["--out", str(out)] + (["--in", str(inp)] if inp is not None else [])
    for key, value in section.items():
        if value is None or value is False or value == []:
            continue
        if key in PATH_OPTIONS:
            value = _resolve(value, base)
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list) and key == "keep":
            argv += [flag, ",".join(map(str, value))]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)] if key in ("jats", "benchmark_images") else \
                [a for v in value for a in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


class _RaisingParser(argparse.ArgumentParser):
    """A parser that raises instead of printing usage and exiting (its subparsers inherit this)."""

    def error(self, message):
        raise DataError(message)


def parse_step(module, argv: list[str], where: str) -> argparse.Namespace:
    """Parse a step's arguments with the step's own command-line parser."""
    parser = _RaisingParser(prog="pipeline")
    sub = parser.add_subparsers(dest="step")
    module.register(sub)
    try:
        return parser.parse_args([next(iter(sub.choices)), *argv])
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def step_options(config: dict, section: str) -> dict:
    """A section's options with the defaults one step takes from another."""
    options = dict(config[section] or {})
    images = (config.get("extract") or {}).get("images_out")
    if section in ("split", "dedupe") and "image_root" not in options and images:
        options["image_root"] = images  # they read the images extract copied (split writes its crops there)
    return options


def _stamp(argv: list[str], inp: Path | None) -> dict:
    stat = inp.stat() if inp is not None else None
    return {"argv": argv, "input": [str(inp), stat.st_size, stat.st_mtime_ns] if stat else None}


def run_pipeline(config_path: Path) -> list[str]:
    """Run (or resume) every configured step; returns the names of the steps that ran.

    The output folder is locked for the whole run (`output_lock`): a second run into it is refused
    at once, so the temporaries cleared below can only be a killed run's."""
    config = load_config(config_path)
    base = config_path.parent
    out_dir = Path(_resolve(config["out_dir"], base))
    with output_lock(out_dir, f"medllava curate pipeline --config {config_path}"):
        return _run_locked(config, config_path, base, out_dir)


def _run_locked(config: dict, config_path: Path, base: Path, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    # The run folder keeps the config it was made from, so the set can be rebuilt.
    atomic_write_text(out_dir / "pipeline.yaml", config_path.read_text(encoding="utf-8"))
    # Every section is parsed before any step runs, so a typo in the last one costs no time.
    plan, previous = [], None
    for section, module, filename in STEPS:
        if section not in config:
            continue
        out = out_dir / filename
        argv = step_argv(step_options(config, section), base, out, previous, f"{config_path}: {section}")
        args = parse_step(module, argv, f"{config_path}: {section}")
        plan.append((section, out, argv, args, previous))
        previous = out
    # This run holds the folder's lock, so any temporary there was left by a killed run.
    # Cleared here for every step, since a step skipped as up to date never clears its own.
    clear_stale_temps([out_dir / "pipeline.yaml", *(out for _, out, *_ in plan)])
    ran = []
    for section, out, argv, args, inp in plan:
        stamp_path = Path(f"{out}.done.json")
        if out.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == _stamp(argv, inp):
            print(f"{section}: up to date ({out}), skipped")
            continue
        args.func(args)
        atomic_write_json(stamp_path, _stamp(argv, inp))
        ran.append(section)
    return ran


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline", help="run extract, split, classify, dedupe and align from one YAML config (resumable)",
        description="Run the curation steps named in a YAML config, skipping steps whose output is "
                    "already complete. See curation/pipeline_example.yaml.")
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="pipeline YAML")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.config.is_file():
        raise FileNotFoundError(f"--config file not found: {args.config}")
    ran = run_pipeline(args.config)
    print(f"pipeline: ran {', '.join(ran) if ran else 'nothing (all steps up to date)'}")
    return 0
