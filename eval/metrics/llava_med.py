"""LLaVA-Med-compatible scoring: the numbers LLaVA-Med's VQA scorer prints, reproduced
quirk by quirk so results can be compared with its published tables.

The scorer is `llava/eval/run_eval.py` / `run_eval_batch.py` with the `eval_metrics`
helpers (`glossary.normalize_word`, `evaluate_metrics`, `utils.split_sentence`) on the
v1.0.0 branch of microsoft/LLaVA-Med. What it does, step by step:

Normalization (`normalize`), applied to the lower-cased ground truth and prediction:
  1. Punctuation `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !` is deleted when the *original*
     text has that character next to a space, or when the original text contains a
     digit-comma-digit anywhere (then every listed character is deleted, "1,000" -> "1000");
     otherwise it becomes a space ("left/right" -> "left right", "left / right" -> "left  right").
     Apostrophes, colons, periods, % and other symbols are not in the list and survive this step.
  2. Periods not followed by a digit are deleted ("3.5" keeps its point, "e.g." -> "eg"),
     at most 32 of them: the original passes `re.UNICODE` (= 32) where `re.sub` expects a count.
  3. Lower-case, split on whitespace; number words zero..ten become digits and "none"
     becomes "0"; the articles a/an/the are dropped.
  4. Contractions written without an apostrophe get it back ("dont" -> "don't", from the
     VQA challenge table), and "somebody'd" loses its apostrophe (a reversed entry in that
     table); the table's capitalized keys ("Im", "Ive") can never match lower-cased words.
  5. Words are joined with single spaces.
The helper metrics normalize their inputs again (twice-normalized text only differs past 32
periods); this module repeats those extra passes where the original does.

Closed questions (answer_type CLOSED):
  closed_accuracy        1 when the normalized truth is a *substring* of the normalized
                         prediction, else 0; every closed question counts. So "no" is found
                         in "normal", "not sure" and "unknown", and "yes" in "eyes". This is
                         `run_eval_batch.py`, the scorer the README runs for the three datasets.
  closed_accuracy_gated  `run_eval.py`'s rule: a prediction containing neither "yes" nor "no"
                         (as substrings) scores 0; one that does scores 1 when the truth is a
                         substring, and is otherwise left out of the denominator altogether,
                         so wrong yes/no answers do not lower the score.
  closed_recall          `run_eval_batch.py`'s "recall_closed": the recall below, on closed questions.

Open questions (answer_type OPEN); word counts come from whitespace splitting:
  open_recall    the number the paper reports as "open": tp / (tp + fn) with tp = the number
                 of prediction words (repeats included) that occur in the truth, fn = the
                 number of truth words (repeats included) absent from the prediction. Repeating
                 a right word raises it: truth "left lung", prediction "left left" -> 2/3.
  precision, f1  tp / (tp + fp), fp = prediction words absent from the truth; f1 their
                 harmonic mean. All three are 0 when the prediction or the truth is empty or
                 tp is 0.
  exact_match    not exact match: the number of *distinct* truth words found in the prediction
                 divided by the number of prediction words (repeats included); 0 for an empty
                 prediction. "yes yes" against "yes" scores 0.5.
  open_hit       `run_eval_batch.py`'s "open accuracy": 1 when the normalized truth is a
                 substring of the normalized prediction.
  open_candidate_accuracy  `run_eval.py`'s "open accuracy", only with a candidate answer list:
                 each candidate (normalized; integers turned into text) scores the number of
                 distinct prediction words found among its distinct words, divided by its
                 number of distinct words; the first best-scoring candidate is the answer, and
                 it is right when it equals the normalized truth.
  bleu, bleu_1, bleu_2, bleu_3  NLTK `sentence_bleu` of the prediction words against the
                 truth words, with the default 4-gram weights and with all weight on 1-, 2-
                 and 3-grams; no smoothing (see `medllava.eval.metrics.bleu`).
Every number is the mean over its questions; answer types other than OPEN/CLOSED are not scored.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from medllava.eval.metrics.bleu import sentence_bleu
from medllava.eval.metrics.stats import mean

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# The VQA challenge's contraction table, listed by the apostrophe form; each key is that
# form with one of its apostrophes left out ("couldn't've" <- "couldnt've", "couldn'tve").
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've shouldn't "
    "should've shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
    "someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're "
    "why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for form in _CONTRACTED:
        for i, ch in enumerate(form):
            if ch == "'":
                table[form[:i] + form[i + 1:]] = form
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()


def normalize(text: str) -> str:
    """LLaVA-Med's `normalize_word` (see the module docstring, steps 1-5)."""
    squeeze = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if squeeze or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_LIMIT)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def _words(text: str) -> Counter:
    """`split_sentence(text, 1)`: lower-cased whitespace words with their counts."""
    return Counter(text.lower().strip().split())


