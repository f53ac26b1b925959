"""The compiled kernels against the plain-NumPy reference (:mod:`fastoptim.reference`).

The shared table of cases (``cases.CASES``, optax style): every optimizer x its meaningful
option sets, each run for its ``Case.steps`` steps in float32 and float64 with every available
instruction set, on one parameter group holding every size that matters to the SIMD driver
(0-d, empty, 1 ... 70000: below, at and just past the vector widths, odd tails, and more than
one thread's grain).  The reference always runs in float64 on exact copies; parameters and
every state array are compared elementwise after every step.

Gradients: N(0, 1) with about 10% exact zeros (the same elements at every step), and every
size but the largest again with 1e-7-scale gradients (a second "family" of tensors in the same
group), so that eps conventions (Adam's eps after the bias correction, RMSprop's and Adagrad's
eps outside the sqrt, Adamax's |g| + eps) decide the result.  The learning rate changes halfway.

Tolerance, as ``np.testing.assert_allclose`` would put it: ``rtol = K * eps(dtype)`` and
``atol = K * eps(dtype) * M``, where M is the largest |reference value| that kind of array
(parameters, or one state) has reached so far in the same gradient family.  Rounding errors are
absolute at the scale of the operands, which M bounds, and the tiny family has its own M, so
its 1e-7..1e-14 states are judged at their own scale.  ``K`` was measured (see ``RTOL_ULPS``):
every ISA agrees with the reference within a few ulps; a wrong formula is off by orders of
magnitude more (every mutation tried, from eps placement to a 1e-5 relative error in one
coefficient, fails in float64, and all but the 1e-6-relative ones fail in float32 too).

Lion is the one honest exception: ``sign(beta1 * m + (1 - beta1) * g)`` is discontinuous, so
where that argument is within rounding of 0 float32 and float64 may legitimately pick different
signs.  Those elements are found from the reference state before each step, must be rare, and
their parameters are only checked to be within the learning rate of the reference per such
step; their momentum (which does not depend on the sign) is still checked everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastoptim
from cases import (
    CASES,
    Case,
    Scales,
    check_close,
    check_close_nonfinite,
    each_case,
    every_dtype,
    make_families,
    make_grads,
    make_problem,
    one_per_optimizer,
)
from fastoptim import _core, reference

# ----------------------------------------------------------------------------- the problem
SHAPES: list[tuple[int, ...]] = [
    (),  # 0-d
    (0,),  # empty
    (1,),
    (3,),
    (7,),
    (8,),
    (9,),
    (3, 5),  # 15
    (16,),
    (17,),
    (31,),
    (32,),
    (33,),
    (63,),
    (64,),
    (65,),
    (127,),
    (129,),
    (4099,),
    (70, 1000),  # 70000: more than one thread's grain
]
TINY_SHAPES = SHAPES[:-1]  # the same again with 1e-7-scale gradients

# Allowed error in units of the dtype's epsilon: rtol = K * eps and atol = K * eps * (largest
# |reference value| the array kind has reached so far in its gradient family).  Measured over
# the whole table, every ISA and 16 other seeds: K needed <= 2.7 in float32 and <= 2.5 in
# float64 (largest for Adadelta's acc_delta; fused multiply-adds and operation order vs the
# reference, accumulated over the steps).  8 leaves 3x headroom; a wrong formula is off by
# >= 1e-5 relative (>= 80 eps in float32).
RTOL_ULPS = 8


# ----------------------------------------------------------------------------- helpers
def lion_ambiguous(
    opt: reference.Lion, grads: list[np.ndarray], tol: list[float]
) -> list[np.ndarray]:
    """Elements where Lion's sign argument ``beta1 * m + (1 - beta1) * g`` is within `tol[i]`
    of zero in the reference state, i.e. where a lower-precision run may legitimately take a
    different sign this step.  Exact zeros (m = g = 0) are not ambiguous: sign(0) = 0 must
    hold exactly."""
    group = opt.param_groups[0]
    b1 = group["betas"][0]
    out = []
    for i, g in enumerate(grads):
        m = opt.state[i]["exp_avg"]
        g = -g if group["maximize"] else g
        c = b1 * m + (1 - b1) * g
        out.append((np.abs(c) <= tol[i]) & ((m != 0) | (g != 0)))
    return out


# ----------------------------------------------------------------------------- the table test
@every_dtype
@each_case(CASES)
def test_matches_reference(case: Case, dtype: Any, isa: str, rng: np.random.Generator) -> None:
    eps = float(np.finfo(dtype).eps)
    rtol = RTOL_ULPS * eps
    # One group: every size with unit-scale gradients, and again (but 70000) with tiny ones.
    p0, gscales, family = make_families(rng, SHAPES, TINY_SHAPES)
    fast_params = [p.astype(dtype) for p in p0]
    ref_params = [p.copy() for p in p0]
    fast = getattr(fastoptim, case.opt)(fast_params, **case.kwargs)
    ref = getattr(reference, case.opt)(ref_params, **case.kwargs)
    lr = fast.param_groups[0]["lr"]
    lion = case.opt == "Lion"
    names = sorted(ref.state[0].keys() - {"step"})
    # Largest |reference value| reached so far, per family and per array kind: rounding errors
    # are absolute at the scale of the operands, which that bounds (see the module docstring).
    scales = Scales(family)
    for i, p in enumerate(p0):
        scales.update(i, "param", p)
    ambiguous = [np.zeros(p.shape, dtype=np.int64) for p in p0]  # Lion: steps where unsure

    for t in range(1, case.steps + 1):
        if t == case.steps // 2 + 1:  # a learning-rate change mid-run
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = lr * case.new_lr_factor
        grads = make_grads(rng, gscales)
        if lion:
            for i, g in enumerate(grads):
                scales.update(i, "grad", g)
            tol = [
                rtol * (scales.get(i, "exp_avg") + scales.get(i, "grad")) for i in range(len(p0))
            ]
            for a, amb in zip(ambiguous, lion_ambiguous(ref, grads, tol)):
                a += amb
        fast.step([g.astype(dtype) for g in grads])
        ref.step(grads)

        assert sorted(fast.state[0].keys() - {"step"}) == names
        for i in range(len(p0)):
            for n in names:
                scales.update(i, n, ref.state[i][n])
            scales.update(i, "param", ref_params[i])
        for i, p in enumerate(p0):
            where = f"{case.opt} step {t} shape {p.shape} family {family[i]}"
            assert fast.state[i]["step"] == ref.state[i]["step"] == t
            for n in names:
                atol = rtol * scales(i, n)
                check_close(f"{where} state {n!r}", fast.state[i][n], ref.state[i][n], rtol, atol)
            atol = rtol * scales(i, "param")
            if lion:
                # A sign that legitimately differs moves the parameter by at most 2 lr per step
                # (plus weight decay of the difference, a factor < 1).
                amb = ambiguous[i] > 0
                check_close(f"{where} param", fast_params[i], ref_params[i], rtol, atol, amb)
                diff = np.abs(fast_params[i].astype(np.float64) - ref_params[i])
                assert np.all(diff[amb] <= 2 * lr * ambiguous[i][amb] + atol)
            else:
                check_close(f"{where} param", fast_params[i], ref_params[i], rtol, atol)
    if lion:
        total = sum(int(a.sum()) for a in ambiguous)
        elements = sum(p.size for p in p0)
        # A few in 1e5 in float32 here; "rare" must stay rare.
        assert total <= max(4, elements * case.steps * 1e-3), total


# ----------------------------------------------------------------------------- invariances
# One option set per optimizer, the one exercising the most state buffers: these, and for every
# other optimizer its richest case of the shared table.
RICH = [
    pytest.param(c, id=c.opt)
    for c in one_per_optimizer(
        [
            Case("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
            Case("Adagrad", dict(lr=0.1, lr_decay=0.1, weight_decay=0.01)),
            Case("RMSprop", dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.01)),
            Case("Adadelta", dict(weight_decay=0.01)),
            Case("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
            Case("AdamW", dict(lr=0.01)),
            Case("Adamax", dict(lr=0.01, weight_decay=0.01)),
            Case("NAdam", dict(lr=0.01, weight_decay=0.01)),
            Case("RAdam", dict(lr=0.01, weight_decay=0.01), steps=7),
            Case("Lion", dict(lr=1e-3, weight_decay=0.1)),
        ]
    )
]


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float array: equality of these is bit-identity (-0.0, NaN payloads)."""
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def assert_same_bits(
    where: str, params: list[np.ndarray], opt: Any, want_params: list[np.ndarray], want: Any
) -> None:
    """`params` and every state array of `opt` bit-identical to `want_params` and `want`'s."""
    assert len(params) == len(want_params), where
    for i, (p, q) in enumerate(zip(params, want_params)):
        assert np.array_equal(bits(p), bits(q)), f"{where}: param {i} differs"
        for name, value in opt.state[i].items():
            if name != "step":
                same = np.array_equal(bits(value), bits(want.state[i][name]))
                assert same, f"{where}: {name} {i} differs"


