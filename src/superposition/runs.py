"""The run: train an experiment, save it as a folder, load it back.

A run folder holds ``config.json`` (resolved spec + versions), ``model.safetensors``, ``history.parquet``,
``instances.parquet`` and ``report.html``. It is built in a hidden sibling ``.<name>.partial`` (which also holds
the resumable checkpoints) and renamed into place at the end, so a crash never leaves a half-written run visible.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from superposition import __version__
from superposition.metrics import instance_metrics
from superposition.models import ToyModel, build_model
from superposition.spec import Experiment, SpecError, format_validation_error
from superposition.train import TrainState, evaluate, history_frame, train_model

__all__ = ["Run", "train", "run", "save_run", "load_run", "RunFormatError", "partial_dir"]

CONFIG, WEIGHTS, HISTORY, INSTANCES, REPORT = (
    "config.json",
    "model.safetensors",
    "history.parquet",
    "instances.parquet",
    "report.html",
)
CHECKPOINT = "checkpoint.safetensors"


class RunFormatError(SpecError):
    """A run folder that is missing, damaged or not a run folder."""


@dataclass
class Run:
    """A trained run: spec, model, per-step history and the per-instance table."""

    spec: Experiment
    model: ToyModel
    history: pd.DataFrame
    instances: pd.DataFrame
    meta: dict[str, Any]
    path: Path | None = None


def _axis_column(values: list[Any]) -> list[Any]:
    # Lists (explicit importance vectors) become JSON text so the column stays a plain parquet type.
    return [json.dumps(v) if isinstance(v, list) else v for v in values]


def instance_table(state: TrainState, final_loss: np.ndarray) -> pd.DataFrame:
    """One row per instance: its grid settings, seed, final and last training loss, metrics."""
    from superposition.models import instance_seeds

    spec = state.spec
    cols: dict[str, Any] = {"instance": np.arange(spec.n_instances, dtype=np.int64)}
    for key in spec.instances.axes:
        cols[key] = _axis_column(spec.instance_values(key))
    cols["init_seed"] = np.array(instance_seeds(spec), dtype=np.int64)
    cols["loss"] = final_loss.astype(np.float64)
    cols["train_loss"] = state.history[-1][1].astype(np.float64) if state.history else np.full(spec.n_instances, np.nan)
    cols["diverged"] = ~state.alive.cpu().numpy()
    for name, values in instance_metrics(state.model, spec).items():
        cols[name] = values
    return pd.DataFrame(cols)


def _meta(state: TrainState, seconds: float) -> dict[str, Any]:
    return {
        "superposition_version": __version__,
        "torch_version": torch.__version__,
        "device": str(state.alive.device),
        "engine": state.engine,
        "n_instances": state.spec.n_instances,
        "train_seconds": round(seconds, 3),
    }


def _finish(state: TrainState, seconds: float) -> Run:
    final = evaluate(state).cpu().numpy()
    return Run(
        spec=state.spec,
        model=state.model,
        history=history_frame(state),
        instances=instance_table(state, final),
        meta=_meta(state, seconds),
    )


def train(spec: Experiment, *, progress: bool = False) -> Run:
    """Train an experiment in memory and return the Run (nothing is written)."""
    state = TrainState.create(spec)
    return _finish(state, train_model(state, progress=progress).seconds)


# -- saving ---------------------------------------------------------------------------------------------------------
def partial_dir(out: Path) -> Path:
    """The hidden sibling in which a run is built (and checkpointed) before it is renamed into place."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _config_json(spec: Experiment, meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "spec": spec.model_dump(mode="json")}, indent=2)


