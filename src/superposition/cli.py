"""The ``superposition`` command: a thin layer over the library, and the only module that prints.

Every input error ends as one line on stderr and exit code 2; a diverging run ends with one line and exit code 1.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from superposition.errors import SpecError, TrainingDiverged

# Typer >= 0.20 vendors click and raises typer.* exceptions; older releases raise click's own.
try:
    import click

    _EXIT: tuple[type[BaseException], ...] = (typer.Exit, click.exceptions.Exit)
    _ABORT: tuple[type[BaseException], ...] = (typer.Abort, click.exceptions.Abort)
    _USAGE: tuple[type[BaseException], ...] = (typer.TyperException, click.ClickException)
except ImportError:  # pragma: no cover - depends on the installed typer
    _EXIT, _ABORT, _USAGE = (typer.Exit,), (typer.Abort,), (typer.TyperException,)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Toy models of superposition: train, analyse and report instance-batched experiments.",
)


QUICK_HELP = (
    "A fast check, shapes unchanged: the spec's [quick] table, then for what it does not set train.steps at most 300 "
    "(warm-up scaled), sae.steps at most 1000 (resampling schedule scaled) and every [instances] and [sweep] axis cut "
    "to its first and last value; prints what it shrank."
)
"""What --quick means, for every command that takes a spec (superposition.spec.quick)."""


class _Fail(Exception):
    """Raised inside commands to end with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _version(value: bool) -> None:
    if value:
        from superposition.version import __version__

        typer.echo(f"superposition {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Toy models of superposition."""


def _load(spec: str, overrides: list[str] | None, quick: bool, device: str | None, *, quiet: bool = False):
    """The experiment of a spec or preset; with --quick, first one line saying what it shrank (unless --quiet)."""
    from superposition.spec import load_quick, load_spec

    sets = list(overrides or [])
    if device is not None:
        sets.append(f"device={device!r}".replace("'", '"'))
    if not quick:
        return load_spec(spec, sets)
    experiment, shrunk = load_quick(spec, sets)
    if shrunk and not quiet:
        typer.echo(shrunk)
    return experiment


def _summary(run) -> str:
    """A compact per-instance table: grid settings, represented features and final loss."""
    from superposition.views import headline

    caption, table = headline(run)
    if caption is not None:
        return f"{caption}:\n{table.to_string()}"
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


@app.command("run")
def run_cmd(
    spec: Annotated[str, typer.Argument(help="A spec file (TOML/JSON) or a preset name.")],
    out: Annotated[Path | None, typer.Option(help="Run folder to write (default runs/<name>).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: section.field=value (repeatable).")
    ] = None,
    quick: Annotated[bool, typer.Option(help=QUICK_HELP)] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto (overrides the spec).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing run folder (only a run folder of this tool is ever replaced).")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = False,
) -> None:
    """Train an experiment and write its run folder (config, weights, tables, report.html).

    --overwrite replaces only a run folder of this tool; any other file or folder at --out is refused untouched."""
    from superposition.runs import check_run
    from superposition.runs import run as run_experiment

    experiment = _load(spec, set_, quick, device, quiet=quiet)
    if experiment.sweep is not None:  # a spec with a [sweep] section runs as a sweep (rerunning resumes it)
        if experiment.sae is not None:
            raise _Fail("sae: a [sweep] spec cannot train SAEs; run 'superposition sae' on each group run")
        _run_sweep(experiment, out, resume=resume, quiet=quiet)
        return
    target = out if out is not None else _default_folder(experiment.name)
    check_run(experiment, target, overwrite=overwrite, resume=resume)  # every refusal before "training ..."
    progress = _bars(quiet)
    if not quiet:
        typer.echo(f"training {experiment.name}: {experiment.n_instances} instance(s), {experiment.train.steps} steps")
    # The SAEs train below, after the model's summary is printed (saes=False), as run_experiment would train them.
    with _interruptible(target, experiment):
        result = run_experiment(experiment, target, overwrite=overwrite, resume=resume, progress=progress, saes=False)
    if not quiet:
        typer.echo(_summary(result))
        typer.echo(
            f"wrote {target}/ ({result.meta['engine']} engine, {result.meta['train_seconds']:.1f} s of training); "
            f"open {target / 'report.html'}"
        )
    if experiment.sae is not None:  # a spec with an [sae] section trains its SAEs on the new run next
        _train_saes(result, experiment.sae, overwrite=True, device=device, quiet=quiet)
    if not quiet and result.verdict:  # the preset's claim, graded (a quick or modified run: "not graded")
        typer.echo(result.verdict)


def _train_saes(run, spec, *, overwrite: bool, device: str | None, quiet: bool) -> None:
    """Train ``spec`` on the run and print each SAE's summary (for the run's own [sae] section with overwrite, what
    the library's ``superposition.run`` does through :func:`superposition.runs.run_spec_saes`)."""
    from superposition.runs import run_saes
    from superposition.sae import check_sae_targets, summary_table

    check_sae_targets(run, spec, overwrite=overwrite)  # every refusal before "training SAEs ..."
    if not quiet:
        typer.echo(f"training SAEs ({', '.join(spec.architectures)}) on {run.path}")
    progress = _bars(quiet)
    try:
        saes = run_saes(run, spec, overwrite=overwrite, device=device, progress=progress)
    except KeyboardInterrupt:
        raise _Fail(
            f"interrupted while training SAEs on {run.path}; the run and SAE folders finished earlier are kept, "
            "the SAE in training was not saved (train it again with: superposition sae "
            f"{run.path} --overwrite)",
            130,
        ) from None
    for sae in saes:
        if not quiet:
            cols = ["sparsity", "resample_method", "mmcs_features", "recovered_99", "n_true", "dead", "l0", "fvu"]
            table = summary_table(sae.scores)[cols + ["all_recovered_99"]]
            typer.echo(f"sae {sae.name} ({sae.architecture}, {sae.meta['train_seconds']:.1f} s), mean over instances:")
            typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            typer.echo(f"wrote {sae.path}/")
    if not quiet:
        typer.echo(f"updated {run.path / 'report.html'}")


@app.command("sae")
def sae_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder.")],
    spec: Annotated[
        Path | None,
        typer.Option(help="SAE spec (TOML/JSON: an [sae] table or its fields); default the run's [sae] section."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override an SAE field: sae.field=value or field=value.")
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(help="sae.steps at most 1000, resample_every, resample_window and log_every scaled to match."),
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto (default: the run's device).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing SAE folders of the same name.")] = False,
) -> None:
    """Train sparse autoencoders on a run's hidden activations; write RUN/sae/<name>/ with ground-truth scores.

    Without --spec or the run's own [sae] section: a ReLU SAE of d_sae = the run's n_features latents, 10000 steps
    (at most 1000 with --quick), batch 1024; every field and default: superposition.spec.SaeSpec."""
    from superposition.runs import load_run
    from superposition.sae import load_sae_spec

    if device is not None and device not in ("cpu", "cuda", "auto"):
        raise _Fail(f"--device: expected cpu, cuda or auto (got {device!r})")
    run = load_run(run_dir)
    sae_spec = load_sae_spec(
        spec, base=run.spec.sae, overrides=list(set_ or []), quick=quick, n_features=run.spec.model.n_features
    )
    _train_saes(run, sae_spec, overwrite=overwrite, device=device, quiet=quiet)


@app.command("resume")
def resume_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="The run folder an interrupted run was writing.")],
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary.")] = False,
) -> None:
    """Continue an interrupted run (its hidden .RUN.partial folder) from its last checkpoint, with its own spec."""
    from superposition.runs import check_run, partial_spec
    from superposition.runs import run as run_experiment

    experiment = partial_spec(run_dir)
    # An interrupted run next to an existing folder was started with --overwrite (nothing else creates one); the
    # folder is replaced only if it is a run folder of this tool.
    overwrite = run_dir.exists() or run_dir.is_symlink()
    check_run(experiment, run_dir, overwrite=overwrite, resume=True)
    with _interruptible(run_dir, experiment):
        result = run_experiment(experiment, run_dir, resume=True, overwrite=overwrite, progress=_bars(quiet))
    if not quiet:
        typer.echo(_summary(result))
        typer.echo(f"wrote {run_dir}/; open {run_dir / 'report.html'}")


