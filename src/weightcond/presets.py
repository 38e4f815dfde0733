"""Named points of the design space, as data (DESIGN §4).

A :class:`Preset` is a list of :class:`ConditionerSpec` plus whether it has a low-rank
update. Option values in a spec may be :class:`Option` references, filled from the preset's
defaults and the user's keyword arguments; ``condition_bias`` is a preset option applied to
every left conditioner. :func:`apply_preset` validates and builds everything before it
changes the layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UnknownNameError, check_bool
from .layer import (
    _attach,
    _attach_conditioner,
    _build_conditioner,
    _build_update,
    _conditioning_for,
)
from .placement import Conditioner
from .registry import Registry
from .update import LowRankUpdate

__all__ = ["PRESETS", "Applied", "ConditionerSpec", "Option", "Preset", "apply_preset"]


@dataclass(frozen=True)
class Option:
    """A reference to a preset option inside a :class:`ConditionerSpec`."""

    name: str


@dataclass(frozen=True)
class ConditionerSpec:
    """One conditioner of a preset: where it sits, which transform, which options."""

    placement: str
    side: str
    transform: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    """A named conditioning: an optional update and conditioners, with option defaults.

    Attributes:
        name: the registry name.
        formula: the conditioned weight, in the library's notation.
        update: whether the preset adds :math:`\\Delta W = s\\,BA` (options ``rank``,
            ``alpha``).
        conditioners: the conditioners, in registration order.
        defaults: the preset's own options and their default values.
        reference: where the method comes from.
    """

    name: str
    formula: str
    update: bool
    conditioners: tuple[ConditionerSpec, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""

    def options(self) -> dict[str, Any]:
        """Every option :func:`apply_preset` accepts for this preset, with its default."""
        base: dict[str, Any] = {"rank": 8, "alpha": None} if self.update else {}
        if any(c.side == "left" for c in self.conditioners):
            base["condition_bias"] = False
        return {**base, **self.defaults}


@dataclass(frozen=True)
class Applied:
    """What :func:`apply_preset` registered on the layer."""

    update: LowRankUpdate | None
    conditioners: tuple[Conditioner, ...]


PRESETS: Registry[Preset] = Registry("preset")


def _preset(preset: Preset) -> None:
    PRESETS.add(preset.name, preset)


_preset(Preset(
    name="lora", formula="W' = W + s·B A", update=True, conditioners=(),
    reference="Hu et al., LoRA, arXiv 2106.09685"))
_preset(Preset(
    name="dora", formula="W' = diag(m ⊘ ‖W + s·B A‖_row)·(W + s·B A)", update=True,
    conditioners=(ConditionerSpec("post", "left", "magnitude",
                                  {"detach_norm": Option("detach_norm"), "eps": Option("eps")}),),
    defaults={"detach_norm": True, "eps": 1e-6},
    reference="Liu et al., DoRA, arXiv 2402.09353; equals PEFT LoraConfig(use_dora=True)"))
_preset(Preset(
    name="pre_diag", formula="W' = diag(d)·W + s·B A", update=True,
    conditioners=(ConditionerSpec("pre", "left", "diag"),),
    reference="Calibrating and Rotating, arXiv 2511.00051"))
_preset(Preset(
    name="sora", formula="W' = Q·(diag(d)·W + s·B A), Q = map(t·(D Cᵀ − C Dᵀ))", update=True,
    conditioners=(
        ConditionerSpec("pre", "left", "diag"),
        ConditionerSpec("post", "left", "skew", {"rank": Option("rotation_rank"),
                                                 "map": Option("map"),
                                                 "temperature": Option("temperature")}),
    ),
    defaults={"rotation_rank": 4, "map": "cayley", "temperature": True},
    reference="Calibrating and Rotating, arXiv 2511.00051 (released code: map='first_order', "
              "condition_bias=True)"))


_preset(Preset(
    name="oft", formula="W' = W·R, R = blockdiag(cayley(S_1), …) on the input side",
    update=False,
    conditioners=(ConditionerSpec("pre", "right", "block", {
        "block_size": Option("block_size"), "map": Option("map"),
        "share": Option("block_share"), "terms": Option("neumann_terms")}),),
    defaults={"block_size": None, "map": "cayley", "block_share": False, "neumann_terms": 5},
    reference="Qiu et al., OFT, arXiv 2306.07280; equals PEFT OFTConfig(use_cayley_neumann="
              "False) with our generator = 2 × PEFT's oft_R"))
_preset(Preset(
    name="hra", formula="W' = W·H_1⋯H_k, H_i = I − 2 u_i u_iᵀ/‖u_i‖²", update=False,
    conditioners=(ConditionerSpec("pre", "right", "householder",
                                  {"reflections": Option("reflections")}),),
    defaults={"reflections": 8},
    reference="Yuan et al., HRA, arXiv 2405.17484; equals PEFT HRAConfig(apply_GS=False)"))
_preset(Preset(
    name="goft", formula="W' = W·G, G = rounds of disjoint Givens rotations", update=False,
    conditioners=(ConditionerSpec("pre", "right", "givens", {"rounds": Option("rounds")}),),
    defaults={"rounds": None},
    reference="Ma et al., GOFT, arXiv 2404.04316 (butterfly-stride rounds; no PEFT peer)"))


def _resolve(value: Any, options: Mapping[str, Any]) -> Any:
    return options[value.name] if isinstance(value, Option) else value


def apply_preset(layer: nn.Module, name: str, **options: Any) -> Applied:
    r"""Condition ``layer`` with the named preset of :data:`PRESETS`.

    * ``lora``: :math:`W' = W + sBA`; options ``rank=8``, ``alpha=None`` (``= rank``).
    * ``dora``: :math:`W' = \operatorname{diag}(m \oslash \|W+sBA\|_\text{row})(W+sBA)`;
      also ``detach_norm=True``, ``eps=1e-6``.
    * ``pre_diag``: :math:`W' = \operatorname{diag}(d) W + sBA`.
    * ``sora``: :math:`W' = Q(\operatorname{diag}(d) W + sBA)`; also ``rotation_rank=4``,
      ``map="cayley"``, ``temperature=True``.
    * ``oft``: :math:`W' = W R`, :math:`R` block-diagonal Cayley rotations (``block_size``,
      ``map="cayley"``, ``block_share=False``, ``neumann_terms=5`` for
      ``map="cayley_neumann"``); no update.
    * ``hra``: :math:`W' = W H_1 \cdots H_k` (``reflections=8``); no update.
    * ``goft``: :math:`W' = W G`, rounds of Givens rotations (``rounds``); no update.

    Every preset with left conditioners also takes ``condition_bias`` (default ``False``).
    ``apply_preset(layer, "sora", map="first_order", condition_bias=True)`` computes the
    authors' released layer :math:`y = (I+S)(d \odot (Wx + b) + sBAx)`.

    Returns:
        An :class:`Applied` record of the update and conditioners registered.

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(32, 32)
        >>> applied = wc.apply_preset(layer, "sora", rank=4, alpha=8, rotation_rank=2)
        >>> [(c.placement, c.side, c.transform.name) for c in applied.conditioners]
        [('pre', 'left', 'diag'), ('post', 'left', 'skew')]
    """
    preset = PRESETS.lookup(name, "apply_preset", "name")
    where = f"apply_preset({name!r})"
    accepted = preset.options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UnknownNameError(f"{where}: unknown option {', '.join(map(repr, unknown))}; "
                               f"expected one of {', '.join(map(repr, accepted))}")
    values = {**accepted, **options}
    condition_bias = check_bool(where, "condition_bias", values.get("condition_bias", False))
    # build (and so validate) everything before the layer is touched
    update = (_build_update(layer, where, rank=values["rank"], alpha=values["alpha"])
              if preset.update else None)
    built = [
        _build_conditioner(layer, where, placement=spec.placement, side=spec.side,
                           transform=spec.transform,
                           condition_bias=condition_bias and spec.side == "left",
                           options={k: _resolve(v, values) for k, v in spec.options.items()})
        for spec in preset.conditioners
    ]
    if update is not None:
        conditioning = _conditioning_for(layer)
        _attach(layer, conditioning)
        conditioning.update = update
    for conditioner in built:
        _attach_conditioner(layer, conditioner)
    return Applied(update, tuple(built))
