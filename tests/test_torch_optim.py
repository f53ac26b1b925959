"""``fastoptim.torch``: the ``torch.optim`` drop-in (skipped when torch is not installed).

The trajectory test runs the shared table of cases (``cases.CASES``; Lion, which torch lacks,
against :class:`fastoptim.Lion` instead) for 120 steps with a learning-rate change halfway, in
float32 and float64, on one group mixing contiguous parameters with transposed, permuted and
channels-last ones; every other step the gradients come in the other layout (a contiguous
gradient for a transposed parameter and the reverse).  The oracle is ``torch.optim``'s
single-tensor "for-loop" implementation (``foreach=False``) on the same tensors; parameters and
every state tensor (and ``step``, NAdam's ``mu_product``) are compared.

Tolerance, as in test_torch.py: ``rtol = K * eps(dtype)`` and ``atol = K * eps(dtype) * M``
with M the largest |torch value| that kind of array has reached so far in its gradient family.
fastoptim fuses multiply-adds where torch rounds twice, so a few ulps per step are expected
and accumulate over the run.  ``K`` was measured: see ``RTOL_ULPS``.
"""

from __future__ import annotations

import copy
import gc
import inspect
import io
import json
import os
import pickle
import subprocess
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as fot  # noqa: E402
from cases import (  # noqa: E402
    CASES,
    EXTENSIONS,
    SPARSE_ONLY,
    Case,
    Scales,
    check_close,
    each_case,
    every_dtype,
    make_families,
    once_not_per_isa,
)
from fastoptim import _openmp, definitions, schedules  # noqa: E402
from fastoptim.engine.definition import COMMON  # noqa: E402

NAMES = [d.name for d in definitions.ALL if hasattr(torch.optim, d.name)]  # all but Lion
STEPS = 120
# Measured over the table (both dtypes, 5 seeds, 120 steps): K <= 2.9 needed (Adadelta's
# acc_delta; the chaotic elements excluded, see run_against_torch).  16 leaves 5x headroom; a
# wrong formula, a lost update or a mis-ordered element is off by orders of magnitude more.
RTOL_ULPS = 16

# (logical shape, memory order): None is contiguous; a permutation p means the tensor is laid
# out so that t.permute(p) is contiguous (transposed, permuted, channels-last).
LAYOUTS: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = [
    ((), None),
    ((0,), None),
    ((1,), None),
    ((7,), None),
    ((17,), None),
    ((33, 31), None),
    ((33, 31), (1, 0)),
    ((5, 6, 7), (2, 0, 1)),
    ((2, 3, 4, 5), (0, 2, 3, 1)),  # channels-last
    ((4099,), None),
]


def laid_out(values: np.ndarray, perm: tuple[int, ...] | None) -> Any:
    """A tensor holding `values` whose memory order is `perm` (None: contiguous)."""
    t = torch.tensor(values)
    if perm is None:
        return t
    inverse = tuple(int(i) for i in np.argsort(perm))
    return t.permute(perm).contiguous().permute(inverse)


def other_layout(perm: tuple[int, ...] | None, ndim: int) -> tuple[int, ...] | None:
    """A different memory order for a gradient (None if the tensor has only one)."""
    if perm is not None:
        return None
    return tuple(reversed(range(ndim))) if ndim >= 2 else None


