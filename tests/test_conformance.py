"""The conformance grid: every registered transform × placement × side × dtype × shape,
stacked one to three deep, with or without an update, in any registration order.

For every configuration the grid checks, in the layer's own dtype:

* **typed build errors** — a cell either builds or raises a :class:`~weightcond.ShapeError`
  / :class:`~weightcond.OptionError` and leaves the layer as it was; with default options
  every transform builds for a side dimension ``n`` from 2 to 32, and a side of one
  dimension builds or raises :class:`~weightcond.ShapeError` (rotations built from planes);
* **identity at init** — the conditioned layer computes what the plain layer computed;
* **matrix-free == dense** — outputs and gradients (input and every trainable parameter)
  of ``layer(x)`` and of the dense weight (:func:`weightcond.dense_forward`);
* **merge == forward** — the merged plain layer holds the dense ``W'`` and ``b'`` bit for
  bit, and its output equals the dense forward within one GEMM's rounding;
* **orthogonality** — ``t.matrix()`` of every transform with ``t.is_orthogonal``;
* **finite** outputs and gradients;
* **deepcopy and state_dict** — a deep copy, and a freshly built layer with the same
  conditioning and another base weight after ``load_state_dict``, compute bit-equal outputs.

Options come from each transform's constructor signature (bools, ints up to ``n + 1``,
floats around the default, strings from the names the library knows), so a new transform
is covered without editing this file; values outside what the transform accepts must be
rejected at build time with a typed error.

Bounds (``docs/guarantees.rst``) come from ``eps(dtype)`` and sizes, never from a device.
With ``n = max(out, in)``, an output error is divided by ``n · eps · max(|x| |W'|ᵀ + |b'|)``
(the rounding budget of products with ``W'``), a gradient error by ``n · eps · max|g|``
(the largest entry of the float64 gradients), both times the magnification ``κ`` of a
norm-tied cell (:func:`norm_conditioning`; 1 without one; ``3κ`` for the gradients of an
attached norm), an orthogonality error ``max|QᵀQ - I|`` by
``n · eps`` with ``n`` the side dimension (``(n + ν²) · eps`` for ``map="exp"``, see
:func:`orthogonality_error`); :data:`BOUNDS` holds the limits. ``python
tests/test_conformance.py [count]`` prints the largest errors the grid reaches.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import types
import typing
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from torch import nn

import weightcond as wc
from weightcond.transforms import maps

from helpers import CELLS, PLACEMENTS, SIDES, TRANSFORM_NAMES, make_layer, randomize, trainable

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SHAPE_KINDS = ("square", "tall", "wide", "row", "column")
MAX_DIM = 12

# Limits on the normalised errors (see the module docstring), the same for every dtype. The
# largest values measured over 3,000 drawn configurations and the fixed slices (python
# tests/test_conformance.py 3000) are in docs/guarantees.rst; the limits leave a margin of
# about three over them (orthogonality: PyTorch's 10 · n · eps, 5.5 measured).
BOUNDS = {
    "identity": 8.0,  # output at init vs the plain layer / (n · eps · output scale)
    "dense": 8.0,  # matrix-free vs dense output / (n · eps · output scale)
    "grad": 16.0,  # matrix-free vs dense gradients / (n · eps · max|g| in float64)
    "orthogonal": 10.0,  # max|QᵀQ - I| / (n · eps): PyTorch's 10 · n · eps
    "orthogonal (exp)": 20.0,  # max|QᵀQ - I| / ((n + ν²) · eps), see orthogonality_error
}

# Documented exceptions, by (transform, option, value): the checks they skip and why.
# householder with gram_schmidt orthonormalises random vectors, so it does not start at the
# identity (its docstring says so), and its QR backward amplifies rounding by cond(U) (up
# to 700 · n · eps measured), so only finiteness of its gradients is checked.
EXCEPTIONS = {("householder", "gram_schmidt", True): {"identity", "grad"}}

# String options are drawn from the names the library knows (the maps, and the string
# defaults of every transform); a transform that does not accept one must raise
# UnknownNameError at build time, which the grid checks like any other typed error.
STRING_POOL = tuple(sorted({*maps.DENSE_MAPS, "cayley_neumann", *(
    p.default for cls in wc.TRANSFORMS.values()
    for p in inspect.signature(cls.__init__).parameters.values()
    if isinstance(p.default, str))}))


# -- configurations ------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One conditioner: where it sits, which transform, which non-default options."""

    transform: str
    placement: str
    side: str
    options: tuple[tuple[str, Any], ...] = ()
    condition_bias: bool = False

    def __str__(self) -> str:
        opts = "".join(f",{k}={v}" for k, v in self.options)
        bias = ",bias" if self.condition_bias else ""
        return f"{self.transform}[{self.placement},{self.side}{opts}{bias}]"


