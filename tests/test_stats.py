"""Rank correlations, bootstrap intervals and the three-outcome verdicts of `pdl.stats`."""
import math

import numpy as np
import pytest
from scipy import stats

import pdl.stats as S


@pytest.mark.parametrize("low, high, claim, threshold, expected", [
    (0.1, 0.5, ">", 0.0, S.HOLDS), (-0.1, 0.5, ">", 0.0, S.INCONCLUSIVE), (-0.5, -0.1, ">", 0.0, S.FAILS),
    (-0.5, -0.1, "<", 0.0, S.HOLDS), (0.1, 0.5, "<", 0.0, S.FAILS), (3.5, 9.0, ">", 3.0, S.HOLDS),
    (1.0, 2.5, ">", 3.0, S.FAILS), (math.nan, 0.5, ">", 0.0, S.INCONCLUSIVE)])
def test_verdict_follows_the_interval(low, high, claim, threshold, expected):
    assert S.verdict(low, high, claim, threshold) == expected


def test_a_failed_gate_is_always_inconclusive():
    assert S.verdict(0.5, 0.9, gate=False) == S.INCONCLUSIVE
    with pytest.raises(ValueError, match="claim"):
        S.verdict(0.1, 0.2, claim=">=")


def test_critical_rho_is_where_the_spearman_test_turns_significant():
    for n in (8, 12, 30):
        r = S.critical_rho(n)
        t = r * math.sqrt((n - 2) / (1 - r * r))
        assert 2 * stats.t.sf(t, n - 2) == pytest.approx(0.05, abs=1e-9)
    assert S.critical_rho(12, 0.99) > S.critical_rho(12, 0.95)


def test_noise_ratio_interval_covers_the_true_ratio_about_as_often_as_promised():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        population = rng.normal(0, 3.0, 20)
        retrained = {"a": rng.normal(0, 1.0, 4), "b": rng.normal(5, 1.0, 4)}
        result = S.noise_ratio(population, retrained)
        covered += result["ratio_low"] <= 3.0 <= result["ratio_high"]
    assert 0.9 <= covered / 400 <= 0.99


def test_noise_ratio_handles_missing_retrainings():
    result = S.noise_ratio([0.1, 0.2, 0.3], {"a": [0.2]})
    assert math.isnan(result["noise_std"]) and math.isnan(result["ratio"]) and math.isnan(result["reliability"])


def test_format_interval_and_half_width():
    assert S.format_interval(-0.123, -0.5, 0.25) == "-0.12 [-0.50, 0.25]"
    assert S.half_width([0.0, 0.2], [0.4, 1.0]) == pytest.approx(0.3)


def test_noise_ratio_without_spread_between_architectures():
    """Identical errors for every architecture (tiny smoke runs) give ratio 0 and reliability 0, not an error."""
    from pdl.stats import noise_ratio
    out = noise_ratio([0.5, 0.5, 0.5], {"a": [0.4, 0.5]})
    assert out["ratio"] == 0 and out["reliability"] == 0.0
    out = noise_ratio([0.5, 0.5, 0.5], {"a": [0.5, 0.5]})
    assert math.isnan(out["ratio"]) and math.isnan(out["reliability"])
