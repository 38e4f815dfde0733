"""``givens``: rounds of disjoint plane rotations with butterfly strides."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import check_int
from . import register_transform
from .base import Transform, compute_dtype, require_plane


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
    :math:`s = 2^{r \bmod \lceil \log_2 n \rceil}`; pairs in a round are disjoint and commute,
    so a round is element-wise ``cos``/``sin`` on gathered coordinates, :math:`O(n)` per
    token. :math:`\lceil \log_2 n \rceil` rounds (the default) mix every coordinate with every
    other. Angles start at 0 (:math:`Q = I`). Exactly orthogonal, det +1.

    Args:
        dim: the side dimension ``n`` (at least 2).
        rounds: the number of rounds :math:`R`. Default :math:`\lceil \log_2 n \rceil`.
    """

    def __init__(self, dim: int, *, rounds: int | None = None) -> None:
        super().__init__(dim)
        require_plane("givens", dim)
        stages = max(1, math.ceil(math.log2(dim)))
        # n - 1 rounds already hold as many angles as a dense rotation has
        self.rounds = check_int("givens", "rounds", stages if rounds is None else rounds,
                                high=max(1, dim - 1), what="the side dimension - 1")
        partner, sign, slot = [], [], []
        count = 0
        for r in range(self.rounds):
            pairs = butterfly_pairs(dim, 2 ** (r % stages))
            p = list(range(dim))
            s = [0.0] * dim
            k = [-1] * dim
            for j, (a, b) in enumerate(pairs):
                p[a], p[b] = b, a
                s[a], s[b] = -1.0, 1.0
                k[a] = k[b] = count + j
            count += len(pairs)
            partner.append(p)
            sign.append(s)
            slot.append(k)
        self.angles = nn.Parameter(torch.zeros(count))
        slots = torch.tensor(slot, device="cpu")
        self.register_constant("_partner", torch.tensor(partner, device="cpu"))
        self.register_constant("_sign", torch.tensor(sign, device="cpu"))
        # unpaired coordinates read the extra zero angle at index `count`
        self.register_constant("_slot", torch.where(slots < 0, count, slots))

    @property
    def is_orthogonal(self) -> bool:
        return True

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """Per round and coordinate: ``cos θ`` and the signed ``sin θ``, shape ``(R, n)``."""
        dtype = compute_dtype(self.angles.dtype)
        theta = torch.cat([self.angles.to(dtype), self.angles.new_zeros(1, dtype=dtype)])
        theta = theta[self._slot]
        return torch.cos(theta), torch.sin(theta) * self._sign.to(dtype)

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        cos, sin = (c.to(h.dtype) for c in self.coefficients())
        order = range(self.rounds - 1, -1, -1) if transpose else range(self.rounds)
        for r in order:
            # Rᵀ rotates by -θ: flip the sign of the sine
            s = -sin[r] if transpose else sin[r]
            h = cos[r] * h + s * h[..., self._partner[r]]
        return h

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rounds={self.rounds}"
