"""Artificial mental rotation (pdl.amr), the checks too heavy or too many for the chapter notebook: rotation
against OpenCV for every interpolation and on uint8, bad input, attaching to unmodified torchvision models of
every family, frozen-base training, checkpointed training, angle sweeps, the benchmark entry point.

The small examples (angle labels, the rotation direction, quarter turns, the mask, gradients reaching only the
head, budgets, breakpoints, `RotationBatchFn` targets) are shown and checked in `notebooks/08_amr.ipynb`."""
import json
import logging
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from pdl.amr import (AMR, RotationBatchFn, breakpoint_share, budget_config, circle_mask, default_taps,
                     label_to_angle, mask_circle, rotate, rotate_cv2, rotate_cv2_batch, sweep_angles, train_amr,
                     train_or_load)
from pdl.bench.amr import bench_main
from pdl.core import PdlError
from pdl.models.core import create_model
from pdl.train import TrainConfig, overfit_batch

torch.set_num_threads(1)


@pytest.fixture
def images():
    return torch.rand(5, 3, 24, 30, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- rotation and masking

@pytest.mark.parametrize("interpolation", ["nearest", "bicubic"])   # bilinear: in the notebook
def test_torch_rotation_matches_opencv(images, interpolation):
    angles = torch.tensor([0.0, 13.0, 90.0, 181.5, 299.0])
    ours = rotate(images, angles, interpolation=interpolation)
    ref = rotate_cv2_batch(images, angles, interpolation=interpolation)
    assert ours.shape == images.shape and ours.dtype == images.dtype
    assert (ours - ref).abs().max() < 1e-4


def test_torch_rotation_matches_opencv_on_uint8(images):
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    angles = [7.0, 45.0, 100.0, 230.0, 333.0]
    ref = np.stack([rotate_cv2(img, a) for img, a in zip(u8, angles)]).astype(np.float32)
    ours = rotate(torch.from_numpy(u8).permute(0, 3, 1, 2).float(), torch.tensor(angles)).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - ref).max() <= 3 and np.abs(ours - ref).mean() < 0.5


def test_rotation_there_and_back_is_close_inside_the_disc(images):
    back = rotate(rotate(images, 37.0), -37.0)
    inner = ((torch.arange(24)[:, None] - 11.5) ** 2 + (torch.arange(30)[None] - 14.5) ** 2) < 8 ** 2
    assert (back - images)[..., inner].abs().mean() < 0.15


def test_rotation_output_is_zero_outside_the_disc():
    mask = circle_mask(8, 12)
    assert torch.equal(mask_circle(torch.ones(2, 3, 8, 12))[0, 0], mask.float())
    rotated = rotate(torch.ones(1, 1, 16, 16), 33.0)
    assert rotated[..., ~circle_mask(16, 16)].abs().max() == 0 and rotated[..., 8, 8].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad", [
    lambda: rotate(torch.rand(8, 8), 3.0),                           # no channel axis
    lambda: rotate(torch.rand(1, 1, 1, 8, 8), 3.0),                  # 5-d
    lambda: rotate(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 3.0), # integer images
    lambda: rotate(torch.rand(2, 1, 8, 8), torch.zeros(3)),          # wrong number of angles
    lambda: rotate(torch.rand(2, 1, 8, 8), 3.0, interpolation="area"),
    lambda: rotate_cv2(torch.rand(3, 8, 8), 3.0),                    # tensor instead of H x W x C array
    lambda: mask_circle(torch.tensor(1.0)),
    lambda: label_to_angle(torch.tensor([360])),                    # labels are 0..359
    lambda: create_model("resnet18", stem="tiny"),
    lambda: default_taps(nn.Sequential(nn.Conv2d(3, 3, 3))),
    lambda: AMR(nn.Sequential(nn.Conv2d(3, 3, 3))),
    lambda: AMR(torchvision.models.resnet18(num_classes=3), taps=["layer9"], input_size=32),
    lambda: RotationBatchFn("colour"),
    lambda: RotationBatchFn("angle", angles=[]),
    lambda: budget_config(TrainConfig(), 0.0, 10),
])
def test_bad_input_raises_pdl_error(bad):
    with pytest.raises(PdlError):
        bad()


def test_amr_rejects_wrong_tensor_shapes():
    amr = AMR(create_model("resnet18", num_classes=3, width_mult=0.125), input_size=32, widths=(4, 4, 8, 8, 8))
    for bad in (torch.rand(3, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.uint8), np.zeros((1, 3, 32, 32))):
        with pytest.raises(PdlError):
            amr(bad)


# ---------------------------------------------------------------- attaching to unmodified torchvision models

def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fresh(name: str) -> tuple[nn.Module, int]:
    if name == "resnet50":
        return torchvision.models.resnet50(num_classes=5), 64
    if name == "efficientnet_b0":
        return torchvision.models.efficientnet_b0(num_classes=5), 64
    return create_model("vit_tiny", num_classes=5, image_size=32, width_mult=0.25), 32


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "vit_tiny"])
def test_amr_training_leaves_base_untouched(name):
    torch.manual_seed(0)
    base, size = _fresh(name)
    before = _snapshot(base)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    modules_before = [n for n, _ in base.named_modules()]
    amr = AMR(base, input_size=size, widths=(8, 8, 16, 16, 16))
    head_before = _snapshot(amr.head)
    data = TensorDataset(torch.rand(12, 3, size, size), torch.zeros(12, dtype=torch.long))
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.01, max_steps_per_epoch=2)
    train_amr(amr, data, cfg, device="cpu")
    after = base.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"base changed: {changed[:5]}"   # weights and BatchNorm running stats / counters
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert [n for n, _ in base.named_modules()] == modules_before
    assert not any(m._forward_hooks for m in base.modules()), "hooks must not outlive the AMR forward pass"
    assert any(not torch.equal(v, amr.head.state_dict()[k]) for k, v in head_before.items()), "the head must train"
    amr.train()
    assert amr.head.training and not base.training and not any(m.training for m in base.modules())
    x = torch.rand(2, 3, size, size)
    assert amr(x).shape == (2, 360) and amr.classify(x).shape == (2, 5)


