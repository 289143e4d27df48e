"""Metrics, hand-checked: the LLaVA-Med scorer's quirks one by one, its whole table on a
prediction file built to hit each quirk, the strict family, BLEU and the bootstrap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medllava.eval.metrics import llava_med, strict
from medllava.eval.metrics.bleu import sentence_bleu
from medllava.eval.metrics.stats import bootstrap_ci
from medllava.eval.predictions import pair_predictions, read_predictions
from medllava.eval.results import score_examples
from medllava.eval.tasks import load_task

QUIRKS = Path(__file__).parent / "assets" / "eval" / "quirks"


# -- LLaVA-Med normalization ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("yes.", "yes"),                           # trailing period dropped
    ("3.5 cm.", "3.5 cm"),                     # a period before a digit stays
    ("left/right", "left right"),              # punctuation between words becomes a space
    ("left / right", "left right"),            # ... and is deleted when it touches a space
    ("left/right (1,2)", "leftright 12"),      # digit,digit anywhere: all punctuation deleted
    ("1,000", "1000"),
    ("the liver, e.g. a lobe", "liver eg lobe"),  # articles dropped, "e.g." loses its periods
    ("two or none", "2 or 0"),                 # number words, and "none" as zero
    ("dont know", "don't know"),               # contractions get their apostrophe back
    ("couldnt've", "couldn't've"),
    ("somebody'd", "somebodyd"),               # the table's one reversed entry
    ("it's 50%: ok", "it's 50%: ok"),          # apostrophes, % and colons are not touched
])
def test_llava_med_normalize(text, expected):
    assert llava_med.normalize(text) == expected


def test_llava_med_normalize_drops_at_most_32_periods():
    assert llava_med.normalize("x" + "." * 40) == "x" + "." * 8
    assert llava_med.normalize(llava_med.normalize("x" + "." * 40)) == "x"


# -- LLaVA-Med closed and open rules ---------------------------------------------------------

def test_llava_med_closed_is_substring_containment():
    assert llava_med.closed_accuracy(["Yes"], ["yes"]) == 1.0
    assert llava_med.closed_accuracy(["It looks normal."], ["no"]) == 1.0  # "no" inside "normal"
    assert llava_med.closed_accuracy(["Unknown"], ["no"]) == 1.0           # ... and inside "unknown"
    assert llava_med.closed_accuracy(["Yes, no doubt"], ["no"]) == 1.0     # both words: always right
    assert llava_med.closed_accuracy(["No."], ["yes"]) == 0.0
    assert llava_med.closed_accuracy(["yes", "no"], ["yes", "yes"]) == 0.5


def test_llava_med_gated_closed_drops_wrong_yes_no_answers():
    # A wrong answer containing yes/no leaves the denominator; one without scores 0,
    # even when right ("ct" for "CT").
    scores = [llava_med.item_scores(p, t, "closed")["closed_accuracy_gated"]
              for p, t in [("no", "yes"), ("ct", "CT"), ("yes", "yes")]]
    assert scores == [None, 0.0, 1.0]
    assert llava_med.closed_accuracy_gated(["no", "ct", "yes"], ["yes", "CT", "yes"]) == 0.5


def test_llava_med_open_recall_counts_repeated_words():
    assert llava_med.open_recall(["left left"], ["left lung"]) == pytest.approx(2 / 3)
    assert llava_med.open_recall(["left"], ["left lung"]) == 0.5
    s = llava_med.item_scores("Left left", "left lung", "open")
    assert (s["precision"], s["f1"]) == (1.0, pytest.approx(0.8))


def test_llava_med_exact_match_is_distinct_truth_words_over_prediction_length():
    assert llava_med.item_scores("yes yes", "yes", "open")["exact_match"] == 0.5
    assert llava_med.item_scores("left lung", "left lung", "open")["exact_match"] == 1.0
    assert llava_med.item_scores("", "lung", "open")["exact_match"] == 0.0


def test_llava_med_open_hit_and_candidate_matching():
    assert llava_med.item_scores("near the heart", "ear", "open")["open_hit"] == 1.0
    cands = ["left lung", 2, "right lobe"]
    assert llava_med.item_scores("the left side", "left lung", "open", cands)["open_candidate_accuracy"] == 1.0
    # No candidate shares a word: the first candidate wins the tie and is wrong.
    assert llava_med.item_scores("nothing", "right lobe", "open", cands)["open_candidate_accuracy"] == 0.0
    assert llava_med.item_scores("two", "2", "open", cands)["open_candidate_accuracy"] == 1.0


def test_llava_med_whole_table_on_the_quirk_file():
    """Every number LLaVA-Med's scorer prints for tests/assets/eval/quirks, derived by hand.

    closed (truth <- prediction)            contains  gated  recall
      c1 no  <- "It looks normal."               1       1      0
      c2 yes <- "No, there is no effusion."      0     drop     0
      c3 Yes <- "yes"                            1       1      1
      c4 no  <- "Unknown"                        1       1      0
      c5 MRI <- "This is a CT scan"              0       0      0
      c6 CT  <- "ct"                             1       0      1
      c7 no  <- "Yes, no doubt"                  1       1      1
    open: normalized prediction | recall precision f1 exact hit bleu1 bleu2 candidate
      o1 "left left" vs "left lung"      2/3  1    .8   .5  0  .5  0  1
      o2 "2 kidneys" vs "2"              1    .5   2/3  .5  1  .5  0  1
      o3 "right lobe" vs "right lobe"    1    1    1    1   1  1   1  1
      o4 "near heart" vs "ear"           0    0    0    0   1  0   0  0
      o5 "about 1000 cells approx"/"1000" 1   .25  .4   .25 1  .25 0  1
      o6 "leftright 12" vs "left right"  0    0    0    0   0  0   0  0
      o7 (no prediction) vs "brain"      0    0    0    0   0  0   0  0
      o8 "effusion" + 8 periods          1    1    1    1   1  0   0  1
    (o8: the first pass strips only 32 of 40 periods, so BLEU sees "effusion........" while
    the F1 helpers normalize again and see "effusion". 3- and 4-gram BLEU is ~1e-154 or less.)
    """
    task = load_task("inhouse", QUIRKS, "test")
    pairing = pair_predictions(task.examples, read_predictions(QUIRKS / "predictions.jsonl"))
    assert pairing.method == "id" and pairing.missing == ["o7"]
    candidates = json.loads((QUIRKS / "candidates.json").read_text())["0"]
    results, _ = score_examples(task.examples, pairing.texts, candidates=candidates, n_boot=0)
    got = {k: v["value"] for k, v in results["llava_med"].items()}
    expected = {
        "closed_accuracy": 5 / 7, "closed_accuracy_gated": 4 / 6, "closed_recall": 3 / 7,
        "open_recall": (2 / 3 + 4) / 8, "precision": 3.75 / 8, "f1": (0.8 + 2 / 3 + 1 + 0.4 + 1) / 8,
        "exact_match": 3.25 / 8, "open_hit": 5 / 8, "open_candidate_accuracy": 5 / 8,
        "bleu": 0.0, "bleu_1": 2.25 / 8, "bleu_2": 1 / 8, "bleu_3": 0.0,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    assert results["llava_med"]["closed_accuracy_gated"]["n_scored"] == 6
    strict_got = {k: v["value"] for k, v in results["strict"].items()}
    # Strict: only c3 and c6 are right (c1/c4 name no option, c2/c5/c7 name the wrong one);
    # open exact matches o3 and o8; token F1 adds partial credit (o6 "left right 1 2" -> 2/3).
    assert strict_got == pytest.approx({"closed_accuracy": 2 / 7, "open_exact_match": 2 / 8,
                                        "open_f1": (0.5 + 2 / 3 + 1 + 0.4 + 2 / 3 + 1) / 8,
                                        "overall_accuracy": 4 / 15}, abs=1e-4)


# -- strict family -------------------------------------------------------------------------

def test_strict_closed_reads_the_first_option():
    assert strict.closed_accuracy(["Yes"], ["yes"]) == 1.0
    assert strict.closed_accuracy(["It looks normal."], ["no"]) == 0.0
    assert strict.closed_accuracy(["No, yes"], ["no"]) == 1.0
    assert strict.closed_accuracy(["Yes, no doubt"], ["no"]) == 0.0
    assert strict.closed_accuracy(["The eyes are fine"], ["yes"]) == 0.0  # "yes" inside "eyes" is not a word
    assert strict.closed_accuracy(["It is a CT, not an MRI"], ["MRI"], choices=["CT"]) == 0.0
    assert strict.closed_accuracy(["MRI of the head"], ["MRI"], choices=["CT"]) == 1.0
    assert strict.extract_choice("the left side", ["left", "left side", "right"]) == "left side"  # longest at a position


def test_strict_chinese_answers_tokenize_per_character():
    assert strict.tokens("不包含肝脏") == ["不", "包", "含", "肝", "脏"]
    assert strict.normalize("不包含 CT 肝脏!") == "不包含 ct 肝脏"
    assert strict.extract_choice("不包含。", ["包含", "不包含"]) == "不包含"
    assert strict.closed_correct("不包含", "不包含", ["包含"])
    assert not strict.closed_correct("包含", "不包含", ["包含"])
    assert strict.token_f1("肝脏", "肝") == pytest.approx(2 / 3)


def test_strict_open_exact_match_and_f1():
    assert strict.open_exact_match(["The Right-lobe."], ["right lobe"]) == 1.0
    assert strict.open_exact_match(["two"], ["2"]) == 1.0
    assert strict.open_exact_match(["1,000 cells"], ["1000 cells"]) == 1.0
    assert strict.open_exact_match(["3.5 cm"], ["35 cm"]) == 0.0
    assert strict.open_f1(["left left"], ["left lung"]) == 0.5  # repeats count once
    assert strict.open_f1([""], [""]) == 1.0
    assert strict.open_f1(["lung"], ["heart"]) == 0.0


# -- BLEU and bootstrap --------------------------------------------------------------------

def test_sentence_bleu_by_hand():
    ref = "the cat sat on the mat".split()
    assert sentence_bleu(ref, ref) == pytest.approx(1.0)
    # 4 of 5 unigrams, 2 of 4 bigrams; hypothesis shorter by one: penalty exp(1 - 6/5).
    hyp = "the cat sat the dog".split()
    assert sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(0.8 * math.exp(-0.2))
    assert sentence_bleu(ref, hyp, (0, 1, 0, 0)) == pytest.approx(0.5 * math.exp(-0.2))
    assert sentence_bleu(ref, [], (1, 0, 0, 0)) == 0.0
    assert sentence_bleu(ref, ["dog"]) == 0.0


def test_sentence_bleu_matches_nltk():
    import warnings

    from nltk.translate import bleu_score as nltk_bleu  # the `test` extra; BLEU needs no downloaded corpora

    pairs = [("left lung", "left left"), ("the cat sat on the mat", "the cat sat on a mat today"), ("a", "a b")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ref, hyp in pairs:
            for w in [(0.25,) * 4, (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)]:
                want = nltk_bleu.sentence_bleu([ref.split()], hyp.split(), weights=w)
                assert sentence_bleu(ref.split(), hyp.split(), w) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_bootstrap_is_seeded_and_sane():
    values = [1.0] * 30 + [0.0] * 20
    a = bootstrap_ci(values, n_boot=500, seed=7)
    assert a == bootstrap_ci(values, n_boot=500, seed=7)
    assert a != bootstrap_ci(values, n_boot=500, seed=8)
    assert a[0] < 0.6 < a[1] and 0.4 < a[0] and a[1] < 0.8
    assert bootstrap_ci([1.0] * 10, n_boot=100) == (1.0, 1.0)
    assert bootstrap_ci([], n_boot=100) is None
    # None marks a question resampled but left out of the mean: only 1.0s are kept here.
    assert bootstrap_ci([1.0, None, 1.0, None], n_boot=200) == (1.0, 1.0)