@app.command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder or a sweep folder.")]) -> None:
    """Rebuild a run's (or a sweep's) report.html (atomically) from its saved weights and tables."""
    from superposition.folder import format_bytes
    from superposition.runs import load_run, write_report
    from superposition.sweep import SWEEP_JSON, write_sweep_report

    path = write_sweep_report(run_dir) if (run_dir / SWEEP_JSON).exists() else write_report(load_run(run_dir))
    typer.echo(f"wrote {path} ({format_bytes(path.stat().st_size)})")


@app.command("plot")
def plot_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder.")],
    figure: Annotated[str, typer.Argument(help="Figure name (see the run's report, or pass 'list').")],
    out: Annotated[
        Path | None,
        typer.Option(help="Output file: .png, .svg, .pdf, .jpeg, .webp or .html (default ./FIGURE.png)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file at --out.")] = False,
    width: Annotated[int | None, typer.Option(min=50, max=10000, help="Image width in CSS pixels.")] = None,
    height: Annotated[int | None, typer.Option(min=50, max=10000, help="Image height in CSS pixels.")] = None,
    scale: Annotated[float, typer.Option(min=0.1, max=10.0, help="Pixel density of raster images.")] = 2.0,
) -> None:
    """Export one figure of a run: PNG/SVG/PDF offline via kaleido and a local Chromium, or standalone HTML.

    Without --out the figure is written to FIGURE.png in the current folder; an existing file is replaced only with
    --overwrite."""
    from superposition.folder import atomic_write_bytes, format_bytes
    from superposition.plots import figures_for_run
    from superposition.report import IMAGE_FORMATS, figure_image
    from superposition.runs import load_run

    run = load_run(run_dir)
    figures = {name: fig for name, _, fig in figures_for_run(run)}
    if figure == "list":
        for name in figures:
            typer.echo(name)
        return
    if figure not in figures:
        raise _Fail(f"{run_dir}: no figure {figure!r} for this run (available: {', '.join(figures)})")
    target = out if out is not None else Path(f"{figure}.png")
    fmt = target.suffix.lower().lstrip(".").replace("jpg", "jpeg")
    if fmt not in (*IMAGE_FORMATS, "html"):
        raise _Fail(f"--out {target}: unknown extension (use .png, .svg, .pdf, .jpeg, .webp or .html)")
    if not target.parent.is_dir():
        raise _Fail(f"--out {target}: folder {target.parent} does not exist")
    if target.is_dir() or target.is_symlink():
        raise _Fail(f"--out {target}: {'a folder' if target.is_dir() else 'a symbolic link'}; name a file")
    if target.exists() and not overwrite:
        raise _Fail(f"--out {target}: already exists (pass --overwrite to replace it)")
    fig = figures[figure]
    if fmt == "html":
        data = fig.to_html(full_html=True, include_plotlyjs=True, config={"displaylogo": False}).encode("utf-8")
    else:
        data = figure_image(fig, fmt, width=width, height=height, scale=scale)
    atomic_write_bytes(target, data)
    typer.echo(f"wrote {target} ({format_bytes(len(data))})")


