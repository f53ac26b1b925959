"""The precision policy of a parameter group, for every tier.

Five options every optimizer takes (keyword-only; defined once in
:data:`fastoptim.engine.definition.COMMON`):

``state_dtype``
    The dtype of the state buffers of parameters that compute in float32 (float32, bfloat16
    and float16 parameters): ``None`` (the default: float32), ``"float32"``, ``"bfloat16"``,
    ``"float16"``, ``"param"`` (the parameter's own dtype, as ``torch.optim`` keeps it),
    ``"int8"`` / ``"int4"`` (block-wise 8-/4-bit quantized, see below), or a dict from state
    name to one of those (``{"exp_avg": "bfloat16"}``; the others take the default).  NumPy
    and torch dtypes are accepted for the names.  float64 parameters always keep float64
    state.

    ``"int8"`` (Dettmers et al. 2022, bitsandbytes' format): a state ``name`` of a parameter
    of at least :data:`MIN_QUANTIZED` elements is stored as ``name`` (uint8 codes, shaped like
    the parameter) and ``name + "_absmax"`` (float32, one scale per block of
    :data:`QUANT_BLOCK` elements); element ``i`` is ``map[codes[i]] * absmax[i // 256]`` with
    bitsandbytes' signed dynamic map for first moments and the unsigned one for second moments
    (:data:`QUANT_MAPS`).  Smaller parameters keep float32 state.  Only states in
    :data:`QUANT_MAPS` can be quantized (not Rprop's step sizes, nor ASGD's parameter average).

    ``"int4"`` (Li et al. 2023, torchao's 4-bit optimizer state): the same states, as ``name``
    (uint8, a 1-D array of ``(size + 1) // 2`` bytes holding two 4-bit codes each: element
    ``2i`` in the high nibble, ``2i + 1`` in the low one, as torchao packs them) and
    ``name + "_absmax"`` (float32, one scale per block of :data:`QUANT_BLOCK4` = 128
    elements).  First moments use torchao's signed map ``create_dynamic_map(signed=True,
    max_exponent_bits=3, total_bits=4)``, second moments its unsigned linear map ``k / 16``
    for ``k = 1..16``: without 0, so a nonzero second moment never dequantizes to 0 (which
    would turn Adam's ``m / (sqrt(v) + eps)`` into ``m / eps``: the "zero-point problem" of Li
    et al.); a block's smallest values read as at least 1/16 of its absmax instead.
``master_weights``
    Keep a float32 copy (state ``"master"``) of every bfloat16/float16 parameter: the update
    is computed on it and rounded into the parameter in the same pass.  No effect on float32
    and float64 parameters.
``kahan``
    Kahan-compensated bfloat16/float16 parameters without a master copy: what rounding the
    parameter loses is kept in a buffer of its dtype (state ``"compensation"``) and added back
    at the next step.  The parameter itself is then rounded to nearest.
``rounding``
    How every float32 result is stored into a bfloat16/float16 array: ``"nearest"`` (ties to
    even, as torch) or ``"stochastic"`` (unbiased; random bits from a counter-based hash of
    ``(seed, step, tensor, array, element)``, so identical for any thread count and resumable).
``seed``
    The seed of stochastic rounding: an int in [0, 2**64).

Arithmetic is float32 for float32/bfloat16/float16 parameters and float64 for float64 ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np

# The signatures' annotations of the options (see codegen).
Rounding = Literal["nearest", "stochastic"]
StateDType = Union[str, "np.dtype[Any]", type, Mapping[str, Any], None]

LOW = ("bfloat16", "float16")  # the 16-bit formats the driver converts
FLOAT32_FAMILY = ("float32", *LOW)  # parameters that compute in float32


def is_low(dtype: np.dtype[Any]) -> bool:
    """Whether `dtype` is one of ``LOW`` (without building a dtype's name, which costs
    microseconds, for the other dtypes)."""
    return dtype.itemsize == 2 and dtype.name in LOW


ROUNDINGS = ("nearest", "stochastic")
MASTER = "master"
COMPENSATION = "compensation"
EMA = "ema"  # the exponential moving average of a parameter (engine.transforms' ema_decay)
EXTRA_STATES = (MASTER, COMPENSATION, EMA)
# Extra states that start as a copy of their parameter.
COPIES = (MASTER, EMA)
# The keyword of fastoptim._core.Plan that takes each extra state's arrays.
PLAN_EXTRAS = (("masters", MASTER), ("comps", COMPENSATION), ("emas", EMA))

#: The functional tier's optional arrays (keyword arguments of every function): a float32 master
#: copy of a bfloat16/float16 parameter, a Kahan compensation buffer of one, a copy-out array.
FUNCTIONAL_ARRAYS = ("master", "compensation", "copy_out", "ema")

#: The quantized state kinds a policy can name (the value of ``state_dtype``).
INT8 = "int8"
INT4 = "int4"
QUANT_KINDS = (INT8, INT4)
#: Elements per block of a 4-bit quantized state.
QUANT_BLOCK4 = 128
#: Elements per block of a quantized state.
QUANT_BLOCK = 256
#: The smallest parameter whose state is quantized (smaller ones keep float32 state, as
#: bitsandbytes' ``min_8bit_size``).
MIN_QUANTIZED = 4096
#: The states that can be quantized, and their map: signed for first moments (momentum,
#: averages of gradients), unsigned for second moments and accumulators of squares (never
#: negative).  Rprop's ``prev``/``step_size`` (per-element step sizes over many orders of
#: magnitude: the small ones would become 0 and stay there) and ASGD's ``ax`` (an average of the
#: parameters, which needs their precision) are left out.
QUANT_MAPS = {
    "exp_avg": "signed8",
    "momentum_buffer": "signed8",
    "grad_avg": "signed8",
    "exp_avg_sq": "unsigned8",
    "max_exp_avg_sq": "unsigned8",
    "square_avg": "unsigned8",
    "sum": "unsigned8",
    "acc_delta": "unsigned8",
    "exp_inf": "unsigned8",
}
#: The suffix of a quantized state's per-block scales in ``opt.state`` and checkpoints.
ABSMAX = "_absmax"
# A 4-bit state's memory order in the torch tier: the order of its parameter's dimensions
# (outermost first) in which its packed codes run, kept beside them where the parameter is not
# contiguous (absent: row-major).
ORDER = "_order"
ABSMAX_KIND = "absmax8"  # the layout's kind of those arrays
ABSMAX4_KIND = "absmax4"  # (of a 4-bit state's)

STATE_DTYPE = "state_dtype"
EMA_DECAY = "ema_decay"  # (engine.transforms: the option that gives parameters an EMA)
MASTER_WEIGHTS = "master_weights"
KAHAN = "kahan"
ROUNDING = "rounding"
SEED = "seed"


def dtype_name(d: Any) -> str | None:
    """The name of a float dtype fastoptim stores (``"float32"``, ``"bfloat16"``...) given as a
    string, a NumPy dtype or scalar type, ml_dtypes' bfloat16 or a torch dtype; None if it is
    none of those."""
    if d is None:
        return None  # (np.dtype(None) is float64)
    if isinstance(d, str):
        name = d.removeprefix("torch.")
    elif type(d).__module__ == "torch" and type(d).__name__ == "dtype":
        name = str(d).removeprefix("torch.")
    elif isinstance(d, (np.dtype, type)):  # (not a value: np.dtype(np.float16(1)) is one)
        try:
            name = np.dtype(d).name
        except TypeError:
            return None
    else:
        return None
    name = {"half": "float16", "float": "float32", "double": "float64"}.get(name, name)
    return name if name in ("float64", *FLOAT32_FAMILY) else None


def check_state_dtype(cls: str, value: Any, states: tuple[str, ...]) -> None:
    """`value` is a valid ``state_dtype`` for an optimizer whose states are `states` (plus the
    EMA of ``ema_decay``)."""
    if value is None:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if k not in states and k != EMA:
                raise ValueError(
                    f"{cls}: state_dtype names state {k!r}; this optimizer's states are "
                    f"{list(states)} (and {EMA!r} with ema_decay)"
                )
            _check_one(cls, f"state_dtype[{k!r}]", v)
            if _is_quant(v) and k not in QUANT_MAPS:
                raise ValueError(f"{cls}: state {k!r} cannot be quantized ({_WHY_NOT})")
        return
    _check_one(cls, "state_dtype", value)
    if _is_quant(value) and states and not any(n in QUANT_MAPS for n in states):
        raise ValueError(
            f"{cls}: state_dtype={value!r}: no state of {cls} can be quantized ({_WHY_NOT})"
        )


_WHY_NOT = (
    "quantized: the first and second moments and accumulators of Adam, AdamW, NAdam, RAdam, "
    "Adamax, ADOPT, Lion, SGD momentum, RMSprop, Adagrad, Adadelta, LAMB, LARS, SparseAdam "
    "and AdamWScheduleFree; not Rprop's step sizes, nor ASGD's parameter average or "
    "SGDScheduleFree's z (parameter sequences), which 8 or 4 bits relative to a block maximum "
    "would destroy"
)


def _is_quant(v: Any) -> bool:
    return isinstance(v, str) and v in QUANT_KINDS


def _is_param(v: Any) -> bool:  # (not `v == "param"`: an array compares element-wise)
    return isinstance(v, str) and v == "param"


def qmap(name: str, kind: str) -> str:
    """The map of quantized state `name` stored as `kind` (``"int8"`` or ``"int4"``):
    ``"signed8"``, ``"unsigned8"``, ``"signed4"`` or ``"unsigned4"``."""
    base = QUANT_MAPS[name]
    return base[:-1] + "4" if kind == INT4 else base


def qmaps(policy: Any, names: Sequence[str]) -> list[str]:
    """Per state name of `names`: the map of its quantized ``(codes, absmax)`` pairs under the
    ``state_dtype`` `policy` (its kind, ``"int8"`` or ``"int4"``, named by the policy, never
    read from the codes' shape: :func:`qmap`), or ``""`` where the policy does not quantize it.
    What every tier passes as ``_core.Plan(qmaps=...)``."""
    out = []
    for n in names:
        v = policy.get(n) if isinstance(policy, Mapping) else policy
        out.append(qmap(n, str(v)) if _is_quant(v) and n in QUANT_MAPS else "")
    return out


def _check_one(cls: str, name: str, v: Any) -> None:
    if v is None or _is_param(v) or _is_quant(v):
        return
    d = dtype_name(v)
    if d not in FLOAT32_FAMILY:
        raise ValueError(
            f"{cls}: {name} must be 'float32', 'bfloat16', 'float16', 'param', 'int8', 'int4' "
            f"or None, got {v!r}" + (" (float64 parameters keep float64 state anyway)" if d else "")
        )


def normalize(value: Any) -> Any:
    """``state_dtype`` as plain data (names, a dict of names): what groups and checkpoints keep."""
    if value is None or _is_param(value) or _is_quant(value):
        return value
    if isinstance(value, Mapping):
        return {k: normalize(v) for k, v in value.items()}
    name = dtype_name(value)
    return value if name is None else name  # (an invalid value stays, for check to report)


def check_rounding(cls: str, value: Any) -> None:
    if not isinstance(value, str) or value not in ROUNDINGS:
        raise ValueError(f"{cls}: rounding must be 'nearest' or 'stochastic', got {value!r}")


def check_seed(cls: str, value: Any, name: str = "seed") -> None:
    """TypeError / ValueError unless `value` is a key of the random bits (``seed``; the
    functional tier's ``tensor``): an int in [0, 2**64)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{cls}: {name} must be an int, got {value!r}")
    if not 0 <= value < 2**64:
        raise ValueError(f"{cls}: invalid {name}={value!r}: must be in [0, 2**64)")


def buffers(
    group: Mapping[str, Any], param: str, names: tuple[str, ...], size: int = 0
) -> dict[str, str]:
    """The state buffers of one parameter of dtype `param` (a name) and `size` elements in
    `group`: name -> kind (a dtype name, or ``"int8"`` / ``"int4"`` for quantized codes and
    ``"absmax8"`` / ``"absmax4"`` for their scales, under ``name + "_absmax"``, see
    :func:`storage`), for the
    kernel's states `names`, then ``"ema"`` when the group has an ``ema_decay`` (its dtype
    follows ``state_dtype`` like the kernel's states; never quantized), then ``"master"`` /
    ``"compensation"`` when the group's policy gives the parameter one."""
    ema = (EMA,) if group.get(EMA_DECAY) is not None else ()
    if param == "float64":
        own = (n for n in names if n != EMA and not n.endswith(ABSMAX))
        return dict.fromkeys((*own, *ema), "float64")
    policy = group.get(STATE_DTYPE)
    out = {}
    for n in (*(n for n in names if n not in EXTRA_STATES and not n.endswith(ABSMAX)), *ema):
        v = policy.get(n) if isinstance(policy, Mapping) else policy
        if _is_quant(v):
            if n in QUANT_MAPS and size >= MIN_QUANTIZED:
                out[n] = str(v)
                out[n + ABSMAX] = absmax_kind(str(v))
            else:
                out[n] = "float32"
            continue
        named = dtype_name(v) if v is not None else None
        out[n] = param if _is_param(v) else (named or "float32")
    if param in LOW:
        if group.get(MASTER_WEIGHTS):
            out[MASTER] = "float32"
        elif group.get(KAHAN):
            out[COMPENSATION] = param
    return out


def quantize(values: np.ndarray, name: str, kind: str = INT8) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise codes and absmax (float32, one per block) of the C-contiguous float32
    `values` as state `name` (its map: :data:`QUANT_MAPS`) stored as `kind`: ``"int8"``, codes
    of `values`' shape, blocks of :data:`QUANT_BLOCK`; ``"int4"``, two codes per byte (1-D),
    blocks of :data:`QUANT_BLOCK4`."""
    codes = np.empty(storage(kind, values.shape)[1], np.uint8)
    absmax = np.empty(storage(absmax_kind(kind), values.shape)[1], np.float32)
    from .. import _core  # (not at import: codegen.py runs on sources without the extension)

    _core.quantize_blockwise(values, codes, absmax, qmap(name, kind))
    return codes, absmax


def quantized_fill(fill: float, name: str, kind: str = INT8) -> tuple[int, float]:
    """The code byte (4-bit: two codes) and absmax of a block of quantized state `name`
    stored as `kind` whose values are all `fill` (what a new quantized state holds, in every
    tier: see :func:`fill_codes`).  ValueError for a negative `fill` of a state of the
    unsigned map (a second moment or an accumulator of squares: never negative)."""
    if fill < 0 and QUANT_MAPS[name].startswith("unsigned"):
        raise ValueError(
            f"state {name!r} is never negative (a second moment or an accumulator of squares: "
            f"the unsigned map), so it cannot be filled with {fill!r}"
        )
    codes, absmax = quantize(
        np.full(QUANT_BLOCK4 if kind == INT4 else QUANT_BLOCK, fill, np.float32), name, kind
    )
    return int(codes[0]), float(absmax[0])


def fill_codes(codes: Any, code: int, kind: str, size: int) -> None:
    """Set every byte of `codes` (a NumPy array or a torch tensor) of a state of `size`
    elements to `code`; a 4-bit state of odd size keeps its last byte's low nibble 0 (it is no
    element's)."""
    codes[...] = code
    if kind == INT4 and size % 2:
        codes[-1] = code & 0xF0


def absmax_kind(kind: str) -> str:
    """The :func:`buffers` kind of the scales of codes of `kind` (``"int8"`` / ``"int4"``)."""
    return ABSMAX_KIND if kind == INT8 else ABSMAX4_KIND


def storage(kind: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The dtype name and shape of a buffer of `kind` (see :func:`buffers`) for a parameter of
    `shape`: 8-bit codes are uint8 of the parameter's shape, 4-bit ones a 1-D uint8 array of
    ``(size + 1) // 2`` bytes; their scales float32 with one entry per block of
    :data:`QUANT_BLOCK` (8-bit) or :data:`QUANT_BLOCK4` (4-bit) elements."""
    if kind == INT8:
        return "uint8", tuple(shape)
    size = 1
    for d in shape:
        size *= d
    if kind == INT4:
        return "uint8", ((size + 1) // 2,)
    if kind in (ABSMAX_KIND, ABSMAX4_KIND):
        block = QUANT_BLOCK if kind == ABSMAX_KIND else QUANT_BLOCK4
        return "float32", (-(-size // block),)
    return kind, tuple(shape)


def quantized(layout: Mapping[str, str], name: str) -> bool:
    """Whether state `name` is quantized in `layout` (one parameter's :func:`buffers`)."""
    return layout.get(name) in QUANT_KINDS


def check_layout(cls: str, group: Mapping[str, Any]) -> None:
    """Rules between the options of one group."""
    if group.get(MASTER_WEIGHTS) and group.get(KAHAN):
        raise ValueError(
            f"{cls}: master_weights and kahan exclude each other (a float32 master copy "
            "loses nothing to rounding; Kahan compensation is for parameters without one)"
        )


def follow(param: np.ndarray, master: np.ndarray, stochastic: bool) -> int:
    """Make the float32 `master` copy of bfloat16/float16 `param` (same shape, any strides)
    follow what was done to `param` outside the optimizer: each element of `param` that is not
    what a step writes from its master (rounded to nearest; `stochastic`: either representable
    value around the master) gives the master its value; the others keep the master's bits
    (NaN against NaN included).  Returns the number of elements taken.  The one rule of both
    tiers (``Optimizer.follow_params``, fastoptim.torch before a step).  C-contiguous arrays
    are compared in blocks of :data:`_FOLLOW_BLOCK` elements (bounded temporaries), others
    whole."""
    if not (param.flags.c_contiguous and master.flags.c_contiguous):
        return _follow_block(param, master, stochastic)
    p, m = param.reshape(-1), master.reshape(-1)
    return sum(
        _follow_block(p[i : i + _FOLLOW_BLOCK], m[i : i + _FOLLOW_BLOCK], stochastic)
        for i in range(0, p.size, _FOLLOW_BLOCK)
    )


def _follow_block(p: np.ndarray, m: np.ndarray, stochastic: bool) -> int:
    with np.errstate(invalid="ignore", over="ignore"):  # (NaN/Inf masters: compared as such)
        near = m.astype(p.dtype)  # (NumPy's and ml_dtypes' casts round to nearest even)
        stale = (p != near) & ~(np.isnan(p) & np.isnan(m))
        if stochastic:  # (the other value around the master; none where it is representable)
            # One step from `near` toward the master (what nextafter gives, 3x faster here):
            # 0 where the master is `near` (or NaN: then only a NaN is kept, above).
            wide = near.astype(np.float32)
            toward = (m > wide).astype(np.int16) - (m < wide)
            stale &= _ordered(p) - _ordered(near) != toward
    n = int(np.count_nonzero(stale))
    if n:
        np.copyto(m, p, where=stale, casting="unsafe")
    return n


def _ordered(x: np.ndarray) -> np.ndarray:
    """The 16-bit patterns of bfloat16/float16 `x` as int16 in the order of their values
    (-0 just below +0): one value up is +1.  A difference of two wraps around only between
    the two ends, NaNs both, which :func:`_follow_block` never counts as one step."""
    bits = x.view(np.int16)
    return bits ^ ((bits >> 15) & 0x7FFF)


_FOLLOW_BLOCK = 1 << 20


def absmax_problem(a: np.ndarray) -> str:
    """What is wrong with the scales `a` of a quantized state, or "": they are >= 0 (NaN
    allowed: a block that went non-finite)."""
    if not a.size or (np.minimum.reduce(a, None) >= 0 and np.maximum.reduce(a, None) < np.inf):
        return ""  # (the common case, in two reductions; a NaN makes both NaN: looked at)
    bad = np.flatnonzero((a < 0) | np.isinf(a))
    if bad.size:
        return (
            f"absmax must be >= 0 and finite (NaN marks a non-finite block); {bad.size} "
            f"entries are not, first at block {int(bad[0])}: {a.reshape(-1)[bad[0]]!r}"
        )
    return ""
