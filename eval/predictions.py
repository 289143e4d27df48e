"""Prediction files and how their rows are paired with a task's questions.

Two row formats are read (JSONL, or a JSON array), and may not be mixed in one file:
  medllava   {"qid": "<task qid>", "prediction": "<answer text>"} plus optional
             "question" or "prompt" (used to check the pairing) and anything else
             (model, latency, ...), which is ignored.
  llava-med  LLaVA-Med answer files: {"question_id", "prompt", "text", "answer_id", ...},
             where the prompt is the question followed by "<image>".

Pairing: by id when every prediction id is a task qid and every prompt or question the
rows carry matches its question. Otherwise by position, as LLaVA-Med's scorer does
(row i answers question i), but only when the counts agree and every row's prompt
contains its question's text; if not, scoring is refused with the first disagreements.
Task questions without a prediction are scored as empty answers and counted.

`read_predictions` reads a file given to `eval score`, taking its format from what it finds.
`PredictionLog` is `eval run`'s own predictions.jsonl: read once when opened (to resume), then
held in memory as answers are appended, so scoring reads nothing back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medllava.io import DataError, JsonlLog, read_jsonl

from medllava.eval.tasks.base import Example
from medllava.eval.tasks.formats import ERROR_KEY, error_record, json_records

log = logging.getLogger(__name__)

MEDLLAVA, LLAVA_MED = "medllava", "llava-med"
_SHOWN = 3  # disagreements quoted in an error message


@dataclass(frozen=True)
class Prediction:
    """One usable prediction row: the question id it names, its answer text and where it was read."""

    id: str
    text: str
    prompt: str | None
    where: str


@dataclass
class PredictionFile:
    """The usable rows of a prediction file in file order, and the messages of the rows skipped."""

    path: Path
    format: str
    rows: list[Prediction]
    skipped: list[str] = field(default_factory=list)


@dataclass
class Pairing:
    """`texts[i]` answers `examples[i]` ("" where `missing`)."""

    method: str  # "id" or "position"
    texts: list[str]
    missing: list[str]
    note: str


def _row_format(row: dict) -> str | None:
    """MEDLLAVA or LLAVA_MED by the keys a row carries, None for neither."""
    if "prediction" in row and "qid" in row:
        return MEDLLAVA
    if "text" in row and "question_id" in row:
        return LLAVA_MED
    return None


def _parse_row(row: dict, kind: str, where: str) -> Prediction:
    """A row of format `kind` as a Prediction; DataError naming `where` when its id or text is unusable."""
    id_key, text_key = ("qid", "prediction") if kind == MEDLLAVA else ("question_id", "text")
    rid, text = row.get(id_key), row.get(text_key)
    if rid is None or isinstance(rid, (dict, list, bool)):
        raise DataError(f"{where}: {id_key} must be a string or a number, got {rid!r}")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_key} must be text, got {type(text).__name__}")
    prompt = row.get("prompt") if row.get("prompt") is not None else row.get("question")
    return Prediction(str(rid).strip(), text, prompt if isinstance(prompt, str) else None, where)


def read_predictions(path: str | Path) -> PredictionFile:
    """Read a prediction file (JSON array or JSONL, either row format, sniffed); bad rows are skipped
    and listed in `skipped`, not fatal."""
    path = Path(path)
    return parse_predictions(path, json_records(path))


def parse_predictions(path: Path, records: Iterable[tuple[str, Any]], kind: str | None = None) -> PredictionFile:
    """The predictions in `records` (`(where, row)` as `json_records` yields them) read from `path`.

    The row format is `kind` when given (a file medllava wrote), else that of the first usable row;
    rows of the other format, or unusable, are skipped and listed.
    """
    rows: list[Prediction] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for where, row in records:
        try:
            if isinstance(row, dict) and ERROR_KEY in row:
                raise DataError(row[ERROR_KEY])
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            row_kind = _row_format(row)
            if row_kind is None:
                raise DataError(f"{where}: expected qid + prediction (medllava) or question_id + text (LLaVA-Med)")
            if kind is not None and row_kind != kind:
                raise DataError(f"{where}: a {row_kind} row in a {kind} prediction file")
            kind = row_kind
            pred = _parse_row(row, kind, where)
            if pred.id in seen:
                raise DataError(f"{where}: duplicate id {pred.id!r} (first at {seen[pred.id]}); keeping the first")
        except DataError as e:
            skipped.append(str(e))
            continue
        seen[pred.id] = where
        rows.append(pred)
    if not rows:
        detail = f" ({len(skipped)} bad rows; first: {skipped[0]})" if skipped else ""
        raise DataError(f"{path}: no usable predictions{detail}")
    if skipped:
        log.warning("%s: skipped %d bad rows (first: %s)", path, len(skipped), skipped[0])
    return PredictionFile(path, kind, rows, skipped)


class PredictionLog:
    """`eval run`'s predictions.jsonl, read from disk once: when opened, to resume.

    Every row appended goes through a `JsonlLog` (written whole, flushed and synced, so a killed run
    resumes where it stopped) and is kept, so `predictions()` needs no second read. `unreadable` lists
    the lines that were not JSON objects; their questions count as unanswered.
    """

    def __init__(self, path: str | Path) -> None:
        self._log = JsonlLog(path)  # first: it cuts off a half-written last line left by a kill
        self.path = self._log.path
        self.unreadable: list[str] = []
        self._records: list[tuple[str, Any]] = []
        self._answered: set[str] = set()
        self._lines = 0
        errors: list[str] = []
        for lineno, row in read_jsonl(self.path, skip_bad=True, errors=errors):
            self._hold_errors(errors)
            self._hold(lineno, row)
        self._hold_errors(errors)

    def _hold(self, lineno: int, row: dict) -> None:
        """Keep `row`, read from (or written as) line `lineno`."""
        self._records.append((f"{self.path}:{lineno}", row))
        self._answered.add(str(row.get("qid")))
        self._lines = lineno

    def _hold_errors(self, errors: list[str]) -> None:
        """Move the unreadable lines met so far into place as error records (as `json_records` yields them)."""
        for message in errors:
            self.unreadable.append(message)
            self._records.append(("", error_record(message)))
            self._lines += 1
        errors.clear()

    def answered(self) -> set[str]:
        """The qids of the rows held (any JSON object row): the questions not to ask again."""
        return set(self._answered)

    def append(self, row: dict) -> None:
        """Write `row` as the file's next line (flushed and synced), and hold it."""
        self._log.append(row)
        self._hold(self._lines + 1, row)

    def predictions(self) -> PredictionFile:
        """The rows held, read as medllava predictions (bad rows skipped and listed, as `read_predictions` does)."""
        return parse_predictions(self.path, self._records, MEDLLAVA)

    def close(self) -> None:
        """Close the file (held rows stay readable)."""
        self._log.close()

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _squash(text: str) -> str:
    """Lower case, runs of whitespace as one space."""
    return " ".join(text.lower().split())


