"""Registering, merging and removing conditioning on a layer.

The only module that touches :mod:`torch.nn.utils.parametrize`. A conditioned layer keeps
its frozen base weight in ``layer.parametrizations.weight.original``; ``layer.weight`` is the
dense conditioned weight (and ``layer.bias`` the conditioned bias when a conditioner has
``condition_bias=True``); ``layer(x)`` runs the matrix-free activation form.

Decision (matrix-free forward): parametrize swaps the layer's class for a generated
subclass; we insert one more class below it, ``Conditioned<Base>``, whose ``forward`` runs
:meth:`~weightcond.placement.Conditioning.activation` instead of evaluating the dense
weight. Both are undone by :func:`merge` and :func:`remove_conditioning`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import (
    LayerTypeError,
    OptionError,
    ShapeError,
    StateError,
    UnknownNameError,
    WeightcondError,
    check_bool,
    check_choice,
)
from .placement import Conditioner, Conditioning, Side, Stage
from .reshape import layer_kind
from .transforms import TRANSFORMS, Transform
from .update import LowRankUpdate

__all__ = [
    "conditioners",
    "delta_weight",
    "dense_forward",
    "get_update",
    "is_conditioned",
    "merge",
    "register_conditioning",
    "register_update",
    "remove_conditioning",
]

_CONDITIONED_CLASSES: dict[type, type] = {}


def _forward(self: nn.Module, input: Tensor) -> Tensor:
    conditioning = _conditioning(self)
    if conditioning.dense:
        return F.linear(input, self.weight, self.bias)
    params = self.parametrizations
    bias = params.bias.original if "bias" in params else self.bias
    return conditioning.activation(input, params.weight.original, bias)


def _deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """Deep copy into a class of the copy's own.

    parametrize keeps a generated class per module and its deepcopy shares it between the
    copy and the original, so removing a parametrization from the copy would delete the
    original's property too. The copy gets a fresh generated class instead.
    """
    if id(self) in memo:
        return memo[id(self)]  # type: ignore[no-any-return]
    cls = type(self)
    if cls not in _CONDITIONED_CLASSES.values():
        cls = type(cls.__name__, cls.__bases__, {
            k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
    replica = cls.__new__(cls)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    return replica  # type: ignore[no-any-return]


def _conditioned_class(base: type) -> type:
    if base not in _CONDITIONED_CLASSES:
        _CONDITIONED_CLASSES[base] = type(
            f"Conditioned{base.__name__}", (base,),
            {"forward": _forward, "__deepcopy__": _deepcopy, "__module__": __name__})
    return _CONDITIONED_CLASSES[base]


class _ConditionedBias(nn.Module):
    """Parametrization of ``layer.bias`` when a conditioner has ``condition_bias=True``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # a reference, not a submodule

    def forward(self, bias: Tensor) -> Tensor:
        layer = self._layer
        weight = layer.parametrizations.weight
        return weight[0].conditioned_bias(bias, weight.original)


def is_conditioned(layer: nn.Module) -> bool:
    """Whether ``layer`` carries weightcond conditioning."""
    return (parametrize.is_parametrized(layer, "weight")
            and isinstance(layer.parametrizations.weight[0], Conditioning)
            and type(layer).__bases__[0] in _CONDITIONED_CLASSES.values())


def _conditioning(layer: nn.Module) -> Conditioning:
    return layer.parametrizations.weight[0]  # type: ignore[no-any-return]


def _require_conditioned(layer: nn.Module, where: str) -> Conditioning:
    if not isinstance(layer, nn.Module):
        raise LayerTypeError(f"{where}: argument 'layer' expected an nn.Module, "
                             f"got {type(layer).__name__}")
    if not is_conditioned(layer):
        raise StateError(f"{where}: argument 'layer' expected a conditioned layer, got an "
                         f"unconditioned {type(layer).__name__}")
    return _conditioning(layer)


def _base_weight(layer: nn.Module) -> Tensor:
    if is_conditioned(layer):
        return layer.parametrizations.weight.original  # type: ignore[no-any-return]
    return layer.weight  # type: ignore[no-any-return]


