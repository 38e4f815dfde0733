"""Diagnostics of the effective update (DESIGN §7): closed forms on matrices of known
spectrum, invariances, edge cases and typed errors, the paper's LoRA bound, and the layer
and model reports."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightcond as wc
from weightcond.analysis import (
    LayerMetrics,
    effective_rank,
    entropy,
    layer_report,
    model_report,
    orthogonality_error,
    spectrum,
    stable_rank,
)

from helpers import make_layer, orthogonality_bound, randomize

DTYPE = torch.float64
NORMALIZATIONS = ["sum", "square"]
SHAPES = [(8, 8), (6, 10), (10, 6)]  # square, wide, tall


def close(actual: float, expected: float, dtype: torch.dtype = DTYPE) -> None:
    """assert_close with the default tolerances of ``dtype``."""
    torch.testing.assert_close(torch.tensor(actual, dtype=dtype),
                               torch.tensor(expected, dtype=dtype))


def orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def with_spectrum(shape: tuple[int, int], s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with random orthogonal ``U`` (out × out) and ``V`` (in × in)."""
    gen = torch.Generator().manual_seed(seed)
    u, v = orthogonal(shape[0], gen), orthogonal(shape[1], gen)
    k = len(s)
    return u[:, :k] @ torch.diag(s.to(DTYPE)) @ v[:, :k].T


def closed_entropy(s: torch.Tensor, normalization: str) -> float:
    w = (s if normalization == "sum" else s**2).to(DTYPE)
    p = w[w > 0] / w.sum()
    return float(-(p * p.log()).sum())


def known_spectrum(shape: tuple[int, int]) -> torch.Tensor:
    k = min(shape)
    return torch.linspace(5.0, 0.5, k, dtype=DTYPE) ** 2  # distinct, far from flat


# -- matrices of known spectrum --------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_closed_forms_on_a_known_spectrum(shape, normalization) -> None:
    s = known_spectrum(shape)
    m = with_spectrum(shape, s)
    h = closed_entropy(s, normalization)
    torch.testing.assert_close(spectrum(m), s)
    close(entropy(m, normalization=normalization), h)
    close(entropy(m, normalization=normalization, relative=True), h / math.log(min(shape)))
    close(effective_rank(m, normalization=normalization), math.exp(h))
    close(stable_rank(m), float((s**2).sum() / s[0] ** 2))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_energy_entropy_is_never_above_the_sum_entropy(shape) -> None:
    m = with_spectrum(shape, known_spectrum(shape))
    assert entropy(m, normalization="square") < entropy(m, normalization="sum")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_rank_one_has_entropy_zero_and_effective_rank_one(shape, normalization) -> None:
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(shape[0], 1, generator=gen, dtype=DTYPE) @ \
        torch.randn(1, shape[1], generator=gen, dtype=DTYPE)
    close(entropy(m, normalization=normalization), 0.0)
    close(entropy(m, normalization=normalization, relative=True), 0.0)
    close(effective_rank(m, normalization=normalization), 1.0)
    close(stable_rank(m), 1.0)


@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_identity_has_entropy_log_n(n, normalization) -> None:
    eye = torch.eye(n, dtype=DTYPE)
    close(entropy(eye, normalization=normalization), math.log(n))
    # one row or column: H = 0 and the relative entropy is defined as 0
    close(entropy(eye, normalization=normalization, relative=True), 1.0 if n > 1 else 0.0)
    close(effective_rank(eye, normalization=normalization), float(n))
    close(stable_rank(eye), float(n))
    assert orthogonality_error(eye) == 0.0


