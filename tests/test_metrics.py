"""Metrics against hand-computed examples and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from superposition import metrics as M
from superposition.models import build_model
from superposition.spec import parse_spec


def t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


# W_1 = (2, 0), W_2 = (0, 0.5), W_3 = (0.3, 0.4): by hand, Ŵ_1 = (1, 0), Ŵ_2 = (0, 1), Ŵ_3 = (0.6, 0.8).
HAND = t([[[2.0, 0.0, 0.3], [0.0, 0.5, 0.4]]])


def test_norms_and_counts_by_hand():
    np.testing.assert_allclose(M.feature_norms(HAND)[0], [2.0, 0.5, 0.5], rtol=1e-12)
    assert M.n_represented(HAND).tolist() == [1]
    assert M.n_represented(HAND, threshold=0.4).tolist() == [3]
    # diag(WᵀW) = (4, 0.25, 0.25): only feature 1 passes 0.5
    np.testing.assert_allclose(M.learned_diag(HAND)[0], [4.0, 0.25, 0.25], rtol=1e-12)
    assert M.n_learned_diag(HAND).tolist() == [1]


def test_learned_diag_untied_and_tied():
    W1 = t([[[1.0, 0.5]]])  # (inst, hidden=1, feats=2)
    W2 = t([[[0.9], [0.5]]])  # (inst, feats=2, hidden=1)
    np.testing.assert_allclose(M.learned_diag(W1, W2)[0], [0.9, 0.25], rtol=1e-12)
    assert M.n_learned_diag(W1, W2).tolist() == [1]
    W = t([[[1.0, 0.8]]])
    np.testing.assert_allclose(M.learned_diag(W)[0], [1.0, 0.64], rtol=1e-12)
    assert M.n_learned_diag(W).tolist() == [2]
    # norm 0.6 counts as represented (> 0.5) but not as learned (0.36 < 0.5)
    W = t([[[1.0, 0.6]]])
    assert M.n_represented(W).tolist() == [2] and M.n_learned_diag(W).tolist() == [1]


def test_superposition_dims_and_dimensionality_by_hand():
    sup = M.superposition(HAND)[0]
    # sup_1 = 0² + 0.3² ; sup_2 = 0² + 0.4² ; sup_3 = (1.2)² + (0.4)²
    np.testing.assert_allclose(sup, [0.09, 0.16, 1.6], rtol=1e-12)
    np.testing.assert_allclose(M.dims_per_feature(HAND), [2 / 4.5], rtol=1e-12)
    D = M.feature_dimensionality(HAND)[0]
    np.testing.assert_allclose(D, [4 / 4.09, 0.25 / 0.41, 0.25 / 1.85], rtol=1e-12)
    # A zero feature has no direction: superposition 0, dimensionality 0.
    Z = t([[[1.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_allclose(M.superposition(Z)[0], [0.0, 0.0])
    np.testing.assert_allclose(M.feature_dimensionality(Z)[0], [1.0, 0.0])


def _polygon(k: int) -> np.ndarray:
    a = 2 * np.pi * np.arange(k) / k
    return np.stack([np.cos(a), np.sin(a)])


def _tetrahedron() -> np.ndarray:
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float).T
    return v / np.sqrt(3)


def _square_antiprism() -> np.ndarray:
    # Height h² = 1/3 makes the 8 unit vectors a tight frame in 3-D, so every D_i = 3/8.
    h = 1 / np.sqrt(3)
    r = np.sqrt(1 - h * h)
    cols = []
    for k in range(8):
        a = np.pi / 4 * k
        cols.append([r * np.cos(a), r * np.sin(a), h if k % 2 == 0 else -h])
    return np.array(cols).T


@pytest.mark.parametrize(
    ("W", "value", "name"),
    [
        (np.eye(3), 1.0, "dedicated"),
        (_tetrahedron(), 3 / 4, "tetrahedron"),
        (_polygon(3), 2 / 3, "triangle"),
        (np.array([[1.0, -1.0]]), 1 / 2, "digon"),
        (_polygon(5), 2 / 5, "pentagon"),
        (_square_antiprism(), 3 / 8, "square antiprism"),
    ],
)
def test_geometry_recogniser_sticky_values(W, value, name):
    geo = M.recognise_geometry(t(W)[None])
    np.testing.assert_allclose(geo.dimensionality[0], value, rtol=1e-12)
    np.testing.assert_allclose(geo.sticky[0], value)
    assert geo.names() == [[name] * W.shape[1]]
    np.testing.assert_allclose(geo.distance[0], 0.0, atol=1e-12)


def test_geometry_recogniser_nearest_and_unrepresented():
    # An antipodal pair with a small third feature in the same line, plus a dropped feature.
    W = t([[[1.0, -0.95, 0.0]]])
    geo = M.recognise_geometry(W)
    # D_1 = 1/(1 + 0.95²) = 0.526, D_2 = 0.95²/(0.95² + 1²) = 0.474 = 0.474: both nearest 1/2;
    # feature 3 is not represented.
    np.testing.assert_allclose(geo.dimensionality[0, :2], [1 / 1.9025, 0.9025 / 1.9025], rtol=1e-12)
    assert geo.names() == [["digon", "digon", ""]]
    assert geo.polytope.tolist() == [[3, 3, -1]]
    assert math.isnan(float(geo.sticky[0, 2]))


def test_loss_split_by_hand():
    W = t([[[1.0, 0.5]]])
    Mx = M.readout_matrix(W)  # [[1, .5], [.5, .25]]
    split = M.loss_split(Mx, t([[1.0, 2.0]]))
    # benefit = 1·0² + 2·(1 − 0.25)² ; interference = 1·0.5² + 2·0.5²
    np.testing.assert_allclose(split.benefit, [1.125], rtol=1e-12)
    np.testing.assert_allclose(split.interference, [0.75], rtol=1e-12)
    # tied: interference is the paper's Σ_{i≠j} I_j (W_j·W_i)²
    W = t(np.random.default_rng(0).normal(size=(2, 3, 5)))
    imp = t(np.random.default_rng(1).uniform(0.1, 1, size=(2, 5)))
    G = W.transpose(-1, -2) @ W
    paper = sum(imp[:, j] * G[:, j, i] ** 2 for i in range(5) for j in range(5) if i != j)
    np.testing.assert_allclose(M.loss_split(G, imp).interference, paper, rtol=1e-12)


def test_neuron_monosemanticity_and_composition():
    W = t([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, -2.0, 0.0]]])  # 3 neurons, 3 features
    mono = M.neuron_monosemanticity(W)[0]
    np.testing.assert_allclose(mono[[0, 2]], [0.8, 1.0], rtol=1e-12)
    assert math.isnan(float(mono[1]))
    comp = M.neuron_composition(W)
    np.testing.assert_allclose(comp.share[0, 0], [9 / 25, 16 / 25, 0.0], rtol=1e-12)
    np.testing.assert_allclose(comp.share[0, 1], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(comp.share[0, 2], [0.0, 1.0, 0.0])
    assert torch.equal(comp.weights, W)


def _motif_weights() -> tuple[torch.Tensor, torch.Tensor]:
    # Instance 0: neuron 0 reads feature 0 strongly (1.0) and feature 1 weakly (0.3) and writes feature 1 strongly
    # (1.0), feature 0 weakly (0.3); neuron 1 fires with feature 0 and writes −1 to output 1 (cancels the leak);
    # neuron 2 is a plain monosemantic neuron for feature 1.
    W1 = torch.zeros(3, 3, 2, dtype=torch.float64)
    W2 = torch.zeros(3, 2, 3, dtype=torch.float64)
    for k in range(3):
        W1[k, 0] = t([1.0, 0.3])
        W2[k, :, 0] = t([0.3, 1.0])
        W1[k, 2, 1], W2[k, 1, 2] = 1.0, 1.0
    W1[0, 1, 0], W2[0, 1, 1] = 0.8, -1.0  # cancels 0.8 of the leak 1.0
    W1[1, 1, 0], W2[1, 1, 1] = -0.8, -1.0  # fires for the other sign of x_0: no cancellation
    W1[2, 1, 0], W2[2, 1, 1] = 0.8, -0.3  # too weak (0.24 < 0.5 of the leak)
    return W1, W2


def test_asymmetric_motif_finder():
    W1, W2 = _motif_weights()
    motifs = M.asymmetric_motifs(W1, W2)
    assert motifs == [
        M.Motif(0, 0, (0, 1), 1),
        M.Motif(1, 0, (0, 1), None),
        M.Motif(2, 0, (0, 1), None),
    ]
    # Not swapped enough (ratio 4 asked, 1/0.3 = 3.3 given): nothing.
    assert M.asymmetric_motifs(W1, W2, ratio=4.0) == []


def test_ternary_fractions():
    W1 = t([[[1.0, -1.0, 0.05, 0.3]]])  # scaled by 1: +, −, zero, middle
    W2 = t([[[-2.0], [0.1], [2.0], [-1.2]]])  # scaled by 2: −, zero, +, − (−0.6)
    tern = M.ternary_fractions(W1, W2)
    np.testing.assert_allclose(tern.pos, [2 / 8])
    np.testing.assert_allclose(tern.neg, [3 / 8])
    np.testing.assert_allclose(tern.zero, [2 / 8])


def test_pair_cosines():
    W = t([[[1.0, 1.0, 1.0, -1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]])
    cos = M.pair_cosines(W, 1, 2)
    np.testing.assert_allclose(cos.correlated, [[1 / math.sqrt(2)]], rtol=1e-12)
    np.testing.assert_allclose(cos.anticorrelated[0, 0], -1.0, rtol=1e-12)
    assert math.isnan(float(cos.anticorrelated[0, 1]))


def test_effective_rank():
    W = t([np.diag([1.0, 1.0, 0.0]), np.diag([3.0, 1.0, 0.0])])
    q = np.array([0.75, 0.25])
    np.testing.assert_allclose(M.effective_rank(W), [2.0, np.exp(-(q * np.log(q)).sum())], rtol=1e-10)


def _set(model, name: str, value) -> None:
    getattr(model, name).data.copy_(torch.as_tensor(value, dtype=torch.float32))


def test_instance_metrics_linear_by_hand():
    spec = parse_spec(
        {
            "model": {"kind": "linear", "n_features": 2, "d_hidden": 1},
            "task": {"importance": 0.5},
            "data": {"feature_probability": 0.1},
            "instances": {"axes": {"seed": [0, 1]}},
        }
    )
    model = build_model(spec)
    _set(model, "W", [[[1.0, -1.0]], [[1.0, 0.0]]])
    out = M.instance_metrics(model, spec)
    assert out["n_represented"].tolist() == [2, 1]
    assert out["n_learned_diag"].tolist() == [2, 1]
    np.testing.assert_allclose(out["dims_per_feature"], [0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["superposition"], [1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["benefit"], [0.0, 0.5], rtol=1e-6)  # I_2 (1 − 0)² = 0.5
    np.testing.assert_allclose(out["interference"], [1.5, 0.0], rtol=1e-6)  # 1·1 + 0.5·1
    # naive: keep feature 1, drop feature 2 at its mean: 0.5 (p/3 − p²/4), as a mean over the 2 features
    p = 0.1
    np.testing.assert_allclose(out["naive_loss"], [0.5 * (p / 3 - p * p / 4) / 2] * 2, rtol=1e-9)
    for values in out.values():
        assert values.shape == (2,)


def test_instance_metrics_untied_mlp_columns():
    spec = parse_spec(
        {
            "model": {"kind": "mlp", "n_features": 2, "d_hidden": 3},
            "data": {"magnitude": "signed"},
            "task": {"target": "abs"},
            "instances": {"axes": {"seed": [0, 1, 2]}},
        }
    )
    model = build_model(spec)
    W1, W2 = _motif_weights()
    _set(model, "W1", W1)
    _set(model, "W2", W2)
    out = M.instance_metrics(model, spec)
    assert out["n_motifs"].tolist() == [1, 1, 1]
    expected_mono = [np.mean([1 / math.hypot(1, 0.3), 0.8 / math.hypot(0.8, 0), 1.0])] * 3
    np.testing.assert_allclose(out["monosemanticity"], expected_mono, rtol=1e-6)
    assert {"ternary_pos", "ternary_neg", "ternary_zero", "n_learned_diag"} <= set(out)
    assert "benefit" not in out
