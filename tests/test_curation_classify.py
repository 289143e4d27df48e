"""Modality classification: the shipped rule table, negations, compound figures, user rules, the
image plug-in, the CLI step and precision/recall on the labelled real captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medllava.curation import classify
from medllava.curation.modality import DEFAULT_RULES, LABELS, ModalityClassifier, load_rules
from medllava.curation.modality_eval import evaluate, format_table, per_label
from medllava.io import DataError

ASSETS = Path(__file__).parent / "assets" / "curation"


@pytest.fixture(scope="module")
def clf():
    return ModalityClassifier(load_rules())


def test_shipped_rules_load_and_cover_every_label():
    rules = load_rules()
    assert DEFAULT_RULES.name == "modality_rules.yaml"
    assert {c.label for c in rules.cues} == set(LABELS)
    assert "no" in rules.negate_before  # quoted in the YAML, not read as false


@pytest.mark.parametrize("caption, expected", [
    ("Chest X ray after thoracoplasty", ["chest_xray"]),
    ("PA CXR showing cardiomegaly", ["chest_xray"]),
    ("Contrast-enhanced pelvic CT scan showing the aneurysm", ["ct_scan"]),
    ("Axial computed tomography demonstrates enlargement", ["ct_scan"]),
    ("Sagittal T2-weighted image of the lumbar spine", ["mri"]),
    ("Axial FLAIR sequence shows hyperintensity", ["mri"]),
    ("The orbital MRI reveals proptosis", ["mri"]),
    ("Tumour cells (H&E, x400)", ["histology"]),
    ("IHC for CD20 is strongly positive", ["histology"]),
    ("PAS/Alcian blue stained intestinal sections", ["histology"]),
    ("Gross specimen of the eyeball", ["gross"]),
    ("Kaplan-Meier survival curves of both arms", ["other"]),
    ("Western blot of lysates", ["other"]),
    ("", ["other"]),
])
def test_modalities_from_captions(clf, caption, expected):
    assert clf.classify(caption).modalities == expected


@pytest.mark.parametrize("caption, expected", [
    ("No CT findings; chest radiograph shows effusion", ["chest_xray"]),
    ("Lesion not shown on MRI. Biopsy: H&E stain", ["histology"]),
    ("MRI was not performed; the photomicrograph shows granulomas", ["histology"]),
    ("Axial CT without contrast (A) and MRI (B)", ["ct_scan", "mri"]),  # "without" negates contrast, not MRI
    ("Chest x-ray showed no pleural effusion", ["chest_xray"]),  # negation after the modality names a finding
])
def test_negations(clf, caption, expected):
    assert clf.classify(caption).modalities == expected


def test_case_matters_for_short_abbreviations(clf):
    assert clf.classify("Mr. Smith's cut on the hand").modalities == ["other"]
    assert clf.classify("he was treated; ct values rose").modalities == ["other"]
    assert clf.classify("HE-stained section").modalities == ["histology"]


def test_compound_figures(clf):
    mixed = clf.classify("(A) Axial CT shows a mass. (B) Photomicrograph of the biopsy (H&E, x200).")
    assert mixed.modalities == ["ct_scan", "histology"] and mixed.compound
    same_kind = clf.classify("(A) Axial CT before and (B) coronal CT after treatment.")
    assert same_kind.modalities == ["ct_scan"] and not same_kind.compound
    no_panels = clf.classify("CT and MRI of the same patient")
    assert no_panels.modalities == ["ct_scan", "mri"] and not no_panels.compound


def test_confidence_combines_cues_and_threshold(clf):
    weak = clf.classify("Radiograph of the patient")
    assert weak.modalities == ["other"] and 0 < weak.scores["chest_xray"] < 0.5
    stronger = clf.classify("Radiograph showing pneumothorax")  # a chest finding tips the bare radiograph over
    assert stronger.modalities == ["chest_xray"] and stronger.scores["chest_xray"] > weak.scores["chest_xray"]
    strict = ModalityClassifier(load_rules(), min_confidence=0.99)
    assert strict.classify("Axial CT").modalities == ["other"]


def test_mentions_used_only_when_the_caption_names_no_modality(clf):
    quiet = clf.classify("Follow-up image at 3 months", ["Effusion resolved on chest x-ray (Figure 5)."])
    assert quiet.modalities == ["chest_xray"] and quiet.scores["chest_xray"] < 0.95
    loud = clf.classify("Axial T2W MR image", ["CT and MRI are also important (Figure 3)."])
    assert loud.modalities == ["mri"]


def test_user_rules_extend_the_table(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("labels:\n  other:\n    - {pattern: 'dermatoscop\\w*', weight: 0.9}\n"
                     "  ct_scan:\n    - {pattern: 'scanogram', weight: 0.9}\n"
                     "negation:\n  before: ['ruled out by']\n")
    clf = ModalityClassifier(load_rules([rules]))
    assert clf.classify("CT scanogram of the legs").modalities == ["ct_scan"]
    assert clf.classify("scanogram of the legs").scores["ct_scan"] == 0.9
    assert clf.classify("Fracture ruled out by CT; photomicrograph").modalities == ["histology"]


@pytest.mark.parametrize("text, message", [
    ("labels:\n  xray:\n    - {pattern: 'x', weight: 0.5}\n", "unknown label"),
    ("labels:\n  mri:\n    - {pattern: '(MR)', weight: 0.5}\n", "capturing group"),
    ("labels:\n  mri:\n    - {pattern: '(?:MR', weight: 0.5}\n", "does not compile"),
    ("labels:\n  mri:\n    - {pattern: 'MR', weight: 2}\n", "weight"),
    ("negation:\n  before: [no]\n", "quote them"),
])
def test_bad_rules_name_the_file_and_entry(tmp_path, text, message):
    rules = tmp_path / "bad.yaml"
    rules.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        load_rules([rules])
    assert str(rules) in str(err.value)


PLUGIN = '''
def scores(path):
    if path.endswith("broken.png"):
        raise OSError("cannot read " + path)
    return {"histology": 1.0} if "micro" in path else {"ct_scan": 0.2}
'''


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class _Args:
    def __init__(self, **kw):
        self.__dict__.update(dict(rules=[], min_confidence=0.5, keep=(), image_classifier=None, image_root=None,
                                  image_weight=0.5, workers=1), **kw)


def test_classify_step_with_image_plugin_keep_and_bad_lines(tmp_path, monkeypatch, capsys):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "tiny_image_model.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "plug"))
    inp = _write(tmp_path / "in.jsonl", [
        {"id": "a", "caption": "Axial CT of the abdomen", "image": "a/ct.png"},
        {"id": "b", "caption": "Section of the lesion", "image": "b/micro.png"},  # text silent, image says histology
        {"id": "c", "caption": "Axial CT", "image": "c/broken.png"},  # plug-in fails: text decides
        "not json",
        {"caption": "no id"},
        {"pmid": "1", "pair_id": "1_F1", "fig_caption": "Bar graph of doses", "in_text_mention": []},
    ])
    out = tmp_path / "out.jsonl"
    classify.run(_Args(inp=inp, out=out, image_classifier="tiny_image_model:scores", image_root=tmp_path,
                       keep=("ct_scan", "histology")))
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == ["a", "b", "c"]  # the LLaVA-Med bar graph is "other": not kept
    assert rows["a"]["modality_scores"] == {"ct_scan": 0.55}  # 0.5 * 0.9 (text) + 0.5 * 0.2 (image)
    printed = capsys.readouterr().out
    assert "image classifier failed (text scores kept): 1" in printed
    assert "skipped 1: not a valid figure record" in printed and "skipped 1: record without an id" in printed
    assert rows["b"]["modalities"] == ["histology"] and rows["c"]["modality_scores"] == {"ct_scan": 0.9}


def test_classify_step_workers_match_single_process(tmp_path):
    rows = [{"id": f"r{i}", "caption": c} for i, c in enumerate(
        ["Axial CT", "H&E stain", "Gross specimen", "Bar chart", "(A) CT. (B) MRI."] * 3)]
    inp = _write(tmp_path / "in.jsonl", rows)
    classify.run(_Args(inp=inp, out=tmp_path / "one.jsonl"))
    classify.run(_Args(inp=inp, out=tmp_path / "two.jsonl", workers=2))
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    first = json.loads((tmp_path / "one.jsonl").read_text().splitlines()[4])
    assert first["modalities"] == ["ct_scan", "mri"] and first["compound"] is True


def test_per_label_metrics_by_hand():
    gold = [{"mri"}, {"ct_scan"}, {"other"}, {"ct_scan", "mri"}]
    pred = [{"mri"}, {"mri"}, {"other"}, {"ct_scan"}]
    m = per_label(gold, pred)
    assert (m["mri"]["precision"], m["mri"]["recall"]) == (0.5, 0.5)
    assert (m["ct_scan"]["precision"], m["ct_scan"]["recall"]) == (1.0, 0.5)
    assert m["gross"] == {"precision": 0.0, "recall": 0.0, "support": 0, "tp": 0, "fp": 0, "fn": 0}


def test_precision_recall_on_labelled_real_captions(capsys):
    metrics, wrong = evaluate(ASSETS / "modality_labelled.jsonl", ModalityClassifier(load_rules()))
    print(format_table(metrics))
    assert [metrics[label]["support"] for label in LABELS] == [2, 2, 2, 2, 2, 4]
    for label in LABELS:
        assert metrics[label]["precision"] == 1.0 and metrics[label]["recall"] == 1.0, (label, wrong)
