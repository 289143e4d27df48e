"""The curation steps end to end through `medllava.cli.main`, and the resumable pipeline."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import yaml

from medllava.curation import pipeline
from imaging import random_png
from medllava.cli import main
from medllava.io import DataError
from medllava.records import normalize_record

ASSETS = Path(__file__).parent / "assets" / "curation"
REPO = Path(__file__).parent.parent

# Captions that replace the real ones (which show chemistry, gels and plates: all "other"),
# so the run has figures of every fate: kept, filtered by modality, duplicated, leaked.
CAPTIONS = {
    "g001": "Axial CT of the chest shows a mass.",
    "g002": "Photomicrograph of the biopsy (H&E, x200).",
    "g003": "Bar chart of the enzyme activities.",
    "g004": "Coronal CT of the chest, the same slice again.",
}


def _png(seed: int) -> bytes:
    return random_png(seed, 64)


def _package(tmp_path: Path) -> Path:
    xml = (ASSETS / "pone.0046493.nxml").read_text(encoding="utf-8")
    for fig, caption in CAPTIONS.items():
        start = xml.index(f'<fig id="pone-0046493-{fig}"')
        cap_start, cap_end = xml.index("<caption>", start), xml.index("</caption>", start)
        xml = xml[:cap_start] + f"<caption><p>{escape(caption)}</p>" + xml[cap_end:]
    # g004 repeats g001's picture; g002 is a benchmark test image.
    images = {"g001": _png(1), "g002": _png(2), "g003": _png(3), "g004": _png(1)}
    folder = tmp_path / "packages"
    folder.mkdir()
    with tarfile.open(folder / "PMC3460867.tar.gz", "w:gz") as tar:
        for name, data in [("pone.0046493.nxml", xml.encode())] + [
                (f"pone.0046493.{k}.png", v) for k, v in images.items()]:
            info = tarfile.TarInfo(f"PMC3460867/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "synpic_test.png").write_bytes(images["g002"])
    return folder


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_steps_end_to_end_through_the_cli(tmp_path, capsys):
    packages = _package(tmp_path)
    figs, cls, ded, ali = (tmp_path / n for n in ("figs.jsonl", "cls.jsonl", "ded.jsonl", "align.jsonl"))
    images = tmp_path / "images"
    assert main(["curate", "extract", "--jats", str(packages), str(ASSETS / "1472-6831-8-11.nxml"),
                 "--images-out", str(images), "--out", str(figs)]) == 0
    assert len(_ids(figs)) == 4
    assert main(["curate", "classify", "--in", str(figs), "--out", str(cls),
                 "--keep", "chest_xray,ct_scan,mri,histology,gross"]) == 0
    assert [i[-4:] for i in _ids(cls)] == ["g001", "g002", "g004"]
    assert main(["curate", "dedupe", "--in", str(cls), "--image-root", str(images), "--out", str(ded),
                 "--benchmark-images", str(tmp_path / "bench")]) == 0
    assert [i[-4:] for i in _ids(ded)] == ["g001"]
    assert main(["curate", "align", "--in", str(ded), "--out", str(ali), "--seed", "3"]) == 0
    (record,) = [json.loads(line) for line in ali.read_text().splitlines()]
    assert normalize_record(record) == record
    assert record["conversations"][1]["value"] == CAPTIONS["g001"]
    assert (images / record["image"]).is_file()
    printed = capsys.readouterr().out
    assert "extract: 2 articles/rows read, 4 written, 0 skipped" in printed
    assert "skipped 1: exact duplicate" in printed and "skipped 1: matches a benchmark image" in printed


def _stale(path: Path, folder: bool = False) -> Path:
    """A temporary named as medllava.io names them (`.NAME.XXXXXXXX.tmp`), as a killed writer leaves it."""
    tmp = path.parent / f".{path.name}.0badf00d.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp.mkdir()
        (tmp / "part").write_text("half")
    else:
        tmp.write_text("half a file")
    return tmp


def test_standalone_steps_clear_what_a_killed_run_left(tmp_path, capsys):
    packages = _package(tmp_path)
    figs, cls, ded, ali = (tmp_path / n for n in ("figs.jsonl", "cls.jsonl", "ded.jsonl", "align.jsonl"))
    images = tmp_path / "images"
    # Another output's temporary in the same folder is not any step's to remove.
    other = _stale(tmp_path / "other.jsonl")
    steps = [
        (["extract", "--jats", str(packages), "--images-out", str(images), "--out", str(figs)],
         [_stale(figs), _stale(Path(f"{figs}.skipped.jsonl")), _stale(images / "PMC3460867" / "pone.0046493.g001.png"),
          _stale(images / "PMC1", folder=True)]),
        (["classify", "--in", str(figs), "--out", str(cls), "--keep", "ct_scan,histology"], [_stale(cls)]),
        (["dedupe", "--in", str(cls), "--image-root", str(images), "--out", str(ded),
          "--benchmark-images", str(tmp_path / "bench")], [_stale(ded), _stale(Path(f"{ded}.removed.jsonl"))]),
        (["align", "--in", str(ded), "--out", str(ali)], [_stale(ali, folder=True)]),
    ]
    for argv, planted in steps:
        assert main(["curate", *argv]) == 0
        assert not [p for p in planted if p.exists()], argv[0]
        printed = capsys.readouterr().out
        assert printed.count("temporary files left by an interrupted run") == 1
        assert f"removed {len(planted)} temporary files" in printed
    assert other.exists()
    assert [i[-4:] for i in _ids(figs)] == ["g001", "g002", "g003", "g004"]
    assert (images / "PMC3460867" / "pone.0046493.g001.png").read_bytes() == _png(1)
    assert [i[-4:] for i in _ids(ali)] == ["g001"]


def test_bad_input_gives_one_clear_error(tmp_path, capsys):
    assert main(["curate", "classify", "--in", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_pipeline_runs_then_resumes(tmp_path, capsys):
    packages = _package(tmp_path)
    config = {
        "out_dir": "run",
        "extract": {"jats": [str(packages)], "images_out": "run/images"},
        "classify": {"keep": ["ct_scan", "histology"], "min_confidence": 0.5},
        "dedupe": {"benchmark_images": ["bench"], "max_distance": 4},
        "align": {"seed": 0, "style": "concise"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    image_tmp = _stale(out / "images" / "PMC3460867" / "pone.0046493.g002.png")
    assert main(["curate", "pipeline", "--config", str(path)]) == 0
    assert [i[-4:] for i in _ids(out / "alignment.jsonl")] == ["g001"]
    assert (out / "pipeline.yaml").read_text() == path.read_text()
    assert not image_tmp.exists()
    capsys.readouterr()
    skipped_tmp = _stale(out / "alignment.jsonl")  # beside the output of a step that will not run
    assert pipeline.run_pipeline(path) == []  # everything up to date
    assert not skipped_tmp.exists()
    assert capsys.readouterr().out.count("removed 1 temporary files left by an interrupted run") == 1
    config["align"]["seed"] = 1  # only the changed step reruns
    path.write_text(yaml.safe_dump(config))
    assert pipeline.run_pipeline(path) == ["align"]


def test_shipped_pipeline_config_parses_into_each_step():
    config_path = REPO / "curation" / "pipeline_example.yaml"
    assert config_path.read_text().startswith("# medllava curate pipeline --config curation/pipeline_example.yaml")
    config = pipeline.load_config(config_path)
    previous = None
    for section, module, filename in pipeline.STEPS:
        options = pipeline.step_options(config, section)
        argv = pipeline.step_argv(options, config_path.parent, Path(filename), previous, section)
        args = pipeline.parse_step(module, argv, section)
        assert callable(args.func)
        previous = Path(filename)


def test_pipeline_config_errors_name_the_section(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("out_dir: run\nextract: {jats: [x]}\nclassify: {min_confidnce: 0.5}\n")
    with pytest.raises(DataError, match="classify: unrecognized arguments: --min-confidnce"):
        pipeline.run_pipeline(path)
