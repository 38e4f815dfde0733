"""Layer level: one frozen ``nn.Linear``, conditioned; a full training step (forward,
backward, AdamW step) for PEFT peers and weightcond presets, interleaved in one process."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Settings, Wrap, interleaved_medians, training_step

import weightcond as wc
from weightcond.profiling import step_peak_bytes
from weightcond.transforms.block import _RotatedLinear, rotate_blocks

SHAPES = [(1024, 1024), (4096, 4096), (4096, 1024)]  # (out, in)
QUICK_SHAPES = [(256, 256)]


def _peft(config_name: str, **options) -> Callable[[Wrap, Settings], nn.Module]:
    def build(model: Wrap, s: Settings) -> nn.Module:
        import peft

        config = getattr(peft, config_name)(target_modules=["proj"], **options)
        if config_name == "LoraConfig":
            config.r, config.lora_alpha = s.rank, 2 * s.rank
        return peft.get_peft_model(model, config)
    return build


def _full(model: Wrap, s: Settings) -> nn.Module:
    model.requires_grad_(True)
    return model


def _floor(model: Wrap, s: Settings) -> nn.Module:
    """Not a method: the frozen layer's own forward and input-gradient GEMM, the least any
    method whose gradient must pass through ``W`` (OFT, HRA on the input side) can cost."""
    return _InputGrad(model)


class _InputGrad(nn.Module):
    def __init__(self, model: Wrap) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.detach().requires_grad_())


def _block_kernels(form: str) -> Callable[[Wrap, Settings], nn.Module]:
    def build(model: Wrap, s: Settings) -> nn.Module:
        return _BlockKernels(model, form)
    return build


class _BlockKernels(nn.Module):
    """Not a method: the kernels of weightcond's 32-blocks rotation with the blocks fixed (no
    Cayley map, no parametrization, no optimizer step), the least that rotation costs through
    them. ``form="weight"`` forms ``W R`` and reads the blocks' gradient off ``gᵀx`` (what
    ``block_b32`` runs here, :meth:`weightcond.transforms.Block.rotated_linear`);
    ``"activations"`` rotates the input and then runs the layer (as PEFT OFT does). Either
    way the gradient reaches the blocks."""

    BLOCK = 32

    def __init__(self, model: Wrap, form: str) -> None:
        super().__init__()
        self.model, self.form = model, form
        weight = model.proj.weight
        generator = torch.Generator().manual_seed(0)
        q = torch.linalg.qr(torch.randn(weight.shape[1] // self.BLOCK, self.BLOCK, self.BLOCK,
                                        generator=generator, dtype=torch.float64))[0]
        # a plain tensor, not a parameter: the step has no optimizer
        self.blocks = q.to(weight.device, weight.dtype).requires_grad_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.blocks.grad = None
        proj = self.model.proj
        if self.form == "weight":
            return _RotatedLinear.apply(x, proj.weight, proj.bias, self.blocks)
        return F.linear(rotate_blocks(x, self.blocks), proj.weight, proj.bias)


def _preset(name: str, **options) -> Callable[[Wrap, Settings], nn.Module]:
    def build(model: Wrap, s: Settings) -> nn.Module:
        wc.apply_preset(model.proj, name, rank=s.rank, alpha=2 * s.rank, **options)
        return model
    return build


def _right(transform: str, **options) -> Callable[[Wrap, Settings], nn.Module]:
    def build(model: Wrap, s: Settings) -> nn.Module:
        wc.register_conditioning(model.proj, side="right", transform=transform, **options)
        return model
    return build


# name -> (builder, group); peers first, PEFT LoRA is the reference of every ratio
CANDIDATES: dict[str, tuple[Callable[[Wrap, Settings], nn.Module], str]] = {
    "peft_lora": (_peft("LoraConfig"), "peer"),
    "peft_dora": (_peft("LoraConfig", use_dora=True), "peer"),
    "peft_oft_b32": (_peft("OFTConfig", r=0, oft_block_size=32), "peer"),
    "peft_oft_b32_exact": (_peft("OFTConfig", r=0, oft_block_size=32,
                                 use_cayley_neumann=False), "peer"),
    "peft_hra_r8": (_peft("HRAConfig", r=8), "peer"),
    "full_finetune": (_full, "peer"),
    "floor_fwd_input_grad": (_floor, "floor"),
    "kernels_block_b32_weight": (_block_kernels("weight"), "floor"),
    "kernels_block_b32_activations": (_block_kernels("activations"), "floor"),
    "lora": (_preset("lora"), "ours"),
    "dora": (_preset("dora"), "ours"),
    "pre_diag": (_preset("pre_diag"), "ours"),
    "sora_cayley": (_preset("sora", map="cayley"), "ours"),
    "sora_exp": (_preset("sora", map="exp"), "ours"),
    "sora_first_order": (_preset("sora", map="first_order"), "ours"),
    "block_b32": (_right("block", block_size=32), "ours"),
    "block_b32_neumann": (_right("block", block_size=32, map="cayley_neumann"), "ours"),
    "householder_k8": (_right("householder", reflections=8), "ours"),
    "givens": (_right("givens"), "ours"),
    # like against like, not targets: an input that needs its gradient (a layer inside a
    # model), where ours rotates the activations as PEFT does
    "peft_oft_b32_input_grad": (_peft("OFTConfig", r=0, oft_block_size=32), "peer"),
    "block_b32_input_grad": (_right("block", block_size=32), "ours"),
}
INPUT_GRAD = {"peft_oft_b32_input_grad", "block_b32_input_grad"}


def build(name: str, out_features: int, in_features: int, s: Settings):
    """The candidate's model, its optimizer, an input and an output gradient."""
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, device=s.device, dtype=s.torch_dtype)
    layer.requires_grad_(False)
    model = CANDIDATES[name][0](Wrap(layer), s)
    x = torch.randn(s.tokens, in_features, device=s.device, dtype=s.torch_dtype,
                    requires_grad=name in INPUT_GRAD)
    grad = torch.randn(s.tokens, out_features, device=s.device, dtype=s.torch_dtype)
    return training_step(model, x, grad)


def run(s: Settings, shapes: list[tuple[int, int]], log: Callable[[str], None]) -> dict:
    results: dict[str, dict] = {}
    for out_f, in_f in shapes:
        key = f"{out_f}x{in_f}"
        log(f"layer {key}: building {len(CANDIDATES)} candidates")
        steps, trainable = {}, {}
        for name in CANDIDATES:
            steps[name], trainable[name] = build(name, out_f, in_f, s)
        times = interleaved_medians(steps, s)
        ref = times["peft_lora"]["median"]
        entry = {}
        for name, t in times.items():
            entry[name] = {"group": CANDIDATES[name][1], "time_s": t,
                           "time_ratio_to_peft_lora": t["median"] / ref,
                           "trainable_parameters": trainable[name],
                           "peak_bytes": step_peak_bytes(steps[name])}
        del steps
        ref_mem = entry["peft_lora"]["peak_bytes"]
        for name in CANDIDATES:
            entry[name]["memory_ratio_to_peft_lora"] = entry[name]["peak_bytes"] / ref_mem
        results[key] = entry
        log("  " + ", ".join(f"{n} {e['time_ratio_to_peft_lora']:.2f}" for n, e in
                             entry.items()))
    return results
