"""The plan of a sweep: ``where`` conditions, the grid's points, the groups that train as one model each
(packing), memory and work estimates, and the plan's text summary."""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from superposition.fast.engine import estimated_eager_seconds
from superposition.folder import format_bytes
from superposition.spec import (
    INSTANCE_AXES,
    Experiment,
    SpecError,
    SweepSpec,
    get_dotted,
    is_field,
    memory_estimate,
    parse_spec,
    set_dotted,
)

SEED_STRIDE = 100_003  # the stride of models.instance_seeds: a one-point sweep initialises like a plain run
PACKABLE_KINDS = ("linear", "relu-output")  # model.kind may vary inside one model only between these


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


def n_combinations(sweep: SweepSpec) -> int:
    """How many combinations ``combinations`` would give, without listing them."""
    return math.prod(len(_values(sweep, block[0])) for block in _blocks(sweep))


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
            set_dotted(raw, key, _copy(value))
    # Hierarchy data fixes the feature count: follow the tree depth unless the sweep sets n_features itself.
    data = raw.get("data") or {}
    touched = {"data.tree_depth", "data.kind"} & combo.keys()
    if data.get("kind") == "hierarchy" and touched and "model.n_features" not in combo:
        depth = data.get("tree_depth")
        if isinstance(depth, int) and not isinstance(depth, bool) and 1 <= depth <= 16:
            raw["model"]["n_features"] = 2 ** (depth + 1) - 2
    return raw


# -- memory and work estimates -----------------------------------------------------------------------------------
def estimate_memory(spec: Experiment) -> int:
    """Estimated peak training memory of an experiment in bytes: :func:`superposition.spec.memory_estimate`'s total
    (the one estimate, also what ``run`` refuses by)."""
    return memory_estimate(spec).total


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
    """Estimated training bytes (superposition.spec.memory_estimate, the one estimate)."""
    work: float
    """Estimated eager training seconds (superposition.fast.engine.estimated_eager_seconds): orders the groups."""

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
        if key == "seed" or (key == "model.kind" and spec.model.kind not in PACKABLE_KINDS):
            continue
        set_dotted(raw, key, None)
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
            set_dotted(raw, key, _copy(values[0]))
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
            if name not in sweep.labels and not is_field(name):
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
            return get_dotted(raw, name)

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
        per_inst = memory_estimate(cells[0][0]).per_instance
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
        per_inst = memory_estimate(packed).per_instance
        work = estimated_eager_seconds(packed, "cpu")  # the engine's eager-time estimate: ordering and ETA
        pairs = [(m.point, m.repeat) for m in members]
        groups.append(Group(gid, packed.model_dump(mode="json"), pairs, per_inst * len(members), work))
    owner = {p: g.id for g in groups for p, _ in g.members}
    points = [
        Point(p.index, p.values, owner.get(p.index), p.error or failed.get(p.index)) if p.error is None else p
        for p in points
    ]
    return Plan(columns, points, groups, dropped, sweep.repeats)


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
            f"estimated memory: {format_bytes(big.memory)} for the largest model ({big.id}), "
            f"{format_bytes(sum(g.memory for g in plan.groups))} for all; {steps:,} training steps in all"
        )
    if n_ok < len(plan.points):
        for p in plan.points:
            if p.error is not None:
                lines.append(f"  invalid point {p.index} {_point_label(p.values)}: {p.error}")
    if groups:
        for g in plan.groups:
            lines.append(
                f"  {g.id}  {len(g.points):>4} point(s) {len(g.members):>5} instance(s)  "
                f"{format_bytes(g.memory):>10}  {_shape(g)}"
            )
    return "\n".join(lines)


def _point_label(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
