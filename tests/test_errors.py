"""The catalogue of user errors: the exact typed error, a message pinned by a regex, and the
layer exactly as it was afterwards (nothing half-registered)."""

from __future__ import annotations

import pytest
import torch

import weightcond as wc

from helpers import make_layer

REG = wc.register_conditioning


def snapshot(layer: torch.nn.Module):
    return (type(layer), {k: v.clone() for k, v in layer.state_dict().items()},
            list(wc.conditioners(layer)), wc.get_update(layer),
            [m for m in layer.modules()])


def same(layer: torch.nn.Module, before) -> bool:
    cls, state, conds, upd, modules = before
    now = layer.state_dict()
    return (type(layer) is cls and state.keys() == now.keys()
            and all(torch.equal(state[k], now[k]) for k in state)
            and wc.conditioners(layer) == conds and wc.get_update(layer) is upd
            and list(layer.modules()) == modules)


class Truncating(wc.Transform):
    """A broken user transform: drops the last coordinate."""

    def apply(self, h, *, transpose=False):
        return h[..., :-1]


class FailingInit(wc.Transform):
    """A user norm-tied transform whose initialisation raises."""

    norm_tied = True

    def diagonal(self, norms=None):
        return norms

    def initialize(self, norms):
        raise RuntimeError("boom")


