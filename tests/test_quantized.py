"""Block-wise 8-bit quantized optimizer state (``state_dtype="int8"``).

The quantizer (cpp/include/fastoptim/quantize.hpp) is checked code for code against the readable
NumPy reference (:func:`fastoptim.reference.quantize_blockwise`), and against bitsandbytes where
it installs.  A step with quantized state is checked bit for bit against its definition: the
same optimizer with float32 state holding the dequantized values, stepped, then quantized by
the reference (the parameter, stored in any precision layout, must come out identical).
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from fastoptim import _core, reference
from fastoptim import functional as F
from fastoptim.engine import precision

BF16 = np.dtype(ml_dtypes.bfloat16)
MAPS = {"signed8": True, "unsigned8": False}


def same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    x = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, -1)
    y = np.ascontiguousarray(b).view(np.uint8).reshape(b.size, -1)
    bad = np.flatnonzero((x != y).any(axis=1))
    assert bad.size == 0, f"{what}: {bad.size} of {a.size} differ, first {bad[:5]}"


def core_quantize(x: np.ndarray, qmap: str) -> tuple[np.ndarray, np.ndarray]:
    codes = np.empty(x.shape, np.uint8)
    absmax = np.empty(-(-x.size // 256), np.float32)
    _core.quantize_blockwise(np.ascontiguousarray(x, np.float32), codes, absmax, qmap)
    return codes, absmax


def awkward_blocks(rng: np.random.Generator, signed: bool) -> np.ndarray:
    """Blocks of every scale: normal and heavy-tailed values, exact zeros, all-zero blocks,
    tiny (denormal) absmax, a single nonzero, exact map values and exact midpoints (ties)."""
    code = reference.create_dynamic_map(signed)
    mid = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    n = 256
    parts = [
        rng.standard_normal(40 * n) * np.exp(rng.uniform(-30, 10, 40 * n)),
        rng.standard_t(1.5, 8 * n),
        np.zeros(n),
        np.where(rng.random(4 * n) < 0.5, 0.0, rng.standard_normal(4 * n)),
        rng.standard_normal(n) * 1e-39,  # 1 / absmax overflows
        np.r_[np.zeros(n - 1), 3.0],
        np.resize(np.r_[code, 1.0], 2 * n) * 7.0,  # map values (scaled back exactly? no: 7x)
        np.resize(np.r_[code[1:], 1.0], n),  # map values with absmax 1
        np.resize(np.r_[mid, 1.0], 2 * n),  # midpoints with absmax 1: every tie
        np.resize(np.r_[-mid, 1.0], 2 * n),
    ]
    x = np.concatenate(parts).astype(np.float32)
    x[np.arange(255, x.size, 256)] = np.where(signed, 1.0, 1.0)  # keep absmax 1 in tie blocks
    x = np.r_[x, rng.standard_normal(77).astype(np.float32)]  # a short last block
    return np.abs(x) if not signed else x


# ------------------------------------------------------------------------- the quantizer
@pytest.mark.parametrize("qmap", list(MAPS))
def test_map_is_bitsandbytes_dynamic_map(qmap: str) -> None:
    code = reference.create_dynamic_map(MAPS[qmap])
    assert code.dtype == np.float32 and code.size == 256 and np.all(np.diff(code) > 0)
    assert code[-1] == 1.0 and 0.0 in code
    same_bits(_core.quant_map(qmap), code, qmap)
    if MAPS[qmap]:
        assert code[0] == -code[254] > -1 and code[127] == 0  # mirrored, no -1
    else:
        assert code[0] == 0


@pytest.mark.parametrize("qmap", list(MAPS))
def test_quantizer_matches_reference_code_for_code(
    isa: str, qmap: str, rng: np.random.Generator
) -> None:
    x = awkward_blocks(rng, MAPS[qmap])
    code = reference.create_dynamic_map(MAPS[qmap])
    codes, absmax = core_quantize(x, qmap)
    rcodes, rabsmax = reference.quantize_blockwise(x, code)
    same_bits(codes, rcodes, "codes")
    same_bits(absmax, rabsmax, "absmax")
    out = np.empty_like(x)
    _core.dequantize_blockwise(codes, absmax, out, qmap)
    same_bits(out, reference.dequantize_blockwise(rcodes, rabsmax, code), "dequantized")
    # the nearest value: no other code is closer to the scaled value (in float64, up to the
    # rounding of the float32 midpoints that decide)
    scale = np.repeat(absmax, 256)[: x.size].astype(np.float64)
    ok = scale > 0
    xn = x[ok] / scale[ok]
    err = np.abs(code[codes[ok]] - xn)
    best = np.min(np.abs(code[None, :].astype(np.float64) - xn[:, None]), axis=1)
    assert np.all(err <= best + 2.0**-24)


def test_ties_take_the_even_code_and_zero_is_exact() -> None:
    for signed in (True, False):
        code = reference.create_dynamic_map(signed)
        mid = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
        got = reference.quantize_to_code(mid, code)
        assert np.all(got % 2 == 0)
        np.testing.assert_array_equal(np.abs(got.astype(int) - np.arange(255)) <= 1, True)
        zero = int(np.flatnonzero(code == 0)[0])
        codes, absmax = core_quantize(
            np.zeros(300, np.float32), "signed8" if signed else "unsigned8"
        )
        assert np.all(codes == zero) and np.all(absmax == 0)


def near_thresholds(rng: np.random.Generator, signed: bool, n_random: int) -> np.ndarray:
    """Blocks of 256 whose absmax is exactly 1 (so each scaled value is the value itself): every
    decision threshold of the map (the float32 midpoints), every map value, each with its 4
    float32 neighbours on either side, with both signs; zeros of both signs, denormals, the
    smallest normals, the floats just below 1; then `n_random` floats of |x| <= 1 drawn uniformly
    over their bit patterns (every exponent equally), random signs.  Element 255 of each block
    is +-1 (a signed map has no -1: -1 takes the code of its smallest value)."""
    code = reference.create_dynamic_map(signed)
    mid = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    mag = np.abs(np.r_[mid, code]).astype(np.float32).view(np.int32)
    near = (mag[:, None] + np.arange(-4, 5)[None, :]).reshape(-1)
    special = np.r_[0, 1, 2, 3, 0x7FFFFF, 0x800000, 0x800001, 0x3F800000 - np.arange(1, 9)]
    rand = rng.integers(0, 0x3F800001, n_random)
    bits = np.clip(np.r_[near, special, rand], 0, 0x3F800000).astype(np.uint32)
    sign = np.r_[np.zeros(near.size + special.size, np.uint32), rng.integers(0, 2, n_random)]
    vals = np.r_[
        bits, bits[: near.size + special.size] | 0x80000000, bits[near.size + special.size :]
    ]
    vals[-n_random:] |= sign[-n_random:].astype(np.uint32) << 31
    x = vals.view(np.float32)
    if not signed:
        x = np.abs(x)
    blocks = -(-x.size // 255)
    out = np.empty(blocks * 256, np.float32)
    body = np.resize(x, blocks * 255).reshape(blocks, 255)
    out.reshape(blocks, 256)[:, :255] = body
    out.reshape(blocks, 256)[:, 255] = np.where(
        (np.arange(blocks) % 2 == 0) | (not signed), 1.0, -1.0
    )
    return out


@pytest.mark.parametrize("qmap", list(MAPS))
def test_codes_at_every_threshold_and_its_neighbours(
    isa: str, qmap: str, rng: np.random.Generator
) -> None:
    """The nearest code exactly (bitsandbytes' rule: float32 midpoints, ties to the even code)
    for every threshold and its float32 neighbours, zeros, denormals and a million random
    floats; also scaled by absmaxes that are not powers of two (the scaled values then round,
    up to 1 + 2^-23).  _core.quantize_blockwise (the active ISA's block code, as a step's);
    the step's own paths are checked the same way, below."""
    signed = MAPS[qmap]
    code = reference.create_dynamic_map(signed)
    x = near_thresholds(rng, signed, 1 << 20)
    codes, absmax = core_quantize(x, qmap)
    rcodes, rabsmax = reference.quantize_blockwise(x, code)
    assert np.all(rabsmax == 1)
    same_bits(codes, rcodes, "codes, absmax 1")
    # the same blocks times absmaxes that are not powers of two (whole blocks scaled exactly
    # where the product is exact; the quantizer then multiplies by the rounded 1 / absmax)
    scale = rng.uniform(0.5, 2.0, x.size // 256).astype(np.float32)
    scale[::3] = np.float32(3.0)  # 3 * fl(1/3) > 1: the scaled absmax itself rounds above 1
    y = (x.reshape(-1, 256) * scale[:, None]).astype(np.float32).reshape(-1)[: 256 * 2000]
    codes, absmax = core_quantize(y, qmap)
    rcodes, rabsmax = reference.quantize_blockwise(y, code)
    same_bits(absmax, rabsmax, "absmax")
    same_bits(codes, rcodes, "codes, scaled blocks")


@pytest.mark.parametrize("qmap", list(MAPS))
def test_step_codes_at_every_threshold(isa: str, qmap: str, rng: np.random.Generator) -> None:
    """The vector code searches of every ISA (AVX-512 and AVX2 gathers, the scalar loop), with
    the values of test_codes_at_every_threshold_and_its_neighbours as a state's new values: SGD
    with momentum (signed map) from a zero state takes momentum_buffer = g; Adagrad (unsigned)
    from 0 takes sum = g * g (g = sqrt of the values and its neighbours).  Checked against the
    float32-state step's state quantized by the reference."""
    signed = MAPS[qmap]
    x = near_thresholds(rng, signed, 1 << 18)
    if signed:
        g = x
        opt = fo.SGD([np.zeros(x.size, np.float32)], lr=0.1, momentum=0.9, state_dtype="int8")
        ref = fo.SGD([np.zeros(x.size, np.float32)], lr=0.1, momentum=0.9)
        name = "momentum_buffer"
    else:
        r = np.sqrt(x).view(np.int32)
        g = np.where(
            np.arange(x.size) % 3 == 1, r - 1, np.where(np.arange(x.size) % 3 == 2, r + 1, r)
        )
        g = np.where(x == 1, r, g).view(np.float32)
        opt = fo.Adagrad([np.zeros(x.size, np.float32)], lr=0.1, state_dtype="int8")
        ref = fo.Adagrad([np.zeros(x.size, np.float32)], lr=0.1)
        name = "sum"
    assert precision.QUANT_MAPS[name] == qmap
    opt.step([g])
    ref.step([g])
    want = np.asarray(ref.state[0][name], np.float32)
    if signed:
        same_bits(want, x, "momentum_buffer = g, -0 included (torch's clone of the gradient)")
    else:
        same_bits(want, (g * g).astype(np.float32), "sum = g * g")
    rcodes, rabsmax = reference.quantize_blockwise(want, reference.create_dynamic_map(signed))
    same_bits(opt.state[0][name + "_absmax"], rabsmax, "absmax")
    same_bits(opt.state[0][name], rcodes, f"{isa} codes")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_blocks_become_nan(bad: float) -> None:
    x = np.random.default_rng(0).standard_normal(600).astype(np.float32)
    x[300] = bad
    for qmap, signed in MAPS.items():
        codes, absmax = core_quantize(x, qmap)
        rcodes, rabsmax = reference.quantize_blockwise(x, reference.create_dynamic_map(signed))
        same_bits(codes, rcodes, "codes")
        same_bits(absmax, rabsmax, "absmax")
        assert np.isnan(absmax[1]) and np.isfinite(absmax[[0, 2]]).all()
        out = np.empty_like(x)
        _core.dequantize_blockwise(codes, absmax, out, qmap)
        assert np.isnan(out[256:512]).all() and np.isfinite(out[:256]).all()


def test_against_bitsandbytes() -> None:
    """bitsandbytes' map and dequantization exactly; its CPU quantizer is approximate (a few
    percent of codes differ, exact zeros get nonzero codes): ours are never farther."""
    torch = pytest.importorskip("torch")
    try:
        bnbf = pytest.importorskip("bitsandbytes.functional")
    except Exception as e:  # pragma: no cover - a broken install
        pytest.skip(f"bitsandbytes does not import: {e}")
    rng = np.random.default_rng(3)
    for signed in (True, False):
        code = reference.create_dynamic_map(signed)
        bcode = bnbf.create_dynamic_map(signed=signed)
        same_bits(bcode.numpy(), code, "map")
        x = rng.standard_normal(256 * 64).astype(np.float32)
        x = x if signed else x * x
        q, st = bnbf.quantize_blockwise(torch.from_numpy(x), code=bcode, blocksize=256)
        rc, ra = reference.quantize_blockwise(x, code)
        same_bits(st.absmax.numpy(), ra, "absmax")
        scale = np.repeat(ra, 256)
        assert np.all(np.abs(code[rc] * scale - x) <= np.abs(code[q.numpy()] * scale - x))
        assert np.mean(q.numpy() == rc) > 0.9
        deq = bnbf.dequantize_blockwise(
            torch.from_numpy(rc), absmax=torch.from_numpy(ra), code=bcode, blocksize=256
        )
        same_bits(deq.numpy(), reference.dequantize_blockwise(rc, ra, code), "dequantized")


# ------------------------------------------------------------------------- the step
QUANTIZABLE = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    "Adam": {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.01},
    "AdamW": {"lr": 1e-2},
    "NAdam": {"lr": 1e-2},
    "RAdam": {"lr": 1e-2},
    "Adamax": {"lr": 1e-2},
    "Lion": {"lr": 1e-3},
    "RMSprop": {"lr": 1e-2, "momentum": 0.5, "centered": True},
    "Adagrad": {"lr": 0.1, "initial_accumulator_value": 0.1},
    "Adadelta": {"lr": 1.0},
    "ADOPT": {"lr": 1e-2},
    "LAMB": {"lr": 1e-2, "weight_decay": 0.125},
    "LARS": {"lr": 0.5, "trust_coefficient": 0.02, "weight_decay": 0.1},
}
SHAPES = [(100,), (4095,), (4096,), (5000,), (70, 300), (20001,)]
LAYOUTS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "float32": (np.float32, np.float32, {}),
    "bf16": (BF16, BF16, {}),
    "bf16-master": (BF16, BF16, {"master_weights": True}),
    "f16-kahan": (np.float16, np.float16, {"kahan": True}),
    "fp32-bf16grad": (np.float32, BF16, {}),
}


