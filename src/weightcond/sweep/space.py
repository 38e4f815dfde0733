"""Variants and spaces: what a sweep trains, validated once into immutable recipes.

A :class:`Variant` is a preset with options, or an explicit stack (an update and a list of
conditioners, each what :func:`weightcond.register_conditioning` takes: placement, side,
transform, options), plus the schedule fields it changes (``steps``, ``batch_size``,
``lr``, ``rank``, ``alpha``). A :class:`Space` is a list of variants with distinct names,
read from a built-in name (:data:`~weightcond.sweep.space.SPACES`) or a TOML or JSON
file, where any field given as a list is an axis of a Cartesian product
(:func:`~weightcond.sweep.parse_space`).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compare import HEAD_ONLY, TARGET_SHAPES, Schedule, check_preset, preset_options
from ..errors import OptionError, UnknownNameError, WeightcondError
from ..placement import Side, Stage
from ..presets import PRESETS, ConditionerSpec, Option, Preset
from ..transforms import TRANSFORMS

__all__ = ["SCHEDULE_FIELDS", "SPACES", "Space", "Variant", "load_space", "parse_space",
           "resolved_options"]

#: The schedule fields a variant may change (:class:`weightcond.compare.Schedule`); the data
#: fields (``max_length``, ``train_size``, ``eval_size``) are the sweep's, for every variant.
SCHEDULE_FIELDS = ("steps", "batch_size", "lr", "rank", "alpha")
_FOLDER = Path(__file__).with_name("spaces")
#: The built-in spaces, each name with the TOML file shipped with the package.
SPACES: Mapping[str, Path] = {p.stem: p for p in sorted(_FOLDER.glob("*.toml"))}
_PRESET_FIELDS = ("name", "preset", "options", *SCHEDULE_FIELDS)
_STACK_FIELDS = ("name", "update", "conditioners", "condition_bias", *SCHEDULE_FIELDS)
_CONDITIONER_FIELDS = ("placement", "side", "transform", "options")


def resolved_options(transform: str, side: str, options: Mapping[str, Any]
                     ) -> dict[str, Any]:
    """Every option of a registered transform with the value it takes on the layers a sweep
    conditions: ``options`` as given, the others at their defaults, read back from the
    transform built on each side dimension of MiniLM's target layers (``TARGET_SHAPES``).
    A default that follows the dimension (``rank=None`` of ``skew`` is ``min(4, n)``,
    ``rounds=None`` of ``givens`` is :math:`\\lceil\\log_2 n\\rceil`) is its value, or
    ``{"<n>": value, ...}`` per dimension where the dimensions give different values.

    A recipe is then what ran, not what was written, and it changes when a default of the
    library changes, so a study refuses to mix the two under one name.

    Raises:
        WeightcondError: an unknown transform or option, or a value the transform refuses
            on one of the dimensions.

    Example:
        >>> from weightcond.sweep.space import resolved_options
        >>> resolved_options("givens", "left", {})
        {'rounds': {'384': 9, '1536': 11}}
    """
    key = (transform, side, json.dumps(dict(options), sort_keys=True, default=repr))
    if key not in _RESOLVED:
        cls = TRANSFORMS.lookup(transform, "resolved_options", "transform")
        names = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[2:]
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise UnknownNameError(
                f"{transform}: unknown option {', '.join(map(repr, unknown))}; expected "
                f"{'one of ' + ', '.join(map(repr, names)) if names else 'none'}")
        dims = sorted({out if side == Side.LEFT.value else in_
                       for out, in_ in TARGET_SHAPES})
        per_dim: dict[str, dict[str, Any]] = {}
        with torch.random.fork_rng(devices=[]):  # a transform may draw initial values
            for dim in dims:
                built = cls(dim, **options)
                per_dim[str(dim)] = {
                    n: _plain(getattr(built, n, options.get(n, _default(cls, n))))
                    for n in names}
        out: dict[str, Any] = {}
        for n in names:
            values = {d: v[n] for d, v in per_dim.items()}
            first = next(iter(values.values()))
            out[n] = first if all(v == first for v in values.values()) else values
        _RESOLVED[key] = out
    return json.loads(json.dumps(_RESOLVED[key]))  # a fresh copy


_RESOLVED: dict[tuple[str, str, str], dict[str, Any]] = {}


def _default(cls: type, name: str) -> Any:
    return inspect.signature(cls.__init__).parameters[name].default


def _plain(value: Any) -> Any:
    """A JSON value: a callable option (a map given as a function) by its name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__qualname__", repr(value))


