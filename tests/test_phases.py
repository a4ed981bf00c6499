"""Training in phases and starting from a run: the spec rules, phases in order with one history, a fresh optimiser
per phase, resume inside phase 2 bit-identical (eager and fused), the fused engine against itself uncompiled and
against the eager one, and ``train.init_from`` (shapes checked in one line)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import superposition.runs as runs
from superposition.cli import main
from superposition.fast import compile_available
from superposition.record import load_run, start_state
from superposition.spec import SpecError, load_spec, parse_spec
from superposition.train import train_model

PHASES = [{"name": "warm", "steps": 20, "loss": "l2"}, {"name": "sharp", "steps": 16, "loss": "l1", "lr": 3e-3}]


pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(engine: str = "eager", **train):
    return parse_spec(
        {
            "name": "phased",
            "model": {"n_features": 5, "d_hidden": 2},
            "data": {"feature_probability": 0.2},
            "train": {"batch_size": 64, "log_every": 4, "eval_batch": 256, "phases": PHASES, "engine": engine} | train,
            "instances": {"seed": [0, 1, 2]},
        }
    )


# -- the spec ----------------------------------------------------------------------------------------------------------
def test_phase_spec_rules():
    spec = _spec()
    assert spec.train.steps == 36 and spec.train.phase_starts == [0, 20]
    assert [spec.train.phase_at(s) for s in (0, 19, 20, 35, 36)] == [0, 0, 1, 1, 1]
    two = spec.phase_spec(1)
    assert (two.train.steps, two.train.lr, two.task.loss, two.train.phases) == (16, 3e-3, "l1", [])
    assert spec.phase_spec(0).train.lr == 1e-3 and spec.phase_spec(0).task.loss == "l2"
    with pytest.raises(SpecError, match=r"train.steps: 30 is not the sum of the phases' steps \(36\)"):
        _spec(steps=30)
    with pytest.raises(SpecError, match=r"train.phases\[1\].lr: train.lr varies across instances"):
        parse_spec({"train": {"phases": PHASES}, "instances": {"train.lr": [1e-3, 3e-3]}})
    quick = load_spec("l1-computation", quick=True)
    assert [p.steps for p in quick.train.phases] == [150, 150] and quick.train.steps == 300
    assert [p.loss for p in quick.train.phases] == ["l2", "l1"]


# -- training ----------------------------------------------------------------------------------------------------------
def test_phases_run_in_order_with_one_history_and_a_fresh_optimiser():
    spec = _spec()
    state = start_state(spec)
    before = {}

    real = state.enter_phase

    def spy(i):
        before.update({k: v.detach().clone() for k, v in state.model.named_parameters()})
        real(i)

    state.enter_phase = spy
    # Stop right after the first step of phase 2 to look at it.
    state.spec = spec
    while state.step < 21:
        if state.step == 20:
            state.enter_phase(1)
        state.train_step()
    assert state.phase == 1 and state.adam.step == 1
    # Adam's first step moves every weight with a non-zero gradient by lr (its moments were reset): phase 2's lr.
    moved = max(float((p.detach() - before[k]).abs().max()) for k, p in state.model.named_parameters())
    assert moved == pytest.approx(3e-3, rel=1e-3)

    run = runs.train(spec)
    h = run.history
    assert list(dict.fromkeys(h["phase"])) == ["warm", "sharp"]
    assert h.loc[h["phase"] == "warm", "step"].max() < 20 <= h.loc[h["phase"] == "sharp", "step"].min()
    assert h["step"].max() == 35
    # The run's final loss is the last phase's loss (L1): recompute it on the same evaluation batch.
    gen = torch.Generator().manual_seed(spec.seed + 7_777_777)
    st = start_state(spec)
    st.enter_phase(1)
    x = torch.cat([st.sampler.sample(64, gen) for _ in range(4)])  # evaluate draws batch_size at a time
    with torch.no_grad():
        l1 = (run.model(x) - x).abs().mean(dim=(0, 2)).numpy()
    np.testing.assert_allclose(run.instances["loss"].to_numpy(), l1, rtol=1e-5)


@pytest.mark.parametrize("engine", ["eager", "fast-uncompiled"])
@pytest.mark.parametrize("kill_at", [20, 28])  # at the boundary (a checkpoint of phase 1's end) and inside phase 2
def test_killed_in_phase_two_and_resumed_is_bit_identical(tmp_path, monkeypatch, engine, kill_at):
    import superposition.fast as fast

    if engine == "fast-uncompiled":
        monkeypatch.setattr(fast.engine, "compile_available", lambda device: False)
    spec = _spec("eager" if engine == "eager" else "fast", checkpoint_every=4)
    straight = runs.run(spec, tmp_path / "a", report=False)
    assert straight.meta["engine"] == engine
    real = runs.save_checkpoint

    def crash(folder, state):
        real(folder, state)
        if state.step == kill_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.run(spec, tmp_path / "b", report=False)
    monkeypatch.setattr(runs, "save_checkpoint", real)
    resumed = runs.run(spec, tmp_path / "b", resume=True, report=False)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert straight.history.equals(resumed.history)
    assert straight.instances["loss"].equals(resumed.instances["loss"])


@pytest.mark.skipif(not compile_available(torch.device("cpu")), reason="no C++ compiler")
def test_fused_engine_on_two_phases_matches_itself_uncompiled_and_the_eager_engine(monkeypatch):
    import superposition.fast as fast

    compiled = runs.train(_spec("fast"))
    assert compiled.meta["engine"] == "fast"
    monkeypatch.setattr(fast.engine, "compile_available", lambda device: False)
    plain = runs.train(_spec("fast"))
    assert plain.meta["engine"] == "fast-uncompiled"
    for k, v in compiled.model.state_dict().items():
        torch.testing.assert_close(v, plain.model.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)
    # The eager engine draws other numbers (a generator, not counters): same law, so the same losses within noise.
    longer = {"phases": [{"steps": 300, "loss": "l2"}, {"steps": 300, "loss": "l1", "lr": 3e-3}]}
    monkeypatch.undo()
    fused, eager = runs.train(_spec("fast", **longer)), runs.train(_spec("eager", **longer))
    np.testing.assert_allclose(fused.instances["loss"].mean(), eager.instances["loss"].mean(), rtol=0.15)


# -- init_from ---------------------------------------------------------------------------------------------------------
def test_init_from_starts_from_the_runs_weights_and_refuses_other_shapes(tmp_path, capsys):
    source = runs.run(_spec(), tmp_path / "src", report=False)
    spec = parse_spec(
        {
            "name": "continued",
            "model": {"n_features": 5, "d_hidden": 2},
            "train": {"steps": 5, "init_from": str(tmp_path / "src")},
            "instances": {"seed": [7, 8, 9]},
        }
    )
    state = start_state(spec)
    for k, v in load_run(tmp_path / "src").model.state_dict().items():
        assert torch.equal(state.model.state_dict()[k], v), k
    assert source.spec.train.phases  # (a phased run is a valid source like any other)
    train_model(state)
    # A wrong shape, an unknown folder: one line on stderr, exit 2, nothing written.
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'name = "bad"\n[model]\nn_features = 6\nd_hidden = 2\n[train]\nsteps = 5\ninit_from = "{tmp_path / "src"}"\n'
        "[instances]\nseed = [0, 1, 2]\n"
    )
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.init_from" in err[0] and "shape (3, 2, 5)" in err[0] and "(3, 2, 6)" in err[0]
    assert not (tmp_path / "out").exists()
    bad.write_text('name = "bad"\n[train]\nsteps = 5\ninit_from = "no/such/run"\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.init_from" in err[0] and "no/such/run" in err[0]
