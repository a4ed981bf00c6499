"""Crashes cost nothing: SIGKILL a training process at random moments, then resume to a bit-identical run.

The kills hit real processes running ``superposition.cli.main(["run", ...])``. To afford dozens of them, a small fork
server imports torch and the package once and forks one child per command (the console script does the same work
after its imports); the server sends SIGKILL itself while the child is still unreaped, so a pid is never reused.
Some kills are aimed with hooks at the dangerous moments: half-way through writing a checkpoint, just before and
after each rename of the final save. One more kill hits the real console script.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from superposition.cli import main
from superposition.runs import load_run, partial_dir, read_safetensors_header

ENGINES = ("eager", "fast", "fast-uncompiled")
RUN_FILES = {"config.json", "model.safetensors", "history.parquet", "instances.parquet", "report.html"}

SPEC_TOML = """
name = "k"
seed = 3
[model]
n_features = 5
d_hidden = 2
[data]
feature_probability = 0.1
[task]
importance = 0.9
[train]
steps = 96
batch_size = 32
log_every = 8
checkpoint_every = 8
eval_batch = 128
[instances]
seed = [0, 1, 2]
"""

# The fork server. Children run the CLI in-process; a hook may make a child SIGKILL itself at a chosen moment.
SERVER = r"""
import json, os, signal, sys, time
os.environ["OMP_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(1)
import safetensors.torch
import superposition.cli as cli
import superposition.report as report
import superposition.runs as runs

# The kill test is about the folder, not the page: a tiny report keeps each run fast (the write stays atomic).
report.render_run = lambda run: "<!doctype html><title>kill test</title>"
real_replace, real_save = os.replace, safetensors.torch.save_file


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(hook):
    kind, name, nth, when = hook
    seen = [0]
    if kind == "torn-checkpoint":  # kill half-way through writing the n-th checkpoint file
        def save(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            if filename.endswith("checkpoint.safetensors.tmp"):
                seen[0] += 1
                if seen[0] == nth:
                    size = os.path.getsize(filename)
                    os.truncate(filename, size // 2)
                    die()
        runs.save_file = save
    else:  # kill just before or after the n-th rename onto `name`
        def replace(src, dst):
            hit = os.path.basename(os.fspath(dst)) == name
            if hit:
                seen[0] += 1
            if hit and seen[0] == nth and when == "before":
                die()
            real_replace(src, dst)
            if hit and seen[0] == nth and when == "after":
                die()
        os.replace = replace


# Warm up once in the server (lazy imports, first-call set-up), so that no forked child pays for it again.
warm = json.loads(sys.stdin.readline())
cli.main(warm["argv"])

for line in sys.stdin:
    req = json.loads(line)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(req["cwd"])
            if req.get("hook"):
                install(req["hook"])
            code = cli.main(req["argv"])
        finally:
            os._exit(code)
    killed = False
    if req.get("kill_after") is not None:
        deadline = start + req["kill_after"]
        while time.perf_counter() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.002)
        else:
            os.kill(pid, signal.SIGKILL)  # the child is not reaped yet, so this pid is still ours
            killed = True
            done, status = os.waitpid(pid, 0)
    else:
        done, status = os.waitpid(pid, 0)
    signaled = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    out = {"code": code, "killed": signaled, "seconds": time.perf_counter() - start}
    print(json.dumps(out), flush=True)
"""


class ForkServer:
    def __init__(self, folder: Path):
        self.folder = folder
        script = folder / "server.py"
        script.write_text(SERVER)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.n = 0
        warm = folder / ".warm-up"
        spec = folder / "k.toml"
        self.proc.stdin.write(json.dumps({"argv": ["run", str(spec), "--out", str(warm), "--quiet"]}) + "\n")
        self.proc.stdin.flush()

    def call(self, argv: list[str], cwd: Path, *, hook=None, kill_after: float | None = None) -> dict:
        self.n += 1
        log = self.folder / f"child{self.n}.log"
        req = {"argv": [str(a) for a in argv], "cwd": str(cwd), "hook": hook, "kill_after": kill_after}
        self.proc.stdin.write(json.dumps({**req, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        reply = json.loads(line)
        reply["log"] = log.read_text() if log.exists() else ""
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def _scratch(tmp_path_factory) -> Path:
    # Checkpoints are fsynced; on a RAM disk that costs nothing, which keeps dozens of kills fast.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        import tempfile

        return Path(tempfile.mkdtemp(prefix="superposition-kill-", dir=shm))
    return tmp_path_factory.mktemp("kill")


@pytest.fixture(scope="module")
def kill_env(tmp_path_factory):
    root = _scratch(tmp_path_factory)
    spec_file = root / "k.toml"
    spec_file.write_text(SPEC_TOML)
    server = ForkServer(root)
    try:
        ref = server.call(["run", spec_file, "--out", root / "reference", "--quiet"], root)
        assert ref["code"] == 0, ref["log"]
        old = server.call(["run", spec_file, "--out", root / "old", "--set", "seed=4", "--quiet"], root)
        assert old["code"] == 0, old["log"]
        yield {"root": root, "spec": spec_file, "server": server, "seconds": ref["seconds"]}
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same_run(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
        return False
    for table in ("history.parquet", "instances.parquet"):
        fa, fb = pd.read_parquet(a / table), pd.read_parquet(b / table)
        if not fa.equals(fb):
            return False
    return True


def _check_after_kill(trial: Path, out: Path, env: dict, overwrite: bool) -> str:
    """The invariants that must hold the instant after a kill; returns what was under the final name."""
    visible = sorted(p.name for p in trial.iterdir() if not p.name.startswith("."))
    assert visible in ([], [out.name]), visible
    state = "absent"
    if out.exists():
        # Never half-written: exactly the run files, loadable, and either the old run or the finished new one.
        assert {p.name for p in out.iterdir()} == RUN_FILES
        load_run(out)
        if _same_run(out, env["root"] / "reference"):
            state = "new"
        else:
            assert overwrite and _same_run(out, env["root"] / "old")
            state = "old"
    partial = partial_dir(out)
    if partial.is_dir():
        # Every checkpoint on disk (not a half-written .tmp) loads, with its step.
        for ckpt in partial.glob("*.safetensors"):
            header = read_safetensors_header(ckpt)
            step = int(header.metadata.get("step", -1)) if ckpt.name.startswith("checkpoint") else 0
            assert step >= 0
            assert load_file(str(ckpt))
    return state


def _trial(env: dict, i: int, *, hook=None, kill_after=None, overwrite=False, via_resume=True) -> bool:
    """One kill and recovery; returns whether the process was really killed."""
    server, root = env["server"], env["root"]
    trial = root / f"trial{i}"
    trial.mkdir()
    out = trial / "k"
    if overwrite:
        shutil.copytree(root / "old", out)
    argv = ["run", env["spec"], "--out", out, "--quiet"] + (["--overwrite"] if overwrite else [])
    reply = server.call(argv, trial, hook=hook, kill_after=kill_after)
    assert reply["killed"] or reply["code"] == 0, reply["log"]
    state = _check_after_kill(trial, out, env, overwrite)
    partial = partial_dir(out)
    if partial.is_dir() and via_resume:
        again = server.call(["resume", out, "--quiet"], trial)
    elif partial.is_dir() or state != "new":
        again = server.call([*argv, "--resume"], trial)  # the same command again, asking to resume
    else:
        again = {"code": 0, "log": ""}
    assert again["code"] == 0, again["log"]
    assert not partial.exists()
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert _same_run(out, root / "reference"), f"trial {i}: the resumed run differs"
    loaded = load_run(out)
    assert loaded.meta["torch_version"] == torch.__version__ and loaded.meta["engine"] in ENGINES
    hidden = {p.name for p in trial.iterdir() if p.name.startswith(".")}
    assert hidden <= {".k.old"}, hidden  # only a kill inside the final clean-up of an overwrite leaves .k.old
    shutil.rmtree(trial)
    return reply["killed"]


# Aimed kills: (hook, overwrite). Hooks: ("torn-checkpoint", _, n, _) or ("replace", file name, n, before|after).
AIMED = [
    (("torn-checkpoint", "", 1, ""), False),
    (("torn-checkpoint", "", 4, ""), False),
    (("replace", "checkpoint.safetensors", 3, "before"), False),
    (("replace", "checkpoint.safetensors", 5, "after"), False),
    (("replace", "spec.json", 1, "after"), False),
    (("replace", ".k.partial", 1, "before"), False),
    (("replace", "model.safetensors", 1, "before"), False),
    (("replace", "instances.parquet", 1, "after"), False),
    (("replace", "config.json", 1, "before"), False),
    (("replace", "config.json", 1, "after"), False),
    (("replace", "k", 1, "before"), False),
    (("replace", ".k.old", 1, "after"), True),
    (("replace", "k", 1, "after"), True),
    (("torn-checkpoint", "", 2, ""), True),
]


def _kill_campaign(env: dict, n_kills: int, seed: int) -> int:
    rng = random.Random(seed)
    kills = i = 0
    for hook, overwrite in AIMED:
        kills += _trial(env, i, hook=list(hook), overwrite=overwrite, via_resume=i % 2 == 0)
        i += 1
    # Random moments over the whole life of the process (start-up, training, checkpoints, final save).
    while kills < n_kills:
        assert i < 4 * n_kills, "too few kills landed"
        delay = rng.uniform(0.0, 1.05 * env["seconds"])
        kills += _trial(env, i, kill_after=delay, overwrite=rng.random() < 0.25, via_resume=rng.random() < 0.5)
        i += 1
    return kills


def test_sigkill_and_resume_20_times(kill_env):
    assert _kill_campaign(kill_env, 20, seed=1) >= 20


@pytest.mark.slow
def test_sigkill_and_resume_50_times(kill_env):
    assert _kill_campaign(kill_env, 50, seed=2) >= 50


def test_sigkill_of_the_console_script(kill_env, tmp_path):
    # One kill of the real installed command (interpreter start-up included), then `superposition resume`.
    exe = Path(sys.executable).with_name("superposition")
    if not exe.exists():
        pytest.skip("the console script is not installed next to this interpreter")
    out = tmp_path / "k"
    cmd = [str(exe), "run", str(kill_env["spec"]), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the reference was trained
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # Wait until training has written a checkpoint, then kill.
    ckpt = partial_dir(out) / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not out.exists() or {p.name for p in out.iterdir()} == RUN_FILES
    torch.set_num_threads(1)  # the reference was trained on one thread
    if partial_dir(out).exists():
        assert main(["resume", str(out), "--quiet"]) == 0
    elif not out.exists():
        assert main(["run", str(kill_env["spec"]), "--out", str(out), "--quiet"]) == 0
    assert _same_run(out, kill_env["root"] / "reference")


# -- resume rules, in process ---------------------------------------------------------------------------------------
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def small_toml(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC_TOML.replace("steps = 96", "steps = 24"))
    return spec


def test_resume_command_refuses_what_cannot_be_resumed(tmp_path, small_toml, capsys):
    assert main(["resume", str(tmp_path / "nothing")]) == 2
    assert "no interrupted run here" in _one_error_line(capsys)
    assert not (tmp_path / "nothing").exists()
    out = tmp_path / "done"
    assert main(["run", str(small_toml), "--out", str(out), "--quiet"]) == 0
    assert main(["resume", str(out)]) == 2
    assert "complete; nothing to resume" in _one_error_line(capsys)
    # A damaged spec.json in the partial folder: one line, nothing trained.
    partial = partial_dir(tmp_path / "bad")
    partial.mkdir()
    (partial / "spec.json").write_text('{"model": {"n_features": "many"}}')
    assert main(["resume", str(tmp_path / "bad")]) == 2
    assert "invalid spec" in _one_error_line(capsys)
    assert not (tmp_path / "bad").exists()


def test_rerun_without_resume_keeps_the_checkpoint(tmp_path, small_toml, capsys, monkeypatch):
    import superposition.runs as runs

    out = tmp_path / "k"

    def crash(folder, state):
        real(folder, state)
        raise KeyboardInterrupt

    real = runs.save_checkpoint
    monkeypatch.setattr(runs, "save_checkpoint", crash)
    assert main(["run", str(small_toml), "--out", str(out), "--quiet"]) == 130
    capsys.readouterr()
    monkeypatch.setattr(runs, "save_checkpoint", real)
    ckpt = partial_dir(out) / "checkpoint.safetensors"
    assert ckpt.is_file() and not out.exists()
    before = ckpt.read_bytes()
    # Running it again without --resume would throw the checkpoint away: refused, with the way out.
    assert main(["run", str(small_toml), "--out", str(out), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "checkpoint at step 8" in line and "--resume" in line
    assert ckpt.read_bytes() == before
    # A different spec cannot resume it either.
    assert main(["run", str(small_toml), "--out", str(out), "--resume", "--set", "seed=9", "--quiet"]) == 2
    assert "different spec" in _one_error_line(capsys)
    assert main(["resume", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == RUN_FILES and not partial_dir(out).exists()
    straight = tmp_path / "straight"
    assert main(["run", str(small_toml), "--out", str(straight), "--quiet"]) == 0
    assert _same_run(out, straight)


def test_same_spec_and_seed_give_identical_files(tmp_path, small_toml):
    # Determinism: two runs of one spec write byte-identical weights and equal tables; config.json differs only in
    # the training time. (Guaranteed on one machine, torch build, device, engine and thread count.)
    for name in ("a", "b"):
        assert main(["run", str(small_toml), "--out", str(tmp_path / name), "--quiet"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    for table in ("history.parquet", "instances.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / table), pd.read_parquet(b / table))
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    ca.pop("train_seconds"), cb.pop("train_seconds")
    assert ca == cb
    assert {"torch_version", "device", "engine", "device_name", "python_version", "platform"} <= ca.keys()
    assert ca["torch_version"] == torch.__version__ and ca["device"] == "cpu" and ca["engine"] in ENGINES
    # A different seed gives different weights (the comparison above is not vacuous).
    assert main(["run", str(small_toml), "--out", str(tmp_path / "c"), "--set", "seed=4", "--quiet"]) == 0
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


# -- divergence -----------------------------------------------------------------------------------------------------
def _poison(monkeypatch, instance: int, at_step: int) -> None:
    """Make one instance's weights NaN after ``at_step`` steps: a stand-in for a loss that blows up."""
    from superposition.train import TrainState

    real = TrainState.eager_step

    def step(self):
        loss = real(self)
        if self.step == at_step:
            with torch.no_grad():
                self.model.W[instance].fill_(float("nan"))
        return loss

    monkeypatch.setattr(TrainState, "eager_step", step)


def test_divergence_stops_with_instances_and_step(tmp_path, small_toml, capsys, monkeypatch):
    _poison(monkeypatch, instance=1, at_step=10)
    out = tmp_path / "k"
    assert main(["run", str(small_toml), "--out", str(out), "--quiet", "--set", "train.engine='eager'"]) == 1
    line = _one_error_line(capsys)
    assert "diverged at step 16" in line and "instance(s) 1;" in line and "on_divergence" in line
    # Nothing left behind: resuming would only diverge again.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


def test_divergence_drop_masks_instances_and_goes_on(tmp_path, small_toml, monkeypatch):
    sets = ["--set", "train.on_divergence='drop'", "--set", "train.engine='eager'", "--quiet"]
    assert main(["run", str(small_toml), "--out", str(tmp_path / "clean"), *sets]) == 0
    _poison(monkeypatch, instance=2, at_step=10)
    assert main(["run", str(small_toml), "--out", str(tmp_path / "dropped"), *sets]) == 0
    clean, dropped = load_run(tmp_path / "clean"), load_run(tmp_path / "dropped")
    assert dropped.instances["diverged"].tolist() == [False, False, True]
    assert clean.instances["diverged"].tolist() == [False, False, False]
    loss = dropped.instances["loss"]
    assert loss[:2].notna().all() and pd.isna(loss[2])
    # Instances never interact: the survivors trained exactly as in the clean run, the dropped one is zeroed.
    for name, value in dropped.model.state_dict().items():
        assert torch.equal(value[:2], clean.model.state_dict()[name][:2]), name
        assert torch.equal(value[2], torch.zeros_like(value[2])), name
    steps = dropped.history["step"].unique().tolist()
    assert steps == clean.history["step"].unique().tolist() and steps[-1] == 23


def test_fast_engine_resumes_bit_identically(tmp_path, monkeypatch):
    # The fused engine draws its data from counters (seed, step), not from the generator: resuming must still
    # give the uninterrupted run. Uncompiled here, so the test needs no C++ compiler and no compile time.
    import superposition.runs as runs

    fast = pytest.importorskip("superposition.fast")
    from superposition.spec import parse_spec

    monkeypatch.setattr(fast.engine, "compile_available", lambda device: False)
    spec = parse_spec(
        {
            "name": "f",
            "model": {"n_features": 5, "d_hidden": 2},
            "data": {"feature_probability": 0.1},
            "train": {"steps": 60, "batch_size": 32, "log_every": 10, "checkpoint_every": 20, "engine": "fast"},
            "instances": {"seed": [0, 1]},
        }
    )
    straight = runs.run(spec, tmp_path / "a")
    assert straight.meta["engine"] == "fast-uncompiled"
    real = runs.save_checkpoint

    def crash(folder, state):
        real(folder, state)
        if state.step == 40:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.run(spec, tmp_path / "b")
    monkeypatch.setattr(runs, "save_checkpoint", real)
    runs.run(spec, tmp_path / "b", resume=True)
    assert _same_run(tmp_path / "a", tmp_path / "b")
