"""What every claim shares: the :class:`Row` a rule returns, the number formatting of the results table, and the
shape of a sweep result the rules read (:class:`SweepResult`, so this layer needs no import of the sweep module)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import pandas as pd

from superposition.record import Run
from superposition.spec import Experiment

__all__ = ["Row", "SweepPlan", "SweepResult", "by", "fmt", "group_runs", "probs", "seq"]


class Row(NamedTuple):
    """One preset's numbers: what we measured, what the source reports, and the verdict with its rule."""

    measured: str
    source: str
    verdict: str
    timing: str = ""
    """Where the wall time went (e.g. model vs SAEs), appended to the wall-time column."""


class SweepPlan(Protocol):
    """What the rules read of a sweep's plan (``superposition.sweep.Plan``)."""

    @property
    def points(self) -> Sequence[Any]:
        """Each point, with ``.values``: its axis values."""
        ...

    @property
    def repeats(self) -> int: ...

    def group(self, group_id: str) -> Any:
        """The group of that id, with ``.points``: its point indices in order."""
        ...


class SweepResult(Protocol):
    """What the rules read of a finished sweep (``superposition.sweep.Sweep``, as ``load_sweep`` opens it)."""

    @property
    def plan(self) -> SweepPlan: ...

    @property
    def results(self) -> pd.DataFrame:
        """One row per point: status, axis columns and metrics."""
        ...

    @property
    def runs(self) -> Mapping[str, Run]:
        """Group id -> its finished run."""
        ...


def fmt(v: float, digits: int = 3) -> str:
    if isinstance(v, float | np.floating) and not math.isfinite(float(v)):
        return "nan"
    return f"{float(v):.{digits}g}"


def by(df: pd.DataFrame, key: str, col: str) -> dict[Any, Any]:
    return dict(zip(df[key], df[col], strict=True))


def probs(spec: Experiment) -> np.ndarray:
    return np.asarray(spec.instance_values("data.feature_probability"), dtype=np.float64)


def seq(values: Any, digits: int = 3) -> str:
    return ", ".join(fmt(v, digits) if isinstance(v, float | np.floating) else str(v) for v in values)


def group_runs(result: SweepResult) -> list[tuple[dict[str, Any], Run]]:
    """Each finished group of a sweep with the axis values of its first point."""
    out = []
    for gid, run in result.runs.items():
        group = result.plan.group(gid)
        out.append((result.plan.points[group.points[0]].values, run))
    return out
