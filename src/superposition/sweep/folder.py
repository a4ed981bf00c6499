"""The sweep folder format: sweep.json (spec and plan, read bounded and re-validated), preparing and resuming a
folder, when a group is done, the results table built from the finished run folders, and ``load_sweep``."""

from __future__ import annotations

import functools
import io
import json
import math
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from superposition.display import Displayable
from superposition.folder import MAX_TABLE_BYTES, SWEEP_FORMAT, RunFormatError, atomic_write_bytes, checked_file
from superposition.record import INSTANCES, Run, load_run
from superposition.spec import Experiment, SpecError, SweepSpec, parse_spec
from superposition.sweep.plan import Plan, make_plan, n_combinations

FORMAT = SWEEP_FORMAT
SWEEP_JSON, RESULTS, REPORT = "sweep.json", "results.parquet", "report.html"
RUNS, ERRORS = "runs", "errors"


# -- the folder ----------------------------------------------------------------------------------------------------
MAX_SWEEP_BYTES = 64 * 2**20
"""Largest sweep.json read (a spec per group: about 3 kB each; the 126-group hierarchy sweep writes 0.4 MB)."""
MAX_COMBINATIONS = 1_000_000
"""Most combinations (before ``where``) of a stored spec that opening a sweep folder re-plans."""
MAX_PLANNED_INSTANCES = 10_000_000
"""Most instances (combinations x base instances x repeats) of a stored spec that opening a folder re-plans."""
MAX_SPEC_DEPTH = 32
"""Deepest nesting of the stored spec (a real one nests about 5 levels: sweep.axes.<name>[list of lists])."""
_META_KEYS = ("format", "superposition_version", "spec", "plan")
_GROUP_ID = re.compile(r"g[0-9]{1,9}")


def read_meta(out: Path) -> dict[str, Any]:
    """sweep.json's top level, bounded and checked (its spec and plan are checked by ``_validated``)."""
    path = out / SWEEP_JSON
    if not out.is_dir():
        raise RunFormatError(f"{out}: {'not a folder' if out.exists() else 'no such sweep folder'}")
    try:  # _checked_file: "not a sweep folder (sweep.json is missing)", links, size
        meta = json.loads(checked_file(out, SWEEP_JSON, MAX_SWEEP_BYTES, "sweep").read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RunFormatError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise RunFormatError(f"{path}: not a sweep file (not a JSON object)")
    if meta.get("format") != FORMAT:
        found = meta.get("format")
        shown = repr(found)[:80] if found is not None else "missing"
        raise RunFormatError(f"{path}: not a sweep file of this version (format {shown}, expected {FORMAT!r})")
    extra = sorted(k for k in meta if k not in _META_KEYS)
    if extra:
        raise RunFormatError(f"{path}: unexpected keys {[k[:40] for k in extra[:5]]}")
    for key, kind in (("superposition_version", str), ("spec", dict), ("plan", dict)):
        if not isinstance(meta.get(key), kind):
            raise RunFormatError(f"{path}: no {key!r} {'text' if kind is str else 'table'}")
    if len(meta["superposition_version"]) > 100:
        raise RunFormatError(f"{path}: superposition_version is longer than 100 characters")
    return meta


@functools.lru_cache(maxsize=4)
def _planned(spec_text: str) -> str:
    """The plan of a spec (given as canonical JSON) as canonical JSON: a worker re-plans its sweep once."""
    return json.dumps(make_plan(parse_spec(json.loads(spec_text))).to_json(), sort_keys=True)


def _first_difference(a: Any, b: Any, where: str = "plan", depth: int = 0) -> str:
    """The dotted path of the first place two JSON values differ (stops descending after a few levels)."""
    if depth < 8 and isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b or a[key] != b[key]:
                return _first_difference(a.get(key), b.get(key), f"{where}.{str(key)[:40]}", depth + 1)
    if depth < 8 and isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]", depth + 1)
        if len(a) != len(b):
            return f"{where} ({len(a)} entries, the spec plans {len(b)})"
    return where


