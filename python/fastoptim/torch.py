r"""PyTorch drop-in: ``torch.optim``-compatible optimizers for CPU training, running fastoptim's
compiled kernels on the tensors' memory (zero-copy NumPy views), one compiled call per parameter
group and step.

    >>> import torch
    >>> import fastoptim.torch as fot
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = fot.AdamW(model.parameters(), lr=1e-3)          # instead of torch.optim.AdamW
    >>> model(torch.randn(8, 4)).square().mean().backward()
    >>> opt.step(); opt.zero_grad()

Each class subclasses :class:`torch.optim.Optimizer` with the signature and defaults of the
``torch.optim`` class of the same name, so ``param_groups``, ``add_param_group``,
``zero_grad(set_to_none=...)``, hooks, LR schedulers and ``state_dict`` / ``load_state_dict``
work as with torch.  The state is kept in torch's own format (names, dtypes, shapes, a 0-d
float ``step`` tensor per parameter, NAdam's ``mu_product``, SGD's lazily created
``momentum_buffer``), so checkpoints move between ``torch.optim.X`` and ``fastoptim.torch.X``
in both directions and the trajectories continue identically (to rounding).

What is supported, and what is refused (never a silently lost update):

- Parameters: CPU tensors of dtype float32, float64, bfloat16 or float16 (complex64 and
  complex128: below) whose elements are *dense and non-overlapping* (contiguous, or a
  permutation of contiguous such as a transposed
  weight or a channels-last tensor: the update is elementwise, so it runs over the tensor's
  memory in memory order).  bfloat16/float16 parameters compute in float32 and keep float32
  state by default (the precision options ``state_dtype``, ``master_weights``, ``kahan``,
  ``rounding``: see :mod:`fastoptim.engine.precision` and the README's "Reduced precision").
  complex64/complex128 parameters are updated as torch.optim updates them: as their real views
  (``torch.view_as_real``, real and imaginary parts independent elements), with complex state
  whose real view the kernels update (new state filled as torch fills it, ``complex(v, v)``);
  every optimizer takes them but :class:`Muon`, :class:`Adafactor` and :class:`SparseAdam`
  (which torch's refuse too), with their gradients of their dtype (dense), without a
  ``state_dtype`` that would keep their state in 16 bits or quantized, nor a copy-out.
  Anything else (complex32/integer, CUDA or other devices, sparse tensors, views with gaps or
  overlapping elements, negative or conjugate views, the same tensor twice) raises
  ``TypeError`` / ``ValueError`` naming the parameter, when the optimizer is built or, for a
  parameter whose storage was changed later, at the step.
- Each step bumps the autograd version counter of every parameter it updates, as torch's
  in-place operations do: a graph that saved a parameter before the step raises "modified by
  an inplace operation" in ``backward()``.  (Not the state tensors': no graph saves them, and
  a bump costs ~85 ns a tensor.)
- Gradients are read from ``p.grad`` at every step (it may be a new tensor each time);
  parameters whose ``grad`` is ``None`` are skipped, as in torch.  A gradient whose memory
  layout differs from its parameter's (e.g. a contiguous gradient for a transposed parameter)
  is copied into the parameter's layout for that step, and so is one that shares memory with
  another parameter's gradient (as autograd makes them for views of one buffer): gradients are
  only read, so nothing is lost.  A gradient must not share memory with a parameter or a state
  tensor (those are written).
  Sparse COO gradients (``torch.sparse_coo_tensor``, e.g. from ``nn.Embedding(sparse=True)``)
  are taken where ``torch.optim`` takes them (:class:`SGD`, :class:`Adagrad` and
  :class:`SparseAdam`, which takes nothing else): torch coalesces each, and the compiled row
  kernel updates the rows present (see :mod:`fastoptim.engine.sparse`); :class:`SGD` with
  ``momentum`` computes it densely (torch's sparse buffer decays every row; a torch
  checkpoint's sparse buffer is loaded dense) and :class:`LBFGS` gathers them densely, as
  torch's does.  Elsewhere they raise torch's ``RuntimeError``.
- State tensors are updated in place.  One that does not have its parameter's layout or dtype
  (e.g. loaded from a checkpoint of a differently laid out model) is replaced by a copy in the
  parameter's layout before the first step that uses it.
- A parameter whose storage changes (``p.data = new_tensor``) is noticed at the next step.
- ``step`` counts: each parameter has its own (as in torch); parameters of one group whose
  counts differ (e.g. some had no gradient for a while) are updated in separate compiled calls.
  The ``step`` tensors of a group are 0-d views into one small buffer, so that a step can
  advance all of them with one operation; they behave (and save, and load) like torch's.

Torch-only arguments, accepted where the ``torch.optim`` signature has them:

- ``foreach`` and ``fused``: recorded in ``param_groups`` like torch does and otherwise
  ignored: every step already is one fused multi-tensor call.  Both ``True`` raise torch's
  ``RuntimeError``.
- ``capturable=True`` (CUDA-graph capture) and ``differentiable=True`` (autograd through the
  step): ``ValueError``; fastoptim updates CPU tensors outside autograd.

Hyper-parameters are validated by :mod:`fastoptim.optimizers` (a superset of torch's checks)
when a group is added and whenever a group's values change (e.g. by a scheduler).  ``lr`` may be
a one-element tensor, as in torch.  :class:`Lion` (which ``torch.optim`` lacks) keeps
``exp_avg`` only, like the popular ``lion-pytorch`` package.

Schedules (:mod:`fastoptim.schedules`, or any callable ``t -> float``) work as with
:class:`fastoptim.Optimizer`: any float hyper-parameter (``lr``, ``weight_decay``, ``momentum``,
either of ``betas``, ``eps``...), in the constructor or in a group, may be one.

    >>> from fastoptim import schedules
    >>> opt = fot.AdamW(model.parameters(), lr=schedules.warmup_cosine(1e-3, 100, 10_000))
    >>> opt.param_groups[0]["lr"]       # the value the next step uses: f(step_count)
    0.0

- :attr:`Optimizer.step_count` counts completed :meth:`~Optimizer.step` calls; after ``k``
  of them every scheduled entry of ``param_groups`` holds ``f(k)`` (a float, so torch-style
  logging of ``param_groups[i]["lr"]`` works), and :meth:`Optimizer.schedules` returns the
  schedules.  Assigning a value to a scheduled entry replaces its schedule by that constant
  (a torch LR scheduler assigns values too: use one or the other for an entry); assigning a
  schedule sets a new one, evaluated at the current ``step_count``.
- A schedule's invalid value (a negative ``lr``, ``betas`` outside [0, 1)...), or an error
  raised by the schedule, raises at the step that would use it, naming the schedule, before
  any tensor is modified.
- ``state_dict()`` stays in torch's format, hyper-parameters as floats (the next step's
  values): a scheduled group also has a ``"schedules"`` entry (name -> the schedule's
  :meth:`~fastoptim.schedules.Schedule.describe` data; a plain function by its name only) and
  ``"schedule_step"``, which ``torch.optim.X.load_state_dict`` keeps and ignores (torch then
  continues with the saved values as constants), and from which ``load_state_dict`` resumes
  the schedules bit for bit.  A checkpoint without them (from ``torch.optim``) loads
  constants and sets ``step_count`` to its largest per-parameter ``step``.  A saved value
  that is not its schedule's value at that count was assigned, and stays a constant.
- :class:`fastoptim.schedules.ReduceLROnPlateau` (like torch's) assigns the reduced ``lr``: a
  scheduled ``lr`` becomes a constant (the NumPy optimizers scale the schedule instead).
- A scheduled group is revalidated at every step: a few microseconds.

Speed: a step costs the kernel (one pass over memory, all threads) plus, when nothing but the
gradient tensors changed since the last step (new ones every step, as autograd makes them after
``zero_grad()``, or the same ones), a few microseconds and a few tenths of a microsecond per
tensor: ``Plan.bind_torch`` reads every ``p.grad`` and checks parameters and gradients in C,
through DLPack's C exchange API (torch >= 2.10), and ``fastoptim._core.Snapshot`` tells
that no state object was replaced.  Anything else (the first steps, a group entry assigned,
state replaced, a parameter's new storage, a gradient laid out differently from its parameter,
DTensor parameters, older torch) takes the general path: everything checked in Python (some
tens of microseconds and 1-2 per tensor), what changed rebuilt.  torch's step hooks and
profiler event are kept; its wrapper that runs them is entered only when one is registered or
a profiler runs.

Threads: steps run on fastoptim's own thread pool (``fastoptim.set_num_threads``, separate from
``torch.set_num_threads``), not on an OpenMP runtime: the extension links none, so nothing is
shared with torch's (see :mod:`fastoptim._openmp`, which now does nothing, and the README's
"Threads").

Importing :mod:`fastoptim` never imports torch; only ``import fastoptim.torch`` does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import operator
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar, Union, cast, overload

import ml_dtypes
import numpy as np
import torch  # type: ignore[import-not-found, unused-ignore]  # mypy runs without torch in CI

from . import _core
from . import definitions as _defs
from . import schedules as _schedules
from .engine import precision, sparse, transforms
from .engine.definition import TORCH_ONLY, Definition, check_keywords
from .engine.locks import new_lock
from .engine.optimizer import _defaults, run_compiled, run_rows
from .engine.precision import Rounding, StateDType
from .engine.scheduled import Scheduled, same
from .engine.schedulefree import SWAP_KEY, Modes, swap_weight
from .host import TORCH_TENSORS as host_tensors
from .host import Objective as host_objective

__all__ = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Lion",
    "Rprop",
    "ASGD",
    "ADOPT",
    "LAMB",
    "LARS",
    "AdamWScheduleFree",
    "SGDScheduleFree",
    "SparseAdam",
    "Muon",
    "LBFGS",
    "Adafactor",
    "Optimizer",
    "ScheduleFreeOptimizer",
    "ClosureOptimizer",
]

Params = Iterable[Any]  # tensors, (name, tensor) pairs or group dicts, as torch.optim takes
# A float hyper-parameter: a number, a one-element tensor, or a schedule (any ``t -> float``).
TorchValue = Union[float, torch.Tensor, Callable[[int], float]]

# Arguments of torch.optim's signatures that fastoptim has no use for.
_TORCH_ONLY = tuple(TORCH_ONLY)
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_COMPLEX = (torch.complex64, torch.complex128)
_LOW = (torch.bfloat16, torch.float16)
_TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,  # quantized state's codes
}


def _name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for torch.bfloat16..."""
    return str(dtype).removeprefix("torch.")


class _Held:
    """A state tensor of a loaded state dict hidden from torch's loader, which would cast it to
    its parameter's dtype where fastoptim's precision policy keeps another: quantized codes and
    scales (as float32: a copy 4x the codes' size), any floating state of bfloat16/float16
    parameters (float32 state or master copy rounded: bits lost), bfloat16/float16 state of
    wider parameters (widened: twice the memory until the next step).  It stays the saved
    tensor, moved to the parameter's device only (aliased where it is there, as torch's loader
    aliases what it does not cast); the next step converts what the policy wants otherwise."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


#: The suffix of a quantized state's codes in a state_dict (in ``opt.state`` they keep the
#: state's own name): ``torch.optim``, which reads ``exp_avg`` as a moment, then finds none and
#: raises (KeyError at its step) instead of training on 8-bit codes cast to float.
CODES = "_codes"


#: The entry of a state_dict's parameter state with quantized states that records the
#: parameter's shape, an int64 tensor (4-bit codes are flat: their shape cannot tell a
#: transposed parameter's).
PARAM_SHAPE = "param_shape"


def _saved_entry(entry: Mapping[str, Any], p: torch.Tensor) -> dict[str, Any]:
    """A parameter's state as a state_dict holds it: each quantized state's codes (a state
    with scales ``name + "_absmax"``) under ``name + "_codes"``, and `p`'s shape
    (``"param_shape"``, a 1-D int64 tensor) where there are such."""
    out = {
        (k + CODES if k + precision.ABSMAX in entry and not k.endswith(precision.ABSMAX) else k): v
        for k, v in entry.items()
    }
    if any(isinstance(k, str) and k.endswith(precision.ABSMAX) for k in entry):
        out[PARAM_SHAPE] = torch.tensor(p.shape, dtype=torch.int64)
    return out


def _loaded_entry(entry: Mapping[str, Any], where: str, p: torch.Tensor) -> dict[str, Any]:
    """A parameter's state from a state_dict as ``opt.state`` holds it (for parameter `p`):
    ``name + "_codes"`` under ``name`` (where a state_dict of fastoptim 0.1 has them
    already), without ``"param_shape"``.  ValueError naming what is wrong where it has both
    names or another parameter's shape."""
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if k == PARAM_SHAPE:
            shape = v.tolist() if isinstance(v, torch.Tensor) and v.dim() == 1 else v
            if not (
                isinstance(shape, (list, tuple))
                and all(
                    isinstance(n, (int, float))
                    and not isinstance(n, bool)
                    and float(n).is_integer()
                    and n >= 0
                    for n in shape
                )
            ):
                raise ValueError(f"{where}: malformed {PARAM_SHAPE} {v!r}")
            if tuple(map(int, shape)) != tuple(p.shape):
                raise ValueError(
                    f"{where}: the state of a parameter of shape {tuple(map(int, shape))}, "
                    f"this one is {tuple(p.shape)}"
                )
            continue
        base = k.removesuffix(CODES) if isinstance(k, str) and k.endswith(CODES) else k
        if base != k and base in entry:
            raise ValueError(f"{where}: both {base!r} and {k!r} (one state's codes twice)")
        out[base] = v
    return out


def _adopt_codes(state: dict[str, Any], where: str, p: torch.Tensor) -> None:
    """Make `state`, parameter `p`'s entry of ``opt.state``, as a load makes it
    (:func:`_loaded_entry`), in place: a state_dict's entry put there without
    :meth:`Optimizer.load_state_dict` (``ZeroRedundancyOptimizer.load_state_dict`` writes its
    inner optimizer's state)."""
    if any(isinstance(k, str) and (k.endswith(CODES) or k == PARAM_SHAPE) for k in state):
        renamed = _loaded_entry(state, where, p)
        state.clear()
        state.update(renamed)


def _hold_states(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """load_state_dict's last pre-hook: the states torch's loader must not cast, held
    (:class:`_Held`); __setstate__ takes them out of their holders."""
    states, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(states, Mapping) or not isinstance(groups, Sequence):
        return None  # (torch's loader says what is wrong)
    try:
        saved = [k for g in groups for k in g["params"]]
    except (TypeError, KeyError):
        return None
    mine = [p for g in opt.param_groups for p in g["params"]]
    held = dict(states)
    for key, p in zip(saved, mine):
        entry = states.get(key)
        if not isinstance(entry, Mapping):
            continue
        entry = _loaded_entry(entry, f"{type(opt).__name__}.load_state_dict: param {key!r}", p)
        out = dict(entry)
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor) or name == "step":
                continue
            quantized = name.endswith(precision.ABSMAX) or name + precision.ABSMAX in entry
            floating = value.is_floating_point()
            low = p.dtype in _LOW or (value.dtype in _LOW and value.dtype != p.dtype)
            if quantized or (floating and low):
                out[name] = _Held(value)
        held[key] = out
    return {**state_dict, "state": held}