def _float_state(opt: Any, i: int, name: str) -> np.ndarray:
    s = opt.state[i]
    if name + "_absmax" in s:
        code = reference.create_dynamic_map(precision.QUANT_MAPS[name] == "signed8")
        return reference.dequantize_blockwise(s[name], s[name + "_absmax"], code)
    return np.asarray(s[name], np.float32)


@pytest.mark.parametrize("name", list(QUANTIZABLE))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_is_float32_step_on_dequantized_state(isa: str, name: str, layout: str) -> None:
    pdt, gdt, opts = LAYOUTS[layout]
    rounding = "stochastic" if layout == "bf16" else "nearest"
    rng = np.random.default_rng(7)
    params = [(rng.standard_normal(s) * 2).astype(np.float32).astype(pdt) for s in SHAPES]
    cls = getattr(fo, name)
    kw = {**QUANTIZABLE[name], **opts, "rounding": rounding, "seed": 5}
    opt = cls(params, state_dtype="int8", **kw)
    mirror = [p.copy() for p in params]
    ref = cls(mirror, **kw)
    for t in range(1, 4):
        grads = [(rng.standard_normal(p.shape) * 0.3).astype(np.float32).astype(gdt)
                 for p in params]  # fmt: skip
        for i, p in enumerate(params):
            mirror[i][...] = p
            for n, v in opt.state[i].items():
                if n == "step" or n.endswith("_absmax"):
                    continue
                if n in ("master", "compensation"):
                    ref.state[i][n][...] = v
                else:
                    ref.state[i][n][...] = _float_state(opt, i, n)
        ref.step(grads)
        opt.step(grads)
        order = list(opt._groups[0].hyper.state_names())
        for i, p in enumerate(params):
            same_bits(p, mirror[i], f"{layout} step {t} param {i}")
            for n, v in opt.state[i].items():
                if n == "step" or n.endswith("_absmax"):
                    continue
                want = ref.state[i][n]
                if n + "_absmax" in opt.state[i]:
                    assert p.size >= 4096
                    code = reference.create_dynamic_map(precision.QUANT_MAPS[n] == "signed8")
                    bits = None  # stochastic rounding: state j's stream is array 1 + j
                    if rounding == "stochastic":
                        bits = reference.stochastic_bits(5, t, i, 1 + order.index(n), p.size)
                    rc, ra = reference.quantize_blockwise(want, code, bits=bits)
                    same_bits(v, rc, f"{layout} step {t} codes {n} of {i}")
                    same_bits(opt.state[i][n + "_absmax"], ra, f"absmax {n} of {i}")
                else:
                    assert p.size < 4096 or n in ("master", "compensation")
                    same_bits(v, want, f"{layout} step {t} state {n} of {i}")


