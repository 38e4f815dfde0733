"""Train conditioned models data-parallel; run by ``test_distributed.py``.

Launched as ``python -m torch.distributed.run --nproc_per_node=2 distributed_worker.py OUT``
(gloo, CPU, loopback). For every preset in :data:`PRESETS` and every wrapper in
:data:`WRAPPERS` each rank trains :func:`build_model` on its half of every global batch of
:func:`batches`; rank 0 then writes ``OUT/<preset>-<wrapper>.pt`` with the full parameters
and gradients after the last step, the trained model's output on :func:`probe`, and the
output of a copy whose conditioned layers were merged with :func:`weightcond.merge`, and
saves the trained adapter with :func:`weightcond.save_adapter` to
``OUT/<preset>-<wrapper>-adapter``. The
pytest process compares them with :func:`train` on the full batches in one process.

* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`; rank 0 merges a deep copy
  of ``ddp.module``.
* ``fsdp2``: :func:`~torch.distributed.fsdp.fully_shard` on every conditioned layer, then
  on the model. The parametrized weight's ``original`` and the conditioners' parameters
  shard like any others; the matrix-free forward reads them unsharded inside FSDP's
  forward hooks. Merging needs the full tensors and a layer whose class is weightcond's:
  ``fully_shard`` swaps the layer's class for ``FSDP<class>``, after which
  :func:`weightcond.is_conditioned` (and parametrize's own removal, which restores
  ``__bases__[0]``) no longer see weightcond's class. So the full state dict is gathered
  to rank 0 and loaded into an unsharded replica, which is merged.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import weightcond as wc

from helpers import randomize

PRESETS = ("sora", "dora")
WRAPPERS = ("ddp", "fsdp2")
DIM = 16
GLOBAL_BATCH = 8  # split evenly over the ranks
STEPS = 3
DTYPE = torch.float64


def build_base() -> nn.Sequential:
    """The frozen base model: two ``DIM × DIM`` layers around a nonlinearity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM)).to(DTYPE)
    return model.requires_grad_(False)


def build_model(preset: str) -> nn.Sequential:
    """The base with both layers conditioned, the same on every rank."""
    model = build_base()
    for layer in (model[0], model[2]):
        wc.apply_preset(layer, preset, rank=4)
    randomize(model)
    # batched factors under the wrappers: DDP calls the model's forward (one batch of both
    # layers' rotations); under FSDP2 the layers' parameters are sharded DTensors when the
    # model's hook runs, so each layer computes its own
    wc.batch_factors(model)
    return model


def conditioned_layers(model: nn.Module) -> list[nn.Module]:
    return [model[0], model[2]]


def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` global batches ``(x, target)``, each ``(GLOBAL_BATCH, DIM)``."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield (torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=DTYPE),
               torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=DTYPE))


def probe() -> torch.Tensor:
    return torch.randn(5, DIM, generator=torch.Generator().manual_seed(2), dtype=DTYPE)


def train(model: nn.Module, *, rank: int = 0, world: int = 1) -> None:
    """``STEPS`` Adam steps on the mean squared error over this rank's rows of each batch;
    the gradients of the last step are kept."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for x, target in batches():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[rows]), target[rows]).backward()
        optimizer.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _merged_output(model: nn.Module) -> torch.Tensor:
    merged = copy.deepcopy(model)
    for layer in conditioned_layers(merged):
        wc.merge(layer)
    return merged(probe())


def run(preset: str, wrapper: str, rank: int, world: int, out: Path
        ) -> dict[str, object] | None:
    """Train under ``wrapper``; on rank 0 return what the test compares (collectives run on
    every rank)."""
    model = build_model(preset)
    if wrapper == "ddp":
        wrapped: nn.Module = DistributedDataParallel(model)
    else:
        for layer in conditioned_layers(model):
            fully_shard(layer)
        wrapped = fully_shard(model)
    train(wrapped, rank=rank, world=world)
    with torch.no_grad():
        output = wrapped(probe())  # FSDP's forward all-gathers: every rank runs it
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: _full(p.detach()) for n, p in trained}
    grads = {n: _full(p.grad) for n, p in trained}
    if wrapper == "ddp":
        replica = model
    else:
        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        replica = build_model(preset)
        if rank == 0:
            replica.load_state_dict(state)
    if rank != 0:
        return None
    wc.save_adapter(replica, out / f"{preset}-{wrapper}-adapter")  # after training, unsharded
    with torch.no_grad():
        return {"params": params, "grads": grads, "output": output,
                "replica_output": replica(probe()), "merged_output": _merged_output(replica),
                "sharded_layer_is_conditioned": wc.is_conditioned(model[0])}


def main(out: Path) -> None:
    # a hung collective fails after a minute instead of holding the test
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for preset in PRESETS:
            for wrapper in WRAPPERS:
                result = run(preset, wrapper, rank, world, out)
                if result is not None:
                    torch.save(result, out / f"{preset}-{wrapper}.pt")
                dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
