"""Precision and recall of the panel detector (curation/panels.py) on compound figures built from real images.

    python scripts/panel_benchmark.py            # the reported set (seed 1), about 10 s on 2 cores
    python scripts/panel_benchmark.py --seed 0   # the development set the thresholds were set on

Each figure is a layout of real VQA-RAD images (MedPix radiographs, CT and MRI; CC0) pasted at known boxes,
with a panel letter drawn on each panel and saved as JPEG like most PMC figures. Five kinds, the same number
of each: white gutters (4-24 px, uneven column widths and row heights, images letterboxed in their cells),
thin gutters (1-3 px, white or light grey), a dark page (black gutters around images that have black
margins of their own), touching panels (no gutter at all), and nested layouts (a tall panel beside a
stack). A second table runs the detector on every original VQA-RAD image: all are single images, so any
split there is a false one. A found box counts as right when its IoU with a true box is at least 0.5
(one to one). "split right" runs the whole decision of `curate split` with a caption naming the panels
"(A) ... (B) ...": split, with every label on its own true panel.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from medllava.curation.panels import Box, detect_panels, iou, match_boxes
from medllava.curation.split import DEFAULT_MIN_PANEL_PX, unsure
from medllava.curation.subcaptions import LETTERS, split_caption

KINDS = ("white gutters", "thin gutters", "dark page", "touching", "nested")
SHARED = Path(os.environ.get("MEDLLAVA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def grid_shape(rng: np.random.Generator) -> tuple[int, int]:
    """Rows and columns of a grid of 2 to 9 panels."""
    while True:
        rows, cols = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        if 2 <= rows * cols <= 9:
            return rows, cols


def cells(rng: np.random.Generator, kind: str) -> list[tuple[int, int, int, int]]:
    """Cell rectangles (x, y, w, h) of one layout, gutters excluded, plus the figure's margin."""
    if kind == "nested":
        tall_w, side_w, h = (int(v) for v in rng.integers(180, 360, size=3))
        n = int(rng.integers(2, 4))
        return [(0, 0, tall_w, h * n // 2)] + [(tall_w, i * (h // 2), side_w, h // 2) for i in range(n)]
    rows, cols = grid_shape(rng)
    widths = rng.integers(160, 400, size=cols)
    heights = rng.integers(140, 360, size=rows)
    xs, ys = np.concatenate([[0], np.cumsum(widths)]), np.concatenate([[0], np.cumsum(heights)])
    return [(int(xs[c]), int(ys[r]), int(widths[c]), int(heights[r])) for r in range(rows) for c in range(cols)]


def gutter_for(rng: np.random.Generator, kind: str) -> tuple[int, tuple[int, int, int]]:
    """Gutter width and page colour of a figure of this kind."""
    if kind in ("white gutters", "nested"):
        return int(rng.integers(4, 25)), (255, 255, 255)
    if kind == "thin gutters":
        return int(rng.integers(1, 4)), (255, 255, 255) if rng.random() < 0.5 else (235, 235, 235)
    if kind == "dark page":
        return int(rng.integers(4, 17)), (0, 0, 0)
    return 0, (255, 255, 255)


def draw_letter(draw: ImageDraw.ImageDraw, box: Box, letter: str) -> None:
    """A panel letter in the panel's top-left corner, white with a black outline as journals draw them."""
    size = max(12, (box[3] - box[1]) // 10)
    font = ImageFont.load_default(size=size)
    draw.text((box[0] + size // 3, box[1] + size // 4), letter, fill=(255, 255, 255), font=font,
              stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0))


def make_figure(rng: np.random.Generator, kind: str, pool: list[Path]) -> tuple[Image.Image, list[Box]]:
    """One synthetic compound figure and its true panel boxes in reading order."""
    layout = cells(rng, kind)
    gutter, page = gutter_for(rng, kind)
    margin = int(rng.integers(0, 20)) if gutter else 0
    # Cell (x, y) moves by one gutter per cell before it in its row and column.
    placed = [(x + margin + gutter * (x > 0) * _index(layout, x, 0), y + margin + gutter * (y > 0) * _index(layout, y, 1), w, h)
              for x, y, w, h in layout]
    width = max(x + w for x, _, w, _ in placed) + margin
    height = max(y + h for _, y, _, h in placed) + margin
    figure = Image.new("RGB", (width, height), page)
    draw = ImageDraw.Draw(figure)
    boxes = []
    for i, (x, y, w, h) in enumerate(placed):
        source = Image.open(pool[int(rng.integers(len(pool)))]).convert("RGB")
        if kind == "touching" or rng.random() < 0.3:
            panel = ImageOps.fit(source, (w, h))  # fills its cell
        else:
            panel = ImageOps.contain(source, (w, h))  # letterboxed: the page colour fills the rest
        px, py = x + (w - panel.width) // 2, y + (h - panel.height) // 2
        figure.paste(panel, (px, py))
        boxes.append((px, py, px + panel.width, py + panel.height))
        draw_letter(draw, boxes[-1], LETTERS[i])
    buf = io.BytesIO()
    figure.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), boxes


def _index(layout: list[tuple[int, int, int, int]], value: int, axis: int) -> int:
    """How many distinct cell starts along `axis` come before `value` (gutters to add)."""
    starts = sorted({cell[axis] for cell in layout})
    return starts.index(value)


def split_right(found: list[Box], truth: list[Box]) -> str:
    """What `curate split` does with this figure and a caption naming its panels: right, whole or wrong."""
    caption = "Figure. " + " ".join(f"({LETTERS[i]}) Panel {i + 1}." for i in range(len(truth)))
    if unsure(found, split_caption(caption), DEFAULT_MIN_PANEL_PX) is not None:
        return "whole"
    return "right" if all(iou(f, t) >= 0.5 for f, t in zip(found, truth)) else "wrong"


def synthetic_rows(seed: int, per_kind: int, pool: list[Path]) -> list[list]:
    """One table row per kind: figures, panels, boxes found, right, precision, recall, split outcomes."""
    rng = np.random.default_rng(seed)
    rows = []
    totals = np.zeros(7)
    for kind in KINDS:
        counts = np.zeros(7)  # figures, panels, found, right, split right, kept whole, split wrong
        for _ in range(per_kind):
            figure, truth = make_figure(rng, kind, pool)
            found = detect_panels(figure)
            outcome = split_right(found, truth)
            counts += [1, len(truth), len(found), match_boxes(found, truth),
                       outcome == "right", outcome == "whole", outcome == "wrong"]
        rows.append([kind, *counts])
        totals += counts
    rows.append(["all", *totals])
    return rows


def single_image_row(pool: list[Path]) -> list:
    """The detector on every original image (all single panels): how many it wrongly splits."""
    split = sum(len(detect_panels(Image.open(p).convert("RGB"))) > 1 for p in pool)
    return ["VQA-RAD originals (single images)", len(pool), split]


def print_tables(rows: list[list], single: list) -> None:
    """The two Markdown tables."""
    print("| kind | figures | panels | boxes found | right (IoU >= 0.5) | precision | recall "
          "| split right | kept whole | split wrong |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, figs, panels, found, right, ok, whole, wrong in rows:
        print(f"| {kind} | {figs:.0f} | {panels:.0f} | {found:.0f} | {right:.0f} | {right / max(found, 1):.3f} "
              f"| {right / max(panels, 1):.3f} | {ok:.0f} | {whole:.0f} | {wrong:.0f} |")
    print()
    print("| real images | images | wrongly split |")
    print("|---|---|---|")
    print(f"| {single[0]} | {single[1]} | {single[2]} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="1 is the reported set, 0 the development set")
    parser.add_argument("--per-kind", type=int, default=40, help="figures of each kind (default 40)")
    parser.add_argument("--images", type=Path, default=SHARED / "vqa_rad" / "images",
                        help="folder of real images (default: VQA-RAD in the shared sample data)")
    args = parser.parse_args(argv)
    pool = sorted(p for p in args.images.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not pool:
        print(f"no images under {args.images} (set MEDLLAVA_SHARED_DATA or pass --images)", file=sys.stderr)
        return 1
    started = time.monotonic()
    rows = synthetic_rows(args.seed, args.per_kind, pool)
    single = single_image_row(pool)
    print_tables(rows, single)
    print(f"\nseed {args.seed}, {args.per_kind} figures per kind, {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
