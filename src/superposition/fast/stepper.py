"""The whole step (draw, forward, backward, Adam) and :class:`FastStepper`, which compiles it (one graph or three,
unguarded, on one thread for small steps) and on CUDA replays it as a captured graph."""

from __future__ import annotations

import itertools
import time
import types
import warnings

import torch
from jaxtyping import Float
from torch import Tensor

from superposition.fast.adam import adam_update_, schedule_multiplier
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
    lr = tensors["lr"].to(torch.float64) * schedule_multiplier(cfg, step)
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


_CODE_TAGS = itertools.count()


def _own_code(fn):
    """``fn`` with a code object of its own: dynamo keeps its compiled graphs per code object (at most 8), and
    every stepper's closures would otherwise share one, so a sweep of many shapes would fall back to eager."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_CODE_TAGS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# torch.compile takes a guard filter from torch 2.8 on; older versions (pyproject allows 2.3) keep their guards.
GUARD_FILTER = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)


def _no_guards(entries) -> list[bool]:
    """Drop every guard of a stepper's compiled graphs: dynamo re-checks each input tensor's metadata on every call
    (~20 us of a 0.27 ms step on config A). Nothing they check can change: each stepper compiles code objects of its
    own (:func:`_own_code`), specialised to one FastConfig, and only :meth:`FastStepper.__call__` calls them, with
    the same TrainState's dicts (fixed keys, shapes, dtypes, device; checkpoint loads copy in place), under no_grad."""
    return [False] * len(entries)


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


