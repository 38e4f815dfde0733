"""The one boundary that views a layer's weight as an ``(out, in)`` matrix.

Every other module works with ``(out, in)`` matrices and activations whose last dimension
is ``in``. A layer type is supported by adding one entry to
:data:`~weightcond.reshape.LAYER_KINDS`:

* :class:`torch.nn.Linear` — the weight is ``(out, in)``;
* ``transformers.pytorch_utils.Conv1D`` (GPT-2 family) — the weight is stored transposed,
  ``(in, out)``, and the layer computes ``x @ weight + bias``;
* :class:`torch.nn.Conv2d` — the weight ``(out, in/groups, kh, kw)`` is viewed as
  ``(out, in/groups · kh · kw)``, the matrix of the convolution's im2col form.

Decision (Conv2d runs dense): the matrix-free activation form needs the layer to act along
the last dimension of its input. A convolution does not (its right-side conditioners act
on unfolded patches), so a conditioned ``Conv2d`` convolves with the dense conditioned
weight, as a parametrized layer does. ``Linear`` and ``Conv1D`` run matrix-free.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Size, Tensor, nn

from .errors import LayerTypeError

__all__ = ["LAYER_KINDS", "LayerKind", "layer_kind"]


def _is_transformers_conv1d(layer: object) -> bool:
    # transformers is optional: a Conv1D instance exists only when it has been imported
    module = sys.modules.get("transformers.pytorch_utils")
    return module is not None and isinstance(layer, module.Conv1D)


@dataclass(frozen=True)
class LayerKind:
    """How a supported layer type stores its weight and computes its output.

    Attributes:
        name: the type's name in messages and saved configurations.
        matches: whether a module is of this kind.
        to_matrix: the stored weight → its ``(out, in)`` view (no copy).
        from_matrix: an ``(out, in)`` matrix → the stored layout, given the stored shape.
        compute: the layer's output for an input, a weight in the stored layout and a bias.
        matrix_free: whether the layer acts along the last dimension of its input, as
            ``x Wᵀ + b`` (then the matrix-free activation form applies).
        kernel: the number of trailing kernel dimensions of the stored weight (PEFT stores
            a convolution's LoRA factors as ``(r, in, *kernel)`` and ``(out, r, 1, …)``).
    """

    name: str
    matches: Callable[[object], bool]
    to_matrix: Callable[[Tensor], Tensor]
    from_matrix: Callable[[Tensor, Size], Tensor]
    compute: Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]
    matrix_free: bool
    kernel: int = 0

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        """``(out, in)`` of the layer's weight matrix."""
        out_features, in_features = self.to_matrix(_stored_weight(layer)).shape
        return out_features, in_features


def _stored_weight(layer: nn.Module) -> Tensor:
    params = getattr(layer, "parametrizations", None)
    if params is not None and "weight" in params:
        return params.weight.original  # type: ignore[no-any-return]
    return layer.weight  # type: ignore[no-any-return]


#: The supported layer types, tried in order.
LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind(
        name="Linear", matches=lambda m: isinstance(m, nn.Linear),
        to_matrix=lambda w: w, from_matrix=lambda m, shape: m,
        compute=lambda layer, x, w, b: F.linear(x, w, b), matrix_free=True),
    LayerKind(
        name="Conv1D", matches=_is_transformers_conv1d,
        to_matrix=lambda w: w.mT, from_matrix=lambda m, shape: m.mT,
        compute=lambda layer, x, w, b: F.linear(x, w.mT, b), matrix_free=True),
    LayerKind(
        name="Conv2d", matches=lambda m: isinstance(m, nn.Conv2d),
        to_matrix=lambda w: w.flatten(1), from_matrix=lambda m, shape: m.reshape(shape),
        compute=lambda layer, x, w, b: layer._conv_forward(x, w, b),  # type: ignore[operator]
        matrix_free=False, kernel=2),
)

_SUPPORTED = "torch.nn.Linear, transformers' Conv1D (GPT-2), torch.nn.Conv2d"


def layer_kind(layer: object, where: str) -> LayerKind:
    """The :class:`LayerKind` of ``layer``; a :class:`~weightcond.LayerTypeError` names the
    supported ones."""
    for kind in LAYER_KINDS:
        if kind.matches(layer):
            return kind
    raise LayerTypeError(
        f"{where}: argument 'layer' expected one of ({_SUPPORTED}), got {type(layer).__name__}")
