"""Sparse row updates, shared by every tier: a gradient given as row indices and rows.

A parameter of shape ``(n, *row)`` receives a gradient for some of its rows only:
``indices`` (``k`` integers in ``[0, n)``) and ``rows`` (shape ``(k, *row)``), as an embedding
table's gradient is (``torch.nn.Embedding(sparse=True)``).  The update is the optimizer's
element-wise update of the rows present, run by the compiled row kernel
(``_core.rows_<kernel>``, in parallel across rows); the other rows of the parameter and of its
state are not read or written.  The optimizers that have one are torch's convention's SGD,
Adagrad and SparseAdam (not :mod:`fastoptim.keras`'s SGD and Adagrad).  Exact semantics, as
``torch.optim`` with a sparse COO gradient:

- duplicate indices are summed first (torch coalesces; the order of that sum is
  NumPy's ``add.reduceat``, torch's is its own: with duplicates, equal to rounding);
- the step count advances whether a row is present or not: bias corrections and decays use the
  optimizer's step (SparseAdam: ``1 - beta^t`` with the global ``t``);
- for :class:`~fastoptim.SGD` (``momentum = 0``) and :class:`~fastoptim.Adagrad` the result
  equals the dense update with zero gradient rows; :class:`~fastoptim.SparseAdam` is *lazy*:
  an absent row's moments do not decay.

Refused, as torch refuses it: ``weight_decay`` (SGD, Adagrad); SGD with ``momentum`` (torch
decays every row of its buffer, which is a dense step).  Also refused: the precision and
gradient-transform options (master weights, Kahan, EMA, clipping, skipping) and, in the NumPy
tier, a copy-out array (``set_copy_out``) of a parameter that gets rows (its copy would keep
the old rows).  Row updates take float32 / float64 parameters with state of the same dtype,
and bfloat16 / float16 ones with float32 state (the default policy): their rows computed in
float32 as the dense kernels compute (gradient rows widened, duplicates summed in float32; the
parameter's rows widened, updated, rounded back to nearest), ``rounding="stochastic"`` refused.
Every entry is validated (indices' dtype and range, rows' dtype and shape, the group's options)
before any array is written, and every parameter's rows of one step run in one compiled call
(``_core.rows_<kernel>(jobs)``, through :func:`fastoptim.engine.optimizer.run_rows`), which
checks all of them (and that no two arrays share memory) before it writes any: an error or an
interrupt never leaves a step half-applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import _core
from . import precision, transforms
from .definition import Definition

# Options of COMMON that a row update cannot apply, with the value that means "off".
_OFF: tuple[tuple[str, Any], ...] = (
    (precision.MASTER_WEIGHTS, False),
    (precision.KAHAN, False),
    (precision.EMA_DECAY, None),
    (transforms.MAX_GRAD_NORM, None),
    (transforms.MAX_GRAD_VALUE, None),
    (transforms.SKIP_NONFINITE, False),
)


def check_group(defn: Definition, where: str, group: Mapping[str, Any]) -> None:
    """Raise if the (validated) values of `group` cannot take row gradients: the optimizer has
    no row update (TypeError), or torch refuses these options with a sparse gradient, or an
    option of the precision policy / gradient transforms is on (ValueError)."""
    if defn.rows is None:
        raise TypeError(
            f"{where}: {defn.name} has no sparse row updates (they are torch.optim's sparse "
            "updates: only the torch-convention SGD, Adagrad and SparseAdam of fastoptim and "
            "fastoptim.torch have them, not fastoptim.keras's classes)"
        )
    problem = defn.rows(group)
    if problem:
        raise ValueError(f"{where}: {defn.name} with sparse gradients: {problem}")
    on = [k for k, off in _OFF if group.get(k, off) != off]
    if on:
        raise ValueError(
            f"{where}: row updates do not apply {', '.join(on)}; use dense gradients for that"
        )


def check_param(where: str, param_dtype: str, state_dtypes: Sequence[str], rounding: Any) -> None:
    """TypeError unless a row update takes a parameter of `param_dtype` (a dtype's name) with
    state of `state_dtypes`: float32 / float64 with state of the same dtype, bfloat16 /
    float16 with float32 state rounded to nearest."""
    if param_dtype in precision.LOW:
        if all(d == "float32" for d in state_dtypes) and rounding in (None, "nearest"):
            return
    elif param_dtype in ("float32", "float64") and all(d == param_dtype for d in state_dtypes):
        return
    raise TypeError(
        f"{where}: row updates take float32/float64 parameters with state of the same dtype, "
        f"and bfloat16/float16 ones with float32 state rounded to nearest (parameter "
        f"{param_dtype}, state {', '.join(state_dtypes) or 'none'}, rounding {rounding!r})"
    )


def check_arrays(where: str, param: np.ndarray, states: Sequence[Any], rounding: Any) -> None:
    """:func:`check_param` for a parameter array and its state arrays (quantized state: a
    pair), without building dtype names where the parameter and every state are float32, or
    every one float64 (they cost microseconds, a row update a few tens)."""
    if param.dtype in _PLAIN and all(getattr(s, "dtype", None) == param.dtype for s in states):
        return
    kinds = [s.dtype.name if isinstance(s, np.ndarray) else "quantized" for s in states]
    check_param(where, param.dtype.name, kinds, rounding)


_PLAIN = (np.dtype(np.float32), np.dtype(np.float64))


def widened(jobs: Sequence[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], Any]:
    """Row jobs ``(hyper, step, param, index, rows, states, label)`` as the compiled row
    kernel takes them: those of a bfloat16/float16 parameter (float32 state, float32 rows:
    :func:`coalesce`) on float32 copies of its rows and of its state's rows, and what writes
    them back (``scatter()``: the parameter's rows rounded to nearest, the state's copied;
    nothing in it can fail).  The others as they are."""
    out: list[tuple[Any, ...]] = []
    back: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[Any], list[np.ndarray]]] = []
    for job in jobs:
        hyper, step, param, index, rows, states, label = job
        if not isinstance(param, np.ndarray) or not precision.is_low(param.dtype):
            out.append(job)
            continue
        _check_widened(param, states, label, hyper.state_names())
        p32 = param[index].astype(np.float32)
        s32 = [s[index] for s in states]  # (copies: advanced indexing)
        rows32 = np.ascontiguousarray(rows, dtype=np.float32)
        out.append((hyper, step, p32, np.arange(len(index)), rows32, s32, label))
        back.append((param, index, p32, states, s32))

    def scatter() -> None:
        for param, index, p32, states, s32 in back:
            param[index] = p32  # (float32 to bfloat16/float16: to nearest, ties to even)
            for s, c in zip(states, s32):
                s[index] = c

    return out, scatter


def _check_widened(param: np.ndarray, states: Sequence[Any], label: str, names: Any) -> None:
    """What the row kernel checks of a parameter and its state (dtypes, shapes, layout,
    read-only, shared memory), for a bfloat16/float16 one whose float32 copies it is given
    instead (:func:`widened`): before any copy, so that writing them back cannot fail.  A
    step plan of the arrays checks them, in the kernel's words; it also takes 16-bit state,
    which a row update does not."""
    what = f"param {label}" if label else "param"
    for a, name in zip(states, names):
        if isinstance(a, np.ndarray) and a.dtype != np.float32:
            raise TypeError(
                f"state {name!r} of {what}: dtype {a.dtype}; a {param.dtype} parameter's row "
                "updates keep float32 state"
            )
    _core.Plan([param], [label], list(names), [[a] for a in states])


def coalesce(
    where: str, param: np.ndarray, indices: Any, rows: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Check one row gradient of `param` and return it coalesced: int64 indices strictly
    increasing, rows of duplicate indices summed (np.add.reduceat), as C-contiguous arrays
    the row kernel takes.  Raises TypeError / ValueError / IndexError naming `where`."""
    if not isinstance(param, np.ndarray) or param.ndim < 1:
        raise ValueError(f"{where}: row updates need a parameter with at least one dimension")
    idx = np.asarray(indices)
    if idx.size == 0 and not isinstance(indices, np.ndarray):  # ([]: NumPy makes it float64)
        idx = idx.astype(np.int64)
    if idx.dtype == np.bool_ or idx.dtype.kind not in "iu":
        raise TypeError(f"{where}: indices must be integers, got dtype {idx.dtype}")
    if idx.ndim != 1:
        raise ValueError(f"{where}: indices must be 1-D, got shape {idx.shape}")
    if not isinstance(rows, np.ndarray):
        raise TypeError(f"{where}: rows must be a numpy.ndarray, got {type(rows).__name__}")
    if rows.dtype != param.dtype:
        raise TypeError(
            f"{where}: rows have dtype {rows.dtype}, the parameter {param.dtype} (rows are "
            "never converted)"
        )
    want = (len(idx), *param.shape[1:])
    if rows.shape != want:
        raise ValueError(
            f"{where}: rows have shape {rows.shape}; for {len(idx)} indices of a parameter of "
            f"shape {param.shape} they must have shape {want}"
        )
    n = param.shape[0]
    if len(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{where}: index {bad} is out of range for {n} rows")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if precision.is_low(param.dtype):  # (computed in float32: summed in float32 too)
        rows = rows.astype(np.float32)
    if len(idx) < 2 or bool(np.all(idx[1:] > idx[:-1])):
        return idx, np.ascontiguousarray(rows)
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_idx[1:] != sorted_idx[:-1])))
    summed = np.add.reduceat(rows[order], starts, axis=0)
    return np.ascontiguousarray(sorted_idx[starts]), np.ascontiguousarray(summed)


