"""Every registered transform: identity at init, both views agree, exact orthogonality, the
low-rank maps equal their dense references, gradcheck, orthogonal after optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch

import weightcond as wc
from weightcond.transforms import maps

from helpers import TRANSFORM_NAMES, orthogonality_bound, randomize

DENSE = [n for n in TRANSFORM_NAMES if not wc.TRANSFORMS[n].norm_tied]
ORTHOGONAL = [n for n in DENSE if wc.TRANSFORMS[n](8).is_orthogonal]


def build(name: str, dim: int, dtype: torch.dtype = torch.float64, **options):
    return wc.TRANSFORMS[name](dim, **options).to(dtype)


@pytest.mark.parametrize("name", DENSE)
def test_identity_at_init(name: str) -> None:
    t = build(name, 12)
    eye = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(t.matrix(), eye, rtol=0, atol=1e-12)
    h = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(t.apply(h), h, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("transpose", [False, True])
def test_apply_equals_matrix(name: str, transpose: bool) -> None:
    t = build(name, 16)
    randomize(t)
    q = t.matrix()
    h = torch.randn(2, 3, 16, dtype=torch.float64)
    expected = h @ (q if transpose else q.mT)
    torch.testing.assert_close(t.apply(h, transpose=transpose), expected)


@pytest.mark.parametrize("name", ORTHOGONAL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orthogonal_at_random_parameters(name: str, dtype: torch.dtype) -> None:
    t = build(name, 24, dtype)
    assert t.is_orthogonal
    randomize(t, scale=0.5)
    q = t.matrix().detach()
    err = (q.mT @ q - torch.eye(24, dtype=dtype)).abs().max().item()
    assert err <= orthogonality_bound(24, dtype)
    assert torch.linalg.det(q.double()).item() == pytest.approx(
        1.0, abs=orthogonality_bound(24, dtype))


@pytest.mark.parametrize("name", ORTHOGONAL)
def test_still_orthogonal_after_optimizer_steps(name: str) -> None:
    t = build(name, 20, torch.float32)
    assert t.is_orthogonal
    opt = torch.optim.Adam(t.parameters(), lr=0.05)
    target = torch.randn(20, 20)
    for _ in range(10):
        opt.zero_grad()
        loss = (t.apply(target) - target.flip(0)).square().sum()
        loss.backward()
        opt.step()
        q = t.matrix().detach()
        assert (q.mT @ q - torch.eye(20)).abs().max() <= orthogonality_bound(20, torch.float32)
    assert not torch.allclose(t.matrix().detach(), torch.eye(20))  # it did move


class _Apply(torch.nn.Module):
    def __init__(self, transform) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, h: torch.Tensor, transpose: bool) -> torch.Tensor:
        return self.transform.apply(h, transpose=transpose)


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck(name: str, transpose: bool) -> None:
    wrapper = _Apply(build(name, 6))
    randomize(wrapper)
    names = [n for n, _ in wrapper.named_parameters()]
    values = [p.detach().clone().requires_grad_() for _, p in wrapper.named_parameters()]
    h = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(h, *values):
        return torch.func.functional_call(wrapper, dict(zip(names, values)), (h, transpose))

    assert torch.autograd.gradcheck(f, (h, *values))


# -- exactness against dense references ------------------------------------------------------
def skew_generator(t) -> torch.Tensor:
    c, d = t.C.detach(), t.D.detach()
    return t.scale().detach() * (d @ c.T - c @ d.T)


@pytest.mark.parametrize("temperature", [False, True])
@pytest.mark.parametrize("map_name, reference", [
    ("cayley", lambda s: torch.linalg.solve(torch.eye(len(s), dtype=s.dtype) - s / 2,
                                            torch.eye(len(s), dtype=s.dtype) + s / 2)),
    ("exp", torch.linalg.matrix_exp),
    ("first_order", lambda s: torch.eye(len(s), dtype=s.dtype) + s),
])
def test_lowrank_skew_equals_dense_map(map_name, reference, temperature) -> None:
    t = build("skew", 30, rank=3, map=map_name, temperature=temperature)
    randomize(t, scale=0.6)
    s = skew_generator(t)
    torch.testing.assert_close(t.matrix().detach(), reference(s), rtol=1e-10, atol=1e-10)


def test_skew_temperature_is_the_authors_formula() -> None:
    t = build("skew", 10, rank=2, temperature=True)
    randomize(t, scale=2.0)
    expected = min(1 / (t.C.norm().item() + t.D.norm().item() + 1e-6), 1.0)
    assert t.scale().item() == pytest.approx(expected, rel=1e-12)
    small = build("skew", 10, rank=2, temperature=True)
    with torch.no_grad():
        small.C.mul_(1e-3)
        small.D.mul_(1e-3)
    assert small.scale().item() == 1.0


def test_cayley_convention_and_first_order_agreement() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 8, dtype=torch.float64)
    s = x - x.T
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(maps.cayley(s), torch.linalg.inv(eye - s / 2) @ (eye + s / 2))
    for eps in (1e-2, 1e-3):
        for f in (maps.cayley, maps.matrix_exp):
            # all maps agree with I + S up to O(eps²)
            assert (f(eps * s) - maps.first_order(eps * s)).abs().max() < 10 * eps ** 2 * \
                s.abs().max() ** 2 * 8


def test_householder_equals_product_of_reflections() -> None:
    t = build("householder", 14, reflections=6)
    randomize(t)
    q = torch.eye(14, dtype=torch.float64)
    for u in t.U.detach().T:
        q = q @ (torch.eye(14, dtype=torch.float64) - 2 * torch.outer(u, u) / (u @ u))
    torch.testing.assert_close(t.matrix().detach(), q)


def test_householder_identity_pairs() -> None:
    t = build("householder", 10, reflections=4)
    assert torch.equal(t.U[:, 0], t.U[:, 1]) and torch.equal(t.U[:, 2], t.U[:, 3])


@pytest.mark.parametrize("dim", [8, 11])
def test_givens_equals_product_of_plane_rotations(dim: int) -> None:
    t = build("givens", dim)
    randomize(t)
    angles = iter(t.angles.detach().tolist())
    q = torch.eye(dim, dtype=torch.float64)
    levels = math.ceil(math.log2(dim))
    for r in range(t.rounds):
        stride = 2 ** (r % levels)
        g = torch.eye(dim, dtype=torch.float64)
        for a in range(dim - stride):
            if (a // stride) % 2:
                continue
            b = a + stride
            th = next(angles)
            g[a, a], g[a, b], g[b, a], g[b, b] = math.cos(th), -math.sin(th), math.sin(th), \
                math.cos(th)
        q = g @ q  # round r acts after rounds < r
    torch.testing.assert_close(t.matrix().detach(), q)


def test_givens_default_rounds_mix_everything() -> None:
    t = build("givens", 16)
    assert t.rounds == 4
    with torch.no_grad():
        t.angles.fill_(0.3)
    assert (t.matrix().abs() > 1e-9).all()


def test_block_equals_block_diagonal_of_dense_maps() -> None:
    t = build("block", 12, block_size=4, map="exp")
    randomize(t)
    blocks = []
    rows, cols = torch.triu_indices(4, 4, 1)
    for g in t.generator.detach():
        s = torch.zeros(4, 4, dtype=torch.float64)
        s[rows, cols] = g
        blocks.append(torch.linalg.matrix_exp(s - s.T))
    torch.testing.assert_close(t.matrix().detach(), torch.block_diag(*blocks))


def test_orthogonal_equals_dense_map_of_lower_skew() -> None:
    t = build("orthogonal", 7, map="cayley")
    randomize(t)
    x = t.generator.detach().tril(-1)
    torch.testing.assert_close(t.matrix().detach(), maps.cayley(x - x.T))


@pytest.mark.parametrize("name", ORTHOGONAL)
def test_half_precision_stays_orthogonal(name: str) -> None:
    t = build(name, 32, torch.bfloat16)
    assert t.is_orthogonal
    randomize(t, scale=0.5)
    h = torch.randn(64, 32, dtype=torch.bfloat16)
    out = t.apply(h)
    assert out.dtype == torch.bfloat16
    ratio = out.float().norm(dim=-1) / h.float().norm(dim=-1)
    assert (ratio - 1).abs().max() < 0.05  # norm preserved up to bf16 rounding
