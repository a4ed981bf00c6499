"""Self-contained HTML reports: plotly.js embedded once, no network requests, every string escaped.

``render_page`` is the one page builder; runs, sweeps and SAEs describe their content as :class:`Section`s.
The page opens from ``file://`` in any browser with no network: the only scripts are plotly.js (inline, once), one
inline call per figure and a few lines that make tables sortable. A Content-Security-Policy allows exactly those
scripts (by a per-page nonce) and no network fetches, so even text that slipped through unescaped could not run.

Also here: :func:`write_report` (atomic rewrite of a run's ``report.html``) and :func:`figure_image` (PNG/SVG/PDF
export through kaleido driving a local Chromium, offline).
"""

from __future__ import annotations

import html
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from superposition import best
from superposition.folder import atomic_write_bytes
from superposition.spec import SpecError

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from superposition.record import Run

__all__ = [
    "Section",
    "best_section",
    "render_page",
    "render_run",
    "run_sections",
    "table_html",
    "write_report",
    "figure_image",
    "find_browser",
    "ExportUnavailable",
    "IMAGE_FORMATS",
    "FIGURE_CONFIG",
]


@dataclass
class Section:
    """One part of a report: a heading, escaped paragraphs, optional tables and figures."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)
    figures: list[go.Figure] = field(default_factory=list)
    preformatted: str | None = None
    definitions: list[tuple[str, str]] = field(default_factory=list)
    """(term, meaning) pairs shown as a compact glossary after the paragraphs."""


def table_html(df: pd.DataFrame) -> str:
    """An escaped HTML table of a DataFrame (floats to 4 significant digits); the page makes it sortable."""
    return df.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}", classes="data", na_rep="–")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{overflow-wrap:anywhere}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav.toc{font-size:14px;line-height:1.7}nav.toc a{margin-right:1em;white-space:nowrap}
.table-wrap{max-height:34em;overflow:auto;border:1px solid #eee;margin:.5em 0}
table.data{border-collapse:collapse;font-size:13px}table.data td,table.data th{border:1px solid #ccc;padding:2px 6px}
table.data th{background:#f3f3f3;position:sticky;top:0;cursor:pointer;user-select:none}
table.data th[data-sort=asc]::after{content:" \\25B2"}table.data th[data-sort=desc]::after{content:" \\25BC"}
table.data td{text-align:right}pre{background:#f6f6f6;padding:1em;overflow:auto;white-space:pre-wrap}
dl.glossary{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;font-size:14px}
dl.glossary dt{font-family:monospace}dl.glossary dd{margin:0;color:#444}
.figure{margin:.5em 0 1.5em}p.note{color:#555;font-size:14px}
"""

# Click a header to sort by that column (numbers numerically, text alphabetically; empty cells last).
_SORT_JS = """
document.querySelectorAll('table.data').forEach(function(t){
 var heads=t.querySelectorAll('thead th');
 heads.forEach(function(th,col){
  th.title='click to sort';
  th.addEventListener('click',function(){
   var body=t.tBodies[0];if(!body)return;
   var asc=th.getAttribute('data-sort')!=='asc';
   heads.forEach(function(h){h.removeAttribute('data-sort');});
   th.setAttribute('data-sort',asc?'asc':'desc');
   var rows=Array.prototype.slice.call(body.rows);
   function key(r){var s=(r.cells[col]||{}).textContent||'';s=s.trim();var f=Number(s);
    return {e:s===''||s==='\\u2013'||s==='nan',n:s!==''&&!isNaN(f),f:f,s:s};}
   rows.sort(function(a,b){var x=key(a),y=key(b);
    if(x.e!==y.e)return x.e?1:-1;
    var c=(x.n&&y.n)?x.f-y.f:x.s.localeCompare(y.s,undefined,{numeric:true});
    return asc?c:-c;});
   rows.forEach(function(r){body.appendChild(r);});
  });
 });
});
"""

