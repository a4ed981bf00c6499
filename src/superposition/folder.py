"""The file-format primitives every folder of this tool is written and read through.

- **Writing**: :func:`atomic_write_bytes` (a temporary sibling, flushed, renamed into place; the file gets the
  ordinary umask-respecting mode), and the tensor and table writers built on it.
- **Reading**: :func:`checked_file` (a regular file inside the folder, links kept inside, size bounded),
  :func:`read_json`, :func:`read_safetensors_header`, :func:`check_tensors`, :func:`load_tensors`.
- **Ownership**: the layouts of the folders this tool writes (:data:`RUN`, :data:`SAE`, :data:`SWEEP` and their hidden
  working folders) and :func:`foreign_entry`, the one answer to "is this folder ours". Nothing is deleted or replaced
  that this check does not recognise: :func:`remove_owned`, :func:`fresh_workdir` and :func:`publish` refuse anything
  else in one :class:`NotOurs` error that names the path and its first unknown entry.

Importing this module does not load torch (the tensor helpers import it when called).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from superposition.errors import NotOurs, RunFormatError, SpecError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import pandas as pd
    import torch

__all__ = [
    "RunFormatError",
    "NotOurs",
    "FolderKind",
    "RUN",
    "RUN_WORK",
    "SAE",
    "SAE_WORK",
    "SWEEP",
    "atomic_write_bytes",
    "atomic_write_table",
    "atomic_save_tensors",
    "checked_file",
    "read_json",
    "read_safetensors_header",
    "check_tensors",
    "load_tensors",
    "foreign_entry",
    "check_replaceable",
    "check_target",
    "remove_owned",
    "fresh_workdir",
    "publish",
    "work_dir",
    "normal",
    "user_path",
    "format_bytes",
]


# -- limits ----------------------------------------------------------------------------------------------------------
MAX_CONFIG_BYTES = 16 * 2**20
"""Largest config.json / spec.json read (a resolved spec is a few kB)."""
MAX_HEADER_BYTES = 16 * 2**20
"""Largest safetensors header read (a run's header is well under 1 kB per tensor)."""
MAX_TABLE_BYTES = 4 * 2**30
"""Largest parquet table read."""


def format_bytes(n: float) -> str:
    """A byte count in binary units (B, KiB, MiB, GiB, TiB), as every message of this tool writes them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- writing ---------------------------------------------------------------------------------------------------------
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


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a hidden temporary sibling renamed into place: readers see the old file or
    the new one, never a part. The file's mode is the ordinary one (0666 less the umask), like every file we write."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_table(path: str | Path, frame: pd.DataFrame) -> Path:
    """A table as parquet, written atomically."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Tensors as safetensors, written atomically (safetensors' own writer would leave a 0600 file)."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save(tensors, metadata=metadata))


# -- reading ---------------------------------------------------------------------------------------------------------
def checked_file(folder: Path, name: str, limit: int | None = None, what: str = "run") -> Path:
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


def read_json(folder: Path, name: str, limit: int = MAX_CONFIG_BYTES, what: str = "run") -> Any:
    """The JSON value of ``folder/name`` (a checked file of at most ``limit`` bytes); one RunFormatError otherwise."""
    f = checked_file(folder, name, limit, what)
    try:
        return json.loads(f.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RunFormatError(f"{folder / name}: not valid JSON ({exc.__class__.__name__})") from None


_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_TORCH_DTYPE_NAMES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "float16": "F16",
    "bfloat16": "BF16", "int32": "I32", "float32": "F32", "int64": "I64", "float64": "F64",
}  # fmt: skip


def _dtype_name(dtype: Any) -> str | None:
    return _TORCH_DTYPE_NAMES.get(str(dtype).removeprefix("torch."))


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


