"""Condition a whole model: targeting layers by name, freezing, reports, named adapters.

:func:`condition` is the model-level counterpart of :func:`weightcond.apply_preset`: it
finds the target layers, applies a preset (or a :class:`~weightcond.Preset` of your own) to
each, freezes every base parameter and says what it did. Targets are matched as in PEFT's
``target_modules``: a list of names matches a module whose name is one of them or ends with
``"." + name``; a single string is a regular expression that must match the whole name;
``"all-linear"`` takes every supported layer except the model's output head.
"""

from __future__ import annotations

import contextlib
import difflib
import re
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
    _adapters,
    check_adapter_name,
    conditioned_layers,
    is_conditioned,
    remove_conditioning,
    require_module,
    switched,
)
from .presets import PRESETS, Preset, apply_preset
from .reshape import LAYER_KINDS

__all__ = [
    "ConditionReport",
    "adapter_names",
    "condition",
    "disabled",
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


def _supported(module: nn.Module) -> bool:
    return any(kind.matches(module) for kind in LAYER_KINDS)


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
                                 if _supported(m) and n not in heads}}
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
        kinds = ", ".join(kind.name for kind in LAYER_KINDS)
        raise LayerTypeError(
            f"{where}: argument 'target_modules' expected layers of a supported type ({kinds}), "
            f"got {', '.join(f'{n!r} ({type(modules[n]).__name__})' for n in unsupported[:5])}")
    if not names:
        raise UnknownNameError(f"{where}: every module matched by 'target_modules' is excluded "
                               f"by 'exclude_modules'")
    return names


def _activate(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` active on every conditioned layer (``None`` on a layer without
    it: that layer computes its base function) and the only trainable parameters."""
    trainable = set()
    for _, layer in conditioned_layers(model):
        adapters = _adapters(layer)
        adapters.active = adapter_name if adapter_name in adapters.adapters else None
        if adapter_name in adapters.adapters:
            trainable.update(id(p) for p in adapters.adapters[adapter_name].parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


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
    by :func:`weightcond.load_adapter`); ``copy.deepcopy`` works.

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
             and adapter_name in _adapters(modules[n]).adapters]
    if taken:
        raise StateError(f"{where}: argument 'adapter_name' expected a new adapter, got "
                         f"{adapter_name!r}, which {taken[0]!r} already has; pick another name "
                         f"or call weightcond.remove_conditioning(model, "
                         f"adapter_name={adapter_name!r})")
    before = {n: (_adapters(modules[n]).active if is_conditioned(modules[n]) else None)
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
                _adapters(modules[name]).active = before[name]
        if hasattr(error, "add_note"):
            error.add_note(f"while conditioning module {names[len(done)]!r}")
        raise
    _activate(model, adapter_name)
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
                   for n in _adapters(layer).adapters})


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
    _activate(model, adapter_name)


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
