"""The rules of the phase-diagram presets (the paper's 2×1 phase change, seed 003's 3×2 question): the best seed of
each (importance, density) cell (:func:`superposition.best.best_of_seeds`, ranked by the exact expected loss of its
trained weights, as :func:`superposition.phase.empirical_diagram` ranks them) against the exact diagram under the
paper's conventions, with the per-seed agreement beside it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from superposition import best, phase, theory
from superposition.claims.common import Row
from superposition.record import Run

__all__ = ["cell_table", "phase_diagram", "phase_diagram_3x2"]

AGREE = 0.9
"""The share of cells whose best seed must agree with the exact diagram (paper conventions)."""


def cell_table(run: Run, convention: str = "paper") -> pd.DataFrame:
    """The best-of-seeds table of a phase-diagram run: per cell its best seed (lowest exact loss), whether that
    seed's configuration agrees with the exact diagram of ``convention`` (``agrees``), and ``n_true``: how many of
    the cell's seeds agree (each judged alone, as if it were the cell's only seed)."""
    emp = phase.empirical_diagram(run)
    g = emp.grid
    n, m = run.spec.model.n_features, run.spec.model.d_hidden
    ana = theory.analytic_phase_diagram(n, m, g.importances, g.probabilities, convention)
    seeds = phase.seed_table(run, emp.instance_exact_loss)
    agrees = np.zeros(len(seeds), dtype=bool)
    for _, group in seeds.groupby(best.SEED, sort=False):  # one instance per cell and seed: one diagram per seed
        winner = np.full(emp.winner.shape, -1, dtype=np.int64)
        winner[group["row"], group["col"]] = emp.instance_class[group["instance"]]
        agree = phase.agreement(emp._replace(winner=winner), ana)
        agrees[group["instance"].to_numpy()] = agree[group["row"], group["col"]]
    return best.best_of_seeds(seeds.assign(agrees=agrees), ["row", "col"], "agrees", rank="rank")


def _rule(run: Run, source: str) -> Row:
    table = cell_table(run)
    cells, hits = len(table), int(table["agrees"].sum())
    seeds = sorted(set(table["n_seeds"]))
    ok = hits >= AGREE * cells
    return Row(
        f"best of {seeds[0] if len(seeds) == 1 else seeds} seeds per cell agrees with the exact diagram (paper "
        f"conventions) on {hits}/{cells} cells ({hits / cells:.1%}); per seed {int(table['n_true'].sum())}/"
        f"{int(table['n_seeds'].sum())} instances agree",
        source,
        f"{'yes' if ok else 'no'} (the best seed agrees on ≥ {AGREE:.0%} of cells, paper conventions)",
    )


def phase_diagram(run: Run) -> Row:
    return _rule(run, "three regimes, boundary s* = 4r/(5r+2), 4/(5+2r), triple point r = 1, s = 4/7")


def phase_diagram_3x2(run: Run) -> Row:
    return _rule(run, "four solutions, triangle not considered")
