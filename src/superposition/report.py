"""Self-contained HTML reports: plotly.js embedded once, no network requests, every string escaped.

``render_page`` is the one page builder; runs, sweeps and SAEs describe their content as :class:`Section`s.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from superposition.runs import Run

__all__ = ["Section", "render_page", "render_run", "table_html"]


@dataclass
class Section:
    """One part of a report: a heading, escaped paragraphs, optional tables and figures."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)
    figures: list[go.Figure] = field(default_factory=list)
    preformatted: str | None = None


def table_html(df: pd.DataFrame) -> str:
    """An escaped HTML table of a DataFrame (floats to 4 significant digits)."""
    return df.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}", classes="data")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table.data{border-collapse:collapse;font-size:13px}table.data td,table.data th{border:1px solid #ccc;padding:2px 6px}
pre{background:#f6f6f6;padding:1em;overflow:auto}
"""


def render_page(title: str, sections: list[Section]) -> str:
    """A complete, self-contained HTML page. plotly.js is embedded once, only when there are figures."""
    has_figures = any(s.figures for s in sections)
    head = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>"]
    head.append(f"<style>{_STYLE}</style>")
    if has_figures:
        from plotly.offline import get_plotlyjs

        head.append(f"<script type='text/javascript'>{get_plotlyjs()}</script>")
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.heading)}</h2>")
        body.extend(f"<p>{html.escape(p)}</p>" for p in s.paragraphs)
        body.extend(table_html(t) for t in s.tables)
        for fig in s.figures:
            body.append(fig.to_html(full_html=False, include_plotlyjs=False))
        if s.preformatted is not None:
            body.append(f"<pre>{html.escape(s.preformatted)}</pre>")
    return "".join(head) + "</head><body>" + "".join(body) + "</body></html>"


def render_run(run: Run) -> str:
    """The report of a run: description, per-instance table and spec (figures come with the analysis issue)."""
    spec = run.spec
    sections = [
        Section("About", paragraphs=[p for p in spec.description.split("\n") if p.strip()]),
        Section("Instances", tables=[run.instances]),
        Section("Spec", preformatted=spec.to_json()),
    ]
    return render_page(spec.name, sections)
