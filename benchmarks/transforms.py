"""Transform level: build + apply (forward and backward) of each transform on 256 tokens as
the dimension grows, against dense orthogonal parametrizations."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Settings, interleaved_medians, spec_label

import weightcond as wc
from weightcond.errors import WeightcondError

DIMS = [256, 512, 1024, 2048, 4096, 8192]
QUICK_DIMS = [64, 128, 256]
# dense peers are O(n³) per step: each runs up to its limit (matrix-exponential backward
# takes about 2 s at n = 1024 here)
DENSE_LIMITS = {"dense_solve_cayley": 2048, "dense_matrix_exp": 1024, "torch_orthogonal": 1024,
                "geotorch_orthogonal": 1024}
TOKENS = 256

# ours: a transform alone needs no conditioned matrix, so norm-tied ones (DoRA's magnitude,
# whose entries depend on the norms of the matrix it conditions) are not run here. One of
# ours whose first step at a dimension takes longer than SLOW_S is not run there nor above
# (a dense transform's O(n³) map per step).
SLOW_S = 2.0
# deliberate variants beside each class's example options: (transform, extra options)
EXTRA: list[tuple[str, dict[str, object]]] = [("skew", {"map": "exp"})]


def ours() -> dict[str, dict[str, object]]:
    """label -> ``{"transform": name, **options}`` for every registered transform that is not
    norm-tied, with its class's example options, then the extra variants."""
    specs: list[tuple[str, dict[str, object]]] = [
        (name, dict(cls.example_options)) for name, cls in wc.TRANSFORMS.items()
        if not cls.norm_tied]
    specs += [(name, {**wc.TRANSFORMS[name].example_options, **extra}) for name, extra in EXTRA
              if name in wc.TRANSFORMS]
    return {spec_label(name, options): {"transform": name, **options} for name, options in specs}


def _dense_skew(n: int, s: Settings, map: Callable[[torch.Tensor], torch.Tensor]):
    generator = nn.Parameter(torch.zeros(n, n, device=s.device, dtype=s.torch_dtype))

    def matrix() -> torch.Tensor:
        x = generator.tril(-1)
        return map(x - x.mT)
    return matrix, [generator]


def _parametrized(n: int, s: Settings, register: Callable[[nn.Module], object]):
    layer = nn.Linear(n, n, bias=False, device=s.device, dtype=s.torch_dtype)
    register(layer)
    return (lambda: layer.weight), list(layer.parameters())


def _torch_orthogonal(layer: nn.Module) -> object:
    return torch.nn.utils.parametrizations.orthogonal(layer)


def _geotorch_orthogonal(layer: nn.Module) -> object:
    import geotorch
    return geotorch.orthogonal(layer, "weight")


DENSE: dict[str, Callable[[int, Settings], tuple[Callable[[], torch.Tensor], list]]] = {
    "dense_solve_cayley": lambda n, s: _dense_skew(n, s, wc.transforms.maps.cayley),
    "dense_matrix_exp": lambda n, s: _dense_skew(n, s, torch.linalg.matrix_exp),
    "torch_orthogonal": lambda n, s: _parametrized(n, s, _torch_orthogonal),
    "geotorch_orthogonal": lambda n, s: _parametrized(n, s, _geotorch_orthogonal),
}


def _step(apply: Callable[[torch.Tensor], torch.Tensor], params: list, h: torch.Tensor,
          grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        apply(h).backward(grad)
    return step


def run(s: Settings, dims: list[int], log: Callable[[str], None]) -> dict:
    results: dict[str, dict] = {}
    not_run: dict[str, dict[str, str]] = {}
    too_slow: dict[str, str] = {}
    for n in dims:
        h = torch.randn(TOKENS, n, device=s.device, dtype=s.torch_dtype)
        grad = torch.randn_like(h)
        steps = {}
        skipped = {}
        for name, spec in ours().items():
            if name in too_slow:
                skipped[name] = too_slow[name]
                continue
            spec = dict(spec)
            try:
                t = wc.TRANSFORMS[spec.pop("transform")](n, **spec).to(s.device, s.torch_dtype)
            except WeightcondError as error:  # options the dimension rules out
                skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                continue
            step = _step(t.apply, list(t.parameters()), h, grad)
            start = time.perf_counter()
            step()
            took = time.perf_counter() - start
            if took > SLOW_S and not s.quick:
                too_slow[name] = (f"one step took {took:.1f} s at n={n}, over {SLOW_S:.0f} s: "
                                  f"not run from there on")
                skipped[name] = too_slow[name]
                continue
            steps[name] = step
        for name, make in DENSE.items():
            if n > DENSE_LIMITS[name]:
                continue
            try:  # a peer may not support the dtype on this device (torch's QR in bf16 on CPU)
                matrix, params = make(n, s)
                step = _step(lambda x, m=matrix: x @ m().mT, params, h, grad)
                step()
            except (NotImplementedError, RuntimeError) as error:
                skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                continue
            steps[name] = step
        times = interleaved_medians(steps, Settings(**{**s.__dict__,
                                                        "repeats": max(3, s.repeats // 2)}))
        results[str(n)] = {name: t for name, t in times.items()}
        for name, reason in skipped.items():
            log(f"transforms n={n}: {name} skipped ({reason})")
        if skipped:
            not_run[str(n)] = skipped
        log(f"transforms n={n}: " + ", ".join(f"{k} {v['median'] * 1e3:.2f}ms"
                                              for k, v in times.items()))
    return {"tokens": TOKENS, "times": results, "slopes": slopes(results), "skipped": not_run}


def slopes(results: dict[str, dict]) -> dict[str, float]:
    """Least-squares slope of log(time) against log(n) over the dimensions run: 1 for
    O(n·k), 2 for O(n²), 3 for O(n³) (small sizes flatten it: overheads are constant)."""
    out = {}
    names = {name for per_n in results.values() for name in per_n}
    for name in sorted(names):
        points = [(math.log(int(n)), math.log(per_n[name]["median"]))
                  for n, per_n in results.items() if name in per_n]
        if len(points) < 2:
            continue
        mx = sum(p[0] for p in points) / len(points)
        my = sum(p[1] for p in points) / len(points)
        num = sum((x - mx) * (y - my) for x, y in points)
        den = sum((x - mx) ** 2 for x, _ in points)
        out[name] = num / den
    return out
