"""Data-parallel training of conditioned layers (two gloo ranks on CPU, loopback only):
DDP and FSDP2 give the parameters and gradients of one process on the full batch, and the
trained model, merged, computes what it computed before (see ``distributed_worker.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import weightcond as wc

import distributed_worker as worker
from helpers import PRESET_NAMES, make_layer

TIMEOUT_S = 120
RUNS = [(p, w) for p in worker.PRESETS for w in worker.WRAPPERS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    """Launch the two ranks once for every (preset, wrapper) and load rank 0's results."""
    out = tmp_path_factory.mktemp("distributed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               str(Path(worker.__file__)), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as run:
        try:
            stdout, stderr = run.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # torchrun starts each rank in a session of its own and ends them on SIGTERM
            # (SIGKILL after 30 s); the ranks hold the pipes until then
            run.terminate()
            try:
                stdout, stderr = run.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                run.kill()
                stdout, stderr = "", "(no output: the ranks outlived torchrun)"
            pytest.fail(f"the workers did not finish in {TIMEOUT_S} s\n{_logs(stdout, stderr)}")
    if run.returncode != 0:
        pytest.fail(f"the workers exited with {run.returncode}\n{_logs(stdout, stderr)}")
    loaded = {(p, w): torch.load(out / f"{p}-{w}.pt") for p, w in RUNS}
    for p, w in RUNS:
        loaded[p, w]["adapter"] = out / f"{p}-{w}-adapter"
    return loaded


def _logs(stdout: str, stderr: str) -> str:
    return f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, dict[str, torch.Tensor] | torch.Tensor]]:
    """One process, the full batches."""
    found = {}
    for preset in worker.PRESETS:
        model = worker.build_model(preset)
        worker.train(model)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            found[preset] = {"params": {n: p.detach() for n, p in trained},
                             "grads": {n: p.grad for n, p in trained},
                             "output": model(worker.probe())}
    return found


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # the ranks sum their halves in another order: an ulp of the largest entry per term
    # accumulated over the batch and the dimension (measured: at most 4 ulps)
    bound = worker.GLOBAL_BATCH * worker.DIM * torch.finfo(worker.DTYPE).eps
    torch.testing.assert_close(got, expected, rtol=0, atol=bound * expected.abs().max().item())


@pytest.mark.parametrize(("preset", "wrapper"), RUNS)
def test_matches_one_process_on_the_full_batch(results, references, preset: str,
                                              wrapper: str) -> None:
    got, expected = results[preset, wrapper], references[preset]
    for kind in ("params", "grads"):
        assert got[kind].keys() == expected[kind].keys()
        for name in expected[kind]:
            _close(got[kind][name], expected[kind][name])
    _close(got["output"], expected["output"])


@pytest.mark.parametrize(("preset", "wrapper"), RUNS)
def test_merged_after_training_computes_the_same(results, references, preset: str,
                                                 wrapper: str) -> None:
    got, expected = results[preset, wrapper], references[preset]
    _close(got["replica_output"], got["output"])
    _close(got["merged_output"], got["output"])
    _close(got["merged_output"], expected["output"])


@pytest.mark.parametrize("preset", worker.PRESETS)
def test_a_sharded_layer_is_still_conditioned(results, preset: str) -> None:
    assert results[preset, "fsdp2"]["sharded_layer_is_conditioned"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_output_is_not_a_view(name: str) -> None:
    """FSDP2 hooks a sharded module's output for its pre-backward all-gather, and an in-place
    op on a view output (``out += residual``) drops the hook; nn.Linear returns no view."""
    layer = make_layer(worker.DIM, worker.DIM, dtype=worker.DTYPE)
    wc.apply_preset(layer, name, **({"rank": 4} if wc.PRESETS[name].update else {}))
    for shape in ((3, worker.DIM), (2, 3, worker.DIM)):
        assert not layer(torch.randn(shape, dtype=worker.DTYPE))._is_view()


@pytest.mark.parametrize("preset, wrapper", RUNS)
def test_the_adapter_saved_after_training_reloads(results, preset: str, wrapper: str) -> None:
    """Saved on rank 0 from the unsharded model, loaded onto a fresh base in this process."""
    got = results[preset, wrapper]
    fresh = worker.build_base()
    wc.load_adapter(fresh, got["adapter"])
    with torch.no_grad():
        assert torch.equal(fresh(worker.probe()), got["replica_output"])
