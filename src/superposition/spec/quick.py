"""``--quick``: one meaning for every spec, and the line that says what it shrank.

A spec's own ``[quick]`` table (dotted overrides) applies first. Then, for every setting that table does not name:

- ``train.steps`` at most :data:`QUICK_TRAIN_STEPS` (``train.warmup_steps`` scaled by the same factor, and the values
  of a ``train.steps`` sweep axis capped too);
- ``sae.steps`` at most :data:`QUICK_SAE_STEPS`, the resampling schedule and ``log_every`` scaled to match
  (:func:`quick_sae_schedule`, which ``superposition sae --quick`` uses as well);
- each ``[instances]`` axis and each ``[sweep]`` axis cut to its first and last value. Lists that advance together
  (``combine = "zip"`` instances, a ``sweep.zip`` group with its labels) are cut together, and only when the
  ``[quick]`` table names none of them, so the spec stays valid.

Shapes never change. ``--set`` overrides apply last, as without ``--quick``.
"""

from __future__ import annotations

import copy
import json
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from superposition.spec.base import flatten
from superposition.spec.experiment import Experiment
from superposition.spec.sae import SaeSpec
from superposition.spec.sections import TrainSpec

QUICK_TRAIN_STEPS = 300
"""``--quick``: train.steps at most this (unless the spec's [quick] table sets it)."""
QUICK_SAE_STEPS = 1000
"""``--quick``: sae.steps at most this, the resampling schedule scaled to match (unless [quick] sets it)."""


def quick_sae_schedule(spec: SaeSpec, steps: int = QUICK_SAE_STEPS) -> dict[str, int]:
    """The SAE fields ``--quick`` changes: ``steps`` capped at ``steps``, and ``resample_every``, ``resample_window``
    and ``log_every`` scaled by the same factor (at least 1; no resampling stays none). Empty when already short."""
    if spec.steps <= steps:
        return {}
    f = steps / spec.steps
    return {
        "steps": steps,
        "resample_every": max(1, round(spec.resample_every * f)) if spec.resample_every else 0,
        "resample_window": max(1, round(spec.resample_window * f)),
        "log_every": max(1, round(spec.log_every * f)),
    }


def instance_axes(inst: dict[str, Any]) -> dict[str, Any] | None:
    """The axes of a raw [instances] table gathered as InstancesSpec does (explicit ``axes``, then the TOML-level
    keys); None when ``axes`` is not a table."""
    if not isinstance(inst.get("axes") or {}, dict):
        return None
    axes = dict(inst.get("axes") or {})
    axes.update(flatten({k: v for k, v in inst.items() if k not in ("axes", "combine")}))
    return axes


def sweep_axes(sweep: dict[str, Any]) -> dict[str, Any] | None:
    """The axes of a raw [sweep] table flattened to dotted names as SweepSpec does; None when not a table."""
    if not isinstance(sweep.get("axes") or {}, dict):
        return None
    flat: dict[str, Any] = {}
    for key, value in (sweep.get("axes") or {}).items():
        flat.update(flatten({key: value}) if isinstance(value, dict) else {key: value})
    return flat


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _cut(lists: dict[str, Any], units: list[list[str]]) -> dict[str, Any]:
    """``lists`` with each unit (names that advance together) cut to its first and last values, where all its
    members are lists of one length above 2 (anything else is left for validation to report)."""
    out = dict(lists)
    for unit in units:
        values = [lists.get(n) for n in unit]
        if not values or not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) != 1:
            continue
        if len(values[0]) > 2:
            out.update({n: [v[0], v[-1]] for n, v in zip(unit, values, strict=True)})
    return out


