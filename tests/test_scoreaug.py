"""ScoreAug (pdl.omr.scoreaug): every instance's pixels stay inside its transformed oriented box on the real
DeepScoresV2 sample page and on an engraved page (rotation forced up to +-2 degrees), determinism for a seed,
p_augment = 0 leaves a page unchanged, blank scans regenerate identically, and clear errors for bad blank folders."""
import dataclasses

import cv2
import numpy as np
import pytest

from pdl.core import PdlError
from pdl.omr.scoreaug import (ScoreAug, ScoreAugConfig, blank_scans, corners_of, envelope, instances_inside,
                              load_blanks, transform_corners)

ANGLES = (-2.0, -1.3, 0.4, 2.0)
FLAT = [np.full((300, 200), 225, np.uint8)]


def forced(angle: float, **changes) -> ScoreAug:
    """ScoreAug that always augments and rotates by exactly `angle` degrees."""
    return ScoreAug(FLAT, ScoreAugConfig(**(dict(p_augment=1.0, p_rotate=1.0, rotation=(angle, angle)) | changes)))


@pytest.fixture(scope="module")
def real_page():
    """The top of the real sample page (grey) and the o_bbox corners of all its annotations."""
    from pdl.omr.format import read_deepscores, reference_sample
    ds = read_deepscores(reference_sample())
    boxes = np.stack([np.float32(a["o_bbox"]) for a in ds.image_annotations(0)])
    return ds.load_image(0)[:1400], boxes                  # the top of the page keeps the test quick


def covered(shape, boxes: np.ndarray, grow: bool = True) -> np.ndarray:
    """Pixels whose centre lies in one of `boxes` (N, 8, DeepScoresV2 coordinates), with `grow` one pixel more."""
    mask = np.zeros(shape, np.uint8)
    polys = np.round((boxes.reshape(-1, 4, 2) - 0.5) * 16).astype(np.int32)      # OpenCV pixel centres, 4 bits
    for poly in polys:                                    # one at a time: fillPoly leaves overlaps of several empty
        cv2.fillConvexPoly(mask, poly, 1, lineType=cv2.LINE_8, shift=4)
    return (cv2.dilate(mask, np.ones((3, 3), np.uint8)) if grow else mask).astype(bool)


@pytest.mark.parametrize("angle", ANGLES)
def test_real_page_ink_stays_in_the_boxes(real_page, angle):
    """The sample page has no instance map (and its class map does not use the category colours): every ink pixel
    inside some annotation's box before the transform must be inside a transformed box after it."""
    image, boxes = real_page
    aug = forced(angle)
    out, moved, aligned = aug.augment(image, boxes)
    m = aug.last["matrix"]
    np.testing.assert_allclose(moved, transform_corners(boxes, m), atol=1e-4)
    np.testing.assert_allclose(aligned, envelope(moved), atol=1e-4)
    h, w = image.shape
    ink = (image < 128) & covered(image.shape, boxes, grow=False)
    assert ink.sum() > 100_000
    warped = cv2.warpAffine(ink.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST).astype(bool)
    assert not (warped & ~covered(image.shape, moved)).any(), f"ink left the boxes at {angle} deg"
    assert np.median(out[warped]) < 128 < np.median(out[~warped])     # the ink is still dark on the merged page


@pytest.fixture(scope="module")
def engraved():
    """One engraved page at 100 dpi with its instance map and every instance's o_bbox."""
    from pdl.omr.corpus import Piece
    from pdl.omr.engrave import engrave_page
    raster, _ = engrave_page(Piece("bach", "bach/bwv1.6.mxl"), dpi=100)
    boxes = {a.instance: np.float32(a.o_bbox) for a in raster.annotations}
    return raster.image, raster.instances, boxes


@pytest.mark.parametrize("angle", ANGLES)
def test_engraved_page_instances_stay_in_their_boxes(engraved, angle):
    image, instances, boxes = engraved
    assert len(boxes) > 100
    aug = forced(angle, p_blur=1.0)
    out, moved, _ = aug.augment(image, np.stack(list(boxes.values())))
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_allclose(moved, transform_corners(np.stack(list(boxes.values())), aug.last["matrix"]), atol=1e-4)
    assert instances_inside(instances, boxes, aug.last["matrix"], tolerance=1.0) <= 0
    # a box shifted by 3 pixels is caught
    shifted = {k: v + np.float32([3, 0] * 4) for k, v in boxes.items()}
    assert instances_inside(instances, shifted, aug.last["matrix"], tolerance=1.0) > 0


