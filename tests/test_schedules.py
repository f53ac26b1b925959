"""fastoptim.schedules: golden values, torch's schedulers, ReduceLROnPlateau, validation, repr.

* Golden values: every schedule at its interesting update numbers (0, each boundary and the
  steps either side of it, after the end) and at every ``t < 40``, against the formula written
  out again here, plainly, in float64 (``rel 1e-12``; exact where the value is exact).
* torch: each schedule against the ``torch.optim.lr_scheduler`` class it claims to be, stepped
  on a dummy SGD optimizer; torch's classes mostly update recursively (``lr *= ratio``), so they
  drift from the closed forms by a few ulps: ``rel 1e-12`` (measured: < 3e-14).
* ReduceLROnPlateau: ours over a plain object with ``param_groups`` and torch's over a torch
  optimizer, fed the same metrics: the same learning rates (exactly) and counters every epoch.
* Validation (messages name the function and the parameter), ``repr`` / ``describe`` /
  ``from_description`` / pickle round trips, equality and hashing.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fastoptim import schedules
from fastoptim.schedules import (
    ReduceLROnPlateau,
    Schedule,
    constant,
    cosine,
    cosine_restarts,
    exponential,
    from_description,
    inverse_time,
    join,
    linear,
    multistep,
    onecycle,
    piecewise,
    polynomial,
    step_decay,
    warmup_cosine,
)

REL = 1e-12
NAMESPACE = {name: getattr(schedules, name) for name in schedules.__all__}
PI = math.pi


def close(want: float) -> Any:
    """``== close(want)``: within REL of `want` (exactly `want` when it is 0)."""
    return pytest.approx(want, rel=REL, abs=0.0)


# --------------------------------------------------------------------------- the formulas
# Written out again, independently of schedules.py, from the definitions and torch's
# documentation.


def cos_between(start: float, end: float, done: float, length: float) -> float:
    """Half a cosine from `start` (done = 0) to `end` (done = length)."""
    return end + (start - end) * (1 + math.cos(PI * done / length)) / 2


def f_step_decay(t: int) -> float:  # step_decay(0.1, 3, 0.5)
    return 0.1 * 0.5 ** (t // 3)


def f_multistep(t: int) -> float:  # multistep(0.1, [2, 5, 5, 9], 0.3): 5 counts twice
    passed = sum(1 for m in [2, 5, 5, 9] if m <= t)
    return 0.1 * 0.3**passed


def f_polynomial(t: int) -> float:  # polynomial(0.1, 10, end=0.01, power=2.0)
    return 0.01 + (0.1 - 0.01) * (1 - min(t, 10) / 10) ** 2


def f_cosine(t: int) -> float:  # cosine(0.1, 10, end=0.001)
    return cos_between(0.1, 0.001, t, 10) if t <= 10 else 0.001


def f_linear(t: int) -> float:  # linear(0.01, 0.1, 8)
    return 0.01 + (0.1 - 0.01) * min(t, 8) / 8


def f_restarts_1(t: int) -> float:  # cosine_restarts(0.1, 3, end=0.001)
    return cos_between(0.1, 0.001, t % 3, 3)


# cosine_restarts(0.1, 3, period_mult=2, end=0.001): periods of 3, 6, 12, 24, 48 updates
RESTARTS_2 = [(0, 3), (3, 6), (9, 12), (21, 24), (45, 48)]


def f_restarts_2(t: int) -> float:
    start, length = next((s, n) for s, n in reversed(RESTARTS_2) if s <= t)
    return cos_between(0.1, 0.001, t - start, length)


def f_onecycle(t: int) -> float:
    # onecycle(0.1, 20): from 0.1/25 up to 0.1 until update 0.3 * 20 - 1 = 5, then down to
    # 0.1/25/1e4 at update 19, and there from then on
    if t <= 5:
        return cos_between(0.1 / 25, 0.1, t, 5)
    return cos_between(0.1, 0.1 / 25 / 1e4, min(t, 19) - 5, 19 - 5)


def f_onecycle_3(t: int) -> float:
    # onecycle(0.2, 20, pct_start=0.25, div_factor=10, final_div_factor=100, three_phase=True):
    # up until 0.25 * 20 - 1 = 4, back down to the initial value at 2 * 5 - 2 = 8, then to the
    # minimum at 19
    initial, low = 0.2 / 10, 0.2 / 10 / 100
    if t <= 4:
        return cos_between(initial, 0.2, t, 4)
    if t <= 8:
        return cos_between(0.2, initial, t - 4, 4)
    return cos_between(initial, low, min(t, 19) - 8, 19 - 8)


def f_warmup_cosine(t: int) -> float:  # warmup_cosine(0.1, 5, 15, init=0.01, end=0.001)
    if t < 5:
        return 0.01 + (0.1 - 0.01) * t / 5
    if t < 15:
        return cos_between(0.1, 0.001, t - 5, 15 - 5)
    return 0.001


def f_piecewise(t: int) -> float:  # piecewise([3, 7], [1.0, 0.5, 0.25])
    return 1.0 if t < 3 else 0.5 if t < 7 else 0.25


def f_join(t: int) -> float:  # join([linear(0.0, 0.1, 4), cosine(0.1, 6), constant(1e-3)], [4, 10])
    if t < 4:
        return 0.1 * t / 4
    if t < 10:
        return cos_between(0.1, 0.0, t - 4, 6)
    return 1e-3


def f_nested(t: int) -> float:
    # join([constant(1.0), join([constant(2.0), exponential(3.0, 0.5)], [2])], [3])
    if t < 3:
        return 1.0
    if t < 3 + 2:
        return 2.0
    return 3.0 * 0.5 ** (t - 5)


NESTED = join([constant(1.0), join([constant(2.0), exponential(3.0, 0.5)], [2])], [3])

# (id, schedule, formula, the update numbers worth a look besides 0..39)
GOLDEN: list[tuple[str, Schedule, Callable[[int], float], list[int]]] = [
    ("constant", constant(0.25), lambda t: 0.25, [0, 1, 10**9]),
    ("step_decay", step_decay(0.1, 3, 0.5), f_step_decay, [0, 2, 3, 4, 5, 6, 9, 300]),
    ("multistep", multistep(0.1, [2, 5, 5, 9], 0.3), f_multistep, [0, 1, 2, 4, 5, 6, 8, 9, 10]),
    ("exponential", exponential(0.2, 0.9), lambda t: 0.2 * 0.9**t, [0, 1, 2, 100, 1000]),
    (
        "inverse_time",
        inverse_time(0.1, 0.5, 10),
        lambda t: 0.1 / (1 + 0.5 * t / 10),
        [0, 1, 9, 10, 11, 20, 10**6],
    ),
    ("polynomial", polynomial(0.1, 10, end=0.01, power=2.0), f_polynomial, [0, 1, 9, 10, 11, 99]),
    (
        "polynomial_linear",
        polynomial(0.1, 10),
        lambda t: 0.1 * (1 - min(t, 10) / 10),
        [0, 5, 9, 10, 11, 1000],
    ),
    ("cosine", cosine(0.1, 10, end=0.001), f_cosine, [0, 1, 5, 9, 10, 11, 1000]),
    ("linear", linear(0.01, 0.1, 8), f_linear, [0, 1, 4, 7, 8, 9, 1000]),
    ("linear_down", linear(0.1, 0.0, 4), lambda t: 0.1 - 0.1 * min(t, 4) / 4, [0, 3, 4, 5]),
    (
        "cosine_restarts",
        cosine_restarts(0.1, 3, end=0.001),
        f_restarts_1,
        [0, 1, 2, 3, 4, 5, 6, 299, 300, 301],
    ),
    (
        "cosine_restarts_mult",
        cosine_restarts(0.1, 3, period_mult=2, end=0.001),
        f_restarts_2,
        [0, 2, 3, 4, 8, 9, 10, 20, 21, 22, 44, 45, 46, 92],
    ),
    ("onecycle", onecycle(0.1, 20), f_onecycle, [0, 1, 4, 5, 6, 18, 19, 20, 10**6]),
    (
        "onecycle_3",
        onecycle(0.2, 20, pct_start=0.25, div_factor=10, final_div_factor=100, three_phase=True),
        f_onecycle_3,
        [0, 3, 4, 5, 7, 8, 9, 18, 19, 20, 1000],
    ),
    (
        "warmup_cosine",
        warmup_cosine(0.1, 5, 15, init=0.01, end=0.001),
        f_warmup_cosine,
        [0, 1, 4, 5, 6, 10, 14, 15, 16, 1000],
    ),
    (
        "warmup_cosine_no_warmup",
        warmup_cosine(0.1, 0, 10),
        lambda t: cos_between(0.1, 0.0, t, 10) if t < 10 else 0.0,
        [0, 1, 5, 9, 10, 11],
    ),
    ("piecewise", piecewise([3, 7], [1.0, 0.5, 0.25]), f_piecewise, [0, 2, 3, 4, 6, 7, 8, 99]),
    (
        "join",
        join([linear(0.0, 0.1, 4), cosine(0.1, 6), constant(1e-3)], [4, 10]),
        f_join,
        [0, 3, 4, 5, 9, 10, 11, 1000],
    ),
    ("join_nested", NESTED, f_nested, [0, 2, 3, 4, 5, 6, 7, 50]),
]
GOLDEN_IDS = [g[0] for g in GOLDEN]
ALL_SCHEDULES = [pytest.param(g[1], id=g[0]) for g in GOLDEN]


@pytest.mark.parametrize(("name", "sched", "formula", "ts"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_values(
    name: str, sched: Schedule, formula: Callable[[int], float], ts: list[int]
) -> None:
    for t in sorted({*ts, *range(40)}):
        got = sched(t)
        assert type(got) is float
        assert got == close(formula(t)), f"{name} at t={t}"


def test_golden_literals() -> None:
    """Values that are exact by construction, written as numbers."""
    assert [step_decay(1.0, 10, 0.5)(t) for t in (0, 9, 10, 19, 20)] == [1, 1, 0.5, 0.5, 0.25]
    assert [multistep(1.0, [2, 4, 4], 0.5)(t) for t in (0, 1, 2, 3, 4, 9)] == [
        1.0,
        1.0,
        0.5,
        0.5,
        0.125,
        0.125,
    ]
    assert [exponential(3.0, 0.5)(t) for t in (0, 1, 2, 3)] == [3.0, 1.5, 0.75, 0.375]
    assert [inverse_time(1.0, 1.0, 2)(t) for t in (0, 2, 6)] == [1.0, 0.5, 0.25]
    assert [polynomial(1.0, 4)(t) for t in (0, 1, 2, 4, 5)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert [polynomial(1.0, 2, power=2.0)(t) for t in (0, 1, 2, 3)] == [1.0, 0.25, 0.0, 0.0]
    assert [polynomial(1.0, 2, end=0.5)(t) for t in (0, 1, 2, 3)] == [1.0, 0.75, 0.5, 0.5]
    assert [cosine(1.0, 10, end=0.5)(t) for t in (0, 10, 11, 10**6)] == [1.0, 0.5, 0.5, 0.5]
    assert cosine(1.0, 10)(5) == close(0.5)
    assert [linear(0.0, 1.0, 4)(t) for t in (0, 1, 2, 4, 5)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert [cosine_restarts(1.0, 4)(t) for t in (0, 4, 8)] == [1.0, 1.0, 1.0]
    assert [cosine_restarts(1.0, 2, period_mult=3)(t) for t in (0, 2, 8, 26)] == [1.0] * 4
    assert cosine_restarts(1.0, 4)(2) == close(0.5)
    assert cosine_restarts(1.0, 2, period_mult=3)(2 + 3) == close(0.5)  # half of the 2nd (6)
    one = onecycle(1.0, 20, div_factor=4.0, final_div_factor=5.0)
    assert [one(0), one(5), one(19), one(20), one(10**6)] == [0.25, 1.0, 0.05, 0.05, 0.05]
    three = onecycle(
        1.0, 20, pct_start=0.25, div_factor=4.0, final_div_factor=5.0, three_phase=True
    )
    assert [three(0), three(4), three(8), three(19), three(20)] == [0.25, 1.0, 0.25, 0.05, 0.05]
    wc = warmup_cosine(1.0, 4, 14, init=0.5, end=0.25)
    assert [wc(0), wc(2), wc(4), wc(14), wc(15)] == [0.5, 0.75, 1.0, 0.25, 0.25]
    assert wc(9) == close(0.625)
    assert [piecewise([], [7.0])(t) for t in (0, 10**9)] == [7.0, 7.0]
    assert [join([constant(1.0)], [])(t) for t in (0, 10**9)] == [1.0, 1.0]


def test_warmup_cosine_is_a_join() -> None:
    """warmup_cosine = linear warm-up joined to a cosine that then stays at its end."""
    wc = warmup_cosine(0.3, 7, 25, init=0.01, end=0.002)
    joined = join([linear(0.01, 0.3, 7), cosine(0.3, 25 - 7, end=0.002)], [7])
    assert [wc(t) for t in range(60)] == [joined(t) for t in range(60)]


def test_large_t() -> None:
    """Far past every boundary: the closed forms neither loop long nor overflow."""
    big = 10**18
    assert cosine_restarts(0.1, 3, period_mult=2)(big) == close(
        cos_between(0.1, 0.0, big - 3 * (2**58 - 1), 3 * 2**58)
    )
    assert cosine_restarts(0.1, 7)(big) == close(cos_between(0.1, 0.0, big % 7, 7))
    assert exponential(0.1, 0.5)(big) == 0.0
    assert onecycle(0.1, 10)(big) == 0.1 / 25 / 1e4
    assert polynomial(0.1, 10, end=0.01)(big) == 0.01


# --------------------------------------------------------------------------- torch's schedulers
def torch_lrs(make: Callable[[Any, Any], Any], base: float, steps: int) -> list[float]:
    """The learning rate torch's scheduler gives update t, for t in range(steps)."""
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = make(torch.optim.lr_scheduler, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # before sched.step(), or torch warns
        sched.step()
    return lrs


# (id, ours, torch scheduler from (lr_scheduler module, optimizer), torch's base lr, updates)
TORCH_PAIRS: list[tuple[str, Schedule, Callable[[Any, Any], Any], float, int]] = [
    ("StepLR", step_decay(0.1, 3, 0.5), lambda L, o: L.StepLR(o, 3, 0.5), 0.1, 20),
    ("StepLR_1", step_decay(0.1, 1, 0.9), lambda L, o: L.StepLR(o, 1, 0.9), 0.1, 30),
    (
        "MultiStepLR_duplicate",
        multistep(0.1, [2, 5, 5, 9], 0.3),
        lambda L, o: L.MultiStepLR(o, [2, 5, 5, 9], 0.3),
        0.1,
        15,
    ),
    (
        "MultiStepLR_at_0",
        multistep(0.1, [0, 3]),
        lambda L, o: L.MultiStepLR(o, [0, 3]),
        0.1,
        6,
    ),
    ("ExponentialLR", exponential(0.1, 0.9), lambda L, o: L.ExponentialLR(o, 0.9), 0.1, 60),
    ("PolynomialLR_1", polynomial(0.1, 10), lambda L, o: L.PolynomialLR(o, 10), 0.1, 16),
    (
        "PolynomialLR_2",
        polynomial(0.1, 10, power=2.0),
        lambda L, o: L.PolynomialLR(o, 10, 2.0),
        0.1,
        16,
    ),
    (
        "PolynomialLR_half",
        polynomial(0.1, 7, power=0.5),
        lambda L, o: L.PolynomialLR(o, 7, 0.5),
        0.1,
        12,
    ),
    # up to total_steps only: torch then goes back up (test_torch_deviations)
    (
        "CosineAnnealingLR",
        cosine(0.1, 10, end=0.001),
        lambda L, o: L.CosineAnnealingLR(o, 10, 0.001),
        0.1,
        11,
    ),
    ("CosineAnnealingLR_100", cosine(0.5, 100), lambda L, o: L.CosineAnnealingLR(o, 100), 0.5, 101),
    ("CosineAnnealingLR_1", cosine(0.5, 1), lambda L, o: L.CosineAnnealingLR(o, 1), 0.5, 2),
    (
        "LinearLR",
        linear(0.1 * 0.25, 0.1, 8),
        lambda L, o: L.LinearLR(o, 0.25, 1.0, 8),
        0.1,
        15,
    ),
    (
        "LinearLR_down",
        linear(0.1, 0.1 * 0.1, 5),
        lambda L, o: L.LinearLR(o, 1.0, 0.1, 5),
        0.1,
        9,
    ),
    (
        "CosineAnnealingWarmRestarts_1",
        cosine_restarts(0.1, 4, end=0.001),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, 4, 1, 0.001),
        0.1,
        30,
    ),
    (
        "CosineAnnealingWarmRestarts_2",
        cosine_restarts(0.1, 3, period_mult=2, end=0.001),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, 3, 2, 0.001),
        0.1,
        50,  # restarts at 3, 9, 21, 45
    ),
    (
        "CosineAnnealingWarmRestarts_3",
        cosine_restarts(0.1, 1, period_mult=3),
        lambda L, o: L.CosineAnnealingWarmRestarts(o, 1, 3),
        0.1,
        45,  # restarts at 1, 4, 13, 40
    ),
    (
        "OneCycleLR",
        onecycle(0.1, 20),
        lambda L, o: L.OneCycleLR(o, 0.1, total_steps=20, cycle_momentum=False),
        0.1,
        20,
    ),
    (
        "OneCycleLR_odd",
        onecycle(0.2, 7, pct_start=0.25, div_factor=3.0, final_div_factor=7.0),
        lambda L, o: L.OneCycleLR(
            o, 0.2, 7, pct_start=0.25, div_factor=3.0, final_div_factor=7.0, cycle_momentum=False
        ),
        0.1,
        7,
    ),
    (
        "OneCycleLR_3",
        onecycle(0.1, 20, three_phase=True),
        lambda L, o: L.OneCycleLR(o, 0.1, 20, three_phase=True, cycle_momentum=False),
        0.1,
        20,
    ),
    (
        "OneCycleLR_3_odd",
        onecycle(0.2, 13, pct_start=0.35, div_factor=3.0, final_div_factor=7.0, three_phase=True),
        lambda L, o: L.OneCycleLR(
            o,
            0.2,
            13,
            pct_start=0.35,
            div_factor=3.0,
            final_div_factor=7.0,
            three_phase=True,
            cycle_momentum=False,
        ),
        0.1,
        13,
    ),
    # torch 2.13's SequentialLR moves to the next scheduler with its closed form at 0
    # (`_update_lr(0)`, no deprecation warning) and steps it recursively from there: join.
    (
        "SequentialLR",
        join([linear(0.01, 0.1, 5), cosine(0.1, 10)], [5]),
        lambda L, o: L.SequentialLR(
            o, [L.LinearLR(o, 0.1, 1.0, 5), L.CosineAnnealingLR(o, 10)], [5]
        ),
        0.1,
        16,  # to the end of the cosine: torch's goes back up after
    ),
    (
        "SequentialLR_3",
        join([constant(0.05), exponential(0.1, 0.9), step_decay(0.1, 2, 0.5)], [3, 7]),
        lambda L, o: L.SequentialLR(
            o, [L.ConstantLR(o, 0.5, 3), L.ExponentialLR(o, 0.9), L.StepLR(o, 2, 0.5)], [3, 7]
        ),
        0.1,
        20,
    ),
    (
        "SequentialLR_warmup_cosine",
        warmup_cosine(0.1, 5, 20, init=0.02, end=0.001),
        lambda L, o: L.SequentialLR(
            o, [L.LinearLR(o, 0.2, 1.0, 5), L.CosineAnnealingLR(o, 15, 0.001)], [5]
        ),
        0.1,
        21,
    ),
]