def _cap_train(raw: dict[str, Any], named: set[str]) -> None:
    train = raw.get("train", {})
    if "train.steps" in named or not isinstance(train, dict):
        return
    phases = train.get("phases")
    if isinstance(phases, list) and phases and all(isinstance(p, dict) and _is_int(p.get("steps")) for p in phases):
        # Each phase keeps its share of the steps (at least one); train.steps is derived from them.
        total = sum(p["steps"] for p in phases)
        if total > QUICK_TRAIN_STEPS:
            cut = [{**p, "steps": max(1, p["steps"] * QUICK_TRAIN_STEPS // total)} for p in phases]
            for p in cut:
                warm = p.get("warmup_steps")
                if _is_int(warm) and warm >= p["steps"]:
                    p["warmup_steps"] = max(0, p["steps"] - 1)
            raw["train"] = {k: v for k, v in train.items() if k != "steps"} | {"phases": cut}
        return
    steps = train.get("steps", TrainSpec.model_fields["steps"].default)
    if not _is_int(steps) or steps <= QUICK_TRAIN_STEPS:
        return
    train = {**train, "steps": QUICK_TRAIN_STEPS}
    warm = train.get("warmup_steps")
    if "train.warmup_steps" not in named and _is_int(warm) and warm > 0:
        train["warmup_steps"] = max(1, min(round(warm * QUICK_TRAIN_STEPS / steps), QUICK_TRAIN_STEPS - 1))
    raw["train"] = train


def _cap_sae(raw: dict[str, Any], named: set[str]) -> None:
    sae = raw.get("sae")
    if not isinstance(sae, dict) or "sae.steps" in named:
        return
    try:
        spec = SaeSpec.model_validate(sae)
    except ValidationError:
        return  # the final validation reports it
    shrink = {k: v for k, v in quick_sae_schedule(spec).items() if f"sae.{k}" not in named}
    if shrink:
        raw["sae"] = {**sae, **shrink}


def _cut_instances(raw: dict[str, Any], named: set[str]) -> None:
    inst = raw.get("instances")
    axes = instance_axes(inst) if isinstance(inst, dict) else None
    if not axes:
        return
    free = [k for k in axes if f"instances.{k}" not in named]
    zipped = inst.get("combine") == "zip"  # zipped lists advance together: cut all of them or none
    units = ([list(axes)] if len(free) == len(axes) else []) if zipped else [[k] for k in free]
    cut = _cut(axes, units)
    if cut != axes:
        raw["instances"] = {**({"combine": inst["combine"]} if "combine" in inst else {}), "axes": cut}


def _cut_sweep(raw: dict[str, Any], named: set[str]) -> None:
    sweep = raw.get("sweep")
    axes = sweep_axes(sweep) if isinstance(sweep, dict) else None
    labels = (sweep.get("labels") or {}) if isinstance(sweep, dict) else None
    zips = (sweep.get("zip") or []) if isinstance(sweep, dict) else None
    if axes is None or not isinstance(labels, dict) or set(labels) & set(axes) or not isinstance(zips, list):
        return
    if not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in zips):
        return
    lists = {**labels, **axes}
    grouped = {n for g in zips for n in g}
    units = [g for g in zips if not any(f"sweep.axes.{n}" in named or f"sweep.labels.{n}" in named for n in g)]
    units += [[k] for k in axes if k not in grouped and f"sweep.axes.{k}" not in named]
    cut = _cut(lists, units)
    steps = cut.get("train.steps")
    if "train.steps" in axes and "sweep.axes.train.steps" not in named and isinstance(steps, list):
        capped = [min(v, QUICK_TRAIN_STEPS) if _is_int(v) else v for v in steps]
        cut["train.steps"] = capped if "train.steps" in grouped else list(dict.fromkeys(capped))
    if cut != lists:
        new = {**sweep, "axes": {k: cut[k] for k in axes}}
        if labels:
            new["labels"] = {k: cut[k] for k in labels}
        raw["sweep"] = new


def apply_quick_caps(raw: dict[str, Any], named: set[str]) -> dict[str, Any]:
    """A copy of a raw spec (its [quick] table already applied, ``--set`` overrides not yet) with the generic
    ``--quick`` caps of the module docstring applied to every setting outside ``named`` (the [quick] table's
    dotted keys)."""
    raw = copy.deepcopy(raw)
    _cap_train(raw, named)
    _cap_sae(raw, named)
    _cut_instances(raw, named)
    _cut_sweep(raw, named)
    return raw


# -- what --quick changed ---------------------------------------------------------------------------------------------
_ORDER = list(Experiment.model_fields)


def _field_default(key: str) -> Any:
    """The schema default of a dotted field (None where the schema has none)."""
    model: type[BaseModel] | None = Experiment
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part) if model is not None else None
        if info is None:
            return None
        if i == len(parts) - 1:
            return None if info.is_required() else info.get_default(call_default_factory=True)
        ann = info.annotation
        model = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return None


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | dict):
        text = json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."
    return str(v)