@pytest.fixture
def float64_scalars() -> Iterator[None]:
    """torch's scalar state (step, mu_product) in float64, as with a float64 default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def make_run(
    rng: np.random.Generator, dtype: Any
) -> tuple[list[Any], list[Any], list[np.ndarray], list[int]]:
    """Two identical lists of tensors laid out as LAYOUTS (two gradient families), their
    gradient scales and families."""
    shapes = [s for s, _ in LAYOUTS]
    p0, gscales, family = make_families(rng, shapes, shapes)
    perms = [perm for _, perm in LAYOUTS] * 2
    ours = [laid_out(p.astype(dtype), perm) for p, perm in zip(p0, perms)]
    theirs = [laid_out(p.astype(dtype), perm) for p, perm in zip(p0, perms)]
    return ours, theirs, gscales, family


def set_grads(
    rng: np.random.Generator,
    gscales: list[np.ndarray],
    t: int,
    *groups: list[Any],
    sparse: bool = False,
) -> None:
    """New gradients for every list of tensors in `groups` (the same values): in each
    parameter's own layout on even steps, in another layout on odd ones; with `sparse`, as
    sparse COO tensors (of the nonzero elements on even steps, of the nonzero rows on odd
    ones), which is what SparseAdam takes."""
    perms = [perm for _, perm in LAYOUTS] * 2
    for i, s in enumerate(gscales):
        g = np.asarray(rng.standard_normal(s.shape) * s).astype(np.float32)
        perm = perms[i] if t % 2 == 0 else other_layout(perms[i], s.ndim)
        for params in groups:
            p = params[i]
            p.grad = laid_out(g.astype(np.float64), perm).to(p.dtype)
            if sparse:
                p.grad = p.grad.to_sparse() if t % 2 == 0 or p.dim() == 0 else p.grad.to_sparse(1)


def check_state(
    where: str,
    ours: Any,
    theirs: Any,
    fast: Any,
    ref: Any,
    scales: Scales,
    rtol: float,
    masks: list[np.ndarray | None],
) -> None:
    """Every state tensor and parameter of `ours` (in `fast`) against `theirs` (in `ref`),
    outside `masks[i]` for tensor i."""
    for i, b in enumerate(theirs):  # M: the family's largest values, all tensors included
        scales.update(i, "param", b.detach().numpy())
        for n, want in ref.state[b].items():
            if n not in ("step", "mu_product"):
                scales.update(i, n, want.numpy())
    for i, (a, b) in enumerate(zip(ours, theirs)):
        sa, sb = fast.state[a], ref.state[b]
        assert set(sa) == set(sb), f"{where}: state names {sorted(sa)} != {sorted(sb)}"
        for n, want in sb.items():
            got = sa[n]
            if n == "step" and not isinstance(want, torch.Tensor):  # (SparseAdam: an int)
                assert float(got) == want, f"{where} step {float(got)} != {want}"
                continue
            assert isinstance(got, torch.Tensor), f"{where} {n}"
            assert got.dtype == want.dtype, f"{where} {n}: {got.dtype} != {want.dtype}"
            assert got.shape == want.shape, f"{where} {n}"
            if n == "step":
                assert float(got) == float(want), f"{where} step {float(got)} != {float(want)}"
            elif n == "mu_product":
                assert float(got) == pytest.approx(float(want), rel=4 * rtol), where
            else:
                check_close(
                    f"{where} tensor {i} state {n!r}",
                    got.numpy(),
                    want.numpy(),
                    rtol,
                    rtol * scales(i, n),
                    masks[i],
                )
        check_close(
            f"{where} tensor {i} param",
            a.detach().numpy(),
            b.detach().numpy(),
            rtol,
            rtol * scales(i, "param"),
            masks[i],
        )


TORCH_CASES = [c for c in CASES if hasattr(torch.optim, c.opt) and not c.fastoptim_only]


def run_against_torch(case: Case, dtype: Any, rng: np.random.Generator, steps: int) -> None:
    """`steps` steps of `case` against torch.optim's for-loop path, every layout, the learning
    rate changed halfway; compared at a few steps and every 10th."""
    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    ours, theirs, gscales, family = make_run(rng, dtype)
    ptrs = [p.data_ptr() for p in ours]
    fast = getattr(fot, case.opt)(ours, **case.kwargs)
    sparse = case.opt in SPARSE_ONLY  # (SparseAdam: sparse gradients, no foreach option)
    loop = {} if sparse else {"foreach": False}
    ref = getattr(torch.optim, case.opt)(theirs, **loop, **case.kwargs)
    scales = Scales(family)
    # With L2 weight decay, the elements whose gradient is zero or tiny (1e-7) are driven by
    # g = wd * p alone: they shrink to 0 and then oscillate around it, where an ulp of
    # difference in one step decides the sign of the next (chaotic: both implementations are
    # right).  They are compared for the first 10 steps only.
    l2 = case.kwargs.get("weight_decay", 0) and not (
        case.opt == "AdamW" or case.kwargs.get("decoupled_weight_decay")
    )
    chaotic = [s < 1e-3 if l2 else None for s in gscales]
    for t in range(1, steps + 1):
        if t == steps // 2 + 1:
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = case.kwargs["lr"] * case.new_lr_factor
        set_grads(rng, gscales, t, ours, theirs, sparse=sparse)
        fast.step()
        ref.step()
        if t % 10 == 0 or t in (1, 2, 3, steps // 2 + 1):
            masks = chaotic if t > 10 else [None] * len(ours)
            check_state(f"{case.opt} step {t}", ours, theirs, fast, ref, scales, rtol, masks)
    assert [p.data_ptr() for p in ours] == ptrs  # updated in place
    assert [p.stride() for p in ours] == [p.stride() for p in theirs]


@every_dtype
@each_case(TORCH_CASES)
def test_trajectory_matches_torch(case: Case, dtype: Any, rng: np.random.Generator) -> None:
    # (torch's dense += sparse on permuted layouts is slow: fewer steps for SparseAdam)
    run_against_torch(case, dtype, rng, 40 if case.opt in SPARSE_ONLY else STEPS)


@every_dtype
def test_nadam_with_float64_scalars(
    dtype: Any, rng: np.random.Generator, float64_scalars: None
) -> None:
    """torch keeps step and mu_product in float64 when its default dtype is float64."""
    case = next(c for c in CASES if c.opt == "NAdam" and c.label == "momentum_decay")
    run_against_torch(case, dtype, rng, 40)


# Lion, ADOPT and the options torch lacks (cautious); but NAdam's, whose mu_product
# fastoptim.torch advances in torch's scalar dtype (test_cautious.py compares it within rounding)
NOT_IN_TORCH_CASES = [
    c for c in CASES if (not hasattr(torch.optim, c.opt) or c.fastoptim_only) and c.opt != "NAdam"
]


@every_dtype
@each_case(NOT_IN_TORCH_CASES)
def test_not_in_torch_matches_fastoptim(case: Case, dtype: Any, rng: np.random.Generator) -> None:
    """An optimizer torch lacks (Lion): compare with the NumPy class on NumPy copies.  Same
    kernel, same elements: bit for bit, whatever the layouts."""
    ours, _, gscales, _ = make_run(rng, dtype)
    arrays = [p.numpy().copy() for p in ours]
    fast = getattr(fot, case.opt)(ours, **case.kwargs)
    ref = getattr(fastoptim, case.opt)(arrays, **case.kwargs)
    for t in range(1, STEPS + 1):
        if t == STEPS // 2 + 1:
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = case.kwargs["lr"] * case.new_lr_factor
        set_grads(rng, gscales, t, ours)
        fast.step()
        ref.step([p.grad.numpy().copy() for p in ours])
    # the case's state buffers (SGD without momentum has none)
    states = set(fast._definition.compile({**fast.defaults, **case.kwargs}).state_names())
    for i, (p, a) in enumerate(zip(ours, arrays)):
        if _memory_order_sums(fast, i):
            _close_to_ulps(p.numpy(), a, f"param {i}")
            for n in states:
                _close_to_ulps(fast.state[p][n].numpy(), ref.state[i][n], n)
            continue
        np.testing.assert_array_equal(p.numpy(), a, err_msg=f"param {i}")
        for n in states:
            np.testing.assert_array_equal(fast.state[p][n].numpy(), ref.state[i][n])
    assert set(fast.state[ours[0]]) == states | ({"step"} if fast._definition.torch_step else set())


@each_case([c for c in CASES if c.opt not in ("NAdam", *SPARSE_ONLY)])
def test_same_bits_as_numpy_classes(case: Case, rng: np.random.Generator) -> None:
    """fastoptim.torch.X and fastoptim.X run the same kernel on the same elements."""
    ours, _, gscales, _ = make_run(rng, np.float32)
    arrays = [p.numpy().copy() for p in ours]
    fast = getattr(fot, case.opt)(ours, **case.kwargs)
    ref = getattr(fastoptim, case.opt)(arrays, **case.kwargs)
    for t in range(1, 31):
        set_grads(rng, gscales, t, ours)
        fast.step()
        ref.step([p.grad.numpy().copy() for p in ours])
    for i, (p, a) in enumerate(zip(ours, arrays)):
        if _memory_order_sums(fast, i):
            _close_to_ulps(p.numpy(), a, f"{case.id} param {i}")
            continue
        np.testing.assert_array_equal(p.numpy(), a, err_msg=f"{case.id} param {i}")


def _memory_order_sums(opt: Any, i: int) -> bool:
    """Whether parameter `i` is laid out other than C-contiguous (LAYOUTS' permutations, in
    either family) for an optimizer with per-tensor norms (LAMB, LARS): fastoptim.torch sums
    its squares in memory order, the NumPy class in the copy's C order, so the trust ratio,
    hence the step, may differ by rounding (elements are otherwise computed alike)."""
    return bool(opt._definition.per_tensor and LAYOUTS[i % len(LAYOUTS)][1] is not None)


def _close_to_ulps(got: np.ndarray, want: np.ndarray, what: str) -> None:
    # A few ulps of the ratio per step, accumulated over the run (the momentum buffer sums them):
    # measured <= 160 eps of the array's largest value over STEPS steps
    tol = 256 * float(np.finfo(want.dtype).eps)
    big = float(np.max(np.abs(want), initial=0.0))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * big, err_msg=what)


def _as_torch(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fastoptim.torch's group records without its own options (COMMON: the precision policy;
    the extensions such as ``cautious``), which must hold their defaults: what torch.optim's
    records hold."""
    out = []
    own = {**{h.name: h.default for h in COMMON}, **{n: False for n in EXTENSIONS}}
    for g in groups:
        for name, default in own.items():
            assert g.get(name, default) == default, (name, g.get(name))
        out.append({k: v for k, v in g.items() if k not in own})
    return out


