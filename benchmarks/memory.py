"""The one training-memory estimate against the measured peak of live tensors, for presets it sizes at 10 MB or more.

    python benchmarks/memory.py            # every preset (sweep presets: their largest packed group)
    python benchmarks/memory.py double-descent compressed-computation

For each preset, ``superposition.spec.memory_estimate`` (what ``run`` refuses by and the sweep packs groups by) is
printed next to the peak of live tensors of a short training (creating the state, then a few eager steps), measured
by torch's profiler memory timeline (``profile_memory=True``; the allocator's view, not the process RSS). The eager
engine is measured because it is the larger of the two; the fused engine needs less. The script exits 1 when a
ratio leaves [1/1.5, 1.5].
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from superposition import sweep as sw
from superposition.folder import format_bytes
from superposition.spec import Experiment, load_spec, memory_estimate, preset_names
from superposition.train import TrainState, train_model

THRESHOLD = 10 * 2**20
FACTOR = 1.5
STEPS = 4


def sized(name: str) -> Experiment:
    """The preset as it trains (a sweep preset: its largest packed group), a few eager steps long."""
    spec = load_spec(name)
    if spec.sweep is not None:
        plan = sw.make_plan(spec)
        spec = max(plan.groups, key=lambda g: g.memory).experiment()
    raw = spec.model_dump(mode="json")
    raw["train"].update(steps=STEPS, warmup_steps=0, engine="eager", checkpoint_every=0, log_every=STEPS)
    raw["device"] = "cpu"
    return Experiment.model_validate({k: v for k, v in raw.items() if k not in ("sweep", "sae")})


def measured_peak(spec: Experiment) -> int:
    """Peak bytes of live CPU tensors while the state is created and trained for a few steps."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        state = TrainState.create(spec)
        train_model(state)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA snapshots; still the CPU timeline
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return int(max(sum(s) for s in sizes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="presets to check (default: every preset)")
    args = parser.parse_args(argv)
    names = args.presets or preset_names()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; eager engine, {STEPS} steps")
    print(f"{'preset':<30} {'estimate':>11} {'measured':>11} {'ratio':>6}  time")
    bad = []
    for name in names:
        spec = sized(name)
        estimate = memory_estimate(spec).total
        if estimate < THRESHOLD and not args.presets:
            continue
        start = time.perf_counter()
        peak = measured_peak(spec)
        ratio = estimate / max(peak, 1)
        ok = 1 / FACTOR <= ratio <= FACTOR
        bad += [] if ok else [name]
        print(
            f"{name:<30} {format_bytes(estimate):>11} {format_bytes(peak):>11} {ratio:>6.2f}  "
            f"{time.perf_counter() - start:.1f} s{'' if ok else '  <- outside the factor'}",
            flush=True,
        )
    if bad:
        print(f"outside a factor of {FACTOR}: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
