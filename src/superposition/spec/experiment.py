"""The whole experiment: its sections, the [sweep] table, cross-field checks; parse_spec validates a raw table."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from superposition.errors import SpecError
from superposition.spec.base import (
    MAX_INSTANCES,
    StrictSection,
    flatten,
    format_validation_error,
    get_dotted,
    set_dotted,
)
from superposition.spec.sae import SaeSpec
from superposition.spec.sections import DataSpec, InstancesSpec, ModelSpec, TaskSpec, TrainSpec


class SweepReportSpec(StrictSection):
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


class SweepSpec(StrictSection):
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
            flat.update(flatten({key: value}) if isinstance(value, dict) else {key: value})
        return {**data, "axes": flat}

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        for key, values in self.axes.items():
            if not is_field(key):
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


def is_field(key: str) -> bool:
    """Whether a dotted name is a settable field of an Experiment (instances and sweep excluded)."""
    parts = key.split(".")
    info = Experiment.model_fields.get(parts[0])
    if info is None or parts[0] in ("instances", "sweep", "sae"):
        return False
    section = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) else None
    if section is None:
        return len(parts) == 1
    return len(parts) == 2 and parts[1] in section.model_fields


class Experiment(StrictSection):
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
        for i, ph in enumerate(self.train.phases):
            for key in ("lr", "weight_decay"):
                if getattr(ph, key) is not None and f"train.{key}" in self.instances.axes:
                    raise ValueError(f"train.phases[{i}].{key}: train.{key} varies across instances; set it there")
            one = self.phase_spec(i).train
            if one.schedule == "warmup-cosine" and one.warmup_steps >= one.steps:
                raise ValueError(f"train.phases[{i}].warmup_steps: must be smaller than the phase's steps")
        return self

    def phase_spec(self, i: int) -> Experiment:
        """The experiment that phase i trains: its steps, loss and optimiser settings (this spec without phases)."""
        t = self.train
        if not t.phases:
            return self
        ph = t.phases[i]
        keys = ("lr", "schedule", "warmup_steps", "optimizer", "weight_decay")
        train = t.model_copy(
            update={"steps": ph.steps, "phases": [], "init_from": None}
            | {k: getattr(ph, k) for k in keys if getattr(ph, k) is not None}
        )
        task = self.task.model_copy(update={"loss": ph.loss or self.task.loss})
        return self.model_copy(update={"train": train, "task": task})

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
            set_dotted(raw, key, value)
        try:
            return Experiment.model_validate(raw)
        except ValidationError as exc:
            raise ValueError("instances." + format_validation_error(exc)) from None

    def instance_values(self, key: str) -> list[Any]:
        """The value of a dotted field for every instance (axis value or the scalar setting)."""
        points = self.grid()
        default = get_dotted(self.model_dump(mode="python"), key)
        return [p.get(key, default) for p in points]

    def to_json(self) -> str:
        """The resolved spec as JSON text."""
        return json.dumps(self.model_dump(mode="json"), indent=2)


def parse_spec(raw: dict[str, Any]) -> Experiment:
    """Validate a plain dict into an Experiment, raising SpecError with one line."""
    try:
        return Experiment.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None
    except ValueError as exc:
        raise SpecError(str(exc).splitlines()[0]) from None
