"""The engine: how a conditioned layer computes its output.

:mod:`~weightcond.engine.plan` turns a layer's structure, shapes and input into an immutable
:class:`~weightcond.engine.plan.Plan` from a cost model (Note (plan, then execute));
:mod:`~weightcond.engine.execute` runs it with the autograd kernels of
:mod:`~weightcond.engine.kernels`;
:mod:`~weightcond.engine.norms` computes the diagonals of norm-tied conditioners;
:mod:`~weightcond.engine.factors` holds the thin factors a model forward computed together.
The engine imports nothing above it: a layer's conditioning is read through the
:class:`~weightcond.engine.execute.Stack` and :class:`~weightcond.engine.plan.Placed`
protocols.
"""

from __future__ import annotations

from .plan import BALANCE, Cost, Form, Layout, Plan, Site, plan

__all__ = ["BALANCE", "Cost", "Form", "Layout", "Plan", "Site", "plan"]
