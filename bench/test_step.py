"""One optimizer step per workload (float32): fastoptim against the NumPy reference and the
streaming kernel that moves the same bytes (the roofline).  Workloads and optimizers are the
tables of ``fastoptim bench`` (:mod:`fastoptim.apps.bench`).

    python -m pytest bench --benchmark-only --benchmark-columns=median,ops
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from fastoptim import reference
from fastoptim.apps import bench

WORKLOADS = ["large", "mlp", "many"]


def _setup(workload: str, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = bench.WORKLOADS[workload]()
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    return params, grads


def _info(
    benchmark: Any, workload: str, nstate: int, params: list[np.ndarray], name: str = ""
) -> None:
    """The benchmark's group and bytes: a one-pass step of `nstate` states (grouped with the
    roofline of as many), or the two passes of `name` in bench.TWO_PASS (LAMB 40 B, LARS 28 B per
    element; grouped apart, with the roofline of their bytes and mix: test_two_pass_roofline)."""
    n = sum(p.size for p in params)
    if name in bench.TWO_PASS:
        benchmark.group = f"{workload}-{name}-two-pass"
        bpe = bench.two_pass_bytes(name)[0]
    else:
        benchmark.group = f"{workload}-{nstate}-states"
        bpe = bench.bytes_per_element(nstate)
    benchmark.extra_info.update(
        isa=fo.isa(),
        threads=fo.get_num_threads(),
        workload=workload,
        elements=n,
        tensors=len(params),
        bytes_per_element=bpe,
        bytes_moved=n * bpe,
    )


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("name", list(bench.OPTIMIZERS))
def test_fastoptim(benchmark: Any, name: str, workload: str) -> None:
    cls_name, kwargs, nstate = bench.OPTIMIZERS[name]
    params, grads = _setup(workload)
    start = [p[:64].astype(np.float64) for p in params]
    opt = getattr(fo, cls_name)(params, **kwargs)
    for dst, src in zip(opt.grads, grads):
        assert isinstance(dst, np.ndarray)
        dst[...] = src
    _info(benchmark, workload, nstate, params, name)
    benchmark(opt.step)
    # A fast wrong kernel must not win: replay as many steps with the reference on a sample.
    steps = opt.state[0]["step"]
    ref = getattr(reference, cls_name)(start, **kwargs)
    for _ in range(steps):
        ref.step([g[:64].astype(np.float64) for g in grads])
    if name in bench.TWO_PASS:
        # (a per-tensor trust ratio: the sample's step is not the whole tensor's; the kernel is
        # checked on the samples as tensors of their own, as many steps)
        params = [p0[:64].copy() for p0 in _setup(workload)[0]]
        small = getattr(fo, cls_name)(params, **kwargs)
        for _ in range(steps):
            small.step([g[:64].copy() for g in grads])
    # float32 against float64 drifts apart by rounding, a small fraction of the distance the
    # parameters moved; a wrong formula is off by a sizeable fraction of it.
    for got, want, p0 in zip(params, start, (p[:64] for p in _setup(workload)[0])):
        moved = float(np.max(np.abs(want - p0)))
        assert moved > 0 or (name == "ADOPT" and steps == 1)  # (its first step sets v only)
        np.testing.assert_allclose(got[:64], want, rtol=0, atol=1e-2 * moved + 1e-6)


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("name", ["SGD", "Adam", "Lion"])
def test_reference(benchmark: Any, name: str, workload: str) -> None:
    cls_name, kwargs, nstate = bench.OPTIMIZERS[name]
    params, grads = _setup(workload)
    opt = getattr(reference, cls_name)(params, **kwargs)
    _info(benchmark, workload, nstate, params)
    before = params[0][:8].copy()
    benchmark.pedantic(opt.step, args=(grads,), rounds=3, iterations=1)
    assert not np.array_equal(before, params[0][:8])


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("nstate", [0, 1, 2, 3])
def test_roofline(benchmark: Any, nstate: int, workload: str) -> None:
    params, _ = _setup(workload)
    n = sum(p.size for p in params)
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(n, dtype=np.float32) for _ in range(2 + nstate)]
    _info(benchmark, workload, nstate, params)
    last = arrays[-1].copy()
    benchmark(fo._core.stream, arrays)
    assert np.array_equal(arrays[-1], last)  # the "gradient" is only read
    assert np.isfinite(arrays[0][:1024]).all()


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("name", list(bench.TWO_PASS))
def test_two_pass_roofline(benchmark: Any, name: str, workload: str) -> None:
    """The streaming workload of a two-pass optimizer's bytes and mix of reads and writes
    (``fastoptim bench``'s roofline of its rows)."""
    params, _ = _setup(workload)
    n = sum(p.size for p in params)
    run, arrays = bench._two_pass_roofline(name, n)
    _info(benchmark, workload, bench.OPTIMIZERS[name][2], params, name)
    benchmark(run)
    assert np.isfinite(arrays[0][:1024]).all()


@pytest.mark.parametrize("tensors", [1, 100, 4096])
def test_step_overhead(benchmark: Any, tensors: int) -> None:
    """``opt.step()`` with bound gradients on one-element tensors: the fixed cost of a step."""
    params = [np.zeros(1, np.float32) for _ in range(tensors)]
    opt = fo.Adam(params)
    for g in opt.grads:
        assert isinstance(g, np.ndarray)
        g[...] = 1.0
    benchmark.group = "step-overhead"
    benchmark.extra_info.update(isa=fo.isa(), threads=fo.get_num_threads(), tensors=tensors)
    benchmark(opt.step)
    assert params[0][0] < 0


LAYOUTS = ["bf16 p/g, fp32 state", "all-bf16", "offload"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout(benchmark: Any, name: str) -> None:
    """AdamW on one 16M-element tensor in a precision layout (``fastoptim bench --layouts``;
    the layouts' results are checked in tests/test_precision.py)."""
    pytest.importorskip("ml_dtypes")
    (lay,) = [lay for lay in bench.LAYOUTS if lay.name == name]
    rng = np.random.default_rng(0)
    p32 = rng.standard_normal(bench.LAYOUT_SIZE, dtype=np.float32)
    g32 = rng.standard_normal(bench.LAYOUT_SIZE, dtype=np.float32) * np.float32(0.1)
    step = bench._layout_step(lay, p32, g32)
    benchmark.group = "layouts"
    benchmark.extra_info.update(
        isa=fo.isa(),
        threads=fo.get_num_threads(),
        layout=name,
        elements=p32.size,
        bytes_per_element=lay.bytes,
        bytes_moved=p32.size * lay.bytes,
    )
    benchmark(step)
