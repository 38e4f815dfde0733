"""Condition a whole model: targeting layers by name, freezing, reports, named adapters.

:func:`condition` is the model-level counterpart of :func:`weightcond.apply_preset`: it
finds the target layers, applies a preset (or a :class:`~weightcond.Preset` of your own) to
each, freezes every base parameter and says what it did. Targets are matched as in PEFT's
``target_modules``: a list of names matches a module whose name is one of them or ends with
``"." + name``; a single string is a regular expression that must match the whole name;
``"all-linear"`` takes every supported layer except embeddings and the model's output head.

Conditioning a transformers ``PreTrainedModel`` also guards its ``save_pretrained``
(:func:`weightcond.model.guard_save_pretrained`): transformers would write the model's
``state_dict`` keys (``…query.parametrizations.weight.original``,
``…adapters.default.update.A``), whose weights ``from_pretrained`` reports missing and
initialises randomly. A guarded model writes the merged weights instead, so
``from_pretrained`` computes what the model computes; inside
:func:`weightcond.model.adapter_checkpoints` (the Trainer's checkpoints, through
:class:`weightcond.AdapterCheckpointCallback`) it writes the adapter alone.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import os
import re
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .batching import batch_factors as _batch_factors
from .errors import (
    LayerTypeError,
    OptionError,
    StateError,
    UnknownNameError,
    check_bool,
)
from .layer import (
    DEFAULT_ADAPTER,
    adapters_of,
    check_adapter_name,
    conditioned_layers,
    is_conditioned,
    merge,
    remove_conditioning,
    require_module,
    switched,
)
from .presets import PRESETS, Preset, apply_preset
from .reshape import LAYER_KINDS, supported_kinds

__all__ = [
    "ConditionReport",
    "adapter_checkpoints",
    "adapter_names",
    "checkpoint_keys",
    "condition",
    "disabled",
    "guard_save_pretrained",
    "set_adapter",
]

Targets = str | Sequence[str]
ALL_LINEAR = "all-linear"
# heads PEFT's "all-linear" leaves alone besides get_output_embeddings()
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


@dataclass(frozen=True)
class ConditionReport:
    """What :func:`condition` did.

    Attributes:
        adapter_name: the adapter the layers were conditioned into.
        layers: each conditioned layer's name and the preset applied to it.
        trainable: the number of trainable parameters of the model afterwards.
        total: the number of parameters of the model (base and adapters).
    """

    adapter_name: str
    layers: Mapping[str, str]
    trainable: int
    total: int

    @property
    def share(self) -> float:
        """``trainable / total``."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # the line PEFT's print_trainable_parameters prints
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {100 * self.share:.4f} || conditioned layers: {len(self.layers)} "
                f"(adapter {self.adapter_name!r})")


def _model_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's named modules, without the model itself and without the modules weightcond
    keeps under a conditioned layer's ``parametrizations``."""
    return {n: m for n, m in model.named_modules()
            if n and "parametrizations" not in n.split(".")}


def _supported(module: nn.Module, all_linear: bool = False) -> bool:
    """Whether ``module`` is of a layer kind (one ``"all-linear"`` takes, with
    ``all_linear``)."""
    return any(kind.matches(module) and (kind.all_linear or not all_linear)
               for kind in LAYER_KINDS.values())


def _matches(pattern: str, name: str, *, suffix: bool) -> bool:
    if suffix:
        return name == pattern or name.endswith("." + pattern)
    return re.fullmatch(pattern, name) is not None


def _head_names(model: nn.Module, names: dict[nn.Module, str]) -> set[str]:
    heads = {n for n in names.values() if n.rsplit(".", 1)[-1] in _HEAD_NAMES}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        if head is not None and head in names:
            heads.add(names[head])
    return heads


