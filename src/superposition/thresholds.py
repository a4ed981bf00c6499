"""Threshold tables of a sweep's results: for each value of one axis, the smallest value of another whose metric
falls below a threshold (seed 002's minimum d_hidden per tree depth). Used by the sweep report and by the claims
that grade sweeps, which sit below the sweep package."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from superposition.errors import SpecError

__all__ = ["ok_rows", "threshold_table", "appearance_order", "threshold_display"]


def ok_rows(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of points that trained (status ok) with a finite ``metric``."""
    if metric not in results.columns:
        raise SpecError(f"sweep.report.metric: no column {metric!r} in the results")
    return results[(results["status"] == "ok") & np.isfinite(results[metric].astype(float))]


def threshold_table(
    results: pd.DataFrame,
    x: str,
    y: str,
    metric: str = "loss_min",
    threshold: float = 1e-5,
    *,
    by: str | None = None,
) -> pd.DataFrame:
    """For each value of ``y``, the smallest ``x`` whose metric (min over other axes) is below ``threshold``.

    One column per value of ``by`` (or one column, ``metric``); NaN where no tested ``x`` reaches the threshold.
    """
    keys = [k for k in (by, y, x) if k is not None]
    ok = ok_rows(results, metric)
    cells = ok.groupby(keys, sort=True)[metric].agg("min").reset_index()
    below = cells[cells[metric] < threshold]
    ys = sorted(ok[y].unique())
    columns = sorted(ok[by].unique(), key=appearance_order(results, by)) if by is not None else [None]
    table: dict[str, list[Any]] = {y: ys}
    for col in columns:
        part = below if col is None else below[below[by] == col]
        best = part.groupby(y)[x].min()
        table[metric if col is None else str(col)] = [best.get(v, math.nan) for v in ys]
    return pd.DataFrame(table)


def appearance_order(results: pd.DataFrame, column: str | None) -> Callable[[Any], int]:
    """Sort key: a column's values in their order of first appearance in the table (the sweep's order)."""
    first = {} if column is None else {v: i for i, v in reversed(list(enumerate(results[column])))}
    return lambda v: first.get(v, len(first))


def threshold_display(table: pd.DataFrame, results: pd.DataFrame, x: str, y: str, by: str | None) -> pd.DataFrame:
    """A threshold table for people: whole numbers, and 'none <= X' (the largest x tested) where none reached it."""
    shown = table.copy()
    for col in shown.columns[1:]:
        part = results if by is None else results[results[by].astype(str) == col]
        tested = part[part["status"] == "ok"].groupby(y)[x].max()
        shown[col] = [
            (f"{int(v)}" if float(v).is_integer() else f"{v}") if not math.isnan(v) else f"none <= {tested.get(yv)}"
            for yv, v in zip(shown[y], shown[col], strict=True)
        ]
    return shown
