"""The fast engine: gradients, optimiser, sampler statistics, determinism and resume, against the eager engine.

The fused functions are tested uncompiled (the compiled graph computes the same expressions); the compiled and
CUDA paths have their own tests, marked slow or skipped without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import superposition.fast as fast
from superposition.data import make_sampler
from superposition.runs import run, train
from superposition.spec import parse_spec
from superposition.train import TrainState, lr_multiplier, train_model


@pytest.fixture
def one_thread():
    """Training tests on one thread: tiny steps gain nothing from two, and on a busy machine every parallel
    region of two threads waits for a time slice (measured 10-100x slower per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_compiler(monkeypatch):
    """Make engine = "fast" run the fused functions uncompiled (what CI can afford)."""
    monkeypatch.setattr(fast.engine, "compile_available", lambda device: False)


def _spec(model, task=None, data=None, train=None, instances=None, seed=0):
    raw = {
        "seed": seed,
        "model": model,
        "data": {"feature_probability": 0.3, **(data or {})},
        "task": {"importance": 0.9, **(task or {})},
        "train": {"batch_size": 64, "steps": 20, "log_every": 5, "eval_batch": 256, **(train or {})},
    }
    if instances:
        raw["instances"] = instances
    return parse_spec(raw)


MODELS = {
    "linear": ({"kind": "linear", "n_features": 6, "d_hidden": 3}, {}),
    "relu-output": ({"kind": "relu-output", "n_features": 6, "d_hidden": 3}, {}),
    "relu-output-l1": ({"kind": "relu-output", "n_features": 6, "d_hidden": 3}, {"loss": "l1"}),
    "untied-biases": ({"kind": "relu-output", "n_features": 6, "d_hidden": 3, "tied": False, "bias_hidden": True}, {}),
    "neuron-gelu": ({"kind": "neuron", "n_features": 6, "d_hidden": 3, "bias_hidden": True, "activation": "gelu"}, {}),
    "neuron-none-l1": ({"kind": "neuron", "n_features": 5, "d_hidden": 4, "activation": "none"}, {"loss": "l1"}),
    "mlp-abs": ({"kind": "mlp", "n_features": 30, "d_hidden": 20}, {"target": "abs"}),
    "relu-output-gemm": ({"kind": "relu-output", "n_features": 40, "d_hidden": 20}, {}),
    # hidden >= fast.WIDE_HIDDEN: the decoder gradient in the other BLAS orientation
    "relu-output-wide": ({"kind": "relu-output", "n_features": 40, "d_hidden": 24}, {}),
    "mlp-abs-wide": ({"kind": "mlp", "n_features": 30, "d_hidden": 24}, {"target": "abs"}),
    "residual-skip": (
        {"kind": "residual-mlp", "n_features": 8, "d_hidden": 4, "d_embed": 30, "n_layers": 2, "bias_hidden": True},
        {"target": "relu-plus-x", "residual_factor": 0.5},
    ),
    "residual-noskip-bias-l1": (
        {
            "kind": "residual-mlp",
            "n_features": 8,
            "d_hidden": 4,
            "d_embed": 30,
            "n_layers": 2,
            "skip": False,
            "bias_out": True,
            "activation": ["relu", "gelu"],
        },
        {"target": "relu-plus-x", "loss": "l1"},
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_autograd_on_the_same_batch(name):
    model, task = MODELS[name]
    data = {"magnitude": "signed"} if task.get("target") in ("abs", "relu-plus-x") else {}
    spec = _spec(model, task, data, instances={"seed": [0, 1, 2]})
    state = TrainState.create(spec)
    # Train the biases off zero first, so their gradients are not trivially small.
    for _ in range(3):
        state.eager_step()
    x = state.batch()
    params = dict(state.model.named_parameters())
    ref = torch.autograd.grad(state.loss(x).sum(), list(params.values()))
    cfg = fast.fast_config(spec)
    xf = x.permute(1, 2, 0).contiguous()  # (inst, feats, batch)
    y = fast.target(cfg, xf, state.residual_factor)
    alive = torch.ones(spec.n_instances, dtype=torch.bool)
    w_e = getattr(state.model, "W_E", None)
    got = fast.loss_and_grads(
        cfg, {k: v.detach() for k, v in params.items()}, xf, y, state.importance, alive, state.model.relu_out, w_e
    )
    torch.testing.assert_close(got.loss, state.loss(x).detach(), rtol=1e-6, atol=1e-9)
    for (key, p), g in zip(params.items(), ref, strict=True):
        assert got.grads[key].shape == p.shape
        rel = ((got.grads[key] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert rel <= 1e-5, f"{key}: relative error {rel:.2e}"


def test_mixed_linear_and_relu_instances_and_dead_instances():
    spec = _spec({"n_features": 6, "d_hidden": 2}, instances={"model.kind": ["linear", "relu-output"], "seed": [0, 1]})
    state = TrainState.create(spec)
    x = state.batch()
    alive = torch.tensor([True, False, True, True])
    params = dict(state.model.named_parameters())
    loss = torch.where(alive, state.loss(x), 0.0).sum()
    ref = torch.autograd.grad(loss, list(params.values()))
    cfg = fast.fast_config(spec)
    xf = x.permute(1, 2, 0).contiguous()
    got = fast.loss_and_grads(
        cfg, {k: v.detach() for k, v in params.items()}, xf, xf, state.importance, alive, state.model.relu_out
    )
    assert not cfg.all_relu_out and cfg.any_linear
    for (key, _), g in zip(params.items(), ref, strict=True):
        torch.testing.assert_close(got.grads[key], g, rtol=1e-5, atol=1e-8)
        assert torch.equal(got.grads[key][1], torch.zeros_like(g[1]))


def test_bfloat16_gradients_close_to_float32():
    # bf16 keeps 8 significant bits: the fused gradients in bf16 must agree with float32 autograd to ~2^-6.
    spec = _spec({"kind": "relu-output", "n_features": 12, "d_hidden": 4}, instances={"seed": [0, 1]})
    state = TrainState.create(spec)
    x = state.batch()
    params = dict(state.model.named_parameters())
    ref = torch.autograd.grad(state.loss(x).sum(), list(params.values()))
    cfg = fast.fast_config(spec)
    xf = x.permute(1, 2, 0).contiguous().bfloat16()
    half = {k: v.detach().bfloat16() for k, v in params.items()}
    alive = torch.ones(2, dtype=torch.bool)
    got = fast.loss_and_grads(cfg, half, xf, xf, state.importance, alive, state.model.relu_out)
    for (key, _), g in zip(params.items(), ref, strict=True):
        assert got.grads[key].dtype == torch.bfloat16
        rel = ((got.grads[key].float() - g).norm() / g.norm()).item()
        assert rel < 3e-2, f"{key}: {rel:.3f}"


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fast_adam_equals_torch_optim(optimizer):
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, 5, generator=g)
    ref = p0.clone().requires_grad_(True)
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    opt = cls([ref], lr=1e-2, weight_decay=0.1)
    mine = {"W": p0.clone()}
    m, v = {"W": torch.zeros_like(p0)}, {"W": torch.zeros_like(p0)}
    for step in range(20):
        grad = torch.randn(3, 4, 5, generator=g)
        ref.grad = grad.clone()
        opt.step()
        fast.adam_update_(
            mine,
            {"W": grad},
            m,
            v,
            torch.tensor(step),
            torch.full((3,), 1e-2),
            torch.full((3,), 0.1),
            optimizer == "adamw",
        )
    torch.testing.assert_close(mine["W"], ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m["W"], opt.state[ref]["exp_avg"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v["W"], opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-10)


def test_fast_adam_per_instance_lr_and_weight_decay():
    # Each instance must follow torch.optim.Adam run with its own lr and weight decay.
    lrs, wds = [1e-2, 3e-3, 0.0], [0.0, 0.1, 0.5]
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(3, 2, 4, generator=g)
    grads = [torch.randn(3, 2, 4, generator=g) for _ in range(5)]
    mine = {"W": p0.clone()}
    m, v = {"W": torch.zeros_like(p0)}, {"W": torch.zeros_like(p0)}
    for step, grad in enumerate(grads):
        fast.adam_update_(mine, {"W": grad}, m, v, torch.tensor(step), torch.tensor(lrs), torch.tensor(wds), False)
    for i in range(3):
        ref = p0[i].clone().requires_grad_(True)
        opt = torch.optim.Adam([ref], lr=lrs[i], weight_decay=wds[i])
        for grad in grads:
            ref.grad = grad[i].clone()
            opt.step()
        torch.testing.assert_close(mine["W"][i], ref.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "warmup-cosine"])
def test_schedule_on_device_equals_lr_multiplier(schedule):
    spec = _spec({"n_features": 4}, train={"schedule": schedule, "steps": 50, "warmup_steps": 7})
    cfg = fast.fast_config(spec)
    for step in (0, 1, 6, 7, 8, 25, 49):
        got = float(fast.schedule_multiplier(cfg.schedule, cfg.steps, cfg.warmup_steps, torch.tensor(step)))
        assert got == pytest.approx(lr_multiplier(schedule, step, 50, 7), abs=1e-12)


# -- the counter-based sampler --------------------------------------------------------------------------------------
N = 40_000  # a Bernoulli rate over N draws has std <= 0.0025: the 0.01 tolerances below are 4 sigma


def _both(raw, n=N):
    """(eager, fast) samples of the same spec, both as (batch, inst, feats)."""
    spec = parse_spec({**raw, "train": {"batch_size": n}})
    eager = make_sampler(spec).sample(n, torch.Generator().manual_seed(0))
    fst = fast.sample(fast.fast_config(spec), make_sampler(spec).probability, torch.tensor(3), spec.seed)
    return eager, fst.permute(2, 0, 1)


def test_uniform_is_a_pure_function_of_seed_step_stream():
    a = fast.uniform((4, 1000), 7, torch.tensor(5), 0)
    assert torch.equal(a, fast.uniform((4, 1000), 7, torch.tensor(5), 0))
    for other in (fast.uniform((4, 1000), 7, torch.tensor(6), 0), fast.uniform((4, 1000), 8, torch.tensor(5), 0)):
        assert (a == other).float().mean() < 1e-3
    assert not torch.equal(a, fast.uniform((4, 1000), 7, torch.tensor(5), 1))


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1])
def test_stream_keys_give_the_seeds_numbers(seed):
    # The compiled step reads the seed as a table of keys; every stream must give the int seed's numbers exactly.
    keys = fast.stream_keys(seed)
    assert keys.shape == (fast.N_STREAMS, 2) and keys.dtype == torch.int64
    for stream in range(fast.N_STREAMS):
        for step in (0, 1, 12345):
            a = fast.uniform((3, 500), seed, torch.tensor(step), stream)
            assert torch.equal(a, fast.uniform((3, 500), keys, torch.tensor(step), stream))


def test_uniform_statistics():
    # 1M draws: mean and variance within 5 sigma, 100-bin chi-square far below its 0.9999 quantile (~160),
    # and no correlation between neighbouring elements or between the same element of consecutive steps.
    n = 1 << 20
    u = fast.uniform((n,), 0, torch.tensor(0), 0).double()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    counts = torch.histc(u, bins=100, min=0, max=1)
    chi2 = ((counts - n / 100) ** 2 / (n / 100)).sum().item()
    assert chi2 < 160
    c = u - 0.5
    assert abs((c[1:] * c[:-1]).mean().item() * 12) < 5 / math.sqrt(n)
    nxt = fast.uniform((n,), 0, torch.tensor(1), 0).double() - 0.5
    assert abs((c * nxt).mean().item() * 12) < 5 / math.sqrt(n)
    # Small values keep their resolution: u / p must stay uniform for p = 1e-3.
    small = u[u < 1e-3] / 1e-3
    assert small.unique().numel() > 0.99 * small.numel()


def test_fast_sampler_activation_rate_and_magnitudes_match_eager():
    raw = {"model": {"n_features": 8}, "instances": {"data.feature_probability": [1.0, 0.3, 0.05]}}
    for x in _both(raw):
        torch.testing.assert_close((x != 0).float().mean(dim=(0, 2)), torch.tensor([1.0, 0.3, 0.05]), atol=0.01, rtol=0)
        for i in range(3):
            active = x[:, i][x[:, i] != 0]
            assert abs(active.mean().item() - 0.5) < 0.01 and abs(active.var().item() - 1 / 12) < 0.005
    for magnitude, mean, std in (("signed", 0.0, math.sqrt(1 / 3)), ("normal", 0.5, 0.2)):
        raw = {"model": {"n_features": 4}, "data": {"magnitude": magnitude, "feature_probability": 1.0}}
        for x in _both(raw):
            assert abs(x.mean().item() - mean) < 0.01 and abs(x.std().item() - std) < 0.01
            assert x.min() >= (-1 if magnitude == "signed" else 0) and x.max() <= 1
    raw = {"model": {"n_features": 4}, "data": {"magnitude": "signed", "feature_probability": 0.1}}
    eager, fst = _both(raw)
    for x in (eager, fst):
        active = x[x != 0]
        assert abs(active.mean().item()) < 0.02 and abs(active.var().item() - 1 / 3) < 0.01


def test_fast_sampler_pairs_match_eager():
    raw = {
        "model": {"n_features": 9},
        "data": {"n_correlated_pairs": 2, "n_anticorrelated_pairs": 1, "feature_probability": 0.3},
    }
    for x in _both(raw):
        on = x[:, 0] != 0
        assert torch.equal(on[:, 0:4:2], on[:, 1:4:2])  # correlated pairs share activity
        assert not (on[:, 4] & on[:, 5]).any()  # anticorrelated pairs never together
        torch.testing.assert_close(on.float().mean(0), torch.full((9,), 0.3), atol=0.01, rtol=0)
        assert abs((on[:, 6] & on[:, 7]).float().mean().item() - 0.09) < 0.01  # independent
        # Values inside a correlated pair are independent U[0, 1].
        both = x[:, 0][on[:, 0]]
        corr = torch.corrcoef(both[:, :2].T)[0, 1].item()
        assert abs(corr) < 0.05
        assert abs(x[:, 0, 5][on[:, 5]].mean().item() - 0.5) < 0.015


@pytest.mark.parametrize("early", [False, True])
def test_fast_sampler_hierarchy_rules_match_eager(early):
    raw = {"data": {"kind": "hierarchy", "tree_depth": 3, "early_stopping": early}}
    rates = []
    for x in _both(raw, n=20_000):
        on = x[:, 0] != 0
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        lvl1, lvl2 = on[:, 0:2], on[:, 2:6]
        if early:
            assert not (lvl1[:, 0] & lvl1[:, 1]).any()
        else:
            assert torch.equal(lvl1[:, 0] ^ lvl1[:, 1], torch.ones_like(lvl1[:, 0]))
        for parent in range(2):
            kids = lvl2[:, 2 * parent : 2 * parent + 2]
            assert not (kids.any(-1) & ~lvl1[:, parent]).any()  # children of an off parent are off
            assert not (kids[:, 0] & kids[:, 1]).any()
        rates.append(on.float().mean(0))
    torch.testing.assert_close(rates[0], rates[1], atol=0.025, rtol=0)
    expected_l1 = 0.25 if early else 0.5
    torch.testing.assert_close(rates[1][:2], torch.full((2,), expected_l1), atol=0.02, rtol=0)


def test_fast_sampler_normalize():
    raw = {"model": {"n_features": 6}, "data": {"normalize": True, "feature_probability": 0.5}}
    _, x = _both(raw, n=5000)
    norms = x.norm(dim=-1)
    nonzero = norms > 0
    torch.testing.assert_close(norms[nonzero], torch.ones_like(norms[nonzero]), rtol=1e-5, atol=1e-6)


# -- the engine inside training ------------------------------------------------------------------------------------
def test_engine_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(fast.engine, "compile_available", lambda device: True)
    short = _spec({"n_features": 5}, train={"steps": 100})
    long = _spec({"n_features": 20, "d_hidden": 5}, train={"steps": 50_000, "batch_size": 1024})
    assert fast.choose_engine(short, cpu).engine == "eager"
    assert fast.choose_engine(long, cpu).engine == "fast"
    assert fast.choose_engine(_spec({"n_features": 5}, train={"engine": "fast"}), cpu).engine == "fast"
    assert fast.choose_engine(_spec({"n_features": 5}, train={"engine": "eager", "steps": 10**7}), cpu).engine == (
        "eager"
    )
    fixed = _spec({"n_features": 20}, data={"dataset_size": 100}, train={"steps": 10**6, "engine": "fast"})
    assert fast.choose_engine(fixed, cpu).engine == "fast"  # fixed training sets run on the fused step too
    monkeypatch.setattr(fast.engine, "compile_available", lambda device: False)
    assert fast.choose_engine(long, cpu).engine == "eager"
    assert fast.choose_engine(_spec({"n_features": 5}, train={"engine": "fast"}), cpu).engine == "fast-uncompiled"


def test_same_seed_same_weights_and_engine_in_meta(no_compiler, one_thread):
    spec = _spec({"n_features": 6, "d_hidden": 2}, train={"engine": "fast"}, instances={"seed": [1, 2]})
    a, b = train(spec), train(spec)
    assert a.meta["engine"] == "fast-uncompiled"
    assert torch.equal(a.model.W, b.model.W) and torch.equal(a.model.b_final, b.model.b_final)
    assert a.instances["loss"].tolist() == b.instances["loss"].tolist()
    other = train(spec.model_copy(update={"seed": 3}))
    assert not torch.equal(a.model.W, other.model.W)


def test_fast_resume_is_bit_identical(tmp_path, no_compiler, one_thread, crash_and_resume):
    import pandas as pd

    spec = _spec(
        {"n_features": 6, "d_hidden": 2},
        train={"engine": "fast", "steps": 60, "checkpoint_every": 20, "optimizer": "adamw", "weight_decay": 0.1},
        instances={"seed": [0, 1]},
    )
    straight = run(spec, tmp_path / "a")
    resumed = crash_and_resume(spec, tmp_path / "b", at_step=40)
    assert resumed.meta["engine"] == "fast-uncompiled"
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    pd.testing.assert_frame_equal(resumed.history, straight.history)


def test_compile_failure_falls_back_to_the_same_step_uncompiled(monkeypatch, one_thread):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no working compiler\nsecond line")

        return run

    spec = _spec({"n_features": 5, "d_hidden": 2}, train={"engine": "fast", "steps": 12}, instances={"seed": [0, 1]})
    monkeypatch.setattr(fast.engine, "compile_available", lambda device: True)
    monkeypatch.setattr(torch, "compile", broken_compile)
    state = TrainState.create(spec)
    assert state.engine == "fast"
    train_model(state)
    assert state.engine == "fast-uncompiled" and "no working compiler" in state.engine_reason
    plain = TrainState.create(spec)
    plain.fast = fast.FastStepper(spec, compile=False)
    train_model(plain)
    assert torch.equal(state.model.W, plain.model.W)


def test_single_graph_for_models_of_fused_products_only():
    assert fast.single_graph(_spec({"n_features": 20, "d_hidden": 5}))  # 100 <= SMALL_PRODUCT
    assert fast.single_graph(_spec({"n_features": 2, "d_hidden": 1}))
    assert not fast.single_graph(_spec({"n_features": 40, "d_hidden": 24}))  # BLAS products
    residual = {"kind": "residual-mlp", "n_features": 8, "d_hidden": 4, "d_embed": 30}
    assert not fast.single_graph(_spec(residual, {"target": "relu-plus-x"}))


def test_compile_failing_when_built_falls_back_uncompiled(monkeypatch, one_thread):
    # A compiler can fail when torch.compile is called, before any step runs (torch < 2.8 rejected an unknown
    # option there); the run must go on uncompiled, not crash.
    def old_compile(fn, **kwargs):
        raise RuntimeError("Unexpected optimization option guard_filter_fn")

    spec = _spec({"n_features": 5, "d_hidden": 2}, train={"engine": "fast", "steps": 6}, instances={"seed": [0, 1]})
    monkeypatch.setattr(fast.engine, "compile_available", lambda device: True)
    monkeypatch.setattr(torch, "compile", old_compile)
    state = TrainState.create(spec)
    train_model(state)
    assert state.engine == "fast-uncompiled" and "guard_filter_fn" in state.engine_reason
    assert state.step == 6 and torch.isfinite(state.model.W).all()


def test_fast_drop_masks_diverged_instance(no_compiler, one_thread):
    spec = _spec(
        {"n_features": 5, "d_hidden": 2},
        train={"engine": "fast", "on_divergence": "drop", "log_every": 1},
        instances={"seed": [0, 1]},
    )
    state = TrainState.create(spec)
    with torch.no_grad():
        state.model.W[0] = float("inf")
    train_model(state)
    assert state.alive.tolist() == [False, True]
    assert torch.isfinite(state.model.W).all() and torch.equal(state.model.W[0], torch.zeros_like(state.model.W[0]))
    assert state.step == spec.train.steps and state.adam.step == spec.train.steps


def test_relu_vs_linear_same_represented_features_under_both_engines(no_compiler, one_thread):
    # The paper's first figure, shortened: 20 features in 5 dims; the two engines draw different random
    # numbers, yet they must learn the same number of represented features (norm > 0.5) in every instance.
    raw = {
        "model": {"n_features": 20, "d_hidden": 5},
        "task": {"importance": 0.7},
        "train": {"steps": 2000, "batch_size": 512, "optimizer": "adamw", "weight_decay": 0.01, "log_every": 500},
        "instances": {"model.kind": ["linear", "relu-output"], "data.feature_probability": [1.0, 0.1]},
    }
    counts = {}
    for engine in ("eager", "fast"):
        spec = parse_spec({**raw, "train": {**raw["train"], "engine": engine, "eval_batch": 1024}})
        result = train(spec)
        assert result.meta["engine"] == ("eager" if engine == "eager" else "fast-uncompiled")
        counts[engine] = result.instances["n_represented"].tolist()
    assert counts["fast"] == counts["eager"]
    assert counts["eager"][1] == 5 and counts["eager"][3] > 8  # linear: d features; sparse ReLU: many more


# -- compiled and CUDA paths -----------------------------------------------------------------------------------------
def _run_steps(state: TrainState, n: int) -> list[torch.Tensor]:
    return [state.train_step().clone() for _ in range(n)]


# Importing Inductor warns about torch.jit internals, and on CUDA it suggests TF32: torch's warnings, not ours.
TORCH_COMPILE_WARNINGS = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.mark.slow
@TORCH_COMPILE_WARNINGS[0]
@TORCH_COMPILE_WARNINGS[1]
@pytest.mark.parametrize("shape, graphs", [((6, 2), 1), ((40, 24), 3)])
def test_compiled_step_equals_uncompiled_and_resumes_bit_identically(shape, graphs):
    if not fast.compile_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    model = {"n_features": shape[0], "d_hidden": shape[1]}
    spec = _spec(model, train={"engine": "fast", "steps": 40}, instances={"seed": [0, 1]})
    compiled = TrainState.create(spec)
    assert compiled.engine == "fast"
    plain = TrainState.create(spec)
    plain.fast = fast.FastStepper(spec, compile=False)
    losses_c, losses_p = _run_steps(compiled, 10), _run_steps(plain, 10)
    assert len(compiled.fast.graphs) == graphs  # one graph for all-fused models, three for BLAS ones
    torch.testing.assert_close(torch.stack(losses_c), torch.stack(losses_p), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled.model.W, plain.model.W, rtol=1e-5, atol=1e-6)
    saved = compiled.tensors()
    _run_steps(compiled, 10)
    resumed = TrainState.create(spec)
    resumed.load_tensors_(saved, 10)
    _run_steps(resumed, 10)
    for k, v in compiled.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@TORCH_COMPILE_WARNINGS[0]
@TORCH_COMPILE_WARNINGS[1]
@pytest.mark.parametrize("name", ["relu-output", "untied-biases", "residual-skip"])
def test_cuda_fast_engine_matches_cpu_and_resumes(name):
    model, task = MODELS[name]
    data = {"magnitude": "signed"} if task.get("target") == "relu-plus-x" else {}
    spec = _spec(model, task, data, train={"engine": "fast", "steps": 40}, instances={"seed": [0, 1]})
    spec = spec.model_copy(update={"device": "cuda"})
    gpu = TrainState.create(spec)
    cpu = TrainState.create(spec, torch.device("cpu"))
    cpu.fast = fast.FastStepper(spec, compile=False)
    losses_g = torch.stack(_run_steps(gpu, 10)).cpu()
    losses_c = torch.stack(_run_steps(cpu, 10))
    # Same counter-based stream on both devices: the same batches, so the same losses up to rounding.
    torch.testing.assert_close(losses_g, losses_c, rtol=1e-4, atol=1e-6)
    saved = gpu.tensors()
    _run_steps(gpu, 10)
    resumed = TrainState.create(spec)
    resumed.load_tensors_(saved, 10)
    _run_steps(resumed, 10)
    for k, v in gpu.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_fixed_full_batch_dataset_trains_the_same_on_both_engines(no_compiler, one_thread):
    """A training set no larger than a batch is the whole batch in both engines: same data every step, so the
    fused step and the eager one trace the same trajectory up to float rounding."""
    spec = _spec(
        {"n_features": 12, "d_hidden": 2},
        data={"dataset_size": 40, "feature_probability": 0.2},
        train={"steps": 300, "optimizer": "adamw", "weight_decay": 0.01},
        instances={"seed": [0, 1, 2]},
    )
    runs = {
        e: train(spec.model_copy(update={"train": spec.train.model_copy(update={"engine": e})}))
        for e in ("eager", "fast")
    }
    assert runs["fast"].meta["engine"] == "fast-uncompiled" and runs["eager"].meta["engine"] == "eager"
    for name in ("W", "b_final"):
        a, b = getattr(runs["eager"].model, name).detach(), getattr(runs["fast"].model, name).detach()
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, (a - b).abs().max())
    np.testing.assert_allclose(runs["fast"].instances["train_loss"], runs["eager"].instances["train_loss"], rtol=1e-3)


def test_fixed_dataset_larger_than_a_batch_is_drawn_uniformly():
    """T > batch: each step takes batch_size columns of the training set, uniformly with replacement, the same
    columns for every instance. 100 steps x 64 draws over T = 80: every count is Binomial(6400, 1/80), mean 80,
    sd 8.9; all 80 within 5 sd is certain to 1e-4."""
    spec = _spec({"n_features": 6, "d_hidden": 2}, data={"dataset_size": 80}, instances={"seed": [0, 1]})
    cfg = fast.fast_config(spec)
    data = torch.arange(2 * 6 * 80, dtype=torch.float32).view(2, 6, 80)  # column t holds values ... + t
    counts = torch.zeros(80)
    for step in range(100):
        x = fast.training_batch(cfg, {"dataset": data, "keys": fast.stream_keys(0)}, torch.tensor(step))
        assert x.shape == (2, 6, 64)
        cols = x[0, 0].long()
        assert torch.equal(data[:, :, cols], x)  # whole columns, the same for both instances
        counts += torch.bincount(cols, minlength=80)
    assert (counts - 80).abs().max() < 5 * 8.9
