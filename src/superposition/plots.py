"""Plotly figures of trained toy models: pure functions of arrays, plus :func:`figures_for_run` which picks the
figures that fit a run. No training and no file I/O here (exporting lives in ``report`` and ``cli``).

Every title and axis names the quantity and its unit. Figures with one panel per instance draw at most
``MAX_PANELS`` panels, evenly subsampled, so a run with hundreds of instances still makes a light report.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Bool, Float, Int
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from superposition.runs import Run
    from superposition.spec import Experiment

__all__ = [
    "MAX_PANELS",
    "MAX_CURVES",
    "NamedFigure",
    "pick_instances",
    "instance_labels",
    "features_2d",
    "Polygon",
    "polygon_stats",
    "training_geometry",
    "features_nd",
    "features_nd_discrete",
    "neuron_bars",
    "interaction_heatmaps",
    "loss_curves",
    "geometry",
    "phase_diagram",
    "phase_comparison",
    "phase_gap",
    "tmcc_loss",
    "benefit_interference",
    "figures_for_run",
    "figure_names",
    "sae_directions_2d",
    "sae_cosine_heatmap",
    "sae_pareto",
    "sae_dead_latents",
]

MAX_PANELS = 16
"""Most instance panels one figure draws (more instances are subsampled evenly)."""
MAX_CURVES = 40
"""Most loss curves one figure draws."""
MAX_ARROWS = 40
"""Above this many features the 2-D figure draws all arrows of a panel as two traces instead of one per feature."""

CONTINUOUS = "Viridis"
DIVERGING = "RdBu"
TEMPLATE = "plotly_white"
UNITLESS = "(dimensionless)"
MAX_LEGEND = 12
"""Loss figures with more curves than this hide the legend (hovering a curve names its instance)."""
SUP = "Σ<sub>j≠i</sub>(Ŵ<sub>i</sub>·W<sub>j</sub>)²"
SUPERPOSITION_TITLE = (
    "Features in N dimensions: norms and superposition<br><sup>bar length ‖W<sub>i</sub>‖ of {w} (1 = represented), "
    "colour the superposition " + SUP + " (dark: orthogonal to all others; yellow: shares its direction)</sup>"
)

# Sticky feature dimensionalities of the paper's geometry figure and the configuration that produces each.
_STICKY: tuple[tuple[float, str], ...] = (
    (1.0, "1: dedicated dimension"),
    (3 / 4, "3/4: tetrahedron"),
    (2 / 3, "2/3: triangle"),
    (1 / 2, "1/2: digon (antipodal pair)"),
    (2 / 5, "2/5: pentagon"),
    (3 / 8, "3/8: square antiprism"),
)


class NamedFigure(NamedTuple):
    """A figure with the short name ``superposition plot`` knows it by and its heading in the report."""

    name: str
    title: str
    figure: go.Figure


# -- helpers ----------------------------------------------------------------------------------------------------------
def _np(a: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor or array."""
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _esc(text: str) -> str:
    """Escape text for plotly's pseudo-HTML labels (plotly.js shows the entities as the characters)."""
    return html.escape(str(text), quote=False)


def pick_instances(n: int, limit: int = MAX_PANELS) -> np.ndarray:
    """Indices of at most ``limit`` instances spread evenly over ``range(n)`` (first and last included)."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))


def _grid(n: int, cols: int | None = None, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, cols or max_cols) if n else 1
    return max(1, math.ceil(n / cols)), max(1, cols)


def _axis_ref(index: int) -> str:
    return "x" if index == 1 else f"x{index}"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float, np.floating, np.integer)):
        return f"{float(v):.3g}"
    if isinstance(v, str) and v.startswith("["):  # importance lists stored as JSON text
        try:
            import json

            v = json.loads(v)
        except ValueError:
            return v
    if isinstance(v, list):
        shown = ", ".join(_fmt(x) for x in v[:3])
        return f"[{shown}{', …' if len(v) > 3 else ''}]"
    return str(v)


_AXIS_SHORT = {
    "seed": "seed",
    "data.feature_probability": "p",
    "task.importance": "I",
    "task.residual_factor": "k",
    "train.lr": "lr",
    "train.weight_decay": "wd",
    "model.kind": "",
}


def instance_labels(spec: Experiment) -> list[str]:
    """A short label per instance naming the settings that vary across instances ("relu-output, p = 0.01")."""
    axes = [k for k, v in spec.instances.axes.items() if len({json_key(x) for x in v}) > 1]
    labels = []
    for i, point in enumerate(spec.grid()):
        parts = []
        for key in axes:
            short = _AXIS_SHORT.get(key, key.split(".")[-1])
            parts.append(f"{short} = {_fmt(point[key])}" if short else _fmt(point[key]))
        labels.append(", ".join(parts) if parts else f"instance {i}")
    return labels


def json_key(v: Any) -> str:
    """A hashable key for an axis value (lists included)."""
    return repr(v)


def _subplot_grid(titles: Sequence[str], cols: int | None = None, **kwargs: Any) -> tuple[go.Figure, int, int]:
    rows, cols = _grid(len(titles), cols, kwargs.pop("max_cols", 4))
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[_esc(t) for t in titles],
        horizontal_spacing=kwargs.pop("horizontal_spacing", min(0.08, 0.5 / cols)),
        vertical_spacing=kwargs.pop("vertical_spacing", min(0.12, 0.6 / rows)),
        **kwargs,
    )
    return fig, rows, cols


def _finish(fig: go.Figure, title: str, height: int, width: int | None = None, **layout: Any) -> go.Figure:
    margin = {"l": 60, "r": 30, "t": 90, "b": 60, **layout.pop("margin", {})}
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, x=0.01, xanchor="left"),
        height=height,
        width=width,
        margin=margin,
        **layout,
    )
    for ann in fig.layout.annotations:  # subplot titles a little smaller than the default
        if ann.font.size is None:
            ann.font.size = 12
    return fig


def _discrete_colours(n: int) -> list[str]:
    if n <= 10:
        return list(qualitative.Plotly[:n])
    if n <= 24:
        return list(qualitative.Light24[:n])
    return sample_colorscale("Turbo", list(np.linspace(0, 1, n)))


def _colours(values: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> list[str]:
    """Colours of the continuous scale for values in [lo, hi] (clipped; NaN as grey).

    Bars get explicit colours: plotly.js 4 warns for every bar whose colour is a number on a colour axis."""
    v = np.asarray(values, dtype=np.float64)
    scaled = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    out = sample_colorscale(CONTINUOUS, list(np.nan_to_num(scaled)))
    return [c if np.isfinite(x) else "#bbbbbb" for c, x in zip(out, v, strict=True)]


def _colourbar_trace() -> go.Scatter:
    """An invisible trace that draws the shared colour axis's colour bar."""
    return go.Scatter(
        x=[None],
        y=[None],
        mode="markers",
        showlegend=False,
        hoverinfo="skip",
        marker=dict(color=[0.0], coloraxis="coloraxis"),
    )


