r"""The frozen weight as the executor sees it: a dense matrix, or an *opaque* one known only
through its product (a quantized layer's).

Decision (quantized bases are opaque): the matrix-free form needs four things of the frozen
``(out, in)`` matrix :math:`W` — its product with activations and with a few thin rows
(:math:`x W^\top`), its row norms :math:`\|W_i\|^2` (DoRA's norm, DESIGN §5) and, for the
few rows whose norm the expansion loses to cancellation, those rows themselves. A quantized
layer (bitsandbytes 4- and 8-bit, torchao int8, :mod:`weightcond.quantized`) provides exactly
these without building :math:`W`: its own forward (the library's kernel, called as a black box,
differentiable in its input), a row norm computed once at registration in chunks of rows, and
a gather-then-dequantize of ``k`` rows. The executor calls :func:`linear` for every product
with :math:`W`; the planner, told the weight is opaque (:class:`~weightcond.engine.plan.Layout`),
never picks a form that needs more: not the weight form (:math:`W R`), not a fused node
that reads :math:`W`, not a left fold (its pull-back :math:`G W` is a transposed product).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OpaqueWeight", "linear"]


@dataclass(frozen=True, eq=False)
class OpaqueWeight:
    """A frozen ``(out, in)`` matrix known through its product (Decision (quantized bases are
    opaque)).

    Attributes:
        shape: ``(out, in)``.
        dtype: the floating dtype it computes in (activations and adapters take it).
        device: where it lives.
        product: ``x (..., in) → x Wᵀ (..., out)``, differentiable in ``x``.
        rows: indices ``(k,)`` → the dense rows ``W[indices]`` ``(k, in)`` (dequantized).
        row_sq: ``() → ‖W_i‖²`` ``(out,)`` in float32, computed once.
    """

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    product: Callable[[Tensor], Tensor]
    rows: Callable[[Tensor], Tensor]
    row_sq: Callable[[], Tensor]

    def dense(self) -> Tensor:
        """The whole matrix, dequantized (for the dense form, never in a matrix-free step of
        the cells the fast paths cover)."""
        return self.rows(torch.arange(self.shape[0], device=self.device))


def linear(x: Tensor, weight: Tensor | OpaqueWeight, bias: Tensor | None = None) -> Tensor:
    """``x Wᵀ (+ b)`` for a dense or an opaque frozen matrix."""
    if isinstance(weight, Tensor):
        return F.linear(x, weight, bias)
    y = weight.product(x)
    return y if bias is None else y + bias.to(y.dtype)
