"""Bad input never crashes: generated malformed specs and command lines each end with exit code 2, exactly one line on
stderr that names the problem, no traceback, and nothing written.

Specs are generated from the schema itself (every field of every section, found by walking the pydantic models), so
fields added later are fuzzed too: a value of a type the field does not take, a value outside its bounds, NaN and
infinities, unknown keys (unicode included), inconsistent combinations, sizes that cannot fit in memory, and files
that are not specs at all. Command lines cover every command: unknown commands and options, malformed ``--set``,
missing files and folders, folders that are files, bad option values. Everything runs in-process through
``superposition.cli.main(argv)``; two checks run the installed console script.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import types
import typing
from collections import Counter
from pathlib import Path

import annotated_types as at
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import superposition.spec as S
from superposition.cli import app, main

COUNT: Counter[str] = Counter()
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing may be written, not even hypothesis' example database
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)

BASE = {
    "name": "fuzz",
    "model": {"kind": "relu-output", "n_features": 6, "d_hidden": 2},
    "data": {"feature_probability": 0.1},
    "task": {"importance": 0.9},
    "train": {"steps": 3, "batch_size": 4, "log_every": 1, "eval_batch": 4},
}
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


# -- the harness ----------------------------------------------------------------------------------------------------
def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class Harness:
    """Runs one command line in an empty working folder and checks the bad-input contract."""

    def __init__(self, tmp_path: Path, capsys, monkeypatch):
        self.work = tmp_path / "work"
        self.inputs = tmp_path / "inputs"
        self.work.mkdir()
        self.inputs.mkdir()
        self.capsys = capsys
        self.n = 0
        monkeypatch.chdir(self.work)

    def write(self, data, suffix: str = ".json") -> Path:
        self.n += 1
        path = self.inputs / f"spec{self.n}{suffix}"
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_text(json.dumps(data), encoding="utf-8")
        return path

    def refuses(self, argv: list, names: list[str] | tuple[str, ...] = (), test: str = "") -> str:
        """Run argv; exit 2, one stderr line naming one of ``names`` (those that are printable), nothing written."""
        COUNT[test or "other"] += 1
        inputs_before = _tree(self.inputs)
        self.capsys.readouterr()
        code = main([str(a) for a in argv])
        err = self.capsys.readouterr().err
        lines = err.splitlines()
        assert code == 2, f"exit {code} for {argv!r}: {err!r}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{argv!r}: {err!r}"
        assert "Traceback" not in err and "internal error" not in err, err
        shown = [n for n in names if n and n.isprintable()]
        if shown:  # as typed, or as repr() writes it (click quotes an unknown command with repr: a\\b for a\b)
            named = any(n in lines[0] or repr(n)[1:-1] in lines[0] for n in shown)
            assert named, f"{lines[0]!r} names none of {shown!r}"
        assert _tree(self.work) == [], f"{argv!r} wrote {_tree(self.work)}"
        assert _tree(self.inputs) == inputs_before, f"{argv!r} wrote into the inputs"
        return lines[0]


@pytest.fixture
def harness(tmp_path, capsys, monkeypatch):
    return Harness(tmp_path, capsys, monkeypatch)


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory) -> Path | None:
    """A tiny finished run for the commands that need one (only built when the sae command exists)."""
    if "sae" not in COMMANDS:
        return None
    from superposition.runs import run

    out = tmp_path_factory.mktemp("sae-run") / "r"
    run(S.parse_spec({**BASE, "train": {"steps": 3, "batch_size": 4, "eval_batch": 4}}), out)
    return out


def _with(raw: dict, path: str, value) -> dict:
    """A deep copy of raw with the dotted path set to value (sections created as needed)."""
    out = json.loads(json.dumps(raw))
    node = out
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _merge(raw: dict, patch: dict) -> dict:
    out = json.loads(json.dumps(raw))
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "instances":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _toml_str(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, everything else as it is (json.dumps
    would write characters beyond the BMP as surrogate pairs, which TOML rejects; the CLI then takes the whole text as
    a string, which a string field rightly accepts)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml(v) -> str:
    """A TOML value (for --set)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


