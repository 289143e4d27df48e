"""Precision and recall of the modality classifier per label on a hand-labelled caption set.

    python -m medllava.curation.modality_eval tests/assets/curation/modality_labelled.jsonl [--rules FILE]

The set is JSONL: `{"id", "caption", "mentions", "labels": [...]}`. A record counts once per label:
predicted and true (tp), predicted only (fp), true only (fn).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medllava.io import read_jsonl

from medllava.curation.modality import LABELS, ModalityClassifier, load_rules


def per_label(gold: list[set[str]], pred: list[set[str]], labels=LABELS) -> dict[str, dict[str, float]]:
    """{label: {precision, recall, support, tp, fp, fn}}; an empty denominator gives 0.0.

    >>> per_label([{"mri"}, {"ct_scan"}], [{"mri"}, {"mri"}])["mri"]["precision"]
    0.5
    """
    out = {}
    for label in labels:
        tp = sum(label in g and label in p for g, p in zip(gold, pred))
        fp = sum(label not in g and label in p for g, p in zip(gold, pred))
        fn = sum(label in g and label not in p for g, p in zip(gold, pred))
        out[label] = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
                      "support": tp + fn, "tp": tp, "fp": fp, "fn": fn}
    return out


def evaluate(path: str | Path, classifier: ModalityClassifier) -> tuple[dict, list[tuple[str, set, set]]]:
    """Per-label metrics on a labelled file, and the (id, gold, predicted) of every wrong record."""
    gold, pred, wrong = [], [], []
    for lineno, row in read_jsonl(path):
        truth = set(row["labels"])
        got = set(classifier.classify(row.get("caption") or "", row.get("mentions") or ()).modalities)
        gold.append(truth)
        pred.append(got)
        if truth != got:
            wrong.append((row.get("id", f"line {lineno}"), truth, got))
    return per_label(gold, pred), wrong


def format_table(metrics: dict) -> str:
    lines = [f"{'label':<12}{'precision':>10}{'recall':>8}{'support':>9}"]
    for label, m in metrics.items():
        lines.append(f"{label:<12}{m['precision']:>10.2f}{m['recall']:>8.2f}{m['support']:>9d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labelled", type=Path, help="labelled captions (JSONL)")
    parser.add_argument("--rules", action="append", default=[], help="extra rules YAML")
    parser.add_argument("--min-confidence", type=float, default=0.5)
    args = parser.parse_args(argv)
    metrics, wrong = evaluate(args.labelled, ModalityClassifier(load_rules(args.rules), args.min_confidence))
    print(format_table(metrics))
    for rid, truth, got in wrong:
        print(f"  wrong: {rid}: true {sorted(truth)}, predicted {sorted(got)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
