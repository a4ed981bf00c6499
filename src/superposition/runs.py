"""The run: train an experiment, save it as a folder, load it back.

A run folder holds ``config.json`` (resolved spec + versions), ``model.safetensors``, ``history.parquet``,
``instances.parquet`` and ``report.html``. It is built in a hidden sibling ``.<name>.partial`` (which also holds
the resumable checkpoints) and renamed into place at the end, so a crash never leaves a half-written run visible.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from superposition import __version__
from superposition.metrics import instance_metrics
from superposition.models import ToyModel, build_model
from superposition.spec import Experiment, SpecError, check_memory, format_validation_error, memory_estimate
from superposition.train import TrainingDiverged, TrainState, evaluate, history_frame, train_model

__all__ = [
    "Run",
    "train",
    "run",
    "save_run",
    "load_run",
    "RunFormatError",
    "partial_dir",
    "partial_spec",
    "read_safetensors_header",
]

CONFIG, WEIGHTS, HISTORY, INSTANCES, REPORT = (
    "config.json",
    "model.safetensors",
    "history.parquet",
    "instances.parquet",
    "report.html",
)
CHECKPOINT = "checkpoint.safetensors"
SPEC_MARKER = "spec.json"  # in .NAME.partial: the spec being trained (what resume continues)


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
    check_memory(spec)
    state = TrainState.create(spec)
    return _finish(state, train_model(state, progress=progress).seconds)


# -- saving ---------------------------------------------------------------------------------------------------------
def partial_dir(out: Path) -> Path:
    """The hidden sibling in which a run is built (and checkpointed) before it is renamed into place."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once its folder is flushed (matters for power loss, not for a killed process).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _config_json(spec: Experiment, meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "spec": spec.model_dump(mode="json")}, indent=2)