# --------------------------------------------------------------------------- API compatibility
@pytest.mark.parametrize("name", NAMES)
def test_signature_and_defaults_as_torch(name: str) -> None:
    ours, theirs = getattr(fot, name), getattr(torch.optim, name)
    a = inspect.signature(ours.__init__).parameters
    b = inspect.signature(theirs.__init__).parameters
    # torch's signature, then fastoptim's own options of this optimizer (cautious), then those
    # common to every optimizer (all keyword-only)
    definition = getattr(fot, name)._definition
    common = [
        (h.name, inspect.Parameter.KEYWORD_ONLY, h.default)
        for h in (*(h for h in definition.hyper if h.extension), *COMMON)
    ]
    assert [(p.name, p.kind, p.default) for p in a.values()] == [
        (p.name, p.kind, p.default) for p in b.values()
    ] + common
    p = torch.zeros(3)
    assert getattr(fot, name)([p]).defaults == {
        **theirs([p]).defaults,
        **{n: d for n, _, d in common},
    }
    assert issubclass(ours, torch.optim.Optimizer)


def test_torch_only_flags() -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = fot.Adam([p], foreach=True)
    assert opt.param_groups[0]["foreach"] is True
    opt = fot.Adam([p], fused=True)
    assert opt.param_groups[0]["fused"] is True
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p < 0)
    with pytest.raises(ValueError, match="differentiable"):
        fot.Adam([p], differentiable=True)
    with pytest.raises(ValueError, match="capturable"):
        fot.RMSprop([p], capturable=True)
    opt.param_groups[0]["capturable"] = True
    before = p.detach().clone()
    with pytest.raises(ValueError, match="capturable"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_invalid_hyper_parameters() -> None:
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="lr"):
        fot.Adam([p], lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        fot.SGD([p], lr=0.1, nesterov=True)
    opt = fot.SGD([p], lr=0.1)
    opt.param_groups[0]["lr"] = float("nan")
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(p, torch.zeros(3))
    opt.param_groups[0]["lr"] = torch.tensor(0.5)  # a tensor lr, as torch allows
    opt.step()
    assert torch.equal(p, torch.full((3,), -0.5))


# --------------------------------------------------------------------------- schedules, groups
def test_torch_lr_scheduler() -> None:
    torch.manual_seed(0)
    ours = [torch.randn(10, 3), torch.randn(4)]
    theirs = [p.clone() for p in ours]
    fast = fot.SGD(ours, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, foreach=False)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in (fast, ref)]
    for _ in range(30):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fast.step()
        ref.step()
        for s in schedulers:
            s.step()
    assert fast.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.1 * 0.5**6
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cosine_warm_restarts_and_closure() -> None:
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = fot.Adam([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3)

    def closure() -> Any:
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    losses = []
    for _ in range(40):
        losses.append(float(opt.step(closure).detach()))
        sched.step()
    assert losses[-1] < 0.1 * losses[0]


def test_add_param_group_and_heterogeneous_steps() -> None:
    """Parameters whose step counts differ (a gradient was None for a while, a group added
    later) follow torch exactly, for every optimizer with per-parameter state."""
    for name, kwargs in [
        ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2)),
        ("Adam", dict(lr=0.01, amsgrad=True)),
        ("NAdam", dict(lr=0.01, momentum_decay=0.3)),
        ("RAdam", dict(lr=0.01)),
        ("Adagrad", dict(lr=0.1, lr_decay=0.1)),
    ]:
        gen = torch.Generator().manual_seed(1)
        ours = [torch.randn(5, generator=gen) for _ in range(4)]
        theirs = [p.clone() for p in ours]
        fast = getattr(fot, name)(ours[:3], **kwargs)
        ref = getattr(torch.optim, name)(theirs[:3], foreach=False, **kwargs)
        for t in range(25):
            if t == 7:
                fast.add_param_group({"params": [ours[3]], "lr": 0.05})
                ref.add_param_group({"params": [theirs[3]], "lr": 0.05})
            for i, (a, b) in enumerate(zip(ours, theirs)):
                skip = (i == 1 and t % 3 == 0) or (i == 2 and t < 4)
                a.grad = None if skip else torch.randn(5, generator=gen)
                b.grad = None if a.grad is None else a.grad.clone()
            fast.step()
            ref.step()
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
                for n, v in ref.state[b].items():
                    torch.testing.assert_close(fast.state[a][n], v, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- fastoptim.schedules
def at(kwargs: dict[str, Any], t: int) -> dict[str, Any]:
    """`kwargs` with every schedule (also inside ``betas``) replaced by its value at update t."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if callable(v):
            out[k] = v(t)
        elif isinstance(v, tuple):
            out[k] = tuple(x(t) if callable(x) else x for x in v)
        else:
            out[k] = v
    return out


def scheduled_keys(kwargs: dict[str, Any]) -> set[str]:
    return {
        k
        for k, v in kwargs.items()
        if callable(v) or (isinstance(v, tuple) and any(map(callable, v)))
    }


SCHEDULED = [
    (
        "Adam",
        dict(
            lr=schedules.cosine(0.05, 40, end=1e-3),
            betas=(schedules.linear(0.8, 0.95, 30), 0.999),
        ),
    ),
    (
        "AdamW",
        dict(lr=schedules.warmup_cosine(0.02, 8, 50), weight_decay=schedules.exponential(0.1, 0.9)),
    ),
    (  # momentum 0 for 6 updates, then 0.9: the momentum buffer appears mid-run, as in torch
        "SGD",
        dict(
            lr=schedules.step_decay(0.1, 7, 0.5),
            momentum=schedules.piecewise([6], [0.0, 0.9]),
            dampening=0.1,
        ),
    ),
    (
        "NAdam",
        dict(
            lr=schedules.onecycle(0.01, 50),
            betas=(schedules.linear(0.9, 0.8, 50), schedules.cosine(0.999, 50, end=0.99)),
        ),
    ),
    (
        "RMSprop",
        dict(
            lr=schedules.polynomial(0.01, 50, power=2.0),
            alpha=schedules.linear(0.9, 0.99, 25),
            momentum=0.5,
        ),
    ),
]


@every_dtype
@pytest.mark.parametrize(("name", "kwargs"), SCHEDULED, ids=[n for n, _ in SCHEDULED])
def test_schedule_trajectory_matches_torch(
    name: str, kwargs: dict[str, Any], dtype: Any, rng: np.random.Generator
) -> None:
    """Scheduled hyper-parameters (lr, betas, momentum, weight_decay, alpha) against
    torch.optim's for-loop given the same values before every step: ``param_groups`` shows
    f(t) after t steps, and the trajectories agree to rounding, on every layout."""
    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    ours, theirs, gscales, family = make_run(rng, dtype)
    fast = getattr(fot, name)(ours, **kwargs)
    ref = getattr(torch.optim, name)(theirs, foreach=False, **at(kwargs, 0))
    assert set(fast.schedules(0)) == scheduled_keys(kwargs)
    scales = Scales(family)
    masks: list[np.ndarray | None] = [None] * len(ours)
    for t in range(50):
        assert fast.step_count == t
        for k, v in at(kwargs, t).items():
            assert fast.param_groups[0][k] == v, (t, k)  # the value this step uses: f(t)
            ref.param_groups[0][k] = v
        set_grads(rng, gscales, t, ours, theirs)
        fast.step()
        ref.step()
        if t % 10 == 9 or t < 3 or t == 6:
            check_state(f"{name} step {t + 1}", ours, theirs, fast, ref, scales, rtol, masks)


TORCH_SCHEDULERS: dict[str, tuple[Any, Any, bool]] = {
    # torch scheduler, the fastoptim schedule it mirrors, whether the values are bit-identical
    "StepLR": (
        lambda o: torch.optim.lr_scheduler.StepLR(o, 5, 0.5),
        schedules.step_decay(0.01, 5, 0.5),
        True,
    ),
    "CosineAnnealingLR": (  # torch computes it by a recursion: rounding differs
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 20, 1e-4),
        schedules.cosine(0.01, 20, end=1e-4),
        False,
    ),
    "OneCycleLR": (
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, 0.01, total_steps=30, cycle_momentum=False
        ),
        schedules.onecycle(0.01, 30),
        False,
    ),
}


@pytest.mark.parametrize("kind", list(TORCH_SCHEDULERS))
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_schedules_equal_torch_schedulers(name: str, kind: str) -> None:
    """A fastoptim schedule and the torch LR scheduler it mirrors give the same learning rates
    and trajectories."""
    make_scheduler, schedule, exact = TORCH_SCHEDULERS[kind]
    kwargs: dict[str, Any] = dict(momentum=0.9) if name == "SGD" else {}
    theirs = [torch.randn(6, 5, generator=torch.Generator().manual_seed(8)), torch.randn(5)]
    ours = [p.clone() for p in theirs]
    ref = getattr(torch.optim, name)(theirs, lr=0.01, foreach=False, **kwargs)
    scheduler = make_scheduler(ref)
    fast = getattr(fot, name)(ours, lr=schedule, **kwargs)
    gen = torch.Generator().manual_seed(9)
    for _ in range(20):  # torch's cosine rises again after T_max; fastoptim's stays at end
        lr_ours, lr_theirs = fast.param_groups[0]["lr"], ref.param_groups[0]["lr"]
        assert lr_ours == (lr_theirs if exact else pytest.approx(lr_theirs, rel=1e-12, abs=1e-18))
        _grads(gen, theirs, ours)
        ref.step()
        fast.step()
        scheduler.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_cycle_lr_cycles_adam_betas() -> None:
    """torch's OneCycleLR with cycle_momentum drives Adam's beta1 (and lr) on fastoptim.torch
    exactly as on torch.optim."""
    theirs = [torch.randn(7, 3, generator=torch.Generator().manual_seed(10))]
    ours = [theirs[0].clone()]
    opts = [fot.Adam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01, foreach=False)]
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=25, cycle_momentum=True)
        for o in opts
    ]
    gen = torch.Generator().manual_seed(11)
    for _ in range(25):
        g0, g1 = opts[0].param_groups[0], opts[1].param_groups[0]
        assert (g0["lr"], g0["betas"]) == (g1["lr"], g1["betas"])
        _grads(gen, ours, theirs)
        for o in opts:
            o.step()
        for s in scheds:
            s.step()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert opts[0].param_groups[0]["betas"][0] != 0.9  # it did cycle


def test_schedule_assignment_and_groups() -> None:
    """A float assigned to a scheduled entry replaces the schedule; a schedule assigned is
    evaluated at the current step count (not restarted); groups added later get the
    constructor's schedules at the current count; plain callables work."""
    p, q = torch.zeros(4), torch.zeros(2)
    cos = schedules.cosine(0.1, 10)
    opt = fot.SGD([p], lr=cos, momentum=lambda t: 0.5 + 0.01 * t)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.5
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    assert (opt.step_count, opt.param_groups[0]["lr"]) == (3, cos(3))
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.53)
    opt.add_param_group({"params": [q]})
    assert opt.param_groups[1]["lr"] == cos(3)  # the default schedule, at update 3
    opt.param_groups[0]["lr"] = 0.05  # a constant from now on
    lin = schedules.linear(0.2, 0.0, 100)
    opt.param_groups[1]["lr"] = lin  # a new schedule, evaluated at update 3
    p.grad, q.grad = torch.ones(4), torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.05 and "lr" not in opt.schedules(0)
    assert opt.schedules(1)["lr"] == lin and opt.param_groups[1]["lr"] == lin(4)
    assert float(q[0]) == np.float32(-lin(3))  # the step used lin(3)
    # betas: the pair is one entry; assigning a new pair replaces its schedules
    a = fot.Adam([torch.zeros(3)], betas=(schedules.linear(0.8, 0.9, 10), 0.99))
    assert a.param_groups[0]["betas"] == (0.8, 0.99)
    a.param_groups[0]["betas"] = (0.85, 0.995)
    assert a.schedules(0) == {}
    # a torch scheduler's assignments replace a schedule too (use one or the other)
    b = fot.SGD([torch.zeros(3)], lr=cos)
    torch.optim.lr_scheduler.LambdaLR(b, lambda epoch: 0.5)
    assert b.param_groups[0]["lr"] == 0.05 and b.schedules(0) == {}


