"""``cautious=True`` (Liang et al. 2024) against ``pytorch_optimizer``'s cautious variants
(skipped when it is not installed).

fastoptim's mask is element-wise only: the update where it agrees in sign with the gradient,
0 elsewhere, without the paper's per-tensor rescaling.  ``pytorch_optimizer`` rescales the
masked update by ``numel / (kept + 1)``; so from the same state, one step of each must move the
same elements, and theirs by that factor times ours (to float32 rounding).  Every element is
compared.  NAdam's and RAdam's (which pytorch_optimizer lacks) are compared with one step of
``torch.optim``'s: ours must take its step where it agrees with the gradient, none elsewhere.
The trajectories are compared against ``fastoptim.reference`` by test_kernels.py
and test_functional.py through the table's cautious rows (``cases.CASES``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
po = pytest.importorskip("pytorch_optimizer")

import fastoptim.torch as fot  # noqa: E402

N = 4099


@pytest.mark.parametrize(
    ("name", "kwargs", "first"),
    [
        ("Lion", dict(lr=1e-3), 2),  # at step 1 (m = 0) sign(u) = sign(g) everywhere
        ("Lion", dict(lr=1e-3, betas=(0.5, 0.9)), 3),
        # ADOPT's first update is its second step; pytorch_optimizer's clip step is 1-based
        ("ADOPT", dict(lr=1e-3), 2),
        ("ADOPT", dict(lr=1e-3), 4),
    ],
)
def test_mask_as_pytorch_optimizer_up_to_its_rescaling(
    name: str, kwargs: dict[str, Any], first: int, rng: np.random.Generator
) -> None:
    p0 = torch.tensor(rng.standard_normal(N), dtype=torch.float32)
    ours = p0.clone().requires_grad_()
    theirs = p0.clone().requires_grad_()
    extra: dict[str, Any] = {}
    if name == "ADOPT":
        extra = dict(foreach=False, clip_lambda=lambda t: (t - 1) ** 0.25)
    fast = getattr(fot, name)([ours], cautious=True, **kwargs)
    ref = getattr(po, name)([theirs], cautious=True, **kwargs, **extra)
    for t in range(1, first + 1):
        g = torch.tensor(rng.standard_normal(N), dtype=torch.float32)
        if t < first:  # the same state before the compared step: steps without the mask
            for opt in (fast, ref):
                opt.param_groups[0]["cautious"] = False
        else:
            for opt in (fast, ref):
                opt.param_groups[0]["cautious"] = True
        # align the states: both start the compared step from ours
        with torch.no_grad():
            theirs.copy_(ours)
        for n in fast.state[ours] if fast.state else ():
            if n in ref.state[theirs]:
                ref.state[theirs][n].copy_(fast.state[ours][n])
        ours.grad, theirs.grad = g.clone(), g.clone()
        before = ours.detach().clone()
        fast.step()
        ref.step()
    d_ours = (ours.detach() - before).numpy().astype(np.float64)
    d_theirs = (theirs.detach() - before).numpy().astype(np.float64)
    kept = d_ours != 0
    assert 0 < kept.sum() < N  # the mask drops some elements and keeps others
    np.testing.assert_array_equal(d_theirs != 0, kept)
    scale = N / (kept.sum() + 1)
    # |delta| ~ lr: rounding of p + delta in float32 is ~eps(|p|) <= 6e-7 * 4
    np.testing.assert_allclose(d_theirs, d_ours * scale, rtol=0, atol=4e-6)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("NAdam", dict(lr=1e-2)),
        ("NAdam", dict(lr=1e-2, momentum_decay=0.3)),
        ("RAdam", dict(lr=1e-2)),  # unrectified at first: the step is lr * m_hat
        ("RAdam", dict(lr=1e-2, betas=(0.9, 0.9))),  # rectified from step 6
    ],
)
@pytest.mark.parametrize("first", [2, 3, 7])  # (at step 1 every step agrees with g)
def test_nadam_radam_mask_torch_optims_step(
    name: str, kwargs: dict[str, Any], first: int, rng: np.random.Generator
) -> None:
    """pytorch_optimizer has no cautious NAdam / RAdam: from the same state, one cautious step
    of fastoptim.torch moves exactly the elements where torch.optim's step agrees in sign with
    the gradient (-delta * g > 0), by torch's step there, and leaves the others unchanged."""
    p0 = torch.tensor(rng.standard_normal(N), dtype=torch.float64)
    ours = p0.clone().requires_grad_()
    theirs = p0.clone().requires_grad_()
    fast = getattr(fot, name)([ours], cautious=False, **kwargs)
    ref = getattr(torch.optim, name)([theirs], foreach=False, **kwargs)
    for t in range(1, first + 1):
        fast.param_groups[0]["cautious"] = t == first
        with torch.no_grad():
            theirs.copy_(ours)
        for n, v in fast.state[ours].items() if fast.state else ():
            ref.state[theirs][n].copy_(v)
        g = torch.tensor(rng.standard_normal(N), dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        before = ours.detach().clone()
        fast.step()
        ref.step()
    d_ours = (ours.detach() - before).numpy()
    d_theirs = (theirs.detach() - before).numpy()
    agree = -d_theirs * g.numpy() > 0
    assert 0 < agree.sum() < N
    clear = np.abs(d_theirs) > 1e-12  # (a sign decided by rounding is not compared)
    np.testing.assert_array_equal((d_ours != 0)[clear], agree[clear])
    np.testing.assert_array_equal(d_ours[~agree & clear], 0.0)
    np.testing.assert_allclose(d_ours[agree], d_theirs[agree], rtol=1e-12, atol=1e-15)
