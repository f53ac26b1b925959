r"""Keras 3's optimizers (``keras.optimizers.X``): Keras's names, defaults and update rules,
updating NumPy arrays in place with fastoptim's compiled kernels.

    >>> import numpy as np
    >>> from fastoptim import keras as fk
    >>> w = np.zeros(3, np.float32)
    >>> opt = fk.Adam([w], learning_rate=0.1, beta_1=0.9, epsilon=1e-7)
    >>> opt.step([np.ones(3, np.float32)])
    >>> opt.learning_rate = 0.01             # every group, as Keras's attribute

The classes are :class:`fastoptim.Optimizer`\ s like those of :mod:`fastoptim.optimizers`
(parameter groups, ``step(grads)``, ``opt.grads``, ``state_dict``, checkpoints, schedules on
any float hyper-parameter), with Keras's signatures: ``learning_rate``, ``beta_1``,
``beta_2``, ``epsilon``, ``rho``, ``momentum``, ``nesterov``, ``initial_accumulator_value``,
``centered``, ``amsgrad``, ``weight_decay``, and the legacy keyword ``lr`` for
``learning_rate`` (Keras 2's alias; Keras 3 itself rejects it; both given: a ``TypeError``,
whatever their values; a subclass that defines its own ``__init__`` is refused only where
they differ, its default ``learning_rate`` being indistinguishable from an omitted one).  As
in Keras:

- ``weight_decay=None`` (the default but in AdamW) means no decay, in the constructor and in a
  group (stored as 0.0); AdamW, whose Keras default is 0.004, takes a number only, as Keras's;
- a callable hyper-parameter is a schedule of the update number ``t`` (see
  :mod:`fastoptim.schedules`), evaluated for update ``t`` when update ``t - 1`` ends, as
  elsewhere in fastoptim: a callable taking no argument (which Keras calls at every update as
  ``learning_rate()``) is refused with a ``TypeError`` saying so;
- each of the class's hyper-parameters is an attribute (``opt.learning_rate``,
  ``opt.beta_1``...; ``opt.lr`` for ``learning_rate``): reading it gives the groups' value
  (``ValueError`` where the groups differ: read ``param_groups[i]``), assigning it sets every
  group, validated first as the constructor validates (nothing changes on an error; a number
  replaces a schedule, a schedule is evaluated at the current update).  The
  precision and gradient-transform options (``max_grad_norm``...) are per group only:
  ``opt.max_grad_norm = 1.0`` raises ``AttributeError`` naming ``param_groups``.

A group's entries are those of the constructor, with ``learning_rate`` (a group does not take
the ``lr`` alias).  The entries the class fixes (what makes the update Keras's: ``keras`` but in
Nadam and Lion, ``decoupled_weight_decay`` in Adam, AdamW and Nadam, Nadam's
``momentum_decay``; Lion fixes none) are shown in every group but cannot change: another
value is refused (``ValueError``) by ``add_param_group``, by the next step (for a group that
holds one) and by a checkpoint load (``load_state_dict``, :func:`fastoptim.load`).

Each update is Keras's, operation for operation up to rounding (Keras 3's
``update_step``; ``tests/test_keras.py`` checks them against Keras itself):

- ``weight_decay`` is decoupled and applied first, :math:`p \leftarrow p(1 - \gamma\lambda)`,
  in every optimizer (torch's ``weight_decay`` is an L2 term in the gradient except in AdamW);
- epsilon sits where Keras puts it (inside the square root in RMSprop and Adagrad, added to
  :math:`\sqrt{v}` before the bias correction in Adam, to the infinity norm's denominator in
  Adamax);
- SGD's and RMSprop's momentum buffers accumulate learning-rate-scaled steps, so a changed
  learning rate acts on new steps only;
- Adagrad's accumulator starts at ``initial_accumulator_value=0.1``; Nadam's momentum schedule
  is :math:`\beta_1(1 - \tfrac12 0.96^t)`.

Keras's options of every optimizer are not keywords here: each raises a ``TypeError`` naming
fastoptim's equivalent (``KERAS_OPTIONS``), as assigning it as an attribute raises an
``AttributeError``.  ``clipvalue``: ``max_grad_value=`` (the same clip);
``global_clipnorm``: ``max_grad_norm=`` (torch's ``clip_grad_norm_``: the gradients are
scaled by ``min(1, max_norm / (norm + 1e-6))``, Keras's by ``min(1, clip_norm / norm)``);
``clipnorm`` (per variable): none;
``use_ema``/``ema_momentum``: ``ema_decay=`` (its average starts at the initial weights,
Keras's at the first updated ones) and :meth:`~fastoptim.Optimizer.ema_weights`;
``ema_overwrite_frequency``: none; ``loss_scale_factor``: ``step(grads, grad_scale=s)``;
``gradient_accumulation_steps``: :meth:`~fastoptim.Optimizer.accumulate` then ``step()``;
``decay``: a schedule (:func:`fastoptim.schedules.inverse_time`); ``name``: none.

The state keeps torch's names (``exp_avg`` for Keras's ``momentum``, ``exp_avg_sq`` for
``velocity``...: each class's docstring says which); the sparse row updates (``step_rows``)
are the torch convention's only.  :class:`~fastoptim.schedules.ReduceLROnPlateau` needs an
``lr`` entry: it refuses these classes when it is constructed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

from . import definitions as _defs
from .engine.definition import accepted_keywords
from .engine.optimizer import Optimizer, Params, Value, _defaults
from .engine.precision import Rounding, StateDType
from .engine.scheduled import same
from .schedules import _is_schedule

__all__ = [
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "Nadam",
    "Lion",
    "KerasOptimizer",
]

_K = TypeVar("_K", bound="KerasOptimizer")

#: The options of every Keras optimizer (``keras.optimizers.Optimizer``) that fastoptim.keras
#: does not take, -> what to use instead: the message of the ``TypeError`` a keyword raises
#: (and of the ``AttributeError`` an assignment raises).
KERAS_OPTIONS: dict[str, str] = {
    "clipvalue": "use max_grad_value=clipvalue (the same element-wise clip to [-v, v])",
    "global_clipnorm": (
        "use max_grad_norm=global_clipnorm (torch's clip_grad_norm_: the gradients are scaled "
        "by min(1, max_grad_norm / (norm + 1e-6)), Keras's by min(1, global_clipnorm / norm))"
    ),
    "clipnorm": (
        "fastoptim has no per-variable norm clip; max_grad_norm= clips the global norm "
        "(Keras's global_clipnorm, up to torch's +1e-6)"
    ),
    "use_ema": (
        "use ema_decay=ema_momentum (the average of the weights, in the state 'ema', swapped in "
        "by opt.ema_weights(); it starts at the initial weights, Keras's at the weights after "
        "the first update)"
    ),
    "ema_momentum": "use ema_decay=ema_momentum (Keras's use_ema=True with ema_momentum)",
    "ema_overwrite_frequency": (
        "fastoptim never overwrites the weights with their average: ema_decay= keeps it and "
        "opt.ema_weights() swaps it in"
    ),
    "loss_scale_factor": (
        "pass it to each step: step(grads, grad_scale=loss_scale_factor) divides the "
        "gradients by it"
    ),
    "gradient_accumulation_steps": (
        "add each micro-batch's gradients with opt.accumulate(grads, scale=1 / n), then "
        "opt.step() and opt.zero_grad() every n"
    ),
    "decay": (
        "Keras 2's learning-rate decay (Keras 3 ignores it): pass "
        "learning_rate=fastoptim.schedules.inverse_time(learning_rate, decay)"
    ),
    "name": "fastoptim's optimizers have no name",
}


def _takes_no_update(fn: Any) -> bool:
    """Whether `fn` takes no argument (Keras's ``learning_rate()``), not the update number (a
    schedule)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature: a schedule, as any other callable
        return False
    for args in ((0,), ()):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return not args
    return False