def test_stochastic_codes_are_unbiased() -> None:
    """rounding="stochastic": a value between two map values takes the upper code with
    probability equal to its distance from the lower one over their gap, so the dequantized
    state equals the value in expectation (SGD's first momentum buffer is the gradient itself,
    quantized once per seed)."""
    code = reference.create_dynamic_map(True)
    n = 8192
    lo = np.arange(n) % 250 + 2  # code pairs (lo, lo + 1), avoiding both ends
    frac = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 0.9], np.float32)[np.arange(n) // 250 % 6]
    g = (code[lo] + frac * (code[lo + 1] - code[lo])).astype(np.float32)
    g[::256] = 1.0  # absmax 1 in every block: the normalized values are g itself
    seeds = 300
    up = np.zeros(n)
    for seed in range(seeds):
        p = np.zeros(n, np.float32)
        opt = fo.SGD([p], lr=0.0, momentum=0.9, state_dtype="int8", rounding="stochastic",
                     seed=seed)  # fmt: skip
        opt.step([g])
        codes, absmax = opt.state[0]["momentum_buffer"], opt.state[0]["momentum_buffer_absmax"]
        assert np.all(absmax == 1.0)
        want, _ = reference.quantize_blockwise(
            g, code, bits=reference.stochastic_bits(seed, 1, 0, 1, n)
        )
        same_bits(codes, want, f"seed {seed}")
        keep = np.arange(n) % 256 != 0
        assert np.all((codes == lo) | (codes == lo + 1) | ~keep)
        up += codes == lo + 1
    p_up = up / seeds
    keep = np.arange(n) % 256 != 0
    for f in np.unique(frac):
        sel = keep & (frac == f)
        # each element's frequency within 5 standard deviations of its probability
        tol = 5 * np.sqrt(max(f * (1 - f), 1e-3) / seeds)
        assert np.all(np.abs(p_up[sel] - f) <= tol), (f, np.abs(p_up[sel] - f).max())
        assert abs(p_up[sel].mean() - f) < 0.01, (f, p_up[sel].mean())
    assert np.all(p_up[keep & (frac == 0)] == 0)  # a map value keeps its code
    mean = (code[lo] * (1 - p_up) + code[lo + 1] * p_up).astype(np.float32)
    rel = (mean - g)[keep] / (code[lo + 1] - code[lo])[keep]
    # unbiased: the mean dequantized value is g (each element's mean is off by ~0.025 of its
    # gap at random, their average by ~0.0003; a bias of 1/1000 of the gap would show)
    assert abs(rel.mean()) < 0.002, rel.mean()


@pytest.mark.parametrize("qmap", list(MAPS))
def test_stochastic_codes_match_reference_on_awkward_blocks(isa: str, qmap: str) -> None:
    """Stochastic codes (16 lanes at a time with AVX-512, 8 with AVX2, a loop elsewhere) on
    blocks of every scale, ties, zeros, map values and a short last block, against the NumPy
    reference: SGD's momentum buffer after one step with lr 0 is the gradient, quantized once."""
    x = awkward_blocks(np.random.default_rng(3), MAPS[qmap])
    p = np.zeros(x.size, np.float32)
    # SGD's buffer is signed; the unsigned map is Adagrad's sum (initial value 0, sum = g^2):
    # give it the square roots of the values so that the state is x itself.
    if MAPS[qmap]:
        opt: Any = fo.SGD([p], lr=0.0, momentum=0.9, state_dtype="int8", rounding="stochastic",
                          seed=9)  # fmt: skip
        g, name = x, "momentum_buffer"
    else:
        opt = fo.Adagrad([p], lr=0.0, state_dtype="int8", rounding="stochastic", seed=9)
        g, name = np.sqrt(x).astype(np.float32), "sum"
    opt.step([g])
    state = (g * g).astype(np.float32) if not MAPS[qmap] else x
    want, wabs = reference.quantize_blockwise(
        state, reference.create_dynamic_map(MAPS[qmap]),
        bits=reference.stochastic_bits(9, 1, 0, 1, x.size),
    )  # fmt: skip
    same_bits(opt.state[0][name], want, f"{qmap} codes")
    same_bits(opt.state[0][name + "_absmax"], wabs, f"{qmap} absmax")


def test_bit_identical_across_threads_and_chunks() -> None:
    """Chunks cut through blocks (tensor sizes not multiples of 256, a tiny grain): each block
    is updated whole by the chunk holding its first element, so any split gives the same bits."""
    rng = np.random.default_rng(2)
    base = [rng.standard_normal(s).astype(np.float32) for s in [(5000,), (33333,), (9000,)]]
    grads = [[rng.standard_normal(b.shape).astype(np.float32) for b in base] for _ in range(3)]
    results = []
    before = (fo.get_num_threads(), _core.get_grain())
    try:
        for threads, grain in ((1, 1 << 30), (2, 1 << 30), (2, 1024), (3, 512)):
            fo.set_num_threads(threads)
            _core.set_grain(grain)
            params = [b.copy() for b in base]
            opt = fo.AdamW(params, lr=1e-2, state_dtype="int8")
            for g in grads:
                opt.step(g)
            results.append(opt.state_dict()["state"])
            results[-1]["params"] = params
    finally:
        fo.set_num_threads(before[0])
        _core.set_grain(before[1])
    for other in results[1:]:
        for i in range(3):
            same_bits(other["params"][i], results[0]["params"][i], f"param {i}")
            for n, v in other[i].items():
                same_bits(v, results[0][i][n], f"{n} of {i}")


_PATHS_CHILD = """
import sys
import ml_dtypes, numpy as np
import fastoptim as fo
fo.set_num_threads(1)
rng = np.random.default_rng(11)
# a 33-element last block, whole blocks, 21000 (an 8-element last block), 5000 (a last block
# of 136: two groups of 64 and 8 more), an odd size (4-bit's half-used last byte)
shapes = [(20001,), (4096,), (70, 300), (5000,), (4099,)]
out = {}
for layout, (pdt, opts) in {
    "f32": (np.float32, {}),
    "bf16": (ml_dtypes.bfloat16, {}),
    "bf16-sr": (ml_dtypes.bfloat16, {"rounding": "stochastic", "seed": 3}),
    "bf16-master": (ml_dtypes.bfloat16, {"master_weights": True}),
}.items():
    for label, (name, kw) in {
        "AdamW": ("AdamW", {"lr": 1e-2}),
        "Adam": ("Adam", {"lr": 1e-2, "amsgrad": True}),
        "SGD": ("SGD", {"lr": 0.05, "momentum": 0.9}),
        "AdamW-int4": ("AdamW", {"lr": 1e-2, "state_dtype": "int4"}),
        "AdamW-mixed": ("AdamW", {"lr": 1e-2,
                                  "state_dtype": {"exp_avg": "int4", "exp_avg_sq": "int8"}}),
        "AdamW-half": ("AdamW", {"lr": 1e-2, "state_dtype": {"exp_avg_sq": "int8"}}),
    }.items():
        params = [(rng.standard_normal(s) * 2).astype(np.float32).astype(pdt) for s in shapes]
        kw = {"state_dtype": "int8", **kw}
        opt = getattr(fo, name)(params, **kw, **opts)
        for t in range(3):
            opt.step([(rng.standard_normal(s) * 0.3 * 10.0 ** (t - 1)).astype(pdt)
                      for s in shapes])
        for i, p in enumerate(params):
            out[f"{layout} {label} p{i}"] = np.asarray(p).view(np.uint8)
            for n, v in opt.state[i].items():
                if n != "step":
                    out[f"{layout} {label} {n}{i}"] = np.asarray(v).view(np.uint8)
np.savez(sys.argv[1], **out)
"""


@pytest.mark.skipif("avx512" not in fo.available_isas(), reason="no AVX-512 on this CPU")
def test_avx512_dequantize_by_permutes_equals_gathers(tmp_path: Path) -> None:
    """The avx512 build dequantizes by byte permutes where the CPU has AVX-512 VBMI, in one
    loop with the kernel (8-bit and 4-bit states), and finds the 8-bit codes there without
    gathers or by gathers, whichever it timed the faster; by gathers or staged elsewhere
    (FASTOPT_QUANT_VBMI=0 forces the other paths; FASTOPT_QUANT_SEARCH=1 or 0 the search or
    the gathers with the permutes): the same bits, every layout, mixed and partly quantized
    states, odd sizes and short last blocks."""
    got = {}
    for run in ("vbmi", "vbmi-gathers", "no-vbmi"):
        env = {
            **os.environ,
            "FASTOPT_ISA": "avx512",
            "FASTOPT_QUANT_VBMI": "0" if run == "no-vbmi" else "1",
            "FASTOPT_QUANT_SEARCH": "0" if run == "vbmi-gathers" else "1",
        }
        path = tmp_path / f"{run}.npz"
        subprocess.run([sys.executable, "-c", _PATHS_CHILD, str(path)], env=env, check=True)
        with np.load(path) as f:
            got[run] = {k: f[k] for k in f.files}
    assert len(got["vbmi"]) > 400
    for run in ("vbmi-gathers", "no-vbmi"):
        assert got[run].keys() == got["vbmi"].keys()
        for k, v in got["vbmi"].items():
            same_bits(v, got[run][k], f"{run}: {k}")


def test_policy_per_state_and_sizes() -> None:
    big, small = np.zeros(5000, np.float32), np.zeros(10, np.float32)
    f64 = np.zeros(5000, np.float64)
    opt = fo.Adam([big, small, f64], state_dtype={"exp_avg": "int8", "exp_avg_sq": "bfloat16"})
    kinds = [{n: v.dtype.name for n, v in opt.state[i].items() if n != "step"} for i in range(3)]
    assert kinds[0] == {"exp_avg": "uint8", "exp_avg_absmax": "float32", "exp_avg_sq": "bfloat16"}
    assert kinds[1] == {"exp_avg": "float32", "exp_avg_sq": "bfloat16"}
    assert kinds[2] == {"exp_avg": "float64", "exp_avg_sq": "float64"}
    assert opt.state[0]["exp_avg_absmax"].shape == (20,)
    assert np.all(opt.state[0]["exp_avg"] == 127)  # the signed map's zero
    opt = fo.Adagrad([big], initial_accumulator_value=0.5, state_dtype="int8")
    acc = (opt.state[0]["sum"], opt.state[0]["sum_absmax"])
    np.testing.assert_array_equal(F.dequantized(acc, "sum"), 0.5)
    np.testing.assert_array_equal(F.dequantized(acc, "sum", dtype="int8"), 0.5)
    # state bytes: AdamW 8-bit ~2 B/param (+ 2 x 4 B per 256 elements)
    p = np.zeros(1 << 16, np.float32)
    assert fo.AdamW([p], state_dtype="int8").state_bytes() == 2 * p.size + 2 * 4 * p.size // 256
    assert fo.AdamW([p]).state_bytes() == 8 * p.size


def test_bad_policies_are_clear_errors() -> None:
    p = np.zeros(5000, np.float32)
    with pytest.raises(ValueError, match="no state of Rprop can be quantized"):
        fo.Rprop([p], state_dtype="int8")
    with pytest.raises(ValueError, match=r"ASGD: state 'ax' cannot be quantized"):
        fo.ASGD([p], state_dtype={"ax": "int8"})
    with pytest.raises(ValueError, match="'int8'"):
        fo.Adam([p], state_dtype="int4x")


def test_nan_gradient_poisons_only_its_block() -> None:
    p = np.ones(5000, np.float32)
    opt = fo.Adam([p], lr=0.1, state_dtype="int8")
    g = np.ones(5000, np.float32)
    g[300] = np.nan
    opt.step([g])
    am = opt.state[0]["exp_avg_absmax"]
    assert np.isnan(am[1]) and np.isfinite(np.delete(am, 1)).all()
    assert np.all(opt.state[0]["exp_avg"][256:512] == 127)
    opt.step([np.ones(5000, np.float32)])
    assert np.isnan(p[256:512]).all() and np.isfinite(np.delete(p, np.s_[256:512])).all()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_checkpoints_round_trip_bit_exactly(kind: str, tmp_path: Any) -> None:
    """8-bit and 4-bit state through state_dict and fo.save/fo.load: the resumed run's
    parameters and state equal the straight run's bit for bit (an odd size: 4-bit's half-used
    last byte)."""
    rng = np.random.default_rng(4)
    shapes = [(5001,), (300,), (64, 100)]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    def run(resume: str) -> list[np.ndarray]:
        params = [b.copy() for b in base]
        opt = fo.AdamW(params, lr=1e-2, state_dtype=kind)
        for g in grads[:3]:
            opt.step(g)
        if resume == "state_dict":
            sd = opt.state_dict()
            params2 = [p.copy() for p in params]
            opt = fo.AdamW(params2, lr=1e-2, state_dtype=kind)
            opt.load_state_dict(sd)
            params = params2
        elif resume == "file":
            fo.save(tmp_path / "ck.npz", opt)
            params = [np.zeros_like(p) for p in params]
            opt = fo.AdamW(params, lr=1e-2, state_dtype=kind)
            fo.load(tmp_path / "ck.npz", opt)
        for g in grads[3:]:
            opt.step(g)
        return params + [v for s in opt.state_dict()["state"].values() for v in s.values()]

    straight = run("none")
    for how in ("state_dict", "file"):
        for a, b in zip(run(how), straight):
            same_bits(a, b, how)


def test_bad_checkpoint_state_is_a_clear_error() -> None:
    p = np.zeros(5000, np.float32)
    opt = fo.Adam([p], state_dtype="int8")
    opt.step([np.ones(5000, np.float32)])
    sd = opt.state_dict()
    before = {n: v.copy() for n, v in opt.state[0].items() if n != "step"}
    for n, bad, match in [
        ("exp_avg_absmax", np.zeros(19, np.float32), r"expected float32 \(20,\)"),
        ("exp_avg_absmax", np.full(20, -1, np.float32), "absmax must be >= 0"),
        ("exp_avg_absmax", np.full(20, np.inf, np.float32), "absmax must be >= 0"),
        ("exp_avg", np.zeros(5000, np.float32), "expected uint8"),
    ]:
        broken = {**sd, "state": {0: {**sd["state"][0], n: bad}}}
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(broken)
        for k, v in before.items():
            same_bits(opt.state[0][k], v, k)
    fp32 = fo.Adam([np.zeros(5000, np.float32)])
    with pytest.raises(ValueError, match="state_dtype"):
        fp32.load_state_dict(sd)


def test_functional_tier_matches_the_class_and_checks_blocks() -> None:
    rng = np.random.default_rng(8)
    w = rng.standard_normal(6000).astype(np.float32)
    w2 = w.copy()
    opt = fo.Adam([w2], lr=1e-2, state_dtype="int8")
    m, v = F.quantized_state(w, "exp_avg"), F.quantized_state(w, "exp_avg_sq")
    for t in range(1, 4):
        g = rng.standard_normal(6000).astype(np.float32)
        F.adam_(w, g, m, v, step=t, lr=1e-2, state_dtype="int8")
        opt.step([g])
    same_bits(w, w2, "param")
    same_bits(m[0], opt.state[0]["exp_avg"], "codes")
    same_bits(v[1], opt.state[0]["exp_avg_sq_absmax"], "absmax")
    g = np.ones(6000, np.float32)
    before = w.copy()
    with pytest.raises(ValueError, match=r"absmax must be a 1-D float32 array of 24 entries"):
        F.adam_(w, g, m, (v[0], v[1][:-1]), step=4, state_dtype="int8")
    with pytest.raises(TypeError, match="codes must be uint8"):
        F.adam_(w, g, m, (v[0].view(np.int8), v[1]), step=4, state_dtype="int8")
    with pytest.raises(ValueError, match="cannot be quantized"):
        F.rprop_(w, g, F.quantized_state(w, "exp_avg"), np.ones_like(w), step=1)
    with pytest.raises(ValueError, match="no state of Rprop can be quantized"):
        F.rprop_(w, g, F.quantized_state(w, "exp_avg"), np.ones_like(w), step=1,
                 state_dtype="int8")  # fmt: skip
    with pytest.raises(ValueError, match="pass state_dtype='int8' or 'int4'"):
        F.adam_(w, g, m, v, step=4)  # the pairs' kind is never guessed
    # the caller's scales are checked at every call, as a load checks them: a negative one
    # decoded its block as the negated moment, an infinite one as NaN, silently
    codes = [m[0].copy(), v[0].copy()]
    for pair, bad in ((m, -1.0), (v, np.inf), (m, -np.inf)):
        scales = pair[1].copy()
        pair[1][3] = bad
        with pytest.raises(ValueError, match=r"adam_: state 'exp_avg(_sq)?': absmax must be >= 0 "
                           r"and finite .* 1 entries are not, first at block 3"):  # fmt: skip
            F.adam_(w, g, m, v, step=4, state_dtype="int8")
        pair[1][...] = scales
    with pytest.raises(ValueError, match=r"absmax must be a 1-D float32 array of 24 entries"):
        F.adam_(w, g, m, (v[0], np.full((), -1.0, np.float32)), step=4, state_dtype="int8")
    m[1][5] = np.nan  # (allowed: a block that went non-finite)
    same_bits(m[0], codes[0], "codes untouched")
    same_bits(v[0], codes[1], "codes untouched")
    same_bits(w, before, "untouched")
    F.adam_(w, g, m, v, step=4, state_dtype="int8")
    assert np.isnan(w[5 * 256 : 6 * 256]).all() and not np.isnan(w[: 5 * 256]).any()


# ------------------------------------------------------------------------- the torch tier
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_torch_tier_matches_numpy_tier_and_round_trips(kind: str) -> None:
    """fastoptim.torch with 8-bit or 4-bit state: the same bits as the NumPy tier, a
    bit-exact state_dict round trip; (4-bit, odd sizes) a truncated state is a clear error at
    load, changing nothing."""
    torch = pytest.importorskip("torch")
    import copy

    import fastoptim.torch as ft

    rng = np.random.default_rng(6)
    odd = int(kind == "int4")
    shapes = [(80, 100 + odd), (80,), (4100 + odd,)]
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tparams = [torch.nn.Parameter(torch.from_numpy(b.copy())) for b in base]
    nparams = [b.copy() for b in base]
    topt = ft.AdamW(tparams, lr=1e-2, weight_decay=0.1, state_dtype=kind)
    nopt = fo.AdamW(nparams, lr=1e-2, weight_decay=0.1, state_dtype=kind)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for p, g in zip(tparams, grads):
            p.grad = torch.from_numpy(g.copy())
        topt.step()
        nopt.step(grads)
    for i, p in enumerate(tparams):
        same_bits(p.detach().numpy(), nparams[i], f"param {i}")
        for n, v in nopt.state[i].items():
            if n != "step":
                same_bits(topt.state[p][n].numpy(), v, f"{n} of {i}")
    assert topt.state[tparams[0]]["exp_avg"].dtype == torch.uint8
    if kind == "int4":
        assert topt.state[tparams[0]]["exp_avg"].shape == (4040,)
    assert "exp_avg_absmax" not in topt.state[tparams[1]]  # small: float32
    assert topt.state_bytes() == nopt.state_bytes()
    # state_dict round trip (torch casts floating state to the parameter's dtype on load: undone)
    sd = copy.deepcopy(topt.state_dict())
    t2 = [torch.nn.Parameter(p.detach().clone()) for p in tparams]
    opt2 = ft.AdamW(t2, lr=1e-2, weight_decay=0.1, state_dtype=kind)
    opt2.load_state_dict(sd)
    for opt, ps in ((topt, tparams), (opt2, t2)):
        for p, s in zip(ps, shapes):
            p.grad = torch.ones(s)
        opt.step()
    for a, b in zip(tparams, t2):
        same_bits(a.detach().numpy(), b.detach().numpy(), "resumed param")
        for n, v in topt.state[a].items():
            same_bits(v.numpy(), opt2.state[b][n].numpy(), f"resumed {n}")
    if kind == "int4":
        # a wrong byte count or absmax shape: a clear error at the next step, nothing changed
        for n, cut in (("exp_avg", 4039), ("exp_avg_sq_absmax", 31)):
            bad = copy.deepcopy(sd)
            key = n if n.endswith("_absmax") else n + "_codes"
            bad["state"][0][key] = bad["state"][0][key][:cut].clone()
            t3 = [torch.nn.Parameter(p.detach().clone()) for p in tparams]
            o3 = ft.AdamW(t3, lr=1e-2, weight_decay=0.1, state_dtype=kind)
            before = [p.detach().clone() for p in t3]
            with pytest.raises(ValueError, match=rf"state '{n}' of param 0.*: .*expected"):
                o3.load_state_dict(bad)  # (refused at load: it was at the next step)
            assert not o3.state  # nothing loaded
            for p, s in zip(t3, shapes):
                p.grad = torch.ones(s)
            o3.step()  # (fresh state)
            for p, q in zip(t3, before):
                assert not np.array_equal(p.detach().numpy(), q.numpy())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_torch_bfloat16_params_with_quantized_state(kind: str) -> None:
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft

    w = torch.nn.Parameter(torch.randn(5000).to(torch.bfloat16))
    w_np = w.detach().view(torch.int16).numpy().copy().view(BF16)
    topt = ft.Adam([w], lr=1e-2, state_dtype=kind, master_weights=True)
    nopt = fo.Adam([w_np], lr=1e-2, state_dtype=kind, master_weights=True)
    g = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    w.grad = torch.from_numpy(g).to(torch.bfloat16)
    topt.step()
    nopt.step([g.astype(BF16)])
    same_bits(w.detach().view(torch.int16).numpy().view(BF16), w_np, "param")
    same_bits(topt.state[w]["exp_avg_sq"].numpy(), nopt.state[0]["exp_avg_sq"], "codes")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_torch_channels_last_checkpoint_survives_a_copy_that_drops_strides(kind: str) -> None:
    """A channels-last parameter's quantized state runs in blocks of its memory order, which the
    state records (``exp_avg_order``): a checkpoint whose codes were made contiguous
    (``.contiguous()``, a NumPy or safetensors round trip: the same values) resumes bit for bit.
    (8-bit codes had been read in their new strides' order, away from their blocks' scales: the
    state 30% off, the next update wrong by up to 0.004 at lr 1e-2, no error.)  A state_dict
    saved before the order was recorded for 8-bit codes (none: their own strides say it) loads
    as before."""
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft

    torch.manual_seed(0)
    grads = [torch.randn(32, 16, 3, 3) for _ in range(5)]

    def run(state_dict: Any = None, steps: range = range(5)) -> tuple[Any, Any]:
        torch.manual_seed(1)
        p = torch.nn.Parameter(
            torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last)
        )
        opt = ft.AdamW([p], lr=1e-2, state_dtype=kind)
        if state_dict is not None:
            with torch.no_grad():
                p.copy_(state_dict.pop("param"))
            opt.load_state_dict(state_dict)
        for t in steps:
            p.grad = grads[t]
            opt.step()
        return p, opt

    straight, _ = run()
    p, opt = run(steps=range(3))
    assert opt.state[p]["exp_avg_order"] == (0, 2, 3, 1)
    saved = opt.state_dict()

    def resumed(edit: Any, legacy: bool = False) -> None:
        sd = copy.deepcopy(saved)  # (a load shares the tensors it is given, as torch's)
        entry = sd["state"][0]
        for name in ("exp_avg", "exp_avg_sq"):
            entry[name + "_codes"] = edit(entry[name + "_codes"])
            if legacy:
                del entry[name + "_order"]
        sd["param"] = p.detach().clone()
        q, _ = run(sd, range(3, 5))
        np.testing.assert_array_equal(q.detach().numpy(), straight.detach().numpy())

    resumed(lambda t: t)
    resumed(lambda t: t.contiguous())
    resumed(lambda t: torch.from_numpy(np.ascontiguousarray(t.numpy())))
    if kind == "int8":  # (its codes' strides: what a checkpoint of before says)
        assert not saved["state"][0]["exp_avg_codes"].is_contiguous()
        resumed(lambda t: t, legacy=True)
    # a row-major parameter records no order
    w = torch.nn.Parameter(torch.randn(64, 80))
    o = ft.AdamW([w], lr=1e-2, state_dtype=kind)
    w.grad = torch.randn(64, 80)
    o.step()
    assert "exp_avg_order" not in o.state[w]


