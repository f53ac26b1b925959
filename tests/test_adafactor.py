"""Adafactor (a host definition: factored second moments, NumPy) in every tier.

Not in the element-wise table of ``cases.py``: the update of an element depends on its row's
and column's statistics and on the RMS of the whole tensor, and the state is not shaped like
the parameter (``row_var`` ``(..., R, 1)``, ``col_var`` ``(..., 1, C)`` for two or more
dimensions, ``variance`` for the others).  Here: the options of torch's own test database
(``optim_inputs_func_adafactor``) and a few more, on 0-D to 4-D parameters (wide, tall,
batched), 30 steps, against ``torch.optim.Adafactor``'s for-loop path (``foreach=False``),
float32 and float64, with the tolerance of the element-wise table (``test_torch_optim.py``):
``RTOL_ULPS`` ulps of the dtype, relative to the largest |value| that array has reached so far
in the run (parameters and every state tensor, compared at steps 1, 2, 3, 10, 20 and 30;
``step`` exactly).  Measured over 8 seeds: at most 3.7 ulps (float32), 3.1 (float64); the
NumPy class against ``fastoptim.reference`` at most 2.4.
"""

from __future__ import annotations

import copy
import inspect
import pickle
from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from cases import every_dtype, once_not_per_isa
from fastoptim import functional, host, reference

# The options of torch's optim_db (torch.testing._internal.common_optimizers), copied so that
# the test runs without torch's test modules; test_optim_db_options_are_covered checks them.
OPTIM_DB: list[dict[str, Any]] = [
    {},
    {"weight_decay": 0.1, "lr": 0.01},
    {"weight_decay": 0.1, "maximize": True},
    {"beta2_decay": -1.0},
    {"d": 1.5},
]
MORE: list[dict[str, Any]] = [
    {"lr": 0.5, "eps": (1e-30, 1e-3)},  # rho_t = 1/sqrt(t) (lr above it), eps1 given
    {"lr": 0.001, "weight_decay": 0.5, "d": 1.0, "beta2_decay": -0.5},
    {"eps": (1e-3, 0.5)},  # eps1 clamps the estimate; eps2 floors the parameter's RMS
    {"beta2_decay": 0.0, "maximize": True},  # 1 - t^0 = 0: the variance is the last g^2
]
OPTIONS = OPTIM_DB + MORE
SHAPES = [(), (1,), (17,), (24, 40), (40, 24), (1, 9), (9, 1), (3, 5, 7), (2, 3, 4, 5)]
STEPS = 30
RTOL_ULPS = 16  # as tests/test_torch_optim.py (measured here: <= 3.7)
REF_ULPS = 8  # the NumPy class against fastoptim.reference (measured: <= 2.4)
STATES = ("row_var", "col_var", "variance")


def _torch() -> Any:
    torch = pytest.importorskip("torch")
    if not hasattr(torch.optim, "Adafactor"):
        pytest.skip(f"torch {torch.__version__} has no torch.optim.Adafactor")
    return torch


def _ids(kw: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items()) or "default"


def _problem(
    rng: np.random.Generator, dtype: Any, shapes: list[tuple[int, ...]] = SHAPES
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    # parameters and gradients of different scales per tensor (the relative step and the
    # clipping see them)
    w0 = [np.array(rng.standard_normal(s) * 10.0 ** rng.uniform(-2, 1), dtype) for s in shapes]
    scales = [10.0 ** rng.uniform(-4, 1) for _ in shapes]
    grads = [
        [np.array(rng.standard_normal(s) * c, dtype) for s, c in zip(shapes, scales)]
        for _ in range(STEPS)
    ]
    return w0, grads


class Scales:
    """M of the tolerance: the largest |value| each array (tensor i, state name) of the oracle
    has reached so far in the run, as test_torch_optim's ``Scales``: a parameter that the
    clipped steps drive to near zero is compared relative to the size it had (a difference
    of an ulp of a step is not an error of many ulps of a small result)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, str], float] = {}

    def update(self, i: int, name: str, value: Any) -> float:
        a = np.asarray(value, np.float64)
        m = float(np.max(np.abs(a))) if a.size else 0.0
        key = (i, name)
        self.seen[key] = max(self.seen.get(key, 0.0), m)
        return self.seen[key]


def _check(
    what: str, got: Any, want: Any, dtype: Any, ulps: float = RTOL_ULPS, scale: float = 0.0
) -> None:
    """|got - want| <= ulps * eps(dtype) * max(scale, max|want|), element-wise."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.size == 0:
        return
    scale = max(scale, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want)))
    tol = ulps * float(np.finfo(dtype).eps) * scale
    assert err <= tol, f"{what}: max error {err:.3g} > {ulps} ulps of {scale:.3g}"


