"""pdl.adversarial beyond the notebook's tiny examples: attacks on a trained MNIST classifier change its answers
within their budget, the entropy and confidence scores and the paired AUC bootstrap behave, bad input is a clear
error. Small examples (FGSM/PGD on a linear model, entropy of constant and checkerboard maps, the AUC bootstrap on
Gaussian scores) are in `notebooks/lib/24_adversarial.ipynb`."""
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pdl.adversarial import (attack, auc, bootstrap_aucs, confidence_score, feature_responses, fgsm, local_entropy,
                             pgd, plot_lost_focus, roc_points, spatial_entropy_score)
from pdl.core import PdlError
from pdl.data.augment import CropFlipBatchFn
from pdl.data.core import load
from pdl.diagnose import SmallCNN
from pdl.train import TrainConfig, fit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained():
    """A SmallCNN trained briefly on 2 000 MNIST images (inputs in [0, 1]) and 100 test images it classifies."""
    train = load("mnist", "train", max_per_class=200, seed=0)
    test = load("mnist", "test", max_per_class=10, seed=0)
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    batch_fn = CropFlipBatchFn([0.0], [1.0], train=False)
    fit(model, TensorDataset(train.images, train.labels), TrainConfig(epochs=3, optimizer="adam", lr=3e-3, weight_decay=0.0, batch_size=64),
        batch_fn=batch_fn, progress=False)
    return model.eval(), test.images.float() / 255, test.labels


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_attacks_fool_a_trained_classifier_within_budget(trained):
    model, x, y = trained
    clean = _accuracy(model, x, y)
    assert clean > 0.7
    x_fgsm, x_pgd = attack(model, x, y, "fgsm", 0.2), attack(model, x, y, "pgd", 0.2, steps=5)
    assert (x_pgd - x).abs().max() <= 0.2 + 1e-6 and x_pgd.min() >= 0 and x_pgd.max() <= 1
    assert _accuracy(model, x_pgd, y) < _accuracy(model, x_fgsm, y) + 0.05   # PGD at least about as strong
    assert _accuracy(model, x_pgd, y) < clean - 0.3
    assert torch.equal(pgd(model, x[:4], y[:4], 0.1, steps=2, seed=3), pgd(model, x[:4], y[:4], 0.1, steps=2, seed=3))


def test_scores_have_one_value_per_image_in_range(trained):
    model, x, y = trained
    maps = feature_responses(model, x[:6], "block1.2")
    assert maps.shape == (6, 28, 28) and maps.min() >= 0 and maps.max() <= 1
    entropy = spatial_entropy_score(model, x[:6], "block1.2", window=5, bins=8)
    assert entropy.shape == (6,) and (entropy >= 0).all() and (entropy <= 3).all()
    confidence = confidence_score(model, x[:6])
    assert confidence.shape == (6,) and (confidence >= 0).all() and (confidence < 0.9).all()
    fig = plot_lost_focus(model, x[:2], fgsm(model, x[:2], y[:2], 0.1), "block1.2")
    assert len(fig.axes) == 12


def test_auc_bootstrap_is_paired_and_matches_sklearn():
    rng = np.random.default_rng(1)
    clean, attacked = rng.normal(0, 1, 300), rng.normal(0.5, 1, 300)
    boots = bootstrap_aucs({"s": clean}, {"s": attacked}, n_boot=400, seed=0)["s"]
    assert abs(np.median(boots) - auc(clean, attacked)) < 0.02
    fpr, tpr = roc_points(clean, attacked)
    assert fpr[0] == 0 and tpr[-1] == 1
    same = bootstrap_aucs({"a": clean, "b": clean}, {"a": attacked, "b": attacked}, n_boot=50)
    assert np.array_equal(same["a"], same["b"])                     # shared resamples


@pytest.mark.parametrize("bad", [
    lambda m: fgsm(m, torch.rand(2, 28, 28), torch.zeros(2, dtype=torch.long), 0.1),
    lambda m: pgd(m, torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), -0.1),
    lambda m: pgd(m, torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), 0.1, steps=0),
    lambda m: attack(m, torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), "cw", 0.1),
    lambda m: feature_responses(m, torch.rand(2, 1, 28, 28), "block9"),
    lambda m: feature_responses(m, torch.rand(2, 1, 28, 28), "fc"),
    lambda m: local_entropy(torch.rand(1, 4, 4), window=5),
    lambda m: bootstrap_aucs({"a": np.zeros(3)}, {"a": np.zeros(4)}),
])
def test_bad_input_is_a_clear_error(bad):
    with pytest.raises(PdlError):
        bad(SmallCNN(width=4).eval())