def _write_run_files(folder: Path, run: Run, report: bool = True) -> None:
    """Write every run file atomically; config.json comes last and marks the folder complete.

    ``report=False`` leaves out report.html (5 MB, most of it plotly.js): sweep points do, and
    ``superposition report`` writes it on demand.
    """
    from superposition.report import render_run

    tensors = {k: v.detach().contiguous().cpu() for k, v in run.model.state_dict().items()}
    _atomic_save_tensors(folder / WEIGHTS, tensors, {"format": "superposition-run"})
    for name, frame in ((HISTORY, run.history), (INSTANCES, run.instances)):
        tmp = folder / (name + ".tmp")
        frame.to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    if report:
        _atomic_write_bytes(folder / REPORT, render_run(run).encode("utf-8"))
    _atomic_write_bytes(folder / CONFIG, _config_json(run.spec, run.meta).encode())


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished partial folder into place (replacing ``out`` only when asked).

    Checkpoints, the spec.json marker and temporary files are removed first, so the published folder holds exactly
    the run files. Between the two renames of an overwrite ``out`` is briefly absent, never half-written; the
    replaced run waits in ``.NAME.old`` until the new one is in place.
    """
    # ``.tmpXXXXXX`` is what safetensors' own atomic save leaves behind when it is killed mid-write.
    stray = [*partial.glob("*.tmp"), *partial.glob(".tmp*"), *partial.glob(CHECKPOINT + "*")]
    for leftover in [*stray, partial / SPEC_MARKER]:
        leftover.unlink(missing_ok=True)
    old = out.parent / f".{out.name}.old"
    if out.exists():
        if not overwrite:
            raise SpecError(f"{out}: already exists (pass --overwrite to replace it)")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(partial, out)
    _fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)


def save_run(run: Run, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a run folder atomically (built in a hidden sibling, then renamed)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SpecError(f"{out}: already exists (pass --overwrite to replace it)")
    partial = partial_dir(out)
    _remove_dir(partial)
    partial.mkdir(parents=True)
    _write_run_files(partial, run)
    _publish(partial, out, overwrite)
    run.path = out
    return out


def _save_checkpoint(folder: Path, state: TrainState) -> None:
    _atomic_save_tensors(folder / CHECKPOINT, state.tensors(), {"step": str(state.step)})


def _spec_text(spec: Experiment) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def _checkpoint_step(partial: Path) -> int | None:
    """The step of the checkpoint in a partial folder (None when there is none)."""
    ckpt = partial / CHECKPOINT
    if not ckpt.is_file():
        return None
    header = read_safetensors_header(ckpt)
    try:
        return int(header.metadata["step"])
    except (KeyError, ValueError):
        raise RunFormatError(f"{ckpt}: the checkpoint has no step") from None


def _remove_dir(folder: Path) -> None:
    """Remove a folder so that it vanishes at once: renamed aside first, then deleted (a kill leaves only trash)."""
    if not folder.exists():
        return
    trash = folder.with_name(folder.name + ".trash")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def _fresh_partial(partial: Path, spec_text: str) -> None:
    """An empty ``.NAME.partial`` holding only spec.json; staged and renamed, so it never exists without it."""
    staging = partial.with_name(partial.name + ".new")
    for stale in (partial, staging):
        _remove_dir(stale)
    staging.mkdir(parents=True)
    _atomic_write_bytes(staging / SPEC_MARKER, spec_text.encode())
    os.replace(staging, partial)


def partial_spec(out: str | Path) -> Experiment:
    """The spec an interrupted run in ``.NAME.partial`` was started with (what ``superposition resume`` continues)."""
    out = Path(out)
    partial = partial_dir(out)
    if not partial.is_dir():
        if (out / CONFIG).is_file():
            raise SpecError(f"{out}: the run is complete; nothing to resume")
        raise SpecError(f"{out}: no interrupted run here (no {partial.name} folder)")
    for name in (CONFIG, SPEC_MARKER):  # a complete partial (killed while publishing) holds its spec in config.json
        f = partial / name
        if f.is_file():
            raw = _read_json(partial, name, MAX_CONFIG_BYTES)
            raw = raw.get("spec") if name == CONFIG and isinstance(raw, dict) else raw
            if not isinstance(raw, dict):
                raise RunFormatError(f"{f}: no spec table")
            try:
                return Experiment.model_validate(raw)
            except ValidationError as exc:
                raise RunFormatError(f"{f}: invalid spec: {format_validation_error(exc)}") from None
    raise SpecError(f"{out}: the interrupted run has no spec.json (it was killed before it started); run it again")


def run(
    spec: Experiment,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    report: bool = True,
    saes: bool = True,
) -> Run:
    """Train and save a run folder at ``out``; with ``resume`` continue an interrupted run from its last checkpoint.

    ``report=False`` writes the run without report.html (sweep points; ``superposition report`` adds it later).
    A spec with an ``[sae]`` section then trains its SAEs on the saved run, unless ``saes=False``
    (:func:`superposition.sae.run_spec_saes`: ``out/sae/<name>/`` and a refreshed report.html).

    Without ``resume`` an interrupted run of ``out`` (a ``.NAME.partial`` with a checkpoint) is kept and the call
    refused, unless ``overwrite`` asks to start over. A run that diverges (on_divergence = "stop") leaves nothing.
    """
    from superposition.sae import run_spec_saes  # sae imports this module at call time only

    out = Path(out)
    check_memory(spec)
    if out.exists() and not overwrite:
        raise SpecError(f"{out}: already exists (pass --overwrite to replace it)")
    partial = partial_dir(out)
    spec_text = _spec_text(spec)
    if resume and all((partial / name).is_file() for name in (CONFIG, WEIGHTS, HISTORY, INSTANCES)):
        # Killed while publishing: the partial folder is a complete run (config.json is written last); finish it.
        if _spec_text(partial_spec(out)) != spec_text:
            raise SpecError(f"{out}: the interrupted run was started with a different spec; cannot resume")
        _publish(partial, out, overwrite)
        result = load_run(out)
        if saes:
            run_spec_saes(result, progress=progress)
        return result
    state = TrainState.create(spec)
    step = None
    if partial.is_dir() and (partial / SPEC_MARKER).is_file():
        same = (partial / SPEC_MARKER).read_text(encoding="utf-8", errors="replace") == spec_text
        step = _checkpoint_step(partial)
        if resume and not same:
            raise SpecError(f"{out}: the interrupted run was started with a different spec; cannot resume")
        if not resume and step is not None and not overwrite:
            raise SpecError(
                f"{out}: an interrupted run of it is in {partial} (checkpoint at step {step}); "
                "pass --resume to continue it or --overwrite to start over"
            )
    if resume and step is not None:
        tensors = _read_checkpoint(partial / CHECKPOINT, state.tensors())
        state.load_tensors_(tensors, step)
    else:
        _fresh_partial(partial, spec_text)
    try:
        trained = train_model(state, progress=progress, checkpoint=lambda s: _save_checkpoint(partial, s))
    except TrainingDiverged:
        _remove_dir(partial)  # resuming would diverge again at the same step
        raise
    result = _finish(state, trained.seconds)
    _write_run_files(partial, result, report)
    _publish(partial, out, overwrite)
    result.path = out
    if saes:
        run_spec_saes(result, progress=progress)
    return result


# -- loading --------------------------------------------------------------------------------------------------------
MAX_CONFIG_BYTES = 16 * 2**20
"""Largest config.json / spec.json read (a resolved spec is a few kB)."""
MAX_HEADER_BYTES = 16 * 2**20
"""Largest safetensors header read (a run's header is well under 1 kB per tensor)."""
MAX_TABLE_BYTES = 4 * 2**30
"""Largest parquet table read."""

_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_TORCH_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.int64: "I64", torch.float64: "F64",
}  # fmt: skip


