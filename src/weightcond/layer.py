"""Registering, merging and removing conditioning on a layer.

The only module that touches :mod:`torch.nn.utils.parametrize`. A conditioned layer keeps
its frozen base weight in ``layer.parametrizations.weight.original``; ``layer.weight`` is the
dense conditioned weight (and ``layer.bias`` the conditioned bias when a conditioner has
``condition_bias=True``); ``layer(x)`` runs the matrix-free activation form.

A layer holds one or more named *adapters* (each an update and conditioners, a
:class:`~weightcond.placement.Conditioning`) in an :class:`Adapters` module, the weight's
parametrization; one adapter is active at a time, and :func:`weightcond.disabled` turns them
all off.

A conditioned layer cannot be pickled whole (``pickle.dumps(model)``, ``torch.save(model)``):
that raises :class:`~weightcond.StateError`. Save ``model.state_dict()`` (and load it into the
model rebuilt and conditioned the same way) or the adapter alone with
:func:`weightcond.save_adapter`; ``copy.deepcopy`` works.

Decision (matrix-free forward): parametrize swaps the layer's class for a generated
subclass; we insert one more class below it, ``Conditioned<Base>``, whose ``forward`` runs
:meth:`~weightcond.placement.Conditioning.activation` instead of evaluating the dense
weight. Both are undone by :func:`merge` and :func:`remove_conditioning`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .engine.frozen import OpaqueWeight
from .engine.plan import Plan, plan
from .errors import (
    LayerTypeError,
    OptionError,
    ShapeError,
    StateError,
    UnknownNameError,
    WeightcondError,
    check_bool,
    check_choice,
    check_int,
)
from .placement import Conditioner, Conditioning, Side, Stage
from .reshape import LayerKind, layer_kind, stored_weight
from .transforms import TRANSFORMS, Transform
from .update import LowRankUpdate

__all__ = [
    "Adapters",
    "conditioners",
    "delta_weight",
    "dense_forward",
    "explain",
    "get_update",
    "is_conditioned",
    "merge",
    "register_conditioning",
    "register_update",
    "remove_conditioning",
]

DEFAULT_ADAPTER = "default"
_CONDITIONED_CLASSES: dict[type, type] = {}

# Decision (per-thread switches): the flags of :func:`weightcond.disabled` and
# :func:`weightcond.dense_forward` live in a ``threading.local``, ``{flag: {Adapters: value}}``,
# as grad mode does for ``torch.no_grad``: a forward on another thread sees none of them (an
# attribute of the module would be seen by every thread). Not a ``contextvars.ContextVar``:
# Dynamo cannot trace ``ContextVar.get`` (a graph break in every conditioned layer), while it
# guards on a thread-local's attributes like on any object's. Like grad mode, the switches
# are not passed to the worker threads of ``torch.nn.DataParallel``.
_SWITCHES = threading.local()
_UNSWITCHED: Mapping[Adapters, bool] = {}  # never written


class Adapters(nn.Module):
    """The parametrization of a conditioned layer's weight: its named adapters.

    ``adapters`` maps each name to a :class:`~weightcond.placement.Conditioning`; the
    ``active`` one (``None``: none) conditions the weight unless ``enabled`` is ``False``
    (:func:`weightcond.disabled`). ``forward`` maps the stored weight to the stored layout
    of the conditioned weight, through the layer kind's ``(out, in)`` view.
    """

    def __init__(self, kind: LayerKind) -> None:
        super().__init__()
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    @property
    def enabled(self) -> bool:
        """``False`` inside :func:`weightcond.disabled` on this thread."""
        return getattr(_SWITCHES, "enabled", _UNSWITCHED).get(self, True)

    @property
    def dense(self) -> bool:
        """``True`` inside :func:`weightcond.dense_forward` on this thread."""
        return getattr(_SWITCHES, "dense", _UNSWITCHED).get(self, False)

    def current(self) -> Conditioning | None:
        """The conditioning that acts now, or ``None`` (the layer computes its base)."""
        if not self.enabled or self.active is None:
            return None
        return self.adapters[self.active]  # type: ignore[no-any-return]

    def forward(self, weight: Tensor) -> Tensor:
        conditioning = self.current()
        if conditioning is None:  # a quantized kind's weight reads as its dequantized matrix
            return weight if self.kind.opaque is None else self.kind.to_matrix(weight)
        return self.kind.from_matrix(conditioning(self.kind.to_matrix(weight)), weight.shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, active={self.active!r}, enabled={self.enabled}"


def _forward(self: nn.Module, input: Tensor) -> Tensor:
    adapters = adapters_of(self)
    kind = adapters.kind
    conditioning = adapters.current()
    if conditioning is None:  # the stored weight as the layer itself computes with it
        return kind.compute(self, input, stored_weight(self), kind.bias(self))
    if adapters.dense or not kind.matrix_free:
        return kind.compute(self, input, self.weight, kind.bias(self))
    params = self.parametrizations
    bias = params.bias.original if "bias" in params else kind.bias(self)
    project = None if kind.projection is None else kind.projection(self)
    return conditioning.activation(input, kind.frozen(self), bias, project)


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


def _reduce_ex(self: nn.Module, protocol: int) -> Any:
    """Refuse pickling (``pickle``, ``torch.save(model)``, ``copy.copy``) with a typed error.

    parametrize refuses it too (its generated class raises in ``__getstate__``): a pickle
    would hold the generated classes, which exist in no module. This hook comes first in
    the lookup, so the error names what works instead.
    """
    raise StateError(
        f"pickle: argument 'module' expected a module without conditioned layers, got a "
        f"conditioned {_plain_class(self).__name__}; save "
        f"model.state_dict() (load it with load_state_dict into the model rebuilt and "
        f"conditioned the same way) or the adapter alone with weightcond.save_adapter "
        f"(weightcond.load_adapter restores it), or weightcond.merge the model first")


def _plain_class(layer: nn.Module) -> type:
    """The layer's class before conditioning (``Linear`` for ``ParametrizedConditionedLinear``)."""
    for cls in type(layer).__mro__:
        if cls in _CONDITIONED_CLASSES.values():
            return cls.__bases__[0]
    return type(layer)