@pytest.mark.parametrize(
    ("name", "ours", "make", "base", "steps"), TORCH_PAIRS, ids=[p[0] for p in TORCH_PAIRS]
)
def test_against_torch(
    name: str, ours: Schedule, make: Callable[[Any, Any], Any], base: float, steps: int
) -> None:
    want = torch_lrs(make, base, steps)
    assert [ours(t) for t in range(steps)] == pytest.approx(want, rel=REL, abs=0.0)


def test_torch_deviations() -> None:
    """Where we differ from torch on purpose, past the end of a schedule."""
    # CosineAnnealingLR goes on along the cosine, back up; ours stays at the end
    torch_cos = torch_lrs(lambda L, o: L.CosineAnnealingLR(o, 10, 0.001), 0.1, 15)
    assert torch_cos[11] > torch_cos[10] == close(0.001)
    assert [cosine(0.1, 10, end=0.001)(t) for t in range(10, 15)] == [0.001] * 5
    # OneCycleLR raises after total_steps updates; ours keeps its last value
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, 10, cycle_momentum=False)
    for _ in range(10):
        opt.step()
        sched.step()
    opt.step()
    with pytest.raises(ValueError, match="Tried to step"):
        sched.step()
    assert [onecycle(0.1, 10)(t) for t in (9, 10, 11, 100)] == [0.1 / 25 / 1e4] * 4
    # MultiStepLR takes milestones in any order; ours asks for them in order
    assert torch_lrs(lambda L, o: L.MultiStepLR(o, [4, 2]), 1.0, 5) == pytest.approx(
        [multistep(1.0, [2, 4])(t) for t in range(5)], rel=REL
    )
    with pytest.raises(ValueError, match="multistep: milestones must be non-decreasing"):
        multistep(1.0, [4, 2])