def check_tensors(path: Path, header: SafetensorsHeader, expected: Mapping[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes of a header against the tensors the config implies."""
    if set(header.tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(header.tensors)), sorted(set(header.tensors) - set(expected))
        raise RunFormatError(f"{path}: tensors do not match the config (missing {missing}, unexpected {extra})")
    for k, info in header.tensors.items():
        want = expected[k]
        if info.shape != tuple(want.shape) or info.dtype != _dtype_name(want.dtype):
            raise RunFormatError(
                f"{path}: {k} is {info.dtype} {list(info.shape)}, the config needs "
                f"{_dtype_name(want.dtype)} {list(want.shape)}"
            )


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (check its header first); one RunFormatError for a damaged file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise RunFormatError(f"{path}: not a valid safetensors file ({exc.__class__.__name__})") from None


# -- ownership -------------------------------------------------------------------------------------------------------
class FolderKind(NamedTuple):
    """The layout of one kind of folder this tool writes: how to recognise it and which entries it may hold."""

    what: str
    """How messages name it: "run folder", "SAE folder", "sweep folder", "working folder of a run"."""
    markers: tuple[str, ...]
    """Files any one of which, holding a JSON object that ``marked`` accepts, marks the folder as ours."""
    marked: Callable[[str, Any], bool]
    """(marker file name, its JSON value) -> whether it is this tool's marker."""
    files: frozenset[str]
    """Plain files the format knows."""
    nested: Mapping[str, tuple[FolderKind, ...]] = {}
    """Sub-folders whose every entry is a folder of one of these kinds."""
    nested_files: Mapping[str, re.Pattern[str]] = {}
    """Sub-folders whose every entry is a plain file with a name of this pattern."""


def _has_version(name: str, value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("superposition_version"), str)


def _of_format(fmt: str) -> Callable[[str, Any], bool]:
    def marked(name: str, value: Any) -> bool:
        return isinstance(value, dict) and value.get("format") == fmt

    return marked


def _run_marker(name: str, value: Any) -> bool:
    if name == "spec.json":  # a run being trained holds its resolved spec
        return isinstance(value, dict) and isinstance(value.get("model"), dict) and isinstance(value.get("train"), dict)
    return _has_version(name, value) and isinstance(value.get("spec"), dict)


RUN_FILE_NAMES = ("config.json", "model.safetensors", "history.parquet", "instances.parquet", "report.html")
"""A run folder's files (record names them CONFIG, WEIGHTS, HISTORY, INSTANCES, REPORT)."""
SAE_FILE_NAMES = (
    "config.json",
    "model.safetensors",
    "scores.parquet",
    "features.parquet",
    "latents.parquet",
    "history.parquet",
    "resamples.parquet",
    "report.html",
)
"""An SAE folder's files (sae.folder names them CONFIG, WEIGHTS, SCORES, FEATURES, LATENTS, HISTORY, RESAMPLES,
REPORT)."""
RUN_FILES = frozenset(RUN_FILE_NAMES)
SAE_FILES = frozenset(SAE_FILE_NAMES)
SAE_FORMAT = "superposition-sae"
SWEEP_FORMAT = "superposition-sweep"

SAE = FolderKind("SAE folder", ("config.json",), _of_format(SAE_FORMAT), SAE_FILES)
SAE_WORK = FolderKind("working folder of an SAE", ("spec.json", "config.json"), _of_format(SAE_FORMAT), SAE_FILES)
_SAES = {"sae": (SAE, SAE_WORK)}
RUN = FolderKind("run folder", ("config.json",), _run_marker, RUN_FILES, _SAES)
RUN_WORK = FolderKind(
    "working folder of a run",
    ("spec.json", "config.json"),
    _run_marker,
    RUN_FILES | {"spec.json", "checkpoint.safetensors"},
    _SAES,
)
SWEEP = FolderKind(
    "sweep folder",
    ("sweep.json",),
    _of_format(SWEEP_FORMAT),
    frozenset({"sweep.json", "results.parquet", "report.html"}),
    {"runs": (RUN, RUN_WORK)},
    {"errors": re.compile(r"g[0-9]{1,9}\.json")},
)
KINDS = (RUN, RUN_WORK, SAE, SAE_WORK, SWEEP)
"""Every kind of folder this tool writes."""

_TMP = re.compile(r"\.(?P<name>.+)\.tmp")
"""Temporary files of our one writer (:func:`atomic_write_bytes`): ``.X.tmp`` for a file ``X`` the format knows."""
_WORK = re.compile(r"\..+\.(partial|old|trash|new)")
"""Hidden working folders (``.X.partial``, ``.X.old``, ``.X.partial.new``, ``.X.trash``): checked in turn."""


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _is_tmp(name: str, known: frozenset[str] | set[str]) -> bool:
    m = _TMP.fullmatch(name)
    return m is not None and m.group("name") in known


def _marker_ok(folder: Path, kind: FolderKind) -> bool:
    for name in kind.markers:
        st = _lstat(folder / name)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
            continue
        try:
            value = json.loads((folder / name).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if kind.marked(name, value):
            return True
    return False


def _problem(folder: Path, kinds: tuple[FolderKind, ...], depth: int = 0) -> str | None:
    """None when ``folder`` is absent, empty or a folder of one of ``kinds``; else what is wrong with it."""
    st = _lstat(folder)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "a file, not a folder"
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not names:
        return None  # an empty folder holds nothing to lose
    marked = [k for k in kinds if _marker_ok(folder, k)]
    if not marked:
        markers = " or ".join(sorted({m for k in kinds for m in k.markers}))
        return f"no {markers} of this tool; first entry {names[0]!r}"
    problems = [_entries_problem(folder, names, k, depth) for k in marked]
    return None if None in problems else problems[0]


def _entries_problem(folder: Path, names: list[str], kind: FolderKind, depth: int) -> str | None:
    known = kind.files | set(kind.markers)
    for name in names:
        path = folder / name
        st = _lstat(path)
        if st is None:
            continue
        if stat.S_ISLNK(st.st_mode):
            return f"unknown entry {name!r} (a symbolic link)"
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir and (name in known or _is_tmp(name, known)):
            continue
        if is_dir and name in kind.nested and depth < 4:
            finished = kind.nested[name][:1]  # a finished location holds only the finished kind
            for child in sorted(os.listdir(path)):
                kinds = kind.nested[name] if _WORK.fullmatch(child) else finished
                problem = _problem(path / child, kinds, depth + 1)
                if problem is not None:
                    return f"unknown entry {name}/{child!r} ({problem})"
            continue
        if is_dir and name in kind.nested_files:
            for child in sorted(os.listdir(path)):
                pattern = kind.nested_files[name]
                tmp = _TMP.fullmatch(child)
                named = pattern.fullmatch(child) or (tmp is not None and pattern.fullmatch(tmp.group("name")))
                if not named or not stat.S_ISREG((path / child).lstat().st_mode):
                    return f"unknown entry {name}/{child!r}"
            continue
        return f"unknown entry {name!r}"
    return None


def foreign_entry(path: str | Path, kinds: tuple[FolderKind, ...] = KINDS) -> str | None:
    """Why ``path`` is not a folder of one of ``kinds`` -- its first unknown entry, a missing marker, a file -- or
    None when it is one (or is an empty folder, or does not exist): the one "is this folder ours" check."""
    return _problem(Path(path), kinds)


def check_replaceable(path: str | Path, kinds: tuple[FolderKind, ...], action: str = "replace") -> None:
    """Refuse (one :class:`NotOurs`) unless ``path`` is absent or a folder of one of ``kinds``."""
    problem = foreign_entry(path, kinds)
    if problem is not None:
        what = " or ".join(k.what for k in kinds)
        raise NotOurs(f"{path}: not a {what} of this tool ({problem}); refusing to {action} it")


def _delete_tree(folder: Path) -> None:
    """Delete a folder already checked to be ours, markers last in every folder: a kill part-way leaves folders that
    still carry their marker (or are empty), so the next command recognises them and finishes the job."""
    markers = {m for k in KINDS for m in k.markers}
    entries = sorted(os.scandir(folder), key=lambda e: (e.name in markers, e.name))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _delete_tree(Path(entry.path))
        else:
            os.unlink(entry.path)
    os.rmdir(folder)


def check_target(out: str | Path, kind: FolderKind, work: FolderKind, *, overwrite: bool) -> None:
    """Refuse, before any work, a target or hidden sibling that is not this tool's own, or a folder we cannot write.

    ``out`` may be replaced only when it is a folder of ``kind`` (and ``overwrite`` asks); ``.NAME.partial``, its
    staging ``.new``, ``.NAME.old`` and their ``.trash`` leftovers are deleted only when they are our own folders.
    """
    out = normal(out)
    if _lstat(out) is not None:
        if not overwrite:
            raise SpecError(f"{out}: already exists (pass --overwrite to replace it)")
        check_replaceable(out, (kind,))
    partial = work_dir(out)
    for sibling in (partial, partial.with_name(partial.name + ".new"), out.parent / f".{out.name}.old"):
        for path in _trash_chain(sibling):
            check_replaceable(path, (kind, work), "delete")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"{out}: cannot write there ({parent} is not a writable folder)")


def remove_owned(path: str | Path, kinds: tuple[FolderKind, ...] = KINDS) -> None:
    """Delete ``path`` if it is a folder of one of ``kinds``; refuse anything else (nothing touched).

    The folder is first renamed to a hidden ``.trash`` sibling, so it vanishes from its name at once.
    """
    path = Path(path)
    if _lstat(path) is None:
        return
    chain = _trash_chain(path)
    for link in chain:  # every refusal before anything is deleted
        check_replaceable(link, kinds if link == path else KINDS, "delete")
    for leftover in reversed(chain[1:]):  # earlier killed removals first: they are our own trash
        _delete_tree(leftover)
    trash = _trash_name(path)
    os.replace(path, trash)
    _delete_tree(trash)


def _trash_name(path: Path) -> Path:
    return path.with_name(path.name + ".trash") if path.name.startswith(".") else path.with_name(f".{path.name}.trash")


def _trash_chain(path: Path) -> list[Path]:
    """``path`` and the leftovers of earlier killed removals after it (``.X.trash``, ``.X.trash.trash``, ...)."""
    chain = [Path(path)]
    while _lstat(_trash_name(chain[-1])) is not None and len(chain) < 64:
        chain.append(_trash_name(chain[-1]))
    return chain


def normal(out: str | Path) -> Path:
    """``out`` with a real last component (``.``, ``..`` or a trailing ``/.`` made absolute), so that its hidden
    siblings sit next to it, never inside it."""
    out = Path(out)
    return Path(os.path.abspath(out)) if out.name in ("", ".", "..") else out


def work_dir(out: str | Path) -> Path:
    """The hidden sibling ``.NAME.partial`` in which a folder is built (and checkpointed) before it is published."""
    out = normal(out)
    return out.parent / f".{out.name}.partial"


def user_path(path: str | Path) -> Path:
    """The folder a user asked for, for a path inside one of our hidden working siblings (for messages)."""
    path = Path(path)
    pattern = re.compile(r"\.(.+?)\.(partial|old)(\.(new|trash))*")
    for i in range(len(path.parts) - 1, -1, -1):  # the innermost working folder: ancestors are left alone
        m = pattern.fullmatch(path.parts[i])
        if m:
            return Path(*path.parts[:i], m.group(1))
    return path


def fresh_workdir(work: Path, marker: str, marker_bytes: bytes, kinds: tuple[FolderKind, ...]) -> None:
    """An empty working folder holding only its marker file; staged and renamed, so it never exists without it.

    Whatever was at ``work`` (and at the staging name) must be ours: it is deleted; anything else is refused.
    """
    staging = work.with_name(work.name + ".new")
    for stale in (work, staging):
        check_replaceable(stale, kinds, "delete")
    for stale in (work, staging):
        remove_owned(stale, kinds)
    staging.mkdir(parents=True)
    atomic_write_bytes(staging / marker, marker_bytes)
    os.replace(staging, work)


def publish(work: Path, out: Path, kind: FolderKind, *, overwrite: bool) -> None:
    """Rename a finished working folder into place at ``out`` (replacing a folder of ``kind`` only when asked).

    Entries the finished format does not hold (checkpoints, the marker of work in progress, temporary files) are
    removed first. Between the two renames of an overwrite ``out`` is briefly absent, never half-written; the replaced
    folder waits in ``.NAME.old`` until the new one is in place.
    """
    keep = kind.files | set(kind.nested) | set(kind.nested_files)
    for entry in list(os.scandir(work)):
        if entry.name not in keep and not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.path)
    old = out.parent / f".{out.name}.old"
    if _lstat(out) is not None:
        if not overwrite:
            raise SpecError(f"{out}: already exists (pass --overwrite to replace it)")
        check_replaceable(out, (kind,))
        remove_owned(old)
        os.replace(out, old)
    os.replace(work, out)
    _fsync_dir(out.parent)
    remove_owned(old)
