"""Closed forms: the expected loss of the linear model, and the three solutions of the 2-features-in-1-dimension
model with their regimes and boundary."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor


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
