"""Scale-out for NumPy programs over MPI (`mpi4py <https://mpi4py.readthedocs.io>`_):
data-parallel training and a ZeRO-1 sharded optimizer, bit-identical to one process.

Install with ``pip install 'fastoptim[mpi]'`` (mpi4py and the MPICH wheels from PyPI, or mpi4py
over your cluster's MPI) and start the program with ``mpiexec -n N python -m mpi4py train.py``
(``-m mpi4py`` makes an uncaught exception on one rank abort every rank instead of leaving the
others waiting).  Every class here is **collective**: every rank of the communicator must
construct it and call its collective methods (``step``, ``check``, ``save``, ``load``...) in
the same order.

:class:`DataParallel`
    Wraps any NumPy-tier optimizer: the ranks hold the same parameters and optimizer state,
    each writes the gradient of its own batch into ``opt.grads``, and :meth:`DataParallel.step`
    replaces them with their mean over the ranks, then steps.  The reduction runs over the
    optimizer's own contiguous gradient block of each parameter group (no packing), in
    buckets of at most ``bucket_bytes``.
:class:`ZeroRedundancyOptimizer`
    ZeRO stage 1: the parameters (and the full gradients) are replicated, the optimizer
    state is not.  Each parameter group's elements, flattened and concatenated in parameter
    order, are split into `N` contiguous ranges; rank `r` keeps the state of range `r` only
    and steps it, with an ordinary fastoptim optimizer over zero-copy 1-D views of the
    parameter pieces it owns (so every optimizer, option, schedule and precision policy
    works), then the parameters are all-gathered.  Checkpoints are written per shard and
    re-sharded when loaded with another number of ranks.

**Deterministic reduction.**  The mean gradient is never left to ``MPI_Allreduce`` (whose
summation order depends on the MPI library, the algorithm it picks and the message size).
Each bucket is reduce-scattered with ``MPI_Alltoallv`` (rank `r` receives every rank's copy of
its chunk), summed on rank `r` **in rank order** and divided by `N`:
``mean = (((g_0 + g_1) + g_2) + ... + g_{N-1}) / N`` computed in the gradient's dtype (in
float32 for bfloat16 and float16 gradients, rounded once to nearest at the end), then
all-gathered (``MPI_Allgatherv``: no arithmetic).  The result is therefore bit-identical on
every rank, for any MPI implementation and any ``bucket_bytes``, and to one process computing
the same expression; the optimizer step that follows is the same kernel on the same bits, so
training with `N` ranks is bit-identical to one process stepping on that mean gradient.  (With
``grad_reduction="sum"`` the division is left out.)

**Bytes sent per step** (what each class passes to MPI, counted in :attr:`DataParallel.bytes_sent`):
for a group of `S` gradient bytes, rank `r` owning `c_r` bytes of it sends ``S - c_r`` bytes in
the reduce-scatter and ``(N - 1) c_r`` in the all-gather; the ranks together send
``2 (N - 1) S``, ``2 (N - 1) / N * S`` per rank on average, which is what a ring all-reduce
sends.  ZeRO-1 sends the same: ``S - c_r`` of gradients and ``(N - 1) c_r`` of parameters (of
the parameters' dtype); with ``grad_reduction="none"`` (gradients already identical on every
rank) only the parameters' all-gather, ``(N - 1) / N * S`` per rank on average.
:func:`bytes_per_step` evaluates these formulas.

**Consistency checks.**  Construction and the first step exchange a signature of every rank's
setup (the optimizer class, every parameter's key, dtype and shape, every group's
hyper-parameters and schedules, ``bucket_bytes`` and ``grad_reduction``); any difference, or an
exception on one rank while it builds its part, raises :class:`DistributedError` on **every**
rank (naming the ranks and the differing entries) instead of leaving the others blocked in a
collective.  Call :meth:`DataParallel.check` / :meth:`ZeroRedundancyOptimizer.check` on every
rank after changing hyper-parameters to check again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import secrets
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, TypeVar

import numpy as np

import fastoptim.engine.optimizer

from . import _core, checkpoint
from .engine.closure import ClosureOptimizer
from .engine.optimizer import Grads, Optimizer, Params, _dtype
from .engine.precision import QUANT_KINDS
from .engine.readonly import GRADS_HINT, ReadOnlyDict, ReadOnlyList
from .schedules import _to_data
from .transforms import mpi_all_reduce

__all__ = [
    "DataParallel",
    "ZeroRedundancyOptimizer",
    "DistributedError",
    "bytes_per_step",
    "DEFAULT_BUCKET_BYTES",
]

#: Default bucket size: the most bytes of one parameter group reduced by one collective call.
DEFAULT_BUCKET_BYTES = 16 << 20
_MAX_BUCKET_BYTES = 1 << 30  # MPI counts are C ints: stay well below 2**31 bytes
_MANIFEST = "manifest.json"
_SHARD = re.compile(r"shard-\d{5}-of-\d{5}-[0-9a-f]{12}\.npz")
_ZERO_FORMAT = "fastoptim.zero/1"

Reduction = Literal["mean", "sum"]
ZeroReduction = Literal["mean", "sum", "none"]
_T = TypeVar("_T")


class DistributedError(ValueError):
    """Raised on every rank when the ranks' setups differ (shapes, dtypes, options) or when
    one rank failed in a collective operation's local part (validating gradients, reading a
    checkpoint shard): the message names the ranks and what differs or failed."""


def _mpi() -> Any:
    """The ``mpi4py.MPI`` module, imported when first needed."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            "fastoptim.distributed needs mpi4py and an MPI library: pip install "
            "'fastoptim[mpi]' (mpi4py and MPICH from PyPI), or install mpi4py built "
            f"against your cluster's MPI ({e})"
        ) from e
    return MPI


def bytes_per_step(
    nbytes: int, world_size: int, kind: Literal["data_parallel", "zero1", "zero1_no_reduce"]
) -> float:
    """Bytes each rank sends per step, on average over the ranks, for `nbytes` bytes of
    gradients (and as many of parameters) on `world_size` ranks: ``2 (N-1)/N * nbytes`` for
    ``"data_parallel"`` and ``"zero1"`` (reduce-scatter + all-gather), ``(N-1)/N * nbytes``
    for ``"zero1_no_reduce"`` (the parameters' all-gather only).  The exact count per rank
    (alignment padding, uneven ranges) is :attr:`DataParallel.bytes_per_step`."""
    n = int(world_size)
    if n < 1:
        raise ValueError(f"bytes_per_step: world_size must be >= 1, got {world_size!r}")
    if kind in ("data_parallel", "zero1"):
        return 2 * (n - 1) / n * nbytes
    if kind == "zero1_no_reduce":
        return (n - 1) / n * nbytes
    raise ValueError(f"bytes_per_step: unknown kind {kind!r}")


# ------------------------------------------------------------------------ agreement
def _agree(comm: Any, where: str, local: Callable[[], _T]) -> _T:
    """Run `local` on every rank, then exchange the outcome (one ``allgather``): if it raised
    the same error on every rank, raise it as is everywhere; if it raised on some ranks (or
    differently), raise :class:`DistributedError` on every rank naming them."""
    result: _T = _agree_all(comm, where, local, share=False)[comm.Get_rank()]
    return result


