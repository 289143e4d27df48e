"""`medllava chat`: one image (DICOM file or series folder) and one question in, a greedy answer out,
asked the way the head's head.json says; a DICOM series folder gives its middle slice by InstanceNumber."""

from __future__ import annotations

import argparse
import json
import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medllava.commands import chat
from medllava.heads import HeadInfo, write_head_info
from medllava.images import ImageLoadError, load_image

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chat.register(parser.add_subparsers())
    return parser.parse_args(["chat", *argv])


def test_chat_answers_a_question_about_a_dicom_file(tiny, tiny_checkpoint, capsys):
    args = parse("--model", str(tiny_checkpoint), "--image", CT, "--question", "Is there a mass?",
                 "--max-new-tokens", "6")
    assert chat.run_chat(args) == 0
    printed = capsys.readouterr().out.strip()
    model, processor = tiny
    expected = chat.answer_batch(model, processor, [load_image(CT)], ["Is there a mass?"], "vicuna_v1", 6)
    assert printed == expected[0] and printed  # the same greedy answer as asking the model directly


def test_the_head_json_decides_how_the_question_is_asked(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full_head"
    shutil.copytree(tiny_checkpoint, full)
    write_head_info(full, HeadInfo(task="t", template="mistral_instruct", prompt_style="llava-med",
                                   closed_options=["left", "right"]))
    asked = {}

    def fake_answer(model, processor, images, questions, template, max_new_tokens):
        asked.update(questions=questions, template=template, size=images[0].size)
        return ["left"]

    monkeypatch.setattr(chat, "answer_batch", fake_answer)
    chat.run_chat(parse("--model", str(full), "--image", CT, "--question", "Which side?", "--closed"))
    assert capsys.readouterr().out.strip() == "left"
    assert asked["template"] == "mistral_instruct"
    assert asked["questions"] == ["Which side?\nPlease choose from the following two options: [left, right]"]
    chat.run_chat(parse("--model", str(full), "--image", CT, "--question", "Which side?", "--prompt-style", "short"))
    assert asked["questions"] == ["Which side?\nAnswer the question using a single word or phrase."]
    assert asked["size"] == (128, 128)  # CT_small is 128 x 128


def write_series(folder, numbers, series_uid=None):
    """Copies of CT_small as one series, one file per InstanceNumber, file names in another order."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    for i, number in enumerate(numbers):
        ds = pydicom.dcmread(CT)
        ds.InstanceNumber = number
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / f"img{len(numbers) - i:03d}.dcm")
    return uid


def instance_number(path) -> int:
    return int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber)


def test_a_series_folder_gives_its_middle_slice_by_instance_number(tmp_path):
    write_series(tmp_path / "series", [5, 1, 4, 2, 3])
    (tmp_path / "series" / "notes.txt").write_text("not an image")
    assert instance_number(chat.series_slice(tmp_path / "series")) == 3
    write_series(tmp_path / "even", [4, 1, 3, 2])
    assert instance_number(chat.series_slice(tmp_path / "even")) == 3  # element n // 2 of 1..4
    assert chat.question_image(tmp_path / "series").size == (128, 128)


def test_folders_that_are_not_one_series_are_refused(tmp_path):
    write_series(tmp_path / "two", [1, 2])
    write_series(tmp_path / "two", [3])  # a second series in the same folder
    with pytest.raises(ImageLoadError, match="2 DICOM series in one folder"):
        chat.series_slice(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.json").write_text(json.dumps({}))
    with pytest.raises(ImageLoadError, match="no DICOM image files"):
        chat.question_image(tmp_path / "empty")


def test_chat_on_a_series_folder_and_an_mr_file(tiny_checkpoint, tmp_path, capsys):
    write_series(tmp_path / "series", [2, 1, 3])
    for image in (tmp_path / "series", MR):
        chat.run_chat(parse("--model", str(tiny_checkpoint), "--image", str(image), "--question", "Normal?",
                            "--max-new-tokens", "3"))
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_batched_answers_match_one_at_a_time(tiny):
    model, processor = tiny
    images = [load_image(CT), load_image(MR)]
    questions = ["Is this a CT?", "Is there a large lesion in the left temporal lobe of this patient?"]
    batched = chat.answer_batch(model, processor, images, questions, "vicuna_v1", 5)
    single = [chat.answer_batch(model, processor, [i], [q], "vicuna_v1", 5)[0] for i, q in zip(images, questions)]
    assert batched == single
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        chat.answer_batch(model, processor, images, questions[:1], "vicuna_v1", 5)