@dataclass(frozen=True)
class Variant:
    """One point a sweep trains once per seed: a preset with options, or an explicit stack.

    Attributes:
        name: the variant's name in results (distinct within a space and a study).
        preset: a name in :data:`weightcond.PRESETS` or ``"head"`` (the head alone);
            ``None`` for an explicit stack.
        options: the preset's options (not ``rank``/``alpha``: see ``overrides``).
        update: whether the stack has the update :math:`\\Delta W = s\\,BA`.
        conditioners: the stack's conditioners, in registration order.
        condition_bias: the stack's left conditioners also condition the bias.
        overrides: the schedule fields this variant changes
            (:data:`~weightcond.sweep.space.SCHEDULE_FIELDS`).
        source: where it was written (a file and the position of its entry), for
            messages; not part of the variant.
    """

    name: str
    preset: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    update: bool = True
    conditioners: tuple[ConditionerSpec, ...] = ()
    condition_bias: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False, repr=False)

    def schedule(self, base: Schedule) -> Schedule:
        """The schedule this variant trains with: ``base`` with the variant's overrides."""
        return dataclasses.replace(base, **self.overrides)

    def target(self) -> tuple[str | Preset, dict[str, Any]]:
        """What :func:`weightcond.compare.train_run` applies: a preset name (or ``"head"``)
        and its options, or, for a stack, an unregistered :class:`~weightcond.Preset`."""
        if self.preset is not None:
            return self.preset, dict(self.options)
        stack = Preset(name=self.name, formula="explicit stack", update=self.update,
                       conditioners=self.conditioners)
        options = {"condition_bias": True} if self.condition_bias else {}
        return stack, options

    def recipe(self, base: Schedule) -> dict[str, Any]:
        """The full recipe, stored with every result: the preset (or ``None``), every option
        with its default, the update's ``rank`` and ``alpha`` (or ``None``), each conditioner
        with every option of its transform resolved (:func:`resolved_options`),
        ``condition_bias``, and ``steps``, ``batch_size``, ``lr``."""
        schedule = self.schedule(base)
        out: dict[str, Any] = {"name": self.name, "preset": self.preset}
        if self.preset == HEAD_ONLY:
            out.update(options={}, update=None, conditioners=[], condition_bias=False)
        else:
            target, options = self.target()
            entry = target if isinstance(target, Preset) else PRESETS[target]
            values = {**entry.options(), **preset_options(target, options, schedule)}
            out["options"] = {k: v for k, v in values.items()
                              if k not in ("rank", "alpha", "condition_bias")} \
                if self.preset is not None else {}
            out["update"] = ({"rank": values["rank"], "alpha": values["alpha"]}
                             if entry.update else None)
            out["conditioners"] = [
                {"placement": c.placement, "side": c.side, "transform": c.transform,
                 "options": resolved_options(c.transform, c.side, {
                     k: values[v.name] if isinstance(v, Option) else v
                     for k, v in c.options.items()})}
                for c in entry.conditioners]
            out["condition_bias"] = bool(values.get("condition_bias", False))
        out.update(steps=schedule.steps, batch_size=schedule.batch_size, lr=schedule.lr)
        return json.loads(json.dumps(out))  # what a storage gives back: plain JSON values

    def check(self, base: Schedule, where: str) -> None:
        """Validate the variant under ``base`` without loading anything: its schedule, and
        its preset or stack applied to stand-in layers of the shapes it will condition.

        Raises:
            WeightcondError: the first problem, with the variant's name and where it was
                written (its entry in the file and, for a stack, the conditioner).
        """
        if self.source:
            where = self.source + ("" if f"({self.name!r})" in self.source
                                   else f" = {self.name!r}")
        else:
            where = f"{where}: variant {self.name!r}"
        schedule = self.schedule(base).check(where)
        if self.preset == HEAD_ONLY:
            return
        for i, c in enumerate(self.conditioners, 1):  # a stack: say which conditioner
            try:
                resolved_options(c.transform, c.side, c.options)
            except WeightcondError as error:
                raise type(error)(f"{where}: conditioner {i} ({c.placement} {c.side} "
                                  f"{c.transform}): field 'options': {error}") from None
        target, options = self.target()
        try:
            check_preset(target, options, schedule)
        except WeightcondError as error:  # say which variant it came from
            raise type(error)(f"{where}: {error}") from None


