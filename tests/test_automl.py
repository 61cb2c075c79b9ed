"""AutoML (tabular): leave-one-dataset-out portfolios, a killed search resumes without re-running finished
evaluations, degenerate datasets give clear errors or a documented handling, the published portfolio maps."""
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from pdl.automl import datasets as ds
from pdl.automl.datasets import TabularSpec, load_tabular, prepare_frame
from pdl.automl.hyperband import (BracketDriver, Clock, config_stream, hyperband_brackets, open_study, run_brackets,
                                  study_records)
from pdl.automl.portfolio import greedy_portfolio, lodo_portfolios, published_portfolio
from pdl.automl.space import MODELS, check_config, default_config, evaluate
from pdl.core import PdlError


# --- portfolios -----------------------------------------------------------------------------------------------
def test_portfolio_is_built_without_its_dataset():
    rng = np.random.default_rng(0)
    meta = pd.DataFrame(rng.random((6, 12)), index=[f"d{i}" for i in range(6)], columns=[f"c{j}" for j in range(12)])
    lodo = lodo_portfolios(meta, 3)
    for d, portfolio in lodo.items():
        assert portfolio == greedy_portfolio(meta.drop(index=d), 3)
        # whatever the held-out dataset's own scores are, its portfolio does not change
        poisoned = meta.copy()
        poisoned.loc[d] = 0.0
        poisoned.loc[d, portfolio[0]] = 0.0
        poisoned.loc[d, "c11"] = 1.0          # make c11 uniquely perfect on d only
        assert lodo_portfolios(poisoned, 3)[d] == portfolio


def test_greedy_picks_the_best_compromise_then_complements():
    meta = pd.DataFrame({"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.9, 0.9]}, index=["x", "y"])
    assert greedy_portfolio(meta, 2) == ["c", "a"]
    with pytest.raises(PdlError, match="at least two"):
        lodo_portfolios(meta.iloc[:1], 2)


def test_published_portfolio_maps_onto_our_space():
    configs = published_portfolio()
    assert len(configs) == 32
    assert all(check_config(c)["model"] in MODELS for c in configs)


# --- resuming a killed search ------------------------------------------------------------------------------------
KILLED = textwrap.dedent('''
    import os, sys
    from unittest import mock
    import pdl.automl.hyperband as hb
    from pdl.automl.datasets import load_tabular
    calls = 0
    def fake(config, data, fraction, seed):
        global calls
        calls += 1
        if calls > {kill_after}:
            os._exit(137)                         # killed in the middle of the study, no clean-up
        return {{"val": fraction * (0.5 + 0.01 * len(config)), "test": 0.5, "fit_s": 0.0, "rows": 1, "error": None}}
    with mock.patch.object(hb, "evaluate", fake):
        data = load_tabular("pima", max_rows=200)
        driver = hb.BracketDriver(hb.open_study(sys.argv[1]), data, hb.Clock(1e9))
        hb.run_brackets(driver, hb.config_stream(0), hb.hyperband_brackets(1 / 9), max_configs=17)
''')


def _fake_counter(log):
    def fake(config, data, fraction, seed):
        log.append((config["model"], fraction))
        return {"val": fraction * (0.5 + 0.01 * len(config)), "test": 0.5, "fit_s": 0.0, "rows": 1, "error": None}
    return fake


@pytest.mark.parametrize("suffix", [".log", pytest.param(".db", marks=pytest.mark.slow)])
def test_killed_study_resumes_without_rerunning_finished_trials(tmp_path, monkeypatch, suffix):
    study_file = tmp_path / f"study{suffix}"
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(kill_after=10))
    result = subprocess.run([sys.executable, str(script), str(study_file)], capture_output=True, text=True)
    assert result.returncode == 137, result.stderr[-2000:]
    before = study_records(open_study(study_file))
    assert len(before) == 10                                     # ten evaluations finished before the kill

    import pdl.automl.hyperband as hb
    calls = []
    monkeypatch.setattr(hb, "evaluate", _fake_counter(calls))
    data = load_tabular("pima", max_rows=200)
    study = open_study(study_file)
    run_brackets(BracketDriver(study, data, Clock(1e9)), config_stream(0), hyperband_brackets(1 / 9), max_configs=17)
    after = study_records(study)
    assert len(calls) == 22 - 10                                 # only the missing evaluations were computed
    assert len(after) == 22
    assert {r["t"] for r in before} <= {r["t"] for r in after}        # the finished ones are the stored ones
    states = [t.state.name for t in study.get_trials()]
    assert (states.count("COMPLETE"), states.count("PRUNED"), "RUNNING" in states) == (5, 12, False)

    calls.clear()                                                # a third run computes nothing at all
    run_brackets(BracketDriver(open_study(study_file), data, Clock(1e9)), config_stream(0),
                 hyperband_brackets(1 / 9), max_configs=17)
    assert calls == []


# --- degenerate data -------------------------------------------------------------------------------------------
def _frame(**columns):
    base = {"x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "y": ["a", "b", "a", "b", "a", "b"]}
    return pd.DataFrame({**base, **columns})


def test_missing_target_column_is_a_clear_error():
    with pytest.raises(PdlError, match="no target column 'label'"):
        prepare_frame(_frame(), "label")


def test_single_class_is_a_clear_error():
    with pytest.raises(PdlError, match="1 class"):
        prepare_frame(_frame(y=["a"] * 6), "y")


def test_constant_and_all_nan_columns_are_dropped():
    p = prepare_frame(_frame(const=[3] * 6, empty=[np.nan] * 6, cat=["u", None, "v", "u", "v", None]), "y")
    assert list(p.X.columns) == ["x", "cat"] and p.dropped == ["const", "empty"] and p.categorical == ["cat"]


def test_nans_everywhere_is_a_clear_error():
    frame = pd.DataFrame({"x": [np.nan] * 6, "z": [np.nan] * 6, "y": ["a", "b"] * 3})
    with pytest.raises(PdlError, match="no usable feature"):
        prepare_frame(frame, "y")


def test_rows_with_missing_target_are_dropped_and_feature_nans_imputed():
    frame = _frame(y=["a", "b", None, "b", "a", "b"] * 1, x=[1.0, np.nan, 3.0, np.nan, 5.0, 6.0])
    frame = pd.concat([frame] * 5, ignore_index=True)
    p = prepare_frame(frame, "y")
    assert len(p.y) == 25
    data = ds.split_tabular(p, "toy", seed=0)
    result = evaluate(default_config("logreg"), data)
    assert result["error"] is None


def test_missing_debian_package_names_it_and_make_setup(monkeypatch):
    spec = TabularSpec("ghost", "r-cran-no-such-data", "nosuch", "ghost", "y", "binary", "missing")
    monkeypatch.setitem(ds.TABULAR_DATASETS, "ghost", spec)
    ds.read_frame.cache_clear()
    with pytest.raises(PdlError) as error:
        ds.read_frame("ghost")
    assert "r-cran-no-such-data" in str(error.value) and "make setup" in str(error.value)


def test_registry_has_enough_real_datasets():
    assert len(ds.BINARY_DATASETS) >= 12 and len(ds.MULTICLASS_DATASETS) >= 4
    data = load_tabular("credit_data", seed=0, max_rows=600)   # categorical columns and NaNs
    assert data.categorical and data.provenance["package"] == "r-cran-modeldata"
    assert evaluate(default_config("hgb"), data)["val"] > 0.6
