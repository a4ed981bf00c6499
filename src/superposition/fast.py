"""The fast training engine: one fused step (sample, forward, hand-derived backward, Adam) compiled as a whole.

Everything a step needs is a pure tensor function of the model's parameters, the Adam moments and the step
number, so ``torch.compile`` turns the whole step into a few fused loops (and, on CUDA, one captured graph):

- **Counter-based random numbers.** Uniforms are a keyed integer hash of (seed, step, element index), computed
  inside the fused loops instead of materialised by ``torch.rand`` (which costs several ns per element on a CPU).
  The stream depends only on the seed and the step number, so a resumed run draws exactly the batches an
  uninterrupted one would, without any generator state. One uniform gives both the mask and the value of a
  feature: given u < p, u / p is uniform on [0, 1). The stream differs from the eager engine's ``torch.Generator``
  stream; its statistics are the same (tests/test_fast.py).
  The seed enters the compiled step as data (:func:`stream_keys`), so runs that differ only in their seed share
  one compiled program.
- **Feature-major layout.** Batches are drawn as (inst, feats, batch), so every fused loop runs long and
  vectorised along the batch and every product is a batched matmul over contiguous instances (no permute
  copies); products with a tiny contraction or output are written as broadcast-multiply-sums that the compiler
  fuses with their neighbours.
- **Hand-derived backward.** The model family is small; writing its gradients out avoids autograd's graph and
  lets the compiler fuse the backward with the forward and the optimiser.
- **Fused Adam/AdamW** with per-instance learning rate and weight decay, the schedule and bias corrections
  computed on the device from the step counter (the same formula as ``torch.optim.Adam``).

The functions here run uncompiled too (the tests check them that way); :class:`FastStepper` compiles them.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import shutil
import time
import types
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from superposition.spec import Experiment

__all__ = [
    "FastConfig",
    "FastStepper",
    "Grads",
    "fast_config",
    "choose_engine",
    "EngineChoice",
    "estimated_eager_seconds",
    "compile_available",
    "uniform",
    "sample",
    "loss_and_grads",
    "adam_update_",
    "schedule_multiplier",
    "train_step",
]

M32 = 0xFFFF_FFFF
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Products whose small factor (or output) has at most this many elements per instance are written as fused
# multiply-sums; larger ones go to the batched matmul kernels.
SMALL_PRODUCT = 128
# Steps with fewer batch elements (inst * feats * batch) than this run the compiled CPU loops on one thread.
PARALLEL_ELEMENTS = 1 << 22


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


def compile_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here (a C++ compiler on CPU, Triton on CUDA)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
    except Exception:  # noqa: BLE001 - an unusual torch build: no compiler
        return False
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class EngineChoice(NamedTuple):
    """Which engine trains an experiment, and why."""

    engine: str
    reason: str


# Rough cost model of one eager step, used only to decide whether compiling pays back under engine = "auto".
# It is a fixed function of the spec (never a timing), so the same spec always trains on the same engine and
# gives the same weights. CPU constants fitted loosely to benchmarks/throughput.py on a 2-core CPU (the reference
# loop's step times, docs/PERFORMANCE.md); the CUDA ones are estimates, not yet measured.
EAGER_STEP_OVERHEAD_S = {"cpu": 1.5e-3, "cuda": 1.0e-3}
EAGER_S_PER_ELEMENT = {"cpu": 3e-8, "cuda": 3e-11}
EAGER_FLOP_PER_S = {"cpu": 3e10, "cuda": 2e13}
COMPILE_SECONDS = {"cpu": 40.0, "cuda": 60.0}
# Fraction of the eager time that the fused step saves: measured 55% (B, D: matmul-bound) to 94% (C1).
FAST_SAVES = 0.75


def estimated_eager_seconds(spec: Experiment, device_type: str) -> float:
    """A deterministic estimate of the eager engine's training time for a spec on a device type."""
    dev = "cuda" if device_type == "cuda" else "cpu"
    m, inst, bs = spec.model, spec.n_instances, spec.train.batch_size
    bs = min(bs, spec.data.dataset_size or bs)  # a fixed training set smaller than a batch is the whole batch
    n, h = m.n_features, m.d_hidden
    elements = bs * inst * n
    if m.kind == "residual-mlp":
        k = n + m.n_layers * (h + 1)
        flops = 2 * bs * inst * k * (h + n) * m.n_layers * 3
    else:
        flops = 2 * bs * inst * n * h * 5
    per_step = EAGER_STEP_OVERHEAD_S[dev] + elements * EAGER_S_PER_ELEMENT[dev] + flops / EAGER_FLOP_PER_S[dev]
    return spec.train.steps * per_step


