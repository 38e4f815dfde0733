r"""The planner: a layer's structure, its shapes and its input → an immutable plan.

Note (plan, then execute): how a conditioned layer computes its output is decided here,
from what is known before any tensor is touched — each conditioner's kind (diagonal, thin
:math:`I + U V^\top`, fused into the GEMM, general) and site, the update's rank, the layer's
shape, the number of tokens, whether the input needs its gradient — and not from tensor
values. The planner prices every correct form of every conditioner with a cost model and
keeps the cheapest; :func:`weightcond.engine.execute.execute` runs the plan. A plan is cached (the
same structure and token count give the same object), printable (:func:`weightcond.explain`)
and the same with and without ``torch.no_grad()``: it depends on whether the *input*
requires its gradient, never on the grad mode, so one input gives the same bits either way.

The forms (:class:`Form`):

* ``scale`` — a diagonal (``diag``, ``magnitude``) multiplies the activations, fused into the
  layer's GEMM node where it can be;
* ``fold`` — a thin conditioner :math:`Q = I + U V^\top` (``skew``, ``householder``) becomes a
  rank-``m`` term of the one stacked low-rank GEMM that the update already runs: on the left,
  ``Q y = y + U (V^\top Y) h`` with :math:`V^\top Y` pulled back through the frozen weight;
  on the right, :math:`W R = W + (W U) V^\top` (pre) and
  :math:`M R = M + (M U) V^\top` for the whole conditioned matrix :math:`M` (post);
* ``weight`` — the right pre chain is applied to the rows of :math:`W` (``W R_pre``, once per
  step), not to every token;
* ``fused`` — the transform's own :meth:`~weightcond.transforms.Transform.rotated_linear`
  computes the GEMM with :math:`W R` and reads its gradient off the input gradient;
* ``activation`` — the transform's :meth:`~weightcond.transforms.Transform.apply` on the
  activations, per token.

Cost model: a step (forward and backward) of each form is counted in floating-point
operations and in bytes moved through memory, and priced as ``flops + BALANCE · bytes``
(:data:`BALANCE` operations per byte, about the ratio of GEMM throughput to memory bandwidth
of a CPU core; a GPU's is higher, which favours the same forms). With ``t`` tokens, a layer
``out × in``, a conditioner of side ``n``, ``c`` operations per vector
(:attr:`~weightcond.transforms.Transform.apply_flops`), low rank ``m`` and element size ``e``:

* ``scale``: ``3 t n`` operations, ``4 t n e`` bytes;
* ``activation``: ``3 t c`` operations (forward, input gradient, parameter gradient),
  ``6 t n e`` bytes; a right chain adds the GEMM ``g W`` (``2 t out in``) when the input needs
  no gradient, since its own gradient needs the gradient at its output, which the layer's
  backward computes only for an input that needs it;
* ``fold``: ``4 m out in + 6 t m (out + in)`` operations (the factor through the weight
  forward and backward, ``m`` more columns in the stacked GEMM), ``4 m (out + in) e`` bytes;
* ``weight``: ``3 out c`` operations and ``6 out in e`` bytes per member of the chain, plus
  the GEMM ``gᵀ x`` (``2 t out in``) for the gradient of ``W R``;
* ``fused``: ``out c + t c`` operations with the input's gradient (``W R`` formed, the
  blocks' gradient read off the input gradient), ``2 out c`` plus the GEMM ``gᵀ x``
  without; ``2 out in e`` bytes.

The base, which every plan adds to, is the frozen forward GEMM and, for an input that needs
it, the input-gradient GEMM.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch

from ..transforms.base import Transform

__all__ = ["BALANCE", "Cost", "Form", "Layout", "Placed", "Plan", "Site", "every_plan", "layout",
           "plan"]

#: operations per byte moved that cost as much time (see the module's cost model)
BALANCE = 16


class Form(str, Enum):
    """How one conditioner is computed (Note (plan, then execute))."""

    SCALE = "scale"
    FOLD = "fold"
    WEIGHT = "weight"
    FUSED = "fused"
    ACTIVATION = "activation"


class Placed(Protocol):
    """What the engine reads of a conditioner placed at a site of a layer
    (:class:`weightcond.placement.Conditioner`)."""

    transform: Transform
    condition_bias: bool

    @property
    def is_left(self) -> bool: ...


@dataclass(frozen=True)
class Site:
    """What the planner knows of one conditioner: its site and its transform's kind, from the
    transform's options alone."""

    transform: str
    post: bool
    left: bool
    dim: int
    diagonal: bool
    low_rank: int | None
    fuses_linear: bool
    flops: int

    @property
    def label(self) -> str:
        return f"{'post' if self.post else 'pre'}/{'left' if self.left else 'right'} " \
               f"{self.transform}"


