r"""The executor: runs a :class:`~weightcond.engine.plan.Plan` on an input.

The matrix-free forward of a conditioned layer (DESIGN §2),

.. math::

    y = L_\text{post}\bigl(L_\text{pre}\bigl(W (R_\text{pre} R_\text{post} x)\bigr)
        + s\,B A\,(R_\text{post} x)\bigr) + b',

is computed as an input side (the right chains, each in its planned form) and an output
side: the frozen GEMM followed by a short list of steps — scale by a diagonal, apply a
transform, add a low-rank term, add a vector — in which the low-rank terms on one input
share one stacked GEMM and the steps are fused into one autograd node where their pattern
allows (:class:`~weightcond.engine.kernels.LinearNode`).

Note (folded rotations): a thin left conditioner :math:`Q = I + U V^\top` acts on the
output ``y = Y h`` as ``y + U (Vᵀ Y) h``: a rank-``m`` term whose ``(m, in)`` factor
:math:`V^\top Y` is pulled back through the frozen weight with small GEMMs (``m·out·in`` per
step). Thin right pre conditioners fold as
:math:`W R_1 \cdots R_k = W + \sum_i (W U_i)(V_i^\top R_{i+1} \cdots R_k)`, and thin right
post conditioners, after everything else, as
:math:`M R_1 \cdots R_k = M + \sum_i (M R_1 \cdots R_{i-1} U_i) V_i^\top` with :math:`M` the
conditioned matrix without them, applied to the ``m`` columns only. Every such term and the
update read the same activations, so they run as one stacked low-rank GEMM and create no
activation-sized temporaries. The planner takes this form when it is cheaper than rotating
every activation (not with few tokens: generation). Both are exact and tested against the
dense form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..transforms.base import Transform, thin_update
from ..update import LowRankUpdate
from . import factors
from .frozen import OpaqueWeight, linear
from .kernels import LinearNode, functorch_active, output, scale_add
from .plan import Form, Placed, Plan

__all__ = ["Stack", "apply", "condition_bias", "execute", "on_activations", "on_matrix",
           "rows_times", "run_steps"]


class Stack(Protocol):
    """What the executor reads of a layer's conditioning
    (:class:`weightcond.placement.Conditioning`)."""

    update: LowRankUpdate | None

    @property
    def pre(self) -> Sequence[Placed]: ...

    @property
    def post(self) -> Sequence[Placed]: ...


# -- one conditioner on vectors or on a matrix ---------------------------------------------------
def apply(transform: Transform, h: Tensor, *, transpose: bool = False) -> Tensor:
    """``transform.apply(h, transpose=...)``, with the factors of the running model forward's
    batch (:mod:`weightcond.engine.factors`) for a transform that runs the base class's
    identity-plus-low-rank :meth:`~weightcond.transforms.Transform.apply`."""
    if type(transform).apply is Transform.apply and transform.low_rank_size is not None:
        pair = factors.low_rank(transform)
        if pair is not None:
            u, v = pair[::-1] if transpose else pair
            return thin_update(h, v.mT, u.mT)  # rows: h Qᵀ = h + (h V) Uᵀ
    return transform.apply(h, transpose=transpose)


def on_activations(c: Placed, h: Tensor, diag: Tensor | None) -> Tensor:
    """The conditioning matrix of ``c`` applied to the vectors along the last dimension of
    ``h`` (``diag``: its norm-tied diagonal, if any)."""
    if diag is not None:
        return h * diag.to(h.dtype)
    return apply(c.transform, h)


def on_matrix(c: Placed, g: Tensor, diag: Tensor | None) -> Tensor:
    """The matrix ``g`` multiplied by the conditioning matrix of ``c`` on its side."""
    if diag is not None:
        diag = diag.to(g.dtype)
        return diag[:, None] * g if c.is_left else g * diag
    if c.is_left:
        return apply(c.transform, g.mT).mT  # Q G: Q applied to the columns of G
    return apply(c.transform, g, transpose=True)  # G Q: Qᵀ applied to the rows


def rows_times(rows: Tensor, items: Sequence[tuple[Placed, Tensor | None]]) -> Tensor:
    """``rows · M_1 ⋯ M_k`` for the conditioners ``items`` in that order (with their
    norm-tied diagonals, if any): a right chain as registered, a left chain reversed."""
    for c, d in items:
        if d is None and c.transform.is_diagonal:
            d = c.transform.diagonal()
        rows = rows * d.to(rows.dtype) if d is not None else apply(c.transform, rows,
                                                                   transpose=True)
    return rows


# -- the output side as a short list of steps ----------------------------------------------------
# Note (fused output steps): on CPU the cost of the fast path beyond LoRA is mostly the
# (tokens × out) temporaries, so the output side is run as a list of steps in which a
# diagonal is kept pending until the next step that needs it, and additions are fused:
# diag then add -> addcmul, low-rank add -> addmm, low-rank add then bias -> one addmm.
# When the steps are diagonals and then additions of terms on the GEMM's own input (LoRA,
# Pre-Diag, SORA with its rotation folded), or those terms and then diagonals (DoRA), the
# GEMM and the steps are one autograd node (Note (one node for the layer) in LinearNode).


@dataclass(frozen=True)
class Scale:
    diag: Tensor


@dataclass(frozen=True)
class Apply:
    conditioner: Placed


@dataclass(frozen=True)
class LowRank:
    """Adds ``(input @ leftᵀ) @ right``."""

    input: Tensor  # (..., in)
    left: Tensor  # (m, in)
    right: Tensor  # (m, out)


@dataclass(frozen=True)
class Add:
    vector: Tensor


Step = Scale | Apply | LowRank | Add


Project = Callable[[Tensor, Tensor], Tensor]  # (x, L) -> x Lᵀ on a layer's input


def _merge_low_rank(terms: list[LowRank], project: Project | None = None
                    ) -> tuple[Tensor, Tensor] | None:
    """``(t, right)`` whose product ``t @ right`` is the sum of ``terms`` (``None`` without
    terms): the terms on one input share one GEMM (their left factors stacked), and all
    terms share one output GEMM."""
    if not terms:
        return None
    # grouped by identity with `is`, not by `id()`: torch.compile guards on the identity of
    # a tensor passed to id(), which recompiles the model for every new input
    groups: list[list[LowRank]] = []
    for term in terms:
        group = next((g for g in groups if g[0].input is term.input), None)
        if group is None:
            groups.append([term])
        else:
            group.append(term)
    ts, rights = [], []
    for group in groups:
        x = group[0].input
        if project is not None and not x.is_floating_point():  # indices (an embedding's)
            left = _stacked([g.left for g in group], group[0].left.dtype)
            ts.append(project(x.reshape(-1), left))
        else:
            x = x.reshape(-1, x.shape[-1])
            ts.append(F.linear(x, _stacked([g.left for g in group], x.dtype)))
        rights.extend(g.right for g in group)
    t = torch.cat(ts, dim=-1) if len(ts) > 1 else ts[0]
    return t, _stacked(rights, t.dtype)


def _stacked(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The thin factors one above the other, contiguous (Note (thin GEMMs))."""
    stacked = torch.cat(parts) if len(parts) > 1 else parts[0]
    return stacked.to(dtype).contiguous()


