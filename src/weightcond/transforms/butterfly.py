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
from .base import Transform, compute_dtype, register_transform, require_plane
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

    @property
    def viewed(self) -> bool:
        """One layout whose input is a strided view of ``(tokens, n)``: its gradient, and
        the output it came to (same digits), are read in place too."""
        moves, tokens_first = self.inputs[0]
        return len(self.shapes) == 1 and tokens_first and \
            all(kind == "view" for kind, _, _ in moves)

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

    def move_into(self, t: Tensor, moves: Moves, tokens: int, dest: Tensor) -> None:
        """:meth:`move`, its last copy written into the contiguous ``dest`` (no temporary)."""
        for n, (kind, source, target) in enumerate(moves):
            t = t.reshape([tokens if j < 0 else self.sizes[j] for j in source])
            if kind == "transpose":
                k = source.index(target[0])
                t = t.reshape(math.prod(t.shape[:k]), -1).t()
            else:
                t = t.permute([source.index(j) for j in target])
            if n + 1 < len(moves):
                t = t.contiguous()
        dest.view(t.shape).copy_(t)

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


#: a pass over the activations runs in this many chunks of tokens (at most), each chunk at
#: least this many elements (Note (rotations recomputed from their output)): a chunk's
#: temporaries, the gradient and the output stacked and moved, stay a few hundredths of
#: an activation
_CHUNKS = 32
_CHUNK_ELEMENTS = 2**16


