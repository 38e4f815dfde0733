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
  conditioners, except :math:`W R_\text{pre}` when the planner finds that cheaper than
  rotating the activations (:mod:`weightcond.engine`: Note (plan, then execute)).
  :math:`b'` is the bias conditioned by the left conditioners registered with
  ``condition_bias=True`` (in composition order); otherwise :math:`b' = b`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor, nn

from .engine import execute, norms
from .engine.frozen import OpaqueWeight
from .engine.kernels import functorch_active
from .engine.plan import Layout, Plan, layout, plan
from .transforms.base import Transform, limit_diagonal
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
        """Apply the conditioning matrix to the vectors along the last dimension of ``h``
        (``diag``: its norm-tied diagonal, if any)."""
        return execute.on_activations(self, h, diag)

    def on_matrix(self, g: Tensor, diag: Tensor | None) -> Tensor:
        """Multiply the matrix ``g`` by the conditioning matrix on this conditioner's side."""
        return execute.on_matrix(self, g, diag)

    def extra_repr(self) -> str:
        return (f"placement={self.placement!r}, side={self.side!r}, "
                f"condition_bias={self.condition_bias}")


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
                with norms.detached(conditioner):
                    found = norms.norms_of(g, conditioner.is_left)
                diag = limit_diagonal(conditioner.transform.diagonal(found), weight.dtype)
            diags.append(diag)
            g = conditioner.on_matrix(g, diag)
        return g, diags

    def initial_norms(self, weight: Tensor | OpaqueWeight, placement: Stage, side: Side
                      ) -> Tensor:
        """Norms of the matrix a conditioner appended to ``placement`` would condition. For
        a quantized ``weight``, row norms come from its row norms where DESIGN §5's
        expansion applies (no dense matrix); otherwise it is dequantized once, here."""
        with torch.no_grad():
            if not isinstance(weight, Tensor):
                if side is Side.LEFT:
                    found = norms.appended_row_norms(self, weight, placement is Stage.POST)
                    if found is not None:
                        return found
                weight = weight.dense()
            g = self.dense_weight(weight, steps=self.stage_end(placement))
            return norms.norms_of(g, side is Side.LEFT)

    # -- the matrix-free form ---------------------------------------------------------------------
    def layout(self, indexed: bool = False, opaque: bool = False) -> Layout:
        """The layer's structure as the planner sees it (:class:`weightcond.engine.plan.Layout`);
        ``indexed``: its input is indices (an embedding's); ``opaque``: its frozen weight is
        known through its product only (a quantized layer's)."""
        return layout(self.out_features, self.in_features,
                      self.pre, self.post,  # type: ignore[arg-type]
                      None if self.update is None else self.update.rank, indexed, opaque)

    def plan(self, x: Tensor, weight: Tensor | OpaqueWeight, indexed: bool = False) -> Plan:
        """The :class:`weightcond.engine.plan.Plan` for input ``x`` (Note (plan, then execute))."""
        tokens = x.numel() if indexed else x.numel() // max(x.shape[-1], 1)
        # on x.requires_grad alone, not the grad mode: one input gives the same bits with and
        # without torch.no_grad()
        return plan(self.layout(indexed, not isinstance(weight, Tensor)), tokens,
                    x.requires_grad, weight.dtype, functorch_active())

    def activation(self, x: Tensor, weight: Tensor | OpaqueWeight, bias: Tensor | None,
                   project: Callable[[Tensor, Tensor], Tensor] | None = None, *,
                   plan: Plan | None = None) -> Tensor:
        """The layer's output for input ``x`` without forming the conditioned weight: the
        plan of ``self.plan(x, weight)`` (or ``plan``, one of
        :func:`~weightcond.engine.plan.every_plan`'s), run by
        :func:`weightcond.engine.execute.execute`. ``weight``: the frozen ``(out, in)``
        matrix, or a quantized layer's :class:`~weightcond.engine.frozen.OpaqueWeight`.
        ``project``: the layer kind's projection of an input of indices
        (:class:`~weightcond.reshape.LayerKind`)."""
        diags = norms.diagonals(self, weight, self._dense_of)
        if plan is None:
            plan = self.plan(x, weight, project is not None)
        return execute.execute(self, plan, x, weight, bias, diags, project)

    def _dense_of(self, weight: Tensor | OpaqueWeight, steps: int) -> Tensor:
        matrix = weight if isinstance(weight, Tensor) else weight.dense()
        return self.dense_weight(matrix, steps=steps)

    def conditioned_bias(self, bias: Tensor, weight: Tensor) -> Tensor:
        """The dense conditioned bias :math:`b'` (the parametrization of ``layer.bias``)."""
        conditioners = self.conditioners()
        if any(c.condition_bias and c.transform.norm_tied for c in conditioners):
            diags = self._compose_dense(weight)[1]
        else:
            diags = [None] * len(conditioners)
        found = execute.condition_bias(bias, list(zip(conditioners, diags)))
        assert found is not None
        return found
