"""``magnitude``: DoRA's norm-tied diagonal."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import check_bool, check_positive
from .base import Transform, compute_dtype, register_transform


@register_transform("magnitude")
class Magnitude(Transform):
    r"""Rescale each line of the conditioned matrix to a learned magnitude (DoRA).

    .. math::

        Q = \operatorname{diag}\!\bigl(m \oslash \max(\|M\|_{\text{row}}, \varepsilon)\bigr),

    where :math:`M` is the matrix this transform conditions (its rows on the left, its
    columns on the right) and :math:`m` is initialised to :math:`\max(\|M\|, \varepsilon)`
    so the layer starts unchanged. On the left after the update this is DoRA
    (Liu et al., 2024, arXiv 2402.09353): :math:`W' = \operatorname{diag}(m \oslash
    \|W + \Delta W\|_{\text{row}})(W + \Delta W)`.

    The norm is detached from the autograd graph by default, as DoRA §4.3 recommends
    (``detach_norm=False`` keeps it attached). The floor :math:`\varepsilon` keeps zero-norm
    rows finite (PEFT divides by zero there and returns NaN), and in a layer each entry of
    the diagonal is limited to :func:`~weightcond.transforms.diagonal_limit` of the
    narrowest dtype it meets (256 in float16), so it stays finite there (Note (a diagonal
    that stays finite)). In the layer's fast forward the norm is computed without forming
    an ``(out, in)`` matrix when everything applied
    before it on the same side is diagonal and everything on the other side is orthogonal
    (DoRA, Pre-Diag + magnitude, ...); other stacks fall back to the dense matrix.

    Args:
        dim: the side dimension ``n``.
        detach_norm: treat the norm as a constant in backward (DoRA §4.3). Default ``True``.
        eps: floor of the norm. Default ``1e-6``.
    """

    norm_tied = True

    symbol: ClassVar[str] = r"\operatorname{diag}(m \oslash \|X\|)"
    cost_per_token: ClassVar[str] = r"{n}\ (+\text{ norms of } X)"
    published: ClassVar[dict[tuple[str, str], str]] = {("left", "post"): "DoRA"}

    def __init__(self, dim: int, *, detach_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__(dim)
        self.detach_norm = check_bool("magnitude", "detach_norm", detach_norm)
        self.eps = check_positive("magnitude", "eps", eps)
        self.magnitude = nn.Parameter(torch.ones(dim))

    def floor(self, norms: Tensor) -> Tensor:
        """The norms with the floor :math:`\\varepsilon` applied."""
        return norms.clamp_min(self.eps)

    def diagonal(self, norms: Tensor | None = None) -> Tensor:
        if norms is None:
            raise TypeError("magnitude.diagonal() needs the norms of the conditioned matrix")
        # in the solve dtype (Note (small solves)): in float16 the attached norm's gradient,
        # -m / ‖M‖², overflows for lines of norm ~1e-3
        m = self.magnitude
        return (m.to(compute_dtype(m.dtype)) / self.floor(norms)).to(m.dtype)

    def initialize(self, norms: Tensor) -> None:
        with torch.no_grad():
            self.magnitude.copy_(self.floor(norms))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, detach_norm={self.detach_norm}, eps={self.eps:g}"
