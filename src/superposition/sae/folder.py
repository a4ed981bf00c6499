"""The SAE folder (RUN/sae/<name>/): its file names, the in-memory record (:class:`Sae`), the checked reader and
the check of the targets a job will write. The writer, :func:`superposition.sae.jobs.save_sae`, sits above the report
sections because it renders the folder's page."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from superposition.display import Displayable
from superposition.errors import NotOurs
from superposition.folder import (
    MAX_CONFIG_BYTES,
    MAX_TABLE_BYTES,
    SAE_FILE_NAMES,
    SAE_FORMAT,
    SAE_WORK,
    RunFormatError,
    check_target,
    check_tensors,
    checked_file,
    load_tensors,
    read_json,
    read_safetensors_header,
)
from superposition.folder import SAE as SAE_KIND
from superposition.sae.model import SparseAutoencoder, sae_grid
from superposition.spec import SAE_SPARSITY_FIELD, SaeSpec, SpecError, format_validation_error

if TYPE_CHECKING:
    from superposition.record import Run

__all__ = [
    "Sae",
    "SaeFormatError",
    "load_sae",
    "check_sae_targets",
    "FORMAT",
    "CONFIG",
    "WEIGHTS",
    "SCORES",
    "FEATURES",
    "LATENTS",
    "HISTORY",
    "RESAMPLES",
    "REPORT",
]


CONFIG, WEIGHTS, SCORES, FEATURES, LATENTS, HISTORY, RESAMPLES, REPORT = SAE_FILE_NAMES
FORMAT = SAE_FORMAT


class SaeFormatError(SpecError):
    """An SAE folder that is missing, damaged or not an SAE folder."""


@dataclass
class Sae(Displayable):
    """Trained SAEs of one architecture on one run: spec, weights, scores, history (in a notebook: an HTML summary,
    ``figure(name)`` / ``figures()``, drawn by :mod:`superposition.views`)."""

    spec: SaeSpec
    model: SparseAutoencoder
    scores: pd.DataFrame
    features: pd.DataFrame
    latents: pd.DataFrame
    history: pd.DataFrame
    resamples: pd.DataFrame
    meta: dict[str, Any]
    path: Path | None = None

    def __repr__(self) -> str:
        m = self.model
        where = f" at {self.path}" if self.path is not None else " (in memory)"
        return (
            f"Sae({self.name!r}: {self.architecture}, {m.n_sae} setting(s) x {m.n_instances} instance(s), "
            f"d_sae {m.d_sae} on {m.d_in}-dim activations{where})"
        )

    @property
    def architecture(self) -> str:
        return self.model.architecture

    @property
    def name(self) -> str:
        return str(self.spec.name or self.architecture)


def load_sae(path: str | Path) -> Sae:
    """Rebuild an SAE folder, trusting nothing in it: config.json validated, tensor names, shapes and dtypes checked
    against the config from the safetensors header before any data is read; JSON, safetensors and parquet only."""
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_dir():
        raise SaeFormatError(f"{path}: no such SAE folder")
    for name in (CONFIG, WEIGHTS, SCORES, FEATURES, LATENTS, HISTORY, RESAMPLES):
        if not (path / name).exists():
            raise SaeFormatError(f"{path}: not an SAE folder ({name} is missing)")
    try:
        config = read_json(path, CONFIG, MAX_CONFIG_BYTES)
        if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("sae"), dict):
            raise SaeFormatError(f"{path / CONFIG}: not an SAE config (format {FORMAT!r} and an 'sae' table expected)")
        try:
            spec = SaeSpec.model_validate(config["sae"])
            arch = config["architecture"]
            n_inst, d_in = config["n_instances"], config["d_in"]
        except ValidationError as exc:
            raise SaeFormatError(f"{path / CONFIG}: invalid sae spec: {format_validation_error(exc)}") from None
        except KeyError as exc:
            raise SaeFormatError(f"{path / CONFIG}: {exc} is missing") from None
        ok = arch in SAE_SPARSITY_FIELD and all(type(v) is int and 1 <= v <= 10**9 for v in (n_inst, d_in))
        if not ok or spec.architectures != [arch]:
            raise SaeFormatError(f"{path / CONFIG}: bad architecture, n_instances or d_in")
        weights = checked_file(path, WEIGHTS)
        header = read_safetensors_header(weights)
        params = n_inst * len(sae_grid(spec, arch)) * spec.d_sae * max(d_in, 1) * 4
        if params > 2 * weights.stat().st_size + 2**20:  # the file's size bounds the allocation
            raise SaeFormatError(f"{path / CONFIG}: describes SAEs larger than {WEIGHTS} holds")
        with torch.device("meta"):
            expected = SparseAutoencoder(spec, arch, n_inst, d_in).state_dict()
        check_tensors(path / WEIGHTS, header, expected)
        model = SparseAutoencoder(spec, arch, n_inst, d_in)
        model.load_state_dict(load_tensors(weights), strict=True)
        frames = []
        for name in (SCORES, FEATURES, LATENTS, HISTORY, RESAMPLES):
            f = checked_file(path, name, MAX_TABLE_BYTES)
            try:
                frames.append(pd.read_parquet(f))
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise SaeFormatError(f"{path / name}: not a valid parquet table ({exc.__class__.__name__})") from None
    except RunFormatError as exc:
        raise SaeFormatError(str(exc).replace("run folder", "SAE folder")) from None
    meta = {k: v for k, v in config.items() if k != "sae"}
    return Sae(spec, model, *frames, meta=meta, path=path)


def check_sae_targets(run: Run, spec: SaeSpec, *, overwrite: bool = False) -> list[Path]:
    """The SAE folders :func:`run_saes` will write, each checked before anything trains: absent, or (with
    ``overwrite``) an SAE folder of this tool; anything else is refused."""
    if run.path is None:
        raise SpecError("run_saes: the run has no folder (save it first, or use train_saes)")
    root = Path(run.path) / "sae"
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise NotOurs(f"{root}: not a folder of SAE folders (a link or a file); refusing to write through it")
    targets = [root / spec.folder_name(a) for a in spec.architectures]
    for t in targets:
        check_target(t, SAE_KIND, SAE_WORK, overwrite=overwrite)
    return targets
