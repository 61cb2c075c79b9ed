"""Score following (pdl.music.cyolo, pdl.music.follow, pdl.bench.follow): the checks too heavy or too many for the
library notebooks: learning a fixed batch, the online follower against batched prediction (conditioned and not),
the floor ignoring audio, gradients reaching the audio encoder, bad input, the onset evaluation, OLTW, the bootstrap
and the benchmark entry point. The small examples are shown in notebooks/lib/72_music.cyolo.ipynb and
73_music.follow.ipynb."""
import json

import numpy as np
import pytest
import torch

from pdl.bench.follow import bench_main
from pdl.core import PdlError
from pdl.music.cyolo import (CYOLO, CYOLOConfig, FollowPage, ProgressTask, QueryPages, YoloLoss, collate_queries,
                             prepare_page, predict_frames, toy_page)
from pdl.music.follow import (OnlineFollower, PageMap, bootstrap_difference, bootstrap_ratios, oltw, oltw_boxes,
                              oltw_features, onset_errors, threshold_ratios)

torch.set_num_threads(1)

TINY = CYOLOConfig(image_size=64, stem=4, widths=(4, 8, 8, 8), head=8, audio_channels=(2, 4, 4, 4), spec_dim=8,
                   hidden=8, zdim=8)


def _batch(page, frames, spec=None):
    frames = torch.as_tensor(frames)
    return collate_queries([{"page": page.image, "spec": page.spec if spec is None else spec, "frames": frames,
                             "boxes": torch.from_numpy(page.target_at(frames.numpy()))}])


