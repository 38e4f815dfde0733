"""Batched factors (``weightcond.batch_factors``, Note (batched factors) in ``batching.py``):
a model forward computes the factors of all its rotations in one call per group, with the
values and gradients of the layer-by-layer computation, and only inside that forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import weightcond as wc
from weightcond import batching
from weightcond.engine import factors
from weightcond.transforms import Householder, Skew

from helpers import randomize, trainable


def model_for(seed: int = 0) -> nn.Sequential:
    """Float64 layers: two SORA groups (rotations 12 and 16 wide), a SORA layer whose rotation
    is too narrow for the low-rank form (4 wide, 2k >= n: never batched), a DoRA layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 16)).double()
    model.requires_grad_(False)
    for i in (0, 2, 4, 6, 8):
        wc.apply_preset(model[i], "sora", rank=2, rotation_rank=2)
    wc.apply_preset(model[10], "dora", rank=2)
    randomize(model, scale=0.3, seed=seed)
    return model


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    params = [p for _, p in trainable(model)]
    y = model(x)
    return [y.detach(), *torch.autograd.grad(y.square().sum(), params)]


def skews(model: nn.Module) -> list[Skew]:
    return [m for m in model.modules() if isinstance(m, Skew)]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often Skew computes factors one by one and in batches."""
    counts = {"low_rank": 0, "low_rank_batch": 0}
    single, batch = Skew.low_rank, Skew.low_rank_batch.__func__  # type: ignore[attr-defined]

    def low_rank(self: Skew) -> tuple[torch.Tensor, torch.Tensor]:
        counts["low_rank"] += 1
        return single(self)

    def low_rank_batch(cls: type, transforms: list) -> list:
        counts["low_rank_batch"] += 1
        return batch(cls, transforms)

    monkeypatch.setattr(Skew, "low_rank", low_rank)
    monkeypatch.setattr(Skew, "low_rank_batch", classmethod(low_rank_batch))
    return counts


def test_same_values_and_gradients_one_call_per_group(calls: dict[str, int]) -> None:
    model = model_for()
    x = torch.randn(40, 10, dtype=torch.float64)  # enough tokens to fold the rotations
    calls.update(low_rank=0)  # (building checks the transforms)
    expected = outputs_and_grads(model, x)
    assert calls == {"low_rank": 5, "low_rank_batch": 0}
    wc.batch_factors(model)
    calls.update(low_rank=0)
    got = outputs_and_grads(model, x)
    # the 12- and 16-wide groups (two layers each) in one call each; the 4-wide skew is dense
    assert calls == {"low_rank": 1, "low_rank_batch": 2}
    assert torch.equal(got[0], expected[0])  # the same bits; gradients up to rounding
    for g, e in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert factors._batches() == []  # nothing outlives the forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_matches_each_transform(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for map in ("cayley", "exp", "first_order"):
        for temperature in (False, True):
            group = [Skew(40, rank=3, map=map, temperature=temperature).to(dtype)
                     for _ in range(3)]
            for t in group:
                with torch.no_grad():
                    t.D.add_(0.4 * torch.randn_like(t.D))
            assert len({t.batch_key() for t in group}) == 1
            for (u, v), t in zip(Skew.low_rank_batch(group), group, strict=True):
                eu, ev = t.low_rank()  # the same code on a stack: the same bits (CPU)
                assert torch.equal(u, eu) and torch.equal(v, ev)


def test_keys_and_the_default_batch() -> None:
    assert Skew(8, rank=4).batch_key() is None  # 2k >= n: the dense map, not low rank
    assert Skew(9, rank=2).batch_key() != Skew(9, rank=3).batch_key()
    assert Skew(9, rank=2).batch_key() != Skew(9, rank=2).double().batch_key()
    householder = [Householder(6, reflections=2).double() for _ in range(2)]
    assert householder[0].batch_key() is None  # no batched form: layer by layer
    for (u, v), t in zip(Householder.low_rank_batch(householder), householder, strict=True):
        eu, ev = t.low_rank()
        assert torch.equal(u, eu) and torch.equal(v, ev)
    with pytest.raises(wc.StateError, match="no low-rank form"):
        wc.TRANSFORMS["diag"](4).low_rank_batch([wc.TRANSFORMS["diag"](4)])


def test_only_inside_the_forward(calls: dict[str, int]) -> None:
    model = model_for()
    wc.batch_factors(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 11, dtype=torch.float64))  # a wrong width fails mid-forward
    assert factors._batches() == []
    calls.update(low_rank=0, low_rank_batch=0)
    model[2](torch.randn(40, 12, dtype=torch.float64))  # a layer alone: its own factors
    assert calls == {"low_rank": 1, "low_rank_batch": 0}


def test_gradient_accumulation_and_no_grad() -> None:
    model, reference = model_for(), model_for()
    wc.batch_factors(model)
    xs = torch.randn(2, 40, 10, dtype=torch.float64).unbind()
    for m in (model, reference):
        for x in xs:  # two forwards and backwards before any step
            m(x).square().sum().backward()
    for (_, p), (_, q) in zip(trainable(model), trainable(reference), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(xs[0]), reference(xs[0]), rtol=1e-12, atol=1e-12)


def test_an_uncalled_layer_gets_no_gradient() -> None:
    """As without batching: a member of a group whose layer the forward does not call gets
    ``None``, not zeros, so AdamW (weight decay, momentum) leaves it alone."""
    model = model_for()

    class FirstHalf(nn.Module):  # holds layer 6 but calls only its group's other member, 4
        def __init__(self) -> None:
            super().__init__()
            self.used = model[:6]
            self.unused = model[6]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    half = FirstHalf()
    wc.batch_factors(half)
    params = [p for _, p in trainable(half)]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        half(torch.randn(40, 10, dtype=torch.float64)).square().sum().backward()
        optimizer.step()
    for t in skews(half.unused):
        assert t.C.grad is None and t.D.grad is None
    for t in skews(half.used):
        assert t.C.grad.abs().sum() > 0
    moved = {id(p) for p, b in zip(params, before, strict=True) if not torch.equal(p, b)}
    assert not moved & {id(p) for p in half.unused.parameters()}


def test_a_batch_left_behind_is_not_used_once_stale(calls: dict[str, int]) -> None:
    """A KeyboardInterrupt ends a forward without its hook: the batch stays, but a transform
    whose parameters changed since computes its own factors, and the model's next forward
    drops the old batch."""
    model, reference = model_for(), model_for()
    wc.batch_factors(model)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    handle = model[3].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(40, 10, dtype=torch.float64))
    handle.remove()
    assert len(factors._batches()) == 1
    with torch.no_grad():
        for m in (model, reference):
            for _, p in trainable(m):
                p.add_(0.1)
    x = torch.randn(40, 12, dtype=torch.float64)
    torch.testing.assert_close(model[2](x), reference[2](x), rtol=1e-12, atol=1e-12)
    model(torch.randn(40, 10, dtype=torch.float64))
    assert factors._batches() == []


def test_functional_call_inside_the_forward() -> None:
    """``torch.func.functional_call`` on a part of the model inside its forward swaps in
    other parameters: the layers use those, not the batch computed from the module's."""
    inner, reference = model_for(), model_for()
    swapped = {n: p.detach() + 0.05 for n, p in inner.named_parameters()}

    class Outer(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.inner, swapped, (x,))

    outer = Outer(inner)
    wc.batch_factors(outer)
    x = torch.randn(40, 10, dtype=torch.float64)
    torch.testing.assert_close(outer(x), Outer(reference)(x), rtol=1e-12, atol=1e-12)


