"""The run record: a trained run in memory (:class:`Run`) and its folder, written and read in one place.

A run folder holds ``config.json`` (resolved spec + versions), ``model.safetensors``, ``history.parquet``,
``instances.parquet`` and ``report.html``. It is built in a hidden sibling ``.<name>.partial`` (which also holds
the resumable checkpoints and ``spec.json``) and renamed into place at the end, so a crash never leaves a
half-written run visible. This module knows every file name of both; the jobs that train and publish runs are in
:mod:`superposition.runs`.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from superposition.best import best_of_seeds, setting_columns
from superposition.display import Displayable
from superposition.folder import (
    MAX_CONFIG_BYTES,
    MAX_TABLE_BYTES,
    RUN_FILE_NAMES,
    SAE_FORMAT,
    RunFormatError,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_table,
    check_tensors,
    checked_file,
    load_tensors,
    read_json,
    read_safetensors_header,
    user_path,
    work_dir,
)
from superposition.metrics import instance_metrics
from superposition.models import ToyModel, build_model
from superposition.spec import Experiment, SpecError, format_validation_error, memory_estimate
from superposition.train import TrainState, evaluate, history_frame
from superposition.version import __version__

__all__ = [
    "Run",
    "RunMeta",
    "RunFormatError",
    "finish",
    "instance_table",
    "write_run_files",
    "save_checkpoint",
    "read_checkpoint",
    "checkpoint_step",
    "interrupted_step",
    "partial_dir",
    "partial_spec",
    "partial_complete",
    "spec_text",
    "load_run",
    "read_safetensors_header",
]

CONFIG, WEIGHTS, HISTORY, INSTANCES, REPORT = RUN_FILE_NAMES
CHECKPOINT = "checkpoint.safetensors"
SPEC_MARKER = "spec.json"  # in .NAME.partial: the spec being trained (what resume continues)


@dataclass
class Run(Displayable):
    """A trained run: spec, model, per-step history and the per-instance table.

    In a notebook it shows an HTML summary; ``figure(name)`` / ``figures()`` give the report's figures (drawn by
    :mod:`superposition.views`, bound when it is imported: see :mod:`superposition.display`)."""

    spec: Experiment
    model: ToyModel
    history: pd.DataFrame
    instances: pd.DataFrame
    meta: dict[str, Any]
    path: Path | None = None
    verdict: str | None = None
    """The line grading the run against its preset's claim (set by :func:`superposition.runs.run`; not saved)."""

    def best_of_seeds(self, readout: str | None = "n_represented") -> pd.DataFrame:
        """Per setting (every instance axis but the seed) the lowest-loss seed's row of ``instances``, with the
        per-seed counts beside it (:func:`superposition.best.best_of_seeds`; ``readout``: the column whose agreement
        with the best seed ``n_like_best`` counts, when the table has it)."""
        return best_of_seeds(
            self.instances, setting_columns(self.spec), readout if readout in self.instances.columns else None
        )

    def __repr__(self) -> str:
        m = self.spec.model
        where = f" at {self.path}" if self.path is not None else " (in memory)"
        return (
            f"Run({self.spec.name!r}: {m.kind} {m.n_features} features in {m.d_hidden} dims, "
            f"{self.spec.n_instances} instance(s), {self.spec.train.steps} steps{where})"
        )


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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()[:200]
    except OSError:
        pass
    return platform.machine()


def _meta(state: TrainState, seconds: float) -> dict[str, Any]:
    # Enough to explain why two runs of one spec differ: versions, device, engine, machine.
    device = state.alive.device
    return {
        "superposition_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "engine": state.engine,
        "n_instances": state.spec.n_instances,
        "train_seconds": round(seconds, 3),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "python_version": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        **({"dataset_device": "cpu"} if state.dataset is not None else {}),
    }


def start_state(spec: Experiment) -> TrainState:
    """A fresh training state; with ``train.init_from``, its weights are the named run's trained weights."""
    state = TrainState.create(spec)
    if spec.train.init_from:
        state.model.load_state_dict(init_weights(spec), strict=True)
    return state


