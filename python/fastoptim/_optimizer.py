"""The machinery every optimizer shares: parameter groups, state arenas, gradient buffers, the
step.  Each optimizer class (optimizers.py) only adds its signature, defaults, validation and the
mapping of its hyper-parameters onto the compiled kernel's."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Union

import numpy as np

from . import _core

Key = Union[int, str]
Params = Union[
    Sequence[np.ndarray],
    Mapping[str, np.ndarray],
    Sequence[Mapping[str, Any]],
    Iterable[np.ndarray],
]
Grads = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]

_FLAGS = frozenset({"nesterov", "maximize", "amsgrad", "centered", "decoupled_weight_decay"})
_ALIGN = 64  # bytes: every state / gradient view starts on a cache line


_FIELDS: dict[Any, frozenset[str]] = {}


def _hyper_fields(hyper_type: Any) -> frozenset[str]:
    """Names of the compiled hyper-parameter struct's fields."""
    if hyper_type not in _FIELDS:
        h = hyper_type()
        _FIELDS[hyper_type] = frozenset(
            n for n in dir(h) if not n.startswith("_") and not callable(getattr(h, n))
        )
    return _FIELDS[hyper_type]


def _defaults(local_vars: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer's hyper-parameter defaults from its ``__init__``'s ``locals()``: every
    argument but ``self`` and ``params``, so the signature is the single source of truth."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "params", "__class__")}


def _snapshot(group: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a group's entries that later in-place edits cannot reach (lists become
    tuples, so mutating a list of betas counts as a change)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in group.items()}


def _label(key: Key) -> str:
    return repr(key) if isinstance(key, str) else str(key)