# --------------------------------------------------------------------------- ReduceLROnPlateau
class Groups:
    """Just enough of an optimizer: no hooks, so the plateau writes ``group["lr"]`` itself."""

    def __init__(self, *lrs: float) -> None:
        self.param_groups: list[dict[str, Any]] = [{"lr": lr} for lr in lrs]


NOISE = [
    1.0,
    0.9,
    0.95,
    0.9,
    0.89999,
    0.91,
    0.8,
    0.85,
    float("nan"),
    0.8,
    0.79,
    0.81,
    0.8,
    0.8,
    0.7,
    0.75,
    0.76,
    0.77,
    0.7,
    0.71,
]

# (id, keyword arguments, metrics, the two groups' initial lrs, how many epochs reduce lr[0])
PLATEAU_CASES: list[tuple[str, dict[str, Any], list[float], tuple[float, float], int]] = [
    ("improving", {"patience": 2}, [10.0 - e for e in range(12)], (0.1, 0.05), 0),
    # epoch 1 sets best; epochs 2-4 are bad, 3 > patience: reduce at 4, then 7, 10, 13
    ("plateau", {"patience": 2}, [1.0] * 14, (0.1, 0.05), 4),
    ("plateau_patience_0", {"patience": 0, "factor": 0.5}, [1.0] * 6, (0.1, 0.05), 5),
    ("noise", {"patience": 1, "factor": 0.5}, NOISE, (0.1, 0.05), 6),
    # improvements of 1e-5 relative: not enough with the default threshold 1e-4
    ("tiny_improvements", {"patience": 2}, [1.0 - 1e-5 * e for e in range(10)], (0.1, 0.05), 3),
    (
        "max",
        {"mode": "max", "patience": 1},
        [1.0, 2.0, 3.0, 3.0, 3.0, 2.0, 4.0, 4.0, 4.0],
        (1.0, 0.5),
        2,
    ),
    # torch's rel threshold on a negative best: "better" is > best * 1.1, below best, so -2.1
    # after -2.0 improves (and becomes the best); -2.5 and -2.6 do not
    (
        "max_negative",
        {"mode": "max", "patience": 1, "threshold": 0.1},
        [-5.0, -4.0, -3.0, -2.0, -2.1, -2.5, -2.6],
        (0.1, 0.05),
        1,
    ),
    (
        "abs",
        {"threshold_mode": "abs", "threshold": 0.1, "patience": 1},
        [1.0, 0.95, 0.9, 0.85, 0.7, 0.65, 0.62, 0.5],
        (0.1, 0.05),
        2,
    ),
    (
        "abs_max",
        {"mode": "max", "threshold_mode": "abs", "threshold": 0.5, "patience": 0},
        [0.0, 0.4, 1.0, 1.2, 2.0, 2.49],
        (0.1, 0.05),
        3,
    ),
    # after each reduction 2 epochs of cooldown in which bad epochs do not count
    ("cooldown", {"patience": 0, "cooldown": 2, "factor": 0.5}, [1.0] * 12, (0.1, 0.05), 4),
    (
        "cooldown_improving",
        {"patience": 1, "cooldown": 3},
        [5.0, 5.0, 5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0],
        (0.1, 0.05),
        2,
    ),
    # floors: 0.1 -> 0.05 -> 0.025 -> 0.02 (min_lr) and stays; group 1 has its own floor
    (
        "min_lr",
        {"patience": 0, "factor": 0.5, "min_lr": [0.02, 0.001]},
        [1.0] * 10,
        (0.1, 0.05),
        3,
    ),
    ("min_lr_scalar", {"patience": 0, "factor": 0.1, "min_lr": 1e-3}, [1.0] * 6, (0.1, 0.05), 2),
    # eps: 0.1 -> 0.05 changes by 0.05 > eps; 0.05 -> 0.025 by 0.025 < eps: ignored, for good
    ("eps", {"patience": 0, "factor": 0.5, "eps": 0.03}, [1.0] * 6, (0.1, 0.05), 1),
    # a floor 1e-9 below the lr: the change is below the default eps 1e-8
    ("eps_floor", {"patience": 0, "min_lr": 0.1 - 1e-9}, [1.0] * 4, (0.1, 0.05), 0),
    ("factor_0", {"patience": 0, "factor": 0.0}, [1.0] * 4, (0.1, 0.05), 1),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "metrics", "lrs", "reductions"),
    PLATEAU_CASES,
    ids=[c[0] for c in PLATEAU_CASES],
)
def test_plateau_against_torch(
    name: str,
    kwargs: dict[str, Any],
    metrics: list[float],
    lrs: tuple[float, float],
    reductions: int,
) -> None:
    torch = pytest.importorskip("torch")
    groups = Groups(*lrs)
    ours = ReduceLROnPlateau(groups, **kwargs)
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": x} for x in lrs])
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    changed = 0
    for epoch, metric in enumerate(metrics, 1):
        before = groups.param_groups[0]["lr"]
        ours.step(metric)
        theirs.step(metric)
        where = f"{name}, epoch {epoch}"
        assert [g["lr"] for g in groups.param_groups] == [g["lr"] for g in opt.param_groups], where
        assert (ours.best, ours.num_bad_epochs, ours.cooldown_counter, ours.last_epoch) == (
            theirs.best,
            theirs.num_bad_epochs,
            theirs.cooldown_counter,
            theirs.last_epoch,
        ), where
        changed += groups.param_groups[0]["lr"] != before
    assert changed == reductions


