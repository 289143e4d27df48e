"""`medllava finetune`: train a task head (VQA-RAD, SLAKE, PathVQA or an in-house set) on an adapted base.

    medllava finetune --task vqa-rad --base runs/llava_med/instruct/model --root data/vqa_rad train.epochs=9
    medllava finetune split --in cases.csv --out data/cases --group-by patient_id

The task's training split becomes one conversation per question (`medllava.finetune.task_data`), asked in
the head's prompt style; the one training wrapper (`medllava.finetune.stages.run_stage`) trains it, keeping
the checkpoint with the lowest validation loss when the task has a validation split. The head is
saved in its own folder, loadable with `medllava.heads.load_with_heads`: a LoRA adapter (with the
projector when it was trained) and `head.json` saying how it was taught. With `head.full=true` it is
a full checkpoint instead, with `head.json` beside the weights. The base checkpoint is only read.

Run folder (`run_dir`):
    config.yaml                 the full config; rerunning it resumes or, when finished, does nothing
    data/{train,validation}.jsonl, data/report.json   the conversations trained and validated on
    train/                      the stage folder (checkpoints, data order, completion record)
    <run_dir name>-head/        the head folder (unless `head.dir` says otherwise)

One run writes a run folder (and its head folder) at a time: both are locked for the whole run
(`head_locks`), and a second run into either stops at once naming the first's PID.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from medllava.finetune.config import DataConfig, LoraConfig, StageConfig
from medllava.config import ConfigError, add_config_help, claim_run_dir, load_config
from medllava.model import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs" / "heads"


def shipped_task_configs() -> dict[str, Path]:
    """The shipped head configs (configs/heads/*.yaml) by the task each trains (its `task.name`): a config
    dropped in that folder is what `--task NAME` uses."""
    from medllava.io import read_yaml_mapping

    configs: dict[str, Path] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        task = read_yaml_mapping(path).get("task") or {}
        configs.setdefault(task.get("name", TaskSource.name), path)
    return configs


@dataclass
class TaskSource:
    name: str = "vqa-rad"
    """Task loader (medllava.eval.tasks): vqa-rad, slake, pathvqa or inhouse."""

    root: str = ""
    """Dataset folder in the release's own layout (in-house: the folder of the split files)."""

    train_split: str = "train"
    """Split trained on."""

    val_split: str = ""
    """Split that picks the best checkpoint by validation loss (slake: validate, pathvqa: val, in-house:
    validation); empty: none, and the last checkpoint is kept (VQA-RAD has no validation split)."""

    options: dict = field(default_factory=dict)
    """Task options, e.g. {source: official} (vqa-rad, pathvqa) or {lang: en} (slake)."""

    skip_bad: bool = True
    """Skip and count unreadable records instead of stopping at the first one."""


@dataclass
class HeadSettings:
    full: bool = False
    """Save a full checkpoint (train.train_modules trained in full, no LoRA) instead of a LoRA adapter."""

    prompt_style: str = "llava-med"
    """How questions are asked in training, and so in evaluation: plain, short or llava-med."""

    closed_options: list[str] = field(default_factory=lambda: ["yes", "no"])
    """Options named in the llava-med closed-question prompt."""

    dir: str = ""
    """Head folder; empty: `<run_dir>/<run_dir name>-head`. Heads loaded together are named after their
    folders, so give each a distinct folder name."""


def _head_training() -> StageConfig:
    """LLaVA-Med's downstream recipe (3 epochs, global batch 128, cosine, 3% warmup), with LoRA at
    LLaVA-1.5's LoRA learning rate; LLaVA-Med trained the whole language model at 2e-5."""
    return StageConfig(learning_rate=2e-4, epochs=3.0, lora=LoraConfig(enabled=True))


@dataclass
class FinetuneConfig:
    run_dir: str = "runs/finetune/vqa_rad"
    """Run folder: config.yaml, the conversations, the training stage and (by default) the head."""

    base: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="runs/llava_med/instruct/model"))
    """The adapted base model the head specialises (read only)."""

    task: TaskSource = field(default_factory=TaskSource)
    """Where the questions come from."""

    head: HeadSettings = field(default_factory=HeadSettings)
    """What the head is and how it is asked."""

    train: StageConfig = field(default_factory=_head_training)
    """Training settings, with the conversation template in train.data.template.
    train.data.path and train.data.image_root are filled in from the task."""

    seed: int = 42
    """Seed for new weights, data order and dropout."""

    bf16: bool = True
    """Train in bfloat16 mixed precision (ignored on a CPU without bf16 support)."""

    deepspeed: str | None = None
    """DeepSpeed JSON config for several GPUs."""

    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where training metrics go (tensorboard, none, ...)."""


def head_dir(cfg: FinetuneConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    return Path(cfg.head.dir) if cfg.head.dir else run_dir / f"{run_dir.resolve().name}-head"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="train a task head (VQA-RAD, SLAKE, PathVQA, in-house); `finetune split` makes grouped splits",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", help=f"{', '.join(shipped_task_configs())} (a shipped config) or a config YAML file")
    p.add_argument("--base", help="base checkpoint folder (sets base.name_or_path)")
    p.add_argument("--root", help="dataset folder (sets task.root)")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="key=value",
                   help="config overrides, e.g. train.epochs=9 head.full=true")
    add_config_help(p, FinetuneConfig)
    p.epilog = "grouped train/validation/test splits: medllava finetune split --help\n\n" + p.epilog
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.rest and args.rest[0] == "split":
        from medllava.finetune.splits import main as split_main

        return split_main(args.rest[1:])
    stray = [a for a in args.rest if a.startswith("-") or "=" not in a]
    if stray:
        raise ValueError(f"unexpected argument {stray[0]!r}: options go before the key=value overrides")
    if not args.task:
        raise ValueError(f"--task is required: {', '.join(shipped_task_configs())} or a config YAML file")
    path = task_config_path(args.task)
    overrides = [*([f"base.name_or_path={args.base}"] if args.base else []),
                 *([f"task.root={args.root}"] if args.root else []), *args.rest]
    cfg = load_config(FinetuneConfig, path, overrides)
    command = " ".join(["medllava finetune --task", args.task, *(["--base", args.base] if args.base else []),
                        *(["--root", args.root] if args.root else []), *args.rest])
    record = run_finetune(cfg, command)
    print(f"head saved to {record['head']}")
    return 0


def task_config_path(task: str) -> Path:
    """The shipped config of a task name, or the YAML file `task` names."""
    shipped = shipped_task_configs()
    if task in shipped:
        return shipped[task]
    path = Path(task)
    if not path.is_file():
        raise FileNotFoundError(f"--task {task}: neither a task ({', '.join(shipped)}) nor a config file")
    return path


def run_finetune(cfg: FinetuneConfig, command: str = "") -> dict:
    """Write the task's conversations, train, and save the head; returns the training record
    with `head` (the head folder) added."""
    from medllava.finetune.trainer import is_main_process

    if not cfg.task.root:
        raise ConfigError("task.root is not set: give the dataset folder with --root or task.root=DIR")
    if cfg.train.data.path or cfg.train.data.image_root:
        raise ConfigError("train.data.path and train.data.image_root are filled in from the task; "
                          "set task.root instead")
    run_dir = Path(cfg.run_dir)
    with head_locks(cfg, command or "medllava finetune", is_main_process()):
        # The data is read before the run folder is claimed, so a wrong dataset path leaves no run behind.
        made = read_task_data(cfg, run_dir / "data")
        claim_run_dir(run_dir, cfg, command or "medllava finetune",
                      f"medllava finetune --task {run_dir / 'config.yaml'}", is_main_process())
        train_data, val_data = write_task_data(cfg, made, run_dir / "data")
        return train_head(cfg, train_data, val_data)


def head_locks(cfg: FinetuneConfig, command: str, main_process: bool) -> contextlib.ExitStack:
    """The locks of the run folder and of the head folder (when it is not inside the run folder),
    held by the main process only, as in `medllava.finetune.adapt.run_dir_lock`."""
    from medllava.finetune.adapt import run_dir_lock

    run_dir, head = Path(cfg.run_dir), head_dir(cfg)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(run_dir_lock(run_dir, command, main_process))
        if not head.resolve().is_relative_to(run_dir.resolve()):
            stack.enter_context(run_dir_lock(head, command, main_process))
    except BaseException:
        stack.close()  # a refused head lock gives the run folder's back
        raise
    return stack


def read_task_data(cfg: FinetuneConfig, out: Path) -> dict:
    """role ("train", "validation") -> (task, its conversation records); images stored inside the
    release file are written under `out/images`."""
    from medllava.eval.tasks import load_task
    from medllava.finetune.task_data import task_records

    made = {}
    for role, split in (("train", cfg.task.train_split), ("validation", cfg.task.val_split)):
        if not split:
            continue
        task = load_task(cfg.task.name, cfg.task.root, split, skip_bad=cfg.task.skip_bad, **cfg.task.options)
        records = task_records(task, cfg.head.prompt_style, cfg.head.closed_options, out / "images")
        if not records.records:
            raise ValueError(f"{task.source}: no usable questions in split {split!r}\n"
                             + "\n".join(records.skipped[:5]))
        made[role] = (task, records)
    return made


def write_task_data(cfg: FinetuneConfig, made: dict, out: Path) -> tuple[DataConfig, DataConfig | None]:
    """Write the conversations of `made` (from `read_task_data`) under `out`, with report.json;
    returns the train and validation data configs."""
    from medllava.io import atomic_write_json, write_jsonl

    report, configs = {}, {}
    for role, (task, records) in made.items():
        write_jsonl(out / f"{role}.jsonl", records.records)
        report[role] = {"source": str(task.source), "split": task.split, "records": len(records.records),
                        "skipped_records": task.skipped[:20], "n_skipped_records": len(task.skipped),
                        "skipped_images": records.skipped[:20], "n_skipped_images": len(records.skipped)}
        print(f"[data] {role}: {len(records.records)} questions from {task.source} ({len(task.skipped)} unreadable"
              f" records, {len(records.skipped)} unusable image folders)", flush=True)
        configs[role] = dataclasses.replace(cfg.train.data, path=str(out / f"{role}.jsonl"),
                                            image_root=str(records.image_root))
    atomic_write_json(out / "report.json", report)
    return configs["train"], configs.get("validation")


def train_head(cfg: FinetuneConfig, train_data: DataConfig, val_data: DataConfig | None = None) -> dict:
    """Train on `train_data` (model selection on `val_data`) and save the head; see the module docstring."""
    from medllava.finetune.stages import RunSettings, describe_train_loss, run_stage
    from medllava.finetune.trainer import is_main_process
    from medllava.heads import HeadInfo

    stage = dataclasses.replace(cfg.train, data=train_data)
    if cfg.head.full:
        stage = dataclasses.replace(stage, lora=dataclasses.replace(stage.lora, enabled=False, quantize_4bit=False))
    elif not stage.lora.enabled:
        raise ConfigError("a LoRA head needs train.lora.enabled=true; set head.full=true for a full-checkpoint head")
    settings = RunSettings(seed=cfg.seed, bf16=cfg.bf16, deepspeed=cfg.deepspeed, report_to=tuple(cfg.report_to))
    stage_dir = Path(cfg.run_dir) / "train"
    record = run_stage("finetune", stage, cfg.base, settings, stage_dir, val_data=val_data)
    out = head_dir(cfg)
    if is_main_process():
        metrics = {"train_loss": record["train_loss"], "train_loss_steps": record["train_loss_steps"],
                   "steps": record["steps"]}
        if "validation" in record:
            metrics["val_loss"] = record["validation"]["best_eval_loss"]
        info = HeadInfo(task=cfg.task.name, template=stage.data.template, prompt_style=cfg.head.prompt_style,
                        closed_options=list(cfg.head.closed_options), base=cfg.base.name_or_path, metrics=metrics)
        publish_head(stage_dir / ("model" if cfg.head.full else "adapter"), out, info)
        print(f"[finetune] {describe_train_loss(record)} after {record['steps']} steps"
              + (f"; best validation loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""), flush=True)
    return {**record, "head": str(out)}


def publish_head(src: Path, out: Path, info) -> None:
    """Put the stage's adapter (or full model) and head.json into the head folder, atomically.
    Files are hard-linked where the file system allows, so a full head costs no second copy."""
    from medllava.heads import write_head_info
    from medllava.io import atomic_dir

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=link_or_copy)
        write_head_info(tmp, info)