FIGURE_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "responsive": True,
    "toImageButtonOptions": {"format": "png", "scale": 2},
}
"""The plotly config of every embedded figure (the report's and the notebook's)."""


def _anchor(i: int) -> str:
    return f"section-{i}"


def _figure_html(fig: go.Figure, div_id: str, nonce: str) -> str:
    # plotly writes the figure as JSON with "<", ">" and "/" escaped, so no data can close the script element.
    out = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=FIGURE_CONFIG)
    return re.sub(r"<script\b", f'<script nonce="{nonce}"', out)


def render_page(title: str, sections: list[Section]) -> str:
    """A complete, self-contained HTML page. plotly.js is embedded once, only when there are figures."""
    nonce = secrets.token_urlsafe(18)
    has_figures = any(s.figures for s in sections)
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
        "img-src data: blob:; font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'"
    )
    head = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style>",
    ]
    if has_figures:
        from plotly.offline import get_plotlyjs

        head.append(f'<script nonce="{nonce}" type="text/javascript">{get_plotlyjs()}</script>')
    body = [f"<h1>{html.escape(title)}</h1>"]
    if len(sections) > 2:
        links = "".join(f"<a href='#{_anchor(i)}'>{html.escape(s.heading)}</a>" for i, s in enumerate(sections))
        body.append(f"<nav class='toc'>{links}</nav>")
    n_fig = 0
    for i, s in enumerate(sections):
        body.append(f"<h2 id='{_anchor(i)}'>{html.escape(s.heading)}</h2>")
        body.extend(f"<p>{html.escape(p)}</p>" for p in s.paragraphs)
        if s.definitions:
            items = "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(d)}</dd>" for t, d in s.definitions)
            body.append(f"<dl class='glossary'>{items}</dl>")
        body.extend(f"<div class='table-wrap'>{table_html(t)}</div>" for t in s.tables)
        for fig in s.figures:
            body.append(f"<div class='figure'>{_figure_html(fig, f'figure-{n_fig}', nonce)}</div>")
            n_fig += 1
        if s.preformatted is not None:
            body.append(f"<pre>{html.escape(s.preformatted)}</pre>")
    body.append(f'<script nonce="{nonce}">{_SORT_JS}</script>')
    return "".join(head) + "</head><body>" + "".join(body) + "</body></html>"


# -- the report of a run ----------------------------------------------------------------------------------------------
_COLUMNS: dict[str, str] = {
    "instance": "index of the instance in the model's instance dimension",
    "init_seed": "seed of the instance's initialisation",
    "loss": "final loss on fresh samples: importance-weighted squared error, mean over features",
    "train_loss": "last recorded training loss",
    "diverged": "the instance's loss became NaN/inf and it was dropped",
    "n_represented": "features with norm ‖W_i‖ > 0.5",
    "n_learned_diag": "features with diag(W·Wᵀ)_i > 0.5 (seed 001's count; W2·W1 when untied)",
    "dims_per_feature": "d_hidden / ‖W‖_F²: hidden dimensions per feature (< 1 means superposition)",
    "superposition": "mean over represented features of Σ_{j≠i}(Ŵ_i·W_j)² (0 = all orthogonal)",
    "eff_rank": "effective rank of W (exp of the entropy of its normalised singular values)",
    "benefit": "feature benefit term Σ_i I_i(1 − ‖W_i‖²)² of the linear map",
    "interference": "interference term Σ_{i≠j} I_j(W_j·W_i)² of the linear map",
    "naive_loss": "loss of keeping the d most valuable features and dropping the rest (same units as loss)",
    "monosemanticity": "mean over live neurons of max_i |W_{n,i}| / ‖W_n‖ (1 = every neuron reads one feature)",
    "cos_corr": "mean cosine between the two directions of each correlated pair",
    "cos_anti": "mean cosine between the two directions of each anticorrelated pair (−1 = antipodal)",
    "ternary_pos": "fraction of untied weights that are strongly positive (≥ half the largest |w|)",
    "ternary_neg": "fraction of untied weights that are strongly negative",
    "ternary_zero": "fraction of untied weights near zero (≤ 0.1 of the largest |w|)",
    "n_motifs": "asymmetric superposition motifs found (seed 000)",
    "n_computed": "features whose output is within 0.25 of the label at x_i = −1, 0, 1 with the others off",
    "n_abs_pairs": "features read by an antipodal pair of neurons that both write positively to them (|x| task)",
    "transplant_loss": "loss of the same weights moved into a plain MLP, on the same evaluation samples",
}

