"""Candidate configurations (groups in orthogonal subspaces), their classification by geometry and symmetry, and
the analytic phase diagram: the exact-loss winner per (importance, density) cell under each convention."""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from superposition.spec import SpecError
from superposition.theory.exact import (
    DTYPE,
    best_bias,
    expected_loss,
    magnitude_expectation,
    pattern_probabilities,
    relu_output_table,
)


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
