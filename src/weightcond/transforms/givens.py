"""``givens``: rounds of disjoint plane rotations with butterfly strides."""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import check_int
from .base import Transform, compute_dtype, register_transform, require_plane
from .butterfly import (
    Layout,
    chunk_rows,
    plain_operators,
    rotate_strided_blocks,
    strided_rotated_linear,
    strided_route,
)

# rounds of consecutive strides multiplied into one block product: blocks of at most 2^this
_SEGMENT_BITS = 5


def _segments(bits: list[int]) -> list[tuple[int, int]]:
    """Split rounds of strides ``2^bits[r]`` into runs of consecutive bits ``[low, high)``
    of near-equal length, at most :data:`_SEGMENT_BITS` each."""
    runs: list[list[int]] = []
    for t in bits:
        if runs and t == runs[-1][-1] + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    found = []
    for run in runs:
        parts = -(-len(run) // _SEGMENT_BITS)
        edges = [run[0] + len(run) * k // parts for k in range(parts + 1)]
        found += list(itertools.pairwise(edges))
    return found


class _PairedBlocks(torch.autograd.Function):
    """``Q h`` for two segments of rounds (Note (two segments in place)): ``low``, ``(H, L,
    L)``, mixes the low digit of each high one, then ``high``, ``(L, H, H)``, the high digit
    of each low one; ``x`` is ``(tokens, H·L)``, row-major."""

    @staticmethod
    def forward(ctx, x: Tensor, low: Tensor, high: Tensor  # type: ignore[override]
                ) -> Tensor:
        tokens, (h, ll) = x.shape[0], low.shape[:2]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        step = chunk_rows(tokens, x.shape[1])
        for start in range(0, tokens, step):
            rows = x[start:start + step]
            c = rows.shape[0]
            # (H, L, c) read in place; then per low digit (c, H) read in place
            y = torch.bmm(low, rows.view(c, h, ll).permute(1, 2, 0))
            z = torch.bmm(y.permute(1, 2, 0), high.mT)  # (L, c, H)
            out[start:start + c].view(c * h, ll).copy_(z.view(ll, c * h).t())
        ctx.save_for_backward(out, low, high)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out, low, high = ctx.saved_tensors
        need_x, need_low, need_high = ctx.needs_input_grad
        work = compute_dtype(grad.dtype)
        low_w, high_w = low.to(work), high.to(work)
        (h, ll), tokens = low.shape[:2], grad.shape[0]
        grad_low = torch.zeros(low.shape, dtype=work, device=low.device) if need_low else None
        grad_high = torch.zeros(high.shape, dtype=work, device=high.device) \
            if need_high else None
        grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device) \
            if need_x else None
        stacked = need_low or need_high  # the output rides along to recompute the inputs
        step = chunk_rows(tokens, grad.shape[1], max(1, work.itemsize // grad.dtype.itemsize))
        for start in range(0, tokens, step):
            g = grad[start:start + step]
            c = g.shape[0]
            both = torch.empty(ll, 2 * c if stacked else c, h, dtype=work, device=g.device)
            # (L, c, H): the gradient at the output and the output, one transposed copy each
            both[:, :c].view(ll, c * h).copy_(g.view(c * h, ll).t())
            if stacked:
                both[:, c:].view(ll, c * h).copy_(out[start:start + c].view(c * h, ll).t())
            # (L, H, ·): highᵀ applied to each; high orthogonal, the second half is y
            middle = torch.bmm(high_w.mT, both.mT)
            if grad_high is not None:
                grad_high.baddbmm_(both[:, :c].mT, middle[:, :, c:].mT)
            del both
            if not (need_x or need_low):
                continue
            # (H, L, ·): lowᵀ on each, per high digit (L, ·) read in place
            inputs = torch.bmm(low_w.mT, middle.permute(1, 0, 2))
            if grad_low is not None:
                grad_low.baddbmm_(middle.permute(1, 0, 2)[:, :, :c], inputs[:, :, c:].mT)
            del middle
            if grad_x is not None:
                grad_x[start:start + c].copy_(inputs[:, :, :c].reshape(h * ll, c).t())
        return grad_x, None if grad_low is None else grad_low.to(low.dtype), \
            None if grad_high is None else grad_high.to(high.dtype)


def butterfly_pairs(dim: int, stride: int) -> list[tuple[int, int]]:
    """Disjoint pairs ``(i, i + stride)`` with ``(i // stride)`` even: one butterfly stage."""
    return [(i, i + stride) for i in range(dim - stride) if (i // stride) % 2 == 0]


@register_transform("givens")
class Givens(Transform):
    r"""Apply rounds of disjoint Givens (plane) rotations.

    .. math::

        Q = G_R \cdots G_2 G_1, \qquad
        G_r = \prod_{(a, b) \in \text{round } r} R_{ab}(\theta),\quad
        R_{ab}(\theta) = \begin{pmatrix} \cos\theta & -\sin\theta \\
        \sin\theta & \cos\theta \end{pmatrix} \text{ on coordinates } (a, b).

    Round ``r`` pairs ``i`` with ``i + s`` for the butterfly stride
    :math:`s = 2^{r \bmod \lceil \log_2 n \rceil}`; pairs in a round are disjoint and commute.
    :math:`\lceil \log_2 n \rceil` rounds (the default) mix every coordinate with every
    other. Angles start at 0 (:math:`Q = I`). Exactly orthogonal, det +1.

    Note (rounds as block products): a round of stride :math:`2^t` mixes only bit ``t`` of a
    coordinate's index, so consecutive rounds of strides :math:`2^{t_0}, \ldots,
    2^{t_1 - 1}` multiply into one block-diagonal matrix on a strided view, blocks of
    :math:`2^{t_1 - t_0}` (at most 32) coordinates that share the other bits: the default
    rounds at ``n = 1024`` are two ``bmm`` of 32 × 32 blocks per pass
    (``rotate_strided_blocks`` in ``weightcond.transforms.butterfly``), built from the angles
    on ``(n/32, 32, 32)`` tensors. The former form, each round element-wise on the
    coordinates gathered by index, took 5–9 × a LoRA step at 1024², 2048 tokens (ten
    gathers per pass, scatter-adds backward and an activation-sized temporary per round);
    the blocks cost :math:`O(n \cdot 32)` per token per product instead of :math:`O(n)` per
    round, but run as two ``bmm`` and two copies. A side that is not a power of two is
    padded to one with coordinates that no rotation touches. The backward recomputes each
    product's input from its output (Note (rotations recomputed from their output) in
    ``weightcond.transforms.butterfly``), and the products are recomputed from the angles
    (Note (blocks recomputed in the backward)); before the update on the input side the
    planner can form :math:`W Q` instead (Note (the fused strided product)).

    Note (two segments in place): when the rounds are two segments, the low bits' and then
    the high bits' (the default rounds for ``64 <= n <= 1024``), :math:`Q h` runs without the
    route's copies between layouts: the activations ``(tokens, H·L)`` are read in place as
    ``(H, L, tokens)`` (a ``bmm`` reads a transposed operand as it is), the low blocks give
    ``(H, L, tokens)``, read in place per low digit as ``(L, tokens, H)`` by the high
    blocks, and one 2-D transposed copy gives ``(tokens, H·L)``: one copy per pass where
    the route made two forward and seven backward (the stacked gradient and output, moved
    back through both layouts). The backward reads the gradient and the output with one
    transposed copy each and keeps the tokens innermost (each product's transposed
    operands read in place). Measured on one core, 1024², 2048 tokens, float32: the copies
    had cost about 1.7 × the products.

    Args:
        dim: the side dimension ``n`` (at least 2).
        rounds: the number of rounds :math:`R`. Default :math:`\lceil \log_2 n \rceil`.
    """

    symbol: ClassVar[str] = r"G_R \cdots G_1"
    cost_per_token: ClassVar[str] = r"O({n}\,R)"
    published: ClassVar[dict[tuple[str, str], str]] = {
        ("right", "pre"): "GOFT (without an update)",
        ("right", "post"): "GOFT (without an update)",
    }

    def __init__(self, dim: int, *, rounds: int | None = None) -> None:
        super().__init__(dim)
        require_plane("givens", dim)
        stages = max(1, math.ceil(math.log2(dim)))
        # n - 1 rounds already hold as many angles as a dense rotation has
        self.rounds = check_int("givens", "rounds", stages if rounds is None else rounds,
                                high=max(1, dim - 1), what="the side dimension - 1")
        padded = self._padded = 2**stages
        self._segments = _segments([r % stages for r in range(self.rounds)])
        # per round and padded coordinate: its angle's index (`count`, the extra zero angle,
        # for coordinates without a partner below n: cos 1, sin 0 leave them as they are)
        # and the sign of its sine, in the order of the round's blocks
        slots, signs, count = [], [], 0
        for r in range(self.rounds):
            slot, sign = [-1] * padded, [0.0] * padded
            pairs = butterfly_pairs(dim, 2 ** (r % stages))
            for j, (a, b) in enumerate(pairs):
                slot[a] = slot[b] = count + j
                sign[a], sign[b] = -1.0, 1.0
            count += len(pairs)
            slots.append(slot)
            signs.append(sign)
        self.angles = nn.Parameter(torch.zeros(count))
        # segment [low, high): blocks of the bits low..high-1 of the coordinate, (a, m, l, 1)
        self._layouts: list[Layout] = [(padded >> high, 2 ** (high - low), 2**low, 1)
                                       for low, high in self._segments]
        r = 0
        for a, m, inner, _ in self._layouts:
            # the coordinates in the blocks' order (a, l, u), u the index within a block
            order = torch.arange(padded, device="cpu").view(a, m, inner).transpose(1, 2)
            for _ in range(m.bit_length() - 1):
                slots[r] = [count if slots[r][i] < 0 else slots[r][i] for i in order.flatten()]
                signs[r] = [signs[r][i] for i in order.flatten()]
                r += 1
        # two segments, the low digit's blocks then the high digit's: Note (two segments
        # in place)
        self._paired = len(self._layouts) == 2 and self._layouts[0][2] == 1 and \
            self._layouts[1][0] == 1
        self._routes = (strided_route(padded, self._layouts),
                        strided_route(padded, self._layouts[::-1]))
        self.register_constant("_slot", torch.tensor(slots, device="cpu"))
        self.register_constant("_sign", torch.tensor(signs, device="cpu"))

    @property
    def is_orthogonal(self) -> bool:
        return True

    @property
    def apply_flops(self) -> int:
        return 2 * self._padded * sum(2 ** (high - low) for low, high in self._segments)

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """Per round and coordinate of the side padded to ``2^⌈log2 n⌉``, in the order of the
        round's block (see :meth:`blocks`): ``cos θ`` and the signed ``sin θ``, shape
        ``(R, 2^⌈log2 n⌉)``."""
        dtype = compute_dtype(self.angles.dtype)
        theta = torch.cat([self.angles.to(dtype), self.angles.new_zeros(1, dtype=dtype)])
        theta = theta[self._slot]
        return torch.cos(theta), torch.sin(theta) * self._sign.to(dtype)

    def blocks(self) -> list[Tensor]:
        """Per segment of rounds, the product of its rounds as ``(a·l, m, m)`` blocks in the
        compute dtype (the layouts of :meth:`apply`).

        Note (blocks recomputed in the backward): the rounds' products save two block-sized
        tensors per round for their backward (2.5 MiB at ``n = 1024``, a third of an
        activation of 2048 tokens), so with a gradient they run under
        :func:`torch.utils.checkpoint.checkpoint` and are recomputed from the angles' cosines
        and sines in the backward (a few small products); not under ``torch.func`` transforms
        or the compiler, where the plain products run."""
        cos, sin = self.coefficients()
        if cos.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling() \
                and not torch._C._are_functorch_transforms_active():
            return list(checkpoint(self._products, cos, sin, use_reentrant=False))
        return list(self._products(cos, sin))

    def _products(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        found, r = [], 0
        for (a, m, ll, _), (low, high) in zip(self._layouts, self._segments, strict=True):
            q = torch.eye(m, dtype=cos.dtype, device=cos.device).expand(a * ll, m, m)
            for t in range(low, high):
                # G q on the rows: row u becomes cos_u row u + sin_u row (u xor 2^(t - low)),
                # the partner the other half of a view (no gather: its backward, a
                # scatter-add, is slow on CPU)
                pairs = (a * ll, m >> (t - low + 1), 2, 2 ** (t - low), 1)
                q = torch.addcmul(cos[r].view(pairs) * q.view(*pairs[:-1], m), sin[r].view(pairs),
                                  q.view(*pairs[:-1], m).flip(2)).view(a * ll, m, m)
                r += 1
            found.append(q)
        return tuple(found)

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        blocks = self.blocks()
        if self._paired and not transpose and not plain_operators(h.device.type):
            n, lead = self.dim, h.shape[:-1]
            x = h.reshape(-1, n)
            x = F.pad(x, (0, self._padded - n)) if self._padded != n else x.contiguous()
            out = _PairedBlocks.apply(x, *(q.to(h.dtype) for q in blocks))
            return out.view(*lead, n) if self._padded == n else out[:, :n].reshape(*lead, n)
        order = range(len(blocks) - 1, -1, -1) if transpose else range(len(blocks))
        n = self.dim
        if self._padded != n:
            h = F.pad(h, (0, self._padded - n))
        out = rotate_strided_blocks(h, self._routes[transpose], [blocks[i] for i in order],
                                    transpose=transpose, orthogonal=True)
        return out if self._padded == n else out[..., :n]

    @property
    def fuses_linear(self) -> bool:
        return self._padded == self.dim

    def rotated_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """:math:`x (W Q)^\\top + b` with :math:`W Q` formed a few rows at a time (Note (the
        fused strided product) in ``weightcond.transforms.butterfly``); for a side
        dimension that is a power of two."""
        if not self.fuses_linear:
            return super().rotated_linear(x, weight, bias)
        return strided_rotated_linear(x, weight, bias, self._routes, self.blocks())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rounds={self.rounds}"