def run(case: Case, params: list[np.ndarray], grads: list[list[np.ndarray]]) -> Any:
    opt = getattr(fastoptim, case.opt)(params, **case.kwargs)
    for g in grads:
        opt.step(g)
    return opt


@every_dtype
@pytest.mark.parametrize("case", RICH)
def test_bit_identical_across_thread_counts(
    case: Case, dtype: Any, isa: str, rng: np.random.Generator
) -> None:
    shapes = [(300_000,), (70_001,), (17,), (3, 4099), ()]
    assert 300_000 * 4 * 3 > 2 * _core.get_grain()  # the parallel path really runs (bytes)
    p0, gscales = make_problem(rng, shapes)
    grads = [[g.astype(dtype) for g in make_grads(rng, gscales)] for _ in range(case.steps)]
    before = fastoptim.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            fastoptim.set_num_threads(threads)
            params = [p.astype(dtype) for p in p0]
            results.append((params, run(case, params, grads)))
    finally:
        fastoptim.set_num_threads(before)
    (p1, o1), (p2, o2) = results
    assert len(p1) == len(shapes)
    assert_same_bits("1 vs 2 threads", p1, o1, p2, o2)


@every_dtype
@pytest.mark.parametrize("case", RICH)
def test_bit_identical_whatever_the_offset(
    case: Case, dtype: Any, isa: str, rng: np.random.Generator
) -> None:
    n = 1000  # several vectors plus a tail for every offset
    p0, gscales = make_problem(rng, [(n,)])
    grads = [make_grads(rng, gscales)[0].astype(dtype) for _ in range(3)]
    expected = p0[0].astype(dtype)
    want = run(case, [expected], [[g] for g in grads])
    for k in range(17):
        base = np.zeros(n + 40, dtype)
        param = base[k : k + n]  # offset by k elements from the allocation
        param[...] = p0[0]
        gbase = np.zeros((len(grads), n + 40), dtype)
        j = (3 * k + 1) % 17  # the gradient at another offset
        gshifted = [gbase[s, j : j + n] for s in range(len(grads))]
        for dst, src in zip(gshifted, grads):
            dst[...] = src
        got = run(case, [param], [[g] for g in gshifted])
        assert_same_bits(f"offset {k}", [param], got, [expected], want)


