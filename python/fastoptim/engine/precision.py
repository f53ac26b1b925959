"""The precision policy of a parameter group, for every tier.

Five options every optimizer takes (keyword-only; defined once in
:data:`fastoptim.engine.definition.COMMON`):

``state_dtype``
    The dtype of the state buffers of parameters that compute in float32 (float32, bfloat16
    and float16 parameters): ``None`` (the default: float32), ``"float32"``, ``"bfloat16"``,
    ``"float16"``, ``"param"`` (the parameter's own dtype, as ``torch.optim`` keeps it), or a
    dict from state name to one of those (``{"exp_avg": "bfloat16"}``; the others take the
    default).  NumPy and torch dtypes are accepted for the names.  float64 parameters always
    keep float64 state.
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

from collections.abc import Mapping
from typing import Any, Literal, Union

import numpy as np

# The signatures' annotations of the options (see codegen).
Rounding = Literal["nearest", "stochastic"]
StateDType = Union[str, "np.dtype[Any]", type, Mapping[str, Any], None]

LOW = ("bfloat16", "float16")  # the 16-bit formats the driver converts
FLOAT32_FAMILY = ("float32", *LOW)  # parameters that compute in float32
ROUNDINGS = ("nearest", "stochastic")
MASTER = "master"
COMPENSATION = "compensation"
EMA = "ema"  # the exponential moving average of a parameter (engine.transforms' ema_decay)
EXTRA_STATES = (MASTER, COMPENSATION, EMA)
# Extra states that start as a copy of their parameter.
COPIES = (MASTER, EMA)

#: The functional tier's optional arrays (keyword arguments of every function): a float32 master
#: copy of a bfloat16/float16 parameter, a Kahan compensation buffer of one, a copy-out array.
FUNCTIONAL_ARRAYS = ("master", "compensation", "copy_out", "ema")

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
    else:
        try:
            name = np.dtype(d).name
        except TypeError:
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
        return
    _check_one(cls, "state_dtype", value)


def _check_one(cls: str, name: str, v: Any) -> None:
    if v is None or v == "param":
        return
    d = dtype_name(v)
    if d not in FLOAT32_FAMILY:
        raise ValueError(
            f"{cls}: {name} must be 'float32', 'bfloat16', 'float16', 'param' or None, got "
            f"{v!r}" + (" (float64 parameters keep float64 state anyway)" if d else "")
        )


def normalize(value: Any) -> Any:
    """``state_dtype`` as plain data (names, a dict of names): what groups and checkpoints keep."""
    if value is None or value == "param":
        return value
    if isinstance(value, Mapping):
        return {k: normalize(v) for k, v in value.items()}
    name = dtype_name(value)
    return value if name is None else name  # (an invalid value stays, for check to report)


def check_rounding(cls: str, value: Any) -> None:
    if not isinstance(value, str) or value not in ROUNDINGS:
        raise ValueError(f"{cls}: rounding must be 'nearest' or 'stochastic', got {value!r}")


def check_seed(cls: str, value: Any) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{cls}: seed must be an int, got {value!r}")
    if not 0 <= value < 2**64:
        raise ValueError(f"{cls}: invalid seed={value!r}: must be in [0, 2**64)")


def buffers(group: Mapping[str, Any], param: str, names: tuple[str, ...]) -> dict[str, str]:
    """The state buffers of one parameter of dtype `param` (a name) in `group`: name -> dtype
    name, for the kernel's states `names`, then ``"master"`` / ``"compensation"`` when the
    group's policy gives the parameter one, then ``"ema"`` when the group has an
    ``ema_decay`` (its dtype follows ``state_dtype`` like the kernel's states)."""
    ema = (EMA,) if group.get(EMA_DECAY) is not None else ()
    if param == "float64":
        return dict.fromkeys((*(n for n in names if n != EMA), *ema), "float64")
    policy = group.get(STATE_DTYPE)
    out = {}
    for n in (*(n for n in names if n not in EXTRA_STATES), *ema):
        v = policy.get(n) if isinstance(policy, Mapping) else policy
        named = dtype_name(v) if v is not None else None
        out[n] = param if v == "param" else (named or "float32")
    if param in LOW:
        if group.get(MASTER_WEIGHTS):
            out[MASTER] = "float32"
        elif group.get(KAHAN):
            out[COMPENSATION] = param
    return out


def check_layout(cls: str, group: Mapping[str, Any]) -> None:
    """Rules between the options of one group."""
    if group.get(MASTER_WEIGHTS) and group.get(KAHAN):
        raise ValueError(
            f"{cls}: master_weights and kahan exclude each other (a float32 master copy "
            "loses nothing to rounding; Kahan compensation is for parameters without one)"
        )
