"""Interoperability with other libraries (PEFT)."""

from .peft import from_peft, from_peft_tensors, to_peft

__all__ = ["from_peft", "from_peft_tensors", "to_peft"]
