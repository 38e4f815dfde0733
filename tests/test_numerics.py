"""Numerics under stress: large generator norms, DoRA on zero-norm rows, thousands of
register/remove cycles, and bf16/fp16 training of the rotations.

The bounds asserted here are the ones ``docs/guarantees.rst`` states; the measured values
recorded there come from ``python tests/test_numerics.py``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import weightcond as wc
from weightcond.transforms import maps

from helpers import PRESET_NAMES, TRANSFORM_NAMES, make_layer, randomize, trainable

N = 16  # the side dimension of the transform-level checks
HALF = (torch.bfloat16, torch.float16)
HALF_BOUND = 8.0  # × eps(dtype): rounding Q to bf16/fp16 once, whatever n


def orthogonality_error(q: torch.Tensor) -> float:
    """``max|QᵀQ - I|``, evaluated in float64 (the error of ``Q`` itself, not of the check)."""
    q = q.detach().double()
    return (q.mT @ q - torch.eye(q.shape[-1], dtype=torch.float64)).abs().max().item()


def orthogonal_bound(n: int, dtype: torch.dtype) -> float:
    """PyTorch's bound for orthogonal parametrizations, ``10 · n · eps(dtype)``."""
    return 10 * n * torch.finfo(dtype).eps


def exp_bound(n: int, norm: float, dtype: torch.dtype) -> float:
    """The exponential's bound, ``20 · (n · eps(dtype) + min(‖S‖₂, 2^30) · eps(float64))``:
    scaling and squaring squares ``log2 ‖S‖`` times and every squaring doubles the error of
    the square, so the maps run in float64 on generators capped at 2^30 (Note (exp in
    float64, generators capped at 2^30) in :mod:`weightcond.transforms.maps`)."""
    return 20 * (n * torch.finfo(dtype).eps
                 + min(norm, maps.EXP_NORM_CAP) * torch.finfo(torch.float64).eps)


def accepting(map_name: str) -> list[str]:
    """The registered transforms whose constructor takes ``map=map_name`` (found by building
    them: a transform without the option, or without that map, raises a typed error)."""
    found = []
    for name in TRANSFORM_NAMES:
        try:
            wc.TRANSFORMS[name](N, map=map_name)
        except (TypeError, wc.WeightcondError):
            continue
        found.append(name)
    return found


def build(name: str, map_name: str, dtype: torch.dtype, scale: float, seed: int = 0):
    t = wc.TRANSFORMS[name](N, map=map_name).to(dtype)
    randomize(t, scale=scale, seed=seed)
    return t


def test_every_map_has_transforms() -> None:
    for map_name in ("cayley", "exp", "first_order"):
        assert {"skew", "block", "orthogonal"} <= set(accepting(map_name))


# -- large generator norms -----------------------------------------------------------------
SCALES = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)
# parameters far beyond what training reaches: generator norms up to ~1e60 for `skew`
HUGE_SCALES = (1e4, 1e6, 1e10, 1e19, 1e30)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", accepting("cayley"))
def test_cayley_stays_orthogonal_at_any_generator_norm(name: str, dtype: torch.dtype) -> None:
    """Parameters from 1e-4 to 1e3 (generator norms up to ~1e8 for the quadratic ``skew``)."""
    for scale in SCALES:
        t = build(name, "cayley", dtype, scale)
        assert t.is_orthogonal
        assert orthogonality_error(t.matrix()) <= orthogonal_bound(N, dtype), scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", accepting("exp"))
def test_exp_stays_orthogonal_at_moderate_generator_norms(name: str, dtype: torch.dtype) -> None:
    """Small parameters put single matrices in ``matrix_exp``'s degree-8 range (see
    Note (singleton matrix_exp) in :mod:`weightcond.transforms.maps`)."""
    for scale in SCALES[:5]:
        t = build(name, "exp", dtype, scale)
        assert t.is_orthogonal
        assert orthogonality_error(t.matrix()) <= orthogonal_bound(N, dtype), scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("name", accepting("exp"))
