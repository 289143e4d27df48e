"""Hostile inputs to image loading: DICOM headers that carry identifiers where the allow-list did
not look, pixels with burned-in annotation, 16-bit images that used to cost gigabytes to stretch,
and symlinks that lead out of the image root."""

from __future__ import annotations

import json
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medllava import images
from medllava.dicom import BurnedInAnnotationError, BurnedInAnnotationWarning
from medllava.images import ImageOutsideRootError, load_image, load_image_with_metadata, stretch_to_uint8
from medllava.records import RecordError, resolve_image_path

from imaging import bundled, grey

# --- DICOM headers ----------------------------------------------------------------------

IDENTITY = {
    "PatientName": "Smith^Mary^Doe",
    "PatientID": "998877",
    "PatientBirthDate": "19600101",
    "AccessionNumber": "ACC4455",
    "ReferringPhysicianName": "Okonkwo^Chidi",
}
# Fragments of the identity above that must not survive in any returned value, in any case.
FORBIDDEN = ("mary", "smith", "doe", "998877", "1960", "acc4455", "4455", "okonkwo", "chidi")


def crafted(tmp_path: Path, name: str = "crafted.dcm", source: str = "CT_small.dcm", **elements) -> Path:
    """CT_small.dcm with IDENTITY and `elements` written into its header."""
    ds = pydicom.dcmread(bundled(source))
    for keyword, value in {**IDENTITY, **elements}.items():
        setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


def assert_no_identity(meta: dict) -> None:
    # ImageType PRIMARY is a code that merely contains "mary".
    dumped = json.dumps(meta).lower().replace('"primary"', "")
    for fragment in FORBIDDEN:
        assert fragment not in dumped, f"{fragment!r} leaked into {dumped}"


DESCRIPTIONS = [
    "CT chest Mary Doe Smith",  # reordered
    "mary smith follow-up chest",  # lower-cased
    "SMITH,MARY chest",  # reformatted
    "chest SmithM",  # inside another word
    "chest msmith@hospital.example",
    "chest MRN-998877",  # ID with a prefix
    "chest id:998877",
    "chest ACC4455",
    "chest DOB 01/01/1960",  # dates in several formats
    "chest 1960-01-01",
    "chest 1 Jan 1960",
    "chest January 1, 1960",
    "chest 01.01.60",
    "chest 19600101",
    "chest ref Dr Okonkwo",
    "chest for Dr. Jones",  # a name the header does not hold, after a title
]


@pytest.mark.parametrize("text", DESCRIPTIONS)
def test_free_text_is_not_returned_by_default(tmp_path, text):
    path = crafted(tmp_path, StudyDescription=text, SeriesDescription=text, RescaleType=text[:64])
    _, meta = load_image_with_metadata(path)
    assert not {"StudyDescription", "SeriesDescription", "RescaleType"} & meta.keys()
    assert_no_identity(meta)
    assert "jones" not in json.dumps(meta).lower()
    assert meta["Modality"] == "CT" and meta["Rows"] == 128
    assert meta["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]  # the patient is Mary; PRIMARY stays


@pytest.mark.parametrize("text", DESCRIPTIONS)
def test_descriptions_on_request_are_cleaned_of_every_spelling_of_an_identifier(tmp_path, text):
    path = crafted(tmp_path, StudyDescription=text, SeriesDescription=text)
    _, meta = load_image_with_metadata(path, dicom_descriptions=True)
    assert_no_identity(meta)
    assert "jones" not in meta["SeriesDescription"].lower()
    # What the study was survives.
    assert "chest" in meta["StudyDescription"].split() and "[removed]" in meta["StudyDescription"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("NG^AN", "CT head and neck angio"),  # short name parts must match whole words only
        ("Li^Al", "T2 axial 5mm 3D brain"),  # technical quantities with digits stay
        ("Ho^Ed", "abdomen with contrast 120kV b1000 dwi"),
        ("Mary^Ann", "primary annual channel review"),  # a name inside a longer word is a word
        ("Ng^An^L", "L knee and ankle"),  # a lone initial identifies nobody
    ],
)
def test_cleaning_does_not_reach_into_ordinary_words(tmp_path, name, text):
    path = crafted(tmp_path, PatientName=name, StudyDescription=text)
    _, meta = load_image_with_metadata(path, dicom_descriptions=True)
    assert meta["StudyDescription"] == text


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("García^José", "jose garcia chest"),  # accents in the header, none in the text
        ("GARCIA^JOSE", "José García chest"),  # and the other way round
        ("O'Brien^Sean", "sean obrien chest"),  # punctuation inside the name
        ("Smith-Jones^Ann", "ann smithjones chest"),
    ],
)
def test_names_match_across_accents_and_punctuation(tmp_path, name, text):
    path = crafted(tmp_path, PatientName=name, StudyDescription=text)
    _, meta = load_image_with_metadata(path, dicom_descriptions=True)
    assert meta["StudyDescription"] == "[removed] [removed] chest"


