"""Figures of the trained loss across instances: compressed computation's L/p against the naive loss (seed 004)
and the loss split into feature benefit and interference (seed 003)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float

from superposition.plots.common import UNITLESS, as_array, esc, finish


def tmcc_loss(
    probability: Float[np.ndarray, " inst"],
    loss: Float[np.ndarray, " inst"],
    naive_loss_per_p: float | Float[np.ndarray, " inst"],
    labels: Sequence[str],
    *,
    title: str = (
        "Compressed computation: loss per feature over feature probability, L/p<br><sup>below the dashed naive "
        "line the model computes more features than it has neurons</sup>"
    ),
) -> go.Figure:
    """Seed 004's yardstick: each instance's loss (per feature) divided by its feature probability p, beside the
    naive loss of computing d of the n features exactly and dropping the rest ((n−d)/(6n) per unit p for TMCC).
    A scalar naive value draws a horizontal line; one value per instance draws a line through them.

    Traces: the trained points and the naive line.
    """
    p, L = as_array(probability), as_array(loss)
    naive = np.broadcast_to(as_array(naive_loss_per_p), p.shape)
    order = np.argsort(p)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=p[order],
            y=(L / p)[order],
            mode="markers+lines" if len(np.unique(p)) > 1 else "markers",
            name="trained model",
            text=[esc(labels[i]) for i in order],
            marker=dict(size=9),
            hovertemplate="%{text}<br>p = %{x:.3g}<br>L/p = %{y:.4f}<extra></extra>",
        )
    )
    lo, hi = float(np.nanmin(p)), float(np.nanmax(p))
    if np.allclose(naive, naive[0], rtol=1e-6):
        nx, ny, name = [lo / 1.5, hi * 1.5], [naive[0], naive[0]], f"naive loss = {naive[0]:.4f} (e.g. (n−d)/(6n))"
    else:
        nx, ny, name = p[order], naive[order], "naive loss"
    fig.add_trace(go.Scatter(x=nx, y=ny, mode="lines", name=name, line=dict(color="black", dash="dash")))
    fig.update_xaxes(type="log", title_text="feature probability p (dimensionless, log scale)")
    fig.update_yaxes(title_text="loss per feature / p (dimensionless)", rangemode="tozero")
    return finish(fig, title, height=460, legend=dict(orientation="h", y=-0.2))


def benefit_interference(
    benefit: Float[np.ndarray, " inst"],
    interference: Float[np.ndarray, " inst"],
    labels: Sequence[str],
    *,
    loss: Float[np.ndarray, " inst"] | None = None,
    title: str = (
        "Loss split of the linear map W<sub>dec</sub>·W<sub>enc</sub><br><sup>feature benefit Σ<sub>i</sub> "
        "I<sub>i</sub>(1−‖W<sub>i</sub>‖²)² and interference Σ<sub>i≠j</sub> "
        "I<sub>j</sub>(W<sub>j</sub>·W<sub>i</sub>)²</sup>"
    ),
) -> go.Figure:
    """Seed 003's decomposition per instance, as grouped bars (and the trained loss as markers, when given).

    Traces: benefit, interference (and loss).
    """
    b, it = as_array(benefit), as_array(interference)
    names = [esc(s) for s in labels]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=b, name="feature benefit term", marker_color="#4c78a8"))
    fig.add_trace(go.Bar(x=names, y=it, name="interference term", marker_color="#e45756"))
    if loss is not None:
        fig.add_trace(
            go.Scatter(
                x=names,
                y=as_array(loss),
                mode="markers",
                name="trained loss (per feature)",
                marker=dict(color="black", size=9, symbol="diamond"),
            )
        )
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text=f"term value {UNITLESS}")
    fig.update_xaxes(title_text="instance")
    return finish(fig, title, height=480, legend=dict(orientation="h", y=-0.3))
