"""fastoptim against ``torch.optim`` itself (skipped when torch is not installed).

Every torch optimizer and option set fastoptim mirrors (torch has no Lion), in float32 and
float64, for 24 steps with a learning-rate change halfway, on tensors with unit-scale gradients
(about 10% exact zeros) and again with 1e-7-scale gradients.  torch runs its single-tensor
"for-loop" implementation (``foreach=False``) on ``torch.from_numpy`` views of copies of the
same data; parameters and every state array (``optimizer.state[p][name]``, same names) are
compared elementwise after every step, and the step count and NAdam's ``mu_product`` too.
:mod:`fastoptim.reference` goes through the same comparisons: the oracle of test_kernels.py is
itself checked against torch.

Tolerance: as in test_kernels.py, ``rtol = K * eps(dtype)`` and ``atol = K * eps(dtype) * M``
with M the largest |torch value| that kind of array has reached so far in its gradient family.
fastoptim fuses multiply-adds where torch rounds twice, and torch orders a few operations
differently (``addcdiv`` with a scalar, float32 ``lerp`` weights), so a few ulps per step are
expected; over 24 steps they accumulate.  ``K`` was measured: see ``RTOL_ULPS``.

For float64 the test sets torch's default dtype to float64, so that torch keeps its scalar
state (``step``, NAdam's ``mu_product``) in float64; otherwise mu_product is a float32 tensor
and NAdam's coefficients are only float32-accurate in torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim
from fastoptim import reference

SHAPES: list[tuple[int, ...]] = [(), (0,), (1,), (7,), (17,), (33, 31), (4099,)]
STEPS = 24
NEW_LR_FACTOR = 0.5  # the learning rate is multiplied by this after STEPS // 2 steps

# L2 weight decay is a power of two: wd * p is exact, so g + wd * p is one rounding in torch
# (which adds alpha * p in two roundings) and in fastoptim (one fused multiply-add) alike.  With a
# decimal wd, where g + wd * p nearly cancels the two differ by a large relative amount that
# Adam and RMSprop normalise into a learning-rate-sized difference: ill-conditioning, not a bug.
WD = 0.125


def case(opt: str, label: str, **kwargs: Any) -> Any:
    return pytest.param(opt, kwargs, id=f"{opt}-{label}")


CASES = [
    case("SGD", "plain", lr=0.05),
    case("SGD", "momentum", lr=0.05, momentum=0.9),
    case("SGD", "momentum-dampening", lr=0.05, momentum=0.9, dampening=0.3),
    case("SGD", "nesterov", lr=0.05, momentum=0.9, nesterov=True),
    case("SGD", "weight_decay", lr=0.05, momentum=0.5, weight_decay=WD),
    case("SGD", "maximize", lr=0.05, momentum=0.9, maximize=True),
    case("Adagrad", "plain", lr=0.1),
    case("Adagrad", "lr_decay", lr=0.1, lr_decay=0.05),
    case("Adagrad", "initial_accumulator_value", lr=0.1, initial_accumulator_value=0.3),
    case("Adagrad", "weight_decay", lr=0.1, weight_decay=WD),
    case("Adagrad", "maximize", lr=0.1, maximize=True),
    case("RMSprop", "plain", lr=0.01),
    case("RMSprop", "centered", lr=0.01, centered=True),
    case("RMSprop", "momentum", lr=0.01, momentum=0.9),
    case("RMSprop", "centered-momentum", lr=0.01, centered=True, momentum=0.9),
    case("RMSprop", "weight_decay", lr=0.01, weight_decay=WD),
    case("RMSprop", "maximize", lr=0.01, alpha=0.9, maximize=True),
    case("Adadelta", "plain", lr=1.0),
    case("Adadelta", "weight_decay", lr=1.0, weight_decay=WD),
    case("Adadelta", "maximize", lr=0.5, rho=0.8, maximize=True),
    case("Adam", "plain", lr=0.01),
    case("Adam", "amsgrad", lr=0.01, betas=(0.9, 0.8), amsgrad=True),
    case("Adam", "weight_decay", lr=0.01, weight_decay=WD),
    case("Adam", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("Adam", "maximize", lr=0.01, maximize=True),
    case("AdamW", "plain", lr=0.01),
    case("AdamW", "amsgrad", lr=0.01, amsgrad=True, weight_decay=0.05),
    case("Adamax", "plain", lr=0.01),
    case("Adamax", "weight_decay", lr=0.01, weight_decay=WD),
    case("Adamax", "maximize", lr=0.01, maximize=True),
    case("NAdam", "plain", lr=0.01),
    case("NAdam", "weight_decay", lr=0.01, weight_decay=WD),
    case("NAdam", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("NAdam", "momentum_decay", lr=0.01, momentum_decay=0.3),
    case("NAdam", "maximize", lr=0.01, maximize=True),
    # rho_t > 5 first at step 6 with beta2 = 0.999: both branches run.
    case("RAdam", "plain", lr=0.01),
    case("RAdam", "weight_decay", lr=0.01, weight_decay=WD),
    case("RAdam", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("RAdam", "maximize", lr=0.01, maximize=True),
]

DTYPES = [np.float32, np.float64]

# Allowed error in units of eps(dtype) (rtol = K eps, atol = K eps M; see the module docstring).
# Measured over the table and 8 other seeds: K needed <= 3.2 for fastoptim (float32 and
# float64) and <= 4.8 for the reference (float32), the largest for Adadelta's acc_delta after
# 20+ steps.  16 leaves 3x headroom; a wrong formula is off by orders of magnitude more.
RTOL_ULPS = 16


@pytest.fixture
def torch_default_dtype(dtype: Any) -> Iterator[None]:
    """torch's default dtype follows the test's: its scalar state then has that precision."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def make_problem(
    rng: np.random.Generator, grad_scale: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """float32-representable parameters (about 0.1 in size) and gradient scales: 0 for about
    10% of the elements, else `grad_scale`."""
    params, scales = [], []
    for shape in SHAPES:
        params.append(np.asarray(0.1 * rng.standard_normal(shape)).astype(np.float32))
        scales.append(np.where(np.asarray(rng.random(shape)) < 0.1, 0.0, grad_scale))
    return params, scales


