r"""Import PEFT adapters into weightcond and export weightcond adapters to PEFT.

:func:`from_peft` reads a PEFT adapter directory (``adapter_config.json`` and
``adapter_model.safetensors``) onto a model; :func:`to_peft` writes ``lora``, ``dora``,
``oft``, ``boft`` and ``hra`` adapters in that format, for ``PeftModel.from_pretrained``;
:func:`from_peft_tensors` does one layer from tensors. Neither needs ``peft`` installed.
The mappings, each tested in both directions for equal outputs against the installed
``peft``:

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
* ``modules_to_save`` (a classification head: PEFT's ``task_type="SEQ_CLS"``): PEFT saves
  each such module's tensors under the module's own name (``classifier.weight``, not its
  wrapper's ``classifier.modules_to_save.default.weight``); they are written into the
  model's module of that name and left trainable, as PEFT's copy is.

Decision (what exports): a conditioning exports when PEFT computes the same function with
one configuration for every layer. Conversions that change no function are made, exactly
where the arithmetic allows: an OFT ``scale`` other than PEFT's rescales the generator
(exact for powers of two: ``scale=1`` gives ``oft_R`` = g/2), full OFT blocks become their
skew triangle, and triangular BOFT blocks become full blocks with zeros below (exact);
such an export computes our function but trains on PEFT's parametrization. Other maps,
sides, transforms, an update beside a rotation, convolutions for OFT/BOFT/HRA (PEFT's
convolution forms are other functions) and options that differ between layers are refused,
naming the layer and why.
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
    FORMAT,
    PEFT_CONFIG_NAME,
    PEFT_TENSORS_NAME,
    adapter_layers,
    brief,
    cast_finite,
    check_modules_to_save,
    check_path,
    check_tensor,
    fitted,
    is_finite_number,
    is_int,
    read_json,
    read_tensors,
    write_atomically,
)
from ..layer import (
    DEFAULT_ADAPTER,
    adapters_of,
    check_adapter_name,
    conditioned_layers,
    is_conditioned,
    require_module,
)
from ..layer import remove_conditioning as _remove
from ..placement import Conditioner, Conditioning
from ..presets import Applied, apply_preset
from ..transforms import Block, Butterfly, Diag, Householder, Magnitude, Transform

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
    previous = adapters_of(layer).active if is_conditioned(layer) else None
    if is_conditioned(layer) and adapter_name in adapters_of(layer).adapters:
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
    if is_conditioned(layer) and adapter_name in adapters_of(layer).adapters:
        _remove(layer, adapter_name=adapter_name)
        if previous is not None:
            adapters_of(layer).active = previous


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
    # an Embedding's, (r, num_embeddings) and (embedding_dim, r): our A and B as they are
    "lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B",
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
_UNSUPPORTED = ("lora_bias", "use_qalora", "layer_replication",
                "trainable_token_indices", "target_parameters", "use_bdlora",
                "alora_invocation_tokens", "arrow_config", "coft")


def _field(config: Mapping[str, Any], key: str, ok: bool, what: str, where: str) -> None:
    if not ok:
        raise AdapterError(f"{where}: {PEFT_CONFIG_NAME} expected {key!r} to be {what}, got "
                           f"{brief(config.get(key))}")


def _method(config: Mapping[str, Any], where: str) -> str:
    kind = config.get("peft_type")
    _field(config, "use_dora", isinstance(config.get("use_dora", False), bool), "a bool", where)
    methods = {"LORA": "dora" if config.get("use_dora") else "lora", "OFT": "oft", "HRA": "hra",
               "BOFT": "boft"}
    if not isinstance(kind, str) or kind not in methods:
        raise AdapterError(f"{where}: {PEFT_CONFIG_NAME} expected peft_type one of "
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
            raise AdapterError(f"{where}: {PEFT_CONFIG_NAME} {key!r} has the key {brief(pattern)}, "
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
        _check_neumann_version(config, where)


def _check_neumann_version(config: Mapping[str, Any], where: str) -> None:
    """PEFT 0.18 changed its Cayley–Neumann series (the last power's weight, 1 instead of
    2); :func:`~weightcond.transforms.maps.cayley_neumann` is 0.18's. An OFT adapter on that
    path saved by an older PEFT (``peft_version`` below 0.18, or absent: the field came with
    0.18) was trained with the other series, which PEFT itself only warns about: refused,
    not imported as another function."""
    if not config.get("use_cayley_neumann", True):
        return
    version = config.get("peft_version")
    found = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if found is None or (int(found[1]), int(found[2])) < (0, 18):
        raise AdapterError(
            f"{where}: an OFT adapter on the Cayley–Neumann path (use_cayley_neumann) saved by "
            f"PEFT {brief(version) if version is not None else 'before 0.18 (no peft_version)'}"
            f": PEFT 0.18 changed that series and weightcond computes 0.18's, so this adapter "
            f"would compute another function than it was trained with; retrain it with PEFT "
            f">= 0.18, or load it with the PEFT it was saved by")


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
                           f"{PEFT_CONFIG_NAME} gives it rank {expected} ('r' and 'rank_pattern')")


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
    ours = " (a weightcond adapter: use weightcond.load_adapter)"
    if not (path / PEFT_CONFIG_NAME).is_file():
        hint = ours if (path / CONFIG_NAME).is_file() else ""
        raise AdapterError(f"{where}: argument 'path' expected a PEFT adapter directory, got "
                           f"{str(path)!r} without {PEFT_CONFIG_NAME}{hint}")
    if not (path / PEFT_TENSORS_NAME).is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir()))
        raise AdapterError(f"{where}: {str(path)!r} has no {PEFT_TENSORS_NAME} (found {found}); "
                           f"only safetensors adapters are read: nothing is unpickled")
    config = read_json(path / PEFT_CONFIG_NAME, where)
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {PEFT_CONFIG_NAME} expected a JSON object")
    if config.get("format") == FORMAT:  # saved by weightcond before its own file names
        raise AdapterError(f"{where}: {PEFT_CONFIG_NAME} expected a PEFT configuration, got "
                           f"format {FORMAT!r}{ours}")
    tensors = read_tensors(path / PEFT_TENSORS_NAME, where)
    return config, tensors


def _group(tensors: Mapping[str, Tensor], where: str
           ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """PEFT's flat tensor names grouped by layer name, each of a layer's tensors given once
    (``oft_R`` and ``oft_R.weight`` are two names of one tensor) and each floating-point and
    finite; and the other tensors (of ``modules_to_save``, under the modules' own names)."""
    grouped: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    sources: dict[tuple[str, str], str] = {}
    for key, value in tensors.items():
        suffix = next((s for s in sorted(_SUFFIXES, key=len, reverse=True)
                       if key.endswith("." + s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            others[key] = value
            continue
        check_tensor(where, key, value)
        layer, slot = key[len(_PREFIX):-len(suffix) - 1], _SUFFIXES[suffix]
        if (layer, slot) in sources:
            first, second = sorted((sources[layer, slot], key))
            raise AdapterError(f"{where}: {PEFT_TENSORS_NAME} has two tensors for {slot!r} of "
                               f"layer {layer!r}: {first!r}, {second!r}")
        sources[layer, slot] = key
        grouped.setdefault(layer, {})[slot] = value
    return grouped, others


def _saved_modules(model: nn.Module, config: Mapping[str, Any], others: Mapping[str, Tensor],
                   where: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The tensors of PEFT's ``modules_to_save``, each with the model's tensor it replaces
    (checked: shape, finite, castable to its dtype; cast), by the name in the model.

    PEFT saves a module to save under the module's own name (``classifier.weight``, not its
    wrapper's ``classifier.modules_to_save.default.weight``); a module is one to save when
    its name ends with an entry of ``modules_to_save`` (PEFT's ``endswith``)."""
    entries = config.get("modules_to_save") or []
    _field(config, "modules_to_save", isinstance(entries, list)
           and all(isinstance(e, str) and e for e in entries), "null or a list of names", where)
    expected = (f"'{_PREFIX}<module>.<{'|'.join(sorted(set(_SUFFIXES.values())))}>'"
                + (", or a tensor of modules_to_save" if entries else ""))
    targets = model.state_dict(keep_vars=True)
    found: dict[str, tuple[Tensor, Tensor]] = {}
    absent = []
    for key, value in others.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else ""
        prefixes = [name[:i] for i, char in enumerate(name) if char == "."]
        if not any(p.endswith(e) for p in prefixes for e in entries):
            raise AdapterError(f"{where}: unexpected tensor {key!r} in {PEFT_TENSORS_NAME} "
                               f"(expected {expected})")
        if name not in targets:
            absent.append(name)
            continue
        target = targets[name]
        found[name] = (target, fitted(where, key, value, target, " (modules_to_save)"))
    if absent:
        raise AdapterError(f"{where}: the PEFT adapter has modules_to_save tensors the model "
                           f"does not have: {', '.join(map(repr, absent[:5]))} (another "
                           f"model, or a conditioned module?)")
    return found


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

    The modules of ``modules_to_save`` (a classification head: PEFT's ``task_type="SEQ_CLS"``
    saves ``classifier``/``score``) are written into ``model``'s modules of the same names,
    in place, and left trainable, as in PEFT; :func:`weightcond.remove_conditioning` does not
    restore them (PEFT keeps the original beside its copy; here it is overwritten).

    Returns:
        Each conditioned layer's name and preset (not the modules to save).

    Raises:
        weightcond.AdapterError: not a PEFT safetensors adapter (a weightcond adapter names
            :func:`weightcond.load_adapter`), an unsupported method or option (trained
            biases, ...), a malformed configuration (an option of the wrong type, a pattern
            that is not a regular expression, a rank other than the tensors'), tensors for
            layers or modules the model does not have, tensors that are not floating-point
            or not finite, wrong shapes; the model is left as it was.
        weightcond.LayerTypeError: ``model`` is not a module.
    """
    from ..model import activate

    where = "from_peft"
    require_module(model, where, "model")
    folder = check_path(where, path)
    check_adapter_name(where, adapter_name)
    config, tensors = _read_peft(folder, where)
    method = _method(config, where)
    _check_peft_config(config, method, where)
    grouped, others = _group(tensors, where)
    saved = _saved_modules(model, config, others, where)
    modules = dict(model.named_modules())
    absent = [n for n in grouped if n not in modules]
    if absent:
        raise AdapterError(f"{where}: the PEFT adapter has tensors for modules the model does "
                           f"not have: {', '.join(map(repr, absent[:5]))} (another model?)")
    done: list[tuple[nn.Module, str | None]] = []
    copied: list[tuple[Tensor, Tensor]] = []
    try:
        for name, given in grouped.items():
            layer = modules[name]
            given = {k: _FLATTEN[k](v) if k in _FLATTEN and v.ndim else v
                     for k, v in given.items()}
            if method in ("lora", "dora"):
                _check_rank(config, name, given, where)
            rank = given["lora_A"].shape[0] if "lora_A" in given and given["lora_A"].ndim else 0
            previous = adapters_of(layer).active if is_conditioned(layer) else None
            try:
                from_peft_tensors(layer, method, given, adapter_name=adapter_name,
                                  **_layer_options(method, config, name, rank))
            except AdapterError:
                raise
            except WeightcondError as error:
                raise AdapterError(f"{where}: layer {name!r}: {error}") from None
            done.append((layer, previous))
        with torch.no_grad():
            for target, value in saved.values():
                copied.append((target, target.detach().clone()))
                target.copy_(value)
    except Exception:
        with torch.no_grad():
            for target, old in copied:
                target.copy_(old)
        for layer, previous in done:
            _undo(layer, adapter_name, previous)
        raise
    activate(model, adapter_name)
    for target, _ in saved.values():  # trained in PEFT, and trainable there
        if isinstance(target, nn.Parameter):
            target.requires_grad_(True)
    return {name: method for name in grouped}


# -- export ----------------------------------------------------------------------------------
# the first PEFT whose OFT Cayley-Neumann series is the one reproduced (PEFT warns on
# adapters that declare an older version or none)
_PEFT_VERSION = "0.18.0"
_PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "oft": "OFT", "boft": "BOFT", "hra": "HRA"}


def _describe(conditioning: Conditioning) -> str:
    described = [f"{c.placement}/{c.side} {c.transform.name or type(c.transform).__name__}"
                 + (" (condition_bias)" if c.condition_bias else "")
                 for c in conditioning.conditioners()]
    update = "an update and " if conditioning.update is not None else "no update and "
    return f"{update}conditioners [{', '.join(described)}]"


def _export_method(name: str, conditioning: Conditioning, where: str) -> str:
    """The PEFT method that computes ``conditioning``: by its structure (the options are
    checked by the method's exporter)."""
    def kinds(cls: type[Transform], side: str) -> list[Conditioner]:
        # exact types: a subclass may compute another function
        return [c for c in conditioners
                if type(c.transform) is cls and c.side == side and not c.condition_bias]

    conditioners = conditioning.conditioners()
    if conditioning.update is not None:
        if not conditioners:
            return "lora"
        dora = kinds(Magnitude, "left")
        if len(conditioners) == 1 and dora and dora[0].placement == "post":
            return "dora"
    elif len(conditioners) == 1:
        # without an update, W R_pre and W R_post are one weight: either placement is OFT's
        for cls, method in ((Block, "oft"), (Householder, "hra"), (Butterfly, "boft")):
            if kinds(cls, "right"):
                return method
    elif len(conditioners) == 2 and kinds(Butterfly, "right") and kinds(Diag, "left"):
        return "boft"  # diag(s)·W·Q: the two commute, in any order or stage
    raise AdapterError(f"{where}: layer {name!r} expected a conditioning PEFT can express "
                       f"(the presets 'lora', 'dora', 'oft', 'boft' or 'hra'), got "
                       f"{_describe(conditioning)}")


def _skew_generator(generator: Tensor, scale: float, full: bool) -> Tensor:
    r"""The upper triangles (row by row, ``(..., b(b-1)/2)``) of the blocks
    :math:`S = c\,(U - U^\top)` or :math:`c\,(D - D^\top)` of a block generator, in float64
    (a triangular generator's entries times ``scale``)."""
    g = generator.detach().double()
    if not full:
        return scale * g
    rows, cols = torch.triu_indices(g.shape[-1], g.shape[-1], offset=1, device=g.device)
    return scale * (g[..., rows, cols] - g[..., cols, rows])


def _refuse(name: str, why: str, where: str) -> AdapterError:
    return AdapterError(f"{where}: layer {name!r}: {why}")


def _export_lora(name: str, layer: nn.Module, c: Conditioning, method: str, where: str
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    kind = adapters_of(layer).kind
    if getattr(layer, "groups", 1) != 1:
        raise AdapterError(f"{where}: layer {name!r} is a grouped convolution, which "
                           f"PEFT's LoRA does not support")
    stored = layer.parametrizations.weight.original.shape
    update = c.update
    ones = (1,) * kind.kernel
    kernel = tuple(stored[2:]) if kind.kernel else ()
    if kind.name == "Embedding":  # PEFT's Embedding keeps its factors as plain parameters
        tensors = {"lora_embedding_A": update.A.detach(), "lora_embedding_B": update.B.detach()}
    else:
        tensors = {"lora_A.weight": update.A.detach().reshape(update.rank, -1, *kernel),
                   "lora_B.weight": update.B.detach().reshape(-1, update.rank, *ones)}
    if method == "dora":
        magnitude = c.conditioners()[0].transform.magnitude.detach()
        tensors["lora_magnitude_vector"] = (magnitude.reshape(1, -1, *ones) if kind.kernel
                                            else magnitude)
    # per layer (rank_pattern, alpha_pattern); only the layer kind must agree
    return tensors, {"rank": update.rank, "alpha": update.alpha,
                     "conv1d": kind.name == "Conv1D"}


def _export_oft(name: str, layer: nn.Module, c: Conditioning, method: str, where: str
                ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    block = c.conditioners()[0].transform
    if block.map not in ("cayley", "cayley_neumann"):
        raise _refuse(name, f"PEFT's OFT has the maps 'cayley' (use_cayley_neumann=False) "
                            f"and 'cayley_neumann', got map={block.map!r}", where)
    neumann = block.map == "cayley_neumann"
    # PEFT's exact path is our cayley(2·skew(oft_R)), its Neumann path our series of
    # -2·skew(oft_R) (see the module's docstring): oft_R = ±S/2, S = scale·skew(generator)
    skew = _skew_generator(block.generator, block.scale, block.full)
    oft_r = (skew * (-0.5 if neumann else 0.5)).to(block.generator.dtype)
    options = {"block_size": block.block_size, "blocks": c.in_features // block.block_size,
               "block_share": block.share, "use_cayley_neumann": neumann,
               "num_cayley_neumann_terms": block.terms if neumann else None}
    return {"oft_R.weight": oft_r}, options


def _export_boft(name: str, layer: nn.Module, c: Conditioning, method: str, where: str
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    conditioners = c.conditioners()
    butterfly = next(x.transform for x in conditioners if type(x.transform) is Butterfly)
    diag = next((x.transform for x in conditioners if type(x.transform) is Diag), None)
    if butterfly.map != "cayley":
        raise _refuse(name, f"PEFT's BOFT has the map 'cayley' only, got "
                            f"map={butterfly.map!r}", where)
    # PEFT's Cayley of (D - Dᵀ)/2 on rows is our cayley(D - Dᵀ) on columns: D = c·D_ours
    # for full blocks, or the triangle c·U with zeros below (D - Dᵀ = c·(U - Uᵀ)), exact
    g = butterfly.generator.detach()
    if butterfly.full:
        d = g.double() * butterfly.scale
    else:
        b = butterfly.block_size
        rows, cols = torch.triu_indices(b, b, offset=1, device=g.device)
        d = g.new_zeros(*g.shape[:-1], b, b, dtype=torch.float64)
        d[..., rows, cols] = g.double() * butterfly.scale
    out = c.out_features
    scale = (diag.scale.detach() if diag is not None
             else torch.ones(out, dtype=g.dtype, device=g.device))
    options = {"block_size": butterfly.block_size, "blocks": c.in_features // butterfly.block_size,
               "factors": butterfly.factors}
    return {"boft_R": d.to(g.dtype), "boft_s": scale.reshape(out, 1)}, options


def _export_hra(name: str, layer: nn.Module, c: Conditioning, method: str, where: str
                ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    householder = c.conditioners()[0].transform
    return {"hra_u": householder.U.detach()}, {"r": householder.U.shape[1],
                                               "apply_GS": householder.gram_schmidt}


_EXPORTERS: dict[str, Callable[..., tuple[dict[str, Tensor], dict[str, Any]]]] = {
    "lora": _export_lora, "dora": _export_lora, "oft": _export_oft, "boft": _export_boft,
    "hra": _export_hra}


def _most_common(values: dict[str, Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: counts[v])


def _agreed(options: dict[str, dict[str, Any]], key: str, what: str, where: str) -> Any:
    """The value of ``key`` shared by every layer: PEFT's configuration has one."""
    values = {name: o[key] for name, o in options.items()}
    if len(set(values.values())) > 1:
        (a, va), (b, vb) = next((x, y) for x in values.items() for y in values.items()
                                if x[1] != y[1])
        raise AdapterError(f"{where}: PEFT's configuration gives every layer one {what}; "
                           f"layer {a!r} has {va!r}, layer {b!r} has {vb!r}")
    return next(iter(values.values()))


def _size_or_count(options: dict[str, dict[str, Any]], what: str, where: str
                   ) -> tuple[int, int]:
    """(block size, 0) if every layer has one block size, else (0, block count) if every
    layer has one number of blocks: PEFT's ``oft_block_size``/``r`` and
    ``boft_block_size``/``boft_block_num`` are exclusive."""
    sizes = {o["block_size"] for o in options.values()}
    counts = {o["blocks"] for o in options.values()}
    if len(sizes) == 1:
        return sizes.pop(), 0
    if len(counts) == 1:
        return 0, counts.pop()
    return _agreed(options, "block_size", what, where), 0  # raises


def _peft_config(method: str, options: dict[str, dict[str, Any]], where: str
                 ) -> dict[str, Any]:
    """PEFT's options for ``method`` from each layer's."""
    if method in ("lora", "dora"):
        ranks = {n: o["rank"] for n, o in options.items()}
        alphas = {n: o["alpha"] for n, o in options.items()}
        rank, alpha = _most_common(ranks), _most_common(alphas)
        return {
            "r": rank, "lora_alpha": alpha,
            # PEFT matches a key as (.*\.)?(key)$: anchored, a name does not match its suffixes
            "rank_pattern": {"^" + re.escape(n): r for n, r in ranks.items() if r != rank},
            "alpha_pattern": {"^" + re.escape(n): a for n, a in alphas.items() if a != alpha},
            "use_dora": method == "dora", "use_rslora": False, "lora_dropout": 0.0,
            "fan_in_fan_out": all(o["conv1d"] for o in options.values()),
            "init_lora_weights": True}
    if method == "oft":
        size, count = _size_or_count(options, "oft_block_size (or number of blocks r)", where)
        neumann = _agreed(options, "use_cayley_neumann", "map (use_cayley_neumann)", where)
        terms = _agreed(options, "num_cayley_neumann_terms", "number of Neumann terms",
                        where)
        return {"r": count, "oft_block_size": size,
                "block_share": _agreed(options, "block_share", "block_share", where),
                "use_cayley_neumann": neumann, "num_cayley_neumann_terms": terms or 5,
                "module_dropout": 0.0, "coft": False, "eps": 6e-5, "fan_in_fan_out": False,
                "init_weights": True}
    if method == "boft":
        size, count = _size_or_count(options, "boft_block_size (or boft_block_num)", where)
        return {"boft_block_size": size, "boft_block_num": count,
                "boft_n_butterfly_factor": _agreed(options, "factors",
                                                   "number of butterfly factors", where),
                "boft_dropout": 0.0, "fan_in_fan_out": False, "init_weights": True}
    return {"r": _agreed(options, "r", "number of reflections r", where),
            "apply_GS": _agreed(options, "apply_GS", "apply_GS (gram_schmidt)", where),
            "init_weights": True}


def _check_modules_to_save(model: nn.Module, names: Any, conditioned: list[str], where: str
                           ) -> list[str]:
    """``modules_to_save`` (:func:`weightcond.io.check_modules_to_save`), each selecting in
    PEFT that module and no other: PEFT wraps every module whose name *ends with* an entry,
    and keeps its adapter off every layer an entry matches as a regular expression."""
    names = check_modules_to_save(where, model, names, conditioned)
    for entry in names:
        try:
            excluded = [n for n in conditioned if re.match(rf"(^|.*\.){entry}($|\..*)", n)]
        except re.error:
            excluded = [entry]
        if excluded:
            raise AdapterError(f"{where}: argument 'modules_to_save' has {entry!r}, which PEFT "
                               f"reads as a pattern that keeps its adapter off the layer "
                               f"{excluded[0]!r}")
    selected = [n for n, _ in model.named_modules(remove_duplicate=False)
                if any(n.endswith(entry) for entry in names)]
    extra = [n for n in selected if n not in names]
    if extra:
        entry = next(e for e in names if extra[0].endswith(e))
        raise AdapterError(f"{where}: argument 'modules_to_save' has {entry!r}; PEFT selects "
                           f"every module whose name ends with it, which would also save "
                           f"{extra[0]!r}")
    return names


def to_peft(model: nn.Module, path: str | os.PathLike[str], *,
            adapter_name: str | None = None,
            modules_to_save: list[str] | tuple[str, ...] | None = None) -> Path:
    r"""Write the adapter ``adapter_name`` (``None``: the active one) of ``model`` as a PEFT
    adapter directory that ``PeftModel.from_pretrained(base, path)`` loads with equal
    outputs.

    The adapter must be one PEFT has: ``lora`` or ``dora`` (LoRA, ``use_dora``), ``oft``
    (OFT), ``boft`` (BOFT) or ``hra`` (HRA), one method for all its layers; the inverse of
    the mappings above:

    * LoRA/DoRA: per-layer ranks and alphas go to ``rank_pattern``/``alpha_pattern``; a
      convolution's factors are written in PEFT's ``(r, in, kh, kw)``/``(out, r, 1, 1)``
      layout.
    * OFT: a right ``block`` with ``map="cayley"`` (PEFT's ``use_cayley_neumann=False``) or
      ``"cayley_neumann"`` (``num_cayley_neumann_terms`` = ``terms``); any ``scale`` and
      ``full``: ``oft_R`` is :math:`\pm S/2` for the blocks :math:`S` (the sign of the
      map), which is the generator itself for the preset's ``scale=2`` (``-2`` for the
      Neumann path), exact for a triangular generator and a power-of-two scale, and one
      rounding per entry otherwise.
      Every layer needs the same block size (or number of blocks), ``block_share``, map and
      terms.
    * BOFT: a right ``butterfly`` with ``map="cayley"``, and optionally a left ``diag``
      (``boft_s``; ones without it): ``boft_R`` is ``scale`` × the full blocks, or for
      ``full=False`` the triangle with zeros below, exactly (:math:`D - D^\top` is the same
      skew block). One block size (or number) and number of factors for all layers; PEFT
      builds ``boft_n_butterfly_factor > 1`` only with its CUDA extension.
    * HRA: a right ``householder`` → ``hra_u``, ``gram_schmidt`` → ``apply_GS``; one number
      of reflections for all layers.

    OFT, BOFT and HRA export ``torch.nn.Linear`` layers only (PEFT's convolution forms are
    other functions), and a placement of either stage (without an update they are one
    weight). ``target_modules`` is written as a regular expression of the layers' full
    names, which PEFT matches against whole names: no other module whose name ends like an
    exported layer's gets an adapter.

    Args:
        model: the conditioned model.
        path: the directory to write (replaced, atomically, if it holds only adapter files).
        adapter_name: the adapter to write; ``None``: the active one.
        modules_to_save: full names of modules saved whole beside the adapter (a trained
            classification head, say): PEFT's ``modules_to_save``, restored by
            ``PeftModel.from_pretrained`` and by :func:`from_peft`. PEFT selects every module
            whose name ends with an entry, so an entry that would also select another
            module, or a conditioned layer (or a module holding one), is refused.

    Returns:
        The directory written.

    Raises:
        weightcond.AdapterError: a layer conditioned otherwise (PEFT cannot express it; the
            message names the layer and why), a mix of methods, or of options PEFT gives
            every layer, a grouped convolution, no such adapter, a tensor with NaN or
            infinite values, a ``modules_to_save`` entry PEFT would read otherwise; ``path``
            as for :func:`weightcond.save_adapter`.
        weightcond.OptionError: ``modules_to_save`` not a list of the model's module names.
        weightcond.LayerTypeError: ``model`` is not a module.
    """
    where = "to_peft"
    require_module(model, where, "model")
    target = check_path(where, path)
    _, found = adapter_layers(model, adapter_name, where)
    saved = _check_modules_to_save(model, modules_to_save,
                                   [n for n, _ in conditioned_layers(model)], where)
    methods = {name: _export_method(name, c, where) for name, _, c in found}
    if len(set(methods.values())) > 1:
        what = ("one of LoRA and DoRA" if set(methods.values()) == {"lora", "dora"}
                else "one method")
        raise AdapterError(f"{where}: PEFT stores {what} per adapter; this one mixes them "
                           f"({', '.join(f'{n!r}: {k}' for n, k in methods.items())})")
    method = next(iter(methods.values()))
    tensors: dict[str, Tensor] = {}
    options: dict[str, dict[str, Any]] = {}
    for name, layer, c in found:
        if method not in ("lora", "dora") and adapters_of(layer).kind.name != "Linear":
            raise _refuse(name, f"only Linear layers export to PEFT's {_PEFT_TYPES[method]} "
                                f"(its convolution form is another function, and it has no "
                                f"Conv1D form), got a {adapters_of(layer).kind.name}", where)
        layer_tensors, options[name] = _EXPORTERS[method](name, layer, c, method, where)
        tensors.update({f"{_PREFIX}{name}.{k}": v for k, v in layer_tensors.items()})
    for module in saved:
        for key, value in model.get_submodule(module).state_dict().items():
            tensors[f"{_PREFIX}{module}.{key}"] = value.detach()
    names = sorted(options)
    config = {
        "peft_type": _PEFT_TYPES[method], "task_type": None, "base_model_name_or_path": None,
        "peft_version": _PEFT_VERSION,
        # PEFT fullmatches a str against each module's full name: these layers and no other
        # (a list would also select every module whose name ends with one of them)
        "target_modules": "^(?:" + "|".join(map(re.escape, names)) + ")$",
        **_peft_config(method, options, where),
        "bias": "none", "modules_to_save": saved or None, "inference_mode": True,
    }
    from safetensors.torch import save_file

    tensors = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomically(target, config, tensors, save_file, where,
                      names=(PEFT_CONFIG_NAME, PEFT_TENSORS_NAME))
    return target
