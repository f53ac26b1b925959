"""Gradient transforms folded into the step (fastoptim.engine.transforms): loss scaling
(``grad_scale``), value clipping (``max_grad_value``), global-norm clipping (``max_grad_norm``),
skipping non-finite steps (``skip_nonfinite``) and the EMA of the parameters (``ema_decay``).

Oracles:
- the norm pass against a float64 NumPy sum (1e-12 relative), and bit for bit against itself for
  every thread count and instruction set;
- a transformed step, bit for bit, against the plain step of the same optimizer fed the
  gradients transformed in NumPy as the kernels transform them: clamp(g * mul) in the compute
  dtype, with mul and the clamp bound from the returned norm (so the fold is exact);
- every optimizer against fastoptim.reference (whose transform_grads and ema_update are the
  readable versions, in torch's order: unscale, clamp, then the clip factor), element-wise;
- torch: clip_grad_norm_ + torch.optim, GradScaler with torch.optim, swa_utils' EMA (see
  test_torch_transforms.py).
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from cases import Case, check_close, each_case, one_per_optimizer
from fastoptim import _core, reference
from fastoptim import functional as F

BF16 = np.dtype(ml_dtypes.bfloat16)
SIZES = [0, 1, 7, 15, 16, 17, 33, 255, 257, 8191, 8193, 40000]


def _plan(grads: list[np.ndarray]) -> Any:
    params = [np.zeros(g.shape, np.float64 if g.dtype == np.float64 else np.float32) for g in grads]
    plan = _core.Plan(params, [str(i) for i in range(len(params))], [], [])
    plan.bind_grads(grads)
    return plan


@pytest.fixture
def restore_threads() -> Any:
    n, isa, grain = fo.get_num_threads(), fo.isa(), _core.get_grain()
    yield
    fo.set_num_threads(n)
    _core.set_isa(isa)
    _core.set_grain(grain)


# ----------------------------------------------------------------------------- the norm pass
@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16, np.float16], ids=str)
def test_grad_stats_matches_float64_sum(dtype: Any, rng: np.random.Generator) -> None:
    grads = [(rng.standard_normal(n) * 3).astype(dtype) for n in SIZES]
    plan = _plan(grads)
    for mul, clip in [(1.0, math.inf), (0.25, math.inf), (0.5, 0.7), (3.0, 1.5)]:
        plan.set_grad_transform(mul, clip)
        sumsq, finite = plan.grad_stats()
        cd = np.float64 if dtype == np.float64 else np.float32
        xs = [np.clip(np.asarray(g, cd) * cd(mul), -cd(clip), cd(clip)) for g in grads]
        want = sum(float(np.sum(np.square(x.astype(np.float64)))) for x in xs)
        assert finite
        # float64 gradients: float64 sums; the others: float32 squares summed 8 at a time in
        # float32, then in float64 (a few float32 ulps)
        tol = 1e-12 if dtype == np.float64 else 1e-6
        assert abs(sumsq - want) <= tol * want, (mul, clip, sumsq, want)


def test_grad_stats_bit_identical_for_any_threads_and_isa(
    rng: np.random.Generator, restore_threads: Any
) -> None:
    grads = [rng.standard_normal(n).astype(np.float32) for n in (3, 300_001, 17, 2_000_000)]
    plan = _plan(grads)
    plan.set_grad_transform(0.5, 1.25)
    _core.set_grain(1)  # parallel whatever the size
    results = set()
    for isa in fo.available_isas():
        _core.set_isa(isa)
        for threads in (1, 2, 3, 4):
            fo.set_num_threads(threads)
            results.add(plan.grad_stats())
    assert len(results) == 1, results


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", [0, 16, 8192, -1])
def test_grad_stats_finds_any_nonfinite(bad: float, where: int) -> None:
    grads = [np.ones(5, np.float32), np.ones(20000, np.float32)]
    grads[1][where] = bad
    plan = _plan(grads)
    plan.set_grad_transform(1.0, 0.5)  # (clipped values are finite: the flag reads g itself)
    assert plan.grad_stats()[1] is False
    grads[1][where] = 1.0
    assert plan.grad_stats() == (0.25 * 20005, True)


# ----------------------------------------------------------------------------- the step
OPTIONS = [
    pytest.param(dict(max_grad_norm=0.3), id="norm"),
    pytest.param(dict(max_grad_value=0.05), id="value"),
    pytest.param(dict(max_grad_norm=0.3, max_grad_value=0.5), id="value+norm"),
    pytest.param(dict(max_grad_norm=1e6), id="norm-not-reached"),
    pytest.param(dict(skip_nonfinite=True), id="skip"),
    pytest.param({}, id="scale-only"),
]


def _grads(rng: np.random.Generator, params: list[np.ndarray]) -> list[np.ndarray]:
    return [(rng.standard_normal(p.shape) * 4).astype(p.dtype) for p in params]


def _params(rng: np.random.Generator, dtype: Any) -> list[np.ndarray]:
    return [(0.1 * rng.standard_normal(n)).astype(dtype) for n in (1, 17, 300, 20000)]


def _kernel_grads(
    grads: list[np.ndarray], norm: float | None, opts: dict[str, Any], scale: float
) -> list[np.ndarray]:
    """The gradients as the kernels see them: clamp(g * mul, -clip, clip) in the compute dtype,
    mul and clip as engine.transforms folds them."""
    mul, clip = 1.0 / scale, opts.get("max_grad_value", math.inf)
    if opts.get("max_grad_norm") is not None:
        assert norm is not None
        c = min(1.0, opts["max_grad_norm"] / (norm + 1e-6))
        mul, clip = mul * c, clip * c
    out = []
    for g in grads:
        t = g.dtype.type
        out.append(np.clip(g * t(mul), -t(clip), t(clip)).astype(g.dtype))
    return out


@each_case(one_per_optimizer())
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_step_equals_plain_step_on_transformed_grads(
    case: Case, opts: dict[str, Any], dtype: Any, rng: np.random.Generator
) -> None:
    a = _params(rng, dtype)
    b = [p.copy() for p in a]
    cls = getattr(fo, case.opt)
    fast = cls(a, **case.kwargs, **opts)
    plain = cls(b, **case.kwargs)
    for step in range(4):
        grads = _grads(rng, a)
        scale = 2.0 ** (step % 3)
        norm = fast.step(grads, grad_scale=scale)
        assert fast.step_skipped is False
        if "max_grad_norm" in opts:
            cd = np.float64 if dtype == np.float64 else np.float32
            want = math.sqrt(sum(
                float(np.sum(np.square(np.clip(g * cd(1 / scale), -cd(opts.get(
                    "max_grad_value", np.inf)), cd(opts.get("max_grad_value", np.inf))).astype(
                    np.float64)))) for g in grads))  # fmt: skip
            tol = 1e-12 if dtype == np.float64 else 1e-6
            assert norm is not None and abs(norm - want) <= tol * want
            assert fast.grad_norm == norm
        else:
            assert norm is None and fast.grad_norm is None
        plain.step(_kernel_grads(grads, norm, opts, scale))
        for i, (x, y) in enumerate(zip(a, b)):
            assert np.array_equal(x, y), (step, i)


@each_case(one_per_optimizer())
@pytest.mark.parametrize("opts", OPTIONS)
def test_matches_reference(case: Case, opts: dict[str, Any], rng: np.random.Generator) -> None:
    a = _params(rng, np.float64)
    b = [p.copy() for p in a]
    fast = getattr(fo, case.opt)(a, **case.kwargs, **opts)
    ref = getattr(reference, case.opt)(b, **case.kwargs, **opts)
    for step in range(4):
        grads = _grads(rng, a)
        n1 = fast.step(grads, grad_scale=4.0)
        n2 = ref.step(grads, grad_scale=4.0)
        assert (n1 is None) == (n2 is None)
        if n1 is not None:
            assert n2 is not None and abs(n1 - n2) <= 1e-12 * n2
        for i, (x, y) in enumerate(zip(a, b)):
            check_close(f"{case.id} step {step} param {i}", x, y, 1e-12, 1e-12)


def test_unscaled_clip_is_clip_grad_norm_of_the_unscaled_gradients(
    rng: np.random.Generator,
) -> None:
    """grad_scale and max_grad_norm together: the norm of g / scale (what clip_grad_norm_ sees
    after GradScaler.unscale_)."""
    p = [np.zeros(1000, np.float32)]
    opt = fo.SGD(p, lr=1.0, max_grad_norm=1.0)
    g = rng.standard_normal(1000).astype(np.float32)
    norm = opt.step([g * np.float32(1024)], grad_scale=1024.0)
    assert norm is not None
    assert abs(norm - float(np.linalg.norm(g.astype(np.float64)))) <= 1e-6 * norm
    np.testing.assert_allclose(-p[0], g / (norm + 1e-6), rtol=1e-6)


def test_bit_identical_across_thread_counts(rng: np.random.Generator, restore_threads: Any) -> None:
    shapes = [(3,), (100_003,), (257,), (600_000,)]
    g0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    results = []
    _core.set_grain(1)
    for threads in (1, 2, 3):
        fo.set_num_threads(threads)
        ps = [np.full(s, 0.5, np.float32) for s in shapes]
        opt = fo.AdamW(ps, lr=0.01, max_grad_norm=0.5, max_grad_value=2.0, ema_decay=0.9)
        norms = [opt.step(g0, grad_scale=2.0) for _ in range(3)]
        results.append((norms, ps, [opt.state[i]["ema"] for i in range(len(ps))]))
    for norms, ps, emas in results[1:]:
        assert norms == results[0][0]
        for x, y in zip(ps + emas, results[0][1] + results[0][2]):
            assert np.array_equal(x, y)


# ----------------------------------------------------------------------------- skipping
@each_case(one_per_optimizer())
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_skip_nonfinite_changes_nothing(case: Case, bad: float, rng: np.random.Generator) -> None:
    a = _params(rng, np.float32)
    b = [p.copy() for p in a]
    lr = fo.schedules.linear(case.kwargs.get("lr", 0.01), 0.0, 10) if "lr" in case.kwargs else None
    kw = {**case.kwargs, **({"lr": lr} if lr is not None else {})}
    fast = getattr(fo, case.opt)(a, **kw, skip_nonfinite=True, ema_decay=0.5)
    clean = getattr(fo, case.opt)(b, **kw, skip_nonfinite=True, ema_decay=0.5)
    for step in range(4):
        grads = _grads(rng, a)
        if step == 2:
            before = [p.copy() for p in a]
            state = [{k: np.copy(v) for k, v in fast.state[i].items()} for i in range(len(a))]
            lr_before = fast.param_groups[0].get("lr")
            poisoned = [g.copy() for g in grads]
            poisoned[3][1234] = bad
            assert fast.step(poisoned) is None
            assert fast.step_skipped is True
            for x, y in zip(a, before):
                assert np.array_equal(x, y)
            assert fast.step_count == 2
            assert fast.param_groups[0].get("lr") == lr_before  # schedules did not advance
            for i, entry in enumerate(state):
                for k, v in entry.items():
                    assert np.array_equal(np.asarray(fast.state[i][k]), v), (i, k)
        fast.step(grads)
        clean.step(grads)
        assert fast.step_skipped is False
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    for i in range(len(a)):
        for name, v in clean.state[i].items():
            assert np.array_equal(fast.state[i][name], v), name


def test_without_skip_nonfinite_gradients_go_into_the_update() -> None:
    p = [np.zeros(4, np.float32)]
    opt = fo.SGD(p, lr=0.1, max_grad_norm=1.0)
    norm = opt.step([np.array([1, np.inf, 0, 0], np.float32)])
    assert norm == math.inf and not opt.step_skipped
    # as torch: coef = 1 / (inf + 1e-6) = 0, so finite gradients give 0 and inf * 0 NaN
    assert np.array_equal(np.isnan(p[0]), [False, True, False, False])


# ----------------------------------------------------------------------------- the EMA
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(dict(dtype=np.float32), id="float32"),
        pytest.param(dict(dtype=np.float64), id="float64"),
        pytest.param(dict(dtype=BF16), id="bf16-fp32-ema"),
        pytest.param(dict(dtype=BF16, master_weights=True), id="bf16-master"),
        pytest.param(dict(dtype=BF16, state_dtype="bfloat16"), id="all-bf16"),
        pytest.param(
            dict(dtype=BF16, state_dtype="bfloat16", rounding="stochastic", seed=3),
            id="all-bf16-stochastic",
        ),
        pytest.param(dict(dtype=np.float16, state_dtype={"ema": "float16"}), id="fp16-ema"),
    ],
)
@pytest.mark.parametrize("opt", ["Adam", "SGD"])
def test_ema_matches_reference(layout: dict[str, Any], opt: str, rng: np.random.Generator) -> None:
    layout = dict(layout)
    dtype = layout.pop("dtype")
    a = [(0.1 * rng.standard_normal(n)).astype(dtype) for n in (1, 17, 5000, 9000)]
    b = [p.copy() for p in a]
    kw: dict[str, Any] = dict(lr=0.01, ema_decay=0.75, **layout)
    if opt == "SGD":
        kw["momentum"] = 0.9
    fast = getattr(fo, opt)(a, **kw)
    ref = getattr(reference, opt)(b, **kw)
    for _ in range(5):
        grads = [rng.standard_normal(p.shape).astype(np.float32 if dtype != np.float64 else
                                                     np.float64) for p in a]  # fmt: skip
        fast.step(grads)
        ref.step(grads)
    for i in range(len(a)):
        e1, e2 = fast.state[i]["ema"], ref.state[i]["ema"]
        assert e1.dtype == e2.dtype
        want_dtype = {"float64": "float64"}.get(np.dtype(dtype).name, "float32")
        if layout.get("state_dtype") == "bfloat16":
            want_dtype = "bfloat16"
        if isinstance(layout.get("state_dtype"), dict):
            want_dtype = "float16"
        assert e1.dtype.name == want_dtype
        # the same operations as the reference, up to the kernels' fused multiply-adds: a few
        # float32 ulps, which a rounding to 16 bits can turn into one ulp of those
        for what, x, y in ((f"ema {i}", e1, e2), (f"param {i}", a[i], b[i])):
            tol = {"float64": 1e-12, "float32": 1e-5}.get(a[i].dtype.name, 2.0**-7)
            m = float(np.max(np.abs(y.astype(np.float64))))
            check_close(what, x.astype(np.float64), y.astype(np.float64), tol, tol * m)


def test_ema_starts_as_the_parameter_and_follows_lerp(rng: np.random.Generator) -> None:
    p0 = rng.standard_normal(1000).astype(np.float32)
    p = [p0.copy()]
    opt = fo.SGD(p, lr=0.1, ema_decay=0.9)
    ema = p0.copy()
    for _ in range(3):
        g = rng.standard_normal(1000).astype(np.float32)
        opt.step([g])
        want = ema.copy()
        reference._lerp_(want, p[0], 1.0 - 0.9)
        ema = want
        # (the kernels' lerp is one fused multiply-add where the ISA has FMA: an ulp apart)
        check_close("ema", opt.state[0]["ema"], ema, 2.5e-7, 1e-9)
        ema = opt.state[0]["ema"].copy()


def test_ema_weights_swaps_in_and_restores_exactly(rng: np.random.Generator) -> None:
    p = [rng.standard_normal(100).astype(BF16), rng.standard_normal(7).astype(np.float32)]
    opt = fo.AdamW(p, lr=0.1, ema_decay=0.5, master_weights=True)
    for _ in range(3):
        opt.step([rng.standard_normal(a.shape).astype(np.float32) for a in p])
    before = [a.copy() for a in p]
    with opt.ema_weights():
        assert np.array_equal(p[0], opt.state[0]["ema"].astype(BF16))
        assert np.array_equal(p[1], opt.state[1]["ema"])
        assert not np.array_equal(p[1], before[1])
    for x, y in zip(p, before):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))
    with pytest.raises(RuntimeError), opt.ema_weights():
        raise RuntimeError("evaluation failed")
    for x, y in zip(p, before):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))
    with pytest.raises(ValueError, match="no parameter has an EMA"):
        with fo.SGD([np.zeros(3, np.float32)], lr=0.1).ema_weights():
            pass
    # inside the block: anything but a step (which raises, changing nothing)
    with opt.ema_weights():
        sd = opt.state_dict()
        with pytest.raises(RuntimeError, match="inside ema_weights"):
            opt.step([rng.standard_normal(a.shape).astype(np.float32) for a in p])
        with pytest.raises(RuntimeError, match="already inside"):
            with opt.ema_weights():
                pass
    assert sd["state"] and opt.step_count == 3
    for x, y in zip(p, before):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


def test_ema_checkpoint_round_trip(tmp_path: Any, rng: np.random.Generator) -> None:
    p = [rng.standard_normal(50).astype(np.float32)]
    opt = fo.Adam(p, lr=0.01, ema_decay=0.9, max_grad_norm=1.0)
    opt.step([rng.standard_normal(50).astype(np.float32)])
    fo.save(tmp_path / "a.npz", opt)
    q = [np.zeros(50, np.float32)]
    other = fo.Adam(q, lr=0.01, ema_decay=0.9, max_grad_norm=1.0)
    fo.load(tmp_path / "a.npz", other)
    assert np.array_equal(other.state[0]["ema"], opt.state[0]["ema"])
    g = rng.standard_normal(50).astype(np.float32)
    assert opt.step([g]) == other.step([g])
    assert np.array_equal(p[0], q[0])
    assert np.array_equal(other.state[0]["ema"], opt.state[0]["ema"])
    opt.load_state_dict(opt.state_dict())
    no_ema = fo.Adam([np.zeros(50, np.float32)], lr=0.01)
    fo.load(tmp_path / "a.npz", no_ema)  # the checkpoint's ema_decay wins, as load_state_dict's
    assert no_ema.param_groups[0]["ema_decay"] == 0.9 and "ema" in no_ema.state[0]


# ----------------------------------------------------------------------------- functional
def test_functional_takes_grad_scale_value_clip_and_ema(rng: np.random.Generator) -> None:
    p = rng.standard_normal(300).astype(np.float32)
    g = rng.standard_normal(300).astype(np.float32) * 8
    a, b = [p.copy()], [p.copy()]
    opt = fo.Adam(a, lr=0.01, max_grad_value=0.5, ema_decay=0.8)
    opt.step([g], grad_scale=4.0)
    m, v, ema = np.zeros_like(p), np.zeros_like(p), p.copy()
    F.adam_(b[0], g, m, v, step=1, lr=0.01, max_grad_value=0.5, ema_decay=0.8, ema=ema,
            grad_scale=4.0)  # fmt: skip
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(opt.state[0]["ema"], ema)
    with pytest.raises(ValueError, match="ema_decay and ema go together"):
        F.adam_(b[0], g, m, v, step=2, lr=0.01, ema_decay=0.8)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=math.inf), ValueError, "max_grad_norm"),
        (dict(max_grad_norm="1"), TypeError, "max_grad_norm"),
        (dict(max_grad_value=math.nan), ValueError, "max_grad_value"),
        (dict(ema_decay=1.5), ValueError, "ema_decay"),
        (dict(ema_decay=True), TypeError, "ema_decay"),
        (dict(skip_nonfinite=1), TypeError, "skip_nonfinite"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fo.Adam([np.zeros(3, np.float32)], lr=0.1, **kwargs)
    opt = fo.Adam([np.zeros(3, np.float32)], lr=0.1)
    opt.param_groups[0].update(kwargs)
    with pytest.raises(error, match=match):
        opt.step([np.ones(3, np.float32)])
    assert opt.step_count == 0


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan, "2", True])
def test_bad_grad_scale_changes_nothing(scale: Any) -> None:
    p = [np.ones(3, np.float32)]
    opt = fo.SGD(p, lr=0.1, max_grad_norm=1.0)
    with pytest.raises((TypeError, ValueError), match="grad_scale"):
        opt.step([np.ones(3, np.float32)], grad_scale=scale)
    assert np.array_equal(p[0], np.ones(3, np.float32)) and opt.step_count == 0


def test_reduce_grad_stats(rng: np.random.Generator) -> None:
    """A reduction across processes: here two identical 'processes' (the sums double), so the
    norm is sqrt(2) times this process's; a reduction that returns a wrong shape is an error
    that changes nothing."""
    g = rng.standard_normal(100).astype(np.float32)
    p = [np.zeros(100, np.float32)]
    opt = fo.SGD(p, lr=1.0, max_grad_norm=1e-3)
    local = float(np.linalg.norm(g.astype(np.float64)))
    opt.reduce_grad_stats = lambda s: 2 * s
    norm = opt.step([g])
    assert norm is not None and abs(norm - math.sqrt(2) * local) <= 1e-6 * norm
    opt.reduce_grad_stats = lambda s: s[:1]
    before = p[0].copy()
    with pytest.raises(ValueError, match="reduce_grad_stats"):
        opt.step([g])
    assert np.array_equal(p[0], before) and opt.step_count == 1
    # a non-finite gradient on another process skips the step here too
    opt2 = fo.SGD([np.zeros(100, np.float32)], lr=1.0, skip_nonfinite=True)
    opt2.reduce_grad_stats = lambda s: s + np.array([0.0, 1.0])
    opt2.step([g])
    assert opt2.step_skipped and opt2.step_count == 0


def test_ema_with_int8_state_for_any_threads(
    rng: np.random.Generator, restore_threads: Any
) -> None:
    """8-bit state runs whole 256-element blocks (a block belongs to the chunk holding its first
    element): the EMA must follow the elements each chunk updated, so that the result is the
    same for any thread count, and the EMA is the lerp of the parameters' trajectory."""
    shapes = [(10_077,), (5,), (70_003,)]
    g0 = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    runs = []
    _core.set_grain(1)
    for threads in (1, 2, 3):
        fo.set_num_threads(threads)
        ps = [np.full(s, 0.25, np.float32) for s in shapes]
        opt = fo.AdamW(ps, lr=0.01, state_dtype="int8", ema_decay=0.75, max_grad_norm=10.0)
        ema = [p.copy() for p in ps]
        for grads in g0:
            opt.step(grads)
            for e, p in zip(ema, ps):
                reference._lerp_(e, p, 0.25)
        for i in range(len(ps)):
            check_close(f"ema {i}", opt.state[i]["ema"], ema[i], 1e-6, 1e-7)
        runs.append([*ps, *(opt.state[i]["ema"] for i in range(len(ps)))])
    for other in runs[1:]:
        for x, y in zip(other, runs[0]):
            assert np.array_equal(x, y)