def _write_run_files(folder: Path, run: Run) -> None:
    from superposition.report import render_run

    _atomic_write_bytes(folder / CONFIG, _config_json(run.spec, run.meta).encode())
    tensors = {k: v.detach().contiguous().cpu() for k, v in run.model.state_dict().items()}
    _atomic_save_tensors(folder / WEIGHTS, tensors, {"format": "superposition-run"})
    for name, frame in ((HISTORY, run.history), (INSTANCES, run.instances)):
        tmp = folder / (name + ".tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, folder / name)
    page = render_run(run)
    _atomic_write_bytes(folder / REPORT, page.encode("utf-8"))


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished partial folder into place (replacing ``out`` only when asked)."""
    for leftover in partial.glob(CHECKPOINT + "*"):
        leftover.unlink()
    if out.exists():
        if not overwrite:
            raise SpecError(f"{out}: already exists (pass --overwrite to replace it)")
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)


def save_run(run: Run, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a run folder atomically (built in a hidden sibling, then renamed)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SpecError(f"{out}: already exists (pass --overwrite to replace it)")
    partial = partial_dir(out)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _write_run_files(partial, run)
    _publish(partial, out, overwrite)
    run.path = out
    return out


def _save_checkpoint(folder: Path, state: TrainState) -> None:
    _atomic_save_tensors(folder / CHECKPOINT, state.tensors(), {"step": str(state.step)})


def run(
    spec: Experiment,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> Run:
    """Train and save a run folder at ``out``; with ``resume`` continue from the last checkpoint if one exists."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SpecError(f"{out}: already exists (pass --overwrite to replace it)")
    partial = partial_dir(out)
    state = TrainState.create(spec)
    spec_text = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    ckpt = partial / CHECKPOINT
    if resume and ckpt.is_file() and (partial / "spec.json").is_file():
        if (partial / "spec.json").read_text() != spec_text:
            raise SpecError(f"{out}: the interrupted run was started with a different spec; cannot resume")
        with safe_open(str(ckpt), "pt") as f:
            step = int((f.metadata() or {})["step"])
        state.load_tensors_(load_file(str(ckpt)), step)
    else:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        _atomic_write_bytes(partial / "spec.json", spec_text.encode())
    trained = train_model(state, progress=progress, checkpoint=lambda s: _save_checkpoint(partial, s))
    result = _finish(state, trained.seconds)
    _write_run_files(partial, result)
    (partial / "spec.json").unlink()
    _publish(partial, out, overwrite)
    result.path = out
    return result


# -- loading --------------------------------------------------------------------------------------------------------
def load_run(path: str | Path) -> Run:
    """Rebuild a run from its folder: validate config.json, build the model, check and load the tensors."""
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_dir():
        raise RunFormatError(f"{path}: no such run folder")
    for name in (CONFIG, WEIGHTS, HISTORY, INSTANCES):
        f = path / name
        if not f.is_file():
            raise RunFormatError(f"{path}: not a run folder ({name} is missing)")
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFormatError(f"{path / CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
        raise RunFormatError(f"{path / CONFIG}: no 'spec' table")
    try:
        spec = Experiment.model_validate(config["spec"])
    except ValidationError as exc:
        raise RunFormatError(f"{path / CONFIG}: invalid spec: {format_validation_error(exc)}") from None
    meta = {k: v for k, v in config.items() if k != "spec"}
    model = build_model(spec, "cpu")
    expected = {k: v for k, v in model.state_dict().items()}
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise RunFormatError(f"{path / WEIGHTS}: not a valid safetensors file ({exc.__class__.__name__})") from None
    if set(tensors) != set(expected):
        raise RunFormatError(f"{path / WEIGHTS}: tensors {sorted(tensors)} do not match the config {sorted(expected)}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise RunFormatError(
                f"{path / WEIGHTS}: {k} has shape {tuple(v.shape)} {v.dtype}, "
                f"config needs {tuple(expected[k].shape)} {expected[k].dtype}"
            )
    model.load_state_dict(tensors, strict=True)
    try:
        history = pd.read_parquet(path / HISTORY)
        instances = pd.read_parquet(path / INSTANCES)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise RunFormatError(f"{path}: a table is damaged ({exc.__class__.__name__})") from None
    return Run(spec=spec, model=model, history=history, instances=instances, meta=meta, path=path)
