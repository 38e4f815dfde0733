"""``torch.func`` over conditioned layers: per-sample gradients with ``vmap(grad(...))`` equal
those of one backward per sample (Note (torch.func) in ``weightcond.engine.kernels``)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import weightcond as wc

from helpers import PRESET_NAMES, make_layer, randomize

OUT, IN, SAMPLES, TOKENS = 8, 8, 3, 5
OPTIONS = {"lora": {"rank": 2}, "dora": {"rank": 2}, "pre_diag": {"rank": 2},
           "sora": {"rank": 2, "rotation_rank": 1}, "oft": {"block_size": 4},
           "boft": {"block_size": 2, "butterfly_factors": 2}, "hra": {"reflections": 2},
           "goft": {}}


def test_every_preset_has_options() -> None:
    assert set(OPTIONS) == set(PRESET_NAMES)


@pytest.mark.parametrize("tokens", [TOKENS, 2 * OUT + 1])  # the weight and activation forms
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_per_sample_gradients_with_vmap_and_grad(preset: str, tokens: int) -> None:
    layer = make_layer(OUT, IN)
    wc.apply_preset(layer, preset, **OPTIONS[preset])
    randomize(layer)
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(SAMPLES, tokens, IN, dtype=torch.float64)

    def loss(p: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, p, (sample,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(SAMPLES):
        layer.zero_grad()
        layer(x[i]).square().sum().backward()
        for name, p in layer.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10,
                                           atol=1e-12)
