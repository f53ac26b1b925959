"""The MPI side of tests/test_distributed.py, started as ``mpiexec -n N python mpi_worker.py
MODE OUT [CHECKPOINT]``; every rank writes what it computed to ``OUT/<mode>-rank<r>.npz`` (or
``.json``) for the test to compare with single-process runs.  Also imported by the test for
the cases, the per-rank gradients and the readable reference mean.

Modes:
    train    every DATA_PARALLEL and ZERO case; the ZeRO cases save a checkpoint into OUT/ckpt
             after CHECKPOINT_AT steps.  With CHECKPOINT (a directory written by another
             number of ranks) the ZeRO cases are also resumed from it and finished.
    resume   only that resumption (for one rank: an unsharded continuation)
    load     load CHECKPOINT into the case TWICE: every rank records the outcome
    mismatch ranks set up differently: every rank records the exception it got
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import fastoptim as fo
from fastoptim import schedules
from fastoptim.engine.optimizer import _dtype

STEPS = 5
CHECKPOINT_AT = 2

# name -> groups (shapes, dtype name, per-group options), optimizer class, its keywords;
# named: parameters given as a dict.
DATA_PARALLEL: dict[str, dict[str, Any]] = {
    "adam": {
        "groups": [([(5, 7), (3,), (11,), (2, 2, 3)], "float32", {})],
        "cls": "Adam",
        "kw": {"lr": 1e-2, "weight_decay": 0.1},
        "bucket_bytes": 64,  # many buckets
    },
    "sgd_momentum_f64_two_groups": {
        "groups": [([(4, 5), (9,)], "float64", {}), ([(16,)], "float64", {"lr": 0.05})],
        "cls": "SGD",
        "kw": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        "bucket_bytes": 1 << 20,
    },
    "adamw_bf16_master_named": {
        "groups": [([(8, 3), (5,)], "bfloat16", {})],
        "named": True,
        "cls": "AdamW",
        "kw": {"lr": 1e-2, "master_weights": True},
        "bucket_bytes": 128,
    },
    "rmsprop_sum": {  # the sum over the ranks, not the mean
        "groups": [([(6,), (3, 3)], "float32", {})],
        "cls": "RMSprop",
        "kw": {"lr": 1e-2, "momentum": 0.5},
        "bucket_bytes": 64,
        "grad_reduction": "sum",
    },
    "adam_empty_params": {  # empty tensors within and at the end of a run: their views'
        # addresses are not their places in the block (the run's bounds and padding were wrong)
        "groups": [([(7,), (1,), (0,), (2, 3), (0,)], "float32", {}), ([(0,)], "float32", {})],
        "cls": "Adam",
        "kw": {"lr": 1e-2},
        "bucket_bytes": 64,
    },
    "adamw_int8_int4_state": {  # quantized state (blocks of 256 / 128; the (3,) one in fp32)
        "groups": [([(80, 64), (4100,), (3,)], "float32", {})],
        "cls": "AdamW",
        "kw": {"lr": 1e-2, "state_dtype": {"exp_avg": "int8", "exp_avg_sq": "int4"}},
        "bucket_bytes": 4096,
    },
    "lion_unpadded": {  # 16-float tensors: no alignment padding, bytes = the formula exactly
        "groups": [([(4, 4), (2, 16)], "float32", {})],
        "cls": "Lion",
        "kw": {"lr": 1e-3},
        "bucket_bytes": 1 << 20,
    },
}

ZERO: dict[str, dict[str, Any]] = {
    "adam_two_groups": {  # group 1 has 1 element: the other ranks own none of it
        "groups": [([(5, 7), (3,), (11,)], "float32", {}), ([(1,)], "float32", {"lr": 0.5})],
        "cls": "Adam",
        "kw": {"lr": 1e-2, "weight_decay": 0.1},
        "bucket_bytes": 64,
    },
    "adamw_amsgrad_named_schedule": {
        "groups": [([(6, 6), (7,), (13,)], "float32", {})],
        "named": True,
        "cls": "AdamW",
        "kw": {"lr": schedules.cosine(1e-2, STEPS), "amsgrad": True},
        "bucket_bytes": 1 << 20,
    },
    "sgd_nesterov_f64": {
        "groups": [([(10,), (3, 3)], "float64", {})],
        "cls": "SGD",
        "kw": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        "bucket_bytes": 96,
    },
    "adam_mixed_bf16_master": {  # one group, two dtypes: two segments
        "groups": [([(9,), (4, 5)], "bfloat16", {}), ([(7,)], "float32", {})],
        "merge": True,  # the two entries above form ONE group
        "cls": "Adam",
        "kw": {"lr": 1e-2, "master_weights": True},
        "bucket_bytes": 64,
    },
    "rprop_grads_already_reduced": {  # every rank passes the same gradients
        "groups": [([(8,), (5, 3)], "float32", {})],
        "cls": "Rprop",
        "kw": {"lr": 1e-2},
        "bucket_bytes": 64,
        "grad_reduction": "none",
    },
    "nadam_scalar_state": {
        "groups": [([(17,), (2, 5)], "float32", {})],
        "cls": "NAdam",
        "kw": {"lr": 1e-2},
        "bucket_bytes": 1 << 20,
    },
}


def case_groups(
    case: dict[str, Any],
) -> list[tuple[list[tuple[int, ...]], list[str], dict[str, Any]]]:
    """Per group: shapes, dtype names, options (entries merged into one group if "merge")."""
    out = [(list(shapes), [dt] * len(shapes), dict(opts)) for shapes, dt, opts in case["groups"]]
    if case.get("merge"):
        shapes = [s for g in out for s in g[0]]
        dts = [d for g in out for d in g[1]]
        return [(shapes, dts, out[0][2])]
    return out


def make_params(name: str, case: dict[str, Any]) -> tuple[Any, list[Any], list[np.ndarray]]:
    """The `params` argument of the case (the same values on every rank and in the test),
    the parameter keys in order, and the arrays in order."""
    rng = np.random.default_rng(sum(map(ord, name)))
    groups: list[Any] = []
    keys: list[Any] = []
    arrays: list[np.ndarray] = []
    for gi, (shapes, dts, opts) in enumerate(case_groups(case)):
        ps = [rng.standard_normal(s).astype(_dtype(d)) for s, d in zip(shapes, dts)]
        if case.get("named"):
            names = [f"g{gi}.p{i}" for i in range(len(ps))]
            groups.append({"params": dict(zip(names, ps)), **opts})
            keys += names
        else:
            groups.append({"params": ps, **opts})
            keys += list(range(len(arrays), len(arrays) + len(ps)))
        arrays += ps
    return groups, keys, arrays


def local_grads(name: str, t: int, rank: int, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Rank `rank`'s gradients at step `t` (deterministic; the same on every rank for a case
    whose gradients are already reduced)."""
    case = DATA_PARALLEL.get(name) or ZERO[name]
    if case.get("grad_reduction") == "none":
        rank = 0
    rng = np.random.default_rng([sum(map(ord, name)), t, rank])
    return [rng.standard_normal(a.shape).astype(a.dtype) for a in arrays]