# -- features ---------------------------------------------------------------------------------------------------------
def features_2d(
    W: Float[np.ndarray, "inst 2 feats"],
    importance: Float[np.ndarray, "inst feats"],
    titles: Sequence[str],
    *,
    title: str = (
        "Features in the 2-D hidden space<br><sup>each feature's embedding W<sub>i</sub> as an arrow, "
        "coloured by its importance I<sub>i</sub></sup>"
    ),
    cols: int | None = None,
    groups: Sequence[str] | None = None,
) -> go.Figure:
    """One panel per instance: each feature's embedding W_i as an arrow from the origin, coloured by importance,
    or, given ``groups`` (one label per feature, e.g. "correlated pair 1"), one colour per group with a legend.

    Traces: one per feature per panel, plus one that carries the importance colour bar (shown only when
    importances differ and no groups are given). With more than
    ``MAX_ARROWS`` features (double descent: 1000 features in 2-D) two per panel instead: all shafts in one grey
    trace, all tips in one trace coloured by importance.
    """
    W, imp = _np(W), _np(importance)
    n_inst, hidden, n_feat = W.shape
    if hidden != 2:
        raise ValueError(f"features_2d needs a 2-D hidden space (got {hidden})")
    fig, rows, cols = _subplot_grid(titles, cols, max_cols=4)
    lo, hi = float(imp.min()), float(imp.max())
    scaled = (imp - lo) / (hi - lo) if hi > lo else np.full_like(imp, 0.5)
    colours = np.array(sample_colorscale(CONTINUOUS, list(scaled.ravel()))).reshape(imp.shape)
    group_names = list(dict.fromkeys(groups)) if groups is not None else []
    if groups is not None:
        palette = dict(zip(group_names, _discrete_colours(len(group_names)), strict=True))
        colours = np.array([[palette[g] for g in groups]] * n_inst)
        title = title.replace("coloured by its importance I<sub>i</sub>", "coloured by group")
    lim = 1.15 * max(1.0, float(np.nanmax(np.abs(W), initial=0.0)))
    for k in range(n_inst):
        row, col = divmod(k, cols)
        if n_feat > MAX_ARROWS:
            _many_arrows(fig, W[k], imp[k], colours[k], row + 1, col + 1)
        for i in range(n_feat if n_feat <= MAX_ARROWS else 0):
            x, y = W[k, 0, i], W[k, 1, i]
            fig.add_trace(
                go.Scatter(
                    x=[0.0, x],
                    y=[0.0, y],
                    mode="lines+markers",
                    line=dict(color=colours[k, i], width=2),
                    marker=dict(size=[0, 7], color=colours[k, i]),
                    name=_esc(groups[i]) if groups is not None else None,
                    legendgroup=_esc(groups[i]) if groups is not None else None,
                    showlegend=groups is not None and k == 0 and groups.index(groups[i]) == i,
                    hovertemplate=(
                        f"feature {i}<br>importance {imp[k, i]:.3g}<br>W<sub>i</sub> = ({x:.3f}, {y:.3f})"
                        f"<br>norm {math.hypot(x, y):.3f}<extra></extra>"
                    ),
                ),
                row=row + 1,
                col=col + 1,
            )
        idx = k + 1
        fig.update_xaxes(range=[-lim, lim], zeroline=True, showticklabels=False, row=row + 1, col=col + 1)
        fig.update_yaxes(
            range=[-lim, lim],
            scaleanchor=_axis_ref(idx),
            scaleratio=1,
            zeroline=True,
            showticklabels=False,
            row=row + 1,
            col=col + 1,
        )
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            showlegend=False,
            hoverinfo="skip",
            marker=dict(
                colorscale=CONTINUOUS,
                cmin=lo,
                cmax=hi if hi > lo else lo + 1e-9,
                color=[lo],
                showscale=hi > lo and groups is None,
                colorbar=dict(title=dict(text="importance I<sub>i</sub><br>(loss weight)"), thickness=12),
            ),
        )
    )
    return _finish(fig, title, height=100 + 250 * rows, width=max(640, 230 * cols + 170))