def _vector_sum(run: list[Step], dtype: torch.dtype) -> Tensor | None:
    """The sum of the vectors the :class:`Add` steps of ``run`` add (``None`` without)."""
    vectors = [a.vector.to(dtype) for a in run if isinstance(a, Add)]
    return sum(vectors[1:], vectors[0]) if vectors else None


def _one_node(steps: list[Step], source: Tensor, x: Tensor, weight: Tensor,
              bias: Tensor | None, din: Tensor | None = None) -> Tensor | None:
    """The output side as one :class:`~weightcond.engine.kernels.LinearNode` (``x`` the 2-D
    ``source``) when it is diagonals and then additions of terms on ``source`` (LoRA,
    Pre-Diag, SORA with its rotation folded), or terms on ``source``, diagonals and then
    vectors (DoRA); with ``din``, the GEMM reads ``x ⊙ din``; ``None`` otherwise, under
    autocast (whose casts the separate nodes record) and under ``torch.func`` (Note
    (torch.func) in
    :func:`~weightcond.engine.kernels.functorch_active`)."""
    if not steps or torch.is_autocast_enabled(x.device.type) or functorch_active():
        return None

    def of_type(kind: type, i: int) -> int:  # the end of the run of `kind` steps from i
        while i < len(steps) and isinstance(steps[i], kind):
            i += 1
        return i

    first, terms_end = of_type(Scale, 0), of_type(LowRank, 0)
    scales_end = of_type(Scale, terms_end)
    post = first == 0 and scales_end > terms_end
    if post:  # terms, diagonals, vectors
        scales, run, tail = steps[terms_end:scales_end], steps[:terms_end], steps[scales_end:]
    else:  # diagonals, then terms and vectors
        scales, run, tail = steps[:first], steps[first:], []
    if not all((isinstance(s, LowRank) and s.input is source) or isinstance(s, Add)
               for s in run) or not all(isinstance(s, Add) for s in tail) or \
            (scales and bias is not None):
        return None
    d = None
    for step in scales:
        diag = step.diag.to(x.dtype)  # type: ignore[union-attr]
        d = diag if d is None else d * diag
    terms = [s for s in run if isinstance(s, LowRank)]
    left = _stacked([s.left for s in terms], x.dtype) if terms else None
    right = _stacked([s.right for s in terms], x.dtype) if terms else None
    return LinearNode.apply(x, weight, bias, d, left, right,
                            _vector_sum([*run, *tail], x.dtype), post,
                            None if din is None else din.to(x.dtype))


