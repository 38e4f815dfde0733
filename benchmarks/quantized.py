"""Quantized frozen bases: one ``Linear`` quantized by bitsandbytes (NF4) and by torchao
(int8 weight-only), a full training step (forward, backward, AdamW) of every paper preset and
of the householder (``hra``) and block (``oft``) cells on it, against PEFT's LoRA (and DoRA,
where PEFT runs it) on the same quantized layer, in the same run.

Compute in bfloat16 by default for this level (``--dtype`` applies: bf16 is what a user runs
on a quantized base, and about 3× faster than float32 on CPUs with AMX). Peak memory is
counted by :func:`weightcond.profiling.step_peak_bytes`; the base's bytes by
:func:`weightcond.quantized.quantized_bytes`, against the float32 weight's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from common import Settings, interleaved_medians, training_step
from torch import nn

import weightcond as wc
from weightcond.profiling import step_peak_bytes
from weightcond.quantized import import_bitsandbytes, quantized_bytes

SHAPES = [(1024, 1024), (4096, 4096)]
QUICK_SHAPES = [(128, 128)]
BASES = ("nf4", "int8")

#: our candidates: name → (preset, options); rank and alpha are the run's
OURS: dict[str, tuple[str, dict[str, object]]] = {
    "lora": ("lora", {}), "dora": ("dora", {}), "pre_diag": ("pre_diag", {}),
    "sora": ("sora", {}), "hra (householder, 8)": ("hra", {"reflections": 8}),
    "oft (block, 32)": ("oft", {"block_size": 32}),
}


class Holder(nn.Module):
    """A model of one quantized layer named ``proj`` (what PEFT's ``target_modules``
    matches)."""

    def __init__(self, layer: nn.Module, four_bit: bool) -> None:
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = four_bit  # PEFT takes its bitsandbytes layer on this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def quantized_layer(base: str, out_features: int, in_features: int, dtype: torch.dtype
                    ) -> nn.Module:
    """A random ``Linear`` quantized to ``base``: ``nf4`` (bitsandbytes, compute in
    ``dtype``) or ``int8`` (torchao weight-only)."""
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, dtype=dtype).requires_grad_(False)
    if base == "nf4":
        bnb, _ = import_bitsandbytes()
        layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=dtype,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                         quant_type="nf4")
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        return layer.to("cpu")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = nn.Sequential(dense)
    quantize_(holder, Int8WeightOnlyConfig())
    return holder[0]


def candidates(base: str, s: Settings) -> dict[str, Callable[[nn.Module], nn.Module]]:
    import peft

    def theirs(dora: bool) -> Callable[[nn.Module], nn.Module]:
        def build(model: nn.Module) -> nn.Module:
            with warnings.catch_warnings():  # PEFT's torchao layer: merge() needs transformers
                warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
                return peft.get_peft_model(model, peft.LoraConfig(
                    r=s.rank, lora_alpha=2 * s.rank, target_modules=["proj"], use_dora=dora,
                    lora_dropout=0.0)).to(s.torch_dtype)
        return build

    def ours(preset: str, options: dict[str, object]) -> Callable[[nn.Module], nn.Module]:
        def build(model: nn.Module) -> nn.Module:
            values = dict(options)
            if wc.PRESETS[preset].update:
                values.update(rank=s.rank, alpha=2 * s.rank)
            wc.apply_preset(model.proj, preset, **values)
            return model
        return build

    found = {"peft_lora": theirs(False)}
    if base == "nf4":  # PEFT's DoRA runs on bitsandbytes (dequantizing every forward)
        found["peft_dora"] = theirs(True)
    found.update({name: ours(*spec) for name, spec in OURS.items()})
    return found


def run(s: Settings, shapes: list[tuple[int, int]], log: Callable[[str], None]) -> dict:
    results: dict[str, dict] = {}
    for base in BASES:
        for out_f, in_f in shapes:
            key = f"{base} {out_f}x{in_f}"
            layer = quantized_layer(base, out_f, in_f, s.torch_dtype)
            builders = candidates(base, s)
            log(f"quantized {key}: building {len(builders)} candidates")
            steps, trainable = {}, {}
            for name, build in builders.items():
                model = build(Holder(copy.deepcopy(layer), base == "nf4"))
                gen = torch.Generator().manual_seed(1)
                x = torch.randn(s.tokens, in_f, generator=gen).to(s.torch_dtype)
                grad = torch.randn(s.tokens, out_f, generator=gen).to(s.torch_dtype)
                steps[name], trainable[name] = training_step(model, x, grad)
            times = interleaved_medians(steps, s)
            ref = times["peft_lora"]["median"]
            entry: dict[str, dict] = {}
            for name, t in times.items():
                entry[name] = {"time_s": t, "time_ratio_to_peft_lora": t["median"] / ref,
                               "trainable_parameters": trainable[name],
                               "peak_bytes": step_peak_bytes(steps[name])}
            del steps
            ref_mem = entry["peft_lora"]["peak_bytes"]
            for e in entry.values():
                e["memory_ratio_to_peft_lora"] = e["peak_bytes"] / ref_mem
            if "peft_dora" in entry:
                dora = entry["peft_dora"]["time_s"]["median"]
                for e in entry.values():
                    e["time_ratio_to_peft_dora"] = e["time_s"]["median"] / dora
            results[key] = {"base": base, "shape": [out_f, in_f],
                            "base_bytes": quantized_bytes(layer),
                            "float32_bytes": (out_f * in_f + out_f) * 4,
                            "candidates": entry}
            log("  " + ", ".join(f"{n} {e['time_ratio_to_peft_lora']:.2f}"
                                 for n, e in entry.items()))
    return results