def choose_engine(spec: Experiment, device: torch.device) -> EngineChoice:
    """Resolve ``train.engine``: eager, fast (compiled), or fast-uncompiled (asked for fast without a compiler)."""
    asked = spec.train.engine
    if asked == "eager":
        return EngineChoice("eager", "asked for")
    can_compile = compile_available(device)
    if asked == "fast":
        if can_compile:
            return EngineChoice("fast", "asked for")
        return EngineChoice("fast-uncompiled", "asked for fast, but torch.compile has no compiler here")
    if not can_compile:
        return EngineChoice("eager", "torch.compile has no compiler here")
    eager_s = estimated_eager_seconds(spec, device.type)
    compile_s = COMPILE_SECONDS["cuda" if device.type == "cuda" else "cpu"]
    if FAST_SAVES * eager_s > 2 * compile_s:
        return EngineChoice("fast", f"~{eager_s:.0f} s eager; compiling (~{compile_s:.0f} s) pays back")
    return EngineChoice("eager", f"~{eager_s:.0f} s eager; too short for compiling (~{compile_s:.0f} s) to pay")


# -- counter-based random numbers ---------------------------------------------------------------------------------
def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply, 'lowbias32' constants) on int32 bit patterns.

    Multiplication wraps modulo 2^32; right shifts are made logical by masking off the sign extension.
    int32 rather than int64 lanes: twice as many per vector instruction.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * -0x7B935975  # 0x846CA68B as a signed 32-bit constant
    return x ^ ((x >> 16) & 0xFFFF)