def ordered_mean(grads: list[np.ndarray], reduction: str = "mean") -> np.ndarray:
    """The documented reduction: ((g_0 + g_1) + ...) / N in float32 for 16-bit gradients
    (else in their dtype), rounded to the gradients' dtype; without the division for "sum";
    rank 0's gradients for "none" (every rank has the same)."""
    if reduction == "none":
        return grads[0]
    acc_t = np.float32 if grads[0].dtype.itemsize < 4 else grads[0].dtype.type
    total = grads[0].astype(acc_t)
    for g in grads[1:]:
        total = total + g.astype(acc_t)
    if reduction == "mean":
        total = total / acc_t(len(grads))
    return total.astype(grads[0].dtype)


def bits(a: np.ndarray) -> np.ndarray:
    """`a`'s bit patterns (bfloat16 has no .npy dtype; compares NaNs too)."""
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


TWICE = "adam_two_groups"  # also saved twice into one directory (out/twice)


# --------------------------------------------------------------------------- the MPI side
def _train(comm: Any, out: Path, resume_from: Path | None, train: bool) -> None:
    from fastoptim import distributed as fd

    rank, n = comm.Get_rank(), comm.Get_size()
    result: dict[str, np.ndarray] = {}
    if train:
        for name, case in DATA_PARALLEL.items():
            groups, keys, arrays = make_params(name, case)
            if rank > 0:  # different starting values: the broadcast makes them rank 0's
                for a in arrays:
                    a[...] = 0
            opt = getattr(fo, case["cls"])(groups, **case["kw"])
            dp = fd.DataParallel(
                opt,
                comm,
                bucket_bytes=case["bucket_bytes"],
                grad_reduction=case.get("grad_reduction", "mean"),
            )
            grads = dp.grads
            for t in range(STEPS):
                mine = local_grads(name, t, rank, arrays)
                if t % 2:  # bound buffers and passed gradients, alternately
                    dp.step(dict(zip(keys, mine)) if case.get("named") else mine)
                else:
                    for k, g in zip(keys, mine):
                        grads[k][...] = g
                    dp.step()
            for i, a in enumerate(arrays):
                result[f"dp/{name}/p{i}"] = bits(a)
            result[f"dp/{name}/bytes"] = np.array([dp.bytes_sent, dp.bytes_per_step * STEPS])
    for name, case in ZERO.items():
        runs = [("zero", None)] if train else []
        if resume_from is not None:
            runs.append(("resumed", resume_from))
        for label, ckpt in runs:
            groups, keys, arrays = make_params(name, case)
            z = fd.ZeroRedundancyOptimizer(
                groups,
                getattr(fo, case["cls"]),
                comm=comm,
                bucket_bytes=case["bucket_bytes"],
                grad_reduction=case.get("grad_reduction", "mean"),
                **case["kw"],
            )
            start = 0
            if ckpt is not None:
                for a in arrays:  # the checkpoint restores them
                    a[...] = np.nan
                z.load(ckpt / name)
                start = CHECKPOINT_AT
            for t in range(start, STEPS):
                mine = local_grads(name, t, rank, arrays)
                if t % 2:
                    z.step(dict(zip(keys, mine)) if case.get("named") else mine)
                else:
                    grads = z.grads
                    for k, g in zip(keys, mine):
                        grads[k][...] = g
                    z.step()
                if ckpt is None and t + 1 == CHECKPOINT_AT:
                    z.save(out / "ckpt" / name)
                if ckpt is None and name == TWICE and t + 1 in (CHECKPOINT_AT, STEPS):
                    z.save(out / "twice" / name)  # the second save replaces the first
            for i, a in enumerate(arrays):
                result[f"{label}/{name}/p{i}"] = bits(a)
            result[f"{label}/{name}/bytes"] = np.array([z.bytes_sent, z.bytes_per_step])
            # this rank's state pieces: (parameter index, a, b) and the arrays
            inner_state = z.optimizer.state_dict()["state"]
            pos = 0
            first = 0
            for gi, g in enumerate(z._groups):
                pieces = g.pieces(rank)
                for j, (pi, a, b) in enumerate(pieces):
                    for sname, arr in inner_state[pos + j].items():
                        key = f"{label}/{name}/state/{first + pi}/{a}/{b}/{sname}"
                        result[key] = bits(arr)
                pos += max(1, len(pieces))
                first += len(g.arrays)
                result[f"{label}/{name}/shard{gi}"] = np.array(z.shards[gi])
    if train:
        _clip(comm, result)
    np.savez(out / f"train-n{n}-rank{rank}.npz", **result)


