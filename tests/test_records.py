"""Record schema: reading JSON/JSONL (incl. LLaVA-Med's `conversatons`), validation errors that name
file and record, image path containment, lenient reads that skip and count."""

from __future__ import annotations

import json

import pytest

from medllava.io import DataError, iter_json_array
from medllava.records import ReadReport, RecordError, check_image_path, iter_records, load_records, normalize_record


def conv(*values, image="<image>\n"):
    turns = []
    for i, v in enumerate(values):
        role = "human" if i % 2 == 0 else "gpt"
        turns.append({"from": role, "value": (image if i == 0 else "") + v})
    return turns


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_json_array_and_jsonl_alike(tmp_path):
    rows = [{"id": i, "image": f"{i}.png", "conversations": conv("What?", "A CT.")} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "a.jsonl", rows)
    from_array = list(iter_records(tmp_path / "a.json"))
    from_lines = list(iter_records(tmp_path / "a.jsonl"))
    assert from_array == from_lines
    assert [r["id"] for r in from_array] == ["0", "1", "2"]  # ids become strings


def test_llava_med_misspelled_key_is_accepted(tmp_path):
    row = {"id": "pmc_1", "image": "x/1.jpg", "conversatons": conv("Describe.", "A biopsy.")}
    [rec] = iter_records(write_jsonl(tmp_path / "m.jsonl", [row]))
    assert rec["conversations"][1] == {"from": "gpt", "value": "A biopsy."}
    assert "conversatons" not in rec


@pytest.mark.parametrize(
    "turns, message",
    [
        ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "<image>\nq"}], "alternate starting with human"),
        (conv("q", "a", "q2", "a2")[:3], "last turn must be from gpt"),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "robot", "value": "a"}], "unknown role 'robot'"),
        (conv("q <image>", "a"), "2 <image> placeholders but 1 images"),
        (conv("q", "a", image=""), "0 <image> placeholders but 1 images"),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "see <image>"}], "assistant turn"),
        ([], "missing or empty 'conversations'"),
    ],
)
def test_schema_errors_name_file_and_record(tmp_path, turns, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "ok", "image": "a.png", "conversations": conv("q", "a")},
                                                 {"id": "r7", "image": "a.png", "conversations": turns}])
    with pytest.raises(RecordError) as err:
        list(iter_records(path))
    text = str(err.value)
    assert str(path) in text and "line 2" in text and "'r7'" in text and message in text


@pytest.mark.parametrize("bad", ["../secret.png", "a/../../b.png", "/etc/passwd", "C:\\x.png", "..", ""])
def test_image_paths_escaping_the_root_are_refused(bad):
    with pytest.raises(ValueError):
        check_image_path(bad)


def test_image_paths_inside_the_root_are_normalised():
    assert check_image_path("a/./b/../c.png") == "a/c.png"
    assert check_image_path("x\\y.png") == "x/y.png"


def test_escape_is_refused_in_a_record():
    with pytest.raises(RecordError, match="escapes the image root"):
        normalize_record({"id": 1, "image": "../../x.png", "conversations": conv("q", "a")}, "f.json: record 0")


def test_text_only_and_multi_image_records():
    text_only = normalize_record({"id": 1, "conversations": conv("hello", "hi", image="")})
    assert text_only["image"] is None
    two = normalize_record({"id": 2, "image": ["a.png", "b.png"], "conversations": conv("<image> vs", "same")})
    assert two["image"] == ["a.png", "b.png"]


def test_lenient_read_skips_counts_and_reports(tmp_path):
    good = {"id": "g", "image": "a.png", "conversations": conv("q", "a")}
    bad = {"id": "b", "image": "/abs.png", "conversations": conv("q", "a")}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n")
    report = ReadReport()
    kept = list(iter_records(path, skip_bad=True, report=report))
    assert len(kept) == 2 and report.kept == 2 and len(report.skipped) == 2
    assert f"{path}:2" in report.skipped[0] and "absolute" in report.skipped[1]
    assert "2 skipped" in report.summary()


def test_broken_json_array_names_the_record(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1}, {"id": 2, "conversations": [}]')
    with pytest.raises(DataError, match=r"broken.json: record 1"):
        list(iter_json_array(path))


def test_json_array_streams_in_small_chunks(tmp_path):
    rows = [{"id": i, "text": "x" * (i % 97)} for i in range(500)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows))
    assert [obj for _, obj in iter_json_array(path, chunk_size=64)] == rows


def test_load_records_builds_an_arrow_dataset(tmp_path):
    rows = [{"id": i, "image": f"{i}.png", "conversatons": conv("q", f"a{i}")} for i in range(5)]
    ds = load_records(write_jsonl(tmp_path / "d.jsonl", rows), cache_dir=tmp_path / "cache")
    assert len(ds) == 5 and ds[3]["images"] == ["3.png"]
    assert ds[3]["conversations"][1]["value"] == "a3"
    assert ds.cache_files and all(f["filename"].startswith(str(tmp_path / "cache")) for f in ds.cache_files)
