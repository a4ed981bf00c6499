"""Sweeps: grids over any fields, shapes included, packed into as few models as the shapes allow.

A spec's ``[sweep]`` section lists axes over any dotted field. The grid expands into *points* (product by default,
``zip`` groups advance together), ``where`` conditions drop points, and each point is validated as an ordinary
experiment. Points whose experiments differ only in settings that keep tensor shapes (``INSTANCE_AXES``) form a
*group* that trains as ONE model: every (point, repeat) of the group is one instance, the settings that differ become
zipped instance axes and the repeats a ``seed`` axis. Groups larger than the memory budget are split.

The sweep folder::

    OUT/sweep.json             the spec and the plan (points, groups) -- the source of truth for resuming
    OUT/runs/<group>/          one ordinary run folder per group (``load_run`` opens it), renamed into place when done
    OUT/errors/<group>.json    the one-line error of a group that failed (retried by the next run)
    OUT/results.parquet        one row per point: axis values, status, losses over the repeats, metrics
    OUT/report.html            heatmaps, line plots, threshold read-out, the results table

A group is done exactly when its run folder exists (``runs.run`` builds it in a hidden ``.partial`` sibling and
renames it), so a killed sweep resumes by skipping done groups, and the results table depends only on the plan and
the finished run folders. The figure helpers at the end are pure functions of the results table.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import operator
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from superposition.folder import (
    MAX_TABLE_BYTES,
    SWEEP_FORMAT,
    RunFormatError,
    atomic_write_bytes,
    atomic_write_table,
    checked_file,
)
from superposition.runs import INSTANCES
from superposition.spec import (
    INSTANCE_AXES,
    Experiment,
    SpecError,
    SweepSpec,
    _get_dotted,
    _is_field,
    _set_dotted,
    parse_spec,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from superposition.plots import Polygon
    from superposition.runs import Run

__all__ = [
    "Condition",
    "parse_condition",
    "combinations",
    "Point",
    "Group",
    "Plan",
    "make_plan",
    "describe_plan",
    "estimate_memory",
    "prepare",
    "read_plan",
    "GroupOutcome",
    "run_group",
    "SweepOutcome",
    "execute",
    "physical_cores",
    "collect_results",
    "Sweep",
    "load_sweep",
    "heatmap_figure",
    "lines_figure",
    "threshold_table",
    "render_sweep",
    "BACKENDS",
]

FORMAT = SWEEP_FORMAT
SWEEP_JSON, RESULTS, REPORT = "sweep.json", "results.parquet", "report.html"
RUNS, ERRORS = "runs", "errors"
BACKENDS = ("local", "ray", "slurm")
SEED_STRIDE = 100_003  # the stride of models.instance_seeds: a one-point sweep initialises like a plain run
_PACKABLE_KINDS = ("linear", "relu-output")  # model.kind may vary inside one model only between these


# -- where conditions: a tiny comparison language, parsed by hand (never eval) ---------------------------------------
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<op><=|>=|==|!=|<|>)
    | (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![\w.])
    | (?P<str>"[^"]*"|'[^']*')
    | (?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)
    )""",
    re.VERBOSE,
)


class Operand(NamedTuple):
    """A name to look up (a dotted field or a label), or a literal value."""

    name: str | None
    value: Any = None


class Condition(NamedTuple):
    """A parsed ``where`` condition: operands joined by comparisons (``a <= b < c`` means both hold)."""

    text: str
    operands: tuple[Operand, ...]
    ops: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        """The names the condition looks up."""
        return [o.name for o in self.operands if o.name is not None]

    def holds(self, lookup: Callable[[str], Any]) -> bool:
        """Whether the condition holds, reading names through ``lookup``."""
        values = [lookup(o.name) if o.name is not None else o.value for o in self.operands]
        for a, op, b in zip(values, self.ops, values[1:], strict=False):
            try:
                ok = _OPS[op](a, b)
            except TypeError:
                raise SpecError(f"sweep.where: {self.text!r} compares {a!r} with {b!r}") from None
            if not ok:
                return False
        return True


def parse_condition(text: str) -> Condition:
    """Parse ``NAME OP VALUE`` (names: dotted fields or labels; values: numbers, quoted strings, true/false)."""
    hint = "expected e.g. 'model.d_hidden <= model.n_features'"
    tokens: list[tuple[str, str]] = []
    pos = 0
    while text[pos:].strip():
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup is None:
            raise SpecError(f"sweep.where: cannot read {text!r} at {text[pos:].strip()!r} ({hint})")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    operands: list[Operand] = []
    ops: list[str] = []
    for i, (kind, tok) in enumerate(tokens):
        if (i % 2 == 1) != (kind == "op"):
            raise SpecError(f"sweep.where: {text!r} is not a comparison ({hint})")
        if kind == "op":
            ops.append(tok)
        elif kind == "num":
            operands.append(Operand(None, int(tok) if re.fullmatch(r"[-+]?\d+", tok) else float(tok)))
        elif kind == "str":
            operands.append(Operand(None, tok[1:-1]))
        elif tok in ("true", "false"):
            operands.append(Operand(None, tok == "true"))
        else:
            operands.append(Operand(tok))
    if not ops or len(operands) != len(ops) + 1:
        raise SpecError(f"sweep.where: {text!r} is not a comparison ({hint})")
    return Condition(text, tuple(operands), tuple(ops))


