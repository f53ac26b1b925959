"""Muon (a host definition: Newton-Schulz through NumPy's BLAS) in every tier.

Not in the element-wise table of ``cases.py``: Muon takes 2-D parameters only, its update of an
element depends on the whole matrix, and torch rounds the iteration to bfloat16, so the table's
sizes (1-D, 1..70000 elements), its two gradient families and its ulp tolerances do not apply.
Here: the options of torch's own test database (``optim_inputs_func_muon``) on wide, tall and
square matrices, 10 steps, against ``torch.optim.Muon`` (float32 and float64), with the
tolerance of the issue: parameters within 1e-5 relative (to the tensor's largest element) at
torch's default lr 1e-3, proportionally more at a larger lr; the momentum buffer, which does
not go through the bfloat16 iteration, within a few ulps.

Why proportional to lr: the products accumulate in float32 in another order than torch's
(BLAS blocking), which flips the bfloat16 rounding of about 1e-5 of the elements of the first
product; the iteration's slope at small singular values (a = 3.4) amplifies those flips, so
that after 5 iterations many elements of the orthogonalised update O differ by one bfloat16
ulp (2**-8 of |O|) on a matrix with small singular values (a random square one).  The
parameters then differ by about lr * 2**-8 * |O| per step: measured up to 5e-6 relative at
lr 1e-3 after 10 steps, 3e-5 at lr 1e-2, 6e-5 with match_rms_adamw at lr 1e-2 (an effective
lr of 1.7e-2).  (Small matrices come out bit for bit as torch's.)
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from cases import every_dtype, once_not_per_isa
from fastoptim import functional, host, reference

# The options of torch's optim_db (torch.testing._internal.common_optimizers), copied so that
# the test runs without torch's test modules; test_optim_db_options_are_covered checks them.
OPTIM_DB: list[dict[str, Any]] = [
    {},
    {"lr": 0.01},
    {"lr": 0.001},  # torch's "Tensor lr" (a tensor in the torch tier)
    {"weight_decay": 0.2},
    {"momentum": 0.8},
    {"ns_steps": 6},
    {"ns_coefficients": (3.4, -4.7, 2.0)},
]
MORE: list[dict[str, Any]] = [
    {"nesterov": False},
    {"adjust_lr_fn": "match_rms_adamw", "lr": 0.01},
    {"adjust_lr_fn": "original", "momentum": 0.3, "weight_decay": 0.0},
    {"momentum": 0.0, "nesterov": False},
]
OPTIONS = OPTIM_DB + MORE
SHAPES = [(24, 40), (40, 24), (32, 32), (3, 70)]
STEPS = 10
RTOL = 1e-5  # of the tensor's largest |element| at lr <= 1e-3: the tolerance


def _rtol(kw: dict[str, Any]) -> float:
    """RTOL, times the effective lr / 1e-3 above torch's default lr (see the module
    docstring); "match_rms_adamw" scales lr by 0.2 sqrt(max(A, B)), up to 1.7 here."""
    boost = 1.7 if kw.get("adjust_lr_fn") == "match_rms_adamw" else 1.0
    return RTOL * max(1.0, boost * kw.get("lr", 1e-3) / 1e-3)


BUF_ULPS = 8


def _torch() -> Any:
    """torch, if installed and it has torch.optim.Muon (2.9 on); else the test skips."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch.optim, "Muon"):
        pytest.skip(f"torch {torch.__version__} has no torch.optim.Muon")
    return torch


def _ids(kw: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items()) or "default"


