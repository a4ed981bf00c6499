"""The SAEs' fused step (superposition.sae.fast): compiled, it gives the eager engine's weights on every
architecture (resampling and the batchtopk threshold included); the engine choice; the eager and functional
gradients agree on the same batch."""

from __future__ import annotations

import pytest
import torch

from superposition.fast import batched_mm, compile_available
from superposition.runs import Run, train
from superposition.sae import SparseAutoencoder, fit_sae
from superposition.sae.fast import choose_sae_engine
from superposition.sae.model import sae_loss
from superposition.spec import SaeSpec, parse_spec

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]
needs_compiler = pytest.mark.skipif(not compile_available(torch.device("cpu")), reason="no C++ compiler")


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(n_instances: int = 3) -> Run:
    """A briefly trained 5-in-2 toy model (signed features, so the activations are not all in one quadrant)."""
    spec = parse_spec(
        {
            "name": "fused-sae",
            "model": {"kind": "relu-output", "n_features": 5, "d_hidden": 2},
            "data": {"feature_probability": 0.2},
            "train": {"steps": 30, "batch_size": 64, "eval_batch": 64},
            "instances": {"seed": list(range(n_instances))},
        }
    )
    return train(spec)


def _spec(arch: str, engine: str, **extra) -> SaeSpec:
    sparsity = {"relu": {"l1_coefficient": [0.05, 0.2]}, "gated": {"l1_coefficient": [0.05, 0.2]}}
    sparsity |= {"jumprelu": {"l0_coefficient": [0.001, 0.01]}, "topk": {"k": [1, 2]}, "batchtopk": {"batch_k": [0.5]}}
    base = dict(
        architecture=arch,
        d_sae=6,
        steps=40,
        batch_size=128,
        lr=3e-3,
        resample_method=["none", "loss-weighted"],
        resample_every=15,
        resample_window=5,
        log_every=10,
        schedule="warmup-cosine",
        engine=engine,
        threshold=0.05,
        bandwidth=0.05,
    )
    return SaeSpec(**(base | sparsity[arch] | extra))


def _fit(run: Run, spec: SaeSpec, arch: str):
    sae = SparseAutoencoder(spec, arch, run.spec.n_instances, 2)
    if arch == "relu":
        with torch.no_grad():
            sae.b_enc[:, :, :2] = -20.0  # two dead latents per SAE, so that resampling happens
    return sae, fit_sae(sae, run.model, run.spec, spec)


@needs_compiler
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_step_gives_the_eager_engines_weights(arch):
    run = _run()
    eager, fe = _fit(run, _spec(arch, "eager"), arch)
    fast, ff = _fit(run, _spec(arch, "fast"), arch)
    assert fe.engine == "eager" and ff.engine == "fast"
    # A top-k choice is a discrete decision: a near-tie that rounding breaks the other way, or a gradient of the
    # order of Adam's eps (normalised to a step of up to lr), moves a weight by up to one step (lr = 3e-3) in one
    # engine and not the other. The other architectures agree to float32 rounding.
    atol = 3e-3 if arch in ("topk", "batchtopk") else 2e-5
    for name, p in eager.named_parameters():
        torch.testing.assert_close(dict(fast.named_parameters())[name], p, rtol=1e-4, atol=atol, msg=name)
    torch.testing.assert_close(
        torch.tensor(ff.history[["loss", "mse", "l0"]].to_numpy()),
        torch.tensor(fe.history[["loss", "mse", "l0"]].to_numpy()),
        rtol=1e-4 if atol < 1e-4 else 2e-2,
        atol=1e-6 if atol < 1e-4 else 2e-3,
    )
    assert ff.history["dead"].tolist() == fe.history["dead"].tolist()
    assert ff.resamples.equals(fe.resamples)
    if arch == "relu":
        assert int(fe.resamples["resampled"].sum()) > 0  # the comparison went through a resampling
    if arch == "batchtopk":
        torch.testing.assert_close(fast.threshold, eager.threshold, rtol=1e-4, atol=1e-6)
        assert bool(torch.isfinite(eager.threshold).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_functional_fused_gradient_equals_autograd_on_one_batch(arch):
    # The fused step's gradient (torch.func.grad through the fused products) against autograd through torch.matmul,
    # from the same weights on the same batch, to float32 rounding.
    spec = _spec(arch, "eager")
    sae = SparseAutoencoder(spec, arch, 2, 2)
    h = torch.randn(2, 2, 256, generator=torch.Generator().manual_seed(0))
    p = {k: v.detach() for k, v in sae.named_parameters()}

    def loss(q, mm):
        return sae_loss(sae.settings, q, sae.sparsity, h, mm=mm).total.sum()

    fused = torch.func.grad(lambda q: loss(q, batched_mm))(p)
    q = {k: v.clone().requires_grad_() for k, v in p.items()}
    plain = dict(zip(q, torch.autograd.grad(loss(q, torch.matmul), list(q.values())), strict=True))
    for k in p:
        assert float(plain[k].abs().max()) > 0, k  # every parameter gets a gradient on this batch
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_engine_choice():
    cpu = torch.device("cpu")
    assert choose_sae_engine(SaeSpec(engine="eager", steps=10**6), 16, 3, cpu).engine == "eager"
    if compile_available(cpu):
        assert choose_sae_engine(SaeSpec(steps=500), 16, 3, cpu).engine == "eager"  # compiling would not pay
        long = choose_sae_engine(SaeSpec(steps=20000), 16, 3, cpu)
        assert long.engine == "fast" and "pays back" in long.reason
        assert choose_sae_engine(SaeSpec(engine="fast", steps=5), 1, 1, cpu).engine == "fast"


def test_duplicate_latents_are_the_later_of_two_live_latents_on_one_direction():
    from superposition.sae.fit import duplicate_latents

    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    rows = torch.tensor([[e1, [2.0, 0.01], e2, [-1.0, 0.0], [0.7, 0.7]]])[None]  # (inst 1, sae 1, 5, 2)
    none_dead = torch.zeros(1, 1, 5, dtype=torch.bool)
    assert duplicate_latents(rows, none_dead, 0.95)[0, 0].tolist() == [False, True, False, False, False]
    # cos(e1, (0.7, 0.7)) = 0.707: a duplicate at 0.7, not at 0.95; a dead latent is nobody's original.
    assert duplicate_latents(rows, none_dead, 0.7)[0, 0].tolist() == [False, True, False, False, True]
    first_dead = torch.tensor([[[True, False, False, False, False]]])
    assert duplicate_latents(rows, first_dead, 0.95)[0, 0].tolist() == [False] * 5


def test_fit_resamples_duplicated_latents():
    run = _run(2)
    spec = _spec(
        "relu", "eager", resample_duplicates=0.9, resample_method=["loss-weighted"], steps=16, resample_window=1000
    )  # a window longer than the run: no latent counts as dead, only the duplicates are resampled
    sae = SparseAutoencoder(spec, "relu", 2, 2)
    with torch.no_grad():  # six directions 30 degrees apart (cos 0.87 < 0.9), then latent 1 put on latent 0's
        angles = torch.arange(6) * torch.pi / 6
        rows = torch.stack([angles.cos(), angles.sin()], -1)
        rows[1] = rows[0]
        sae.W_dec.copy_(rows.expand_as(sae.W_dec))
        sae.W_enc.copy_(rows.T.expand_as(sae.W_enc))
    fitted = fit_sae(sae, run.model, run.spec, spec)
    first = fitted.resamples[fitted.resamples["step"] == 15]
    assert first["resampled"].tolist() == [1, 1, 1, 1]  # one of each pair, in each instance and SAE
