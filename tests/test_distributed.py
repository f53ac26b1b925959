"""fastoptim.distributed with real MPI processes: ``mpiexec -n 2`` and ``-n 3`` (uneven shards)
run tests/mpi_worker.py, and what every rank computed is compared, bit for bit, with one
process stepping the same optimizer on the mean gradient reduced in rank order (data-parallel)
or on all parameters (ZeRO-1), including ZeRO checkpoints saved with 2 ranks and resumed with
3 and with 1.  Every launch has a timeout: a deadlock fails the test instead of hanging it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from fastoptim import distributed
from mpi_worker import (
    CHECKPOINT_AT,
    DATA_PARALLEL,
    STEPS,
    TWICE,
    ZERO,
    bits,
    local_grads,
    make_params,
    ordered_mean,
)

WORKER = Path(__file__).resolve().parent / "mpi_worker.py"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mpi_mlp.py"
TIMEOUT = 180  # seconds per launch (a few seconds normally; CI's machine is shared)


def _mpiexec() -> str | None:
    here = os.path.dirname(sys.executable)  # a venv's mpiexec (the mpich wheel) first
    return shutil.which("mpiexec", path=here + os.pathsep + os.environ.get("PATH", ""))


MPIEXEC = _mpiexec()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and an mpiexec (pip install 'fastoptim[mpi]')",
)


def launch(n: int, *args: str | Path, script: Path = WORKER) -> str:
    """``mpiexec -n n python script args`` (``python -m mpi4py script`` if `args` is
    ``("-m", "mpi4py")``), killed (all its processes) after TIMEOUT; its stdout."""
    assert MPIEXEC is not None
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        # Open MPI's mpiexec (if that is the one installed) refuses root and more ranks than
        # cores without these; MPICH ignores them.
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    }
    pre, post = (list(args), []) if args[:1] == ("-m",) else ([], list(args))
    cmd = [MPIEXEC, "-n", str(n), sys.executable, *pre, str(script), *map(str, post)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT} s (deadlock?)")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}\n{err}"
    return out


def results(out: Path, n: int) -> list[dict[str, np.ndarray]]:
    ranks = []
    for r in range(n):
        with np.load(out / f"train-n{n}-rank{r}.npz") as f:
            ranks.append(dict(f))
    return ranks


@pytest.fixture(scope="module")
def run2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    out = tmp_path_factory.mktemp("n2")
    launch(2, "train", out)
    return out, results(out, 2)


@pytest.fixture(scope="module")
def run3(
    tmp_path_factory: pytest.TempPathFactory, run2: tuple[Path, Any]
) -> list[dict[str, np.ndarray]]:
    """Three ranks, resuming the ZeRO cases from the two-rank checkpoints too."""
    out = tmp_path_factory.mktemp("n3")
    launch(3, "train", out, run2[0] / "ckpt")
    return results(out, 3)


def by_n(n: int, run2: Any, run3: Any) -> list[dict[str, np.ndarray]]:
    return run2[1] if n == 2 else run3  # type: ignore[no-any-return]


def reference(
    name: str, case: dict[str, Any], n: int, saved_with: int | None = None
) -> tuple[list[np.ndarray], Any, Any]:
    """One process, all parameters, the mean gradient of the `n` ranks (in rank order); of
    `saved_with` ranks before the checkpoint if given."""
    groups, keys, arrays = make_params(name, case)
    opt = getattr(fo, case["cls"])(groups, **case["kw"])
    for t in range(STEPS):
        ranks = n if saved_with is None or t >= CHECKPOINT_AT else saved_with
        per_rank = [local_grads(name, t, r, arrays) for r in range(ranks)]
        how = case.get("grad_reduction", "mean")
        opt.step([ordered_mean([g[i] for g in per_rank], how) for i in range(len(arrays))])
    return arrays, keys, opt


def test_ordered_mean_is_not_the_pairwise_mean() -> None:
    """The reference's order matters (so bit-equality below is a real check): summing three
    float32 gradients in another order gives other bits."""
    g = [np.random.default_rng(r).standard_normal(1000).astype(np.float32) for r in range(3)]
    other = ((g[2] + g[1]) + g[0]) / np.float32(3)
    assert not np.array_equal(ordered_mean(g), other)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", list(DATA_PARALLEL))
def test_data_parallel_matches_one_process(name: str, n: int, run2: Any, run3: Any) -> None:
    ranks = by_n(n, run2, run3)
    arrays, _, _ = reference(name, DATA_PARALLEL[name], n)
    for r, res in enumerate(ranks):
        for i, want in enumerate(arrays):
            got = res[f"dp/{name}/p{i}"]
            np.testing.assert_array_equal(got, bits(want), err_msg=f"rank {r} param {i}")
        sent, formula = res[f"dp/{name}/bytes"]
        assert sent == formula > 0  # counted as passed to MPI == DataParallel.bytes_per_step


@pytest.mark.parametrize("n", [2, 3])
def test_data_parallel_bytes_are_the_ring_allreduce_volume(n: int, run2: Any, run3: Any) -> None:
    """Without alignment padding (tensors of 16 floats) the ranks send 2 (N-1) S bytes per
    step together, S the gradients' bytes, as a ring all-reduce."""
    ranks = by_n(n, run2, run3)
    _, _, arrays = make_params("lion_unpadded", DATA_PARALLEL["lion_unpadded"])
    s = sum(a.nbytes for a in arrays)
    total = sum(int(res["dp/lion_unpadded/bytes"][0]) for res in ranks)
    assert total == 2 * (n - 1) * s * STEPS
    assert total / n / STEPS == pytest.approx(distributed.bytes_per_step(s, n, "data_parallel"))


