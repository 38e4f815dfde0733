"""Grid level: every cell of the design space — each transform of
:data:`weightcond.TRANSFORMS` × placement (pre, post) × side (left, right) — on one frozen
``nn.Linear`` with a rank-16 update plus that one conditioner, in a full training step
(forward, backward, AdamW step), interleaved with its peers in one process, the input
needing its gradient (a layer inside a model) and not (a first layer).

Each cell is reported against PEFT LoRA and against its *floor*: the frozen layer's forward
GEMM plus the GEMMs its gradients cannot avoid. A conditioner on the input side (right) that
has no thin form ``I + U Vᵀ`` needs the input-gradient GEMM ``g W`` for its own gradient
even when the input needs none (a rotation ``R``: ``∂R`` reads ``Wᵀ g``; a diagonal ``d``:
``∂d = diag(Wᵀ Gᵀ X)``, a full product); a thin one folds into the low-rank GEMMs
(``W (I + U Vᵀ) x = W x + (W U)(Vᵀ x)``), and a left one reads ``W x`` and ``g``. So the
floor is ``floor_fwd`` (the forward GEMM alone) or ``floor_fwd_input_grad`` (forward and
input-gradient GEMMs, what every cell needs when the input needs its gradient).

The transforms and their options come from the classes (:attr:`Transform.example_options`),
so a newly registered transform is benchmarked without editing this file; ``EXTRA`` adds
deliberate variants (butterfly with several factors).
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Settings,
    Wrap,
    interleaved_medians,
    spec_label,
    synchronize,
    training_step,
)

import weightcond as wc
from weightcond.errors import WeightcondError
from weightcond.profiling import step_peak_bytes

SHAPES = [(1024, 1024), (4096, 4096), (4096, 1024)]  # (out, in)
QUICK_SHAPES = [(128, 64)]
CELLS = [("pre", "left"), ("pre", "right"), ("post", "left"), ("post", "right")]
CASES = {"no_input_grad": False, "input_grad": True}
# deliberate variants beside each class's example options: (transform, extra options)
EXTRA: list[tuple[str, dict[str, object]]] = [("butterfly", {"factors": 2})]
# A candidate whose first step takes more than SLOW_RATIO × PEFT LoRA's first step and more
# than SLOW_S seconds is not timed: its first step's ratio is reported instead. Measured on
# this 2-core machine (contended) at 4096²: givens, the slowest structured cell, 6–7× (6 s);
# dense orthogonal (an O(n³) map per step), ours and geotorch's, about 20× (17 s). At 1024²
# the dense orthogonal takes 0.3–1 s a step, 6–13×: the seconds keep it timed there.
SLOW_RATIO = 12.0
SLOW_S = 3.0
REFERENCE = "peft_lora"
# our dense orthogonal's map -> geotorch's trivialization of the same map
GEOTORCH_TRIV = {"cayley": "cayley", "exp": "expm"}


def rows() -> list[tuple[str, str, dict[str, object]]]:
    """``(label, transform, options)`` for every registered transform with its class's
    example options, each followed by its extra variants."""
    found = []
    for name, cls in wc.TRANSFORMS.items():
        for options in [{}, *(extra for n, extra in EXTRA if n == name)]:
            options = {**cls.example_options, **options}
            found.append((spec_label(name, options), name, options))
    return found


def cell_key(placement: str, side: str) -> str:
    return f"{placement}-{side}"


def _thin(transform: nn.Module) -> bool:
    """Whether the transform is the identity plus a thin term (rank below half its side)."""
    with torch.no_grad():
        factors = transform.low_rank()
    return factors is not None and 2 * factors[0].shape[-1] < transform.dim


def floor_of(transform: nn.Module, side: str, input_grad: bool) -> str:
    """The floor candidate of a cell (see the module docstring)."""
    needs_input_gemm = input_grad or (side == "right" and not _thin(transform))
    return "floor_fwd_input_grad" if needs_input_gemm else "floor_fwd"


# -- candidates: each builder takes (layer, settings) and returns (module, floor or None) ----

def _peft(config_name: str, **options: Any):
    def build(layer: nn.Linear, s: Settings):
        import peft

        config = getattr(peft, config_name)(target_modules=["proj"], **options)
        if config_name == "LoraConfig":
            config.r, config.lora_alpha = s.rank, 2 * s.rank
        return peft.get_peft_model(Wrap(layer), config), None
    return build


class _ForwardOnly(nn.Module):
    """Not a method: the frozen layer's forward GEMM alone (no graph, no backward), the
    least a cell whose gradients need no ``(tokens × out × in)`` product can cost."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.layer(x)


