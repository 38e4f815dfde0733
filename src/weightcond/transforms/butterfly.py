"""``butterfly``: a product of block-diagonal rotations under butterfly permutations (BOFT)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ShapeError, check_int
from .base import Transform, register_transform, require_plane
from .block import (
    block_generator,
    check_scale,
    generator_repr,
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


Layout = tuple[int, int, int, int]


Order = tuple[int, ...]
Moves = tuple[tuple[str, Order, Order], ...]


def _moves(source: Order, target: Order) -> Moves:
    """The copies that turn a row-major tensor of digits in the order ``source`` into one in
    the order ``target`` (Note (strided block products)): ``(kind, from, to)`` with kind
    ``"view"`` (no copy), ``"chunks"`` (a permuted copy that keeps the innermost digits) or
    ``"transpose"`` (a 2-D transpose)."""
    # merge the digits that stay adjacent and in order: the permutation of the groups
    groups: list[list[int]] = []
    for j in source:
        if groups and target.index(j) == target.index(groups[-1][-1]) + 1:
            groups[-1].append(j)
        else:
            groups.append([j])
    if len(groups) == 1:
        return (("view", source, target),)
    if groups[-1][-1] == target[-1]:
        return (("chunks", source, target),)
    start = next(i for i, g in enumerate(groups) if g[0] == target[0])
    rotated = tuple(j for g in groups[start:] + groups[:start] for j in g)
    if rotated == target:
        return (("transpose", source, target),)
    # a transpose that brings the target's innermost digits last, then chunks
    cut = next(i for i, g in enumerate(groups) if target[-1] in g) + 1
    rotated = tuple(j for g in groups[cut:] + groups[:cut] for j in g)
    return (("transpose", source, rotated), *_moves(rotated, target))


def _cost(moves: Moves) -> int:
    return sum({"view": 0, "chunks": 1, "transpose": 2}[kind] for kind, _, _ in moves)


@dataclass(frozen=True)
class StridedRoute:
    """A product of strided block-diagonal matrices (:func:`strided_route`), validated once:
    the side dimension as digits (digit ``j``, ``0`` the least significant, has size
    ``sizes[j]``; label ``-1`` the tokens) and the copies between the ``bmm`` of each layout,
    all decided before any tensor is seen."""

    sizes: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]  # per layout: (a·l, v1·v0)
    # per layout: the moves to its input, and whether that is stored (tokens, a·l, ·)
    inputs: tuple[tuple[Moves, bool], ...]
    output: Moves  # from the last layout to the row-major (tokens, n)
    # the backward: per layout, the moves of the gradient at its output into its
    # contiguous (a·l, tokens, ·); then from the first layout to (tokens, n)
    gradients: tuple[Moves, ...]
    gradient: Moves

    def move(self, t: Tensor, moves: Moves, tokens: int) -> Tensor:
        """``t``, row-major in the first order of ``moves``, row-major in the last."""
        for kind, source, target in moves:
            t = t.reshape([tokens if j < 0 else self.sizes[j] for j in source])
            if kind == "transpose":
                k = source.index(target[0])
                t = t.reshape(math.prod(t.shape[:k]), -1).t().contiguous()
            else:
                t = t.permute([source.index(j) for j in target])
                t = t if kind == "view" else t.contiguous()
        return t

    def rows(self, t: Tensor, k: int, tokens: int) -> Tensor:
        """The forward's input ``t`` to layout ``k`` as ``(a·l, tokens, v1·v0)``."""
        moves, tokens_first = self.inputs[k]
        batch, width = self.shapes[k]
        t = self.move(t, moves, tokens)
        return t.reshape(tokens, batch, width).transpose(0, 1) if tokens_first else \
            t.reshape(batch, tokens, width)

    def run(self, x: Tensor, blocks: Sequence[Tensor], transpose: bool) -> Tensor:
        """The product on the rows of ``x`` (``(tokens, n)``, row-major) with PyTorch's
        operators."""
        out, tokens = x, x.shape[0]
        for k, q in enumerate(blocks):
            out = torch.bmm(self.rows(out, k, tokens), q if transpose else q.mT)
        return self.move(out, self.output, tokens).reshape(tokens, -1)


