"""The compiled core against the defects an audit found: lists of plans with None or a plan
twice, plans locked in opposite orders from two threads, arrays of a plan other than its
parameters made read-only or reallocated, a sparse step's indices changed by another thread,
``bind_torch`` given expanded (stride-0) tensors, the quantizer's arrays sharing memory, gradient
factors out of float32's range, functional Adafactor's state arrays.  Each case raises a clear
error and leaves every array as it was (a crash or a hang before)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastoptim as fo
import fastoptim.functional as F
from fastoptim import _core


def _plan(n: int = 64) -> tuple[object, np.ndarray, np.ndarray]:
    p, g = np.ones(n, np.float32), np.ones(n, np.float32)
    plan = _core.Plan([p], ["p"], [], [])
    plan.bind_grads([g])
    return plan, p, g


def test_none_and_repeated_plans_refused() -> None:
    plan, p, _ = _plan()
    h = _core.SGDHyper()
    with pytest.raises(TypeError, match=r"plans\[0\] is None"):
        _core.steps_sgd([None], [h], [1], [False])
    with pytest.raises(TypeError, match=r"hypers\[0\] is None"):
        _core.steps_sgd([plan], [None], [1], [False])
    with pytest.raises(TypeError, match=r"plans\[1\] is None"):
        _core.accumulate([plan, None], 1.0)
    with pytest.raises(ValueError, match="a plan is listed twice"):
        _core.steps_sgd([plan, plan], [h, h], [1, 1], [False, False])
    with pytest.raises(ValueError, match="a plan is listed twice"):
        _core.accumulate([plan, plan], 1.0)
    assert (p == 1).all()


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter (a crash or a hang must not take the test run with it)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_plans_locked_in_opposite_orders_from_two_threads() -> None:
    """steps_sgd([a, b]) on one thread and steps_sgd([b, a]) on another deadlocked (each held
    one plan's lock and waited for the other's); plans are now locked in address order."""
    r = _run(
        """
        import threading, numpy as np
        from fastoptim import _core as C
        def mk():
            p = np.ones(1 << 16, np.float32); g = np.ones(1 << 16, np.float32)
            pl = C.Plan([p], ["p"], [], []); pl.bind_grads([g]); return pl, p, g
        (a, *ka), (b, *kb) = mk(), mk()
        def run(x, y):
            h = C.SGDHyper()
            for _ in range(3000):
                C.steps_sgd([x, y], [h, h], [1, 1], [False, False])
        ts = [threading.Thread(target=run, args=xy) for xy in ((a, b), (b, a))]
        for t in ts: t.start()
        for t in ts: t.join()
        print("finished")
        """
    )
    assert r.returncode == 0 and "finished" in r.stdout, r.stderr


def test_rows_indices_changed_by_another_thread_never_write_outside() -> None:
    """The indices were checked, then read again by the kernels with the GIL released: another
    thread setting one out of range in between made the step write far outside the parameter
    (a crash).  They are copied before the check now."""
    r = _run(
        """
        import threading, numpy as np
        from fastoptim import _core as C
        nrows, width = 1 << 16, 16
        p = np.zeros((nrows, width), np.float32)
        ix = np.arange(nrows, dtype=np.int64)
        rows = np.ones((nrows, width), np.float32)
        h = C.SGDHyper(); h.lr = 0.1
        stop = False
        def meddle():
            while not stop:
                ix[-1] = 1 << 40
        t = threading.Thread(target=meddle, daemon=True); t.start()
        for _ in range(1500):
            ix[-1] = nrows - 1
            try:
                C.rows_sgd([(h, 1, p, ix, rows, [], "w")])
            except IndexError:
                pass
        stop = True
        print("survived")
        """
    )
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_rows_job_fields_of_the_wrong_type_named() -> None:
    p = np.zeros((4, 2), np.float32)
    ix = np.arange(2, dtype=np.int64)
    rows = np.ones((2, 2), np.float32)
    h = _core.SGDHyper()
    for job, match in (
        ((_core.AdamHyper(), 1, p, ix, rows, [], "w"), r"jobs\[0\]: hyper must be"),
        ((h, 1, p, ix, rows, [], None), r"jobs\[0\]: label must be a str, got NoneType"),
        ((h, 2**63, p, ix, rows, [], "w"), r"jobs\[0\]: step must be an int \(int64\)"),
    ):
        with pytest.raises(TypeError, match=match):
            _core.rows_sgd([job])
    assert (p == 0).all()


@pytest.mark.parametrize("damage", ["read-only", "resized"])
def test_state_array_changed_after_the_plan_refused(damage: str) -> None:
    """Only the parameters were re-checked at each step: a state (or absmax, master copy,
    compensation, copy-out, EMA) made read-only was written, one reallocated written through
    its old address (a crash)."""
    n = 1 << 16
    p, g, buf = np.ones(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
    h = _core.SGDHyper()
    h.lr, h.momentum = 0.1, 0.9
    plan = _core.Plan([p], ["p"], h.state_names(), [[buf]])
    if damage == "read-only":
        buf.flags.writeable = False
        match = "state 'momentum_buffer' of param p: array was made read-only"
    else:
        buf.resize(16, refcheck=False)
        match = "state 'momentum_buffer' of param p: the array was resized or its memory replaced"
    with pytest.raises(ValueError, match=match):
        _core.step_sgd(plan, h, 1, [g])
    assert (p == 1).all() and (buf == 0).all()


def test_numpy_state_made_read_only_refused_by_the_step() -> None:
    w = np.ones(300, np.float32)
    opt = fo.Adam([w], lr=0.1)
    opt.step([np.ones(300, np.float32)])
    before = w.copy()
    opt.state[0]["exp_avg"].flags.writeable = False
    with pytest.raises(ValueError, match="state 'exp_avg' of param 0: array was made read-only"):
        opt.step([np.ones(300, np.float32)])
    assert np.array_equal(w, before)


def test_bind_torch_refuses_expanded_tensors() -> None:
    """A stride-0 view at the plan's address with an expanded one-element gradient passed
    bind_torch's checks (address and element count), and the kernel read n elements from one."""
    torch = pytest.importorskip("torch")
    assert _core.set_torch_api(
        torch.Tensor.__dlpack_c_exchange_api__, torch.Tensor, torch.nn.Parameter
    )
    n = 1 << 12
    x = np.zeros(n, np.float32)
    plan = _core.Plan([x], ["w"], [], [])
    p = torch.from_numpy(x)[:1].expand(n)
    p.grad = torch.ones(1).expand(n)
    assert plan.bind_torch([p]) is False
    q = torch.from_numpy(x)  # (the plan's own array, dense: taken)
    q.grad = torch.ones(n)
    assert plan.bind_torch([q]) is True


