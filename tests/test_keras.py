"""fastoptim.keras: Keras 3's optimizers, against Keras itself (when it imports, with its torch
backend) and always against the readable NumPy reference (``fastoptim.reference.KerasX``).

Each case runs 12 steps in float32 and float64 on one group of tensors in two gradient
families (unit-scale gradients with ~10% exact zeros, and 1e-7-scale ones, where epsilon's
placement decides the result: see ``cases.make_families``), with the learning rate halved
halfway (Keras's SGD and RMSprop keep lr-scaled momentum buffers, so this matters).  Learning
rates and weight decays are powers of two: Keras keeps the learning rate in a float32 variable
(and its torch backend computes the decay factor 1 - wd * lr in float32), so other values would
differ from the float64 run's by float32 rounding.
Parameters and every state array are compared elementwise after every step with
``rtol = K eps(dtype)`` and ``atol = K eps(dtype) M`` (M: the largest |value| of that kind in
that family so far), as in test_torch.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastoptim
from cases import Scales, check_close, every_dtype, make_families, make_grads
from fastoptim import keras as fk
from fastoptim import reference

SHAPES: list[tuple[int, ...]] = [(), (1,), (7,), (17,), (33, 31)]
STEPS = 12
# Allowed error in units of eps(dtype).  Measured on these cases: K <= 4 against the reference
# and about 9.5 against Keras (torch backend: float32 Adam/AdamW, one element after 12 steps);
# 16 as in test_torch.py.  A wrong epsilon placement is off by orders of magnitude more.
RTOL_ULPS = 16
# Keras (with numpy 2) converts torch tensors through __array__ without copy=: not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# (class name, label, options), Keras's names.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("SGD", "plain", dict(learning_rate=0.125)),
    ("SGD", "momentum", dict(learning_rate=0.125, momentum=0.9)),
    ("SGD", "nesterov", dict(learning_rate=0.125, momentum=0.9, nesterov=True)),
    ("SGD", "weight_decay", dict(learning_rate=0.125, momentum=0.5, weight_decay=0.125)),
    ("RMSprop", "plain", dict(learning_rate=2**-7)),
    ("RMSprop", "centered", dict(learning_rate=2**-7, centered=True, rho=0.8)),
    ("RMSprop", "momentum", dict(learning_rate=2**-7, momentum=0.9)),
    (
        "RMSprop",
        "centered-momentum-wd",
        dict(learning_rate=2**-7, centered=True, momentum=0.9, weight_decay=0.125),
    ),
    ("Adagrad", "plain", dict(learning_rate=0.125)),
    ("Adagrad", "initial", dict(learning_rate=0.125, initial_accumulator_value=0.0, epsilon=1e-6)),
    ("Adagrad", "weight_decay", dict(learning_rate=0.125, weight_decay=0.125)),
    ("Adadelta", "plain", dict(learning_rate=1.0)),
    ("Adadelta", "rho-wd", dict(learning_rate=0.5, rho=0.9, weight_decay=0.125)),
    ("Adam", "plain", dict(learning_rate=2**-7)),
    ("Adam", "amsgrad", dict(learning_rate=2**-7, beta_2=0.8, amsgrad=True)),
    ("Adam", "weight_decay", dict(learning_rate=2**-7, weight_decay=0.125, epsilon=1e-5)),
    ("AdamW", "plain", dict(learning_rate=2**-7, weight_decay=2**-8)),  # about the default
    ("AdamW", "amsgrad", dict(learning_rate=2**-7, weight_decay=2**-4, amsgrad=True)),
    ("Adamax", "plain", dict(learning_rate=2**-7)),
    ("Adamax", "weight_decay", dict(learning_rate=2**-7, beta_1=0.8, weight_decay=0.125)),
    ("Nadam", "plain", dict(learning_rate=2**-7)),
    ("Nadam", "weight_decay", dict(learning_rate=2**-7, beta_2=0.99, weight_decay=0.125)),
    ("Lion", "plain", dict(learning_rate=2**-10)),
    (
        "Lion",
        "weight_decay",
        dict(learning_rate=2**-10, beta_1=0.95, beta_2=0.98, weight_decay=0.5),
    ),
]
each = pytest.mark.parametrize(
    ("name", "kwargs"), [pytest.param(n, kw, id=f"{n}-{label}") for n, label, kw in CASES]
)

# fastoptim's state names (torch's) -> Keras's optimizer variable names.
KERAS_STATE = {
    "SGD": {"momentum_buffer": "momentum"},
    "RMSprop": {
        "square_avg": "velocity",
        "grad_avg": "average_gradient",
        "momentum_buffer": "momentum",
    },
    "Adagrad": {"sum": "accumulator"},
    "Adadelta": {"square_avg": "accumulated_grad", "acc_delta": "accumulated_delta_var"},
    "Adam": {"exp_avg": "momentum", "exp_avg_sq": "velocity", "max_exp_avg_sq": "velocity_hat"},
    "Adamax": {"exp_avg": "momentum", "exp_inf": "norm"},
    "Nadam": {"exp_avg": "momentum", "exp_avg_sq": "velocity"},
    "Lion": {"exp_avg": "momentum"},
}
KERAS_STATE["AdamW"] = KERAS_STATE["Adam"]


def _problem(dtype: Any) -> tuple[list[np.ndarray], list[np.ndarray], list[int], Any]:
    rng = np.random.default_rng(1234)
    p0, gscales, family = make_families(rng, SHAPES, SHAPES)
    return [p.astype(dtype) for p in p0], gscales, family, rng


def _compare(
    where: str,
    fast: Any,
    params: list[np.ndarray],
    want_params: list[np.ndarray],
    want_states: list[dict[str, np.ndarray]],
    scales: Scales,
    rtol: float,
) -> None:
    for i in range(len(params)):
        scales.update(i, "param", want_params[i])
        for n, v in want_states[i].items():
            scales.update(i, n, v)
    for i in range(len(params)):
        for n, want in want_states[i].items():
            got = fast.state[i][n]
            assert got.dtype == params[i].dtype
            check_close(f"{where} tensor {i} {n}", got, want, rtol, rtol * scales(i, n))
        check_close(
            f"{where} tensor {i} param",
            params[i],
            want_params[i],
            rtol,
            rtol * scales(i, "param"),
        )


@every_dtype
@each
def test_matches_reference(name: str, kwargs: dict[str, Any], dtype: Any) -> None:
    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    params, gscales, family, rng = _problem(dtype)
    ref_params = [p.copy() for p in params]
    fast = getattr(fk, name)(params, **kwargs)
    ref = getattr(reference, "Keras" + name)(ref_params, **kwargs)
    scales = Scales(family)
    for t in range(1, STEPS + 1):
        if t == STEPS // 2 + 1:
            for opt in (fast, ref):
                opt.param_groups[0]["learning_rate"] = kwargs["learning_rate"] * 0.5
        grads = [g.astype(dtype) for g in make_grads(rng, gscales)]
        fast.step(grads)
        ref.step(grads)
        states = [
            {n: v for n, v in ref.state[i].items() if n != "step"} for i in range(len(params))
        ]
        assert [set(s) for s in states] == [
            set(fast.state[i]) - {"step"} for i in range(len(params))
        ]
        _compare(f"{name} step {t}", fast, params, ref_params, states, scales, rtol)


def _np(x: Any) -> np.ndarray:
    return np.array(x.value.detach().cpu().numpy())


@every_dtype
@each
def test_matches_keras(keras: Any, name: str, kwargs: dict[str, Any], dtype: Any) -> None:
    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    params, gscales, family, rng = _problem(dtype)
    dt = np.dtype(dtype).name
    kvars = [keras.Variable(p.copy(), dtype=dt) for p in params]
    fast = getattr(fk, name)(params, **kwargs)
    kopt = getattr(keras.optimizers, name)(**kwargs)
    kopt.build(kvars)
    # Keras's optimizer variables per model variable, by Keras's name
    per_var: list[dict[str, Any]] = [{} for _ in kvars]
    for v in kopt.variables:
        for i, kv in enumerate(kvars):
            for n in KERAS_STATE[name].values():
                if v.path.endswith(f"/{kv.name}_{n}") or v.name == f"{kv.name}_{n}":
                    per_var[i][n] = v
    scales = Scales(family)
    for t in range(1, STEPS + 1):
        if t == STEPS // 2 + 1:
            fast.param_groups[0]["learning_rate"] = kwargs["learning_rate"] * 0.5
            kopt.learning_rate = kwargs["learning_rate"] * 0.5
        grads = [g.astype(dtype) for g in make_grads(rng, gscales)]
        fast.step(grads)
        kopt.apply_gradients(
            [(keras.ops.convert_to_tensor(g.copy(), dtype=dt), v) for g, v in zip(grads, kvars)]
        )
        names = [set(fast.state[i]) - {"step"} for i in range(len(params))]
        states = [
            {n: _np(per_var[i][KERAS_STATE[name][n]]) for n in names[i]} for i in range(len(params))
        ]
        _compare(f"{name} step {t}", fast, params, [_np(v) for v in kvars], states, scales, rtol)


def test_keras_signatures_and_defaults(keras: Any) -> None:
    """Every class has Keras's arguments (those fastoptim.keras implements) and defaults."""
    import inspect

    from fastoptim.engine.definition import COMMON

    skip = {
        "clipnorm",
        "clipvalue",
        "global_clipnorm",
        "use_ema",
        "ema_momentum",
        "ema_overwrite_frequency",
        "loss_scale_factor",
        "gradient_accumulation_steps",
        "name",
        "kwargs",
    }
    for name in fk.__all__:
        if name == "KerasOptimizer":
            continue
        theirs = inspect.signature(getattr(keras.optimizers, name).__init__).parameters
        ours = inspect.signature(getattr(fk, name).__init__).parameters
        want = {k: p.default for k, p in theirs.items() if k not in skip | {"self"}}
        common = {h.name for h in COMMON}  # fastoptim's precision options, on every class
        got = {k: p.default for k, p in ours.items() if k not in {"self", "params", "lr"} | common}
        assert got == want, name