@pytest.mark.parametrize(
    ("keyword", "value", "kept"),
    [
        ("RescaleType", "HU", True),  # a defined term
        ("RescaleType", "Mary Smith units", False),  # free text in an LO field
        ("RescaleType", "SMITH", False),
        ("BodyPartExamined", "CHEST", True),
        ("BodyPartExamined", "SMITH", False),  # a valid code string that is the patient's name
        ("BodyPartExamined", "chest of mary", False),  # not a code string at all
        ("ViewPosition", "MARY", False),
        ("PatientPosition", "HFS", True),
        ("PatientPosition", "DOE", False),  # not a defined term
    ],
)
def test_coded_fields_are_returned_only_when_they_are_codes(tmp_path, keyword, value, kept):
    path = crafted(tmp_path, **{keyword: value})
    _, meta = load_image_with_metadata(path)
    assert (meta.get(keyword) == value) is kept
    assert_no_identity(meta)


@pytest.mark.parametrize("value", ["YES", "yes", " YES "])
def test_burned_in_annotation_is_flagged_warned_and_excludable(tmp_path, value):
    path = crafted(tmp_path, BurnedInAnnotation=value)
    with pytest.warns(BurnedInAnnotationWarning, match="crafted.dcm.*BurnedInAnnotation"):
        _, meta = load_image_with_metadata(path)
    assert meta["burned_in_annotation"] is True
    with pytest.warns(BurnedInAnnotationWarning):
        load_image(path)
    with pytest.raises(BurnedInAnnotationError, match="crafted.dcm.*exclude_burned_in"):
        load_image(path, exclude_burned_in=True)