class _InputGrad(nn.Module):
    """Not a method: the frozen layer's forward and input-gradient GEMMs (the input made a
    leaf that needs its gradient), the least a cell that needs ``g W`` can cost."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.detach().requires_grad_())


class _GeotorchCell(nn.Module):
    """Not ours: geotorch's own ``orthogonal`` on a separate bias-free ``nn.Linear(n, n)``,
    composed with the frozen layer and a LoRA computed as PEFT does (``B(A x)·s`` added to
    the layer's output), so that it computes the function of our orthogonal cell:

    * pre-right ``W (R x) + s B A x``, post-right ``(W + s B A)(R x)``;
    * pre-left ``R (W x) + s B A x + b``, post-left ``R (W x + s B A x) + b``.

    Its map is geotorch's trivialization of our default map, at the identity at the start
    as ours. The map runs in float32 in a bfloat16 run (geotorch's QR and solves have no
    bfloat16 CPU kernels; ours also solves in float32) and its result is cast to the run's
    dtype for the products."""

    def __init__(self, layer: nn.Linear, placement: str, side: str, s: Settings,
                 triv: str) -> None:
        import geotorch

        super().__init__()
        self.layer, self.placement, self.side = layer, placement, side
        n = layer.out_features if side == "left" else layer.in_features
        self.rotation = nn.Linear(n, n, bias=False, device=s.device, dtype=torch.float32)
        geotorch.orthogonal(self.rotation, "weight", triv=triv)
        self.rotation.weight = torch.eye(n, device=s.device)
        self.lora_A = nn.Linear(layer.in_features, s.rank, bias=False, device=s.device,
                                dtype=layer.weight.dtype)
        self.lora_B = nn.Linear(s.rank, layer.out_features, bias=False, device=s.device,
                                dtype=layer.weight.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.rotation.weight.to(x.dtype)
        w, b = self.layer.weight, self.layer.bias
        if self.side == "right":
            rx = F.linear(x, q)
            return F.linear(rx, w, b) + self.lora_B(self.lora_A(
                rx if self.placement == "post" else x)) * self.scaling
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        if self.placement == "pre":
            return F.linear(F.linear(x, w), q) + lora + b
        return F.linear(F.linear(x, w) + lora, q) + b


def _geotorch(placement: str, side: str, input_grad: bool):
    def build(layer: nn.Linear, s: Settings):
        cls = wc.TRANSFORMS["orthogonal"]
        ours = cls.example_options.get("map", inspect.signature(cls).parameters["map"].default)
        floor = "floor_fwd_input_grad" if input_grad or side == "right" else "floor_fwd"
        return _GeotorchCell(layer, placement, side, s, GEOTORCH_TRIV[str(ours)]), floor
    return build


def _cell(name: str, options: dict[str, object], placement: str, side: str, input_grad: bool):
    def build(layer: nn.Linear, s: Settings):
        wc.apply_preset(layer, "lora", rank=s.rank, alpha=2 * s.rank)
        conditioner = wc.register_conditioning(layer, placement=placement, side=side,
                                               transform=name, **options)
        return layer, floor_of(conditioner.transform, side, input_grad)
    return build


def candidates(input_grad: bool) -> dict[str, tuple[Callable, str, dict[str, str]]]:
    """name -> (builder, group, where): the peers, then every cell; ``where`` places a cell
    (or a peer that mirrors one) in the grid."""
    found: dict[str, tuple[Callable, str, dict[str, str]]] = {
        REFERENCE: (_peft("LoraConfig"), "peer", {}),
        "peft_oft_b32": (_peft("OFTConfig", r=0, oft_block_size=32), "peer", {}),
        "peft_oft_b32_exact": (_peft("OFTConfig", r=0, oft_block_size=32,
                                     use_cayley_neumann=False), "peer", {}),
        "floor_fwd_input_grad": (lambda layer, s: (_InputGrad(layer), None), "floor", {}),
    }
    if not input_grad:
        found["floor_fwd"] = (lambda layer, s: (_ForwardOnly(layer), None), "floor", {})
    if "orthogonal" in wc.TRANSFORMS:
        for placement, side in CELLS:
            found[f"geotorch_orthogonal|{cell_key(placement, side)}"] = (
                _geotorch(placement, side, input_grad), "peer",
                {"row": "geotorch orthogonal", "cell": cell_key(placement, side)})
    for label, name, options in rows():
        for placement, side in CELLS:
            found[f"{label}|{cell_key(placement, side)}"] = (
                _cell(name, options, placement, side, input_grad), "ours",
                {"row": label, "transform": name, "cell": cell_key(placement, side)})
    return found


def _build(builder: Callable, out_f: int, in_f: int, s: Settings, x: torch.Tensor,
           grad: torch.Tensor):
    """The candidate's step, its trainable parameter count and its floor."""
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, device=s.device, dtype=s.torch_dtype).requires_grad_(False)
    model, floor = builder(layer, s)
    if isinstance(model, _ForwardOnly):
        return (lambda: model(x)), 0, floor
    step, trainable = training_step(model, x, grad)
    return step, trainable, floor


