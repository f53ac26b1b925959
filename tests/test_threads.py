"""Threads: fastoptim's worker pool, thread safety of one plan, fork, the thread-count contract.

- The pool (``run_chunks`` in ``cpp/src/dispatch.cpp``): a step's index space is cut into fixed
  chunks claimed from a shared counter by whichever threads run; results are bit-identical
  whatever the thread count, the load of the machine or which thread ran which chunk.
- One compiled plan stepped and re-bound from several Python threads: steps are serialised by
  the plan's mutex (no use-after-free of replaced gradients), different plans run in parallel.
- ``fork``: a child never hangs; it runs serially until it calls ``set_num_threads``.  Each fork
  scenario runs in a subprocess with a timeout, so that a hang fails instead of blocking.
- ``set_num_threads`` / ``OMP_NUM_THREADS``: nonsense is rejected (or, for the environment,
  ignored), huge values are capped at ``max_threads()``.

No test here imports torch: the file runs under AddressSanitizer (``.ci/sanitize``).  No timing
is asserted (``fastoptim bench --background-load N`` measures the busy-machine case).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from cases import once_not_per_isa
from fastoptim import _core

LARGE = 4_000_000  # the size of the issues' fork reports (a multi-threaded step)


pytestmark = pytest.mark.usefixtures("restore_threads")  # (tests/conftest.py)


def _run_python(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (a hang becomes a TimeoutExpired failure), with the
    default instruction set whatever ``FASTOPT_ISA`` says: the tests built on it are
    ``once_not_per_isa`` (CI's per-ISA runs would repeat them exactly)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTOPT_ISA", "OMP_NUM_THREADS")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# ----------------------------------------------------------------------------- the pool
SIZES = [100_003, 8_192, 1, 77_777, 16, 300_000]  # odd tails, one chunk, more chunks than 256


def _problem(dtype: type[np.floating[Any]]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    grads = [[rng.standard_normal(n).astype(dtype) for n in SIZES] for _ in range(3)]
    return params, grads


def _run(cls: Callable[..., fo.Optimizer], dtype: Any, threads: int, **kw: Any) -> list[bytes]:
    fo.set_num_threads(threads)
    params, grads = _problem(dtype)
    opt = cls(params, **kw)
    for g in grads:
        opt.step(g)
    out = [p.tobytes() for p in params]
    for s in opt.state.values():
        out += [v.tobytes() for k, v in s.items() if isinstance(v, np.ndarray) and k != "step"]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("cls", "kw"),
    [(fo.Adam, {"amsgrad": True}), (fo.SGD, {"lr": 0.1, "momentum": 0.9}), (fo.NAdam, {})],
)
def test_bit_identical_for_any_thread_count(
    isa: str, dtype: Any, cls: Callable[..., fo.Optimizer], kw: dict[str, Any]
) -> None:
    """1 thread (one sweep per tensor) against 2, 3 and max_threads() (chunks on the pool,
    oversubscribed at the maximum), every tensor's parameter and state bytes."""
    _core.set_grain(1)  # every step large enough for chunks runs on the pool
    serial = _run(cls, dtype, 1, **kw)
    for threads in sorted({2, 3, fo.max_threads()}):
        assert _run(cls, dtype, threads, **kw) == serial, threads


def test_bit_identical_on_a_busy_machine() -> None:
    """Competing CPU-bound processes deschedule workers mid-step: whichever thread runs a chunk,
    the result is the same."""
    from fastoptim.apps.bench import background_load

    _core.set_grain(1)
    with background_load(4):
        serial = _run(fo.Adam, np.float32, 1)
        for _ in range(3):
            assert _run(fo.Adam, np.float32, 2) == serial
            assert _run(fo.Adam, np.float32, fo.max_threads()) == serial