def _many_arrows(fig: go.Figure, W: np.ndarray, imp: np.ndarray, colours: np.ndarray, row: int, col: int) -> None:
    n = W.shape[-1]
    shafts = np.full((n, 3, 2), np.nan)
    shafts[:, 0] = 0.0
    shafts[:, 1] = W.T
    fig.add_trace(
        go.Scatter(
            x=shafts[:, :, 0].ravel(),
            y=shafts[:, :, 1].ravel(),
            mode="lines",
            line=dict(color="rgba(120,120,120,0.35)", width=1),
            showlegend=False,
            hoverinfo="skip",
        ),
        row=row,
        col=col,
    )
    fig.add_trace(
        go.Scatter(
            x=W[0],
            y=W[1],
            mode="markers",
            marker=dict(size=4, color=list(colours)),
            customdata=np.stack([np.arange(n), imp], axis=-1),
            showlegend=False,
            hovertemplate="feature %{customdata[0]}<br>importance %{customdata[1]:.3g}<extra></extra>",
        ),
        row=row,
        col=col,
    )


# -- training points and features of a fixed training set (double descent) -------------------------------------------
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
    fig, rows, cols = _subplot_grid(titles, cols, max_cols=3)
    feature_colour, point_colour = qualitative.Plotly[0], qualitative.Plotly[1]
    for k, (W, H) in enumerate(zip(features, points, strict=True)):
        W, H = _np(W).reshape(2, -1), _np(H).reshape(-1, 2)
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
            range=[-lim, lim], scaleanchor=_axis_ref(k + 1), scaleratio=1, zeroline=True, tickfont=dict(size=9), **where
        )
    return _finish(
        fig,
        title,
        height=130 + 300 * rows,
        width=max(640, 300 * cols + 120),
        legend=dict(orientation="h", y=-0.08),
        margin=dict(t=120),
    )


def features_nd(
    norms: Float[np.ndarray, "inst feats"],
    superposition: Float[np.ndarray, "inst feats"],
    titles: Sequence[str],
    *,
    title: str = SUPERPOSITION_TITLE.format(w="W"),
    cols: int | None = None,
) -> go.Figure:
    """One panel per instance: a horizontal bar per feature, its length the norm ‖W_i‖ (1 = represented), its colour
    the feature's superposition with the others (0 = orthogonal to all, dark; ≥ 1 = fully shared, yellow).

    Traces: one bar trace per panel, plus one that carries the colour bar.
    """
    norms, sup = _np(norms), _np(superposition)
    n_inst, n_feat = norms.shape
    fig, rows, cols = _subplot_grid(titles, cols)
    feats = np.arange(n_feat)
    for k in range(n_inst):
        row, col = divmod(k, cols)
        fig.add_trace(
            go.Bar(
                x=norms[k],
                y=feats,
                orientation="h",
                marker=dict(color=_colours(sup[k])),
                customdata=sup[k],
                showlegend=False,
                hovertemplate="feature %{y}<br>norm %{x:.3f}<br>superposition %{customdata:.3f}<extra></extra>",
            ),
            row=row + 1,
            col=col + 1,
        )
    fig.add_trace(_colourbar_trace(), row=1, col=1)
    fig.update_yaxes(autorange="reversed", showticklabels=n_feat <= 40, dtick=1 if n_feat <= 20 else None)
    fig.update_yaxes(title_text="feature i", col=1)
    fig.update_xaxes(range=[0, max(1.2, 1.05 * float(norms.max(initial=0.0)))])
    fig.update_xaxes(title_text=f"‖W<sub>i</sub>‖ {UNITLESS}", row=rows)
    fig.update_layout(
        coloraxis=dict(
            colorscale=CONTINUOUS,
            cmin=0,
            cmax=1,
            colorbar=dict(title=dict(text=f"superposition<br>{SUP}"), thickness=12),
        ),
        bargap=0.15,
    )
    per_row = max(180, min(420, 14 * n_feat + 60))
    return _finish(fig, title, height=80 + per_row * rows)