def _check_layer(layer: nn.Module, where: str) -> tuple[int, int]:
    """``(out, in)`` of a layer weightcond can condition, or a typed error."""
    shape = layer_kind(layer, where).shape(layer)
    if not is_conditioned(layer) and parametrize.is_parametrized(layer):
        names = ", ".join(repr(n) for n in layer.parametrizations)
        raise StateError(f"{where}: argument 'layer' expected a layer without "
                         f"torch.nn.utils.parametrize parametrizations (weightcond owns the "
                         f"weight's), got one parametrized on {names}")
    return shape


def _conditioning_for(layer: nn.Module) -> Conditioning:
    """The layer's :class:`Conditioning`, or a new one not yet attached."""
    if is_conditioned(layer):
        return _conditioning(layer)
    return Conditioning(*layer_kind(layer, "weightcond").shape(layer))


def _attach(layer: nn.Module, conditioning: Conditioning) -> None:
    """Install ``conditioning`` (class swap + parametrization) unless it already is."""
    if is_conditioned(layer):
        return
    layer.__class__ = _conditioned_class(type(layer))
    parametrize.register_parametrization(layer, "weight", conditioning)


# -- the update -----------------------------------------------------------------------------------
def _build_update(layer: nn.Module, where: str, *, rank: int, alpha: float | None
                  ) -> LowRankUpdate:
    out_features, in_features = _check_layer(layer, where)
    if is_conditioned(layer) and _conditioning(layer).update is not None:
        raise StateError(f"{where}: the layer already has an update; call "
                         f"weightcond.remove_conditioning(layer) first")
    weight = _base_weight(layer)
    return LowRankUpdate(out_features, in_features, rank=rank, alpha=alpha,
                         dtype=weight.dtype, device=weight.device)


def _attach_update(layer: nn.Module, update: LowRankUpdate) -> None:
    conditioning = _conditioning_for(layer)
    _attach(layer, conditioning)
    conditioning.update = update


def register_update(layer: nn.Module, *, rank: int, alpha: float | None = None
                    ) -> LowRankUpdate:
    r"""Add the low-rank update :math:`\Delta W = (\alpha/r)\,B A` to ``layer``.

    .. math::

        W' = L_\text{post}\,(L_\text{pre} W R_\text{pre} + \Delta W)\,R_\text{post}

    ``A`` (``rank × in``) is Kaiming-uniform, ``B`` (``out × rank``) zero, so the layer is
    unchanged. Conditioners with ``placement="pre"`` act on :math:`W` before it is added,
    ``"post"`` ones after, whatever the registration order. One update per layer.

    Args:
        layer: an :class:`torch.nn.Linear`.
        rank: :math:`r`, between 1 and ``min(out, in)``.
        alpha: :math:`\alpha`; ``None`` means ``alpha = rank``.

    Returns:
        The :class:`~weightcond.update.LowRankUpdate` module (parameters ``A`` and ``B``).

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(8, 6)
        >>> upd = wc.register_update(layer, rank=2, alpha=4)
        >>> tuple(upd.A.shape), tuple(upd.B.shape), upd.scaling
        ((2, 8), (6, 2), 2.0)
    """
    update = _build_update(layer, "register_update", rank=rank, alpha=alpha)
    _attach_update(layer, update)
    return update


# -- conditioners ------------------------------------------------------------------------------
def _option_names(cls: type[Transform]) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _build_transform(transform: Any, dim: int, options: Mapping[str, Any], where: str
                     ) -> Transform:
    if isinstance(transform, Transform):
        if options:
            raise OptionError(f"{where}: options {sorted(options)} given with a transform "
                              f"object; pass them to its constructor instead")
        if transform.dim != dim:
            raise ShapeError(f"{where}: argument 'transform' expected a transform of dim "
                             f"{dim} (the side dimension), got dim {transform.dim}")
        if getattr(transform, "_weightcond_attached", False):
            raise StateError(f"{where}: this transform object is already registered on a "
                             f"layer; pass a new one")
        return transform
    if isinstance(transform, str):
        cls = TRANSFORMS.lookup(transform, where, "transform")
    elif isinstance(transform, type) and issubclass(transform, Transform):
        cls = transform
    else:
        raise OptionError(f"{where}: argument 'transform' expected a registered name "
                             f"({', '.join(map(repr, TRANSFORMS))}), a Transform subclass or "
                             f"a Transform instance, got {type(transform).__name__}")
    valid = _option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UnknownNameError(
            f"{where}: unknown option {', '.join(map(repr, unknown))} for transform "
            f"{cls.name or cls.__name__!r}; expected one of {', '.join(map(repr, valid))}"
            if valid else
            f"{where}: unknown option {', '.join(map(repr, unknown))} for transform "
            f"{cls.name or cls.__name__!r}, which takes no options")
    return cls(dim, **options)


