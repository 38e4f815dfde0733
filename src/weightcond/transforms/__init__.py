"""The "what" axis of the design space: one file per transform, all in :data:`TRANSFORMS`.

A new transform is one file: subclass :class:`Transform`, decorate it with
:func:`register_transform`, import it here (or anywhere before use). The registry-driven
tests, the presets and the docs find it through :data:`TRANSFORMS`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from .base import Transform, compute_dtype, diagonal_limit, limit_diagonal

__all__ = ["TRANSFORMS", "Block", "Butterfly", "Diag", "Givens", "Householder", "Magnitude",
           "Orthogonal", "Skew", "Transform", "compute_dtype", "diagonal_limit", "limit_diagonal",
           "register_transform"]

TRANSFORMS: Registry[type[Transform]] = Registry("transform")


def register_transform(name: str) -> Callable[[type[Transform]], type[Transform]]:
    """Class decorator: register a :class:`Transform` subclass under ``name``."""

    def decorate(cls: type[Transform]) -> type[Transform]:
        if not (isinstance(cls, type) and issubclass(cls, Transform)):
            raise TypeError(f"register_transform: expected a Transform subclass, got {cls!r}")
        TRANSFORMS.add(name, cls)
        cls.name = name
        return cls

    return decorate


from .block import Block
from .butterfly import Butterfly
from .diag import Diag
from .givens import Givens
from .householder import Householder
from .magnitude import Magnitude
from .orthogonal import Orthogonal
from .skew import Skew
