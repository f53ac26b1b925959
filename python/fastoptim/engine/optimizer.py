"""The NumPy tier's engine: parameter groups, state arenas, gradient buffers, plans, the step,
state_dict and its validation.  Each optimizer class (:mod:`fastoptim.optimizers`, generated)
only names its :class:`~fastoptim.engine.definition.Definition` and carries its signature."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence, ValuesView
from types import MappingProxyType
from typing import Any, Callable, ClassVar, TypeVar, Union

import numpy as np

from .. import _core
from ..schedules import _from_data, _has_schedule, _to_data
from . import precision, sparse, transforms
from .definition import Definition, check_keywords, is_number, name_the_call
from .locks import new_lock
from .readonly import GRADS_HINT, STATE_HINT, ReadOnlyDict, ReadOnlyList
from .scheduled import Scheduled

Key = Union[int, str]
_Opt = TypeVar("_Opt", bound="Optimizer")
# Arrays (a list or tuple, a generator, a dict's values()), a dict name -> array, or a list of
# group dicts.  Spelled so that a list or dict display matches exactly one member, whose element
# type it is then checked against: with overlapping members (Iterable[np.ndarray] matches a
# dict too), mypy joins the elements first, and arrays of different dtypes or shapes, or group
# dicts with different entries, joined to `object` and were rejected.  (A list mixing arrays and
# group dicts type-checks; it is rejected at run time.)
Params = Union[
    Mapping[str, np.ndarray],
    Sequence[Union[np.ndarray, Mapping[str, Any]]],
    Iterator[np.ndarray],
    ValuesView[np.ndarray],
]
Grads = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]
# Row gradients (step_rows): per parameter (indices, rows) or None, in a list or by name.
RowGrads = Union[Sequence[Any], Mapping[str, Any]]
# A float hyper-parameter: a number, or a schedule (fastoptim.schedules, any ``t -> float``).
Value = Union[float, Callable[[int], float]]

_ALIGN = 64  # bytes: every state / gradient view starts on a cache line
STATE_FORMAT = "fastoptim.state/1"  # the "format" entry of every state_dict


def _defaults(local_vars: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer's hyper-parameter defaults from its ``__init__``'s ``locals()``: every
    argument but ``self`` and ``params``, so the signature is the single source of truth."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "params", "__class__")}


def run_compiled(
    step: Callable[..., None],
    steps: Callable[..., None],
    plans: Sequence[Any],
    hypers: Sequence[Any],
    numbers: Sequence[int],
    release: Sequence[bool],
    done: Callable[[], None],
    undo: Callable[[], None] | None = None,
) -> None:
    """One step of every plan (with its hyper-parameter struct and step number) in one compiled
    call (`step`: a definition's ``step_xxx`` for one plan, `steps`: its ``steps_xxx``), which
    checks every plan before any kernel runs and counts the step on each before it returns; the
    gradients of ``plans[i]`` are forgotten afterwards where ``release[i]``.  Then `done()`,
    the step's bookkeeping.  An interrupt (Ctrl-C) can only surface before the step (nothing
    happened: `undo()`, then it is raised) or after it (the whole step happened: `done()`, then
    it is raised).  Both tiers step through here."""
    if not plans:
        done()
        return
    before = plans[0].completed
    try:
        if len(plans) == 1:
            step(plans[0], hypers[0], numbers[0], None, release[0])
        else:
            steps(plans, hypers, numbers, release)
    except BaseException:
        if plans[0].completed != before:  # it happened: complete it, then raise
            done()
        elif undo is not None:
            undo()
        raise
    done()


def run_rows(
    core: Callable[..., None], jobs: Sequence[tuple[Any, ...]], done: Callable[[], None]
) -> None:
    """One step of sparse row updates: every job ``(hyper, step, param, index, rows, states,
    label)`` in one compiled call (`core`: a definition's ``rows_xxx``), which checks every job
    before it writes any, then `done()`, the step's bookkeeping.  As with
    :func:`run_compiled`, an interrupt (Ctrl-C) surfaces before the step (nothing happened)
    or after it (the whole step happened: `done()`, then it is raised): never a half-applied
    step.  Both tiers run their row updates through here (bfloat16/float16 parameters' rows
    on float32 copies, written back after the call: ``engine.sparse.widened``)."""
    ran: list[bool] = []
    jobs, scatter = sparse.widened(jobs)
    if jobs:
        try:
            core(jobs, ran)
        except BaseException:
            if ran:  # it happened: complete it, then raise
                scatter()
                done()
            raise
    scatter()
    done()


def _snapshot(group: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a group's entries that later in-place edits cannot reach (lists become
    tuples, dicts (a per-state ``state_dtype``) are copied: editing one in place counts as a
    change)."""
    return {
        k: tuple(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        for k, v in group.items()
    }


def _label(key: Key) -> str:
    return repr(key) if isinstance(key, str) else str(key)


def _arena(
    arrays: Sequence[np.ndarray],
    fill: float | None,
    dtypes: Sequence[Any] | None = None,
    shapes: Sequence[tuple[int, ...] | None] | None = None,
) -> tuple[np.ndarray, list[Any]]:
    """One contiguous, 64-byte-aligned buffer holding an array shaped like each of `arrays`
    (or of ``shapes[i]``), of its dtype or of ``dtypes[i]`` (a dtype name; None: no array for
    that one), every element `fill` (None: not written; the caller fills them)."""
    kinds = [a.dtype for a in arrays] if dtypes is None else dtypes
    # (dtype, shape) of each array: a kind's storage (quantized codes and scales have their own)
    specs: list[tuple[np.dtype[Any], tuple[int, ...]] | None] = []
    for i, (a, d) in enumerate(zip(arrays, kinds)):
        if d is None:
            specs.append(None)
            continue
        own = a.shape if shapes is None else shapes[i]
        assert own is not None
        kind, shape = _storage(d, own)
        specs.append((_dtype(kind), shape))
    offsets, total = [], 0
    for spec in specs:
        offsets.append(total)
        if spec is not None:
            total += -(-math.prod(spec[1]) * spec[0].itemsize // _ALIGN) * _ALIGN
    raw = np.empty(total + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    block = raw[start : start + total]
    views: list[Any] = []
    for o, spec in zip(offsets, specs):
        if spec is None:
            views.append(None)
            continue
        dt, shape = spec
        v = block[o : o + math.prod(shape) * dt.itemsize].view(dt).reshape(shape)
        if fill is not None:
            v.fill(fill)
        views.append(v)
    return block, views


def _storage(kind: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """A buffer kind's dtype and shape for a parameter of `shape` (dtypes as they are)."""
    if isinstance(kind, str):
        return precision.storage(kind, shape)
    return kind, shape


def _kind(name: str, held: tuple[str, tuple[int, ...]], shape: tuple[int, ...]) -> str:
    """The layout kind (:func:`~fastoptim.engine.precision.buffers`) of a buffer of state
    `name` stored as `held` (dtype name, shape) for a state shaped `shape`: ``"int8"`` /
    ``"int4"`` for quantized codes, ``"absmax8"`` / ``"absmax4"`` for their scales, else its
    dtype's name."""
    scales = name.endswith(precision.ABSMAX)
    kinds = (precision.ABSMAX_KIND, precision.ABSMAX4_KIND) if scales else precision.QUANT_KINDS
    return next((k for k in kinds if precision.storage(k, shape) == held), held[0])


def _dtype(d: Any) -> np.dtype[Any]:
    """The NumPy dtype of a dtype or dtype name (``"bfloat16"``: ml_dtypes')."""
    if isinstance(d, str) and d == "bfloat16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    dt: np.dtype[Any] = np.dtype(d)
    return dt


def _array_layout(a: Any) -> tuple[Any, ...] | None:
    """What a plan records of an array it writes: memory, dtype, shape and strides (None: not
    an array, which the group's validation refuses)."""
    if not isinstance(a, np.ndarray):
        return None
    return (a.__array_interface__["data"][0], a.size, a.dtype, a.shape, a.strides)


def _check_given(g: _Group, where: str) -> None:
    """ValueError naming the first parameter of `g` resized, reallocated or re-viewed in
    place since it was given (as a step's plan refuses it), for what runs without the plan
    that records them: a plan built anew, row updates of a stateless SGD."""
    for p, was, label in zip(g.params, g.given, g.labels):
        now = _array_layout(p)
        if now is None or was is None or now[:2] != was[:2]:
            raise ValueError(
                f"{where}param {label}: the array was resized or its memory replaced since it "
                "was given to the optimizer; build a new optimizer for it"
            )
        if now != was:
            raise ValueError(
                f"{where}param {label}: the array's dtype, shape or strides were changed in "
                "place since it was given to the optimizer; build a new optimizer for it"
            )


class _Group:
    """What the optimizer keeps per parameter group besides the user-visible dict."""

    def __init__(
        self, keys: list[Key], params: tuple[np.ndarray, ...], hyper: Any, sched: Scheduled
    ) -> None:
        self.keys = keys
        self.labels = [_label(k) for k in keys]
        self.params = params
        self.given = list(map(_array_layout, params))  # each parameter as it was given
        self.hyper = hyper  # the compiled kernel's hyper-parameter struct
        self.step = 0  # int64 count of updates applied to this group
        self.states: dict[str, list[np.ndarray]] = {}  # state name -> per-param views
        self.arenas: dict[str, np.ndarray] = {}  # state name -> contiguous block
        self.fresh: set[str] = set()  # states allocated but not yet used by a step
        self.fresh_copies: set[str] = set()  # an EMA / master copy not yet used by a step
        self.transforming = False  # the group clips or skips (Optimizer._sync)
        self.plan: Any = None
        self.plan_steps = 0  # steps counted on this plan (plan.completed after them)
        self.plan_states: Any = None  # what the plan was built for (state names, layout)
        self.first_id = 0  # the number of the group's first parameter in the optimizer
        self.state_dtype: Any = None  # the policy the plan was built for (its quantized kinds)
        self.outs: list[np.ndarray | None] | None = None  # copy-out arrays (set_copy_out)
        # (label, copy-out, address, size) of each copy-out: what the plan writes through
        # (Optimizer._check_copy_outs)
        self.outs_at: list[tuple[str, np.ndarray, int, int]] = []
        self.grad_block: np.ndarray | None = None
        self.acc_plan: Any = None  # the gradient buffers as a plan's params (accumulate)
        self.grads: list[np.ndarray] | None = None
        self.bound_own = False  # the plan points at self.grads
        self.params_view: Any = None  # what param_groups[i]["params"] holds
        self.synced: dict[str, Any] = {}  # the group's entries as last validated and synced
        self.sched = sched  # the group's schedules


class Optimizer:
    """Base class of fastoptim's optimizers (see :mod:`fastoptim.optimizers`).

    Parameters are NumPy arrays (float32, float64, ``ml_dtypes.bfloat16`` or float16;
    C-contiguous, writeable, native byte order) that every :meth:`step` updates **in place**;
    nothing is ever copied.  The precision options (:mod:`fastoptim.engine.precision`) say
    the state dtypes of 32- and 16-bit parameters; float64 parameters keep float64 state.
    (Muon, LBFGS and Adafactor, whose steps run in NumPy, take float32 and float64 only.)
    """

    _definition: ClassVar[Definition]  # what the optimizer is (fastoptim.definitions)
    _hyper_type: ClassVar[Any]  # the compiled module's XxxHyper class (from _definition)
    _core_step: ClassVar[Any]  # the compiled module's step_xxx function (from _definition)
    _core_steps: ClassVar[Any]  # ... and steps_xxx (several groups in one call)
    _python_run: ClassVar[bool] = False  # a subclass computes a group's step in Python

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        d = cls.__dict__.get("_definition")
        if d is not None:  # cached on the class: a step looks them up without indirection
            cls._hyper_type = d.hyper_type
            cls._core_step = staticmethod(d.core_step)
            cls._core_steps = staticmethod(d.core_steps)
        # A host definition (Muon, LBFGS) computes its step in Python: the engine's _run
        cls._python_run = cls._run is not Optimizer._run or (
            getattr(cls, "_definition", None) is not None and cls._definition.host is not None
        )

    def __new__(cls: type[_Opt], *args: Any, **kwargs: Any) -> _Opt:
        # Keras's keywords (beta_1=, learning_rate=...) that no __init__ of the class's MRO
        # takes (a subclass may forward **kwargs): a TypeError naming torch's equivalent
        check_keywords(getattr(cls, "_definition", None), cls.__name__, cls, kwargs)
        return super().__new__(cls)

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        self.defaults = {**defaults, **dict(self._definition.fixed)}
        self.param_groups: list[dict[str, Any]] = []
        self._groups: list[_Group] = []
        self._named: bool | None = None
        self._t = 0  # updates applied (the argument of every schedule)
        self._plateau: Any = None  # an attached schedules.ReduceLROnPlateau
        self._lock = new_lock(self)
        #: The global gradient norm of the last step (after ``grad_scale`` and
        #: ``max_grad_value``, before ``max_grad_norm``), when a group clips the norm; else None.
        self.grad_norm: float | None = None
        #: Whether the last step was skipped (``skip_nonfinite``: non-finite gradients).
        self.step_skipped = False
        #: Combines the gradient statistics of several processes (data-parallel or sharded
        #: training): see :data:`fastoptim.engine.transforms.Reduce`; None: this process only.
        self.reduce_grad_stats: transforms.Reduce | None = None
        self._transformed = False  # some plan has a gradient transform other than identity
        self._transforming = False  # some group clips or skips (see _sync)
        self._ema_swapped = False  # inside ema_weights()
        self._torn: str | None = None  # why a load stopped half-way (refuse until one succeeds)
        self._copy_outs = False  # some group has copy-out arrays (set_copy_out)
        if isinstance(params, np.ndarray):
            raise TypeError(
                f"{type(self).__name__}: params must be a list or dict of arrays, "
                "not a single array (wrap it in a list)"
            )
        if isinstance(params, Mapping):
            groups: list[Any] = [{"params": params}]
        else:
            items = list(params)
            if items and all(isinstance(g, Mapping) for g in items):
                groups = items
            else:
                groups = [{"params": items}]
        if not groups or all(len(g["params"]) == 0 for g in groups if "params" in g):
            raise ValueError(f"{type(self).__name__}: params is an empty parameter list")
        for g in groups:
            self.add_param_group(g)

    # ------------------------------------------------------------------ groups
    def _check_keys(self, group: Mapping[str, Any], complete: bool = False) -> None:
        """ValueError for an entry the optimizer does not know, or (`complete`: a group the
        optimizer holds) one it lacks (deleted: the step would go on with its old value, the
        checkpoints would lack it)."""
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown hyper-parameter(s) {sorted(unknown)} in a group"
            )
        missing = set(self.defaults) - set(group) if complete else ()
        if missing:
            raise ValueError(
                f"{type(self).__name__}: a group's hyper-parameter(s) {sorted(missing)} were "
                "deleted; set them instead"
            )

    def _new_sched(self) -> Scheduled:
        return Scheduled(self._definition, type(self).__name__)

    def _state_fill(self, name: str, group: Mapping[str, Any]) -> float:
        return self._definition.fill(name, group)

    def _sync_struct(self, hyper: Any, group: Mapping[str, Any], fresh: set[str]) -> None:
        for name, value in self._definition.core_values(group, fresh).items():
            setattr(hyper, name, value)

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group of parameters (``{"params": list or dict, "lr": ..., ...}``); missing
        hyper-parameters take the optimizer's defaults."""
        try:
            self._add_param_group(param_group)
        except BaseException as e:  # (the arrays' checks: "param 0: dtype must be ...")
            name_the_call(e, type(self).__name__)
            raise

    def _add_param_group(self, param_group: Mapping[str, Any]) -> None:
        cls = type(self).__name__
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError(f"{cls}: a parameter group must be a dict with a 'params' entry")
        self._check_keys(param_group)
        raw = param_group["params"]
        if isinstance(raw, np.ndarray):
            raise TypeError(f"{cls}: a group's 'params' must be a list or dict of arrays")
        named = isinstance(raw, Mapping)
        if self._named is not None and named != self._named:
            raise TypeError(
                f"{cls}: all parameter groups must be given the same way (all dicts of named "
                "arrays, or all lists)"
            )
        start = sum(len(g.params) for g in self._groups)
        if named:
            keys: list[Key] = list(raw.keys())
            bad = [k for k in keys if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{cls}: parameter names must be strings, got {bad[0]!r}")
            taken = {k for g in self._groups for k in g.keys}
            dup = [k for k in keys if k in taken]
            if dup:
                raise ValueError(f"{cls}: parameter name {dup[0]!r} appears in two groups")
            arrays = tuple(raw.values())
        else:
            arrays = tuple(raw)
            keys = list(range(start, start + len(arrays)))
        if not arrays:
            raise ValueError(f"{cls}: a parameter group has an empty parameter list")
        group = dict(self.defaults)
        group.update({k: v for k, v in param_group.items() if k != "params"})
        for k, v in group.items():  # betas given as a list: keep an immutable copy
            if isinstance(v, list):
                group[k] = tuple(v)
        g = _Group(keys, arrays, self._hyper_type(), self._new_sched())
        g.first_id = start
        if precision.STATE_DTYPE in self.defaults:
            group[precision.STATE_DTYPE] = precision.normalize(group.get(precision.STATE_DTYPE))
        g.sched.adopt(group, self._t)
        g.sched.check(group, self._t)
        # Validate the arrays (type, dtype, layout, aliasing within the group) before keeping
        # anything: a plan without state does exactly that.
        _core.Plan(list(arrays), g.labels, [], [])
        host = self._definition.host
        if host is not None:  # float32/float64 only: NumPy's arithmetic in the array's dtype
            for a, lab in zip(arrays, g.labels):
                if a.dtype not in (np.float32, np.float64):
                    raise TypeError(
                        f"{cls}: param {lab} has dtype {a.dtype}; {cls} updates float32 and "
                        "float64 arrays"
                    )
                if host.check_param is not None:
                    host.check_param(cls, f"param {lab}", a.shape)
        # ... and against everything the other groups own: parameters, state, gradient buffers.
        owned, owners = self._owned(with_grad_buffers=True)
        _core.check_disjoint(owned + list(arrays), owners + ["param " + lab for lab in g.labels])
        self._named = named
        self._sync(g, group)
        self._ensure_plan(g, group)
        # Read-only on purpose: the compiled plan is fixed; use add_param_group to add more.
        g.params_view = MappingProxyType(dict(zip(keys, arrays))) if named else arrays
        group["params"] = g.params_view
        g.synced = _snapshot(group)
        self.param_groups.append(group)
        self._groups.append(g)

    # ------------------------------------------------------------------ schedules
    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls applied: the update number ``t`` at which schedules
        are evaluated for the next step."""
        return self._t

    def schedules(self, group: int = 0) -> dict[str, Any]:
        """The scheduled hyper-parameters of parameter group `group`: name -> schedule
        (``betas`` -> a pair in which either entry may be a schedule).  Their current values
        are in ``param_groups[group]``."""
        return dict(self._groups[group].sched.specs)

    def _advance(self, g: _Group, group: dict[str, Any]) -> None:
        """After a step: write the scheduled values for the next one into `group`, check them
        and hand them to the kernel (only the scheduled entries: a few microseconds).  A
        schedule's error, or an invalid value, is left for the next step to raise before it
        changes anything."""
        sched = g.sched
        if not sched.advance(group, self._t):
            g.synced = {}  # the next step re-checks the group: its adopt raises the error
            return
        try:
            sched.check(group, self._t, sched.specs)
        except (TypeError, ValueError):
            return  # group != g.synced: the next step re-checks everything and raises
        self._sync_struct(g.hyper, {k: group[k] for k in sched.specs}, g.fresh)
        self._ensure_plan(g, group)  # a scheduled value may switch a variant (momentum 0 -> x)
        g.synced.update((k, group[k]) for k in sched.specs)

    def _attach_plateau(self, plateau: Any) -> None:
        """Called by :class:`fastoptim.schedules.ReduceLROnPlateau`: its state becomes part of
        this optimizer's checkpoints (the last one attached)."""
        self._plateau = plateau

    def _scale_lr(self, i: int, factor: float, min_lr: float) -> None:
        """ReduceLROnPlateau's reduction of group `i`: a constant lr becomes
        ``max(lr * factor, min_lr)`` (torch's arithmetic); a scheduled one is multiplied by the
        accumulated factor from now on, never below `min_lr`."""
        g, group = self._groups[i], self.param_groups[i]
        sched = g.sched
        if "lr" in sched.specs and group["lr"] == sched.written.get("lr"):
            sched.lr_scale *= factor
            sched.lr_floor = min_lr
            sched.evaluate(group, self._t)
        else:
            group["lr"] = max(float(group["lr"]) * factor, min_lr)

    # ------------------------------------------------------------------ state and plans
    def _sync(self, g: _Group, group: Mapping[str, Any]) -> None:
        self._sync_struct(g.hyper, group, g.fresh)
        # Whether a step must decide gradient transforms: computed when a group changes, not
        # at every step (their options are never scheduled).
        g.transforming = transforms.active((group,))
        self._transforming = g.transforming or any(x.transforming for x in self._groups)
        if g.step == 0:  # no step yet: the scalar state starts from the group's values (ASGD's
            for n, _ in self._definition.scalars:  # eta = lr), as the state buffers do
                setattr(g.hyper, n, self._definition.scalar_fill(n, group))
        if g.plan is not None:
            rounding = group.get(precision.ROUNDING, "nearest")
            seed = int(group.get(precision.SEED, 0))
            if g.plan.rounding != rounding or g.plan.seed != seed:
                g.plan.set_rounding(rounding, seed)
            decay = group.get(precision.EMA_DECAY)
            if decay is not None and g.plan.ema_decay != decay:
                g.plan.set_ema_decay(float(decay))

    def _layout(self, g: _Group, group: Mapping[str, Any], names: Sequence[str]) -> list[Any]:
        """Per parameter: state name -> dtype name (the kernel's `names`, then the precision
        policy's master copy or compensation buffer)."""
        return self._definition.layouts(
            group, ((_dtype(p.dtype).name, p.shape, p.size) for p in g.params), tuple(names)
        )

    def _check_layout(self, g: _Group, group: Mapping[str, Any]) -> None:
        """ValueError if `group`'s precision options would change a state buffer that exists:
        its dtype, or whether a parameter has it (they are fixed once the state exists)."""
        layout = self._layout(g, group, list(g.states))
        for name, views in g.states.items():
            for i, v in enumerate(views):
                kind = layout[i].get(name)
                shape = self._definition.state_shape(name, g.params[i].shape)
                spec = None if kind is None or shape is None else precision.storage(kind, shape)
                held = None if v is None else (_dtype(v.dtype).name, v.shape)
                if spec != held:
                    want = None if spec is None else kind
                    have = None if held is None or shape is None else _kind(name, held, shape)
                    raise ValueError(
                        f"{type(self).__name__}: the state {name!r} of param {g.labels[i]} "
                        f"exists as {have}; these options (state_dtype, "
                        "master_weights, kahan, ema_decay) would make it "
                        f"{want}: they cannot change once the state exists (build a new "
                        "optimizer, or load a checkpoint into one built with these options)"
                    )

    def _allocate(self, g: _Group, name: str, fill: float, layout: list[Any]) -> None:
        """State buffer `name` of every parameter that has one in `layout` (one arena): filled
        with `fill`; a master copy or an EMA with its parameter's values.  A quantized state
        also gets its scales (``name + "_absmax"``): codes and scales of `fill`."""
        if name.endswith(precision.ABSMAX):
            return  # with its state
        shapes = None
        if name in self._definition.shaped:
            shapes = [self._definition.state_shape(name, p.shape) for p in g.params]
        g.arenas[name], g.states[name] = _arena(
            g.params, None, [b.get(name) for b in layout], shapes
        )
        scales = name + precision.ABSMAX
        if any(scales in b for b in layout):
            g.arenas[scales], g.states[scales] = _arena(
                g.params, None, [b.get(scales) for b in layout]
            )
        self._fill_state(g, name, fill, layout)
        if name in precision.COPIES:  # (taken again at its first step: see step)
            g.fresh_copies.add(name)
        if name in precision.COPIES or self._definition.like_param(name):
            self._take_params(g, name)

    def _fill_state(self, g: _Group, name: str, fill: float, layout: list[Any]) -> None:
        """Every element of state `name` of group `g` := `fill`; where `layout` quantizes it,
        its codes and scales (``name + "_absmax"``) are those of `fill`
        (:func:`~fastoptim.engine.precision.quantized_fill`, as every tier makes them)."""
        none: list[Any] = [None] * len(g.params)
        scales = g.states.get(name + precision.ABSMAX) or none
        for b, v, a, p in zip(layout, g.states[name], scales, g.params):
            if v is None:
                continue
            if precision.quantized(b, name):
                code, absmax = precision.quantized_fill(fill, name, b[name])
                precision.fill_codes(v, code, b[name], p.size)
                a.fill(absmax)
            else:
                v.fill(fill)

    def _take_params(self, g: _Group, name: str) -> None:
        """State `name` of every parameter of `g` := the parameter (rounded to its dtype)."""
        for v, p in zip(g.states[name], g.params):
            if v is not None:
                np.copyto(v, p, casting="unsafe")

    def _ensure_plan(self, g: _Group, group: Mapping[str, Any]) -> None:
        names = tuple(g.hyper.state_names())
        get = group.get
        policy = (
            get(precision.STATE_DTYPE),
            get(precision.MASTER_WEIGHTS),
            get(precision.KAHAN),
            get(precision.EMA_DECAY) is not None,
        )
        key = (names, policy, id(g.outs))
        if key == g.plan_states:  # (checked first: a scheduled step comes here every time)
            return
        if g.plan is not None:  # (the new plan would take the arrays as they are now)
            _check_given(g, "")
        layout = self._layout(g, group, names)
        extras = tuple(n for n in precision.EXTRA_STATES if any(n in b for b in layout))
        for name in names + extras:
            if name not in g.states:
                self._allocate(g, name, self._state_fill(name, group), layout)
                if name in names:
                    g.fresh.add(name)
        g.state_dtype = get(precision.STATE_DTYPE)
        g.plan = self._make_plan(g, names, g.outs)
        g.plan_steps = 0
        g.plan_states = key
        g.bound_own = False
        self._sync(g, group)  # `fresh` may have changed

    def _make_plan(self, g: _Group, names: Sequence[str], outs: Any) -> Any:
        """A compiled plan of group `g`'s parameters and states `names` (which exist), its
        master copies and compensation, and the copy-out arrays `outs` (validated by it)."""
        extra: dict[str, Any] = {key: g.states.get(n) for key, n in precision.PLAN_EXTRAS}
        extra["outs"] = outs
        names = [n for n in names if n not in self._definition.shaped]  # (a host step's own)
        return _core.Plan(
            list(g.params),
            g.labels,
            list(names),
            [_plan_states(g.states, n) for n in names],
            **{k: v for k, v in extra.items() if v is not None},
            ids=list(range(g.first_id, g.first_id + len(g.params))),
            qmaps=precision.qmaps(g.state_dtype, names),
        )

    def state_bytes(self) -> int:
        """Bytes of optimizer state held for the parameters: every state array (quantized
        codes and their scales, master copies and compensation included), without the
        parameters and gradients."""
        with self._lock:
            return sum(v.nbytes for g in self._groups for vs in g.states.values() for v in vs
                       if v is not None)  # fmt: skip

    def follow_params(self) -> int:
        """Make the float32 master copies (``master_weights``) follow the bfloat16/float16
        parameters after they were changed in place outside the optimizer (clipped, pruned,
        loaded into), as :mod:`fastoptim.torch` does by itself: each element of a parameter
        that is not what the last step wrote from its master (rounded to nearest; with
        ``rounding="stochastic"``, either value around it) gives the master its value, the
        others keep the master's float32 bits.  Without it a step writes the parameters from
        their masters (the value of record), and such an edit is lost.  The first step takes
        every master from its parameter by itself.  Returns the number of elements taken.
        Refused (changing nothing) inside :meth:`ema_weights` and for a parameter resized or
        re-viewed since it was given."""
        where = f"{type(self).__name__}.follow_params"
        with self._lock:
            self._check_not_swapped(where)
            work = []
            for g in self._groups:
                masters = g.states.get(precision.MASTER)
                if masters is None or precision.MASTER in g.fresh_copies:
                    continue  # (none, or taken from the parameters at the next step)
                _check_given(g, f"{where}: ")
                stochastic = g.plan is not None and g.plan.rounding == "stochastic"
                work += [(p, m, stochastic) for p, m in zip(g.params, masters) if m is not None]
            return sum(precision.follow(p, m, s) for p, m, s in work)

    def set_copy_out(self, arrays: Any) -> None:
        """The offload layout: after every step, each float32 parameter that has a copy-out
        array (bfloat16 or float16, same shape, C-contiguous) also gets its new value rounded
        into it (per the group's ``rounding``), in the same pass over memory.

        `arrays`: a list in parameter order (None for a parameter without a copy), a dict
        keyed by parameter name (parameters not in it have none), or None to remove every
        copy.  Validated first (dtypes, shapes, layout, memory shared with anything the
        optimizer updates): a rejected call changes nothing.  Each copy-out must stay as it was
        given (not resized, reallocated or made read-only): a step checks that first."""
        cls = type(self).__name__
        if self._definition.host is not None and arrays is not None:
            raise TypeError(
                f"{cls}.set_copy_out: {cls} computes its step in NumPy and takes no precision "
                "options (no copy-out arrays); convert the parameters after its step instead"
            )
        with self._lock:
            total = sum(len(g.params) for g in self._groups)
            if arrays is None:
                flat: list[Any] = [None] * total
            elif isinstance(arrays, Mapping):
                keys = [str(k) for g in self._groups for k in g.keys]
                unknown = [k for k in arrays if k not in set(keys)]
                if not self._named or unknown:
                    raise ValueError(
                        f"{cls}.set_copy_out: no parameter named {unknown[:3]}"
                        if self._named
                        else f"{cls}.set_copy_out: a dict needs named parameters; pass a list"
                    )
                flat = [arrays.get(k) for k in keys]
            elif isinstance(arrays, Sequence) and not isinstance(arrays, np.ndarray):
                if len(arrays) != total:
                    raise ValueError(
                        f"{cls}.set_copy_out: expected {total} entries (an array or None per "
                        f"parameter), got {len(arrays)}"
                    )
                flat = list(arrays)
            else:
                raise TypeError(
                    f"{cls}.set_copy_out: expected a list, a dict or None, got "
                    f"{type(arrays).__name__}"
                )
            per_group: list[list[Any] | None] = []
            start = 0
            for g in self._groups:
                mine = flat[start : start + len(g.params)]
                start += len(g.params)
                per_group.append(None if all(o is None for o in mine) else mine)
            for g, outs in zip(self._groups, per_group):  # every check before any change
                self._make_plan(g, g.hyper.state_names(), outs)
            owned, owners = self._owned(with_grad_buffers=True, with_outs=False)
            given = [(o, f"copy-out of param {lab}") for g, outs in zip(self._groups, per_group)
                     for lab, o in zip(g.labels, outs or ()) if o is not None]  # fmt: skip
            _core.check_disjoint(owned + [o for o, _ in given], owners + [w for _, w in given])
            for g, group, outs in zip(self._groups, self.param_groups, per_group):
                g.outs = outs
                pairs = zip(g.labels, outs or ())
                g.outs_at = [(lab, o, o.ctypes.data, o.size) for lab, o in pairs if o is not None]
                self._ensure_plan(g, group)
            self._copy_outs = any(g.outs_at for g in self._groups)

    def _check_copy_outs(self, where: str) -> None:
        """ValueError if a copy-out array (:meth:`set_copy_out`) was resized, reallocated or made
        read-only since it was given: the plan would write through the address it had then
        (for the parameters, the compiled plan checks the same and says the same)."""
        for g in self._groups:
            for lab, out, address, size in g.outs_at:
                if out.ctypes.data != address or out.size != size:
                    raise ValueError(
                        f"{where}: copy-out of param {lab}: the array was resized or its memory "
                        "replaced since it was given to set_copy_out; give it again "
                        "(set_copy_out) or remove it (set_copy_out(None))"
                    )
                if not out.flags.writeable:
                    raise ValueError(f"{where}: copy-out of param {lab}: array was made read-only")

    def _own_grads(self, g: _Group) -> list[np.ndarray]:
        if g.grads is None:
            g.grad_block, g.grads = _arena(g.params, 0.0)
        return g.grads

    @property
    def grads(self) -> Any:
        """Gradient buffers owned by the optimizer (zeros at first, same shapes and dtypes as
        the parameters, one contiguous block per group): write gradients into them and call
        :meth:`step` with no argument.  A list, or a dict when parameters are named, built at
        each access: write into the buffers (``opt.grads[0][...] = g``); replacing an entry
        would change nothing and raises ``TypeError``.

        Typed ``Any`` on purpose: the value is a ``list[np.ndarray]`` (parameters given as a
        list, indexed by position) or a ``dict[str, np.ndarray]`` (parameters given by name),
        decided at run time by the arguments, which an optimizer's static type does not record.
        Annotated as that union, neither ``opt.grads["w"]`` nor ``opt.grads[0]`` would
        type-check; a protocol or view class would either claim methods one of the two lacks
        (``.items()`` on a list) or change what is returned.  For checked types, say which one
        you have where you take it: ``grads: dict[str, np.ndarray] = opt.grads``."""
        pairs = [(k, a) for g in self._groups for k, a in zip(g.keys, self._own_grads(g))]
        if self._named:
            return ReadOnlyDict({str(k): a for k, a in pairs}, "opt.grads", GRADS_HINT)
        return ReadOnlyList([a for _, a in pairs], "opt.grads", GRADS_HINT)

    def accumulate(self, grads: Grads, *, scale: float = 1.0) -> None:
        """Add ``scale * grads`` into the optimizer's gradient buffers (:attr:`grads`): the
        accumulation of micro-batches, one multithreaded pass over the buffers, no
        temporaries.  ``grads``: as :meth:`step` takes them (their dtypes may differ from the
        buffers': bfloat16 gradients into float32 buffers, say); bfloat16/float16 buffers are
        rounded to nearest.  Then ``step()`` (no argument) steps on the buffers; average there
        with ``step(grad_scale=n)`` (folded into the update) or here with ``scale=1/n``, and
        :meth:`zero_grad` before the next accumulation.  Everything is checked before any
        buffer is written."""
        with self._lock:
            where = f"{type(self).__name__}.accumulate"
            if not is_number(scale):
                raise TypeError(f"{where}: scale must be a number, got {scale!r}")
            if not math.isfinite(scale):
                raise ValueError(f"{where}: scale must be finite, got {scale!r}")
            per_group = self._split_grads(grads, "accumulate")

            def disjoint() -> None:
                # The gradients against every group's buffers (which this call writes), in
                # the call's words: "grad for param 0 shares memory with opt.grads[1]".
                try:
                    _core.check_disjoint(
                        [a for g in self._groups for a in self._own_grads(g)]
                        + [a for gr in per_group for a in gr],
                        [f"opt.grads[{k}]" for g in self._groups for k in g.labels]
                        + [f"grad for param {k}" for g in self._groups for k in g.labels],
                    )
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{where}: {e}") from None

            plans = []
            for g, gr in zip(self._groups, per_group):
                if g.acc_plan is None:  # (its "params" are the buffers, labelled as the params)
                    g.acc_plan = _core.Plan(self._own_grads(g), g.labels, [], [])
                try:
                    g.acc_plan.bind_grads(gr)
                except (TypeError, ValueError) as e:
                    disjoint()  # (an overlap with a buffer: said in those words)
                    raise type(e)(f"{where}: {e}") from None
                plans.append(g.acc_plan)
            if len(self._groups) > 1:  # (each plan checked its own group's buffers)
                disjoint()
            _core.accumulate(plans, float(scale))

    def zero_grad(self) -> None:
        """Set the optimizer's gradient buffers (:attr:`grads`) to zero."""
        for g in self._groups:
            if g.grad_block is not None:
                g.grad_block.fill(0)

    @property
    def state(self) -> dict[Key, dict[str, Any]]:
        """Per-parameter state: NumPy views into the group's state arenas (torch's names:
        ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...) plus the group's ``step`` count.
        Writing into a view changes the optimizer's state (``opt.state[k]["exp_avg"][...] =
        0``); the dicts are built at each access and refuse changes (``TypeError``): replacing
        an entry would change nothing.  A whole state, ``step`` included, is set with
        :meth:`load_state_dict`."""
        out: dict[Key, dict[str, Any]] = {}
        for g in self._groups:
            for i, key in enumerate(g.keys):
                entry: dict[str, Any] = {"step": g.step}
                for name, views in g.states.items():
                    if views[i] is not None:
                        entry[name] = views[i]
                out[key] = ReadOnlyDict(entry, f"opt.state[{key!r}]", STATE_HINT)
        return ReadOnlyDict(out, "opt.state", STATE_HINT)

    # ------------------------------------------------------------------ the step
    def _split_grads(self, grads: Grads, where: str = "step") -> list[list[np.ndarray]]:
        cls = f"{type(self).__name__}.{where}"
        total = sum(len(g.params) for g in self._groups)
        if isinstance(grads, Mapping):
            if not self._named:
                raise TypeError(
                    f"{cls}: grads is a dict but the parameters were given as a list; "
                    "pass a list of gradients in parameter order"
                )
            keys = [str(k) for g in self._groups for k in g.keys]  # named: all str
            missing = [k for k in keys if k not in grads]
            extra = [k for k in grads if k not in set(keys)]
            if missing or extra:
                raise ValueError(
                    f"{cls}: grads keys do not match the parameters: "
                    f"missing {missing}, unexpected {extra}"
                )
            return [[grads[str(k)] for k in g.keys] for g in self._groups]
        if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence):
            raise TypeError(
                f"{cls}: grads must be a list of arrays in parameter order"
                + (" or a dict keyed by parameter name" if self._named else "")
                + f", got {type(grads).__name__}"
            )
        if len(grads) != total:
            raise ValueError(f"{cls}: expected {total} gradients, got {len(grads)}")
        out, start = [], 0
        for g in self._groups:
            out.append(list(grads[start : start + len(g.params)]))
            start += len(g.params)
        return out

    def _per_group(self, per_group: list[list[np.ndarray]] | None) -> list[list[np.ndarray]]:
        """:meth:`_bind`'s result, the optimizer's own buffers for None."""
        if per_group is None:
            return [self._own_grads(g) for g in self._groups]
        return per_group

    def _prepare(self, grads: Grads | None) -> list[list[np.ndarray]] | None:
        """Validate everything a step needs and bind the gradients; touches no element."""
        if self._copy_outs:
            self._check_copy_outs(f"{type(self).__name__}.step")
        for g in self._groups:
            if not _is_count(g.step + 1):  # (a count that load_state_dict would refuse)
                raise OverflowError(
                    f"{type(self).__name__}.step: the step count {g.step} is at its maximum "
                    f"({2**63 - 2}: its successor is the kernels' int64 limit)"
                )
        if len(self.param_groups) != len(self._groups):
            self._check_group_list()
        for g, group in zip(self._groups, self.param_groups):
            if group != g.synced:
                self._refresh()
                break
        return self._bind(grads)

    def _check_group_list(self) -> None:
        """ValueError if groups were removed from or appended to :attr:`param_groups` (the
        list itself): a removed group was still stepped, an appended one never was."""
        if len(self.param_groups) != len(self._groups):
            raise ValueError(
                f"{type(self).__name__}: param_groups holds {len(self.param_groups)} groups, the "
                f"optimizer {len(self._groups)}: groups are added by add_param_group and never "
                "removed (build a new optimizer for fewer)"
            )

    def _refresh(self) -> None:
        """Validate and compile the groups whose entries were set since the last step (or whose
        schedule failed after it), allocating the state buffers a new variant needs (e.g.
        ``momentum`` 0 -> 0.9): what a step, :meth:`state_dict` and :func:`fastoptim.save`
        see first.  Raises (changing nothing) if a group holds an invalid value."""
        self._check_group_list()
        changed = [
            (g, group)
            for g, group in zip(self._groups, self.param_groups)
            # hyper-parameters set since the last step, or a schedule that failed after it
            # (_advance then empties g.synced)
            if group != g.synced
        ]
        for g, group in changed:
            if group.get("params") is not g.params_view:
                raise ValueError(
                    f"{type(self).__name__}: a group's 'params' entry cannot be replaced; "
                    "use add_param_group or a new optimizer"
                )
            self._check_keys(group, complete=True)
            if precision.STATE_DTYPE in self.defaults:
                group[precision.STATE_DTYPE] = precision.normalize(group.get(precision.STATE_DTYPE))
            g.sched.adopt(group, self._t)
            g.sched.check(group, self._t)
            self._check_layout(g, group)
        for g, group in changed:
            self._sync(g, group)
            self._ensure_plan(g, group)
            for name in g.fresh:  # not used yet: starts from the group's values at its first
                fill = self._state_fill(name, group)  # step (Rprop's step_size = lr)
                if fill != self._state_fill(name, g.synced):
                    self._fill_state(g, name, fill, self._layout(g, group, list(g.states)))
            g.synced = _snapshot(group)

    def _bind(self, grads: Grads | None) -> list[list[np.ndarray]] | None:
        """Validate the gradients and bind them to the plans; touches no element.  The
        gradients per group, or None for the optimizer's own buffers (:meth:`_per_group`)."""
        if grads is None:
            for g in self._groups:
                if not g.bound_own:
                    g.plan.bind_grads(self._own_grads(g))
                    g.bound_own = True
            return None
        per_group = self._split_grads(grads)
        for g in self._groups:
            g.bound_own = False
        for g, gr in zip(self._groups, per_group):
            try:
                g.plan.bind_grads(gr)
            except (TypeError, ValueError):
                g.plan.check()  # (a parameter re-viewed in place: that error, not the grad's)
                raise
        # A gradient must not alias another group's param or state, nor state that the plans
        # do not hold (Adafactor's factored statistics, shaped apart from their parameter).
        if len(self._groups) > 1 or self._definition.shaped:
            owned, owners = self._owned(with_grad_buffers=False)
            grads_flat = [a for gr in per_group for a in gr]
            labels = ["grad for param " + lab for g in self._groups for lab in g.labels]
            _core.check_disjoint(owned + grads_flat, owners + labels)
        return per_group

    def _owned(
        self, with_grad_buffers: bool, with_outs: bool = True
    ) -> tuple[list[np.ndarray], list[str]]:
        """The memory the groups own (parameters, state arenas and, optionally, the gradient
        buffers of :attr:`grads`), with labels: no two groups may share any of it."""
        arrays: list[np.ndarray] = []
        labels: list[str] = []
        for gi, g in enumerate(self._groups):
            arrays += g.params
            labels += ["param " + lab for lab in g.labels]
            for name, block in g.arenas.items():
                arrays.append(block)
                labels.append(f"the {name!r} state of group {gi}")
            if with_grad_buffers and g.grad_block is not None:
                arrays.append(g.grad_block)
                labels.append(f"the gradient buffers (opt.grads) of group {gi}")
            for lab, out in zip(g.labels, (g.outs or ()) if with_outs else ()):
                if out is not None:
                    arrays.append(out)
                    labels.append(f"the copy-out of param {lab}")
        return arrays, labels

    def _scalar_names(self) -> list[str]:
        return [n for n, _ in self._definition.scalars]

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        """Hook: apply one update to group `g` in Python (:mod:`fastoptim.reference` overrides
        it; a host definition's update runs here).  Otherwise :meth:`step` runs the compiled
        kernels of every group in one call instead."""
        host = self._definition.host
        if host is None or host.update is None:
            raise NotImplementedError
        host.update(g.synced, list(g.params), grads, g.states, g.step + 1)

    def step(self, grads: Grads | None = None, *, grad_scale: float | None = None) -> float | None:
        """Update every parameter in place.

        ``grads``: a list of gradient arrays in parameter order, or a dict keyed by parameter
        name; ``None`` uses :attr:`grads`.  ``grad_scale``: the gradients are divided by it
        (a loss scale, or the number of accumulated micro-batches), inside the update.
        Everything (hyper-parameters, every gradient's dtype, shape, layout and aliasing) is
        validated before any array is modified: a rejected call changes nothing.

        Returns the global gradient norm when a group has ``max_grad_norm`` (as
        ``clip_grad_norm_`` returns it; also in :attr:`grad_norm`), else None.  With
        ``skip_nonfinite``, a step whose gradients hold an infinity or NaN changes nothing
        (:attr:`step_skipped`).  See :mod:`fastoptim.engine.transforms`.
        """
        with self._lock:  # steps of one optimizer from several threads: one at a time
            try:
                return self._step_locked(grads, grad_scale)
            except BaseException as e:  # (a refused step may have bound some groups' gradients)
                self._release_passed()
                name_the_call(e, type(self).__name__, "step")
                raise

    def _step_locked(self, grads: Grads | None, grad_scale: float | None) -> float | None:
        """:meth:`step` with the lock held."""
        if self._ema_swapped or self._torn is not None:
            self._check_not_swapped(f"{type(self).__name__}.step")
        scale = None
        if grad_scale is not None:
            where = f"{type(self).__name__}.step"
            scale = transforms.check_grad_scale(where, grad_scale)
            if self._definition.host is not None:
                raise TypeError(
                    f"{where}: grad_scale is for the compiled optimizers (it is folded into "
                    "their kernels); this step runs in NumPy: pass the gradients divided by it"
                )
        per_group = self._prepare(grads)
        groups = self._groups
        decision = None
        if scale is not None or self._transformed or self._transforming:
            decision = self._decide(scale, self._per_group(per_group))
            self.grad_norm, self.step_skipped = decision.norm, decision.skip
            if decision.skip:  # (its gradients are not kept alive either)
                self._release_passed()
                return decision.norm
        elif self.grad_norm is not None or self.step_skipped:
            self.grad_norm, self.step_skipped = None, False
        fresh = [g for g in groups if g.fresh or g.fresh_copies]
        for g in fresh:  # (the parameters not re-viewed since: checked before any is copied)
            g.plan.check()
        for g in fresh:  # a state that starts as its parameter (Schedule-Free's z, an EMA):
            for name in g.fresh | g.fresh_copies:  # the parameter as it is now, at its first
                if name in g.fresh_copies or self._definition.like_param(name):  # step
                    self._take_params(g, name)
        if self._python_run:  # fastoptim.reference, Muon, Adafactor: each group in Python
            for g in groups:  # (what the compiled step checks before it writes anything)
                g.plan.check()
            for i, (g, gr) in enumerate(zip(groups, self._per_group(per_group))):
                self._run(g, gr if decision is None else self._transform(decision, i, gr))
            self._after_step()
            self._release_passed()  # (passed gradients are not kept alive after it)
            return self.grad_norm
        # Every group in one compiled call (passed gradients are not kept alive after it).
        cls = type(self)
        if len(groups) == 1:  # (tuples: a list comprehension costs 0.15 us)
            g = groups[0]
            run_compiled(cls._core_step, cls._core_steps, (g.plan,), (g.hyper,),
                         (g.step + 1,), (not g.bound_own,), self._after_step)  # fmt: skip
        else:
            plans, hypers, steps, release = zip(
                *[(g.plan, g.hyper, g.step + 1, not g.bound_own) for g in groups]
            )
            run_compiled(cls._core_step, cls._core_steps, plans, hypers, steps, release,
                         self._after_step)  # fmt: skip
        return self.grad_norm

    def _check_ready(self, where: str) -> None:
        """What :meth:`step` checks before it changes an array, without stepping: the EMA
        swap, a torn load, every hyper-parameter and schedule (:meth:`_prepare`, with the
        optimizer's own gradient buffers) and that no parameter was made read-only (the
        compiled plan's check at the step).  :mod:`fastoptim.distributed` agrees on it across
        ranks before its collectives: a step refused on some ranks raises on all of them, none
        left blocked."""
        with self._lock:
            self._check_not_swapped(where)  # (and a load stopped half-way)
            self._prepare(None)
            for g in self._groups:
                if g.plan is not None:  # every array it writes: as the compiled step checks
                    g.plan.check()
                    continue
                for lab, p in zip(g.labels, g.params):  # (a step in Python)
                    if not p.flags.writeable:
                        raise ValueError(f"{where}: param {lab}: array was made read-only")

    def _release_passed(self) -> None:
        """Forget the gradients passed to a step that did not run (skipped, or refused after
        some groups bound theirs): the plans must not keep them alive until the next step (the
        buffers of :attr:`grads` stay bound)."""
        for g in self._groups:
            if not g.bound_own and g.plan is not None:
                g.plan.release_grads()

    def step_rows(self, grads: RowGrads) -> None:
        """One step with sparse row gradients (SGD, Adagrad, SparseAdam): for each parameter
        (shape ``(n, *row)``) a pair ``(indices, rows)``: ``k`` integer row indices in
        ``[0, n)`` and the gradient rows, shape ``(k, *row)``, of the parameter's dtype; or
        None (no row).  ``grads`` is a list in parameter order, or a dict keyed by parameter
        name (missing names: None).

        Only the rows present are read and written, parameter and state alike, by the compiled
        row kernel (in parallel across rows).  Duplicate indices are summed first, as torch
        coalesces a sparse gradient.  Every group's step count advances (bias corrections and
        ``lr_decay`` use it, as torch's per-parameter ``step`` does); schedules advance as with
        :meth:`step`.  SGD and Adagrad give the dense update with zero gradient rows;
        SparseAdam is lazy (absent rows' moments do not decay).  See
        :mod:`fastoptim.engine.sparse` for what is refused (``weight_decay``, SGD's
        ``momentum``, the precision and gradient-transform options); everything is checked
        before any array is written.

            >>> import numpy as np, fastoptim as fo
            >>> table = np.zeros((4, 2), np.float32)
            >>> opt = fo.SparseAdam([table], lr=0.1)
            >>> opt.step_rows([(np.array([2, 0, 2]), np.ones((3, 2), np.float32))])
            >>> print(table.round(3))
            [[-0.1 -0.1]
             [ 0.   0. ]
             [-0.1 -0.1]
             [ 0.   0. ]]
        """
        where = f"{type(self).__name__}.step_rows"
        with self._lock:
            self._check_not_swapped(where)
            for g, group in zip(self._groups, self.param_groups):
                if group != g.synced:
                    self._refresh()
                    break
            keys = [k for g in self._groups for k in g.keys]
            flat = sparse.entries(where, grads, keys, bool(self._named))
            work: list[tuple[_Group, int, np.ndarray, np.ndarray, list[np.ndarray]]] = []
            pos = 0
            for g, group in zip(self._groups, self.param_groups):
                sparse.check_group(self._definition, where, group)
                _check_given(g, f"{where}: ")
                for i, param in enumerate(g.params):
                    at = f"{where}: param {g.labels[i]}"
                    entry = sparse.pair(at, flat[pos])
                    pos += 1
                    if entry is None:
                        continue
                    if g.outs is not None and g.outs[i] is not None:
                        raise ValueError(
                            f"{at}: row updates do not write copy-out arrays (set_copy_out): its "
                            "copy would keep the old rows; remove it (set_copy_out(None)) or use "
                            "dense gradients"
                        )
                    states = [g.states[n][i] for n in g.hyper.state_names()]
                    sparse.check_arrays(at, param, states, group.get(precision.ROUNDING))
                    idx, rows = sparse.coalesce(at, param, *entry)
                    work.append((g, i, idx, rows, states))
            try:
                self._run_rows(work)
            except BaseException as e:  # (the kernel's checks, in step_rows' words)
                name_the_call(e, type(self).__name__, "step_rows")
                raise

    def _run_rows(
        self, work: list[tuple[_Group, int, np.ndarray, np.ndarray, list[np.ndarray]]]
    ) -> None:
        """Hook: the row updates of one step, ``(group, parameter number, indices, rows,
        states)`` each, and the step's bookkeeping: one compiled call that checks every job
        before it writes any (:func:`run_rows`), so an error or an interrupt never leaves a
        half-applied step (:mod:`fastoptim.reference` computes them in NumPy)."""
        jobs = [
            (g.hyper, g.step + 1, g.params[i], idx, rows, states, g.labels[i])
            for g, i, idx, rows, states in work
        ]
        run_rows(self._definition.core_rows, jobs, self._after_step)

    def _decide(
        self, scale: float | None, per_group: list[list[np.ndarray]]
    ) -> transforms.Decision:
        """The gradient transform of this step (reading the gradients when a group clips the
        norm or skips non-finite steps), set on every plan unless the step is skipped."""
        plans = [[g.plan] for g in self._groups]
        decision = transforms.decide(plans, self.param_groups, scale, reduce=self.reduce_grad_stats)
        if decision.skip:  # (the plans may hold the statistics pass's transform)
            self._transformed = True
        else:
            for (plan,), t in zip(plans, decision.transforms):
                transforms.set_transform(plan, *t)
            self._transformed = any(t != (1.0, math.inf) for t in decision.transforms)
        return decision

    def _transform(
        self, decision: transforms.Decision, i: int, grads: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Group `i`'s gradients as the kernels see them (for a step computed in Python)."""
        return grads

    def ema_weights(self) -> contextlib.AbstractContextManager[None]:
        pairs = [
            (p, ema)
            for g in self._groups
            for p, ema in zip(g.params, g.states.get(precision.EMA, ()))
            if ema is not None
        ]
        return transforms.ema_swapped(
            self,
            f"{type(self).__name__}.ema_weights",
            pairs,
            lambda dst, src: np.copyto(dst, src, casting="unsafe"),
            np.copy,
        )

    ema_weights.__doc__ = transforms.EMA_WEIGHTS_DOC

    def _after_step(self) -> None:
        """The bookkeeping of a step that happened: step counts, fresh state buffers used,
        the schedules' values for the next step."""
        self._t += 1
        for g, group in zip(self._groups, self.param_groups):
            g.step += 1
            g.plan_steps += 1
            if g.fresh_copies:
                g.fresh_copies.clear()
            if g.fresh:
                g.fresh.clear()
                self._sync(g, g.synced)  # (the values the step validated and used)
            if g.sched.specs:
                self._advance(g, group)

    # ------------------------------------------------------------------ pickle, deepcopy
    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (and deep-copied) as its parameters, groups (schedules included) and
        :meth:`state_dict`, like a torch optimizer with its parameters.  An attached
        :class:`~fastoptim.schedules.ReduceLROnPlateau` is not included.  Refused
        (``RuntimeError``) inside :meth:`ema_weights`, where the parameters hold their EMA."""
        with self._lock:
            self._check_not_swapped(f"{type(self).__name__}: pickling (or deepcopy)")
            groups = []
            for g, group in zip(self._groups, self.param_groups):
                entry = {k: g.sched.specs.get(k, v) for k, v in group.items() if k != "params"}
                entry["params"] = dict(zip(g.keys, g.params)) if self._named else list(g.params)
                groups.append(entry)
            sd = {**self._state_dict(copy=False), "plateau": None}
            return (_rebuild, (type(self), groups, self.defaults, sd))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain data: ``format``, ``optimizer`` (the
        class name), ``step_count``, ``param_groups`` (per group: parameter keys, its own step
        count, hyper-parameters with schedules as :meth:`~fastoptim.schedules.Schedule.describe`
        dicts, state names, NAdam's ``mu_product``, the parameters' ``shapes``...), ``state``
        (parameter name or position -> state name -> a **copy** of the array, in its own dtype)
        and ``plateau`` (an attached :class:`~fastoptim.schedules.ReduceLROnPlateau`'s state, or
        None).  :func:`fastoptim.save` writes the same content (and the parameters) to one file.

        Taken under the optimizer's lock: a step running in another thread completes first,
        never half of it in the copy.  Allowed inside :meth:`ema_weights` (the state holds
        no parameter values)."""
        with self._lock:
            if self._torn is not None:  # (inside ema_weights() is fine: no parameter in it)
                raise RuntimeError(f"{type(self).__name__}.state_dict: {self._torn}")
            return self._state_dict(copy=True)

    def _state_dict(self, copy: bool) -> dict[str, Any]:
        self._refresh()  # entries set since the last step: as the next step will see them
        groups, state = [], {}
        for g in self._groups:
            specs = g.sched.specs  # (the validated values: an entry set to an equal value
            # of another type, e.g. seed=0.0 for 0, is what the steps used, not what loads)
            hyper = {k: _to_data(specs.get(k, v)) for k, v in g.synced.items() if k != "params"}
            groups.append(
                {
                    "params": list(g.keys),
                    "step": g.step,
                    "hyper": hyper,
                    "states": sorted(g.states),
                    "fresh": sorted(g.fresh),
                    "scalars": {n: float(getattr(g.hyper, n)) for n in self._scalar_names()},
                    "lr_scale": g.sched.lr_scale,
                    "lr_floor": g.sched.lr_floor,
                    "shapes": [list(p.shape) for p in g.params],
                }
            )
            for i, key in enumerate(g.keys):
                state[key] = {
                    n: (views[i].copy() if copy else views[i])
                    for n, views in g.states.items()
                    if views[i] is not None
                }
        return {
            "format": STATE_FORMAT,
            "optimizer": type(self).__name__,
            "step_count": self._t,
            "param_groups": groups,
            "state": state,
            "plateau": None if self._plateau is None else self._plateau.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`'s content into this optimizer (its arrays are copied
        into the optimizer's own state buffers).

        Everything is checked first: the optimizer class, the groups' parameter keys, the
        hyper-parameters (schedules are rebuilt from their descriptions), and every state
        array's name, shape and dtype (never cast).  A mismatch raises one ``ValueError``
        listing every missing, unexpected and mismatched entry, and changes nothing.  With
        ``strict=False``, parameters absent from `state_dict` keep their state and entries
        for unknown parameters are ignored (shapes and dtypes must still match); a parameter
        both have must be in the same group in both (its state and its group's
        hyper-parameters go together), or ``ValueError``.

        The parameters are not touched, nor their copy-out arrays (:meth:`set_copy_out`):
        restore both yourself (:func:`fastoptim.load` does, from its file).  A state that
        `state_dict` does not have (``max_exp_avg_sq`` of a state saved with
        ``amsgrad=False``) is dropped, as if never allocated: it is created, as in a new
        optimizer, when an option needs it.  Taken under the optimizer's lock; refused
        (``RuntimeError``) inside :meth:`ema_weights`."""
        where = f"{type(self).__name__}.load_state_dict"
        with self._lock:
            self._check_not_swapped(where, loading=True)
            self._loader(state_dict, strict, where)()
            self._torn = None

    def _check_not_swapped(self, where: str, *, loading: bool = False) -> None:
        """RuntimeError inside :meth:`ema_weights` (for what records or replaces the
        parameters: a step, a checkpoint, pickling), and, but for a load (`loading`), after a
        load that stopped half-way (:func:`fastoptim.load`)."""
        if self._ema_swapped:
            transforms.check_not_swapped(self, where)
        if self._torn is not None and not loading:
            raise RuntimeError(f"{where}: {self._torn}")

    def _write_copy_outs(self) -> None:
        """Each copy-out array (:meth:`set_copy_out`) := its parameter rounded to nearest:
        the bits a step with ``rounding="nearest"`` leaves there, NaN and overflow included
        (the driver's store; NumPy's cast keeps a NaN's payload where it quiets it)
        (:func:`fastoptim.load`)."""
        for g in self._groups:
            for p, out in zip(g.params, g.outs or ()):
                if out is not None:
                    _core.round_to(out, p)

    def _loader(self, sd: Mapping[str, Any], strict: bool, where: str) -> Callable[[], None]:
        """Validate `sd` completely; return the function that applies it (cannot fail)."""
        cls = type(self).__name__
        if not isinstance(sd, Mapping) or sd.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{where}: not a fastoptim optimizer state (format != {STATE_FORMAT!r})"
            )
        wanted = {"format", "optimizer", "step_count", "param_groups", "state", "plateau"}
        if set(sd) != wanted:
            raise ValueError(
                f"{where}: malformed state: missing {sorted(wanted - set(sd))}, "
                f"unexpected {sorted(set(sd) - wanted)}"
            )
        if sd["optimizer"] != cls:
            raise ValueError(f"{where}: this is the state of {sd['optimizer']}, not of {cls}")
        records = sd["param_groups"]
        keras = "learning_rate" in self.defaults  # (fastoptim.keras's classes: Keras's names)
        mine, other = ("learning_rate", "lr") if keras else ("lr", "learning_rate")
        if isinstance(records, Sequence) and any(
            isinstance(r, Mapping)
            and isinstance(r.get("hyper"), Mapping)
            and other in r["hyper"]
            and mine not in r["hyper"]
            for r in records
        ):
            names = [f"fastoptim.{cls} (torch's convention)", f"fastoptim.keras.{cls} (Keras's)"]
            raise ValueError(
                f"{where}: this is the state of {names[not keras]}, not of {names[keras]}"
            )
        t = sd["step_count"]
        if not _is_count(t):
            raise ValueError(f"{where}: step_count must be an int >= 0, got {t!r}")
        state = sd["state"]
        if not isinstance(records, Sequence) or len(records) != len(self._groups):
            n = len(records) if isinstance(records, Sequence) else records
            raise ValueError(
                f"{where}: the state has {n} parameter groups, this optimizer has "
                f"{len(self._groups)}"
            )
        if not isinstance(state, Mapping):
            raise ValueError(f"{where}: 'state' must be a dict, got {type(state).__name__}")
        problems: list[str] = []
        plans = []
        for gi, (g, group, rec) in enumerate(zip(self._groups, self.param_groups, records)):
            plan = self._load_group(gi, g, group, rec, state, strict, int(t), problems)
            plans.append(plan)
        home = _homes(records)
        moved = _moved(self._groups, home)
        if moved:
            problems.append(moved)
        # What applying writes (or builds a plan of) must take it: nothing fails half-way.
        problems += [f"param {lab} was made read-only" for g in self._groups
                     for lab, p in zip(g.labels, g.params) if not p.flags.writeable]  # fmt: skip
        if self._copy_outs:
            try:
                self._check_copy_outs(where)
            except ValueError as e:
                problems.append(str(e).removeprefix(f"{where}: "))
        extra = [k for k in state if k not in home]
        if extra:
            problems.append(f"state for parameters listed in no group: {extra}")
        plateau = sd["plateau"]
        if plateau is not None and self._plateau is None:
            problems.append(
                "the state has a ReduceLROnPlateau; attach one first "
                "(schedules.ReduceLROnPlateau(optimizer, ...)) with the same settings"
            )
        if plateau is None and self._plateau is not None and strict:
            problems.append("this optimizer has a ReduceLROnPlateau, the state has none")
        if problems:
            raise ValueError(
                f"{where}: the state does not match this {cls}:\n  - " + "\n  - ".join(problems)
            )

        def apply() -> None:
            if plateau is not None:
                self._plateau.load_state_dict(plateau)  # checks its settings before any change
            for plan in plans:
                plan()
            self._t = int(t)
            for g, group in zip(self._groups, self.param_groups):
                if g.sched.specs:
                    g.sched.evaluate(group, self._t)
                self._sync(g, group)
                self._ensure_plan(g, group)
                g.synced = _snapshot(group)

        return apply

    def _load_group(
        self,
        gi: int,
        g: _Group,
        group: dict[str, Any],
        rec: Any,
        state: Mapping[Any, Any],
        strict: bool,
        t: int,
        problems: list[str],
    ) -> Callable[[], None]:
        """Check group `gi`'s record (appending to `problems`); return what applies it."""
        where = f"group {gi}"
        fields = {"params", "step", "hyper", "states", "fresh", "scalars", "lr_scale", "lr_floor"}
        # ("shapes", the parameters' shapes: absent from a fastoptim 0.1 state)
        if not isinstance(rec, Mapping) or not fields <= set(rec) <= fields | {"shapes"}:
            problems.append(f"{where}: malformed group record")
            return lambda: None
        keys = _param_keys(rec)
        if keys is None:
            problems.append(f"{where}: malformed parameter keys {rec['params']!r}")
            return lambda: None
        shapes = rec.get("shapes")
        if shapes is not None:
            if not (
                isinstance(shapes, list)
                and len(shapes) == len(keys)
                and all(isinstance(s, list) and all(map(_is_count, s)) for s in shapes)
            ):
                problems.append(f"{where}: malformed parameter shapes {shapes!r}")
                shapes = []
            for key, shape in zip(keys, shapes):
                if key in g.keys:  # (4-bit codes are flat: the state's shape cannot tell)
                    i = g.keys.index(key)
                    if tuple(shape) != g.params[i].shape:
                        problems.append(
                            f"param {g.labels[i]}: the state of a parameter of shape "
                            f"{tuple(shape)}, this one is {g.params[i].shape}"
                        )
        missing = [k for k in g.keys if k not in keys]
        unexpected = [k for k in keys if k not in g.keys]
        if strict and (missing or unexpected):
            problems.append(f"{where} parameters: missing {missing}, unexpected {unexpected}")
        hyper = rec["hyper"]
        mine = set(group) - {"params"}
        if not isinstance(hyper, Mapping) or set(hyper) != mine:
            given = set(hyper) if isinstance(hyper, Mapping) else set()
            problems.append(
                f"{where} hyper-parameters: missing {sorted(mine - given)}, "
                f"unexpected {sorted(given - mine)}"
            )
            return lambda: None
        # ReduceLROnPlateau's accumulated factor and floor on a scheduled lr.
        if not (_real(rec["lr_scale"]) and 0 <= rec["lr_scale"] <= 1):
            problems.append(
                f"{where}: lr_scale must be a number in [0, 1], got {rec['lr_scale']!r}"
            )
            return lambda: None
        if not (_real(rec["lr_floor"]) and rec["lr_floor"] >= 0):
            problems.append(f"{where}: lr_floor must be a number >= 0, got {rec['lr_floor']!r}")
            return lambda: None
        # The group as it will be: constants, and schedules rebuilt and evaluated at t.
        trial = self._new_sched()
        trial.lr_scale, trial.lr_floor = rec["lr_scale"], rec["lr_floor"]
        values: dict[str, Any] = {}
        for k, v in hyper.items():
            try:  # (a state_dtype dict is plain data, never a schedule description)
                spec = (
                    v
                    if k == precision.STATE_DTYPE
                    else _from_data(v, g.sched.specs.get(k, group[k]))
                )
            except ValueError as e:
                problems.append(f"{where} {k}: {e}")
                continue
            values[k] = spec
            if _has_schedule(spec):
                trial.specs[k] = spec
        names = rec["states"]
        fresh = rec["fresh"]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            problems.append(f"{where}: malformed state names {names!r}")
            return lambda: None
        kept = [s.name for s in self._definition.states] + list(precision.EXTRA_STATES)
        unknown = sorted(set(names) - {*kept, *(n + precision.ABSMAX for n in kept)})
        if unknown:  # (else kept: a buffer under any name, "step" shadowing the count...)
            problems.append(
                f"{where}: unexpected state names {unknown} ({type(self).__name__}'s states: "
                f"{sorted(kept)})"
            )
            return lambda: None
        if not (isinstance(fresh, list) and set(fresh) <= set(names)):
            problems.append(f"{where}: malformed fresh-state list {fresh!r}")
            return lambda: None
        if not _is_count(rec["step"]):
            problems.append(f"{where}: step must be an int >= 0, got {rec['step']!r}")
        scalars = rec["scalars"]
        if not isinstance(scalars, Mapping):
            problems.append(
                f"{where}: the scalar state must be a dict of {self._scalar_names()}, got "
                f"{type(scalars).__name__} {scalars!r:.60}"
            )
            return lambda: None
        if set(scalars) != set(self._scalar_names()):
            problems.append(
                f"{where}: the scalar state holds {sorted(scalars)}, this optimizer's is "
                f"{self._scalar_names()}"
            )
            return lambda: None
        for n, v in scalars.items():  # NAdam's mu_product, ASGD's eta and mu
            problem = self._definition.scalar_problem(n, v)
            if problem is not None:
                problems.append(f"{where}: scalar state {problem}")
                return lambda: None
        mismatch = _precision_mismatch(where, values, group)
        if mismatch:
            problems.append(mismatch)
            return lambda: None
        # Per parameter: the buffers it has (the precision policy gives master copies and
        # compensation to low-precision parameters only) and their dtypes.
        layout = self._layout(g, {**group, **values}, names)
        if len(values) == len(hyper):
            try:
                trial.evaluate(values, t)
                trial.check(values, t)
                h = self._hyper_type()
                self._sync_struct(h, values, set(fresh))
                # the kernel's states, an EMA, master copies and compensation
                needed = {*h.state_names(), *(n for b in layout for n in b)}
                if not needed <= set(names):
                    problems.append(
                        f"{where}: state names {names} lack {sorted(needed - set(names))}"
                    )
            except (TypeError, ValueError) as e:
                problems.append(f"{where}: {e}")
        loaded = []
        for key in keys:
            if key not in g.keys:
                continue
            i = g.keys.index(key)
            entry = state.get(key)
            expected = [n for n in names if n in layout[i]]
            if not isinstance(entry, Mapping) or set(entry) != set(expected):
                have = sorted(entry) if isinstance(entry, Mapping) else "none"
                problems.append(
                    f"state of parameter {g.labels[i]}: has {have}, expected {expected}"
                )
                continue
            p = g.params[i]
            for n in expected:
                own = self._definition.state_shape(n, p.shape)
                assert own is not None  # (not in the layout otherwise)
                kind, shape = precision.storage(layout[i][n], own)
                a, want = entry[n], _dtype(kind)
                if not isinstance(a, np.ndarray) or a.dtype != want or a.shape != shape:
                    got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                    problems.append(
                        f"state {n!r} of param {g.labels[i]}: {got}, expected {want} {shape}"
                    )
                elif layout[i][n] in (precision.ABSMAX_KIND, precision.ABSMAX4_KIND):
                    problem = precision.absmax_problem(a)
                    if problem:
                        problems.append(f"state {n!r} of param {g.labels[i]}: {problem}")
                held = g.states.get(n)
                if held and held[i] is not None and not held[i].flags.writeable:
                    problems.append(f"state {n!r} of param {g.labels[i]} was made read-only")
            loaded.append((i, entry))
        if keys != g.keys and values.get("rounding", group.get("rounding")) == "stochastic":
            # (before anything is applied: as an error under -W error, it refuses the load)
            warnings.warn(
                f"{type(self).__name__}: {where}'s parameters are {g.keys}, the checkpoint's "
                f"{keys}: stochastic rounding draws by a parameter's position, so the run "
                "continues with other random draws than the run that saved it (not bit for "
                "bit); list the parameters in the saved order to resume it exactly",
                RuntimeWarning,
                stacklevel=4,
            )

        def apply() -> None:
            for n in [n for n in g.states if n not in names]:
                # A state the checkpoint does not have (max_exp_avg_sq saved without AMSGrad):
                # none, as in a new optimizer; an option that needs it allocates it anew.
                del g.states[n]
                g.arenas.pop(n, None)
            for n in names:  # buffers the optimizer does not have yet
                if n not in g.states:
                    self._allocate(g, n, self._state_fill(n, values), layout)
            for i, entry in loaded:
                for n in entry:
                    np.copyto(g.states[n][i], entry[n])
            g.fresh = {n for n in fresh if n not in precision.COPIES}
            g.fresh_copies = set()
            g.step = int(rec["step"])
            for n, v in scalars.items():
                setattr(g.hyper, n, float(v))
            trial.written, trial.pending = {}, {}
            trial.lr_scale, trial.lr_floor = float(rec["lr_scale"]), float(rec["lr_floor"])
            g.sched = trial
            for k, v in values.items():
                group[k] = dict(v) if isinstance(v, Mapping) else v  # (not the loaded dict's)

        return apply

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            specs = self._groups[i].sched.specs
            for k in sorted(group):
                if k != "params":
                    sched = f"  <- {specs[k]!r}" if k in specs else ""
                    lines.append(f"    {k}: {group[k]}{sched}")
        return "\n".join(lines) + "\n)"


def _rebuild(
    cls: type[Optimizer], groups: list[dict[str, Any]], defaults: dict[str, Any], sd: Any
) -> Optimizer:
    """Unpickle an optimizer (see :meth:`Optimizer.__reduce__`)."""
    opt = cls.__new__(cls)
    Optimizer.__init__(opt, groups, defaults)
    opt.load_state_dict(sd)
    return opt


# ---------------------------------------------------------------------- checkpoint helpers
def _homes(records: Sequence[Any]) -> dict[Any, int]:
    """Parameter key -> the number of the group that lists it in a state's group records."""
    home: dict[Any, int] = {}
    for gi, rec in enumerate(records):
        for k in _param_keys(rec) or ():
            home.setdefault(k, gi)
    return home


def _param_keys(rec: Any) -> list[Any] | None:
    """A saved group record's parameter keys (names or positions), or None if malformed."""
    keys = rec.get("params") if isinstance(rec, Mapping) else None
    if not isinstance(keys, (list, tuple)) or not all(
        isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys
    ):
        return None
    return list(keys)


def _moved(groups: Sequence[_Group], home: Mapping[Any, int]) -> str:
    """The problem if a parameter is in another group than in a saved state (`home`, from
    :func:`_homes`): its state and hyper-parameters are the other group's (even with
    ``strict=False``, which only skips parameters one side does not have)."""
    moved = [
        f"{g.labels[i]} (group {gi} here, {home[k]} in the state)"
        for gi, g in enumerate(groups)
        for i, k in enumerate(g.keys)
        if home.get(k, gi) != gi
    ]
    if not moved:
        return ""
    return (
        f"parameters in another group than in the state: {', '.join(moved)}; build the "
        "optimizer's groups as they were saved"
    )


def _precision_mismatch(where: str, saved: Mapping[str, Any], group: Mapping[str, Any]) -> str:
    """The problem if a group saved with hyper-parameters `saved` has other precision options
    (state_dtype, master_weights, kahan) than `group`: they decide the state's dtypes."""
    for k in (precision.STATE_DTYPE, precision.MASTER_WEIGHTS, precision.KAHAN):
        value = saved.get(k, group.get(k))
        if (precision.normalize(value) if k == precision.STATE_DTYPE else value) != group.get(k):
            return (
                f"{where}: the state was saved with {k}={value!r}, this optimizer has "
                f"{k}={group.get(k)!r} (precision options decide the state's dtypes: build "
                "the optimizer with the same ones)"
            )
    return ""


def _plan_states(states: Mapping[str, list[Any]], name: str) -> list[Any]:
    """State `name` of each parameter as the compiled plan takes it: an array, or the pair
    (codes, absmax) of a quantized one."""
    scales = states.get(name + precision.ABSMAX)
    if scales is None:
        return states[name]
    return [v if a is None else (v, a) for v, a in zip(states[name], scales)]


def _is_count(v: Any) -> bool:
    """A step count: an int >= 0 whose successor still fits the kernels' int64."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and bool(0 <= v < 2**63 - 1)


def _real(v: Any) -> bool:
    """A finite real number (not a bool)."""
    if not is_number(v):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond any float
        return False
