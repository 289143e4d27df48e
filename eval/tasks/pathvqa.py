"""PathVQA: questions generated from pathology textbook and PEIR figure captions; about half
are yes/no, and in every release the yes/no questions are the closed ones.

Releases read, chosen with `source=` ("auto" tries them in this order):
  lxmert   the LXMERT-style JSON `pvqa_<split>.json` (or `<split>.json`): a list of
           {img_id, sentf: {pvqa: [question, ...]}, labelf: {pvqa: [{answer: score}, ...]}},
           questions grouped per image; qids are `<img_id>-<position in the group>`.
  pickle   the original pickles: `qas/<split>_vqa.pkl` ({img_id, sent, label, answer_type,
           question_type, question_id}) or `qas/<split>/<split>_qa.pkl` ({image, question,
           answer}; qids `<split>-<record number>`). They are read with a restricted
           unpickler that refuses anything but plain data.
  parquet  the Hugging Face release (`data/<split>-*.parquet`: image{bytes,path}, question, answer).

Images are `images/<split>/<img_id>.jpg`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medllava.io import DataError

from medllava.eval.tasks import formats
from medllava.eval.tasks.base import Example, Task, answer_text, infer_answer_type

_SPLIT_ALIASES = {"validate": "val", "validation": "val"}


def _best_label(label, where: str) -> str:
    """The highest-scoring answer of a `{answer: score}` label."""
    if not isinstance(label, dict) or not label:
        raise DataError(f"{where}: expected a non-empty {{answer: score}} label, got {label!r}")
    return answer_text(max(label.items(), key=lambda kv: kv[1])[0], where)


class PathVqa(Task):
    name = "pathvqa"
    splits = ("train", "val", "test")
    breakdowns = {"question type": "question_type"}
    known_options = frozenset({"source"})

    def _check_split(self, split: str) -> str:
        return super()._check_split(_SPLIT_ALIASES.get(split, split))

    def _find_file(self) -> Path:
        s, root = self.split, self.root
        candidates = {
            "lxmert": [root / f"pvqa_{s}.json", root / f"{s}.json"],
            "pickle": [root / "qas" / f"{s}_vqa.pkl", root / "qas" / s / f"{s}_qa.pkl"],
            "parquet": [formats.find_parquet(root, s)],
        }
        return self._first_release(candidates, f"pvqa_{s}.json, qas/{s}_vqa.pkl, qas/{s}/{s}_qa.pkl, data/{s}-*.parquet")

    def _records(self, path: Path) -> Iterator[tuple[str, dict]]:
        if path.suffix.lower() in (".pkl", ".pickle"):
            for index, (where, raw) in enumerate(formats.pickle_records(path)):
                yield where, {"_index": index, **raw} if isinstance(raw, dict) else raw
            return
        for where, group in formats.json_records(path):
            yield from self._ungroup(group, where)

    def _ungroup(self, group, where: str) -> Iterator[tuple[str, dict]]:
        """One record per question of an LXMERT-style image group."""
        if not isinstance(group, dict):
            yield where, group
            return
        try:
            questions = group["sentf"]["pvqa"]
            labels = group["labelf"]["pvqa"]
        except (KeyError, TypeError):
            yield where, formats.error_record(f"{where}: expected sentf.pvqa and labelf.pvqa lists")
            return
        if not isinstance(questions, list) or not isinstance(labels, list) or len(questions) != len(labels):
            n_q = len(questions) if isinstance(questions, list) else "?"
            n_l = len(labels) if isinstance(labels, list) else "?"
            yield where, formats.error_record(f"{where}: {n_q} questions but {n_l} labels")
            return
        for j, (question, label) in enumerate(zip(questions, labels)):
            yield f"{where} question {j}", {"img_id": group.get("img_id"), "sent": question, "label": label,
                                            "_position": j}

    def _example(self, raw: dict, where: str) -> Example:
        if "sent" in raw:
            return self._vqa_example(raw, where)
        if "image" in raw and "question" in raw:
            return self._qa_example(raw, where)
        raise DataError(f"{where}: not a PathVQA record (expected sent/label or image/question/answer keys)")

    def _vqa_example(self, raw: dict, where: str) -> Example:
        """An LXMERT-style question, from the grouped JSON or from `<split>_vqa.pkl`."""
        img_id = raw.get("img_id")
        if not isinstance(img_id, str) or not img_id:
            raise DataError(f"{where}: missing 'img_id'")
        question = raw.get("sent")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: missing or empty question")
        answer = _best_label(raw.get("label"), where)
        if "question_id" in raw:
            qid = str(raw["question_id"])
        elif "_position" in raw:
            qid = f"{img_id}-{raw['_position']}"
        else:
            raise DataError(f"{where}: missing 'question_id'")
        # The pickle's own answer_type ("yes/no", "other", "number") stays in meta; the
        # answer decides, so every release splits open/closed the same way.
        meta = {k: v for k, v in raw.items() if k in ("img_id", "question_type", "answer_type")}
        return Example(qid, question.strip(), answer, infer_answer_type(answer),
                       f"images/{self.split}/{img_id}.jpg", meta)

    def _qa_example(self, raw: dict, where: str) -> Example:
        """A record of `<split>/<split>_qa.pkl`: {image, question, answer}."""
        img_id, question = raw.get("image"), raw.get("question")
        if not isinstance(img_id, str) or not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: expected text 'image' and 'question' fields")
        answer = answer_text(raw.get("answer"), where)
        return Example(f"{self.split}-{raw['_index']}", question.strip(), answer, infer_answer_type(answer),
                       f"images/{self.split}/{img_id}.jpg", {"img_id": img_id})
