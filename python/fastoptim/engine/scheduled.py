"""The schedules of one parameter group, for every tier.

A group dict always holds plain values: the value of each scheduled hyper-parameter for the
*next* update (as torch's LR schedulers leave it).  :class:`Scheduled` remembers, per group,
the schedule behind each such entry (``specs``), the value it last wrote there (``written``: a
different value found there was assigned since, and replaces the schedule; an equal one cannot
be told from no assignment: ``schedules.constant(v)`` is how to freeze one) and the error a
schedule raised when asked for the next update's value (``pending``: raised by the next step,
before it changes anything).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..schedules import _has_schedule, _is_schedule
from .definition import FLAG, Definition, is_number

_NUMBERS = (int, float, np.integer, np.floating)


def same(a: Any, b: Any) -> bool:
    """Whether group entry `a` still is the value `b` the optimizer wrote (numbers by value:
    assigning an equal constant changes nothing)."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(map(same, a, b))
    return is_number(a) and is_number(b) and bool(a == b)


def value(owner: str, name: str, f: Any, t: int) -> float:
    """``f(t)`` as a float; ValueError (wrapping what `f` raised) or TypeError (not a number)
    naming the hyper-parameter, the schedule and the update."""
    try:
        v = f(t)
    except Exception as e:
        raise ValueError(
            f"{owner}: the schedule of {name} ({f!r}) raised {e!r} at update {t}"
        ) from e
    if not isinstance(v, _NUMBERS) and hasattr(v, "item"):
        try:  # a one-element array or tensor
            v = v.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    if not is_number(v):
        raise TypeError(
            f"{owner}: the schedule of {name} ({f!r}) returned {v!r} at update {t}, not a number"
        )
    return float(v)


class Scheduled:
    """The schedules of one parameter group (see the module docstring).  ``lr_scale`` and
    ``lr_floor``: :class:`~fastoptim.schedules.ReduceLROnPlateau`'s accumulated factor on a
    scheduled ``lr`` and its ``min_lr``."""

    __slots__ = (
        "defn",
        "fixed",
        "lr_floor",
        "lr_scale",
        "owner",
        "pending",
        "specs",
        "tuples",
        "written",
    )

    def __init__(
        self, defn: Definition, owner: str, fixed: Iterable[str] = (), tuples: bool = True
    ) -> None:
        self.defn = defn
        self.owner = owner  # the class name, for messages
        self.fixed = defn.unschedulable | frozenset(fixed)
        self.tuples = tuples  # store lists (betas) as tuples in the group
        self.specs: dict[str, Any] = {}
        self.written: dict[str, Any] = {}
        self.pending: dict[str, Exception] = {}
        self.lr_scale = 1.0
        self.lr_floor = 0.0

    def copy(self) -> Scheduled:
        """A copy with its own schedules, written values and pending errors."""
        new = Scheduled.__new__(Scheduled)
        new.copy_from(self)
        return new

    def copy_from(self, other: Scheduled) -> None:
        """Become a copy of `other` (as :meth:`copy`)."""
        for name in self.__slots__:
            value = getattr(other, name)
            setattr(self, name, dict(value) if isinstance(value, dict) else value)

    def adopt(self, group: dict[str, Any], t: int, keys: Iterable[str] | None = None) -> None:
        """Reconcile `group` with its schedules after the user (or a torch LR scheduler) may
        have assigned entries (`keys`: those to look at, default all): a schedule assigned to
        an entry becomes its schedule, evaluated at update `t`; another value assigned to a
        scheduled entry replaces its schedule.  Raises the error a schedule raised after the
        last step (for an entry still scheduled)."""
        for key in group if keys is None else keys:
            if key == "params":
                continue
            v = group.get(key)
            if key in self.specs and same(v, self.written.get(key)):
                if key in self.pending:  # a new exception each time: re-raising the stored
                    e = self.pending[key]  # one would chain every failed step's frames (and
                    raise type(e)(*e.args) from e.__cause__  # what they hold) onto it
                continue
            if isinstance(v, list) and (self.tuples or _has_schedule(v)):
                v = group[key] = tuple(v)  # betas given as a list: keep an immutable copy
            if _has_schedule(v):
                if key in self.fixed:
                    rule = self.defn.rules.get(key)
                    what = "a flag" if rule == FLAG or rule is None else "read only once"
                    raise TypeError(f"{self.owner}: {key} is {what}, not a schedule")
                self.specs[key] = v
                self.pending.pop(key, None)
                self._write(group, key, t)
            elif key in self.specs:
                for d in (self.specs, self.written, self.pending):
                    d.pop(key, None)
                if key == "lr":
                    self.lr_scale, self.lr_floor = 1.0, 0.0

    def _write(self, group: dict[str, Any], key: str, t: int) -> None:
        spec = self.specs[key]
        if isinstance(spec, tuple):
            new: Any = tuple(
                value(self.owner, f"{key}[{i}]", f, t) if _is_schedule(f) else f
                for i, f in enumerate(spec)
            )
        else:
            new = value(self.owner, key, spec, t)
            if key == "lr" and self.lr_scale != 1.0:
                new = max(new * self.lr_scale, self.lr_floor)
        group[key] = self.written[key] = new

    def evaluate(self, group: dict[str, Any], t: int) -> None:
        """Write every schedule's value at update `t` into `group` (raising a schedule's
        error)."""
        for key in self.specs:
            self._write(group, key, t)
        self.pending.clear()

    def advance(self, group: dict[str, Any], t: int) -> bool:
        """After a step: write every schedule's value for update `t` into `group`; a schedule
        that fails keeps its entry's old value and its error for the next step, which raises
        it before it changes anything.  Whether every schedule gave a value."""
        self.pending.clear()
        for key in self.specs:
            try:
                self._write(group, key, t)
            except (TypeError, ValueError) as e:
                self.pending[key] = e
        return not self.pending

    def check(self, group: Mapping[str, Any], t: int, keys: Iterable[str] | None = None) -> None:
        """Validate `group` (or only its entries `keys` and the relations), naming the
        schedules at update `t` when a value is invalid."""
        try:
            if keys is None:
                self.defn.check(group)
            else:
                for k in keys:
                    self.defn.check_value(k, group[k])
                self.defn.check_relations(group)
        except (TypeError, ValueError) as e:
            if not self.specs:
                raise
            specs = ", ".join(f"{k}={v!r}" for k, v in self.specs.items())
            raise type(e)(f"{e} (at update {t} of the schedules {specs})") from None

    def restore(self, group: dict[str, Any], specs: Mapping[str, Any], t: int) -> None:
        """Reattach `specs` (decoded from a checkpoint) to `group`, whose values were saved at
        update `t`.  A saved value that is not its schedule's value at `t` was assigned (by the
        user, a torch LR scheduler, or another library running the checkpoint) and wins: that
        entry stays a constant."""
        for key, spec in specs.items():
            self.specs[key] = spec
            expected: dict[str, Any] = {}
            try:
                self._write(expected, key, t)
            except (TypeError, ValueError):
                ok = False
            else:
                ok = same(group.get(key), expected[key])
            if ok:
                self.written[key] = group[key]
            else:
                self.specs.pop(key)
                self.written.pop(key, None)