class _Attribute:
    """``opt.<name>``: hyper-parameter `entry` of every group (``refused``: the message of the
    ``AttributeError`` that reading or assigning it raises instead)."""

    def __init__(self, entry: str, refused: str = "") -> None:
        self.entry = entry
        self.refused = refused

    def _refuse(self, opt: KerasOptimizer) -> None:
        if self.refused:
            raise AttributeError(f"{type(opt).__name__}: {self.refused}")

    def _plain(self, opt: KerasOptimizer) -> bool:
        """A subclass that takes Keras's option `entry` itself (``name=``) keeps it as a plain
        attribute: the refusal is for fastoptim's own classes, which do not take it."""
        return self.entry in KERAS_OPTIONS and self.entry in accepted_keywords(type(opt))

    def __get__(self, opt: KerasOptimizer | None, owner: Any = None) -> Any:
        if opt is None:
            return self
        if self._plain(opt):
            try:
                return opt.__dict__[self.entry]
            except KeyError:
                raise AttributeError(
                    f"{type(opt).__name__} object has no attribute {self.entry!r}"
                ) from None
        self._refuse(opt)
        values = [group[self.entry] for group in opt.param_groups]
        if any(not same(v, values[0]) for v in values):
            raise ValueError(
                f"{type(opt).__name__}: the parameter groups have different {self.entry} "
                f"({values!r}): read param_groups[i][{self.entry!r}]"
            )
        return values[0]

    def __set__(self, opt: KerasOptimizer, value: Any) -> None:
        if self._plain(opt):
            opt.__dict__[self.entry] = value
            return
        self._refuse(opt)
        opt._set_every_group(self.entry, value)