CHECKED = (1, 2, 3, 10, 20, 30)  # the steps at which the trajectories are compared


def _run_numpy(
    cls: Any, w0: list[np.ndarray], grads: list[list[np.ndarray]], **kw: Any
) -> tuple[list[np.ndarray], Any]:
    ws = [w.copy() for w in w0]
    opt = cls(ws, **kw)
    for g in grads:
        opt.step(g)
    return ws, opt


def _fresh_states(shape: tuple[int, ...], dtype: Any) -> dict[str, np.ndarray | None]:
    return {
        n: None if (sh := fn(shape)) is None else np.zeros(sh, dtype)
        for n, fn in zip(STATES, (host.row_var_shape, host.col_var_shape, host.variance_shape))
    }


@every_dtype
@pytest.mark.parametrize("kw", OPTIONS, ids=_ids)
def test_matches_torch(kw: dict[str, Any], dtype: Any, rng: np.random.Generator) -> None:
    """NumPy class, functional function and fastoptim.torch against torch.optim.Adafactor,
    parameters and every state tensor."""
    torch = _torch()
    import fastoptim.torch as fot

    w0, grads = _problem(rng, dtype)
    tw = [torch.tensor(w.copy()) for w in w0]
    fw = [torch.tensor(w.copy()) for w in w0]
    topt = torch.optim.Adafactor(tw, foreach=False, **kw)
    fopt = fot.Adafactor(fw, **kw)
    ws = [w.copy() for w in w0]
    opt = fo.Adafactor(ws, **kw)
    fn = [w.copy() for w in w0]
    fs = [_fresh_states(w.shape, dtype) for w in w0]
    eps = kw.get("eps", (None, 1e-3))
    if eps[0] is None:  # (the functional tier sees one parameter: its own dtype, the same here)
        eps = (float(np.finfo(dtype).eps), eps[1])
    scales = Scales()
    for i, w in enumerate(w0):
        scales.update(i, "param", w)
    for step, g in enumerate(grads, 1):
        for t, f, gi in zip(tw, fw, g):
            t.grad = torch.tensor(gi)
            f.grad = torch.tensor(gi)
        topt.step()
        fopt.step()
        opt.step(g)
        for p, gi, st in zip(fn, g, fs):
            functional.adafactor_(p, gi, **st, step=step, **{**kw, "eps": eps})
        for i, t in enumerate(tw):
            m = scales.update(i, "param", t.numpy())
            for n, v in topt.state[t].items():
                if n != "step":
                    scales.update(i, n, v.numpy())
            if step not in CHECKED:
                continue
            want = t.numpy()
            _check(f"step {step} param {i}", ws[i], want, dtype, scale=m)
            _check(f"step {step} fastoptim.torch param {i}", fw[i].numpy(), want, dtype, scale=m)
            np.testing.assert_array_equal(fn[i], ws[i])  # the same code: the same bits
            tstate, fstate, nstate = topt.state[t], fopt.state[fw[i]], opt.state[i]
            assert set(fstate) == set(tstate), (sorted(fstate), sorted(tstate))
            assert set(nstate) == set(tstate), (sorted(nstate), sorted(tstate))
            assert float(fstate["step"]) == float(tstate["step"]) == step
            assert fstate["step"].dtype == tstate["step"].dtype
            for n, v in tstate.items():
                if n == "step":
                    continue
                assert fstate[n].dtype == v.dtype and fstate[n].shape == v.shape, n
                m = scales.seen[i, n]
                _check(f"step {step} state {n} of {i}", nstate[n], v.numpy(), dtype, scale=m)
                _check(
                    f"step {step} fastoptim.torch state {n} of {i}",
                    fstate[n].numpy(),
                    v.numpy(),
                    dtype,
                    scale=m,
                )
                np.testing.assert_array_equal(fs[i][n], nstate[n])
    for i, t in enumerate(tw):
        assert not np.array_equal(t.numpy(), w0[i])


