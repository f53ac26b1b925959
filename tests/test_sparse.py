"""Sparse row updates (``Optimizer.step_rows``, ``functional.sparse_rows_``, the compiled
``_core.rows_*``) and ``fastoptim.torch``'s sparse COO gradients (SGD, Adagrad, SparseAdam).

Oracles: :mod:`fastoptim.reference` (the same update on rows gathered by NumPy fancy indexing)
and, for SGD and Adagrad, the dense update with zero gradient rows, which torch's sparse path
equals; ``torch.optim`` (its for-loop path) over the options torch's ``optim_db`` exercises
for SparseAdam and for the sparse configurations of SGD and Adagrad.  Tolerance as in
test_torch_optim.py: 16 ulps of the dtype, relative to the largest value of each array.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from cases import every_dtype
from fastoptim import functional as F
from fastoptim import reference

# (torch.optim.Adagrad's sparse path builds sparse tensors without saying whether to check them)
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
RTOL_ULPS = 16
SHAPE = (50, 3, 4)  # 50 rows of 12 elements

# (optimizer, options): torch's sparse configurations and the options the row update takes
ROW_CASES: list[tuple[str, dict[str, Any]]] = [
    ("SGD", dict(lr=4.8e-3)),
    ("SGD", dict(lr=0.1, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-6)),
    ("Adagrad", dict(lr=0.1, maximize=True)),
    ("SparseAdam", dict()),
    ("SparseAdam", dict(lr=0.01)),
    ("SparseAdam", dict(lr=0.04, betas=(0.8, 0.99), eps=1e-6)),
    ("SparseAdam", dict(lr=0.01, maximize=True)),
]
IDS = [f"{n}-{'-'.join(k) or 'default'}" for n, k in ROW_CASES]


def tol(dtype: Any) -> float:
    return RTOL_ULPS * float(np.finfo(dtype).eps)


def close(got: np.ndarray, want: np.ndarray, dtype: Any, what: str) -> None:
    rtol = tol(dtype)
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def row_grads(rng: np.random.Generator, dtype: Any, k: int = 17) -> tuple[np.ndarray, np.ndarray]:
    """k row indices with duplicates, in random order, some rows absent; their rows."""
    idx = rng.integers(0, SHAPE[0] // 2, size=k)  # rows >= 25 never present
    idx[:3] = idx[3]  # a row three times more
    return idx, rng.standard_normal((k, *SHAPE[1:])).astype(dtype)


# --------------------------------------------------------------------------- NumPy tier
@every_dtype
@pytest.mark.parametrize(("name", "kwargs"), ROW_CASES, ids=IDS)
def test_rows_match_reference(name: str, kwargs: dict[str, Any], dtype: Any) -> None:
    """The compiled row kernel against the NumPy reference (fancy indexing), 8 steps with
    duplicate indices and absent rows, two of them with no row (an empty index array, an
    empty list: the reference failed on the first, the class refused the second as float64
    indices); absent rows (param and state) are never touched."""
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(SHAPE).astype(dtype)
    ours, theirs = p0.copy(), p0.copy()
    fast = getattr(fo, name)([ours], **kwargs)
    ref = getattr(reference, name)([theirs], **kwargs)
    for t in range(8):
        if t == 4:
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] *= 0.5
        idx, rows = row_grads(rng, dtype)
        if t in (2, 5):
            idx, rows = np.zeros(0, np.int64), np.zeros((0, *SHAPE[1:]), dtype)
        fast.step_rows([([] if t == 5 else idx, rows)])
        ref.step_rows([([] if t == 5 else idx.copy(), rows.copy())])
        close(ours, theirs, dtype, f"{name} step {t} param")
        for n, v in ref.state[0].items():
            if n != "step":
                close(fast.state[0][n], v, dtype, f"{name} step {t} {n}")
    assert fast.state[0]["step"] == ref.state[0]["step"] == 8
    np.testing.assert_array_equal(ours[25:], p0[25:])  # never present: bit for bit
    for n, v in fast.state[0].items():
        if n != "step":
            fill = float(kwargs.get("initial_accumulator_value", 0.0))
            assert np.all(v[25:] == fill), n


@every_dtype
@pytest.mark.parametrize(("name", "kwargs"), [c for c in ROW_CASES if c[0] != "SparseAdam"])
def test_sgd_adagrad_rows_equal_dense_update(name: str, kwargs: dict[str, Any], dtype: Any) -> None:
    """For SGD and Adagrad a row gradient is the dense gradient with zero rows (as torch's
    sparse path is): compared with the reference's dense step."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(SHAPE).astype(dtype)
    ours, theirs = p0.copy(), p0.copy()
    fast = getattr(fo, name)([ours], **kwargs)
    ref = getattr(reference, name)([theirs], **kwargs)
    for t in range(6):
        idx, rows = row_grads(rng, dtype)
        dense = np.zeros(SHAPE, dtype)
        np.add.at(dense, idx, rows)
        fast.step_rows([(idx, rows)])
        ref.step([dense])
        close(ours, theirs, dtype, f"{name} step {t}")