CATALOGUE = [
    # (id, call on a layer (out=12, in=10), error type, message regex)
    ("layer-type", lambda layer: wc.register_update(torch.nn.Conv1d(3, 3, 1), rank=1),
     wc.LayerTypeError,
     r"register_update: argument 'layer' expected one of \(torch\.nn\.Linear, transformers' "
     r"Conv1D \(GPT-2\), torch\.nn\.Conv2d, torch\.nn\.Embedding, bitsandbytes' Linear4bit "
     r"\(NF4, FP4\), bitsandbytes' Linear8bitLt \(int8\), torch\.nn\.Linear with a torchao "
     r"int8 weight\), got Conv1d"),
    ("rank-zero", lambda layer: wc.register_update(layer, rank=0), wc.OptionError,
     r"register_update: argument 'rank' expected an int >= 1, got 0"),
    ("rank-type", lambda layer: wc.register_update(layer, rank="4"), wc.OptionError,
     r"register_update: argument 'rank' expected an int, got '4'"),
    ("rank-too-large", lambda layer: wc.register_update(layer, rank=11), wc.ShapeError,
     r"register_update: argument 'rank' expected an int <= 10 \(min\(out, in\) of the "
     r"\(12, 10\) weight\), got 11"),
    ("alpha", lambda layer: wc.register_update(layer, rank=2, alpha=-1), wc.OptionError,
     r"register_update: argument 'alpha' expected a finite number > 0, got -1"),
    ("placement", lambda layer: REG(layer, placement="middle", transform="diag"),
     wc.UnknownNameError,
     r"register_conditioning: argument 'placement' expected one of 'pre', 'post', "
     r"got 'middle'"),
    ("side", lambda layer: REG(layer, side="top", transform="diag"), wc.UnknownNameError,
     r"register_conditioning: argument 'side' expected one of 'left', 'right', got 'top'"),
    ("transform-name", lambda layer: REG(layer, transform="rotation"), wc.UnknownNameError,
     r"register_conditioning: argument 'transform' expected one of 'block', 'butterfly', "
     r"'diag', 'givens', 'householder', 'magnitude', 'orthogonal', 'skew', got 'rotation'"),
    ("transform-type", lambda layer: REG(layer, transform=42), wc.OptionError,
     r"register_conditioning: argument 'transform' expected a registered name \(.*\), a "
     r"Transform subclass or a Transform instance, got int"),
    ("map", lambda layer: REG(layer, transform="skew", map="cayly"), wc.UnknownNameError,
     r"register_conditioning: skew: argument 'map' expected one of 'cayley', 'exp', "
     r"'first_order', got 'cayly'"),
    ("dense-map", lambda layer: REG(layer, transform="block", map="cayly"),
     wc.UnknownNameError, r"register_conditioning: block: argument 'map' expected one of "
                          r"'cayley', 'exp', 'first_order', 'cayley_neumann' or a "
                          r"callable, got 'cayly'"),
    ("skew-rank", lambda layer: REG(layer, side="right", transform="skew", rank=11), wc.ShapeError,
     r"skew: argument 'rank' expected an int <= 10 \(the side dimension\), got 11"),
    ("temperature", lambda layer: REG(layer, transform="skew", temperature="on"), wc.OptionError,
     r"skew: argument 'temperature' expected a bool, got 'on'"),
    ("block-size", lambda layer: REG(layer, transform="block", block_size=5), wc.ShapeError,
     r"block: argument 'block_size' expected a divisor of the side dimension 12, got 5"),
    ("block-size-one", lambda layer: REG(layer, transform="block", block_size=1), wc.OptionError,
     r"block: argument 'block_size' expected an int >= 2, got 1"),
    ("reflections-odd", lambda layer: REG(layer, transform="householder", reflections=3),
     wc.OptionError, r"householder: argument 'reflections' expected an even int"),
    ("givens-rounds", lambda layer: REG(layer, transform="givens", rounds=0), wc.OptionError,
     r"givens: argument 'rounds' expected an int >= 1, got 0"),
    ("magnitude-eps", lambda layer: REG(layer, transform="magnitude", eps=0), wc.OptionError,
     r"magnitude: argument 'eps' expected a finite number > 0, got 0"),
    ("unknown-option", lambda layer: REG(layer, transform="skew", rnk=2), wc.UnknownNameError,
     r"register_conditioning: unknown option 'rnk' for transform 'skew'; expected one of "
     r"'rank', 'map', 'temperature'"),
    ("no-options", lambda layer: REG(layer, transform="diag", rank=2), wc.UnknownNameError,
     r"unknown option 'rank' for transform 'diag', which takes no options"),
    ("condition-bias-right", lambda layer: REG(layer, side="right", transform="diag",
                                           condition_bias=True), wc.OptionError,
     r"argument 'condition_bias' expected False for side='right'"),
    ("condition-bias-type", lambda layer: REG(layer, transform="diag", condition_bias=1),
     wc.OptionError, r"argument 'condition_bias' expected a bool, got 1"),
    ("instance-dim", lambda layer: REG(layer, transform=wc.TRANSFORMS["diag"](10)), wc.ShapeError,
     r"argument 'transform' expected a transform of dim 12 \(the side dimension\), "
     r"got dim 10"),
    ("instance-options", lambda layer: REG(layer, transform=wc.TRANSFORMS["diag"](12), rank=1),
     wc.OptionError, r"options \['rank'\] given with a transform object"),
    ("preset-name", lambda layer: wc.apply_preset(layer, "lorra"), wc.UnknownNameError,
     r"apply_preset: argument 'name' expected one of 'lora', 'dora', 'pre_diag', 'sora', "
     r"'oft', 'boft', 'hra', 'goft', got 'lorra'"),
    ("preset-option", lambda layer: wc.apply_preset(layer, "lora", rotation_rank=2),
     wc.UnknownNameError, r"apply_preset\('lora'\): unknown option 'rotation_rank'; "
                          r"expected one of 'rank', 'alpha'"),
    ("preset-late-failure", lambda layer: wc.apply_preset(layer, "sora", map="cayly"),
     wc.UnknownNameError, r"apply_preset\('sora'\): skew: argument 'map' expected one of"),
    ("preset-rank", lambda layer: wc.apply_preset(layer, "dora", rank=0), wc.OptionError,
     r"argument 'rank' expected an int >= 1, got 0"),
    ("side-of-one", lambda layer: REG(torch.nn.Linear(8, 1), transform="givens"),
     wc.ShapeError, r"register_conditioning: givens: the side dimension is 1, expected at "
                    r"least 2"),
    ("broken-transform", lambda layer: REG(layer, transform=Truncating(12)), wc.ShapeError,
     r"argument 'transform' expected a transform whose apply\(\) of a \(12,\) input has "
     r"shape \(12,\), got \(11,\) from Truncating"),
    ("merge-plain", lambda layer: wc.merge(torch.nn.Linear(2, 2)), wc.StateError,
     r"merge: argument 'module' expected a conditioned layer or a model containing one, got an "
     r"unconditioned Linear"),
    ("remove-plain", lambda layer: wc.remove_conditioning(torch.nn.Linear(2, 2)), wc.StateError,
     r"remove_conditioning: argument 'module' expected a conditioned layer"),
    ("delta-type", lambda layer: wc.delta_weight("layer"), wc.LayerTypeError,
     r"delta_weight: argument 'layer' expected an nn.Module, got str"),
]


