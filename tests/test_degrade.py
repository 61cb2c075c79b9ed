"""pdl.omr.degrade: a degraded DeepScoresV2-layout test set, byte-identical for a seed, annotations moved with the
page (every instance pixel inside its new oriented box), clear errors for bad sources and output folders."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from pdl.core import PdlError
from pdl.omr.boxes import flat_corners, ink_boxes
from pdl.omr.classes import DS_COLOR, DS_ID, MUSCIMA_ID, categories_json
from pdl.omr.degrade import DegradeConfig, degrade_dataset, degrade_page, page_seed
from pdl.omr.engrave import write_page
from pdl.omr.format import SPLIT_FILE, DeepScoresWriter, format_comments, read_deepscores, reference_sample
from pdl.omr.raster import PageRaster


def _symbols(h: int, w: int) -> list[tuple[str, np.ndarray]]:
    """A staff, two slanted beams, noteheads with stems, a tie-like arc."""
    out = []

    def add(cls, draw):
        m = np.zeros((h, w), np.uint8)
        draw(m)
        out.append((cls, m))
    for y in range(60, 101, 10):
        add("staff", lambda m, y=y: m.__setitem__((y, slice(10, w - 10)), 1))
    for k, (cx, cy) in enumerate(((40, 95), (90, 85), (140, 75))):
        add("noteheadBlackOnLine", lambda m, cx=cx, cy=cy: cv2.ellipse(m, (cx, cy), (6, 4), -20, 0, 360, 1, -1))
        add("stem", lambda m, cx=cx, cy=cy, k=k: m.__setitem__((slice(cy - 50 + 5 * k, cy), slice(cx + 5, cx + 7)), 1))
    add("beam", lambda m: cv2.fillPoly(m, [np.array([[44, 40], [148, 20], [148, 26], [44, 46]])], 1))
    add("tie", lambda m: cv2.ellipse(m, (90, 120), (40, 8), 0, 0, 180, 1, 2))
    return out


def _dataset(folder: Path, pages: int = 2, h: int = 200, w: int = 180, empty_page: bool = False) -> Path:
    """A DeepScoresV2-layout folder of `pages` drawn pages (test split), written like our generator writes one."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = DeepScoresWriter(folder / SPLIT_FILE.format(split="test"),
                              dict(info=dict(description="drawn"), annotation_sets=["deepscores", "muscima++"],
                                   categories=categories_json()))
    for p in range(pages):
        masks = _symbols(h, w)
        instances, segmentation = np.zeros((h, w), np.int32), np.zeros((h, w), np.uint8)
        for k in sorted(range(len(masks)), key=lambda k: -int(masks[k][1].sum())):
            instances[masks[k][1] > 0], segmentation[masks[k][1] > 0] = k + 1, DS_COLOR[masks[k][0]]
        image = np.where(instances > 0, 0, 255).astype(np.uint8)
        write_page(folder, f"page-{p}", PageRaster(image, instances, segmentation, [], {}))
        anns = []
        for k, (cls, m) in enumerate(masks, 1):
            (x0, y0, x1, y1), corners = ink_boxes(m > 0)
            anns.append((str(100 * p + k), dict(a_bbox=[float(x0), float(y0), float(x1), float(y1)],
                                                o_bbox=flat_corners(corners), cat_id=[DS_ID[cls], MUSCIMA_ID[cls]],
                                                area=int(m.sum()), img_id=str(p + 1), comments=format_comments(k))))
        if empty_page and p == pages - 1:
            anns = []
        writer.add(dict(id=p + 1, filename=f"page-{p}.png", width=w, height=h, ann_ids=[k for k, _ in anns]), anns)
    writer.close()
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _inside(ann: dict, instances: np.ndarray, instance: int, tolerance: float = 1.0) -> bool:
    ys, xs = np.nonzero(instances == instance)
    box = np.asarray(ann["o_bbox"], np.float32).reshape(4, 1, 2)
    return bool(len(xs)) and all(cv2.pointPolygonTest(box, (x + 0.5, y + 0.5), True) >= -tolerance
                                 for x, y in zip(xs.tolist(), ys.tolist()))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def degraded(source, tmp_path_factory):
    return degrade_dataset(source, tmp_path_factory.mktemp("out") / "a", seed=0)


def test_same_seed_same_bytes_other_seed_other_pages(source, degraded, tmp_path):
    again = degrade_dataset(source, tmp_path / "b", seed=0)
    assert _files(again) == _files(degraded)
    other = degrade_dataset(source, tmp_path / "c", seed=1)
    for name in ("images/page-0.png", "instance/page-0_inst.png", SPLIT_FILE.format(split="test")):
        assert _files(other)[name] != _files(degraded)[name]


