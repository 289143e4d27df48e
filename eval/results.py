"""The results of scoring predictions on a task's questions: the whole metrics.json dict and the
per-question items, for `eval score` (a file) and `eval run` (the answers it holds in memory).

`score_predictions(task, predictions)` pairs the predictions with the questions and returns
`(results, items)`; `results` is plain JSON:
  task, split, source   the questions scored and the ground truth they came from
  predictions           the prediction file; prediction_format, "medllava" or "llava-med"
  pairing               {"method", "note", "missing", "skipped_rows"} (see `medllava.eval.predictions`)
  skipped_ground_truth  ground-truth records the task loader skipped
  n, n_closed, n_open
  strict, llava_med     {metric: {"value", "ci95": [lo, hi], "n"}}, values as fractions
                        (LLaVA-Med prints percentages); "n_scored" where the metric leaves
                        questions out (the gated closed accuracy)
  breakdowns            {breakdown: {category: summary}}, "answer type" first; a summary has
                        n, n_closed, n_open and the strict and LLaVA-Med headline numbers
  confusion             {"rows", "columns", "matrix"}: rows are the normalized closed truths,
                        columns the strict answer read from the prediction ("(none)" when no
                        option was found; answers past the commonest few fold into "(other)")
  bootstrap             {"n_boot", "seed", "level"}
  protocols             {protocol: entry}: the other harnesses' scoring protocols, as each harness
                        computes them and corrected, with their defects (`medllava.eval.protocols`)
  run                   `eval run` only: the settings that made the answers and what the run did
`score_examples` builds the part from n to bootstrap from paired texts alone.
`items` holds one record per question with its per-question scores in both families.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

from medllava.eval.metrics import llava_med, strict
from medllava.eval.metrics.stats import bootstrap_ci, mean
from medllava.eval.predictions import PredictionFile, pair_predictions
from medllava.eval.protocols import score_protocols
from medllava.eval.tasks.base import CLOSED, OPEN, Example, Task

log = logging.getLogger(__name__)

# Family metric -> per-question key; order is the order of the report tables.
STRICT_METRICS = {"closed_accuracy": "closed_accuracy", "open_exact_match": "open_exact_match",
                  "open_f1": "open_f1", "overall_accuracy": "correct"}
LLAVA_MED_METRICS = ("closed_accuracy", "closed_accuracy_gated", "closed_recall", "open_recall", "open_hit",
                     "open_candidate_accuracy", "exact_match", "f1", "precision", "bleu", "bleu_1", "bleu_2", "bleu_3")
CONFUSION_LABELS = 8  # commonest closed answers shown; the rest fold into "(other)"
NONE_LABEL, OTHER_LABEL = "(none)", "(other)"


def score_item(example: Example, prediction: str, choices: Sequence[str], candidates: Sequence | None) -> dict:
    """One question's record: truth, prediction and its per-question scores in both families."""
    return {
        "qid": example.qid,
        "answer_type": example.answer_type,
        "truth": example.answer,
        "prediction": prediction,
        "strict": strict.item_scores(prediction, example.answer, example.answer_type, choices),
        "llava_med": llava_med.item_scores(prediction, example.answer, example.answer_type, candidates),
    }


def _metric(values: list, n_boot: int, seed: int) -> dict:
    """{"value", "ci95", "n"} of per-question values (None where the metric leaves a question out)."""
    out = {"value": mean(values), "ci95": bootstrap_ci(values, n_boot=n_boot, seed=seed), "n": len(values)}
    scored = sum(v is not None for v in values)
    if scored != len(values):
        out["n_scored"] = scored
    return out


def _family(items: list[dict], family: str, keys: dict[str, str], n_boot: int, seed: int) -> dict:
    """{metric: _metric} for the metrics of one family that some question has."""
    out = {}
    for name, key in keys.items():
        values = [it[family][key] for it in items if key in it[family]]
        if values:
            out[name] = _metric(values, n_boot, seed)
    return out


def summarize(items: list[dict]) -> dict:
    """The headline numbers of a subset of questions, without intervals."""
    def avg(family: str, key: str) -> float | None:
        return mean([it[family][key] for it in items if key in it[family]])

    return {
        "n": len(items),
        "n_closed": sum(it["answer_type"] == CLOSED for it in items),
        "n_open": sum(it["answer_type"] == OPEN for it in items),
        "strict_closed_accuracy": avg("strict", "closed_accuracy"),
        "strict_open_exact_match": avg("strict", "open_exact_match"),
        "strict_open_f1": avg("strict", "open_f1"),
        "llava_med_closed_accuracy": avg("llava_med", "closed_accuracy"),
        "llava_med_open_recall": avg("llava_med", "open_recall"),
    }