@dataclass(frozen=True)
class Space:
    """A list of variants with distinct names.

    Attributes:
        name: the built-in name, or the file's name without its suffix.
        variants: the variants, in the order they are enqueued (for each seed).
        description: a line saying what the space asks.
    """

    name: str
    variants: tuple[Variant, ...]
    description: str = ""

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise OptionError(f"space {self.name!r}: expected distinct variant names, got "
                              f"{', '.join(map(repr, repeated))} more than once (give each "
                              f"variant a 'name', with placeholders such as {{transform}} for "
                              f"a product)")
        if not self.variants:
            raise OptionError(f"space {self.name!r}: expected at least one variant, got none")

    def __getitem__(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise UnknownNameError(f"space {self.name!r}: unknown variant {name!r}; expected one "
                               f"of {', '.join(repr(v.name) for v in self.variants)}")

    def names(self) -> list[str]:
        """The variants' names, in order."""
        return [v.name for v in self.variants]

    def check(self, base: Schedule) -> Space:
        """:meth:`Variant.check` of every variant; return the space."""
        for v in self.variants:
            v.check(base, f"space {self.name!r}")
        return self


def load_space(space: str | Path) -> Space:
    """A built-in space by name (:data:`~weightcond.sweep.space.SPACES`: ``paper``,
    ``rotations``, ``placements``) or a TOML (``.toml``) or JSON file.

    Raises:
        OptionError: an unknown name, an unreadable or malformed file, or a bad variant (the
            message names the variant and the field).
    """
    path = SPACES.get(space) if isinstance(space, str) else None
    if path is None:
        path = Path(space)
        if not path.is_file():
            raise UnknownNameError(
                f"sweep: argument 'space' expected one of {', '.join(map(repr, SPACES))} or a "
                f"TOML or JSON file, got {str(space)!r}"
                + (", which does not exist" if not path.exists() else ", which is not a file"))
    where = f"space file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise OptionError(f"{where}: cannot be read: {error}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise OptionError(f"{where}: invalid JSON: {error}") from None
    elif path.suffix == ".toml":
        toml = _toml()
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as error:
            raise OptionError(f"{where}: invalid TOML: {error}") from None
    else:
        raise OptionError(f"{where}: expected a '.toml' or '.json' file, got the suffix "
                          f"{path.suffix!r}")
    name = path.stem if path.parent != _FOLDER else str(space)
    return parse_space(data, name=name, where=where)


def _toml() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the sweep extra installs tomli
        import tomli as tomllib
    return tomllib


def parse_space(data: Any, *, name: str = "space", where: str = "space") -> Space:
    """Read a space from parsed TOML or JSON: ``{"variants": [...], "description": ...}``
    (or the list of variants alone).

    Each variant is a table with either ``preset`` (a name in :data:`weightcond.PRESETS` or
    ``"head"``) and ``options``, or ``conditioners`` (a list of tables with ``placement``,
    ``side``, ``transform``, ``options``), ``update`` (default ``true``) and
    ``condition_bias``; both may set ``name`` and the schedule fields ``steps``,
    ``batch_size``, ``lr``, ``rank``, ``alpha``. A list where a single value is expected is
    an axis: the variant stands for the Cartesian product of its axes (in the order they
    appear), and its ``name`` may name the axes' values with ``{placeholders}``: a field
    (``{lr}``), an option (``{map}``), a conditioner's field (``{transform}``; with several
    conditioners ``{conditioners[1][transform]}``). Without a name, a preset variant is
    called ``preset:option=value,...`` (as ``weightcond compare`` names specs) and a stack
    ``placement_side_transform+...``.

    Raises:
        OptionError: a malformed space; the message names the variant (by position and name)
            and the field.
    """
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"variants", "description"})
        if unknown:
            raise UnknownNameError(f"{where}: unknown top-level field "
                                   f"{', '.join(map(repr, unknown))}; expected 'variants' and "
                                   f"'description'")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise OptionError(f"{where}: field 'description' expected a string, got "
                              f"{description!r}")
        raw = data.get("variants")
    else:
        description, raw = "", data
    if not isinstance(raw, list) or not raw:
        raise OptionError(f"{where}: field 'variants' expected a non-empty list of tables, got "
                          f"{raw!r}")
    variants: list[Variant] = []
    for index, entry in enumerate(raw, 1):
        variants.extend(_expand(entry, f"{where}: variant {index}"))
    try:
        return Space(name, tuple(variants), description)
    except OptionError as error:
        raise OptionError(f"{where}: {str(error).split(': ', 1)[1]}") from None


