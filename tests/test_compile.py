"""Every preset under ``torch.compile``: compiled forward and backward equal eager, the
forward traces as one graph (no graph breaks, matrix-free or dense), and a compiled model
is reused for new inputs, after optimizer steps and (with ``dynamic=True``) for every token
count with one plan (see Note (plan, then execute) in ``weightcond.engine.plan``).

The numerical comparison runs Inductor when a C++ compiler is on the path (Inductor's CPU
backend needs one), otherwise ``aot_eager`` (which still runs AOTAutograd's traced
backward, but compares bit-identical kernels). Graph breaks and recompilations are decided
by Dynamo alone, so those tests use the cheap ``eager`` backend.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import weightcond as wc

from helpers import PRESET_NAMES, randomize, trainable

pytestmark = [
    # torch 2.13 internals, not weightcond: importing Inductor imports torch.utils.mkldnn,
    # which still decorates with torch.jit.script_method; Dynamo instantiates the ctx of
    # every autograd.Function it traces (here `_ScaleAdd`, the diagonal steps' fused
    # multiply-add) through Function.__init__, which warns
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be "
                               "instantiated:DeprecationWarning"),
]

BACKEND = "inductor" if shutil.which(os.environ.get("CXX") or "g++") else "aot_eager"
DIM = 32
TOKENS = 16  # fold regime: TOKENS · 4 >= DIM

# Recompiles are errors: every preset compiles once per input shape and never per input
# object (grouping low-rank terms by `id()` of their input once made Dynamo guard on the
# tensor's identity) and, under dynamic shapes, never per token count (a Python loop over
# token chunks in `_ScaleAdd.backward` once specialized it).


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def model_for(name: str) -> nn.Sequential:
    """Two conditioned ``DIM × DIM`` layers around a nonlinearity, at a random point."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM))
    model.requires_grad_(False)
    options = {"rank": 4} if wc.PRESETS[name].update else {}
    for layer in (model[0], model[2]):
        wc.apply_preset(layer, name, **options)
    randomize(model)
    return model


def forward_backward(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor,
                     cotangent: torch.Tensor) -> list[torch.Tensor]:
    y = model(x)
    return [y.detach(), *torch.autograd.grad(y, params, cotangent)]


def graph_breaks() -> dict[str, int]:
    return dict(counters["graph_break"])


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_compiled_matches_eager(name: str) -> None:
    model = model_for(name)
    params = [p for _, p in trainable(model)]
    x, cotangent = torch.randn(2, TOKENS, DIM).unbind()
    expected = forward_backward(model, params, x, cotangent)
    compiled = torch.compile(model, backend=BACKEND, dynamic=False)
    got = forward_backward(compiled, params, x, cotangent)
    assert graph_breaks() == {}
    assert graphs() == 1
    # Inductor fuses and reorders the reductions: a few ulps of the largest entry per
    # accumulation over the dimension
    eps = torch.finfo(x.dtype).eps
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=DIM * eps * e.abs().max().item())


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("dense", [False, True], ids=["matrix_free", "dense"])
def test_one_graph_without_breaks(name: str, dense: bool) -> None:
    """``dense`` traces ``layer.weight`` through torch.nn.utils.parametrize."""
    model = model_for(name)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    with wc.dense_forward(model) if dense else contextlib.nullcontext():
        compiled(torch.randn(TOKENS, DIM)).square().sum().backward()
    assert graph_breaks() == {}
    assert graphs() == 1


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_new_inputs_and_steps_reuse_the_graph(name: str) -> None:
    model = model_for(name)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch._dynamo.config.patch(error_on_recompile=True):  # fail fast, with the guard
        for _ in range(2):
            compiled(torch.randn(TOKENS, DIM)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert graphs() == 1


def same_plan_token_counts(model: nn.Sequential) -> tuple[int, int]:
    """Two token counts, one double the other, for which every layer has the same plan
    (Note (plan, then execute)): the first layer's input needs no gradient, the second's
    does."""
    layers = [model[0], model[2]]

    def forms(tokens: int) -> list[object]:
        return [wc.explain(layer, tokens=tokens, input_grad=i > 0).forms
                for i, layer in enumerate(layers)]

    for tokens in (TOKENS, 2 * TOKENS, 4 * TOKENS, 8 * TOKENS, 16 * TOKENS):
        if forms(tokens) == forms(2 * tokens):
            return tokens, 2 * tokens
    raise AssertionError("no two token counts with one plan")


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_dynamic_token_counts_reuse_the_graph(name: str) -> None:
    """Token counts with the same plan share one graph; a count with another plan compiles
    once more, by design (the plan's forms are Python decisions on the token count)."""
    model = model_for(name)
    compiled = torch.compile(model, backend="eager", dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in same_plan_token_counts(model):
            compiled(torch.randn(tokens, DIM)).square().sum().backward()
    assert graph_breaks() == {}
    assert graphs() == 1


def test_batched_factors_trace_without_breaks() -> None:
    """With weightcond.batch_factors, a compiled model traces each layer's own factors (the
    hooks stand aside under the compiler) and equals eager."""
    model = model_for("sora")
    wc.batch_factors(model)
    params = [p for _, p in trainable(model)]
    x, cotangent = torch.randn(2, TOKENS, DIM).unbind()
    expected = forward_backward(model, params, x, cotangent)
    got = forward_backward(torch.compile(model, backend="eager", dynamic=False), params, x,
                           cotangent)
    assert graph_breaks() == {}
    assert graphs() == 1
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
