"""Caption splitting by panel labels (curation/subcaptions.py), on real PMC captions and every label style."""

from __future__ import annotations

from pathlib import Path

import pytest

from medllava.curation.jats import parse_article
from medllava.curation.subcaptions import expand, split_caption

ASSETS = Path(__file__).parent / "assets" / "curation"


@pytest.fixture(scope="module")
def pone_captions() -> dict[str, str]:
    """The real captions of PLoS ONE 0046493 (CC-BY), shipped in tests/assets."""
    article = parse_article((ASSETS / "pone.0046493.nxml").read_bytes())
    return {fig.figure_id[-4:]: fig.caption for fig in article.figures}


def test_real_caption_with_bare_letters_keeps_its_title_as_the_shared_part(pone_captions):
    sub = split_caption(pone_captions["g002"])
    assert sub.shared == "Inhibition of Lip-HSL proteins by MmPPOX."
    assert sub.labels == ["A", "B"]
    assert sub.segments[0].text.startswith("SDS-PAGE profile of the 9 Lip-HSL proteins")
    assert sub.segments[1].text.startswith("Residual activities of LipC")
    assert sub.caption_for("B").startswith("Inhibition of Lip-HSL proteins by MmPPOX. Residual activities")


def test_real_caption_with_labels_inside_a_sentence(pone_captions):
    sub = split_caption(pone_captions["g003"])
    assert sub.labels == ["A", "B", "C", "D"]
    assert [s.text for s in sub.segments[:2]] == ["LipH", "LipN"]  # "and" before C is not B's
    assert sub.segments[3].text.startswith("PMF spectra of LipN before (top) and after (bottom)")


def test_real_caption_without_labels_has_no_segments(pone_captions):
    sub = split_caption(pone_captions["g004"])
    assert sub.segments == () and sub.shared == pone_captions["g004"]


def test_an_abbreviation_is_not_a_panel_label():
    sub = split_caption("PAS stained sections of Winnie goblet cells (arrows). L, lumen.")
    assert sub.segments == ()


@pytest.mark.parametrize("caption, labels, texts, shared", [
    ("(A) Axial CT shows a mass. (B) Coronal MRI. (C) As in (A), after therapy.",
     ["A", "B", "C"], ["Axial CT shows a mass.", "Coronal MRI.", "As in (A), after therapy."], ""),
    ("Chest radiographs. (A\u2013C) Days 1 to 3. (D) Day 7.", ["A", "B", "C", "D"], ["Days 1 to 3.", "Day 7."],
     "Chest radiographs."),
    ("Case 2. A-B, T1 before and after contrast. C, T2.", ["A", "B", "C"], ["T1 before and after contrast.", "T2."],
     "Case 2."),
    ("Case 3. a) T1. b) T2 with contrast.", ["a", "b"], ["T1.", "T2 with contrast."], "Case 3."),
    ("(a, b) Sagittal views. (c) Axial.", ["a", "b", "c"], ["Sagittal views.", "Axial."], ""),
    ("Brain MRI:\n(Left ): Axial T2W image. (Right): Same infant, enlarged space.", ["left", "right"],
     ["Axial T2W image.", "Same infant, enlarged space."], "Brain MRI:"),
    ("Top: before treatment. Bottom: after treatment.", ["top", "bottom"],
     ["before treatment.", "after treatment."], ""),
])
def test_label_styles(caption, labels, texts, shared):
    sub = split_caption(caption)
    assert sub.labels == labels
    assert [s.text for s in sub.segments] == texts
    assert sub.shared == shared


def test_labels_after_their_text_close_their_segment():
    sub = split_caption("Follow-up of case 1. Axial CT shows a mass (A) and coronal MRI shows oedema (B).")
    assert sub.shared == "Follow-up of case 1."
    assert [s.text for s in sub.segments] == ["Axial CT shows a mass", "coronal MRI shows oedema"]


def test_a_back_reference_or_a_gap_does_not_start_a_segment():
    sub = split_caption("(A) Before. (B) After; compare (A). (D) Unrelated.")
    assert sub.labels == ["A", "B"]
    assert sub.segments[1].text == "After; compare (A). (D) Unrelated."


def test_ranges_expand_and_one_label_is_not_a_split():
    assert expand("A-D") == ("A", "B", "C", "D")
    assert expand("a\u2013c") == ("a", "b", "c")
    assert expand("A, C and E") == ("A", "C", "E")
    assert split_caption("Vitamin A, given daily.").segments == ()