def _check_zero(name: str, label: str, ranks: list[dict[str, np.ndarray]], n: int) -> None:
    case = ZERO[name]
    arrays, keys, opt = reference(name, case, n, None if label == "zero" else 2)
    for r, res in enumerate(ranks):
        for i, want in enumerate(arrays):
            got = res[f"{label}/{name}/p{i}"]
            np.testing.assert_array_equal(got, bits(want), err_msg=f"rank {r} param {i}")
    # The state: every rank's pieces are the reference's elements [a, b) of the parameter,
    # and together they cover every element of every state buffer once.
    covered: dict[tuple[int, str], int] = {}
    prefix = f"{label}/{name}/state/"
    for res in ranks:
        for key, got in res.items():
            if not key.startswith(prefix):
                continue
            i, a, b, sname = key[len(prefix) :].split("/")
            full = opt.state[keys[int(i)]][sname].reshape(-1)
            np.testing.assert_array_equal(got, bits(full[int(a) : int(b)]), err_msg=key)
            covered[int(i), sname] = covered.get((int(i), sname), 0) + int(b) - int(a)
    want_cover = {
        (i, s): arrays[i].size for i, k in enumerate(keys) for s in opt.state[k] if s != "step"
    }
    assert covered == want_cover


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", list(ZERO))
def test_zero1_matches_one_process(name: str, n: int, run2: Any, run3: Any) -> None:
    ranks = by_n(n, run2, run3)
    _check_zero(name, "zero", ranks, n)
    # uneven contiguous shards covering each group
    for gi in range(len([k for k in ranks[0] if k.startswith(f"zero/{name}/shard")])):
        shards = [tuple(res[f"zero/{name}/shard{gi}"]) for res in ranks]
        assert shards[0][0] == 0 and all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    # bytes: counted == the formula; the ranks together 2 (N-1) S (gradients + parameters)
    _, _, arrays = make_params(name, ZERO[name])
    s = sum(a.nbytes for a in arrays)
    sent = [int(res[f"zero/{name}/bytes"][0]) for res in ranks]
    per_step = [int(res[f"zero/{name}/bytes"][1]) for res in ranks]
    assert sent == [p * STEPS for p in per_step]
    if ZERO[name].get("grad_reduction") == "none":  # the parameters' all-gather only
        assert sum(per_step) == (n - 1) * s
        assert sum(per_step) / n == pytest.approx(
            distributed.bytes_per_step(s, n, "zero1_no_reduce")
        )
    else:
        assert sum(per_step) == 2 * (n - 1) * s
        assert sum(per_step) / n == pytest.approx(distributed.bytes_per_step(s, n, "zero1"))