def _refuse_both(cls: type, lr: Any, learning_rate: Any) -> None:
    raise TypeError(
        f"{cls.__name__}: got both lr={lr!r} and learning_rate={learning_rate!r}; lr is Keras "
        "2's alias of learning_rate: pass one of them"
    )


class KerasOptimizer(Optimizer):
    """Base of the Keras-convention classes: Keras's spellings (``lr``, ``weight_decay=None``),
    the hyper-parameters as attributes; Keras's options, zero-argument callables and changes
    of the fixed entries refused (see :mod:`fastoptim.keras`)."""

    learning_rate = _Attribute("learning_rate")  # (declared for type checkers: all classes have it)
    lr = _Attribute("learning_rate")  # Keras 2's alias

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        d = cls.__dict__.get("_definition")
        if d is None:
            return
        own = {h.name for h in d.hyper}
        for h in d.options:  # the precision and transform options: per group only
            per_group = f"{h.name} is set per group, in param_groups[i][{h.name!r}]"
            setattr(cls, h.name, _Attribute(h.name, "" if h.name in own else per_group))
        for name, instead in KERAS_OPTIONS.items():
            setattr(cls, name, _Attribute(name, f"Keras's {name} is not an option here: {instead}"))

    def __new__(cls: type[_K], *args: Any, **kwargs: Any) -> _K:
        for key in kwargs:
            if key in KERAS_OPTIONS and key not in accepted_keywords(cls):
                raise TypeError(
                    f"{cls.__name__}: Keras's {key}= is not an option of fastoptim.keras: "
                    f"{KERAS_OPTIONS[key]}"
                )
        own = cls.__init__.__module__ == __name__  # (a subclass's own signature: its __init__)
        if own and kwargs.get("lr") is not None and ("learning_rate" in kwargs or len(args) > 1):
            # (both given, whatever their values: __init__ sees the default's value only)
            given = kwargs["learning_rate"] if "learning_rate" in kwargs else args[1]
            _refuse_both(cls, kwargs["lr"], given)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        defaults = dict(defaults)
        lr = defaults.pop("lr", None)
        if lr is not None:
            default = self._definition.defaults()["learning_rate"]
            if not same(defaults["learning_rate"], default):  # (a subclass passing both)
                _refuse_both(type(self), lr, defaults["learning_rate"])
            defaults["learning_rate"] = lr
        self._keras_spellings(defaults)
        Optimizer.__init__(self, params, defaults)

    def _keras_spellings(self, entries: dict[str, Any]) -> None:
        """Keras's spellings in `entries` (the defaults, a group) as fastoptim's, in place:
        ``weight_decay=None`` as 0.0 where Keras's default is None (not AdamW's, whose None
        the validation refuses as Keras does).  TypeError for a callable taking no argument
        (Keras calls a ``learning_rate`` so at every update)."""
        if entries.get("weight_decay", 0.0) is None and not self._definition.defaults().get(
            "weight_decay"
        ):
            entries["weight_decay"] = 0.0
        for key, value in entries.items():
            if _is_schedule(value) and _takes_no_update(value):
                raise TypeError(
                    f"{type(self).__name__}: {key} is a callable taking no argument ({value!r}), "
                    "which Keras calls at every update; fastoptim's schedules take the update "
                    "number t and give the value of update t when update t - 1 ends: pass a "
                    f"schedule t -> value (fastoptim.schedules), or set opt.{key} before each "
                    "step"
                )

    def _check_keys(self, group: Mapping[str, Any], complete: bool = False) -> None:
        """:meth:`Optimizer._check_keys`, refusing ``lr`` (groups take ``learning_rate``) and a
        changed fixed entry, then Keras's spellings in `group` (a dict: the live group, or
        :meth:`add_param_group`'s copy)."""
        cls = type(self).__name__
        if "lr" in group:
            raise ValueError(
                f"{cls}: a group's learning rate is its 'learning_rate' entry (lr, Keras 2's "
                "alias, is taken by the constructor and as opt.lr only)"
            )
        super()._check_keys(group, complete)
        changed = self._changed_fixed(group)
        if changed:
            raise ValueError(f"{cls}: {changed}")
        assert isinstance(group, dict)
        self._keras_spellings(group)

    def _changed_fixed(self, entries: Mapping[str, Any]) -> str:
        """What is wrong with `entries` (a group's) if one holds a fixed entry (``keras``...)
        with another value, else ''."""
        for key, fixed in self._definition.fixed:
            if key in entries and not same(entries[key], fixed):
                return (
                    f"the group entry {key!r} is fixed to {fixed!r} (it makes the update "
                    f"Keras's): it cannot change, got {entries[key]!r}"
                )
        return ""

    def _loader(self, sd: Mapping[str, Any], strict: bool, where: str) -> Callable[[], None]:
        """:meth:`Optimizer._loader`, refusing a state whose groups change a fixed entry."""
        apply = super()._loader(sd, strict, where)  # (checks the state's form: changes nothing)
        for i, record in enumerate(sd["param_groups"]):
            changed = self._changed_fixed(record["hyper"])
            if changed:
                raise ValueError(f"{where}: group {i}: {changed}")
        return apply

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """:meth:`~fastoptim.Optimizer.add_param_group`, with Keras's ``weight_decay=None``
        (not ``lr``: a group's entry is ``learning_rate``); the entries this class fixes may
        only hold their value.  `param_group` itself is not modified."""
        if isinstance(param_group, Mapping):
            param_group = dict(param_group)
        super().add_param_group(param_group)

    def _set_every_group(self, key: str, value: Any) -> None:
        """``opt.<key> = value``: check `value` in every group as the constructor would (a
        schedule evaluated at the current update), then set it in all of them (the next step
        compiles it).  A number replaces a schedule even where it equals the schedule's
        current value (which a group entry assigned that value cannot tell from none)."""
        spelled = {key: value}
        self._keras_spellings(spelled)
        value = spelled[key]
        for group in self.param_groups:
            trial = {**group, key: value}
            sched = self._new_sched()
            sched.adopt(trial, self._t, [key])
            sched.check(trial, self._t, [key])
        with self._lock:
            for g, group in zip(self._groups, self.param_groups):
                group[key] = value
                g.sched.written.pop(key, None)  # (an assignment, whatever the value)
                g.sched.adopt(group, self._t, [key])


