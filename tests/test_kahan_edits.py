"""Kahan-compensated parameters changed outside the optimizer (a pruned weight zeroed, a clamp,
a load): the compensation the step kept belongs to the old value.  A step drops one that is
larger than half the spacing above ``|p|`` (``reference.kept_compensation``); a zeroed weight
had come back as the old value's rounding residual (9e-4 after a step with a zero gradient)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from fastoptim import reference

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def _comp(opt: Any) -> np.ndarray:
    comp: np.ndarray = opt.state_dict()["state"][0]["compensation"]
    return comp


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_zeroed_weight_stays_zero(dtype: str) -> None:
    dt = DTYPES[dtype]
    p = np.full(37, 1.0, dt)
    opt = fo.SGD([p], lr=1e-3, kahan=True)
    for _ in range(3):
        opt.step([np.ones(37, dt)])
    assert np.any(_comp(opt) != 0)  # (there is a residual to drop)
    p[::2] = 0
    before = p.copy()
    opt.step([np.zeros(37, dt)])
    np.testing.assert_array_equal(p.view(np.uint16), before.view(np.uint16))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_weight_clamped_to_a_power_of_two_stays(dtype: str) -> None:
    """Below a power of two the spacing halves: a kept compensation pointing there must fit
    the smaller one, or a zero-gradient step moved the clamped weight a step down."""
    dt = DTYPES[dtype]
    rng = np.random.default_rng(11)
    p = (0.004 + 0.002 * rng.random(4096)).astype(dt)
    opt = fo.SGD([p], lr=1e-4, kahan=True)
    for _ in range(5):
        opt.step([rng.standard_normal(4096).astype(dt)])
    p[...] = 2.0**-8
    opt.step([np.zeros(4096, dt)])
    assert np.all(p == dt.type(2.0**-8)), int(np.sum(p != dt.type(2.0**-8)))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_compensation_always_fits_its_parameter(dtype: str) -> None:
    """What the driver keeps is always within half the spacing above |p|, at every magnitude
    (subnormals and binade edges included): in a run without edits nothing is ever dropped."""
    dt = DTYPES[dtype]
    rng = np.random.default_rng(3)
    scale = 2.0 ** rng.integers(-20 if dtype == "float16" else -130, 8, size=257)
    p = (rng.standard_normal(257) * scale).astype(dt)
    p[:4] = [0, 1, -1, 0.5]  # binade edges
    opt = fo.Adam([p], lr=1e-3, kahan=True)
    for t in range(30):
        opt.step([(rng.standard_normal(257) * scale).astype(dt)])
        comp = _comp(opt)
        kept = reference.kept_compensation(p, comp)
        np.testing.assert_array_equal(kept, reference._load(comp), err_msg=f"step {t + 1}")


def _round(x: np.ndarray, dt: np.dtype[Any]) -> np.ndarray:
    rnd = reference.round_to_bfloat16 if dt.name == "bfloat16" else reference.round_to_float16
    return rnd(x)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_edits_match_the_reference(dtype: str) -> None:
    """Zeroed, clamped and nudged elements after some steps: every step's parameter and
    compensation as the reference's Kahan store computes them from the float32 step (that
    of a float32 mirror, overwritten before each step), bit for bit; nudged by an ulp, the
    compensation is kept."""
    dt = DTYPES[dtype]
    rng = np.random.default_rng(5)
    p = rng.standard_normal(64).astype(dt)
    opt = fo.SGD([p], lr=1e-3, momentum=0.9, kahan=True)
    mirror = np.zeros(64, np.float32)
    ref = fo.SGD([mirror], lr=1e-3, momentum=0.9)
    for t in range(7):
        g = rng.standard_normal(64).astype(dt)
        old, comp = reference._load(p), _comp(opt).copy()
        kept = reference.kept_compensation(p, comp)
        if t == 4:  # the step after the edit
            assert np.all(kept[:10] == 0) and np.all(kept[50:] == reference._load(comp[50:]))
            assert np.any(kept[50:] != 0)
        else:
            np.testing.assert_array_equal(kept, reference._load(comp))  # nothing dropped
        mirror[...] = old
        if t:
            ref.state[0]["momentum_buffer"][...] = opt.state[0]["momentum_buffer"]
        ref.step([g.astype(np.float32)])
        opt.step([g])
        u = kept + (mirror - old)
        stored = _round(old + u, dt)
        want_comp = _round(u - (reference._load(stored) - old), dt)
        np.testing.assert_array_equal(p.view(np.uint16), stored.view(np.uint16), err_msg=f"{t}")
        np.testing.assert_array_equal(_comp(opt).view(np.uint16), want_comp.view(np.uint16))
        if t == 3:
            p[:10] = 0
            np.clip(p[10:50], -0.5, 0.5, out=p[10:50])
            p.view(np.uint16)[50:] += 1  # one ulp further from 0


def test_torch_tier_a_zeroed_weight_stays_zero() -> None:
    torch = pytest.importorskip("torch")
    from fastoptim import torch as ft

    for dtype in (torch.bfloat16, torch.float16):
        w = torch.nn.Parameter(torch.ones(37, dtype=dtype))
        opt = ft.SGD([w], lr=1e-3, kahan=True)
        for _ in range(3):
            w.grad = torch.ones(37, dtype=dtype)
            opt.step()
        with torch.no_grad():
            w[::2] = 0
        before = w.detach().clone()
        w.grad = torch.zeros(37, dtype=dtype)
        opt.step()
        torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)


def test_torch_tier_kahan_switched_off_and_on_starts_a_new_compensation() -> None:
    """kahan=False drops the compensation (the steps without it leave it behind the parameter);
    kahan=True again starts from zero, so a zero-gradient step moves nothing.  Kept, the old
    residual had been added back: 2 of 1,000 weights moved one ulp at exact ties."""
    torch = pytest.importorskip("torch")
    from fastoptim import torch as ft

    for dtype in (torch.bfloat16, torch.float16):
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4096, generator=gen).to(dtype))
        opt = ft.SGD([w], lr=1e-3, kahan=True)
        grads = [torch.randn(4096, generator=gen).to(dtype) for _ in range(20)]
        for g in grads[:10]:
            w.grad = g
            opt.step()
        assert bool(opt.state[w]["compensation"].ne(0).any())
        opt.param_groups[0]["kahan"] = False
        for g in grads[10:]:
            w.grad = g
            opt.step()
        assert "compensation" not in opt.state[w]
        opt.param_groups[0]["kahan"] = True
        before = w.detach().clone()
        w.grad = torch.zeros(4096, dtype=dtype)
        opt.step()
        torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)
        assert bool(opt.state[w]["compensation"].eq(0).all())
