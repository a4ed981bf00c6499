"""Empirical phase diagrams: one run over an (importance × density × seed) grid, compared with the analytic one.

The instance axes of a phase-diagram spec are ``task.importance`` (explicit lists, or ratios),
``data.feature_probability`` and ``seed`` (product). Every trained instance is classified into the nearest candidate
configuration by the geometry of its W (:func:`superposition.theory.classify_geometry`). In each (importance,
density) cell the instance with the lowest exact expected loss of its trained (W, b) stands for the cell: gradient
descent from several seeds, keeping the best, sidesteps the local minima that single runs fall into. The agreement
with the analytic diagram counts a cell as agreeing when the trained winner's candidate is among the analytic best
(ties included: with two features of equal importance, dropping either is equally good).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from superposition import theory
from superposition.best import SEED, best_of_seeds
from superposition.models import instance_seeds
from superposition.record import Run
from superposition.spec import Experiment, SpecError

__all__ = [
    "PhaseGrid",
    "seed_table",
    "phase_grid",
    "check_phase_spec",
    "EmpiricalDiagram",
    "empirical_diagram",
    "agreement",
]


class PhaseGrid(NamedTuple):
    """The (importance, density) grid of a spec and each instance's cell."""

    importances: np.ndarray
    """(R, n) distinct importance vectors, in order of first appearance."""
    probabilities: np.ndarray
    """(P,) distinct densities, in order of first appearance."""
    row: np.ndarray
    """(inst,) index into importances."""
    col: np.ndarray
    """(inst,) index into probabilities."""


def check_phase_spec(spec: Experiment) -> None:
    """Raise SpecError unless the spec is a phase diagram the exact losses cover (tied ReLU-output, sparse data)."""
    m, d, t = spec.model, spec.data, spec.task
    problems = []
    if m.kind != "relu-output" or not m.tied or not m.bias_out or m.bias_hidden:
        problems.append("model must be a tied relu-output with an output bias")
    if d.kind != "sparse" or d.normalize or d.dataset_size is not None:
        problems.append("data must be independent sparse features, fresh samples, not normalised")
    if t.target != "identity" or t.loss != "l2":
        problems.append("task must be the identity with the l2 loss")
    if "model.kind" in spec.instances.axes:
        problems.append("model.kind may not vary")
    if m.n_features > 8:
        problems.append(f"at most 8 features (got {m.n_features})")
    if problems:
        raise SpecError(f"phase diagram: {'; '.join(problems)}")


def phase_grid(spec: Experiment) -> PhaseGrid:
    """Distinct importance vectors and densities of the instances, and each instance's cell."""
    from superposition.data import importance_tensor

    imp = importance_tensor(spec, dtype=torch.float64).numpy()
    probs = np.asarray(spec.instance_values("data.feature_probability"), dtype=np.float64)
    rows, row = _first_unique(imp)
    cols, col = _first_unique(probs[:, None])
    return PhaseGrid(rows, cols[:, 0], row, col)


