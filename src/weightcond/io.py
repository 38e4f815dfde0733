"""Saving and loading adapters: safetensors for the tensors, JSON for the recipe.

An adapter directory holds two files:

* ``adapter_config.json`` — the format and library version and, for every conditioned
  layer, its kind and shape, the update's rank and alpha, and every conditioner's
  placement, side, transform name, options and ``condition_bias``: enough to rebuild each
  conditioner exactly (the released SORA code loses its rotation on reload; this does not),
  and the SHA-256 of the tensors, so a corrupted tensors file fails to load;
* ``adapter_model.safetensors`` — every tensor of each layer's adapter, under
  ``<layer name>.<key in the adapter's state_dict>``.

Nothing is ever unpickled: ``json`` and `safetensors <https://huggingface.co/docs/
safetensors>`_ only (we chose safetensors for tensors on disk: a fixed header, no code).
Writes go to a temporary directory beside the target that is renamed into place, so a
failed save leaves no half-written adapter. A load validates the whole file and builds
every conditioner before it changes the model, so any failure leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AdapterError, OptionError, StateError, WeightcondError
from .layer import (
    _adapters,
    _add_conditioner,
    _base_matrix,
    _build_conditioner,
    _build_update,
    _install,
    check_adapter_name,
    conditioned_layers,
    is_conditioned,
    remove_conditioning,
)
from .placement import Conditioning
from .reshape import layer_kind

__all__ = ["CONFIG_NAME", "TENSORS_NAME", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
TENSORS_NAME = "adapter_model.safetensors"
FORMAT = "weightcond.adapter"
FORMAT_VERSION = 1


def _version() -> str:
    from . import __version__
    return __version__


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
        "dtype": str(_base_matrix(layer).dtype).removeprefix("torch."),
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


def _adapter_layers(model: nn.Module, adapter_name: str | None, where: str
                    ) -> tuple[str, list[tuple[str, nn.Module, Conditioning]]]:
    layers = conditioned_layers(model)
    if not layers:
        raise AdapterError(f"{where}: argument 'model' expected a model with conditioned "
                           f"layers, got none in {type(model).__name__}")
    if adapter_name is None:
        active = {_adapters(layer).active for _, layer in layers} - {None}
        if len(active) != 1:
            found = ("no active adapter" if not active else
                     "the active adapters " + ", ".join(map(repr, sorted(active))))
            raise AdapterError(f"{where}: argument 'adapter_name' is needed: the model's "
                               f"layers have {found}")
        adapter_name = active.pop()
    found = [(n, layer, _adapters(layer).adapters[adapter_name]) for n, layer in layers
             if adapter_name in _adapters(layer).adapters]
    if not found:
        names = sorted({a for _, layer in layers for a in _adapters(layer).adapters})
        raise AdapterError(f"{where}: argument 'adapter_name' expected one of "
                           f"{', '.join(map(repr, names))}, got {adapter_name!r}")
    return adapter_name, found


def save_adapter(model: nn.Module, path: str | os.PathLike[str], *,
                 adapter_name: str | None = None) -> Path:
    """Write the adapter ``adapter_name`` (``None``: the active one) of ``model`` to ``path``.

    ``path`` becomes a directory with ``adapter_config.json`` and
    ``adapter_model.safetensors`` (see :mod:`weightcond.io`); an existing adapter directory
    there is replaced, atomically. :func:`load_adapter` on a freshly loaded base model
    rebuilds every conditioner and reproduces the outputs bit for bit.

    Returns:
        The directory written.

    Raises:
        weightcond.AdapterError: no conditioned layers or no such adapter; a conditioner
            registered as an object (its options are unknown); ``path`` holds other files.

    Example:
        >>> import tempfile, torch, weightcond as wc
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = wc.condition(model, "sora", target_modules=["0"], rank=2)
        >>> folder = wc.save_adapter(model, tempfile.mkdtemp() + "/sora")
        >>> sorted(p.name for p in folder.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    from safetensors.torch import save_file

    where = "save_adapter"
    adapter_name, found = _adapter_layers(model, adapter_name, where)
    config: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "weightcond_version": _version(),
        "torch_version": torch.__version__, "model": type(model).__name__,
        "adapter_name": adapter_name, "layers": {},
    }
    tensors: dict[str, Tensor] = {}
    for name, layer, conditioning in found:
        record = _layer_record(name, layer, conditioning, where)
        state = conditioning.state_dict()
        record["tensors"] = sorted(state)
        config["layers"][name] = record
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    config["tensors_sha256"] = _digest(tensors)
    target = Path(path)
    _write_atomically(target, config, tensors, save_file, where)
    return target


