"""The compiled kernels against the plain-NumPy reference (:mod:`fastoptim.reference`).

One table of cases (optax style): every optimizer x its meaningful option sets, run for
several steps in float32 and float64 with every available instruction set, on one parameter
group holding every size that matters to the SIMD driver (0-d, empty, 1 ... 70000: below,
at and just past the vector widths, odd tails, and more than one thread's grain).  The
reference always runs in float64 on exact copies; parameters and every state array are compared
elementwise after every step.

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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import fastoptim
from fastoptim import _core, reference

# ----------------------------------------------------------------------------- the table
SHAPES: list[tuple[int, ...]] = [
    (),  # 0-d
    (0,),  # empty
    (1,),
    (3,),
    (7,),
    (8,),
    (3, 5),  # 15
    (16,),
    (17,),
    (31,),
    (33,),
    (127,),
    (129,),
    (4099,),
    (70, 1000),  # 70000: more than one thread's grain
]


@dataclass(frozen=True)
class Case:
    opt: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 6
    new_lr_factor: float = 0.5  # the learning rate is multiplied by this halfway through


def case(opt: str, label: str, steps: int = 6, **kwargs: Any) -> Any:
    return pytest.param(Case(opt, kwargs, steps), id=f"{opt}-{label}")


# L2 weight decay uses a power of two: wd * p is then exact in either precision and g + wd * p is
# one correctly rounded operation, as in float64.  With a decimal like 0.1 the float32 kernel's
# gradient differs from the reference's by the rounding of wd (~1e-8 * |wd p|), which where
# g + wd p nearly cancels is a large relative error that Adam / RMSprop normalise up to a
# learning-rate-sized change of the parameter: an ill-conditioned problem, not a kernel bug.
WD = 0.125

CASES = [
    case("SGD", "plain", lr=0.1),
    case("SGD", "momentum", lr=0.1, momentum=0.9),
    case("SGD", "momentum-dampening", lr=0.1, momentum=0.9, dampening=0.3),
    case("SGD", "nesterov", lr=0.1, momentum=0.9, nesterov=True),
    case("SGD", "weight_decay", lr=0.1, weight_decay=WD),
    case("SGD", "momentum-weight_decay", lr=0.1, momentum=0.8, weight_decay=WD),
    case("SGD", "maximize", lr=0.1, momentum=0.9, maximize=True),
    case("Adagrad", "plain", lr=0.1),
    case("Adagrad", "lr_decay", lr=0.1, lr_decay=0.2),
    case("Adagrad", "initial_accumulator_value", lr=0.1, initial_accumulator_value=0.3),
    case("Adagrad", "weight_decay", lr=0.1, weight_decay=WD),
    case("Adagrad", "maximize", lr=0.1, maximize=True),
    case("RMSprop", "plain", lr=0.01),
    case("RMSprop", "centered", lr=0.01, centered=True),
    case("RMSprop", "momentum", lr=0.01, momentum=0.9),
    case("RMSprop", "centered-momentum", lr=0.01, centered=True, momentum=0.9),
    case("RMSprop", "weight_decay", lr=0.01, weight_decay=WD),
    case("RMSprop", "maximize", lr=0.01, maximize=True),
    case("Adadelta", "plain", lr=1.0),
    case("Adadelta", "weight_decay", lr=1.0, weight_decay=WD),
    case("Adadelta", "maximize", lr=0.5, rho=0.8, maximize=True),
    case("Adam", "plain", lr=0.01),
    case("Adam", "amsgrad", lr=0.01, betas=(0.9, 0.8), amsgrad=True),  # max matters sooner
    case("Adam", "weight_decay", lr=0.01, weight_decay=WD),
    case("Adam", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("Adam", "maximize", lr=0.01, maximize=True),
    case("Adam", "amsgrad-wd-maximize", lr=0.01, amsgrad=True, weight_decay=WD, maximize=True),
    case("AdamW", "plain", lr=0.01),
    case("AdamW", "amsgrad", lr=0.01, amsgrad=True, weight_decay=0.05),
    case("Adamax", "plain", lr=0.01),
    case("Adamax", "weight_decay", lr=0.01, weight_decay=WD),
    case("Adamax", "maximize", lr=0.01, maximize=True),
    case("NAdam", "plain", lr=0.01),
    case("NAdam", "weight_decay", lr=0.01, weight_decay=WD),
    case("NAdam", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("NAdam", "momentum_decay", lr=0.01, momentum_decay=0.3),  # mu_t varies faster
    case("NAdam", "maximize", lr=0.01, maximize=True),
    # rho_t > 5 first at step 6 (beta2 = 0.999): steps 1-5 unrectified, 6-9 rectified.
    case("RAdam", "plain", steps=9, lr=0.01),
    case("RAdam", "weight_decay", steps=9, lr=0.01, weight_decay=WD),
    case("RAdam", "decoupled", steps=9, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("RAdam", "maximize", steps=9, lr=0.01, maximize=True),
    case("Lion", "plain", lr=1e-3),
    case("Lion", "weight_decay", lr=1e-3, weight_decay=0.5),
    case("Lion", "maximize", lr=1e-3, betas=(0.95, 0.98), maximize=True),
]

TINY_SHAPES = SHAPES[:-1]  # the same again with 1e-7-scale gradients

DTYPES = [np.float32, np.float64]

# Allowed error in units of the dtype's epsilon: rtol = K * eps and atol = K * eps * (largest
# |reference value| the array kind has reached so far in its gradient family).  Measured over
# the whole table, every ISA and 16 other seeds: K needed <= 2.7 in float32 and <= 2.5 in
# float64 (largest for Adadelta's acc_delta; fused multiply-adds and operation order vs the
# reference, accumulated over the steps).  8 leaves 3x headroom; a wrong formula is off by
# >= 1e-5 relative (>= 80 eps in float32).
RTOL_ULPS = 8


# ----------------------------------------------------------------------------- helpers
def make_problem(
    rng: np.random.Generator, shapes: list[tuple[int, ...]], grad_scale: float = 1.0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Initial parameters (float64 holding float32-representable values, about 0.1 in size so
    that a few steps move them noticeably even in float32) and per-element gradient scales: 0
    for about 10% of the elements (exact zeros at every step), else `grad_scale`."""
    params, scales = [], []
    for shape in shapes:
        p = np.asarray(0.1 * rng.standard_normal(shape))
        params.append(p.astype(np.float32).astype(np.float64))
        scales.append(np.where(np.asarray(rng.random(shape)) < 0.1, 0.0, grad_scale))
    return params, scales