@every_dtype
@pytest.mark.parametrize("kw", OPTIONS, ids=_ids)
def test_matches_reference(kw: dict[str, Any], dtype: Any, rng: np.random.Generator) -> None:
    """The blocked float64 reductions and in-place passes against the readable transcription
    of torch's for-loop path in fastoptim.reference (only summation orders differ)."""
    w0, grads = _problem(rng, dtype)
    ws, rs = [w.copy() for w in w0], [w.copy() for w in w0]
    opt, ref = fo.Adafactor(ws, **kw), reference.Adafactor(rs, **kw)
    scales = Scales()
    for i, w in enumerate(w0):
        scales.update(i, "param", w)
    for step, g in enumerate(grads, 1):
        opt.step(g)
        ref.step(g)
        for i in range(len(ws)):
            m = scales.update(i, "param", rs[i])
            _check(f"step {step} param {i}", ws[i], rs[i], dtype, REF_ULPS, m)
            for n in STATES:
                assert (n in opt.state[i]) == (n in ref.state[i])
                if n in opt.state[i]:
                    m = scales.update(i, n, ref.state[i][n])
                    _check(f"{n} {i}", opt.state[i][n], ref.state[i][n], dtype, REF_ULPS, m)


def test_reductions_in_blocks(rng: np.random.Generator) -> None:
    """The blocked, float64 row/column sums equal the plain ones (tall, wide, batched and
    larger than one block), and do not depend on how the gradient is laid out."""
    for shape in [(3, 70000), (70000, 3), (2, 300, 257), (1, 1)]:
        g = rng.standard_normal(shape).astype(np.float32)
        row, col = host.row_col_means(g)
        sq = g.astype(np.float64) ** 2
        want_row = (np.sqrt(sq.sum(-1, keepdims=True)).astype(np.float32) ** 2) / np.float32(
            shape[-1]
        )
        want_col = (np.sqrt(sq.sum(-2, keepdims=True)).astype(np.float32) ** 2) / np.float32(
            shape[-2]
        )
        np.testing.assert_array_equal(row, want_row)
        np.testing.assert_array_equal(col, want_col)
        t_row, t_col = host.row_col_means(np.asfortranarray(g))
        np.testing.assert_array_equal(t_row, row)
        np.testing.assert_array_equal(t_col, col)
        assert host.sum_squares(g) == pytest.approx(float(sq.sum()), rel=1e-15)


@once_not_per_isa
def test_optim_db_options_are_covered() -> None:
    _torch()
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:  # pragma: no cover - torch's test modules not installed
        pytest.skip(f"torch's optim_db: {e}")
    info = next(o for o in optim_db if o.optim_cls.__name__ == "Adafactor")
    for inp in info.optim_inputs_func("cpu"):
        kw = {k: (float(v) if hasattr(v, "item") else v) for k, v in inp.kwargs.items()}
        assert kw in OPTIM_DB, kw


@every_dtype
def test_torch_layouts_steps_and_tensor_lr(dtype: Any, rng: np.random.Generator) -> None:
    """fastoptim.torch on transposed and channels-last parameters, gradients in the other
    layout, a tensor lr, and parameters without a gradient at some steps (torch's
    per-parameter ``step`` then differs between them)."""
    torch = _torch()
    import fastoptim.torch as fot

    shapes = [(20, 36), (2, 3, 4, 5), (11,)]
    w0, grads = _problem(rng, dtype, shapes)
    tw = [torch.tensor(w.copy()) for w in w0]
    fw = [
        torch.tensor(w0[0].T.copy()).T,  # transposed memory
        torch.tensor(w0[1]).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        torch.tensor(w0[2].copy()),
    ]
    assert not fw[0].is_contiguous() and not fw[1].is_contiguous()
    topt = torch.optim.Adafactor(tw, lr=torch.tensor(0.02), foreach=False, weight_decay=0.1)
    fopt = fot.Adafactor(fw, lr=torch.tensor(0.02), weight_decay=0.1)
    for t, g in enumerate(grads):
        for i, (a, b, gi) in enumerate(zip(tw, fw, g)):
            if t % 3 == 1 and i == 1:  # no gradient: not updated, its step not counted
                a.grad = b.grad = None
                continue
            a.grad = torch.tensor(gi)
            rev = tuple(reversed(range(gi.ndim)))  # (every other step: reversed memory order)
            b.grad = torch.tensor(gi.transpose(rev).copy()).permute(rev) if t % 2 else None
            if b.grad is None:
                b.grad = torch.tensor(gi)
        topt.step()
        fopt.step()
    for i, (a, b) in enumerate(zip(tw, fw)):
        _check(f"param {i}", b.numpy(), a.numpy(), dtype)
        assert float(fopt.state[b]["step"]) == float(topt.state[a]["step"])
        for n, v in topt.state[a].items():
            if n != "step":
                _check(f"{n} {i}", fopt.state[b][n].numpy(), v.numpy(), dtype)
    assert float(topt.state[tw[1]]["step"]) < STEPS
    assert not fw[0].is_contiguous()  # updated in place, layout kept


