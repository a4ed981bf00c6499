"""What each preset must reproduce: its source's numbers and the rule that grades a finished run against them.

``RULES`` maps a preset name to its rule: a function of the finished result (a :class:`~superposition.record.Run`,
or for a preset with a ``[sweep]`` section the loaded sweep) that returns a :class:`Row` of the measured numbers,
the source's numbers and the verdict with its rule. A "no" is reported, never tuned away.

Only a full, unmodified preset is graded (:func:`is_full_preset`); a quick or modified run gets
:data:`NOT_GRADED`, and a preset without a rule (``demo``) gets nothing (:func:`claim_line`).

This package sits below ``runs``, ``sweep``, ``report``, ``plots`` and ``cli`` and imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from superposition.claims.common import Row, SweepResult
from superposition.claims.diagrams import phase_diagram, phase_diagram_3x2
from superposition.claims.paper import anticorrelated, correlated, double_descent, geometry, pentagon, relu_vs_linear
from superposition.claims.saes import sae_architectures, sae_recovery
from superposition.claims.seeds import (
    abs_computation,
    abs_discrete,
    asymmetric_motif,
    compressed_computation,
    compressed_computation_clean,
    hierarchy,
    l1_computation,
    l1_computation_scratch,
    multi_layer,
    neuron_model,
    tied_vs_untied,
    transplant_row,
)
from superposition.errors import SpecError
from superposition.spec import Experiment, load_spec

__all__ = [
    "NOT_GRADED",
    "RULES",
    "Row",
    "SweepResult",
    "claim_line",
    "grade",
    "has_claim",
    "is_full_preset",
    "verdict_line",
]

RULES: dict[str, Callable[[Any], Row]] = {
    "relu-vs-linear": relu_vs_linear,
    "tied-vs-untied": tied_vs_untied,
    "pentagon": pentagon,
    "neuron-model": neuron_model,
    "abs-computation": abs_computation,
    "abs-discrete": abs_discrete,
    "asymmetric-motif": asymmetric_motif,
    "correlated": correlated,
    "anticorrelated": anticorrelated,
    "geometry": geometry,
    "phase-diagram": phase_diagram,
    "phase-diagram-3x2": phase_diagram_3x2,
    "compressed-computation": compressed_computation,
    "compressed-computation-clean": compressed_computation_clean,
    "transplant": transplant_row,
    "l1-computation": l1_computation,
    "l1-computation-scratch": l1_computation_scratch,
    "multi-layer-computation": multi_layer,
    "double-descent": double_descent,
    "hierarchy": hierarchy,
    "sae-recovery": sae_recovery,
    "sae-architectures": sae_architectures,
}
"""Preset name -> its rule (one per preset that has a claim; engineers add theirs here)."""

NOT_GRADED = "reproduced? not graded (quick/modified)"
"""The line for a run of a preset with a rule whose spec is not the preset's full one."""


def has_claim(name: str) -> bool:
    """Whether the preset ``name`` has a rule (a claim to reproduce)."""
    return name in RULES


def grade(name: str, result: Any) -> Row:
    """Grade a finished result of the preset ``name``: a Run, or for a preset with a ``[sweep]`` the loaded sweep."""
    if name not in RULES:
        raise SpecError(f"no claim for {name!r} (presets with one: {', '.join(RULES)})")
    return RULES[name](result)


def _comparable(spec: Experiment) -> dict[str, Any]:
    dumped = spec.model_dump(mode="json")
    dumped.pop("device", None)  # --device changes where it trains, not what it shows
    return dumped


def is_full_preset(name: str, spec: Experiment) -> bool:
    """Whether ``spec`` is the preset ``name`` at its full settings (no --quick, no --set; ``device`` may differ)."""
    try:
        full = load_spec(name)
    except SpecError:
        return False
    return _comparable(spec) == _comparable(full)


def verdict_line(name: str, result: Any) -> str:
    """One line: the verdict with its rule, the measured numbers and the source's, e.g.
    ``reproduced? yes (…rule…) — measured: … — source: …``."""
    row = grade(name, result)
    line = f"reproduced? {row.verdict} — measured: {row.measured} — source: {row.source}"
    return line.replace("\r", " ").replace("\n", " ")


def claim_line(name: str, spec: Experiment, result: Any) -> str | None:
    """What ``run`` and ``sweep`` end with: the verdict line of a full preset, :data:`NOT_GRADED` for a quick or
    modified one, None for a preset without a rule (or a spec that is no preset). ``result`` is the finished result or
    a function that loads it (called only when the preset is graded); a result the rule cannot read gives a
    "could not be graded" line naming why."""
    if not has_claim(name):
        return None
    if not is_full_preset(name, spec):
        return NOT_GRADED
    try:
        return verdict_line(name, result() if callable(result) else result)
    except SpecError as exc:
        return f"reproduced? could not be graded ({exc})"
