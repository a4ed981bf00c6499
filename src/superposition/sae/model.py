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

The SAE's forward pass and loss live here; fitting is :mod:`superposition.sae.fit`, grading
:mod:`superposition.sae.score`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from superposition.spec import SAE_SPARSITY_FIELD, SaeSpec, SpecError

__all__ = [
    "SparseAutoencoder",
    "SaeOutput",
    "SaeLoss",
    "jumprelu",
    "step_function",
    "rectangle",
    "sae_grid",
    "batch_last",
]


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
        x = batch_last(h)[:, None] - self.b_dec[..., None]  # (inst, sae, hidden, batch)
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
        target = batch_last(h)[:, None]  # (inst, 1, hidden, batch)
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


def batch_last(h: Float[Tensor, "batch inst hidden"]) -> Float[Tensor, "inst hidden batch"]:
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
