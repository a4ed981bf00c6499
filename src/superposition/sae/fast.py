"""The SAEs' training step, one function for both engines, and the fused engine that compiles it.

A step draws fresh activations on the device (the counter-based stream of :mod:`superposition.fast.sampling`,
through the toy model), takes the loss of every SAE (:func:`superposition.sae.model.sae_loss`), its gradient,
Adam, the decoder-norm constraint, the dead-latent counters and (batchtopk) the inference threshold. The eager
engine differentiates with ``torch.autograd`` and runs the ops one by one; the fast engine differentiates with
``torch.func.grad`` and compiles the whole step into a few fused loops (:class:`SaeStepper`, on the same
:class:`~superposition.fast.compiled.CompiledStepper` as the toy models' fused step, so on CUDA it is replayed as a
captured graph). Both draw the same numbers, so they give the same weights up to floating-point rounding. Resampling
and logging stay outside the hot loop, every ``resample_every``/``log_every`` steps.

At the SAE presets' shapes (d_in 2, d_sae 5) a step is almost all fixed cost: a hand-derived backward was measured
only ~10% faster than the compiled ``torch.func.grad`` (0.48 against 0.52 ms at 16 x 3 ReLU SAEs, batch 1024, one
thread), so the gradient is left to the compiler and every architecture shares one loss.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from superposition.fast import (
    CompiledStepper,
    FastConfig,
    adam_update_,
    batched_mm,
    compile_available,
    fast_config,
    sample,
    schedule_multiplier,
)
from superposition.models import ToyModel
from superposition.sae.model import SaeSettings, normalize_rows_, sae_loss, update_threshold_
from superposition.spec import Experiment, SaeSpec

__all__ = [
    "SAE_PARALLEL_ELEMENTS",
    "SaeEngine",
    "SaeStatic",
    "SaeStepper",
    "StepOut",
    "choose_sae_engine",
    "draw_activations",
    "sae_data_config",
    "sae_step",
    "sae_gradients",
    "sae_update",
    "estimated_sae_eager_seconds",
]

# Cost model of one eager SAE step (deterministic: the same spec always trains on the same engine), fitted to
# benchmarks/sae.py on a 2-core CPU: 2.0 ms at 16 x 1 x 5 latents x 1024, 2.5 ms at 16 x 3 x 5 x 1024.
SAE_EAGER_STEP_S = {"cpu": 1.75e-3, "cuda": 1.5e-3}
SAE_EAGER_S_PER_ELEMENT = {"cpu": 3e-9, "cuda": 1e-12}
SAE_COMPILE_S = {"cpu": 12.0, "cuda": 40.0}
SAE_FAST_SAVES = 0.75  # fraction of the eager time the fused step saves
# Steps with at least this many latent activations (inst x SAEs x d_sae x batch) run the compiled loops on all of
# torch's threads: at 16 x 3 x 5 x 1024 (sae-recovery) an idle 2-core machine takes 0.52 ms per step on two threads
# against 0.83 on one (a busy machine loses that and more at every barrier: 2.9 ms measured under load).
SAE_PARALLEL_ELEMENTS = 1 << 17


class SaeEngine(NamedTuple):
    """Which engine trains an SAE, and why."""

    engine: str
    reason: str


def estimated_sae_eager_seconds(spec: SaeSpec, n_instances: int, n_sae: int, device_type: str) -> float:
    """A deterministic estimate of the eager engine's SAE training time."""
    dev = "cuda" if device_type == "cuda" else "cpu"
    elements = n_instances * n_sae * spec.d_sae * spec.batch_size
    return spec.steps * (SAE_EAGER_STEP_S[dev] + elements * SAE_EAGER_S_PER_ELEMENT[dev])


def choose_sae_engine(spec: SaeSpec, n_instances: int, n_sae: int, device: torch.device) -> SaeEngine:
    """Resolve ``sae.engine``: eager, fast (compiled), or fast-uncompiled (fast asked for, no compiler here)."""
    if spec.engine == "eager":
        return SaeEngine("eager", "asked for")
    can = compile_available(device)
    if spec.engine == "fast":
        return SaeEngine("fast", "asked for") if can else SaeEngine("fast-uncompiled", "no compiler here")
    if not can:
        return SaeEngine("eager", "torch.compile has no compiler here")
    eager_s = estimated_sae_eager_seconds(spec, n_instances, n_sae, device.type)
    compile_s = SAE_COMPILE_S["cuda" if device.type == "cuda" else "cpu"]
    if SAE_FAST_SAVES * eager_s > 2 * compile_s:
        return SaeEngine("fast", f"~{eager_s:.0f} s eager; compiling (~{compile_s:.0f} s) pays back")
    return SaeEngine("eager", f"~{eager_s:.0f} s eager; too short for compiling (~{compile_s:.0f} s) to pay")


# -- the step -------------------------------------------------------------------------------------------------------
def sae_data_config(run_spec: Experiment, spec: SaeSpec) -> FastConfig:
    """The counter-based sampler's settings for an SAE's batches: the run's data law, the SAE's batch size, always
    fresh samples (a run with a fixed training set still gives its SAEs fresh activations), float32."""
    return dataclasses.replace(
        fast_config(run_spec), batch_size=spec.batch_size, dataset_size=0, compute_dtype=torch.float32
    )


