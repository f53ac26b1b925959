"""What an optimizer keeps alive, and what a failed or skipped step leaves behind (session 16's
audit of leaks and object lifetime): each test failed before its fix."""

from __future__ import annotations

import gc
import os
import sys
import weakref
from typing import Any

import numpy as np
import pytest

import fastoptim as fo


def _alive(ref: weakref.ref[Any]) -> bool:
    gc.collect()
    return ref() is not None


# ------------------------------------------------------------------------ a failing schedule
def _failing(t: int) -> float:
    if t > 0:
        raise ZeroDivisionError("no lr after the first step")
    return 1e-3


def test_a_failing_schedule_keeps_no_step_alive() -> None:
    """A schedule that raised after a step made every later step raise the same stored
    exception object: each raise appended that step's frames to its traceback, keeping every
    gradient passed to the failed steps alive (and the traceback growing without bound)."""
    p = np.ones(1000, np.float32)
    opt = fo.Adam([p], lr=_failing)
    opt.step([np.ones_like(p)])
    refs, depths = [], []
    for _ in range(5):
        g = np.ones_like(p)
        refs.append(weakref.ref(g))
        with pytest.raises(ValueError, match="schedule of lr") as info:
            opt.step([g])
        assert isinstance(info.value.__cause__, ZeroDivisionError)  # the schedule's own error
        tb, depth = info.value.__traceback__, 0
        while tb is not None:
            tb, depth = tb.tb_next, depth + 1
        depths.append(depth)
        del g, info
    assert not any(_alive(r) for r in refs)
    assert len(set(depths)) == 1, depths  # the same traceback each time
    np.testing.assert_array_equal(p, np.float32(1) - np.float32(1e-3))  # nothing else happened


def test_a_failing_schedule_keeps_no_closure_alive_in_torch() -> None:
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    w = torch.nn.Parameter(torch.ones(8))
    opt = fot.Adam([w], lr=_failing)
    w.grad = torch.ones(8)
    opt.step()

    def attempt() -> weakref.ref[np.ndarray]:
        batch = np.ones(100)  # (this frame, with its batch, was kept by the traceback)
        try:
            opt.step(lambda: float(batch.sum()))
        except ValueError:
            pass
        return weakref.ref(batch)

    refs = [attempt() for _ in range(3)]
    assert not any(_alive(r) for r in refs)


# -------------------------------------------------------- gradients of a step that did not run
def test_a_skipped_step_keeps_no_gradient_alive() -> None:
    """skip_nonfinite skipped the step before the compiled call that forgets the passed
    gradients: they stayed bound to the plan until the next good step."""
    p = np.ones(1000, np.float32)
    opt = fo.Adam([p], skip_nonfinite=True)
    g = np.full(1000, np.nan, np.float32)
    ref = weakref.ref(g)
    opt.step([g])
    assert opt.step_skipped
    del g
    assert not _alive(ref)
    opt.step([np.ones_like(p)])  # and the next step binds its own
    assert opt.step_count == 1


def test_a_refused_step_keeps_no_gradient_alive() -> None:
    """A step refused by a later group's check had bound the earlier groups' gradients."""
    a, b = np.ones(100, np.float32), np.ones(100, np.float32)
    opt = fo.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    g = np.ones(100, np.float32)
    ref = weakref.ref(g)
    with pytest.raises((TypeError, ValueError)):
        opt.step([g, np.ones(100, np.float64)])  # group 1: the wrong dtype
    del g
    assert not _alive(ref)
    np.testing.assert_array_equal(a, 1.0)
    opt.step([np.ones(100, np.float32), np.ones(100, np.float32)])
    np.testing.assert_allclose(a, 0.9)


def test_a_skipped_torch_step_frees_its_gradients() -> None:
    """After a step GradScaler (found_inf) or skip_nonfinite skipped,
    ``zero_grad(set_to_none=True)`` did not free the gradients: the plans held them until the
    next good step, so the next backward pass held two sets."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    for kw in ({}, {"skip_nonfinite": True}):
        m = torch.nn.Linear(16, 16)
        opt = fot.AdamW(m.parameters(), **kw)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        for p in m.parameters():
            p.grad = torch.full_like(p, float("inf"))
        assert m.weight.grad is not None
        ref = weakref.ref(m.weight.grad)
        before = m.weight.detach().clone()
        if kw:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        assert not _alive(ref), kw
        assert torch.equal(m.weight.detach(), before)


def test_a_removed_torch_group_is_freed() -> None:
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    a, b = torch.nn.Parameter(torch.ones(64)), torch.nn.Parameter(torch.ones(64))
    opt = fot.Adam([a])
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = torch.ones(64), torch.ones(64)
    opt.step()
    opt.param_groups.pop()
    opt.state.pop(b)
    ref = weakref.ref(b)
    del b
    opt.step()
    assert not _alive(ref)


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.skipif(sys.platform != "linux", reason="Linux's 255-byte file names")
def test_a_failed_save_leaves_no_descriptor_open(tmp_path: Any) -> None:
    """A target whose status could not be read (a name longer than the file system allows:
    the temporary file's name is shortened, so it was created) leaked the temporary's
    descriptor, once per save, and raised an error that named the temporary file."""
    opt = fo.Adam([np.ones(10, np.float32)])
    target = tmp_path / ("x" * 300 + ".npz")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError, match="save: cannot read the permissions") as info:
            fo.save(target, opt)
        assert info.value.filename == os.fspath(target)
    assert len(os.listdir("/proc/self/fd")) == before
    assert os.listdir(tmp_path) == []


def _closure(w: np.ndarray, grads: list[np.ndarray]) -> Any:
    return lambda: (float((w * w).sum()), grads)


@pytest.mark.parametrize("cls", ["Muon", "Adafactor", "LBFGS", "reference.Adam"])
def test_steps_in_python_keep_no_gradient_alive(cls: str) -> None:
    """Muon and Adafactor (steps in NumPy), LBFGS's closure gradients and the reference
    optimizers kept the last gradients they were given bound to their plans."""
    from fastoptim import reference

    w = np.ones((4, 6), np.float32)
    if cls == "reference.Adam":
        opt: Any = reference.Adam([w], lr=0.1, skip_nonfinite=True)
    else:
        opt = getattr(fo, cls)([w])
    g = np.full((4, 6), 0.5, np.float32)
    ref = weakref.ref(g)
    if cls == "LBFGS":
        opt.step(_closure(w, [g]))
    else:
        opt.step([g])
    if cls == "reference.Adam":  # and a skipped step's
        g2 = np.full((4, 6), np.nan, np.float32)
        ref2 = weakref.ref(g2)
        opt.step([g2])
        assert opt.step_skipped
        del g2
        assert not _alive(ref2)
    del g
    assert not _alive(ref)