def _stacked(values: Float[np.ndarray, "neurons feats"]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Segments of signed stacked bars: positive parts stack up from 0, negative parts down (feature order)."""
    n_neur, n_feat = values.shape
    pos = np.where(values > 0, values, 0.0)
    neg = np.where(values < 0, values, 0.0)
    base = np.where(values > 0, np.cumsum(pos, axis=1) - pos, np.cumsum(neg, axis=1) - neg)
    neuron = np.repeat(np.arange(n_neur), n_feat)
    feature = np.tile(np.arange(n_feat), n_neur)
    return neuron, feature, values.ravel(), base.ravel()


def neuron_bars(
    W: Float[np.ndarray, "inst neurons feats"],
    superposition: Float[np.ndarray, "inst feats"],
    titles: Sequence[str],
    *,
    title: str = (
        "Feature composition of each neuron<br><sup>its weights W<sub>n,i</sub> to every feature stacked "
        "(positive up, negative down), coloured by the feature's superposition</sup>"
    ),
    cols: int | None = None,
    min_weight: float = 1e-3,
) -> go.Figure:
    """One panel per instance: for each neuron (hidden dimension) a stacked bar of its weights W_{n,i} to every
    feature (positive up, negative down), each segment coloured by that feature's superposition (seed 000's
    neuron plot). A monosemantic neuron is one tall segment; a polysemantic one a tower of several.

    Traces: one bar trace per panel (segments placed with explicit bases), plus one that carries the colour bar.
    """
    W, sup = _np(W), _np(superposition)
    n_inst, n_neur, n_feat = W.shape
    fig, rows, cols = _subplot_grid(titles, cols)
    for k in range(n_inst):
        row, col = divmod(k, cols)
        neuron, feature, value, base = _stacked(W[k])
        keep = np.abs(value) >= min_weight  # drop invisible slivers: keeps the figure light
        fig.add_trace(
            go.Bar(
                x=neuron[keep],
                y=value[keep],
                base=base[keep],
                marker=dict(color=_colours(sup[k][feature[keep]]), line=dict(width=0.5, color="white")),
                customdata=np.stack([feature[keep], sup[k][feature[keep]]], axis=-1),
                showlegend=False,
                hovertemplate=(
                    "neuron %{x}<br>feature %{customdata[0]}<br>W = %{y:.3f}"
                    "<br>superposition %{customdata[1]:.3f}<extra></extra>"
                ),
            ),
            row=row + 1,
            col=col + 1,
        )
    fig.add_trace(_colourbar_trace(), row=1, col=1)
    fig.update_layout(
        barmode="overlay",
        bargap=0.2,
        coloraxis=dict(
            colorscale=CONTINUOUS,
            cmin=0,
            cmax=1,
            colorbar=dict(title=dict(text="superposition<br>of the feature"), thickness=12),
        ),
    )
    fig.update_xaxes(dtick=1 if n_neur <= 20 else None)
    fig.update_xaxes(title_text="neuron n", row=rows)
    fig.update_yaxes(title_text=f"W<sub>n,i</sub> {UNITLESS}", col=1)
    return _finish(fig, title, height=80 + 260 * rows)


def features_nd_discrete(
    weights: Sequence[tuple[str, Float[np.ndarray, "inst neurons feats"]]],
    titles: Sequence[str],
    feature_labels: Sequence[str],
    *,
    title: str = (
        "Neuron weights coloured by feature<br><sup>per neuron the stacked weights of each matrix, one "
        "colour per feature (click a feature in the legend to hide it)</sup>"
    ),
    cols: int | None = None,
) -> go.Figure:
    """Seed 000's discrete variant: per instance and per weight matrix (e.g. W1 and W2ᵀ), a stacked bar per neuron
    with one colour per feature, so antipodal neuron pairs and asymmetric motifs show up by colour.

    Traces: one bar trace per feature per (instance, matrix) panel; clicking a feature in the legend hides it in
    every panel.
    """
    mats = [(name, _np(m)) for name, m in weights]
    n_inst, n_neur, n_feat = mats[0][1].shape
    rows_per, (block_rows, cols) = len(mats), _grid(n_inst, cols, 6)
    panel_titles = [""] * (block_rows * rows_per * cols)
    for k in range(n_inst):
        br, c = divmod(k, cols)
        for m, (name, _) in enumerate(mats):
            panel_titles[(br * rows_per + m) * cols + c] = _esc(f"{titles[k]} · {name}")
    fig = make_subplots(
        rows=block_rows * rows_per,
        cols=cols,
        subplot_titles=panel_titles,
        horizontal_spacing=min(0.06, 0.5 / cols),
        vertical_spacing=min(0.1, 0.6 / (block_rows * rows_per)),
    )
    colours = _discrete_colours(n_feat)
    neurons = np.arange(n_neur)
    for k in range(n_inst):
        br, c = divmod(k, cols)
        for m, (_, mat) in enumerate(mats):
            for i in range(n_feat):
                fig.add_trace(
                    go.Bar(
                        x=neurons,
                        y=mat[k, :, i],
                        name=_esc(feature_labels[i]),
                        legendgroup=f"feature-{i}",
                        showlegend=k == 0 and m == 0,
                        marker=dict(color=colours[i], line=dict(width=0.3, color="white")),
                        hovertemplate=f"feature {i}<br>neuron %{{x}}<br>weight %{{y:.3f}}<extra></extra>",
                    ),
                    row=br * rows_per + m + 1,
                    col=c + 1,
                )
    fig.update_layout(barmode="relative", bargap=0.15, legend=dict(title=dict(text="feature"), tracegroupgap=0))
    fig.update_xaxes(dtick=1 if n_neur <= 20 else None)
    fig.update_xaxes(title_text="neuron n", row=block_rows * rows_per)
    fig.update_yaxes(title_text=f"weight {UNITLESS}", col=1)
    return _finish(fig, title, height=80 + 230 * block_rows * rows_per)


def interaction_heatmaps(
    M: Float[np.ndarray, "inst feats feats"],
    bias: Float[np.ndarray, "inst feats"] | None,
    titles: Sequence[str],
    *,
    title: str = (
        "Feature-to-feature map W<sub>dec</sub>·W<sub>enc</sub> beside the output bias b<br><sup>row i: "
        "input feature, column j: output feature; for tied weights the entries are "
        "W<sub>i</sub>·W<sub>j</sub> (seed 001's W·Wᵀ)</sup>"
    ),
    cols: int | None = None,
) -> go.Figure:
    """Seed 001's picture: per instance the (feats × feats) matrix of how much input feature i writes to output
    feature j (WᵀW for tied weights; its diagonal counts the learned features), and the output bias as a column.
    One colour scale shared by every panel and the biases (white 0, blue positive, red negative).

    Traces: one heatmap per panel, plus one per bias column.
    """
    M = _np(M)
    b = None if bias is None else _np(bias)
    n_inst, n_feat, _ = M.shape
    rows, cols = _grid(n_inst, cols, 4)
    per = 2 if b is not None else 1
    widths = ([1.0, 0.09] if b is not None else [1.0]) * cols
    spec_titles: list[str] = []
    for r in range(rows):
        for c in range(cols):
            k = r * cols + c
            spec_titles.append(_esc(titles[k]) if k < n_inst else "")
            if b is not None:
                spec_titles.append("b" if k < n_inst else "")
    fig = make_subplots(
        rows=rows,
        cols=cols * per,
        column_widths=widths,
        subplot_titles=spec_titles,
        horizontal_spacing=min(0.03, 0.3 / (cols * per)),
        vertical_spacing=min(0.12, 0.6 / rows),
    )
    vmax = float(np.abs(M).max(initial=0.0))
    if b is not None:
        vmax = max(vmax, float(np.abs(b).max(initial=0.0)))
    vmax = vmax or 1.0
    feats = np.arange(n_feat)
    for k in range(n_inst):
        r, c = divmod(k, cols)
        fig.add_trace(
            go.Heatmap(
                z=M[k],
                x=feats,
                y=feats,
                coloraxis="coloraxis",
                hovertemplate="input feature %{y} → output feature %{x}<br>%{z:.3f}<extra></extra>",
            ),
            row=r + 1,
            col=c * per + 1,
        )
        fig.update_yaxes(autorange="reversed", row=r + 1, col=c * per + 1)
        fig.update_xaxes(scaleanchor=None, row=r + 1, col=c * per + 1)
        if b is not None:
            fig.add_trace(
                go.Heatmap(
                    z=b[k][:, None],
                    x=["b"],
                    y=feats,
                    coloraxis="coloraxis",
                    hovertemplate="bias of output feature %{y}<br>%{z:.3f}<extra></extra>",
                ),
                row=r + 1,
                col=c * per + 2,
            )
            fig.update_yaxes(autorange="reversed", showticklabels=False, row=r + 1, col=c * per + 2)
            fig.update_xaxes(showticklabels=False, row=r + 1, col=c * per + 2)
    fig.update_yaxes(title_text="input feature i", col=1)
    fig.update_xaxes(title_text="output feature j", row=rows)
    for c in range(cols):
        if b is not None:
            fig.update_xaxes(title_text="", row=rows, col=c * per + 2)
    fig.update_layout(
        coloraxis=dict(
            colorscale=DIVERGING,
            cmin=-vmax,
            cmax=vmax,
            colorbar=dict(title=dict(text=f"weight product<br>{UNITLESS}"), thickness=12),
        )
    )
    return _finish(fig, title, height=90 + 250 * rows)


# -- training and theory ----------------------------------------------------------------------------------------------
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
        _discrete_colours(len(chosen))
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
                name=_esc(f"{int(k)}: {labels[int(k)]}"),
                line=dict(width=1.5, color=colour),
                hovertemplate=f"instance {int(k)}<br>step %{{x}}<br>loss %{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_yaxes(type="log", exponentformat="power", title_text=f"loss per feature {UNITLESS}")
    fig.update_xaxes(title_text="training step (optimiser steps)")
    return _finish(fig, title, height=480, legend=dict(font=dict(size=10)), showlegend=len(chosen) <= MAX_LEGEND)


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
    p, dpf = _np(probability), _np(dims_per_feature)
    D, rep = _np(feature_dimensionality), np.asarray(represented, dtype=bool)
    groups = list(groups) if groups is not None else [""] * len(p)
    fig = go.Figure()
    names = list(dict.fromkeys(groups))
    colours = _discrete_colours(len(names))
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
                name=_esc(prefix) + "dimensions per feature d/‖W‖<sub>F</sub>²",
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
                name=_esc(prefix) + "feature dimensionality D<sub>i</sub> (represented features)",
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
        type="log", title_text="1/(1−S) = 1/p (inverse feature density, dimensionless)", **_log_ticks(1.0 / p)
    )
    top = max(1.12, 1.05 * float(np.nanmax(dpf, initial=0.0)))
    fig.update_yaxes(range=[0, top], title_text=f"dimensions per feature, D<sub>i</sub> {UNITLESS}")
    return _finish(fig, title, height=500, legend=dict(orientation="h", y=-0.2), margin=dict(l=60, r=170, t=90, b=90))


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
    x, y, win = _np(x), _np(y), np.asarray(winner, dtype=np.int64)
    K = len(names)
    region = _discrete_colours(max(K, 1))
    light = [_lighten(c, 0.55) for c in region]
    scale: list[list[Any]] = []
    for k in range(K):
        scale += [[k / K, light[k]], [(k + 1) / K, light[k]]]
    text = np.array([_esc(n) for n in names], dtype=object)[np.clip(win, 0, K - 1)]
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
            go.Scatter(x=_np(bx), y=_np(by), mode="lines", name=_esc(name), line=dict(color="black", width=2))
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
            x=cx, y=cy, text=f"<b>{_esc(name)}</b>", showarrow=False, font=dict(size=12, color=_darken(region[k]))
        )
    if points_x is not None and points_y is not None and points_label is not None:
        px, py, pl = _np(points_x), _np(points_y), np.asarray(points_label, dtype=np.int64)
        for k in sorted(set(pl.tolist())):
            sel = pl == k
            name = names[k] if 0 <= k < K else "other"
            colour = _darken(region[k]) if 0 <= k < K else "#444"
            fig.add_trace(
                go.Scatter(
                    x=px[sel],
                    y=py[sel],
                    mode="markers",
                    name=_esc(f"trained: {name}"),
                    marker=dict(size=9, color=colour, line=dict(color="white", width=1.5), symbol="circle"),
                    hovertemplate=f"trained point<br>x = %{{x:.3g}}<br>y = %{{y:.3g}}<br>{_esc(name)}<extra></extra>",
                )
            )
    fig.update_xaxes(type="log" if log_x else "linear", title_text=x_title, **(_log_ticks(x) if log_x else {}))
    fig.update_yaxes(type="log" if log_y else "linear", title_text=y_title, **(_log_ticks(y) if log_y else {}))
    return _finish(fig, title, height=620, width=900, legend=dict(orientation="h", y=-0.16), margin=dict(t=120))


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
        f"({_esc(analytic.convention)} convention); dots: each cell's best trained seed; crosses: disagreement</sup>"
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
        **_log_ticks(x),
    )
    fig.update_yaxes(
        type="log", title_text="feature density 1−S (probability of being active, log scale)", **_log_ticks(y)
    )
    title = title or (
        f"Loss gap between the best and second-best candidate, {n} features in {m} dimension{'s' if m > 1 else ''}"
        f"<br><sup>(L<sub>2nd</sub> − L<sub>best</sub>)/L<sub>best</sub> in percent, log colour scale "
        f"({_esc(analytic.convention)} convention); dark cells sit on a phase boundary</sup>"
    )
    return _finish(fig, title, height=600, width=900)


def _log_ticks(values: np.ndarray) -> dict[str, Any]:
    """Ticks at 1, 2, 5 × 10^k inside the range of ``values``, labelled in plain numbers."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    ticks = [
        m * 10.0**k
        for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        for m in (1, 2, 5)
        if lo * (1 - 1e-9) <= m * 10.0**k <= hi * (1 + 1e-9)
    ]
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def _rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.strip()
    if colour.startswith("#"):
        h = colour[1:]
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    nums = colour[colour.index("(") + 1 : colour.index(")")].split(",")
    return int(float(nums[0])), int(float(nums[1])), int(float(nums[2]))


