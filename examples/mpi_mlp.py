"""Train the demo's NumPy MLP data-parallel over MPI with fastoptim.distributed.DataParallel.

Every rank holds the whole model and the same Adam state; each global batch of 60 samples is
split into one contiguous slice per rank, each rank writes the gradient of its slice into the
optimizer's buffers, and ``dp.step()`` replaces them with their mean over the ranks (the mean
of the slices' means: the batch's mean gradient, up to rounding) before the Adam step.  The
ranks therefore follow the one-process run of the same batches, and end at the same loss.

Run:  mpiexec -n 2 python -m mpi4py examples/mpi_mlp.py      (python examples/mpi_mlp.py: one)
Data: scikit-learn's digits, the ``fastoptim demo`` problem, when scikit-learn is installed;
else a synthetic problem of the same shape (64 features, 10 classes).
"""

import importlib.util

import numpy as np
from mpi4py import MPI

import fastoptim as fo
from fastoptim.apps.mlp import MLP
from fastoptim.distributed import DataParallel

comm = MPI.COMM_WORLD
rank, ranks = comm.Get_rank(), comm.Get_size()
BATCH, EPOCHS = 60, 3
assert BATCH % ranks == 0, f"run with a number of ranks that divides {BATCH}"

if importlib.util.find_spec("sklearn") is not None:
    from fastoptim.apps.demo import load_digits

    data = load_digits(seed=0)
    x, y, name = data.x_train, data.y_train, "digits"
else:  # ten Gaussian clusters in 64 dimensions
    gen = np.random.default_rng(1)
    centres = gen.standard_normal((10, 64))
    y = gen.integers(0, 10, 1440)
    x = (centres[y] + 1.5 * gen.standard_normal((1440, 64))).astype(np.float32)
    name = "synthetic"

# The demo's MLP (64 -> 128 -> 128 -> 10), initialised alike on every rank (DataParallel would
# broadcast rank 0's parameters anyway).
net = MLP([x.shape[1], 128, 128, 10], rng=np.random.default_rng([0, 1]))
dp = DataParallel(fo.Adam(net.params, lr=1e-3), comm)
grads = dp.grads  # the optimizer's own buffers: the backward pass writes into them

shuffle = np.random.default_rng([0, 2])  # the same batches on every rank
steps = 0
for epoch in range(EPOCHS):
    perm = shuffle.permutation(len(y))
    for start in range(0, len(y) - BATCH + 1, BATCH):
        batch = perm[start : start + BATCH]
        mine = np.array_split(batch, ranks)[rank]  # this rank's slice
        net.loss_and_grad(x[mine], y[mine], out=grads)
        dp.step()  # mean gradient over the ranks, then Adam
        steps += 1
    if rank == 0:
        print(f"epoch {epoch + 1}  loss {net.loss(x, y):.6f}")

if rank == 0:
    print(f"data: {name}, {ranks} rank(s), {steps} steps of {BATCH} samples")
    print(f"bytes sent per step by rank 0: {dp.bytes_sent // steps} (formula {dp.bytes_per_step})")
    print(f"final loss: {net.loss(x, y):.6f}")