MAX_FEATURE_ROWS = 400
"""The per-feature table is shown while instances × features stays at or under this many rows."""


def _facts(run: Run) -> pd.DataFrame:
    spec, meta = run.spec, run.meta
    m, d, t, tr = spec.model, spec.data, spec.task, spec.train
    axes = spec.instances.axes

    def val(key: str, text: str) -> str:
        return "per instance (see the table)" if key in axes else text

    kind = val("model.kind", m.kind)
    rows: list[tuple[str, Any]] = [
        ("model", f"{kind}, {m.n_features} features, d_hidden {m.d_hidden}, {'tied' if m.tied else 'untied'}"),
        (
            "data",
            f"{d.kind}, {d.magnitude} magnitudes, p {val('data.feature_probability', f'{d.feature_probability:g}')}",
        ),
        ("task", f"target {t.target}, {t.loss} loss, importance {val('task.importance', _short(t.importance))}"),
        (
            "training",
            f"{tr.steps} steps, batch {tr.batch_size}, {tr.optimizer}, lr {val('train.lr', f'{tr.lr:g}')}, "
            f"weight decay {val('train.weight_decay', f'{tr.weight_decay:g}')}, {tr.schedule} schedule",
        ),
        ("instances", f"{spec.n_instances} ({' × '.join(f'{k} ({len(v)})' for k, v in axes.items()) or 'no grid'})"),
    ]
    for key in ("engine", "device", "train_seconds", "superposition_version", "torch_version"):
        if key in meta:
            rows.append((key.replace("_", " "), meta[key]))
    return pd.DataFrame({"setting": [r[0] for r in rows], "value": [str(r[1]) for r in rows]})


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:g}" for x in v[:4]) + (", …]" if len(v) > 4 else "]")
    return f"ratio {v:g}" if isinstance(v, (int, float)) else str(v)


def _feature_table(run: Run) -> pd.DataFrame | None:
    """Per instance and feature: importance, norm, superposition, dimensionality and nearest polytope."""
    import torch

    from superposition import metrics
    from superposition.data import importance_tensor

    spec = run.spec
    n_inst, n_feat = spec.n_instances, spec.model.n_features
    if n_inst * n_feat > MAX_FEATURE_ROWS:
        return None
    with torch.no_grad():
        W = run.model.encoder.detach().float().cpu()
        geo = metrics.recognise_geometry(W)
        cols = {
            "instance": np.repeat(np.arange(n_inst), n_feat),
            "feature": np.tile(np.arange(n_feat), n_inst),
            "importance": importance_tensor(spec).double().numpy().ravel(),
            "norm": metrics.feature_norms(W).double().numpy().ravel(),
            "superposition": metrics.superposition(W).double().numpy().ravel(),
            "dimensionality": geo.dimensionality.double().numpy().ravel(),
            "polytope": [name for row in geo.names() for name in row],
        }
    return pd.DataFrame(cols)


MAX_MOTIF_ROWS = 200
"""At most this many asymmetric-superposition motifs are listed."""