def strided_route(n: int, layouts: Sequence[Layout]) -> StridedRoute:
    """Validate ``layouts`` (see :func:`rotate_strided_blocks`) of the side dimension ``n``
    and plan the copies between them."""
    cuts = {1, n}
    for a, v1, ll, v0 in layouts:
        if a * v1 * ll * v0 != n:
            raise ShapeError(f"strided_route: layout {(a, v1, ll, v0)} does not split the side "
                             f"dimension {n}")
        cuts |= {v0, ll * v0, v1 * ll * v0}
    stride = sorted(cuts)
    if any(high % low for low, high in itertools.pairwise(stride)):
        raise ShapeError(f"strided_route: the layouts {list(layouts)} split the side "
                         f"dimension {n} at strides {stride} that do not divide each other")

    def digits(low: int, high: int) -> Order:  # labels of strides in [low, high), high first
        return tuple(j for j in range(len(stride) - 2, -1, -1) if low <= stride[j] < high)

    natural = (-1, *digits(1, n))
    batch = [(*digits(v1 * ll * v0, n), *digits(v0, ll * v0)) for a, v1, ll, v0 in layouts]
    width = [(*digits(ll * v0, v1 * ll * v0), *digits(1, v0)) for a, v1, ll, v0 in layouts]
    orders = [(*b, -1, *w) for b, w in zip(batch, width, strict=True)]
    inputs = []
    for k in range(len(layouts)):
        source = orders[k - 1] if k else natural
        # a strided view of (tokens, a·l, ·) where that copies less, else contiguous
        first, second = _moves(source, orders[k]), _moves(source, (-1, *batch[k], *width[k]))
        inputs.append((second, True) if _cost(second) < _cost(first) else (first, False))
    return StridedRoute(
        sizes=tuple(high // low for low, high in itertools.pairwise(stride)),
        shapes=tuple((a * ll, v1 * v0) for a, v1, ll, v0 in layouts),
        inputs=tuple(inputs), output=_moves(orders[-1], natural),
        gradients=tuple(_moves(orders[k + 1] if k + 1 < len(orders) else natural, orders[k])
                        for k in range(len(orders))),
        gradient=_moves(orders[0], natural))


class _StridedBlocks(torch.autograd.Function):
    """:func:`rotate_strided_blocks` with a backward of its own (Note (strided block
    products))."""

    @staticmethod
    def forward(ctx, x: Tensor, route: StridedRoute, transpose: bool,  # type: ignore[override]
                *blocks: Tensor) -> Tensor:
        inputs, out, tokens = [], x, x.shape[0]
        for k, q in enumerate(blocks):
            rows = route.rows(out, k, tokens)
            inputs.append(rows)
            out = torch.bmm(rows, q if transpose else q.mT)
        ctx.save_for_backward(*inputs, *blocks)
        ctx.route, ctx.transpose = route, transpose
        return route.move(out, route.output, tokens).reshape(tokens, -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        route, transpose = ctx.route, ctx.transpose
        saved = ctx.saved_tensors
        count = len(saved) // 2
        inputs, blocks = saved[:count], saved[count:]
        needed = [ctx.needs_input_grad[0], *ctx.needs_input_grad[3:]]
        # the lowest that needs a gradient: 0 for x, k + 1 for block k
        first = next((k for k, need in enumerate(needed) if need), len(needed))
        grads: list[Tensor | None] = [None] * count
        if first == len(needed):
            return None, None, None, *grads
        tokens, g = grad.shape[0], grad.contiguous()
        for k in range(count - 1, -1, -1):
            # the gradient contiguous in layout k: Gᵀ X is slow on a strided G
            batch, width = route.shapes[k]
            g = route.move(g, route.gradients[k], tokens).reshape(batch, tokens, width)
            if ctx.needs_input_grad[3 + k]:
                # Gᵀ X is the gradient of q in X qᵀ (that of qᵀ in X q)
                product = torch.bmm(g.mT, inputs[k])
                grads[k] = product.mT if transpose else product
            if k == first - 1:  # nothing below needs a gradient
                break
            g = torch.bmm(g, blocks[k].mT if transpose else blocks[k])
        grad_x = route.move(g, route.gradient, tokens).reshape(tokens, -1) \
            if ctx.needs_input_grad[0] else None
        return grad_x, None, None, *grads


def rotate_strided_blocks(h: Tensor, route: StridedRoute, blocks: Sequence[Tensor], *,
                          transpose: bool = False) -> Tensor:
    """Multiply the last dimension of ``h`` by a product of strided block-diagonal matrices,
    the first layout of ``route`` (:func:`strided_route`) first: :math:`M_k \\cdots M_1 h`,
    or with ``transpose`` :math:`M_k^\\top \\cdots M_1^\\top h` (route the layouts in
    reverse for :math:`(M_k \\cdots M_1)^\\top h`).

    A layout ``(a, v1, l, v0)`` views the last dimension ``n = a·v1·l·v0`` in row-major
    order; :math:`M` mixes the ``(v1, v0)`` coordinates of each ``(a, l)`` independently, by
    the matrices ``blocks[k]`` (``(a·l, v1·v0, v1·v0)``, ``(a, l)`` row-major). A plain
    block-diagonal matrix of blocks of ``b`` is ``(n/b, 1, 1, b)``; a butterfly factor
    :math:`P B P^\\top` (:func:`butterfly_permutation`) is ``(n/(b·2^i), 2, 2^i, b/2)``;
    rounds of Givens rotations of strides ``2^t`` for ``t`` in ``[low, high)`` are one
    ``(n/2^high, 2^(high-low), 2^low, 1)``.

    Note (strided block products): each factor is one ``bmm`` on ``(a·l, tokens, v1·v0)``.
    The product moves from one layout to the next as a permutation of the digits that
    refine both layouts' splits of ``n`` (each split must divide the next larger one), never
    as an index gather: a gather reads scattered entries and its backward is a scatter-add
    (for ``butterfly``, block 32, one factor, 2048 tokens at 1024², the two identity gathers
    per pass cost about as much as the block product, and the step was 1.6–2.2 × LoRA's).
    A move is a view where the strides allow (the first factor reads ``h`` as a strided
    ``(tokens, a·l, ·)``, as :func:`~weightcond.transforms.block.rotate_blocks` does), a
    permuted copy that keeps the innermost digits, or a 2-D transpose: PyTorch copies a 2-D
    transpose in cache blocks, any other permutation that moves the innermost digits
    element by element (moving Givens' ``(32, tokens, 32)`` product to the next layout,
    2048 tokens, float32: 3.9 ms as one permuted copy, 1.1 ms as a 2-D transpose, against
    1.6 ms for a ``bmm``). The route decides the moves once, from the layouts alone. The
    backward saves the factors' inputs in their layouts and computes each block's gradient
    as :math:`G^\\top X` with ``G`` contiguous: autograd's :math:`X^\\top G` on strided
    views ran up to 10 × slower in bfloat16 (5.4 against 0.47 ms at 1024², 2048 tokens,
    block 32); it stops as soon as nothing below needs a gradient (no input gradient: one
    ``bmm`` and one move fewer). Under ``torch.func`` transforms and autocast the same
    forward runs on PyTorch's operators. The moves never depend on whether ``h`` needs a
    gradient (the same bits under :func:`torch.no_grad`).
    """
    n, lead = h.shape[-1], h.shape[:-1]
    x = h.reshape(-1, n).contiguous()
    blocks = [q.to(h.dtype) for q in blocks]
    device = h.device.type
    if torch._C._are_functorch_transforms_active() or (
            torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        out = route.run(x, blocks, transpose)
    else:
        out = _StridedBlocks.apply(x, route, transpose, *blocks)
    return out.view(*lead, n)


@register_transform("butterfly")
class Butterfly(Transform):
    r"""Rotate by a butterfly product of block-diagonal rotations (BOFT).

    .. math::

        Q = \prod_{i=0}^{m-1} P_i\, B_i\, P_i^\top, \qquad
        B_i = \operatorname{blockdiag}\bigl(\operatorname{cayley}(S_{i,1}), \ldots\bigr),

    with :math:`m` = ``factors`` block-diagonal factors of ``block_size`` blocks and
    :math:`P_i` the butterfly permutation that interleaves half-blocks across runs of
    ``block_size · 2^i`` coordinates (:math:`P_0 = I`), applied as changes of layout between
    the block products (``rotate_strided_blocks``), never as permutation matrices or
    index gathers. Generators are zero at init (:math:`Q = I`); exactly orthogonal for
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

    example_options: ClassVar[dict[str, object]] = {"block_size": 32}

    symbol: ClassVar[str] = r"Q_{BF}"
    cost_per_token: ClassVar[str] = r"O(m\,{n}\,b)"
    published: ClassVar[dict[tuple[str, str], str]] = {
        ("right", "pre"): "BOFT (without an update, with a left diag)",
        ("right", "post"): "BOFT (without an update, with a left diag)",
    }

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
        # factor i: P_i B_i P_iᵀ mixes (bit i of c // half, c mod half) of coordinate c
        half = block_size // 2
        layouts = [(dim // (block_size * 2**i), 2, 2**i, half) if factors > 1 else
                   (dim // block_size, 1, 1, block_size) for i in range(factors)]
        # Q h applies the last factor first; Qᵀ h the first factor first
        self._routes = (strided_route(dim, layouts[::-1]), strided_route(dim, layouts))
        self.register_constant("_skew_index", skew_index(self.block_size))

    @property
    def is_orthogonal(self) -> bool:
        return isinstance(self.map, str) and self.map in EXACT_MAPS

    @property
    def apply_flops(self) -> int:
        return 2 * self.dim * self.block_size * self.factors

    def blocks(self) -> Tensor:
        """The block rotations, shape ``(m, n/b, b, b)``, in the solve dtype."""
        return skew_blocks(self.generator, self._skew_index, self._map, scale=self.scale,
                           full=self.full)

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        blocks = self.blocks()
        # Q h applies the last factor first; Qᵀ h the first factor first, each transposed
        order = range(self.factors) if transpose else range(self.factors - 1, -1, -1)
        return rotate_strided_blocks(h, self._routes[transpose], [blocks[i] for i in order],
                                     transpose=transpose)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, block_size={self.block_size}, factors={self.factors}, "
                f"map={self.map!r}{generator_repr(self.scale, self.full)}")