def test_plateau_formulas() -> None:
    """The same decisions, written out: patience, factor, floor, cooldown (no torch)."""
    groups = Groups(1.0, 0.5)
    plateau = ReduceLROnPlateau(groups, patience=1, factor=0.5, cooldown=1, min_lr=[0.3, 0.0])
    history = []
    for metric in [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0]:
        plateau.step(metric)
        history.append((plateau.num_bad_epochs, plateau.cooldown_counter, plateau.best))
    assert [g["lr"] for g in groups.param_groups] == [0.3, 0.0625]
    assert history == [
        (0, 0, 3.0),
        (0, 0, 2.0),
        (1, 0, 2.0),
        (0, 1, 2.0),  # 2 bad epochs > patience: 1.0 -> 0.5, 0.5 -> 0.25; cooldown 1
        (0, 0, 2.0),  # in cooldown: not counted
        (1, 0, 2.0),
        (0, 1, 2.0),  # 0.5 -> 0.3 (the floor), 0.25 -> 0.125
        (0, 0, 1.0),  # better (and the cooldown ends)
        (1, 0, 1.0),
        (0, 1, 1.0),  # 0.3 stays (at the floor), 0.125 -> 0.0625
    ]
    assert plateau.last_epoch == 10


class Hooked(Groups):
    """A fastoptim optimizer's side of the plateau: it is attached, and scales lr itself."""

    def __init__(self, *lrs: float) -> None:
        super().__init__(*lrs)
        self.attached: list[Any] = []
        self.scaled: list[tuple[int, float, float]] = []

    def _attach_plateau(self, plateau: Any) -> None:
        self.attached.append(plateau)

    def _scale_lr(self, i: int, factor: float, min_lr: float) -> None:
        self.scaled.append((i, factor, min_lr))