def _run_sweep(
    experiment,
    out: Path | None,
    *,
    backend: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    slurm: list[str] | None = None,
    resume: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
) -> None:
    """Plan, print the plan, run the groups not done yet, write results.parquet and report.html."""
    from superposition import sweep as sw
    from superposition.spec import parse_value

    target = out if out is not None else _default_folder(experiment.name)
    if backend not in sw.BACKENDS:
        raise _Fail(f"--backend: {backend!r} is not one of {', '.join(sw.BACKENDS)}")
    options = {}
    for item in slurm or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise _Fail(f"--slurm {item!r}: expected key=value, e.g. --slurm slurm_partition=gpu")
        options[key.strip()] = parse_value(value)
    module = {"ray": "ray", "slurm": "submitit"}.get(backend)
    if module is not None and not dry_run:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise _Fail(f"--backend {backend} needs {module}: pip install 'superposition[{backend}]'")
    if dry_run:
        typer.echo(sw.describe_plan(sw.make_plan(experiment), groups=True))
        return
    plan = sw.prepare(experiment, target, resume=resume)
    if not quiet:
        typer.echo(sw.describe_plan(plan))
        done = sum(sw.group_done(target, g.id) for g in plan.groups)
        if done:
            typer.echo(f"resuming: {done} of {len(plan.groups)} model(s) already done in {target}/")
    try:
        result = sw.execute(
            target,
            backend=backend,
            workers=workers,
            threads=threads,
            address=address,
            slurm=options,
            progress=_bars(quiet),
        )
    except KeyboardInterrupt:
        done = sum(sw.group_done(target, g.id) for g in plan.groups)
        raise _Fail(
            f"interrupted; {done} of {len(plan.groups)} model(s) are done and kept in {target}; "
            "run the same command again to continue (a sweep resumes)",
            130,
        ) from None
    if not quiet:
        counts = result.results["status"].value_counts().to_dict()
        typer.echo(
            f"sweep {experiment.name}: "
            + ", ".join(f"{v} point(s) {k}" for k, v in sorted(counts.items()))
            + f"; trained {result.ran} model(s) in {result.seconds:.1f} s"
        )
        x, y, by = sw.report_axes(experiment)
        r = experiment.sweep.report if experiment.sweep is not None else None
        if r is not None and r.threshold is not None and x and y and (result.results["status"] == "ok").any():
            table = sw.threshold_table(result.results, x, y, r.metric, r.threshold, by=by)
            table = sw.threshold_display(table, result.results, x, y, by)
            typer.echo(f"smallest {x} with {r.metric} < {r.threshold:g}:\n{table.to_string(index=False)}")
        typer.echo(f"wrote {target / sw.RESULTS}; open {target / sw.REPORT}")
        line = sw.sweep_verdict(experiment, target)  # the preset's claim, graded ("not graded" when quick/modified)
        if line:
            typer.echo(line)
    failed = int((result.results["status"] == "failed").sum())
    if failed:
        raise _Fail(f"{failed} point(s) failed (their errors are in {target / sw.RESULTS}); rerun to retry them", 1)


