"""Box geometry of pdl.omr.boxes (IoU, polygon area, mask boxes) checked against independent computations, and
the text layer's handling of music-font characters (no missing-glyph boxes on a page with a metronome mark)."""
import cv2
import numpy as np
import pytest

from pdl.omr.boxes import (aabb_iou, affine_apply, affine_compose, ink_boxes, obb_iou, oriented_box,
                           polygon_area)

SCALE = 50  # raster pixels per unit for the independent IoU computation


def _raster(corners: np.ndarray, size: int) -> np.ndarray:
    """A filled quadrilateral (corners in units) on a size x size grid of 1/SCALE-unit pixels."""
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(corners).reshape(4, 2) * SCALE * 16).astype(np.int32)], 1,
                 cv2.LINE_8, 4)
    return mask.astype(bool)


def _raster_iou(a, b, size=600) -> float:
    ra, rb = _raster(a, size), _raster(b, size)
    return (ra & rb).sum() / (ra | rb).sum()


def _rotated_box(cx, cy, w, h, degrees):
    return cv2.boxPoints(((cx, cy), (w, h), degrees)).reshape(-1)


def test_obb_iou_matches_a_raster_count():
    rng = np.random.default_rng(0)
    boxes = np.array([_rotated_box(*rng.uniform(4, 8, 2), *rng.uniform(0.5, 3, 2), rng.uniform(0, 180))
                      for _ in range(12)])
    iou = obb_iou(boxes, boxes)
    for i in range(len(boxes)):
        for j in range(len(boxes)):
            assert iou[i, j] == pytest.approx(_raster_iou(boxes[i], boxes[j]), abs=0.02), (i, j)
    assert (iou > 0).sum() > len(boxes)          # some distinct boxes overlap: the check is not only the diagonal


def test_obb_iou_known_values():
    square = [0, 0, 1, 0, 1, 1, 0, 1]
    diamond = _rotated_box(0.5, 0.5, 1, 1, 45)
    octagon = 2 * (np.sqrt(2) - 1)              # what a unit square and its 45-degree turn share
    np.testing.assert_allclose(obb_iou(np.array([square]), np.array([diamond, square[::-1], [5, 5, 6, 5, 6, 6, 5, 6]])),
                               [[octagon / (2 - octagon), 1.0, 0.0]])
    assert obb_iou(np.zeros((3, 8)), np.zeros((0, 8))).shape == (3, 0)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        obb_iou(np.zeros((1, 6)), np.zeros((1, 8)))


def test_aabb_iou_agrees_with_obb_iou_on_axis_aligned_boxes():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 10, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 4, (20, 2))], axis=1)
    corners = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 1],
                        boxes[:, 2], boxes[:, 3], boxes[:, 0], boxes[:, 3]], axis=1)
    np.testing.assert_allclose(aabb_iou(boxes, boxes[:7]), obb_iou(corners, corners[:7]), atol=1e-12)
    assert aabb_iou(boxes, boxes[:7]).shape == (20, 7)


def test_polygon_area_and_mask_boxes():
    assert polygon_area([0, 0, 4, 0, 4, 3]) == 6.0
    assert polygon_area(np.array([[0, 0], [0, 3], [4, 0]])) == 6.0      # either winding
    mask = np.zeros((40, 40), bool)
    cv2.fillPoly(mask.view(np.uint8), [np.array([[5, 20], [20, 5], [34, 19], [19, 34]], np.int32)], 1)
    (x0, y0, x1, y1), corners = ink_boxes(mask)
    assert (x0, y0, x1, y1) == (5, 5, 35, 35)
    area = polygon_area(oriented_box(mask))
    assert mask.sum() <= area < 0.6 * (x1 - x0) * (y1 - y0)             # encloses the pixels, far tighter
    # every pixel square lies inside the oriented box
    ys, xs = np.nonzero(mask)
    squares = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float32)
    assert min(cv2.pointPolygonTest(corners.astype(np.float32), tuple(map(float, p)), True) for p in squares) > -1e-3


def test_affine_compose_order():
    rotate = np.array([[0.0, -1, 0], [1, 0, 0]])
    move = np.array([[1.0, 0, 3], [0, 1, 0]])
    np.testing.assert_allclose(affine_apply(affine_compose(move, rotate), np.array([[1.0, 0]])), [[3, 1]])
    np.testing.assert_allclose(affine_apply(affine_compose(rotate, move), np.array([[1.0, 0]])), [[0, 4]])


def test_metronome_mark_has_no_missing_glyph():
    pytest.importorskip("verovio")
    pytest.importorskip("music21")
    from pdl.omr.corpus import Piece
    from pdl.omr.engrave import engrave_page
    from pdl.omr.text import missing_glyphs, render_text_layer

    page, svg = engrave_page(Piece("joplin", "joplin/maple_leaf_rag.mxl"), font="Gootville", dpi=100)
    width, height = page.image.shape[1], page.image.shape[0]
    tempo = [t for t in svg.iter("{http://www.w3.org/2000/svg}tspan") if t.text == "\uECA5"]
    assert tempo, "the test page should hold a metronome mark (U+ECA5 metNoteQuarterUp)"
    assert missing_glyphs(svg, width, height) == []
    assert render_text_layer(svg, width, height).max() == 255
