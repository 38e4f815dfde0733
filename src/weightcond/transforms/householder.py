"""``householder``: a product of Householder reflections (HRA)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import OptionError, check_bool, check_int
from .base import Transform, compute_dtype, register_transform, require_plane


@register_transform("householder")
class Householder(Transform):
    r"""Multiply by a product of ``k`` Householder reflections, in compact WY form.

    .. math::

        Q = H_1 H_2 \cdots H_k, \qquad H_i = I - 2\,\frac{u_i u_i^\top}{\|u_i\|^2}
        = I - V T V^\top,

    with :math:`V = [u_1/\|u_1\|, \ldots]` and :math:`T = (\tfrac12 I +
    \operatorname{striu}(V^\top V))^{-1}` upper triangular (Joffrain et al., 2006), so
    applying :math:`Q` costs two thin GEMMs, :math:`O(n k)` per token. ``k`` must be even:
    reflectors are initialised in identical pairs, so :math:`Q = I` at init (the trick of
    HRA, Yuan et al., 2024, arXiv 2405.17484), and an even product has det +1. Exactly
    orthogonal. :math:`n k` parameters.

    With ``gram_schmidt=True`` the vectors are orthonormalised in order first (Gram–Schmidt,
    as PEFT's ``HRAConfig(apply_GS=True)``), giving :math:`Q = I - 2 V V^\top`; then no
    initialisation is the identity (a product of reflections through orthonormal directions
    never is), so this option is for reproducing or loading such adapters: its vectors start
    random and the layer changes when it is registered.

    Args:
        dim: the side dimension ``n``.
        reflections: :math:`k`, even, between 2 and ``n``. Default 8 (or the largest even
            number ``<= n``).
        gram_schmidt: orthonormalise the vectors first (see above). Default ``False``.
    """

    example_options: ClassVar[dict[str, object]] = {"reflections": 8}

    symbol: ClassVar[str] = r"H_1 \cdots H_k"
    cost_per_token: ClassVar[str] = r"O({n}\,k)"
    published: ClassVar[dict[tuple[str, str], str]] = {
        ("right", "pre"): "HRA (without an update)",
        ("right", "post"): "HRA (without an update)",
    }

    def __init__(self, dim: int, *, reflections: int | None = None,
                 gram_schmidt: bool = False) -> None:
        super().__init__(dim)
        require_plane("householder", dim)
        if reflections is None:
            reflections = min(8, dim - dim % 2)
        self.reflections = check_int("householder", "reflections", reflections, low=2,
                                     high=dim, what="the side dimension")
        if reflections % 2:
            raise OptionError(f"householder: argument 'reflections' expected an even int (an "
                              f"odd product of reflections has det -1 and is never the "
                              f"identity), got {reflections}")
        self.gram_schmidt = check_bool("householder", "gram_schmidt", gram_schmidt)
        if gram_schmidt:  # paired vectors would be degenerate under Gram–Schmidt
            self.U = nn.Parameter(torch.randn(dim, reflections))
        else:
            u = torch.randn(dim, reflections // 2)
            self.U = nn.Parameter(u.repeat_interleave(2, dim=1))

    @property
    def is_orthogonal(self) -> bool:
        return True

    def wy(self) -> tuple[Tensor, Tensor]:
        """``(V, T)`` of the compact WY form :math:`Q = I - V T V^\\top`, in the solve dtype."""
        u = self.U.to(compute_dtype(self.U.dtype))
        if self.gram_schmidt:  # Gram–Schmidt in order is the QR factor with diag(R) > 0
            q, r = torch.linalg.qr(u)
            v = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
        else:
            v = u / torch.linalg.vector_norm(u, dim=0, keepdim=True).clamp_min(
                torch.finfo(u.dtype).tiny)
        eye = torch.eye(self.reflections, dtype=u.dtype, device=u.device)
        # Note (no torch.triu): CPU triu always opens a parallel region; with its threads
        # contended (2 cores shared) one (k, k) triu took 16 ms, a mask 4 µs
        index = torch.arange(self.reflections, device=u.device)
        t_inv = torch.where(index[:, None] < index, v.mT @ v, 0.0) + eye / 2
        return v, torch.linalg.solve_triangular(t_inv, eye, upper=True)

    @property
    def low_rank_size(self) -> int:
        return self.reflections

    def low_rank(self) -> tuple[Tensor, Tensor]:
        v, t = self.wy()
        return -v, v @ t.mT  # I - V T Vᵀ = I + U Wᵀ with U = -V, W = V Tᵀ

    def extra_repr(self) -> str:
        gs = ", gram_schmidt=True" if self.gram_schmidt else ""
        return f"dim={self.dim}, reflections={self.reflections}{gs}"