@app.command("sweep")
def sweep_cmd(
    spec: Annotated[str, typer.Argument(help="A spec file (TOML/JSON) or a preset name; its [sweep] section.")],
    out: Annotated[Path | None, typer.Option(help="Sweep folder (default runs/<name>); rerunning resumes it.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Parallel workers (local: processes, default the physical cores).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads per worker (local default: cores // workers; else 1).")
    ] = None,
    backend: Annotated[str, typer.Option(help="local, ray or slurm.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    slurm: Annotated[
        list[str] | None, typer.Option(help="submitit parameter key=value, e.g. slurm_partition=gpu (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the sweep in --out (it must exist).")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and stop.")] = False,
    quick: Annotated[bool, typer.Option(help=QUICK_HELP)] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: section.field=value (repeatable).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto (overrides the spec).")] = None,
    quiet: Annotated[bool, typer.Option(help="No plan, progress bar or summary.")] = False,
) -> None:
    """Run a sweep: points over any fields, equal shapes packed into one model, resumable, local/Ray/SLURM."""
    experiment = _load(spec, set_, quick, device, quiet=quiet)
    _run_sweep(
        experiment,
        out,
        backend=backend,
        workers=workers,
        threads=threads,
        address=address,
        slurm=slurm,
        resume=resume,
        dry_run=dry_run,
        quiet=quiet,
    )


@app.command("reproduce")
def reproduce_cmd(
    presets: Annotated[
        list[str] | None, typer.Argument(help="Presets to grade (default: every preset with a claim).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the runs: OUT/full/PRESET (OUT/quick/ with --quick).")] = Path(
        "runs/reproduce"
    ),
    collect: Annotated[bool, typer.Option(help="Re-read finished folders in --out instead of training.")] = False,
    quick: Annotated[
        bool, typer.Option(help="The presets' quick settings: graded, never written to --results.")
    ] = False,
    results: Annotated[Path, typer.Option(help="The Markdown file whose results table is rewritten.")] = Path(
        "docs/RESULTS.md"
    ),
    workers: Annotated[int, typer.Option(min=1, help="Parallel workers for presets with a [sweep].")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads (default: as now).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (the wall-time column names it).")] = "cpu",
) -> None:
    """Re-run presets (or re-read their finished folders), grade each against its source's claim with the preset's
    rule, and rewrite their rows of the results table (docs/RESULTS.md)."""
    from superposition.reproduce import reproduce

    rows = reproduce(
        presets or None,
        out=out,
        collect=collect,
        quick=quick,
        threads=threads,
        workers=workers,
        device=device,
        results_md=results,
        progress=lambda message: typer.echo(message, err=True),
    )
    for name, row in rows.items():
        typer.echo(f"{name}: reproduced? {row.verdict}")


@app.command("presets")
def presets_cmd() -> None:
    """List the shipped presets, one line each."""
    from superposition.spec import preset_description, preset_names

    names = preset_names()
    width = max(len(n) for n in names)
    for name in names:
        typer.echo(f"{name:<{width}}  {preset_description(name)}")


@app.command("show")
def show_cmd(preset: Annotated[str, typer.Argument(help="A preset name.")]) -> None:
    """Print a preset's TOML."""
    from superposition.spec import preset_text

    typer.echo(preset_text(preset), nl=False)


@functools.lru_cache(maxsize=2)
def _click_command(n_commands: int):
    """The click command typer builds from ``app`` (built once: building it costs more than most commands)."""
    import typer.main

    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        args = ["--help"]
    try:
        code = _click_command(len(app.registered_commands))(args=args, prog_name="superposition", standalone_mode=False)
        # Outside standalone mode typer returns the code of an Exit it caught: 130 for Ctrl-C (KeyboardInterrupt).
        if code == 130:
            _err("interrupted")
        return code if isinstance(code, int) and not isinstance(code, bool) else 0
    except (SpecError, _Fail) as exc:
        code = getattr(exc, "code", 2)
        _err(str(exc))
        return code
    except TrainingDiverged as exc:
        _err(str(exc))
        return 1
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _ABORT:
        _err("aborted")
        return 130
    except _USAGE as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see 'superposition {ctx.info_name} --help')" if ctx is not None and ctx.parent else ""
        _err(f"{exc.format_message()}{hint}".replace("\n", " "))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except OSError as exc:
        from superposition.folder import user_path

        name = getattr(exc, "filename", None)
        _err(f"{exc.strerror or exc}: {user_path(name)}" if isinstance(name, str) and name else str(exc))
        return 2
    except Exception as exc:  # last resort: one line, the traceback only on request
        if os.environ.get("SUPERPOSITION_DEBUG"):
            raise
        _err(f"internal error: {exc.__class__.__name__}: {exc} (set SUPERPOSITION_DEBUG=1 for the traceback)")
        return 1


def _err(message: str) -> None:
    # Exactly one line: user text inside a message (a key, a file name) may hold newlines or other separators.
    text = message.strip() or "error"
    line = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    print(f"error: {line}", file=sys.stderr)


@contextlib.contextmanager
def _interruptible(target: Path, experiment):
    """Turn Ctrl-C during training into one line that says what was kept and how to continue."""
    start = time.time()
    try:
        yield
    except KeyboardInterrupt:  # also runs.RunInterrupted, worded for the library: reworded for the command line
        from superposition.runs import interrupted_message

        raise _Fail(interrupted_message(target, experiment, start), 130) from None


def _terminal_bar(*, total: int, initial: int = 0, desc: str = "", unit: str = "it"):
    """The CLI's progress bar on stderr (the library draws none of its own: superposition.progress)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)


def _bars(quiet: bool):
    """The bar factory the commands pass to the library: a bar on a terminal, a line every ~10 s off one."""
    if quiet:
        return None
    from superposition.progress import LineBar

    return _terminal_bar if sys.stderr.isatty() else LineBar


def _default_folder(name: str) -> Path:
    """runs/<name>, refusing a name that would leave runs/ or hide the folder (pass --out for those)."""
    bad = not name.strip() or name.startswith(".") or any(c in name for c in "/\\\0") or not name.isprintable()
    if bad or len(name.encode("utf-8")) > 200:
        raise _Fail(f"name {name!r} cannot be a folder name under runs/; pass --out DIR")
    return Path("runs") / name


if __name__ == "__main__":
    sys.exit(main())
