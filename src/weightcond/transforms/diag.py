"""``diag``: a learnable diagonal calibration."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import Transform, register_transform


@register_transform("diag")
class Diag(Transform):
    r"""Scale each coordinate of the side dimension by a learnable factor.

    .. math::

        Q = \operatorname{diag}(d), \qquad d \in \mathbb{R}^n,\; d = \mathbf{1} \text{ at init.}

    ``n`` parameters, cost ``n`` per token. On the left before the update this is Pre-Diag
    (:math:`W' = \operatorname{diag}(d) W + \Delta W`); not orthogonal.

    Args:
        dim: the side dimension ``n``.

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(6, 4)
        >>> cal = wc.register_conditioning(layer, placement="pre", side="left", transform="diag")
        >>> tuple(cal.transform.scale.shape)
        (4,)
    """

    symbol: ClassVar[str] = r"\operatorname{diag}(d)"
    cost_per_token: ClassVar[str] = r"{n}"
    published: ClassVar[dict[tuple[str, str], str]] = {
        ("left", "pre"): "Pre-Diag; SORA's calibration",
    }

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.scale = nn.Parameter(torch.ones(dim))

    @property
    def is_diagonal(self) -> bool:
        return True

    def diagonal(self, norms: Tensor | None = None) -> Tensor:
        return self.scale

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        return h * self.scale.to(h.dtype)