def entries(where: str, grads: Any, keys: Sequence[Any], named: bool) -> list[Any]:
    """The per-parameter entries of `grads` (a list in parameter order, or a dict keyed by
    parameter name when the parameters are named), each ``(indices, rows)`` or None."""
    if isinstance(grads, Mapping):
        if not named:
            raise TypeError(
                f"{where}: a dict of row gradients needs named parameters; pass a list in "
                "parameter order"
            )
        names = [str(k) for k in keys]
        extra = [k for k in grads if k not in set(names)]
        if extra:
            raise ValueError(f"{where}: unknown parameter name(s) {extra}")
        return [grads.get(k) for k in names]
    if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence):
        raise TypeError(
            f"{where}: row gradients must be a list (parameter order) or a dict (parameter "
            f"names) of (indices, rows) pairs, got {type(grads).__name__}"
        )
    if len(grads) != len(keys):
        raise ValueError(f"{where}: expected {len(keys)} entries, got {len(grads)}")
    return list(grads)


def pair(where: str, entry: Any) -> tuple[Any, Any] | None:
    """An entry: None (no rows), or a pair ``(indices, rows)``."""
    if entry is None:
        return None
    if isinstance(entry, np.ndarray) or not isinstance(entry, Sequence) or len(entry) != 2:
        raise TypeError(f"{where}: expected a pair (indices, rows) or None, got {entry!r:.80}")
    return entry[0], entry[1]
