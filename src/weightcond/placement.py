r"""The "where" axis: pre/post × left/right, and the two forms of the conditioned layer.

The conditioned weight (DESIGN §2) is

.. math::

    W' = L_\text{post}\,\bigl(L_\text{pre}\, W\, R_\text{pre} + \Delta W\bigr)\,R_\text{post},

where each of the four factors is a product of conditioners. **Composition order**: the
pre conditioners act on :math:`W` in registration order, then :math:`\Delta W` is added,
then the post conditioners act in registration order. Each conditioner acts on the matrix
built so far: a left one multiplies it on the left (so later left conditioners are further
out), a right one multiplies it on the right (later ones further right, i.e. nearer the
input). A norm-tied conditioner (``magnitude``) reads the norms of the matrix built so far.

:class:`Conditioning` holds the update and the ordered conditioners of one layer and
computes both forms from that one ordered list:

* :meth:`Conditioning.dense_weight` — the canonical ``(out, in)`` matrix :math:`W'` (this is
  the ``torch.nn.utils.parametrize`` parametrization of ``layer.weight``);
* :meth:`Conditioning.activation` — the matrix-free forward

  .. math::

      y = L_\text{post}\bigl(L_\text{pre}\bigl(W (R_\text{pre} R_\text{post} x)\bigr)
          + s\,B A\,(R_\text{post} x)\bigr) + b',

  which never forms an ``(out, in)`` matrix for diagonal, low-rank and structured
  conditioners, except :math:`W R_\text{pre}` when that is smaller than the activations it
  saves (Note (rotate the weight or the activations) in :meth:`Conditioning.activation`).
  :math:`b'` is the bias conditioned by the left conditioners registered with
  ``condition_bias=True`` (in composition order); otherwise :math:`b' = b`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import batching
from .transforms.base import Transform, compute_dtype, limit_diagonal
from .update import LowRankUpdate

__all__ = ["Conditioner", "Conditioning", "Side", "Stage"]


class Stage(str, Enum):
    """Where a conditioner acts relative to the update: before (``pre``) or after (``post``)."""

    PRE = "pre"
    POST = "post"


class Side(str, Enum):
    """Which side of the weight: ``left`` (output, ``out × out``) or ``right`` (input)."""

    LEFT = "left"
    RIGHT = "right"


class Conditioner(nn.Module):
    """A :class:`~weightcond.transforms.Transform` placed at one site of a layer.

    Returned by :func:`weightcond.register_conditioning`. The transform's parameters are
    under ``conditioner.transform``.
    """

    def __init__(self, transform: Transform, placement: Stage, side: Side,
                 condition_bias: bool) -> None:
        super().__init__()
        self.transform = transform
        self._placement = placement
        self._side = side
        self.condition_bias = condition_bias

    @property
    def placement(self) -> str:
        """``"pre"`` or ``"post"``."""
        return self._placement.value

    @property
    def side(self) -> str:
        """``"left"`` or ``"right"``."""
        return self._side.value

    @property
    def is_left(self) -> bool:
        return self._side is Side.LEFT

    def on_activations(self, h: Tensor, diag: Tensor | None) -> Tensor:
        """Apply the conditioning matrix to the vectors along the last dimension of ``h``."""
        if diag is not None:
            return h * diag.to(h.dtype)
        return self.transform.apply(h)

    def on_matrix(self, g: Tensor, diag: Tensor | None) -> Tensor:
        """Multiply the matrix ``g`` by the conditioning matrix on this conditioner's side."""
        if diag is not None:
            diag = diag.to(g.dtype)
            return diag[:, None] * g if self.is_left else g * diag
        if self.is_left:
            return self.transform.apply(g.mT).mT  # Q G: Q applied to the columns of G
        return self.transform.apply(g, transpose=True)  # G Q: Qᵀ applied to the rows

    def extra_repr(self) -> str:
        return (f"placement={self.placement!r}, side={self.side!r}, "
                f"condition_bias={self.condition_bias}")


def _norms(g: Tensor, left: bool) -> Tensor:
    """Norms of the rows (left) or columns (right) of ``g``, in the solve dtype."""
    return torch.linalg.vector_norm(g, dim=-1 if left else -2, dtype=compute_dtype(g.dtype))


def _detached(conditioner: Conditioner) -> contextlib.AbstractContextManager[None]:
    return torch.no_grad() if conditioner.transform.detach_norm else contextlib.nullcontext()