def question_matches(question: str, prompt: str) -> bool:
    """True when the prompt contains the question text (case and spacing ignored)."""
    return _squash(question) in _squash(prompt)


def _disagreements(pairs: list[tuple[Example, Prediction]]) -> list[str]:
    """One message per pair whose prompt does not contain its question (pairs without a prompt pass)."""
    return [f"{p.where}: prompt {p.prompt!r} does not contain question {ex.qid} {ex.question!r}"
            for ex, p in pairs if p.prompt is not None and not question_matches(ex.question, p.prompt)]


def pair_predictions(examples: list[Example], preds: PredictionFile) -> Pairing:
    """Match prediction rows to examples by id, else by position after checking questions."""
    by_qid = {ex.qid: ex for ex in examples}
    unknown = [p for p in preds.rows if p.id not in by_qid]
    if not unknown:
        bad = _disagreements([(by_qid[p.id], p) for p in preds.rows])
        if not bad:
            texts = {p.id: p.text for p in preds.rows}
            missing = [ex.qid for ex in examples if ex.qid not in texts]
            note = f"by id: {len(preds.rows)} predictions matched task qids"
            return Pairing("id", [texts.get(ex.qid, "") for ex in examples], missing, note)
        why = f"every prediction id is a task qid but {len(bad)} questions disagree (first: {bad[0]})"
    else:
        shown = ", ".join(repr(p.id) for p in unknown[:_SHOWN])
        why = f"{len(unknown)} of {len(preds.rows)} prediction ids are not task qids (e.g. {shown})"
    return _pair_by_position(examples, preds, why)


def _pair_by_position(examples: list[Example], preds: PredictionFile, why: str) -> Pairing:
    """Row i answers question i, when the counts agree and every prompt contains its question."""
    refuse = f"{preds.path}: cannot pair by id: {why}; pairing by position refused: "
    if len(preds.rows) != len(examples):
        raise DataError(refuse + f"{len(preds.rows)} predictions for {len(examples)} questions")
    unchecked = [p.where for p in preds.rows if p.prompt is None]
    if unchecked:
        raise DataError(refuse + f"{len(unchecked)} rows carry no prompt or question to check (first: {unchecked[0]})")
    bad = _disagreements(list(zip(examples, preds.rows)))
    if bad:
        raise DataError(refuse + f"{len(bad)} of {len(examples)} prompts do not contain their question: "
                        + "; ".join(bad[:_SHOWN]))
    note = f"by position ({why}); all {len(examples)} prompts contain their question"
    log.info("%s: paired %s", preds.path, note)
    return Pairing("position", [p.text for p in preds.rows], [], note)
