"""The fused forward pass, the loss and its output gradient, and the hand-derived backward pass of every model kind
(feature-major; tiny products written as fused multiply-sums)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from superposition.fast.config import SMALL_PRODUCT, FastConfig


# -- products -----------------------------------------------------------------------------------------------------
def batched_mm(a: Tensor, b: Tensor) -> Tensor:
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
    pre_h = batched_mm(enc, x)  # (inst, hidden, batch)
    if cfg.bias_hidden:
        pre_h = pre_h + params["b_hidden"][:, :, None]
    h = _act(cfg.activations[0], pre_h) if cfg.kind in ("neuron", "mlp") else pre_h
    pre_o = batched_mm(dec, h)  # (inst, feats, batch)
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
    dh = batched_mm(dec.transpose(-1, -2), dpre_o)  # (inst, hidden, batch)
    dpre_h = _act_grad(cfg.activations[0], pre_h, dh) if neurons else dh
    d_enc = batched_mm(dpre_h, x.transpose(-1, -2))  # (inst, hidden, feats)
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
        return batched_mm(h, dpre_o.transpose(-1, -2))
    return batched_mm(dpre_o, h.transpose(-1, -2)).transpose(-1, -2)


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
        pre = batched_mm(proj.transpose(-1, -2), coef)  # (inst, hidden, batch)
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
    out = batched_mm(readout.transpose(-1, -2), coef)  # (inst, feats, batch)
    loss, dout = _loss_grad(cfg, out, y, importance, alive)
    return Forward(loss, dout, (coef, readout, *saved))


def _residual_backward(
    cfg: FastConfig, params: dict[str, Tensor], fwd: Forward, w_e: Tensor | None
) -> dict[str, Tensor]:
    assert w_e is not None
    dout, (coef, readout, *saved) = fwd.grad_out, fwd.saved
    d_coef = batched_mm(readout, dout)  # (inst, k, batch)
    d_basis = torch.matmul(batched_mm(coef, dout.transpose(-1, -2)), w_e)  # (inst, k, embed)
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
        d_proj = batched_mm(coef_l, dpre.transpose(-1, -2))  # (inst, k, hidden)
        g_in.append(torch.matmul(d_proj.transpose(-1, -2), basis_l))  # (inst, hidden, embed)
        d_coef_l = batched_mm(proj, dpre)  # (inst, k, batch)
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
