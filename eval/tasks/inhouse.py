"""In-house VQA sets: a CSV (with a header line) or JSONL file per split.

Columns / keys:
  image (or image_path)  path to the image, DICOM allowed; relative paths are relative to
                         the task root (the CLI uses the file's folder when no root is given)
  question, answer       text; numeric answers are kept as their text
  answer_type            optional OPEN/CLOSED; when missing, yes/no answers are closed
  qid (or id)            optional; defaults to the record number (1-based)
  anything else          kept in meta (patient_id, study_id, modality, organ, ...)

Files are found as `<root>/<split>.csv`, `<split>.jsonl` or `<split>.json`, or given as `file=`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medllava.io import DataError

from medllava.eval.tasks import formats
from medllava.eval.tasks.base import Example, Task, answer_text, parse_answer_type, require_text

_EXTENSIONS = (".csv", ".jsonl", ".json")
_PROMOTED = ("qid", "id", "question", "answer", "answer_type", "image", "image_path")


class InHouse(Task):
    name = "inhouse"
    breakdowns = {"modality": "modality", "organ": "organ", "question type": "question_type"}

    def _check_split(self, split: str) -> str:
        # In-house sets name their splits freely; the split only picks the file.
        if not split or "/" in split or "\\" in split:
            raise ValueError(f"inhouse: invalid split name {split!r}")
        return split

    def _find_file(self) -> Path:
        for ext in _EXTENSIONS:
            path = self.root / f"{self.split}{ext}"
            if path.exists():
                return path
        raise FileNotFoundError(f"inhouse: no {self.split}.csv / {self.split}.jsonl / {self.split}.json under {self.root}")

    def _records(self, path: Path) -> Iterator[tuple[str, dict]]:
        for number, (where, raw) in enumerate(formats.records(path), start=1):
            if isinstance(raw, dict):
                raw = {"_number": number, **raw}
            yield where, raw

    def _example(self, raw: dict, where: str) -> Example:
        number = raw.pop("_number")
        image = raw.get("image") if raw.get("image") is not None else raw.get("image_path")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: missing 'image' (or 'image_path')")
        qid = raw.get("qid") if raw.get("qid") is not None else raw.get("id")
        answer = answer_text(raw.get("answer"), where)
        return Example(
            qid=str(qid).strip() if qid is not None else str(number),
            question=require_text(raw, "question", where),
            answer=answer,
            answer_type=parse_answer_type(raw.get("answer_type"), answer, where),
            image=image.strip(),
            meta={k: v for k, v in raw.items() if k not in _PROMOTED},
        )