def run_steps(base: Callable[[], Tensor], steps: list[Step], lead: torch.Size,
              project: Project | None = None) -> Tensor:
    """Run the output-side ``steps`` on ``y = base()``, fusing where possible; ``base``
    returns the 2-D ``(tokens, out)`` output and ``lead`` is the input's shape without its
    last dimension (its shape, for an input of indices). ``base`` is a callable so that no
    caller keeps ``y`` alive once a step has replaced it (one ``(tokens, out)`` tensor less
    at the peak). ``project``: the layer kind's projection of an input of indices.

    Note (in-place accumulation): ``y`` is accumulated into in place (``addmm_``,
    ``add_``, ``addcmul_`` on the low-rank temporary) whenever it is a tensor this call made
    and no autograd node saved: the output of ``base`` (a GEMM saves its inputs, not its
    output), of an addition or of :class:`~weightcond.engine.kernels.ScaleAdd`, but not of a
    transform's ``apply``. Each activation-sized result written into an existing buffer
    instead of a new one spares a fresh ``(tokens, out)`` allocation, whose first touch (page
    faults) cost as much as the addition itself on CPU. ``base`` returns a 2-D tensor so that
    ``y`` is not an autograd view (an in-place op on a view records a ``CopySlices`` node that
    copies the whole gradient)."""
    y = base()
    # y may be updated in place (see the Note); not under torch.func, whose vmap has no
    # batching rule for most in-place products
    may_own = not functorch_active()
    owned = may_own
    pending: Tensor | None = None
    i = 0
    while i < len(steps):
        step = steps[i]
        if isinstance(step, Scale):
            d = step.diag.to(y.dtype)
            pending = d if pending is None else pending * d
            i += 1
            continue
        if isinstance(step, Apply):
            if pending is not None:
                y, pending = scale_add(y, pending), None
            y, owned = apply(step.conditioner.transform, y), False
            i += 1
            continue
        j = i  # a run of additions
        while j < len(steps) and isinstance(steps[j], (LowRank, Add)):
            j += 1
        run = steps[i:j]
        vector = _vector_sum(run, y.dtype)
        low_rank = _merge_low_rank([a for a in run if isinstance(a, LowRank)], project)
        if pending is None:
            if low_rank is not None:
                y = y.addmm_(*low_rank) if owned else torch.addmm(y, *low_rank)
            if vector is not None:
                y = y.add_(vector) if owned or (low_rank is not None and may_own) else \
                    y + vector
        else:
            if low_rank is None:
                y = scale_add(y, pending, vector)
            else:
                addend = low_rank[0] @ low_rank[1] if vector is None else \
                    torch.addmm(vector, *low_rank)
                # (neither dynamo nor the JIT tracer takes mark_dirty on a Function input;
                # the compiler fuses the sum anyway)
                in_place = not (torch.compiler.is_compiling() or torch.jit.is_tracing())
                y = scale_add(y, pending, addend, in_place)
            pending = None
        owned = may_own
        i = j
    if pending is not None:
        y = scale_add(y, pending)
    return output(y, lead)


# -- the plan's forms -----------------------------------------------------------------------------
Item = tuple[Placed, Tensor | None]  # a conditioner and its norm-tied diagonal, if any


