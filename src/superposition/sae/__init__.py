"""Sparse autoencoders on toy-model activations, graded against the features the toy model was built from.

One :class:`SparseAutoencoder` holds ``n_instances x n_sae`` SAEs: one group per toy-model instance (each trained on
that instance's activations) and, inside a group, one SAE per sparsity setting and resampling method. Every parameter
is shaped ``(inst, sae, ...)`` so all of them train as one tensor program and never interact.

The package by idea (each module imports only those above it in this list)::

    model.py     the instance-batched SparseAutoencoder (relu, topk, batchtopk, jumprelu, gated), the JumpReLU
                 straight-through pieces, sae_grid
    fit.py       fit_sae (the training loop) and resample_dead_
    score.py     true_directions, score_sae and summary_table
    folder.py    the SAE folder: file names, the Sae record, load_sae, check_sae_targets, SaeFormatError
    jobs.py      train_sae, train_saes, save_sae (the RUN/sae/ job is superposition.runs.run_saes)
    spec.py      load_sae_spec (a file or base spec, --set overrides, --quick)
"""

from __future__ import annotations

from superposition.sae.fit import Fitted, fit_sae, resample_dead_
from superposition.sae.folder import (
    FORMAT,
    Sae,
    SaeFormatError,
    check_sae_targets,
    load_sae,
)
from superposition.sae.jobs import save_sae, train_sae, train_saes
from superposition.sae.model import (
    SaeLoss,
    SaeOutput,
    SparseAutoencoder,
    jumprelu,
    rectangle,
    sae_grid,
    step_function,
)
from superposition.sae.score import (
    EVAL_ELEMENTS,
    SUMMARY_COLUMNS,
    Scores,
    TrueDirections,
    score_sae,
    summary_table,
    true_directions,
)
from superposition.sae.spec import load_sae_spec

__all__ = [
    "SparseAutoencoder",
    "SaeOutput",
    "SaeLoss",
    "Sae",
    "TrueDirections",
    "Scores",
    "jumprelu",
    "step_function",
    "rectangle",
    "sae_grid",
    "true_directions",
    "resample_dead_",
    "fit_sae",
    "score_sae",
    "train_sae",
    "train_saes",
    "save_sae",
    "load_sae",
    "check_sae_targets",
    "load_sae_spec",
    "SaeFormatError",
    "summary_table",
    "SUMMARY_COLUMNS",
    "Fitted",
    "EVAL_ELEMENTS",
    "FORMAT",
]
