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
    DEFAULT_ADAPTER,
    attach_all,
    build_conditioner,
    build_update,
    check_adapter_name,
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
        peer: the PEFT configuration that computes the same function, if any.
        differences: how the preset differs from that peer (or the paper), in words.
    """

    name: str
    formula: str
    update: bool
    conditioners: tuple[ConditionerSpec, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""
    peer: str = ""
    differences: str = ""

    def describe(self) -> str:
        """The preset in a few lines: formula, options, reference, PEFT peer, differences."""
        lines = [f"{self.name}: {self.formula}",
                 "options: " + ", ".join(f"{k}={v!r}" for k, v in self.options().items()),
                 f"reference: {self.reference}"]
        if self.peer:
            lines.append(f"PEFT peer: {self.peer}")
        if self.differences:
            lines.append(f"differences: {self.differences}")
        return "\n".join(lines)

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
    reference="Hu et al., LoRA, arXiv 2106.09685", peer="LoraConfig(lora_dropout=0)",
    differences="none in outputs, gradients or merged weight (tested); no dropout option"))
_preset(Preset(
    name="dora", formula="W' = diag(m ⊘ ‖W + s·B A‖_row)·(W + s·B A)", update=True,
    conditioners=(ConditionerSpec("post", "left", "magnitude",
                                  {"detach_norm": Option("detach_norm"), "eps": Option("eps")}),),
    defaults={"detach_norm": True, "eps": 1e-6},
    reference="Liu et al., DoRA, arXiv 2402.09353",
    peer="LoraConfig(use_dora=True, lora_dropout=0)",
    differences="equal outputs, gradients and merged weight (tested); the row norm has an eps "
                "floor, so zero-norm rows stay finite where PEFT returns NaN; the norm comes "
                "from a low-rank identity, never from the dense W + sBA"))
_preset(Preset(
    name="pre_diag", formula="W' = diag(d)·W + s·B A", update=True,
    conditioners=(ConditionerSpec("pre", "left", "diag"),),
    reference="Calibrating and Rotating, arXiv 2511.00051",
    differences="no PEFT peer; same parameter count as DoRA, no norm"))
_preset(Preset(
    name="sora", formula="W' = Q·(diag(d)·W + s·B A), Q = map(t·(D Cᵀ − C Dᵀ))", update=True,
    conditioners=(
        ConditionerSpec("pre", "left", "diag"),
        ConditionerSpec("post", "left", "skew", {"rank": Option("rotation_rank"),
                                                 "map": Option("map"),
                                                 "temperature": Option("temperature")}),
    ),
    defaults={"rotation_rank": 4, "map": "cayley", "temperature": True},
    reference="Calibrating and Rotating, arXiv 2511.00051",
    differences="no PEFT peer; the authors' released layer is map='first_order', "
                "condition_bias=True (I + S is not orthogonal), and its merge drops the "
                "identity, S·(diag(d)W + sBA); ours merges Q·(diag(d)W + sBA)"))


_preset(Preset(
    name="oft", formula="W' = W·R, R = blockdiag(cayley(2·S_1), …) on the input side",
    update=False,
    conditioners=(ConditionerSpec("pre", "right", "block", {
        "block_size": Option("block_size"), "map": Option("map"),
        "share": Option("block_share"), "terms": Option("neumann_terms"),
        "scale": Option("scale")}),),
    defaults={"block_size": None, "map": "cayley", "block_share": False, "neumann_terms": 5,
              "scale": 2.0},
    reference="Qiu et al., OFT, arXiv 2306.07280",
    peer="OFTConfig(r=0, oft_block_size=b, use_cayley_neumann=False, block_share=...); "
         "with map='cayley_neumann' and neumann_terms=t, use_cayley_neumann=True, "
         "num_cayley_neumann_terms=t",
    differences="PEFT's parametrization: our generator is oft_R (scale=2: PEFT's "
                "(I - Q)(I + Q)⁻¹ on rows is our cayley(2Q) on columns), so outputs, "
                "gradients, merged weight and the training trajectory under the same "
                "optimizer are PEFT's; PEFT's Neumann path approximates the inverse of its "
                "exact path (the same trajectory with our generator = -oft_R); scale=1 needs "
                "4 × the learning rate under SGD, 2 × under Adam; no coft/dropout"))
_preset(Preset(
    name="boft", formula="W' = diag(s)·W·Q, Q = Π_i P_i blockdiag(cayley(D_i,j − D_i,jᵀ)) P_iᵀ",
    update=False,
    conditioners=(
        ConditionerSpec("pre", "right", "butterfly", {
            "block_size": Option("block_size"), "factors": Option("butterfly_factors"),
            "map": Option("map"), "full": Option("full_blocks")}),
        ConditionerSpec("post", "left", "diag"),
    ),
    defaults={"block_size": None, "butterfly_factors": 1, "map": "cayley", "full_blocks": True},
    reference="Liu et al., BOFT, arXiv 2311.06243",
    peer="BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m)",
    differences="PEFT's parametrization: the full blocks D are boft_R (full_blocks=True), "
                "the scale is boft_s, so outputs, gradients, merged weight, trainable count "
                "and the training trajectory are PEFT's; full_blocks=False stores each skew "
                "block once (half the parameters, the same rotations; under Adam one entry "
                "moves S half as far as PEFT's pair, so use 2 × the learning rate); "
                "permutations are index gathers, not dense matrices; PEFT runs m > 1 only "
                "with its CUDA extension (tested against its own construction); no "
                "multiplicative dropout"))
_preset(Preset(
    name="hra", formula="W' = W·H_1⋯H_k, H_i = I − 2 u_i u_iᵀ/‖u_i‖²", update=False,
    conditioners=(ConditionerSpec("pre", "right", "householder", {
        "reflections": Option("reflections"), "gram_schmidt": Option("gram_schmidt")}),),
    defaults={"reflections": 8, "gram_schmidt": False},
    reference="Yuan et al., HRA, arXiv 2405.17484",
    peer="HRAConfig(r=k, apply_GS=gram_schmidt)",
    differences="equal outputs, gradients and merged weight (tested); applied in compact WY "
                "form (two thin GEMMs), never as a dense in × in matrix; with gram_schmidt "
                "the layer is not the identity at initialisation (as in PEFT)"))
_preset(Preset(
    name="goft", formula="W' = W·G, G = rounds of disjoint Givens rotations", update=False,
    conditioners=(ConditionerSpec("pre", "right", "givens", {"rounds": Option("rounds")}),),
    defaults={"rounds": None},
    reference="Ma et al., GOFT, arXiv 2404.04316",
    differences="no PEFT peer; rounds of disjoint pairs with butterfly strides, tested "
                "against a dense product of 2 × 2 rotations"))


def _resolve(value: Any, options: Mapping[str, Any]) -> Any:
    return options[value.name] if isinstance(value, Option) else value


def apply_preset(layer: nn.Module, name: str | Preset, *, adapter_name: str = DEFAULT_ADAPTER,
                 **options: Any) -> Applied:
    r"""Condition ``layer`` with the named preset of :data:`PRESETS`.

    * ``lora``: :math:`W' = W + sBA`; options ``rank=8``, ``alpha=None`` (``= rank``).
    * ``dora``: :math:`W' = \operatorname{diag}(m \oslash \|W+sBA\|_\text{row})(W+sBA)`;
      also ``detach_norm=True``, ``eps=1e-6``.
    * ``pre_diag``: :math:`W' = \operatorname{diag}(d) W + sBA`.
    * ``sora``: :math:`W' = Q(\operatorname{diag}(d) W + sBA)`; also ``rotation_rank=4``,
      ``map="cayley"``, ``temperature=True``.
    * ``oft``: :math:`W' = W R`, :math:`R` block-diagonal Cayley rotations (``block_size``,
      ``map="cayley"``, ``block_share=False``, ``neumann_terms=5`` for
      ``map="cayley_neumann"``, ``scale=2``: PEFT's parametrization); no update.
    * ``boft``: :math:`W' = \operatorname{diag}(s) W Q`, :math:`Q` a butterfly product of
      block rotations (``block_size``, ``butterfly_factors=1``, ``map="cayley"``,
      ``full_blocks=True``: PEFT's parametrization); no update.
    * ``hra``: :math:`W' = W H_1 \cdots H_k` (``reflections=8``, ``gram_schmidt=False``);
      no update.
    * ``goft``: :math:`W' = W G`, rounds of Givens rotations (``rounds``); no update.

    ``PRESETS[name].describe()`` gives a preset's formula, options, reference, PEFT peer and
    the differences from it. Every preset with left conditioners also takes
    ``condition_bias`` (default ``False``).
    ``apply_preset(layer, "sora", map="first_order", condition_bias=True)`` computes the
    authors' released layer :math:`y = (I+S)(d \odot (Wx + b) + sBAx)`.

    ``name`` may also be a :class:`Preset` object that is not registered (a variant of
    your own). Everything goes into the adapter ``adapter_name``, which becomes the layer's
    active adapter.

    Returns:
        An :class:`Applied` record of the update and conditioners registered.

    Example:
        >>> import torch, weightcond as wc
        >>> layer = torch.nn.Linear(32, 32)
        >>> applied = wc.apply_preset(layer, "sora", rank=4, alpha=8, rotation_rank=2)
        >>> [(c.placement, c.side, c.transform.name) for c in applied.conditioners]
        [('pre', 'left', 'diag'), ('post', 'left', 'skew')]
    """
    preset = name if isinstance(name, Preset) else PRESETS.lookup(name, "apply_preset", "name")
    where = f"apply_preset({preset.name!r})"
    check_adapter_name(where, adapter_name)
    accepted = preset.options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UnknownNameError(f"{where}: unknown option {', '.join(map(repr, unknown))}; "
                               f"expected one of {', '.join(map(repr, accepted))}")
    values = {**accepted, **options}
    condition_bias = check_bool(where, "condition_bias", values.get("condition_bias", False))
    # build (and so validate) everything before the layer is touched
    update = (build_update(layer, where, rank=values["rank"], alpha=values["alpha"],
                            adapter_name=adapter_name) if preset.update else None)
    built = [
        build_conditioner(layer, where, placement=spec.placement, side=spec.side,
                           transform=spec.transform,
                           condition_bias=condition_bias and spec.side == "left",
                           options={k: _resolve(v, values) for k, v in spec.options.items()})
        for spec in preset.conditioners
    ]
    attach_all(layer, update, built, adapter_name)  # all or nothing
    return Applied(update, tuple(built))
