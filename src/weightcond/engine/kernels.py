"""The layer's autograd kernels: one node for the GEMM and its output steps, a diagonal
scale-and-add whose gradient needs no activation-sized temporary, and the guards for where
they cannot run (``torch.func``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..transforms.base import compute_dtype

__all__ = ["LinearNode", "ScaleAdd", "diagonal_grad", "functorch_active", "output", "scale_add"]


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, …) is running.

    Note (torch.func): the layer's own autograd Functions (:class:`LinearNode`,
    :class:`ScaleAdd`, the fused block) have backward passes of their own, which
    ``torch.func`` cannot transform (``autograd.Function`` refuses them there); under such a
    transform the same forward runs on PyTorch's operators instead, whose derivatives it
    knows: the same values, without the fused backward passes."""
    return torch._C._are_functorch_transforms_active()


def diagonal_grad(grad: Tensor, y: Tensor, d: Tensor) -> Tensor:
    """The gradient of ``d`` in ``y ⊙ d``: ``Σ_tokens grad ⊙ y``, reduced over token chunks
    (Note (diagonal gradient memory)), in ``d``'s dtype."""
    accumulate = compute_dtype(d.dtype)
    if torch.compiler.is_compiling():
        # the compiler fuses the product into the reduction (no temporary), and a
        # Python loop over the tokens would specialize the graph on their count
        return (grad * y).sum(0, dtype=accumulate).to(d.dtype)
    grad_d = torch.zeros(d.shape, dtype=accumulate, device=d.device)
    chunk = max(1, 2**18 // max(d.numel(), 1))  # rows per 1 MiB (fp32) temporary
    for start in range(0, grad.shape[0], chunk):
        rows = slice(start, start + chunk)
        grad_d += (grad[rows] * y[rows]).sum(0, dtype=accumulate)
    return grad_d.to(d.dtype)


class ScaleAdd(torch.autograd.Function):
    """``y ⊙ d + addend`` (``d`` a vector over the last dimension, ``addend`` optional).

    Note (diagonal gradient memory): autograd's ``addcmul`` backward builds two
    ``(tokens, out)`` temporaries for the gradient of ``d``; here it is reduced over
    token chunks, so a learnable output diagonal costs no activation-sized temporary
    beyond the saved input. With ``in_place`` the sum is accumulated into ``addend`` (a
    temporary of ``y``'s shape that nothing else holds), see Note (in-place accumulation)."""

    @staticmethod
    def forward(ctx, y: Tensor, d: Tensor, addend: Tensor | None,
                in_place: bool = False) -> Tensor:
        ctx.save_for_backward(y, d)
        ctx.addend_shape = None if addend is None else addend.shape
        if addend is None:
            return y * d
        if in_place:  # addend is a private temporary of y's shape
            ctx.mark_dirty(addend)
            return addend.addcmul_(y, d)
        return torch.addcmul(addend, y, d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, d = ctx.saved_tensors
        grad_y = grad * d if ctx.needs_input_grad[0] else None
        grad_d = diagonal_grad(grad, y, d) if ctx.needs_input_grad[1] else None
        grad_addend = None
        if ctx.needs_input_grad[2]:
            grad_addend = grad.sum_to_size(ctx.addend_shape)
        return grad_y, grad_d, grad_addend, None


def scale_add(y: Tensor, d: Tensor, addend: Tensor | None = None,
               in_place: bool = False) -> Tensor:
    """``y ⊙ d + addend`` by :class:`ScaleAdd`, or by PyTorch's operators (out of place)
    under ``torch.func`` (Note (torch.func))."""
    if not functorch_active():
        return ScaleAdd.apply(y, d, addend, in_place)
    return y * d if addend is None else torch.addcmul(addend, y, d)


class LinearNode(torch.autograd.Function):
    """One autograd node for ``(x Wᵀ) ⊙ d + (x Lᵀ) R + v`` or, with ``post``,
    ``((x Wᵀ) + (x Lᵀ) R) ⊙ d + v`` (``d``, the low-rank pair and ``v`` optional; ``b``, a
    bias fused into the GEMM, only without ``d``); with ``din``, the GEMM reads
    ``x ⊙ din`` (right-side diagonals before the update) and the low-rank terms ``x``.

    Note (one node for the layer): the forward runs the same operations as the step list
    (:func:`weightcond.engine.execute.run_steps`), in the same order and on the same buffers,
    so it gives the same bits. The backward differs from autograd's for the separate nodes
    in two ways. The input's gradient is one buffer, ``g (D W)`` (or ``(g ⊙ d) W``) and then
    ``+= (g Rᵀ) L`` in place, instead of two ``(tokens, in)`` gradients and their sum. And
    ``D W`` (``out × in``) is formed instead of ``g ⊙ d`` when it is the smaller (fewer input
    features than tokens); with ``post``, ``d`` scales the thin factor ``R`` instead of the
    gradient as well. With ``din`` only ``x`` is saved (``x ⊙ din`` is a temporary of the
    forward): the gradient ``g W`` reaching it gives ``din``'s gradient, reduced over token
    chunks, and then, scaled in place, the input's.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, d: Tensor | None,
                left: Tensor | None, right: Tensor | None, vector: Tensor | None,
                post: bool, din: Tensor | None = None) -> Tensor:
        t = None if left is None else F.linear(x, left)
        source = x if din is None else x * din  # what the GEMM reads
        if d is None or post:
            y = F.linear(source, weight, bias)
            if t is not None:
                y.addmm_(t, right)
            if d is None:
                scaled = None
                if vector is not None:
                    y.add_(vector)
            else:  # d multiplies the sum
                scaled = y
                y = y * d if vector is None else torch.addcmul(vector, y, d)
        else:
            scaled = F.linear(source, weight)
            if t is not None:
                y = t @ right if vector is None else torch.addmm(vector, t, right)
                y.addcmul_(scaled, d)
            else:
                y = scaled * d if vector is None else torch.addcmul(vector, scaled, d)
        del source
        ctx.post = post
        ctx.save_for_backward(x, weight, d, left, right, t,
                              scaled if ctx.needs_input_grad[3] else None, din)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, d, left, right, t, scaled, din = ctx.saved_tensors
        need_x, need_w, need_b, need_d, need_l, need_r, need_v = ctx.needs_input_grad[:7]
        need_din = din is not None and ctx.needs_input_grad[8]
        on_terms = d if ctx.post else None  # the diagonal the low-rank terms pass through
        grad_x = grad_w = grad_b = grad_d = grad_l = grad_r = grad_v = None
        if need_d:
            grad_d = diagonal_grad(grad, scaled, d)
        if t is not None and (need_x or need_l):
            grad_t = grad.mm((right if on_terms is None else right * on_terms).mT)
        if need_r:
            grad_r = t.mT.mm(grad)
            if on_terms is not None:
                grad_r = grad_r * on_terms
        if need_l:
            grad_l = grad_t.mT.mm(x)
        grad_times_d = None  # g ⊙ d, only if needed
        grad_din = None
        if need_x or need_din:
            if d is None:
                grad_x = grad.mm(weight)
            elif x.shape[-1] < x.shape[0]:  # D W is smaller than g ⊙ d
                grad_x = grad.mm(d[:, None] * weight)
            else:
                grad_times_d = grad * d
                grad_x = grad_times_d.mm(weight)
            if din is not None:  # grad_x holds the gradient of x ⊙ din
                if need_din:
                    grad_din = diagonal_grad(grad_x, x, din)
                grad_x = grad_x.mul_(din) if need_x else None
            if grad_x is not None and t is not None:
                grad_x.addmm_(grad_t, left)
        if need_w:
            if d is not None and grad_times_d is None:
                grad_times_d = grad * d
            grad_w = (grad if d is None else grad_times_d).mT.mm(x if din is None else x * din)
        if need_b:
            grad_b = grad.sum(0)
        if need_v:
            grad_v = grad.sum(0)
        return grad_x, grad_w, grad_b, grad_d, grad_l, grad_r, grad_v, None, grad_din


def output(y: Tensor, lead: torch.Size) -> Tensor:
    """The 2-D ``(tokens, out)`` result with the input's leading dimensions."""
    # Note (no view out): like nn.Linear, return a tensor that is not an autograd view of the
    # 2-D temporary. FSDP2 hooks a sharded module's output for its pre-backward all-gather;
    # an in-place op on a view output (`out += residual`) would drop that hook (FSDP2 warns).
    # The 2-D tensor is private to this call, so the alias is never observable.
    return torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))