def test_bench_transforms_table() -> None:
    """``fastoptim bench --transforms`` on a small tensor: every row timed (a smoke test; the
    numbers themselves belong to the bench, not to tests)."""
    from fastoptim.apps import bench

    rows = bench.run_transforms(size=20_000, repeats=1, rounds=1)
    assert [r.name for r in rows] == [
        "norm pass (grad_stats)",
        "AdamW",
        "AdamW max_grad_norm",
        "AdamW ema_decay",
        "AdamW both",
    ]
    assert all(r.time[0] > 0 and r.base[0] > 0 for r in rows)
    table = bench.format_transforms(rows, 20_000)
    assert all(r.name in table for r in rows)


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize(
    "pdtype,gdtype",
    [
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.float32, BF16),
        (BF16, BF16),
        (np.float16, np.float32),
    ],
    ids=str,
)
def test_accumulate_adds_into_the_gradient_buffers(
    pdtype: Any, gdtype: Any, rng: np.random.Generator, restore_threads: Any
) -> None:
    shapes = [(3,), (257,), (40, 103), (20_000,)]
    params = [rng.standard_normal(s).astype(pdtype) for s in shapes]
    micro = [[rng.standard_normal(s).astype(gdtype) for s in shapes] for _ in range(3)]
    _core.set_grain(1)
    results = []
    for threads in (1, 3):
        fo.set_num_threads(threads)
        opt = fo.SGD([p.copy() for p in params], lr=0.1)
        for mb in micro:
            opt.accumulate(mb, scale=0.5)
        results.append([np.copy(b) for b in opt.grads])
        # the reference: the same additions in the compute dtype, rounded to the buffer's
        compute = np.float64 if pdtype == np.float64 else np.float32
        for i, buf in enumerate(opt.grads):
            want = np.zeros(shapes[i], pdtype)
            for mb in micro:
                x = want.astype(compute) + compute(0.5) * mb[i].astype(compute)
                want = x.astype(pdtype)  # (0.5 * g is exact: the fused add rounds once too)
            assert np.array_equal(buf.view(np.uint8), want.view(np.uint8)), i
    for x, y in zip(*results):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


