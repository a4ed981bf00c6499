"""Progress is passed in, never made up by the library: a bar factory the caller chooses.

Every long-running library call (``train_model``, ``fit_sae``, ``sweep.execute`` and the jobs above them) takes
``progress``: ``None``/``False`` for silence, or a :data:`BarFactory` -- a callable ``(total, initial, desc, unit)``
returning an object with ``update(n)``, ``set_postfix_str(text)`` and ``close()`` (a tqdm bar has all three). The
command line passes its terminal bar; a notebook passes :func:`notebook_bar` (tqdm's widget bar). ``True`` is a
shortcut for :func:`tqdm_bar`, tqdm's automatic bar (the widget in a notebook with ipywidgets, else text), for library
users who want one without writing a factory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

__all__ = ["Bar", "BarFactory", "LineBar", "Progress", "make_bar", "notebook_bar", "tqdm_bar"]


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


def notebook_bar(*, total: int, initial: int = 0, desc: str = "", unit: str = "it") -> Bar:
    """A bar for a notebook cell: tqdm's widget bar where ipywidgets is installed (``pip install
    'superposition[notebook]'``), else tqdm's text bar on stderr (which a notebook shows too); transient as well."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as widget_bar

        return widget_bar(total=total, initial=initial, desc=desc, unit=unit, leave=False)
    from tqdm.std import tqdm as text_bar

    return text_bar(total=total, initial=initial, desc=desc, unit=unit, leave=False, file=sys.stderr)


def make_bar(progress: Progress, *, total: int, initial: int = 0, desc: str = "", unit: str = "it") -> Bar | None:
    """The bar a call should drive, from its ``progress`` argument (None: no bar)."""
    if progress is None or progress is False:
        return None
    factory = tqdm_bar if progress is True else progress
    return factory(total=total, initial=initial, desc=desc, unit=unit)


class LineBar:
    """Progress off a terminal (a log file, a batch job): one line at most every ``every`` seconds on ``stream``
    (default stderr): steps, share, the last postfix (loss, L0, ...), elapsed time, ETA. A factory: pass the class."""

    def __init__(
        self,
        *,
        total: int,
        initial: int = 0,
        desc: str = "",
        unit: str = "it",
        every: float = 10.0,
        stream: IO[str] | None = None,
    ):
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.stream = stream
        self.start = self.last = time.monotonic()
        self.first, self.postfix = initial, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        pass

    def _line(self, now: float) -> None:
        spent, done = now - self.start, self.n - self.first
        eta = f", ETA {(self.total - self.n) * spent / done:.0f} s" if done > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        line = f"{self.desc}: {self.unit} {self.n}/{self.total}{share}{extra}, {spent:.0f} s{eta}\n"
        (self.stream or sys.stderr).write(line)
