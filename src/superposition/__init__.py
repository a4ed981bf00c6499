"""Toy models of superposition: instance-batched training, analysis, sweeps and reports.

The public names resolve lazily (PEP 562): ``import superposition`` loads neither torch nor any submodule until a
name is used, so the command line starts at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from superposition.version import __version__

_EXPORTS = {
    "Experiment": "superposition.spec",
    "SpecError": "superposition.spec",
    "load_spec": "superposition.spec",
    "ToyModel": "superposition.models",
    "build_model": "superposition.models",
    "Run": "superposition.runs",
    "train": "superposition.runs",
    "run": "superposition.runs",
    "save_run": "superposition.runs",
    "load_run": "superposition.runs",
    "load_sae": "superposition.runs",  # through runs, which binds the notebook views of Run and Sae
    "Sweep": "superposition.sweep",
    "load_sweep": "superposition.sweep",
}
"""Public name -> the module that defines it."""

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'superposition' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors only (redundant aliases re-export)
    from superposition.models import ToyModel as ToyModel
    from superposition.models import build_model as build_model
    from superposition.runs import Run as Run
    from superposition.runs import load_run as load_run
    from superposition.runs import load_sae as load_sae
    from superposition.runs import run as run
    from superposition.runs import save_run as save_run
    from superposition.runs import train as train
    from superposition.spec import Experiment as Experiment
    from superposition.spec import SpecError as SpecError
    from superposition.spec import load_spec as load_spec
    from superposition.sweep import Sweep as Sweep
    from superposition.sweep import load_sweep as load_sweep
