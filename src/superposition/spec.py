"""The experiment schema: typed, frozen, validated sections, TOML/JSON I/O, presets and overrides.

An :class:`Experiment` is the single source of truth for a run. Its ``[instances]`` section lists settings that
keep tensor shapes; their grid is flattened into the instance dimension of ONE model (see :meth:`Experiment.grid`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from superposition.errors import SpecError
from superposition.folder import format_bytes

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
    "parse_spec",
    "apply_overrides",
    "preset_names",
    "preset_text",
    "preset_description",
    "format_validation_error",
    "MemoryEstimate",
    "memory_estimate",
    "check_memory",
]

# Guard rails against sizes that cannot be meant (the reliability issue refines them with a memory estimate).
MAX_DIM = 1_000_000
MAX_STEPS = 100_000_000
MAX_INSTANCES = 1_000_000


class _Section(BaseModel):
    # strict: a typo such as `seed = true` or `d_hidden = 2.5` is refused instead of silently coerced.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


Activation = Literal["relu", "gelu", "none"]
ModelKind = Literal["linear", "relu-output", "neuron", "mlp", "residual-mlp"]


class ModelSpec(_Section):
    """The toy model: which member of the family, its sizes and options."""

    kind: ModelKind = "relu-output"
    """Model family member: linear | relu-output | neuron (ReLU hidden) | mlp (untied, |x| task) | residual-mlp."""
    n_features: int = Field(5, ge=1, le=MAX_DIM)
    """Number of input features n (derived from the tree for hierarchy data when left at 0)."""
    d_hidden: int = Field(2, ge=1, le=MAX_DIM)
    """Hidden width: bottleneck dimensions, or neurons per MLP layer for neuron/mlp/residual-mlp."""
    tied: bool | None = None
    """Tied weights (W and W^T) or untied (W1, W2); default tied except for mlp."""
    bias_hidden: bool = False
    """Learnable bias on the hidden layer (b_hidden, or b_in per layer for residual-mlp)."""
    bias_out: bool | None = None
    """Learnable output bias (b_final, or b_out per layer for residual-mlp); default on except residual-mlp."""
    n_layers: int = Field(1, ge=1, le=64)
    """Number of MLP layers (residual-mlp only; the other kinds have one hidden layer)."""
    activation: list[Activation] | Activation = "relu"
    """Hidden activation, one for all layers or one per layer (neuron, mlp, residual-mlp)."""
    d_embed: int | None = Field(None, ge=1, le=MAX_DIM)
    """Residual-stream width of residual-mlp (default 1000 for random-fixed, n_features for identity)."""
    embedding: Literal["random-fixed", "identity"] = "random-fixed"
    """residual-mlp embedding W_E: random unit-norm rows, frozen; or the identity (no embedding)."""
    skip: bool = True
    """residual-mlp: add each MLP's output to the residual stream (True) or replace it (False)."""
    init: Literal["per-instance", "notebook"] = "per-instance"
    """Weight init fans per instance (default), or over the whole tensor as the public notebooks do."""

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        kind = data.get("kind", "relu-output")
        if data.get("tied") is None:
            data["tied"] = kind != "mlp"
        if data.get("bias_out") is None:
            data["bias_out"] = kind != "residual-mlp"
        if kind == "residual-mlp" and data.get("d_embed") is None:
            emb = data.get("embedding", "random-fixed")
            data["d_embed"] = 1000 if emb == "random-fixed" else data.get("n_features", 5)
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.kind != "residual-mlp" and self.n_layers != 1:
            raise ValueError(f"model.n_layers: only residual-mlp has several layers (got {self.n_layers})")
        if isinstance(self.activation, list) and len(self.activation) != self.n_layers:
            raise ValueError(
                f"model.activation: give one activation or exactly n_layers={self.n_layers} "
                f"(got {len(self.activation)})"
            )
        if self.kind == "residual-mlp" and self.embedding == "identity" and self.d_embed != self.n_features:
            raise ValueError("model.d_embed: must equal model.n_features with the identity embedding")
        return self

    @property
    def activations(self) -> list[str]:
        """One activation name per hidden layer."""
        if isinstance(self.activation, list):
            return list(self.activation)
        return [self.activation] * self.n_layers


