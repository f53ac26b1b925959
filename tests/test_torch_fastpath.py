"""``fastoptim.torch``'s step paths (skipped when torch is not installed).

A step whose group, state and tensors are as after the previous step takes the fast path
(``Plan.bind_torch`` reads every gradient and checks parameters and gradients in C, through
DLPack's exchange API; ``_core.Snapshot`` tells that no state object was replaced); anything
else takes the general path, which checks everything in Python.  Each test of a change
between steps runs with the fast path on and off against ``torch.optim``'s for-loop under the
same treatment; the hook tests check that torch's step hooks and profiler events are kept.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as fot  # noqa: E402
from fastoptim import _core  # noqa: E402


def _close(ours: list[Any], theirs: list[Any], what: str) -> None:
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=what)


def test_changes_between_steps_like_torch(fast: bool) -> None:
    """Everything a training loop, a scheduler or a wrapper may change between two steps,
    one change per step, against torch.optim.Adam given the same treatment."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (5,), (3, 2)]
    ours = [torch.randn(s, generator=gen) for s in shapes]
    theirs = [p.clone() for p in ours]
    fast_opt = fot.Adam(ours, lr=0.1, betas=[0.9, 0.999])
    ref = torch.optim.Adam(theirs, lr=0.1, betas=[0.9, 0.999], foreach=False)
    kept: list[Any] = []
    for t in range(21):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if t == 2:  # new storage, same layout
            ours[0].data = ours[0].data.clone()
        if t == 3:  # new storage, transposed layout
            ours[0].data = ours[0].data.t().contiguous().t()
        if t in (4, 5):  # a parameter without gradient, then with one again
            ours[1].grad = theirs[1].grad = None
        if t == 6:  # a gradient laid out differently from its parameter
            ours[2].grad = grads[2].t().contiguous().t()
        if t == 7:  # a state tensor replaced
            fast_opt.state[ours[1]]["exp_avg"] = fast_opt.state[ours[1]]["exp_avg"].clone()
        if t == 8:  # a hyper-parameter assigned
            fast_opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.05
        if t == 9:  # a list entry changed in place (torch.optim keeps a tuple)
            fast_opt.param_groups[0]["betas"] = [0.9, 0.999]
        if t == 10:
            fast_opt.param_groups[0]["betas"][0] = 0.8
            ref.param_groups[0]["betas"] = (0.8, 0.999)
        if t == 11:  # a tensor lr, then changed in place (as torch's schedulers do)
            fast_opt.param_groups[0]["lr"] = torch.tensor(0.04)
            ref.param_groups[0]["lr"] = torch.tensor(0.04)
        if t == 12:
            fast_opt.param_groups[0]["lr"].fill_(0.03)
            ref.param_groups[0]["lr"].fill_(0.03)
        if t == 13:  # a negative view (its memory holds -g)
            z = torch.complex(torch.zeros(5), grads[1]).conj()
            assert z.imag.is_neg()
            ours[1].grad = z.imag
            theirs[1].grad = -grads[1]
        if t in (14, 15, 16):  # the same gradient tensors: values, then storage changed
            if t == 14:
                kept = [p.grad for p in ours]
            for p, k in zip(ours, kept):
                p.grad = k
            if t == 15:
                ours[0].grad.copy_(grads[0])
            if t == 16:
                ours[0].grad.data = grads[0].clone()
            for p, q in zip(ours, theirs):
                q.grad = p.grad.clone()
        if t == 17:  # state and groups replaced by new containers (offload/sharding wrappers)
            fast_opt.state = defaultdict(dict, {p: dict(v) for p, v in fast_opt.state.items()})
            fast_opt.param_groups = [dict(g) for g in fast_opt.param_groups]
            fast_opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.02
        if t == 18:  # a state entry replaced by another dict of the same tensors
            fast_opt.state[ours[2]] = dict(fast_opt.state[ours[2]])
        fast_opt.step()
        ref.step()
        _close(ours, theirs, f"params after step {t}")
        _close(
            [fast_opt.state[p]["exp_avg_sq"] for p in ours],
            [ref.state[p]["exp_avg_sq"] for p in theirs],
            f"exp_avg_sq after step {t}",
        )
        assert [float(fast_opt.state[p]["step"]) for p in ours] == [
            float(ref.state[p]["step"]) for p in theirs
        ]


