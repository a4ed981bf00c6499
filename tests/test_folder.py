"""The file-format primitives: atomic writers, and the one "is this folder ours" check behind every delete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from superposition.folder import (
    RUN,
    RUN_WORK,
    SAE,
    SWEEP,
    NotOurs,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_table,
    foreign_entry,
    format_bytes,
    fresh_workdir,
    publish,
    remove_owned,
)
from superposition.spec import parse_spec

SPEC = parse_spec({"model": {"n_features": 3, "d_hidden": 2}}).model_dump(mode="json")


def _run_folder(path: Path, *, extra: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"superposition_version": "0.1.0", "spec": SPEC}))
    for name in ("model.safetensors", "history.parquet", "instances.parquet", "report.html"):
        (path / name).write_bytes(b"x")
    for name, text in (extra or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _sae_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"format": "superposition-sae", "superposition_version": "0.1.0"}))
    (path / "model.safetensors").write_bytes(b"x")
    return path


def test_recognises_its_own_folders(tmp_path):
    run = _run_folder(tmp_path / "run", extra={".report.html.tmp": "half"})
    _sae_folder(run / "sae" / "relu")
    _sae_folder(run / "sae" / ".topk.old")
    assert foreign_entry(run, (RUN,)) is None
    work = tmp_path / ".w.partial"
    work.mkdir()
    (work / "spec.json").write_text(json.dumps(SPEC))
    (work / "checkpoint.safetensors").write_bytes(b"x")
    (work / ".model.safetensors.tmp").write_bytes(b"")  # our writer's temporary name
    assert foreign_entry(work, (RUN_WORK,)) is None and foreign_entry(work, (RUN,)) is not None
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"format": "superposition-sweep"}))
    _run_folder(sweep / "runs" / "g0001")
    (sweep / "errors").mkdir()
    (sweep / "errors" / "g0002.json").write_text("{}")
    assert foreign_entry(sweep, (SWEEP,)) is None
    assert foreign_entry(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    assert foreign_entry(tmp_path / "empty") is None


@pytest.mark.parametrize(
    "tamper, needle",
    [
        (lambda r: (r / "thesis.txt").write_text("mine"), "'thesis.txt'"),
        (lambda r: (r / "notes.tmp").write_text("mine"), "'notes.tmp'"),  # a .tmp name we never write
        (lambda r: (r / ".tmp_notes").write_text("mine"), "'.tmp_notes'"),
        (lambda r: (r / "config.json.tmp").write_text("mine"), "'config.json.tmp'"),
        (
            lambda r: _sae_folder(r / "sae" / "relu") and (r / "sae" / "relu" / "spec.json").write_text("{}"),
            "spec.json",
        ),
        (
            lambda r: shutil.copytree(r, r.parent / "copy") and shutil.move(r.parent / "copy", r / ".keep.old"),
            ".keep.old",
        ),
        (lambda r: (r / "sae").mkdir() or (r / "sae" / "mine.txt").write_text("x"), "sae/'mine.txt'"),
        (lambda r: (r / "config.json").write_text('{"spec": {}}'), "no config.json"),  # no version: not our marker
        (lambda r: (r / "history.parquet").unlink() or (r / "history.parquet").mkdir(), "'history.parquet'"),
        (lambda r: (r / "link").symlink_to("/"), "symbolic link"),
    ],
)
def test_anything_else_is_foreign_and_named(tmp_path, tamper, needle):
    run = _run_folder(tmp_path / "run")
    tamper(run)
    problem = foreign_entry(run, (RUN,))
    assert problem is not None and needle in problem, problem
    with pytest.raises(NotOurs, match="refusing to delete it"):
        remove_owned(run, (RUN,))
    assert run.is_dir() and (run / "config.json").exists()


def test_a_file_and_a_link_are_never_ours(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to(_run_folder(tmp_path / "run"))
    assert foreign_entry(tmp_path / "f") == "a file, not a folder"
    assert foreign_entry(tmp_path / "l") == "a symbolic link"


def test_removal_is_marker_last_so_a_killed_removal_is_finished_later(tmp_path, monkeypatch):
    run = _run_folder(tmp_path / "run")
    _sae_folder(run / "sae" / "relu")
    calls = []
    real_unlink = os.unlink

    def dying_unlink(path):
        calls.append(Path(path).name)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed part-way through the deletion
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", dying_unlink)
    with pytest.raises(KeyboardInterrupt):
        remove_owned(run, (RUN,))
    monkeypatch.setattr(os, "unlink", real_unlink)
    trash = tmp_path / ".run.trash"
    assert not run.exists() and trash.is_dir()
    assert foreign_entry(trash) is None  # what is left still carries its markers
    remove_owned(trash)
    assert list(tmp_path.iterdir()) == []


def test_fresh_workdir_and_publish(tmp_path):
    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    fresh_workdir(work, "spec.json", json.dumps(SPEC).encode(), (RUN_WORK,))
    assert sorted(p.name for p in work.iterdir()) == ["spec.json"]
    for name in ("model.safetensors", "history.parquet", "instances.parquet", "checkpoint.safetensors"):
        (work / name).write_bytes(b"x")
    (work / "config.json").write_text(json.dumps({"superposition_version": "0.1.0", "spec": SPEC}))
    publish(work, out, RUN, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "history.parquet", "instances.parquet", "model.safetensors",
    ]  # fmt: skip
    # a foreign working folder in the way is refused, untouched
    work.mkdir()
    (work / "mine.txt").write_text("x")
    with pytest.raises(NotOurs):
        fresh_workdir(work, "spec.json", b"{}", (RUN_WORK,))
    assert (work / "mine.txt").read_text() == "x"


def test_writers_are_atomic_and_use_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"abc")
        atomic_write_table(tmp_path / "t.parquet", pd.DataFrame({"x": [1, 2]}))
        atomic_save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(2)}, {"k": "v"})
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "t.parquet", "w.safetensors"]
    assert pd.read_parquet(tmp_path / "t.parquet")["x"].tolist() == [1, 2]


def test_format_bytes_is_binary():
    assert [format_bytes(n) for n in (512, 2048, 3 * 2**20, 5 * 2**30)] == ["512 B", "2.0 KiB", "3.0 MiB", "5.0 GiB"]


def test_sae_kind_is_not_a_run(tmp_path):
    sae = _sae_folder(tmp_path / "s")
    assert foreign_entry(sae, (SAE,)) is None and foreign_entry(sae, (RUN,)) is not None


# -- folders written before the layered package still load and render --------------------------------------------------
OLD = Path(__file__).parent / "fixtures" / "main-5bcae65"


def test_folders_of_the_previous_layout_load_and_render(tmp_path):
    import shutil

    import superposition as sp
    from superposition.runs import write_report
    from superposition.sweep import write_sweep_report

    for name in ("run", "sweep"):
        shutil.copytree(OLD / name, tmp_path / name)
    run = sp.load_run(tmp_path / "run")
    assert run.spec.name == "tiny" and run.spec.n_instances == 2 and len(run.instances) == 2
    sae = sp.load_sae(tmp_path / "run" / "sae" / "relu")
    assert sae.architecture == "relu" and len(sae.scores) > 0
    page = write_report(run).read_text(encoding="utf-8")
    assert "SAE relu" in page or "sae relu" in page.lower()
    sweep = sp.load_sweep(tmp_path / "sweep")
    assert sorted(sweep.results["status"].unique()) == ["ok"] and len(sweep.runs) == 2
    assert write_sweep_report(tmp_path / "sweep").stat().st_size > 1_000_000  # plotly.js embedded
    assert foreign_entry(tmp_path / "run", (RUN,)) is None and foreign_entry(tmp_path / "sweep", (SWEEP,)) is None


def test_a_chain_of_trash_is_checked_before_anything_is_deleted(tmp_path):
    work = tmp_path / ".w.partial"
    for path in (work, tmp_path / ".w.partial.trash"):
        path.mkdir()
        (path / "spec.json").write_text(json.dumps(SPEC))
    (tmp_path / ".w.partial.trash.trash").write_text("mine")  # a file of the user's at the end of the chain
    with pytest.raises(NotOurs, match="trash.trash"):
        remove_owned(work, (RUN_WORK,))
    assert (work / "spec.json").is_file() and (tmp_path / ".w.partial.trash" / "spec.json").is_file()
    (tmp_path / ".w.partial.trash.trash").unlink()
    remove_owned(work, (RUN_WORK,))
    assert list(tmp_path.iterdir()) == []


def test_dot_as_the_target_keeps_the_working_folder_outside_it(tmp_path, monkeypatch):
    from superposition.folder import normal, user_path, work_dir

    monkeypatch.chdir(tmp_path)
    assert work_dir(".") == tmp_path.parent / f".{tmp_path.name}.partial" and normal("x") == Path("x")
    assert user_path("/h/.cache.old/p/.c.partial/checkpoint.safetensors") == Path("/h/.cache.old/p/c")


def test_bfloat16_keeps_float32_weights_and_moments_in_the_estimate():
    from superposition.spec import memory_estimate

    raw = {"model": {"n_features": 1000, "d_hidden": 100, "tied": True}, "train": {"batch_size": 1}}
    fp32, bf16 = memory_estimate(parse_spec(raw)), memory_estimate(parse_spec({**raw, "dtype": "bfloat16"}))
    assert bf16.parameters == fp32.parameters and bf16.optimizer == fp32.optimizer == 4 * 2 * (100 * 1000 + 1000)
    assert bf16.activations * 2 == fp32.activations


def test_records_have_a_one_line_repr():
    import superposition as sp

    run = sp.load_run(OLD / "run")
    assert repr(run) == (f"Run('tiny': relu-output 5 features in 2 dims, 2 instance(s), 20 steps at {OLD / 'run'})")
    assert repr(sp.load_sae(OLD / "run" / "sae" / "relu")).startswith("Sae('relu': relu, 1 setting(s) x 2 instance(s)")
    assert repr(sp.load_sweep(OLD / "sweep")).startswith("Sweep('tinysweep': 2 point(s) in 2 model(s), 2 ok at ")
