"""MedEvalKit's rule-based VQA scoring (the numbers of Lingshu's tables with the LLM judge off).

Matched against github.com/alibaba-damo-academy/MedEvalKit at 9b12e3b34232a8779cc1275417bf4f72f03d28e0
(the scoring code last changed in 25676be, 2025-10-23): `utils/VQA_RAD/VQA_RAD.py`,
`utils/PATH_VQA/PATH_VQA.py` and `utils/SLAKE/SLAKE.py` (`cal_metrics`) with the helpers in
`utils/utils.py` (`parse_response`, `judge_judgement`, `judge_close_end_vqa`, `judge_open_end_vqa`,
`calculate_f1`, `bleu`, `rouge`) and mathruler's `extract_boxed_content`.

What it does, per question:
  - reply: the content of the last `\\boxed{...}` if any, else of `<answer>...</answer>` tags; then
    lower-cased, and (VQA-RAD, PathVQA) stripped; `parse_response` then keeps what follows the last
    "answer:"-style marker.
  - closed or open: VQA-RAD and PathVQA by the gold answer (lower-cased, stripped) being "yes" or
    "no"; SLAKE by the dataset's answer type.
  - closed, yes/no gold: after deleting periods and newlines, right when exactly one of "yes" and "no"
    occurs in the reply *as a substring* and the gold answer occurs in it as a substring. SLAKE's
    gold answers are capitalised ("Yes"), so there the yes/no test is never used and every closed
    answer is an exact match of the reply (periods and newlines deleted) with the gold answer.
  - open: right when the parsed reply equals the lower-cased gold answer exactly; BLEU-1..4 (NLTK
    `sentence_bleu`, words from splitting on single spaces after "." becomes " ."), ROUGE-1/2/L F
    (`rouge` package), and token-set precision, recall and F1.
  - accuracies: closed right / closed, open exact / open, overall (closed right + open exact) / all.
The harness stops with an error on an open reply that is empty (or only periods): `calculate_f1`
returns a bare 0 that its caller unpacks and the rouge package raises. Here such a question scores 0
and "metrics.harness_errors" counts it.

Known defects (`fixes` corrects them; the corrected variant applies them all):
  open_acc_divided_twice  the reported open "acc" is right / N / N (divided again with the averaged
                          metrics); corrected: right / N (which the harness's own "em" also shows).
  no_substring            the yes/no test finds "no" inside "normal", "nodule", "not", "know" and
                          "yes" inside "eyes"; a reply holding both is wrong. Corrected: whole words.
  f1_labels_swapped       `calculate_f1` returns (f1, precision, recall), unpacked as (precision,
                          recall, f1): "precision" holds F1, "recall" precision and "f1" recall.
  slake_mixed_languages   SLAKE's English and Chinese test questions (2,094) are scored as one set;
                          corrected: English only (only differs when `-o lang=all` loads both).
  pathvqa_judge_zeroes_closed  with the LLM judge on, PathVQA's closed hits are reset to 0 and only
                          the judged open answers are counted; not computed here (no judge).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from medllava.eval.metrics.bleu import sentence_bleu
from medllava.eval.protocols.base import YES_NO, Defect, Scores, gold_is_yes_no, scores
from medllava.eval.protocols.rouge import rouge_f
from medllava.eval.tasks.base import CLOSED, Example

_BOXED = "\\boxed{"
_ANSWER_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:", "答案:",
                   "final answer", "final answer is")
_WORD = re.compile(r"[a-z]+")
OPEN_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougel", "precision", "recall", "f1", "em")


def boxed_content(text: str) -> str:
    """mathruler's `extract_boxed_content`: inside the last balanced \\boxed{...}, else "None"."""
    start = text.rfind(_BOXED)
    if start == -1:
        return "None"
    depth, content = 0, text[start + len(_BOXED):]
    for i, ch in enumerate(content):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == -1:
            return content[:i].strip()
    return "None"


def tagged(text: str, tag: str) -> str:
    """`extract(text, tag)`: every <tag>...</tag> joined by spaces, or the text itself when there is none."""
    parts, start = [], text.find(f"<{tag}>")
    while start != -1:
        end = text.find(f"</{tag}>", start + len(tag) + 2)
        if end == -1:
            break
        parts.append(text[start + len(tag) + 2:end])
        start = text.find(f"<{tag}>", end + len(tag) + 3)
    return " ".join(parts).strip() or text


def unwrap(reply: str) -> str:
    """The first step of `cal_metrics`: the boxed answer, else the <answer> tag's content."""
    boxed = boxed_content(reply)
    if boxed != "None":
        return boxed
    return tagged(reply, "answer") if "<answer>" in reply else reply


def parse_response(reply: str) -> str:
    """`parse_response`: lower-cased, unwrapped again, then what follows each answer marker found."""
    reply = reply.lower()
    if "boxed" in reply:
        reply = boxed_content(reply)
    elif "<answer>" in reply:
        reply = tagged(reply, "answer")
    for marker in _ANSWER_MARKERS:
        if marker in reply:
            reply = reply.split(marker)[-1]
    return reply