def _select(model: nn.Module, targets: Targets | None, where: str, argument: str
            ) -> dict[str, set[str]]:
    """Module names matched by each pattern of ``targets`` (a name, regex or list)."""
    if targets is None:
        return {}
    modules = _model_modules(model)
    if not isinstance(targets, str):
        if not isinstance(targets, Iterable) or isinstance(targets, (bytes, Mapping)):
            raise OptionError(f"{where}: argument '{argument}' expected 'all-linear', a regular "
                              f"expression or a list of module names, got {targets!r}")
        targets = list(targets)  # once: a generator is read by the checks below
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            heads = _head_names(model, {m: n for n, m in modules.items()})
            return {ALL_LINEAR: {n for n, m in modules.items()
                                 if _supported(m, all_linear=True) and n not in heads}}
        try:
            re.compile(targets)
        except re.error as error:
            raise OptionError(f"{where}: argument '{argument}' expected a valid regular "
                              f"expression, got {targets!r} ({error})") from None
        return {targets: {n for n in modules if _matches(targets, n, suffix=False)}}
    if not all(isinstance(t, str) for t in targets):
        raise OptionError(f"{where}: argument '{argument}' expected 'all-linear', a regular "
                          f"expression or a list of module names, got {targets!r}")
    return {t: {n for n in modules if _matches(t, n, suffix=True)} for t in targets}


def _near(pattern: str, model: nn.Module) -> str:
    names = [n for n, m in _model_modules(model).items() if _supported(m)]
    candidates = sorted({part for n in names for part in (n, n.rsplit(".", 1)[-1])})
    near = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.5)
    if not near:
        near = sorted({n.rsplit(".", 1)[-1] for n in names})[:8]
    return ", ".join(map(repr, near)) if near else "(the model has no supported layers)"


def _resolve_targets(model: nn.Module, target_modules: Targets,
                     exclude_modules: Targets | None, where: str) -> list[str]:
    matched = {} if target_modules is None else _select(model, target_modules, where,
                                                        "target_modules")
    if not matched:  # None, or no names: nothing is targeted (not "all excluded")
        raise OptionError(f"{where}: argument 'target_modules' expected 'all-linear', a regular "
                          f"expression or a non-empty list of module names, "
                          f"got {target_modules!r}")
    for pattern, found in matched.items():
        if not found:
            raise UnknownNameError(f"{where}: argument 'target_modules': {pattern!r} matches no "
                                   f"module; near names: {_near(pattern, model)}")
    excluded = set().union(*_select(model, exclude_modules, where, "exclude_modules").values())
    modules = _model_modules(model)
    names = sorted(set().union(*matched.values()) - excluded, key=list(modules).index)
    unsupported = [n for n in names if not _supported(modules[n])]
    if unsupported:
        kinds = supported_kinds()
        raise LayerTypeError(
            f"{where}: argument 'target_modules' expected layers of a supported type ({kinds}), "
            f"got {', '.join(f'{n!r} ({type(modules[n]).__name__})' for n in unsupported[:5])}")
    if not names:
        raise UnknownNameError(f"{where}: every module matched by 'target_modules' is excluded "
                               f"by 'exclude_modules'")
    return names