def repeats_for(s: Settings, out_f: int, in_f: int) -> int:
    """Fewer repeats for larger layers: the settings' repeats at 1024², scaled by the square
    root of the size ratio (21 → 10 at 4096×1024, 5 at 4096²), at least 3."""
    if s.quick:
        return s.repeats
    return max(3, round(s.repeats * math.sqrt(1024 * 1024 / (out_f * in_f))))


def _timed(step: Callable[[], None], s: Settings) -> float:
    synchronize(s.device)
    start = time.perf_counter()
    step()
    synchronize(s.device)
    return time.perf_counter() - start


def run(s: Settings, shapes: list[tuple[int, int]], log: Callable[[str], None]) -> dict:
    results: dict[str, Any] = {"rows": [label for label, _, _ in rows()],
                               "cells": [cell_key(p, q) for p, q in CELLS],
                               "slow_ratio": SLOW_RATIO, "slow_s": SLOW_S, "shapes": {}}
    for out_f, in_f in shapes:
        key = f"{out_f}x{in_f}"
        repeats = repeats_for(s, out_f, in_f)
        timing = Settings(**{**s.__dict__, "repeats": repeats, "warmup": 1})
        per_shape: dict[str, Any] = {"repeats": repeats}
        slow: dict[str, dict[str, Any]] = {}  # too slow in one case: not probed again
        for case, input_grad in CASES.items():
            torch.manual_seed(1)
            x = torch.randn(s.tokens, in_f, device=s.device, dtype=s.torch_dtype,
                            requires_grad=input_grad)
            grad = torch.randn(s.tokens, out_f, device=s.device, dtype=s.torch_dtype)
            found = candidates(input_grad)
            log(f"grid {key} {case}: building {len(found)} candidates")
            steps, info, probes, not_run = {}, {}, {}, {}
            for name, (builder, group, where) in found.items():
                if name in slow:  # too slow in the first case: not built again
                    not_run[name] = {**where, "group": group, **slow[name]}
                    continue
                try:
                    step, trainable, floor = _build(builder, out_f, in_f, s, x, grad)
                except (WeightcondError, ValueError) as error:  # a cell the shape rules out
                    not_run[name] = {**where, "group": group,
                                     "reason": f"{type(error).__name__}: "
                                               f"{str(error).splitlines()[0]}"}
                    continue
                info[name] = {"group": group, **where, "trainable_parameters": trainable,
                              **({"floor": floor} if floor else {})}
                probes[name] = _timed(step, s)  # the first step: a probe and a warm-up
                ratio = probes[name] / probes[REFERENCE]
                if not s.quick and ratio > SLOW_RATIO and probes[name] > SLOW_S:
                    slow[name] = {"probe_s": probes[name], "probe_ratio_to_peft_lora": ratio,
                                  "reason": f"one step took {probes[name]:.1f} s = {ratio:.0f}× "
                                            f"PEFT LoRA's first step ({case}), over "
                                            f"{SLOW_RATIO:.0f}× and {SLOW_S:.0f} s: not "
                                            f"timed"}
                    not_run[name] = {**where, "group": group, **slow[name]}
                    log(f"  {name}: {slow[name]['reason']}")
                    del info[name], step
                    continue
                info[name]["probe_s"] = probes[name]
                info[name]["peak_bytes"] = step_peak_bytes(step)
                steps[name] = step
            times = interleaved_medians(steps, timing)
            del steps
            ref, ref_mem = times[REFERENCE]["median"], info[REFERENCE]["peak_bytes"]
            entry: dict[str, Any] = {"peers": {}, "cells": {}, "not_run": not_run}
            for name, t in times.items():
                e = {**info[name], "time_s": t, "time_ratio_to_peft_lora": t["median"] / ref,
                     "memory_ratio_to_peft_lora": info[name]["peak_bytes"] / ref_mem}
                if "floor" in e:
                    e["floor_ratio"] = t["median"] / times[e["floor"]]["median"]
                if "cell" in e:  # ours, and the peers that mirror a cell (geotorch)
                    entry["cells"].setdefault(e["row"], {})[e["cell"]] = e
                else:
                    entry["peers"][name] = e
            per_shape[case] = entry
            log(f"  {key} {case}: " + ", ".join(
                f"{n} {e['time_ratio_to_peft_lora']:.2f}" for n, e in entry["peers"].items()))
            for row, cells in entry["cells"].items():
                log(f"  {row}: " + ", ".join(
                    f"{c} {e['time_ratio_to_peft_lora']:.2f} ({e['floor_ratio']:.2f})"
                    for c, e in cells.items()))
            for name, why in not_run.items():
                if name not in slow:
                    log(f"  {name}: {why['reason']}")
        results["shapes"][key] = per_shape
    return results
