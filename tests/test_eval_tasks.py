"""Task loaders on real-format fixtures: VQA-RAD (MEVF, official, parquet), SLAKE, PathVQA
(LXMERT JSON, pickles, parquet), in-house CSV/JSONL and LLaVA conversation files."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import pytest

from medllava.io import DataError

from medllava.eval.tasks import TASKS, load_task
from medllava.eval.tasks.safe_pickle import load_plain_pickle, loads_plain

ASSETS = Path(__file__).parent / "assets" / "eval"


def kinds(task) -> Counter:
    return Counter(ex.answer_type for ex in task)


# -- VQA-RAD -------------------------------------------------------------------------------

def test_vqa_rad_mevf_fixture_counts_and_fields():
    task = load_task("vqa-rad", ASSETS / "vqa_rad", "test")
    assert task.source.name == "testset.json"
    assert len(task) == 16 and kinds(task) == {"closed": 10, "open": 6}
    ex = task.examples[0]
    assert (ex.qid, ex.question, ex.answer, ex.answer_type) == ("11", "Is there evidence of an aortic aneurysm?", "yes", "closed")
    assert ex.image == "images/synpic42202.jpg"
    assert ex.meta == {"image_organ": "CHEST", "question_type": "PRES", "phrase_type": "freeform"}
    assert task.image_path(ex) == (ASSETS / "vqa_rad" / "images" / "synpic42202.jpg").resolve()
    # A question tagged with two types counts under both.
    multi = next(e for e in task if e.qid == "47")
    assert task.categories(multi) == {"question type": ["SIZE", "PRES"], "organ": ["ABD"]}


def test_vqa_rad_official_release_matches_mevf_and_handles_quirks():
    official = load_task("vqa-rad", ASSETS / "vqa_rad", "test", source="official")
    mevf = load_task("vqa-rad", ASSETS / "vqa_rad", "test", source="mevf")
    # The official test set is the test_* phrase types: the same questions as the MEVF test file.
    assert [(e.question, e.answer, e.answer_type) for e in official] == [(e.question, e.answer, e.answer_type) for e in mevf]
    assert {e.meta["phrase_type"] for e in official} == {"test_freeform", "test_para"}
    train = {e.qid: e for e in load_task("vqa-rad", ASSETS / "vqa_rad", "train", source="official")}
    assert set(train) == {"0", "1511", "2156", "2157", "2234"}  # qid "0" is a string in the release
    assert train["2156"].answer_type == "closed"  # stored as "CLOSED " with a trailing space
    assert (train["1511"].answer, train["2234"].answer) == ("4", "12")  # numeric answers become text


def test_vqa_rad_real_test_split_counts(shared_data):
    root = shared_data / "vqa_rad"
    for source in ("mevf", "official"):
        task = load_task("vqa-rad", root, "test", source=source)
        assert len(task) == 451 and kinds(task) == {"open": 179, "closed": 272}, source
    assert len(load_task("vqa-rad", root, "train", source="mevf")) == 3064


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buf, format="PNG")
    return buf.getvalue()


def test_vqa_rad_and_pathvqa_parquet_release(tmp_path):
    png = _png()
    rows = [{"image": {"bytes": png, "path": "synpic1.jpg"}, "question": "Is this a CT?", "answer": "Yes"},
            {"image": {"bytes": png, "path": None}, "question": "What organ is shown?", "answer": "liver"}]
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    for name in ("vqa-rad", "pathvqa"):
        task = load_task(name, tmp_path, "test")
        assert [(e.qid, e.answer_type, e.image) for e in task] == [
            ("test-0", "closed", "synpic1.jpg"), ("test-1", "open", "test-1.jpg")]
        assert task.examples[0].image_bytes == png


def test_parquet_row_without_image_bytes_is_named(tmp_path):
    _write_parquet(tmp_path / "test.parquet", [{"image": {"bytes": None, "path": "x.jpg"}, "question": "q?", "answer": "no"}])
    with pytest.raises(DataError, match=r"test\.parquet: row 0: expected an image column"):
        load_task("vqa-rad", tmp_path, "test")


# -- SLAKE ---------------------------------------------------------------------------------

def test_slake_english_by_default_and_chinese_on_request():
    en = load_task("slake", ASSETS / "slake", "test")
    assert len(en) == 6 and kinds(en) == {"open": 3, "closed": 3}
    ex = en.examples[0]
    assert (ex.qid, ex.answer, ex.image) == ("11934", "CT", "imgs/xmlab102/source.jpg")
    assert en.categories(ex) == {"content type": ["Modality"], "organ": ["Lung"], "modality": ["CT"], "language": ["en"]}
    zh = load_task("slake", ASSETS / "slake", "test", lang="zh")
    assert [(e.qid, e.answer, e.answer_type) for e in zh] == [("12995", "MRI", "open"), ("12998", "包含", "closed")]
    assert len(load_task("slake", ASSETS / "slake", "test", lang="all")) == 8
    assert len(load_task("slake", ASSETS / "slake", "val")) == 2  # alias of validate.json
    with pytest.raises(ValueError, match="unknown lang"):
        load_task("slake", ASSETS / "slake", "test", lang="fr")


def test_slake_real_sample(shared_data):
    task = load_task("slake", shared_data / "slake", "test", file=shared_data / "slake" / "test_sample.json")
    assert len(task) == 25 and all(e.meta["q_lang"] == "en" for e in task)


# -- PathVQA -------------------------------------------------------------------------------

def test_pathvqa_lxmert_json_ungroups_questions():
    task = load_task("pathvqa", ASSETS / "pathvqa", "test")
    assert len(task) == 13 and kinds(task) == {"open": 5, "closed": 8}
    first = task.examples[0]
    assert (first.qid, first.answer, first.answer_type, first.image) == (
        "test_0001-0", "squamous cell carcinoma", "open", "images/test/test_0001.jpg")
    assert [e.answer for e in task if e.meta["img_id"] == "test_0007"][:2] == ["a partly formed unerupted tooth", "wall"]


def test_pathvqa_real_sample(shared_data):
    path = shared_data / "pathvqa" / "pvqa_test_sample.json"
    task = load_task("pathvqa", path.parent, "test", file=path)
    assert len(task) == 60
    assert all((e.answer_type == "closed") == (e.answer in ("yes", "no")) for e in task)


def test_pathvqa_pickles(tmp_path):
    vqa = [{"answer_type": "yes/no", "img_id": "test_0001", "label": {"yes": 1}, "question_id": 100001000,
            "question_type": "is", "sent": "Is this carcinoma?"},
           {"answer_type": "other", "img_id": "test_0001", "label": {"a nest": 0.3, "squamous cells": 1},
            "question_id": 100001001, "question_type": "what", "sent": "What is shown?"}]
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "test_vqa.pkl").write_bytes(pickle.dumps(vqa, protocol=2))
    task = load_task("pathvqa", tmp_path, "test", source="pickle")
    assert [(e.qid, e.answer, e.answer_type, e.meta["question_type"]) for e in task] == [
        ("100001000", "yes", "closed", "is"), ("100001001", "squamous cells", "open", "what")]
    qa = [{"image": "val_0002", "question": "Is it benign?", "answer": "no"}]
    (tmp_path / "qas" / "val").mkdir()
    (tmp_path / "qas" / "val" / "val_qa.pkl").write_bytes(pickle.dumps(qa))
    task = load_task("pathvqa", tmp_path, "validate", source="pickle")
    assert [(e.qid, e.answer_type, e.image) for e in task] == [("val-0", "closed", "images/val/val_0002.jpg")]


class _RunsCode:
    """What an attacker pickles: unpickling it would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_unpickler_refuses_code_before_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "qas" / "test_vqa.pkl"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps([{"sent": "q", "payload": _RunsCode(marker)}]))
    with pytest.raises(DataError, match=r"test_vqa\.pkl: refusing to load pickle: it references (posix|nt)\.system"):
        load_task("pathvqa", tmp_path, "test", source="pickle")
    assert not marker.exists()
    # builtins are not all plain data: eval must be refused too.
    with pytest.raises(DataError, match=r"references builtins\.eval"):
        loads_plain(pickle.dumps(_Eval()), "evil.pkl")
    assert loads_plain(pickle.dumps({"a": [1, 2.5, "x", (True, None)], "b": {3}}, protocol=0)) == {
        "a": [1, 2.5, "x", (True, None)], "b": {3}}


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_truncated_pickle_is_a_data_error(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps([{"a": 1}])[:-3])
    with pytest.raises(DataError, match=r"bad\.pkl: not a readable pickle"):
        load_plain_pickle(path)


