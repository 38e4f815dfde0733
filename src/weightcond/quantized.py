r"""Quantized frozen bases: bitsandbytes 4- and 8-bit layers and torchao int8 weights, as layer
kinds whose weight the training step never dequantizes.

Three kinds are registered (before ``Linear``, of which the quantized layers are subclasses):

* ``Linear4bit`` — ``bitsandbytes.nn.Linear4bit`` (NF4 and FP4, with or without nested
  statistics), as built by transformers' ``BitsAndBytesConfig(load_in_4bit=True)``;
* ``Linear8bitLt`` — ``bitsandbytes.nn.Linear8bitLt`` with int8 weights
  (``has_fp16_weights=False``, ``BitsAndBytesConfig(load_in_8bit=True)``);
* ``Int8Linear`` — a :class:`torch.nn.Linear` whose weight torchao quantized to int8
  (``quantize_(model, Int8WeightOnlyConfig())`` or ``TorchAoConfig``), weight-only or with
  dynamic int8 activations.

Each gives the executor an :class:`~weightcond.engine.frozen.OpaqueWeight` (Decision
(quantized bases are opaque) in :mod:`weightcond.engine.frozen`): the product is the
library's own kernel, called as a black box (its input gradient where a right-side
conditioner needs it); ``k`` rows are gathered in their quantized form and dequantized
alone; the row norms ``‖W_i‖²`` (DoRA) are computed once, in chunks of rows, and kept with
the quantized tensor. ``layer.weight`` stays the dense conditioned weight (dequantized), for
inspection.

Decision (what is exact on a quantized base): the frozen matrix *is* the dequantized weight
:math:`\hat W`, and every conditioned cell computes with :math:`\hat W` exactly as with a float
weight — except where the library's kernel itself rounds more than the dequantization:
bitsandbytes' 8-bit kernel quantizes the activations to int8 as well (LLM.int8(); on CPU only
in eval mode, a training-mode layer dequantizes its weight), and torchao's dynamic
configuration quantizes them too, so there the layer's output equals the dense conditioned
weight's only to that rounding (as the unconditioned layer equals :math:`x \hat W^\top`).
torchao's dynamic-activation int8 gives no gradient to its input: a conditioner that needs it
(any right-side one, or a norm-tied one with gradient through its norm) is refused with
:class:`~weightcond.LayerTypeError`.

The libraries are optional (``pip install "weightcond[quant]"``); nothing here imports them
unless a model already did (the kinds match through ``sys.modules``).

Note (bitsandbytes' CPU kernel): importing bitsandbytes on a CPU with AVX512-BF16 tries to
fetch a faster 4-bit kernel from the Hugging Face hub (the ``kernels`` package) and, offline
or untrusted, logs a warning and keeps its built-in kernel. weightcond never imports
bitsandbytes itself; the test suite imports it once through :func:`import_bitsandbytes`, which
turns that fetch off (``HF_HUB_OFFLINE``) while importing and records the message, so the
fallback is deliberate and visible rather than a stray warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine.frozen import OpaqueWeight, linear
from .errors import LayerTypeError
from .reshape import LayerKind, register_layer_kind, stored_weight

__all__ = ["BASES", "QUANTIZED_KINDS", "import_bitsandbytes", "is_quantized", "quantize",
           "quantized_bytes"]

#: rows dequantized at a time when a kind computes row norms or the whole matrix (bounds the
#: transient float memory at registration by ``_CHUNK`` elements)
_CHUNK = 1 << 22


def import_bitsandbytes() -> tuple[Any, list[str]]:
    """Import bitsandbytes with its hub kernel fetch off (Note (bitsandbytes' CPU kernel)):
    the module and the messages it logged while importing."""
    messages: list[str] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Record()
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    propagates = [logger.propagate for logger in loggers]
    with _environment(HF_HUB_OFFLINE="1"):
        for logger in loggers:
            logger.addHandler(handler)
            logger.propagate = False
        try:
            import bitsandbytes
        finally:
            for logger, propagate in zip(loggers, propagates):
                logger.removeHandler(handler)
                logger.propagate = propagate
    return bitsandbytes, messages


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bnb_class(name: str) -> type | None:
    module = sys.modules.get("bitsandbytes.nn.modules")
    return None if module is None else getattr(module, name, None)


def _row_sq(stored: Tensor, rows: Callable[[Tensor], Tensor], out: int, inner: int
            ) -> Callable[[], Tensor]:
    """``‖W_i‖²`` in float32, computed once in chunks of rows and kept on the stored tensor
    (a new quantized tensor gets its own)."""
    def compute() -> Tensor:
        found = stored.__dict__.get("_weightcond_row_sq")
        if found is None:
            step = max(1, _CHUNK // max(inner, 1))
            with torch.no_grad():
                parts = [rows(torch.arange(i, min(i + step, out), device=stored.device)
                              ).float().square().sum(-1) for i in range(0, out, step)]
            found = torch.cat(parts)
            stored.__dict__["_weightcond_row_sq"] = found
        return found  # type: ignore[no-any-return]
    return compute


# -- bitsandbytes 4-bit ---------------------------------------------------------------------------
def _is_4bit(layer: object) -> bool:
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(layer, cls)


def _absmax(state: Any) -> Tensor:
    """The blockwise scales of a 4-bit weight (dequantized first when nested)."""
    if not state.nested:
        return state.absmax  # type: ignore[no-any-return]
    import bitsandbytes.functional as bf

    return bf.dequantize_blockwise(state.absmax, state.state2) + state.offset  # type: ignore


def _rows_4bit(stored: Tensor) -> Callable[[Tensor], Tensor]:
    """``k`` rows of a 4-bit weight: their quantization blocks are gathered (still packed) and
    dequantized alone. A weight whose ``in`` is not a multiple of the block size is
    dequantized whole and indexed (its blocks straddle rows, and bitsandbytes' CPU kernel
    reads them per row, unlike the flat blocks it quantized: the layer's function, and so
    the frozen matrix, is that kernel's dequantization)."""
    import bitsandbytes.functional as bf

    state = stored.quant_state  # type: ignore[attr-defined]
    out, inner = state.shape
    block = state.blocksize
    if inner % block or inner % 2:
        return lambda idx: bf.dequantize_4bit(stored.data, state)[idx]  # type: ignore
    packed = stored.data.view(torch.uint8).reshape(out, inner // 2)
    absmax = _absmax(state).reshape(out, inner // block)

    def rows(idx: Tensor) -> Tensor:
        part = bf.QuantState(absmax=absmax[idx].reshape(-1).contiguous(),
                             shape=torch.Size((idx.numel(), inner)), code=state.code,
                             blocksize=block, quant_type=state.quant_type, dtype=state.dtype)
        return bf.dequantize_4bit(packed[idx], part)  # type: ignore[no-any-return]
    return rows


def _unpack_4bit(stored: Tensor) -> None:
    """Undo bitsandbytes' CPU inference packing, in place.

    Note (bitsandbytes' CPU inference packing): a ``Linear4bit`` whose own forward runs in
    eval mode without gradient on a CPU with AVX512-BF16 repacks its weight, once, into a
    layout for its fused kernel (``quant_state.packing_format_for_cpu``); dequantization and
    its training forward no longer read it correctly afterwards. The packing also rounds the
    blockwise scales to bfloat16 (and un-nests them): from then on that *is* the layer's
    weight. Before reading the weight (its own forward is never called once it is
    conditioned) we put the codes back in their layout with bitsandbytes' inverse
    (``_convert_weight_packed_for_cpu_inverse``) and keep the scales the packed kernel used,
    exactly, as float32 (bitsandbytes' inverse would quantize them once more when they were
    nested): the weight stays the function the layer computed."""
    state = stored.quant_state  # type: ignore[attr-defined]
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        scales = state.absmax  # (in / block, out), bfloat16
        state.original_nested = False  # the scales are restored here, not re-quantized
        data, state = _convert_weight_packed_for_cpu_inverse(stored.data, state)
        state.absmax = scales.mT.reshape(-1).float().contiguous()
        state.nested, state.offset, state.state2 = False, None, None
        stored.data, stored.quant_state = data, state  # type: ignore[attr-defined]


def _prepare_4bit(layer: nn.Module) -> None:
    _unpack_4bit(stored_weight(layer))


def _opaque_4bit(layer: nn.Module, stored: Tensor) -> OpaqueWeight:
    import bitsandbytes as bnb

    _unpack_4bit(stored)
    state = stored.quant_state  # type: ignore[attr-defined]
    out, inner = state.shape

    def product(x: Tensor) -> Tensor:
        compute = layer.compute_dtype or x.dtype  # type: ignore[attr-defined]
        return bnb.matmul_4bit(x.to(compute), stored.t(), quant_state=state).to(x.dtype)

    rows = _rows_4bit(stored)
    return OpaqueWeight(torch.Size((out, inner)), state.dtype, stored.device, product, rows,
                        _row_sq(stored, rows, out, inner))


def _compute_with(opaque: Callable[[nn.Module, Tensor], OpaqueWeight]
                  ) -> Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]:
    """A bitsandbytes kind's ``compute``: the stored quantized weight through the kind's
    :class:`~weightcond.engine.frozen.OpaqueWeight`, or a float weight (the dense conditioned
    one, :func:`weightcond.dense_forward`) as a plain ``F.linear``."""
    def compute(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if weight.is_floating_point():
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return linear(x, opaque(layer, weight), bias)
    return compute


def _dense_4bit(stored: Tensor) -> Tensor:
    import bitsandbytes.functional as bf

    _unpack_4bit(stored)
    return bf.dequantize_4bit(stored.data, stored.quant_state)  # type: ignore


# -- bitsandbytes 8-bit ---------------------------------------------------------------------------
def _is_8bit(layer: object) -> bool:
    cls = _bnb_class("Linear8bitLt")
    return cls is not None and isinstance(layer, cls)


def _scales_8bit(stored: Tensor) -> Tensor:
    scb = getattr(stored, "SCB", None)
    if scb is None:
        raise LayerTypeError("weightcond: argument 'layer' expected a Linear8bitLt with int8 "
                             "weights (has_fp16_weights=False, quantized by .to(device) or "
                             "BitsAndBytesConfig(load_in_8bit=True)), got one without row "
                             "scales")
    return scb  # type: ignore[no-any-return]


def _prepare_8bit(layer: nn.Module) -> None:
    """Keep the row scales on the weight: bitsandbytes' own forward moves them to
    ``layer.state`` (``init_8bit_state``); the dequantized view needs them with the tensor."""
    weight = stored_weight(layer)
    if weight.dtype != torch.int8:
        raise LayerTypeError(
            f"weightcond: argument 'layer' expected a Linear8bitLt with int8 weights "
            f"(has_fp16_weights=False, quantized by .to(device) or "
            f"BitsAndBytesConfig(load_in_8bit=True)), got one with {weight.dtype} weights")
    state = layer.state  # type: ignore[attr-defined]
    if getattr(weight, "SCB", None) is None and state.SCB is not None:
        weight.SCB = state.SCB
    if getattr(weight, "CB", None) is None:
        weight.CB = weight.data


def _dtype_8bit(layer: nn.Module) -> torch.dtype:
    bias = layer.bias
    return bias.dtype if isinstance(bias, Tensor) and bias.is_floating_point() else \
        torch.float32


def _opaque_8bit(layer: nn.Module, stored: Tensor) -> OpaqueWeight:
    import bitsandbytes as bnb

    _prepare_8bit(layer)
    scales = _scales_8bit(stored)
    out, inner = stored.shape
    dtype = _dtype_8bit(layer)

    def product(x: Tensor) -> Tensor:
        state = bnb.MatmulLtState()
        state.has_fp16_weights = False
        state.is_training = layer.training  # as the layer's own forward sets it
        state.threshold = layer.state.threshold  # type: ignore[attr-defined]
        state.CB, state.SCB = stored.data, scales
        return bnb.matmul(x, stored, state=state).to(x.dtype)

    def rows(idx: Tensor) -> Tensor:
        return (stored.data[idx].float() * (scales[idx, None].float() / 127)).to(dtype)

    return OpaqueWeight(torch.Size((out, inner)), dtype, stored.device, product, rows,
                        _row_sq(stored, rows, out, inner))




def _dense_8bit(stored: Tensor) -> Tensor:
    scales = _scales_8bit(stored)
    return stored.data.float() * (scales[:, None].float() / 127)


# -- torchao int8 ---------------------------------------------------------------------------------
def _torchao_int8(weight: object) -> bool:
    module = sys.modules.get("torchao.quantization")
    cls = None if module is None else getattr(module, "Int8Tensor", None)
    return cls is not None and isinstance(weight, cls)


def _is_torchao(layer: object) -> bool:
    return isinstance(layer, nn.Linear) and "torchao.quantization" in sys.modules and \
        _torchao_int8(stored_weight(layer))


def _torchao_grad(layer: nn.Module) -> bool:
    """Whether the layer gives its input a gradient (weight-only: yes; dynamic int8
    activations: no)."""
    return getattr(stored_weight(layer), "act_quant_kwargs", None) is None


def _rows_torchao(stored: Tensor) -> Callable[[Tensor], Tensor]:
    """``k`` rows of a torchao int8 weight: with blocks within rows (``block_size`` ``[1,
    b]``), the rows' codes, scales and zero points dequantized by torchao's own function;
    otherwise the whole weight dequantized and indexed."""
    block = list(getattr(stored, "block_size", []))
    if len(block) != 2 or block[0] != 1:
        return lambda idx: stored.dequantize()[idx]  # type: ignore[attr-defined,no-any-return]
    from torchao.quantization.quant_primitives import dequantize_affine

    qdata, scale = stored.qdata, stored.scale  # type: ignore[attr-defined]
    zero = getattr(stored, "zero_point", None)

    def rows(idx: Tensor) -> Tensor:
        return dequantize_affine(qdata[idx], block, scale[idx],  # type: ignore
                                 None if zero is None else zero[idx], torch.int8,
                                 output_dtype=stored.dtype)
    return rows


def _opaque_torchao(layer: nn.Module, stored: Tensor) -> OpaqueWeight:
    out, inner = stored.shape
    rows = _rows_torchao(stored)

    def product(x: Tensor) -> Tensor:
        return F.linear(x, stored)

    return OpaqueWeight(torch.Size((out, inner)), stored.dtype, stored.device, product, rows,
                        _row_sq(stored, rows, out, inner))


def _compute_torchao(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None
                     ) -> Tensor:
    return F.linear(x, weight, bias)


def _dense_torchao(stored: Tensor) -> Tensor:
    return stored.dequantize()  # type: ignore[attr-defined,no-any-return]


#: What :func:`quantize` makes of a ``Linear``: bitsandbytes NF4 or FP4 (4-bit, blocks of 64),
#: bitsandbytes LLM.int8() (``int8``), torchao int8 weight-only (``torchao-int8``).
BASES = ("nf4", "fp4", "int8", "torchao-int8")


def quantize(module: nn.Module, base: str, *, compute_dtype: torch.dtype | None = None,
             skip: Callable[[str, nn.Linear], bool] | None = None) -> nn.Module:
    """Replace every plain :class:`torch.nn.Linear` of ``module`` by its quantized form, in
    place (what transformers' ``BitsAndBytesConfig`` / ``TorchAoConfig`` do at loading, for a
    model already in memory), and return ``module``.

    Args:
        module: the model (or a ``Linear``'s parent); the layers must not be conditioned yet.
        base: one of :data:`BASES`.
        compute_dtype: the dtype a 4-bit layer computes in (default: its input's).
        skip: ``skip(name, layer)`` keeps a layer in float (a classifier head).

    Raises:
        weightcond.OptionError: an unknown ``base``.
        weightcond.StateError: a layer is conditioned already.
    """
    from .errors import OptionError, StateError

    if base not in BASES:
        raise OptionError(f"quantize: argument 'base' expected one of "
                          f"{', '.join(map(repr, BASES))}, got {base!r}")
    found = [(name, m) for name, m in module.named_modules()
             if type(m) is nn.Linear and not (skip is not None and skip(name, m))]
    conditioned = [name for name, m in module.named_modules()
                   if hasattr(m, "parametrizations")]
    if conditioned:
        raise StateError(f"quantize: argument 'module' expected layers not conditioned yet "
                         f"(quantize first, then condition), got {conditioned[0]!r} conditioned")
    if base == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        chosen = {id(m) for _, m in found}
        quantize_(module, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, name: id(m) in chosen)
        return module
    bnb, _ = import_bitsandbytes()
    for name, layer in found:
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
        if base == "int8":
            new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features,
                                      bias=bias is not None, has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(weight.to(torch.float16).contiguous(),
                                           requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(layer.in_features, layer.out_features,
                                    bias=bias is not None, compute_dtype=compute_dtype,
                                    quant_type=base)
            new.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False,
                                           quant_type=base)
        if bias is not None:
            new.bias = nn.Parameter(bias.clone(), requires_grad=False)
        new = new.to(weight.device)  # bitsandbytes quantizes when the weight is moved
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if parent is layer:  # module is the Linear itself: it cannot be replaced in place
            raise StateError("quantize: argument 'module' expected a model holding Linear "
                             "layers, got a Linear (quantize its parent)")
        setattr(parent, child, new)
    return module


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is of a quantized kind (conditioned or not)."""
    return any(kind.matches(layer) for kind in QUANTIZED_KINDS.values())


def quantized_bytes(module: nn.Module) -> int:
    """The bytes of the frozen weights of ``module``'s quantized layers (their quantized
    storage and scales), and of every other parameter and buffer as stored: what the base
    model occupies."""
    seen: set[tuple[int, int]] = set()  # (storage, offset): a tensor counted once
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        for part in _storage_parts(tensor):
            key = (part.untyped_storage().data_ptr(), part.storage_offset())
            if key not in seen:
                seen.add(key)
                total += part.numel() * part.element_size()
    return total


def _storage_parts(tensor: Tensor) -> list[Tensor]:
    state = getattr(tensor, "quant_state", None)
    if state is not None:  # 4-bit: packed codes and the blockwise scales
        parts = [tensor.data, state.absmax]
        if state.nested:
            parts.append(state.state2.absmax)
        return parts
    if _torchao_int8(tensor):
        return [tensor.qdata, tensor.scale]  # type: ignore[attr-defined]
    scb = getattr(tensor, "SCB", None)
    return [tensor.data] if scb is None else [tensor.data, scb]


# -- merge(..., requantize=True): the merged weight stored in the layer's own kind ---------------
def _requantize_4bit(layer: nn.Module, dense: Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    state = old.quant_state
    param = bnb.nn.Params4bit(dense.to(state.dtype).contiguous(), requires_grad=False,
                              quant_type=state.quant_type, blocksize=state.blocksize,
                              compress_statistics=state.nested, quant_storage=old.dtype)
    layer.weight = param.to(dense.device)


def _requantize_8bit(layer: nn.Module, dense: Tensor) -> None:
    import bitsandbytes as bnb

    param = bnb.nn.Int8Params(dense.to(torch.float16).contiguous(), requires_grad=False,
                              has_fp16_weights=False)
    layer.weight = param.to(dense.device)
    layer.state.CB = layer.state.SCB = None  # type: ignore[attr-defined]


def _requantize_torchao(layer: nn.Module, dense: Tensor) -> None:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    dynamic = layer.weight.act_quant_kwargs is not None
    layer.weight = nn.Parameter(dense.to(layer.weight.dtype).contiguous(), requires_grad=False)
    quantize_(layer, Int8DynamicActivationInt8WeightConfig() if dynamic
              else Int8WeightOnlyConfig())


#: The quantized kinds, by name (registered in :data:`weightcond.reshape.LAYER_KINDS`).
QUANTIZED_KINDS: dict[str, LayerKind] = {}

for _kind in (
    LayerKind(
        name="Linear4bit", description="bitsandbytes' Linear4bit (NF4, FP4)", matches=_is_4bit,
        to_matrix=_dense_4bit, from_matrix=lambda m, shape: m, compute=_compute_with(_opaque_4bit),
        matrix_free=True, opaque=_opaque_4bit, prepare=_prepare_4bit, family="Linear",
        dtype=lambda layer, w: w.quant_state.dtype, requantize=_requantize_4bit),  # type: ignore[attr-defined]
    LayerKind(
        name="Linear8bitLt", description="bitsandbytes' Linear8bitLt (int8)", matches=_is_8bit,
        to_matrix=_dense_8bit, from_matrix=lambda m, shape: m, compute=_compute_with(_opaque_8bit),
        matrix_free=True, opaque=_opaque_8bit, prepare=_prepare_8bit, family="Linear",
        dtype=lambda layer, w: _dtype_8bit(layer), requantize=_requantize_8bit),
    LayerKind(
        name="Int8Linear", description="torch.nn.Linear with a torchao int8 weight",
        matches=_is_torchao, to_matrix=_dense_torchao, from_matrix=lambda m, shape: m,
        compute=_compute_torchao, matrix_free=True, opaque=_opaque_torchao, family="Linear",
        dtype=lambda layer, w: w.dtype, input_grad=_torchao_grad,
        requantize=_requantize_torchao),
):
    QUANTIZED_KINDS[_kind.name] = register_layer_kind(_kind, before="Linear")