def _first_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, first, inverse = np.unique(values, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return values[first[order]], rank[inverse.reshape(-1)]


def seed_table(run: Run, exact: np.ndarray) -> pd.DataFrame:
    """One row per instance of a phase-diagram run: ``instance``, its cell (``row``, ``col``), ``seed``, ``loss``
    (evaluated), ``exact`` (the exact expected loss of its (W, b)) and ``rank``: the exact loss where both are
    finite, else NaN (never a cell's best). :func:`superposition.best.best_of_seeds` reads it by cell."""
    grid = phase_grid(run.spec)
    loss = run.instances["loss"].to_numpy(dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    return pd.DataFrame(
        {
            "instance": np.arange(len(loss), dtype=np.int64),
            "row": grid.row,
            "col": grid.col,
            SEED: np.asarray(instance_seeds(run.spec), dtype=np.int64),
            "loss": loss,
            "exact": exact,
            "rank": np.where(np.isfinite(loss) & np.isfinite(exact), exact, np.nan),
        }
    )


class EmpiricalDiagram(NamedTuple):
    """The trained phase diagram of one run."""

    candidates: list[theory.Candidate]
    """Every configuration of n features in m dims (not only the maximal ones), for classification."""
    grid: PhaseGrid
    instance_class: np.ndarray
    """(inst,) index into candidates of each instance's nearest configuration."""
    best_instance: np.ndarray
    """(R, P) the lowest-loss instance of each cell (-1 for an empty cell)."""
    winner: np.ndarray
    """(R, P) its class (index into candidates; -1 for an empty cell)."""
    loss: np.ndarray
    """(R, P) its evaluated loss, in the run's units (mean over features)."""
    exact_loss: np.ndarray
    """(R, P) the exact expected loss of its (W, b), in the same units (the seeds are ranked by it)."""
    instance_exact_loss: np.ndarray
    """(inst,) the exact expected loss of every instance, in the same units."""
    found: np.ndarray
    """(R, P, K) whether any instance of the cell landed in candidate k."""

    def winner_names(self) -> np.ndarray:
        names = np.array([c.name for c in self.candidates] + ["(empty)"], dtype=object)
        return names[self.winner]


def empirical_diagram(run: Run) -> EmpiricalDiagram:
    """Classify every instance of a phase-diagram run and pick the lowest-loss instance per cell."""
    spec = run.spec
    check_phase_spec(spec)
    n, m = spec.model.n_features, spec.model.d_hidden
    grid = phase_grid(spec)
    cands = theory.candidates(n, m)
    W = run.model.W.detach().to(torch.float64)
    b = run.model.b_final.detach().to(torch.float64)
    cls = theory.classify_geometry(W, cands).numpy()
    # Rank seeds (best_of_seeds, by cell) by the exact expected loss of their (W, b): the evaluated loss is a
    # finite-sample estimate, noisy exactly where the data are sparse.
    exact = (
        theory.config_loss(
            W,
            b,
            torch.as_tensor(grid.importances[grid.row]),
            torch.as_tensor(grid.probabilities[grid.col]),
            magnitude=spec.data.magnitude,
        ).loss.numpy()
        / n
    )
    loss = run.instances["loss"].to_numpy(dtype=np.float64)
    R, P, K = len(grid.importances), len(grid.probabilities), len(cands)
    best = np.full((R, P), -1, dtype=np.int64)
    found = np.zeros((R, P, K), dtype=bool)
    found[grid.row, grid.col, cls] = True
    cells = best_of_seeds(seed_table(run, exact), ["row", "col"], rank="rank")
    best[cells["row"], cells["col"]] = cells["instance"]
    ok = best >= 0
    safe = np.where(ok, best, 0)
    return EmpiricalDiagram(
        candidates=cands,
        grid=grid,
        instance_class=cls,
        best_instance=best,
        winner=np.where(ok, cls[safe], -1),
        loss=np.where(ok, loss[safe], np.nan),
        exact_loss=np.where(ok, exact[safe], np.nan),
        instance_exact_loss=exact,
        found=found,
    )


def agreement(empirical: EmpiricalDiagram, analytic: theory.PhaseDiagram) -> np.ndarray:
    """(R, P) True where the trained winner is one of the analytic diagram's best candidates: the winner itself, a
    candidate tied with it, or the same solution with equally important features swapped (``theory.symmetry_classes``
    of that row).

    Both diagrams must be computed on the same grid (``analytic_phase_diagram(n, m, grid.importances,
    grid.probabilities, ...)``). A trained winner outside the analytic candidate list (a configuration that leaves a
    dimension unused, say) never agrees.
    """
    if analytic.losses.shape[:2] != empirical.winner.shape:
        raise SpecError("agreement: the analytic and empirical diagrams are on different grids")
    index = {c.name: k for k, c in enumerate(analytic.candidates)}
    ties = analytic.ties()
    sym = [theory.symmetry_classes(analytic.candidates, row[None]) for row in analytic.importances]
    out = np.zeros(empirical.winner.shape, dtype=bool)
    for (i, j), w in np.ndenumerate(empirical.winner):
        if w < 0:
            continue
        k = index.get(empirical.candidates[w].name)
        if k is None:
            continue
        # the same solution up to swapping equally important features, or a numerical tie
        out[i, j] = bool(ties[i, j, k]) or sym[i][k] == sym[i][analytic.winner[i, j]]
    return out