@dataclass(frozen=True)
class Config:
    """A layer ``(out, in)`` in ``dtype`` with ``cells`` registered in order, and an update of
    rank ``rank`` (``None``: none) registered at position ``update_at`` among them."""

    out_features: int
    in_features: int
    dtype: torch.dtype
    cells: tuple[Cell, ...]
    rank: int | None = None
    update_at: int = 0
    bias: bool = True
    tokens: tuple[int, ...] = (3,)
    seed: int = 0
    scale: float = 0.3  # of the random parameter values

    def dim(self, cell: Cell) -> int:
        return self.out_features if cell.side == "left" else self.in_features


def option_values(cls: type[wc.Transform], dim: int) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy per keyword option of ``cls``, from the annotations of its constructor."""
    hints = typing.get_type_hints(cls.__init__)
    found: dict[str, st.SearchStrategy[Any]] = {}
    for name, p in list(inspect.signature(cls.__init__).parameters.items())[2:]:
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        hint = hints.get(name)
        kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
        if bool in kinds:
            found[name] = st.booleans()
        elif int in kinds:
            found[name] = st.integers(1, dim + 1)  # dim + 1: often too large, must be typed
        elif float in kinds:
            default = p.default if isinstance(p.default, float) else 1.0
            found[name] = st.sampled_from([default * 1e-2, default * 1e2])
        elif str in kinds:
            found[name] = st.sampled_from(STRING_POOL)
    return found


@st.composite
def cells(draw: st.DrawFn, out_features: int, in_features: int) -> Cell:
    name = draw(st.sampled_from(TRANSFORM_NAMES))
    placement = draw(st.sampled_from(PLACEMENTS))
    side = draw(st.sampled_from(SIDES))
    dim = out_features if side == "left" else in_features
    options = []
    for option, values in option_values(wc.TRANSFORMS[name], dim).items():
        if draw(st.booleans()):  # about half the options keep their default
            options.append((option, draw(values)))
    bias = side == "left" and draw(st.booleans())
    return Cell(name, placement, side, tuple(options), bias)


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, int]:
    kind = draw(st.sampled_from(SHAPE_KINDS))
    n = draw(st.integers(2, MAX_DIM))
    m = draw(st.integers(2, n - 1)) if n > 2 else 1
    return {"square": (n, n), "tall": (n, m), "wide": (m, n), "row": (1, n),
            "column": (n, 1)}[kind]


@st.composite
def configs(draw: st.DrawFn) -> Config:
    out_features, in_features = draw(shapes())
    stack = tuple(draw(st.lists(cells(out_features, in_features), min_size=1, max_size=3)))
    rank = draw(st.one_of(st.none(), st.integers(1, min(3, out_features, in_features))))
    return Config(
        out_features, in_features, draw(st.sampled_from(DTYPES)), stack, rank,
        update_at=draw(st.integers(0, len(stack))), bias=draw(st.booleans()),
        tokens=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))),
        seed=draw(st.integers(0, 2**16)), scale=draw(st.sampled_from([0.1, 0.5])))


def event(what: str) -> None:
    """Count ``what`` in hypothesis' statistics (``pytest --hypothesis-show-statistics``)."""
    if currently_in_test_context():
        hypothesis_event(what)


# -- building ------------------------------------------------------------------------------
def condition(layer: nn.Module, config: Config) -> list[wc.WeightcondError | None]:
    """Register ``config`` on ``layer``; per cell, the typed error it raised (or ``None``),
    after checking that a failed registration left the layer as it was."""
    outcomes: list[wc.WeightcondError | None] = []
    for i, cell in enumerate([*config.cells, None]):
        if i == config.update_at and config.rank is not None:
            wc.register_update(layer, rank=config.rank, alpha=2.0 * config.rank)
        if cell is None:
            break
        before = (type(layer), wc.conditioners(layer), wc.get_update(layer))
        try:
            wc.register_conditioning(layer, placement=cell.placement, side=cell.side,
                                     transform=cell.transform,
                                     condition_bias=cell.condition_bias, **dict(cell.options))
        except wc.WeightcondError as error:
            assert (type(layer), wc.conditioners(layer), wc.get_update(layer)) == before
            outcomes.append(error)
        else:
            outcomes.append(None)
    return outcomes