@pytest.mark.parametrize("name", list(ZERO))
def test_zero1_checkpoint_of_2_ranks_resumed_on_3(name: str, run3: Any) -> None:
    _check_zero(name, "resumed", run3, 3)


@pytest.fixture(scope="module")
def resumed1(tmp_path_factory: pytest.TempPathFactory, run2: Any) -> list[dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("n1")
    launch(1, "resume", out, run2[0] / "ckpt")
    return results(out, 1)


@pytest.mark.parametrize("name", list(ZERO))
def test_zero1_checkpoint_of_2_ranks_resumed_on_1(name: str, resumed1: Any) -> None:
    _check_zero(name, "resumed", resumed1, 1)


def test_zero1_checkpoint_files(run2: Any) -> None:
    """One fastoptim checkpoint per rank, readable by np.load, and the manifest."""
    ckpt = run2[0] / "ckpt" / "adam_two_groups"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["optimizer"] == "Adam"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(["manifest.json", *manifest["files"]])
    assert manifest["groups"][0]["shards"] == [[0, 24], [24, 49]]
    with np.load(ckpt / manifest["files"][0]) as f:
        assert "meta" in f.files and "s0.exp_avg" in f.files


def test_zero1_checkpoint_replaced_atomically_and_mixed_shards_refused(
    run2: Any, tmp_path: Path
) -> None:
    """A second save into the same directory leaves only its own files; a directory whose
    shards come from two saves (a crash between two ranks' writes, files copied by hand) is
    refused on every rank instead of mixing steps."""
    twice = run2[0] / "twice" / TWICE
    manifest = json.loads((twice / "manifest.json").read_text())
    assert manifest["step_count"] == STEPS
    assert sorted(p.name for p in twice.iterdir()) == sorted(["manifest.json", *manifest["files"]])
    first = run2[0] / "ckpt" / TWICE  # the same run, saved at CHECKPOINT_AT
    old = json.loads((first / "manifest.json").read_text())
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(first / "manifest.json", mixed)
    shutil.copy(first / old["files"][0], mixed / old["files"][0])
    shutil.copy(twice / manifest["files"][1], mixed / old["files"][1])  # another step
    launch(2, "load", tmp_path, mixed)
    for r in range(2):
        got = json.loads((tmp_path / f"load-rank{r}.json").read_text())
        assert got.startswith("DistributedError") and "not the same checkpoint" in got, got
    launch(2, "load", tmp_path, first)  # the consistent one loads
    for r in range(2):
        assert json.loads((tmp_path / f"load-rank{r}.json").read_text()) == "no error"


@pytest.mark.parametrize("n", [2, 3])
def test_mismatched_ranks_raise_on_every_rank(n: int, tmp_path: Path) -> None:
    launch(n, "mismatch", tmp_path)
    got = [json.loads((tmp_path / f"mismatch-rank{r}.json").read_text()) for r in range(n)]
    expect = {
        "shapes": "param 0",
        "dtypes": "float64",
        "lr": "group 0 lr",
        "lr_before_first_step": "group 0 lr: 0.1 on rank 0, 0.3 on rank 1",
        "bad_grads": "rank 1: ValueError: DataParallel.step: the gradient of parameter 0",
        "zero_betas": "0.8",
        "zero_shapes": "(3, 4)",
        "zero_not_array": "rank 1: TypeError",
        "zero_bad_option_one_rank": "defaults",
        "zero_checkpoint_missing_on_one_rank": "rank 1: CheckpointError",
        "zero_checkpoints_differ_by_rank": "the ranks read different checkpoints",
        "grads_on_one_rank_first_step": "gradients were passed on rank(s) [0] and not",
        "grads_on_one_rank_later": "gradients were passed on rank(s) [0] and not",
        "zero_schedule_fails_on_one_rank": "rank 1: ValueError: SGD: the schedule of lr",
        "dp_lr_invalid_on_one_rank": "rank 1: ValueError: SGD: invalid lr=-1.0",
        "zero_read_only_on_one_rank": "rank 1: ValueError: ZeroRedundancyOptimizer.step: param 0",
        "dp_group_added_on_one_rank": "rank 0: RuntimeError: DataParallel: parameter groups",
        "dp_lr_changed_on_one_rank_later": "group 0 lr: 0.1 on rank 0, 0.3 on rank 1",
        "zero_momentum_changed_on_one_rank_later": "group 0 momentum: 0.5 on rank 0, 0.9 on",
        "dp_named_order": "group 0 param 0: 'w' float32 (16,) on rank 0, 'b' float32 (16,) on",
        "zero_named_order": "group 0 param 0: 'w' float32 (16,) on rank 0, 'b' float32 (16,)",
        "dp_schedule_value_differs": "group 0 lr (this step's value): 0.1 on rank 0, 0.2 on",
    }
    for r, per_rank in enumerate(got):
        for label, text in expect.items():
            assert per_rank[label].startswith("DistributedError"), (r, label, per_rank[label])
            assert text in per_rank[label], (r, label, per_rank[label])
        # the same invalid option on every rank: the optimizer's own error, everywhere
        assert per_rank["zero_invalid_everywhere"].startswith("ValueError: Adam: invalid lr")
        # quantized state under ZeRO-1: refused on every rank (its blocks span the shards)
        assert per_rank["zero_int8"].startswith(
            "ValueError: ZeroRedundancyOptimizer: state_dtype='int8': quantized state"
        )
        assert per_rank["zero_int4_in_a_group"].startswith(
            "ValueError: ZeroRedundancyOptimizer: state_dtype={'exp_avg': 'int4'}"
        )
        assert per_rank["zero_group_added_to_the_shard_optimizer"].startswith(
            "ValueError: ZeroRedundancyOptimizer.step: a parameter group was added to the "
            "shard's optimizer"
        )
        assert per_rank["still_works"] == "no error", per_rank["still_works"]
        assert per_rank["zero_same_array_twice"] == (
            "ValueError: ZeroRedundancyOptimizer: param 1 shares memory with param 0; every "
            "array must be distinct"
        )
        assert per_rank["dp_closure_optimizer"].startswith(
            "TypeError: DataParallel: LBFGS steps with a closure"
        )
        assert per_rank["schedules_and_changes_made_alike_step"] == "no error", per_rank
    # the checkpoint of the last scenario was loaded on rank 0 but changed nothing there
    assert "rank 0" not in got[0]["zero_checkpoint_missing_on_one_rank"]


def _example_numbers(out: str) -> tuple[float, float, int, int]:
    """(first epoch's loss, final loss, bytes sent per step, the formula's) from its output."""
    first = re.search(r"epoch 1  loss ([\d.]+)", out)
    final = re.search(r"final loss: ([\d.]+)", out)
    sent = re.search(r"bytes sent per step by rank 0: (\d+) \(formula (\d+)\)", out)
    assert first and final and sent, out
    return float(first[1]), float(final[1]), int(sent[1]), int(sent[2])


@pytest.mark.skipif(not EXAMPLE.is_file(), reason="examples/ is not beside tests/")
def test_mpi_mlp_example_2_ranks_reach_the_loss_of_1() -> None:
    first1, final1, sent1, _ = _example_numbers(launch(1, "-m", "mpi4py", script=EXAMPLE))
    first2, final2, sent2, formula2 = _example_numbers(launch(2, "-m", "mpi4py", script=EXAMPLE))
    assert final1 < first1 / 2  # it learned
    # the same trajectory: the mean of the two halves' mean gradients is the batch's mean
    # gradient up to rounding
    assert abs(final2 - final1) <= 1e-4 * final1
    assert abs(first2 - first1) <= 1e-4 * first1
    assert sent1 == 0 and sent2 == formula2 > 0


@pytest.mark.parametrize("n", [2, 3])
def test_zero1_clipping_sees_every_rank(n: int, run2: Any, run3: Any) -> None:
    """ZeRO-1 (and DataParallel) with max_grad_norm and skip_nonfinite: every rank reports the
    norm of all the mean gradients (each rank holds a shard of them), an infinity on one rank
    skips the step on every rank, and the result is one process's (up to the order of the
    norm's sum).  The wrappers' own ``step_skipped`` and ``grad_norm`` say so too."""
    from mpi_worker import CLIP, CLIP_BAD_STEP, CLIP_SHAPES, clip_grads

    ranks = by_n(n, run2, run3)
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in CLIP_SHAPES]
    opt = fo.AdamW(arrays, **CLIP)
    norms = []
    for t in range(STEPS):
        per_rank = [clip_grads(t, r, arrays) for r in range(n)]
        grads = [ordered_mean([g[i] for g in per_rank]) for i in range(len(arrays))]
        norm = opt.step(grads)
        assert opt.step_skipped == (t == CLIP_BAD_STEP)
        norms.append(np.nan if norm is None else norm)
    for res in ranks:
        for key in ("clip", "clip-dp"):  # ZeRO-1, DataParallel
            want_skipped = [t == CLIP_BAD_STEP for t in range(STEPS)]
            assert list(res[f"{key}/skipped"]) == want_skipped, key
            got, want = res[f"{key}/norms"], np.array(norms)
            finite = np.isfinite(want)
            np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, err_msg=key)
            # the wrapper's grad_norm: what its step returned
            np.testing.assert_array_equal(res[f"{key}/grad_norm"], got, err_msg=key)
            for i, a in enumerate(arrays):
                np.testing.assert_allclose(res[f"{key}/p{i}"], a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", ["LAMB", "LARS", "Adafactor", "Muon", "LBFGS"])
def test_zero1_refuses_updates_that_need_whole_parameters(cls: str) -> None:
    """Adafactor's factored moments and RMS, Muon's orthogonalisation and LBFGS's one vector
    need each whole parameter (or all of them): ZeRO-1's flat pieces gave Adafactor other
    results without an error (0.012 after 4 steps at one rank), Muon an error naming a piece's
    shape, LBFGS one at its first step."""
    from mpi4py import MPI

    # (LBFGS: not DataParallel either, which refuses closures: the message says so)
    match = "neither class of fastoptim.distributed" if cls == "LBFGS" else "use DataParallel"
    with pytest.raises(ValueError, match=match):
        distributed.ZeroRedundancyOptimizer(
            [np.zeros((4, 6), np.float32)], getattr(fo, cls), comm=MPI.COMM_SELF
        )


@pytest.mark.parametrize("comm", ["world", 0, object()])
def test_a_comm_that_is_not_a_communicator_is_named(comm: Any) -> None:
    """``comm`` that is not an mpi4py communicator: a TypeError naming it (was an
    AttributeError from inside: ``'str' object has no attribute 'Get_rank'``)."""
    w = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"^DataParallel: comm must be an mpi4py communicator"):
        distributed.DataParallel(fo.SGD([w], lr=0.1), comm)
    with pytest.raises(TypeError, match=r"^ZeroRedundancyOptimizer: comm must be an mpi4py"):
        distributed.ZeroRedundancyOptimizer([w], fo.SGD, comm=comm, lr=0.1)


