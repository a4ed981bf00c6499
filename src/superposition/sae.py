"""Sparse autoencoders on toy-model activations, graded against the features the toy model was built from.

One :class:`SparseAutoencoder` holds ``n_instances x n_sae`` SAEs: one group per toy-model instance (each trained on
that instance's activations) and, inside a group, one SAE per sparsity setting and resampling method. Every parameter
is shaped ``(inst, sae, ...)`` so all of them train as one tensor program and never interact.

With ``x = h - b_dec`` and ``pre = x W_enc + b_enc`` (per instance and SAE), the latents ``z`` and the per-sample loss
(``mse = mean_d (h' - h)^2``, ``h' = z W_dec + b_dec``) are:

| architecture | latents z                                              | loss                                   |
| ------------ | ------------------------------------------------------ | -------------------------------------- |
| relu         | ReLU(pre)                                              | mse + lambda sum z                     |
| topk         | ReLU(pre) on the k largest entries of pre, else 0      | mse                                    |
| batchtopk    | ReLU(pre) on the k*batch largest entries of the batch; | mse                                    |
|              | at inference pre * 1[pre > theta] (running estimate)   |                                        |
| jumprelu     | pre * H(pre - theta), theta = exp(log_threshold)       | mse + lambda sum H(pre - theta)        |
| gated        | H(pre) * ReLU(exp(r_mag) x W_enc + b_mag)              | mse + lambda sum ReLU(pre) + aux       |

``aux`` (gated) is the mse of ReLU(pre) decoded by a frozen copy of the decoder. JumpReLU's threshold learns through
straight-through pseudo-gradients with a rectangle kernel of width epsilon (Rajamanoharan et al. 2024):
d/dtheta [pre H(pre - theta)] := -(theta / eps) K((pre - theta) / eps) and d/dtheta H(pre - theta) := -(1/eps) K(..).
The second one is exactly the derivative of the L0 penalty smoothed by the kernel (a convolution in theta).

The true features of a toy model are the hidden-layer responses to each feature alone (:func:`true_directions`):
for the bottleneck models the columns W_i of the encoder, for neuron models ReLU(W_i x_i + b) - ReLU(b) averaged
over the feature's magnitudes (with zero bias the positive part ReLU(W_i)); signed inputs give one direction for
each sign, because a ReLU layer maps +x_i and -x_i to different directions.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from superposition.data import make_sampler
from superposition.folder import (
    MAX_CONFIG_BYTES,
    MAX_TABLE_BYTES,
    SAE_FORMAT,
    SAE_WORK,
    RunFormatError,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_table,
    check_target,
    check_tensors,
    checked_file,
    fresh_workdir,
    load_tensors,
    publish,
    read_json,
    read_safetensors_header,
    work_dir,
)
from superposition.folder import SAE as SAE_KIND
from superposition.models import ToyModel
from superposition.spec import (
    SAE_SPARSITY_FIELD,
    Experiment,
    SaeSpec,
    SpecError,
    apply_overrides,
    format_validation_error,
    load_raw,
    quick_sae_schedule,
)
from superposition.train import AdamState, TrainingDiverged, adam_step_, lr_multiplier, resolve_device

if TYPE_CHECKING:
    from superposition.report import Section
    from superposition.runs import Run

__all__ = [
    "SparseAutoencoder",
    "SaeOutput",
    "SaeLoss",
    "Sae",
    "TrueDirections",
    "Scores",
    "jumprelu",
    "step_function",
    "rectangle",
    "sae_grid",
    "true_directions",
    "resample_dead_",
    "fit_sae",
    "score_sae",
    "train_sae",
    "train_saes",
    "save_sae",
    "load_sae",
    "run_saes",
    "check_sae_targets",
    "run_spec_saes",
    "load_sae_spec",
    "sae_sections",
    "run_sae_sections",
    "SaeFormatError",
]

CONFIG, WEIGHTS, SCORES, FEATURES, LATENTS, HISTORY, RESAMPLES, REPORT = (
    "config.json",
    "model.safetensors",
    "scores.parquet",
    "features.parquet",
    "latents.parquet",
    "history.parquet",
    "resamples.parquet",
    "report.html",
)
FORMAT = SAE_FORMAT
EVAL_ELEMENTS = 2**24  # largest (inst, sae, d_sae, batch) activation block scored at once


class SaeFormatError(SpecError):
    """An SAE folder that is missing, damaged or not an SAE folder."""


# -- JumpReLU straight-through pieces -------------------------------------------------------------------------------
def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1 for |u| < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (leading dims, then dims of size 1)."""
    while t.dim() > len(shape):
        t = t.sum(0)
    for d, n in enumerate(shape):
        if n == 1 and t.shape[d] != 1:
            t = t.sum(d, keepdim=True)
    return t


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = grad * (pre > theta).to(grad.dtype)
        grad_theta = -(theta / eps) * rectangle((pre - theta) / eps) * grad
        return grad_pre, _sum_to(grad_theta, theta.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        grad_theta = -(1.0 / ctx.eps) * rectangle((pre - theta) / ctx.eps) * grad
        return torch.zeros_like(pre), _sum_to(grad_theta, theta.shape), None


def jumprelu(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """pre * H(pre - theta), with the straight-through rectangle-kernel gradient for theta."""
    return _JumpReLU.apply(pre, theta, eps)


def step_function(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """H(pre - theta) (the L0 count), with the straight-through rectangle-kernel gradient for theta only."""
    return _Step.apply(pre, theta, eps)


# -- the module -----------------------------------------------------------------------------------------------------
def sae_grid(spec: SaeSpec, architecture: str) -> list[dict[str, Any]]:
    """Settings of the SAEs of one instance, in order: resampling method outer, sparsity setting inner."""
    return [
        {"sparsity": v, "resample_method": r} for r in spec.resample_methods for v in spec.sparsity_values(architecture)
    ]


class SaeOutput(NamedTuple):
    """Forward pass of every SAE: pre-activations, latents and reconstructions.

    Batch comes last (unlike the toy models' batch-first tensors): every product is then one batched matmul whose
    long dimension is contiguous, several times faster for the narrow toy activations than batch-first.
    """

    pre: Float[Tensor, "inst sae d_sae batch"]
    z: Float[Tensor, "inst sae d_sae batch"]
    recon: Float[Tensor, "inst sae hidden batch"]
    kept_min: Float[Tensor, "inst sae"] | None = None
    """batchtopk (training): the smallest positive activation kept, for the inference threshold."""


class SaeLoss(NamedTuple):
    """Per-SAE loss terms, each averaged over the batch."""

    total: Float[Tensor, "inst sae"]
    mse: Float[Tensor, "inst sae"]
    penalty: Float[Tensor, "inst sae"]
    output: SaeOutput


def _instance_init(seed: int, inst: int, d_sae: int, d_in: int, independent: bool) -> tuple[Tensor, Tensor]:
    """(W_dec, W_enc) of every instance. transpose: unit-norm random decoder rows, W_enc = W_dec^T. independent:
    both U(-b, b) with b = sqrt(6 / (d_in d_sae)), unrelated (kaiming-uniform with the curriculum's fans)."""
    # One generator per instance: an instance's SAEs start the same whatever the number of instances, and all the
    # SAEs of one instance (different penalties, resampling methods) start from the same weights.
    dec, enc = [], []
    bound = math.sqrt(6.0 / (d_in * d_sae))
    for i in range(inst):
        g = torch.Generator()
        g.manual_seed(seed * 1_000_003 + i)
        if independent:
            enc.append((torch.rand((d_in, d_sae), generator=g) * 2 - 1) * bound)
            dec.append((torch.rand((d_sae, d_in), generator=g) * 2 - 1) * bound)
        else:
            w = torch.randn((d_sae, d_in), generator=g)
            dec.append(w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            enc.append(dec[-1].T.clone())
    return torch.stack(dec), torch.stack(enc)


class SparseAutoencoder(nn.Module):
    """``n_instances x n_sae`` sparse autoencoders of one architecture on ``d_in``-dimensional activations."""

    def __init__(self, spec: SaeSpec, architecture: str, n_instances: int, d_in: int):
        super().__init__()
        if architecture not in SAE_SPARSITY_FIELD:
            raise SpecError(f"sae.architecture: unknown architecture {architecture!r}")
        grid = sae_grid(spec, architecture)
        self.architecture = architecture
        self.grid = grid
        self.n_instances, self.n_sae, self.d_in, self.d_sae = n_instances, len(grid), d_in, spec.d_sae
        self.tied = spec.tied
        self.normalize = spec.decoder_normalized(architecture)
        self.bandwidth = spec.bandwidth
        self.initial_threshold = spec.threshold
        self.register_buffer("sparsity", torch.tensor([g["sparsity"] for g in grid]), persistent=False)
        inst, m, s = n_instances, self.n_sae, spec.d_sae
        dec, enc = _instance_init(spec.seed, inst, s, d_in, spec.init == "independent" and not spec.tied)
        self.W_dec = nn.Parameter(dec[:, None].expand(inst, m, s, d_in).clone())
        if not self.tied:
            self.W_enc = nn.Parameter(enc[:, None].expand(inst, m, d_in, s).clone())
        self.b_enc = nn.Parameter(torch.zeros(inst, m, s))
        self.b_dec = nn.Parameter(torch.zeros(inst, m, d_in))
        if architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((inst, m, s), math.log(spec.threshold)))
        if architecture == "gated":
            self.r_mag = nn.Parameter(torch.zeros(inst, m, s))
            self.b_mag = nn.Parameter(torch.zeros(inst, m, s))
        if architecture == "batchtopk":
            # Inference threshold: running mean of the smallest kept activation (NaN until the first batch).
            self.register_buffer("threshold", torch.full((inst, m), float("nan")))

    @property
    def encoder(self) -> Float[Tensor, "inst sae hidden d_sae"]:
        """W_enc, or the decoder's transpose when tied (unit-norm rows where the decoder keeps them)."""
        return self.decoder.transpose(-1, -2) if self.tied else self.W_enc

    @property
    def decoder(self) -> Float[Tensor, "inst sae d_sae hidden"]:
        """Decoder rows as used in the forward pass (unit norm when the architecture keeps them so)."""
        if self.normalize:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.W_dec

    @property
    def theta(self) -> Float[Tensor, "inst sae d_sae"]:
        """JumpReLU thresholds exp(log_threshold)."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale the stored decoder rows to unit norm (keeps Adam's parameter scale steady)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def forward(self, h: Float[Tensor, "batch inst hidden"], *, inference: bool = False) -> SaeOutput:
        """Encode and decode a batch of activations with every SAE (``inference``: batchtopk uses its threshold)."""
        x = _batch_last(h)[:, None] - self.b_dec[..., None]  # (inst, sae, hidden, batch)
        xw = torch.matmul(self.encoder.transpose(-1, -2), x)
        pre = xw + self.b_enc[..., None]
        kept_min = None
        arch = self.architecture
        if arch == "relu":
            z = torch.relu(pre)
        elif arch == "topk":
            z = _top_per_sample(pre, self.sparsity.round().long())
        elif arch == "batchtopk":
            if inference:
                theta = torch.nan_to_num(self.threshold, nan=0.0)[..., None, None]
                z = torch.relu(pre) * (pre > theta).to(pre.dtype)
            else:
                z, kept_min = _top_per_batch(pre, self.sparsity)
        elif arch == "jumprelu":
            z = jumprelu(pre, self.theta[..., None], self.bandwidth)
        else:  # gated: the gate decides which latents fire, the magnitude path how strongly
            mag = xw * self.r_mag.exp()[..., None] + self.b_mag[..., None]
            z = (pre > 0).to(pre.dtype) * torch.relu(mag)
        recon = torch.matmul(self.decoder.transpose(-1, -2), z) + self.b_dec[..., None]
        return SaeOutput(pre, z, recon, kept_min)

    def loss(self, h: Float[Tensor, "batch inst hidden"], out: SaeOutput | None = None) -> SaeLoss:
        """Per-SAE training loss: mse + lambda * penalty (+ the gated auxiliary term), batch-averaged."""
        out = self(h) if out is None else out
        target = _batch_last(h)[:, None]  # (inst, 1, hidden, batch)
        mse = (out.recon - target).square().mean(-2)  # (inst, sae, batch)
        arch = self.architecture
        if arch == "relu":
            penalty = out.z.sum(-2)  # z >= 0, so this is the L1 norm
        elif arch == "jumprelu":
            penalty = step_function(out.pre, self.theta[..., None], self.bandwidth).sum(-2)
        elif arch == "gated":
            gate = torch.relu(out.pre)
            penalty = gate.sum(-2)
            frozen = torch.matmul(self.decoder.detach().transpose(-1, -2), gate) + self.b_dec.detach()[..., None]
            mse_aux = (frozen - target).square().mean(-2)
        else:
            penalty = torch.zeros_like(mse)
        total = mse + self.sparsity[:, None] * penalty
        if arch == "gated":
            total = total + mse_aux
        return SaeLoss(total.mean(-1), mse.mean(-1), penalty.mean(-1), out)

    @torch.no_grad()
    def update_threshold_(self, kept_min: Tensor, momentum: float = 0.99) -> None:
        """batchtopk: fold one batch's smallest kept activation into the running inference threshold."""
        ok = torch.isfinite(kept_min)
        first = torch.isnan(self.threshold)
        mixed = momentum * self.threshold + (1 - momentum) * kept_min
        new = torch.where(first, kept_min, mixed)
        self.threshold.copy_(torch.where(ok, new, self.threshold))


def _batch_last(h: Float[Tensor, "batch inst hidden"]) -> Float[Tensor, "inst hidden batch"]:
    return h.permute(1, 2, 0).contiguous()


def _top_per_sample(pre: Tensor, k: Tensor) -> Tensor:
    """ReLU of the k largest pre-activations of each sample (k per SAE), zero elsewhere."""
    kmax = int(k.max())
    vals, idx = pre.topk(kmax, dim=-2)  # (inst, sae, kmax, batch)
    keep = torch.arange(kmax, device=pre.device) < k[:, None]  # (sae, kmax)
    return torch.zeros_like(pre).scatter(-2, idx, torch.relu(vals) * keep[..., None])


def _top_per_batch(pre: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU of the round(k * batch) largest pre-activations of the whole batch of each SAE, zero elsewhere."""
    i, m, s, b = pre.shape
    flat = pre.reshape(i, m, s * b)
    n_keep = (k * b).round().long().clamp(1, b * s)
    kmax = int(n_keep.max())
    vals, idx = flat.topk(kmax, dim=-1)
    keep = torch.arange(kmax, device=pre.device) < n_keep[:, None]
    kept = torch.relu(vals) * keep
    z = torch.zeros_like(flat).scatter(-1, idx, kept).reshape(i, m, s, b)
    positive = keep & (vals > 0)
    kept_min = torch.where(positive, vals.detach(), torch.full_like(vals, float("inf"))).amin(-1)
    return z, torch.where(torch.isinf(kept_min), torch.full_like(kept_min, float("nan")), kept_min)


# -- resampling -----------------------------------------------------------------------------------------------------
def _param_mask(name: str, dead: Tensor) -> Tensor | None:
    """Broadcastable mask of a parameter's entries that belong to dead latents (None: not per latent)."""
    if name == "W_dec":
        return dead[..., None]
    if name == "W_enc":
        return dead[:, :, None, :]
    if name in ("b_enc", "log_threshold", "r_mag", "b_mag"):
        return dead
    return None


@torch.no_grad()
def resample_dead_(
    sae: SparseAutoencoder,
    adam: AdamState,
    dead: Bool[Tensor, "inst sae d_sae"],
    loss_weighted: Bool[Tensor, " sae"],
    h: Float[Tensor, "batch inst hidden"],
    generator: torch.Generator,
    scale: float = 0.5,
) -> Float[Tensor, "inst sae"]:
    """Give dead latents new directions and a fresh start; returns how many were resampled per SAE.

    simple: decoder row and encoder column = a random unit direction. loss-weighted: the direction of an input
    drawn with probability proportional to its squared reconstruction loss (centred by b_dec); the encoder column
    gets ``scale`` times the mean norm of the live encoder columns. Biases, thresholds and Adam moments of the
    resampled latents restart from zero (thresholds from theta0).
    """
    counts = dead.sum(-1)
    if not bool(dead.any()):
        return counts
    inst, m, s, d = sae.W_dec.shape
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    rand = torch.randn((inst, m, s, d), generator=generator, device=dev, dtype=dt)
    rand = rand / rand.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    direction = rand
    if bool(loss_weighted.any()):
        b = h.shape[0]
        err = (sae(h).recon - _batch_last(h)[:, None]).square().sum(-2)  # (inst, sae, batch)
        weight = err.square().reshape(inst * m, b).double()
        weight = torch.where(weight.sum(-1, keepdim=True) > 0, weight, torch.ones_like(weight))
        idx = torch.multinomial(weight, s, replacement=True, generator=generator)  # (inst*sae, d_sae)
        x = (h[:, :, None, :] - sae.b_dec).permute(1, 2, 0, 3).reshape(inst * m, b, d)
        picked = x.gather(1, idx[..., None].expand(-1, -1, d)).reshape(inst, m, s, d)
        norm = picked.norm(dim=-1, keepdim=True)
        picked = torch.where(norm > 1e-12, picked / norm.clamp_min(1e-12), rand)
        direction = torch.where(loss_weighted[None, :, None, None], picked, rand)
    alive = ~dead
    col_norm = sae.encoder.norm(dim=-2)  # (inst, sae, d_sae)
    n_alive = alive.sum(-1)
    mean_alive = (col_norm * alive).sum(-1) / n_alive.clamp_min(1)
    mean_alive = torch.where(n_alive > 0, mean_alive, torch.ones_like(mean_alive))
    enc_scale = torch.where(loss_weighted[None, :], scale * mean_alive, torch.ones_like(mean_alive))
    sae.W_dec.copy_(torch.where(dead[..., None], direction, sae.W_dec))
    if not sae.tied:
        new_enc = (direction * enc_scale[..., None, None]).transpose(-1, -2)
        sae.W_enc.copy_(torch.where(dead[:, :, None, :], new_enc, sae.W_enc))
    sae.b_enc.masked_fill_(dead, 0.0)
    if sae.architecture == "jumprelu":
        sae.log_threshold.masked_fill_(dead, math.log(sae.initial_threshold))
    if sae.architecture == "gated":
        sae.r_mag.masked_fill_(dead, 0.0)
        sae.b_mag.masked_fill_(dead, 0.0)
    for name in adam.exp_avg:
        mask = _param_mask(name, dead)
        if mask is not None:
            adam.exp_avg[name].masked_fill_(mask.expand_as(adam.exp_avg[name]), 0.0)
            adam.exp_avg_sq[name].masked_fill_(mask.expand_as(adam.exp_avg_sq[name]), 0.0)
    return counts


# -- training -------------------------------------------------------------------------------------------------------
class Fitted(NamedTuple):
    """What :func:`fit_sae` returns: the long history and resampling tables, and the wall time."""

    history: pd.DataFrame
    resamples: pd.DataFrame
    seconds: float


def _long(step: int, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inst, m = next(iter(values.values())).shape
    out = {
        "step": np.full(inst * m, step, dtype=np.int64),
        "instance": np.repeat(np.arange(inst, dtype=np.int64), m),
        "sae": np.tile(np.arange(m, dtype=np.int64), inst),
    }
    out.update({k: v.reshape(-1) for k, v in values.items()})
    return out


def _frame(rows: list[dict[str, np.ndarray]], columns: list[str]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(
            {c: np.array([], dtype=np.int64 if c in ("step", "instance", "sae") else float) for c in columns}
        )
    return pd.DataFrame({c: np.concatenate([r[c] for r in rows]) for c in columns})


def fit_sae(
    sae: SparseAutoencoder,
    toy: ToyModel,
    run_spec: Experiment,
    spec: SaeSpec,
    *,
    progress: bool = False,
) -> Fitted:
    """Train every SAE on fresh activations ``toy.hidden(x)``, x from the run's own data distribution.

    Adam (per-instance lr, as the toy models), decoder renormalised after each step where the architecture needs
    it, dead latents (not fired in ``resample_window`` steps) resampled every ``resample_every`` steps.
    """
    dev = sae.W_dec.device
    sampler = make_sampler(run_spec, dev, torch.float32)
    gen = torch.Generator(device=dev)
    gen.manual_seed(spec.seed * 7919 + 104_729)
    params = dict(sae.named_parameters())
    adam = AdamState.zeros_like({k: v.detach() for k, v in params.items()})
    inst, m, s = sae.n_instances, sae.n_sae, sae.d_sae
    lr = torch.full((inst,), spec.lr, device=dev)
    wd = torch.zeros(inst, device=dev)
    methods = [g["resample_method"] for g in sae.grid]
    resampling = torch.tensor([r != "none" for r in methods], device=dev)
    loss_weighted = torch.tensor([r == "loss-weighted" for r in methods], device=dev)
    since = torch.zeros((inst, m, s), dtype=torch.long, device=dev)
    warmup = max(1, spec.steps // 20) if spec.schedule == "warmup-cosine" else 0
    toy.eval()
    history: list[dict[str, np.ndarray]] = []
    resamples: list[dict[str, np.ndarray]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.steps, desc=f"sae {sae.architecture}", unit="step", leave=False)
    start = time.perf_counter()
    for step in range(spec.steps):
        with torch.no_grad():
            h = toy.hidden(sampler.sample(spec.batch_size, gen)).float()
        terms = sae.loss(h)
        grads = torch.autograd.grad(terms.total.sum(), list(params.values()))
        mult = lr_multiplier(spec.schedule, step, spec.steps, warmup)
        adam_step_(
            {k: v.data for k, v in params.items()},
            dict(zip(params, grads, strict=True)),
            adam,
            lr * mult,
            wd,
            decoupled=False,
        )
        done = step + 1
        with torch.no_grad():
            if sae.normalize:
                sae.normalize_decoder_()
            out = terms.output
            fired = (out.z > 0).any(-1)
            since = torch.where(fired, torch.zeros_like(since), since + 1)
            if out.kept_min is not None:
                sae.update_threshold_(out.kept_min)
            if step % spec.log_every == 0 or done == spec.steps:
                total = terms.total.detach()
                if not bool(torch.isfinite(total).all()):
                    bad = (~torch.isfinite(total)).any(-1).nonzero().flatten().tolist()
                    raise TrainingDiverged(step, bad)
                history.append(
                    _long(
                        step,
                        {
                            "loss": total.cpu().double().numpy(),
                            "mse": terms.mse.detach().cpu().double().numpy(),
                            "l0": (out.z > 0).sum(-2).double().mean(-1).cpu().numpy(),
                            "dead": (since >= spec.resample_window).sum(-1).cpu().numpy().astype(np.int64),
                        },
                    )
                )
            if spec.resample_every and done % spec.resample_every == 0 and done < spec.steps:
                dead = (since >= spec.resample_window) & resampling[None, :, None]
                if bool(dead.any()):
                    fresh = toy.hidden(sampler.sample(spec.batch_size, gen)).float()
                    n = resample_dead_(sae, adam, dead, loss_weighted, fresh, gen, spec.resample_scale)
                    since = torch.where(dead, torch.zeros_like(since), since)
                    resamples.append(_long(done, {"resampled": n.cpu().numpy().astype(np.int64)}))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    return Fitted(
        _frame(history, ["step", "instance", "sae", "loss", "mse", "l0", "dead"]),
        _frame(resamples, ["step", "instance", "sae", "resampled"]),
        seconds,
    )


# -- ground truth ---------------------------------------------------------------------------------------------------
class TrueDirections(NamedTuple):
    """The toy model's features as directions in its hidden space, per instance."""

    directions: Float[Tensor, "inst dirs hidden"]
    labels: list[str]
    represented: Bool[Tensor, "inst dirs"]
    """False where the model barely represents the feature (response under 10% of the instance's largest)."""


def _magnitude_grid(spec: Experiment, n: int = 64) -> tuple[Tensor, bool]:
    """Representative values of an active feature (quantiles of its law) and whether the law is signed."""
    d = spec.data
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if d.kind == "hierarchy":
        return torch.ones(1, dtype=torch.float64), False
    if d.normalize:  # a lone active feature is scaled to norm 1
        return torch.ones(1, dtype=torch.float64), d.magnitude == "signed"
    if d.magnitude == "uniform":
        return q, False
    if d.magnitude == "signed":
        return q, True
    return (0.5 + 0.2 * torch.special.ndtri(q)).clamp(0, 1), False


@torch.no_grad()
def true_directions(model: ToyModel, spec: Experiment) -> TrueDirections:
    """Hidden response to each feature alone, averaged over its magnitudes, minus the response to no input.

    Bottlenecks (h = W x): exactly E[v] W_i, the encoder column. Neuron models (h = ReLU(W x + b)): the mean of
    ReLU(v W_i + b) - ReLU(b), which for b = 0 is E[v] ReLU(W_i); with signed magnitudes the negative side gives a
    second direction E[v] ReLU(-W_i), listed as ``f<i>-`` after ``f<i>+``.
    """
    values, signed = _magnitude_grid(spec)
    p = next(model.parameters())
    n, inst = spec.model.n_features, spec.n_instances
    g = values.numel()
    eye = torch.eye(n, dtype=p.dtype, device=p.device)
    v = values.to(device=p.device, dtype=p.dtype)
    base = model.hidden(torch.zeros((1, inst, n), dtype=p.dtype, device=p.device))  # (1, inst, hidden)
    signs = [1.0, -1.0] if signed else [1.0]
    dirs, labels = [], []
    for sign in signs:
        x = (sign * v[:, None, None] * eye[None]).reshape(g * n, n)  # (g*n, feats): feature f at value v
        resp = model.hidden(x[:, None, :].expand(g * n, inst, n)) - base
        dirs.append(resp.reshape(g, n, inst, -1).mean(0))  # (feats, inst, hidden)
        labels += [f"f{i}{'+' if sign > 0 else '-'}" if signed else f"f{i}" for i in range(n)]
    directions = torch.cat(dirs, 0).permute(1, 0, 2).float()  # (inst, dirs, hidden)
    norms = directions.norm(dim=-1)
    top = norms.amax(-1, keepdim=True)
    represented = (norms > 0.1 * top) & (norms > 1e-6)
    return TrueDirections(directions, labels, represented)


class Scores(NamedTuple):
    """Ground-truth scores: one row per (instance, SAE), per (instance, SAE, true direction) and per latent."""

    table: pd.DataFrame
    features: pd.DataFrame
    latents: pd.DataFrame
    cosine: Float[Tensor, "inst sae d_sae dirs"]


@torch.no_grad()
def score_sae(sae: SparseAutoencoder, toy: ToyModel, run_spec: Experiment, spec: SaeSpec) -> Scores:
    """Grade every SAE against the toy model's true feature directions on ``spec.eval_batch`` fresh samples.

    Scores: mean max cosine (mmcs) between decoder rows and true directions, matching each feature to its best
    latent (mmcs_features) and each latent to its best feature (mmcs_latents); features recovered above cosine 0.9
    and 0.99; dead (never fire) and dense (fire on more than dense_threshold of samples) latents; L0; fraction of
    variance unexplained; shrinkage (sum of reconstructed norms over sum of true norms, on inputs with some feature on).
    """
    dev = sae.W_dec.device
    sampler = make_sampler(run_spec, dev, torch.float32)
    gen = torch.Generator(device=dev)
    gen.manual_seed(spec.seed * 7919 + 7_777_777)
    inst, m, s, d = sae.n_instances, sae.n_sae, sae.d_sae, sae.d_in
    f64 = torch.float64
    fired = torch.zeros((inst, m, s), dtype=f64, device=dev)
    l0 = torch.zeros((inst, m), dtype=f64, device=dev)
    sq_err = torch.zeros((inst, m), dtype=f64, device=dev)
    h_sum = torch.zeros((inst, d), dtype=f64, device=dev)
    h_sq = torch.zeros(inst, dtype=f64, device=dev)
    norm_rec = torch.zeros((inst, m), dtype=f64, device=dev)
    norm_true = torch.zeros(inst, dtype=f64, device=dev)
    true_active = torch.zeros(inst, dtype=f64, device=dev)
    done, n = 0, spec.eval_batch
    # At most 2^18 samples x SAEs and 2^24 activations per chunk (the chunking fixes the evaluation stream).
    chunk = max(1, min(n, 2**18 // max(1, inst * m), EVAL_ELEMENTS // max(1, inst * m * max(s, d))))
    while done < n:
        b = min(chunk, n - done)
        x = sampler.sample(b, gen)
        h = toy.hidden(x).float()
        out = sae(h, inference=True)
        active = (out.z > 0).to(f64)
        fired += active.sum(-1)
        l0 += active.sum((2, 3))
        sq_err += (out.recon - _batch_last(h)[:, None]).double().square().sum((2, 3))
        h_sum += h.double().sum(0)
        h_sq += h.double().square().sum((0, 2))
        on = (x != 0).any(-1).to(f64)  # (batch, inst)
        true_active += (x != 0).to(f64).sum((0, 2))
        norm_rec += (out.recon.double().norm(dim=-2) * on.T[:, None, :]).sum(-1)
        norm_true += (h.double().norm(dim=-1) * on).sum(0)
        done += b
    freq = fired / n
    variance = h_sq - h_sum.square().sum(-1) / n
    fvu = sq_err / variance.clamp_min(1e-30)[:, None]
    fvu = torch.where(variance[:, None] > 1e-12, fvu, torch.full_like(fvu, float("nan")))
    shrink = norm_rec / norm_true.clamp_min(1e-30)[:, None]
    shrink = torch.where(norm_true[:, None] > 0, shrink, torch.full_like(shrink, float("nan")))

    truth = true_directions(toy, run_spec)
    t_hat = truth.directions.to(dev) / truth.directions.to(dev).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dec = sae.decoder
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = torch.einsum("imsd,itd->imst", dec, t_hat)
    rep = truth.represented.to(dev)  # (inst, dirs)
    n_true = rep.sum(-1)
    masked = torch.where(rep[:, None, None, :], cos, torch.full_like(cos, -2.0))
    best_for_feature, best_latent = cos.max(dim=2)  # (inst, sae, dirs)
    best_for_latent = masked.max(dim=3).values  # (inst, sae, d_sae)
    rep_f = rep[:, None, :].to(cos.dtype)
    mmcs_features = (best_for_feature * rep_f).sum(-1) / n_true.clamp_min(1)[:, None]
    mmcs_latents = best_for_latent.mean(-1)
    rec90 = ((best_for_feature > 0.9) & rep[:, None, :]).sum(-1)
    rec99 = ((best_for_feature > 0.99) & rep[:, None, :]).sum(-1)

    def col(t: Tensor) -> np.ndarray:
        return t.reshape(-1).cpu().numpy()

    field = SAE_SPARSITY_FIELD[sae.architecture]
    cols: dict[str, Any] = {
        "instance": np.repeat(np.arange(inst, dtype=np.int64), m),
        "sae": np.tile(np.arange(m, dtype=np.int64), inst),
        "architecture": [sae.architecture] * (inst * m),
        "sparsity_field": [field] * (inst * m),
        "sparsity": np.tile([g["sparsity"] for g in sae.grid], inst).astype(np.float64),
        "resample_method": [g["resample_method"] for g in sae.grid] * inst,
    }
    for key in run_spec.instances.axes:
        values = run_spec.instance_values(key)
        cols[key] = [json.dumps(v) if isinstance(v, list) else v for v in values for _ in range(m)]
    cols.update(
        {
            "n_true": np.repeat(n_true.cpu().numpy().astype(np.int64), m),
            "mmcs_features": col(mmcs_features).astype(np.float64),
            "mmcs_latents": col(mmcs_latents).astype(np.float64),
            "recovered_90": col(rec90).astype(np.int64),
            "recovered_99": col(rec99).astype(np.int64),
            "dead": col((freq == 0).sum(-1)).astype(np.int64),
            "dense": col((freq > spec.dense_threshold).sum(-1)).astype(np.int64),
            "l0": col(l0 / n),
            "true_l0": np.repeat((true_active / n).cpu().numpy(), m),
            "fvu": col(fvu),
            "mse": col(sq_err / (n * d)),
            "shrinkage": col(shrink),
        }
    )
    table = pd.DataFrame(cols)
    t = len(truth.labels)
    latent_freq = freq.gather(2, best_latent)  # (inst, sae, dirs)
    features = pd.DataFrame(
        {
            "instance": np.repeat(np.arange(inst, dtype=np.int64), m * t),
            "sae": np.tile(np.repeat(np.arange(m, dtype=np.int64), t), inst),
            "feature": truth.labels * (inst * m),
            "represented": rep[:, None, :].expand(inst, m, t).reshape(-1).cpu().numpy(),
            "best_latent": col(best_latent).astype(np.int64),
            "cosine": col(best_for_feature).astype(np.float64),
            "latent_frequency": col(latent_freq).astype(np.float64),
        }
    )
    best_cos_l, best_feat_l = masked.max(dim=3)  # (inst, sae, d_sae)
    latents = pd.DataFrame(
        {
            "instance": np.repeat(np.arange(inst, dtype=np.int64), m * s),
            "sae": np.tile(np.repeat(np.arange(m, dtype=np.int64), s), inst),
            "latent": np.tile(np.arange(s, dtype=np.int64), inst * m),
            "frequency": col(freq).astype(np.float64),
            "dead": col(freq == 0),
            "dense": col(freq > spec.dense_threshold),
            "best_feature": [truth.labels[j] for j in col(best_feat_l)],
            "cosine": col(best_cos_l).astype(np.float64),
        }
    )
    return Scores(table, features, latents, cos)


# -- the SAE folder -------------------------------------------------------------------------------------------------
@dataclass
class Sae:
    """Trained SAEs of one architecture on one run: spec, weights, scores, history."""

    spec: SaeSpec
    model: SparseAutoencoder
    scores: pd.DataFrame
    features: pd.DataFrame
    latents: pd.DataFrame
    history: pd.DataFrame
    resamples: pd.DataFrame
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def architecture(self) -> str:
        return self.model.architecture

    @property
    def name(self) -> str:
        return str(self.spec.name or self.architecture)


def train_sae(
    run: Run,
    spec: SaeSpec,
    architecture: str | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Sae:
    """Train (in memory) the SAEs of one architecture on a run's activations and score them."""
    from superposition.version import __version__

    arch = architecture or spec.architectures[0]
    one = spec.for_architecture(arch)
    dev = resolve_device(device if isinstance(device, str) else (run.spec.device if device is None else str(device)))
    toy = run.model
    if next(toy.parameters()).device != dev:
        toy = copy.deepcopy(toy).to(dev)
    d_in = int(toy.hidden(torch.zeros((1, run.spec.n_instances, run.spec.model.n_features), device=dev)).shape[-1])
    sae = SparseAutoencoder(one, arch, run.spec.n_instances, d_in).to(dev)
    fitted = fit_sae(sae, toy, run.spec, one, progress=progress)
    scores = score_sae(sae, toy, run.spec, one)
    meta = {
        "format": FORMAT,
        "superposition_version": __version__,
        "torch_version": torch.__version__,
        "device": str(dev),
        "run_name": run.spec.name,
        "architecture": arch,
        "n_instances": run.spec.n_instances,
        "n_sae": sae.n_sae,
        "d_in": d_in,
        "train_seconds": round(fitted.seconds, 3),
    }
    return Sae(one, sae, scores.table, scores.features, scores.latents, fitted.history, fitted.resamples, meta)


def train_saes(
    run: Run, spec: SaeSpec, *, device: str | torch.device | None = None, progress: bool = False
) -> list[Sae]:
    """One :class:`Sae` per architecture of the spec."""
    return [train_sae(run, spec, a, device=device, progress=progress) for a in spec.architectures]


def save_sae(sae: Sae, out: str | Path, *, overwrite: bool = False, run: Run | None = None) -> Path:
    """Write an SAE folder atomically: built in a hidden sibling (config.json last), then renamed into place.

    Only an SAE folder of this tool is replaced (with ``overwrite``); anything else at ``out`` is refused."""
    from superposition.report import render_page

    out = Path(out)
    check_target(out, SAE_KIND, SAE_WORK, overwrite=overwrite)
    partial = work_dir(out)
    marker = {"format": FORMAT, "sae": sae.spec.model_dump(mode="json")}
    fresh_workdir(partial, "spec.json", json.dumps(marker).encode(), (SAE_WORK,))
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.model.state_dict().items()}
    atomic_save_tensors(partial / WEIGHTS, tensors, {"format": FORMAT})
    for name, frame in (
        (SCORES, sae.scores),
        (FEATURES, sae.features),
        (LATENTS, sae.latents),
        (HISTORY, sae.history),
        (RESAMPLES, sae.resamples),
    ):
        atomic_write_table(partial / name, frame)
    page = render_page(f"{sae.meta.get('run_name', '')} / sae {sae.name}", sae_sections(sae, run))
    atomic_write_bytes(partial / REPORT, page.encode("utf-8"))
    config = {**sae.meta, "sae": sae.spec.model_dump(mode="json")}
    atomic_write_bytes(partial / CONFIG, json.dumps(config, indent=2).encode())
    publish(partial, out, SAE_KIND, overwrite=overwrite)
    sae.path = out
    return out


def load_sae(path: str | Path) -> Sae:
    """Rebuild an SAE folder, trusting nothing in it: config.json validated, tensor names, shapes and dtypes checked
    against the config from the safetensors header before any data is read; JSON, safetensors and parquet only."""
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_dir():
        raise SaeFormatError(f"{path}: no such SAE folder")
    for name in (CONFIG, WEIGHTS, SCORES, FEATURES, LATENTS, HISTORY, RESAMPLES):
        if not (path / name).exists():
            raise SaeFormatError(f"{path}: not an SAE folder ({name} is missing)")
    try:
        config = read_json(path, CONFIG, MAX_CONFIG_BYTES)
        if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("sae"), dict):
            raise SaeFormatError(f"{path / CONFIG}: not an SAE config (format {FORMAT!r} and an 'sae' table expected)")
        try:
            spec = SaeSpec.model_validate(config["sae"])
            arch = config["architecture"]
            n_inst, d_in = config["n_instances"], config["d_in"]
        except ValidationError as exc:
            raise SaeFormatError(f"{path / CONFIG}: invalid sae spec: {format_validation_error(exc)}") from None
        except KeyError as exc:
            raise SaeFormatError(f"{path / CONFIG}: {exc} is missing") from None
        ok = arch in SAE_SPARSITY_FIELD and all(type(v) is int and 1 <= v <= 10**9 for v in (n_inst, d_in))
        if not ok or spec.architectures != [arch]:
            raise SaeFormatError(f"{path / CONFIG}: bad architecture, n_instances or d_in")
        weights = checked_file(path, WEIGHTS)
        header = read_safetensors_header(weights)
        params = n_inst * len(sae_grid(spec, arch)) * spec.d_sae * max(d_in, 1) * 4
        if params > 2 * weights.stat().st_size + 2**20:  # the file's size bounds the allocation
            raise SaeFormatError(f"{path / CONFIG}: describes SAEs larger than {WEIGHTS} holds")
        with torch.device("meta"):
            expected = SparseAutoencoder(spec, arch, n_inst, d_in).state_dict()
        check_tensors(path / WEIGHTS, header, expected)
        model = SparseAutoencoder(spec, arch, n_inst, d_in)
        model.load_state_dict(load_tensors(weights), strict=True)
        frames = []
        for name in (SCORES, FEATURES, LATENTS, HISTORY, RESAMPLES):
            f = checked_file(path, name, MAX_TABLE_BYTES)
            try:
                frames.append(pd.read_parquet(f))
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise SaeFormatError(f"{path / name}: not a valid parquet table ({exc.__class__.__name__})") from None
    except RunFormatError as exc:
        raise SaeFormatError(str(exc).replace("run folder", "SAE folder")) from None
    meta = {k: v for k, v in config.items() if k != "sae"}
    return Sae(spec, model, *frames, meta=meta, path=path)


def check_sae_targets(run: Run, spec: SaeSpec, *, overwrite: bool = False) -> list[Path]:
    """The SAE folders :func:`run_saes` will write, each checked before anything trains: absent, or (with
    ``overwrite``) an SAE folder of this tool; anything else is refused."""
    if run.path is None:
        raise SpecError("run_saes: the run has no folder (save it first, or use train_saes)")
    root = Path(run.path) / "sae"
    targets = [root / spec.folder_name(a) for a in spec.architectures]
    for t in targets:
        check_target(t, SAE_KIND, SAE_WORK, overwrite=overwrite)
    return targets


def run_saes(
    run: Run,
    spec: SaeSpec,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[Sae]:
    """Train the SAEs of every architecture on a saved run, write RUN/sae/<name>/ and refresh RUN/report.html."""
    from superposition.report import write_report

    targets = check_sae_targets(run, spec, overwrite=overwrite)
    results = []
    for arch, target in zip(spec.architectures, targets, strict=True):
        sae = train_sae(run, spec, arch, device=device, progress=progress)
        save_sae(sae, target, overwrite=overwrite, run=run)
        results.append(sae)
    write_report(run)
    return results


def run_spec_saes(run: Run, *, device: str | torch.device | None = None, progress: bool = False) -> list[Sae]:
    """Train a just-saved run's own ``[sae]`` section (none: nothing), replacing SAE folders of the same name: what
    :func:`superposition.runs.run` and ``superposition run`` do after the model."""
    if run.spec.sae is None:
        return []
    return run_saes(run, run.spec.sae, overwrite=True, device=device, progress=progress)


def load_sae_spec(
    source: str | Path | None = None,
    *,
    base: SaeSpec | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
) -> SaeSpec:
    """An SAE spec from a TOML/JSON file (an ``[sae]`` table, or the fields at top level), else ``base`` or the
    defaults, with ``--set`` overrides (``sae.k=2`` or ``k=2``); ``quick`` shrinks steps and the resampling schedule."""
    if source is not None:
        raw = load_raw(source)
        raw = raw["sae"] if isinstance(raw.get("sae"), dict) else raw
    else:
        raw = base.model_dump(mode="json") if base is not None else {}
    sets = [o if o.strip().startswith("sae.") else f"sae.{o.strip()}" for o in overrides]
    raw = apply_overrides({"sae": raw}, sets)["sae"]
    spec = _validate_sae(raw)
    shrink = quick_sae_schedule(spec) if quick else {}  # the one --quick rule for SAEs (also run --quick's)
    if shrink:
        spec = _validate_sae({**spec.model_dump(mode="json"), **shrink})
    return spec


def _validate_sae(raw: Any) -> SaeSpec:
    from pydantic import ValidationError

    if not isinstance(raw, dict):
        raise SpecError("sae: must be a table")
    try:
        return SaeSpec.model_validate(raw)
    except ValidationError as exc:
        line = format_validation_error(exc)
        raise SpecError(line if line.startswith("sae") else f"sae.{line}") from None


# -- report ---------------------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = [
    "n_true",
    "mmcs_features",
    "mmcs_latents",
    "recovered_90",
    "recovered_99",
    "dead",
    "dense",
    "l0",
    "true_l0",
    "fvu",
    "shrinkage",
]


def summary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Scores averaged over instances for each SAE setting, with the number of instances whose SAE recovered
    every represented feature above cosine 0.99."""
    keys = ["architecture", "sparsity_field", "sparsity", "resample_method"]
    df = scores.assign(all_recovered_99=(scores["recovered_99"] == scores["n_true"]).astype(np.int64))
    agg = {c: "mean" for c in SUMMARY_COLUMNS if c in scores}  # older folders lack the newer columns (true_l0)
    agg["all_recovered_99"] = "sum"
    out = df.groupby(keys, sort=False, as_index=False).agg(agg)
    out.insert(len(keys), "instances", df.groupby(keys, sort=False).size().to_numpy())
    return out


def _short_labels(sae: Sae) -> list[str]:
    """A label per SAE of the folder naming only the settings that vary (else the architecture)."""
    field = SAE_SPARSITY_FIELD[sae.architecture]
    vary_s = len(sae.spec.sparsity_values(sae.architecture)) > 1
    vary_r = len(sae.spec.resample_methods) > 1
    out = []
    for g in sae.model.grid:
        parts = [f"{field}={g['sparsity']:g}"] if vary_s else []
        parts += [f"resample {g['resample_method']}"] if vary_r else []
        out.append(", ".join(parts) or sae.architecture)
    return out


def sae_sections(sae: Sae, run: Run | None = None) -> list[Section]:
    """The report sections of one SAE folder: scores, directions over the true features, cosines, dead latents."""
    from superposition import plots
    from superposition.report import Section

    s = sae.spec
    field = SAE_SPARSITY_FIELD[sae.architecture]
    summary = summary_table(sae.scores)
    intro = [
        f"{sae.model.n_sae} {sae.architecture} SAE(s) per toy-model instance, {sae.model.n_instances} instance(s), "
        f"d_sae = {s.d_sae} on {sae.model.d_in}-dimensional activations; {s.steps} steps of batch {s.batch_size}, "
        f"lr {s.lr:g}, {'tied' if s.tied else 'untied'} decoder"
        f"{', rows kept at unit norm' if sae.model.normalize else ''}; {field} swept over "
        f"{', '.join(f'{v:g}' for v in s.sparsity_values(sae.architecture))}; resampling "
        f"{', '.join(s.resample_methods)} every {s.resample_every} steps "
        f"(dead: no firing in {s.resample_window} steps).",
        "Scores on fresh samples: mmcs_features = mean over true features of the best cosine with a decoder row; "
        "mmcs_latents = mean over latents of the best cosine with a true feature; recovered_90/99 = features whose "
        "best cosine exceeds 0.9/0.99 (of n_true represented ones); dead = never fire; dense = fire on more than "
        f"{s.dense_threshold:g} of samples; fvu = fraction of variance unexplained; shrinkage = reconstructed / true "
        "norm. all_recovered_99 counts instances whose SAE recovered every feature above 0.99.",
    ]
    figures = []
    labels = _short_labels(sae)
    dec = sae.model.decoder.detach().float().cpu()
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    inst, m, d_sae = sae.model.n_instances, sae.model.n_sae, sae.model.d_sae
    dead = np.zeros((inst, m, d_sae), dtype=bool)
    lat = sae.latents
    dead[lat["instance"].to_numpy(), lat["sae"].to_numpy(), lat["latent"].to_numpy()] = lat["dead"].to_numpy()
    truth = true_directions(run.model, run.spec) if run is not None else None
    shown = [int(j) for j in np.unique(np.round(np.linspace(0, m - 1, min(4, m))).astype(np.int64))]
    if truth is not None and sae.model.d_in == 2:
        n_show = min(8, inst)
        feats = np.stack([truth.directions[i].cpu().numpy() for _ in shown for i in range(n_show)])
        rows = np.stack([dec[i, j].numpy() for j in shown for i in range(n_show)])
        titles = [f"{labels[j]} · inst 0" if i == 0 else f"inst {i}" for j in shown for i in range(n_show)]
        figures.append(
            plots.sae_directions_2d(
                feats,
                rows,
                titles,
                cols=n_show,
                dead=np.stack([dead[i, j] for j in shown for i in range(n_show)]),
                feature_labels=truth.labels,
                title="Decoder rows (coloured; dotted = dead latent) over the true feature directions (grey), "
                f"first {n_show} instances",
            )
        )
    if truth is not None:
        t_hat = truth.directions[0].cpu()
        cos = torch.einsum("msd,td->mst", dec[0], t_hat / t_hat.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()
        figures.append(
            plots.sae_cosine_heatmap(
                cos[shown],
                truth.labels,
                [labels[j] for j in shown],
                title="Cosine of each decoder row with each true feature (instance 0)",
            )
        )
    if len(sae.history):
        hist = sae.history.groupby(["step", "sae"], as_index=False)["dead"].mean()
        hist["series"] = [labels[j] for j in hist["sae"]]
        ev = sae.resamples[sae.resamples["resampled"] > 0].groupby(["step", "sae"], as_index=False)["resampled"].sum()
        ev["series"] = [labels[j] for j in ev["sae"]]
        figures.append(
            plots.sae_dead_latents(
                hist[["step", "series", "dead"]],
                ev[["step", "series", "resampled"]],
                title=f"Dead latents over training (mean over instances; no firing in {s.resample_window} steps)",
            )
        )
    if len(s.sparsity_values(sae.architecture)) > 1:  # a curve needs several sparsity settings
        figures.append(_pareto(sae.scores))
    sections = [
        Section(f"SAE {sae.name}: {sae.architecture}", paragraphs=intro, tables=[summary], figures=figures),
    ]
    return sections


def _pareto(scores: pd.DataFrame) -> Any:
    from superposition import plots

    summary = summary_table(scores)
    summary["curve"] = summary["architecture"]
    if summary["resample_method"].nunique() > 1:
        summary["curve"] = summary["curve"] + " · resample " + summary["resample_method"]
    summary["label"] = [f"{r.sparsity_field}={r.sparsity:g}" for r in summary.itertuples()]
    true_l0 = float(scores["true_l0"].mean()) if "true_l0" in scores else None
    return plots.sae_pareto(
        summary,
        x="l0",
        ys=["mmcs_features", "recovered_99", "fvu"],
        curve="curve",
        label="label",
        title="Recovery vs L0 (mean over instances; one point per sparsity setting; dotted: active true features)",
        reference_x=true_l0,
        reference_name=f"true L0 = {true_l0:.3g}" if true_l0 is not None else "true L0",
    )


def run_sae_sections(run: Run) -> list[Section]:
    """Sections for every SAE folder under RUN/sae/ (what the run's report shows), with a Pareto figure over all."""
    from superposition.report import Section

    if run.path is None:
        return []
    root = Path(run.path) / "sae"
    if not root.is_dir():
        return []
    saes, sections = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            saes.append(load_sae(folder))
        except SpecError as exc:
            sections.append(Section(f"SAE {folder.name}", paragraphs=[f"could not be read: {exc}"]))
    if len(saes) > 1:
        table = pd.concat([s.scores for s in saes], ignore_index=True)
        sections.append(
            Section(
                "SAE architectures: recovery vs L0",
                paragraphs=[
                    "Every SAE folder of this run, mean over instances per setting. Up and to the left is better "
                    "for recovery; down and to the left for fvu."
                ],
                tables=[summary_table(table)],
                figures=[_pareto(table)],
            )
        )
    for sae in saes:
        sections.extend(sae_sections(sae, run))
    return sections
