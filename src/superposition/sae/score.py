"""Grading SAEs against the features the toy model was built from, and the per-setting summary of the scores.

The true features of a toy model are the hidden-layer responses to each feature alone (:func:`true_directions`):
for the bottleneck models the columns W_i of the encoder, for neuron models ReLU(W_i x_i + b) - ReLU(b) averaged
over the feature's magnitudes (with zero bias the positive part ReLU(W_i)); signed inputs give one direction for
each sign, because a ReLU layer maps +x_i and -x_i to different directions.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from superposition.data import make_sampler
from superposition.models import ToyModel
from superposition.sae.model import SparseAutoencoder, batch_last
from superposition.spec import SAE_SPARSITY_FIELD, Experiment, SaeSpec

__all__ = [
    "TrueDirections",
    "Scores",
    "true_directions",
    "score_sae",
    "summary_table",
    "SUMMARY_COLUMNS",
    "EVAL_ELEMENTS",
]


EVAL_ELEMENTS = 2**24  # largest (inst, sae, d_sae, batch) activation block scored at once


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
        sq_err += (out.recon - batch_last(h)[:, None]).double().square().sum((2, 3))
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


# -- summary --------------------------------------------------------------------------------------------------------


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
