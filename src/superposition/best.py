"""Best of several seeds: per setting, the instance with the lowest loss, and how the other seeds fared.

Gradient descent from one initialisation can stop in a local minimum; the paper trains several models per setting and
keeps the lowest loss. Here the seeds are an instance axis (``[instances] seed = [...]``), so every seed's instance
is in the run's per-instance table; :func:`best_of_seeds` reduces that table to one row per setting (every axis
column except ``seed``) and says beside it how many seeds there were and how many reached the best seed's outcome.
The claims rules, the phase diagram and the run's report all read the best seed through this one function.

This module sits with ``metrics``: it reads tables, imports nothing above ``spec``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from superposition.errors import SpecError
from superposition.spec import Experiment

__all__ = ["SEED", "COUNT_COLUMNS", "best_of_seeds", "seed_axis_varies", "setting_columns"]

SEED = "seed"
"""The instance axis (and column of ``run.instances``) that holds each instance's seed."""

COUNT_COLUMNS = ("n_seeds", "n_ranked", "n_like_best", "n_true")
"""The columns :func:`best_of_seeds` adds: seeds of the setting, seeds with a finite loss, ranked seeds whose readout
equals the best seed's, and (for a boolean readout) ranked seeds whose readout is true."""


def setting_columns(spec: Experiment) -> list[str]:
    """The instance axes other than the seed, in the spec's order: the columns that name a setting."""
    return [key for key in spec.instances.axes if key != SEED]


def seed_axis_varies(spec: Experiment) -> bool:
    """Whether the spec has a seed axis with more than one value and at least one other axis (a best-of-seeds
    read-out then says something the per-instance table does not)."""
    seeds = spec.instances.axes.get(SEED)
    return seeds is not None and len(set(seeds)) > 1 and bool(setting_columns(spec))


def _key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    # NaN never equals itself: map it to None so that rows with a NaN setting share one group.
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in values)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def best_of_seeds(
    instances: pd.DataFrame,
    settings: Sequence[str] = (),
    readout: str | None = None,
    *,
    rank: str = "loss",
) -> pd.DataFrame:
    """One row per setting: the row of its lowest-``rank`` instance, with the seed counts beside it.

    ``settings``: the columns that name a setting (:func:`setting_columns`; none: the whole table is one setting).
    Settings come out in the order of their first row. Within a setting the instance with the lowest finite
    ``rank`` wins; ties go to the earlier row (the lower seed, as the instance table lists seeds in order). An
    instance with a NaN or infinite ``rank`` (dropped, diverged) is never best, unless no instance of the setting
    has a finite one: then the setting keeps its first row and ``n_ranked`` is 0.

    Added columns: ``n_seeds`` (instances of the setting), ``n_ranked`` (of those, with a finite ``rank``) and,
    with a ``readout`` column, ``n_like_best`` (ranked instances whose readout equals the best one's, the best
    included; 0 when none is ranked) and, for a boolean readout, ``n_true`` (ranked instances whose readout is
    true): the per-seed rate beside the best-of-seeds result.
    """
    needed = [*settings, rank, *([readout] if readout is not None else [])]
    missing = [c for c in needed if c not in instances.columns]
    if missing:
        raise SpecError(f"best of seeds: no column {', '.join(map(repr, missing))} in the instances table")
    clash = [c for c in COUNT_COLUMNS if c in instances.columns]
    if clash:
        raise SpecError(f"best of seeds: the instances table already has {', '.join(map(repr, clash))}")
    df = instances.reset_index(drop=True)
    score = pd.to_numeric(df[rank], errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(score)
    keys = zip(*(df[c].tolist() for c in settings), strict=True) if settings else (() for _ in range(len(df)))
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(_key(tuple(key)), []).append(i)
    boolean = readout is not None and pd.api.types.is_bool_dtype(df[readout])
    values = df[readout].tolist() if readout is not None else []
    picked: list[int] = []
    counts: dict[str, list[int]] = {c: [] for c in COUNT_COLUMNS}
    for idx in groups.values():
        rows = np.asarray(idx)
        ok = finite[rows]
        best = int(rows[np.argmin(np.where(ok, score[rows], np.inf))]) if ok.any() else int(rows[0])
        picked.append(best)
        counts["n_seeds"].append(len(rows))
        counts["n_ranked"].append(int(ok.sum()))
        if readout is not None:
            ranked = [values[i] for i in rows[ok]]
            counts["n_like_best"].append(sum(_same(v, values[best]) for v in ranked))
            counts["n_true"].append(sum(bool(v) for v in ranked))
    out = df.iloc[picked].reset_index(drop=True)
    added = ["n_seeds", "n_ranked", *(["n_like_best"] if readout is not None else []), *(["n_true"] if boolean else [])]
    for c in added:
        out[c] = np.asarray(counts[c], dtype=np.int64)
    return out
