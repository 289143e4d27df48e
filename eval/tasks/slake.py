"""SLAKE 1.0: bilingual (English/Chinese) radiology VQA with organ, modality and content
labels.

Release layout: `train.json`, `validate.json`, `test.json` and `imgs/xmlabN/source.jpg`.
Each record: img_id, img_name, question, answer, q_lang (en|zh), location, modality,
answer_type (OPEN|CLOSED), base_type, content_type, triple, qid.

English questions by default (the English test set has 1061); `lang="zh"` selects the
Chinese ones and `lang="all"` both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medllava.io import DataError

from medllava.eval.tasks import formats
from medllava.eval.tasks.base import Example, Task, answer_text, parse_answer_type, require_text

LANGS = ("en", "zh", "all")
_SPLIT_ALIASES = {"val": "validate", "validation": "validate"}
_PROMOTED = ("qid", "question", "answer", "answer_type", "img_name")


class Slake(Task):
    name = "slake"
    splits = ("train", "validate", "test")
    breakdowns = {"content type": "content_type", "organ": "location", "modality": "modality",
                  "language": "q_lang"}
    known_options = frozenset({"lang"})

    def _check_split(self, split: str) -> str:
        return super()._check_split(_SPLIT_ALIASES.get(split, split))

    def _find_file(self) -> Path:
        path = self.root / f"{self.split}.json"
        if not path.exists():
            raise FileNotFoundError(f"slake: {path} does not exist (expected the SLAKE 1.0 release layout: "
                                    "train.json, validate.json, test.json, imgs/)")
        return path

    def _records(self, path: Path) -> Iterator[tuple[str, dict]]:
        self._lang = self.options.get("lang", "en")
        if self._lang not in LANGS:
            raise ValueError(f"slake: unknown lang {self._lang!r}; choose from {', '.join(LANGS)}")
        return formats.json_records(path)

    def _example(self, raw: dict, where: str) -> Example | None:
        lang = raw.get("q_lang")
        if lang not in ("en", "zh"):
            raise DataError(f"{where}: q_lang must be 'en' or 'zh', got {lang!r}")
        if self._lang != "all" and lang != self._lang:
            return None
        if raw.get("qid") is None:
            raise DataError(f"{where}: missing 'qid'")
        answer = answer_text(raw.get("answer"), where)
        return Example(
            qid=str(raw["qid"]).strip(),
            question=require_text(raw, "question", where),
            answer=answer,
            answer_type=parse_answer_type(raw.get("answer_type"), answer, where),
            image=f"imgs/{require_text(raw, 'img_name', where)}",
            meta={k: v for k, v in raw.items() if k not in _PROMOTED},
        )
