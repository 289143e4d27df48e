"""`medllava eval score`: score an existing prediction file on a benchmark task.

    medllava eval score --task vqa-rad --root data/vqa_rad --pred preds.jsonl \\
        --json out/vqa_rad.json --report out/vqa_rad.md

Writes the metrics JSON (strict and LLaVA-Med-compatible families side by side, with
bootstrap intervals and breakdowns), and optionally a Markdown report with PNG plots and
a per-question JSONL. Prediction formats and pairing are described in `medllava.eval.predictions`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def register(subparsers) -> None:
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
    p.add_argument("-o", "--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="task option, e.g. lang=zh (SLAKE) or source=official (VQA-RAD, PathVQA)")
    p.add_argument("--candidates", type=Path, help="LLaVA-Med candidate answer list (JSON list, or "
                   "{\"0\": [...]}) for its candidate-matching open accuracy")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable ground-truth records instead of stopping")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)


def load_candidates(path: Path) -> list:
    from medllava.io import DataError

    from medllava.eval.tasks.formats import json_object

    obj = json_object(path)
    if isinstance(obj, dict) and "0" in obj:
        obj = obj["0"]  # LLaVA-Med keeps its list under the key "0"
    if not isinstance(obj, list) or not obj:
        raise DataError(f"{path}: expected a non-empty JSON list of candidate answers (or {{\"0\": [...]}})")
    return obj


def print_summary(results: dict) -> None:
    s, m = results["strict"], results["llava_med"]
    for label, metric in (("strict closed accuracy", s.get("closed_accuracy")),
                          ("strict open token F1", s.get("open_f1")),
                          ("LLaVA-Med closed accuracy", m.get("closed_accuracy")),
                          ("LLaVA-Med open recall", m.get("open_recall"))):
        if metric and metric["value"] is not None:
            ci = f" [{100 * metric['ci95'][0]:.2f}, {100 * metric['ci95'][1]:.2f}]" if metric["ci95"] else ""
            print(f"{label}: {100 * metric['value']:.2f}{ci} (n={metric['n']})")


def score_predictions(task, pred_path: Path, *, examples=None, candidates=None, n_boot: int = 1000,
                      seed: int = 0) -> tuple[dict, list[dict]]:
    """Read, pair and score a prediction file on `task` (or on `examples`, some of its questions).

    Returns `(results, items)`: the metrics JSON (with the run's own fields) and per-question scores.
    """
    from medllava.eval.predictions import pair_predictions, read_predictions
    from medllava.eval.scoring import score_examples

    examples = task.examples if examples is None else examples
    preds = read_predictions(pred_path)
    pairing = pair_predictions(examples, preds)
    if pairing.missing:
        log.warning("%d of %d questions have no prediction; they are scored as empty answers",
                    len(pairing.missing), len(examples))
    log.info("scoring %d %s questions (%s)", len(examples), task.name, pairing.note)
    results, items = score_examples(examples, pairing.texts, categories=task.categories,
                                    candidates=candidates, n_boot=n_boot, seed=seed)
    results = {
        "task": task.name,
        "split": task.split,
        "source": str(task.source),
        "predictions": str(pred_path),
        "prediction_format": preds.format,
        "pairing": {"method": pairing.method, "note": pairing.note, "missing": pairing.missing,
                    "skipped_rows": preds.skipped},
        "skipped_ground_truth": task.skipped,
        **results,
    }
    return results, items


def run(args: argparse.Namespace) -> int:
    from medllava.io import atomic_write_json, write_jsonl

    from medllava.eval.report import write_report
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
    results, items = score_predictions(task, args.pred, candidates=candidates, n_boot=args.bootstrap, seed=args.seed)
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
