"""ROUGE-1, ROUGE-2 and ROUGE-L F-scores as the `rouge` package (pltrdy/rouge) computes them.

MedEvalKit reports `Rouge().get_scores(pred, target)[0][...]["f"]` from that package (checked against
github.com/pltrdy/rouge at c1b90a78c303b5d5956b1c1f2dac19cdd553d9b9, `rouge/rouge.py` and
`rouge/rouge_score.py`). Its quirks, reproduced:
  - text is cut into "sentences" at every period; empty pieces are dropped, each kept piece has its
    whitespace runs collapsed, and words are the pieces split on single spaces (so a piece of only
    spaces gives the word "");
  - n-grams and words are *sets* (the default `exclusive=True`): repeats count once, and bigrams run
    across sentence boundaries;
  - ROUGE-L is the summary-level union LCS: for every reference sentence and every hypothesis
    sentence, the words of one reconstructed LCS join a running set whose size is the overlap;
  - F = 2PR / (P + R + 1e-8);
  - a hypothesis or reference with no sentence (empty, or only periods) is an error ("Hypothesis is
    empty."); `rouge_f` returns None there.
"""

from __future__ import annotations

from itertools import chain


def sentences(text: str) -> list[str]:
    """The package's sentence split: at periods, empty pieces dropped, whitespace runs collapsed."""
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _words(sents: list[str]) -> list[str]:
    return list(chain.from_iterable(s.split(" ") for s in sents))


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _f(overlap: int, hyp_count: int, ref_count: int) -> float:
    precision = overlap / hyp_count if hyp_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    return 2.0 * (precision * recall / (precision + recall + 1e-8))


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of the LCS that the package reconstructs (ties go left, as its `_recon` does)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_f(hypothesis: str, reference: str) -> dict[str, float] | None:
    """{"rouge-1", "rouge-2", "rouge-l"} F-scores, or None where the package raises (no sentence)."""
    hyp, ref = sentences(hypothesis), sentences(reference)
    if not hyp or not ref:
        return None
    hyp_words, ref_words = _words(hyp), _words(ref)
    out = {}
    for n in (1, 2):
        h, r = _ngrams(hyp_words, n), _ngrams(ref_words, n)
        out[f"rouge-{n}"] = _f(len(h & r), len(h), len(r))
    union: set[str] = set()
    for ref_sentence in ref:
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_sentence.split(" "), hyp_sentence.split(" "))
    out["rouge-l"] = _f(len(union), len(set(hyp_words)), len(set(ref_words)))
    return out
