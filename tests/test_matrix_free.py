"""The fast path is really matrix-free: no tensor of ``out × in`` elements (or more) is
created during forward and backward of the paper's presets and the anchor presets."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import weightcond as wc

from helpers import make_layer, randomize


class LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor (by element count) that an operator allocates; views of
    existing storage are not allocations."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: tuple[int, str] = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, (t.numel(), f"{func} -> {tuple(t.shape)}"))
        return out


# tokens < min(out, in): activations stay below out·in; 8 tokens fold thin rotations
# (Note (folded rotations)), 2 do not
OUT, IN, TOKENS = 48, 40, 8


CASES = [("lora", {}), ("dora", {}), ("dora", {"detach_norm": False}), ("pre_diag", {}),
         ("sora", {}), ("sora", {"map": "first_order", "condition_bias": True}),
         ("sora", {"map": "exp"}), ("oft", {"block_size": 8}), ("boft", {"block_size": 4,
         "butterfly_factors": 2}), ("hra", {"reflections": 4}), ("goft", {})]


@pytest.mark.parametrize("tokens", [TOKENS, 2])
@pytest.mark.parametrize("preset, options", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("bias", [True, False])
def test_no_out_by_in_tensor_in_forward_and_backward(preset: str, options, bias: bool,
                                                      tokens: int) -> None:
    layer = make_layer(OUT, IN, bias=bias, dtype=torch.float32)
    if wc.PRESETS[preset].update:
        options = {"rank": 4, **options}
    wc.apply_preset(layer, preset, **options)
    randomize(layer)
    x = torch.randn(tokens, IN, requires_grad=True)
    with LargestNewTensor() as record:
        layer(x).square().sum().backward()
    size, where = record.largest
    assert size < OUT * IN, where


def test_the_recorder_sees_the_dense_path() -> None:
    """The check can fail: the dense forward does create an out × in tensor."""
    layer = make_layer(OUT, IN, dtype=torch.float32)
    wc.apply_preset(layer, "pre_diag", rank=4)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    with wc.dense_forward(layer), LargestNewTensor() as record:
        layer(x).square().sum().backward()
    assert record.largest[0] >= OUT * IN