# With L2 weight decay (wd != 0) a non-finite parameter legitimately poisons the gradient
# (g + wd * p) in torch too; without it see test_nonfinite_param_stays_out_of_the_gradient.
WITH_L2 = [c for c in RICH if c.id != "AdamW"]


@every_dtype
@pytest.mark.parametrize("case", WITH_L2)
def test_nonfinite_gradients_like_reference(
    case: Case, dtype: Any, isa: str, rng: np.random.Generator
) -> None:
    """NaN and +-Inf in a gradient end up exactly where the reference puts them (NaN, +Inf or
    -Inf alike), and leave the other elements as the reference computes them."""
    n = 67
    p0, gscales = make_problem(rng, [(n,)])
    fast_param, ref_param = p0[0].astype(dtype), p0[0].copy()
    fast = getattr(fastoptim, case.opt)([fast_param], **case.kwargs)
    ref = getattr(reference, case.opt)([ref_param], **case.kwargs)
    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    for t in range(3):
        g = make_grads(rng, gscales)[0]
        g[[3 + t, 40]] = np.nan
        g[[10 + t, 50]] = np.inf
        g[[20 + t, 60]] = -np.inf
        fast.step([g.astype(dtype)])
        with np.errstate(all="ignore"):  # inf - inf and friends are the point here
            ref.step([g])
        pairs = [("param", fast_param, ref_param)] + [
            (k, v, ref.state[0][k]) for k, v in fast.state[0].items() if k != "step"
        ]
        for name, got, want in pairs:
            big = float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0))
            check_close_nonfinite(f"{case.opt} step {t + 1} {name}", got, want, rtol, rtol * big)