@pytest.mark.parametrize("fn", ["quantize", "dequantize"])
def test_quantizer_arrays_sharing_memory_refused(fn: str) -> None:
    buf = np.zeros(2048, np.float32)
    values = buf[:512]
    values[:] = np.linspace(-1, 1, 512, dtype=np.float32)
    before = buf.copy()
    codes = buf[512:].view(np.uint8)[:512]
    absmax = buf[:2]  # (inside values / out)
    with pytest.raises(ValueError, match="shares memory"):
        if fn == "quantize":
            _core.quantize_blockwise(values, codes, absmax, "signed8")
        else:
            _core.dequantize_blockwise(codes, absmax, values, "signed8")
    assert np.array_equal(buf, before)


def test_gradient_factor_out_of_float32_range_refused() -> None:
    plan, p, _ = _plan()
    for mul in (float("inf"), float("-inf")):  # (NaN is taken: a NaN norm's clip factor)
        with pytest.raises(ValueError, match="mul must not be infinite"):
            plan.set_grad_transform(mul, float("inf"))
    for mul in (1e39, 1e-50):
        with pytest.raises(ValueError, match="out of float32's range"):
            plan.set_grad_transform(mul, float("inf"))
    f64 = _core.Plan([np.ones(4)], ["p"], [], [])
    f64.set_grad_transform(1e39, float("inf"))  # (float64 arithmetic: fine)
    w = np.ones(64, np.float32)
    opt = fo.Adam([w], lr=0.1)
    for scale in (1e-39, 1e40):
        with pytest.raises(ValueError, match=r"Adam.step: invalid grad_scale=.*float32"):
            opt.step([np.ones(64, np.float32)], grad_scale=scale)
    assert (w == 1).all() and (p == 1).all()


@pytest.mark.parametrize("which", ["row_var", "col_var", "variance"])
def test_functional_adafactor_state_checked_before_any_update(which: str) -> None:
    """A read-only col_var let row_var be updated before NumPy's bare error; a strided view
    sharing the parameter's memory escaped the overlap check."""
    two = which != "variance"
    p = np.ones((4, 3) if two else 4, np.float32)
    g = np.ones_like(p)
    st = (
        {"row_var": np.zeros((4, 1), np.float32), "col_var": np.zeros((1, 3), np.float32)}
        if two
        else {"variance": np.zeros(4, np.float32)}
    )
    st[which].flags.writeable = False
    before = {k: v.copy() for k, v in st.items()}
    with pytest.raises(ValueError, match=f"adafactor_: {which} must be a writeable C-contiguous"):
        F.adafactor_(p, g, st.get("row_var"), st.get("col_var"), st.get("variance"), step=1)
    assert (p == 1).all() and all(np.array_equal(st[k], before[k]) for k in st)
    buf = np.zeros(8, np.float32)
    q = buf[:4]
    q[:] = 1
    with pytest.raises(ValueError, match="variance must be a writeable C-contiguous"):
        F.adafactor_(q, np.ones(4, np.float32), None, None, buf[4:0:-1], step=1)
    assert np.array_equal(buf, [1, 1, 1, 1, 0, 0, 0, 0])


def test_check_disjoint_refuses_arrays_it_cannot_measure() -> None:
    a = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="b: array is not C-contiguous"):
        _core.check_disjoint([a[:4], a[::2]], ["a", "b"])
