"""`medllava curate split`: compound figures to one figure record per panel, each with its own sub-caption.

For each figure record: find the panels of its image (`curation.panels`: XY-cut on gutters and seams, or
the user's `--detector module:function`), split the caption by its panel labels (`curation.subcaptions`),
and pair labels with panels in reading order (or by what the user's `--ocr module:function` reads on each
panel). Each panel becomes a record with the parent's fields, `id` `<parent>_<label>`, its own image (a crop
written under `<image-root>/<panel-dir>/`), the shared caption text followed by its segment, and `parent`,
`panel` and `box` ([x0, y0, x1, y1] in the parent's pixels). The later steps take these records as they
take any figure.

Where splitting is unsure the figure stays whole and `split.kept_whole` says why: one panel found, no
panel labels in the caption, a panel under `--min-panel-px`, or as many labels as panels not found. A
record whose image is missing or unreadable is skipped and counted; a record without an image passes
through. A plug-in that fails keeps its figure whole (detector) or falls back to reading order (OCR).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medllava.io import atomic_open, write_jsonl

from medllava.curation.common import StepReport, clear_stale_temps, iter_figure_records
from medllava.curation.subcaptions import SubCaptions, split_caption

if TYPE_CHECKING:
    from medllava.curation.panels import Box

DEFAULT_MIN_PANEL_PX = 48
NO_IMAGE = "records without an image (passed through)"
OCR_FAILED = "ocr failed (reading order used)"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """What splitting one figure needs, from the command line."""

    image_root: Path
    panel_dir: str = "panels"
    min_panel_px: int = DEFAULT_MIN_PANEL_PX
    detector: str | None = None
    ocr: str | None = None


def find_boxes(path: Path, image, options: Options) -> list[Box]:
    """Panel boxes in reading order, from the plug-in detector if one is named, else the XY-cut."""
    # Imported here, as numpy is: `medllava --help` stays light.
    from medllava.curation.common import load_callable
    from medllava.curation.panels import check_boxes, detect_panels, reading_order

    if options.detector is None:
        return detect_panels(image)
    found = load_callable(options.detector, "--detector")(str(path))
    return reading_order(check_boxes(found, image.width, image.height))


def unsure(boxes: list[Box], sub: SubCaptions, min_px: int) -> str | None:
    """Why this figure must stay whole, or None when its labels and panels pair up."""
    if len(boxes) < 2:
        return "one panel found"
    if not sub.labels:
        return f"{len(boxes)} panels but no panel labels in the caption"
    for i, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        if min(x1 - x0, y1 - y0) < min_px:
            return f"panel {i} of {len(boxes)} is {x1 - x0}x{y1 - y0} px, under --min-panel-px {min_px}"
    if len(sub.labels) != len(boxes):
        return f"{len(boxes)} panels but {len(sub.labels)} caption labels ({', '.join(sub.labels)})"
    return None


def order_by_ocr(path: Path, boxes: list[Box], labels: list[str], options: Options,
                 report: StepReport, where: str) -> list[str]:
    """The caption labels in box order: what the OCR plug-in read on each panel when that is exactly
    the caption's labels, else reading order (counted)."""
    from medllava.curation.common import load_callable

    try:
        read = list(load_callable(options.ocr, "--ocr")(str(path), [list(b) for b in boxes]))
    except Exception as e:  # noqa: BLE001 - a user plug-in can fail any way; reading order stands
        report.note(OCR_FAILED)
        if report.notes[OCR_FAILED] == 1:  # the first failure's message; the count is in the summary
            logger.warning("%s: --ocr failed (reading order used): %s", where, e)
        return labels
    by_key = {label.casefold(): label for label in labels}
    keys = [str(r).strip().strip("()").casefold() if r is not None else None for r in read]
    if sorted(k for k in keys if k is not None) != sorted(by_key) or len(keys) != len(boxes):
        report.note("ocr labels differ from the caption's (reading order used)")
        return labels
    report.note("panels ordered by ocr")
    return [by_key[k] for k in keys]


def panel_image_path(image: str, panel_dir: str, label: str) -> str:
    """The crop's path relative to the image root: `<panel-dir>/<image without suffix>_<label>.png`."""
    stem, _ = posixpath.splitext(image)
    return posixpath.join(panel_dir, f"{stem}_{label}.png")


def panel_records(record: dict, image, boxes: list[Box], labels: list[str], sub: SubCaptions,
                  options: Options, image_path: str) -> list[dict]:
    """One record per panel, writing each crop (atomically) under the panel folder."""
    out = []
    for box, label in zip(boxes, labels):
        crop_path = panel_image_path(image_path, options.panel_dir, label)
        target = options.image_root / crop_path
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as f:
            image.crop(box).save(f, format="PNG")
        out.append({**record, "id": f"{record['id']}_{label}", "image": crop_path,
                    "caption": sub.caption_for(label), "parent": record["id"], "panel": label,
                    "box": list(box)})
    return out


