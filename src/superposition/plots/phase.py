"""Phase diagram figures: analytic regions with trained points on top (any candidates), the analytic diagram
against the trained winners of a grid, and how decisive each analytic cell is (the loss gap)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float, Int

from superposition.plots.common import (
    CONTINUOUS,
    as_array,
    darken,
    discrete_colours,
    esc,
    finish,
    lighten,
    log_ticks,
)


def phase_diagram(
    x: Float[np.ndarray, " nx"],
    y: Float[np.ndarray, " ny"],
    winner: Int[np.ndarray, "ny nx"],
    names: Sequence[str],
    *,
    points_x: Float[np.ndarray, " n"] | None = None,
    points_y: Float[np.ndarray, " n"] | None = None,
    points_label: Int[np.ndarray, " n"] | None = None,
    boundaries: Sequence[tuple[str, np.ndarray, np.ndarray]] = (),
    x_title: str = "relative importance r of the last feature (dimensionless, log scale)",
    y_title: str = "feature density 1−S (probability of being active, log scale)",
    title: str = (
        "Phase diagram<br><sup>the solution with the lowest expected loss per cell, trained instances on top</sup>"
    ),
    log_x: bool = True,
    log_y: bool = True,
) -> go.Figure:
    """Analytic regions (the index into ``names`` of the winning candidate at each grid cell) drawn as coloured
    cells, boundary curves on top, and trained points coloured by the solution they landed in (label -1: none of
    the candidates). Generic over the candidates, so the 2×1 and 3×2 diagrams share it.

    Traces: one heatmap, one line per boundary, one marker trace per trained-point label present.
    """
    x, y, win = as_array(x), as_array(y), np.asarray(winner, dtype=np.int64)
    K = len(names)
    region = discrete_colours(max(K, 1))
    light = [lighten(c, 0.55) for c in region]
    scale: list[list[Any]] = []
    for k in range(K):
        scale += [[k / K, light[k]], [(k + 1) / K, light[k]]]
    text = np.array([esc(n) for n in names], dtype=object)[np.clip(win, 0, K - 1)]
    fig = go.Figure(
        go.Heatmap(
            x=x,
            y=y,
            z=win,
            zmin=-0.5,
            zmax=K - 0.5,
            colorscale=scale,
            showscale=False,
            text=text,
            hovertemplate="x = %{x:.3g}<br>y = %{y:.3g}<br>analytic winner: %{text}<extra></extra>",
        )
    )
    for name, bx, by in boundaries:
        fig.add_trace(
            go.Scatter(x=as_array(bx), y=as_array(by), mode="lines", name=esc(name), line=dict(color="black", width=2))
        )
    # Label each region at its centre (in the axes' own scale).
    fx = np.log10(x) if log_x else x
    fy = np.log10(y) if log_y else y
    for k, name in enumerate(names):
        iy, ix = np.nonzero(win == k)
        if len(ix) == 0:
            continue
        cx, cy = float(np.median(fx[ix])), float(np.median(fy[iy]))
        fig.add_annotation(
            x=cx, y=cy, text=f"<b>{esc(name)}</b>", showarrow=False, font=dict(size=12, color=darken(region[k]))
        )
    if points_x is not None and points_y is not None and points_label is not None:
        px, py, pl = as_array(points_x), as_array(points_y), np.asarray(points_label, dtype=np.int64)
        for k in sorted(set(pl.tolist())):
            sel = pl == k
            name = names[k] if 0 <= k < K else "other"
            colour = darken(region[k]) if 0 <= k < K else "#444"
            fig.add_trace(
                go.Scatter(
                    x=px[sel],
                    y=py[sel],
                    mode="markers",
                    name=esc(f"trained: {name}"),
                    marker=dict(size=9, color=colour, line=dict(color="white", width=1.5), symbol="circle"),
                    hovertemplate=f"trained point<br>x = %{{x:.3g}}<br>y = %{{y:.3g}}<br>{esc(name)}<extra></extra>",
                )
            )
    fig.update_xaxes(type="log" if log_x else "linear", title_text=x_title, **(log_ticks(x) if log_x else {}))
    fig.update_yaxes(type="log" if log_y else "linear", title_text=y_title, **(log_ticks(y) if log_y else {}))
    return finish(fig, title, height=620, width=900, legend=dict(orientation="h", y=-0.16), margin=dict(t=120))


def _relative_importance(importances: np.ndarray) -> np.ndarray:
    imp = np.asarray(importances, dtype=np.float64)
    return imp[:, -1] / imp[:, 0]


def phase_comparison(
    analytic: Any,
    empirical: Any,
    title: str | None = None,
    boundaries: Sequence[tuple[str, np.ndarray, np.ndarray]] = (),
) -> go.Figure:
    """Analytic regions (a ``theory.PhaseDiagram``) with the trained winner of each cell (a
    ``phase.EmpiricalDiagram`` on the same grid) on top; cells where they disagree get a black cross.

    Traces: those of :func:`phase_diagram` (one heatmap, one line per boundary, one marker trace per trained winner
    present), then one marker trace for the disagreeing cells (always present, possibly empty).
    """
    from superposition.phase import agreement
    from superposition.theory import symmetry_classes

    names = _merged_names(analytic)
    sym = symmetry_classes(analytic.candidates, analytic.importances)
    x = _relative_importance(analytic.importances)
    y = np.asarray(analytic.probabilities, dtype=np.float64)
    grid = empirical.grid
    index = {c.name: int(sym[k]) for k, c in enumerate(analytic.candidates)}
    cells = np.argwhere(empirical.winner >= 0)
    labels = np.array([index.get(empirical.candidates[empirical.winner[i, j]].name, -1) for i, j in cells])
    agree = agreement(empirical, analytic)
    n, m = analytic.importances.shape[1], analytic.candidates[0].W.shape[0]
    title = title or (
        f"Phase diagram, {n} features in {m} dimension{'s' if m > 1 else ''}: analytic vs trained "
        f"({100 * agree.mean():.0f}% of cells agree)<br><sup>background: lowest exact expected loss "
        f"({esc(analytic.convention)} convention); dots: each cell's best trained seed; crosses: disagreement</sup>"
    )
    fig = phase_diagram(
        x,
        y,
        sym[analytic.winner].T,
        names,
        points_x=_relative_importance(grid.importances)[cells[:, 0]],
        points_y=np.asarray(grid.probabilities)[cells[:, 1]],
        points_label=labels,
        boundaries=boundaries,
        x_title=f"relative importance I<sub>{n}</sub>/I<sub>1</sub> of the last feature (dimensionless, log scale)",
        title=title,
    )
    bad = np.argwhere(~agree & (empirical.winner >= 0))
    fig.add_trace(
        go.Scatter(
            x=_relative_importance(grid.importances)[bad[:, 0]],
            y=np.asarray(grid.probabilities)[bad[:, 1]],
            mode="markers",
            name="trained winner ≠ analytic winner",
            marker=dict(symbol="x-thin", size=14, line=dict(color="black", width=2)),
            hoverinfo="skip",
        )
    )
    return fig


def _merged_names(analytic: Any) -> list[str]:
    """Candidate names, a symmetric twin (same regime up to swapping equally important features) named alongside."""
    from superposition.theory import symmetry_classes

    sym = symmetry_classes(analytic.candidates, analytic.importances)
    names = [c.name for c in analytic.candidates]
    out = list(names)
    for k, j in enumerate(sym):
        if j != k:
            out[j] = f"{names[j]} ≅ {names[k]}"
    return out


def phase_gap(analytic: Any, title: str | None = None) -> go.Figure:
    """How decisive each cell of an analytic phase diagram is: (second-best − best)/best loss, in percent, on a log
    colour scale, with the winner's name on hover. Traces: one heatmap."""
    from superposition.theory import symmetry_classes

    names = np.array(_merged_names(analytic), dtype=object)
    sym = symmetry_classes(analytic.candidates, analytic.importances)
    # per row: with I = (1, 1, 1) every feature may be swapped with every other
    row_sym = np.stack([symmetry_classes(analytic.candidates, row[None]) for row in analytic.importances])[:, None]
    x = _relative_importance(analytic.importances)
    y = np.asarray(analytic.probabilities, dtype=np.float64)
    losses = np.asarray(analytic.losses, dtype=np.float64)
    win = losses.argmin(axis=-1)
    first = sym[win]
    best = losses.min(axis=-1)
    # the runner-up is the best candidate of another class (a symmetric twin of the winner is the same solution)
    same = row_sym == np.take_along_axis(row_sym.repeat(len(y), 1), win[..., None], -1)
    other = np.where(same, np.inf, losses)
    runner = sym[other.argmin(axis=-1)]
    rel = 100 * (other.min(axis=-1) - best) / np.maximum(best, 1e-300)
    rel = np.where(np.isfinite(rel), rel, np.nan)  # no runner-up (``open`` optima that all land in one class)
    z = np.log10(np.clip(rel, 1e-3, None)).T
    text = np.char.add(np.char.add(names[first].astype(str), " over "), names[runner].astype(str)).T
    n, m = analytic.importances.shape[1], analytic.candidates[0].W.shape[0]
    lo, hi = math.floor(float(np.nanmin(z, initial=np.inf))), math.ceil(float(np.nanmax(z, initial=-np.inf)))
    lo, hi = (lo, hi) if lo <= hi else (-3, 3)
    ticks = list(range(lo, hi + 1))
    fig = go.Figure(
        go.Heatmap(
            x=x,
            y=y,
            z=z,
            text=text,
            customdata=rel.T,
            colorscale=CONTINUOUS,
            colorbar=dict(
                title=dict(text="gap (%)", side="right"),
                tickvals=ticks,
                ticktext=[f"{10.0**t:g}" for t in ticks],
            ),
            hovertemplate="x = %{x:.3g}<br>y = %{y:.3g}<br>%{text}<br>gap %{customdata:.3g}%<extra></extra>",
        )
    )
    fig.update_xaxes(
        type="log",
        title_text=f"relative importance I<sub>{n}</sub>/I<sub>1</sub> of the last feature (dimensionless, log scale)",
        **log_ticks(x),
    )
    fig.update_yaxes(
        type="log", title_text="feature density 1−S (probability of being active, log scale)", **log_ticks(y)
    )
    title = title or (
        f"Loss gap between the best and second-best candidate, {n} features in {m} dimension{'s' if m > 1 else ''}"
        f"<br><sup>(L<sub>2nd</sub> − L<sub>best</sub>)/L<sub>best</sub> in percent, log colour scale "
        f"({esc(analytic.convention)} convention); dark cells sit on a phase boundary</sup>"
    )
    return finish(fig, title, height=600, width=900)
