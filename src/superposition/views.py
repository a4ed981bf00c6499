"""Notebook views of runs and SAE folders: compact HTML summaries and figures by name, offline.

Importing this module binds the presenters of :class:`~superposition.record.Run` and
:class:`~superposition.sae.Sae` (see :mod:`superposition.display`), so that ``run.figure(name)``,
``run.figures()`` and Jupyter's ``_repr_html_`` work; :mod:`superposition.runs` imports it, so everything reached
through the public API has it. Sweeps bind their own presenter in :mod:`superposition.sweep.report` (above this).

Figures are the ones the report embeds (:func:`superposition.plots.figures_for_run` for runs,
:func:`superposition.sae_report.sae_figures` for SAE folders), returned as :class:`Figure`: a plotly Figure that
shows itself in a notebook without a network, as the plotly mime type (JupyterLab, Notebook 7 and VS Code draw it
with the plotly.js bundled in the installed plotly package) and as HTML with plotly.js from the installed package
inlined (once per kernel) for other front ends. It never loads a script from a CDN.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from superposition.claims import claim_line
from superposition.folder import RUN_FILE_NAMES
from superposition.plots import NamedFigure, figures_for_run
from superposition.record import Run, load_run
from superposition.report import FIGURE_CONFIG, table_html
from superposition.sae import Sae, summary_table
from superposition.sae_report import sae_figures
from superposition.spec import SpecError

__all__ = [
    "Figure",
    "figure",
    "figure_names",
    "pick_figure",
    "headline",
    "summary_html",
    "run_html",
    "sae_html",
    "RunPresenter",
    "SaePresenter",
]

_plotlyjs_sent = False
"""Whether this kernel has already shown a figure's HTML with plotly.js inlined (later ones reuse it)."""


class Figure(go.Figure):
    """A plotly Figure that shows itself offline in a notebook, whatever ``plotly.io.renderers.default`` says."""

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        global _plotlyjs_sent
        data = json.loads(self.to_json(validate=False, remove_uids=False))
        data["config"] = FIGURE_CONFIG
        first, _plotlyjs_sent = not _plotlyjs_sent, True
        page = self.to_html(full_html=False, include_plotlyjs=first, include_mathjax=False, config=FIGURE_CONFIG)
        return {"application/vnd.plotly.v1+json": data, "text/html": page}

    def _repr_html_(self) -> str:
        return self._repr_mimebundle_()["text/html"]

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)


def pick_figure(named: list[NamedFigure], name: str, what: str, **layout: Any) -> Figure:
    """The figure ``name`` of ``named`` (with ``layout`` applied); one-line SpecError listing the names otherwise."""
    for item in named:
        if item.name == name:
            fig = Figure(item.figure)
            if layout:
                fig.update_layout(**layout)
            return fig
    names = ", ".join(n.name for n in named) or "none"
    raise SpecError(f"{what}: no figure {name!r} (available: {names})")


def figure(obj: Any, name: str, **layout: Any) -> Figure:
    """``obj.figure(name, **layout)`` for a Run, Sae or Sweep."""
    return obj.figure(name, **layout)


def figure_names(obj: Any) -> list[str]:
    """``obj.figures()``: the figure names of a Run, Sae or Sweep."""
    return obj.figures()


# -- the HTML summary ------------------------------------------------------------------------------------------------
_STYLE = (
    "font-family:system-ui,sans-serif;font-size:13px;line-height:1.5;border:1px solid #ddd;border-radius:4px;"
    "padding:.5em .8em;max-width:60em"
)


def summary_html(kind: str, title: str, facts: list[tuple[str, str]], tables: list[tuple[str, pd.DataFrame]]) -> str:
    """A compact, escaped HTML block: a title, (label, value) lines and captioned tables; no scripts."""
    rows = "".join(
        f"<tr><th style='text-align:left;padding-right:1em;vertical-align:top'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in facts
    )
    parts = [
        f"<div style='{_STYLE}'>",
        f"<div><b>{html.escape(kind)}</b> <code>{html.escape(title)}</code></div>",
        f"<table>{rows}</table>",
    ]
    for caption, frame in tables:
        parts.append(f"<div style='margin-top:.4em'>{html.escape(caption)}</div>")
        parts.append(f"<div style='max-height:24em;overflow:auto'>{table_html(frame)}</div>")
    parts.append("</div>")
    return "".join(parts)


def headline(run: Run) -> tuple[str | None, pd.DataFrame]:
    """The run's headline table (what ``superposition run`` prints): represented features by the two grid axes
    (caption, pivot table with its index), or (None, per-instance settings, represented features and loss)."""
    df = run.instances
    axes = list(run.spec.instances.axes)
    if len(axes) == 2 and "n_represented" in df.columns and "seed" not in axes:
        pivot = df.pivot_table(index=axes[0], columns=axes[1], values="n_represented", aggfunc="first")
        caption = f"represented features (norm > 0.5) by {axes[0]} (rows) and {axes[1]} (columns)"
        return caption, pivot.sort_index(ascending=False)
    cols = [c for c in axes + ["n_represented", "loss"] if c in df.columns]
    return None, df[cols]


