"""The "what" axis of the design space: one file per transform, all in :data:`TRANSFORMS`.

A new transform is one file: subclass :class:`Transform`, decorate it with
:func:`register_transform`, import it here (or anywhere before use). The registry-driven
tests, the presets and the docs find it through :data:`TRANSFORMS`.
"""

from __future__ import annotations

from .base import (
    TRANSFORMS,
    Transform,
    compute_dtype,
    diagonal_limit,
    limit_diagonal,
    register_transform,
)

__all__ = ["TRANSFORMS", "Block", "Butterfly", "Diag", "Givens", "Householder", "Magnitude",
           "Orthogonal", "Skew", "Transform", "compute_dtype", "diagonal_limit", "limit_diagonal",
           "register_transform"]

from .block import Block
from .butterfly import Butterfly
from .diag import Diag
from .givens import Givens
from .householder import Householder
from .magnitude import Magnitude
from .orthogonal import Orthogonal
from .skew import Skew
