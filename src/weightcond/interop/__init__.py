"""Interoperability with other libraries (PEFT)."""

from .peft import from_peft_tensors

__all__ = ["from_peft_tensors"]