def test_pool_busy_with_another_plan_runs_the_step_on_the_caller() -> None:
    """Two plans stepping at once: one gets the pool, the other runs its chunks on its own
    thread; both give the serial result."""
    _core.set_grain(1)
    expected = _run(fo.Adam, np.float32, 1)
    fo.set_num_threads(2)
    results: list[list[bytes]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            params, grads = _problem(np.float32)
            opt = fo.Adam(params)
            for g in grads:
                opt.step(g)
            out = [p.tobytes() for p in params]
            for s in opt.state.values():
                out += [v.tobytes() for k, v in s.items() if k != "step"]
            results.append(out)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 and all(r == expected for r in results)


# ----------------------------------------------------------------------------- one plan, threads
def _adam_plan(n: int) -> tuple[_core.Plan, np.ndarray, list[np.ndarray]]:
    p = np.linspace(-1, 1, n, dtype=np.float32)
    states = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
    return _core.Plan([p], ["w"], ["exp_avg", "exp_avg_sq"], [[states[0]], [states[1]]]), p, states


def _nadam_hyper() -> _core.NAdamHyper:
    h = _core.NAdamHyper()
    h.lr, h.beta1, h.beta2, h.eps = 1e-3, 0.9, 0.999, 1e-8
    h.momentum_decay, h.mu_product = 4e-3, 1.0
    return h


@pytest.mark.parametrize("nthreads", [2, 4])
def test_one_plan_hammered_from_threads(nthreads: int) -> None:
    """Threads re-bind fresh gradient arrays (dropping the previous ones) and step one plan, the
    kernels running without the GIL.  Every step is the same function (same gradient values,
    same step number, hyper-parameters updated under the plan's lock), so k steps in any order
    give the serial result, bit for bit; a kernel reading freed gradients, or two steps
    interleaving, would not (and AddressSanitizer reports the former)."""
    n, per_thread = 200_000, 12
    _core.set_grain(1)
    fo.set_num_threads(2)
    g0 = np.random.default_rng(2).standard_normal(n).astype(np.float32)

    plan, p, states = _adam_plan(n)
    h = _nadam_hyper()
    errors: list[BaseException] = []
    barrier = threading.Barrier(nthreads)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for k in range(per_thread):
                g = g0.copy()  # a new array each time: the plan's previous one may be freed
                if (i + k) % 2:
                    plan.bind_grads([g])
                    del g
                    _core.step_nadam(plan, h, 1)
                else:
                    _core.step_nadam(plan, h, 1, [g])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    plan_s, p_s, states_s = _adam_plan(n)
    h_s = _nadam_hyper()
    for _ in range(nthreads * per_thread):
        _core.step_nadam(plan_s, h_s, 1, [g0.copy()])
    assert h.mu_product == h_s.mu_product
    assert p.tobytes() == p_s.tobytes()
    for a, b in zip(states, states_s):
        assert a.tobytes() == b.tobytes()


def test_two_plans_step_in_parallel() -> None:
    """Two optimizers stepped from two threads: both complete with the serial result (each takes
    only its own plan's lock).  Whether their steps overlap in time depends on the scheduler: not
    asserted (a timing), only recorded."""
    n, steps = 1_000_000, 6
    fo.set_num_threads(1)  # each step on its own thread: only overlap can make them concurrent
    g = np.full(n, 0.5, np.float32)
    expected = np.zeros(n, np.float32)
    ref = fo.Adam([expected])
    for _ in range(steps):
        ref.step([g])

    spans: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    params = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
    opts = [fo.Adam([p]) for p in params]
    barrier = threading.Barrier(2)
    import time

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(steps):
            t0 = time.perf_counter()
            opts[i].step([g])
            spans[i].append((t0, time.perf_counter()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in params:
        assert p.tobytes() == expected.tobytes()
    # (overlap in time is the scheduler's: a thread can finish its steps before the other one
    # starts, as seen under CI load, so it is not asserted)
    assert len(spans[0]) == len(spans[1]) == steps


# ----------------------------------------------------------------------------- fork
# The parent's steps run multi-threaded first (the pool's workers exist), then children step
# 4M elements; results are compared with a serial run's bytes.
FORK_PRELUDE = """
    import hashlib, os, sys, threading
    import numpy as np
    import fastoptim as fo

    N = 4_000_000

    def problem():
        rng = np.random.default_rng(3)
        return rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)

    def digest(steps):
        w, g = problem()
        opt = fo.Adam([w], lr=0.01)
        for _ in range(steps):
            opt.step([g])
        return hashlib.sha256(w.tobytes()).hexdigest()

    fo.set_num_threads(1)
    SERIAL = digest(2)
    fo.set_num_threads(2)
    assert digest(2) == SERIAL  # multi-threaded: the pool's workers now exist
"""


@once_not_per_isa
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_calls_from_many_threads_at_once(dtype: str) -> None:
    """Threads whose first fastoptim calls come at once (a fresh interpreter, a barrier):
    the first looks up numpy.ma's MaskedArray (and ml_dtypes' bfloat16) while the others wait.
    A plain function-local static deadlocked here every time (the import let another thread
    take the GIL, which then waited for the static holding it)."""
    out = _check(
        _run_python(
            f"""
    import sys, threading
    import numpy as np
    import ml_dtypes
    import fastoptim as fo
    # (else the lookup imports nothing; NumPy 1 imports numpy.ma with numpy: not fresh there)
    fresh = "numpy.ma" not in sys.modules or int(np.__version__.split(".")[0]) < 2
    dtype = np.dtype(ml_dtypes.bfloat16) if "{dtype}" == "bfloat16" else np.float32
    n = 8
    barrier = threading.Barrier(n)
    params = [np.ones(64, dtype) for _ in range(n)]

    def first_use(p):
        barrier.wait()
        fo.SGD([p], lr=0.5).step([np.ones(64, dtype)])

    threads = [threading.Thread(target=first_use, args=(p,)) for p in params]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(fresh, all(float(p[0]) == 0.5 for p in params))
    """,
            timeout=60,
        )
    )
    assert out.split() == ["True", "True"]


@once_not_per_isa
@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="Python 3.9/3.10 can take an interrupt between a with block's end and its exit "
    "(the README says so)",
)
def test_keyboard_interrupts_during_steps_never_leave_the_lock_held() -> None:
    """KeyboardInterrupts (from a timer, as Ctrl-C) landing anywhere in thousands of steps:
    the optimizer's lock is never left held (its Python ``__exit__`` could be interrupted at its
    start: every later step of that optimizer then failed as re-entrant, or waited forever in
    another thread; 12 of 12 runs within 77 interrupts).  Then the same thread and another one
    step normally."""
    out = _check(
        _run_python(
            """
    import signal, threading, time
    import numpy as np
    import fastoptim as fo
    p, g = np.zeros(16, np.float32), np.ones(16, np.float32)
    opt = fo.SGD([p], lr=0.1)
    armed = False

    def interrupt(*_):
        if armed:
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, interrupt)
    stop, n, interrupted, leaked = time.monotonic() + 3, 0, 0, False
    while time.monotonic() < stop and not leaked:
        try:  # (disarmed inside: an interrupt landing as the try ends, before its handlers
            # take over, escaped them on Python 3.9; once disarmed, none is raised)
            try:
                armed = True
                signal.setitimer(signal.ITIMER_REAL, 1e-5 * (1 + n % 50))
                opt.step([g])
            finally:
                armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            interrupted += 1
        except RuntimeError:  # "called re-entrantly": the lock was left held by this thread
            leaked = True
        n += 1
    t = threading.Thread(target=opt.step, args=([g],), daemon=True)
    t.start()
    t.join(10)
    print(leaked, interrupted > 20, t.is_alive())
    if not leaked:
        opt.step([g])
    """,
            timeout=60,
        )
    )
    assert out.split() == ["False", "True", "False"]


@once_not_per_isa
def test_fork_child_runs_serially_then_on_request() -> None:
    out = _check(
        _run_python(
            FORK_PRELUDE
            + """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = fo.get_num_threads() == 1 and digest(2) == SERIAL
            fo.set_num_threads(2)  # a fresh pool in the child
            ok = ok and fo.get_num_threads() == 2 and digest(2) == SERIAL
            os.write(w, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    print(os.read(r, 16).decode(), status, fo.get_num_threads(), digest(2) == SERIAL)
    """
        )
    )
    assert out.split() == ["ok", "0", "2", "True"]


@once_not_per_isa
def test_multiprocessing_fork_pool() -> None:
    out = _check(
        _run_python(
            FORK_PRELUDE
            + """
    import multiprocessing as mp

    if __name__ == "__main__":
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map(digest, [2, 2, 2])
        print(all(d == SERIAL for d in got), len(got))
    """
        )
    )
    assert out.split() == ["True", "3"]


@once_not_per_isa
def test_hogwild_parent_and_children() -> None:
    """Parent and forked children step at the same time, each its own block of one shared
    (anonymous mmap) parameter array, the parent on several threads."""
    out = _check(
        _run_python(
            FORK_PRELUDE
            + """
    import mmap

    K = 3  # the parent and two children
    buf = mmap.mmap(-1, K * N * 4)
    shared = np.frombuffer(buf, np.float32).reshape(K, N)
    w0, g = problem()
    shared[:] = w0

    def train(i):
        opt = fo.Adam([shared[i]], lr=0.01)
        for _ in range(2):
            opt.step([g])

    pids = []
    for i in range(1, K):
        pid = os.fork()
        if pid == 0:
            try:
                train(i)
            finally:
                os._exit(0)
        pids.append(pid)
    train(0)
    status = [os.waitpid(pid, 0)[1] for pid in pids]
    same = [hashlib.sha256(shared[i].tobytes()).hexdigest() == SERIAL for i in range(K)]
    print(status == [0] * (K - 1), all(same))
    """
        )
    )
    assert out.split() == ["True", "True"]


@once_not_per_isa
def test_fork_while_another_thread_steps() -> None:
    """A fork while another thread is inside a step (holding its plan's lock and the pool): the
    child can still step that optimizer; it abandons the lock and the pool it inherited."""
    out = _check(
        _run_python(
            FORK_PRELUDE
            + """
    w, g = problem()
    opt = fo.Adam([w], lr=0.01)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            opt.step([g])

    t = threading.Thread(target=spin)
    t.start()
    results = []
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            try:
                opt.step([g])  # the same optimizer: its plan may be locked in the parent
                fo.set_num_threads(2)
                ok = digest(2) == SERIAL
            finally:
                os._exit(0 if ok else 1)
        results.append(os.waitpid(pid, 0)[1])
    stop.set()
    t.join()
    print(results == [0] * 5)
    """
        )
    )
    assert out.split() == ["True"]


# ----------------------------------------------------------------------------- thread counts
def test_max_threads_is_four_per_available_cpu() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = _core._cgroup_cpu_limit("") if sys.platform.startswith("linux") else 0
    assert fo.available_cpus() == max(1, min(cpus or 1, limit or cpus or 1))
    assert fo.max_threads() == 4 * fo.available_cpus()


# ---------------------------------------------------------- the cgroup CPU quota (containers)
V2_MOUNT = (
    "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"
)
V1_MOUNT = (
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
    "34 31 0:31 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset\n"
)


def _fake_root(tmp: Any, cgroup: str, mountinfo: str, files: dict[str, str]) -> str:
    """A directory standing for / : /proc/self/cgroup, /proc/self/mountinfo and `files`."""
    (tmp / "proc" / "self").mkdir(parents=True)
    (tmp / "proc" / "self" / "cgroup").write_text(cgroup)
    (tmp / "proc" / "self" / "mountinfo").write_text(mountinfo)
    for rel, text in files.items():
        path = tmp / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp)


@pytest.mark.parametrize(
    ("cgroup", "mountinfo", "files", "cpus"),
    [
        # cgroup v2: the process's cgroup's cpu.max, ceil(quota / period)
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "200000 100000\n"}, 2),
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "150000 100000\n"}, 2),
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "50000 100000\n"}, 1),
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "max 100000\n"}, 0),
        # an ancestor's quota applies too: the smallest wins
        (
            "0::/a/b/c\n",
            V2_MOUNT,
            {
                "/sys/fs/cgroup/a/b/c/cpu.max": "max 100000\n",
                "/sys/fs/cgroup/a/b/cpu.max": "300000 100000\n",
                "/sys/fs/cgroup/a/cpu.max": "800000 100000\n",
            },
            3,
        ),
        (
            "0::/a/b\n",
            V2_MOUNT,
            {"/sys/fs/cgroup/a/b/cpu.max": "40000 10000\n", "/sys/fs/cgroup/a/cpu.max": "max 1\n"},
            4,
        ),
        # a container's own namespace (its cgroup is /) and a mount of the cgroup itself
        ("0::/\n", V2_MOUNT, {"/sys/fs/cgroup/cpu.max": "250000 100000\n"}, 3),
        (
            "0::/kubepods/pod1/c1\n",
            "30 23 0:26 /kubepods/pod1/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            {"/sys/fs/cgroup/cpu.max": "200000 100000\n"},
            2,
        ),
        # a mount that does not show the process's cgroup is not read
        (
            "0::/elsewhere\n",
            "30 23 0:26 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            {"/sys/fs/cgroup/cpu.max": "100000 100000\n"},
            0,
        ),
        # a mount point with a space (mountinfo writes it \\040)
        (
            "0::/app\n",
            "30 23 0:26 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n",
            {"/sys/fs/my cgroup/app/cpu.max": "300000 100000\n"},
            3,
        ),
        # cgroup v1: the cpu controller's hierarchy (not cpuset's), cfs quota over period
        (
            "5:cpuset:/docker/x\n4:cpu,cpuacct:/docker/x\n",
            V1_MOUNT,
            {
                "/sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_quota_us": "250000\n",
                "/sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
            },
            3,
        ),
        (
            "4:cpu,cpuacct:/docker/x\n",
            V1_MOUNT,
            {
                "/sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_quota_us": "-1\n",
                "/sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
            },
            0,
        ),
        (
            "5:cpuset:/docker/x\n",
            V1_MOUNT,
            {
                "/sys/fs/cgroup/cpuset/docker/x/cpu.cfs_quota_us": "100000\n",
                "/sys/fs/cgroup/cpuset/docker/x/cpu.cfs_period_us": "100000\n",
            },
            0,
        ),
        # both versions mounted (hybrid): the smaller
        (
            "4:cpu,cpuacct:/s\n0::/s\n",
            V1_MOUNT + V2_MOUNT,
            {
                "/sys/fs/cgroup/cpu,cpuacct/s/cpu.cfs_quota_us": "300000\n",
                "/sys/fs/cgroup/cpu,cpuacct/s/cpu.cfs_period_us": "100000\n",
                "/sys/fs/cgroup/s/cpu.max": "200000 100000\n",
            },
            2,
        ),
        # what is missing or unreadable means no limit, never an error
        ("0::/app\n", V2_MOUNT, {}, 0),
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "abc 100000\n"}, 0),
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "100000\n"}, 0),
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "100000 0\n"}, 0),
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "1.5 1\n"}, 0),
        ("0::/app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "-100000 100000\n"}, 0),
        ("0::/app\n", "garbage\n- - -\n\n", {"/sys/fs/cgroup/app/cpu.max": "1 1\n"}, 0),
        ("", V2_MOUNT, {"/sys/fs/cgroup/cpu.max": "100000 100000\n"}, 0),
        ("0::/../x\n", V2_MOUNT, {"/sys/fs/x/cpu.max": "100000 100000\n"}, 0),
        # a directory whose name starts with ".." is an ordinary one
        ("0::/..app\n", V2_MOUNT, {"/sys/fs/cgroup/..app/cpu.max": "100000 100000\n"}, 1),
        # a path that is not absolute (the kernel writes none): no limit, and no endless walk
        ("0::app\n", V2_MOUNT, {"/sys/fs/cgroup/app/cpu.max": "100000 100000\n"}, 0),
        # an empty mount source (two blanks: not a field of the split)
        (
            "0::/app\n",
            "30 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2  rw,nsdelegate\n",
            {"/sys/fs/cgroup/app/cpu.max": "200000 100000\n"},
            2,
        ),
        (
            "4:cpu:/s\n",
            "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup  rw,cpu\n",
            {
                "/sys/fs/cgroup/cpu/s/cpu.cfs_quota_us": "100000\n",
                "/sys/fs/cgroup/cpu/s/cpu.cfs_period_us": "100000\n",
            },
            1,
        ),
    ],
)
def test_cgroup_cpu_limit(
    tmp_path: Any, cgroup: str, mountinfo: str, files: dict[str, str], cpus: int
) -> None:
    """The CPU quota of the process's cgroups (the default thread count's cap: a container
    limited to 2 CPUs gets 2 threads, not the host's count): read from a tree standing for
    /proc and /sys/fs/cgroup, every layout the kernel writes."""
    assert _core._cgroup_cpu_limit(_fake_root(tmp_path, cgroup, mountinfo, files)) == cpus