def _build_conditioner(layer: nn.Module, where: str, *, placement: str, side: str,
                       transform: Any, condition_bias: bool, options: Mapping[str, Any]
                       ) -> Conditioner:
    out_features, in_features = _check_layer(layer, where)
    stage = Stage(check_choice(where, "placement", placement, [s.value for s in Stage]))
    where_side = Side(check_choice(where, "side", side, [s.value for s in Side]))
    check_bool(where, "condition_bias", condition_bias)
    if condition_bias and where_side is Side.RIGHT:
        raise OptionError(f"{where}: argument 'condition_bias' expected False for side='right' "
                          f"(only output-side conditioners act on the bias), got True")
    dim = out_features if where_side is Side.LEFT else in_features
    try:
        built = _build_transform(transform, dim, options, where)
    except WeightcondError as error:  # say which call the transform's own error came from
        message = str(error)
        raise type(error)(message if message.startswith(where) else f"{where}: {message}"
                          ) from None
    weight = _base_weight(layer)
    built.to(dtype=weight.dtype, device=weight.device)
    _check_transform(built, weight, where)
    return Conditioner(built, stage, where_side, condition_bias)


def _check_transform(transform: Transform, weight: Tensor, where: str) -> None:
    """Run a (user-written) transform once on a probe, so a broken one fails here and not in
    ``forward``: it must keep the shape of vectors and batches of vectors."""
    name = type(transform).__name__
    with torch.no_grad():
        if transform.norm_tied:
            ones = weight.new_ones(transform.dim)
            checks = [("diagonal(norms)", ones.shape, transform.diagonal(ones).shape)]
        else:
            probes = (weight.new_zeros(transform.dim), weight.new_zeros(2, transform.dim))
            checks = [(f"apply() of a {tuple(p.shape)} input", p.shape, transform.apply(p).shape)
                      for p in probes]
    for what, expected, got in checks:
        if tuple(got) != tuple(expected):
            raise ShapeError(f"{where}: argument 'transform' expected a transform whose {what} "
                             f"has shape {tuple(expected)}, got {tuple(got)} from {name}")


def _attach_conditioner(layer: nn.Module, conditioner: Conditioner) -> None:
    """Initialise (which may fail in user code) before touching the layer, then attach."""
    conditioning = _conditioning_for(layer)
    stage = Stage(conditioner.placement)
    if conditioner.transform.norm_tied:
        conditioner.transform.initialize(conditioning.initial_norms(
            _base_weight(layer), stage, Side(conditioner.side)))
    was_conditioned = is_conditioned(layer)
    _attach(layer, conditioning)
    conditioning.stage(stage).append(conditioner)
    try:
        if conditioner.condition_bias and layer.bias is not None and \
                not parametrize.is_parametrized(layer, "bias"):
            parametrize.register_parametrization(layer, "bias", _ConditionedBias(layer))
    except Exception:
        del conditioning.stage(stage)[-1]
        if not was_conditioned:
            _strip(layer)
        raise
    conditioner.transform._weightcond_attached = True


