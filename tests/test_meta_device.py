"""Conditioning on the meta device, then ``to_empty`` and ``load_state_dict``: the way FSDP2
and large-model loaders initialise a model.

Regression (Note (constants survive meta initialisation) in
:meth:`weightcond.transforms.Transform.register_constant`): the index and sign buffers of
``skew``, ``block``, ``butterfly`` and ``givens`` are in no state dict and were left as
uninitialised memory: ``sora`` computed garbage, ``oft``, ``boft`` and ``goft`` failed with
index errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightcond as wc

from helpers import CELLS, PRESET_NAMES, cell_id, randomize

OUT, IN = 24, 32
# the two ways of building on the meta device: a device argument, the default-device context
HOW = ["device", "context"]


def build(how: str, make) -> nn.Module:
    if how == "device":
        return make(nn.Linear(IN, OUT, device="meta"))
    with torch.device("meta"):
        return make(nn.Linear(IN, OUT))


def materialize(layer: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    # poison the fresh memory, so that nothing can pass by reading zeros
    with torch.device("cpu"):
        layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*layer.parameters(), *layer.buffers()):
            if t.is_floating_point():
                t.fill_(float("nan"))
            else:
                t.fill_(-(2**40))
    layer.to_empty(device="cpu")  # to_empty again: constants are written back each time
    layer.load_state_dict(state)
    return layer


def check_equal(layer: nn.Module, reference: nn.Module) -> None:
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer(x), reference(x))
    with wc.dense_forward(layer), wc.dense_forward(reference):
        assert torch.equal(layer.weight, reference.weight)
    for (name, got), (_, expected) in zip(layer.named_buffers(), reference.named_buffers(),
                                          strict=True):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_every_cell_conditioned_on_meta_loads_exactly(cell, how: str) -> None:
    transform, placement, side = cell

    def make(layer: nn.Module) -> nn.Module:
        wc.register_update(layer, rank=2)
        wc.register_conditioning(layer, placement=placement, side=side, transform=transform)
        return layer

    torch.manual_seed(0)
    reference = make(nn.Linear(IN, OUT))
    randomize(reference)
    layer = build(how, make)
    assert all(p.is_meta for p in layer.parameters())
    check_equal(materialize(layer, reference.state_dict()), reference)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_conditioned_on_meta_loads_exactly(preset: str, how: str) -> None:
    def make(layer: nn.Module) -> nn.Module:
        wc.apply_preset(layer, preset)
        return layer

    torch.manual_seed(0)
    reference = make(nn.Linear(IN, OUT))
    randomize(reference)
    layer = build(how, make)
    check_equal(materialize(layer, reference.state_dict()), reference)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_a_preset_on_meta_loads_with_assign(preset: str) -> None:
    """``load_state_dict(..., assign=True)`` without ``to_empty`` (the loaded tensors become
    the parameters): the constants follow them off the meta device."""
    torch.manual_seed(0)
    reference = nn.Linear(IN, OUT)
    wc.apply_preset(reference, preset)
    randomize(reference)
    layer = nn.Linear(IN, OUT, device="meta")
    wc.apply_preset(layer, preset)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    layer.load_state_dict(state, assign=True)
    assert not any(t.is_meta for t in (*layer.parameters(), *layer.buffers()))
    check_equal(layer, reference)


@pytest.mark.parametrize("preset", ["sora", "oft", "boft", "goft"])
def test_a_model_conditioned_on_meta_trains_like_the_reference(preset: str) -> None:
    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(IN, IN), nn.Tanh(), nn.Linear(IN, OUT))

    torch.manual_seed(0)
    reference = model()
    wc.condition(reference, preset=preset, target_modules=["0", "2"])
    randomize(reference)
    with torch.device("meta"):
        meta = model()
        wc.condition(meta, preset=preset, target_modules=["0", "2"])
    meta.to_empty(device="cpu")
    meta.load_state_dict(reference.state_dict())
    x = torch.randn(16, IN, generator=torch.Generator().manual_seed(2))
    for net in (reference, meta):  # the same SGD steps on both
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    assert torch.equal(meta(x), reference(x))


def test_a_constant_takes_a_tensor_with_data() -> None:
    transform = wc.TRANSFORMS["diag"](4)
    with pytest.raises(wc.StateError, match="meta"):
        transform.register_constant("_index", torch.zeros(3, device="meta"))
    assert "_index" not in dict(transform.named_buffers())


@pytest.mark.parametrize("name", sorted(wc.TRANSFORMS))
def test_a_transform_built_under_a_default_device_keeps_its_tensors_together(name) -> None:
    """Constants follow the default device like the parameters (regression, found in review:
    they stayed on the CPU, and apply() mixed devices)."""
    with torch.device("meta"):
        transform = wc.TRANSFORMS[name](8)
    assert {t.device.type for t in (*transform.parameters(), *transform.buffers())} == {"meta"}
    transform.to_empty(device="cpu")
    if not transform.norm_tied:
        assert transform.apply(torch.randn(3, 8)).shape == (3, 8)