def _lighten(colour: str, amount: float) -> str:
    r, g, b = _rgb(colour)
    return "rgb({},{},{})".format(*(round(v + (255 - v) * amount) for v in (r, g, b)))


def _darken(colour: str, amount: float = 0.25) -> str:
    r, g, b = _rgb(colour)
    return "rgb({},{},{})".format(*(round(v * (1 - amount)) for v in (r, g, b)))


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
    p, L = _np(probability), _np(loss)
    naive = np.broadcast_to(_np(naive_loss_per_p), p.shape)
    order = np.argsort(p)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=p[order],
            y=(L / p)[order],
            mode="markers+lines" if len(np.unique(p)) > 1 else "markers",
            name="trained model",
            text=[_esc(labels[i]) for i in order],
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
    return _finish(fig, title, height=460, legend=dict(orientation="h", y=-0.2))


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
    b, it = _np(benefit), _np(interference)
    names = [_esc(s) for s in labels]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=b, name="feature benefit term", marker_color="#4c78a8"))
    fig.add_trace(go.Bar(x=names, y=it, name="interference term", marker_color="#e45756"))
    if loss is not None:
        fig.add_trace(
            go.Scatter(
                x=names,
                y=_np(loss),
                mode="markers",
                name="trained loss (per feature)",
                marker=dict(color="black", size=9, symbol="diamond"),
            )
        )
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text=f"term value {UNITLESS}")
    fig.update_xaxes(title_text="instance")
    return _finish(fig, title, height=480, legend=dict(orientation="h", y=-0.3))