def test_default_taps_follow_the_published_code():
    assert default_taps(torchvision.models.resnext50_32x4d()) == ("cnn", ("maxpool", "layer1", "layer2", "layer3", "layer4"))
    assert default_taps(torchvision.models.efficientnet_b0())[1] == tuple(f"features.{i}" for i in (0, 2, 4, 6, 8))
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=2,
                                               hidden_dim=16, mlp_dim=32)
    family, taps = default_taps(vit)
    assert family == "vit" and taps[1:] == tuple(f"encoder.layers.encoder_layer_{i}" for i in (0, 3, 6, 11))


def test_amr_with_user_weights_and_normalisation():
    base = create_model("resnet18", num_classes=4, width_mult=0.125)
    trained = create_model("resnet18", num_classes=4, width_mult=0.125)
    base.load_state_dict(trained.state_dict())                         # weights are passed in, never downloaded
    amr = AMR(base, input_size=32, widths=(4, 4, 8, 8, 8), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(amr.base_logits(x), base.eval()((x - 0.5) / 0.25))
    assert torch.allclose(amr.correct(x, torch.tensor([10.0, 20.0, 30.0])), rotate(x, torch.tensor([-10.0, -20.0, -30.0])))
    assert amr.predict_angle(x).shape == (3,) and ((amr.predict_angle(x) >= 0) & (amr.predict_angle(x) < 360)).all()


def test_amr_head_learns_angles():
    torch.manual_seed(0)
    amr = AMR(create_model("resnet18", num_classes=4, width_mult=0.125), input_size=32, widths=(8, 8, 16, 16, 16))
    x, y = RotationBatchFn("angle")((torch.rand(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)), torch.device("cpu"))
    losses = overfit_batch(amr, x, y, steps=40, lr=3e-3, device="cpu")
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- training helpers, evaluation, benchmark

@pytest.mark.parametrize("epochs, fraction, steps_per_epoch", [(20, 1 / 3, 30), (20, 1 / 20, 30), (30, 1 / 3, 7),
                                                                (1, 1 / 20, 5), (6, 1.0, 50)])
def test_budget_config_stays_within_a_step_per_epoch_of_the_budget(epochs, fraction, steps_per_epoch):
    cfg = budget_config(TrainConfig(epochs=epochs), fraction, steps_per_epoch)
    budget = max(1, round(epochs * steps_per_epoch * fraction))                       # at least one step
    assert cfg.max_steps_per_epoch <= steps_per_epoch
    assert 0 <= cfg.epochs * cfg.max_steps_per_epoch - budget < cfg.epochs


def test_breakpoint_on_the_thesis_resnet50_numbers():
    # thesis Table 8.3, ResNet-50: upright 74.6 / 50.7, AMR 67.4 / 66.4 (up / rot)
    assert math.isclose(breakpoint_share(0.746, 0.507, 0.674, 0.664), 0.072 / (0.157 + 0.072))


def test_sweep_angles_base_and_amr():
    torch.manual_seed(0)
    base = create_model("resnet18", num_classes=3, width_mult=0.125)
    data = TensorDataset((torch.rand(7, 3, 32, 32) * 255).to(torch.uint8), torch.randint(0, 3, (7,)))
    table = sweep_angles(base, data, [0, 45, 90], batch_size=4, device="cpu")
    assert table["angle"].tolist() == [0.0, 45.0, 90.0] and (table["n"] == 7).all()
    amr_table = sweep_angles(AMR(base, input_size=32, widths=(4, 4, 8, 8, 8)), data, [0, 180], batch_size=4, device="cpu")
    assert {"angle_mae", "angle_within5"} <= set(amr_table.columns)
    assert amr_table["top1"].between(0, 1).all() and amr_table["angle_mae"].between(0, 180).all()
    with pytest.raises(PdlError):
        sweep_angles(base, data, [], device="cpu")


def test_bench_main_saves_ratios(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PDL_RUNS_DIR", str(tmp_path))
    assert bench_main(["--arch", "resnet18", "--image-size", "32", "--batch-size", "2", "--step", "120",
                       "--width-mult", "0.125", "--repeats", "1", "--device", "cpu"]) == 0
    [path] = (tmp_path / "bench").glob("amr-*.json")
    record = json.loads(path.read_text())
    result = record["results"]["runs"][0]
    assert result["angles"] == 3 and result["sweep_speedup"] > 0 and result["amr_cost_ratio"] > 0   # no timing thresholds
    assert "AMR inference / base forward" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_main(["--arch", "alexnet"])


def test_train_or_load_trains_once_and_rebuilds_an_unreadable_checkpoint(tmp_path, caplog):
    calls = []
    model = nn.Linear(3, 2)

    def train():
        calls.append(1)
        nn.init.constant_(model.weight, 0.5)

    train_or_load(tmp_path / "m.pt", model, train, device="cpu")
    fresh = nn.Linear(3, 2)
    train_or_load(tmp_path / "m.pt", fresh, lambda: calls.append(2), device="cpu")
    assert calls == [1] and torch.equal(fresh.weight, torch.full((2, 3), 0.5))
    (tmp_path / "m.v1.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="pdl.core"):
        train_or_load(tmp_path / "m.pt", nn.Linear(3, 2), lambda: calls.append(3), device="cpu")
    assert calls == [1, 3] and "unreadable" in caplog.text
