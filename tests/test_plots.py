"""Figures: every figure builds on a tiny trained run, with the traces (and the numbers in them) we expect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from superposition import metrics, plots
from superposition.data import importance_tensor
from superposition.runs import train
from superposition.spec import parse_spec

TRAIN = {"steps": 200, "batch_size": 128, "log_every": 50, "eval_batch": 512}


def _spec(**sections):
    raw = {"name": "tiny", "train": dict(TRAIN)}
    raw.update(sections)
    return parse_spec(raw)


@pytest.fixture(scope="module")
def bottleneck_run():
    # 2 model kinds x 3 probabilities, 5 features in 2 dimensions: the 2-D, N-D, W·Wᵀ, split and geometry figures.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return train(
        _spec(
            model={"kind": "relu-output", "n_features": 5, "d_hidden": 2},
            task={"importance": 0.9},
            instances={"model.kind": ["linear", "relu-output"], "data.feature_probability": [1.0, 0.1, 0.01]},
        )
    )


@pytest.fixture(scope="module")
def mlp_run():
    # seed 000's absolute-value model: untied W1/W2, signed inputs, two seeds.
    return train(
        _spec(
            model={"kind": "mlp", "n_features": 6, "d_hidden": 4},
            data={"magnitude": "signed", "feature_probability": 0.3},
            task={"target": "abs", "importance": 0.8},
            instances={"seed": [0, 1]},
        )
    )


@pytest.fixture(scope="module")
def phase_run():
    return train(
        _spec(
            model={"kind": "relu-output", "n_features": 2, "d_hidden": 1},
            instances={"task.importance": [0.5, 2.0], "data.feature_probability": [1.0, 0.05]},
        )
    )


@pytest.fixture(scope="module")
def residual_run():
    return train(
        _spec(
            model={"kind": "residual-mlp", "n_features": 8, "d_hidden": 4, "d_embed": 16},
            data={"magnitude": "signed"},
            task={"target": "relu-plus-x"},
            train={**TRAIN, "steps": 50},
            instances={"data.feature_probability": [0.1, 0.2]},
        )
    )


def _by_name(run):
    return {f.name: f for f in plots.figures_for_run(run)}


# -- choosing figures ------------------------------------------------------------------------------------------------
def test_figures_for_bottleneck_run(bottleneck_run):
    figs = _by_name(bottleneck_run)
    assert list(figs) == ["features-2d", "features-nd", "interaction", "benefit-interference", "geometry", "loss"]
    n_inst, n_feat = 6, 5
    assert len(figs["features-2d"].figure.data) == n_inst * n_feat + 1  # an arrow per feature + the colour bar
    assert len(figs["features-nd"].figure.data) == n_inst + 1
    assert len(figs["interaction"].figure.data) == 2 * n_inst  # W·Wᵀ and the bias column per instance
    assert len(figs["benefit-interference"].figure.data) == 2
    assert len(figs["geometry"].figure.data) == 2 * 2  # linear and relu-output: a line and the dots each
    assert len(figs["loss"].figure.data) == n_inst
    for f in figs.values():
        assert f.title == plots.FIGURES[f.name][0]
        assert f.figure.layout.title.text  # every figure names what it shows
    assert set(figs) <= set(plots.figure_names())


def test_figures_for_mlp_run(mlp_run):
    figs = _by_name(mlp_run)
    assert list(figs) == ["features-nd", "neuron-bars", "features-discrete", "interaction", "loss"]
    assert len(figs["neuron-bars"].figure.data) == 2 + 1
    # one bar trace per feature, per instance, per matrix (W1 and W2ᵀ); the legend lists each feature once
    discrete = figs["features-discrete"].figure
    assert len(discrete.data) == 2 * 2 * 6
    assert sum(bool(t.showlegend) for t in discrete.data) == 6
    # traces run instance by instance, W1 then W2ᵀ, feature by feature: W1[n, i] and W2[i, n] at neuron n
    W1, W2 = mlp_run.model.W1.detach().numpy(), mlp_run.model.W2.detach().numpy()
    np.testing.assert_allclose(discrete.data[3].y, W1[0, :, 3], rtol=1e-6)
    np.testing.assert_allclose(discrete.data[6 + 3].y, W2[0, 3, :], rtol=1e-6)
    np.testing.assert_allclose(discrete.data[12 + 3].y, W1[1, :, 3], rtol=1e-6)


def test_figures_for_phase_run(phase_run):
    figs = _by_name(phase_run)
    assert "phase" in figs and "features-2d" not in figs
    fig = figs["phase"].figure
    heat = [t for t in fig.data if t.type == "heatmap"]
    lines = [t for t in fig.data if t.type == "scatter" and t.mode == "lines"]
    points = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    assert len(heat) == 1 and len(lines) == 1
    assert sum(len(t.x) for t in points) == 4  # every trained instance drawn once
    z, x, y = np.asarray(heat[0].z), np.asarray(heat[0].x), np.asarray(heat[0].y)
    assert z.shape == (len(y), len(x))
    from superposition.theory import two_by_one_regime

    expect = two_by_one_regime(x[None, :], y[:, None])  # 0: feature 2 not represented, 1: dedicated, 2: antipodal
    order = {"dedicated(1)": 0, "dedicated(2)": 1, "antipodal(1,2)": 2}
    mapped = np.vectorize(order.get)(np.array(heat[0].text, dtype=object))
    assert (mapped == expect).mean() > 0.99  # the candidate diagram matches the closed forms (ties at r = 1 aside)
    # the boundary line is the closed form s* = 4r/(5r+2) for r ≤ 1
    r = np.asarray(lines[0].x)
    np.testing.assert_allclose(np.asarray(lines[0].y)[r <= 1], 4 * r[r <= 1] / (5 * r[r <= 1] + 2))


def test_figures_for_residual_run(residual_run):
    figs = _by_name(residual_run)
    assert list(figs) == ["features-nd", "neuron-bars", "tmcc", "loss"]
    tm = figs["tmcc"].figure
    assert len(tm.data) == 2
    np.testing.assert_allclose(tm.data[1].y, [(8 - 4) / (6 * 8)] * 2)  # naive L/p = (n − d)/(6n)
    loss = residual_run.instances["loss"].to_numpy()
    np.testing.assert_allclose(tm.data[0].y, loss / np.array([0.1, 0.2]))


# -- the figure functions on known arrays ------------------------------------------------------------------------------
def test_features_nd_bars_are_the_norms(bottleneck_run):
    W = bottleneck_run.model.encoder.detach()
    norms, sup = metrics.feature_norms(W).numpy(), metrics.superposition(W).numpy()
    fig = plots.features_nd(norms, sup, [f"i{k}" for k in range(6)])
    for k in range(6):
        np.testing.assert_allclose(fig.data[k].x, norms[k], rtol=1e-6)
        np.testing.assert_allclose(fig.data[k].customdata, sup[k], rtol=1e-6)
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1


def test_neuron_bars_stack_exactly():
    W = np.array([[[0.5, -0.25, 1.0], [-1.0, 2.0, 0.0]]])  # 1 instance, 2 neurons, 3 features
    fig = plots.neuron_bars(W, np.zeros((1, 3)), ["one"])
    bar = fig.data[0]
    x, y, base = np.asarray(bar.x), np.asarray(bar.y), np.asarray(bar.base, dtype=float)
    assert len(y) == 5  # the zero weight is dropped
    for n in range(2):
        sel = x == n
        tops = base[sel] + y[sel]
        w = W[0, n]
        assert np.isclose(max(tops.max(), base[sel].max()), w[w > 0].sum())  # positive parts stack up to their sum
        assert np.isclose(min(tops.min(), base[sel].min()), w[w < 0].sum())  # negative parts down to theirs
    # neuron 0: 0.5 from 0 to 0.5, then 1.0 from 0.5 to 1.5; -0.25 from 0 down to -0.25
    np.testing.assert_allclose(base[x == 0], [0.0, 0.0, 0.5])
    np.testing.assert_allclose(y[x == 0], [0.5, -0.25, 1.0])


def test_interaction_heatmaps_share_one_symmetric_scale(bottleneck_run):
    W = bottleneck_run.model.encoder.detach()
    M = metrics.readout_matrix(W).numpy()
    b = bottleneck_run.model.b_final.detach().numpy()
    fig = plots.interaction_heatmaps(M, b, ["x"] * 6)
    heat = fig.data[0::2]
    for k in range(6):
        np.testing.assert_allclose(heat[k].z, M[k], rtol=1e-6)
        np.testing.assert_allclose(heat[k].z, np.asarray(heat[k].z).T, atol=1e-6)  # tied: WᵀW is symmetric
        np.testing.assert_allclose(np.asarray(fig.data[2 * k + 1].z).ravel(), b[k], rtol=1e-6)
    vmax = max(np.abs(M).max(), np.abs(b).max())
    assert np.isclose(fig.layout.coloraxis.cmax, vmax) and np.isclose(fig.layout.coloraxis.cmin, -vmax)
    assert all(t.coloraxis == "coloraxis" for t in fig.data)


def test_features_2d_arrows_end_at_the_embedding(bottleneck_run):
    W = bottleneck_run.model.encoder.detach().numpy()
    imp = importance_tensor(bottleneck_run.spec).numpy()
    fig = plots.features_2d(W, imp, ["x"] * 6)
    for k in range(6):
        for i in range(5):
            tr = fig.data[k * 5 + i]
            assert tr.x[0] == 0 and tr.y[0] == 0
            assert np.isclose(tr.x[1], W[k, 0, i]) and np.isclose(tr.y[1], W[k, 1, i])
    with pytest.raises(ValueError, match="2-D"):
        plots.features_2d(np.zeros((1, 3, 4)), np.ones((1, 4)), ["x"])


def test_geometry_line_and_dots():
    p = np.array([1.0, 0.1, 0.01])
    dpf = np.array([1.0, 0.5, 0.4])
    D = np.array([[1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.4, 0.4, 0.4]])
    rep = D > 0.1
    fig = plots.geometry(p, dpf, D, rep)
    line, dots = fig.data
    np.testing.assert_allclose(line.x, 1 / p)
    np.testing.assert_allclose(line.y, dpf)
    assert len(dots.y) == rep.sum() == 8
    np.testing.assert_allclose(np.sort(dots.y), np.sort(D[rep]))
    sticky = sorted(s.y0 for s in fig.layout.shapes)
    np.testing.assert_allclose(sticky, sorted(metrics.STICKY_VALUES))


def test_phase_diagram_is_generic_over_candidates():
    x, y = np.geomspace(0.1, 10, 5), np.geomspace(0.01, 1, 4)
    winner = np.array([[0, 0, 1, 1, 2]] * 4)
    fig = plots.phase_diagram(
        x,
        y,
        winner,
        ["a", "b", "c"],
        points_x=np.array([0.2, 1.0, 5.0]),
        points_y=np.array([0.5, 0.5, 0.5]),
        points_label=np.array([0, -1, 0]),
        boundaries=[("edge", x, y[[0, 1, 2, 3, 3]])],
    )
    assert [t.type for t in fig.data] == ["heatmap", "scatter", "scatter", "scatter"]
    assert [t.name for t in fig.data[2:]] == ["trained: other", "trained: a"]
    assert [a.text for a in fig.layout.annotations] == ["<b>a</b>", "<b>b</b>", "<b>c</b>"]
    assert list(fig.layout.xaxis.tickvals) == [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


def test_nearest_candidate_labels():
    grams = np.stack([np.diag([1.0, 0.0]), np.diag([0.0, 1.0]), np.array([[1.0, -1.0], [-1.0, 1.0]])])
    W = np.array([[[0.95, 0.05]], [[0.0, -1.0]], [[-1.0, 1.02]], [[0.7, 0.7]]])  # (inst, 1, 2)
    np.testing.assert_array_equal(plots._nearest_candidate(W, grams), [0, 1, 2, -1])


def test_loss_curves_log_axis_and_subsampling():
    steps = np.arange(0, 100, 10)
    n = 60
    hist = {
        "step": np.repeat(steps, n),
        "instance": np.tile(np.arange(n), len(steps)),
        "loss": np.tile(np.linspace(1, 2, n), len(steps)),
    }
    import pandas as pd

    fig = plots.loss_curves(pd.DataFrame(hist), [f"i{k}" for k in range(n)])
    assert fig.layout.yaxis.type == "log"
    assert len(fig.data) == plots.MAX_CURVES
    assert fig.layout.showlegend is False  # too many curves for a legend
    np.testing.assert_allclose(fig.data[-1].y, [2.0] * len(steps))  # the last instance is always drawn


def test_pick_instances():
    assert plots.pick_instances(5).tolist() == [0, 1, 2, 3, 4]
    big = plots.pick_instances(500)
    assert len(big) == plots.MAX_PANELS and big[0] == 0 and big[-1] == 499
    assert np.all(np.diff(big) > 0)


def test_many_instances_are_subsampled():
    spec = _spec(
        model={"kind": "relu-output", "n_features": 3, "d_hidden": 2},
        train={**TRAIN, "steps": 2},
        instances={"seed": list(range(40))},
    )
    figs = _by_name(train(spec))
    assert len(figs["features-nd"].figure.data) == plots.MAX_PANELS + 1
    assert len(figs["features-2d"].figure.data) == plots.MAX_PANELS * 3 + 1
    assert len(figs["loss"].figure.data) == plots.MAX_CURVES


def test_instance_labels_and_escaping():
    spec = _spec(
        model={"kind": "relu-output", "n_features": 3, "d_hidden": 2},
        instances={"model.kind": ["linear", "relu-output"], "data.feature_probability": [1.0, 0.001]},
    )
    assert plots.instance_labels(spec) == [
        "linear, p = 1",
        "linear, p = 0.001",
        "relu-output, p = 1",
        "relu-output, p = 0.001",
    ]
    fig = plots.features_nd(np.ones((1, 3)), np.zeros((1, 3)), ["<b onclick=x>hi</b>"])
    titles = [a.text for a in fig.layout.annotations]
    assert "&lt;b onclick=x&gt;hi&lt;/b&gt;" in titles


def test_features_2d_with_many_features_uses_two_traces_per_panel():
    rng = np.random.default_rng(0)
    n = plots.MAX_ARROWS + 10
    W = rng.normal(size=(3, 2, n))
    fig = plots.features_2d(W, np.ones((3, n)), ["a", "b", "c"])
    assert len(fig.data) == 3 * 2 + 1
    shafts, tips = fig.data[0], fig.data[1]
    np.testing.assert_allclose(tips.x, W[0, 0])
    np.testing.assert_allclose(tips.y, W[0, 1])
    assert len(shafts.x) == 3 * n  # origin, tip, gap per feature


def test_features_2d_colours_pairs_by_group():
    spec = _spec(model={"kind": "relu-output", "n_features": 5, "d_hidden": 2}, data={"n_anticorrelated_pairs": 2})
    groups = plots._feature_groups(spec)
    assert groups == ["anticorrelated pair 1"] * 2 + ["anticorrelated pair 2"] * 2 + ["independent"]
    fig = plots.features_2d(np.ones((2, 2, 5)), np.ones((2, 5)), ["a", "b"], groups=groups)
    assert len(fig.data) == 2 * 5 + 1
    legend = [t.name for t in fig.data if t.showlegend]
    assert legend == ["anticorrelated pair 1", "anticorrelated pair 2", "independent"]
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert fig.data[-1].marker.showscale is False  # no importance colour bar when colouring by group
