"""Oriented Deep Watershed Detector (pdl.omr.oriented, the oriented parts of pdl.omr.dwd and pdl.omr.tiles):
perfect maps decode to slanted thin boxes, the angle target wraps at 180 degrees, an oriented detector learns one
crop, aligned checkpoints of chapter 4 still load, oriented proposals are scored with polygon IoU."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from pdl.core import PdlError
from pdl.omr.boxes import obb_iou
from pdl.omr.dwd import (ORIENTED_COLUMNS, CropDataset, DWDConfig, DWDLoss, DWDNet, Page, decode, load_detector,
                         make_targets, maps_from_targets, orient_from_targets, save_detector)
from pdl.omr.evaluate import evaluate, ground_truth_document
from pdl.omr.oriented import aligned_corners, obb_corners, obb_params
from pdl.omr.tiles import as_proposals, detect_page, predict_maps
from pdl.train import save_checkpoint

TINY = DWDConfig(stages=2, width_mult=0.125, decoder_channels=8, interline=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def envelope(corners: np.ndarray) -> np.ndarray:
    return np.stack([corners[:, 0::2].min(1), corners[:, 1::2].min(1), corners[:, 0::2].max(1),
                     corners[:, 1::2].max(1)], 1)


def test_perfect_maps_decode_a_slanted_thin_beam():
    cfg = DWDConfig(interline=10, output_stride=2, oriented=True)
    gt = obb_corners(64, 64, np.deg2rad(15), 40, 3)                    # a 40 x 3 px beam at 15 degrees
    t = make_targets(envelope(gt), np.array([122]), (128, 128), cfg, oriented=gt)
    det = decode(*maps_from_targets(t), cfg, orient=orient_from_targets(t))
    assert len(det) == 1 and list(det.columns)[-8:] == ORIENTED_COLUMNS
    assert obb_iou(gt, det[ORIENTED_COLUMNS].to_numpy())[0, 0] > 0.8
    assert obb_iou(gt, aligned_corners(det[["x0", "y0", "x1", "y1"]].to_numpy()))[0, 0] < 0.4
    assert np.rad2deg(obb_params(det[ORIENTED_COLUMNS].to_numpy())["theta"][0]) == pytest.approx(15, abs=1)


def test_angle_target_wraps_at_180_degrees():
    cfg = DWDConfig(interline=10, output_stride=1, oriented=True)

    def target(degrees):
        gt = obb_corners(32, 32, np.deg2rad(degrees), 40, 3)
        return make_targets(envelope(gt), np.array([122]), (64, 64), cfg, oriented=gt)["angle"][:, 32, 32]

    np.testing.assert_allclose(target(0), target(180), atol=1e-6)
    np.testing.assert_allclose(target(15), target(195), atol=1e-6)
    np.testing.assert_allclose(target(0.5), target(179.5), atol=0.04)     # one degree apart across the wrap
    assert np.linalg.norm(target(0) - target(90)) > 1.5                   # a quarter turn is the opposite vector


def test_oriented_detector_overfits_one_crop():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, oriented=True)
    rng = np.random.default_rng(0)
    image = np.full((48, 48), 255, np.uint8)
    gts = [obb_corners(16, 14, 0.3, 20, 3), obb_corners(32, 32, 2.6, 24, 3), obb_corners(13, 36, 1.4, 10, 8)]
    for corners in gts:                                                   # draw the boxes as ink
        yy, xx = np.mgrid[:48, :48] + 0.5
        p = obb_params(corners)
        u, v = xx - p["cx"], yy - p["cy"]
        along = u * np.cos(p["theta"]) + v * np.sin(p["theta"])
        across = -u * np.sin(p["theta"]) + v * np.cos(p["theta"])
        image[(np.abs(along) <= p["length"] / 2) & (np.abs(across) <= p["thickness"] / 2)] = rng.integers(0, 40)
    gt = np.concatenate(gts)
    page = Page(image, envelope(gt).astype(np.float32), np.array([122, 122, 25]), 1.0, oriented=gt.astype(np.float32))
    x, t = CropDataset([page], cfg, crop=48, length=1)[0]
    x, t = x[None], {k: v[None] for k, v in t.items()}
    net, loss = DWDNet(cfg), DWDLoss("combined")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        total, parts = loss(net(x), t)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: float(v) for k, v in parts.items()})
    first, last = history[0], pd.DataFrame(history[-5:]).mean()
    assert set(first) == {"energy", "class", "size", "angle", "osize"}
    for part in ("size", "angle", "osize"):
        assert last[part] < 0.5 * first[part], (part, first[part], last[part])
    assert last["energy"] < first["energy"] and last["class"] < first["class"]


def test_chapter_4_checkpoints_still_load(tmp_path):
    torch.manual_seed(0)
    net = DWDNet(TINY)
    old_config = {k: v for k, v in TINY.to_dict().items() if k != "oriented"}   # written before the field existed
    save_checkpoint(tmp_path / "ch4.pt", net, dwd_config=old_config)
    loaded = load_detector(tmp_path / "ch4.pt", expect=TINY)
    assert not loaded.cfg.oriented and set(loaded.heads) == {"energy", "class", "size"}
    img = np.full((64, 64), 255, np.uint8)
    img[20:24, 10:50] = 0
    assert len(predict_maps(loaded, img, tile=None, device="cpu")) == 3      # chapter 4's three maps
    oriented = DWDNet(dataclasses.replace(TINY, oriented=True))
    save_detector(tmp_path / "oriented.pt", oriented)
    assert load_detector(tmp_path / "oriented.pt").cfg.oriented
    with pytest.raises(PdlError, match="oriented=True"):
        load_detector(tmp_path / "oriented.pt", expect=TINY)


def test_oriented_page_detection_and_proposals():
    torch.manual_seed(0)
    net = DWDNet(dataclasses.replace(TINY, oriented=True)).eval()
    img = np.full((128, 160), 255, np.uint8)
    img[::9, :] = 0
    det = detect_page(net, img, interline=9, tile=64, overlap=16, device="cpu")
    assert list(det.columns) == ["cat_id", "x0", "y0", "x1", "y1", "score"] + ORIENTED_COLUMNS
    props = as_proposals(det, oriented=True)
    assert all(len(b) == 8 for b in props["bbox"])
    with pytest.raises(PdlError, match="DWDConfig\\(oriented=True\\)"):
        as_proposals(det[["cat_id", "x0", "y0", "x1", "y1", "score"]], oriented=True)


def test_crop_transform_gets_the_page_and_keeps_the_window():
    cfg = dataclasses.replace(TINY, oriented=True)
    gt = obb_corners(50, 50, 0.5, 30, 3).astype(np.float32)
    page = Page(np.full((120, 120), 255, np.uint8), envelope(gt), np.array([122]), 1.0, oriented=gt)
    seen = []

    def darken(p, rng):
        seen.append(isinstance(rng, np.random.Generator))
        return dataclasses.replace(p, image=np.full_like(p.image, 100))

    plain = CropDataset([page], cfg, crop=64, length=3, seed=5)
    dark = CropDataset([page], cfg, crop=64, length=3, seed=5, transform=darken)
    for i in range(3):
        (_, tp), (xd, td) = plain[i], dark[i]
        assert torch.equal(tp["angle"], td["angle"]) and float(xd.min()) > 0.5
    assert seen == [True] * 3
    with pytest.raises(PdlError, match="callable"):
        CropDataset([page], cfg, crop=64, transform="scoreaug")


def test_evaluate_scores_oriented_proposals_with_polygon_iou():
    gt_box = obb_corners(50, 50, np.deg2rad(15), 40, 3)[0]
    gt = ground_truth_document(pd.DataFrame(dict(img_id=[1], cat_id=[122], bbox=[gt_box.tolist()])))
    exact = pd.DataFrame(dict(img_id=[1], cat_id=[122], bbox=[gt_box.tolist()], score=[0.9]))
    as_polygon = exact.assign(bbox=[aligned_corners(envelope(gt_box[None]))[0].tolist()])
    assert evaluate(gt, exact).summary["map50"] == pytest.approx(1.0)
    assert evaluate(gt, exact).summary["boxes"] == "oriented"
    assert evaluate(gt, as_polygon).summary["map50"] == 0.0                 # polygon IoU of the envelope is ~0.2
