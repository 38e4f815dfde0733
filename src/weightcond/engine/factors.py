"""The thin factors of the transforms the running model forward computed together.

The model-level code (:mod:`weightcond.batching`) computes, at the start of a model's
forward, the :meth:`~weightcond.transforms.Transform.low_rank` factors of its layers'
transforms in batched calls and enters them here with ``enter`` (``leave`` at its end); the
executor reads a transform's factors with :func:`low_rank`, which falls back to the
transform's own :meth:`~weightcond.transforms.Transform.low_rank`. Transforms themselves
know nothing of models (see Note (batched factors) in :mod:`weightcond.batching` for when a
batch is used).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

from ..transforms.base import Transform

__all__ = ["Batch", "Stamp", "enter", "leave", "low_rank", "stamp"]

#: a transform's parameters with their versions when its factors were computed
Stamp = list[tuple[Tensor, int]]
#: each transform's factors and the stamp they were computed under
Batch = dict[Transform, tuple[tuple[Tensor, Tensor], Stamp]]

_state = threading.local()  # .batches: (model, batch) of the model forwards running now


def _batches() -> list[tuple[Any, Batch]]:
    if not hasattr(_state, "batches"):
        _state.batches = []
    return _state.batches  # type: ignore[no-any-return]


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # an unknown torch: assume hooks may be active and do not batch
        return True
    return top(False) is not None


def low_rank(transform: Transform) -> tuple[Tensor, Tensor] | None:
    """``transform.low_rank()``, from the running model forward's batch when it has one
    (every read of a transform's factors in a layer's forward goes through here)."""
    if torch.compiler.is_compiling():  # no batches under the compiler: nothing to guard on
        return transform.low_rank()
    batches = _batches()
    if batches and not _saved_tensor_hooks_active():
        for _, batch in reversed(batches):
            entry = batch.get(transform)
            if entry is not None and _current(transform, entry[1]):
                return entry[0]
    return transform.low_rank()


def stamp(transform: Transform) -> Stamp | None:
    """The transform's parameters with their versions now (``None`` for inference tensors,
    which keep no version counter)."""
    try:
        return [(p, p._version) for p in transform.parameters()]
    except RuntimeError:
        return None


def _current(transform: Transform, stamp: Stamp) -> bool:
    """Whether ``transform`` still has the very parameters, unchanged, that its batched
    factors were computed from: not so for ``torch.func.functional_call`` on a part of the
    model inside its forward (other tensors), or after an optimizer step when a forward ended
    without leaving (a ``KeyboardInterrupt``: the model's hook runs on ``Exception`` only)."""
    params = list(transform.parameters())
    return len(params) == len(stamp) and all(
        p is q and p._version == v for p, (q, v) in zip(params, stamp))


def enter(owner: object, batch: Batch) -> None:
    """Make ``batch`` the factors of ``owner``'s forward (a model), replacing one left over
    from a forward of the same owner that ended without :func:`leave`."""
    batches = _batches()
    batches[:] = [(m, b) for m, b in batches if m is not owner]
    batches.append((owner, batch))


def leave(owner: object) -> None:
    """End ``owner``'s batch (no effect when it is not the innermost one)."""
    batches = _batches()
    if batches and batches[-1][0] is owner:
        batches.pop()
