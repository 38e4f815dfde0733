"""Import PEFT adapters into weightcond and export weightcond adapters to PEFT.

:func:`from_peft` reads a PEFT adapter directory (``adapter_config.json`` and
``adapter_model.safetensors``) onto a model; :func:`to_peft` writes ``lora`` and ``dora``
adapters in that format, for ``PeftModel.from_pretrained``; :func:`from_peft_tensors` does
one layer from tensors. Neither needs ``peft`` installed. The mappings, each tested for
equal outputs against the installed ``peft``:

* LoRA / DoRA: ``lora_A`` → ``A``, ``lora_B`` → ``B``, ``lora_magnitude_vector`` → the
  magnitude; ``alpha`` is PEFT's ``lora_alpha``.
* OFT: ``oft_R`` → the ``block`` generator, as it is: the ``oft`` preset has PEFT's
  parametrization (``scale=2``). PEFT's exact path (``use_cayley_neumann=False``) rotates
  row vectors by :math:`(I - Q)(I + Q)^{-1}`, which on columns is our
  ``cayley(2Q)``. Its Neumann path (``use_cayley_neumann=True``, PEFT's default, also when
  the field is absent) applies its truncated series to :math:`Q` where the exact path
  inverts :math:`I + Q`, so it approximates the *inverse* of the exact rotation (DESIGN
  §6): our ``map="cayley_neumann"`` (the same series, term for term) with ``scale=-2``.
  Outputs, gradients, merged weight and training under the same optimizer are PEFT's.
* HRA: ``hra_u`` → ``U`` of the right Householder product (``apply_GS`` → our
  ``gram_schmidt``).
* BOFT: ``boft_R`` (full blocks :math:`D`) → the butterfly generator's full blocks (the
  ``boft`` preset's ``full_blocks=True``; PEFT's Cayley of :math:`(D - D^\top)/2` on row
  vectors is our Cayley of :math:`D - D^\top` on columns); ``boft_s`` → the output
  ``diag``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import (
    AdapterError,
    OptionError,
    ShapeError,
    StateError,
    UnknownNameError,
    WeightcondError,
    check_bool,
    check_int,
    check_positive,
)
from ..io import (
    CONFIG_NAME,
    TENSORS_NAME,
    _adapter_layers,
    _write_atomically,
    brief,
    cast_finite,
    check_model,
    check_path,
    check_tensor,
    is_finite_number,
    is_int,
    read_json,
    read_tensors,
)
from ..layer import DEFAULT_ADAPTER, _adapters, check_adapter_name, is_conditioned
from ..layer import remove_conditioning as _remove
from ..presets import Applied, apply_preset

__all__ = ["from_peft", "from_peft_tensors", "to_peft"]

_OPTIONS = {"lora": {"lora_alpha"}, "dora": {"lora_alpha"}, "hra": {"apply_GS"}, "boft": set(),
            "oft": {"oft_block_size", "block_share", "use_cayley_neumann",
                    "num_cayley_neumann_terms"}}
_REQUIRED = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
             "oft": ("oft_R",), "hra": ("hra_u",), "boft": ("boft_R", "boft_s")}
# the dimensions of PEFT's tensors (a convolution's LoRA factors flattened to matrices);
# boft_s, (out, 1) or (1, out), is read flat
_NDIM = {"lora_A": 2, "lora_B": 2, "lora_magnitude_vector": 1, "oft_R": 2, "hra_u": 2,
         "boft_R": 4}


def _take(tensors: Any, method: str) -> dict[str, Tensor]:
    where = f"from_peft_tensors({method!r})"
    if not isinstance(tensors, Mapping):
        raise OptionError(f"{where}: argument 'tensors' expected a mapping of names to tensors, "
                          f"got {type(tensors).__name__}")
    missing = [k for k in _REQUIRED[method] if k not in tensors]
    extra = sorted(map(str, set(tensors) - set(_REQUIRED[method])))
    if missing or extra:
        raise OptionError(f"{where}: argument 'tensors' expected the keys "
                          f"{list(_REQUIRED[method])}, got {sorted(map(str, tensors))}")
    taken = {k: check_tensor(where, k, tensors[k], error=OptionError) for k in _REQUIRED[method]}
    for key, value in taken.items():
        if key in _NDIM and value.ndim != _NDIM[key]:
            raise ShapeError(f"{where}: tensor {key!r} expected {_NDIM[key]} dimensions, got "
                             f"shape {tuple(value.shape)}")
    if method == "boft" and taken["boft_R"].shape[-1] != taken["boft_R"].shape[-2]:
        raise ShapeError(f"{where}: tensor 'boft_R' expected square blocks (factors, blocks, "
                         f"b, b), got shape {tuple(taken['boft_R'].shape)}")
    return taken


def _check_options(config: dict[str, Any], where: str) -> None:
    """PEFT's options of :func:`from_peft_tensors`: types and ranges (``"false"`` is not
    ``False``, ``True`` is not an alpha of 1)."""
    for key, value in config.items():
        if key in ("block_share", "use_cayley_neumann", "apply_GS"):
            check_bool(where, key, value)
        elif key == "lora_alpha":
            if not is_finite_number(value):  # before check_positive: float(10**400) overflows
                raise OptionError(f"{where}: argument {key!r} expected a finite number > 0, "
                                  f"got {brief(value)}")
            check_positive(where, key, value)
        elif key == "oft_block_size":
            if value is not None:
                check_int(where, key, value, low=0)
        else:  # num_cayley_neumann_terms
            check_int(where, key, value)


def _copy(where: str, name: str, target: nn.Parameter, value: Tensor) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ShapeError(f"{where}: tensor {name!r} expected shape {tuple(target.shape)}, got "
                         f"{tuple(value.shape)}")
    value = cast_finite(where, name, value, target, "the layer's dtype", error=OptionError)
    with torch.no_grad():
        target.copy_(value)


def from_peft_tensors(layer: nn.Module, method: str, tensors: Mapping[str, Tensor], *,
                      adapter_name: str = DEFAULT_ADAPTER, **config: Any) -> Applied:
    """Condition ``layer`` with the preset equivalent to a PEFT adapter and load its tensors.

    Args:
        layer: the base layer (unconditioned).
        method: ``"lora"``, ``"dora"``, ``"oft"``, ``"boft"`` or ``"hra"``.
        tensors: the adapter's tensors for this layer under PEFT's names without the adapter
            name (``lora_A``/``lora_B`` as the ``(r, in)``/``(out, r)`` weights,
            ``lora_magnitude_vector``, ``oft_R``, ``boft_R``, ``boft_s``, ``hra_u``).
        adapter_name: the weightcond adapter to build (it becomes the active one).
        **config: PEFT's options, with PEFT's defaults: ``lora_alpha`` (LoRA/DoRA);
            ``oft_block_size`` (inferred from ``oft_R`` when omitted), ``block_share``,
            ``use_cayley_neumann`` (default ``True``, as PEFT's ``OFTConfig``),
            ``num_cayley_neumann_terms`` (default 5) (OFT); ``apply_GS`` (HRA).

    Raises:
        weightcond.WeightcondError: unknown method or options, options of the wrong type,
            missing or extra tensors, tensors that are not floating-point, not finite (or not
            in the layer's dtype) or of the wrong shape, a layer that already has the
            adapter; the layer is left as it was.

    Returns:
        The :class:`~weightcond.presets.Applied` record.

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(8, 6)
        >>> tensors = {"lora_A": torch.randn(2, 8), "lora_B": torch.randn(6, 2)}
        >>> applied = wc.interop.from_peft_tensors(layer, "lora", tensors, lora_alpha=4)
        >>> applied.update.scaling
        2.0
    """
    if not isinstance(method, str) or method not in _REQUIRED:
        raise UnknownNameError(f"from_peft_tensors: argument 'method' expected one of "
                               f"{', '.join(map(repr, _REQUIRED))}, got {brief(method)}")
    where = f"from_peft_tensors({method!r})"
    unknown = sorted(set(config) - _OPTIONS[method])
    if unknown:
        raise UnknownNameError(f"{where}: unknown options {unknown}; expected some of "
                               f"{sorted(_OPTIONS[method])}")
    _check_options(config, where)
    check_adapter_name(where, adapter_name)
    previous = _adapters(layer).active if is_conditioned(layer) else None
    if is_conditioned(layer) and adapter_name in _adapters(layer).adapters:
        raise StateError(f"{where}: argument 'layer' expected a layer without an adapter "
                         f"{adapter_name!r}, got one that has it")
    given = _take(tensors, method)
    try:
        return _load(layer, method, given, config, where, adapter_name)
    except Exception:
        _undo(layer, adapter_name, previous)  # nothing half-loaded stays behind
        raise


def _undo(layer: nn.Module, adapter_name: str, previous: str | None) -> None:
    """Remove the adapter ``adapter_name`` from ``layer`` and reactivate ``previous``."""
    if is_conditioned(layer) and adapter_name in _adapters(layer).adapters:
        _remove(layer, adapter_name=adapter_name)
        if previous is not None:
            _adapters(layer).active = previous


def _load(layer: nn.Module, method: str, given: dict[str, Tensor], config: dict[str, Any],
          where: str, adapter_name: str) -> Applied:
    def apply(name: str, **options: Any) -> Applied:
        return apply_preset(layer, name, adapter_name=adapter_name, **options)

    if method in ("lora", "dora"):
        rank = given["lora_A"].shape[0]
        applied = apply(method, rank=rank, alpha=config.get("lora_alpha", rank))
        _copy(where, "lora_A", applied.update.A, given["lora_A"])
        _copy(where, "lora_B", applied.update.B, given["lora_B"])
        if method == "dora":
            _copy(where, "lora_magnitude_vector", applied.conditioners[0].transform.magnitude,
                  given["lora_magnitude_vector"])
        return applied
    if method == "oft":
        entries = given["oft_R"].shape[-1]  # b(b-1)/2
        block_size = config.get("oft_block_size") or round((1 + math.sqrt(1 + 8 * entries)) / 2)
        neumann = config.get("use_cayley_neumann", True)  # PEFT's default
        applied = apply("oft", block_size=block_size,
                        block_share=config.get("block_share", False),
                        map="cayley_neumann" if neumann else "cayley",
                        neumann_terms=config.get("num_cayley_neumann_terms", 5),
                        scale=-2.0 if neumann else 2.0)
        _copy(where, "oft_R", applied.conditioners[0].transform.generator, given["oft_R"])
        return applied
    if method == "boft":
        d = given["boft_R"]  # (factors, blocks, b, b), PEFT's full blocks
        applied = apply("boft", block_size=d.shape[-1], butterfly_factors=d.shape[0],
                        full_blocks=True)
        butterfly, scale = (c.transform for c in applied.conditioners)
        _copy(where, "boft_R", butterfly.generator, d)
        _copy(where, "boft_s", scale.scale, given["boft_s"].reshape(-1))
        return applied
    applied = apply("hra", reflections=given["hra_u"].shape[1],
                    gram_schmidt=config.get("apply_GS", False))
    _copy(where, "hra_u", applied.conditioners[0].transform.U, given["hra_u"])
    return applied


# -- PEFT adapter directories ----------------------------------------------------------------
_PREFIX = "base_model.model."
_SUFFIXES = {  # PEFT's saved tensor names (without the adapter name) → ours
    "lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
    "lora_magnitude_vector": "lora_magnitude_vector",
    "lora_magnitude_vector.weight": "lora_magnitude_vector",
    "oft_R.weight": "oft_R", "oft_R": "oft_R", "hra_u": "hra_u",
    "boft_R": "boft_R", "boft_s": "boft_s",
}
# a convolution's LoRA tensors, (r, in, kh, kw), (out, r, 1, 1) and (1, out, 1, 1), as the
# (r, in·kh·kw) and (out, r) factors and the (out,) magnitude of its matrix (a no-op for Linear)
_FLATTEN = {"lora_A": lambda t: t.reshape(t.shape[0], -1),
            "lora_B": lambda t: t.reshape(t.shape[0], -1),
            "lora_magnitude_vector": lambda t: t.reshape(-1)}
# options that change what PEFT computes and that weightcond does not reproduce
_UNSUPPORTED = ("modules_to_save", "lora_bias", "use_qalora", "layer_replication",
                "trainable_token_indices", "target_parameters", "use_bdlora",
                "alora_invocation_tokens", "arrow_config", "coft")


def _field(config: Mapping[str, Any], key: str, ok: bool, what: str, where: str) -> None:
    if not ok:
        raise AdapterError(f"{where}: {CONFIG_NAME} expected {key!r} to be {what}, got "
                           f"{brief(config.get(key))}")


def _method(config: Mapping[str, Any], where: str) -> str:
    kind = config.get("peft_type")
    _field(config, "use_dora", isinstance(config.get("use_dora", False), bool), "a bool", where)
    methods = {"LORA": "dora" if config.get("use_dora") else "lora", "OFT": "oft", "HRA": "hra",
               "BOFT": "boft"}
    if not isinstance(kind, str) or kind not in methods:
        raise AdapterError(f"{where}: {CONFIG_NAME} expected peft_type one of "
                           f"{', '.join(map(repr, methods))}, got {brief(kind)}")
    bad = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        bad.append("bias")
    if bad:
        raise AdapterError(f"{where}: the PEFT adapter uses {', '.join(map(repr, bad))}, which "
                           f"weightcond does not import")
    return methods[kind]


_BOOLS = ("use_rslora", "block_share", "use_cayley_neumann", "apply_GS")


def _check_patterns(config: Mapping[str, Any], key: str, valid: Callable[[Any], bool],
                    what: str, where: str) -> None:
    """``rank_pattern``/``alpha_pattern``: null or an object of regular expressions (as PEFT
    matches them, :func:`_pattern_value`) to values."""
    patterns = config.get(key)
    _field(config, key, patterns is None or (isinstance(patterns, dict)
                                             and all(map(valid, patterns.values()))),
           f"null or an object mapping module-name patterns to {what}", where)
    for pattern in patterns or {}:
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, RecursionError, OverflowError) as error:
            raise AdapterError(f"{where}: {CONFIG_NAME} {key!r} has the key {brief(pattern)}, "
                               f"which is not a valid regular expression ({error})") from None


def _check_peft_config(config: Mapping[str, Any], method: str, where: str) -> None:
    """Types and ranges of the options :func:`from_peft` reads, before any layer changes:
    ``"false"`` is not ``False`` and ``True`` is not an alpha of 1."""
    for key in _BOOLS:
        _field(config, key, isinstance(config.get(key, False), bool), "a bool", where)
    if method in ("lora", "dora"):
        alpha = config.get("lora_alpha", 8)
        _field(config, "lora_alpha", is_finite_number(alpha) and alpha > 0,
               "a finite number > 0", where)
        if "r" in config:
            _field(config, "r", is_int(config["r"]) and config["r"] >= 1, "an int >= 1", where)
    _check_patterns(config, "alpha_pattern", lambda v: is_finite_number(v) and v > 0,
                    "numbers > 0", where)
    _check_patterns(config, "rank_pattern", lambda v: is_int(v) and v >= 1, "ints >= 1", where)
    if method == "oft":
        size = config.get("oft_block_size")
        _field(config, "oft_block_size", size is None or (is_int(size) and size >= 0),
               "null or an int >= 0", where)
        terms = config.get("num_cayley_neumann_terms", 5)
        _field(config, "num_cayley_neumann_terms", is_int(terms) and terms >= 1, "an int >= 1",
               where)


def _check_rank(config: Mapping[str, Any], name: str, given: Mapping[str, Tensor],
                where: str) -> None:
    """The rank of a LoRA layer's tensors is the one its configuration gives it (``r``, or a
    ``rank_pattern`` entry): PEFT refuses other tensors, and ``use_rslora`` scales by it."""
    lora_a = given.get("lora_A")
    if "r" not in config or lora_a is None or lora_a.ndim != 2:
        return  # from_peft_tensors says what is missing or misshapen
    expected = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    if lora_a.shape[0] != expected:
        raise AdapterError(f"{where}: layer {name!r}: lora_A has rank {lora_a.shape[0]}, but "
                           f"{CONFIG_NAME} gives it rank {expected} ('r' and 'rank_pattern')")


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_options(method: str, config: Mapping[str, Any], name: str, rank: int
                   ) -> dict[str, Any]:
    if method in ("lora", "dora"):
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name,
                               config.get("lora_alpha", 8))
        if config.get("use_rslora"):  # scale alpha/√r = (alpha·√r)/r
            alpha = alpha * math.sqrt(rank)
        return {"lora_alpha": alpha}
    if method == "oft":
        return {"oft_block_size": config.get("oft_block_size") or None,
                "block_share": config.get("block_share", False),
                "use_cayley_neumann": config.get("use_cayley_neumann", True),  # PEFT's default
                "num_cayley_neumann_terms": config.get("num_cayley_neumann_terms", 5)}
    if method == "hra":
        return {"apply_GS": config.get("apply_GS", False)}
    return {}


def _read_peft(path: Path, where: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not (path / CONFIG_NAME).is_file():
        raise AdapterError(f"{where}: argument 'path' expected a PEFT adapter directory, got "
                           f"{str(path)!r} without {CONFIG_NAME}")
    if not (path / TENSORS_NAME).is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir()))
        raise AdapterError(f"{where}: {str(path)!r} has no {TENSORS_NAME} (found {found}); "
                           f"only safetensors adapters are read: nothing is unpickled")
    config = read_json(path, where)
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {CONFIG_NAME} expected a JSON object")
    tensors = read_tensors(path, where)
    return config, tensors


def _group(tensors: Mapping[str, Tensor], where: str) -> dict[str, dict[str, Tensor]]:
    """PEFT's flat tensor names grouped by layer name; each tensor floating-point and
    finite, and each of a layer's tensors given once (``oft_R`` and ``oft_R.weight`` are
    two names of one tensor)."""
    grouped: dict[str, dict[str, Tensor]] = {}
    sources: dict[tuple[str, str], str] = {}
    for key, value in tensors.items():
        suffix = next((s for s in sorted(_SUFFIXES, key=len, reverse=True)
                       if key.endswith("." + s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            raise AdapterError(f"{where}: unexpected tensor {key!r} in {TENSORS_NAME} (expected "
                               f"'{_PREFIX}<module>.<{'|'.join(sorted(set(_SUFFIXES.values())))}>')")
        check_tensor(where, key, value)
        layer, slot = key[len(_PREFIX):-len(suffix) - 1], _SUFFIXES[suffix]
        if (layer, slot) in sources:
            first, second = sorted((sources[layer, slot], key))
            raise AdapterError(f"{where}: {TENSORS_NAME} has two tensors for {slot!r} of layer "
                               f"{layer!r}: {first!r}, {second!r}")
        sources[layer, slot] = key
        grouped.setdefault(layer, {})[slot] = value
    return grouped


def from_peft(model: nn.Module, path: str | os.PathLike[str], *,
              adapter_name: str = DEFAULT_ADAPTER) -> dict[str, str]:
    """Import a PEFT adapter directory into the equivalent weightcond conditioning.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (as
    ``PeftModel.save_pretrained`` writes them) of a LoRA (``use_dora`` for DoRA, with
    ``rank_pattern``, ``alpha_pattern`` and ``use_rslora``), OFT, BOFT or HRA adapter, and
    conditions each of its layers in ``model`` — the base model the adapter was trained on —
    with the equal preset (see the mappings above). The adapter becomes the active one and
    only its parameters are left trainable. Dropout options are ignored (they do not change
    outputs at evaluation).

    Returns:
        Each conditioned layer's name and preset.

    Raises:
        weightcond.AdapterError: not a PEFT safetensors adapter, an unsupported method or
            option (``modules_to_save``, trained biases, ...), a malformed configuration (an
            option of the wrong type, a pattern that is not a regular expression, a rank
            other than the tensors'), tensors for layers the model does not have, tensors
            that are not floating-point or not finite, wrong shapes; the model is left as it
            was.
        weightcond.LayerTypeError: ``model`` is not a module.
    """
    from ..model import _activate

    where = "from_peft"
    check_model(where, model)
    folder = check_path(where, path)
    check_adapter_name(where, adapter_name)
    config, tensors = _read_peft(folder, where)
    method = _method(config, where)
    _check_peft_config(config, method, where)
    grouped = _group(tensors, where)
    modules = dict(model.named_modules())
    absent = [n for n in grouped if n not in modules]
    if absent:
        raise AdapterError(f"{where}: the PEFT adapter has tensors for modules the model does "
                           f"not have: {', '.join(map(repr, absent[:5]))} (another model?)")
    done: list[tuple[nn.Module, str | None]] = []
    try:
        for name, given in grouped.items():
            layer = modules[name]
            given = {k: _FLATTEN[k](v) if k in _FLATTEN and v.ndim else v
                     for k, v in given.items()}
            if method in ("lora", "dora"):
                _check_rank(config, name, given, where)
            rank = given["lora_A"].shape[0] if "lora_A" in given and given["lora_A"].ndim else 0
            previous = _adapters(layer).active if is_conditioned(layer) else None
            try:
                from_peft_tensors(layer, method, given, adapter_name=adapter_name,
                                  **_layer_options(method, config, name, rank))
            except AdapterError:
                raise
            except WeightcondError as error:
                raise AdapterError(f"{where}: layer {name!r}: {error}") from None
            done.append((layer, previous))
    except Exception:
        for layer, previous in done:
            _undo(layer, adapter_name, previous)
        raise
    _activate(model, adapter_name)
    return {name: method for name in grouped}


def _export_kind(name: str, layer: nn.Module, conditioning: Any, where: str) -> str:
    conditioners = conditioning.conditioners()
    if conditioning.update is not None and not conditioners:
        return "lora"
    if conditioning.update is not None and len(conditioners) == 1:
        c = conditioners[0]
        if (c.transform.name, c.placement, c.side, c.condition_bias) == \
                ("magnitude", "post", "left", False):
            return "dora"
    described = [f"{c.placement}/{c.side} {c.transform.name or type(c.transform).__name__}"
                 for c in conditioners]
    raise AdapterError(f"{where}: layer {name!r} expected a 'lora' or 'dora' conditioning "
                       f"(PEFT has no equivalent of the others), got "
                       f"{'an update and ' if conditioning.update is not None else ''}"
                       f"conditioners [{', '.join(described)}]")


def _most_common(values: dict[str, Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: counts[v])


def to_peft(model: nn.Module, path: str | os.PathLike[str], *,
            adapter_name: str | None = None) -> Path:
    """Write the ``lora`` or ``dora`` adapter ``adapter_name`` (``None``: the active one) of
    ``model`` as a PEFT adapter directory that ``PeftModel.from_pretrained(base, path)``
    loads with equal outputs.

    Per-layer ranks and alphas go to ``rank_pattern``/``alpha_pattern``; a convolution's
    factors are written in PEFT's ``(r, in, kh, kw)``/``(out, r, 1, 1)`` layout. The write is
    atomic, as :func:`weightcond.save_adapter`'s.

    Returns:
        The directory written.

    Raises:
        weightcond.AdapterError: a layer conditioned otherwise than ``lora``/``dora`` (PEFT
            cannot express it), a mix of the two, a grouped convolution, no such adapter, a
            tensor with NaN or infinite values; ``path`` as for
            :func:`weightcond.save_adapter`.
        weightcond.LayerTypeError: ``model`` is not a module.
    """
    where = "to_peft"
    check_model(where, model)
    target = check_path(where, path)
    _, found = _adapter_layers(model, adapter_name, where)
    kinds = {name: _export_kind(name, layer, c, where) for name, layer, c in found}
    if len(set(kinds.values())) > 1:
        raise AdapterError(f"{where}: PEFT stores one of LoRA and DoRA per adapter; this one "
                           f"mixes them ({', '.join(f'{n!r}: {k}' for n, k in kinds.items())})")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d = []
    for name, layer, c in found:
        kind = _adapters(layer).kind
        if getattr(layer, "groups", 1) != 1:
            raise AdapterError(f"{where}: layer {name!r} is a grouped convolution, which "
                               f"PEFT's LoRA does not support")
        conv1d.append(kind.name == "Conv1D")
        stored = layer.parametrizations.weight.original.shape
        update = c.update
        ranks[name], alphas[name] = update.rank, update.alpha
        ones = (1,) * kind.kernel
        kernel = tuple(stored[2:]) if kind.kernel else ()
        key = _PREFIX + name
        tensors[f"{key}.lora_A.weight"] = update.A.detach().reshape(update.rank, -1, *kernel)
        tensors[f"{key}.lora_B.weight"] = update.B.detach().reshape(-1, update.rank, *ones)
        if kinds[name] == "dora":
            magnitude = c.conditioners()[0].transform.magnitude.detach()
            tensors[f"{key}.lora_magnitude_vector"] = (
                magnitude.reshape(1, -1, *ones) if kind.kernel else magnitude)
    rank, alpha = _most_common(ranks), _most_common(alphas)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
        # PEFT matches a key as (.*\.)?(key)$: anchored, a name does not match its suffixes
        "rank_pattern": {"^" + re.escape(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {"^" + re.escape(n): a for n, a in alphas.items() if a != alpha},
        "use_dora": next(iter(kinds.values())) == "dora", "use_rslora": False,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": all(conv1d),
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    from safetensors.torch import save_file

    tensors = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    _write_atomically(target, config, tensors, save_file, where)
    return target