def _agree_all(comm: Any, where: str, local: Callable[[], _T], share: bool = True) -> list[_T]:
    """:func:`_agree`, returning every rank's result (`share`: `local` returns a small
    picklable value, exchanged in the same ``allgather``; else only this rank's is filled)."""
    error: Exception | None = None
    result: Any = None
    try:
        result = local()
    except Exception as e:  # reported to every rank below, then raised
        error = e
    gathered = comm.allgather(
        (None if error is None else f"{type(error).__name__}: {error}", result if share else None)
    )
    outcomes = [msg for msg, _ in gathered]
    failed = [(r, msg) for r, msg in enumerate(outcomes) if msg is not None]
    if error is not None and len(set(outcomes)) == 1:
        raise error  # the same error on every rank (an invalid option...): as is
    if failed:
        lines = "\n  - ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise DistributedError(f"{where} failed on {len(failed)} rank(s):\n  - {lines}") from error
    results: list[Any] = [res for _, res in gathered]
    results[comm.Get_rank()] = result
    return results


def _take_grads(
    comm: Any,
    where: str,
    grads: Grads | None,
    copy: Callable[[Grads], None],
    ready: Callable[[], None],
    opt: Optimizer,
) -> bool:
    """A step's `grads` argument on every rank (one ``allgather``, whether given or not, so
    the ranks stay in step): copied by `copy` where given, then `ready()` (what the step will
    check: it must not fail on some ranks only once the collectives begin);
    :class:`DistributedError` on every rank if some ranks passed gradients and others None,
    or if a copy or check failed anywhere.  The same ``allgather`` carries a digest of `opt`'s
    hyper-parameters and step counts: whether every rank's is the same (if not, the caller
    runs the full check, which names what differs)."""

    def local() -> tuple[bool, bytes]:
        if grads is not None:
            copy(grads)
        ready()
        return grads is not None, _digest(opt)

    outcomes = _agree_all(comm, where, local)
    given = [g for g, _ in outcomes]
    if len(set(given)) > 1:
        ranks = [r for r, g in enumerate(given) if g]
        raise DistributedError(
            f"{where}: gradients were passed on rank(s) {ranks} and not on the others: pass "
            "them on every rank, or on none (the gradient buffers then hold them)"
        )
    return len({d for _, d in outcomes}) == 1


def _digest(opt: Optimizer) -> bytes:
    """8 bytes standing for every group's hyper-parameter values (a scheduled one as this
    step's value) and the step counts: a hyper-parameter changed on some ranks only (without
    :meth:`DataParallel.check`) is found at the next step instead of silently making the
    ranks' parameters diverge.  (A value whose repr differs between equal objects makes the
    step run the full check, which compares them properly.)"""
    return hashlib.blake2b(repr(_values(opt)).encode(), digest_size=8).digest()


def _values(opt: Optimizer) -> list[tuple[str, str]]:
    """This step's hyper-parameter values (the optimizer's own keys: not what a user adds to a
    group) and the step counts, as (label, repr) pairs."""
    out = [
        (f"group {gi} {k} (this step's value)", repr(g[k]))
        for gi, g in enumerate(opt.param_groups)
        for k in sorted(opt.defaults)
        if k in g
    ]
    out.append(("step counts", repr([opt.step_count, *(g.step for g in opt._groups)])))
    return out


def _compare(comm: Any, where: str, signature: list[tuple[str, str]]) -> None:
    """Exchange `signature` (label, value) pairs; raise :class:`DistributedError` on every
    rank if any rank's differs from rank 0's, naming the ranks and the first differences."""
    sigs: list[list[tuple[str, str]]] = comm.allgather(signature)
    ref = dict(sigs[0])
    problems = []
    for r, sig in enumerate(sigs[1:], start=1):
        mine = dict(sig)
        diffs = [
            f"{k}: {ref.get(k, '(absent)')} on rank 0, {mine.get(k, '(absent)')} on rank {r}"
            for k in list(ref) + [k for k in mine if k not in ref]
            if ref.get(k) != mine.get(k)
        ]
        if diffs:
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            problems.append(f"rank {r} differs from rank 0: " + "; ".join(diffs[:5]) + more)
    if problems:
        raise DistributedError(
            f"{where}: the ranks are not set up alike (every rank must build the same "
            "parameters, dtypes, shapes and options):\n  - " + "\n  - ".join(problems)
        )


def _groups_signature(
    cls: str,
    params: Sequence[Sequence[tuple[Any, np.ndarray]]],
    hypers: Sequence[Mapping[str, Any]] | None,
    options: Mapping[str, Any],
) -> list[tuple[str, str]]:
    """What must be equal on every rank: the optimizer class, every parameter's key, dtype
    and shape, every group's hyper-parameters (schedules described), our own options."""
    sig = [("optimizer", cls), ("groups", str(len(params)))]
    sig += [(k, repr(v)) for k, v in options.items()]
    for gi, pairs in enumerate(params):
        sig.append((f"group {gi} parameters", str(len(pairs))))
        for i, (key, p) in enumerate(pairs):  # by position: the layouts follow the order
            name = f"{key!r} " if isinstance(key, str) else ""
            sig.append((f"group {gi} param {i}", f"{name}{_dtype(p.dtype).name} {tuple(p.shape)}"))
        if hypers is not None:
            for k, v in sorted(hypers[gi].items()):
                sig.append((f"group {gi} {k}", repr(_to_data(v))))
    return sig


def _hypers(opt: Optimizer) -> list[dict[str, Any]]:
    """Every group's hyper-parameters, a schedule where a group has one."""
    out = []
    for gi, group in enumerate(opt.param_groups):
        specs = opt.schedules(gi)
        out.append({k: specs.get(k, v) for k, v in group.items() if k != "params"})
    return out