class DataSpec(_Section):
    """The synthetic feature distribution."""

    kind: Literal["sparse", "correlated", "anticorrelated", "hierarchy"] = "sparse"
    """Feature law: independent sparse, correlated pairs, anticorrelated pairs, or a binary tree (seed 002)."""
    magnitude: Literal["uniform", "signed", "normal"] = "uniform"
    """Value of an active feature: U[0,1], U[-1,1], or clip(0.5 + 0.2 N(0,1), 0, 1)."""
    feature_probability: float = Field(0.01, gt=0.0, le=1.0, allow_inf_nan=False)
    """Probability p = 1 - S that a feature is active (per feature, per sample)."""
    n_correlated_pairs: int = Field(0, ge=0, le=MAX_DIM)
    """Pairs that share one activity draw (columns first); 0 with kind=correlated means all features."""
    n_anticorrelated_pairs: int = Field(0, ge=0, le=MAX_DIM)
    """Pairs that are never on together (after correlated); 0 with kind=anticorrelated means all features."""
    tree_depth: int = Field(3, ge=1, le=16)
    """Hierarchy: depth of the binary tree; depth d gives 2^(d+1) - 2 features (root dropped)."""
    branching: int = Field(2, ge=2, le=2)
    """Hierarchy: children per node (the seed 002 sampler is binary; only 2 is supported)."""
    early_stopping: bool = False
    """Hierarchy: children of an on parent may both be off (A 1/4, B 1/4, neither 1/2)."""
    dataset_size: int | None = Field(None, ge=1, le=10_000_000)
    """Train on a fixed dataset of this many points (double descent); default fresh samples every step."""
    normalize: bool = False
    """Scale every sampled data point to unit norm (seed 001); all-zero points stay zero."""


