"""The shared training loop (`pdl.train`): reproducible seeds, NaN/inf detection, checkpoints, progress bars."""
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pdl.core import PdlError
from pdl.train import BatchFn, Callback, TrainConfig, default_batch_fn, evaluate, fit, load_checkpoint, save_checkpoint


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


def _model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(144, 4))


CFG = TrainConfig(epochs=2, lr=0.05, batch_size=16, seed=3)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_same_seed_same_weights_other_seed_other_weights():
    """The seed fixes initialisation (seeded inside fit before any randomness), shuffling and dropout."""
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)            # initial weights from the same seed as training
        model = _model()
        history = fit(model, _data(), CFG.replace(seed=seed), device="cpu", progress=False)
        runs.append((history, _weights(model)))
    assert torch.equal(runs[0][1], runs[1][1]) and runs[0][0].epochs[-1]["train_loss"] == runs[1][0].epochs[-1]["train_loss"]
    assert not torch.equal(runs[0][1], runs[2][1])


def test_history_and_evaluation_are_consistent():
    model = _model()
    history = fit(model, _data(), CFG, val_data=_data(32, seed=1), device="cpu", progress=False)
    assert history["epoch"] == [1, 2] and set(history.last) >= {"train_loss", "val_loss", "val_top1", "lr"}
    assert history.last["lr"] == pytest.approx(0.0, abs=1e-12)       # cosine schedule ends at zero
    scores = evaluate(model, _data(32, seed=1), device="cpu", topk=(1, 4))
    assert scores["top4"] == 1.0 and scores["top1"] == pytest.approx(history.last["val_top1"])
    assert scores["n"] == 32


class _Explode(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value, self.linear = value, nn.Linear(36, 4)

    def forward(self, x):
        return self.linear(x.flatten(1)) * self.value


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_loss_is_a_clear_error_before_the_weights_change(value):
    model = _Explode(value)
    before = _weights(model).clone()
    with pytest.raises(PdlError, match=r"(?s)boom: loss became (nan|inf) at epoch 0, step 0.*lower the learning rate"):
        fit(model, _data(), CFG, device="cpu", desc="boom", progress=False)
    assert torch.equal(_weights(model), before)


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path, monkeypatch):
    model = _model()
    fit(model, _data(), CFG, device="cpu", progress=False)
    path = save_checkpoint(tmp_path / "m.pt", model, epoch=2, note="ok")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    fresh = _model()
    blob = load_checkpoint(path, fresh)
    assert calls == [True] and blob["extra"] == {"epoch": 2, "note": "ok"}
    assert torch.equal(_weights(fresh), _weights(model))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(PdlError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(PdlError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_progress_off_shows_no_bar_and_does_not_touch_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("PDL_PROGRESS", "1")
    fit(_model(), _data(), CFG, device="cpu", desc="quiet-run", progress=False)
    assert "quiet-run" not in capsys.readouterr().err
    fit(_model(), _data(), CFG, device="cpu", desc="loud-run", progress=True)
    assert "loud-run" in capsys.readouterr().err
    assert os.environ["PDL_PROGRESS"] == "1"


def test_callbacks_can_stop_and_batch_fns_follow_the_protocol():
    class StopAfterOne(Callback):
        def on_epoch_end(self, state):
            state.stop = True

    history = fit(_model(), _data(), CFG.replace(epochs=5), device="cpu", callbacks=[StopAfterOne()], progress=False)
    assert len(history.epochs) == 1
    assert isinstance(default_batch_fn, BatchFn)


def test_config_is_validated_and_frozen():
    with pytest.raises(PdlError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(PdlError, match="schedule must be one of"):
        CFG.replace(schedule="step")
    with pytest.raises(AttributeError):
        CFG.epochs = 7
