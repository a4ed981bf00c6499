"""The sweep report: axes to plot, heatmaps and line plots, the threshold read-out, the training geometry of
fixed training sets (double descent), and report.html (``render_sweep``, ``write_sweep_report``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from superposition.claims import claim_line
from superposition.folder import atomic_write_bytes
from superposition.spec import Experiment, SweepSpec
from superposition.sweep.folder import REPORT, RUNS, Sweep, load_sweep
from superposition.sweep.plan import PACKABLE_KINDS, Plan, describe_plan
from superposition.thresholds import ok_rows, threshold_display, threshold_table

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from superposition.plots import NamedFigure, Polygon


# -- figures and the report (pure functions of the results table) -------------------------------------------------
def _numeric_axes(spec: Experiment) -> list[str]:
    sweep = spec.sweep or SweepSpec()
    return [
        k
        for k, v in sweep.axes.items()
        if len(set(map(json.dumps, v))) > 1 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    ]


def report_axes(spec: Experiment) -> tuple[str | None, str | None, str | None]:
    """(x, y, by) of the report: as given in [sweep.report], else picked from the axes."""
    sweep = spec.sweep or SweepSpec()
    r = sweep.report
    numeric = _numeric_axes(spec)
    x = r.x or (numeric[-1] if numeric else None)
    y = r.y or next((a for a in reversed(numeric) if a != x), None)
    by = r.by or next((k for k, v in sweep.labels.items() if len(v) > 1), None)
    return x, y, by


def _aggregate(results: pd.DataFrame, keys: list[str], metric: str, agg: str) -> pd.DataFrame:
    df = ok_rows(results, metric)
    return df.groupby(keys, sort=True)[metric].agg(agg).reset_index()


def _log(values: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    return np.log10(np.maximum(values, floor))


def heatmap_figure(
    results: pd.DataFrame,
    x: str,
    y: str,
    metric: str = "loss_min",
    *,
    agg: str = "min",
    log: bool = True,
    title: str | None = None,
) -> go.Figure:
    """A metric over two axes (``agg`` over the other axes of points sharing a cell; log10 colour by default)."""
    import plotly.graph_objects as go

    cells = _aggregate(results, [y, x], metric, agg)
    pivot = cells.pivot(index=y, columns=x, values=metric)
    z = pivot.to_numpy(dtype=float)
    shown = _log(z) if log else z
    label = f"log10 {metric}" if log else metric
    text = [[("" if math.isnan(v) else f"{v:.3g}") for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=shown,
            x=[str(v) for v in pivot.columns],
            y=[str(v) for v in pivot.index],
            text=text,
            texttemplate="%{text}",
            colorscale="Viridis",
            colorbar={"title": {"text": label}},
            hovertemplate=f"{x}=%{{x}}<br>{y}=%{{y}}<br>{metric}=%{{text}}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"{metric} ({agg} over repeats and other axes) by {y} and {x}",
        xaxis={"title": x, "type": "category"},
        yaxis={"title": y, "type": "category"},
        template="plotly_white",
        height=420,
    )
    return fig


def lines_figure(
    results: pd.DataFrame,
    x: str,
    by: str,
    metric: str = "loss_min",
    *,
    agg: str = "min",
    log: bool = True,
    title: str | None = None,
) -> go.Figure:
    """A metric against one axis, one line per value of another."""
    import plotly.graph_objects as go

    cells = _aggregate(results, [by, x], metric, agg)
    fig = go.Figure()
    for value, part in cells.groupby(by, sort=True):
        fig.add_trace(go.Scatter(x=part[x], y=part[metric], mode="lines+markers", name=f"{by}={value}"))
    fig.update_layout(
        title=title or f"{metric} ({agg} over repeats and other axes) against {x}",
        xaxis={"title": x},
        yaxis={"title": metric, "type": "log" if log else "linear"},
        template="plotly_white",
        height=420,
    )
    return fig


# -- training points and features of fixed training sets (double descent) ------------------------------------------
class TrainingGeometry(NamedTuple):
    """The best repeat (lowest test loss) of one training-set size: its feature vectors, its training points'
    hidden vectors and how both sit around the origin (``plots.polygon_stats``)."""

    dataset_size: int
    point: int
    repeat: int
    loss: float
    train_loss: float
    """Loss of the final weights on the rebuilt training set (equals the recorded one when the rebuild is right and
    the last step was full-batch with a vanishing learning rate)."""
    recorded_train_loss: float
    features: np.ndarray
    """(2, feats): the feature vectors W_i (columns of the encoder)."""
    hidden: np.ndarray
    """(T, 2): h_t = W x_t of every training point x_t."""
    feature_shape: Polygon
    data_shape: Polygon
    label: str
    """The point's other varying axis values ("" when T is the only one)."""


