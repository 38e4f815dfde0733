"""The docs' complete example of a new transform, ``docs/examples/shear.py``, works through
the layer API and passes the registry-driven conformance tests.

Importing the example registers ``"shear"`` in :data:`weightcond.TRANSFORMS` for the rest of
the process, and a registry entry cannot be removed. So both checks run in a fresh
interpreter: the rest of the test run keeps the built-in registry, whatever the order.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import weightcond as wc

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
TESTS = ROOT / "tests"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(EXAMPLES), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, timeout=600)


def check_shear_through_the_layer_api() -> None:
    """Run in a fresh interpreter by :func:`test_shear_through_the_layer_api`."""
    import shear  # registers "shear"

    assert wc.TRANSFORMS["shear"] is shear.Shear
    torch.manual_seed(0)
    for side, placement in [("left", "pre"), ("left", "post"), ("right", "pre"),
                            ("right", "post")]:
        layer = torch.nn.Linear(10, 8).double().requires_grad_(False)
        x = torch.randn(6, 10, dtype=torch.float64)
        before = layer(x)
        wc.register_update(layer, rank=2)
        sh = wc.register_conditioning(layer, placement=placement, side=side,
                                      transform="shear", rank=2, condition_bias=side == "left")
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)  # identity at init
        assert sh.transform.dim == (8 if side == "left" else 10)
        opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            loss = (layer(x) - 1).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        q = sh.transform.matrix().detach()
        u, v = (f.detach() for f in sh.transform.low_rank())
        eye = torch.eye(q.shape[0], dtype=q.dtype)
        assert not torch.allclose(q, eye)  # it trained
        torch.testing.assert_close(v.T @ u, torch.zeros(2, 2, dtype=q.dtype), atol=1e-12,
                                   rtol=0)
        torch.testing.assert_close(torch.linalg.det(q), torch.tensor(1.0, dtype=q.dtype))
        torch.testing.assert_close(torch.linalg.inv(q), eye - u @ v.T)
        y = layer(x)
        with wc.dense_forward(layer):
            torch.testing.assert_close(layer(x), y)
        torch.testing.assert_close(wc.merge(layer)(x), y.detach())
    try:
        wc.register_conditioning(torch.nn.Linear(4, 4), transform="shear", rank=3)
    except wc.ShapeError as error:
        assert "shear: argument 'rank' expected an int <= 2" in str(error)
    else:
        raise AssertionError("rank 3 of 4 should raise ShapeError")


def test_shear_through_the_layer_api() -> None:
    result = run_python("import test_docs_examples as t; t.check_shear_through_the_layer_api()")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_conformance_tests_pick_up_shear() -> None:
    """The registry-driven tests of every transform and every cell run on ``shear`` once it
    is registered before collection, as the docs say."""
    result = run_python(
        "import sys, pytest, shear; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
        "'tests/test_transforms.py', 'tests/test_layer.py', '-k', 'shear']))")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 20, out[-3000:]
