"""Fitting SAEs: the training loop on fresh toy-model activations, and resampling of dead latents."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from superposition.data import make_sampler
from superposition.fast import stream_keys
from superposition.models import ToyModel
from superposition.progress import Progress, make_bar
from superposition.sae.fast import (
    SAE_PARALLEL_ELEMENTS,
    SaeStatic,
    SaeStepper,
    choose_sae_engine,
    sae_data_config,
    sae_step,
)
from superposition.sae.model import SparseAutoencoder, batch_last
from superposition.spec import Experiment, SaeSpec
from superposition.train import AdamState, TrainingDiverged

__all__ = ["Fitted", "duplicate_latents", "fit_sae", "resample_dead_"]


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
        err = (sae(h).recon - batch_last(h)[:, None]).square().sum(-2)  # (inst, sae, batch)
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


def duplicate_latents(
    decoder: Float[Tensor, "inst sae d_sae hidden"], dead: Bool[Tensor, "inst sae d_sae"], threshold: float
) -> Bool[Tensor, "inst sae d_sae"]:
    """Live latents whose decoder row has cosine above ``threshold`` with an earlier live latent's row: two latents
    on one direction, which fire and are therefore never dead, while a feature elsewhere goes unrecovered."""
    unit = decoder / decoder.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.transpose(-1, -2)  # (inst, sae, d_sae, d_sae)
    s = cos.shape[-1]
    earlier = torch.ones(s, s, dtype=torch.bool, device=cos.device).triu(1)  # [i, j]: i < j
    live = ~dead
    pair = (cos > threshold) & earlier & live[..., :, None] & live[..., None, :]
    return pair.any(-2)


# -- training -------------------------------------------------------------------------------------------------------
class Fitted(NamedTuple):
    """What :func:`fit_sae` returns: the long history and resampling tables, and the wall time."""

    history: pd.DataFrame
    resamples: pd.DataFrame
    seconds: float
    engine: str = "eager"
    """The engine that took the steps (fast, fast-uncompiled or eager)."""
    compile_seconds: float = 0.0
    """Of ``seconds``, the first step's compiling (fast engine)."""


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
    progress: Progress = None,
) -> Fitted:
    """Train every SAE on fresh activations ``toy.hidden(x)``, x from the run's own data distribution.

    Adam (per-instance lr, as the toy models), decoder renormalised after each step where the architecture needs
    it, dead latents (not fired in ``resample_window`` steps) resampled every ``resample_every`` steps. The step
    is :func:`superposition.sae.fast.sae_step`, fused and compiled or plain (``spec.engine``, see
    :func:`~superposition.sae.fast.choose_sae_engine`); the engine used is in ``Fitted.engine``.
    """
    dev = sae.W_dec.device
    sampler = make_sampler(run_spec, dev, torch.float32)  # resampling's inputs (outside the hot loop)
    gen = torch.Generator(device=dev)
    gen.manual_seed(spec.seed * 7919 + 104_729)
    inst, m, s = sae.n_instances, sae.n_sae, sae.d_sae
    choice = choose_sae_engine(spec, inst, m, dev)
    eager = choice.engine == "eager"
    live = dict(sae.named_parameters())
    params = live if eager else {k: v.detach() for k, v in live.items()}  # views: the fused step updates in place
    adam = AdamState.zeros_like({k: v.detach() for k, v in live.items()})
    counters = {"since": torch.zeros((inst, m, s), dtype=torch.long, device=dev)}
    if sae.architecture == "batchtopk":
        counters["threshold"] = sae.threshold
    state = (params, adam.exp_avg, adam.exp_avg_sq, counters)
    tensors = {
        "sparsity": sae.sparsity,
        "lr": torch.full((inst,), spec.lr, device=dev),
        "weight_decay": torch.zeros(inst, device=dev),
        "probability": sampler.probability,
        "keys": stream_keys(spec.seed * 7919 + 104_729, dev),
    }
    warmup = max(1, spec.steps // 20) if spec.schedule == "warmup-cosine" else 0
    static = SaeStatic(sae.settings, sae_data_config(run_spec, spec), toy, spec.schedule, spec.steps, warmup)
    stepper = None
    if not eager:
        threads = 1 if inst * m * s * spec.batch_size < SAE_PARALLEL_ELEMENTS else 0
        stepper = SaeStepper(static, compile=choice.engine == "fast", threads=threads)
    step_t = torch.zeros((), dtype=torch.int64, device=dev)
    methods = [g["resample_method"] for g in sae.grid]
    resampling = torch.tensor([r != "none" for r in methods], device=dev)
    loss_weighted = torch.tensor([r == "loss-weighted" for r in methods], device=dev)
    toy.eval()
    history: list[dict[str, np.ndarray]] = []
    resamples: list[dict[str, np.ndarray]] = []
    bar = make_bar(progress, total=spec.steps, desc=f"sae {sae.architecture} [{choice.engine}]", unit="step")
    start = time.perf_counter()
    with torch.no_grad():
        for step in range(spec.steps):
            if stepper is None:
                step_t.fill_(step)
                out = sae_step(static, state, step_t, tensors, functional=False)
            else:
                out = stepper(state, step, tensors)
            done = step + 1
            if step % spec.log_every == 0 or done == spec.steps:
                if not bool(torch.isfinite(out.total).all()):
                    bad = (~torch.isfinite(out.total)).any(-1).nonzero().flatten().tolist()
                    raise TrainingDiverged(step, bad)
                row = {
                    "loss": out.total.cpu().double().numpy(),
                    "mse": out.mse.cpu().double().numpy(),
                    "l0": out.l0.cpu().double().numpy(),
                    "dead": (counters["since"] >= spec.resample_window).sum(-1).cpu().numpy().astype(np.int64),
                }
                history.append(_long(step, row))
                if bar is not None:  # means over instances and SAE settings
                    bar.set_postfix_str(
                        f"loss={row['loss'].mean():.3g} L0={row['l0'].mean():.3g} dead={row['dead'].mean():.3g}"
                    )
            if spec.resample_every and done % spec.resample_every == 0 and done < spec.steps:
                dead = counters["since"] >= spec.resample_window
                if spec.resample_duplicates is not None:
                    dead |= duplicate_latents(sae.decoder.detach(), dead, spec.resample_duplicates)
                dead &= resampling[None, :, None]
                if bool(dead.any()):
                    fresh = toy.hidden(sampler.sample(spec.batch_size, gen)).float()
                    n = resample_dead_(sae, adam, dead, loss_weighted, fresh, gen, spec.resample_scale)
                    counters["since"].masked_fill_(dead, 0)
                    resamples.append(_long(done, {"resampled": n.cpu().numpy().astype(np.int64)}))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    engine = choice.engine
    if stepper is not None and choice.engine == "fast" and not stepper.compile:
        engine = f"fast-uncompiled (torch.compile failed: {stepper.fallback})"
    return Fitted(
        _frame(history, ["step", "instance", "sae", "loss", "mse", "l0", "dead"]),
        _frame(resamples, ["step", "instance", "sae", "resampled"]),
        seconds,
        engine,
        stepper.compile_seconds if stepper is not None else 0.0,
    )
