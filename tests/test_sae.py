"""Sparse autoencoders: forward passes against their formulas, the JumpReLU pseudo-gradient against finite differences
of the kernel-smoothed loss, resampling, ground-truth scores, recovery on a pentagon, the SAE folder and the CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from superposition.cli import main
from superposition.models import build_model
from superposition.runs import Run, load_run, run_saes, save_run, train
from superposition.sae import (
    SaeFormatError,
    SparseAutoencoder,
    fit_sae,
    jumprelu,
    load_sae,
    load_sae_spec,
    resample_dead_,
    sae_grid,
    score_sae,
    step_function,
    true_directions,
)
from superposition.sae_report import run_sae_sections
from superposition.spec import SaeSpec, SpecError, load_spec, parse_spec
from superposition.train import AdamState

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_(sae: SparseAutoencoder, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name in ("b_enc", "b_mag", "r_mag") else 1.0))
        if sae.architecture == "jumprelu":
            sae.log_threshold.copy_(torch.log(torch.rand(sae.log_threshold.shape, generator=g) * 0.5 + 0.05))


def _naive(sae: SparseAutoencoder, h: torch.Tensor, inference: bool = False):
    """Reference forward, one (instance, SAE) pair and one sample at a time, straight from the formulas."""
    B = h.shape[0]
    inst, m, s, d = sae.n_instances, sae.n_sae, sae.d_sae, sae.d_in
    Z = torch.zeros(inst, m, s, B)
    R = torch.zeros(inst, m, d, B)
    P = torch.zeros(inst, m, s, B)
    for i in range(inst):
        for j in range(m):
            W_dec = sae.W_dec[i, j]
            if sae.normalize:
                W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
            W_enc = W_dec.T if sae.tied else sae.W_enc[i, j]
            pre = torch.stack([(h[b, i] - sae.b_dec[i, j]) @ W_enc + sae.b_enc[i, j] for b in range(B)])  # (B, s)
            lam = float(sae.sparsity[j])
            if sae.architecture == "relu":
                z = torch.relu(pre)
            elif sae.architecture == "topk":
                z = torch.zeros_like(pre)
                for b in range(B):
                    order = torch.argsort(pre[b], descending=True)[: round(lam)]
                    z[b, order] = torch.relu(pre[b, order])
            elif sae.architecture == "batchtopk":
                if inference:
                    theta = float(sae.threshold[i, j])
                    z = torch.where(pre > theta, torch.relu(pre), torch.zeros_like(pre))
                else:
                    flat = pre.flatten()
                    keep = torch.argsort(flat, descending=True)[: round(lam * B)]
                    out = torch.zeros_like(flat)
                    out[keep] = torch.relu(flat[keep])
                    z = out.reshape(B, s)
            elif sae.architecture == "jumprelu":
                theta = sae.log_threshold[i, j].exp()
                z = torch.where(pre > theta, pre, torch.zeros_like(pre))
            else:
                mag = torch.stack([(h[b, i] - sae.b_dec[i, j]) @ W_enc for b in range(B)]) * sae.r_mag[i, j].exp()
                z = (pre > 0).float() * torch.relu(mag + sae.b_mag[i, j])
            recon = z @ W_dec + sae.b_dec[i, j]
            Z[i, j], R[i, j], P[i, j] = z.T, recon.T, pre.T
    return P, Z, R


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_formula(arch, tied):
    sparsity = {
        "relu": {"l1_coefficient": [0.1, 0.5]},
        "gated": {"l1_coefficient": [0.1, 0.5]},
        "jumprelu": {"l0_coefficient": [0.01, 0.1]},
        "topk": {"k": [1, 3]},
        "batchtopk": {"batch_k": [0.5, 2.0]},
    }
    spec = SaeSpec(architecture=arch, d_sae=6, tied=tied, **sparsity[arch])
    sae = SparseAutoencoder(spec, arch, n_instances=3, d_in=4)
    _randomize_(sae)
    h = torch.randn(9, 3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = sae(h)
        P, Z, R = _naive(sae, h)
        torch.testing.assert_close(out.pre, P, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.z, Z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.recon, R, rtol=1e-5, atol=1e-5)
        # The loss: batch mean of mean_d (h' - h)^2 + lambda * penalty (+ the gated auxiliary reconstruction).
        loss = sae.loss(h)
        mse = (R - h.permute(1, 2, 0)[:, None]).square().mean(2).mean(-1)
        torch.testing.assert_close(loss.mse, mse, rtol=1e-5, atol=1e-6)
        lam = sae.sparsity[None, :]
        if arch == "relu":
            expected = mse + lam * Z.sum(2).mean(-1)
        elif arch == "jumprelu":
            expected = mse + lam * (sae.log_threshold.exp()[..., None] < P).float().sum(2).mean(-1)
        elif arch == "gated":
            gate = torch.relu(P)
            dec = sae.decoder
            aux = torch.matmul(dec.transpose(-1, -2), gate) + sae.b_dec[..., None] - h.permute(1, 2, 0)[:, None]
            expected = mse + lam * gate.sum(2).mean(-1) + aux.square().mean(2).mean(-1)
        else:
            expected = mse
        torch.testing.assert_close(loss.total, expected, rtol=1e-5, atol=1e-6)
        if arch == "batchtopk":
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=torch.Generator().manual_seed(3)))
            out = sae(h, inference=True)
            P, Z, R = _naive(sae, h, inference=True)
            torch.testing.assert_close(out.z, Z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.recon, R, rtol=1e-5, atol=1e-5)
        if arch == "topk":  # exactly k latents may be active per sample
            assert int((Z > 0).sum(2).max()) <= 3


def test_batchtopk_keeps_k_per_sample_on_average_and_tracks_threshold():
    spec = SaeSpec(architecture="batchtopk", d_sae=8, batch_k=[1.5, 3.0])
    sae = SparseAutoencoder(spec, "batchtopk", 2, 5)
    _randomize_(sae)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: exactly round(k * batch) entries are kept
        out = sae(torch.randn(64, 2, 5))
        counts = (out.z > 0).sum((2, 3)).float() / 64
        torch.testing.assert_close(counts, torch.tensor([[1.5, 3.0], [1.5, 3.0]]))
        kept = torch.where(out.z > 0, out.z, torch.full_like(out.z, float("inf"))).amin((2, 3))
        torch.testing.assert_close(out.kept_min, kept)
        sae.update_threshold_(out.kept_min)
        torch.testing.assert_close(sae.threshold, kept)  # the first batch sets it
        sae.update_threshold_(torch.zeros_like(kept))
        torch.testing.assert_close(sae.threshold, 0.99 * kept)


# -- JumpReLU pseudo-gradient ------------------------------------------------------------------------------------------
def test_l0_pseudo_gradient_equals_derivative_of_kernel_smoothed_l0():
    # Smoothing L0(theta) = sum H(pre - theta) with the rectangle kernel of width eps gives
    # L0_eps(theta) = mean over u ~ U(-1/2, 1/2) of L0(theta + eps u), whose derivative is the central difference
    # (L0(theta + eps/2) - L0(theta - eps/2)) / eps: exactly what the straight-through gradient computes.
    g = torch.Generator().manual_seed(0)
    pre = torch.rand(20000, 3, generator=g)
    theta = torch.tensor([0.2, 0.5, 0.8], requires_grad=True)
    eps = 0.01
    (grad,) = torch.autograd.grad(step_function(pre, theta, eps).sum(), theta)

    def l0(t):
        return (pre > t).float().sum(0)

    smoothed = (l0(theta.detach() + eps / 2) - l0(theta.detach() - eps / 2)) / eps
    torch.testing.assert_close(grad, smoothed, rtol=0, atol=1e-3)
    # Density of pre at theta is 1 (uniform on [0, 1]): the gradient estimates -n * density.
    assert torch.allclose(grad / 20000, torch.full((3,), -1.0), atol=0.1)
    # And it is a pseudo-gradient for theta only: pre gets none from the step function.
    pre2 = pre.clone().requires_grad_(True)
    (g_pre,) = torch.autograd.grad(step_function(pre2, theta, eps).sum(), pre2, materialize_grads=True)
    assert float(g_pre.abs().max()) == 0.0


def test_jumprelu_pseudo_gradient_against_smoothed_finite_difference():
    # For a readout L = sum c * JumpReLU(pre; theta), the kernel-smoothed loss has derivative
    # -(1/eps) sum_{|pre - theta| < eps/2} c * pre; the straight-through gradient uses theta in place of pre, so the
    # two differ by at most sum_window |c| / 2 (|pre - theta| < eps/2), and agree closely on a large sample.
    g = torch.Generator().manual_seed(1)
    pre = torch.rand(200000, 4, generator=g) * 2 - 0.5
    c = torch.randn(200000, 4, generator=g) * 0.1 + torch.tensor([1.0, -2.0, 0.5, 3.0])
    theta = torch.tensor([0.1, 0.3, 0.6, 1.2], requires_grad=True)
    eps = 0.01
    (grad,) = torch.autograd.grad((c * jumprelu(pre, theta, eps)).sum(), theta)

    def loss(t):
        return (c * pre * (pre > t).float()).sum(0)

    t = theta.detach()
    fd = (loss(t + eps / 2) - loss(t - eps / 2)) / eps
    window = ((pre - t).abs() < eps / 2).float()
    bound = (c.abs() * window).sum(0) / 2
    assert bool(((grad - fd).abs() <= bound + 1e-3).all())
    torch.testing.assert_close(grad, fd, rtol=0.03, atol=0.0)
    # Away from the threshold the gradient with respect to pre is the ordinary one: H(pre - theta) * c.
    pre2 = pre[:5].clone().requires_grad_(True)
    (g_pre,) = torch.autograd.grad((c[:5] * jumprelu(pre2, theta, eps)).sum(), pre2)
    torch.testing.assert_close(g_pre, c[:5] * (pre[:5] > t).float())


def test_sae_threshold_gradient_flows_through_log_threshold():
    # The module learns log theta: d/dlog(theta) = theta * d/dtheta of the kernel-smoothed L0 penalty.
    spec = SaeSpec(architecture="jumprelu", d_sae=3, l0_coefficient=1.0, bandwidth=0.05)
    sae = SparseAutoencoder(spec, "jumprelu", 1, 2)
    _randomize_(sae, 4)
    h = torch.randn(4000, 1, 2, generator=torch.Generator().manual_seed(5))
    terms = sae.loss(h)
    (grad,) = torch.autograd.grad(terms.penalty.sum(), sae.log_threshold)
    with torch.no_grad():
        pre = sae(h).pre  # (1, 1, d_sae, batch)
        theta = sae.log_threshold.exp()
        eps = spec.bandwidth

        def penalty(t):
            return (pre > t[..., None]).float().sum(-1) / h.shape[0]

        fd = (penalty(theta + eps / 2) - penalty(theta - eps / 2)) / eps * theta
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6)


# -- resampling --------------------------------------------------------------------------------------------------------
def _pentagon_run(n_instances: int = 4, p: float = 0.025) -> Run:
    """A toy model with five features on a regular pentagon in 2-D, one rotation per instance (no training)."""
    spec = parse_spec(
        {
            "name": "pentagon",
            "model": {"kind": "relu-output", "n_features": 5, "d_hidden": 2},
            "data": {"feature_probability": p},
            "train": {"steps": 1, "batch_size": 8, "eval_batch": 8},
            "instances": {"seed": list(range(n_instances))},
        }
    )
    run = train(spec)
    with torch.no_grad():
        for i in range(n_instances):
            angles = 2 * math.pi * torch.arange(5) / 5 + 0.37 * i
            run.model.W[i] = torch.stack([angles.cos(), angles.sin()])
        run.model.b_final.zero_()
    return run


def test_resampling_revives_dead_latents():
    run = _pentagon_run(2, p=0.2)
    spec = SaeSpec(d_sae=5, resample_method=["simple", "loss-weighted"])
    sae = SparseAutoencoder(spec, "relu", 2, 2)
    dead = torch.zeros(2, 2, 5, dtype=torch.bool)
    dead[:, :, [1, 3]] = True
    with torch.no_grad():
        sae.b_enc.masked_fill_(dead, -100.0)  # latents 1 and 3 can never fire
    adam = AdamState.zeros_like({k: v.detach() for k, v in sae.named_parameters()})
    for store in (adam.exp_avg, adam.exp_avg_sq):
        for v in store.values():
            v.fill_(1.0)
    gen = torch.Generator().manual_seed(0)
    from superposition.data import make_sampler

    x = make_sampler(run.spec).sample(4096, gen)
    h = run.model.hidden(x).detach()
    before = {k: v.detach().clone() for k, v in sae.named_parameters()}
    assert int(((sae(h).z > 0).any(-1) & dead).sum()) == 0
    n = resample_dead_(sae, adam, dead, torch.tensor([False, True]), h, gen, scale=0.5)
    assert n.tolist() == [[2, 2], [2, 2]]
    with torch.no_grad():
        fires = (sae(h).z > 0).any(-1)
    assert bool(fires[dead].all())  # every resampled latent fires again
    torch.testing.assert_close(sae.W_dec.norm(dim=-1)[dead], torch.ones(8))
    # simple: encoder column = decoder row (a random unit direction); loss-weighted: 0.5 x the mean live norm.
    torch.testing.assert_close(sae.W_enc[:, 0].transpose(-1, -2)[dead[:, 0]], sae.W_dec[:, 0][dead[:, 0]])
    live_norm = before["W_enc"][:, 1].norm(dim=-2)[~dead[:, 1]].reshape(2, 3).mean(-1)
    new_norm = sae.W_enc[:, 1].norm(dim=-2)[dead[:, 1]].reshape(2, 2)
    torch.testing.assert_close(new_norm, 0.5 * live_norm[:, None].expand(2, 2))
    # Live latents are untouched; the resampled ones restart their biases and Adam moments from zero.
    torch.testing.assert_close(sae.W_dec[~dead], before["W_dec"][~dead])
    assert float(sae.b_enc.detach()[dead].abs().max()) == 0.0
    assert float(adam.exp_avg["W_dec"][dead].abs().max()) == 0.0
    assert float(adam.exp_avg["W_dec"][~dead].min()) == 1.0


def test_loss_weighted_resampling_draws_inputs_with_probability_proportional_to_squared_loss():
    # One SAE that reconstructs nothing (decoder zero, b_dec zero): the loss of sample b is |h_b|^2, so each of the
    # 4000 dead latents must take the direction of sample b with probability |h_b|^4 / sum |h|^4.
    n = 4000
    sae = SparseAutoencoder(SaeSpec(d_sae=n), "relu", 1, 2)
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])[:, None, :]
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_enc.fill_(-1.0)
    adam = AdamState.zeros_like({k: v.detach() for k, v in sae.named_parameters()})
    dead = torch.ones(1, 1, n, dtype=torch.bool)
    resample_dead_(sae, adam, dead, torch.tensor([True]), h, torch.Generator().manual_seed(0))
    unit = h[:, 0] / h[:, 0].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    picked = torch.argmax(sae.W_dec.detach()[0, 0] @ unit.T, dim=-1)
    freq = torch.bincount(picked, minlength=4).float() / n
    expected = torch.tensor([1.0, 16.0, 81.0, 0.0]) / 98.0
    # Multinomial standard error at n = 4000 is at most 0.008; allow 4 of them.
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.032)


def test_fit_resamples_on_schedule_and_revives():
    run = _pentagon_run(2, p=0.1)
    spec = SaeSpec(d_sae=5, steps=60, batch_size=256, resample_every=20, resample_window=10, log_every=5, lr=1e-3)
    sae = SparseAutoencoder(spec, "relu", 2, 2)
    with torch.no_grad():
        sae.b_enc[:, :, :2] = -50.0  # two latents per SAE start dead
    fitted = fit_sae(sae, run.model, run.spec, spec)
    ev = fitted.resamples
    assert sorted(set(ev["step"])) == [20]  # resampled at step 20; at 40 nobody was dead any more
    assert ev["resampled"].tolist() == [2, 2]
    hist = fitted.history.groupby("step")["dead"].sum()
    assert hist.loc[15] == 4 and hist.loc[59] == 0


# -- ground truth ------------------------------------------------------------------------------------------------------
def test_true_directions_bottleneck_are_encoder_columns():
    run = _pentagon_run(3)
    truth = true_directions(run.model, run.spec)
    cos = torch.nn.functional.cosine_similarity(truth.directions, run.model.W.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(cos, torch.ones(3, 5))
    torch.testing.assert_close(truth.directions.norm(dim=-1), torch.full((3, 5), 0.5))  # E[v] = 1/2 for U[0,1]
    assert truth.labels == [f"f{i}" for i in range(5)] and bool(truth.represented.all())


def test_true_directions_neuron_model_are_relu_of_columns_and_split_by_sign():
    spec = parse_spec(
        {"model": {"kind": "neuron", "n_features": 3, "d_hidden": 4}, "data": {"magnitude": "signed"}, "seed": 3}
    )
    model = build_model(spec)
    truth = true_directions(model, spec)
    W = model.W[0].detach()  # (hidden, feats)
    assert truth.labels == ["f0+", "f1+", "f2+", "f0-", "f1-", "f2-"]
    expected = torch.cat([torch.relu(W).T, torch.relu(-W).T]) * 0.5  # E[|v|] = 1/2 on each side
    torch.testing.assert_close(truth.directions[0], expected)


def test_scores_of_a_perfect_and_of_a_silent_sae():
    run = _pentagon_run(2)
    spec = SaeSpec(d_sae=6, eval_batch=8192, l1_coefficient=[0.0, 0.0])
    sae = SparseAutoencoder(spec, "relu", 2, 2)
    W = run.model.W.detach()  # (inst, 2, 5)
    with torch.no_grad():
        sae.b_dec.zero_()
        # SAE 0: latents 0..4 are the features, in reverse order, with a tiny negative bias; latent 5 never fires.
        # Encoder: the dual basis would be exact, but any encoder that fires only for "its" feature reconstructs
        # single-feature inputs exactly; we use W_i scaled so the activation of feature i is exactly v.
        perm = [4, 3, 2, 1, 0]
        sae.W_dec[:, 0, :5] = W.transpose(-1, -2)[:, perm]
        sae.W_enc[:, 0, :, :5] = W[:, :, perm]
        sae.b_enc[:, 0] = torch.tensor([-0.31] * 5 + [-100.0])  # cos 72 deg = 0.309: neighbours stay off
        sae.W_dec[:, 0, 5] = torch.tensor([1.0, 0.0])
        # SAE 1: silent (every latent dead).
        sae.b_enc[:, 1] = -100.0
    scores = score_sae(sae, run.model, run.spec, spec)
    t = scores.table.set_index(["instance", "sae"])
    for i in range(2):
        assert t.loc[(i, 0), "recovered_99"] == 5 and t.loc[(i, 0), "mmcs_features"] == pytest.approx(1.0)
        assert t.loc[(i, 0), "dead"] == 1 and t.loc[(i, 1), "dead"] == 6 and t.loc[(i, 1), "l0"] == 0
        assert t.loc[(i, 1), "shrinkage"] == 0.0
        # A silent SAE with b_dec = 0 reconstructs 0: FVU = sum |h|^2 / sum |h - mean|^2 > 1.
        assert t.loc[(i, 1), "fvu"] > 1.0
    best = scores.features[(scores.features["sae"] == 0)].groupby("feature")["best_latent"].first()
    assert best.to_dict() == {f"f{i}": perm.index(i) for i in range(5)}
    # Features on with probability 0.025 each; a latent then fires only when its feature beats the bias.
    assert t.xs(0, level="sae")["l0"].between(0.08, 0.12).all()
    assert (t.xs(0, level="sae")["fvu"] < 0.3).all()


# -- recovery ----------------------------------------------------------------------------------------------------------
def test_resampled_sae_recovers_all_five_pentagon_features():
    # Five features on a pentagon, an SAE with five latents of which two start dead (their bias keeps them from
    # ever firing). Live latents lie 72 degrees apart at best, and cos 36 deg = 0.81 < 0.9, so three live latents
    # recover at most three features; resampled, the two dead latents come back and (loss-weighted: drawn from the
    # badly reconstructed inputs) take the two missing ones.
    run = _pentagon_run(4, p=0.1)
    spec = SaeSpec(
        d_sae=5,
        lr=3e-3,
        steps=1500,
        batch_size=512,
        resample_method=["none", "simple", "loss-weighted"],
        resample_every=300,
        resample_window=100,
        log_every=100,
        eval_batch=8192,
        seed=1,
    )
    sae = SparseAutoencoder(spec, "relu", 4, 2)
    with torch.no_grad():
        sae.b_enc[:, :, 3:] = -10.0
    fitted = fit_sae(sae, run.model, run.spec, spec)
    scores = score_sae(sae, run.model, run.spec, spec)
    best = scores.features.groupby(["instance", "sae"])["cosine"].min().unstack()  # worst feature per SAE
    table = scores.table.set_index(["instance", "sae"])
    assert (table.xs(0, level="sae")["dead"] == 2).all()  # without resampling they stay dead
    live_best = scores.cosine[:, 0, :3].max(dim=1).values  # (inst, features): best live latent per feature
    assert ((live_best > 0.9).sum(-1) <= 3).all()
    assert (table.xs(1, level="sae")["dead"] == 0).all()  # simple resampling revives them...
    assert (best[2] > 0.95).all()  # ...and loss-weighted resampling puts them on the two missing features
    events = fitted.resamples[fitted.resamples["resampled"] > 0]
    assert set(events["sae"]) == {1, 2} and set(events["step"]) == {300}  # all four revived at the first chance


# -- folder, spec and CLI ----------------------------------------------------------------------------------------------
def test_sae_spec_rules():
    with pytest.raises(SpecError, match=r"^sae\.k: .*integer"):
        load_spec("demo", ["sae.architecture='topk'", "sae.k=1.5"])
    with pytest.raises(SpecError, match=r"^sae\.k: at most d_sae=3"):
        load_spec("demo", ["sae.d_sae=3", "sae.k=[1, 4]"])
    with pytest.raises(SpecError, match=r"^sae\.batch_k: values must be finite and > 0"):
        load_spec("demo", ["sae.batch_k=0.0"])
    assert SaeSpec(k=2).sparsity_values("batchtopk") == [2.0]
    assert SaeSpec(k=2, batch_k=[0.25, 0.5]).sparsity_values("batchtopk") == [0.25, 0.5]
    with pytest.raises(SpecError, match=r"^sae\.l1_coefficient: values must be finite and >= 0"):
        load_spec("demo", ["sae.l1_coefficient=-1"])
    with pytest.raises(SpecError, match=r"^sae\.architecture: give a non-empty list without repeats$"):
        load_spec("demo", ["sae.architecture=['relu', 'relu']"])
    with pytest.raises(SpecError, match=r"^sae\.resample_methd: Extra inputs are not permitted"):
        load_sae_spec(overrides=["resample_methd='none'"])
    spec = load_spec("demo", ["sae.architecture=['relu','jumprelu']", "sae.l0_coefficient=[0.1, 0.2]"]).sae
    assert len(sae_grid(spec, "jumprelu")) == 2 and len(sae_grid(spec, "relu")) == 1
    assert spec.folder_name("relu") == "relu" and spec.model_copy(update={"name": "x"}).folder_name("relu") == "x-relu"
    assert load_spec("demo").sae is None
    quick = load_sae_spec(overrides=["steps=10000", "resample_every=2500"], quick=True)
    assert (quick.steps, quick.resample_every, quick.resample_window) == (1000, 250, 50)


def test_sae_folder_round_trip_and_run_report(tmp_path):
    run = _pentagon_run(2)
    save_run(run, tmp_path / "r")
    run = load_run(tmp_path / "r")
    spec = SaeSpec(
        architecture=["relu", "jumprelu"],
        l1_coefficient=[0.1, 0.3],
        steps=40,
        batch_size=128,
        log_every=10,
        resample_every=20,
        resample_window=5,
        eval_batch=512,
    )
    saes = run_saes(run, spec)
    assert [s.path.name for s in saes] == ["relu", "jumprelu"]
    loaded = load_sae(tmp_path / "r" / "sae" / "relu")
    for k, v in saes[0].model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    pd.testing.assert_frame_equal(loaded.scores, saes[0].scores)
    pd.testing.assert_frame_equal(loaded.features, saes[0].features)
    assert loaded.spec == spec.for_architecture("relu")
    assert len(loaded.scores) == 4 and set(loaded.scores["sparsity"]) == {0.1, 0.3}
    page = (tmp_path / "r" / "report.html").read_text()
    assert "SAE relu: relu" in page and "SAE jumprelu: jumprelu" in page and "recovery vs L0" in page
    assert len(run_sae_sections(run)) == 3
    with pytest.raises(SpecError, match="already exists"):
        run_saes(run, spec)
    # A damaged folder is one clear error.
    (tmp_path / "r" / "sae" / "relu" / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(SaeFormatError, match="not a valid safetensors file"):
        load_sae(tmp_path / "r" / "sae" / "relu")
    cfg = json.loads((tmp_path / "r" / "sae" / "jumprelu" / "config.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["sae"]["architecture"] == "jumprelu"


def test_cli_sae_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "demo", "--out", str(out), "--quiet", "--set", "train.steps=5"]) == 0
    sets = ["--set", "steps=20", "--set", "sae.batch_size=64", "--set", "eval_batch=256", "--set", "d_sae=6"]
    assert main(["sae", str(out), "--quiet", *sets]) == 0
    assert (out / "sae" / "relu" / "scores.parquet").is_file()
    scores = pd.read_parquet(out / "sae" / "relu" / "scores.parquet")
    assert len(scores) == 8 and scores["n_true"].max() <= 20
    capsys.readouterr()
    assert main(["sae", str(out), "--quiet", *sets]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["sae", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["sae", str(out), "--set", "architecture='bogus'"]) == 2
    assert capsys.readouterr().err.startswith("error: sae.architecture")
    spec_file = tmp_path / "sae.toml"
    spec_file.write_text("[sae]\narchitecture = 'topk'\nk = [1, 2]\nsteps = 10\nbatch_size = 32\neval_batch = 128\n")
    assert main(["sae", str(out), "--spec", str(spec_file), "--quiet"]) == 0
    assert len(pd.read_parquet(out / "sae" / "topk" / "scores.parquet")) == 16


def test_instances_train_independently():
    # An instance's SAE depends only on its own toy model, never on the other instances sharing the tensor...
    # except through the shared data stream, so compare the deterministic part: init and one gradient step.
    spec = SaeSpec(d_sae=4, init="independent")
    a = SparseAutoencoder(spec, "relu", 3, 2)
    b = SparseAutoencoder(spec, "relu", 1, 2)
    torch.testing.assert_close(a.W_enc[:1], b.W_enc)
    h = torch.randn(32, 3, 2)
    ga = torch.autograd.grad(a.loss(h).total.sum(), a.W_enc)[0]
    gb = torch.autograd.grad(b.loss(h[:, :1]).total.sum(), b.W_enc)[0]
    torch.testing.assert_close(ga[:1], gb)
    assert np.isfinite(ga.numpy()).all()


def test_run_with_sae_section_trains_the_saes_after_the_model(tmp_path):
    spec_file = tmp_path / "exp.toml"
    spec_file.write_text(
        "name = 'with-sae'\n[model]\nn_features = 5\nd_hidden = 2\n[data]\nfeature_probability = 0.1\n"
        "[train]\nsteps = 5\nbatch_size = 32\neval_batch = 64\n[instances]\nseed = [0, 1]\n"
        "[sae]\narchitecture = ['topk', 'jumprelu']\nk = [1, 2]\nsteps = 10\nbatch_size = 32\neval_batch = 128\n"
    )
    out = tmp_path / "run"
    assert main(["run", str(spec_file), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in (out / "sae").iterdir()) == ["jumprelu", "topk"]
    assert load_sae(out / "sae" / "topk").scores["sparsity"].tolist() == [1.0, 2.0, 1.0, 2.0]
    page = (out / "report.html").read_text()
    assert "SAE topk: topk" in page and "SAE architectures: recovery vs L0" in page
    assert load_run(out).spec.sae.architectures == ["topk", "jumprelu"]


def test_sweep_spec_with_sae_section_is_refused(tmp_path, capsys):
    assert load_spec("hierarchy").sweep is not None
    code = main(["run", "hierarchy", "--out", str(tmp_path / "h"), "--set", "sae.steps=5"])
    assert code == 2 and capsys.readouterr().err.startswith("error: sae: a [sweep] spec cannot train SAEs")
    assert not (tmp_path / "h").exists()


# -- the library's run trains the [sae] section as the CLI does -----------------------------------------------------
_WITH_SAE = (
    "name = 'with-sae'\n[model]\nn_features = 5\nd_hidden = 2\n[data]\nfeature_probability = 0.1\n"
    "[train]\nsteps = 5\nbatch_size = 32\neval_batch = 64\n[instances]\nseed = [0, 1]\n"
    "[sae]\narchitecture = ['topk', 'jumprelu']\nk = [1, 2]\nsteps = 10\nbatch_size = 32\neval_batch = 128\n"
    "resample_every = 4\nresample_window = 2\nlog_every = 3\n"
)


def _same_sae_folders(a, b) -> None:
    from safetensors.torch import load_file

    names = sorted(p.name for p in (a / "sae").iterdir())
    assert names == sorted(p.name for p in (b / "sae").iterdir()) == ["jumprelu", "topk"]
    for name in names:
        fa, fb = a / "sae" / name, b / "sae" / name
        assert sorted(p.name for p in fa.iterdir()) == sorted(p.name for p in fb.iterdir())
        wa, wb = load_file(fa / "model.safetensors"), load_file(fb / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        for table in ("scores", "features", "latents", "history", "resamples"):
            pd.testing.assert_frame_equal(
                pd.read_parquet(fa / f"{table}.parquet"), pd.read_parquet(fb / f"{table}.parquet")
            )
        ca, cb = (json.loads((f / "config.json").read_text()) for f in (fa, fb))
        assert {k: v for k, v in ca.items() if k != "train_seconds"} == {
            k: v for k, v in cb.items() if k != "train_seconds"
        }


def test_library_run_trains_the_sae_section_exactly_as_the_cli(tmp_path):
    import superposition
    from superposition.runs import partial_dir

    spec_file = tmp_path / "exp.toml"
    spec_file.write_text(_WITH_SAE)
    spec = load_spec(str(spec_file))
    assert main(["run", str(spec_file), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    lib = superposition.run(spec, tmp_path / "lib")
    _same_sae_folders(tmp_path / "cli", tmp_path / "lib")
    assert (
        lib.path == tmp_path / "lib" and "SAE architectures: recovery vs L0" in (lib.path / "report.html").read_text()
    )
    # overwrite replaces the run and its SAE folders with the same ones
    superposition.run(spec, tmp_path / "lib", overwrite=True)
    _same_sae_folders(tmp_path / "cli", tmp_path / "lib")
    with pytest.raises(SpecError, match="already exists"):
        superposition.run(spec, tmp_path / "lib")
    # saes=False: the model only
    superposition.run(spec, tmp_path / "bare", saes=False)
    assert not (tmp_path / "bare" / "sae").exists()
    # a run killed while publishing (its complete .partial folder) is finished by resume, SAEs included
    os.replace(tmp_path / "bare", partial_dir(tmp_path / "bare"))
    superposition.run(spec, tmp_path / "bare", resume=True)
    _same_sae_folders(tmp_path / "cli", tmp_path / "bare")
    assert not partial_dir(tmp_path / "bare").exists()


# -- scripts/reproduce.py: the two SAE rows from the run folders ----------------------------------------------------
def _reproduce():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("reproduce", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce", module)
    spec.loader.exec_module(module)
    return module


_TINY_SAE = [
    "train.steps=40",
    "train.batch_size=128",
    "train.eval_batch=256",
    "train.log_every=10",
    "sae.steps=40",
    "sae.batch_size=128",
    "sae.eval_batch=512",
    "sae.resample_every=10",
    "sae.resample_window=5",
    "sae.log_every=10",
]


def test_reproduce_sae_recovery_row_reads_the_saved_scores(tmp_path):
    import superposition

    rp = _reproduce()
    spec = load_spec("sae-recovery", ["instances.seed=[0, 1, 2, 3]", *_TINY_SAE])
    superposition.run(spec, tmp_path / "r")
    row = rp.EXTRACTORS["sae-recovery"](load_run(tmp_path / "r"))
    scores = pd.read_parquet(tmp_path / "r" / "sae" / "relu" / "scores.parquet")
    assert len(scores) == 12 and set(scores["n_true"]) == {5}
    assert row.measured.startswith("4 instances, ReLU SAEs d_sae 5, L1 0.2, mean per instance: no resampling ")
    stats = {}
    for method, label in (("none", "no resampling"), ("simple", "simple resampling"), ("loss-weighted", None)):
        s = scores[scores["resample_method"] == method]
        full = int((s["recovered_99"] == s["n_true"]).sum())
        stats[method] = (s["dead"].mean(), full)
        label = label or "loss-weighted resampling"
        assert (
            f"{label} {s['dead'].mean():.3g} dead latents, {s['recovered_99'].mean():.2g} of 5 features at cos > 0.99, "
            f"all 5 in {full}/4 instances, FVU {s['fvu'].mean():.2g}"
        ) in row.measured
    (dead0, full0), rest = stats["none"], [stats["simple"], stats["loss-weighted"]]
    yes = dead0 > 0 and all(d == 0 and f == 4 for d, f in rest)
    mostly = dead0 > 0 and all(d <= dead0 / 10 and f >= 3 and f > full0 for d, f in rest)
    assert row.verdict.startswith("yes (" if yes else "mostly (" if mostly else "no (")
    assert f"dead {dead0:.3g} → {rest[0][0]:.3g} / {rest[1][0]:.3g}, all 5 in {full0}/4 → {rest[0][1]}/4" in row.verdict
    sae_seconds = json.loads((tmp_path / "r" / "sae" / "relu" / "config.json").read_text())["train_seconds"]
    assert row.timing.endswith(f"SAEs relu {sae_seconds:.0f} s")
    # The verdict follows its rule: rewrite the saved table to a clean outcome (dead without, perfect with resampling).
    s = scores.copy()
    rs = s["resample_method"] != "none"
    s["dead"] = np.where(rs, 0, 2)
    s["recovered_99"] = np.where(rs, s["n_true"], 1)
    s.to_parquet(tmp_path / "r" / "sae" / "relu" / "scores.parquet", index=False)
    row = rp.sae_recovery(load_run(tmp_path / "r"))
    assert row.verdict.startswith("yes (") and "dead 2 → 0 / 0, all 5 in 0/4 → 4/4 and 4/4 instances" in row.verdict
    s.loc[~rs, "dead"] = 0  # nothing dies without resampling: the source's first claim fails
    s.to_parquet(tmp_path / "r" / "sae" / "relu" / "scores.parquet", index=False)
    assert rp.sae_recovery(load_run(tmp_path / "r")).verdict.startswith("no (")
    # format_row and update_table place it in the results table
    line = rp.format_row("sae-recovery", "1 s", row)
    table = rp.update_table(f"{rp.BEGIN}\n{rp.HEADER}\n| sae-recovery | old |\n{rp.END}\n", {"sae-recovery": line})
    assert line in table and "| old |" not in table


def test_reproduce_sae_architectures_row_reads_the_saved_scores(tmp_path):
    import superposition

    rp = _reproduce()
    sets = ["sae.architecture=['relu', 'topk']", "sae.l1_coefficient=[0.03, 0.3]", "sae.k=[1, 2]"]
    spec = load_spec("sae-architectures", ["instances.seed=[0, 1, 2]", *_TINY_SAE, *sets])
    superposition.run(spec, tmp_path / "r")
    row = rp.EXTRACTORS["sae-architectures"](load_run(tmp_path / "r"))
    scores = pd.concat([pd.read_parquet(tmp_path / "r" / "sae" / a / "scores.parquet") for a in ("relu", "topk")])
    scores["full"] = (scores["recovered_99"] == scores["n_true"]).astype(int)
    mean = scores.groupby(["architecture", "sparsity"]).agg(
        full=("full", "sum"), mmcs=("mmcs_features", "mean"), l0=("l0", "mean"), fvu=("fvu", "mean")
    )
    assert len(mean) == 4
    name = {"relu": "ReLU L1", "topk": "TopK k"}
    near = {}
    for arch in ("relu", "topk"):
        m = mean.loc[arch].sort_values(["full", "mmcs"], ascending=False)
        sp, r = m.index[0], m.iloc[0]
        assert f"{name[arch]} {sp:.3g}: {int(r.full)}/3, {r.mmcs:.3f}, {r.l0:.3g}, {r.fvu:.2g}" in row.measured
        near[arch] = 0.125 / 3 <= r.l0 <= 3 * 0.125
        label = name[arch].split()[0]
        assert (f"yes for {label}" in row.verdict or f"yes for ReLU, {label}" in row.verdict) == near[arch]
        assert (f"{label} (L0 {r.l0:.3g})" in row.verdict) == (not near[arch])
    exact = mean[mean["fvu"] < 1e-3]
    assert f"settings with FVU < 0.001 ({len(exact)} of 4)" in row.measured or (
        len(exact) == 0 and "no setting reaches FVU < 0.001" in row.measured
    )
    assert row.source.endswith("data L0 = 0.125")
    assert row.measured.startswith("3 instances, d_sae 5, resampling loss-weighted; best setting per architecture")
    # TopK fires (nearly) one latent per sample even on zero inputs, far above the data's 0.125: the rule says no.
    assert not near["topk"] and "not for TopK (L0 " in row.verdict
    assert row.timing.startswith("toy model ") and ", topk " in row.timing


def test_default_d_sae_is_the_runs_number_of_features():
    assert load_sae_spec(n_features=20).d_sae == 20
    assert load_sae_spec(n_features=20, overrides=["d_sae=7"]).d_sae == 7  # --set wins
    assert load_sae_spec(base=SaeSpec(d_sae=3), n_features=20).d_sae == 3  # the run's own [sae] section wins
    assert load_sae_spec().d_sae == 5  # the library default without a run
    with pytest.raises(SpecError, match="at most d_sae=4"):  # k is validated after d_sae is resolved
        load_sae_spec(n_features=4, overrides=["architecture='topk'", "k=5"])
    assert load_sae_spec(n_features=20, overrides=["architecture='topk'", "k=5"]).k == 5