# -- in-house ------------------------------------------------------------------------------

def test_inhouse_csv():
    task = load_task("inhouse", ASSETS / "inhouse", "test")
    assert task.source.name == "test.csv"
    assert [(e.qid, e.answer, e.answer_type) for e in task] == [
        ("1", "yes", "closed"), ("2", "3", "open"), ("3", "No", "closed"), ("4", "left", "closed"), ("5", "liver", "open")]
    first = task.examples[0]
    assert first.image == "dicom/p001/s01.dcm"
    assert first.meta == {"patient_id": "P001", "study_id": "S01", "modality": "CT"}
    assert task.examples[3].question == "Where is the lesion, left or right?"
    assert task.image_path(task.examples[4]) == Path("/data/site/p003.dcm")


def test_inhouse_jsonl_numeric_answer_and_ids():
    task = load_task("inhouse", ASSETS / "inhouse", "test", file=ASSETS / "inhouse" / "test.jsonl")
    a, b = task.examples
    assert (a.qid, a.answer, a.answer_type, a.image, a.meta) == ("ih-1", "12", "open", "dicom/a.dcm", {"study_id": "S1"})
    assert (b.answer, b.answer_type, b.meta) == ("No.", "closed", {"patient_id": "P9"})


def test_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("image,question,answer,answer_type\nx.png,Is it?,yes,\ny.png,,no,\nz.png,Why?,because,MAYBE\n")
    with pytest.raises(DataError, match=r"test\.csv:3: missing or empty 'question'"):
        load_task("inhouse", tmp_path, "test")
    task = load_task("inhouse", tmp_path, "test", skip_bad=True)
    assert len(task) == 1 and len(task.skipped) == 2
    assert "test.csv:4: unknown answer_type 'MAYBE'" in task.skipped[1]


