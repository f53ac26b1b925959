r"""Schedules: hyper-parameters that change with the update number.

Every schedule is a plain callable ``f(t) -> float`` of the 0-based update number ``t`` (the first
update uses ``f(0)``), closed-form and cheap.  Any float hyper-parameter of any optimizer
(``lr``, ``weight_decay``, ``momentum``, ``betas[i]``...) accepts a schedule in place of a float:

    >>> import numpy as np, fastoptim as fo
    >>> from fastoptim import schedules
    >>> w = np.zeros(3, np.float32)
    >>> opt = fo.SGD([w], lr=schedules.cosine(0.1, total_steps=100), momentum=0.9)
    >>> opt.param_groups[0]["lr"]          # the value the next update will use: f(0)
    0.1

The optimizer counts its updates (:attr:`fastoptim.Optimizer.step_count`, an int) and, after
each one, writes every scheduled hyper-parameter's value for the next update into its group
(``param_groups[i]["lr"]`` after ``k`` updates is ``f(k)``, torch's convention with an LR
scheduler), so logging the group logs the schedule.  The schedule itself is
``opt.schedules(i)["lr"]``.  Assigning a float to ``param_groups[i]["lr"]`` replaces the
schedule by that constant when it differs from the value the schedule wrote there; assigning
that very value changes nothing (the group holds plain numbers: the optimizer cannot tell such
an assignment from none), so freeze an entry at its current value with
``param_groups[i]["lr"] = schedules.constant(value)``.  Assigning a schedule sets a new one
(evaluated at the current ``step_count``, not restarted).

The names and semantics follow ``torch.optim.lr_scheduler`` where torch has an equivalent (the
docstrings say which), as closed forms of ``t``.  Schedules compare equal when they are the same
function with the same arguments, and :meth:`Schedule.describe` / :func:`from_description`
turn one into JSON-able data and back (that is how checkpoints store them).

:class:`ReduceLROnPlateau` is the one stateful controller: fed a metric after each epoch, it
scales the learning rate down when the metric stops improving, as torch's does; its state is part
of the optimizer's checkpoint.
"""

from __future__ import annotations

import bisect
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Callable

import numpy as np

__all__ = [
    "Schedule",
    "constant",
    "step_decay",
    "multistep",
    "exponential",
    "inverse_time",
    "polynomial",
    "cosine",
    "linear",
    "cosine_restarts",
    "onecycle",
    "warmup_cosine",
    "piecewise",
    "join",
    "from_description",
    "ReduceLROnPlateau",
]


