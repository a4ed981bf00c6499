"""load_spec: a preset or file, --set overrides, --quick; the one entry point from text to an Experiment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib

from superposition.errors import SpecError
from superposition.spec.base import flatten, set_dotted
from superposition.spec.experiment import Experiment, parse_spec
from superposition.spec.memory import check_memory
from superposition.spec.presets import load_raw
from superposition.spec.quick import apply_quick_caps, describe_quick, instance_axes


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides (values parsed as TOML, else taken as strings)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p.isidentifier() for p in key.split(".")):
            raise SpecError(f"--set {item!r}: expected section.field=value, e.g. --set model.d_hidden=3")
        if key.startswith("instances.") and key != "instances.combine":
            axis = key[len("instances.") :]
            inst = raw.setdefault("instances", {})
            if not isinstance(inst, dict):
                raise SpecError("instances: must be a table")
            # Gather the axes as InstancesSpec does (explicit axes, then the TOML-level keys) so the override
            # replaces an axis in place (keeping the grid order) instead of being shadowed by the TOML-level key.
            if not isinstance(inst.get("axes") or {}, dict):
                raise SpecError("instances.axes: must be a table")
            axes = instance_axes(inst) or {}
            axes[axis] = parse_value(value)
            raw["instances"] = {**({"combine": inst["combine"]} if "combine" in inst else {}), "axes": axes}
            continue
        set_dotted(raw, key, parse_value(value))
    return raw


def _raws(
    source: str | Path | dict[str, Any], overrides: list[str], quick: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw spec without and with ``--quick`` (the same object when ``quick`` is off), ``--set`` applied to both."""
    raw = dict(source) if isinstance(source, dict) else load_raw(source)
    quick_table = raw.pop("quick", None)
    if quick_table is not None and not isinstance(quick_table, dict):
        raise SpecError("quick: must be a table of dotted overrides")
    full = apply_overrides(raw, list(overrides))
    if not quick:
        return full, full
    q = flatten(quick_table or {})
    shrunk = apply_quick_caps(apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in q.items()]), set(q))
    return full, apply_overrides(shrunk, list(overrides))


def load_spec(source: str | Path | dict[str, Any], overrides: list[str] = (), quick: bool = False) -> Experiment:  # type: ignore[assignment]
    """Load a spec from a TOML/JSON file, a preset name or a dict; apply `--quick` and `--set` overrides.

    ``quick`` shrinks the spec for a fast check, shapes unchanged: the spec's own ``[quick]`` table of dotted
    overrides first, then for every setting it does not name train.steps <= 300, sae.steps <= 1000 (schedules scaled)
    and each [instances] and [sweep] axis cut to its first and last value (see :mod:`superposition.spec.quick`).
    """
    spec = parse_spec(_raws(source, list(overrides), quick)[1])
    check_memory(spec)
    return spec


def load_quick(source: str | Path | dict[str, Any], overrides: list[str] = ()) -> tuple[Experiment, str]:  # type: ignore[assignment]
    """``load_spec(source, overrides, quick=True)`` and one line saying what ``--quick`` shrank, e.g. ``quick:
    train.steps 10000 -> 300, data.feature_probability 7 -> 2 values`` (empty when it changed nothing)."""
    full, shrunk = _raws(source, list(overrides), True)
    spec = parse_spec(shrunk)
    check_memory(spec)
    return spec, describe_quick(full, shrunk)
