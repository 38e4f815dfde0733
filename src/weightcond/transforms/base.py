r"""The transform contract: a square conditioning matrix :math:`Q \in \mathbb{R}^{n\times n}`.

A transform is an :class:`torch.nn.Module` that owns its parameters and knows its side
dimension ``n``. It is the identity at initialisation. It offers two views of one matrix:

* :meth:`Transform.matrix` — the dense ``(n, n)`` matrix (the canonical form);
* :meth:`Transform.apply` — :math:`Q h` for every vector ``h`` along the last dimension of a
  tensor, computed matrix-free where the structure allows it (the fast form).

A subclass overrides at least one of the two; the base class derives the other. A
*norm-tied* transform (DoRA's magnitude) is diagonal with entries that depend on the norms
of the matrix it conditions; it sets ``norm_tied = True`` and implements :meth:`diagonal`
and :meth:`initialize` instead.

Note (small solves): transforms compute their small matrices (solves, matrix exponentials)
in float32 when the parameters are bfloat16 or float16 (float64 stays float64), and cast
the result back; see :func:`compute_dtype`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import StateError

__all__ = ["Transform", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype small solves run in: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Transform(nn.Module):
    r"""Base class of every conditioning transform.

    Args:
        dim: the side dimension ``n`` (``out`` for ``side="left"``, ``in`` for ``"right"``).

    Class attributes:
        name: the registry name (set by :func:`weightcond.transforms.register_transform`).
        norm_tied: ``True`` for diagonal transforms whose entries depend on the norms of
            the matrix they condition (see :class:`~weightcond.transforms.Magnitude`).
    """

    name: ClassVar[str] = ""
    norm_tied: ClassVar[bool] = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        needed = ("diagonal",) if cls.norm_tied else ("matrix", "apply")
        if not any(getattr(cls, m) is not getattr(Transform, m) for m in needed):
            raise TypeError(f"transform {cls.__name__} must override "
                            f"{' or '.join(m + '()' for m in needed)}")

    # -- properties the placement algebra relies on -------------------------------------
    @property
    def is_orthogonal(self) -> bool:
        """``True`` when :math:`Q` is exactly orthogonal for every parameter value."""
        return False

    @property
    def is_diagonal(self) -> bool:
        """``True`` when :math:`Q` is diagonal (then :meth:`diagonal` gives its entries)."""
        return self.norm_tied

    # -- the two views of the matrix ------------------------------------------------------
    def matrix(self) -> Tensor:
        """The dense matrix :math:`Q`, shape ``(n, n)``."""
        if self.norm_tied:
            raise StateError(f"{type(self).__name__} is norm-tied: its matrix depends on the "
                             f"matrix it conditions; use weightcond.delta_weight or layer.weight")
        eye = torch.eye(self.dim, dtype=self._dtype(), device=self._device())
        return self.apply(eye, transpose=True)  # rows of I·Q are the rows of Q

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        """:math:`Q h` (or :math:`Q^\\top h`) for each vector ``h`` along the last dimension.

        In row form this is ``h @ Q.mT`` (or ``h @ Q``).
        """
        q = self.matrix().to(h.dtype)
        return h @ (q if transpose else q.mT)

    # -- norm-tied diagonals (DoRA-style) ---------------------------------------------------
    detach_norm: bool = True

    def diagonal(self, norms: Tensor | None = None) -> Tensor:
        """The diagonal of :math:`Q` (for norm-tied transforms, given the ``norms`` of the
        conditioned matrix along the side dimension)."""
        return torch.diagonal(self.matrix())

    def initialize(self, norms: Tensor) -> None:
        """Called once at registration with the norms of the matrix the transform conditions
        (norm-tied transforms set their parameters so that they start as the identity)."""

    # -- helpers ------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