def test_bad_schedule_values_change_nothing() -> None:
    """A schedule's invalid value (or error) raises at the step that would use it, before any
    tensor changes, naming the schedule; the optimizer stays usable."""
    p, r = torch.ones(3), torch.ones(2)
    opt = fot.SGD([p], lr=schedules.piecewise([2], [0.1, -0.1]), momentum=0.9)
    opt.add_param_group({"params": [r], "lr": 0.1})  # a second, valid group: untouched too
    for _ in range(2):
        p.grad, r.grad = torch.ones(3), torch.ones(2)
        opt.step()
    assert opt.param_groups[0]["lr"] == -0.1  # what the next step would use
    before = [p.clone(), r.clone(), opt.state[p]["momentum_buffer"].clone()]
    with pytest.raises(ValueError, match=r"lr=-0\.1.*update 2.*piecewise"):
        opt.step()
    after = [p, r, opt.state[p]["momentum_buffer"]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert opt.step_count == 2
    opt.param_groups[0]["lr"] = 0.01  # a valid constant instead: steps again
    opt.step()
    assert opt.step_count == 3 and not torch.equal(p, before[0])

    def fails_at_2(t: int) -> float:
        if t >= 2:
            raise RuntimeError("no value")
        return 0.1

    opt = fot.Adam([p], lr=fails_at_2)
    opt.step()
    opt.step()  # writes lr for update 2: the schedule raises, kept for the next step
    before = [p.clone(), opt.state[p]["exp_avg"].clone()]
    with pytest.raises(ValueError, match=r"fails_at_2.*RuntimeError.*update 2"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])
    with pytest.raises(TypeError, match="not a number"):
        fot.Adam([p], lr=lambda t: "0.1")
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        fot.Adam([p], betas=(schedules.constant(1.0), 0.999))
    with pytest.raises(TypeError, match="amsgrad is a flag"):
        fot.Adam([p], amsgrad=lambda t: True)
    with pytest.raises(TypeError, match="initial_accumulator_value"):
        fot.Adagrad([p], initial_accumulator_value=schedules.constant(0.1))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("Adam", dict(lr=schedules.cosine(0.05, 30), betas=(schedules.linear(0.8, 0.9, 20), 0.99))),
        ("SGD", dict(lr=schedules.onecycle(0.1, 30), momentum=schedules.linear(0.95, 0.85, 30))),
        (
            "NAdam",
            dict(
                lr=schedules.join([schedules.constant(0.01), schedules.exponential(0.01, 0.9)], [5])
            ),
        ),
    ],
    ids=["Adam", "SGD", "NAdam"],
)
@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_schedule_resumes_bit_exactly(name: str, kwargs: dict[str, Any], how: str) -> None:
    """Saved mid-schedule (state_dict through torch.save / torch.load(weights_only=True), or a
    copy of the optimizer) and resumed by an optimizer built with other hyper-parameters: the
    same values and parameters, bit for bit, as an uninterrupted run."""
    gen = torch.Generator().manual_seed(12)
    start = [torch.randn(5, 4, generator=gen), torch.randn(4, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(20)]

    def run(opt: Any, params: list[Any], steps: range) -> None:
        for t in steps:
            for p, g in zip(params, grads[t]):
                p.grad = g.clone()
            opt.step()

    straight = [p.clone() for p in start]
    full = getattr(fot, name)(straight, **kwargs)
    run(full, straight, range(20))

    first = [p.clone() for p in start]
    opt = getattr(fot, name)(first, **kwargs)
    run(opt, first, range(8))
    if how == "state_dict":
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        second = [p.detach().clone() for p in first]
        resumed = getattr(fot, name)(second, lr=0.5)  # other hyper-parameters, no schedule
        resumed.load_state_dict(saved)
    else:
        resumed = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
        second = resumed.param_groups[0]["params"]
    assert resumed.step_count == 8
    assert resumed.schedules(0) == opt.schedules(0) and resumed.schedules(0)
    run(resumed, second, range(8, 20))
    assert resumed.step_count == full.step_count == 20
    assert resumed.param_groups[0] == {**full.param_groups[0], "params": second}
    for a, b in zip(second, straight):
        assert torch.equal(a, b)


def test_scheduled_checkpoints_move_to_and_from_torch() -> None:
    """A scheduled checkpoint loads into torch.optim (the next values, as constants; the extra
    entries are kept and ignored), and continues like fastoptim given the same values; a
    torch.optim checkpoint loads into a scheduled optimizer as constants, at its step count,
    and a schedule assigned then continues from there."""
    cos = schedules.cosine(0.05, 20)
    gen = torch.Generator().manual_seed(13)
    ours = [torch.randn(6, generator=gen)]
    fast = fot.Adam(ours, lr=cos, betas=(schedules.linear(0.8, 0.9, 20), 0.999))
    for _ in range(5):
        _grads(gen, ours)
        fast.step()
    buf = io.BytesIO()
    torch.save(fast.state_dict(), buf)
    buf.seek(0)
    theirs = [ours[0].clone()]
    ref = torch.optim.Adam(theirs, foreach=False)
    ref.load_state_dict(torch.load(buf))
    assert ref.param_groups[0]["lr"] == cos(5) == fast.param_groups[0]["lr"]
    for t in range(5, 12):
        ref.param_groups[0]["lr"] = cos(t)
        ref.param_groups[0]["betas"] = fast.param_groups[0]["betas"]
        _grads(gen, ours, theirs)
        fast.step()
        ref.step()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)

    # torch.optim -> fastoptim.torch: constants; step_count from the per-parameter steps
    back = fot.Adam([theirs[0].clone()], lr=cos)
    back.load_state_dict(ref.state_dict())  # torch ran with assigned constants: they win
    assert back.schedules(0) == {} and back.step_count == 12
    assert back.param_groups[0]["lr"] == cos(11)
    back.param_groups[0]["lr"] = cos  # resumed from update 12
    assert back.schedules(0) == {"lr": cos} and back.param_groups[0]["lr"] == cos(12)
    plain = torch.optim.SGD([torch.zeros(2)], lr=0.1, momentum=0.9)
    fast_sgd = fot.SGD([torch.zeros(2)], lr=cos, momentum=0.9)
    fast_sgd.load_state_dict(plain.state_dict())
    assert fast_sgd.param_groups[0]["lr"] == 0.1 and fast_sgd.step_count == 0