@pytest.mark.parametrize(("value", "flag"), [("NO", False), (None, None)])
def test_files_without_burned_in_annotation_load_quietly(tmp_path, value, flag):
    path = crafted(tmp_path, **({"BurnedInAnnotation": value} if value else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BurnedInAnnotationWarning)
        _, meta = load_image_with_metadata(path, exclude_burned_in=True)
    assert meta["burned_in_annotation"] is flag


# --- Memory of high-bit-depth images ----------------------------------------------------


def stretch_by_hand(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    scaled = np.where(finite, (values.astype(np.float64) - lo) * (255.0 / (hi - lo)), 0.0)
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


@pytest.mark.parametrize(
    "values",
    [
        np.arange(3000 * 7, dtype=np.uint16).reshape(3000, 7) * 3,
        np.arange(-5000, 5000, dtype=np.int32).reshape(100, 100) * 400_000,
        np.array([[np.nan, -np.inf, 1.5], [np.inf, 7.25, -2.0]] * 600, dtype=np.float32),
    ],
    ids=["uint16", "int32", "float32-nonfinite"],
)
def test_block_wise_stretch_matches_the_whole_array_formula(monkeypatch, values):
    monkeypatch.setattr(images, "_STRETCH_BLOCK", 1000)  # many blocks, one partial
    out, value_range = stretch_to_uint8(values)
    assert np.array_equal(out, stretch_by_hand(values))
    finite = values[np.isfinite(values)]
    assert value_range == [float(finite.min()), float(finite.max())]


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I;16", ".tif"), ("I", ".tif"), ("F", ".tif")])
def test_high_bit_depth_decoding_holds_no_float64_copy_of_the_image(tmp_path, mode, suffix):
    side = 2048
    ramp = np.add.outer(np.arange(side), np.arange(side)) * 7
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    path = tmp_path / f"big{suffix}"
    Image.fromarray(ramp.astype(dtype)).save(path)
    del ramp

    tracemalloc.start()
    try:
        image, meta = load_image_with_metadata(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Budget: the decoded values (up to 4 bytes), a bool mask and the uint8 result (1 each), one
    # 8 MiB block, and slack. One float64 copy of the image alone is 8 bytes a pixel.
    assert peak < side * side * 7 + (16 << 20), f"peak {peak / 2**20:.0f} MiB for {side}x{side} {mode}"
    assert meta["value_range"][0] == 0.0 and grey(image)[-1, -1] == 255 and grey(image)[0, 0] == 0


# --- Symlinks out of the image root -----------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """root/ holding real.png and sub/; outside/ next to it holding secret.png."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (4, 4), "white").save(root / "real.png")
    Image.new("RGB", (4, 4), "red").save(outside / "secret.png")
    return root, outside


def make_escape(root: Path, outside: Path, kind: str) -> str:
    """A path (relative to root) that reaches outside/secret.png through a symlink of `kind`."""
    if kind == "file-absolute":
        (root / "a.png").symlink_to(outside / "secret.png")
        return "a.png"
    if kind == "file-relative":
        (root / "sub" / "a.png").symlink_to("../../outside/secret.png")
        return "sub/a.png"
    if kind == "directory":
        (root / "scans").symlink_to(outside, target_is_directory=True)
        return "scans/secret.png"
    if kind == "chain":  # a link that stays inside, to a link that leaves
        (root / "sub" / "out").symlink_to(outside, target_is_directory=True)
        (root / "inner").symlink_to(root / "sub", target_is_directory=True)
        return "inner/out/secret.png"
    raise AssertionError(kind)


ESCAPES = ["file-absolute", "file-relative", "directory", "chain"]


@pytest.mark.parametrize("kind", ESCAPES)
def test_a_symlink_out_of_the_root_is_refused_by_the_loader(tree, kind):
    root, outside = tree
    rel = make_escape(root, outside, kind)
    with pytest.raises(ImageOutsideRootError, match="symlink.*outside the image root") as info:
        load_image(root / rel, root=root)
    assert str(root / rel) in str(info.value) and "\n" not in str(info.value)
    assert load_image(root / rel).getpixel((0, 0)) == (255, 0, 0)  # without a root nothing is checked


@pytest.mark.parametrize("kind", ESCAPES)
def test_a_symlink_out_of_the_root_is_refused_for_a_record(tree, kind):
    root, outside = tree
    rel = make_escape(root, outside, kind)
    with pytest.raises(RecordError, match="symlink") as info:
        resolve_image_path(root, rel, where="train.json: record 'r7'")
    message = str(info.value)
    assert message.startswith("train.json: record 'r7': image ") and repr(rel) in message
    assert "\n" not in message


def test_a_record_whose_image_leaves_the_root_is_skipped_with_its_id_and_reason(tree, tiny):
    from medllava.data import EncodedDataset, Encoder

    root, outside = tree
    rel = make_escape(root, outside, "directory")
    turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A square."}]
    rows = [{"id": "ok", "image": "real.png", "conversations": turns}, {"id": "r9", "image": rel, "conversations": turns}]
    dataset = EncodedDataset(rows, Encoder(tiny[1], image_root=root))  # the encoder passes its root to the loader
    assert "skip" not in dataset[0]
    skipped = dataset[1]
    assert skipped["id"] == "r9" and skipped["skip"] == "unreadable image"
    assert "scans is a symlink" in skipped["detail"] and "outside the image root" in skipped["detail"]


@pytest.mark.parametrize("exclude", [True, False])
def test_a_training_stage_skips_burned_in_images_when_its_data_says_so(tmp_path, tiny, exclude):
    from medllava.finetune.config import StageConfig
    from medllava.finetune.stage_data import prepare_dataset
    from medllava.config import from_dict

    crafted(tmp_path, name="burned.dcm", BurnedInAnnotation="YES")
    crafted(tmp_path, name="clean.dcm", BurnedInAnnotation="NO")
    turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A CT slice."}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": i, "image": f"{i}.dcm", "conversations": turns}) + "\n"
                            for i in ("clean", "burned")))
    stage = from_dict(StageConfig, {"data": {"path": str(data), "image_root": str(tmp_path),
                                             "exclude_burned_in": exclude}})
    dataset, _ = prepare_dataset(stage, tiny[1], tmp_path / "out")
    assert "skip" not in dataset[0]
    if exclude:
        assert dataset[1]["skip"] == "unreadable image" and "burned.dcm" in dataset[1]["detail"]
    else:
        with pytest.warns(BurnedInAnnotationWarning, match="burned.dcm"):
            assert "skip" not in dataset[1]


def test_lexical_escapes_are_still_refused_for_a_record(tree):
    root, _ = tree
    for bad in ("../outside/secret.png", "/etc/passwd", "sub/../../outside/secret.png"):
        with pytest.raises(RecordError, match="record 'r1'"):
            resolve_image_path(root, bad, where="record 'r1'")


def test_symlinks_that_stay_inside_and_a_symlinked_root_are_accepted(tree, tmp_path):
    root, _ = tree
    (root / "sub" / "link.png").symlink_to("../real.png")
    (root / "alias").symlink_to(root / "sub", target_is_directory=True)
    mounted = tmp_path / "mounted"
    mounted.symlink_to(root, target_is_directory=True)
    for base in (root, mounted):
        for rel in ("real.png", "sub/link.png", "alias/link.png"):
            assert resolve_image_path(base, rel) == base / rel
            assert load_image(base / rel, root=base).getpixel((0, 0)) == (255, 255, 255)