def _functorch() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, …) is running.

    Note (torch.func): the layer's own autograd Functions (:class:`_LinearNode`,
    :class:`_ScaleAdd`, the fused block) have backward passes of their own, which
    ``torch.func`` cannot transform (``autograd.Function`` refuses them there); under such a
    transform the same forward runs on PyTorch's operators instead, whose derivatives it
    knows: the same values, without the fused backward passes."""
    return torch._C._are_functorch_transforms_active()


# -- the output side of the activation form as a short list of steps ---------------------------
# Note (fused output steps): on CPU the cost of the fast path beyond LoRA is mostly the
# (tokens × out) temporaries, so the output side is run as a list of steps in which a
# diagonal is kept pending until the next step that needs it, and additions are fused:
# diag then add -> addcmul, low-rank add -> addmm, low-rank add then bias -> one addmm.
# When the steps are diagonals and then additions of terms on the GEMM's own input (LoRA,
# Pre-Diag, SORA with its rotation folded), or those terms and then diagonals (DoRA), the
# GEMM and the steps are one autograd node (Note (one node for the layer) in _LinearNode).


@dataclass(frozen=True)
class _Scale:
    diag: Tensor


@dataclass(frozen=True)
class _Apply:
    conditioner: Conditioner


@dataclass(frozen=True)
class _LowRank:
    """Adds ``(input @ leftᵀ) @ right``."""

    input: Tensor  # (..., in)
    left: Tensor  # (m, in)
    right: Tensor  # (m, out)


@dataclass(frozen=True)
class _Add:
    vector: Tensor


_Step = _Scale | _Apply | _LowRank | _Add


# rows of W + ΔW whose norms the DoRA fast path recomputes exactly (Note (cancelled rows))
_EXACT_ROWS = 16

# fold thin left conditioners when tokens · this >= min(out, in) (see Note (folded rotations))
_FOLD_TOKENS_PER_DIM = 4


def _fold_right(chain: list[Conditioner], weight: Tensor, h: Tensor) -> list[_Step] | None:
    """``W R_1 ⋯ R_k h`` for thin ``R_i = I + U_i V_iᵀ`` as ``W h`` plus rank-``m_i`` terms,
    ``W R_1 ⋯ R_k = W + Σ_i (W U_i)(V_iᵀ R_{i+1} ⋯ R_k)``; ``None`` unless every ``R_i`` is
    thin (see Note (folded rotations))."""
    if not chain:
        return None
    factors = [None if c.transform.norm_tied else batching.low_rank(c.transform)
               for c in chain]
    if any(f is None for f in factors):
        return None
    terms: list[_Step] = []
    for i, (u, v) in enumerate(factors):  # type: ignore[misc]
        rows = _rows_times(v.mT.to(h.dtype), [(c, None) for c in chain[i + 1:]])
        terms.append(_LowRank(h, rows, F.linear(u.mT.to(weight.dtype).contiguous(), weight)))
    return terms


def _on_weight(x: Tensor, tokens: int, out_features: int) -> bool:
    """Whether the right pre chain is cheaper applied to ``W`` than to the activations
    (see Note (rotate the weight or the activations) in :meth:`Conditioning.activation`)."""
    # on x.requires_grad alone, not the grad mode: one input gives the same bits with and
    # without torch.no_grad()
    return tokens > out_features and not x.requires_grad


def _fused(right_pre: list[tuple[Conditioner, Tensor | None]], x: Tensor, tokens: int,
           out_features: int) -> Transform | None:
    """The transform whose :meth:`~weightcond.transforms.Transform.rotated_linear` computes the
    base GEMM, or ``None`` (see Note (rotate the weight or the activations))."""
    if len(right_pre) != 1 or right_pre[0][1] is not None:
        return None
    transform = right_pre[0][0].transform
    if not transform.fuses_linear or _functorch():
        return None
    limit = 2 * tokens if x.requires_grad else tokens
    return transform if out_features < limit else None


def _rows_times(rows: Tensor, items: list[tuple[Conditioner, Tensor | None]]) -> Tensor:
    """``rows · M_1 ⋯ M_k`` for the conditioners ``items`` in that order (with their
    norm-tied diagonals, if any): a right chain as registered, a left chain reversed."""
    for c, d in items:
        if d is None and c.transform.is_diagonal:
            d = c.transform.diagonal()
        rows = rows * d.to(rows.dtype) if d is not None else c.transform.apply(rows,
                                                                                transpose=True)
    return rows


def _diagonal_grad(grad: Tensor, y: Tensor, d: Tensor) -> Tensor:
    """The gradient of ``d`` in ``y ⊙ d``: ``Σ_tokens grad ⊙ y``, reduced over token chunks
    (Note (diagonal gradient memory)), in ``d``'s dtype."""
    accumulate = compute_dtype(d.dtype)
    if torch.compiler.is_compiling():
        # the compiler fuses the product into the reduction (no temporary), and a
        # Python loop over the tokens would specialize the graph on their count
        return (grad * y).sum(0, dtype=accumulate).to(d.dtype)
    grad_d = torch.zeros(d.shape, dtype=accumulate, device=d.device)
    chunk = max(1, 2**18 // max(d.numel(), 1))  # rows per 1 MiB (fp32) temporary
    for start in range(0, grad.shape[0], chunk):
        rows = slice(start, start + chunk)
        grad_d += (grad[rows] * y[rows]).sum(0, dtype=accumulate)
    return grad_d.to(d.dtype)


class _ScaleAdd(torch.autograd.Function):
    """``y ⊙ d + addend`` (``d`` a vector over the last dimension, ``addend`` optional).

    Note (diagonal gradient memory): autograd's ``addcmul`` backward builds two
    ``(tokens, out)`` temporaries for the gradient of ``d``; here it is reduced over
    token chunks, so a learnable output diagonal costs no activation-sized temporary
    beyond the saved input. With ``in_place`` the sum is accumulated into ``addend`` (a
    temporary of ``y``'s shape that nothing else holds), see Note (in-place accumulation)."""

    @staticmethod
    def forward(ctx, y: Tensor, d: Tensor, addend: Tensor | None,
                in_place: bool = False) -> Tensor:
        ctx.save_for_backward(y, d)
        ctx.addend_shape = None if addend is None else addend.shape
        if addend is None:
            return y * d
        if in_place:  # addend is a private temporary of y's shape
            ctx.mark_dirty(addend)
            return addend.addcmul_(y, d)
        return torch.addcmul(addend, y, d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, d = ctx.saved_tensors
        grad_y = grad * d if ctx.needs_input_grad[0] else None
        grad_d = _diagonal_grad(grad, y, d) if ctx.needs_input_grad[1] else None
        grad_addend = None
        if ctx.needs_input_grad[2]:
            grad_addend = grad.sum_to_size(ctx.addend_shape)
        return grad_y, grad_d, grad_addend, None


def _scale_add(y: Tensor, d: Tensor, addend: Tensor | None = None,
               in_place: bool = False) -> Tensor:
    """``y ⊙ d + addend`` by :class:`_ScaleAdd`, or by PyTorch's operators (out of place)
    under ``torch.func`` (Note (torch.func))."""
    if not _functorch():
        return _ScaleAdd.apply(y, d, addend, in_place)
    return y * d if addend is None else torch.addcmul(addend, y, d)


def _merge_low_rank(terms: list[_LowRank]) -> tuple[Tensor, Tensor] | None:
    """``(t, right)`` whose product ``t @ right`` is the sum of ``terms`` (``None`` without
    terms): the terms on one input share one GEMM (their left factors stacked), and all
    terms share one output GEMM."""
    if not terms:
        return None
    # grouped by identity with `is`, not by `id()`: torch.compile guards on the identity of
    # a tensor passed to id(), which recompiles the model for every new input
    groups: list[list[_LowRank]] = []
    for term in terms:
        group = next((g for g in groups if g[0].input is term.input), None)
        if group is None:
            groups.append([term])
        else:
            group.append(term)
    ts, rights = [], []
    for group in groups:
        x = group[0].input
        x = x.reshape(-1, x.shape[-1])
        ts.append(F.linear(x, _stacked([g.left for g in group], x.dtype)))
        rights.extend(g.right for g in group)
    t = torch.cat(ts, dim=-1) if len(ts) > 1 else ts[0]
    return t, _stacked(rights, t.dtype)


def _stacked(factors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The thin factors one above the other, contiguous (Note (thin GEMMs))."""
    stacked = torch.cat(factors) if len(factors) > 1 else factors[0]
    return stacked.to(dtype).contiguous()


def _vector_sum(run: list[_Step], dtype: torch.dtype) -> Tensor | None:
    """The sum of the vectors the :class:`_Add` steps of ``run`` add (``None`` without)."""
    vectors = [a.vector.to(dtype) for a in run if isinstance(a, _Add)]
    return sum(vectors[1:], vectors[0]) if vectors else None


class _LinearNode(torch.autograd.Function):
    """One autograd node for ``(x Wᵀ) ⊙ d + (x Lᵀ) R + v`` or, with ``post``,
    ``((x Wᵀ) + (x Lᵀ) R) ⊙ d + v`` (``d``, the low-rank pair and ``v`` optional; ``b``, a
    bias fused into the GEMM, only without ``d``).

    Note (one node for the layer): the forward runs the same operations as the step list
    (:func:`_run`), in the same order and on the same buffers, so it gives the same bits. The
    backward differs from autograd's for the separate nodes in two ways. The input's gradient
    is one buffer, ``g (D W)`` (or ``(g ⊙ d) W``) and then ``+= (g Rᵀ) L`` in place, instead
    of two ``(tokens, in)`` gradients and their sum. And ``D W`` (``out × in``) is formed
    instead of ``g ⊙ d`` when it is the smaller (fewer input features than tokens); with
    ``post``, ``d`` scales the thin factor ``R`` instead of the gradient as well.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, d: Tensor | None,
                left: Tensor | None, right: Tensor | None, vector: Tensor | None,
                post: bool) -> Tensor:
        t = None if left is None else F.linear(x, left)
        if d is None or post:
            y = F.linear(x, weight, bias)
            if t is not None:
                y.addmm_(t, right)
            if d is None:
                scaled = None
                if vector is not None:
                    y.add_(vector)
            else:  # d multiplies the sum
                scaled = y
                y = y * d if vector is None else torch.addcmul(vector, y, d)
        else:
            scaled = F.linear(x, weight)
            if t is not None:
                y = t @ right if vector is None else torch.addmm(vector, t, right)
                y.addcmul_(scaled, d)
            else:
                y = scaled * d if vector is None else torch.addcmul(vector, scaled, d)
        ctx.post = post
        ctx.save_for_backward(x, weight, d, left, right, t,
                              scaled if ctx.needs_input_grad[3] else None)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, d, left, right, t, scaled = ctx.saved_tensors
        need_x, need_w, need_b, need_d, need_l, need_r, need_v = ctx.needs_input_grad[:7]
        on_terms = d if ctx.post else None  # the diagonal the low-rank terms pass through
        grad_x = grad_w = grad_b = grad_d = grad_l = grad_r = grad_v = None
        if need_d:
            grad_d = _diagonal_grad(grad, scaled, d)
        if t is not None and (need_x or need_l):
            grad_t = grad.mm((right if on_terms is None else right * on_terms).mT)
        if need_r:
            grad_r = t.mT.mm(grad)
            if on_terms is not None:
                grad_r = grad_r * on_terms
        if need_l:
            grad_l = grad_t.mT.mm(x)
        grad_times_d = None  # g ⊙ d, only if needed
        if need_x:
            if d is None:
                grad_x = grad.mm(weight)
            elif x.shape[-1] < x.shape[0]:  # D W is smaller than g ⊙ d
                grad_x = grad.mm(d[:, None] * weight)
            else:
                grad_times_d = grad * d
                grad_x = grad_times_d.mm(weight)
            if t is not None:
                grad_x.addmm_(grad_t, left)
        if need_w:
            if d is not None and grad_times_d is None:
                grad_times_d = grad * d
            grad_w = (grad if d is None else grad_times_d).mT.mm(x)
        if need_b:
            grad_b = grad.sum(0)
        if need_v:
            grad_v = grad.sum(0)
        return grad_x, grad_w, grad_b, grad_d, grad_l, grad_r, grad_v, None


def _one_node(steps: list[_Step], source: Tensor, x: Tensor, weight: Tensor,
              bias: Tensor | None) -> Tensor | None:
    """The output side as one :class:`_LinearNode` (``x`` the 2-D ``source``) when it is
    diagonals and then additions of terms on ``source`` (LoRA, Pre-Diag, SORA with its
    rotation folded), or terms on ``source``, diagonals and then vectors (DoRA); ``None``
    otherwise, under autocast (whose casts the separate nodes record) and under ``torch.func``
    (Note (torch.func))."""
    if not steps or torch.is_autocast_enabled(x.device.type) or _functorch():
        return None

    def of_type(kind: type, i: int) -> int:  # the end of the run of `kind` steps from i
        while i < len(steps) and isinstance(steps[i], kind):
            i += 1
        return i

    first, terms_end = of_type(_Scale, 0), of_type(_LowRank, 0)
    scales_end = of_type(_Scale, terms_end)
    post = first == 0 and scales_end > terms_end
    if post:  # terms, diagonals, vectors
        scales, run, tail = steps[terms_end:scales_end], steps[:terms_end], steps[scales_end:]
    else:  # diagonals, then terms and vectors
        scales, run, tail = steps[:first], steps[first:], []
    if not all((isinstance(s, _LowRank) and s.input is source) or isinstance(s, _Add)
               for s in run) or not all(isinstance(s, _Add) for s in tail) or \
            (scales and bias is not None):
        return None
    d = None
    for step in scales:
        diag = step.diag.to(x.dtype)  # type: ignore[union-attr]
        d = diag if d is None else d * diag
    terms = [s for s in run if isinstance(s, _LowRank)]
    left = _stacked([s.left for s in terms], x.dtype) if terms else None
    right = _stacked([s.right for s in terms], x.dtype) if terms else None
    return _LinearNode.apply(x, weight, bias, d, left, right,
                             _vector_sum([*run, *tail], x.dtype), post)


def _run(base: Callable[[], Tensor], steps: list[_Step], lead: torch.Size) -> Tensor:
    """Run the output-side ``steps`` on ``y = base()``, fusing where possible; ``base``
    returns the 2-D ``(tokens, out)`` output and ``lead`` is the input's shape without its
    last dimension. ``base`` is a callable so that no caller keeps ``y`` alive once a step
    has replaced it (one ``(tokens, out)`` tensor less at the peak).

    Note (in-place accumulation): ``y`` is accumulated into in place (``addmm_``,
    ``add_``, ``addcmul_`` on the low-rank temporary) whenever it is a tensor this call made
    and no autograd node saved: the output of ``base`` (a GEMM saves its inputs, not its
    output), of an addition or of :class:`_ScaleAdd`, but not of a transform's ``apply``.
    Each activation-sized result written into an existing buffer instead of a new one
    spares a fresh ``(tokens, out)`` allocation, whose first touch (page faults) cost as much
    as the addition itself on CPU. ``base`` returns a 2-D tensor so that ``y`` is not an
    autograd view (an in-place op on a view records a ``CopySlices`` node that copies the
    whole gradient)."""
    y = base()
    # y may be updated in place (see the Note); not under torch.func, whose vmap has no
    # batching rule for most in-place products
    may_own = not _functorch()
    owned = may_own
    pending: Tensor | None = None
    i = 0
    while i < len(steps):
        step = steps[i]
        if isinstance(step, _Scale):
            d = step.diag.to(y.dtype)
            pending = d if pending is None else pending * d
            i += 1
            continue
        if isinstance(step, _Apply):
            if pending is not None:
                y, pending = _scale_add(y, pending), None
            y, owned = step.conditioner.transform.apply(y), False
            i += 1
            continue
        j = i  # a run of additions
        while j < len(steps) and isinstance(steps[j], (_LowRank, _Add)):
            j += 1
        run = steps[i:j]
        vector = _vector_sum(run, y.dtype)
        low_rank = _merge_low_rank([a for a in run if isinstance(a, _LowRank)])
        if pending is None:
            if low_rank is not None:
                y = y.addmm_(*low_rank) if owned else torch.addmm(y, *low_rank)
            if vector is not None:
                y = y.add_(vector) if owned or (low_rank is not None and may_own) else \
                    y + vector
        else:
            if low_rank is None:
                y = _scale_add(y, pending, vector)
            else:
                addend = low_rank[0] @ low_rank[1] if vector is None else \
                    torch.addmm(vector, *low_rank)
                # (neither dynamo nor the JIT tracer takes mark_dirty on a Function input;
                # the compiler fuses the sum anyway)
                in_place = not (torch.compiler.is_compiling() or torch.jit.is_tracing())
                y = _scale_add(y, pending, addend, in_place)
            pending = None
        owned = may_own
        i = j
    if pending is not None:
        y = _scale_add(y, pending)
    return _output(y, lead)


def _output(y: Tensor, lead: torch.Size) -> Tensor:
    """The 2-D ``(tokens, out)`` result with the input's leading dimensions."""
    # Note (no view out): like nn.Linear, return a tensor that is not an autograd view of the
    # 2-D temporary. FSDP2 hooks a sharded module's output for its pre-backward all-gather;
    # an in-place op on a view output (`out += residual`) would drop that hook (FSDP2 warns).
    # The 2-D tensor is private to this call, so the alias is never observable.
    return torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))


