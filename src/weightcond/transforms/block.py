"""``block``: a block-diagonal rotation (OFT)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import OptionError, ShapeError, check_bool, check_int
from .base import Transform, compute_dtype, register_transform, require_plane
from .maps import EXACT_MAPS, cayley_neumann, resolve_dense_map


def skew_index(block_size: int) -> Tensor:
    """For each entry of a ``(b, b)`` block, row by row, its position in ``[0, g, -g]`` with
    ``g`` the block's upper triangle (see :func:`skew_blocks`); a module registers it as a
    constant (:meth:`~weightcond.transforms.Transform.register_constant`)."""
    cpu = torch.device("cpu")  # whatever the default device (a constant: see register_constant)
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=cpu)
    count = rows.numel()
    index = torch.zeros(block_size, block_size, dtype=torch.long, device=cpu)
    index[rows, cols] = torch.arange(1, count + 1, device=cpu)
    index[cols, rows] = torch.arange(count + 1, 2 * count + 1, device=cpu)
    return index.flatten()


def skew_blocks(generator: Tensor, index: Tensor, map: Callable[[Tensor], Tensor], *,
                scale: float = 1.0, full: bool = False) -> Tensor:
    """``map(S_i)`` for the skew blocks ``S_i`` of ``generator``, computed in the solve dtype:
    ``S_i = scale · (U_i - U_iᵀ)`` with ``U_i`` the upper triangle whose entries are the rows
    of ``generator`` (``(..., b(b-1)/2)`` → ``(..., b, b)``, ``index`` from
    :func:`skew_index`), or with ``full``, ``S_i = scale · (D_i - D_iᵀ)`` for the full
    ``(..., b, b)`` blocks ``D_i`` of ``generator`` (PEFT's BOFT parametrization).

    Each triangular ``S_i`` is one gather from ``[0, g_i, -g_i]`` (its backward one
    scatter-add) instead of a zero matrix filled at the triangle's indices minus its
    transpose."""
    g = generator.to(compute_dtype(generator.dtype))
    if full:
        s = g - g.mT
    else:
        signed = torch.cat([g.new_zeros(*g.shape[:-1], 1), g, -g], dim=-1)
        b = math.isqrt(index.numel())
        s = signed.index_select(-1, index).unflatten(-1, (b, b))
    return map(s if scale == 1.0 else scale * s)


def check_scale(where: str, scale: object) -> float:
    """Return ``float(scale)`` if it is a finite non-zero real number, else raise."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale == 0 \
            or not math.isfinite(scale):
        raise OptionError(f"{where}: argument 'scale' expected a finite non-zero number, "
                          f"got {scale!r}")
    return float(scale)


def generator_repr(scale: float, full: bool) -> str:
    """The ``extra_repr`` of ``scale`` and ``full`` where they differ from the defaults."""
    return ("" if scale == 1.0 else f", scale={scale:g}") + (", full=True" if full else "")


def block_generator(where: str, stack: tuple[int, ...], block_size: int, full: bool
                    ) -> nn.Parameter:
    """The zero generator of ``stack`` blocks: ``(*stack, b(b-1)/2)`` triangles, or
    ``(*stack, b, b)`` full blocks with ``full``."""
    shape = (block_size, block_size) if check_bool(where, "full", full) else \
        (block_size * (block_size - 1) // 2,)
    return nn.Parameter(torch.zeros(*stack, *shape))


def rotate_blocks(h: Tensor, q: Tensor, *, transpose: bool = False) -> Tensor:
    """Multiply consecutive blocks of the last dimension of ``h`` by the matrices ``q``
    (``(n/b, b, b)``): :math:`Q_j h_j`, or :math:`Q_j^\\top h_j` with ``transpose``.

    Note (block layouts): the products are one ``bmm`` on a strided ``(n/b, tokens, b)``
    view of ``h`` (no copy in), and the result is made row-major like ``h`` (one permute
    copy). The column layout (the ``bmm`` on a view of ``hᵀ``, its ``(n, tokens)`` output
    transposed) saves that copy, but the GEMM that follows then computes the input's
    gradient in the transposed orientation, which was slower: one OFT layer at 1024², 2048
    tokens, with the input's gradient took 58.8–59.0 ms a step against 56.8–58.0 ms in the
    row layout and 60.1 ms with ``einsum`` (two runs). The layout must not depend on
    whether ``h`` needs a gradient: the two round differently, and a rotation inside a chain
    would then give other bits under ``torch.no_grad()``. The weight form of an exact block
    uses the column layout (:meth:`Block.rotated_linear`), where ``W Q`` is read by the
    GEMM as the contiguous ``(W Q)ᵀ``.
    """
    q = q.to(h.dtype)
    lead, n = h.shape[:-1], h.shape[-1]
    rows = h.reshape(-1, n).unflatten(-1, (q.shape[0], q.shape[-1])).transpose(0, 1)
    out = torch.bmm(rows, q if transpose else q.mT)
    return out.transpose(0, 1).reshape(*lead, n)


def _weight_times_blocks(weight: Tensor, q: Tensor) -> Tensor:
    """``(W Q)ᵀ`` as a contiguous ``(n, out)`` tensor: one ``bmm`` on a view of ``Wᵀ``."""
    return torch.bmm(q.mT, weight.mT.unflatten(0, (q.shape[0], q.shape[-1]))).flatten(0, 1)


class _RotatedLinear(torch.autograd.Function):
    """``x (W Q)ᵀ + b`` for ``Q = blockdiag(q_j)`` orthogonal (see :meth:`Block.rotated_linear`)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, q: Tensor) -> Tensor:
        wq_t = _weight_times_blocks(weight, q)
        # (W Q)ᵀ serves only the input's gradient: without it, it is freed after the forward
        ctx.save_for_backward(x, weight, q, wq_t if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return x @ wq_t if bias is None else torch.addmm(bias, x, wq_t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        # under autocast the forward's GEMMs ran in the autocast dtype (that of grad) on
        # inputs saved in their own: the backward runs in it too, as autograd's would
        x, weight, q, wq_t = (None if t is None else t.to(grad.dtype)
                              for t in ctx.saved_tensors)
        blocks, b = q.shape[0], q.shape[-1]
        grad_x = grad_weight = grad_bias = grad_q = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ wq_t.mT
        if ctx.needs_input_grad[3] and grad_x is not None:
            # g W = (g W Q) Qᵀ = grad_x Qᵀ, so block j of Wᵀ gᵀ x is Q_j grad_xⱼᵀ x_j
            products = torch.bmm(grad_x.mT.unflatten(0, (blocks, b)),
                                 x.unflatten(-1, (blocks, b)).transpose(0, 1))
            grad_q = q @ products
        if ctx.needs_input_grad[1] or (ctx.needs_input_grad[3] and grad_q is None):
            grad_wq_t = x.mT @ grad  # the gradient of (W Q)ᵀ, (in, out)
            if ctx.needs_input_grad[3] and grad_q is None:
                # block j of Wᵀ · grad(W Q), as (grad(W Q)ᵀ_j W_j)ᵀ (the faster bmm layout)
                grad_q = torch.bmm(grad_wq_t.unflatten(0, (blocks, b)),
                                   weight.mT.unflatten(0, (blocks, b)).mT).mT
            if ctx.needs_input_grad[1]:
                grad_weight = torch.bmm(q, grad_wq_t.unflatten(0, (blocks, b))).flatten(0, 1).mT
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias, grad_q


@register_transform("block")
class Block(Transform):
    r"""Rotate each block of ``block_size`` consecutive coordinates independently (OFT).

    .. math::

        Q = \operatorname{blockdiag}\bigl(\operatorname{map}(S_1), \ldots,
        \operatorname{map}(S_{n/b})\bigr), \qquad S_i = -S_i^\top \in \mathbb{R}^{b\times b},

    each :math:`S_i = c\,(U_i - U_i^\top)` stored as the :math:`b(b-1)/2` entries of the
    upper triangle :math:`U_i` (or, with ``full=True``, :math:`S_i = c\,(D_i - D_i^\top)`
    for a full :math:`b \times b` block :math:`D_i`), with :math:`c` = ``scale``; zero at
    init (with ``share=True`` one generator serves every block). With ``map="cayley"`` on
    the right of :math:`W` this is OFT (Qiu et al., 2023, arXiv 2306.07280); ``scale=2``
    is PEFT's parametrization (its :math:`(I - Q)^{-1}(I + Q)` is our
    :math:`\operatorname{cayley}(2Q)`), which the ``oft`` preset uses. Exactly orthogonal
    for ``"cayley"`` and ``"exp"``; ``"cayley_neumann"`` truncates the Cayley map's Neumann
    series as PEFT does (:func:`~weightcond.transforms.maps.cayley_neumann`; cheaper,
    approximately orthogonal). Cost per token :math:`O(n b)`; :math:`n (b-1)/2` parameters
    (:math:`b(b-1)/2` shared; :math:`n b` and :math:`b^2` with ``full``).

    The scale and the full blocks change no rotation the transform can express, only how
    its parameters move under an optimizer: the gradient of :math:`U_i` is :math:`c` times
    that of :math:`S_i`, so ``scale=1`` needs 4 × the learning rate of ``scale=2`` under
    SGD and 2 × under Adam to take the same steps in :math:`S_i`; a full block's two
    entries per pair move :math:`S_i` twice as far under Adam as one triangular entry.

    Args:
        dim: the side dimension ``n``.
        block_size: :math:`b`, at least 2, dividing ``n``. Default: the largest divisor of
            ``n`` that is at most 32.
        map: ``"cayley"``, ``"exp"``, ``"first_order"``, ``"cayley_neumann"`` or a callable
            on batched skew matrices. Default ``"cayley"``.
        share: one generator for all blocks (PEFT's ``block_share``). Default ``False``.
        terms: the number of Neumann terms for ``map="cayley_neumann"``. Default 5.
        scale: :math:`c`, a finite non-zero number. Default 1.
        full: store full ``b × b`` blocks :math:`D_i`. Default ``False``.
    """

    example_options: ClassVar[dict[str, object]] = {"block_size": 32}

    symbol: ClassVar[str] = r"Q_B"
    cost_per_token: ClassVar[str] = r"O({n}\,b)"
    published: ClassVar[dict[tuple[str, str], str]] = {
        ("right", "pre"): "OFT (without an update)",
        ("right", "post"): "OFT (without an update)",
    }

    def __init__(self, dim: int, *, block_size: int | None = None,
                 map: str | Callable[[Tensor], Tensor] = "cayley", share: bool = False,
                 terms: int = 5, scale: float = 1.0, full: bool = False) -> None:
        super().__init__(dim)
        require_plane("block", dim)
        if block_size is None:
            block_size = max((b for b in range(2, min(32, dim) + 1) if dim % b == 0), default=2)
        self.block_size = check_int("block", "block_size", block_size, low=2, high=dim,
                                    what="the side dimension")
        if dim % block_size:
            raise ShapeError(f"block: argument 'block_size' expected a divisor of the side "
                             f"dimension {dim}, got {block_size}")
        self.map = map
        self.share = check_bool("block", "share", share)
        self.terms = check_int("block", "terms", terms)
        self._map = resolve_dense_map(
            "block", map, {"cayley_neumann": partial(cayley_neumann, terms=terms)})
        self.scale = check_scale("block", scale)
        self.full = full
        self.generator = block_generator("block", (1 if share else dim // block_size,),
                                         block_size, full)
        self.register_constant("_skew_index", skew_index(self.block_size))

    @property
    def is_orthogonal(self) -> bool:
        return isinstance(self.map, str) and self.map in EXACT_MAPS

    def blocks(self) -> Tensor:
        """The rotations, shape ``(n/b, b, b)``, in the solve dtype."""
        q = skew_blocks(self.generator, self._skew_index, self._map, scale=self.scale,
                        full=self.full)
        b = self.block_size
        return q.expand(self.dim // b, b, b) if self.share else q

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        return rotate_blocks(h, self.blocks(), transpose=transpose)

    @property
    def apply_flops(self) -> int:
        return 2 * self.dim * self.block_size

    @property
    def fuses_linear(self) -> bool:
        return self.is_orthogonal

    def rotated_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """:math:`x (W Q)^\\top + b` with :math:`W Q` formed (one ``bmm``), for exactly
        orthogonal maps.

        Note (the input gradient gives the blocks' gradient): the gradient reaching
        :math:`Q` is the block diagonal of :math:`W^\\top g^\\top x`, and
        :math:`g W = (g W Q) Q^\\top`: block :math:`j` is
        :math:`Q_j\\,(\\partial x)_j^\\top x_j` with :math:`\\partial x = g\\,(W Q)`, the
        input's gradient, which the backward computes anyway. When ``x`` needs its gradient
        this costs ``tokens·n·b`` after that GEMM, instead of the activation form's three
        ``tokens·n·b`` block products (rotating ``x`` forward, its gradient back, and the
        blocks' gradient); without it, block :math:`j` is read from ``gᵀx`` (one GEMM,
        ``out·n·b``). It rests on :math:`Q_j^{-1} = Q_j^\\top`, so only the exact maps
        (``"cayley"``, ``"exp"``) use it; it is tested against the dense form in float64.
        """
        if not self.fuses_linear:
            return super().rotated_linear(x, weight, bias)
        return _RotatedLinear.apply(x, weight, bias, self.blocks().to(x.dtype))

    def matrix(self) -> Tensor:
        return torch.block_diag(*self.blocks()).to(self.generator.dtype)

    def extra_repr(self) -> str:
        shared = ", share=True" if self.share else ""
        return f"dim={self.dim}, block_size={self.block_size}, map={self.map!r}{shared}" \
            f"{generator_repr(self.scale, self.full)}"