class Schedule:
    """A named closed-form function of the update number ``t`` (an int >= 0).

    Made by the functions of this module (``cosine(...)``...), never directly.  ``name`` is the
    function that made it and ``args`` its arguments: ``repr`` shows the call that rebuilds it.
    """

    __slots__ = ("_args", "_fn", "_name")

    def __init__(self, name: str, args: Mapping[str, Any], fn: Callable[[int], float]) -> None:
        self._name = name
        self._args = dict(args)
        self._fn = fn

    @property
    def name(self) -> str:
        """The function of this module that made the schedule."""
        return self._name

    @property
    def args(self) -> dict[str, Any]:
        """The (validated) arguments of that function: a copy, so that editing it cannot change
        the schedule behind its back (nor its hash)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._args.items()}

    def __call__(self, t: int) -> float:
        if type(t) is not int:  # numpy integers too, through operator.index
            if isinstance(t, (bool, np.bool_)) or not hasattr(t, "__index__"):
                raise TypeError(f"{self!r}: t must be an int >= 0, got {t!r}")
            t = operator.index(t)
        if t < 0:
            raise ValueError(f"{self!r}: t must be >= 0, got {t}")
        return float(self._fn(t))

    def describe(self) -> dict[str, Any]:
        """JSON-able data that :func:`from_description` turns back into an equal schedule."""
        return {
            "schedule": self.name,
            "args": {k: _describe_arg(v) for k, v in self._args.items()},
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle / copy.deepcopy through the description (the function itself is a closure)
        return (from_description, (self.describe(),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.describe() == other.describe()

    def __hash__(self) -> int:
        # from the same data as ==: (-0.0 and 0.0 are equal arguments with different reprs)
        return hash(_frozen(self.describe()))

    def __repr__(self) -> str:
        return f"{self._name}({', '.join(f'{k}={v!r}' for k, v in self._args.items())})"


def _frozen(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _frozen(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_frozen(x) for x in v)
    return v


def _describe_arg(v: Any) -> Any:
    if isinstance(v, Schedule):
        return v.describe()
    if isinstance(v, (list, tuple)):
        return [_describe_arg(x) for x in v]
    return v


def from_description(description: Mapping[str, Any]) -> Schedule:
    """Rebuild the schedule that :meth:`Schedule.describe` described (a ``ValueError`` names
    anything that is not such a description)."""
    if not isinstance(description, Mapping) or set(description) != {"schedule", "args"}:
        raise ValueError(f"not a schedule description: {description!r}")
    name, args = description["schedule"], description["args"]
    make = _MAKERS.get(name) if isinstance(name, str) else None
    if make is None or not isinstance(args, Mapping):
        raise ValueError(f"not a schedule description: {description!r}")
    if name == "join":
        inner = args.get("schedules")
        if isinstance(inner, (str, bytes, Mapping)) or not isinstance(inner, Sequence):
            raise ValueError(f"not a schedule description: {description!r}")
        args = {**args, "schedules": [from_description(s) for s in inner]}
    try:
        return make(**args)
    except TypeError as e:
        raise ValueError(f"not a schedule description: {description!r} ({e})") from None


# ----------------------------------------------------------------------------- checkpoints
# How the optimizers (fastoptim.Optimizer and fastoptim.torch) store a hyper-parameter that may
# be a schedule: a Schedule as its description, a pair (betas) as a list, any other callable by
# its name only (it cannot be rebuilt), and constants through `plain`.
def _qualname(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", type(fn).__qualname__))


def _is_schedule(value: Any) -> bool:
    """Whether a hyper-parameter value is a schedule: any callable ``t -> float`` (a
    :class:`Schedule` or not); classes and numbers (tensors included) are not."""
    return callable(value) and not isinstance(value, type)


def _has_schedule(value: Any) -> bool:
    """A schedule, or a pair (``betas``) holding one."""
    if isinstance(value, (tuple, list)):
        return any(map(_is_schedule, value))
    return _is_schedule(value)


def _is_function(value: Any) -> bool:
    return callable(value) and not isinstance(value, (Schedule, type))


def _to_data(value: Any, plain: Callable[[Any], Any] = lambda v: v) -> Any:
    """A hyper-parameter (constant, schedule, or a pair holding either) as checkpoint data."""
    if isinstance(value, Schedule):
        return value.describe()
    if isinstance(value, (tuple, list)):
        return [_to_data(x, plain) for x in value]
    if isinstance(value, Mapping):  # (a per-state state_dtype: a copy, never the group's)
        return {k: _to_data(v, plain) for k, v in value.items()}
    if _is_function(value):
        return {"schedule": "callable", "name": _qualname(value)}
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy scalar
        item = value.item()  # (a longdouble's is itself: JSON takes a float)
        return float(item) if isinstance(item, np.floating) else item
    return plain(value)


def _from_data(data: Any, current: Any) -> Any:
    """Inverse of :func:`_to_data` (ValueError naming what cannot be rebuilt).  A function
    that is not a :class:`Schedule` cannot be rebuilt: the optimizer's own entry (`current`)
    is kept when it is a function of the same name."""
    if isinstance(data, Mapping):
        if data.get("schedule") == "callable":
            if _is_function(current) and _qualname(current) == data.get("name"):
                return current
            raise ValueError(
                f"the state was saved with the function {data.get('name')!r} as schedule, which "
                "cannot be rebuilt: construct the optimizer with it"
            )
        return from_description(data)
    if isinstance(data, (list, tuple)):
        cur = current if isinstance(current, tuple) and len(current) == len(data) else ()
        return tuple(_from_data(x, cur[i] if cur else None) for i, x in enumerate(data))
    return data


# ----------------------------------------------------------------------------- validation
def _number(fn: str, name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__float__"):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{fn}: {name} must be finite, got {value!r}") from None
    except (TypeError, ValueError):  # e.g. a numpy array of more than one element
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{fn}: {name} must be finite, got {value!r}")
    if positive and not v > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}")
    return v


def _count(fn: str, name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}") from None
    if n < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return n


def _listed(fn: str, name: str, values: Any, what: str) -> list[Any]:
    """`values` (a list, tuple, range, 1-d numpy array...) as a list; a ``TypeError`` naming
    `fn` and `name` for anything else (a string, a mapping, a set, a scalar)."""
    if not isinstance(values, (str, bytes, Mapping, AbstractSet)):
        try:
            return list(values)
        except TypeError:
            pass
    raise TypeError(f"{fn}: {name} must be a list of {what}, got {type(values).__name__}")


def _increasing(fn: str, name: str, values: Any, *, strict: bool) -> list[int]:
    values = _listed(fn, name, values, "ints")
    out = [
        _count(fn, f"{name}[{i}]", v, minimum=0 if not strict else 1) for i, v in enumerate(values)
    ]
    for a, b in zip(out, out[1:]):
        if b < a or (strict and b == a):
            order = "strictly increasing" if strict else "non-decreasing"
            raise ValueError(f"{fn}: {name} must be {order}, got {list(values)!r}")
    return out


def _cos_anneal(start: float, end: float, fraction: float) -> float:
    """From `start` at fraction 0 to `end` at fraction 1 along half a cosine (torch's form)."""
    return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0


# ----------------------------------------------------------------------------- the schedules
def constant(value: float) -> Schedule:
    """``value`` at every update."""
    v = _number("constant", "value", value)
    return Schedule("constant", {"value": v}, lambda t: v)


def step_decay(init: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``init * gamma ** (t // step_size)``: torch ``StepLR``."""
    a = _number("step_decay", "init", init)
    n = _count("step_decay", "step_size", step_size)
    g = _number("step_decay", "gamma", gamma)
    return Schedule(
        "step_decay", {"init": a, "step_size": n, "gamma": g}, lambda t: a * g ** (t // n)
    )


def multistep(init: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``init * gamma ** (number of milestones <= t)``: torch ``MultiStepLR`` (the value changes
    *at* a milestone; a milestone listed twice counts twice, as in torch)."""
    a = _number("multistep", "init", init)
    ms = _increasing("multistep", "milestones", milestones, strict=False)
    g = _number("multistep", "gamma", gamma)
    return Schedule(
        "multistep",
        {"init": a, "milestones": ms, "gamma": g},
        lambda t: a * g ** bisect.bisect_right(ms, t),
    )


def exponential(init: float, gamma: float) -> Schedule:
    """``init * gamma ** t``: torch ``ExponentialLR``."""
    a = _number("exponential", "init", init)
    g = _number("exponential", "gamma", gamma)
    return Schedule("exponential", {"init": a, "gamma": g}, lambda t: a * g**t)


def inverse_time(init: float, decay_rate: float, decay_steps: int = 1) -> Schedule:
    """``init / (1 + decay_rate * t / decay_steps)``: the 1/t decay that makes SGD converge
    (Robbins-Monro)."""
    a = _number("inverse_time", "init", init)
    r = _number("inverse_time", "decay_rate", decay_rate)
    if r < 0:
        raise ValueError(f"inverse_time: decay_rate must be >= 0, got {decay_rate!r}")
    n = _count("inverse_time", "decay_steps", decay_steps)
    return Schedule(
        "inverse_time",
        {"init": a, "decay_rate": r, "decay_steps": n},
        lambda t: a / (1.0 + r * t / n),
    )


def polynomial(init: float, total_steps: int, end: float = 0.0, power: float = 1.0) -> Schedule:
    """``end + (init - end) * (1 - min(t, total_steps) / total_steps) ** power``: torch
    ``PolynomialLR`` (which has ``end = 0``); ``end`` from ``total_steps`` on (with ``power = 0``,
    ``0 ** 0 = 1`` keeps ``init`` forever, as in torch)."""
    a = _number("polynomial", "init", init)
    n = _count("polynomial", "total_steps", total_steps)
    e = _number("polynomial", "end", end)
    pw = _number("polynomial", "power", power)
    if pw < 0:
        raise ValueError(f"polynomial: power must be >= 0, got {power!r}")
    return Schedule(
        "polynomial",
        {"init": a, "total_steps": n, "end": e, "power": pw},
        lambda t: e + (a - e) * (1.0 - min(t, n) / n) ** pw,
    )


def cosine(init: float, total_steps: int, end: float = 0.0) -> Schedule:
    """``end + (init - end) * (1 + cos(pi * t / total_steps)) / 2``: torch ``CosineAnnealingLR``
    (``T_max = total_steps``, ``eta_min = end``) up to ``total_steps``, then ``end``."""
    a = _number("cosine", "init", init)
    n = _count("cosine", "total_steps", total_steps)
    e = _number("cosine", "end", end)
    return Schedule(
        "cosine",
        {"init": a, "total_steps": n, "end": e},
        lambda t: _cos_anneal(a, e, t / n) if t < n else e,
    )


def linear(start: float, end: float, total_steps: int) -> Schedule:
    """``start + (end - start) * min(t, total_steps) / total_steps``: torch ``LinearLR`` times
    the base value (``start = base * start_factor``, ``end = base * end_factor``)."""
    a = _number("linear", "start", start)
    e = _number("linear", "end", end)
    n = _count("linear", "total_steps", total_steps)
    return Schedule(
        "linear",
        {"start": a, "end": e, "total_steps": n},
        lambda t: a + (e - a) * min(t, n) / n,
    )


def cosine_restarts(init: float, period: int, period_mult: int = 1, end: float = 0.0) -> Schedule:
    """Cosine from ``init`` to ``end`` over ``period`` updates, then again over
    ``period * period_mult``, and so on: torch ``CosineAnnealingWarmRestarts`` (``T_0 = period``,
    ``T_mult = period_mult``, ``eta_min = end``)."""
    a = _number("cosine_restarts", "init", init)
    p0 = _count("cosine_restarts", "period", period)
    m = _count("cosine_restarts", "period_mult", period_mult)
    e = _number("cosine_restarts", "end", end)

    def f(t: int) -> float:
        if m == 1:
            t_cur, p = t % p0, p0
        else:  # whole periods by integer arithmetic: exact at every restart
            t_cur, p = t, p0
            while t_cur >= p:
                t_cur -= p
                p *= m
        return _cos_anneal(a, e, t_cur / p)

    return Schedule("cosine_restarts", {"init": a, "period": p0, "period_mult": m, "end": e}, f)


def onecycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle policy: torch ``OneCycleLR`` with cosine annealing.  From
    ``max_lr / div_factor`` up to ``max_lr`` over the first ``pct_start`` of ``total_steps``,
    then down to ``max_lr / div_factor / final_div_factor`` (with ``three_phase``: back down to
    the initial value first, then to the minimum).  The last value is kept after ``total_steps``
    (torch raises there).  Momentum cycling is a separate schedule if wanted."""
    fn = "onecycle"
    peak = _number(fn, "max_lr", max_lr)
    n = _count(fn, "total_steps", total_steps)
    pct = _number(fn, "pct_start", pct_start)
    if not 0.0 <= pct <= 1.0:
        raise ValueError(f"{fn}: pct_start must be in [0, 1], got {pct_start!r}")
    div = _number(fn, "div_factor", div_factor, positive=True)
    final = _number(fn, "final_div_factor", final_div_factor, positive=True)
    if not isinstance(three_phase, bool):
        raise TypeError(f"{fn}: three_phase must be a bool, got {three_phase!r}")
    initial = peak / div
    low = initial / final
    if three_phase:
        phases = [
            (float(pct * n) - 1, initial, peak),
            (float(2 * pct * n) - 2, peak, initial),
            (n - 1.0, initial, low),
        ]
    else:
        phases = [(float(pct * n) - 1, initial, peak), (n - 1.0, peak, low)]

    def f(t: int) -> float:
        start = 0.0
        for i, (end_step, a, b) in enumerate(phases):
            if t <= end_step or i == len(phases) - 1:
                span = end_step - start
                frac = min((t - start) / span, 1.0) if span > 0 else 1.0
                return _cos_anneal(a, b, frac)
            start = end_step
        raise AssertionError("unreachable")  # pragma: no cover

    args = {
        "max_lr": peak,
        "total_steps": n,
        "pct_start": pct,
        "div_factor": div,
        "final_div_factor": final,
        "three_phase": three_phase,
    }
    return Schedule(fn, args, f)


def warmup_cosine(
    peak: float, warmup_steps: int, total_steps: int, init: float = 0.0, end: float = 0.0
) -> Schedule:
    """Linear warm-up from ``init`` to ``peak`` over ``warmup_steps`` updates, then a cosine from
    ``peak`` to ``end`` reaching it at ``total_steps``, then ``end``."""
    fn = "warmup_cosine"
    p = _number(fn, "peak", peak)
    w = _count(fn, "warmup_steps", warmup_steps, minimum=0)
    n = _count(fn, "total_steps", total_steps)
    if w > n:
        raise ValueError(f"{fn}: warmup_steps ({w}) must be <= total_steps ({n})")
    a = _number(fn, "init", init)
    e = _number(fn, "end", end)

    def f(t: int) -> float:
        if t < w:
            return a + (p - a) * t / w
        if t < n:
            return _cos_anneal(p, e, (t - w) / (n - w))
        return e

    args = {"peak": p, "warmup_steps": w, "total_steps": n, "init": a, "end": e}
    return Schedule(fn, args, f)


def piecewise(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """``values[i]`` for ``boundaries[i-1] <= t < boundaries[i]`` (``values[0]`` before the first
    boundary, ``values[-1]`` from the last on)."""
    b = _increasing("piecewise", "boundaries", boundaries, strict=True)
    values = _listed("piecewise", "values", values, "numbers")
    v = [_number("piecewise", f"values[{i}]", x) for i, x in enumerate(values)]
    if len(v) != len(b) + 1:
        raise ValueError(
            f"piecewise: needs len(values) == len(boundaries) + 1, got {len(v)} values "
            f"for {len(b)} boundaries"
        )
    return Schedule(
        "piecewise", {"boundaries": b, "values": v}, lambda t: v[bisect.bisect_right(b, t)]
    )


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i](t - boundaries[i-1])`` for ``boundaries[i-1] <= t < boundaries[i]``: one
    schedule after another, each counting its updates from 0 (torch ``SequentialLR``)."""
    s: list[Schedule] = _listed("join", "schedules", schedules, "schedules")
    for i, x in enumerate(s):
        if not isinstance(x, Schedule):
            raise TypeError(
                f"join: schedules[{i}] must be a fastoptim schedule, got {type(x).__name__}"
            )
    b = _increasing("join", "boundaries", boundaries, strict=True)
    if len(s) != len(b) + 1:
        raise ValueError(
            f"join: needs len(schedules) == len(boundaries) + 1, got {len(s)} schedules "
            f"for {len(b)} boundaries"
        )
    starts = [0, *b]

    def f(t: int) -> float:
        i = bisect.bisect_right(b, t)
        return s[i](t - starts[i])

    return Schedule("join", {"schedules": s, "boundaries": b}, f)


_MAKERS: dict[str, Callable[..., Schedule]] = {
    f.__name__: f
    for f in (
        constant,
        step_decay,
        multistep,
        exponential,
        inverse_time,
        polynomial,
        cosine,
        linear,
        cosine_restarts,
        onecycle,
        warmup_cosine,
        piecewise,
        join,
    )
}


# ----------------------------------------------------------------------------- plateau
class ReduceLROnPlateau:
    """Scale the learning rate by ``factor`` when a metric has stopped improving: torch's
    ``ReduceLROnPlateau`` (same arguments, defaults and decisions).

        >>> plateau = schedules.ReduceLROnPlateau(opt, patience=2)   # doctest: +SKIP
        >>> for epoch in range(epochs):                              # doctest: +SKIP
        ...     train_one_epoch(opt)
        ...     plateau.step(validation_loss)

    After ``patience`` epochs without improvement (better means below ``best * (1 - threshold)``
    in ``"min"`` mode with ``"rel"`` threshold; see torch), every group's learning rate becomes
    ``max(lr * factor, min_lr)`` (unless that changes it by less than ``eps``), then ``cooldown``
    epochs pass before bad epochs count again.

    A constant learning rate is replaced by the reduced value, exactly as torch does.  A
    scheduled learning rate keeps its schedule and is multiplied by the accumulated ``factor``
    from then on (and never goes below ``min_lr``).

    Attached to a fastoptim optimizer, its state (best, bad-epoch and cooldown counters, the
    scale of scheduled rates) is part of :meth:`~fastoptim.Optimizer.state_dict` and of
    :func:`fastoptim.save` checkpoints.
    """

    def __init__(
        self,
        optimizer: Any,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        fn = "ReduceLROnPlateau"
        if mode not in ("min", "max"):
            raise ValueError(f"{fn}: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"{fn}: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        f = _number(fn, "factor", factor)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{fn}: factor must be in [0, 1), got {factor!r}")
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list):
            raise TypeError(f"{fn}: optimizer must be an optimizer (with param_groups)")
        if not all(isinstance(g, Mapping) and "lr" in g for g in groups):
            raise TypeError(
                f"{fn}: {type(optimizer).__name__}'s parameter groups have no 'lr' entry, the "
                "learning rate it scales (fastoptim.keras's classes, which name it "
                "'learning_rate', are not supported: set opt.learning_rate yourself)"
            )
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(groups):
                raise ValueError(
                    f"{fn}: min_lr has {len(min_lr)} values for {len(groups)} parameter groups"
                )
            lows = [_number(fn, f"min_lr[{i}]", v) for i, v in enumerate(min_lr)]
        else:
            lows = [_number(fn, "min_lr", min_lr)] * len(groups)
        if any(v < 0 for v in lows):
            raise ValueError(f"{fn}: min_lr must be >= 0, got {min_lr!r}")
        self.optimizer = optimizer
        self.mode = mode
        self.factor = f
        self.patience = _count(fn, "patience", patience, minimum=0)
        self.threshold = _number(fn, "threshold", threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = _count(fn, "cooldown", cooldown, minimum=0)
        self.min_lrs = lows
        self.eps = _number(fn, "eps", eps)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0
        attach = getattr(optimizer, "_attach_plateau", None)
        if attach is not None:
            attach(self)

    def _better(self, a: float) -> bool:
        best, th = self.best, self.threshold
        if self.mode == "min":
            return a < (best * (1.0 - th) if self.threshold_mode == "rel" else best - th)
        return a > (best * (th + 1.0) if self.threshold_mode == "rel" else best + th)

    def step(self, metric: float) -> None:
        """Record one epoch's metric; reduce the learning rate if it has plateaued."""
        current = float(metric)
        self.last_epoch += 1
        if self._better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    def _reduce(self) -> None:
        scale = getattr(self.optimizer, "_scale_lr", None)
        for i, group in enumerate(self.optimizer.param_groups):
            old = float(group["lr"])
            new = max(old * self.factor, self.min_lrs[i])
            if old - new > self.eps:
                if scale is not None:
                    scale(i, self.factor, self.min_lrs[i])
                else:
                    group["lr"] = new

    _STATE = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")
    _CONFIG = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "eps")

    def state_dict(self) -> dict[str, Any]:
        """The counters and the configuration (plain Python values, JSON-able but for
        ``best``, which may be infinite)."""
        out = {k: getattr(self, k) for k in (*self._CONFIG, *self._STATE)}
        out["min_lrs"] = list(self.min_lrs)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counters; the configuration must match (``ValueError``
        naming the differences otherwise)."""
        wanted = {*self._CONFIG, *self._STATE, "min_lrs"}
        if not isinstance(state, Mapping) or set(state) != wanted:
            raise ValueError(f"ReduceLROnPlateau: not a plateau state: {state!r}")
        mine = self.state_dict()
        theirs = dict(state)
        if isinstance(theirs["min_lrs"], tuple):
            theirs["min_lrs"] = list(theirs["min_lrs"])
        diff = [
            f"{k}: {theirs[k]!r} != {mine[k]!r}"
            for k in (*self._CONFIG, "min_lrs")
            if theirs[k] != mine[k]
        ]
        if diff:
            raise ValueError(
                "ReduceLROnPlateau: the checkpoint's plateau was configured differently: "
                + "; ".join(diff)
            )
        best = theirs["best"]  # may be +-inf (nothing seen yet), never NaN
        if isinstance(best, bool) or not isinstance(best, numbers.Real) or math.isnan(best):
            raise ValueError(f"ReduceLROnPlateau: best must be a number, got {best!r}")
        counters = {}
        for k in ("num_bad_epochs", "cooldown_counter", "last_epoch"):
            v = theirs[k]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"ReduceLROnPlateau: {k} must be an int >= 0, got {v!r}")
            counters[k] = int(v)
        self.best = float(best)
        for k, v in counters.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._CONFIG)
        return f"ReduceLROnPlateau({cfg}, min_lr={self.min_lrs!r})"