class Conditioning(nn.Module):
    """The update and the ordered conditioners of one layer; the parametrization of its weight.

    Created by :func:`weightcond.register_update` / :func:`weightcond.register_conditioning`.
    ``forward(weight)`` returns the dense conditioned weight, as
    ``torch.nn.utils.parametrize`` requires.
    """

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.update: LowRankUpdate | None = None
        self.pre = nn.ModuleList()
        self.post = nn.ModuleList()

    # -- the ordered list -------------------------------------------------------------------
    def conditioners(self) -> list[Conditioner]:
        """The conditioners in composition order: the pre stage, then the post stage."""
        return [*self.pre, *self.post]  # type: ignore[list-item]

    def stage(self, placement: Stage) -> nn.ModuleList:
        return self.pre if placement is Stage.PRE else self.post

    def stage_end(self, placement: Stage) -> int:
        """The number of composition steps (conditioners, update) up to the end of a stage."""
        if placement is Stage.PRE:
            return len(self.pre)
        return len(self.pre) + 1 + len(self.post)

    # -- the dense, canonical form -------------------------------------------------------------
    def forward(self, weight: Tensor) -> Tensor:
        return self.dense_weight(weight)

    def dense_weight(self, weight: Tensor, *, steps: int | None = None) -> Tensor:
        """:math:`W'` as a dense ``(out, in)`` matrix (after the first ``steps`` steps)."""
        return self._compose_dense(weight, steps)[0]

    def _compose_dense(self, weight: Tensor, steps: int | None = None
                       ) -> tuple[Tensor, list[Tensor | None]]:
        """The dense matrix after ``steps`` composition steps (all by default), and the
        diagonals the norm-tied conditioners took on the way."""
        g = weight
        diags: list[Tensor | None] = []
        order: list[Conditioner | None] = [*self.pre, None, *self.post]  # type: ignore[list-item]
        for step, conditioner in enumerate(order):
            if steps is not None and step >= steps:
                break
            if conditioner is None:
                if self.update is not None:
                    g = g + self.update.matrix().to(g.dtype)
                continue
            diag = None
            if conditioner.transform.norm_tied:
                with _detached(conditioner):
                    norms = _norms(g, conditioner.is_left)
                diag = limit_diagonal(conditioner.transform.diagonal(norms), weight.dtype)
            diags.append(diag)
            g = conditioner.on_matrix(g, diag)
        return g, diags

    def initial_norms(self, weight: Tensor, placement: Stage, side: Side) -> Tensor:
        """Norms of the matrix a conditioner appended to ``placement`` would condition."""
        with torch.no_grad():
            g = self.dense_weight(weight, steps=self.stage_end(placement))
            return _norms(g, side is Side.LEFT)

    # -- the matrix-free form ---------------------------------------------------------------------
    def activation(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's output for input ``x`` without forming the conditioned weight.

        Note (folded rotations): a left conditioner with :math:`Q = I + U V^\\top`
        (``skew``, ``householder``) acts on the output ``y = Y h`` as
        ``y + U (Vᵀ Y) h``: a rank-``m`` term whose ``(m, in)`` factor :math:`V^\\top Y` is
        pulled back through the frozen weight with small GEMMs (``m·out·in`` per step).
        Likewise right pre-stage conditioners that are all thin fold as
        :math:`W R_1 \\cdots R_k = W + \\sum_i (W U_i)(V_i^\\top R_{i+1} \\cdots R_k)`. Every
        such term and the update read the same activations, so they run as one stacked
        low-rank GEMM. With enough tokens this is cheaper than rotating every activation and
        creates no activation-sized temporaries; with few tokens (generation) the rotations
        are applied to the activations instead. Both are exact and tested against the dense
        form.

        Note (rotate the weight or the activations): any other right pre chain (blocks,
        butterflies, Givens, a dense rotation, diagonals) is applied to the activations,
        ``tokens·cost`` per pass, or to the weight, ``out·cost``, forming
        :math:`W R_\\text{pre}` (``out × in``). The backward needs one large GEMM either
        way: the activation form ``g·W`` (the gradient reaching :math:`R_\\text{pre}`, and
        ``x``'s gradient too), the weight form ``gᵀ·x`` (the gradient of
        :math:`W R_\\text{pre}`), plus a second one, ``g·(W R_\\text{pre})``, when ``x`` needs
        its gradient. So the weight form is taken when ``out < tokens`` and ``x`` needs no
        gradient (the first adapted layer of a model, inference); then :math:`W R_\\text{pre}`
        is smaller than the activations it replaces (OFT at 1024², 2048 tokens: the block
        products on half as many rows). A lone right pre conditioner whose transform
        :attr:`~weightcond.transforms.Transform.fuses_linear` (an exactly orthogonal
        ``block``) computes the base GEMM itself and reads its own gradient off the input
        gradient, so with ``x``'s gradient the weight form costs ``out·cost`` plus
        ``tokens·cost`` against the activation form's three ``tokens·cost``, and it is taken
        when ``out < 2·tokens`` (Note (the input gradient gives the blocks' gradient) in
        :meth:`weightcond.transforms.Block.rotated_linear`).
        """
        conditioners = self.conditioners()
        diags = self._diagonals(weight, conditioners)
        items = list(zip(conditioners, diags))
        pre, post = items[:len(self.pre)], items[len(self.pre):]
        tokens = x.numel() // max(x.shape[-1], 1)
        fold = tokens * _FOLD_TOKENS_PER_DIM >= min(self.out_features, self.in_features)
        h_post = x
        for c, d in reversed(post):
            if not c.is_left:
                h_post = c.on_activations(h_post, d)
        right_pre = [(c, d) for c, d in pre if not c.is_left]
        folded = _fold_right([c for c, _ in right_pre], weight, h_post) if fold else None
        h_pre = h_post
        fused = None if folded is not None else _fused(right_pre, x, tokens, self.out_features)
        if folded is None and right_pre and fused is None:
            if _on_weight(x, tokens, self.out_features):
                weight = _rows_times(weight, right_pre)  # W R_1 ⋯ R_k, R_pre is now in W
                right_pre = []
            else:
                for c, d in reversed(right_pre):
                    h_pre = c.on_activations(h_pre, d)
        folded_terms: list[_Step] = list(folded or [])
        lead, flat = h_pre.shape[:-1], h_pre.reshape(-1, h_pre.shape[-1])  # 2-D: see _run
        update: list[_LowRank] = self._update_terms(h_post)

        def linear(b: Tensor | None) -> Tensor:
            return F.linear(flat, weight, b) if fused is None else \
                fused.rotated_linear(flat, weight, b)

        def finish(chain: list[_Step], b: Tensor | None) -> Tensor:
            node = None if fused is not None else _one_node(chain, h_pre, flat, weight, b)
            return _output(node, lead) if node is not None else \
                _run(lambda: linear(b), chain, lead)

        if not any(c.is_left for c in conditioners):  # nothing acts on the output: fuse the bias
            return finish([*folded_terms, *update], bias)
        left_pre = [(c, d) for c, d in pre if c.is_left]
        left_post = [(c, d) for c, d in post if c.is_left]

        def pull_back(rows: Tensor, before: list[tuple[Conditioner, Tensor | None]],
                      in_post: bool) -> Tensor:
            """``rows · (the output chain so far)`` as rows acting on ``h_post``."""
            rows = _rows_times(rows, before[::-1])
            through_update = None
            if in_post:
                for term in update:  # s·B A as (x Aᵀ)(s·B)ᵀ: rows (s·B) A
                    through_update = (rows @ term.right.mT.to(rows.dtype)) @ \
                        term.left.to(rows.dtype)
                rows = _rows_times(rows, left_pre[::-1])
            w = weight.to(rows.dtype)
            if through_update is not None and not right_pre:
                return torch.addmm(through_update, rows, w)
            out = _rows_times(rows @ w, right_pre)
            return out if through_update is None else out + through_update

        def steps(chain: list[tuple[Conditioner, Tensor | None]], in_post: bool) -> list[_Step]:
            found: list[_Step] = []
            for i, (c, d) in enumerate(chain):
                if d is None and c.transform.is_diagonal:
                    d = c.transform.diagonal()
                factors = None if d is not None or not fold else batching.low_rank(c.transform)
                if d is not None:
                    found.append(_Scale(d))
                elif factors is not None:
                    u, v = (f.to(x.dtype) for f in factors)
                    pulled = pull_back(v.mT, chain[:i], in_post)
                    found.append(_LowRank(h_post, pulled, u.mT))
                else:
                    found.append(_Apply(c))
            return found

        chain = [*folded_terms, *steps(left_pre, False), *update, *steps(left_post, True)]
        bias = self._condition_bias(bias, items)
        if bias is not None:
            chain.append(_Add(bias))
        return finish(chain, None)

    def _update_terms(self, h: Tensor) -> list[_LowRank]:
        if self.update is None:
            return []
        return [_LowRank(h, *self.update.factors())]

    def conditioned_bias(self, bias: Tensor, weight: Tensor) -> Tensor:
        """The dense conditioned bias :math:`b'` (the parametrization of ``layer.bias``)."""
        conditioners = self.conditioners()
        if any(c.condition_bias and c.transform.norm_tied for c in conditioners):
            diags = self._compose_dense(weight)[1]
        else:
            diags = [None] * len(conditioners)
        return self._condition_bias(bias, list(zip(conditioners, diags)))

    @staticmethod
    def _condition_bias(bias: Tensor | None,
                        items: list[tuple[Conditioner, Tensor | None]]) -> Tensor | None:
        if bias is None:
            return None
        for c, d in items:
            if c.condition_bias:
                bias = c.on_activations(bias, d)
        return bias

    # -- norms of norm-tied conditioners, matrix-free where possible -------------------------------
    def _diagonals(self, weight: Tensor, conditioners: list[Conditioner]) -> list[Tensor | None]:
        """The diagonal of each norm-tied conditioner (``None`` for the others).

        Fast path (DESIGN §5): a left norm-tied conditioner whose matrix so far is
        ``diag(l) · X · R`` with ``R`` orthogonal has row norms ``|l| ⊙ ‖X‖_row``, and
        ``X = diag(p) W R_pre + s B A`` has
        ``‖X_i‖² = p_i² ‖W_i‖² + 2 s p_i [(W R_pre Aᵀ) ⊙ B]_i 1 + s² [(B A Aᵀ) ⊙ B]_i 1``,
        (``‖W_i‖²`` is a reduction over ``W``). Anything else uses the dense matrix.
        """
        if not any(c.transform.norm_tied for c in conditioners):
            return [None] * len(conditioners)
        diags: list[Tensor | None] = []
        scale: Tensor | None = None  # product of left diagonals over the current base
        fast = True  # left factors so far diagonal, right factors so far orthogonal
        pre_scale: Tensor | None = None
        pre_right: list[Conditioner] = []
        pre_fast = True
        for i, c in enumerate(conditioners):
            in_post = i >= len(self.pre)
            if i == len(self.pre):
                pre_scale, pre_fast, scale, fast = scale, fast, None, True
            diag = None
            if c.transform.norm_tied:
                with _detached(c):
                    if c.is_left and fast and (pre_fast or not in_post):
                        sq = (self._update_row_sq(weight, pre_scale, pre_right) if in_post
                              else self._scaled_weight_sq(weight, scale))
                        if in_post and scale is not None:
                            sq = sq * scale.to(sq.dtype) ** 2
                        norms = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
                    else:
                        step = i + (1 if in_post else 0)
                        norms = _norms(self.dense_weight(weight, steps=step), c.is_left)
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

    def _scaled_weight_sq(self, weight: Tensor, scale: Tensor | None) -> Tensor:
        # recomputed every call (a reduction, no (out, in) temporary): a cache keyed on the
        # tensor's version would miss in-place changes made through `.data`
        sq = _norms(weight, True) ** 2
        return sq if scale is None else sq * scale.to(sq.dtype) ** 2

    def _update_row_sq(self, weight: Tensor, pre_scale: Tensor | None,
                       pre_right: list[Conditioner]) -> Tensor:
        """``‖X_i‖²`` for ``X = diag(p) W R_pre + s B A`` without forming ``X``."""
        sq = self._scaled_weight_sq(weight, pre_scale)
        if self.update is None:
            return sq
        upd = self.update
        a = upd.A
        for c in reversed(pre_right):  # rows of A R_preᵀ, i.e. the columns of R_pre Aᵀ
            a = c.transform.apply(a)
        dtype = sq.dtype
        wa = F.linear(a.to(weight.dtype), weight).to(dtype)  # (r, out) = (W R_pre Aᵀ)ᵀ
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
        x = weight[rows]
        for c in pre_right:  # W_i R_pre
            x = c.transform.apply(x, transpose=True)
        # in the solve dtype under autocast too: these rows are here for their accuracy
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if pre_scale is not None:
                x = x * pre_scale.to(dtype)[rows, None]
            x = torch.addmm(x, b[rows], a32, alpha=s)
            return total.index_put((rows,), x.square().sum(-1))
