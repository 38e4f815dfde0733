"""The benchmark suite runs end to end (a smoke run: tiny shapes, no timing assertions)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """A module of ``benchmarks/`` (a folder of scripts, not a package), imported by name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_quick_benchmark_runs_every_level(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--repeats", "1",
         "--output", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "cpu-float32-quick.json").read_text())
    assert {"environment", "layer", "transforms", "model", "targets"} <= set(data)
    layer = next(iter(data["layer"].values()))
    assert {"peft_lora", "peft_dora", "peft_oft_b32", "peft_hra_r8", "full_finetune", "lora",
            "dora", "pre_diag", "sora_cayley", "block_b32", "householder_k8",
            "floor_fwd_input_grad", "kernels_block_b32_weight",
            "kernels_block_b32_activations"} <= set(layer)
    assert all(e["time_s"]["median"] > 0 and e["peak_bytes"] > 0 for e in layer.values())
    block = next(t for t in data["targets"] if "block_b32 time" in t["description"])
    assert {"floor_ratio", "kernel_floor_ratio"} <= set(block)
    assert (tmp_path / "cpu-float32-quick.png").stat().st_size > 0
    report = (tmp_path / "cpu-float32-quick.md").read_text()
    assert "### Targets" in report and "MiniLM" in report


def test_block_kernel_floors_compute_the_rotation_and_its_gradient() -> None:
    """The two kernel floors run the whole rotation: the same output and blocks' gradient as
    the dense ``x (W R)ᵀ + b``, in float64."""
    layer = _bench_module("layer")
    import torch

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(10, 64, dtype=torch.float64)
    grad = torch.randn(10, 48, dtype=torch.float64)
    for form in ("weight", "activations"):
        floor = layer._BlockKernels(layer.Wrap(linear), form)
        q = floor.blocks.detach().requires_grad_()
        dense = x @ (linear.weight @ torch.block_diag(*q)).mT + linear.bias
        dense.backward(grad)
        out = floor(x)
        torch.testing.assert_close(out, dense)
        out.backward(grad)
        torch.testing.assert_close(floor.blocks.grad, q.grad)
        assert floor.blocks.grad.abs().sum() > 0


def _block_entry(**ms: float) -> dict:
    names = {"ours": "block_b32", "peft": "peft_oft_b32", "floor": "floor_fwd_input_grad",
             "kernels": "kernels_block_b32_weight"}
    return {names[k]: {"time_s": {"median": v / 1e3}} for k, v in ms.items()}


def test_block_floor_notes_account_for_the_margin_above_the_floor() -> None:
    """RESULTS.md's block notes: between the floor and the kernels, the FLOPs at the GEMMs'
    rate against what the kernels add; below the floor, no kernel accounting."""
    report = _bench_module("report")
    env = {"environment": {"settings": {"tokens": 2048}}}
    kernels_above = report._floor_notes(
        {**env, "layer": {"1024x1024": _block_entry(ours=54.0, peft=56.4, floor=49.2,
                                                    kernels=51.5)}})
    text = "\n".join(kernels_above)
    assert "0.90 × PEFT OFT would be 50.8 ms, 1.6 ms above the floor" in text
    assert "out of reach with these kernels" in text
    # 8.6 GFLOP in 49.2 ms; 0.134 GFLOP of rotation; 2.3 ms of kernels over the floor
    assert "(175 GFLOP/s)" in text and "would take 0.77 ms of those 1.6 ms" in text
    assert "add 2.3 ms to the floor, an effective 58 GFLOP/s" in text

    kernels_below = "\n".join(report._floor_notes(
        {**env, "layer": {"1024x1024": _block_entry(ours=50.0, peft=56.4, floor=49.2,
                                                    kernels=50.1)}}))
    # timing noise can put ours under its own kernels: said as it is, not as "-0.1 ms above"
    assert "; ours is 0.1 ms below them." in kernels_below
    assert "GFLOP/s" not in kernels_below

    below_floor = "\n".join(report._floor_notes(
        {**env, "layer": {"4096x4096": _block_entry(ours=845.9, peft=846.5, floor=796.3,
                                                    kernels=837.0)}}))
    assert "below the floor: out of reach" in below_floor
    assert "kernels with the blocks fixed" not in below_floor