def test_lr_alias_and_weight_decay_none() -> None:
    a, b = np.ones(3), np.ones(3)
    fk.Adam([a], lr=0.5, weight_decay=None).step([np.ones(3)])
    fk.Adam([b], learning_rate=0.5).step([np.ones(3)])
    np.testing.assert_array_equal(a, b)
    opt = fk.SGD([np.ones(3)], lr=0.25)
    assert opt.param_groups[0]["learning_rate"] == 0.25
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_checkpoint_of_the_other_convention_named(tmp_path: Any) -> None:
    """fastoptim.keras.Adam and fastoptim.Adam both record "Adam": a checkpoint of one loaded
    into the other is refused naming the two conventions, nothing changed."""
    keras_opt = fk.Adam([np.zeros(3, np.float32)])
    keras_opt.step([np.ones(3, np.float32)])
    torch_opt = fastoptim.Adam([np.zeros(3, np.float32)])
    before = torch_opt.state_dict()
    with pytest.raises(ValueError, match=r"state of fastoptim\.keras\.Adam \(Keras's\), not of "
                       r"fastoptim\.Adam \(torch's convention\)"):  # fmt: skip
        torch_opt.load_state_dict(keras_opt.state_dict())
    fastoptim.save(tmp_path / "k.npz", keras_opt)
    with pytest.raises(ValueError, match=r"state of fastoptim\.keras\.Adam"):
        fastoptim.load(tmp_path / "k.npz", torch_opt)
    assert repr(torch_opt.state_dict()) == repr(before)
    with pytest.raises(ValueError, match=r"state of fastoptim\.Adam \(torch's convention\), not"):
        fk.Adam([np.zeros(3, np.float32)]).load_state_dict(torch_opt.state_dict())
    with pytest.raises(ValueError, match="this is the state of Adam, not of AdamW"):
        fk.AdamW([np.zeros(3, np.float32)]).load_state_dict(keras_opt.state_dict())
    sd = keras_opt.state_dict()  # (an entry missing is said as such, not as the other class)
    del sd["param_groups"][0]["hyper"]["learning_rate"]
    with pytest.raises(ValueError, match=r"missing \['learning_rate'\]"):
        fk.Adam([np.zeros(3, np.float32)]).load_state_dict(sd)


