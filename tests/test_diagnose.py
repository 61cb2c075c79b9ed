"""pdl.diagnose on chapter 2's MNIST pipeline: the clean pipeline passes every check, each planted bug is flagged by
the check `PLANTED_BUGS` names; the checklist runs unchanged on chapter 7's AnyNet and chapter 8's AMR head, and
from inside `pdl.train.fit`. The small examples (each check on the 8x8 digits, the finite-difference check on a
broken cube) are in `notebooks/lib/23_diagnose.ipynb`."""
import pytest
import torch
from torch.utils.data import TensorDataset

from pdl.core import PdlError
from pdl.data.augment import CropFlipBatchFn
from pdl.data.core import load
from pdl.diagnose import (CHECKS, FLAGGED, OK, PLANTED_BUGS, SKIPPED, DiagnoseCallback, ShuffledLabels, SmallCNN,
                          SoftmaxOutput, UpsideDown, diagnose, forgetful_predict, kill_layer, manual_cross_entropy,
                          sign_flipped_cross_entropy)
from pdl.train import TrainConfig, fit

torch.set_num_threads(1)

AUGMENT = CropFlipBatchFn([0.13], [0.31], train=True, flip=False, padding=2)
CLEAN = CropFlipBatchFn([0.13], [0.31], train=False)
FAST = dict(tiny_steps=120, probe_steps=120, range_steps=60, figures=False)


@pytest.fixture(scope="module")
def mnist():
    ds = load("mnist", "train", max_per_class=100, seed=0)
    return TensorDataset(ds.images, ds.labels)


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(width=8)


def pipeline(**changes) -> dict:
    """The clean pipeline's diagnose arguments, with `changes` (a planted bug) applied."""
    return {**dict(batch_fn=AUGMENT, eval_batch_fn=CLEAN, loss_fn=manual_cross_entropy, lr=0.05, max_samples=768),
            **FAST, **changes}


def planted(key: str, model: SmallCNN) -> tuple[torch.nn.Module, dict]:
    """The model and diagnose arguments of the pipeline with bug `key` planted."""
    if key == "double_softmax":
        return SoftmaxOutput(model), pipeline()
    if key == "dead_relu":
        kill_layer(model.hidden)
        return model, pipeline()
    changes = {"shuffled_labels": dict(batch_fn=ShuffledLabels(AUGMENT)), "forgot_eval": dict(predict_fn=forgetful_predict),
               "loss_sign": dict(loss_fn=sign_flipped_cross_entropy), "lr_100x": dict(lr=5.0),
               "label_destroying_augmentation": dict(batch_fn=UpsideDown(AUGMENT))}[key]
    return model, pipeline(**changes)


@pytest.mark.slow
def test_clean_pipeline_passes_every_check_and_model_is_untouched(mnist):
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = diagnose(model, mnist, **pipeline())
    assert report.checks == list(CHECKS)
    assert report.flagged == [], report.table().to_string()
    assert all(f.sentence.endswith(".") for f in report.findings)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "SmallCNN" in report["gradcheck"].values["functions"]


@pytest.mark.slow
@pytest.mark.parametrize("bug", PLANTED_BUGS, ids=[b.key for b in PLANTED_BUGS])
def test_each_planted_bug_is_flagged_by_its_check(mnist, bug):
    model, kwargs = planted(bug.key, small_cnn())
    finding = diagnose(model, mnist, checks=[bug.check], **kwargs)[bug.check]
    assert finding.status == FLAGGED, finding.sentence


def test_quick_bugs_flagged_and_clean_passes(mnist):
    """The cheap checks, clean and bugged (the slow tests run every check)."""
    clean = diagnose(small_cnn(), mnist, checks=["output_bias", "eval_consistency", "gradcheck", "activations"],
                     **pipeline(max_samples=128))
    assert clean.flagged == []
    for key in ("forgot_eval", "double_softmax", "loss_sign", "dead_relu"):
        bug = next(b for b in PLANTED_BUGS if b.key == key)
        model, kwargs = planted(key, small_cnn())
        assert diagnose(model, mnist, checks=[bug.check], **{**kwargs, "max_samples": 128})[bug.check].flagged