class TaskSpec(_Section):
    """What the model must output and how errors are weighted."""

    target: Literal["identity", "abs", "relu-plus-x"] = "identity"
    """Label: x itself, |x|, or ReLU(x) + residual_factor * x (seed 004)."""
    residual_factor: float = Field(1.0, allow_inf_nan=False, ge=-100, le=100)
    """k in the relu-plus-x label ReLU(x) + k x."""
    loss: Literal["l2", "l1"] = "l2"
    """Per-element error: importance-weighted squared (l2) or absolute (l1)."""
    importance: float | list[float] = 1.0
    """Feature importance: a ratio r (I_i = r^i) or an explicit list of n_features weights."""
    importance_start: int = Field(0, ge=0, le=1000)
    """First exponent of a ratio importance: I_i = r^(i + start), i = 0..n-1 (the curriculum's 0.75^(1..n) is 1)."""

    @field_validator("importance")
    @classmethod
    def _positive(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("task.importance: the list is empty")
        for x in values:
            if not math.isfinite(x) or x <= 0:
                raise ValueError(f"task.importance: values must be finite and > 0 (got {x})")
        return v


class TrainSpec(_Section):
    """Optimisation settings."""

    steps: int = Field(5000, ge=1, le=MAX_STEPS)
    """Number of optimiser steps."""
    batch_size: int = Field(1024, ge=1, le=10_000_000)
    """Samples per step (shared by all instances, each with its own data)."""
    lr: float = Field(1e-3, gt=0.0, le=10.0, allow_inf_nan=False)
    """Peak learning rate."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """Adam (weight decay added to the gradient, as torch.optim.Adam) or AdamW (decoupled decay)."""
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False)
    """Weight decay coefficient."""
    schedule: Literal["constant", "linear", "cosine", "warmup-cosine"] = "constant"
    """Learning-rate schedule: constant, 1 - t/T, cos(pi t / 2(T-1)), or linear warm-up then cosine."""
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    """Warm-up steps for warmup-cosine."""
    log_every: int = Field(100, ge=1, le=MAX_STEPS)
    """Record per-instance loss (and check for NaN/inf) every this many steps."""
    checkpoint_every: int = Field(0, ge=0, le=MAX_STEPS)
    """Write a resumable checkpoint every this many steps (0: never)."""
    engine: Literal["auto", "eager", "fast"] = "auto"
    """Training engine: plain eager PyTorch, the fused fast path, or auto (fast where it applies and pays)."""
    on_divergence: Literal["stop", "drop"] = "stop"
    """When an instance's loss turns NaN/inf: stop the run, or drop that instance and go on."""
    eval_batch: int = Field(8192, ge=1, le=10_000_000)
    """Fresh samples used for the final per-instance loss."""


# Settings that keep tensor shapes and may therefore vary across instances of one model.
INSTANCE_AXES: dict[str, str] = {
    "seed": "initialisation seed of the instance",
    "data.feature_probability": "feature probability p",
    "task.importance": "importance ratio or list",
    "task.residual_factor": "k of the relu-plus-x label",
    "train.lr": "peak learning rate",
    "train.weight_decay": "weight decay",
    "model.kind": "linear or relu-output (same shapes)",
}


class InstancesSpec(_Section):
    """Settings given as lists; their grid becomes the instance dimension of one model."""

    combine: Literal["product", "zip"] = "product"
    """How the lists combine: Cartesian product, or element-wise (all lists of one length)."""
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    """Dotted field name -> list of values (e.g. "data.feature_probability" = [1, 0.1])."""

    @model_validator(mode="before")
    @classmethod
    def _collect(cls, data: Any) -> Any:
        # TOML writes `data.feature_probability = [...]` as nested tables: flatten them into dotted axes.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        axes = dict(data.pop("axes", {}) or {})
        combine = data.pop("combine", "product")
        for key, value in _flatten(data).items():
            axes[key] = value
        return {"combine": combine, "axes": axes}

    @model_validator(mode="after")
    def _check(self) -> InstancesSpec:
        for key, values in self.axes.items():
            if key not in INSTANCE_AXES:
                allowed = ", ".join(INSTANCE_AXES)
                raise ValueError(f"instances.{key}: not an instance axis (allowed: {allowed})")
            if not isinstance(values, list) or not values:
                raise ValueError(f"instances.{key}: give a non-empty list of values")
        if self.combine == "zip" and len({len(v) for v in self.axes.values()}) > 1:
            raise ValueError("instances: with combine = 'zip' all lists must have the same length")
        return self


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


SaeArchitecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
ResampleMethod = Literal["none", "simple", "loss-weighted"]

# Which [sae] field holds the sparsity setting of each architecture (a list there means several SAEs per instance).
SAE_SPARSITY_FIELD: dict[str, str] = {
    "relu": "l1_coefficient",
    "gated": "l1_coefficient",
    "jumprelu": "l0_coefficient",
    "topk": "k",
    "batchtopk": "batch_k",
}


class SaeSpec(_Section):
    """Sparse autoencoders trained on a run's hidden activations, one set per toy-model instance."""

    name: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    """Folder name under RUN/sae/ (default: the architecture; with several architectures NAME-ARCH)."""
    architecture: SaeArchitecture | list[SaeArchitecture] = "relu"
    """relu (L1) | topk | batchtopk | jumprelu (L0) | gated; a list trains one SAE folder per architecture."""
    d_sae: int = Field(5, ge=1, le=MAX_DIM)
    """Number of latents of each SAE."""
    tied: bool = False
    """Tie the encoder to the decoder (W_enc = W_dec^T)."""
    init: Literal["transpose", "independent"] = "transpose"
    """Unit decoder rows with W_enc = W_dec^T, or W_enc, W_dec drawn independently (the curriculum's kaiming)."""
    normalize_decoder: bool | None = None
    """Keep decoder rows at unit norm; default on for the L1-penalised relu and gated, off otherwise."""
    l1_coefficient: float | list[float] = 0.2
    """L1 penalty lambda of relu and gated (a list: one SAE per value)."""
    l0_coefficient: float | list[float] = 0.01
    """L0 penalty lambda of jumprelu (a list: one SAE per value)."""
    k: int | list[int] = 1
    """topk: active latents per sample (a list: one SAE per value)."""
    batch_k: float | list[float] | None = None
    """batchtopk: active latents per sample on average over the batch, fractions allowed (default: k)."""
    threshold: float = Field(0.1, gt=0.0, le=1e6, allow_inf_nan=False)
    """jumprelu: initial threshold theta0 (learned as log theta)."""
    bandwidth: float = Field(0.01, gt=0.0, le=1e6, allow_inf_nan=False)
    """jumprelu: width epsilon of the rectangle kernel of the straight-through threshold gradient."""
    steps: int = Field(10000, ge=1, le=MAX_STEPS)
    """Optimiser steps."""
    batch_size: int = Field(1024, ge=1, le=10_000_000)
    """Activation samples per step (fresh from the run's data distribution)."""
    lr: float = Field(1e-3, gt=0.0, le=10.0, allow_inf_nan=False)
    """Adam learning rate."""
    schedule: Literal["constant", "linear", "cosine", "warmup-cosine"] = "constant"
    """Learning-rate schedule (as train.schedule; warm-up uses 5% of the steps)."""
    resample_method: ResampleMethod | list[ResampleMethod] = "loss-weighted"
    """Dead-latent resampling: none | simple (random direction) | loss-weighted (inputs ~ loss^2); list: one each."""
    resample_every: int = Field(2500, ge=0, le=MAX_STEPS)
    """Resample dead latents every this many steps (0: never)."""
    resample_window: int = Field(500, ge=1, le=MAX_STEPS)
    """A latent is dead when it has not fired in this many steps."""
    resample_scale: float = Field(0.5, gt=0.0, le=1e6, allow_inf_nan=False)
    """loss-weighted: new encoder column norm as a multiple of the mean alive encoder column norm."""
    dense_threshold: float = Field(0.1, gt=0.0, le=1.0, allow_inf_nan=False)
    """A latent is dense when it fires on more than this fraction of samples."""
    log_every: int = Field(100, ge=1, le=MAX_STEPS)
    """Record loss, L0 and dead-latent counts every this many steps."""
    eval_batch: int = Field(16384, ge=1, le=10_000_000)
    """Fresh samples used for the scores."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed of the SAE initialisation and of its data stream."""

    @model_validator(mode="after")
    def _check(self) -> SaeSpec:
        for key in ("architecture", "resample_method"):
            values = getattr(self, key)
            if isinstance(values, list) and (not values or len(set(values)) != len(values)):
                raise ValueError(f"sae.{key}: give a non-empty list without repeats")
        for key in ("l1_coefficient", "l0_coefficient", "k", "batch_k"):
            values = getattr(self, key)
            if values is None:
                continue
            values = values if isinstance(values, list) else [values]
            if not values:
                raise ValueError(f"sae.{key}: the list is empty")
            positive = key in ("k", "batch_k")
            for v in values:
                if not math.isfinite(v) or v < 0 or (positive and v <= 0):
                    raise ValueError(f"sae.{key}: values must be finite and {'> 0' if positive else '>= 0'} (got {v})")
                if positive and v > self.d_sae:
                    raise ValueError(f"sae.{key}: at most d_sae={self.d_sae} latents can be active (got {v})")
        return self

    @property
    def architectures(self) -> list[str]:
        """The architectures as a list."""
        return list(self.architecture) if isinstance(self.architecture, list) else [self.architecture]

    @property
    def resample_methods(self) -> list[str]:
        """The resampling methods as a list."""
        m = self.resample_method
        return list(m) if isinstance(m, list) else [m]

    def sparsity_values(self, architecture: str) -> list[float]:
        """The sparsity settings (lambda or k) that one architecture sweeps."""
        v = getattr(self, SAE_SPARSITY_FIELD[architecture])
        if v is None:  # batch_k defaults to k
            v = self.k
        return [float(x) for x in (v if isinstance(v, list) else [v])]

    def decoder_normalized(self, architecture: str) -> bool:
        """Whether decoder rows are kept at unit norm for this architecture."""
        if self.normalize_decoder is not None:
            return self.normalize_decoder
        return architecture in ("relu", "gated")

    def folder_name(self, architecture: str) -> str:
        """The SAE folder name of one architecture under RUN/sae/."""
        if self.name is None:
            return architecture
        return self.name if len(self.architectures) == 1 else f"{self.name}-{architecture}"

    def for_architecture(self, architecture: str) -> SaeSpec:
        """This spec restricted to one architecture (what one SAE folder stores)."""
        return self.model_copy(update={"architecture": architecture, "name": self.folder_name(architecture)})


class SweepReportSpec(_Section):
    """What a sweep's report draws; unset axes are picked from the sweep's axes."""

    x: str | None = None
    """Axis on the x of the heatmaps and line plots (default: the last numeric axis)."""
    y: str | None = None
    """Axis on the y of the heatmaps; one line per value in the line plots (default: the numeric axis before x)."""
    by: str | None = None
    """Axis or label with one panel per value and one threshold-table column per value (default: the first label)."""
    metric: str = "loss_min"
    """Results column drawn (loss_min: the lowest final loss over a point's repeats)."""
    threshold: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    """Threshold read-out: for each y, the smallest x whose metric is below this (seed 002 uses 1e-5)."""
    log: bool = True
    """Draw the metric on a log10 scale."""


class SweepSpec(_Section):
    """A grid over any fields, shapes included: one point per combination; equal shapes share one model."""

    axes: dict[str, list[Any]] = Field(default_factory=dict)
    """Dotted field name -> list of values (e.g. "model.d_hidden" = [2, 3, 4]); combined as a Cartesian product."""
    zip: list[list[str]] = Field(default_factory=list)
    """Groups of axis (or label) names that advance together instead of multiplying; lists of one length."""
    where: list[str] = Field(default_factory=list)
    """Conditions a point must meet, e.g. "model.d_hidden <= model.n_features"; other points are dropped."""
    repeats: int = Field(1, ge=1, le=100_000)
    """Initialisation seeds per point, packed into the instance dimension as a seed axis."""
    labels: dict[str, list[str]] = Field(default_factory=dict)
    """Name -> list of strings: a results column that is not a field (zip it with the axes it names)."""
    memory_budget_mb: float = Field(2048.0, gt=0.0, allow_inf_nan=False)
    """Largest estimated training memory of one packed model in MiB; bigger groups are split."""
    report: SweepReportSpec = Field(default_factory=SweepReportSpec)
    """The [sweep.report] table."""

    @model_validator(mode="before")
    @classmethod
    def _collect(cls, data: Any) -> Any:
        # Unquoted TOML keys and --set sweep.axes.model.d_hidden=[...] arrive nested: flatten them into dotted axes,
        # keeping the order (it orders the product); a later entry of one name replaces the value, so overrides win.
        if not isinstance(data, dict) or not isinstance(data.get("axes"), dict):
            return data
        flat: dict[str, Any] = {}
        for key, value in data["axes"].items():
            flat.update(_flatten({key: value}) if isinstance(value, dict) else {key: value})
        return {**data, "axes": flat}

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        for key, values in self.axes.items():
            if not _is_field(key):
                raise ValueError(f"sweep.axes.{key}: not a field (use section.field, e.g. model.d_hidden)")
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep.axes.{key}: give a non-empty list of values")
        for name, values in self.labels.items():
            if not name.isidentifier() or name in self.axes or name in Experiment.model_fields:
                raise ValueError(f"sweep.labels.{name}: a label needs a plain name that is not a field")
            if not values:
                raise ValueError(f"sweep.labels.{name}: give a non-empty list of strings")
        seen: set[str] = set()
        for group in self.zip:
            for name in group:
                if name not in self.axes and name not in self.labels:
                    raise ValueError(f"sweep.zip: {name!r} is neither an axis nor a label")
                if name in seen:
                    raise ValueError(f"sweep.zip: {name!r} is in more than one group")
                seen.add(name)
            lengths = {len(self.axes.get(n) or self.labels[n]) for n in group}
            if len(lengths) > 1:
                raise ValueError(f"sweep.zip: the lists of {', '.join(group)} must have one length")
        for name in self.labels:
            if name not in seen and len(self.labels[name]) != 1:
                raise ValueError(f"sweep.labels.{name}: zip a label with the axes it names (sweep.zip)")
        for what in ("x", "y", "by"):
            name = getattr(self.report, what)
            if name is not None and name not in self.axes and name not in self.labels:
                raise ValueError(f"sweep.report.{what}: {name!r} is neither an axis nor a label")
        return self


def _is_field(key: str) -> bool:
    """Whether a dotted name is a settable field of an Experiment (instances and sweep excluded)."""
    parts = key.split(".")
    info = Experiment.model_fields.get(parts[0])
    if info is None or parts[0] in ("instances", "sweep", "sae"):
        return False
    section = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) else None
    if section is None:
        return len(parts) == 1
    return len(parts) == 2 and parts[1] in section.model_fields