def _expand(entry: Any, where: str) -> list[Variant]:
    if not isinstance(entry, Mapping):
        raise OptionError(f"{where}: expected a table, got {entry!r}")
    if isinstance(entry.get("name"), str):
        where = f"{where} ({entry['name']!r})"
    if ("preset" in entry) == ("conditioners" in entry):
        raise OptionError(f"{where}: expected either 'preset' or 'conditioners' (an explicit "
                          f"stack), got {'both' if 'preset' in entry else 'neither'}")
    allowed = _PRESET_FIELDS if "preset" in entry else _STACK_FIELDS
    _unknown(entry, allowed, where, "field")
    if "conditioners" in entry:
        conditioners = entry["conditioners"]
        if not isinstance(conditioners, list) or not all(
                isinstance(c, Mapping) for c in conditioners):
            raise OptionError(f"{where}: field 'conditioners' expected a list of tables, got "
                              f"{conditioners!r}")
        for i, c in enumerate(conditioners, 1):
            _unknown(c, _CONDITIONER_FIELDS, f"{where}: conditioner {i}", "field")
            if "condition_bias" in c:
                raise OptionError(f"{where}: conditioner {i}: field 'condition_bias' belongs to "
                                  f"the variant (it applies to every left conditioner, as in "
                                  f"presets)")
            for key in ("placement", "side", "transform"):
                if key not in c:
                    raise OptionError(f"{where}: conditioner {i}: field {key!r} is missing")
    axes = list(_axes(entry, (), where))
    out = []
    for values in itertools.product(*(v for _, v in axes)):
        concrete = _assign(entry, {path: value for (path, _), value in zip(axes, values)})
        out.append(_variant(concrete, where, product=len(axes) > 0))
    return out


def _unknown(table: Mapping[str, Any], allowed: Sequence[str], where: str, what: str) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise UnknownNameError(f"{where}: unknown {what} {', '.join(map(repr, unknown))}; "
                               f"expected one of {', '.join(map(repr, allowed))}")


