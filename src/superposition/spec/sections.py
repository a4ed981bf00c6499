"""The [model], [data], [task], [train] and [instances] tables of a spec, one line of doc per field."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from superposition.spec.base import MAX_DIM, MAX_STEPS, StrictSection, flatten

Activation = Literal["relu", "gelu", "none"]
ModelKind = Literal["linear", "relu-output", "neuron", "mlp", "residual-mlp"]


class ModelSpec(StrictSection):
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


class DataSpec(StrictSection):
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


class TaskSpec(StrictSection):
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


class PhaseSpec(StrictSection):
    """One phase of a run trained in phases: its own steps, loss and optimiser settings on the weights so far."""

    name: str = Field("", max_length=100)
    """Label in the history table and figures (default: phase1, phase2, ...)."""
    steps: int = Field(..., ge=1, le=MAX_STEPS)
    """Optimiser steps of this phase."""
    loss: Literal["l2", "l1"] | None = None
    """The phase's loss (default: task.loss)."""
    lr: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    """The phase's peak learning rate (default: train.lr)."""
    schedule: Literal["constant", "linear", "cosine", "warmup-cosine"] | None = None
    """The phase's learning-rate schedule, over its own steps (default: train.schedule)."""
    warmup_steps: int | None = Field(None, ge=0, le=MAX_STEPS)
    """Warm-up steps for a warmup-cosine phase (default: train.warmup_steps)."""
    optimizer: Literal["adam", "adamw"] | None = None
    """The phase's optimiser (default: train.optimizer); every phase starts with fresh moments."""
    weight_decay: float | None = Field(None, ge=0.0, le=10.0, allow_inf_nan=False)
    """The phase's weight decay (default: train.weight_decay)."""


class TrainSpec(StrictSection):
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
    phases: list[PhaseSpec] = Field(default_factory=list, max_length=100)
    """Train in phases, in order, on the same weights (steps = their sum; each phase starts a fresh optimiser)."""
    init_from: str | None = Field(None, min_length=1, max_length=4096)
    """A run folder whose trained weights this run starts from (same model shapes; relative to the working dir)."""

    @model_validator(mode="before")
    @classmethod
    def _phase_steps(cls, data: Any) -> Any:
        # With phases, train.steps is their sum: derive it so the spec need not repeat it.
        if isinstance(data, dict) and isinstance(data.get("phases"), list) and "steps" not in data:
            steps = [ph.get("steps") for ph in data["phases"] if isinstance(ph, dict)]
            if steps and all(isinstance(v, int) and not isinstance(v, bool) for v in steps):
                data = {**data, "steps": sum(steps)}
        return data

    @model_validator(mode="after")
    def _check_phases(self) -> TrainSpec:
        if self.phases and self.steps != sum(ph.steps for ph in self.phases):
            total = sum(ph.steps for ph in self.phases)
            raise ValueError(f"train.steps: {self.steps} is not the sum of the phases' steps ({total}); leave it out")
        return self

    @property
    def phase_starts(self) -> list[int]:
        """The global step at which each phase starts ([0] without phases)."""
        starts, at = [], 0
        for ph in self.phases or [PhaseSpec(steps=self.steps)]:
            starts.append(at)
            at += ph.steps
        return starts

    def phase_at(self, step: int) -> int:
        """The index of the phase that takes global step ``step`` (the last one past the end)."""
        starts = self.phase_starts
        return max(i for i, s in enumerate(starts) if s <= step) if step >= 0 else 0

    def phase_name(self, i: int) -> str:
        """Phase i's label: its name, or phase{i+1}."""
        return (self.phases[i].name if self.phases and self.phases[i].name else "") or f"phase{i + 1}"


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


class InstancesSpec(StrictSection):
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
        for key, value in flatten(data).items():
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
