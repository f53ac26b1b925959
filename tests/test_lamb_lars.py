"""LAMB and LARS: the two-pass (per-tensor trust ratio) optimizers.

The NumPy reference (``fastoptim.reference.LAMB`` / ``LARS``, the papers' algorithms) is checked by
test_kernels.py like every optimizer of the table (tests/cases.py), thread counts and offsets
included.  Here:

* ``fastoptim.torch.LAMB`` / ``LARS`` step by step against ``pytorch_optimizer.Lamb`` / ``LARS``
  (skipped when ``pytorch_optimizer`` is not installed), float32 and float64.
  ``pytorch_optimizer.Lamb`` differs from fastoptim's LAMB in two documented places, mapped here
  rather than followed: it has no ``v`` bias correction but divides the step by
  ``1 - beta1^t`` (compared with ``bias_correction=False`` and ``lr_t = lr / (1 - beta1^t)``,
  ``weight_decay_t = weight_decay * (1 - beta1^t)`` for the decoupled decay, the same maths), and
  it adds ``eps`` to ``||u||`` in the ratio (a relative 1e-6 / ||u|| difference, inside the
  tolerance);
* a reduced-precision state (bfloat16, float16) against the reference within the rounding of the
  state, and the determinism of the per-tensor norms (1 vs 3 threads, bit for bit) in every
  layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastoptim
from fastoptim import reference

SHAPES: list[tuple[int, ...]] = [(), (1,), (17,), (3, 5), (40, 103), (2, 3, 50)]


def _problem(seed: int, dtype: Any) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    params = [np.asarray(0.1 * rng.standard_normal(s)).astype(dtype) for s in SHAPES]
    grads = [
        [np.asarray(rng.standard_normal(s) * (rng.random(s) > 0.1)).astype(dtype) for s in SHAPES]
        for _ in range(20)
    ]
    return params, grads


def _rtol(dtype: Any) -> float:
    # float32: the torch oracle sums and rounds in other orders (norms included): measured
    # <= 2e-6 relative over 20 steps; float64 ~1e-13 (eps in pytorch_optimizer's ratio: 1e-6/||u||)
    return 2e-5 if dtype == np.float32 else 1e-9


# eps = 1e-12 makes pytorch_optimizer's ||u|| + eps in the ratio vanish; the last case keeps
# the default 1e-6 (then the ratio differs by up to 1e-6 relative on the 1-element tensors)
LAMB_CASES = [
    dict(lr=0.01, eps=1e-12),
    dict(lr=0.01, weight_decay=0.1, eps=1e-12),
    dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, eps=1e-12),
    dict(lr=0.02, betas=(0.8, 0.99), maximize=True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kw", LAMB_CASES, ids=lambda kw: "-".join(kw))
def test_lamb_matches_pytorch_optimizer(kw: dict[str, Any], dtype: Any) -> None:
    torch = pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    import fastoptim.torch as fot

    params, grads = _problem(1, dtype)
    theirs = [torch.tensor(p) for p in params]
    mine = [torch.tensor(p) for p in params]
    lr, wd = kw["lr"], kw.get("weight_decay", 0.0)
    beta1 = kw.get("betas", (0.9, 0.999))[0]
    decoupled = kw.get("decoupled_weight_decay", False)
    po_kw = {k: v for k, v in kw.items() if k not in ("decoupled_weight_decay", "maximize")}
    ref = po.Lamb(theirs, weight_decouple=decoupled, maximize=kw.get("maximize", False), **po_kw)
    opt = fot.LAMB(mine, bias_correction=False, **kw)
    rtol = _rtol(dtype) if kw.get("eps") else max(_rtol(dtype), 2e-6)
    for t, gs in enumerate(grads, start=1):
        bc1 = 1 - beta1**t
        opt.param_groups[0]["lr"] = lr / bc1
        if decoupled:
            opt.param_groups[0]["weight_decay"] = wd * bc1
        for a, b, g in zip(theirs, mine, gs):
            a.grad = torch.tensor(g)
            b.grad = torch.tensor(g)
        ref.step()
        opt.step()
        for i, (a, b) in enumerate(zip(theirs, mine)):
            scale = float(a.abs().max()) if a.numel() else 0.0
            np.testing.assert_allclose(
                b.numpy(), a.numpy(), rtol=rtol, atol=rtol * scale, err_msg=f"step {t} param {i}"
            )
            for n in ("exp_avg", "exp_avg_sq"):
                np.testing.assert_allclose(
                    opt.state[b][n].numpy(), ref.state[a][n].numpy(), rtol=_rtol(dtype),
                    atol=_rtol(dtype) * float(ref.state[a][n].abs().max()), err_msg=n,
                )  # fmt: skip


LARS_CASES = [
    dict(lr=0.5, trust_coefficient=0.02),
    dict(lr=0.5, trust_coefficient=0.02, momentum=0.0),
    dict(lr=0.5, trust_coefficient=0.02, nesterov=True, weight_decay=0.1),
    dict(lr=0.5, trust_coefficient=0.02, dampening=0.3, weight_decay=0.125),
    dict(lr=0.2, momentum=0.5, maximize=True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kw", LARS_CASES, ids=lambda kw: "-".join(kw))
def test_lars_matches_pytorch_optimizer(kw: dict[str, Any], dtype: Any) -> None:
    torch = pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    import fastoptim.torch as fot

    params, grads = _problem(2, dtype)
    theirs = [torch.tensor(p) for p in params]
    mine = [torch.tensor(p) for p in params]
    ref = po.LARS(theirs, foreach=False, **kw)
    opt = fot.LARS(mine, **kw)
    for t, gs in enumerate(grads, start=1):
        for a, b, g in zip(theirs, mine, gs):
            a.grad = torch.tensor(g)
            b.grad = torch.tensor(g)
        ref.step()
        opt.step()
        for i, (a, b) in enumerate(zip(theirs, mine)):
            scale = float(a.abs().max()) if a.numel() else 0.0
            np.testing.assert_allclose(
                b.numpy(), a.numpy(), rtol=_rtol(dtype), atol=_rtol(dtype) * scale,
                err_msg=f"step {t} param {i}",
            )  # fmt: skip
            if kw.get("momentum", 0.9) > 0:
                want = ref.state[a]["momentum_buffer"]
                np.testing.assert_allclose(
                    opt.state[b]["momentum_buffer"].numpy(), want.numpy(), rtol=_rtol(dtype),
                    atol=_rtol(dtype) * float(want.abs().max()), err_msg="momentum_buffer",
                )  # fmt: skip


def test_lars_excludes_vectors_and_scalars() -> None:
    """exclude_1d: 0-d and 1-d tensors take plain momentum SGD (no weight decay, no ratio),
    bit for bit as LARS's own update with trust ratio 1; 2-d ones are adapted."""
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s) for s in ((), (30,), (5, 6))]
    grads = [rng.standard_normal(p.shape) for p in params]
    plain = [p.copy() for p in params]
    fastoptim.LARS(params, lr=0.1, momentum=0, weight_decay=0.5).step(grads)
    for p, q, g in zip(params[:2], plain[:2], grads[:2]):
        np.testing.assert_allclose(p, q - 0.1 * g, rtol=1e-15, atol=1e-16)
    adapted = plain[2] - params[2]
    assert not np.allclose(adapted, 0.1 * grads[2])
    both = [p.copy() for p in plain]
    fastoptim.LARS(both, lr=0.1, momentum=0, weight_decay=0.5, exclude_1d=False).step(grads)
    assert not np.allclose(both[1], params[1])