def test_same_seed_same_pages_and_p_augment_zero_is_identity(engraved):
    image, _, boxes = engraved
    corners = np.stack(list(boxes.values()))
    cfg = ScoreAugConfig(p_augment=1.0, p_snp=0.5, p_blur=0.5)
    a = [ScoreAug(FLAT, cfg, seed=4).augment(image, corners) for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(*a))
    b = ScoreAug(FLAT, cfg, seed=5).augment(image, corners)
    assert not np.array_equal(a[0][0], b[0])
    rng = np.random.default_rng(1)
    same = ScoreAug(FLAT, ScoreAugConfig(p_augment=0.0)).augment(image, corners, rng)
    assert np.array_equal(same[0], image) and np.array_equal(same[1], corners)
    np.testing.assert_allclose(same[2], envelope(corners))


def test_page_and_batch_move_boxes_with_or_without_an_oriented_field():
    from pdl.omr.dwd import Page
    image = np.full((100, 160), 255, np.uint8)
    image[40:50, 20:140] = 0
    boxes = np.float32([[20, 40, 140, 50]])
    page = Page(image, boxes, np.int64([1]), 1.0, "p")
    aug = forced(2.0)
    out = aug.page(page)                       # falls back to the corners of the aligned boxes
    np.testing.assert_allclose(out.boxes, envelope(transform_corners(corners_of(boxes), aug.last["matrix"])),
                               atol=1e-4)
    assert out.boxes[0, 2] - out.boxes[0, 0] < 121 and out.boxes[0, 3] - out.boxes[0, 1] > 10

    @dataclasses.dataclass
    class OrientedPage(Page):
        oriented: np.ndarray | None = None
    opage = OrientedPage(image, boxes, np.int64([1]), 1.0, "p", 0, corners_of(boxes))
    moved = aug(opage)
    np.testing.assert_allclose(moved.oriented, transform_corners(corners_of(boxes), aug.last["matrix"]), atol=1e-4)
    np.testing.assert_allclose(moved.boxes, envelope(moved.oriented), atol=1e-4)
    images, oriented, aligned = aug.batch([image, image], [boxes, corners_of(boxes)])
    assert len(images) == len(oriented) == len(aligned) == 2 and oriented[0].shape == (1, 8)
    with pytest.raises(PdlError, match="one box array per image"):
        aug.batch([image], [])


def test_scoreaug_is_a_crop_transform():
    from pdl.omr.dwd import CropDataset, DWDConfig, Page
    image = np.full((128, 160), 255, np.uint8)
    image[40:50, 20:140] = 0
    page = Page(image, np.float32([[20, 40, 140, 50]]), np.int64([1]), 1.0, "p")
    crops = CropDataset([page], DWDConfig(), crop=64, length=2, seed=0,
                        transform=ScoreAug(FLAT, ScoreAugConfig(p_augment=1.0)))
    x, targets = crops[0]
    assert x.shape[-2:] == (64, 64) and targets


def test_load_blanks_errors(tmp_path):
    from PIL import Image
    with pytest.raises(PdlError, match="does not exist"):
        load_blanks(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(PdlError, match="no blank page images"):
        load_blanks(tmp_path)
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "ok.png")
    assert [b.shape for b in load_blanks(tmp_path)] == [(10, 12)]
    for mode, name in (("I;16", "deep.png"), ("F", "float.tif"), ("CMYK", "print.jpg")):
        im = Image.new(mode, (12, 10))
        im.save(tmp_path / name)
        with pytest.raises(PdlError, match=f"mode '{mode}"):
            load_blanks(tmp_path)
        (tmp_path / name).unlink()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(PdlError, match="corrupt"):
        load_blanks(tmp_path)


def test_blank_scans_are_deterministic_reused_and_documented(tmp_path):
    import json
    a = blank_scans(tmp_path / "a", count=2, size=(200, 150), seed=3)
    b = blank_scans(tmp_path / "b", count=2, size=(200, 150), seed=3)
    files = sorted(a.glob("*.png"))
    assert len(files) == 2 and [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted(b.glob("*.png"))]
    stamp = [f.stat().st_mtime_ns for f in files]
    blank_scans(tmp_path / "a", count=2, size=(200, 150), seed=3)
    assert [f.stat().st_mtime_ns for f in files] == stamp                 # reused, not redrawn
    prov = json.loads((a / "provenance.json").read_text())
    assert prov["settings"]["seed"] == 3 and len(prov["blanks"]) == 2
    assert "copyright" in prov["texture_licence"]["file"] and all("texture" in r for r in prov["blanks"])
    with pytest.raises(PdlError, match="other settings"):
        blank_scans(tmp_path / "a", count=3, size=(200, 150), seed=3)
    blanks = load_blanks(a)
    assert [x.shape for x in blanks] == [(200, 150)] * 2 and all(x.dtype == np.uint8 for x in blanks)
    assert 150 < np.mean([x.mean() for x in blanks]) < 250                  # light paper