def init_weights(spec: Experiment) -> dict[str, torch.Tensor]:
    """The trained weights of ``spec.train.init_from``, checked against the shapes of the spec's model (one-line
    SpecError naming the first difference)."""
    source = spec.train.init_from
    try:
        init = load_run(source)
    except OSError as exc:
        raise SpecError(f"train.init_from: cannot read {source}: {exc.strerror or exc}") from None
    except SpecError as exc:
        raise SpecError(f"train.init_from: {exc}") from None
    want = build_model(spec, "cpu").state_dict()
    have = {k: v.detach().cpu() for k, v in init.model.state_dict().items()}
    m = init.spec.model
    for key, value in want.items():
        if key not in have:
            raise SpecError(f"train.init_from: {source} ({m.kind}) has no {key}; this spec's model needs one")
        if tuple(have[key].shape) != tuple(value.shape):
            raise SpecError(
                f"train.init_from: {source} has {key} of shape {tuple(have[key].shape)}; "
                f"this spec's model needs {tuple(value.shape)}"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise SpecError(f"train.init_from: {source} has {extra[0]}, which this spec's model does not have")
    return have


def finish(state: TrainState, seconds: float) -> Run:
    final = evaluate(state).cpu().numpy()
    return Run(
        spec=state.spec,
        model=state.model,
        history=history_frame(state),
        instances=instance_table(state, final),
        meta=_meta(state, seconds),
    )


# -- saving ---------------------------------------------------------------------------------------------------------
partial_dir = work_dir
"""The hidden sibling ``.NAME.partial`` in which a run is built (and checkpointed) before it is renamed into place."""


def _config_json(spec: Experiment, meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "spec": spec.model_dump(mode="json")}, indent=2)


def write_run_files(folder: Path, run: Run, report_html: str | None = None) -> None:
    """Write every run file atomically; config.json comes last and marks the folder complete.

    ``report_html`` (the page :func:`superposition.report.render_run` makes) is written as report.html; None leaves
    it out (sweep points do: 5 MB each, most of it plotly.js; ``superposition report`` writes it on demand).
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in run.model.state_dict().items()}
    atomic_save_tensors(folder / WEIGHTS, tensors, {"format": "superposition-run"})
    for name, frame in ((HISTORY, run.history), (INSTANCES, run.instances)):
        atomic_write_table(folder / name, frame)
    if report_html is not None:
        atomic_write_bytes(folder / REPORT, report_html.encode("utf-8"))
    atomic_write_bytes(folder / CONFIG, _config_json(run.spec, run.meta).encode())


def save_checkpoint(folder: Path, state: TrainState) -> None:
    atomic_save_tensors(folder / CHECKPOINT, state.tensors(), {"step": str(state.step)})


def spec_text(spec: Experiment) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def checkpoint_step(partial: Path) -> int | None:
    """The step of the checkpoint in a partial folder (None when there is none)."""
    ckpt = partial / CHECKPOINT
    if not ckpt.is_file():
        return None
    header = read_safetensors_header(ckpt)
    try:
        return int(header.metadata["step"])
    except (KeyError, ValueError):
        raise RunFormatError(f"{user_path(ckpt)}: the checkpoint of the interrupted run has no step") from None


def interrupted_step(out: str | Path) -> int | None:
    """The step of the checkpoint an interrupted run of ``out`` left (None: nothing to resume from)."""
    try:
        return checkpoint_step(work_dir(Path(out)))
    except (OSError, SpecError):
        return None


def partial_complete(out: str | Path) -> bool:
    """Whether the interrupted run of ``out`` is complete in its working folder (killed while publishing: config.json,
    written last, is there with the weights and tables), so that resuming only has to put it in place."""
    partial = work_dir(out)
    return all((partial / name).is_file() for name in (CONFIG, WEIGHTS, HISTORY, INSTANCES))


def partial_spec(out: str | Path) -> Experiment:
    """The spec an interrupted run in ``.NAME.partial`` was started with (what ``superposition resume`` continues)."""
    out = Path(out)
    partial = work_dir(out)
    if not partial.is_dir():
        if (out / CONFIG).is_file():
            raise SpecError(f"{out}: the run is complete; nothing to resume")
        if (out / "sweep.json").is_file():
            raise SpecError(f"{out}: a sweep folder; continue it with: superposition sweep SPEC --out {out}")
        raise SpecError(f"{out}: no interrupted run here (nothing was kept to resume from)")
    for name in (CONFIG, SPEC_MARKER):  # a complete partial (killed while publishing) holds its spec in config.json
        f = partial / name
        if f.is_file():
            raw = read_json(partial, name, MAX_CONFIG_BYTES)
            raw = raw.get("spec") if name == CONFIG and isinstance(raw, dict) else raw
            if not isinstance(raw, dict):
                raise RunFormatError(f"{out}: the interrupted run's {name} has no spec table")
            try:
                return Experiment.model_validate(raw)
            except ValidationError as exc:
                raise RunFormatError(
                    f"{out}: the interrupted run's {name} holds an invalid spec: {format_validation_error(exc)}"
                ) from None
    raise SpecError(f"{out}: the interrupted run has no spec.json (it was killed before it started); run it again")


# -- loading --------------------------------------------------------------------------------------------------------
def read_checkpoint(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, checked against the state it must restore (names, shapes, dtypes)."""
    header = read_safetensors_header(path)
    # History grows with the step: only the instance dimension of its loss table is fixed.
    fixed = {k: v for k, v in expected.items() if not k.startswith("history.")}
    check_tensors(path, header._replace(tensors={k: header.tensors[k] for k in header.tensors if k in fixed}), fixed)
    return load_tensors(path)


