"""The shipped presets (TOML inside the package) and reading spec files."""

from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from superposition.errors import SpecError


def preset_names() -> list[str]:
    """Names of the presets shipped inside the package."""
    files = resources.files("superposition") / "presets"
    return sorted(p.name[: -len(".toml")] for p in files.iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    """The TOML text of a preset."""
    if name not in preset_names():
        raise SpecError(f"unknown preset {name!r} ({preset_hint(name)})")
    return (resources.files("superposition") / "presets" / f"{name}.toml").read_text(encoding="utf-8")


def preset_description(name: str) -> str:
    """The first line of a preset's description."""
    raw = tomllib.loads(preset_text(name))
    return str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""


def read_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text, turning syntax errors into one-line SpecErrors."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise SpecError(f"{source}: not valid TOML (nested too deeply)") from None


def load_raw(source: str | Path) -> dict[str, Any]:
    """The raw dict of a TOML/JSON spec file or a preset name."""
    path = Path(source)
    if path.suffix in (".toml", ".json") or path.exists():
        if not path.is_file():
            what = "is a folder, not a spec file" if path.is_dir() else "not a regular file"
            raise SpecError(f"{source}: {what if path.exists() else 'no such spec file'}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"{source}: cannot read ({exc.__class__.__name__})") from None
        if path.suffix == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SpecError(f"{source}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise SpecError(f"{source}: not valid JSON (nested too deeply)") from None
        else:
            raw = read_toml(text, str(source))
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: the spec must be a table")
        return raw
    name = str(source)
    if name in preset_names():
        return read_toml(preset_text(name), f"preset {name}")
    raise SpecError(f"{name!r} is neither a spec file nor a preset ({preset_hint(name)})")


def preset_hint(name: str) -> str:
    """``did you mean 'demo'?`` naming the presets closest to ``name``, or the list of presets if none is close."""
    names = preset_names()
    close = difflib.get_close_matches(name, names, n=3)
    if not close:
        return f"presets: {', '.join(names)}"
    quoted = [repr(c) for c in close]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f"did you mean {listed}?"