# ---- generated by fastoptim.engine.codegen from fastoptim.definitions: do not edit below


class SGD(KerasOptimizer):
    r"""Keras's SGD (``keras.optimizers.SGD``): the momentum buffer holds the lr-scaled step.

    .. math::
        v_t = \mu v_{t-1} - \gamma g_t,\quad
        p_t = p_{t-1} + v_t \text{, or } p_{t-1} + \mu v_t - \gamma g_t \text{ (nesterov)}

    (:math:`p_t = p_{t-1} - \gamma g_t` without momentum).

    With ``weight_decay`` (Keras's decoupled decay, applied first):
    :math:`p \leftarrow p(1 - \gamma\lambda)`.

    State: ``momentum_buffer`` (Keras's ``momentum``) when ``momentum != 0``."""

    _definition = _defs.KERAS_SGD

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.01,
        momentum: Value = 0.0,
        nesterov: bool = False,
        weight_decay: Value | None = None,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))


class RMSprop(KerasOptimizer):
    r"""Keras's RMSprop (``keras.optimizers.RMSprop``): epsilon inside the square root, and
    the momentum buffer accumulates lr-scaled steps.

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad
        \bar g_t = \rho \bar g_{t-1} + (1-\rho) g_t \text{ (centered)},\quad
        s_t = \frac{\gamma g_t}{\sqrt{\max(v_t - \bar g_t^2, 0) + \epsilon}}

        b_t = \mu b_{t-1} + s_t,\quad p_t = p_{t-1} - b_t \text{ (or } s_t \text{ without momentum)}



    With ``weight_decay`` (Keras's decoupled decay, applied first):
    :math:`p \leftarrow p(1 - \gamma\lambda)`.

    State: ``square_avg`` (Keras's ``velocity``), ``grad_avg``
    (``average_gradient``, centered), ``momentum_buffer`` (``momentum``, momentum > 0)."""

    _definition = _defs.KERAS_RMSPROP

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.001,
        rho: Value = 0.9,
        momentum: Value = 0.0,
        epsilon: Value = 1e-07,
        centered: bool = False,
        weight_decay: Value | None = None,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))


