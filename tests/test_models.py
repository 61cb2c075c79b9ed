"""The model registry (pdl.models): every registered model builds, runs forward and backward on a tiny input,
and reports its complexity (timm's tests/test_models.py pattern); unknown names and options fail clearly."""
import pytest
import torch

from pdl.core import PdlError
from pdl.models.anynet import AnyNetConfig
from pdl.models.core import available_models, count_complexity, create_model, model_complexity

torch.set_num_threads(1)

SIZE = 32                                   # input side for every model
SLOW = {"resnet101", "resnet152", "resnext101_32x8d", "vit_b_16"}   # tens of millions of parameters
OPTIONS = {                                 # the options a model needs to be built at all
    "anynet": {"config": AnyNetConfig(depths=(1, 1, 2, 1), widths=(8, 16, 24, 32), bottleneck_ratios=(1, 2, 1, 4),
                                      group_widths=(4, 8, 8, 8))},
}


def _options(name: str) -> dict:
    return {**OPTIONS.get(name, {}), **({"image_size": SIZE} if name.startswith("vit") else {})}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("name", _params(available_models()))
def test_model_forward_backward_and_complexity(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **_options(name))
    x = torch.rand(2, 3, SIZE, SIZE)
    logits = model.train()(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    cost = count_complexity(model, SIZE, in_channels=3)
    assert cost.macs > 0 and cost.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", _params(available_models()))
def test_same_seed_same_model(name):
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(create_model(name, num_classes=3, **_options(name)))
    a, b = (m.state_dict() for m in models)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_builtin_families_are_registered():
    names = available_models()
    assert {"anynet", "resnet18", "resnet50", "resnext50_32x4d", "efficientnet_b0", "vit_b_16", "vit_tiny"} <= set(names)
    assert names == sorted(names)
    assert available_models("efficientnet_b*") == [f"efficientnet_b{i}" for i in range(5)]


def test_model_complexity_by_name():
    small = model_complexity("resnet18", SIZE, num_classes=3, width_mult=0.25, stem="small")
    assert small.input_size == SIZE and small.macs < model_complexity("resnet18", SIZE, num_classes=3).macs
    vit = model_complexity("vit_tiny", SIZE, num_classes=3, width_mult=0.25)   # image_size=SIZE is passed on
    assert vit.macs > 0


def test_width_mult_narrows_and_small_stem_keeps_resolution():
    wide = create_model("resnet50", num_classes=3)
    narrow = create_model("resnet50", num_classes=3, width_mult=0.25, stem="small")
    assert narrow.fc.in_features * 4 == wide.fc.in_features
    assert narrow.conv1.stride == (1, 1) and wide.conv1.stride == (2, 2)
    with pytest.raises(PdlError, match="no channels"):
        create_model("resnext50_32x4d", width_mult=0.125)    # its grouped convolutions would be empty


def test_unknown_model_lists_the_choices():
    with pytest.raises(PdlError) as err:
        create_model("resnet181")
    message = str(err.value)
    assert "unknown model 'resnet181'" in message and "did you mean 'resnet18'" in message and "vit_tiny" in message


@pytest.mark.parametrize("name, options, match", [
    ("resnet18", {"widht_mult": 0.5}, "wrong options.*widht_mult"),
    ("anynet", {}, "missing a required argument: .config."),
    ("anynet", {"config": [1, 2]}, "needs config=AnyNetConfig"),
    ("resnet18", {"stem": "tiny"}, "stem"),
    ("vit_tiny", {"image_size": 30}, "patch size"),
])
def test_bad_options_raise_pdl_error(name, options, match):
    with pytest.raises(PdlError, match=match):
        create_model(name, **options)
