"""The training step and loop: per-instance loss, Adam/AdamW with per-instance settings, schedules,
history, divergence checks and resumable checkpoints.

Instances never interact: each instance's loss is reduced on its own before the sum, and the optimiser is
element-wise, so the gradient and update of instance k do not depend on any other instance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from superposition.data import Sampler, importance_tensor, make_sampler, target_fn
from superposition.errors import TrainingDiverged
from superposition.fast import FastStepper, adam_update_, choose_engine, compiled_threads, stream_keys
from superposition.models import ToyModel, build_model
from superposition.progress import Progress, make_bar
from superposition.spec import Experiment

__all__ = [
    "TrainingDiverged",
    "TrainState",
    "Trained",
    "AdamState",
    "adam_step_",
    "lr_multiplier",
    "per_instance_loss",
    "resolve_device",
    "train_model",
    "evaluate",
]


def resolve_device(device: str) -> torch.device:
    """'auto' means cuda when available; asking for cuda without one is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from superposition.spec import SpecError

        raise SpecError("device: 'cuda' was asked for but no CUDA device is available (use 'cpu' or 'auto')")
    return torch.device(device)


# -- loss ---------------------------------------------------------------------------------------------------------
def per_instance_loss(
    out: Float[Tensor, "batch inst feats"],
    target: Float[Tensor, "batch inst feats"],
    importance: Float[Tensor, "inst feats"],
    loss: str = "l2",
) -> Float[Tensor, " inst"]:
    """Mean over batch and features of I_i * (target - out)^2 (or |.| for l1), one value per instance."""
    err = target - out
    err = err.square() if loss == "l2" else err.abs()
    return (err * importance).mean(dim=(0, 2))


def instance_tensor(spec: Experiment, key: str, device: torch.device | str) -> Float[Tensor, " inst"]:
    """A per-instance setting (``train.lr``, ``train.weight_decay``, ...) as float32, one value per instance."""
    return torch.tensor([float(v) for v in spec.instance_values(key)], device=device, dtype=torch.float32)


# -- optimiser ----------------------------------------------------------------------------------------------------
@dataclass
class AdamState:
    """Adam moments for each parameter (same shapes, instance dimension first) and the step count."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    step: int = 0

    @classmethod
    def zeros_like(cls, params: dict[str, Tensor]) -> AdamState:
        return cls(
            {k: torch.zeros_like(v) for k, v in params.items()},
            {k: torch.zeros_like(v) for k, v in params.items()},
        )


@torch.no_grad()
def adam_step_(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    state: AdamState,
    lr: Float[Tensor, " inst"],
    weight_decay: Float[Tensor, " inst"],
    decoupled: bool,
) -> None:
    """One Adam (or AdamW when ``decoupled``) update in place, with per-instance lr and weight decay.

    The same update as the fast engine's (:func:`superposition.fast.adam_update_`, torch.optim.Adam/AdamW's
    formula); this wrapper keeps the step count on the host.
    """
    step = torch.tensor(state.step, dtype=torch.int64, device=lr.device)
    adam_update_(params, grads, state.exp_avg, state.exp_avg_sq, step, lr, weight_decay, decoupled)
    state.step += 1


def lr_multiplier(schedule: str, step: int, steps: int, warmup: int = 0) -> float:
    """Learning-rate factor at a 0-based step: constant, 1 - t/T, cos(pi t / 2(T-1)), warm-up then cosine."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - step / steps
    if schedule == "cosine":
        return math.cos(math.pi * step / (2 * max(steps - 1, 1)))
    if step < warmup:
        return (step + 1) / warmup
    t, span = step - warmup, max(steps - warmup - 1, 1)
    return 0.5 * (1 + math.cos(math.pi * t / span))


