"""``butterfly``: a product of block-diagonal rotations under butterfly permutations (BOFT)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ShapeError, check_int
from . import register_transform
from .base import Transform, require_plane
from .block import (
    block_generator,
    check_scale,
    generator_repr,
    rotate_blocks,
    skew_blocks,
    skew_index,
)
from .maps import EXACT_MAPS, resolve_dense_map


def butterfly_permutation(dim: int, chunk: int, half: int) -> list[int]:
    """Within each run of ``chunk`` coordinates, put the even half-blocks (of ``half``
    coordinates) first and the odd ones after: ``P h = h[perm]`` for the returned ``perm``.
    With ``chunk = 2 · half`` this is the identity."""
    order = [*range(0, chunk // half, 2), *range(1, chunk // half, 2)]
    return [start + k * half + i for start in range(0, dim, chunk) for k in order
            for i in range(half)]


@register_transform("butterfly")
class Butterfly(Transform):
    r"""Rotate by a butterfly product of block-diagonal rotations (BOFT).

    .. math::

        Q = \prod_{i=0}^{m-1} P_i\, B_i\, P_i^\top, \qquad
        B_i = \operatorname{blockdiag}\bigl(\operatorname{cayley}(S_{i,1}), \ldots\bigr),

    with :math:`m` = ``factors`` block-diagonal factors of ``block_size`` blocks and
    :math:`P_i` the butterfly permutation that interleaves half-blocks across runs of
    ``block_size · 2^i`` coordinates (:math:`P_0 = I`), applied as index gathers, never as
    permutation matrices. Generators are zero at init (:math:`Q = I`); exactly orthogonal for
    ``"cayley"`` and ``"exp"``. On the right of :math:`W`, with a left ``diag`` output scale,
    this is BOFT (Liu et al., 2024, arXiv 2311.06243). Cost per token
    :math:`O(m\, n\, b)`; :math:`m\, n (b-1)/2` parameters.

    Args:
        dim: the side dimension ``n``.
        block_size: :math:`b`; ``n`` must be a multiple of ``b · 2^(m-1)``, and ``b`` even
            when ``m > 1``. Default: the largest such divisor of ``n`` up to 32.
        factors: :math:`m`, at least 1. Default 1.
        map: ``"cayley"``, ``"exp"``, ``"first_order"`` or a callable. Default ``"cayley"``.
        scale: :math:`c` in :math:`S = c\,(U - U^\top)`, as for
            :class:`~weightcond.transforms.Block`. Default 1.
        full: store full ``b × b`` blocks :math:`D`, :math:`S = c\,(D - D^\top)`: PEFT's
            BOFT parametrization (its ``boft_R``), which the ``boft`` preset uses; twice the
            parameters, the same rotations. Default ``False``.
    """

    def __init__(self, dim: int, *, block_size: int | None = None, factors: int = 1,
                 map: str | Callable[[Tensor], Tensor] = "cayley", scale: float = 1.0,
                 full: bool = False) -> None:
        super().__init__(dim)
        require_plane("butterfly", dim)
        # blocks of at least 2 times 2^(factors - 1) must fit in dim
        self.factors = check_int("butterfly", "factors", factors, high=max(1, dim.bit_length() - 1),
                                 what="log2 of the side dimension")
        span = 2 ** (factors - 1)
        if block_size is None:
            block_size = max((b for b in range(2, 33) if dim % (b * span) == 0
                              and (factors == 1 or b % 2 == 0)), default=0)
            if block_size == 0:
                raise ShapeError(f"butterfly: the side dimension {dim} is not a multiple of "
                                 f"an even block size times 2^(factors - 1) = {span}")
        self.block_size = check_int("butterfly", "block_size", block_size, low=2, high=dim,
                                    what="the side dimension")
        if dim % (block_size * span) or (factors > 1 and block_size % 2):
            raise ShapeError(f"butterfly: argument 'block_size' expected an even divisor b with "
                             f"b · 2^(factors - 1) dividing the side dimension {dim}, got "
                             f"{block_size} with factors={factors}")
        self.map = map
        self._map = resolve_dense_map("butterfly", map)
        self.scale = check_scale("butterfly", scale)
        self.full = full
        self.generator = block_generator("butterfly", (factors, dim // block_size), block_size,
                                         full)
        perms = [butterfly_permutation(dim, block_size * 2**i, max(block_size // 2, 1))
                 if factors > 1 else list(range(dim)) for i in range(factors)]
        perm = torch.tensor(perms, device="cpu")
        self.register_constant("_perm", perm)
        self.register_constant("_inverse", torch.argsort(perm, dim=-1))
        self.register_constant("_skew_index", skew_index(self.block_size))

    @property
    def is_orthogonal(self) -> bool:
        return isinstance(self.map, str) and self.map in EXACT_MAPS

    def blocks(self) -> Tensor:
        """The block rotations, shape ``(m, n/b, b, b)``, in the solve dtype."""
        return skew_blocks(self.generator, self._skew_index, self._map, scale=self.scale,
                           full=self.full)

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        blocks = self.blocks()
        # Q h applies the last factor first; Qᵀ h the first factor first, each transposed
        order = range(self.factors) if transpose else range(self.factors - 1, -1, -1)
        for i in order:
            h = h[..., self._inverse[i]]  # P_iᵀ h
            h = rotate_blocks(h, blocks[i], transpose=transpose)
            h = h[..., self._perm[i]]  # P_i h
        return h

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, block_size={self.block_size}, factors={self.factors}, "
                f"map={self.map!r}{generator_repr(self.scale, self.full)}")
