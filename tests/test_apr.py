"""Chapter 7: AnyNetX design space, training (architecture, dataset) pairs and the APR analysis."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

import pdl.apr as apr
import pdl.stats
from pdl.core import PdlError
from pdl.models.anynet import (AnyNetConfig, ComplexityBand, SampledArchitecture, analytic_macs, band_for,
                               count_complexity, sample_population)
from pdl.sweep import run_tasks


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PDL_PROGRESS", "0")
    torch.set_num_threads(1)


# --- design space -----------------------------------------------------------------------------------------------

def test_sampler_is_deterministic_and_respects_the_band():
    first, stats_ = sample_population(5, seed=11, input_size=32, scale=0.5)
    again, _ = sample_population(5, seed=11, input_size=32, scale=0.5)
    other, _ = sample_population(5, seed=12, input_size=32, scale=0.5)
    assert [a.config for a in first] == [a.config for a in again]
    assert [a.config for a in first] != [a.config for a in other]
    band = band_for(32, 0.5)
    assert all(band.low <= a.macs <= band.high for a in first)
    assert stats_["candidates"] > stats_["accepted"] == 5          # candidates outside the band were rejected
    assert len({a.config.key for a in first}) == 5


def test_band_scales_with_resolution():
    assert band_for(224).low == 360e6 and band_for(224).high == 400e6
    assert band_for(32).high == pytest.approx(400e6 / 49)
    assert band_for(32, scale=0.1).low == pytest.approx(360e6 / 49 * 0.1)


def test_config_round_trip_and_validation():
    config = AnyNetConfig(depths=(1, 3, 2, 1), widths=(16, 48, 96, 128), bottleneck_ratios=(1, 2, 4, 1),
                          group_widths=(8, 6, 24, 16))
    assert AnyNetConfig.from_json(config.to_json()) == config
    assert AnyNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))).key == config.key
    arch = SampledArchitecture("a000", config, 1, 2, 3, 32)
    assert SampledArchitecture.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    with pytest.raises(PdlError, match="divisible"):
        AnyNetConfig((1,), (24,), (2,), (8,), strides=(1,))
    with pytest.raises(PdlError, match="same non-zero number of stages"):
        AnyNetConfig((1, 1), (8,), (1,), (1,))


def test_flop_counter_matches_a_hand_count():
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2, bias=False)
    # 7 x 7 outputs x 6 channels, each 3 x 3 x (4 / 2) multiply-accumulates
    assert count_complexity(conv, 7).macs == 7 * 7 * 6 * 3 * 3 * 2
    assert count_complexity(conv, 7).flops == 2 * 7 * 7 * 6 * 3 * 3 * 2
    config = AnyNetConfig((2, 1, 1, 2), (16, 32, 48, 64), (1, 2, 1, 4), (4, 8, 16, 16))
    assert count_complexity(config.build(5), 32).macs == analytic_macs(config, 32, num_classes=5)


def test_impossible_band_is_a_clear_error():
    with pytest.raises(PdlError, match="outside what AnyNetX can reach"):
        sample_population(2, input_size=32, band=ComplexityBand(1e12, 2e12, 32))
    with pytest.raises(PdlError, match="fell into"):
        sample_population(3, input_size=32, scale=1.0, max_tries=5)
    with pytest.raises(PdlError):
        band_for(32, scale=-1)


# --- training pairs (the runner itself is tested in test_sweep.py) -----------------------------------------------

def _tiny_tasks():
    population, _ = sample_population(3, seed=0, input_size=16, scale=0.5)
    recipe = apr.Recipe(epochs=1, max_steps_per_epoch=1, batch_size=8, input_size=16, train_per_class=3,
                        test_per_class=2, train_eval_images=0)
    datasets = [dict(spec="digits", label="digits", role="reference"), dict(spec="digits:c=2", label="digits-2", role="family")]
    return apr.make_tasks(population, datasets, recipe)


def test_pairs_train_through_the_sweep_into_one_row_each(tmp_path):
    tasks = _tiny_tasks()
    summary = run_tasks(tasks, apr.train_pair, tmp_path)
    assert (summary.trained, summary.backend) == (len(tasks), "serial")
    table = apr.gather_results(tasks, tmp_path)
    assert len(table) == len(tasks) and not table.duplicated(["arch", "dataset", "repeat"]).any()
    assert list(table.task_key) == [t.key for t in tasks]
    assert set(table.num_classes) == {10, 2} and table.top1_err.between(0, 1).all()
    assert table.loc[table.num_classes == 2, "top5_err"].isna().all()
    assert table.loc[table.num_classes == 10, "top5_err"].between(0, 1).all()
    again = apr.train_pair(tasks[0])          # same task, same seed: the same record
    assert again["top1_err"] == table.top1_err.iloc[0] and again["train_loss"] == table.train_loss.iloc[0]


def test_changed_recipe_is_not_served_from_old_results(tmp_path):
    tasks = _tiny_tasks()[:1]
    run_tasks(tasks, apr.train_pair, tmp_path)
    changed = [apr.PairTask(t.arch, t.dataset, t.recipe.replace(lr=0.01), t.epochs) for t in tasks]
    assert changed[0].key != tasks[0].key
    assert len(apr.gather_results(changed, tmp_path)) == 0
    assert run_tasks(changed, apr.train_pair, tmp_path).trained == 1


def test_recipe_is_the_train_config_that_fit_receives():
    recipe = apr.Recipe(lr=0.02, weight_decay=0.0, batch_size=8, min_steps=30, seed=5)
    assert isinstance(recipe, apr.TrainConfig)
    assert recipe.replace(epochs=4).to_dict() == {**recipe.to_dict(), "epochs": 4}
    task = apr.PairTask(_tiny_tasks()[0].arch, "digits", recipe, 2)
    assert apr._pair_epochs(task, 80) == (3, 10)        # 80 images / batch 8 = 10 steps; 30 steps need 3 epochs


# --- analysis ---------------------------------------------------------------------------------------------------

def _synthetic_results(n=30, seed=0):
    rng = np.random.default_rng(seed)
    skill = rng.normal(size=n)
    spec = {"fonts": ("reference", 140), "fonts-10": ("family", 10), "fonts-2": ("family", 2),
            "fonts-size10": ("control", 140), "mnist": ("target", 10), "dogs": ("target", 2)}
    rows = []
    for label, (role, classes) in spec.items():
        errors = 0.5 + 0.1 * (skill * rng.uniform(-1, 1) + rng.normal(size=n))
        for i in range(n):
            rows.append(dict(arch=f"a{i:03d}", label=label, dataset=label, role=role, num_classes=classes, n_train=100,
                             n_test=50, epochs=1, repeat=0, status="ok", top1_err=errors[i],
                             top5_err=errors[i] / 2 if classes >= 10 else None))
    return pd.DataFrame(rows)


def test_reported_rho_equals_scipy_on_the_saved_table(tmp_path):
    _synthetic_results().to_csv(tmp_path / "results.csv", index=False)
    saved = pd.read_csv(tmp_path / "results.csv")
    matrix = apr.error_matrix(saved)
    table = apr.rho_table(matrix, apr.dataset_table(saved), n_boot=200)
    wide = saved.pivot(index="arch", columns="label", values="top1_err")
    for row in table[table.dataset != "mean"].itertuples():
        assert row.rho_ref == pytest.approx(stats.spearmanr(wide[row.dataset], wide["fonts"]).statistic)
        assert row.rho_matched == pytest.approx(stats.spearmanr(wide[row.dataset], wide[row.matched]).statistic)
        assert row.rho_ref_low <= row.rho_ref <= row.rho_ref_high
    assert dict(zip(table.dataset[:2], table.matched[:2])) == {"mnist": "fonts-10", "dogs": "fonts-2"}
    mean = table[table.dataset == "mean"].iloc[0]
    assert mean.rho_ref == pytest.approx(table[table.dataset != "mean"].rho_ref.mean())
    rhos = pdl.stats.rho_matrix(matrix)
    assert rhos.loc["mnist", "dogs"] == pytest.approx(stats.spearmanr(wide["mnist"], wide["dogs"]).statistic)


def test_bootstrap_equals_spearman_on_the_identity_resample(monkeypatch):
    """With every resample forced to be the identity (each row once), every bootstrap rho equals scipy's."""
    matrix = _synthetic_results().pivot(index="arch", columns="label", values="top1_err")
    matrix.iloc[[2, 7], 0] = np.nan                 # a diverged run is left out pairwise

    class Identity:
        def integers(self, low, high, size):
            return np.tile(np.arange(high), (size[0], 1))

    monkeypatch.setattr(pdl.stats.np.random, "default_rng", lambda seed: Identity())
    pairs = [("mnist", "fonts"), ("dogs", "fonts-2"), (matrix.columns[0], "mnist")]
    boot = pdl.stats.bootstrap_rhos(matrix, pairs, n_boot=4)
    for j, (a, b) in enumerate(pairs):
        ok = matrix[a].notna() & matrix[b].notna()
        expected = stats.spearmanr(matrix.loc[ok, a], matrix.loc[ok, b]).statistic
        assert boot[:, j] == pytest.approx(np.full(4, expected), abs=1e-12)


