"""A stage's training data: records read into Arrow, checked against the template and the image
folder, what is left out counted and listed, the rest wrapped for lazy encoding."""

from __future__ import annotations

import os
from pathlib import Path

from medllava.finetune.config import DataConfig, StageConfig
from medllava.finetune.trainer import is_main_process
from medllava.io import write_jsonl


def prepare_dataset(stage: StageConfig, processor, out_dir: Path, data: DataConfig | None = None):
    """Read the stage's records (or those of `data`, a validation set) into Arrow, drop those whose
    images are missing (counted and reported with the first few paths), and wrap them for lazy encoding."""
    from medllava.data import EncodedDataset, Encoder
    from medllava.records import ReadReport, load_records
    from medllava.templates import template_problem

    data = data or stage.data
    if not data.path:
        raise ValueError("data.path is not set: name the conversation file of this stage")
    image_root = Path(data.image_root or Path(data.path).parent)
    read = ReadReport()
    rank = os.environ.get("RANK", "0")
    records = load_records(data.path, cache_dir=out_dir / ".cache" / f"rank{rank}", skip_bad=True, report=read)
    missing: list[str] = []
    unusable: list[str] = []

    def usable(rec) -> bool:
        if problem := template_problem(rec["conversations"], data.template):
            unusable.append(f"{data.path}: record {rec['id']}: {problem}")
            return False
        absent = [p for p in rec["images"] if not (image_root / p).is_file()]
        missing.extend(str(image_root / p) for p in absent)
        return not absent

    records = records.filter(usable, load_from_cache_file=False, desc="checking records")
    report = {
        "records_read": read.read,
        "records_invalid": len(read.skipped),
        "invalid_examples": read.skipped[:5],
        "unusable_for_template": len(unusable),
        "unusable_examples": unusable[:5],
        "missing_images": len(missing),
        "missing_image_examples": missing[:5],
        "usable": len(records),
    }
    report["summary"] = (
        f"{read.read} records read, {len(read.skipped)} invalid, "
        + (f"{len(unusable)} unusable with template {data.template}, " if unusable else "")
        + f"{len(missing)} with missing images, {len(records)} usable"
        + "".join(f"\n  {m}" for m in (read.skipped[:3] + unusable[:3] + missing[:3]))
    )
    if is_main_process():
        print(f"[data] {data.path}: {report['summary']}", flush=True)
        # Every record left out before training, for the people who fix the data.
        listed = out_dir / f"skipped_{Path(data.path).stem}.jsonl"
        write_jsonl(listed, [{"reason": "invalid record", "detail": m} for m in read.skipped]
                    + [{"reason": "unusable conversation", "detail": m} for m in unusable]
                    + [{"reason": "missing image", "detail": m} for m in missing])
        report["skipped_list"] = str(listed)
    encoder = Encoder(processor, template=data.template, image_root=image_root, max_length=data.max_length,
                      image_options={"exclude_burned_in": True} if data.exclude_burned_in else {})
    return EncodedDataset(records, encoder), report
