"""Self-contained HTML report of a run."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from superposition.runs import Run

__all__ = ["render_run"]


def render_run(run: Run) -> str:
    """A minimal page: the spec and the per-instance table, every string escaped."""
    name = run.spec.name
    table = run.instances.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(name)}</title></head><body>"
        f"<h1>{html.escape(name)}</h1><p>{html.escape(run.spec.description)}</p><h2>Instances</h2>{table}"
        f"<h2>Spec</h2><pre>{html.escape(run.spec.to_json())}</pre></body></html>"
    )
