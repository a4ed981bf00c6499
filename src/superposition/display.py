"""How records show themselves in a notebook, without importing what draws them.

``Run`` (``record``), ``Sae`` (``sae.folder``) and ``Sweep`` (``sweep.folder``) sit below the figures and the
reports, so they cannot import ``plots``, ``report`` or ``claims``. They inherit :class:`Displayable`, whose
``_repr_html_``, ``figure`` and ``figures`` delegate to a :class:`Presenter` that a higher layer binds at import time
(the one injection point: ``superposition.views`` sets ``Run.presenter`` and ``Sae.presenter``,
``superposition.sweep.report`` sets ``Sweep.presenter``). Everything reached through the public API
(``superposition.run``, ``load_run``, ``load_sae``, ``load_sweep``, ...) has imported them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

__all__ = ["Presenter", "Displayable", "PresenterMissing"]


class PresenterMissing(RuntimeError):
    """A record asked for a figure before the module that draws it was imported."""


class Presenter(Protocol):
    """What a higher layer provides for one record type."""

    def html(self, obj: Any) -> str: ...

    def figure_names(self, obj: Any) -> list[str]: ...

    def figure(self, obj: Any, name: str, **layout: Any) -> Any: ...


class Displayable:
    """Mixin: notebook display and figures, delegated to the presenter bound on the class."""

    presenter: ClassVar[Presenter | None] = None
    presenter_module: ClassVar[str] = "superposition.views"
    """The module whose import binds the presenter (named in the error when none is bound)."""

    def _presenter(self) -> Presenter:
        bound = type(self).presenter
        if bound is None:
            raise PresenterMissing(
                f"{type(self).__name__} has no figures yet: import {self.presenter_module} first "
                "(superposition.run, load_run, load_sae and load_sweep import it)"
            )
        return bound

    def _repr_html_(self) -> str | None:
        """The compact HTML summary Jupyter shows (None, i.e. the plain repr, until a presenter is bound)."""
        bound = type(self).presenter
        return None if bound is None else bound.html(self)

    def figures(self) -> list[str]:
        """The names of the figures available for this record (those its report shows)."""
        return self._presenter().figure_names(self)

    def figure(self, name: str, **layout: Any) -> Any:
        """The plotly figure ``name`` as the report embeds it; ``layout`` options (width, height, title, ...) are
        applied with ``update_layout``. An unknown name raises ValueError listing the valid ones."""
        return self._presenter().figure(self, name, **layout)
