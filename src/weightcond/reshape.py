r"""The one boundary that views a layer's weight as an ``(out, in)`` matrix: the layer kinds.

Every other module works with ``(out, in)`` matrices and activations whose last dimension
is ``in``. A layer type is supported by registering one :class:`LayerKind` with
:func:`register_layer_kind`; :data:`LAYER_KINDS` lists them, tried in order:

* :class:`torch.nn.Linear` — the weight is ``(out, in)``;
* ``transformers.pytorch_utils.Conv1D`` (GPT-2 family) — the weight is stored transposed,
  ``(in, out)``, and the layer computes ``x @ weight + bias``;
* :class:`torch.nn.Conv2d` — the weight ``(out, in/groups, kh, kw)`` is viewed as
  ``(out, in/groups · kh · kw)``, the matrix of the convolution's im2col form;
* :class:`torch.nn.Embedding` — the table ``(num_embeddings, embedding_dim)`` is the
  transposed ``(out, in) = (embedding_dim, num_embeddings)`` matrix of the linear map that
  takes a one-hot vector to its embedding, as PEFT's LoRA and DoRA read it (the update
  :math:`s\,BA` has :math:`B` ``(embedding_dim, r)`` and :math:`A` ``(r, num_embeddings)``).

Decision (Conv2d runs dense): the matrix-free activation form needs the layer to act along
the last dimension of its input. A convolution does not (its right-side conditioners act
on unfolded patches), so a conditioned ``Conv2d`` convolves with the dense conditioned
weight, as a parametrized layer does. ``Linear``, ``Conv1D`` and ``Embedding`` run
matrix-free.

Decision (Embedding's input is indices): an embedding's input is a tensor of indices, the
one-hot vectors of the ``(out, in)`` view never exist. Its kind gives the executor a
*projection* in place of ``x Lᵀ`` — the rows ``L[:, i]`` gathered with
:func:`torch.nn.functional.embedding` — for the frozen lookup and for every low-rank term,
so the update and thin right-side conditioners (``skew``, ``householder``, folded as
:math:`W R = W + (WU)V^\top`) run without forming the table; left-side conditioners act on
the looked-up vectors as on any layer's output. A right-side conditioner that would have to
rotate the one-hot vectors themselves (``block``, ``givens``, ``diag`` on the vocabulary...)
is refused at registration. An embedding's ``padding_idx`` acts as in PEFT: the update's
column at the padding index gets no gradient (its lookup passes ``padding_idx``), while
conditioners act on the padding vector as on any other and take gradient from it; the dense
form (:func:`weightcond.dense_forward`) looks up the conditioned table with ``padding_idx``,
which zeroes every gradient through that row, so the two forms' gradients differ only
through padding tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Size, Tensor, nn

from .engine.frozen import OpaqueWeight
from .errors import LayerTypeError
from .registry import Registry

__all__ = ["LAYER_KINDS", "LayerKind", "layer_kind", "register_layer_kind", "stored_weight",
           "supported_kinds"]


def _is_transformers_conv1d(layer: object) -> bool:
    # transformers is optional: a Conv1D instance exists only when it has been imported
    module = sys.modules.get("transformers.pytorch_utils")
    return module is not None and isinstance(layer, module.Conv1D)


@dataclass(frozen=True)
class LayerKind:
    """How a supported layer type stores its weight and computes its output.

    Attributes:
        name: the type's name in messages and saved configurations.
        description: the type as the supported-types message names it.
        matches: whether a module is of this kind.
        to_matrix: the stored weight → its ``(out, in)`` view (no copy).
        from_matrix: an ``(out, in)`` matrix → the stored layout, given the stored shape.
        compute: the layer's output for an input, a weight in the stored layout and a bias.
        matrix_free: whether the layer acts along the last dimension of its input, as
            ``x Wᵀ + b`` (then the matrix-free activation form applies).
        kernel: the number of trailing kernel dimensions of the stored weight (PEFT stores
            a convolution's LoRA factors as ``(r, in, *kernel)`` and ``(out, r, 1, …)``).
        bias: the layer's bias (``None`` for none; the default reads ``layer.bias``).
        projection: for a layer whose input is not the vectors of the ``(out, in)`` view,
            ``projection(layer)`` returns ``project(x, L) = x Lᵀ`` for an ``(m, in)`` matrix
            ``L`` on its input ``x`` (Decision (Embedding's input is indices)); ``None``: the
            input is those vectors.
        all_linear: whether ``target_modules="all-linear"`` takes layers of this kind (as
            PEFT's, which leaves embeddings alone).
        opaque: for a quantized kind, ``opaque(layer, stored)`` is the frozen weight as an
            :class:`~weightcond.engine.frozen.OpaqueWeight` (the executor never dequantizes
            it; ``to_matrix`` then dequantizes, for the dense form); ``None``: the stored
            weight is a float tensor.
        dtype: ``dtype(layer, stored)``, the floating dtype of the ``(out, in)`` matrix (the
            adapter's parameters take it); ``None``: the stored weight's dtype.
        prepare: called on the layer before it is first conditioned (a quantized kind puts
            its state where its dequantized view reads it).
        input_grad: ``input_grad(layer)``, whether the layer's forward gives its input a
            gradient (torchao's dynamic int8 activations do not: right-side conditioners are
            then refused).
        family: the kinds whose saved adapters load onto each other (a quantized ``Linear``
            and ``Linear`` read the same ``(out, in)`` matrix); ``""``: the kind's name.
        requantize: for a quantized kind, ``requantize(layer, dense)`` stores the ``(out,
            in)`` matrix ``dense`` as the layer's weight in its own quantized form
            (``merge(..., requantize=True)``).
    """

    name: str
    matches: Callable[[object], bool]
    to_matrix: Callable[[Tensor], Tensor]
    from_matrix: Callable[[Tensor, Size], Tensor]
    compute: Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]
    matrix_free: bool
    kernel: int = 0
    description: str = ""
    bias: Callable[[nn.Module], Tensor | None] = lambda layer: getattr(layer, "bias", None)
    projection: Callable[[nn.Module], Callable[[Tensor, Tensor], Tensor]] | None = None
    all_linear: bool = True
    opaque: Callable[[nn.Module, Tensor], OpaqueWeight] | None = None
    dtype: Callable[[nn.Module, Tensor], torch.dtype] | None = None
    prepare: Callable[[nn.Module], None] | None = None
    input_grad: Callable[[nn.Module], bool] = lambda layer: True
    requantize: Callable[[nn.Module, Tensor], None] | None = None
    family: str = ""

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.name)

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        """``(out, in)`` of the layer's weight matrix."""
        stored = stored_weight(layer)
        if self.opaque is not None:
            out_features, in_features = self.opaque(layer, stored).shape
        else:
            out_features, in_features = self.to_matrix(stored).shape
        return out_features, in_features

    def frozen(self, layer: nn.Module) -> Tensor | OpaqueWeight:
        """The frozen ``(out, in)`` matrix as the executor reads it: a view of the stored
        weight, or a quantized kind's :class:`~weightcond.engine.frozen.OpaqueWeight`."""
        stored = stored_weight(layer)
        return self.to_matrix(stored) if self.opaque is None else self.opaque(layer, stored)

    def matrix_dtype(self, layer: nn.Module) -> torch.dtype:
        """The floating dtype of the ``(out, in)`` matrix."""
        stored = stored_weight(layer)
        return stored.dtype if self.dtype is None else self.dtype(layer, stored)


def stored_weight(layer: nn.Module) -> Tensor:
    """The frozen weight as the layer stores it (under a parametrization, its original)."""
    params = getattr(layer, "parametrizations", None)
    if params is not None and "weight" in params:
        return params.weight.original  # type: ignore[no-any-return]
    return layer.weight  # type: ignore[no-any-return]


#: The supported layer types by name, tried in registration order (:func:`register_layer_kind`).
LAYER_KINDS: Registry[LayerKind] = Registry("layer kind")


def register_layer_kind(kind: LayerKind, *, before: str | None = None) -> LayerKind:
    """Support a layer type: ``kind`` is tried after the kinds registered before it, or just
    before the kind named ``before`` (a subclass of a supported type, such as a quantized
    ``Linear``, goes before its base class's kind).

    Raises:
        weightcond.OptionError: a kind of this name is registered already.
        weightcond.UnknownNameError: no kind is named ``before``.
    """
    if not isinstance(kind, LayerKind):
        raise LayerTypeError(f"register_layer_kind: argument 'kind' expected a LayerKind, got "
                             f"{type(kind).__name__}")
    LAYER_KINDS.add(kind.name, kind, before=before)
    return kind


def supported_kinds() -> str:
    """The supported layer types, as messages name them (float kinds first, then quantized
    ones, each in registration order)."""
    kinds = sorted(LAYER_KINDS.values(), key=lambda kind: kind.opaque is not None)
    return ", ".join(kind.description or kind.name for kind in kinds)


def _embedding_compute(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None
                       ) -> Tensor:
    return F.embedding(x, weight, layer.padding_idx, layer.max_norm,  # type: ignore[arg-type]
                       layer.norm_type, layer.scale_grad_by_freq,  # type: ignore[arg-type]
                       layer.sparse)  # type: ignore[arg-type]


def _embedding_projection(layer: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    padding_idx = layer.padding_idx

    def project(x: Tensor, rows: Tensor) -> Tensor:  # rows (m, num): the columns rows[:, x]
        return F.embedding(x, rows.mT, padding_idx)
    return project


for _kind in (
    LayerKind(
        name="Linear", description="torch.nn.Linear", matches=lambda m: isinstance(m, nn.Linear),
        to_matrix=lambda w: w, from_matrix=lambda m, shape: m,
        compute=lambda layer, x, w, b: F.linear(x, w, b), matrix_free=True),
    LayerKind(
        name="Conv1D", description="transformers' Conv1D (GPT-2)",
        matches=_is_transformers_conv1d,
        to_matrix=lambda w: w.mT, from_matrix=lambda m, shape: m.mT,
        compute=lambda layer, x, w, b: F.linear(x, w.mT, b), matrix_free=True),
    LayerKind(
        name="Conv2d", description="torch.nn.Conv2d", matches=lambda m: isinstance(m, nn.Conv2d),
        to_matrix=lambda w: w.flatten(1), from_matrix=lambda m, shape: m.reshape(shape),
        compute=lambda layer, x, w, b: layer._conv_forward(x, w, b),  # type: ignore[operator]
        matrix_free=False, kernel=2),
    LayerKind(
        name="Embedding", description="torch.nn.Embedding",
        matches=lambda m: isinstance(m, nn.Embedding),
        to_matrix=lambda w: w.mT, from_matrix=lambda m, shape: m.mT,
        compute=_embedding_compute, matrix_free=True, bias=lambda layer: None,
        projection=_embedding_projection, all_linear=False),
):
    register_layer_kind(_kind)


def layer_kind(layer: object, where: str) -> LayerKind:
    """The :class:`LayerKind` of ``layer``; a :class:`~weightcond.LayerTypeError` names the
    supported ones."""
    for kind in LAYER_KINDS.values():
        if kind.matches(layer):
            return kind
    raise LayerTypeError(f"{where}: argument 'layer' expected one of ({supported_kinds()}), got "
                         f"{type(layer).__name__}")