# -- choosing the figures of a run -----------------------------------------------------------------------------------
FIGURES: dict[str, tuple[str, str]] = {
    "features-2d": ("Features in 2-D", "arrows W_i per feature (bottleneck models with d_hidden = 2)"),
    "features-nd": ("Features in N-D", "feature norms coloured by superposition (every model)"),
    "neuron-bars": ("Neurons: feature composition", "stacked weights per neuron (neuron, mlp, residual-mlp)"),
    "features-discrete": ("Neurons: weights by feature", "W1 and W2 per neuron, one colour per feature (≤ 24)"),
    "interaction": ("Feature map W·Wᵀ and bias", "heatmaps beside the output bias (≤ 64 features)"),
    "benefit-interference": ("Benefit and interference", "the two terms of the loss (bottleneck models)"),
    "geometry": ("Geometry", "dimensions per feature against 1/(1−S), sticky values (≥ 3 probabilities)"),
    "phase": ("Phase diagram", "analytic regimes and trained points (≤ 4 features, importance × density grid)"),
    "tmcc": ("Compressed computation", "L/p against the naive loss (residual-mlp, signed inputs, l2 loss)"),
    "loss": ("Training loss", "loss curve per instance (every run)"),
}
"""Every figure name :func:`figures_for_run` may return: (heading, what it shows and where it applies)."""


def figure_names() -> list[str]:
    """All figure names, in report order."""
    return list(FIGURES)


def _varies(spec: Experiment, key: str) -> bool:
    return len({json_key(v) for v in spec.instance_values(key)}) > 1


def _pair_labels(spec: Experiment, chosen: np.ndarray) -> list[str]:
    labels = instance_labels(spec)
    return [labels[int(k)] for k in chosen]