@dataclass(frozen=True)
class Layout:
    """A layer's structure: its shape, its conditioners in composition order, its update's
    rank (``None`` without an update), whether its input is indices (an embedding's: then
    a right-side conditioner can only fold, Decision (Embedding's input is indices) in
    :mod:`weightcond.reshape`) and whether its frozen weight is opaque (a quantized layer's:
    no form that reads the weight's entries, Decision (quantized bases are opaque) in
    :mod:`weightcond.engine.frozen`)."""

    out_features: int
    in_features: int
    sites: tuple[Site, ...]
    update_rank: int | None
    indexed: bool = False
    opaque: bool = False


def site(conditioner: Placed, post: bool) -> Site:
    """The :class:`Site` of a conditioner."""
    t = conditioner.transform
    return Site(transform=t.name or type(t).__name__, post=post, left=conditioner.is_left,
                dim=t.dim, diagonal=t.is_diagonal, low_rank=t.low_rank_size,
                fuses_linear=t.fuses_linear, flops=t.apply_flops)


def layout(out_features: int, in_features: int, pre: Sequence[Placed], post: Sequence[Placed],
           update_rank: int | None, indexed: bool = False, opaque: bool = False) -> Layout:
    """The :class:`Layout` of a layer from its pre and post conditioners."""
    sites = tuple([site(c, False) for c in pre] + [site(c, True) for c in post])
    return Layout(out_features, in_features, sites, update_rank, indexed, opaque)


