"""Saving and loading adapters: safetensors for the tensors, JSON for the recipe.

An adapter directory holds two files:

* ``weightcond_adapter.json`` — the format and library version and, for every conditioned
  layer, its kind, shape and dtype, the update's rank and alpha, and every conditioner's
  placement, side, transform name, options and ``condition_bias``, in order: enough to
  rebuild each conditioner exactly (the released SORA code loses its rotation on reload;
  this does not); the modules saved whole (``modules``: a trained classification head,
  say, with the names of its tensors; format 3); the SHA-256 of the tensors
  (``tensors_sha256``), and the SHA-256 of the rest of the configuration
  (``recipe_sha256``, see Note (the recipe digest)), so a corrupted or hand-edited file
  fails to load;
* ``weightcond_adapter.safetensors`` — every tensor of each layer's adapter, under
  ``<layer name>.<key in the adapter's state_dict>``, and of each saved module, under
  ``<module name>.<key in its state_dict>``.

Note (file names): until this version the two files had PEFT's names,
``adapter_config.json`` and ``adapter_model.safetensors``, so a weightcond adapter looked like
a PEFT one (``PeftModel.from_pretrained`` failed on it with a bare ``KeyError:
'peft_type'``) and a PEFT adapter like a weightcond one. :func:`save_adapter` writes the new
names; :func:`load_adapter` still reads a directory that has only the old ones (format 1 and
2 alike), and on a PEFT adapter directory it says to use :func:`weightcond.from_peft`;
:func:`weightcond.to_peft` writes PEFT's names, for PEFT.

Note (the recipe digest): ``recipe_sha256`` is the SHA-256 of the canonical JSON (keys
sorted, no spaces, ASCII) of every other key of the configuration, ``tensors_sha256``
included, so it covers the recipe and, through that digest, the tensors: an edited map,
temperature, alpha, side, placement, ``condition_bias``, conditioner order or layer name
loads no more than a flipped bit in a tensor. It is a checksum, not a signature: whoever
can write the file can recompute it. Format 1 files (written before it) still load, with
their tensors checked against ``tensors_sha256`` only, as before; so do format 2 files
(before ``modules``).

Nothing is ever unpickled: ``json`` and `safetensors <https://huggingface.co/docs/
safetensors>`_ only (we chose safetensors for tensors on disk: a fixed header, no code).
Writes go to a temporary directory beside the target that is renamed into place, so a
failed save leaves no half-written adapter. A load validates the whole file — JSON depth,
duplicate keys, non-finite or absurd numbers, every field's type and range, both digests,
every tensor's dtype, shape and finiteness — and builds every conditioner before it changes
the model, so any failure leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AdapterError, OptionError, StateError, WeightcondError
from .layer import (
    adapters_of,
    add_conditioner,
    build_conditioner,
    build_update,
    check_adapter_name,
    conditioned_layers,
    install_conditioning,
    is_conditioned,
    remove_conditioning,
    require_module,
)
from .placement import Conditioning
from .reshape import LAYER_KINDS, layer_kind
from .version import __version__

__all__ = ["CONFIG_NAME", "PEFT_CONFIG_NAME", "PEFT_TENSORS_NAME", "TENSORS_NAME",
           "adapter_files", "load_adapter", "save_adapter"]

CONFIG_NAME = "weightcond_adapter.json"
TENSORS_NAME = "weightcond_adapter.safetensors"
# PEFT's file names, which weightcond's own adapters had before (Note (file names))
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_TENSORS_NAME = "adapter_model.safetensors"
_ADAPTER_FILES = (CONFIG_NAME, TENSORS_NAME, PEFT_CONFIG_NAME, PEFT_TENSORS_NAME)
FORMAT = "weightcond.adapter"
# 3: modules (saved whole); 2: recipe_sha256; 1: tensors_sha256 only (both still read)
FORMAT_VERSION = 3

# the keys of each level of the configuration, in the order save_adapter writes them
_KEYS = ("format", "format_version", "weightcond_version", "torch_version", "model",
         "adapter_name", "layers", "modules", "tensors_sha256", "recipe_sha256")
_SINCE = {"modules": 3, "recipe_sha256": 2}  # the keys of later formats
_RECORD_KEYS = ("kind", "shape", "dtype", "update", "conditioners", "tensors")
_UPDATE_KEYS = ("rank", "alpha")
_ENTRY_KEYS = ("placement", "side", "transform", "options", "condition_bias")
# a saved configuration is 7 levels deep (more only where an option holds nested lists);
# far deeper is an attack on the parser's recursion, refused before anything walks it
_MAX_DEPTH = 64
_MAX_DIGITS = 30  # no count or size needs more; Python refuses to parse > 4300 digits
_SHA256 = re.compile(r"[0-9a-f]{64}")
# the dtypes of a conditioned layer's weight, so of every floating tensor a save writes
_FLOAT_DTYPES = {str(d).removeprefix("torch."): d
                 for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)}


def _a(noun: str) -> str:
    """``noun`` with its indefinite article (``a Linear``, ``an Embedding``)."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message quotes what it got
    without copying a hostile file's megabyte-long value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def is_int(value: Any) -> bool:
    """An int, not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite int or float (within float64), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float64
        return False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes.

    safetensors has no checksum: bytes changed in the data region of the file load without
    complaint, so the configuration records this digest and a load compares it.
    """
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return h.hexdigest()