def _arena(arrays: Sequence[np.ndarray], fill: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """One contiguous, 64-byte-aligned buffer holding an array like each of `arrays`."""
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    raw = np.empty(total + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    block = raw[start : start + total]
    views = [
        block[o : o + a.nbytes].view(a.dtype).reshape(a.shape) for o, a in zip(offsets, arrays)
    ]
    for v in views:
        v.fill(fill)
    return block, views


class _Group:
    """What the optimizer keeps per parameter group besides the user-visible dict."""

    def __init__(self, keys: list[Key], params: tuple[np.ndarray, ...], hyper: Any) -> None:
        self.keys = keys
        self.labels = [_label(k) for k in keys]
        self.params = params
        self.hyper = hyper  # the compiled kernel's hyper-parameter struct
        self.step = 0  # int64 count of updates applied to this group
        self.states: dict[str, list[np.ndarray]] = {}  # state name -> per-param views
        self.arenas: dict[str, np.ndarray] = {}  # state name -> contiguous block
        self.fresh: set[str] = set()  # states allocated but not yet used by a step
        self.plan: Any = None
        self.plan_states: tuple[str, ...] | None = None
        self.grad_block: np.ndarray | None = None
        self.grads: list[np.ndarray] | None = None
        self.bound_own = False  # the plan points at self.grads
        self.params_view: Any = None  # what param_groups[i]["params"] holds
        self.synced: dict[str, Any] = {}  # the group's entries as last validated and synced


class Optimizer:
    """Base class of fastoptim's optimizers (see :mod:`fastoptim.optimizers`).

    Parameters are NumPy arrays (float32 or float64, C-contiguous, writeable, native byte
    order) that every :meth:`step` updates **in place**; nothing is ever copied.
    """

    _hyper_type: ClassVar[Any]  # the compiled module's XxxHyper class
    _core_step: ClassVar[Any]  # the compiled module's step_xxx function

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self._groups: list[_Group] = []
        self._named: bool | None = None
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

    # ------------------------------------------------------------------ per-optimizer hooks
    # _check and _core_values are classmethods: the functional tier (functional.py) calls them
    # without an optimizer instance.
    _closed_unit: ClassVar[frozenset[str]] = frozenset()  # hyper-parameters in [0, 1]

    @classmethod
    def _check(cls, group: Mapping[str, Any]) -> None:
        """Raise TypeError/ValueError naming any invalid hyper-parameter of `group`: flags must
        be bools, ``betas`` a pair in [0, 1), the names in ``_closed_unit`` in [0, 1], every
        other value a finite number >= 0.  Subclasses add rules that relate values."""
        name = cls.__name__
        for key, value in group.items():
            if key == "params":
                continue
            if key in _FLAGS:
                check_flag(name, key, value)
            elif key == "betas":
                check_betas(name, value)
            elif key in cls._closed_unit:
                check_unit(name, key, value, closed=True)
            else:
                check_nonnegative(name, key, value)

    @classmethod
    def _core_values(cls, group: Mapping[str, Any], fresh: set[str]) -> dict[str, Any]:
        """The compiled kernel's hyper-parameters for `group` (field name -> value): the
        group's entries of the same name, and ``betas`` as ``beta1``/``beta2``.  `fresh`: the
        state buffers just created (not yet used by a step)."""
        fields = _hyper_fields(cls._hyper_type)
        values = {k: v for k, v in group.items() if k in fields}
        if "betas" in group:
            values["beta1"], values["beta2"] = group["betas"]
        return values

    def _state_fill(self, name: str, group: Mapping[str, Any]) -> float:
        """Initial value of state buffer `name`."""
        return 0.0

    # ------------------------------------------------------------------ groups
    def _check_keys(self, group: Mapping[str, Any]) -> None:
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown hyper-parameter(s) {sorted(unknown)} in a group"
            )

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group of parameters (``{"params": list or dict, "lr": ..., ...}``); missing
        hyper-parameters take the optimizer's defaults."""
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
        self._check(group)
        g = _Group(keys, arrays, self._hyper_type())
        # Validate the arrays (type, dtype, layout, aliasing within the group) before keeping
        # anything: a plan without state does exactly that.
        _core.Plan(list(arrays), g.labels, [], [])
        everything = [p for old in self._groups for p in old.params] + list(arrays)
        labels = ["param " + lab for old in self._groups for lab in old.labels] + [
            "param " + lab for lab in g.labels
        ]
        _core.check_disjoint(everything, labels)
        self._named = named
        self._sync(g, group)
        self._ensure_plan(g, group)
        # Read-only on purpose: the compiled plan is fixed; use add_param_group to add more.
        g.params_view = MappingProxyType(dict(zip(keys, arrays))) if named else arrays
        group["params"] = g.params_view
        g.synced = _snapshot(group)
        self.param_groups.append(group)
        self._groups.append(g)

    # ------------------------------------------------------------------ state and plans
    def _sync(self, g: _Group, group: Mapping[str, Any]) -> None:
        for name, value in self._core_values(group, g.fresh).items():
            setattr(g.hyper, name, value)

    def _ensure_plan(self, g: _Group, group: Mapping[str, Any]) -> None:
        names = tuple(g.hyper.state_names())
        if names == g.plan_states:
            return
        for name in names:
            if name not in g.states:
                g.arenas[name], g.states[name] = _arena(g.params, self._state_fill(name, group))
                g.fresh.add(name)
        g.plan = _core.Plan(list(g.params), g.labels, list(names), [g.states[n] for n in names])
        g.plan_states = names
        g.bound_own = False
        self._sync(g, group)  # `fresh` may have changed

    def _own_grads(self, g: _Group) -> list[np.ndarray]:
        if g.grads is None:
            g.grad_block, g.grads = _arena(g.params, 0.0)
        return g.grads

    @property
    def grads(self) -> list[np.ndarray] | dict[str, np.ndarray]:
        """Gradient buffers owned by the optimizer (zeros at first, same shapes and dtypes as
        the parameters, one contiguous block per group): write gradients into them and call
        :meth:`step` with no argument.  A list, or a dict when parameters are named."""
        pairs = [(k, a) for g in self._groups for k, a in zip(g.keys, self._own_grads(g))]
        if self._named:
            return {str(k): a for k, a in pairs}
        return [a for _, a in pairs]

    def zero_grad(self) -> None:
        """Set the optimizer's gradient buffers (:attr:`grads`) to zero."""
        for g in self._groups:
            if g.grad_block is not None:
                g.grad_block.fill(0)

    @property
    def state(self) -> dict[Key, dict[str, Any]]:
        """Per-parameter state: NumPy views into the group's state arenas (torch's names:
        ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...) plus the group's ``step`` count.
        Writing into a view changes the optimizer's state."""
        out: dict[Key, dict[str, Any]] = {}
        for g in self._groups:
            for i, key in enumerate(g.keys):
                entry: dict[str, Any] = {"step": g.step}
                for name, views in g.states.items():
                    entry[name] = views[i]
                out[key] = entry
        return out

    # ------------------------------------------------------------------ the step
    def _split_grads(self, grads: Grads) -> list[list[np.ndarray]]:
        cls = type(self).__name__
        total = sum(len(g.params) for g in self._groups)
        if isinstance(grads, Mapping):
            if not self._named:
                raise TypeError(
                    f"{cls}.step: grads is a dict but the parameters were given as a list; "
                    "pass a list of gradients in parameter order"
                )
            keys = [str(k) for g in self._groups for k in g.keys]  # named: all str
            missing = [k for k in keys if k not in grads]
            extra = [k for k in grads if k not in set(keys)]
            if missing or extra:
                raise ValueError(
                    f"{cls}.step: grads keys do not match the parameters: "
                    f"missing {missing}, unexpected {extra}"
                )
            return [[grads[str(k)] for k in g.keys] for g in self._groups]
        if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence):
            raise TypeError(
                f"{cls}.step: grads must be a list of arrays in parameter order"
                + (" or a dict keyed by parameter name" if self._named else "")
                + f", got {type(grads).__name__}"
            )
        if len(grads) != total:
            raise ValueError(f"{cls}.step: expected {total} gradients, got {len(grads)}")
        out, start = [], 0
        for g in self._groups:
            out.append(list(grads[start : start + len(g.params)]))
            start += len(g.params)
        return out

    def _prepare(self, grads: Grads | None) -> list[list[np.ndarray]]:
        """Validate everything a step needs and bind the gradients; touches no element."""
        changed = [
            (g, group)
            for g, group in zip(self._groups, self.param_groups)
            if group != g.synced  # hyper-parameters set since the last step
        ]
        for g, group in changed:
            if group.get("params") is not g.params_view:
                raise ValueError(
                    f"{type(self).__name__}: a group's 'params' entry cannot be replaced; "
                    "use add_param_group or a new optimizer"
                )
            self._check_keys(group)
            self._check(group)
        for g, group in changed:
            self._sync(g, group)
            self._ensure_plan(g, group)
            g.synced = _snapshot(group)
        if grads is None:
            per_group = [self._own_grads(g) for g in self._groups]
            for g, gr in zip(self._groups, per_group):
                if not g.bound_own:
                    g.plan.bind_grads(gr)
                    g.bound_own = True
            return per_group
        per_group = self._split_grads(grads)
        for g in self._groups:
            g.bound_own = False
        for g, gr in zip(self._groups, per_group):
            g.plan.bind_grads(gr)
        if len(self._groups) > 1:  # a gradient must not alias another group's parameter
            arrays = [a for g, gr in zip(self._groups, per_group) for a in (*g.params, *gr)]
            labels = [
                f"{what} {lab}"
                for g in self._groups
                for what in ("param", "grad for param")
                for lab in g.labels
            ]
            _core.check_disjoint(arrays, labels)
        return per_group

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        """Apply one update to group `g` (gradients already bound to its plan)."""
        type(self)._core_step(g.plan, g.hyper, g.step + 1)

    def step(self, grads: Grads | None = None) -> None:
        """Update every parameter in place.

        ``grads``: a list of gradient arrays in parameter order, or a dict keyed by parameter
        name; ``None`` uses :attr:`grads`.  Everything (hyper-parameters, every gradient's
        dtype, shape, layout and aliasing) is validated before any array is modified: a
        rejected call changes nothing.
        """
        per_group = self._prepare(grads)
        for g, group, gr in zip(self._groups, self.param_groups, per_group):
            self._run(g, gr)
            g.step += 1
            if g.fresh:
                g.fresh.clear()
                self._sync(g, group)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(group):
                if k != "params":
                    lines.append(f"    {k}: {group[k]}")
        return "\n".join(lines) + "\n)"


# ---------------------------------------------------------------------- validation helpers
def check_nonnegative(cls: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{cls}: {name} must be a number, got {type(value).__name__}")
    if not (value >= 0.0) or math.isinf(value):
        raise ValueError(f"{cls}: invalid {name}={value!r}: must be finite and >= 0")


def check_unit(cls: str, name: str, value: Any, closed: bool = False) -> None:
    """0 <= value < 1 (or <= 1 when `closed`)."""
    check_nonnegative(cls, name, value)
    if value > 1.0 or (value == 1.0 and not closed):
        raise ValueError(
            f"{cls}: invalid {name}={value!r}: must be in [0, 1{']' if closed else ')'}"
        )


def check_betas(cls: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{cls}: betas must be a pair (beta1, beta2), got {betas!r}")
    check_unit(cls, "betas[0]", betas[0])
    check_unit(cls, "betas[1]", betas[1])


def check_flag(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{cls}: {name} must be a bool, got {value!r}")
