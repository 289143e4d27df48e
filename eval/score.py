"""`medllava eval score`: score an existing prediction file on a benchmark task.

    medllava eval score --task vqa-rad --root data/vqa_rad --pred preds.jsonl \\
        --json out/vqa_rad.json --report out/vqa_rad.md

Writes the metrics JSON (strict and LLaVA-Med-compatible families side by side, with
bootstrap intervals and breakdowns, and the other harnesses' protocols from `medllava.eval.protocols`;
built by `medllava.eval.results`), and optionally a
Markdown report with PNG plots and a per-question JSONL. Prediction formats (taken from the
file's rows) and pairing are described in `medllava.eval.predictions`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medllava.eval.options import add_task_options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `score` to the `medllava eval` subcommands."""
    from medllava.eval.tasks import TASKS  # light: the loaders import pyarrow only when reading parquet

    p = subparsers.add_parser(
        "score",
        help="score a prediction file on a benchmark task",
        description="Score predictions (medllava JSONL or LLaVA-Med answer files) on VQA-RAD, SLAKE, "
                    "PathVQA or an in-house set, with strict and LLaVA-Med-compatible metrics.",
    )
    p.add_argument("--task", required=True, choices=list(TASKS), help="benchmark task")
    p.add_argument("--pred", required=True, type=Path, help="prediction file (JSONL or JSON array)")
    p.add_argument("--gt", type=Path, help="ground-truth file to read instead of the split under --root "
                   "(the task's own format, or a LLaVA conversation-format test.json)")
    p.add_argument("--root", type=Path, help="dataset folder (default: the folder of --gt)")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--json", required=True, type=Path, help="where to write the metrics JSON")
    p.add_argument("--report", type=Path, help="where to write a Markdown report (plots go beside it)")
    p.add_argument("--items", type=Path, help="where to write per-question scores (JSONL)")
    add_task_options(p)
    p.add_argument("--candidates", type=Path, help="LLaVA-Med candidate answer list (JSON list, or "
                   "{\"0\": [...]}) for its candidate-matching open accuracy")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable ground-truth records instead of stopping")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)


def load_candidates(path: Path) -> list:
    """LLaVA-Med's candidate answer list: a JSON list, or one kept under the key "0"."""
    from medllava.io import DataError

    from medllava.eval.tasks.formats import json_object

    obj = json_object(path)
    if isinstance(obj, dict) and "0" in obj:
        obj = obj["0"]  # LLaVA-Med keeps its list under the key "0"
    if not isinstance(obj, list) or not obj:
        raise DataError(f"{path}: expected a non-empty JSON list of candidate answers (or {{\"0\": [...]}})")
    return obj


def run(args: argparse.Namespace) -> int:
    """Read the task and the prediction file, score, write the requested files and print the headline."""
    from medllava.io import atomic_write_json, write_jsonl

    from medllava.eval.predictions import read_predictions
    from medllava.eval.report import print_summary, write_report
    from medllava.eval.results import score_predictions
    from medllava.eval.tasks import load_task

    root = args.root or (args.gt.parent if args.gt else None)
    if root is None:
        raise ValueError("give the dataset folder with --root, or a ground-truth file with --gt")
    options = dict(args.option)
    for reserved, flag in (("file", "--gt"), ("skip_bad", "--skip-bad")):
        if reserved in options:
            raise ValueError(f"give {reserved} with {flag}, not as -o {reserved}=...")
    task = load_task(args.task, root, args.split, file=args.gt, skip_bad=args.skip_bad, **options)
    candidates = load_candidates(args.candidates) if args.candidates else None
    predictions = read_predictions(args.pred)
    results, items = score_predictions(task, predictions, candidates=candidates, n_boot=args.bootstrap, seed=args.seed)
    atomic_write_json(args.json, results)
    written = [args.json]
    if args.items:
        write_jsonl(args.items, items)
        written.append(args.items)
    if args.report:
        written += write_report(results, args.report)
    print_summary(results)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
