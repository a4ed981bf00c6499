"""The training-geometry section of sweep reports over fixed 2-D training sets (double descent): the polygon
helper on hand-built vectors, the choice of panels, and a small real sweep whose report carries the figure."""

from __future__ import annotations

import math

import numpy as np
import pytest

from superposition import load_sweep
from superposition import sweep as sw
from superposition.plots import polygon_stats, training_geometry
from superposition.spec import parse_spec


def _at(degrees: list[float], norms: list[float]) -> np.ndarray:
    a = np.radians(np.asarray(degrees, dtype=np.float64))
    r = np.asarray(norms, dtype=np.float64)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=-1)


def test_regular_pentagon_with_copies_and_short_vectors():
    corners = [90.0 + 72.0 * k for k in range(5)]
    # Each corner three times (on it and 2 degrees either side), plus five short vectors in between.
    angles = [c + d for c in corners for d in (-2.0, 0.0, 2.0)] + [c + 36.0 for c in corners]
    v = _at(angles, [2.0] * 15 + [0.6] * 5)
    s = polygon_stats(v)
    assert (s.n, s.n_long, s.directions) == (20, 15, 5)
    assert s.max_norm == pytest.approx(2.0, rel=1e-12)
    assert s.irregularity == pytest.approx(0.0, abs=1e-9)


def test_a_corner_across_zero_degrees_stays_one_direction():
    corners = [0.0, 72.0, 144.0, 216.0, 288.0]
    angles = [c + d for c in corners for d in (-3.0, 0.0, 3.0)]  # 357, 0, 3 form one corner
    s = polygon_stats(_at(angles, [1.0] * 15))
    assert (s.n_long, s.directions) == (15, 5)
    assert s.irregularity == pytest.approx(0.0, abs=1e-9)


def test_irregular_polygon_spread_and_threshold():
    # A square with one corner moved by 18 degrees: sides 108, 72, 90, 90 degrees -> (108 - 72) / 90 = 0.4.
    s = polygon_stats(_at([0.0, 108.0, 180.0, 270.0], [1.0, 1.0, 1.0, 1.0]))
    assert s.directions == 4 and s.irregularity == pytest.approx(0.4, abs=1e-9)
    # Vectors all round, 3 degrees apart: groups of four (at most 10 degrees wide) -> 30 directions.
    spread = polygon_stats(_at([3.0 * k for k in range(120)], [1.0] * 120))
    assert (spread.n_long, spread.directions) == (120, 30)
    # Long means strictly above half the largest norm; an antipodal pair is a regular digon.
    s = polygon_stats(_at([10.0, 190.0, 100.0, 280.0], [2.0, 1.5, 1.0, 0.99]))
    assert (s.n_long, s.directions) == (2, 2) and s.irregularity == pytest.approx(0.0, abs=1e-9)
    one = polygon_stats(_at([45.0, 46.0], [1.0, 1.0]))
    assert one.directions == 1 and math.isnan(one.irregularity)
    zero = polygon_stats(np.zeros((3, 2)))
    assert (zero.n, zero.max_norm, zero.n_long, zero.directions) == (3, 0.0, 0, 0)
    assert polygon_stats(np.zeros((0, 2))).n == 0


def test_pick_sizes_keeps_ends_and_peak():
    losses = [1.0] * 17
    losses[9] = 5.0
    # linspace(0, 16, 6) rounds to 0 3 6 10 13 16; the peak 9 replaces its nearest inner neighbour 10.
    assert sw.pick_sizes(losses) == [0, 3, 6, 9, 13, 16]
    losses[9], losses[13] = 1.0, 5.0
    assert sw.pick_sizes(losses) == [0, 3, 6, 10, 13, 16]
    assert sw.pick_sizes([3.0, 1.0, 2.0]) == [0, 1, 2]


def test_figure_has_three_traces_per_panel_and_equal_aspect():
    W = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.5]])
    H = _at([0.0, 120.0, 240.0], [3.0, 3.0, 3.0])
    fig = training_geometry([W, W], [H, H[:2]], ["T = 3", "T = 2"])
    assert len(fig.data) == 6
    assert [len(t.x) for t in fig.data] == [3, 9, 3, 2, 9, 3]  # points first, features on top
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis2.scaleanchor == "x2"
    assert fig.layout.xaxis.range == pytest.approx((-3.36, 3.36))


def _dd_spec(**train):
    return parse_spec(
        {
            "name": "dd-small",
            "model": {"kind": "relu-output", "n_features": 50, "d_hidden": 2},
            "data": {"feature_probability": 0.05, "dataset_size": 5},
            "train": {
                "steps": 300,
                "batch_size": 256,
                "lr": 1e-2,
                "optimizer": "adamw",
                "weight_decay": 0.01,
                "schedule": "warmup-cosine",
                "warmup_steps": 20,
                "log_every": 100,
                "eval_batch": 512,
                "engine": "eager",
                **train,
            },
            "sweep": {"axes": {"data.dataset_size": [5, 200]}, "repeats": 2, "report": {"x": "data.dataset_size"}},
        }
    )


def test_small_double_descent_sweep_report_has_the_geometry(tmp_path):
    out = tmp_path / "dd"
    sw.prepare(_dd_spec(), out)
    sw.execute(out, workers=1, threads=1)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Training points and features" in html and "Features and training points in the 2-D hidden space" in html
    s = load_sweep(out)
    data = sw.training_geometry_data(out, s.plan, s.results)
    assert [d.dataset_size for d in data] == [5, 200]
    long = s.instances()
    for d in data:
        rows = long[long["point"] == d.point]
        assert d.repeat == int(rows["loss"].to_numpy().argmin())
        assert d.loss == pytest.approx(float(rows["loss"].min()), rel=1e-12)
        assert d.features.shape == (2, 50) and d.hidden.shape == (d.dataset_size, 2)
        # The rebuilt training set gives the recorded last training loss: the last warm-up-cosine step has
        # learning rate 0 and is full-batch (T <= batch_size), so the weights are those that loss was taken at.
        assert d.train_loss == pytest.approx(d.recorded_train_loss, rel=1e-5)
        assert d.data_shape == polygon_stats(d.hidden) and d.feature_shape.n == 50
    assert data[0].train_loss < 0.2 * data[0].loss  # 5 points: memorised


def test_no_geometry_without_a_fixed_training_set(tmp_path):
    raw = _dd_spec(steps=40).model_dump(mode="json")
    raw["data"]["dataset_size"] = None
    raw["sweep"] = {"axes": {"data.feature_probability": [0.05, 0.1]}}
    out = tmp_path / "plain"
    sw.prepare(parse_spec(raw), out)
    sw.execute(out, workers=1, threads=1)
    s = load_sweep(out)
    assert sw.training_geometry_data(out, s.plan, s.results) == []
    assert "Training points and features" not in (out / "report.html").read_text(encoding="utf-8")