def test_plateau_hooks() -> None:
    opt = Hooked(0.1, 1e-3)
    plateau = ReduceLROnPlateau(opt, patience=0, factor=0.5, min_lr=[0.0, 1e-3])
    assert opt.attached == [plateau]
    plateau.step(1.0)
    plateau.step(1.0)
    # group 1 is at its floor already: no change larger than eps, no call
    assert opt.scaled == [(0, 0.5, 0.0)]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-3]  # the optimizer's business


def test_plateau_state_dict_round_trip() -> None:
    kwargs: dict[str, Any] = {"patience": 2, "factor": 0.5, "cooldown": 1, "min_lr": [0.01, 0.0]}
    metrics = [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.7]
    groups = Groups(0.1, 0.05)
    plateau = ReduceLROnPlateau(groups, **kwargs)
    for m in metrics[:5]:
        plateau.step(m)
    state = plateau.state_dict()
    assert state["last_epoch"] == 5 and state["best"] == 0.9 and state["cooldown_counter"] == 1
    assert json.loads(json.dumps(state)) == state  # JSON-able (best is finite here)
    resumed_groups = Groups(*(g["lr"] for g in groups.param_groups))
    resumed = ReduceLROnPlateau(resumed_groups, **kwargs)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert resumed.state_dict() == state
    for m in metrics[5:]:
        plateau.step(m)
        resumed.step(m)
        assert resumed.state_dict() == plateau.state_dict()
        assert resumed_groups.param_groups == groups.param_groups
    # the state before any epoch: best is infinite
    fresh = ReduceLROnPlateau(Groups(0.1, 0.05), **kwargs)
    resumed.load_state_dict(fresh.state_dict())
    assert resumed.best == math.inf and resumed.last_epoch == 0
    # min_lrs as a tuple (from another serializer) is the same configuration
    resumed.load_state_dict({**state, "min_lrs": (0.01, 0.0)})
    assert resumed.state_dict() == state


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"patience": 3}, "configured differently: patience: 3 != 2"),
        ({"mode": "max"}, "mode: 'max' != 'min'"),
        ({"factor": 0.1}, "factor"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold_mode": "abs"}, "threshold_mode"),
        ({"cooldown": 0}, "cooldown"),
        ({"eps": 0.0}, "eps"),
        ({"min_lrs": [0.0, 0.0]}, "min_lrs"),
        ({"min_lrs": [0.01]}, "min_lrs"),
        ({"min_lrs": 5}, "min_lrs"),
        ({"best": "low"}, "best must be a number"),
        ({"best": None}, "best must be a number"),
        ({"best": float("nan")}, "best must be a number"),
        ({"num_bad_epochs": -1}, "num_bad_epochs must be an int >= 0"),
        ({"cooldown_counter": 1.5}, "cooldown_counter must be an int >= 0"),
        ({"last_epoch": True}, "last_epoch must be an int >= 0"),
    ],
)
def test_plateau_load_mismatch(change: dict[str, Any], match: str) -> None:
    kwargs: dict[str, Any] = {"patience": 2, "factor": 0.5, "cooldown": 1, "min_lr": [0.01, 0.0]}
    plateau = ReduceLROnPlateau(Groups(0.1, 0.05), **kwargs)
    plateau.step(1.0)
    before = plateau.state_dict()
    with pytest.raises(ValueError, match=match):
        plateau.load_state_dict({**before, **change})
    assert plateau.state_dict() == before  # nothing loaded