def test_fast_path_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing changed but the gradient tensors, a step neither rebuilds nor rechecks the
    group in Python (the overhead benchmarks measure this path)."""
    if not fot._FAST:
        pytest.skip("torch has no DLPack exchange API: every step takes the general path")
    params = [torch.zeros(8) for _ in range(5)]
    opt = fot.AdamW(params, lr=0.1)
    calls = []
    sig = fot.Optimizer._sig
    monkeypatch.setattr(fot.Optimizer, "_sig", lambda *a: calls.append(1) or sig(*a))
    for t in range(6):
        for p in params:
            p.grad = torch.ones(8)
        opt.step()
        if t == 1:
            calls.clear()
    assert calls == []
    params[0].data = torch.zeros(8)  # a change: the general path, once
    for _ in range(2):
        calls.clear()
        params[0].grad = torch.ones(8)
        opt.step()
        assert torch.all(params[0] != 0)
    assert calls == []


def test_bad_gradient_after_fast_steps_changes_nothing(fast: bool) -> None:
    a, b = torch.ones(4), torch.ones(4)
    opt = fot.Adam([a, b], lr=0.1)
    for _ in range(3):
        a.grad, b.grad = torch.ones(4), torch.ones(4)
        opt.step()
    before = [a.clone(), b.clone()], [float(s["step"]) for s in opt.state.values()]
    b.grad = a.detach()  # aliases a parameter
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    b.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):  # (torch.optim's type)
        opt.step()
    b.grad = torch.ones(4)
    b.grad.data = torch.ones(2, 2)  # (the setter checks shapes; .data does not)
    with pytest.raises(ValueError, match="does not match"):
        opt.step()
    assert torch.equal(a, before[0][0]) and torch.equal(b, before[0][1])
    assert [float(s["step"]) for s in opt.state.values()] == before[1]
    b.grad = torch.ones(4)
    opt.step()
    assert [float(s["step"]) for s in opt.state.values()] == [4.0, 4.0]


@pytest.mark.parametrize("name", ["Adam", "AdamWScheduleFree", "LBFGS"])
def test_step_hooks_and_profiler_like_torch(name: str) -> None:
    """torch.optim's step pre/post hooks (the optimizer's and the global ones) run once per
    step, a pre-hook may replace the arguments, and a profiler sees the step's event."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    p = torch.ones(3, requires_grad=True)
    opt = getattr(fot, name)([p], lr=0.01)
    if name == "AdamWScheduleFree":
        opt.train()
    seen: list[str] = []

    def closure() -> Any:
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    def pre(o: Any, args: Any, kwargs: Any) -> Any:
        seen.append("pre")
        return (o, closure), kwargs  # the closure is what the step gets

    handles = [
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(lambda *a: seen.append("post")),
        register_optimizer_step_pre_hook(lambda *a: seen.append("gpre")),
        register_optimizer_step_post_hook(lambda *a: seen.append("gpost")),
    ]
    try:
        closure()
        opt.step(None if name != "LBFGS" else closure)
        assert seen == ["gpre", "pre", "post", "gpost"]
        assert torch.all(p < 1)  # the step happened (with the hook's closure for LBFGS)
    finally:
        for h in handles:
            h.remove()
    seen.clear()
    closure()
    opt.step(closure if name == "LBFGS" else None)
    assert seen == []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        closure()
        opt.step(closure if name == "LBFGS" else None)
    events = {e.name for e in prof.events()}
    assert f"Optimizer.step#{name}.step" in events


def test_no_grad_mode_restored() -> None:
    """The step runs without autograd recording and restores the mode it found."""
    p = torch.ones(3)
    opt = fot.SGD([p], lr=0.1)
    for mode in (True, False, True):
        p.grad = torch.ones(3)
        with torch.set_grad_enabled(mode):
            opt.step()
            assert torch.is_grad_enabled() is mode
    assert not p.requires_grad and torch.allclose(p, torch.full((3,), 0.7))


def test_bind_torch_refuses_overlapping_gradients() -> None:
    """Plan.bind_torch binds gradients that overlap nothing, in any address order, and refuses
    (False, nothing bound: the general path then raises) any that overlaps a parameter, a
    state buffer or another gradient, by one element or wholly."""
    if not fot._FAST:
        pytest.skip("torch has no DLPack exchange API: every step takes the general path")
    flat = torch.zeros(80)  # the parameters: slices of one block, a gap between each
    params = [flat[20 * i : 20 * i + 8] for i in range(4)]
    pool = torch.zeros(80)
    for i, p in enumerate(params):
        p.grad = pool[20 * i : 20 * i + 8]
    opt = fot.Adam(params, lr=0.1)
    opt.step()
    opt.step()
    plan = opt._caches[0].plan
    exp_avg = opt.state[params[2]]["exp_avg"]
    group = opt.param_groups[0]["params"]

    def bind(grads: list[Any]) -> bool:
        for p, g in zip(params, grads):
            p.grad = g
        return bool(plan.bind_torch(group))

    assert bind([pool[20 * i : 20 * i + 8] for i in (3, 1, 0, 2)])  # (address order shuffled)
    assert bind([flat[20 * i + 8 : 20 * i + 16] for i in range(4)])  # (the parameters' gaps)
    refused = {
        "a parameter": [flat[0:8], pool[20:28], pool[40:48], pool[60:68]],
        "a parameter's last element": [pool[0:8], flat[27:35], pool[40:48], pool[60:68]],
        "a parameter's first element": [pool[0:8], pool[20:28], flat[33:41], pool[60:68]],
        "a state": [pool[0:8], pool[20:28], exp_avg, pool[60:68]],
        "each other": [pool[0:8], pool[7:15], pool[40:48], pool[60:68]],
        "each other, wholly": [pool[0:8], pool[0:8], pool[40:48], pool[60:68]],
    }
    for what, grads in refused.items():
        assert not bind(grads), what
    assert bind([pool[20 * i : 20 * i + 8] for i in range(4)])


