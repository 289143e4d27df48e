"""`medllava demo`: the whole mission on data and a model that ship with the package, offline.

One commented script of the real commands, top to bottom:
  1. inputs   two real PMC OA articles packed as OA packages (stand-in figure images drawn), and two
              real DICOM files from pydicom as figures with captions
  2. curate   extract -> classify (keep imaging modalities) -> dedupe (+ leakage check against the
              test images) -> align: the stage-1 set
  3. instruct a teacher endpoint when one is configured, else the shipped teacher-written conversations
  4. adapt    stage 1 (projector) and stage 2 (LoRA, merged) on the tiny random-weight model
  5. head     a VQA-RAD head on a real VQA-RAD subset (216 training questions)
  6. eval     the adapted base and the head on that subset's 52 test questions
  7. report   Markdown + PNG plots; its path is printed

Every step is the same command a user runs, and each resumes or skips finished work, so running
`medllava demo` again after an interruption finishes the job without redoing it. One demo runs in
a work folder at a time (`medllava.locks.output_lock`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import time
from importlib import resources
from pathlib import Path

import yaml

from medllava.io import atomic_open, atomic_write_text, write_jsonl
from medllava.locks import output_lock
from medllava.model import ModelConfig, family_of
from medllava.tiny import TINY_SPECS

DICOM_FILES = ("CT_small.dcm", "examples_overlay.dcm")
IMAGING = ["chest_xray", "ct_scan", "mri", "histology", "gross"]


def assets() -> Path:
    return Path(str(resources.files("medllava").joinpath("assets/demo")))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on shipped data with a tiny model (minutes, offline)",
        description=__doc__.split("\n\n")[0] + " Resumable: run it again to finish an interrupted demo.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="work folder (default runs/demo)")
    p.add_argument("--model", default="tiny",
                   help="named random-weight model to adapt: tiny, small, or the tiny model of another family: "
                        + ", ".join(n for n in TINY_SPECS if n not in ("tiny", "small")))
    p.add_argument("--teacher-url", help="OpenAI-compatible endpoint that writes the instruction set")
    p.add_argument("--teacher-model", help="model name at the teacher endpoint")
    p.add_argument("--teacher-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model's matrices are too small to share out, "
                        "and one thread makes every run do the same arithmetic, so reruns reproduce exactly)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    # Resolved: the configs it writes name absolute paths, so a rerun that spells the folder another way
    # (relative, from elsewhere) finds its own run and resumes it instead of refusing a "different" config.
    work = args.out.resolve()
    started = time.time()
    steps = [
        ("inputs", lambda: prepare_inputs(work)),
        ("curate", lambda: curate(work)),
        ("instruct", lambda: instruct(work, args)),
        ("adapt", lambda: adapt(work, args.model)),
        ("head", lambda: head(work)),
        ("eval", lambda: evaluate(work)),
        ("report", lambda: report(work, time.time() - started)),
    ]
    # The whole work folder is this run's; each command below also locks its own subfolder.
    with output_lock(work, f"medllava demo --out {work}"):
        for i, (name, step) in enumerate(steps, start=1):
            print(f"\n=== medllava demo [{i}/{len(steps)}] {name} ===", flush=True)
            step()
    print(f"\ndemo finished in {time.time() - started:.0f} s; report: {work / 'report.md'}")
    return 0


def medllava(*argv: str) -> None:
    """Run one real `medllava` command; a failure stops the demo with that command's message."""
    from medllava.cli import main

    printable = " ".join(str(a) for a in argv)
    print(f"$ medllava {printable}", flush=True)
    code = main([str(a) for a in argv])
    if code:
        raise RuntimeError(f"`medllava {printable}` failed (exit {code})")


# 1. Inputs ---------------------------------------------------------------------------------------


def prepare_inputs(work: Path) -> None:
    """OA-style packages from the shipped articles, and the DICOM figures, under `work/inputs`."""
    from pydicom.data import get_testdata_file

    inputs, images = work / "inputs", work / "curation" / "images"
    packages = inputs / "oa_packages"
    packages.mkdir(parents=True, exist_ok=True)
    for article in sorted((assets() / "pmc").glob("*.nxml")):
        target = packages / f"{article.stem}.tar.gz"
        if not target.exists():
            _pack_article(article, target)
    for name in DICOM_FILES:
        dest = images / "dicom" / name
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(dest, "wb") as f:
                f.write(Path(get_testdata_file(name)).read_bytes())
    shutil.copy(assets() / "figures_dicom.jsonl", inputs / "figures_dicom.jsonl")
    print(f"{len(list(packages.glob('*.tar.gz')))} OA packages, {len(DICOM_FILES)} DICOM figures in {inputs}")


