"""Gradient transforms: helpers for the options every optimizer has.

The options themselves (``max_grad_norm``, ``max_grad_value``, ``skip_nonfinite``,
``ema_decay``, and the step's ``grad_scale``) are documented in
:mod:`fastoptim.engine.transforms`.  Here: the reductions that make clipping and skipping see
every process's gradients when the parameters are split between processes (sharded optimizers,
FSDP, pipeline stages), to set as an optimizer's ``reduce_grad_stats``::

    opt = fastoptim.torch.AdamW(shard_params, lr=1e-3, max_grad_norm=1.0)
    opt.reduce_grad_stats = fastoptim.transforms.torch_all_reduce()

Each process then clips with the global norm of all processes' gradients, as one process
holding every parameter would (up to the order of the floating-point sum across processes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .engine.transforms import Reduce

__all__ = ["Reduce", "mpi_all_reduce", "torch_all_reduce"]


def torch_all_reduce(group: Any = None) -> Reduce:
    """A ``reduce_grad_stats`` that sums the statistics over the processes of a
    ``torch.distributed`` process group (default: the world) with ``all_reduce`` (any backend
    whose tensors live on the CPU, e.g. gloo; for NCCL, move them to the device yourself)."""
    import torch
    import torch.distributed as dist

    def reduce(stats: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.array(stats, dtype=np.float64))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        out: np.ndarray = t.numpy()
        return out

    return reduce


def mpi_all_reduce(comm: Any) -> Reduce:
    """A ``reduce_grad_stats`` that sums the statistics over the processes of an mpi4py
    communicator (``Allreduce`` with ``MPI.SUM``)."""

    def reduce(stats: np.ndarray) -> np.ndarray:
        send = np.array(stats, dtype=np.float64)
        out = np.empty_like(send)
        comm.Allreduce(send, out)  # (MPI.SUM is mpi4py's default op)
        return out

    return reduce