# -- expansion ---------------------------------------------------------------------------------------------------
def _blocks(sweep: SweepSpec) -> list[list[str]]:
    """Names in product order; names zipped together form one block (placed where its first name appears)."""
    group_of = {name: list(g) for g in sweep.zip for name in g}
    blocks: list[list[str]] = []
    seen: set[str] = set()
    for name in [*sweep.axes, *sweep.labels]:
        if name in seen:
            continue
        block = group_of.get(name, [name])
        seen.update(block)
        blocks.append(block)
    return blocks


def _values(sweep: SweepSpec, name: str) -> list[Any]:
    return list(sweep.axes[name]) if name in sweep.axes else list(sweep.labels[name])


def combinations(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the sweep's axes and labels, in order (last block fastest), before ``where``."""
    per_block = []
    for block in _blocks(sweep):
        columns = [_values(sweep, n) for n in block]
        per_block.append([dict(zip(block, row, strict=True)) for row in zip(*columns, strict=True)])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*per_block)]


def _copy(raw: Any) -> Any:
    return json.loads(json.dumps(raw))


def _point_raw(base: dict[str, Any], combo: dict[str, Any], labels: Mapping[str, Any]) -> dict[str, Any]:
    """The raw experiment of one combination: the base spec with the axis values set."""
    raw = _copy(base)
    for key, value in combo.items():
        if key not in labels:
            _set_dotted(raw, key, _copy(value))
    # Hierarchy data fixes the feature count: follow the tree depth unless the sweep sets n_features itself.
    data = raw.get("data") or {}
    touched = {"data.tree_depth", "data.kind"} & combo.keys()
    if data.get("kind") == "hierarchy" and touched and "model.n_features" not in combo:
        depth = data.get("tree_depth")
        if isinstance(depth, int) and not isinstance(depth, bool) and 1 <= depth <= 16:
            raw["model"]["n_features"] = 2 ** (depth + 1) - 2
    return raw


# -- memory and work estimates -----------------------------------------------------------------------------------
def _per_instance(spec: Experiment) -> tuple[int, float]:
    """(estimated training bytes, relative work) of one instance of an experiment."""
    m, t = spec.model, spec.train
    n, h = m.n_features, m.d_hidden
    b = min(t.batch_size, spec.data.dataset_size or t.batch_size)  # a smaller fixed training set is the whole batch
    if m.kind == "residual-mlp":
        e, L = int(m.d_embed or n), m.n_layers
        params = L * 2 * h * e + (L * h if m.bias_hidden else 0) + (L * e if m.bias_out else 0)
        buffers = n * e
        act = b * (3 * n + (2 + 2 * L) * e + 3 * L * h)
        work = float(b) * (2 * n * e + 2 * L * h * e) * 3
    else:
        params = h * n * (1 if m.tied else 2) + (n if m.bias_out else 0) + (h if m.bias_hidden else 0)
        buffers = 0
        act = b * (6 * n + 3 * h)
        work = float(b) * (2 * n * h + 4 * n) * 3
    data = (spec.data.dataset_size or 0) * n
    itemsize = 2 if spec.dtype == "bfloat16" else 4
    # parameter + gradient + two Adam moments; activations of one step (kept for backward); a fixed data set.
    return itemsize * (4 * params + buffers + act + data), work * t.steps


def estimate_memory(spec: Experiment) -> int:
    """Estimated peak training memory of an experiment in bytes (parameters, Adam state, one step's activations)."""
    return _per_instance(spec)[0] * spec.n_instances


# -- the plan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One point of the sweep: its axis values, its group, or why it could not be planned."""

    index: int
    values: dict[str, Any]
    group: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Group:
    """Points of equal shapes packed into one model: its spec and which (point, repeat) each instance is."""

    id: str
    spec: dict[str, Any]
    members: list[tuple[int, int]]
    memory: int
    work: float

    @property
    def points(self) -> list[int]:
        """The point indices of this group, in order."""
        return list(dict.fromkeys(p for p, _ in self.members))

    def experiment(self) -> Experiment:
        """The packed experiment this group trains."""
        return parse_spec(self.spec)


