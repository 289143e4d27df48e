"""Strict scoring: what a reader would call a right answer.

Normalization (`tokens`): Unicode NFKC, lower case; thousands separators dropped
("1,000" -> "1000") and decimal points kept ("3.5"); every other punctuation or symbol
character becomes a space; number words zero..ten become digits; the articles a/an/the are
dropped; Chinese/Japanese/Korean characters are one token each, since those languages do
not put spaces between words (SLAKE's Chinese questions).

Closed questions: the answer is the first candidate option that occurs in the prediction
as whole tokens (at the same position the longest option wins), and it is right when it
equals the normalized truth. The options are yes, no, the truth itself and any `choices`
passed in (the scorer passes every closed answer of the task). Unlike the LLaVA-Med rule,
"normal" does not contain the answer "no", and "no, yes" answers "no".

Open questions: normalized exact match, and token F1 (the harmonic mean of token precision
and recall with repeated tokens matched at most as often as they occur in both).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from medllava.eval.metrics.stats import mean

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LONE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_PIECES = re.compile(f"[{_CJK}]|[^{_CJK}]+")
_CJK_CHAR = re.compile(f"[{_CJK}]")
DEFAULT_CHOICES = ("yes", "no")


def tokens(text: str) -> list[str]:
    """Normalized tokens of `text` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _LONE_PERIOD.sub(" ", _THOUSANDS.sub("", text))
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" and ch != "." else ch for ch in text)
    out = []
    for word in text.split():
        for piece in _PIECES.findall(word):
            piece = _NUMBERS.get(piece, piece)
            if piece not in _ARTICLES:
                out.append(piece)
    return out


def join(words: Sequence[str]) -> str:
    """Tokens back to text: spaces between words, none between CJK characters."""
    out = ""
    for word in words:
        if out and not (_is_cjk(out[-1]) and _is_cjk(word[0])):
            out += " "
        out += word
    return out


def _is_cjk(ch: str) -> bool:
    return _CJK_CHAR.fullmatch(ch) is not None


def normalize(text: str) -> str:
    return join(tokens(text))


@functools.lru_cache(maxsize=4096)
def _option_tokens(text: str) -> tuple[str, ...]:
    # The same few options are read against every prediction of a task.
    return tuple(tokens(text))


def extract_choice(prediction: str, choices: Iterable[str]) -> str | None:
    """The first of `choices` (normalized) occurring in the prediction as whole tokens, or None."""
    options = {_option_tokens(c) for c in choices}
    options.discard(())
    by_length = sorted(options, key=len, reverse=True)
    words = tokens(prediction)
    for i in range(len(words)):
        for option in by_length:
            if tuple(words[i:i + len(option)]) == option:
                return join(option)
    return None


def _read_closed(prediction: str, truth: str, choices: Iterable[str]) -> tuple[str | None, bool]:
    """(option read from the prediction, whether it is the truth)."""
    choice = extract_choice(prediction, (*DEFAULT_CHOICES, truth, *choices))
    return choice, choice is not None and choice == normalize(truth)


def closed_correct(prediction: str, truth: str, choices: Iterable[str] = ()) -> bool:
    return _read_closed(prediction, truth, choices)[1]


def exact_match(prediction: str, truth: str) -> float:
    return float(tokens(prediction) == tokens(truth))


def token_f1(prediction: str, truth: str) -> float:
    pred, gold = tokens(prediction), tokens(truth)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def item_scores(prediction: str, truth: str, answer_type: str, choices: Iterable[str] = ()) -> dict:
    """Per-question strict scores; `correct` is the question's overall right/wrong."""
    if answer_type == "closed":
        choice, correct = _read_closed(prediction, truth, choices)
        return {"closed_accuracy": float(correct), "correct": float(correct), "choice": choice}
    if answer_type != "open":
        raise ValueError(f"answer_type must be 'open' or 'closed', got {answer_type!r}")
    em = exact_match(prediction, truth)
    return {"open_exact_match": em, "open_f1": token_f1(prediction, truth), "correct": em}


def closed_accuracy(predictions: Sequence[str], truths: Sequence[str], choices: Iterable[str] = ()) -> float | None:
    choices = tuple(choices)
    return mean([float(closed_correct(p, t, choices)) for p, t in zip(predictions, truths, strict=True)])


def open_exact_match(predictions: Sequence[str], truths: Sequence[str]) -> float | None:
    return mean([exact_match(p, t) for p, t in zip(predictions, truths, strict=True)])


def open_f1(predictions: Sequence[str], truths: Sequence[str]) -> float | None:
    return mean([token_f1(p, t) for p, t in zip(predictions, truths, strict=True)])
