"""Same bits for any thread count and chunking: every optimizer, in every precision layout.

``tests/test_threads.py`` checks three float32/float64 optimizers at 2, 3 and the maximum
number of threads; ``tests/test_precision.py`` runs the layouts on groups too small for the
pool.  Here every optimizer of ``fastoptim.definitions.ALL`` (its richest option set) in ten
layouts (float32, float64, bfloat16 with float32 / bfloat16 state, a float32 master with
stochastic rounding, Kahan-compensated float16 with float32 gradients, the offload layout
with a bfloat16 copy-out, 8- and 4-bit state), with every instruction set, steps a group of
parameters of sizes around every vector width and block (and a few larger than a chunk) on
1 thread in one chunk per tensor, then on 3 threads with chunks of 4 KiB and on 5 threads
with chunks of 1,000 bytes: every parameter, state and copy-out must be the same bytes.
(A session-26 audit ran this matrix, wider, with no mismatch; this keeps it in the suite.)
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from cases import Case, each_case, one_per_optimizer
from fastoptim import _core

BF16 = np.dtype(ml_dtypes.bfloat16)
SIZES = [0, 1, 7, 9, 17, 33, 63, 65, 257, 4099, 8193, 70_001]
# name -> (parameter dtype, gradient dtype, options, copy-out dtype)
LAYOUTS: dict[str, tuple[Any, Any, dict[str, Any], Any]] = {
    "f32": (np.float32, np.float32, {}, None),
    "f64": (np.float64, np.float64, {}, None),
    "bf16": (BF16, BF16, {}, None),
    "bf16-bf16state": (BF16, BF16, {"state_dtype": "bfloat16"}, None),
    "bf16-master-sr": (BF16, BF16, {"master_weights": True, "rounding": "stochastic"}, None),
    "f16-kahan-f32grad": (np.float16, np.float32, {"kahan": True}, None),
    "offload-bf16": (np.float32, BF16, {"rounding": "stochastic"}, BF16),
    "f32-int8": (np.float32, np.float32, {"state_dtype": "int8"}, None),
    "bf16-int4-sr": (BF16, BF16, {"state_dtype": "int4", "rounding": "stochastic"}, None),
    "f32-int8-ema": (np.float32, np.float32, {"state_dtype": "int8", "ema_decay": 0.9}, None),
}
RUNS = [(1, 1 << 40), (3, 4096), (5, 1000)]  # (threads, grain in bytes)
STEPS = 4


pytestmark = pytest.mark.usefixtures("restore_threads")  # (tests/conftest.py)


def _run(case: Case, layout: str) -> dict[str, bytes]:
    pdt, gdt, options, cdt = LAYOUTS[layout]
    rng = np.random.default_rng(7)
    params = [(rng.standard_normal(n) * 2).astype(np.float32).astype(pdt) for n in SIZES]
    opt = getattr(fo, case.opt)(params, **case.kwargs, **options, seed=11)
    outs = [np.zeros(n, cdt) for n in SIZES] if cdt is not None else None
    if outs is not None:
        opt.set_copy_out(outs)
    for _ in range(STEPS):
        grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        for g in grads:
            g[np.abs(g) < 0.1] = 0  # (exact zeros: sign(0), empty updates)
        opt.step([g.astype(gdt) for g in grads])
    out = {f"param {i}": p.tobytes() for i, p in enumerate(params)}
    for k, s in opt.state.items():
        out |= {f"{n} of {k}": v.tobytes() for n, v in s.items() if isinstance(v, np.ndarray)}
    for i, o in enumerate(outs or []):
        out[f"copy-out {i}"] = o.tobytes()
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@each_case(one_per_optimizer())
def test_same_bits_for_any_threads_and_chunks(isa: str, case: Case, layout: str) -> None:
    results = []
    try:
        for threads, grain in RUNS:
            fo.set_num_threads(threads)
            _core.set_grain(grain)
            results.append(_run(case, layout))
    except ValueError as e:  # (the only refusal: quantized state of Rprop, ASGD, SGDSF)
        assert results == [] and ("int8" in layout or "int4" in layout), e
        assert f"no state of {case.opt} can be quantized" in str(e), e
        pytest.skip(f"{case.opt} has no quantizable state ({layout})")
    serial = results[0]
    assert len(serial) >= len(SIZES)
    for (threads, grain), other in zip(RUNS[1:], results[1:]):
        assert other.keys() == serial.keys()
        differ = [k for k in serial if other[k] != serial[k]]
        assert not differ, f"{threads} threads, grain {grain}: {differ[:5]}"
