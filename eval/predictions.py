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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from medllava.io import DataError

from medllava.eval.tasks.base import Example
from medllava.eval.tasks.formats import ERROR_KEY, json_records

log = logging.getLogger(__name__)

MEDLLAVA, LLAVA_MED = "medllava", "llava-med"
_SHOWN = 3  # disagreements quoted in an error message


@dataclass(frozen=True)
class Prediction:
    id: str
    text: str
    prompt: str | None
    where: str


@dataclass
class PredictionFile:
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
    if "prediction" in row and "qid" in row:
        return MEDLLAVA
    if "text" in row and "question_id" in row:
        return LLAVA_MED
    return None


def _parse_row(row: dict, kind: str, where: str) -> Prediction:
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
    """Read a prediction file; bad rows are skipped and listed in `skipped`, not fatal."""
    path = Path(path)
    kind: str | None = None
    rows: list[Prediction] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for where, row in json_records(path):
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


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def question_matches(question: str, prompt: str) -> bool:
    """True when the prompt contains the question text (case and spacing ignored)."""
    return _squash(question) in _squash(prompt)


def _disagreements(pairs: list[tuple[Example, Prediction]]) -> list[str]:
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
