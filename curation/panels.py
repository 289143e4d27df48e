"""Panel detection for compound figures: recursive XY-cut on gutters and straight seams, no model weights.

A compound figure is a grid (or nest of grids) of panels separated by gutters: bands of background
colour (white on most journal pages) running the full width or height of the region being cut. The
cut is recursive (XY-cut): find the gutters of a region from its projection profiles, cut along the
axis whose gutters are widest, trim the background margins of each piece, and cut the pieces again.
Panels pasted edge to edge have no gutter; there the cut looks for a seam: one pixel boundary where
the intensity jumps along most of the region's length and much more than on the lines beside it
(natural images have no such straight full-length edge). Pieces smaller than a text mark (a panel
letter, a scale-bar label standing in a gutter) are dropped.

Boxes are `[x0, y0, x1, y1]` in pixels of the figure, x1 and y1 exclusive, listed in reading order
(`reading_order`). A detector the user has replaces `detect_panels` through `--detector
module:function` (see `medllava.curation.common.load_callable`): called with the image path, it returns such boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class CutSettings:
    """Thresholds of the XY-cut; the defaults were set on the benchmark's development seed (docs/curation.md)."""

    page_share: float = 0.75
    """the figure has a page background when one colour covers this share of its outermost pixels"""
    tolerance: int = 12
    """a pixel is background when every channel is within this of the background colour"""
    line_fraction: float = 0.98
    """a row or column is gutter when at least this share of its pixels is background"""
    min_gutter: int = 2
    """narrowest gutter (pixels) that separates panels"""
    seam_jump: int = 24
    """intensity step (0-255) across a seam that counts as an edge pixel"""
    seam_fraction: float = 0.45
    """a seam needs edge pixels along at least this share of the region's length..."""
    seam_contrast: float = 0.3
    """...and this share more than the median of the 10 lines around it"""
    min_piece: float = 0.08
    """a piece whose shorter side is under this share of the figure's shorter side is a mark (a letter, a
    footer bar, a line of text), not a panel"""
    min_seam_piece: float = 0.15
    """a seam must leave at least this share of the figure's shorter side on each side of it"""
    max_depth: int = 6
    """recursion depth of the cut (a 3-level nest of grids needs 3)"""


def to_array(image) -> np.ndarray:
    """An RGB PIL image as an int16 array (H, W, 3), so differences do not wrap."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def background_colour(pixels: np.ndarray, min_share: float) -> np.ndarray | None:
    """The commonest colour of the one-pixel frame of the figure, its page background; None when no colour
    covers `min_share` of the frame (panels fill the figure to its edges). pixels: (H, W, 3)."""
    frame = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    quantised = (frame // 8) * 8
    values, counts = np.unique(quantised, axis=0, return_counts=True)
    if counts.max() < min_share * len(frame):
        return None
    mode = values[counts.argmax()]
    members = np.all(quantised == mode, axis=1)
    return frame[members].mean(axis=0).round().astype(np.int16)


def background_mask(pixels: np.ndarray, colour: np.ndarray | None, tolerance: int) -> np.ndarray:
    """(H, W) bool: pixels within `tolerance` of `colour` in every channel (none without a colour)."""
    if colour is None:
        return np.zeros(pixels.shape[:2], dtype=bool)
    return np.all(np.abs(pixels - colour) <= tolerance, axis=2)


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) spans where a 1-D bool array is True."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def trim(mask: np.ndarray, box: Box, settings: CutSettings) -> Box | None:
    """`box` shrunk to its non-background content, or None if it holds none."""
    x0, y0, x1, y1 = box
    region = mask[y0:y1, x0:x1]
    rows = np.flatnonzero(region.mean(axis=1) < settings.line_fraction)
    cols = np.flatnonzero(region.mean(axis=0) < settings.line_fraction)
    if rows.size == 0 or cols.size == 0:
        return None
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def gutter_cuts(mask: np.ndarray, box: Box, axis: int, settings: CutSettings) -> list[tuple[int, int]]:
    """Interior gutters of a trimmed box along `axis` (0: horizontal gutters, i.e. rows; 1: columns),
    as [start, end) spans in figure coordinates."""
    x0, y0, x1, y1 = box
    region = mask[y0:y1, x0:x1]
    gutter = region.mean(axis=1 - axis) >= settings.line_fraction
    offset = y0 if axis == 0 else x0
    length = gutter.size
    return [(offset + a, offset + b) for a, b in runs(gutter)
            if b - a >= settings.min_gutter and a > 0 and b < length]


def seam_cuts(pixels: np.ndarray, box: Box, axis: int, settings: CutSettings, margin: float) -> list[int]:
    """Seams of a box along `axis`: positions p (figure coordinates) where panels touch between
    line p-1 and line p, at least `margin` pixels from either end of the box."""
    x0, y0, x1, y1 = box
    region = pixels[y0:y1, x0:x1]
    jump = np.abs(np.diff(region, axis=axis)).max(axis=2) > settings.seam_jump
    share = jump.mean(axis=1 - axis)  # one value per boundary between adjacent lines
    if share.size < 8:
        return []
    # Compared with the median of the lines around it, so the two edges of a thin separator line do not
    # hide each other, while a blurred natural edge (strong on several lines in a row) does not pass.
    padded = np.pad(share, 5, mode="edge")
    neighbours = np.median([padded[5 + k:5 + k + share.size] for k in range(-5, 6) if k], axis=0)
    strong = (share >= settings.seam_fraction) & (share - neighbours >= settings.seam_contrast)
    # A seam must leave a panel-sized piece on each side: a footer bar or a burned-in text strip along
    # one edge of a single image is as straight as a seam.
    keep = [int(i) + 1 for i in np.flatnonzero(strong) if margin <= int(i) + 1 <= share.size + 1 - margin]
    offset = y0 if axis == 0 else x0
    return [offset + p for p in keep]


def split_box(box: Box, axis: int, cuts: list[tuple[int, int]]) -> list[Box]:
    """The pieces of `box` between the [start, end) cut spans along `axis`."""
    x0, y0, x1, y1 = box
    lo, hi = (y0, y1) if axis == 0 else (x0, x1)
    edges = [lo, *[v for span in cuts for v in span], hi]
    pieces = []
    for a, b in zip(edges[::2], edges[1::2]):
        pieces.append((x0, a, x1, b) if axis == 0 else (a, y0, b, y1))
    return pieces


def best_cut(pixels: np.ndarray, mask: np.ndarray, box: Box, settings: CutSettings,
             margin: float) -> tuple[int, list[tuple[int, int]], bool] | None:
    """(axis, cut spans, whether they are gutters) for one level of the XY-cut: the axis with the widest
    gutter, else seams at least `margin` from the box's ends."""
    found = [(max(b - a for a, b in cuts), axis, cuts)
             for axis in (0, 1) if (cuts := gutter_cuts(mask, box, axis, settings))]
    if found:
        _, axis, cuts = max(found, key=lambda f: (f[0], -f[1]))  # ties: rows first
        return axis, cuts, True
    for axis in (0, 1):
        seams = seam_cuts(pixels, box, axis, settings, margin)
        if seams:
            return axis, [(p, p) for p in seams], False
    return None