def figures_for_run(run: Run) -> list[NamedFigure]:
    """The figures that fit the run's model kind and instance grid (see ``FIGURES``), in report order."""
    import torch

    from superposition import metrics
    from superposition.data import importance_tensor

    spec, model = run.spec, run.model
    kind, n_feat, hidden = spec.model.kind, spec.model.n_features, spec.model.d_hidden
    chosen = pick_instances(spec.n_instances)
    titles = _pair_labels(spec, chosen)
    all_labels = instance_labels(spec)
    sel = torch.as_tensor(chosen)
    with torch.no_grad():
        W = model.encoder.detach().float().cpu()
        W_sel = W[sel]
        imp = importance_tensor(spec).float()
        sup = metrics.superposition(W_sel)
        untied = kind != "residual-mlp" and not model.tied
        W2 = model.W2.detach().float().cpu() if untied else None
    bottleneck = kind in ("linear", "relu-output")
    out: list[NamedFigure] = []

    def add(name: str, fig: go.Figure) -> None:
        out.append(NamedFigure(name, FIGURES[name][0], fig))

    if bottleneck and hidden == 2:
        add("features-2d", features_2d(W_sel.numpy(), imp[sel].numpy(), titles, groups=_feature_groups(spec)))
    enc_name = "W" if model.tied and kind != "residual-mlp" else "W1" if kind != "residual-mlp" else "W_in·W_Eᵀ"
    add(
        "features-nd",
        features_nd(
            metrics.feature_norms(W_sel).numpy(),
            sup.numpy(),
            titles,
            title=SUPERPOSITION_TITLE.format(w=enc_name),
        ),
    )
    if not bottleneck:
        add("neuron-bars", neuron_bars(metrics.neuron_composition(W_sel).weights.numpy(), sup.numpy(), titles))
        if kind in ("neuron", "mlp") and n_feat <= 24:
            mats = [(enc_name, W_sel.numpy())]
            if W2 is not None:
                mats.append(("W2ᵀ", W2[sel].transpose(-1, -2).numpy()))
            names = [f"{i}: I = {imp[int(chosen[0]), i]:.3g}" for i in range(n_feat)]
            add("features-discrete", features_nd_discrete(mats, titles, names))
    if kind != "residual-mlp" and n_feat <= 64:
        with torch.no_grad():
            M = metrics.readout_matrix(W_sel, W2[sel] if W2 is not None else None)
        bias = model.b_final.detach().float().cpu()[sel].numpy() if hasattr(model, "b_final") else None
        # Rows: input feature, columns: output feature, as seed 001 draws it.
        add("interaction", interaction_heatmaps(M.transpose(-1, -2).numpy(), bias, titles))
    if bottleneck:
        with torch.no_grad():
            split = metrics.loss_split(metrics.readout_matrix(W, W2), imp)
        add("benefit-interference", benefit_interference(split.benefit.numpy(), split.interference.numpy(), all_labels))
    probs = np.asarray(spec.instance_values("data.feature_probability"), dtype=np.float64)
    if bottleneck and n_feat > hidden and len(np.unique(probs)) >= 3:
        with torch.no_grad():
            geo = metrics.recognise_geometry(W)
            dpf = metrics.dims_per_feature(W)
        groups = _group_labels(spec, exclude=("data.feature_probability", "seed"))
        add(
            "geometry",
            geometry(probs, dpf.numpy(), geo.dimensionality.numpy(), (~torch.isnan(geo.sticky)).numpy(), groups),
        )
    phase = _phase_figure(run, W)
    if phase is not None:
        add("phase", phase)
    if kind == "residual-mlp" and spec.task.loss == "l2" and spec.data.magnitude == "signed":
        from superposition.theory import naive_loss

        naive = naive_loss(spec) / n_feat / probs  # the run's loss is a mean over features
        if np.all(np.isfinite(naive)):
            add("tmcc", tmcc_loss(probs, run.instances["loss"].to_numpy(dtype=np.float64), naive, all_labels))
    add("loss", loss_curves(run.history, all_labels))
    return out


def _feature_groups(spec: Experiment) -> list[str] | None:
    """Pair labels per feature for correlated / anticorrelated data (columns: correlated pairs first), else None."""
    nc, na = spec.n_pairs
    if not (nc or na) or spec.data.kind == "hierarchy":
        return None
    labels = [f"correlated pair {k + 1}" for k in range(nc) for _ in range(2)]
    labels += [f"anticorrelated pair {k + 1}" for k in range(na) for _ in range(2)]
    return labels + ["independent"] * (spec.model.n_features - len(labels))


def _group_labels(spec: Experiment, exclude: Sequence[str]) -> list[str]:
    """Per instance, the varying settings other than ``exclude`` (instances sharing them form one line)."""
    axes = [k for k in spec.instances.axes if k not in exclude and _varies(spec, k)]
    out = []
    for point in spec.grid():
        parts = []
        for key in axes:
            short = _AXIS_SHORT.get(key, key.split(".")[-1])
            parts.append(f"{short} = {_fmt(point[key])}" if short else _fmt(point[key]))
        out.append(", ".join(parts))
    return out


def _phase_figure(run: Run, W: Any) -> go.Figure | None:
    """The analytic phase diagram of a small ReLU-output run that sweeps importance and density, with the trained
    instances on top (2 features in 1 dimension, 3 in 2, ...: any n ≤ 4 features in fewer dimensions)."""
    spec = run.spec
    n, m = spec.model.n_features, spec.model.d_hidden
    kinds = set(spec.instance_values("model.kind"))
    if kinds != {"relu-output"} or not spec.model.tied or not (2 <= n <= 4 and m < n):
        return None
    if not (_varies(spec, "task.importance") and _varies(spec, "data.feature_probability")):
        return None
    if spec.data.kind != "sparse" or spec.data.magnitude != "uniform" or spec.data.normalize:
        return None
    if spec.task.target != "identity" or spec.task.loss != "l2" or not spec.model.bias_out:
        return None
    from superposition import theory
    from superposition.data import importance_tensor

    imp = importance_tensor(spec).double().numpy()
    r = imp[:, -1] / imp[:, 0]
    p = np.asarray(spec.instance_values("data.feature_probability"), dtype=np.float64)
    rr = np.geomspace(min(r.min(), 0.1), max(r.max(), 10.0), 61)
    ss = np.geomspace(min(p.min(), 0.01), 1.0, 61)
    ratios = all(not isinstance(v, list) for v in spec.instance_values("task.importance"))
    if ratios:  # I_i = r^i: the last feature's relative importance is r^(n-1)
        rows = (rr[:, None] ** (1.0 / (n - 1))) ** np.arange(n)[None, :]
    else:  # explicit lists: vary the last entry relative to the first, the others as in instance 0
        rows = np.repeat(imp[:1], len(rr), axis=0)
        rows[:, -1] = rr * imp[0, 0]
    diagram = theory.analytic_phase_diagram(n, m, rows, ss, convention="paper")
    names = [c.name for c in diagram.candidates]
    labels = _nearest_candidate(W.double().numpy(), np.stack([c.gram for c in diagram.candidates]))
    boundaries: list[tuple[str, np.ndarray, np.ndarray]] = []
    if (n, m) == (2, 1):
        boundaries.append(("closed-form boundary s* = 4r/(5r+2), 4/(5+2r)", rr, theory.two_by_one_boundary(rr)))
    return phase_diagram(
        rr,
        ss,
        diagram.winner.T,
        names,
        points_x=r,
        points_y=p,
        points_label=labels,
        boundaries=boundaries,
        x_title=f"relative importance I<sub>{n}</sub>/I<sub>1</sub> of the last feature (dimensionless, log scale)",
        title=(
            f"Phase diagram, {n} features in {m} dimension{'s' if m > 1 else ''}<br><sup>background: the "
            "lowest-loss solution in closed form (paper conventions; features numbered from 1)<br>dots: trained "
            "instances, coloured by the solution nearest to their W·Wᵀ</sup>"
        ),
    )


