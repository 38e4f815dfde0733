"""Interoperability with other libraries (PEFT, the transformers ``Trainer``)."""

from typing import Any

from .peft import from_peft, from_peft_tensors, to_peft

__all__ = ["AdapterCheckpointCallback", "from_peft", "from_peft_tensors", "to_peft"]


def __getattr__(name: str) -> Any:
    # transformers takes seconds to import: only when its callback is asked for
    if name == "AdapterCheckpointCallback":
        from .transformers import AdapterCheckpointCallback
        return AdapterCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
