"""Centered RMSprop's variance ``v - m^2`` is clamped at 0 (Keras audit K02).

Exactly, ``v >= m^2``; with the two averages rounded, and far more with them stored
independently in float16/int8/int4, ``v - m^2`` can come out negative, and ``sqrt`` wrote NaN
into the parameters (int4 state with Keras's defaults at step 8 on unit-normal gradients).  The
kernel, the NumPy reference and every tier clamp it; NaN still propagates."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

import fastoptim as fo
from fastoptim import functional as F
from fastoptim import keras as fk
from fastoptim import reference

SHAPES = [(5000,), (300,)]


def _grads(t: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + t)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


MAKERS: dict[str, Callable[[list[np.ndarray], str], Any]] = {
    "torch-convention": lambda p, sd: fo.RMSprop(
        p, lr=1e-3, alpha=0.9, eps=1e-7, centered=True, momentum=0.5, state_dtype=sd
    ),
    "keras": lambda p, sd: fk.RMSprop(p, centered=True, momentum=0.5, state_dtype=sd),
}


@pytest.mark.parametrize("state_dtype", ["int4", "float16"])
@pytest.mark.parametrize("convention", list(MAKERS))
def test_reduced_precision_state_keeps_parameters_finite(convention: str, state_dtype: str) -> None:
    params = [np.ones(s, np.float32) for s in SHAPES]
    opt = MAKERS[convention](params, state_dtype)
    for t in range(40):
        grads = _grads(t)
        if state_dtype == "float16":  # gradients that barely vary: v ~ m^2 ~ 1
            grads = [(1 + 1e-3 * g).astype(np.float32) for g in grads]
        opt.step(grads)
        for i, p in enumerate(params):
            assert np.isfinite(p).all(), f"parameter {i} not finite after step {t + 1}"


def _crossed_state(dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A state whose averages cross at the next step: with alpha = 0.5, v = 0.5 (0 + 1) and
    m = (3 + 1) / 2, so v - m^2 = -3.5 where the gradient is 1; the other elements are ordinary."""
    rng = np.random.default_rng(7)
    n = 37  # around the vector widths, with a tail
    param = rng.standard_normal(n).astype(dtype)
    grad = rng.standard_normal(n).astype(dtype)
    square_avg = (grad * grad + rng.random(n)).astype(dtype)
    grad_avg = (0.1 * rng.standard_normal(n)).astype(dtype)
    crossed = np.arange(n) % 3 == 0
    grad[crossed], square_avg[crossed], grad_avg[crossed] = 1, 0, 3
    return param, grad, square_avg, grad_avg


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_clamps_like_the_reference(dtype: type) -> None:
    param, grad, square_avg, grad_avg = _crossed_state(dtype)
    want = [x.copy() for x in (param, grad, square_avg, grad_avg)]
    before = param.copy()
    hyper = dict(lr=1e-3, alpha=0.5, eps=1e-2, weight_decay=0.0, momentum=0.0, centered=True)
    reference.rmsprop_update(want[0], want[1], want[2], want[3], None, maximize=False, **hyper)
    F.rmsprop_(param, grad, square_avg, grad_avg, step=1, **hyper)
    crossed = np.arange(param.size) % 3 == 0
    assert np.isfinite(param).all()
    # the crossed elements stepped by lr * g / (sqrt(0) + eps) = 1e-3 / 1e-2
    np.testing.assert_allclose(before[crossed] - param[crossed], 0.1, rtol=1e-5)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(param, want[0], rtol=rtol, atol=0)
    np.testing.assert_allclose(square_avg, want[2], rtol=rtol, atol=0)
    np.testing.assert_allclose(grad_avg, want[3], rtol=rtol, atol=0)


def test_keras_class_clamps_like_the_reference() -> None:
    param, grad, square_avg, grad_avg = _crossed_state(np.float32)
    want = [x.copy() for x in (param, grad, square_avg, grad_avg)]
    reference.keras_rmsprop_update(
        want[0], want[1], want[2], want[3], None, lr=1e-3, alpha=0.5, eps=1e-2, momentum=0.0,
        weight_decay=0.0,
    )  # fmt: skip
    opt = fk.RMSprop([param], learning_rate=1e-3, rho=0.5, epsilon=1e-2, centered=True)
    state = opt.state_dict()
    state["state"][0] = {"square_avg": square_avg, "grad_avg": grad_avg}
    opt.load_state_dict(state)
    opt.step([grad])
    assert np.isfinite(param).all()
    np.testing.assert_allclose(param, want[0], rtol=1e-6, atol=0)


def test_nan_still_propagates() -> None:
    param, grad, square_avg, grad_avg = _crossed_state(np.float32)
    grad_avg[1] = np.nan
    F.rmsprop_(param, grad, square_avg, grad_avg, step=1, lr=1e-3, alpha=0.5, centered=True)
    assert np.isnan(param[1]) and np.isfinite(np.delete(param, 1)).all()


def test_torch_tier_clamps_where_torch_writes_nan() -> None:
    """alpha = 0: v = round(g^2), m = g, and the fused residual round(g^2) - g^2 is negative for
    about half the elements.  torch.optim.RMSprop writes NaN there (its result, kept as the
    record of the departure); fastoptim.torch clamps and steps by g / eps, finite."""
    torch = pytest.importorskip("torch")
    from fastoptim import torch as ft

    rng = np.random.default_rng(1)
    p0 = torch.tensor(rng.standard_normal(1000).astype(np.float32))
    grads = [torch.tensor(rng.standard_normal(1000).astype(np.float32)) for _ in range(3)]
    ours, theirs = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    o = ft.RMSprop([ours], lr=0.01, alpha=0.0, centered=True)
    t = torch.optim.RMSprop([theirs], lr=0.01, alpha=0.0, centered=True, foreach=False)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        o.step()
        t.step()
    assert torch.isfinite(ours).all()
    finite = torch.isfinite(theirs)
    assert not finite.all()  # torch's NaN: if this fails, torch changed and the docs should too
    # elsewhere the variance is a rounding residual too: ill-conditioned, so a loose tolerance
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-4, atol=0)


def test_torch_tier_int4_state_keeps_parameters_finite() -> None:
    torch = pytest.importorskip("torch")
    from fastoptim import torch as ft

    params = [torch.nn.Parameter(torch.ones(s)) for s in SHAPES]
    opt = ft.RMSprop(params, lr=1e-3, alpha=0.9, eps=1e-7, centered=True, momentum=0.5,
                     state_dtype="int4")  # fmt: skip
    for t in range(12):
        for p, g in zip(params, _grads(t)):
            p.grad = torch.from_numpy(g)
        opt.step()
        assert all(torch.isfinite(p).all() for p in params), f"not finite after step {t + 1}"
