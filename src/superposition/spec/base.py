"""The pieces every spec section shares: strict frozen sections, dotted-key access, one-line validation messages."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from superposition.errors import SpecError

# Guard rails against sizes that cannot be meant (the reliability issue refines them with a memory estimate).
MAX_DIM = 1_000_000
MAX_STEPS = 100_000_000
MAX_INSTANCES = 1_000_000


class StrictSection(BaseModel):
    # strict: a typo such as `seed = true` or `d_hidden = 2.5` is refused instead of silently coerced.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = {}
            node[p] = nxt
        if not isinstance(nxt, dict):
            raise SpecError(f"{key}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for p in key.split("."):
        node = node[p]
    return node


def _is_union_tag(part: Any) -> bool:
    # pydantic names the branch of a union (or a validator) in the error location; users know only field names.
    if not isinstance(part, str):
        return False
    return part in ("float", "int", "str", "bool", "none") or part.startswith(
        ("function-", "list[", "literal[", "dict[", "tagged-union[", "is-instance[", "union[")
    )


def format_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad field, what is wrong, and what was given."""
    err = exc.errors()[0]
    parts = list(err["loc"])
    # An unknown key is the user's own text, never a union tag, however it is spelled.
    last = [str(parts.pop())] if err["type"] == "extra_forbidden" and parts else []
    loc = ".".join([str(x) for x in parts if not _is_union_tag(x)] + last)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        named = msg.split(":")[0]
        if loc == "" or named.endswith(loc.split(".")[-1] if loc else "\0") or named.startswith(loc + "."):
            return msg
    given = err.get("input")
    shown = repr(given) if not isinstance(given, dict) else "a table"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    extra = "" if err["type"] == "missing" else f" (got {shown})"
    line = f"{loc}: {msg}{extra}" if loc else f"{msg}{extra}"
    if len(exc.errors()) > 1:
        line += f" [and {len(exc.errors()) - 1} more problem(s)]"
    return line.replace("\n", " ")
