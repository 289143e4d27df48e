"""`medllava adapt`: LLaVA-Med's curriculum from a general LLaVA checkpoint.

Stage 1 (`align`) trains the projector on figure-caption pairs; stage 2 (`instruct`) starts from
stage 1's model and trains projector + language model on instruction conversations. Each stage
writes into its own folder under the run directory, and a finished stage is never redone, so the
same command, run again after a crash, picks up where the run stopped. One run writes a run
directory at a time (`run_dir_lock`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path

from medllava.finetune.config import CURRICULUM, AdaptConfig, stage_definition
from medllava.config import add_config_help, claim_run_dir, load_config
from medllava.model import ModelConfig

STAGES = CURRICULUM


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "adapt",
        help="run the two-stage curriculum (concept alignment, then instruction tuning)",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True, help="YAML config (see finetune/configs/)")
    p.add_argument("--stage", choices=STAGES, help="run one stage only (default: both, in order)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. instruct.epochs=1")
    add_config_help(p, AdaptConfig)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(AdaptConfig, args.config, args.overrides)
    command = " ".join(["medllava adapt --config", str(args.config), *(["--stage", args.stage] if args.stage else []), *args.overrides])
    run_adapt(cfg, [args.stage] if args.stage else list(STAGES), command)
    return 0


def run_adapt(cfg: AdaptConfig, stages: list[str], command: str = "") -> dict[str, dict]:
    """Run `stages` of the curriculum; returns each stage's completion record."""
    from medllava.finetune.trainer import is_main_process

    run_dir = Path(cfg.run_dir)
    with run_dir_lock(run_dir, command or "medllava adapt", is_main_process()):
        return _run_locked(cfg, stages, command, run_dir)


def run_dir_lock(run_dir: Path, command: str, main_process: bool):
    """The run folder's `output_lock`, taken by the main process (RANK unset or 0) only.

    Under torchrun or DeepSpeed every rank runs this code on one run folder: a lock per rank on
    the same file would refuse every rank but the first, so the other ranks take none. A second
    launch is still stopped, by its rank 0; the launcher then ends that launch's other ranks.
    """
    from medllava.locks import output_lock

    return output_lock(run_dir, command) if main_process else contextlib.nullcontext()


def _run_locked(cfg: AdaptConfig, stages: list[str], command: str, run_dir: Path) -> dict[str, dict]:
    """The rest of `run_adapt`, while the main process holds the run folder's lock."""
    from medllava.finetune.stages import RunSettings, run_stage
    from medllava.finetune.trainer import is_main_process

    claim_run_dir(run_dir, cfg, command or "medllava adapt", f"medllava adapt --config {run_dir / 'config.yaml'}",
                  is_main_process())
    settings = RunSettings(seed=cfg.seed, bf16=cfg.bf16, deepspeed=cfg.deepspeed, report_to=tuple(cfg.report_to))
    records = {}
    for name in stages:
        start = start_model(cfg, name, run_dir)
        records[name] = run_stage(name, getattr(cfg, name), start, settings, run_dir / name)
        if is_main_process():
            print_stage_done(name, records[name], run_dir / name)
    return records


def start_model(cfg: AdaptConfig, name: str, run_dir: Path) -> ModelConfig:
    """The model stage `name` starts from: the model its `starts_from` stage saved, when there is one
    (STAGE_DEFINITIONS), else the run's model."""
    from medllava.finetune.trainer import is_main_process

    previous = stage_definition(name).starts_from
    if not previous:
        return cfg.model
    saved = run_dir / previous / "model"
    if saved.is_dir():
        return dataclasses.replace(cfg.model, name_or_path=str(saved))
    if is_main_process():
        print(f"[{name}] no stage-{STAGES.index(previous) + 1} model in {saved}; starting from"
              f" {cfg.model.name_or_path}", flush=True)
    return cfg.model


def print_stage_done(name: str, record: dict, stage_dir: Path) -> None:
    """The lines a finished stage prints: steps, loss, what was skipped while training, where it wrote."""
    from medllava.finetune.stages import describe_train_loss

    skipped = ", ".join(f"{k}: {v}" for k, v in record["skipped_in_batches"].items()) or "none"
    print(f"[{name}] done: {record['steps']} steps, {describe_train_loss(record)}; skipped while training: {skipped};"
          f" output in {stage_dir}", flush=True)
    for example in record["skipped_examples"][:5]:
        print(f"  skipped {example}", flush=True)
