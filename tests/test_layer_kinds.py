"""Every cell of the design space on every layer kind of ``weightcond.reshape``.

The hypothesis grid (``test_conformance.py``) draws cells on ``nn.Linear``; here every
registry cell (transform × placement × side), stacked on an update, runs on GPT-2's
``Conv1D`` (weight stored transposed, matrix-free forward) and on ``nn.Conv2d`` (its im2col
matrix, dense forward), in float64, against the same checks: identity at init, the layer
equal to its definition through the ``(out, in)`` matrix, merge == forward, finite gradients,
``state_dict`` round trip. A new transform or layer kind is covered without editing tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightcond as wc

from helpers import CELLS, cell_id, randomize

transformers_utils = pytest.importorskip("transformers.pytorch_utils")
OUT, IN = 8, 6


def conv1d(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    layer = transformers_utils.Conv1D(OUT, IN).double()
    with torch.no_grad():
        layer.bias.normal_()
    return layer.requires_grad_(False), torch.randn(2, 3, IN, dtype=torch.float64)


def conv2d(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)  # in = 2 channels · 3 · 1 = IN
    layer = nn.Conv2d(2, OUT, (3, 1), padding=(1, 0)).double()
    return layer.requires_grad_(False), torch.randn(2, 2, 4, 3, dtype=torch.float64)


def definition(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output from its ``(out, in)`` conditioned matrix, written out by hand."""
    base = layer.parametrizations.weight.original
    conv = isinstance(layer, nn.Conv2d)
    matrix = (base.reshape(OUT, -1) if conv else base.mT) + wc.delta_weight(layer)
    if conv:
        patches = F.unfold(x, (3, 1), padding=(1, 0))  # (N, in, L)
        return (matrix @ patches + layer.bias[:, None]).view(x.shape[0], OUT, *x.shape[2:])
    return x @ matrix.mT + layer.bias


KINDS = {"conv1d": conv1d, "conv2d": conv2d}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(c) for c in CELLS])
def test_every_cell_on_every_layer_kind(cell: tuple[str, str, str], kind: str) -> None:
    name, placement, side = cell
    layer, x = KINDS[kind](0)
    plain = type(layer)
    before = layer(x)
    wc.register_update(layer, rank=2)
    wc.register_conditioning(layer, placement=placement, side=side, transform=name,
                             condition_bias=side == "left")
    torch.testing.assert_close(layer(x), before)  # identity at init
    randomize(layer)
    x = x.requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, definition(layer, x))
    grads = torch.autograd.grad(y.square().sum(), [x, *(p for p in layer.parameters()
                                                          if p.requires_grad)])
    assert all(torch.isfinite(g).all() for g in grads)

    fresh, _ = KINDS[kind](1)  # other base weights, the same conditioning
    wc.register_update(fresh, rank=2)
    wc.register_conditioning(fresh, placement=placement, side=side, transform=name,
                             condition_bias=side == "left")
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)

    merged = wc.merge(copy.deepcopy(layer))
    assert type(merged) is plain
    with torch.no_grad():
        torch.testing.assert_close(merged(x), y)