def test_every_instance_pixel_inside_its_moved_box_and_boxes_moved(source, degraded):
    clean, ds = read_deepscores(source, "test"), read_deepscores(degraded, "test")
    assert [i["filename"] for i in ds.images] == [i["filename"] for i in clean.images]
    for i in range(len(ds.images)):
        instances = ds.load_instances(i)
        anns = ds.image_annotations(i)
        assert len(anns) == len(clean.image_annotations(i))
        moved = []
        for k, a in enumerate(anns, 1):
            assert _inside(a, instances, k), (i, k, a)
            before = clean.annotations[ds.images[i]["ann_ids"][k - 1]]
            moved.append(not np.allclose(a["o_bbox"], before["o_bbox"], atol=0.5))
            assert a["area"] > 0
        assert all(moved[:5]) and np.mean(moved) >= 0.75        # the staff lines, and most other symbols
        assert ds.load_segmentation(i).shape == instances.shape == ds.load_image(i).shape


def test_provenance_records_pipeline_config_and_page_seeds(degraded):
    info = read_deepscores(degraded, "test").data["info"]["degrade"]
    assert info["seed"] == 0 and info["config"] == DegradeConfig().as_dict() and info["pipeline"]
    assert [p["seed"] for p in info["pages"]] == [page_seed(0, 0), page_seed(0, 1)]
    assert all(p["steps"][-1]["effect"] == "jpeg" for p in info["pages"])


def test_subset_of_pages_matches_the_full_run_and_resume_is_identical(source, degraded, tmp_path):
    one = degrade_dataset(source, tmp_path / "one", seed=0, indices=[1])
    assert _files(one)["images/page-1.png"] == _files(degraded)["images/page-1.png"]
    full = degrade_dataset(source, tmp_path / "full", seed=0)
    before = _files(full)
    (full / SPLIT_FILE.format(split="test")).unlink()                    # as if killed before the end
    (full / "work" / "pages" / "000001.json").unlink()
    degrade_dataset(source, full, seed=0)
    assert _files(full) == before


def test_real_sample_page_without_instance_map(tmp_path):
    cfg = DegradeConfig(p_ink=0, p_dirty_drum=0)
    out = degrade_dataset(reference_sample(), tmp_path / "real", seed=2, split=None, cfg=cfg)
    clean, ds = read_deepscores(reference_sample()), read_deepscores(out, "test")
    page = ds.data["info"]["degrade"]["pages"][0]
    assert page["boxes"]["corners"] + page["boxes"]["dropped"] == 547 and page["boxes"]["pixels"] == 0
    assert len(ds.annotations) >= 540 and not (out / "instance").exists()
    moved = [ds.annotations[k]["o_bbox"] != clean.annotations[k]["o_bbox"] for k in ds.images[0]["ann_ids"]]
    assert all(moved)
    assert ds.load_image(0).shape == clean.load_image(0).shape


def test_degrade_page_is_deterministic_and_moves_the_instances():
    image = np.full((120, 90), 255, np.uint8)
    image[30:90, 40:43] = 0
    instances = (image == 0).astype(np.int32)
    a, ia = degrade_page(image, instances, 5, DegradeConfig(max_skew=5))
    b, ib = degrade_page(image, instances, 5, DegradeConfig(max_skew=5))
    assert np.array_equal(a, b) and np.array_equal(ia, ib)
    assert not np.array_equal(ia, instances) and ia.max() == 1


def test_clear_errors(source, degraded, tmp_path):
    with pytest.raises(PdlError, match="no DeepScoresV2 annotation file"):
        degrade_dataset(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(PdlError, match="without annotations"):
        degrade_dataset(_dataset(tmp_path / "empty", pages=2, empty_page=True), tmp_path / "y")
    ds = read_deepscores(source, "test")
    ds.data = dict(ds.data, images=[])
    with pytest.raises(PdlError, match="holds no pages"):
        degrade_dataset(ds, tmp_path / "z")
    with pytest.raises(PdlError, match="made with other settings"):
        degrade_dataset(source, degraded, seed=3)
    with pytest.raises(PdlError, match="not empty and holds no degraded dataset"):
        degrade_dataset(source, source)
    with pytest.raises(PdlError, match="out of range"):
        degrade_dataset(source, tmp_path / "w", indices=[5])
    with pytest.raises(PdlError, match="expected a grey page"):
        degrade_page(np.zeros((5, 5, 3), np.uint8), None, 0)
    with pytest.raises(PdlError, match="p_dirty_drum must be a probability"):
        DegradeConfig(p_dirty_drum=2)