def test_eps1_from_the_first_parameter_of_the_group(rng: np.random.Generator) -> None:
    """eps=(None, ...): torch takes the machine epsilon of the first parameter (with a
    gradient) of the group for all of its parameters; so do the classes."""
    torch = _torch()
    import fastoptim.torch as fot

    # tiny gradients: eps1 (the clamp of the estimate) decides the update
    w0 = [np.ones((3, 4), np.float32), np.ones((5,), np.float64), np.ones((2, 2), np.float64)]
    g = [np.full(w.shape, 1e-9, w.dtype) for w in w0]
    tw = [torch.tensor(w.copy()) for w in w0]
    fw = [torch.tensor(w.copy()) for w in w0]
    topt = torch.optim.Adafactor(tw, foreach=False)
    fopt = fot.Adafactor(fw)
    ws, _ = _run_numpy(fo.Adafactor, w0, [g, g])
    for _ in range(2):
        for a, b, gi in zip(tw, fw, g):
            a.grad, b.grad = torch.tensor(gi), torch.tensor(gi)
        topt.step()
        fopt.step()
    for a, b, w in zip(tw, fw, ws):
        _check("fastoptim.torch", b.numpy(), a.numpy(), np.float32)
        _check("numpy", w, a.numpy(), np.float32)
    f64 = [np.ones((5,), np.float64)]
    alone, _ = _run_numpy(fo.Adafactor, f64, [[g[1]], [g[1]]])
    assert not np.array_equal(alone[0], ws[1])  # float64's own eps: another update


def test_state_names_and_shapes() -> None:
    shapes = [(), (4,), (3, 4), (2, 3, 4)]
    ws = [np.ones(s, np.float32) for s in shapes]
    opt = fo.Adafactor(ws)
    want = [
        {"variance": ()},
        {"variance": (4,)},
        {"row_var": (3, 1), "col_var": (1, 4)},
        {"row_var": (2, 3, 1), "col_var": (2, 1, 4)},
    ]
    for i, w in enumerate(want):
        st = opt.state[i]
        assert {n: st[n].shape for n in st if n != "step"} == w
        assert all(st[n].dtype == np.float32 and not st[n].any() for n in w)
    # O(R + C) memory for a matrix: the point of the factorisation
    assert opt.state_bytes() == 4 * (1 + 4 + (3 + 4) + 2 * (3 + 4))


def test_empty_parameter_unchanged() -> None:
    """torch divides by the size of an empty parameter (ZeroDivisionError); here it is left
    as it is and the others are updated."""
    ws = [np.ones((0, 3), np.float32), np.ones((0,), np.float32), np.ones(3, np.float32)]
    opt = fo.Adafactor(ws)
    opt.step([np.ones_like(w) for w in ws])
    assert ws[0].shape == (0, 3) and (ws[2] != 1).all()
    assert opt.state[0]["row_var"].shape == (0, 1) and opt.state[0]["col_var"].shape == (1, 3)


