"""The planner and the executor (Note (plan, then execute) in ``weightcond.engine.plan``):
every form the planner can choose equals the dense form in float64 — outputs and every
gradient — including the thin right post fold, stacked with other conditioners; plans are
pure, cached, independent of the grad mode and printable with ``wc.explain``."""

from __future__ import annotations

import pytest
import torch

import weightcond as wc
from weightcond.engine import Form, plan

from helpers import assert_matrix_free_equals_dense, make_layer, randomize

OUT, IN = 24, 40


def _check(layer: torch.nn.Module, tokens: int, input_grad: bool) -> None:
    x = torch.randn(tokens, IN, dtype=torch.float64, requires_grad=input_grad)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert_matrix_free_equals_dense(layer, x, [x, *params] if input_grad else params)


POST_RIGHT_STACKS = [
    [("post", "right", "householder", {"reflections": 4})],
    [("post", "right", "skew", {"rank": 2})],
    [("post", "right", "skew", {"rank": 2}), ("post", "right", "householder", {"reflections": 2})],
    [("post", "right", "householder", {"reflections": 2}), ("post", "left", "magnitude", {})],
    [("pre", "left", "diag", {}), ("post", "right", "skew", {"rank": 1}),
     ("post", "left", "block", {"block_size": 4}), ("pre", "right", "block", {"block_size": 8})],
    [("pre", "right", "householder", {"reflections": 2}), ("post", "left", "skew", {"rank": 1}),
     ("post", "right", "householder", {"reflections": 2})],
    [("pre", "right", "diag", {}), ("post", "right", "skew", {"rank": 2}),
     ("post", "left", "householder", {"reflections": 2}), ("post", "left", "diag", {})],
]


def _layer(stack, update: bool, condition_bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = make_layer(OUT, IN)
    if update:
        wc.register_update(layer, rank=3, alpha=6)
    for placement, side, transform, options in stack:
        extra = {"condition_bias": True} if condition_bias and side == "left" else {}
        wc.register_conditioning(layer, placement=placement, side=side, transform=transform,
                                 **options, **extra)
    randomize(layer)
    return layer


@pytest.mark.parametrize("stack", POST_RIGHT_STACKS,
                         ids=lambda s: "+".join(f"{p}-{d}-{t}" for p, d, t, _ in s))
@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("input_grad", [False, True])
def test_thin_right_post_folds_and_equals_dense(stack, update: bool, input_grad: bool) -> None:
    """A thin rotation after the update on the right folds into the stacked low-rank GEMM
    (``M R = M + (M U) Vᵀ``) with enough tokens, and is exact; with one token (whatever the
    planner takes) exact too."""
    layer = _layer(stack, update, condition_bias=True)
    sites = [(p, d) for p, d, _, _ in stack]
    forms = wc.explain(layer, tokens=256, input_grad=input_grad).forms
    post_right = [f for f, site in zip(_composition(forms, stack), sites)
                  if site == ("post", "right")]
    assert post_right and all(f is Form.FOLD for f in post_right), forms
    for tokens in (256, 1):
        _check(layer, tokens, input_grad)


def test_generation_rotates_the_activations() -> None:
    """One token with its gradient (a decoder generating, inside the model): rotating one
    vector is cheaper than pulling the rotation through the weight."""
    layer = torch.nn.Linear(1024, 1024)
    wc.apply_preset(layer, "lora", rank=16)
    for placement in ("pre", "post"):
        for side in ("left", "right"):
            wc.register_conditioning(layer, placement=placement, side=side, transform="skew")
    assert set(wc.explain(layer, tokens=1, input_grad=True).forms) == {Form.ACTIVATION}
    assert set(wc.explain(layer, tokens=2048, input_grad=True).forms) == {Form.FOLD}


def _composition(forms, stack):
    """``forms`` (composition order: pre stage, then post) in the order of ``stack``."""
    order = sorted(range(len(stack)), key=lambda k: (stack[k][0] == "post", k))
    found = [None] * len(stack)
    for form, k in zip(forms, order):
        found[k] = form
    return found


def test_explain_prints_every_form_and_its_cost() -> None:
    layer = torch.nn.Linear(1024, 1024)
    wc.apply_preset(layer, "lora", rank=16)
    wc.register_conditioning(layer, placement="post", side="right", transform="householder",
                             reflections=8)
    wc.register_conditioning(layer, placement="pre", side="right", transform="block",
                             block_size=32)
    explained = wc.explain(layer, tokens=2048, input_grad=False)
    text = str(explained)
    assert "pre/right block: fused" in text and "post/right householder: fold" in text
    assert "else: activation" in text and "GFLOP" in text
    assert explained.total.flops > explained.base.flops > 0
    with pytest.raises(wc.OptionError, match="explain: argument 'tokens'"):
        wc.explain(layer, tokens=0)
    with pytest.raises(wc.StateError, match="explain: argument 'layer' expected a conditioned"):
        wc.explain(torch.nn.Linear(4, 4), tokens=3)


def test_plans_are_cached_pure_and_ignore_the_grad_mode() -> None:
    layer = _layer(POST_RIGHT_STACKS[4], update=True)
    conditioning = layer.parametrizations.weight[0].current()
    x = torch.randn(64, IN, dtype=torch.float64)
    first = conditioning.plan(x, layer.parametrizations.weight.original)
    with torch.no_grad():
        again = conditioning.plan(x, layer.parametrizations.weight.original)
    assert first is again  # cached, and the grad mode is not an input
    assert first == plan(conditioning.layout(), 64, False, torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, layer(x))  # one input, the same bits with and without gradients


def test_dense_orthogonal_on_the_right_takes_the_weight_form_when_cheaper() -> None:
    """A dense rotation costs ``2n²`` per token: with more tokens than outputs it is cheaper
    to rotate W's rows once, with the input's gradient too (an extra ``gᵀx`` GEMM)."""
    layer = make_layer(16, 16)
    wc.register_conditioning(layer, side="right", transform="orthogonal")
    assert wc.explain(layer, tokens=4096, input_grad=True).forms == (Form.WEIGHT,)
    assert wc.explain(layer, tokens=2, input_grad=True).forms == (Form.ACTIVATION,)
    randomize(layer)
    x = torch.randn(4096, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    with wc.dense_forward(layer):
        torch.testing.assert_close(y, layer(x), rtol=1e-12, atol=1e-12)