@pytest.mark.parametrize("conditioned", [False, True], ids=["plain", "conditioned"])
@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_error_catalogue(case, conditioned: bool) -> None:
    _, call, error, pattern = case
    layer = make_layer(12, 10)
    if conditioned:
        wc.register_conditioning(layer, placement="post", transform="skew", rank=2)
    before = snapshot(layer)
    with pytest.raises(error, match=pattern) as info:
        call(layer)
    assert isinstance(info.value, wc.WeightcondError)
    assert same(layer, before)


def test_second_update_is_refused_and_changes_nothing() -> None:
    layer = make_layer(12, 10)
    wc.register_update(layer, rank=2)
    before = snapshot(layer)
    with pytest.raises(wc.StateError,
                       match=r"register_update: adapter 'default' of the layer already has an "):
        wc.register_update(layer, rank=2)
    with pytest.raises(wc.StateError,
                       match=r"apply_preset\('dora'\): adapter 'default' of the layer already"):
        wc.apply_preset(layer, "dora")
    assert same(layer, before)


def test_a_transform_object_is_registered_once() -> None:
    layer, other = make_layer(12, 10), make_layer(12, 10)
    t = wc.TRANSFORMS["diag"](12).double()
    wc.register_conditioning(layer, transform=t)
    before = snapshot(other)
    with pytest.raises(wc.StateError, match="already registered on a layer; pass a new one"):
        wc.register_conditioning(other, transform=t)
    assert same(other, before)


def test_errors_are_value_type_and_key_errors_where_python_expects_them() -> None:
    assert issubclass(wc.OptionError, ValueError)
    assert issubclass(wc.ShapeError, ValueError)
    assert issubclass(wc.LayerTypeError, TypeError)
    assert issubclass(wc.UnknownNameError, KeyError)
    assert "rotation" not in wc.TRANSFORMS and "skew" in wc.TRANSFORMS


def test_foreign_parametrizations_are_refused_and_left_alone() -> None:
    class Scale(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    for name in ("weight", "bias"):
        layer = make_layer(12, 10)
        torch.nn.utils.parametrize.register_parametrization(layer, name, Scale())
        before = snapshot(layer)
        for call in (lambda layer=layer: wc.register_update(layer, rank=2),
                     lambda layer=layer: wc.register_conditioning(layer, transform="diag"),
                     lambda layer=layer: wc.apply_preset(layer, "dora")):
            with pytest.raises(wc.StateError, match=rf"argument 'layer' expected a layer "
                               rf"without torch.nn.utils.parametrize parametrizations .* got "
                               rf"one parametrized on '{name}'"):
                call()
            assert same(layer, before) and not wc.is_conditioned(layer)


@pytest.mark.parametrize("conditioned", [False, True])
def test_a_failing_user_initialize_leaves_the_layer_alone(conditioned: bool) -> None:
    layer = make_layer(12, 10)
    if conditioned:
        wc.register_update(layer, rank=2)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="boom"):
        wc.register_conditioning(layer, placement="post", transform=FailingInit(12))
    assert same(layer, before) and wc.is_conditioned(layer) == conditioned

