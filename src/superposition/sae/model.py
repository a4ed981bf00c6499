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
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from superposition.spec import SAE_SPARSITY_FIELD, SaeSpec, SpecError

__all__ = [
    "SparseAutoencoder",
    "SaeSettings",
    "sae_forward",
    "sae_loss",
    "decoder",
    "encoder",
    "normalize_rows_",
    "update_threshold_",
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


def _through_theta(theta: Tensor, slope: Tensor) -> Tensor:
    """Zero in value, with gradient ``slope`` (summed over the batch) with respect to theta: the straight-through
    term. Written with detach rather than an autograd.Function so that torch.func.grad and torch.compile trace it."""
    t = theta * slope.detach()
    return t - t.detach()


def jumprelu(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """pre * H(pre - theta), with the straight-through rectangle-kernel gradient for theta."""
    kernel = rectangle((pre - theta) / eps)
    return pre * (pre > theta).to(pre.dtype) + _through_theta(theta, -(theta / eps) * kernel)


def step_function(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """H(pre - theta) (the L0 count), with the straight-through rectangle-kernel gradient for theta only."""
    kernel = rectangle((pre.detach() - theta) / eps)
    return (pre > theta).to(pre.dtype).detach() + _through_theta(theta, -(1.0 / eps) * kernel)


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
    def settings(self) -> SaeSettings:
        """The static settings of the forward pass and loss."""
        return SaeSettings(self.architecture, self.tied, self.normalize, self.bandwidth)

    def params(self) -> dict[str, Tensor]:
        """The parameters by name (the tensors themselves)."""
        return dict(self.named_parameters())

    @property
    def encoder(self) -> Float[Tensor, "inst sae hidden d_sae"]:
        """W_enc, or the decoder's transpose when tied (unit-norm rows where the decoder keeps them)."""
        return encoder(self.settings, self.params())

    @property
    def decoder(self) -> Float[Tensor, "inst sae d_sae hidden"]:
        """Decoder rows as used in the forward pass (unit norm when the architecture keeps them so)."""
        return decoder(self.settings, self.params())

    @property
    def theta(self) -> Float[Tensor, "inst sae d_sae"]:
        """JumpReLU thresholds exp(log_threshold)."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale the stored decoder rows to unit norm (keeps Adam's parameter scale steady)."""
        normalize_rows_(self.W_dec)

    def forward(self, h: Float[Tensor, "batch inst hidden"], *, inference: bool = False) -> SaeOutput:
        """Encode and decode a batch of activations with every SAE (``inference``: batchtopk uses its threshold)."""
        threshold = self.threshold if self.architecture == "batchtopk" else None
        return sae_forward(self.settings, self.params(), self.sparsity, batch_last(h), threshold, inference)

    def loss(self, h: Float[Tensor, "batch inst hidden"], out: SaeOutput | None = None) -> SaeLoss:
        """Per-SAE training loss: mse + lambda * penalty (+ the gated auxiliary term), batch-averaged."""
        return sae_loss(self.settings, self.params(), self.sparsity, batch_last(h), out)

    @torch.no_grad()
    def update_threshold_(self, kept_min: Tensor, momentum: float = 0.99) -> None:
        """batchtopk: fold one batch's smallest kept activation into the running inference threshold."""
        update_threshold_(self.threshold, kept_min, momentum)


# -- the forward pass and the loss, as functions of the parameters (the module and the fused step share them) ---------
class SaeSettings(NamedTuple):
    """What fixes the program of an SAE's forward pass and loss (everything else is a tensor)."""

    architecture: str
    tied: bool
    normalize: bool
    bandwidth: float


def decoder(s: SaeSettings, p: dict[str, Tensor]) -> Float[Tensor, "inst sae d_sae hidden"]:
    """Decoder rows as used in the forward pass (unit norm when the architecture keeps them so)."""
    w = p["W_dec"]
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12) if s.normalize else w


def encoder(s: SaeSettings, p: dict[str, Tensor]) -> Float[Tensor, "inst sae hidden d_sae"]:
    """W_enc, or the decoder's transpose when tied."""
    return decoder(s, p).transpose(-1, -2) if s.tied else p["W_enc"]


def normalize_rows_(w: Tensor) -> None:
    """Rescale the last-dimension rows of ``w`` to unit norm, in place."""
    w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def sae_forward(
    s: SaeSettings,
    p: dict[str, Tensor],
    sparsity: Float[Tensor, " sae"],
    h: Float[Tensor, "inst hidden batch"],
    threshold: Float[Tensor, "inst sae"] | None = None,
    inference: bool = False,
    mm: Callable[[Tensor, Tensor], Tensor] = torch.matmul,
) -> SaeOutput:
    """Encode and decode batch-last activations with every SAE (``inference``: batchtopk uses ``threshold``).

    ``mm`` is the batched product: torch.matmul here, fused multiply-sums in the compiled step (where a BLAS call
    on the strided tiny factors costs ~100x the work)."""
    x = h[:, None] - p["b_dec"][..., None]  # (inst, sae, hidden, batch)
    xw = mm(encoder(s, p).transpose(-1, -2), x)
    pre = xw + p["b_enc"][..., None]
    kept_min = None
    arch = s.architecture
    if arch == "relu":
        z = torch.relu(pre)
    elif arch == "topk":
        z = _top_per_sample(pre, sparsity.round().long())
    elif arch == "batchtopk":
        if inference:
            theta = torch.nan_to_num(threshold, nan=0.0)[..., None, None]
            z = torch.relu(pre) * (pre > theta).to(pre.dtype)
        else:
            z, kept_min = _top_per_batch(pre, sparsity)
    elif arch == "jumprelu":
        z = jumprelu(pre, p["log_threshold"].exp()[..., None], s.bandwidth)
    else:  # gated: the gate decides which latents fire, the magnitude path how strongly
        mag = xw * p["r_mag"].exp()[..., None] + p["b_mag"][..., None]
        z = (pre > 0).to(pre.dtype) * torch.relu(mag)
    recon = mm(decoder(s, p).transpose(-1, -2), z) + p["b_dec"][..., None]
    return SaeOutput(pre, z, recon, kept_min)


def sae_loss(
    s: SaeSettings,
    p: dict[str, Tensor],
    sparsity: Float[Tensor, " sae"],
    h: Float[Tensor, "inst hidden batch"],
    out: SaeOutput | None = None,
    mm: Callable[[Tensor, Tensor], Tensor] = torch.matmul,
) -> SaeLoss:
    """Per-SAE training loss on batch-last activations: mse + lambda * penalty (+ gated's auxiliary term)."""
    out = sae_forward(s, p, sparsity, h, mm=mm) if out is None else out
    target = h[:, None]  # (inst, 1, hidden, batch)
    mse = (out.recon - target).square().mean(-2)  # (inst, sae, batch)
    arch = s.architecture
    if arch == "relu":
        penalty = out.z.sum(-2)  # z >= 0, so this is the L1 norm
    elif arch == "jumprelu":
        penalty = step_function(out.pre, p["log_threshold"].exp()[..., None], s.bandwidth).sum(-2)
    elif arch == "gated":
        gate = torch.relu(out.pre)
        penalty = gate.sum(-2)
        frozen = mm(decoder(s, p).detach().transpose(-1, -2), gate) + p["b_dec"].detach()[..., None]
        mse_aux = (frozen - target).square().mean(-2)
    else:
        penalty = torch.zeros_like(mse)
    total = mse + sparsity[:, None] * penalty
    if arch == "gated":
        total = total + mse_aux
    return SaeLoss(total.mean(-1), mse.mean(-1), penalty.mean(-1), out)


def update_threshold_(threshold: Float[Tensor, "inst sae"], kept_min: Tensor, momentum: float = 0.99) -> None:
    """batchtopk: fold one batch's smallest kept activation into the running inference threshold, in place."""
    ok = torch.isfinite(kept_min)
    first = torch.isnan(threshold)
    mixed = momentum * threshold + (1 - momentum) * kept_min
    new = torch.where(first, kept_min, mixed)
    threshold.copy_(torch.where(ok, new, threshold))


def batch_last(h: Float[Tensor, "batch inst hidden"]) -> Float[Tensor, "inst hidden batch"]:
    return h.permute(1, 2, 0).contiguous()


def _top_per_sample(pre: Tensor, k: Tensor) -> Tensor:
    """ReLU of the k largest pre-activations of each sample (k per SAE), zero elsewhere.

    Written as a threshold (the k-th largest value of each sample, from one topk call) and a comparison, so that the
    compiled step stores the threshold once: a mask built inside the fused products is recomputed in each of their
    loops (4x slower at d_sae 5). An exact tie at the threshold keeps every tied latent."""
    kmax = int(k.max())
    vals = pre.detach().topk(kmax, dim=-2).values  # (inst, sae, kmax, batch), descending
    pick = (k - 1).clamp_min(0)[None, :, None, None].expand(pre.shape[0], -1, 1, pre.shape[-1])
    kth = vals.gather(-2, pick)  # (inst, sae, 1, batch)
    return torch.where(pre >= kth, torch.relu(pre), 0.0)


def _top_per_batch(pre: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU of the round(k * batch) largest pre-activations of the whole batch of each SAE, zero elsewhere, and the
    smallest positive kept value (NaN when none is positive). A threshold and a comparison, as :func:`_top_per_sample`
    (an exact tie at the threshold keeps every tied value)."""
    i, m, s, b = pre.shape
    flat = pre.detach().reshape(i, m, s * b)
    n_keep = (k * b).round().long().clamp(1, b * s)
    vals = flat.topk(int(n_keep.max()), dim=-1).values  # (inst, sae, kmax), descending
    kth = vals.gather(-1, (n_keep - 1)[None, :, None].expand(i, -1, 1))[..., None]  # (inst, sae, 1, 1)
    keep = pre >= kth
    z = torch.where(keep, torch.relu(pre), 0.0)
    positive = keep.detach() & (pre.detach() > 0)
    kept_min = torch.where(positive, pre.detach(), torch.inf).amin((-2, -1))
    return z, torch.where(torch.isinf(kept_min), torch.nan, kept_min)