@pytest.mark.parametrize(
    "state",
    [None, [], {}, {"best": 1.0}],
    ids=["None", "list", "empty", "partial"],
)
def test_plateau_load_not_a_state(state: Any) -> None:
    plateau = ReduceLROnPlateau(Groups(0.1))
    with pytest.raises(ValueError, match="ReduceLROnPlateau: not a plateau state"):
        plateau.load_state_dict(state)
    extra = {**plateau.state_dict(), "extra": 1}
    with pytest.raises(ValueError, match="not a plateau state"):
        plateau.load_state_dict(extra)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mode": "mean"}, ValueError, "ReduceLROnPlateau: mode"),
        ({"threshold_mode": "pct"}, ValueError, "ReduceLROnPlateau: threshold_mode"),
        ({"factor": 1.0}, ValueError, "ReduceLROnPlateau: factor"),
        ({"factor": -0.5}, ValueError, "ReduceLROnPlateau: factor"),
        ({"factor": float("nan")}, ValueError, "ReduceLROnPlateau: factor"),
        ({"factor": True}, TypeError, "ReduceLROnPlateau: factor"),
        ({"patience": -1}, ValueError, "ReduceLROnPlateau: patience"),
        ({"patience": 2.0}, TypeError, "ReduceLROnPlateau: patience"),
        ({"cooldown": -1}, ValueError, "ReduceLROnPlateau: cooldown"),
        ({"threshold": float("inf")}, ValueError, "ReduceLROnPlateau: threshold"),
        ({"eps": "small"}, TypeError, "ReduceLROnPlateau: eps"),
        ({"min_lr": -1e-3}, ValueError, "ReduceLROnPlateau: min_lr"),
        ({"min_lr": [0.0, 0.0, 0.0]}, ValueError, "ReduceLROnPlateau: min_lr has 3 values"),
        ({"min_lr": [0.0, float("nan")]}, ValueError, r"ReduceLROnPlateau: min_lr\[1\]"),
        ({"min_lr": np.array([0.0, 0.0])}, TypeError, "ReduceLROnPlateau: min_lr"),
    ],
)
def test_plateau_validation(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        ReduceLROnPlateau(Groups(0.1, 0.05), **kwargs)


def test_plateau_needs_param_groups() -> None:
    with pytest.raises(TypeError, match="ReduceLROnPlateau: optimizer"):
        ReduceLROnPlateau(object())


def test_plateau_repr() -> None:
    plateau = ReduceLROnPlateau(Groups(0.1), mode="max", patience=3, min_lr=1e-4)
    assert repr(plateau) == (
        "ReduceLROnPlateau(mode='max', factor=0.1, patience=3, threshold=0.0001, "
        "threshold_mode='rel', cooldown=0, eps=1e-08, min_lr=[0.0001])"
    )


# --------------------------------------------------------------------------- validation
NAN, INF = float("nan"), float("inf")
C = constant(1.0)

# (function, positional arguments, keyword arguments, exception, message pattern)
BAD_ARGS: list[tuple[Callable[..., Schedule], tuple[Any, ...], dict[str, Any], type, str]] = [
    (constant, ("0.1",), {}, TypeError, "constant: value must be a number"),
    (constant, (None,), {}, TypeError, "constant: value"),
    (constant, (True,), {}, TypeError, "constant: value"),
    (constant, (NAN,), {}, ValueError, "constant: value must be finite"),
    (constant, (-INF,), {}, ValueError, "constant: value must be finite"),
    (constant, (10**400,), {}, ValueError, "constant: value must be finite"),
    (constant, (np.array([0.1, 0.2]),), {}, TypeError, "constant: value"),
    (step_decay, (0.1, 0), {}, ValueError, "step_decay: step_size must be an int >= 1"),
    (step_decay, (0.1, -2), {}, ValueError, "step_decay: step_size"),
    (step_decay, (0.1, 2.0), {}, TypeError, "step_decay: step_size must be an int"),
    (step_decay, (0.1, True), {}, TypeError, "step_decay: step_size"),
    (step_decay, (INF, 3), {}, ValueError, "step_decay: init"),
    (step_decay, (0.1, 3, NAN), {}, ValueError, "step_decay: gamma"),
    (multistep, (0.1, [5, 3]), {}, ValueError, "multistep: milestones must be non-decreasing"),
    (multistep, (0.1, [-1]), {}, ValueError, r"multistep: milestones\[0\] must be an int >= 0"),
    (multistep, (0.1, [2, 1.5]), {}, TypeError, r"multistep: milestones\[1\] must be an int"),
    (multistep, (0.1, [True]), {}, TypeError, r"multistep: milestones\[0\]"),
    (multistep, (0.1, 5), {}, TypeError, "multistep: milestones must be a list of ints"),
    (multistep, (0.1, "12"), {}, TypeError, "multistep: milestones"),
    (multistep, (0.1, {3, 5}), {}, TypeError, "multistep: milestones"),
    (multistep, (0.1, [3]), {"gamma": INF}, ValueError, "multistep: gamma"),
    (exponential, (0.1, NAN), {}, ValueError, "exponential: gamma"),
    (exponential, (0.1, "0.9"), {}, TypeError, "exponential: gamma"),
    (exponential, (None, 0.9), {}, TypeError, "exponential: init"),
    (inverse_time, (0.1, -0.5), {}, ValueError, "inverse_time: decay_rate must be >= 0"),
    (inverse_time, (0.1, 0.5, 0), {}, ValueError, "inverse_time: decay_steps"),
    (inverse_time, (0.1, 0.5, 2.5), {}, TypeError, "inverse_time: decay_steps"),
    (inverse_time, (NAN, 0.5), {}, ValueError, "inverse_time: init"),
    (polynomial, (0.1, 0), {}, ValueError, "polynomial: total_steps"),
    (polynomial, (0.1, -3), {}, ValueError, "polynomial: total_steps"),
    (polynomial, (0.1, 10.0), {}, TypeError, "polynomial: total_steps"),
    (polynomial, (0.1, 10), {"power": -1.0}, ValueError, "polynomial: power must be >= 0"),
    (polynomial, (0.1, 10), {"power": NAN}, ValueError, "polynomial: power"),
    (polynomial, (0.1, 10), {"end": INF}, ValueError, "polynomial: end"),
    (cosine, (0.1, 0), {}, ValueError, "cosine: total_steps must be an int >= 1"),
    (cosine, (0.1, 10.0), {}, TypeError, "cosine: total_steps must be an int"),
    (cosine, (0.1, False), {}, TypeError, "cosine: total_steps"),
    (cosine, (0.1, "10"), {}, TypeError, "cosine: total_steps"),
    (cosine, (NAN, 10), {}, ValueError, "cosine: init"),
    (cosine, (0.1, 10), {"end": -INF}, ValueError, "cosine: end"),
    (linear, (0.0, 1.0, 0), {}, ValueError, "linear: total_steps"),
    (linear, ("0", 1.0, 5), {}, TypeError, "linear: start"),
    (linear, (0.0, NAN, 5), {}, ValueError, "linear: end"),
    (cosine_restarts, (0.1, 0), {}, ValueError, "cosine_restarts: period must be an int >= 1"),
    (cosine_restarts, (0.1, 5, 0), {}, ValueError, "cosine_restarts: period_mult"),
    (cosine_restarts, (0.1, 5, 1.5), {}, TypeError, "cosine_restarts: period_mult"),
    (cosine_restarts, (0.1, 5), {"end": NAN}, ValueError, "cosine_restarts: end"),
    (onecycle, (0.1, 0), {}, ValueError, "onecycle: total_steps"),
    (onecycle, (0.1, 10.0), {}, TypeError, "onecycle: total_steps"),
    (onecycle, (NAN, 10), {}, ValueError, "onecycle: max_lr"),
    (onecycle, (0.1, 10), {"pct_start": 1.5}, ValueError, r"onecycle: pct_start must be in \[0"),
    (onecycle, (0.1, 10), {"pct_start": -0.1}, ValueError, "onecycle: pct_start"),
    (onecycle, (0.1, 10), {"pct_start": NAN}, ValueError, "onecycle: pct_start"),
    (onecycle, (0.1, 10), {"div_factor": 0.0}, ValueError, "onecycle: div_factor must be > 0"),
    (onecycle, (0.1, 10), {"final_div_factor": -1.0}, ValueError, "onecycle: final_div_factor"),
    (onecycle, (0.1, 10), {"three_phase": 1}, TypeError, "onecycle: three_phase must be a bool"),
    (warmup_cosine, (0.1, 11, 10), {}, ValueError, r"warmup_cosine: warmup_steps \(11\) must be"),
    (warmup_cosine, (0.1, -1, 10), {}, ValueError, "warmup_cosine: warmup_steps"),
    (warmup_cosine, (0.1, 2.0, 10), {}, TypeError, "warmup_cosine: warmup_steps"),
    (warmup_cosine, (0.1, 0, 0), {}, ValueError, "warmup_cosine: total_steps"),
    (warmup_cosine, (INF, 2, 10), {}, ValueError, "warmup_cosine: peak"),
    (warmup_cosine, (0.1, 2, 10), {"init": NAN}, ValueError, "warmup_cosine: init"),
    (warmup_cosine, (0.1, 2, 10), {"end": "0"}, TypeError, "warmup_cosine: end"),
    (piecewise, ([3, 3], [1, 2, 3]), {}, ValueError, "piecewise: boundaries must be strictly"),
    (piecewise, ([5, 3], [1, 2, 3]), {}, ValueError, "piecewise: boundaries must be strictly"),
    (piecewise, ([0], [1, 2]), {}, ValueError, r"piecewise: boundaries\[0\] must be an int >= 1"),
    (piecewise, ([2.5], [1, 2]), {}, TypeError, r"piecewise: boundaries\[0\]"),
    (piecewise, (3, [1.0, 2.0]), {}, TypeError, "piecewise: boundaries must be a list of ints"),
    (piecewise, ([3], [1.0]), {}, ValueError, r"piecewise: needs len\(values\)"),
    (piecewise, ([3], [1.0, 2.0, 3.0]), {}, ValueError, r"piecewise: needs len\(values\)"),
    (piecewise, ([3], "ab"), {}, TypeError, "piecewise: values must be a list of numbers"),
    (piecewise, ([3], 1.0), {}, TypeError, "piecewise: values"),
    (piecewise, ([3], [1.0, NAN]), {}, ValueError, r"piecewise: values\[1\] must be finite"),
    (join, ([C, 0.5], [3]), {}, TypeError, r"join: schedules\[1\] must be a fastoptim schedule"),
    (join, ([lambda t: 0.1], []), {}, TypeError, r"join: schedules\[0\]"),
    (join, (C, []), {}, TypeError, "join: schedules must be a list of schedules"),
    (join, ([C], [3]), {}, ValueError, r"join: needs len\(schedules\)"),
    (join, ([C, C, C], [3]), {}, ValueError, r"join: needs len\(schedules\)"),
    (join, ([C, C], [0]), {}, ValueError, r"join: boundaries\[0\] must be an int >= 1"),
    (join, ([C, C, C], [5, 5]), {}, ValueError, "join: boundaries must be strictly increasing"),
    (join, ([C, C], 5), {}, TypeError, "join: boundaries must be a list of ints"),
]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "exc", "match"),
    BAD_ARGS,
    ids=[f"{b[0].__name__}-{i}" for i, b in enumerate(BAD_ARGS)],
)
def test_bad_arguments(
    fn: Callable[..., Schedule],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: type,
    match: str,
) -> None:
    with pytest.raises(exc, match=f"^{match}"):
        fn(*args, **kwargs)


