"""The whole step (draw, forward, backward, Adam) and :class:`FastStepper`, which compiles it (one graph or three,
on one thread for small steps) through :class:`superposition.fast.compiled.CompiledStepper`."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from superposition.fast.adam import adam_update_, schedule_multiplier
from superposition.fast.compiled import CompiledStepper
from superposition.fast.config import SMALL_PRODUCT, FastConfig, fast_config
from superposition.fast.kernels import Forward, backward, forward
from superposition.fast.sampling import target, training_batch
from superposition.spec import Experiment

# Steps with fewer batch elements (inst * feats * batch) than this run the compiled CPU loops on one thread.
PARALLEL_ELEMENTS = 1 << 22


# -- the whole step -----------------------------------------------------------------------------------------------
def _compute(cfg: FastConfig, params: dict[str, Tensor], tensors: dict[str, Tensor]) -> tuple[dict, Tensor | None]:
    """The parameters (and the embedding) in the compute dtype: float32 master weights, cast by each compiled graph
    that reads them (the forward and the update graph)."""
    w_e = tensors.get("W_E")
    if cfg.compute_dtype == torch.float32:
        return params, w_e
    cast = {k: v.to(cfg.compute_dtype) for k, v in params.items()}
    return cast, (w_e.to(cfg.compute_dtype) if w_e is not None else None)


def forward_step(cfg: FastConfig, params: dict[str, Tensor], tensors: dict[str, Tensor], x: Tensor) -> Forward:
    """The forward half of a step on a drawn batch: loss, output gradient, saved activations."""
    y = target(cfg, x, tensors["residual_factor"])
    p, w_e = _compute(cfg, params, tensors)
    return forward(cfg, p, x, y, tensors["importance"], tensors["alive"], tensors["relu_out"], w_e)


def update_step(
    cfg: FastConfig,
    params: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: Tensor,
    tensors: dict[str, Tensor],
    x: Tensor,
    fwd: Forward,
) -> None:
    """The second half: gradients from the forward result, then Adam in place (float32), then ``step += 1``."""
    p, w_e = _compute(cfg, params, tensors)
    grads = backward(cfg, p, x, fwd, w_e)
    lr = tensors["lr"].to(torch.float64) * schedule_multiplier(cfg.schedule, cfg.steps, cfg.warmup_steps, step)
    adam_update_(params, grads, exp_avg, exp_avg_sq, step, lr, tensors["weight_decay"], cfg.decoupled)
    step.add_(1)


def train_step(
    cfg: FastConfig,
    params: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: Tensor,
    tensors: dict[str, Tensor],
) -> Float[Tensor, " inst"]:
    """One whole step in place: sample, forward, backward, Adam; increments ``step``; returns the per-instance loss.

    ``tensors`` holds probability, importance, lr, weight_decay, residual_factor, alive, relu_out, keys (the seed's
    :func:`stream_keys`), and W_E and dataset where the experiment has them.
    """
    return _step_with_batch(cfg, params, exp_avg, exp_avg_sq, step, tensors)[1].loss


def _step_with_batch(
    cfg: FastConfig,
    params: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: Tensor,
    tensors: dict[str, Tensor],
) -> tuple[Tensor, Forward]:
    """:func:`train_step`, returning the batch and the forward result as well."""
    x = training_batch(cfg, tensors, step, cfg.compute_dtype)
    fwd = forward_step(cfg, params, tensors, x)
    update_step(cfg, params, exp_avg, exp_avg_sq, step, tensors, x, fwd)
    return x, fwd


def single_graph(spec: Experiment) -> bool:
    """Whether the compiled step is one graph rather than three (draw, forward, update): for models whose every
    product is a fused loop (no BLAS call, see :func:`_mm`), the step is mostly the fixed cost of calling its graphs,
    and one graph that returns the batch, the output gradient and the activations (so the compiler stores each once)
    is faster: A (7x10x5) 0.196 against 0.244 ms per step, C1 (400x2x1) 1.15 against 1.3 ms, the same numbers bit
    for bit. Larger models keep three graphs (see FastStepper._function)."""
    m = spec.model
    return m.kind != "residual-mlp" and m.n_features * m.d_hidden <= SMALL_PRODUCT


def compiled_threads(spec: Experiment) -> int:
    """Threads for the compiled CPU loops: one for small steps (a parallel region's barriers cost more than they
    save there, and far more on a busy machine), all of torch's threads for large ones."""
    elements = spec.n_instances * spec.model.n_features * spec.train.batch_size
    return 1 if elements < PARALLEL_ELEMENTS else 0


class FastStepper(CompiledStepper):
    """Runs :func:`train_step` compiled (and on CUDA replayed as one captured graph) against a TrainState.

    The stepper reads the state's tensors at every call, so checkpoint loads and dropped instances (which the
    state applies in place) are seen. A compiled stepper belongs to one state (see :class:`CompiledStepper`).
    ``compile=False`` runs the same functions eagerly (tests, no compiler).
    """

    def __init__(self, spec: Experiment, *, compile: bool = True, cuda_graph: bool = True, threads: int | None = None):
        super().__init__(
            compile=compile, cuda_graph=cuda_graph, threads=threads if threads is not None else compiled_threads(spec)
        )
        self.cfg = fast_config(spec)
        self.single_graph = single_graph(spec)

    def plain(self):
        cfg = self.cfg

        def step_fn(state, step, tensors):
            return train_step(cfg, *state, step, tensors)

        return step_fn

    def compiled(self, build):
        cfg = self.cfg
        if self.single_graph:

            def whole(state, step, tensors):
                x, fwd = _step_with_batch(cfg, *state, step, tensors)
                return fwd.loss, x, fwd.grad_out, fwd.saved  # returned so that the compiler stores them once

            whole_c = build(whole)
            self.graphs = (whole_c,)
            return lambda state, step, tensors: whole_c(state, step, tensors)[0]

        def draw(tensors, step, dtype):
            return training_batch(cfg, tensors, step, dtype)

        def fwd_fn(params, tensors, x):
            return tuple(forward_step(cfg, params, tensors, x))

        def upd_fn(state, step, tensors, x, loss, grad_out, saved):
            update_step(cfg, *state, step, tensors, x, Forward(loss, grad_out, saved))

        # Three graphs, so that the batch, the output gradient and the activations are stored once: inside one
        # graph the compiler inlines them into the products that read them (BLAS products included: their
        # epilogues), recomputing them; measured 1.5x slower on D even with them returned as outputs.
        draw_c, fwd_c, upd_c = (build(f) for f in (draw, fwd_fn, upd_fn))
        self.graphs = (draw_c, fwd_c, upd_c)

        def compiled(state, step, tensors):
            x = draw_c(tensors, step, cfg.compute_dtype)
            loss, grad_out, saved = fwd_c(state[0], tensors, x)
            upd_c(state, step, tensors, x, loss, grad_out, saved)
            return loss

        return compiled

    def __call__(
        self,
        params: dict[str, Tensor],
        exp_avg: dict[str, Tensor],
        exp_avg_sq: dict[str, Tensor],
        step: int,
        tensors: dict[str, Tensor],
    ) -> Float[Tensor, " inst"]:
        """Take the step numbered ``step`` (0-based) in place; returns the per-instance loss."""
        return self.run((params, exp_avg, exp_avg_sq), step, tensors)
