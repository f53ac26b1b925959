"""One optimizer step on one large float32 array: fastoptim, the NumPy reference, and the
streaming kernel that moves the same bytes (the roofline)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from fastoptim.__main__ import CASES

N = 1 << 24  # 16M elements: far beyond the caches

# name -> (class, options, state buffers): the same table as `python -m fastoptim`


def _info(benchmark: Any, nstate: int, n: int) -> None:
    benchmark.extra_info.update(
        isa=fo.isa(),
        threads=fo.get_num_threads(),
        elements=n,
        bytes_per_element=4 * (2 + nstate) + 4 * (1 + nstate),
        bytes_moved=n * (4 * (2 + nstate) + 4 * (1 + nstate)),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_fastoptim(benchmark: Any, name: str) -> None:
    cls, kwargs, nstate = CASES[name]
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(N, dtype=np.float32)
    g = rng.standard_normal(N, dtype=np.float32)
    p = p0.copy()
    opt = cls([p], **kwargs)
    benchmark.group = f"step-16M-{name}"
    _info(benchmark, nstate, N)
    benchmark(opt.step, [g])
    # The result must be an update of the same array, and a correct one: compare with the
    # reference run for as many steps on a sample.
    steps = opt.state[0]["step"]
    ref_p = p0[:4096].astype(np.float64)
    ref = getattr(fo.reference, cls.__name__)([ref_p], **kwargs)
    for _ in range(steps):
        ref.step([g[:4096].astype(np.float64)])
    np.testing.assert_allclose(p[:4096], ref_p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Lion"])
def test_reference(benchmark: Any, name: str) -> None:
    cls, kwargs, nstate = CASES[name]
    rng = np.random.default_rng(0)
    p = rng.standard_normal(N, dtype=np.float32)
    g = rng.standard_normal(N, dtype=np.float32)
    opt = getattr(fo.reference, cls.__name__)([p], **kwargs)
    benchmark.group = f"step-16M-{name}"
    _info(benchmark, nstate, N)
    before = p[:8].copy()
    benchmark.pedantic(opt.step, args=([g],), rounds=3, iterations=1)
    assert not np.array_equal(before, p[:8])


@pytest.mark.parametrize("nstate", [0, 1, 2, 3])
def test_stream(benchmark: Any, nstate: int) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(N, dtype=np.float32) for _ in range(2 + nstate)]
    benchmark.group = f"stream-16M-{nstate}-states"
    _info(benchmark, nstate, N)
    last = arrays[-1].copy()
    benchmark(fo._core.stream, arrays)
    assert np.array_equal(arrays[-1], last)  # the "gradient" is only read
    assert np.isfinite(arrays[0][:1024]).all()
