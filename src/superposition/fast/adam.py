"""The fused optimiser: the learning-rate schedule on the device and Adam/AdamW with per-instance learning rate and
weight decay (torch.optim.Adam's formula)."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


# -- optimiser ----------------------------------------------------------------------------------------------------
def schedule_multiplier(schedule: str, steps: int, warmup_steps: int, step: Tensor) -> Tensor:
    """The learning-rate factor of a 0-based step, on the device (same values as train.lr_multiplier)."""
    t = step.to(torch.float64)
    if schedule == "constant":
        return torch.ones_like(t)
    if schedule == "linear":
        return 1.0 - t / steps
    if schedule == "cosine":
        return torch.cos(t * (math.pi / (2 * max(steps - 1, 1))))
    warm = max(warmup_steps, 1)
    span = max(steps - warmup_steps - 1, 1)
    cos = 0.5 * (1 + torch.cos((t - warmup_steps) * (math.pi / span)))
    return torch.where(t < warmup_steps, (t + 1) / warm, cos)


def adam_update_(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: Tensor,
    lr: Float[Tensor, " inst"],
    weight_decay: Float[Tensor, " inst"],
    decoupled: bool,
) -> None:
    """One Adam/AdamW update in place (torch.optim.Adam's formula); ``step`` is the 0-based step being taken.

    ``lr`` already carries the schedule. Bias corrections are computed in float64 from the step counter.
    The update math runs in float32 for every parameter dtype and is rounded once on store.
    """
    b1, b2 = ADAM_BETAS
    n = step.to(torch.float64) + 1
    bc1 = 1 - torch.pow(b1, n)
    bc2_sqrt = torch.sqrt(1 - torch.pow(b2, n))
    step_size = (lr.to(torch.float64) / bc1).to(torch.float32)
    inv_bc2 = (1 / bc2_sqrt).to(torch.float32)
    lr32 = lr.to(torch.float32)
    for name, p in params.items():
        shape = (-1,) + (1,) * (p.dim() - 1)
        g = grads[name].to(torch.float32)
        p32 = p.to(torch.float32)
        wd = weight_decay.view(shape).to(torch.float32)
        if decoupled:
            p32 = p32 * (1 - lr32.view(shape) * wd)
        else:
            g = g + wd * p32
        m = exp_avg[name].to(torch.float32)
        v = exp_avg_sq[name].to(torch.float32)
        m = torch.lerp(m, g, 1 - b1)
        v = v * b2 + (1 - b2) * g * g
        denom = torch.sqrt(v) * inv_bc2 + ADAM_EPS
        p32 = p32 - step_size.view(shape) * m / denom
        exp_avg[name].copy_(m)
        exp_avg_sq[name].copy_(v)
        p.copy_(p32)