def test_plain_callable_schedules_in_checkpoints() -> None:
    """A plain function is saved by name: an optimizer built with the same function loads the
    checkpoint; one without it refuses, changing nothing."""

    def warmup(t: int) -> float:
        return 0.01 * min(1.0, (t + 1) / 5)

    p = torch.zeros(3)
    opt = fot.SGD([p], lr=warmup)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    sd = opt.state_dict()
    name = warmup.__qualname__
    assert sd["param_groups"][0]["schedules"] == {"lr": {"schedule": "callable", "name": name}}
    again = fot.SGD([torch.zeros(3)], lr=warmup)
    again.load_state_dict(sd)
    assert again.schedules(0) == {"lr": warmup} and again.param_groups[0]["lr"] == warmup(3)
    other = fot.SGD([torch.zeros(3)], lr=0.5)
    with pytest.raises(ValueError, match="warmup"):
        other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.5 and other.step_count == 0


def test_fastoptim_reduce_lr_on_plateau() -> None:
    """fastoptim.schedules.ReduceLROnPlateau drives fastoptim.torch like torch's does."""
    opts = [fot.SGD([torch.zeros(2)], lr=0.1), fot.SGD([torch.zeros(2)], lr=0.1)]
    ours = schedules.ReduceLROnPlateau(opts[0], patience=1, factor=0.5)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opts[1], patience=1, factor=0.5)
    for metric in [1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.6, 0.7]:
        ours.step(metric)
        theirs.step(metric)
        assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]
    assert opts[0].param_groups[0]["lr"] < 0.1


