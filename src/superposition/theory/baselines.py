"""Naive baselines: the cost of a feature the model does not represent, and the loss of keeping the most valuable
features exactly and dropping the rest (per spec, and TMCC's)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from superposition.spec import Experiment
from superposition.theory.exact import DTYPE, magnitude_expectation

# -- naive baselines ---------------------------------------------------------------------------------------------------


def dropped_feature_cost(
    magnitude: str,
    p: float,
    label: Callable[[np.ndarray], np.ndarray] = lambda v: v,
    bias: bool = True,
    relu_out: bool = True,
) -> float:
    """min_c E[(y − c)²] for a feature the model does not represent: y = label(x), x = 0 w.p. 1 − p.

    The best constant is c = E[y] (clipped at 0 behind an output ReLU) when the output has a bias, else c = 0.
    Requires label(0) = 0. For U[0,1] and the identity: p/3 − p²/4 with a bias, p/3 without.
    """
    m1 = p * magnitude_expectation(label, magnitude)
    m2 = p * magnitude_expectation(lambda v: label(v) ** 2, magnitude)
    c = (max(m1, 0.0) if relu_out else m1) if bias else 0.0
    return m2 - 2 * c * m1 + c * c


def naive_loss_from_costs(
    importance: Float[Tensor, "*batch feats"], cost: Float[Tensor, "*batch feats"], d: int
) -> Float[Tensor, " *batch"]:
    """Σ over dropped features of I_i·cost_i, keeping (at zero loss) the d features with the largest I_i·cost_i."""
    value = importance * cost
    n = value.shape[-1]
    if d >= n:
        return torch.zeros(value.shape[:-1], dtype=value.dtype)
    return value.sort(dim=-1).values[..., : n - d].sum(dim=-1)


def _capacity(spec: Experiment) -> int:
    """How many features the model can represent exactly: one per hidden dimension / neuron, or one per two
    neurons when a ReLU hidden layer must pass both signs of a signed feature."""
    m, t = spec.model, spec.task
    width = m.d_hidden * (m.n_layers if m.kind == "residual-mlp" else 1)
    if m.kind in ("neuron", "mlp", "residual-mlp") and spec.data.magnitude == "signed":
        residual = 1.0 if (m.kind == "residual-mlp" and m.skip) else 0.0
        linear_part = {"identity": 1.0, "abs": 1.0, "relu-plus-x": t.residual_factor - residual}[t.target]
        both_signs = t.target == "abs" or abs(linear_part) > 0
        if both_signs:
            return width // 2
    return width


def naive_loss(spec: Experiment) -> np.ndarray:
    """Per-instance naive loss (sum over features): keep the d most valuable features exactly, drop the rest.

    d is the capacity (hidden width; halved where a ReLU layer must pass both signs), a dropped feature costs
    I_i · min_c E[(y_i − c)²] (see :func:`dropped_feature_cost`; for the residual MLP with skip connection the residual
    stream already carries x, so the label left to the MLP is ReLU(x) + (k − 1)x). NaN where the data law has no such
    baseline (hierarchy data, unit-normalised points).
    """
    from superposition.data import importance_tensor

    n = spec.model.n_features
    if spec.data.kind == "hierarchy" or spec.data.normalize:
        return np.full(spec.n_instances, np.nan)
    m, t = spec.model, spec.task
    relu_out = m.kind != "linear" and m.kind != "residual-mlp"
    bias = bool(m.bias_out)
    residual = m.kind == "residual-mlp" and m.skip
    probs = spec.instance_values("data.feature_probability")
    factors = spec.instance_values("task.residual_factor")
    imp = importance_tensor(spec, dtype=DTYPE)
    costs = []
    cache: dict[tuple[float, float], float] = {}
    for p, k in zip(probs, factors, strict=True):
        key = (float(p), float(k))
        if key not in cache:
            label = _label(t.target, float(k) - (1.0 if residual else 0.0))
            cache[key] = dropped_feature_cost(spec.data.magnitude, float(p), label, bias=bias, relu_out=relu_out)
        costs.append(cache[key])
    cost = torch.tensor(costs, dtype=DTYPE)[:, None].expand(-1, n)
    return naive_loss_from_costs(imp, cost, _capacity(spec)).numpy()


def _label(target: str, k: float) -> Callable[[np.ndarray], np.ndarray]:
    if target == "identity":
        return lambda v: v
    if target == "abs":
        return np.abs
    return lambda v: np.maximum(v, 0.0) + k * v


def tmcc_naive_loss(n: int, d: int, p: float) -> float:
    """TMCC's naive loss per feature: d of n features computed exactly, the rest cost E[ReLU(x)²] = p/6 each
    (x ~ U[−1, 1] w.p. p, no biases): (n − d)/n · p/6, i.e. L/p = 0.0833 at n = 100, d = 50."""
    return max(n - d, 0) / n * p / 6