def test_bootstrap_intervals_contain_the_point_estimate():
    matrix = _synthetic_results().pivot(index="arch", columns="label", values="top1_err")
    boot = pdl.stats.bootstrap_rhos(matrix, [("mnist", "fonts")], n_boot=500, seed=1)
    point = stats.spearmanr(matrix["mnist"], matrix["fonts"]).statistic
    low, high = pdl.stats.percentile_interval(boot[:, 0], 0.95)
    assert boot.shape == (500, 1) and low < point < high


# --- bad input --------------------------------------------------------------------------------------------------

def test_unknown_dataset_and_bad_specs_are_clear_errors():
    with pytest.raises(PdlError, match="(?s)unknown dataset.*available"):
        apr.check_datasets(["mnist", "imagenet"])
    with pytest.raises(PdlError, match="bad token"):
        apr.DatasetSpec.parse("fonts:c=ten")
    with pytest.raises(PdlError, match="cannot be combined"):
        apr.DatasetSpec.parse("fonts:size=10:c=5")
    with pytest.raises(PdlError, match="invalid Recipe"):
        apr.Recipe(epochs=0)
    with pytest.raises(PdlError, match="invalid Recipe: .*input_size must be >= 8"):
        apr.Recipe(input_size=4)
    with pytest.raises(PdlError, match="unknown metric"):
        apr.error_matrix(_synthetic_results(), metric="top3")
    with pytest.raises(PdlError, match="epochs_by_dataset"):
        apr.make_tasks([], [dict(spec="mnist", label="mnist", role="target")], apr.Recipe(), epochs_by_dataset={"cifar": 3})