def test_functional_state_arrays() -> None:
    w = np.ones((3, 4), np.float32)
    g = np.ones_like(w)
    with pytest.raises(ValueError, match=r"needs state array.*row_var, col_var"):
        functional.adafactor_(w, g, step=1)
    with pytest.raises(ValueError, match=r"does not use state array.*variance"):
        functional.adafactor_(
            w,
            g,
            np.zeros((3, 1), np.float32),
            np.zeros((1, 4), np.float32),
            np.zeros_like(w),
            step=1,
        )
    with pytest.raises(ValueError, match=r"col_var has shape \(4,\), expected \(1, 4\)"):
        functional.adafactor_(
            w, g, row_var=np.zeros((3, 1), np.float32), col_var=np.zeros(4, np.float32), step=1
        )
    with pytest.raises(TypeError, match="float32 or float64"):
        functional.adafactor_(
            np.ones(4, np.float16), np.ones(4, np.float16), variance=np.zeros(4, np.float16), step=1
        )
    with pytest.raises(ValueError, match=r"needs state array.*variance"):
        functional.adafactor_(np.ones(4), np.ones(4), step=1)
    assert (w == 1).all()  # nothing touched


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"beta2_decay": 0.5}, "beta2_decay"),
        ({"beta2_decay": float("nan")}, "beta2_decay"),
        ({"eps": (-1.0, 1e-3)}, r"eps\[0\]"),
        ({"eps": (None, -1e-3)}, r"eps\[1\]"),
        ({"eps": 1e-3}, "eps"),
        ({"d": 0.5}, "d="),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_options(kw: dict[str, Any], match: str) -> None:
    w = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        fo.Adafactor([w], **kw)
    opt = fo.Adafactor([w])
    opt.param_groups[0].update(kw)
    with pytest.raises(ValueError, match=match):
        opt.step([np.ones_like(w)])
    assert (w == 1).all() and not opt.state[0]["row_var"].any()  # changed nothing
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    with pytest.raises(ValueError, match=match):
        fot.Adafactor([torch.ones(2, 3, requires_grad=True)], **kw)


def test_dtypes_and_precision_options() -> None:
    """float32 and float64 only; the precision options of the compiled optimizers (state
    dtypes, master weights...) do not exist for this NumPy step: named in the error."""
    with pytest.raises(TypeError, match="float32 and float64"):
        fo.Adafactor([np.zeros((2, 3), np.float16)])
    with pytest.raises(TypeError, match="dtype"):
        fo.Adafactor([np.zeros((2, 3), np.int32)])
    for opt_kw in ({"state_dtype": "bfloat16"}, {"master_weights": True}):
        with pytest.raises(TypeError, match=next(iter(opt_kw))):
            fo.Adafactor([np.zeros((2, 3), np.float32)], **opt_kw)
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    with pytest.raises(TypeError, match="float32 and float64"):
        fot.Adafactor([torch.zeros(2, 3, dtype=torch.bfloat16, requires_grad=True)])
    with pytest.raises(TypeError, match="state_dtype"):
        fot.Adafactor([torch.zeros(2, 3, requires_grad=True)], state_dtype="bfloat16")


def test_bad_gradient_changes_nothing() -> None:
    ws = [np.ones((2, 3), np.float32), np.ones(3, np.float32)]
    opt = fo.Adafactor(ws)
    opt.step([np.ones((2, 3), np.float32), np.ones(3, np.float32)])
    before = copy.deepcopy([ws, opt.state_dict()["state"]])
    with pytest.raises(ValueError):
        opt.step([np.ones((2, 3), np.float32), np.ones(4, np.float32)])
    with pytest.raises(TypeError):
        opt.step([np.ones((2, 3), np.float32), np.ones(3, np.int32)])
    after = [ws, opt.state_dict()["state"]]
    for a, b in zip(after[0], before[0]):
        np.testing.assert_array_equal(a, b)
    for k in before[1]:
        for n in before[1][k]:
            np.testing.assert_array_equal(after[1][k][n], before[1][k][n])


@pytest.mark.parametrize("how", ["state_dict", "pickle", "deepcopy", "save"])
def test_resume_exactly(how: str, rng: np.random.Generator, tmp_path: Any) -> None:
    w0, grads = _problem(rng, np.float32)
    ws = [w.copy() for w in w0]
    opt = fo.Adafactor(ws, weight_decay=0.1)
    for g in grads[:4]:
        opt.step(g)
    if how == "state_dict":
        ws2 = [w.copy() for w in ws]
        opt2 = fo.Adafactor(ws2, weight_decay=0.1)
        opt2.load_state_dict(opt.state_dict())
    elif how == "save":
        fo.save(tmp_path / "a.npz", opt)
        ws2 = [np.zeros_like(w) for w in ws]
        opt2 = fo.Adafactor(ws2, weight_decay=0.1)
        fo.load(tmp_path / "a.npz", opt2)
    else:
        opt2 = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
        ws2 = list(opt2.param_groups[0]["params"])
    for g in grads[4:]:
        opt.step(g)
        opt2.step(g)
    for a, b in zip(ws, ws2):
        np.testing.assert_array_equal(a, b)


