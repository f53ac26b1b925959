"""fastoptim.functional: each single-step function is bit-identical to its optimizer class
over several steps, validates everything before touching an array, and rejects missing or
unused state arrays with a clear message."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from cases import CASES as TABLE
from fastoptim import definitions
from fastoptim import functional as F
from fastoptim.definitions import ADAM

# (id, class, class kwargs, functional, functional-only kwargs).  Options chosen so that every
# state buffer and every branch of the variants is exercised.
CASES: list[tuple[str, Any, dict[str, Any], Callable[..., Any]]] = [
    ("sgd", fo.SGD, dict(lr=0.1), F.sgd_),
    ("sgd-wd-max", fo.SGD, dict(lr=0.1, weight_decay=0.1, maximize=True), F.sgd_),
    ("sgd-momentum", fo.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01), F.sgd_),
    ("sgd-nesterov", fo.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), F.sgd_),
    ("adagrad", fo.Adagrad, dict(lr=0.1), F.adagrad_),
    (
        "adagrad-all",
        fo.Adagrad,
        dict(
            lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.3, maximize=True
        ),
        F.adagrad_,
    ),
    ("rmsprop", fo.RMSprop, dict(lr=0.01), F.rmsprop_),
    ("rmsprop-centered", fo.RMSprop, dict(lr=0.01, centered=True), F.rmsprop_),
    ("rmsprop-momentum", fo.RMSprop, dict(lr=0.01, momentum=0.9, weight_decay=0.01), F.rmsprop_),
    (
        "rmsprop-centered-momentum",
        fo.RMSprop,
        dict(lr=0.01, momentum=0.9, centered=True, maximize=True),
        F.rmsprop_,
    ),
    ("adadelta", fo.Adadelta, dict(lr=0.5, rho=0.8, weight_decay=0.01), F.adadelta_),
    ("adam", fo.Adam, dict(lr=0.01), F.adam_),
    ("adam-amsgrad-wd", fo.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1), F.adam_),
    (
        "adam-decoupled-max",
        fo.Adam,
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        F.adam_,
    ),
    ("adamw", fo.AdamW, dict(lr=0.01), F.adamw_),
    ("adamw-amsgrad", fo.AdamW, dict(lr=0.01, amsgrad=True, weight_decay=0.2), F.adamw_),
    ("adamax", fo.Adamax, dict(lr=0.01, weight_decay=0.01), F.adamax_),
    ("nadam", fo.NAdam, dict(lr=0.01), F.nadam_),
    (
        "nadam-decoupled",
        fo.NAdam,
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=0.01),
        F.nadam_,
    ),
    ("radam", fo.RAdam, dict(lr=0.01, betas=(0.9, 0.99)), F.radam_),
    (
        "radam-decoupled",
        fo.RAdam,
        dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, decoupled_weight_decay=True),
        F.radam_,
    ),
    ("lion", fo.Lion, dict(lr=0.01, weight_decay=0.1), F.lion_),
    ("lion-max", fo.Lion, dict(lr=0.01, betas=(0.5, 0.9), maximize=True), F.lion_),
]
# Every other optimizer: its rows of the shared table.
CASES += [
    (c.id.lower(), getattr(fo, c.opt), c.kwargs, getattr(F, c.opt.lower() + "_"))
    for c in TABLE
    if getattr(fo, c.opt) not in {row[1] for row in CASES}
]

STEPS = 8  # RAdam's rectification starts at step 6 with beta2 = 0.99 / 0.9


def _bytes(a: np.ndarray) -> bytes:
    return a.tobytes()


def _class_only(cls: Any) -> set[str]:
    """Hyper-parameters the functional tier does not take: they only set a state's initial
    value (Adagrad's initial_accumulator_value, Rprop's lr) or are arrays there
    (state_dtype, master_weights, kahan: the caller passes the arrays)."""
    return {h.name for h in cls._definition.options if not h.functional}


def _functional_kwargs(cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _class_only(cls)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("cls", "kwargs", "fn"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bit_identical_to_class(
    cls: Any, kwargs: dict[str, Any], fn: Callable[..., Any], dtype: Any
) -> None:
    rng = np.random.default_rng(0)
    shape = (7, 5)
    p_cls = rng.standard_normal(shape).astype(dtype)
    p_fn, p_start = p_cls.copy(), p_cls.copy()
    opt = cls([p_cls], **kwargs)
    # The functional caller keeps state itself, initialised as the class initialises its own.
    states = {k: v.copy() for k, v in opt.state[0].items() if k != "step"}
    hyper = _functional_kwargs(cls, kwargs)
    # The scalar state (NAdam's mu_product, ASGD's eta and mu), started as the class does.
    d = cls._definition
    scalars = {n: d.scalar_fill(n, {**d.defaults(), **kwargs}) for n, _ in d.scalars}
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(shape).astype(dtype)
        g[0, 0] = 0.0  # sign(0), max with 0...
        opt.step([g])
        if scalars:
            out = fn(p_fn, g, **states, step=t, **scalars, **hyper)
            scalars = dict(zip(scalars, out if isinstance(out, tuple) else (out,)))
            for n, v in scalars.items():
                assert isinstance(v, float)
                assert v == getattr(opt._groups[0].hyper, n), n
        else:
            assert fn(p_fn, g, **states, step=t, **hyper) is None
        assert _bytes(p_fn) == _bytes(p_cls), f"param differs at step {t}"
        for name, arr in states.items():
            assert _bytes(arr) == _bytes(opt.state[0][name]), f"{name} differs at step {t}"
    assert not np.array_equal(p_fn, p_start)  # sanity: the steps did something


def test_nadam_mu_product_sequence() -> None:
    """mu_product returned after each step is the class's running product, and starting from
    it at a later step continues the same sequence."""
    p = np.ones(4)
    opt = fo.NAdam([p.copy()], momentum_decay=0.01)
    m, v = np.zeros(4), np.zeros(4)
    mu = 1.0
    expected = 1.0
    for t in range(1, 6):
        g = np.full(4, 0.5)
        opt.step([g])
        mu = F.nadam_(p, g, m, v, step=t, mu_product=mu, momentum_decay=0.01)
        beta1 = 0.9
        expected *= beta1 * (1.0 - 0.5 * 0.96 ** (t * 0.01))
        assert mu == opt._groups[0].hyper.mu_product
        assert mu == pytest.approx(expected, rel=1e-14)
        assert isinstance(mu, float)


def test_asgd_eta_mu_sequence() -> None:
    """asgd_ returns torch's eta and mu for the next step: lr / (1 + lambd lr t)^alpha and
    1 / max(1, t - t0); eta follows a new lr one call later, as in the class and in torch."""
    p, ax = np.ones(4), np.zeros(4)
    lr, lambd, alpha, t0 = 0.1, 0.5, 0.75, 2.0
    eta, mu = lr, 1.0
    for t in range(1, 7):
        if t == 4:
            lr = 0.05
        before = p.copy()
        g = np.full(4, 0.5)
        new = F.asgd_(p, g, ax, step=t, eta=eta, mu=mu, lr=lr, lambd=lambd, alpha=alpha, t0=t0)
        np.testing.assert_array_equal(p, before * (1 - lambd * eta) - eta * g)
        assert new == (lr / (1 + lambd * lr * t) ** alpha, 1 / max(1, t - t0))
        eta, mu = new


def test_defaults_match_classes() -> None:
    """Every hyper-parameter of a class exists in its functional with the same default."""
    pairs = {c[1]: c[3] for c in CASES}
    assert {c.__name__ for c in pairs} == {d.name for d in definitions.ALL}
    for cls, fn in pairs.items():
        cls_params = inspect.signature(cls.__init__).parameters
        fn_params = inspect.signature(fn).parameters
        for name, par in cls_params.items():
            if name in ("self", "params") or name in _class_only(cls):
                assert name not in fn_params, f"{fn.__name__} takes {name}"
                continue
            assert name in fn_params, f"{fn.__name__} lacks {name}"
            assert fn_params[name].default == par.default, f"{fn.__name__}: default of {name}"
            assert fn_params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert fn_params["step"].default is inspect.Parameter.empty
        assert fn.__doc__ and cls.__name__ in fn.__doc__


def test_sgd_first_step_sets_buffer() -> None:
    """At step=1 the momentum buffer is set to the gradient whatever it holds (torch)."""
    p = np.zeros(3, np.float32)
    g = np.array([1.0, -2.0, 3.0], np.float32)
    buf = np.full(3, 123.0, np.float32)
    F.sgd_(p, g, buf, step=1, lr=0.5, momentum=0.9, dampening=0.5)
    np.testing.assert_array_equal(buf, g)
    np.testing.assert_array_equal(p, -0.5 * g)
    F.sgd_(p, g, buf, step=2, lr=0.5, momentum=0.9, dampening=0.5)
    np.testing.assert_array_equal(buf, np.float32(0.9) * g + np.float32(0.5) * g)


# ---------------------------------------------------------------------------- rejections
# Wrongly typed arguments (typed Any so that the type checker lets the tests pass them).
ANY_INT: Any = 1
ANY_FLOAT: Any = 1.0
ANY_STR: Any = "1"


def _arrays(n: int, dtype: Any = np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal(6).astype(dtype) for _ in range(n)]


def _unchanged(before: list[bytes], arrays: list[np.ndarray]) -> None:
    assert [a.tobytes() for a in arrays] == before


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        # a needed state array is missing
        (lambda p, g, a, b, c: F.sgd_(p, g, step=1, momentum=0.9), ValueError, ["momentum_buffer"]),
        (
            lambda p, g, a, b, c: F.rmsprop_(p, g, a, step=1, centered=True),
            ValueError,
            ["grad_avg"],
        ),
        (
            lambda p, g, a, b, c: F.rmsprop_(p, g, a, step=1, momentum=0.5),
            ValueError,
            ["momentum_buffer"],
        ),
        (
            lambda p, g, a, b, c: F.rmsprop_(p, g, a, b, step=1, momentum=0.5, centered=True),
            ValueError,
            ["momentum_buffer"],
        ),
        (
            lambda p, g, a, b, c: F.adam_(p, g, a, b, step=1, amsgrad=True),
            ValueError,
            ["max_exp_avg_sq"],
        ),
        (
            lambda p, g, a, b, c: F.adamw_(p, g, a, b, step=1, amsgrad=True),
            ValueError,
            ["max_exp_avg_sq"],
        ),
        # a state array the options do not use (it would silently not be updated)
        (lambda p, g, a, b, c: F.sgd_(p, g, a, step=1), ValueError, ["momentum_buffer"]),
        (
            lambda p, g, a, b, c: F.rmsprop_(p, g, a, b, step=1),
            ValueError,
            ["grad_avg"],
        ),
        (
            lambda p, g, a, b, c: F.adam_(p, g, a, b, step=1, max_exp_avg_sq=c),
            ValueError,
            ["max_exp_avg_sq"],
        ),
        # invalid hyper-parameters (the classes' own checks)
        (lambda p, g, a, b, c: F.adam_(p, g, a, b, step=1, lr=-1.0), ValueError, ["lr"]),
        (lambda p, g, a, b, c: F.adam_(p, g, a, b, step=1, eps=-1.0), ValueError, ["eps"]),
        (
            lambda p, g, a, b, c: F.adamw_(p, g, a, b, step=1, betas=(1.0, 0.9)),
            ValueError,
            ["betas[0]"],
        ),
        (
            lambda p, g, a, b, c: F.lion_(p, g, a, step=1, betas=(0.9, 1.5)),
            ValueError,
            ["betas[1]"],
        ),
        (
            lambda p, g, a, b, c: F.sgd_(p, g, step=1, lr=0.1, nesterov=True),
            ValueError,
            ["nesterov"],
        ),
        (lambda p, g, a, b, c: F.adagrad_(p, g, a, step=1, lr_decay=-1), ValueError, ["lr_decay"]),
        (lambda p, g, a, b, c: F.adadelta_(p, g, a, b, step=1, rho=2.0), ValueError, ["rho"]),
        (
            lambda p, g, a, b, c: F.adamax_(p, g, a, b, step=1, maximize=ANY_INT),
            TypeError,
            ["maximize"],
        ),
        (lambda p, g, a, b, c: F.radam_(p, g, a, b, step=1, lr=float("nan")), ValueError, ["lr"]),
        # the step number
        (lambda p, g, a, b, c: F.adam_(p, g, a, b, step=0), ValueError, ["step"]),
        (lambda p, g, a, b, c: F.adam_(p, g, a, b, step=-3), ValueError, ["step"]),
        (lambda p, g, a, b, c: F.adam_(p, g, a, b, step=ANY_FLOAT), TypeError, ["step"]),
        (lambda p, g, a, b, c: F.adam_(p, g, a, b, step=True), TypeError, ["step"]),
        # NAdam's running product
        (
            lambda p, g, a, b, c: F.nadam_(p, g, a, b, step=1, mu_product=1.5),
            ValueError,
            ["mu_product"],
        ),
        (
            lambda p, g, a, b, c: F.nadam_(p, g, a, b, step=1, mu_product=float("nan")),
            ValueError,
            ["mu_product"],
        ),
        (
            lambda p, g, a, b, c: F.nadam_(p, g, a, b, step=1, mu_product=ANY_STR),
            TypeError,
            ["mu_product"],
        ),
        # ASGD's eta (>= 0) and mu (in [0, 1])
        (lambda p, g, a, b, c: F.asgd_(p, g, a, step=1, eta=-0.1, mu=1.0), ValueError, ["eta"]),
        (lambda p, g, a, b, c: F.asgd_(p, g, a, step=1, eta=0.1, mu=2.0), ValueError, ["mu"]),
        (
            lambda p, g, a, b, c: F.asgd_(p, g, a, step=1, eta=float("inf"), mu=1.0),
            ValueError,
            ["eta"],
        ),
        (lambda p, g, a, b, c: F.asgd_(p, g, a, step=1, eta=0.1, mu=ANY_STR), TypeError, ["mu"]),
        # arrays
        (lambda p, g, a, b, c: F.adam_(p, g.astype(np.float64), a, b, step=1), TypeError, ["grad"]),
        (lambda p, g, a, b, c: F.adam_(p, g[:3], a, b, step=1), ValueError, ["grad", "shape"]),
        (
            lambda p, g, a, b, c: F.adam_(p, g, a.astype(np.float64), b, step=1),
            TypeError,
            ["exp_avg"],
        ),
        (lambda p, g, a, b, c: F.adam_(p, g, a, a, step=1), ValueError, ["shares memory"]),
        (lambda p, g, a, b, c: F.adam_(p, g, a, p, step=1), ValueError, ["shares memory"]),
        (lambda p, g, a, b, c: F.adam_(p, p, a, b, step=1), ValueError, ["grad", "shares memory"]),
        (lambda p, g, a, b, c: F.adam_(p, a, a, b, step=1), ValueError, ["grad", "shares memory"]),
        (
            lambda p, g, a, b, c: F.adam_(p[::2], g[:3], a[:3], b[:3], step=1),
            ValueError,
            ["contiguous"],
        ),
        (
            lambda p, g, a, b, c: F.adam_(p, g, a, b.astype(">f4"), step=1),
            TypeError,
            ["exp_avg_sq", "byte order"],
        ),
        (
            lambda p, g, a, b, c: F.adam_(p, g.tolist(), a, b, step=1),
            TypeError,
            ["grad", "ndarray"],
        ),
    ],
)
def test_rejections_change_nothing(
    call: Callable[..., Any], exc: type[Exception], words: list[str]
) -> None:
    p, g, a, b, c = arrays = _arrays(5)
    before = [x.tobytes() for x in arrays]
    with pytest.raises(exc) as info:
        call(p, g, a, b, c)
    for w in words:
        assert w in str(info.value), str(info.value)
    _unchanged(before, arrays)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"lr": -0.1}, ValueError, r"invalid lr=-0\.1: must be finite"),
        ({"betas": (1.5, 0.9)}, ValueError, r"invalid betas\[0\]=1\.5"),
        ({"amsgrad": "yes"}, TypeError, "amsgrad must be a bool"),
        ({"rounding": "up"}, ValueError, "rounding must be 'nearest' or 'stochastic'"),
    ],
)
def test_hyper_parameter_errors_name_the_function(
    kw: dict[str, Any], exc: type[Exception], match: str
) -> None:
    """A function's invalid hyper-parameter is refused in the function's name, as its other
    refusals are ("adam_: invalid lr=-0.1", not the class's "Adam: ..."), changing nothing."""
    p, g, a, b, _ = arrays = _arrays(5)
    before = [x.tobytes() for x in arrays]
    with pytest.raises(exc, match="^adam_: " + match):
        F.adam_(p, g, a, b, step=1, **kw)
    _unchanged(before, arrays)


def test_read_only_param_rejected() -> None:
    p, g, a = _arrays(3)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        F.lion_(p, g, a, step=1)
    b = a.copy()
    b.flags.writeable = False
    with pytest.raises(ValueError, match=r"exp_avg.*read-only"):
        F.lion_(a, g, b, step=1)


def test_missing_state_message_names_options() -> None:
    p, g, a = _arrays(3)
    with pytest.raises(ValueError) as info:
        F.rmsprop_(p, g, a, step=1, centered=True, momentum=0.9)
    msg = str(info.value)
    assert msg.startswith("rmsprop_:")
    assert "grad_avg" in msg and "momentum_buffer" in msg and "centered=True" in msg


def test_state_names_checked_against_kernel() -> None:
    """The generic helper matches state arrays to the kernel's names: a misspelt or extra
    name is rejected, and arrays are bound by name (not position)."""
    p, g, m, v = _arrays(4)
    hyper = dict(
        lr=0.1,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=False,
    )
    before = [x.tobytes() for x in (p, g, m, v)]
    with pytest.raises(
        ValueError, match=r"needs state array.*exp_avg_sq.*does not use.*exp_avq_sq"
    ):
        F._step(ADAM, p, g, {"exp_avg": m, "exp_avq_sq": v}, 1, hyper)
    with pytest.raises(ValueError, match=r"does not use state array.*sum"):
        F._step(ADAM, p, g, {"exp_avg": m, "exp_avg_sq": v, "sum": g}, 1, hyper)
    _unchanged(before, [p, g, m, v])
    # Names given in another order still land in the right buffers.
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    F._step(ADAM, p, g, {"exp_avg_sq": v, "exp_avg": m}, 1, hyper)
    F.adam_(p2, g, m2, v2, step=1, lr=0.1)
    assert p.tobytes() == p2.tobytes() and m.tobytes() == m2.tobytes()
    assert v.tobytes() == v2.tobytes()


def test_torch_tensor_rejected() -> None:
    torch = pytest.importorskip("torch")
    p, g, a = _arrays(3)
    with pytest.raises(TypeError, match=r"tensor\.numpy\(\)"):
        F.lion_(p, torch.from_numpy(g.copy()), a, step=1)


def test_zero_dim_and_empty() -> None:
    p0, g0, m0, v0 = (np.array(x, np.float64) for x in (0.5, 0.25, 0.0, 0.0))
    p1, g1, m1, v1 = (np.array([x]) for x in (0.5, 0.25, 0.0, 0.0))
    for t in (1, 2, 3):
        F.adam_(p0, g0, m0, v0, step=t, lr=0.1)
        F.adam_(p1, g1, m1, v1, step=t, lr=0.1)
    assert p0.shape == () and p0 != 0.5 and p0.tobytes() == p1.tobytes()
    e = [np.zeros((0, 3), np.float32) for _ in range(3)]
    F.lion_(e[0], e[1], e[2], step=1)


def test_ema_dtype_follows_state_dtype() -> None:
    """The ema array is checked against the precision policy as the states are (a bfloat16
    EMA had been kept at bfloat16 where the class keeps float32: 0.02 apart after 200 steps)."""
    bf16 = np.dtype(ml_dtypes.bfloat16)
    p = np.ones(8, bf16)
    m, v = np.zeros(8, np.float32), np.zeros(8, np.float32)
    before = p.copy()
    with pytest.raises(TypeError, match="adamw_: ema is bfloat16; state_dtype=None keeps the "
                       "average as float32 for a bfloat16 parameter"):  # fmt: skip
        F.adamw_(p, np.ones(8, bf16), m, v, step=1, ema=p.copy(), ema_decay=0.9)
    with pytest.raises(TypeError, match="ema is float32; state_dtype='bfloat16' keeps"):
        F.adamw_(p, np.ones(8, bf16), m.astype(bf16), v.astype(bf16), step=1,
                 ema=p.astype(np.float32), ema_decay=0.9, state_dtype="bfloat16")  # fmt: skip
    np.testing.assert_array_equal(p.view(np.uint16), before.view(np.uint16))
    assert not m.any() and not v.any()
    ema = p.astype(np.float32)
    F.adamw_(p, np.ones(8, bf16), m, v, step=1, lr=0.1, ema=ema, ema_decay=0.9)  # right
    assert np.all(p != before)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_sparse_rows_refuses_a_state_dtype_it_does_not_keep(state_dtype: str) -> None:
    """As the class tier's step_rows: row updates keep state in the parameter's dtype (the
    option had been ignored)."""
    table = np.ones((5, 3), np.float32)
    m, v = np.zeros((5, 3), np.float32), np.zeros((5, 3), np.float32)
    with pytest.raises(TypeError, match=f"parameter float32, state {state_dtype}, {state_dtype}"):
        F.sparse_rows_(
            "SparseAdam",
            table,
            np.array([1]),
            np.ones((1, 3), np.float32),
            {"exp_avg": m, "exp_avg_sq": v},
            step=1,
            state_dtype=state_dtype,
        )
    assert np.all(table == 1) and not m.any() and not v.any()


def test_sparse_rows_of_a_bfloat16_table_same_bits_as_the_class() -> None:
    """``sparse_rows_`` on a bfloat16 table with float32 state: the rows computed in float32
    and rounded back, the same bits as the class tier's ``step_rows`` (duplicates included)."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((6, 4)).astype(ml_dtypes.bfloat16)
    twin, first = table.copy(), table.copy()
    m, v = np.zeros((6, 4), np.float32), np.zeros((6, 4), np.float32)
    opt = fo.SparseAdam([twin], lr=0.05)
    for step in (1, 2, 3):
        idx = np.array([4, 1, 4, 0])
        rows = rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16)
        states = {"exp_avg": m, "exp_avg_sq": v}
        F.sparse_rows_("SparseAdam", table, idx, rows, states, step=step, lr=0.05)
        opt.step_rows([(idx, rows)])
        np.testing.assert_array_equal(table.view(np.uint16), twin.view(np.uint16))
        np.testing.assert_array_equal(m, opt.state[0]["exp_avg"])
        np.testing.assert_array_equal(v, opt.state[0]["exp_avg_sq"])
    absent = [2, 3, 5]
    np.testing.assert_array_equal(table[absent].view(np.uint16), first[absent].view(np.uint16))
    assert not np.array_equal(table[[0, 1, 4]].view(np.uint16), first[[0, 1, 4]].view(np.uint16))


def test_refusals_of_the_host_and_row_functions_name_them() -> None:
    """adafactor_'s aliasing check and sparse_rows_'s hyper-parameter and array checks in the
    function's words (were ``row_var shares memory ...``, ``SparseAdam: invalid lr``, ``state
    1 of param param: ...``), naming the state; nothing changed."""
    p, g = np.zeros((8, 6), np.float32), np.ones((8, 6), np.float32)
    row_var = p.reshape(-1)[:8].reshape(8, 1)  # (aliases the parameter)
    with pytest.raises(ValueError, match=r"^adafactor_: row_var shares memory with param"):
        F.adafactor_(p, g, row_var=row_var, col_var=np.zeros((1, 6), np.float32), step=1)
    assert not p.any()
    t, m, v = (np.zeros((6, 3), np.float32) for _ in range(3))
    rows = np.ones((1, 3), np.float32)
    cases: list[tuple[dict[str, Any], dict[str, Any], type[Exception], str]] = [
        ({"exp_avg": m, "exp_avg_sq": v}, {"lr": -1.0}, ValueError, r"invalid lr=-1\.0"),
        ({"exp_avg": m, "exp_avg_sq": v.astype(np.float64)}, {}, TypeError,
         r"state 'exp_avg_sq' of param: dtype float64"),
        ({"exp_avg": m, "exp_avg_sq": m}, {}, ValueError,
         r"state 'exp_avg_sq' of param shares memory with state 'exp_avg' of param"),
    ]  # fmt: skip
    for states, hyper, exc, match in cases:
        with pytest.raises(exc, match=r"^sparse_rows_: " + match):
            F.sparse_rows_("SparseAdam", t, [1], rows, states, step=1, **hyper)
        assert not t.any() and not m.any() and not v.any()
    t.flags.writeable = False
    with pytest.raises(ValueError, match=r"^sparse_rows_: param: array is read-only"):
        F.sparse_rows_("SparseAdam", t, [1], rows, {"exp_avg": m, "exp_avg_sq": v}, step=1)


@pytest.mark.parametrize("value", [np.float16(np.nan), np.zeros(3, np.float16), 1.0])
def test_state_dtype_that_is_a_value_is_refused(value: Any) -> None:
    """``state_dtype`` given a value (a NumPy scalar, read as its dtype before; an array, which
    raised NumPy's "truth value of an array is ambiguous"): refused naming the option."""
    p, g, a, b, _ = arrays = _arrays(5)
    before = [x.tobytes() for x in arrays]
    with pytest.raises(ValueError, match=r"^adam_: state_dtype must be 'float32'"):
        F.adam_(p, g, a, b, step=1, state_dtype=value)
    _unchanged(before, arrays)
    with pytest.raises(ValueError, match=r"^Adam: state_dtype must be 'float32'"):
        fo.Adam([p], state_dtype=value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nadam_at_the_largest_step_is_finite(dtype: Any) -> None:
    """NAdam's momentum schedule reads step + 1: at step 2**63 - 1 (the largest the functions
    take) that overflowed int64 and the update was NaN; it is the step before's, nearly."""
    out = []
    for step in (2**63 - 2, 2**63 - 1):
        p, g = np.ones(4, dtype), np.full(4, 0.5, dtype)
        m, v = np.zeros(4, dtype), np.zeros(4, dtype)
        F.nadam_(p, g, m, v, step=step, mu_product=0.5)
        assert np.isfinite(p).all() and np.isfinite(m).all() and np.isfinite(v).all()
        out.append(p)
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6)


def test_tensor_number_keys_stochastic_rounding_as_the_class() -> None:
    """A class numbers its parameters 0, 1, ... across its groups; the random bits of
    stochastic rounding are keyed on that number: functional calls given each parameter's
    ``tensor`` reproduce the class bit for bit (16-bit stores with a master, stochastic
    8-bit codes), and two tensors given one number draw the same bits."""
    rng = np.random.default_rng(12)
    shape = (5000,)
    w0 = [rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for _ in range(3)]
    grads = [[rng.standard_normal(shape).astype(np.float32) for _ in w0] for _ in range(3)]
    kw: dict[str, Any] = dict(lr=1e-2, rounding="stochastic", seed=9, state_dtype="int8")
    ws = [w.copy() for w in w0]
    opt = fo.AdamW([ws[0]], master_weights=True, **kw)
    opt.add_param_group({"params": ws[1:], "lr": 1e-2})
    fs = [w.copy() for w in w0]
    masters = [w.astype(np.float32) for w in w0]
    states = [(F.quantized_state(w, "exp_avg"), F.quantized_state(w, "exp_avg_sq")) for w in w0]
    for t, gs in enumerate(grads, start=1):
        opt.step(gs)
        for i, (w, g, (m, v)) in enumerate(zip(fs, gs, states)):
            F.adamw_(w, g, m, v, step=t, master=masters[i], tensor=i, **kw)
    for i in range(3):
        np.testing.assert_array_equal(fs[i].view(np.uint16), ws[i].view(np.uint16))
        np.testing.assert_array_equal(states[i][0][0], opt.state[i]["exp_avg"])
        np.testing.assert_array_equal(masters[i], opt.state[i]["master"])
    # the same number for two tensors holding the same values: the same bits (the default 0
    # for every call draws them alike: give distinct numbers)
    a, b = w0[0].copy(), w0[0].copy()
    for w in (a, b):
        F.sgd_(w, grads[0][0], step=1, lr=1e-3, rounding="stochastic", tensor=5)
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    c = w0[0].copy()
    F.sgd_(c, grads[0][0], step=1, lr=1e-3, rounding="stochastic", tensor=6)
    assert (c.view(np.uint16) != a.view(np.uint16)).any()
    for bad, error in ((-1, ValueError), (2**64, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=r"sgd_: .*tensor"):
            F.sgd_(c, grads[0][0], step=1, tensor=bad)
