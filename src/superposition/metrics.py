"""Analysis of trained weights, per instance: pure functions of the weights (no training, no I/O)."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from superposition.models import ToyModel
from superposition.spec import Experiment

__all__ = ["feature_norms", "n_represented", "instance_metrics"]


def feature_norms(W: Float[Tensor, "inst hidden feats"]) -> Float[Tensor, "inst feats"]:
    """‖W_i‖: the length of each feature's embedding direction (1 = represented, 0 = not)."""
    return W.norm(dim=-2)


def n_represented(W: Float[Tensor, "inst hidden feats"], threshold: float = 0.5) -> Float[Tensor, " inst"]:
    """Number of features with ‖W_i‖ > threshold, per instance."""
    return (feature_norms(W) > threshold).sum(dim=-1)


@torch.no_grad()
def instance_metrics(model: ToyModel, spec: Experiment) -> dict[str, np.ndarray]:
    """Per-instance scalar metrics for the run's instances table (one array of length n_instances each)."""
    W = model.encoder.float()
    return {"n_represented": n_represented(W).cpu().numpy().astype(np.int64)}