def make_grads(rng: np.random.Generator, scales: list[np.ndarray]) -> list[np.ndarray]:
    """float64 gradients that are exactly representable in float32."""
    return [
        np.asarray(rng.standard_normal(s.shape) * s).astype(np.float32).astype(np.float64)
        for s in scales
    ]


def check_close(
    what: str, fast: np.ndarray, ref: np.ndarray, rtol: float, atol: float, mask=None
) -> None:
    """|fast - ref| <= atol + rtol * |ref| elementwise (NaN fails), outside `mask` if given."""
    err = np.abs(fast.astype(np.float64) - ref)
    ok = err <= atol + rtol * np.abs(ref)
    if mask is not None:
        ok |= mask
    if not ok.all():
        bad = np.flatnonzero(~ok.ravel())
        i = bad[0]
        raise AssertionError(
            f"{what}: {bad.size} of {ok.size} elements differ beyond atol={atol:.3g} + "
            f"rtol={rtol:.3g} * |ref|; first at flat index {i}: fast={fast.ravel()[i]!r} "
            f"ref={ref.ravel()[i]!r}; largest error {np.nanmax(np.where(ok, 0, err)):.3g}"
        )


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
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: Case, dtype: Any, isa: str, rng: np.random.Generator) -> None:
    eps = float(np.finfo(dtype).eps)
    rtol = RTOL_ULPS * eps
    # One group: every size with unit-scale gradients, and again (but 70000) with tiny ones.
    p0, gscales = make_problem(rng, SHAPES)
    p_tiny, s_tiny = make_problem(rng, TINY_SHAPES, grad_scale=1e-7)
    p0 += p_tiny
    gscales += s_tiny
    family = [0] * len(SHAPES) + [1] * len(TINY_SHAPES)
    fast_params = [p.astype(dtype) for p in p0]
    ref_params = [p.copy() for p in p0]
    fast = getattr(fastoptim, case.opt)(fast_params, **case.kwargs)
    ref = getattr(reference, case.opt)(ref_params, **case.kwargs)
    lr = fast.param_groups[0]["lr"]
    lion = case.opt == "Lion"
    names = sorted(ref.state[0].keys() - {"step"})
    # Largest |reference value| reached so far, per family and per array kind: rounding errors
    # are absolute at the scale of the operands, which that bounds (see the module docstring).
    biggest: dict[tuple[int, str], float] = {}

    def update_biggest(key: tuple[int, str], value: np.ndarray) -> None:
        if value.size:
            biggest[key] = max(biggest.get(key, 0.0), float(np.max(np.abs(value))))

    for i, p in enumerate(p0):
        update_biggest((family[i], "param"), p)
    ambiguous = [np.zeros(p.shape, dtype=np.int64) for p in p0]  # Lion: steps where unsure

    for t in range(1, case.steps + 1):
        if t == case.steps // 2 + 1:  # a learning-rate change mid-run
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = lr * case.new_lr_factor
        grads = make_grads(rng, gscales)
        if lion:
            for i, g in enumerate(grads):
                update_biggest((family[i], "grad"), g)
            scale = [
                biggest.get((f, "exp_avg"), 0.0) + biggest.get((f, "grad"), 0.0) for f in family
            ]
            for a, amb in zip(ambiguous, lion_ambiguous(ref, grads, [rtol * s for s in scale])):
                a += amb
        fast.step([g.astype(dtype) for g in grads])
        ref.step(grads)

        assert sorted(fast.state[0].keys() - {"step"}) == names
        for n in names:
            for i in range(len(p0)):
                update_biggest((family[i], n), ref.state[i][n])
        for i in range(len(p0)):
            update_biggest((family[i], "param"), ref_params[i])
        for i, p in enumerate(p0):
            where = f"{case.opt} step {t} shape {p.shape} family {family[i]}"
            assert fast.state[i]["step"] == ref.state[i]["step"] == t
            for n in names:
                atol = rtol * biggest[family[i], n]
                check_close(f"{where} state {n!r}", fast.state[i][n], ref.state[i][n], rtol, atol)
            atol = rtol * biggest[family[i], "param"]
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
# One option set per optimizer, the one exercising the most state buffers.
RICH = [
    pytest.param(
        Case("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)), id="SGD"
    ),
    pytest.param(Case("Adagrad", dict(lr=0.1, lr_decay=0.1, weight_decay=0.01)), id="Adagrad"),
    pytest.param(
        Case("RMSprop", dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.01)),
        id="RMSprop",
    ),
    pytest.param(Case("Adadelta", dict(weight_decay=0.01)), id="Adadelta"),
    pytest.param(Case("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)), id="Adam"),
    pytest.param(Case("AdamW", dict(lr=0.01)), id="AdamW"),
    pytest.param(Case("Adamax", dict(lr=0.01, weight_decay=0.01)), id="Adamax"),
    pytest.param(Case("NAdam", dict(lr=0.01, weight_decay=0.01)), id="NAdam"),
    pytest.param(Case("RAdam", dict(lr=0.01, weight_decay=0.01), steps=7), id="RAdam"),
    pytest.param(Case("Lion", dict(lr=1e-3, weight_decay=0.1)), id="Lion"),
]


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float array: equality of these is bit-identity (-0.0, NaN payloads)."""
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def run(case: Case, params: list[np.ndarray], grads: list[list[np.ndarray]]) -> Any:
    opt = getattr(fastoptim, case.opt)(params, **case.kwargs)
    for g in grads:
        opt.step(g)
    return opt


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
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
    for i in range(len(shapes)):
        assert np.array_equal(bits(p1[i]), bits(p2[i])), f"param {i} differs"
        for name, value in o1.state[i].items():
            if name != "step":
                assert np.array_equal(bits(value), bits(o2.state[i][name])), f"{name} {i}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
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
        assert np.array_equal(bits(param), bits(expected)), f"offset {k}"
        for name, value in got.state[0].items():
            if name != "step":
                assert np.array_equal(bits(value), bits(want.state[0][name])), f"offset {k} {name}"


# With L2 weight decay (wd != 0) a non-finite parameter legitimately poisons the gradient
# (g + wd * p) in torch too; without it see test_nonfinite_param_stays_out_of_the_gradient.
WITH_L2 = [c for c in RICH if c.id != "AdamW"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
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
            finite = np.isfinite(want)
            where = f"{case.opt} step {t + 1} {name}"
            assert np.array_equal(np.isnan(got), np.isnan(want)), where
            infinite = ~finite & ~np.isnan(want)
            assert np.array_equal(got[infinite], want[infinite]), where
            big = float(np.max(np.abs(want[finite]), initial=0.0))
            check_close(where, got[finite], want[finite], rtol, rtol * big)


NO_L2 = [
    pytest.param(Case("SGD", dict(lr=0.1, momentum=0.9)), id="SGD"),
    pytest.param(Case("Adagrad", dict(lr=0.1)), id="Adagrad"),
    pytest.param(Case("RMSprop", dict(lr=0.01, momentum=0.9)), id="RMSprop"),
    pytest.param(Case("Adadelta", dict()), id="Adadelta"),
    pytest.param(Case("Adam", dict(lr=0.01)), id="Adam"),
    pytest.param(Case("AdamW", dict(lr=0.01)), id="AdamW-decoupled"),
    pytest.param(Case("Adamax", dict(lr=0.01)), id="Adamax"),
    pytest.param(Case("NAdam", dict(lr=0.01)), id="NAdam"),
    pytest.param(Case("RAdam", dict(lr=0.01)), id="RAdam"),
    pytest.param(Case("Lion", dict(lr=1e-3, weight_decay=0.1)), id="Lion-decoupled"),
]


@pytest.mark.parametrize("case", NO_L2)
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
        finite = np.isfinite(want)
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
        assert np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]), name
        check_close(name, got[finite], want[finite], rtol, rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
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
