"""Which engine trains a spec: whether torch.compile can build kernels here, and a fixed cost model of the eager
step that decides whether compiling pays back under ``engine = "auto"``."""

from __future__ import annotations

import importlib.util
import shutil
from typing import NamedTuple

import torch

from superposition.spec import Experiment


def compile_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here (a C++ compiler on CPU, Triton on CUDA)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
    except Exception:  # noqa: BLE001 - an unusual torch build: no compiler
        return False
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class EngineChoice(NamedTuple):
    """Which engine trains an experiment, and why."""

    engine: str
    reason: str


# Rough cost model of one eager step, used only to decide whether compiling pays back under engine = "auto".
# It is a fixed function of the spec (never a timing), so the same spec always trains on the same engine and
# gives the same weights. CPU constants fitted loosely to benchmarks/throughput.py on a 2-core CPU (the reference
# loop's step times, docs/PERFORMANCE.md); the CUDA ones are estimates, not yet measured.
EAGER_STEP_OVERHEAD_S = {"cpu": 1.5e-3, "cuda": 1.0e-3}
EAGER_S_PER_ELEMENT = {"cpu": 3e-8, "cuda": 3e-11}
EAGER_FLOP_PER_S = {"cpu": 3e10, "cuda": 2e13}
COMPILE_SECONDS = {"cpu": 40.0, "cuda": 60.0}
# Fraction of the eager time that the fused step saves: measured 55% (B, D: matmul-bound) to 94% (C1).
FAST_SAVES = 0.75


def estimated_eager_seconds(spec: Experiment, device_type: str) -> float:
    """A deterministic estimate of the eager engine's training time for a spec on a device type."""
    dev = "cuda" if device_type == "cuda" else "cpu"
    m, inst, bs = spec.model, spec.n_instances, spec.train.batch_size
    bs = min(bs, spec.data.dataset_size or bs)  # a fixed training set smaller than a batch is the whole batch
    n, h = m.n_features, m.d_hidden
    elements = bs * inst * n
    if m.kind == "residual-mlp":
        k = n + m.n_layers * (h + 1)
        flops = 2 * bs * inst * k * (h + n) * m.n_layers * 3
    else:
        flops = 2 * bs * inst * n * h * 5
    per_step = EAGER_STEP_OVERHEAD_S[dev] + elements * EAGER_S_PER_ELEMENT[dev] + flops / EAGER_FLOP_PER_S[dev]
    return spec.train.steps * per_step


def choose_engine(spec: Experiment, device: torch.device) -> EngineChoice:
    """Resolve ``train.engine``: eager, fast (compiled), or fast-uncompiled (asked for fast without a compiler)."""
    asked = spec.train.engine
    if asked == "eager":
        return EngineChoice("eager", "asked for")
    can_compile = compile_available(device)
    if asked == "fast":
        if can_compile:
            return EngineChoice("fast", "asked for")
        return EngineChoice("fast-uncompiled", "asked for fast, but torch.compile has no compiler here")
    if not can_compile:
        return EngineChoice("eager", "torch.compile has no compiler here")
    eager_s = estimated_eager_seconds(spec, device.type)
    compile_s = COMPILE_SECONDS["cuda" if device.type == "cuda" else "cpu"]
    if FAST_SAVES * eager_s > 2 * compile_s:
        return EngineChoice("fast", f"~{eager_s:.0f} s eager; compiling (~{compile_s:.0f} s) pays back")
    return EngineChoice("eager", f"~{eager_s:.0f} s eager; too short for compiling (~{compile_s:.0f} s) to pay")
