"""Shared test helpers: the registry-driven grid of cells, random parameters, tolerances."""

from __future__ import annotations

import itertools

import torch
from torch import nn

import weightcond as wc

TRANSFORM_NAMES = list(wc.TRANSFORMS)
PRESET_NAMES = list(wc.PRESETS)
PLACEMENTS = ["pre", "post"]
SIDES = ["left", "right"]
CELLS = list(itertools.product(TRANSFORM_NAMES, PLACEMENTS, SIDES))


def cell_id(cell: tuple[str, str, str]) -> str:
    return "-".join(cell)


def orthogonality_bound(n: int, dtype: torch.dtype) -> float:
    """``10 · n · eps(dtype)``, PyTorch's bound for orthogonal parametrizations."""
    return 10 * n * torch.finfo(dtype).eps


@torch.no_grad()
def randomize(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every trainable parameter of ``module`` to a random non-trivial point."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.add_((scale * noise).to(p.dtype))


def make_layer(out_features: int = 12, in_features: int = 10, *, bias: bool = True,
               dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    layer.requires_grad_(False)
    return layer


def trainable(layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in layer.named_parameters() if p.requires_grad]


class Wrapped(nn.Module):
    """A model holding one layer named ``proj`` (what PEFT's ``target_modules`` matches)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def assert_matrix_free_equals_dense(layer: nn.Module, x: torch.Tensor,
                                    inputs: list[torch.Tensor] | None = None) -> None:
    """``layer(x)`` and the gradients of ``inputs`` (default: the trainable parameters)
    equal those of the dense conditioned weight (:func:`weightcond.dense_forward`), float64
    tolerances."""
    inputs = [p for p in layer.parameters() if p.requires_grad] if inputs is None else inputs
    y = layer(x)
    cotangent = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, cotangent)
    with wc.dense_forward(layer):
        y_dense = layer(x)
        grads_dense = torch.autograd.grad(y_dense, inputs, cotangent)
    torch.testing.assert_close(y, y_dense, rtol=1e-12, atol=1e-12)
    for g, gd in zip(grads, grads_dense, strict=True):
        torch.testing.assert_close(g, gd, rtol=1e-11, atol=1e-11)