def _motif_table(run: Run) -> pd.DataFrame | None:
    """Seed 000's asymmetric superposition motifs of an untied neuron/mlp run (None when the model has none)."""
    import torch

    from superposition import metrics

    model = run.model
    if model.kind not in ("neuron", "mlp") or model.tied:
        return None
    with torch.no_grad():
        found = metrics.asymmetric_motifs(model.W1.detach().float().cpu(), model.W2.detach().float().cpu())
    rows = [
        {
            "instance": m.instance,
            "neuron": m.neuron,
            "feature (large W1)": m.features[0],
            "feature (large W2)": m.features[1],
            "cancelling neuron": "none" if m.cancelling_neuron is None else str(m.cancelling_neuron),
        }
        for m in found[:MAX_MOTIF_ROWS]
    ]
    return pd.DataFrame(rows) if rows else None


BEST_READOUT = "n_represented"
"""The outcome the report's best-of-seeds table compares across seeds (when the run has that column)."""


def best_section(run: Run) -> Section | None:
    """The "Best of seeds" section of a run whose spec has a seed axis with several values and other axes: per
    setting the lowest-loss seed's row (:func:`superposition.best.best_of_seeds`), with the per-seed counts beside
    it; None otherwise."""
    if not best.seed_axis_varies(run.spec):
        return None
    readout = BEST_READOUT if BEST_READOUT in run.instances.columns else None
    table = best.best_of_seeds(run.instances, best.setting_columns(run.spec), readout)
    counts = [c for c in best.COUNT_COLUMNS if c in table.columns]
    first = [*best.setting_columns(run.spec), best.SEED, "loss", *([readout] if readout else []), *counts]
    table = table[first + [c for c in table.columns if c not in first]]
    like = (
        f" n_like_best: seeds (with a finite loss) that represent as many features as the best one "
        f"({int(table['n_like_best'].sum())} of {int(table['n_seeds'].sum())} instances)."
        if readout
        else ""
    )
    return Section(
        "Best of seeds",
        paragraphs=[
            "Each setting was trained from several seeds; gradient descent from one seed can stop in a local "
            "minimum, so (as in the paper) the seed with the lowest loss stands for the setting. One row per setting: "
            "that seed's row of the instances table, with n_seeds (seeds of the setting) and n_ranked (of those, "
            "with a finite loss; a dropped instance is never the best)." + like
        ],
        tables=[table],
    )


def run_sections(run: Run, extra: Sequence[Section] = (), lead: Sequence[Section] = ()) -> list[Section]:
    """The sections of a run's report (exposed so sweep reports can reuse pieces): ``lead`` sections first (the
    verdict against the preset's claim), ``extra`` sections (the run's SAE folders) after the feature table; both
    are made by the caller (:mod:`superposition.runs`)."""
    from superposition.plots import FIGURES, figures_for_run

    spec = run.spec
    about = [p for p in spec.description.split("\n") if p.strip()] or ["(the spec has no description)"]
    sections = [*lead, Section("What to look for", paragraphs=about), Section("Run", tables=[_facts(run)])]
    where = str(run.path) if run.path is not None else "RUN"
    for name, heading, fig in figures_for_run(run):
        what = FIGURES[name][1]
        note = f"{what[0].upper()}{what[1:]}. Export: superposition plot {where} {name} --out {name}.png"
        sections.append(Section(heading, paragraphs=[note], figures=[fig]))
    seeds = best_section(run)
    if seeds is not None:
        sections.append(seeds)
    glossary = [(c, _COLUMNS[c]) for c in run.instances.columns if c in _COLUMNS]
    sections.append(
        Section(
            "Instances",
            paragraphs=["One row per instance (click a column header to sort). The columns:"],
            definitions=glossary,
            tables=[run.instances],
        )
    )
    features = _feature_table(run)
    if features is not None:
        sections.append(
            Section(
                "Features",
                paragraphs=[
                    "Per feature: norm ‖W_i‖, superposition Σ_{j≠i}(Ŵ_i·W_j)², dimensionality "
                    "D_i = ‖W_i‖²/Σ_j(Ŵ_i·W_j)², and the configuration of the nearest sticky value of D_i "
                    "(1 dedicated, 3/4 tetrahedron, 2/3 triangle, 1/2 digon, 2/5 pentagon, 3/8 square antiprism) "
                    "for represented features (norm > 0.5)."
                ],
                tables=[features],
            )
        )
    sections.extend(extra)  # e.g. the run's SAE folders, made by the caller (report does not read SAE folders)
    motifs = _motif_table(run)
    if motifs is not None:
        sections.append(
            Section(
                "Asymmetric superposition motifs",
                paragraphs=[
                    "Neurons that carry two features with swapped magnitudes (seed 000): a large input weight "
                    "W1[n, i] with a small output weight, and the reverse for feature j; the cancelling neuron fires "
                    "with feature i and writes negatively to output j, removing the interference."
                    + (f" The first {MAX_MOTIF_ROWS} are listed." if len(motifs) >= MAX_MOTIF_ROWS else "")
                ],
                tables=[motifs],
            )
        )
    sections.append(Section("Spec", preformatted=spec.to_json()))
    return sections


