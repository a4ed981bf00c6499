"""Counter-based random numbers and the fused data draws: a keyed integer hash of (seed, step, element index),
the seed's stream keys, fresh feature-major batches (pairs, magnitudes, the binary tree), fixed training sets, and
the label of a batch."""

from __future__ import annotations

import functools
import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from superposition.fast.config import FastConfig

M32 = 0xFFFF_FFFF


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