def _write_atomically(target: Path, config: dict[str, Any], tensors: dict[str, Tensor],
                      save_file: Any, where: str) -> None:
    if target.exists() and not (target.is_dir() and {p.name for p in target.iterdir()}
                                <= {CONFIG_NAME, TENSORS_NAME}):
        raise AdapterError(f"{where}: argument 'path' expected a new directory or a saved "
                           f"adapter to replace, got {str(target)!r}, which holds other files")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_directory(target)
    old = staging.with_suffix(".old")
    try:
        save_file(tensors, staging / TENSORS_NAME, metadata={"format": "pt"})
        with open(staging / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, allow_nan=False)
            f.write("\n")
        for name in (TENSORS_NAME, CONFIG_NAME):
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


# -- loading -----------------------------------------------------------------------------------
def _read(path: Path, where: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise AdapterError(f"{where}: argument 'path' expected a saved adapter directory, got "
                           f"{str(path)!r}, which {state}")
    missing = [n for n in (CONFIG_NAME, TENSORS_NAME) if not (path / n).is_file()]
    if missing:
        raise AdapterError(f"{where}: {str(path)!r} is not a saved adapter: "
                           f"{', '.join(missing)} missing")
    config = read_json(path, where)
    _check_config(config, where)
    tensors = read_tensors(path, where)
    if _digest(tensors) != config["tensors_sha256"]:
        raise AdapterError(f"{where}: {TENSORS_NAME} does not match the SHA-256 recorded in "
                           f"{CONFIG_NAME} (corrupted, or not the file saved with it)")
    return config, tensors


def read_json(path: Path, where: str) -> Any:
    """The parsed ``adapter_config.json`` of the directory ``path``."""
    try:
        return json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{where}: {CONFIG_NAME} is not valid JSON ({error})") from None


def read_tensors(path: Path, where: str) -> dict[str, Tensor]:
    """The tensors of ``adapter_model.safetensors`` in ``path`` (safetensors only: nothing is
    unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path / TENSORS_NAME)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{where}: {TENSORS_NAME} is not a readable safetensors file "
                           f"(truncated, corrupted or another format): {error}") from None


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise AdapterError(f"{where}: malformed {CONFIG_NAME}: {what}")


def _check_config(config: Any, where: str) -> None:
    _expect(isinstance(config, dict), where, "expected a JSON object")
    if config.get("format") != FORMAT:
        raise AdapterError(f"{where}: {CONFIG_NAME} expected format {FORMAT!r}, got "
                           f"{config.get('format')!r} (a PEFT adapter? use weightcond.from_peft)")
    version = config.get("format_version")
    _expect(isinstance(version, int) and 1 <= version <= FORMAT_VERSION, where,
            f"format_version expected 1..{FORMAT_VERSION}, got {version!r} (saved by weightcond "
            f"{config.get('weightcond_version')!r}; this is {_version()})")
    try:
        check_adapter_name(where, config.get("adapter_name"))
    except OptionError:
        _expect(False, where, f"'adapter_name' expected a name of letters, digits, '_' and '-', "
                              f"got {config.get('adapter_name')!r}")
    digest = config.get("tensors_sha256")
    _expect(isinstance(digest, str) and len(digest) == 64, where,
            f"'tensors_sha256' expected a SHA-256 hex digest, got {digest!r}")
    layers = config.get("layers")
    _expect(isinstance(layers, dict) and bool(layers), where, "'layers' expected a non-empty "
            "object")
    for name, record in layers.items():
        at = f"layer {name!r}"
        _expect(isinstance(record, dict), where, f"{at} expected an object")
        _expect(isinstance(record.get("kind"), str), where, f"{at}: 'kind' expected a str")
        shape = record.get("shape")
        _expect(isinstance(shape, list) and len(shape) == 2
                and all(isinstance(v, int) and v > 0 for v in shape), where,
                f"{at}: 'shape' expected [out, in]")
        update = record.get("update")
        _expect(update is None or (isinstance(update, dict)
                                   and isinstance(update.get("rank"), int)
                                   and isinstance(update.get("alpha"), (int, float))),
                where, f"{at}: 'update' expected null or {{'rank': int, 'alpha': number}}")
        entries = record.get("conditioners")
        _expect(isinstance(entries, list), where, f"{at}: 'conditioners' expected a list")
        for i, entry in enumerate(entries):
            _expect(isinstance(entry, dict)
                    and all(isinstance(entry.get(k), str)
                            for k in ("placement", "side", "transform"))
                    and isinstance(entry.get("options"), dict)
                    and isinstance(entry.get("condition_bias"), bool), where,
                    f"{at}: conditioner {i} expected placement, side, transform, options and "
                    f"condition_bias")
        _expect(isinstance(record.get("tensors"), list)
                and all(isinstance(k, str) for k in record["tensors"]), where,
                f"{at}: 'tensors' expected a list of names")


def _rebuild(name: str, layer: nn.Module, record: dict[str, Any], adapter_name: str,
             where: str) -> Conditioning:
    """A new, unattached :class:`Conditioning` for one layer, built from its record."""
    kind = layer_kind(layer, where)
    shape = kind.shape(layer)
    if record["kind"] != kind.name or list(shape) != record["shape"]:
        raise AdapterError(f"{where}: layer {name!r} expected a {record['kind']} of shape "
                           f"(out, in) = {tuple(record['shape'])}, got a {kind.name} of shape "
                           f"{shape} (an adapter for another model?)")
    conditioning = Conditioning(*shape)
    if record["update"] is not None:
        conditioning.update = _build_update(layer, where, rank=record["update"]["rank"],
                                            alpha=record["update"]["alpha"],
                                            adapter_name=adapter_name)
    base = _base_matrix(layer)
    for entry in record["conditioners"]:
        conditioner = _build_conditioner(
            layer, where, placement=entry["placement"], side=entry["side"],
            transform=entry["transform"], condition_bias=entry["condition_bias"],
            options=entry["options"])
        _add_conditioner(conditioning, base, conditioner)
    return conditioning


def _fill(name: str, conditioning: Conditioning, record: dict[str, Any],
          tensors: dict[str, Tensor], where: str) -> None:
    state = conditioning.state_dict()
    if sorted(state) != sorted(record["tensors"]):
        raise AdapterError(f"{where}: layer {name!r}: the rebuilt adapter has tensors "
                           f"{sorted(state)}, the configuration lists {sorted(record['tensors'])}")
    loaded = {}
    for key, expected in state.items():
        value = tensors[f"{name}.{key}"]
        if tuple(value.shape) != tuple(expected.shape):
            raise AdapterError(f"{where}: tensor {name + '.' + key!r} expected shape "
                               f"{tuple(expected.shape)}, got {tuple(value.shape)}")
        loaded[key] = value.to(dtype=expected.dtype, device=expected.device)
    conditioning.load_state_dict(loaded, strict=True)


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *,
                 adapter_name: str | None = None) -> str:
    """Rebuild a saved adapter on ``model`` (a freshly loaded base model, say) and load it.

    Every conditioner is rebuilt from the saved recipe and every tensor loaded, so the
    outputs equal the saved model's bit for bit (same dtype and device). The adapter is
    named ``adapter_name`` (``None``: the saved name) and becomes the active one; as with
    :func:`weightcond.condition`, only its parameters are left trainable.

    Returns:
        The adapter's name.

    Raises:
        weightcond.AdapterError: a missing, truncated or corrupted file, one that is not a
            saved adapter, a malformed configuration, missing or extra tensors or layers,
            other shapes or layer types, an unknown transform or option; the model is left
            exactly as it was. Nothing is unpickled.
        weightcond.StateError: a layer already has an adapter of that name.

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
    from .model import _activate

    where = "load_adapter"
    config, tensors = _read(Path(path), where)
    name = config["adapter_name"] if adapter_name is None else adapter_name
    check_adapter_name(where, name)
    records: dict[str, dict[str, Any]] = config["layers"]
    modules = dict(model.named_modules())
    absent = [n for n in records if n not in modules]
    if absent:
        raise AdapterError(f"{where}: the adapter conditions layers the model does not have: "
                           f"{', '.join(map(repr, absent[:5]))}{' …' if len(absent) > 5 else ''}"
                           f" (an adapter for another model?)")
    expected = {f"{n}.{k}" for n, r in records.items() for k in r["tensors"]}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(f"{where}: {TENSORS_NAME} does not match {CONFIG_NAME}: missing "
                           f"{missing[:5] or 'none'}, extra {extra[:5] or 'none'}")
    taken = [n for n in records if is_conditioned(modules[n])
             and name in _adapters(modules[n]).adapters]
    if taken:
        raise StateError(f"{where}: argument 'adapter_name' expected a new adapter, got "
                         f"{name!r}, which layer {taken[0]!r} already has; pass another name")
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
            active = _adapters(layer).active if is_conditioned(layer) else None
            _install(layer, name, conditioning)
            installed.append((layer, active))
    except Exception:
        for layer, active in installed:  # put the model back as it was
            remove_conditioning(layer, adapter_name=name)
            if active is not None:
                _adapters(layer).active = active
        raise
    for _, conditioning in built:
        for c in conditioning.conditioners():
            c.transform._weightcond_attached = True
    _activate(model, name)
    return name
