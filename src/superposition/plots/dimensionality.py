"""The paper's geometry figure: dimensions per feature and each feature's dimensionality against 1/(1−S), with the
sticky values (1, 3/4, 2/3, 1/2, 2/5, 3/8) and the configurations that produce them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Bool, Float

from superposition.plots.common import UNITLESS, as_array, discrete_colours, esc, finish, log_ticks

# Sticky feature dimensionalities of the paper's geometry figure and the configuration that produces each.
_STICKY: tuple[tuple[float, str], ...] = (
    (1.0, "1: dedicated dimension"),
    (3 / 4, "3/4: tetrahedron"),
    (2 / 3, "2/3: triangle"),
    (1 / 2, "1/2: digon (antipodal pair)"),
    (2 / 5, "2/5: pentagon"),
    (3 / 8, "3/8: square antiprism"),
)


def geometry(
    probability: Float[np.ndarray, " inst"],
    dims_per_feature: Float[np.ndarray, " inst"],
    feature_dimensionality: Float[np.ndarray, "inst feats"],
    represented: Bool[np.ndarray, "inst feats"],
    groups: Sequence[str] | None = None,
    *,
    title: str = (
        "Geometry of superposition<br><sup>dimensions per feature d/‖W‖<sub>F</sub><sup>2</sup> (line) and "
        "each represented feature's dimensionality D<sub>i</sub> (dots) against 1/(1−S)</sup>"
    ),
) -> go.Figure:
    """The paper's geometry figure: x = 1/(1−S) = 1/p on a log axis; a line of dimensions per feature
    d/‖W‖_F² and a dot per represented feature at its dimensionality D_i; dotted lines at the sticky values
    (1, 3/4, 2/3, 1/2, 2/5, 3/8).

    Traces: two per group (a line and the feature dots); the sticky values are layout lines.
    """
    p, dpf = as_array(probability), as_array(dims_per_feature)
    D, rep = as_array(feature_dimensionality), np.asarray(represented, dtype=bool)
    groups = list(groups) if groups is not None else [""] * len(p)
    fig = go.Figure()
    names = list(dict.fromkeys(groups))
    colours = discrete_colours(len(names))
    for colour, name in zip(colours, names, strict=True):
        idx = np.array([i for i, g in enumerate(groups) if g == name])
        idx = idx[np.argsort(p[idx])[::-1]]
        x = 1.0 / p[idx]
        prefix = f"{name}: " if name else ""
        fig.add_trace(
            go.Scatter(
                x=x,
                y=dpf[idx],
                mode="lines+markers",
                name=esc(prefix) + "dimensions per feature d/‖W‖<sub>F</sub>²",
                line=dict(color=colour, width=2),
                marker=dict(size=6, color=colour),
                hovertemplate="1/p = %{x:.4g}<br>d/‖W‖_F² = %{y:.3f}<extra></extra>",
            )
        )
        sel = rep[idx]
        fx = np.repeat(x, D.shape[1]).reshape(len(idx), -1)[sel]
        fy = D[idx][sel]
        jitter = np.exp(np.random.default_rng(0).uniform(-0.06, 0.06, size=fx.shape))  # keep dots apart
        fig.add_trace(
            go.Scatter(
                x=fx * jitter,
                y=fy,
                mode="markers",
                name=esc(prefix) + "feature dimensionality D<sub>i</sub> (represented features)",
                marker=dict(size=5, color=colour, opacity=0.55, symbol="circle-open"),
                hovertemplate="1/p ≈ %{x:.4g}<br>D_i = %{y:.3f}<extra></extra>",
            )
        )
    shift = {2 / 5: 5, 3 / 8: -5}  # 2/5 and 3/8 lie close: nudge their labels apart
    for value, label in _STICKY:
        fig.add_hline(y=value, line=dict(color="#888", width=1, dash="dot"))
        fig.add_annotation(
            xref="paper",
            x=1.005,
            y=value,
            yshift=shift.get(value, 0),
            xanchor="left",
            showarrow=False,
            text=label,
            font=dict(size=10, color="#666"),
        )
    fig.update_xaxes(
        type="log", title_text="1/(1−S) = 1/p (inverse feature density, dimensionless)", **log_ticks(1.0 / p)
    )
    top = max(1.12, 1.05 * float(np.nanmax(dpf, initial=0.0)))
    fig.update_yaxes(range=[0, top], title_text=f"dimensions per feature, D<sub>i</sub> {UNITLESS}")
    return finish(fig, title, height=500, legend=dict(orientation="h", y=-0.2), margin=dict(l=60, r=170, t=90, b=90))
