"""Figures of training: the loss curve per instance, and the feature vectors beside the training points' hidden
vectors for fixed 2-D training sets (double descent, one panel per training-set size)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.colors import qualitative, sample_colorscale

from superposition.plots.common import (
    CONTINUOUS,
    MAX_CURVES,
    MAX_LEGEND,
    UNITLESS,
    as_array,
    axis_ref,
    discrete_colours,
    esc,
    finish,
    pick_instances,
    subplot_grid,
)


def training_geometry(
    features: Sequence[Float[np.ndarray, "2 feats"]],
    points: Sequence[Float[np.ndarray, "n 2"]],
    titles: Sequence[str],
    *,
    title: str = (
        "Features and training points in the 2-D hidden space<br><sup>feature vectors W<sub>i</sub> (blue arrows) "
        "and hidden vectors h<sub>t</sub> = W x<sub>t</sub> of the training points (red dots)<br>"
        "one panel per training-set size T, each on its own scale</sup>"
    ),
    cols: int | None = None,
) -> go.Figure:
    """One panel per training set: the feature vectors W_i as arrows from the origin and the training points'
    hidden vectors W x_t as dots, equal aspect, each panel scaled to its longest vector.

    Traces: three per panel (training points, then arrow shafts and tips on top); the first panel's carry the
    legend.
    """
    if not (len(features) == len(points) == len(titles)):
        raise ValueError("training_geometry: features, points and titles differ in length")
    fig, rows, cols = subplot_grid(titles, cols, max_cols=3)
    feature_colour, point_colour = qualitative.Plotly[0], qualitative.Plotly[1]
    for k, (W, H) in enumerate(zip(features, points, strict=True)):
        W, H = as_array(W).reshape(2, -1), as_array(H).reshape(-1, 2)
        row, col = divmod(k, cols)
        n = W.shape[1]
        shafts = np.full((n, 3, 2), np.nan)
        shafts[:, 0] = 0.0
        shafts[:, 1] = W.T
        w_norm = np.hypot(W[0], W[1])
        h_norm = np.hypot(H[:, 0], H[:, 1])
        where = dict(row=row + 1, col=col + 1)
        many = len(H) > 100  # thousands of training points: smaller, lighter dots
        fig.add_trace(
            go.Scatter(
                x=H[:, 0],
                y=H[:, 1],
                mode="markers",
                marker=dict(size=4 if many else 7, color=point_colour, opacity=0.45 if many else 0.8),
                name="training points h<sub>t</sub> = W x<sub>t</sub>",
                legendgroup="points",
                showlegend=k == 0,
                customdata=np.stack([np.arange(len(H)), h_norm], axis=-1),
                hovertemplate="point %{customdata[0]}<br>‖h<sub>t</sub>‖ = %{customdata[1]:.3f}<extra></extra>",
            ),
            **where,
        )
        fig.add_trace(
            go.Scatter(
                x=shafts[:, :, 0].ravel(),
                y=shafts[:, :, 1].ravel(),
                mode="lines",
                line=dict(color=feature_colour, width=1),
                opacity=0.6,
                legendgroup="features",
                showlegend=False,
                hoverinfo="skip",
            ),
            **where,
        )
        fig.add_trace(
            go.Scatter(
                x=W[0],
                y=W[1],
                mode="markers",
                marker=dict(size=5, color=feature_colour),
                name="feature vectors W<sub>i</sub>",
                legendgroup="features",
                showlegend=k == 0,
                customdata=np.stack([np.arange(n), w_norm], axis=-1),
                hovertemplate="feature %{customdata[0]}<br>‖W<sub>i</sub>‖ = %{customdata[1]:.3f}<extra></extra>",
            ),
            **where,
        )
        lim = 1.12 * max(float(np.nanmax(w_norm, initial=0.0)), float(np.nanmax(h_norm, initial=0.0)), 1e-6)
        fig.update_xaxes(range=[-lim, lim], zeroline=True, tickfont=dict(size=9), **where)
        fig.update_yaxes(
            range=[-lim, lim], scaleanchor=axis_ref(k + 1), scaleratio=1, zeroline=True, tickfont=dict(size=9), **where
        )
    return finish(
        fig,
        title,
        height=130 + 300 * rows,
        width=max(640, 300 * cols + 120),
        legend=dict(orientation="h", y=-0.08),
        margin=dict(t=120),
    )


def loss_curves(
    history: pd.DataFrame,
    labels: Sequence[str],
    *,
    instances: Sequence[int] | None = None,
    title: str = (
        "Training loss per instance<br><sup>importance-weighted squared error, mean over features and batch "
        "(log scale)</sup>"
    ),
) -> go.Figure:
    """One line per instance (at most ``MAX_CURVES``, subsampled evenly) of the recorded training loss.

    Traces: one per drawn instance.
    """
    n = len(labels)
    chosen = np.asarray(instances) if instances is not None else pick_instances(n, MAX_CURVES)
    fig = go.Figure()
    by_inst = {int(k): g for k, g in history.groupby("instance")} if len(history) else {}
    colours = (
        discrete_colours(len(chosen))
        if len(chosen) <= 24
        else sample_colorscale(CONTINUOUS, list(np.linspace(0, 0.95, len(chosen))))
    )
    for colour, k in zip(colours, chosen, strict=True):
        g = by_inst.get(int(k))
        steps = g["step"].to_numpy() if g is not None else np.array([])
        loss = g["loss"].to_numpy(dtype=np.float64) if g is not None else np.array([])
        loss = np.where(loss > 0, loss, np.nan)  # log axis: zero or negative entries cannot be drawn
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=loss,
                mode="lines",
                name=esc(f"{int(k)}: {labels[int(k)]}"),
                line=dict(width=1.5, color=colour),
                hovertemplate=f"instance {int(k)}<br>step %{{x}}<br>loss %{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_yaxes(type="log", exponentformat="power", title_text=f"loss per feature {UNITLESS}")
    fig.update_xaxes(title_text="training step (optimiser steps)")
    return finish(fig, title, height=480, legend=dict(font=dict(size=10)), showlegend=len(chosen) <= MAX_LEGEND)