def _nearest_candidate(
    W: Float[np.ndarray, "inst hidden feats"], grams: Float[np.ndarray, "cands feats feats"], tol: float = 0.5
) -> Int[np.ndarray, " inst"]:
    """The candidate whose Gram matrix WᵀW is nearest to each trained instance's (orientation does not matter);
    -1 where even the nearest is further than ``tol`` relative to its own size."""
    G = np.einsum("khi,khj->kij", W, W)
    dist = np.linalg.norm(G[:, None] - grams[None], axis=(-2, -1))
    rel = dist / np.maximum(np.linalg.norm(grams, axis=(-2, -1)), 1.0)[None]
    best = rel.argmin(axis=-1)
    return np.where(rel[np.arange(len(best)), best] <= tol, best, -1)


# -- sparse autoencoders ---------------------------------------------------------------------------------------------
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
    F, L = _np(features), _np(latents)
    F = F / np.maximum(np.linalg.norm(F, axis=-1).max(axis=-1, initial=0.0), 1e-12)[:, None, None]
    is_dead = np.zeros(L.shape[:2], dtype=bool) if dead is None else np.asarray(dead, dtype=bool)
    n_panels, n_dirs, _ = F.shape
    n_lat = L.shape[1]
    labels = list(feature_labels) if feature_labels is not None else [f"f{i}" for i in range(n_dirs)]
    colours = _discrete_colours(n_lat)
    fig, rows, cols = _subplot_grid(titles, cols, max_cols=8)
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
                    hovertemplate=f"true feature {_esc(labels[i])}<br>({x:.3f}, {y:.3f})<extra></extra>",
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
            scaleanchor=_axis_ref(k + 1),
            scaleratio=1,
            zeroline=True,
            showticklabels=False,
            row=row + 1,
            col=col + 1,
        )
    return _finish(fig, title, height=80 + 200 * rows, width=max(640, 180 * cols + 200))


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
    C = _np(cosine)
    n_panels, n_lat, n_dirs = C.shape
    fig, rows, cols = _subplot_grid(titles, cols, max_cols=3)
    xs = [_esc(s) for s in feature_labels]
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
    return _finish(fig, title, height=100 + max(220, 26 * n_lat + 80) * rows)


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
        subplot_titles=[_esc(_SAE_AXIS.get(y, y)) for y in ys],
        horizontal_spacing=0.08,
    )
    names = list(dict.fromkeys(table[curve].tolist()))
    colours = _discrete_colours(max(1, len(names)))
    for c, name in enumerate(names):
        sub = table[table[curve] == name].sort_values(x)
        for p, y in enumerate(ys):
            fig.add_trace(
                go.Scatter(
                    x=sub[x].to_numpy(dtype=np.float64),
                    y=sub[y].to_numpy(dtype=np.float64),
                    mode="lines+markers",
                    name=_esc(name),
                    legendgroup=_esc(name),
                    showlegend=p == 0,
                    line=dict(color=colours[c]),
                    marker=dict(size=8),
                    text=[_esc(s) for s in sub[label]],
                    hovertemplate=f"{_esc(name)}<br>%{{text}}<br>{x} = %{{x:.3g}}<br>{y} = %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=p + 1,
            )
    log_x = bool((table[x].to_numpy(dtype=np.float64) > 0).all())
    fig.update_xaxes(title_text=_esc(_SAE_AXIS.get(x, x) + (" (log scale)" if log_x else "")))
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
                    name=_esc(reference_name),
                    legendgroup="reference",
                    showlegend=p == 0,
                    hoverinfo="skip",
                ),
                row=1,
                col=p + 1,
            )
    return _finish(fig, title, height=460, legend=dict(orientation="h", y=-0.25))


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
    colours = _discrete_colours(max(1, len(names)))
    for c, name in enumerate(names):
        sub = history[history["series"] == name].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=sub["step"].to_numpy(),
                y=sub["dead"].to_numpy(dtype=np.float64),
                mode="lines",
                name=_esc(name),
                legendgroup=_esc(name),
                line=dict(color=colours[c]),
                hovertemplate=f"{_esc(name)}<br>step %{{x}}<br>dead %{{y:.3g}}<extra></extra>",
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
                    name=_esc(f"{name}: resampled"),
                    legendgroup=_esc(name),
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
    return _finish(fig, title, height=420, legend=dict(orientation="h", y=-0.25))
