r"""The transform contract: a square conditioning matrix :math:`Q \in \mathbb{R}^{n\times n}`.

A transform is an :class:`torch.nn.Module` that owns its parameters and knows its side
dimension ``n``. It is the identity at initialisation. It offers two views of one matrix:

* :meth:`Transform.matrix` — the dense ``(n, n)`` matrix (the canonical form);
* :meth:`Transform.apply` — :math:`Q h` for every vector ``h`` along the last dimension of a
  tensor, computed matrix-free where the structure allows it (the fast form).

A subclass overrides at least one of the two (or :meth:`Transform.low_rank`, for
:math:`Q = I + U V^\top`); the base class derives the rest. A
*norm-tied* transform (DoRA's magnitude) is diagonal with entries that depend on the norms
of the matrix it conditions; it sets ``norm_tied = True`` and implements :meth:`diagonal`
and :meth:`initialize` instead.

Note (small solves): transforms compute their small matrices (solves, matrix exponentials)
in float32 when the parameters are bfloat16 or float16 (float64 stays float64), and cast
the result back; see :func:`compute_dtype`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError, StateError
from ..registry import Registry

__all__ = ["TRANSFORMS", "Transform", "compute_dtype", "diagonal_limit", "limit_diagonal",
           "register_transform", "require_plane", "thin_update"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype small solves run in: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def diagonal_limit(dtype: torch.dtype) -> float:
    """The largest entry a norm-tied diagonal takes in ``dtype``:
    :math:`\\sqrt{\\text{finfo(dtype).max}}` (256 in float16, 1.8e19 in bfloat16 and float32).

    Note (a diagonal that stays finite): a line of :math:`M` whose norm falls far below its
    magnitude (a row of the frozen weight zeroed after registration, e.g. by pruning or a
    loaded checkpoint) has :math:`m / \\max(\\|M\\|, \\varepsilon)` up to ``m / eps``,
    5e5 for ``m = 0.5``: above float16's largest value (65504). Cast to float16 that is
    ``inf``, and ``inf · 0`` on the zero row made the output, every gradient and the merged
    weight NaN. Limited to the square root of the largest value, the diagonal stays finite,
    and so does its product with any activation or gradient entry below that limit (the
    backward forms :math:`g \\odot d`); a zero line still gives exactly the bias. The limit
    is that of the narrowest dtype the diagonal meets (:func:`limit_diagonal`). Only float16
    can reach it in practice: it changes only the lines whose norm has fallen below
    :math:`m / 256` (in float16 any algorithm that rounds :math:`M` to float16 has lost most
    of such a line's direction well before its norm reaches ``eps``)."""
    return float(torch.finfo(dtype).max) ** 0.5


def limit_diagonal(diagonal: Tensor, *dtypes: torch.dtype) -> Tensor:
    """``diagonal`` with its entries limited to :func:`diagonal_limit` of the narrowest of
    its own dtype, ``dtypes`` (the layer's weight, its activations) and, under autocast,
    autocast's dtype: the dtypes its products run in (Note (a diagonal that stays
    finite))."""
    device = diagonal.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtypes = (*dtypes, torch.get_autocast_dtype(device))
    limit = min(diagonal_limit(d) for d in (diagonal.dtype, *dtypes))
    return diagonal.clamp(-limit, limit)


def require_plane(name: str, dim: int) -> None:
    """Rotations built from planes (Givens, Householder pairs, blocks) need ``dim >= 2``."""
    if dim < 2:
        raise ShapeError(f"{name}: the side dimension is {dim}, expected at least 2 (the only "
                         f"rotation of one dimension is the identity; use 'skew' or 'diag')")


def thin_update(h: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``h + (h @ leftᵀ) @ right`` along the last dimension of ``h``, for thin ``(k, n)``
    factors ``left`` and ``right`` (the form of every identity-plus-low-rank transform).

    Note (thin GEMMs): both factors are made contiguous ``(k, n)`` and the sum is one
    ``addmm``, and so are the thin factors of the layer's folded terms
    (:class:`weightcond.placement.Conditioning`). A product with a thin output is then
    ``A Bᵀ`` with both row-major (``F.linear`` on the factor), forward and backward
    (autograd computes the factor's gradient as ``(gᵀ A)ᵀ`` when it is stored so). CPU BLAS
    is several times slower on the other layouts; measured at n=1024, k=8, 2048 tokens:
    ``xᵀ a`` 5.7 ms against ``(aᵀ x)ᵀ`` 0.94, ``Wᵀ u`` 2.7 against ``W (uᵀ)ᵀ`` 0.41, ``x u``
    1.5 against ``x (uᵀ)ᵀ`` 0.82 (with ``u``, ``uᵀ`` contiguous). One HRA-like layer
    (``householder``, 8 reflections, 1024², 2048 tokens) took 42.5 ms a step with the
    factors stored ``(n, k)`` and 33.3 ms with them contiguous ``(k, n)``. The fused add
    saves a ``(tokens, n)`` temporary.
    """
    h2 = h.reshape(-1, h.shape[-1])
    left = left.to(h.dtype).contiguous()
    right = right.to(h.dtype).contiguous()
    return torch.addmm(h2, F.linear(h2, left), right).view(h.shape)


class Transform(nn.Module):
    r"""Base class of every conditioning transform.

    Args:
        dim: the side dimension ``n`` (``out`` for ``side="left"``, ``in`` for ``"right"``).

    Class attributes:
        name: the registry name (set by :func:`weightcond.transforms.register_transform`).
        norm_tied: ``True`` for diagonal transforms whose entries depend on the norms of
            the matrix they condition (see :class:`~weightcond.transforms.Magnitude`).
        example_options: the options the benchmarks and the docs' examples build the
            transform with (empty: its defaults).
        symbol: the LaTeX symbol of its matrix in the docs' table of cells.
        cost_per_token: its matrix-free cost per token in that table, LaTeX, ``{n}``
            standing for the side dimension.
        published: the published method each ``(side, placement)`` cell is, if any.
    """

    name: ClassVar[str] = ""
    norm_tied: ClassVar[bool] = False
    #: options the benchmarks and docs examples use
    example_options: ClassVar[dict[str, object]] = {}
    symbol: ClassVar[str] = "Q"
    cost_per_token: ClassVar[str] = r"O({n}^2)"
    published: ClassVar[dict[tuple[str, str], str]] = {}

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self._constants: dict[str, Tensor] = {}

    def register_constant(self, name: str, value: Tensor) -> None:
        """Register ``value``, derived from the transform's options alone (indices, signs),
        as the non-persistent buffer ``name``.

        Note (constants survive meta initialisation): a non-persistent buffer is in no
        state dict, so a module built on the meta device and materialised with
        :meth:`~torch.nn.Module.to_empty` (FSDP2, large-model loaders) kept it as
        uninitialised memory after ``load_state_dict``, and the transform computed garbage
        or indexed out of range. A constant keeps a CPU copy of its value (``value`` must
        not be on the meta device; the buffer goes to the default device, as the parameters
        built beside it) and is written back whenever the module's tensors are
        converted or materialised (:meth:`~torch.nn.Module._apply`: ``to``, ``to_empty``,
        ``cuda``, ``half``, ...), except while they are on the meta device, and when a state
        dict is loaded (with ``assign=True`` a constant still on the meta device moves to the
        device of the loaded parameters).
        """
        if value.is_meta:
            raise StateError(f"{type(self).__name__}.register_constant: argument 'value' "
                             f"expected a tensor with data, got one on the meta device")
        self._constants[name] = value.detach().to("cpu", copy=True)
        # the buffer itself on the default device, as the parameters built beside it
        self.register_buffer(name, value.to(torch.get_default_device()), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self._write_constants()
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._write_constants()

    def _write_constants(self) -> None:
        """Write the constants' values into their buffers (Note (constants survive meta
        initialisation)); a buffer on the meta device beside parameters with data moves to
        their device."""
        device = next((p.device for p in self.parameters() if not p.is_meta), None)
        for name, value in self.__dict__.get("_constants", {}).items():
            buffer = self._buffers.get(name)
            if buffer is None:
                continue
            if buffer.is_meta:
                if device is not None:
                    self._buffers[name] = value.to(device=device, dtype=buffer.dtype)
                continue
            with torch.no_grad():
                buffer.copy_(value)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        needed = ("diagonal",) if cls.norm_tied else ("matrix", "apply", "low_rank")
        if not any(getattr(cls, m) is not getattr(Transform, m) for m in needed):
            raise TypeError(f"transform {cls.__name__} must override "
                            f"{' or '.join(m + '()' for m in needed)}")

    # -- properties the placement algebra relies on -------------------------------------
    @property
    def is_orthogonal(self) -> bool:
        """``True`` when :math:`Q` is exactly orthogonal for every parameter value."""
        return False

    @property
    def is_diagonal(self) -> bool:
        """``True`` when :math:`Q` is diagonal (then :meth:`diagonal` gives its entries)."""
        return self.norm_tied

    # -- what the layer's planner reads (Note (plan, then execute) in weightcond.engine) ----
    @property
    def low_rank_size(self) -> int | None:
        """The number of columns ``m`` of the :meth:`low_rank` factors, or ``None`` for a
        transform without a low-rank form. A function of the options alone.

        The default calls :meth:`low_rank` once (without gradients) when a subclass overrides
        it; a subclass that knows ``m`` from its options overrides this property instead."""
        if type(self).low_rank is Transform.low_rank or self.norm_tied:
            return None
        size = self.__dict__.get("_low_rank_size")
        if size is None:
            with torch.no_grad():
                factors = self.low_rank()
            size = -1 if factors is None else int(factors[0].shape[-1])
            self.__dict__["_low_rank_size"] = size
        return None if size < 0 else size

    @property
    def apply_flops(self) -> int:
        """Floating-point operations of :meth:`apply` per vector (the planner's cost model):
        ``n`` for a diagonal, ``4·n·m`` for ``I + U Vᵀ``, ``2·n²`` for a dense matrix (the
        default); a structured transform states its own."""
        if self.is_diagonal:
            return self.dim
        m = self.low_rank_size
        return 4 * self.dim * m if m is not None else 2 * self.dim * self.dim

    # -- the two views of the matrix ------------------------------------------------------
    def matrix(self) -> Tensor:
        """The dense matrix :math:`Q`, shape ``(n, n)``."""
        if self.norm_tied:
            raise StateError(f"{type(self).__name__} is norm-tied: its matrix depends on the "
                             f"matrix it conditions; use weightcond.delta_weight or layer.weight")
        eye = torch.eye(self.dim, dtype=self._dtype(), device=self._device())
        return self.apply(eye, transpose=True)  # rows of I·Q are the rows of Q

    def low_rank(self) -> tuple[Tensor, Tensor] | None:
        """``(U, V)``, both ``(n, m)``, with :math:`Q = I + U V^\\top`, for transforms that are
        the identity plus a thin term; ``None`` for the others.

        The layer's fast forward uses them to fold a left conditioner into a rank-``m``
        term (see :meth:`weightcond.placement.Conditioning.activation`).
        """
        return None

    def batch_key(self) -> Hashable | None:
        """Transforms with equal keys (not ``None``) compute :meth:`low_rank` together, in one
        batched call of :meth:`low_rank_batch` (see :func:`weightcond.batch_factors`).
        ``None`` (the default): never batched."""
        return None

    @classmethod
    def low_rank_batch(cls, transforms: Sequence[Transform]) -> list[tuple[Tensor, Tensor]]:
        """:meth:`low_rank` of each of ``transforms`` (all of this class, with one
        :meth:`batch_key`), computed together; the default computes them one by one."""
        factors = [t.low_rank() for t in transforms]
        if any(f is None for f in factors):
            raise StateError(f"{cls.__name__}.low_rank_batch: a transform has no low-rank form")
        return cast("list[tuple[Tensor, Tensor]]", factors)

    @property
    def fuses_linear(self) -> bool:
        """``True`` when :meth:`rotated_linear` computes the layer's GEMM with this transform
        on the input side of ``W`` (see Note (rotate the weight or the activations) in
        :meth:`weightcond.placement.Conditioning.activation`)."""
        return False

    def rotated_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """:math:`x (W Q)^\\top + b` for 2-D ``x``, with a backward of its own; only for
        transforms with :attr:`fuses_linear`."""
        raise StateError(f"{type(self).__name__} has no fused linear (fuses_linear is False)")

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        """:math:`Q h` (or :math:`Q^\\top h`) for each vector ``h`` along the last dimension.

        In row form this is ``h @ Q.mT`` (or ``h @ Q``).
        """
        factors = self.low_rank()
        if factors is not None:
            u, v = factors[::-1] if transpose else factors
            return thin_update(h, v.mT, u.mT)  # rows: h Qᵀ = h + (h V) Uᵀ
        q = self.matrix().to(h.dtype)
        return h @ (q if transpose else q.mT)

    # -- norm-tied diagonals (DoRA-style) ---------------------------------------------------
    detach_norm: bool = True

    def diagonal(self, norms: Tensor | None = None) -> Tensor:
        """The diagonal of :math:`Q` (for norm-tied transforms, given the ``norms`` of the
        conditioned matrix along the side dimension)."""
        return torch.diagonal(self.matrix())

    def initialize(self, norms: Tensor) -> None:
        """Called once at registration with the norms of the matrix the transform conditions
        (norm-tied transforms set their parameters so that they start as the identity)."""

    # -- helpers ------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


#: Every registered transform by name (re-exported as :data:`weightcond.TRANSFORMS`).
TRANSFORMS: Registry[type[Transform]] = Registry("transform")


def register_transform(name: str) -> Callable[[type[Transform]], type[Transform]]:
    """Class decorator: register a :class:`Transform` subclass under ``name``."""

    def decorate(cls: type[Transform]) -> type[Transform]:
        if not (isinstance(cls, type) and issubclass(cls, Transform)):
            raise TypeError(f"register_transform: expected a Transform subclass, got {cls!r}")
        TRANSFORMS.add(name, cls)
        cls.name = name
        return cls

    return decorate