def _best_per_size(plan: Plan, results: pd.DataFrame) -> pd.DataFrame:
    """The finished points of 2-D bottleneck groups with a fixed training set, the lowest loss_min per size (``_T``)."""
    groups = {g.id: g for g in plan.groups}

    def size(gid: Any) -> int | None:
        g = groups.get(str(gid))
        if g is None:
            return None
        d, m = g.spec["data"], g.spec["model"]
        fits = d.get("dataset_size") is not None and m["d_hidden"] == 2 and m["kind"] in PACKABLE_KINDS
        return int(d["dataset_size"]) if fits else None

    ok = results[(results["status"] == "ok") & results["best_repeat"].notna()]
    sizes = [size(g) for g in ok["group"]]
    ok = ok.assign(_T=sizes)[[s is not None for s in sizes]]
    return ok.sort_values(["_T", "loss_min", "point"]).drop_duplicates("_T")


def training_geometry_data(out: str | Path, plan: Plan, results: pd.DataFrame) -> list[TrainingGeometry]:
    """For each training-set size T of the 2-D bottleneck groups with a fixed training set, the best repeat over the
    points with that T, its weights and its training set rebuilt from the group's spec (``TrainState.create`` draws
    it from the seed, on the CPU). Groups trained on CUDA before training sets were drawn on the CPU are rebuilt on CUDA
    and left out where none is available. Loads nothing when no group fits."""
    import torch

    from superposition.plots import polygon_stats
    from superposition.runs import load_run
    from superposition.train import TrainState

    out = Path(out)
    groups = {g.id: g for g in plan.groups}
    best = _best_per_size(plan, results)
    varying = [c for c in plan.columns if c != "data.dataset_size" and results[c].nunique(dropna=False) > 1]
    found: list[TrainingGeometry] = []
    for _, row in best.iterrows():
        g = groups[str(row["group"])]
        point, repeat = int(row["point"]), int(row["best_repeat"])
        inst = [i for i, (p, _) in enumerate(g.members) if p == point][repeat]
        run = load_run(out / RUNS / g.id)
        # Training sets are drawn on the CPU since dataset_device was recorded; older CUDA runs drew theirs on CUDA.
        device = torch.device(run.meta.get("dataset_device") or run.meta["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            continue
        state = TrainState.create(run.spec, device)
        with torch.no_grad():
            state.model.load_state_dict(run.model.state_dict())
            train_loss = float(state.loss(state.dataset)[inst])
            x = state.dataset[:, inst].double().cpu().numpy()
        W = run.model.encoder.detach()[inst].double().cpu().numpy()
        H = x @ W.T
        found.append(
            TrainingGeometry(
                dataset_size=int(row["_T"]),
                point=point,
                repeat=repeat,
                loss=float(run.instances["loss"].iloc[inst]),
                train_loss=train_loss,
                recorded_train_loss=float(run.instances["train_loss"].iloc[inst]),
                features=W,
                hidden=H,
                feature_shape=polygon_stats(W.T),
                data_shape=polygon_stats(H),
                label=", ".join(f"{c}={row[c]}" for c in varying),
            )
        )
    return found


def pick_sizes(losses: list[float], limit: int = 6) -> list[int]:
    """Indices of at most ``limit`` entries (sorted by T): the first, the last, the highest loss, and evenly spread
    ones in between."""
    n = len(losses)
    if n <= limit:
        return list(range(n))
    chosen = set(np.round(np.linspace(0, n - 1, limit)).astype(int).tolist())
    peak = int(np.nanargmax(np.asarray(losses, dtype=np.float64)))
    if peak not in chosen:
        inner = sorted(chosen - {0, n - 1}, key=lambda i: (abs(i - peak), i))
        chosen.discard(inner[0])
        chosen.add(peak)
    return sorted(chosen)


def _shape_text(s: Polygon) -> str:
    irregular = f", irregularity {s.irregularity:.2f}" if s.directions >= 2 else ""
    return f"{s.n_long} of {s.n} long in {s.directions} direction(s){irregular}, largest norm {s.max_norm:.3g}"


def _training_geometry_sections(out: str | Path | None, plan: Plan, results: pd.DataFrame) -> list[Any]:
    """The report section of sweeps over fixed 2-D training sets (none for other sweeps or without the folder)."""
    from superposition.plots import training_geometry
    from superposition.report import Section

    data = training_geometry_data(out, plan, results) if out is not None else []
    if not data:
        return []
    chosen = [data[i] for i in pick_sizes([d.loss for d in data])]
    peak = max(data, key=lambda d: d.loss).dataset_size
    titles = [f"T = {d.dataset_size}" + (f" ({d.label})" if d.label else "") + f", loss {d.loss:.3g}" for d in chosen]
    figure = training_geometry([d.features for d in chosen], [d.hidden for d in chosen], titles)
    paragraphs = [
        "For each training-set size T, the repeat with the lowest test loss: its feature vectors W_i (blue arrows) "
        "and the hidden vectors h_t = W x_t of its training points (red dots), training sets rebuilt from the seeds. "
        f"Panels: the smallest T, the test-loss peak (T = {peak}), the largest T and evenly spread sizes between.",
        "What to look for: at small T (memorising) the training points sit at the corners of a regular polygon and "
        "the features are shorter, the longest along the training points' directions; at large T (generalising) a "
        "few long features form the polygon, the rest stay near 0, and the training points, sums of several "
        "features, do not. The table counts it: few directions with irregularity near 0 is a polygon; many "
        "directions (up to 36, each at most 10° wide) with a high irregularity is a spread.",
        *(
            f"T = {d.dataset_size}: training points {_shape_text(d.data_shape)}; "
            f"features {_shape_text(d.feature_shape)}."
            for d in chosen
        ),
    ]
    missing = len(_best_per_size(plan, results)) - len(data)
    if missing:
        paragraphs.append(f"{missing} training-set size(s) trained on CUDA are left out: no CUDA device here.")
    table = pd.DataFrame(
        {
            "T": [d.dataset_size for d in data],
            "point": [d.point for d in data],
            "repeat": [d.repeat for d in data],
            "loss": [d.loss for d in data],
            "train_loss": [d.recorded_train_loss for d in data],
            "train_loss_rebuilt": [d.train_loss for d in data],
            "points_long": [d.data_shape.n_long / max(d.data_shape.n, 1) for d in data],
            "points_directions": [d.data_shape.directions for d in data],
            "points_irregularity": [d.data_shape.irregularity for d in data],
            "points_max_norm": [d.data_shape.max_norm for d in data],
            "features_long": [d.feature_shape.n_long for d in data],
            "features_directions": [d.feature_shape.directions for d in data],
            "features_irregularity": [d.feature_shape.irregularity for d in data],
            "features_max_norm": [d.feature_shape.max_norm for d in data],
            **({"other axes": [d.label for d in data]} if any(d.label for d in data) else {}),
        }
    )
    definitions = [
        ("long", "norm above half the largest norm of the set (points: as a fraction of T; features: a count)"),
        ("directions", "groups of the long vectors' angles, each at most 10° wide (plots.polygon_stats)"),
        (
            "irregularity",
            "(widest − narrowest angle between neighbouring directions) / (360° / directions); 0 = regular",
        ),
        (
            "train_loss_rebuilt",
            "loss of the final weights on the rebuilt training set; matches train_loss when the "
            "rebuild is right (exactly after a full-batch last step at learning rate 0, as with warmup-cosine)",
        ),
    ]
    return [
        Section(
            "Training points and features",
            paragraphs=paragraphs,
            tables=[table],
            figures=[figure],
            definitions=definitions,
        )
    ]


def write_sweep_report(out: str | Path) -> Path:
    """Rebuild a finished sweep folder's report.html (atomically) from its stored spec, plan and results."""
    out = Path(out)
    result = load_sweep(out)
    atomic_write_bytes(out / REPORT, (render_sweep(result.spec, result.plan, result.results, out)).encode())
    return out / REPORT


def sweep_verdict(spec: Experiment, out: str | Path) -> str | None:
    """The line grading a finished sweep folder against its preset's claim (:func:`superposition.claims.claim_line`;
    "not graded (quick/modified)" for a quick or modified sweep, None for a preset without a claim)."""
    return claim_line(spec.name, spec, lambda: load_sweep(out))


def has_ok(spec: Experiment, results: pd.DataFrame) -> bool:
    """Whether any point of the results has the report's metric (the report draws heatmaps and lines then)."""
    metric = (spec.sweep or SweepSpec()).report.metric
    return metric in results.columns and bool(len(ok_rows(results, metric)))


MAX_SIDE_GROUPS = 4
"""Sweeps of at most this many models (tied against untied, say) get their feature maps side by side."""


def _side_by_side_sections(out: str | Path | None, plan: Plan, results: pd.DataFrame) -> list[Any]:
    """Seed 001's picture across the models of a small sweep: each model's feature-to-feature maps (W·Wᵀ, or W2·W1
    untied) in one row, all rows on one colour scale, so tied and untied nets can be read side by side. None for
    larger sweeps, models without a bottleneck readout, or without the folder."""
    if out is None or not 1 < len(plan.groups) <= MAX_SIDE_GROUPS:
        return []
    import torch

    from superposition import metrics
    from superposition.plots import instance_labels, interaction_heatmaps
    from superposition.report import Section
    from superposition.runs import load_run

    mats, titles, cols = [], [], 0
    done = set(results.loc[results["status"] == "ok", "group"]) if "status" in results else set()
    for g in plan.groups:
        if g.id not in done or not (Path(out) / RUNS / g.id).is_dir():
            return []
        run = load_run(Path(out) / RUNS / g.id)
        m = run.spec.model
        if m.kind not in ("linear", "relu-output") or m.n_features > 64 or run.spec.n_instances > 8:
            return []
        with torch.no_grad():
            W2 = run.model.W2.detach().float() if hasattr(run.model, "W2") else None
            M = metrics.readout_matrix(run.model.encoder.detach().float(), W2)
        values = plan.points[g.points[0]].values
        named = {k: v for k, v in values.items() if "." not in k} or values  # the sweep's labels when it has them
        label = ", ".join(str(v) for v in named.values())
        mats.append(M.transpose(-1, -2).numpy())
        titles += [f"{label}: {t}" for t in instance_labels(run.spec)]
        cols = max(cols, run.spec.n_instances)
    if len({a.shape for a in mats}) != 1:
        return []
    figure = interaction_heatmaps(np.concatenate(mats), None, titles, cols=cols)
    return [
        Section(
            "Feature maps side by side",
            paragraphs=[
                "One row per model of the sweep, one panel per instance: entry (i, j) is how much input feature i "
                "writes to output feature j (Wᵢ·Wⱼ for tied weights, the untied net's W2·W1), on one colour scale. "
                "A learned feature is a diagonal entry near 1; seed 001 reads its nets from such heatmaps."
            ],
            figures=[figure],
        )
    ]


def sweep_figures(
    spec: Experiment, plan: Plan, results: pd.DataFrame, out: str | Path | None = None, *, geometry: bool = True
) -> list[NamedFigure]:
    """The figures of a sweep's report, named for ``Sweep.figure``: ``heatmap`` and ``lines`` (one per value of the
    report's ``by`` axis: ``heatmap-VALUE``, ``lines-VALUE``), and ``training-geometry`` (fixed 2-D training sets;
    needs the folder ``out``). Headings: "Heatmaps", "Lines", "Training points and features"."""
    from superposition.plots import NamedFigure

    r = (spec.sweep or SweepSpec()).report
    x, y, by = report_axes(spec)
    out_figs: list[NamedFigure] = []
    if not (x and has_ok(spec, results)):
        pass
    elif y:
        panels = [None] if by is None else list(dict.fromkeys(results[by]))
        parts = []
        for value in panels:
            part = results if value is None else results[results[by] == value]
            if len(ok_rows(part, r.metric)):
                parts.append(("" if value is None else f"-{value}", "" if value is None else f" ({by}={value})", part))
        for tag, suffix, part in parts:
            fig = heatmap_figure(part, x, y, r.metric, log=r.log, title=f"{r.metric} by {y} and {x}{suffix}")
            out_figs.append(NamedFigure(f"heatmap{tag}", "Heatmaps", fig))
        for tag, suffix, part in parts:
            fig = lines_figure(part, x, y, r.metric, log=r.log, title=f"{r.metric} against {x}{suffix}")
            out_figs.append(NamedFigure(f"lines{tag}", "Lines", fig))
    else:
        fig = lines_figure(results.assign(_all="all"), x, "_all", r.metric, log=r.log)
        out_figs.append(NamedFigure("lines", "Lines", fig))
    if geometry:
        for section in _training_geometry_sections(out, plan, results):
            out_figs.extend(NamedFigure("training-geometry", section.heading, f) for f in section.figures)
        for section in _side_by_side_sections(out, plan, results):
            out_figs.extend(NamedFigure("feature-maps", section.heading, f) for f in section.figures)
    return out_figs


def render_sweep(spec: Experiment, plan: Plan, results: pd.DataFrame, out: str | Path | None = None) -> str:
    """The sweep's report.html: plan, threshold read-out, heatmaps and lines per panel value, training geometry
    (fixed 2-D training sets; needs the folder ``out``), results, failures."""
    from superposition.report import Section, render_page

    sweep = spec.sweep or SweepSpec()
    r = sweep.report
    x, y, by = report_axes(spec)
    status = results["status"].value_counts().to_dict()
    line = sweep_verdict(spec, out) if out is not None else None
    sections = [
        *([Section("Reproduced?", paragraphs=[line])] if line else []),
        Section("About", paragraphs=[p for p in spec.description.split("\n") if p.strip()]),
        Section(
            "Plan",
            paragraphs=[
                *describe_plan(plan).splitlines(),
                "Status of the points: " + ", ".join(f"{k} {v}" for k, v in sorted(status.items())) + ".",
                "Each point's loss is the per-instance final loss (mean over the features and over "
                f"train.eval_batch fresh samples); loss_min/loss_mean are over its {plan.repeats} repeat(s), "
                "loss_sum is the sum over the repeats.",
            ],
        ),
    ]
    figures = sweep_figures(spec, plan, results, geometry=False)
    if x and y and r.threshold is not None and any(f.title == "Heatmaps" for f in figures):
        table = threshold_table(results, x, y, r.metric, r.threshold, by=by)
        sections.append(
            Section(
                f"Threshold: smallest {x} with {r.metric} < {r.threshold:g}",
                paragraphs=[f"For each {y}, the smallest {x} whose {r.metric} is below {r.threshold:g}."],
                tables=[threshold_display(table, results, x, y, by)],
            )
        )
    for heading in ("Heatmaps", "Lines"):
        if any(f.title == heading for f in figures):
            sections.append(Section(heading, figures=[f.figure for f in figures if f.title == heading]))
    sections.extend(_training_geometry_sections(out, plan, results))
    sections.extend(_side_by_side_sections(out, plan, results))
    sections.append(Section("Results", tables=[results]))
    failed = results[results["status"].isin(["failed", "invalid"])]
    if len(failed):
        sections.append(Section("Failures", tables=[failed[["point", *plan.columns, "status", "error"]]]))
    sections.append(Section("Spec", preformatted=spec.to_json()))
    return render_page(f"sweep: {spec.name}", sections)


# -- the notebook view of a sweep folder (superposition.display binds it on Sweep) ----------------------------------
def sweep_html(sweep: Sweep) -> str:
    """A sweep folder's notebook summary: plan, statuses, verdict, the threshold table (else the results), folder."""
    from superposition.views import summary_html

    spec, plan, results = sweep.spec, sweep.plan, sweep.results
    status = results["status"].value_counts().to_dict() if "status" in results else {}
    axes = ", ".join(f"{k} ({len(v)})" for k, v in (spec.sweep or SweepSpec()).axes.items()) or "none"
    facts = [
        ("plan", f"{len(plan.points)} point(s) × {plan.repeats} repeat(s) in {len(plan.groups)} model(s)"),
        ("axes", axes),
        ("status", ", ".join(f"{v} {k}" for k, v in sorted(status.items())) or "–"),
    ]
    line = sweep_verdict(spec, sweep.path)
    if line:
        facts.append(("verdict", line))
    report = Path(sweep.path) / REPORT
    facts.append(("saved", f"{sweep.path}" + (f" (open {report})" if report.is_file() else "")))
    facts.append(("figures", "sweep.figures() lists them; sweep.figure(name) draws one"))
    r = (spec.sweep or SweepSpec()).report
    x, y, by = report_axes(spec)
    if x and y and r.threshold is not None and has_ok(spec, results):
        table = threshold_display(threshold_table(results, x, y, r.metric, r.threshold, by=by), results, x, y, by)
        caption = f"threshold: smallest {x} with {r.metric} < {r.threshold:g}, for each {y}"
        return summary_html("Sweep", spec.name, facts, [(caption, table)])
    cols = [c for c in ("point", *plan.columns, "status", r.metric) if c in results.columns]
    return summary_html("Sweep", spec.name, facts, [("results", results[list(dict.fromkeys(cols))])])


class SweepPresenter:
    """Sweep's presenter: its report's figures (:func:`sweep_figures`) and summary."""

    def html(self, obj: Sweep) -> str:
        return sweep_html(obj)

    def figure_names(self, obj: Sweep) -> list[str]:
        return [f.name for f in sweep_figures(obj.spec, obj.plan, obj.results, obj.path)]

    def figure(self, obj: Sweep, name: str, **layout: Any) -> go.Figure:
        from superposition.views import pick_figure

        named = sweep_figures(obj.spec, obj.plan, obj.results, obj.path)
        return pick_figure(named, name, f"sweep {obj.spec.name!r}", **layout)


Sweep.presenter = SweepPresenter()