def _pack_article(article: Path, target: Path) -> None:
    """An OA package as PMC ships it: the article and its figure files in one folder. The figure
    files are not shipped, so each `<graphic>` gets a drawn stand-in named after its href."""
    import io
    import re

    from PIL import Image, ImageDraw

    text = article.read_text(encoding="utf-8")
    hrefs = sorted(set(re.findall(r'xlink:href="([^"]+)"', text)))
    folder = article.stem
    with atomic_open(target, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        _add(tar, f"{folder}/{article.name}", article.read_bytes())
        for i, href in enumerate(h for h in hrefs if not h.startswith("http")):
            image = Image.new("RGB", (96, 96), (235, 235, 235))
            ImageDraw.Draw(image).text((8, 40), f"stand-in {i + 1}", fill=(40, 40, 40))
            buf = io.BytesIO()
            image.save(buf, "JPEG")
            _add(tar, f"{folder}/{href}.jpg", buf.getvalue())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# 2. Curation -------------------------------------------------------------------------------------


def curate(work: Path) -> None:
    """extract -> classify -> dedupe -> align through the resumable curation pipeline."""
    config = {
        "out_dir": str((work / "curation").resolve()),
        "extract": {
            "jats": [str((work / "inputs" / "oa_packages").resolve())],
            "pmc15m": [str((work / "inputs" / "figures_dicom.jsonl").resolve())],
            "images_out": str((work / "curation" / "images").resolve()),
        },
        "classify": {"keep": IMAGING, "min_confidence": 0.5},
        "dedupe": {
            "image_root": str((work / "curation" / "images").resolve()),
            # Leakage check: no figure may match an image the head is tested on.
            "benchmark_images": [str(assets() / "vqa_rad" / "images")],
        },
        "align": {"seed": 0, "style": "mixed"},
    }
    path = work / "inputs" / "curation.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    medllava("curate", "pipeline", "--config", path)


# 3. Instruction set ------------------------------------------------------------------------------


def instruct(work: Path, args: argparse.Namespace) -> None:
    """The stage-2 set: teacher conversations about the curated figures, plus real VQA-RAD
    conversations whose images are not among the test images."""
    teacher = work / "instruct" / "teacher.jsonl"
    if args.teacher_url:
        if not args.teacher_model:
            raise ValueError("--teacher-url needs --teacher-model")
        medllava(
            "curate", "instruct", "--in", work / "curation" / "deduped.jsonl", "--out", teacher,
            "--base-url", args.teacher_url, "--model", args.teacher_model, "--api-key-env", args.teacher_key_env,
            "--image-root", work / "curation" / "images", "--variant", "60k-im",
        )
    elif not teacher.exists():
        print("no teacher endpoint configured (--teacher-url): using the shipped teacher-written conversations")
        teacher.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(assets() / "teacher_conversations.jsonl", teacher)
    test_images = {q["image_name"] for q in json.loads((assets() / "vqa_rad" / "testset.json").read_text())}
    rows = [json.loads(line) for line in teacher.read_text().splitlines() if line.strip()]
    extra_images = work / "curation" / "images" / "vqa_rad_conversations"
    extra_images.mkdir(parents=True, exist_ok=True)
    for line in (assets() / "conversations.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["image"] in test_images:
            continue  # never train on an image the head is tested on
        shutil.copy(assets() / "images" / row["image"], extra_images / row["image"])
        rows.append(dict(row, image=f"vqa_rad_conversations/{row['image']}"))
    n = write_jsonl(work / "instruct" / "stage2.jsonl", rows)
    print(f"stage-2 set: {n} conversations in {work / 'instruct' / 'stage2.jsonl'}")


# 4-6. Training and evaluation --------------------------------------------------------------------


def _stage(path: Path, image_root: Path, template: str, lr: float, epochs: int, **extra) -> dict:
    return {
        "data": {"path": str(path), "image_root": str(image_root), "template": template},
        "learning_rate": lr, "epochs": epochs, "global_batch_size": 4, "per_device_batch_size": 2,
        "save_steps": 4, "logging_steps": 1, "dataloader_workers": 0, "gradient_checkpointing": False, **extra,
    }


def adapt(work: Path, model: str) -> None:
    images = work / "curation" / "images"
    config = {
        "run_dir": str(work / "adapt"),
        "model": {"name_or_path": model},
        "bf16": False,
        "report_to": ["tensorboard"],
        "align": _stage(work / "curation" / "alignment.jsonl", images, "plain", 2e-3, 4),
        "instruct": _stage(work / "instruct" / "stage2.jsonl", images, family_of(ModelConfig(model)).default_template,
                           1e-3, 3,
                           lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "merge": True}),
    }
    path = work / "inputs" / "adapt.yaml"
    atomic_write_text(path, "# medllava adapt --config " + str(path) + "\n" + yaml.safe_dump(config, sort_keys=False))
    medllava("adapt", "--config", path)


def head(work: Path) -> None:
    medllava(
        "finetune", "--task", "vqa-rad", "--base", work / "adapt" / "instruct" / "model",
        "--root", assets() / "vqa_rad",
        f"run_dir={work / 'head'}", f"head.dir={work / 'head' / 'vqa_rad_demo'}", "base.dtype=float32",
        "bf16=false", "report_to=[none]", "train.epochs=6", "train.learning_rate=1e-2",
        "train.global_batch_size=8", "train.per_device_batch_size=8", "train.save_steps=10",
        "train.dataloader_workers=0", "train.gradient_checkpointing=false", "train.lora.r=16", "train.lora.alpha=32",
    )


def evaluate(work: Path) -> None:
    common = ["--task", "vqa-rad", "--root", assets() / "vqa_rad", "--model", work / "adapt" / "instruct" / "model",
              "--max-new-tokens", "8", "--batch-size", "16", "--device", "cpu"]
    medllava("eval", "run", *common, "--out", work / "eval" / "base")
    medllava("eval", "run", *common, "--head", work / "head" / "vqa_rad_demo", "--out", work / "eval" / "head")


def report(work: Path, seconds: float) -> None:
    from medllava.commands.demo_report import write_report

    path = write_report(work, seconds)
    print(f"report written to {path}")