@pytest.mark.parametrize("rank", [2, 4])
def test_a_rank_r_matrix_stored_in_float32_has_entropy_at_most_log_r(rank) -> None:
    """Round-off singular values are not counted (Note (round-off zeros))."""
    gen = torch.Generator().manual_seed(rank)
    m = (torch.randn(32, rank, generator=gen) @ torch.randn(rank, 24, generator=gen))
    assert m.dtype == torch.float32
    assert spectrum(m).dtype == DTYPE and spectrum(m)[rank:].abs().max() > 0  # raw round-off
    assert entropy(m) <= math.log(rank)
    assert 1.0 <= effective_rank(m) <= rank


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_invariant_to_orthogonal_transforms_and_scaling(shape, normalization) -> None:
    m = with_spectrum(shape, known_spectrum(shape))
    gen = torch.Generator().manual_seed(7)
    moved = [orthogonal(shape[0], gen) @ m @ orthogonal(shape[1], gen), 1e-3 * m, -7.0 * m]
    for other in moved:
        for relative in (False, True):
            close(entropy(other, normalization=normalization, relative=relative),
                  entropy(m, normalization=normalization, relative=relative))
        close(effective_rank(other, normalization=normalization),
              effective_rank(m, normalization=normalization))
        close(stable_rank(other), stable_rank(m))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_zero_matrix_has_entropy_and_ranks_zero(shape) -> None:
    zero = torch.zeros(shape, dtype=DTYPE)
    assert torch.equal(spectrum(zero), torch.zeros(min(shape), dtype=DTYPE))
    for normalization in NORMALIZATIONS:
        assert entropy(zero, normalization=normalization) == 0.0
        assert entropy(zero, normalization=normalization, relative=True) == 0.0
        assert effective_rank(zero, normalization=normalization) == 0.0
    assert stable_rank(zero) == 0.0


def test_integer_and_low_precision_inputs_are_measured_in_float64() -> None:
    m = torch.tensor([[2, 0], [0, 1]])
    assert spectrum(m).dtype == DTYPE and stable_rank(m) == 1.25
    close(entropy(m.to(torch.bfloat16)), closed_entropy(torch.tensor([2.0, 1.0]), "sum"))


def test_orthogonality_error_of_orthogonal_and_scaled_matrices() -> None:
    q = orthogonal(9, torch.Generator().manual_seed(1))
    assert orthogonality_error(q) <= orthogonality_bound(9, DTYPE)
    assert orthogonality_error(q.float()) <= orthogonality_bound(9, torch.float32)
    close(orthogonality_error(2 * q), 3.0)  # QᵀQ − I = 3 I
    assert orthogonality_error(torch.zeros(3, 3)) == 1.0


# -- typed errors ---------------------------------------------------------------------------
ERRORS = [
    (lambda: entropy(torch.ones(5)), wc.ShapeError,
     "entropy: argument 'matrix' expected a 2-D tensor (out, in), got a 1-D tensor of shape (5,)"),
    (lambda: spectrum(torch.ones(2, 3, 4)), wc.ShapeError,
     "spectrum: argument 'matrix' expected a 2-D tensor (out, in), got a 3-D tensor of shape "
     "(2, 3, 4)"),
    (lambda: stable_rank(torch.ones(0, 3)), wc.ShapeError,
     "stable_rank: argument 'matrix' expected a non-empty matrix, got shape (0, 3)"),
    (lambda: effective_rank([[1.0]]), wc.OptionError,
     "effective_rank: argument 'matrix' expected a torch.Tensor, got list"),
    (lambda: entropy(torch.ones(2, 2, dtype=torch.complex64)), wc.OptionError,
     "entropy: argument 'matrix' expected a real tensor, got dtype torch.complex64"),
    (lambda: entropy(torch.tensor([[1.0, float("nan")]])), wc.OptionError,
     "entropy: argument 'matrix' expected finite entries, got a matrix with inf or nan"),
    (lambda: entropy(torch.eye(3), normalization="l2"), wc.UnknownNameError,
     "entropy: argument 'normalization' expected one of 'sum', 'square', got 'l2'"),
    (lambda: effective_rank(torch.eye(3), normalization=None), wc.UnknownNameError,
     "effective_rank: argument 'normalization' expected one of 'sum', 'square', got None"),
    (lambda: entropy(torch.eye(3), relative=1), wc.OptionError,
     "entropy: argument 'relative' expected a bool, got 1"),
    (lambda: orthogonality_error(torch.ones(3, 4)), wc.ShapeError,
     "orthogonality_error: argument 'q' expected a square matrix, got shape (3, 4)"),
    (lambda: orthogonality_error(torch.ones(4)), wc.ShapeError,
     "orthogonality_error: argument 'q' expected a 2-D tensor (out, in), got a 1-D tensor of "
     "shape (4,)"),
    (lambda: layer_report(make_layer()), wc.StateError,
     "layer_report: argument 'layer' expected a conditioned layer, got an unconditioned Linear"),
    (lambda: layer_report(torch.eye(3)), wc.LayerTypeError,
     "layer_report: argument 'layer' expected an nn.Module, got Tensor"),
    (lambda: model_report(nn.Sequential(make_layer(), nn.ReLU())), wc.StateError,
     "model_report: argument 'model' expected a module with at least one conditioned layer, "
     "got a Sequential with none"),
    (lambda: model_report("model"), wc.LayerTypeError,
     "model_report: argument 'model' expected an nn.Module, got str"),
]