def breakdowns(items: list[dict], categories: list[dict[str, list[str]]]) -> dict:
    """{breakdown name: {category: summary}}, by answer type and by each dataset label."""
    groups: dict[str, dict[str, list[dict]]] = {"answer type": {}}
    for item, cats in zip(items, categories, strict=True):
        groups["answer type"].setdefault(item["answer_type"], []).append(item)
        for name, values in cats.items():
            for value in values:
                groups.setdefault(name, {}).setdefault(value, []).append(item)
    return {name: {cat: summarize(group[cat]) for cat in sorted(group, key=lambda c: (-len(group[c]), c))}
            for name, group in groups.items()}


def confusion(items: list[dict]) -> dict:
    """Closed-question counts: normalized truth (rows) against the strict answer read (columns)."""
    closed = [it for it in items if it["answer_type"] == CLOSED]
    if not closed:
        return {"rows": [], "columns": [], "matrix": []}
    truths = [strict.normalize(it["truth"]) for it in closed]
    common = [label for label, _ in Counter(truths).most_common(CONFUSION_LABELS)]
    kept = set(common)
    y_true = [t if t in kept else OTHER_LABEL for t in truths]
    choices = [it["strict"]["choice"] for it in closed]
    y_pred = [NONE_LABEL if c is None else c if c in kept else OTHER_LABEL for c in choices]
    rows = common + ([OTHER_LABEL] if OTHER_LABEL in y_true else [])
    columns = rows + [x for x in (OTHER_LABEL, NONE_LABEL) if x in y_pred and x not in rows]
    counts = Counter(zip(y_true, y_pred))
    matrix = [[counts[(r, c)] for c in columns] for r in rows]
    return {"rows": rows, "columns": columns, "matrix": matrix}


def score_examples(examples: Sequence[Example], predictions: Sequence[str], *,
                   categories: Callable[[Example], dict[str, list[str]]] | None = None,
                   candidates: Sequence | None = None, n_boot: int = 1000, seed: int = 0,
                   task: str | None = None) -> tuple[dict, list[dict]]:
    """Score `predictions[i]` as the answer to `examples[i]`: the results from n to protocols (see the
    module docstring) and the per-question items. `task` (a task name) picks the protocols that apply."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    # Strict closed answers are read against every closed answer of the task, so a
    # prediction naming another option of the same kind ("CT" for "MRI") counts as that option.
    choices = sorted({ex.answer for ex in examples if ex.answer_type == CLOSED})
    items = [score_item(ex, pred, choices, candidates) for ex, pred in zip(examples, predictions)]
    cats = [categories(ex) if categories else {} for ex in examples]
    results = {
        "n": len(items),
        "n_closed": sum(ex.answer_type == CLOSED for ex in examples),
        "n_open": sum(ex.answer_type == OPEN for ex in examples),
        "strict": _family(items, "strict", STRICT_METRICS, n_boot, seed),
        "llava_med": _family(items, "llava_med", {k: k for k in LLAVA_MED_METRICS}, n_boot, seed),
        "breakdowns": breakdowns(items, cats),
        "confusion": confusion(items),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95},
        "protocols": score_protocols(examples, predictions, task),
    }
    for item, cat in zip(items, cats):
        item["categories"] = cat
    return results, items


def score_predictions(task: Task, predictions: PredictionFile, *, examples: Sequence[Example] | None = None,
                      candidates: Sequence | None = None, n_boot: int = 1000, seed: int = 0,
                      run: dict | None = None) -> tuple[dict, list[dict]]:
    """Pair `predictions` with the questions of `task` (or `examples`, some of them) and score them.

    Returns `(results, items)`: the whole metrics.json dict (with `run`, an eval run's own facts, last
    when given) and the per-question scores.
    """
    examples = task.examples if examples is None else examples
    pairing = pair_predictions(examples, predictions)
    if pairing.missing:
        log.warning("%d of %d questions have no prediction; they are scored as empty answers",
                    len(pairing.missing), len(examples))
    log.info("scoring %d %s questions (%s)", len(examples), task.name, pairing.note)
    scores, items = score_examples(examples, pairing.texts, categories=task.categories,
                                   candidates=candidates, n_boot=n_boot, seed=seed, task=task.name)
    results = {
        "task": task.name,
        "split": task.split,
        "source": str(task.source),
        "predictions": str(predictions.path),
        "prediction_format": predictions.format,
        "pairing": {"method": pairing.method, "note": pairing.note, "missing": pairing.missing,
                    "skipped_rows": predictions.skipped},
        "skipped_ground_truth": task.skipped,
        **scores,
    }
    if run is not None:
        results["run"] = run
    return results, items
