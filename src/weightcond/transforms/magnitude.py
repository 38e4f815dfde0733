"""``magnitude``: DoRA's norm-tied diagonal."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import check_bool, check_positive
from . import register_transform
from .base import Transform, compute_dtype


def diagonal_limit(dtype: torch.dtype) -> float:
    """The largest entry :class:`Magnitude` gives its diagonal in ``dtype``:
    :math:`\\sqrt{\\text{finfo(dtype).max}}`.

    Note (a diagonal that stays finite): a line of :math:`M` whose norm falls far below its
    magnitude (a row of the frozen weight zeroed after registration, e.g. by pruning or a
    loaded checkpoint) has :math:`m / \\max(\\|M\\|, \\varepsilon)` up to ``m / eps``,
    5e5 for ``m = 0.5``: above float16's largest value (65504). Cast to float16 that is
    ``inf``, and ``inf · 0`` on the zero row made the output, every gradient and the merged
    weight NaN. Limited to the square root of the largest value (256 in float16,
    1.8e19 in bfloat16 and float32), the diagonal stays finite, and so does its product with
    any activation or gradient entry below that limit (the backward forms
    :math:`g \\odot d`); a zero line still gives exactly the bias. Under autocast the limit
    is that of autocast's dtype, in which the products run. Only float16 can reach the
    limit in practice: it changes only the lines whose norm has fallen below :math:`m / 256`
    (in float16 any algorithm that rounds :math:`M` to float16 has lost most of such a line's
    direction well before its norm reaches ``eps``)."""
    return float(torch.finfo(dtype).max) ** 0.5


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
    rows finite (PEFT divides by zero there and returns NaN), and each entry of the diagonal
    is limited to :func:`~weightcond.transforms.magnitude.diagonal_limit` of the
    parameters' dtype (256 in float16), so it stays finite in that dtype (Note (a diagonal
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
        limit = diagonal_limit(m.dtype)
        device = m.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # the products run in autocast's dtype
            limit = min(limit, diagonal_limit(torch.get_autocast_dtype(device)))
        return (m.to(compute_dtype(m.dtype)) / self.floor(norms)).clamp(-limit, limit).to(m.dtype)

    def initialize(self, norms: Tensor) -> None:
        with torch.no_grad():
            self.magnitude.copy_(self.floor(norms))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, detach_norm={self.detach_norm}, eps={self.eps:g}"
