"""The floating-point environment and the corners of IEEE arithmetic (an audit's findings, each
test failing on the code before it):

- a step leaves no spurious exception flag: an 8-bit step compared with a signaling NaN, which
  raised FE_INVALID (SIGFPE where a program traps it);
- the pool's workers run under the caller's floating-point mode (flush-to-zero, rounding), so a
  step has the same bits for any thread count whatever mode the caller set; they kept the mode
  they were created under;
- float16 stores round to nearest-even whatever the caller's rounding mode (the portable path
  rounded denormal results with a float addition, which followed it);
- signed zeros as torch: SGD's first momentum buffer is the gradient itself (-0 kept), Rprop
  leaves a -0 parameter -0 where it does not move;
- a NaN gradient under ``max_grad_norm`` makes the step NaN, as torch's ``clip_grad_norm_``
  (it raised an internal "mul must be finite").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Iterator

import numpy as np
import pytest

import fastoptim as fo
from fastoptim import _core

# <fenv.h> on x86-64 Linux (glibc): the exception bits and rounding modes.
FE_INVALID, FE_DIVBYZERO, FE_OVERFLOW, FE_ALL_EXCEPT = 0x01, 0x04, 0x08, 0x3D
FE_TONEAREST, FE_UPWARD, FE_TOWARDZERO = 0x000, 0x800, 0xC00

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
    reason="<fenv.h> constants of x86-64 Linux",
)


@pytest.fixture
def libm() -> ctypes.CDLL:
    name = ctypes.util.find_library("m")
    if name is None:
        pytest.skip("no libm")
    return ctypes.CDLL(name)


@pytest.fixture
def threads() -> Iterator[None]:
    before = fo.get_num_threads()
    try:
        yield
    finally:
        fo.set_num_threads(before)


def test_an_8bit_step_raises_no_invalid_flag(isa: str, libm: ctypes.CDLL, threads: None) -> None:
    fo.set_num_threads(1)  # (exception flags are per thread: every chunk on this one)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(20_000).astype(np.float32)
    opt = fo.AdamW([w], lr=1e-3, state_dtype="int8")
    g = rng.standard_normal(20_000).astype(np.float32)
    libm.feclearexcept(FE_ALL_EXCEPT)
    opt.step([g])
    opt.step([g])
    raised = libm.fetestexcept(FE_INVALID | FE_DIVBYZERO | FE_OVERFLOW)
    assert raised == 0, hex(raised)
    assert np.isfinite(w).all()


def _sgd_result(n: int) -> np.ndarray:
    p = np.ones(n, np.float32)
    g = np.full(n, -3.0, np.float32)  # p = 1 + 0.1 * 3 = 1.3000000045: nearest rounds down
    fo.SGD([p], lr=0.1).step([g])
    return p


def test_workers_run_under_the_callers_rounding_mode(
    isa: str, libm: ctypes.CDLL, threads: None
) -> None:
    n = 1 << 20  # (8 MiB of traffic: shared by the threads)
    fo.set_num_threads(2)
    nearest = _sgd_result(n)  # (the pool's workers exist, created under round-to-nearest)
    assert libm.fesetround(FE_UPWARD) == 0
    try:
        up = {t: (fo.set_num_threads(t), _sgd_result(n))[1] for t in (1, 2, 3)}
    finally:
        libm.fesetround(FE_TONEAREST)
    assert (nearest == np.float32(1.2999999523)).all()
    assert (up[1] == np.float32(1.3000000715)).all()  # (every element: every thread's)
    assert np.array_equal(up[2], up[1]) and np.array_equal(up[3], up[1])


def test_workers_take_the_callers_flush_to_zero(threads: None) -> None:
    torch = pytest.importorskip("torch")  # (torch.set_flush_denormal sets FTZ and DAZ)
    n = 1 << 20

    def flushed(t: int) -> int:
        fo.set_num_threads(t)
        p = np.zeros(n, np.float32)
        fo.SGD([p], lr=1.0).step([np.full(n, -1e-39, np.float32)])  # p = 1e-39, denormal
        return int((p == 0).sum())

    try:
        for ftz in (True, False, True, False):
            if not torch.set_flush_denormal(ftz):
                pytest.skip("no flush-to-zero on this CPU")
            assert [flushed(t) for t in (1, 2, 3)] == [n if ftz else 0] * 3, ftz
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("mode", [FE_UPWARD, FE_TOWARDZERO])
def test_float16_stores_round_to_nearest_in_any_rounding_mode(
    isa: str, libm: ctypes.CDLL, mode: int
) -> None:
    tiny = 2.0**-24  # float16's smallest denormal
    # results p = -g: 1.25, 1.75, 0.75 and 0.4 ulps of 2^-24, and two ties (0.5, 2.5: even)
    want = np.array([1.25, 1.75, 0.75, 0.4, 0.5, 2.5] * 11, np.float64) * tiny
    g = (-want).astype(np.float32)
    p = np.zeros(g.size, np.float16)
    opt = fo.SGD([p], lr=1.0)
    assert libm.fesetround(mode) == 0
    try:
        opt.step([g])
    finally:
        libm.fesetround(FE_TONEAREST)
    assert np.array_equal(p.view(np.uint16), want.astype(np.float16).view(np.uint16))
    assert np.array_equal(p[:6] / np.float16(tiny), np.array([1, 2, 1, 0, 0, 2], np.float16))


def test_sgd_first_momentum_buffer_is_the_gradient_itself_negative_zero_kept(isa: str) -> None:
    for nesterov in (False, True):
        p = np.array([-0.0, 0.0, -0.0, 1.0] * 5, np.float32)
        g = np.array([-0.0, -0.0, 0.0, -0.0] * 5, np.float32)
        ref_p, ref_g = p.astype(np.float64), g.astype(np.float64)
        opt = fo.SGD([p], lr=0.1, momentum=0.9, nesterov=nesterov)
        opt.step([g])
        buf = opt.state[0]["momentum_buffer"]
        assert np.array_equal(np.signbit(buf), np.signbit(g))  # torch: buf = clone(grad)
        d = ref_g + 0.9 * ref_g if nesterov else ref_g
        expected = ref_p + (-0.1) * d  # torch: p.add_(d, alpha=-lr)
        assert np.array_equal(np.signbit(p), np.signbit(expected)), nesterov
        assert np.array_equal(p, expected.astype(np.float32))


def test_rprop_keeps_a_negative_zero_parameter_where_it_does_not_move(isa: str) -> None:
    p = np.array([-0.0, -0.0, 0.0, -0.0] * 5, np.float32)
    g = np.array([0.0, -0.0, 0.0, 1.0] * 5, np.float32)
    fo.Rprop([p], lr=0.01).step([g])
    # torch: p.addcmul_(g.sign(), step_size, value=-1), sign(+-0) = +0: p + -0 keeps p's sign
    assert np.array_equal(np.signbit(p[:12]), np.signbit(np.array([-0.0, -0.0, 0.0, -0.0] * 3)))
    assert (p[3::4] == np.float32(-0.01)).all()


def test_torch_signed_zeros_agree(isa: str) -> None:
    torch = pytest.importorskip("torch")
    fot = pytest.importorskip("fastoptim.torch")
    p0 = torch.tensor([-0.0, 0.0, -0.0, 1.0] * 5)
    g0 = torch.tensor([-0.0, -0.0, 0.0, -0.0] * 5)
    for make in (
        lambda ps, m: m.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps, m: m.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps, m: m.Rprop(ps, lr=0.01),
    ):
        ours, theirs = p0.clone().requires_grad_(), p0.clone().requires_grad_()
        o, t = make([ours], fot), make([theirs], torch.optim)
        for _ in range(2):
            ours.grad, theirs.grad = g0.clone(), g0.clone()
            o.step()
            t.step()
        assert torch.equal(torch.signbit(ours.detach()), torch.signbit(theirs.detach()))
        assert torch.equal(ours.detach(), theirs.detach())


def test_a_nan_gradient_under_max_grad_norm_makes_the_step_nan_as_torch() -> None:
    p = np.ones(64, np.float32)
    g = np.ones(64, np.float32)
    g[5] = np.nan
    opt = fo.Adam([p], lr=0.1, max_grad_norm=1.0)
    norm = opt.step([g])
    assert norm is not None and np.isnan(norm)
    assert np.isnan(p).all()  # (torch: every gradient times a NaN factor)
    torch = pytest.importorskip("torch")
    fot = pytest.importorskip("fastoptim.torch")
    tp = torch.ones(64, requires_grad=True)
    topt = fot.Adam([tp], lr=0.1, max_grad_norm=1.0)
    tp.grad = torch.from_numpy(g.copy())
    topt.step()
    assert topt.grad_norm is not None and np.isnan(topt.grad_norm)
    ref = torch.ones(64, requires_grad=True)
    ref.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_([ref], 1.0)
    torch.optim.Adam([ref], lr=0.1).step()
    assert torch.isnan(tp.detach()).all() and torch.isnan(ref.detach()).all()


def test_plan_takes_a_nan_factor_and_refuses_an_infinite_one() -> None:
    plan = _core.Plan([np.ones(4, np.float32)], ["p"], [], [])
    plan.set_grad_transform(float("nan"), float("inf"))
    assert np.isnan(plan.grad_mul)
    with pytest.raises(ValueError, match="mul must not be infinite"):
        plan.set_grad_transform(float("inf"), float("inf"))


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_numpy_steps_are_silent_as_torch_under_errstate_raise(name: str) -> None:
    """Muon's and Adafactor's steps run in NumPy: huge or tiny values overflowed or underflowed
    with NumPy's warnings (FloatingPointError under ``np.seterr(all="raise")``) where torch and
    the compiled kernels are silent."""
    big = np.finfo(np.float32).max / 4
    tiny = np.finfo(np.float32).smallest_subnormal * 3
    for pv, gv in ((big, big), (tiny, tiny), (1.0, big)):
        p = np.full((32, 16), pv, np.float32)
        opt = getattr(fo, name)([p])
        with np.errstate(all="raise"):
            opt.step([np.full((32, 16), gv, np.float32)])
            opt.step([np.full((32, 16), gv, np.float32)])


def test_the_largest_step_count_is_refused_clearly_and_state_dicts_stay_loadable() -> None:
    """A step from count 2**63 - 2 made 2**63 - 1, which load_state_dict refuses, and the next
    step raised pybind11's bare TypeError."""
    p = np.ones(4)
    opt = fo.Adam([p])
    opt.step([np.ones(4)])
    sd = opt.state_dict()
    sd["param_groups"][0]["step"] = 2**63 - 3
    opt.load_state_dict(sd)
    opt.step([np.ones(4)])  # -> 2**63 - 2, the largest
    before = p.copy()
    with pytest.raises(OverflowError, match="step count 9223372036854775806 is at its maximum"):
        opt.step([np.ones(4)])
    assert np.array_equal(p, before)
    opt.load_state_dict(opt.state_dict())