def render_run(run: Run, extra: Sequence[Section] = (), lead: Sequence[Section] = ()) -> str:
    """The report of a run: what to look for, the run's facts, the figures that fit it, tables and the spec."""
    return render_page(run.spec.name, run_sections(run, extra, lead))


def write_report(
    run: Run, path: str | Path | None = None, extra: Sequence[Section] = (), lead: Sequence[Section] = ()
) -> Path:
    """(Re)write a run's report atomically (a temporary sibling renamed into place); default ``run.path``."""
    if path is None:
        if run.path is None:
            raise SpecError("write_report: the run has no folder; pass a path")
        path = Path(run.path) / "report.html"
    path = Path(path)
    return atomic_write_bytes(path, render_run(run, extra, lead).encode("utf-8"))


# -- static export ----------------------------------------------------------------------------------------------------
IMAGE_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")


class ExportUnavailable(SpecError):
    """Static image export cannot run here (kaleido or a Chromium browser missing); the message says which."""


_BROWSERS = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """A local Chromium/Chrome for kaleido: $BROWSER_PATH, else Debian's /usr/bin/chromium, else one on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if Path(env).is_file() else None
    for name in _BROWSERS:
        found = name if Path(name).is_file() else shutil.which(name)
        if found:
            return found
    return None


def figure_image(
    fig: go.Figure, fmt: str = "png", *, width: int | None = None, height: int | None = None, scale: float = 2.0
) -> bytes:
    """Render a figure to an image offline: kaleido drives the local Chromium (nothing is downloaded; MathJax,
    which kaleido would fetch from a CDN, is switched off; plotly.js comes from the installed plotly package)."""
    if fmt not in IMAGE_FORMATS:
        raise SpecError(f"format: {fmt!r} is not an image format (allowed: {', '.join(IMAGE_FORMATS)}, html)")
    try:
        import kaleido
    except ImportError:
        raise ExportUnavailable(
            f"{fmt.upper()} export needs kaleido: pip install 'superposition[png]' (or export .html instead)"
        ) from None
    browser = find_browser()
    if browser is None:
        raise ExportUnavailable(
            f"{fmt.upper()} export needs a Chromium or Chrome browser (apt-get install chromium, or set BROWSER_PATH)"
            " — export .html instead"
        )
    layout = fig.layout
    opts = {
        "format": fmt,
        "width": int(width or layout.width or 1100),
        "height": int(height or layout.height or 600),
        "scale": scale,
    }
    try:
        return kaleido.calc_fig_sync(fig.to_dict(), opts=opts, kopts={"path": browser, "mathjax": False})
    except Exception as exc:  # kaleido and choreographer raise many types when the browser cannot start
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportUnavailable(
            f"{fmt.upper()} export failed: the browser at {browser} did not render ({exc.__class__.__name__}: {first})"
        ) from None
