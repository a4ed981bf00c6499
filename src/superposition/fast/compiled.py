"""Running a whole training step compiled: torch.compile set-up (a code object per stepper, no guards, the first
call's fallback to the same functions uncompiled) and, on CUDA, replay of the step as one captured graph.

A step is a function ``fn(state, step, tensors) -> outputs``: ``state`` a tuple of dicts of tensors it updates in
place (parameters, optimiser moments, counters), ``step`` a 0-d int64 tensor it increments, ``tensors`` dicts it
only reads, ``outputs`` a tensor or a tuple of tensors (per-instance losses and the like). The toy models' fused
step (:class:`superposition.fast.FastStepper`) and the SAEs' (:mod:`superposition.sae.fast`) both run here.
"""

from __future__ import annotations

import itertools
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["CompiledStepper", "GUARD_FILTER", "own_code"]

State = tuple[dict[str, Tensor], ...]
StepFn = Callable[[State, Tensor, dict[str, Tensor]], Any]
Build = Callable[[Callable], Callable]

_CODE_TAGS = itertools.count()


def own_code(fn):
    """``fn`` with a code object of its own: dynamo keeps its compiled graphs per code object (at most 8), and
    every stepper's closures would otherwise share one, so a sweep of many shapes would fall back to eager."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_CODE_TAGS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# torch.compile takes a guard filter from torch 2.8 on; older versions (pyproject allows 2.3) keep their guards.
GUARD_FILTER = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)


def _no_guards(entries) -> list[bool]:
    """Drop every guard of a stepper's compiled graphs: dynamo re-checks each input tensor's metadata on every call
    (~20 us of a 0.27 ms step on config A). Nothing they check can change: each stepper compiles code objects of its
    own (:func:`own_code`), specialised to one static configuration, and only :meth:`CompiledStepper.run` calls
    them, with the same dicts (fixed keys, shapes, dtypes, device; checkpoint loads copy in place), under no_grad."""
    return [False] * len(entries)


class CompiledStepper:
    """Takes steps of one step function, compiled (and on CUDA replayed as a captured graph) or plain.

    Subclasses say what a step is: :meth:`plain` returns the uncompiled step function, :meth:`compiled` builds the
    compiled one from a ``build`` that compiles a function (they may split the step into several graphs). A compiled
    stepper belongs to one set of dicts: its graphs run unguarded, so it must always be called with dicts of the same
    keys, shapes, dtypes and device. ``compile=False`` runs the plain function (tests, no compiler).
    """

    def __init__(self, *, compile: bool = True, cuda_graph: bool = True, threads: int = 0):
        self.compile = compile
        self.cuda_graph = cuda_graph
        self.threads = threads
        self.compile_seconds = 0.0
        self.graphs: tuple = ()
        self.fallback = ""  # why compiling failed, when it did
        self._fn: StepFn | None = None
        self._graph = None
        self._graph_key: tuple[int, ...] | None = None
        self._graph_out: Any = None
        self._step: Tensor | None = None
        self._device_step = -1
        self._calls = 0

    # -- what a step is (subclasses) ------------------------------------------------------------------------------
    def plain(self) -> StepFn:
        raise NotImplementedError

    def compiled(self, build: Build) -> StepFn:
        """The compiled step; by default the plain step compiled as one graph."""
        fn = build(self.plain())
        self.graphs = (fn,)
        return fn

    # -- running --------------------------------------------------------------------------------------------------
    def _function(self) -> StepFn:
        if self._fn is None:
            if not self.compile:
                self._fn = self.plain()
                return self._fn
            opts: dict[str, Any] = {"cpp.threads": self.threads} if self.threads else {}
            if GUARD_FILTER:
                opts["guard_filter_fn"] = _no_guards

            def build(f):  # a fresh options dict per call: torch.compile pops guard_filter_fn from it
                return torch.compile(own_code(f), fullgraph=True, dynamic=False, options=dict(opts))

            self._fn = self.compiled(build)
        return self._fn

    def run(self, state: State, step: int, tensors: dict[str, Tensor]) -> Any:
        """Take the step numbered ``step`` (0-based) in place; returns the step function's outputs."""
        device = next(iter(state[0].values())).device
        if self._step is None or self._step.device != device:
            self._step = torch.zeros((), dtype=torch.int64, device=device)
            self._device_step = -1  # the value the device counter holds, when known
        with torch.no_grad():
            if self._graph is not None and self._key(state, tensors) == self._graph_key:
                if self._device_step != step:
                    self._step.fill_(step)
                self._graph.replay()
                self._device_step = step + 1
                return self._graph_out
            if self._device_step != step:  # the device counter already holds ``step`` after a step in sequence
                self._step.fill_(step)
            start = time.perf_counter()
            if self._calls or not self.compile:
                out = self._function()(state, self._step, tensors)
            else:
                out = self._first_compiled_call(state, tensors)
            self._device_step = step + 1
            if not self._calls and self.compile:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.compile_seconds = time.perf_counter() - start
            self._calls += 1
            if device.type == "cuda" and self.cuda_graph and self.compile:
                self._capture(state, tensors, step + 1)
            return out

    def _first_compiled_call(self, state: State, tensors: dict[str, Tensor]) -> Any:
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
                return self._function()(state, self._step, tensors)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the uncompiled step is the same math
            self.fallback = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            self.compile, self._fn = False, None
            return self._function()(state, self._step, tensors)

    @staticmethod
    def _key(state: State, tensors: dict[str, Tensor]) -> tuple[int, ...]:
        return tuple(t.data_ptr() for d in (*state, tensors) for t in d.values())

    def _capture(self, state: State, tensors: dict[str, Tensor], next_step: int) -> None:
        """Record one compiled step as a CUDA graph (its kernels do not run while recorded)."""
        try:
            fn = self._function()
            graph = torch.cuda.CUDAGraph()
            # Warm the compiled function on a side stream on copies, so the state is not advanced.
            copies = tuple({k: v.clone() for k, v in d.items()} for d in state)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                scratch = self._step.clone()
                fn(copies, scratch, tensors)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                out = fn(state, self._step, tensors)
            self._graph, self._graph_out = graph, out
            self._graph_key = self._key(state, tensors)
            self._device_step = next_step
            self._step.fill_(next_step)
        except Exception:  # noqa: BLE001 - graphs are an optimisation: keep the plain compiled step
            self.cuda_graph = False
            self._graph = None
            self._step.fill_(next_step)
            self._device_step = next_step
