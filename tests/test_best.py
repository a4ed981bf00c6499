"""Best of several seeds (superposition.best) on hand-made tables: the lowest-loss row per setting, ties, dropped
instances (NaN loss), a single seed, several axes, and the per-seed counts beside it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from superposition.best import best_of_seeds, seed_axis_varies, setting_columns
from superposition.errors import SpecError
from superposition.spec import load_spec, parse_spec

NAN = math.nan


def _table() -> pd.DataFrame:
    # two axes (p, r) x seeds 0..2; the instance table lists seeds last (fastest)
    rows = [
        # p,   r,  seed, loss, antipodal, n_rep
        (0.1, "a", 0, 0.30, False, 2),
        (0.1, "a", 1, 0.10, True, 4),
        (0.1, "a", 2, 0.20, True, 4),
        (0.1, "b", 0, 0.50, True, 3),
        (0.1, "b", 1, 0.50, False, 2),  # tie with seed 0: the earlier row wins
        (0.1, "b", 2, NAN, True, 3),  # dropped: never best, not counted
        (0.2, "a", 0, NAN, True, 1),
        (0.2, "a", 1, NAN, False, 1),  # every seed dropped: first row kept, n_ranked 0
        (0.2, "a", 2, NAN, True, 1),
        (0.2, "b", 0, 0.40, False, 2),
        (0.2, "b", 1, math.inf, True, 4),  # an infinite loss is not ranked either
        (0.2, "b", 2, 0.05, False, 2),
    ]
    df = pd.DataFrame(rows, columns=["p", "r", "seed", "loss", "antipodal", "n_rep"])
    return df.assign(instance=np.arange(len(df)))


def test_lowest_loss_per_setting_with_ties_and_dropped_instances():
    best = best_of_seeds(_table(), ["p", "r"], "antipodal")
    assert best[["p", "r"]].values.tolist() == [[0.1, "a"], [0.1, "b"], [0.2, "a"], [0.2, "b"]]  # first-row order
    assert best["instance"].tolist() == [1, 3, 6, 11]
    assert best["seed"].tolist() == [1, 0, 0, 2]
    np.testing.assert_array_equal(best["loss"], [0.10, 0.50, NAN, 0.05])
    assert best["n_seeds"].tolist() == [3, 3, 3, 3]
    assert best["n_ranked"].tolist() == [3, 2, 0, 2]
    assert best["antipodal"].tolist() == [True, True, True, False]
    # ranked seeds whose readout equals the best one's, and ranked seeds whose (boolean) readout is true
    assert best["n_like_best"].tolist() == [2, 1, 0, 2]
    assert best["n_true"].tolist() == [2, 1, 0, 0]


def test_non_boolean_readout_counts_seeds_like_the_best():
    best = best_of_seeds(_table(), ["p", "r"], "n_rep")
    assert best["n_rep"].tolist() == [4, 3, 1, 2]
    assert best["n_like_best"].tolist() == [2, 1, 0, 2]
    assert "n_true" not in best


def test_one_axis_another_rank_column_and_no_readout():
    df = _table().assign(exact=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1, -2])
    best = best_of_seeds(df, ["p"], rank="exact")
    assert best["instance"].tolist() == [5, 11]  # by the exact column; NaN losses do not matter for it
    assert best["n_seeds"].tolist() == [6, 6] and best["n_ranked"].tolist() == [6, 6]
    assert "n_like_best" not in best and "n_true" not in best


def test_single_seed_and_no_settings():
    df = _table()
    one = best_of_seeds(df[df["seed"] == 2], ["p", "r"], "antipodal")
    assert one["instance"].tolist() == [2, 5, 8, 11]
    assert one["n_seeds"].tolist() == [1, 1, 1, 1]
    assert one["n_ranked"].tolist() == [1, 0, 0, 1]
    assert one["n_like_best"].tolist() == [1, 0, 0, 1]
    whole = best_of_seeds(df)  # no settings: the whole table is one setting
    assert whole["instance"].tolist() == [11] and whole["n_seeds"].tolist() == [12]
    assert whole["n_ranked"].tolist() == [7]  # 4 NaN losses and 1 infinite one


def test_nan_settings_share_a_group_and_bad_columns_are_refused():
    df = pd.DataFrame({"p": [NAN, NAN, 1.0], "loss": [0.3, 0.2, 0.1]})
    best = best_of_seeds(df, ["p"])
    assert best["loss"].tolist() == [0.2, 0.1] and best["n_seeds"].tolist() == [2, 1]
    with pytest.raises(SpecError, match="no column 'q'"):
        best_of_seeds(df, ["q"])
    with pytest.raises(SpecError, match="already has 'n_seeds'"):
        best_of_seeds(df.assign(n_seeds=1), ["p"])


def test_setting_columns_and_when_seeds_vary():
    spec = load_spec("phase-diagram", quick=True)
    assert setting_columns(spec) == ["task.importance", "data.feature_probability"]
    assert seed_axis_varies(spec)
    assert not seed_axis_varies(load_spec("demo"))
    base = {"model": {"n_features": 3, "d_hidden": 2}, "train": {"steps": 1}}
    assert not seed_axis_varies(parse_spec({**base, "instances": {"seed": [0, 1]}}))  # seeds but no other axis
    only_one = {**base, "instances": {"seed": [0], "data.feature_probability": [0.1, 0.2]}}
    assert not seed_axis_varies(parse_spec(only_one))


def test_a_runs_best_of_seeds_table():
    from superposition.runs import train
    from superposition.spec import parse_spec

    run = train(
        parse_spec(
            {
                "model": {"n_features": 5, "d_hidden": 2},
                "train": {"steps": 20, "batch_size": 32, "eval_batch": 128},
                "instances": {"data.feature_probability": [1.0, 0.1], "seed": [0, 1, 2]},
            }
        )
    )
    table = run.best_of_seeds()
    assert table["data.feature_probability"].tolist() == [1.0, 0.1]
    assert table["n_seeds"].tolist() == [3, 3] and "n_like_best" in table
    for _, row in table.iterrows():
        same = run.instances[run.instances["data.feature_probability"] == row["data.feature_probability"]]
        assert row["loss"] == same["loss"].min() and row["seed"] == same.loc[same["loss"].idxmin(), "seed"]
