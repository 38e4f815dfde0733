"""Shared pieces of the benchmark suite: timing, peak memory, environment, candidates."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(steps: dict[str, Callable[[], None]], settings: Settings
                        ) -> dict[str, dict[str, float]]:
    """Time every step function, interleaved round-robin after a warm-up; seconds."""
    for _ in range(settings.warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(settings.repeats):
        for name, step in steps.items():
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


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated (and not yet freed) while the mode is active.

    Every operator's fresh outputs are counted when created and uncounted when their
    storage is freed; views and outputs that alias an input are not allocations. This works
    the same on every device and sees exactly what PyTorch allocates, unlike the process RSS
    (which the C allocator's reuse hides)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self._counted or storage.nbytes() == 0:
                continue
            self._counted.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak bytes allocated during one call of ``step`` (after it has run once)."""
    step()
    with PeakMemory() as memory:
        step()
    return memory.peak


def environment(settings: Settings) -> dict[str, object]:
    import einops
    import geotorch
    import peft

    import weightcond

    env: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "weightcond": weightcond.__version__, "peft": peft.__version__,
        "geotorch": getattr(geotorch, "__version__", "?"), "einops": einops.__version__,
        "threads": torch.get_num_threads(), "settings": settings.__dict__,
    }
    if settings.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
