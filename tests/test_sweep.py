"""Sweeps: the where language, expansion, packing into instances, the folder, backends, kill-and-resume, figures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from superposition import load_sweep
from superposition import sweep as sw
from superposition.cli import main
from superposition.runs import RunFormatError, train
from superposition.spec import SpecError, load_spec, parse_spec


def _raw(sweep: dict, **sections) -> dict:
    raw = {
        "name": "sw",
        "model": {"kind": "relu-output", "n_features": 4, "d_hidden": 2},
        "data": {"feature_probability": 0.2},
        # eager: no torch.compile machinery to import in every worker process (the engines have their own tests)
        "train": {"steps": 30, "batch_size": 32, "log_every": 10, "eval_batch": 64, "engine": "eager"},
        "sweep": sweep,
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _spec(sweep: dict, **sections):
    return parse_spec(_raw(sweep, **sections))


def _run(spec, out: Path, **kwargs) -> sw.SweepOutcome:
    sw.prepare(spec, out)
    return sw.execute(out, workers=kwargs.pop("workers", 1), threads=kwargs.pop("threads", 1), **kwargs)


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p / "model.safetensors")) for p in sorted((out / "runs").iterdir())}


def _assert_same_sweep(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(a / "results.parquet"), pd.read_parquet(b / "results.parquet"))
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for gid in wa:
        assert wa[gid].keys() == wb[gid].keys()
        for name in wa[gid]:
            assert torch.equal(wa[gid][name], wb[gid][name]), (gid, name)
        ha = pd.read_parquet(a / "runs" / gid / "history.parquet")
        pd.testing.assert_frame_equal(ha, pd.read_parquet(b / "runs" / gid / "history.parquet"))


# -- the where language --------------------------------------------------------------------------------------------
def test_conditions_compare_names_and_literals():
    values = {"model.d_hidden": 3, "model.n_features": 6, "variant": "tree", "data.early_stopping": True}
    look = values.__getitem__
    cases = {
        "model.d_hidden <= model.n_features": True,
        "model.d_hidden > model.n_features": False,
        "2 < model.d_hidden < 4": True,
        "2 < model.d_hidden < 3": False,
        "variant == 'tree'": True,
        'variant != "tree"': False,
        "data.early_stopping == true": True,
        "model.d_hidden >= 3.5e0": False,
        "model.d_hidden == -1": False,
    }
    for text, expected in cases.items():
        assert sw.parse_condition(text).holds(look) is expected, text
    assert sw.parse_condition("1 < a.b <= c").names == ["a.b", "c"]


@pytest.mark.parametrize(
    "text",
    ["model.d_hidden", "model.d_hidden <", "< 3", "a <= <= b", "__import__('os').system('true') == 0", "a = 1", ""],
)
def test_conditions_reject_anything_but_comparisons(text):
    with pytest.raises(SpecError, match="sweep.where"):
        sw.parse_condition(text)


def test_condition_type_mismatch_is_one_line_error():
    with pytest.raises(SpecError, match="compares"):
        sw.parse_condition("variant < 3").holds({"variant": "tree"}.__getitem__)


# -- expansion and packing -----------------------------------------------------------------------------------------
def test_product_order_and_zip_groups():
    spec = _spec(
        {
            "axes": {"model.d_hidden": [1, 2], "train.lr": [0.1, 0.2, 0.3], "train.steps": [5, 6, 7]},
            "zip": [["train.lr", "train.steps", "name_tag"]],
            "labels": {"name_tag": ["a", "b", "c"]},
        }
    )
    combos = sw.combinations(spec.sweep)
    assert [(c["model.d_hidden"], c["train.lr"], c["train.steps"], c["name_tag"]) for c in combos] == [
        (h, lr, s, t) for h in (1, 2) for lr, s, t in ((0.1, 5, "a"), (0.2, 6, "b"), (0.3, 7, "c"))
    ]


def test_sweep_spec_validation_errors():
    bad = [
        ({"axes": {"model.nope": [1]}}, "not a field"),
        ({"axes": {"instances.seed": [1]}}, "not a field"),
        ({"axes": {"model.d_hidden": []}}, "non-empty"),
        (
            {
                "axes": {"model.d_hidden": [1, 2], "model.n_features": [4]},
                "zip": [["model.d_hidden", "model.n_features"]],
            },
            "one length",
        ),
        ({"labels": {"v": ["a", "b"]}}, "zip a label"),
        ({"labels": {"seed": ["a"]}}, "not a field"),
        ({"report": {"x": "model.d_hidden"}}, "neither an axis"),
        ({"repeats": 0}, "sweep.repeats"),
    ]
    for sweep, message in bad:
        with pytest.raises(SpecError, match=message):
            _spec(sweep)


def test_overrides_replace_an_axis_in_place():
    spec = load_spec("hierarchy", ["sweep.axes.model.d_hidden=[2, 3]", "sweep.repeats=2"])
    assert list(spec.sweep.axes)[-1] == "model.d_hidden" and spec.sweep.axes["model.d_hidden"] == [2, 3]
    plan = sw.make_plan(spec)
    # depth 1 has 2 features (d_hidden 3 dropped); deeper trees keep both widths: (1 + 2 * 5) per variant.
    assert len(plan.points) == 3 * 11 and plan.dropped == 3 and all(len(g.members) == 2 for g in plan.groups)


def test_seed002_study_plan():
    spec = load_spec("hierarchy")
    plan = sw.make_plan(spec)
    # For each depth d (n = 2^(d+1) - 2 features) the widths 2..10 with width <= n: 1, 5, 9, 9, 9, 9.
    per_variant = sum(min(10, 2 ** (d + 1) - 2) - 1 for d in range(1, 7))
    assert per_variant == 42
    assert len(plan.points) == 3 * per_variant and plan.dropped == 3 * 6 * 9 - 3 * per_variant
    assert len(plan.groups) == len(plan.points)  # every point has its own shape or data law
    assert plan.columns[:3] == ["variant", "data.kind", "data.early_stopping"]
    for g in plan.groups:
        assert g.spec["instances"] == {"combine": "zip", "axes": {"seed": [0, 1, 2, 3, 4]}}
        assert [r for _, r in g.members] == [0, 1, 2, 3, 4]
        assert g.spec["train"]["steps"] == 10_000 and g.spec["train"]["eval_batch"] == 500
    for p in plan.points:
        v = p.values
        depth, n = v["data.tree_depth"], v["model.n_features"]
        assert n == 2 ** (depth + 1) - 2 and v["model.d_hidden"] <= n
        assert math.isclose(v["data.feature_probability"], depth / n, rel_tol=1e-15)
        spec_p = plan.group(p.group).spec
        assert spec_p["data"]["kind"] == {"independent": "sparse"}.get(v["variant"], "hierarchy")
        assert spec_p["data"]["early_stopping"] == (v["variant"] == "early_stopping")
        assert (spec_p["model"]["n_features"], spec_p["model"]["d_hidden"]) == (n, v["model.d_hidden"])
    quick = sw.make_plan(load_spec("hierarchy", quick=True))
    assert len(quick.points) == 3 * (1 + 3 + 3) and quick.groups[0].spec["train"]["steps"] == 300


def test_equal_shapes_share_one_model():
    spec = _spec(
        {
            "axes": {"model.d_hidden": [2, 3], "train.lr": [1e-3, 3e-3], "data.feature_probability": [0.1, 0.3]},
            "repeats": 2,
        },
        seed=7,
    )
    plan = sw.make_plan(spec)
    assert len(plan.points) == 8 and len(plan.groups) == 2
    for g, h in zip(plan.groups, (2, 3), strict=True):
        assert g.spec["model"]["d_hidden"] == h and len(g.members) == 8 and len(g.points) == 4
        axes = g.spec["instances"]["axes"]
        assert g.spec["seed"] == 7 and g.spec["instances"]["combine"] == "zip"
        assert axes["train.lr"] == [1e-3, 1e-3, 1e-3, 1e-3, 3e-3, 3e-3, 3e-3, 3e-3]
        assert axes["data.feature_probability"] == [0.1, 0.1, 0.3, 0.3] * 2
        assert axes["seed"] == [7 * sw.SEED_STRIDE + r for r in (0, 1)] * 4
        for (p, r), lr, prob in zip(g.members, axes["train.lr"], axes["data.feature_probability"], strict=True):
            assert plan.points[p].values == {"model.d_hidden": h, "train.lr": lr, "data.feature_probability": prob}
            assert r in (0, 1)
        assert parse_spec(g.spec).n_instances == 8


def test_hierarchy_feature_count_follows_the_swept_depth():
    raw = _raw({"axes": {"data.tree_depth": [1, 2, 3]}}, data={"kind": "hierarchy", "tree_depth": 1})
    del raw["model"]["n_features"]
    plan = sw.make_plan(parse_spec(raw))
    assert [g.spec["model"]["n_features"] for g in plan.groups] == [2, 6, 14]
    spec = parse_spec(raw)
    plan = sw.make_plan(spec)
    assert [g.spec["model"]["n_features"] for g in plan.groups] == [2, 6, 14]


def test_base_instances_multiply_points_and_repeats():
    spec = _spec({"axes": {"model.d_hidden": [2, 3]}, "repeats": 2}, instances={"train.weight_decay": [0.0, 0.01]})
    plan = sw.make_plan(spec)
    assert plan.columns == ["model.d_hidden", "train.weight_decay"] and len(plan.points) == 4
    g = plan.groups[0]
    assert g.spec["instances"]["axes"]["train.weight_decay"] == [0.0, 0.0, 0.01, 0.01]
    assert g.spec["instances"]["axes"]["seed"] == [0, 1, 2, 3]
    with pytest.raises(SpecError, match="also an \\[instances\\] axis"):
        sw.make_plan(_spec({"axes": {"train.weight_decay": [0.0]}}, instances={"train.weight_decay": [0.0, 0.1]}))
    with pytest.raises(SpecError, match="seed axis"):
        sw.make_plan(_spec({"repeats": 2}, instances={"seed": [1, 2]}))


def test_memory_estimate_and_budget_split():
    spec = _spec({"axes": {"train.lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3]}, "repeats": 3})
    n, h, b = 4, 2, 32
    per_instance = 4 * (4 * (h * n + n) + b * (6 * n + 3 * h))  # params+grad+2 moments, one step's activations
    assert sw.estimate_memory(parse_spec(_raw({}))) == per_instance
    assert sw.make_plan(spec).groups[0].memory == 15 * per_instance
    budget = 2 * 3 * per_instance / 2**20  # room for exactly two points of three repeats
    plan = sw.make_plan(spec.model_copy(update={"sweep": spec.sweep.model_copy(update={"memory_budget_mb": budget})}))
    assert [len(g.points) for g in plan.groups] == [2, 2, 1]
    assert [p for g in plan.groups for p in g.points] == [0, 1, 2, 3, 4]


def test_where_drops_points_and_invalid_points_are_recorded(tmp_path):
    spec = _spec(
        {"axes": {"model.d_hidden": [2, 9], "task.importance": [0.9, [1.0, 2.0]]}, "where": ["model.d_hidden < 5"]}
    )
    plan = sw.make_plan(spec)
    assert plan.dropped == 2 and len(plan.points) == 2 and plan.n_invalid == 1
    assert "importance" in plan.points[1].error and plan.points[1].group is None
    with pytest.raises(SpecError, match="neither a field nor a label"):
        sw.make_plan(_spec({"where": ["model.width < 3"]}))
    result = _run(spec, tmp_path / "s")
    assert list(result.results["status"]) == ["ok", "invalid"]
    assert result.results["error"][1] == plan.points[1].error
    assert result.results["task.importance"].tolist() == ["0.9", "[1.0, 2.0]"]  # mixed kinds become JSON text


# -- running -------------------------------------------------------------------------------------------------------
def test_one_point_sweep_equals_plain_run_and_results_are_per_point(tmp_path):
    spec = _spec({"repeats": 3}, seed=2)
    result = _run(spec, tmp_path / "s")
    plain = train(parse_spec({**_raw({}), "seed": 2, "instances": {"seed": [200006, 200007, 200008]}}))
    group = load_sweep(tmp_path / "s").runs["g0000"]
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(group.model.state_dict()[name], tensor)
    row = result.results.iloc[0]
    loss = plain.instances["loss"].to_numpy()
    assert row["loss_min"] == loss.min() and row["loss_sum"] == loss.sum() and row["best_repeat"] == loss.argmin()
    assert math.isclose(row["loss_mean"], loss.mean(), rel_tol=1e-12)
    assert row["n_represented_mean"] == plain.instances["n_represented"].mean()
    assert (result.ran, result.failed, result.skipped) == (1, 0, 0)


def test_failing_group_is_recorded_and_retried(tmp_path, monkeypatch):
    import superposition.runs as runs

    spec = _spec({"axes": {"model.d_hidden": [1, 2, 3]}})
    real = runs.run

    def flaky(experiment, out, **kwargs):
        if experiment.model.d_hidden == 2:
            raise RuntimeError("boom\nsecond line")
        return real(experiment, out, **kwargs)

    monkeypatch.setattr(runs, "run", flaky)
    first = _run(spec, tmp_path / "s")
    assert list(first.results["status"]) == ["ok", "failed", "ok"] and first.failed == 1
    assert first.results["error"][1] == "RuntimeError: boom" and math.isnan(first.results["loss_min"][1])
    monkeypatch.setattr(runs, "run", real)
    again = sw.execute(tmp_path / "s", workers=1, threads=1)
    assert list(again.results["status"]) == ["ok"] * 3 and (again.ran, again.skipped) == (1, 2)
    assert not (tmp_path / "s" / "errors" / "g0001.json").exists()
    pd.testing.assert_frame_equal(again.results.iloc[[0, 2]], first.results.iloc[[0, 2]])


def test_folder_guards(tmp_path):
    spec = _spec({"axes": {"model.d_hidden": [1, 2]}})
    sw.prepare(spec, tmp_path / "s")
    assert sw.prepare(spec, tmp_path / "s") == sw.read_plan(tmp_path / "s")
    with pytest.raises(SpecError, match="different spec"):
        sw.prepare(_spec({"axes": {"model.d_hidden": [1, 3]}}), tmp_path / "s")
    with pytest.raises(SpecError, match="no sweep to resume"):
        sw.prepare(spec, tmp_path / "new", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(SpecError, match="not a sweep folder"):
        sw.prepare(spec, tmp_path / "other")
    with pytest.raises(SpecError, match="backend"):
        sw.execute(tmp_path / "s", backend="cloud")


_KILL_SPEC = """
name = "killme"
[model]
n_features = 6
d_hidden = 2
[data]
feature_probability = 0.2
[train]
steps = 300
batch_size = 256
log_every = 50
checkpoint_every = 100
eval_batch = 256
engine = "eager"
[sweep]
repeats = 2
[sweep.axes]
"model.d_hidden" = [1, 2, 3, 4]
"train.lr" = [0.001, 0.003]
"""


def test_kill_and_resume_gives_the_same_table_and_weights(tmp_path):
    spec_file = tmp_path / "kill.toml"
    spec_file.write_text(_KILL_SPEC)
    spec = load_spec(spec_file)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "superposition.cli", "sweep", str(spec_file), "--out", str(killed)]
    proc = subprocess.Popen(
        [*cmd, "--workers", "1", "--threads", "1", "--quiet"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            runs = killed / "runs"
            if runs.is_dir() and any(not p.name.startswith(".") for p in runs.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    done = [p.name for p in (killed / "runs").iterdir() if not p.name.startswith(".")]
    assert 1 <= len(done) < 4 and not (killed / "results.parquet").exists()
    # The uninterrupted sweep runs on a pool of two worker processes: the table must not depend on that either.
    straight = _run(spec, tmp_path / "straight", workers=2)
    assert straight.ran == 4
    resumed = sw.execute(killed, workers=1, threads=1)
    assert resumed.skipped == len(done) and resumed.ran == 4 - len(done)
    _assert_same_sweep(tmp_path / "straight", killed)
    assert not [p for p in (killed / "runs").iterdir() if p.name.startswith(".")]  # no partial folder left


# -- the other backends: `make test` installs the ray and slurm extras (8 s from the registry), so CI runs both (16 s
# together on the 2-core machine); they are skipped where an extra is not installed.
_SMALL = {"axes": {"model.d_hidden": [1, 2, 3]}, "repeats": 2}


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install '.[ray]')")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning", "ignore::FutureWarning")
def test_ray_backend_gives_the_local_table(tmp_path):
    spec = _spec(_SMALL)
    _run(spec, tmp_path / "local")
    ray = _run(spec, tmp_path / "ray", backend="ray", workers=2)
    assert ray.ran == 3
    _assert_same_sweep(tmp_path / "local", tmp_path / "ray")


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit is not installed ('.[slurm]')")
def test_slurm_backend_local_executor_gives_the_local_table(tmp_path):
    spec = _spec(_SMALL)
    _run(spec, tmp_path / "local")
    slurm = _run(spec, tmp_path / "slurm", backend="slurm", slurm_cluster="local", slurm={"timeout_min": 10})
    assert slurm.ran == 3
    _assert_same_sweep(tmp_path / "local", tmp_path / "slurm")


# -- loading, figures, report ------------------------------------------------------------------------------------------
def test_load_sweep(tmp_path):
    spec = _spec({"axes": {"model.d_hidden": [1, 2]}, "repeats": 2})
    result = _run(spec, tmp_path / "s")
    loaded = load_sweep(tmp_path / "s")
    assert loaded.spec == spec and loaded.plan == result.plan
    pd.testing.assert_frame_equal(loaded.results, result.results)
    assert list(loaded.runs) == ["g0000", "g0001"] and loaded.runs["g0001"].spec.model.d_hidden == 2
    long = loaded.instances()
    assert list(long["point"]) == [0, 0, 1, 1] and list(long["repeat"]) == [0, 1, 0, 1]
    assert list(long["model.d_hidden"]) == [1, 1, 2, 2]
    mins = long.groupby("point")["loss"].min().to_numpy()
    np.testing.assert_array_equal(mins, loaded.results["loss_min"].to_numpy())


# -- opening an untrusted sweep folder -----------------------------------------------------------------------------
_GOOD_SWEEP = {"axes": {"model.d_hidden": [1, 2]}}


@pytest.fixture(scope="module")
def good_sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good-sweep") / "s"
    torch.set_num_threads(1)
    _run(_spec(_GOOD_SWEEP), out)
    return out


def _edit_meta(f: Path, edit) -> None:
    meta = json.loads((f / "sweep.json").read_text())
    edit(meta)
    (f / "sweep.json").write_text(json.dumps(meta))


def _edit_results(f: Path, edit) -> None:
    edit(pd.read_parquet(f / "results.parquet")).to_parquet(f / "results.parquet", index=False)


def _set_group_id(meta: dict, old: str, new: str) -> None:
    for g in meta["plan"]["groups"]:
        g["id"] = new if g["id"] == old else g["id"]
    for p in meta["plan"]["points"]:
        p["group"] = new if p["group"] == old else p["group"]


def s_folder_missing(f: Path):
    shutil.rmtree(f)
    return "no such sweep folder"


def s_folder_is_a_file(f: Path):
    shutil.rmtree(f)
    f.write_text("x")
    return ": not a folder"


def s_sweep_json_missing(f: Path):
    (f / "sweep.json").unlink()
    return "not a sweep folder (sweep.json is missing)"


def s_sweep_json_not_json(f: Path):
    (f / "sweep.json").write_bytes(b"\x80\x81 not json {")
    return "sweep.json: not valid JSON (UnicodeDecodeError)"


def s_sweep_json_deep(f: Path):
    (f / "sweep.json").write_text("[" * 200_000 + "]" * 200_000)
    return "sweep.json: not valid JSON (RecursionError)"


def s_sweep_json_huge(f: Path):
    with open(f / "sweep.json", "r+b") as fh:  # sparse: claims 1 GB without writing it
        fh.truncate(2**30)
    return "1,073,741,824 bytes, more than the 67,108,864 allowed"


def s_sweep_json_fifo(f: Path):
    (f / "sweep.json").unlink()
    os.mkfifo(f / "sweep.json")  # reading it would block for ever
    return "sweep.json: not a regular file"


def s_sweep_json_link_out(f: Path):
    (f / "sweep.json").unlink()
    (f / "sweep.json").symlink_to("/etc/passwd")
    return "a link leading outside the sweep folder (to /etc/passwd)"


def s_sweep_json_link_loop(f: Path):
    (f / "sweep.json").unlink()
    (f / "sweep.json").symlink_to("sweep.json")
    return "sweep.json: a broken or looping link"


def s_sweep_json_a_list(f: Path):
    (f / "sweep.json").write_text("[1, 2]")
    return "not a sweep file (not a JSON object)"


def s_format_version(f: Path):
    _edit_meta(f, lambda m: m.update(format="superposition-sweep/2"))
    return "format 'superposition-sweep/2', expected 'superposition-sweep'"


def s_no_plan(f: Path):
    _edit_meta(f, lambda m: m.pop("plan"))
    return "sweep.json: no 'plan' table"


def s_extra_key(f: Path):
    _edit_meta(f, lambda m: m.update(on_load="__import__('os').system('true')"))
    return "unexpected keys ['on_load']"


def s_spec_invalid(f: Path):
    _edit_meta(f, lambda m: m["spec"]["model"].update(evil=1))
    return "sweep.json: invalid spec: model.evil"


def s_spec_deep(f: Path):
    deep = json.loads("[" * 900 + "1" + "]" * 900)  # parses, but would overflow the planner's serialiser
    _edit_meta(f, lambda m: m["spec"]["sweep"]["axes"].update({"train.lr": deep}))
    return "the spec nests lists and tables more than 32 levels deep"


def s_spec_edited(f: Path):
    _edit_meta(f, lambda m: m["spec"]["train"].update(lr=0.5))  # valid, but the plan was made for another lr
    return "not the plan of its spec (first difference at plan.groups[0].spec.train.lr)"


def s_group_id_traversal(f: Path):
    _edit_meta(f, lambda m: _set_group_id(m, "g0001", "../../g0001"))
    return "plan group id '../../g0001' is not g followed by digits"


def s_group_id_renamed(f: Path):
    _edit_meta(f, lambda m: _set_group_id(m, "g0001", "g0007"))  # a well-formed id the spec does not plan
    return "first difference at plan.groups[1].id"


def s_group_spec_edited(f: Path):
    _edit_meta(f, lambda m: m["plan"]["groups"][0]["spec"]["train"].update(steps=100_000))
    return "first difference at plan.groups[0].spec.train.steps"


def s_plan_point_dropped(f: Path):
    _edit_meta(f, lambda m: m["plan"].update(points=m["plan"]["points"][:1], dropped=1))
    return "first difference at plan.dropped"


def s_sweep_bomb(f: Path):
    # 10^9 combinations: re-planning them would never end; refused from the sizes alone.
    axes = {"model.d_hidden": list(range(1, 1001)), "train.lr": [i / 1000 for i in range(1, 1001)]}
    axes["train.steps"] = list(range(1, 1001))
    _edit_meta(f, lambda m: m["spec"]["sweep"].update(axes=axes))
    return "the spec's sweep has 1,000,000,000 combinations but the plan lists 2"


def s_instance_bomb(f: Path):
    # 2 points x 10^6 base instances x 100 repeats: refused before any member list is built.
    instances = {"axes": {"train.lr": [i / 1000 for i in range(1, 1001)], "train.weight_decay": [0.0] * 1000}}
    _edit_meta(f, lambda m: (m["spec"].update(instances=instances), m["spec"]["sweep"].update(repeats=100)))
    return "the spec plans up to 200,000,000 instances (at most 10,000,000 are re-planned)"


def s_results_missing(f: Path):
    (f / "results.parquet").unlink()
    return "results.parquet is missing (the sweep did not finish); rerun `superposition sweep SPEC --out"


def s_results_garbage(f: Path):
    (f / "results.parquet").write_bytes(b"PAR1" + bytes(range(64)) + b"PAR1")
    return "results.parquet: not a valid parquet table"


def s_results_link_out(f: Path):
    (f / "results.parquet").unlink()
    (f / "results.parquet").symlink_to("../../../../../../../../etc/hostname")
    return "results.parquet: a link leading outside the sweep folder"


def s_results_rows(f: Path):
    _edit_results(f, lambda r: r.iloc[::-1])
    return "its 2 rows are not the plan's 2 points in order"


def s_results_axis_column(f: Path):
    _edit_results(f, lambda r: r.drop(columns=["model.d_hidden"]))
    return "results.parquet: columns ['model.d_hidden'] are missing"


def s_results_group(f: Path):
    _edit_results(f, lambda r: r.assign(group=["../x", "g0001"]))
    return "results.parquet: the group column does not match the plan"


def s_results_status(f: Path):
    _edit_results(f, lambda r: r.assign(status=["ok", "<script>"]))
    return "results.parquet: statuses must be one of"


def s_results_status_lists(f: Path):
    _edit_results(f, lambda r: r.assign(status=[["ok"], ["ok", "x"]]))  # a list column: unhashable cells
    return "results.parquet: statuses must be one of"


def s_group_entry_link(f: Path):
    shutil.move(f / "runs" / "g0001", f / "elsewhere")
    (f / "runs" / "g0001").symlink_to(f / "elsewhere")
    return "runs/g0001: a symbolic link where a run folder should be"


def s_group_entry_file(f: Path):
    shutil.rmtree(f / "runs" / "g0001")
    (f / "runs" / "g0001").write_text("x")
    return "runs/g0001: not a folder"


def s_runs_link(f: Path):
    shutil.move(f / "runs", f / "elsewhere")
    (f / "runs").symlink_to("elsewhere")
    return "runs: missing or not a folder"


def s_run_config_damaged(f: Path):  # found when Sweep.runs opens the group: load_run's own checks
    (f / "runs" / "g0001" / "config.json").write_bytes(b"\x80 not json")
    return "g0001/config.json: not valid JSON"


def s_run_weights_link_out(f: Path):
    (f / "runs" / "g0000" / "model.safetensors").unlink()
    (f / "runs" / "g0000" / "model.safetensors").symlink_to("/etc/passwd")
    return "model.safetensors: a link leading outside the run folder"


def s_run_instances_link_out(f: Path):
    (f / "runs" / "g0000" / "instances.parquet").unlink()
    (f / "runs" / "g0000" / "instances.parquet").symlink_to("/etc/hostname")
    return "instances.parquet: a link leading outside the run folder"


SWEEP_TAMPERS = [v for k, v in sorted(globals().items()) if k.startswith("s_")]


def _open_everything(folder: Path) -> None:
    s = load_sweep(folder)
    for gid in s.runs:
        s.runs[gid]


@pytest.mark.parametrize("tamper", SWEEP_TAMPERS, ids=[t.__name__[2:] for t in SWEEP_TAMPERS])
def test_tampered_sweep_folder_is_refused_in_one_error(good_sweep, tmp_path, tamper):
    folder = tmp_path / "s"
    shutil.copytree(good_sweep, folder, symlinks=True)
    needle = tamper(folder)
    start = time.perf_counter()
    with pytest.raises(RunFormatError) as info:
        _open_everything(folder)
    message = str(info.value)
    assert type(info.value) is RunFormatError
    assert needle in message and len(message.splitlines()) == 1, message
    assert time.perf_counter() - start < 5.0  # bounded: no re-planning of a bomb, no read of a pipe or a 1 GB file


def test_untampered_copy_opens_and_runs_holds_only_planned_groups(good_sweep, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(good_sweep, folder, symlinks=True)
    (folder / "runs" / "g0002").symlink_to(folder / "runs" / "g0000")  # not a group of the plan: never opened
    (folder / "sweep.json").rename(folder / "sweep.real.json")
    (folder / "sweep.json").symlink_to("sweep.real.json")  # a link that stays inside the folder is fine
    s = load_sweep(folder)
    assert list(s.runs) == ["g0000", "g0001"] and len(s.runs) == 2
    assert s.runs["g0001"].spec.model.d_hidden == 2
    for key in ("g0002", "../s/runs/g0000", "runs/g0000", "g0000/.."):
        assert key not in s.runs
        with pytest.raises(KeyError):
            s.runs[key]
    assert sw.read_plan(folder) == s.plan == sw.make_plan(_spec(_GOOD_SWEEP))


def test_stored_plan_estimates_may_differ_from_this_version(good_sweep, tmp_path):
    """Memory and work are estimates: a folder whose plan was estimated differently (another version) still opens,
    with this version's estimates; the plan's identity (groups, members, specs) must still match."""
    folder = tmp_path / "s"
    shutil.copytree(good_sweep, folder)

    def scale(meta):
        for g in meta["plan"]["groups"]:
            g["memory"], g["work"] = g["memory"] * 3, g["work"] / 7

    _edit_meta(folder, scale)
    s = load_sweep(folder)
    assert s.plan == sw.make_plan(_spec(_GOOD_SWEEP))
    _edit_meta(folder, lambda meta: meta["plan"]["groups"][0].update(members=[[1, 0]]))
    with pytest.raises(sw.RunFormatError, match="not the plan of its spec"):
        load_sweep(folder)


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "link:" + os.readlink(p)
        elif p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


# The sweep command reopens the folder (prepare, then execute: every group is done here, so it trains nothing and goes
# straight to collecting the results): a tampered plan, a linked group, a pipe or a table linked out stop it first.
@pytest.mark.parametrize(
    "tamper",
    [s_group_id_traversal, s_group_entry_link, s_sweep_json_fifo, s_run_instances_link_out],
    ids=lambda t: t.__name__[2:],
)
def test_cli_sweep_on_a_tampered_folder_exits_2_with_one_line(good_sweep, tmp_path, capsys, tamper):
    folder = tmp_path / "s"
    shutil.copytree(good_sweep, folder, symlinks=True)
    spec_file = tmp_path / "s.json"
    spec_file.write_text(json.dumps(_raw(_GOOD_SWEEP)))
    needle = tamper(folder)
    before = _digest(folder)
    capsys.readouterr()
    argv = ["sweep", str(spec_file), "--out", str(folder), "--resume", "--workers", "1", "--threads", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and _digest(folder) == before


def _synthetic() -> pd.DataFrame:
    rows = []
    for variant, offset in (("tree", 0), ("flat", 2)):
        for depth in (1, 2, 3):
            for width in (2, 3, 4, 5):
                loss = 1e-7 if width >= depth + 1 + offset else 10.0**-(width)
                rows.append({"variant": variant, "depth": depth, "width": width, "loss_min": loss, "status": "ok"})
    rows.append({"variant": "tree", "depth": 1, "width": 9, "loss_min": math.nan, "status": "failed"})
    return pd.DataFrame(rows)


def test_threshold_table_and_figures():
    df = _synthetic()
    table = sw.threshold_table(df, "width", "depth", "loss_min", 1e-5, by="variant")
    assert list(table.columns) == ["depth", "tree", "flat"]
    assert table["tree"].tolist() == [2, 3, 4]
    assert table["flat"].tolist()[:2] == [4, 5] and math.isnan(table["flat"][2])
    heat = sw.heatmap_figure(df[df["variant"] == "tree"], "width", "depth")
    z = np.array(heat.data[0].z, dtype=float)
    expected = df[df["variant"] == "tree"].pivot_table(index="depth", columns="width", values="loss_min", aggfunc="min")
    np.testing.assert_allclose(z, np.log10(expected.to_numpy()))
    assert list(heat.data[0].x) == ["2", "3", "4", "5"] and list(heat.data[0].y) == ["1", "2", "3"]
    lines = sw.lines_figure(df, "width", "depth")
    assert len(lines.data) == 3
    ok = df[df["status"] == "ok"]
    np.testing.assert_allclose(lines.data[0].y, ok[ok["depth"] == 1].groupby("width")["loss_min"].min())


def test_cli_sweep_dry_run_run_and_errors(tmp_path, capsys):
    raw = _raw(
        {
            "axes": {"model.d_hidden": [1, 2, 3], "train.lr": [1e-3, 2e-3]},
            "where": ["model.d_hidden != 2"],
            "report": {"x": "model.d_hidden", "y": "train.lr", "threshold": 1.0},
        }
    )
    spec_file = tmp_path / "s.json"
    spec_file.write_text(json.dumps(raw))
    out = tmp_path / "out"
    assert main(["sweep", str(spec_file), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 point(s) x 1 repeat(s) packed into 2 model(s)" in text and "g0001" in text and not out.exists()
    assert main(["sweep", str(spec_file), "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "4 point(s) ok; trained 2 model(s)" in text and "smallest model.d_hidden with loss_min < 1" in text
    page = (out / "report.html").read_text()
    assert "Threshold: smallest model.d_hidden" in page and "Heatmaps" in page
    results = pd.read_parquet(out / "results.parquet")
    # run on a spec with a [sweep] section runs it as a sweep: here it finds every group done and only rewrites.
    assert main(["run", str(spec_file), "--out", str(out)]) == 0
    assert "resuming: 2 of 2 model(s) already done" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), results)
    for args, message in [
        (["--set", "sweep.where=['model.d_hidden <']", "--out", str(tmp_path / "new")], "sweep.where"),
        (["--set", "sweep.axes.model.d_hidden=[1]", "--out", str(out)], "different spec"),
        (["--out", str(tmp_path / "new"), "--resume"], "no sweep to resume"),
        (["--backend", "cloud"], "--backend"),
        (["--slurm", "nokey"], "--slurm"),
    ]:
        assert main(["sweep", str(spec_file), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_sweep_points_have_no_report_until_asked(tmp_path):
    """Sweep points are light run folders (no 5 MB report each); `superposition report` adds the page on demand."""
    out = tmp_path / "sw"
    _run(_spec({"axes": {"model.d_hidden": [2, 3]}}), out)
    points = sorted((out / "runs").iterdir())
    assert [p.name for p in points] == ["g0000", "g0001"]
    assert not any((p / "report.html").exists() for p in points)
    assert main(["report", str(points[0])]) == 0
    assert (points[0] / "report.html").stat().st_size > 1_000_000


def test_report_command_rebuilds_a_sweep_report(good_sweep, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(good_sweep, folder)
    (folder / "report.html").unlink()
    assert main(["report", str(folder)]) == 0
    page = (folder / "report.html").read_text()
    assert "Heatmaps" in page or "Lines" in page
    loaded = load_sweep(folder)
    fresh = sw.render_sweep(loaded.spec, loaded.plan, loaded.results, folder)
    nonce = re.compile(r"nonce(-|=\")[A-Za-z0-9_+/=-]+")  # a fresh CSP nonce per page
    assert nonce.sub("", page) == nonce.sub("", fresh)


def test_small_sweep_report_shows_each_models_feature_maps_side_by_side(tmp_path):
    # Seed 001's reading: tied and untied nets' W·Wᵀ / W2·W1 in one figure, one row per model, one colour scale.
    from superposition import metrics

    spec = tmp_path / "tu.toml"
    spec.write_text(
        'name = "tu"\n[model]\nn_features = 4\nd_hidden = 2\n[train]\nsteps = 20\nbatch_size = 32\n'
        '[instances]\n"data.feature_probability" = [1.0, 0.1]\n'
        '[sweep]\nzip = [["weights", "model.tied"]]\n[sweep.labels]\nweights = ["tied", "untied"]\n'
        '[sweep.axes]\n"model.tied" = [true, false]\n'
    )
    assert main(["sweep", str(spec), "--out", str(tmp_path / "s"), "--workers", "1", "--quiet"]) == 0
    assert "Feature maps side by side" in (tmp_path / "s" / "report.html").read_text(encoding="utf-8")
    sweep = load_sweep(tmp_path / "s")
    assert "feature-maps" in sweep.figures()
    fig = sweep.figure("feature-maps")
    titles = [a.text for a in fig.layout.annotations if a.text]
    assert titles == [f"{w}: p = {p}, seed = {s}" for w in ("tied", "untied") for p, s in (("1", 0), ("0.1", 1))]
    heat = [t for t in fig.data if t.type == "heatmap"]
    for row, gid in enumerate(g.id for g in sweep.plan.groups):
        model = sweep.runs[gid].model
        with torch.no_grad():
            W2 = model.W2.detach() if hasattr(model, "W2") else None
            M = metrics.readout_matrix(model.encoder.detach(), W2).transpose(-1, -2).numpy()
        for i in range(2):
            np.testing.assert_allclose(np.asarray(heat[2 * row + i].z), M[i], rtol=1e-6)
