"""The benchmark suite runs end to end (a smoke run: tiny shapes, no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
            "dora", "pre_diag", "sora_cayley", "block_b32", "householder_k8"} <= set(layer)
    assert all(e["time_s"]["median"] > 0 and e["peak_bytes"] > 0 for e in layer.values())
    assert (tmp_path / "cpu-float32-quick.png").stat().st_size > 0
    report = (tmp_path / "cpu-float32-quick.md").read_text()
    assert "### Targets" in report and "MiniLM" in report
