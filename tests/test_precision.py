"""Reduced precision: bfloat16/float16 parameters, gradients and state, master copies, Kahan
compensation, stochastic rounding (the driver's converting path, cpp/src/step.cpp).

The oracle of a layout is the float32 kernel itself, which test_kernels.py checks against the
NumPy reference: a step of a layout must equal, bit for bit, a float32 step on its arrays loaded
into float32, followed by the rounding of :mod:`fastoptim.reference` (``round_to_bfloat16`` /
``round_to_float16``, with ``rounding_bits`` for stochastic rounding).  The rounding functions
are checked on their own against ml_dtypes' and NumPy's conversions and through the driver, on
every bit pattern and on random float32 values of every exponent.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from cases import CASES, Case, each_case, one_per_optimizer
from fastoptim import _core, reference
from fastoptim import functional as F

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)

# Sizes around every vector width (4..16 float32 lanes), the converting path's block (256
# elements) and more than one chunk of a parallel step (8192).
SHAPES: list[tuple[int, ...]] = [(), (0,), (1,), (3,), (7,), (9,), (15,), (16,), (17,), (32,),
                                 (33,), (64,), (65,), (255,), (257,), (513,), (40, 103),
                                 (20000,)]  # fmt: skip


def bits16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16)


def same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Bit-identical arrays of the same dtype (NaNs included)."""
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    x = np.ascontiguousarray(a).view(np.uint8)
    y = np.ascontiguousarray(b).view(np.uint8)
    if not np.array_equal(x, y):
        w = a.dtype.itemsize
        bad = np.flatnonzero((x != y).reshape(-1, w).any(axis=1))
        raise AssertionError(
            f"{what}: {bad.size} of {a.size} elements differ, first at {bad[:5]}: "
            f"{a.reshape(-1)[bad[:5]]} vs {b.reshape(-1)[bad[:5]]}"
        )


def round_to(x: np.ndarray, dtype: np.dtype[Any], bits: np.ndarray | None) -> np.ndarray:
    if dtype == BF16:
        return reference.round_to_bfloat16(x, bits)
    if dtype == F16:
        return reference.round_to_float16(x, bits)
    return np.asarray(x, np.float32)