def _conditioned_class(base: type) -> type:
    if base not in _CONDITIONED_CLASSES:
        _CONDITIONED_CLASSES[base] = type(
            f"Conditioned{base.__name__}", (base,),
            {"forward": _forward, "__deepcopy__": _deepcopy, "__reduce_ex__": _reduce_ex,
             "__module__": __name__})
    return _CONDITIONED_CLASSES[base]


class _ConditionedBias(nn.Module):
    """Parametrization of ``layer.bias`` when a conditioner has ``condition_bias=True``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # a reference, not a submodule

    def forward(self, bias: Tensor) -> Tensor:
        layer = self._layer
        conditioning = adapters_of(layer).current()
        if conditioning is None:
            return bias
        return conditioning.conditioned_bias(bias, base_matrix(layer))


def is_conditioned(layer: nn.Module) -> bool:
    """Whether ``layer`` carries weightcond conditioning."""
    return (parametrize.is_parametrized(layer, "weight")
            and isinstance(layer.parametrizations.weight[0], Adapters)
            and any(c in _CONDITIONED_CLASSES.values() for c in type(layer).__mro__))


def _require_own_class(layer: nn.Module, where: str) -> None:
    """Removing the parametrizations restores ``__bases__[0]`` (parametrize's rule), which is
    weightcond's class only if nothing swapped the class again after conditioning
    (``torch.distributed.fsdp.fully_shard`` does: ``FSDP<class>``)."""
    if type(layer).__bases__[0] not in _CONDITIONED_CLASSES.values():
        raise StateError(f"{where}: argument 'module' expected conditioned layers whose class "
                         f"is weightcond's, got {type(layer).__name__}, whose class was "
                         f"swapped after conditioning (e.g. by fully_shard); load its full "
                         f"state dict into an unwrapped copy and call {where} on that")


def adapters_of(layer: nn.Module) -> Adapters:
    return layer.parametrizations.weight[0]  # type: ignore[no-any-return]


def require_conditioned(layer: nn.Module, where: str) -> Adapters:
    if not isinstance(layer, nn.Module):
        raise LayerTypeError(f"{where}: argument 'layer' expected an nn.Module, "
                             f"got {type(layer).__name__}")
    if not is_conditioned(layer):
        raise StateError(f"{where}: argument 'layer' expected a conditioned layer, got an "
                         f"unconditioned {type(layer).__name__}")
    return adapters_of(layer)


def _named(adapters: Adapters, adapter_name: str | None, where: str) -> Conditioning | None:
    """The adapter called ``adapter_name`` (``None``: the active one, if any)."""
    if adapter_name is None:
        return None if adapters.active is None else adapters.adapters[adapters.active]
    if adapter_name not in adapters.adapters:
        raise UnknownNameError(
            f"{where}: argument 'adapter_name' expected one of "
            f"{', '.join(map(repr, adapters.adapters))}, got {adapter_name!r}")
    return adapters.adapters[adapter_name]  # type: ignore[no-any-return]


def _matrix_dtype_device(layer: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The floating dtype of the layer's ``(out, in)`` matrix and its device (a quantized
    weight is not read for them)."""
    kind = layer_kind(layer, "weightcond")
    return kind.matrix_dtype(layer), stored_weight(layer).device


def _base_weight(layer: nn.Module) -> Tensor:
    """The frozen weight in the layer's stored layout."""
    if is_conditioned(layer):
        return layer.parametrizations.weight.original  # type: ignore[no-any-return]
    return layer.weight  # type: ignore[no-any-return]


def base_matrix(layer: nn.Module) -> Tensor:
    """The frozen weight as an ``(out, in)`` matrix (a view)."""
    return layer_kind(layer, "weightcond").to_matrix(_base_weight(layer))


def _base_bias(layer: nn.Module) -> Tensor | None:
    if is_conditioned(layer) and parametrize.is_parametrized(layer, "bias"):
        return layer.parametrizations.bias.original  # type: ignore[no-any-return]
    return layer_kind(layer, "weightcond").bias(layer)


def require_module(module: Any, where: str, argument: str) -> nn.Module:
    """Return ``module`` if it is an :class:`torch.nn.Module`, else a
    :class:`~weightcond.LayerTypeError`."""
    if not isinstance(module, nn.Module):
        raise LayerTypeError(f"{where}: argument '{argument}' expected an nn.Module, "
                             f"got {type(module).__name__}")
    return module


#: The dtypes a conditioned weight may have (the transforms' mathematics is real, and their
#: small solves run in float32 or float64, Note (small solves)).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_layer(layer: nn.Module, where: str) -> tuple[int, int]:
    """``(out, in)`` of a layer weightcond can condition, or a typed error.

    A layer conditioned already was checked when it was conditioned first; a plain one must
    have a weight parametrize can take over (a parameter or a buffer, no other
    parametrizations) that the transforms can compute with.
    """
    kind = layer_kind(layer, where)
    if not is_conditioned(layer):
        if kind.prepare is not None:
            kind.prepare(layer)
        if parametrize.is_parametrized(layer):
            names = ", ".join(repr(n) for n in layer.parametrizations)
            raise StateError(f"{where}: argument 'layer' expected a layer without "
                             f"torch.nn.utils.parametrize parametrizations (weightcond owns "
                             f"the weight's), got one parametrized on {names}")
        _check_weight(layer, kind, where)
        if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
            what = "max_norm (it renormalises the frozen table in place at every lookup)" \
                if layer.max_norm is not None else "sparse=True (sparse gradients)"
            raise StateError(f"{where}: argument 'layer' expected an Embedding without "
                             f"{what.split(' (')[0]}, got one with {what}")
    return kind.shape(layer)


def _check_weight(layer: nn.Module, kind: LayerKind, where: str) -> None:
    got = type(layer).__name__
    registered = {**layer._buffers, **layer._parameters}
    if "weight" not in registered:
        hooks = [h for h in layer._forward_pre_hooks.values()
                 if getattr(h, "name", None) == "weight"]
        value = layer.__dict__.get("weight")
        if hooks:
            what = (f"is recomputed by a {type(hooks[0]).__name__} forward pre-hook (the "
                    f"hook-based torch.nn.utils.weight_norm or spectral_norm); remove it first "
                    f"(torch.nn.utils.remove_weight_norm, remove_spectral_norm)")
        elif isinstance(value, Tensor):
            what = "is a plain tensor attribute"
        else:
            what = "is missing" if value is None else f"is {value!r}"
        raise StateError(f"{where}: argument 'layer' expected a layer whose 'weight' is a "
                         f"parameter or a buffer, got {got} whose 'weight' {what}")
    weight = registered["weight"]
    if not isinstance(weight, Tensor):
        raise LayerTypeError(f"{where}: argument 'layer' expected a layer whose 'weight' is a "
                             f"tensor, got {got} whose 'weight' is {weight!r}")
    if kind.opaque is not None:  # a quantized kind checked its own storage
        return
    if isinstance(weight, nn.parameter.UninitializedTensorMixin):
        raise StateError(f"{where}: argument 'layer' expected a layer with an initialized "
                         f"weight, got {got} whose weight is uninitialized (run one forward "
                         f"first: a lazy layer infers its shape from its first input)")
    if weight.layout != torch.strided:
        raise LayerTypeError(f"{where}: argument 'layer' expected a dense (torch.strided) "
                             f"weight, got {weight.layout}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise LayerTypeError(f"{where}: argument 'layer' expected a weight of dtype "
                             f"{', '.join(map(str, WEIGHT_DTYPES[:-1]))} or "
                             f"{WEIGHT_DTYPES[-1]}, got {weight.dtype}")
    ndim = 2 + kind.kernel
    if weight.dim() != ndim:
        raise ShapeError(f"{where}: argument 'layer' expected a {ndim}-D weight for a "
                         f"{kind.name}, got one of shape {tuple(weight.shape)}")
    for name in ("weight", "bias"):
        tensor = registered.get(name)
        if isinstance(tensor, Tensor) and tensor.is_inference():
            raise StateError(
                f"{where}: argument 'layer' expected a layer whose tensors are not inference "
                f"tensors, got {got} whose {name!r} was created under torch.inference_mode() "
                f"(it cannot be saved for backward); build the model outside inference mode or "
                f"replace it: layer.{name} = torch.nn.Parameter(layer.{name}.clone(), "
                f"requires_grad=False)")


_RESERVED = frozenset(dir(nn.ModuleDict()))


def check_adapter_name(where: str, name: Any) -> str:
    """Return ``name`` if it can name an adapter (letters, digits, ``_`` and ``-``)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_\-]*", name) \
            or name in _RESERVED:
        raise OptionError(f"{where}: argument 'adapter_name' expected a name of letters, digits, "
                          f"'_' and '-' (not a ModuleDict attribute), got {name!r}")
    return name


def _conditioning_for(layer: nn.Module, adapter_name: str) -> Conditioning:
    """The layer's adapter ``adapter_name``, or a new one not yet attached."""
    if is_conditioned(layer) and adapter_name in adapters_of(layer).adapters:
        return adapters_of(layer).adapters[adapter_name]  # type: ignore[no-any-return]
    return Conditioning(*layer_kind(layer, "weightcond").shape(layer))


def install_conditioning(layer: nn.Module, adapter_name: str, conditioning: Conditioning) -> None:
    """Make ``conditioning`` the layer's active adapter ``adapter_name``: class swap and
    parametrizations on first use, the bias parametrization when a conditioner needs it."""
    if not is_conditioned(layer):
        kind = layer_kind(layer, "weightcond")
        if kind.prepare is not None:
            kind.prepare(layer)
        layer._weightcond_order = list(layer._parameters)  # restored by _strip
        layer.__class__ = _conditioned_class(type(layer))
        try:
            # a quantized kind's stored weight is not the (out, in) float matrix it reads as
            parametrize.register_parametrization(layer, "weight", Adapters(kind),
                                                 unsafe=kind.opaque is not None)
        except Exception:
            layer.__class__ = type(layer).__bases__[0]
            del layer._weightcond_order
            raise
    adapters = adapters_of(layer)
    if adapter_name not in adapters.adapters:
        adapters.adapters[adapter_name] = conditioning
    adapters.active = adapter_name
    if any(c.condition_bias for c in conditioning.conditioners()) and \
            _base_bias(layer) is not None and not parametrize.is_parametrized(layer, "bias"):
        parametrize.register_parametrization(layer, "bias", _ConditionedBias(layer))


# Decision (registration under inference mode): the functions that build and attach adapters
# (the update, conditioners, parametrizations; apply_preset and condition go through them)
# run with inference mode off. Under torch.inference_mode() the new parameters would be
# inference tensors, and the first training forward would fail with "Inference tensors
# cannot be saved for backward"; created outside it they are normal tensors, which serve
# inference-mode forwards as well (loading an adapter inside an inference loop keeps
# working). Registration records nothing for autograd, so nothing else changes. A base weight
# or bias that is itself an inference tensor is refused (_check_weight): weightcond never
# replaces the base tensors, and such a tensor cannot be saved for backward whatever we do.
_REGISTERING = torch.inference_mode(False)


# -- the update -----------------------------------------------------------------------------------
@_REGISTERING
def build_update(layer: nn.Module, where: str, *, rank: int, alpha: float | None,
                  adapter_name: str = DEFAULT_ADAPTER) -> LowRankUpdate:
    out_features, in_features = _check_layer(layer, where)
    check_adapter_name(where, adapter_name)
    if _conditioning_for(layer, adapter_name).update is not None:
        raise StateError(f"{where}: adapter {adapter_name!r} of the layer already has an update; "
                         f"call weightcond.remove_conditioning(layer) first")
    dtype, device = _matrix_dtype_device(layer)
    try:
        update = LowRankUpdate(out_features, in_features, rank=rank, alpha=alpha,
                               dtype=dtype, device=device)
    except WeightcondError as error:  # say which call the update's error came from
        raise type(error)(str(error).replace("register_update", where, 1)) from None
    if alpha is not None:  # the scale multiplies B in the layer's dtype
        _check_representable({"alpha": update.alpha}, dtype, where)
    return update


@_REGISTERING
def _attach_update(layer: nn.Module, update: LowRankUpdate,
                   adapter_name: str = DEFAULT_ADAPTER) -> None:
    conditioning = _conditioning_for(layer, adapter_name)
    conditioning.update = update
    install_conditioning(layer, adapter_name, conditioning)


def register_update(layer: nn.Module, *, rank: int, alpha: float | None = None,
                    adapter_name: str = DEFAULT_ADAPTER) -> LowRankUpdate:
    r"""Add the low-rank update :math:`\Delta W = (\alpha/r)\,B A` to ``layer``.

    .. math::

        W' = L_\text{post}\,(L_\text{pre} W R_\text{pre} + \Delta W)\,R_\text{post}

    ``A`` (``rank × in``) is Kaiming-uniform, ``B`` (``out × rank``) zero, so the layer is
    unchanged. Conditioners with ``placement="pre"`` act on :math:`W` before it is added,
    ``"post"`` ones after, whatever the registration order. One update per adapter.

    Args:
        layer: an :class:`torch.nn.Linear`, a transformers ``Conv1D`` or an
            :class:`torch.nn.Conv2d` (see :mod:`weightcond.reshape`) whose weight is an
            initialised float16, bfloat16, float32 or float64 parameter or buffer (not an
            inference tensor). Under :func:`torch.inference_mode` the new parameters are
            still created as normal tensors, so the layer trains afterwards.
        rank: :math:`r`, between 1 and ``min(out, in)``.
        alpha: :math:`\alpha`; ``None`` means ``alpha = rank``.
        adapter_name: the adapter the update belongs to; it becomes the layer's active
            adapter.

    Returns:
        The :class:`~weightcond.update.LowRankUpdate` module (parameters ``A`` and ``B``).

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(8, 6)
        >>> upd = wc.register_update(layer, rank=2, alpha=4)
        >>> tuple(upd.A.shape), tuple(upd.B.shape), upd.scaling
        ((2, 8), (6, 2), 2.0)
    """
    update = build_update(layer, "register_update", rank=rank, alpha=alpha,
                           adapter_name=adapter_name)
    _attach_update(layer, update, adapter_name)
    return update


# -- conditioners ------------------------------------------------------------------------------
def _option_names(cls: type[Transform]) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _describe(value: Any) -> str:
    if value is Transform:
        return "the base class Transform itself"
    return f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__


def _required_options(cls: type[Transform]) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _registered_name(cls: type[Transform]) -> str | None:
    """The registry name of a transform class, ``None`` when it is not registered."""
    return cls.name if cls.name and TRANSFORMS.get(cls.name) is cls else None


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
    elif isinstance(transform, type) and issubclass(transform, Transform) \
            and transform is not Transform:
        cls = transform
    else:
        raise OptionError(f"{where}: argument 'transform' expected a registered name "
                             f"({', '.join(map(repr, TRANSFORMS))}), a Transform subclass or "
                             f"a Transform instance, got "
                             f"{_describe(transform)}")
    valid = _option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UnknownNameError(
            f"{where}: unknown option {', '.join(map(repr, unknown))} for transform "
            f"{cls.name or cls.__name__!r}; expected one of {', '.join(map(repr, valid))}"
            if valid else
            f"{where}: unknown option {', '.join(map(repr, unknown))} for transform "
            f"{cls.name or cls.__name__!r}, which takes no options")
    missing = [n for n in _required_options(cls) if n not in options]
    if missing:
        raise OptionError(f"{where}: argument {missing[0]!r} expected a value (transform "
                          f"{cls.name or cls.__name__!r} has no default for it), got none")
    return cls(dim, **options)


@_REGISTERING
def build_conditioner(layer: nn.Module, where: str, *, placement: str, side: str,
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
    dtype, device = _matrix_dtype_device(layer)
    label = f"{where}: {type(built).name or type(built).__name__}"
    _check_representable(options, dtype, label)
    built.to(dtype=dtype, device=device)
    _check_transform(built, torch.empty(0, dtype=dtype, device=device), where, label, options)
    kind = layer_kind(layer, where)
    if not kind.input_grad(layer) and (where_side is Side.RIGHT or (
            built.norm_tied and not built.detach_norm)):
        what = "a right-side conditioner" if where_side is Side.RIGHT else \
            "a norm-tied conditioner with gradient through its norm (detach_norm=False)"
        raise LayerTypeError(
            f"{where}: argument 'layer' expected a layer whose forward gives its input a "
            f"gradient, as {what} needs, got a {kind.name} that gives none (torchao's dynamic "
            f"int8 activations); use a weight-only quantization (Int8WeightOnlyConfig)")
    if kind.projection is not None and where_side is Side.RIGHT and built.low_rank_size is None:
        thin = [n for n, cls in TRANSFORMS.items()
                if cls.low_rank_size is not Transform.low_rank_size]
        raise OptionError(
            f"{where}: argument 'transform' expected, on the right of a layer whose input is "
            f"indices ({kind.name}), not vectors to rotate, a transform with a low-rank form "
            f"({', '.join(map(repr, thin))}), got {type(built).name or type(built).__name__!r}")
    conditioner = Conditioner(built, stage, where_side, condition_bias)
    # what a saved adapter records to rebuild it (weightcond.save_adapter); a transform
    # object passed in has unknown constructor options, so it has no recipe
    name = None if isinstance(transform, Transform) else _registered_name(type(built))
    conditioner._recipe = None if name is None else (name, dict(options))
    return conditioner


def _check_representable(options: Mapping[str, Any], dtype: torch.dtype, label: str) -> None:
    """A real-valued option (``eps`` of ``magnitude``, the update's ``alpha``) is used in the
    layer's dtype: refuse one whose magnitude is beyond that dtype's largest finite value
    (``eps=1e6`` on a float16 layer made DoRA's magnitude ``inf``, or failed converting the
    value in ``clamp_min``; ``alpha=1e39`` made the weight NaN)."""
    limit = torch.finfo(dtype).max
    for name, value in options.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                not abs(value) <= limit:
            raise OptionError(f"{label}: argument '{name}' expected a number representable in "
                              f"the layer's dtype {dtype} (at most {limit:g}), got {value!r}")


def _check_transform(transform: Transform, weight: Tensor, where: str, label: str,
                     options: Mapping[str, Any]) -> None:
    """Run a transform once on probes of the layer's dtype and device, so that a broken
    one, or a user callable it was given (a ``map``), fails here and not in ``forward``: it
    must run and keep the shape of vectors and batches of vectors."""
    name = type(transform).__name__
    if transform.norm_tied:
        ones = weight.new_ones(transform.dim)
        probes = [("diagonal(norms)", ones.shape, lambda: transform.diagonal(ones))]
    else:
        probes = [(f"apply() of a {tuple(p.shape)} input", p.shape,
                   lambda p=p: transform.apply(p))  # type: ignore[misc]
                  for p in (weight.new_zeros(transform.dim), weight.new_zeros(2, transform.dim))]
    for what, expected, probe in probes:
        try:
            with torch.no_grad():
                got = probe().shape
        except WeightcondError:
            raise
        except Exception as error:
            raise _probe_error(transform, weight, where, label, options, what, error) from error
        if tuple(got) != tuple(expected):
            raise ShapeError(f"{where}: argument 'transform' expected a transform whose {what} "
                             f"has shape {tuple(expected)}, got {tuple(got)} from {name}")


def _probe_error(transform: Transform, weight: Tensor, where: str, label: str,
                 options: Mapping[str, Any], what: str, error: Exception) -> WeightcondError:
    """The typed error for a transform that fails on its probe: a callable option given by
    the user (a ``map``) is the first suspect; otherwise the transform (a user's class or
    object, or one that does not run on the layer's dtype or device)."""
    cause = f"{type(error).__name__}: {error}"
    given = [k for k, v in options.items() if callable(v)]
    if given:
        return ShapeError(f"{label}: argument '{given[0]}' expected a callable that returns a "
                          f"matrix of its input's shape (..., k, k) and dtype, got "
                          f"{options[given[0]]!r}, with which the transform's {what} fails "
                          f"({cause})")
    return LayerTypeError(f"{where}: argument 'transform' expected a transform that runs on "
                          f"the layer's {weight.dtype} weight on {weight.device.type}, got "
                          f"{type(transform).__name__}, whose {what} fails ({cause})")


def add_conditioner(conditioning: Conditioning, base: Tensor | OpaqueWeight,
                    conditioner: Conditioner) -> None:
    """Append ``conditioner`` to its stage, initialising a norm-tied transform from the norms
    of the matrix it conditions (``base`` is the ``(out, in)`` frozen weight, or a quantized
    layer's :class:`~weightcond.engine.frozen.OpaqueWeight`)."""
    stage = Stage(conditioner.placement)
    if conditioner.transform.norm_tied:
        conditioner.transform.initialize(conditioning.initial_norms(
            base, stage, Side(conditioner.side)))
    conditioning.stage(stage).append(conditioner)


@_REGISTERING
def _attach_conditioner(layer: nn.Module, conditioner: Conditioner,
                        adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Initialise (which may fail in user code) before touching the layer, then attach."""
    conditioning = _conditioning_for(layer, adapter_name)
    was_conditioned = is_conditioned(layer)
    was_present = was_conditioned and adapter_name in adapters_of(layer).adapters
    previous = adapters_of(layer).active if was_conditioned else None
    add_conditioner(conditioning, layer_kind(layer, "weightcond").frozen(layer), conditioner)
    try:
        install_conditioning(layer, adapter_name, conditioning)
    except Exception:
        del conditioning.stage(Stage(conditioner.placement))[-1]
        if not was_conditioned:
            if is_conditioned(layer):
                _strip(layer)
        else:
            if not was_present:
                del adapters_of(layer).adapters[adapter_name]
            adapters_of(layer).active = previous
        raise
    conditioner.transform._weightcond_attached = True


def attach_all(layer: nn.Module, update: LowRankUpdate | None, built: list[Conditioner],
               adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Attach ``update`` (if any), then the conditioners ``built``, to the adapter
    ``adapter_name``: all or nothing. When one fails (user code in a transform's
    ``initialize``), those attached before it are removed again and the layer is left as it
    was (its class, its tensors, its adapters and which one is active)."""
    was_conditioned = is_conditioned(layer)
    was_present = was_conditioned and adapter_name in adapters_of(layer).adapters
    previous_active = adapters_of(layer).active if was_conditioned else None
    previous_update = adapters_of(layer).adapters[adapter_name].update if was_present else None
    attached: list[Conditioner] = []
    try:
        if update is not None:
            _attach_update(layer, update, adapter_name)
        for conditioner in built:
            _attach_conditioner(layer, conditioner, adapter_name)
            attached.append(conditioner)
    except Exception:
        for conditioner in attached:
            conditioner.transform._weightcond_attached = False
        if not is_conditioned(layer):
            raise
        if not was_conditioned:
            _strip(layer)
            raise
        adapters = adapters_of(layer)
        if not was_present:
            if adapter_name in adapters.adapters:
                del adapters.adapters[adapter_name]
        else:
            conditioning = adapters.adapters[adapter_name]
            conditioning.update = previous_update
            for conditioner in attached:
                stage = conditioning.stage(Stage(conditioner.placement))
                del stage[next(i for i, c in enumerate(stage) if c is conditioner)]
        adapters.active = previous_active
        _drop_unused_bias(layer)
        raise


def register_conditioning(layer: nn.Module, *, placement: str = "pre", side: str = "left",
                          transform: str | type[Transform] | Transform,
                          condition_bias: bool = False, adapter_name: str = DEFAULT_ADAPTER,
                          **options: Any) -> Conditioner:
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
        layer: an :class:`torch.nn.Linear`, a transformers ``Conv1D`` or an
            :class:`torch.nn.Conv2d` (see :mod:`weightcond.reshape`).
        placement: ``"pre"`` or ``"post"``.
        side: ``"left"`` or ``"right"``.
        transform: a name in :data:`weightcond.TRANSFORMS`, a
            :class:`~weightcond.transforms.Transform` subclass (built with the side
            dimension and ``options``) or a Transform instance of the side dimension.
        condition_bias: also apply this (left) conditioner to the bias,
            :math:`b' = Q b` (the released SORA code does this).
        adapter_name: the adapter the conditioner belongs to; it becomes the layer's active
            adapter.
        **options: the transform's options (e.g. ``rank``, ``map`` for ``"skew"``). A real
            number must be representable in the layer's dtype (``eps <= 65504`` in float16).
            The transform runs once on a probe of the layer's dtype and device, so a
            callable it was given (a ``map``) that fails or returns another shape raises
            :class:`~weightcond.ShapeError` here, not in ``forward``.

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
    where = "register_conditioning"
    check_adapter_name(where, adapter_name)
    conditioner = build_conditioner(layer, where, placement=placement,
                                     side=side, transform=transform,
                                     condition_bias=condition_bias, options=options)
    _attach_conditioner(layer, conditioner, adapter_name)
    return conditioner


# -- inspecting ------------------------------------------------------------------------------------
def conditioners(layer: nn.Module, adapter_name: str | None = None) -> list[Conditioner]:
    """The conditioners of the adapter ``adapter_name`` (``None``: the active one) in
    composition order (pre stage, then post stage; each in registration order). Empty for an
    unconditioned layer or one without an active adapter."""
    if not is_conditioned(layer):
        return []
    conditioning = _named(adapters_of(layer), adapter_name, "conditioners")
    return [] if conditioning is None else conditioning.conditioners()


def get_update(layer: nn.Module, adapter_name: str | None = None) -> LowRankUpdate | None:
    """The low-rank update of the adapter ``adapter_name`` (``None``: the active one), or
    ``None``."""
    if not is_conditioned(layer):
        return None
    conditioning = _named(adapters_of(layer), adapter_name, "get_update")
    return None if conditioning is None else conditioning.update


def delta_weight(layer: nn.Module, adapter_name: str | None = None) -> Tensor:
    """The effective update :math:`W' - W` of the adapter ``adapter_name`` (``None``: the
    active one; zero when none is active) as a dense ``(out, in)`` matrix, in the layer
    kind's matrix view (the quantity whose singular-value entropy the paper studies)."""
    adapters = require_conditioned(layer, "delta_weight")
    conditioning = _named(adapters, adapter_name, "delta_weight")
    base = base_matrix(layer)
    if conditioning is None:
        return torch.zeros_like(base)
    return conditioning.dense_weight(base) - base


def explain(layer: nn.Module, *, tokens: int, input_grad: bool = True,
            adapter_name: str | None = None) -> Plan:
    """How ``layer`` computes its output for ``tokens`` input vectors: the
    :class:`~weightcond.engine.plan.Plan` of its adapter ``adapter_name`` (``None``: the active
    one), with each conditioner's chosen form and the predicted cost of every form
    (``print`` it). See Note (plan, then execute) in :mod:`weightcond.engine.plan`.

    Args:
        layer: a conditioned layer of a kind that runs matrix-free.
        tokens: the number of input vectors (batch × sequence), at least 1.
        input_grad: whether the input needs its gradient (a layer inside a model: ``True``;
            the first adapted layer, or inference: ``False``).
        adapter_name: the adapter to explain; ``None``: the active one.

    Raises:
        weightcond.StateError: the layer is not conditioned, has no such adapter active, or
            runs dense (``Conv2d``).
        weightcond.OptionError: ``tokens`` is not a positive int.

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(1024, 1024)
        >>> _ = wc.apply_preset(layer, "lora", rank=16)
        >>> _ = wc.register_conditioning(layer, placement="post", side="right",
        ...                              transform="householder", reflections=8)
        >>> plan = wc.explain(layer, tokens=2048, input_grad=False)
        >>> [form.value for form in plan.forms]
        ['fold']
    """
    adapters = require_conditioned(layer, "explain")
    tokens = check_int("explain", "tokens", tokens)
    check_bool("explain", "input_grad", input_grad)
    conditioning = _named(adapters, adapter_name, "explain")
    if conditioning is None:
        raise StateError("explain: argument 'layer' expected an active adapter (or "
                         "adapter_name), got a layer with none active")
    if not adapters.kind.matrix_free:
        raise StateError(f"explain: argument 'layer' expected a layer that runs matrix-free, "
                         f"got a {adapters.kind.name}, which runs on its dense conditioned "
                         f"weight")
    indexed = adapters.kind.projection is not None
    return plan(conditioning.layout(indexed, adapters.kind.opaque is not None), tokens,
                input_grad, adapters.kind.matrix_dtype(layer))


def conditioned_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every conditioned layer in ``module`` (``""`` for ``module``
    itself), in :meth:`torch.nn.Module.named_modules` order."""
    return [(name, m) for name, m in module.named_modules() if is_conditioned(m)]


@contextlib.contextmanager
def dense_forward(module: nn.Module) -> Iterator[None]:
    """Within the block, conditioned layers in ``module`` compute their output through the
    dense weight (``F.linear(x, layer.weight, layer.bias)`` for a Linear) instead of the
    matrix-free form (for verification). It acts on this thread only, as
    :class:`torch.no_grad` does: a forward on another thread runs matrix-free.

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
    with switched(module, "dense", True, where="dense_forward"):
        yield


@contextlib.contextmanager
def switched(module: nn.Module, flag: str, value: bool, *, where: str = "switched"
             ) -> Iterator[None]:
    """Set ``flag`` (``"enabled"`` or ``"dense"``) of every conditioned layer's
    :class:`Adapters` in ``module`` to ``value`` on this thread within the block, and restore
    the previous values after it (Decision (per-thread switches))."""
    require_module(module, where, "module")
    check_choice(where, "flag", flag, ("enabled", "dense"))
    previous = getattr(_SWITCHES, flag, None)
    found = [adapters_of(m) for _, m in conditioned_layers(module)]
    setattr(_SWITCHES, flag, {**(previous or {}), **dict.fromkeys(found, value)})
    try:
        yield
    finally:
        if previous is None:
            delattr(_SWITCHES, flag)
        else:
            setattr(_SWITCHES, flag, previous)


# -- merging and removing ------------------------------------------------------------------
def _strip(layer: nn.Module) -> None:
    """Remove the parametrizations (restoring the original tensors) and the forward class."""
    if parametrize.is_parametrized(layer, "bias"):
        parametrize.remove_parametrizations(layer, "bias", leave_parametrized=False)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    layer.__class__ = type(layer).__bases__[0]
    # parametrize re-registers the weight last; put the parameters back in their order
    # (parameters(), state_dict() and an optimizer's parameter groups follow it)
    order = layer.__dict__.pop("_weightcond_order", None)
    if order is not None:
        params = layer._parameters
        ordered = {k: params[k] for k in order if k in params}
        ordered.update({k: v for k, v in params.items() if k not in ordered})
        params.clear()
        params.update(ordered)


def _require_layers(module: nn.Module, where: str) -> list[nn.Module]:
    if not isinstance(module, nn.Module):
        raise LayerTypeError(f"{where}: argument 'module' expected an nn.Module, "
                             f"got {type(module).__name__}")
    layers = [m for _, m in conditioned_layers(module)]
    if not layers:
        raise StateError(f"{where}: argument 'module' expected a conditioned layer or a model "
                         f"containing one, got an unconditioned {type(module).__name__}")
    for layer in layers:
        _require_own_class(layer, where)
    return layers


def _require_adapter(layers: list[nn.Module], adapter_name: str | None, where: str) -> None:
    if adapter_name is None:
        return
    names = sorted({n for layer in layers for n in adapters_of(layer).adapters})
    if adapter_name not in names:
        raise UnknownNameError(f"{where}: argument 'adapter_name' expected one of "
                               f"{', '.join(map(repr, names))}, got {adapter_name!r}")


def _merge_layer(layer: nn.Module, adapter_name: str | None, requantize: bool) -> None:
    adapters = adapters_of(layer)
    kind = adapters.kind
    if adapter_name is None:
        conditioning = _named(adapters, None, "merge")
    else:  # a layer without the adapter keeps its base function (ModuleDict has no .get)
        conditioning = (adapters.adapters[adapter_name]  # noqa: SIM401
                        if adapter_name in adapters.adapters else None)
    base, bias = _base_weight(layer), _base_bias(layer)
    if conditioning is None and kind.opaque is not None:
        _strip(layer)  # the quantized layer as it was
        return
    with torch.no_grad():
        weight, new_bias = base, bias
        if conditioning is not None:
            matrix = kind.to_matrix(base)
            weight = kind.from_matrix(conditioning.dense_weight(matrix), base.shape)
            if bias is not None:
                new_bias = conditioning.conditioned_bias(bias, matrix)
        weight = weight.detach().clone().contiguous()
        new_bias = None if new_bias is None else new_bias.detach().clone()
    _strip(layer)
    if kind.requantize is not None and requantize:
        kind.requantize(layer, weight)
    else:
        if kind.opaque is not None:  # a float layer: the quantized class reads its storage
            layer.__class__ = nn.Linear
        layer.weight = nn.Parameter(weight, requires_grad=base.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(new_bias, requires_grad=bias.requires_grad)


def merge(module: nn.Module, *, adapter_name: str | None = None, requantize: bool = False
          ) -> nn.Module:
    r"""Bake the conditioning into every conditioned layer of ``module`` (or ``module``
    itself) and return it with plain layers.

    Each weight becomes :math:`W'` and each bias :math:`b'` of the adapter ``adapter_name``
    (``None``: each layer's active adapter; a layer without one keeps its base function) —
    new parameters; the original tensors are not modified. The parametrizations, the
    matrix-free forward and every other adapter are removed. The module computes the same
    function as before, now with one GEMM per layer (``merge`` bakes the adapter even inside
    :func:`weightcond.disabled`).

    A quantized layer (:mod:`weightcond.quantized`) becomes a float :class:`torch.nn.Linear`
    holding :math:`W'` computed from its dequantized weight, in the dtype it dequantizes to:
    exactly the function it computed (up to the rounding its own kernel adds, Decision
    (what is exact on a quantized base)). With ``requantize=True`` it stays of its quantized
    kind, :math:`W'` quantized with the layer's settings: one more rounding of the weight, of
    the size of the quantization step (4-bit NF4: blockwise, about 1/16 of each block's
    largest entry; 8-bit: 1/254 of each row's), so the merged layer's outputs differ from
    the conditioned layer's by that much. A layer without the adapter stays as it was.

    Raises:
        weightcond.StateError: nothing in ``module`` is conditioned.
        weightcond.UnknownNameError: no layer has an adapter ``adapter_name``.
    """
    layers = _require_layers(module, "merge")
    _require_adapter(layers, adapter_name, "merge")
    check_bool("merge", "requantize", requantize)
    for layer in layers:
        _merge_layer(layer, adapter_name, requantize)
    return module


def remove_conditioning(module: nn.Module, *, adapter_name: str | None = None) -> nn.Module:
    """Remove conditioning from every conditioned layer of ``module`` (or ``module`` itself)
    and return it.

    With ``adapter_name=None`` every adapter goes: each layer gets back its original weight
    and bias tensors (the very same objects, bit-exact) and its original class. With a name,
    only that adapter goes; a layer left without adapters is restored as above, and one whose
    active adapter was removed computes its base function until
    :func:`weightcond.set_adapter` chooses another.

    Raises:
        weightcond.StateError: nothing in ``module`` is conditioned.
        weightcond.UnknownNameError: no layer has an adapter ``adapter_name``.
    """
    layers = _require_layers(module, "remove_conditioning")
    _require_adapter(layers, adapter_name, "remove_conditioning")
    for layer in layers:
        adapters = adapters_of(layer)
        if adapter_name is None or set(adapters.adapters) == {adapter_name}:
            _strip(layer)
        elif adapter_name in adapters.adapters:
            del adapters.adapters[adapter_name]
            if adapters.active == adapter_name:
                adapters.active = None
            _drop_unused_bias(layer)
    return module


def _drop_unused_bias(layer: nn.Module) -> None:
    """Remove the bias parametrization when no adapter left conditions the bias (the layer
    gets back its bias tensor and its ``state_dict`` key ``bias``)."""
    if parametrize.is_parametrized(layer, "bias") and not any(
            c.condition_bias for a in adapters_of(layer).adapters.values()
            for c in a.conditioners()):
        parametrize.remove_parametrizations(layer, "bias", leave_parametrized=False)
