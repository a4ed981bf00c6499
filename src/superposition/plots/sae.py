"""Figures of sparse autoencoders: decoder directions over the true features in 2-D, the cosine between decoder rows
and features, recovery against sparsity (one curve per architecture), and dead latents over training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Bool, Float
from plotly.subplots import make_subplots

from superposition.plots.common import (
    DIVERGING,
    as_array,
    axis_ref,
    discrete_colours,
    esc,
    finish,
    subplot_grid,
)


def sae_directions_2d(
    features: Float[np.ndarray, "panels dirs 2"],
    latents: Float[np.ndarray, "panels d_sae 2"],
    titles: Sequence[str],
    *,
    title: str = "SAE decoder directions (coloured) over the true feature directions (grey)",
    cols: int | None = None,
    feature_labels: Sequence[str] | None = None,
    dead: Bool[np.ndarray, "panels d_sae"] | None = None,
) -> go.Figure:
    """One panel per (instance, SAE) in a 2-D hidden space: each true feature direction as a thick grey arrow (its
    length relative to the panel's longest), each SAE latent's unit decoder row as a coloured arrow on top (dotted
    when the latent is dead). A recovered feature has a latent lying along it; a dead or straddling latent points
    elsewhere.

    Traces: one per feature and one per latent in each panel; the legend toggles a latent in every panel.
    """
    F, L = as_array(features), as_array(latents)
    F = F / np.maximum(np.linalg.norm(F, axis=-1).max(axis=-1, initial=0.0), 1e-12)[:, None, None]
    is_dead = np.zeros(L.shape[:2], dtype=bool) if dead is None else np.asarray(dead, dtype=bool)
    n_panels, n_dirs, _ = F.shape
    n_lat = L.shape[1]
    labels = list(feature_labels) if feature_labels is not None else [f"f{i}" for i in range(n_dirs)]
    colours = discrete_colours(n_lat)
    fig, rows, cols = subplot_grid(titles, cols, max_cols=8)
    lim = 1.15 * max(1.0, float(np.abs(F).max(initial=0.0)))
    for k in range(n_panels):
        row, col = divmod(k, cols)
        for i in range(n_dirs):
            x, y = F[k, i]
            fig.add_trace(
                go.Scatter(
                    x=[0.0, x],
                    y=[0.0, y],
                    mode="lines+markers",
                    line=dict(color="#9a9a9a", width=5),
                    marker=dict(size=[0, 11], color="#9a9a9a", symbol="arrow", angleref="previous"),
                    showlegend=False,
                    hovertemplate=f"true feature {esc(labels[i])}<br>({x:.3f}, {y:.3f})<extra></extra>",
                ),
                row=row + 1,
                col=col + 1,
            )
        for j in range(n_lat):
            x, y = L[k, j]
            fig.add_trace(
                go.Scatter(
                    x=[0.0, x],
                    y=[0.0, y],
                    mode="lines+markers",
                    line=dict(color=colours[j], width=2, dash="dot" if is_dead[k, j] else "solid"),
                    marker=dict(size=[0, 8], color=colours[j], symbol="arrow", angleref="previous"),
                    name=f"latent {j}",
                    legendgroup=f"latent {j}",
                    showlegend=k == 0,
                    hovertemplate=(
                        f"latent {j} decoder row{' (dead)' if is_dead[k, j] else ''}"
                        f"<br>({x:.3f}, {y:.3f})<extra></extra>"
                    ),
                ),
                row=row + 1,
                col=col + 1,
            )
        fig.update_xaxes(range=[-lim, lim], zeroline=True, showticklabels=False, row=row + 1, col=col + 1)
        fig.update_yaxes(
            range=[-lim, lim],
            scaleanchor=axis_ref(k + 1),
            scaleratio=1,
            zeroline=True,
            showticklabels=False,
            row=row + 1,
            col=col + 1,
        )
    return finish(fig, title, height=80 + 200 * rows, width=max(640, 180 * cols + 200))


def sae_cosine_heatmap(
    cosine: Float[np.ndarray, "panels d_sae dirs"],
    feature_labels: Sequence[str],
    titles: Sequence[str],
    *,
    title: str = "Cosine between SAE decoder rows (rows) and true feature directions (columns)",
    cols: int | None = None,
) -> go.Figure:
    """One heatmap per SAE: cos(decoder row j, true feature i), from -1 (blue) to 1 (red). Perfect recovery is one
    red cell per feature column.

    Traces: one heatmap per panel on a shared colour axis.
    """
    C = as_array(cosine)
    n_panels, n_lat, n_dirs = C.shape
    fig, rows, cols = subplot_grid(titles, cols, max_cols=3)
    xs = [esc(s) for s in feature_labels]
    for k in range(n_panels):
        row, col = divmod(k, cols)
        fig.add_trace(
            go.Heatmap(
                z=C[k],
                x=xs,
                y=[f"latent {j}" for j in range(n_lat)],
                coloraxis="coloraxis",
                text=np.round(C[k], 2),
                texttemplate="%{text}" if n_lat * n_dirs <= 150 else None,
                hovertemplate="%{y}, feature %{x}<br>cos = %{z:.4f}<extra></extra>",
            ),
            row=row + 1,
            col=col + 1,
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="true feature", row=rows)
    fig.update_layout(
        coloraxis=dict(
            colorscale=DIVERGING,
            reversescale=True,
            cmin=-1,
            cmax=1,
            colorbar=dict(title=dict(text="cosine<br>(dimensionless)"), thickness=12),
        )
    )
    return finish(fig, title, height=100 + max(220, 26 * n_lat + 80) * rows)


_SAE_AXIS = {
    "l0": "L0: active latents per sample (mean)",
    "mmcs_features": "mean max cosine, features (dimensionless)",
    "mmcs_latents": "mean max cosine, latents (dimensionless)",
    "recovered_99": "features with cosine > 0.99 (count)",
    "recovered_90": "features with cosine > 0.9 (count)",
    "fvu": "variance unexplained (fraction)",
    "dead": "dead latents (count)",
    "shrinkage": "reconstructed / true norm (ratio)",
}


def sae_pareto(
    table: pd.DataFrame,
    *,
    x: str = "l0",
    ys: Sequence[str] = ("mmcs_features", "fvu"),
    curve: str = "curve",
    label: str = "label",
    title: str = "SAE recovery against sparsity (L0), one curve per architecture",
    reference_x: float | None = None,
    reference_name: str = "true L0",
) -> go.Figure:
    """One panel per score in ``ys`` against ``x``: a curve per value of the ``curve`` column (architecture and
    resampling), its points the sparsity settings (labelled by the ``label`` column), sorted along x. The x axis is
    logarithmic when every x is positive; ``reference_x`` draws a dotted vertical line (e.g. the data's true L0).

    Traces: one per curve per panel; the legend toggles a curve in every panel.
    """
    fig = make_subplots(
        rows=1,
        cols=len(ys),
        subplot_titles=[esc(_SAE_AXIS.get(y, y)) for y in ys],
        horizontal_spacing=0.08,
    )
    names = list(dict.fromkeys(table[curve].tolist()))
    colours = discrete_colours(max(1, len(names)))
    for c, name in enumerate(names):
        sub = table[table[curve] == name].sort_values(x)
        for p, y in enumerate(ys):
            fig.add_trace(
                go.Scatter(
                    x=sub[x].to_numpy(dtype=np.float64),
                    y=sub[y].to_numpy(dtype=np.float64),
                    mode="lines+markers",
                    name=esc(name),
                    legendgroup=esc(name),
                    showlegend=p == 0,
                    line=dict(color=colours[c]),
                    marker=dict(size=8),
                    text=[esc(s) for s in sub[label]],
                    hovertemplate=f"{esc(name)}<br>%{{text}}<br>{x} = %{{x:.3g}}<br>{y} = %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=p + 1,
            )
    log_x = bool((table[x].to_numpy(dtype=np.float64) > 0).all())
    fig.update_xaxes(title_text=esc(_SAE_AXIS.get(x, x) + (" (log scale)" if log_x else "")))
    if log_x:
        fig.update_xaxes(type="log")
    if reference_x is not None and np.isfinite(reference_x) and (reference_x > 0 or not log_x):
        for p, y in enumerate(ys):  # a two-point line spanning the panel's data (shapes misplace on log axes)
            values = table[y].to_numpy(dtype=np.float64)
            lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
            fig.add_trace(
                go.Scatter(
                    x=[reference_x, reference_x],
                    y=[lo, hi],
                    mode="lines",
                    line=dict(color="#555", dash="dot", width=1.5),
                    name=esc(reference_name),
                    legendgroup="reference",
                    showlegend=p == 0,
                    hoverinfo="skip",
                ),
                row=1,
                col=p + 1,
            )
    return finish(fig, title, height=460, legend=dict(orientation="h", y=-0.25))


def sae_dead_latents(
    history: pd.DataFrame,
    events: pd.DataFrame,
    *,
    title: str = "Dead latents over training, resampling events marked",
) -> go.Figure:
    """Dead-latent count against step, one line per ``series`` (columns step, series, dead); resampling events
    (columns step, series, resampled) as triangles on their line and dotted vertical lines at their steps.

    Traces: one line per series and one marker trace per series that resampled.
    """
    fig = go.Figure()
    names = list(dict.fromkeys(history["series"].tolist()))
    colours = discrete_colours(max(1, len(names)))
    for c, name in enumerate(names):
        sub = history[history["series"] == name].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=sub["step"].to_numpy(),
                y=sub["dead"].to_numpy(dtype=np.float64),
                mode="lines",
                name=esc(name),
                legendgroup=esc(name),
                line=dict(color=colours[c]),
                hovertemplate=f"{esc(name)}<br>step %{{x}}<br>dead %{{y:.3g}}<extra></extra>",
            )
        )
        ev = events[events["series"] == name]
        if len(ev):
            steps = ev["step"].to_numpy()
            # Mark each event on the last count logged before it (the count it acted on).
            logged, counts = sub["step"].to_numpy(), sub["dead"].to_numpy(dtype=np.float64)
            before = counts[np.clip(np.searchsorted(logged, steps, side="left") - 1, 0, len(counts) - 1)]
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=before,
                    mode="markers",
                    name=esc(f"{name}: resampled"),
                    legendgroup=esc(name),
                    showlegend=False,
                    marker=dict(symbol="triangle-down", size=11, color=colours[c], line=dict(color="black", width=1)),
                    customdata=ev["resampled"].to_numpy(),
                    hovertemplate="resampling at step %{x}<br>%{customdata} latents resampled<extra></extra>",
                )
            )
    for step in sorted(set(events["step"].tolist())):
        fig.add_vline(x=float(step), line=dict(color="#888", dash="dot", width=1))
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="dead latents per SAE (mean count)", rangemode="tozero")
    return finish(fig, title, height=420, legend=dict(orientation="h", y=-0.25))
