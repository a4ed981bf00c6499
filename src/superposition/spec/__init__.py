"""The experiment spec: schema, presets, loading and the memory estimate (the bottom of the stack: it imports only
errors and folder)."""

from __future__ import annotations

from superposition.errors import SpecError
from superposition.spec.base import (
    MAX_DIM,
    MAX_INSTANCES,
    MAX_STEPS,
    flatten,
    format_validation_error,
    get_dotted,
    set_dotted,
)
from superposition.spec.experiment import Experiment, SweepReportSpec, SweepSpec, is_field, parse_spec
from superposition.spec.load import apply_overrides, load_quick, load_spec, parse_value
from superposition.spec.memory import (
    DATASET_DRAW_FACTOR,
    MEMORY_FRACTION,
    MemoryEstimate,
    check_memory,
    memory_estimate,
    physical_memory,
)
from superposition.spec.presets import load_raw, preset_description, preset_hint, preset_names, preset_text, read_toml
from superposition.spec.quick import QUICK_SAE_STEPS, QUICK_TRAIN_STEPS, describe_quick, quick_sae_schedule
from superposition.spec.sae import SAE_SPARSITY_FIELD, SaeSpec
from superposition.spec.sections import INSTANCE_AXES, DataSpec, InstancesSpec, ModelSpec, TaskSpec, TrainSpec

__all__ = [
    "SpecError",
    "ModelSpec",
    "DataSpec",
    "TaskSpec",
    "TrainSpec",
    "InstancesSpec",
    "SaeSpec",
    "SweepSpec",
    "SweepReportSpec",
    "Experiment",
    "INSTANCE_AXES",
    "load_spec",
    "load_quick",
    "describe_quick",
    "quick_sae_schedule",
    "QUICK_TRAIN_STEPS",
    "QUICK_SAE_STEPS",
    "preset_hint",
    "parse_spec",
    "apply_overrides",
    "preset_names",
    "preset_text",
    "preset_description",
    "format_validation_error",
    "MemoryEstimate",
    "memory_estimate",
    "check_memory",
    "SAE_SPARSITY_FIELD",
    "load_raw",
    "read_toml",
    "physical_memory",
    "MEMORY_FRACTION",
    "DATASET_DRAW_FACTOR",
    "parse_value",
    "get_dotted",
    "set_dotted",
    "is_field",
    "flatten",
    "MAX_DIM",
    "MAX_STEPS",
    "MAX_INSTANCES",
]
