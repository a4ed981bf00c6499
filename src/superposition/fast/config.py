"""The static settings of the fused step (:class:`FastConfig`, read from a spec) and the size below which a
product is written as a fused multiply-sum."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from superposition.spec import Experiment

# Products whose small factor (or output) has at most this many elements per instance are written as fused
# multiply-sums; larger ones go to the batched matmul kernels.
SMALL_PRODUCT = 128


# -- configuration ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FastConfig:
    """Static settings of the fused step (everything that changes the traced program, nothing that varies)."""

    kind: str
    tied: bool
    activations: tuple[str, ...]
    skip: bool
    bias_hidden: bool
    bias_out: bool
    target: str
    loss: str
    data_kind: str
    magnitude: str
    n_features: int
    n_correlated_pairs: int
    n_anticorrelated_pairs: int
    tree_depth: int
    early_stopping: bool
    normalize: bool
    batch_size: int
    decoupled: bool
    schedule: str
    steps: int
    warmup_steps: int
    any_linear: bool
    all_relu_out: bool
    compute_dtype: torch.dtype = torch.float32
    """Dtype of the batch, products and activations; parameters and Adam moments stay float32 (master weights)."""
    dataset_size: int = 0
    """Points of a fixed training set (``tensors["dataset"]``, feature-major); 0: fresh samples every step."""


def fast_config(spec: Experiment) -> FastConfig:
    """The static settings of an experiment's fused step."""
    m, d, t, tr = spec.model, spec.data, spec.task, spec.train
    nc, na = spec.n_pairs
    kinds = spec.instance_values("model.kind")
    return FastConfig(
        kind=m.kind,
        tied=bool(m.tied),
        activations=tuple(m.activations),
        skip=m.skip,
        bias_hidden=m.bias_hidden,
        bias_out=bool(m.bias_out),
        target=t.target,
        loss=t.loss,
        data_kind=d.kind,
        magnitude=d.magnitude,
        n_features=m.n_features,
        n_correlated_pairs=nc,
        n_anticorrelated_pairs=na,
        tree_depth=d.tree_depth if d.kind == "hierarchy" else 0,
        early_stopping=d.early_stopping,
        normalize=d.normalize,
        batch_size=tr.batch_size,
        decoupled=tr.optimizer == "adamw",
        schedule=tr.schedule,
        steps=tr.steps,
        warmup_steps=tr.warmup_steps,
        any_linear=m.kind == "linear" or "linear" in kinds,
        all_relu_out=all(k in ("relu-output", "neuron", "mlp") for k in kinds),
        compute_dtype=torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32,
        dataset_size=d.dataset_size or 0,
    )
