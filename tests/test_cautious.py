"""``cautious=True`` (Liang et al. 2024) against ``pytorch_optimizer``'s cautious variants
(skipped when it is not installed).

fastoptim's mask is element-wise only: the update where it agrees in sign with the gradient,
0 elsewhere, without the paper's per-tensor rescaling.  ``pytorch_optimizer`` rescales the
masked update by ``numel / (kept + 1)``; so from the same state, one step of each must move the
same elements, and theirs by that factor times ours (to float32 rounding).  Every element is
compared.  The trajectories are compared against ``fastoptim.reference`` by test_kernels.py
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
