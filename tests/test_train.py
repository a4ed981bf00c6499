import math

import pytest
import torch

from superposition.runs import train
from superposition.spec import parse_spec
from superposition.train import AdamState, TrainState, adam_step_, lr_multiplier, per_instance_loss, train_model


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_step_matches_torch(optimizer):
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, 5, generator=g)
    ref = p0.clone().requires_grad_(True)
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    opt = cls([ref], lr=1e-2, weight_decay=0.1)
    mine = {"W": p0.clone()}
    state = AdamState.zeros_like(mine)
    for _ in range(5):
        grad = torch.randn(3, 4, 5, generator=g)
        ref.grad = grad.clone()
        opt.step()
        adam_step_(mine, {"W": grad}, state, torch.full((3,), 1e-2), torch.full((3,), 0.1), optimizer == "adamw")
    torch.testing.assert_close(mine["W"], ref.detach(), rtol=1e-6, atol=1e-7)


def test_per_instance_lr_only_moves_its_instance():
    params = {"W": torch.ones(2, 3)}
    state = AdamState.zeros_like(params)
    adam_step_(params, {"W": torch.ones(2, 3)}, state, torch.tensor([0.1, 0.0]), torch.zeros(2), False)
    torch.testing.assert_close(params["W"][1], torch.ones(3))
    torch.testing.assert_close(params["W"][0], torch.full((3,), 0.9), rtol=1e-5, atol=1e-6)


def test_schedules():
    assert lr_multiplier("constant", 50, 100) == 1.0
    assert lr_multiplier("linear", 25, 100) == 0.75
    assert lr_multiplier("cosine", 0, 11) == 1.0 and abs(lr_multiplier("cosine", 10, 11)) < 1e-12
    assert abs(lr_multiplier("cosine", 5, 11) - math.cos(math.pi / 4)) < 1e-12
    assert lr_multiplier("warmup-cosine", 0, 100, 10) == 0.1
    assert lr_multiplier("warmup-cosine", 10, 100, 10) == 1.0
    assert abs(lr_multiplier("warmup-cosine", 99, 100, 10)) < 1e-12


