"""The torch.distributed side of tests/test_torch_distributed.py, started by ``mpiexec -n N``
(MPI only starts the processes and names their ranks; torch.distributed talks over gloo through
a file store).  Trains one small model three ways, each rank on its own slice of every batch:

- ``ddp``: DistributedDataParallel + fastoptim.torch.AdamW (clipping on);
- ``zero``: torch's ZeroRedundancyOptimizer(optimizer_class=fastoptim.torch.AdamW);
- ``fsdp``: FSDP2 ``fully_shard`` (DTensor parameters, each rank a shard; with 3 ranks a
  parameter of 2 rows leaves one rank an empty shard) + fastoptim.torch.AdamW;
- ``ddp8`` / ``zero8``: the first two with ``state_dtype="int8"`` on a model whose first
  weight has 6400 elements (quantized: at least 4096);

and writes every rank's final parameters (the full tensors) to ``out/torch-n{N}-rank{r}.npz``,
with what FSDP2 refused (``refused/<kind>``, before any state is made): int8 state, and the
classes whose update needs whole parameters (LAMB, Muon, Adafactor, LBFGS).
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


INT8 = {"state_dtype": "int8"}  # (the cases ending in 8: a model with a quantized weight)


def width(case: str) -> int:
    return 64 if case.endswith("8") else 12


def make_model(case: str = "") -> Any:
    import torch

    torch.manual_seed(0)
    k, h = width(case), 100 if case.endswith("8") else 40
    return torch.nn.Sequential(torch.nn.Linear(k, h), torch.nn.Tanh(), torch.nn.Linear(h, 2))


def batch(t: int, rank: int, case: str = "") -> tuple[Any, Any]:
    """Rank `rank`'s slice of batch `t`."""
    import torch

    g = torch.Generator().manual_seed(1000 * t + rank)
    return torch.randn(8, width(case), generator=g), torch.randn(8, 2, generator=g)


def _run(case: str, rank: int, n: int) -> list[np.ndarray]:
    import torch
    import torch.distributed as dist

    import fastoptim.torch as ft

    model = make_model(case)
    kw = {**ADAMW, **(INT8 if case.endswith("8") else {})}
    if case.startswith("ddp"):
        net: Any = torch.nn.parallel.DistributedDataParallel(model)
        opt: Any = ft.AdamW(net.parameters(), **kw, max_grad_norm=CLIP)
    elif case.startswith("zero"):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=ft.AdamW, **kw)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        net = model
        opt = ft.AdamW(model.parameters(), **kw)
    for t in range(STEPS):
        x, y = batch(t, rank, case)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().numpy().copy())
    dist.barrier()
    return out


# FSDP2 configurations refused (``refused/<kind>`` in the output): what needs whole parameters
REFUSED = {
    "int8": ("AdamW", {**ADAMW, **INT8}),
    "lamb": ("LAMB", {}),
    "muon": ("Muon", {"adjust_lr_fn": "match_rms_adamw"}),
    "adafactor": ("Adafactor", {}),
    "lbfgs": ("LBFGS", {}),
}


def _fsdp_refused(rank: int, kind: str) -> str:
    """FSDP2 with configuration `kind` of REFUSED: the step's error, after checking that it
    made no state and changed no parameter (or "stepped")."""
    import torch
    from torch.distributed.fsdp import fully_shard

    import fastoptim.torch as ft

    case = "fsdp8" if kind == "int8" else "fsdp"
    model = make_model(case)
    fully_shard(model)
    params = list(model.parameters())  # (DTensors: fully_shard replaced them)
    cls, kw = REFUSED[kind]
    # (Muon takes matrices only: its weights, without the biases)
    opt = getattr(ft, cls)([p for p in params if p.ndim == 2] if kind == "muon" else params, **kw)
    x, y = batch(0, rank, case)

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    closure()
    before = [p.full_tensor().detach().clone() for p in model.parameters()]
    try:
        opt.step(closure) if kind == "lbfgs" else opt.step()
    except ValueError as e:
        assert not any(opt.state.values()), opt.state
        after = [p.full_tensor().detach() for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(after, before))
        return str(e)
    return "stepped"


def main() -> None:
    import torch.distributed as dist
    from mpi4py import MPI

    out = Path(sys.argv[1])
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=n)
    result = {}
    for case in ("ddp", "zero", "fsdp", "ddp8", "zero8"):
        for i, a in enumerate(_run(case, rank, n)):
            result[f"{case}/p{i}"] = a
    for kind in REFUSED:
        result[f"refused/{kind}"] = np.array(_fsdp_refused(rank, kind))
    np.savez(out / f"torch-n{n}-rank{rank}.npz", **result)
    dist.destroy_process_group()
    comm.Barrier()
    sys.stdout.flush()
    # (gloo's threads can abort the interpreter's exit: "terminate called without an active
    # exception"; everything is written, so leave without running exit handlers)
    os._exit(0)


if __name__ == "__main__":
    main()
