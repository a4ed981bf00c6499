"""Toy models of superposition: instance-batched training, analysis, sweeps and reports."""

__version__ = "0.1.0"

from superposition.models import ToyModel, build_model  # noqa: E402
from superposition.runs import Run, load_run, run, save_run, train  # noqa: E402
from superposition.sae import load_sae  # noqa: E402
from superposition.spec import Experiment, SpecError, load_spec  # noqa: E402
from superposition.sweep import Sweep, load_sweep  # noqa: E402

__all__ = [
    "__version__",
    "Experiment",
    "SpecError",
    "load_spec",
    "ToyModel",
    "build_model",
    "Run",
    "train",
    "run",
    "save_run",
    "load_run",
    "load_sae",
    "Sweep",
    "load_sweep",
]
