"""The functional tier: one in-place update of one parameter, for users who keep the state
themselves (``torch.optim``'s functional API, on NumPy arrays).  The functions are generated
from :mod:`fastoptim.definitions`.

Each function takes the parameter, its gradient and the state arrays the update needs (torch's
names: ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...), and updates parameter and state
**in place** with the same compiled kernel as the matching optimizer class in
:mod:`fastoptim.optimizers`, so results are bit-identical to the class's.  The update rules are
documented on the classes.

    >>> import numpy as np, fastoptim as fo
    >>> w, exp_avg, exp_avg_sq = (np.zeros(3, np.float32) for _ in range(3))
    >>> g = np.ones(3, np.float32)
    >>> fo.functional.adam_(w, g, exp_avg, exp_avg_sq, step=1, lr=0.1)
    >>> print(w.round(6), exp_avg)
    [-0.1 -0.1 -0.1] [0.1 0.1 0.1]

Conventions shared by every function:

- ``step`` (keyword, required) is the 1-based number of *this* update (``1`` the first time);
  it drives bias corrections and learning-rate decays.  Keep counting it yourself.
- Arrays are C-contiguous, writeable, native byte order, all of the same shape, pairwise
  distinct in memory (the gradient is only read).  The parameter is float32, float64,
  bfloat16 (``ml_dtypes.bfloat16``) or float16; a float64 parameter takes float64 gradient and
  state, the others a float32, bfloat16 or float16 gradient and the state dtypes the precision
  options say (``state_dtype``: float32 by default, as the classes; see
  :mod:`fastoptim.engine.precision`).  Nothing is ever copied: anything else is rejected.
- State arrays start as the class would create them: zeros, except Adagrad's ``sum``, which
  starts at the ``initial_accumulator_value`` of your choice.
- A state array must be given exactly when the options need it (e.g. ``max_exp_avg_sq`` iff
  ``amsgrad=True``); giving one the options do not use is an error too, since it would silently
  not be updated.
- Everything (hyper-parameters, state names, every array's dtype, shape, layout and aliasing)
  is validated before any element is touched: a call that raises changes nothing.
- Stochastic rounding (``rounding="stochastic"``, of 16-bit stores and of quantized codes)
  draws each element's random bits from ``(seed, step, tensor, array, element)``
  (:mod:`fastoptim.engine.precision`): ``tensor`` (keyword, default 0) is the tensor's number.
  An optimizer class numbers its parameters 0, 1, ... across its groups: the calls that give
  each parameter its number (and the class's ``seed``) reproduce its run bit for bit.  Give
  distinct tensors distinct numbers (or seeds), or they draw the same bits.
- A state may be block-wise 8-bit or 4-bit quantized (float32, bfloat16 and float16
  parameters; the states of :data:`fastoptim.engine.precision.QUANT_MAPS`): pass the pair
  ``(codes, absmax)`` instead of the array, as :func:`quantized_state` makes it.  The update
  dequantizes each block (256 elements, 128 for 4-bit), runs the same kernel, and quantizes the
  block again (new absmax; nearest codes, or stochastic ones with ``rounding="stochastic"``),
  exactly as the classes with
  ``state_dtype="int8"`` / ``"int4"`` do.  Which kind a pair is, the function's
  ``state_dtype`` says, as the class's does (``"int8"``, ``"int4"``, or a dict per state
  name); it is never guessed from the codes' shape.

    >>> w = np.zeros(5000, np.float32)
    >>> m = fo.functional.quantized_state(w, "exp_avg")
    >>> v = fo.functional.quantized_state(w, "exp_avg_sq")
    >>> fo.functional.adam_(w, np.ones(5000, np.float32), m, v, step=1, lr=0.1,
    ...                     state_dtype="int8")
    >>> print(w[:2].round(6), fo.functional.dequantized(m, "exp_avg")[:2])
    [-0.1 -0.1] [0.1 0.1]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from . import _core
from . import definitions as _defs
from .engine import precision as _precision
from .engine import sparse as _sparse
from .engine.definition import named_refusals as _named
from .engine.definition import with_keyword_hints as _hints
from .engine.functional import check_step as _check_step
from .engine.functional import step as _step
from .engine.optimizer import Value
from .engine.optimizer import run_rows as _run_rows
from .engine.precision import Rounding, StateDType

__all__ = [
    "quantized_state",
    "dequantized",
    "sgd_",
    "adagrad_",
    "rmsprop_",
    "adadelta_",
    "adam_",
    "adamw_",
    "adamax_",
    "nadam_",
    "radam_",
    "lion_",
    "rprop_",
    "asgd_",
    "adopt_",
    "lamb_",
    "lars_",
    "adamwschedulefree_",
    "sgdschedulefree_",
    "sparseadam_",
    "sparse_rows_",
    "muon_",
    "adafactor_",
]


def quantized_state(
    param: np.ndarray, name: str, fill: float = 0.0, *, dtype: str = "int8"
) -> tuple[np.ndarray, np.ndarray]:
    """A new block-wise quantized state `name` (e.g. ``"exp_avg"``, which decides the map: see
    :data:`fastoptim.engine.precision.QUANT_MAPS`) for `param`, every element `fill` (>= 0 for
    a state of the unsigned map, ``"exp_avg_sq"``...): ``(codes, absmax)``.
    ``dtype="int8"``: uint8 codes shaped like `param`, float32 absmax with one entry per block
    of 256 elements.  ``dtype="int4"``: 4-bit codes packed two per byte into a 1-D uint8 array
    of ``(param.size + 1) // 2`` bytes (element ``2i`` in the high nibble), float32 absmax with
    one entry per block of 128 elements.  Pass the same ``state_dtype=dtype`` to the update
    functions: it says which kind the pair is."""
    where = "quantized_state"
    _check_quantized(where, name, dtype)
    shape = tuple(np.shape(param))
    with _named(where):
        code, scale = _precision.quantized_fill(fill, name, dtype)
    codes = np.empty(_precision.storage(dtype, shape)[1], np.uint8)
    _precision.fill_codes(codes, code, dtype, int(np.prod(shape)))
    absmax = np.full(_precision.storage(_precision.absmax_kind(dtype), shape)[1], scale, np.float32)
    return codes, absmax


def dequantized(
    state: tuple[np.ndarray, np.ndarray],
    name: str,
    shape: tuple[int, ...] | None = None,
    *,
    dtype: str = "int8",
) -> np.ndarray:
    """The float32 values of a quantized state ``(codes, absmax)`` of state `name`, of the
    kind `dtype` (as :func:`quantized_state`'s: ``"int8"``, or ``"int4"``, whose packed codes
    need the parameter's `shape`)."""
    where = "dequantized"
    _check_quantized(where, name, dtype)
    codes, absmax = state
    if shape is None:
        if dtype == _precision.INT4:
            raise ValueError(f"{where}: a 4-bit state needs the parameter's shape")
        shape = tuple(np.shape(codes))
    out = np.empty(shape, np.float32)
    with _named(where, replacing="quantized"):  # (the compiled check names the pair so)
        _core.dequantize_blockwise(codes, absmax, out, _precision.qmap(name, dtype))
    return out


def _check_quantized(where: str, name: str, dtype: str) -> None:
    """ValueError unless state `name` can be quantized and `dtype` is a quantized kind."""
    if name not in _precision.QUANT_MAPS:
        raise ValueError(
            f"{where}: state {name!r} cannot be quantized (quantizable: "
            f"{sorted(_precision.QUANT_MAPS)})"
        )
    if dtype not in _precision.QUANT_KINDS:
        raise ValueError(f"{where}: dtype must be 'int8' or 'int4', got {dtype!r}")


def sparse_rows_(
    optimizer: str,
    param: np.ndarray,
    indices: Any,
    rows: np.ndarray,
    states: Mapping[str, np.ndarray],
    *,
    step: int,
    **hyper: Any,
) -> None:
    """One in-place sparse row update (see :mod:`fastoptim.engine.sparse`): `optimizer`'s
    update (``"SGD"``, ``"Adagrad"`` or ``"SparseAdam"``) of the rows ``param[indices]`` and of
    the same rows of the state arrays (``states``: name -> array, e.g. ``{"exp_avg": m,
    "exp_avg_sq": v}``), with the gradient rows `rows` (shape ``(len(indices),) +
    param.shape[1:]``; duplicate indices are summed first).  ``step`` (the 1-based update
    number) and the hyper-parameters as for the optimizer's own function.  The other rows are
    not touched; everything is checked first.

        >>> import numpy as np, fastoptim as fo
        >>> table, m, v = (np.zeros((3, 2)) for _ in range(3))
        >>> fo.functional.sparse_rows_("SparseAdam", table, [1], np.ones((1, 2)),
        ...                            {"exp_avg": m, "exp_avg_sq": v}, step=1, lr=0.5)
        >>> table[:, 0].round(6)
        array([ 0. , -0.5,  0. ])
    """
    where = "sparse_rows_"
    defn = next((d for d in _defs.ALL if d.name == optimizer and d.rows is not None), None)
    if defn is None:
        raise ValueError(
            f"{where}: optimizer must be one of 'SGD', 'Adagrad', 'SparseAdam', got {optimizer!r}"
        )
    _check_step(where, step)
    known = {h.name for h in defn.options if h.functional}
    unknown = sorted(set(hyper) - known)
    if unknown:
        raise TypeError(f"{where}: {optimizer} has no hyper-parameter(s) {', '.join(unknown)}")
    if not isinstance(states, Mapping) or not all(isinstance(k, str) for k in states):
        raise TypeError(
            f"{where}: states must be a dict from state name to array (e.g. {{'exp_avg': m}}), "
            f"got {type(states).__name__}"
        )
    group = {**defn.defaults(), **hyper}
    with _named(where, replacing=f"{defn.name}:"):  # ("SparseAdam: invalid lr": the function's)
        defn.check(group)
    _sparse.check_group(defn, where, group)
    core = defn.compile(group, set(states) if step == 1 else set())
    needed = list(core.state_names())
    if sorted(states) != sorted(needed):
        raise ValueError(
            f"{where}: {optimizer} with these options needs the state arrays {needed}, got "
            f"{sorted(states)}"
        )
    if isinstance(param, np.ndarray) and param.dtype.name in (
        *_precision.FLOAT32_FAMILY,
        "float64",
    ):
        pname = param.dtype.name  # (the class tier's rule, from the policy)
        kinds = _precision.buffers(group, pname, tuple(needed), param.size)
        _sparse.check_param(where, pname, list(kinds.values()), group.get(_precision.ROUNDING))
    idx, grad = _sparse.coalesce(f"{where}: param", param, indices, rows)
    job = (core, int(step), param, idx, grad, [states[n] for n in needed], "")
    with _named(where):  # (the compiled checks: "state 'exp_avg' of param: ...")
        _run_rows(defn.core_rows, [job], lambda: None)


# ---- generated by fastoptim.engine.codegen from fastoptim.definitions: do not edit below


@_hints(_defs.SGD)
def sgd_(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    *,
    step: int,
    lr: Value = 0.001,
    momentum: Value = 0,
    dampening: Value = 0,
    weight_decay: Value = 0,
    nesterov: bool = False,
    maximize: bool = False,
    cautious: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place SGD update (see :class:`fastoptim.SGD`).

    ``momentum_buffer`` is needed iff ``momentum != 0``.  Like torch, the buffer is *set* to the
    (effective) gradient on its first use instead of being decayed: that happens when
    ``step == 1``, whatever the buffer holds.  Count ``step`` from the update that first uses
    the buffer."""
    _step(
        _defs.SGD,
        param,
        grad,
        {"momentum_buffer": momentum_buffer},
        step,
        dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            cautious=cautious,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.ADAGRAD)
def adagrad_(
    param: np.ndarray,
    grad: np.ndarray,
    sum: np.ndarray,
    *,
    step: int,
    lr: Value = 0.01,
    lr_decay: Value = 0,
    weight_decay: Value = 0,
    eps: Value = 1e-10,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place Adagrad update (see :class:`fastoptim.Adagrad`).

    ``sum`` starts at the class's ``initial_accumulator_value`` (0 by default); ``step`` drives
    the ``lr_decay``."""
    _step(
        _defs.ADAGRAD,
        param,
        grad,
        {"sum": sum},
        step,
        dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.RMSPROP)
def rmsprop_(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    grad_avg: np.ndarray | None = None,
    momentum_buffer: np.ndarray | None = None,
    *,
    step: int,
    lr: Value = 0.01,
    alpha: Value = 0.99,
    eps: Value = 1e-08,
    weight_decay: Value = 0,
    momentum: Value = 0,
    centered: bool = False,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place RMSprop update (see :class:`fastoptim.RMSprop`).

    ``grad_avg`` is needed iff ``centered``, ``momentum_buffer`` iff ``momentum > 0``.
    ``step`` does not change the update (it is required for uniformity)."""
    _step(
        _defs.RMSPROP,
        param,
        grad,
        {"square_avg": square_avg, "grad_avg": grad_avg, "momentum_buffer": momentum_buffer},
        step,
        dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.ADADELTA)
def adadelta_(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    acc_delta: np.ndarray,
    *,
    step: int,
    lr: Value = 1.0,
    rho: Value = 0.9,
    eps: Value = 1e-06,
    weight_decay: Value = 0,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place Adadelta update (see :class:`fastoptim.Adadelta`).

    ``step`` does not change the update (it is required for uniformity)."""
    _step(
        _defs.ADADELTA,
        param,
        grad,
        {"square_avg": square_avg, "acc_delta": acc_delta},
        step,
        dict(
            lr=lr,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.ADAM)
def adam_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None = None,
    *,
    step: int,
    lr: Value = 0.001,
    betas: tuple[Value, Value] = (0.9, 0.999),
    eps: Value = 1e-08,
    weight_decay: Value = 0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    cautious: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place Adam update (see :class:`fastoptim.Adam`);
    ``decoupled_weight_decay=True`` is AdamW (:func:`adamw_`).

    ``max_exp_avg_sq`` is needed iff ``amsgrad``."""
    _step(
        _defs.ADAM,
        param,
        grad,
        {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq},
        step,
        dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious=cautious,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.ADAMW)
def adamw_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None = None,
    *,
    step: int,
    lr: Value = 0.001,
    betas: tuple[Value, Value] = (0.9, 0.999),
    eps: Value = 1e-08,
    weight_decay: Value = 0.01,
    amsgrad: bool = False,
    maximize: bool = False,
    cautious: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place AdamW update (see :class:`fastoptim.AdamW`): Adam with
    decoupled weight decay.  ``max_exp_avg_sq`` is needed iff ``amsgrad``."""
    _step(
        _defs.ADAMW,
        param,
        grad,
        {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq},
        step,
        dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            cautious=cautious,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.ADAMAX)
def adamax_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_inf: np.ndarray,
    *,
    step: int,
    lr: Value = 0.002,
    betas: tuple[Value, Value] = (0.9, 0.999),
    eps: Value = 1e-08,
    weight_decay: Value = 0,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place Adamax update (see :class:`fastoptim.Adamax`)."""
    _step(
        _defs.ADAMAX,
        param,
        grad,
        {"exp_avg": exp_avg, "exp_inf": exp_inf},
        step,
        dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.NADAM)
def nadam_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    mu_product: float,
    lr: Value = 0.002,
    betas: tuple[Value, Value] = (0.9, 0.999),
    eps: Value = 1e-08,
    weight_decay: Value = 0,
    momentum_decay: Value = 0.004,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    cautious: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> float:
    r"""One in-place NAdam update (see :class:`fastoptim.NAdam`).

    ``mu_product`` (keyword, required) is the product :math:`\prod_{i<t}\mu_i` of the momentum
    schedule over the *previous* steps: ``1.0`` at the first step.  Returns the updated product
    (times :math:`\mu_t`): pass it to the next call.

        >>> mu = 1.0
        >>> for t in range(1, 4):                                  # doctest: +SKIP
        ...     mu = nadam_(p, g, m, v, step=t, mu_product=mu)"""
    return float(
        _step(
            _defs.NADAM,
            param,
            grad,
            {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
            step,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                momentum_decay=momentum_decay,
                decoupled_weight_decay=decoupled_weight_decay,
                maximize=maximize,
                cautious=cautious,
                state_dtype=state_dtype,
                rounding=rounding,
                seed=seed,
                max_grad_value=max_grad_value,
                ema_decay=ema_decay,
                grad_scale=grad_scale,
                tensor=tensor,
            ),
            {"mu_product": mu_product},
            dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
        )
    )


@_hints(_defs.RADAM)
def radam_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: Value = 0.001,
    betas: tuple[Value, Value] = (0.9, 0.999),
    eps: Value = 1e-08,
    weight_decay: Value = 0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    cautious: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place RAdam update (see :class:`fastoptim.RAdam`)."""
    _step(
        _defs.RADAM,
        param,
        grad,
        {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
        step,
        dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            cautious=cautious,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.LION)
def lion_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    *,
    step: int,
    lr: Value = 0.0001,
    betas: tuple[Value, Value] = (0.9, 0.99),
    weight_decay: Value = 0.0,
    maximize: bool = False,
    cautious: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place Lion update (see :class:`fastoptim.Lion`).

    ``step`` does not change the update (it is required for uniformity)."""
    _step(
        _defs.LION,
        param,
        grad,
        {"exp_avg": exp_avg},
        step,
        dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            maximize=maximize,
            cautious=cautious,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.RPROP)
def rprop_(
    param: np.ndarray,
    grad: np.ndarray,
    prev: np.ndarray,
    step_size: np.ndarray,
    *,
    step: int,
    etas: tuple[Value, Value] = (0.5, 1.2),
    step_sizes: tuple[Value, Value] = (1e-06, 50),
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place Rprop update (see :class:`fastoptim.Rprop`).

    Start with ``prev`` zero and ``step_size`` filled with the learning rate (there is no
    ``lr`` argument: it only sets that initial value).  ``step`` does not change the update (it
    is required for uniformity)."""
    _step(
        _defs.RPROP,
        param,
        grad,
        {"prev": prev, "step_size": step_size},
        step,
        dict(
            etas=etas,
            step_sizes=step_sizes,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.ASGD)
def asgd_(
    param: np.ndarray,
    grad: np.ndarray,
    ax: np.ndarray,
    *,
    step: int,
    eta: float,
    mu: float,
    lr: Value = 0.01,
    lambd: Value = 0.0001,
    alpha: Value = 0.75,
    t0: Value = 1000000.0,
    weight_decay: Value = 0,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> tuple[float, float]:
    """One in-place ASGD update (see :class:`fastoptim.ASGD`).

    ``eta`` and ``mu`` (keywords, required) are the step's learning rate and averaging weight:
    ``lr`` and ``1.0`` at the first step.  Returns their values for the next step, ``(eta, mu)``:
    pass them to the next call.

        >>> import numpy as np
        >>> p, g, ax = np.ones(3, np.float32), np.full(3, 0.5, np.float32), np.ones(3, np.float32)
        >>> lr = 0.01
        >>> eta, mu = lr, 1.0
        >>> for t in range(1, 4):
        ...     eta, mu = asgd_(p, g, ax, step=t, eta=eta, mu=mu, lr=lr)
        >>> round(mu, 6), p.dtype
        (1.0, dtype('float32'))"""
    eta, mu = _step(
        _defs.ASGD,
        param,
        grad,
        {"ax": ax},
        step,
        dict(
            lr=lr,
            lambd=lambd,
            alpha=alpha,
            t0=t0,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        {"eta": eta, "mu": mu},
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )
    return float(eta), float(mu)


@_hints(_defs.ADOPT)
def adopt_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: Value = 0.001,
    betas: tuple[Value, Value] = (0.9, 0.9999),
    eps: Value = 1e-06,
    clip: bool = True,
    weight_decay: Value = 0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    cautious: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place ADOPT update (see :class:`fastoptim.ADOPT`).

    ``step == 1`` is the initialising step: it only adds :math:`g^2` to ``exp_avg_sq`` (start
    it, and ``exp_avg``, at zero), whatever the other arguments."""
    _step(
        _defs.ADOPT,
        param,
        grad,
        {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
        step,
        dict(
            lr=lr,
            betas=betas,
            eps=eps,
            clip=clip,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            cautious=cautious,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.ADAMWSCHEDULEFREE)
def adamwschedulefree_(
    param: np.ndarray,
    grad: np.ndarray,
    z: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    weight_sum: float,
    lr_max: float,
    lr: Value = 0.0025,
    betas: tuple[Value, Value] = (0.9, 0.999),
    eps: Value = 1e-08,
    weight_decay: Value = 0,
    warmup_steps: float = 0,
    r: Value = 0.0,
    weight_lr_power: Value = 2.0,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> tuple[float, float]:
    """One in-place Schedule-Free AdamW update of :math:`y` (``param``) and
    ``z`` (see :class:`fastoptim.AdamWScheduleFree`).

    Start ``z`` as a copy of the parameter, ``exp_avg_sq`` at zero, ``weight_sum`` and
    ``lr_max`` at ``0.0``; returns the updated ``(weight_sum, lr_max)``: pass them to the next
    call.  :math:`x` (for evaluation) is ``param + (1 - 1/beta1) * (z - param)``."""
    weight_sum, lr_max = _step(
        _defs.ADAMWSCHEDULEFREE,
        param,
        grad,
        {"z": z, "exp_avg_sq": exp_avg_sq},
        step,
        dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        {"weight_sum": weight_sum, "lr_max": lr_max},
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )
    return float(weight_sum), float(lr_max)


@_hints(_defs.SGDSCHEDULEFREE)
def sgdschedulefree_(
    param: np.ndarray,
    grad: np.ndarray,
    z: np.ndarray,
    *,
    step: int,
    weight_sum: float,
    lr_max: float,
    lr: Value = 1.0,
    momentum: Value = 0.9,
    weight_decay: Value = 0,
    warmup_steps: float = 0,
    r: Value = 0.0,
    weight_lr_power: Value = 2.0,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> tuple[float, float]:
    """One in-place Schedule-Free SGD update of :math:`y` (``param``) and ``z``
    (see :class:`fastoptim.SGDScheduleFree`).

    Start ``z`` as a copy of the parameter, ``weight_sum`` and ``lr_max`` at ``0.0``; returns the
    updated ``(weight_sum, lr_max)``: pass them to the next call."""
    weight_sum, lr_max = _step(
        _defs.SGDSCHEDULEFREE,
        param,
        grad,
        {"z": z},
        step,
        dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        {"weight_sum": weight_sum, "lr_max": lr_max},
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )
    return float(weight_sum), float(lr_max)


@_hints(_defs.SPARSEADAM)
def sparseadam_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: Value = 0.001,
    betas: tuple[Value, Value] = (0.9, 0.999),
    eps: Value = 1e-08,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place SparseAdam update of every element (see
    :class:`fastoptim.SparseAdam`), the gradient being dense: torch's SparseAdam with every
    element present.  For rows, :func:`fastoptim.functional.sparse_rows_`."""
    _step(
        _defs.SPARSEADAM,
        param,
        grad,
        {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
        step,
        dict(
            lr=lr,
            betas=betas,
            eps=eps,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.LAMB)
def lamb_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: Value = 0.001,
    betas: tuple[Value, Value] = (0.9, 0.999),
    eps: Value = 1e-06,
    weight_decay: Value = 0,
    bias_correction: bool = True,
    max_weight_norm: float | None = 10.0,
    max_trust_ratio: float | None = None,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place LAMB update of one tensor (see :class:`fastoptim.LAMB`): the
    trust ratio from ``param``'s own norms."""
    _step(
        _defs.LAMB,
        param,
        grad,
        {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
        step,
        dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_weight_norm=max_weight_norm,
            max_trust_ratio=max_trust_ratio,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.LARS)
def lars_(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    *,
    step: int,
    lr: Value = 0.001,
    momentum: Value = 0.9,
    dampening: Value = 0,
    weight_decay: Value = 0,
    trust_coefficient: Value = 0.001,
    nesterov: bool = False,
    exclude_1d: bool = True,
    maximize: bool = False,
    state_dtype: StateDType = None,
    rounding: Rounding = "nearest",
    seed: int = 0,
    max_grad_value: float | None = None,
    ema_decay: float | None = None,
    grad_scale: float = 1.0,
    tensor: int = 0,
    master: np.ndarray | None = None,
    compensation: np.ndarray | None = None,
    copy_out: np.ndarray | None = None,
    ema: np.ndarray | None = None,
) -> None:
    """One in-place LARS update of one tensor (see :class:`fastoptim.LARS`): the
    trust ratio from ``param``'s own norms (``exclude_1d`` reads ``param.ndim``).
    ``momentum_buffer`` is needed iff ``momentum > 0``."""
    _step(
        _defs.LARS,
        param,
        grad,
        {"momentum_buffer": momentum_buffer},
        step,
        dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            nesterov=nesterov,
            exclude_1d=exclude_1d,
            maximize=maximize,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            max_grad_value=max_grad_value,
            ema_decay=ema_decay,
            grad_scale=grad_scale,
            tensor=tensor,
        ),
        None,
        dict(master=master, compensation=compensation, copy_out=copy_out, ema=ema),
    )


@_hints(_defs.MUON)
def muon_(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray,
    *,
    step: int,
    lr: Value = 0.001,
    weight_decay: Value = 0.1,
    momentum: Value = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
    eps: Value = 1e-07,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    ns_dtype: Literal["bfloat16", "float32", "float64"] = "bfloat16",
) -> None:
    """One in-place Muon update of the 2-D `param` (see :class:`fastoptim.Muon`).
    ``momentum_buffer`` starts at zero; ``step`` is not used by the update (kept for the
    signature every functional update has)."""
    _step(
        _defs.MUON,
        param,
        grad,
        {"momentum_buffer": momentum_buffer},
        step,
        dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
        ),
        None,
        dict(),
    )


@_hints(_defs.ADAFACTOR)
def adafactor_(
    param: np.ndarray,
    grad: np.ndarray,
    row_var: np.ndarray | None = None,
    col_var: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    *,
    step: int,
    lr: Value = 0.01,
    beta2_decay: Value = -0.8,
    eps: tuple[float | None, float] = (None, 0.001),
    d: Value = 1.0,
    weight_decay: Value = 0.0,
    maximize: bool = False,
) -> None:
    r"""One in-place Adafactor update of `param` (see
    :class:`fastoptim.Adafactor`): a parameter of two or more dimensions takes ``row_var``
    (shape ``param.shape[:-1] + (1,)``) and ``col_var`` (``param.shape[:-2] + (1,
    param.shape[-1])``), a 0-D or 1-D one ``variance`` (its shape); the others are None.  All
    start at zero; ``step`` is the 1-based update number (it sets :math:`\hat\beta_{2t}` and
    :math:`\rho_t`)."""
    _step(
        _defs.ADAFACTOR,
        param,
        grad,
        {"row_var": row_var, "col_var": col_var, "variance": variance},
        step,
        dict(
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            maximize=maximize,
        ),
        None,
        dict(),
    )