NO_L2 = one_per_optimizer(
    [
        Case("SGD", dict(lr=0.1, momentum=0.9)),
        Case("Adagrad", dict(lr=0.1)),
        Case("RMSprop", dict(lr=0.01, momentum=0.9)),
        Case("Adadelta", dict()),
        Case("Adam", dict(lr=0.01)),
        Case("AdamW", dict(lr=0.01)),
        Case("Adamax", dict(lr=0.01)),
        Case("NAdam", dict(lr=0.01)),
        Case("RAdam", dict(lr=0.01)),
        Case("Lion", dict(lr=1e-3, weight_decay=0.1)),
    ]
)


@pytest.mark.parametrize("case", NO_L2, ids=lambda c: c.opt)
def test_nonfinite_param_stays_out_of_the_gradient(case: Case) -> None:
    """Without L2 weight decay the gradient does not involve the parameter (torch adds
    weight_decay * p only when weight_decay != 0): after an infinite gradient has made a
    parameter non-finite, finite gradients keep the state as torch and the reference have it
    (e.g. Adam's exp_avg_sq stays +inf rather than becoming NaN)."""
    params = [np.array([0.5, 0.5]), np.array([0.5, 0.5])]
    fast = getattr(fastoptim, case.opt)([params[0]], **case.kwargs)
    ref = getattr(reference, case.opt)([params[1]], **case.kwargs)
    for g in (np.array([np.inf, 1.0]), np.array([1.0, 1.0]), np.array([1.0, 1.0])):
        fast.step([g])
        with np.errstate(all="ignore"):
            ref.step([g])
    pairs = [(n, v, ref.state[0][n]) for n, v in fast.state[0].items() if n != "step"]
    rtol = RTOL_ULPS * float(np.finfo(np.float64).eps)
    for name, got, want in [*pairs, ("param", params[0], params[1])]:
        # Non-finite values exactly where the reference has them; finite ones to rounding
        # (fastoptim fuses multiply-adds where the CPU has FMA).
        check_close_nonfinite(name, got, want, rtol, rtol)


@every_dtype
def test_radam_unrectified_steps_ignore_the_adaptive_term(dtype: Any, isa: str) -> None:
    """Before rectification (rho_t <= 5, steps 1-5 with beta2 = 0.999) torch's RAdam update is
    m_hat * lr alone: sqrt(1 - beta2^t) / (sqrt(v) + eps) is never evaluated, so even where it
    is infinite (eps = 0 and a zero gradient) the parameter does not move."""
    p = np.array([0.5, 0.5, 0.5], dtype)
    want = p.astype(np.float64)
    fast = fastoptim.RAdam([p], lr=0.01, eps=0.0)
    ref = reference.RAdam([want], lr=0.01, eps=0.0)
    for _ in range(5):
        g = np.array([0.0, 1.0, -2.0])
        fast.step([g.astype(dtype)])
        ref.step([g])
    assert p[0] == 0.5
    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    check_close("RAdam eps=0", p, want, rtol, rtol)
