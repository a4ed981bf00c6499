"""SAEs on a run: train them in memory (every architecture of a spec) and write an SAE folder. The job that trains a
run's SAEs into RUN/sae/ and refreshes its report is :func:`superposition.runs.run_saes`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from superposition.folder import SAE as SAE_KIND
from superposition.folder import (
    SAE_WORK,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_table,
    check_target,
    fresh_workdir,
    normal,
    publish,
    work_dir,
)
from superposition.progress import Progress
from superposition.sae.fit import fit_sae
from superposition.sae.folder import (
    CONFIG,
    FEATURES,
    FORMAT,
    HISTORY,
    LATENTS,
    REPORT,
    RESAMPLES,
    SCORES,
    WEIGHTS,
    Sae,
)
from superposition.sae.model import SparseAutoencoder
from superposition.sae.score import score_sae
from superposition.spec import SaeSpec
from superposition.train import resolve_device

if TYPE_CHECKING:
    from superposition.record import Run

__all__ = ["train_sae", "train_saes", "save_sae"]


def train_sae(
    run: Run,
    spec: SaeSpec,
    architecture: str | None = None,
    *,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> Sae:
    """Train (in memory) the SAEs of one architecture on a run's activations and score them."""
    from superposition.version import __version__

    arch = architecture or spec.architectures[0]
    one = spec.for_architecture(arch)
    dev = resolve_device(device if isinstance(device, str) else (run.spec.device if device is None else str(device)))
    toy = run.model
    if next(toy.parameters()).device != dev:
        toy = copy.deepcopy(toy).to(dev)
    d_in = int(toy.hidden(torch.zeros((1, run.spec.n_instances, run.spec.model.n_features), device=dev)).shape[-1])
    sae = SparseAutoencoder(one, arch, run.spec.n_instances, d_in).to(dev)
    fitted = fit_sae(sae, toy, run.spec, one, progress=progress)
    scores = score_sae(sae, toy, run.spec, one)
    meta = {
        "format": FORMAT,
        "superposition_version": __version__,
        "torch_version": torch.__version__,
        "device": str(dev),
        "run_name": run.spec.name,
        "architecture": arch,
        "n_instances": run.spec.n_instances,
        "n_sae": sae.n_sae,
        "d_in": d_in,
        "train_seconds": round(fitted.seconds, 3),
        "engine": fitted.engine,
    }
    return Sae(one, sae, scores.table, scores.features, scores.latents, fitted.history, fitted.resamples, meta)


def train_saes(
    run: Run, spec: SaeSpec, *, device: str | torch.device | None = None, progress: Progress = None
) -> list[Sae]:
    """One :class:`Sae` per architecture of the spec."""
    return [train_sae(run, spec, a, device=device, progress=progress) for a in spec.architectures]


def save_sae(sae: Sae, out: str | Path, *, overwrite: bool = False, report_html: str | None = None) -> Path:
    """Write an SAE folder atomically: built in a hidden sibling (config.json last), then renamed into place.

    ``report_html`` (the page :func:`superposition.runs.sae_page` makes) is written as report.html; None leaves it
    out. Only an SAE folder of this tool is replaced (with ``overwrite``); anything else at ``out`` is refused."""
    out = normal(out)
    check_target(out, SAE_KIND, SAE_WORK, overwrite=overwrite)
    partial = work_dir(out)
    marker = {"format": FORMAT, "sae": sae.spec.model_dump(mode="json")}
    fresh_workdir(partial, "spec.json", json.dumps(marker).encode(), (SAE_WORK,))
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.model.state_dict().items()}
    atomic_save_tensors(partial / WEIGHTS, tensors, {"format": FORMAT})
    for name, frame in (
        (SCORES, sae.scores),
        (FEATURES, sae.features),
        (LATENTS, sae.latents),
        (HISTORY, sae.history),
        (RESAMPLES, sae.resamples),
    ):
        atomic_write_table(partial / name, frame)
    if report_html is not None:
        atomic_write_bytes(partial / REPORT, report_html.encode("utf-8"))
    config = {**sae.meta, "sae": sae.spec.model_dump(mode="json")}
    atomic_write_bytes(partial / CONFIG, json.dumps(config, indent=2).encode())
    publish(partial, out, SAE_KIND, overwrite=overwrite)
    sae.path = out
    return out