class Adagrad(KerasOptimizer):
    r"""Keras's Adagrad (``keras.optimizers.Adagrad``): the accumulator starts at 0.1 and
    epsilon is inside the square root.

    .. math::
        s_t = s_{t-1} + g_t^2,\quad p_t = p_{t-1} - \gamma \frac{g_t}{\sqrt{s_t + \epsilon}}



    With ``weight_decay`` (Keras's decoupled decay, applied first):
    :math:`p \leftarrow p(1 - \gamma\lambda)`.

    State: ``sum`` (Keras's ``accumulator``)."""

    _definition = _defs.KERAS_ADAGRAD

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: Value = 1e-07,
        weight_decay: Value | None = None,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))


class Adadelta(KerasOptimizer):
    r"""Keras's Adadelta (``keras.optimizers.Adadelta``): torch's rule (see
    :class:`fastoptim.Adadelta`) with Keras's defaults (``learning_rate=0.001``, ``rho=0.95``,
    ``epsilon=1e-7``).

    With ``weight_decay`` (Keras's decoupled decay, applied first):
    :math:`p \leftarrow p(1 - \gamma\lambda)`.

    State: ``square_avg``, ``acc_delta`` (Keras's
    ``accumulated_grad``, ``accumulated_delta_var``)."""

    _definition = _defs.KERAS_ADADELTA

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.001,
        rho: Value = 0.95,
        epsilon: Value = 1e-07,
        weight_decay: Value | None = None,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))