class TensorInfo(NamedTuple):
    """One tensor entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsHeader(NamedTuple):
    """The parsed, bounds-checked header of a safetensors file."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _checked_file(folder: Path, name: str, limit: int | None = None, what: str = "run") -> Path:
    """``folder/name`` if it is a regular file inside ``folder`` (symlinks must stay inside) of at most ``limit``.

    ``what`` names the folder in messages ("run", "sweep", "SAE").
    """
    f = folder / name
    if not f.exists() and not f.is_symlink():
        raise RunFormatError(f"{folder}: not a {what} folder ({name} is missing)")
    try:
        real, root = f.resolve(strict=True), folder.resolve(strict=True)
    except (OSError, RuntimeError):
        raise RunFormatError(f"{f}: a broken or looping link") from None
    if not real.is_relative_to(root):
        raise RunFormatError(f"{f}: a link leading outside the {what} folder (to {real}); refusing to read it")
    st = real.stat()
    if not stat.S_ISREG(st.st_mode):
        raise RunFormatError(f"{f}: not a regular file")
    if limit is not None and st.st_size > limit:
        raise RunFormatError(f"{f}: {st.st_size:,} bytes, more than the {limit:,} allowed")
    return real


def _read_json(folder: Path, name: str, limit: int) -> Any:
    f = _checked_file(folder, name, limit)
    try:
        return json.loads(f.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RunFormatError(f"{folder / name}: not valid JSON ({exc.__class__.__name__})") from None


def read_safetensors_header(path: str | Path, limit: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and check a safetensors header without loading any tensor data.

    Refuses a declared header size above ``limit`` or beyond the file, a header that is not a JSON table of
    {dtype, shape, data_offsets}, and tensors whose bytes do not lie inside the file or disagree with their shape.
    """
    path = Path(path)
    bad = f"{path}: not a valid safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise RunFormatError(f"{bad} ({size} bytes)")
        n = int.from_bytes(first, "little")
        if n > limit:
            raise RunFormatError(f"{bad} (declares a {n:,}-byte header; at most {limit:,} allowed)")
        if 8 + n > size:
            raise RunFormatError(f"{bad} (declares a {n:,}-byte header in a {size:,}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise RunFormatError(f"{bad} (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise RunFormatError(f"{bad} (the header is not a table)")
    data_size = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RunFormatError(f"{bad} (bad __metadata__)")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                dtype in _DTYPE_SIZES
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(start) is int
                and type(end) is int
                and 0 <= start <= end <= data_size
                and end - start == math.prod(shape) * _DTYPE_SIZES[dtype]
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise RunFormatError(f"{bad} (tensor {name!r}: bad dtype, shape or offsets)")
        tensors[name] = TensorInfo(dtype, tuple(shape), start, end)
    return SafetensorsHeader(tensors, metadata)


def _check_tensors(path: Path, header: SafetensorsHeader, expected: dict[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes of a header against the tensors the config implies."""
    if set(header.tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(header.tensors)), sorted(set(header.tensors) - set(expected))
        raise RunFormatError(f"{path}: tensors do not match the config (missing {missing}, unexpected {extra})")
    for k, info in header.tensors.items():
        want = expected[k]
        if info.shape != tuple(want.shape) or info.dtype != _TORCH_DTYPES.get(want.dtype):
            raise RunFormatError(
                f"{path}: {k} is {info.dtype} {list(info.shape)}, the config needs "
                f"{_TORCH_DTYPES.get(want.dtype)} {list(want.shape)}"
            )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise RunFormatError(f"{path}: not a valid safetensors file ({exc.__class__.__name__})") from None


def _read_checkpoint(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, checked against the state it must restore (names, shapes, dtypes)."""
    header = read_safetensors_header(path)
    # History grows with the step: only the instance dimension of its loss table is fixed.
    fixed = {k: v for k, v in expected.items() if not k.startswith("history.")}
    _check_tensors(path, header._replace(tensors={k: header.tensors[k] for k in header.tensors if k in fixed}), fixed)
    return _load_tensors(path)


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
    config = _read_json(path, CONFIG, MAX_CONFIG_BYTES)
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
    weights = _checked_file(path, WEIGHTS)
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
    _check_tensors(path / WEIGHTS, header, expected)
    model = build_model(spec, "cpu")
    model.load_state_dict(_load_tensors(weights), strict=True)
    tables = []
    for name, columns in ((HISTORY, ("step", "instance", "loss")), (INSTANCES, ("instance", "loss", "diverged"))):
        f = _checked_file(path, name, MAX_TABLE_BYTES)
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
