"""One batched call per forward for the thin factors of a model's rotations.

Note (batched factors): a rotation folded into a layer's fast forward (``skew``, SORA's
:math:`Q = I + P M P^\\top`) needs its factors every forward: some thirty small tensor
operations on ``n × 2k`` and ``2k × 2k`` matrices, and as many in the backward. In a model
with many conditioned layers these small operations, not their arithmetic, are the cost
(MiniLM with SORA on its 36 linear layers: about 4 % of a CPU training step). With
:func:`batch_factors`, a hook on the model computes, at the start of each forward, the
factors of every active transform with one :meth:`~weightcond.transforms.Transform.batch_key`
together (:meth:`~weightcond.transforms.Transform.low_rank_batch`: the same operations on
stacked parameters), and the layers take their slice. :func:`weightcond.condition` turns it
on.

The values are those of the layer-by-layer computation (the same code on a stacked batch:
the same bits on CPU) and each parameter gets the gradient of its own factors; a
transform whose layer the forward does not call gets none (``None``), as without batching
(``_Together``). A batch is used only while the model's forward runs, and only for a
transform that still has the very parameters, unchanged, it was computed from (not so under
``torch.func.functional_call`` on a part of the model inside its forward). It is not used

* under ``torch.compile`` (the compiler fuses the small operations itself),
* inside a saved-tensor hook context, such as non-reentrant activation checkpointing
  (``torch.utils.checkpoint(..., use_reentrant=False)``), whose recomputation in the
  backward runs outside the model's forward and must repeat the original operations,
* for parameters that are tensor subclasses (FSDP2's sharded ``DTensor``: the layer
  gathers its parameters in its own forward, after the model's hook),

where each layer computes its own factors as without batching. Wrappers that keep plain
parameters sharded or flattened until each layer's own forward (FSDP1 with nested units,
DeepSpeed ZeRO-3) are not supported: pass ``batch_factors=False`` to
:func:`weightcond.condition` there.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor, nn

from .engine import factors
from .errors import LayerTypeError, check_bool
from .layer import Adapters
from .transforms.base import Transform

__all__ = ["batch_factors"]


class _Together(torch.autograd.Function):
    """The factors of one group, computed by ``low_rank_batch`` as one graph, whose backward
    gives each member's parameters the gradient of that member's factors only, and none
    (``None``, not zeros) to a member whose factors the forward did not use: as without
    batching, an optimizer leaves a layer the forward did not call alone."""

    @staticmethod
    def forward(ctx, members: list[Transform], owner: list[int], *params: Tensor
                ) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            factors = type(members[0]).low_rank_batch(members)
        outputs = [f for pair in factors for f in pair]
        ctx.outputs, ctx.params, ctx.owner = outputs, params, owner
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        used = {i // 2 for i, g in enumerate(grads) if g is not None}  # (U, V) per member
        pairs = [(o, g) for o, g in zip(ctx.outputs, grads) if g is not None]
        wanted = [k for k, p in enumerate(ctx.params)
                  if p.requires_grad and ctx.owner[k] in used]
        result: list[Tensor | None] = [None] * len(ctx.params)
        if pairs and wanted:
            found = torch.autograd.grad([o for o, _ in pairs], [ctx.params[k] for k in wanted],
                                        [g for _, g in pairs], retain_graph=True,
                                        create_graph=torch.is_grad_enabled(), allow_unused=True)
            for k, g in zip(wanted, found):
                result[k] = g
        return (None, None, *result)


def _together(members: list[Transform]) -> list[tuple[Tensor, Tensor]]:
    if not torch.is_grad_enabled():
        return type(members[0]).low_rank_batch(members)
    params = [(i, p) for i, t in enumerate(members) for p in t.parameters()]
    flat = _Together.apply(members, [i for i, _ in params], *(p for _, p in params))
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(members))]


def _plain(t: Transform) -> bool:
    return all(type(p) in (nn.Parameter, Tensor) for p in t.parameters())


def _adapters_in(model: nn.Module, kind: type) -> list[Any]:
    """The ``kind`` (:class:`~weightcond.layer.Adapters`) modules under ``model``, each once.
    A loop over ``_modules`` rather than ``model.modules()``: the nested generators of the
    latter took 2 ms per forward on MiniLM's 564 modules, most of this hook's cost."""
    found, seen, stack = [], {id(model)}, [model]
    while stack:
        module = stack.pop()
        if isinstance(module, kind):
            found.append(module)
            continue  # nothing to find inside
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return found


def _compute(model: nn.Module) -> factors.Batch:
    """The factors of every batchable transform of the model's active adapters."""
    # per key, each transform once (a layer shared by two parents) with its stamp
    groups: dict[Hashable, dict[Transform, factors.Stamp]] = {}
    for module in _adapters_in(model, Adapters):
        conditioning = module.current()
        if conditioning is None or module.dense or not module.kind.matrix_free:
            continue
        for conditioner in conditioning.conditioners():
            t = conditioner.transform
            key = t.batch_key()
            stamp = factors.stamp(t) if key is not None and _plain(t) else None
            if stamp is not None:
                groups.setdefault(key, {})[t] = stamp
    batch: factors.Batch = {}
    for members in groups.values():
        if len(members) > 1:
            for (t, stamp), pair in zip(members.items(), _together(list(members))):
                batch[t] = (pair, stamp)
    return batch


def _before_forward(model: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():
        return
    # a model does not run inside its own forward: an entry of this model's is left over
    # from a forward that ended without _after_forward (a KeyboardInterrupt); enter drops it
    factors.enter(model, _compute(model))


def _after_forward(model: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling():
        return
    factors.leave(model)  # no effect when _before_forward raised


def batch_factors(model: nn.Module, enabled: bool = True) -> None:
    """Compute the thin factors of the model's rotations in one batched call per forward.

    Registers (``enabled=True``; again: no effect) or removes (``enabled=False``) two hooks
    on ``model``; see Note (batched factors) in :mod:`weightcond.batching` for what changes
    and when the layers compute their own factors instead. :func:`weightcond.condition`
    calls it with ``batch_factors=True`` (its default).

    Args:
        model: the module whose forward runs the conditioned layers (the root model).
        enabled: register (``True``) or remove (``False``) the hooks.

    Raises:
        weightcond.LayerTypeError: ``model`` is not an :class:`torch.nn.Module`.

    Example:
        >>> import torch, weightcond as wc
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
        >>> for layer in model:
        ...     _ = wc.apply_preset(layer, "sora", rank=4, rotation_rank=2)
        >>> wc.batch_factors(model)
        >>> model(torch.randn(3, 16)).shape
        torch.Size([3, 16])
    """
    if not isinstance(model, nn.Module):
        raise LayerTypeError(f"batch_factors: argument 'model' expected an nn.Module, "
                             f"got {type(model).__name__}")
    check_bool("batch_factors", "enabled", enabled)
    before = [k for k, h in model._forward_pre_hooks.items() if h is _before_forward]
    after = [k for k, h in model._forward_hooks.items() if h is _after_forward]
    if enabled and not before:
        model.register_forward_pre_hook(_before_forward)
        model.register_forward_hook(_after_forward, always_call=True)
    if not enabled:
        for k in before:
            del model._forward_pre_hooks[k]
        for k in after:
            del model._forward_hooks[k]
            model._forward_hooks_always_called.pop(k, None)