def test_lamb_trust_ratio_normalises_the_step() -> None:
    """Without clamps the step of every tensor has the norm lr * ||p|| (the point of LAMB),
    whatever the gradient's scale; a zero parameter takes the plain Adam-like step (ratio 1)."""
    rng = np.random.default_rng(6)
    params = [rng.standard_normal((20, 30)), np.zeros(50), rng.standard_normal(7) * 1e-3]
    before = [p.copy() for p in params]
    grads = [rng.standard_normal(p.shape) * s for p, s in zip(params, (1e3, 1.0, 1e-6))]
    fastoptim.LAMB(params, lr=0.01, max_weight_norm=None).step(grads)
    for p, b in ((params[0], before[0]), (params[2], before[2])):
        np.testing.assert_allclose(np.linalg.norm(p - b), 0.01 * np.linalg.norm(b), rtol=1e-12)
    # step 1: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps): the sign for |g| >> eps
    np.testing.assert_allclose(params[1], -0.01 * grads[1] / (np.abs(grads[1]) + 1e-6))


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_lamb_reduced_state_like_reference(state_dtype: str) -> None:
    """A state stored rounded (bfloat16, float16): the update is that of the unrounded moments,
    as the reference's float32 step followed by the rounding of the state (the compiled layouts
    are checked bit for bit against the float32 kernel by test_precision.py, int8 by
    test_quantized.py: the reference classes do not dequantize an int8 state); here the
    reference class agrees to float32 rounding after 5 steps."""
    rng = np.random.default_rng(7)
    shapes = [(300,), (20, 30), (5000,)]
    a = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    b = [x.copy() for x in a]
    fast = fastoptim.LAMB(a, lr=0.01, state_dtype=state_dtype)
    ref = reference.LAMB(b, lr=0.01, state_dtype=state_dtype)
    for _ in range(5):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        fast.step(grads)
        ref.step(grads)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()))


