"""Peak memory of a training step, counted the same way on every device, and the record
of the machine a measurement ran on.

Used by ``weightcond compare`` and by the benchmark suite.
"""

from __future__ import annotations

import datetime
import os
import platform
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .version import __version__

__all__ = ["PeakMemory", "machine", "step_peak_bytes"]


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated (and not yet freed) while the mode is active.

    Every operator's fresh outputs are counted when created and uncounted when their
    storage is freed; views and outputs that alias an input are not allocations. This works
    the same on every device and sees exactly what PyTorch allocates, unlike the process RSS
    (which the C allocator's reuse hides). Tensors that exist before the mode is entered
    (weights, optimizer state from earlier steps) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
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


def machine(device: str) -> dict[str, Any]:
    """Where and with what a measurement ran: date, platform, CPU count, torch threads,
    Python, torch and weightcond versions, the device (and the GPU's name on CUDA)."""
    record: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "weightcond": __version__, "device": device,
    }
    if device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name()
    return record
