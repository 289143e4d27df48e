"""What every scoring protocol shares: the `Protocol` and `Defect` records and the score dict.

A protocol is one published harness's way of turning answers into numbers, named by the harness
repository, the file and the commit it matches. Its `score` is a pure function

    score(examples, predictions, task, fixes) -> Scores

where `examples` are `medllava.eval.tasks.Example`s (gold answer, answer type, question, meta),
`predictions[i]` answers `examples[i]`, `task` is the task name ("vqa-rad", "slake", ...) and
`fixes` names the harness defects to correct (empty: the harness's own numbers). `Scores` is plain
JSON: closed, open and overall accuracy as fractions (None where the harness reports none), the
number of closed and open questions the harness counted, and its other numbers under "metrics".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from medllava.eval.tasks.base import Example

Scores = dict  # {"closed", "open", "overall", "n_closed", "n_open", "metrics": {...}}
ScoreFn = Callable[[Sequence[Example], Sequence[str], str, Collection[str]], Scores]
YES_NO = ("yes", "no")


@dataclass(frozen=True)
class Defect:
    """A known defect of a harness, and the number it moves.

    name: the key passed in `fixes` to correct it. metric: the Scores key ("closed", "open",
    "overall") or "metrics.<name>" that shows it. tasks: the tasks where it applies.
    computable: False where showing it needs something medllava does not run (the LLM judge).
    """

    name: str
    description: str
    metric: str
    tasks: tuple[str, ...]
    computable: bool = True


@dataclass(frozen=True)
class Protocol:
    """One harness's scoring protocol; see the module docstring for `score`."""

    name: str
    harness: str
    repository: str
    commit: str
    file: str
    closed_rule: str
    comparable_to: str
    tasks: tuple[str, ...]
    defects: tuple[Defect, ...]
    score: ScoreFn


def scores(closed: list[bool], open_: list[bool], overall: float | None = None, *,
           with_overall: bool = True, **metrics: float | int | None) -> Scores:
    """The Scores dict from per-question right/wrong lists; overall defaults to all questions pooled."""
    if with_overall and overall is None and (closed or open_):
        overall = (sum(closed) + sum(open_)) / (len(closed) + len(open_))
    return {"closed": fraction(closed), "open": fraction(open_), "overall": overall if with_overall else None,
            "n_closed": len(closed), "n_open": len(open_), "metrics": metrics}


def fraction(values: Sequence[bool | float]) -> float | None:
    """Mean of `values`, None when there are none."""
    return sum(values) / len(values) if values else None


def gold_is_yes_no(example: Example) -> bool:
    """The closed rule of harnesses that read the gold answer: it is "yes" or "no" (any case, spaces)."""
    return example.answer.lower().strip() in YES_NO


def metric_value(result: Scores, metric: str) -> float | int | None:
    """`result[metric]`, or `result["metrics"][name]` for "metrics.<name>"."""
    if metric.startswith("metrics."):
        return result["metrics"].get(metric.removeprefix("metrics."))
    return result[metric]