def _fold_pre(chain: list[Item], weight: Tensor | OpaqueWeight, h: Tensor, dtype: torch.dtype
              ) -> list[Step]:
    """``W R_1 ⋯ R_k h`` for thin ``R_i = I + U_i V_iᵀ`` as ``W h`` plus rank-``m_i`` terms,
    ``W R_1 ⋯ R_k = W + Σ_i (W U_i)(V_iᵀ R_{i+1} ⋯ R_k)`` (Note (folded rotations))."""
    terms: list[Step] = []
    for i, (c, _) in enumerate(chain):
        u, v = _factors(c)
        rows = rows_times(v.mT.to(dtype), chain[i + 1:])
        terms.append(LowRank(h, rows, linear(u.mT.to(weight.dtype).contiguous(), weight)))
    return terms


def _factors(c: Placed) -> tuple[Tensor, Tensor]:
    pair = factors.low_rank(c.transform)
    if pair is None:  # the planner folds only transforms with a low_rank_size
        raise RuntimeError(f"{type(c.transform).__name__}.low_rank returned None although "
                           f"its low_rank_size is {c.transform.low_rank_size}")
    return pair


def _split(items: list[Item], forms: Sequence[Form]
           ) -> tuple[list[Item], list[tuple[Item, Form]], Form | None]:
    """One stage's right chain, its left conditioners with their forms, and the right chain's
    form (its members share it; ``None`` without a right chain)."""
    right = [it for it in items if not it[0].is_left]
    left = [(it, f) for it, f in zip(items, forms) if it[0].is_left]
    form = next((f for it, f in zip(items, forms) if not it[0].is_left), None)
    return right, left, form


