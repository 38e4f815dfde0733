"""Presets: their formulas, DoRA equal to PEFT, SORA equal to the authors' released layer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import weightcond as wc

from helpers import PRESET_NAMES, Wrapped, make_layer, randomize


def peft_pair(use_dora: bool, *, bias: bool = True, seed: int = 0):
    """A PEFT LoRA/DoRA layer and a weightcond layer with the same (random, non-zero) values."""
    base = make_layer(20, 16, bias=bias, seed=seed)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(Wrapped(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0, use_dora=use_dora))
    peft_layer = peft_model.base_model.model.proj
    applied = wc.apply_preset(ours, "dora" if use_dora else "lora", rank=4, alpha=8)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        peft_layer.lora_A["default"].weight.normal_(generator=gen)
        peft_layer.lora_B["default"].weight.normal_(generator=gen)
        applied.update.A.copy_(peft_layer.lora_A["default"].weight)
        applied.update.B.copy_(peft_layer.lora_B["default"].weight)
        if use_dora:
            magnitude = peft_layer.lora_magnitude_vector["default"].weight
            magnitude.add_(torch.randn(magnitude.shape, generator=gen, dtype=magnitude.dtype))
            applied.conditioners[0].transform.magnitude.copy_(magnitude)
    return peft_model, ours, applied


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_equals_peft_outputs_gradients_and_merge(use_dora: bool, bias: bool) -> None:
    peft_model, ours, applied = peft_pair(use_dora, bias=bias)
    peft_layer = peft_model.base_model.model.proj
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    y_peft, y_ours = peft_model(x), ours(x)
    torch.testing.assert_close(y_ours, y_peft)
    y_peft.square().sum().backward()
    y_ours.square().sum().backward()
    torch.testing.assert_close(applied.update.A.grad, peft_layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(applied.update.B.grad, peft_layer.lora_B["default"].weight.grad)
    if use_dora:
        torch.testing.assert_close(
            applied.conditioners[0].transform.magnitude.grad,
            peft_layer.lora_magnitude_vector["default"].weight.grad)
    merged = peft_model.merge_and_unload().proj
    wc.merge(ours)
    torch.testing.assert_close(ours.weight, merged.weight)
    if bias:
        torch.testing.assert_close(ours.bias, merged.bias)


def test_dora_zero_norm_rows_stay_finite() -> None:
    layer = make_layer(6, 4)
    with torch.no_grad():
        layer.weight[2].zero_()
    x = torch.randn(3, 4, dtype=torch.float64)
    before = layer(x)
    applied = wc.apply_preset(layer, "dora", rank=2)
    torch.testing.assert_close(layer(x), before)
    layer(x).sum().backward()
    grads = [applied.update.A.grad, applied.update.B.grad,
             applied.conditioners[0].transform.magnitude.grad]
    assert all(torch.isfinite(g).all() for g in grads)
    randomize(layer)
    assert torch.isfinite(layer(x)).all() and torch.isfinite(layer.weight).all()


def test_dora_attached_norm_matches_dense_gradient() -> None:
    layer = make_layer(9, 7)
    applied = wc.apply_preset(layer, "dora", rank=3, detach_norm=False)
    randomize(layer)
    x = torch.randn(4, 7, dtype=torch.float64)
    layer(x).square().sum().backward()
    fast = applied.update.A.grad.clone()
    applied.update.A.grad = None
    with wc.dense_forward(layer):
        layer(x).square().sum().backward()
    torch.testing.assert_close(fast, applied.update.A.grad)


def test_pre_diag_formula() -> None:
    layer = make_layer(8, 6)
    w = layer.weight.clone()
    applied = wc.apply_preset(layer, "pre_diag", rank=2, alpha=4)
    randomize(layer)
    d = applied.conditioners[0].transform.scale
    upd = applied.update
    torch.testing.assert_close(layer.weight, torch.diag(d) @ w + 2.0 * upd.B @ upd.A)


def released_sora_layer(layer, applied, x):
    """The authors' released layer, written out: y = (I + S)(d ⊙ (W x + b) + s B A x)."""
    diag, rot = (c.transform for c in applied.conditioners)
    upd = applied.update
    w = layer.parametrizations.weight.original
    b = layer.parametrizations.bias.original
    c, dd = rot.C, rot.D
    s_p = torch.clamp(1 / (c.norm() + dd.norm() + 1e-6), max=1.0)
    s = s_p * (dd @ c.T - c @ dd.T)
    h = diag.scale * (x @ w.T + b) + upd.scaling * (x @ upd.A.T) @ upd.B.T
    return h + h @ s.T, s


def test_sora_first_order_reproduces_the_released_layer() -> None:
    layer = make_layer(10, 8)
    applied = wc.apply_preset(layer, "sora", rank=3, alpha=6, map="first_order",
                              condition_bias=True)
    assert applied.conditioners[1].transform.temperature
    assert applied.conditioners[1].transform.rank == 4
    randomize(layer, scale=0.5)
    x = torch.randn(5, 8, dtype=torch.float64)
    expected, _ = released_sora_layer(layer, applied, x)
    torch.testing.assert_close(layer(x), expected)


def test_sora_merge_keeps_the_identity_unlike_the_released_merge() -> None:
    """Regression: the released SORA merge writes S·(diag(d)W + sBA), dropping the identity.
    Ours writes (I + S)·(diag(d)W + sBA) and (I + S)(d ⊙ b)."""
    layer = make_layer(10, 8)
    applied = wc.apply_preset(layer, "sora", rank=3, map="first_order", condition_bias=True)
    randomize(layer, scale=0.5)
    x = torch.randn(5, 8, dtype=torch.float64)
    expected, s = released_sora_layer(layer, applied, x)
    diag = applied.conditioners[0].transform.scale
    upd = applied.update
    w = layer.parametrizations.weight.original.detach().clone()
    b = layer.parametrizations.bias.original.detach().clone()
    inner = torch.diag(diag) @ w + upd.scaling * upd.B @ upd.A
    s, inner = s.detach(), inner.detach()
    eye = torch.eye(10, dtype=torch.float64)
    wc.merge(layer)
    torch.testing.assert_close(layer.weight, (eye + s) @ inner)
    torch.testing.assert_close(layer.bias, (eye + s) @ (diag.detach() * b))
    torch.testing.assert_close(layer(x), expected.detach())
    released_merge = s @ inner
    assert not torch.allclose(layer.weight, released_merge)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_is_the_identity_at_init_and_merges(name: str) -> None:
    layer = make_layer()
    x = torch.randn(4, 10, dtype=torch.float64)
    before = layer(x)
    wc.apply_preset(layer, name)
    torch.testing.assert_close(layer(x), before)
    randomize(layer)
    expected = layer(x)
    wc.merge(layer)
    torch.testing.assert_close(layer(x), expected)


def test_sora_defaults() -> None:
    layer = make_layer(16, 16)
    applied = wc.apply_preset(layer, "sora", rank=4)
    rot = applied.conditioners[1].transform
    assert (rot.rank, rot.map, rot.temperature) == (4, "cayley", True)
    assert [(c.placement, c.side) for c in wc.conditioners(layer)] == [("pre", "left"),
                                                                      ("post", "left")]