def _depth(value: Any) -> int:
    """How deeply lists and tables nest in a JSON value (iteratively: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _group_dir(out: Path, group_id: str) -> Path | None:
    """``out/runs/<group>`` if it is a finished run folder, None if absent or unfinished; refuses links and files."""
    folder = out / RUNS / group_id
    try:
        mode = folder.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise RunFormatError(f"{folder}: a symbolic link where a run folder should be; refusing to follow it")
    if not stat.S_ISDIR(mode):
        raise RunFormatError(f"{folder}: not a folder (a group's run folder)")
    return folder if (folder / "config.json").is_file() else None


_ESTIMATES = ("memory", "work")
"""Group fields that are estimates, not identity: a newer version may estimate them differently."""


def _identity(plan: dict[str, Any]) -> dict[str, Any]:
    """A plan without its groups' estimates, each group's spec as the current version reads it (a field added since
    the folder was written takes its default): what a stored plan must share with a fresh ``make_plan``."""
    groups = plan.get("groups")
    if not isinstance(groups, list):
        return plan
    stripped = [
        {k: _read_spec(v) if k == "spec" else v for k, v in g.items() if k not in _ESTIMATES}
        if isinstance(g, dict)
        else g
        for g in groups
    ]
    return {**plan, "groups": stripped}


def _read_spec(raw: Any) -> Any:
    """A group spec with every field filled in (unchanged when it is not a valid spec: the comparison then fails)."""
    if not isinstance(raw, dict):
        return raw
    try:
        return parse_spec(raw).model_dump(mode="json")
    except SpecError:
        return raw


def _validated(out: Path, meta: dict[str, Any]) -> tuple[Experiment, Plan]:
    """The stored spec and plan, trusting neither: the plan must be the one the spec gives (``make_plan``).

    A plan is never taken from the file as it is: every group id and group spec is recomputed from the stored spec, so
    an edited plan cannot point a group at a path outside the folder or train something its spec does not say. The
    re-planning is bounded first (combinations and instances must fit what the stored plan lists).
    """
    path = out / SWEEP_JSON
    if _depth(meta["spec"]) > MAX_SPEC_DEPTH:
        raise RunFormatError(f"{path}: the spec nests lists and tables more than {MAX_SPEC_DEPTH} levels deep")
    try:
        spec = parse_spec(meta["spec"])
    except SpecError as exc:
        raise RunFormatError(f"{path}: invalid spec: {exc}") from None
    raw = meta["plan"]
    points, groups, dropped = raw.get("points"), raw.get("groups"), raw.get("dropped")
    if not isinstance(points, list) or not isinstance(groups, list) or type(dropped) is not int or dropped < 0:
        raise RunFormatError(f"{path}: the plan needs lists 'points' and 'groups' and a count 'dropped'")
    for g in groups:
        gid = g.get("id") if isinstance(g, dict) else None
        if not isinstance(gid, str) or not _GROUP_ID.fullmatch(gid):
            raise RunFormatError(f"{path}: plan group id {str(gid)[:60]!r} is not g followed by digits")
    sweep = spec.sweep or SweepSpec()
    combos = n_combinations(sweep)
    if combos > len(points) + dropped or combos > MAX_COMBINATIONS:
        raise RunFormatError(
            f"{path}: the spec's sweep has {combos:,} combinations but the plan lists {len(points) + dropped:,} "
            f"(at most {MAX_COMBINATIONS:,} are re-planned)"
        )
    if combos * spec.n_instances * sweep.repeats > MAX_PLANNED_INSTANCES:
        raise RunFormatError(
            f"{path}: the spec plans up to {combos * spec.n_instances * sweep.repeats:,} instances "
            f"(at most {MAX_PLANNED_INSTANCES:,} are re-planned)"
        )
    try:
        planned = _planned(json.dumps(meta["spec"], sort_keys=True))
    except SpecError as exc:
        raise RunFormatError(f"{path}: the spec cannot be planned: {exc}") from None
    fresh = json.loads(planned)
    stored, expected = _identity(raw), _identity(fresh)
    if stored != expected:
        where = _first_difference(stored, expected)
        raise RunFormatError(
            f"{path}: the stored plan is not the plan of its spec (first difference at {where}); the file was edited "
            f"or written by another version (superposition {meta['superposition_version'][:40]})"
        )
    plan = Plan.from_json(fresh)
    runs = out / RUNS
    if runs.is_symlink() or not runs.is_dir():
        raise RunFormatError(f"{runs}: missing or not a folder (a sweep folder holds its run folders there)")
    for g in plan.groups:
        _group_dir(out, g.id)
    return spec, plan


def read_plan(out: str | Path) -> Plan:
    """The plan stored in a sweep folder, checked against its spec (one RunFormatError when it is damaged)."""
    out = Path(out)
    return _validated(out, read_meta(out))[1]


def prepare(spec: Experiment, out: str | Path, *, resume: bool = False) -> Plan:
    """Create the sweep folder with its plan, or reopen it when it holds the same spec (a rerun resumes)."""
    from superposition.version import __version__

    out = Path(out)
    spec_json = spec.model_dump(mode="json")
    if (out / SWEEP_JSON).exists():
        meta = read_meta(out)
        if meta.get("spec") != spec_json:
            raise SpecError(f"{out}: holds a sweep of a different spec (choose another --out, or remove the folder)")
        return _validated(out, meta)[1]
    if resume:
        raise SpecError(f"{out}: no sweep to resume ({SWEEP_JSON} is missing)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"{out}: exists and is not a sweep folder (choose another --out)")
    plan = make_plan(spec)
    (out / RUNS).mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "superposition_version": __version__, "spec": spec_json, "plan": plan.to_json()}
    atomic_write_bytes(out / SWEEP_JSON, (json.dumps(meta, indent=1)).encode())
    return plan


def group_done(out: Path, group_id: str) -> bool:
    return _group_dir(out, group_id) is not None


# -- results -------------------------------------------------------------------------------------------------------
_BASE_COLUMNS = ("instance", "init_seed", "loss", "train_loss", "diverged")


def _column(values: list[Any]) -> list[Any]:
    """Axis values as one plain parquet type: lists and mixed kinds become JSON text."""

    def kind(v: Any) -> str:
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, int | float):
            return "number"
        return "str" if isinstance(v, str) else "json"

    kinds = {kind(v) for v in values if v is not None}
    if len(kinds) <= 1 and "json" not in kinds:
        return values
    return [None if v is None else json.dumps(v) for v in values]


def _stats(values: np.ndarray) -> tuple[float, float, float, int]:
    """(min, mean, max, argmin) over the finite values; NaN and -1 when none is finite."""
    finite = np.isfinite(values)
    if not finite.any():
        return math.nan, math.nan, math.nan, -1
    v = np.where(finite, values, np.inf)
    return float(values[finite].min()), float(values[finite].mean()), float(values[finite].max()), int(v.argmin())


def _read_parquet(real: Path, shown: Path) -> pd.DataFrame:
    """A parquet table (checked to be a bounded regular file); one RunFormatError naming ``shown`` if damaged."""
    try:
        return pd.read_parquet(real)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise RunFormatError(f"{shown}: not a valid parquet table ({exc.__class__.__name__})") from None


def collect_results(out: str | Path, plan: Plan) -> pd.DataFrame:
    """One row per point: axis values, group, status (ok/failed/invalid/pending), error, loss over repeats, metrics.

    ``loss_min``/``loss_mean``/``loss_max`` are over the point's repeats of the per-instance final loss (mean over
    ``train.eval_batch`` fresh samples and the features); ``loss_sum`` is their sum (seed 002's "loss" sums its
    instances); metrics from the instances table are averaged over the repeats (``<name>_mean``).
    """
    out = Path(out)
    rows: dict[int, dict[str, Any]] = {}
    metric_names: list[str] = []
    for g in plan.groups:
        error_file = out / ERRORS / f"{g.id}.json"
        if group_done(out, g.id):
            run_dir = out / RUNS / g.id
            table = _read_parquet(checked_file(run_dir, INSTANCES, MAX_TABLE_BYTES), run_dir / INSTANCES)
            axis_cols = set(g.spec["instances"]["axes"])
            for name in table.columns:
                if name in _BASE_COLUMNS or name in axis_cols or name in metric_names:
                    continue
                if pd.api.types.is_numeric_dtype(table[name]) or pd.api.types.is_bool_dtype(table[name]):
                    metric_names.append(name)
            point_rows: dict[int, list[int]] = {}
            for inst, (p, _) in enumerate(g.members):
                point_rows.setdefault(p, []).append(inst)
            for p, idx in point_rows.items():
                sub = table.iloc[idx]
                loss = sub["loss"].to_numpy(dtype=np.float64)
                lo, mean, hi, best = _stats(loss)
                row = {
                    "status": "ok",
                    "error": None,
                    "repeats": len(idx),
                    "loss_min": lo,
                    "loss_mean": mean,
                    "loss_max": hi,
                    "loss_sum": float(loss.sum()),
                    "train_loss_mean": _stats(sub["train_loss"].to_numpy(dtype=np.float64))[1],
                    "n_diverged": int(sub["diverged"].sum()),
                    "best_repeat": best,
                }
                for name in metric_names:
                    if name in sub.columns:
                        row[f"{name}_mean"] = _stats(sub[name].to_numpy(dtype=np.float64))[1]
                rows[p] = row
        elif error_file.is_file():
            error = json.loads(error_file.read_text(encoding="utf-8")).get("error", "failed")
            for p in g.points:
                rows[p] = {"status": "failed", "error": error, "repeats": 0}
        else:
            for p in g.points:
                rows[p] = {"status": "pending", "error": None, "repeats": 0}
    stats = ["loss_min", "loss_mean", "loss_max", "loss_sum", "train_loss_mean", "n_diverged", "best_repeat"]
    stats += [f"{n}_mean" for n in metric_names]
    table: dict[str, list[Any]] = {"point": [p.index for p in plan.points]}
    for col in plan.columns:
        table[col] = _column([p.values.get(col) for p in plan.points])
    table["group"] = [p.group for p in plan.points]
    table["status"] = [rows.get(p.index, {}).get("status", "invalid") for p in plan.points]
    table["error"] = [p.error if p.error is not None else rows.get(p.index, {}).get("error") for p in plan.points]
    table["repeats"] = [int(rows.get(p.index, {}).get("repeats", 0)) for p in plan.points]
    for name in stats:
        table[name] = [float(rows.get(p.index, {}).get(name, math.nan)) for p in plan.points]
    frame = pd.DataFrame(table)
    for name in ("n_diverged", "best_repeat"):
        frame[name] = frame[name].astype("Int64")
    frame["point"] = frame["point"].astype(np.int64)
    frame["repeats"] = frame["repeats"].astype(np.int64)
    for name in ("group", "status", "error"):  # a string column even when every value is missing
        frame[name] = frame[name].astype("string")
    # Round-trip through parquet so the table in memory has exactly the dtypes of results.parquet.
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return pd.read_parquet(io.BytesIO(buffer.getvalue()))


# -- loading a sweep ---------------------------------------------------------------------------------------------
class _Runs(Mapping[str, "Run"]):
    """The finished run folders of a sweep by group id (groups of the plan only), loaded by ``load_run`` on access."""

    def __init__(self, out: Path, plan: Plan):
        self._out, self._cache = out, {}
        self._ids_planned = [g.id for g in plan.groups]

    def _ids(self) -> list[str]:
        return [gid for gid in self._ids_planned if group_done(self._out, gid)]

    def __getitem__(self, key: str) -> Run:
        if key not in self._cache:
            if key not in self._ids_planned or not group_done(self._out, key):
                raise KeyError(key)
            self._cache[key] = load_run(self._out / RUNS / key)
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids())

    def __len__(self) -> int:
        return len(self._ids())


@dataclass
class Sweep(Displayable):
    """A sweep folder opened: its spec, plan, results table and run folders (``runs[group_id]``); in a notebook an
    HTML summary, ``figure(name)`` / ``figures()`` (drawn by :mod:`superposition.sweep.report`)."""

    presenter_module: ClassVar[str] = "superposition.sweep"

    path: Path
    spec: Experiment
    plan: Plan
    results: pd.DataFrame
    runs: Mapping[str, Run] = field(repr=False)

    def __repr__(self) -> str:
        status = self.results["status"].value_counts().to_dict() if "status" in self.results else {}
        counts = ", ".join(f"{v} {k}" for k, v in sorted(status.items()))
        shape = f"{len(self.plan.points)} point(s) in {len(self.plan.groups)} model(s)"
        return f"Sweep({self.spec.name!r}: {shape}, {counts} at {self.path})"

    def instances(self) -> pd.DataFrame:
        """Long table: every instance of every finished group with its point, repeat and the point's axis values."""
        frames = []
        for gid, run in self.runs.items():
            g = self.plan.group(gid)
            df = run.instances.copy()
            df.insert(0, "repeat", [r for _, r in g.members])
            df.insert(0, "point", [p for p, _ in g.members])
            df.insert(0, "group", gid)
            frames.append(df)
        if not frames:
            return pd.DataFrame({"group": [], "point": [], "repeat": []})
        long = pd.concat(frames, ignore_index=True)
        extra = [c for c in self.plan.columns if c not in long.columns]
        return long.merge(self.results[["point", *extra]], on="point", how="left")