def _as_int32(x: Tensor) -> Tensor:
    """An int64 tensor holding values in [0, 2^32) as the int32 tensor with the same bit pattern."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _mix32_int(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


# Random streams of a step (0 the features, 1-5 pairs and magnitudes, 6 the tree, 7 the training-set index).
N_STREAMS = 8


def _stream_key(seed: int, stream: int) -> tuple[int, int]:
    s1 = _mix32_int(seed * 0x9E3779B9 + stream * 0x632BE5AB + 0x5BD1E995)
    return s1, _mix32_int(s1 ^ (seed >> 32) ^ 0x27D4EB2F)


def stream_keys(seed: int, device: torch.device | str = "cpu") -> Int[Tensor, "stream 2"]:
    """The seed's two 32-bit keys per stream, as a tensor: the compiled step reads the seed as data, so runs that
    differ only in their seed share one compiled program (and Inductor's on-disk cache)."""
    return torch.tensor([_stream_key(seed, s) for s in range(N_STREAMS)], dtype=torch.int64, device=device)


def _keys(seed: int | Tensor, step: Tensor, stream: int) -> tuple[Tensor, Tensor]:
    """Two 32-bit keys for (seed, step, stream); the step enters through the hash, never as a plain offset.
    ``seed`` is the seed itself or its :func:`stream_keys` (the same numbers)."""
    if isinstance(seed, Tensor):
        s1, s2 = seed[stream, 0], _as_int32(seed[stream, 1])
    else:
        s1, s2 = _stream_key(seed, stream)
        s2 = s2 - (s2 >> 31 << 32)  # as a signed 32-bit constant
    k1 = _mix32(_as_int32((step.to(torch.int64) * 0x2545F491 + s1) & M32))
    k2 = _mix32(k1 ^ s2)
    return k1, k2


def uniform(
    shape: tuple[int, ...], seed: int | Tensor, step: Tensor, stream: int, device: torch.device | str = "cpu"
) -> Float[Tensor, "..."]:
    """Uniforms on [0, 1) as a keyed hash of each element's index: the same (seed, step, stream) gives the same numbers.

    Two rounds of a 32-bit mixer: the first over the element index xor a step key, the second keyed again, so
    batches of different steps never share values. The top 31 bits are scaled (not truncated to 24), so values near
    0 keep their resolution and u / p stays fine for small p.
    """
    n = math.prod(shape)
    k1, k2 = _keys(seed, step, stream)
    if n < 2**31:
        h = _mix32(torch.arange(n, dtype=torch.int32, device=device).view(shape) ^ k1)
        h = _mix32(h ^ k2)
    else:  # indices beyond 2^31: the high part enters the second round
        idx = torch.arange(n, dtype=torch.int64, device=device).view(shape)
        h = _mix32(_as_int32(idx & 0x7FFF_FFFF) ^ k1)
        h = _mix32(h ^ (_as_int32(idx >> 31) + k2))
    return (((h >> 1) & 0x7FFF_FFFF).to(torch.float32) * 2.0**-31).clamp_max(1.0 - 2.0**-24)


def _magnitude(cfg: FastConfig, v: Tensor, seed: int | Tensor, step: Tensor, stream: int) -> Tensor:
    """Map a uniform v on [0, 1) to the feature value law (uniform, signed, or clipped normal)."""
    if cfg.magnitude == "uniform":
        return v
    if cfg.magnitude == "signed":
        return v * 2 - 1
    # Box-Muller: v and a second uniform; 1 - v lies in (0, 1], so the log is finite.
    w = uniform(tuple(v.shape), seed, step, stream, v.device)
    z = torch.sqrt(-2.0 * torch.log1p(-v)) * torch.cos((2 * math.pi) * w)
    return (0.5 + 0.2 * z).clamp(0, 1)


def training_batch(
    cfg: FastConfig, tensors: dict[str, Tensor], step: Tensor, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "inst feats batch"]:
    """The batch of a step: fresh samples, or a fixed training set (all of it when it fits in a batch, else
    ``batch_size`` points drawn uniformly with replacement from the stream of ``step``, shared by the instances as in
    the eager engine)."""
    if not cfg.dataset_size:
        return sample(cfg, tensors["probability"], step, tensors["keys"], dtype)
    data = tensors["dataset"]  # (inst, feats, T)
    if cfg.dataset_size <= cfg.batch_size:
        return data.to(dtype)
    u = uniform((cfg.batch_size,), tensors["keys"], step, 7, data.device)
    idx = (u * cfg.dataset_size).long().clamp_max(cfg.dataset_size - 1)
    return data[:, :, idx].to(dtype)


def sample(
    cfg: FastConfig,
    probability: Float[Tensor, " inst"],
    step: Tensor,
    seed: int | Tensor,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "inst feats batch"]:
    """One training batch for every instance, feature-major (inst, feats, batch), from the stream of ``step``.

    Same law as :class:`superposition.data.Sampler` (column order: correlated pairs, anticorrelated pairs,
    independent features; or the binary tree with the root dropped), different random numbers. The batch is the
    innermost dimension so that every fused loop runs long and vectorised along it.
    """
    inst, bs, n, dev = probability.shape[0], cfg.batch_size, cfg.n_features, probability.device
    if cfg.data_kind == "hierarchy":
        x = _tree(cfg, inst, bs, seed, step, dev)
    else:
        p = probability.float()[:, None, None]
        u = uniform((inst, n, bs), seed, step, 0, dev)
        nc, na = cfg.n_correlated_pairs, cfg.n_anticorrelated_pairs
        parts = []
        if nc:
            # A pair shares one draw: both on when u < p; feature A's value is u / p, feature B draws its own.
            uc = u[:, : 2 * nc : 2]
            on = uc < p
            va = _magnitude(cfg, uc / p, seed, step, 2)
            vb = _magnitude(cfg, uniform((inst, nc, bs), seed, step, 1, dev), seed, step, 3)
            pair = torch.stack([torch.where(on, va, 0.0), torch.where(on, vb, 0.0)], dim=2)
            parts.append(pair.flatten(1, 2))
        if na:
            # One draw per pair: A when u < p (value u / p), B when p <= u < 2p (value (u - p) / p), never both.
            ua = u[:, 2 * nc : 2 * (nc + na) : 2]
            a, b = ua < p, (ua >= p) & (ua < 2 * p)
            v = _magnitude(cfg, torch.where(a, ua, ua - p) / p, seed, step, 4)
            pair = torch.stack([torch.where(a, v, 0.0), torch.where(b, v, 0.0)], dim=2)
            parts.append(pair.flatten(1, 2))
        if n - 2 * (nc + na):
            ui = u[:, 2 * (nc + na) :] if nc + na else u
            v = _magnitude(cfg, ui / p, seed, step, 5)
            parts.append(torch.where(ui < p, v, 0.0))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if cfg.normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x.to(dtype)


@functools.cache
def _tree_decisions(depth: int) -> tuple[tuple[list[int], list[bool], list[bool]], ...]:
    """For each level m = 1..depth, per feature (level by level, the root dropped): the internal node whose decision
    picks the feature's ancestor at level m, whether that ancestor is the upper child, and whether the feature has an
    ancestor at level m at all (features shallower than m do not; their entry is unused)."""
    out = []
    for m in range(1, depth + 1):
        node, upper, used = [], [], []
        for level in range(1, depth + 1):
            for k in range(2**level):
                anc = k >> (level - m) if level >= m else 0
                node.append(2 ** (m - 1) - 1 + (anc >> 1) if level >= m else 0)
                upper.append(bool(anc & 1) and level >= m)
                used.append(level >= m)
        out.append((node, upper, used))
    return tuple(out)


def _tree(cfg: FastConfig, inst: int, bs: int, seed: int | Tensor, step: Tensor, dev: torch.device) -> Tensor:
    # One uniform per internal node: node k of level l (the root is level 0) reads u[2^l - 1 + k]; its children are
    # nodes 2k (taken when u < half) and 2k + 1 (half <= u < 2 half) of level l + 1. A feature is on when every
    # decision on its path from the root chose it, so each feature is an AND of one gathered uniform per ancestor
    # level: one fused elementwise pass, where building the tree level by level (stack, flatten, cat) does not fuse.
    u = uniform((inst, 2**cfg.tree_depth - 1, bs), seed, step, 6, dev)
    half = 0.25 if cfg.early_stopping else 0.5
    on = None
    for node, upper, used in _tree_decisions(cfg.tree_depth):
        um = u[:, torch.tensor(node, device=dev)]
        chosen = (
            torch.where(torch.tensor(upper, device=dev)[:, None], (um >= half) & (um < 2 * half), um < half)
            | ~torch.tensor(used, device=dev)[:, None]
        )
        on = chosen if on is None else on & chosen
    return on.float()


def target(cfg: FastConfig, x: Tensor, residual_factor: Float[Tensor, " inst"]) -> Tensor:
    """The label of feature-major inputs (same rule as :func:`superposition.data.target_fn`)."""
    if cfg.target == "identity":
        return x
    if cfg.target == "abs":
        return x.abs()
    return torch.relu(x) + residual_factor[:, None, None].to(x.dtype) * x


# -- products -----------------------------------------------------------------------------------------------------
def _mm(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b over the instance dimension; products with a tiny factor as fused multiply-sums.

    With the batch innermost, a tiny left factor (weights times a batch) becomes a sum over a short outer loop,
    and a tiny output (a weight gradient, reduced over the batch) a vectorised reduction along the batch; the
    compiler fuses both with their neighbours, where a GEMM call per instance would cost more than its work.
    """
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if m * k <= SMALL_PRODUCT and k <= n:
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)  # (inst, m, k, 1) * (inst, 1, k, n), sum over k
    if m * n <= SMALL_PRODUCT and k > max(m, n):
        return (a.unsqueeze(-2) * b.transpose(-1, -2).unsqueeze(-3)).sum(-1)  # sum over the long k, innermost
    return torch.matmul(a, b)


def _act(name: str, pre: Tensor) -> Tensor:
    if name == "relu":
        return torch.relu(pre)
    if name == "gelu":
        return torch.nn.functional.gelu(pre)
    return pre


def _act_grad(name: str, pre: Tensor, grad: Tensor) -> Tensor:
    """grad * act'(pre), with the same conventions as autograd (ReLU' (0) = 0, exact GELU)."""
    if name == "relu":
        return torch.where(pre > 0, grad, 0.0)
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * pre * pre) * (1 / math.sqrt(2 * math.pi))
        return grad * (cdf + pre * pdf)
    return grad


# -- forward and hand-derived backward ----------------------------------------------------------------------------
class Grads(NamedTuple):
    """Per-instance loss and the gradient of the summed (alive) loss for every parameter."""

    loss: Float[Tensor, " inst"]
    grads: dict[str, Tensor]


class Forward(NamedTuple):
    """What the backward pass needs: the loss, its gradient at the model's output (before any output ReLU) and
    the saved activations. The compiled engine stores these between two graphs, so products that read them
    several times read memory instead of recomputing them."""

    loss: Float[Tensor, " inst"]
    grad_out: Float[Tensor, "inst feats batch"]
    saved: tuple[Tensor, ...]


def _loss_grad(cfg: FastConfig, out: Tensor, y: Tensor, importance: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
    """Per-instance loss mean_{feats,batch} I (y - out)^2 (or |.|) and its gradient w.r.t. out (dead instances: 0)."""
    err = out - y
    count = out.shape[1] * out.shape[2]
    imp = importance[:, :, None].to(out.dtype)
    scale = alive.to(out.dtype)[:, None, None] / count
    if cfg.loss == "l2":
        loss = (imp * err * err).float().sum(dim=(1, 2))
        dout = (2 * scale) * imp * err
    else:
        loss = (imp * err.abs()).float().sum(dim=(1, 2))
        dout = scale * imp * torch.sign(err)
    return loss / count, dout


def _decoder(cfg: FastConfig, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    enc = params["W"] if cfg.tied else params["W1"]  # (inst, hidden, feats)
    dec = params["W"].transpose(-1, -2) if cfg.tied else params["W2"]  # (inst, feats, hidden)
    return enc, dec


def forward(
    cfg: FastConfig,
    params: dict[str, Tensor],
    x: Float[Tensor, "inst feats batch"],
    y: Float[Tensor, "inst feats batch"],
    importance: Float[Tensor, "inst feats"],
    alive: Float[Tensor, " inst"],
    relu_out: Tensor,
    w_e: Tensor | None = None,
) -> Forward:
    """Forward pass, per-instance loss and the loss gradient at the output, feature-major."""
    if cfg.kind == "residual-mlp":
        return _residual_forward(cfg, params, x, y, importance, alive, w_e)
    enc, dec = _decoder(cfg, params)
    pre_h = _mm(enc, x)  # (inst, hidden, batch)
    if cfg.bias_hidden:
        pre_h = pre_h + params["b_hidden"][:, :, None]
    h = _act(cfg.activations[0], pre_h) if cfg.kind in ("neuron", "mlp") else pre_h
    pre_o = _mm(dec, h)  # (inst, feats, batch)
    if cfg.bias_out:
        pre_o = pre_o + params["b_final"][:, :, None]
    if cfg.kind == "linear":
        out = pre_o
    elif cfg.all_relu_out:
        out = torch.relu(pre_o)
    else:
        out = torch.where(relu_out[:, None, None], torch.relu(pre_o), pre_o)
    loss, dout = _loss_grad(cfg, out, y, importance, alive)
    if cfg.kind == "linear":
        dpre_o = dout
    elif cfg.all_relu_out:
        dpre_o = torch.where(pre_o > 0, dout, 0.0)
    else:
        dpre_o = torch.where(relu_out[:, None, None] & (pre_o <= 0), 0.0, dout)
    return Forward(loss, dpre_o, (pre_h,))


def backward(
    cfg: FastConfig,
    params: dict[str, Tensor],
    x: Float[Tensor, "inst feats batch"],
    fwd: Forward,
    w_e: Tensor | None = None,
) -> dict[str, Tensor]:
    """Hand-derived gradients of sum_i alive_i * loss_i for every parameter, from :func:`forward`'s result."""
    if cfg.kind == "residual-mlp":
        return _residual_backward(cfg, params, fwd, w_e)
    enc, dec = _decoder(cfg, params)
    dpre_o, (pre_h,) = fwd.grad_out, fwd.saved
    neurons = cfg.kind in ("neuron", "mlp")
    h = _act(cfg.activations[0], pre_h) if neurons else pre_h
    grads: dict[str, Tensor] = {}
    d_dec_t = _decoder_grad_t(h, dpre_o)  # (inst, hidden, feats)
    dh = _mm(dec.transpose(-1, -2), dpre_o)  # (inst, hidden, batch)
    dpre_h = _act_grad(cfg.activations[0], pre_h, dh) if neurons else dh
    d_enc = _mm(dpre_h, x.transpose(-1, -2))  # (inst, hidden, feats)
    if cfg.tied:
        grads["W"] = d_enc + d_dec_t
    else:
        grads["W1"] = d_enc
        grads["W2"] = d_dec_t.transpose(-1, -2)
    if cfg.bias_hidden:
        grads["b_hidden"] = dpre_h.sum(-1)
    if cfg.bias_out:
        grads["b_final"] = dpre_o.sum(-1)
    return grads


# Hidden widths from which the decoder gradient is computed as h @ dpre_o^T (see _decoder_grad_t).
WIDE_HIDDEN = 24


def _decoder_grad_t(h: Tensor, dpre_o: Tensor) -> Tensor:
    """The decoder's gradient, transposed: (inst, hidden, feats).

    Which orientation the BLAS is given matters. With a hidden layer wide enough to fill its register tiles,
    h @ dpre_o^T runs at 64 GFLOP/s on D's 20x400x30 where dpre_o @ h^T runs at 40 (one core, 7.9 against 12.5 ms).
    For narrow layers the plain form is as fast or faster (double descent's 1000x2 at T = 3000: 10.8 against
    13.9 ms), and it gives the numbers of the runs recorded before this choice was made (both orientations agree
    bit for bit on the 100x40 and 400x30 shapes, not on 1000x2 or 126x10).
    """
    if h.shape[-2] >= WIDE_HIDDEN:
        return _mm(h, dpre_o.transpose(-1, -2))
    return _mm(dpre_o, h.transpose(-1, -2)).transpose(-1, -2)


def loss_and_grads(
    cfg: FastConfig,
    params: dict[str, Tensor],
    x: Float[Tensor, "inst feats batch"],
    y: Float[Tensor, "inst feats batch"],
    importance: Float[Tensor, "inst feats"],
    alive: Float[Tensor, " inst"],
    relu_out: Tensor,
    w_e: Tensor | None = None,
) -> Grads:
    """Forward pass and hand-derived gradients of sum_i alive_i * loss_i for every model kind (feature-major)."""
    fwd = forward(cfg, params, x, y, importance, alive, relu_out, w_e)
    return Grads(fwd.loss, backward(cfg, params, x, fwd, w_e))


def _residual_forward(
    cfg: FastConfig,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    importance: Tensor,
    alive: Tensor,
    w_e: Tensor | None,
) -> Forward:
    """Residual MLP in coefficient space: the stream is basis^T @ coef with few known basis rows.

    r_0 = x W_E is held as (coef = x, basis = W_E); each layer appends its activations to coef and its output
    directions (W_out columns, b_out) to basis. Every batch-sized product then runs in (feats + layers * neurons)
    space; only (rows, d_embed) products touch d_embed. The backward retraces the same bookkeeping.
    """
    assert w_e is not None
    coef, basis = x, w_e  # (inst, k, batch), (inst, k, embed)
    saved: list[Tensor] = []
    for layer, act in enumerate(cfg.activations):
        w_in = params["W_in"][:, layer]  # (inst, hidden, embed)
        proj = torch.matmul(basis, w_in.transpose(-1, -2))  # (inst, k, hidden)
        pre = _mm(proj.transpose(-1, -2), coef)  # (inst, hidden, batch)
        if cfg.bias_hidden:
            pre = pre + params["b_in"][:, layer, :, None]
        a = _act(act, pre)
        rows = params["W_out"][:, layer].transpose(-1, -2)  # (inst, hidden, embed)
        if cfg.bias_out:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
            rows = torch.cat([rows, params["b_out"][:, layer, None, :]], dim=1)
        saved += [coef, basis, proj, pre]
        if cfg.skip:
            coef, basis = torch.cat([coef, a], dim=1), torch.cat([basis, rows], dim=1)
        else:
            coef, basis = a, rows
    readout = torch.matmul(basis, w_e.transpose(-1, -2))  # (inst, k, feats)
    out = _mm(readout.transpose(-1, -2), coef)  # (inst, feats, batch)
    loss, dout = _loss_grad(cfg, out, y, importance, alive)
    return Forward(loss, dout, (coef, readout, *saved))


def _residual_backward(
    cfg: FastConfig, params: dict[str, Tensor], fwd: Forward, w_e: Tensor | None
) -> dict[str, Tensor]:
    assert w_e is not None
    dout, (coef, readout, *saved) = fwd.grad_out, fwd.saved
    d_coef = _mm(readout, dout)  # (inst, k, batch)
    d_basis = torch.matmul(_mm(coef, dout.transpose(-1, -2)), w_e)  # (inst, k, embed)
    g_in, g_out, g_bin, g_bout = [], [], [], []
    for layer in reversed(range(len(cfg.activations))):
        coef_l, basis_l, proj, pre = saved[4 * layer : 4 * layer + 4]
        k_prev = coef_l.shape[1] if cfg.skip else 0
        h = pre.shape[1]
        da, d_rows = d_coef[:, k_prev : k_prev + h], d_basis[:, k_prev:]
        g_out.append(d_rows[:, :h].transpose(-1, -2))  # (inst, embed, hidden)
        if cfg.bias_out:
            g_bout.append(d_rows[:, h])
        dpre = _act_grad(cfg.activations[layer], pre, da)
        if cfg.bias_hidden:
            g_bin.append(dpre.sum(-1))
        d_proj = _mm(coef_l, dpre.transpose(-1, -2))  # (inst, k, hidden)
        g_in.append(torch.matmul(d_proj.transpose(-1, -2), basis_l))  # (inst, hidden, embed)
        d_coef_l = _mm(proj, dpre)  # (inst, k, batch)
        d_basis_l = torch.matmul(d_proj, params["W_in"][:, layer])  # (inst, k, embed)
        if cfg.skip:
            d_coef_l = d_coef_l + d_coef[:, :k_prev]
            d_basis_l = d_basis_l + d_basis[:, :k_prev]
        d_coef, d_basis = d_coef_l, d_basis_l
    grads = {"W_in": torch.stack(g_in[::-1], dim=1), "W_out": torch.stack(g_out[::-1], dim=1)}
    if cfg.bias_hidden:
        grads["b_in"] = torch.stack(g_bin[::-1], dim=1)
    if cfg.bias_out:
        grads["b_out"] = torch.stack(g_bout[::-1], dim=1)
    return grads


# -- optimiser ----------------------------------------------------------------------------------------------------
def schedule_multiplier(cfg: FastConfig, step: Tensor) -> Tensor:
    """The learning-rate factor of a 0-based step, on the device (same values as train.lr_multiplier)."""
    t = step.to(torch.float64)
    if cfg.schedule == "constant":
        return torch.ones_like(t)
    if cfg.schedule == "linear":
        return 1.0 - t / cfg.steps
    if cfg.schedule == "cosine":
        return torch.cos(t * (math.pi / (2 * max(cfg.steps - 1, 1))))
    warm = max(cfg.warmup_steps, 1)
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    cos = 0.5 * (1 + torch.cos((t - cfg.warmup_steps) * (math.pi / span)))
    return torch.where(t < cfg.warmup_steps, (t + 1) / warm, cos)


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


# -- the whole step -----------------------------------------------------------------------------------------------
def _compute(cfg: FastConfig, params: dict[str, Tensor], tensors: dict[str, Tensor]) -> tuple[dict, Tensor | None]:
    """The parameters (and the embedding) in the compute dtype: float32 master weights, cast by each compiled graph
    that reads them (the forward and the update graph)."""
    w_e = tensors.get("W_E")
    if cfg.compute_dtype == torch.float32:
        return params, w_e
    cast = {k: v.to(cfg.compute_dtype) for k, v in params.items()}
    return cast, (w_e.to(cfg.compute_dtype) if w_e is not None else None)


def forward_step(cfg: FastConfig, params: dict[str, Tensor], tensors: dict[str, Tensor], x: Tensor) -> Forward:
    """The forward half of a step on a drawn batch: loss, output gradient, saved activations."""
    y = target(cfg, x, tensors["residual_factor"])
    p, w_e = _compute(cfg, params, tensors)
    return forward(cfg, p, x, y, tensors["importance"], tensors["alive"], tensors["relu_out"], w_e)


def update_step(
    cfg: FastConfig,
    params: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: Tensor,
    tensors: dict[str, Tensor],
    x: Tensor,
    fwd: Forward,
) -> None:
    """The second half: gradients from the forward result, then Adam in place (float32), then ``step += 1``."""
    p, w_e = _compute(cfg, params, tensors)
    grads = backward(cfg, p, x, fwd, w_e)
    lr = tensors["lr"].to(torch.float64) * schedule_multiplier(cfg, step)
    adam_update_(params, grads, exp_avg, exp_avg_sq, step, lr, tensors["weight_decay"], cfg.decoupled)
    step.add_(1)


def train_step(
    cfg: FastConfig,
    params: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: Tensor,
    tensors: dict[str, Tensor],
) -> Float[Tensor, " inst"]:
    """One whole step in place: sample, forward, backward, Adam; increments ``step``; returns the per-instance loss.

    ``tensors`` holds probability, importance, lr, weight_decay, residual_factor, alive, relu_out, keys (the seed's
    :func:`stream_keys`), and W_E and dataset where the experiment has them.
    """
    return _step_with_batch(cfg, params, exp_avg, exp_avg_sq, step, tensors)[1].loss


def _step_with_batch(
    cfg: FastConfig,
    params: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: Tensor,
    tensors: dict[str, Tensor],
) -> tuple[Tensor, Forward]:
    """:func:`train_step`, returning the batch and the forward result as well."""
    x = training_batch(cfg, tensors, step, cfg.compute_dtype)
    fwd = forward_step(cfg, params, tensors, x)
    update_step(cfg, params, exp_avg, exp_avg_sq, step, tensors, x, fwd)
    return x, fwd


_CODE_TAGS = itertools.count()


def _own_code(fn):
    """``fn`` with a code object of its own: dynamo keeps its compiled graphs per code object (at most 8), and
    every stepper's closures would otherwise share one, so a sweep of many shapes would fall back to eager."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_CODE_TAGS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# torch.compile takes a guard filter from torch 2.8 on; older versions (pyproject allows 2.3) keep their guards.
GUARD_FILTER = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)


def _no_guards(entries) -> list[bool]:
    """Drop every guard of a stepper's compiled graphs: dynamo re-checks each input tensor's metadata on every call
    (~20 us of a 0.27 ms step on config A). Nothing they check can change: each stepper compiles code objects of its
    own (:func:`_own_code`), specialised to one FastConfig, and only :meth:`FastStepper.__call__` calls them, with
    the same TrainState's dicts (fixed keys, shapes, dtypes, device; checkpoint loads copy in place), under no_grad."""
    return [False] * len(entries)


def single_graph(spec: Experiment) -> bool:
    """Whether the compiled step is one graph rather than three (draw, forward, update): for models whose every
    product is a fused loop (no BLAS call, see :func:`_mm`), the step is mostly the fixed cost of calling its graphs,
    and one graph that returns the batch, the output gradient and the activations (so the compiler stores each once)
    is faster: A (7x10x5) 0.196 against 0.244 ms per step, C1 (400x2x1) 1.15 against 1.3 ms, the same numbers bit
    for bit. Larger models keep three graphs (see FastStepper._function)."""
    m = spec.model
    return m.kind != "residual-mlp" and m.n_features * m.d_hidden <= SMALL_PRODUCT


def compiled_threads(spec: Experiment) -> int:
    """Threads for the compiled CPU loops: one for small steps (a parallel region's barriers cost more than they
    save there, and far more on a busy machine), all of torch's threads for large ones."""
    elements = spec.n_instances * spec.model.n_features * spec.train.batch_size
    return 1 if elements < PARALLEL_ELEMENTS else 0


class FastStepper:
    """Runs :func:`train_step` compiled (and on CUDA replayed as one captured graph) against a TrainState.

    The stepper reads the state's tensors at every call, so checkpoint loads and dropped instances (which the
    state applies in place) are seen. A compiled stepper belongs to one state: its graphs run unguarded
    (:func:`_no_guards`), so it must always be called with dicts of the same keys, shapes, dtypes and device.
    ``compile=False`` runs the same functions eagerly (tests, no compiler).
    """

    def __init__(self, spec: Experiment, *, compile: bool = True, cuda_graph: bool = True, threads: int | None = None):
        self.cfg = fast_config(spec)
        self.compile = compile
        self.cuda_graph = cuda_graph
        self.threads = threads if threads is not None else compiled_threads(spec)
        self.compile_seconds = 0.0
        self._fn = None
        self._graph = None
        self._graph_key: tuple[int, ...] | None = None
        self._graph_loss: Tensor | None = None
        self._step: Tensor | None = None
        self._device_step = -1
        self._calls = 0
        self.graphs: tuple = ()
        self.single_graph = single_graph(spec)
        self.fallback = ""  # why compiling failed, when it did

    def _function(self):
        if self._fn is None:
            cfg = self.cfg
            if not self.compile:

                def step_fn(params, exp_avg, exp_avg_sq, step, tensors):
                    return train_step(cfg, params, exp_avg, exp_avg_sq, step, tensors)

                self._fn = step_fn
                return step_fn

            opts = {"cpp.threads": self.threads} if self.threads else {}
            if GUARD_FILTER:
                opts["guard_filter_fn"] = _no_guards

            def build(f):  # a fresh options dict per call: torch.compile pops guard_filter_fn from it
                return torch.compile(_own_code(f), fullgraph=True, dynamic=False, options=dict(opts))

            if self.single_graph:

                def whole(params, exp_avg, exp_avg_sq, step, tensors):
                    x, fwd = _step_with_batch(cfg, params, exp_avg, exp_avg_sq, step, tensors)
                    return fwd.loss, x, fwd.grad_out, fwd.saved  # returned so that the compiler stores them once

                whole_c = build(whole)
                self.graphs = (whole_c,)
                self._fn = lambda params, exp_avg, exp_avg_sq, step, tensors: whole_c(
                    params, exp_avg, exp_avg_sq, step, tensors
                )[0]
                return self._fn

            def draw(tensors, step, dtype):
                return training_batch(cfg, tensors, step, dtype)

            def fwd_fn(params, tensors, x):
                return tuple(forward_step(cfg, params, tensors, x))

            def upd_fn(params, exp_avg, exp_avg_sq, step, tensors, x, loss, grad_out, saved):
                update_step(cfg, params, exp_avg, exp_avg_sq, step, tensors, x, Forward(loss, grad_out, saved))

            # Three graphs, so that the batch, the output gradient and the activations are stored once: inside one
            # graph the compiler inlines them into the products that read them (BLAS products included: their
            # epilogues), recomputing them; measured 1.5x slower on D even with them returned as outputs.
            draw_c, fwd_c, upd_c = (build(f) for f in (draw, fwd_fn, upd_fn))
            self.graphs = (draw_c, fwd_c, upd_c)

            def compiled(params, exp_avg, exp_avg_sq, step, tensors):
                x = draw_c(tensors, step, cfg.compute_dtype)
                loss, grad_out, saved = fwd_c(params, tensors, x)
                upd_c(params, exp_avg, exp_avg_sq, step, tensors, x, loss, grad_out, saved)
                return loss

            self._fn = compiled
        return self._fn

    def __call__(
        self,
        params: dict[str, Tensor],
        exp_avg: dict[str, Tensor],
        exp_avg_sq: dict[str, Tensor],
        step: int,
        tensors: dict[str, Tensor],
    ) -> Float[Tensor, " inst"]:
        """Take the step numbered ``step`` (0-based) in place; returns the per-instance loss."""
        device = next(iter(params.values())).device
        if self._step is None or self._step.device != device:
            self._step = torch.zeros((), dtype=torch.int64, device=device)
            self._device_step = -1  # the value the device counter holds, when known
        with torch.no_grad():
            if self._graph is not None and self._key(params, exp_avg, exp_avg_sq, tensors) == self._graph_key:
                if self._device_step != step:
                    self._step.fill_(step)
                self._graph.replay()
                self._device_step = step + 1
                return self._graph_loss
            if self._device_step != step:  # the device counter already holds ``step`` after a step in sequence
                self._step.fill_(step)
            start = time.perf_counter()
            if self._calls or not self.compile:
                loss = self._function()(params, exp_avg, exp_avg_sq, self._step, tensors)
            else:
                loss = self._first_compiled_call(params, exp_avg, exp_avg_sq, tensors)
            self._device_step = step + 1
            if not self._calls and self.compile:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.compile_seconds = time.perf_counter() - start
            self._calls += 1
            if device.type == "cuda" and self.cuda_graph and self.compile:
                self._capture(params, exp_avg, exp_avg_sq, tensors, step + 1)
            return loss

    def _first_compiled_call(self, params, exp_avg, exp_avg_sq, tensors) -> Tensor:
        """Compile and take the first step; if compiling fails (building the compiled functions included), go on
        with the same functions uncompiled.

        Nothing is written before the last graph runs, so a failure leaves the state as it was. Importing the
        compiler raises torch-internal DeprecationWarnings (and it gives tuning hints as UserWarnings), which must
        not fail a caller that treats warnings as errors.
        """
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)  # the compiler's tuning hints (e.g. TF32 on CUDA)
                return self._function()(params, exp_avg, exp_avg_sq, self._step, tensors)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the uncompiled step is the same math
            self.fallback = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            self.compile, self._fn = False, None
            return self._function()(params, exp_avg, exp_avg_sq, self._step, tensors)

    @staticmethod
    def _key(params, exp_avg, exp_avg_sq, tensors) -> tuple[int, ...]:
        return tuple(t.data_ptr() for d in (params, exp_avg, exp_avg_sq, tensors) for t in d.values())

    def _capture(self, params, exp_avg, exp_avg_sq, tensors, next_step: int) -> None:
        """Record one compiled step as a CUDA graph (its kernels do not run while recorded)."""
        try:
            fn = self._function()
            graph = torch.cuda.CUDAGraph()
            # Warm the compiled function on a side stream on copies, so the state is not advanced.
            copies = [{k: v.clone() for k, v in d.items()} for d in (params, exp_avg, exp_avg_sq)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                scratch = self._step.clone()
                fn(*copies, scratch, tensors)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                loss = fn(params, exp_avg, exp_avg_sq, self._step, tensors)
            self._graph, self._graph_loss = graph, loss
            self._graph_key = self._key(params, exp_avg, exp_avg_sq, tensors)
            self._device_step = next_step
            self._step.fill_(next_step)
        except Exception:  # noqa: BLE001 - graphs are an optimisation: keep the plain compiled step
            self.cuda_graph = False
            self._graph = None
            self._step.fill_(next_step)
            self._device_step = next_step
