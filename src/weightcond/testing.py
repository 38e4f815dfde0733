"""The transform contract as a function a researcher runs on a transform of their own.

:func:`check_transform` runs every property the test suite asks of a registered transform
and returns a :class:`TransformReport` with one named result per check; the suite runs the
same function over :data:`weightcond.TRANSFORMS` (``tests/test_contract.py``), so no rule
lives only in a test.

Example:
    >>> import weightcond as wc
    >>> from weightcond.testing import check_transform
    >>> report = check_transform(wc.TRANSFORMS["householder"], reflections=4)
    >>> report.ok, report.failures()
    (True, {})
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .engine.plan import every_plan
from .layer import (
    adapters_of,
    dense_forward,
    is_conditioned,
    merge,
    register_conditioning,
    register_update,
    remove_conditioning,
)
from .transforms import TRANSFORMS, Transform

__all__ = ["CHECKS", "TransformReport", "check_transform"]

Sizes = tuple[int, int]  # (out, in) of the layer the checks condition
SIZES: Sizes = (16, 8)  # two side sizes
PLACEMENTS, SIDES = ("pre", "post"), ("left", "right")


@dataclass
class TransformReport:
    """The result of :func:`check_transform`: for each check by name, ``None`` if it held,
    else what failed; ``skipped`` names the checks that do not apply and why."""

    transform: str
    results: dict[str, str | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every check that applies held."""
        return all(r is None for r in self.results.values())

    def failures(self) -> dict[str, str]:
        """The checks that failed, with what failed."""
        return {k: v for k, v in self.results.items() if v is not None}

    def __str__(self) -> str:
        lines = [f"{self.transform}: {'ok' if self.ok else 'FAILED'}"]
        lines += [f"  {name}: {'ok' if r is None else 'FAILED: ' + r}"
                  for name, r in self.results.items()]
        lines += [f"  {name}: skipped ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _randomize(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.requires_grad:
                p.add_((scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
                       .to(p.dtype))


def _close(got: Tensor, expected: Tensor, what: str, *, atol: float = 1e-10) -> None:
    """Raise ``AssertionError`` naming ``what`` unless the two agree (float64 tolerances)."""
    error = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    scale = max(expected.double().abs().max().item() if expected.numel() else 0.0, 1.0)
    if not error <= atol * scale:  # NaN fails too
        raise AssertionError(f"{what}: max difference {error:.3g} (allowed {atol * scale:.3g})")


def _layer(sizes: Sizes, dtype: torch.dtype = torch.float64) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(sizes[1], sizes[0]).to(dtype).requires_grad_(False)


def _cells() -> Iterator[tuple[str, str]]:
    for placement in PLACEMENTS:
        for side in SIDES:
            yield placement, side


def _conditioned(cls: type[Transform], options: dict[str, Any], sizes: Sizes,
                 placement: str, side: str, dtype: torch.dtype = torch.float64) -> nn.Linear:
    layer = _layer(sizes, dtype)
    register_update(layer, rank=2)
    register_conditioning(layer, placement=placement, side=side, transform=cls, **options)
    _randomize(layer)
    return layer


def _forward_backward(layer: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    x = x.clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *params], allow_unused=True)
    return y.detach(), [torch.zeros(()) if g is None else g for g in grads]


# -- the checks: each takes (cls, options) and raises AssertionError on failure ---------------
def _identity(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    x = torch.randn(4, sizes[1], dtype=torch.float64)
    for placement, side in _cells():
        layer = _layer(sizes)
        before = layer(x)
        register_conditioning(layer, placement=placement, side=side, transform=cls, **options)
        _close(layer(x), before, f"{placement}/{side}: output at initialisation",
               atol=1e-12)


def _views(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    n = sizes[0]
    t = cls(n, **options).double()
    if t.norm_tied:
        return
    _randomize(t)
    q = t.matrix()
    h = torch.randn(2, 3, n, dtype=torch.float64)
    _close(t.apply(h), h @ q.mT, "apply() against matrix()")
    _close(t.apply(h, transpose=True), h @ q, "apply(transpose=True) against matrix()ᵀ")
    factors = t.low_rank()
    if factors is not None:
        u, v = factors
        _close(torch.eye(n, dtype=torch.float64) + u @ v.mT, q, "I + U Vᵀ from low_rank()")


def _orthogonal(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    n = sizes[0]
    for dtype in (torch.float64, torch.float32):
        t = cls(n, **options).to(dtype)
        _randomize(t, scale=0.5)
        opt = torch.optim.SGD(t.parameters(), lr=0.1)
        h = torch.randn(8, n, dtype=dtype)
        for step in range(4):  # at random parameters, then after optimizer steps
            q = t.matrix().detach().double()
            error = (q.mT @ q - torch.eye(n, dtype=torch.float64)).abs().max().item()
            bound = 10 * n * torch.finfo(dtype).eps
            if not error <= bound:
                raise AssertionError(f"{dtype}, after {step} SGD steps: max|QᵀQ - I| = "
                                     f"{error:.3g} > 10 n eps = {bound:.3g}")
            opt.zero_grad()
            t.apply(h).square().sum().backward()
            opt.step()


def _matrix_free(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    """The layer's forward, and every form the planner can give the transform (each correct
    plan, whatever its cost: :func:`weightcond.engine.plan.every_plan`), against the dense
    weight's: outputs and gradients, with and without the input's gradient."""
    x = torch.randn(2, 3, sizes[1], dtype=torch.float64)
    for placement, side in _cells():
        layer = _conditioned(cls, options, sizes, placement, side)
        y, grads = _forward_backward(layer, x)
        with dense_forward(layer):
            y_dense, grads_dense = _forward_backward(layer, x)
        where = f"{placement}/{side}"
        _close(y, y_dense, f"{where}: matrix-free output against the dense weight's")
        for i, (g, gd) in enumerate(zip(grads, grads_dense, strict=True)):
            _close(g, gd, f"{where}: gradient {i} (0: the input; then the trainable "
                          f"parameters) against the dense weight's")
        conditioning = adapters_of(layer).current()
        weight, bias = layer.parametrizations.weight.original, layer.bias
        params = [p for p in layer.parameters() if p.requires_grad]
        for input_grad in (False, True):
            h = x.clone().requires_grad_(input_grad)
            inputs = [h, *params] if input_grad else params
            for plan in every_plan(conditioning.layout(), 6, input_grad, torch.float64):
                forms = "+".join(f.value for f in plan.forms)
                got = conditioning.activation(h, weight, bias, plan=plan)
                _close(got.detach(), y_dense, f"{where}, forms {forms}: output")
                found = torch.autograd.grad(got.square().sum(), inputs, allow_unused=True)
                expected = grads_dense if input_grad else grads_dense[1:]
                for i, (g, gd) in enumerate(zip(found, expected, strict=True)):
                    _close(torch.zeros(()) if g is None else g, gd,
                           f"{where}, forms {forms}, input_grad={input_grad}: gradient {i}")


def _no_grad_bits(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(5, sizes[1], dtype=dtype)
        for placement, side in _cells():
            layer = _conditioned(cls, options, sizes, placement, side, dtype)
            with torch.no_grad():
                y_no_grad = layer(x)
            if not torch.equal(layer(x).detach(), y_no_grad):
                raise AssertionError(f"{dtype}, {placement}/{side}: the output under "
                                     f"torch.no_grad() is not the same bits as with autograd")


def _dtypes(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    x64 = torch.randn(6, sizes[1], dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        for placement, side in _cells():
            layer = _conditioned(cls, options, sizes, placement, side, dtype)
            x = x64.to(dtype).requires_grad_(True)
            y = layer(x)
            y.float().square().sum().backward()
            grads = [x.grad, *(p.grad for p in layer.parameters() if p.requires_grad)]
            if not torch.isfinite(y).all() or \
                    not all(g is None or torch.isfinite(g).all() for g in grads):
                raise AssertionError(f"{dtype}, {placement}/{side}: non-finite output or "
                                     f"gradient")
            with dense_forward(layer), torch.no_grad():
                y_dense = layer(x)
            budget = 8 * max(sizes) * eps * max(y_dense.abs().max().item(), 1.0)
            error = (y.detach().double() - y_dense.double()).abs().max().item()
            if not error <= budget:
                raise AssertionError(f"{dtype}, {placement}/{side}: matrix-free against dense "
                                     f"{error:.3g} > 8 n eps max|y| = {budget:.3g}")


def _merge_and_remove(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    x = torch.randn(7, sizes[1], dtype=torch.float64)
    for placement, side in _cells():
        layer = _layer(sizes)
        weight, bias = layer.weight, layer.bias
        saved = weight.clone(), bias.clone()
        register_update(layer, rank=2)
        register_conditioning(layer, placement=placement, side=side, transform=cls, **options)
        _randomize(layer)
        expected = layer(x)
        merged = merge(copy.deepcopy(layer))
        if type(merged) is not nn.Linear or is_conditioned(merged):
            raise AssertionError(f"{placement}/{side}: merge did not give a plain layer")
        _close(merged(x), expected, f"{placement}/{side}: the merged layer's output",
               atol=1e-12)
        remove_conditioning(layer)
        if type(layer) is not nn.Linear or layer.weight is not weight or \
                layer.bias is not bias or not torch.equal(weight, saved[0]) or \
                not torch.equal(bias, saved[1]):
            raise AssertionError(f"{placement}/{side}: remove_conditioning did not give back "
                                 f"the original class and tensors")


def _save_load(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    from .io import load_adapter, save_adapter  # io imports the package: not at import time

    x = torch.randn(3, sizes[1], dtype=torch.float64)
    with tempfile.TemporaryDirectory() as folder:
        for i, (placement, side) in enumerate(_cells()):
            model = nn.Sequential(_conditioned(cls, options, sizes, placement, side))
            path = save_adapter(model, f"{folder}/{i}")
            fresh = nn.Sequential(_layer(sizes))
            load_adapter(fresh, path)
            if not torch.equal(fresh(x), model(x)):
                raise AssertionError(f"{placement}/{side}: the adapter loaded by recipe does "
                                     f"not compute the saved model's outputs bit for bit")


def _meta(cls: type[Transform], options: dict[str, Any], sizes: Sizes) -> None:
    x = torch.randn(3, sizes[1], dtype=torch.float64)
    for placement, side in _cells():
        reference = _conditioned(cls, options, sizes, placement, side)
        with torch.device("meta"):
            layer = nn.Linear(sizes[1], sizes[0]).to(torch.float64).requires_grad_(False)
            register_update(layer, rank=2)
            register_conditioning(layer, placement=placement, side=side, transform=cls,
                                  **options)
        layer.to_empty(device="cpu")
        layer.load_state_dict(reference.state_dict())
        if not torch.equal(layer(x), reference(x)):
            raise AssertionError(f"{placement}/{side}: built on the meta device, then "
                                 f"to_empty() and load_state_dict(), it computes other "
                                 f"outputs (a buffer derived from the options must be a "
                                 f"constant: Transform.register_constant)")


Check = Callable[[type[Transform], dict[str, Any], Sizes], None]

#: Every check of :func:`check_transform`, by name, in the order they run.
CHECKS: dict[str, Check] = {
    "identity_at_init": _identity,
    "apply_equals_matrix": _views,
    "orthogonal": _orthogonal,
    "matrix_free_equals_dense": _matrix_free,
    "same_bits_without_grad": _no_grad_bits,
    "dtypes": _dtypes,
    "merge_and_remove": _merge_and_remove,
    "save_and_load": _save_load,
    "meta_device": _meta,
}


def check_transform(cls: type[Transform] | str, *, sizes: Sizes = SIZES,
                    **options: Any) -> TransformReport:
    """Run the transform contract on ``cls`` (built with ``options``) and report each check.

    The checks (:data:`CHECKS`), all in float64 unless they name a dtype, on an
    ``nn.Linear`` of ``sizes = (out, in)`` (default ``(16, 8)``) with a rank-2 update and the
    transform at each placement and side (transform-level checks on a side of ``out``):

    * ``identity_at_init``: a freshly conditioned layer computes what it computed before;
    * ``apply_equals_matrix``: :meth:`~weightcond.transforms.Transform.apply` (and its
      transpose, and :meth:`~weightcond.transforms.Transform.low_rank` where it returns
      factors) equals :meth:`~weightcond.transforms.Transform.matrix` at random parameters;
    * ``orthogonal`` (only when ``is_orthogonal``): :math:`\\max|Q^\\top Q - I| \\le
      10\\,n\\,\\varepsilon` in float64 and float32, at random parameters and after SGD steps;
    * ``matrix_free_equals_dense``: outputs and the gradients of the input and every
      trainable parameter equal those through the dense conditioned weight;
    * ``same_bits_without_grad``: the output under :func:`torch.no_grad` is the same bits
      (float64 and float32): a forward must not round differently when nothing needs a
      gradient;
    * ``dtypes``: in float32, bfloat16 and float16 the outputs and gradients are finite and
      the matrix-free output is within ``8 · n · eps`` of the dense one;
    * ``merge_and_remove``: :func:`~weightcond.merge` gives a plain layer with the same
      outputs; :func:`~weightcond.remove_conditioning` gives back the very tensors;
    * ``save_and_load`` (only for registered transforms, whose recipe an adapter file can
      name): :func:`~weightcond.save_adapter` then :func:`~weightcond.load_adapter` onto a
      fresh layer computes the same bits;
    * ``meta_device``: built on the meta device, ``to_empty()`` and ``load_state_dict()``
      give the same bits.

    Args:
        cls: a :class:`~weightcond.transforms.Transform` subclass, or a registered name.
        sizes: ``(out, in)`` of the layer; options such as a block size must fit both.
        **options: the transform's options.

    Returns:
        A :class:`TransformReport`; ``report.ok`` says whether every check held,
        ``print(report)`` lists them. A check in which the transform raises any exception
        fails, with the exception's type and message.

    Raises:
        weightcond.WeightcondError: ``cls`` is not a registered name, or ``options`` do not
            build it (the constructor's own typed error).
    """
    if isinstance(cls, str):
        cls = TRANSFORMS.lookup(cls, "check_transform", "cls")
    report = TransformReport(cls.name or cls.__name__)
    probe = cls(sizes[0], **options)
    registered = bool(cls.name) and TRANSFORMS.get(cls.name) is cls
    for name, check in CHECKS.items():
        if name == "orthogonal" and not probe.is_orthogonal:
            report.skipped[name] = "is_orthogonal is False"
            continue
        if name == "apply_equals_matrix" and probe.norm_tied:
            report.skipped[name] = "norm-tied: no matrix of its own"
            continue
        if name == "save_and_load" and not registered:
            report.skipped[name] = "not registered: an adapter file cannot name it"
            continue
        try:
            check(cls, dict(options), sizes)
        except Exception as error:  # any exception from the transform fails the check
            report.results[name] = f"{type(error).__name__}: {error}"
        else:
            report.results[name] = None
    return report

