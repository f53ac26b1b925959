"""The torch.distributed side of tests/test_torch_distributed.py, started by ``mpiexec -n N``
(MPI only starts the processes and names their ranks; torch.distributed talks over gloo through
a file store).  Trains one small model three ways, each rank on its own slice of every batch:

- ``ddp``: DistributedDataParallel + fastoptim.torch.AdamW (clipping on);
- ``zero``: torch's ZeroRedundancyOptimizer(optimizer_class=fastoptim.torch.AdamW);
- ``fsdp``: FSDP2 ``fully_shard`` (DTensor parameters, each rank a shard; with 3 ranks a
  parameter of 2 rows leaves one rank an empty shard) + fastoptim.torch.AdamW;

and writes every rank's final parameters (the full tensors) to ``out/torch-n{N}-rank{r}.npz``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

STEPS = 4
ADAMW = {"lr": 1e-2, "weight_decay": 0.1}
CLIP = 0.5  # the ddp case's max_grad_norm


def make_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 2))


def batch(t: int, rank: int) -> tuple[Any, Any]:
    """Rank `rank`'s slice of batch `t`."""
    import torch

    g = torch.Generator().manual_seed(1000 * t + rank)
    return torch.randn(8, 12, generator=g), torch.randn(8, 2, generator=g)


def _run(case: str, rank: int, n: int) -> list[np.ndarray]:
    import torch
    import torch.distributed as dist

    import fastoptim.torch as ft

    model = make_model()
    if case == "ddp":
        net: Any = torch.nn.parallel.DistributedDataParallel(model)
        opt: Any = ft.AdamW(net.parameters(), **ADAMW, max_grad_norm=CLIP)
    elif case == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=ft.AdamW, **ADAMW)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        net = model
        opt = ft.AdamW(model.parameters(), **ADAMW)
    for t in range(STEPS):
        x, y = batch(t, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().numpy().copy())
    dist.barrier()
    return out


def main() -> None:
    import torch.distributed as dist
    from mpi4py import MPI

    out = Path(sys.argv[1])
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=n)
    result = {}
    for case in ("ddp", "zero", "fsdp"):
        for i, a in enumerate(_run(case, rank, n)):
            result[f"{case}/p{i}"] = a
    np.savez(out / f"torch-n{n}-rank{rank}.npz", **result)
    dist.destroy_process_group()
    comm.Barrier()
    sys.stdout.flush()
    # (gloo's threads can abort the interpreter's exit: "terminate called without an active
    # exception"; everything is written, so leave without running exit handlers)
    os._exit(0)


if __name__ == "__main__":
    main()
