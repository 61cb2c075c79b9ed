"""Deep Watershed Detector (pdl.omr.dwd, pdl.omr.tiles, pdl.bench.dwd): bad inputs give clear errors or documented
results, decoding recovers the boxes of perfect maps, tiling matches untiled inference."""
import numpy as np
import pandas as pd
import pytest
import torch

from pdl.core import PdlError
from pdl.omr.boxes import aabb_iou
from pdl.omr.dwd import (DWDConfig, DWDNet, decode, estimate_interline, load_detector, make_targets, page_boxes,
                         prepare_page, read_page_image, save_detector)
from pdl.omr.format import read_deepscores, reference_sample
from pdl.omr.tiles import detect_page, predict_maps
from pdl.train import save_checkpoint

TINY = DWDConfig(stages=2, width_mult=0.125, decoder_channels=8, interline=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return DWDNet(TINY).eval()


def staff_page(interline: int = 12, thickness: int = 2) -> np.ndarray:
    page = np.full((300, 400), 255, np.uint8)
    for top in (40, 160):
        for line in range(5):
            page[top + interline * line: top + interline * line + thickness, 20:380] = 0
    return page


def test_page_without_staff_annotations_estimates_the_interline():
    no_boxes = pd.DataFrame(columns=["cat_id", "name", "x0", "y0", "x1", "y1"])
    page = prepare_page(staff_page(12), no_boxes, DWDConfig(interline=6))
    assert page.scale == pytest.approx(0.5)            # estimated 12 px -> rescaled to 6
    assert estimate_interline(staff_page(16, 3)) == 16


def test_blank_page_without_interline_is_a_clear_error(net):
    with pytest.raises(PdlError, match="no staff lines"):
        detect_page(net, np.full((200, 200), 255, np.uint8))


def test_empty_page_gives_no_detections(net):
    det = detect_page(net, np.full((500, 400), 255, np.uint8), interline=20, device="cpu")
    assert len(det) == 0 and list(det.columns) == ["cat_id", "x0", "y0", "x1", "y1", "score"]


def test_corrupt_or_missing_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "page.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(PdlError, match="cannot read a page image"):
        read_page_image(bad)
    with pytest.raises(PdlError, match="cannot read a page image"):
        read_page_image(tmp_path / "missing.png")
    with pytest.raises(PdlError, match="grey uint8 page"):
        prepare_page(np.zeros((10, 10, 3), np.uint8), pd.DataFrame(columns=["name"]), TINY)


def test_checkpoint_of_another_configuration_is_refused(tmp_path, net):
    save_detector(tmp_path / "tiny.pt", net)
    assert load_detector(tmp_path / "tiny.pt", expect=TINY).cfg == TINY
    with pytest.raises(PdlError, match=r"another configuration: stages=2 \(expected 3\)"):
        load_detector(tmp_path / "tiny.pt", expect=DWDConfig(width_mult=0.125, decoder_channels=8, interline=8))
    save_checkpoint(tmp_path / "other.pt", torch.nn.Linear(2, 2))
    with pytest.raises(PdlError, match="not a Deep Watershed Detector checkpoint"):
        load_detector(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(PdlError, match="cannot read checkpoint"):
        load_detector(tmp_path / "broken.pt")


def test_perfect_maps_decode_to_the_real_page_boxes():
    real = read_deepscores(reference_sample())
    cfg = DWDConfig(interline=8)
    page = prepare_page(real.load_image(0), page_boxes(real, 0), cfg)
    shape = tuple((np.array(page.image.shape) // 16 + 1) * 16)
    t = make_targets(page.boxes, page.classes, shape, cfg)
    det = decode(t["energy"], t["owner"], t["size"], cfg)
    iou = aabb_iou(page.boxes, det[["x0", "y0", "x1", "y1"]].to_numpy())
    assert (iou.max(1) > 0.5).mean() > 0.6
    assert det.score.between(0, 1).all()


def test_tiled_maps_match_untiled(net):
    img = (np.random.default_rng(1).random((120, 150)) > 0.1).astype(np.uint8) * 255
    tiled = predict_maps(net, img, tile=64, overlap=16, device="cpu")
    whole = predict_maps(net, img, tile=None, device="cpu")
    assert tiled[0].shape == whole[0].shape == (60, 75)
    assert (tiled[1] == whole[1]).mean() > 0.9
    with pytest.raises(PdlError, match="multiples of 8"):
        predict_maps(net, img, tile=50)


def test_bench_rejects_bad_options():
    from pdl.bench.dwd import bench_main
    with pytest.raises(PdlError, match="invalid benchmark options"):
        bench_main(["--tile", "100"])