CLIP = {"lr": 1e-2, "max_grad_norm": 0.5, "skip_nonfinite": True}
CLIP_SHAPES = [(5, 7), (3,), (40,)]
CLIP_BAD_STEP = 2  # rank 1 alone sees an infinite gradient at this step


def clip_grads(t: int, rank: int, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The clipping case's gradients of `rank` at step `t` (every rank its own)."""
    rng = np.random.default_rng([7, t, rank])
    grads = [rng.standard_normal(a.shape).astype(a.dtype) for a in arrays]
    if t == CLIP_BAD_STEP and rank == 1:
        grads[0][0, 0] = np.inf
    return grads


def _clip(comm: Any, result: dict[str, np.ndarray]) -> None:
    """ZeRO-1 AdamW with max_grad_norm and skip_nonfinite: each rank's norm must be the global
    one (engine.transforms' reduce_grad_stats over MPI), one rank's infinity skips every rank."""
    from fastoptim import distributed as fd

    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in CLIP_SHAPES]
    same = [a.copy() for a in arrays]
    z = fd.ZeroRedundancyOptimizer(arrays, fo.AdamW, comm=comm, **CLIP)
    dp = fd.DataParallel(fo.AdamW(same, **CLIP), comm)
    for wrapper, key in ((z, "clip"), (dp, "clip-dp")):
        norms, skipped, kept = [], [], []
        for t in range(STEPS):
            norm = wrapper.step(clip_grads(t, comm.Get_rank(), arrays))
            norms.append(np.nan if norm is None else norm)
            skipped.append(wrapper.step_skipped)  # (the wrapper's: its optimizer's)
            kept.append(np.nan if wrapper.grad_norm is None else wrapper.grad_norm)
            assert wrapper.step_skipped == wrapper.optimizer.step_skipped
        for i, a in enumerate(arrays if wrapper is z else same):
            result[f"{key}/p{i}"] = a
        result[f"{key}/norms"] = np.array(norms)
        result[f"{key}/grad_norm"] = np.array(kept)
        result[f"{key}/skipped"] = np.array(skipped)