def yes_no_right(gold: str, reply: str, whole_words: bool) -> bool:
    """`judge_judgement`: exactly one of yes/no in the reply, and the gold answer in it."""
    gold = gold.lower()
    reply = parse_response(reply).replace("\n", "").replace(".", "")
    found = set(_WORD.findall(reply)) if whole_words else reply
    if ("yes" in found) != ("no" in found):
        return gold in found
    return False


def exact_right(gold: str, reply: str) -> bool:
    """`judge_close_end_vqa`: the parsed reply, periods and newlines deleted, equals the gold answer."""
    return parse_response(reply).replace("\n", "").replace(".", "") == gold.lower()


def _bleu_words(text: str) -> list[str]:
    return text.lower().replace(".", " .").split(" ")


def token_prf(reply: str, gold: str) -> tuple[float, float, float] | None:
    """Token-set (precision, recall, F1) of `calculate_f1`; None where it returns its bare 0 (empty text)."""
    pred, truth = set(reply.lower().split()), set(gold.lower().split())
    if not pred or not truth:
        return None
    common = len(pred & truth)
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred), common / len(truth)
    return precision, recall, 2 * precision * recall / (precision + recall)


def open_item(gold: str, reply: str, swap_labels: bool) -> dict[str, float] | None:
    """`judge_open_end_vqa`'s numbers for one open question; None where the harness raises."""
    gold, reply = gold.lower(), parse_response(reply)
    prf, rouge = token_prf(reply, gold), rouge_f(reply.lower(), gold)
    if prf is None or rouge is None:
        return None
    ref, hyp = _bleu_words(gold), _bleu_words(reply)
    precision, recall, f1 = prf
    if swap_labels:  # the tuple is (f1, precision, recall), read as (precision, recall, f1)
        precision, recall, f1 = f1, precision, recall
    item = {f"bleu{n}": sentence_bleu(ref, hyp, [1 / n] * n) for n in (1, 2, 3, 4)}
    item.update(rouge1=rouge["rouge-1"], rouge2=rouge["rouge-2"], rougel=rouge["rouge-l"],
                precision=precision, recall=recall, f1=f1, em=float(reply == gold))
    return item


def _is_closed(example: Example, task: str) -> bool:
    return example.answer_type == CLOSED if task == "slake" else gold_is_yes_no(example)


def _closed_right(example: Example, reply: str, task: str, fixes: Collection[str]) -> bool:
    whole_words = "no_substring" in fixes
    if task == "slake":  # the raw, capitalised gold answer is tested against ["yes", "no"]
        if example.answer in YES_NO:
            return yes_no_right(example.answer, reply, whole_words)
        return exact_right(example.answer, reply)
    return yes_no_right(example.answer.lower().strip(), reply, whole_words)


def _in_scope(example: Example, task: str, fixes: Collection[str]) -> bool:
    return not (task == "slake" and "slake_mixed_languages" in fixes and example.meta.get("q_lang", "en") != "en")


def score(examples: Sequence[Example], predictions: Sequence[str], task: str, fixes: Collection[str] = ()) -> Scores:
    """MedEvalKit's `cal_metrics` (judge off) on `predictions[i]` answering `examples[i]`."""
    closed, open_, sums, errors = [], [], dict.fromkeys(OPEN_METRICS, 0.0), 0
    for ex, reply in zip(examples, predictions, strict=True):
        if not _in_scope(ex, task, fixes):
            continue
        reply = unwrap(reply)
        if task != "slake":
            reply = reply.lower().strip()
        if _is_closed(ex, task):
            closed.append(_closed_right(ex, reply, task, fixes))
            continue
        item = open_item(ex.answer.lower().strip() if task != "slake" else ex.answer, reply,
                         "f1_labels_swapped" not in fixes)
        errors += item is None
        item = item or dict.fromkeys(OPEN_METRICS, 0.0)
        open_.append(bool(item["em"]))
        for key in OPEN_METRICS:
            sums[key] += item[key]
    n_open = len(open_)
    means = {key: value / n_open if n_open else None for key, value in sums.items()}
    open_acc = sum(open_) / n_open if n_open else None
    if open_acc is not None and "open_acc_divided_twice" not in fixes:
        open_acc /= n_open
    return scores(closed, open_, **means, harness_errors=errors) | {"open": open_acc}


DEFECTS = (
    Defect("open_acc_divided_twice", "open \"acc\" is divided by the number of open questions twice", "open",
           ("vqa-rad", "slake", "pathvqa")),
    Defect("no_substring", "the yes/no test matches \"no\" inside \"normal\", \"nodule\", \"not\" (and \"yes\" "
           "inside \"eyes\"); a reply holding both is wrong", "closed", ("vqa-rad", "pathvqa")),
    Defect("f1_labels_swapped", "open token metrics mislabelled: \"precision\" holds F1, \"recall\" precision, "
           "\"f1\" recall", "metrics.f1", ("vqa-rad", "slake", "pathvqa")),
    Defect("slake_mixed_languages", "SLAKE English and Chinese questions scored as one set (2,094); medllava "
           "loads English only unless -o lang=all", "overall", ("slake",)),
    Defect("pathvqa_judge_zeroes_closed", "with the LLM judge on, PathVQA closed hits are reset to 0 (not "
           "computed: medllava runs the rule-based scoring only)", "closed", ("pathvqa",), computable=False),
)
