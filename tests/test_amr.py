"""Artificial mental rotation (pdl.amr): rotation, masking, attaching to unmodified torchvision models,
frozen-base training, inference API, bad input, benchmark entry point."""
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from pdl.amr import (AMR, ARCHITECTURES, NUM_ANGLE_CLASSES, RotationBatch, angle_to_label, angular_distance,
                     bench_main, breakpoint_share, budget_config, build_base, circle_mask, default_taps,
                     label_to_angle, mask_circle, rotate, rotate_cv2, rotate_cv2_batch, sweep_angles, train_amr)
from pdl.core import PdlError
from pdl.train import TrainConfig, overfit_batch

torch.set_num_threads(1)


@pytest.fixture
def images():
    return torch.rand(5, 3, 24, 30, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- rotation and masking

@pytest.mark.parametrize("interpolation", ["bilinear", "nearest", "bicubic"])
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


def test_rotation_direction_and_exact_quarter_turns():
    square = torch.rand(2, 1, 11, 11)
    assert torch.allclose(rotate(square, 90.0, mask=False), torch.rot90(square, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(square, 180.0, mask=False), torch.rot90(square, 2, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(square, 0.0, mask=False), square, atol=1e-5)
    arrow = torch.zeros(1, 1, 11, 11)
    arrow[..., 5, 6:] = 1                               # pointing right
    turned = rotate(arrow, 90.0)                        # positive = counter-clockwise: now pointing up
    assert turned[0, 0, :5, 5].sum() > 4 and turned[0, 0, 5, 6:].sum() < 0.5


def test_rotation_there_and_back_is_close_inside_the_disc(images):
    back = rotate(rotate(images, 37.0), -37.0)
    inner = ((torch.arange(24)[:, None] - 11.5) ** 2 + (torch.arange(30)[None] - 14.5) ** 2) < 8 ** 2
    assert (back - images)[..., inner].abs().mean() < 0.15


def test_mask_circle_torch_and_numpy():
    mask = circle_mask(8, 12)
    assert mask.shape == (8, 12) and mask[3:5, 4:8].all() and not mask[0, 0] and not mask[7, 11]
    x = torch.ones(2, 3, 8, 12)
    out = mask_circle(x)
    assert torch.equal(out[0, 0], mask.float()) and out.shape == x.shape
    arr = np.full((8, 12, 3), 200, np.uint8)
    masked = mask_circle(arr)
    assert masked.dtype == np.uint8 and masked[0, 0].tolist() == [0, 0, 0] and masked[4, 6].tolist() == [200] * 3
    rotated = rotate(torch.ones(1, 1, 16, 16), 33.0)
    assert rotated[..., ~circle_mask(16, 16)].abs().max() == 0


def test_angle_labels_round_trip():
    labels = torch.arange(NUM_ANGLE_CLASSES)
    assert torch.equal(angle_to_label(label_to_angle(labels)), labels)
    assert angle_to_label([359.7, -0.4, -90, 450]).tolist() == [0, 0, 270, 90]
    assert angular_distance(torch.tensor([1.0, 359.0]), torch.tensor([359.0, 1.0])).tolist() == [2.0, 2.0]
    with pytest.raises(PdlError):
        label_to_angle(torch.tensor([360]))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad", [
    lambda: rotate(torch.rand(8, 8), 3.0),                           # no channel axis
    lambda: rotate(torch.rand(1, 1, 1, 8, 8), 3.0),                  # 5-d
    lambda: rotate(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 3.0), # integer images
    lambda: rotate(torch.rand(2, 1, 8, 8), torch.zeros(3)),          # wrong number of angles
    lambda: rotate(torch.rand(2, 1, 8, 8), 3.0, interpolation="area"),
    lambda: rotate_cv2(torch.rand(3, 8, 8), 3.0),                    # tensor instead of H x W x C array
    lambda: mask_circle(torch.tensor(1.0)),
    lambda: build_base("alexnet"),
    lambda: build_base("resnet18", stem="tiny"),
    lambda: default_taps(nn.Sequential(nn.Conv2d(3, 3, 3))),
    lambda: AMR(nn.Sequential(nn.Conv2d(3, 3, 3))),
    lambda: AMR(torchvision.models.resnet18(num_classes=3), taps=["layer9"], input_size=32),
    lambda: RotationBatch("colour"),
    lambda: budget_config(TrainConfig(), 0.0, 10),
])
def test_bad_input_raises_pdl_error(bad):
    with pytest.raises(PdlError):
        bad()


def test_unsupported_architecture_message_lists_choices():
    with pytest.raises(PdlError) as err:
        build_base("vgg16")
    assert "vgg16" in str(err.value) and "resnet50" in str(err.value) and "hint" in str(err.value)
    assert "efficientnet_b0" in ARCHITECTURES and "vit_b_16" in ARCHITECTURES


def test_amr_rejects_wrong_tensor_shapes():
    amr = AMR(build_base("resnet18", 3, width_mult=0.125), input_size=32, widths=(4, 4, 8, 8, 8))
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
    return build_base("vit_tiny", 5, image_size=32, width_mult=0.25), 32


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
    base = build_base("resnet18", 4, width_mult=0.125)
    trained = build_base("resnet18", 4, width_mult=0.125)
    base.load_state_dict(trained.state_dict())                         # weights are passed in, never downloaded
    amr = AMR(base, input_size=32, widths=(4, 4, 8, 8, 8), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(amr.base_logits(x), base.eval()((x - 0.5) / 0.25))
    assert torch.allclose(amr.correct(x, torch.tensor([10.0, 20.0, 30.0])), rotate(x, torch.tensor([-10.0, -20.0, -30.0])))
    assert amr.predict_angle(x).shape == (3,) and ((amr.predict_angle(x) >= 0) & (amr.predict_angle(x) < 360)).all()


def test_amr_head_learns_angles():
    torch.manual_seed(0)
    amr = AMR(build_base("resnet18", 4, width_mult=0.125), input_size=32, widths=(8, 8, 16, 16, 16))
    x, y = RotationBatch("angle")((torch.rand(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)), torch.device("cpu"))
    before = _snapshot(amr.base)
    losses = overfit_batch(amr, x, y, steps=40, lr=3e-3, device="cpu")
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, amr.base.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------- training helpers, evaluation, benchmark

def test_rotation_batch_targets():
    x = torch.rand(6, 1, 16, 16)
    y = torch.arange(6)
    upright, labels = RotationBatch("class", angles=[0])((x, y), torch.device("cpu"))
    assert torch.equal(labels, y) and torch.allclose(upright, mask_circle(x), atol=1e-5)
    rotated, angle_labels = RotationBatch("angle", angles=[90])((x, y), torch.device("cpu"))
    assert angle_labels.tolist() == [90] * 6 and torch.allclose(rotated, rotate(x, 90.0), atol=1e-6)


def test_budget_config_and_breakpoints():
    cfg = TrainConfig(epochs=20)
    long, short = budget_config(cfg, 1 / 3, 30), budget_config(cfg, 1 / 20, 30)
    assert abs(long.epochs * long.max_steps_per_epoch - 200) <= long.epochs and long.max_steps_per_epoch <= 30
    assert (short.epochs, short.max_steps_per_epoch) == (1, 30)
    assert budget_config(TrainConfig(epochs=1), 1 / 20, 5).max_steps_per_epoch == 1     # at least one step
    assert math.isclose(breakpoint_share(0.746, 0.507, 0.674, 0.664), 0.072 / (0.157 + 0.072))
    assert breakpoint_share(0.5, 0.5, 0.6, 0.6) == 0.0 and math.isnan(breakpoint_share(0.7, 0.5, 0.6, 0.4))


def test_sweep_angles_base_and_amr():
    torch.manual_seed(0)
    base = build_base("resnet18", 3, width_mult=0.125)
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
    assert result["angles"] == 3 and result["sweep_speedup"] > 0 and result["amr_cost_ratio"] > 1
    assert "AMR inference / base forward" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_main(["--arch", "alexnet"])