def execute(stack: Stack, plan: Plan, x: Tensor, weight: Tensor | OpaqueWeight,
            bias: Tensor | None, diags: Sequence[Tensor | None], project: Project | None = None
            ) -> Tensor:
    """The layer's output for input ``x`` (last dimension ``in``) as ``plan`` says: ``weight``
    is the frozen ``(out, in)`` matrix (dense, or opaque: a quantized layer's, Decision
    (quantized bases are opaque) in :mod:`weightcond.engine.frozen`), ``bias`` the layer's
    bias (or ``None``) and ``diags`` the norm-tied diagonal of each conditioner in
    composition order (``None`` for the others;
    :func:`weightcond.engine.norms.diagonals`). ``project``: for an input of indices (an
    embedding's), ``project(x, L)`` is ``x Lᵀ`` (Decision (Embedding's input is indices) in
    :mod:`weightcond.reshape`); the plan then folds every right-side conditioner."""
    items: list[Item] = list(zip([*stack.pre, *stack.post], diags))
    n_pre = len(stack.pre)
    right_pre, left_pre, right_pre_form = _split(items[:n_pre], plan.forms[:n_pre])
    right_post, left_post, right_post_form = _split(items[n_pre:], plan.forms[n_pre:])
    original_weight, all_right_pre = weight, right_pre
    dtype = x.dtype if x.is_floating_point() else weight.dtype  # of the activations

    h_post = x
    if right_post_form is not Form.FOLD:
        for c, d in reversed(right_post):
            h_post = on_activations(c, h_post, d)
    h_pre = h_post
    folded: list[Step] = []
    fused: Transform | None = None
    if right_pre_form is Form.FOLD:
        folded = _fold_pre(right_pre, weight, h_post, dtype)
    elif right_pre_form is Form.FUSED:
        fused = right_pre[0][0].transform
    elif right_pre_form is Form.WEIGHT:
        assert isinstance(weight, Tensor)  # the planner gives an opaque weight no weight form
        weight = rows_times(weight, right_pre)  # W R_1 ⋯ R_k, R_pre is now in W
        right_pre = []
    din: Tensor | None = None  # right pre diagonals, applied by the GEMM's node if it can
    if right_pre_form is Form.ACTIVATION:
        diagonals = [d if d is not None else c.transform.diagonal()
                     for c, d in right_pre if d is not None or c.transform.is_diagonal]
        if len(diagonals) == len(right_pre) and project is None:
            for d in diagonals:
                din = d if din is None else din * d
        else:
            for c, d in reversed(right_pre):
                h_pre = on_activations(c, h_pre, d)
    if project is None:
        lead, flat = h_pre.shape[:-1], h_pre.reshape(-1, h_pre.shape[-1])  # 2-D: see run_steps
    else:
        lead, flat = h_pre.shape, h_pre.reshape(-1)
    update: list[LowRank] = [] if stack.update is None else [
        LowRank(h_post, *stack.update.factors())]

    def frozen(b: Tensor | None) -> Tensor:
        if project is not None:
            assert isinstance(weight, Tensor)  # embeddings are dense
            y = project(flat, weight)
            return y if b is None else y + b
        if fused is not None:
            assert isinstance(weight, Tensor)  # the planner fuses only a dense weight
            return fused.rotated_linear(flat, weight, b)
        return linear(flat, weight, b)

    def finish(chain: list[Step], b: Tensor | None) -> Tensor:
        nonlocal flat
        node = None if fused is not None or project is not None or \
            not isinstance(weight, Tensor) else _one_node(chain, h_pre, flat, weight, b, din)
        if node is not None:
            return output(node, lead)
        if din is not None:  # the step list: the GEMM on x ⊙ din, as the node computes it
            flat = flat * din.to(flat.dtype)
        return run_steps(lambda: frozen(b), chain, lead, project)

    def conditioned(rows: Tensor) -> Tensor:
        """``(M uᵀ)ᵀ`` for the rows ``u`` of ``rows`` (``(m, in)``): the conditioned matrix
        without the right post chain, applied to ``m`` vectors."""
        h = rows
        for c, d in reversed(all_right_pre):
            h = on_activations(c, h, d)
        # contiguous rows: a transposed view makes the backward a slow GEMM (Note (thin GEMMs))
        y = linear(h.to(original_weight.dtype).contiguous(), original_weight).to(rows.dtype)
        for (c, d), _ in left_pre:
            y = on_activations(c, y, d)
        for term in update:
            y = y + (rows @ term.left.mT.to(rows.dtype)) @ term.right.to(rows.dtype)
        for (c, d), _ in left_post:
            y = on_activations(c, y, d)
        return y

    post_terms: list[Step] = []
    if right_post_form is Form.FOLD:
        for i, (c, _) in enumerate(right_post):
            u, v = (f.to(dtype) for f in _factors(c))
            columns = u.mT  # R_1 ⋯ R_{i-1} U_i, as rows
            for earlier, d in reversed(right_post[:i]):
                columns = on_activations(earlier, columns, d)
            post_terms.append(LowRank(x, v.mT, conditioned(columns)))

    if not left_pre and not left_post:  # nothing acts on the output: fuse the bias
        return finish([*folded, *update, *post_terms], bias)

    def pull_back(rows: Tensor, before: list[Item], in_post: bool) -> Tensor:
        """``rows · (the output chain so far)`` as rows acting on ``h_post``."""
        rows = rows_times(rows, before[::-1])
        through_update = None
        if in_post:
            for term in update:  # s·B A as (x Aᵀ)(s·B)ᵀ: rows (s·B) A
                through_update = (rows @ term.right.mT.to(rows.dtype)) @ \
                    term.left.to(rows.dtype)
            rows = rows_times(rows, [it for it, _ in left_pre][::-1])
        assert isinstance(weight, Tensor)  # the planner folds no left conditioner on opaque
        w = weight.to(rows.dtype)
        if through_update is not None and not right_pre:
            return torch.addmm(through_update, rows, w)
        out = rows_times(rows @ w, right_pre)
        return out if through_update is None else out + through_update

    def steps(chain: list[tuple[Item, Form]], in_post: bool) -> list[Step]:
        found: list[Step] = []
        for i, ((c, d), form) in enumerate(chain):
            if d is None and c.transform.is_diagonal:
                d = c.transform.diagonal()
            if d is not None:
                found.append(Scale(d))
            elif form is Form.FOLD:
                u, v = (f.to(dtype) for f in _factors(c))
                pulled = pull_back(v.mT, [it for it, _ in chain[:i]], in_post)
                found.append(LowRank(h_post, pulled, u.mT))
            else:
                found.append(Apply(c))
        return found

    chain = [*folded, *steps(left_pre, False), *update, *steps(left_post, True), *post_terms]
    bias = condition_bias(bias, items)
    if bias is not None:
        chain.append(Add(bias))
    return finish(chain, None)


def condition_bias(bias: Tensor | None, items: Sequence[Item]) -> Tensor | None:
    if bias is None:
        return None
    for c, d in items:
        if c.condition_bias:
            bias = on_activations(c, bias, d)
    return bias

