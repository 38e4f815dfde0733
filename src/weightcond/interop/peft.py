"""Load a PEFT adapter's tensors for one layer into the equivalent weightcond preset.

This converts tensors, not PEFT's directory format (that belongs to the model workflow).
The mappings, each tested for equal outputs against the installed ``peft``:

* LoRA / DoRA: ``lora_A`` → ``A``, ``lora_B`` → ``B``, ``lora_magnitude_vector`` → the
  magnitude; ``alpha`` is PEFT's ``lora_alpha``.
* OFT, exact path (``use_cayley_neumann=False``): PEFT rotates row vectors by
  :math:`(I - Q)(I + Q)^{-1}`, which on columns is our ``cayley(2Q)``: our generator is
  ``2 · oft_R``. PEFT's Neumann path approximates the inverse of that rotation (DESIGN §6),
  so it maps to our ``"cayley_neumann"`` map with the generator ``-2 · oft_R`` and the same
  number of terms; the two truncations differ in the weight of the last term (PEFT gives
  it 1, ours 2), a difference of order :math:`\\|Q\\|^{\\text{terms}-1}`.
* HRA: ``hra_u`` → ``U`` of the right Householder product (``apply_GS`` → our
  ``gram_schmidt``).
* BOFT: ``boft_R`` (full blocks :math:`D`) → the butterfly generator, the upper triangle
  of :math:`D - D^\top` (PEFT's Cayley of :math:`(D - D^\top)/2` on row vectors is our
  Cayley of :math:`D - D^\top` on columns); ``boft_s`` → the output ``diag``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import OptionError, ShapeError, StateError, UnknownNameError
from ..layer import is_conditioned, remove_conditioning
from ..presets import Applied, apply_preset

__all__ = ["from_peft_tensors"]

_OPTIONS = {"lora": {"lora_alpha"}, "dora": {"lora_alpha"}, "hra": {"apply_GS"}, "boft": set(),
            "oft": {"oft_block_size", "block_share", "use_cayley_neumann",
                    "num_cayley_neumann_terms"}}
_REQUIRED = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
             "oft": ("oft_R",), "hra": ("hra_u",), "boft": ("boft_R", "boft_s")}


def _take(tensors: Mapping[str, Tensor], method: str) -> dict[str, Tensor]:
    where = f"from_peft_tensors({method!r})"
    missing = [k for k in _REQUIRED[method] if k not in tensors]
    extra = sorted(set(tensors) - set(_REQUIRED[method]))
    if missing or extra:
        raise OptionError(f"{where}: argument 'tensors' expected the keys "
                          f"{list(_REQUIRED[method])}, got {sorted(tensors)}")
    return {k: tensors[k] for k in _REQUIRED[method]}


def _copy(where: str, name: str, target: nn.Parameter, value: Tensor) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ShapeError(f"{where}: tensor {name!r} expected shape {tuple(target.shape)}, got "
                         f"{tuple(value.shape)}")
    with torch.no_grad():
        target.copy_(value)


def from_peft_tensors(layer: nn.Module, method: str, tensors: Mapping[str, Tensor],
                      **config: Any) -> Applied:
    """Condition ``layer`` with the preset equivalent to a PEFT adapter and load its tensors.

    Args:
        layer: the base layer (unconditioned).
        method: ``"lora"``, ``"dora"``, ``"oft"``, ``"boft"`` or ``"hra"``.
        tensors: the adapter's tensors for this layer under PEFT's names without the adapter
            name (``lora_A``/``lora_B`` as the ``(r, in)``/``(out, r)`` weights,
            ``lora_magnitude_vector``, ``oft_R``, ``boft_R``, ``boft_s``, ``hra_u``).
        **config: PEFT's options: ``lora_alpha`` (LoRA/DoRA); ``oft_block_size`` (inferred
            from ``oft_R`` when omitted), ``block_share``, ``use_cayley_neumann``,
            ``num_cayley_neumann_terms`` (OFT); ``apply_GS`` (HRA).

    Raises:
        weightcond.WeightcondError: unknown method or options, missing or extra tensors,
            wrong shapes, a layer already conditioned; the layer is left as it was.

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
    where = f"from_peft_tensors({method!r})"
    if method not in _REQUIRED:
        raise UnknownNameError(f"from_peft_tensors: argument 'method' expected one of "
                               f"{', '.join(map(repr, _REQUIRED))}, got {method!r}")
    unknown = sorted(set(config) - _OPTIONS[method])
    if unknown:
        raise UnknownNameError(f"{where}: unknown options {unknown}; expected some of "
                               f"{sorted(_OPTIONS[method])}")
    if is_conditioned(layer):
        raise StateError(f"{where}: argument 'layer' expected an unconditioned layer")
    given = _take(tensors, method)
    try:
        return _load(layer, method, given, config, where)
    except Exception:
        if is_conditioned(layer):  # nothing half-loaded stays behind
            remove_conditioning(layer)
        raise


def _load(layer: nn.Module, method: str, given: dict[str, Tensor], config: dict[str, Any],
          where: str) -> Applied:
    if method in ("lora", "dora"):
        rank = given["lora_A"].shape[0]
        applied = apply_preset(layer, method, rank=rank, alpha=config.get("lora_alpha", rank))
        _copy(where, "lora_A", applied.update.A, given["lora_A"])
        _copy(where, "lora_B", applied.update.B, given["lora_B"])
        if method == "dora":
            _copy(where, "lora_magnitude_vector", applied.conditioners[0].transform.magnitude,
                  given["lora_magnitude_vector"])
        return applied
    if method == "oft":
        entries = given["oft_R"].shape[-1]  # b(b-1)/2
        block_size = config.get("oft_block_size") or round((1 + math.sqrt(1 + 8 * entries)) / 2)
        neumann = config.get("use_cayley_neumann", False)
        applied = apply_preset(layer, "oft", block_size=block_size,
                               block_share=config.get("block_share", False),
                               map="cayley_neumann" if neumann else "cayley",
                               neumann_terms=config.get("num_cayley_neumann_terms", 5))
        sign = -2.0 if neumann else 2.0
        _copy(where, "oft_R", applied.conditioners[0].transform.generator,
              sign * given["oft_R"])
        return applied
    if method == "boft":
        d = given["boft_R"]  # (factors, blocks, b, b), PEFT's full blocks
        b = d.shape[-1]
        rows, cols = torch.triu_indices(b, b, 1)
        applied = apply_preset(layer, "boft", block_size=b, butterfly_factors=d.shape[0])
        butterfly, scale = (c.transform for c in applied.conditioners)
        _copy(where, "boft_R", butterfly.generator, (d - d.mT)[..., rows, cols])
        _copy(where, "boft_s", scale.scale, given["boft_s"].reshape(-1))
        return applied
    applied = apply_preset(layer, "hra", reflections=given["hra_u"].shape[1],
                           gram_schmidt=config.get("apply_GS", False))
    _copy(where, "hra_u", applied.conditioners[0].transform.U, given["hra_u"])
    return applied
