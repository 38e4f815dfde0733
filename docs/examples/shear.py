r"""A new transform in one file: ``shear``, a volume-preserving low-rank shear.

.. math::

    Q = I + U V^\top, \qquad U, V \in \mathbb{R}^{n \times k}, \qquad V^\top U = 0 .

Because :math:`V^\top U = 0`, :math:`\det Q = \det(I_k + V^\top U) = 1` and
:math:`Q^{-1} = I - U V^\top`: a shear (transvection) moves every vector along the span of
:math:`U` by an amount read off the orthogonal complement, and keeps volumes. It is not
orthogonal. The constraint is kept by projecting a free parameter :math:`\tilde V` onto the
complement of :math:`\operatorname{span}(U)`:

.. math::

    V = \tilde V - U\,(U^\top U)^{-1}\,U^\top \tilde V .

:math:`\tilde V = 0` at initialisation, so :math:`Q = I`. Importing this module registers it
under the name ``"shear"`` (the docs import it to build and test their example).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from weightcond.errors import check_int
from weightcond.transforms import Transform, compute_dtype, register_transform


@register_transform("shear")
class Shear(Transform):
    r"""Shear along ``rank`` learned directions: :math:`Q = I + U V^\top`, :math:`V^\top U = 0`.

    ``2 n k`` parameters; cost per token :math:`O(nk)`; determinant 1; not orthogonal.

    Args:
        dim: the side dimension ``n`` (at least 2).
        rank: :math:`k`, between 1 and ``n // 2`` (``V`` needs room outside the span of
            ``U``). Default ``min(2, n // 2)``.
    """

    def __init__(self, dim: int, *, rank: int | None = None) -> None:
        super().__init__(dim)
        if rank is None:
            rank = min(2, dim // 2)
        # validate at registration, with the library's typed errors and message format
        self.rank = check_int("shear", "rank", rank, high=dim // 2,
                              what="half the side dimension")
        self.U = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))
        self.V = nn.Parameter(torch.zeros(dim, rank))  # the free V~; zero: Q = I

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """``(U, V)`` with :math:`Q = I + U V^\\top`: the only method a thin transform needs.

        The base class derives :meth:`matrix` and :meth:`apply` from it, and the layer folds
        the thin term into its stacked low-rank GEMM.
        """
        # the k x k solve runs in float32 under bf16/fp16 (weightcond's Note (small solves));
        # solve_ex skips the error check, which would synchronise with the device: UᵀU is
        # positive definite unless U loses rank
        dtype = compute_dtype(self.U.dtype)
        u, v = self.U.to(dtype), self.V.to(dtype)
        v = v - u @ torch.linalg.solve_ex(u.mT @ u, u.mT @ v)[0]
        return u, v

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}"
