"""The shipped presets: every one parses, validates and keeps its shapes under --quick; each --quick run shows the
qualitative result of its source; the preset-specific analysis (transplant, computed features, antipodal neuron
pairs) is exact on hand-built weights; scripts/reproduce.py keeps other engineers' rows when it rewrites the table.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import math
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from superposition import metrics
from superposition import sweep as sw
from superposition.data import importance_tensor
from superposition.models import ACTIVATIONS, build_model, transplant
from superposition.runs import train
from superposition.spec import load_spec, parse_spec, preset_description, preset_names
from superposition.theory import tmcc_naive_loss

ROOT = Path(__file__).resolve().parents[1]

# The presets this file owns (other engineers test theirs: phase-diagram*, hierarchy, sae-*).
OWNED = [
    "relu-vs-linear",
    "demo",
    "tied-vs-untied",
    "pentagon",
    "neuron-model",
    "abs-computation",
    "abs-discrete",
    "asymmetric-motif",
    "correlated",
    "anticorrelated",
    "geometry",
    "compressed-computation",
    "compressed-computation-clean",
    "transplant",
    "l1-computation",
    "l1-computation-scratch",
    "multi-layer-computation",
    "double-descent",
]
SHAPE_FIELDS = ("kind", "n_features", "d_hidden", "tied", "n_layers", "d_embed", "embedding", "skip")


pytestmark = pytest.mark.usefixtures("one_thread")


def _probs(spec) -> np.ndarray:
    return np.asarray(spec.instance_values("data.feature_probability"), dtype=np.float64)


def _train_quick(name: str):
    """Train a preset's --quick version in memory: one Run, or a list of (point values, Run) for a sweep."""
    spec = load_spec(name, quick=True)
    if spec.sweep is None:
        return train(spec)
    plan = sw.make_plan(spec)
    assert plan.n_invalid == 0
    return [(plan.points[g.points[0]].values, train(g.experiment())) for g in plan.groups]


# -- every preset ----------------------------------------------------------------------------------------------------
def test_owned_presets_are_shipped():
    assert set(OWNED) <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_preset_parses_and_quick_keeps_shapes(name):
    full, quick = load_spec(name), load_spec(name, quick=True)
    assert full.name == name
    first = preset_description(name)
    assert first and "\n" not in first
    assert "What to look for" in full.description
    for field in SHAPE_FIELDS:
        assert getattr(quick.model, field) == getattr(full.model, field), field
    assert quick.data.kind == full.data.kind and quick.task == full.task
    assert quick.train.steps <= full.train.steps
    assert quick.n_instances <= full.n_instances
    if full.sweep is not None:  # every point of a sweep validates, and quick points are full points
        plan, qplan = sw.make_plan(full), sw.make_plan(quick)
        assert plan.n_invalid == 0 and qplan.n_invalid == 0
        assert len(qplan.points) <= len(plan.points)


def test_presets_command_lists_each_preset_on_one_line():
    from superposition.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["presets"]) == 0
    lines = buf.getvalue().splitlines()
    assert len(lines) == len(preset_names())
    for name in OWNED:
        (line,) = [ln for ln in lines if ln.split()[0] == name]
        assert line.split(None, 1)[1].strip() == preset_description(name)


def test_quick_instance_axis_overrides_replace_the_preset_axis():
    full, quick = load_spec("geometry"), load_spec("geometry", quick=True)
    assert full.n_instances == 20 and _probs(quick).tolist() == [1.0, 0.1, 0.01]
    spec = load_spec("relu-vs-linear", ["instances.data.feature_probability=[0.5, 0.1]"])
    assert list(spec.instances.axes) == ["model.kind", "data.feature_probability"]  # order kept
    assert spec.n_instances == 4 and spec.grid()[1] == {"model.kind": "linear", "data.feature_probability": 0.1}