def _run_numpy(
    cls: Any, w0: list[np.ndarray], grads: list[list[np.ndarray]], **kw: Any
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    ws = [w.copy() for w in w0]
    opt = cls(ws, **kw)
    for g in grads:
        opt.step(g)
    return ws, [opt.state[i]["momentum_buffer"] for i in range(len(ws))]


def _problem(rng: np.random.Generator, dtype: Any) -> tuple[list[np.ndarray], list[Any]]:
    w0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return w0, grads


MEASURED: dict[str, float] = {}


def _check(what: str, got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    MEASURED[what] = max(MEASURED.get(what, 0.0), err / scale if scale else err)
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


@every_dtype
@pytest.mark.parametrize("kw", OPTIONS, ids=_ids)
def test_matches_torch(kw: dict[str, Any], dtype: Any, rng: np.random.Generator) -> None:
    """NumPy class, functional function and fastoptim.torch against torch.optim.Muon."""
    torch = _torch()
    import fastoptim.torch as fot

    w0, grads = _problem(rng, dtype)
    tw = [torch.tensor(w.copy()) for w in w0]
    tkw = dict(kw)
    if kw == {"lr": 0.001}:
        tkw["lr"] = torch.tensor(0.001)
    topt = torch.optim.Muon(tw, **tkw)
    fw = [torch.tensor(w.copy()) for w in w0]
    fopt = fot.Muon(fw, **tkw)
    for g in grads:
        for t, f, gi in zip(tw, fw, g):
            t.grad = torch.tensor(gi)
            f.grad = torch.tensor(gi)
        topt.step()
        fopt.step()
    ws, bufs = _run_numpy(fo.Muon, w0, grads, **kw)
    fn = [w.copy() for w in w0]
    fb = [np.zeros_like(w) for w in w0]
    for t, g in enumerate(grads, 1):
        for p, gi, b in zip(fn, g, fb):
            functional.muon_(p, gi, b, step=t, **kw)
    eps = np.finfo(dtype).eps
    for i, t in enumerate(tw):
        want = t.numpy()
        assert not np.array_equal(want, w0[i])
        _check(f"param {i}", ws[i], want, _rtol(kw))
        _check(f"fastoptim.torch param {i}", fw[i].numpy(), want, _rtol(kw))
        _check(f"functional param {i}", fn[i], ws[i], 0.0)  # the same code: same bits
        tbuf = topt.state[t]["momentum_buffer"].numpy()
        _check(f"momentum_buffer {i}", bufs[i], tbuf, BUF_ULPS * eps)
        fbuf = fopt.state[fw[i]]["momentum_buffer"].numpy()
        _check(f"fastoptim.torch momentum_buffer {i}", fbuf, tbuf, BUF_ULPS * eps)
        np.testing.assert_array_equal(fb[i], bufs[i])


@every_dtype
@pytest.mark.parametrize("ns_dtype", host.NS_DTYPES)
def test_matches_reference(ns_dtype: str, dtype: Any, rng: np.random.Generator) -> None:
    """The BLAS iteration (buffers reused, in-place bfloat16 rounding) against the readable
    line-for-line transcription of torch in fastoptim.reference."""
    w0, grads = _problem(rng, dtype)
    for kw in ({}, {"nesterov": False, "momentum": 0.3}):
        ws, bufs = _run_numpy(fo.Muon, w0, grads, ns_dtype=ns_dtype, **kw)
        rs, rbufs = _run_numpy(reference.Muon, w0, grads, ns_dtype=ns_dtype, **kw)
        for i in range(len(ws)):
            # same operations; only BLAS summation order may differ (float32 products)
            _check(f"param {i}", ws[i], rs[i], 1e-6)
            np.testing.assert_array_equal(bufs[i], rbufs[i])


@every_dtype
def test_float_iteration_documented_difference(dtype: Any, rng: np.random.Generator) -> None:
    """ns_dtype="float32"/"float64" skip the bfloat16 rounding: the parameters (unit scale)
    end about 1e-5 of their scale from torch's after 10 steps at lr 1e-3 (documented; measured
    2e-6..1.5e-5), more than the bfloat16 convention's difference, much less than the 1e-2
    the parameters moved."""
    torch = _torch()
    w0, grads = _problem(rng, dtype)
    tw = [torch.tensor(w.copy()) for w in w0]
    topt = torch.optim.Muon(tw)
    for g in grads:
        for t, gi in zip(tw, g):
            t.grad = torch.tensor(gi)
        topt.step()
    for ns_dtype in ("float32", "float64"):
        ws, _ = _run_numpy(fo.Muon, w0, grads, ns_dtype=ns_dtype)
        rel = max(
            float(np.max(np.abs(w - t.numpy())) / np.max(np.abs(t.numpy()))) for w, t in zip(ws, tw)
        )
        assert 1e-6 < rel < 1e-3, (ns_dtype, rel)


def test_newton_schulz_orthogonalises(rng: np.random.Generator) -> None:
    """The iteration's purpose: singular values pushed into about [0.7, 1.2] (the quintic's
    band), whatever the input's scale, in every ns_dtype."""
    g = rng.standard_normal((48, 80)).astype(np.float32) * 1e-3
    g[0] *= 100  # one dominant direction
    for ns_dtype in host.NS_DTYPES:
        s = np.linalg.svd(host.newton_schulz(g, dtype=ns_dtype), compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.25, (ns_dtype, s.min(), s.max())


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_newton_schulz_scratch_is_never_the_result(steps: int, rng: np.random.Generator) -> None:
    """The iteration's scratch arrays are kept between calls (host._Workspace): each call still
    returns a new array that later calls (larger, smaller, tall, another dtype) leave alone,
    with the bits of a first call, for an odd and an even number of steps;
    host.release_workspace() frees them and changes nothing."""
    host.release_workspace()
    g = rng.standard_normal((24, 40)).astype(np.float32)
    first = host.newton_schulz(g, steps=steps)
    kept = first.copy()
    for other in ((40, 64), (8, 12), (64, 40), (24, 40)):
        for dtype in host.NS_DTYPES:
            out = host.newton_schulz(
                rng.standard_normal(other).astype(np.float32), steps=steps, dtype=dtype
            )
            assert not np.shares_memory(out, first)
    np.testing.assert_array_equal(first, kept)
    again = host.newton_schulz(g, steps=steps)
    np.testing.assert_array_equal(again, kept)
    host.release_workspace()
    np.testing.assert_array_equal(host.newton_schulz(g, steps=steps), kept)
    ref = reference.newton_schulz(g, host.NS_COEFFICIENTS, steps, 1e-7, "float32")
    np.testing.assert_allclose(
        host.newton_schulz(g, steps=steps, dtype="float32"), ref, rtol=0, atol=1e-5
    )


def test_newton_schulz_in_two_threads_at_once(rng: np.random.Generator) -> None:
    """Two threads orthogonalising at the same time (one optimizer each) have scratch arrays of
    their own: the bits of one thread alone."""
    import threading

    gs = [rng.standard_normal((64, 96)).astype(np.float32) for _ in range(2)]
    want = [host.newton_schulz(g) for g in gs]
    got: list[list[np.ndarray]] = [[], []]
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        for _ in range(20):
            got[i].append(host.newton_schulz(gs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(got[i]) == 20
        for out in got[i]:
            np.testing.assert_array_equal(out, want[i])


def test_bfloat16_rounding_as_reference(rng: np.random.Generator) -> None:
    x = np.concatenate(
        [
            rng.standard_normal(5000) * 10.0 ** rng.integers(-40, 38, 5000),
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.3895314e38, 1e-45], np.float32),
            # ties: exactly half-way between two bfloat16 values, both parities
            (np.arange(1, 40, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
        ]
    ).astype(np.float32)
    with np.errstate(over="ignore"):
        want = reference.round_to_bfloat16(x).astype(np.float32)
    got = host.round_bfloat16_(x.copy())
    np.testing.assert_array_equal(got, want)


@every_dtype
def test_tensor_layouts_in_torch(dtype: Any, rng: np.random.Generator) -> None:
    """fastoptim.torch on a transposed parameter, and a gradient in the other layout, as on a
    contiguous one."""
    torch = _torch()
    import fastoptim.torch as fot

    w0 = rng.standard_normal((20, 36)).astype(dtype)
    a = torch.tensor(w0.copy())
    b = torch.tensor(w0.T.copy()).T  # same values, transposed memory
    oa, ob = fot.Muon([a], lr=0.01), fot.Muon([b], lr=0.01)
    for _ in range(3):
        g = rng.standard_normal((20, 36)).astype(dtype)
        a.grad = torch.tensor(g)
        b.grad = torch.tensor(g)
        oa.step()
        ob.step()
    assert not b.is_contiguous()
    _check("transposed", b.numpy(), a.numpy(), 1e-6)


def test_only_2d_parameters() -> None:
    for bad in (np.zeros(4, np.float32), np.zeros((2, 3, 4), np.float32)):
        with pytest.raises(ValueError, match="2-D"):
            fo.Muon([np.zeros((2, 3), np.float32), bad])
        with pytest.raises(ValueError, match="2-D"):
            functional.muon_(bad, bad.copy(), bad.copy(), step=1)
    with pytest.raises(TypeError, match="float32 and float64"):
        fo.Muon([np.zeros((2, 3), np.float16)])
    torch = _torch()
    import fastoptim.torch as fot

    with pytest.raises(ValueError, match="2-D"):
        fot.Muon([torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
        ({"ns_coefficients": (1.0, float("nan"), 2.0)}, "ns_coefficients"),
        ({"ns_steps": 100}, "ns_steps"),
        ({"ns_steps": -1}, "ns_steps"),
        ({"adjust_lr_fn": "nope"}, "adjust_lr_fn"),
        ({"ns_dtype": "float16"}, "ns_dtype"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": -0.5}, "momentum"),
        ({"weight_decay": float("inf")}, "weight_decay"),
    ],
)
def test_invalid_options(kw: dict[str, Any], match: str) -> None:
    w = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        fo.Muon([w], **kw)
    opt = fo.Muon([w])
    opt.param_groups[0].update(kw)
    before = w.copy()
    with pytest.raises(ValueError, match=match):
        opt.step([np.ones_like(w)])
    np.testing.assert_array_equal(w, before)  # a rejected step changes nothing


def test_ns_steps_type() -> None:
    with pytest.raises(TypeError, match="ns_steps must be an int"):
        fo.Muon([np.ones((2, 3))], ns_steps=5.0)  # type: ignore[arg-type]


def test_bad_gradient_changes_nothing() -> None:
    ws = [np.ones((2, 3), np.float32), np.ones((3, 3), np.float32)]
    opt = fo.Muon(ws)
    opt.step([np.ones((2, 3), np.float32), np.ones((3, 3), np.float32)])
    before = [w.copy() for w in ws] + [opt.state[i]["momentum_buffer"].copy() for i in (0, 1)]
    with pytest.raises(ValueError):
        opt.step([np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)])
    with pytest.raises(TypeError):
        opt.step([np.ones((2, 3), np.float32), np.ones((3, 3), np.int32)])
    after = ws + [opt.state[i]["momentum_buffer"] for i in (0, 1)]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(4, 0), (0, 4), (0, 0)])
def test_an_empty_parameter_is_left_as_it_is(shape: tuple[int, int]) -> None:
    """An empty 2-D parameter has nothing to update: the others step as without it.  (An
    ``(A, 0)`` one had raised ZeroDivisionError in its lr ratio after the parameters before it
    had moved: every retry moved them again.  torch.optim.Muon raises there too.)"""
    want = np.ones((4, 3), np.float32)
    fo.Muon([want], lr=0.1).step([np.ones((4, 3), np.float32)])
    a, e = np.ones((4, 3), np.float32), np.zeros(shape, np.float32)
    fo.Muon([a, e], lr=0.1).step([np.ones((4, 3), np.float32), np.zeros(shape, np.float32)])
    np.testing.assert_array_equal(a, want)
    functional.muon_(e, np.zeros(shape, np.float32), np.zeros(shape, np.float32), step=1)
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    ta = torch.nn.Parameter(torch.ones(4, 3))
    te = torch.nn.Parameter(torch.zeros(shape))
    opt = fot.Muon([ta, te], lr=0.1)
    ta.grad, te.grad = torch.ones(4, 3), torch.zeros(shape)
    opt.step()
    np.testing.assert_array_equal(ta.detach().numpy(), want)


@pytest.mark.parametrize("how", ["state_dict", "pickle", "deepcopy", "save"])
def test_resume_exactly(how: str, rng: np.random.Generator, tmp_path: Any) -> None:
    w0, grads = _problem(rng, np.float32)
    ws = [w.copy() for w in w0]
    opt = fo.Muon(ws, lr=0.02)
    for g in grads[:4]:
        opt.step(g)
    if how == "state_dict":
        ws2 = [w.copy() for w in ws]
        opt2 = fo.Muon(ws2, lr=0.02)
        opt2.load_state_dict(opt.state_dict())
    elif how == "save":
        fo.save(tmp_path / "m.npz", opt)
        ws2 = [np.zeros_like(w) for w in ws]
        opt2 = fo.Muon(ws2, lr=0.02)
        fo.load(tmp_path / "m.npz", opt2)
    else:
        opt2 = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
        ws2 = list(opt2.param_groups[0]["params"])
    for g in grads[4:]:
        opt.step(g)
        opt2.step(g)
    for a, b in zip(ws, ws2):
        np.testing.assert_array_equal(a, b)


def test_lr_schedule() -> None:
    """Schedules come from the engine: lr(t) at update t."""
    w, w2 = np.ones((4, 6)), np.ones((4, 6))
    opt = fo.Muon([w], lr=lambda t: 0.01 * (t + 1))
    g = np.arange(24.0).reshape(4, 6)
    opt.step([g])
    opt.step([g])
    ref = fo.Muon([w2], lr=0.01)
    ref.step([g])
    ref.param_groups[0]["lr"] = 0.02
    ref.step([g])
    np.testing.assert_array_equal(w, w2)


def test_torch_state_dict_both_ways(rng: np.random.Generator) -> None:
    torch = _torch()
    import fastoptim.torch as fot

    w0, grads = _problem(rng, np.float64)
    a = [torch.tensor(w.copy()) for w in w0]
    b = [torch.tensor(w.copy()) for w in w0]
    ta, fb = torch.optim.Muon(a), fot.Muon(b)

    def run(params: list[Any], opt: Any, gs: list[list[np.ndarray]]) -> None:
        for g in gs:
            for p, gi in zip(params, g):
                p.grad = torch.tensor(gi)
            opt.step()

    run(a, ta, grads[:3])
    run(b, fb, grads[:3])
    # swap: torch's state into fastoptim and fastoptim's into torch
    fa, tb = fot.Muon(a), torch.optim.Muon(b)
    fa.load_state_dict(ta.state_dict())
    tb.load_state_dict(fb.state_dict())
    run(a, fa, grads[3:])
    run(b, tb, grads[3:])
    for x, y in zip(a, b):
        _check("resumed", x.numpy(), y.numpy(), RTOL)


def test_signature_as_torch() -> None:
    torch = _torch()
    import inspect

    import fastoptim.torch as fot

    theirs = inspect.signature(torch.optim.Muon.__init__).parameters
    ours = inspect.signature(fot.Muon.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
    assert ours["ns_dtype"].kind is inspect.Parameter.KEYWORD_ONLY
    numpy_params = inspect.signature(fo.Muon.__init__).parameters
    assert [n for n in numpy_params if n != "ns_dtype"] == list(theirs)


@once_not_per_isa
def test_optim_db_options_are_covered() -> None:
    _torch()
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception as e:  # pragma: no cover - torch's test modules not installed
        pytest.skip(f"torch's optim_db: {e}")
    info = next(o for o in optim_db if o.optim_cls.__name__ == "Muon")

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:  # (a tensor lr is float32)
        return a.keys() == b.keys() and all(
            a[k] == b[k] or (isinstance(a[k], float) and a[k] == pytest.approx(b[k], rel=1e-6))
            for k in a
        )

    for inp in info.optim_inputs_func("cpu"):
        kw = {k: (float(v) if hasattr(v, "item") else v) for k, v in inp.kwargs.items()}
        assert any(same(kw, ours) for ours in OPTIM_DB), kw


def test_bench_muon_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fastoptim bench --muon``: rates from the same run, every ns_dtype, a whole step."""
    from fastoptim.apps import bench

    slept: list[float] = []
    monkeypatch.setattr(bench.time, "sleep", slept.append)
    rows = bench.run_muon([(8, 16)], rounds=1)
    own = host._blas().setter is not None  # (the A/B of OpenBLAS's jobs on fastoptim's pool)
    want = set(host.NS_DTYPES) | ({bench.OWN_THREADS} if own else set())
    assert set(rows[0].ns) == want and rows[0].sgemm > 0 and rows[0].step > 0
    # after each sample of what ran OpenBLAS's own threads (sgemm, products, the A/B), a pause
    assert slept == [bench.OPENBLAS_SETTLE_S] * (rows[0].rounds * (3 if own else 2))
    table = bench.format_muon(rows)
    assert "8x16" in table and "% sgemm" in table and "products GF/s" in table
    assert "BLAS own threads" in table
    assert rows[0].products > 0


@pytest.mark.parametrize("n", [0, 1, 15, 17, 32767, 32768, 32769, 100_003])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float64"])
def test_combine_is_numpys_expression(n: int, kind: str, rng: np.random.Generator) -> None:
    """_core.combine (Newton-Schulz's element-wise pass): out = alpha x + beta y with each
    product rounded to the dtype, then bfloat16 when asked, as NumPy computes it; out may be x
    or y; every chunk of the pool (32768 elements) and the ragged end."""
    from fastoptim import _core

    dtype = np.float64 if kind == "float64" else np.float32
    x = rng.standard_normal(n).astype(dtype)
    y = rng.standard_normal(n).astype(dtype) * dtype(1e3)
    if n > 20:
        x[:6] = [np.nan, np.inf, -np.inf, 3.39e38, -0.0, 1e-45]
    alpha, beta = dtype(-4.775), dtype(2.0315)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x * alpha
        want += y * beta
    if kind == "bfloat16":
        with np.errstate(over="ignore"):
            want = reference.round_to_bfloat16(want).astype(np.float32)
    bf16 = kind == "bfloat16"
    for into in ("new", "x", "y"):
        a, b = x.copy(), y.copy()
        out = {"new": np.empty_like(a), "x": a, "y": b}[into]
        _core.combine(out, a, b, float(alpha), float(beta), bf16)
        np.testing.assert_array_equal(out, want)


def test_combine_rejects_bad_arrays() -> None:
    from fastoptim import _core

    a, b = np.ones(8, np.float32), np.ones(8, np.float32)
    with pytest.raises(TypeError, match="all be float32 or all float64"):
        _core.combine(a, a, np.ones(8), 1.0, 1.0)
    with pytest.raises(ValueError, match="same size"):
        _core.combine(a, a, np.ones(9, np.float32), 1.0, 1.0)
    with pytest.raises(TypeError, match="bf16 needs float32"):
        _core.combine(np.ones(8), np.ones(8), np.ones(8), 1.0, 1.0, True)
    big = np.ones(16, np.float32)
    with pytest.raises(ValueError, match="overlaps an input"):
        _core.combine(big[:8], big[4:12], b, 1.0, 1.0)
    with pytest.raises(ValueError, match="x"):
        _core.combine(a, big[::2], b, 1.0, 1.0)  # not contiguous
    ro = np.ones(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        _core.combine(ro, a, b, 1.0, 1.0)
    np.testing.assert_array_equal(a, 1.0)


@pytest.fixture(params=["1 thread", "3 threads"])
def pool_split(request: pytest.FixtureRequest) -> Iterator[None]:
    """One thread, or three with a grain so small that the pool splits every pass (the tile
    passes' tasks on several threads)."""
    from fastoptim import _core

    before = (fo.get_num_threads(), _core.get_grain())
    threads, grain = (1, 1 << 30) if request.param == "1 thread" else (3, 64)
    fo.set_num_threads(min(threads, _core.max_threads()))
    _core.set_grain(grain)
    try:
        yield
    finally:
        fo.set_num_threads(before[0])
        _core.set_grain(before[1])


@pytest.mark.parametrize("m", [1, 2, 31, 32, 33, 65, 130, 161])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float64"])
@pytest.mark.usefixtures("pool_split")
def test_symmetrize_copies_the_upper_triangle(m: int, kind: str, rng: np.random.Generator) -> None:
    """_core.symmetrize: the lower triangle becomes the transposed upper one (never read: NaN
    there must vanish), every tile edge (32) and ragged end, an odd and an even number of
    block rows (tasks pair block rows t and nb - 1 - t); bf16 rounds every element first, as
    _core.round_bfloat16 (NaN and Inf kept)."""
    from fastoptim import _core

    dtype = np.float64 if kind == "float64" else np.float32
    a = rng.standard_normal((m, m)).astype(dtype) * dtype(1e3)
    if m > 3:
        a[0, 1:4] = [np.nan, np.inf, -3.39e38]
    upper = np.triu(a)
    want = upper + np.triu(a, 1).T
    if kind == "bfloat16":
        want = reference.round_to_bfloat16(want).astype(np.float32)
    a[np.tril_indices(m, -1)] = np.nan
    _core.symmetrize(a, kind == "bfloat16")
    np.testing.assert_array_equal(a, want)


def test_symmetrize_rejects_bad_arrays() -> None:
    from fastoptim import _core

    with pytest.raises(ValueError, match="square 2-D"):
        _core.symmetrize(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="square 2-D"):
        _core.symmetrize(np.ones(9, np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        _core.symmetrize(np.ones((3, 3), np.float16))
    with pytest.raises(TypeError, match="int32"):
        _core.symmetrize(np.ones((3, 3), np.int32))
    with pytest.raises(TypeError, match="bf16 needs float32"):
        _core.symmetrize(np.ones((3, 3)), True)
    with pytest.raises(ValueError, match="a"):
        _core.symmetrize(np.ones((6, 6), np.float32)[::2, ::2])  # not contiguous
    ro = np.triu(np.ones((3, 3), np.float32))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="a"):
        _core.symmetrize(ro)
    np.testing.assert_array_equal(ro, np.triu(np.ones((3, 3))))


def _numpy_blas() -> dict[str, Any]:
    config = getattr(np.__config__, "CONFIG", {})  # (NumPy >= 1.26)
    blas: dict[str, Any] = config.get("Build Dependencies", {}).get("blas", {})
    return blas


def _numpy_has_scipy_openblas() -> bool:
    return bool(_numpy_blas().get("name") == "scipy-openblas")


def _openblas_has_callback() -> bool:
    """NumPy's BLAS is scipy-openblas >= 0.3.28 (openblas_set_threads_callback_function)."""
    version = str(_numpy_blas().get("version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    return _numpy_has_scipy_openblas() and parts >= (0, 3, 28)


@pytest.fixture
def openblas() -> Any:
    """NumPy's OpenBLAS through ctypes (its thread count is restored afterwards); skips where
    NumPy brings none with the threading callback."""
    import ctypes
    import glob
    import os

    if not _openblas_has_callback():
        pytest.skip("NumPy's BLAS is not scipy-openblas >= 0.3.28")
    root = os.path.dirname(os.path.abspath(np.__file__))
    found = glob.glob(os.path.join(root + ".libs", "*scipy_openblas*"))
    if len(found) != 1:
        pytest.skip("NumPy's OpenBLAS library is not beside NumPy")
    lib = ctypes.CDLL(found[0])
    suffix = "64_" if hasattr(lib, "scipy_cblas_ssyrk64_") else ""
    get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")
    set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}")
    set_.argtypes = [ctypes.c_int]
    before = get()
    lib.set_threads = set_
    yield lib
    set_(before)


def _pool_blas_calls() -> int:
    """How many threaded BLAS calls have run on fastoptim's pool."""
    from fastoptim import _core

    return _core.BlasOnPool.calls()[0]


@pytest.mark.parametrize("openblas_threads", ["2", "3", "beyond the pool"])
def test_openblas_jobs_on_the_pool_give_openblas_bits(openblas: Any, openblas_threads: str) -> None:
    """Inside host._Blas.on_pool OpenBLAS's threaded calls run their jobs on fastoptim's pool
    (counted: they go through the callback) and give the bits OpenBLAS's own threads give: the
    same jobs.  More OpenBLAS threads than the pool may have (4x the CPUs) take the fallback's
    threads of their own.  Outside the block nothing goes through the pool; nested blocks
    count."""
    n = (
        min(64, fo.max_threads() + 1)
        if openblas_threads == "beyond the pool"
        else int(openblas_threads)
    )
    _only_thread()
    openblas.set_threads(n)
    rng = np.random.default_rng(n)
    a = rng.standard_normal((300, 257)).astype(np.float32)
    b = rng.standard_normal((257, 310)).astype(np.float32)
    x = rng.standard_normal(200_000).astype(np.float32)
    want = [a @ b, (a @ a.T).copy(), np.float32(np.dot(x, x))]
    from fastoptim import _core

    blas = host._blas()
    pool, own = _core.BlasOnPool.calls()
    with blas.on_pool():
        with blas.on_pool():
            got = [a @ b]
        got += [(a @ a.T).copy(), np.float32(np.dot(x, x))]
        inside = _core.BlasOnPool.calls()
    after = a @ b
    assert _core.BlasOnPool.calls() == inside  # the callback is unset again
    if n > fo.max_threads():  # (some calls have more jobs than the pool may have threads)
        assert inside[1] > own
    else:  # every threaded call on the pool (at least the two products)
        assert inside[0] >= pool + 2 and inside[1] == own
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(after, want[0])


def test_blas_on_pool_context_manager() -> None:
    """_core.BlasOnPool: a null setter and entering twice are refused; __exit__ without
    __enter__ does nothing; on_pool with other Python threads alive is a nullcontext."""
    import contextlib
    import threading

    from fastoptim import _core

    with pytest.raises(ValueError, match="setter must not be null"):
        _core.BlasOnPool(0)
    blas = host._blas()
    if blas.setter is None:
        pytest.skip("NumPy's OpenBLAS has no threading callback")
    cm = _core.BlasOnPool(blas.setter)
    assert cm.__exit__(None, None, None) is False
    with cm, pytest.raises(ValueError, match="already entered"):
        cm.__enter__()
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert isinstance(blas.on_pool(), contextlib.nullcontext)
    finally:
        release.set()
        other.join()


def _only_thread() -> None:
    import sys

    if len(sys._current_frames()) > 1:
        pytest.skip("other Python threads run here: Newton-Schulz keeps OpenBLAS's threads")


def test_newton_schulz_on_the_pool_is_openblas_own(openblas: Any) -> None:
    """Newton-Schulz with OpenBLAS's jobs on fastoptim's pool (the default where NumPy's
    OpenBLAS has the callback and no other Python thread runs) gives the bits of the iteration
    on OpenBLAS's own threads, and leaves the callback unset; with other Python threads alive
    it keeps OpenBLAS's threads (the same bits again), also from several threads at once."""
    import threading

    _only_thread()
    openblas.set_threads(3)
    rng = np.random.default_rng(5)
    gs = [
        rng.standard_normal(shape).astype(np.float32)
        for shape in [(96, 160), (160, 96), (128, 128)]
    ]
    kinds = ("bfloat16", "float32")
    blas = host._blas()
    calls = _pool_blas_calls()
    with blas.own_threads():
        want = {(i, d): host.newton_schulz(g, dtype=d) for i, g in enumerate(gs) for d in kinds}
    assert _pool_blas_calls() == calls
    on_pool = {(i, d): host.newton_schulz(g, dtype=d) for i, g in enumerate(gs) for d in kinds}
    assert _pool_blas_calls() > calls  # (the callback ran OpenBLAS's jobs)
    got: dict[tuple[int, str], np.ndarray] = {}
    start = threading.Barrier(len(gs) + 1)
    during: list[int] = []

    def run(i: int) -> None:
        start.wait()
        for _ in range(3):
            for d in kinds:
                got[(i, d)] = host.newton_schulz(gs[i], dtype=d)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(gs))]
    for t in threads:
        t.start()
    calls = _pool_blas_calls()
    start.wait()
    for t in threads:
        t.join()
    during.append(_pool_blas_calls())
    assert during == [calls]  # (other threads alive: OpenBLAS's own threads)
    for key, w in want.items():
        np.testing.assert_array_equal(on_pool[key], w, err_msg=str(key))
        np.testing.assert_array_equal(got[key], w, err_msg=str(key))
    after = _pool_blas_calls()
    np.matmul(gs[0], gs[0].T)  # (a threaded product after every block ended)
    assert _pool_blas_calls() == after


@once_not_per_isa
def test_newton_schulz_beside_numpy_products_in_another_thread() -> None:
    """Newton-Schulz in one thread while another runs NumPy products (a fresh interpreter, a
    timeout: this hung when the iteration moved OpenBLAS's jobs to fastoptim's pool while the
    other thread's product ran on OpenBLAS's threads, whose job slots the pool's jobs reuse):
    both give their single-threaded bits."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import threading, time
        import numpy as np
        from fastoptim import host
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((384, 384)), rng.standard_normal((384, 384))
        g = rng.standard_normal((256, 384)).astype(np.float32)
        ref, ns_ref = a @ b, host.newton_schulz(g)
        stop = time.monotonic() + 3
        bad = []

        def products():
            out = np.empty_like(ref)
            while time.monotonic() < stop:
                np.matmul(a, b, out=out)
                bad.extend([] if np.array_equal(out, ref) else ["product"])

        t = threading.Thread(target=products)
        t.start()
        while time.monotonic() < stop:
            bad.extend([] if np.array_equal(host.newton_schulz(g), ns_ref) else ["ns"])
        t.join()
        print(sorted(set(bad)))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]"]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (1, 7), (7, 1), (31, 33), (33, 70), (65, 64)])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float64"])
def test_gram_is_numpys_x_xT(
    direct: bool,
    shape: tuple[int, int],
    kind: str,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """host.gram_ (Newton-Schulz's A = X X^T): BLAS syrk called directly on NumPy's own
    OpenBLAS, completed by _core.symmetrize, gives NumPy's ``x @ x.T`` bit for bit (NumPy calls
    the same syrk), rounded to bfloat16 when asked; ``FASTOPT_DIRECT_BLAS=0`` takes NumPy's
    route.  Where NumPy's wheels bring their OpenBLAS, the direct route must be found."""
    monkeypatch.setenv("FASTOPT_DIRECT_BLAS", "1" if direct else "0")
    blas = host._Blas()
    monkeypatch.setattr(host, "_BLAS", blas)
    if direct and _numpy_has_scipy_openblas():
        assert set(blas.fns) == {np.dtype(np.float32), np.dtype(np.float64)}
    if not direct:
        assert not blas.fns
        assert blas.setter is None
    dtype = np.float64 if kind == "float64" else np.float32
    x = rng.standard_normal(shape).astype(dtype)
    want = x @ x.T
    if kind == "bfloat16":
        want = reference.round_to_bfloat16(want).astype(np.float32)
    out = np.full((shape[0], shape[0]), np.nan, dtype)
    assert host.gram_(x, out, kind == "bfloat16") is out
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (31, 33), (64, 32), (65, 97)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.usefixtures("pool_split")
def test_transpose_is_numpys(
    shape: tuple[int, int], dtype: type[np.floating[Any]], rng: np.random.Generator
) -> None:
    """_core.transpose (Newton-Schulz's tall inputs): out = x.T element for element, every tile
    edge (32) and ragged end."""
    from fastoptim import _core

    x = rng.standard_normal(shape).astype(dtype)
    out = np.full(shape[::-1], np.nan, dtype)
    _core.transpose(out, x)
    np.testing.assert_array_equal(out, x.T)


def test_transpose_rejects_bad_arrays() -> None:
    from fastoptim import _core

    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="transposed shape"):
        _core.transpose(np.empty((3, 4), np.float32), x)
    with pytest.raises(ValueError, match="transposed shape"):
        _core.transpose(np.empty(12, np.float32), np.ones(12, np.float32))
    with pytest.raises(TypeError, match="both be float32 or both float64"):
        _core.transpose(np.empty((4, 3)), x)
    big = np.zeros(24, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        _core.transpose(big[:12].reshape(4, 3), big[6:18].reshape(3, 4))
    np.testing.assert_array_equal(big, 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_newton_schulz_of_a_tall_matrix_is_the_wide_ones_transposed(
    dtype: str, rng: np.random.Generator
) -> None:
    """A tall G is orthogonalised as its transpose (torch's rule): the parallel transposing copy
    gives the same bits as iterating on NumPy's copy of G.T."""
    g = rng.standard_normal((97, 40)).astype(np.float32)
    tall = host.newton_schulz(g, dtype=dtype)
    wide = host.newton_schulz(np.ascontiguousarray(g.T), dtype=dtype)
    assert tall.shape == g.shape
    np.testing.assert_array_equal(tall, wide.T)


@pytest.mark.parametrize("n", [0, 1, 17, 32768, 32769, 70_001])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("divisor", [3.7, 1e-30, float("nan"), float("inf")])
def test_divide_is_numpys(n: int, kind: str, divisor: float, rng: np.random.Generator) -> None:
    """_core.divide (Newton-Schulz's X / ||X||): np.divide's bits, then bfloat16 when asked,
    every chunk of the pool and the ragged end, special values and divisors."""
    from fastoptim import _core

    dtype = np.float64 if kind == "float64" else np.float32
    x = rng.standard_normal(n).astype(dtype)
    if n > 20:
        x[:6] = [np.nan, np.inf, -np.inf, 3.39e38, -0.0, 1e-45]
    with np.errstate(all="ignore"):
        want = np.divide(x, dtype(divisor))
        if kind == "bfloat16":
            want = reference.round_to_bfloat16(want).astype(np.float32)
    _core.divide(x, divisor, kind == "bfloat16")
    np.testing.assert_array_equal(x, want)


def test_divide_rejects_bad_arrays() -> None:
    from fastoptim import _core

    with pytest.raises(TypeError, match="float32 or float64"):
        _core.divide(np.ones(4, np.float16), 2.0)
    with pytest.raises(TypeError, match="bf16 needs float32"):
        _core.divide(np.ones(4), 2.0, True)
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="x"):
        _core.divide(ro, 2.0)
    np.testing.assert_array_equal(ro, 1.0)


def test_gram_refuses_an_out_that_does_not_fit() -> None:
    """host.gram_ never hands BLAS an `out` of the wrong shape, dtype or layout (it would write
    past its end or the wrong bits): NumPy's ``@`` refuses or casts it instead, and nothing
    beyond `out` is touched."""
    x = np.ones((8, 3), np.float32)
    big = np.zeros(100, np.float32)
    with pytest.raises(ValueError):
        host.gram_(x, big[:16].reshape(4, 4))
    np.testing.assert_array_equal(big[16:], 0)
    wide = np.zeros((8, 8), np.float64)  # another dtype: NumPy's @ casts, BLAS never sees it
    host.gram_(x, wide)
    np.testing.assert_array_equal(wide, x @ x.T)
    ro = np.zeros((8, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        host.gram_(x, ro)
    np.testing.assert_array_equal(ro, 0)


@pytest.mark.parametrize("n", [0, 1, 17, 32767, 32769, 70_001])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight", [0.1, 0.5, 0.95])
@pytest.mark.usefixtures("pool_split")
def test_lerp_is_numpys(n: int, dtype: Any, weight: float, rng: np.random.Generator) -> None:
    """_core.lerp (Muon's momentum and Nesterov blend) against host._lerp_, NumPy's passes:
    the same bits from either end (w < 0.5: a + (b - a) w; else b - (b - a)(1 - w), 0.5
    included), Inf/NaN/denormal/huge elements, out new or a or b, every chunk of the pool
    (32768 elements) and the ragged end, one thread and three."""
    from fastoptim import _core

    a = rng.standard_normal(n).astype(dtype)
    b = (rng.standard_normal(n) * 1e3).astype(dtype)
    if n > 20:
        big, tiny = np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal
        b[:6] = [np.nan, np.inf, -np.inf, big, -0.0, tiny]
        a[6:9] = [np.inf, big, -big]
    want = a.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        host._lerp_(want, b, weight)
    assert n == 0 or not np.array_equal(want, a)
    for into in ("new", "a", "b"):
        x, y = a.copy(), b.copy()
        out = {"new": np.empty_like(x), "a": x, "b": y}[into]
        _core.lerp(out, x, y, weight)
        np.testing.assert_array_equal(out.view(np.uint8), want.view(np.uint8))
        if into != "a":
            np.testing.assert_array_equal(x, a)  # the inputs not written
        if into != "b":
            np.testing.assert_array_equal(y, b)


def test_lerp_rejects_bad_arrays() -> None:
    from fastoptim import _core

    a, b = np.ones(8, np.float32), np.full(8, 2, np.float32)
    with pytest.raises(TypeError, match="all be float32 or all float64"):
        _core.lerp(a, a, np.ones(8), 0.5)
    with pytest.raises(ValueError, match="same size"):
        _core.lerp(a, a, np.ones(9, np.float32), 0.5)
    big = np.ones(16, np.float32)
    with pytest.raises(ValueError, match="overlaps an input"):
        _core.lerp(big[:8], big[4:12], b, 0.5)
    with pytest.raises(ValueError, match="b: array is not C-contiguous"):
        _core.lerp(a, a, big[::2], 0.5)
    ro = np.ones(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        _core.lerp(ro, a, b, 0.5)
    np.testing.assert_array_equal(a, 1.0)
    np.testing.assert_array_equal(b, 2.0)


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (33, 70), (70, 33), (130, 257)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ns_dtype", host.NS_DTYPES)
@pytest.mark.usefixtures("pool_split")
def test_muon_update_passes_are_numpys(
    shape: tuple[int, int],
    dtype: Any,
    ns_dtype: str,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """host.muon_update's element-wise passes on all threads (_core.lerp, _core.transpose of a
    tall parameter's update, _core.combine) give the bits of its NumPy route (host._threaded
    False), 3 steps, Nesterov or not, with weight decay, wide, tall and one-row/column
    parameters, float32/float64 parameters under every iteration dtype (an update of another
    dtype converted first)."""
    from fastoptim import _core

    p0 = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(3)]
    for nesterov in (True, False):
        group = {
            "lr": 0.02, "weight_decay": 0.1, "momentum": 0.95 if nesterov else 0.3,
            "nesterov": nesterov, "ns_coefficients": host.NS_COEFFICIENTS, "ns_steps": 5,
            "eps": 1e-7, "adjust_lr_fn": None if nesterov else "match_rms_adamw",
            "ns_dtype": ns_dtype,
        }  # fmt: skip
        runs = []
        for threaded in (True, False):
            calls: list[str] = []
            for name in ("lerp", "combine", "transpose"):
                real = getattr(_core, name)
                spy = lambda *a, _r=real, _n=name, _c=calls: (_c.append(_n), _r(*a))  # noqa: E731
                monkeypatch.setattr(_core, name, spy)
            if not threaded:
                monkeypatch.setattr(host, "_threaded", lambda *arrays: False)
            p, buf = p0.copy(), np.zeros_like(p0)
            for t, g in enumerate(grads, 1):
                host.muon_update(group, [p], [g], {"momentum_buffer": [buf]}, t)
            runs.append((p, buf))
            monkeypatch.undo()
            # the passes ran where they should: 2 combines per iteration (5 iterations) and the
            # update's; the tall update transposed (besides the iteration's tall input) where
            # it keeps p's dtype and is not one column
            assert calls.count("lerp") == (3 * (1 + nesterov) if threaded else 0)
            assert calls.count("combine") == 3 * 2 * 5 + (3 if threaded else 0)
            same = (dtype == np.float64) == (ns_dtype == "float64")
            transposes = 3 if threaded and shape[0] > shape[1] > 1 and same else 0
            transposes += 3 if shape[0] > shape[1] and same else 0
            assert calls.count("transpose") == transposes
        (p, buf), (want_p, want_buf) = runs
        assert not np.array_equal(want_p, p0)
        np.testing.assert_array_equal(buf.view(np.uint8), want_buf.view(np.uint8))
        np.testing.assert_array_equal(p.view(np.uint8), want_p.view(np.uint8))


@once_not_per_isa
def test_a_forked_child_starts_with_openblas_on_its_own_threads() -> None:
    """A fork while another thread is inside a BlasOnPool block: the child (where that thread
    does not exist) starts with OpenBLAS's callback unset, and its own Newton-Schulz still
    gives the parent's bits."""
    import subprocess
    import sys
    import textwrap

    if not hasattr(__import__("os"), "fork"):
        pytest.skip("no fork here")
    if host._blas().setter is None:
        pytest.skip("NumPy's OpenBLAS has no threading callback")
    code = textwrap.dedent(
        """
        import os, threading
        import numpy as np
        from fastoptim import _core, host
        rng = np.random.default_rng(0)
        a = rng.standard_normal((300, 300)).astype(np.float32)
        g = rng.standard_normal((128, 200)).astype(np.float32)
        want = host.newton_schulz(g)
        inside, release = threading.Event(), threading.Event()

        def hold():
            with _core.BlasOnPool(host._blas().setter):
                inside.set()
                release.wait()

        t = threading.Thread(target=hold)
        t.start()
        inside.wait()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                before = _core.BlasOnPool.calls()
                a @ a  # (threaded: on OpenBLAS's threads, the callback unset)
                unset = _core.BlasOnPool.calls() == before
                same = np.array_equal(host.newton_schulz(g), want)
                os.write(w, f"{unset} {same}".encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        print(os.read(r, 64).decode())
        release.set()
        t.join()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