class RunMeta(BaseModel):
    """The top level of config.json besides the spec: versions and where and how the run was trained."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    superposition_version: str = Field(max_length=100)
    torch_version: str = Field(max_length=100)
    device: str = Field(max_length=100)
    engine: str = Field(max_length=100)
    n_instances: int = Field(ge=1)
    train_seconds: float = Field(ge=0, allow_inf_nan=False)
    device_name: str = Field("", max_length=200)
    python_version: str = Field("", max_length=100)
    platform: str = Field("", max_length=200)
    dataset_device: Literal["cpu"] | None = None
    """Where a fixed training set was drawn (absent: on ``device``, as runs before datasets moved to the CPU)."""


def load_run(path: str | Path) -> Run:
    """Rebuild a run from its folder, trusting nothing in it.

    Reads JSON, safetensors and parquet only; validates config.json against the schema; refuses links leading out of
    the folder, non-regular files and absurd sizes; checks every tensor's name, shape and dtype against the config
    (from the safetensors header, before any tensor data is read or the model built); one RunFormatError otherwise.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunFormatError(f"{path}: no such run folder")
    if not (path / CONFIG).exists() and (path / "sweep.json").is_file():
        raise RunFormatError(
            f"{path}: a sweep folder, not a run folder (open it with superposition.load_sweep; "
            f"its report: superposition report {path}; its runs: {path / 'runs'}/g...)"
        )
    config = read_json(path, CONFIG, MAX_CONFIG_BYTES)
    if isinstance(config, dict) and config.get("format") == SAE_FORMAT:
        raise RunFormatError(f"{path}: an SAE folder, not a run folder (open it with superposition.load_sae)")
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
        raise RunFormatError(f"{path / CONFIG}: no 'spec' table")
    try:
        spec = Experiment.model_validate(config["spec"])
    except ValidationError as exc:
        raise RunFormatError(f"{path / CONFIG}: invalid spec: {format_validation_error(exc)}") from None
    try:
        meta = RunMeta.model_validate({k: v for k, v in config.items() if k != "spec"})
    except ValidationError as exc:
        raise RunFormatError(f"{path / CONFIG}: {format_validation_error(exc)}") from None
    if meta.n_instances != spec.n_instances:
        raise RunFormatError(f"{path / CONFIG}: n_instances is {meta.n_instances}, the spec has {spec.n_instances}")
    weights = checked_file(path, WEIGHTS)
    header = read_safetensors_header(weights)
    # The config's shapes must fit in the weights file before the model is built (its size bounds the allocation).
    data_bytes = weights.stat().st_size
    needed = memory_estimate(spec).parameters // 2
    if needed > 2 * data_bytes + 2**20:
        raise RunFormatError(
            f"{path / CONFIG}: describes a model of about {needed:,} bytes but {WEIGHTS} holds {data_bytes:,}"
        )
    with torch.device("meta"):
        expected = build_model(spec, "meta").state_dict()
    check_tensors(path / WEIGHTS, header, expected)
    model = build_model(spec, "cpu")
    model.load_state_dict(load_tensors(weights), strict=True)
    tables = []
    for name, columns in ((HISTORY, ("step", "instance", "loss")), (INSTANCES, ("instance", "loss", "diverged"))):
        f = checked_file(path, name, MAX_TABLE_BYTES)
        try:
            frame = pd.read_parquet(f)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise RunFormatError(f"{path / name}: not a valid parquet table ({exc.__class__.__name__})") from None
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise RunFormatError(f"{path / name}: columns {missing} are missing")
        tables.append(frame)
    history, instances = tables
    if len(instances) != spec.n_instances:
        raise RunFormatError(f"{path / INSTANCES}: {len(instances)} rows for {spec.n_instances} instances")
    return Run(
        spec=spec,
        model=model,
        history=history,
        instances=instances,
        meta=meta.model_dump(exclude_defaults=False),
        path=path,
    )