def test_grad_attribute_changed_on_the_type() -> None:
    """Plan.bind_torch calls torch's ``grad`` getter itself only while neither torch.Tensor nor
    torch.nn.Parameter was modified: a ``grad`` property defined on the type is honoured."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fot.SGD([p], lr=1.0)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert torch.equal(p.detach(), torch.full((3,), -3.0))
    other = torch.full((3,), 10.0)
    torch.nn.Parameter.grad = property(lambda self: other)  # type: ignore[assignment]
    try:
        opt.step()
    finally:
        del torch.nn.Parameter.grad
    assert torch.equal(p.detach(), torch.full((3,), -13.0))
    opt.step()  # torch's getter again: the gradient of ones
    assert torch.equal(p.detach(), torch.full((3,), -14.0))


def test_snapshot() -> None:
    """_core.Snapshot: the identities of a dict's keys and values, one level of dicts down."""
    t, u = object(), object()
    inner = {"a": t}
    d = {1: inner, 2: u}
    snap = _core.Snapshot(d)
    assert snap.same(d) and snap.same(dict(d))  # another dict holding the same objects
    inner["a"] = object()
    assert not snap.same(d)
    inner["a"] = t
    assert snap.same(d)
    inner["b"] = t
    assert not snap.same(d)
    del inner["b"]
    d[3] = None
    assert not snap.same(d)
    del d[3]
    d[1] = dict(inner)  # an equal dict, not the same one
    assert not snap.same(d)
    assert not snap.same({2: u, 1: inner})  # another order
    assert not snap.same([])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _core.Snapshot([])  # type: ignore[arg-type]


def test_plan_binds_dlpack_capsules() -> None:
    """Plan.bind_grads takes DLPack capsules too (how fastoptim.torch's general path hands
    gradients over): checked like arrays, errors naming the gradient."""
    p = np.zeros((2, 3), np.float32)
    plan = _core.Plan([p], ["w"], [], [])
    plan.bind_grads([torch._C._to_dlpack(torch.ones(2, 3))])
    plan.bind_grads([torch._C._to_dlpack(torch.ones(2, 3, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="grad for param w: not laid out like the parameter"):
        plan.bind_grads([torch._C._to_dlpack(torch.ones(3, 2).t())])
    with pytest.raises(ValueError, match="grad for param w"):
        plan.bind_grads([torch._C._to_dlpack(torch.ones(3, 2))])
    with pytest.raises(TypeError, match="grad for param w: its dtype"):
        plan.bind_grads([torch._C._to_dlpack(torch.ones(2, 3, dtype=torch.float64))])
    with pytest.raises(TypeError, match="grad for param w: dtype"):
        plan.bind_grads([torch._C._to_dlpack(torch.ones(2, 3, dtype=torch.int32))])
    with pytest.raises(ValueError, match="shares memory"):
        plan.bind_grads([torch._C._to_dlpack(torch.from_numpy(p))])


def test_overhead_benchmark() -> None:
    """fastoptim bench --overhead's torch rows: every configuration measured, and printed."""
    from fastoptim.apps import bench

    times = bench.torch_step_overhead(tensors=(1, 4), repeats=3, rounds=1)
    assert sorted(times) == [(1, False), (1, True), (4, False), (4, True)]
    assert all(0 < t < 1 for t in times.values())
    text = bench.format_torch_overhead(times)
    assert text.count("fixed") == 2 and text.count("per tensor") == 2


def test_a_torch_without_the_dlpack_exchange_api() -> None:
    """torch < 2.10 has no DLPack exchange API: no fast path, every step on the general one.
    The plans' storage watch (added for the fast path) then raised at the first step."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.Tensor.__dlpack_c_exchange_api__ = None\n"
        "import fastoptim.torch as fot\n"
        "assert not fot._FAST\n"
        "p = torch.nn.Parameter(torch.ones(4))\n"
        "opt = fot.Adam([p], lr=0.1)\n"
        "for _ in range(2):\n"
        "    p.grad = torch.ones(4)\n"
        "    opt.step()\n"
        "print(round(float(p[0]), 4))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.8"
