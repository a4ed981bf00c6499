"""Sweeps: the where language, expansion, packing into instances, the folder, backends, kill-and-resume, figures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
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
from superposition.runs import train
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


# -- the other backends: skipped where the extra is not installed (CI installs only the dev extra), and slow (a Ray
# start or a submitit job per group costs tens of seconds on a busy 2-core machine): run them with `pytest -m slow`.
_SMALL = {"axes": {"model.d_hidden": [1, 2, 3]}, "repeats": 2}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install '.[ray]')")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning", "ignore::FutureWarning")
def test_ray_backend_gives_the_local_table(tmp_path):
    spec = _spec(_SMALL)
    _run(spec, tmp_path / "local")
    ray = _run(spec, tmp_path / "ray", backend="ray", workers=2)
    assert ray.ran == 3
    _assert_same_sweep(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow
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