class Adam(KerasOptimizer):
    r"""Keras's Adam (``keras.optimizers.Adam``): epsilon is added to :math:`\sqrt{v_t}`
    before the bias correction (torch's rule with :math:`\epsilon_t = \epsilon/\sqrt{1-\beta_2^t}`).

    .. math::
        p_t = p_{t-1} - \gamma\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
              \frac{m_t}{\sqrt{\hat v_t} + \epsilon}

    with :math:`m_t, v_t, \hat v_t` as :class:`fastoptim.Adam`.

    With ``weight_decay`` (Keras's decoupled decay, applied first):
    :math:`p \leftarrow p(1 - \gamma\lambda)`.

    State: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (Keras's
    ``momentum``, ``velocity``, ``velocity_hat``)."""

    _definition = _defs.KERAS_ADAM

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.001,
        beta_1: Value = 0.9,
        beta_2: Value = 0.999,
        epsilon: Value = 1e-07,
        amsgrad: bool = False,
        weight_decay: Value | None = None,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))


class AdamW(Adam):
    """Keras's AdamW (``keras.optimizers.AdamW``): :class:`Adam` (Keras's) with
    ``weight_decay=0.004`` by default."""

    _definition = _defs.KERAS_ADAMW

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.001,
        weight_decay: Value = 0.004,
        beta_1: Value = 0.9,
        beta_2: Value = 0.999,
        epsilon: Value = 1e-07,
        amsgrad: bool = False,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))


class Adamax(KerasOptimizer):
    r"""Keras's Adamax (``keras.optimizers.Adamax``): epsilon in the denominator, not in
    the infinity norm.

    .. math::
        u_t = \max(\beta_2 u_{t-1}, |g_t|),\quad
        p_t = p_{t-1} - \frac{\gamma}{1-\beta_1^t} \frac{m_t}{u_t + \epsilon}



    With ``weight_decay`` (Keras's decoupled decay, applied first):
    :math:`p \leftarrow p(1 - \gamma\lambda)`.

    State: ``exp_avg``, ``exp_inf`` (Keras's ``momentum``, ``norm``)."""

    _definition = _defs.KERAS_ADAMAX

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.001,
        beta_1: Value = 0.9,
        beta_2: Value = 0.999,
        epsilon: Value = 1e-07,
        weight_decay: Value | None = None,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))


class Nadam(KerasOptimizer):
    r"""Keras's Nadam (``keras.optimizers.Nadam``): torch's NAdam rule with the momentum
    schedule :math:`\mu_t = \beta_1(1 - \tfrac12 0.96^t)` (torch's ``momentum_decay=1``).

    .. math::
        p_t = p_{t-1} - \gamma \Big(\frac{\mu_{t+1} m_t}{1-\prod_{i\le t+1}\mu_i}
              + \frac{(1-\mu_t) g_t}{1-\prod_{i\le t}\mu_i}\Big)
              \Big/ \Big(\sqrt{\frac{v_t}{1-\beta_2^t}} + \epsilon\Big)



    With ``weight_decay`` (Keras's decoupled decay, applied first):
    :math:`p \leftarrow p(1 - \gamma\lambda)`.

    State: ``exp_avg``, ``exp_avg_sq`` (Keras's ``momentum``,
    ``velocity``) and the group's ``mu_product`` (Keras's ``u_product``)."""

    _definition = _defs.KERAS_NADAM

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.001,
        beta_1: Value = 0.9,
        beta_2: Value = 0.999,
        epsilon: Value = 1e-07,
        weight_decay: Value | None = None,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))


class Lion(KerasOptimizer):
    r"""Keras's Lion (``keras.optimizers.Lion``): :class:`fastoptim.Lion`'s rule with
    Keras's defaults (``learning_rate=0.001``) and ``beta_1`` in (0, 1].

    With ``weight_decay`` (Keras's decoupled decay, applied first):
    :math:`p \leftarrow p(1 - \gamma\lambda)`.

    State: ``exp_avg`` (Keras's ``momentum``)."""

    _definition = _defs.KERAS_LION

    def __init__(
        self,
        params: Params,
        learning_rate: Value = 0.001,
        beta_1: Value = 0.9,
        beta_2: Value = 0.99,
        weight_decay: Value | None = None,
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
        lr: Value | None = None,
    ) -> None:
        KerasOptimizer.__init__(self, params, _defaults(locals()))
