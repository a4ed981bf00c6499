"""Feature samplers: instance-batched, on the device, seeded.

Every batch has shape (batch, inst, feats). Each instance has its own feature probability; all instances draw
from one seeded generator, so the same seed gives the same data bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from superposition.spec import Experiment

__all__ = ["Sampler", "make_sampler", "importance_tensor", "target_fn", "hierarchy_n_features"]


def hierarchy_n_features(depth: int) -> int:
    """Features of a binary tree of this depth with the root dropped: 2^(depth+1) - 2."""
    return 2 ** (depth + 1) - 2


@dataclass(frozen=True)
class Sampler:
    """Draws batches of the feature distribution for every instance at once."""

    kind: str
    magnitude: str
    probability: Float[Tensor, " inst"]
    n_features: int
    n_correlated_pairs: int = 0
    n_anticorrelated_pairs: int = 0
    tree_depth: int = 0
    early_stopping: bool = False
    normalize: bool = False

    @property
    def n_instances(self) -> int:
        return int(self.probability.shape[0])

    def _magnitudes(self, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
        dev, dt = self.probability.device, self.probability.dtype
        if self.magnitude == "uniform":
            return torch.rand(shape, generator=gen, device=dev, dtype=dt)
        if self.magnitude == "signed":
            return torch.rand(shape, generator=gen, device=dev, dtype=dt) * 2 - 1
        return (0.5 + 0.2 * torch.randn(shape, generator=gen, device=dev, dtype=dt)).clamp(0, 1)

    def sample(self, batch: int, gen: torch.Generator) -> Float[Tensor, "batch inst feats"]:
        """One batch for every instance."""
        x = self._tree(batch, gen) if self.kind == "hierarchy" else self._sparse(batch, gen)
        if self.normalize:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x

    def _sparse(self, batch: int, gen: torch.Generator) -> Tensor:
        inst, n = self.n_instances, self.n_features
        nc, na = self.n_correlated_pairs, self.n_anticorrelated_pairs
        n_ind = n - 2 * (nc + na)
        dev, dt = self.probability.device, self.probability.dtype
        p = self.probability[None, :, None]
        parts = []
        if nc:
            on = torch.rand((batch, inst, nc), generator=gen, device=dev, dtype=dt) < p
            parts.append(on.repeat_interleave(2, dim=-1))  # both features of a pair share the draw
        if na:
            # One uniform per pair: feature A if u < p, feature B if p <= u < 2p, never both (needs p <= 0.5).
            u = torch.rand((batch, inst, na), generator=gen, device=dev, dtype=dt)
            a, b = u < p, (u >= p) & (u < 2 * p)
            parts.append(torch.stack([a, b], dim=-1).flatten(-2))
        if n_ind:
            parts.append(torch.rand((batch, inst, n_ind), generator=gen, device=dev, dtype=dt) < p)
        mask = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return mask.to(dt) * self._magnitudes((batch, inst, n), gen)

    def _tree(self, batch: int, gen: torch.Generator) -> Tensor:
        # Level by level: a parent that is on turns on exactly one child (50/50), or with early stopping
        # child A w.p. 1/4, child B w.p. 1/4, neither w.p. 1/2. Off parents have off children. Values are 0/1.
        inst = self.n_instances
        dev, dt = self.probability.device, self.probability.dtype
        parent = torch.ones((batch, inst, 1), dtype=torch.bool, device=dev)
        levels = []
        for _ in range(self.tree_depth):
            u = torch.rand(parent.shape, generator=gen, device=dev, dtype=dt)
            half = 0.25 if self.early_stopping else 0.5
            a = parent & (u < half)
            b = parent & (u >= half) & (u < 2 * half)
            parent = torch.stack([a, b], dim=-1).flatten(-2)
            levels.append(parent)
        return torch.cat(levels, dim=-1).to(dt)


def make_sampler(spec: Experiment, device: torch.device | str = "cpu", dtype=torch.float32) -> Sampler:
    """The sampler of an experiment, with one probability per instance."""
    p = torch.tensor(spec.instance_values("data.feature_probability"), dtype=dtype, device=device)
    nc, na = spec.n_pairs
    return Sampler(
        kind=spec.data.kind,
        magnitude=spec.data.magnitude,
        probability=p,
        n_features=spec.model.n_features,
        n_correlated_pairs=nc,
        n_anticorrelated_pairs=na,
        tree_depth=spec.data.tree_depth if spec.data.kind == "hierarchy" else 0,
        early_stopping=spec.data.early_stopping,
        normalize=spec.data.normalize,
    )


def importance_tensor(
    spec: Experiment, device: torch.device | str = "cpu", dtype=torch.float32
) -> Float[Tensor, "inst feats"]:
    """Per-instance feature importance: r^(i + task.importance_start) for a ratio r, or the explicit list."""
    n, start = spec.model.n_features, spec.task.importance_start
    rows = []
    for imp in spec.instance_values("task.importance"):
        if isinstance(imp, list):
            rows.append([float(v) for v in imp])
        else:
            rows.append([float(imp) ** (i + start) for i in range(n)])
    return torch.tensor(rows, dtype=dtype, device=device)


def target_fn(
    target: str, x: Float[Tensor, "batch inst feats"], residual_factor: Float[Tensor, " inst"] | None = None
) -> Float[Tensor, "batch inst feats"]:
    """The label for inputs x: identity, |x|, or ReLU(x) + k x (k per instance)."""
    if target == "identity":
        return x
    if target == "abs":
        return x.abs()
    assert residual_factor is not None
    return torch.relu(x) + residual_factor[None, :, None] * x