# --- verdicts, chance levels and reproducibility ----------------------------------------------------------------

def _evidence(results, n=30):
    population = pd.DataFrame(dict(arch=[f"a{i:03d}" for i in range(n)], cum_depth=np.arange(n) % 7 + 2,
                                   cum_width=np.arange(n) * 10 + 100))
    return apr.FindingsEvidence.build(apr.error_matrix(results), population, apr.dataset_table(results), n_boot=300)


def test_findings_have_intervals_and_one_of_three_outcomes():
    results = _synthetic_results()
    noise = {"dataset": "fonts", **pdl.stats.noise_ratio(np.linspace(0.2, 0.8, 30), {"a": [0.5, 0.51, 0.49]})}
    findings = apr.assess_findings(_evidence(results), noise)
    assert set(findings.verdict) <= set(pdl.stats.OUTCOMES)
    assert (findings.low <= findings.estimate + 1e-9).all() or findings.estimate.isna().any()
    assert (findings.low <= findings.high).all()
    ratio = findings.set_index("finding").loc["Training noise is small next to the spread between architectures"]
    assert ratio.estimate == pytest.approx(np.std(np.linspace(0.2, 0.8, 30), ddof=1) / 0.01)
    # the gate passed, so each verdict is exactly what its interval says
    assert list(findings.verdict) == list(findings.interval_says)


def test_a_failed_noise_control_makes_every_correlation_inconclusive():
    results = _synthetic_results()
    noise = {"dataset": "fonts", **pdl.stats.noise_ratio(np.linspace(0.2, 0.8, 30), {"a": [0.2, 0.8, 0.5]})}
    findings = apr.assess_findings(_evidence(results), noise).set_index("finding")
    correlations = findings.drop("Training noise is small next to the spread between architectures")
    assert set(correlations.verdict) == {pdl.stats.INCONCLUSIVE}
    assert apr.assess_findings(_evidence(results), None).verdict.eq(pdl.stats.INCONCLUSIVE).all()


def test_a_reversed_target_is_a_holding_negative_correlation():
    results = _synthetic_results(n=40)
    ref = results[results.label == "fonts"].set_index("arch").top1_err
    results.loc[results.label == "dogs", "top1_err"] = 1 - results.loc[results.label == "dogs", "arch"].map(ref).to_numpy()
    noise = {"dataset": "fonts", **pdl.stats.noise_ratio(np.linspace(0.2, 0.8, 40), {"a": [0.5, 0.51, 0.49]})}
    row = apr.assess_findings(_evidence(results, 40), noise).set_index("finding").loc[
        "Some datasets correlate negatively with the many-class reference"]
    assert (row.estimate, row.high < 0, row.verdict) == (-1.0, True, "holds")


def test_error_table_sets_errors_beside_chance():
    table = apr.error_table(_synthetic_results()).set_index("dataset")
    assert table.chance["fonts"] == pytest.approx(1 - 1 / 140) and table.chance["dogs"] == 0.5
    assert (table["min"] <= table["median"]).all() and (table["median"] <= table["max"]).all()
    assert table.best_margin["mnist"] == pytest.approx(0.9 - table["min"]["mnist"])


def test_warmup_fraction_is_validated():
    assert apr.Recipe(warmup_fraction=0.1).warmup_fraction == 0.1
    with pytest.raises(PdlError, match="warmup_fraction"):
        apr.Recipe(warmup_fraction=1.0)


def test_same_seed_gives_the_same_results_serially_and_in_two_processes(tmp_path):
    tasks = _tiny_tasks()
    run_tasks(tasks, apr.train_pair, tmp_path / "serial")
    run_tasks(tasks, apr.train_pair, tmp_path / "processes", workers=2, backend="process")
    serial, processes = apr.gather_results(tasks, tmp_path / "serial"), apr.gather_results(tasks, tmp_path / "processes")
    assert apr.results_digest(serial) == apr.results_digest(processes)
    assert list(serial.top1_err) == list(processes.top1_err)