@pytest.mark.parametrize("sched", ALL_SCHEDULES)
@pytest.mark.parametrize(
    ("t", "exc", "match"),
    [
        (-1, ValueError, "t must be >= 0, got -1"),
        (1.0, TypeError, "t must be an int >= 0, got 1.0"),
        (True, TypeError, "t must be an int >= 0, got True"),
        (np.float64(2.0), TypeError, "t must be an int"),
        (np.bool_(True), TypeError, "t must be an int"),
        ("3", TypeError, "t must be an int"),
        (None, TypeError, "t must be an int"),
        (np.int64(-1), ValueError, "t must be >= 0"),
    ],
    ids=["negative", "float", "bool", "np.float64", "np.bool_", "str", "None", "np.int64<0"],
)
def test_bad_t(sched: Schedule, t: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=r"^" + sched.name + r"\(.*\): " + match):
        sched(t)


@pytest.mark.parametrize("sched", ALL_SCHEDULES)
def test_numpy_t(sched: Schedule) -> None:
    for t in (0, 4, 11):
        want = sched(t)
        for kind in (np.int64, np.int32, np.uint8, np.intp):
            t_np: Any = kind(t)
            got = sched(t_np)
            assert type(got) is float and got == want


def test_numpy_arguments() -> None:
    """numpy scalars and arrays are taken as the plain values they hold."""
    ten: Any = np.int64(10)
    a = cosine(np.float64(0.1), ten, end=np.float64(0.0))
    assert a == cosine(0.1, 10)
    assert type(a.args["total_steps"]) is int
    milestones: Any = np.array([2, 5])
    assert multistep(0.1, milestones) == multistep(0.1, [2, 5])
    assert multistep(0.1, (2, 5)) == multistep(0.1, range(2, 6, 3)) == multistep(0.1, [2, 5])
    boundaries: Any = np.array([3, 7])
    values: Any = np.array([1.0, 0.5, 0.25])
    p = piecewise(boundaries, values)
    assert p == piecewise([3, 7], [1.0, 0.5, 0.25])
    assert json.loads(json.dumps(p.describe())) == p.describe()
    assert join((C, C), (4,)) == join([C, C], [4])


