"""Shared pieces of the benchmark suite: timing, environment, candidates (peak memory is
counted by :mod:`weightcond.profiling`, shared with ``weightcond compare``)."""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Settings:
    """What a run measures and how."""

    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    tokens: int = 2048
    rank: int = 16
    repeats: int = 10
    warmup: int = 3
    quick: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def spec_label(name: str, options: dict[str, object]) -> str:
    """A transform and its options as a benchmark names it: ``skew (rank=4)``; the name
    alone for its defaults."""
    if not options:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())})"


class Wrap(nn.Module):
    """A model holding one layer named ``proj`` (what PEFT's ``target_modules`` matches)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def training_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor
                  ) -> tuple[Callable[[], None], int]:
    """A full training step of ``model`` on ``x`` (forward, backward of ``grad``, AdamW step
    on its trainable parameters) and the number of those parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(grad)
        if opt is not None:
            opt.step()

    return step, sum(p.numel() for p in params)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(steps: dict[str, Callable[[], None]], settings: Settings
                        ) -> dict[str, dict[str, float]]:
    """Time every step function, interleaved after a warm-up; seconds.

    Each round runs every step once, in an order shuffled per round (seeded): a step's time
    depends on what ran before it (caches, the allocator), and a fixed order would give one
    candidate the same predecessor in every round."""
    for _ in range(settings.warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(settings.repeats):
        rng.shuffle(order)
        for name in order:
            step = steps[name]
            synchronize(settings.device)
            start = time.perf_counter()
            step()
            synchronize(settings.device)
            samples[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in samples.items()}


def summarize(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2],
            "min": min(values), "n": len(values)}


def environment(settings: Settings) -> dict[str, object]:
    """The machine record of :func:`weightcond.profiling.machine`, with the peers' versions
    and the settings."""
    import einops
    import geotorch
    import peft

    from weightcond.profiling import machine

    return {**machine(settings.device), "peft": peft.__version__,
            "geotorch": getattr(geotorch, "__version__", "?"), "einops": einops.__version__,
            "settings": settings.__dict__}


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
