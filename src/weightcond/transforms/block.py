"""``block``: a block-diagonal rotation (OFT)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from ..errors import ShapeError, check_bool, check_int
from . import register_transform
from .base import Transform, compute_dtype, require_plane
from .maps import EXACT_MAPS, cayley_neumann, resolve_dense_map


def skew_blocks(generator: Tensor, block_size: int, map: Callable[[Tensor], Tensor]) -> Tensor:
    """``map(S_i)`` for skew ``S_i`` whose upper triangles are the rows of ``generator``
    (``(..., b(b-1)/2)`` → ``(..., b, b)``), computed in the solve dtype."""
    g = generator.to(compute_dtype(generator.dtype))
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=g.device)
    s = g.new_zeros(*g.shape[:-1], block_size, block_size)
    s[..., rows, cols] = g
    return map(s - s.mT)


def rotate_blocks(h: Tensor, q: Tensor, *, transpose: bool = False) -> Tensor:
    """Multiply consecutive blocks of the last dimension of ``h`` by the matrices ``q``
    (``(n/b, b, b)``): :math:`Q_j h_j`, or :math:`Q_j^\\top h_j` with ``transpose``."""
    q = q.to(h.dtype)
    hb = rearrange(h, "... (j b) -> ... j b", b=q.shape[-1])
    # (Q h)_c = Σ_b Q[c, b] h_b ; (Qᵀ h)_c = Σ_b Q[b, c] h_b
    out = torch.einsum("...jb,jbc->...jc" if transpose else "...jb,jcb->...jc", hb, q)
    return rearrange(out, "... j b -> ... (j b)")


@register_transform("block")
class Block(Transform):
    r"""Rotate each block of ``block_size`` consecutive coordinates independently (OFT).

    .. math::

        Q = \operatorname{blockdiag}\bigl(\operatorname{map}(S_1), \ldots,
        \operatorname{map}(S_{n/b})\bigr), \qquad S_i = -S_i^\top \in \mathbb{R}^{b\times b},

    each :math:`S_i` stored as its :math:`b(b-1)/2` upper-triangular entries, zero at init
    (with ``share=True`` one generator serves every block). With ``map="cayley"`` on the
    right of :math:`W` this is OFT (Qiu et al., 2023, arXiv 2306.07280). Exactly orthogonal
    for ``"cayley"`` and ``"exp"``; ``"cayley_neumann"`` truncates the Cayley map's Neumann
    series after ``terms`` matrices (cheaper, approximately orthogonal). Cost per token
    :math:`O(n b)`; :math:`n (b-1)/2` parameters (:math:`b(b-1)/2` shared).

    Args:
        dim: the side dimension ``n``.
        block_size: :math:`b`, at least 2, dividing ``n``. Default: the largest divisor of
            ``n`` that is at most 32.
        map: ``"cayley"``, ``"exp"``, ``"first_order"``, ``"cayley_neumann"`` or a callable
            on batched skew matrices. Default ``"cayley"``.
        share: one generator for all blocks (PEFT's ``block_share``). Default ``False``.
        terms: the number of Neumann terms for ``map="cayley_neumann"``. Default 5.
    """

    def __init__(self, dim: int, *, block_size: int | None = None,
                 map: str | Callable[[Tensor], Tensor] = "cayley", share: bool = False,
                 terms: int = 5) -> None:
        super().__init__(dim)
        require_plane("block", dim)
        if block_size is None:
            block_size = max((b for b in range(2, min(32, dim) + 1) if dim % b == 0), default=2)
        self.block_size = check_int("block", "block_size", block_size, low=2, high=dim,
                                    what="the side dimension")
        if dim % block_size:
            raise ShapeError(f"block: argument 'block_size' expected a divisor of the side "
                             f"dimension {dim}, got {block_size}")
        self.map = map
        self.share = check_bool("block", "share", share)
        self.terms = check_int("block", "terms", terms)
        self._map = resolve_dense_map(
            "block", map, {"cayley_neumann": partial(cayley_neumann, terms=terms)})
        self.generator = nn.Parameter(
            torch.zeros(1 if share else dim // block_size, block_size * (block_size - 1) // 2))

    @property
    def is_orthogonal(self) -> bool:
        return isinstance(self.map, str) and self.map in EXACT_MAPS

    def blocks(self) -> Tensor:
        """The rotations, shape ``(n/b, b, b)``, in the solve dtype."""
        q = skew_blocks(self.generator, self.block_size, self._map)
        b = self.block_size
        return q.expand(self.dim // b, b, b) if self.share else q

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        return rotate_blocks(h, self.blocks(), transpose=transpose)

    def matrix(self) -> Tensor:
        return torch.block_diag(*self.blocks()).to(self.generator.dtype)

    def extra_repr(self) -> str:
        shared = ", share=True" if self.share else ""
        return f"dim={self.dim}, block_size={self.block_size}, map={self.map!r}{shared}"
