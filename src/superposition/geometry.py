"""Analysis of trained weights: how a set of 2-D vectors (feature vectors, hidden vectors of training points)
sits around the origin, as counts of long vectors and of the distinct directions they point in.

Pure numpy; imports nothing of this package, so ``sweep`` and ``plots`` can both use it."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Float

__all__ = ["Polygon", "polygon_stats"]


def _np(a: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor or array."""
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


class Polygon(NamedTuple):
    """How a set of 2-D vectors sits around the origin (see :func:`polygon_stats`)."""

    n: int
    """Vectors given."""
    max_norm: float
    """Largest norm (0 when there are none)."""
    n_long: int
    """Vectors longer than ``rel`` times the largest norm."""
    directions: int
    """Distinct directions among the long vectors: groups of angles at most ``tol_deg`` wide."""
    irregularity: float
    """(widest - narrowest angle between neighbouring directions) / (360° / directions): 0 for a regular polygon,
    NaN below two directions."""


def polygon_stats(vectors: Float[np.ndarray, "n 2"], rel: float = 0.5, tol_deg: float = 10.0) -> Polygon:
    """Count the long vectors (norm > ``rel`` · max) and the distinct directions they point in.

    Directions are grouped greedily along the circle, starting after the widest empty arc (so no group straddles
    the cut): a group takes every next angle within ``tol_deg`` of its first one. A regular k-gon (with any number
    of vectors per vertex) gives ``directions == k`` and ``irregularity`` near 0; vectors spread all round give
    about 360 / ``tol_deg`` directions.
    """
    v = _np(vectors).reshape(-1, 2)
    norms = np.hypot(v[:, 0], v[:, 1])
    finite = np.isfinite(norms)
    top = float(norms[finite].max()) if finite.any() else 0.0
    if top <= 0.0:
        return Polygon(len(v), top, 0, 0, math.nan)
    long = v[finite & (norms > rel * top)]
    angles = np.sort(np.degrees(np.arctan2(long[:, 1], long[:, 0])) % 360.0)
    gaps = np.diff(np.append(angles, angles[0] + 360.0))
    origin = angles[(int(np.argmax(gaps)) + 1) % len(angles)]
    turned = np.sort((angles - origin) % 360.0)
    starts = [0]
    for i, a in enumerate(turned):
        if a - turned[starts[-1]] > tol_deg:
            starts.append(i)
    centres = np.array([turned[s:e].mean() for s, e in zip(starts, [*starts[1:], len(turned)], strict=True)])
    k = len(centres)
    irregularity = math.nan
    if k >= 2:
        sides = np.diff(np.append(centres, centres[0] + 360.0))
        irregularity = float((sides.max() - sides.min()) / (360.0 / k))
    return Polygon(len(v), top, len(long), k, irregularity)