def test_a_subclass_with_its_own_factors_is_not_batched() -> None:
    class Scaled(Skew):
        def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
            u, v = super().low_rank()
            return u, 0.5 * v

    assert Scaled(12, rank=2).batch_key() is None
    assert Skew(12, rank=2).batch_key() is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant: bool) -> None:
    """Non-reentrant checkpointing recomputes outside the forward and checks that it saves
    the same tensors: the layers compute their own factors inside it."""
    model, reference = model_for(), model_for()
    wc.batch_factors(model)

    class Checkpointed(nn.Module):
        def __init__(self, inner: nn.Sequential) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            head = torch.utils.checkpoint.checkpoint(self.inner[:4], x,
                                                     use_reentrant=reentrant)
            return self.inner[4:](head)

    x = torch.randn(40, 10, dtype=torch.float64, requires_grad=reentrant)
    wrapped = Checkpointed(model)
    wc.batch_factors(wrapped)
    for m in (wrapped, Checkpointed(reference)):  # backward(): reentrant has no autograd.grad
        m(x).square().sum().backward()
    for (_, p), (_, q) in zip(trainable(model), trainable(reference), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_condition_registers_once_and_removes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12))
    wc.condition(model, "sora", target_modules=["0", "1"], rank=2)
    wc.condition(model, "sora", target_modules=["0", "1"], rank=2, adapter_name="second")
    wc.batch_factors(model)
    assert list(model._forward_pre_hooks.values()) == [batching._before_forward]
    assert list(model._forward_hooks.values()) == [batching._after_forward]
    clone = copy.deepcopy(model)
    assert list(clone._forward_pre_hooks.values()) == [batching._before_forward]
    wc.condition(clone, "lora", target_modules=["0"], rank=2, adapter_name="third",
                 batch_factors=False)
    assert not clone._forward_pre_hooks and not clone._forward_hooks
    assert not clone._forward_hooks_always_called
    assert list(model._forward_hooks.values()) == [batching._after_forward]  # untouched


def test_bad_arguments() -> None:
    with pytest.raises(wc.LayerTypeError, match="batch_factors: argument 'model'"):
        wc.batch_factors("model")  # type: ignore[arg-type]
    with pytest.raises(wc.OptionError, match="batch_factors"):
        wc.batch_factors(nn.Linear(2, 2), enabled="yes")  # type: ignore[arg-type]
    with pytest.raises(wc.OptionError, match="batch_factors"):
        wc.condition(nn.Sequential(nn.Linear(4, 4)), "lora", target_modules=["0"],
                     batch_factors=1)
