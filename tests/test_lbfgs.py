"""LBFGS (a host definition with a closure: fastoptim.host.lbfgs_step) against
torch.optim.LBFGS, step by step.

Not in ``cases.py``'s element-wise table: its step takes a closure and evaluates the objective
several times, over the whole group as one vector.  Problems: the 6-D Rosenbrock function
(non-convex, the line search brackets and zooms) and a least-squares problem over two
parameters (a matrix and a bias).  The options: torch's optim_db ones (``{}``, ``lr=0.01``,
``lr`` as a tensor, ``tolerance_grad=1e-6``, ``line_search_fn="strong_wolfe"``) and small
histories / iteration budgets that exercise the history shift and the stopping rules.

The objective (loss and gradients) is torch's autograd in every tier, so the comparison
measures the optimizers only: they differ in the order of the dot products' sums and in fused
multiply-adds (torch's ``add_(alpha=)``), i.e. an ulp here and there, which L-BFGS amplifies
through y = g - g_prev and through chaotic trajectories.  float64 runs are compared for 4 steps
(80 iterations) at 1e-9 relative, except where the trajectory itself is chaotic (see
``_steps``), and the counts of the state (evaluations, iterations, history length) must be
equal; float32 runs over the first step (20 iterations), at 1e-3.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fastoptim as fo

OPTIM_DB: list[dict[str, Any]] = [
    {},
    {"lr": 0.01},
    {"lr": 0.001},  # torch's "Tensor lr" (a tensor in the torch tier)
    {"tolerance_grad": 1e-6},
    {"line_search_fn": "strong_wolfe"},
]
MORE: list[dict[str, Any]] = [
    {"history_size": 2, "max_iter": 6},
    {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 7, "max_eval": 9},
    {"lr": 0.5, "max_iter": 1},
    {"max_iter": 0},  # (one evaluation, no move: torch's; was refused)
    {"lr": 0.5, "max_iter": 5, "max_eval": 0},  # (one iteration: the budget is checked after)
]
OPTIONS = OPTIM_DB + MORE
STEPS = 4
# Measured (relative to the largest |element|, over OPTIONS and both problems): float64 <= 1.5e-10
# over the compared steps (Rosenbrock with the line search; least squares <= 5e-15); float32
# <= 2e-4 after the first step (converged least squares: the solution is only determined to
# float32 noise times the problem's condition).
RTOL = {"float64": 1e-9, "float32": 1e-3}


def _ids(kw: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items()) or "default"


# ----------------------------------------------------------------------------- problems
# The objectives are computed by torch's autograd in every tier (on tensors sharing the NumPy
# arrays' memory in the NumPy tier), so that every tier sees the very same losses and gradients
# and the comparison measures the optimizers only.
def _least_squares_data(dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((30, 5)).astype(dtype)
    y = rng.standard_normal((30, 3)).astype(dtype)
    return a, y


def objective(problem: str, params: list[Any]) -> Any:
    """The loss as a torch scalar of `params` (tensors)."""
    import torch

    if problem == "rosenbrock":
        x = params[0]
        return ((1 - x[:-1]) ** 2).sum() + 100 * ((x[1:] - x[:-1] ** 2) ** 2).sum()
    a, y = (torch.tensor(v) for v in _least_squares_data(params[0].detach().numpy().dtype))
    return 0.5 * ((a @ params[0] + params[1] - y) ** 2).sum()


PROBLEMS = {
    "rosenbrock": [np.array([-1.2, 1.0, -0.5, 0.8, 1.5, -0.3])],
    "least_squares": [np.full((5, 3), 0.1), np.zeros(3)],
}


def _fastoptim_closure(problem: str, params: list[np.ndarray], opt: Any, style: str) -> Any:
    import torch

    def closure() -> Any:
        ts = [torch.from_numpy(p).requires_grad_() for p in params]  # the arrays' memory
        loss = objective(problem, ts)
        loss.backward()
        grads = [t.grad.numpy() for t in ts]
        if style == "return":
            return loss.item(), grads
        for buf, g in zip(opt.grads, grads):  # style "buffers": into opt.grads
            np.copyto(buf, g)
        return loss.item()

    return closure


def _torch_closure(problem: str, params: list[Any], opt: Any) -> Callable[[], Any]:
    def closure() -> Any:
        opt.zero_grad()
        loss = objective(problem, params)
        loss.backward()
        return loss.detach()  # (torch.optim.LBFGS warns on float() of a loss that needs grad)

    return closure


def _close(what: str, got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    scale = max(float(np.max(np.abs(want))), 1e-30)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    assert err <= rtol * scale, f"{what}: error {err:.3g} > {rtol:g} * {scale:.3g}"


def _steps(kw: dict[str, Any], problem: str, dtype: Any) -> int:
    """How many steps are compared (see the module docstring): float32 one; float64 all but on
    the Rosenbrock function at lr 1 without line search (a chaotic trajectory: torch's own
    roundings differ from 1e-14 after one step to 1e-4 after four, measured)."""
    if dtype == np.float32:
        return 1
    if problem == "rosenbrock" and "line_search_fn" not in kw and kw.get("lr", 1) >= 0.5:
        return 1
    return STEPS


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("kw", OPTIONS, ids=_ids)
def test_matches_torch(kw: dict[str, Any], problem: str, dtype: Any) -> None:
    """The NumPy class (both closure styles) and fastoptim.torch, step by step: loss returned,
    parameters, the counts of the state (func_evals, n_iter, the history's length)."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    start = [p.astype(dtype) for p in PROBLEMS[problem]]
    tkw = dict(kw)
    if kw == {"lr": 0.001}:  # torch's "Tensor lr": float32's 0.001 (the NumPy tier: as float)
        tkw["lr"] = torch.tensor(0.001)
        kw = {"lr": tkw["lr"].item()}
    tp = [torch.tensor(p.copy(), requires_grad=True) for p in start]
    topt = torch.optim.LBFGS(tp, **tkw)
    fp = [torch.tensor(p.copy(), requires_grad=True) for p in start]
    fopt = fot.LBFGS(fp, **tkw)
    runs = []
    for style in ("return", "buffers"):
        ps = [p.copy() for p in start]
        opt = fo.LBFGS(ps, **kw)
        runs.append((ps, opt, _fastoptim_closure(problem, ps, opt, style)))
    tclosure, fclosure = _torch_closure(problem, tp, topt), _torch_closure(problem, fp, fopt)
    rtol = RTOL[np.dtype(dtype).name]
    moved = False
    scale = 0.0  # the largest loss so far: losses are compared at that scale (they reach ~0)

    def close_loss(what: str, got: float, want: float) -> None:
        assert abs(got - want) <= rtol * scale, f"{what}: {got!r} != {want!r}"

    for step in range(_steps(kw, problem, dtype)):
        want = topt.step(tclosure).item()
        scale = max(scale, abs(want))
        close_loss(f"step {step} loss (torch tier)", fopt.step(fclosure).item(), want)
        tstate, fstate = topt.state[tp[0]], fopt.state[fp[0]]
        for ps, opt, closure in runs:
            close_loss(f"step {step} loss", opt.step(closure), want)
            for i, t in enumerate(tp):
                _close(f"step {step} param {i}", ps[i], t.detach().numpy(), rtol)
                moved |= not np.array_equal(ps[i], start[i])
            state = opt.state[0]
            # (float32: a converged line search may take one evaluation more or less)
            for st in (state, fstate) if dtype == np.float64 else ():
                assert st["func_evals"] == tstate["func_evals"]
                assert st["n_iter"] == tstate["n_iter"]
                assert len(st["old_dirs"] or ()) == len(tstate["old_dirs"] or ())
        for i, t in enumerate(tp):
            got = fp[i].detach().numpy()
            _close(f"step {step} param {i} (torch tier)", got, t.detach().numpy(), rtol)
        assert set(fstate) == set(tstate)
        if kw.get("max_iter") == 0:  # (no iteration: torch's state holds None there)
            assert fstate["d"] is None and tstate["d"] is None
        else:
            assert isinstance(fstate["d"], torch.Tensor) and fstate["d"].dtype == tp[0].dtype
    assert moved == (kw.get("max_iter") != 0)


def test_converges_on_least_squares() -> None:
    """The solution of the least-squares problem (np.linalg.lstsq), with the line search."""
    pytest.importorskip("torch")
    ps = [p.copy() for p in PROBLEMS["least_squares"]]
    opt = fo.LBFGS(ps, line_search_fn="strong_wolfe", max_iter=100)
    opt.step(_fastoptim_closure("least_squares", ps, opt, "return"))
    a, y = _least_squares_data(np.float64)
    sol = np.linalg.lstsq(np.hstack([a, np.ones((30, 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(ps[0], sol[:5], atol=1e-6)
    np.testing.assert_allclose(ps[1], sol[5], atol=1e-6)


@pytest.mark.parametrize("how", ["state_dict", "pickle", "deepcopy"])
def test_resume_exactly(how: str) -> None:
    pytest.importorskip("torch")
    kw = {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 3}
    ps = [p.copy() for p in PROBLEMS["rosenbrock"]]
    opt = fo.LBFGS(ps, **kw)
    for _ in range(2):
        opt.step(_fastoptim_closure("rosenbrock", ps, opt, "return"))
    if how == "state_dict":
        ps2 = [p.copy() for p in ps]
        opt2 = fo.LBFGS(ps2, **kw)
        opt2.load_state_dict(opt.state_dict())
    else:
        opt2 = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
        ps2 = list(opt2.param_groups[0]["params"])
    assert opt2.state[0]["n_iter"] == opt.state[0]["n_iter"] > 2
    for _ in range(3):
        a = opt.step(_fastoptim_closure("rosenbrock", ps, opt, "return"))
        b = opt2.step(_fastoptim_closure("rosenbrock", ps2, opt2, "return"))
        assert a == b
        np.testing.assert_array_equal(ps[0], ps2[0])


def test_state_dict_is_a_copy_and_checked() -> None:
    pytest.importorskip("torch")
    ps = [p.copy() for p in PROBLEMS["rosenbrock"]]
    opt = fo.LBFGS(ps)
    opt.step(_fastoptim_closure("rosenbrock", ps, opt, "return"))
    sd = opt.state_dict()
    sd["state"][0]["d"][:] = 0
    assert np.any(opt.state[0]["d"] != 0)
    bad = opt.state_dict()
    bad["state"][0]["d"] = np.zeros(5)
    with pytest.raises(ValueError, match="expected float64"):
        opt.load_state_dict(bad)
    bad = opt.state_dict()
    bad["state"][0]["old_dirs"] = bad["state"][0]["old_dirs"] + [np.zeros(6)]
    with pytest.raises(ValueError, match="same length"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("direction", ["torch->fastoptim", "fastoptim->torch"])
def test_torch_state_dict_both_ways(direction: str) -> None:
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    kw = {"line_search_fn": "strong_wolfe", "history_size": 4, "max_iter": 4}
    first, second = (
        (torch.optim.LBFGS, fot.LBFGS)
        if direction == "torch->fastoptim"
        else (fot.LBFGS, torch.optim.LBFGS)
    )
    a = [torch.tensor(PROBLEMS["rosenbrock"][0].copy(), requires_grad=True)]
    b = [torch.tensor(PROBLEMS["rosenbrock"][0].copy(), requires_grad=True)]
    oa, ob = torch.optim.LBFGS(a, **kw), first(b, **kw)
    for _ in range(2):
        oa.step(_torch_closure("rosenbrock", a, oa))
        ob.step(_torch_closure("rosenbrock", b, ob))
    ob2 = second(b, **kw)
    ob2.load_state_dict(ob.state_dict())
    for _ in range(2):
        oa.step(_torch_closure("rosenbrock", a, oa))
        ob2.step(_torch_closure("rosenbrock", b, ob2))
    _close("resumed", b[0].detach().numpy(), a[0].detach().numpy(), 1e-10)
    assert ob2.state[b[0]]["n_iter"] == oa.state[a[0]]["n_iter"]


def test_signature_as_torch() -> None:
    torch = pytest.importorskip("torch")
    import inspect

    import fastoptim.torch as fot

    theirs = inspect.signature(torch.optim.LBFGS.__init__).parameters
    for cls in (fot.LBFGS, fo.LBFGS):
        ours = inspect.signature(cls.__init__).parameters
        assert list(ours) == list(theirs)
        for name, p in theirs.items():
            assert ours[name].default == p.default, name
    w = torch.zeros(3, requires_grad=True)
    assert fot.LBFGS([w], max_iter=8).param_groups[0]["max_eval"] == 10  # resolved, as torch
    assert fo.LBFGS([np.zeros(3)], max_iter=8).param_groups[0]["max_eval"] == 10


def test_errors_change_nothing() -> None:
    w = np.ones(3)
    with pytest.raises(ValueError, match="parameter groups"):
        fo.LBFGS([{"params": [w]}, {"params": [np.ones(2)]}])
    for kw, match in (
        ({"line_search_fn": "armijo"}, "line_search_fn"),
        ({"max_iter": -1}, "max_iter"),
        ({"max_eval": -1}, "max_eval"),
        ({"history_size": 0}, "history_size"),
        ({"lr": -1.0}, "lr"),
        ({"tolerance_grad": float("nan")}, "tolerance_grad"),
        # (max_eval's default, max_iter * 5 // 4, is not computed from a bad max_iter first:
        # int()'s bare OverflowError / ValueError / TypeError before)
        *(({"max_iter": v}, "LBFGS: max_iter must be an int") for v in (float("inf"), None)),
        *(({"max_iter": v}, "LBFGS: max_iter must be an int") for v in (float("nan"), "abc")),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            fo.LBFGS([w], **kw)
    opt = fo.LBFGS([w])
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected 1 gradients"):
        opt.step(lambda: (1.0, [np.ones(3), np.ones(3)]))
    with pytest.raises(ValueError):
        opt.step(lambda: (1.0, [np.ones(4)]))
    np.testing.assert_array_equal(w, np.ones(3))
    assert opt.state[0] == {"func_evals": 0, "n_iter": 0} or opt.state[0] == {}
    with pytest.raises(TypeError, match="pickle"):
        fo.save("unused.npz", opt)


@pytest.mark.parametrize("search", [None, "strong_wolfe"])
@pytest.mark.parametrize("tier", ["numpy", "torch"])
@pytest.mark.parametrize("failure", ["refused gradient", "closure raises"])
def test_a_step_that_raises_part_way_changes_nothing(tier: str, search: Any, failure: str) -> None:
    """A step whose closure fails on a later evaluation (a gradient the step refuses, the
    closure's own exception) raises and restores the parameters and the whole state: the
    next steps are bit for bit those of an optimizer that never tried it (the parameters had
    moved, ``n_iter`` advanced without the history it counts, and every later step failed)."""
    torch = pytest.importorskip("torch")  # (the objective's gradients: autograd's)
    import fastoptim.torch as ft

    def run(fail: bool) -> tuple[np.ndarray, dict[str, Any]]:
        x = np.array([-1.2, 1.0, -0.5, 0.8, 1.5, -0.3])
        param: Any = x if tier == "numpy" else torch.nn.Parameter(torch.from_numpy(x))
        cls = fo.LBFGS if tier == "numpy" else ft.LBFGS
        opt = cls([param], lr=1, history_size=3, line_search_fn=search)
        calls = [0]

        def closure(bad_at: int = 0) -> Any:
            calls[0] += 1
            if tier == "torch":
                param.grad = None
                ts = [param]
            else:
                ts = [torch.from_numpy(x).requires_grad_()]
            loss = objective("rosenbrock", ts)
            loss.backward()
            if calls[0] == bad_at:
                if failure == "closure raises":
                    raise RuntimeError("the closure's own error")
                if tier == "torch":
                    param.grad = torch.zeros(3, dtype=torch.float64)
                    return loss.detach()
                return loss.item(), [np.zeros(3)]
            return loss.detach() if tier == "torch" else (loss.item(), [ts[0].grad.numpy()])

        for _ in range(2):
            opt.step(closure)
        before = (x.copy(), _plain_state(opt, param))
        if fail:
            calls[0] = 0
            with pytest.raises((ValueError, TypeError, RuntimeError)):
                opt.step(lambda: closure(bad_at=3))
            np.testing.assert_array_equal(x, before[0])
            _same_state(_plain_state(opt, param), before[1])
        for _ in range(2):
            opt.step(closure)
        return x.copy(), _plain_state(opt, param)

    (x1, s1), (x2, s2) = run(True), run(False)
    np.testing.assert_array_equal(x1, x2)
    _same_state(s1, s2)


def _plain_state(opt: Any, param: Any) -> dict[str, Any]:
    """The L-BFGS state as NumPy (tensors' values, lists element-wise), to compare."""

    def plain(v: Any) -> Any:
        if hasattr(v, "detach"):
            return v.detach().numpy().copy()
        if isinstance(v, list):
            return [plain(e) for e in v]
        return v.copy() if isinstance(v, np.ndarray) else v

    key = 0 if isinstance(param, np.ndarray) else param
    return {k: plain(v) for k, v in opt.state[key].items()}


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, list):
            assert len(x) == len(y), k
            for e, f in zip(x, y):
                np.testing.assert_array_equal(np.asarray(e), np.asarray(f), err_msg=k)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)


def test_gradient_buffers_and_optimality() -> None:
    """A zero gradient is already optimal: one evaluation, nothing moves (torch's rule)."""
    w = np.ones(4)
    opt = fo.LBFGS([w])
    calls = []

    def closure() -> float:
        calls.append(1)
        opt.grads[0][:] = 0.0
        return 3.0

    assert opt.step(closure) == 3.0
    assert len(calls) == 1
    np.testing.assert_array_equal(w, np.ones(4))


def test_mixed_float32_float64_parameters_compute_in_float64_like_torch() -> None:
    """torch.optim.LBFGS gathers mixed float32/float64 parameters into float64 vectors
    (torch.cat promotes); fastoptim.torch's computed in the first parameter's dtype."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    torch.manual_seed(0)
    a = torch.randn(10, 4, dtype=torch.float64)
    b = torch.randn(10, dtype=torch.float64)
    out = []
    for cls in (torch.optim.LBFGS, fot.LBFGS):
        ps = [
            torch.zeros(2, dtype=torch.float32, requires_grad=True),
            torch.zeros(2, dtype=torch.float64, requires_grad=True),
        ]
        opt = cls(ps, history_size=3, line_search_fn="strong_wolfe")

        def closure(opt: Any = opt, ps: list[Any] = ps) -> Any:
            opt.zero_grad()
            loss = ((a @ torch.cat([ps[0].double(), ps[1]]) - b) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        assert opt.state[ps[0]]["d"].dtype == torch.float64, cls
        out.append([p.detach().clone() for p in ps])
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_line_search_interpolation_divides_by_zero_silently() -> None:
    """The cubic interpolation's 0/0 and x/0 give inf/NaN as torch's tensors do, without
    NumPy's RuntimeWarning (it leaked from `fastoptim minimize --optimizers lbfgs`)."""
    from fastoptim.host import _cubic_interpolate

    one, zero = np.float64(1.0), np.float64(0.0)  # (the line search's values are NumPy's)
    got = _cubic_interpolate(one, one, zero, one, one, zero)  # x1 == x2: 0/0 and x/0
    assert np.isnan(got) or np.isinf(got) or got == 1.0


def test_a_closure_returning_none_is_named() -> None:
    w = np.ones(4)
    opt = fo.LBFGS([w])

    def closure() -> Any:
        opt.grads[0][...] = 2 * w
        return None

    with pytest.raises(TypeError, match="closure returned None; it must return the loss"):
        opt.step(closure)
    assert (w == 1).all()


@pytest.mark.re_views
@pytest.mark.parametrize("how", ["made read-only", "re-viewed"])
def test_a_closure_that_locks_a_parameter_changes_nothing(how: str) -> None:
    """A closure that makes a parameter read-only (or re-views it in place) at a later
    evaluation: the step is refused before it writes there, naming the parameter, and puts
    the parameters and the state back (its rollback wrote into the read-only array and
    failed: the parameters stayed moved, the state part-way, every later step an
    AssertionError).  Undone, the next steps are those of an optimizer that never tried."""

    def run(fail: bool) -> np.ndarray:
        w = np.array([-1.2, 1.0, -0.5, 0.8])
        opt = fo.LBFGS([w], lr=0.5, max_iter=5, history_size=3)
        calls = [0]

        def closure(bad_at: int = 0) -> float:
            calls[0] += 1
            if calls[0] == bad_at:
                if how == "made read-only":
                    w.flags.writeable = False
                else:
                    w.dtype = np.int64
            opt.grads[0][...] = 4 * w**3 - 2 * w
            return float((w**4 - w**2).sum())

        opt.step(closure)
        before, state = w.copy(), _plain_state(opt, w)
        if fail:
            calls[0] = 0
            with pytest.raises(ValueError, match=r"^LBFGS\.step: after the closure: param 0: "):
                opt.step(lambda: closure(bad_at=3))
            if how == "made read-only":
                w.flags.writeable = True
            else:
                w.dtype = np.float64
            np.testing.assert_array_equal(w, before)
            _same_state(_plain_state(opt, w), state)
        for _ in range(2):
            opt.step(closure)
        return w

    np.testing.assert_array_equal(run(True), run(False))


@pytest.mark.parametrize("loss", ["loss", [1.0], np.array([1.0, 2.0]), {}])
def test_a_closure_returning_no_number_is_named(loss: Any) -> None:
    """A loss that is not a number is refused in LBFGS's words (it was Python's bare "could
    not convert string to float"), changing nothing."""
    w = np.ones(4)
    opt = fo.LBFGS([w])

    def closure() -> Any:
        opt.grads[0][...] = 2 * w
        return loss

    with pytest.raises(TypeError, match=r"^LBFGS\.step: the closure must return the loss as a"):
        opt.step(closure)
    assert (w == 1).all() and opt.state[0] in ({}, {"func_evals": 0, "n_iter": 0})


def test_empty_parameters_and_a_tensor_loss() -> None:
    """Parameters with no element: a step evaluates the closure once and moves nothing (it
    raised NumPy's "zero-size array to reduction operation maximum").  A loss that is a torch
    tensor requiring grad is read detached (no torch warning)."""
    opt = fo.LBFGS([np.zeros(0)])
    assert opt.step(lambda: 3.0) == 3.0
    assert opt.state[0]["func_evals"] == 1
    torch = pytest.importorskip("torch")
    w = np.ones(3)
    opt = fo.LBFGS([w])
    t = torch.ones((), requires_grad=True)

    def closure() -> Any:
        opt.grads[0][...] = 2 * w
        return t * float((w**2).sum())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    assert not (w == 1).any()


def test_torch_closure_replacing_a_parameters_memory_is_refused() -> None:
    """fastoptim.torch.LBFGS moves the parameters through views of their memory taken at the
    start of the step: a closure that gives one other memory (``p.data = ...``) is refused at
    that evaluation, and the state is put back (the step went on writing the old memory, a
    silently different result from torch.optim.LBFGS, which follows the new one)."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ft.LBFGS([p], max_iter=3)
    calls = [0]

    def closure() -> Any:
        calls[0] += 1
        if calls[0] == 2:
            p.data = p.data.clone()
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"^LBFGS\.step: after the closure: param 0 of group 0 "):
        opt.step(closure)
    assert not opt.state[p]
    calls[0] = 10
    before = p.detach().clone()
    opt.step(closure)  # (the new memory, from now on)
    assert opt.state[p]["n_iter"] >= 1 and not torch.equal(p.detach(), before)


def test_torch_lbfgs_refuses_a_second_group() -> None:
    """fastoptim.torch.LBFGS refuses a second parameter group, added (ValueError, as the
    NumPy tier; torch takes it, then refuses every step) or appended to ``param_groups``
    (the step raises, changing nothing); it had stepped the first group only."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft

    a, b = torch.nn.Parameter(torch.full((3,), 2.0)), torch.nn.Parameter(torch.ones(3))
    opt = ft.LBFGS([a])
    with pytest.raises(ValueError, match="LBFGS doesn't support per-parameter options"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    opt.param_groups.append({**opt.param_groups[0], "params": [b]})

    def closure() -> Any:
        opt.zero_grad()
        loss = (a**2).sum() + (b**2).sum()
        loss.backward()
        return loss.detach()

    with pytest.raises(ValueError, match="LBFGS doesn't support per-parameter options"):
        opt.step(closure)
    assert (a.detach() == 2).all() and (b.detach() == 1).all() and not opt.state


def test_strong_wolfe_with_no_evaluation_left_is_one_trial() -> None:
    """``max_eval=0`` with the strong-Wolfe search: torch's search is given a negative budget
    and fails (UnboundLocalError); here it is given none, as with ``max_eval=1``: one trial,
    the same steps."""
    out = []
    for max_eval in (0, 1):
        w = np.array([1.5, -0.5])
        opt = fo.LBFGS([w], lr=0.5, max_iter=3, max_eval=max_eval, line_search_fn="strong_wolfe")
        for _ in range(3):
            opt.step(lambda w=w: (float(((w - 0.3) ** 4).sum()), [4 * (w - 0.3) ** 3]))
        out.append(w)
    np.testing.assert_array_equal(out[0], out[1])
    assert not np.array_equal(out[0], [1.5, -0.5])


def test_torch_lbfgs_keeps_its_state_tensors_across_steps() -> None:
    """The state a step does not replace stays the same tensors (every step re-wrapped each
    one around a NumPy view of the last: a chain one link longer a step, never freed; about
    11 MB per 1,000 steps of a 4-element problem, 1.1 GB after 100,000)."""
    import tracemalloc

    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    target = torch.arange(4, dtype=torch.float64)
    opt = fot.LBFGS([x], lr=1, max_iter=1, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = ((x - target) ** 2).sum() + 0.1 * (x**4).sum()
        loss.backward()
        return loss

    def history() -> list[Any]:
        return [*opt.state[x]["old_dirs"], *opt.state[x]["old_stps"]]

    for _ in range(60):  # (stuck by then: the later steps add no curvature pair)
        opt.step(closure)
    before = history()
    assert len(before) >= 10
    opt.step(closure)
    assert all(a is b for a, b in zip(history(), before))
    tracemalloc.start()
    try:
        for _ in range(50):
            opt.step(closure)
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            opt.step(closure)
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 100_000, grown