# --------------------------------------------------------------------------- state_dict
ROUND_TRIP = [
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.2)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
    ("Adadelta", dict()),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01)),
    ("Adamax", dict(lr=0.01)),
    ("NAdam", dict(lr=0.01)),
    ("RAdam", dict(lr=0.01)),
]


def _two_runs(dtype: Any) -> tuple[list[Any], list[Any]]:
    """The same values, contiguous for one run and transposed for the other."""
    gen = torch.Generator().manual_seed(3)
    values = [
        torch.randn(7, 5, generator=gen, dtype=dtype),
        torch.randn(6, generator=gen, dtype=dtype),
    ]
    contiguous = [v.clone() for v in values]
    transposed = [values[0].t().contiguous().t(), values[1].clone()]
    return contiguous, transposed


def _grads(gen: Any, params: list[Any], *others: list[Any]) -> None:
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for o in others:
            o[i].grad = p.grad.clone()


@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
@pytest.mark.parametrize(("name", "kwargs"), ROUND_TRIP, ids=[n for n, _ in ROUND_TRIP])
def test_state_dict_round_trip(name: str, kwargs: dict[str, Any], direction: str) -> None:
    """Run k steps with one implementation, save (through torch.save), load into the other,
    continue both; the continued runs agree, and the saved states have torch's format."""
    gen = torch.Generator().manual_seed(4)
    a, b = _two_runs(torch.float32)  # a: torch (contiguous); b: ours (transposed)
    first = (
        getattr(torch.optim, name)(a, foreach=False, **kwargs)
        if direction == "torch-to-ours"
        else getattr(fot, name)(b, foreach=False, **kwargs)
    )
    firsts = a if direction == "torch-to-ours" else b
    for _ in range(6):
        _grads(gen, firsts)
        first.step()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    # The second implementation starts from the first's parameters.
    seconds = b if direction == "torch-to-ours" else a
    for x, y in zip(firsts, seconds):
        y.detach().copy_(x.detach())
    second = (
        getattr(fot, name)(seconds, foreach=False, **kwargs)
        if direction == "torch-to-ours"
        else getattr(torch.optim, name)(seconds, foreach=False, **kwargs)
    )
    second.load_state_dict(saved)
    # A reference that never switched: the first implementation continues.
    for _ in range(10):
        _grads(gen, firsts, seconds)
        first.step()
        second.step()
        for x, y in zip(firsts, seconds):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    sa, sb = first.state_dict(), second.state_dict()
    assert _as_torch(sa["param_groups"]) == _as_torch(sb["param_groups"])
    for k, v in sa["state"].items():
        assert set(v) == set(sb["state"][k])
        for n, t in v.items():
            assert t.dtype == sb["state"][k][n].dtype, n
            torch.testing.assert_close(t, sb["state"][k][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "kwargs"), ROUND_TRIP, ids=[n for n, _ in ROUND_TRIP])
def test_state_format_as_torch(name: str, kwargs: dict[str, Any]) -> None:
    """Names, dtypes, shapes and step values of the state, before and after steps."""
    a, b = _two_runs(torch.float32)
    ref = getattr(torch.optim, name)(a, foreach=False, **kwargs)
    fast = getattr(fot, name)(b, foreach=False, **kwargs)
    gen = torch.Generator().manual_seed(5)
    for t in range(3):
        if t:
            _grads(gen, a, b)
            ref.step()
            fast.step()
        sr, sf = ref.state_dict(), fast.state_dict()
        assert sr["param_groups"] == _as_torch(sf["param_groups"])
        assert sr["state"].keys() == sf["state"].keys()
        for k, st in sr["state"].items():
            assert set(st) == set(sf["state"][k])
            for n, v in st.items():
                w = sf["state"][k][n]
                assert (v.dtype, v.shape) == (w.dtype, w.shape), n
                if v.dim() == 0:
                    assert float(v) == pytest.approx(float(w), rel=1e-6), n