# -- state ------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a training run needs to continue: model, optimiser, data stream, step, dropped instances."""

    spec: Experiment
    model: ToyModel
    sampler: Sampler
    importance: Tensor
    lr: Tensor
    weight_decay: Tensor
    residual_factor: Tensor
    adam: AdamState
    generator: torch.Generator
    dataset: Tensor | None
    alive: Tensor
    step: int = 0
    history: list[tuple[int, np.ndarray]] = field(default_factory=list)
    engine: str = "eager"
    engine_reason: str = ""
    phase: int = 0
    """Index of the phase being trained (``train.phases``; 0 without phases)."""
    active: Experiment | None = None
    """The experiment the current phase trains (:meth:`Experiment.phase_spec`; the spec itself without phases)."""
    fast: FastStepper | None = None
    _fast_inputs: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None  # the fused step's arguments

    @property
    def params(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    @classmethod
    def create(cls, spec: Experiment, device: torch.device | None = None) -> TrainState:
        device = device or resolve_device(spec.device)
        model = build_model(spec, device)
        dt = next(model.parameters()).dtype
        gen = torch.Generator(device=device)
        gen.manual_seed(spec.seed)
        sampler = make_sampler(spec, device, dt)
        dataset = None
        if spec.data.dataset_size is not None:
            # A fixed training set is drawn on the CPU whatever the device (a CUDA generator draws other numbers), so
            # it can be rebuilt on any machine; on the CPU this is the run's own generator, first use.
            on_cpu = device.type == "cpu"
            cpu_gen = gen if on_cpu else torch.Generator().manual_seed(spec.seed)
            cpu_sampler = sampler if on_cpu else make_sampler(spec, "cpu", dt)
            dataset = cpu_sampler.sample(spec.data.dataset_size, cpu_gen).to(device)

        active = spec.phase_spec(0)

        params = dict(model.named_parameters())
        choice = choose_engine(spec, device)
        return cls(
            spec=spec,
            model=model,
            sampler=sampler,
            importance=importance_tensor(spec, device, dt),
            lr=instance_tensor(active, "train.lr", device),
            weight_decay=instance_tensor(active, "train.weight_decay", device),
            residual_factor=instance_tensor(active, "task.residual_factor", device).to(dt),
            adam=AdamState.zeros_like({k: v.detach() for k, v in params.items()}),
            generator=gen,
            dataset=dataset,
            alive=torch.ones(spec.n_instances, dtype=torch.bool, device=device),
            engine=choice.engine,
            engine_reason=choice.reason,
            active=active,
        )

    @property
    def current(self) -> Experiment:
        """The experiment the current phase trains (the spec itself without phases)."""
        return self.active or self.spec

    @property
    def phase_start(self) -> int:
        """The global step at which the current phase started."""
        return self.spec.train.phase_starts[self.phase]

    def enter_phase(self, i: int) -> None:
        """Start phase i on the weights so far: its settings, fresh Adam moments, its own fused step."""
        self.phase = i
        self.active = self.spec.phase_spec(i)
        for key, store in (("train.lr", self.lr), ("train.weight_decay", self.weight_decay)):
            store.copy_(instance_tensor(self.current, key, store.device))
        for store in (self.adam.exp_avg, self.adam.exp_avg_sq):
            for v in store.values():
                v.zero_()
        self.adam.step = 0
        self.fast, self._fast_inputs = None, None

    def batch(self) -> Float[Tensor, "batch inst feats"]:
        """The next training batch: fresh samples, or (fixed dataset) all of it or a random subset."""
        bs = self.spec.train.batch_size
        if self.dataset is None:
            return self.sampler.sample(bs, self.generator)
        if self.dataset.shape[0] <= bs:
            return self.dataset
        idx = torch.randint(0, self.dataset.shape[0], (bs,), generator=self.generator, device=self.dataset.device)
        return self.dataset[idx]

    def loss(self, x: Tensor) -> Float[Tensor, " inst"]:
        """Per-instance loss of the model on a batch (``dtype = "bfloat16"``: products under bf16 autocast)."""
        y = target_fn(self.spec.task.target, x, self.residual_factor)
        bf16 = self.spec.dtype == "bfloat16"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.model(x)
        return per_instance_loss(out.float(), y, self.importance, self.current.task.loss)

    def eager_step(self) -> Float[Tensor, " inst"]:
        """One plain step: sample, forward, per-instance loss summed, backward, Adam."""
        x = self.batch()
        loss = self.loss(x)
        masked = torch.where(self.alive, loss, torch.zeros_like(loss))
        params = self.params
        grads = torch.autograd.grad(masked.sum(), list(params.values()))
        t = self.current.train
        mult = lr_multiplier(t.schedule, self.step - self.phase_start, t.steps, t.warmup_steps)
        adam_step_(
            {k: v.data for k, v in params.items()},
            dict(zip(params, grads, strict=True)),
            self.adam,
            self.lr * mult,
            self.weight_decay,
            decoupled=t.optimizer == "adamw",
        )
        self.step += 1
        return loss.detach()

    def fast_step(self) -> Float[Tensor, " inst"]:
        """One fused step of the fast engine (compiled on first use); same contract as :meth:`eager_step`."""
        if self.fast is None:
            self.fast = FastStepper(self.current, compile=self.engine == "fast")
        if self._fast_inputs is None:
            self._fast_inputs = self._make_fast_inputs()
        params, tensors = self._fast_inputs
        local = self.step - self.phase_start
        loss = self.fast(params, self.adam.exp_avg, self.adam.exp_avg_sq, local, tensors)
        if self.engine == "fast" and not self.fast.compile:
            self.engine, self.engine_reason = "fast-uncompiled", f"torch.compile failed ({self.fast.fallback})"
        self.step += 1
        self.adam.step = local + 1
        return loss

    def _make_fast_inputs(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The fused step's arguments, made once: views of the live tensors, which every step and checkpoint load
        changes in place (the fixed training set is copied once, feature-major)."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        tensors = {
            "probability": self.sampler.probability,
            "importance": self.importance,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "residual_factor": self.residual_factor,
            "alive": self.alive,
            "relu_out": self.model.relu_out,
            # Each phase draws its own stream (the step counter restarts with the phase).
            "keys": stream_keys(self.spec.seed + self.phase * 1_000_003, self.alive.device),
        }
        if self.spec.model.kind == "residual-mlp":
            tensors["W_E"] = self.model.W_E
        if self.dataset is not None:
            tensors["dataset"] = self.dataset.permute(1, 2, 0).contiguous()  # (inst, feats, T)
        return params, tensors

    def train_step(self) -> Float[Tensor, " inst"]:
        """One step of the state's engine."""
        return self.eager_step() if self.engine == "eager" else self.fast_step()

    @torch.no_grad()
    def drop_(self, bad: Tensor) -> None:
        """Mask diverged instances: zero their parameters and moments so NaNs cannot spread (in place)."""
        self.alive &= ~bad
        for name, p in self.model.named_parameters():
            dead = ~self.alive.view((-1,) + (1,) * (p.dim() - 1))
            p.data.masked_fill_(dead, 0.0)
            for store in (self.adam.exp_avg, self.adam.exp_avg_sq):
                store[name].masked_fill_(dead, 0.0)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Flat tensor dict of the whole state (model, Adam moments, RNG, mask) for safetensors."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"adam.exp_avg.{k}": v for k, v in self.adam.exp_avg.items()})
        out.update({f"adam.exp_avg_sq.{k}": v for k, v in self.adam.exp_avg_sq.items()})
        out["rng"] = self.generator.get_state()
        out["alive"] = self.alive.to(torch.uint8)
        if self.history:
            out["history.steps"] = torch.tensor([s for s, _ in self.history], dtype=torch.int64)
            out["history.loss"] = torch.tensor(np.stack([v for _, v in self.history]))
        # Copies, not views: the live tensors go on changing in place after a checkpoint is taken.
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}

    def load_tensors_(self, tensors: dict[str, Tensor], step: int) -> None:
        """Restore a state written by :meth:`tensors`."""
        dev = self.alive.device
        self.model.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True
        )
        phase = self.spec.train.phase_at(step)
        if phase != self.phase:
            self.enter_phase(phase)
        start = self.spec.train.phase_starts[phase]
        # A checkpoint taken as a phase ended holds that phase's moments; the next phase starts from zero ones.
        if step > start or phase == 0:
            # In place, so tensors that a compiled step (or a captured CUDA graph) holds stay valid.
            for name in self.adam.exp_avg:
                self.adam.exp_avg[name].copy_(tensors[f"adam.exp_avg.{name}"])
                self.adam.exp_avg_sq[name].copy_(tensors[f"adam.exp_avg_sq.{name}"])
        self.adam.step = step - start
        self.generator.set_state(tensors["rng"])
        self.alive.copy_(tensors["alive"].to(dev).bool())
        if "history.steps" in tensors:
            steps, losses = tensors["history.steps"].tolist(), tensors["history.loss"].numpy()
            self.history = [(s, losses[i]) for i, s in enumerate(steps)]
        self.step = step


