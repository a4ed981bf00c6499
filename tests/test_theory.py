"""Theory against closed forms, brute force and seeded Monte Carlo with stated standard errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from superposition import metrics
from superposition import theory as T
from superposition.data import make_sampler
from superposition.spec import SpecError, parse_spec

D = torch.float64


# -- naive losses ----------------------------------------------------------------------------------------------------
def test_dropped_feature_cost_closed_forms():
    p = 0.3
    assert T.dropped_feature_cost("uniform", p) == pytest.approx(p / 3 - p * p / 4, rel=1e-12)
    assert T.dropped_feature_cost("uniform", p, bias=False) == pytest.approx(p / 3, rel=1e-12)
    assert T.dropped_feature_cost("signed", p) == pytest.approx(p / 3, rel=1e-12)  # mean 0
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    assert T.dropped_feature_cost("signed", p, relu, bias=False) == pytest.approx(p / 6, rel=1e-12)
    # |x| of U[-1,1]: E = 1/2, E² = 1/3
    assert T.dropped_feature_cost("signed", p, np.abs) == pytest.approx(p / 3 - (p / 2) ** 2, rel=1e-12)


def test_normal_magnitude_moments_match_sampling():
    # clip(0.5 + 0.2 N, 0, 1) is symmetric about 1/2: mean exactly 1/2.
    assert T.magnitude_expectation(lambda v: v, "normal") == pytest.approx(0.5, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    x = (0.5 + 0.2 * torch.randn(2_000_000, generator=gen, dtype=D)).clamp(0, 1)
    m2 = float((x * x).mean())
    se = float((x * x).std()) / np.sqrt(x.numel())
    assert abs(T.magnitude_expectation(lambda v: v * v, "normal") - m2) < 4 * se


def test_tmcc_naive_loss():
    assert T.tmcc_naive_loss(100, 50, 0.01) / 0.01 == pytest.approx(1 / 12, rel=1e-12)
    assert round(T.tmcc_naive_loss(100, 50, 1.0), 4) == 0.0833
    spec = parse_spec(
        {
            "model": {"kind": "residual-mlp", "n_features": 100, "d_hidden": 50},
            "data": {"magnitude": "signed", "feature_probability": 0.01},
            "task": {"target": "relu-plus-x", "residual_factor": 1.0},
        }
    )
    # The spec-driven naive loss (sum over features) reproduces the TMCC formula per feature.
    np.testing.assert_allclose(T.naive_loss(spec) / 100, [T.tmcc_naive_loss(100, 50, 0.01)], rtol=1e-12)


def test_naive_loss_relu_vs_linear_setting():
    spec = parse_spec(
        {
            "model": {"kind": "relu-output", "n_features": 20, "d_hidden": 5},
            "task": {"importance": 0.7},
            "instances": {"axes": {"data.feature_probability": [1.0, 0.1, 0.01]}},
        }
    )
    expected = [sum(0.7**i for i in range(5, 20)) * (p / 3 - p * p / 4) for p in (1.0, 0.1, 0.01)]
    np.testing.assert_allclose(T.naive_loss(spec), expected, rtol=1e-12)


def test_naive_loss_keeps_the_most_valuable_features():
    imp = torch.tensor([[1.0, 3.0, 2.0, 0.5]], dtype=D)
    cost = torch.ones_like(imp)
    np.testing.assert_allclose(T.naive_loss_from_costs(imp, cost, 2), [1.5])
    np.testing.assert_allclose(T.naive_loss_from_costs(imp, cost, 4), [0.0])
    # the neuron-computation capacity: a ReLU layer needs two neurons per signed feature for |x|
    spec = parse_spec(
        {
            "model": {"kind": "mlp", "n_features": 10, "d_hidden": 6},
            "data": {"magnitude": "signed", "feature_probability": 0.5},
            "task": {"target": "abs", "importance": 1.0},
        }
    )
    cost1 = T.dropped_feature_cost("signed", 0.5, np.abs)
    np.testing.assert_allclose(T.naive_loss(spec), [7 * cost1], rtol=1e-12)


# -- the linear model --------------------------------------------------------------------------------------------------
def _moments(magnitude: str, p: float) -> tuple[float, float]:
    return p * T.magnitude_expectation(lambda v: v, magnitude), p * T.magnitude_expectation(lambda v: v * v, magnitude)


@pytest.mark.parametrize("magnitude", ["uniform", "signed"])
def test_linear_loss_identity_with_benefit_and_interference(magnitude):
    rng = np.random.default_rng(3)
    W = torch.tensor(rng.normal(size=(4, 3, 6)), dtype=D)
    imp = torch.tensor(rng.uniform(0.2, 1.0, size=(4, 6)), dtype=D)
    p = 0.2
    mu, nu = _moments(magnitude, p)
    Mx = metrics.readout_matrix(W)
    split = metrics.loss_split(Mx, imp)
    A = torch.eye(6, dtype=D) - Mx
    identity = (nu - mu * mu) * (split.benefit + split.interference) + mu * mu * (imp * A.sum(-1) ** 2).sum(-1)
    np.testing.assert_allclose(T.linear_expected_loss(Mx, None, imp, mu, nu), identity, rtol=1e-12)
    if magnitude == "signed":  # zero-mean data, no bias: exactly E[x²]·(benefit + interference)
        np.testing.assert_allclose(
            T.linear_expected_loss(Mx, None, imp, mu, nu), nu * (split.benefit + split.interference), rtol=1e-12
        )
    # the best bias kills the mean term: b_i = μ Σ_j A_ij
    b = mu * A.sum(-1)
    np.testing.assert_allclose(
        T.linear_expected_loss(Mx, b, imp, mu, nu), (nu - mu * mu) * (split.benefit + split.interference), rtol=1e-12
    )


def test_linear_loss_against_monte_carlo_with_the_package_sampler():
    spec = parse_spec(
        {"model": {"kind": "linear", "n_features": 5, "d_hidden": 2}, "data": {"feature_probability": 0.4}}
    )
    sampler = make_sampler(spec, dtype=D)
    gen = torch.Generator().manual_seed(11)
    x = sampler.sample(400_000, gen)[:, 0]  # (batch, feats)
    rng = np.random.default_rng(5)
    W = torch.tensor(rng.normal(size=(2, 5)), dtype=D)
    b = torch.tensor(rng.normal(size=5) * 0.1, dtype=D)
    imp = torch.tensor(0.8 ** np.arange(5), dtype=D)
    Mx = W.T @ W
    per = ((x - (x @ Mx.T + b)) ** 2 * imp).sum(-1)
    mu, nu = _moments("uniform", 0.4)
    exact = float(T.linear_expected_loss(Mx, b, imp, mu, nu))
    se = float(per.std()) / np.sqrt(per.numel())
    assert abs(exact - float(per.mean())) < 4 * se


# -- 2 features in 1 dimension -----------------------------------------------------------------------------------------
def test_two_by_one_closed_forms_and_triple_point():
    r, s = T.TRIPLE_POINT
    losses = T.two_by_one_losses(r, s)
    assert float(losses.not_represented) == pytest.approx(16 / 147, rel=1e-12)
    assert float(losses.dedicated) == pytest.approx(16 / 147, rel=1e-12)
    assert float(losses.antipodal) == pytest.approx(16 / 147, rel=1e-12)
    assert float(T.two_by_one_boundary(1.0)) == pytest.approx(4 / 7, rel=1e-12)
    # both branches of the boundary are where antipodal ties the winning alternative
    for r in (0.1, 0.5, 1.0, 2.0, 10.0):
        s = float(T.two_by_one_boundary(r))
        L = T.two_by_one_losses(r, s)
        other = L.not_represented if r <= 1 else L.dedicated
        assert float(L.antipodal) == pytest.approx(float(other), rel=1e-12)
        assert int(T.two_by_one_regime(r, s * 0.99)) == 2
        assert int(T.two_by_one_regime(r, min(s * 1.01, 1.0))) == (0 if r <= 1 else 1)  # r = 1: a tie, the lower index
    assert float(T.two_by_one_boundary(0.5)) == pytest.approx(4 * 0.5 / 4.5)
    assert float(T.two_by_one_boundary(2.0)) == pytest.approx(4 / 9)


def test_config_losses_reproduce_the_two_by_one_closed_forms_exactly():
    r = np.logspace(-1, 1, 9)
    s = np.logspace(-2, 0, 9)
    imp = np.stack([np.ones_like(r), r], axis=-1)
    diag = T.analytic_phase_diagram(2, 1, imp, s, "paper")
    names = [c.name for c in diag.candidates]
    assert names == ["dedicated(2)", "dedicated(1)", "antipodal(1,2)"]
    closed = T.two_by_one_losses(r[:, None], s[None, :])
    np.testing.assert_allclose(diag.losses[..., 0], closed.dedicated, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(diag.losses[..., 1], closed.not_represented, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(diag.losses[..., 2], closed.antipodal, rtol=1e-12, atol=1e-15)
    # winner: regime 0 (feature 2 not represented) is candidate 1, regime 1 (feature 2 dedicated) is candidate 0;
    # at r = 1 those two tie, and either is a winner.
    regime = T.two_by_one_regime(r[:, None], s[None, :])
    expected = np.array([1, 0, 2])[regime]
    untied = ~np.isclose(r, 1.0)[:, None] | (regime == 2)
    np.testing.assert_array_equal(expected[untied], diag.winner[untied])
    assert diag.ties()[np.arange(9)[:, None], np.arange(9)[None, :], expected].all()


def test_config_loss_direct_matches_closed_forms():
    s, r = 0.3, 2.0
    imp = torch.tensor([1.0, r], dtype=D)
    W = torch.tensor([[1.0, -1.0]], dtype=D)
    got = T.config_loss(W, torch.zeros(2, dtype=D), imp, s)
    assert float(got.loss) == pytest.approx((1 + r) * s * s / 6, rel=1e-12)
    W = torch.tensor([[1.0, 0.0]], dtype=D)
    got = T.config_loss(W, torch.tensor([0.0, s / 2], dtype=D), imp, s)
    assert float(got.loss) == pytest.approx(r * (s / 3 - s * s / 4), rel=1e-12)


def test_free_bias_beats_the_paper_antipodal_at_full_density():
    # REFERENCE: at s = 1 a small positive bias already lowers (1 + r)/6.
    G = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=D)
    probs = T.pattern_probabilities(1.0, 2)
    b = T.best_bias(G, probs)
    loss = T.expected_loss(T.relu_output_table(G, b), probs, torch.ones(2, dtype=D))
    assert float(b[0]) > 0 and float(loss) < 2 / 6 - 0.1
    # the 1-D search finds the minimum of a brute-force scan
    bs = torch.linspace(-1, 1, 4001, dtype=D)
    scan = (probs[:, None] * T.relu_output_table(G, bs[:, None].expand(-1, 2))).sum(-2)[:, 0]
    assert float(scan.min()) >= float(loss) / 2 - 1e-9
    assert abs(float(bs[scan.argmin()]) - float(b[0])) < 1e-3


# -- exact vs Monte Carlo ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("magnitude", ["uniform", "signed"])
@pytest.mark.parametrize("p", [0.05, 0.5, 1.0])
def test_exact_relu_output_loss_agrees_with_monte_carlo(magnitude, p):
    rng = np.random.default_rng(7)
    W = torch.tensor(rng.normal(size=(3, 2, 3)), dtype=D)  # 3 configurations, 3 features in 2 dims
    b = torch.tensor(rng.normal(size=(3, 3)) * 0.3, dtype=D)
    imp = torch.tensor([[1.0, 0.5, 2.0]] * 3, dtype=D)
    exact = T.config_loss(W, b, imp, p, magnitude, "exact")
    mc = T.config_loss(W, b, imp, p, magnitude, "mc", n_samples=1 << 15, seed=3)
    assert torch.all(mc.se > 0)
    z = (exact.loss - mc.loss) / mc.se
    assert float(z.abs().max()) < 4.5, z


def test_exact_loss_covers_untied_and_pairs():
    rng = np.random.default_rng(8)
    W1 = torch.tensor(rng.normal(size=(2, 4)), dtype=D)
    W2 = torch.tensor(rng.normal(size=(4, 2)), dtype=D)
    b = torch.tensor(rng.normal(size=4) * 0.2, dtype=D)
    imp = torch.ones(4, dtype=D)
    for nc, na in ((1, 1), (2, 0), (0, 2)):
        exact = T.config_loss(W1, b, imp, 0.3, W2=W2, n_correlated=nc, n_anticorrelated=na)
        mc = T.config_loss(W1, b, imp, 0.3, W2=W2, n_correlated=nc, n_anticorrelated=na, method="mc", n_samples=1 << 14)
        assert abs(float(exact.loss - mc.loss)) < 4.5 * float(mc.se)


def test_pattern_probabilities_sum_to_one_and_respect_pairs():
    probs = T.pattern_probabilities(torch.tensor([0.1, 0.4]), 6, n_correlated=1, n_anticorrelated=1)
    np.testing.assert_allclose(probs.sum(-1), [1.0, 1.0], rtol=1e-12)
    S = T.patterns(6)
    split_corr = S[:, 0] != S[:, 1]
    both_anti = (S[:, 2] * S[:, 3]).bool()
    assert float(probs[:, split_corr | both_anti].abs().max()) == 0.0


def test_normal_magnitude_needs_monte_carlo():
    W = torch.tensor([[1.0, -1.0]], dtype=D)
    with pytest.raises(SpecError):
        T.config_loss(W, torch.zeros(2, dtype=D), torch.ones(2, dtype=D), 0.5, "normal", "exact")
    got = T.config_loss(W, torch.zeros(2, dtype=D), torch.ones(2, dtype=D), 0.5, "normal", n_samples=1 << 14)
    assert float(got.se) > 0


# -- candidates and the analytic diagram -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "m", "count"),
    [(1, 1, 2), (2, 1, 4), (2, 2, 5), (3, 1, 7), (3, 2, 14), (3, 3, 15), (4, 2, 36), (4, 3, 51)],
)
def test_candidate_counts(n, m, count):
    cands = T.candidates(n, m)
    assert len(cands) == count
    grams = {np.round(c.gram, 9).tobytes() for c in cands}
    assert len(grams) == count  # no configuration twice
    for c in cands:
        assert c.W.shape == (m, n)
        norms = np.linalg.norm(c.W, axis=0)
        np.testing.assert_allclose(norms[list(c.represented)], 1.0, rtol=1e-12)


def test_maximal_candidates_three_in_two():
    names = [c.name for c in T.candidates(3, 2, maximal=True)]
    assert len(names) == 7
    assert "triangle(1,2,3)" in names
    assert sum(n.startswith("antipodal") or "+antipodal" in n for n in names) == 3
    tri = next(c for c in T.candidates(3, 2) if c.name == "triangle(1,2,3)")
    off = tri.gram[~np.eye(3, dtype=bool)]
    np.testing.assert_allclose(off, -0.5, atol=1e-12)
    # the tetrahedron is generated for 4 features in 3 dims
    tet = next(c for c in T.candidates(4, 3) if c.name == "simplex-4(1,2,3,4)")
    np.testing.assert_allclose(tet.gram[~np.eye(4, dtype=bool)], -1 / 3, atol=1e-12)


def test_classify_geometry_recovers_candidates_under_rotation_and_rescaling():
    cands = T.candidates(3, 2)
    rng = np.random.default_rng(0)
    Ws = []
    for c in cands:
        a = rng.uniform(0, 2 * np.pi)
        R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        scale = rng.uniform(0.8, 1.2, size=3)
        Ws.append(R @ c.W * scale + rng.normal(scale=0.03, size=c.W.shape))
    got = T.classify_geometry(torch.tensor(np.stack(Ws)), cands)
    assert got.tolist() == list(range(len(cands)))


def test_triangle_loses_to_antipodal_plus_dedicated_at_leading_order():
    # Pairwise interference by hand: the triangle pays (2 + r)/8 · p², the antipodal pair (1 + r)/6 or 1/3.
    p = 1e-3
    r = np.array([0.3, 1.0, 3.0])
    imp = np.stack([np.ones_like(r), np.ones_like(r), r], axis=-1)
    diag = T.analytic_phase_diagram(3, 2, imp, np.array([p]), "paper")
    names = [c.name for c in diag.candidates]
    tri = diag.losses[:, 0, names.index("triangle(1,2,3)")]
    anti12 = diag.losses[:, 0, names.index("antipodal(1,2)+dedicated(3)")]
    anti13 = diag.losses[:, 0, names.index("antipodal(1,3)+dedicated(2)")]
    np.testing.assert_allclose(tri / p**2, (2 + r) / 8, rtol=2e-3)
    np.testing.assert_allclose(anti12 / p**2, np.full(3, 1 / 3), rtol=2e-3)
    np.testing.assert_allclose(anti13 / p**2, (1 + r) / 6, rtol=2e-3)


def test_free_convention_never_worse_than_bias_convention():
    r = np.array([0.5, 2.0])
    imp = np.stack([np.ones_like(r), r], axis=-1)
    s = np.array([0.2, 0.9])
    bias = T.analytic_phase_diagram(2, 1, imp, s, "bias")
    free = T.analytic_phase_diagram(2, 1, imp, s, "free", free_steps=60)
    assert np.all(free.losses <= bias.losses + 1e-15)
    assert np.all(free.norms[free.norms > 0] >= T.NORM_FLOOR - 1e-12)
    # at s = 0.9, r = 0.5 the freed antipodal pair improves noticeably
    assert free.losses[0, 1, 2] < bias.losses[0, 1, 2] * 0.9


def test_open_convention_deforms_the_triangle():
    # r = 0.76, density 0.6: training finds a triangle with angles near 100°, 130°, 130° (docs/phase-changes.md)
    imp = np.array([[1.0, 1.0, 0.76]])
    tri = [c for c in T.candidates(3, 2) if c.name == "triangle(1,2,3)"]
    opened = T.analytic_phase_diagram(3, 2, imp, np.array([0.6]), "open", cands=tri, free_steps=150)
    assert np.isfinite(opened.losses[0, 0, 0])  # the optimum started at the triangle stays a triangle
    W = opened.weights[0, 0, 0]
    U = W / np.linalg.norm(W, axis=0)
    angle12 = np.degrees(np.arccos(U[:, 0] @ U[:, 1]))
    assert 95 < angle12 < 110  # features 1 and 2 closer than 120°, feature 3 pushed away
    assert opened.norms[0, 0, 0, 2] < 0.8 * opened.norms[0, 0, 0, 0]
    fixed = T.analytic_phase_diagram(3, 2, imp, np.array([0.6]), "free", cands=tri, free_steps=150)
    assert opened.losses[0, 0, 0] < fixed.losses[0, 0, 0]