def check_close(what: str, fast: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> None:
    np.testing.assert_allclose(fast, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("impl", [fastoptim, reference], ids=["fastoptim", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("opt", "kwargs"), CASES)
def test_matches_torch(
    opt: str,
    kwargs: dict[str, Any],
    dtype: Any,
    impl: Any,
    torch_default_dtype: None,
    rng: np.random.Generator,
) -> None:
    eps = float(np.finfo(dtype).eps)
    rtol = RTOL_ULPS * eps
    p0, scales = make_problem(rng, 1.0)
    p_tiny, s_tiny = make_problem(rng, 1e-7)
    p0 += p_tiny
    scales += s_tiny
    family = [0] * len(SHAPES) + [1] * len(SHAPES)

    fast_params = [p.astype(dtype) for p in p0]
    torch_arrays = [p.astype(dtype) for p in p0]  # torch updates these through from_numpy
    tparams = [torch.from_numpy(a) for a in torch_arrays]
    fast = getattr(impl, opt)(fast_params, **kwargs)
    ref = getattr(torch.optim, opt)(tparams, foreach=False, **kwargs)
    lr = kwargs["lr"]
    biggest: dict[tuple[int, str], float] = {}

    def update_biggest(key: tuple[int, str], value: np.ndarray) -> None:
        if value.size:
            biggest[key] = max(biggest.get(key, 0.0), float(np.max(np.abs(value))))

    for i, p in enumerate(p0):
        update_biggest((family[i], "param"), p)

    for t in range(1, STEPS + 1):
        if t == STEPS // 2 + 1:  # a learning-rate change mid-run
            fast.param_groups[0]["lr"] = lr * NEW_LR_FACTOR
            ref.param_groups[0]["lr"] = lr * NEW_LR_FACTOR
        grads = [
            np.asarray(rng.standard_normal(s.shape) * s).astype(np.float32).astype(dtype)
            for s in scales
        ]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        fast.step(grads)
        ref.step()

        names = sorted(set(fast.state[0]) - {"step"})
        tstates = [{n: ref.state[tp][n].numpy() for n in names} for tp in tparams]
        for i in range(len(p0)):
            update_biggest((family[i], "param"), torch_arrays[i])
            for n in names:
                update_biggest((family[i], n), tstates[i][n])
        for i, tp in enumerate(tparams):
            where = f"{opt} step {t} shape {p0[i].shape} family {family[i]}"
            assert set(ref.state[tp]) - {"step", "mu_product"} == set(names), where
            assert fast.state[i]["step"] == t, where
            if "step" in ref.state[tp]:  # torch's SGD keeps no step count
                assert float(ref.state[tp]["step"]) == t, where
            for n in names:
                assert tstates[i][n].dtype == fast.state[i][n].dtype
                atol = rtol * biggest[family[i], n]
                check_close(f"{where} state {n!r}", fast.state[i][n], tstates[i][n], rtol, atol)
            atol = rtol * biggest[family[i], "param"]
            check_close(f"{where} param", fast_params[i], torch_arrays[i], rtol, atol)
        if opt == "NAdam":
            mu_product = float(ref.state[tparams[0]]["mu_product"])
            # torch multiplies mu_product in the dtype of its scalar state, one rounding a step.
            assert fast._groups[0].hyper.mu_product == pytest.approx(mu_product, rel=t * eps)


NONFINITE = [  # with and without L2 weight decay (which lets a non-finite p into the gradient)
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=WD)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("Adagrad", dict(lr=0.1, weight_decay=WD)),
    ("Adagrad", dict(lr=0.1)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=WD)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
    ("Adadelta", dict(weight_decay=WD)),
    ("Adadelta", dict()),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=WD)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01)),
    ("Adamax", dict(lr=0.01, weight_decay=WD)),
    ("Adamax", dict(lr=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=WD)),
    ("NAdam", dict(lr=0.01)),
    ("RAdam", dict(lr=0.01, weight_decay=WD)),
    ("RAdam", dict(lr=0.01)),
]


