"""Progress is passed in, never made up by the library: a bar factory the caller chooses.

Every long-running library call (``train_model``, ``fit_sae``, ``sweep.execute`` and the jobs above them) takes
``progress``: ``None``/``False`` for silence, or a :data:`BarFactory` -- a callable ``(total, initial, desc, unit)``
returning an object with ``update(n)``, ``set_postfix_str(text)`` and ``close()`` (a tqdm bar has all three). The
command line passes its terminal bar; a notebook passes tqdm's notebook bar. ``True`` is a shortcut for
:func:`tqdm_bar`, the terminal bar, for library users who want one without writing a factory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Bar", "BarFactory", "Progress", "make_bar", "tqdm_bar"]


class Bar(Protocol):
    """What the library calls on a progress bar."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def close(self) -> Any: ...


BarFactory = Callable[..., Bar]
"""``factory(total=..., initial=..., desc=..., unit=...)`` -> a :class:`Bar`."""

Progress = BarFactory | bool | None
"""What a library call's ``progress`` argument accepts."""


def tqdm_bar(*, total: int, initial: int = 0, desc: str = "", unit: str = "it") -> Bar:
    """tqdm's automatic bar (terminal or notebook), transient: it disappears when closed."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def make_bar(progress: Progress, *, total: int, initial: int = 0, desc: str = "", unit: str = "it") -> Bar | None:
    """The bar a call should drive, from its ``progress`` argument (None: no bar)."""
    if progress is None or progress is False:
        return None
    factory = tqdm_bar if progress is True else progress
    return factory(total=total, initial=initial, desc=desc, unit=unit)