def test_unreadable_lines_stop_or_are_skipped(tmp_path):
    good = {"image": "a.png", "question": "Is it?", "answer": "yes"}
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n{broken\n" + json.dumps({**good, "qid": "b"}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl:2: not a valid JSON object"):
        load_task("inhouse", tmp_path, "test")
    task = load_task("inhouse", tmp_path, "test", skip_bad=True)
    assert [e.qid for e in task] == ["1", "b"] and len(task.skipped) == 1
    (tmp_path / "val.csv").write_text("image,question,answer\nx.png,Is it?,yes\ny.png,Why?,no,extra\n")
    with pytest.raises(DataError, match=r"val\.csv:3: 4 fields but the header has 3"):
        load_task("inhouse", tmp_path, "val")
    assert len(load_task("inhouse", tmp_path, "val", skip_bad=True)) == 1


def test_duplicate_qids_are_refused(tmp_path):
    rows = [{"qid": 5, "image_name": "a.jpg", "question": "q1?", "answer": "yes", "answer_type": "CLOSED"},
            {"qid": "5", "image_name": "b.jpg", "question": "q2?", "answer": "no", "answer_type": "CLOSED"}]
    (tmp_path / "testset.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"testset\.json: record 1: duplicate question id '5' \(first at .*record 0\)"):
        load_task("vqa-rad", tmp_path, "test")


def test_llava_conversation_ground_truth(tmp_path):
    rows = [{"id": "q7", "image": "synpic1.jpg", "answer_type": "CLOSED",
             "conversatons": [{"from": "human", "value": "<image>\nIs there a mass?"}, {"from": "gpt", "value": "No"}]},
            {"id": "q8", "image": "synpic1.jpg",
             "conversations": [{"from": "human", "value": "Where is it?\n<image>"}, {"from": "gpt", "value": "left"}]}]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows))
    task = load_task("slake", tmp_path, "test", file=path)
    assert [(e.qid, e.question, e.answer, e.answer_type) for e in task] == [
        ("q7", "Is there a mass?", "No", "closed"), ("q8", "Where is it?", "left", "open")]


def test_unknown_task_split_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        load_task("vqa", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_task("slake", ASSETS / "slake", "dev")
    with pytest.raises(FileNotFoundError, match="no mevf/official/parquet release for split 'test'"):
        load_task("vqa-rad", tmp_path, "test")
    with pytest.raises(ValueError, match=r"slake: unknown option source \(this task takes: lang\)"):
        load_task("slake", ASSETS / "slake", "test", source="official")
    assert set(TASKS) == {"vqa-rad", "slake", "pathvqa", "inhouse"}