# --------------------------------------------------------------------------- repr, descriptions
def test_repr_literal() -> None:
    assert repr(cosine(0.1, 100)) == "cosine(init=0.1, total_steps=100, end=0.0)"
    assert repr(multistep(1, [30, 80])) == "multistep(init=1.0, milestones=[30, 80], gamma=0.1)"
    assert repr(join([constant(0.5), exponential(1.0, 0.9)], [3])) == (
        "join(schedules=[constant(value=0.5), exponential(init=1.0, gamma=0.9)], boundaries=[3])"
    )


@pytest.mark.parametrize("sched", ALL_SCHEDULES)
def test_repr_rebuilds(sched: Schedule) -> None:
    again = eval(repr(sched), dict(NAMESPACE))
    assert again == sched and hash(again) == hash(sched)
    assert repr(again) == repr(sched)
    assert [again(t) for t in range(30)] == [sched(t) for t in range(30)]


@pytest.mark.parametrize("sched", ALL_SCHEDULES)
def test_description_round_trips(sched: Schedule) -> None:
    described = sched.describe()
    assert described["schedule"] == sched.name
    text = json.dumps(described)  # JSON-able
    for again in (
        from_description(described),
        from_description(json.loads(text)),
        pickle.loads(pickle.dumps(sched)),
        copy.deepcopy(sched),
        copy.copy(sched),
    ):
        assert type(again) is Schedule
        assert again == sched and hash(again) == hash(sched) and repr(again) == repr(sched)
        assert again.describe() == described
        assert [again(t) for t in range(30)] == [sched(t) for t in range(30)]


def test_nested_join_description() -> None:
    described = NESTED.describe()
    assert described == {
        "schedule": "join",
        "args": {
            "schedules": [
                {"schedule": "constant", "args": {"value": 1.0}},
                {
                    "schedule": "join",
                    "args": {
                        "schedules": [
                            {"schedule": "constant", "args": {"value": 2.0}},
                            {"schedule": "exponential", "args": {"init": 3.0, "gamma": 0.5}},
                        ],
                        "boundaries": [2],
                    },
                },
            ],
            "boundaries": [3],
        },
    }
    assert from_description(json.loads(json.dumps(described))) == NESTED


COSINE: dict[str, Any] = {"schedule": "cosine", "args": {"init": 0.1, "total_steps": 10}}
MALFORMED: list[tuple[str, Any]] = [
    ("None", None),
    ("list", [COSINE]),
    ("string", "cosine(0.1, 10)"),
    ("no_args", {"schedule": "cosine"}),
    ("extra_key", {**COSINE, "version": 1}),
    ("unknown_schedule", {"schedule": "triangle", "args": {}}),
    ("name_not_str", {"schedule": 5, "args": {}}),
    ("args_not_mapping", {"schedule": "cosine", "args": [0.1, 10]}),
    ("missing_arg", {"schedule": "cosine", "args": {"init": 0.1}}),
    ("unknown_arg", {"schedule": "cosine", "args": {**COSINE["args"], "warmup": 3}}),
    ("bad_type", {"schedule": "cosine", "args": {"init": "0.1", "total_steps": 10}}),
    ("bad_value", {"schedule": "cosine", "args": {"init": 0.1, "total_steps": 0}}),
    ("huge_int", {"schedule": "constant", "args": {"value": 10**400}}),
    ("schedule_object", {"schedule": "join", "args": {"schedules": [C], "boundaries": []}}),
    ("join_schedules_int", {"schedule": "join", "args": {"schedules": 5, "boundaries": []}}),
    ("join_schedules_none", {"schedule": "join", "args": {"schedules": None, "boundaries": []}}),
    ("join_schedules_str", {"schedule": "join", "args": {"schedules": "ab", "boundaries": []}}),
    ("join_schedules_dict", {"schedule": "join", "args": {"schedules": COSINE, "boundaries": []}}),
    ("join_no_schedules", {"schedule": "join", "args": {"boundaries": []}}),
    ("join_inner_bad", {"schedule": "join", "args": {"schedules": [{}], "boundaries": []}}),
    ("join_lengths", {"schedule": "join", "args": {"schedules": [COSINE], "boundaries": [3]}}),
    ("join_boundaries_int", {"schedule": "join", "args": {"schedules": [COSINE], "boundaries": 3}}),
]


@pytest.mark.parametrize("description", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_descriptions(description: Any) -> None:
    with pytest.raises(ValueError):
        from_description(description)


def test_equality_and_hash() -> None:
    assert cosine(0.1, 100) == cosine(0.1, 100, end=0.0) == cosine(0.1, total_steps=100)
    assert constant(1) == constant(1.0) and hash(constant(1)) == hash(constant(1.0))
    assert cosine(0.1, 100) != cosine(0.1, 101)
    assert cosine(0.1, 100) != cosine(0.2, 100)
    assert linear(0.1, 0.0, 10) != polynomial(0.1, 10)  # the same values, not the same function
    assert constant(0.1) != 0.1 and constant(0.1) != "constant(value=0.1)"
    assert len({cosine(0.1, 100), cosine(0.1, 100), constant(0.1), constant(0.1)}) == 2
    assert {NESTED: 1}[copy.deepcopy(NESTED)] == 1
    # equal arguments are equal schedules, hashed alike, even where their reprs differ
    a, b = cosine(0.1, 10, end=-0.0), cosine(0.1, 10, end=0.0)
    assert a == b and hash(a) == hash(b)


def test_args_cannot_change_the_schedule() -> None:
    sched = multistep(0.1, [2, 5])
    before = (hash(sched), repr(sched), [sched(t) for t in range(8)])
    sched.args["milestones"].append(1)
    sched.args["init"] = 5.0
    assert sched.args == {"init": 0.1, "milestones": [2, 5], "gamma": 0.1}
    assert (hash(sched), repr(sched), [sched(t) for t in range(8)]) == before
    with pytest.raises(AttributeError):
        sched.name = "cosine"  # type: ignore[misc]


def test_module_exports() -> None:
    made = {g[1].name for g in GOLDEN}
    assert made == set(schedules.__all__) - {"Schedule", "from_description", "ReduceLROnPlateau"}
