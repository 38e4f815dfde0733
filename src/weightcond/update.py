"""The low-rank update :math:`\\Delta W = s\\,BA` (the only place LoRA's mathematics lives)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import check_int, check_positive

__all__ = ["LowRankUpdate"]


class LowRankUpdate(nn.Module):
    r"""The low-rank update of a weight of shape ``(out, in)``.

    .. math::

        \Delta W = s\, B A, \qquad A \in \mathbb{R}^{r \times \text{in}},\;
        B \in \mathbb{R}^{\text{out} \times r},\; s = \alpha / r.

    ``A`` is initialised as in LoRA (and PEFT): Kaiming-uniform with ``a = sqrt(5)``; ``B`` is
    zero, so :math:`\Delta W = 0` at initialisation. Created by
    :func:`weightcond.register_update`; not meant to be constructed directly.

    Args:
        out_features: rows of the conditioned weight.
        in_features: columns of the conditioned weight.
        rank: :math:`r`, between 1 and ``min(out, in)``.
        alpha: :math:`\alpha`; ``None`` means ``alpha = rank`` (scale 1).
    """

    def __init__(self, out_features: int, in_features: int, *, rank: int,
                 alpha: float | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        where = "register_update"
        check_int(where, "rank", rank, high=min(out_features, in_features),
                  what=f"min(out, in) of the ({out_features}, {in_features}) weight")
        self.rank = rank
        self.alpha = float(rank) if alpha is None else check_positive(where, "alpha", alpha)
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        """The scale :math:`s = \\alpha / r`."""
        return self.alpha / self.rank

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, (s·B)ᵀ)``, shapes ``(rank, in)`` and ``(rank, out)``: the update is
        ``x ↦ (x Aᵀ)(s·B)ᵀ`` (the form the layer's fast forward stacks with other low-rank
        terms)."""
        return self.A, self.B.mT * self.scaling

    def matrix(self) -> Tensor:
        """The dense update :math:`s\\,BA`, shape ``(out, in)``."""
        left, right = self.factors()
        return right.mT @ left

    def forward(self, x: Tensor) -> Tensor:
        """Apply :math:`s\\,BA` to the last dimension of ``x`` without forming ``(out, in)``."""
        left, right = self.factors()
        return F.linear(x, left) @ right

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"