def _where(path: Path | None, report: str | None) -> str:
    if path is None:
        return "in memory (not saved)"
    return f"{path}" + (f" (open {Path(path) / report})" if report and (Path(path) / report).is_file() else "")


def _losses(frame: pd.DataFrame, column: str = "loss") -> str:
    if column not in frame.columns or not len(frame):
        return "–"
    values = frame[column].astype(float)
    return f"mean {values.mean():.4g}, min {values.min():.4g}, max {values.max():.4g}"


def run_verdict(run: Run) -> str | None:
    """The run's verdict against its preset's claim (``run.verdict`` when the job set it)."""
    return run.verdict if run.verdict is not None else claim_line(run.spec.name, run.spec, run)


def run_html(run: Run) -> str:
    """A run's notebook summary: shape, instances, training, final losses, verdict, headline table, folder."""
    spec, m, meta = run.spec, run.spec.model, run.meta
    axes = " × ".join(f"{k} ({len(v)})" for k, v in spec.instances.axes.items()) or "no grid"
    diverged = int(run.instances["diverged"].sum()) if "diverged" in run.instances else 0
    facts = [
        ("model", f"{m.kind}, {m.n_features} features in {m.d_hidden} dims, {'tied' if m.tied else 'untied'}"),
        ("instances", f"{spec.n_instances} ({axes})"),
        (
            "training",
            f"{spec.train.steps} steps, batch {spec.train.batch_size}; {meta.get('engine', '?')} engine on "
            f"{meta.get('device', '?')}, {float(meta.get('train_seconds', 0.0)):.1f} s",
        ),
        ("final loss", _losses(run.instances) + (f"; {diverged} diverged" if diverged else "")),
    ]
    line = run_verdict(run)
    if line:
        facts.append(("verdict", line))
    facts.append(("saved", _where(run.path, RUN_FILE_NAMES[-1])))
    facts.append(("figures", "run.figures() lists them; run.figure(name) draws one"))
    caption, table = headline(run)
    shown = table.reset_index().rename_axis(columns=None) if caption else table
    return summary_html("Run", spec.name, facts, [(caption or "per instance", shown)])


def _sae_run(sae: Sae) -> Run | None:
    """The run an SAE folder sits in (RUN/sae/<name>/), for the figures that need its true features."""
    if sae.path is None:
        return None
    root = Path(sae.path).parent.parent
    return load_run(root) if (root / RUN_FILE_NAMES[0]).is_file() else None


def sae_html(sae: Sae) -> str:
    """An SAE folder's notebook summary: architecture, settings, training, scores (mean over instances), folder."""
    s, m = sae.spec, sae.model
    facts = [
        ("run", str(sae.meta.get("run_name", "?"))),
        ("SAEs", f"{m.n_sae} {sae.architecture} setting(s) × {m.n_instances} instance(s), d_sae {m.d_sae} on {m.d_in}"),
        ("training", f"{s.steps} steps, batch {s.batch_size}, {float(sae.meta.get('train_seconds', 0.0)):.1f} s"),
        ("saved", _where(sae.path, "report.html")),
        ("figures", "sae.figures() lists them; sae.figure(name) draws one"),
    ]
    cols = ["sparsity", "resample_method", "mmcs_features", "recovered_99", "n_true", "dead", "l0", "fvu"]
    table = summary_table(sae.scores)
    table = table[[c for c in [*cols, "all_recovered_99"] if c in table.columns]]
    return summary_html("Sae", sae.name, facts, [("scores, mean over instances", table)])


class RunPresenter:
    """Run's presenter: its report's figures and summary."""

    def html(self, obj: Run) -> str:
        return run_html(obj)

    def figure_names(self, obj: Run) -> list[str]:
        return [f.name for f in figures_for_run(obj)]

    def figure(self, obj: Run, name: str, **layout: Any) -> Figure:
        return pick_figure(figures_for_run(obj), name, f"run {obj.spec.name!r}", **layout)


class SaePresenter:
    """Sae's presenter: its folder page's figures (those needing true features when it sits in a run folder)."""

    def html(self, obj: Sae) -> str:
        return sae_html(obj)

    def figure_names(self, obj: Sae) -> list[str]:
        return [f.name for f in sae_figures(obj, _sae_run(obj))]

    def figure(self, obj: Sae, name: str, **layout: Any) -> Figure:
        return pick_figure(sae_figures(obj, _sae_run(obj)), name, f"sae {obj.name!r}", **layout)


Run.presenter = RunPresenter()
Sae.presenter = SaePresenter()
