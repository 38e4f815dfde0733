"""The kernels of the strided rotations (``givens``, ``butterfly``): inputs recomputed from
outputs, two Givens segments in place, merged butterfly factors and the fused strided
product, each against the dense form in float64, and what their backward keeps."""

from __future__ import annotations

import pytest
import torch

import weightcond as wc
from weightcond.transforms.butterfly import chunk_rows, strided_rotated_linear

ROTATIONS = [
    ("givens", {}, 64),  # two segments: in place
    ("givens", {}, 40),  # padded to 64
    ("givens", {}, 128),
    ("givens", {"rounds": 9}, 64),  # three layouts: the route
    ("givens", {}, 2048),  # three segments
    ("butterfly", {"block_size": 8}, 64),
    ("butterfly", {"block_size": 4, "factors": 2}, 64),  # merged
    ("butterfly", {"block_size": 4, "factors": 3, "map": "exp"}, 64),  # merged
    ("butterfly", {"block_size": 2, "factors": 5}, 64),  # not merged: the route
]


def _random(name: str, options: dict, n: int) -> wc.transforms.Transform:
    torch.manual_seed(0)
    t = wc.TRANSFORMS[name](n, **options).double()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.5)
    return t


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(("name", "options", "n"), ROTATIONS)
def test_apply_and_its_gradients_equal_the_dense_form(name, options, n, transpose) -> None:
    t = _random(name, options, n)
    x = torch.randn(3, 37, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 37, n, dtype=torch.float64)
    y = t.apply(x, transpose=transpose)
    grads = torch.autograd.grad(y, [x, *t.parameters()], g)
    q = t.matrix()
    y_dense = x @ (q if transpose else q.mT)
    dense = torch.autograd.grad(y_dense, [x, *t.parameters()], g)
    torch.testing.assert_close(y, y_dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("name", "options", "n"), ROTATIONS[:3] + ROTATIONS[5:8])
def test_the_backward_keeps_the_output_not_the_inputs(name, options, n) -> None:
    """Note (rotations recomputed from their output): of the activations, only the output
    is saved (it is the same tensor, not a copy)."""
    t = _random(name, options, n)
    x = torch.randn(256, n, dtype=torch.float64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s,
                                                  lambda s: s):
        y = t.apply(x)
    large = [s for s in saved if s.numel() >= x.numel()]
    assert len(large) == 1
    assert large[0].data_ptr() == y.data_ptr() or large[0].untyped_storage().data_ptr() \
        == y.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "options", "n"), [ROTATIONS[0], ROTATIONS[3], ROTATIONS[6]])
def test_recomputed_gradients_stay_at_the_dtype_precision(name, options, n, dtype) -> None:
    """The blocks' gradients, recomputed from the output in float32 (bfloat16 runs its
    backward in float32), are within a few units of the dtype's epsilon of float64."""
    t = _random(name, options, n)
    x = torch.randn(512, n, dtype=torch.float64)
    g = torch.randn(512, n, dtype=torch.float64)
    reference = torch.autograd.grad(t.apply(x), list(t.parameters()), g)
    low = t.to(dtype)
    found = torch.autograd.grad(low.apply(x.to(dtype)), list(low.parameters()), g.to(dtype))
    eps = torch.finfo(dtype).eps
    for a, b in zip(found, reference, strict=True):
        error = (a.double() - b).abs().max() / b.abs().max()
        assert error < 16 * eps, error


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [16, 64])  # W Q with more rows than tokens, and fewer
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize(("name", "options", "n"), [ROTATIONS[0], ROTATIONS[3], ROTATIONS[6]])
def test_fused_strided_product_equals_the_dense_form(name, options, n, input_grad, tokens,
                                                      bias) -> None:
    """Note (the fused strided product): ``x (W Q)ᵀ + b`` and its gradients (the weight's
    too) against the dense form, with ``W Q`` kept (fewer rows than tokens, no input
    gradient) and formed again."""
    t = _random(name, options, n)
    w = torch.randn(32, n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(32, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(tokens, n, dtype=torch.float64, requires_grad=input_grad)
    g = torch.randn(tokens, 32, dtype=torch.float64)
    inputs = [p for p in (x, w, b, *t.parameters()) if p is not None and p.requires_grad]
    y = t.rotated_linear(x, w, b)
    y_dense = torch.nn.functional.linear(x, w @ t.matrix(), b)
    torch.testing.assert_close(y, y_dense, rtol=1e-12, atol=1e-12)
    for a, c in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_dense, inputs, g),
                    strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_fused_strided_product_takes_only_orthogonal_blocks() -> None:
    assert wc.TRANSFORMS["butterfly"](16, block_size=4).fuses_linear
    assert not wc.TRANSFORMS["butterfly"](16, block_size=4, map="first_order").fuses_linear
    assert not wc.TRANSFORMS["givens"](40).fuses_linear  # padded: apply pads, W Q cannot
    assert callable(strided_rotated_linear)


def test_chunks_are_a_fraction_of_the_tokens() -> None:
    assert chunk_rows(2048, 1024) == 64
    assert chunk_rows(2048, 1024, 2) == 64  # at least 2^16 elements
    assert chunk_rows(24, 64) == 12  # at most half: the stacked pair is one activation
    assert chunk_rows(1, 64) == 1
