"""HuatuoGPT-Vision's VQA scoring: closed questions only, read as a choice between lettered options.

Matched against `scorer.py` (`score_mix_llava`, `test_choice_llava`, `test_mmlu`, `match_choice3`,
`find_most_similar_index`) of github.com/FreedomIntelligence/HuatuoGPT-Vision at
f699d88d4d1eeb9f3e62fdb2da4e297bdacb67f0 (2025-01-09, "We released the evaluation code"; read from the
fork xk-huang/HuatuoGPT-Vision, which carries that upstream commit unchanged: the stored upstream
snapshot, a6476ac, predates it). Its evaluation data (Medical_Multimodal_Evaluation_Data) asks every
closed question with lettered options and drops open questions; which VQA-RAD/SLAKE/PathVQA questions
it holds is in that data, not the code, so here the closed questions are those with a yes/no gold
answer, asked as "A. yes  B. no".

A reply is read by `match_choice3`, in three steps:
  1. the first lone letter a-n or A-N (before it: start, a non-word character or "is "; after it: a
     non-word character or the end; "a " and "A " excluded) is the choice;
  2. else the option whose text occurs (lower-cased, as a substring) *last* in the reply;
  3. else the option most similar to the reply (difflib ratio; the last of equal ratios).
The question is right when the choice equals the gold option's letter (upper case). The accuracy is
right / closed questions; there is no open number.

As released the scorer passes the whole question record where `match_choice3` expects the options
mapping, so a reply with no lone letter stops it with an error (a list has no `.lower()`); replies to
its own lettered prompt nearly always hold a letter. Here step 2 and 3 run on the options mapping, as
the function is written.

Known defects (`fixes` corrects them):
  stray_letter   any lone letter a-n in a free-text reply ("i think", "e.g.", "grade b") is taken as
                 the choice before the answer text is looked at, and a lower-case letter never equals
                 the upper-case gold letter. Corrected: a letter counts only when the whole reply is
                 one letter (optionally bracketed or followed by "." or ")"), case ignored.
  no_substring   step 2 finds "no" inside "normal", "nodule", "not" and "know". Corrected: options
                 are found as whole words.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence

from medllava.eval.protocols.base import Defect, Scores, fraction, gold_is_yes_no, scores
from medllava.eval.tasks.base import Example

OPTIONS = {"A": "yes", "B": "no"}
_LETTER = re.compile(r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([abcdefghijklmnABCDEFGHIJKLMN])(\W|$)", re.S)
_ONLY_LETTER = re.compile(r"\s*\(?([a-nA-N])[.)]?\s*")


def _most_similar(options: dict[str, str], reply: str) -> str:
    best, best_ratio = next(iter(options)), 0.0
    for label, text in options.items():
        ratio = difflib.SequenceMatcher(None, text.lower(), reply.lower()).ratio()
        if ratio >= best_ratio:  # the last of equal ratios wins
            best, best_ratio = label, ratio
    return best


def _last_option(options: dict[str, str], reply: str, whole_words: bool) -> str | None:
    text = reply.lower()
    found = []
    for label, option in options.items():
        option = option.lower()
        if whole_words:
            hits = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(option)}(?!\w)", text)]
            if hits:
                found.append((label, hits[-1]))
        elif option in text:
            found.append((label, text.rindex(option)))
    return max(found, key=lambda f: f[1])[0] if found else None


def choose(reply: str, options: dict[str, str] = OPTIONS, fixes: Collection[str] = ()) -> str:
    """`match_choice3`'s choice: an option letter (as written in the reply) for `reply`."""
    if "stray_letter" in fixes:
        only = _ONLY_LETTER.fullmatch(reply)
        if only:
            return only.group(1).upper()
    else:
        letter = _LETTER.search(reply)
        if letter:
            return letter.group(2)
    return _last_option(options, reply, "no_substring" in fixes) or _most_similar(options, reply)


def score(examples: Sequence[Example], predictions: Sequence[str], task: str, fixes: Collection[str] = ()) -> Scores:
    """`score_mix_llava` on the yes/no questions: accuracy of the option read from each reply."""
    labels = {text: label for label, text in OPTIONS.items()}
    closed = [choose(reply, OPTIONS, fixes) == labels[ex.answer.lower().strip()]
              for ex, reply in zip(examples, predictions, strict=True) if gold_is_yes_no(ex)]
    return scores(closed, [], fraction(closed))  # it scores nothing else, so overall = closed


DEFECTS = (
    Defect("stray_letter", "a lone letter a-n anywhere in a free-text reply (\"i\", \"e.g.\") is read as the "
           "option letter, and lower-case letters never match", "closed", ("vqa-rad", "slake", "pathvqa")),
    Defect("no_substring", "options are found as substrings: \"no\" inside \"normal\", \"nodule\", \"not\"",
           "closed", ("vqa-rad", "slake", "pathvqa")),
)
