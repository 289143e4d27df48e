"""Benchmark tasks, one small module each on the common `Task` base.

    task = load_task("vqa-rad", "/data/vqa_rad", "test")
    for ex in task:  # Example(qid, question, answer, answer_type, image, meta)
        ...

Options are passed through to the task: `file=` (read this file instead of finding the
split under root), `skip_bad=True`, and per task `source=` (VQA-RAD, PathVQA: which
release) and `lang=` (SLAKE: en, zh or all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medllava.eval.tasks.base import CLOSED, OPEN, Example, Task
from medllava.eval.tasks.inhouse import InHouse
from medllava.eval.tasks.pathvqa import PathVqa
from medllava.eval.tasks.slake import Slake
from medllava.eval.tasks.vqa_rad import VqaRad

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (VqaRad, Slake, PathVqa, InHouse)}

__all__ = ["CLOSED", "OPEN", "TASKS", "Example", "Task", "load_task"]


def load_task(name: str, root: str | Path, split: str = "test", **options: Any) -> Task:
    """Load one split of the task called `name` (vqa-rad, slake, pathvqa, inhouse)."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None
    return cls(root, split, **options)
