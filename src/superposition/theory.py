"""Closed forms and exact expected losses: naive baselines, the linear loss identity, phase diagrams.

Conventions. Losses here are the paper's: a **sum** over features, Σ_i I_i E[(y_i − x'_i)²]. A run's ``loss`` column
is the mean over features, i.e. this sum divided by n_features. Data: each feature is active with probability p
(independent, or in correlated / anticorrelated pairs), an active feature's value follows the magnitude law
(``uniform`` U[0,1], ``signed`` U[−1,1], ``normal`` clip(0.5 + 0.2·N(0,1), 0, 1)).

Exact expected loss of the ReLU-output model. For x' = ReLU(M x + b) (M = WᵀW tied, W2·W1 untied) the loss splits
over activity patterns S ⊆ features: L = Σ_S P(S) Σ_i I_i L_{S,i}, where L_{S,i} = E[(y_i − (T)_+)²] with
T = b_i + Σ_{j∈S} M_ij x_j, y_i = x_i·[i ∈ S]. L_{S,i} does not depend on p or on the importance, so one table per
configuration serves a whole (importance, density) grid. For uniform (and signed) magnitudes every term is a
truncated-power expectation of a sum of scaled uniforms, which has the closed form

    E[(β + Σ_{j≤k} c_j U_j)_+^m] = m!/(m+k)! · Σ_{ε∈{0,1}^k} (−1)^{k−|ε|} (β + ε·c)_+^{m+k} / Π_j c_j

(integrate the truncated power once per variable; coefficients with |c_j| ≤ ``tol`` = 1e-4 are treated as 0, which
errs by O(tol)). E[x_i T_+] follows by integrating by parts in x_i. Where no closed form is at hand (the ``normal``
law) :func:`mc_loss_table` estimates the same table by Monte Carlo, stratified by pattern, with standard errors.

Best bias: the loss is separable in b (output i sees only b_i), and b_i* depends on p but not on the importance:
:func:`best_bias` does a 1-D search per output (a 161-point grid, then 40 golden-section steps in the best bracket).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from superposition.spec import Experiment, SpecError

__all__ = [
    "magnitude_expectation",
    "dropped_feature_cost",
    "naive_loss_from_costs",
    "naive_loss",
    "tmcc_naive_loss",
    "linear_expected_loss",
    "TwoByOne",
    "two_by_one_losses",
    "two_by_one_regime",
    "two_by_one_boundary",
    "TWO_BY_ONE_REGIMES",
    "TRIPLE_POINT",
    "patterns",
    "pattern_probabilities",
    "relu_output_table",
    "MCTable",
    "mc_loss_table",
    "expected_loss",
    "ConfigLoss",
    "config_loss",
    "best_bias",
    "Candidate",
    "candidates",
    "classify_geometry",
    "symmetry_classes",
    "NORM_FLOOR",
    "PhaseDiagram",
    "analytic_phase_diagram",
    "CONVENTIONS",
]

DTYPE = torch.float64
MAGNITUDES = ("uniform", "signed", "normal")
_NORMAL_MEAN, _NORMAL_STD = 0.5, 0.2


# -- the data law ---------------------------------------------------------------------------------------------------
def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def magnitude_expectation(fn: Callable[[np.ndarray], np.ndarray], magnitude: str) -> float:
    """E[fn(v)] for the value v of an active feature (Gauss–Legendre, split at 0; exact for piecewise cubics).

    ``fn`` must be vectorised over a numpy array and smooth on each side of 0 (ReLU, |.|, powers).
    """
    nodes, weights = np.polynomial.legendre.leggauss(48)

    def integrate(lo: float, hi: float, density: Callable[[np.ndarray], np.ndarray]) -> float:
        v = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
        return float(0.5 * (hi - lo) * np.sum(weights * fn(v) * density(v)))

    if magnitude == "uniform":
        return integrate(0.0, 1.0, np.ones_like)
    if magnitude == "signed":
        half = lambda v: np.full_like(v, 0.5)  # noqa: E731
        return integrate(-1.0, 0.0, half) + integrate(0.0, 1.0, half)
    if magnitude == "normal":
        tail = _phi(-_NORMAL_MEAN / _NORMAL_STD)  # mass clipped to 0 and (by symmetry) to 1

        def dens(v: np.ndarray) -> np.ndarray:
            z = (v - _NORMAL_MEAN) / _NORMAL_STD
            return np.exp(-0.5 * z * z) / (_NORMAL_STD * math.sqrt(2 * math.pi))

        atoms = tail * float(fn(np.array([0.0]))[0]) + tail * float(fn(np.array([1.0]))[0])
        return atoms + integrate(0.0, 0.5, dens) + integrate(0.5, 1.0, dens)
    raise SpecError(f"magnitude: unknown law {magnitude!r} (allowed: {', '.join(MAGNITUDES)})")


def dropped_feature_cost(
    magnitude: str,
    p: float,
    label: Callable[[np.ndarray], np.ndarray] = lambda v: v,
    bias: bool = True,
    relu_out: bool = True,
) -> float:
    """min_c E[(y − c)²] for a feature the model does not represent: y = label(x), x = 0 w.p. 1 − p.

    The best constant is c = E[y] (clipped at 0 behind an output ReLU) when the output has a bias, else c = 0.
    Requires label(0) = 0. For U[0,1] and the identity: p/3 − p²/4 with a bias, p/3 without.
    """
    m1 = p * magnitude_expectation(label, magnitude)
    m2 = p * magnitude_expectation(lambda v: label(v) ** 2, magnitude)
    c = (max(m1, 0.0) if relu_out else m1) if bias else 0.0
    return m2 - 2 * c * m1 + c * c


def naive_loss_from_costs(
    importance: Float[Tensor, "*batch feats"], cost: Float[Tensor, "*batch feats"], d: int
) -> Float[Tensor, " *batch"]:
    """Σ over dropped features of I_i·cost_i, keeping (at zero loss) the d features with the largest I_i·cost_i."""
    value = importance * cost
    n = value.shape[-1]
    if d >= n:
        return torch.zeros(value.shape[:-1], dtype=value.dtype)
    return value.sort(dim=-1).values[..., : n - d].sum(dim=-1)


def _capacity(spec: Experiment) -> int:
    """How many features the model can represent exactly: one per hidden dimension / neuron, or one per two
    neurons when a ReLU hidden layer must pass both signs of a signed feature."""
    m, t = spec.model, spec.task
    width = m.d_hidden * (m.n_layers if m.kind == "residual-mlp" else 1)
    if m.kind in ("neuron", "mlp", "residual-mlp") and spec.data.magnitude == "signed":
        residual = 1.0 if (m.kind == "residual-mlp" and m.skip) else 0.0
        linear_part = {"identity": 1.0, "abs": 1.0, "relu-plus-x": t.residual_factor - residual}[t.target]
        both_signs = t.target == "abs" or abs(linear_part) > 0
        if both_signs:
            return width // 2
    return width


def naive_loss(spec: Experiment) -> np.ndarray:
    """Per-instance naive loss (sum over features): keep the d most valuable features exactly, drop the rest.

    d is the capacity (hidden width; halved where a ReLU layer must pass both signs), a dropped feature costs
    I_i · min_c E[(y_i − c)²] (see :func:`dropped_feature_cost`; for the residual MLP with skip connection the residual
    stream already carries x, so the label left to the MLP is ReLU(x) + (k − 1)x). NaN where the data law has no such
    baseline (hierarchy data, unit-normalised points).
    """
    from superposition.data import importance_tensor

    n = spec.model.n_features
    if spec.data.kind == "hierarchy" or spec.data.normalize:
        return np.full(spec.n_instances, np.nan)
    m, t = spec.model, spec.task
    relu_out = m.kind != "linear" and m.kind != "residual-mlp"
    bias = bool(m.bias_out)
    residual = m.kind == "residual-mlp" and m.skip
    probs = spec.instance_values("data.feature_probability")
    factors = spec.instance_values("task.residual_factor")
    imp = importance_tensor(spec, dtype=DTYPE)
    costs = []
    cache: dict[tuple[float, float], float] = {}
    for p, k in zip(probs, factors, strict=True):
        key = (float(p), float(k))
        if key not in cache:
            label = _label(t.target, float(k) - (1.0 if residual else 0.0))
            cache[key] = dropped_feature_cost(spec.data.magnitude, float(p), label, bias=bias, relu_out=relu_out)
        costs.append(cache[key])
    cost = torch.tensor(costs, dtype=DTYPE)[:, None].expand(-1, n)
    return naive_loss_from_costs(imp, cost, _capacity(spec)).numpy()


def _label(target: str, k: float) -> Callable[[np.ndarray], np.ndarray]:
    if target == "identity":
        return lambda v: v
    if target == "abs":
        return np.abs
    return lambda v: np.maximum(v, 0.0) + k * v


def tmcc_naive_loss(n: int, d: int, p: float) -> float:
    """TMCC's naive loss per feature: d of n features computed exactly, the rest cost E[ReLU(x)²] = p/6 each
    (x ~ U[−1, 1] w.p. p, no biases): (n − d)/n · p/6, i.e. L/p = 0.0833 at n = 100, d = 50."""
    return max(n - d, 0) / n * p / 6


# -- the linear model ---------------------------------------------------------------------------------------------
def linear_expected_loss(
    M: Float[Tensor, "*batch feats feats"],
    b: Float[Tensor, "*batch feats"] | None,
    importance: Float[Tensor, "*batch feats"],
    mean: float | Float[Tensor, "*batch feats"],
    second: float | Float[Tensor, "*batch feats"],
) -> Float[Tensor, " *batch"]:
    """Σ_i I_i E[(x_i − (M x + b)_i)²] for independent features with E[x_j] = mean, E[x_j²] = second.

    With A = I − M: E[(A_i·x − b_i)²] = Σ_j A_ij² Var(x_j) + (Σ_j A_ij E[x_j] − b_i)². When all features share one
    law this is σ²·(benefit + interference) + Σ_i I_i (μ Σ_j A_ij − b_i)² (see ``metrics.loss_split``).
    """
    n = M.shape[-1]
    A = torch.eye(n, dtype=M.dtype, device=M.device) - M
    mean_t = torch.as_tensor(mean, dtype=M.dtype, device=M.device)
    second_t = torch.as_tensor(second, dtype=M.dtype, device=M.device)
    var = second_t - mean_t.square()
    var_j = var.unsqueeze(-2) if var.dim() else var
    mean_j = mean_t.unsqueeze(-2) if mean_t.dim() else mean_t
    spread = (A.square() * var_j).sum(dim=-1)
    offset = (A * mean_j).sum(dim=-1)
    if b is not None:
        offset = offset - b
    return (importance * (spread + offset.square())).sum(dim=-1)


# -- the 2-features-in-1-dimension toy model of the toy model -------------------------------------------------------
TWO_BY_ONE_REGIMES = ("not represented", "dedicated", "antipodal")
"""Regimes of feature 2 (index 0, 1, 2 in :func:`two_by_one_regime`)."""
TRIPLE_POINT = (1.0, 4.0 / 7.0)
"""(relative importance r, density s) where the three regimes meet."""


class TwoByOne(NamedTuple):
    """Closed-form losses (sum over the 2 features) of the three 2×1 solutions (paper conventions)."""

    not_represented: np.ndarray
    """W = (1, 0), feature 2 at its best bias s/2: r(s/3 − s²/4)."""
    dedicated: np.ndarray
    """W = (0, 1), feature 1 dropped at bias s/2: s/3 − s²/4."""
    antipodal: np.ndarray
    """W = (1, −1), b = 0: (1 + r)s²/6."""


def two_by_one_losses(r: np.ndarray | float, s: np.ndarray | float) -> TwoByOne:
    """Feature 1 importance 1, feature 2 importance r, density s, U[0,1] magnitudes (broadcasts r against s)."""
    r, s = np.broadcast_arrays(np.asarray(r, dtype=float), np.asarray(s, dtype=float))
    dropped = s / 3 - s**2 / 4
    return TwoByOne(r * dropped, dropped.copy(), (1 + r) * s**2 / 6)


def two_by_one_regime(r: np.ndarray | float, s: np.ndarray | float) -> np.ndarray:
    """Index into TWO_BY_ONE_REGIMES of the lowest closed-form loss (ties go to the lower index)."""
    return np.stack(two_by_one_losses(r, s), axis=-1).argmin(axis=-1)


def two_by_one_boundary(r: np.ndarray | float) -> np.ndarray:
    """Density below which the antipodal pair wins: 4r/(5r + 2) for r ≤ 1, 4/(5 + 2r) for r ≥ 1."""
    r = np.asarray(r, dtype=float)
    return np.where(r <= 1, 4 * r / (5 * r + 2), 4 / (5 + 2 * r))


# -- exact expected loss of the ReLU-output model ------------------------------------------------------------------
def patterns(n: int) -> Float[Tensor, "patterns feats"]:
    """All 2^n activity patterns as a 0/1 table; row s has feature j active iff bit j of s is set."""
    if n > 12:
        raise SpecError(f"n_features: exact and stratified losses enumerate 2^n patterns; n = {n} is too many (≤ 12)")
    s = torch.arange(2**n)
    return ((s[:, None] >> torch.arange(n)[None, :]) & 1).to(DTYPE)


def pattern_probabilities(
    p: Float[Tensor, "*batch"] | float, n: int, n_correlated: int = 0, n_anticorrelated: int = 0
) -> Float[Tensor, "*batch patterns"]:
    """P(S) for every pattern: correlated pairs (columns first) share one draw, anticorrelated pairs are never on
    together (A w.p. p, B w.p. p), the rest are independent with probability p."""
    p = torch.as_tensor(p, dtype=DTYPE)
    S = patterns(n)
    pp = p.unsqueeze(-1)
    on = S * pp.unsqueeze(-1) + (1 - S) * (1 - pp.unsqueeze(-1))  # (*batch, patterns, feats)
    prob = torch.ones(on.shape[:-1], dtype=DTYPE)
    col = 0
    for _ in range(n_correlated):
        a, b = S[:, col], S[:, col + 1]
        prob = prob * torch.where(a == b, on[..., col], torch.zeros_like(prob))
        col += 2
    for _ in range(n_anticorrelated):
        a, b = S[:, col], S[:, col + 1]
        both, none = (a * b).bool(), ((1 - a) * (1 - b)).bool()
        prob = prob * torch.where(both, torch.zeros_like(prob), torch.where(none, 1 - 2 * pp, pp))
        col += 2
    for j in range(col, n):
        prob = prob * on[..., j]
    return prob


_SUBSETS: dict[tuple[int, str], Tensor] = {}


def _subsets(k: int, device: torch.device) -> Tensor:
    key = (k, str(device))
    if key not in _SUBSETS:
        table = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)), dtype=DTYPE, device=device)
        _SUBSETS[key] = table.reshape(-1, k)
    return _SUBSETS[key]


def _trunc_power(beta: Tensor, c: Tensor, m: int, tol: float) -> Tensor:
    """E[(β + Σ_j c_j U_j)_+^m], U_j ~ U[0,1] iid; c (..., k), β (...) (see the module docstring)."""
    k = c.shape[-1]
    nz = c.abs() > tol
    kp = nz.sum(dim=-1)
    c_safe = torch.where(nz, c, torch.ones_like(c))
    eps = _subsets(k, c.device)  # (2^k, k)
    inv = (1.0 / c_safe).unsqueeze(-2)  # (..., 1, k)
    on = eps > 0
    w = torch.where(nz.unsqueeze(-2), torch.where(on, inv, -inv), torch.where(on, 0.0, 1.0).to(c.dtype))
    weight = w.prod(dim=-1)  # (..., 2^k)
    arg = beta.unsqueeze(-1) + (torch.where(nz, c, torch.zeros_like(c)).unsqueeze(-2) * eps).sum(dim=-1)
    power = (m + kp).to(c.dtype).unsqueeze(-1)
    coef = torch.exp(math.lgamma(m + 1.0) - torch.lgamma(m + kp.to(c.dtype) + 1))
    return coef * (weight * arg.clamp_min(0) ** power).sum(dim=-1)


def relu_output_table(
    M: Float[Tensor, "*batch feats feats"],
    b: Float[Tensor, "*batch feats"],
    magnitude: str = "uniform",
    tol: float = 1e-4,
) -> Float[Tensor, "*batch patterns feats"]:
    """Exact L_{S,i} = E[(y_i − ReLU(Σ_{j∈S} M_ij x_j + b_i))² | pattern S] for uniform or signed magnitudes."""
    if magnitude not in ("uniform", "signed"):
        raise SpecError(f"magnitude: no closed form for {magnitude!r}; use mc_loss_table")
    M = torch.as_tensor(M, dtype=DTYPE)
    b = torch.as_tensor(b, dtype=DTYPE)
    n = M.shape[-1]
    batch = torch.broadcast_shapes(M.shape[:-2], b.shape[:-1])
    M, b = M.expand(*batch, n, n), b.expand(*batch, n)
    S = patterns(n)  # (P, n)
    c = M.unsqueeze(-3) * S[:, None, :]  # (..., P, i, j): only active inputs reach output i
    beta = b.unsqueeze(-2).expand(c.shape[:-1])
    if magnitude == "signed":  # x = 2U − 1
        beta = beta - c.sum(dim=-1)
        c = 2 * c
    eye = torch.eye(n, dtype=DTYPE)
    ci = (c * eye).sum(dim=-1)  # coefficient of the output's own input
    cR = c * (1 - eye)
    ET1 = _trunc_power(beta, c, 1, tol)
    ET2 = _trunc_power(beta, c, 2, tol)
    big = ci.abs() > tol
    cs = torch.where(big, ci, torch.ones_like(ci))
    by_parts = _trunc_power(beta + ci, cR, 2, tol) / (2 * cs) - (
        _trunc_power(beta + ci, cR, 3, tol) - _trunc_power(beta, cR, 3, tol)
    ) / (6 * cs * cs)
    EUT = torch.where(big, by_parts, 0.5 * _trunc_power(beta, cR, 1, tol))  # E[U_i T_+]
    EyT = EUT if magnitude == "uniform" else 2 * EUT - ET1
    active = S.bool()  # (P, n): i ∈ S
    return torch.where(active, 1.0 / 3.0 - 2 * EyT + ET2, ET2)


class MCTable(NamedTuple):
    """Monte Carlo estimate of the pattern table, with what the standard error of a mixture needs."""

    mean: Float[Tensor, "*batch patterns feats"]
    """Sample mean of (y_i − x'_i)² given the pattern."""
    cov: Float[Tensor, "*batch patterns feats feats"]
    """Sample covariance over outputs of the per-sample squared errors, given the pattern."""
    n_samples: int


def _sample_magnitudes(shape: tuple[int, ...], magnitude: str, gen: torch.Generator) -> Tensor:
    u = torch.rand(shape, generator=gen, dtype=DTYPE)
    if magnitude == "uniform":
        return u
    if magnitude == "signed":
        return 2 * u - 1
    if magnitude == "normal":
        return (_NORMAL_MEAN + _NORMAL_STD * torch.randn(shape, generator=gen, dtype=DTYPE)).clamp(0, 1)
    raise SpecError(f"magnitude: unknown law {magnitude!r} (allowed: {', '.join(MAGNITUDES)})")


def mc_loss_table(
    M: Float[Tensor, "*batch feats feats"],
    b: Float[Tensor, "*batch feats"],
    magnitude: str = "uniform",
    n_samples: int = 1 << 16,
    seed: int = 0,
    chunk: int = 1 << 13,
) -> MCTable:
    """Stratified Monte Carlo of the pattern table: ``n_samples`` seeded draws per pattern, shared by every
    configuration in the batch (common random numbers, so differences between configurations are sharp)."""
    M = torch.as_tensor(M, dtype=DTYPE)
    b = torch.as_tensor(b, dtype=DTYPE)
    n = M.shape[-1]
    S = patterns(n)
    gen = torch.Generator().manual_seed(seed)
    batch = M.shape[:-2]
    total = torch.zeros((*batch, S.shape[0], n), dtype=DTYPE)
    outer = torch.zeros((*batch, S.shape[0], n, n), dtype=DTYPE)
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        x = _sample_magnitudes((S.shape[0], k, n), magnitude, gen) * S[:, None, :]  # (P, k, n)
        pre = torch.einsum("...ij,pkj->...pki", M, x) + b.unsqueeze(-2).unsqueeze(-2)
        err = (x - pre.clamp_min(0)).square()  # (..., P, k, n)
        total += err.sum(dim=-2)
        outer += torch.einsum("...pki,...pkj->...pij", err, err)
        done += k
    mean = total / n_samples
    cov = (outer / n_samples - mean.unsqueeze(-1) * mean.unsqueeze(-2)) * (n_samples / max(n_samples - 1, 1))
    return MCTable(mean, cov, n_samples)


def expected_loss(
    table: Float[Tensor, "*batch patterns feats"],
    probs: Float[Tensor, "*batch patterns"],
    importance: Float[Tensor, "*batch feats"],
) -> Float[Tensor, " *batch"]:
    """Σ_S P(S) Σ_i I_i L_{S,i} (broadcasting the leading dimensions)."""
    return ((probs.unsqueeze(-1) * table).sum(dim=-2) * importance).sum(dim=-1)


def _mc_standard_error(mc: MCTable, probs: Tensor, importance: Tensor) -> Tensor:
    var_s = torch.einsum("...i,...pij,...j->...p", importance, mc.cov, importance)
    return ((probs.square() * var_s).sum(dim=-1) / mc.n_samples).clamp_min(0).sqrt()


class ConfigLoss(NamedTuple):
    """Expected loss of configurations (sum over features) and its Monte Carlo standard error (0 when exact)."""

    loss: Tensor
    se: Tensor


def config_loss(
    W: Float[Tensor, "*batch hidden feats"],
    b: Float[Tensor, "*batch feats"],
    importance: Float[Tensor, "*batch feats"],
    p: Float[Tensor, "*batch"] | float,
    magnitude: str = "uniform",
    method: str = "auto",
    n_correlated: int = 0,
    n_anticorrelated: int = 0,
    W2: Float[Tensor, "*batch feats hidden"] | None = None,
    n_samples: int = 1 << 16,
    seed: int = 0,
) -> ConfigLoss:
    """Expected loss Σ_i I_i E[(x_i − ReLU(M x + b)_i)²] of ReLU-output configurations under a data law.

    ``method``: ``exact`` (uniform / signed magnitudes), ``mc`` (stratified Monte Carlo, ``n_samples`` per pattern,
    standard error returned), or ``auto`` (exact where a closed form exists).
    """
    W = torch.as_tensor(W, dtype=DTYPE)
    M = W.transpose(-1, -2) @ W if W2 is None else torch.as_tensor(W2, dtype=DTYPE) @ W
    n = M.shape[-1]
    probs = pattern_probabilities(p, n, n_correlated, n_anticorrelated)
    importance = torch.as_tensor(importance, dtype=DTYPE)
    if method == "auto":
        method = "exact" if magnitude in ("uniform", "signed") else "mc"
    if method == "exact":
        loss = expected_loss(relu_output_table(M, b, magnitude), probs, importance)
        return ConfigLoss(loss, torch.zeros_like(loss))
    if method != "mc":
        raise SpecError(f"method: unknown {method!r} (allowed: auto, exact, mc)")
    mc = mc_loss_table(M, b, magnitude, n_samples, seed)
    return ConfigLoss(expected_loss(mc.mean, probs, importance), _mc_standard_error(mc, probs, importance))


def best_bias(
    M: Float[Tensor, "*batch feats feats"],
    probs: Float[Tensor, "*batch patterns"],
    magnitude: str = "uniform",
    grid: int = 161,
    iters: int = 40,
) -> Float[Tensor, "*batch feats"]:
    """The bias minimising the exact expected loss, per output (the problem is separable in b).

    1-D search per output: a ``grid``-point scan of [−Σ_j|M_ij|·s − 0.1, 1.1] (s = 2 for signed magnitudes; below
    the lower end the output is always 0), then ``iters`` golden-section steps in the bracket around the best point.
    Independent of the importance. Broadcasts M against probs.
    """
    M = torch.as_tensor(M, dtype=DTYPE)
    probs = torch.as_tensor(probs, dtype=DTYPE)
    n = M.shape[-1]
    scale = 2.0 if magnitude == "signed" else 1.0
    lo = -(M.abs().sum(dim=-1) * scale).amax(dim=-1) - 0.1  # (*batchM)
    hi = torch.full_like(lo, 1.1)
    t = torch.linspace(0, 1, grid, dtype=DTYPE)
    bs = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * t  # (*batchM, grid)

    def f(bvals: Tensor, Mx: Tensor, pr: Tensor) -> Tensor:
        # bvals (..., K, n): per-output bias candidates; returns per-output expected loss (..., K, n)
        table = relu_output_table(Mx.unsqueeze(-3), bvals, magnitude)  # (..., K, P, n)
        return (pr.unsqueeze(-2).unsqueeze(-1) * table).sum(dim=-2)

    vals = f(bs.unsqueeze(-1).expand(*bs.shape, n), M, probs)  # (..., grid, n)
    k = vals.argmin(dim=-2)  # (..., n)
    step = ((hi - lo) / (grid - 1)).unsqueeze(-1)
    centre = lo.unsqueeze(-1) + step * k.to(DTYPE)
    a, c = centre - step, centre + step
    g = (math.sqrt(5) - 1) / 2
    Mb = M.expand(*vals.shape[:-2], n, n) if M.dim() < vals.dim() + 1 else M
    for _ in range(iters):
        x1, x2 = c - g * (c - a), a + g * (c - a)
        both = f(torch.stack([x1, x2], dim=-2), Mb, probs)
        left = both[..., 0, :] <= both[..., 1, :]
        c = torch.where(left, x2, c)
        a = torch.where(left, a, x1)
    refined = 0.5 * (a + c)
    # Keep the grid point if the refinement did not improve on it (non-smooth brackets).
    fin = f(torch.stack([refined, centre], dim=-2), Mb, probs)
    return torch.where(fin[..., 0, :] <= fin[..., 1, :], refined, centre)


# -- candidate configurations and the analytic phase diagram ---------------------------------------------------------
class Candidate(NamedTuple):
    """A configuration of n features in m dimensions: groups in mutually orthogonal subspaces, the rest dropped."""

    name: str
    """Readable label, e.g. ``antipodal(1,3)+dedicated(2)`` (features numbered from 1)."""
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    """(kind, features) per group; kind is dedicated, antipodal, triangle, polygon-k or simplex-k."""
    W: np.ndarray
    """(m, n) unit-norm embedding; dropped features are zero columns."""

    @property
    def gram(self) -> np.ndarray:
        """WᵀW (n, n)."""
        return self.W.T @ self.W

    @property
    def represented(self) -> tuple[int, ...]:
        return tuple(sorted(f for _, fs in self.groups for f in fs))


def _group_shapes(k: int, max_polygon: int) -> list[tuple[str, int, np.ndarray]]:
    """(kind, dims, vectors (dims, k)) for the regular arrangements of k features."""
    out: list[tuple[str, int, np.ndarray]] = []
    if k == 1:
        out.append(("dedicated", 1, np.ones((1, 1))))
    elif k == 2:
        out.append(("antipodal", 1, np.array([[1.0, -1.0]])))
    else:
        # Regular simplex of k features in k − 1 dims (triangle, tetrahedron, ...): centred standard basis.
        E = np.eye(k) - 1.0 / k
        U, s, _ = np.linalg.svd(E)
        V = (U[:, : k - 1] * s[: k - 1]).T  # (k-1, k)
        V = V / np.linalg.norm(V, axis=0, keepdims=True)
        out.append(("triangle" if k == 3 else f"simplex-{k}", k - 1, V))
        if 5 <= k <= max_polygon:
            ang = 2 * np.pi * np.arange(k) / k
            out.append((f"polygon-{k}", 2, np.stack([np.cos(ang), np.sin(ang)])))
    return out


def candidates(n: int, m: int, max_group: int | None = None, max_polygon: int = 8, maximal: bool = False):
    """Every configuration of n features in m dimensions built from groups in orthogonal subspaces: each feature
    dropped, dedicated (1 dim), in an antipodal pair (1 dim), in a regular simplex of k ≥ 3 (k − 1 dims: triangle,
    tetrahedron, ...) or a regular k-gon, 5 ≤ k ≤ ``max_polygon`` (2 dims; the square is two antipodal pairs).

    ``maximal`` keeps only configurations that cannot take one more dedicated feature (a dropped feature and a free
    dimension): adding one never raises the loss, so the others never win strictly. Orientation and the order of
    groups are immaterial (only WᵀW matters); each configuration appears once. Returns a list of :class:`Candidate`.
    """
    if n < 1 or m < 1:
        raise SpecError(f"candidates: need n ≥ 1 and m ≥ 1 (got n={n}, m={m})")
    max_group = n if max_group is None else max_group
    shapes = {k: _group_shapes(k, max_polygon) for k in range(1, max_group + 1)}
    found: list[list[tuple[str, tuple[int, ...], int, np.ndarray]]] = []

    def rec(i: int, free: tuple[int, ...], dims: int, acc: list) -> None:
        if i == n:
            found.append(list(acc))
            return
        if i not in free:
            rec(i + 1, free, dims, acc)
            return
        rest = tuple(f for f in free if f != i)
        rec(i + 1, rest, dims, acc)  # feature i dropped
        for k in range(1, max_group + 1):
            for others in itertools.combinations([f for f in rest if f > i], k - 1):
                members = (i, *others)
                left = tuple(f for f in rest if f not in others)
                for kind, d, V in shapes[k]:
                    if dims + d <= m:
                        acc.append((kind, members, d, V))
                        rec(i + 1, left, dims + d, acc)
                        acc.pop()

    rec(0, tuple(range(n)), 0, [])
    out = []
    for groups in found:
        W = np.zeros((m, n))
        row = 0
        for _, members, d, V in groups:
            W[row : row + d, list(members)] = V
            row += d
        used = row
        dropped = n - sum(len(g[1]) for g in groups)
        if maximal and dropped and used < m:
            continue
        name = "+".join(f"{kind}({','.join(str(f + 1) for f in members)})" for kind, members, _, _ in groups)
        out.append(Candidate(name or "none", tuple((kind, members) for kind, members, _, _ in groups), W))
    return out


CONVENTIONS = ("paper", "bias", "free", "open")
"""How each candidate's free parameters are set: ``paper`` unit norms, b = 0 for represented features and the best
constant E[x_i] for dropped ones; ``bias`` unit norms and the best bias per output (:func:`best_bias`); ``free`` norms
of the represented features (kept ≥ NORM_FLOOR, so that the configuration stays in its class) and all biases
optimised by Adam on the exact loss, from the ``bias`` solution. Directions stay those of the candidate; ``open``
the whole W and b optimised by Adam from every candidate's ``bias`` solution, each optimum classified by its geometry
(:func:`classify_geometry`), and a candidate's loss is the lowest among the optima that land in it (inf if none does):
the local minima that gradient descent reaches, with deformed polygons (a triangle with unequal angles) allowed."""
NORM_FLOOR = 0.5
"""Represented means ‖W_i‖ > 0.5 (as ``metrics.n_represented``)."""


def classify_geometry(
    W: Float[Tensor, "*batch hidden feats"], cands: list[Candidate], threshold: float = NORM_FLOOR
) -> Tensor:
    """Index of the nearest candidate per configuration: represented columns (‖W_i‖ > threshold) are scaled to unit
    length, the others zeroed, and the Gram matrix is compared with each candidate's (Frobenius distance)."""
    W = torch.as_tensor(W, dtype=DTYPE)
    norms = W.norm(dim=-2, keepdim=True)
    U = torch.where(norms > threshold, W / norms.clamp_min(1e-12), torch.zeros_like(W))
    G = U.transpose(-1, -2) @ U
    Gc = torch.tensor(np.stack([c.gram for c in cands]), dtype=DTYPE)
    dist = (G.unsqueeze(-3) - Gc).square().sum(dim=(-2, -1))
    return dist.argmin(dim=-1)


def symmetry_classes(cands: list[Candidate], importances: np.ndarray) -> np.ndarray:
    """For each candidate, the index of the first candidate it equals up to a permutation of features that have the
    same importance in every row (with I = (1, 1, r), dropping feature 1 or feature 2 is one regime)."""
    imp = np.asarray(importances, dtype=np.float64)
    n = imp.shape[1]
    perms = [q for q in itertools.permutations(range(n)) if np.array_equal(imp[:, list(q)], imp)]
    keys = {np.round(c.gram, 9).tobytes(): k for k, c in reversed(list(enumerate(cands)))}
    out = np.arange(len(cands))
    for k, c in enumerate(cands):
        for q in perms:
            g = np.round(c.gram[np.ix_(q, q)], 9).tobytes()
            if g in keys:
                out[k] = min(out[k], keys[g])
    return out


class PhaseDiagram(NamedTuple):
    """Expected loss of every candidate over an (importance, density) grid and the winner per cell."""

    candidates: list[Candidate]
    importances: np.ndarray
    """(R, n): one importance vector per row of the grid."""
    probabilities: np.ndarray
    """(P,): densities, one per column."""
    losses: np.ndarray
    """(R, P, K): expected loss (sum over features) of each candidate."""
    winner: np.ndarray
    """(R, P): index of the lowest-loss candidate."""
    gap: np.ndarray
    """(R, P): second-best minus best loss (how decisive the cell is)."""
    biases: np.ndarray
    """(R, P, K, n): biases used."""
    norms: np.ndarray
    """(R, P, K, n): feature norms used."""
    convention: str
    weights: np.ndarray | None = None
    """(R, P, K, m, n): the optimised W of each candidate's class (``open`` convention only)."""

    def winner_names(self) -> np.ndarray:
        return np.array([c.name for c in self.candidates], dtype=object)[self.winner]

    def ties(self, rtol: float = 1e-9) -> np.ndarray:
        """(R, P, K) True where a candidate's loss equals the best (symmetric twins such as dropping feature 1 or 2
        when both have importance 1)."""
        best = self.losses.min(axis=-1, keepdims=True)
        return self.losses <= best + rtol * np.maximum(np.abs(best), 1e-300) + 1e-15


def analytic_phase_diagram(
    n: int,
    m: int,
    importances: np.ndarray,
    probabilities: np.ndarray,
    convention: str = "paper",
    magnitude: str = "uniform",
    cands: list[Candidate] | None = None,
    free_steps: int = 200,
    free_lr: float = 0.03,
) -> PhaseDiagram:
    """The winning candidate per cell of an (importance vector × density) grid, with exact expected losses."""
    if convention not in CONVENTIONS:
        raise SpecError(f"convention: unknown {convention!r} (allowed: {', '.join(CONVENTIONS)})")
    cands = candidates(n, m, maximal=True) if cands is None else cands
    imp = torch.as_tensor(np.asarray(importances, dtype=float), dtype=DTYPE)  # (R, n)
    ps = torch.as_tensor(np.asarray(probabilities, dtype=float), dtype=DTYPE)  # (P,)
    if imp.dim() != 2 or imp.shape[-1] != n:
        raise SpecError(f"importances: expected shape (R, {n}), got {tuple(imp.shape)}")
    R, P, K = imp.shape[0], ps.shape[0], len(cands)
    Wc = torch.tensor(np.stack([c.W for c in cands]), dtype=DTYPE)  # (K, m, n)
    G = Wc.transpose(-1, -2) @ Wc  # (K, n, n)
    rep = torch.diagonal(G, dim1=-2, dim2=-1) > 0.5  # (K, n)
    probs = pattern_probabilities(ps, n)  # (P, patterns)
    mean_x = magnitude_expectation(lambda v: v, magnitude)
    if convention == "paper":
        const = (ps * mean_x).clamp_min(0)[:, None, None]  # best constant behind the output ReLU
        b = torch.where(rep, torch.zeros(()), const).expand(P, K, n)
    else:
        b = best_bias(G.unsqueeze(0), probs.unsqueeze(1), magnitude)  # (P, K, n)
    norms = rep.to(DTYPE).expand(R, P, K, n)
    b_full = b.unsqueeze(0).expand(R, P, K, n)
    table = relu_output_table(G, b, magnitude)  # (P, K, patterns, n)
    losses = expected_loss(table.unsqueeze(0), probs[None, :, None, :], imp[:, None, None, :])  # (R, P, K)
    weights = None
    if convention == "free":
        losses, norms, b_full = _optimise_free(G, rep, b_full, probs, imp, magnitude, free_steps, free_lr, losses)
    elif convention == "open":
        losses, W_best, b_full = _optimise_open(Wc, b_full, probs, imp, magnitude, free_steps, free_lr, losses, cands)
        norms = W_best.norm(dim=-2)
        weights = W_best.detach().cpu().numpy()
    loss_np = losses.detach().cpu().numpy()
    order = np.sort(loss_np, axis=-1)
    gap = order[..., 1] - order[..., 0] if K > 1 else np.zeros(loss_np.shape[:-1])
    return PhaseDiagram(
        candidates=cands,
        importances=imp.cpu().numpy(),
        probabilities=ps.cpu().numpy(),
        losses=loss_np,
        winner=loss_np.argmin(axis=-1),
        gap=gap,
        biases=b_full.detach().cpu().numpy(),
        norms=norms.detach().cpu().numpy(),
        convention=convention,
        weights=weights,
    )


def _optimise_free(G, rep, b, probs, imp, magnitude, steps, lr, start_losses):
    """Adam on (log-norms of represented features, biases) of every (cell, candidate) at once; keeps the best seen."""
    log_a = torch.zeros(b.shape, dtype=DTYPE, requires_grad=True)
    bias = b.clone().requires_grad_(True)
    opt = torch.optim.Adam([log_a, bias], lr=lr)
    repf = rep.to(DTYPE)
    best_loss = start_losses.clone()
    best_a = repf.expand_as(b).clone()
    best_b = b.clone()
    scale_imp = imp[:, None, None, :]
    for _ in range(steps):
        a = torch.exp(log_a) * repf
        M = a.unsqueeze(-1) * G * a.unsqueeze(-2)
        loss = expected_loss(relu_output_table(M, bias, magnitude), probs[None, :, None, :], scale_imp)
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_a = torch.where(better.unsqueeze(-1), a, best_a)
            best_b = torch.where(better.unsqueeze(-1), bias, best_b)
        opt.zero_grad()
        # Normalise per problem so that cells with tiny losses (sparse data) move as fast as dense ones.
        (loss / start_losses.clamp_min(1e-30)).sum().backward()
        opt.step()
        with torch.no_grad():  # a represented feature stays represented: the configuration keeps its class
            log_a.clamp_(min=math.log(NORM_FLOOR))
    return best_loss, best_a, best_b


def _optimise_open(Wc, b, probs, imp, magnitude, steps, lr, start_losses, cands):
    """Adam on the whole (W, b) of every (cell, candidate start) at once; the optima are then reclassified."""
    R, P, K, n = b.shape
    W = Wc.expand(R, P, *Wc.shape).clone().requires_grad_(True)
    bias = b.clone().requires_grad_(True)
    opt = torch.optim.Adam([W, bias], lr=lr)
    best_loss = start_losses.clone()
    best_W = W.detach().clone()
    best_b = b.clone()
    scale_imp = imp[:, None, None, :]
    for _ in range(steps):
        M = W.transpose(-1, -2) @ W
        loss = expected_loss(relu_output_table(M, bias, magnitude), probs[None, :, None, :], scale_imp)
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_W = torch.where(better[..., None, None], W, best_W)
            best_b = torch.where(better.unsqueeze(-1), bias, best_b)
        opt.zero_grad()
        (loss / start_losses.clamp_min(1e-30)).sum().backward()
        opt.step()
    # Which candidate did each optimum land in? Keep, per candidate, the best optimum that landed there.
    everything = candidates(n, Wc.shape[-2])
    landed = classify_geometry(best_W, everything)  # (R, P, K) index into everything
    index = {c.name: k for k, c in enumerate(cands)}
    to_cand = torch.tensor([index.get(c.name, -1) for c in everything], device=landed.device)[landed]
    out_loss = torch.full_like(best_loss, math.inf)
    out_W = torch.zeros_like(best_W)
    out_b = torch.zeros_like(best_b)
    for k in range(K):  # K is small: the loop is over candidates, never over cells
        here = torch.where(to_cand == k, best_loss, torch.full_like(best_loss, math.inf))
        j = here.argmin(dim=-1)  # (R, P) which start reached the best optimum in class k
        out_loss[..., k] = here.gather(-1, j.unsqueeze(-1)).squeeze(-1)
        out_W[..., k, :, :] = best_W.gather(2, j[..., None, None, None].expand(R, P, 1, *best_W.shape[-2:])).squeeze(2)
        out_b[..., k, :] = best_b.gather(2, j[..., None, None].expand(R, P, 1, n)).squeeze(2)
    return out_loss, out_W, out_b