@pytest.mark.parametrize("name", ["Lion", "Adam"])
@pytest.mark.parametrize("how", ["load_state_dict", "pickle"])
def test_loading_keeps_the_group_entries(name: str, how: str) -> None:
    """A load or an unpickled copy has the class's group entries: torch's ``__setstate__``
    adds a ``differentiable`` default, which Lion's signature does not have."""
    opt = getattr(fot, name)([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    keys = sorted(opt.param_groups[0])
    if how == "pickle":
        opt = pickle.loads(pickle.dumps(opt))
    else:
        opt.load_state_dict(opt.state_dict())
    assert sorted(opt.param_groups[0]) == keys
    assert ("differentiable" in opt.defaults) == (name == "Adam")


def test_sgd_without_momentum_keeps_no_state() -> None:
    ours, theirs = [torch.ones(3)], [torch.ones(3)]
    fast, ref = fot.SGD(ours, lr=0.1), torch.optim.SGD(theirs, lr=0.1)
    for p in ours + theirs:
        p.grad = torch.ones(3)
    fast.step()
    ref.step()
    assert fast.state_dict()["state"] == ref.state_dict()["state"] == {}
    assert torch.equal(ours[0], theirs[0])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_is_independent(how: str) -> None:
    p = torch.randn(4, requires_grad=True)
    opt = fot.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = clone.param_groups[0]["params"][0]
    assert q is not p
    q.grad = torch.ones(4)
    clone.step()
    assert float(clone.state[q]["step"]) == 2
    assert float(opt.state[p]["step"]) == 1
    assert torch.all(q < p)


# --------------------------------------------------------------------------- gradients
def test_zero_grad_modes_and_reused_gradients() -> None:
    """zero_grad(set_to_none=True/False) as in torch; gradients written in place into the same
    tensors every step (the plan stays bound to them) and gradients that are new tensors every
    step give torch's trajectory."""
    gen = torch.Generator().manual_seed(6)
    ours = [torch.randn(8, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    fast = fot.Adam(ours, lr=0.05)
    ref = torch.optim.Adam(theirs, lr=0.05, foreach=False)
    x = torch.randn(16, 8, generator=gen)
    for t in range(30):
        set_to_none = (t // 5) % 2 == 0  # alternate stretches of both modes
        for opt in (fast, ref):
            opt.zero_grad(set_to_none=set_to_none)
        if t > 0:
            if set_to_none:
                assert all(p.grad is None for p in ours)
            else:
                assert all(p.grad is not None and not p.grad.any() for p in ours)
        for w, b in (ours, theirs):
            ((x @ w + b).tanh() ** 2).sum().backward()
        fast.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_not_kept_alive() -> None:
    """After a step with new gradient tensors, the optimizer holds no reference to them (they
    are freed when torch drops them, as with torch.optim)."""
    p = torch.randn(1000)
    opt = fot.Adam([p])
    refs = []
    for _ in range(3):
        g = torch.randn(1000)
        p.grad = g
        opt.step()
        refs.append(weakref.ref(g))
        p.grad = None
        del g
    gc.collect()
    assert all(r() is None for r in refs)


def test_gradient_reallocated_and_storage_replaced() -> None:
    """p.grad a new tensor (even with another layout) every step; p.data replaced by a new
    tensor (also with a new layout): every update lands in the parameter's current storage."""
    gen = torch.Generator().manual_seed(7)
    ours = [torch.randn(6, 4, generator=gen)]
    theirs = [ours[0].clone()]
    fast = fot.AdamW(ours, lr=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.1, foreach=False)
    for t in range(12):
        if t == 4:  # same shape, new storage
            ours[0].data = ours[0].data.clone()
        if t == 8:  # new storage, transposed layout
            ours[0].data = ours[0].data.t().contiguous().t()
            assert not ours[0].is_contiguous()
        g = torch.randn(6, 4, generator=gen)
        ours[0].grad = g.t().contiguous().t() if t % 3 == 0 else g.clone()
        theirs[0].grad = g.clone()
        fast.step()
        ref.step()
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            fast.state[ours[0]]["exp_avg"], ref.state[theirs[0]]["exp_avg"], rtol=1e-5, atol=1e-6
        )


# --------------------------------------------------------------------------- a real model
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("Adam", dict(lr=1e-2)),
        ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)),
        ("RMSprop", dict(lr=1e-3, centered=True)),
    ],
    ids=["Adam", "SGD", "RMSprop"],
)
def test_mlp_training_reaches_torch_loss(name: str, kwargs: dict[str, Any]) -> None:
    """A 2-layer MLP trained for 5 epochs of minibatches: the same losses as torch.optim."""

    def train(make_opt: Any) -> list[float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
        )
        data = torch.randn(256, 20)
        target = torch.randint(0, 3, (256,))
        opt = make_opt(model.parameters())
        losses = []
        for _epoch in range(5):
            for i in range(0, 256, 32):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(
                    model(data[i : i + 32]), target[i : i + 32]
                )
                loss.backward()
                opt.step()
            with torch.no_grad():
                losses.append(float(torch.nn.functional.cross_entropy(model(data), target)))
        return losses

    ours = train(lambda ps: getattr(fot, name)(ps, **kwargs))
    theirs = train(lambda ps: getattr(torch.optim, name)(ps, **kwargs))
    assert ours[-1] < ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