class FastStepper:
    """Runs :func:`train_step` compiled (and on CUDA replayed as one captured graph) against a TrainState.

    The stepper reads the state's tensors at every call, so checkpoint loads and dropped instances (which the
    state applies in place) are seen. A compiled stepper belongs to one state: its graphs run unguarded
    (:func:`_no_guards`), so it must always be called with dicts of the same keys, shapes, dtypes and device.
    ``compile=False`` runs the same functions eagerly (tests, no compiler).
    """

    def __init__(self, spec: Experiment, *, compile: bool = True, cuda_graph: bool = True, threads: int | None = None):
        self.cfg = fast_config(spec)
        self.compile = compile
        self.cuda_graph = cuda_graph
        self.threads = threads if threads is not None else compiled_threads(spec)
        self.compile_seconds = 0.0
        self._fn = None
        self._graph = None
        self._graph_key: tuple[int, ...] | None = None
        self._graph_loss: Tensor | None = None
        self._step: Tensor | None = None
        self._device_step = -1
        self._calls = 0
        self.graphs: tuple = ()
        self.single_graph = single_graph(spec)
        self.fallback = ""  # why compiling failed, when it did

    def _function(self):
        if self._fn is None:
            cfg = self.cfg
            if not self.compile:

                def step_fn(params, exp_avg, exp_avg_sq, step, tensors):
                    return train_step(cfg, params, exp_avg, exp_avg_sq, step, tensors)

                self._fn = step_fn
                return step_fn

            opts = {"cpp.threads": self.threads} if self.threads else {}
            if GUARD_FILTER:
                opts["guard_filter_fn"] = _no_guards

            def build(f):  # a fresh options dict per call: torch.compile pops guard_filter_fn from it
                return torch.compile(_own_code(f), fullgraph=True, dynamic=False, options=dict(opts))

            if self.single_graph:

                def whole(params, exp_avg, exp_avg_sq, step, tensors):
                    x, fwd = _step_with_batch(cfg, params, exp_avg, exp_avg_sq, step, tensors)
                    return fwd.loss, x, fwd.grad_out, fwd.saved  # returned so that the compiler stores them once

                whole_c = build(whole)
                self.graphs = (whole_c,)
                self._fn = lambda params, exp_avg, exp_avg_sq, step, tensors: whole_c(
                    params, exp_avg, exp_avg_sq, step, tensors
                )[0]
                return self._fn

            def draw(tensors, step, dtype):
                return training_batch(cfg, tensors, step, dtype)

            def fwd_fn(params, tensors, x):
                return tuple(forward_step(cfg, params, tensors, x))

            def upd_fn(params, exp_avg, exp_avg_sq, step, tensors, x, loss, grad_out, saved):
                update_step(cfg, params, exp_avg, exp_avg_sq, step, tensors, x, Forward(loss, grad_out, saved))

            # Three graphs, so that the batch, the output gradient and the activations are stored once: inside one
            # graph the compiler inlines them into the products that read them (BLAS products included: their
            # epilogues), recomputing them; measured 1.5x slower on D even with them returned as outputs.
            draw_c, fwd_c, upd_c = (build(f) for f in (draw, fwd_fn, upd_fn))
            self.graphs = (draw_c, fwd_c, upd_c)

            def compiled(params, exp_avg, exp_avg_sq, step, tensors):
                x = draw_c(tensors, step, cfg.compute_dtype)
                loss, grad_out, saved = fwd_c(params, tensors, x)
                upd_c(params, exp_avg, exp_avg_sq, step, tensors, x, loss, grad_out, saved)
                return loss

            self._fn = compiled
        return self._fn

    def __call__(
        self,
        params: dict[str, Tensor],
        exp_avg: dict[str, Tensor],
        exp_avg_sq: dict[str, Tensor],
        step: int,
        tensors: dict[str, Tensor],
    ) -> Float[Tensor, " inst"]:
        """Take the step numbered ``step`` (0-based) in place; returns the per-instance loss."""
        device = next(iter(params.values())).device
        if self._step is None or self._step.device != device:
            self._step = torch.zeros((), dtype=torch.int64, device=device)
            self._device_step = -1  # the value the device counter holds, when known
        with torch.no_grad():
            if self._graph is not None and self._key(params, exp_avg, exp_avg_sq, tensors) == self._graph_key:
                if self._device_step != step:
                    self._step.fill_(step)
                self._graph.replay()
                self._device_step = step + 1
                return self._graph_loss
            if self._device_step != step:  # the device counter already holds ``step`` after a step in sequence
                self._step.fill_(step)
            start = time.perf_counter()
            if self._calls or not self.compile:
                loss = self._function()(params, exp_avg, exp_avg_sq, self._step, tensors)
            else:
                loss = self._first_compiled_call(params, exp_avg, exp_avg_sq, tensors)
            self._device_step = step + 1
            if not self._calls and self.compile:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.compile_seconds = time.perf_counter() - start
            self._calls += 1
            if device.type == "cuda" and self.cuda_graph and self.compile:
                self._capture(params, exp_avg, exp_avg_sq, tensors, step + 1)
            return loss

    def _first_compiled_call(self, params, exp_avg, exp_avg_sq, tensors) -> Tensor:
        """Compile and take the first step; if compiling fails (building the compiled functions included), go on
        with the same functions uncompiled.

        Nothing is written before the last graph runs, so a failure leaves the state as it was. Importing the
        compiler raises torch-internal DeprecationWarnings (and it gives tuning hints as UserWarnings), which must
        not fail a caller that treats warnings as errors.
        """
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)  # the compiler's tuning hints (e.g. TF32 on CUDA)
                return self._function()(params, exp_avg, exp_avg_sq, self._step, tensors)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the uncompiled step is the same math
            self.fallback = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            self.compile, self._fn = False, None
            return self._function()(params, exp_avg, exp_avg_sq, self._step, tensors)

    @staticmethod
    def _key(params, exp_avg, exp_avg_sq, tensors) -> tuple[int, ...]:
        return tuple(t.data_ptr() for d in (params, exp_avg, exp_avg_sq, tensors) for t in d.values())

    def _capture(self, params, exp_avg, exp_avg_sq, tensors, next_step: int) -> None:
        """Record one compiled step as a CUDA graph (its kernels do not run while recorded)."""
        try:
            fn = self._function()
            graph = torch.cuda.CUDAGraph()
            # Warm the compiled function on a side stream on copies, so the state is not advanced.
            copies = [{k: v.clone() for k, v in d.items()} for d in (params, exp_avg, exp_avg_sq)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                scratch = self._step.clone()
                fn(*copies, scratch, tensors)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                loss = fn(params, exp_avg, exp_avg_sq, self._step, tensors)
            self._graph, self._graph_loss = graph, loss
            self._graph_key = self._key(params, exp_avg, exp_avg_sq, tensors)
            self._device_step = next_step
            self._step.fill_(next_step)
        except Exception:  # noqa: BLE001 - graphs are an optimisation: keep the plain compiled step
            self.cuda_graph = False
            self._graph = None
            self._step.fill_(next_step)
            self._device_step = next_step
