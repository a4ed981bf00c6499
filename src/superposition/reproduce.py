"""Rerun presets at their full settings (or re-read finished folders) and rewrite their rows of the results table.

Each preset trains into ``out/<full|quick>/<preset>`` (a run folder, or a sweep folder for presets with a
``[sweep]`` section), then its rule (:data:`superposition.claims.RULES`) reads the measured numbers next to the
source's numbers, and the preset's row of the table between the ``results:begin`` / ``results:end`` markers of
RESULTS.md is replaced (rows of other presets are kept, so engineers can add rows for their own presets). A quick
pass never writes RESULTS.md.

The verdict column is computed from the numbers by the rule printed next to it; a "no" is reported, never tuned
away. Wall time is the whole training (training, evaluation, metrics, report) on this machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from superposition import sweep as sw
from superposition.claims import RULES, Row, grade
from superposition.errors import SpecError
from superposition.folder import SWEEP, atomic_write_bytes, remove_owned
from superposition.record import load_run
from superposition.runs import run as run_experiment
from superposition.spec import load_spec

__all__ = [
    "BEGIN",
    "END",
    "HEADER",
    "format_row",
    "load_result",
    "reproduce",
    "train_preset",
    "update_table",
    "where",
]

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
HEADER = "| preset | command | wall time | measured | source | reproduced? |\n| --- | --- | --- | --- | --- | --- |"


def train_preset(name: str, out: Path, quick: bool, threads: int, overrides: Sequence[str], workers: int = 1) -> float:
    """Train one preset into ``out`` (replacing it); return the wall time in seconds."""
    spec = load_spec(name, list(overrides), quick=quick)
    start = time.perf_counter()
    if spec.sweep is not None:
        remove_owned(out, (SWEEP,))  # only a sweep folder of this tool; anything else is refused untouched
        sw.prepare(spec, out)
        sw.execute(out, workers=workers, threads=threads)
    else:
        run_experiment(spec, out, overwrite=True)
    return time.perf_counter() - start


def load_result(name: str, out: Path) -> Any:
    """The finished result in ``out``: the loaded sweep for a sweep folder, else the run."""
    return sw.load_sweep(out) if (out / sw.SWEEP_JSON).is_file() else load_run(out)


def where(device: str, threads: int, workers: int = 1) -> str:
    """Where a preset trained, for the wall-time column (``workers``: parallel sweep workers)."""
    if device == "cuda":
        return f"GPU: {torch.cuda.get_device_name(0)}"
    each = f"{threads} CPU thread{'s' if threads > 1 else ''}"
    return f"{workers} workers × {each}" if workers > 1 else each


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 90:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_row(name: str, wall: str, row: Row) -> str:
    """The preset's line of the results table."""
    cmd = f"`superposition run {name}`"
    return f"| {name} | {cmd} | {wall} | {_cell(row.measured)} | {_cell(row.source)} | {_cell(row.verdict)} |"


def update_table(text: str, rows: dict[str, str]) -> str:
    """Replace (or append) the rows of the named presets inside the markers, keeping every other row."""
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{HEADER}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    kept: list[str] = []
    for line in body.strip("\n").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("preset", "---"):
            continue
        if cells[0] in rows:
            kept.append(rows.pop(cells[0]))
        else:
            kept.append(line)
    kept.extend(rows.values())
    return f"{head}{BEGIN}\n{HEADER}\n" + "\n".join(kept) + f"\n{END}{tail}"


def _wall(log: Path, row: Row) -> str:
    if not log.is_file():
        return "?"
    record = json.loads(log.read_text())
    timing = f": {row.timing}" if row.timing else ""
    return f"{_duration(record['seconds'])} ({record.get('where', '?')}{timing})"


def reproduce(
    names: Sequence[str] | None = None,
    *,
    out: str | Path = Path("runs/reproduce"),
    collect: bool = False,
    quick: bool = False,
    threads: int | None = None,
    workers: int = 1,
    device: str = "cpu",
    overrides: Sequence[str] = (),
    machine: str = "",
    results_md: str | Path = Path("docs/RESULTS.md"),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Row]:
    """Train (or with ``collect`` re-read) each preset into ``out/<full|quick>/<preset>``, grade it by its rule and
    rewrite its row of ``results_md``'s table (never on a ``quick`` pass); return preset name -> its graded Row.

    ``names``: presets with a rule (default: every one in :data:`~superposition.claims.RULES`). ``threads``: torch
    threads while training (default: as set now; restored afterwards). ``workers``: parallel workers for presets
    with a ``[sweep]``. ``device`` and ``overrides`` (``section.field=value``) go to every preset's spec;
    ``machine`` is a note kept with the wall time. ``progress`` receives one message per step (nothing is printed).
    """
    names = list(names) if names else list(RULES)
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise SpecError(f"no extractor for {', '.join(unknown)} (known: {', '.join(RULES)})")
    say = progress or (lambda _message: None)
    before = torch.get_num_threads()
    threads = before if threads is None else threads
    out_root = Path(out) / ("quick" if quick else "full")
    settings = [*overrides, f"device={json.dumps(device)}"]
    for name in names:  # every refusal before anything is trained or written
        if collect:
            if not (out_root / name).is_dir():
                raise SpecError(f"{out_root / name}: no finished folder to re-read (train it without --collect)")
        else:
            load_spec(name, settings, quick=quick)
    if not collect:
        out_root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Row] = {}
    lines: dict[str, str] = {}
    torch.set_num_threads(threads)
    try:
        for name in names:
            folder = out_root / name
            log = out_root / f"{name}.wall.json"  # one file per preset: several reproduce processes may run at once
            if not collect:
                say(f"[{time.strftime('%H:%M:%S')}] training {name} -> {folder}")
                seconds = train_preset(name, folder, quick, threads, settings, workers)
                record = {
                    "seconds": seconds,
                    "where": where(device, threads, workers if (folder / sw.SWEEP_JSON).is_file() else 1),
                    "machine": machine,
                    "finished": time.strftime("%Y-%m-%d %H:%M"),
                }
                atomic_write_bytes(log, json.dumps(record).encode())
            row = grade(name, load_result(name, folder))
            wall = _wall(log, row)
            rows[name] = row
            lines[name] = format_row(name, wall, row)
            say(f"{name}: {wall}\n  measured: {row.measured}\n  source:   {row.source}\n  verdict:  {row.verdict}")
    finally:
        torch.set_num_threads(before)
    if not quick:
        results_md = Path(results_md)
        results_md.parent.mkdir(parents=True, exist_ok=True)
        text = results_md.read_text(encoding="utf-8") if results_md.is_file() else "# Results\n"
        atomic_write_bytes(results_md, update_table(text, lines).encode())
        say(f"wrote {results_md}")
    return rows
