"""VQA-RAD: 3515 clinician-written questions on 315 radiology images (head CT/MRI, chest
X-ray, abdominal CT).

Three releases are read, chosen with `source=` ("auto" tries them in this order):
  mevf      `trainset.json` / `testset.json`: the split nearly every paper reports
            (3064 train / 451 test; the test set has 179 open and 272 closed questions).
  official  `VQA_RAD_Dataset_Public.json` (OSF): 2248 questions in one file; the test set is
            the questions whose `phrase_type` starts with "test_" (test_freeform, test_para),
            the same 451 questions as the MEVF test set.
  parquet   the Hugging Face release (`data/<split>-*.parquet`: image{bytes,path}, question,
            answer); it has no answer type, so yes/no answers count as closed.

Images are `<image_dir>/<image_name>`, with `image_dir` the first of `images/` and
`VQA_RAD Image Folder/` (the official zip's name) that exists under the root.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medllava.io import DataError

from medllava.eval.tasks import formats
from medllava.eval.tasks.base import Example, Task, answer_text, parse_answer_type, require_text

OFFICIAL_NAMES = ("VQA_RAD_Dataset_Public.json", "VQA_RAD Dataset Public.json")
IMAGE_DIRS = ("images", "VQA_RAD Image Folder")
# Fields promoted out of `meta` into the Example itself.
_PROMOTED = ("qid", "question", "answer", "answer_type", "image_name")


class VqaRad(Task):
    name = "vqa-rad"
    splits = ("train", "test")
    breakdowns = {"question type": "question_type", "organ": "image_organ"}
    # VQA-RAD tags some questions with two types, e.g. "POS, PRES".
    multi_valued = frozenset({"question type"})
    known_options = frozenset({"source"})

    def _find_file(self) -> Path:
        candidates = {
            "mevf": [self.root / f"{self.split}set.json"],
            "official": [self.root / name for name in OFFICIAL_NAMES],
            "parquet": [formats.find_parquet(self.root, self.split)],
        }
        return self._first_release(
            candidates, f"{self.split}set.json, {OFFICIAL_NAMES[0]}, data/{self.split}-*.parquet")

    def _records(self, path: Path) -> Iterator[tuple[str, dict]]:
        self._image_dir = next((d for d in IMAGE_DIRS if (self.root / d).is_dir()), IMAGE_DIRS[0])
        self._official = None
        for where, raw in formats.json_records(path):
            if self._official is None and isinstance(raw, dict):
                # The official file holds both splits; the MEVF files hold one each.
                self._official = path.name in OFFICIAL_NAMES or "qid_linked_id" in raw
            yield where, raw

    def _example(self, raw: dict, where: str) -> Example | None:
        if self._official:
            phrase = raw.get("phrase_type")
            if not isinstance(phrase, str):
                raise DataError(f"{where}: missing 'phrase_type' (needed to tell test from train questions)")
            if phrase.startswith("test_") != (self.split == "test"):
                return None
        if raw.get("qid") is None:
            raise DataError(f"{where}: missing 'qid'")
        answer = answer_text(raw.get("answer"), where)
        image = require_text(raw, "image_name", where)
        meta = {k: v for k, v in raw.items() if k not in _PROMOTED}
        return Example(
            qid=str(raw["qid"]).strip(),
            question=require_text(raw, "question", where),
            answer=answer,
            answer_type=parse_answer_type(raw.get("answer_type"), answer, where),
            image=f"{self._image_dir}/{image}",
            meta=meta,
        )
