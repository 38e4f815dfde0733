"""``orthogonal``: a dense rotation of the side dimension, built with geotorch."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import geotorch
import torch
from torch import Tensor, nn

from .base import Transform, compute_dtype, register_transform
from .maps import EXACT_MAPS, resolve_dense_map


@register_transform("orthogonal")
class Orthogonal(Transform):
    r"""Rotate by a dense orthogonal matrix, a point of :math:`\mathrm{SO}(n)`.

    .. math::

        Q = \operatorname{map}(S), \qquad S = X_{\text{lower}} - X_{\text{lower}}^\top,

    the manifold and its trivialisation come from geotorch's ``SO`` (with our maps, so the
    Cayley convention is the library's :math:`(I - S/2)^{-1}(I + S/2)`), its base point fixed
    at the identity and :math:`X = 0` at init so :math:`Q = I`. geotorch constrains the
    conditioning matrix here, never the pretrained weight (whose values it would replace).
    Cost :math:`O(n^2)` per token and :math:`O(n^3)` per step; :math:`n(n-1)/2` effective
    parameters. Exactly orthogonal for ``"cayley"`` and ``"exp"``.

    Args:
        dim: the side dimension ``n``.
        map: ``"cayley"``, ``"exp"``, ``"first_order"`` or a callable. Default ``"cayley"``.
    """

    symbol: ClassVar[str] = r"Q"
    cost_per_token: ClassVar[str] = r"O({n}^2)"

    def __init__(self, dim: int, *, map: str | Callable[[Tensor], Tensor] = "cayley") -> None:
        super().__init__(dim)
        self.map = map
        # on the CPU whatever the default device: geotorch draws a random base by a QR
        # decomposition (which reads values: it fails on the meta device), then replaced by I
        with torch.device("cpu"):
            self.so = geotorch.SO((dim, dim), triv=resolve_dense_map("orthogonal", map))
        with torch.no_grad():
            self.so.base.copy_(torch.eye(dim, device="cpu"))
        self.so.to(torch.get_default_device())  # beside the parameters (meta: loaded later)
        self.generator = nn.Parameter(torch.zeros(dim, dim))

    @property
    def is_orthogonal(self) -> bool:
        return isinstance(self.map, str) and self.map in EXACT_MAPS

    def matrix(self) -> Tensor:
        dtype = compute_dtype(self.generator.dtype)
        # the small dense map runs in the solve dtype whatever dtype the module was cast to
        base = {"base": self.so.base.to(dtype)}
        q = torch.func.functional_call(self.so, base, (self.generator.to(dtype),))
        return q.to(self.generator.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, map={self.map!r}"