def test_importance_starts_at_exponent_one_where_the_curriculum_does():
    spec = load_spec("neuron-model")
    expected = torch.tensor([0.75 ** (i + 1) for i in range(10)])
    assert torch.allclose(importance_tensor(spec)[0], expected)
    assert torch.allclose(importance_tensor(load_spec("relu-vs-linear"))[0, :3], torch.tensor([1.0, 0.7, 0.49]))


def test_source_settings():
    cc = load_spec("compressed-computation")
    m, t = cc.model, cc.train
    assert (m.n_features, m.d_hidden, m.d_embed, m.skip, m.bias_out, m.bias_hidden) == (100, 50, 1000, True, 0, 0)
    assert (t.optimizer, t.lr, t.weight_decay, t.schedule, t.batch_size, t.steps) == (
        "adamw",
        3e-3,
        0.01,
        "cosine",
        2048,
        10000,
    )
    assert cc.task.target == "relu-plus-x" and cc.task.residual_factor == 1 and cc.data.magnitude == "signed"
    assert math.isclose(tmcc_naive_loss(100, 50, 1.0), 1 / 12)
    tvu = load_spec("tied-vs-untied")
    assert np.allclose(1 - _probs(tvu), [0, 0.7, 0.9, 0.99, 0.999])
    assert tvu.data.normalize and tvu.data.dataset_size and tvu.train.weight_decay == 0.01
    assert sw.make_plan(tvu).groups[1].experiment().model.tied is False
    ml = sw.make_plan(load_spec("multi-layer-computation"))
    shapes = sorted((g.experiment().model.n_layers, g.experiment().model.d_hidden) for g in ml.groups)
    assert shapes == [(2, 25), (3, 17)]


# -- preset-specific analysis on hand-built weights ------------------------------------------------------------------
def _naive_residual(model, x):
    r = torch.einsum("bif,ife->bie", x, model.W_E)
    for layer, act in enumerate(model.activations):
        pre = torch.einsum("bie,ihe->bih", r, model.W_in[:, layer])
        if hasattr(model, "b_in"):
            pre = pre + model.b_in[:, layer]
        out = torch.einsum("bih,ieh->bie", ACTIVATIONS[act](pre), model.W_out[:, layer])
        if hasattr(model, "b_out"):
            out = out + model.b_out[:, layer]
        r = r + out if model.skip else out
    return torch.einsum("bie,ife->bif", r, model.W_E)


def _residual_spec(skip=True, bias=False, layers=1, embedding="random-fixed"):
    return parse_spec(
        {
            "model": {
                "kind": "residual-mlp",
                "n_features": 12,
                "d_hidden": 5,
                "d_embed": 40 if embedding == "random-fixed" else 12,
                "embedding": embedding,
                "skip": skip,
                "bias_hidden": bias,
                "bias_out": bias,
                "n_layers": layers,
            },
            "data": {"magnitude": "signed"},
            "task": {"target": "relu-plus-x"},
            "instances": {"seed": [1, 2, 3]},
        }
    )