def _load_only(comm: Any, out: Path, ckpt: Path) -> None:
    """Load checkpoint directory `ckpt` into the TWICE case; record the outcome."""
    from fastoptim import distributed as fd

    case = ZERO[TWICE]
    groups, _, _ = make_params(TWICE, case)
    z = fd.ZeroRedundancyOptimizer(groups, getattr(fo, case["cls"]), comm=comm, **case["kw"])
    try:
        z.load(ckpt)
        got = "no error"
    except Exception as e:
        got = f"{type(e).__name__}: {e}"
    (out / f"load-rank{comm.Get_rank()}.json").write_text(json.dumps(got))


def _mismatch(comm: Any, out: Path) -> None:
    from fastoptim import distributed as fd

    rank = comm.Get_rank()
    got: dict[str, str] = {}

    def attempt(label: str, fn: Any) -> None:
        try:
            fn()
            got[label] = "no error"
        except Exception as e:
            got[label] = f"{type(e).__name__}: {e}"

    def shapes() -> None:
        fd.DataParallel(fo.Adam([np.zeros(4 + rank, np.float32)]), comm)

    def dtypes() -> None:
        fd.DataParallel(fo.Adam([np.zeros(4, np.float32 if rank == 0 else np.float64)]), comm)

    def lr() -> None:
        fd.DataParallel(fo.Adam([np.zeros(4, np.float32)], lr=0.1 if rank == 0 else 0.2), comm)

    def lr_before_first_step() -> None:
        dp = fd.DataParallel(fo.SGD([np.zeros(4, np.float32)], lr=0.1), comm)
        if rank == 1:
            dp.param_groups[0]["lr"] = 0.3
        dp.step()

    def bad_grads() -> None:
        dp = fd.DataParallel(fo.SGD([np.zeros(4, np.float32)], lr=0.1), comm)
        dp.step([np.zeros(4 if rank == 0 else 5, np.float32)])

    def zero_betas() -> None:
        betas = (0.9, 0.999) if rank == 0 else (0.8, 0.999)
        fd.ZeroRedundancyOptimizer([np.zeros(9, np.float32)], fo.Adam, comm=comm, betas=betas)

    def zero_shapes() -> None:
        fd.ZeroRedundancyOptimizer([np.zeros((3, 3 + rank), np.float32)], fo.Adam, comm=comm)

    def zero_not_array() -> None:  # fails while parsing on rank 1 only
        p = np.zeros(9, np.float32) if rank == 0 else [1.0] * 9
        fd.ZeroRedundancyOptimizer([p], fo.Adam, comm=comm)

    def zero_bad_option_one_rank() -> None:  # caught by the signature, not the inner class
        fd.ZeroRedundancyOptimizer(
            [np.zeros(9, np.float32)], fo.Adam, comm=comm, lr=-1.0 if rank == 1 else 0.1
        )

    def zero_invalid_everywhere() -> None:  # the same invalid option: the class's own error
        fd.ZeroRedundancyOptimizer([np.zeros(9, np.float32)], fo.Adam, comm=comm, lr=-1.0)

    def zero_checkpoint_missing_on_one_rank() -> None:
        z = fd.ZeroRedundancyOptimizer([np.zeros(9, np.float32)], fo.Adam, comm=comm)
        z.save(out / "valid")
        z.load(out / ("nothing-here" if rank == 1 else "valid"))

    def zero_checkpoints_differ_by_rank() -> None:  # each valid: one rank loaded its own
        p = np.zeros(9, np.float32)
        z = fd.ZeroRedundancyOptimizer([p], fo.Adam, comm=comm, lr=0.1)
        z.step([np.ones(9, np.float32)])
        z.save(out / "at1")
        z.step([np.ones(9, np.float32)])
        z.save(out / "at2")
        before = p.copy()
        try:
            z.load(out / ("at1" if rank == 0 else "at2"))
        finally:  # (refused on every rank before any changed anything)
            if z.step_count != 2 or not np.array_equal(p, before):
                raise AssertionError(f"rank {rank} changed: step_count {z.step_count}")

    def grads_on_one_rank_first_step() -> None:
        dp = fd.DataParallel(fo.SGD([np.zeros(4, np.float32)], lr=0.1), comm)
        dp.step([np.ones(4, np.float32)] if rank == 0 else None)

    def grads_on_one_rank_later() -> None:  # after a good step (it deadlocked)
        z = fd.ZeroRedundancyOptimizer([np.zeros(9, np.float32)], fo.SGD, comm=comm, lr=0.1)
        z.step([np.ones(9, np.float32)])
        z.step([np.ones(9, np.float32)] if rank == 0 else None)

    def zero_int8() -> None:  # refused everywhere: the blocks would straddle the shards
        fd.ZeroRedundancyOptimizer(
            [np.zeros(16384, np.float32)], fo.AdamW, comm=comm, state_dtype="int8"
        )

    def zero_int4_in_a_group() -> None:
        p = np.zeros(16384, np.float32)
        groups = [{"params": [p], "state_dtype": {"exp_avg": "int4"}}]
        fd.ZeroRedundancyOptimizer(groups, fo.AdamW, comm=comm)

    # A group added to the shard's optimizer on every rank: it was stepped on each rank
    # with that rank's own gradients (never reduced, sharded or gathered), int8 state included.
    def zero_group_added_to_the_shard_optimizer() -> None:
        z = fd.ZeroRedundancyOptimizer([np.ones(64, np.float32)], fo.AdamW, comm=comm)
        extra = np.ones(8192, np.float32)
        z.optimizer.add_param_group({"params": [extra], "state_dtype": "int8"})
        z.optimizer.grads[-1][...] = rank + 1.0
        try:
            z.step()
        finally:
            assert (extra == 1.0).all()  # (untouched)

    # A step refused on one rank only (after a good one), where the others entered the
    # collectives: they hung (ZeRO-1's clipping all-reduce, the next all-gather) or stepped
    # alone.  Now checked before any collective.
    def zero_schedule_fails_on_one_rank() -> None:
        def lr(t: int) -> float:
            if t > 0 and rank == 1:
                raise RuntimeError("schedule failed on rank 1")
            return 0.1

        z = fd.ZeroRedundancyOptimizer(
            [np.zeros(9, np.float32)], fo.SGD, comm=comm, lr=lr, max_grad_norm=1.0
        )
        z.step([np.ones(9, np.float32)])
        z.step([np.ones(9, np.float32)])

    def dp_lr_invalid_on_one_rank() -> None:
        dp = fd.DataParallel(fo.SGD([np.zeros(4, np.float32)], lr=0.1), comm)
        dp.step([np.ones(4, np.float32)])
        if rank == 1:
            dp.param_groups[0]["lr"] = -1.0
        dp.step([np.ones(4, np.float32)])

    def zero_read_only_on_one_rank() -> None:
        w = np.zeros(9, np.float32)
        z = fd.ZeroRedundancyOptimizer([w], fo.SGD, comm=comm, lr=0.1)
        z.step([np.ones(9, np.float32)])
        w.flags.writeable = rank != 1
        z.step([np.ones(9, np.float32)])

    def dp_group_added_on_one_rank() -> None:
        opt = fo.SGD([np.zeros(4, np.float32)], lr=0.1)
        dp = fd.DataParallel(opt, comm)
        dp.step([np.ones(4, np.float32)])
        if rank == 0:
            opt.add_param_group({"params": [np.zeros(2, np.float32)]})
        dp.step()

    # A valid hyper-parameter changed on one rank only after the first step (no check()):
    # the ranks had silently diverged.  The step's digest now finds it before anything moves.
    def changed_on_one_rank_later(wrapper: Any, w: np.ndarray, on: int, key: str) -> None:
        wrapper.step([np.ones(w.size, np.float32)])
        if rank == on:
            wrapper.param_groups[0][key] = 0.5 if key == "momentum" else 0.3
        try:
            wrapper.step([np.ones(w.size, np.float32)])
        finally:
            assert np.all(w == np.float32(-0.1)), w  # nothing moved on any rank

    def dp_lr_changed_on_one_rank_later() -> None:
        w = np.zeros(4, np.float32)
        changed_on_one_rank_later(fd.DataParallel(fo.SGD([w], lr=0.1), comm), w, 1, "lr")

    def zero_momentum_changed_on_one_rank_later() -> None:
        w = np.zeros(9, np.float32)
        z = fd.ZeroRedundancyOptimizer([w], fo.SGD, comm=comm, lr=0.1, momentum=0.9)
        changed_on_one_rank_later(z, w, 0, "momentum")

    def schedules_and_changes_made_alike_step() -> None:  # no false alarm
        w = np.zeros(4, np.float32)
        dp = fd.DataParallel(fo.SGD([w], lr=lambda t: 0.1 / (t + 1), momentum=0.5), comm)
        for t in range(3):
            dp.step([np.ones(4, np.float32)])
            dp.param_groups[0]["momentum"] = 0.1 * t  # on every rank
        assert dp.optimizer.step_count == 3

    # Named parameters in another order on one rank (same names, dtypes, shapes): the
    # gradient blocks and ZeRO's ranges follow each rank's order, and got mixed silently.
    def _named() -> dict[str, np.ndarray]:
        d = {"w": np.zeros(16, np.float32), "b": np.zeros(16, np.float32)}
        return d if rank == 0 else {"b": d["b"], "w": d["w"]}

    def dp_named_order() -> None:
        fd.DataParallel(fo.SGD(_named(), lr=1.0), comm)

    def zero_named_order() -> None:
        fd.ZeroRedundancyOptimizer(_named(), fo.SGD, comm=comm, lr=1.0)

    # A schedule described alike everywhere but giving each rank its own value (the digest
    # differs, the setups agree): the values are compared and named.
    def dp_schedule_value_differs() -> None:
        w = np.zeros(4, np.float32)
        dp = fd.DataParallel(fo.SGD([w], lr=lambda t: 0.1 * (1 + rank)), comm)
        try:
            dp.step([np.ones(4, np.float32)])
        finally:
            assert np.all(w == 0), w

    def zero_same_array_twice() -> None:  # refused everywhere, as one process refuses it
        a = np.zeros(4, np.float32)
        fd.ZeroRedundancyOptimizer([a, a], fo.SGD, comm=comm, lr=0.1)

    def dp_closure_optimizer() -> None:
        fd.DataParallel(fo.LBFGS([np.zeros(4, np.float32)]), comm)

    def still_works() -> None:
        w = np.zeros(4, np.float32)
        dp = fd.DataParallel(fo.SGD([w], lr=1.0), comm)
        dp.step([np.full(4, float(rank), np.float32)])
        assert np.all(w == -np.mean(np.arange(comm.Get_size(), dtype=np.float32)))

    for fn in (
        shapes,
        dtypes,
        lr,
        lr_before_first_step,
        bad_grads,
        zero_betas,
        zero_shapes,
        zero_not_array,
        zero_bad_option_one_rank,
        zero_invalid_everywhere,
        zero_checkpoint_missing_on_one_rank,
        zero_checkpoints_differ_by_rank,
        grads_on_one_rank_first_step,
        grads_on_one_rank_later,
        zero_int8,
        zero_int4_in_a_group,
        zero_group_added_to_the_shard_optimizer,
        zero_schedule_fails_on_one_rank,
        dp_lr_invalid_on_one_rank,
        zero_read_only_on_one_rank,
        dp_group_added_on_one_rank,
        dp_lr_changed_on_one_rank_later,
        zero_momentum_changed_on_one_rank_later,
        schedules_and_changes_made_alike_step,
        dp_named_order,
        zero_named_order,
        dp_schedule_value_differs,
        zero_same_array_twice,
        dp_closure_optimizer,
        still_works,
    ):
        attempt(fn.__name__, fn)
    (out / f"mismatch-rank{rank}.json").write_text(json.dumps(got))