# -- the schema, walked -----------------------------------------------------------------------------------------------
ALL_KINDS = {"int", "float", "bool", "str", "list", "dict", "null"}


def _accepts(ann) -> tuple[set[str], set[str] | None]:
    """The JSON kinds a field annotation takes (strict mode), and its literal choices when it takes only those."""
    origin = typing.get_origin(ann)
    if ann is typing.Any:
        return set(ALL_KINDS), None
    if origin is typing.Literal:
        return {"literal"}, {str(a) for a in typing.get_args(ann)}
    if origin in (typing.Union, types.UnionType):
        kinds: set[str] = set()
        choices: set[str] = set()
        for arg in typing.get_args(ann):
            k, c = _accepts(arg)
            kinds |= k
            choices |= c or set()
        return kinds, choices or None
    if ann is type(None):
        return {"null"}, None
    if ann is bool:
        return {"bool"}, None
    if ann is int:
        return {"int"}, None
    if ann is float:
        return {"int", "float"}, None
    if ann is str:
        return {"str"}, None
    if origin is list:
        return {"list"}, None
    if origin is dict or (isinstance(ann, type) and issubclass(ann, BaseModel)):
        return {"dict"}, None
    raise AssertionError(f"unhandled annotation {ann!r}")


def _section_of(ann) -> type[BaseModel] | None:
    if typing.get_origin(ann) is list:  # a list of tables (train.phases) is fuzzed as a list, not as a section
        return None
    for arg in (ann, *typing.get_args(ann)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _fields(model: type[BaseModel] = S.Experiment, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted path, FieldInfo) of every field of the schema; the [instances] section is fuzzed by hand."""
    out = []
    for name, info in model.model_fields.items():
        path = prefix + name
        if model is S.Experiment and name == "instances":
            continue
        out.append((path, info))
        section = _section_of(info.annotation)
        if section is not None:
            out.extend(_fields(section, path + "."))
    return out


FIELDS = _fields()
SCALARS = [(p, i) for p, i in FIELDS if _section_of(i.annotation) is None]

BAD_OF_KIND = {
    "int": st.integers(-(10**12), 10**12),
    "float": st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
    "bool": st.booleans(),
    "str": st.text(max_size=20),
    "literal": st.text(max_size=20),
    "list": st.lists(st.integers(0, 5), max_size=3),
    "dict": st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 3), max_size=2),
    "null": st.none(),
}


@st.composite
def wrong_type(draw):
    """A field and a value of a JSON kind it does not take (or a string outside its literal choices)."""
    path, info = draw(st.sampled_from(FIELDS))
    kinds, choices = _accepts(info.annotation)
    if "float" in kinds:
        kinds = kinds | {"int"}
    candidates = sorted(ALL_KINDS - kinds - {"str"})
    if "str" not in kinds:  # any string is wrong, or (literal fields) any string outside the choices
        candidates.append("literal" if "literal" in kinds else "str")
    kind = draw(st.sampled_from(candidates))
    if kind == "literal":
        return path, draw(st.text(max_size=20).filter(lambda s: s not in (choices or ())))
    return path, draw(BAD_OF_KIND[kind])


def _bounds(info) -> tuple[float | None, bool, float | None, bool, bool]:
    lo = hi = None
    lo_open = hi_open = False
    finite = False
    for m in info.metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
        elif getattr(m, "allow_inf_nan", None) is False:
            finite = True
    return lo, lo_open, hi, hi_open, finite


NUMERIC = [
    (p, i)
    for p, i in SCALARS
    if _accepts(i.annotation)[0] & {"int", "float"} and (_bounds(i)[0] is not None or _bounds(i)[2] is not None)
]
FLOATS = [(p, i) for p, i in SCALARS if "float" in _accepts(i.annotation)[0]]
STRINGS = [(p, i) for p, i in SCALARS if "str" in _accepts(i.annotation)[0] and i.metadata]


@st.composite
def out_of_range(draw):
    """A field and a value of the right type outside its bounds (numbers, string lengths and patterns)."""
    which = draw(st.sampled_from(["numeric", "numeric", "nonfinite", "string"]))
    if which == "nonfinite":
        path, info = draw(st.sampled_from(FLOATS))
        return path, draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if which == "string":
        path, info = draw(st.sampled_from(STRINGS))
        options = []
        for m in info.metadata:
            if isinstance(m, at.MaxLen):
                longer = m.max_length + 1
                options.append(st.text(min_size=1, max_size=8).map(lambda s, k=longer: s * (k // len(s) + 1)))
            elif isinstance(m, at.MinLen) and m.min_length > 0:
                options.append(st.just(""))
            elif getattr(m, "pattern", None):
                options.append(st.text(min_size=1, max_size=15).filter(lambda s, p=m.pattern: not re.search(p, s)))
        return path, draw(st.one_of(options))
    path, info = draw(st.sampled_from(NUMERIC))
    lo, lo_open, hi, hi_open, _ = _bounds(info)
    is_float = "float" in _accepts(info.annotation)[0]
    sides = [s for s, b in (("low", lo), ("high", hi)) if b is not None]
    side = draw(st.sampled_from(sides))
    if is_float:  # strictly outside (hypothesis may draw -0.0 next to a bound of 0)
        if side == "low":
            outside = st.floats(max_value=lo, allow_nan=False, allow_infinity=False)
            value = draw(outside.filter(lambda x: x <= lo if lo_open else x < lo))
        else:
            outside = st.floats(min_value=hi, allow_nan=False, allow_infinity=False)
            value = draw(outside.filter(lambda x: x >= hi if hi_open else x > hi))
    elif side == "low":
        value = draw(st.integers(max_value=int(lo) - (0 if lo_open else 1), min_value=int(lo) - 10**15))
    else:
        value = draw(st.integers(min_value=int(hi) + (0 if hi_open else 1), max_value=int(hi) + 10**15))
    return path, value


def _last(path: str) -> str:
    return path.split(".")[-1]


# -- malformed specs ------------------------------------------------------------------------------------------------
@FUZZ
@given(case=wrong_type(), via_set=st.booleans(), command=st.sampled_from(["run", "sweep"]))
def test_wrong_types_are_refused(harness, case, via_set, command):
    path, value = case
    if via_set and value is not None:  # TOML has no null: nulls go through a JSON file
        spec = harness.write(BASE)
        argv = [command, spec, "--set", f"{path}={_toml(value)}", "--quiet"]
    else:
        argv = [command, harness.write(_with(BASE, path, value)), "--quiet"]
    harness.refuses(argv, [_last(path)], test="wrong type")


@FUZZ
@given(case=out_of_range(), via_set=st.booleans(), command=st.sampled_from(["run", "sweep"]))
def test_out_of_range_values_nan_and_inf_are_refused(harness, case, via_set, command):
    path, value = case
    if via_set:
        argv = [command, harness.write(BASE), "--set", f"{path}={_toml(value)}", "--quiet", "--out", "o"]
    else:
        argv = [command, harness.write(_with(BASE, path, value)), "--quiet", "--out", "o"]
    harness.refuses(argv, [_last(path)], test="out of range")


SECTION_FIELDS = {"": set(S.Experiment.model_fields) | {"quick"}}
for _path, _info in FIELDS:
    _sec = _section_of(_info.annotation)
    if _sec is not None:
        SECTION_FIELDS[_path] = set(_sec.model_fields)


@FUZZ
@given(
    section=st.sampled_from(sorted(SECTION_FIELDS)),
    key=st.text(min_size=1, max_size=12),
    value=st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2)),
)
def test_unknown_keys_are_refused(harness, section, key, value):
    if key in SECTION_FIELDS[section]:
        key = "x" + key + "_unknown"
    raw = json.loads(json.dumps(BASE))
    node = raw
    for part in section.split(".") if section else []:
        node = node.setdefault(part, {})
    node[key] = value
    harness.refuses(["run", harness.write(raw), "--quiet"], [key], test="unknown key")


@st.composite
def inconsistent(draw):
    """A spec whose fields are each valid but do not fit together; returns (patch, words one of which is named)."""
    n = 6
    kind = draw(st.integers(0, 17))
    p_high = draw(st.floats(min_value=0.5, max_value=1.0, exclude_min=True))
    if kind == 0:
        return {"data": {"kind": "anticorrelated", "feature_probability": p_high}}, ["anticorrelated"]
    if kind == 1:
        pairs = draw(st.integers(1, 3))
        return {"data": {"n_anticorrelated_pairs": pairs, "feature_probability": p_high}}, ["anticorrelated"]
    if kind == 2:
        axis = draw(st.lists(st.floats(0.01, 0.5), min_size=0, max_size=3)) + [p_high]
        return {"data": {"kind": "anticorrelated"}, "instances": {"data.feature_probability": axis}}, ["p <= 0.5"]
    if kind == 3:
        nc = draw(st.integers(0, 10))
        na = draw(st.integers(max(0, 4 - nc), 10))
        return {"data": {"n_correlated_pairs": nc, "n_anticorrelated_pairs": na}}, ["pairs"]
    if kind == 4:
        size = draw(st.integers(1, 12).filter(lambda k: k != n))
        return {"task": {"importance": draw(st.lists(st.floats(0.1, 2), min_size=size, max_size=size))}}, ["importance"]
    if kind == 5:
        return {"model": {"kind": "linear"}, "task": {"target": draw(st.sampled_from(["abs", "relu-plus-x"]))}}, [
            "target"
        ]
    if kind == 6:
        depth = draw(st.integers(1, 5))
        wrong = draw(st.integers(1, 100).filter(lambda k, d=depth: k != 2 ** (d + 1) - 2))
        return {"data": {"kind": "hierarchy", "tree_depth": depth}, "model": {"n_features": wrong}}, ["n_features"]
    if kind == 7:
        a = draw(st.integers(1, 4))
        b = draw(st.integers(1, 4).filter(lambda k: k != a))
        inst = {"combine": "zip", "seed": list(range(a)), "train.lr": [1e-3] * b}
        return {"instances": inst}, ["zip"]
    if kind == 8:
        steps = draw(st.integers(1, 50))
        warm = draw(st.integers(steps, steps + 50))
        return {"train": {"schedule": "warmup-cosine", "steps": steps, "warmup_steps": warm}}, ["warmup"]
    if kind == 9:
        model = draw(st.sampled_from(["linear", "relu-output", "neuron", "mlp"]))
        return {"model": {"kind": model, "n_layers": draw(st.integers(2, 64))}}, ["n_layers"]
    if kind == 10:
        layers = draw(st.integers(1, 4))
        count = draw(st.integers(0, 6).filter(lambda k, n_layers=layers: k != n_layers))
        acts = draw(st.lists(st.sampled_from(["relu", "gelu", "none"]), min_size=count, max_size=count))
        return {"model": {"kind": "residual-mlp", "n_layers": layers, "activation": acts, "d_embed": 8}}, ["activation"]
    if kind == 11:
        d_embed = draw(st.integers(1, 50).filter(lambda k: k != n))
        return {"model": {"kind": "residual-mlp", "embedding": "identity", "d_embed": d_embed}}, ["d_embed"]
    if kind == 12:
        base_kind = draw(st.sampled_from(["neuron", "mlp"]))
        return {"model": {"kind": base_kind}, "instances": {"model.kind": ["linear", "relu-output"]}}, ["model.kind"]
    if kind == 13:
        axis = draw(st.sampled_from(["model.n_features", "model.d_hidden", "train.steps", "data.kind", "nope"]))
        return {"instances": {axis: [1, 2]}}, [axis]
    if kind == 14:
        bad = draw(st.sampled_from([0.0, -0.1, 1.5, math.nan, math.inf, "high", True]))
        return {"instances": {"data.feature_probability": [0.1, bad]}}, ["feature_probability"]
    if kind == 15:
        axis = draw(st.sampled_from(sorted(S.INSTANCE_AXES)))
        return {"instances": {axis: []}}, [axis]
    if kind == 16:
        # Sizes that cannot fit: at least 16 bytes per weight (parameter, gradient, two Adam moments).
        ram = S.physical_memory() or 2**40
        nf = draw(st.integers(100_000, 1_000_000))
        h = draw(st.integers(max(1, 2 * ram // (16 * nf)), 1_000_000).filter(lambda k: k >= 1))
        return {"model": {"n_features": nf, "d_hidden": h}, "task": {"importance": 1.0}}, ["too large"]
    a = draw(st.integers(1001, 2000))
    b = draw(st.integers(1000, 1500))
    return {"instances": {"seed": list(range(a)), "train.lr": [1e-3] * b}}, ["instances"]


@FUZZ
@given(case=inconsistent())
def test_inconsistent_combinations_are_refused(harness, case):
    patch, words = case
    harness.refuses(["run", harness.write(_merge(BASE, patch)), "--quiet"], words, test="inconsistent")


@settings(FUZZ, max_examples=60)
@given(
    garbage=st.one_of(st.binary(max_size=40), st.text(max_size=40)),
    suffix=st.sampled_from([".json", ".toml"]),
    not_a_table=st.sampled_from([[], [1, 2], 3, "spec", None, True]),
)
def test_files_that_are_not_specs_are_refused(harness, garbage, suffix, not_a_table):
    # Broken syntax (the trailing bracket can never close), bytes that are not UTF-8, JSON that is not a table.
    if isinstance(garbage, bytes):
        data = garbage + b"\xff\xfe[" if suffix == ".json" else garbage + b"\n[unclosed\n\xff"
    else:
        data = garbage + ("{" if suffix == ".json" else "\n[unclosed\n")
    path = harness.write(data, suffix)
    harness.refuses(["run", path], [path.name], test="not a spec")
    path = harness.write(json.dumps(not_a_table), ".json")
    harness.refuses(["run", path], [path.name], test="not a spec")


# -- malformed command lines ---------------------------------------------------------------------------------------
_ARG = st.text(min_size=1, max_size=15).filter(lambda s: "\x00" not in s)  # an OS cannot pass NUL in argv


@FUZZ
@given(
    command=_ARG.filter(lambda s: not s.startswith("-") and s not in COMMANDS),
    option=st.from_regex(r"--[a-z][a-z-]{0,12}", fullmatch=True),
    cmd=st.sampled_from(COMMANDS),
)
def test_unknown_commands_and_options_are_refused(harness, command, option, cmd):
    harness.refuses([command], [command], test="command line")
    real = {o for p in _params(cmd) for o in p}
    if option not in real and option not in ("--help", "--version"):
        harness.refuses([cmd, option], [option], test="command line")


def _params(command: str) -> list[list[str]]:
    from superposition.cli import _click_command

    click_cmd = _click_command(len(app.registered_commands)).commands[command]  # type: ignore[attr-defined]
    return [list(p.opts) + list(p.secondary_opts) for p in click_cmd.params]


@FUZZ
@given(
    item=st.one_of(
        _ARG.filter(lambda s: "=" not in s),  # no '='
        st.tuples(_ARG.filter(lambda s: "=" not in s), _ARG).map(lambda t: f"{t[0]}..x={t[1]}"),  # empty part
        st.tuples(st.from_regex(r"[0-9 -][a-z]*", fullmatch=True), _ARG).map(lambda t: f"{t[0]}={t[1]}"),
        st.tuples(st.from_regex(r"zz[a-z]{0,6}", fullmatch=True), _ARG).map(lambda t: f"{t[0]}={t[1]}"),
        st.tuples(
            st.sampled_from(["model", "data", "task", "train"]), st.from_regex(r"zz[a-z]{0,6}", fullmatch=True), _ARG
        ).map(lambda t: f"{t[0]}.{t[1]}={t[2]}"),
    ),
    command=st.sampled_from([c for c in ("run", "sweep", "sae") if c in COMMANDS]),
)
def test_malformed_set_is_refused(harness, sae_run, item, command):
    # `sae RUN --set` overrides SAE fields: it needs a run folder, and names the section it refuses.
    target = sae_run if command == "sae" else harness.write(BASE)
    key = item.partition("=")[0].strip()
    names = ["--set", key.split(".")[-1], key, key.split(".")[0]]
    harness.refuses([command, target, "--set", item, "--quiet"], names, test="--set")


@FUZZ
@given(
    name=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00/"), min_size=1, max_size=12),
    command=st.sampled_from(
        ["run", "sweep", "report", "plot", "resume", "show", *(["sae"] if "sae" in COMMANDS else [])]
    ),
    suffix=st.sampled_from(["", ".toml", ".json"]),
)
def test_missing_files_and_folders_are_refused(harness, name, command, suffix):
    if command == "show":
        if name in S.preset_names():
            name += "-not-a-preset"
        harness.refuses(["show", name], [name], test="missing")
        return
    missing = harness.inputs / "absent" / (name + suffix)
    argv = [command, missing] + (["loss"] if command == "plot" else [])
    harness.refuses(argv, [str(missing), name], test="missing")


def test_folders_and_files_in_the_wrong_place_are_refused(harness):
    spec = harness.write(BASE)
    folder = harness.inputs / "a-folder"
    folder.mkdir()
    fifo = harness.inputs / "pipe.toml"
    os.mkfifo(fifo)
    cases = [
        (["run", folder], "is a folder"),
        (["run", harness.inputs / "a-folder.toml"], "no such spec file"),
        (["run", fifo], "not a regular file"),  # reading a pipe would block for ever
        (["sweep", folder], "is a folder"),
        (["report", folder], "config.json is missing"),
        (["report", spec], "no such run folder"),
        (["plot", folder, "loss"], "config.json is missing"),
        (["resume", spec], "no interrupted run"),
        (["run", spec, "--out", spec / "sub", "--quiet"], "Not a directory"),
        (["run", spec, "--device", "tpu"], "device"),
        (["run", spec, "--set", "name='../escape'"], "pass --out"),
        (["run", spec, "--set", "name='.hidden'"], "pass --out"),
        (["run", spec, "--set", "name='a/b'"], "pass --out"),
        (["run", spec, "--set", "quick=3"], "quick"),
        (["run"], "Missing argument"),
        (["plot", folder], "Missing argument"),
        (["plot", folder, "loss", "--width", "abc"], "--width"),
        (["plot", folder, "loss", "--width", "10"], "--width"),
        (["sweep", spec, "--workers", "0"], "--workers"),
        (["sweep", spec, "--backend", "nope"], "backend"),
        (["sweep", spec, "--slurm", "no-equals"], "--slurm"),
    ]
    for argv, word in cases:
        harness.refuses(argv, [word], test="wrong place")
    fifo.unlink()


def test_fuzz_cases_add_up():
    # Runs last in this file: the default suite must generate at least 1,000 bad inputs.
    if len(COUNT) < 8:
        pytest.skip("only part of the fuzz file ran")
    total = sum(COUNT.values())
    print(f"\nfuzz cases: {total} ({dict(COUNT)})")
    assert total >= 1000


# -- the real console script ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, word",
    [(["run", "demo", "--set", "model.n_features=-1"], "n_features"), (["frobnicate"], "frobnicate")],
)
def test_console_script_refuses_in_one_line(tmp_path, argv, word):
    exe = Path(sys.executable).with_name("superposition")
    if not exe.exists():
        pytest.skip("the console script is not installed next to this interpreter")
    proc = subprocess.run([str(exe), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []
