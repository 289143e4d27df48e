"""Benchmark and in-house questions as training conversations for a task head.

Each question becomes one record, `{"id", "image", "conversations": [human, gpt]}`, whose human
turn is `<image>` and the question in the head's prompt style (`medllava.question_styles.format_question`,
the same function evaluation asks with) and whose reply is the dataset's answer. A closed answer
that is one of the head's closed options up to case and spaces is written as the option is spelled
("Yes", "yes" and "YES" all become "yes"): releases mix spellings (VQA-RAD's training split has
"No" 738, "Yes" 513, "yes" 315, "no" 146 times), and a model taught several spellings of one answer
splits that answer's probability between them, so greedy decoding leans to the answer whose
spelling is most uniform instead of the likelier answer.

Images: a DICOM series folder becomes its middle slice (`medllava.commands.chat.series_slice`); an image
stored inside the release file (parquet releases) is written once under `bytes_dir`, named by the
hash of its bytes. Record image paths are relative to the common folder of all images, which is
returned as the image root, so absolute in-house paths and relative benchmark paths work alike.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from medllava.io import atomic_open
from medllava.question_styles import format_question
from medllava.records import GPT, HUMAN, IMAGE_PLACEHOLDER


@dataclass
class TaskRecords:
    """Conversation records of one split, their image root, and what could not be used."""

    records: list[dict]
    image_root: Path | None
    skipped: list[str] = field(default_factory=list)


def conversation(question: str, answer: str) -> list[dict]:
    return [{"from": HUMAN, "value": f"{IMAGE_PLACEHOLDER}\n{question}"}, {"from": GPT, "value": answer}]


def task_records(task, prompt_style: str, closed_options: list[str], bytes_dir: Path) -> TaskRecords:
    """Records for every example of `task` (an `medllava.eval.tasks.Task`), asked in `prompt_style`.

    An example whose image folder holds no usable DICOM series is skipped and named in `skipped`;
    missing image files are left to the training data check, which counts and reports them.
    """
    kept, skipped = [], []
    for ex in task:
        try:
            kept.append((ex, image_file(task, ex, bytes_dir)))
        except OSError as e:
            skipped.append(f"{task.source}: question {ex.qid}: {e}")
    if not kept:
        return TaskRecords([], None, skipped)
    root = Path(os.path.commonpath([path.parent for _, path in kept]))
    records = [
        {
            "id": ex.qid,
            "image": path.relative_to(root).as_posix(),
            "conversations": conversation(
                format_question(ex.question, prompt_style, ex.answer_type, tuple(closed_options)),
                reply(ex.answer, ex.answer_type, closed_options),
            ),
        }
        for ex, path in kept
    ]
    return TaskRecords(records, root, skipped)


def reply(answer: str, answer_type: str, closed_options: list[str]) -> str:
    """The answer as trained: a closed answer matching a closed option (case and spaces aside) is
    spelled as the option; every other answer is kept as the dataset has it."""
    from medllava.eval.tasks import CLOSED

    if answer_type == CLOSED:
        for option in closed_options:
            if answer.strip().lower() == option.strip().lower():
                return option
    return answer


def image_file(task, example, bytes_dir: Path) -> Path:
    """The absolute path of the image file an example is asked about."""
    from medllava.commands.chat import series_slice

    if example.image_bytes is not None:
        digest = hashlib.sha256(example.image_bytes).hexdigest()[:24]
        path = Path(bytes_dir) / f"{digest}{Path(example.image or '').suffix or '.img'}"
        if not path.is_file():
            with atomic_open(path, "wb") as f:
                f.write(example.image_bytes)
        return path.resolve()
    path = task.image_path(example)
    if path is None:
        raise FileNotFoundError("the release names no image for this question")
    path = Path(os.path.abspath(path))
    return series_slice(path) if path.is_dir() else path