_RESULT_COLUMNS = ("group", "status", "error", "repeats")
_STATUSES = frozenset({"ok", "failed", "invalid", "pending"})


def _check_results(f: Path, results: pd.DataFrame, plan: Plan) -> None:
    """results.parquet must hold the plan's points, in order, with their groups and known statuses."""
    missing = [c for c in ("point", *plan.columns, *_RESULT_COLUMNS) if c not in results.columns]
    if missing:
        raise RunFormatError(f"{f}: columns {[str(c)[:60] for c in missing[:5]]} are missing")
    if results["point"].tolist() != [p.index for p in plan.points]:
        raise RunFormatError(f"{f}: its {len(results)} rows are not the plan's {len(plan.points)} points in order")
    if [_text_cell(v) for v in results["group"].tolist()] != [p.group for p in plan.points]:
        raise RunFormatError(f"{f}: the group column does not match the plan")
    if not all(_text_cell(v) in _STATUSES for v in results["status"].tolist()):
        raise RunFormatError(f"{f}: statuses must be one of {sorted(_STATUSES)}")


def _text_cell(value: Any) -> Any:
    """A table cell as text or None (missing); anything else (a list, a number) as a value equal to nothing."""
    if isinstance(value, str) or value is None:
        return value
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return object()


def load_sweep(path: str | Path) -> Sweep:
    """Open a sweep folder: ``.results`` (one row per point), ``.runs`` (group id -> Run, lazily), ``.spec``.

    Trusts nothing in the folder: sweep.json is read bounded and checked (its plan must be the one its spec gives),
    group folders must be real folders (no links), results.parquet must hold the plan's points, and each run folder
    is opened by ``load_run`` (of the plan's groups only). Anything else is one RunFormatError naming the file.
    """
    path = Path(path)
    spec, plan = _validated(path, read_meta(path))
    results_file = path / RESULTS
    if not results_file.exists() and not results_file.is_symlink():
        raise RunFormatError(
            f"{path}: {RESULTS} is missing (the sweep did not finish); rerun "
            f"`superposition sweep SPEC --out {path} --resume` to rebuild it"
        )
    results = _read_parquet(checked_file(path, RESULTS, MAX_TABLE_BYTES, "sweep"), results_file)
    _check_results(results_file, results, plan)
    return Sweep(path, spec, plan, results, _Runs(path, plan))