def split_record(record: dict, options: Options, report: StepReport, source: str) -> list[dict]:
    """The record's panels, or the record itself (kept whole, `split.kept_whole` saying why); [] to skip."""
    # Imported here: numpy and Pillow stay out of `medllava --help`.
    from medllava.images import ImageLoadError, load_image
    from medllava.records import RecordError, check_image_path, resolve_image_path

    where = f"{source}: record {record['id']!r}"
    if not record.get("image"):
        report.note(NO_IMAGE)
        return [record]
    caption = record.get("caption") or ""
    if not isinstance(caption, str):
        report.skip("caption is not text", f"{where}: caption is {type(caption).__name__}")
        return []
    try:
        path = resolve_image_path(options.image_root, record["image"], where)
        image = load_image(path)
        image_path = check_image_path(record["image"])
    except (RecordError, ImageLoadError, OSError, ValueError) as e:
        report.skip("image missing or unreadable", f"{where}: {e}")
        return []
    try:
        boxes = find_boxes(path, image, options)
    except Exception as e:  # noqa: BLE001 - a user plug-in can fail any way; the figure stays whole
        return [kept_whole(record, f"detector failed: {e}", [], [], report)]
    sub = split_caption(caption)
    reason = unsure(boxes, sub, options.min_panel_px)
    if reason is not None:
        return [kept_whole(record, reason, boxes, sub.labels, report)]
    labels = sub.labels
    if options.ocr:
        labels = order_by_ocr(path, boxes, labels, options, report, where)
    report.note("figures split")
    report.note("panels written", len(boxes))
    return panel_records(record, image, boxes, labels, sub, options, image_path)


def kept_whole(record: dict, reason: str, boxes: list[Box], labels: list[str], report: StepReport) -> dict:
    """The record unchanged but for `split`: why it was kept whole, the boxes found and the caption's labels."""
    report.note("kept whole: " + reason_kind(reason))
    return {**record, "split": {"kept_whole": reason, "boxes": [list(b) for b in boxes], "caption_labels": labels}}


# Count keys of the kept-whole reasons, found by a phrase of each reason's wording.
REASON_KINDS = (("detector failed", "detector failed"), ("one panel", "one panel found"),
                ("no panel labels", "no panel labels in the caption"),
                ("under --min-panel-px", "a panel under --min-panel-px"),
                ("caption labels", "panel and label counts differ"))


def reason_kind(reason: str) -> str:
    """The count key of a kept-whole reason: its kind, without the figure's own numbers."""
    return next((kind for phrase, kind in REASON_KINDS if phrase in reason), reason)


def split_records(records, options: Options, report: StepReport, source: str) -> Iterator[dict]:
    """Every output record, in input order (a figure's panels in reading order)."""
    for record in records:
        yield from split_record(record, options, report, source)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "split", help="compound figures to one record per panel, each with its sub-caption",
        description="Find the panels of each figure (XY-cut on gutters and seams, or a plug-in detector), "
                    "split the caption by its panel labels and write one figure record per panel; figures "
                    "where this is unsure stay whole, with the reason in the record.")
    p.add_argument("--in", dest="inp", type=Path, required=True, metavar="FILE", help="figure records (JSONL)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="figure and panel records (JSONL)")
    p.add_argument("--image-root", type=Path, required=True, metavar="DIR",
                   help="folder the records' image paths are relative to; panel crops are written under it")
    p.add_argument("--panel-dir", default="panels", metavar="NAME",
                   help="folder under --image-root for the panel crops (default panels)")
    p.add_argument("--min-panel-px", type=int, default=DEFAULT_MIN_PANEL_PX, metavar="N",
                   help=f"keep a figure whole if a panel's shorter side is under N px (default {DEFAULT_MIN_PANEL_PX})")
    p.add_argument("--detector", metavar="MODULE:FUNCTION",
                   help="callable given an image path, returning panel boxes [[x0, y0, x1, y1], ...] in pixels; "
                        "replaces the built-in XY-cut")
    p.add_argument("--ocr", metavar="MODULE:FUNCTION",
                   help="callable given an image path and the panel boxes, returning the label read on each "
                        "panel (or None); used to pair labels with panels when it reads exactly the caption's")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.image_root.is_dir():
        raise FileNotFoundError(f"--image-root folder not found: {args.image_root}")
    _check_panel_dir(args.panel_dir)
    from medllava.curation.common import load_callable

    for spec, option in ((args.detector, "--detector"), (args.ocr, "--ocr")):
        if spec:
            load_callable(spec, option)  # a plug-in that cannot load fails before any work
    options = Options(args.image_root, args.panel_dir, args.min_panel_px, args.detector, args.ocr)
    clear_stale_temps([args.out], [args.image_root / args.panel_dir])
    report = StepReport("split")
    records = iter_figure_records(args.inp, report)
    report.written = write_jsonl(args.out, split_records(records, options, report, str(args.inp)))
    print(report.summary())
    return 0


def _check_panel_dir(path: str) -> str:
    """--panel-dir must stay inside the image root (the records module's lexical check)."""
    from medllava.records import check_image_path

    try:
        return check_image_path(path)
    except ValueError as e:
        raise ValueError(f"--panel-dir: {e}") from None