def test_loss_is_importance_weighted_mean_per_instance():
    out = torch.zeros(2, 2, 3)
    target = torch.ones(2, 2, 3)
    imp = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(per_instance_loss(out, target, imp), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(per_instance_loss(out, 2 * target, imp, "l1"), torch.tensor([4.0, 2.0]))


def test_instances_do_not_interact(tiny_spec):
    # The gradient of instance 0 must not depend on instance 1's data.
    spec = tiny_spec(instances={"data.feature_probability": [0.3, 0.1]})
    state = TrainState.create(spec)
    x = state.batch()
    grads = []
    for other in (x[:, 1], torch.rand_like(x[:, 1]) * 5):
        xx = x.clone()
        xx[:, 1] = other
        loss = state.loss(xx).sum()
        grads.append(torch.autograd.grad(loss, [state.model.W])[0])
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    assert not torch.equal(grads[0][1], grads[1][1])


def test_same_seed_same_weights(tiny_spec):
    spec = tiny_spec(instances={"seed": [1, 2]})
    a, b = train(spec), train(spec)
    assert torch.equal(a.model.W, b.model.W)
    assert a.instances["loss"].tolist() == b.instances["loss"].tolist()


def test_divergence_stops_with_instances_named(tiny_spec):
    from superposition.train import TrainingDiverged

    spec = tiny_spec(train={"lr": 10.0, "steps": 200, "log_every": 1}, task={"importance": 1.0})
    state = TrainState.create(spec)
    with torch.no_grad():
        state.model.W.mul_(1e20)
    with pytest.raises(TrainingDiverged, match=r"instance\(s\) 0"):
        train_model(state)


def test_divergence_drop_masks_instance_and_goes_on(tiny_spec):
    spec = tiny_spec(train={"on_divergence": "drop", "log_every": 1}, instances={"seed": [0, 1]})
    state = TrainState.create(spec)
    with torch.no_grad():
        state.model.W[0] = float("inf")
    train_model(state)
    assert state.alive.tolist() == [False, True]
    assert torch.isfinite(state.model.W).all()


def test_end_to_end_linear_keeps_d_relu_packs_more():
    # 20 features in 5 dims, I = 0.7^i: linear -> exactly 5; ReLU at p <= 0.01 -> more than 8 (paper: 11-12).
    spec = parse_spec(
        {
            "model": {"n_features": 20, "d_hidden": 5},
            "task": {"importance": 0.7},
            "train": {"steps": 2500, "optimizer": "adamw", "weight_decay": 0.01, "log_every": 500, "eval_batch": 1024},
            "instances": {"model.kind": ["linear", "relu-output"], "data.feature_probability": [0.01, 0.003]},
        }
    )
    run = train(spec)
    df = run.instances
    assert df.loc[df["model.kind"] == "linear", "n_represented"].tolist() == [5, 5]
    assert (df.loc[df["model.kind"] == "relu-output", "n_represented"] > 8).all()


def test_small_eager_steps_train_on_one_thread_and_restore_the_count():
    spec = parse_spec(
        {
            "model": {"n_features": 5, "d_hidden": 2},
            "train": {"steps": 20, "batch_size": 64, "engine": "eager", "checkpoint_every": 10},
        }
    )
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_model(TrainState.create(spec), checkpoint=lambda s: seen.append(torch.get_num_threads()))
        assert seen == [1]  # one checkpoint, at step 10, taken inside the loop
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _fixed_dataset_spec():
    return parse_spec(
        {"model": {"n_features": 30, "d_hidden": 2}, "data": {"feature_probability": 0.1, "dataset_size": 50}}
    )


def test_fixed_dataset_is_the_seeded_cpu_draw():
    """The training set is the first draw of a CPU generator seeded with the spec's seed: rebuildable anywhere."""
    from superposition.data import make_sampler

    spec = _fixed_dataset_spec()
    expected = make_sampler(spec, "cpu").sample(50, torch.Generator().manual_seed(spec.seed))
    assert torch.equal(TrainState.create(spec, torch.device("cpu")).dataset, expected)
    run = train(spec.model_copy(update={"train": spec.train.model_copy(update={"steps": 2})}))
    assert run.meta["dataset_device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fixed_dataset_on_cuda_equals_the_cpu_one():
    spec = _fixed_dataset_spec()
    cpu = TrainState.create(spec, torch.device("cpu")).dataset
    assert torch.equal(TrainState.create(spec, torch.device("cuda")).dataset.cpu(), cpu)


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_bfloat16_keeps_float32_master_weights_and_learns_the_same(engine):
    """dtype = "bfloat16" computes in bf16 but keeps float32 weights and moments, so Adam's small steps are not
    rounded away: after 1500 steps the weights agree with a float32 run to about one bf16 ulp at 1 (2^-8)."""
    raw = {
        "model": {"n_features": 12, "d_hidden": 3},
        "task": {"importance": 0.8},
        "data": {"feature_probability": 0.1},
        "train": {"steps": 1500, "batch_size": 256, "engine": engine, "checkpoint_every": 0},
    }
    runs = {dt: train(parse_spec({**raw, "dtype": dt})) for dt in ("float32", "bfloat16")}
    w32, w16 = runs["float32"].model.W.detach(), runs["bfloat16"].model.W.detach()
    assert w16.dtype == torch.float32 and runs["bfloat16"].model.b_final.dtype == torch.float32
    assert (w16 - w32).abs().max() < 0.01  # measured 0.0027 (eager), 0.0011 (fast)
    assert (runs["bfloat16"].instances["n_represented"] == runs["float32"].instances["n_represented"]).all()


def test_progress_is_a_bar_passed_in_and_the_library_prints_nothing(tmp_path, capfd):
    from superposition.progress import make_bar
    from superposition.runs import run
    from superposition.spec import parse_spec

    made = []

    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs, self.steps, self.postfix, self.closed = kwargs, 0, [], False
            made.append(self)

        def update(self, n=1):
            self.steps += n

        def set_postfix_str(self, s="", refresh=True):
            self.postfix.append(s)

        def close(self):
            self.closed = True

    spec = parse_spec({"model": {"n_features": 4, "d_hidden": 2}, "train": {"steps": 30, "log_every": 10}})
    run(spec, tmp_path / "r", progress=Recorder)
    (bar,) = made
    assert bar.kwargs["total"] == 30 and bar.steps == 30 and bar.closed
    assert bar.postfix and all(p.startswith("loss=") for p in bar.postfix)
    run(spec, tmp_path / "quiet")  # no bar asked for: nothing on stdout or stderr
    assert capfd.readouterr() == ("", "")
    assert make_bar(None, total=3) is None and make_bar(False, total=3) is None