def activate(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` active on every conditioned layer (``None`` on a layer without
    it: that layer computes its base function) and the only trainable parameters, and guard
    a transformers model's ``save_pretrained`` (:func:`guard_save_pretrained`): the one path
    of :func:`condition`, :func:`set_adapter`, :func:`weightcond.load_adapter` and
    :func:`weightcond.from_peft`."""
    trainable = set()
    for _, layer in conditioned_layers(model):
        adapters = adapters_of(layer)
        adapters.active = adapter_name if adapter_name in adapters.adapters else None
        if adapter_name in adapters.adapters:
            trainable.update(id(p) for p in adapters.adapters[adapter_name].parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    guard_save_pretrained(model)


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def condition(model: nn.Module, preset: str | Preset, *, target_modules: Targets,
              exclude_modules: Targets | None = None,
              overrides: Mapping[str, Mapping[str, Any]] | None = None,
              adapter_name: str = DEFAULT_ADAPTER, batch_factors: bool = True,
              **options: Any) -> ConditionReport:
    """Condition every target layer of ``model`` with a preset and freeze the rest.

    Each matched layer gets :func:`weightcond.apply_preset` with ``options`` (``rank``,
    ``alpha`` and the preset's own), into the adapter ``adapter_name``, which becomes the
    model's active adapter, as with :func:`set_adapter` (conditioned layers without it
    compute their base function). Afterwards only that adapter's parameters are trainable
    (unfreeze a classification head yourself if it should train).

    Args:
        model: any :class:`torch.nn.Module` (a transformers model, for instance).
        preset: a name in :data:`weightcond.PRESETS` or a :class:`~weightcond.Preset`.
        target_modules: a list of module names (a module matches when its name is one of
            them or ends with ``"." + name``), a regular expression matched against the whole
            name, or ``"all-linear"`` (every supported layer but the output head:
            ``get_output_embeddings()`` and modules named ``lm_head``, ``classifier``,
            ``score`` or ``qa_outputs``).
        exclude_modules: names or a regular expression, as ``target_modules``, to leave out.
        overrides: per-target changes, ``{pattern: {option: value}}``; a pattern matches a
            layer like a ``target_modules`` entry or as a whole-name regular expression; the
            special option ``"preset"`` swaps the preset for those layers (e.g.
            ``{"value": {"rank": 16}, "dense": {"preset": "dora"}}``). The last matching
            pattern wins for each option.
        adapter_name: the adapter to build (letters, digits, ``_``, ``-``).
        batch_factors: compute the thin factors of all the model's rotations (SORA's
            ``skew``) in one batched call per forward, :func:`weightcond.batch_factors`
            (``False``: remove that hook, each layer computes its own).
        **options: options for the preset on every layer.

    Returns:
        A :class:`ConditionReport`; ``print(report)`` gives PEFT's
        ``print_trainable_parameters`` line.

    Raises:
        weightcond.WeightcondError: nothing targeted, a pattern matching nothing (with near
            names), an unsupported layer type or weight, an unknown preset or option; the
            model is left exactly as it was (layers conditioned before the failure are
            restored).

    Saving: the conditioned model cannot be pickled whole (``torch.save(model)`` and
    ``pickle.dumps(model)`` raise :class:`~weightcond.StateError`, as parametrized modules
    do). Save ``model.state_dict()`` and load it into the model rebuilt and conditioned
    the same way, or save the adapter alone with :func:`weightcond.save_adapter` (read back
    by :func:`weightcond.load_adapter`); ``copy.deepcopy`` works. A transformers model's
    ``save_pretrained`` writes the merged weights, which ``from_pretrained`` reloads
    (:func:`weightcond.model.guard_save_pretrained`).

    Example:
        >>> import torch, weightcond as wc
        >>> model = torch.nn.Sequential()
        >>> model.add_module("query", torch.nn.Linear(16, 16))
        >>> model.add_module("value", torch.nn.Linear(16, 16))
        >>> report = wc.condition(model, "sora", target_modules=["query", "value"], rank=4,
        ...                       overrides={"value": {"rank": 2}})
        >>> dict(report.layers)
        {'query': 'sora', 'value': 'sora'}
        >>> wc.get_update(model.value).rank, wc.get_update(model.query).rank
        (2, 4)
        >>> print(report)  # doctest: +ELLIPSIS
        trainable params: ... || all params: ... || trainable%: ... || conditioned layers: 2 ...
    """
    where = "condition"
    check_adapter_name(where, adapter_name)
    check_bool(where, "batch_factors", batch_factors)
    if not isinstance(model, nn.Module):
        raise LayerTypeError(f"{where}: argument 'model' expected an nn.Module, "
                             f"got {type(model).__name__}")
    names = _resolve_targets(model, target_modules, exclude_modules, where)
    plan = _plan(names, preset, {} if overrides is None else overrides, options, where)
    modules = _model_modules(model)
    taken = [n for n in names if is_conditioned(modules[n])
             and adapter_name in adapters_of(modules[n]).adapters]
    if taken:
        raise StateError(f"{where}: argument 'adapter_name' expected a new adapter, got "
                         f"{adapter_name!r}, which {taken[0]!r} already has; pick another name "
                         f"or call weightcond.remove_conditioning(model, "
                         f"adapter_name={adapter_name!r})")
    before = {n: (adapters_of(modules[n]).active if is_conditioned(modules[n]) else None)
              for n in names}
    done: list[str] = []
    try:
        for name in names:
            layer_preset, layer_options = plan[name]
            apply_preset(modules[name], layer_preset, adapter_name=adapter_name,
                         **layer_options)
            done.append(name)
    except Exception as error:
        for name in done:  # put the model back as it was
            remove_conditioning(modules[name], adapter_name=adapter_name)
            if before[name] is not None:
                adapters_of(modules[name]).active = before[name]
        if hasattr(error, "add_note"):
            error.add_note(f"while conditioning module {names[len(done)]!r}")
        raise
    activate(model, adapter_name)
    _batch_factors(model, batch_factors)
    trainable, total = _count(model)
    layers = {n: (p.name if isinstance(p, Preset) else p) for n, (p, _) in plan.items()}
    return ConditionReport(adapter_name, layers, trainable, total)


def _plan(names: list[str], preset: str | Preset, overrides: Mapping[str, Mapping[str, Any]],
          options: Mapping[str, Any], where: str) -> dict[str, tuple[str | Preset, dict]]:
    """Each target's preset and options, after overrides; validates names up front."""
    if not isinstance(overrides, Mapping):
        raise OptionError(f"{where}: argument 'overrides' expected a mapping of pattern to a "
                          f"dict of options, got {overrides!r}")
    for pattern, change in overrides.items():
        if not isinstance(change, Mapping):
            raise OptionError(f"{where}: argument 'overrides' expected a mapping of pattern to "
                              f"a dict of options, got {change!r} for {pattern!r}")
    presets = [preset, *(o["preset"] for o in overrides.values() if "preset" in o)]
    for p in presets:
        if not isinstance(p, Preset):
            PRESETS.lookup(p, where, "preset")
    plan: dict[str, tuple[str | Preset, dict]] = {n: (preset, dict(options)) for n in names}
    for pattern, change in overrides.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise OptionError(f"{where}: argument 'overrides' expected names or regular "
                              f"expressions as keys, got {pattern!r} ({error})") from None
        hit = [n for n in names if _matches(pattern, n, suffix=True)
               or _matches(pattern, n, suffix=False)]
        if not hit:
            raise UnknownNameError(f"{where}: argument 'overrides': {pattern!r} matches none of "
                                   f"the targeted layers ({', '.join(map(repr, names[:8]))}"
                                   f"{', …' if len(names) > 8 else ''})")
        options = {k: v for k, v in change.items() if k != "preset"}
        for n in hit:
            layer_preset, layer_options = plan[n]
            plan[n] = (change.get("preset", layer_preset), {**layer_options, **options})
    return plan


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters in ``model``'s conditioned layers, sorted."""
    require_module(model, "adapter_names", "model")
    return sorted({n for _, layer in conditioned_layers(model)
                   for n in adapters_of(layer).adapters})


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of every conditioned layer of ``model`` and
    the only trainable one (as PEFT's ``set_adapter``).

    A conditioned layer without that adapter computes its base function while it is active.

    Example:
        >>> import torch, weightcond as wc
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = wc.condition(model, "lora", target_modules=["0"], adapter_name="a")
        >>> _ = wc.condition(model, "dora", target_modules=["0"], adapter_name="b")
        >>> wc.set_adapter(model, "a")
        >>> [c.transform.name for c in wc.conditioners(model[0])]
        []
    """
    require_module(model, "set_adapter", "model")
    names = adapter_names(model)
    if adapter_name not in names:
        raise UnknownNameError(f"set_adapter: argument 'adapter_name' expected one of "
                               f"{', '.join(map(repr, names)) or '(no adapters)'}, "
                               f"got {adapter_name!r}")
    activate(model, adapter_name)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, every conditioned layer of ``model`` computes its base function
    (its frozen weight and bias), as PEFT's ``disable_adapter()``.

    It acts on this thread only, as :class:`torch.no_grad` does: a forward of the same model
    on another thread still computes the conditioned function. Blocks nest; each restores
    what was in force before it.

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(8, 8)
        >>> base = layer(torch.ones(1, 8))
        >>> _ = wc.apply_preset(layer, "pre_diag", rank=2)
        >>> with torch.no_grad():
        ...     layer.parametrizations.weight[0].adapters["default"].pre[0].transform.scale += 1
        >>> with wc.disabled(layer):
        ...     torch.equal(layer(torch.ones(1, 8)), base)
        True
    """
    require_module(model, "disabled", "model")
    with switched(model, "enabled", False, where="disabled"):
        yield


# -- transformers' save_pretrained --------------------------------------------------------------
# Decision (guarding save_pretrained): transformers' save_pretrained writes model.state_dict()
# (or the state dict it is given). A conditioned layer's keys there are parametrize's
# (``…query.parametrizations.weight.original``, ``…adapters.default.update.A``), which
# from_pretrained does not know: it calls the layer's weight missing, initialises it randomly
# and carries on. A state_dict hook cannot tell save_pretrained from the callers that need
# those keys (load_state_dict into the model conditioned again, the Trainer's resume), and
# transformers offers no hook of its own; so guard_save_pretrained shadows the method on the
# instance (the class and every other model are untouched) with one that hands transformers'
# own save_pretrained the state dict it should write. Merged, as the one state from_pretrained
# rebuilds into the same function. An instance attribute rather than a swapped class, which
# config.architectures and type checks would see; holding the model by a weak reference, so
# that the model is freed (its accelerator memory with it) when its last reference goes, not
# at the next cyclic garbage collection; copy.deepcopy and pickle rebind it to the copy.
_CHECKPOINTING = "_weightcond_adapter_checkpoints"  # set by adapter_checkpoints


def _pretrained_model_class() -> type | None:
    """transformers' ``PreTrainedModel`` if its modeling code is loaded (no model is one
    otherwise, so transformers, seconds to import, is never imported here)."""
    return getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)


def _is_pretrained(model: Any) -> bool:
    cls = _pretrained_model_class()
    return cls is not None and isinstance(model, cls)


class _Guard:
    """``model.save_pretrained`` of a guarded model (Decision (guarding save_pretrained))."""

    __slots__ = ("model",)

    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _save_pretrained(self.model(), *args, **kwargs)  # type: ignore[arg-type]

    def __deepcopy__(self, memo: dict[int, Any]) -> _Guard:
        model = self.model()  # the model's copy is in memo before its __dict__ is copied
        return _Guard(memo.get(id(model), model))

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return _Guard, (self.model(),)


def _is_guarded(model: nn.Module) -> bool:
    guard = model.__dict__.get("save_pretrained")
    return isinstance(guard, _Guard) and guard.model() is model


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write what ``from_pretrained`` reloads, while ``model``
    (a transformers ``PreTrainedModel``; other modules are left alone) has conditioned layers.

    transformers' ``save_pretrained`` writes ``model.state_dict()``, whose keys for a
    conditioned layer are parametrize's; ``from_pretrained`` would call those weights missing
    and initialise them randomly. Guarded, ``model.save_pretrained(folder)`` (and so
    ``Trainer.save_model`` and ``push_to_hub``) writes for each conditioned layer the weight
    and bias :func:`weightcond.merge` would bake in (:math:`W'`, and :math:`b'` where a
    conditioner conditions the bias) under the layer's plain keys (``…query.weight``),
    computed on a copy of the layer: the model stays conditioned and trainable. Everything
    else is transformers' own. ``AutoModel….from_pretrained(folder)`` then loads a plain model,
    with no missing or unexpected keys, whose tensors are those of
    ``weightcond.merge(copy.deepcopy(model))`` bit for bit. Only the active adapter is merged;
    save the others with :func:`weightcond.save_adapter`. A ``state_dict`` passed to
    ``save_pretrained`` (the Trainer passes one under DeepSpeed) is merged the same way, from
    its own tensors. Inside :func:`weightcond.model.adapter_checkpoints`, ``save_pretrained``
    writes an adapter checkpoint instead; once no layer is conditioned (after
    :func:`weightcond.merge`), it is transformers' own again. ``distributed_checkpoint=True``
    is passed through: it writes the model's own state, to resume training, not for
    ``from_pretrained``.

    :func:`weightcond.condition` and :func:`weightcond.set_adapter` guard the model they are
    given, and :class:`weightcond.AdapterCheckpointCallback` the model it trains; call this
    on a model whose layers were conditioned by other means. Calling it again does nothing.

    ``save_pretrained`` of a guarded model raises :class:`~weightcond.StateError`, before it
    writes anything, where a conditioned layer's weight is tied to another
    (``tie_word_embeddings``: ``from_pretrained`` would tie the merged weight back to it),
    where a ``state_dict`` argument lacks a tensor of a conditioned layer, and where a
    layer's class was swapped after conditioning (``fully_shard``, as
    :func:`weightcond.merge` does).

    Example:
        >>> import tempfile, torch, transformers, weightcond as wc
        >>> config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
        ...                                  num_attention_heads=2, intermediate_size=64,
        ...                                  vocab_size=100)
        >>> model = transformers.BertModel(config).eval()
        >>> _ = wc.condition(model, "dora", target_modules=["query", "value"])
        >>> folder = tempfile.mkdtemp()
        >>> model.save_pretrained(folder)
        >>> reloaded = transformers.BertModel.from_pretrained(folder).eval()
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> torch.allclose(reloaded(ids).last_hidden_state, model(ids).last_hidden_state,
        ...                atol=1e-6)
        True
    """
    require_module(model, "guard_save_pretrained", "model")
    if _is_pretrained(model) and not _is_guarded(model):
        model.__dict__["save_pretrained"] = _Guard(model)


def _save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str], *args: Any,
                     **kwargs: Any) -> Any:
    """``save_pretrained`` of a guarded model (:func:`guard_save_pretrained`)."""
    save = type(model).save_pretrained
    signature = inspect.signature(save)
    bound = signature.bind(model, save_directory, *args, **kwargs)
    arguments = bound.arguments
    if not conditioned_layers(model) or arguments.get("distributed_checkpoint"):
        return save(*bound.args, **bound.kwargs)
    given = arguments.get("state_dict")
    if model.__dict__.get(_CHECKPOINTING, False):
        arguments["state_dict"] = _checkpoint_state(model, given)
        # the checkpoint is read back by load_state_dict into this model, not by
        # from_pretrained: keep the model's own keys (no renaming to a legacy layout)
        if "save_original_format" in signature.parameters:
            arguments["save_original_format"] = False
    else:
        arguments["state_dict"] = _merged_state(model, given)
    return save(*bound.args, **bound.kwargs)


def _require_untied(model: nn.Module, where: str) -> None:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    partner = {**{v: k for k, v in tied.items()}, **tied}
    for name, _ in conditioned_layers(model):
        other = partner.get(f"{name}.weight")
        if isinstance(other, str):
            raise StateError(
                f"{where}: argument 'model' expected conditioned layers whose weight "
                f"transformers does not tie, got {name!r}, whose weight is tied to {other!r} "
                f"(tie_word_embeddings): from_pretrained would tie the merged weight back to "
                f"it. Build the model with tie_word_embeddings=False before conditioning, "
                f"leave {name!r} out of target_modules, or save the adapter alone with "
                f"weightcond.save_adapter")


def _pick(given: Mapping[str, Any], keys: Iterable[str], *, prefix: str, what: str,
          where: str) -> dict[str, Any]:
    """``{key: given[prefix + key]}`` for ``keys``; a missing one is a typed error."""
    missing = [prefix + k for k in keys if prefix + k not in given]
    if missing:
        raise StateError(f"{where}: argument 'state_dict' expected every tensor of {what}, "
                         f"got none for {missing[0]!r}; pass the model's full state_dict, or "
                         f"none")
    return {k: given[prefix + k] for k in keys}


def _merged_state(model: nn.Module, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model``'s state dict (or ``given``) with each conditioned layer's entries replaced by
    the weight and bias :func:`~weightcond.merge` bakes in, computed on a copy of the layer.

    One layer at a time, on the layer's device (the bits :func:`~weightcond.merge` computes
    there); each result moves to the CPU, where safetensors writes from, so a save needs one
    layer's copy of accelerator memory, not a second model.
    """
    where = "save_pretrained"
    _require_untied(model, where)
    state = dict(model.state_dict() if given is None else given)
    for name, layer in conditioned_layers(model):
        keys = list(layer.state_dict())
        replica = copy.deepcopy(layer)
        if given is not None:
            replica.load_state_dict(_pick(given, keys, prefix=f"{name}.", where=where,
                                          what=f"the conditioned layer {name!r}"), assign=True)
        merged = merge(replica).state_dict()
        del replica
        for key in keys:
            state.pop(f"{name}.{key}", None)
        state.update((f"{name}.{key}", value if value.is_meta else value.cpu())
                     for key, value in merged.items())
    return state


def checkpoint_keys(model: nn.Module) -> list[str]:
    """The keys of ``model.state_dict()`` an adapter checkpoint holds: every tensor of every
    adapter of its conditioned layers, and every other parameter that requires a gradient (a
    task head you unfroze), in ``state_dict`` order."""
    require_module(model, "checkpoint_keys", "model")
    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    for _, layer in conditioned_layers(model):
        adapters = adapters_of(layer)
        wanted.update(id(t) for t in (*adapters.parameters(), *adapters.buffers()))
    return [k for k, v in model.state_dict(keep_vars=True).items() if id(v) in wanted]


def _checkpoint_state(model: nn.Module, given: Mapping[str, Any] | None) -> dict[str, Any]:
    keys = checkpoint_keys(model)
    state = model.state_dict() if given is None else given
    return _pick(state, keys, prefix="", what="the adapter checkpoint",
                 where="save_pretrained")


class _AdapterCheckpoints:
    """The context manager :func:`adapter_checkpoints` returns (re-entrant: each exit
    restores what its entry found)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._previous: list[bool] = []

    def __enter__(self) -> None:
        self._previous.append(self.model.__dict__.get(_CHECKPOINTING, False))
        self.model.__dict__[_CHECKPOINTING] = True

    def __exit__(self, *exc: object) -> None:
        if not self._previous.pop():
            self.model.__dict__.pop(_CHECKPOINTING, None)


def adapter_checkpoints(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``model.save_pretrained(folder)`` writes an adapter checkpoint: the
    tensors :func:`weightcond.model.checkpoint_keys` names (every adapter's, and every other
    trainable parameter's), under the model's own ``state_dict`` keys, and the configuration.

    That is the checkpoint a ``transformers.Trainer`` resumes from exactly: for a model that
    is not PEFT's, ``trainer.train(resume_from_checkpoint=...)`` and
    ``load_best_model_at_end`` read the checkpoint's ``model.safetensors`` with
    ``model.load_state_dict(..., strict=False)``, which copies these tensors in place into
    the model, built and conditioned the same way; its frozen base stays as loaded.
    :class:`weightcond.AdapterCheckpointCallback` enters this block where the Trainer saves
    its checkpoints. The model is checked, and guarded
    (:func:`weightcond.model.guard_save_pretrained`), when this is called; the block can be
    entered again.

    Raises:
        weightcond.LayerTypeError: ``model`` is not a transformers ``PreTrainedModel``.
        weightcond.StateError: ``model`` has no conditioned layers.
    """
    where = "adapter_checkpoints"
    require_module(model, where, "model")
    if not _is_pretrained(model):
        raise LayerTypeError(f"{where}: argument 'model' expected a transformers "
                             f"PreTrainedModel (whose save_pretrained the Trainer calls), got "
                             f"{type(model).__name__}")
    if not conditioned_layers(model):
        raise StateError(f"{where}: argument 'model' expected a model with conditioned "
                         f"layers, got an unconditioned {type(model).__name__}; call "
                         f"weightcond.condition first")
    guard_save_pretrained(model)
    return _AdapterCheckpoints(model)