LAYOUTS: list[dict[str, Any]] = [
    {},
    {"state_dtype": "bfloat16"},
    {"master_weights": True},
    {"kahan": True},
    {"state_dtype": "int8"},
]


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
@pytest.mark.parametrize(
    "layout", LAYOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items())
)
def test_bit_identical_across_thread_counts_every_layout(name: str, layout: dict[str, Any]) -> None:
    """Pass 1's per-tensor sums follow the fixed chunks, whoever runs them: the same bits with 1
    and 3 threads, in every layout (bfloat16 parameters for master/kahan, int8 state
    included)."""
    import ml_dtypes

    low = layout.get("master_weights") or layout.get("kahan")
    dtype = np.dtype(ml_dtypes.bfloat16) if low else np.dtype(np.float32)
    rng = np.random.default_rng(8)
    shapes = [(300_000,), (5000, 7), (17,), ()]
    start = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    kw: dict[str, Any] = {"lr": 0.01} if name == "LAMB" else {"lr": 0.5, "weight_decay": 0.1}
    results = []
    before = fastoptim.get_num_threads()
    try:
        for threads in (1, 3):
            fastoptim.set_num_threads(threads)
            params = [p.copy() for p in start]
            opt = getattr(fastoptim, name)(params, **kw, **layout)
            for g in grads:
                opt.step(g)
            results.append((params, opt.state_dict()))
    finally:
        fastoptim.set_num_threads(before)
    (p1, s1), (p3, s3) = results
    for x, y in zip(p1, p3):
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))
    for k, st in s1["state"].items():
        for n, v in st.items():
            w = s3["state"][k][n]
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(
                    np.asarray(v).reshape(-1).view(np.uint8),
                    np.asarray(w).reshape(-1).view(np.uint8),
                )


def test_bench_reports_the_reduction_pass() -> None:
    """``fastoptim bench`` rows of LAMB and LARS count both passes' bytes (40 and 28 per float32
    element), compare with a streaming workload of those reads and writes, say so under the
    table, and time pytorch_optimizer's classes as the torch contenders when installed."""
    from fastoptim.apps import bench

    assert bench.two_pass_bytes("LAMB") == (40, 24, 7, 3)
    assert bench.two_pass_bytes("LARS") == (28, 8, 5, 2)
    threads = fastoptim.get_num_threads()
    fastoptim.set_num_threads(1)
    try:
        rows = bench.run(["LAMB", "LARS"], ["mlp"], repeats=1, rounds=1, torch=True)
    finally:
        fastoptim.set_num_threads(threads)
    assert [(r.optimizer, r.bytes // r.elements) for r in rows] == [("LAMB", 40), ("LARS", 28)]
    table = bench.format_table(rows)
    assert "LAMB: two passes, 40 B/el" in table and "LARS: two passes, 28 B/el" in table
    try:
        import pytorch_optimizer  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return
    assert all("torch pytorch_optimizer foreach" in r.times for r in rows)


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_sharded_dtensor_parameters_are_refused(name: str, process_group: Any) -> None:
    """A DTensor parameter holds a shard: its norms are not the tensor's, so the step refuses it
    with a ValueError naming the optimizer (one process, gloo, a 1-rank mesh), and changes
    nothing."""
    torch = pytest.importorskip("torch")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fastoptim.torch as fot

    mesh = init_device_mesh("cpu", (1,))
    p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
    before = p.detach().full_tensor().clone()
    opt = getattr(fot, name)([p])
    with pytest.raises(ValueError, match=f"{name}: param 0 of group 0: a trust ratio needs each"):
        opt.step()
    assert torch.equal(p.detach().full_tensor(), before)
    assert not opt.state  # (refused before any state was made)