def _randomised(spec):
    model = build_model(spec).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize(
    ("skip", "bias", "layers", "embedding"),
    list(itertools.product([True, False], [True, False], [1, 3], ["random-fixed", "identity"])),
)
def test_residual_forward_equals_the_explicit_residual_stream(skip, bias, layers, embedding):
    model = _randomised(_residual_spec(skip, bias, layers, embedding))
    x = torch.randn(7, 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = _naive_residual(model, x)
    with torch.no_grad():
        assert torch.allclose(model(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_transplant_is_exact_without_skip_and_off_by_the_embedding_noise_with_it(bias):
    x = torch.randn(50, 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec = _residual_spec(skip=False, bias=bias)
    model = _randomised(spec)
    plain = transplant(model, spec)
    assert plain.spec.model.embedding == "identity" and plain.spec.model.d_embed == 12
    with torch.no_grad():
        assert torch.allclose(plain.model(x), model(x), rtol=1e-12, atol=1e-12)
        spec = _residual_spec(skip=True, bias=bias)
        model = _randomised(spec)
        noise = torch.einsum("ife,ige->ifg", model.W_E, model.W_E) - torch.eye(12, dtype=torch.float64)
        diff = model(x) - transplant(model, spec).model(x)
        assert torch.allclose(diff, torch.einsum("bif,ifg->big", x, noise), rtol=1e-10, atol=1e-10)


def test_transplant_needs_one_residual_layer():
    from superposition.spec import SpecError

    spec = _residual_spec(layers=3)
    with pytest.raises(SpecError, match="one-layer"):
        transplant(build_model(spec), spec)


def _abs_circuit():
    """3 features, 4 neurons: feature 0 computed by an antipodal pair, feature 1 by one neuron, feature 2 dropped."""
    spec = parse_spec(
        {
            "model": {"kind": "mlp", "n_features": 3, "d_hidden": 4, "bias_out": False},
            "data": {"magnitude": "signed"},
            "task": {"target": "abs"},
        }
    )
    model = build_model(spec)
    with torch.no_grad():
        model.W1.copy_(torch.tensor([[[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]]]))
        model.W2.copy_(torch.tensor([[[1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0]]]))
    return spec, model


def test_computation_probe_on_a_hand_built_abs_circuit():
    spec, model = _abs_circuit()
    comp = metrics.computation(model, spec)
    # feature 0: |x| exactly; feature 1: ReLU(x) only (error 1 at x = -1); feature 2: 0 (error 1 at x = +-1)
    assert torch.allclose(comp.error, torch.tensor([[0.0, 1.0, 1.0]]))
    assert torch.allclose(comp.nonlinear, torch.tensor([[2.0, 1.0, 0.0]]))
    assert metrics.abs_pairs(model.W1, model.W2).tolist() == [[1.0, 0.0, 0.0]]
    out = metrics.instance_metrics(model, spec)
    assert out["n_computed"].tolist() == [1] and out["n_abs_pairs"].tolist() == [1]


def test_computation_probe_on_relu_plus_x():
    # A plain MLP (identity embedding, skip) with one neuron per feature for the first 2 features: y = x + ReLU(x).
    spec = parse_spec(
        {
            "model": {"kind": "residual-mlp", "n_features": 3, "d_hidden": 2, "embedding": "identity"},
            "data": {"magnitude": "signed"},
            "task": {"target": "relu-plus-x", "residual_factor": 1.0},
        }
    )
    model = build_model(spec)
    with torch.no_grad():
        model.W_in.copy_(torch.tensor([[[[1.0, 0, 0], [0, 1.0, 0]]]]))
        model.W_out.copy_(torch.tensor([[[[1.0, 0], [0, 0.5], [0, 0]]]]))
    comp = metrics.computation(model, spec)
    assert torch.allclose(comp.error, torch.tensor([[0.0, 0.5, 1.0]]))
    assert torch.allclose(comp.nonlinear, torch.tensor([[1.0, 0.5, 0.0]]))


# -- the --quick runs: one qualitative result each -------------------------------------------------------------------
def test_relu_vs_linear_quick():
    run = _train_quick("relu-vs-linear")
    df = run.instances.assign(p=_probs(run.spec))
    lin = df[df["model.kind"] == "linear"]
    relu = df[df["model.kind"] == "relu-output"].sort_values("p")
    assert (lin["n_represented"] == 5).all()  # the linear model represents exactly d features (PCA)
    assert relu["n_represented"].iloc[-1] == 5  # p = 1: no superposition
    assert relu["n_represented"].iloc[0] >= 9  # p = 0.001: more features than dimensions


def test_tied_vs_untied_quick():
    runs = {bool(v["model.tied"]): r for v, r in _train_quick("tied-vs-untied")}
    tied, untied = runs[True].instances, runs[False].instances
    assert tied["n_learned_diag"].iloc[0] == 5  # S = 0: the 5 most important features
    assert tied["n_learned_diag"].iloc[-1] >= 12  # S = 0.999: superposition
    assert untied["n_learned_diag"].iloc[0] == 5
    assert untied["n_learned_diag"].iloc[-1] > 5
    fractions = untied[["ternary_pos", "ternary_neg", "ternary_zero"]].to_numpy()
    assert (fractions.sum(axis=1) <= 1 + 1e-9).all() and "ternary_pos" not in tied


def test_pentagon_quick():
    run = _train_quick("pentagon")
    W = run.model.encoder.detach().float()
    assert run.instances["n_represented"].iloc[0] == 2  # p = 1: the two most important features, orthogonal
    last = W[int(np.argmin(_probs(run.spec)))]
    assert (last.norm(dim=0) > 0.8).all()
    theta = np.sort(np.degrees(np.arctan2(last[1].numpy(), last[0].numpy())) % 360)
    gaps = np.diff(np.concatenate([theta, theta[:1] + 360]))
    assert np.allclose(gaps, 72, atol=10)  # a regular pentagon


def test_neuron_model_quick():
    run = _train_quick("neuron-model")
    mono = run.instances["monosemanticity"].to_numpy()  # p = 0.75 first, 0.01 last
    assert mono[0] > 0.9  # dense: each neuron reads one feature
    assert mono[-1] < mono[0] - 0.15  # sparse: polysemantic neurons


def test_abs_computation_quick():
    run = _train_quick("abs-computation")
    df = run.instances.assign(p=_probs(run.spec))
    dense = df[df["p"] == 1.0].iloc[0]
    # Dense data: monosemantic neurons, and every feature the model computes has W1 neurons of both signs that
    # write positively to it (the |x| = ReLU(x) + ReLU(-x) circuit).
    assert dense["monosemanticity"] > 0.95
    assert dense["n_computed"] >= 3
    i = int(np.flatnonzero(df["p"].to_numpy() == 1.0)[0])
    computed = metrics.computation(run.model, run.spec).error[i] < 0.25
    paired = metrics.abs_pairs(run.model.W1.detach(), run.model.W2.detach())[i] > 0
    assert bool((paired | ~computed).all())  # computed features are a subset of the paired ones


def test_abs_discrete_quick():
    run = _train_quick("abs-discrete")
    assert (run.instances["n_abs_pairs"] >= 3).all()
    assert (run.instances["monosemanticity"] > 0.8).all()


def test_asymmetric_motif_quick():
    # The motif is in 7 of 24 seeds at full length (docs/RESULTS.md); the quick preset trains those 7 seeds for
    # 1500 steps (6 s). Asserted: at p = 0.35 the neurons are still mostly monosemantic, the finder flags at least one
    # motif with a cancelling neuron, and every motif it reports is one (swapped magnitudes, a neuron that cancels).
    run = _train_quick("asymmetric-motif")
    assert (run.instances["monosemanticity"] > 0.8).all()
    W1, W2 = run.model.W1.detach(), run.model.W2.detach()
    found = metrics.asymmetric_motifs(W1, W2)
    assert run.instances["n_motifs"].sum() == len(found)
    assert any(m.cancelling_neuron is not None for m in found)
    for m in found:
        i, j = m.features
        assert W1[m.instance, m.neuron, i].abs() >= 2 * W1[m.instance, m.neuron, j].abs()
        assert W2[m.instance, j, m.neuron] >= 2 * W2[m.instance, i, m.neuron] > 0
        if m.cancelling_neuron is not None:
            assert W2[m.instance, j, m.cancelling_neuron] < 0


def test_correlated_quick():
    run = _train_quick("correlated")
    W = run.model.encoder.detach().float()
    k = int(np.argmin(_probs(run.spec)))
    cos = metrics.pair_cosines(W, 2, 0).correlated[k]
    norms = metrics.feature_norms(W)[k]
    both = (norms[0::2] > 0.5) & (norms[1::2] > 0.5)
    assert both.any()
    assert (cos[both].abs() < 0.3).all()  # a correlated pair gets a local orthogonal basis


def test_anticorrelated_quick():
    run = _train_quick("anticorrelated")
    assert run.instances["cos_anti"].min() < -0.5  # an anticorrelated pair goes antipodal


def test_geometry_quick():
    run = _train_quick("geometry")
    dpf = run.instances["dims_per_feature"].to_numpy()  # p = 1, 0.1, 0.01
    assert abs(dpf[0] - 1) < 0.1
    assert dpf[0] > dpf[1] > dpf[2]


def _l_over_p(run) -> float:
    return float(run.instances["loss"].iloc[0]) / float(_probs(run.spec)[0])


def test_compressed_computation_quick():
    run = _train_quick("compressed-computation")
    assert _l_over_p(run) < tmcc_naive_loss(100, 50, 1.0)


def test_compressed_computation_clean_quick():
    run = _train_quick("compressed-computation-clean")
    assert _l_over_p(run) > 0.97 * tmcc_naive_loss(100, 50, 1.0)


def test_transplant_quick():
    run = _train_quick("transplant")
    loss, moved = float(run.instances["loss"].iloc[0]), float(run.instances["transplant_loss"].iloc[0])
    assert moved == pytest.approx(loss, rel=1e-5)


def test_l1_computation_quick():
    run = _train_quick("l1-computation")
    assert list(dict.fromkeys(run.history["phase"])) == ["l2", "l1"]  # the L2 phase, then the L1 one
    comp = metrics.computation(run.model, run.spec)
    assert int((comp.nonlinear > 0.9).sum()) <= run.spec.model.d_hidden + 2


def test_l1_computation_scratch_quick():
    run = _train_quick("l1-computation-scratch")
    assert "phase" not in run.history and run.spec.task.loss == "l1"
    comp = metrics.computation(run.model, run.spec)
    assert int((comp.nonlinear > 0.9).sum()) <= run.spec.model.d_hidden + 2


def test_multi_layer_computation_quick():
    for _, run in _train_quick("multi-layer-computation"):
        assert _l_over_p(run) < 1 / 6  # below the loss of computing nothing (E[ReLU(x)^2] = p/6)


def test_double_descent_quick():
    results = {int(r.spec.data.dataset_size): r.instances for _, r in _train_quick("double-descent")}
    ratio = {t: df["train_loss"].mean() / df["loss"].mean() for t, df in results.items()}
    assert ratio[5] < 0.2  # 5 points: memorised (train loss far below the test loss)
    assert ratio[50] > 0.5  # 50 points: no longer memorised


# -- scripts/reproduce.py --------------------------------------------------------------------------------------------
def _reproduce_module():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce", module)
    spec.loader.exec_module(module)
    return module


def test_reproduce_table_keeps_other_rows_and_replaces_its_own():
    rp = _reproduce_module()
    assert set(rp.EXTRACTORS) <= set(preset_names())
    text = (
        "# Results\n\nintro\n\n"
        f"{rp.BEGIN}\n{rp.HEADER}\n| hierarchy | `x` | 1 h | a | b | yes |\n| pentagon | `y` | 1 s | old | s | no |\n"
        f"{rp.END}\n\nnotes\n"
    )
    new = rp.update_table(text, {"pentagon": "| pentagon | `y` | 2 s | new | s | yes |", "geometry": "| geometry |"})
    body = new.split(rp.BEGIN)[1].split(rp.END)[0]
    assert "| hierarchy | `x` | 1 h | a | b | yes |" in body and "old" not in body
    assert body.index("hierarchy") < body.index("| pentagon") < body.index("| geometry")
    assert new.startswith("# Results\n\nintro") and new.endswith("notes\n")
    assert rp.update_table(new, {}) == new
