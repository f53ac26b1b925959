"""Regression tests for faults an outside attack found in v0.1 (each named after its fault)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import fastoptim as fo

# A variant switched on through param_groups needs a state buffer the optimizer did not have.
SWITCHES: list[tuple[Callable[[list[np.ndarray]], Any], str, Any]] = [
    (lambda ps: fo.SGD(ps, lr=0.1), "momentum", 0.9),
    (lambda ps: fo.RMSprop(ps), "momentum", 0.5),
    (lambda ps: fo.RMSprop(ps), "centered", True),
    (lambda ps: fo.Adam(ps), "amsgrad", True),
]


def _everything(opt: Any) -> list[Any]:
    sd = opt.state_dict()
    arrays = [a.tobytes() for st in sd["state"].values() for a in st.values()]
    return [repr({k: v for k, v in sd.items() if k != "state"}), arrays]


@pytest.mark.parametrize(("make", "key", "value"), SWITCHES, ids=lambda x: str(x)[:12])
def test_checkpoint_after_switching_a_variant_loads(
    make: Callable[[list[np.ndarray]], Any], key: str, value: Any, tmp_path: Path
) -> None:
    """Saving right after switching a variant on wrote a file load rejected (even into the
    optimizer that wrote it).  Now state_dict/save see the groups as the next step will: the
    round trips succeed, change nothing, and the run continues as without them."""
    params = [np.zeros(4, np.float32)]
    twin = [np.zeros(4, np.float32)]
    opt, ref = make(params), make(twin)
    g = np.linspace(-1, 1, 4, dtype=np.float32)
    for o in (opt, ref):
        o.step([g])
        o.param_groups[0][key] = value
    before = _everything(opt)
    opt.load_state_dict(opt.state_dict())
    fo.save(tmp_path / "run.npz", opt)
    fo.load(tmp_path / "run.npz", opt)
    assert _everything(opt) == before
    for _ in range(3):
        opt.step([g])
        ref.step([g])
    assert params[0].tobytes() == twin[0].tobytes()
    for name in ref.state[0]:
        assert np.array_equal(opt.state[0][name], ref.state[0][name]), name


def test_memory_shared_across_groups_is_rejected() -> None:
    """A state view or a gradient buffer of one group used as another group's parameter or
    gradient was accepted (and corrupted state); within one group it always was rejected."""
    a, b = np.zeros(4), np.zeros(4)
    opt = fo.Adam([{"params": [a]}])
    opt.step([np.ones(4)])
    before = [x.copy() for x in (a, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"])]
    with pytest.raises(ValueError, match="param 1 shares memory with the 'exp_avg' state"):
        opt.add_param_group({"params": [opt.state[0]["exp_avg"]]})
    with pytest.raises(ValueError, match="gradient buffers"):
        opt.add_param_group({"params": [opt.grads[0]]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b]})
    with pytest.raises(ValueError, match="grad for param 1 shares memory with the 'exp_avg_sq'"):
        opt.step([np.ones(4), opt.state[0]["exp_avg_sq"]])
    with pytest.raises(ValueError, match="grad for param 1 shares memory with param 0"):
        opt.step([np.ones(4), a])
    after = (a, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"])
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    assert not b.any() and opt.step_count == 1


@pytest.mark.parametrize("value", [10**309, -(10**309), float("inf"), float("nan")])
def test_huge_hyper_parameter_is_a_value_error(value: Any) -> None:
    """lr=10**309 raised OverflowError from deep inside the check."""
    w = np.zeros(3)
    with pytest.raises(ValueError, match="invalid lr="):
        fo.SGD([w], lr=value)
    opt = fo.SGD([w], lr=0.1)
    opt.param_groups[0]["lr"] = value
    with pytest.raises(ValueError, match="invalid lr="):
        opt.step([np.ones(3)])
    assert not w.any()


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("named", [False, True])
def test_optimizers_pickle_and_deepcopy(how: str, named: bool) -> None:
    """Like torch's: a copy holds copies of the parameters and continues exactly as the
    original, independently of it (schedules, variants and step counts included)."""
    import copy
    import pickle

    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(5), rng.standard_normal((2, 3))]
    params: Any = dict(zip("ab", arrays)) if named else arrays
    groups = (
        [{"params": {"a": arrays[0]}}, {"params": {"b": arrays[1]}, "lr": 0.05}]
        if named
        else [{"params": [arrays[0]]}, {"params": [arrays[1]], "lr": 0.05}]
    )
    del params
    opt = fo.Adam(groups, lr=fo.schedules.cosine(0.1, 10), betas=(0.8, 0.9), amsgrad=True)
    grads = [[rng.standard_normal(a.shape) for a in arrays] for _ in range(6)]
    for g in grads[:3]:
        opt.step(g)
    twin = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
    twin_arrays = [p for grp in twin.param_groups for p in _values(grp["params"])]
    assert all(a is not b and np.array_equal(a, b) for a, b in zip(arrays, twin_arrays))
    assert twin.step_count == 3 and twin.schedules(0) == opt.schedules(0)
    for g in grads[3:]:
        opt.step(g)
        twin.step(g)
    for a, b in zip(arrays, twin_arrays):
        assert a.tobytes() == b.tobytes()


def _values(params: Any) -> list[np.ndarray]:
    return list(params.values()) if hasattr(params, "values") else list(params)


def test_one_optimizer_stepped_from_several_threads_counts_every_step() -> None:
    """Steps of one optimizer from several threads are serialised: every step is applied
    once, with its own step number (Adam's bias corrections depend on it)."""
    import threading

    n, per_thread = 4, 25
    w = np.zeros(200_000)
    ref_w = w.copy()
    opt, ref = fo.Adam([w], lr=1e-3), fo.Adam([ref_w], lr=1e-3)
    g = np.linspace(-1, 1, w.size)

    def work() -> None:
        for _ in range(per_thread):
            opt.step([g])

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(n * per_thread):
        ref.step([g])
    assert opt.step_count == n * per_thread and opt.state[0]["step"] == n * per_thread
    assert w.tobytes() == ref_w.tobytes()


def test_masked_arrays_are_rejected() -> None:
    """A masked array's mask was silently ignored (masked elements updated)."""
    m = np.ma.masked_array(np.zeros(3), mask=[0, 1, 0])
    with pytest.raises(TypeError, match="param 0: a masked array"):
        fo.SGD([m])
    w = np.zeros(3)
    opt = fo.SGD([w], lr=0.1)
    with pytest.raises(TypeError, match="grad for param 0: a masked array"):
        opt.step([np.ma.masked_array(np.ones(3), mask=[0, 1, 0])])
    assert not w.any()


def test_parameter_changed_after_construction_is_not_written() -> None:
    """A parameter made read-only, or resized (``refcheck=False``), after the optimizer was
    built was still written through the plan's old pointer (into memory it no longer owns)."""
    w = np.zeros(3)
    opt = fo.SGD([w], lr=0.1)
    opt.step([np.ones(3)])
    w.flags.writeable = False
    kept = w.copy()
    with pytest.raises(ValueError, match="param 0: array was made read-only"):
        opt.step([np.ones(3)])
    assert np.array_equal(w, kept)
    big = np.zeros(4096)
    opt = fo.SGD([big], lr=0.1)
    big.resize(8, refcheck=False)
    with pytest.raises(ValueError, match="param 0: the array was resized"):
        opt.step([np.ones(8)])
    assert not big.any()


def test_transposed_gradient_is_named_as_such() -> None:
    """A transposed gradient was rejected because it 'would need a copy' (it is only read)."""
    opt = fo.SGD([np.zeros((3, 4))], lr=0.1)
    with pytest.raises(ValueError, match=r"not C-contiguous .*np\.ascontiguousarray\(grad\)"):
        opt.step([np.ones((4, 3)).T])


def test_passed_gradients_are_not_kept_alive() -> None:
    """The last step's gradients stayed referenced by the optimizer until the next step."""
    import gc
    import weakref

    w = np.zeros(5)
    opt = fo.Adam([w])
    g = np.ones(5)
    ref = weakref.ref(g)
    opt.step([g])
    del g
    gc.collect()
    assert ref() is None
    opt.grads[0][...] = 1.0  # bound buffers stay bound: a step without gradients works
    opt.step()
    assert opt.step_count == 2


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX timers")
def test_ctrl_c_during_the_kernels_leaves_a_whole_step() -> None:
    """Ctrl-C while the compiled kernels run surfaces when they return: the step counter,
    the schedules' advance and the later groups were skipped, so a 'save on interrupt'
    checkpoint resumed wrongly.  Now every group is stepped in the one call and the step's
    bookkeeping is completed before the KeyboardInterrupt propagates."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    n = 3_000_000
    ws = [np.zeros(n), np.zeros(n)]
    opt = fo.SGD([{"params": [ws[0]]}, {"params": [ws[1]]}], lr=fo.schedules.constant(0.5))
    grads = [np.ones(n), np.ones(n)]
    opt.step(grads)
    start = time.perf_counter()
    opt.step(grads)
    took = time.perf_counter() - start  # one step: the kernels are nearly all of it

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    interrupted = 0
    try:
        for _ in range(3):
            # Steps until the timer interrupts one: nearly all of a step's time is its kernels
            # (the Python bookkeeping after them, the remaining gap, is microseconds of it).
            signal.setitimer(signal.ITIMER_REAL, took / 3)
            try:
                while True:
                    opt.step(grads)
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            k = opt.step_count
            assert [opt.state[i]["step"] for i in (0, 1)] == [k, k]
            for w in ws:  # every group updated exactly k times (-0.5 per step, exact)
                assert w[0] == -0.5 * k and w[-1] == -0.5 * k
    finally:
        signal.signal(signal.SIGALRM, old)
    assert interrupted == 3


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX timers")
@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_ctrl_c_during_a_torch_step_leaves_a_whole_step(opt_name: str) -> None:
    """The same for fastoptim.torch, which stepped group by group (advancing each group's
    ``step`` tensors before its kernel): an interrupt between groups left the first updated and
    counted and the others not.  Now every group runs in one compiled call; the scalars
    advanced for it are put back if the call did not happen."""
    import threading

    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    n = 3_000_000
    ws = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    groups = [{"params": [ws[0]]}, {"params": [ws[1]]}]
    if opt_name == "SGD":
        opt: Any = ft.SGD(groups, lr=fo.schedules.constant(0.5))
    else:
        opt = ft.Adam(groups, lr=fo.schedules.constant(0.5))
    for w in ws:
        w.grad = torch.ones(n, dtype=torch.float64)
    opt.step()
    start = time.perf_counter()
    opt.step()
    took = time.perf_counter() - start

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    interrupted = 0
    try:
        for _ in range(3):
            signal.setitimer(signal.ITIMER_REAL, took / 3)
            try:
                while True:
                    opt.step()
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            k = opt.step_count
            vs = [w.detach() for w in ws]
            if opt_name == "SGD":  # -0.5 per step, exact
                for v in vs:
                    assert float(v[0]) == -0.5 * k and float(v[-1]) == -0.5 * k
            else:  # every parameter's step counted as many times as the optimizer's
                assert [float(opt.state[w]["step"]) for w in ws] == [k, k]
                assert float(vs[0][0]) == float(vs[1][0]) and float(vs[0][-1]) == float(vs[1][-1])
    finally:
        signal.signal(signal.SIGALRM, old)
    assert interrupted == 3
