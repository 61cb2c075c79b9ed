"""pdl.omr.frcnn: the torchvision Faster R-CNN baseline (training step, crops shared with the DWD, page tiling)."""
import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn
from torchvision.ops import box_iou

from pdl.core import PdlError
from pdl.omr.dwd import DETECTION_COLUMNS, CropDataset, DWDConfig, Page
from pdl.omr.frcnn import (BoxCrops, build_frcnn, crop_boxes, default_anchor_sizes, detect_page_frcnn, load_frcnn,
                           save_frcnn, train_frcnn)
from pdl.train import TrainConfig

DRAWN = np.float32([[40, 50, 52, 60], [180, 100, 190, 108], [250, 200, 258, 222], [100, 220, 140, 225],
                    [300, 40, 301, 70], [121, 60, 135, 70]])   # the last one straddles a tile seam (x = 128)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _page(scale: float = 1.0, shift: int = 0) -> Page:
    image = np.full((300, 400), 255, np.uint8)
    for x0, y0, x1, y1 in DRAWN.astype(int):
        image[y0:y1, x0:x1] = 0
    return Page(np.roll(image, shift, axis=1), DRAWN + np.float32([shift, 0, shift, 0]),
                np.int64([25, 25, 42, 122, 64, 25]), scale, "synthetic")


def _tiny(**kw):
    torch.manual_seed(0)
    return build_frcnn(width_mult=0.125, stages=2, fpn_channels=16, representation=32, **kw)


class _Blobs(nn.Module):
    """Boxes every ink blob of each tile: class 7, score 1."""

    def forward(self, images):
        out = []
        for image in images:
            labels, _ = ndimage.label(image[0].numpy() > 0.5)
            boxes = torch.tensor([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)],
                                 dtype=torch.float32).reshape(-1, 4)
            out.append(dict(boxes=boxes, scores=torch.ones(len(boxes)), labels=torch.full((len(boxes),), 7)))
        return out


def test_forward_backward_on_two_crops():
    model = _tiny()
    items = [crop_boxes(_page(), 30, 40, 64), crop_boxes(_page(), 280, 20, 64)]   # a notehead-sized box, a stem
    assert [len(t["boxes"]) for _, t in items] == [1, 1]
    losses = model([x for x, _ in items], [t for _, t in items])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert model.roi_heads.detections_per_img == 1500


def test_train_frcnn_records_parts_and_stops_on_time():
    cfg = TrainConfig(epochs=2, lr=1e-3, optimizer="adamw", weight_decay=0.0, schedule="constant", batch_size=1,
                      max_steps_per_epoch=1)
    hist = train_frcnn(_tiny(), BoxCrops([_page()], 64, 4, seed=0), cfg, device="cpu")
    assert hist["steps"].tolist() == [1, 2] and "train_classifier" in hist
    hist = train_frcnn(_tiny(), BoxCrops([_page()], 64, 4, seed=0), cfg, max_seconds=1e-9, device="cpu")
    assert hist["steps"].tolist() == [1]
    with pytest.raises(PdlError, match="max_seconds"):
        train_frcnn(_tiny(), BoxCrops([_page()], 64, 4), cfg, max_seconds=0)


@pytest.mark.parametrize("transform", [None, "darken"])
def test_boxcrops_draw_the_dwd_crops(transform):
    def darken(page, rng):
        return dataclasses.replace(page, image=(page.image // 2 + rng.integers(0, 40)).astype(np.uint8))

    pages = [_page(), _page(shift=9)]
    fn = darken if transform else None
    ours = BoxCrops(pages, crop=64, length=8, seed=5, transform=fn)
    dwd = CropDataset(pages, DWDConfig(), crop=64, length=8, seed=5, transform=fn)
    for i in range(8):
        assert torch.equal(ours[i][0], dwd[i][0])


def test_crop_boxes_clips_and_drops():
    image, target = crop_boxes(_page(), 40, 30, 192)
    assert image.shape == (1, 192, 192) and target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [25, 25, 122, 25]
    assert target["boxes"][2].tolist() == [60.0, 190.0, 100.0, 192.0]
    _, target = crop_boxes(dataclasses.replace(_page(), boxes=DRAWN + np.float32([0, 0, -0.5, 0])), 250, 30, 192)
    stem = target["boxes"][target["labels"] == 64][0].tolist()       # half a pixel wide -> widened to one
    assert stem == [49.75, 10.0, 50.75, 40.0]
    assert len(crop_boxes(_page(), 0, 0, 40)[1]["boxes"]) == 0


def test_detect_page_maps_tiles_back_to_page_pixels():
    page = _page(scale=0.5)
    det = detect_page_frcnn(_Blobs(), page, tile=128, overlap=32, device="cpu")
    assert list(det.columns) == DETECTION_COLUMNS
    got = det.sort_values(["y0", "x0"])[["x0", "y0", "x1", "y1"]].to_numpy()
    want = DRAWN[np.lexsort((DRAWN[:, 0], DRAWN[:, 1]))] / 0.5
    np.testing.assert_allclose(got, want)                          # each rectangle once, in original pixels
    with pytest.raises(PdlError, match="no room"):
        detect_page_frcnn(_Blobs(), page, tile=64, overlap=32)


def test_build_options_and_checkpoint(tmp_path):
    assert default_anchor_sizes(3) == ((6, 10), (12, 20), (24, 40))
    with pytest.raises(PdlError, match="one tuple per pyramid level"):
        build_frcnn(stages=2, anchor_sizes=((8,), (16,)))
    model = _tiny(num_classes=30)
    save_frcnn(tmp_path / "m.pt", model)
    again = load_frcnn(tmp_path / "m.pt")
    x = [torch.rand(1, 64, 64)]
    with torch.no_grad():
        assert torch.equal(again(x)[0]["boxes"], model.eval()(x)[0]["boxes"])
    with pytest.raises(PdlError, match="not a Faster R-CNN checkpoint"):
        torch.save({"state_dict": {}, "extra": {}}, tmp_path / "other.pt")
        load_frcnn(tmp_path / "other.pt")


def test_overfits_one_crop_and_finds_its_boxes():
    """50 steps on one 64-pixel crop: every symbol comes back with its class on the full page (original pixels)."""
    image = np.full((64, 64), 255, np.uint8)
    boxes = np.float32([[8, 10, 18, 18], [30, 30, 40, 38], [44, 8, 52, 30]])
    for x0, y0, x1, y1 in boxes.astype(int):
        image[y0:y1, x0:x1] = 0
    page = Page(image, boxes, np.int64([25, 25, 42]), 0.5, "toy")
    model = _tiny(num_classes=43)
    cfg = TrainConfig(epochs=1, lr=3e-3, optimizer="adamw", weight_decay=0.0, schedule="constant", batch_size=1,
                      max_steps_per_epoch=50)
    train_frcnn(model, BoxCrops([page], 64, 50, seed=0), cfg, device="cpu")
    det = detect_page_frcnn(model, page, tile=64, overlap=0, device="cpu").query("score > 0.3")
    found = torch.tensor(det[["x0", "y0", "x1", "y1"]].to_numpy(), dtype=torch.float32)
    iou = box_iou(torch.from_numpy(boxes / 0.5), found)
    same_class = torch.from_numpy(page.classes[:, None] == det["cat_id"].to_numpy()[None, :])
    assert ((iou > 0.5) & same_class).any(1).all(), det
