"""fastoptim against ``torch.optim`` itself (skipped when torch is not installed).

The shared table of cases (``cases.CASES``) but Lion, which torch lacks, in float32 and
float64, for 24 steps with a learning-rate change halfway, on tensors with unit-scale gradients
(about 10% exact zeros) and again with 1e-7-scale gradients.  torch runs its single-tensor
"for-loop" implementation (``foreach=False``) on ``torch.from_numpy`` views of copies of the
same data; parameters and every state array (``optimizer.state[p][name]``, same names) are
compared elementwise after every step, and the step count, NAdam's ``mu_product`` and
ASGD's ``eta`` and ``mu`` too.
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
from cases import (
    CASES,
    SPARSE_ONLY,
    WD,
    Case,
    Scales,
    check_close,
    each_case,
    every_dtype,
    make_families,
    make_grads,
    one_per_optimizer,
)
from fastoptim import reference

SHAPES: list[tuple[int, ...]] = [(), (0,), (1,), (7,), (17,), (33, 31), (4099,)]

# The shared table but the optimizers torch.optim lacks (Lion).  Each case runs for STEPS steps
# here, whatever its Case.steps: longer, so that rounding differences accumulate.
TORCH_CASES = [
    c
    for c in CASES
    if hasattr(torch.optim, c.opt) and not c.fastoptim_only and c.opt not in SPARSE_ONLY
]
STEPS = 24

# Allowed error in units of eps(dtype) (rtol = K eps, atol = K eps M; see the module docstring).
# Measured over the table and 8 other seeds: K needed <= 3.3 for fastoptim (float32 and
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


@pytest.mark.parametrize("impl", [fastoptim, reference], ids=["fastoptim", "reference"])
@every_dtype
@each_case(TORCH_CASES)
def test_matches_torch(
    case: Case, dtype: Any, impl: Any, torch_default_dtype: None, rng: np.random.Generator
) -> None:
    eps = float(np.finfo(dtype).eps)
    rtol = RTOL_ULPS * eps
    p0, gscales, family = make_families(rng, SHAPES, SHAPES)
    fast_params = [p.astype(dtype) for p in p0]
    torch_arrays = [p.astype(dtype) for p in p0]  # torch updates these through from_numpy
    tparams = [torch.from_numpy(a) for a in torch_arrays]
    fast = getattr(impl, case.opt)(fast_params, **case.kwargs)
    ref = getattr(torch.optim, case.opt)(tparams, foreach=False, **case.kwargs)
    lr = case.kwargs["lr"]
    scalar_names = [n for n, _ in fast._definition.scalars]  # NAdam's mu_product, ASGD's eta, mu
    scales = Scales(family)
    for i, p in enumerate(p0):
        scales.update(i, "param", p)

    for t in range(1, STEPS + 1):
        if t == STEPS // 2 + 1:  # a learning-rate change mid-run
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = lr * case.new_lr_factor
        grads = [g.astype(dtype) for g in make_grads(rng, gscales)]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        fast.step(grads)
        ref.step()

        names = sorted(set(fast.state[0]) - {"step"})
        tstates = [{n: ref.state[tp][n].numpy() for n in names} for tp in tparams]
        for i in range(len(p0)):
            scales.update(i, "param", torch_arrays[i])
            for n in names:
                scales.update(i, n, tstates[i][n])
        for i, tp in enumerate(tparams):
            where = f"{case.opt} step {t} shape {p0[i].shape} family {family[i]}"
            assert set(ref.state[tp]) - {"step", *scalar_names} == set(names), where
            assert fast.state[i]["step"] == t, where
            if "step" in ref.state[tp]:  # torch's SGD keeps no step count
                assert float(ref.state[tp]["step"]) == t, where
            for n in names:
                assert tstates[i][n].dtype == fast.state[i][n].dtype
                atol = rtol * scales(i, n)
                check_close(f"{where} state {n!r}", fast.state[i][n], tstates[i][n], rtol, atol)
            atol = rtol * scales(i, "param")
            check_close(f"{where} param", fast_params[i], torch_arrays[i], rtol, atol)
        if case.opt == "NAdam":
            mu_product = float(ref.state[tparams[0]]["mu_product"])
            # torch multiplies mu_product in the dtype of its scalar state, one rounding a step.
            assert fast._groups[0].hyper.mu_product == pytest.approx(mu_product, rel=t * eps)
        if case.opt == "ASGD":  # torch stores eta and mu in its scalar dtype: one rounding
            for n in ("eta", "mu"):
                want = float(ref.state[tparams[0]][n])
                assert getattr(fast._groups[0].hyper, n) == pytest.approx(want, rel=eps), n


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
# Every other optimizer torch.optim has: its richest case of the shared table.
NONFINITE += [
    (c.opt, c.kwargs)
    for c in one_per_optimizer()
    if hasattr(torch.optim, c.opt)
    and c.opt not in {o for o, _ in NONFINITE}
    and c.opt not in SPARSE_ONLY
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