def test_sparse_adam_is_lazy() -> None:
    """SparseAdam: a row absent from a step keeps its moments (no decay) and its value; the
    bias corrections use the global step (the rows' own counts do not exist)."""
    p = np.zeros((3, 2))
    opt = fo.SparseAdam([p], lr=0.1)
    opt.step_rows([(np.array([0, 1]), np.ones((2, 2)))])
    m1, v1, p1 = (a.copy() for a in (opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"], p))
    opt.step_rows([(np.array([0]), np.ones((1, 2)))])
    st = opt.state[0]
    np.testing.assert_array_equal(st["exp_avg"][1:], m1[1:])
    np.testing.assert_array_equal(st["exp_avg_sq"][1:], v1[1:])
    np.testing.assert_array_equal(p[1:], p1[1:])
    # row 0 at step 2, by hand (torch's formula)
    m = 0.1 + 0.1 * (1 - 0.1)
    v = 0.001 + 0.001 * (1 - 0.001)
    step = 0.1 * np.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    want = p1[0, 0] - step * m / (np.sqrt(v) + 1e-8)
    assert p[0, 0] == pytest.approx(want, rel=1e-12)
    opt.step_rows([None])  # no rows: nothing changes, the step counts
    assert opt.state[0]["step"] == 3


def test_sparse_adam_dense_step_is_every_row_present() -> None:
    """A dense gradient (step) is SparseAdam with every row present (step_rows)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 5))
    b = a.copy()
    oa, ob = fo.SparseAdam([a], lr=0.05), fo.SparseAdam([b], lr=0.05)
    for _ in range(4):
        g = rng.standard_normal((6, 5))
        oa.step([g])
        ob.step_rows([(np.arange(6), g)])
    np.testing.assert_array_equal(a, b)


def test_functional_sparse_rows_same_bits_as_class() -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal(SHAPE).astype(np.float32)
    b = a.copy()
    m, v = np.zeros_like(b), np.zeros_like(b)
    opt = fo.SparseAdam([a], lr=0.02, betas=(0.8, 0.9))
    for t in range(1, 5):
        idx, rows = row_grads(rng, np.float32)
        opt.step_rows([(idx, rows)])
        fo.functional.sparse_rows_(
            "SparseAdam",
            b,
            idx,
            rows,
            {"exp_avg": m, "exp_avg_sq": v},
            step=t,
            lr=0.02,
            betas=(0.8, 0.9),
        )
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(opt.state[0]["exp_avg"], m)


def test_named_parameters_and_several_groups() -> None:
    emb, other = np.zeros((4, 2)), np.zeros((3, 2))
    opt = fo.Adagrad([{"params": {"emb": emb}}, {"params": {"other": other}, "lr": 0.5}])
    opt.step_rows({"emb": (np.array([1]), np.ones((1, 2)))})  # "other": no rows
    assert emb[1, 0] < 0 and not emb[[0, 2, 3]].any() and not other.any()
    assert [s["step"] for s in opt.state.values()] == [1, 1]


BAD: list[tuple[str, dict[str, Any], Any, type[Exception], str]] = [
    ("SparseAdam", {}, (np.array([4]), np.ones((1, 2))), IndexError, "out of range"),
    ("SparseAdam", {}, (np.array([-1]), np.ones((1, 2))), IndexError, "out of range"),
    ("SparseAdam", {}, (np.array([0.0]), np.ones((1, 2))), TypeError, "integers"),
    ("SparseAdam", {}, (np.array([True]), np.ones((1, 2))), TypeError, "integers"),
    ("SparseAdam", {}, (np.array([[0]]), np.ones((1, 2))), ValueError, "1-D"),
    ("SparseAdam", {}, (np.array([0, 1]), np.ones((1, 2))), ValueError, "shape"),
    ("SparseAdam", {}, (np.array([0]), np.ones((1, 3))), ValueError, "shape"),
    ("SparseAdam", {}, (np.array([0]), np.ones((1, 2), np.float32)), TypeError, "dtype"),
    ("SparseAdam", {}, np.ones((4, 2)), TypeError, "pair"),
    ("SGD", {"momentum": 0.9}, (np.array([0]), np.ones((1, 2))), ValueError, "momentum"),
    ("SGD", {"weight_decay": 0.1}, (np.array([0]), np.ones((1, 2))), ValueError, "weight_decay"),
    ("Adagrad", {"weight_decay": 0.1}, (np.array([0]), np.ones((1, 2))), ValueError, "weight"),
    ("Adam", {}, (np.array([0]), np.ones((1, 2))), TypeError, "no sparse row updates"),
    ("SparseAdam", {"max_grad_norm": 1.0}, (np.array([0]), np.ones((1, 2))), ValueError, "max_"),
]


@pytest.mark.parametrize(("name", "kwargs", "entry", "error", "match"), BAD)
def test_bad_rows_change_nothing(
    name: str, kwargs: dict[str, Any], entry: Any, error: type[Exception], match: str
) -> None:
    """Every refusal names the problem; nothing is written, the step does not count (the
    first parameter's valid rows included)."""
    first, p = np.ones((4, 2)), np.ones((4, 2))
    opt = getattr(fo, name)([first, p], **kwargs)
    with pytest.raises(error, match=match):
        opt.step_rows([(np.array([0]), np.ones((1, 2))), entry])
    assert (first == 1).all() and (p == 1).all()
    assert all(s["step"] == 0 for s in opt.state.values())
    assert all((v == 0).all() for s in opt.state.values() for n, v in s.items() if n != "step")


def test_rows_of_low_precision_state_refused() -> None:
    p = np.ones((4, 2), np.float32)
    opt = fo.SparseAdam([p], state_dtype="bfloat16")
    with pytest.raises(TypeError, match="same dtype"):
        opt.step_rows([(np.array([0]), np.ones((1, 2), np.float32))])
    assert (p == 1).all()


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize(("name", "kwargs"), ROW_CASES, ids=IDS)
def test_low_precision_rows_are_float32_rows_rounded(
    name: str, kwargs: dict[str, Any], dtype: Any
) -> None:
    """A bfloat16/float16 parameter (float32 state, the default) takes row updates computed in
    float32: each step equals, bit for bit, the float32 row update of the widened parameter
    (the gradient rows widened, duplicates summed in float32) rounded to nearest, with the same
    float32 state; absent rows are not rewritten."""
    rng = np.random.default_rng(11)
    p = rng.standard_normal(SHAPE).astype(dtype)
    low = getattr(fo, name)([p], **kwargs)
    p32 = p.astype(np.float32)
    wide = getattr(fo, name)([p32], **kwargs)
    untouched = p[SHAPE[0] // 2 :].copy()
    for _ in range(3):
        idx, rows = row_grads(rng, dtype)
        low.step_rows([(idx, rows)])
        wide.step_rows([(idx, rows.astype(np.float32))])
        np.testing.assert_array_equal(p.view(np.uint16), p32.astype(dtype).view(np.uint16))
        for n, v in wide.state[0].items():
            got = low.state[0][n]
            assert np.asarray(got).dtype == np.asarray(v).dtype, n
            np.testing.assert_array_equal(np.asarray(got), np.asarray(v), err_msg=n)
        p32[...] = p.astype(np.float32)  # (the next step from the rounded values)
    np.testing.assert_array_equal(p[SHAPE[0] // 2 :].view(np.uint16), untouched.view(np.uint16))


def test_low_precision_rows_refuse_stochastic_rounding_and_16_bit_state() -> None:
    """What a row update of a bfloat16 parameter cannot do, refused naming it, nothing changed:
    stochastic rounding (its random bits are keyed on the element's place in the dense
    pass), bfloat16 state."""
    for options in (dict(rounding="stochastic"), dict(state_dtype="bfloat16")):
        p = np.ones((4, 2), ml_dtypes.bfloat16)
        opt = fo.SparseAdam([p], **options)
        with pytest.raises(TypeError, match=r"step_rows: param 0: row updates take .*bfloat16"):
            opt.step_rows([(np.array([0]), np.ones((1, 2), ml_dtypes.bfloat16))])
        assert (p == 1).all() and opt.state[0]["step"] == 0


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_kernel_refusals_name_the_call(dtype: Any) -> None:
    """The row kernel's own checks (a read-only parameter; float32 rows that are a view of it:
    a 16-bit parameter's rows are read into float32 copies first) are refused in step_rows'
    words, as the Python checks are; nothing changed."""
    p = np.ones((8, 3), dtype)
    opt = fo.SparseAdam({"emb": p}, lr=0.1)
    p.flags.writeable = False
    with pytest.raises(ValueError, match=r"^SparseAdam\.step_rows: param 'emb': array is read"):
        opt.step_rows({"emb": (np.array([0]), np.ones((1, 3), dtype))})
    p.flags.writeable = True
    if dtype is np.float32:
        with pytest.raises(ValueError, match=r"^SparseAdam\.step_rows: rows for param 'emb' sh"):
            opt.step_rows({"emb": (np.arange(2), p[4:6])})
    assert (p == 1).all() and opt.state["emb"]["step"] == 0


def test_low_precision_rows_check_the_arrays_before_writing() -> None:
    """The row kernel is given float32 copies of a bfloat16 parameter's rows: the arrays
    themselves are checked first, as the kernel checks a float32 parameter's (a read-only
    state was found only when the rows were written back, the parameter's rows already
    written; a state of another shape, or one state given twice, was taken)."""
    t = np.ones((6, 2), ml_dtypes.bfloat16)
    rows = np.ones((1, 2), ml_dtypes.bfloat16)
    m, v = np.zeros((6, 2), np.float32), np.zeros((6, 2), np.float32)
    read_only = v.copy()
    read_only.flags.writeable = False
    cases = [
        ({"exp_avg": m, "exp_avg_sq": read_only}, "state 'exp_avg_sq' of param: array is read"),
        ({"exp_avg": m, "exp_avg_sq": np.zeros((12, 2), np.float32)}, r"shape \(12, 2\)"),
        ({"exp_avg": m, "exp_avg_sq": m}, "state 'exp_avg_sq' of param shares memory"),
        ({"exp_avg": m, "exp_avg_sq": np.zeros((6, 4), np.float32)[:, ::2]}, "C-contiguous"),
        ({"exp_avg": m.astype(ml_dtypes.bfloat16), "exp_avg_sq": v}, "keep float32 state"),
    ]
    for states, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            F.sparse_rows_("SparseAdam", t, [1], rows, states, step=1)
        assert (t == 1).all() and not m.any() and not v.any(), match


def _rows_job(
    hyper: Any, param: np.ndarray, index: list[int], states: list[np.ndarray], label: str
) -> tuple[Any, ...]:
    rows = np.ones((len(index), *param.shape[1:]), param.dtype)
    return (hyper, 1, param, np.array(index, np.int64), rows, states, label)


@pytest.mark.parametrize("bad", ["overlap", "out of range", "order", "dtype", "state count"])
def test_binding_rows_all_or_nothing(bad: str) -> None:
    """_core.rows_<name> takes every parameter's job of a step and checks them all (dtypes,
    shapes, indices' range and order, memory shared between any two arrays of any jobs) before
    it writes any: a bad second job leaves the first untouched, and the error names its
    parameter."""
    from fastoptim import _core

    hyper = _core.SparseAdamHyper()
    a, ma, va = (np.full((4, 2), 0.5) for _ in range(3))
    b, mb, vb = (np.full((4, 2), 0.5) for _ in range(3))
    index, b_states = [1], [mb, vb]
    if bad == "overlap":
        b_states = [va, vb]  # b's exp_avg is a's exp_avg_sq
    elif bad == "out of range":
        index = [4]
    elif bad == "order":
        index = [2, 1]
    elif bad == "dtype":
        b_states = [mb.astype(np.float32), vb]
    else:
        b_states = [mb]
    jobs = [
        _rows_job(hyper, a, [0, 2], [ma, va], "first"),
        _rows_job(hyper, b, index, b_states, "second"),
    ]
    with pytest.raises((ValueError, TypeError, IndexError), match="param second"):
        _core.rows_sparseadam(jobs)
    for arr in (a, ma, va, b, mb, vb):
        assert (arr == 0.5).all()
    ran: list[bool] = []
    _core.rows_sparseadam(jobs[:1], ran)  # the good job alone runs, and says so
    assert ran == [True] and (a[[0, 2]] != 0.5).all() and (a[[1, 3]] == 0.5).all()


def _interrupt_after_each_call(monkeypatch: Any, name: str) -> list[int]:
    """Replace _core.rows_<name> by a wrapper that runs it and then raises KeyboardInterrupt,
    as a Ctrl-C that arrives while the compiled call runs surfaces when it returns."""
    from fastoptim import _core

    real, calls = getattr(_core, name), []

    def interrupted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(_core, name, interrupted)
    return calls


def test_interrupted_rows_step_is_never_half_applied(monkeypatch: Any) -> None:
    """An interrupt that surfaces after a compiled row call: the step is whole (every
    parameter's rows updated in the one call, the step counted) or absent, never half."""
    a, b = np.ones((4, 2)), np.ones((4, 2))
    want_a, want_b = a.copy(), b.copy()
    ref = reference.SparseAdam([want_a, want_b], lr=0.1)
    grads = [(np.array([0]), np.ones((1, 2))), (np.array([3]), np.ones((1, 2)))]
    ref.step_rows(grads)
    opt = fo.SparseAdam([a, b], lr=0.1)
    calls = _interrupt_after_each_call(monkeypatch, "rows_sparseadam")
    with pytest.raises(KeyboardInterrupt):
        opt.step_rows(grads)
    assert len(calls) == 1  # one call for every parameter of the step
    close(a, want_a, np.float64, "a")
    close(b, want_b, np.float64, "b")
    assert [s["step"] for s in opt.state.values()] == [1, 1]
    monkeypatch.undo()
    opt.step_rows(grads)  # and the next step is the second
    ref.step_rows(grads)
    close(a, want_a, np.float64, "a after 2")
    close(b, want_b, np.float64, "b after 2")


# --------------------------------------------------------------------------- fastoptim.torch
torch = pytest.importorskip("torch")
import fastoptim.torch as fot  # noqa: E402
from fastoptim.torch import _numpy_of  # noqa: E402


def _sparse(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...], hybrid: bool) -> Any:
    """A sparse COO gradient with duplicate indices: rows (hybrid, as nn.Embedding gives) or
    single elements."""
    k = 9
    if hybrid:
        idx = rng.integers(0, shape[0] // 2, size=(1, k))
        vals = rng.standard_normal((k, *shape[1:]))
    else:
        idx = np.stack([rng.integers(0, n, size=k) for n in shape])
        vals = rng.standard_normal(k)
    return torch.sparse_coo_tensor(
        torch.from_numpy(idx), torch.from_numpy(vals).to(dtype), shape, check_invariants=True
    )


# torch's optim_db: SparseAdam's inputs (default, lr, Tensor lr, maximize) and the sparse
# configurations of SGD and Adagrad (their metadata_for_sparse), plus maximize / lr_decay and
# SGD's momentum (torch's sparse momentum buffer: computed densely here)
TORCH_CASES: list[tuple[str, dict[str, Any]]] = [
    ("SparseAdam", {}),
    ("SparseAdam", {"lr": 0.01}),
    ("SparseAdam", {"lr": "tensor"}),
    ("SparseAdam", {"maximize": True}),
    ("SparseAdam", {"lr": 4e-2}),
    ("SGD", {"lr": 4.8e-3, "maximize": False, "momentum": 0, "nesterov": False, "weight_decay": 0}),
    ("SGD", {"lr": 0.1, "maximize": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "dampening": 0.3}),
    ("Adagrad", {"lr": 0.1, "weight_decay": 0, "lr_decay": 0}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("Adagrad", {"lr": 0.1, "maximize": True}),
]


def _kwargs(kwargs: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """A Tensor lr of the parameters' dtype: torch computes SparseAdam's step size in the lr
    tensor's dtype (float32 for optim_db's torch.tensor(0.001)), fastoptim in double."""
    return {
        k: (torch.tensor(0.001, dtype=dtype) if v == "tensor" else v) for k, v in kwargs.items()
    }


@every_dtype
@pytest.mark.parametrize(
    ("name", "kwargs"), TORCH_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TORCH_CASES)]
)
def test_torch_sparse_gradients_match_torch(name: str, kwargs: dict[str, Any], dtype: Any) -> None:
    """fastoptim.torch against torch.optim (for-loop path) with sparse COO gradients, 20 steps,
    an lr change halfway: a contiguous embedding table (row gradients), a transposed matrix
    and a 1-D vector (element gradients), and a dense parameter with a dense gradient where
    torch allows mixing (SGD, Adagrad)."""
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    rng = np.random.default_rng(5)
    shapes = [(30, 4), (6, 5), (11,)]
    p0 = [torch.from_numpy(rng.standard_normal(s)).to(tdtype) for s in shapes]
    p0[1] = p0[1].t().contiguous().t()  # (a transposed layout)
    ours = [p.clone().requires_grad_() for p in p0]
    theirs = [p.clone().requires_grad_() for p in p0]
    mixed = name != "SparseAdam"
    if mixed:
        ours.append(torch.ones(3, 3, dtype=tdtype, requires_grad=True))
        theirs.append(torch.ones(3, 3, dtype=tdtype, requires_grad=True))
    fast = getattr(fot, name)(ours, **_kwargs(kwargs, tdtype))
    loop = {} if name == "SparseAdam" else {"foreach": False}
    ref = getattr(torch.optim, name)(theirs, **loop, **_kwargs(kwargs, tdtype))
    for t in range(20):
        if t == 10:
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * 0.5
        grads = [_sparse(rng, tdtype, s, hybrid=(i == 0)) for i, s in enumerate(shapes)]
        if mixed:
            grads.append(torch.from_numpy(rng.standard_normal((3, 3))).to(tdtype))
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        fast.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            close(a.detach().numpy(), b.detach().numpy(), dtype, f"{name} step {t} param {i}")
            sa, sb = fast.state.get(a, {}), ref.state.get(b, {})
            assert set(sa) == set(sb), (sorted(sa), sorted(sb))
            for n, want in sb.items():
                got = sa[n]
                if n == "step":
                    assert float(got) == float(want)
                else:
                    assert got.dtype == want.dtype and got.shape == want.shape
                    if want.is_sparse:  # (torch's SGD keeps a sparse momentum buffer)
                        want = want.to_dense()
                    close(got.numpy(), want.numpy(), dtype, f"{name} step {t} {i} {n}")


def _torch_sqrt_is_correctly_rounded() -> bool:
    """Whether torch.sqrt of float32 is IEEE's (correctly rounded) on this machine: torch 2.13
    computes it through MKL's vector math, which on some CPUs (seen on an AMD EPYC VM, in both
    of torch's CPU capabilities) returns values one ulp off (75 of 432 in the test below)."""
    x = torch.rand(1 << 14, generator=torch.Generator().manual_seed(1)) * 1e-3
    return bool(np.array_equal(torch.sqrt(x).numpy(), np.sqrt(x.numpy())))


def test_torch_embedding_sparse_adam_bit_exact() -> None:
    """nn.Embedding(sparse=True) trained by fastoptim.torch.SparseAdam and by torch's: the
    row kernel computes torch's operations in torch's order (no fused multiply-add).  The
    first step against those operations in NumPy float32 (IEEE square root), bit for bit; ten
    steps against torch bit for bit where torch's square root is IEEE's, else within the few
    ulps its one-ulp-off square roots leave after ten steps."""
    torch.manual_seed(0)
    a = torch.nn.Embedding(100, 16, sparse=True)
    b = torch.nn.Embedding(100, 16, sparse=True)
    b.load_state_dict(a.state_dict())
    oa, ob = (
        fot.SparseAdam(a.parameters(), lr=0.01),
        torch.optim.SparseAdam(b.parameters(), lr=0.01),
    )
    for t in range(10):
        ids = torch.randint(0, 100, (32,))
        w0 = a.weight.detach().numpy().copy()
        for emb, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            emb(ids).square().sum().backward()
            if t == 0 and emb is a:
                grad = emb.weight.grad.coalesce()
            opt.step()
        if t == 0:  # torch's sparse_adam, step 1 (zero state), in float32 NumPy
            f = np.float32
            rows, g = grad.indices()[0].numpy(), grad.values().numpy()
            numer = (g - f(0)) * f(1 - 0.9) + f(0)
            denom = np.sqrt((g * g - f(0)) * f(1 - 0.999) + f(0)) + f(1e-8)
            step_size = 0.01 * np.sqrt(1 - 0.999) / (1 - 0.9)
            want = w0.copy()
            want[rows] = want[rows] + f(-step_size) * (numer / denom)
            assert np.array_equal(a.weight.detach().numpy(), want)
    sa, sb = oa.state[a.weight], ob.state[b.weight]
    assert float(sa["step"]) == sb["step"] == 10
    if _torch_sqrt_is_correctly_rounded():
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    else:
        np.testing.assert_allclose(
            a.weight.detach().numpy(), b.weight.detach().numpy(), rtol=4e-6, atol=1e-8
        )
        np.testing.assert_allclose(
            sa["exp_avg"].numpy(), sb["exp_avg"].numpy(), rtol=4e-6, atol=1e-9
        )


def test_torch_sparse_adam_state_dict_round_trip() -> None:
    """A torch.optim.SparseAdam checkpoint (its int step) continues in fastoptim.torch, and
    the reverse, as torch's own run."""
    torch.manual_seed(1)
    w = [torch.randn(20, 3) for _ in range(3)]
    opts = [torch.optim.SparseAdam, fot.SparseAdam, torch.optim.SparseAdam]
    params = [x.clone().requires_grad_() for x in w]
    grads = [
        torch.sparse_coo_tensor(torch.randint(0, 20, (1, 5)), torch.randn(5, 3), (20, 3))
        for _ in range(6)
    ]
    ref = params[0]
    r = torch.optim.SparseAdam([ref], lr=0.01)
    for g in grads:
        ref.grad = g.clone()
        r.step()
    for first, second in ((opts[0], opts[1]), (opts[1], opts[2])):
        p = w[0].clone().requires_grad_()
        o1 = first([p], lr=0.01)
        for g in grads[:3]:
            p.grad = g.clone()
            o1.step()
        o2 = second([p], lr=0.01)
        o2.load_state_dict(o1.state_dict())
        for g in grads[3:]:
            p.grad = g.clone()
            o2.step()
        close(p.detach().numpy(), ref.detach().numpy(), np.float32, f"{first} -> {second}")


def _one(opt_cls: Any, **kw: Any) -> tuple[Any, Any]:
    p = torch.ones(4, 2, requires_grad=True)
    return p, opt_cls([p], **kw)


def test_torch_refusals_as_torch() -> None:
    """fastoptim.torch raises where torch.optim does (RuntimeError for gradients, ValueError
    for SparseAdam's parameters), and changes nothing."""
    sp = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (4, 2))
    cases = [
        (fot.Adam, {}, sp, "Adam does not support sparse gradients"),
        (fot.RMSprop, {}, sp, "RMSprop does not support sparse gradients"),
        (fot.SparseAdam, {}, torch.ones(4, 2), "SparseAdam does not support dense gradients"),
        (fot.Adagrad, {"weight_decay": 0.1}, sp, "weight_decay option is not compatible"),
        (fot.SGD, {"weight_decay": 0.1, "lr": 0.1}, sp, "weight_decay"),
        (fot.SGD, {"fused": True, "lr": 0.1}, sp, "fused"),
        (fot.Adagrad, {"fused": True}, sp, "fused"),
    ]
    for cls, kw, g, match in cases:
        p, opt = _one(cls, **kw)
        theirs, ref = _one(getattr(torch.optim, cls.__name__), **kw)
        p.grad, theirs.grad = g.clone(), g.clone()
        with pytest.raises(RuntimeError):
            ref.step()  # (torch refuses it too)
        with pytest.raises(RuntimeError, match=match):
            opt.step()
        assert torch.equal(p, torch.ones(4, 2)), cls
    with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
        fot.SparseAdam([torch.zeros(3).to_sparse()])
    with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
        fot.SparseAdam([{"params": [torch.zeros(3).to_sparse()]}])
    with pytest.raises(ValueError, match="SparseAdam does not support complex parameters"):
        fot.SparseAdam([torch.zeros(2, 3, dtype=torch.complex64)])
    with pytest.raises(ValueError, match=r"beta parameter at index 0|betas"):
        fot.SparseAdam([torch.zeros(3)], lr=1e-2, betas=(1.0, 0.0))


def test_torch_sparse_grads_leave_a_bad_step_untouched() -> None:
    """A refused gradient in the second group (dense, for SparseAdam; a refused option for
    Adagrad): nothing is updated, no step counted."""
    sp = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (4, 2))
    a, b = torch.ones(4, 2), torch.ones(4, 2)
    opt = fot.SparseAdam([a])
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = sp.clone(), torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        opt.step()
    assert torch.equal(a, torch.ones(4, 2)) and torch.equal(b, torch.ones(4, 2))
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    c, d = torch.ones(4, 2), torch.ones(4, 2)
    ada = fot.Adagrad([c])
    ada.add_param_group({"params": [d], "weight_decay": 0.1})
    c.grad, d.grad = sp.clone(), sp.clone()
    with pytest.raises(RuntimeError, match="weight_decay"):
        ada.step()
    assert torch.equal(c, torch.ones(4, 2)) and torch.equal(d, torch.ones(4, 2))
    assert all(float(s["step"]) == 0 for s in ada.state.values())


def test_torch_rows_refused_by_the_binding_change_nothing() -> None:
    """A state that the Python checks accept but the compiled call refuses (the second
    parameter's exp_avg is the first's exp_avg_sq: shared memory): no parameter updated, no
    step counted."""
    sp = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (4, 2))
    a, b = torch.ones(4, 2), torch.ones(4, 2)
    opt = fot.SparseAdam([a, b])
    a.grad, b.grad = sp.clone(), sp.clone()
    opt.step()
    a0, b0 = a.clone(), b.clone()
    opt.state[b]["exp_avg"] = opt.state[a]["exp_avg_sq"]
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert [int(s["step"]) for s in opt.state.values()] == [1, 1]


def test_torch_interrupted_rows_step_is_never_half_applied(monkeypatch: Any) -> None:
    a, b = torch.ones(4, 2), torch.ones(4, 2)
    ra, rb = torch.ones(4, 2), torch.ones(4, 2)
    sp = torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.ones(2, 2), (4, 2))
    ref = torch.optim.SparseAdam([ra, rb], lr=0.1)
    ra.grad, rb.grad = sp.clone(), sp.clone()
    ref.step()
    opt = fot.SparseAdam([a, b], lr=0.1)
    a.grad, b.grad = sp.clone(), sp.clone()
    calls = _interrupt_after_each_call(monkeypatch, "rows_sparseadam")
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert len(calls) == 1
    torch.testing.assert_close(a, ra)
    torch.testing.assert_close(b, rb)
    assert [int(s["step"]) for s in opt.state.values()] == [1, 1]


def test_optim_db_options_are_covered() -> None:
    """TORCH_CASES holds every input of torch's optim_db for SparseAdam and the sparse
    configurations (metadata_for_sparse) of SGD, Adagrad and SparseAdam."""
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:  # pragma: no cover - torch's test modules not installed
        pytest.skip(f"torch's optim_db: {e}")

    def plain(kw: dict[str, Any]) -> dict[str, Any]:
        return {k: ("tensor" if hasattr(v, "item") else v) for k, v in kw.items()}

    ours = [(n, plain(k)) for n, k in TORCH_CASES]
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in ("SGD", "Adagrad", "SparseAdam"):
            continue
        wanted = [info.metadata_for_sparse[0]]
        if name == "SparseAdam":
            wanted += [inp.kwargs for inp in info.optim_inputs_func("cpu")]
        for kw in wanted:
            assert (name, plain(kw)) in ours, (name, kw)


def test_bench_rows_table(monkeypatch: Any) -> None:
    """``fastoptim bench --rows`` (a small table): every optimizer, every contender timed."""
    from fastoptim.apps import bench

    monkeypatch.setattr(bench, "ROWS_TABLE", 64)
    monkeypatch.setattr(bench, "ROWS_UPDATED", 16)
    rows = bench.run_rows(repeats=1, rounds=1, torch=True)
    assert [r.name for r in rows] == list(bench.ROWS_OPTIMIZERS)
    for r in rows:
        assert {"fastoptim", "stream", "NumPy reference", "torch for-loop"} <= set(r.times)
        assert all(t[0] > 0 for t in r.times.values())
    table = bench.format_rows(rows)
    assert table.splitlines()[0].startswith("16 rows x 64 float32 of a 64-row table")
    assert all(name in table for name in bench.ROWS_OPTIMIZERS)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "SparseAdam"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_sparse_gradients_of_low_precision_parameters(name: str, dtype: Any) -> None:
    """A bfloat16/float16 embedding with sparse gradients, which torch.optim steps (in the
    16-bit format's arithmetic): fastoptim.torch computes the rows in float32 with float32
    state (the default policy), as the NumPy tier's ``step_rows`` does (the same bits), and
    stays within a few units of the format of torch.optim over 5 steps."""
    rng = np.random.default_rng(2)
    w0 = torch.from_numpy(rng.standard_normal((12, 4))).to(dtype)
    ours, theirs = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    npw = _numpy_of(w0.clone()).copy()
    fast = getattr(fot, name)([ours], lr=0.05)
    ref = getattr(torch.optim, name)([theirs], lr=0.05)
    tier = getattr(fo, name)([npw], lr=0.05)
    for _ in range(5):
        g = _sparse(rng, dtype, (12, 4), hybrid=True)
        ours.grad, theirs.grad = g.clone(), g.clone()
        fast.step()
        ref.step()
        # (uncoalesced: both tiers sum the duplicates in float32; torch's coalesce of the
        # 16-bit gradient would round each partial sum to the format)
        tier.step_rows([(g._indices()[0].numpy(), _numpy_of(g._values().contiguous()))])
        np.testing.assert_array_equal(_numpy_of(ours.detach()).view(np.uint16), npw.view(np.uint16))
        ulp = float(torch.finfo(dtype).eps)
        torch.testing.assert_close(
            ours.detach().float(), theirs.detach().float(), rtol=4 * ulp, atol=4 * ulp
        )
    assert all(v.dtype == torch.float32 for v in fast.state[ours].values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_sparse_duplicates_of_low_precision_summed_in_float32(dtype: Any) -> None:
    """Duplicate indices of a bfloat16/float16 sparse gradient are summed in float32 (torch's
    coalesce of the 16-bit tensor rounds 1 + 3 * 2**-9 to 1 in bfloat16), as the NumPy tier
    sums them: the same step in both tiers."""
    w = torch.ones(4, 2, dtype=dtype, requires_grad=True)
    opt = fot.SGD([w], lr=1.0)
    twin = np.ones((4, 2), ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float16)
    idx = torch.tensor([[1, 1, 1, 1]])
    vals = torch.tensor([[1.0, 0.0]] + [[2.0**-9, 0.0]] * 3, dtype=dtype)
    w.grad = torch.sparse_coo_tensor(idx, vals, (4, 2))
    opt.step()
    fo.SGD([twin], lr=1.0).step_rows([(idx[0].numpy(), _numpy_of(vals))])
    want = np.float32(1.0) - (np.float32(1.0) + np.float32(3 * 2.0**-9))
    assert float(w.detach()[1, 0]) == float(np.array(want).astype(twin.dtype))
    np.testing.assert_array_equal(_numpy_of(w.detach()).view(np.uint16), twin.view(np.uint16))


def test_torch_sparse_gradients_refuse_what_rows_cannot_do() -> None:
    """A bfloat16 parameter with stochastic rounding or bfloat16 state and a sparse gradient:
    a TypeError naming the parameter, nothing changed."""
    for options in (dict(rounding="stochastic"), dict(state_dtype="bfloat16")):
        emb = torch.nn.Embedding(10, 4, sparse=True).to(torch.bfloat16)
        opt = fot.Adagrad(emb.parameters(), lr=0.1, **options)
        emb(torch.tensor([1, 3, 1])).sum().backward()
        before = emb.weight.detach().clone()
        state = {k: v.clone() for k, v in opt.state[emb.weight].items()}  # (Adagrad's: eager)
        with pytest.raises(TypeError, match=r"param 0 of group 0: sparse gradients: row upd"):
            opt.step()
        assert torch.equal(emb.weight.detach().view(torch.int16), before.view(torch.int16))
        assert opt.state[emb.weight].keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(opt.state[emb.weight][k], v), k


@pytest.mark.parametrize("nesterov", [False, True])
def test_torch_sgd_checkpoint_of_sparse_training_resumes(nesterov: bool) -> None:
    """torch.optim.SGD with momentum keeps a sparse gradient's momentum buffer sparse (COO);
    its checkpoint loads into fastoptim.torch.SGD (the buffer made dense: the same values;
    it was refused as a sparse state) and the run goes on as torch's uninterrupted one."""
    rng = np.random.default_rng(8)
    w0 = torch.from_numpy(rng.standard_normal((10, 3)))
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, dampening=0.0)
    theirs = w0.clone().requires_grad_()
    ref = torch.optim.SGD([theirs], **kw)
    grads = [_sparse(rng, torch.float64, (10, 3), hybrid=True) for _ in range(6)]
    ours = None
    opt = None
    for t, g in enumerate(grads):
        if t == 3:
            saved = ref.state_dict()
            assert saved["state"][0]["momentum_buffer"].layout == torch.sparse_coo
            ours = theirs.detach().clone().requires_grad_()
            opt = fot.SGD([ours], **kw)
            opt.load_state_dict(saved)
            assert opt.state[ours]["momentum_buffer"].layout == torch.strided
        theirs.grad = g.clone()
        ref.step()
        if opt is not None and ours is not None:
            ours.grad = g.clone()
            opt.step()
            close(ours.detach().numpy(), theirs.detach().numpy(), np.float64, f"step {t}")


def test_torch_lbfgs_takes_sparse_gradients_as_torch() -> None:
    """torch.optim.LBFGS gathers a sparse COO gradient densely (nn.Embedding(sparse=True));
    fastoptim.torch.LBFGS did refuse it: now the same steps."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    twin = torch.nn.Embedding(10, 3, sparse=True).double()
    twin.load_state_dict(emb.state_dict())
    idx, target = torch.tensor([1, 4, 4, 7]), torch.linspace(-1, 1, 12).double().reshape(4, 3)
    opts = [
        (m, cls([m.weight], lr=0.5, max_iter=5))
        for m, cls in ((emb, fot.LBFGS), (twin, torch.optim.LBFGS))
    ]
    for _ in range(3):
        for m, o in opts:

            def closure(m: Any = m, o: Any = o) -> Any:
                o.zero_grad()
                loss = ((m(idx) - target) ** 2).sum()
                loss.backward()
                assert m.weight.grad is not None and m.weight.grad.is_sparse
                return loss

            o.step(closure)
        close(emb.weight.detach().numpy(), twin.weight.detach().numpy(), np.float64, "LBFGS")


def test_torch_sparse_index_out_of_range_refused_on_the_dense_path() -> None:
    """SGD with momentum computes a sparse gradient densely: an index out of range (a sparse
    tensor built without its invariants checked) was written outside the buffer (a crash);
    refused naming it, as on the row path, nothing changed."""
    p = torch.ones(10, 3, requires_grad=True)
    opt = fot.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.sparse_coo_tensor(
        torch.tensor([[100000]]), torch.ones(1, 3), (10, 3), check_invariants=False
    )
    with pytest.raises(IndexError, match=r"index 100000 is out of range for dimension 0"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(10, 3)) and len(opt.state) == 0
