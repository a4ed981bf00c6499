"""Figures of the features a model learned, one panel per instance: arrows in a 2-D hidden space, norms coloured
by superposition, each neuron's feature composition (continuous and one colour per feature), and the
feature-to-feature map W·Wᵀ beside the output bias."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from superposition.plots.common import (
    CONTINUOUS,
    DIVERGING,
    MAX_ARROWS,
    SUP,
    SUPERPOSITION_TITLE,
    UNITLESS,
    as_array,
    axis_ref,
    colourbar_trace,
    discrete_colours,
    esc,
    finish,
    grid_shape,
    scale_colours,
    subplot_grid,
)


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
    W, imp = as_array(W), as_array(importance)
    n_inst, hidden, n_feat = W.shape
    if hidden != 2:
        raise ValueError(f"features_2d needs a 2-D hidden space (got {hidden})")
    fig, rows, cols = subplot_grid(titles, cols, max_cols=4)
    lo, hi = float(imp.min()), float(imp.max())
    scaled = (imp - lo) / (hi - lo) if hi > lo else np.full_like(imp, 0.5)
    colours = np.array(sample_colorscale(CONTINUOUS, list(scaled.ravel()))).reshape(imp.shape)
    group_names = list(dict.fromkeys(groups)) if groups is not None else []
    if groups is not None:
        palette = dict(zip(group_names, discrete_colours(len(group_names)), strict=True))
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
                    name=esc(groups[i]) if groups is not None else None,
                    legendgroup=esc(groups[i]) if groups is not None else None,
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
            scaleanchor=axis_ref(idx),
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
    return finish(fig, title, height=100 + 250 * rows, width=max(640, 230 * cols + 170))


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
    norms, sup = as_array(norms), as_array(superposition)
    n_inst, n_feat = norms.shape
    fig, rows, cols = subplot_grid(titles, cols)
    feats = np.arange(n_feat)
    for k in range(n_inst):
        row, col = divmod(k, cols)
        fig.add_trace(
            go.Bar(
                x=norms[k],
                y=feats,
                orientation="h",
                marker=dict(color=scale_colours(sup[k])),
                customdata=sup[k],
                showlegend=False,
                hovertemplate="feature %{y}<br>norm %{x:.3f}<br>superposition %{customdata:.3f}<extra></extra>",
            ),
            row=row + 1,
            col=col + 1,
        )
    fig.add_trace(colourbar_trace(), row=1, col=1)
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
    return finish(fig, title, height=80 + per_row * rows)


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
    W, sup = as_array(W), as_array(superposition)
    n_inst, n_neur, n_feat = W.shape
    fig, rows, cols = subplot_grid(titles, cols)
    for k in range(n_inst):
        row, col = divmod(k, cols)
        neuron, feature, value, base = _stacked(W[k])
        keep = np.abs(value) >= min_weight  # drop invisible slivers: keeps the figure light
        fig.add_trace(
            go.Bar(
                x=neuron[keep],
                y=value[keep],
                base=base[keep],
                marker=dict(color=scale_colours(sup[k][feature[keep]]), line=dict(width=0.5, color="white")),
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
    fig.add_trace(colourbar_trace(), row=1, col=1)
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
    return finish(fig, title, height=80 + 260 * rows)


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
    mats = [(name, as_array(m)) for name, m in weights]
    n_inst, n_neur, n_feat = mats[0][1].shape
    rows_per, (block_rows, cols) = len(mats), grid_shape(n_inst, cols, 6)
    panel_titles = [""] * (block_rows * rows_per * cols)
    for k in range(n_inst):
        br, c = divmod(k, cols)
        for m, (name, _) in enumerate(mats):
            panel_titles[(br * rows_per + m) * cols + c] = esc(f"{titles[k]} · {name}")
    fig = make_subplots(
        rows=block_rows * rows_per,
        cols=cols,
        subplot_titles=panel_titles,
        horizontal_spacing=min(0.06, 0.5 / cols),
        vertical_spacing=min(0.1, 0.6 / (block_rows * rows_per)),
    )
    colours = discrete_colours(n_feat)
    neurons = np.arange(n_neur)
    for k in range(n_inst):
        br, c = divmod(k, cols)
        for m, (_, mat) in enumerate(mats):
            for i in range(n_feat):
                fig.add_trace(
                    go.Bar(
                        x=neurons,
                        y=mat[k, :, i],
                        name=esc(feature_labels[i]),
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
    return finish(fig, title, height=80 + 230 * block_rows * rows_per)


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
    M = as_array(M)
    b = None if bias is None else as_array(bias)
    n_inst, n_feat, _ = M.shape
    rows, cols = grid_shape(n_inst, cols, 4)
    per = 2 if b is not None else 1
    widths = ([1.0, 0.09] if b is not None else [1.0]) * cols
    spec_titles: list[str] = []
    for r in range(rows):
        for c in range(cols):
            k = r * cols + c
            spec_titles.append(esc(titles[k]) if k < n_inst else "")
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
    return finish(fig, title, height=90 + 250 * rows)