class Trained(NamedTuple):
    """What :func:`train_model` returns."""

    state: TrainState
    seconds: float


def _check_finite(state: TrainState, loss: Tensor, step: int) -> None:
    bad = ~torch.isfinite(loss) & state.alive
    if not bool(bad.any()):
        return
    idx = bad.nonzero().flatten().tolist()
    if state.spec.train.on_divergence == "stop":
        raise TrainingDiverged(step, idx)
    state.drop_(bad)


def train_model(
    state: TrainState,
    *,
    progress: Progress = None,
    checkpoint: Callable[[TrainState], None] | None = None,
) -> Trained:
    """Run the loop from ``state.step`` to ``spec.train.steps``; ``checkpoint(state)`` is called on schedule and
    ``progress`` (a bar factory, :mod:`superposition.progress`) shows steps and loss."""
    spec = state.spec
    t = spec.train
    bar = make_bar(progress, total=t.steps, initial=state.step, desc=f"{spec.name} [{state.engine}]", unit="step")
    # Small eager steps run on one CPU thread: torch's parallel regions cost more than they save there, and on a busy
    # machine far more (7 x 20 x 5, batch 1024, under load: 13 ms/step on 1 thread, 170-330 ms on 2).
    previous_threads = torch.get_num_threads()
    if state.engine == "eager" and state.importance.device.type == "cpu" and compiled_threads(spec) == 1:
        torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        _loop(state, bar, checkpoint)
    finally:
        torch.set_num_threads(previous_threads)
        if bar is not None:
            bar.close()
    return Trained(state, time.perf_counter() - start)