def test_lr_and_learning_rate_conflict() -> None:
    """Both spellings given: a TypeError naming both, nothing built, whatever the values (the
    default's value given explicitly included: it was taken as not given); the alias given
    alone is the value used."""
    with pytest.raises(TypeError, match=r"both lr=0\.1 and learning_rate=0\.2"):
        fk.SGD([np.ones(3)], learning_rate=0.2, lr=0.1)
    with pytest.raises(TypeError, match=r"both lr=0\.1 and learning_rate=0\.001"):
        fk.Adam([np.ones(3)], learning_rate=0.001, lr=0.1)
    with pytest.raises(TypeError, match=r"both lr=0\.1 and learning_rate=0\.001"):
        fk.Adam([np.ones(3)], 0.001, lr=0.1)  # (positionally)
    assert fk.Adam([np.ones(3)], lr=0.1).param_groups[0]["learning_rate"] == 0.1
    assert fk.Adam([np.ones(3)], 0.2).param_groups[0]["learning_rate"] == 0.2

    class Warm(fk.Adam):  # a subclass with its own signature: its second argument, its lr
        def __init__(self, params: Any, warmup: int, lr: float = 0.001) -> None:
            super().__init__(params, learning_rate=lr)
            self.warmup = warmup

    warm = Warm([np.ones(3)], 10, lr=0.01)
    assert warm.param_groups[0]["learning_rate"] == 0.01 and warm.warmup == 10


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: fk.Adam([p], beta_1=1.0), ["beta_1"]),
        (lambda p: fk.Adam([p], epsilon=-1.0), ["epsilon"]),
        (lambda p: fk.SGD([p], momentum=1.5), ["momentum"]),
        (lambda p: fk.RMSprop([p], rho=2.0), ["rho"]),
        (lambda p: fk.Lion([p], beta_1=0.0), ["beta_1"]),
        (lambda p: fk.Adagrad([p], learning_rate=-0.1), ["learning_rate"]),
        (lambda p: fk.AdamW([p], weight_decay=-0.1), ["weight_decay"]),
    ],
)
def test_invalid_values(make: Any, words: list[str]) -> None:
    p = np.zeros(3)
    with pytest.raises(ValueError) as info:
        make(p)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_centered_rmsprop_without_variance_is_keras(dtype: Any) -> None:
    """Centered RMSprop took v - a^2 with one fused multiply-add (torch's addcmul): where the
    gradient had not varied (rho = 0: v = a^2) the residual of the rounded square swamped
    epsilon, with NaN for a negative one (3 of these 30 elements in float32, the others up to
    53% off).  Keras subtracts the rounded square: exactly 0, the step lr * g / sqrt(eps)."""
    g = np.linspace(0.1, 3, 30).astype(dtype)
    p = np.zeros(30, dtype)
    fk.RMSprop([p], learning_rate=0.01, rho=0.0, centered=True).step([g.copy()])
    expected = np.zeros(30, dtype)
    reference.KerasRMSprop([expected], learning_rate=0.01, rho=0.0, centered=True).step([g])
    np.testing.assert_array_equal(p, expected)
    eps = dtype(1e-7)
    np.testing.assert_allclose(p, -(dtype(0.01) * g) / np.sqrt(eps), rtol=4 * np.finfo(dtype).eps)