def _count(v: Any) -> int:
    return len(v) if isinstance(v, list) else 1


def _list_changes(before: dict[str, Any], after: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for k in dict.fromkeys([*before, *after]):
        b, a = before.get(k), after.get(k)
        if b == a:
            continue
        nb, na = _count(b) if k in before else 1, _count(a) if k in after else 1
        unit = "value" if na == 1 else "values"
        out.append(f"{prefix}{k} {nb} -> {na} {unit}" if nb != na else f"{prefix}{k} {na} other {unit}")
    return out


def _scalar_changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in dict.fromkeys([*before, *after]):
        key = prefix + k
        b = before[k] if k in before else _field_default(key)
        a = after[k] if k in after else _field_default(key)
        if b != a:
            out.append(f"{key} {_show(b)} -> {_show(a)}")
    return out


def describe_quick(full: dict[str, Any], quick: dict[str, Any]) -> str:
    """One line naming what ``--quick`` changed between two raw specs (the spec with and without ``--quick``, both
    with the same ``--set`` overrides), e.g. ``quick: train.steps 10000 -> 300, data.feature_probability 7 -> 2
    values``; empty when nothing changed."""
    parts: list[tuple[int, list[str]]] = []
    keys = dict.fromkeys([*full, *quick])
    for top in keys:
        b, a = full.get(top), quick.get(top)
        if b == a:
            continue
        rank = _ORDER.index(top) if top in _ORDER else len(_ORDER)
        if top == "instances" and isinstance(b or {}, dict) and isinstance(a or {}, dict):
            ib, ia = instance_axes(b or {}), instance_axes(a or {})
            if ib is not None and ia is not None:
                combine = _scalar_changes(
                    {k: v for k, v in (b or {}).items() if k == "combine"},
                    {k: v for k, v in (a or {}).items() if k == "combine"},
                    "instances.",
                )
                parts.append((rank, combine + _list_changes(ib, ia, "")))
                continue
        if top == "sweep" and isinstance(b or {}, dict) and isinstance(a or {}, dict):
            sb, sa = sweep_axes(b or {}), sweep_axes(a or {})
            if sb is not None and sa is not None:
                rest_b = flatten({k: v for k, v in (b or {}).items() if k not in ("axes", "labels")})
                rest_a = flatten({k: v for k, v in (a or {}).items() if k not in ("axes", "labels")})
                lb, la = (b or {}).get("labels") or {}, (a or {}).get("labels") or {}
                changes = _scalar_changes(rest_b, rest_a, "sweep.") + _list_changes(sb, sa, "sweep.axes.")
                if isinstance(lb, dict) and isinstance(la, dict):
                    changes += _list_changes(lb, la, "sweep.labels.")
                parts.append((rank, changes))
                continue
        if isinstance(b, dict) or isinstance(a, dict):
            fb = flatten(b) if isinstance(b, dict) else {}
            fa = flatten(a) if isinstance(a, dict) else {}
            parts.append((rank, _scalar_changes(fb, fa, f"{top}.")))
        else:
            parts.append((rank, _scalar_changes({top: b} if top in full else {}, {top: a} if top in quick else {})))
    changes = [c for _, cs in sorted(parts, key=lambda t: t[0]) for c in cs]
    return f"quick: {', '.join(changes)}" if changes else ""