def check_outcomes(config: Config, outcomes: list[wc.WeightcondError | None]) -> None:
    """Only typed errors; defaults build for ``2 <= n <= MAX_DIM``; ``n = 1`` builds or is a
    ShapeError."""
    for cell, error in zip(config.cells, outcomes):
        if error is None:
            continue
        event(f"typed {type(error).__name__} at build")
        dim = config.dim(cell)
        assert isinstance(error, (wc.ShapeError, wc.OptionError)), f"{cell}: {error!r}"
        assert str(error).startswith("register_conditioning:"), str(error)
        if not cell.options:
            assert dim == 1 and isinstance(error, wc.ShapeError), \
                f"{cell} with default options must build for n={dim}, got {error!r}"


# -- measuring -----------------------------------------------------------------------------
def output_scale(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``max(|x| |W|ᵀ + |b|)`` in float64: the size of what one product with ``W`` rounds."""
    s = x.double().abs() @ weight.detach().double().abs().mT
    if bias is not None:
        s = s + bias.detach().double().abs()
    return max(s.max().item(), torch.finfo(torch.float64).tiny)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def forward_and_grads(layer: nn.Module, x: torch.Tensor, cotangent: torch.Tensor
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *(p for _, p in trainable(layer))], cotangent,
                                allow_unused=True)
    return y.detach(), [torch.zeros_like(p) if g is None else g
                        for g, p in zip(grads, [x, *(p for _, p in trainable(layer))])]


def measure(config: Config) -> dict[str, float]:
    """Build ``config``, run every structural check, and return the normalised errors
    (the keys of :data:`BOUNDS`; an empty dict if no cell built and there is no update)."""
    dtype = config.dtype
    eps = torch.finfo(dtype).eps
    size = max(config.out_features, config.in_features)  # the longest dot product
    layer = make_layer(config.out_features, config.in_features, bias=config.bias, dtype=dtype,
                       seed=config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn(*config.tokens, config.in_features, generator=gen,
                    dtype=torch.float64).to(dtype)
    weight, bias = layer.weight, layer.bias
    y_base = layer(x)
    outcomes = condition(layer, config)
    check_outcomes(config, outcomes)
    if not wc.is_conditioned(layer):
        return {}
    event(f"{len(wc.conditioners(layer))} conditioner(s) built")
    errors: dict[str, float] = {}

    built = [c for c, e in zip(config.cells, outcomes) if e is None]
    skipped = set().union(*(EXCEPTIONS.get((c.transform, k, v), set())
                            for c in built for k, v in c.options))
    for check in skipped:
        event(f"{check} not compared (documented exception)")
    if "identity" not in skipped:
        y_init = layer(x)
        assert y_init.dtype == dtype
        errors["identity"] = max_abs(y_init, y_base) / (
            size * eps * output_scale(x, weight, bias))

    randomize(layer, scale=config.scale, seed=config.seed)
    cotangent = torch.randn(y_base.shape, generator=gen, dtype=torch.float64).to(dtype)
    y, grads = forward_and_grads(layer, x, cotangent)
    with wc.dense_forward(layer):
        y_dense, grads_dense = forward_and_grads(layer, x, cotangent)
        assert torch.equal(y_dense, nn.functional.linear(x, layer.weight, layer.bias))
    for value in (y, y_dense, *grads, *grads_dense):
        assert value.dtype == dtype and torch.isfinite(value).all()
    if dtype == torch.float64:
        reference, grads_exact = layer, grads_dense
    else:
        reference = copy.deepcopy(layer).double()  # the same parameters, float64 arithmetic
        grads_exact = forward_and_grads(reference, x.double(), cotangent.double())[1]
    with torch.no_grad():  # x needs no gradient: a right pre chain may run on the weight
        y_plain = layer(x)
    kappa = norm_conditioning(reference)
    # the gradient of m·M/‖M‖ with the norm attached, m (I - uuᵀ)/‖M‖ with u = M/‖M‖, rounds
    # u twice and ‖M‖ once: three times the magnification of the detached form's m/‖M‖
    attached = any(c.transform.norm_tied and not c.transform.detach_norm
                   for c in wc.conditioners(layer))
    errors["dense"] = max(max_abs(y, y_dense), max_abs(y_plain, y_dense)) / (
        size * eps * output_scale(x, reference.weight, reference.bias) * kappa)
    # norm-wise, against the largest gradient entry (a gradient may be zero in exact
    # arithmetic, e.g. that of a skew generator on a side of one dimension)
    grad_scale = max(g.abs().max().item() for g in grads_exact if g.numel())
    if "grad" not in skipped:
        errors["grad"] = max(max_abs(g, gd) for g, gd in zip(grads, grads_dense)) / (
            size * eps * max(grad_scale, torch.finfo(torch.float64).tiny) * kappa
            * (3 if attached and kappa > 1 else 1))

    for c in wc.conditioners(layer):
        if c.transform.is_orthogonal:
            key, value = orthogonality_error(c.transform)
            errors[key] = max(errors.get(key, 0.0), value)

    clone = copy.deepcopy(layer)
    assert not {id(p) for p in clone.parameters()} & {id(p) for p in layer.parameters()}
    with torch.no_grad():
        assert torch.equal(clone(x), y_plain)
    merged = wc.merge(clone)  # merging the copy leaves the layer conditioned
    assert type(merged) is nn.Linear and wc.is_conditioned(layer)
    with torch.no_grad():
        # merge bakes exactly W' and b' (stored contiguous, as a fresh layer's; the dense
        # weight may be a transposed layout, so the GEMMs may round differently)
        assert torch.equal(merged.weight, layer.weight)
        if config.bias:
            assert torch.equal(merged.bias, layer.bias)
        torch.testing.assert_close(merged(x), y_dense, rtol=0,
                                   atol=size * eps * max(y_dense.abs().max().item(), 1.0))

    fresh = make_layer(config.out_features, config.in_features, bias=config.bias, dtype=dtype,
                       seed=config.seed + 1)
    condition(fresh, config)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), y_plain)
    return errors


def norm_conditioning(layer: nn.Module) -> float:
    """How much the norm-tied conditioners (``magnitude``) magnify rounding: the largest
    ``(‖W‖ + ‖ΔW‖) / ‖M‖`` over the lines (rows for left, columns for right) that one
    normalises, ``M`` the matrix it conditions (float64, its norm floored at ``1e-6`` like
    ``magnitude``'s); 1 without them. Both forms round ``M = W + ΔW`` before dividing by its
    norm, so a line that nearly cancels (``‖M‖ ≪ ‖W‖``) magnifies that rounding in the
    output by this factor, whatever the algorithm (Note (cancelled rows) in
    ``weightcond.engine.execute``)."""
    conditioning = wc.layer.adapters_of(layer).current()
    weight = layer.parametrizations.weight.original.detach().double()
    update = wc.get_update(layer)
    delta = torch.zeros_like(weight) if update is None else update.matrix().detach().double()
    kappa = 1.0
    with torch.no_grad():
        for i, c in enumerate(conditioning.conditioners()):
            if not c.transform.norm_tied:
                continue
            steps = i + (1 if i >= len(conditioning.pre) else 0)
            m = conditioning.dense_weight(weight, steps=steps).double()
            dim = -1 if c.is_left else -2
            norm = torch.linalg.vector_norm
            ratio = (norm(weight, dim=dim) + norm(delta, dim=dim)) / norm(m, dim=dim).clamp_min(
                1e-6)
            kappa = max(kappa, ratio.max().item())
    return kappa


def orthogonality_error(t: wc.Transform) -> tuple[str, float]:
    """``max|QᵀQ - I|`` of the transform's dense matrix (in its own dtype), normalised:
    by ``n · eps``, or for ``map="exp"`` by ``(n + ν²) · eps`` (key ``"orthogonal (exp)"``),
    where ``ν²``, the squared norm of the transform's parameters, stands in for the
    generator's ``‖S‖₂``: scaling and squaring loses accuracy in proportion to it."""
    q = t.matrix().detach()
    eps = torch.finfo(q.dtype).eps
    error = max_abs(q.double().mT @ q.double(), torch.eye(t.dim, dtype=torch.float64))
    if getattr(t, "map", None) == "exp":
        nu2 = sum(p.detach().double().square().sum().item() for p in t.parameters())
        return "orthogonal (exp)", error / ((t.dim + nu2) * eps)
    return "orthogonal", error / (t.dim * eps)


def check(config: Config) -> None:
    errors = measure(config)
    for key, value in errors.items():
        assert value <= BOUNDS[key], f"{key} error {value:.3g} > {BOUNDS[key]} for {config}"


# -- the grid ------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs())
def test_conformance(config: Config) -> None:
    check(config)


SLICE_SHAPES = ((8, 8), (10, 6), (6, 10))  # square, tall, wide: every side has n >= 2


def slice_config(index: int, cell: tuple[str, str, str]) -> Config:
    """A fixed configuration for one cell of :data:`helpers.CELLS` (transform-major, then
    placement, then side): each transform meets every dtype over its four cells, each
    placement × side every dtype over the transforms; shapes and the update alternate."""
    t, site = divmod(index, len(PLACEMENTS) * len(SIDES))
    dtype = DTYPES[(t + site) % len(DTYPES)]
    out_features, in_features = SLICE_SHAPES[index % len(SLICE_SHAPES)]
    return Config(out_features, in_features, dtype, (Cell(*cell),),
                  rank=2 if index % 2 else None, seed=index, tokens=(2, 3))


@pytest.mark.parametrize(("index", "cell"), list(enumerate(CELLS)),
                         ids=["-".join(c) for c in CELLS])
def test_every_cell(index: int, cell: tuple[str, str, str]) -> None:
    """Every transform × placement × side, whatever hypothesis draws."""
    check(slice_config(index, cell))


def one_dimensional_config(index: int, name: str, side: str) -> Config:
    out_features, in_features = (1, 7) if side == "left" else (7, 1)
    placement = PLACEMENTS[index % len(PLACEMENTS)]
    return Config(out_features, in_features, DTYPES[index % len(DTYPES)],
                  (Cell(name, placement, side), Cell("diag", "post", "left")),
                  rank=1, seed=index)


@pytest.mark.parametrize(("index", "name", "side"),
                         [(i, *c) for i, c in enumerate(itertools.product(TRANSFORM_NAMES, SIDES))])
def test_side_of_one_dimension(index: int, name: str, side: str) -> None:
    """A side of one dimension: the transform builds and conforms, or raises ShapeError
    (rotations built from planes need two dimensions) and the layer carries on without it."""
    config = one_dimensional_config(index, name, side)
    check(config)
    layer = make_layer(config.out_features, config.in_features)
    error = condition(layer, config)[0]
    assert error is None or isinstance(error, wc.ShapeError)


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_defaults_build_for_sides_from_2_to_32(name: str) -> None:
    """Beyond 32, ``block`` and ``butterfly`` need a divisor of ``n`` up to 32 for their
    default block size (a prime ``n > 32`` raises ShapeError)."""
    for dim in range(2, 33):
        wc.TRANSFORMS[name](dim)


def worst_errors(count: int) -> dict[tuple[str, str], tuple[float, Config]]:
    """The largest normalised error per (dtype, check) over the fixed slices and ``count``
    drawn configurations (derandomized: the same every run)."""
    found = [slice_config(i, c) for i, c in enumerate(CELLS)]
    found += [one_dimensional_config(i, *c)
              for i, c in enumerate(itertools.product(TRANSFORM_NAMES, SIDES))]

    @settings(max_examples=count, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(config=configs())
    def draw(config: Config) -> None:
        found.append(config)

    draw()
    worst: dict[tuple[str, str], tuple[float, Config]] = {}
    for config in found:
        for key, value in measure(config).items():
            k = (str(config.dtype).removeprefix("torch."), key)
            if value >= worst.get(k, (-1.0,))[0]:
                worst[k] = (value, config)
    return worst


if __name__ == "__main__":  # print the largest normalised errors (for docs/guarantees.rst)
    import sys

    for (dtype_name, key), (value, config) in sorted(
            worst_errors(int(sys.argv[1]) if len(sys.argv) > 1 else 1000).items()):
        print(f"{dtype_name:9s} {key:10s} {value:9.3g}  {config}")
