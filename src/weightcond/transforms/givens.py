"""``givens``: rounds of disjoint plane rotations with butterfly strides."""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import check_int
from .base import Transform, compute_dtype, register_transform, require_plane
from .butterfly import Layout, rotate_strided_blocks, strided_route

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
    padded to one with coordinates that no rotation touches.

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
        compute dtype (the layouts of :meth:`apply`)."""
        cos, sin = self.coefficients()
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
        return found

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        blocks = self.blocks()
        order = range(len(blocks) - 1, -1, -1) if transpose else range(len(blocks))
        n = self.dim
        if self._padded != n:
            h = F.pad(h, (0, self._padded - n))
        out = rotate_strided_blocks(h, self._routes[transpose], [blocks[i] for i in order],
                                    transpose=transpose)
        return out if self._padded == n else out[..., :n]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rounds={self.rounds}"