def test_cgroup_cpu_limit_without_proc(tmp_path: Any) -> None:
    assert _core._cgroup_cpu_limit(str(tmp_path / "nothing")) == 0


def _v1_cpu_cgroup() -> str | None:
    """This process's cgroup directory in a writable cgroup-v1 cpu hierarchy, or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            paths = [
                line.rstrip("\n").split(":", 2)[2]
                for line in f
                if "cpu" in line.split(":")[1].split(",")
            ]
        with open("/proc/self/mountinfo") as f:
            mounts = [
                line.split()[4]
                for line in f
                if " - cgroup " in line
                and "cpu" in line.split(" - ")[1].split()[2].split(",")
                and line.split()[3] == "/"
            ]
    except (OSError, IndexError):
        return None
    if not paths or not mounts:
        return None
    here = mounts[0] + paths[0].rstrip("/")
    return here if os.access(here, os.W_OK) else None


@once_not_per_isa
@pytest.mark.skipif(_v1_cpu_cgroup() is None, reason="needs root and a cgroup-v1 cpu hierarchy")
def test_default_threads_follow_a_real_cpu_quota() -> None:
    """A process in a cgroup limited to half a CPU: one CPU available, one thread by default,
    max_threads() 4 (OMP_NUM_THREADS still wins), and its steps are right."""
    parent = _v1_cpu_cgroup()
    assert parent is not None
    group = os.path.join(parent, f"fastoptim-test-{os.getpid()}")
    os.mkdir(group)
    try:
        with open(os.path.join(group, "cpu.cfs_period_us"), "w") as f:
            f.write("100000")
        with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as f:
            f.write("50000")
        code = """
            import os, sys, numpy as np, fastoptim as fo
            w = np.zeros(1_000_000, np.float32)
            fo.Adam([w], lr=0.5).step([np.ones_like(w)])
            print(fo.available_cpus(), fo.max_threads(), fo.get_num_threads(),
                  len(os.sched_getaffinity(0)) >= 1, bool((w == np.float32(-0.5)).all()))
            """

        def run(**env: str) -> list[str]:
            full = {
                k: v for k, v in os.environ.items() if k not in ("FASTOPT_ISA", "OMP_NUM_THREADS")
            }
            full.update(env)
            proc = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(code)],
                env=full,
                capture_output=True,
                text=True,
                timeout=120,
                preexec_fn=lambda: open(os.path.join(group, "cgroup.procs"), "w").write(
                    str(os.getpid())
                ),
            )
            return _check(proc).split()

        assert run() == ["1", "4", "1", "True", "True"]
        assert run(OMP_NUM_THREADS="3") == ["1", "4", "3", "True", "True"]
    finally:
        os.rmdir(group)


@pytest.mark.parametrize(
    "bad", [0, -1, -3, True, False, np.True_, np.False_, 1.5, 2.0, "2", None, [2]]
)
def test_set_num_threads_rejects_nonsense(bad: Any) -> None:
    before = fo.get_num_threads()
    with pytest.raises(ValueError, match=r"set_num_threads: n must be an int >= 1"):
        fo.set_num_threads(bad)
    assert fo.get_num_threads() == before


def test_set_num_threads_caps_huge_values_and_accepts_integers() -> None:
    fo.set_num_threads(10_000)
    assert fo.get_num_threads() == fo.max_threads()
    fo.set_num_threads(2**70)
    assert fo.get_num_threads() == fo.max_threads()
    fo.set_num_threads(np.int64(2))
    assert fo.get_num_threads() == 2
    with pytest.raises(ValueError, match="set_num_threads"):
        _core.set_num_threads(0)


@once_not_per_isa
def test_huge_thread_count_under_an_address_space_limit() -> None:
    """set_num_threads(10000) then a large step under RLIMIT_AS: the pool is capped (and a
    refused thread only means fewer workers), so the process neither dies nor starts thousands
    of threads."""
    out = _check(
        _run_python(
            """
        import os, resource
        import numpy as np
        import fastoptim as fo

        w = np.zeros(4_000_000, np.float32)
        g = np.ones_like(w)
        opt = fo.Adam([w], lr=0.5)
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1])
        limit = vm * 1024 + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        fo.set_num_threads(10_000)
        opt.step([g])
        print(fo.get_num_threads() == fo.max_threads(), len(os.listdir("/proc/self/task")),
              bool((w == np.float32(-0.5)).all()))
        """
        )
    )
    capped, tasks, correct = out.split()
    assert capped == "True" and correct == "True"
    assert int(tasks) <= 1 + fo.max_threads() + 8  # the main thread, the pool, a few others


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sched_getaffinity: Linux")
@once_not_per_isa
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", "3"),
        (" 3 ", "3"),
        ("4,2", "4"),  # a nested-parallelism list: its first level
        ("99999999999999999999", "max"),
        ("100000", "max"),
        ("0", "default"),
        ("-3", "default"),
        ("+2", "default"),
        ("abc", "default"),
        ("2.5", "default"),
        ("", "default"),
        (",", "default"),
    ],
)
def test_omp_num_threads(value: str, expected: str) -> None:
    """OMP_NUM_THREADS: its first entry if an integer >= 1 (capped at max_threads()), else
    ignored: the import never fails, and the default is the available CPUs."""
    out = _check(
        _run_python(
            """
        import os, numpy as np, fastoptim as fo
        w = np.zeros(1_000_000, np.float32)
        fo.Adam([w], lr=0.5).step([np.ones_like(w)])
        print(fo.get_num_threads(), fo.max_threads(), fo.available_cpus(),
              bool((w == np.float32(-0.5)).all()))
        """,
            OMP_NUM_THREADS=value,
        )
    )
    threads, most, cpus, correct = out.split()
    assert correct == "True"
    want = {"max": most, "default": str(min(int(cpus), int(most)))}.get(expected, expected)
    assert threads == want


# ----------------------------------------------------------------------------- bench
def _busy_children() -> list[int]:
    """This process's children running the benchmark's busy loop."""
    me, out = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"getppid" in cmd:
            out.append(int(pid))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_bench_background_load(capsys: pytest.CaptureFixture[str]) -> None:
    """``fastoptim bench --background-load N`` runs N busy processes for the duration, prints
    the thread table (1 thread against the default at 100K, 800K, 4M elements) and leaves no
    process behind, also when the measurement fails."""
    from fastoptim.apps import bench, cli

    argv = ["bench", "--optimizers", "SGD", "--workloads", "mlp", "--no-torch"]
    argv += ["--repeats", "1", "--rounds", "1", "--background-load", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 busy background process(es)" in out
    table = out[out.index("busy background") :].splitlines()[2:5]
    assert [line.split()[0] for line in table] == ["100,000", "800,000", "4,000,000"]
    assert _busy_children() == []
    with pytest.raises(RuntimeError, match="measurement failed"):
        with bench.background_load(3):
            assert len(_busy_children()) == 3
            raise RuntimeError("measurement failed")
    assert _busy_children() == []
    with pytest.raises(SystemExit):
        cli.main([*argv[:-1], "-1"])


def test_more_chunks_than_the_pool_indexes() -> None:
    """A pass of 2^16 chunks or more (Muon's transpose of a matrix of 2^21 columns or more, its
    element-wise helpers on 2^31 elements) ran on the calling thread alone: the pool's chunk
    indices are 16 bits.  The pool now hands out runs of consecutive chunks: every chunk still
    runs once (the result is NumPy's, whatever the thread count)."""
    x = np.arange(2 * (2**21 + 37), dtype=np.float32).reshape(2, -1)  # 65,538 tasks of 32 columns
    for threads in (1, 2, 3):
        fo.set_num_threads(threads)
        out = np.full(x.shape[::-1], np.nan, np.float32)
        _core.transpose(out, x)
        np.testing.assert_array_equal(out, x.T)
