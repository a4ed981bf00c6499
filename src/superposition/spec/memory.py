"""The one training-memory estimate of an experiment and the check that refuses what cannot fit."""

from __future__ import annotations

import os
from typing import NamedTuple

from superposition.errors import SpecError
from superposition.folder import format_bytes
from superposition.spec.experiment import Experiment


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
    size = 2 if spec.dtype == "bfloat16" else 4  # bf16 computes in bf16; weights, Adam and datasets stay float32
    return MemoryEstimate(
        parameters=4 * inst * (2 * params + buffers),
        optimizer=4 * inst * 2 * params,
        activations=size * inst * act,
        dataset=4 * inst * data,
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