def test_exp_stays_finite_and_orthogonal_at_every_generator_norm(name: str, dtype) -> None:
    """Regression: in float32 ``skew`` with ``map="exp"`` reached ``max|QᵀQ - I|`` = 1e8
    at parameters ×1e3 (n = 64, k = 2) and NaN from ×1e4 on, as did the dense exp (Note (exp
    in float64, generators capped at 2^30) in :mod:`weightcond.transforms.maps`)."""
    n = 64
    for scale in (*SCALES, *HUGE_SCALES):
        if dtype == torch.float16 and scale > 1e4:
            continue  # beyond float16's range
        t = wc.TRANSFORMS[name](n, map="exp").to(dtype)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in t.parameters():  # independent C and D: a generator of full rank 2k
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        q = t.matrix()
        assert torch.isfinite(q).all(), scale
        bound = (HALF_BOUND * torch.finfo(dtype).eps if dtype in HALF
                 else exp_bound(n, math.inf, dtype))
        assert orthogonality_error(q) <= bound, scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matrix_exp_of_a_single_small_rotation(dtype: torch.dtype) -> None:
    """Regression (pytorch/pytorch#196592): the degree-8 path of a lone matrix."""
    for theta in (0.04, 0.3, 0.5):
        s = torch.tensor([[0.0, -theta], [theta, 0.0]], dtype=dtype)
        expected = torch.tensor([[math.cos(theta), -math.sin(theta)],
                                 [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
        for batch in ((), (1,), (1, 1)):
            q = maps.matrix_exp(s.expand(*batch, 2, 2))
            assert q.shape == (*batch, 2, 2)
            err = (q.double() - expected).abs().max().item()
            assert err <= 4 * torch.finfo(dtype).eps, (theta, batch, err)


def random_skew(n: int, norm: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=gen, dtype=torch.float64)
    s = x - x.mT
    return (s * (norm / torch.linalg.matrix_norm(s, 2))).to(dtype)


def random_low_rank(n: int, k: int, norm: float, dtype: torch.dtype, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, K)`` with ``S = P K Pᵀ`` of spectral norm ``norm`` (``K = [[0, I], [-I, 0]]``)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 2 * k, generator=gen, dtype=torch.float64)
    eye, zero = torch.eye(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
    j = torch.cat([torch.cat([zero, eye], 1), torch.cat([-eye, zero], 1)])
    p = p * (norm / torch.linalg.matrix_norm(p @ j @ p.mT, 2)).sqrt()
    return p.to(dtype), j.to(dtype)


NORMS = (0.1, 1.0, 10.0, 100.0, 1000.0, 1e5, 1e8, 1e12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_exact_maps_at_large_generator_norms(dtype: torch.dtype) -> None:
    """Dense and low-rank maps of generators with ``‖S‖₂`` up to 1e12: Cayley within
    ``10 · n · eps``, exp within :func:`exp_bound` (its error grows with the norm)."""
    for norm in NORMS:
        for seed in range(4):
            s = random_skew(N, norm, dtype, seed)
            assert orthogonality_error(maps.cayley(s)) <= orthogonal_bound(N, dtype)
            assert orthogonality_error(maps.matrix_exp(s)) <= exp_bound(N, norm, dtype)
            p, j = random_low_rank(N, 2, norm, dtype, seed)
            eye = torch.eye(N, dtype=dtype)
            for map_name, bound in (("cayley", orthogonal_bound(N, dtype)),
                                    ("exp", exp_bound(N, norm, dtype))):
                q = eye + p @ maps.lowrank_core(j, p.mT @ p, map_name) @ p.mT
                assert orthogonality_error(q) <= bound, (map_name, norm, seed)


def skew_generator_norm(t) -> float:
    c, d = t.C.detach().double(), t.D.detach().double()
    return t.scale().item() * torch.linalg.matrix_norm(d @ c.mT - c @ d.mT, 2).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_skew_exp_follows_the_exp_bound_at_large_norms(dtype: torch.dtype) -> None:
    """``skew``'s low-rank exponential (``2k < n``) and its dense one (``2k >= n``)."""
    for rank in (2, 4, N // 2):
        for scale in (1.0, 10.0, 100.0):
            t = wc.TRANSFORMS["skew"](N, rank=rank, map="exp").to(dtype)
            randomize(t, scale=scale)
            bound = exp_bound(N, skew_generator_norm(t), dtype)
            assert orthogonality_error(t.matrix()) <= bound, (rank, scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("map_name", ["cayley", "exp"])
def test_skew_with_unbalanced_factors_stays_orthogonal(map_name: str, dtype) -> None:
    """Regression (Note (balanced factors) in ``Skew.factors``): ``‖D‖ ≫ ‖C‖``; unbalanced,
    exp reached 5e6 · n · eps at ``‖S‖₂`` = 1e4 in float32."""
    n = 64
    for factor in (1.0, 10.0, 100.0, 1000.0):
        torch.manual_seed(0)
        t = wc.TRANSFORMS["skew"](n, rank=4, map=map_name).to(dtype)
        with torch.no_grad():
            t.D.add_(factor * torch.randn(n, 4, dtype=dtype))
        bound = (orthogonal_bound(n, dtype) if map_name == "cayley"
                 else exp_bound(n, skew_generator_norm(t), dtype))
        assert orthogonality_error(t.matrix()) <= bound, factor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("map_name", ["cayley", "exp"])
def test_skew_near_the_identity_with_rank_close_to_n(map_name: str, dtype) -> None:
    """Regression (Note (dense when 2k >= n) in ``Skew.low_rank``): near the identity the
    low-rank form with ``rank = n`` reached 37 · n · eps (n = 2, float32)."""
    for n in (2, 3, 5, 8):
        for seed in range(10):
            t = wc.TRANSFORMS["skew"](n, rank=n, map=map_name).to(dtype)
            randomize(t, scale=0.1, seed=seed)
            assert orthogonality_error(t.matrix()) <= orthogonal_bound(n, dtype), (n, seed)
        fresh = wc.TRANSFORMS["skew"](n, rank=n, map=map_name).to(dtype)
        at_init = (fresh.matrix() - torch.eye(n, dtype=dtype)).abs().max().item()
        assert at_init <= n * torch.finfo(dtype).eps  # only the rounding of D Cᵀ remains


@pytest.mark.parametrize("name", accepting("first_order"))
def test_first_order_is_not_orthogonal_and_its_error_grows(name: str) -> None:
    """``I + S`` has ``(I + S)ᵀ(I + S) - I = SᵀS``: no bound, the error grows with ``S``."""
    errors = []
    for scale in (1e-3, 1e-2, 0.1, 1.0, 10.0):
        t = build(name, "first_order", torch.float64, scale)
        assert not t.is_orthogonal
        q = t.matrix().detach()
        s = q - torch.eye(N, dtype=torch.float64)
        torch.testing.assert_close(s, -s.mT, rtol=0, atol=1e-12)  # Q - I is the skew S
        torch.testing.assert_close(q.mT @ q - torch.eye(N, dtype=torch.float64), s.mT @ s)
        errors.append(orthogonality_error(q))
    assert errors == sorted(errors) and errors[-1] > 1e3 * errors[0]
    assert errors[-1] > orthogonal_bound(N, torch.float32)


# -- DoRA and magnitude on zero-norm lines -------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("zero", ["some", "all"])
def test_dora_with_zero_norm_rows_is_finite(dtype: torch.dtype, detach_norm: bool,
                                            zero: str) -> None:
    """PEFT's DoRA divides by the zero norm and returns NaN; ours floors it (eps)."""
    layer = make_layer(8, 6, dtype=dtype)
    rows = [0, 3, 7] if zero == "some" else list(range(8))
    with torch.no_grad():
        layer.weight[rows] = 0
    wc.apply_preset(layer, "dora", rank=2, detach_norm=detach_norm)
    x = torch.randn(5, 6, dtype=dtype)
    opt = torch.optim.SGD([p for _, p in trainable(layer)], lr=0.1)
    for step in range(3):  # at init (B = 0, the rows are exactly zero), then trained
        for dense in (False, True):
            with wc.dense_forward(layer) if dense else contextlib.nullcontext():
                xr = x.clone().requires_grad_()
                y = layer(xr)
                assert torch.isfinite(y).all()
                if step == 0:  # a zero row gives the bias, exactly
                    assert torch.equal(y[:, rows], layer.bias[rows].expand(5, -1))
                opt.zero_grad()
                y.float().square().sum().backward()
                assert torch.isfinite(xr.grad).all()
                assert all(torch.isfinite(p.grad).all() for _, p in trainable(layer))
        opt.step()
    assert wc.get_update(layer).B.abs().sum() > 0  # the update did move


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("tokens", [4, 64])  # both orientations of the input gradient
def test_dora_row_zeroed_after_registration_is_finite(dtype, detach_norm: bool,
                                                      tokens: int) -> None:
    """Regression (Note (a diagonal that stays finite) in ``magnitude.py``): a row of W
    zeroed after registration keeps its magnitude (0.5 here) over a norm floored at eps, a
    diagonal of 5e5, which was inf in float16: NaN outputs, gradients and merged weight."""
    layer = make_layer(8, 16, dtype=dtype)
    wc.apply_preset(layer, "dora", rank=2, detach_norm=detach_norm)
    with torch.no_grad():
        layer.parametrizations.weight.original[0] = 0
    x = torch.randn(tokens, 16, dtype=dtype)
    outputs = []
    for dense in (False, True):
        with wc.dense_forward(layer) if dense else contextlib.nullcontext():
            xr = x.clone().requires_grad_()
            y = layer(xr)
            assert torch.equal(y[:, 0], layer.bias[0].expand(tokens)), dense  # the bias
            (10 * y.float()).sum().backward()  # gradient entries of 10
            assert torch.isfinite(y).all() and torch.isfinite(xr.grad).all()
            assert all(torch.isfinite(p.grad).all() for _, p in trainable(layer)), dense
            layer.zero_grad()
            outputs.append(y.detach())
    budget = 8 * 16 * torch.finfo(dtype).eps * outputs[1].abs().max().item()  # as the grid
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=budget)
    merged = wc.merge(layer)
    assert torch.isfinite(merged.weight).all() and not merged.weight[0].any()


@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16], ids=str)
def test_dora_row_zeroed_after_registration_under_autocast(autocast) -> None:
    """The same with float32 parameters under autocast: the diagonal is limited in the
    dtype the products run in."""
    layer = make_layer(8, 16, dtype=torch.float32)
    wc.apply_preset(layer, "dora", rank=2)
    with torch.no_grad():
        layer.parametrizations.weight.original[0] = 0
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=autocast):
        y = layer(x)
    assert y.dtype == autocast and torch.isfinite(y).all()
    (10 * y.float()).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for _, p in trainable(layer))


def test_dora_row_zeroed_with_float32_adapter_on_a_float16_base() -> None:
    """The adapter's parameters kept in float32 on a float16 base (as PEFT's
    ``autocast_adapter_dtype``): the diagonal is limited in the narrowest dtype it meets,
    the base's, not its own (regression: NaN there, found in review)."""
    layer = make_layer(8, 16, dtype=torch.float16)
    applied = wc.apply_preset(layer, "dora", rank=2)
    applied.update.float()
    applied.conditioners[0].transform.float()
    with torch.no_grad():
        layer.parametrizations.weight.original[0] = 0
    for dense in (False, True):
        with wc.dense_forward(layer) if dense else contextlib.nullcontext():
            x = torch.randn(4, 16, dtype=torch.float16, requires_grad=True)
            y = layer(x)
            assert torch.equal(y[:, 0], layer.bias[0].expand(4)), dense
            (10 * y.float()).sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
            assert all(torch.isfinite(p.grad).all() for _, p in trainable(layer)), dense
            layer.zero_grad()
    assert torch.isfinite(wc.merge(layer).weight).all()


def test_dora_under_autocast() -> None:
    """The exactly recomputed rows (Note (cancelled rows)) stay in float32 under autocast."""
    layer = make_layer(12, 10, dtype=torch.float32)
    wc.apply_preset(layer, "dora", rank=2)
    randomize(layer)
    x = torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("input_grad", [False, True])
def test_fused_block_under_autocast(input_grad: bool) -> None:
    """Block.rotated_linear (the OFT weight form) runs its backward in the autocast dtype
    its forward GEMMs ran in, and agrees with float32."""
    grads = {}
    for autocast in (False, True):
        layer = make_layer(16, 64, dtype=torch.float32)
        block = wc.register_conditioning(layer, side="right", transform="block",
                                         block_size=8).transform
        randomize(layer)
        assert block.fuses_linear
        x = torch.randn(128, 64, generator=torch.Generator().manual_seed(0),
                        requires_grad=input_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        y.float().square().sum().backward()
        grads[autocast] = [block.generator.grad, *([x.grad] if input_grad else [])]
    for got, expected in zip(grads[True], grads[False], strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * expected.abs().max())


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("cancelled", [3, 16])
def test_dora_rows_of_w_plus_update_that_cancel(detach_norm: bool, cancelled: int) -> None:
    """Note (cancelled rows) in ``weightcond.engine.norms``: where ``W_i`` and ``s(BA)_i``
    nearly cancel, both forms lose accuracy in proportion to
    ``κ = (‖W_i‖ + ‖s(BA)_i‖) / ‖X_i‖`` (1e6 here: they round ``X_i`` first); the fast path
    stays within that, the expansion of ``‖X_i‖²`` alone would lose ``κ²``."""
    out, n = 40, 24
    layer = make_layer(out, n)
    wc.apply_preset(layer, "dora", rank=4, detach_norm=detach_norm)
    randomize(layer, scale=0.3, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        base = layer.parametrizations.weight.original
        delta = wc.get_update(layer).matrix()
        wobble = 1 + 1e-6 * torch.randn(cancelled, 1, generator=gen, dtype=torch.float64)
        base[:cancelled] = -delta[:cancelled] * wobble  # ‖X_i‖ ≈ 1e-6 ‖W_i‖
    x = torch.randn(7, n, generator=gen, dtype=torch.float64)
    y = layer(x)
    with wc.dense_forward(layer):
        y_dense = layer(x)
        weight = layer.weight.detach()
    eps = torch.finfo(torch.float64).eps
    scale = (x.abs() @ weight.abs().mT + layer.bias.abs()).max().item()
    x_rows = base + delta
    kappa = ((base.norm(dim=1) + delta.norm(dim=1)) / x_rows.norm(dim=1)).max().item()
    assert kappa > 1e5
    assert (y - y_dense).abs().max().item() <= 8 * n * eps * scale * kappa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_magnitude_with_zero_lines_is_finite(dtype, placement: str, side: str) -> None:
    layer = make_layer(8, 6, dtype=dtype)
    with torch.no_grad():
        if side == "left":
            layer.weight[[1, 4]] = 0
        else:
            layer.weight[:, [2, 5]] = 0
    wc.register_update(layer, rank=2)
    magnitude = wc.register_conditioning(layer, placement=placement, side=side,
                                         transform="magnitude", detach_norm=False)
    randomize(magnitude)  # B stays zero: the zero lines stay zero
    for dense in (False, True):
        with wc.dense_forward(layer) if dense else contextlib.nullcontext():
            x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
            y = layer(x)
            y.float().square().sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
            assert all(torch.isfinite(p.grad).all() for _, p in trainable(layer))


@pytest.mark.parametrize("side", ["left", "right"])
def test_attached_norm_of_small_lines_in_float16_has_finite_gradients(side: str) -> None:
    """Regression: with ``detach_norm=False`` the norm's gradient ``-m / ‖M‖²`` overflowed
    float16 for lines of norm ~1e-4 (now computed in float32, Note (small solves))."""
    for seed in range(4):
        layer = make_layer(6, 6, dtype=torch.float16, seed=seed)
        with torch.no_grad():
            (layer.weight[0] if side == "left" else layer.weight[:, 0]).mul_(1e-3)
        wc.register_update(layer, rank=2)
        magnitude = wc.register_conditioning(layer, placement="post", side=side,
                                             transform="magnitude", detach_norm=False)
        randomize(magnitude, seed=seed)
        for dense in (False, True):
            with wc.dense_forward(layer) if dense else contextlib.nullcontext():
                x = torch.randn(4, 6, dtype=torch.float16, requires_grad=True)
                y = layer(x)
                y.backward(torch.full_like(y, 2.0))
                assert torch.isfinite(x.grad).all()
                for _, p in trainable(layer):
                    assert torch.isfinite(p.grad).all()
                    p.grad = None


# -- register / remove cycles --------------------------------------------------------------
# the 10,000 cycles over every preset take 12.5 s here (1.25 ms a cycle on 2 CPU
# cores, idle; 4-8 ms when the cores are shared with other jobs)
CYCLES = 10_000


def test_register_remove_cycles_restore_the_base_bit_exactly() -> None:
    """Every preset in turn, trained now and then: the base weight and bias stay the same
    objects with the same bits, the layer its plain class, and nothing accumulates."""
    layer = make_layer(8, 8, dtype=torch.float32)
    weight, bias = layer.weight, layer.bias
    saved = weight.clone(), bias.clone()
    x = torch.randn(3, 8)
    before = layer(x)
    attributes = set(vars(layer))
    plans = [(name, {"rank": 2} if wc.PRESETS[name].update else {}) for name in PRESET_NAMES]
    gc.collect()
    objects = len(gc.get_objects())
    for i in range(CYCLES):
        name, options = plans[i % len(plans)]
        wc.apply_preset(layer, name, **options)
        if i % 50 == 0:  # train now and then: nothing may leak into the base tensors
            randomize(layer, seed=i)
            layer(x).square().sum().backward()
            with torch.no_grad():
                for _, p in trainable(layer):
                    p.sub_(0.1 * p.grad)
        wc.remove_conditioning(layer)
        assert layer.weight is weight and layer.bias is bias and type(layer) is nn.Linear
    gc.collect()
    assert len(gc.get_objects()) - objects < 1000, "objects leak across cycles"
    assert torch.equal(weight, saved[0]) and torch.equal(bias, saved[1])
    assert not parametrize.is_parametrized(layer) and dict(layer.named_children()) == {}
    assert set(vars(layer)) == attributes and set(layer.state_dict()) == {"weight", "bias"}
    assert torch.equal(layer(x), before)


def test_remove_conditioning_and_merge_keep_the_parameter_order() -> None:
    """torch's remove_parametrizations re-registers the weight after the bias; parameters(),
    state_dict() and an optimizer's parameter order must not change."""
    for finish in (wc.remove_conditioning, wc.merge):
        layer = make_layer(4, 3)
        order = [name for name, _ in layer.named_parameters()]
        wc.apply_preset(layer, "lora", rank=1)
        finish(layer)
        assert [name for name, _ in layer.named_parameters()] == order
        assert list(layer.state_dict()) == order


# -- half-precision training ---------------------------------------------------------------
ROTATIONS = [(name, {}) for name in TRANSFORM_NAMES
             if not wc.TRANSFORMS[name].norm_tied and wc.TRANSFORMS[name](N).is_orthogonal]
ROTATIONS += [(name, {"map": "exp"}) for name in accepting("exp")]


def train_half(name: str, options: dict, dtype: torch.dtype, seed: int = 0, steps: int = 5
               ) -> tuple[list[float], float]:
    """Adam (lr 0.1) on a ``(N, N)`` layer in ``dtype`` with an update and the rotation on
    the left after it: ``max|QᵀQ - I|`` after every step, and how far ``Q`` moved from ``I``."""
    layer = make_layer(N, N, dtype=dtype, seed=seed)
    wc.register_update(layer, rank=4)
    rotation = wc.register_conditioning(layer, placement="post", side="left",
                                        transform=name, **options).transform
    # Adam's default eps (1e-8) is 0 in float16 and turns the zero gradient of A at init
    # (B = 0) into 0/0; 1e-4 is representable in both dtypes
    opt = torch.optim.Adam([p for _, p in trainable(layer)], lr=0.1, eps=1e-4)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, N, generator=gen).to(dtype)
    target = torch.randn(32, N, generator=gen)
    errors = []
    for _ in range(steps):
        opt.zero_grad()
        (layer(x).float() - target).square().mean().backward()
        opt.step()
        q = rotation.matrix()
        assert q.dtype == dtype and torch.isfinite(q).all()
        errors.append(orthogonality_error(q))
    moved = (q.double() - torch.eye(N, dtype=torch.float64)).abs().max().item()
    return errors, moved


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(("name", "options"), ROTATIONS,
                         ids=[f"{n}-{o.get('map', 'default')}" for n, o in ROTATIONS])
def test_half_precision_training_stays_orthogonal(name: str, options, dtype) -> None:
    """Adam with a large learning rate on bf16/fp16 parameters: the rotation stays within
    ``10 · n · eps(dtype)`` after every step. Its small problems run in float32 (Note
    (small solves) in :mod:`weightcond.transforms.base`), so the error is that of rounding
    ``Q`` to the dtype: a few eps, whatever ``n`` (:data:`HALF_BOUND`)."""
    errors, moved = train_half(name, options, dtype)
    bound = min(orthogonal_bound(N, dtype), HALF_BOUND * torch.finfo(dtype).eps)
    assert max(errors) <= bound
    assert moved > 0.05  # the rotation did train


if __name__ == "__main__":  # print the measured values recorded in docs/guarantees.rst
    for dtype in (torch.float64, torch.float32):
        eps = torch.finfo(dtype).eps
        for norm in NORMS:
            worst = {"cayley": 0.0, "exp": 0.0, "lowrank cayley": 0.0, "lowrank exp": 0.0}
            for seed in range(20):
                s = random_skew(N, norm, dtype, seed)
                worst["cayley"] = max(worst["cayley"], orthogonality_error(maps.cayley(s)))
                worst["exp"] = max(worst["exp"], orthogonality_error(maps.matrix_exp(s)))
                p, j = random_low_rank(N, 2, norm, dtype, seed)
                for m in ("cayley", "exp"):
                    q = torch.eye(N, dtype=dtype) + p @ maps.lowrank_core(j, p.mT @ p, m) @ p.mT
                    worst["lowrank " + m] = max(worst["lowrank " + m], orthogonality_error(q))
            print(f"{dtype!s:14s} |S|={norm:<7g} " + "  ".join(
                f"{k} {v / (N * eps) if 'cayley' in k else 20 * v / exp_bound(N, norm, dtype):.3g}"
                for k, v in worst.items()),
                "(cayley: / n eps, exp: / (n eps + min(|S|, 2^30) eps64))")
    for dtype in HALF:
        for name, options in ROTATIONS:
            worst = max(max(train_half(name, options, dtype, seed)[0]) for seed in range(3))
            print(f"{dtype!s:14s} {name} {options}: max|QᵀQ - I| = "
                  f"{worst / torch.finfo(dtype).eps:.3g} eps")
    layer = make_layer(8, 8, dtype=torch.float32)
    for name in PRESET_NAMES:
        options = {"rank": 2} if wc.PRESETS[name].update else {}
        start = time.perf_counter()
        for _ in range(200):
            wc.apply_preset(layer, name, **options)
            wc.remove_conditioning(layer)
        print(f"register/remove {name}: {(time.perf_counter() - start) / 200 * 1e3:.2f} ms")