# --------------------------------------------------------------------------- rejections
def test_unsupported_parameters_rejected() -> None:
    # (bfloat16 and float16 parameters are updated: test_torch_precision.py; complex64 and
    # complex128 ones: test_torch_complex.py)
    for dtype in (torch.float8_e4m3fn, torch.int32, torch.bool):
        with pytest.raises(TypeError, match="dtype"):
            fot.Adam([torch.zeros(3, dtype=dtype)])
    with pytest.raises(TypeError, match="meta"):
        fot.Adam([torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match="not dense"):
        fot.Adam([torch.zeros(4, 6)[:, ::2]])  # gaps
    with pytest.raises(ValueError, match="not dense"):
        fot.Adam([torch.zeros(3, 1).expand(3, 4)])  # overlapping elements
    with pytest.raises(TypeError, match=r"sparse|layout"):
        fot.SGD([torch.zeros(3, 3).to_sparse()])


def test_bad_gradients_change_nothing() -> None:
    """A step that raises (in any group) leaves every parameter and state untouched."""
    a, b = torch.ones(4), torch.ones(3, 3)
    opt = fot.Adam([a], lr=0.1)
    opt.add_param_group({"params": [b]})
    a.grad = torch.ones(4)
    b.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()  # (torch.optim.Adam's RuntimeError)
    assert torch.equal(a, torch.ones(4)) and torch.equal(b, torch.ones(3, 3))
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    b.grad = torch.ones(3, 3)
    b.data = torch.zeros(3, 3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex64"):
        opt.step()  # the parameter's storage changed to a dtype fastoptim cannot update
    assert torch.equal(a, torch.ones(4))


def test_named_parameters_in_messages() -> None:
    model = torch.nn.Linear(3, 2)
    opt = fot.Adam(model.named_parameters())
    model.weight.data = torch.zeros(2, 3, dtype=torch.float8_e4m3fn)
    model.weight.grad = torch.zeros(2, 3, dtype=torch.float8_e4m3fn)
    model.bias.grad = torch.zeros(2)
    with pytest.raises(TypeError, match="'weight'"):
        opt.step()


# --------------------------------------------------------------------------- import, OpenMP
@once_not_per_isa
def test_import_fastoptim_does_not_import_torch() -> None:
    """``import fastoptim`` never imports torch, even when it loads torch's OpenMP runtime
    (found on disk; see test_one_openmp_runtime)."""
    code = (
        "import sys, fastoptim, fastoptim.functional, fastoptim.reference\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(fastoptim._openmp.loaded)\n"
        "import fastoptim.torch\n"
        "assert 'torch' in sys.modules\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=_env()
    ).stdout.strip()
    torch_runtime = _openmp.torch_runtime()
    linux = sys.platform.startswith("linux")
    vendored = (
        torch_runtime is not None and os.path.basename(torch_runtime) != _openmp.own_runtime()
    )
    assert out == str(torch_runtime if linux and vendored else None)


def test_openmp_sharing_is_a_no_op_without_torch_or_off_linux(monkeypatch: Any) -> None:
    monkeypatch.setattr(_openmp, "find_spec", lambda name: None)  # torch not installed
    assert _openmp.torch_runtime() is None and _openmp.share_torch_runtime() is None
    monkeypatch.undo()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _openmp.share_torch_runtime() is None
    monkeypatch.undo()
    monkeypatch.setenv(_openmp.ENV, "0")
    assert _openmp.share_torch_runtime() is None


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != _openmp.ENV}
    env.update(extra)
    return env


OPENMP_CHECK = r"""
import importlib, json, os, struct, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
import torch, fastoptim, fastoptim.torch as fot
from fastoptim import _core


def slots(path, names):
    # ELF64: the offsets of the slots the dynamic linker fills with the addresses of `names`
    # (the .rela.dyn / .rela.plt relocations against them)
    data = open(path, "rb").read()
    assert data[:6] == b"\x7fELF\x02\x01", "not a little-endian ELF64 file"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * size) for i in range(count)]
    found = {}
    for sec in sections:
        if sec[1] != 4:  # SHT_RELA
            continue
        symtab = sections[sec[6]]
        strtab = sections[symtab[6]]
        for at in range(sec[4], sec[4] + sec[5], 24):
            where, info = struct.unpack_from("<QQ", data, at)
            if info >> 32:
                (st_name,) = struct.unpack_from("<I", data, symtab[4] + (info >> 32) * 24)
                start = strtab[4] + st_name
                name = data[start : data.index(b"\0", start)].decode()
                if name in names:
                    found[name] = where
    return found


# Where the extension's OpenMP calls would go: it has none (its threads are its own pool).
names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads", "omp_get_max_threads")
needed = [n for n in names if slots(_core.__file__, names).get(n) is not None]
threads = lambda: len(os.listdir("/proc/self/task"))
torch.set_num_threads(3)
fastoptim.set_num_threads(2)
separate = fastoptim.get_num_threads() == 2 and torch.get_num_threads() == 3
x = torch.randn(1 << 22)
(x * 2).sum()  # a parallel torch op: torch's OpenMP team starts
before = threads()
p = torch.zeros(1 << 22)
p.grad = torch.ones(1 << 22)
opt = fot.SGD([p], lr=0.5)
opt.step()  # a parallel fastoptim step right after it: fastoptim's pool starts (one worker)
first = threads() - before
(x * 2).sum()
opt.step()
assert bool((p == -1.0).all())
print(json.dumps(dict(names=needed, separate=separate, first=first, second=threads() - before)))
"""


@once_not_per_isa
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF, /proc")
@pytest.mark.parametrize(
    ("order", "opt_out"),
    [(["torch", "fastoptim"], False), (["fastoptim", "torch"], False), (["fastoptim"], True)],
    ids=["torch-first", "fastoptim-first", "fastoptim-first-FASTOPT_TORCH_OPENMP=0"],
)
def test_one_openmp_runtime(order: list[str], opt_out: bool) -> None:
    """fastoptim's steps run on its own worker pool, not on an OpenMP runtime: the extension
    binds no OpenMP entry point in either import order, its thread count and torch's are
    separate, and a step right after a parallel torch op is correct and starts only the pool's
    workers (2 threads: one worker), once.  (A pool that must not wait for descheduled threads
    cannot be an OpenMP parallel region; see README, Threads.)"""
    env = _env(**({_openmp.ENV: "0"} if opt_out else {}))
    out = json.loads(
        subprocess.run(
            [sys.executable, "-c", OPENMP_CHECK, *order],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    )
    assert out == {"names": [], "separate": True, "first": 1, "second": 1}, out


def test_nadam_float64_resumes_like_torch() -> None:
    """Issue #12's "float64 NAdam drifts 6.5e-10 from torch after load_state_dict" is torch's
    own behaviour: its load_state_dict casts the float32 ``mu_product`` to the float64
    parameter's dtype, so a resumed torch run leaves the uninterrupted one by ~1e-11 too.
    fastoptim.torch resumed from the same checkpoint follows the resumed torch run to rounding,
    and uninterrupted it follows uninterrupted torch."""

    def run(first_cls: Any, second_cls: Any) -> tuple[Any, Any]:
        a = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        a.requires_grad_()
        b = a.detach().clone().requires_grad_()
        first = first_cls([a], lr=0.01, foreach=False)
        gen = torch.Generator().manual_seed(1)
        grads = [torch.randn(50, dtype=torch.float64, generator=gen) for _ in range(20)]
        for g in grads[:5]:
            a.grad = g.clone()
            first.step()
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        b.data.copy_(a.detach())
        second = second_cls([b], lr=0.01, foreach=False)
        second.load_state_dict(torch.load(buf))
        for g in grads[5:]:
            a.grad, b.grad = g.clone(), g.clone()
            first.step()
            second.step()
        return a.detach(), b.detach()

    torch_uninterrupted, torch_resumed = run(torch.optim.NAdam, torch.optim.NAdam)
    ours_uninterrupted, _ = run(fot.NAdam, fot.NAdam)
    _, ours_resumed = run(torch.optim.NAdam, fot.NAdam)
    torch.testing.assert_close(ours_resumed, torch_resumed, rtol=0, atol=1e-15)
    torch.testing.assert_close(ours_uninterrupted, torch_uninterrupted, rtol=0, atol=1e-15)
    assert (torch_resumed - torch_uninterrupted).abs().max() > 1e-13  # torch's own drift


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_state_and_groups_replaced_from_outside(name: str) -> None:
    """What offload and sharding wrappers do to an optimizer: replace ``state`` with another
    dict (of the same tensors) and ``param_groups`` with new group dicts (a new lr), and hand
    it gradients whose storage is new every step: the run continues exactly as torch.optim's
    under the same treatment (to float32 rounding)."""
    from collections import defaultdict

    def run(mod: Any) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = torch.nn.Linear(5, 3)
        kw = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
        o = getattr(mod, name)(m.parameters(), **kw)
        x = torch.randn(8, 5)
        for t in range(6):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            if t == 2:
                o.state = defaultdict(dict, {p: dict(v) for p, v in o.state.items()})
                o.param_groups = [dict(g) for g in o.param_groups]
                o.param_groups[0]["lr"] = 0.05
            if t >= 4:
                for p in m.parameters():
                    assert p.grad is not None
                    p.grad = p.grad.clone()
            o.step()
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(run(torch.optim), run(fot)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@once_not_per_isa
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # (torch's own)
def test_step_inside_torch_compile_runs_as_it_is() -> None:
    """A step called from a torch.compile'd function is not traced (dynamo went through the
    Python around the kernel: graph breaks with warnings at each Tensor.item(), seconds of
    compilation): its only graph break is the skipped call, and the numbers are eager's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in (False, True):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 16))
        opt = fot.Adam([p], lr=0.1)

        def step(g: Any, p: Any = p, opt: Any = opt) -> None:
            p.grad = g * 2
            opt.step()

        run = torch.compile(step, backend="eager") if compiled else step  # (dynamo: no compiler)
        for i in range(3):
            run(torch.full((16,), float(i + 1)))
        runs.append((p.detach().clone(), opt.state[p]["exp_avg_sq"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    breaks = list(counters["graph_break"])
    assert breaks and all("disable" in reason for reason in breaks), breaks
    torch._dynamo.reset()
