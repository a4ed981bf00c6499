"""The run job: train an experiment, save it as a folder (with its report and SAEs), resume an interrupted one.

The folder itself (its files, writing and reading) is :mod:`superposition.record`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from superposition import views  # noqa: F401 -- binds the notebook presenters of Run and Sae
from superposition.claims import claim_line
from superposition.folder import (
    RUN,
    RUN_FILE_NAMES,
    RUN_WORK,
    check_target,
    fresh_workdir,
    normal,
    publish,
    remove_owned,
    work_dir,
)
from superposition.progress import Progress
from superposition.record import (
    CHECKPOINT,
    SPEC_MARKER,
    Run,
    RunFormatError,
    checkpoint_step,
    finish,
    init_weights,
    interrupted_step,
    load_run,
    partial_complete,
    partial_dir,
    partial_spec,
    read_checkpoint,
    read_safetensors_header,
    save_checkpoint,
    spec_text,
    start_state,
    write_run_files,
)
from superposition.report import Section, render_page, render_run
from superposition.report import write_report as write_page
from superposition.sae import Sae, check_sae_targets, load_sae, save_sae, train_sae
from superposition.sae_report import run_sae_sections, sae_sections
from superposition.spec import Experiment, SaeSpec, SpecError, check_memory
from superposition.train import TrainingDiverged, TrainState, resolve_device, train_model

__all__ = [
    "Run",
    "train",
    "run",
    "save_run",
    "load_run",
    "RunFormatError",
    "partial_dir",
    "partial_spec",
    "check_run",
    "interrupted_step",
    "read_safetensors_header",
    "report_sections",
    "verdict",
    "render",
    "write_report",
    "sae_page",
    "run_saes",
    "run_spec_saes",
    "load_sae",
    "RunInterrupted",
    "interrupted_message",
]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a notebook's stop button) during :func:`run`: the message says what was kept and how to continue."""


def interrupted_message(out: str | Path, spec: Experiment, since: float, *, cli: bool = True) -> str:
    """What an interrupted :func:`run` of ``spec`` into ``out`` (started at ``since``, a ``time.time()``) left: a
    complete run, a checkpoint to resume from, or nothing; worded for the command line or (``cli=False``) the
    library. The one wording of both ``superposition run`` and ``superposition.run``."""
    resume = f"superposition resume {out}"
    if not cli:
        resume = f"superposition.run(spec, {str(out)!r}, resume=True) (or: {resume})"
    step, work, every = interrupted_step(out), work_dir(out), spec.train.checkpoint_every
    config = normal(out) / RUN_FILE_NAMES[0]
    if partial_complete(out):  # killed while publishing: the run is complete in its working folder
        kept = f"the run is complete; put it in place with: {resume}"
    elif not work.exists() and config.is_file() and config.stat().st_mtime >= since:
        kept = f"the run was written to {out} (only its clean-up or SAEs were cut short)"
    elif step is not None:
        kept = f"checkpoint at step {step} kept; continue with: {resume}"
    elif every:
        kept = f"nothing kept (interrupted before the first checkpoint, at step {every})"
    else:
        how = "--set train.checkpoint_every=N" if cli else "train.checkpoint_every = N in the spec"
        kept = f"nothing kept (no train.checkpoint_every; {how} makes a run resumable)"
    return f"interrupted; {kept}"


def train(spec: Experiment, *, progress: Progress = None) -> Run:
    """Train an experiment in memory and return the Run (nothing is written)."""
    check_memory(spec)
    state = start_state(spec)
    return finish(state, train_model(state, progress=progress).seconds)