def draw_activations(
    cfg: FastConfig, toy: ToyModel, probability: Float[Tensor, " inst"], keys: Tensor, step: Tensor
) -> Float[Tensor, "inst hidden batch"]:
    """The toy model's hidden activations on the batch of ``step`` of the stream ``keys``, batch last."""
    x = sample(cfg, probability, step, keys)  # (inst, feats, batch)
    return toy.hidden_last(x, mm=batched_mm).float()


class StepOut(NamedTuple):
    """What a step returns, per instance and SAE: the loss before the update, its mse, and L0."""

    total: Float[Tensor, "inst sae"]
    mse: Float[Tensor, "inst sae"]
    l0: Float[Tensor, "inst sae"]


class SaeStatic(NamedTuple):
    """What fixes the program of a step: the SAE settings, the data law, the toy model, the schedule."""

    settings: SaeSettings
    data: FastConfig
    toy: ToyModel
    schedule: str
    steps: int
    warmup: int


def sae_gradients(
    static: SaeStatic, params: dict[str, Tensor], tensors: dict[str, Tensor], h: Tensor, functional: bool = True
) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """The gradient of every SAE's loss (summed) on the activations ``h``, and (total, mse, fired, l0[, kept_min]):
    per instance and SAE the loss and its mse, whether each latent fired, L0, and batchtopk's smallest kept value.
    ``functional``: ``torch.func.grad`` through the fused products (compiled step); else autograd (eager)."""
    s = static.settings

    def loss(p):
        terms = sae_loss(s, p, tensors["sparsity"], h, mm=batched_mm if functional else torch.matmul)
        active = terms.output.z.detach() > 0
        kept = terms.output.kept_min
        aux = (terms.total, terms.mse, active.any(-1), active.sum(-2).to(torch.float32).mean(-1))
        return terms.total.sum(), aux + ((kept.detach(),) if kept is not None else ())

    if functional:
        return torch.func.grad(loss, has_aux=True)(params)
    with torch.enable_grad():
        total_sum, aux = loss(params)
        grads = dict(zip(params, torch.autograd.grad(total_sum, list(params.values())), strict=True))
    return grads, tuple(a.detach() for a in aux)


def sae_update(
    static: SaeStatic,
    state: tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]],
    step: Tensor,
    tensors: dict[str, Tensor],
    grads: dict[str, Tensor],
    aux: tuple[Tensor, ...],
) -> StepOut:
    """Adam, decoder norms, dead-latent counters and the batchtopk threshold, in place; increments ``step``."""
    params, exp_avg, exp_avg_sq, counters = state
    total, mse, fired, l0 = aux[:4]
    lr = tensors["lr"].to(torch.float64) * schedule_multiplier(static.schedule, static.steps, static.warmup, step)
    adam_update_(params, grads, exp_avg, exp_avg_sq, step, lr, tensors["weight_decay"], False)
    if static.settings.normalize:
        normalize_rows_(params["W_dec"])
    since = counters["since"]
    since.copy_(torch.where(fired, torch.zeros_like(since), since + 1))
    if "threshold" in counters:  # batchtopk
        update_threshold_(counters["threshold"], aux[4])
    step.add_(1)
    return StepOut(total, mse, l0)


def sae_step(
    static: SaeStatic,
    state: tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]],
    step: Tensor,
    tensors: dict[str, Tensor],
    functional: bool = True,
) -> StepOut:
    """One whole step in place: draw, loss, gradient (``torch.func.grad`` or autograd), Adam, decoder norms,
    dead-latent counters, batchtopk threshold; increments ``step``.

    ``state`` = (params, exp_avg, exp_avg_sq, counters) with counters["since"] (steps since each latent last fired)
    and, for batchtopk, counters["threshold"]; ``tensors`` holds sparsity, lr, weight_decay, probability, keys.
    """
    h = draw_activations(static.data, static.toy, tensors["probability"], tensors["keys"], step)
    grads, aux = sae_gradients(static, state[0], tensors, h, functional)
    return sae_update(static, state, step, tensors, grads, aux)


class SaeStepper(CompiledStepper):
    """Takes :func:`sae_step` compiled (the fast engine), or plain with ``compile=False``."""

    def __init__(self, static: SaeStatic, *, compile: bool = True, threads: int = 1):
        super().__init__(compile=compile, threads=threads)
        self.static = static

    def plain(self):
        static = self.static

        def step_fn(state, step, tensors):
            return tuple(sae_step(static, state, step, tensors))

        return step_fn

    def compiled(self, build):
        # Three graphs (draw; loss and gradient; update): inside one, the compiler recomputes the drawn batch in every
        # loop that reads it, and the top-k selection in every loop of the update (measured at 16 x 3 SAEs, batch
        # 1024, one thread: ReLU 0.91 ms per step in one graph, 0.88 in two; TopK 3.8 ms in two, in three).
        static = self.static

        def draw(tensors, step):
            return draw_activations(static.data, static.toy, tensors["probability"], tensors["keys"], step)

        def gradients(params, tensors, h):
            return sae_gradients(static, params, tensors, h)

        def update(state, step, tensors, grads, aux):
            return tuple(sae_update(static, state, step, tensors, grads, aux))

        draw_c, grad_c, update_c = build(draw), build(gradients), build(update)
        self.graphs = (draw_c, grad_c, update_c)

        def compiled(state, step, tensors):
            grads, aux = grad_c(state[0], tensors, draw_c(tensors, step))
            return update_c(state, step, tensors, grads, aux)

        return compiled

    def __call__(self, state, step: int, tensors: dict[str, Tensor]) -> StepOut:
        return StepOut(*self.run(state, step, tensors))