def _axes(value: Any, path: tuple[Any, ...], where: str):
    """``(path, values)`` of every list that stands for an axis (not ``conditioners``)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise OptionError(f"{where}: expected string keys, got {k!r}")
            yield from _axes(v, (*path, k), where)
    elif isinstance(value, list) and path == ("conditioners",):
        for i, c in enumerate(value):
            yield from _axes(c, (*path, i), where)
    elif isinstance(value, list):
        if not value:
            raise OptionError(f"{where}: field {_field(path)!r} expected a value or a "
                              f"non-empty list of values (an axis), got []")
        if path == ("name",):
            raise OptionError(f"{where}: field 'name' expected a string (with placeholders "
                              f"for a product), got a list")
        if any(isinstance(v, (list, Mapping)) for v in value):
            raise OptionError(f"{where}: field {_field(path)!r} expected a list of plain "
                              f"values (an axis), got {value!r}")
        yield path, value


def _field(path: tuple[Any, ...]) -> str:
    if path[:1] == ("conditioners",) and len(path) > 2:
        return f"conditioners[{path[1] + 1}].{'.'.join(map(str, path[2:]))}"
    return ".".join(map(str, path))


def _assign(entry: Mapping[str, Any], choice: dict[tuple[Any, ...], Any]) -> dict[str, Any]:
    def walk(value: Any, path: tuple[Any, ...]) -> Any:
        if path in choice:
            return choice[path]
        if isinstance(value, Mapping):
            return {k: walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        return value

    return walk(entry, ())


def _variant(entry: dict[str, Any], where: str, *, product: bool) -> Variant:
    overrides = {k: entry[k] for k in SCHEDULE_FIELDS if k in entry}
    for k, v in overrides.items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (k in ("steps", "batch_size", "rank") and not isinstance(v, int)):
            raise OptionError(f"{where}: field {k!r} expected "
                              f"{'an int' if k in ('steps', 'batch_size', 'rank') else 'a number'}"
                              f", got {v!r}")
    if "preset" in entry:
        preset = entry["preset"]
        if preset != HEAD_ONLY:
            try:
                PRESETS.lookup(preset, where, "preset")
            except UnknownNameError as error:
                raise UnknownNameError(str(error).replace("argument 'preset'",
                                                          "field 'preset'")) from None
        options = _options(entry.get("options", {}), where, "options")
        if preset == HEAD_ONLY and (options or {"rank", "alpha"} & set(overrides)):
            raise OptionError(f"{where}: the {HEAD_ONLY!r} baseline takes no options, rank or "
                              f"alpha, got {entry!r}")
        taken = sorted({"rank", "alpha"} & set(options))
        if taken:
            raise OptionError(f"{where}: field 'options' has {', '.join(map(repr, taken))}: set "
                              f"the variant's own field instead ({taken[0]} = ...)")
        default = preset + (":" + ",".join(f"{k}={_text(v)}" for k, v in
                                           {**options, **overrides}.items())
                            if options or overrides else "")
        variant = Variant(name="", preset=preset, options=options, overrides=overrides)
        context = {"preset": preset, **options, **overrides}
    else:
        update = entry.get("update", True)
        bias = entry.get("condition_bias", False)
        for key, value in (("update", update), ("condition_bias", bias)):
            if not isinstance(value, bool):
                raise OptionError(f"{where}: field {key!r} expected true or false, got "
                                  f"{value!r}")
        specs = []
        for i, c in enumerate(entry["conditioners"], 1):
            here = f"{where}: conditioner {i}"
            for key, choices in (("placement", [s.value for s in Stage]),
                                 ("side", [s.value for s in Side]),
                                 ("transform", list(TRANSFORMS))):
                if c[key] not in choices:
                    raise UnknownNameError(f"{here}: field {key!r} expected one of "
                                           f"{', '.join(map(repr, choices))}, got {c[key]!r}")
            specs.append(ConditionerSpec(c["placement"], c["side"], c["transform"],
                                         _options(c.get("options", {}), here, "options")))
        if not update and not specs:
            raise OptionError(f"{where}: expected 'update = true' or at least one conditioner "
                              f"(use preset = {HEAD_ONLY!r} for the head alone)")
        if bias and not any(s.side == "left" for s in specs):
            raise OptionError(f"{where}: field 'condition_bias' expected a stack with a left "
                              f"conditioner (only those condition the bias), got none")
        if not update and {"rank", "alpha"} & set(overrides):
            raise OptionError(f"{where}: fields 'rank' and 'alpha' belong to the update, and "
                              f"the variant has 'update = false'")
        default = "+".join(
            f"{s.placement}_{s.side}_{s.transform}"
            + (f"({','.join(f'{k}={_text(v)}' for k, v in s.options.items())})"
               if s.options else "") for s in specs) or "update"
        extras = {**({"update": False} if not update else {}),
                  **({"condition_bias": True} if bias else {}), **overrides}
        if extras:
            default += ":" + ",".join(f"{k}={_text(v)}" for k, v in extras.items())
        variant = Variant(name="", update=update, conditioners=tuple(specs),
                          condition_bias=bias, overrides=overrides)
        context = {"update": update, "condition_bias": bias, **overrides}
        if len(specs) == 1:
            context.update(specs[0].options, placement=specs[0].placement,
                           side=specs[0].side, transform=specs[0].transform)
        context["conditioners"] = [{"placement": s.placement, "side": s.side,
                                    "transform": s.transform, **s.options} for s in specs]
    name = entry.get("name", default)
    if not isinstance(name, str) or not name.strip():
        raise OptionError(f"{where}: field 'name' expected a non-empty string, got {name!r}")
    if "name" in entry:
        name = _format(name, context, where)
    if product and name == entry.get("name"):
        raise OptionError(f"{where}: field 'name' expected placeholders naming the product's "
                          f"axes (such as {{transform}}), got {name!r} for every combination")
    return dataclasses.replace(variant, name=name, source=where)


def _options(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise OptionError(f"{where}: field {key!r} expected a table of option = value, got "
                          f"{value!r}")
    for k, v in value.items():
        if not k.isidentifier():
            raise OptionError(f"{where}: field {key!r} expected option names, got {k!r}")
        if isinstance(v, (list, Mapping)) or v is None:
            raise OptionError(f"{where}: field '{key}.{k}' expected a plain value, got {v!r}")
    return dict(value)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _format(template: str, context: dict[str, Any], where: str) -> str:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    try:
        return template.format(**{k: _text(v) if not isinstance(v, list) else v
                                  for k, v in context.items()})
    except (KeyError, IndexError, AttributeError, ValueError) as error:
        valid = ", ".join(f"{{{k}}}" for k in context)
        raise OptionError(f"{where}: field 'name' has a placeholder that is not a field of the "
                          f"variant ({error}; placeholders: {', '.join(fields)}); expected "
                          f"among {valid}") from None