@dataclass(frozen=True)
class Cost:
    """A predicted cost of one training step: operations and bytes moved."""

    flops: float = 0.0
    bytes: float = 0.0

    @property
    def total(self) -> float:
        """``flops + BALANCE · bytes``: what the planner minimises."""
        return self.flops + BALANCE * self.bytes

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class Plan:
    """How a layer computes its output for one input shape (Note (plan, then execute)).

    Attributes:
        layout: the layer's structure.
        tokens: the number of input vectors.
        input_grad: whether the input needs its gradient.
        forms: the chosen :class:`Form` of each conditioner, in composition order.
        options: per conditioner, every correct form and its predicted :class:`Cost`.
        base: the predicted cost of the frozen layer's GEMMs (its forward, and the input
            gradient when the input needs it), which every form adds to.
        bytes_per_element: the element size the costs were computed for.
    """

    layout: Layout
    tokens: int
    input_grad: bool
    forms: tuple[Form, ...]
    options: tuple[tuple[tuple[Form, Cost], ...], ...]
    base: Cost
    bytes_per_element: int

    def chosen(self, i: int) -> Cost:
        """The predicted cost of conditioner ``i`` in its chosen form (a chain's cost is
        carried by its first member, the others ``Cost()``)."""
        return dict(self.options[i])[self.forms[i]]

    @property
    def total(self) -> Cost:
        """The predicted cost of the whole step."""
        cost = self.base
        for i in range(len(self.forms)):
            cost = cost + self.chosen(i)
        return cost

    def describe(self) -> str:
        """A table: each conditioner's chosen form, its predicted cost and the other forms'."""
        lay = self.layout
        lines = [f"{lay.out_features}x{lay.in_features} layer, {self.tokens} tokens, input "
                 f"{'needs' if self.input_grad else 'needs no'} gradient"
                 + (f", update rank {lay.update_rank}" if lay.update_rank else ", no update"),
                 f"  base GEMMs: {_fmt(self.base)}"]
        for i, s in enumerate(lay.sites):
            others = ", ".join(f"{f.value} {_fmt(c)}" for f, c in self.options[i]
                               if f is not self.forms[i])
            lines.append(f"  {s.label}: {self.forms[i].value} {_fmt(self.chosen(i))}"
                         + (f" (else: {others})" if others else ""))
        lines.append(f"  total: {_fmt(self.total)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _fmt(cost: Cost) -> str:
    return f"{cost.flops / 1e9:.3g} GFLOP + {cost.bytes / 1e6:.3g} MB"


def plan(layout: Layout, tokens: int, input_grad: bool, dtype: torch.dtype,
         functorch: bool = False) -> Plan:
    """The :class:`Plan` of ``layout`` for ``tokens`` input vectors (cached).

    ``functorch``: a ``torch.func`` transform is running, under which the fused form (an
    ``autograd.Function`` with a backward of its own) is not available."""
    if torch.compiler.is_compiling():  # traced once per graph; no cache lookups in a trace
        return _plan.__wrapped__(layout, tokens, input_grad, dtype, functorch)
    return _plan(layout, tokens, input_grad, dtype, functorch)


def _cheapest(found: list[tuple[Form, Cost]]) -> Form:
    """The form of least total cost, the first listed on a tie (a plain loop: the compiler
    traces no ``min(key=...)``)."""
    best, least = found[0]
    for form, cost in found[1:]:
        if cost.total < least.total:
            best, least = form, cost
    return best


@functools.lru_cache(maxsize=4096)
def _plan(layout: Layout, tokens: int, input_grad: bool, dtype: torch.dtype,
          functorch: bool) -> Plan:
    decisions, options, base = _decisions(layout, tokens, input_grad, dtype, functorch)
    forms = [Form.ACTIVATION] * len(layout.sites)
    for members, found in decisions:
        for k in members:
            forms[k] = _cheapest(found)
    return Plan(layout, tokens, input_grad, tuple(forms), options, base, dtype.itemsize)


def every_plan(layout: Layout, tokens: int, input_grad: bool, dtype: torch.dtype,
               functorch: bool = False) -> list[Plan]:
    """Every correct plan of ``layout``, whatever its cost: each left conditioner and each
    right chain in each form it can take (the contract tests run them all against the dense
    form, :func:`weightcond.testing.check_transform`)."""
    decisions, options, base = _decisions(layout, tokens, input_grad, dtype, functorch)
    plans = []
    for choice in itertools.product(*(range(len(found)) for _, found in decisions)):
        forms = [Form.ACTIVATION] * len(layout.sites)
        for (members, found), pick in zip(decisions, choice):
            for k in members:
                forms[k] = found[pick][0]
        plans.append(Plan(layout, tokens, input_grad, tuple(forms), options, base,
                          dtype.itemsize))
    return plans


Decision = tuple[tuple[int, ...], list[tuple[Form, Cost]]]  # (conditioners, their forms)


def _decisions(layout: Layout, tokens: int, input_grad: bool, dtype: torch.dtype,
               functorch: bool
               ) -> tuple[list[Decision], tuple[tuple[tuple[Form, Cost], ...], ...], Cost]:
    """The independent choices of a plan — each left conditioner, each right chain — with
    the correct forms of each and their costs; each conditioner's options; the base cost."""
    e = dtype.itemsize
    t, o, i = tokens, layout.out_features, layout.in_features
    sites = layout.sites
    gemm = Cost(2.0 * t * o * i, (t * i + o * i + t * o) * e)
    base = gemm + (gemm if input_grad else Cost())
    decisions: list[Decision] = []
    options: list[tuple[tuple[Form, Cost], ...]] = [()] * len(sites)

    def activation(s: Site) -> Cost:
        return Cost(3.0 * t * s.flops, 6.0 * t * s.dim * e)

    def fold(s: Site) -> Cost:
        m = s.low_rank or 0
        return Cost(4.0 * m * o * i + 6.0 * t * m * (o + i), 4.0 * m * (o + i) * e)

    # left conditioners, each on its own: scale, fold or activation
    for k, s in enumerate(sites):
        if s.left and s.diagonal:
            found = [(Form.SCALE, Cost(3.0 * t * s.dim, 4.0 * t * s.dim * e))]
        elif s.left:
            found = [(Form.ACTIVATION, activation(s))]
            if s.low_rank is not None and not layout.opaque:  # its pull-back reads W
                found.append((Form.FOLD, fold(s)))
        else:
            continue
        options[k] = tuple(found)
        decisions.append(((k,), found))

    # right chains, each as a whole (the members of a chain share its form)
    gradient_gemm = Cost() if input_grad else gemm  # `g W`, when the base does not run it
    for post in (False, True):
        chain = [k for k, s in enumerate(sites) if not s.left and s.post is post]
        if not chain:
            continue
        members = [sites[k] for k in chain]
        flops = sum(s.flops for s in members)
        # any right chain's gradient needs the gradient at its output, `g W` (or `gᵀ x` for
        # W R's in the weight form): a GEMM the base runs only for an input that needs it
        found = [(Form.ACTIVATION, Cost(3.0 * t * flops, 6.0 * t * i * e * len(members))
                  + gradient_gemm)]
        if all(s.low_rank is not None for s in members):
            folded = Cost()
            for s in members:
                folded = folded + fold(s)
            found.append((Form.FOLD, folded))
        if not post and not layout.opaque:  # W R, or a node that reads W
            found.append((Form.WEIGHT, Cost(3.0 * o * flops, 6.0 * o * i * e * len(members))
                          + gemm))
            if len(members) == 1 and members[0].fuses_linear and not functorch:
                c = members[0].flops
                found.append((Form.FUSED, Cost(o * c + t * c, 2.0 * o * i * e) if input_grad
                              else Cost(2.0 * o * c, 2.0 * o * i * e) + gemm))
        if layout.indexed:  # no vectors to rotate, no GEMM to fuse: the chain folds
            found = [(f, c) for f, c in found if f is Form.FOLD]
            if not found:
                raise ValueError(f"plan: an indexed input takes only thin right-side "
                                 f"conditioners, got {[s.label for s in members]}")
        for n, k in enumerate(chain):
            options[k] = tuple(found) if n == 0 else tuple((f, Cost()) for f, _ in found)
        decisions.append((tuple(chain), found))
    return decisions, tuple(options), base
