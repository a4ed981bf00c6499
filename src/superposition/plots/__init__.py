"""Plotly figures of trained toy models: pure functions of arrays, plus :func:`figures_for_run` which picks the
figures that fit a run. No training and no file I/O here (exporting lives in ``report`` and ``cli``).

Every title and axis names the quantity and its unit. Figures with one panel per instance draw at most
``MAX_PANELS`` panels, evenly subsampled, so a run with hundreds of instances still makes a light report; a run
with several seeds per setting shows the best seed of each setting (``best.best_of_seeds``).

The package by figure family (each module imports only ``common``; this file holds the registry of a run's figures)::

    common.py          limits (MAX_PANELS, MAX_CURVES, MAX_ARROWS), colour scales, units, NamedFigure, instance labels
                       and subsampling, subplot grids, the shared layout, colour and log-tick helpers
    features.py        features_2d, features_nd, neuron_bars, features_nd_discrete, interaction_heatmaps
    dimensionality.py  geometry: dimensions per feature and sticky feature dimensionalities against 1/(1−S)
    training.py        loss_curves, training_geometry (feature vectors and training points, double descent)
    phase.py           phase_diagram, phase_comparison, phase_gap
    losses.py          tmcc_loss (L/p against the naive loss), benefit_interference (the loss split)
    sae.py             sae_directions_2d, sae_cosine_heatmap, sae_pareto, sae_dead_latents

``Polygon`` and ``polygon_stats`` (how 2-D vectors sit around the origin) live in :mod:`superposition.geometry`
and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float, Int

from superposition import best
from superposition.geometry import Polygon, polygon_stats
from superposition.plots.common import (
    AXIS_SHORT,
    MAX_CURVES,
    MAX_PANELS,
    SUPERPOSITION_TITLE,
    NamedFigure,
    fmt_value,
    instance_labels,
    json_key,
    pick_instances,
)
from superposition.plots.common import MAX_ARROWS as MAX_ARROWS
from superposition.plots.dimensionality import geometry
from superposition.plots.features import (
    features_2d,
    features_nd,
    features_nd_discrete,
    interaction_heatmaps,
    neuron_bars,
)
from superposition.plots.losses import benefit_interference, tmcc_loss
from superposition.plots.phase import phase_comparison, phase_diagram, phase_gap
from superposition.plots.sae import sae_cosine_heatmap, sae_dead_latents, sae_directions_2d, sae_pareto
from superposition.plots.training import loss_curves, training_geometry

if TYPE_CHECKING:
    from superposition.record import Run
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


def _chosen(run: Run) -> tuple[np.ndarray, list[str]]:
    """The instances the per-instance panels show, with their titles: with several seeds per setting, the best seed
    of each setting (:func:`superposition.best.best_of_seeds`, titled "…, seed = s (best of n)"), else every
    instance; at most ``MAX_PANELS``, spread evenly."""
    spec = run.spec
    if best.seed_axis_varies(spec) and "loss" in run.instances.columns:
        table = best.best_of_seeds(run.instances, best.setting_columns(spec))
        keep = pick_instances(len(table))
        chosen = table["instance"].to_numpy(dtype=np.int64)[keep]
        titles = [f"{t} (best of {n})" for t, n in zip(_pair_labels(spec, chosen), table["n_seeds"][keep], strict=True)]
        return chosen, titles
    chosen = pick_instances(spec.n_instances)
    return chosen, _pair_labels(spec, chosen)


def figures_for_run(run: Run) -> list[NamedFigure]:
    """The figures that fit the run's model kind and instance grid (see ``FIGURES``), in report order."""
    import torch

    from superposition import metrics
    from superposition.data import importance_tensor

    spec, model = run.spec, run.model
    kind, n_feat, hidden = spec.model.kind, spec.model.n_features, spec.model.d_hidden
    chosen, titles = _chosen(run)
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
            short = AXIS_SHORT.get(key, key.split(".")[-1])
            parts.append(f"{short} = {fmt_value(point[key])}" if short else fmt_value(point[key]))
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