class Experiment(_Section):
    """A complete experiment: what to train, on what, how, and over which instance grid."""

    name: str = Field("experiment", min_length=1, max_length=200)
    """Name shown in reports and tables."""
    description: str = Field("", max_length=5000)
    """What the experiment shows and what to look for."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Base seed: data stream and (unless a seed axis is given) per-instance initialisation."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where to train: cpu, cuda, or auto (cuda when available)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the training step; parameters and Adam moments stay float32 (bfloat16: opt-in speed trade)."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """The [model] section."""
    data: DataSpec = Field(default_factory=DataSpec)
    """The [data] section."""
    task: TaskSpec = Field(default_factory=TaskSpec)
    """The [task] section."""
    train: TrainSpec = Field(default_factory=TrainSpec)
    """The [train] section."""
    instances: InstancesSpec = Field(default_factory=InstancesSpec)
    """The [instances] section."""
    sae: SaeSpec | None = None
    """The optional [sae] section: sparse autoencoders trained on the hidden activations after the run."""
    sweep: SweepSpec | None = None
    """The optional [sweep] section: a grid over any fields, shapes included (``superposition sweep``)."""

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        # Hierarchy data fixes the feature count; derive it so sweeps over tree depth need not repeat it.
        if not isinstance(data, dict):
            return data
        d = data.get("data")
        if isinstance(d, dict) and d.get("kind") == "hierarchy":
            depth = d.get("tree_depth", 3)
            if isinstance(depth, int) and not isinstance(depth, bool) and 1 <= depth <= 16:
                model = dict(data.get("model") or {})
                model.setdefault("n_features", 2 ** (depth + 1) - 2)
                data = {**data, "model": model}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        m, d, t = self.model, self.data, self.task
        n = m.n_features
        if d.kind == "hierarchy" and n != 2 ** (d.tree_depth + 1) - 2:
            raise ValueError(
                f"model.n_features: hierarchy data of depth {d.tree_depth} has {2 ** (d.tree_depth + 1) - 2} "
                f"features (got {n})"
            )
        nc, na = self.n_pairs
        if 2 * (nc + na) > n:
            raise ValueError(
                f"data: {nc} correlated + {na} anticorrelated pairs need {2 * (nc + na)} features (have {n})"
            )
        if isinstance(t.importance, list) and len(t.importance) != n:
            raise ValueError(f"task.importance: the list has {len(t.importance)} values for {n} features")
        if m.kind == "linear" and t.target != "identity":
            raise ValueError(f"task.target: the linear model can only learn 'identity' (got {t.target!r})")
        if t.target == "relu-plus-x" and m.kind != "residual-mlp":
            pass  # allowed, if unusual: a ReLU output cannot produce the negative part of k x
        if self.n_instances > MAX_INSTANCES:
            raise ValueError(f"instances: the grid has {self.n_instances:,} instances (at most {MAX_INSTANCES:,})")
        # Validate every instance's settings with the same rules as the scalar fields. Each rule involves one axis,
        # so checking each axis value once is equivalent to checking every grid point, and linear in the axes.
        singles = [{key: v} for key, values in self.instances.axes.items() for v in values]
        for point in singles or [{}]:
            if point:
                self._with_point(point)
            if na and point.get("data.feature_probability", d.feature_probability) > 0.5:
                raise ValueError(
                    "data.feature_probability: anticorrelated pairs need p <= 0.5 "
                    f"(got {point.get('data.feature_probability', d.feature_probability)})"
                )
            kind = point.get("model.kind", m.kind)
            if "model.kind" in point and kind not in ("linear", "relu-output"):
                raise ValueError(f"instances.model.kind: only 'linear' and 'relu-output' may vary (got {kind!r})")
            if "model.kind" in point and m.kind not in ("linear", "relu-output"):
                raise ValueError("instances.model.kind: model.kind must be linear or relu-output to vary it")
            imp = point.get("task.importance")
            if isinstance(imp, list) and len(imp) != n:
                raise ValueError(f"instances.task.importance: a list has {len(imp)} values for {n} features")
        if self.train.warmup_steps >= self.train.steps and self.train.schedule == "warmup-cosine":
            raise ValueError("train.warmup_steps: must be smaller than train.steps")
        return self

    @property
    def n_pairs(self) -> tuple[int, int]:
        """(correlated pairs, anticorrelated pairs), resolving kind=correlated/anticorrelated defaults."""
        d, n = self.data, self.model.n_features
        nc = d.n_correlated_pairs or (n // 2 if d.kind == "correlated" else 0)
        na = d.n_anticorrelated_pairs or (n // 2 if d.kind == "anticorrelated" else 0)
        return nc, na

    def grid(self) -> list[dict[str, Any]]:
        """Each instance's axis values, in instance order (product: last axis fastest)."""
        axes = self.instances.axes
        if not axes:
            return [{}]
        keys = list(axes)
        if self.instances.combine == "zip":
            combos = zip(*(axes[k] for k in keys), strict=True)
        else:
            combos = itertools.product(*(axes[k] for k in keys))
        return [dict(zip(keys, c, strict=True)) for c in combos]

    @property
    def n_instances(self) -> int:
        """Number of model instances trained side by side (counted without building the grid)."""
        lengths = [len(v) for v in self.instances.axes.values()]
        if not lengths:
            return 1
        return min(lengths) if self.instances.combine == "zip" else math.prod(lengths)

    def _with_point(self, point: dict[str, Any]) -> Experiment:
        """This experiment with one instance's axis values filled in (and no instance axes)."""
        raw = self.model_dump(mode="python")
        raw["instances"] = {}
        for key, value in point.items():
            _set_dotted(raw, key, value)
        try:
            return Experiment.model_validate(raw)
        except ValidationError as exc:
            raise ValueError("instances." + format_validation_error(exc)) from None

    def instance_values(self, key: str) -> list[Any]:
        """The value of a dotted field for every instance (axis value or the scalar setting)."""
        points = self.grid()
        default = _get_dotted(self.model_dump(mode="python"), key)
        return [p.get(key, default) for p in points]

    def to_json(self) -> str:
        """The resolved spec as JSON text."""
        return json.dumps(self.model_dump(mode="json"), indent=2)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = {}
            node[p] = nxt
        if not isinstance(nxt, dict):
            raise SpecError(f"{key}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for p in key.split("."):
        node = node[p]
    return node


def _is_union_tag(part: Any) -> bool:
    # pydantic names the branch of a union (or a validator) in the error location; users know only field names.
    if not isinstance(part, str):
        return False
    return part in ("float", "int", "str", "bool", "none") or part.startswith(
        ("function-", "list[", "literal[", "dict[", "tagged-union[", "is-instance[", "union[")
    )


def format_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad field, what is wrong, and what was given."""
    err = exc.errors()[0]
    parts = list(err["loc"])
    # An unknown key is the user's own text, never a union tag, however it is spelled.
    last = [str(parts.pop())] if err["type"] == "extra_forbidden" and parts else []
    loc = ".".join([str(x) for x in parts if not _is_union_tag(x)] + last)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        named = msg.split(":")[0]
        if loc == "" or named.endswith(loc.split(".")[-1] if loc else "\0") or named.startswith(loc + "."):
            return msg
    given = err.get("input")
    shown = repr(given) if not isinstance(given, dict) else "a table"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    extra = "" if err["type"] == "missing" else f" (got {shown})"
    line = f"{loc}: {msg}{extra}" if loc else f"{msg}{extra}"
    if len(exc.errors()) > 1:
        line += f" [and {len(exc.errors()) - 1} more problem(s)]"
    return line.replace("\n", " ")


def parse_spec(raw: dict[str, Any]) -> Experiment:
    """Validate a plain dict into an Experiment, raising SpecError with one line."""
    try:
        return Experiment.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None
    except ValueError as exc:
        raise SpecError(str(exc).splitlines()[0]) from None


def preset_names() -> list[str]:
    """Names of the presets shipped inside the package."""
    files = resources.files("superposition") / "presets"
    return sorted(p.name[: -len(".toml")] for p in files.iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    """The TOML text of a preset."""
    if name not in preset_names():
        raise SpecError(f"unknown preset {name!r} (available: {', '.join(preset_names())})")
    return (resources.files("superposition") / "presets" / f"{name}.toml").read_text(encoding="utf-8")


def preset_description(name: str) -> str:
    """The first line of a preset's description."""
    raw = tomllib.loads(preset_text(name))
    return str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""


def _parse_value(text: str) -> Any:
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
            axes = dict(inst.get("axes") or {})
            axes.update(_flatten({k: v for k, v in inst.items() if k not in ("axes", "combine")}))
            axes[axis] = _parse_value(value)
            raw["instances"] = {**({"combine": inst["combine"]} if "combine" in inst else {}), "axes": axes}
            continue
        _set_dotted(raw, key, _parse_value(value))
    return raw


def read_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text, turning syntax errors into one-line SpecErrors."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise SpecError(f"{source}: not valid TOML (nested too deeply)") from None


def load_raw(source: str | Path) -> dict[str, Any]:
    """The raw dict of a TOML/JSON spec file or a preset name."""
    path = Path(source)
    if path.suffix in (".toml", ".json") or path.exists():
        if not path.is_file():
            what = "is a folder, not a spec file" if path.is_dir() else "not a regular file"
            raise SpecError(f"{source}: {what if path.exists() else 'no such spec file'}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"{source}: cannot read ({exc.__class__.__name__})") from None
        if path.suffix == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SpecError(f"{source}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise SpecError(f"{source}: not valid JSON (nested too deeply)") from None
        else:
            raw = read_toml(text, str(source))
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: the spec must be a table")
        return raw
    name = str(source)
    if name in preset_names():
        return read_toml(preset_text(name), f"preset {name}")
    raise SpecError(f"{name!r} is neither a spec file nor a preset (presets: {', '.join(preset_names())})")


def load_spec(source: str | Path | dict[str, Any], overrides: list[str] = (), quick: bool = False) -> Experiment:  # type: ignore[assignment]
    """Load a spec from a TOML/JSON file, a preset name or a dict; apply `--quick` and `--set` overrides.

    A spec may carry a ``[quick]`` table of dotted overrides that shrink it for CI (steps, grid), never shapes.
    """
    raw = dict(source) if isinstance(source, dict) else load_raw(source)
    quick_table = raw.pop("quick", None)
    if quick_table is not None and not isinstance(quick_table, dict):
        raise SpecError("quick: must be a table of dotted overrides")
    if quick:
        q = _flatten(quick_table or {})
        q.setdefault("train.steps", min(int(_get_or(raw, "train.steps", 5000)), 300))
        raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in q.items()])
    raw = apply_overrides(raw, list(overrides))
    spec = parse_spec(raw)
    check_memory(spec)
    return spec


# -- memory estimate -----------------------------------------------------------------------------------------------
class MemoryEstimate(NamedTuple):
    """Estimated peak bytes of training an experiment, by part (every part scales with the instances)."""

    parameters: int
    """Parameters and their gradients (and fixed buffers such as W_E)."""
    optimizer: int
    """The two Adam moments."""
    activations: int
    """One step's batch, targets and activations kept for the backward pass, or the transient of drawing a fixed
    training set if that is larger."""
    dataset: int
    """A fixed training set (data.dataset_size)."""

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.activations + self.dataset

    n_instances: int = 1
    """How many instances the parts count."""

    @property
    def per_instance(self) -> int:
        """Bytes of one instance (what the sweep packs by)."""
        return self.total // max(1, self.n_instances)


DATASET_DRAW_FACTOR = 3.25
"""Peak bytes of drawing a fixed training set, in units of the set (uniforms, mask, magnitudes, product; measured)."""


def memory_estimate(spec: Experiment) -> MemoryEstimate:
    """Peak training memory of an experiment from its shapes alone (counted, not allocated): the one estimate that
    ``run`` refuses by and the sweep packs groups by. ``benchmarks/memory.py`` compares it with the peak of live
    tensors measured by torch's profiler (within a factor of 1.5 for every preset it checks).

    The batch is the whole fixed training set when that is smaller than a batch. The embedded residual MLP never
    materialises its d_embed-wide stream (it computes in feature and neuron space), so only its weights and W_E
    count d_embed.
    """
    m, inst = spec.model, spec.n_instances
    n, h = m.n_features, m.d_hidden
    b = min(spec.train.batch_size, spec.data.dataset_size or spec.train.batch_size)
    if m.kind == "residual-mlp":
        e, layers = int(m.d_embed or n), m.n_layers
        params = layers * (2 * h * e + (h if m.bias_hidden else 0) + (e if m.bias_out else 0))
        buffers = n * e
        act = b * (5 * n + 5 * layers * h)
    else:
        params = h * n * (1 if m.tied else 2) + (n if m.bias_out else 0) + (h if m.bias_hidden else 0)
        buffers = 0
        act = b * (6 * n + 3 * h)
    data = n * (spec.data.dataset_size or 0)
    act = max(act, int((DATASET_DRAW_FACTOR - 1) * data))
    size = 2 if spec.dtype == "bfloat16" else 4
    return MemoryEstimate(
        parameters=size * inst * (2 * params + buffers),
        optimizer=size * inst * 2 * params,
        activations=size * inst * act,
        dataset=size * inst * data,
        n_instances=inst,
    )


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


MEMORY_FRACTION = 0.8


def check_memory(spec: Experiment, limit: int | None = None) -> MemoryEstimate:
    """Refuse (SpecError) an experiment whose estimated training memory exceeds ``limit`` bytes.

    The default limit is MEMORY_FRACTION of this machine's physical memory, so a size that cannot fit is caught
    before anything is allocated or written.
    """
    est = memory_estimate(spec)
    if limit is None:
        ram = physical_memory()
        if ram is None:
            return est
        limit = int(ram * MEMORY_FRACTION)
    if est.total > limit:
        raise SpecError(
            f"too large: training needs about {format_bytes(est.total)} of memory (parameters and gradients "
            f"{format_bytes(est.parameters)}, Adam {format_bytes(est.optimizer)}, activations "
            f"{format_bytes(est.activations)}, dataset {format_bytes(est.dataset)}) but the limit here is "
            f"{format_bytes(limit)}; reduce model sizes, train.batch_size or the number of instances"
        )
    return est


def _get_or(raw: dict[str, Any], key: str, default: Any) -> Any:
    try:
        return _get_dotted(raw, key)
    except (KeyError, TypeError):
        return default
