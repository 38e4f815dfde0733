"""Every cell of transform × placement × side on a layer, alone and stacked: identity at
init, matrix-free == dense (outputs and gradients), merge == forward, remove restores."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import weightcond as wc

from helpers import CELLS, cell_id, make_layer, randomize, trainable


def condition(layer, cells, *, update: bool = True, condition_bias: bool = False):
    if update:
        wc.register_update(layer, rank=3, alpha=6)
    for name, placement, side in cells:
        wc.register_conditioning(layer, placement=placement, side=side, transform=name,
                                 condition_bias=condition_bias and side == "left")
    return layer


def check_dense_equals_matrix_free(layer, x) -> None:
    """Outputs and gradients (of every trainable parameter and of x) of both forms agree."""
    x = x.clone().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *(p for _, p in trainable(layer))])
    with wc.dense_forward(layer):
        y_dense = layer(x)
        reference = F.linear(x, layer.weight, layer.bias)
        grads_dense = torch.autograd.grad(y_dense.square().sum(),
                                          [x, *(p for _, p in trainable(layer))])
    torch.testing.assert_close(y_dense, reference, rtol=0, atol=0)
    torch.testing.assert_close(y, y_dense)
    for g, gd in zip(grads, grads_dense):
        torch.testing.assert_close(g, gd)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_identity_at_init(cell, bias: bool) -> None:
    layer = make_layer(bias=bias)
    x = torch.randn(4, 10, dtype=torch.float64)
    before = layer(x)
    condition(layer, [cell], condition_bias=True)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight, layer.parametrizations.weight.original,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_matrix_free_equals_dense(cell, update: bool) -> None:
    layer = condition(make_layer(), [cell], update=update, condition_bias=True)
    randomize(layer)
    check_dense_equals_matrix_free(layer, torch.randn(2, 3, 10, dtype=torch.float64))


STACKS = [
    [("diag", "pre", "left"), ("skew", "post", "left"), ("householder", "pre", "right")],
    [("magnitude", "post", "left"), ("givens", "post", "right"), ("diag", "pre", "left")],
    [("block", "pre", "right"), ("magnitude", "pre", "left"), ("magnitude", "post", "left")],
    [("skew", "post", "left"), ("magnitude", "post", "left")],  # magnitude after a rotation
    [("orthogonal", "post", "right"), ("magnitude", "post", "right"), ("diag", "post", "left")],
    [("diag", "pre", "left"), ("diag", "pre", "left"), ("skew", "pre", "left")],
]


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: "+".join(cell_id(c) for c in s))
def test_stacks_matrix_free_equals_dense(stack) -> None:
    layer = condition(make_layer(), stack, condition_bias=True)
    randomize(layer)
    check_dense_equals_matrix_free(layer, torch.randn(5, 10, dtype=torch.float64))


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_merge_reproduces_forward_and_remove_restores(cell) -> None:
    layer = make_layer()
    weight, bias = layer.weight, layer.bias
    base_weight, base_bias = weight.clone(), bias.clone()
    x = torch.randn(7, 10, dtype=torch.float64)
    condition(layer, [cell], condition_bias=True)
    randomize(layer)
    merged = copy.deepcopy(layer)
    expected = layer(x)
    wc.merge(merged)
    assert type(merged) is torch.nn.Linear and not wc.is_conditioned(merged)
    torch.testing.assert_close(merged(x), expected)
    wc.remove_conditioning(layer)
    assert type(layer) is torch.nn.Linear
    assert layer.weight is weight and layer.bias is bias
    assert torch.equal(layer.weight, base_weight) and torch.equal(layer.bias, base_bias)
    assert dict(layer.named_children()) == {}


def test_composition_order_is_registration_order() -> None:
    layer = make_layer(4, 3)
    w = layer.weight.clone()
    first = wc.register_conditioning(layer, placement="pre", side="left", transform="skew",
                                     rank=1)
    second = wc.register_conditioning(layer, placement="pre", side="left", transform="givens")
    r1 = wc.register_conditioning(layer, placement="pre", side="right", transform="givens")
    r2 = wc.register_conditioning(layer, placement="pre", side="right", transform="skew", rank=1)
    randomize(layer)
    assert wc.conditioners(layer) == [first, second, r1, r2]
    q1, q2 = first.transform.matrix(), second.transform.matrix()
    p1, p2 = r1.transform.matrix(), r2.transform.matrix()
    # later left conditioners act further out, later right ones further in
    torch.testing.assert_close(layer.weight, q2 @ q1 @ w @ p1 @ p2)


def test_pre_and_post_are_relative_to_the_update_whatever_the_order() -> None:
    layer = make_layer(6, 5)
    w = layer.weight.clone()
    post = wc.register_conditioning(layer, placement="post", side="left", transform="diag")
    pre = wc.register_conditioning(layer, placement="pre", side="left", transform="diag")
    upd = wc.register_update(layer, rank=2)
    randomize(layer)
    d_post, d_pre = post.transform.scale, pre.transform.scale
    expected = torch.diag(d_post) @ (torch.diag(d_pre) @ w + upd.scaling * upd.B @ upd.A)
    torch.testing.assert_close(layer.weight, expected)
    assert wc.conditioners(layer) == [pre, post]
    assert wc.get_update(layer) is upd
    torch.testing.assert_close(wc.delta_weight(layer), expected - w)


def test_condition_bias_uses_left_conditioners_in_order() -> None:
    layer = make_layer(6, 5)
    b = layer.bias.clone()
    d = wc.register_conditioning(layer, placement="pre", side="left", transform="diag",
                                 condition_bias=True)
    q = wc.register_conditioning(layer, placement="post", side="left", transform="skew",
                                 rank=2, condition_bias=True)
    randomize(layer)
    expected = q.transform.matrix() @ (d.transform.scale * b)
    torch.testing.assert_close(layer.bias, expected)
    check_dense_equals_matrix_free(layer, torch.randn(3, 5, dtype=torch.float64))


def test_condition_bias_on_a_layer_without_bias_is_a_no_op() -> None:
    layer = make_layer(6, 5, bias=False)
    wc.apply_preset(layer, "sora", rank=2, map="first_order", condition_bias=True)
    assert layer.bias is None
    randomize(layer)
    check_dense_equals_matrix_free(layer, torch.randn(3, 5, dtype=torch.float64))


class Shear(wc.Transform):
    """A user-written transform: I + the strictly upper part of a learnable matrix."""

    def __init__(self, dim: int, *, strength: float = 1.0) -> None:
        super().__init__(dim)
        self.strength = strength
        self.upper = torch.nn.Parameter(torch.zeros(dim, dim))

    def matrix(self) -> torch.Tensor:
        eye = torch.eye(self.dim, dtype=self.upper.dtype)
        return eye + self.strength * self.upper.triu(1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_user_written_transform_class_and_instance(side: str) -> None:
    layer = make_layer()
    x = torch.randn(3, 10, dtype=torch.float64)
    before = layer(x)
    c1 = wc.register_conditioning(layer, side=side, transform=Shear, strength=0.5)
    dim = 12 if side == "left" else 10
    c2 = wc.register_conditioning(layer, placement="post", side=side,
                                  transform=Shear(dim).double())
    torch.testing.assert_close(layer(x), before)
    assert c1.transform.strength == 0.5 and c2.transform.dim == dim
    randomize(layer)
    check_dense_equals_matrix_free(layer, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["lora", "dora", "pre_diag", "sora"])
def test_low_precision_matrix_free_close_to_dense(dtype, preset: str) -> None:
    layer = make_layer(32, 24, dtype=dtype)
    wc.apply_preset(layer, preset, rank=4)
    randomize(layer, scale=0.1)
    x = torch.randn(6, 24, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    with wc.dense_forward(layer):
        y_dense = layer(x)
    tol = 30 * torch.finfo(dtype).eps * y_dense.abs().max().item()
    torch.testing.assert_close(y, y_dense, rtol=0, atol=tol)


@settings(max_examples=25, deadline=None)
@given(out_features=st.integers(2, 9), in_features=st.integers(2, 9),
       lead=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 10_000),
       preset=st.sampled_from(["lora", "dora", "pre_diag", "sora"]))
def test_property_matrix_free_equals_dense(out_features, in_features, lead, seed, preset) -> None:
    layer = make_layer(out_features, in_features, seed=seed)
    rank = min(2, out_features, in_features)
    options = {"rotation_rank": 1} if preset == "sora" else {}
    wc.apply_preset(layer, preset, rank=rank, **options)
    randomize(layer, seed=seed)
    x = torch.randn(*lead, in_features, dtype=torch.float64)
    check_dense_equals_matrix_free(layer, x)


def test_deepcopy_and_state_dict_round_trip() -> None:
    layer = make_layer()
    wc.apply_preset(layer, "sora", rank=3)
    randomize(layer)
    clone = copy.deepcopy(layer)
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(clone(x), layer(x))
    fresh = make_layer(seed=5)
    wc.apply_preset(fresh, "sora", rank=3)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("change", ["in_place", "data", "replaced_storage"])
def test_dora_follows_any_change_of_the_base_weight(change: str) -> None:
    layer = make_layer()
    wc.apply_preset(layer, "dora", rank=2)
    randomize(layer)
    x = torch.randn(4, 10, dtype=torch.float64)
    layer(x)
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        if change == "in_place":
            original.mul_(2.0)
        elif change == "data":
            original.data.mul_(2.0)  # bypasses the version counter
        else:
            other = torch.randn_like(original)
            original.data = other
            other.mul_(5.0)
    check_dense_equals_matrix_free(layer, x)


def test_inference_mode_then_training_with_attached_norm() -> None:
    layer = make_layer()
    wc.apply_preset(layer, "pre_diag", rank=2)
    wc.register_conditioning(layer, placement="post", transform="magnitude", detach_norm=False)
    randomize(layer)
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.inference_mode():
        layer(x)
    check_dense_equals_matrix_free(layer, x)


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("stack", [
    [("block", "pre", "right"), ("givens", "pre", "right"), ("diag", "pre", "left")],
    [("householder", "pre", "right"), ("orthogonal", "pre", "right"), ("skew", "post", "left"),
     ("diag", "post", "right")],
    [("householder", "pre", "right"), ("skew", "pre", "right"), ("magnitude", "post", "left")],
], ids=["unfolded", "mixed", "right-folded"])
def test_right_stacks_folded_or_not_agree_with_dense(stack, tokens: int) -> None:
    """Thin right conditioners fold with many tokens (Note (folded rotations)), others act
    on the activations; all must equal the dense form."""
    layer = condition(make_layer(24, 20), stack, condition_bias=True)
    randomize(layer)
    check_dense_equals_matrix_free(layer, torch.randn(tokens, 20, dtype=torch.float64))


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("stack", [
    [("skew", "pre", "left"), ("householder", "post", "left"), ("diag", "post", "left")],
    [("diag", "pre", "left"), ("householder", "pre", "right"), ("skew", "post", "left"),
     ("magnitude", "post", "left"), ("skew", "post", "right")],
], ids=["pre-post", "mixed"])
def test_folded_and_unfolded_rotations_agree_with_dense(stack, tokens: int) -> None:
    """Thin left rotations are folded into rank-m terms with many tokens and applied to the
    outputs with few (Note (folded rotations)); both must equal the dense form."""
    layer = condition(make_layer(24, 20), stack, condition_bias=True)
    randomize(layer)
    check_dense_equals_matrix_free(layer, torch.randn(tokens, 20, dtype=torch.float64))


def test_merging_a_deepcopy_leaves_the_original_conditioned() -> None:
    layer = make_layer()
    wc.apply_preset(layer, "sora", rank=3, condition_bias=True)
    randomize(layer)
    x = torch.randn(4, 10, dtype=torch.float64)
    expected = layer(x)
    clone = copy.deepcopy(layer)
    wc.merge(clone)
    assert wc.is_conditioned(layer)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight, wc.delta_weight(layer) +
                               layer.parametrizations.weight.original)
    torch.testing.assert_close(clone(x), expected)


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_gradcheck_through_the_layer(cell) -> None:
    layer = condition(make_layer(5, 4), [cell], condition_bias=True)
    for c in wc.conditioners(layer):
        c.transform.detach_norm = False  # a detached norm's gradient is not the true one
    randomize(layer)
    names = [n for n, _ in trainable(layer)]
    values = [p.detach().clone().requires_grad_() for _, p in trainable(layer)]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *values))


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_bfloat16_cells_are_finite_and_close_to_dense(cell) -> None:
    layer = make_layer(16, 12, dtype=torch.bfloat16)
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    before = layer(x)
    condition(layer, [cell], condition_bias=True)
    tol = 8 * torch.finfo(torch.bfloat16).eps * before.abs().max().item()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=tol)
    randomize(layer, scale=0.1)
    y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for _, p in trainable(layer))
    with wc.dense_forward(layer):
        y_dense = layer(x)
    tol = 30 * torch.finfo(torch.bfloat16).eps * y_dense.abs().max().item()
    torch.testing.assert_close(y, y_dense, rtol=0, atol=tol)