@dataclass(frozen=True)
class Plan:
    """Points, the groups they are packed into, and how many combinations ``where`` dropped."""

    columns: list[str]
    points: list[Point]
    groups: list[Group]
    dropped: int = 0
    repeats: int = 1

    def group(self, group_id: str) -> Group:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise SpecError(f"no group {group_id!r} in this sweep")

    @property
    def n_invalid(self) -> int:
        return sum(p.error is not None for p in self.points)

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "dropped": self.dropped,
            "repeats": self.repeats,
            "points": [{"index": p.index, "values": p.values, "group": p.group, "error": p.error} for p in self.points],
            "groups": [
                {
                    "id": g.id,
                    "memory": g.memory,
                    "work": g.work,
                    "members": [list(m) for m in g.members],
                    "spec": g.spec,
                }
                for g in self.groups
            ],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Plan:
        return cls(
            columns=list(raw["columns"]),
            points=[Point(p["index"], p["values"], p["group"], p["error"]) for p in raw["points"]],
            groups=[
                Group(g["id"], g["spec"], [(int(a), int(b)) for a, b in g["members"]], int(g["memory"]), g["work"])
                for g in raw["groups"]
            ],
            dropped=int(raw["dropped"]),
            repeats=int(raw["repeats"]),
        )


class _Member(NamedTuple):
    point: int
    repeat: int
    seed: int
    settings: dict[str, Any]


def _group_key(spec: Experiment) -> str:
    """Everything that must be equal for experiments to share one model: all but the instance-axis settings."""
    raw = spec.model_dump(mode="json")
    for key in ("name", "description", "seed", "instances", "sweep"):
        raw.pop(key, None)
    for key in INSTANCE_AXES:
        if key == "seed" or (key == "model.kind" and spec.model.kind not in _PACKABLE_KINDS):
            continue
        _set_dotted(raw, key, None)
    return json.dumps(raw, sort_keys=True)


def _members(spec: Experiment, first_point: int, repeats: int) -> list[_Member]:
    """One member per (base instance, repeat) of a validated point experiment."""
    keys = [k for k in INSTANCE_AXES if k != "seed"]
    settings = {k: spec.instance_values(k) for k in keys}
    grid = spec.grid()
    seeded = "seed" in spec.instances.axes
    out = []
    for i, point in enumerate(grid):
        for r in range(repeats):
            seed = int(point["seed"]) if seeded else spec.seed * SEED_STRIDE + i * repeats + r
            out.append(_Member(first_point + i, r, seed, {k: settings[k][i] for k in keys}))
    return out


def _pack(first: Experiment, members: list[_Member], base: Experiment, gid: str) -> dict[str, Any]:
    """The raw experiment of a group: shared settings as scalars, differing ones as zipped instance axes."""
    raw = first.model_dump(mode="json")
    raw["sweep"] = None
    raw["seed"] = base.seed
    raw["name"] = f"{base.name}/{gid}"[:200]
    axes: dict[str, list[Any]] = {}
    for key in INSTANCE_AXES:
        if key == "seed":
            continue
        values = [m.settings[key] for m in members]
        if len({json.dumps(v) for v in values}) == 1:
            _set_dotted(raw, key, _copy(values[0]))
        else:
            axes[key] = _copy(values)
    axes["seed"] = [m.seed for m in members]
    raw["instances"] = {"combine": "zip", "axes": axes}
    return raw