def awkward_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values of every exponent, both signs, and the special cases of both formats."""
    mant = rng.standard_normal(n).astype(np.float32)
    scale = (np.float32(2.0) ** rng.integers(-149, 128, n).astype(np.float32)).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        x = mant * scale
    specials = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0,
                3.3895314e38, 3.3961776e38, 3.39e38, 3.4e38, -3.4e38, 1e-40, 1e-45, 9.2e-41,
                65504, 65519.99, 65520, 65536, 70000, -65519, 6.1e-5, 6.0e-8, 5.9604645e-08,
                3e-8, 2.9e-8, 1e-9, 1.5e-45]  # fmt: skip
    return np.concatenate([x, np.array(specials, np.float32)])


# ------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_every_bit_pattern_loads_and_stores_exactly(isa: str, dtype: np.dtype[Any]) -> None:
    """Every 16-bit pattern through the driver (SGD with lr = 0: load, update by 0, store to
    nearest) comes back as it was; NaNs stay NaNs (quiet)."""
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    p = patterns.copy().view(dtype)
    F.sgd_(p, np.zeros(p.size, dtype), None, step=1, lr=0.0)
    with np.errstate(invalid="ignore"):  # (a signaling NaN raises "invalid" on aarch64)
        loaded = patterns.view(dtype).astype(np.float32)
    nan = np.isnan(loaded)
    same_bits(bits16(p)[~nan], patterns[~nan], f"{dtype} round trip")
    assert np.isnan(p.astype(np.float32)[nan]).all()
    assert (bits16(p)[nan] >> 15 == patterns[nan] >> 15).all()  # the sign of NaN kept


def test_reference_rounding_matches_ml_dtypes_and_numpy(rng: np.random.Generator) -> None:
    """The reference's round-to-nearest is exactly ml_dtypes' (bfloat16) and NumPy's (float16)
    conversion (NaN: a NaN of the same sign)."""
    x = awkward_floats(rng, 200_000)
    nan = np.isnan(x)
    with np.errstate(over="ignore"):
        same_bits(reference.round_to_bfloat16(x)[~nan], x[~nan].astype(BF16), "bfloat16")
        same_bits(reference.round_to_float16(x)[~nan], x[~nan].astype(F16), "float16")
    for fn in (reference.round_to_bfloat16, reference.round_to_float16):
        r = fn(x[nan]).astype(np.float32)
        assert np.isnan(r).all() and (np.signbit(r) == np.signbit(x[nan])).all()


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_driver_rounding_matches_reference(
    isa: str, rng: np.random.Generator, dtype: np.dtype[Any], rounding: str
) -> None:
    """float32 -> 16 bits through the driver (a master copy rounded into its parameter) equals
    the reference bit for bit, random bits included."""
    x = awkward_floats(rng, 100_000)
    p = np.zeros(x.size, dtype)
    F.sgd_(p, np.zeros(x.size, np.float32), None, step=3, lr=0.0, master=x.copy(),
           rounding=rounding, seed=12345)  # fmt: skip
    sr = rounding == "stochastic"
    bits = reference.rounding_bits(dtype, 12345, 3, 0, 0, x.size) if sr else None
    same_bits(p, round_to(x, dtype, bits), f"{dtype} {rounding}")


def nan_payloads(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 NaNs of random payloads (quiet and signaling, both signs)."""
    b = rng.integers(0, 2**23, n, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b |= np.uint32(0x7F800000) | (rng.integers(0, 2, n).astype(np.uint32) << np.uint32(31))
    return b.view(np.float32)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_driver_rounding_vector_paths(
    isa: str, rng: np.random.Generator, dtype: np.dtype[Any], rounding: str
) -> None:
    """The vector paths (AVX-512 BF16, F16C; stochastic bfloat16 32 at a time in the avx512
    build) where the ISA has them: float32 values of every exponent (denormals, the overflow
    thresholds) and NaNs with payloads, at every offset of a vector (arrays of 1..70 elements,
    some with one NaN, denormal or value next to the largest bfloat16 among ordinary values),
    equal the portable rounding: the reference's bits, NaN -> a quiet NaN with the sign
    (bfloat16: the top half, quieted; float16: 0x7E00)."""
    x = np.concatenate([awkward_floats(rng, 20_000), nan_payloads(rng, 2000)])
    x = x[rng.permutation(x.size)]
    for n in [*range(1, 71), x.size]:
        part = x[:n].copy()
        if n < x.size and n % 3 == 0:  # one special among ordinary values
            part[:] = np.float32(1.5)
            part[n // 2] = x[n] if n % 2 else np.float32(1e-40)
        if n < x.size and n % 3 == 1:  # one value around the stochastic path's threshold
            part[:] = np.float32(1.5)  # 0x7F7F0000 among ordinary values (the last of these
            near_max = [0x7F7EFFFF, 0x7F7F0000, 0x7F7F7FFF][n // 3 % 3]  # must not overflow)
            part[n // 2] = np.uint32(near_max | (n % 2) << 31).view(np.float32)
        p = np.zeros(n, dtype)
        F.sgd_(p, np.zeros(n, np.float32), None, step=1, lr=0.0, master=part.copy(),
               rounding=rounding, seed=n)  # fmt: skip
        b = part.view(np.uint32)
        nan = np.isnan(part)
        bits = reference.rounding_bits(dtype, n, 1, 0, 0, n) if rounding == "stochastic" else None
        with np.errstate(invalid="ignore"):  # the NaNs, fixed up below
            want = bits16(round_to(part, dtype, bits)).copy()
        if dtype == BF16:
            want[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
        else:
            want[nan] = ((b[nan] >> 16) & 0x8000 | 0x7E00).astype(np.uint16)
        same_bits(bits16(p), want, f"{dtype}, {n} elements")


def test_bfloat16_bits_pair_elements_16_apart() -> None:
    """bfloat16 stores draw 16 bits per element, two elements per 32-bit hash: elements 32q + j
    and 32q + 16 + j (j < 16) take the low and the high half of random_bits(key, 16q + j)."""
    key = reference.random_key(7, 3, 2, 1)
    full = reference.random_bits(key, np.arange(64))
    got = reference.random_bits16(key, np.arange(128))
    for e, index, high in [(0, 0, False), (1, 1, False), (15, 15, False), (16, 0, True),
                           (31, 15, True), (32, 16, False), (47, 31, False), (48, 16, True),
                           (100, 52, False), (127, 63, True)]:  # fmt: skip
        want = full[index] >> 16 if high else full[index] & 0xFFFF
        assert got[e] == want, (e, index, high)
    # the stream of a stored array: the same pairing from element 0 of the tensor
    stream = reference.bfloat16_bits(7, 3, 2, 1, 128)
    np.testing.assert_array_equal(stream, got)
    assert stream.max() < 2**16


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_stochastic_rounding_is_unbiased(dtype: np.dtype[Any]) -> None:
    """Per bucket of the dropped bits (the position of x between its two neighbours), the mean
    rounding error over 10^6 draws is 0 within 5 standard errors; both neighbours only."""
    rng = np.random.default_rng(3)
    n = 10**6
    # Normal numbers of both formats, a float16 denormal and a value below float16's 2**-24.
    # (0.0 with float16: the values below 2**-24, between 0 and 2**-24.)
    bases = [1.0, -3.0, 2.0**-20] if dtype == BF16 else [1.0, -3.0, 2.0**-20, 0.0]
    for base in bases:
        lo = np.float32(base)
        on_grid = round_to(np.array([lo], np.float32), dtype, None)
        assert on_grid.astype(np.float32)[0] == lo
        step = np.spacing(on_grid)[0].astype(np.float32) * (-1 if lo < 0 else 1)
        for frac in (1 / 16, 0.25, 0.5, 0.7, 15 / 16):
            x = np.float32(lo + np.float32(frac) * step)
            bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
            r = round_to(np.full(n, x, np.float32), dtype, bits).astype(np.float64)
            assert set(np.unique(r)) <= {float(lo), float(lo + step)}, (base, frac)
            err = r - float(x)
            sigma = abs(float(step)) * np.sqrt(frac * (1 - frac) / n)
            assert abs(err.mean()) < 5 * sigma + 1e-3 * abs(float(step)) / 2**8, (base, frac)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_driver_stochastic_bits_are_unbiased_and_independent(dtype: np.dtype[Any]) -> None:
    """Stochastic rounding with the driver's own bits (the counter-based hash of the element
    index): over 2 x 10^5 elements and 4 seeds, the frequency of rounding up (so the mean
    rounding error) of even and of odd elements is right within 5 standard errors, and whether
    elements 1, 2, 16 or 32 apart rounded up is uncorrelated (a weaker hash, one
    multiply-xorshift round, fails this); so are the two elements whose bfloat16 bits are the
    two halves of one hash (e and e + 16 for e & 16 == 0: reference.random_bits16), and their
    frequencies of rounding up are right on their own."""
    n = 200_000
    for base, frac in [(1.0, 0.25), (-3.0, 0.5), (2.0**-20, 0.7), (1.0, 1 / 16)]:
        lo = np.float32(base)
        step = np.spacing(round_to(np.array([lo], np.float32), dtype, None))[0].astype(np.float32)
        step *= -1 if lo < 0 else 1
        x = np.float32(lo + np.float32(frac) * step)
        for seed in range(4):
            p = np.zeros(n, dtype)
            F.sgd_(p, np.zeros(n, np.float32), None, step=1, lr=0.0, master=np.full(n, x),
                   rounding="stochastic", seed=seed)  # fmt: skip
            up = (p.astype(np.float64) != float(lo)).astype(np.float64)
            assert set(np.unique(p.astype(np.float64))) <= {float(lo), float(lo + step)}
            sigma = np.sqrt(frac * (1 - frac) / (n / 2))
            for parity in (0, 1):
                assert abs(up[parity::2].mean() - frac) < 5 * sigma, (base, frac, seed, parity)
            for lag in (1, 2, 16, 32):
                corr = np.corrcoef(up[:-lag], up[lag:])[0, 1]
                assert abs(corr) < 5 / np.sqrt(n), (base, frac, seed, lag, corr)
            low = np.flatnonzero((np.arange(n - 16) & 16) == 0)  # e: low half; e + 16: high
            half = np.sqrt(frac * (1 - frac) / low.size)
            for which in (low, low + 16):
                assert abs(up[which].mean() - frac) < 5 * half, (base, frac, seed, which[0])
            corr = np.corrcoef(up[low], up[low + 16])[0, 1]
            assert abs(corr) < 5 / np.sqrt(low.size), (base, frac, seed, "halves", corr)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_stochastic_rounding_special_values(isa: str, dtype: np.dtype[Any]) -> None:
    """NaN/Inf stay; finite values that round-to-nearest keeps finite never become Inf (the
    largest finite value instead, whatever the bits); overflow is Inf as with nearest."""
    big = 3.3961e38 if dtype == BF16 else 65519.99  # just below nearest's overflow
    over = 3.4e38 if dtype == BF16 else 65520.0
    largest = float(ml_dtypes.finfo(dtype).max) if dtype == BF16 else 65504.0
    x = np.array([np.nan, np.inf, -np.inf, big, -big, over, -over], np.float32)
    x = np.repeat(x, 4096)
    p = np.zeros(x.size, dtype)
    for seed in range(4):
        F.sgd_(p, np.zeros(x.size, np.float32), None, step=1, lr=0.0, master=x.copy(),
               rounding="stochastic", seed=seed)  # fmt: skip
        r = p.astype(np.float64).reshape(7, 4096)
        assert np.isnan(r[0]).all()
        assert (r[1] == np.inf).all() and (r[2] == -np.inf).all()
        assert (r[3] == largest).all() and (r[4] == -largest).all()
        assert (r[5] == np.inf).all() and (r[6] == -np.inf).all()


# ------------------------------------------------------------------------- layouts
# name -> (param dtype, grad dtype, options)
LAYOUTS: dict[str, tuple[np.dtype[Any], np.dtype[Any], dict[str, Any]]] = {
    "bf16": (BF16, BF16, {}),
    "bf16-bf16state": (BF16, BF16, {"state_dtype": "bfloat16"}),
    "f16": (F16, F16, {}),
    "f16-f16state": (F16, F16, {"state_dtype": "float16"}),
    "f16-f32grad": (F16, F32, {}),
    "f32-bf16grad": (F32, BF16, {}),
    "bf16-master": (BF16, BF16, {"master_weights": True}),
    "f16-master": (F16, F16, {"master_weights": True}),
    "f16-master-bf16state": (F16, F16, {"master_weights": True, "state_dtype": "bfloat16"}),
    "bf16-kahan": (BF16, F32, {"kahan": True}),
    "bf16-paramstate": (BF16, BF16, {"state_dtype": "param"}),
    "f32-f16grad": (F32, F16, {}),
    "f16-kahan": (F16, F32, {"kahan": True}),
    "f32-f16state": (F32, F32, {"state_dtype": "float16"}),
}


def _arrays(opt: Any) -> dict[str, np.ndarray]:
    """Every array of a one-group optimizer: parameters and state (copies)."""
    out = {f"param {i}": p.copy() for i, p in enumerate(opt.param_groups[0]["params"])}
    for k, st in opt.state.items():
        for n, v in st.items():
            if n != "step":
                out[f"{n} {k}"] = v.copy()
    return out


@each_case(one_per_optimizer())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_layout_is_float32_step_then_rounding(
    isa: str, case: Case, layout: str, rounding: str
) -> None:
    """Three steps of a layout, each checked bit for bit against the float32 kernel run on the
    layout's arrays loaded into float32, then rounded by the reference."""
    pdt, gdt, opts = LAYOUTS[layout]
    rng = np.random.default_rng(11)
    params = [np.asarray(rng.standard_normal(s) * 2, np.float32).astype(pdt) for s in SHAPES]
    cls = getattr(fo, case.opt)
    opt = cls(params, **case.kwargs, **opts, rounding=rounding, seed=99)
    # The oracle: the same optimizer in float32, its arrays overwritten before every step.
    mirror = [np.zeros(p.shape, np.float32) for p in params]
    ref = cls(mirror, **case.kwargs)
    master = opts.get("master_weights", False)
    kahan = opts.get("kahan", False)
    for t in range(1, 4):
        grads = [np.asarray(rng.standard_normal(p.shape), np.float32) for p in params]
        for g in grads:
            g[np.abs(g) < 0.1] = 0  # exact zeros (Rprop, Adagrad's eps)
        grads = [g.astype(gdt) for g in grads]
        before = {i: dict(opt.state[i]) for i in range(len(params))}
        old = [np.array(before[i]["master"] if master else p, np.float32)
               for i, p in enumerate(params)]  # fmt: skip
        for i in range(len(params)):
            mirror[i][...] = old[i]
            for n, v in before[i].items():
                if n not in ("step", "master", "compensation"):
                    ref.state[i][n][...] = v.astype(np.float32)
        # A state that starts as its parameter (Schedule-Free's z) is taken from the parameter
        # at its first step: the mirror's was just written from the layout's (rounded) one.
        ref._groups[0].fresh -= {n for n in before[0] if ref._definition.like_param(n)}
        comps = [np.array(before[i]["compensation"]) for i in range(len(params))] if kahan else []
        ref.step([g.astype(np.float32) for g in grads])
        opt.step(grads)
        order = list(opt._groups[0].hyper.state_names())
        for i, p in enumerate(params):

            def bits(
                array: int, dtype: np.dtype[Any], i: int = i, t: int = t, p: np.ndarray = p
            ) -> np.ndarray | None:
                if rounding != "stochastic":
                    return None
                return reference.rounding_bits(dtype, 99, t, i, array, p.size).reshape(p.shape)

            new = mirror[i]
            if kahan:
                u = comps[i].astype(np.float32) + (new - old[i])
                stored = round_to(old[i] + u, pdt, None)
                comp = round_to(u - (stored.astype(np.float32) - old[i]), pdt, None)
                same_bits(p, stored, f"{layout} step {t} param {i}")
                same_bits(opt.state[i]["compensation"], comp, f"compensation {i}")
            else:
                same_bits(p, round_to(new, pdt, bits(0, pdt)), f"{layout} step {t} param {i}")
            if master:
                same_bits(opt.state[i]["master"], new, f"master {i}")
            for n in order:
                got = opt.state[i][n]
                same_bits(got, round_to(ref.state[i][n], got.dtype,
                                        bits(1 + order.index(n), got.dtype)),
                          f"{layout} step {t} state {n} of param {i}")  # fmt: skip


def f16_load(a: np.ndarray) -> np.ndarray:
    """float16 -> float32 as the driver loads it (convert.hpp f16_load): exact, NaNs quieted."""
    return reference.load_float16(a).reshape(a.shape)


def f16_store(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 to nearest as the driver stores it: NaN -> 0x7E00 with its sign."""
    return reference.round_to_float16(x)


def test_reference_float16_load_is_exact_and_quiets_nans() -> None:
    """reference.load_float16 (the driver's definition) on every float16 pattern: NumPy's exact
    cast on every non-NaN; a NaN keeps its sign and payload with the quiet bit set (NumPy's cast
    keeps a signaling NaN signaling)."""
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    got = reference.load_float16(h.view(F16)).view(np.uint32)
    numpy = h.view(F16).astype(np.float32).view(np.uint32)
    nan = (h & 0x7C00 == 0x7C00) & (h & 0x3FF != 0)
    assert nan.sum() == 2 * 1023
    same_bits(got[~nan], numpy[~nan], "non-NaN")
    want = (h.astype(np.uint32) & 0x8000) << 16 | 0x7FC00000 | (h.astype(np.uint32) & 0x3FF) << 13
    same_bits(got[nan], want[nan], "NaN")


def test_reference_float16_load_matches_hardware_conversion() -> None:
    """The definition is what the conversion instructions give: torch's vectorized float16 ->
    float32 cast (F16C's vcvtph2ps on x86, FCVT on ARM) on every pattern, NaNs included."""
    torch = pytest.importorskip("torch")
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    hw = torch.from_numpy(h.view(F16).copy()).float().numpy().view(np.uint32)
    if (hw[(h & 0x7C00 == 0x7C00) & (h & 0x3FF != 0)] == 0x7FFFFFFF).all():
        pytest.skip("torch converts with its scalar code here (every NaN -> 0x7FFFFFFF)")
    same_bits(reference.load_float16(h.view(F16)).view(np.uint32), hw, "torch's cast")


def same_bits_but_nan_sign(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Bit-identical arrays except for the sign and payload of NaNs: NaN exactly where b has
    one, and in a float16 array the quiet 0x7E00 of the driver's store.  (Which NaN an operation
    on two NaNs returns, sign and payload, depends on the order of the instruction's operands,
    which the compiler chooses per loop: IEEE 754 leaves it unspecified.)"""
    nan = np.isnan(b.astype(np.float32))
    assert np.isnan(a.astype(np.float32))[nan].all(), (what, np.flatnonzero(nan))
    if a.dtype == F16:
        assert (bits16(a)[nan] & 0x7FFF == 0x7E00).all(), what
    same_bits(a[~nan], b[~nan], what)


# float16 specials: +-Inf, quiet and signaling NaNs with payloads, denormals (the smallest,
# the largest, negative), the smallest normal, the largest finite, -0.
F16_SPECIALS = np.array([0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0xFD55, 0x7FFF, 0x0001,
                         0x03FF, 0x83FF, 0x8001, 0x0400, 0x7BFF, 0xFBFF, 0x8000],
                        np.uint16)  # fmt: skip


@each_case(one_per_optimizer())
@pytest.mark.parametrize("layout", ["f16", "f16-f16state", "f16-master"])
def test_float16_fused_layouts_special_values_at_every_offset(
    isa: str, case: Case, layout: str
) -> None:
    """The fused float16 layouts (F16C's vcvtph2ps 16 or 8 at a time where the ISA has it, a
    store group holding a NaN rounded portably): tensors of 1..70 elements, a fifth of them float16
    denormals, with one special value (Inf, NaN with payload, signaling NaN, denormal, largest
    finite) in the parameter, the gradient and each float16 state at every offset of a vector
    and of a tail, equal a float32 step on the arrays loaded exactly, then rounded, bit for bit
    but for the sign and payload of NaNs."""
    opts = LAYOUTS[layout][2]
    rng = np.random.default_rng(5)
    sizes = range(1, 71)

    def values(n: int, at: int) -> np.ndarray:
        x = np.asarray(rng.standard_normal(n), np.float32).astype(F16)
        den = rng.random(n) < 0.2
        bits16(x)[den] = rng.integers(1, 0x400, int(den.sum())).astype(np.uint16)
        bits16(x)[at % n] = F16_SPECIALS[(n + at) % F16_SPECIALS.size]
        return x

    params = [values(n, n - 1) for n in sizes]  # the last element: every offset mod 16
    cls = getattr(fo, case.opt)
    with np.errstate(all="ignore"):
        opt = cls(params, **case.kwargs, **opts)
        mirror = [np.zeros(p.shape, np.float32) for p in params]
        ref = cls(mirror, **case.kwargs)
        master = opts.get("master_weights", False)
        for t in range(1, 3):
            grads = [values(n, (n // 2 + t)) for n in sizes]
            if t == 2:  # float16 states with specials of their own
                for i, n in enumerate(sizes):
                    for j, (name, v) in enumerate(sorted(opt.state[i].items())):
                        if name != "step" and v.dtype == F16:
                            v[...] = values(n, n - 1 - j)
            before = {i: dict(opt.state[i]) for i in range(len(params))}
            for i, p in enumerate(params):
                mirror[i][...] = before[i]["master"] if master else f16_load(p)
                for name, v in before[i].items():
                    if name not in ("step", "master"):
                        ref.state[i][name][...] = f16_load(v) if v.dtype == F16 else v
            ref._groups[0].fresh -= {n for n in before[0] if ref._definition.like_param(n)}
            ref.step([f16_load(g) for g in grads])
            opt.step(grads)
            for i, p in enumerate(params):
                what = f"{layout} step {t}, {p.size} elements"
                same_bits_but_nan_sign(p, f16_store(mirror[i]), f"{what}: param")
                if master:
                    same_bits_but_nan_sign(opt.state[i]["master"], mirror[i], f"{what}: master")
                for name, got in opt.state[i].items():
                    if name not in ("step", "master"):
                        want = ref.state[i][name]
                        if got.dtype == F16:
                            want = f16_store(want)
                        same_bits_but_nan_sign(got, want, f"{what}: {name}")


def test_state_dtypes_follow_the_policy() -> None:
    bf = np.ones(5, BF16)
    f16 = np.ones(5, F16)
    f32 = np.ones(5, np.float32)
    f64 = np.ones(5, np.float64)
    opt = fo.Adam([bf, f16, f32, f64], amsgrad=True, state_dtype={"exp_avg": "bfloat16"})
    kinds = {
        k: {n: v.dtype.name for n, v in s.items() if n != "step"} for k, s in opt.state.items()
    }
    assert kinds[0] == {"exp_avg": "bfloat16", "exp_avg_sq": "float32", "max_exp_avg_sq": "float32"}
    assert kinds[2] == kinds[0]
    assert kinds[3] == dict.fromkeys(["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], "float64")
    opt = fo.SGD([bf, f32], momentum=0.9, state_dtype="param", master_weights=True)
    assert opt.state[0]["momentum_buffer"].dtype == BF16
    assert opt.state[0]["master"].dtype == np.float32
    assert "master" not in opt.state[1]
    np.testing.assert_array_equal(opt.state[0]["master"], bf.astype(np.float32))


# ------------------------------------------------------------------------- properties
@pytest.mark.parametrize("layout", ["all-bf16", "offload", "bf16-master", "f16-f16state"])
def test_stochastic_rounding_is_thread_invariant(isa: str, layout: str) -> None:
    """The same bits for 1 or 2 threads and any chunking (a tiny grain forces many chunks), with
    a first tensor of odd size: the chunks then start the second one at elements that are not
    multiples of 32 (bfloat16's stochastic store hashes 32 elements from a multiple of 32 at
    once, and an element elsewhere on its own: the same bits)."""
    rng = np.random.default_rng(5)
    base = [rng.standard_normal(n).astype(np.float32) for n in (1001, 300_001)]
    pdt, gdt, options = {
        "all-bf16": (BF16, BF16, {"state_dtype": "bfloat16"}),
        "offload": (F32, BF16, {}),
        "bf16-master": (BF16, BF16, {"master_weights": True}),
        "f16-f16state": (F16, F16, {"state_dtype": "float16"}),
    }[layout]
    results = []
    before = (fo.get_num_threads(), _core.get_grain())
    try:
        for threads, grain in ((1, 1 << 30), (2, 1 << 30), (2, 4096)):
            fo.set_num_threads(threads)
            _core.set_grain(grain)
            params = [b.astype(pdt) for b in base]
            opt = fo.AdamW(params, lr=1e-3, rounding="stochastic", seed=4, **options)
            outs = [np.zeros(b.shape, BF16) for b in base]
            if layout == "offload":
                opt.set_copy_out(outs)
            for _ in range(3):
                opt.step([b.astype(gdt) for b in base])
            results.append({**_arrays(opt), "out 0": outs[0], "out 1": outs[1]})
    finally:
        fo.set_num_threads(before[0])
        _core.set_grain(before[1])
    for other in results[1:]:
        for k in results[0]:
            same_bits(results[0][k], other[k], k)


@pytest.mark.parametrize("layout", ["all-bf16", "offload"])
def test_stochastic_bfloat16_groups_with_special_values(isa: str, layout: str) -> None:
    """The staged stochastic bfloat16 stores round the whole groups of 32 of a block, every
    array of the layout in one pass, and give a group where any array holds a value from
    0x7F7F0000 up, Inf or NaN to the portable function: a tensor of 1000 elements (blocks of
    128 from multiples of 32) with such values at several offsets of groups, in the parameter,
    the gradient and (through them) the states, equals the float32 step followed by the
    reference's stochastic rounding, bit for bit but for the sign and payload of NaNs."""
    rng = np.random.default_rng(8)
    n = 1000
    pdt, gdt, opts = {
        "all-bf16": (BF16, BF16, {"state_dtype": "bfloat16"}),
        "offload": (F32, BF16, {}),
    }[layout]
    big = 3.3961e38  # above bfloat16's largest, below nearest's overflow (as float32 params)
    p0 = rng.standard_normal(n).astype(np.float32)
    p0[[130, 161, 300, 515]] = [big, -big, np.inf, np.nan]
    # all-bf16: parameters at +-largest pushed outwards by lr 1e36 (a float32 result from
    # 0x7F7F8000 up, Inf as bfloat16, where the add-and-shift alone would mostly keep the
    # largest), in one array of their group only, in many groups of whole blocks
    edge = np.arange(129, 896, 19)
    sign = np.where(np.arange(edge.size) % 2 == 0, 1.0, -1.0).astype(np.float32)
    lr = 1e-3
    if layout == "all-bf16":
        p0[edge] = sign * float(ml_dtypes.finfo(BF16).max)
        lr = 1e36
    params = [p0.astype(pdt)]
    opt = fo.AdamW(params, lr=lr, weight_decay=0.0, rounding="stochastic", seed=7, **opts)
    out = np.zeros(n, BF16)
    if layout == "offload":
        opt.set_copy_out([out])
    mirror = [np.zeros(n, np.float32)]
    ref = fo.AdamW(mirror, lr=lr, weight_decay=0.0)
    order = list(opt._groups[0].hyper.state_names())
    with np.errstate(all="ignore"):
        for t in range(1, 4):
            g = rng.standard_normal(n).astype(np.float32)
            g[[640 + t, 700, 901]] = [np.nan, 3e38, -np.inf]
            g[edge] = -sign
            before = dict(opt.state[0])
            mirror[0][...] = np.asarray(params[0], np.float32)
            for name, v in before.items():
                if name != "step":
                    ref.state[0][name][...] = v.astype(np.float32)
            ref.step([g.astype(gdt).astype(np.float32)])
            opt.step([g.astype(gdt)])

            def want(x: np.ndarray, array: int, t: int = t) -> np.ndarray:
                return round_to(x, BF16, reference.rounding_bits(BF16, 7, t, 0, array, n))

            what = f"{layout} step {t}"
            if layout == "offload":
                same_bits_but_nan_sign(params[0], mirror[0], f"{what}: param")
                same_bits_but_nan_sign(out, want(mirror[0], 0), f"{what}: copy")
            else:
                same_bits_but_nan_sign(params[0], want(mirror[0], 0), f"{what}: param")
            for name in order:
                got = opt.state[0][name]
                exp = ref.state[0][name]
                if got.dtype == BF16:
                    exp = want(exp, 1 + order.index(name))
                same_bits_but_nan_sign(got, exp, f"{what}: {name}")
            assert np.isnan(np.asarray(params[0], np.float32)[515]), what
            if layout == "all-bf16":  # those parameters went to Inf
                assert (np.asarray(params[0], np.float32)[edge] == sign * np.inf).all(), what


def test_seed_and_step_change_the_bits() -> None:
    x = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    outs = []
    for seed, step in ((0, 1), (1, 1), (0, 2)):
        p = np.zeros(x.size, BF16)
        F.sgd_(p, np.zeros(x.size, np.float32), None, step=step, lr=0.0, master=x.copy(),
               rounding="stochastic", seed=seed)  # fmt: skip
        outs.append(bits16(p))
    assert (outs[0] != outs[1]).mean() > 0.2 and (outs[0] != outs[2]).mean() > 0.2


def _loss_gap(rounding: str, kahan: bool) -> float:
    """Noisy least squares on 64 weights near 4 with bf16 parameters and an lr that makes every
    update far below half a bf16 ulp (2**-7 at 4).  Returns |loss - fp32 loss| / fp32 loss
    after 10^4 steps (the fp32 run has converged to the noise floor by then)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 64)).astype(np.float32) / 8
    w_true = (rng.standard_normal(64) + 4).astype(np.float32)
    y = a @ w_true + 2 * rng.standard_normal(256).astype(np.float32)  # loss floor ~4
    w0 = np.full(64, 4.0, np.float32)

    def run(w: np.ndarray, opt: Any) -> float:
        for _ in range(10_000):
            r = a @ w.astype(np.float32) - y
            opt.step([(a.T @ r / len(y)).astype(np.float32)])
        r = a @ w.astype(np.float32) - y
        return float(r @ r / len(y))

    w32 = w0.copy()
    exact = run(w32, fo.SGD([w32], lr=0.05))
    wb = w0.astype(BF16)
    low = run(wb, fo.SGD([wb], lr=0.05, rounding=rounding, kahan=kahan, seed=1))
    return abs(low - exact) / exact


def test_round_to_nearest_stalls_where_stochastic_and_kahan_track_float32() -> None:
    """Why it matters: plain bf16 parameters stop learning once the updates fall below half an
    ulp; stochastic rounding and Kahan compensation follow the float32 run."""
    assert _loss_gap("nearest", False) > 0.1
    assert _loss_gap("stochastic", False) <= 1e-3
    assert _loss_gap("nearest", True) <= 1e-3


# ------------------------------------------------------------------------- checkpoints
def _layout_run(steps: int, opt: Any, params: list[np.ndarray], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(np.float32).astype(p.dtype) for p in params])


@pytest.mark.parametrize("how", ["state_dict", "file"])
def test_checkpoint_resumes_bit_exactly(tmp_path: Any, how: str) -> None:
    """bfloat16 parameters and state, a master copy, stochastic rounding: saved after 3 steps
    and loaded into a new optimizer, the run continues with the very bits of the uninterrupted
    one (the seed and the step number travel with the checkpoint)."""
    kw = {"lr": 1e-2, "state_dtype": {"exp_avg": "bfloat16"}, "master_weights": True,
          "rounding": "stochastic", "seed": 77}  # fmt: skip
    start = [np.linspace(-2, 2, 301, dtype=np.float32).astype(BF16), np.ones(7, np.float32)]
    a = [x.copy() for x in start]
    opt = fo.AdamW(a, **kw)
    _layout_run(3, opt, a, seed=1)
    b = [x.copy() for x in a]
    other = fo.AdamW([x.copy() for x in start], **{**kw, "seed": 0, "rounding": "nearest"})
    if how == "file":
        fo.save(tmp_path / "run.npz", opt)
        fo.load(tmp_path / "run.npz", other)
        b = other.param_groups[0]["params"]
    else:
        other = fo.AdamW(b, **{**kw, "seed": 0, "rounding": "nearest"})
        other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["seed"] == 77
    assert other.param_groups[0]["rounding"] == "stochastic"
    _layout_run(3, opt, a, seed=2)
    _layout_run(3, other, list(b), seed=2)
    for x, y in zip(a, b):
        same_bits(x, y, "param")
    for k in opt.state:
        for n, v in opt.state[k].items():
            if n != "step":
                same_bits(v, other.state[k][n], f"{n} {k}")


def test_checkpoint_into_another_policy_is_a_clear_error(tmp_path: Any) -> None:
    p = np.linspace(-1, 1, 50, dtype=np.float32).astype(BF16)
    opt = fo.Adam([p], state_dtype="bfloat16")
    _layout_run(2, opt, [p])
    fo.save(tmp_path / "run.npz", opt)
    for kw in ({}, {"master_weights": True}, {"state_dtype": {"exp_avg": "bfloat16"}}):
        q = np.zeros(50, BF16)
        other = fo.Adam([q], **kw)
        before = _arrays(other)
        with pytest.raises(fo.CheckpointError, match="precision options"):
            fo.load(tmp_path / "run.npz", other)
        with pytest.raises(ValueError, match="precision options"):
            other.load_state_dict(opt.state_dict())
        for k, v in _arrays(other).items():
            same_bits(v, before[k], k)


# ------------------------------------------------------------------------- bad input
def test_bad_policies_are_clear_errors() -> None:
    p = [np.ones(4, BF16)]
    with pytest.raises(ValueError, match="state_dtype must be"):
        fo.Adam(p, state_dtype="uint8")  # ("int8" is quantized state: test_quantized.py)
    with pytest.raises(ValueError, match="float64 parameters keep float64"):
        fo.Adam(p, state_dtype=np.float64)
    with pytest.raises(ValueError, match=r"state_dtype names state 'momentum'.*exp_avg"):
        fo.Adam(p, state_dtype={"momentum": "bfloat16"})
    with pytest.raises(ValueError, match="master_weights and kahan"):
        fo.Adam(p, master_weights=True, kahan=True)
    with pytest.raises(ValueError, match="rounding must be"):
        fo.Adam(p, rounding="up")
    with pytest.raises(TypeError, match="seed must be an int"):
        fo.Adam(p, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        fo.Adam(p, seed=-1)


def test_policy_cannot_change_once_state_exists() -> None:
    """The dtype of a state buffer that exists is fixed (a step with a group asking for
    another raises and changes nothing); a master copy may be added later (it starts as the
    parameter's value) but not dropped."""
    p = np.linspace(-1, 1, 20, dtype=np.float32).astype(BF16)
    opt = fo.Adam([p])
    _layout_run(1, opt, [p])
    before = _arrays(opt)
    opt.param_groups[0]["state_dtype"] = "bfloat16"
    with pytest.raises(ValueError, match="cannot change once the state exists"):
        opt.step([np.ones(20, BF16)])
    for k, v in _arrays(opt).items():
        same_bits(v, before[k], k)
    opt.param_groups[0]["state_dtype"] = None
    opt.param_groups[0]["master_weights"] = True
    opt.step([np.ones(20, BF16)])
    assert "master" in opt.state[0]
    opt.param_groups[0]["master_weights"] = False
    before = _arrays(opt)
    with pytest.raises(ValueError, match="cannot change once the state exists"):
        opt.step([np.ones(20, BF16)])
    for k, v in _arrays(opt).items():
        same_bits(v, before[k], k)
    opt.param_groups[0]["master_weights"] = True
    opt.param_groups[0]["rounding"] = "stochastic"  # rounding and seed may change any time
    opt.param_groups[0]["seed"] = 5
    opt.step([np.ones(20, BF16)])


def test_bad_arrays_are_clear_errors_and_touch_nothing() -> None:
    p = np.linspace(-1, 1, 8, dtype=np.float32).astype(BF16)
    keep = p.copy()
    g16 = np.ones(8, BF16)
    m, v = np.zeros(8, np.float32), np.zeros(8, np.float32)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"master": np.zeros(8, np.float64)}, TypeError, "adam_: master copy of param:"),
        ({"master": np.zeros(9, np.float32)}, ValueError, "shape"),
        ({"compensation": np.zeros(8, np.float32)}, TypeError, "compensation"),
        ({"copy_out": np.zeros(8, BF16)}, TypeError, "only float32 parameters"),
        ({"master": np.zeros(8, np.float32), "compensation": np.zeros(8, BF16)}, TypeError,
         "without a master copy"),
    ]  # fmt: skip
    for extra, exc, words in cases:
        with pytest.raises(exc, match=words):
            F.adam_(p, g16, m, v, None, step=1, **extra)
        same_bits(p, keep, "param")
        assert not m.any() and not v.any()
    w = np.ones(8, np.float32)
    for out, exc, words in (
        (np.zeros(8, np.float32), TypeError, "bfloat16 or float16"),
        (np.zeros(7, BF16), ValueError, "shape"),
        (m, TypeError, "bfloat16 or float16"),
    ):
        with pytest.raises(exc, match=words):
            F.adam_(w, g16, m, v, None, step=1, copy_out=out)
        assert (w == 1).all() and not m.any()
    with pytest.raises(TypeError, match="float64 only"):  # float64 parameters: float64 only
        F.sgd_(np.ones(8), np.ones(8, np.float32), None, step=1)
    with pytest.raises(
        TypeError, match="'exp_avg' is float64; state_dtype=None keeps it as float32"
    ):
        F.adam_(p, g16, m.astype(np.float64), v, None, step=1)
    f64 = np.ones(3)
    with pytest.raises(TypeError, match="grad for param 0"):
        fo.SGD([f64], lr=0.1).step([np.ones(3, BF16)])
    assert (f64 == 1).all()


def test_copy_out_is_the_rounded_parameter() -> None:
    """The offload layout through the functional tier: float32 parameter and state updated,
    and the parameter rounded into a bfloat16 copy in the same pass."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal(1000).astype(np.float32)
    ref = w.copy()
    out = np.zeros(1000, BF16)
    g = rng.standard_normal(1000).astype(np.float32).astype(BF16)
    m, v = np.zeros(1000, np.float32), np.zeros(1000, np.float32)
    m2, v2 = m.copy(), v.copy()
    F.adamw_(w, g, m, v, None, step=1, lr=1e-2, copy_out=out)
    F.adamw_(ref, g.astype(np.float32), m2, v2, None, step=1, lr=1e-2)
    same_bits(w, ref, "param")
    same_bits(out, reference.round_to_bfloat16(ref), "copy-out")


@each_case(one_per_optimizer())
def test_reference_classes_run_every_layout(case: Case) -> None:
    """fastoptim.reference's classes (NumPy, float32 arithmetic, the same rounding and random
    bits) stay within a few units of the stored dtype of the compiled layout after 5 steps."""
    rng = np.random.default_rng(4)
    start = [np.asarray(rng.standard_normal(s), np.float32).astype(BF16) for s in ((40,), (3, 5))]
    kw = {**case.kwargs, "master_weights": True, "rounding": "stochastic", "seed": 3}
    a, b = [x.copy() for x in start], [x.copy() for x in start]
    fast = getattr(fo, case.opt)(a, **kw)
    ref = getattr(reference, case.opt)(b, **kw)
    for _ in range(5):
        grads = [np.asarray(rng.standard_normal(x.shape), np.float32).astype(BF16) for x in a]
        fast.step(grads)
        ref.step(grads)
    for x, y in zip(a, b):
        ulps = np.abs(x.view(np.int16).astype(np.int32) - y.view(np.int16).astype(np.int32))
        assert ulps.max() <= 4, ulps.max()
    for k in fast.state:
        for n, v in fast.state[k].items():
            if n != "step":
                np.testing.assert_allclose(v.astype(np.float64), ref.state[k][n].astype(np.float64),
                                           rtol=1e-4, atol=1e-6, err_msg=f"{n} {k}")  # fmt: skip


def test_set_copy_out_numpy_tier() -> None:
    """Two groups, named parameters, a dict of copy-outs: each copy is its parameter rounded;
    copies that alias anything the optimizer owns are refused with nothing changed; None
    removes them."""
    rng = np.random.default_rng(8)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("a", 50), ("b", (3, 4)))}
    opt = fo.SGD([{"params": {"a": params["a"]}}, {"params": {"b": params["b"]}, "lr": 0.05}],
                 lr=0.1, momentum=0.9)  # fmt: skip
    outs = {"a": np.zeros(50, F16), "b": np.zeros((3, 4), BF16)}
    opt.set_copy_out(outs)
    for _ in range(2):
        opt.step({n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()})
        same_bits(outs["a"], reference.round_to_float16(params["a"]), "a")
        same_bits(outs["b"], reference.round_to_bfloat16(params["b"]), "b")
    momentum = opt.state["a"]["momentum_buffer"]
    for bad, exc, words in (
        ({"a": momentum.view(F16)[:50]}, ValueError, "shares memory"),
        ({"b": np.zeros((3, 4), np.float32)}, TypeError, "bfloat16 or float16"),
        ({"c": np.zeros(3, BF16)}, ValueError, "no parameter named"),
        ([np.zeros(50, F16)], ValueError, "expected 2 entries"),
    ):
        with pytest.raises(exc, match=words):
            opt.set_copy_out(bad)
    opt.set_copy_out(None)
    kept = outs["a"].copy()
    opt.step({n: np.ones(p.shape, np.float32) for n, p in params.items()})
    same_bits(outs["a"], kept, "a (no longer written)")


@each_case(CASES)
@pytest.mark.parametrize(
    ("layout", "rounding"), [("bf16", "nearest"), ("bf16-master", "stochastic")]
)
def test_every_option_set_in_two_layouts(isa: str, case: Case, layout: str, rounding: str) -> None:
    """The same check for every option set of the case table (nesterov, maximize, weight
    decay, cautious, AMSGrad...: the test above takes one per optimizer), in two layouts."""
    test_layout_is_float32_step_then_rounding(isa, case, layout, rounding)


@each_case(one_per_optimizer())
@pytest.mark.parametrize("copy", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("threads", [1, 3])
def test_copy_out_of_every_optimizer(
    isa: str, case: Case, copy: np.dtype[Any], threads: int
) -> None:
    """The offload layout, every optimizer: float32 parameters stepped with bfloat16
    gradients are bit for bit the float32 step on those gradients, and each copy-out array
    is its parameter rounded to nearest, on 1 and 3 threads (small chunks)."""
    before = fo.get_num_threads(), _core.get_grain()
    fo.set_num_threads(threads)
    _core.set_grain(2048)
    try:
        rng = np.random.default_rng(5)
        params = [np.asarray(rng.standard_normal(s) * 2, np.float32) for s in SHAPES]
        mirror = [p.copy() for p in params]
        opt = getattr(fo, case.opt)(params, **case.kwargs)
        ref = getattr(fo, case.opt)(mirror, **case.kwargs)
        outs = [np.zeros(s, copy) for s in SHAPES]
        opt.set_copy_out(outs)
        for t in range(3):
            grads = [np.asarray(rng.standard_normal(s), np.float32).astype(BF16) for s in SHAPES]
            opt.step(grads)
            ref.step([g.astype(np.float32) for g in grads])
            for i, (p, q, o) in enumerate(zip(params, mirror, outs)):
                same_bits(p, q, f"param {i} step {t}")
                same_bits(o, round_to(p, copy, None), f"copy-out {i} step {t}")
    finally:
        fo.set_num_threads(before[0])
        _core.set_grain(before[1])
