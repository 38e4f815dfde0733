"""The diagonals of norm-tied conditioners (DoRA's magnitude), matrix-free where possible."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..transforms.base import compute_dtype, limit_diagonal
from .execute import Stack, apply
from .frozen import OpaqueWeight, linear
from .plan import Placed

__all__ = ["appended_row_norms", "detached", "diagonals", "norms_of"]

# rows of W + ΔW whose norms the DoRA fast path recomputes exactly (Note (cancelled rows))
_EXACT_ROWS = 16


def norms_of(g: Tensor, left: bool) -> Tensor:
    """Norms of the rows (left) or columns (right) of ``g``, in the solve dtype."""
    return torch.linalg.vector_norm(g, dim=-1 if left else -2, dtype=compute_dtype(g.dtype))


def detached(conditioner: Placed) -> contextlib.AbstractContextManager[None]:
    """No gradient through the norms of a transform with ``detach_norm`` (DoRA's choice)."""
    return torch.no_grad() if conditioner.transform.detach_norm else contextlib.nullcontext()


def diagonals(stack: Stack, weight: Tensor | OpaqueWeight,
              dense_weight: Callable[[Tensor | OpaqueWeight, int], Tensor]
              ) -> list[Tensor | None]:
    """The diagonal of each norm-tied conditioner (``None`` for the others).

    Fast path (DESIGN §5): a left norm-tied conditioner whose matrix so far is
    ``diag(l) · X · R`` with ``R`` orthogonal has row norms ``|l| ⊙ ‖X‖_row``, and
    ``X = diag(p) W R_pre + s B A`` has
    ``‖X_i‖² = p_i² ‖W_i‖² + 2 s p_i [(W R_pre Aᵀ) ⊙ B]_i 1 + s² [(B A Aᵀ) ⊙ B]_i 1``,
    (``‖W_i‖²`` is a reduction over ``W``, computed once for an opaque ``W``). Anything
    else uses the dense matrix (``dense_weight``; for an opaque ``W`` the dequantized one).
    """
    conditioners = [*stack.pre, *stack.post]
    if not any(c.transform.norm_tied for c in conditioners):
        return [None] * len(conditioners)
    diags: list[Tensor | None] = []
    scale: Tensor | None = None  # product of left diagonals over the current base
    fast = True  # left factors so far diagonal, right factors so far orthogonal
    pre_scale: Tensor | None = None
    pre_right: list[Placed] = []
    pre_fast = True
    for i, c in enumerate(conditioners):
        in_post = i >= len(stack.pre)
        if i == len(stack.pre):
            pre_scale, pre_fast, scale, fast = scale, fast, None, True
        diag = None
        if c.transform.norm_tied:
            with detached(c):
                if c.is_left and fast and (pre_fast or not in_post):
                    sq = (_update_row_sq(stack, weight, pre_scale, pre_right) if in_post
                          else _scaled_weight_sq(weight, scale))
                    if in_post and scale is not None:
                        sq = sq * scale.to(sq.dtype) ** 2
                    norms = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
                else:
                    step = i + (1 if in_post else 0)
                    norms = norms_of(dense_weight(weight, step), c.is_left)
            diag = limit_diagonal(c.transform.diagonal(norms), weight.dtype)
        diags.append(diag)
        if c.is_left:
            if c.transform.is_diagonal:
                d = diag if diag is not None else c.transform.diagonal()
                scale = d if scale is None else scale * d
            else:
                fast = False
        elif c.transform.is_orthogonal:
            if not in_post:
                pre_right.append(c)
        else:
            fast = False
    return diags

def _scaled_weight_sq(weight: Tensor | OpaqueWeight, scale: Tensor | None) -> Tensor:
    # recomputed every call for a dense W (a reduction, no (out, in) temporary): a cache
    # keyed on the tensor's version would miss in-place changes made through `.data`; an
    # opaque (quantized) W computed it once
    sq = norms_of(weight, True) ** 2 if isinstance(weight, Tensor) else \
        weight.row_sq().to(compute_dtype(weight.dtype))
    return sq if scale is None else sq * scale.to(sq.dtype) ** 2

def _update_row_sq(stack: Stack, weight: Tensor | OpaqueWeight, pre_scale: Tensor | None,
                   pre_right: list[Placed]) -> Tensor:
    """``‖X_i‖²`` for ``X = diag(p) W R_pre + s B A`` without forming ``X``."""
    sq = _scaled_weight_sq(weight, pre_scale)
    if stack.update is None:
        return sq
    upd = stack.update
    a = upd.A
    for c in reversed(pre_right):  # rows of A R_preᵀ, i.e. the columns of R_pre Aᵀ
        a = apply(c.transform, a)
    dtype = sq.dtype
    wa = linear(a.to(weight.dtype), weight).to(dtype)  # (r, out) = (W R_pre Aᵀ)ᵀ
    b = upd.B.to(dtype)
    cross = (wa.mT * b).sum(-1)
    if pre_scale is not None:
        cross = cross * pre_scale.to(dtype)
    a32 = upd.A.to(dtype)
    quad = ((b @ (a32 @ a32.mT)) * b).sum(-1)
    s = upd.scaling
    total = sq + 2 * s * cross + s * s * quad
    # Note (cancelled rows): the expansion rounds each of its three terms, so a row where
    # W_i and s(BA)_i nearly cancel (‖X_i‖² much smaller than the terms) loses relative
    # accuracy in proportion (measured: 27 · n · eps on the output, in float64, for a
    # row with ‖X_i‖ = 0.04 ‖W_i‖). The _EXACT_ROWS rows that lose most are recomputed
    # from their entries: a (k, in) product, no (out, in) one, and no data-dependent
    # shape (no host sync, one graph under torch.compile).
    with torch.no_grad():
        terms = sq + 2 * abs(s) * cross.abs() + s * s * quad
        loss = total / terms.clamp_min(torch.finfo(dtype).tiny)
        rows = torch.topk(loss, min(_EXACT_ROWS, loss.numel()), largest=False).indices
    x = weight[rows] if isinstance(weight, Tensor) else weight.rows(rows)
    for c in pre_right:  # W_i R_pre
        x = apply(c.transform, x, transpose=True)
    # in the solve dtype under autocast too: these rows are here for their accuracy
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(dtype)
        if pre_scale is not None:
            x = x * pre_scale.to(dtype)[rows, None]
        x = torch.addmm(x, b[rows], a32, alpha=s)
        return total.index_put((rows,), x.square().sum(-1))


class _RowNorms:
    """A stand-in norm-tied left conditioner whose diagonal is its norms."""

    norm_tied = is_diagonal = detach_norm = True
    is_orthogonal = False

    def diagonal(self, norms: Tensor | None = None) -> Tensor:
        assert norms is not None
        return norms


@dataclass(frozen=True)
class _Appended:
    update: Any
    pre: list[Any]
    post: list[Any]


@dataclass(frozen=True)
class _Probe:
    transform: _RowNorms
    is_left: bool = True


class _NotExpandable(Exception):
    pass


def appended_row_norms(stack: Stack, weight: Tensor | OpaqueWeight, post: bool
                       ) -> Tensor | None:
    """The row norms of the matrix a left conditioner appended to the pre (``post=False``) or
    post stage would condition, by the expansion of :func:`diagonals` (``None`` where it does
    not apply: the caller forms the matrix)."""
    probe = _Probe(_RowNorms())
    view = _Appended(stack.update, [*stack.pre] if post else [*stack.pre, probe],
                     [*stack.post, probe] if post else [])

    def refuse(weight: Tensor | OpaqueWeight, steps: int) -> Tensor:
        raise _NotExpandable

    try:
        found = diagonals(view, weight, refuse)
    except _NotExpandable:
        return None
    return found[len(view.pre) - 1 if not post else -1]

