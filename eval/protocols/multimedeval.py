"""MultiMedEval's VQA scoring (VQA-Rad, VQA-Path, SLAKE): set-based token recall with thresholds.

Matched against github.com/corentin-ryr/MultiMedEval at d9ac283f5ad989d4f78b709f7076f432de4aa69e:
`multimedeval/task_families.py` (`VQA.evaluate`, `VQA._preprocess`), `multimedeval/vqa.py`
(`get_correct_answer`: the gold answer lower-cased and stripped; SLAKE keeps English questions only)
and `multimedeval/utils.py` (`clean_str`, the VQA-challenge normalisation that LLaVA-Med's
`normalize_word` also uses, so `medllava.eval.metrics.llava_med.normalize` of the lower-cased text).

Per question: both texts are cleaned and turned into *sets* of words; recall = |common| / |gold
words|, precision = |common| / |reply words|, F1 = 2PR / (P + R + 1e-8); BLEU-1 (torchmetrics
`BLEUScore(n_gram=1)` on the cleaned texts).
  - closed when the cleaned gold answer is "yes" or "no"; the gold word set {"no"} becomes {"no",
    "not"}; right when the recall of that set is >= 0.4, i.e. the reply holds "yes" (gold yes) or
    "no" or "not" (gold no).
  - open otherwise; right when the recall is >= 0.75.
The harness reports closedQuestionsAccuracy, openQuestionsAccuracy, openQuestionsRecall, and recall,
F1 and BLEU over all questions; it has no overall accuracy (None here).

Known defect (`fixes` corrects it):
  yes_and_no_both_correct  the closed test only asks whether the gold word is present, so a reply
                           holding both "yes" and "no" ("yes or no") is right whatever the gold.
                           Corrected: also wrong when the reply holds the other answer ("yes" for a
                           gold no; "no" for a gold yes).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from medllava.eval.metrics.bleu import sentence_bleu
from medllava.eval.metrics.llava_med import normalize
from medllava.eval.protocols.base import YES_NO, Defect, Scores, scores
from medllava.eval.tasks.base import Example

CLOSED_RECALL, OPEN_RECALL = 0.4, 0.75


def clean(text: str) -> str:
    """`clean_str`: lower-cased, punctuation, articles and number words handled as the VQA challenge does."""
    return normalize(text.lower())


def word_set(text: str) -> set[str]:
    """`_preprocess`: the set of space-separated words, without the empty word."""
    return set(text.split()) - {""}


def item(gold: str, reply: str, fixes: Collection[str] = ()) -> dict:
    """One question: its precision, recall, F1, BLEU-1, whether it is closed, and whether it is right."""
    truth, pred = clean(gold.lower().strip()), clean(reply)
    truth_words, pred_words = word_set(truth), word_set(pred)
    common = len(pred_words & truth_words)
    precision = common / len(pred_words) if pred_words else 0.0
    recall = common / len(truth_words) if truth_words else 0.0
    out = {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall + 1e-8),
           "bleu": sentence_bleu(truth.split(), pred.split(), (1.0,)), "closed": truth in YES_NO}
    if out["closed"]:
        wanted = truth_words | ({"not"} if truth_words == {"no"} else set())
        right = len(pred_words & wanted) / len(wanted) >= CLOSED_RECALL
        if "yes_and_no_both_correct" in fixes:
            right = right and not (pred_words & ({"yes"} if truth == "no" else {"no"}))
        out["right"] = right
    else:
        out["right"] = recall >= OPEN_RECALL
    return out


def score(examples: Sequence[Example], predictions: Sequence[str], task: str, fixes: Collection[str] = ()) -> Scores:
    """`VQA.evaluate` on `predictions[i]` answering `examples[i]` (SLAKE: English questions only)."""
    items = [item(ex.answer, reply, fixes) for ex, reply in zip(examples, predictions, strict=True)
             if task != "slake" or ex.meta.get("q_lang", "en") == "en"]
    closed = [it["right"] for it in items if it["closed"]]
    opened = [it for it in items if not it["closed"]]
    mean = (lambda key, its: sum(it[key] for it in its) / len(its) if its else None)
    return scores(closed, [it["right"] for it in opened], with_overall=False,
                  open_recall=mean("recall", opened), recall=mean("recall", items), f1=mean("f1", items),
                  bleu=mean("bleu", items))


DEFECTS = (
    Defect("yes_and_no_both_correct", "a closed reply holding both \"yes\" and \"no\" counts as right whatever "
           "the gold answer", "closed", ("vqa-rad", "slake", "pathvqa")),
)
