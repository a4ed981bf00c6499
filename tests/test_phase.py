"""Empirical phase diagrams: grid bookkeeping, classification, agreement, and a CI-sized trained 2×1 diagram."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from superposition import phase
from superposition import theory as T
from superposition.models import build_model
from superposition.runs import Run, train
from superposition.spec import SpecError, load_spec, parse_spec

R2 = [0.2, 1.0, 5.0]
P2 = [0.02, 0.3, 1.0]


def _spec(seeds=(0, 1), n=2, m=1, **model):
    imp = [[1.0] * (n - 1) + [r] for r in R2]
    return parse_spec(
        {
            "model": {"kind": "relu-output", "n_features": n, "d_hidden": m, **model},
            "instances": {"axes": {"task.importance": imp, "data.feature_probability": P2, "seed": list(seeds)}},
        }
    )


def test_phase_grid_cells():
    spec = _spec()
    grid = phase.phase_grid(spec)
    np.testing.assert_allclose(grid.importances, [[1.0, r] for r in R2])
    np.testing.assert_allclose(grid.probabilities, P2)
    # product order: importance slowest, seed fastest
    assert grid.row.tolist() == [i for i in range(3) for _ in range(3) for _ in range(2)]
    assert grid.col.tolist() == [j for _ in range(3) for j in range(3) for _ in range(2)]
    # ratio importances (I_i = r^i) give the same grid
    ratio = parse_spec(
        {
            "model": {"n_features": 2, "d_hidden": 1},
            "instances": {"axes": {"task.importance": R2, "data.feature_probability": P2}},
        }
    )
    np.testing.assert_allclose(phase.phase_grid(ratio).importances, [[1.0, r] for r in R2])


def test_phase_spec_checks():
    with pytest.raises(SpecError, match="tied relu-output"):
        phase.check_phase_spec(_spec(kind="linear"))
    with pytest.raises(SpecError, match="tied relu-output"):
        phase.check_phase_spec(_spec(tied=False))
    phase.check_phase_spec(_spec())


def _planted_run(spec, Ws, bs) -> Run:
    """A run whose instances carry the given weights (no training); loss column from the exact loss."""
    model = build_model(spec)
    model.W.data.copy_(torch.as_tensor(np.stack(Ws), dtype=torch.float32))
    model.b_final.data.copy_(torch.as_tensor(np.stack(bs), dtype=torch.float32))
    grid = phase.phase_grid(spec)
    exact = T.config_loss(
        model.W.detach().double(),
        model.b_final.detach().double(),
        torch.as_tensor(grid.importances[grid.row]),
        torch.as_tensor(grid.probabilities[grid.col]),
    ).loss.numpy()
    table = pd.DataFrame({"instance": np.arange(spec.n_instances), "loss": exact / spec.model.n_features})
    return Run(spec=spec, model=model, history=pd.DataFrame(), instances=table, meta={})


def test_empirical_diagram_picks_the_lowest_loss_seed_and_agrees_with_the_analytic_winner():
    spec = _spec(seeds=(0, 1))
    grid = phase.phase_grid(spec)
    ana = T.analytic_phase_diagram(2, 1, grid.importances, grid.probabilities, "bias")
    cands = T.candidates(2, 1)
    # seed 0: the analytic winner at its best bias; seed 1: the worst maximal candidate at the same biases
    Ws, bs, expect_class = [], [], []
    for i in range(3):
        for j in range(3):
            win = ana.winner[i, j]
            lose = int(np.argmax(ana.losses[i, j]))
            for k in (win, lose):
                Ws.append(ana.candidates[k].W * 1.0)
                bs.append(ana.biases[i, j, k])
            expect_class.append([c.name for c in cands].index(ana.candidates[win].name))
    run = _planted_run(spec, Ws, bs)
    emp = phase.empirical_diagram(run)
    assert emp.best_instance.reshape(-1).tolist() == [2 * c for c in range(9)]  # always seed 0
    assert emp.winner.reshape(-1).tolist() == expect_class
    np.testing.assert_allclose(emp.exact_loss, ana.losses.min(-1) / 2, rtol=1e-5)
    assert phase.agreement(emp, ana).all()
    assert emp.found.sum(-1).min() >= 1
    # plant the loser everywhere: agreement only where the loser ties the winner (never here)
    Ws2 = [Ws[k] for k in range(1, 18, 2) for _ in range(2)]
    bs2 = [bs[k] for k in range(1, 18, 2) for _ in range(2)]
    emp2 = phase.empirical_diagram(_planted_run(spec, Ws2, bs2))
    assert not phase.agreement(emp2, ana).any()


def test_agreement_counts_symmetric_twins():
    # 3 features in 2 dims with I = (1, 1, r): dropping feature 1 or feature 2 is the same loss.
    spec = _spec(seeds=(0,), n=3, m=2)
    grid = phase.phase_grid(spec)
    ana = T.analytic_phase_diagram(3, 2, grid.importances, grid.probabilities, "paper")
    names = [c.name for c in ana.candidates]
    twin = {"dedicated(2)+dedicated(3)": "dedicated(1)+dedicated(3)"}
    twin.update({v: k for k, v in twin.items()})
    twin.update({"dedicated(1)+antipodal(2,3)": "antipodal(1,3)+dedicated(2)"})
    twin.update({"antipodal(1,3)+dedicated(2)": "dedicated(1)+antipodal(2,3)"})
    Ws, bs = [], []
    for i in range(3):
        for j in range(3):
            k = ana.winner[i, j]
            k2 = names.index(twin.get(names[k], names[k]))
            Ws.append(ana.candidates[k2].W)
            bs.append(np.where(np.diag(ana.candidates[k2].gram) > 0.5, 0.0, grid.probabilities[j] / 2))
    emp = phase.empirical_diagram(_planted_run(spec, Ws, bs))
    assert phase.agreement(emp, ana).all()


def test_trained_two_by_one_diagram_agrees_with_the_analytic_one():
    """CI-sized: the quick phase-diagram preset (5 × 5 cells × 2 seeds, 1500 steps) as one run."""
    spec = load_spec("phase-diagram", quick=True)
    assert spec.n_instances == 50
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add overhead (and stall on a busy machine)
    try:
        emp = phase.empirical_diagram(train(spec))
    finally:
        torch.set_num_threads(threads)
    grid = emp.grid
    for convention in ("paper", "bias"):
        ana = T.analytic_phase_diagram(2, 1, grid.importances, grid.probabilities, convention)
        assert phase.agreement(emp, ana).mean() >= 0.8
    # every cell's best seed is close to the best analytic candidate's loss (free parameters only help it)
    ana = T.analytic_phase_diagram(2, 1, grid.importances, grid.probabilities, "bias")
    assert np.all(emp.exact_loss <= ana.losses.min(-1) / 2 * 1.15 + 1e-5)


def test_phase_figures_trace_counts():
    from superposition import plots

    spec = _spec(seeds=(0,), n=3, m=2)
    grid = phase.phase_grid(spec)
    ana = T.analytic_phase_diagram(3, 2, grid.importances, grid.probabilities, "paper")
    # plant the analytic winners, except one cell that gets a twin and one that gets a wrong candidate
    names = [c.name for c in ana.candidates]
    Ws = [ana.candidates[ana.winner[i, j]].W for i in range(3) for j in range(3)]
    bs = [
        np.where(np.diag(ana.candidates[ana.winner[i, j]].gram) > 0.5, 0.0, P2[j] / 2)
        for i in range(3)
        for j in range(3)
    ]
    Ws[0] = ana.candidates[names.index("triangle(1,2,3)")].W
    emp = phase.empirical_diagram(_planted_run(spec, Ws, bs))
    agree = phase.agreement(emp, ana)
    assert agree.sum() == 8 and not agree[0, 0]
    fig = plots.phase_comparison(ana, emp)
    present = {emp.candidates[w].name for w in emp.winner.reshape(-1)}
    # twins share a colour: count the symmetry classes among the trained winners
    sym = T.symmetry_classes(ana.candidates, ana.importances)
    classes = {int(sym[names.index(n)]) for n in present}
    assert len(fig.data) == 1 + len(classes) + 1
    assert fig.data[0].type == "heatmap" and fig.data[-1].name.startswith("trained winner")
    assert len(fig.data[-1].x) == 1
    gap = plots.phase_gap(ana)
    assert len(gap.data) == 1 and gap.data[0].type == "heatmap"
    assert np.all(np.isfinite(np.asarray(gap.data[0].z, dtype=float)))
