"""The transform contract (:func:`weightcond.testing.check_transform`): every registered
transform satisfies it, and each check fails on a transform that breaks its rule."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import weightcond as wc
from weightcond.testing import CHECKS, check_transform

from helpers import TRANSFORM_NAMES

VARIANTS = [(name, {}) for name in TRANSFORM_NAMES] + [
    ("skew", {"map": "exp", "rank": 2}), ("skew", {"map": "first_order"}),
    ("skew", {"temperature": True}), ("block", {"map": "exp", "block_size": 4}),
    ("block", {"map": "cayley_neumann", "block_size": 2, "scale": 2.0}),
    ("block", {"share": True, "full": True}), ("butterfly", {"factors": 2, "block_size": 2}),
    ("magnitude", {"detach_norm": False}), ("householder", {"reflections": 6}),
    ("givens", {"rounds": 2}), ("orthogonal", {"map": "exp"}),
]


@pytest.mark.parametrize("name, options", VARIANTS,
                         ids=[f"{n}-{o}" if o else n for n, o in VARIANTS])
def test_every_registered_transform_satisfies_the_contract(name: str, options) -> None:
    report = check_transform(name, **options)
    assert report.ok, str(report)
    assert set(report.results) | set(report.skipped) == set(CHECKS)


class _Scaled(wc.transforms.Transform):
    """``Q = diag(s)`` with ``s`` a parameter: a valid diagonal transform to break."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.s = nn.Parameter(torch.ones(dim))

    def matrix(self) -> Tensor:
        return torch.diag(self.s)


class NotIdentity(_Scaled):
    def matrix(self) -> Tensor:
        return torch.diag(self.s + 0.1)


class ApplyTransposed(wc.transforms.Transform):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.u = nn.Parameter(torch.zeros(dim, dim))

    def matrix(self) -> Tensor:
        return torch.eye(self.dim, dtype=self.u.dtype) + self.u.tril()

    def apply(self, h: Tensor, *, transpose: bool = False) -> Tensor:
        q = self.matrix().to(h.dtype)
        return h @ (q.mT if transpose else q)  # the wrong way round


class ClaimsOrthogonal(_Scaled):
    @property
    def is_orthogonal(self) -> bool:
        return True


class RoundsDifferentlyWithoutGrad(_Scaled):
    def matrix(self) -> Tensor:
        s = self.s if torch.is_grad_enabled() else self.s * (1 + 2 * torch.finfo(
            self.s.dtype).eps)
        return torch.diag(s)


class BufferNotConstant(_Scaled):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.register_buffer("_order", torch.arange(dim), persistent=False)

    def matrix(self) -> Tensor:
        return torch.diag(self.s)[self._order]


@pytest.mark.parametrize("cls, check", [
    (NotIdentity, "identity_at_init"),
    (ApplyTransposed, "apply_equals_matrix"),
    (ClaimsOrthogonal, "orthogonal"),
    (RoundsDifferentlyWithoutGrad, "same_bits_without_grad"),
    (BufferNotConstant, "meta_device"),
])
def test_each_check_fails_on_a_transform_that_breaks_it(cls, check: str) -> None:
    report = check_transform(cls)
    assert not report.ok
    assert check in report.failures(), str(report)
    assert "FAILED" in str(report)


def test_an_unregistered_transform_skips_only_the_file_round_trip() -> None:
    report = check_transform(_Scaled)
    assert report.ok, str(report)
    assert set(report.skipped) == {"save_and_load", "orthogonal"}