def chunk_rows(tokens: int, n: int, wider: int = 1) -> int:
    """Tokens per chunk of a pass over a ``(tokens, n)`` activation: a :data:`_CHUNKS`-th
    of them (``wider`` times fewer when the chunk computes in a wider dtype), at least
    :data:`_CHUNK_ELEMENTS` elements, at most half of them (the gradient and the output
    stacked are then no larger than one activation)."""
    return max(1, min(-(-tokens // 2),
                      max(-(-tokens // (_CHUNKS * wider)), -(-_CHUNK_ELEMENTS // n))))


class _RecomputedStridedBlocks(torch.autograd.Function):
    """:func:`rotate_strided_blocks` of orthogonal blocks, saving only its output (Note
    (rotations recomputed from their output))."""

    @staticmethod
    def forward(ctx, x: Tensor, route: StridedRoute, transpose: bool,  # type: ignore[override]
                *blocks: Tensor) -> Tensor:
        tokens = x.shape[0]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        step = chunk_rows(tokens, x.shape[1])
        for start in range(0, tokens, step):
            t = x[start:start + step]
            c = t.shape[0]
            for k, q in enumerate(blocks):
                t = torch.bmm(route.rows(t, k, c), q if transpose else q.mT)
            route.move_into(t, route.output, c, out[start:start + c])
        ctx.save_for_backward(out, *blocks)
        ctx.route, ctx.transpose = route, transpose
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out, *blocks = ctx.saved_tensors
        need_x, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        if not need_x and not any(need_q):
            return None, None, None, *([None] * len(blocks))
        grad_x, grads = recomputed_backward(ctx.route, ctx.transpose, out, grad, blocks,
                                            need_x, need_q)
        return grad_x, None, None, *grads


def recomputed_backward(route: StridedRoute, transpose: bool, out: Tensor, grad: Tensor,
                        blocks: Sequence[Tensor], need_x: bool, need_q: Sequence[bool]
                        ) -> tuple[Tensor | None, list[Tensor | None]]:
    """The input's and the blocks' gradients of ``out`` = :func:`rotate_strided_blocks`
    of orthogonal ``blocks`` given the gradient ``grad`` at ``out``, the inputs
    recomputed from ``out`` (Note (rotations recomputed from their output))."""
    count = len(blocks)
    work = compute_dtype(grad.dtype)
    # the forward took rows @ m; the backward takes g @ mᵀ and, m orthogonal, recovers
    # the rows as out @ mᵀ: one product on the two stacked
    mats = [(q.mT if transpose else q).to(work) for q in blocks]
    lowest = next((k for k, need in enumerate(need_q) if need), count)
    sums = [torch.zeros(q.shape, dtype=work, device=q.device) if need else None
            for q, need in zip(blocks, need_q, strict=True)]
    grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device) \
        if need_x else None
    tokens, n = grad.shape
    step = chunk_rows(tokens, n, max(1, work.itemsize // grad.dtype.itemsize))
    if route.viewed:  # one layout, read in place (no copies in)
        for start in range(0, tokens, step):
            g = grad[start:start + step].to(work)
            c = g.shape[0]
            rows = route.rows(g, 0, c)
            if need_q[0]:
                inputs = torch.bmm(route.rows(out[start:start + c].to(work), 0, c), mats[0])
                sums[0].baddbmm_(rows.mT, inputs)  # type: ignore[union-attr]
                del inputs
            if grad_x is not None:
                route.move_into(torch.bmm(rows, mats[0]), route.gradient, c,
                                grad_x[start:start + c])
        step = tokens  # done
    for start in range(0, tokens if not route.viewed else 0, step):
        g = grad[start:start + step]
        c = g.shape[0]
        carry = lowest < count  # the output rides along: some block needs its input
        t = (torch.cat([g, out[start:start + c]]) if carry else g).to(work)
        for k in range(count - 1, -1, -1):
            rows = 2 * c if carry else c
            batch, width = route.shapes[k]
            t = route.move(t, route.gradients[k], rows).reshape(batch, rows, width)
            below = need_x or lowest < k  # a gradient is needed below layout k
            if need_q[k]:
                product = torch.bmm(t, mats[k]) if below else None
                inputs = product[:, c:] if product is not None else \
                    torch.bmm(t[:, c:], mats[k])
                # Gᵀ X with G contiguous (Note (strided block products))
                sums[k].baddbmm_(t[:, :c].mT, inputs)  # type: ignore[union-attr]
                if product is None:
                    break
                t = product
                del product, inputs  # the next move's input is t alone
            else:
                t = torch.bmm(t, mats[k])
            if carry and lowest >= k:  # no block below needs its input
                t, carry = t[:, :c], False
        if grad_x is not None:
            route.move_into(t, route.gradient, c, grad_x[start:start + c])
    grads = [None if s is None else (s.mT if transpose else s).to(q.dtype)
             for s, q in zip(sums, blocks, strict=True)]
    return grad_x, grads


def _weight_rows(out_features: int, in_features: int, tokens: int) -> int:
    """Rows of ``W Q`` formed at a time (Note (the fused strided product)): at most an
    eighth of an output activation of ``tokens``, at least 64 rows."""
    return max(1, min(out_features, max(64, tokens * out_features // (8 * in_features))))


class _StridedRotatedLinear(torch.autograd.Function):
    """``x (W Q)ᵀ + b`` for ``Q`` a product of orthogonal strided block-diagonal matrices
    (:func:`strided_rotated_linear`)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                routes: tuple[StridedRoute, StridedRoute], *blocks: Tensor) -> Tensor:
        tokens, (out_f, in_f) = x.shape[0], weight.shape
        # without the input's gradient, W Q is kept for the backward when it has fewer rows
        # than the tokens: its gradient gᵀ x then takes the place of g (W Q), and the
        # blocks' gradients run over its rows (the weight form's backward); the products
        # are the same either way (the same bits with and without gradients)
        keep = not ctx.needs_input_grad[0] and out_f <= tokens
        kept = torch.empty(weight.shape, dtype=x.dtype, device=x.device) if keep else None
        y = torch.empty(tokens, out_f, dtype=x.dtype, device=x.device)
        step = _weight_rows(out_f, in_f, tokens)
        for start in range(0, out_f, step):
            wq = _weight_times(weight[start:start + step], routes, blocks)
            if kept is not None:
                kept[start:start + wq.shape[0]] = wq
            part = y[:, start:start + wq.shape[0]]
            if bias is None:
                torch.mm(x, wq.t(), out=part)
            else:
                torch.addmm(bias[start:start + wq.shape[0]], x, wq.t(), out=part)
        ctx.save_for_backward(x, weight, kept, *blocks)
        ctx.routes, ctx.has_bias = routes, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # under autocast the forward's GEMMs ran in the autocast dtype (that of grad): the
        # backward runs in it too, as autograd's would
        x, weight, kept, *blocks = (None if t is None else t.to(grad.dtype)
                                    for t in ctx.saved_tensors)
        route = ctx.routes[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_q = ctx.needs_input_grad[4:]
        grad_x = grad_w = grad_b = None
        grads: list[Tensor | None] = [None] * len(blocks)
        tokens, (out_f, in_f) = x.shape[0], weight.shape
        if kept is not None and any(need_q) and not need_x:
            # the weight form's gradient: gᵀ x at W Q, back through the blocks over the rows
            # of W Q, which were kept (its rows are fewer than the tokens)
            _, found = recomputed_backward(ctx.routes[1], True, kept, grad.mT @ x,
                                           blocks[::-1], False, need_q[::-1])
            grads = found[::-1]
        elif need_x or any(need_q):
            # g (W Q), accumulated over rows of W Q formed again
            grad_x = torch.empty(tokens, in_f, dtype=grad.dtype, device=grad.device)
            step = _weight_rows(out_f, in_f, tokens)
            for start in range(0, out_f, step):
                wq = _weight_times(weight[start:start + step], ctx.routes, blocks)
                g = grad[:, start:start + wq.shape[0]]
                if start == 0:
                    torch.mm(g, wq, out=grad_x)
                else:
                    grad_x.addmm_(g, wq)
        if any(need_q) and grad_x is not None:
            grads = _gradients_from_input_grad(grad_x, x, route, blocks, need_q)
        if need_w:
            # the gradient of W Q is gᵀ x; that of W, (gᵀ x) Qᵀ: Q applied to its rows
            grad_w = route.run(grad.mT @ x, blocks, False)
        if ctx.has_bias and need_b:
            grad_b = grad.sum(0)
        return grad_x if need_x else None, grad_w, grad_b, None, *grads


def _weight_times(rows: Tensor, routes: tuple[StridedRoute, StridedRoute],
                  blocks: Sequence[Tensor]) -> Tensor:
    """``rows Q`` for rows of ``W``: ``Qᵀ`` applied to each row (the second route, the blocks
    in reverse, each transposed)."""
    return routes[1].run(rows, blocks[::-1], True)


def _gradients_from_input_grad(grad_x: Tensor, x: Tensor, route: StridedRoute,
                               blocks: Sequence[Tensor], need: Sequence[bool]
                               ) -> list[Tensor | None]:
    """The blocks' gradients of ``y = W Q x`` from the input's gradient
    ``∂x = Qᵀ Wᵀ g`` (Note (the fused strided product)): the gradient at the output of
    factor ``k`` is ``F_k ⋯ F_1 ∂x``, its input ``F_{k-1} ⋯ F_1 x``, both by the forward's
    products, on the two stacked, token chunk by token chunk."""
    work = compute_dtype(grad_x.dtype)
    mats = [q.mT.to(work) for q in blocks]
    last = max(k for k, n in enumerate(need) if n)
    sums = [torch.zeros(q.shape, dtype=work, device=q.device) if n else None
            for q, n in zip(blocks, need, strict=True)]
    tokens, n = x.shape
    step = chunk_rows(tokens, n, max(1, work.itemsize // x.dtype.itemsize))
    for start in range(0, tokens, step):
        if last == 0 and route.inputs[0][1]:  # the first layout alone, read in place
            c = min(step, tokens - start)
            # (∂x m)ᵀ X = mᵀ (∂xᵀ X): the small product after the one over the tokens
            sums[0].baddbmm_(mats[0].mT, torch.bmm(  # type: ignore[union-attr]
                route.rows(grad_x[start:start + c].to(work), 0, c).mT,
                route.rows(x[start:start + c].to(work), 0, c)))
            continue
        t = torch.cat([grad_x[start:start + step], x[start:start + step]]).to(work)
        c = t.shape[0] // 2
        for k in range(last + 1):
            t = route.rows(t, k, 2 * c)
            if k == last:  # the inputs' half is needed no further: mᵀ (Gᵀ X)
                sums[k].baddbmm_(mats[k].mT,  # type: ignore[union-attr]
                                 torch.bmm(t[:, :c].mT, t[:, c:]))
                break
            product = torch.bmm(t, mats[k])
            if need[k]:
                # Gᵀ X, the gradient of q in X qᵀ, with G contiguous
                sums[k].baddbmm_(product[:, :c].mT, t[:, c:])  # type: ignore[union-attr]
            t = product
            del product
    return [None if s is None else s.to(q.dtype) for s, q in zip(sums, blocks, strict=True)]


def strided_rotated_linear(x: Tensor, weight: Tensor, bias: Tensor | None,
                           routes: tuple[StridedRoute, StridedRoute],
                           blocks: Sequence[Tensor]) -> Tensor:
    """:math:`x (W Q)^\\top + b` for 2-D ``x``, with ``Q h`` = :func:`rotate_strided_blocks`
    of ``blocks`` on ``routes[0]`` and ``Qᵀ h`` that of the blocks in reverse on
    ``routes[1]`` (transposed), every block orthogonal.

    Note (the fused strided product): the weight form of an orthogonal strided product
    (the planner's ``fused``, as :meth:`~weightcond.transforms.Block.rotated_linear`), for
    ``givens`` and ``butterfly`` on the input side before the update. ``W Q`` is formed a
    few rows at a time (:func:`_weight_rows`, an eighth of an output activation) and each
    part goes straight into its columns of the output, so neither ``W Q`` nor ``Q x`` is
    ever whole: the step allocates no activation beyond the output. The backward forms
    ``W Q`` again the same way for the input's gradient :math:`\\partial x = g\\,W Q` (the
    GEMM that the gradient of a rotation of the input needs in any form), and reads the
    blocks' gradients off it (:func:`_gradients_from_input_grad`): it rests on
    :math:`F_k^{-1} = F_k^\\top`, so only orthogonal blocks take this form; it is tested
    against the dense form in float64."""
    blocks = [q.to(x.dtype) for q in blocks]
    if plain_operators(x.device.type):
        return torch.nn.functional.linear(x, _weight_times(weight, routes, blocks), bias)
    return _StridedRotatedLinear.apply(x, weight, bias, routes, *blocks)


def plain_operators(device: str) -> bool:
    """Whether the rotations run on PyTorch's operators instead of their own autograd
    Functions: under ``torch.func`` transforms (which refuse a Function's own backward),
    autocast (whose casts the operators record) and the compiler (whose dynamic token
    count a Function's loop over token chunks would specialize)."""
    return torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling() or (
        torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))


def rotate_strided_blocks(h: Tensor, route: StridedRoute, blocks: Sequence[Tensor], *,
                          transpose: bool = False, orthogonal: bool = False) -> Tensor:
    """Multiply the last dimension of ``h`` by a product of strided block-diagonal matrices,
    the first layout of ``route`` (:func:`strided_route`) first: :math:`M_k \\cdots M_1 h`,
    or with ``transpose`` :math:`M_k^\\top \\cdots M_1^\\top h` (route the layouts in
    reverse for :math:`(M_k \\cdots M_1)^\\top h`). ``orthogonal``: every block is
    orthogonal, and the backward recomputes the factors' inputs from the output instead of
    saving them (Note (rotations recomputed from their output)).

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
    backward computes each block's gradient as :math:`G^\\top X` with ``G`` contiguous:
    autograd's :math:`X^\\top G` on strided views ran up to 10 × slower in bfloat16 (5.4
    against 0.47 ms at 1024², 2048 tokens, block 32); it stops as soon as nothing below
    needs a gradient (no input gradient: one ``bmm`` and one move fewer). Under
    ``torch.func`` transforms, autocast and the compiler the same forward runs on
    PyTorch's operators (:func:`plain_operators`).
    The moves never depend on whether ``h`` needs a gradient (the same bits under
    :func:`torch.no_grad`).

    Note (rotations recomputed from their output): with ``orthogonal`` (every block
    orthogonal: an exact map) the product saves only its output and the blocks. The
    backward recovers each factor's input from its output, :math:`X = Y M^\\top` for the
    forward's :math:`Y = X M`, in the same ``bmm`` as the gradient :math:`G M^\\top` (the
    two stacked along the tokens), and both the forward and the backward run over chunks
    of tokens (:func:`chunk_rows`: a 32nd of them) into preallocated results, so the
    step's activation-sized tensors are the input, the output (which the next node saves
    or the caller holds anyway) and the input's gradient. Saving every factor's input
    instead took up to 2.4 × the peak step memory of PEFT LoRA (givens, 1024² and 4096²,
    2048 tokens, float32); recomputed, 0.75–1.09 ×. It costs one ``bmm`` per factor on
    the output's chunks, about what the forward's copies into the saved layouts cost, and
    rounds at the dtype's precision: in float32 the blocks' gradients were within
    ``1.2e-6`` (relative to their largest entry) of the float64 dense form, against
    ``8e-7`` saved; in bfloat16 and float16 the backward runs in float32 (the blocks as
    rounded to the activations' dtype, which are orthogonal only to that dtype's
    precision), within ``8.4e-3`` of float64, against ``6.3e-3`` saved (bfloat16's
    epsilon is ``7.8e-3``). A map that is not exactly orthogonal (``first_order``, a
    callable) saves the inputs as before.
    """
    n, lead = h.shape[-1], h.shape[:-1]
    x = h.reshape(-1, n).contiguous()
    blocks = [q.to(h.dtype) for q in blocks]
    device = h.device.type
    if plain_operators(device):
        out = route.run(x, blocks, transpose)
    elif orthogonal:
        out = _RecomputedStridedBlocks.apply(x, route, transpose, *blocks)
    else:
        out = _StridedBlocks.apply(x, route, transpose, *blocks)
    return out.view(*lead, n)


#: factors merge into one block-diagonal matrix when its blocks, of ``b · 2^(m-1)``, are at
#: most this many times the ``b · m`` coordinates the factors' blocks span together
#: (Note (merged factors))
_MERGE_RATIO = 2


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

    Note (merged factors): the factors all act within runs of :math:`s = b\, 2^{m-1}`
    coordinates, so :math:`Q` is block-diagonal with blocks of :math:`s`. When
    :math:`s \le 2\, b\, m` (every ``m`` up to 4), :meth:`apply` multiplies by those
    blocks, formed once per call from the factors (the factors applied to ``s`` columns of
    the identity per run, ``n·s·b·m`` operations), in one ``bmm`` on a view of the
    activations: :math:`2 n s` operations per token instead of :math:`2 n b m`, but none of
    the copies between the factors' layouts (``b = 32``, two factors at 1024², 2048 tokens:
    the copies cost more than the products). Each block's gradient flows back to the
    factors through that small product.

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
        self._factor_routes = (strided_route(dim, layouts[::-1]), strided_route(dim, layouts))
        # Note (merged factors): runs of `span` coordinates, one dense block each
        span = block_size * 2 ** (factors - 1)
        self._span = span if factors > 1 and span <= _MERGE_RATIO * block_size * factors \
            else None
        merged = strided_route(dim, [(dim // span, 1, 1, span)]) if self._span else None
        self._routes = (merged, merged) if merged else self._factor_routes
        self.register_constant("_skew_index", skew_index(self.block_size))

    @property
    def is_orthogonal(self) -> bool:
        return isinstance(self.map, str) and self.map in EXACT_MAPS

    @property
    def apply_flops(self) -> int:
        width = self.block_size * self.factors if self._span is None else self._span
        return 2 * self.dim * width

    def blocks(self) -> Tensor:
        """The block rotations, shape ``(m, n/b, b, b)``, in the solve dtype."""
        return skew_blocks(self.generator, self._skew_index, self._map, scale=self.scale,
                           full=self.full)

    def _products(self) -> list[Tensor]:
        """The matrices :meth:`apply` multiplies by for ``Q h``, last factor first: the
        factors' blocks, or with merged factors the ``(n/s, s, s)`` blocks of ``Q`` itself
        (Note (merged factors))."""
        blocks = self.blocks()
        factors = [blocks[i] for i in range(self.factors - 1, -1, -1)]
        if self._span is None:
            return factors
        # Q applied to the rows of s columns of I per run: row r of run g is column r of
        # the run's block
        s, runs = self._span, self.dim // self._span
        eye = torch.eye(s, dtype=blocks.dtype, device=blocks.device).repeat(1, runs)
        rows = self._factor_routes[0].run(eye, factors, False)
        return [rows.view(s, runs, s).permute(1, 2, 0)]

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        products = self._products()
        # Qᵀ h applies the first factor first, each transposed
        return rotate_strided_blocks(h, self._routes[transpose],
                                     products[::-1] if transpose else products,
                                     transpose=transpose, orthogonal=self.is_orthogonal)

    @property
    def fuses_linear(self) -> bool:
        return self.is_orthogonal

    def rotated_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """:math:`x (W Q)^\\top + b` with :math:`W Q` formed a few rows at a time, for the
        exact maps (Note (the fused strided product))."""
        if not self.fuses_linear:
            return super().rotated_linear(x, weight, bias)
        return strided_rotated_linear(x, weight, bias, self._routes, self._products())

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, block_size={self.block_size}, factors={self.factors}, "
                f"map={self.map!r}{generator_repr(self.scale, self.full)}")