def _perturb(model):
    """Random FiLM weights, so that audio changes the output of an untrained model."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".film." in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return model


def test_learns_a_fixed_batch():
    torch.manual_seed(0)
    page = toy_page(TINY, frames=100)
    inputs, targets = _batch(page, range(5, 100, 5))
    model, loss_fn = CYOLO(TINY), YoloLoss(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss, parts = loss_fn(model(inputs), targets)
        opt.zero_grad(); loss.backward(); opt.step()
        first = first if first is not None else {k: float(v) for k, v in parts.items()}
    assert float(parts["box"]) < 0.2 * first["box"] and float(parts["iou"]) > first["iou"] + 0.1


@pytest.mark.parametrize("conditioned", [True, False])
def test_online_follower_matches_batched(conditioned):
    torch.manual_seed(0)
    model = _perturb(CYOLO(TINY.replace(conditioned=conditioned))).eval()
    page = toy_page(TINY, frames=85, seed=3)
    online = OnlineFollower(model).follow(page)
    np.testing.assert_allclose(online, predict_frames(model, page, chunk=16), atol=1e-4)


def test_floor_ignores_audio_and_conditioned_model_does_not():
    torch.manual_seed(0)
    page = toy_page(TINY, frames=60)
    silent = FollowPage(page.image, torch.zeros_like(page.spec), page.onset_frames, page.onset_times, page.boxes)
    floor = CYOLO(TINY.replace(conditioned=False)).eval()
    np.testing.assert_allclose(predict_frames(floor, page), predict_frames(floor, silent))
    cond = _perturb(CYOLO(TINY)).eval()
    assert not np.allclose(predict_frames(cond, page), predict_frames(cond, silent))


def test_gradients_reach_the_audio_encoder():
    model = _perturb(CYOLO(TINY))
    inputs, targets = _batch(toy_page(TINY, frames=90), [10, 50, 85])
    loss, _ = YoloLoss(TINY)(model(inputs), targets)
    loss.backward()
    for name in ("audio.lstm.weight_ih_l0", "audio.code.0.weight", "audio.z.0.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_trained_box_follows_the_audio_not_the_frame_count():
    """After training on one toy page, the most confident box (what the evaluation reads, not the loss) must sit
    nearer the targets with the page's own audio than with its frames shuffled, and nearer than one fixed box."""
    torch.manual_seed(0)
    page = toy_page(TINY, frames=100)
    frames = np.arange(5, 100, 5)
    inputs, targets = _batch(page, frames)
    model, loss_fn = CYOLO(TINY), YoloLoss(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss, _ = loss_fn(model(inputs), targets)
        opt.zero_grad(); loss.backward(); opt.step()
    truth = page.target_at(frames)[:, 0]
    shuffled = page.spec[torch.randperm(len(page.spec), generator=torch.Generator().manual_seed(0))]
    error = lambda spec: float(np.abs(model.predict(_batch(page, frames, spec)[0])[:, 0].numpy() - truth).mean())
    assert error(page.spec) < 0.5 * error(shuffled)
    assert error(page.spec) < 0.5 * float(np.abs(truth - np.median(truth)).mean())


def test_objectness_weighting():
    raw = torch.zeros(2, 3, 8, 8, 5)
    raw[..., 4] = -2.0                                                  # unconfident everywhere
    boxes = {"boxes": torch.tensor([[30.0, 20, 6, 14], [12.0, 40, 6, 20]])}
    plain = YoloLoss(TINY)(raw, boxes)[0]
    test_close = lambda a, b: np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    test_close(YoloLoss(TINY, obj_pos_weight=1.0, iou_ratio=1.0)(raw, boxes)[0], plain)   # the published loss
    assert YoloLoss(TINY, obj_pos_weight=20.0)(raw, boxes)[1]["obj"] > YoloLoss(TINY)(raw, boxes)[1]["obj"]
    assert YoloLoss(TINY, iou_ratio=0.0)(raw, boxes)[1]["obj"] > YoloLoss(TINY)(raw, boxes)[1]["obj"]
    with pytest.raises(PdlError, match="obj_pos_weight"):
        YoloLoss(TINY, obj_pos_weight=0.0)


def test_stretched_page_keeps_its_labels():
    page = toy_page(TINY, frames=120)
    for rate in (0.5, 0.8, 1.25, 2.0):
        fast = page.stretched(rate)
        assert abs(len(fast.spec) - 120 / rate) <= 1
        np.testing.assert_allclose(fast.onset_times, page.onset_times / rate)
        # every onset keeps its box and its progress, and the audio at the new onset frame is the onset's audio
        np.testing.assert_array_equal(fast.target_at(fast.onset_frames), page.boxes)
        np.testing.assert_allclose(fast.progress_at(fast.onset_frames), page.progress_at(page.onset_frames))
        loud = fast.spec[fast.onset_frames[3] + 1].argmax()
        assert loud == page.spec[page.onset_frames[3] + 1].argmax()


def test_progress_loss_and_head():
    raw = torch.zeros(2, 3, 8, 8, 5)
    targets = {"boxes": torch.tensor([[30.0, 20, 6, 14], [12.0, 40, 6, 20]]), "progress": torch.tensor([0.25, 1.0])}
    base = YoloLoss(TINY)(raw, targets)[0]
    loss, parts = YoloLoss(TINY, progress_weight=2.0)((raw, torch.tensor([0.75, 1.0])), targets)
    np.testing.assert_allclose(float(parts["progress"]), 0.125, rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(base) + 0.25, rtol=1e-6)
    with pytest.raises(PdlError, match="targets\\['progress'\\]"):
        YoloLoss(TINY)((raw, torch.zeros(2)), {"boxes": targets["boxes"]})
    with pytest.raises(PdlError, match="progress_weight"):
        YoloLoss(TINY, progress_weight=-1.0)


def test_progress_head_reads_the_audio_at_any_tempo():
    """Trained on stretched copies of one toy page (whose audio says which onset sounds), the auxiliary head must
    estimate the share of onsets heard far better than the best constant, and worse with the audio shuffled
    (seeds 0-5 all pass; one of them learns mostly the clock, hence the 0.6)."""
    torch.manual_seed(0)
    page = toy_page(TINY, frames=120)
    task = ProgressTask(CYOLO(TINY))
    data = QueryPages([page], queries=12, stretch=1.6, seed=0)
    loss_fn = YoloLoss(TINY, progress_weight=10.0)
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    for step in range(250):
        inputs, targets = collate_queries([data[step], data[step + 1000]])
        loss, _ = loss_fn(task(inputs), targets)
        opt.zero_grad(); loss.backward(); opt.step()
    task.eval()
    inputs, targets = collate_queries([QueryPages([page], queries=40, stretch=1.6, seed=5, fixed=True)[k] for k in range(4)])
    with torch.no_grad():
        mse = float(((task(inputs)[1] - targets["progress"]) ** 2).mean())
        shuffled = dict(inputs, specs=inputs["specs"][:, torch.randperm(inputs["specs"].shape[1])])
        mse_shuffled = float(((task(shuffled)[1] - targets["progress"]) ** 2).mean())
    constant = float(targets["progress"].var(unbiased=False))
    assert mse < 0.2 * constant and mse < 0.6 * mse_shuffled, (mse, mse_shuffled, constant)   # seeds 0-5 pass


def test_bad_input():
    with pytest.raises(PdlError, match="multiple of 32"):
        CYOLOConfig(image_size=100)
    with pytest.raises(PdlError, match="four stages"):
        CYOLOConfig(widths=(8, 8))
    model = CYOLO(TINY)
    with pytest.raises(PdlError, match="pages must be"):
        model({"pages": torch.zeros(1, 1, 32, 32), "specs": torch.zeros(1, 5, 78), "frames": torch.zeros(1, 1).long()})
    with pytest.raises(PdlError, match="one time and one box"):
        FollowPage(torch.zeros(1, 64, 64), torch.zeros(5, 78), [1, 2], [0.1], [[1, 1, 1, 1]] * 2)
    with pytest.raises(PdlError, match="grey"):
        prepare_page(np.zeros((4, 4, 3)), 64)
    with pytest.raises(PdlError, match="frames must lie"):
        predict_frames(model, toy_page(TINY, frames=20), [25])
    with pytest.raises(PdlError, match="one .*box"):
        YoloLoss(TINY)(torch.zeros(2, 3, 8, 8, 5), {"boxes": torch.zeros(3, 4)})


def test_onset_evaluation():
    page = toy_page(TINY, frames=120)
    frames = np.arange(120)
    assert onset_errors(page, page.target_at(frames)).max() == 0
    # a prediction below the page still maps to the nearest system; a constant prediction is wrong almost always
    const = np.tile(page.boxes[0], (120, 1))
    assert threshold_ratios(onset_errors(page, const))[0] == pytest.approx(1 / len(page.onset_frames))
    pm = PageMap.from_page(page)
    assert pm.system_of(np.array([-50.0, 500.0])).tolist() == [0, 1]


def test_oltw_follows_a_tempo_change():
    ref = toy_page(TINY, frames=120)
    # first half at 0.8x speed, second half at 1.25x: the performance's frame -> reference frame map
    warp = np.concatenate([np.arange(0, 60, 0.8), 60 + np.arange(0, 60, 1.25)])
    perf = toy_page(TINY, frames=120)
    perf.spec = ref.spec[np.minimum(warp.astype(int), 119)]
    est = oltw(oltw_features(ref.spec), oltw_features(perf.spec), c=30)
    assert np.all(np.diff(est) >= 0)                                   # online alignment never goes back
    assert np.median(np.abs(est - warp)) <= 2
    onsets = np.searchsorted(warp, ref.onset_frames)                   # first performance frame of each chord
    perf.onset_frames, perf.onset_times = onsets, onsets / 20.0
    errors = onset_errors(perf, oltw_boxes(perf, ref.spec, ref.onset_frames, c=30))
    assert threshold_ratios(errors)[2] >= 0.8
    with pytest.raises(PdlError, match="onsets"):
        oltw_boxes(perf, ref.spec, ref.onset_frames[:3])


def test_bootstrap_shapes_and_pairing():
    errors = np.array([0.0, 0.2, 3.0, 0.01, 7.0, 0.7])
    groups = np.array(list("aabbcc"))
    boot = bootstrap_ratios(errors, groups, n_boot=50)
    assert boot.shape == (50, 5) and ((boot >= 0) & (boot <= 1)).all()
    assert np.all(bootstrap_difference(errors, errors, groups, n_boot=20) == 0)
    with pytest.raises(PdlError, match="same onsets"):
        bootstrap_difference(errors, errors[:3], groups)


def test_bench_main_saves_a_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PDL_RUNS_DIR", str(tmp_path))
    assert bench_main(["--image-size", "64", "--width-mult", "0.125", "--frames", "3", "--pages", "1",
                       "--threads", "1"]) == 0
    saved = list((tmp_path / "bench").glob("follow-*.json"))
    assert len(saved) == 1
    record = json.loads(saved[0].read_text())["results"]["runs"][0]
    assert record["image_size"] == 64 and record["cached_median_ms"] > 0 and record["cache_speedup"] > 0
    assert "per frame" in capsys.readouterr().out
    with pytest.raises(PdlError, match="frames"):
        bench_main(["--frames", "0"])