# ------------------------------------------------------------------------- accuracy
def _teacher_data(n: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 10-class problem (no download): a random ReLU teacher's labels, 20% of them
    replaced by random ones (so the loss has a floor the students approach)."""
    from fastoptim.apps.mlp import MLP

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    y = MLP([64, 32, 10], rng=rng).logits(x).argmax(1)
    flip = rng.random(n) < 0.2
    y[flip] = rng.integers(0, 10, int(flip.sum()))
    return x, y


ACCURACY = {
    "AdamW": {"lr": 1e-3},
    "Lion": {"lr": 3e-4},
    "SGD": {"lr": 0.05, "momentum": 0.9},
    "RMSprop": {"lr": 1e-3},
}


@pytest.mark.parametrize("name", list(ACCURACY))
def test_demo_mlp_reaches_float32_state_loss(name: str) -> None:
    """The demo's NumPy MLP (64-128-128-10: two layers of quantized state, the rest float32),
    200 steps of mini-batches of 256: the loss with 8-bit state is within 1% of (or below) the
    loss with float32 state."""
    from fastoptim.apps.mlp import MLP

    x, y = _teacher_data()
    losses = {}
    for policy in (None, "int8"):
        m = MLP([64, 128, 128, 10], rng=np.random.default_rng(1))
        opt = getattr(fo, name)(m.params, state_dtype=policy, **ACCURACY[name])
        assert (policy == "int8") == any(n.endswith("_absmax") for n in opt.state["W2"])
        rng = np.random.default_rng(2)
        for _ in range(200):
            idx = rng.integers(0, len(x), 256)
            m.loss_and_grad(x[idx], y[idx], opt.grads)
            opt.step()
        losses[policy] = m.loss(x, y)
    assert losses["int8"] <= losses[None] * 1.01, losses
    assert losses["int8"] >= losses[None] * 0.95, losses  # the same training, not another one


def test_torch_model_reaches_float32_state_loss() -> None:
    torch = pytest.importorskip("torch")
    import fastoptim.torch as ft

    x, y = _teacher_data()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    losses = {}
    for policy in (None, "int8"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
            torch.nn.ReLU(), torch.nn.Linear(128, 10),
        )  # fmt: skip
        opt = ft.AdamW(model.parameters(), lr=1e-3, state_dtype=policy)
        rng = np.random.default_rng(2)
        for _ in range(200):
            idx = torch.from_numpy(rng.integers(0, len(x), 256))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        with torch.no_grad():
            losses[policy] = float(torch.nn.functional.cross_entropy(model(xt), yt))
    assert losses["int8"] <= losses[None] * 1.01, losses
    assert losses["int8"] >= losses[None] * 0.95, losses


# ------------------------------------------------------------------------- the NumPy reference
@pytest.mark.parametrize(
    ("kind", "layout"),
    [("int8", "float32"), ("int4", "float32"), ("int8", "bf16"), ("int4", "bf16")],
)
def test_reference_emulates_quantized_state(kind: str, layout: str) -> None:
    """``reference.Adam(..., state_dtype=...)`` emulates quantized state as the kernels are
    specified (dequantize, the float32 step, ``reference.quantize_blockwise``; stochastic codes
    with the kernels' random bits), as it emulates bf16 state and stochastic rounding: element
    by element against fastoptim.Adam, each step from the same state.  Parameters to 16 ulps;
    codes equal but where the float32 state sits within rounding of a code boundary (the
    kernel's fused multiply-adds), there one code apart; absmax to 16 ulps."""
    pdt = np.float32 if layout == "float32" else BF16
    rounding = "stochastic" if layout == "bf16" else "nearest"
    kw = dict(lr=1e-2, weight_decay=0.01, state_dtype=kind, rounding=rounding, seed=3)
    rng = np.random.default_rng(21)
    shapes = [(5000,), (70, 300), (100,), (4097,)]
    params = [rng.standard_normal(s).astype(np.float32).astype(pdt) for s in shapes]
    mirror = [p.copy() for p in params]
    opt, ref = fo.Adam(params, **kw), reference.Adam(mirror, **kw)
    eps = float(np.finfo(np.float32).eps)
    for t in range(1, 4):
        grads = [(rng.standard_normal(s) * 0.3).astype(np.float32).astype(pdt) for s in shapes]
        for i in range(len(params)):  # the same state before the step
            mirror[i][...] = params[i]
            for n, v in opt.state[i].items():
                if n != "step":
                    ref.state[i][n][...] = v
        opt.step(grads)
        ref.step(grads)
        for i, p in enumerate(params):
            got, want = p.astype(np.float32), mirror[i].astype(np.float32)
            tol = 16 * (eps if layout == "float32" else 2.0**-7)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 1e-3, err_msg=f"{t} {i}")
            quantized = [n for n in opt.state[i] if n + "_absmax" in opt.state[i]]
            assert bool(quantized) == (p.size >= 4096), (i, list(opt.state[i]))
            for n, v in opt.state[i].items():
                if n == "step":
                    continue
                w = ref.state[i][n]
                if n in quantized:
                    codes = (
                        [v, w] if kind == "int8" else [reference.unpack4(c, p.size) for c in (v, w)]
                    )
                    diff = np.abs(codes[0].astype(int) - codes[1].astype(int))
                    assert diff.max() <= 1 and np.mean(diff) < 1e-3, (t, i, n, np.mean(diff))
                elif n.endswith("_absmax"):
                    np.testing.assert_allclose(v, w, rtol=16 * eps, err_msg=f"{t} {i} {n}")
                else:  # (a small parameter: float32 state)
                    np.testing.assert_allclose(v, w, rtol=16 * eps, atol=1e-7, err_msg=f"{t} {n}")


# ------------------------------------------------------ the conversions on the pool, every ISA
# 256 x 8200 + 3 elements: the pool's chunks (8208 elements each: kTargetChunks) then cut
# through blocks of 256 and 128, and the last block is short.
CONVERSION_SIZE = 256 * 8200 + 3


@functools.cache
def conversion_case(qmap: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Values (every scale, zeros, a NaN block) and the reference's codes, absmax and values."""
    rng = np.random.default_rng(17)
    n = CONVERSION_SIZE
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 5, n))).astype(np.float32)
    x[1000:1300] = 0
    x[600_000] = np.nan
    signed = qmap.startswith("signed")
    if not signed:
        x = np.abs(x)
    if qmap.endswith("4"):
        code = reference.create_map4(signed)
        codes, absmax = reference.quantize_blockwise4(x, code)
        values = reference.dequantize_blockwise4(codes, absmax, code, x.shape)
    else:
        code = reference.create_dynamic_map(signed)
        codes, absmax = reference.quantize_blockwise(x, code)
        values = reference.dequantize_blockwise(codes, absmax, code)
    return x, codes, absmax, values