# ------------------------------------------------------------------------ layout
def _acc_dtype(dt: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype the mean is computed in: float32 for 16-bit floats, else the dtype."""
    return np.dtype(np.float32) if dt.itemsize < 4 else dt


class _Span:
    """1-D arrays laid end to end: elements ``[lo, hi)`` of their concatenation, read and
    written without concatenating anything."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.flats = [a.reshape(-1) for a in arrays]
        self.starts = [0]
        for f in self.flats:
            self.starts.append(self.starts[-1] + f.size)

    def _pieces(self, lo: int, hi: int) -> list[tuple[np.ndarray, int, int]]:
        """(array, its [a, b) slice, offset in the range) covering elements [lo, hi)."""
        out = []
        i = max(0, bisect_right(self.starts, lo) - 1)
        while lo < hi and i < len(self.flats):
            start = self.starts[i]
            a, b = lo - start, min(hi, self.starts[i + 1]) - start
            if b > a:
                out.append((self.flats[i], a, b))
            lo = start + b
            i += 1
        return out

    def read(self, lo: int, hi: int, out: np.ndarray) -> None:
        pos = 0
        for f, a, b in self._pieces(lo, hi):
            out[pos : pos + b - a] = f[a:b]
            pos += b - a

    def write(self, lo: int, data: np.ndarray) -> None:
        pos = 0
        for f, a, b in self._pieces(lo, lo + data.size):
            f[a:b] = data[pos : pos + b - a]
            pos += b - a


class _Segment:
    """A run of consecutive parameters of one dtype in a group: its flat element space, the
    contiguous range each rank reduces (or owns), and its buckets.  Bucket `i` takes the
    `i`-th of `k` even parts of every rank's range, so each collective call moves about
    ``bucket_bytes`` spread over all ranks."""

    def __init__(
        self,
        dtype: np.dtype[Any],
        size: int,
        ranges: list[tuple[int, int]],
        bucket_bytes: int,
    ) -> None:
        self.dtype = dtype
        self.size = size
        self.ranges = ranges
        self.k = max(1, -(-size * dtype.itemsize // bucket_bytes))

    def chunk(self, i: int, r: int) -> tuple[int, int]:
        lo, hi = self.ranges[r]
        n = hi - lo
        return lo + i * n // self.k, lo + (i + 1) * n // self.k


def _even(size: int, n: int) -> list[tuple[int, int]]:
    return [(r * size // n, (r + 1) * size // n) for r in range(n)]


def _runs(params: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """[start, stop) indices of the maximal runs of consecutive parameters of one dtype."""
    runs, start = [], 0
    for i in range(1, len(params) + 1):
        if i == len(params) or params[i].dtype != params[start].dtype:
            runs.append((start, i))
            start = i
    return runs


class _Comm:
    """The deterministic collectives over one communicator, counting the bytes sent."""

    def __init__(self, comm: Any, where: str = "fastoptim.distributed") -> None:
        self.MPI = _mpi()
        if comm is not None and not isinstance(comm, self.MPI.Comm):
            raise TypeError(
                f"{where}: comm must be an mpi4py communicator (mpi4py.MPI.Comm) or None for "
                f"COMM_WORLD, got {type(comm).__name__}"
            )
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.sent = 0  # bytes passed to MPI for other ranks since construction

    def reduce_scatter(self, seg: _Segment, i: int, flat: np.ndarray, average: bool) -> np.ndarray:
        """The reduced chunk `i` of this rank: every rank's elements ``seg.chunk(i, rank)`` of
        `flat` (a segment's array), summed in rank order in the accumulation dtype (and
        divided by the number of ranks if `average`)."""
        me, n, it = self.rank, self.size, seg.dtype.itemsize
        lo, hi = seg.chunk(i, me)
        m = hi - lo
        chunks = [seg.chunk(i, r) for r in range(n)]
        scounts = [0 if r == me else (b - a) * it for r, (a, b) in enumerate(chunks)]
        sdispls = [a * it for a, _ in chunks]
        rcounts = [0 if r == me else m * it for r in range(n)]
        rdispls = [r * m * it for r in range(n)]
        recv = np.empty(n * m, seg.dtype)
        byte = self.MPI.BYTE
        self.comm.Alltoallv(
            [flat.view(np.uint8), (scounts, sdispls), byte],
            [recv.view(np.uint8), (rcounts, rdispls), byte],
        )
        self.sent += sum(scounts)
        acc_t = _acc_dtype(seg.dtype)
        parts = [flat[lo:hi] if r == me else recv[r * m : (r + 1) * m] for r in range(n)]
        acc = parts[0].astype(acc_t)  # a copy
        for p in parts[1:]:
            acc += p if p.dtype == acc_t else p.astype(acc_t)
        if average:
            np.divide(acc, acc_t.type(n), out=acc)
        return acc

    def allgather(self, seg: _Segment, i: int, buf: np.ndarray, displs: Sequence[int]) -> None:
        """Every rank's chunk `i` (already in `buf` at element offset ``displs[rank]``)
        copied into every rank's `buf` at ``displs[r]``."""
        it = seg.dtype.itemsize
        counts = [(b - a) * it for a, b in (seg.chunk(i, r) for r in range(self.size))]
        self.comm.Allgatherv(
            self.MPI.IN_PLACE,
            [buf.view(np.uint8), (counts, [d * it for d in displs]), self.MPI.BYTE],
        )
        self.sent += counts[self.rank] * (self.size - 1)


def _check_options(where: str, bucket_bytes: Any, reduction: Any, allowed: tuple[str, ...]) -> int:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, (int, np.integer)):
        raise TypeError(f"{where}: bucket_bytes must be an int, got {type(bucket_bytes).__name__}")
    if not 64 <= bucket_bytes <= _MAX_BUCKET_BYTES:
        raise ValueError(
            f"{where}: bucket_bytes must be in [64, {_MAX_BUCKET_BYTES}], got {bucket_bytes}"
        )
    if reduction not in allowed:
        raise ValueError(f"{where}: grad_reduction must be one of {allowed}, got {reduction!r}")
    return int(bucket_bytes)


def _copy_grads(
    where: str,
    grads: Grads,
    named: bool,
    keys: Sequence[Any],
    targets: Sequence[np.ndarray],
) -> None:
    """Validate `grads` (a list in parameter order, or a dict by name) against `targets`
    (shapes and dtypes), then copy them in."""
    if isinstance(grads, Mapping):
        if not named:
            raise TypeError(f"{where}: grads is a dict but the parameters were given as a list")
        missing = [k for k in keys if k not in grads]
        extra = [k for k in grads if k not in set(keys)]
        if missing or extra:
            raise ValueError(f"{where}: grads keys: missing {missing}, unexpected {extra}")
        given = [grads[k] for k in keys]
    elif isinstance(grads, Sequence) and not isinstance(grads, np.ndarray):
        if len(grads) != len(targets):
            raise ValueError(f"{where}: expected {len(targets)} gradients, got {len(grads)}")
        given = list(grads)
    else:
        raise TypeError(f"{where}: grads must be a list or dict of arrays")
    for k, g, t in zip(keys, given, targets):
        if not isinstance(g, np.ndarray) or g.shape != t.shape or g.dtype != t.dtype:
            got = f"{g.dtype} {g.shape}" if isinstance(g, np.ndarray) else type(g).__name__
            raise ValueError(
                f"{where}: the gradient of parameter {k!r} is {got}, expected "
                f"{t.dtype} {t.shape} (the parameter's dtype and shape)"
            )
    for g, t in zip(given, targets):
        np.copyto(t, g)


# ------------------------------------------------------------------------ data-parallel
class _Wrapper:
    """What a wrapper of an optimizer (``self._opt``) reads from it: the last step's outcome
    (:attr:`grad_norm`, :attr:`step_skipped`), and the attributes its class defines as
    hyper-parameters (:mod:`fastoptim.keras`'s ``learning_rate``, ``beta_1``..., and its
    refusals of Keras's options), read from and assigned to the optimizer, not kept on the
    wrapper, where no step would read them."""

    @property
    def grad_norm(self) -> float | None:
        """The optimizer's ``grad_norm``: the last step's
        global gradient norm (every rank's gradients) when a group clips it, else None."""
        norm: float | None = self.__dict__["_opt"].grad_norm
        return norm

    @property
    def step_skipped(self) -> bool:
        """The optimizer's ``step_skipped``: whether the last
        step was skipped (``skip_nonfinite``; every rank decides alike)."""
        return bool(self.__dict__["_opt"].step_skipped)

    def _forwarded(self, name: str) -> bool:
        from .keras import _Attribute

        if name.startswith("_") or hasattr(type(self), name):
            return False  # (the wrapper's own: a method, a property)
        inner = self.__dict__.get("_opt")
        return isinstance(inspect.getattr_static(type(inner), name, None), _Attribute)

    def __getattr__(self, name: str) -> Any:  # (only for what is not found otherwise)
        if self._forwarded(name):
            return getattr(self.__dict__["_opt"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if self._forwarded(name):
            setattr(self.__dict__["_opt"], name, value)
        else:
            object.__setattr__(self, name, value)


class DataParallel(_Wrapper):
    """Data-parallel training with any NumPy-tier `optimizer` (:mod:`fastoptim.optimizers`,
    :mod:`fastoptim.reference`): every rank holds the same parameters and state, writes the
    gradient of its own batch into ``optimizer.grads`` (or :attr:`grads`), and :meth:`step`
    replaces them with their mean over the ranks (see the module's deterministic reduction),
    then steps the optimizer.

    - `comm`: an mpi4py communicator (``MPI.COMM_WORLD`` if None).
    - `bucket_bytes`: the most bytes of one parameter group reduced by one collective call
      (bounds the temporary buffers: about ``2 * bucket_bytes``).
    - `grad_reduction`: ``"mean"`` (divide the sum by the number of ranks) or ``"sum"``.
    - `broadcast`: copy rank 0's parameters and state buffers to every rank at
      construction (as DDP does with the parameters), so that differently initialised models
      start alike.

    Construction is collective and checks that every rank's setup is the same
    (:class:`DistributedError` on every rank otherwise).  The optimizer's state is identical
    on every rank: save checkpoints from rank 0 with :func:`fastoptim.save`, and load them on
    every rank.  Parameter groups added after construction need :meth:`check` (on every
    rank) before the next step.
    """

    def __init__(
        self,
        optimizer: fastoptim.engine.optimizer.Optimizer,
        comm: Any = None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        grad_reduction: Reduction = "mean",
        broadcast: bool = True,
    ) -> None:
        self._c = _Comm(comm, "DataParallel")
        self._opt = optimizer
        self.grad_reduction = grad_reduction

        def local() -> list[tuple[str, str]]:
            if not isinstance(optimizer, Optimizer):
                raise TypeError(
                    "DataParallel: optimizer must be a fastoptim NumPy-tier optimizer, got "
                    f"{type(optimizer).__name__}"
                )
            if isinstance(optimizer, ClosureOptimizer):
                raise TypeError(
                    f"DataParallel: {type(optimizer).__name__} steps with a closure that "
                    "evaluates the gradient several times per step, and DataParallel reduces "
                    "the gradients once per step: not supported (reduce inside the closure "
                    "with allreduce_grads() on a plain optimizer instead)"
                )
            self.bucket_bytes = _check_options(
                "DataParallel", bucket_bytes, grad_reduction, ("mean", "sum")
            )
            return self._signature()

        _compare(self._c.comm, "DataParallel", _agree(self._c.comm, "DataParallel", local))
        self._layout()
        self._checked = False  # the first step checks the hyper-parameters again
        if broadcast:
            self.broadcast_parameters()

    def _signature(self) -> list[tuple[str, str]]:
        opt = self.optimizer
        params = [list(zip(g.keys, g.params)) for g in opt._groups]
        options = {
            "bucket_bytes": self.bucket_bytes,
            "grad_reduction": self.grad_reduction,
            "step counts": [opt.step_count, *(g.step for g in opt._groups)],
            "state buffers": [sorted(g.arenas) for g in opt._groups],
        }
        return _groups_signature(type(opt).__name__, params, _hypers(opt), options)

    def _layout(self) -> None:
        """The segments of every group's gradient block (runs of one dtype, alignment
        padding between tensors included and zeroed once)."""
        opt, n = self.optimizer, self._c.size
        self._groups_seen = len(opt._groups)
        self._segments: list[tuple[_Segment, np.ndarray]] = []
        for g in opt._groups:
            grads = opt._own_grads(g)
            block = g.grad_block
            assert block is not None
            base = block.ctypes.data
            for a, b in _runs(g.params):
                # (an empty view's address says nothing of its place in the block: NumPy may
                # give it the block's start)
                views = [v for v in grads[a:b] if v.size]
                if not views:
                    continue
                dt = _dtype(g.params[a].dtype)
                lo = views[0].ctypes.data - base
                hi = views[-1].ctypes.data - base + views[-1].nbytes
                flat = block[lo:hi].view(dt)
                end = lo  # zero the padding between the views
                for v in views:
                    start = v.ctypes.data - base
                    block[end:start] = 0
                    end = start + v.nbytes
                seg = _Segment(dt, flat.size, _even(flat.size, n), self.bucket_bytes)
                self._segments.append((seg, flat))

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer (its state is the same on every rank)."""
        return self._opt

    @property
    def grads(self) -> Any:
        """The optimizer's gradient buffers (``optimizer.grads``): write each rank's local
        gradients there; after :meth:`step` (or :meth:`allreduce_grads`) they hold the mean."""
        return self.optimizer.grads

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (set the same values on every rank)."""
        return self.optimizer.param_groups

    @property
    def rank(self) -> int:
        """This process's rank in the communicator."""
        return self._c.rank

    @property
    def world_size(self) -> int:
        """The number of ranks in the communicator."""
        return self._c.size

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank passed to MPI for other ranks since construction, by the gradient
        reductions (the broadcast at construction not counted)."""
        return self._c.sent

    @property
    def bytes_per_step(self) -> int:
        """Bytes this rank sends per :meth:`allreduce_grads`, from the formula: per
        contiguous segment of `S` bytes of which this rank reduces `c`, ``S - c`` in the
        reduce-scatter and ``(N - 1) c`` in the all-gather; 0 on one rank."""
        n, me = self._c.size, self._c.rank
        if n == 1:
            return 0
        total = 0
        for seg, _ in self._segments:
            lo, hi = seg.ranges[me]
            total += (seg.size - (hi - lo) + (n - 1) * (hi - lo)) * seg.dtype.itemsize
        return total

    def zero_grad(self) -> None:
        """Set the gradient buffers to zero."""
        self.optimizer.zero_grad()

    def check(self) -> None:
        """Collective: check that every rank has the same parameters and hyper-parameters
        (and take parameter groups added since construction into account);
        :class:`DistributedError` on every rank otherwise."""
        sig = _agree(self._c.comm, "DataParallel.check", self._signature)
        _compare(self._c.comm, "DataParallel.check", sig)
        self._layout()
        self._checked = True

    def broadcast_parameters(self, root: int = 0) -> None:
        """Collective: copy rank `root`'s parameters and optimizer state buffers (master
        copies included) to every rank."""
        byte = self._c.MPI.BYTE
        for g in self.optimizer._groups:
            for p in g.params:
                self._c.comm.Bcast([p.reshape(-1).view(np.uint8), byte], root=root)
            for name in sorted(g.arenas):
                self._c.comm.Bcast([g.arenas[name], byte], root=root)

    def _check_groups(self) -> None:
        if len(self.optimizer._groups) != self._groups_seen:
            raise RuntimeError(
                "DataParallel: parameter groups were added after construction; call check() "
                "on every rank first"
            )

    def allreduce_grads(self) -> None:
        """Collective: replace every rank's gradient buffers by their mean (or sum) over the
        ranks, bit-identical everywhere (see the module's deterministic reduction)."""
        self._check_groups()
        c = self._c
        average = self.grad_reduction == "mean"
        if c.size == 1:
            return  # the mean of one gradient is itself (x / 1 == x)
        for seg, flat in self._segments:
            for i in range(seg.k):
                acc = c.reduce_scatter(seg, i, flat, average)
                lo, hi = seg.chunk(i, c.rank)
                flat[lo:hi] = acc  # rounded to nearest for 16-bit gradients
                c.allgather(seg, i, flat, [seg.chunk(i, r)[0] for r in range(c.size)])

    def step(self, grads: Grads | None = None) -> float | None:
        """Collective: average the gradients over the ranks, then step the optimizer.

        `grads`: this rank's gradients (a list in parameter order or a dict by name, of the
        parameters' dtypes and shapes), copied into the gradient buffers first; None: the
        buffers already hold them.  The first step checks every rank's setup again.  Returns
        what the optimizer's step returns (the gradient norm with ``max_grad_norm``)."""
        opt = self.optimizer

        def copy(gs: Grads) -> None:  # (only where gradients are given)
            keys = [str(k) if opt._named else k for g in opt._groups for k in g.keys]
            targets = [a for g in opt._groups for a in opt._own_grads(g)]
            _copy_grads("DataParallel.step", gs, bool(opt._named), keys, targets)

        where = "DataParallel.step"

        def ready() -> None:
            self._check_groups()
            opt._check_ready(where)

        same = _take_grads(self._c.comm, where, grads, copy, ready, opt)
        if not same or not self._checked:
            self.check()
        if not same:  # (and the setups agree: a schedule that gives each rank its own value)
            _compare(self._c.comm, where, _values(opt))
        self.allreduce_grads()
        return self.optimizer.step()


# ------------------------------------------------------------------------ ZeRO-1
def _parse_params(params: Params, where: str) -> tuple[bool, list[dict[str, Any]]]:
    """(named, groups) from an optimizer's `params` argument: each group a dict with
    ``keys``, ``arrays`` and its own ``options``."""
    if isinstance(params, np.ndarray):
        raise TypeError(f"{where}: params must be a list or dict of arrays, not a single array")
    if isinstance(params, Mapping):
        raw: list[Any] = [{"params": params}]
    else:
        items = list(params)
        raw = items if items and all(isinstance(g, Mapping) for g in items) else [{"params": items}]
    groups = []
    named: bool | None = None
    start = 0
    for grp in raw:
        if not isinstance(grp, Mapping) or "params" not in grp:
            raise TypeError(f"{where}: a parameter group must be a dict with a 'params' entry")
        ps = grp["params"]
        is_named = isinstance(ps, Mapping)
        if named is not None and is_named != named:
            raise TypeError(f"{where}: all parameter groups must be given the same way")
        named = is_named
        keys: list[Any] = list(ps.keys()) if is_named else list(range(start, start + len(ps)))
        arrays = list(ps.values()) if is_named else list(ps)
        if not arrays:
            raise ValueError(f"{where}: a parameter group has an empty parameter list")
        for k, a in zip(keys, arrays):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{where}: param {k!r} is a {type(a).__name__}, not an array")
            if not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"{where}: param {k!r} must be C-contiguous and writeable")
            if a.size == 0:
                raise ValueError(f"{where}: param {k!r} has no elements")
        start += len(arrays)
        groups.append(
            {
                "keys": keys,
                "arrays": arrays,
                "options": {k: v for k, v in grp.items() if k != "params"},
            }
        )
    if not groups:
        raise ValueError(f"{where}: params is an empty parameter list")
    # Each array once (as one process refuses it: each rank's optimizer sees only its pieces,
    # and the all-gather would write one rank's update of the memory over another's).
    try:
        _core.check_disjoint(
            [a for g in groups for a in g["arrays"]],
            [f"param {k!r}" for g in groups for k in g["keys"]],
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return bool(named), groups


class _ZeroGroup:
    """One parameter group of a :class:`ZeroRedundancyOptimizer` on this rank."""

    def __init__(
        self, keys: list[Any], arrays: list[np.ndarray], options: dict[str, Any], n: int
    ) -> None:
        self.keys = keys
        self.arrays = arrays
        self.options = options
        self.size = sum(a.size for a in arrays)
        self.shards = _even(self.size, n)  # rank -> [lo, hi) of the group's element space
        self.offsets = [0]
        for a in arrays:
            self.offsets.append(self.offsets[-1] + a.size)

    def pieces(self, r: int) -> list[tuple[int, int, int]]:
        """(parameter index, a, b): the elements [a, b) of each parameter rank `r` owns."""
        lo, hi = self.shards[r]
        out = []
        for i in range(len(self.arrays)):
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i + 1])
            if b > a:
                out.append((i, a - self.offsets[i], b - self.offsets[i]))
        return out

    def views(self, r: int) -> list[np.ndarray]:
        """The 1-D views of the pieces rank `r` owns (zero-copy), or one 1-element dummy
        array of the first parameter's dtype if it owns none (every rank's inner optimizer
        has every group)."""
        pieces = self.pieces(r)
        if not pieces:
            return [np.zeros(1, self.arrays[0].dtype)]
        return [self.arrays[i].reshape(-1)[a:b] for i, a, b in pieces]


class ZeroRedundancyOptimizer(_Wrapper):
    """ZeRO-1: optimizer state sharded over the ranks of `comm`, parameters replicated.

    `params` as for any fastoptim optimizer (a list or dict of arrays, or a list of group
    dicts with per-group options), each with at least one element; `optimizer_class` a
    NumPy-tier optimizer class (``fastoptim.AdamW``...; not the per-tensor LAMB and LARS),
    built with `defaults` (its keyword arguments, including the precision options but the
    quantized ``state_dtype`` kinds, whose blocks follow whole parameters: use
    :class:`DataParallel` for those).  Each group's elements, flattened and concatenated in
    parameter order (``E`` of them), are split into contiguous ranges
    ``[r*E//N, (r+1)*E//N)``; rank `r` builds ``optimizer_class`` over zero-copy 1-D views of
    the pieces of the parameters in its range (:attr:`optimizer`), so it allocates ``1/N`` of
    the state.

    A :meth:`step`: every rank's gradients (:attr:`grads`, full-size buffers, one per
    parameter) are reduce-scattered: each rank gets the mean of its range over the ranks
    (deterministic, see the module), or with ``grad_reduction="none"`` (every rank already
    holds the same gradients) just takes its range; each rank steps its range; the updated
    parameters are all-gathered into every rank's arrays.  Parameters and state after each
    step are bit-identical to one process stepping ``optimizer_class`` on all parameters
    with the same gradients, for every optimizer and option (the update is element-wise),
    except ``rounding="stochastic"``, whose random bits depend on the element's position
    in its array (a valid, but different, draw), and ``max_grad_norm``, whose norm sums the
    ranks' partial sums (another order: a clipped step may differ by an ulp).

    Hyper-parameters: :attr:`param_groups` are the inner optimizer's groups (their
    ``"params"`` hold this rank's pieces); set the same values on every rank, then
    :meth:`check` if in doubt.  Checkpoints: :meth:`save` / :meth:`load` (a directory with one
    file per rank, loadable with any number of ranks).
    """

    def __init__(
        self,
        params: Params,
        optimizer_class: type[fastoptim.engine.optimizer.Optimizer],
        *,
        comm: Any = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        grad_reduction: ZeroReduction = "mean",
        **defaults: Any,
    ) -> None:
        where = "ZeroRedundancyOptimizer"
        self._c = c = _Comm(comm, where)
        self.grad_reduction = grad_reduction
        self.optimizer_class = optimizer_class

        def parse() -> list[tuple[str, str]]:
            if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
                raise TypeError(
                    f"{where}: optimizer_class must be a fastoptim optimizer class, got "
                    f"{optimizer_class!r}"
                )
            defn = getattr(optimizer_class, "_definition", None)
            if defn is not None and defn.per_tensor:
                raise ValueError(
                    f"{where}: {optimizer_class.__name__} computes a trust ratio from each "
                    "whole parameter's norms, which ZeRO-1's flat shards split across ranks: "
                    "use DataParallel with it"
                )
            if defn is not None and defn.host is not None:  # Muon, Adafactor, LBFGS
                closure = defn.host.closure is not None  # (LBFGS: no DataParallel either)
                raise ValueError(
                    f"{where}: {optimizer_class.__name__}'s update is not element-wise (it "
                    "needs each whole parameter, or all of them), which ZeRO-1's flat shards "
                    "split across ranks"
                    + (
                        "; and its closure re-evaluates the objective, which neither class of "
                        "fastoptim.distributed runs across ranks (run it in one process, or "
                        "reduce the gradients inside the closure yourself)"
                        if closure
                        else ": use DataParallel with it"
                    )
                )
            self.bucket_bytes = _check_options(
                where, bucket_bytes, grad_reduction, ("mean", "sum", "none")
            )
            self._named, groups = _parse_params(params, where)
            for opts in [defaults, *(g["options"] for g in groups)]:
                sd = opts.get("state_dtype")
                kinds = sd.values() if isinstance(sd, Mapping) else [sd]
                if any(isinstance(v, str) and v in QUANT_KINDS for v in kinds):
                    raise ValueError(
                        f"{where}: state_dtype={sd!r}: quantized state is kept per block of "
                        "each whole parameter (and in float32 below 4096 elements), which "
                        "ZeRO-1's flat shards cut across ranks: use DataParallel with it, or a "
                        "float32/bfloat16/float16 state"
                    )
            self._groups = [
                _ZeroGroup(g["keys"], g["arrays"], g["options"], c.size) for g in groups
            ]
            pairs = [list(zip(g.keys, g.arrays)) for g in self._groups]
            options = {
                "bucket_bytes": self.bucket_bytes,
                "grad_reduction": grad_reduction,
                "defaults": {k: _to_data(v) for k, v in sorted(defaults.items())},
                "group options": [
                    {k: _to_data(v) for k, v in sorted(g.options.items())} for g in self._groups
                ],
            }
            return _groups_signature(optimizer_class.__name__, pairs, None, options)

        _compare(c.comm, where, _agree(c.comm, where, parse))
        self._defaults = dict(defaults)
        self._opt: Optimizer = _agree(c.comm, where, lambda: self._inner(c.rank))
        self._inner_groups = len(self._opt.param_groups)  # (what step() refuses to see change)
        if c.size > 1:  # clipping and skipping see every rank's gradients
            self._opt.reduce_grad_stats = mpi_all_reduce(c.comm)
        self._layout()
        # Full-size gradient buffers, one contiguous array per segment.
        self._grad_flats: list[np.ndarray] = []
        self._grads: list[np.ndarray] = []
        for g in self._groups:
            for a, b in _runs(g.arrays):
                flat = np.zeros(g.offsets[b] - g.offsets[a], g.arrays[a].dtype)
                self._grad_flats.append(flat)
                for i in range(a, b):
                    lo, hi = g.offsets[i] - g.offsets[a], g.offsets[i + 1] - g.offsets[a]
                    self._grads.append(flat[lo:hi].reshape(g.arrays[i].shape))
        self.check()
        self._checked = False  # the first step checks again (options set in between)

    def _inner(self, r: int, views: list[list[np.ndarray]] | None = None) -> Optimizer:
        """`optimizer_class` over rank `r`'s pieces of every group (or over `views`)."""
        groups = [
            {"params": g.views(r) if views is None else views[gi], **g.options}
            for gi, g in enumerate(self._groups)
        ]
        return self.optimizer_class(groups, **self._defaults)

    def _layout(self) -> None:
        """Per segment (a run of one dtype in a group): the element ranges of the ranks, the
        span of its parameters, and the span of this rank's inner gradient buffers (which
        starts at the segment's element ``ranges[rank][0]``)."""
        me = self._c.rank
        inner_grads: list[np.ndarray] = self.optimizer.grads
        self._segments: list[tuple[_Segment, _Span, _Span]] = []
        pos = 0  # position of the group's first view in the inner optimizer
        for g in self._groups:
            pieces = g.pieces(me)
            for a, b in _runs(g.arrays):
                s0, s1 = g.offsets[a], g.offsets[b]
                ranges = [
                    (min(max(lo, s0), s1) - s0, min(max(hi, s0), s1) - s0) for lo, hi in g.shards
                ]
                seg = _Segment(_dtype(g.arrays[a].dtype), s1 - s0, ranges, self.bucket_bytes)
                owned = [pos + j for j, p in enumerate(pieces) if a <= p[0] < b]
                inner = _Span([inner_grads[j] for j in owned])
                self._segments.append((seg, _Span(g.arrays[a:b]), inner))
            pos += max(1, len(pieces))

    # -------------------------------------------------------------- views of the state
    @property
    def optimizer(self) -> Optimizer:
        """This rank's inner optimizer: `optimizer_class` over the 1-D pieces of the
        parameters it owns (one group per group of `params`; a group of which it owns no
        element holds one internal 1-element array instead)."""
        return self._opt

    @property
    def grads(self) -> Any:
        """Full-size gradient buffers (zeros at first, the parameters' shapes and dtypes): a
        list, or a dict when the parameters are named.  Write this rank's gradients there and
        call :meth:`step`; the step leaves them as they were.  Built at each access: replacing
        an entry would change nothing and raises ``TypeError``."""
        keys = [k for g in self._groups for k in g.keys]
        if self._named:
            return ReadOnlyDict(dict(zip(keys, self._grads)), "grads", GRADS_HINT)
        return ReadOnlyList(self._grads, "grads", GRADS_HINT)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's parameter groups (one per group of `params`, on every rank;
        ``"params"`` holds this rank's 1-D pieces)."""
        return self.optimizer.param_groups

    @property
    def step_count(self) -> int:
        """The number of steps taken (the shard optimizer's, the same on every rank)."""
        return self.optimizer.step_count

    @property
    def rank(self) -> int:
        """This process's rank in the communicator."""
        return self._c.rank

    @property
    def world_size(self) -> int:
        """The number of ranks in the communicator."""
        return self._c.size

    @property
    def shards(self) -> list[tuple[int, int]]:
        """Per group: the range ``[lo, hi)`` of its flattened elements this rank owns."""
        return [g.shards[self._c.rank] for g in self._groups]

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank passed to MPI for other ranks since construction."""
        return self._c.sent

    @property
    def bytes_per_step(self) -> int:
        """Bytes this rank sends per :meth:`step`, from the formula: per segment of `S`
        bytes of which this rank owns `c`, ``S - c`` in the gradients' reduce-scatter (none
        with ``grad_reduction="none"``) and ``(N - 1) c`` in the parameters' all-gather."""
        n, me = self._c.size, self._c.rank
        if n == 1:
            return 0
        total = 0
        for seg, *_ in self._segments:
            lo, hi = seg.ranges[me]
            own = hi - lo
            grads = 0 if self.grad_reduction == "none" else seg.size - own
            total += (grads + (n - 1) * own) * seg.dtype.itemsize
        return total

    def zero_grad(self) -> None:
        """Set the full-size gradient buffers to zero."""
        for f in self._grad_flats:
            f.fill(0)

    # -------------------------------------------------------------- collective operations
    def _signature(self) -> list[tuple[str, str]]:
        pairs = [list(zip(g.keys, g.arrays)) for g in self._groups]
        options = {
            "bucket_bytes": self.bucket_bytes,
            "grad_reduction": self.grad_reduction,
            "step counts": [self.optimizer.step_count],
        }
        return _groups_signature(
            self.optimizer_class.__name__, pairs, _hypers(self.optimizer), options
        )

    def check(self) -> None:
        """Collective: check that every rank has the same parameters and hyper-parameters;
        :class:`DistributedError` on every rank otherwise."""
        where = "ZeroRedundancyOptimizer.check"
        _compare(self._c.comm, where, _agree(self._c.comm, where, self._signature))
        self._checked = True

    def step(self, grads: Grads | None = None) -> float | None:
        """Collective: reduce the gradients (:attr:`grads`, or `grads` copied there first),
        step this rank's shard, all-gather the parameters.  Returns the optimizer's step's value:
        with ``max_grad_norm``, the norm of all ranks' gradients (clipping and
        ``skip_nonfinite`` see every rank's shard through ``reduce_grad_stats``)."""
        c = self._c
        where = "ZeroRedundancyOptimizer.step"

        def copy(gs: Grads) -> None:  # (only where gradients are given)
            keys = [k for g in self._groups for k in g.keys]
            _copy_grads(where, gs, self._named, keys, self._grads)

        def ready() -> None:
            if len(self.optimizer.param_groups) != self._inner_groups:
                raise ValueError(
                    f"{where}: a parameter group was added to the shard's optimizer "
                    "(.optimizer.add_param_group): its parameters would be neither reduced "
                    "nor sharded nor gathered; build a new ZeroRedundancyOptimizer with every "
                    "group"
                )
            for g in self._groups:  # (the parameters are written by the all-gather)
                for k, a in zip(g.keys, g.arrays):
                    if not a.flags.writeable:
                        raise ValueError(f"{where}: param {k!r}: array was made read-only")
            self.optimizer._check_ready(where)

        same = _take_grads(c.comm, where, grads, copy, ready, self.optimizer)
        if not same or not self._checked:
            self.check()
        if not same:  # (and the setups agree: a schedule that gives each rank its own value)
            _compare(c.comm, where, _values(self.optimizer))
        average = self.grad_reduction == "mean"
        for (seg, _, inner), flat in zip(self._segments, self._grad_flats):
            me_lo = seg.ranges[c.rank][0]
            if self.grad_reduction == "none" or c.size == 1:
                lo, hi = seg.ranges[c.rank]
                inner.write(0, flat[lo:hi])
                continue
            for i in range(seg.k):
                lo, _hi = seg.chunk(i, c.rank)
                inner.write(lo - me_lo, c.reduce_scatter(seg, i, flat, average))
        norm = self.optimizer.step()
        self._gather_params()
        return norm

    def _gather_params(self) -> None:
        """Collective: every rank's range of the parameters copied into every rank's arrays."""
        c = self._c
        if c.size == 1:
            return
        for seg, params, _ in self._segments:
            for i in range(seg.k):
                chunks = [seg.chunk(i, r) for r in range(c.size)]
                displs = [0]
                for a, b in chunks:
                    displs.append(displs[-1] + b - a)
                stage = np.empty(displs[-1], seg.dtype)
                lo, hi = chunks[c.rank]
                me = displs[c.rank]
                params.read(lo, hi, stage[me : me + hi - lo])
                c.allgather(seg, i, stage, displs[:-1])
                for r, (a, b) in enumerate(chunks):
                    if r != c.rank and b > a:
                        params.write(a, stage[displs[r] : displs[r + 1]])

    # -------------------------------------------------------------- checkpoints
    def save(self, path: str | os.PathLike[str]) -> None:
        """Collective: write a checkpoint into directory `path` (created if needed; on a file
        system every rank reaches): one :func:`fastoptim.save` file per rank (its inner
        optimizer: its pieces of the parameters and their state) named
        ``shard-<rank>-of-<ranks>-<save id>.npz``, then ``manifest.json`` (the sharding and
        the files' names), written by rank 0 once every shard is on disk and renamed into
        place.  Replacing a checkpoint is atomic: until the new manifest is in place the old
        one names the old files, which are removed only after it.  Any rank's failure raises
        on every rank."""
        c, where = self._c, f"ZeroRedundancyOptimizer.save({os.fspath(path)!r})"
        directory = os.fspath(path)
        _agree(c.comm, where, lambda: os.makedirs(directory, exist_ok=True))
        save_id: str = c.comm.bcast(secrets.token_hex(6) if c.rank == 0 else None, root=0)
        files = [f"shard-{r:05d}-of-{c.size:05d}-{save_id}.npz" for r in range(c.size)]
        _agree(
            c.comm,
            where,
            lambda: checkpoint.save(os.path.join(directory, files[c.rank]), self.optimizer),
        )

        def manifest() -> None:
            if c.rank != 0:
                return
            data = {
                "format": _ZERO_FORMAT,
                "optimizer": self.optimizer_class.__name__,
                "world_size": c.size,
                "step_count": self.optimizer.step_count,
                "files": files,
                "groups": [
                    {
                        "params": [
                            {"key": k, "dtype": checkpoint._kind(a.dtype), "shape": list(a.shape)}
                            for k, a in zip(g.keys, g.arrays)
                        ],
                        "shards": [list(s) for s in g.shards],
                    }
                    for g in self._groups
                ],
            }
            target = os.path.join(directory, _MANIFEST)
            tmp = f"{target}.tmp-{save_id}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            for entry in os.listdir(directory):  # the previous checkpoint's shards
                if _SHARD.fullmatch(entry) and entry not in files:
                    try:
                        os.unlink(os.path.join(directory, entry))
                    except OSError:
                        pass

        _agree(c.comm, where, manifest)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Collective: restore a :meth:`save` checkpoint written with any number of ranks.

        Each rank reads the shard files that overlap its own ranges (and shard 0, for the
        groups' records), each one verified by :func:`fastoptim.load` into a temporary
        optimizer over the saved pieces, assembles its new pieces' state and parameters,
        and validates the result; only when every rank succeeded does any rank change
        anything (else :class:`DistributedError` on every rank, naming the problems).  The
        parameters are then all-gathered.  As with :func:`fastoptim.load`, the
        checkpoint's hyper-parameters win."""
        c = self._c
        where = f"ZeroRedundancyOptimizer.load({os.fspath(path)!r})"
        apply, files = _agree(c.comm, where, lambda: self._prepare_load(os.fspath(path), where))
        read = c.comm.allgather(files)  # (its save id: a path or a checkpoint per rank)
        if any(f != read[0] for f in read):
            ranks = "\n  - ".join(f"rank {r}: {f[0] if f else f}" for r, f in enumerate(read))
            raise DistributedError(
                f"{where}: the ranks read different checkpoints (another path on some rank, "
                f"or one replaced while they read), nothing loaded:\n  - {ranks}"
            )
        apply()
        self._gather_params()
        self.check()

    def _prepare_load(self, directory: str, where: str) -> tuple[Callable[[], None], list[str]]:
        """Read and check everything this rank needs; return what applies it (cannot fail)
        and the manifest's shard files (their names carry the save's id)."""
        try:
            with open(os.path.join(directory, _MANIFEST), encoding="utf-8") as f:
                man = json.load(f)
        except (OSError, ValueError) as e:
            raise checkpoint.CheckpointError(f"{where}: no readable manifest ({e})") from None
        if not isinstance(man, dict) or man.get("format") != _ZERO_FORMAT:
            raise checkpoint.CheckpointError(f"{where}: not a fastoptim ZeRO checkpoint")
        if man.get("optimizer") != self.optimizer_class.__name__:
            raise checkpoint.CheckpointError(
                f"{where}: the checkpoint is of a {man.get('optimizer')} optimizer, this is "
                f"{self.optimizer_class.__name__}"
            )
        old_n = man.get("world_size")
        groups = man.get("groups")
        files = man.get("files")
        if not (
            isinstance(old_n, int)
            and old_n >= 1
            and isinstance(files, list)
            and len(files) == old_n
            and all(isinstance(f, str) and os.path.basename(f) == f for f in files)
            and isinstance(groups, list)
            and len(groups) == len(self._groups)
        ):
            raise checkpoint.CheckpointError(
                f"{where}: malformed manifest, or another number of parameter groups "
                f"than the {len(self._groups)} here"
            )
        problems = []
        for gi, (rec, g) in enumerate(zip(groups, self._groups)):
            want = [
                {"key": k, "dtype": checkpoint._kind(a.dtype), "shape": list(a.shape)}
                for k, a in zip(g.keys, g.arrays)
            ]
            if not isinstance(rec, dict) or rec.get("params") != want:
                problems.append(f"group {gi}: the parameters (keys, dtypes, shapes) differ")
            elif rec.get("shards") != [list(s) for s in _even(g.size, old_n)]:
                problems.append(f"group {gi}: malformed shard ranges")
        if problems:
            raise checkpoint.CheckpointError(f"{where}:\n  - " + "\n  - ".join(problems))
        me = self._c.rank
        # The old shards this rank needs: those overlapping its ranges, and shard 0.
        old = [_ZeroGroup(g.keys, g.arrays, g.options, old_n) for g in self._groups]
        needed = {0}
        for g, og in zip(self._groups, old):
            lo, hi = g.shards[me]
            for r, (a, b) in enumerate(og.shards):
                if min(hi, b) > max(lo, a):
                    needed.add(r)
        # New state per inner parameter (position in the inner optimizer), assembled below.
        mine = [g.pieces(me) for g in self._groups]
        inner_sd = self.optimizer._state_dict(copy=False)  # (keys and records only)
        new_state: dict[int, dict[str, np.ndarray]] = {}
        new_params: list[tuple[np.ndarray, np.ndarray]] = []  # (destination view, values)
        records: list[Any] = []
        step_count = 0
        for r in sorted(needed):
            views = [
                [np.empty_like(v) for v in og.views(r)]  # arrays for the saved pieces
                for og in old
            ]
            tmp = self._inner(r, views)
            try:
                checkpoint.load(os.path.join(directory, files[r]), tmp)
            except checkpoint.CheckpointError as e:
                if e.torn is None:
                    raise
                # (the load into the temporary optimizer stopped part-way: nothing here changed)
                raise checkpoint.CheckpointError(
                    f"{where}: reading {files[r]} stopped part-way ({e.torn}); this optimizer "
                    "was not changed"
                ) from None
            sd = tmp._state_dict(copy=False)
            if sd["step_count"] != man.get("step_count"):
                raise checkpoint.CheckpointError(
                    f"{where}: {files[r]} is at step {sd['step_count']}, the manifest at "
                    f"{man.get('step_count')!r}: not the same checkpoint"
                )
            if r == 0:
                records, step_count = sd["param_groups"], sd["step_count"]
            pos_old = 0
            pos_new = 0
            for gi, (g, og) in enumerate(zip(self._groups, old)):
                old_pieces = og.pieces(r)
                new_pieces = mine[gi]
                if r == 0 and not new_pieces:  # this rank's dummy: shard 0's first entry
                    src = sd["state"][pos_old]
                    new_state[pos_new] = {k: v.reshape(-1)[:1].copy() for k, v in src.items()}
                j = k = 0  # both lists run through the group's elements in order: merge them
                while j < len(old_pieces) and k < len(new_pieces):
                    (pi, a, b), (qi, x, y) = old_pieces[j], new_pieces[k]
                    lo, hi = max(a, x), min(b, y)
                    if pi == qi and hi > lo:
                        dst = new_state.setdefault(pos_new + k, {})
                        for name, arr in sd["state"][pos_old + j].items():
                            if name not in dst:
                                dst[name] = np.empty(y - x, arr.dtype)
                            dst[name][lo - x : hi - x] = arr[lo - a : hi - a]
                        target = g.arrays[qi].reshape(-1)[lo:hi]
                        new_params.append((target, views[gi][j][lo - a : hi - a]))
                    if g.offsets[pi] + b <= g.offsets[qi] + y:
                        j += 1
                    else:
                        k += 1
                pos_old += max(1, len(old_pieces))
                pos_new += max(1, len(new_pieces))
        # The inner optimizer's state_dict with the assembled state; its loader checks it all.
        keys = list(inner_sd["state"])
        sd_new = {
            "format": inner_sd["format"],
            "optimizer": inner_sd["optimizer"],
            "step_count": step_count,
            "param_groups": [
                {**rec, "params": list(mine_rec["params"]), "shapes": mine_rec["shapes"]}
                for rec, mine_rec in zip(records, inner_sd["param_groups"])
            ],
            "state": {keys[i]: s for i, s in new_state.items()},
            "plateau": None,
        }
        apply_state = self.optimizer._loader(sd_new, True, where)

        def apply() -> None:
            apply_state()
            for target, values in new_params:
                np.copyto(target, values)

        return apply, list(files)