def test_random_state_is_restored(mnist):
    model = small_cnn()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    diagnose(model, mnist, checks=["output_bias", "lr_range"], batch_fn=AUGMENT, max_samples=64, range_steps=5,
             figures=False)
    assert torch.equal(torch.rand(3), expected)


def _anynet():
    from pdl.models.anynet import AnyNetConfig
    torch.manual_seed(0)
    config = AnyNetConfig(depths=(1, 1), widths=(16, 32), bottleneck_ratios=(1, 2), group_widths=(8, 8),
                          strides=(1, 2), stem_width=8)
    return config.build(num_classes=10, in_channels=1)


@pytest.mark.slow
def test_runs_on_chapter7_anynet(mnist):
    report = diagnose(_anynet(), mnist, batch_fn=AUGMENT, eval_batch_fn=CLEAN, lr=0.05, max_samples=256,
                      **{**FAST, "tiny_steps": 60, "probe_steps": 60, "range_steps": 30, "figures": True})
    assert report.checks == list(CHECKS)
    assert {f.status for f in report.findings} <= {OK, FLAGGED, SKIPPED}
    assert not report["gradcheck"].flagged and "BottleneckBlock" in report["gradcheck"].values["functions"]
    assert report["activations"].figure is not None


def test_runs_on_chapter8_amr_head():
    from pdl.amr import AMR, RotationBatchFn
    from pdl.models.core import create_model
    torch.manual_seed(0)
    base = create_model("resnet18", num_classes=10, width_mult=0.125, stem="small")
    amr = AMR(base, widths=[8, 8, 8, 16, 16], input_size=16)
    ds = load("mnist", "train", max_per_class=6, size=16, channels=3, seed=0)
    report = diagnose(amr, TensorDataset(ds.images, ds.labels), batch_fn=RotationBatchFn("angle"), lr=1e-3,
                      optimizer="adamw", max_samples=48, checks=["tiny_fit", "label_signal", "output_bias", "gradcheck",
                                                                 "activations", "eval_consistency"],
                      tiny_steps=5, figures=False)
    assert report["label_signal"].status == SKIPPED          # 360 angle classes: a tiny set cannot cover them
    assert not report["gradcheck"].flagged
    assert "CNNHead" in report["gradcheck"].values["functions"]
    assert not report["eval_consistency"].flagged           # AMR keeps its frozen base in eval mode


def test_callback_diagnoses_inside_fit(mnist):
    callback = DiagnoseCallback(mnist, batch_fn=AUGMENT, start=("output_bias", "lr_range"), end=("worst_mistakes",),
                                max_samples=128, range_steps=20, figures=False)
    fit(small_cnn(), mnist, TrainConfig(epochs=1, lr=0.05, batch_size=64, max_steps_per_epoch=3), batch_fn=AUGMENT,
        callbacks=[callback], progress=False)
    assert callback.reports["start"].checks == ["output_bias", "lr_range"]
    assert callback.reports["end"]["worst_mistakes"].status == OK


def test_callback_can_refuse_to_train(mnist):
    callback = DiagnoseCallback(mnist, batch_fn=AUGMENT, start=("lr_range",), max_samples=64, range_steps=20,
                                figures=False, on_flag="raise")
    with pytest.raises(PdlError, match="lr_range"):
        fit(small_cnn(), mnist, TrainConfig(epochs=1, lr=50.0, batch_size=32, max_steps_per_epoch=2),
            batch_fn=AUGMENT, callbacks=[callback], progress=False)


@pytest.mark.parametrize("bad", [
    lambda data: diagnose(small_cnn(), data, checks=["nope"]),
    lambda data: diagnose(small_cnn(), data, optimizer="lbfgs"),
    lambda data: diagnose(small_cnn(), data, tiny_stepz=1),
    lambda data: diagnose("not a model", data),
    lambda data: diagnose(small_cnn(), data),                        # uint8 images without a batch_fn
    lambda data: DiagnoseCallback(data, on_flag="panic"),
])
def test_bad_input_is_a_clear_error(mnist, bad):
    with pytest.raises(PdlError):
        bad(mnist)