def _big(comm: Any, out: Path) -> None:
    """The collectives on a segment over 2 GiB (2**31 bytes: MPI's int counts and
    displacements), as a group of 600M float32 elements would give: the reduce-scatter of
    every bucket exact against its sums, then the allgather of every rank's range.  (Called
    at this level: a whole optimizer of that size needs more memory than a test machine.)"""
    from fastoptim import distributed

    c = distributed._Comm(comm)
    size = 600_000_000  # float32: 2.4e9 bytes; divisible by the pattern's period
    # Buckets of 128 MiB: 18, rank 1's last three starting past 2**31 bytes.
    seg = distributed._Segment(np.dtype(np.float32), size, distributed._even(size, c.size), 1 << 27)
    period = np.arange(1000, dtype=np.float32)
    flat = np.empty(size, np.float32)
    flat.reshape(-1, 1000)[...] = period + c.rank  # rank r's element e: e % 1000 + r
    wrong = []
    for i in range(seg.k):
        lo, hi = seg.chunk(i, c.rank)
        got = c.reduce_scatter(seg, i, flat, average=False)
        base = np.arange(lo, hi, dtype=np.int64) % 1000
        want = (c.size * base + sum(range(c.size))).astype(np.float32)  # (exact)
        wrong.append(int(np.count_nonzero(got != want)))
        del got, base, want
    for i in range(seg.k):
        lo, hi = seg.chunk(i, c.rank)
        flat[lo:hi] = -1.0 - c.rank
        c.allgather(seg, i, flat, [seg.chunk(i, r)[0] for r in range(c.size)])
    gathered = [int(np.count_nonzero(flat[a:b] != -1.0 - r)) for r, (a, b) in enumerate(seg.ranges)]
    last = max(seg.chunk(i, r)[0] for i in range(seg.k) for r in range(c.size))
    result = {
        "buckets": seg.k,
        "largest_offset": 4 * last,
        "reduce_wrong": wrong,
        "gather_wrong": gathered,
    }
    (out / f"big-rank{c.rank}.json").write_text(json.dumps(result))


def main() -> None:
    from mpi4py import MPI

    mode, out = sys.argv[1], Path(sys.argv[2])
    ckpt = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    comm = MPI.COMM_WORLD
    if mode == "train":
        _train(comm, out, ckpt, train=True)
    elif mode == "resume":
        _train(comm, out, ckpt, train=False)
    elif mode == "load" and ckpt is not None:
        _load_only(comm, out, ckpt)
    elif mode == "mismatch":
        _mismatch(comm, out)
    elif mode == "big":
        _big(comm, out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
