"""Gradient transforms against the defects an audit found: ``skip_nonfinite`` skipping steps
whose gradients were all finite (their float32 sum of squares overflowed), the norm losing its
accuracy at extreme scales, one group's ``skip_nonfinite`` deciding for the others, GradScaler's
shrinking scale refused on steps it skips anyway, and GradScaler with sparse gradients."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastoptim as fo


@pytest.mark.parametrize("n", [3, 1024])
@pytest.mark.parametrize("dtype, big", [(np.float32, 1e20), (np.float64, 1e160)])
def test_huge_finite_gradients_are_not_skipped(n: int, dtype: type, big: float) -> None:
    """Finite gradients whose squares overflow (float32: |g| > 1.8e19; float64: > 1.3e154)
    were skipped as if non-finite (for float32, only in arrays of 32 elements or more)."""
    w = np.zeros(n, dtype)
    opt = fo.SGD([w], lr=1e-30, skip_nonfinite=True)
    g = np.full(n, big, dtype)
    opt.step([g])
    assert opt.step_skipped is False
    np.testing.assert_array_equal(w, -(dtype(1e-30) * g))  # (the SGD update, as computed)
    g[n // 2] = np.inf
    before = w.copy()
    opt.step([g])
    assert opt.step_skipped is True and np.array_equal(w, before)


@pytest.mark.parametrize("n", [3, 1000, 4099])
@pytest.mark.parametrize("scale", [1e-21, 1e-15, 1.0, 1e20, 1e30, 1e37])
def test_float32_norm_accurate_at_every_scale(n: int, scale: float) -> None:
    """The float32 norm (squares summed in float32 runs) was 1.4x too small at 1e-21 (11x at
    1e-30: squares underflowed) and infinite at 1e20 (overflowed); such pieces are now summed
    with float64 squares."""
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(n) * scale).astype(np.float32)
    exact = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
    opt = fo.SGD([np.zeros(n, np.float32)], lr=0.0, max_grad_norm=1e38)
    norm = opt.step([g])
    assert norm is not None and abs(norm - exact) <= 1e-6 * exact


@pytest.mark.parametrize("n", [1, 16, 31, 32, 33, 64, 100, 1000, 4099])
@pytest.mark.parametrize(
    "dtype, value",
    [("float32", v) for v in (1e-23, 1e-25, 1e-30, 1e-38, 1e-40, 1e-45)]
    + [("bfloat16", v) for v in (1e-23, 1e-30, 1e-38, 1e-40)],  # (its least: 9.2e-41)
)
def test_a_norm_of_tiny_gradients_is_exact_whatever_their_count(
    n: int, value: float, dtype: str
) -> None:
    """Gradients whose float32 squares all underflow to 0 (|g| < ~1e-23): the runs of 32 had
    summed 0 while the last ``n % 32`` elements were squared in float64, so the norm depended
    on ``n % 32`` (64 elements of 1e-25 gave 0, 16 gave 4e-25, 1000 gave 9% of the norm).
    Such runs are now summed with float64 squares too: exact at every scale."""
    import ml_dtypes

    dt = np.dtype(np.float32) if dtype == "float32" else np.dtype(ml_dtypes.bfloat16)
    g = np.full(n, value, np.float32).astype(dt)
    g[::3] = -g[::3]
    exact = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
    assert exact > 0
    opt = fo.SGD([np.zeros(n, dt)], lr=0.0, max_grad_norm=1.0)
    norm = opt.step([g])
    assert norm is not None and abs(norm - exact) <= 1e-6 * exact, (norm, exact)


def test_skip_nonfinite_counts_only_its_groups_gradients() -> None:
    """A NaN in a group with skip_nonfinite=False went into its update (as torch) but also
    skipped the step of a group asking to skip only on its own non-finite gradients."""
    a, b = np.ones(3, np.float32), np.ones(3, np.float32)
    opt = fo.SGD(
        [{"params": [a], "skip_nonfinite": True}, {"params": [b], "skip_nonfinite": False}],
        lr=1.0,
    )
    opt.step([np.full(3, 0.5, np.float32), np.array([np.nan, 0.5, 0.5], np.float32)])
    assert opt.step_skipped is False
    np.testing.assert_array_equal(a, [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(b, [np.nan, 0.5, 0.5])
    opt.step([np.array([np.inf, 0, 0], np.float32), np.full(3, 0.5, np.float32)])
    assert opt.step_skipped is True  # (its own: the whole step, every group)
    np.testing.assert_array_equal(a, [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(b, [np.nan, 0.5, 0.5])


def test_gradscaler_scale_out_of_range_on_skipped_steps_like_torch() -> None:
    """A loss that stays NaN makes GradScaler halve its scale at every (skipped) step, past the
    range a step can divide by: torch keeps skipping, fastoptim.torch raised."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    warnings.filterwarnings("ignore", "torch.cuda.amp|.*GradScaler", UserWarning)
    for mod in (torch.optim, fot):
        p = torch.zeros(3, requires_grad=True)
        opt = mod.AdamW([p], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-140)
        for _ in range(12):
            opt.zero_grad()
            scaler.scale((p * float("nan")).sum()).backward()
            scaler.step(opt)
            scaler.update()
        assert scaler.get_scale() == 0.0 and torch.equal(p, torch.zeros(3)), mod.__name__


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gradscaler_with_sparse_gradients_like_torch(name: str) -> None:
    """torch.optim's SGD and Adagrad take GradScaler with nn.Embedding(sparse=True); the
    fastoptim.torch ones raised (and GradScaler leaves the unscaling to them)."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    got = []
    for mod in (torch.optim, fot):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = getattr(mod, name)(emb.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for ids in ([1, 2, 2], [0, 9], [2, 5, 5, 5]):
            opt.zero_grad()
            scaler.scale(emb(torch.tensor(ids)).square().sum()).backward()
            scaler.step(opt)
            scaler.update()
        got.append(emb.weight.detach().clone())
    torch.testing.assert_close(got[1], got[0], rtol=1e-6, atol=1e-7)