def _recipe_digest(config: dict[str, Any]) -> str:
    """SHA-256 of every key of ``config`` but ``recipe_sha256`` (Note (the recipe digest)).

    Canonical JSON — keys sorted, no spaces, ASCII — so the digest depends on the values
    only, not on how the file was indented or its keys ordered.
    """
    rest = {k: v for k, v in config.items() if k != "recipe_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# -- arguments ---------------------------------------------------------------------------------
def check_path(where: str, path: Any) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is a non-empty ``str`` or
    :class:`os.PathLike` of one without NUL characters, else raise
    :class:`~weightcond.AdapterError`."""
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterError(f"{where}: argument 'path' expected a str or os.PathLike, got "
                           f"{type(path).__name__}")
    try:
        text: Any = os.fspath(path)
    except TypeError:  # a __fspath__ that returns neither str nor bytes
        text = None
    if not isinstance(text, str):
        raise AdapterError(f"{where}: argument 'path' expected a str or os.PathLike, got "
                           f"{type(path).__name__} of {type(text).__name__}")
    if not text:
        raise AdapterError(f"{where}: argument 'path' expected a non-empty path, got ''")
    if "\0" in text:
        raise AdapterError(f"{where}: argument 'path' expected a path without NUL characters, "
                           f"got {brief(text)}")
    return Path(text)


def check_tensor(where: str, name: str, value: Any, *,
                 error: type[WeightcondError] = AdapterError) -> Tensor:
    """Return ``value`` if it is a floating-point tensor of finite values, else raise
    ``error``: an adapter read from disk or handed over is never cast from ``bool`` or an
    integer, and never holds NaN or infinities."""
    if not isinstance(value, Tensor):
        raise error(f"{where}: tensor {name!r} expected a torch.Tensor, got "
                    f"{type(value).__name__}")
    if not value.is_floating_point():
        raise error(f"{where}: tensor {name!r} expected a floating-point tensor, got dtype "
                    f"{_dtype_name(value.dtype)}")
    if not _finite(value):
        raise error(f"{where}: tensor {name!r} expected finite values, got NaN or infinite "
                    f"ones")
    return value


def _finite(value: Tensor) -> bool:
    """Whether every value is finite (a meta tensor has no values: yes)."""
    return value.device.type == "meta" or bool(torch.isfinite(value).all())


def cast_finite(where: str, name: str, value: Tensor, like: Tensor, whose: str, *,
                error: type[WeightcondError] = AdapterError) -> Tensor:
    """``value`` in the dtype and on the device of ``like``; raise ``error`` where a finite
    value overflows that dtype (a float32 1e30 is inf in float16). Checked where ``value``
    is (the CPU, for a file), before the move: no sync with an accelerator, and a model on
    the meta device still loads."""
    cast = value.to(dtype=like.dtype)
    if cast.is_floating_point() and not _finite(cast):
        raise error(f"{where}: tensor {name!r} expected values finite in "
                    f"{_dtype_name(like.dtype)} ({whose}), got some that overflow it")
    return cast.to(device=like.device)


def fitted(where: str, name: str, value: Tensor, target: Tensor, label: str = "") -> Tensor:
    """``value``, loaded for the model's tensor ``target``, checked and made to fit it: the
    same shape; floating point, finite and finite in ``target``'s dtype, then cast to it and
    moved to its device; any other dtype must be ``target``'s. ``label`` follows the tensor's
    name in messages (``" (modules_to_save)"``)."""
    if tuple(value.shape) != tuple(target.shape):
        raise AdapterError(f"{where}: tensor {name!r}{label} expected shape "
                           f"{tuple(target.shape)}, got {tuple(value.shape)}")
    if target.is_floating_point():
        check_tensor(where, name, value)
        return cast_finite(where, name, value, target, "the model's dtype")
    if value.dtype != target.dtype:
        raise AdapterError(f"{where}: tensor {name!r}{label} expected dtype "
                           f"{_dtype_name(target.dtype)}, got {_dtype_name(value.dtype)}")
    return value.to(target.device)


# -- saving ------------------------------------------------------------------------------------
def _json_value(where: str, what: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AdapterError(f"{where}: {what} is {value!r}, which JSON cannot store")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(where, what, v) for v in value]
    raise AdapterError(f"{where}: {what} is a {type(value).__name__} ({value!r}); a saved "
                       f"adapter stores options that are numbers, strings, booleans, None or "
                       f"lists of them")


def _layer_record(name: str, layer: nn.Module, conditioning: Conditioning, where: str
                  ) -> dict[str, Any]:
    kind = layer_kind(layer, where)
    record: dict[str, Any] = {
        "kind": kind.name,
        "shape": [conditioning.out_features, conditioning.in_features],
        "dtype": _dtype_name(kind.matrix_dtype(layer)),
        "update": None,
        "conditioners": [],
    }
    if conditioning.update is not None:
        record["update"] = {"rank": conditioning.update.rank, "alpha": conditioning.update.alpha}
    for i, c in enumerate(conditioning.conditioners()):
        recipe = getattr(c, "_recipe", None)
        if recipe is None:
            raise AdapterError(
                f"{where}: layer {name!r}: conditioner {i} ({type(c.transform).__name__}) was "
                f"registered as a transform object or an unregistered class, so its options "
                f"are unknown; register the class with weightcond.register_transform and pass "
                f"its name and options to register_conditioning to make it saveable")
        transform, options = recipe
        record["conditioners"].append({
            "placement": c.placement, "side": c.side, "transform": transform,
            "options": {k: _json_value(where, f"option {k!r} of layer {name!r}", v)
                        for k, v in options.items()},
            "condition_bias": c.condition_bias,
        })
    return record


def adapter_layers(model: nn.Module, adapter_name: str | None, where: str
                    ) -> tuple[str, list[tuple[str, nn.Module, Conditioning]]]:
    if adapter_name is not None:
        check_adapter_name(where, adapter_name)
    layers = conditioned_layers(model)
    if not layers:
        raise AdapterError(f"{where}: argument 'model' expected a model with conditioned "
                           f"layers, got none in {type(model).__name__}")
    if adapter_name is None:
        active = {adapters_of(layer).active for _, layer in layers} - {None}
        if len(active) != 1:
            found = ("no active adapter" if not active else
                     "the active adapters " + ", ".join(map(repr, sorted(active))))
            raise AdapterError(f"{where}: argument 'adapter_name' is needed: the model's "
                               f"layers have {found}")
        adapter_name = active.pop()
    found = [(n, layer, adapters_of(layer).adapters[adapter_name]) for n, layer in layers
             if adapter_name in adapters_of(layer).adapters]
    if not found:
        names = sorted({a for _, layer in layers for a in adapters_of(layer).adapters})
        raise AdapterError(f"{where}: argument 'adapter_name' expected one of "
                           f"{', '.join(map(repr, names))}, got {adapter_name!r}")
    return adapter_name, found


def _clash(module: str, layers: Iterable[str]) -> str | None:
    """The first of ``layers`` that is ``module``, holds it or is inside it."""
    return next((n for n in layers if n == module or n.startswith(module + ".")
                 or module.startswith(n + ".")), None)


def check_modules_to_save(where: str, model: nn.Module, names: Any,
                          conditioned: Iterable[str]) -> list[str]:
    """``names`` (``None``: none) as a list of modules of ``model`` to save whole beside an
    adapter: each the name of a module, neither a conditioned layer nor holding one nor
    inside one (their tensors are the adapter's), none inside another; else raise
    :class:`~weightcond.OptionError` (not names of modules) or
    :class:`~weightcond.AdapterError`."""
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, (list, tuple)) \
            or not all(isinstance(n, str) for n in names):
        raise OptionError(f"{where}: argument 'modules_to_save' expected a list of module "
                          f"names, got {brief(names)}")
    modules = dict(model.named_modules())
    layers = list(conditioned)
    for name in names:
        if not name or name not in modules:
            raise OptionError(f"{where}: argument 'modules_to_save' expected names of modules "
                              f"of the model, got {brief(name)}")
        clash = _clash(name, layers)
        if clash is not None:
            raise AdapterError(f"{where}: argument 'modules_to_save' has {name!r}, which holds "
                               f"or is inside the conditioned layer {clash!r}: a module to "
                               f"save is not also conditioned")
        outer = next((n for n in names if name.startswith(n + ".")), None)
        if outer is not None:
            raise AdapterError(f"{where}: argument 'modules_to_save' has {name!r}, which is "
                               f"inside {outer!r}, also given")
    return list(dict.fromkeys(names))


def save_adapter(model: nn.Module, path: str | os.PathLike[str], *,
                 adapter_name: str | None = None,
                 modules_to_save: list[str] | tuple[str, ...] | None = None) -> Path:
    """Write the adapter ``adapter_name`` (``None``: the active one) of ``model`` to ``path``.

    ``path`` becomes a directory with ``weightcond_adapter.json`` and
    ``weightcond_adapter.safetensors`` (see :mod:`weightcond.io`); an existing adapter directory
    there is replaced, atomically (through a symbolic link, the directory it points to).
    :func:`load_adapter` on a freshly loaded base model rebuilds every conditioner and
    reproduces the outputs bit for bit.

    ``modules_to_save`` names modules saved whole beside the adapter — a classification
    head trained with it, say (:func:`weightcond.condition` leaves heads frozen; a head you
    unfroze and trained is not part of the adapter unless named here): their tensors
    (``state_dict``) are written under their names and :func:`load_adapter` writes them back
    into the model's modules of the same names. PEFT's ``modules_to_save``.

    Returns:
        The directory written.

    Raises:
        weightcond.AdapterError: no conditioned layers or no such adapter; a conditioner
            registered as an object (its options are unknown); a tensor with NaN or
            infinite values (no load would accept it); ``path`` not a str or path, holds
            other files, or lies under a file; a module to save that is, holds or is
            inside a conditioned layer, or inside another module to save.
        weightcond.OptionError: ``modules_to_save`` not a list of the model's module names.
        weightcond.LayerTypeError: ``model`` is not a module.

    Example:
        >>> import tempfile, torch, weightcond as wc
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = wc.condition(model, "sora", target_modules=["0"], rank=2)
        >>> folder = wc.save_adapter(model, tempfile.mkdtemp() + "/sora")
        >>> sorted(p.name for p in folder.iterdir())
        ['weightcond_adapter.json', 'weightcond_adapter.safetensors']
    """
    from safetensors.torch import save_file

    where = "save_adapter"
    require_module(model, where, "model")
    target = check_path(where, path)
    adapter_name, found = adapter_layers(model, adapter_name, where)
    saved = check_modules_to_save(where, model, modules_to_save,
                                  [n for n, _ in conditioned_layers(model)])
    config: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "weightcond_version": __version__,
        "torch_version": torch.__version__, "model": type(model).__name__,
        "adapter_name": adapter_name, "layers": {}, "modules": {},
    }
    tensors: dict[str, Tensor] = {}
    for name, layer, conditioning in found:
        record = _layer_record(name, layer, conditioning, where)
        state = conditioning.state_dict()
        record["tensors"] = sorted(state)
        config["layers"][name] = record
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    # no module to save is, holds or is inside a conditioned layer, so no name is taken twice
    for name in saved:
        state = model.get_submodule(name).state_dict()
        config["modules"][name] = {"tensors": sorted(state)}
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    config["tensors_sha256"] = _digest(tensors)
    # the digest of what a load will parse: the JSON round trip turns tuples into lists
    config["recipe_sha256"] = _recipe_digest(json.loads(json.dumps(config, allow_nan=False)))
    write_atomically(target, config, tensors, save_file, where)
    return target


def write_atomically(target: Path, config: dict[str, Any], tensors: dict[str, Tensor],
                      save_file: Any, where: str,
                      names: tuple[str, str] = (CONFIG_NAME, TENSORS_NAME)) -> None:
    """Write ``config`` and ``tensors`` as the files ``names`` of the directory ``target``,
    atomically; an existing directory is replaced only if it holds nothing but adapter files
    (weightcond's or PEFT's names)."""
    config_name, tensors_name = names
    for key, value in tensors.items():  # what no load accepts is not written
        if value.is_floating_point() and not _finite(value):
            raise AdapterError(f"{where}: tensor {key!r} has NaN or infinite values; a saved "
                               f"adapter is finite")
    if target.name in ("", ".", ".."):
        raise AdapterError(f"{where}: argument 'path' expected a path ending in a directory "
                           f"name, got {str(target)!r}")
    if target.is_symlink():  # replace what the link points to, and keep the link
        target = target.resolve()
    ancestor = next((p for p in target.parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        relation = "parent" if ancestor == target.parent else "ancestor"
        state = "is a file" if ancestor.is_file() else "is not a directory"
        raise AdapterError(f"{where}: argument 'path' expected a path whose parent is a "
                           f"directory, got {str(target)!r}, but its {relation} "
                           f"{str(ancestor)!r} {state}")
    if target.exists() and not (target.is_dir() and {p.name for p in target.iterdir()}
                                <= set(_ADAPTER_FILES)):
        raise AdapterError(f"{where}: argument 'path' expected a new directory or a saved "
                           f"adapter to replace, got {str(target)!r}, which holds other files")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_directory(target)
    old = staging.with_suffix(".old")
    try:
        save_file(tensors, staging / tensors_name, metadata={"format": "pt"})
        with open(staging / config_name, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, allow_nan=False)
            f.write("\n")
        for name in names:
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        if target.exists():
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_directory(target: Path) -> Path:
    """A new empty directory beside ``target``. Not :func:`tempfile.mkdtemp`: its directory is
    mode 0o700 and the rename keeps that, so the adapter would be unreadable to other users;
    :meth:`~pathlib.Path.mkdir` gives the mode of any directory the user creates (umask)."""
    while True:
        staging = target.parent / f".{target.name}.{secrets.token_hex(6)}.partial"
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        return staging


# -- reading -----------------------------------------------------------------------------------
class _Malformed(ValueError):
    """Raised by the JSON hooks below; becomes a malformed-configuration AdapterError."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys: a second "alpha" would hide the first
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise _Malformed(f"the key {brief(key)} appears twice in one object")
        value[key] = item
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 reads as inf
        shown = text if len(text) <= 40 else text[:12] + "…"
        raise _Malformed(f"the number {shown} is out of range (it reads as {value})")
    return value


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise _Malformed(f"the integer {text[:12]}… has {len(text.lstrip('-'))} digits")
    return int(text)


def _json_constant(text: str) -> Any:
    raise _Malformed(f"{text} is not a JSON number")  # NaN, Infinity, -Infinity


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children: Iterable[Any] = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def read_json(file: Path, where: str) -> Any:
    """The parsed JSON file ``file``: strict JSON (no NaN or infinities, no duplicate keys,
    no numbers out of range, at most 64 levels deep)."""
    nested = f"malformed {file.name}: nested more than {_MAX_DEPTH} levels deep"
    try:
        value = json.loads(file.read_text(encoding="utf-8"),
                           object_pairs_hook=_json_object, parse_float=_json_float,
                           parse_int=_json_int, parse_constant=_json_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{where}: {file.name} is not valid JSON ({error})") from None
    except _Malformed as error:
        raise AdapterError(f"{where}: malformed {file.name}: {error}") from None
    except RecursionError:
        raise AdapterError(f"{where}: {nested}") from None
    if _too_deep(value, _MAX_DEPTH):
        raise AdapterError(f"{where}: {nested}")
    return value


def read_tensors(file: Path, where: str) -> dict[str, Tensor]:
    """The tensors of the safetensors file ``file`` (nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{where}: {file.name} is not a readable safetensors file "
                           f"(truncated, corrupted or another format): {error}") from None


# -- loading -----------------------------------------------------------------------------------
def adapter_files(path: Path) -> tuple[str, str]:
    """The names of the configuration and tensors files of the saved adapter in the
    directory ``path``: :data:`CONFIG_NAME` and :data:`TENSORS_NAME`, or PEFT's names where
    only those are there (an adapter saved by an earlier weightcond, or a PEFT adapter, which
    :func:`load_adapter` refuses, naming :func:`~weightcond.from_peft`). See Note (file
    names)."""
    own = (CONFIG_NAME, TENSORS_NAME)
    legacy = (PEFT_CONFIG_NAME, PEFT_TENSORS_NAME)
    if not any((path / n).exists() for n in own) and any((path / n).exists() for n in legacy):
        return legacy
    return own


def _read(path: Path, where: str) -> tuple[dict[str, Any], dict[str, Tensor], tuple[str, str]]:
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise AdapterError(f"{where}: argument 'path' expected a saved adapter directory, got "
                           f"{str(path)!r}, which {state}")
    names = config_name, tensors_name = adapter_files(path)
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise AdapterError(f"{where}: {str(path)!r} is not a saved adapter: "
                           f"{', '.join(missing)} missing")
    config = read_json(path / config_name, where)
    try:
        _check_config(config, where, config_name)
    except _Malformed as error:
        raise AdapterError(f"{where}: malformed {config_name}: {error}") from None
    if config["format_version"] >= 2 and _recipe_digest(config) != config["recipe_sha256"]:
        raise AdapterError(f"{where}: {config_name} does not match the SHA-256 of its recipe "
                           f"recorded in it ('recipe_sha256'): edited after it was saved, or "
                           f"corrupted")
    tensors = read_tensors(path / tensors_name, where)
    if _digest(tensors) != config["tensors_sha256"]:
        raise AdapterError(f"{where}: {tensors_name} does not match the SHA-256 recorded in "
                           f"{config_name} (corrupted, or not the file saved with it)")
    return config, tensors, names


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise _Malformed(what)


def _known_keys(value: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    unknown = [k for k in value if k not in keys]
    if unknown:
        raise _Malformed(f"{what}the unknown key {brief(unknown[0])}; expected "
                         f"{', '.join(map(repr, keys))}")


def _check_config(config: Any, where: str, config_name: str) -> None:
    """Types and ranges of every field (what needs the model, at :func:`_rebuild`); a
    malformed field raises :class:`_Malformed`."""
    _expect(isinstance(config, dict), "expected a JSON object")
    if config.get("format") != FORMAT:
        raise AdapterError(f"{where}: {config_name} expected format {FORMAT!r}, got "
                           f"{brief(config.get('format'))} (a PEFT adapter? use "
                           f"weightcond.from_peft)")
    version = config.get("format_version")
    _expect(is_int(version) and 1 <= version <= FORMAT_VERSION,
            f"format_version expected 1..{FORMAT_VERSION}, got {brief(version)} (saved by "
            f"weightcond {brief(config.get('weightcond_version'))}; this is {__version__})")
    keys = tuple(k for k in _KEYS if _SINCE.get(k, 1) <= version)
    _known_keys(config, keys, "the configuration has ")
    for key in ("weightcond_version", "torch_version", "model"):
        _expect(isinstance(config.get(key), str),
                f"{key!r} expected a str, got {brief(config.get(key))}")
    try:
        check_adapter_name(where, config.get("adapter_name"))
    except OptionError:
        _expect(False, f"'adapter_name' expected a name of letters, digits, '_' and '-', "
                       f"got {brief(config.get('adapter_name'))}")
    for key in ("tensors_sha256", "recipe_sha256")[:version]:
        digest = config.get(key)
        _expect(isinstance(digest, str) and bool(_SHA256.fullmatch(digest)),
                f"{key!r} expected a SHA-256 hex digest"
                f"{' (format 2 on)' if key == 'recipe_sha256' else ''}, got {brief(digest)}")
    layers = config.get("layers")
    _expect(isinstance(layers, dict) and bool(layers), "'layers' expected a non-empty object")
    for name, record in layers.items():
        _check_record(f"layer {name!r}", record)
    saved = config.get("modules", {})  # none before format 3
    _expect(isinstance(saved, dict) and all(
        isinstance(r, dict) and list(r) == ["tensors"] and isinstance(r["tensors"], list)
        and all(isinstance(k, str) for k in r["tensors"]) for r in saved.values()),
        f"'modules' expected an object of module names to {{'tensors': [names]}}, got "
        f"{brief(saved)}")


def _check_record(at: str, record: Any) -> None:
    _expect(isinstance(record, dict), f"{at} expected an object")
    _known_keys(record, _RECORD_KEYS, f"{at} has ")
    _expect(isinstance(record.get("kind"), str), f"{at}: 'kind' expected a str")
    shape = record.get("shape")
    _expect(isinstance(shape, list) and len(shape) == 2
            and all(is_int(v) and v > 0 for v in shape),
            f"{at}: 'shape' expected [out, in], got {brief(shape)}")
    _expect(record.get("dtype") in _FLOAT_DTYPES,
            f"{at}: 'dtype' expected one of {', '.join(map(repr, sorted(_FLOAT_DTYPES)))}, got "
            f"{brief(record.get('dtype'))}")
    update = record.get("update")
    _expect(update is None or (isinstance(update, dict) and is_int(update.get("rank"))
                               and is_finite_number(update.get("alpha"))),
            f"{at}: 'update' expected null or {{'rank': int, 'alpha': number}}, got "
                   f"{brief(update)}")
    if update is not None:
        _known_keys(update, _UPDATE_KEYS, f"{at}: 'update' has ")
    entries = record.get("conditioners")
    _expect(isinstance(entries, list), f"{at}: 'conditioners' expected a list")
    for i, entry in enumerate(entries):
        _expect(isinstance(entry, dict)
                and all(isinstance(entry.get(k), str) for k in ("placement", "side", "transform"))
                and isinstance(entry.get("options"), dict)
                and isinstance(entry.get("condition_bias"), bool),
                f"{at}: conditioner {i} expected placement, side, transform, options and "
                f"condition_bias")
        _known_keys(entry, _ENTRY_KEYS, f"{at}: conditioner {i} has ")
    _expect(isinstance(record.get("tensors"), list)
            and all(isinstance(k, str) for k in record["tensors"]),
            f"{at}: 'tensors' expected a list of names")


def _rebuild(name: str, layer: nn.Module, record: dict[str, Any], adapter_name: str,
             where: str) -> Conditioning:
    """A new, unattached :class:`Conditioning` for one layer, built from its record."""
    kind = layer_kind(layer, where)
    shape = kind.shape(layer)
    # a quantized Linear and a float one read the same (out, in) matrix: an adapter trained on
    # one loads onto the other (QLoRA: train on the 4-bit base, merge into the float model)
    recorded = LAYER_KINDS[record["kind"]].family if record["kind"] in LAYER_KINDS else None
    if recorded != kind.family or list(shape) != record["shape"]:
        raise AdapterError(f"{where}: layer {name!r} expected {_a(record['kind'])} of shape "
                           f"(out, in) = {tuple(record['shape'])}, got {_a(kind.name)} of shape "
                           f"{shape} (an adapter for another model?)")
    # the builders validate every value as registration does (ranges, and numbers the
    # layer's dtype cannot hold: alpha = 1e308 in float32)
    conditioning = Conditioning(*shape)
    if record["update"] is not None:
        conditioning.update = build_update(layer, where, rank=record["update"]["rank"],
                                            alpha=record["update"]["alpha"],
                                            adapter_name=adapter_name)
    base = kind.frozen(layer)
    for entry in record["conditioners"]:
        conditioner = build_conditioner(
            layer, where, placement=entry["placement"], side=entry["side"],
            transform=entry["transform"], condition_bias=entry["condition_bias"],
            options=entry["options"])
        add_conditioner(conditioning, base, conditioner)
    return conditioning


def _fill(name: str, conditioning: Conditioning, record: dict[str, Any],
          tensors: dict[str, Tensor], where: str) -> None:
    state = conditioning.state_dict()
    if sorted(state) != sorted(record["tensors"]):
        raise AdapterError(f"{where}: layer {name!r}: the rebuilt adapter has tensors "
                           f"{sorted(state)}, the configuration lists {sorted(record['tensors'])}")
    saved = _FLOAT_DTYPES[record["dtype"]]
    loaded, kept = {}, {}
    for key, expected in state.items():
        full = f"{name}.{key}"
        value = tensors[full]
        # a floating tensor saved in the layer's dtype takes the model's (checked finite
        # there); one saved in another floating dtype keeps it (an adapter kept in float32
        # on a bfloat16 base, as PEFT's autocast_adapter_dtype does, loads as it was
        # saved); anything else is not cast
        floating = expected.is_floating_point()
        if floating and value.dtype not in _FLOAT_DTYPES.values():
            raise AdapterError(f"{where}: tensor {full!r} expected a floating dtype (one of "
                               f"{', '.join(_FLOAT_DTYPES)}), got {_dtype_name(value.dtype)}")
        if not floating and value.dtype != expected.dtype:
            raise AdapterError(f"{where}: tensor {full!r} expected dtype "
                               f"{_dtype_name(expected.dtype)}, got {_dtype_name(value.dtype)}")
        if floating:
            check_tensor(where, full, value)
        if tuple(value.shape) != tuple(expected.shape):
            raise AdapterError(f"{where}: tensor {full!r} expected shape "
                               f"{tuple(expected.shape)}, got {tuple(value.shape)}")
        if floating and value.dtype != saved:
            loaded[key] = value.to(expected.device)
            kept[key] = value.dtype
        else:
            loaded[key] = cast_finite(where, full, value, expected, "the model's dtype")
    for key, dtype in kept.items():  # the rebuilt tensor takes the saved dtype
        module_name, _, attribute = key.rpartition(".")
        module = conditioning.get_submodule(module_name)
        tensor = getattr(module, attribute)
        tensor.data = tensor.data.to(dtype)
    conditioning.load_state_dict(loaded, strict=True)


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *,
                 adapter_name: str | None = None) -> str:
    """Rebuild a saved adapter on ``model`` (a freshly loaded base model, say) and load it.

    Every conditioner is rebuilt from the saved recipe and every tensor loaded, so the
    outputs equal the saved model's bit for bit (same dtype and device). The adapter is
    named ``adapter_name`` (``None``: the saved name) and becomes the active one; as with
    :func:`weightcond.condition`, only its parameters are left trainable — and those of the
    modules saved with it (``modules_to_save`` of :func:`save_adapter`), which are written
    into the model's modules of the same names: they are the model's, shared by all its
    adapters, and no :func:`weightcond.remove_conditioning` restores them.

    Returns:
        The adapter's name.

    Raises:
        weightcond.AdapterError: a missing, truncated or corrupted file, one that is not a
            saved adapter, a malformed configuration (too deep, duplicate keys, NaN or
            out-of-range numbers, a field of the wrong type or range, unknown keys), a
            recipe or tensors that do not match their SHA-256, missing or extra tensors or
            layers, tensors of another dtype or shape or with NaN or infinite values, other
            layer types, an unknown transform or option, saved modules the model lacks or
            has conditioned; the model is left exactly as it was. Nothing is unpickled.
        weightcond.StateError: a layer already has an adapter of that name.
        weightcond.LayerTypeError: ``model`` is not a module.

    Example:
        >>> import tempfile, torch, weightcond as wc
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = wc.condition(model, "dora", target_modules=["0"], rank=2)
        >>> folder = wc.save_adapter(model, tempfile.mkdtemp() + "/dora")
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> fresh.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
        ...                        for k, v in model.state_dict().items() if "adapters" not in k})
        <All keys matched successfully>
        >>> wc.load_adapter(fresh, folder)
        'default'
        >>> x = torch.randn(3, 8)
        >>> torch.equal(fresh(x), model(x))
        True
    """
    from .model import activate

    where = "load_adapter"
    require_module(model, where, "model")
    config, tensors, (config_name, tensors_name) = _read(check_path(where, path), where)
    name = config["adapter_name"] if adapter_name is None else adapter_name
    check_adapter_name(where, name)
    records: dict[str, dict[str, Any]] = config["layers"]
    modules = dict(model.named_modules())
    absent = [n for n in records if n not in modules]
    if absent:
        raise AdapterError(f"{where}: the adapter conditions layers the model does not have: "
                           f"{', '.join(map(repr, absent[:5]))}{' …' if len(absent) > 5 else ''}"
                           f" (an adapter for another model?)")
    saved: dict[str, dict[str, Any]] = config.get("modules", {})  # format 3 on
    absent = [n for n in saved if n not in modules]
    if absent:
        raise AdapterError(f"{where}: the adapter saves modules the model does not have: "
                           f"{', '.join(map(repr, absent[:5]))} (an adapter for another model?)")
    expected = {f"{n}.{k}" for n, r in [*records.items(), *saved.items()] for k in r["tensors"]}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(f"{where}: {tensors_name} does not match {config_name}: missing "
                           f"{missing[:5] or 'none'}, extra {extra[:5] or 'none'}")
    taken = [n for n in records if is_conditioned(modules[n])
             and name in adapters_of(modules[n]).adapters]
    if taken:
        raise StateError(f"{where}: argument 'adapter_name' expected a new adapter, got "
                         f"{name!r}, which layer {taken[0]!r} already has; pass another name")
    copies = _module_tensors(model, saved, tensors, records, where, config_name)
    built: list[tuple[str, Conditioning]] = []
    for layer_name, record in records.items():
        try:
            conditioning = _rebuild(layer_name, modules[layer_name], record, name, where)
            _fill(layer_name, conditioning, record, tensors, where)
        except (AdapterError, StateError):
            raise
        except WeightcondError as error:  # the builders' messages already start with where
            message = str(error).removeprefix(f"{where}: ")
            raise AdapterError(f"{where}: layer {layer_name!r}: {message}") from None
        built.append((layer_name, conditioning))
    installed: list[tuple[nn.Module, str | None]] = []
    try:
        for layer_name, conditioning in built:
            layer = modules[layer_name]
            active = adapters_of(layer).active if is_conditioned(layer) else None
            install_conditioning(layer, name, conditioning)
            installed.append((layer, active))
    except Exception:
        for layer, active in installed:  # put the model back as it was
            remove_conditioning(layer, adapter_name=name)
            if active is not None:
                adapters_of(layer).active = active
        raise
    for _, conditioning in built:
        for c in conditioning.conditioners():
            c.transform._weightcond_attached = True
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)
    activate(model, name)
    for target, _ in copies:  # trained with the adapter: trainable with it
        if isinstance(target, nn.Parameter):
            target.requires_grad_(True)
    return name


def _module_tensors(model: nn.Module, saved: dict[str, dict[str, Any]],
                    tensors: dict[str, Tensor], records: dict[str, Any], where: str,
                    config_name: str) -> list[tuple[Tensor, Tensor]]:
    """Each saved module's tensor in the model and the value to copy into it: checked
    (names, shapes, dtypes, finite) and cast, before anything changes."""
    layers = [*records, *(n for n, _ in conditioned_layers(model))]
    copies = []
    for module_name, record in saved.items():
        clash = _clash(module_name, layers)
        if clash is not None:
            raise AdapterError(f"{where}: the saved module {module_name!r} holds or is inside "
                               f"the conditioned layer {clash!r}")
        state = model.get_submodule(module_name).state_dict(keep_vars=True)
        if sorted(state) != sorted(record["tensors"]):
            raise AdapterError(f"{where}: module {module_name!r} has tensors {sorted(state)}, "
                               f"{config_name} lists {sorted(record['tensors'])}")
        for key, target in state.items():
            full = f"{module_name}.{key}"
            copies.append((target, fitted(where, full, tensors[full], target)))
    return copies
