"""The AutoDL metric (NAUC, time transform, ALC) on hand-computed cases, the budgeted training callback, the
spoken-digits dataset and the errors for bad input (Chapter 6, deep-learning half)."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pdl.automl.autodl import (BudgetEvaluator, Head, alc, build_backbone, default_t0, log_time_schedule, nauc,
                               transform_time)
from pdl.automl.sponge import early_and_final, head_designs
from pdl.core import PdlError
from pdl.train import TrainConfig, fit



HALF = 60 * (math.sqrt(2) - 1)        # t~ = 1/2 when T = t0 = 60 s
QUARTER = 60 * (2 ** 0.25 - 1)        # t~ = 1/4


@pytest.mark.parametrize("times, scores, expected", [
    ([HALF], [0.8], 0.4),                           # 0 until the first prediction, then 0.8 until t~ = 1
    ([QUARTER, HALF], [0.4, 0.8], 0.25 * 0.4 + 0.5 * 0.8),
    ([HALF, QUARTER], [0.8, 0.4], 0.5),             # given out of order
    ([0.0], [1.0], 1.0),
    ([QUARTER, 60.0], [0.4, 1.0], 0.75 * 0.4),      # a prediction at T adds no area
    ([HALF, 75.0], [0.8, 1.0], 0.4),                # after the budget: ignored
    ([QUARTER], [-0.2], 0.75 * -0.2),               # NAUC below chance lowers the area
    ([], [], 0.0),
])
def test_alc_step_curve(times, scores, expected):
    assert alc(times, scores, 60, 60) == pytest.approx(expected, abs=1e-12)


def test_time_transform_and_schedule():
    assert transform_time([0, QUARTER, HALF, 60], 60, 60) == pytest.approx([0, 0.25, 0.5, 1])
    assert default_t0(1200) == 60 and default_t0(20) == 1
    assert transform_time(log_time_schedule(20, 5), 20) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_nauc():
    assert nauc([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], [0, 1, 0]) == 1.0
    assert nauc([[1.0, 0.0, 0.0]] * 4, [0, 1, 0, 1]) == 0.0          # constant scores: AUC 1/2; class 2 absent
    # each class scores 1 on one wrong sample: per class, its positive ties one negative and loses to the other
    assert nauc(np.eye(3)[[1, 2, 0]], [0, 1, 2]) == pytest.approx(2 * 0.25 - 1)


@pytest.mark.parametrize("call, message", [
    (lambda: nauc([0.1, 0.9], [0, 1]), "nauc needs scores"),
    (lambda: nauc([[0.1, 0.9]], [3]), "labels must lie"),
    (lambda: nauc([[np.nan, 0.9]], [0]), "NaN"),
    (lambda: alc([1, 2], [0.5], 60), "same length"),
    (lambda: alc([-1], [0.5], 60), ">= 0"),
    (lambda: transform_time(1, 0), "budget must be > 0"),
    (lambda: build_backbone("vgg16"), "unknown AutoDL base"),
    (lambda: build_backbone("mobilenet_v2", output_stride=8), "output_stride"),
    (lambda: Head((8, 2, 2), 10, (64,), "max"), "unknown pooling"),
    (lambda: BudgetEvaluator(lambda m: {}), "needs a budget"),
    (lambda: head_designs((), (1,)), "need units"),
])
def test_bad_input(call, message):
    with pytest.raises(PdlError, match=message):
        call()


def test_budget_evaluator_steps_and_stop():
    data = TensorDataset(torch.randint(0, 255, (40, 1, 2, 2), dtype=torch.uint8).float(), torch.arange(40) % 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    evaluator = BudgetEvaluator(lambda m: {"nauc": 0.0, "top1": 0.5}, max_steps=7, eval_steps=(2, 5))
    cfg = TrainConfig(epochs=100, max_steps_per_epoch=1, batch_size=4, optimizer="adam", lr=1e-3, schedule="constant")
    fit(model, data, cfg, callbacks=[evaluator], progress=False)
    assert [r["step"] for r in evaluator.records] == [2, 5, 7]     # the two asked for, then the end of the budget
    assert all(r["seconds"] >= 0 for r in evaluator.records)


def test_early_and_final():
    import pandas as pd
    curves = pd.DataFrame({"modality": "vision", "head": "1x64", "units": 64, "layers": 1, "dataset": "d", "seed": 0,
                           "step": [35, 10, 60], "nauc": [0.6, 0.2, 0.9]})
    row = early_and_final(curves).iloc[0]
    assert row["early"] == pytest.approx(0.4) and row["final"] == pytest.approx(0.9)


def test_spoken_digits_offline():
    import pdl.data.audio  # noqa: F401  (registers the dataset)
    from pdl.data.core import load
    test = load("spoken_digits", "test", variants=1)
    train = load("spoken_digits", "train", variants=1)
    assert test.image_size == (32, 32) and train.num_classes == 10
    assert sum(g.startswith("recording:") for g in test.groups) == 10
    assert not set(train.groups) & set(test.groups)
    assert {p["name"] for p in test.info["provenance"]["packages"]} >= {"espeak-ng", "asterisk-core-sounds-en-wav"}
    with pytest.raises(PdlError, match="n_mels"):
        load("spoken_digits", "train", n_mels=4)


def test_missing_espeak_names_the_package(monkeypatch, tmp_path):
    import pdl.data.audio as audio
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    with pytest.raises(PdlError, match="espeak-ng"):
        audio.speak("en-us+m1", 3, tmp_path)
