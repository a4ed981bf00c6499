"""Shared fixtures: tiny specs that train in a second."""

from __future__ import annotations

import pytest
import torch

from superposition.spec import parse_spec


@pytest.fixture(autouse=True)
def _threads():
    # Keep the suite polite on small CI machines.
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the test: small models train several times faster on one thread than on two of a busy
    2-core machine (a parallel region's barriers cost more than they save)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_spec():
    def make(**sections):
        raw = {
            "name": "tiny",
            "model": {"kind": "relu-output", "n_features": 5, "d_hidden": 2},
            "data": {"feature_probability": 0.1},
            "task": {"importance": 0.9},
            "train": {"steps": 50, "batch_size": 64, "log_every": 10, "eval_batch": 256},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                raw[key] = {**raw.get(key, {}), **value}
            else:
                raw[key] = value
        return parse_spec(raw)

    return make


class CheckpointCrash(Exception):
    """Raised right after a checkpoint is written, to stand for a process killed there."""


@pytest.fixture
def crash_and_resume(monkeypatch):
    """``crash_and_resume(spec, out, at_step)``: train ``spec`` into ``out``, crash right after the checkpoint of
    ``at_step`` (asserting that nothing was published and the checkpoint is there), then resume; returns the run."""
    import superposition.runs as runs_module
    from superposition.runs import partial_dir, run

    def go(spec, out, at_step):
        real_save = runs_module.save_checkpoint

        def save_then_crash(folder, state):
            real_save(folder, state)
            if state.step == at_step:
                raise CheckpointCrash

        monkeypatch.setattr(runs_module, "save_checkpoint", save_then_crash)
        with pytest.raises(CheckpointCrash):
            run(spec, out)
        assert not out.exists() and (partial_dir(out) / "checkpoint.safetensors").is_file()
        monkeypatch.setattr(runs_module, "save_checkpoint", real_save)
        return run(spec, out, resume=True)

    return go