@pytest.mark.parametrize(("call", "error", "message"), ERRORS,
                         ids=[e[2].split(":")[0] + "-" + str(i) for i, e in enumerate(ERRORS)])
def test_bad_inputs_raise_typed_errors(call, error, message) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call()


# -- the paper's statement on layers -------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_lora_update_has_entropy_at_most_log_r(rank) -> None:
    layer = make_layer(32, 24)
    wc.apply_preset(layer, "lora", rank=rank)
    randomize(layer)
    metrics = layer_report(layer)
    assert metrics.update_rank == rank
    assert metrics.entropy <= math.log(rank)
    assert metrics.energy_entropy <= math.log(rank)
    assert 1.0 <= metrics.effective_rank <= rank
    close(metrics.entropy, entropy(wc.delta_weight(layer).detach()))


@pytest.mark.parametrize("preset", ["pre_diag", "dora", "sora"])
@pytest.mark.parametrize("rank", [1, 4])
def test_diagonal_or_rotation_conditioning_lifts_the_entropy_above_log_r(preset, rank) -> None:
    layer = make_layer(32, 24)
    wc.apply_preset(layer, preset, rank=rank)
    randomize(layer)
    metrics = layer_report(layer)
    assert metrics.update_rank == 24
    assert metrics.entropy > math.log(rank)
    assert metrics.effective_rank > rank


@pytest.mark.parametrize("preset", ["lora", "dora", "pre_diag"])
def test_at_initialisation_every_number_is_zero(preset) -> None:
    layer = make_layer(12, 10)
    wc.apply_preset(layer, preset, rank=2)
    metrics = layer_report(layer)
    assert metrics.update_rank == 0
    assert (metrics.entropy, metrics.energy_entropy, metrics.relative_entropy,
            metrics.effective_rank, metrics.stable_rank, metrics.relative_norm) == (0.0,) * 6


def test_a_rotation_at_initialisation_leaves_a_round_off_update() -> None:
    """Not hidden by a threshold (Note (zero matrix)); relative_norm shows its size."""
    layer = make_layer(12, 10)
    wc.apply_preset(layer, "sora", rank=2)
    metrics = layer_report(layer)
    assert metrics.relative_norm <= orthogonality_bound(12, DTYPE)


def two_layer_model() -> nn.Sequential:
    model = nn.Sequential(make_layer(16, 12, seed=1), nn.ReLU(), make_layer(8, 16, seed=2))
    wc.apply_preset(model[0], "lora", rank=3)
    wc.apply_preset(model[2], "sora", rank=2, rotation_rank=2)
    randomize(model)
    return model