def _loop(state: TrainState, bar: Any, checkpoint: Callable[[TrainState], None] | None) -> None:
    """The steps from ``state.step`` to the end: history, divergence checks, progress bar, checkpoints."""
    t = state.spec.train
    starts = t.phase_starts
    while state.step < t.steps:
        if state.phase + 1 < len(starts) and state.step >= starts[state.phase + 1]:
            state.enter_phase(state.phase + 1)
        step = state.step
        if bar is not None and state.engine == "fast" and state.fast is None:
            bar.set_postfix_str("compiling the fused step")
        loss = state.train_step()
        last = state.step == t.steps
        if step % t.log_every == 0 or last:
            _check_finite(state, loss, step)
            state.history.append((step, loss.float().cpu().numpy()))
            if bar is not None:
                mean = float(loss[state.alive].mean()) if state.alive.any() else float("nan")
                phase = f" {t.phase_name(state.phase)}" if t.phases else ""
                bar.set_postfix_str(f"loss={mean:.3g}{phase}")
        if bar is not None:
            bar.update(1)
        if checkpoint is not None and t.checkpoint_every and state.step % t.checkpoint_every == 0 and not last:
            checkpoint(state)


@torch.no_grad()
def evaluate(state: TrainState, n: int | None = None, seed_offset: int = 1) -> Float[Tensor, " inst"]:
    """Per-instance loss on fresh samples from a separate seeded stream (the test loss)."""
    n = n or state.spec.train.eval_batch
    gen = torch.Generator(device=state.alive.device)
    gen.manual_seed(state.spec.seed + seed_offset * 7_777_777)
    chunk = max(1, min(n, state.spec.train.batch_size))
    total = torch.zeros(state.spec.n_instances, device=state.alive.device, dtype=torch.float64)
    done = 0
    while done < n:
        b = min(chunk, n - done)
        total += state.loss(state.sampler.sample(b, gen)).double() * b
        done += b
    loss = (total / n).float()
    return torch.where(state.alive, loss, torch.full_like(loss, float("nan")))


def history_frame(state: TrainState) -> pd.DataFrame:
    """Long table (step, instance, loss) of the recorded history."""
    if not state.history:
        return pd.DataFrame({"step": [], "instance": [], "loss": []})
    steps = np.array([s for s, _ in state.history], dtype=np.int64)
    losses = np.stack([v for _, v in state.history]).astype(np.float64)
    inst = losses.shape[1]
    frame = pd.DataFrame(
        {
            "step": np.repeat(steps, inst),
            "instance": np.tile(np.arange(inst, dtype=np.int64), len(steps)),
            "loss": losses.reshape(-1),
        }
    )
    t = state.spec.train
    if t.phases:  # the phase of each row, by its step
        frame["phase"] = [t.phase_name(t.phase_at(int(s))) for s in frame["step"]]
    return frame


def checkpoint_path(folder: Path) -> Path:
    return folder / "checkpoint.safetensors"