@pytest.mark.parametrize("qmap", ["signed8", "unsigned8", "signed4", "unsigned4"])
@pytest.mark.parametrize("threads", [1, 3])
def test_blockwise_conversions_on_every_isa_and_thread_count(
    isa: str, qmap: str, threads: int
) -> None:
    """_core.quantize_blockwise / dequantize_blockwise run the active ISA's block code (the
    search or gathers, byte-permute decoding where the CPU has AVX-512 VBMI) on the pool, a
    block belonging to the chunk that holds its first element: the reference's codes, absmax
    and values on every ISA, with one thread and with several and a grain so small that the
    pool splits the array into chunks that cut through blocks."""
    x, rcodes, rabsmax, rvalues = conversion_case(qmap)
    codes = np.full(rcodes.shape, 0xAB, np.uint8)
    absmax = np.full(rabsmax.shape, -1.0, np.float32)
    out = np.full(x.shape, -7.0, np.float32)
    before = (fo.get_num_threads(), _core.get_grain())
    fo.set_num_threads(min(threads, _core.max_threads()))
    _core.set_grain(64 if threads > 1 else 1 << 40)
    try:
        _core.quantize_blockwise(x, codes, absmax, qmap)
        _core.dequantize_blockwise(rcodes, rabsmax, out, qmap)
    finally:
        fo.set_num_threads(before[0])
        _core.set_grain(before[1])
    same_bits(codes, rcodes, f"{isa} codes")
    same_bits(absmax, rabsmax, f"{isa} absmax")
    same_bits(out, rvalues, f"{isa} values")
    assert np.isnan(absmax[600_000 // (128 if qmap.endswith("4") else 256)])