def nonfinite_params() -> list[Any]:
    out = []
    for opt, kwargs in NONFINITE:
        l2 = "weight_decay" in kwargs and opt != "AdamW"
        for impl in (fastoptim, reference):
            name = "fastoptim" if impl is fastoptim else "reference"
            label = f"{opt}-{'l2' if l2 else 'no_l2'}-{name}"
            out.append(pytest.param(opt, kwargs, impl, id=label))
    return out


@pytest.mark.parametrize("dtype", [np.float64], ids=["float64"])
@pytest.mark.parametrize(("opt", "kwargs", "impl"), nonfinite_params())
def test_nonfinite_like_torch(
    opt: str, kwargs: dict[str, Any], impl: Any, dtype: Any, torch_default_dtype: None
) -> None:
    """Inf and NaN gradients: NaN, +Inf and -Inf end up where torch puts them, in the
    parameters and in every state array."""
    ours, theirs = np.full(5, 0.5), np.full(5, 0.5)
    tp = torch.from_numpy(theirs)
    fast = getattr(impl, opt)([ours], **kwargs)
    ref = getattr(torch.optim, opt)([tp], foreach=False, **kwargs)
    for g in ([np.inf, -np.inf, 1, 1, 1], [1, 1, np.nan, 1, 1], [1, 1, 1, -1, 1]):
        g = np.array(g, dtype=np.float64)
        with np.errstate(all="ignore"):
            fast.step([g])
        tp.grad = torch.from_numpy(g.copy())
        ref.step()
        for name, value in fast.state[0].items():
            if name != "step":
                want = ref.state[tp][name].numpy()
                np.testing.assert_allclose(value, want, rtol=1e-14, atol=0, err_msg=name)
        np.testing.assert_allclose(ours, theirs, rtol=1e-14, atol=0)
