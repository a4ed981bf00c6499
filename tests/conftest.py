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