def _f1_precision_recall(pred: str, truth: str) -> tuple[float, float, float]:
    """On normalized text; normalizes again as the original does."""
    p_words, t_words = _words(normalize(pred)), _words(normalize(truth))
    if not p_words or not t_words:
        return 0.0, 0.0, 0.0
    # True positives count the prediction's repeats, false negatives the truth's.
    tp = sum(c for w, c in p_words.items() if w in t_words)
    fp = sum(c for w, c in p_words.items() if w not in t_words)
    fn = sum(c for w, c in t_words.items() if w not in p_words)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def _exact_match(pred: str, truth: str) -> float:
    p_words, t_words = _words(normalize(pred)), _words(normalize(truth))
    total = sum(p_words.values())
    return sum(1 for w in t_words if w in p_words) / total if total else 0.0


def _candidate_hit(pred: str, truth: str, candidates: Sequence) -> float:
    p_words = _words(normalize(pred))
    truth = normalize(truth)
    best, best_score = None, -1.0
    for candidate in candidates:
        candidate = normalize(str(candidate))
        c_words = _words(candidate)
        score = sum(1 for w in p_words if w in c_words) / len(c_words) if c_words else 0.0
        if score > best_score:  # strict: the first of equal scores wins
            best, best_score = candidate, score
    return float(best == truth)


def _gated(pred: str, truth: str) -> float | None:
    if "yes" in pred or "no" in pred:
        return 1.0 if truth in pred else None
    return 0.0


def item_scores(prediction: str, truth: str, answer_type: str, candidates: Sequence | None = None) -> dict:
    """Every per-question number of the LLaVA-Med scorer for one question.

    answer_type: "open" or "closed". `closed_accuracy_gated` is None when `run_eval.py`
    leaves the question out of its denominator.
    """
    pred, gt = normalize(prediction.lower()), normalize(truth.lower())
    f1, precision, recall = _f1_precision_recall(pred, gt)
    if answer_type == "closed":
        return {"closed_accuracy": float(gt in pred), "closed_accuracy_gated": _gated(pred, gt),
                "closed_recall": recall}
    if answer_type != "open":
        raise ValueError(f"answer_type must be 'open' or 'closed', got {answer_type!r}")
    ref, hyp = gt.split(), pred.split()
    scores = {
        "open_recall": recall, "precision": precision, "f1": f1, "exact_match": _exact_match(pred, gt),
        "open_hit": float(gt in pred),
        "bleu": sentence_bleu(ref, hyp),
        "bleu_1": sentence_bleu(ref, hyp, (1, 0, 0, 0)),
        "bleu_2": sentence_bleu(ref, hyp, (0, 1, 0, 0)),
        "bleu_3": sentence_bleu(ref, hyp, (0, 0, 1, 0)),
    }
    if candidates:
        scores["open_candidate_accuracy"] = _candidate_hit(pred, gt, candidates)
    return scores


def closed_accuracy(predictions: Sequence[str], truths: Sequence[str]) -> float | None:
    """Mean closed score: normalized truth contained in the normalized prediction."""
    return mean([item_scores(p, t, "closed")["closed_accuracy"] for p, t in zip(predictions, truths, strict=True)])


def closed_accuracy_gated(predictions: Sequence[str], truths: Sequence[str]) -> float | None:
    """`run_eval.py`'s yes/no accuracy, wrong yes/no answers left out of the denominator."""
    return mean([item_scores(p, t, "closed")["closed_accuracy_gated"] for p, t in zip(predictions, truths, strict=True)])


def open_recall(predictions: Sequence[str], truths: Sequence[str]) -> float | None:
    """Mean open-question recall, repeated prediction words counted."""
    return mean([item_scores(p, t, "open")["open_recall"] for p, t in zip(predictions, truths, strict=True)])


def score(predictions: Sequence[str], truths: Sequence[str], answer_types: Sequence[str],
          candidates: Sequence | None = None) -> dict[str, float | None]:
    """The scorer's whole table (as fractions, not percentages); None where a metric has no questions."""
    per_metric: dict[str, list] = {}
    for p, t, kind in zip(predictions, truths, answer_types, strict=True):
        for key, value in item_scores(p, t, kind, candidates).items():
            per_metric.setdefault(key, []).append(value)
    return {key: mean(values) for key, values in per_metric.items()}
