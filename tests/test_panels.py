"""Panel detection (curation/panels.py): gutters, seams, reading order, marks, plug-in boxes, IoU matching."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from medllava.curation.common import load_callable
from medllava.curation.panels import check_boxes, detect_panels, iou, match_boxes, reading_order


def panel(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth picture with a bright disc and mild noise, its own base level per seed. (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    base = 40 + 50 * (seed % 4)
    ys, xs = np.mgrid[0:height, 0:width]
    image = base + 20 * xs / width + rng.normal(0, 2, (height, width))
    cx, cy, r = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7), min(width, height) / 4
    image[(xs - cx) ** 2 + (ys - cy) ** 2 < r * r] += 80
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def compose(size: tuple[int, int], boxes: list[tuple[int, int, int, int]], page: int = 255) -> Image.Image:
    """A figure of `size` on a page colour with a picture pasted in each box."""
    figure = np.full((size[1], size[0], 3), page, dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        figure[y0:y1, x0:x1] = panel(x1 - x0, y1 - y0, i + 1)
    return Image.fromarray(figure)


def test_a_grid_with_white_gutters_and_uneven_sizes_is_found_in_reading_order():
    truth = [(10, 10, 150, 120), (160, 10, 400, 120), (410, 10, 500, 120),
             (10, 135, 150, 300), (160, 135, 400, 300), (410, 135, 500, 300)]
    figure = compose((512, 312), truth)
    ImageDraw.Draw(figure).text((14, 12), "A", fill=(255, 255, 255))  # a panel letter on a panel
    assert detect_panels(figure) == truth


def test_panels_that_touch_are_parted_at_their_seam():
    truth = [(0, 0, 200, 180), (200, 0, 420, 180)]
    assert detect_panels(compose((420, 180), truth)) == truth


def test_a_single_picture_is_one_panel_and_a_footer_bar_does_not_split_it():
    figure = compose((300, 260), [(0, 0, 300, 260)])
    assert detect_panels(figure) == [(0, 0, 300, 260)]
    pixels = np.asarray(figure).copy()
    pixels[248:] = 0  # a burned-in text strip along the bottom, as MedPix images have
    assert len(detect_panels(Image.fromarray(pixels))) == 1


def test_a_letter_standing_in_a_gutter_is_a_mark_not_a_panel():
    truth = [(10, 40, 200, 230), (220, 40, 410, 230)]
    figure = compose((420, 240), truth)
    ImageDraw.Draw(figure).rectangle((12, 5, 24, 25), fill=(0, 0, 0))  # "A" above its panel
    assert detect_panels(figure) == truth


def test_a_tall_panel_beside_a_stack_is_read_first():
    truth = [(5, 5, 200, 300), (210, 5, 400, 150), (210, 160, 400, 300)]
    assert detect_panels(compose((405, 305), truth)) == truth


def test_a_figure_larger_than_max_side_is_cut_on_a_shrunk_copy():
    truth = [(0, 0, 300, 200), (320, 0, 600, 200)]
    found = detect_panels(compose((600, 200), truth), max_side=300)
    assert match_boxes(found, truth, 0.9) == 2


def test_reading_order_of_a_plug_in_s_boxes():
    boxes = [(210, 160, 400, 300), (5, 5, 200, 300), (210, 5, 400, 150), (5, 310, 400, 400)]
    assert reading_order(boxes) == [(5, 5, 200, 300), (210, 5, 400, 150), (210, 160, 400, 300), (5, 310, 400, 400)]


def test_iou_and_one_to_one_matching_by_hand():
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    truth = [(0, 0, 10, 10), (20, 0, 30, 10)]
    assert match_boxes([(0, 0, 10, 10), (1, 0, 10, 10)], truth) == 1  # two finds of one panel count once
    assert match_boxes([(0, 0, 10, 10), (22, 0, 30, 10)], truth) == 2
    assert match_boxes([(0, 0, 10, 10), (26, 0, 36, 10)], truth) == 1  # IoU 0.25 is a miss


def test_plug_in_boxes_are_checked_and_clipped():
    assert check_boxes([[0.4, 0, 50, 60.6], (10, 10, 500, 500)], 100, 100) == [(0, 0, 50, 61), (10, 10, 100, 100)]
    with pytest.raises(ValueError, match="box 1 is 'x'"):
        check_boxes([[0, 0, 5, 5], "x"], 100, 100)
    with pytest.raises(ValueError, match="box 0 .* is empty inside the 100x100 figure"):
        check_boxes([[50, 50, 40, 60]], 100, 100)
    with pytest.raises(ValueError, match="expected a list"):
        check_boxes(None, 100, 100)


def test_a_plug_in_spec_that_cannot_load_names_the_option():
    with pytest.raises(ValueError, match="--detector must look like module:function"):
        load_callable("nocolon", "--detector")
    with pytest.raises(ValueError, match="--ocr no_such_module_xyz:f: cannot load it"):
        load_callable("no_such_module_xyz:f", "--ocr")
