"""Sentence BLEU with NLTK's `sentence_bleu` semantics (single reference, no smoothing).

LLaVA-Med reports BLEU from `nltk.translate.bleu_score.sentence_bleu`; this reproduces its
numbers without the NLTK dependency:
  - modified n-gram precision: hypothesis n-gram counts clipped by the reference's counts,
    over the number of hypothesis n-grams (at least 1, so a too-short hypothesis gives 0/1);
  - the score is 0 when no unigram matches;
  - otherwise a zero precision is replaced by the smallest positive float (NLTK's
    `method0`), so an order with weight 0 has no effect and one with weight > 0 drives the
    score to about 1e-77 or below, not to exactly 0;
  - brevity penalty exp(1 - r/c) when the hypothesis (c words) is not longer than the
    reference (r words), 1 otherwise.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence

DEFAULT_WEIGHTS = (0.25, 0.25, 0.25, 0.25)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str],
                  weights: Sequence[float] = DEFAULT_WEIGHTS) -> float:
    """BLEU of `hypothesis` words against one `reference` word list."""
    precisions = []
    for n in range(1, len(weights) + 1):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matched = sum(min(count, ref[gram]) for gram, count in hyp.items())
        precisions.append((matched, max(1, sum(hyp.values()))))
    if precisions[0][0] == 0:
        return 0.0
    c, r = len(hypothesis), len(reference)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    log_sum = math.fsum(
        w * math.log(matched / total if matched else sys.float_info.min)
        for w, (matched, total) in zip(weights, precisions)
    )
    return brevity * math.exp(log_sum)