@pytest.mark.re_views
def test_the_agreed_check_sees_what_the_step_refuses() -> None:
    """What every rank agrees on before the collectives includes the plans' own check (a
    parameter re-viewed with another shape passed it, then the step raised on that rank alone,
    after the all-reduce)."""
    from mpi4py import MPI

    w = np.zeros(16, np.float32)
    dp = distributed.DataParallel(fo.SGD([w], lr=0.1), MPI.COMM_SELF)
    dp.step([np.ones(16, np.float32)])
    w.shape = (4, 4)
    with pytest.raises(ValueError, match="changed in place"):
        dp.optimizer._check_ready("DataParallel.step")


def test_collectives_on_a_segment_over_2_gib(tmp_path: Path) -> None:
    """A group whose float32 run is over 2 GiB (600M elements, 18 buckets of 128 MiB): MPI's
    counts and displacements are C ints, and the last chunks of rank 1 start past 2**31 bytes
    (mpi4py >= 4 passes them through MPI-4's large-count calls).  Two ranks; every reduced
    element exact and every rank's range gathered by every rank.  (About 3 GB per rank.)"""
    launch(2, "big", tmp_path)
    for r in range(2):
        got = json.loads((tmp_path / f"big-rank{r}.json").read_text())
        assert got["buckets"] == 18 and got["largest_offset"] > 2**31, got
        assert got["reduce_wrong"] == [0] * 18 and got["gather_wrong"] == [0, 0], got