def register_conditioning(layer: nn.Module, *, placement: str = "pre", side: str = "left",
                          transform: str | type[Transform] | Transform,
                          condition_bias: bool = False, **options: Any) -> Conditioner:
    r"""Place a conditioning matrix on ``layer``'s weight.

    .. math::

        W' = L_\text{post}\,(L_\text{pre} W R_\text{pre} + \Delta W)\,R_\text{post}

    The new conditioner joins :math:`L` (``side="left"``, the output side, ``out × out``) or
    :math:`R` (``"right"``, the input side, ``in × in``) of the ``"pre"`` stage (acting on
    :math:`W` before the update is added) or the ``"post"`` stage (acting on
    :math:`W + \Delta W`). Conditioners of one stage compose in registration order, each
    acting on the matrix built so far. Every transform starts as the identity, so the layer
    computes what it computed before.

    Args:
        layer: an :class:`torch.nn.Linear`.
        placement: ``"pre"`` or ``"post"``.
        side: ``"left"`` or ``"right"``.
        transform: a name in :data:`weightcond.TRANSFORMS`, a
            :class:`~weightcond.transforms.Transform` subclass (built with the side
            dimension and ``options``) or a Transform instance of the side dimension.
        condition_bias: also apply this (left) conditioner to the bias,
            :math:`b' = Q b` (the released SORA code does this).
        **options: the transform's options (e.g. ``rank``, ``map`` for ``"skew"``).

    Returns:
        The :class:`~weightcond.placement.Conditioner`; its parameters are under
        ``.transform``.

    Raises:
        weightcond.WeightcondError: a typed subclass for every invalid argument; the layer
            is left exactly as it was.

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(16, 16)
        >>> rot = wc.register_conditioning(layer, placement="post", side="left",
        ...                                transform="skew", rank=2, map="cayley")
        >>> x = torch.randn(3, 16)
        >>> torch.allclose(layer(x), x @ layer.weight.T + layer.bias, atol=1e-6)
        True
    """
    conditioner = _build_conditioner(layer, "register_conditioning", placement=placement,
                                     side=side, transform=transform,
                                     condition_bias=condition_bias, options=options)
    _attach_conditioner(layer, conditioner)
    return conditioner


# -- inspecting ------------------------------------------------------------------------------------
def conditioners(layer: nn.Module) -> list[Conditioner]:
    """The layer's conditioners in composition order (pre stage, then post stage; each in
    registration order). Empty for an unconditioned layer."""
    return _conditioning(layer).conditioners() if is_conditioned(layer) else []


def get_update(layer: nn.Module) -> LowRankUpdate | None:
    """The layer's low-rank update, or ``None``."""
    return _conditioning(layer).update if is_conditioned(layer) else None


def delta_weight(layer: nn.Module) -> Tensor:
    """The effective update :math:`W' - W` as a dense ``(out, in)`` matrix (the quantity whose
    singular-value entropy the paper studies)."""
    conditioning = _require_conditioned(layer, "delta_weight")
    base = _base_weight(layer)
    return conditioning.dense_weight(base) - base


@contextlib.contextmanager
def dense_forward(module: nn.Module) -> Iterator[None]:
    """Within the block, conditioned layers in ``module`` compute ``F.linear(x, layer.weight,
    layer.bias)`` through the dense weight instead of the matrix-free form (for verification).

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(8, 8)
        >>> _ = wc.apply_preset(layer, "sora", rank=2)
        >>> x = torch.randn(4, 8)
        >>> with wc.dense_forward(layer):
        ...     dense = layer(x)
        >>> torch.allclose(dense, layer(x), atol=1e-6)
        True
    """
    found = [_conditioning(m) for m in module.modules() if is_conditioned(m)]
    previous = [c.dense for c in found]
    for c in found:
        c.dense = True
    try:
        yield
    finally:
        for c, p in zip(found, previous):
            c.dense = p


# -- merging and removing ------------------------------------------------------------------
def _strip(layer: nn.Module) -> None:
    """Remove the parametrizations (restoring the original tensors) and the forward class."""
    if parametrize.is_parametrized(layer, "bias"):
        parametrize.remove_parametrizations(layer, "bias", leave_parametrized=False)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    layer.__class__ = type(layer).__bases__[0]


def merge(layer: nn.Module) -> nn.Module:
    r"""Bake the conditioning into ``layer`` and return it as a plain layer.

    The weight becomes :math:`W'` and the bias :math:`b'` (new parameters; the original
    tensors are not modified), the parametrizations and the matrix-free forward are removed.
    The layer computes the same function as before, now with one GEMM.
    """
    _require_conditioned(layer, "merge")
    with torch.no_grad():
        weight = layer.weight.detach().clone()
        bias = None if layer.bias is None else layer.bias.detach().clone()
    original_weight = _base_weight(layer)
    _strip(layer)
    layer.weight = nn.Parameter(weight, requires_grad=original_weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
    return layer


def remove_conditioning(layer: nn.Module) -> nn.Module:
    """Remove every update and conditioner from ``layer`` and return it: the original weight
    and bias tensors (the very same objects, bit-exact) and the original class."""
    _require_conditioned(layer, "remove_conditioning")
    _strip(layer)
    return layer
