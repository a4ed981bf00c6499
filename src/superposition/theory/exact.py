"""The data law and the exact expected loss of ReLU-output configurations (with its Monte Carlo twin).

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

from superposition.spec import SpecError

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
