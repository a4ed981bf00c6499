"""The fast training engine: one fused step (sample, forward, hand-derived backward, Adam) compiled as a whole.

Everything a step needs is a pure tensor function of the model's parameters, the Adam moments and the step
number, so ``torch.compile`` turns the whole step into a few fused loops (and, on CUDA, one captured graph):

- **Counter-based random numbers.** Uniforms are a keyed integer hash of (seed, step, element index), computed
  inside the fused loops instead of materialised by ``torch.rand`` (which costs several ns per element on a CPU).
  The stream depends only on the seed and the step number, so a resumed run draws exactly the batches an
  uninterrupted one would, without any generator state. One uniform gives both the mask and the value of a
  feature: given u < p, u / p is uniform on [0, 1). The stream differs from the eager engine's ``torch.Generator``
  stream; its statistics are the same (tests/test_fast.py).
  The seed enters the compiled step as data (:func:`stream_keys`), so runs that differ only in their seed share
  one compiled program.
- **Feature-major layout.** Batches are drawn as (inst, feats, batch), so every fused loop runs long and
  vectorised along the batch and every product is a batched matmul over contiguous instances (no permute
  copies); products with a tiny contraction or output are written as broadcast-multiply-sums that the compiler
  fuses with their neighbours.
- **Hand-derived backward.** The model family is small; writing its gradients out avoids autograd's graph and
  lets the compiler fuse the backward with the forward and the optimiser.
- **Fused Adam/AdamW** with per-instance learning rate and weight decay, the schedule and bias corrections
  computed on the device from the step counter (the same formula as ``torch.optim.Adam``).

The functions here run uncompiled too (the tests check them that way); :class:`FastStepper` compiles them.

The package by role (each module imports only those above it)::

    config.py     FastConfig (the static settings of the fused step, read from a spec), SMALL_PRODUCT
    engine.py     compile_available, the eager cost model, choose_engine (EngineChoice)
    sampling.py   counter-based uniforms, stream_keys, the fused draws (pairs, magnitudes, the tree),
                  training_batch, target
    kernels.py    the fused forward, the loss and its output gradient, the hand-derived backward (Forward, Grads)
    adam.py       schedule_multiplier, adam_update_
    compiled.py   CompiledStepper: compile set-up (own code objects, no guards, fallback) and CUDA-graph replay of
                  any whole step (the toy models' here, the SAEs' in superposition.sae.fast)
    stepper.py    the whole step (train_step), one graph or three, threads, and FastStepper
"""

from __future__ import annotations

from superposition.fast.adam import ADAM_BETAS, ADAM_EPS, adam_update_, schedule_multiplier
from superposition.fast.compiled import GUARD_FILTER, CompiledStepper
from superposition.fast.config import SMALL_PRODUCT, FastConfig, fast_config
from superposition.fast.engine import (
    COMPILE_SECONDS,
    EAGER_FLOP_PER_S,
    EAGER_S_PER_ELEMENT,
    EAGER_STEP_OVERHEAD_S,
    FAST_SAVES,
    EngineChoice,
    choose_engine,
    compile_available,
    estimated_eager_seconds,
)
from superposition.fast.kernels import WIDE_HIDDEN, Forward, Grads, backward, batched_mm, forward, loss_and_grads
from superposition.fast.sampling import M32, N_STREAMS, sample, stream_keys, target, training_batch, uniform
from superposition.fast.stepper import (
    PARALLEL_ELEMENTS,
    FastStepper,
    compiled_threads,
    forward_step,
    single_graph,
    train_step,
    update_step,
)

__all__ = [
    "FastConfig",
    "FastStepper",
    "CompiledStepper",
    "Grads",
    "fast_config",
    "choose_engine",
    "EngineChoice",
    "estimated_eager_seconds",
    "compile_available",
    "uniform",
    "sample",
    "loss_and_grads",
    "adam_update_",
    "schedule_multiplier",
    "train_step",
    # also re-exported (the package's other public names, as the single module had them)
    "ADAM_BETAS",
    "ADAM_EPS",
    "COMPILE_SECONDS",
    "EAGER_FLOP_PER_S",
    "EAGER_STEP_OVERHEAD_S",
    "EAGER_S_PER_ELEMENT",
    "FAST_SAVES",
    "Forward",
    "GUARD_FILTER",
    "M32",
    "N_STREAMS",
    "PARALLEL_ELEMENTS",
    "SMALL_PRODUCT",
    "WIDE_HIDDEN",
    "backward",
    "batched_mm",
    "compiled_threads",
    "forward",
    "forward_step",
    "single_graph",
    "stream_keys",
    "target",
    "training_batch",
    "update_step",
]