def xy_cut(pixels: np.ndarray, mask: np.ndarray, box: Box, depth: int, settings: CutSettings,
           scale: int) -> list[Box]:
    """Leaf boxes of the recursive cut of `box` (already trimmed). `scale` is the figure's shorter side:
    pieces thinner than `min_piece` of it are dropped, seams closer than `min_seam_piece` of it to an
    end are not cut."""
    cut = best_cut(pixels, mask, box, settings, settings.min_seam_piece * scale) \
        if depth < settings.max_depth else None
    if cut is None:
        return [box]
    axis, spans, gutters = cut
    leaves = []
    for piece in split_box(box, axis, spans):
        # Only gutters leave background to trim; a seam is the panel's own edge.
        trimmed = trim(mask, piece, settings) if gutters else piece
        if trimmed is not None and min(trimmed[2] - trimmed[0], trimmed[3] - trimmed[1]) >= settings.min_piece * scale:
            leaves += xy_cut(pixels, mask, trimmed, depth + 1, settings, scale)
    return leaves


def detect_panels(image, settings: CutSettings = CutSettings(), max_side: int = 2048) -> list[Box]:
    """Panel boxes of a figure (a PIL image), in reading order; one box when it is a single panel.

    A figure longer than `max_side` is cut on a copy shrunk to it (the cut's memory and time grow with
    the pixel count) and the boxes are scaled back."""
    scale = max(image.size) / max_side
    if scale > 1:
        small = image.resize((max(1, round(image.width / scale)), max(1, round(image.height / scale))))
        return [scale_box(b, scale, image.width, image.height) for b in detect_panels(small, settings, max_side)]
    pixels = to_array(image)
    height, width = pixels.shape[:2]
    mask = background_mask(pixels, background_colour(pixels, settings.page_share), settings.tolerance)
    whole = trim(mask, (0, 0, width, height), settings)
    if whole is None:
        return [(0, 0, width, height)]
    boxes = xy_cut(pixels, mask, whole, 0, settings, min(width, height))
    return reading_order(boxes) if boxes else [whole]


def scale_box(box: Box, scale: float, width: int, height: int) -> Box:
    """A box found on a shrunk copy, in the original figure's pixels."""
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def reading_order(boxes: list[Box]) -> list[Box]:
    """Boxes in reading order: rows top to bottom, left to right within a row.

    The boxes are cut as the figure is: first into rows by horizontal lines that cross no box, else into
    columns by vertical ones, recursively; so a tall panel beside a stack of two is read before the
    stack, as figures label it. Boxes that overlap so no line parts them keep top-left order.
    """
    if len(boxes) < 2:
        return list(boxes)
    for axis in (1, 0):  # y first: rows
        groups = _bands(boxes, axis)
        if len(groups) > 1:
            return [b for group in groups for b in reading_order(group)]
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def _bands(boxes: list[Box], axis: int) -> list[list[Box]]:
    """The boxes grouped into bands along `axis` (1: y, rows; 0: x, columns) that no box straddles."""
    ordered = sorted(boxes, key=lambda b: b[axis])
    bands: list[list[Box]] = [[ordered[0]]]
    end = ordered[0][axis + 2]
    for box in ordered[1:]:
        if box[axis] >= end:
            bands.append([box])
        else:
            bands[-1].append(box)
        end = max(end, box[axis + 2])
    return bands


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_boxes(found: list[Box], truth: list[Box], threshold: float = 0.5) -> int:
    """True positives: found boxes matched one to one to true boxes at IoU >= threshold (greedy, best first)."""
    pairs = sorted(((iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True)
    used_f, used_t, hits = set(), set(), 0
    for score, i, j in pairs:
        if score < threshold:
            break
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
            hits += 1
    return hits


def check_boxes(value, width: int, height: int) -> list[Box]:
    """A plug-in's boxes as int tuples inside the figure; ValueError naming the first bad one."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"returned {type(value).__name__}, expected a list of [x0, y0, x1, y1] boxes")
    boxes = []
    for i, box in enumerate(value):
        try:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"box {i} is {box!r}, expected [x0, y0, x1, y1]") from None
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {i} {list(box)} is empty inside the {width}x{height} figure")
        boxes.append((x0, y0, x1, y1))
    return boxes
