"""The SAE spec of ``superposition sae``: from a TOML/JSON file or a base spec, with ``--set`` overrides and
``--quick``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from superposition.spec import (
    SaeSpec,
    SpecError,
    apply_overrides,
    format_validation_error,
    load_raw,
    quick_sae_schedule,
)

__all__ = ["load_sae_spec"]


def load_sae_spec(
    source: str | Path | None = None,
    *,
    base: SaeSpec | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
    n_features: int | None = None,
) -> SaeSpec:
    """An SAE spec from a TOML/JSON file (an ``[sae]`` table, or the fields at top level), else ``base`` or the
    defaults, with ``--set`` overrides (``sae.k=2`` or ``k=2``); ``quick`` shrinks steps and the resampling schedule.

    ``n_features`` (the run's) is the default ``d_sae`` where neither the file nor ``base`` sets one, so a
    20-feature run gets 20 latents; ``k`` and the other sparsity settings are validated after it is resolved."""
    if source is not None:
        raw = load_raw(source)
        raw = raw["sae"] if isinstance(raw.get("sae"), dict) else raw
    else:
        raw = base.model_dump(mode="json") if base is not None else {}
    if n_features is not None and isinstance(raw, dict) and "d_sae" not in raw:
        raw = {**raw, "d_sae": n_features}
    sets = [o if o.strip().startswith("sae.") else f"sae.{o.strip()}" for o in overrides]
    raw = apply_overrides({"sae": raw}, sets)["sae"]
    spec = _validate_sae(raw)
    shrink = quick_sae_schedule(spec) if quick else {}  # the one --quick rule for SAEs (also run --quick's)
    if shrink:
        spec = _validate_sae({**spec.model_dump(mode="json"), **shrink})
    return spec


def _validate_sae(raw: Any) -> SaeSpec:
    from pydantic import ValidationError

    if not isinstance(raw, dict):
        raise SpecError("sae: must be a table")
    try:
        return SaeSpec.model_validate(raw)
    except ValidationError as exc:
        line = format_validation_error(exc)
        raise SpecError(line if line.startswith("sae") else f"sae.{line}") from None
