"""lmms-eval's SLAKE scoring: normalised exact match (tasks slake_en and slake_zh).

Matched against github.com/EvolvingLMMs-Lab/lmms-eval at 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3
(SLAKE added in 0a75d6b, 2026-07-14): `lmms_eval/tasks/slake/utils.py` (`slake_process_results`,
`normalize_answer`, the `slake_aggregate_*` functions). lmms-eval has no VQA-RAD or PathVQA task at that
commit, so the protocol applies to SLAKE only.

Both texts: stripped, lower-cased, bracketed parts "(...)" and "（...）" removed, ASCII and Chinese
punctuation turned into spaces, whitespace runs collapsed; then "x ray"/"xray" -> "xray", and a whole
answer from its yes list (yes, yeah, yep, true, 是, 是的, 有, 包含, 可以, 能, 会, 正常) -> "yes" and from its
no list (no, nope, false, 否, 不是, 没有, 无, 不包含, 不能, 不会, 不可以, 不正常, 异常) -> "no". Right when equal.
Closed and open by the dataset's answer type; slake_accuracy is over all questions of the language.
No known defect.
"""

from __future__ import annotations

import re
import string
from collections.abc import Collection, Sequence

from medllava.eval.protocols.base import Scores, scores
from medllava.eval.tasks.base import CLOSED, Example

_YES = frozenset({"yes", "yeah", "yep", "true", "是", "是的", "有", "包含", "可以", "能", "会", "正常"})
_NO = frozenset({"no", "nope", "false", "否", "不是", "没有", "无", "不包含", "不能", "不会", "不可以", "不正常", "异常"})
_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～、，。；：《》？【】（）"
_SPACES = str.maketrans(dict.fromkeys(string.punctuation + _ZH_PUNCTUATION, " "))
_BRACKETS = (re.compile(r"\([^)]*\)"), re.compile(r"（[^）]*）"))


def normalize_answer(text: str) -> str:
    """`normalize_answer` (see the module docstring)."""
    text = text.strip().lower()
    for bracket in _BRACKETS:
        text = bracket.sub(" ", text)
    text = " ".join(text.translate(_SPACES).split())
    if text in ("x ray", "xray"):
        return "xray"
    return "yes" if text in _YES else "no" if text in _NO else text


def score(examples: Sequence[Example], predictions: Sequence[str], task: str, fixes: Collection[str] = ()) -> Scores:
    """`slake_process_results` and the accuracy aggregations on `predictions[i]` answering `examples[i]`."""
    closed, open_ = [], []
    for ex, reply in zip(examples, predictions, strict=True):
        right = normalize_answer(reply) == normalize_answer(ex.answer)
        (closed if ex.answer_type == CLOSED else open_).append(right)
    return scores(closed, open_)