def test_accumulate_then_averaging_step(rng: np.random.Generator) -> None:
    p = [rng.standard_normal(100).astype(np.float32)]
    q = [p[0].copy()]
    a, b = fo.Adam(p, lr=0.01), fo.Adam(q, lr=0.01)
    gs = [rng.standard_normal(100).astype(np.float32) for _ in range(4)]
    for g in gs:
        a.accumulate([g])
    a.step(grad_scale=4.0)
    total = gs[0] + gs[1] + gs[2] + gs[3]  # (the order accumulate adds them in)
    b.step([total * np.float32(0.25)])
    assert np.array_equal(p[0], q[0])
    a.zero_grad()
    assert not a.grads[0].any()


def test_accumulate_rejects_bad_input_and_writes_nothing() -> None:
    opt = fo.SGD([np.zeros(3, np.float32), np.zeros(4, np.float32)], lr=0.1)
    opt.accumulate([np.ones(3, np.float32), np.ones(4, np.float32)])
    with pytest.raises(ValueError, match=r"grad for param 1: shape \(5,\)"):
        opt.accumulate([np.ones(3, np.float32), np.ones(5, np.float32)])
    with pytest.raises(TypeError, match="float64"):
        opt.accumulate([np.ones(3, np.float32), np.ones(4, np.float64)])
    with pytest.raises(ValueError, match="scale must be finite"):
        opt.accumulate([np.ones(3, np.float32), np.ones(4, np.float32)], scale=math.inf)
    with pytest.raises(ValueError, match="shares memory"):
        opt.accumulate([opt.grads[0], np.ones(4, np.float32)])
    assert all(np.array_equal(b, np.ones_like(b)) for b in opt.grads)