def save_run(run: Run, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a run folder atomically (built in a hidden sibling, then renamed)."""
    out = normal(out)
    check_target(out, RUN, RUN_WORK, overwrite=overwrite)
    partial = work_dir(out)
    fresh_workdir(partial, SPEC_MARKER, spec_text(run.spec).encode(), (RUN_WORK,))
    write_run_files(partial, run, render(run, verdict(run)))
    publish(partial, out, RUN, overwrite=overwrite)
    run.path = out
    return out


def check_run(spec: Experiment, out: str | Path, *, overwrite: bool = False, resume: bool = False) -> int | None:
    """Everything :func:`run` can refuse, checked before any work: memory, device, the target and its hidden
    siblings (only this tool's own folders are replaced or deleted), writability, an interrupted run in the way.

    Returns the checkpoint step ``run`` will resume from (None: it starts from step 0).
    """
    out = normal(out)
    check_memory(spec)
    resolve_device(spec.device)
    if spec.train.init_from:
        init_weights(spec)
    check_target(out, RUN, RUN_WORK, overwrite=overwrite)
    partial = work_dir(out)
    if resume and partial_complete(out):
        if spec_text(partial_spec(out)) != spec_text(spec):
            raise SpecError(f"{out}: the interrupted run was started with a different spec; cannot resume")
        return None
    if not (partial.is_dir() and (partial / SPEC_MARKER).is_file()):
        return None
    same = (partial / SPEC_MARKER).read_text(encoding="utf-8", errors="replace") == spec_text(spec)
    step = checkpoint_step(partial)
    if resume and not same:
        raise SpecError(f"{out}: the interrupted run was started with a different spec; cannot resume")
    if not resume and step is not None and not overwrite:
        raise SpecError(
            f"{out}: an interrupted run of it has a checkpoint at step {step}; "
            "pass --resume to continue it or --overwrite to start over"
        )
    return step if resume else None


def run(
    spec: Experiment,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress = None,
    report: bool = True,
    saes: bool = True,
) -> Run:
    """Train and save a run folder at ``out``; with ``resume`` continue an interrupted run from its last checkpoint.

    ``report=False`` writes the run without report.html (sweep points; ``superposition report`` adds it later).
    A spec with an ``[sae]`` section then trains its SAEs on the saved run, unless ``saes=False``
    (:func:`run_spec_saes`: ``out/sae/<name>/`` and a refreshed, graded report.html).

    Without ``resume`` an interrupted run of ``out`` (a ``.NAME.partial`` with a checkpoint) is kept and the call
    refused, unless ``overwrite`` asks to start over. A run that diverges (on_divergence = "stop") leaves nothing.
    Only this tool's own folders are ever replaced or deleted (:func:`check_run` refuses anything else up front).

    Ctrl-C (a notebook's stop button) raises :class:`RunInterrupted`, a KeyboardInterrupt whose message says what
    was kept: the finished run, a checkpoint to continue from with ``resume=True`` (``train.checkpoint_every``), or
    nothing; the folder at ``out`` is never left half-written.
    """
    out = normal(out)
    step = check_run(spec, out, overwrite=overwrite, resume=resume)
    since = time.time()
    try:
        return _run(spec, out, step, overwrite=overwrite, resume=resume, progress=progress, report=report, saes=saes)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(out, spec, since, cli=False)) from None


def _run(
    spec: Experiment,
    out: Path,
    step: int | None,
    *,
    overwrite: bool,
    resume: bool,
    progress: Progress,
    report: bool,
    saes: bool,
) -> Run:
    partial = work_dir(out)
    if resume and partial_complete(out):
        # Killed while publishing: the partial folder is a complete run (config.json is written last); finish it.
        publish(partial, out, RUN, overwrite=overwrite)
        result = load_run(out)
        if saes:
            run_spec_saes(result, progress=progress)
        return result
    state = start_state(spec) if step is None else TrainState.create(spec)
    if step is not None:
        tensors = read_checkpoint(partial / CHECKPOINT, state.tensors())
        state.load_tensors_(tensors, step)
    else:
        fresh_workdir(partial, SPEC_MARKER, spec_text(spec).encode(), (RUN_WORK,))
    try:
        trained = train_model(state, progress=progress, checkpoint=lambda s: save_checkpoint(partial, s))
    except TrainingDiverged:
        remove_owned(partial, (RUN_WORK,))  # resuming would diverge again at the same step
        raise
    result = finish(state, trained.seconds)
    # An SAE preset is graded once its SAEs are trained (run_saes rewrites the report with the verdict).
    result.verdict = None if spec.sae is not None else verdict(result)
    write_run_files(partial, result, render(result, result.verdict) if report else None)
    publish(partial, out, RUN, overwrite=overwrite)
    result.path = out
    if saes:
        run_spec_saes(result, progress=progress)
    return result


def report_sections(run: Run) -> list[Section]:
    """The sections a run's report adds to its own: one per SAE folder under RUN/sae/ (none without a folder)."""
    if run.path is None or not (Path(run.path) / "sae").is_dir():
        return []
    return run_sae_sections(run)


def verdict(run: Run) -> str | None:
    """The line grading a run against its preset's claim (:func:`superposition.claims.claim_line`): the verdict of a
    full preset, "not graded (quick/modified)" otherwise; None for a preset without a claim (e.g. demo)."""
    return claim_line(run.spec.name, run.spec, run)


def _lead(line: str | None) -> list[Section]:
    return [Section("Reproduced?", paragraphs=[line])] if line else []


def render(run: Run, line: str | None = None) -> str:
    """The run's report page: the verdict ``line`` at the top (if any), the run's own sections, its SAE folders."""
    return render_run(run, report_sections(run), _lead(line))


def write_report(run: Run, path: str | Path | None = None) -> Path:
    """(Re)write a run's report.html atomically, graded and with its SAE folders' sections; default ``run.path``."""
    run.verdict = verdict(run)
    return write_page(run, path, report_sections(run), _lead(run.verdict))


# -- SAEs on a run ---------------------------------------------------------------------------------------------------
def sae_page(sae: Sae, run: Run | None = None) -> str:
    """An SAE folder's own report page (its scores and figures against the run's true features)."""
    return render_page(f"{sae.meta.get('run_name', '')} / sae {sae.name}", sae_sections(sae, run))


def run_saes(
    run: Run,
    spec: SaeSpec,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> list[Sae]:
    """Train the SAEs of every architecture on a saved run, write RUN/sae/<name>/ and refresh RUN/report.html
    (graded, with every SAE folder's sections). Every target is checked before the first SAE trains."""
    targets = check_sae_targets(run, spec, overwrite=overwrite)
    results = []
    for arch, target in zip(spec.architectures, targets, strict=True):
        sae = train_sae(run, spec, arch, device=device, progress=progress)
        save_sae(sae, target, overwrite=overwrite, report_html=sae_page(sae, run))
        results.append(sae)
    write_report(run)
    return results


def run_spec_saes(run: Run, *, device: str | torch.device | None = None, progress: Progress = None) -> list[Sae]:
    """Train a just-saved run's own ``[sae]`` section (none: nothing), replacing SAE folders of the same name: what
    :func:`run` and ``superposition run`` do after the model."""
    if run.spec.sae is None:
        return []
    return run_saes(run, run.spec.sae, overwrite=True, device=device, progress=progress)