class _SparseGrad(RuntimeError):
    """A sparse COO gradient met by the dense path of an optimizer that takes them."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """The memory whose elements the kernels update: a DTensor's local shard (FSDP2's
    ``fully_shard`` parameters, their gradients and state: a plain tensor sharing the DTensor's
    memory, possibly empty; the update is element-wise), a complex tensor's real view
    (``torch.view_as_real``: torch.optim's rule, which updates a complex parameter as its real
    and imaginary parts; of a conjugate view, the memory: conj(t)), any other tensor itself."""
    local = getattr(t, "_local_tensor", None)
    t = t if local is None else local
    if not t.is_complex():
        return t
    return torch.view_as_real(t.conj() if t.is_conj() else t)


def _stored(dtype: torch.dtype, p: torch.Tensor) -> torch.dtype:
    """The dtype of a state tensor of `p` that the kernels see as `dtype`: its complex
    counterpart for a complex parameter (a complex state, as torch.optim's, whose real view is
    the kernels')."""
    return dtype.to_complex() if p.is_complex() else dtype


def _full_like(p: torch.Tensor, fill: float, dtype: torch.dtype) -> torch.Tensor:
    """A new state of `p` (of `dtype`, in `p`'s layout), every element `fill`: a complex
    state's real and imaginary parts both (torch.optim's ``complex(v, v)`` fills: every element
    of its real view)."""
    return torch.full_like(p, complex(fill, fill) if dtype.is_complex else fill, dtype=dtype)


def _as_kernels_see(p: torch.Tensor) -> tuple[str, tuple[int, ...], int]:
    """`p`'s dtype name, shape and size as the kernels see them (a complex parameter's real
    view: the real dtype, a last dimension of 2, twice the elements)."""
    if p.is_complex():
        return _name(p.dtype.to_real()), (*p.shape, 2), 2 * p.numel()
    return _name(p.dtype), tuple(p.shape), p.numel()


def _complex_problem(p: torch.Tensor, layout: Mapping[str, str], policy: Any) -> str | None:
    """Why the layout (state name -> dtype name) that the group's ``state_dtype`` `policy`
    gives cannot hold the state of complex parameter `p` (complex64/complex128 state, updated
    as its real view)."""
    if p.is_complex() and any(k not in ("float32", "float64") for k in layout.values()):
        return (
            f"is {_name(p.dtype)}: a complex parameter keeps complex state, not "
            f"state_dtype={policy!r} (drop it, or give it 'float32' or 'param' for this "
            "parameter's states)"
        )
    return None


def _follow(p: torch.Tensor, master: torch.Tensor, stochastic: bool) -> None:
    """Make the float32 `master` copy of bfloat16/float16 parameter `p` follow what was done to
    `p` outside the optimizer (clipped, re-initialised, loaded in place): the NumPy tier's
    rule, :func:`fastoptim.engine.precision.follow`, on views of their memory."""
    precision.follow(_numpy_of(p.detach()), _numpy_of(master.detach()), stochastic)


_VERSION = operator.attrgetter("_version")  # a tensor's autograd version


def _bump_written(c: _Cache) -> None:
    """After a step: the autograd versions of the parameters it wrote bumped (1 each), and
    counted for those with a master copy (:func:`_follow` before the next step)."""
    _bump(c.written)
    if c.mastered:
        c.msteps += 1
        c.mtotal += len(c.mastered)
        c.wrote_stochastic = c.stochastic


def _numpy_of(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor's memory (no copy); bfloat16 as ml_dtypes'."""
    t = _local(t)
    if t.dtype is torch.bfloat16:
        return _numpy(t.view(torch.int16)).view(_BF16)
    return _numpy(t)


_Opt = TypeVar("_Opt", bound="Optimizer")


def _scalar_dtype(exact: bool = False) -> torch.dtype:
    """The dtype torch.optim gives a new ``step`` tensor (its ``_get_scalar_dtype()``), or
    float64 where the count must stay `exact` beyond float32's 2^24 (:func:`_exact_count`)."""
    wide = exact or torch.get_default_dtype() == torch.float64
    return torch.float64 if wide else torch.float32


def _exact_count(name: str, hp: Mapping[str, Any]) -> bool:
    """Whether scalar state `name` of a group with `hp` is a step count kept in float64: with
    ``rounding="stochastic"`` the step number keys the random bits, and a float32 count (torch's
    under its default dtype) stops at 2^24 = 16,777,216 (x + 1 rounds back to x): every later
    step would draw the same bits (each element rounded the same way at every step: biased).
    Elsewhere torch's dtype, whose count stops there as torch.optim's does."""
    return name == "step" and hp.get(precision.ROUNDING) == "stochastic"


def _plain(value: Any) -> Any:
    """A hyper-parameter as fastoptim's validation expects it: one-element tensors (torch
    allows a tensor ``lr`` or ``betas``) become floats, lists become tuples."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyper-parameter must have one element, got {value}")
        return float(value.item())
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses ``[start, end)`` that tensor `t`'s elements lie within."""
    t = _local(t)
    start = int(t.data_ptr())
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _shared(tensors: Sequence[torch.Tensor]) -> set[int]:
    """The indices of the `tensors` to copy so that the others share no memory (of each set
    of overlapping ones, all but the first in address order); other than strided tensors are
    left to the checks that refuse them."""
    out: set[int] = set()
    end = None  # of the last one kept
    strided = (
        k
        for k, t in enumerate(tensors)
        if isinstance(t, torch.Tensor) and t.layout == torch.strided
    )
    for start, stop, k in sorted((*_span(tensors[k]), k) for k in strided):
        if start == stop:  # (no element)
            continue
        if end is not None and start < end:
            out.add(k)
        else:
            end = stop
    return out


def _permutation(t: torch.Tensor) -> tuple[int, ...] | None:
    """``None`` for a contiguous tensor; for a dense non-overlapping one, the permutation of
    its dimensions that makes it contiguous (its memory order); else ValueError."""
    t = _local(t)
    if t.is_contiguous():
        return None
    stride = t.stride()
    perm = tuple(sorted(range(t.dim()), key=lambda d: -stride[d]))
    if t.permute(perm).is_contiguous():
        return perm
    raise ValueError(
        f"is not dense (shape {tuple(t.shape)}, strides {stride}: its elements have gaps or "
        "overlap); fastoptim.torch updates tensors whose elements fill their memory exactly "
        "once (contiguous, transposed, channels-last...); use a contiguous parameter"
    )


def _memory_order(t: torch.Tensor, perm: tuple[int, ...] | None) -> torch.Tensor:
    """`t`'s memory (see :func:`_local`) permuted to memory order; ValueError for a conjugate
    view, whose memory does not hold its values."""
    if t.is_conj():
        raise ValueError("a conjugate view: resolve_conj() first")
    t = _local(t)
    return t if perm is None else t.permute(perm)


def _in_layout(t: torch.Tensor, perm: tuple[int, ...] | None) -> bool:
    return bool(_memory_order(t, perm).is_contiguous())


def _view(t: torch.Tensor, perm: tuple[int, ...] | None) -> np.ndarray:
    """A C-contiguous NumPy view of `t`'s memory (no copy)."""
    return _numpy_of(_memory_order(t.detach(), perm))


def _new_quantized(
    p: torch.Tensor, name: str, fill: float, kind: str = precision.INT8
) -> dict[str, torch.Tensor]:
    """A new quantized state `name` of `p`, every element `fill`: its codes (8-bit: in `p`'s
    memory layout; 4-bit: packed in `p`'s memory order, 1-D) and absmax tensors."""
    four = kind == precision.INT4
    code, absmax = precision.quantized_fill(fill, name, kind)
    nblocks = -(-p.numel() // (precision.QUANT_BLOCK4 if four else precision.QUANT_BLOCK))
    codes = (
        torch.empty(((p.numel() + 1) // 2,), dtype=torch.uint8)
        if four
        else torch.empty_like(p, dtype=torch.uint8)
    )
    precision.fill_codes(codes, code, kind, p.numel())
    return {
        name: codes,
        name + precision.ABSMAX: torch.full((nblocks,), absmax, dtype=torch.float32),
    }


def _quantized_like(
    p: torch.Tensor, values: torch.Tensor, name: str, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and absmax of `values` (a float tensor of `p`'s shape, any layout) as quantized
    state `name` of `p` stored as `kind`, in blocks of `p`'s memory order, as the kernels read
    them (8-bit codes laid out like `p`; 4-bit ones packed in its memory order, 1-D)."""
    perm = _permutation(p)
    flat = _memory_order(values.detach(), perm).to(torch.float32).cpu().contiguous().numpy()
    codes, absmax = precision.quantize(flat, name, kind)
    if kind == precision.INT4:
        return torch.from_numpy(codes), torch.from_numpy(absmax)
    out = torch.empty_like(p, dtype=torch.uint8)
    _memory_order(out, perm).copy_(torch.from_numpy(codes))
    return out, torch.from_numpy(absmax)


def _dequantized(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    name: str,
    kind: str = precision.INT8,
    shape: tuple[int, ...] = (),
    order: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The float32 values of quantized state `name` held as `codes` and `absmax`: 8-bit codes
    shaped like their parameter, in blocks that run in the memory order `order` (its
    dimensions, outermost first), or where None (a checkpoint that records none) in the codes'
    own (any dense layout); 4-bit packed codes of a parameter of `shape`, running in the memory
    order `order` (None: row-major)."""
    if kind == precision.INT4:
        perm = order
        mem = codes.detach().cpu().contiguous()
        mshape = shape if perm is None else tuple(shape[d] for d in perm)
    else:
        perm = _permutation(codes) if order is None else order
        mem = _memory_order(codes.detach(), perm).cpu().contiguous()
        mshape = tuple(mem.shape)
    out = np.empty(mshape, np.float32)
    _core.dequantize_blockwise(
        mem.numpy(), absmax.detach().cpu().numpy(), out, precision.qmap(name, kind)
    )
    values = torch.from_numpy(out)
    return values if perm is None else values.permute(tuple(np.argsort(perm).tolist()))


def _record_order(
    state: dict[str, Any], name: str, kind: str, perm: tuple[int, ...] | None
) -> None:
    """Record the memory order `perm` in which the blocks of quantized state `name` run: absent
    where row-major.  4-bit codes, 1-D, do not show it; 8-bit codes have their parameter's
    strides, which a copy need not keep (``.contiguous()``, a NumPy or safetensors round
    trip): their values then still read the same."""
    if perm is not None:
        state[name + precision.ORDER] = perm
    else:
        state.pop(name + precision.ORDER, None)


#: The states torch.optim keeps as sparse COO tensors after sparse gradients, per optimizer.
_SPARSE_IN_TORCH = {"SGD": ("momentum_buffer",)}


def _sparse_state(state: Mapping[str, Any]) -> str | None:
    """What is wrong with a parameter's state holding a tensor that is not dense (no step
    can use it: its data pointer cannot even be read), or None."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.layout != torch.strided:
            return (
                f"its state's {k!r} is a {v.layout} tensor; state tensors are dense (torch.strided)"
            )
    return None


def _step_problem(step: Any) -> str | None:
    """What is wrong with `step` as a loaded parameter's step count, or None: a number (a
    one-element tensor) that is a whole number from 0 to 2**53."""
    value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and 0 <= value <= 2**53 and value == int(value):
            return None
    return f"{step!r}, expected a whole number from 0 to 2**53"


def _order_problem(ndim: int, order: Any) -> str | None:
    """What is wrong with `order` as the memory order of a 4-bit state of a parameter of `ndim`
    dimensions, or None."""
    if (
        isinstance(order, (tuple, list))
        and all(isinstance(d, int) and not isinstance(d, bool) for d in order)
        and sorted(order) == list(range(ndim))
    ):
        return None
    return f"{order!r}, expected a permutation of the parameter's {ndim} dimensions"


def _recorded_order(
    entry: Mapping[str, Any], name: str, ndim: int, what: str
) -> tuple[int, ...] | None:
    """The memory order in which the blocks of quantized state `name` run, as `entry` records
    it (``name + "_order"``), or None where it records none; ValueError ``"<what>: <problem>"``
    where it is not a permutation of a parameter's `ndim` dimensions."""
    order = entry.get(name + precision.ORDER)
    if order is None:
        return None
    problem = _order_problem(ndim, order)
    if problem is not None:
        raise ValueError(f"{what}: {problem}")
    return tuple(order)


def _quantized_problem(p: torch.Tensor, codes: Any, scales: Any) -> tuple[str, str] | None:
    """What is wrong with quantized state (`codes`, `scales`) of `p`, as (which array: the
    codes' or the scales' suffix, the problem), or None."""
    n = p.numel()
    packed = ((n + 1) // 2,)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        return "", f"codes of {got}, expected uint8"
    if codes.shape == p.shape:
        block = precision.QUANT_BLOCK
    elif codes.shape == packed:
        block = precision.QUANT_BLOCK4
    else:
        return "", (
            f"uint8 {tuple(codes.shape)}, expected the parameter's shape {tuple(p.shape)} "
            f"(8-bit codes) or {packed[0]} bytes (4-bit codes)"
        )
    nblocks = -(-n // block)
    if (
        not isinstance(scales, torch.Tensor)
        or scales.dtype != torch.float32
        or scales.shape != (nblocks,)
    ):
        got = (
            f"{scales.dtype} {tuple(scales.shape)}"
            if isinstance(scales, torch.Tensor)
            else type(scales).__name__
        )
        return precision.ABSMAX, (
            f"{got}, expected float32 ({nblocks},) (one absmax per block of {block} elements)"
        )
    problem = precision.absmax_problem(scales.detach().cpu().numpy())
    return (precision.ABSMAX, problem) if problem else None


def _quantized_other_way(state: Mapping[str, Any], p: torch.Tensor, name: str, kind: str) -> bool:
    """Whether `state` holds state `name` of `p` as codes of the quantized kind that is not
    `kind` (8-bit codes shaped like `p`, 4-bit ones packed 1-D), with their scales."""
    codes = state.get(name)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        return False
    if name + precision.ABSMAX not in state or codes.shape == ((p.numel() + 1) // 2,) == p.shape:
        return False
    other = ((p.numel() + 1) // 2,) if kind == precision.INT8 else p.shape
    return codes.shape == other


def _dequantize_state(state: dict[str, Any], p: torch.Tensor, name: str, where: str) -> None:
    """Quantized state `name` of `p` in `state` (codes and absmax; 8- or 4-bit, as the codes'
    shape says) replaced by its float32 values, shaped like `p`: for a group whose
    ``state_dtype`` now keeps it as a float, or quantized the other way, which takes the state
    from those values.  ValueError ``"<where>: state ..."`` where the codes or scales are not
    a quantized state of `p`."""
    codes, scales = state[name], state.get(name + precision.ABSMAX)
    problem = _quantized_problem(p, codes, scales)
    if problem is not None:
        raise ValueError(f"{where}: state {name + problem[0]!r}: {problem[1]}")
    assert isinstance(scales, torch.Tensor)  # (checked above)
    kind = precision.INT8 if codes.shape == p.shape else precision.INT4
    order = _recorded_order(state, name, p.dim(), f"{where}: state {name + precision.ORDER!r}")
    values = _dequantized(codes, scales, name, kind, tuple(p.shape), order)
    state[name] = values.to(p.device)
    del state[name + precision.ABSMAX]
    state.pop(name + precision.ORDER, None)


_numpy = torch.Tensor.numpy
_BF16 = np.dtype(ml_dtypes.bfloat16)


_data_ptr = torch.Tensor.data_ptr  # (a DTensor's is 0: its local shard's, see _local_ptr)
_stride = torch.Tensor.stride
_is_neg = torch.Tensor.is_neg
_to_dlpack = torch._C._to_dlpack  # a gradient as a DLPack capsule: what Plan.bind_grads reads
_profiling = torch._C._autograd._profiler_enabled


def _same(t: Any) -> Any:
    return t


def _local_ptr(t: torch.Tensor) -> int:
    return int(_local(t).data_ptr())


def _local_stride(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(_local(t).stride())


_optimizer_module = importlib.import_module("torch.optim.optimizer")  # (its global hooks)
_increment_version = torch.autograd.graph.increment_version


def _bump_each(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        _increment_version(t)


def _bump_all(tensors: Sequence[torch.Tensor]) -> None:
    _increment_version(tensors)


def _version_bumper() -> Callable[[Sequence[torch.Tensor]], None]:
    """What bumps the autograd version counters of tensors a step wrote in place (as torch's
    in-place operations do, so that autograd refuses a graph that saved their old values): one
    call for them all where torch takes a list (newer torch), else one per tensor."""
    try:
        _increment_version([torch.zeros(1)])
    except TypeError:
        return _bump_each
    return _bump_all


_bump = _version_bumper()


def _exchange_api() -> bool:
    """Give the compiled plans DLPack's C exchange API, through which ``Plan.bind_torch``
    reads a step's tensors (torch >= 2.10); False where torch has none that fits."""
    api = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)
    if api is None:
        return False
    try:
        return bool(_core.set_torch_api(api, torch.Tensor, torch.nn.Parameter))
    except TypeError:  # not a capsule
        return False


# Whether steps take the fast path (Plan.bind_torch) when nothing changed since the last step;
# without it every step takes the general path (tests set it False to run that path).
_FAST = _exchange_api()

_F = TypeVar("_F", bound=Callable[..., Any])


_is_compiling = torch.compiler.is_compiling


def _dcp_initialising() -> bool:
    """Whether the step being called is ``torch.distributed.checkpoint``'s state
    initialisation (``_init_optim_state``, run by ``get_optimizer_state_dict``,
    ``get_state_dict`` and ``set_state_dict`` on an optimizer without state): it sets every
    group's ``lr`` to 0, steps with zero gradients to create the state, and puts the ``lr``
    objects back."""
    frame: Any = sys._getframe(2)  # (the caller of the wrapper `run`, and two more)
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and str(
            frame.f_globals.get("__name__", "")
        ).startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


def _hooked(step: _F) -> _F:
    """`step` as ``torch.optim.Optimizer`` wraps every optimizer's ``step``
    (``profile_hook_step``: the step pre- and post-hooks, global and per optimizer, and a
    profiler ``record_function``), without that wrapper's cost (microseconds) when no hook is
    registered and no profiler runs.  Marked ``hooked``: torch does not wrap it again."""
    wrapped = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.state and self._scheduled and _dcp_initialising():
            with self._schedules_kept():
                return dispatch(self, *args, **kwargs)
        return dispatch(self, *args, **kwargs)

    def dispatch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_compiling():  # (torch.compile tracing this call: True there only)
            return uncompiled(self, *args, **kwargs)
        if (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _optimizer_module._global_optimizer_pre_hooks
            or _optimizer_module._global_optimizer_post_hooks
            or _profiling()
        ):
            return wrapped(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    # Under torch.compile the step runs as it is (its kernel is compiled already): dynamo
    # calls it without tracing the Python around the kernel (which gave graph breaks with
    # warnings at every Tensor.item(), and seconds of compilation).  (A step wrapped whole by
    # torch.compiler.disable would cost every eager call 0.3 us; is_compiling() 0.1.)
    uncompiled = torch.compiler.disable(run)  # type: ignore[no-untyped-call, unused-ignore]
    run.hooked = True  # type: ignore[attr-defined]
    return cast(_F, run)


_ALL: list[list[int] | None] = [None]  # one bucket: all the parameters of a group
# The options (besides the kernel's state names) that decide a group's state buffers and plan
# (Optimizer._build): a change rebuilds them.
_STRUCTURE = (
    precision.STATE_DTYPE,
    precision.MASTER_WEIGHTS,
    precision.KAHAN,
    precision.ROUNDING,
    precision.SEED,
    precision.EMA_DECAY,
)
_VALUES = (int, float, str, bool, type(None))  # immutable values of a parameter group


def _group_snapshot(group: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a step compares a parameter group with (``==``, in C) to tell that no entry changed
    since: its entries, lists copied (an in-place edit of ``betas`` counts); None where an
    entry could change without that comparison noticing (a tensor ``lr`` that a scheduler fills
    in place, any other mutable value): such a group is checked entry by entry at every step."""
    snap: dict[str, Any] = {}
    for k, v in group.items():
        if k == "params":
            snap[k] = v  # (the tensors are checked by Plan.bind_torch)
        elif isinstance(v, _VALUES):
            snap[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, _VALUES) for x in v):
            snap[k] = list(v) if isinstance(v, list) else v
        else:
            return None
    return snap


def _as_default_dtype(value: float) -> float:
    """A Python float as ``torch.as_tensor(value)`` holds it: in torch's default dtype.  torch
    computes ASGD's next ``eta`` and ``mu`` that way and copies them into the state, whatever
    the state's dtype (float64 after a ``load_state_dict`` into float64 parameters)."""
    dtype = torch.get_default_dtype()
    if dtype == torch.float64:
        return value
    if dtype == torch.float32:
        return float(np.float32(value))
    return float(torch.tensor(value, dtype=dtype))


class _RowJob(NamedTuple):
    """One parameter's sparse row update (:meth:`Optimizer._row_job`), as the compiled row
    kernel takes it (with its count): rows ``indices`` of ``param`` and of ``states`` (NumPy views
    of the tensors, one row per index) updated with the gradient ``rows``.  (``indices``: a
    field cannot be named ``index``, tuple's method.)"""

    hyper: Any  # the group's compiled hyper-parameters
    state: dict[str, Any]  # the parameter's torch state (its step counted after the update)
    param: np.ndarray
    indices: np.ndarray
    rows: np.ndarray
    states: list[np.ndarray]
    label: str


class _Cache:
    """What a parameter group's step reuses while nothing changed: the validated
    hyper-parameters and compiled struct; for the parameters that have gradients, their NumPy
    views, their packed scalars (``step``...) and the plan, possibly still bound to the
    previous step's gradients.

    A step whose group equals its ``snapshot``, whose optimizer's state holds the same objects
    as after the last step (a ``fastoptim._core.Snapshot``) and whose tensors pass
    ``Plan.bind_torch`` (same parameters, storage and layout; gradients laid out like them)
    takes the fast path: everything else was checked when the cache was built.  Anything
    else takes the general path, which checks everything in Python and rebuilds what
    changed."""

    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group  # identity: load_state_dict replaces the dicts
        self.hp: dict[str, Any] | None = None  # validated fastoptim hyper-parameters
        self.transforming = False  # the group clips or skips (engine.transforms.active)
        self.local = False  # DTensor parameters: signatures read their local shards
        self.hyper: Any = None  # the compiled struct for hp (no fresh state)
        self.names: tuple[str, ...] = ()  # state buffers in kernel order
        self.sig: tuple[list[Any], ...] | None = None  # what the views were built from
        self.params: list[torch.Tensor] = []
        self.perms: list[tuple[int, ...] | None] = []
        self.contiguous = True  # every perm is None
        self.labels: list[str] = []
        self.pviews: list[np.ndarray] = []
        self.sviews: list[list[Any]] = []  # per state name, per parameter (or (codes, absmax))
        self.scalars: dict[str, np.ndarray] = {}  # "step", "mu_product": packed values
        self.fresh: list[frozenset[str]] = []  # per parameter: states not yet stepped
        self.any_fresh = False
        self.plan: Any = None  # over all of params
        self.extras: dict[str, list[Any]] = {}  # the plan's master copies / compensation
        self.qmaps: list[str] = []  # per state name: its quantization map, "" if none
        self.to_numpy: Callable[[torch.Tensor], np.ndarray] = _numpy  # gradients' views
        self.ids: list[int] = []  # the parameters' numbers in the optimizer
        # the parameters: a step bumps their autograd versions (not the state's: ~85 ns a
        # tensor, and state is not saved by graphs)
        self.written: list[torch.Tensor] = []
        # the copy-out tensors the plan writes, with the address and shape it took
        self.outs: list[tuple[torch.Tensor, int, torch.Size]] = []
        self.bound = False  # plan is bound to the gradients of last_refs
        self.snapshot: dict[str, Any] | None = None  # the group as validated (_group_snapshot)
        self.fast = False  # the next step may try the fast path (Plan.bind_torch)
        self.last_refs: list[weakref.ref[torch.Tensor]] = []  # the previous step's gradients
        self.last_ptrs: list[int] = []
        # (parameter, its master copy) for each that has one, and the parameters' autograd
        # versions as last read, the steps since (each adds 1 to every one) and the total
        # they add up to now: a parameter changed in place (a new version: versions only
        # grow, so one sum tells) has its master follow the change (_follow) before a step
        self.mastered: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mparams: list[torch.Tensor] = []
        self.mversions: list[int] = []
        self.msteps = 0
        self.mtotal = 0
        # Whether the group rounds stochastically, and whether the last step that wrote its
        # parameters did: a parameter written so is either value around its master, which
        # the follow rule must accept after the rounding changed to nearest (else it took
        # those roundings for edits and overwrote the masters)
        self.stochastic = self.wrote_stochastic = False

    def follows_stochastic(self) -> bool:
        """The follow rule's `stochastic` for this group's masters (:func:`_follow`)."""
        return self.stochastic or self.wrote_stochastic


class Optimizer(torch.optim.Optimizer):  # type: ignore[misc, unused-ignore]  # (without torch)
    """Base class of the drop-in optimizers: a :class:`torch.optim.Optimizer` whose
    :meth:`step` runs the compiled kernel of its :attr:`_definition` once per parameter group.
    The definition validates and compiles the hyper-parameters and the engine's
    :class:`~fastoptim.engine.scheduled.Scheduled` runs the schedules; this class adapts
    torch's parameters, state and checkpoint format to them."""

    _definition: ClassVar[Definition]  # what the optimizer is (fastoptim.definitions)
    # torch.amp.GradScaler hands the step its scale and inf flag (``grad_scale``,
    # ``found_inf`` attributes) instead of unscaling the gradients in a pass of its own, as for
    # torch's fused optimizers: the scale is folded into the update.
    _step_supports_amp_scaling: ClassVar[bool] = True
    _ema_swapped = False  # inside ema_weights() (engine.transforms.ema_swapped sets it)
    # torch's 0-d state: step, NAdam's mu_product, ASGD's eta and mu (-> initial value)
    _scalars: ClassVar[tuple[tuple[str, float | str], ...]]
    _core_step: ClassVar[Any]
    _core_steps: ClassVar[Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        d = cls.__dict__.get("_definition")
        if d is not None:
            cls._scalars = ((("step", 0.0),) if d.torch_step else ()) + d.scalars
            cls._core_step = staticmethod(d.core_step)
            if d.host is None:
                cls._core_steps = staticmethod(d.core_steps)
            else:  # a step in NumPy (Muon): GradScaler unscales the gradients itself
                cls._step_supports_amp_scaling = False

    def __new__(cls: type[_Opt], *args: Any, **kwargs: Any) -> _Opt:
        # Keras's keywords (beta_1=, learning_rate=...) that no __init__ of the class's MRO
        # takes (a subclass may forward **kwargs): a TypeError naming torch's equivalent
        check_keywords(getattr(cls, "_definition", None), cls.__name__, cls, kwargs)
        return super().__new__(cls)  # type: ignore[no-any-return, unused-ignore]

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        self._caches: list[_Cache] = []
        self._state_snapshot: Any = None  # what state held after the last step (_record_state)
        self._fresh: dict[int, torch.Tensor] = {}  # state tensors created, not yet stepped
        # During a step, until it commits: id(param) -> (param, its state's entries before the
        # step, whether it had a state); what a skipped or refused step puts back
        # (_forget_created): entries it created removed, entries it converted (quantized,
        # dequantized, moved to another dtype or layout, popped) restored
        self._created: dict[int, tuple[torch.Tensor, dict[str, Any], bool]] | None = None
        # During a step: the masters it made follow their parameters (master, its values
        # before) and the versions it read (_Cache, mversions, msteps, mtotal), to undo.
        self._followed: list[tuple[Any, ...]] | None = None
        self._t = 0  # completed step() calls: the schedules' update number
        # id(group) -> (group, its schedules)
        self._scheduled: dict[int, tuple[dict[str, Any], Scheduled]] = {}
        self._loaded: list[dict[str, Any]] | None = None  # load_state_dict's decoded schedules
        self._live_groups: list[dict[str, Any]] | None = None  # and the groups before it
        self._lock = new_lock(self)  # steps from several threads: one at a time
        self._copy_out: dict[int, torch.Tensor] = {}  # id(param) -> its copy-out tensor
        #: The global gradient norm of the last step when a group has ``max_grad_norm`` (see
        #: :mod:`fastoptim.engine.transforms`), else None.
        self.grad_norm: float | None = None
        #: Whether the last step was skipped (``skip_nonfinite``, or GradScaler's found_inf).
        self.step_skipped = False
        #: Combines the gradient statistics across processes (see
        #: :func:`fastoptim.transforms.torch_all_reduce`).
        self.reduce_grad_stats: transforms.Reduce | None = None
        self._transformed = False  # some plan has a gradient transform other than identity
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # (torch's)
        super().__init__(params, {**defaults, **dict(self._definition.fixed)})
        if self._definition.torch_eager_state:  # torch creates this state at construction
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    self._init_scalars(state, self.defaults)
                    dtype_name, _, size = _as_kernels_see(p)
                    kinds = precision.buffers(
                        group,
                        dtype_name,
                        tuple(s.name for s in self._definition.states),
                        size,
                    )
                    if _complex_problem(p, kinds, group.get(precision.STATE_DTYPE)):
                        continue  # (refused by its first step, naming it)
                    for s in self._definition.states:
                        if kinds[s.name] in precision.QUANT_KINDS:
                            state.update(
                                _new_quantized(p, s.name, self._fill(s.name), kinds[s.name])
                            )
                            continue
                        dtype = _stored(_TORCH_DTYPES[kinds[s.name]], p)
                        state[s.name] = _full_like(p, self._fill(s.name), dtype)

    # ------------------------------------------------------------------ groups and state
    @property
    def _keys(self) -> list[str]:
        """The group entries fastoptim's class validates and maps (all but torch-only)."""
        return [k for k in self.defaults if k not in _TORCH_ONLY]

    def _label(self, group: Mapping[str, Any], gi: int, i: int) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return f"{names[i]!r} (group {gi})"
        return f"{i} of group {gi}"

    def _values(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The group's fastoptim hyper-parameters as plain values (:func:`_plain`); a tensor
        of several elements raises ValueError naming the group and the entry."""
        hp = {}
        for k in self._keys:
            try:
                hp[k] = _plain(group[k])
            except ValueError as e:
                gi = next((i for i, g in enumerate(self.param_groups) if g is group), None)
                where = "" if gi is None else f" of group {gi}"
                raise ValueError(f"{type(self).__name__}: {k}{where}: {e}") from None
        return hp

    def _validate(
        self, group: Mapping[str, Any], hp: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The group's fastoptim hyper-parameters (`hp` if already computed), validated;
        ValueError/TypeError if any value (torch-only flags included) cannot be honoured."""
        name = type(self).__name__
        if group.get("differentiable"):
            raise ValueError(
                f"{name}: differentiable=True is not supported: fastoptim updates tensors in "
                "place outside autograd"
            )
        if group.get("capturable"):
            raise ValueError(
                f"{name}: capturable=True (CUDA graph capture) is not supported: fastoptim "
                "updates CPU tensors"
            )
        if hp is None:
            hp = self._values(group)
        rec = self._record(group)
        if rec is None:
            self._definition.check(hp)
        else:
            rec.check(hp, self._t)
        return hp

    def _check_param(self, p: Any, label: str) -> tuple[int, ...] | None:
        """Raise TypeError/ValueError unless fastoptim can update `p` in place; its
        permutation to memory order (see :func:`_permutation`)."""
        name = type(self).__name__
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: param {label} is a {type(p).__name__}, not a tensor")
        if self._definition.torch_sparse_only and (p.is_sparse or p.is_complex()):
            raise ValueError(  # (torch.optim.SparseAdam's messages)
                f"{name}: param {label}: "
                + (
                    "SparseAdam requires dense parameter tensors"
                    if p.is_sparse
                    else "SparseAdam does not support complex parameters"
                )
            )
        if p.layout != torch.strided:
            raise TypeError(f"{name}: param {label} has layout {p.layout}; need a dense tensor")
        if p.device.type != "cpu":
            raise TypeError(
                f"{name}: param {label} is on {p.device}; fastoptim.torch updates CPU tensors "
                "(use torch.optim for other devices)"
            )
        host = self._definition.host
        if p.dtype in _COMPLEX and host is not None and host.update is not None:
            raise TypeError(  # (Muon, Adafactor: matrix maths; torch.optim refuses them too)
                f"{name}: param {label} has dtype {p.dtype}; {name} does not support complex "
                "parameters (as torch.optim's)"
            )
        if p.dtype not in _FLOATS + _COMPLEX:
            raise TypeError(
                f"{name}: param {label} has dtype {p.dtype}; fastoptim.torch updates float32, "
                "float64, bfloat16, float16, complex64 and complex128 tensors"
            )
        if _is_neg(p) or p.is_conj():  # (its memory holds -p or conj(p): not p's values)
            which, holds = ("negative", "neg") if _is_neg(p) else ("conjugate", "conj")
            raise TypeError(
                f"{name}: param {label} is a {which} view (is_{holds}(): its memory holds "
                f"{holds}(p)); pass a parameter with resolve_{holds}() applied"
            )
        if host is not None:  # a step in NumPy: float32/float64 (LBFGS: complex too, as
            # torch's), and the host's own rule
            if p.dtype not in (torch.float32, torch.float64, *_COMPLEX):
                raise TypeError(
                    f"{name}: param {label} has dtype {p.dtype}; {name} updates float32 and "
                    f"float64{'' if host.update else ', complex64 and complex128'} tensors"
                )
            if host.check_param is not None:
                host.check_param(name, f"param {label}", tuple(p.shape))
        try:
            return _permutation(p)
        except ValueError as e:
            raise ValueError(f"{name}: param {label} {e}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`; also validates the
        hyper-parameters and that every parameter is a tensor fastoptim can update."""
        super().add_param_group(param_group)  # (torch warns of a parameter listed twice)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            self._sync(group)
            self._validate(group)
            seen: dict[int, int] = {}
            for i, p in enumerate(group["params"]):
                self._check_param(p, self._label(group, gi, i))
                first = seen.setdefault(id(p), i)
                if first != i:
                    raise ValueError(
                        f"{type(self).__name__}: param {self._label(group, gi, i)} is param "
                        f"{self._label(group, gi, first)} again; fastoptim updates each "
                        "parameter once per step: list it once"
                    )
        except BaseException:
            self.param_groups.pop()
            self._scheduled.pop(id(group), None)
            raise

    # ------------------------------------------------------------------ schedules
    @property
    def step_count(self) -> int:
        """Completed :meth:`step` calls: the update number ``t`` at which the schedules are
        evaluated for the next step."""
        return self._t

    def schedules(self, group: int = 0) -> dict[str, Any]:
        """The scheduled hyper-parameters of parameter group `group`: name -> schedule
        (``betas`` -> a pair in which either entry may be a schedule).  Their current values
        are in ``param_groups[group]``."""
        rec = self._sync(self.param_groups[group])
        return dict(rec.specs) if rec is not None else {}

    def _record(self, group: Mapping[str, Any]) -> Scheduled | None:
        entry = self._scheduled.get(id(group))
        return entry[1] if entry is not None and entry[0] is group else None

    def _new_record(self, group: dict[str, Any]) -> Scheduled:
        rec = Scheduled(self._definition, type(self).__name__, _TORCH_ONLY, tuples=False)
        self._scheduled[id(group)] = (group, rec)
        return rec

    def _sync(self, group: dict[str, Any]) -> Scheduled | None:
        """Reconcile `group` with its schedules after the user (or a torch LR scheduler) may
        have assigned entries (see :meth:`Scheduled.adopt`); raises the error a schedule
        raised after the last step.  The group's record, or None if nothing is scheduled."""
        rec = self._record(group)
        if rec is None:
            if not any(_schedules._has_schedule(group.get(k)) for k in self.defaults):
                return None
            rec = self._new_record(group)
        rec.adopt(group, self._t, self.defaults)
        if not rec.specs:
            del self._scheduled[id(group)]
            return None
        return rec

    def _sync_all(self) -> None:
        for group in self.param_groups:
            if self._record(group) is not None or any(
                _schedules._has_schedule(group.get(k)) for k in self.defaults
            ):
                self._sync(group)

    @contextlib.contextmanager
    def _schedules_kept(self) -> Iterator[None]:
        """The schedules as they were before the block, after it: torch.distributed.checkpoint's
        state initialisation (:func:`_dcp_initialising`) assigns ``lr = 0`` for one step and
        then the old ``lr`` back, which would replace each scheduled ``lr`` by a constant (an
        assigned value replaces its schedule) and move the schedules one update on.  The
        step's state (each parameter's ``step`` included, as torch.optim's) stays."""
        t = self._t
        saved = [
            (key, group, rec, rec.copy(), {k: group.get(k) for k in rec.specs})
            for key, (group, rec) in self._scheduled.items()
        ]
        try:
            yield
        finally:
            self._t = t
            for key, group, rec, kept, values in saved:
                rec.copy_from(kept)
                group.update(values)
                self._scheduled[key] = (group, rec)

    def _advance_schedules(self) -> None:
        """After a step: count it and write each schedule's value for the next one (checked by
        that step, before it changes anything)."""
        self._t += 1
        for group, rec in self._scheduled.values():
            rec.advance(group, self._t)

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`, in torch's format; a group with
        schedules also has ``"schedules"`` (name -> the schedule's
        :meth:`~fastoptim.schedules.Schedule.describe` dict) and ``"schedule_step"``
        (:attr:`step_count`), entries that ``torch.optim`` keeps and ignores.  A quantized
        state's codes (``state_dtype="int8"``/``"int4"``: ``opt.state[p]["exp_avg"]``, uint8)
        are saved as ``"exp_avg_codes"`` beside ``"exp_avg_absmax"``: ``torch.optim`` refuses
        such a checkpoint at its first step (no ``exp_avg``) instead of reading codes as
        moments.  :meth:`load_state_dict` takes either name.  Such a parameter's state also
        records its shape (``"param_shape"``, an int64 tensor), which loading checks."""
        self._sync_all()
        sd: dict[str, Any] = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]  # (torch's keys: indices)
        sd["state"] = {
            k: _saved_entry(v, params[k]) if isinstance(v, Mapping) else v
            for k, v in sd["state"].items()
        }
        for group, saved in zip(self.param_groups, sd["param_groups"]):
            rec = self._record(group)
            if rec is not None:
                saved["schedules"] = {
                    k: _schedules._to_data(s, _plain) for k, s in rec.specs.items()
                }
                saved["schedule_step"] = self._t
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`; also restores the schedules and
        :attr:`step_count` of a checkpoint that has them (a bad one raises first, changing
        nothing).  Without them (e.g. a ``torch.optim`` checkpoint) every hyper-parameter is
        the checkpoint's constant and :attr:`step_count` the largest per-parameter ``step``.
        A hyper-parameter the checkpoint's group lacks (a ``torch.optim`` or ``schedulefree``
        checkpoint has no ``state_dtype``, ``cautious``...; ``schedulefree``'s no ``maximize``)
        keeps this optimizer's value for that group, where torch would take the
        constructor's default."""
        cls = type(self).__name__
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
            got = type(state_dict).__name__
            if isinstance(state_dict, Mapping):
                got += f" with 'param_groups' {groups!r:.60}"
            raise ValueError(
                f"{cls}.load_state_dict: expected a dict whose 'param_groups' is a list of dicts"
                f" (an optimizer's state_dict()), got {got}"
            )
        decoded: list[dict[str, Any]] = []
        for i, saved in enumerate(groups):
            rec = self._record(self.param_groups[i]) if i < len(self.param_groups) else None
            data, t = saved.get("schedules") or {}, saved.get("schedule_step", 0)
            if not isinstance(data, Mapping) or isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"{cls}.load_state_dict: group {i}: malformed schedules")
            specs = {}
            for k, d in data.items():
                try:
                    specs[k] = _schedules._from_data(
                        d, rec.specs.get(k) if rec is not None else None
                    )
                except ValueError as e:
                    raise ValueError(f"{cls}.load_state_dict: group {i} {k}: {e}") from None
            decoded.append(specs)
        state_dict = self._densified(state_dict)
        self._check_loaded(state_dict)
        self._loaded = decoded
        self._live_groups = [dict(g) for g in self.param_groups]
        # (registered now, it runs after the user's pre-hooks, which see the tensors)
        hold = self.register_load_state_dict_pre_hook(_hold_states)
        try:
            super().load_state_dict(state_dict)
        finally:
            hold.remove()
            self._loaded = self._live_groups = None

    def _densified(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`state_dict` with the states torch.optim keeps sparse for a parameter stepped with
        sparse gradients (SGD's ``momentum_buffer``) made dense, as fastoptim keeps them (the
        same values): a torch checkpoint of sparse training resumes here."""
        names = _SPARSE_IN_TORCH.get(self._definition.name, ())
        states = state_dict.get("state")
        if not names or not isinstance(states, Mapping):
            return state_dict

        def dense(k: str, v: Any) -> Any:
            sparse = isinstance(v, torch.Tensor) and v.layout == torch.sparse_coo
            return v.to_dense() if k in names and sparse else v

        out = {
            key: {k: dense(k, v) for k, v in entry.items()} if isinstance(entry, Mapping) else entry
            for key, entry in states.items()
        }
        return {**state_dict, "state": out}

    def _check_loaded(self, state_dict: Mapping[str, Any]) -> None:
        """ValueError naming the entry of `state_dict` that no step could use (before torch's
        loader replaces anything): a ``step`` that is not a whole number from 0 to 2**53 (a NaN
        one had failed the load half done, the state already replaced); quantized state's
        codes that are not uint8 in either layout (8-bit: the parameter's shape; 4-bit:
        ``(numel + 1) // 2`` packed bytes), scales that are not float32 with one entry per
        block, negative or infinite (NaN marks a non-finite block), codes without scales or
        scales without codes, a memory order that is not a permutation of the parameter's
        dimensions."""
        cls = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{cls}: expected a dict, got {type(state_dict).__name__}")
        saved_groups = state_dict.get("param_groups")
        states = state_dict.get("state")
        if "state" in state_dict and not isinstance(states, Mapping):
            raise ValueError(
                f"{cls}: 'state' must be a dict (parameter key -> its state), got "
                f"{type(states).__name__}"
            )
        if not isinstance(saved_groups, Sequence) or not isinstance(states, Mapping):
            return  # (torch's loader says what is wrong)
        mine = [
            (p, self._label(g, gi, i))
            for gi, g in enumerate(self.param_groups)
            for i, p in enumerate(g["params"])
        ]
        saved = [k for g in saved_groups for k in g.get("params", ())]
        for key, (p, label) in zip(saved, mine):
            entry = states.get(key)
            if entry is not None and not isinstance(entry, Mapping):
                raise ValueError(
                    f"{cls}: the state of param {label} must be a dict, got "
                    f"{type(entry).__name__} {entry!r:.40}"
                )
            if entry is None or not isinstance(p, torch.Tensor):
                continue
            if (wrong := _sparse_state(entry)) is not None:
                raise ValueError(f"{cls}: param {label}: {wrong}")
            entry = _loaded_entry(entry, f"{cls}: param {label}", p)
            if "step" in entry and (wrong := _step_problem(entry["step"])) is not None:
                raise ValueError(f"{cls}: state 'step' of param {label}: {wrong}")
            for name, codes in entry.items():
                if name.endswith(precision.ORDER) and name != precision.ORDER:
                    base = name.removesuffix(precision.ORDER)
                    wrong = _order_problem(p.dim(), codes)
                    if base + precision.ABSMAX not in entry or wrong is not None:
                        raise ValueError(
                            f"{cls}: state {name!r} of param {label}: "
                            + (wrong or "the memory order of a quantized state it lacks")
                        )
                    continue
                if name.endswith(precision.ABSMAX):
                    if name.removesuffix(precision.ABSMAX) not in entry:
                        raise ValueError(f"{cls}: state {name!r} of param {label} has no codes")
                    continue
                scales = entry.get(name + precision.ABSMAX)
                if scales is None:
                    if isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8:
                        raise ValueError(
                            f"{cls}: state {name!r} of param {label} holds uint8 codes without "
                            f"their scales {name + precision.ABSMAX!r}"
                        )
                    continue
                problem = _quantized_problem(p, codes, scales)
                if problem is not None:
                    which, what = problem
                    raise ValueError(f"{cls}: state {name + which!r} of param {label}: {what}")

    def __getstate__(self) -> dict[str, Any]:
        self._sync_all()
        state: dict[str, Any] = super().__getstate__()
        state = {k: v for k, v in state.items() if k not in ("_lock", "_copy_out")}
        state["step_count"] = self._t
        state["schedules"] = [
            dict(rec.specs) if (rec := self._record(g)) is not None else {}
            for g in self.param_groups
        ]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also what load_state_dict calls with the loaded state: forget every cached view.
        state = dict(state)
        for p, entry in state.get("state", {}).items():
            for name, value in entry.items() if isinstance(entry, dict) else ():
                if isinstance(value, _Held):  # (load_state_dict: moved, not cast)
                    t = value.tensor
                    entry[name] = t.to(device=p.device) if isinstance(p, torch.Tensor) else t
        count = state.pop("step_count", None)
        pickled = state.pop("schedules", None)  # pickle / deepcopy: the live schedules
        # (torch's __setstate__ gives every optimizer a `differentiable` default: not to the
        # classes whose signature has none, Lion's...)
        foreign = "differentiable" not in state.get("defaults", getattr(self, "defaults", {}))
        super().__setstate__(state)
        if foreign:
            self.defaults.pop("differentiable", None)
        if not hasattr(self, "_lock"):  # unpickled (load_state_dict keeps the live one)
            self._lock = new_lock(self)
        if not hasattr(self, "_copy_out"):  # unpickled: copies are not part of the state
            self._copy_out = {}
        if not hasattr(self, "reduce_grad_stats"):  # unpickled: nor is the reduction
            self.reduce_grad_stats = None
            self.grad_norm, self.step_skipped = None, False
        self._transformed = True  # (new plans)
        live = getattr(self, "_live_groups", None)  # load_state_dict: the groups before it
        for i, group in enumerate(self.param_groups):
            own = live[i] if live is not None and i < len(live) else {}
            for k, v in self.defaults.items():
                if k not in group:
                    group[k] = own.get(k, v)
        self._caches = []
        self._state_snapshot = None
        self._fresh = {}
        self._created = self._followed = None
        self._scheduled = {}
        saved = [
            (g.pop("schedules", None), g.pop("schedule_step", None)) for g in self.param_groups
        ]
        loaded: list[dict[str, Any]] | None = getattr(self, "_loaded", None)
        if count is None:  # load_state_dict: the saved count, or (saved by torch.optim, which
            # may also have run a fastoptim checkpoint further) the largest per-parameter step
            count = max(
                [int(t) for specs, t in saved if specs and t is not None]
                + [int(st["step"]) for st in self.state.values() if "step" in st],
                default=0,
            )
        self._t = int(count)
        self._loaded = None
        specs_per_group = pickled if pickled is not None else loaded
        for group, specs in zip(self.param_groups, specs_per_group or []):
            if specs:
                self._restore(group, specs)

    def _restore(self, group: dict[str, Any], specs: Mapping[str, Any]) -> None:
        """Reattach `specs` to a loaded or unpickled `group` (see :meth:`Scheduled.restore`)."""
        rec = self._new_record(group)
        rec.restore(group, specs, self._t)
        if not rec.specs:
            del self._scheduled[id(group)]

    def _fill(self, name: str, hp: Mapping[str, Any] | None = None) -> float:
        """Initial value of a new state tensor `name`, as torch computes it: from the
        constructor's values where torch creates the state at construction (it ignores a
        group's own ``initial_accumulator_value``), else from the group's values `hp` at the
        step that creates it (Rprop's ``step_size``: the group's ``lr``)."""
        if hp is None or self._definition.torch_eager_state:
            hp = self.defaults
        return self._definition.fill(name, hp)

    def _new_state(
        self, p: torch.Tensor, name: str, hp: Mapping[str, Any], dtype: torch.dtype
    ) -> torch.Tensor:
        """A new state tensor `name` of `p` (of `dtype`: the precision policy's), in `p`'s
        layout: the kernels' states filled as torch does; a master copy, an EMA (and a state that
        starts as its parameter) hold `p`'s values."""
        if name in precision.COPIES:  # a master copy, an EMA
            return torch.empty_like(p, dtype=dtype).copy_(p.detach())
        if name == precision.COMPENSATION:
            return torch.zeros_like(p, dtype=dtype)
        if self._definition.like_param(name):  # Schedule-Free's z: a copy of the parameter
            s = torch.empty_like(p, dtype=dtype).copy_(p.detach())
        elif name in self._definition.shaped:  # Adafactor's row_var / col_var
            shape = self._definition.state_shape(name, tuple(p.shape))
            assert shape is not None
            s = torch.full(shape, self._fill(name, hp), dtype=dtype, device=p.device)
        else:
            s = _full_like(p, self._fill(name, hp), dtype)
        self._fresh[id(s)] = s
        return s

    def _quantized_state(
        self,
        p: torch.Tensor,
        perm: tuple[int, ...] | None,
        name: str,
        hp: Mapping[str, Any],
        label: str,
        kind: str,
    ) -> None:
        """Make sure state `name` of `p` (memory order `perm`) is quantized as `kind`: codes
        (uint8; 8-bit: `p`'s shape and memory layout; 4-bit: 1-D, ``(numel + 1) // 2`` bytes,
        packed in `p`'s memory order, which ``name + "_order"`` records where it is not
        row-major) and ``name + "_absmax"`` (float32, one per block).  Created new (the fill
        value's codes), quantized from a float state (created eagerly, or of another policy),
        checked, or requantized in `p`'s memory order where saved in another (the caller
        records the new order: _record_order)."""
        state = self.state[p]
        scales = name + precision.ABSMAX
        s, a = state.get(name), state.get(scales)
        four = kind == precision.INT4
        block = precision.QUANT_BLOCK4 if four else precision.QUANT_BLOCK
        nblocks = -(-p.numel() // block)
        if s is None:
            state.update(_new_quantized(p, name, self._fill(name, hp), kind))
            self._fresh[id(state[name])] = state[name]
            return
        cls = type(self).__name__
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"{cls}: state {name!r} of param {label} is not a tensor")
        packed = ((p.numel() + 1) // 2,)
        if s.dtype != torch.uint8:  # a float state: quantized now
            if s.shape != p.shape:
                raise ValueError(
                    f"{cls}: state {name!r} of param {label} is not a tensor of the "
                    f"parameter's shape {tuple(p.shape)}"
                )
            fresh = id(s) in self._fresh
            state[name], state[scales] = _quantized_like(p, s, name, kind)
            if fresh:
                self._fresh[id(state[name])] = state[name]
            return
        if s.shape != (packed if four else p.shape):
            raise ValueError(
                f"{cls}: state {name!r} of param {label}: uint8 {tuple(s.shape)}, expected "
                + (
                    f"{packed[0]} bytes of 4-bit codes (state_dtype='int4'; 8-bit codes are "
                    "shaped like the parameter)"
                    if four
                    else f"the parameter's shape {tuple(p.shape)} (state_dtype='int8'; 4-bit "
                    "codes are a 1-D array of packed bytes)"
                )
            )
        if (
            not isinstance(a, torch.Tensor)
            or a.dtype != torch.float32
            or a.shape != (nblocks,)
            or not a.is_contiguous()
        ):
            got = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else repr(a)
            raise ValueError(
                f"{cls}: state {scales!r} of param {label}: {got}, expected a contiguous "
                f"float32 tensor of shape ({nblocks},) (one absmax per block of "
                f"{block} elements)"
            )
        order = _recorded_order(
            state, name, p.dim(), f"{cls}: state {name + precision.ORDER!r} of param {label}"
        )
        if four and order == perm:
            if s.device != p.device or not s.is_contiguous():
                state[name] = s.to(device=p.device, copy=True).contiguous()
        elif not four and order is not None and order == perm:
            # (8-bit codes in blocks of `p`'s memory order, as recorded: laid out as `p` again
            # where a copy lost its strides, no requantization)
            if s.device != p.device or not _in_layout(s, perm):
                state[name] = torch.empty_like(p, dtype=torch.uint8).copy_(s)
        elif four or order is not None or s.device != p.device or not _in_layout(s, perm):
            # (e.g. saved from a contiguous parameter, resumed channels-last: its blocks follow
            # the saved memory order; requantized in this parameter's)
            try:
                values = _dequantized(s, a, name, kind, tuple(p.shape), order)
            except ValueError as e:
                raise ValueError(f"{cls}: state {name!r} of param {label}: codes {e}") from None
            state[name], state[scales] = _quantized_like(p, values, name, kind)

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors (quantized codes and their scales, master copies
        and compensation included; the 0-d scalar state such as ``step`` left out)."""
        self._sync_all()
        return sum(
            t.nbytes
            for st in self.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )

    def _scalars_of(self, hp: Mapping[str, Any]) -> tuple[tuple[str, float | str], ...]:
        """The scalar state of a parameter in a group with `hp`: torch's, plus a ``step``
        count where torch keeps none (SGD) and stochastic rounding needs one (its random bits
        are keyed on the step number)."""
        if hp.get(precision.ROUNDING) == "stochastic" and not self._definition.torch_step:
            return (("step", 0.0), *self._scalars)
        return self._scalars

    def _state_to_create(self, p: torch.Tensor) -> dict[str, Any]:
        """``self.state[p]``, about to gain the state a step creates or to have its entries
        converted: during a step, what it held before is remembered (once per step) so that
        the step, if skipped or refused, puts it back (:meth:`_forget_created`)."""
        created = self._created
        if created is not None and id(p) not in created:
            had = p in self.state
            created[id(p)] = (p, dict(self.state[p]) if had else {}, had)
        return self.state[p]  # type: ignore[no-any-return]

    def _forget_created(self) -> None:
        """Put back the state as it was before this step: the state it created (lazily, at the
        step, as torch creates it) removed, torch creating none at a step GradScaler skips, so
        that a step skipped (``found_inf``, ``skip_nonfinite``) or refused leaves none either
        (the next step that runs creates it from its own hyper-parameters: Rprop's
        ``step_size``, ASGD's ``eta``: its ``lr``; SGD's momentum buffer: its gradient); the
        entries it converted for a changed policy (float state quantized, codes dequantized or
        requantized, a state moved to another dtype, a Kahan compensation dropped) restored,
        the conversion made again by the next step that runs."""
        created, self._created = self._created, None
        if not created:
            return
        for p, before, had in created.values():
            st = self.state.get(p)
            if st is None:
                continue
            for n, t in st.items():
                if before.get(n) is not t and self._fresh.get(id(t)) is t:
                    del self._fresh[id(t)]
            if had:
                st.clear()
                st.update(before)
            else:
                del self.state[p]
        for c in self._caches:  # (their views, plans and packed scalars held that state)
            c.sig, c.fast = None, False
        self._state_snapshot = None

    def _init_scalars(self, state: dict[str, Any], hp: Mapping[str, Any]) -> None:
        """Create the missing scalar state, as torch does: 0-d tensors of its scalar dtype
        (ASGD's ``eta`` from the group's ``lr``)."""
        for name, value in self._scalars_of(hp):
            if name not in state:
                fill = float(_plain(hp[value])) if isinstance(value, str) else value
                state[name] = torch.tensor(fill, dtype=_scalar_dtype(_exact_count(name, hp)))

    def set_copy_out(self, outs: Any) -> None:
        """The offload layout: after every step, each float32 parameter that has a copy-out
        tensor (bfloat16 or float16, same shape and memory layout, on the CPU) also gets its new
        value rounded into it (per the group's ``rounding``) in the same pass, ready to be
        copied to the accelerator.  `outs`: a dict parameter -> tensor, a list in the order of
        the parameters of ``param_groups`` (None for a parameter without a copy), or None to
        remove every copy.  Validated first: a rejected call changes nothing."""
        name = type(self).__name__
        if self._definition.host is not None and outs is not None:
            raise TypeError(
                f"{name}.set_copy_out: {name} computes its step in NumPy and takes no precision "
                "options (no copy-out tensors); convert the parameters after its step instead"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        if outs is None:
            pairs: list[tuple[Any, Any]] = []
        elif isinstance(outs, Mapping):
            known = {id(p) for p in params}
            if any(id(p) not in known for p in outs):
                raise ValueError(f"{name}.set_copy_out: a key is not a parameter of this optimizer")
            pairs = [(p, outs[p]) for p in params if p in outs and outs[p] is not None]
        elif isinstance(outs, Sequence) and len(outs) == len(params):
            pairs = [(p, o) for p, o in zip(params, outs) if o is not None]
        else:
            raise TypeError(
                f"{name}.set_copy_out: expected a dict parameter -> tensor, a list of "
                f"{len(params)} tensors or None, or None"
            )
        index = {id(p): i for i, p in enumerate(params)}
        views, labels = [], []  # (every copy and its parameter: disjoint, as a step checks)
        for p, o in pairs:
            label = f"{index[id(p)]}"
            perm = self._check_param(p, label)
            if p.is_complex():
                raise TypeError(
                    f"{name}.set_copy_out: param {label} is {_name(p.dtype)}: the offload layout "
                    "is for float32 parameters"
                )
            if not isinstance(o, torch.Tensor) or o.device != p.device or not _in_layout(o, perm):
                raise TypeError(
                    f"{name}.set_copy_out: the copy-out of param {label} must be a CPU tensor "
                    "with the parameter's memory layout"
                )
            try:
                _core.Plan([_view(p, perm)], [label], [], [], outs=[_view(o, perm)])
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}.set_copy_out: {e}") from None
            views += [_view(p, perm), _view(o, perm)]
            labels += [f"param {label}", f"the copy-out of param {label}"]
        try:
            _core.check_disjoint(views, labels)
        except ValueError as e:
            raise ValueError(f"{name}.set_copy_out: {e}") from None
        with self._lock:
            self._copy_out = {id(p): o for p, o in pairs}
            self._caches = []

    # ------------------------------------------------------------------ the per-group cache
    def _cache(self, gi: int, group: dict[str, Any]) -> _Cache:
        """Group `gi`'s cache, its hyper-parameters validated and mapped if they changed."""
        while len(self._caches) <= gi:
            self._caches.append(_Cache(self.param_groups[len(self._caches)]))
        c = self._caches[gi]
        if c.group is not group:
            c = self._caches[gi] = _Cache(group)
        elif c.snapshot is not None:
            try:
                if group == c.snapshot:
                    return c
            except (TypeError, ValueError, RuntimeError):  # a value's == that raises
                pass
        rec = self._record(group)
        if rec is not None:  # a scheduled entry assigned since the last step, or failed
            for key, written in rec.written.items():
                if key in rec.pending or not same(group.get(key), written):
                    self._sync(group)
                    break
        hp = self._values(group)
        if hp != c.hp or group.get("differentiable") or group.get("capturable"):
            try:
                hp = self._validate(group, hp)
            except TypeError:  # not a number: perhaps a schedule was assigned
                if not any(_schedules._has_schedule(group.get(k)) for k in self.defaults):
                    raise
                self._sync(group)
                hp = self._validate(group)
            hyper = self._definition.compile(hp)
            names = tuple(hyper.state_names())
            old = c.hp or {}
            if names != c.names or any(hp.get(k) != old.get(k) for k in _STRUCTURE):
                # other state buffers, dtypes or plan options: rebuild (the general path)
                c.sig, c.fast = None, False
            c.hp, c.hyper, c.names = hp, hyper, names
            c.stochastic = hp.get(precision.ROUNDING) == "stochastic"
            c.transforming = transforms.active((hp,))
        c.snapshot = None if self._record(group) is not None else _group_snapshot(group)
        return c

    def _sig(self, params: Sequence[torch.Tensor], local: bool) -> tuple[list[Any], ...]:
        """What must not change for a cache built from `params` to stay valid: each
        parameter's identity, storage address, strides, shape and dtype (of its local shard
        when `local`), and the identity, storage address and layout of every value in its
        state (lazy initialization, load_state_dict or the user may replace those, move a
        tensor's storage: share_memory_(), ``.data =``, set_(), or re-view it in place:
        as_strided_())."""
        values = self._state_values(params)
        view = _local if local else _same
        try:
            layouts = [
                (t.data_ptr(), t.shape, t.stride(), t.dtype)
                for t in map(view, values)
                if isinstance(t, torch.Tensor)
            ]
        except RuntimeError:  # ("Cannot access data pointer of Tensor that doesn't have storage")
            for p in params:
                if (wrong := _sparse_state(self.state[p])) is not None:
                    name = type(self).__name__
                    raise TypeError(f"{name}: param {self._label_of(p)}: {wrong}") from None
            raise
        return (
            list(map(id, params)),
            list(map(_local_ptr if local else _data_ptr, params)),
            list(map(_local_stride if local else _stride, params)),
            [(tuple((_local(p) if local else p).shape), p.dtype) for p in params],
            list(map(id, values)),
            layouts,
        )

    def _state_values(self, params: Sequence[torch.Tensor]) -> list[Any]:
        values: list[Any] = []
        for p, st in zip(params, map(self.state.get, params)):  # get: SGD keeps none, at times
            if isinstance(st, dict):
                values.extend(st.values())
            elif st is not None:
                raise TypeError(
                    f"{type(self).__name__}: the state of param {self._label_of(p)} must be a "
                    f"dict, got {type(st).__name__}"
                )
        return values

    def _label_of(self, p: torch.Tensor) -> str:
        """The label of parameter `p` (for messages)."""
        for gi, g in enumerate(self.param_groups):
            for i, q in enumerate(g["params"]):
                if q is p:
                    return self._label(g, gi, i)
        return "?"

    def _build(self, c: _Cache, gi: int, params: list[torch.Tensor]) -> None:
        """(Re)build group `gi`'s cache for `params`: create missing state, replace state that
        does not have its parameter's layout, pack the scalars, make the views and the plan."""
        name = type(self).__name__
        group = c.group
        c.sig = None
        positions, j = [], 0  # of params in the group (an ordered subsequence of it)
        for i, p in enumerate(group["params"]):
            if j < len(params) and p is params[j]:
                positions.append(i)
                j += 1
        labels = [self._label(group, gi, i) for i in positions]
        # each parameter in one place (add_param_group checks; param_groups may be edited)
        where = {
            id(q): self._label(g, gj, j)
            for gj, g in enumerate(self.param_groups)
            if gj != gi
            for j, q in enumerate(g["params"])
        }
        for p, label in zip(params, labels):
            listed = where.setdefault(id(p), label)
            if listed != label:
                raise ValueError(
                    f"{name}: param {label} is param {listed} again; fastoptim updates each "
                    "parameter once per step: list it once"
                )
        perms = [self._check_param(p, lab) for p, lab in zip(params, labels)]
        assert c.hp is not None
        packed: dict[str, list[Any]] = {n: [] for n, _ in self._scalars_of(c.hp)}
        assert c.hp is not None
        # Per parameter: its state buffers and their dtypes (the precision policy's).
        layouts = self._definition.layouts(c.hp, map(_as_kernels_see, params), c.names)
        shaped = self._definition.shaped
        self._refuse_shards(params, labels, layouts)
        for p, label, layout in zip(params, labels, layouts):
            problem = _complex_problem(p, layout, c.hp.get(precision.STATE_DTYPE))
            if problem is None and p.is_complex() and id(p) in self._copy_out:
                problem = f"is {_name(p.dtype)}: it takes no copy-out tensor (set_copy_out)"
            if problem is not None:
                raise TypeError(f"{name}: param {label} {problem}")
        stateless = not c.names and not packed and not any(map(len, layouts))
        for p, perm, label, layout in zip(params, perms, labels, layouts):
            if p in self.state:  # (what it holds, put back if the step does not run)
                self._state_to_create(p)
            if precision.COMPENSATION not in layout and p in self.state:
                # (kahan switched off: its compensation is the rounding residual of a value
                # the parameter has left; kept, a later kahan=True would add it back)
                self.state[p].pop(precision.COMPENSATION, None)
            if stateless:
                continue
            if p in self.state:  # (before the step remembers what it held)
                _adopt_codes(self.state[p], f"{name}: param {label}", p)
            state = self._state_to_create(p)
            self._init_scalars(state, c.hp)
            if precision.MASTER in layout and precision.MASTER in state:
                # (a master kept from before: the parameter may have been changed since, e.g.
                # its storage replaced by `.data =`, which is what rebuilt the cache)
                master = state[precision.MASTER]
                if isinstance(master, torch.Tensor) and master.shape == p.shape:
                    if master.dtype == torch.float32 and master.device == p.device:
                        self._follow(p, master, c.follows_stochastic())
            for n, kind in layout.items():
                if kind in (*precision.QUANT_KINDS, precision.ABSMAX_KIND, precision.ABSMAX4_KIND):
                    if kind in precision.QUANT_KINDS:
                        if _quantized_other_way(state, p, n, kind):  # (int8 <-> int4)
                            _dequantize_state(state, p, n, f"{name}: param {label}")
                        self._quantized_state(p, perm, n, c.hp, label, kind)
                        _record_order(state, n, kind, perm)
                    continue
                dtype = _stored(_TORCH_DTYPES[kind], p)
                s = state.get(n)
                if s is None:
                    state[n] = self._new_state(p, n, c.hp, dtype)
                    continue
                if n + precision.ABSMAX in state:  # (state_dtype no longer quantizes it)
                    _dequantize_state(state, p, n, f"{name}: param {label}")
                    s = state[n]
                want = p.shape if n not in shaped else self._definition.state_shape(n, p.shape)
                if not isinstance(s, torch.Tensor) or s.shape != want:
                    whose = "the parameter's" if n not in shaped else "its"
                    raise ValueError(
                        f"{name}: state {n!r} of param {label} is not a tensor of "
                        f"{whose} shape {tuple(want or ())}"
                    )
                if s.is_complex() != p.is_complex():  # (e.g. `p.data =` another kind)
                    raise ValueError(
                        f"{name}: state {n!r} of param {label} is {_name(s.dtype)}, the "
                        f"parameter {_name(p.dtype)}: a complex parameter's state is complex, "
                        "a real one's real (as torch.optim's; start it again: del "
                        "opt.state[p])"
                    )
                if n in shaped:  # (its own shape: contiguous)
                    if s.device != p.device or s.dtype != dtype or not s.is_contiguous():
                        state[n] = s.to(device=p.device, dtype=dtype, copy=True).contiguous()
                    continue
                if (
                    s.device != p.device
                    or s.dtype != dtype
                    or s.is_conj()  # (its memory holds conj(s))
                    or _is_neg(s)  # (or -s)
                    or not _in_layout(s, perm)
                ):
                    moved = torch.empty_like(p, dtype=dtype)
                    moved.copy_(s)
                    state[n] = moved
            for n in packed:
                v = state[n]
                if isinstance(v, bool) or not (
                    isinstance(v, (int, float))
                    or (isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_sparse)
                ):
                    raise TypeError(
                        f"{name}: param {label}: its state's {n} is {v!r:.60}; expected a number "
                        "or a one-element tensor"
                    )
                packed[n].append(v)
        # Scalars: one buffer per kind, each parameter's entry a 0-d view of it, so that a step
        # advances all of them in one operation.
        scalars, buffers = {}, []
        for n, values in packed.items():
            dtypes = {v.dtype for v in values if isinstance(v, torch.Tensor)}
            if _exact_count(n, c.hp):  # (a float32 count loaded: widened)
                dtype = torch.float64
            elif len(dtypes) == 1:
                dtype = dtypes.pop()
            else:  # new (torch's default), or mixed (e.g. loaded): the wider one
                dtype = torch.float64 if dtypes else _scalar_dtype()
            buf = torch.tensor([float(v) for v in values], dtype=dtype)
            for i, p in enumerate(params):
                self.state[p][n] = buf[i]
            scalars[n] = buf.numpy()
            buffers.append(buf)
        c.mastered = [
            (p, self.state[p][precision.MASTER])
            for p, layout in zip(params, layouts)
            if precision.MASTER in layout
        ]
        c.mparams = [p for p, _ in c.mastered]
        c.mversions = list(map(_VERSION, c.mparams))
        c.msteps, c.mtotal = 0, sum(c.mversions)
        pviews = [_view(p, perm) for p, perm in zip(params, perms)]
        sviews: list[list[Any]] = [
            [
                (
                    _numpy_of(self.state[p][n])
                    if layout[n] == precision.INT4
                    else _view(self.state[p][n], perm),
                    _numpy_of(self.state[p][n + precision.ABSMAX]),
                )
                if precision.quantized(layout, n)
                else _view(self.state[p][n], perm)
                if n not in shaped
                else (_view(self.state[p][n], None) if n in layout else None)
                for p, perm, layout in zip(params, perms, layouts)
            ]
            for n in c.names
        ]
        c.qmaps = precision.qmaps(c.hp.get(precision.STATE_DTYPE), c.names)
        extras = {
            key: [
                _view(self.state[p][n], perm) if n in layout else None
                for p, perm, layout in zip(params, perms, layouts)
            ]
            for key, n in precision.PLAN_EXTRAS
            if any(n in layout for layout in layouts)
        }
        c.outs = []
        if self._copy_out:
            outs = [self._copy_out.get(id(p)) for p in params]
            c.outs = [(o, o.data_ptr(), o.shape) for o in outs if o is not None]
            if any(o is not None for o in outs):
                extras["outs"] = [
                    None if o is None else _view(o, perm) for o, perm in zip(outs, perms)
                ]
        first = sum(len(g["params"]) for g in self.param_groups[:gi])
        try:
            planned = [i for i, n in enumerate(c.names) if n not in shaped]
            plan = _core.Plan(
                pviews,
                labels,
                [c.names[i] for i in planned],
                [sviews[i] for i in planned],
                **extras,
                ids=[first + i for i in positions],
                qmaps=[c.qmaps[i] for i in planned],
            )
            if c.hp.get(precision.ROUNDING, "nearest") != "nearest":
                plan.set_rounding(c.hp[precision.ROUNDING], int(c.hp[precision.SEED]))
            self._transformed = True  # (a new plan: identity, which the next step may change)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
        c.extras, c.ids = extras, [first + i for i in positions]
        c.params, c.labels, c.perms, c.pviews, c.sviews = params, labels, perms, pviews, sviews
        c.contiguous = all(perm is None for perm in perms)
        c.scalars = scalars
        c.fresh = [
            frozenset(
                n for n in c.names if n in self.state[p] and id(self.state[p][n]) in self._fresh
            )
            for p in params
        ]
        c.any_fresh = any(c.fresh)
        c.written = list(params)
        c.plan, c.bound = plan, False
        c.local = any(hasattr(p, "_local_tensor") for p in params)
        if (
            _FAST and not c.local
        ):  # what the fast path checks (bind_torch): each state tensor's memory
            # (one check per scalar buffer for its 0-d views: they move with it), and that each
            # buffer holds one value
            watched = [
                v
                for p in params
                for n, v in self.state.get(p, {}).items()
                if type(v) is torch.Tensor and n not in packed  # (what describe takes)
            ]
            plan.watch_torch(watched + buffers, list(scalars.values()))
        self._state_snapshot = None  # (state created or replaced)
        c.last_refs, c.last_ptrs = [], []
        c.sig = self._sig(params, c.local)

    def _refuse_shards(
        self, params: list[torch.Tensor], labels: list[str], layouts: list[dict[str, str]]
    ) -> None:
        """ValueError (before any state is made) for what needs each whole parameter while a
        DTensor (FSDP2) parameter holds a shard of it: a trust ratio's norms, an update that
        is not element-wise (Muon's orthogonalisation, Adafactor's factored moments, LBFGS's
        directions over all the parameters: a shard's would silently differ from the
        unsharded run's), and quantized state, whose blocks and 4096-element rule follow whole
        parameters (a shard's would differ, and its scales would not form one tensor)."""
        name, defn = type(self).__name__, self._definition
        for p, label, layout in zip(params, labels, layouts):
            if not hasattr(p, "_local_tensor"):
                continue
            if defn.per_tensor:
                raise ValueError(
                    f"{name}: param {label}: a trust ratio needs each whole parameter's norms; "
                    "DTensor (FSDP2) parameters hold shards of them (not supported)"
                )
            if defn.host is not None:
                whole = "all the parameters" if defn.host.closure else "each whole parameter"
                raise ValueError(
                    f"{name}: param {label}: the update is not element-wise (it needs {whole}); "
                    "DTensor (FSDP2) parameters hold shards of them (not supported)"
                )
            kinds = sorted({k for k in layout.values() if k in precision.QUANT_KINDS})
            if kinds:
                raise ValueError(
                    f"{name}: param {label}: state_dtype {kinds[0]!r} quantizes whole "
                    "parameters (blocks, and the 4096-element rule), and a DTensor (FSDP2) "
                    "parameter holds a shard of one (not supported; 'bfloat16' state is)"
                )

    # ------------------------------------------------------------------ gradients and plans
    def _grad_view(self, c: _Cache, i: int, g: Any) -> np.ndarray:
        """A C-contiguous NumPy view of gradient `g` of parameter `i` in the parameter's memory
        order, after checking it; a copy in the parameter's layout if it is laid out
        differently (a gradient is only read: nothing is lost)."""
        name, label, p = type(self).__name__, c.labels[i], c.params[i]
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{name}: grad of param {label} is a {type(g).__name__}")
        if g.layout != torch.strided:
            if g.layout == torch.sparse_coo and self._definition.rows is not None:
                raise _SparseGrad  # (step() takes the sparse path)
            raise RuntimeError(
                f"{name} does not support sparse gradients (grad of param {label} has layout "
                f"{g.layout}); as torch.optim, only SGD, Adagrad and SparseAdam take sparse COO "
                "gradients"
            )
        # float64 parameters take float64 gradients; the others float32/bfloat16/float16 ones;
        # complex parameters their own dtype
        kind_ok = (
            g.dtype in _FLOATS
            and p.dtype in _FLOATS
            and (g.dtype == torch.float64) == (p.dtype == torch.float64)
        ) or (g.dtype == p.dtype and g.dtype in _COMPLEX)
        if g.device != p.device or not kind_ok or g.shape != p.shape:
            raise (ValueError if g.shape != p.shape else TypeError)(
                f"{name}: grad of param {label} ({g.dtype}, {tuple(g.shape)}, {g.device}) "
                f"does not match the parameter ({p.dtype}, {tuple(p.shape)}, {p.device})"
            )
        g = g.detach().resolve_conj().resolve_neg()
        if not _in_layout(g, c.perms[i]):
            copy = torch.empty_like(p, dtype=g.dtype)
            copy.copy_(g)
            g = copy
        return _view(g, c.perms[i])

    def _bind(self, c: _Cache, plan: Any, grads: list[torch.Tensor], sel: Any) -> bool:
        """Bind the gradients `grads[sel]` to `plan` (validated by it; nothing is modified if
        one is rejected); a gradient that shares memory with another one is bound as a copy
        (the plan refuses overlapping arrays; gradients are only read).  Whether the plan is
        bound to some copy (which a later step must not reuse: the gradient may change)."""
        chosen = range(len(grads)) if sel is None else sel
        if not c.local:  # the common case: DLPack capsules, checked by the plan
            try:
                perms = c.perms
                gl = [grads[i] if perms[i] is None else _memory_order(grads[i], perms[i])
                      for i in chosen]  # fmt: skip
                if not any(map(_is_neg, gl)):  # (a negative view's memory holds -g)
                    plan.bind_grads(list(map(_to_dlpack, gl)))
                    return False
            except (RuntimeError, TypeError, ValueError):
                pass
        given = [grads[i] for i in chosen]
        shared = _shared(given)
        if shared:
            given = [g.detach().clone() if k in shared else g for k, g in enumerate(given)]
        views = [self._grad_view(c, i, g) for i, g in zip(chosen, given)]
        try:
            plan.bind_grads(views)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{type(self).__name__}: {e}") from None
        # (a view elsewhere than its gradient's memory is a copy: another layout, a negative
        # or conjugate view resolved, or shared memory)
        return any(
            v.ctypes.data != _local_ptr(g) for v, g in zip(views, (grads[i] for i in chosen))
        )

    def _same_grads(self, c: _Cache, grads: list[torch.Tensor]) -> bool:
        """Whether `grads` are the tensors (and storages) of the previous step."""
        return (
            len(c.last_refs) == len(grads)
            and all(r() is g for r, g in zip(c.last_refs, grads))
            and c.last_ptrs == list(map(_local_ptr if c.local else _data_ptr, grads))
        )

    def _buckets(self, c: _Cache) -> list[list[int] | None]:
        """The parameters that can share one compiled call: same scalars (``step``...) and
        same fresh state.  ``[None]`` (all of them) in the common case."""
        n = len(c.params)
        if (
            n == 1
            or self._definition.host is not None
            or (
                not (c.any_fresh and len(set(c.fresh)) > 1)
                and all(a.min() == a.max() for a in c.scalars.values())
            )
        ):
            return _ALL
        keys: dict[tuple[Any, ...], list[int]] = {}
        for i in range(n):
            key = (*(float(a[i]) for a in c.scalars.values()), c.fresh[i])
            keys.setdefault(key, []).append(i)
        return list(keys.values())

    def _prepare(self, gi: int, group: dict[str, Any], fast: bool) -> tuple[Any, ...] | None:
        """Validate group `gi` for a step and bind its gradients; touches no element.  `fast`:
        nothing replaced any state since the last step (the fast path may be tried)."""
        c = self._cache(gi, group)
        if c.mastered and sum(map(_VERSION, c.mparams)) != c.mtotal:
            # a parameter changed in place since it was last seen: its master follows
            assert c.hp is not None  # (built)
            now = list(map(_VERSION, c.mparams))
            if self._followed is not None:  # (put back if the step is refused)
                self._followed.append((c, c.mversions, c.msteps, c.mtotal))
            for (p, master), v, was in zip(c.mastered, now, c.mversions):
                if v != was + c.msteps:
                    self._follow(p, master, c.follows_stochastic())
            c.mversions, c.msteps, c.mtotal = now, 0, sum(now)
        if c.outs and any(o.data_ptr() != at or o.shape != shape for o, at, shape in c.outs):
            c.sig, c.fast = None, False  # a copy-out's storage was replaced: take it again
        if fast and c.fast and c.plan.bind_torch(group["params"]):
            c.bound = True
            return c, _ALL, [c.plan], False
        with torch.no_grad():  # (state may be created or copied)
            return self._prepare_general(c, gi, group)

    def _prepare_general(self, c: _Cache, gi: int, group: dict[str, Any]) -> tuple[Any, ...] | None:
        """:meth:`_prepare` when the fast path does not apply: every check in Python."""
        params, grads = [], []
        for p in group["params"]:
            g = p.grad
            if g is not None:
                params.append(p)
                grads.append(g)
        if not params:
            return None
        if c.sig is None or self._sig(params, c.local) != c.sig:
            self._build(c, gi, params)
        same = self._same_grads(c, grads)
        buckets = self._buckets(c)
        copied = False  # some gradient bound as a copy: the next step binds them again
        if buckets is _ALL:
            if not (same and c.bound):
                copied = self._bind(c, c.plan, grads, None)
                c.bound = True
            plans = [c.plan]
        else:  # rare: separate plans, not kept
            plans = []
            for sel in buckets:
                assert sel is not None
                plan = _core.Plan(
                    [c.pviews[i] for i in sel],
                    [c.labels[i] for i in sel],
                    list(c.names),
                    [[s[i] for i in sel] for s in c.sviews],
                    **{k: [v[i] for i in sel] for k, v in c.extras.items()},
                    ids=[c.ids[i] for i in sel],
                    qmaps=c.qmaps,
                )
                plan.set_rounding(c.plan.rounding, c.plan.seed)
                copied = self._bind(c, plan, grads, sel) or copied
                plans.append(plan)
            self._transformed = True
        if not same:
            c.last_refs = [weakref.ref(g) for g in grads]
            c.last_ptrs = list(map(_local_ptr if c.local else _data_ptr, grads))
        same = same and not copied  # (not: the plan forgets the copies after the step)
        assert c.hp is not None
        decay = c.hp.get(precision.EMA_DECAY)
        if decay is not None:
            for plan in plans:
                if plan.ema_decay != decay:
                    plan.set_ema_decay(float(decay))
        # The next step may try the fast path: one plan, no fresh state, plain tensors.
        c.fast = _FAST and buckets is _ALL and not c.any_fresh and not c.local
        return c, buckets, plans, same

    # ------------------------------------------------------------------ the step
    def _advance(self, c: _Cache, sel: list[int] | None, hyper: Any) -> int:
        """Advance the scalars of the parameters `sel` (all if None) as torch does before its
        update; the kernel's step number.  A running product (NAdam's ``mu_product``) is
        multiplied by the definition's factor in the dtype of its tensor, and the kernel is
        given that product divided by the factor (it multiplies by the factor itself), so the
        coefficients match torch's whatever the precision of torch's default dtype."""
        steps = c.scalars.get("step")
        if steps is None:
            return 1
        if sel is None:  # (all equal: one bucket) x + 1 rounded to the buffer's dtype, as torch
            # (and the stored count is the step number, as torch's: a float32 count stops at
            # 2^24, torch.optim's too)
            steps.fill(steps.item(0) + 1)
            step = int(steps.item(0))
        else:
            steps[sel] += 1
            step = int(steps[sel[0]])
        factor = self._definition.torch_scalar_factor
        if factor is not None:
            assert c.hp is not None
            first = 0 if sel is None else sel[0]
            raw = factor(c.group, float(steps[first]))
            if isinstance(raw, torch.Tensor):  # (float() of one that requires grad warns)
                raw = raw.detach()
            f = float(raw)
            # torch multiplies in the product's dtype by a float, in the wider of the two
            # dtypes by a tensor (float64 ``betas``: a float32 product times the float64
            # factor, rounded once)
            wide = isinstance(raw, torch.Tensor) and raw.dtype == torch.float64
            for name, _ in self._definition.scalars:
                prod = c.scalars[name]
                at = ... if sel is None else sel
                if wide:  # (float64 named: NumPy 1 multiplies by a scalar in the array's dtype)
                    prod[at] = np.multiply(prod[at], f, dtype=np.float64)
                else:
                    prod[at] *= prod.dtype.type(f)
                setattr(hyper, name, float(prod[first]) / f if f != 0 else 0.0)
        after = self._definition.torch_scalar_next
        if after is not None:  # the kernel uses the stored values; then torch's next ones
            assert c.hp is not None
            first = 0 if sel is None else sel[0]
            for name, exact in after(c.hp, float(steps[first])).items():
                value = _as_default_dtype(exact)
                buf = c.scalars[name]
                setattr(hyper, name, float(buf[first]))
                if sel is None:
                    buf[...] = value
                else:
                    buf[sel] = value
        return step

    def _run_host(self, c: _Cache) -> None:
        """A host definition's step (Muon): its NumPy update on views of the tensors in their
        logical shapes (a transposed parameter's view is the transposed memory)."""
        host = self._definition.host
        assert host is not None and host.update is not None and c.hp is not None

        def logical(a: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
            return a if perm is None else np.transpose(a, np.argsort(perm))

        params = [logical(v, perm) for v, perm in zip(c.pviews, c.perms)]
        grads = [logical(self._grad_view(c, i, p.grad), c.perms[i]) for i, p in enumerate(c.params)]
        shaped = self._definition.shaped
        states = {
            n: [v if n in shaped else logical(v, perm) for v, perm in zip(views, c.perms)]
            for n, views in zip(c.names, c.sviews)
        }
        hp = c.hp
        tensors = {k: _name(v.dtype) for k, v in c.group.items() if isinstance(v, torch.Tensor)}
        if tensors:  # (torch computes with a tensor hyper-parameter in its dtype)
            hp = {**hp, host_tensors: tensors}
        steps = c.scalars.get("step")
        if steps is None:
            host.update(hp, params, grads, states, 1)
            return
        # torch's per-parameter step (Adafactor's schedules read it), counted before the update
        steps += 1
        host.update(hp, params, grads, states, [float(t) for t in steps])

    def _run_all(self, items: list[tuple[Any, ...]]) -> None:
        """Every group's update in one compiled call (:func:`~fastoptim.engine.optimizer.
        run_compiled`): an interrupt (Ctrl-C) can only surface before it (the scalars advanced
        for it are then put back: nothing happened) or after it (the whole step happened: its
        bookkeeping is completed).  Gradients that were not those of the previous step are
        probably new every step (``zero_grad(set_to_none=True)``): the plans forget them."""
        plans, hypers, numbers, release = [], [], [], []
        saved: list[tuple[np.ndarray, Any]] = []  # each scalar buffer, its values before
        for c, buckets, group_plans, same_grads in items:
            one = buckets is _ALL  # (then each buffer holds one value)
            saved += [(a, a.item(0) if one else a.copy()) for a in c.scalars.values()]
            for sel, plan in zip(buckets, group_plans):
                hyper = c.hyper
                if c.any_fresh or not one:  # (each bucket's scalars: its own struct)
                    assert c.hp is not None
                    hyper = self._definition.compile(c.hp, c.fresh[0 if sel is None else sel[0]])
                plans.append(plan)
                hypers.append(hyper)
                numbers.append(self._advance(c, sel, hyper))
                release.append(not same_grads)

        def undo() -> None:
            for a, old in saved:
                a[...] = old

        run_compiled(
            self._core_step,
            self._core_steps,
            plans,
            hypers,
            numbers,
            release,
            lambda: self._after_run(items),
            undo,
        )

    def _check_steps(self, c: _Cache, steps: np.ndarray, one: bool) -> None:
        """ValueError naming the first parameter of `c` whose ``step`` (as packed for the
        kernel; `one`: all equal, as in one bucket of a compiled step) is not a whole number
        from 0 to 2**53 - 1: a negative one was refused by the kernel after the other buckets'
        updates had run, a NaN one after the other counters had advanced, a fraction (2.5) was
        stepped as its whole part."""
        if one:
            v = steps.item(0)
            if 0 <= v < 2**53 and v == math.floor(v):
                return
            bad = np.zeros(steps.shape, bool)
            bad[0] = True
        else:
            with np.errstate(invalid="ignore"):
                bad = ~((steps >= 0) & (steps < 2**53) & (steps == np.floor(steps)))
            if not bad.any():
                return
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{type(self).__name__}.step: param {c.labels[i]}: its state's step is "
            f"{steps.item(i)!r}; a step count is a whole number from 0 to 2**53 - 1"
        )

    def _after_run(self, items: list[tuple[Any, ...]]) -> None:
        """The bookkeeping of a step that happened: fresh state used, the plans that forgot
        their gradients marked so, the step counted and the schedules' values for the next
        step, then the written tensors' autograd versions bumped (last: an interrupt arriving
        in this Python work must not find the step done but not counted, and the bumps are the
        longest part of it)."""
        for c, _, _, same_grads in items:
            self._used_fresh(c)
            if not same_grads:
                c.bound = False
        try:
            self._advance_schedules()
        finally:
            for c, *_ in items:
                _bump_written(c)

    def _run(self, c: _Cache, buckets: list[list[int] | None], plans: list[Any]) -> None:
        """A host definition's step (Muon), group by group."""
        self._run_host(c)
        _bump_written(c)
        self._used_fresh(c)

    def _used_fresh(self, c: _Cache) -> None:
        if c.any_fresh:
            for p, fresh in zip(c.params, c.fresh):
                for n in fresh:
                    self._fresh.pop(id(self.state[p][n]), None)
            c.fresh = [frozenset()] * len(c.params)
            c.any_fresh = False

    def _transform(self, work: list[tuple[Any, ...] | None]) -> bool:
        """Decide and set this step's gradient transforms (GradScaler's ``grad_scale`` and
        ``found_inf``, the groups' clipping options); True if the step is skipped.  Touches
        no element."""
        # (what GradScaler sets on the instance for one step, and deletes after it; read from
        # the instance dict: a failed attribute lookup costs a caught exception)
        scale_t, found_t = self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")
        # With reduce_grad_stats every process must reduce, even one whose clipping or
        # skipping groups have no gradient this step (no parameters in its shard, grad None):
        # their options, with no plans, join the decision.
        shared = (
            [
                {k: g.get(k) for k in (transforms.MAX_GRAD_NORM, transforms.SKIP_NONFINITE)}
                for gi, g in enumerate(self.param_groups)
                if (gi >= len(work) or work[gi] is None)
                and (
                    g.get(transforms.MAX_GRAD_NORM) is not None or g.get(transforms.SKIP_NONFINITE)
                )
            ]
            if self.reduce_grad_stats is not None
            else []
        )
        if scale_t is None and found_t is None and not self._transformed and not shared:
            if not any(item is not None and item[0].transforming for item in work):
                if self.grad_norm is not None or self.step_skipped:
                    self.grad_norm, self.step_skipped = None, False
                return False
        items = [item for item in work if item is not None]
        hps = [item[0].hp for item in items] + shared
        name = f"{type(self).__name__}.step"
        found = found_t is not None and float(found_t) != 0.0
        # (a skipped step takes any scale: GradScaler halves it at every skip, past any range)
        scale = (
            None if scale_t is None or found else transforms.check_grad_scale(name, float(scale_t))
        )
        plans = [item[2] for item in items] + [[] for _ in shared]
        decision = transforms.decide(plans, hps, scale, found, self.reduce_grad_stats)
        self.grad_norm, self.step_skipped = decision.norm, decision.skip
        if decision.skip:
            self._transformed = True  # (the plans may hold the statistics pass's transform)
            return True
        for group_plans, t in zip(plans, decision.transforms):
            for plan in group_plans:
                transforms.set_transform(plan, *t)
        self._transformed = any(t != (1.0, math.inf) for t in decision.transforms)
        return False

    def ema_weights(self) -> contextlib.AbstractContextManager[None]:
        pairs = [
            (p, self.state[p][precision.EMA])
            for group in self.param_groups
            for p in group["params"]
            if precision.EMA in self.state.get(p, {})
        ]

        def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
            with torch.no_grad():
                dst.copy_(src)

        return transforms.ema_swapped(
            self,
            f"{type(self).__name__}.ema_weights",
            pairs,
            copy,
            lambda p: p.detach().clone(),
        )

    ema_weights.__doc__ = transforms.EMA_WEIGHTS_DOC

    # ------------------------------------------------------------------ sparse gradients
    def _step_sparse(self) -> None:
        """A step in which some gradients are sparse COO tensors (SGD, Adagrad, SparseAdam):
        their rows are updated by the compiled row kernel (engine.sparse), the dense gradients
        by the usual path; SGD with momentum computes a sparse gradient densely (torch's
        momentum buffer decays every row).  Everything is validated before any tensor is
        modified; refusals are torch's (RuntimeError)."""
        name = type(self).__name__
        jobs: list[tuple[Any, ...]] = []
        swapped: list[tuple[torch.Tensor, torch.Tensor]] = []  # p, its sparse grad
        dense_of: list[tuple[torch.Tensor, torch.Tensor]] = []  # p, a dense copy of its grad
        for gi, group in enumerate(self.param_groups):
            c = self._cache(gi, group)
            assert c.hp is not None
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                label = self._label(group, gi, i)
                if g.layout == torch.strided:
                    if self._definition.torch_sparse_only:
                        raise RuntimeError(  # (torch's message)
                            "SparseAdam does not support dense gradients, please consider Adam "
                            f"instead (grad of param {label})"
                        )
                    continue
                if g.layout != torch.sparse_coo:
                    raise RuntimeError(
                        f"{name}: grad of param {label} has layout {g.layout}; sparse gradients "
                        "must be COO (torch.sparse_coo_tensor)"
                    )
                if group.get("fused"):
                    raise RuntimeError(f"{name}: `fused` does not support sparse gradients")
                assert self._definition.rows is not None
                problem = self._definition.rows(c.hp)
                if (
                    problem
                    and self._definition.rows_dense is not None
                    and (self._definition.rows_dense(c.hp))
                ):
                    self._check_sparse_grad(p, g, label)
                    dense_of.append((p, g.to_dense()))
                    continue
                if problem:
                    raise RuntimeError(f"{name}: {problem}")
                try:
                    sparse.check_group(self._definition, f"{name}.step", c.hp)
                except ValueError as e:
                    raise RuntimeError(str(e)) from None
                jobs.append((c, p, g, label))
                swapped.append((p, g))
        rows = [self._row_job(c, p, g, label) for c, p, g, label in jobs]
        # The dense remainder: the sparse gradients hidden (SGD with momentum: densified).
        for p, _ in swapped:
            p.grad = None
        for p, d in dense_of:
            sparse_grad = p.grad
            assert sparse_grad is not None
            swapped.append((p, sparse_grad))
            p.grad = d
        try:
            work = [self._prepare(gi, group, False) for gi, group in enumerate(self.param_groups)]
        finally:
            for p, g in swapped:
                p.grad = g
        if any(item is not None and item[0].transforming for item in work) and rows:
            raise RuntimeError(
                f"{name}: sparse gradients with max_grad_norm / max_grad_value / "
                "skip_nonfinite are not supported"
            )
        if self._transform(work):  # skipped
            self._undo_step()
            return
        self._created = None  # (committed: the step runs)
        scale_t = self.__dict__.get("grad_scale")  # (GradScaler's, checked by _transform)
        if scale_t is not None and rows:  # the rows unscaled as the kernels unscale the rest
            rows = [
                r._replace(rows=np.multiply(r.rows, r.rows.dtype.type(1.0 / float(scale_t))))
                for r in rows
            ]
        # Every parameter's rows in one compiled call that checks them all before it writes
        # any (never a half-applied step), then the step counts.
        counts = []
        for r in rows:
            step = r.state.get("step")  # (SGD keeps none: its update does not depend on it)
            if isinstance(step, torch.Tensor):  # x + 1 in the count's dtype, as torch
                counts.append(int((step.detach().cpu().reshape(()) + 1).item()))
            else:
                counts.append(1 if step is None else int(float(step)) + 1)

        def counted() -> None:
            for r, count in zip(rows, counts):
                step = r.state.get("step")
                if isinstance(step, torch.Tensor):
                    step.fill_(count)
                elif step is not None:  # (torch's SparseAdam keeps a Python int)
                    r.state["step"] = count
                for n in r.hyper.state_names():
                    self._fresh.pop(id(r.state[n]), None)
            _bump([p for _, p, _, _ in jobs])

        run_rows(
            self._definition.core_rows,
            [
                (r.hyper, count, r.param, r.indices, r.rows, r.states, r.label)
                for r, count in zip(rows, counts)
            ],
            counted,
        )
        items = [item for item in work if item is not None]
        self._run_all(items)  # (advances the schedules)

    def _check_sparse_grad(self, p: torch.Tensor, g: torch.Tensor, label: str) -> None:
        """Sparse gradient `g` of `p`: its dtype, device and shape, and its indices in range
        (torch does not check a sparse tensor's indices by default; the row kernel and
        ``to_dense`` would write outside the tensor)."""
        name = type(self).__name__
        if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
            raise (ValueError if g.shape != p.shape else TypeError)(
                f"{name}: sparse grad of param {label} ({g.dtype}, {tuple(g.shape)}, "
                f"{g.device}) does not match the parameter ({p.dtype}, {tuple(p.shape)}, "
                f"{p.device})"
            )
        indices = g._indices().numpy()
        for d in range(g.sparse_dim()):
            bad = (indices[d] < 0) | (indices[d] >= g.shape[d])
            if bad.any():
                raise IndexError(
                    f"{name}: param {label}: its sparse gradient's index {indices[d][bad][0]} is "
                    f"out of range for dimension {d} of size {g.shape[d]}"
                )

    def _row_job(self, c: _Cache, p: torch.Tensor, g: torch.Tensor, label: str) -> _RowJob:
        """Check parameter `p` and its sparse gradient `g`, create or lay out its state, and
        return its row update: coalesced row indices into the parameter's memory and the
        gradient rows (for a parameter laid out otherwise than contiguously: one element per
        row, at its memory offset).  Touches no element of `p` or of its state."""
        name = type(self).__name__
        assert c.hp is not None
        perm = self._check_param(p, label)
        self._check_sparse_grad(p, g, label)
        kind = _name(p.dtype)
        if kind not in (*precision.FLOAT32_FAMILY, "float64"):
            raise TypeError(
                f"{name}: param {label} has dtype {p.dtype}; sparse gradients update "
                "floating-point parameters"
            )
        layout = precision.buffers(c.hp, kind, c.names, p.numel())
        sparse.check_param(
            f"{name}: param {label}: sparse gradients",
            kind,
            [layout[n] for n in c.names],
            c.hp.get(precision.ROUNDING),
        )
        g = g.detach()
        if kind in precision.LOW:  # (computed in float32, duplicates summed in float32 too:
            g = g.float()  # as the rows of a NumPy row update)
        g = g.coalesce()  # (torch's own sum of duplicates, indices sorted)
        indices = g._indices().numpy()
        values = g._values().contiguous()
        sd = g.sparse_dim()
        shape = tuple(p.shape)
        state = self._state_to_create(p)
        self._init_scalars(state, c.hp)
        for n in c.names:
            s = state.get(n)
            dtype = _TORCH_DTYPES[layout[n]]
            if s is None:
                state[n] = self._new_state(p, n, c.hp, dtype)
            elif not isinstance(s, torch.Tensor) or s.shape != p.shape:
                raise ValueError(
                    f"{name}: state {n!r} of param {label} is not a tensor of the parameter's "
                    f"shape {tuple(p.shape)}"
                )
            elif s.dtype != dtype or s.device != p.device or not _in_layout(s, perm):
                moved = torch.empty_like(p, dtype=dtype)
                moved.copy_(s)
                state[n] = moved
        if perm is None:
            nrows = int(np.prod(shape[:sd], dtype=np.int64))
            width = int(np.prod(shape[sd:], dtype=np.int64))
            index = np.ascontiguousarray(
                np.ravel_multi_index(tuple(indices), shape[:sd])
                if sd
                else np.zeros(indices.shape[1], np.int64),
                dtype=np.int64,
            )
            rows = np.ascontiguousarray(_numpy_of(values).reshape(len(index), width))

            def flat(t: torch.Tensor) -> np.ndarray:
                return _view(t, None).reshape(nrows, width)
        else:  # one element per row, at its offset in memory (the update is element-wise)
            stride = np.array(p.stride(), dtype=np.int64)
            base = indices.T.astype(np.int64) @ stride[:sd]
            nd = len(shape) - sd  # dense dimensions of the gradient's values
            grid = (
                np.indices(shape[sd:], dtype=np.int64).reshape(nd, -1).T @ stride[sd:]
                if nd
                else np.zeros(1, np.int64)
            )
            offsets = (base[:, None] + grid[None, :]).reshape(-1)
            order = np.argsort(offsets, kind="stable")
            index = np.ascontiguousarray(offsets[order])
            rows = np.ascontiguousarray(_numpy_of(values).reshape(-1)[order].reshape(-1, 1))

            def flat(t: torch.Tensor) -> np.ndarray:
                return _view(t, perm).reshape(-1, 1)

        states = [flat(state[n]) for n in c.names]
        hyper = self._definition.compile(c.hp, frozenset())
        return _RowJob(hyper, state, flat(p), index, rows, states, label)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @_hooked
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter that has a gradient, in place (``closure``: re-evaluates the
        model and returns the loss, as in torch).  Every group is validated and its gradients
        bound before any tensor is modified: a step that raises changes nothing."""
        return self._step(closure)

    def _step(self, closure: Callable[[], float] | None) -> float | None:
        """:meth:`step` without torch's hooks (see :func:`_hooked`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # (No torch.no_grad() around it all, which costs microseconds: the fast path runs no
        # torch operation; the general path and the host steps run under it.)
        with self._lock:
            self._created, self._followed = {}, []
            try:
                self._step_locked()
            except BaseException:  # (a refused step may have bound some groups' gradients)
                self._undo_step()
                raise
            finally:
                self._created = self._followed = None
        return loss

    def _undo_step(self) -> None:
        """What a step that does not run (skipped or refused) did before it stopped, undone:
        gradients bound, state created or converted, masters followed."""
        self._unbind()
        self._forget_created()
        self._unfollow()

    def _follow(self, p: torch.Tensor, master: torch.Tensor, stochastic: bool) -> None:
        """:func:`_follow`, its master's values kept to be put back if the step is refused
        (they followed a parameter re-pointed in a way the step then refuses)."""
        if self._followed is not None:
            self._followed.append((master, master.clone()))
        _follow(p, master, stochastic)

    def _unfollow(self) -> None:
        """Put back the masters (and the versions read) that a refused step made follow their
        parameters: the next step compares them again."""
        followed, self._followed = self._followed, None
        for entry in reversed(followed or ()):
            if isinstance(entry[0], _Cache):
                c, c.mversions, c.msteps, c.mtotal = entry
            else:
                with torch.no_grad():
                    entry[0].copy_(entry[1])

    def _unbind(self) -> None:
        """Forget the gradients bound for a step that did not run (skipped by GradScaler or
        ``skip_nonfinite``, or refused after some groups bound theirs): the plans must not
        keep them alive until the next step (``zero_grad(set_to_none=True)`` frees them)."""
        for c in self._caches:
            if c.bound:
                c.plan.release_grads()
                c.bound = False

    def _step_locked(self) -> None:
        """:meth:`_step` after the closure, with the lock held."""
        if len(self._caches) > len(self.param_groups):  # groups removed: their tensors go
            del self._caches[len(self.param_groups) :]
        if self._ema_swapped:
            transforms.check_not_swapped(self, f"{type(self).__name__}.step")
        if self._definition.torch_sparse_only:
            with torch.no_grad():
                self._step_sparse()
            return
        snap = self._state_snapshot
        fast = snap is not None and snap.same(self.state)
        try:
            work = [self._prepare(gi, g, fast) for gi, g in enumerate(self.param_groups)]
        except _SparseGrad:
            with torch.no_grad():
                self._step_sparse()
            return
        if _FAST and (not fast or self._state_snapshot is None):
            self._record_state()
        if self._transform(work):  # skipped: nothing changes, nothing advances
            self._undo_step()
            return
        items = [item for item in work if item is not None]
        for c, buckets, *_ in items:  # (before any is advanced or run: a bad one runs none)
            steps = c.scalars.get("step")
            if steps is not None and steps.size:
                self._check_steps(c, steps, buckets is _ALL and self._definition.host is None)
        self._created = None  # (committed: the step runs)
        if self._definition.host is None:
            self._run_all(items)
            return
        with torch.no_grad():
            for c, buckets, plans, same_grads in items:
                self._run(c, buckets, plans)
                if not same_grads and c.bound:
                    c.plan.release_grads()
                    c.bound = False
        self._advance_schedules()

    def _record_state(self) -> None:
        """Remember the objects :attr:`state` holds (see :class:`_Cache`)."""
        try:
            self._state_snapshot = _core.Snapshot(self.state)
        except TypeError:  # not a dict: every step takes the general path
            self._state_snapshot = None


class ScheduleFreeOptimizer(Modes, Optimizer):
    """Base class of :class:`AdamWScheduleFree` and :class:`SGDScheduleFree`: the
    ``schedulefree`` package's train / eval modes and per-group state.

    Each parameter group holds, as the package's do, ``k`` (its step count), ``weight_sum``,
    ``lr_max``, ``scheduled_lr`` (the last step's warmed-up lr, for logging) and
    ``train_mode``; the parameters' state is ``z`` (and ``exp_avg_sq``).  ``eval()`` moves
    the parameters in place to the average x, ``train()`` back to y; :meth:`step` in eval
    mode raises ``RuntimeError``."""

    # The package's per-group entries and their initial values (but train_mode: the package
    # starts in eval mode and requires train() first; fastoptim starts in train mode).
    _GROUP_STATE: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("k", 0),
        ("train_mode", True),
        ("weight_sum", 0.0),
        ("lr_max", -1.0),
        ("scheduled_lr", 0.0),
        ("foreach", None),  # (the package's option, read by its step: for its loads)
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._scalars = ()  # no per-parameter scalar tensors: the group holds them

    def _scalars_of(self, hp: Mapping[str, Any]) -> tuple[tuple[str, float | str], ...]:
        return ()  # (stochastic rounding is keyed on the group's k)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for k, v in self._GROUP_STATE:
            param_group.setdefault(k, v)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self._GROUP_STATE:
                group.setdefault(k, v)

    @property
    def training(self) -> bool:
        """True in train mode (the parameters hold y), False in eval mode (x)."""
        return all(bool(g["train_mode"]) for g in self.param_groups)

    def _set_mode(self, train: bool) -> None:
        with torch.no_grad(), self._lock:
            work = []  # everything checked and built before any parameter moves
            for gi, group in enumerate(self.param_groups):
                if bool(group["train_mode"]) == train:
                    continue
                params = [p for p in group["params"] if "z" in self.state.get(p, ())]
                if not params:
                    continue
                c = self._cache(gi, group)
                if c.sig is None or self._sig(params, c.local) != c.sig:
                    self._build(c, gi, params)
                assert c.hp is not None
                plan = _core.Plan(c.pviews, c.labels, [], [], **c.extras, ids=c.ids)
                if c.hp[precision.ROUNDING] != "nearest":
                    plan.set_rounding(c.hp[precision.ROUNDING], int(c.hp[precision.SEED]))
                beta = c.hp["betas"][0] if "betas" in c.hp else c.hp["momentum"]
                h = self._definition.hyper_type()
                h.swap, h.swap_weight = True, swap_weight(float(beta), train)
                key = SWAP_KEY + 2 * int(group["k"]) + (1 if train else 0)
                work.append((plan, h, key, c.sviews[c.names.index("z")]))
            for plan, h, key, zs in work:
                self._core_step(plan, h, key, zs, True)
            _bump([p for group in self.param_groups for p in group["params"]])
            for group in self.param_groups:
                group["train_mode"] = train

    def _advance(self, c: _Cache, sel: list[int] | None, hyper: Any) -> int:
        """The group's running scalars for the kernel, and its step number ``k + 1``."""
        group = c.group
        hyper.weight_sum = float(group["weight_sum"])
        hyper.lr_max = float(group["lr_max"])
        return int(group["k"]) + 1

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @_hooked
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """As :meth:`Optimizer.step`; raises ``RuntimeError`` in eval mode (call ``train()``
        first), changing nothing.  Every group's ``k``, ``weight_sum``, ``lr_max`` and
        ``scheduled_lr`` advance, as in the package (also groups without gradients)."""
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step: the optimizer is in eval mode (the parameters "
                "hold the averaged iterate x); call train() before step()"
            )
        with self._lock:
            self._sync_all()
            after = []
            for group in self.param_groups:
                self._validate(group)  # (lr=None: "lr must be a number", not float()'s words)
                k = int(group["k"])
                hp = {n: _plain(group[n]) for n in ("lr", "warmup_steps", "r", "weight_lr_power")}
                try:
                    lr, _, weight_sum, lr_max = _defs.schedule_free_average(
                        hp, k, float(group["weight_sum"]), float(group["lr_max"])
                    )
                except OverflowError:  # (Python's pow: "(34, 'Numerical result out of range')")
                    raise ValueError(
                        f"{type(self).__name__}.step: lr={hp['lr']!r}: the average's weight "
                        f"lr_max ** weight_lr_power ({hp['weight_lr_power']!r}) overflows a float"
                    ) from None
                after.append((k + 1, weight_sum, lr_max, lr))
        loss = self._step(closure)
        if not self.step_skipped:  # (GradScaler's found_inf, skip_nonfinite: nothing advances)
            for group, (k, weight_sum, lr_max, lr) in zip(self.param_groups, after):
                group.update(k=k, weight_sum=weight_sum, lr_max=lr_max, scheduled_lr=lr)
        return loss


def _numpy_state(value: Any, views: dict[int, tuple[np.ndarray, torch.Tensor]]) -> Any:
    """torch's L-BFGS state as NumPy: tensors as views of their memory (0-d ones as NumPy
    scalars of their dtype), lists element by element; `views` records each view's tensor."""
    if isinstance(value, torch.Tensor):
        a = value.detach().numpy()
        if a.ndim == 0:
            return a[()]
        views[id(a)] = (a, value)
        return a
    if isinstance(value, list):
        return [_numpy_state(v, views) for v in value]
    return value


def _torch_state(value: Any, views: dict[int, tuple[np.ndarray, torch.Tensor]]) -> Any:
    """:func:`_numpy_state`'s inverse: a view it made as its tensor (a new tensor over the view
    would keep the view, which keeps the old tensor: a chain one link longer each step, never
    freed), other arrays as tensors sharing their memory, NumPy scalars as 0-d tensors (where
    torch keeps those)."""
    if isinstance(value, np.ndarray):
        made = views.get(id(value))
        return made[1] if made is not None and made[0] is value else torch.from_numpy(value)
    if isinstance(value, np.floating):
        return torch.tensor(value.item(), dtype=_TORCH_DTYPES[value.dtype.name])
    if isinstance(value, list):
        return [_torch_state(v, views) for v in value]
    return value


def _loss_value(loss: Any) -> float:
    """A closure's loss as a float (a tensor that requires grad: detached first)."""
    return float(loss.detach() if isinstance(loss, torch.Tensor) else loss)


class ClosureOptimizer(Optimizer):
    """Base of the drop-ins whose ``step(closure)`` evaluates the objective several times
    (:class:`LBFGS`): one parameter group, the whole group's state under its first parameter
    (torch's layout), the arithmetic of the definition's
    :class:`~fastoptim.engine.definition.Host` ``closure`` on NumPy views of the tensors."""

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        host = self._definition.host
        assert host is not None
        defaults = host.closure_defaults(defaults)
        super().__init__(params, defaults)

    def _one_group(self, groups: int) -> None:
        if groups != 1:
            raise ValueError(
                f"{type(self).__name__} doesn't support per-parameter options (parameter groups)"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The one parameter group (a second raises ValueError: torch's LBFGS takes it, then
        refuses every step)."""
        self._one_group(len(getattr(self, "param_groups", ())) + 1)
        super().add_param_group(param_group)

    @_hooked
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """One optimization step: `closure` (which zeroes the gradients, computes the loss,
        calls ``backward()`` and returns the loss) is called as often as the search needs;
        returns its first loss, as torch."""
        name = type(self).__name__
        if not callable(closure):
            raise TypeError(f"{name}.step: needs a closure, got {type(closure).__name__}")
        host = self._definition.host
        assert host is not None and host.closure is not None
        evaluate_closure = torch.enable_grad()(closure)
        self._one_group(len(self.param_groups))  # (a group appended to param_groups)
        group = self.param_groups[0]
        with torch.no_grad(), self._lock:
            c = self._cache(0, group)
            params = list(group["params"])
            labels = [self._label(group, 0, i) for i in range(len(params))]
            for p, label in zip(params, labels):
                self._check_param(p, label)
            self._refuse_shards(params, labels, [{} for _ in params])
            views = [_numpy_of(p.detach()) for p in params]  # (complex: real views, as torch)
            given = [(p.data_ptr(), p.shape, p.stride(), p.dtype) for p in params]

            def evaluate() -> tuple[Any, list[np.ndarray]]:
                loss = evaluate_closure()
                for i, p in enumerate(params):  # (the step writes through `views`)
                    if (p.data_ptr(), p.shape, p.stride(), p.dtype) != given[i]:
                        raise ValueError(
                            f"{name}.step: after the closure: param {self._label(group, 0, i)}"
                            " was given other memory or another layout (`.data =`, resize_) "
                            "during the step, which moves the parameters in place across its "
                            "evaluations; change it outside step()"
                        )
                grads = []
                for i, p in enumerate(params):
                    g = p.grad
                    if g is None:
                        grads.append(np.zeros_like(views[i]))
                        continue
                    if g.layout == torch.sparse_coo and g.dtype == p.dtype and g.shape == p.shape:
                        self._check_sparse_grad(p, g, self._label(group, 0, i))
                        g = g.to_dense()  # (as torch's _gather_flat_grad)
                    if g.layout != torch.strided or g.dtype != p.dtype or g.shape != p.shape:
                        raise TypeError(
                            f"{name}: grad of param {self._label(group, 0, i)} ({g.dtype}, "
                            f"{tuple(g.shape)}, {g.layout}) does not match the parameter"
                        )
                    grads.append(_numpy_of(g.detach().resolve_conj().resolve_neg()))
                return loss, grads

            state = self.state[params[0]]
            made: dict[int, tuple[np.ndarray, torch.Tensor]] = {}  # (the state's views)
            numpy_state = {k: _numpy_state(v, made) for k, v in state.items()}
            assert c.hp is not None
            try:
                objective = host_objective(views, evaluate, _loss_value)
                loss = host.closure(objective, numpy_state, c.hp)
            finally:  # (a step that raised: numpy_state as it was, and the state)
                torch_state = {k: _torch_state(v, made) for k, v in numpy_state.items()}
                state.clear()
                state.update(torch_state)
                _bump(params)
            self._advance_schedules()
        return loss


# ---- generated by fastoptim.engine.codegen from fastoptim.definitions: do not edit below


class SGD(Optimizer):
    """Drop-in :class:`torch.optim.SGD` (see :class:`fastoptim.SGD` for the update rule).
    State: ``momentum_buffer`` (when ``momentum != 0``), no ``step``, as in torch."""

    _definition = _defs.SGD

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        momentum: TorchValue = 0,
        dampening: TorchValue = 0,
        weight_decay: TorchValue = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        cautious: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Adagrad(Optimizer):
    """Drop-in :class:`torch.optim.Adagrad` (see :class:`fastoptim.Adagrad`).  State:
    ``step``, ``sum``; created for every parameter at construction, as torch does, and filled
    with the constructor's ``initial_accumulator_value`` (torch ignores a group's own)."""

    _definition = _defs.ADAGRAD

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.01,
        lr_decay: TorchValue = 0,
        weight_decay: TorchValue = 0,
        initial_accumulator_value: float = 0,
        eps: TorchValue = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class RMSprop(Optimizer):
    """Drop-in :class:`torch.optim.RMSprop` (see :class:`fastoptim.RMSprop`).
    State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered)."""

    _definition = _defs.RMSPROP

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.01,
        alpha: TorchValue = 0.99,
        eps: TorchValue = 1e-08,
        weight_decay: TorchValue = 0,
        momentum: TorchValue = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Adadelta(Optimizer):
    """Drop-in :class:`torch.optim.Adadelta` (see :class:`fastoptim.Adadelta`).  State:
    ``step``, ``square_avg``, ``acc_delta``."""

    _definition = _defs.ADADELTA

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 1.0,
        rho: TorchValue = 0.9,
        eps: TorchValue = 1e-06,
        weight_decay: TorchValue = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Adam(Optimizer):
    """Drop-in :class:`torch.optim.Adam` (see :class:`fastoptim.Adam`).
    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad)."""

    _definition = _defs.ADAM

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.999),
        eps: TorchValue = 1e-08,
        weight_decay: TorchValue = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        cautious: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class AdamW(Optimizer):
    """Drop-in :class:`torch.optim.AdamW` (see :class:`fastoptim.AdamW`).  State: as
    :class:`Adam`."""

    _definition = _defs.ADAMW

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.999),
        eps: TorchValue = 1e-08,
        weight_decay: TorchValue = 0.01,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        cautious: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Adamax(Optimizer):
    """Drop-in :class:`torch.optim.Adamax` (see :class:`fastoptim.Adamax`).
    State: ``step``, ``exp_avg``, ``exp_inf``."""

    _definition = _defs.ADAMAX

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.002,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.999),
        eps: TorchValue = 1e-08,
        weight_decay: TorchValue = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class NAdam(Optimizer):
    r"""Drop-in :class:`torch.optim.NAdam` (see :class:`fastoptim.NAdam`).
    State: ``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``.

    ``mu_product`` is advanced exactly as torch does (multiplied by :math:`\mu_t` in the
    dtype of the ``mu_product`` tensor) and the kernel is given that value, so that the
    coefficients match torch's whatever the precision of torch's default dtype."""

    _definition = _defs.NADAM

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.002,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.999),
        eps: TorchValue = 1e-08,
        weight_decay: TorchValue = 0,
        momentum_decay: TorchValue = 0.004,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        cautious: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class RAdam(Optimizer):
    """Drop-in :class:`torch.optim.RAdam` (see :class:`fastoptim.RAdam`).
    State: ``step``, ``exp_avg``, ``exp_avg_sq``."""

    _definition = _defs.RADAM

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.999),
        eps: TorchValue = 1e-08,
        weight_decay: TorchValue = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        cautious: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Lion(Optimizer):
    """Lion (Chen et al. 2023; see :class:`fastoptim.Lion`), which ``torch.optim`` lacks,
    with :class:`fastoptim.Lion`'s signature and defaults.  State: ``exp_avg`` (no ``step``: the
    update does not depend on it), as in the ``lion-pytorch`` package."""

    _definition = _defs.LION

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.0001,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.99),
        weight_decay: TorchValue = 0.0,
        *,
        maximize: bool = False,
        cautious: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Rprop(Optimizer):
    """Drop-in :class:`torch.optim.Rprop` (see :class:`fastoptim.Rprop`).  State:
    ``step``, ``prev``, ``step_size`` (filled with the group's ``lr`` at the first step, as in
    torch)."""

    _definition = _defs.RPROP

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.01,
        etas: tuple[TorchValue, TorchValue] = (0.5, 1.2),
        step_sizes: tuple[TorchValue, TorchValue] = (1e-06, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class ASGD(Optimizer):
    """Drop-in :class:`torch.optim.ASGD` (see :class:`fastoptim.ASGD`).  State:
    ``step``, ``eta``, ``mu``, ``ax``; ``eta`` and ``mu`` are computed after each step as torch does
    and kept in the dtype of torch's scalar state, and the kernel is given those values."""

    _definition = _defs.ASGD

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.01,
        lambd: TorchValue = 0.0001,
        alpha: TorchValue = 0.75,
        t0: TorchValue = 1000000.0,
        weight_decay: TorchValue = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class ADOPT(Optimizer):
    """ADOPT (Taniguchi et al. 2024; see :class:`fastoptim.ADOPT`), which
    ``torch.optim`` lacks, with :class:`fastoptim.ADOPT`'s signature and the authors' defaults
    (their ``clip_lambda`` is ``clip``, their ``decouple`` is ``decoupled_weight_decay``).
    State: ``step``, ``exp_avg``, ``exp_avg_sq``, as in the authors' implementation; the first step
    of each parameter only initialises ``exp_avg_sq``."""

    _definition = _defs.ADOPT

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.9999),
        eps: TorchValue = 1e-06,
        clip: bool = True,
        weight_decay: TorchValue = 0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        cautious: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class AdamWScheduleFree(ScheduleFreeOptimizer):
    """Schedule-Free AdamW (see :class:`fastoptim.AdamWScheduleFree`), a drop-in
    for ``schedulefree.AdamWScheduleFree`` with its signature and defaults (its ``foreach`` is not
    taken: every step is one fused call), plus ``maximize`` and the precision options.

    State as the package keeps it: per parameter ``z`` and ``exp_avg_sq``; per group ``k`` (the
    step count), ``weight_sum``, ``lr_max``, ``scheduled_lr`` and ``train_mode``, so
    ``state_dict`` checkpoints move between the package and fastoptim.  Unlike the package, the
    optimizer starts in train mode (calling ``train()`` first, as the package requires, is
    harmless)."""

    _definition = _defs.ADAMWSCHEDULEFREE

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.0025,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.999),
        eps: TorchValue = 1e-08,
        weight_decay: TorchValue = 0,
        warmup_steps: float = 0,
        r: TorchValue = 0.0,
        weight_lr_power: TorchValue = 2.0,
        *,
        maximize: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class SGDScheduleFree(ScheduleFreeOptimizer):
    """Schedule-Free SGD (see :class:`fastoptim.SGDScheduleFree`), a drop-in for
    ``schedulefree.SGDScheduleFree`` with its signature and defaults (its ``foreach`` is not taken),
    plus ``maximize`` and the precision options.  State as the package keeps it (see
    :class:`AdamWScheduleFree`)."""

    _definition = _defs.SGDSCHEDULEFREE

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 1.0,
        momentum: TorchValue = 0.9,
        weight_decay: TorchValue = 0,
        warmup_steps: float = 0,
        r: TorchValue = 0.0,
        weight_lr_power: TorchValue = 2.0,
        *,
        maximize: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class SparseAdam(Optimizer):
    """Drop-in :class:`torch.optim.SparseAdam` (see :class:`fastoptim.SparseAdam`).
    Gradients must be sparse COO tensors (``RuntimeError`` otherwise, as torch); each is coalesced
    and its rows updated by the compiled row kernel.  State: ``step``, ``exp_avg``,
    ``exp_avg_sq``."""

    _definition = _defs.SPARSEADAM

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.999),
        eps: TorchValue = 1e-08,
        maximize: bool = False,
        *,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class LAMB(Optimizer):
    """LAMB (You et al. 2020; see :class:`fastoptim.LAMB`), which ``torch.optim``
    lacks, with :class:`fastoptim.LAMB`'s signature.  State: ``step``, ``exp_avg``,
    ``exp_avg_sq``."""

    _definition = _defs.LAMB

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        betas: tuple[TorchValue, TorchValue] = (0.9, 0.999),
        eps: TorchValue = 1e-06,
        weight_decay: TorchValue = 0,
        bias_correction: bool = True,
        max_weight_norm: float | None = 10.0,
        max_trust_ratio: float | None = None,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class LARS(Optimizer):
    """LARS (You et al. 2017; see :class:`fastoptim.LARS`), which ``torch.optim``
    lacks, with :class:`fastoptim.LARS`'s signature (``pytorch_optimizer.LARS``'s defaults).
    State: ``step``, ``momentum_buffer`` (when ``momentum > 0``)."""

    _definition = _defs.LARS

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        momentum: TorchValue = 0.9,
        dampening: TorchValue = 0,
        weight_decay: TorchValue = 0,
        trust_coefficient: TorchValue = 0.001,
        nesterov: bool = False,
        exclude_1d: bool = True,
        *,
        maximize: bool = False,
        state_dtype: StateDType = None,
        master_weights: bool = False,
        kahan: bool = False,
        rounding: Rounding = "nearest",
        seed: int = 0,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Muon(Optimizer):
    """Drop-in :class:`torch.optim.Muon` (see :class:`fastoptim.Muon` for the update
    rule and ``ns_dtype``).  2-D float32/float64 parameters; state: ``momentum_buffer``, as in
    torch.  The Newton-Schulz products run through NumPy's BLAS on the tensors' memory."""

    _definition = _defs.MUON

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.001,
        weight_decay: TorchValue = 0.1,
        momentum: TorchValue = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: TorchValue = 1e-07,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: Literal["bfloat16", "float32", "float64"] = "bfloat16",
    ) -> None:
        super().__init__(params, _defaults(locals()))


class LBFGS(ClosureOptimizer):
    """Drop-in :class:`torch.optim.LBFGS` (see :class:`fastoptim.LBFGS`):
    ``step(closure)`` with a closure that zeroes the gradients, computes the loss, calls
    ``backward()`` and returns the loss.  float32/float64 parameters (CPU); the state is
    torch's (tensors under the first parameter), so ``state_dict`` moves between
    ``torch.optim.LBFGS`` and this class both ways.  The vector arithmetic runs in NumPy on
    the tensors' memory."""

    _definition = _defs.LBFGS

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-07,
        tolerance_change: float = 1e-09,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Adafactor(Optimizer):
    """Drop-in :class:`torch.optim.Adafactor` (see :class:`fastoptim.Adafactor` for
    the update rule).  float32/float64 parameters; state as torch's: ``step`` and ``row_var`` /
    ``col_var`` (two or more dimensions) or ``variance``, so ``state_dict`` moves between
    ``torch.optim.Adafactor`` and this class both ways.  The update runs in NumPy on the tensors'
    memory."""

    _definition = _defs.ADAFACTOR

    def __init__(
        self,
        params: Params,
        lr: TorchValue = 0.01,
        beta2_decay: TorchValue = -0.8,
        eps: tuple[float | None, float] = (None, 0.001),
        d: TorchValue = 1.0,
        weight_decay: TorchValue = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))