def make_plan(spec: Experiment) -> Plan:
    """Expand a spec's sweep into points, validate each, and pack equal shapes into groups."""
    sweep = spec.sweep or SweepSpec()
    conditions = [parse_condition(text) for text in sweep.where]
    for cond in conditions:
        for name in cond.names:
            if name not in sweep.labels and not _is_field(name):
                raise SpecError(f"sweep.where: {cond.text!r} names {name!r}, which is neither a field nor a label")
    base_axes = list(spec.instances.axes)
    for key in base_axes:
        if key in sweep.axes:
            raise SpecError(f"sweep.axes.{key}: also an [instances] axis; give it in one place")
    if "seed" in base_axes and sweep.repeats > 1:
        raise SpecError("sweep.repeats: [instances] already has a seed axis; use one or the other")
    base = spec.model_dump(mode="json")
    base["sweep"] = None
    columns = [n for block in _blocks(sweep) for n in block] + base_axes

    points: list[Point] = []
    buckets: dict[str, list[tuple[Experiment, list[_Member]]]] = {}
    dropped = 0
    for combo in combinations(sweep):
        raw = _point_raw(base, combo, sweep.labels)

        def lookup(name: str, combo: dict[str, Any] = combo, raw: dict[str, Any] = raw) -> Any:
            if name in sweep.labels:
                return combo[name]
            return _get_dotted(raw, name)

        if not all(c.holds(lookup) for c in conditions):
            dropped += 1
            continue
        try:
            experiment = parse_spec(raw)
        except SpecError as exc:
            points.append(Point(len(points), _copy(combo), None, str(exc)))
            continue
        first = len(points)
        for inst in experiment.grid():
            points.append(Point(len(points), _copy({**combo, **inst})))
        members = _members(experiment, first, sweep.repeats)
        buckets.setdefault(_group_key(experiment), []).append((experiment, members))

    budget = sweep.memory_budget_mb * 2**20
    chunks: list[tuple[Experiment, list[_Member]]] = []
    for cells in buckets.values():
        per_inst, _ = _per_instance(cells[0][0])
        per_point = per_inst * sweep.repeats
        cap = max(1, int(budget // per_point)) if per_point else 1 << 30
        members = [m for _, ms in cells for m in ms]
        point_ids = list(dict.fromkeys(m.point for m in members))
        for start in range(0, len(point_ids), cap):
            chosen = set(point_ids[start : start + cap])
            chunks.append((cells[0][0], [m for m in members if m.point in chosen]))

    width = max(4, len(str(len(chunks) - 1)))
    groups: list[Group] = []
    failed: dict[int, str] = {}
    for i, (first, members) in enumerate(chunks):
        gid = f"g{i:0{width}d}"
        raw = _pack(first, members, spec, gid)
        try:
            packed = parse_spec(raw)
        except SpecError as exc:  # should not happen: every point validated on its own
            for m in members:
                failed[m.point] = f"cannot pack: {exc}"
            continue
        per_inst, work = _per_instance(packed)
        pairs = [(m.point, m.repeat) for m in members]
        groups.append(Group(gid, packed.model_dump(mode="json"), pairs, per_inst * len(members), work * len(members)))
    owner = {p: g.id for g in groups for p, _ in g.members}
    points = [
        Point(p.index, p.values, owner.get(p.index), p.error or failed.get(p.index)) if p.error is None else p
        for p in points
    ]
    return Plan(columns, points, groups, dropped, sweep.repeats)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _shape(group: Group) -> str:
    s = group.spec
    m, d = s["model"], s["data"]
    text = f"{m['kind']} n={m['n_features']} h={m['d_hidden']}"
    if m["kind"] == "residual-mlp":
        text += f" e={m['d_embed']} L={m['n_layers']}"
    text += f" data={d['kind']}"
    if d["kind"] == "hierarchy":
        text += f" depth={d['tree_depth']}" + (" early-stop" if d["early_stopping"] else "")
    return text


def describe_plan(plan: Plan, *, groups: bool = False) -> str:
    """The plan in a few lines (and, with ``groups``, one line per group)."""
    n_ok = sum(p.group is not None for p in plan.points)
    inst = sum(len(g.members) for g in plan.groups)
    lines = [
        f"plan: {len(plan.points)} point(s) x {plan.repeats} repeat(s) packed into {len(plan.groups)} model(s) "
        f"({inst} instances); {plan.dropped} combination(s) dropped by where, {plan.n_invalid} invalid"
    ]
    if plan.groups:
        big = max(plan.groups, key=lambda g: g.memory)
        steps = sum(int(g.spec["train"]["steps"]) for g in plan.groups)
        lines.append(
            f"estimated memory: {_fmt_bytes(big.memory)} for the largest model ({big.id}), "
            f"{_fmt_bytes(sum(g.memory for g in plan.groups))} for all; {steps:,} training steps in all"
        )
    if n_ok < len(plan.points):
        for p in plan.points:
            if p.error is not None:
                lines.append(f"  invalid point {p.index} {_point_label(p.values)}: {p.error}")
    if groups:
        for g in plan.groups:
            lines.append(
                f"  {g.id}  {len(g.points):>4} point(s) {len(g.members):>5} instance(s)  "
                f"{_fmt_bytes(g.memory):>10}  {_shape(g)}"
            )
    return "\n".join(lines)


def _point_label(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


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


def _read_meta(out: Path) -> dict[str, Any]:
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


def _n_combinations(sweep: SweepSpec) -> int:
    """How many combinations ``combinations`` would give, without listing them."""
    return math.prod(len(_values(sweep, block[0])) for block in _blocks(sweep))


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
    """A plan without its groups' estimates: what a stored plan must share with a fresh ``make_plan``."""
    groups = plan.get("groups")
    if not isinstance(groups, list):
        return plan
    stripped = [{k: v for k, v in g.items() if k not in _ESTIMATES} if isinstance(g, dict) else g for g in groups]
    return {**plan, "groups": stripped}


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
    combos = _n_combinations(sweep)
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
    return _validated(out, _read_meta(out))[1]


def prepare(spec: Experiment, out: str | Path, *, resume: bool = False) -> Plan:
    """Create the sweep folder with its plan, or reopen it when it holds the same spec (a rerun resumes)."""
    from superposition.version import __version__

    out = Path(out)
    spec_json = spec.model_dump(mode="json")
    if (out / SWEEP_JSON).exists():
        meta = _read_meta(out)
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


def _done(out: Path, group_id: str) -> bool:
    return _group_dir(out, group_id) is not None


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
    if _done(out, group_id):
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
    progress: bool = False,
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
    todo = [g for g in plan.groups if not _done(out, g.id)]
    todo.sort(key=lambda g: -g.work)  # longest first: better packing of the workers, honest ETA at the end
    n_skipped = len(plan.groups) - len(todo)
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(len(g.points) for g in plan.groups)
        finished = total - sum(len(g.points) for g in todo)
        bar = tqdm(total=total, initial=finished, unit="point", desc="sweep", dynamic_ncols=True)
    size = {g.id: len(g.points) for g in plan.groups}

    def done(result: GroupOutcome) -> None:
        counts[result.status] += 1
        if bar is not None:
            bar.update(size[result.group])
            if counts["failed"]:
                bar.set_postfix(failed=counts["failed"])

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
    spec = parse_spec(_read_meta(out)["spec"])
    atomic_write_bytes(out / REPORT, (render_sweep(spec, plan, results, out)).encode())
    return SweepOutcome(
        plan, results, counts["ok"], counts["failed"], n_skipped + counts["skipped"], time.perf_counter() - start
    )


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
        if _done(out, g.id):
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
        return [gid for gid in self._ids_planned if _done(self._out, gid)]

    def __getitem__(self, key: str) -> Run:
        if key not in self._cache:
            if key not in self._ids_planned or not _done(self._out, key):
                raise KeyError(key)
            from superposition.runs import load_run

            self._cache[key] = load_run(self._out / RUNS / key)
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids())

    def __len__(self) -> int:
        return len(self._ids())


@dataclass
class Sweep:
    """A sweep folder opened: its spec, plan, results table and run folders (``runs[group_id]``)."""

    path: Path
    spec: Experiment
    plan: Plan
    results: pd.DataFrame
    runs: Mapping[str, Run] = field(repr=False)

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
    spec, plan = _validated(path, _read_meta(path))
    results_file = path / RESULTS
    if not results_file.exists() and not results_file.is_symlink():
        raise RunFormatError(
            f"{path}: {RESULTS} is missing (the sweep did not finish); rerun "
            f"`superposition sweep SPEC --out {path} --resume` to rebuild it"
        )
    results = _read_parquet(checked_file(path, RESULTS, MAX_TABLE_BYTES, "sweep"), results_file)
    _check_results(results_file, results, plan)
    return Sweep(path, spec, plan, results, _Runs(path, plan))


# -- figures and the report (pure functions of the results table) -------------------------------------------------
def _numeric_axes(spec: Experiment) -> list[str]:
    sweep = spec.sweep or SweepSpec()
    return [
        k
        for k, v in sweep.axes.items()
        if len(set(map(json.dumps, v))) > 1 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    ]


def report_axes(spec: Experiment) -> tuple[str | None, str | None, str | None]:
    """(x, y, by) of the report: as given in [sweep.report], else picked from the axes."""
    sweep = spec.sweep or SweepSpec()
    r = sweep.report
    numeric = _numeric_axes(spec)
    x = r.x or (numeric[-1] if numeric else None)
    y = r.y or next((a for a in reversed(numeric) if a != x), None)
    by = r.by or next((k for k, v in sweep.labels.items() if len(v) > 1), None)
    return x, y, by


def _ok(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    if metric not in results.columns:
        raise SpecError(f"sweep.report.metric: no column {metric!r} in the results")
    return results[(results["status"] == "ok") & np.isfinite(results[metric].astype(float))]


def _aggregate(results: pd.DataFrame, keys: list[str], metric: str, agg: str) -> pd.DataFrame:
    df = _ok(results, metric)
    return df.groupby(keys, sort=True)[metric].agg(agg).reset_index()


def _log(values: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    return np.log10(np.maximum(values, floor))


def heatmap_figure(
    results: pd.DataFrame,
    x: str,
    y: str,
    metric: str = "loss_min",
    *,
    agg: str = "min",
    log: bool = True,
    title: str | None = None,
) -> go.Figure:
    """A metric over two axes (``agg`` over the other axes of points sharing a cell; log10 colour by default)."""
    import plotly.graph_objects as go

    cells = _aggregate(results, [y, x], metric, agg)
    pivot = cells.pivot(index=y, columns=x, values=metric)
    z = pivot.to_numpy(dtype=float)
    shown = _log(z) if log else z
    label = f"log10 {metric}" if log else metric
    text = [[("" if math.isnan(v) else f"{v:.3g}") for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=shown,
            x=[str(v) for v in pivot.columns],
            y=[str(v) for v in pivot.index],
            text=text,
            texttemplate="%{text}",
            colorscale="Viridis",
            colorbar={"title": {"text": label}},
            hovertemplate=f"{x}=%{{x}}<br>{y}=%{{y}}<br>{metric}=%{{text}}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"{metric} ({agg} over repeats and other axes) by {y} and {x}",
        xaxis={"title": x, "type": "category"},
        yaxis={"title": y, "type": "category"},
        template="plotly_white",
        height=420,
    )
    return fig


def lines_figure(
    results: pd.DataFrame,
    x: str,
    by: str,
    metric: str = "loss_min",
    *,
    agg: str = "min",
    log: bool = True,
    title: str | None = None,
) -> go.Figure:
    """A metric against one axis, one line per value of another."""
    import plotly.graph_objects as go

    cells = _aggregate(results, [by, x], metric, agg)
    fig = go.Figure()
    for value, part in cells.groupby(by, sort=True):
        fig.add_trace(go.Scatter(x=part[x], y=part[metric], mode="lines+markers", name=f"{by}={value}"))
    fig.update_layout(
        title=title or f"{metric} ({agg} over repeats and other axes) against {x}",
        xaxis={"title": x},
        yaxis={"title": metric, "type": "log" if log else "linear"},
        template="plotly_white",
        height=420,
    )
    return fig


def threshold_table(
    results: pd.DataFrame,
    x: str,
    y: str,
    metric: str = "loss_min",
    threshold: float = 1e-5,
    *,
    by: str | None = None,
) -> pd.DataFrame:
    """For each value of ``y``, the smallest ``x`` whose metric (min over other axes) is below ``threshold``.

    One column per value of ``by`` (or one column, ``metric``); NaN where no tested ``x`` reaches the threshold.
    """
    keys = [k for k in (by, y, x) if k is not None]
    cells = _aggregate(results, keys, metric, "min")
    below = cells[cells[metric] < threshold]
    ys = sorted(_ok(results, metric)[y].unique())
    columns = sorted(_ok(results, metric)[by].unique(), key=_order(results, by)) if by is not None else [None]
    table: dict[str, list[Any]] = {y: ys}
    for col in columns:
        part = below if col is None else below[below[by] == col]
        best = part.groupby(y)[x].min()
        table[metric if col is None else str(col)] = [best.get(v, math.nan) for v in ys]
    return pd.DataFrame(table)


def _order(results: pd.DataFrame, column: str | None) -> Callable[[Any], int]:
    """Sort key: a column's values in their order of first appearance in the table (the sweep's order)."""
    first = {} if column is None else {v: i for i, v in reversed(list(enumerate(results[column])))}
    return lambda v: first.get(v, len(first))


def threshold_display(table: pd.DataFrame, results: pd.DataFrame, x: str, y: str, by: str | None) -> pd.DataFrame:
    """A threshold table for people: whole numbers, and 'none <= X' (the largest x tested) where none reached it."""
    shown = table.copy()
    for col in shown.columns[1:]:
        part = results if by is None else results[results[by].astype(str) == col]
        tested = part[part["status"] == "ok"].groupby(y)[x].max()
        shown[col] = [
            (f"{int(v)}" if float(v).is_integer() else f"{v}") if not math.isnan(v) else f"none <= {tested.get(yv)}"
            for yv, v in zip(shown[y], shown[col], strict=True)
        ]
    return shown


# -- training points and features of fixed training sets (double descent) ------------------------------------------
class TrainingGeometry(NamedTuple):
    """The best repeat (lowest test loss) of one training-set size: its feature vectors, its training points'
    hidden vectors and how both sit around the origin (``plots.polygon_stats``)."""

    dataset_size: int
    point: int
    repeat: int
    loss: float
    train_loss: float
    """Loss of the final weights on the rebuilt training set (equals the recorded one when the rebuild is right and
    the last step was full-batch with a vanishing learning rate)."""
    recorded_train_loss: float
    features: np.ndarray
    """(2, feats): the feature vectors W_i (columns of the encoder)."""
    hidden: np.ndarray
    """(T, 2): h_t = W x_t of every training point x_t."""
    feature_shape: Polygon
    data_shape: Polygon
    label: str
    """The point's other varying axis values ("" when T is the only one)."""


def _best_per_size(plan: Plan, results: pd.DataFrame) -> pd.DataFrame:
    """The finished points of 2-D bottleneck groups with a fixed training set, the lowest loss_min per size (``_T``)."""
    groups = {g.id: g for g in plan.groups}

    def size(gid: Any) -> int | None:
        g = groups.get(str(gid))
        if g is None:
            return None
        d, m = g.spec["data"], g.spec["model"]
        fits = d.get("dataset_size") is not None and m["d_hidden"] == 2 and m["kind"] in _PACKABLE_KINDS
        return int(d["dataset_size"]) if fits else None

    ok = results[(results["status"] == "ok") & results["best_repeat"].notna()]
    sizes = [size(g) for g in ok["group"]]
    ok = ok.assign(_T=sizes)[[s is not None for s in sizes]]
    return ok.sort_values(["_T", "loss_min", "point"]).drop_duplicates("_T")


def training_geometry_data(out: str | Path, plan: Plan, results: pd.DataFrame) -> list[TrainingGeometry]:
    """For each training-set size T of the 2-D bottleneck groups with a fixed training set, the best repeat over the
    points with that T, its weights and its training set rebuilt from the group's spec (``TrainState.create`` draws
    it from the seed, on the CPU). Groups trained on CUDA before training sets were drawn on the CPU are rebuilt on CUDA
    and left out where none is available. Loads nothing when no group fits."""
    import torch

    from superposition.plots import polygon_stats
    from superposition.runs import load_run
    from superposition.train import TrainState

    out = Path(out)
    groups = {g.id: g for g in plan.groups}
    best = _best_per_size(plan, results)
    varying = [c for c in plan.columns if c != "data.dataset_size" and results[c].nunique(dropna=False) > 1]
    found: list[TrainingGeometry] = []
    for _, row in best.iterrows():
        g = groups[str(row["group"])]
        point, repeat = int(row["point"]), int(row["best_repeat"])
        inst = [i for i, (p, _) in enumerate(g.members) if p == point][repeat]
        run = load_run(out / RUNS / g.id)
        # Training sets are drawn on the CPU since dataset_device was recorded; older CUDA runs drew theirs on CUDA.
        device = torch.device(run.meta.get("dataset_device") or run.meta["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            continue
        state = TrainState.create(run.spec, device)
        with torch.no_grad():
            state.model.load_state_dict(run.model.state_dict())
            train_loss = float(state.loss(state.dataset)[inst])
            x = state.dataset[:, inst].double().cpu().numpy()
        W = run.model.encoder.detach()[inst].double().cpu().numpy()
        H = x @ W.T
        found.append(
            TrainingGeometry(
                dataset_size=int(row["_T"]),
                point=point,
                repeat=repeat,
                loss=float(run.instances["loss"].iloc[inst]),
                train_loss=train_loss,
                recorded_train_loss=float(run.instances["train_loss"].iloc[inst]),
                features=W,
                hidden=H,
                feature_shape=polygon_stats(W.T),
                data_shape=polygon_stats(H),
                label=", ".join(f"{c}={row[c]}" for c in varying),
            )
        )
    return found


def pick_sizes(losses: list[float], limit: int = 6) -> list[int]:
    """Indices of at most ``limit`` entries (sorted by T): the first, the last, the highest loss, and evenly spread
    ones in between."""
    n = len(losses)
    if n <= limit:
        return list(range(n))
    chosen = set(np.round(np.linspace(0, n - 1, limit)).astype(int).tolist())
    peak = int(np.nanargmax(np.asarray(losses, dtype=np.float64)))
    if peak not in chosen:
        inner = sorted(chosen - {0, n - 1}, key=lambda i: (abs(i - peak), i))
        chosen.discard(inner[0])
        chosen.add(peak)
    return sorted(chosen)


def _shape_text(s: Polygon) -> str:
    irregular = f", irregularity {s.irregularity:.2f}" if s.directions >= 2 else ""
    return f"{s.n_long} of {s.n} long in {s.directions} direction(s){irregular}, largest norm {s.max_norm:.3g}"


def _training_geometry_sections(out: str | Path | None, plan: Plan, results: pd.DataFrame) -> list[Any]:
    """The report section of sweeps over fixed 2-D training sets (none for other sweeps or without the folder)."""
    from superposition.plots import training_geometry
    from superposition.report import Section

    data = training_geometry_data(out, plan, results) if out is not None else []
    if not data:
        return []
    chosen = [data[i] for i in pick_sizes([d.loss for d in data])]
    peak = max(data, key=lambda d: d.loss).dataset_size
    titles = [f"T = {d.dataset_size}" + (f" ({d.label})" if d.label else "") + f", loss {d.loss:.3g}" for d in chosen]
    figure = training_geometry([d.features for d in chosen], [d.hidden for d in chosen], titles)
    paragraphs = [
        "For each training-set size T, the repeat with the lowest test loss: its feature vectors W_i (blue arrows) "
        "and the hidden vectors h_t = W x_t of its training points (red dots), training sets rebuilt from the seeds. "
        f"Panels: the smallest T, the test-loss peak (T = {peak}), the largest T and evenly spread sizes between.",
        "What to look for: at small T (memorising) the training points sit at the corners of a regular polygon and "
        "the features are shorter, the longest along the training points' directions; at large T (generalising) a "
        "few long features form the polygon, the rest stay near 0, and the training points, sums of several "
        "features, do not. The table counts it: few directions with irregularity near 0 is a polygon; many "
        "directions (up to 36, each at most 10° wide) with a high irregularity is a spread.",
        *(
            f"T = {d.dataset_size}: training points {_shape_text(d.data_shape)}; "
            f"features {_shape_text(d.feature_shape)}."
            for d in chosen
        ),
    ]
    missing = len(_best_per_size(plan, results)) - len(data)
    if missing:
        paragraphs.append(f"{missing} training-set size(s) trained on CUDA are left out: no CUDA device here.")
    table = pd.DataFrame(
        {
            "T": [d.dataset_size for d in data],
            "point": [d.point for d in data],
            "repeat": [d.repeat for d in data],
            "loss": [d.loss for d in data],
            "train_loss": [d.recorded_train_loss for d in data],
            "train_loss_rebuilt": [d.train_loss for d in data],
            "points_long": [d.data_shape.n_long / max(d.data_shape.n, 1) for d in data],
            "points_directions": [d.data_shape.directions for d in data],
            "points_irregularity": [d.data_shape.irregularity for d in data],
            "points_max_norm": [d.data_shape.max_norm for d in data],
            "features_long": [d.feature_shape.n_long for d in data],
            "features_directions": [d.feature_shape.directions for d in data],
            "features_irregularity": [d.feature_shape.irregularity for d in data],
            "features_max_norm": [d.feature_shape.max_norm for d in data],
            **({"other axes": [d.label for d in data]} if any(d.label for d in data) else {}),
        }
    )
    definitions = [
        ("long", "norm above half the largest norm of the set (points: as a fraction of T; features: a count)"),
        ("directions", "groups of the long vectors' angles, each at most 10° wide (plots.polygon_stats)"),
        (
            "irregularity",
            "(widest − narrowest angle between neighbouring directions) / (360° / directions); 0 = regular",
        ),
        (
            "train_loss_rebuilt",
            "loss of the final weights on the rebuilt training set; matches train_loss when the "
            "rebuild is right (exactly after a full-batch last step at learning rate 0, as with warmup-cosine)",
        ),
    ]
    return [
        Section(
            "Training points and features",
            paragraphs=paragraphs,
            tables=[table],
            figures=[figure],
            definitions=definitions,
        )
    ]


def write_sweep_report(out: str | Path) -> Path:
    """Rebuild a finished sweep folder's report.html (atomically) from its stored spec, plan and results."""
    out = Path(out)
    result = load_sweep(out)
    atomic_write_bytes(out / REPORT, (render_sweep(result.spec, result.plan, result.results, out)).encode())
    return out / REPORT


def render_sweep(spec: Experiment, plan: Plan, results: pd.DataFrame, out: str | Path | None = None) -> str:
    """The sweep's report.html: plan, threshold read-out, heatmaps and lines per panel value, training geometry
    (fixed 2-D training sets; needs the folder ``out``), results, failures."""
    from superposition.report import Section, render_page

    sweep = spec.sweep or SweepSpec()
    r = sweep.report
    x, y, by = report_axes(spec)
    status = results["status"].value_counts().to_dict()
    sections = [
        Section("About", paragraphs=[p for p in spec.description.split("\n") if p.strip()]),
        Section(
            "Plan",
            paragraphs=[
                *describe_plan(plan).splitlines(),
                "Status of the points: " + ", ".join(f"{k} {v}" for k, v in sorted(status.items())) + ".",
                "Each point's loss is the per-instance final loss (mean over the features and over "
                f"train.eval_batch fresh samples); loss_min/loss_mean are over its {plan.repeats} repeat(s), "
                "loss_sum is the sum over the repeats.",
            ],
        ),
    ]
    ok = _ok(results, r.metric) if r.metric in results.columns else results.iloc[:0]
    panels = [None] if by is None else list(dict.fromkeys(results[by]))
    if x and y and len(ok):
        if r.threshold is not None:
            table = threshold_table(results, x, y, r.metric, r.threshold, by=by)
            sections.append(
                Section(
                    f"Threshold: smallest {x} with {r.metric} < {r.threshold:g}",
                    paragraphs=[f"For each {y}, the smallest {x} whose {r.metric} is below {r.threshold:g}."],
                    tables=[threshold_display(table, results, x, y, by)],
                )
            )
        figures = []
        for value in panels:
            part = results if value is None else results[results[by] == value]
            if len(_ok(part, r.metric)):
                suffix = "" if value is None else f" ({by}={value})"
                figures.append(
                    heatmap_figure(part, x, y, r.metric, log=r.log, title=f"{r.metric} by {y} and {x}{suffix}")
                )
        sections.append(Section("Heatmaps", figures=figures))
        lines = []
        for value in panels:
            part = results if value is None else results[results[by] == value]
            if len(_ok(part, r.metric)):
                suffix = "" if value is None else f" ({by}={value})"
                lines.append(lines_figure(part, x, y, r.metric, log=r.log, title=f"{r.metric} against {x}{suffix}"))
        sections.append(Section("Lines", figures=lines))
    elif x and len(ok):
        sections.append(
            Section("Lines", figures=[lines_figure(results.assign(_all="all"), x, "_all", r.metric, log=r.log)])
        )
    sections.extend(_training_geometry_sections(out, plan, results))
    sections.append(Section("Results", tables=[results]))
    failed = results[results["status"].isin(["failed", "invalid"])]
    if len(failed):
        sections.append(Section("Failures", tables=[failed[["point", *plan.columns, "status", "error"]]]))
    sections.append(Section("Spec", preformatted=spec.to_json()))
    return render_page(f"sweep: {spec.name}", sections)
