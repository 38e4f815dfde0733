"""The one boundary that views a layer's weight as an ``(out, in)`` matrix.

Every other module works with ``(out, in)`` matrices and activations whose last dimension
is ``in``. A layer type is supported by adding one entry to :data:`LAYER_KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import LayerTypeError

__all__ = ["LAYER_KINDS", "LayerKind", "layer_kind"]


@dataclass(frozen=True)
class LayerKind:
    """How a supported layer type stores its weight."""

    layer_type: type[nn.Module]
    weight: str = "weight"
    bias: str = "bias"

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        """``(out, in)`` of the layer's weight matrix."""
        out_features, in_features = getattr(layer, self.weight).shape
        return out_features, in_features


LAYER_KINDS: tuple[LayerKind, ...] = (LayerKind(nn.Linear),)


def layer_kind(layer: object, where: str) -> LayerKind:
    """The :class:`LayerKind` of ``layer``; a :class:`LayerTypeError` names the supported ones."""
    for kind in LAYER_KINDS:
        if isinstance(layer, kind.layer_type):
            return kind
    supported = ", ".join(k.layer_type.__module__.replace("torch.nn.modules.linear", "torch.nn")
                          + "." + k.layer_type.__name__ for k in LAYER_KINDS)
    raise LayerTypeError(
        f"{where}: argument 'layer' expected one of ({supported}), got {type(layer).__name__}")
