"""Running a prepared sweep: one group (``run_group``, and ``_task``, the picklable unit shipped to workers), the
local process pool, Ray and SLURM (submitit) backends, and ``execute``, which writes the table and the report."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from superposition.folder import atomic_write_bytes, atomic_write_table
from superposition.progress import Progress, make_bar
from superposition.spec import SpecError, parse_spec
from superposition.sweep.folder import ERRORS, REPORT, RESULTS, RUNS, collect_results, group_done, read_meta, read_plan
from superposition.sweep.plan import Group, Plan
from superposition.sweep.report import render_sweep

BACKENDS = ("local", "ray", "slurm")


# -- running one group (the unit of work of every backend) ---------------------------------------------------------
class GroupOutcome(NamedTuple):
    """What became of one group: ``ok``, ``failed`` (with a one-line error) or ``skipped`` (already done)."""

    group: str
    status: str
    error: str | None
    seconds: float


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}".rstrip(": ")


def _record_failure(out: Path, group_id: str, error: str) -> None:
    (out / ERRORS).mkdir(exist_ok=True)
    atomic_write_bytes(out / ERRORS / f"{group_id}.json", (json.dumps({"group": group_id, "error": error})).encode())


def run_group(out: str | Path, group_id: str, threads: int | None = None) -> GroupOutcome:
    """Train one group into ``OUT/runs/<group>`` (resuming its checkpoint if any); record a failure, never raise."""
    import torch

    from superposition.runs import run as run_experiment

    out = Path(out)
    if group_done(out, group_id):
        return GroupOutcome(group_id, "skipped", None, 0.0)
    group = read_plan(out).group(group_id)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        run_experiment(group.experiment(), out / RUNS / group_id, resume=True, report=False, saes=False)
    except Exception as exc:  # a failing group is recorded and must not stop the others
        error = _one_line(exc)
        _record_failure(out, group_id, error)
        return GroupOutcome(group_id, "failed", error, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    (out / ERRORS / f"{group_id}.json").unlink(missing_ok=True)
    return GroupOutcome(group_id, "ok", None, time.perf_counter() - start)


def _task(out: str, group_id: str, threads: int | None) -> tuple[str, str, str | None, float]:
    """The picklable unit shipped to pool workers, Ray and submitit: strings in, a plain tuple out."""
    return tuple(run_group(out, group_id, threads))  # type: ignore[return-value]


def _watch_parent(parent: int) -> None:
    # A pool worker whose sweep process was killed (SIGKILL leaves no time to stop the pool) exits instead of
    # finishing its group next to the resumed sweep.
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="superposition-parent-watch").start()


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads not counted)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            phys = core = ""
            for line in [*f, ""]:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    core = value.strip()
                elif not line.strip() and core:
                    cores.add((phys, core))
                    phys = core = ""
    except OSError:  # pragma: no cover - not Linux
        pass
    return max(1, min(len(cores) or usable, usable))


# -- backends ------------------------------------------------------------------------------------------------------
class SweepOutcome(NamedTuple):
    """What :func:`execute` did: the plan, the results table and counts of groups."""

    plan: Plan
    results: pd.DataFrame
    ran: int
    failed: int
    skipped: int
    seconds: float


def _run_local(out: Path, groups: list[Group], workers: int, threads: int, done: Callable[[GroupOutcome], None]):
    if workers == 1:
        for g in groups:
            done(run_group(out, g.id, threads))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: forking after torch has started its threads is unsafe. A worker that dies (out of memory) breaks the
    # pool: its group and the ones not started are recorded as failed instead of hanging, and a rerun retries them.
    pool = ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_watch_parent, initargs=(os.getpid(),)
    )
    try:
        futures = {pool.submit(_task, str(out), g.id, threads): g.id for g in groups}  # runs in submission order
        for future in as_completed(futures):
            try:
                done(GroupOutcome(*future.result()))
            except Exception as exc:
                error = _one_line(exc)
                _record_failure(out, futures[future], error)
                done(GroupOutcome(futures[future], "failed", error, 0.0))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_ray(
    out: Path,
    groups: list[Group],
    workers: int | None,
    threads: int,
    address: str | None,
    done: Callable[[GroupOutcome], None],
) -> None:
    import logging

    import ray

    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        if address is None:
            kwargs["num_cpus"] = workers or physical_cores()
        ray.init(address=address, **kwargs)
    try:
        cuda = any(g.spec["device"] == "cuda" for g in groups)
        remote = ray.remote(num_cpus=threads, num_gpus=1 if cuda else 0, max_retries=0)(_task)
        refs = {remote.remote(str(out.resolve()), g.id, threads): g.id for g in groups}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    done(GroupOutcome(*ray.get(ref)))
                except Exception as exc:  # the task's process died (out of memory, node lost)
                    error = _one_line(exc)
                    _record_failure(out, refs[ref], error)
                    done(GroupOutcome(refs[ref], "failed", error, 0.0))
    finally:
        if started:
            ray.shutdown()


def _run_slurm(
    out: Path,
    groups: list[Group],
    workers: int | None,
    threads: int,
    options: dict[str, Any],
    done: Callable[[GroupOutcome], None],
    cluster: str | None = None,
    poll: float = 2.0,
) -> None:
    import submitit

    executor = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster=cluster)
    params: dict[str, Any] = {"cpus_per_task": threads, "timeout_min": 24 * 60, "name": "superposition-sweep"}
    if any(g.spec["device"] == "cuda" for g in groups):
        params["gpus_per_node"] = 1
    if workers:
        params["slurm_array_parallelism"] = workers
    params.update(options)
    try:
        executor.update_parameters(**params)
    except (NameError, AssertionError, ValueError) as exc:
        raise SpecError(f"--slurm: {str(exc).splitlines()[0]}") from None
    path = str(out.resolve())
    jobs = executor.map_array(_task, [path] * len(groups), [g.id for g in groups], [threads] * len(groups))
    remaining = list(zip(jobs, groups, strict=True))
    while remaining:
        waiting = []
        for job, g in remaining:
            if not job.done():
                waiting.append((job, g))
                continue
            try:
                done(GroupOutcome(*job.result()))
            except Exception as exc:  # the job died (time limit, preemption, node failure)
                error = _one_line(exc)
                _record_failure(out, g.id, error)
                done(GroupOutcome(g.id, "failed", error, 0.0))
        remaining = waiting
        if remaining:
            time.sleep(poll)


def execute(
    out: str | Path,
    *,
    backend: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    slurm: dict[str, Any] | None = None,
    slurm_cluster: str | None = None,
    progress: Progress = None,
) -> SweepOutcome:
    """Train every group of a prepared sweep folder that is not done yet, then write the table and the report.

    ``local``: a pool of ``workers`` processes (default: the physical cores), each with ``threads`` torch threads
    (default: cores // workers). ``ray``: one task per group on the cluster at ``address`` (default: a local Ray).
    ``slurm``: one submitit job array over the groups (``slurm``: extra executor parameters; ``slurm_cluster``:
    submitit's cluster name, e.g. ``local`` for tests). Ray and SLURM tasks default to one thread each.
    """
    if backend not in BACKENDS:
        raise SpecError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if workers is not None and workers < 1:
        raise SpecError(f"--workers: must be at least 1 (got {workers})")
    if threads is not None and threads < 1:
        raise SpecError(f"--threads: must be at least 1 (got {threads})")
    out = Path(out)
    plan = read_plan(out)
    start = time.perf_counter()
    todo = [g for g in plan.groups if not group_done(out, g.id)]
    todo.sort(key=lambda g: -g.work)  # longest first: better packing of the workers, honest ETA at the end
    n_skipped = len(plan.groups) - len(todo)
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    total = sum(len(g.points) for g in plan.groups)
    finished = total - sum(len(g.points) for g in todo)
    bar = make_bar(progress, total=total, initial=finished, desc="sweep", unit="point")
    size = {g.id: len(g.points) for g in plan.groups}

    def done(result: GroupOutcome) -> None:
        counts[result.status] += 1
        if bar is not None:
            bar.update(size[result.group])
            if counts["failed"]:
                bar.set_postfix_str(f"failed={counts['failed']}")

    try:
        if todo and backend == "local":
            n_workers = max(1, min(workers or physical_cores(), len(todo)))
            n_threads = threads or max(1, physical_cores() // n_workers)
            _run_local(out, todo, n_workers, n_threads, done)
        elif todo and backend == "ray":
            _run_ray(out, todo, workers, threads or 1, address, done)
        elif todo:
            _run_slurm(out, todo, workers, threads or 1, dict(slurm or {}), done, cluster=slurm_cluster)
    finally:
        if bar is not None:
            bar.close()
    results = collect_results(out, plan)
    atomic_write_table(out / RESULTS, results)
    spec = parse_spec(read_meta(out)["spec"])
    atomic_write_bytes(out / REPORT, (render_sweep(spec, plan, results, out)).encode())
    return SweepOutcome(
        plan, results, counts["ok"], counts["failed"], n_skipped + counts["skipped"], time.perf_counter() - start
    )