def test_layer_report_is_the_matrix_functions_on_delta_weight() -> None:
    model = two_layer_model()
    layer = model[2]
    metrics = layer_report(layer)
    delta = wc.delta_weight(layer).detach()
    assert metrics.shape == (8, 16) and metrics.update_rank == 8
    close(metrics.entropy, entropy(delta, normalization="sum"))
    close(metrics.energy_entropy, entropy(delta, normalization="square"))
    close(metrics.relative_entropy, entropy(delta, relative=True))
    close(metrics.effective_rank, effective_rank(delta))
    close(metrics.stable_rank, stable_rank(delta))
    base = layer.parametrizations.weight.original
    close(metrics.relative_norm, float(spectrum(delta)[0] / spectrum(base)[0]))
    assert metrics.energy_entropy <= metrics.entropy
    assert 0.0 <= metrics.relative_entropy <= 1.0


def test_orthogonality_errors_of_each_orthogonal_conditioner() -> None:
    model = two_layer_model()
    assert dict(layer_report(model[0]).orthogonality_errors) == {}
    errors = layer_report(model[2]).orthogonality_errors  # sora: diag (not orthogonal), skew
    assert list(errors) == ["post.left.skew"]
    skew = wc.conditioners(model[2])[1].transform
    assert errors["post.left.skew"] == orthogonality_error(skew.matrix())
    assert errors["post.left.skew"] <= orthogonality_bound(8, DTYPE)


def test_repeated_sites_get_numbered_keys() -> None:
    layer = make_layer(6, 6)
    for _ in range(2):
        wc.register_conditioning(layer, placement="pre", side="right", transform="skew",
                                 rank=1)
    wc.register_conditioning(layer, placement="post", side="right", transform="skew", rank=1,
                             map="first_order")  # I + S: not orthogonal, not reported
    randomize(layer)
    assert list(layer_report(layer).orthogonality_errors) == ["pre.right.skew",
                                                              "pre.right.skew#2"]


def test_model_report_covers_every_conditioned_layer() -> None:
    model = two_layer_model()
    report = model_report(model)
    assert list(report) == ["0", "2"]
    assert all(isinstance(m, LayerMetrics) for m in report.values())
    assert report["0"] == layer_report(model[0]) and report["2"] == layer_report(model[2])
    assert report["0"].update_rank == 3 and report["0"].entropy <= math.log(3)
    assert report["2"].entropy > math.log(2)
    # a conditioned model is its own entry, under ""
    assert list(model_report(model[0])) == [""]


def test_layer_metrics_are_frozen_and_hashable() -> None:
    metrics = layer_report(two_layer_model()[2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.entropy = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        metrics.orthogonality_errors["post.left.skew"] = 0.0  # type: ignore[index]
    assert hash(metrics) == hash(dataclasses.replace(metrics))


# -- properties ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(out_features=st.integers(1, 9), in_features=st.integers(1, 9), rank=st.integers(1, 9),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 10_000),
       normalization=st.sampled_from(NORMALIZATIONS))
def test_property_bounds(out_features, in_features, rank, scale, seed, normalization) -> None:
    rank = min(rank, out_features, in_features)
    gen = torch.Generator().manual_seed(seed)
    m = scale * torch.randn(out_features, rank, generator=gen, dtype=DTYPE) @ \
        torch.randn(rank, in_features, generator=gen, dtype=DTYPE)
    true_rank = int(torch.linalg.matrix_rank(m))
    slack = 100 * torch.finfo(DTYPE).eps
    h = entropy(m, normalization=normalization)
    assert 0.0 <= h <= math.log(min(out_features, in_features)) + slack
    assert h <= math.log(true_rank) + slack
    assert 0.0 <= entropy(m, normalization=normalization, relative=True) <= 1.0 + slack
    assert entropy(m, normalization="square") <= entropy(m, normalization="sum") + slack
    assert 1.0 - slack <= effective_rank(m, normalization=normalization) <= true_rank + slack
    assert 1.0 - slack <= stable_rank(m) <= true_rank + slack
