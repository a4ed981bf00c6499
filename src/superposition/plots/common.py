"""What every plots module shares: the limits on panels and curves, colour scales and unit labels, the
:class:`NamedFigure` tuple, instance labels and subsampling, subplot grids, the common layout, colour helpers and
log-axis ticks."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from superposition.spec import Experiment

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


class NamedFigure(NamedTuple):
    """A figure with the short name ``superposition plot`` knows it by and its heading in the report."""

    name: str
    title: str
    figure: go.Figure


def as_array(a: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor or array."""
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def esc(text: str) -> str:
    """Escape text for plotly's pseudo-HTML labels (plotly.js shows the entities as the characters)."""
    return html.escape(str(text), quote=False)


def pick_instances(n: int, limit: int = MAX_PANELS) -> np.ndarray:
    """Indices of at most ``limit`` instances spread evenly over ``range(n)`` (first and last included)."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))


def grid_shape(n: int, cols: int | None = None, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, cols or max_cols) if n else 1
    return max(1, math.ceil(n / cols)), max(1, cols)


def axis_ref(index: int) -> str:
    return "x" if index == 1 else f"x{index}"


def fmt_value(v: Any) -> str:
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
        shown = ", ".join(fmt_value(x) for x in v[:3])
        return f"[{shown}{', …' if len(v) > 3 else ''}]"
    return str(v)


AXIS_SHORT = {
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
            short = AXIS_SHORT.get(key, key.split(".")[-1])
            parts.append(f"{short} = {fmt_value(point[key])}" if short else fmt_value(point[key]))
        labels.append(", ".join(parts) if parts else f"instance {i}")
    return labels


def json_key(v: Any) -> str:
    """A hashable key for an axis value (lists included)."""
    return repr(v)


def subplot_grid(titles: Sequence[str], cols: int | None = None, **kwargs: Any) -> tuple[go.Figure, int, int]:
    rows, cols = grid_shape(len(titles), cols, kwargs.pop("max_cols", 4))
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[esc(t) for t in titles],
        horizontal_spacing=kwargs.pop("horizontal_spacing", min(0.08, 0.5 / cols)),
        vertical_spacing=kwargs.pop("vertical_spacing", min(0.12, 0.6 / rows)),
        **kwargs,
    )
    return fig, rows, cols


def finish(fig: go.Figure, title: str, height: int, width: int | None = None, **layout: Any) -> go.Figure:
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


def discrete_colours(n: int) -> list[str]:
    if n <= 10:
        return list(qualitative.Plotly[:n])
    if n <= 24:
        return list(qualitative.Light24[:n])
    return sample_colorscale("Turbo", list(np.linspace(0, 1, n)))


def scale_colours(values: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> list[str]:
    """Colours of the continuous scale for values in [lo, hi] (clipped; NaN as grey).

    Bars get explicit colours: plotly.js 4 warns for every bar whose colour is a number on a colour axis."""
    v = np.asarray(values, dtype=np.float64)
    scaled = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    out = sample_colorscale(CONTINUOUS, list(np.nan_to_num(scaled)))
    return [c if np.isfinite(x) else "#bbbbbb" for c, x in zip(out, v, strict=True)]


def colourbar_trace() -> go.Scatter:
    """An invisible trace that draws the shared colour axis's colour bar."""
    return go.Scatter(
        x=[None],
        y=[None],
        mode="markers",
        showlegend=False,
        hoverinfo="skip",
        marker=dict(color=[0.0], coloraxis="coloraxis"),
    )


def log_ticks(values: np.ndarray) -> dict[str, Any]:
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


def lighten(colour: str, amount: float) -> str:
    r, g, b = _rgb(colour)
    return "rgb({},{},{})".format(*(round(v + (255 - v) * amount) for v in (r, g, b)))


def darken(colour: str, amount: float = 0.25) -> str:
    r, g, b = _rgb(colour)
    return "rgb({},{},{})".format(*(round(v * (1 - amount)) for v in (r, g, b)))