def test_load_state_dict_checks_factored_shapes() -> None:
    ws = [np.ones((3, 4), np.float32)]
    opt = fo.Adafactor(ws)
    opt.step([np.ones_like(ws[0])])
    sd = opt.state_dict()
    sd["state"][0]["row_var"] = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"'row_var'.*expected float32 \(3, 1\)"):
        fo.Adafactor([np.ones((3, 4), np.float32)]).load_state_dict(sd)
    sd["state"][0] = {"variance": np.zeros((3, 4), np.float32)}
    with pytest.raises(ValueError, match="expected"):
        fo.Adafactor([np.ones((3, 4), np.float32)]).load_state_dict(sd)


def test_lr_schedule() -> None:
    """Schedules come from the engine: lr(t) at update t (the cap of rho_t and the decay)."""
    w, w2 = np.ones((4, 6)), np.ones((4, 6))
    opt = fo.Adafactor([w], lr=lambda t: 0.01 * (t + 1), weight_decay=0.1)
    g = np.arange(24.0).reshape(4, 6)
    opt.step([g])
    opt.step([g])
    ref = fo.Adafactor([w2], lr=0.01, weight_decay=0.1)
    ref.step([g])
    ref.param_groups[0]["lr"] = 0.02
    ref.step([g])
    np.testing.assert_array_equal(w, w2)


def test_torch_state_dict_both_ways(rng: np.random.Generator) -> None:
    torch = _torch()
    import fastoptim.torch as fot

    w0, grads = _problem(rng, np.float64)
    a = [torch.tensor(w.copy()) for w in w0]
    b = [torch.tensor(w.copy()) for w in w0]
    ta, fb = torch.optim.Adafactor(a, foreach=False), fot.Adafactor(b)

    def run(params: list[Any], opt: Any, gs: list[list[np.ndarray]]) -> None:
        for g in gs:
            for p, gi in zip(params, g):
                p.grad = torch.tensor(gi)
            opt.step()

    run(a, ta, grads[:3])
    run(b, fb, grads[:3])
    # swap: torch's state into fastoptim and fastoptim's into torch
    fa, tb = fot.Adafactor(a), torch.optim.Adafactor(b, foreach=False)
    fa.load_state_dict(ta.state_dict())
    tb.load_state_dict(fb.state_dict())
    run(a, fa, grads[3:])
    run(b, tb, grads[3:])
    for x, y in zip(a, b):
        _check("resumed", x.numpy(), y.numpy(), np.float64)
    fc = fot.Adafactor([torch.ones(3, 4)])
    sd = fa.state_dict()
    sd["param_groups"] = sd["param_groups"][:1]
    sd["param_groups"][0]["params"] = [3]  # the (24, 40) parameter's state for a (3, 4) one
    sd["state"] = {3: sd["state"][3]}
    fc.load_state_dict(sd)
    fc.param_groups[0]["params"][0].grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"'row_var'.*its shape \(3, 1\)"):
        fc.step()


def test_signature_as_torch() -> None:
    torch = _torch()
    import fastoptim.torch as fot

    theirs = inspect.signature(torch.optim.Adafactor.__init__).parameters
    ours = inspect.signature(fot.Adafactor.__init__).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default and ours[name].kind == p.kind, name
    numpy_params = inspect.signature(fo.Adafactor.__init__).parameters
    assert list(numpy_params) == [n for n in theirs if n != "foreach"]


def test_bench_adafactor_table() -> None:
    """``fastoptim bench --adafactor``: the step, its reduction pass and a streaming kernel of
    the same bytes, from the same run."""
    from fastoptim.apps import bench

    rows = bench.run_adafactor([(64, 48)], rounds=1)
    row = rows[0]
    assert row.step > 0 and row.reduction > 0 and row.stream > 0
    table = bench.format_adafactor(rows)
    assert "64x48" in table and "reduction" in table


def test_demo_accepts_adafactor() -> None:
    """``fastoptim demo --optimizers adafactor``: the name, and a run in lockstep with the
    NumPy reference."""
    pytest.importorskip("sklearn")
    from fastoptim.apps import cli, demo

    assert demo.canonical("ADAFACTOR") == "Adafactor"
    parse = cli._names(demo.canonical, list(demo.OPTIMIZERS))  # (demo's --optimizers type)
    assert parse("adafactor,adam") == ["Adafactor", "Adam"]
    data = demo.load_digits(seed=0)
    r = demo.train("Adafactor", data, demo.Config(epochs=2, hidden=(16,), reference=True))
    assert r.max_diff is not None and r.max_diff < 1e-5
    assert r.train_loss[-1] < 0.5 * r.train_loss[0]
