r"""The functional tier: one in-place update of one parameter, for users who keep the state
themselves (``torch.optim``'s functional API, on NumPy arrays).

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
- Arrays are float32 or float64, C-contiguous, writeable, native byte order, all of the same
  dtype and shape, pairwise distinct in memory (the gradient is only read).  Nothing is ever
  copied: anything else is rejected.
- State arrays start as the class would create them: zeros, except Adagrad's ``sum``, which
  starts at the ``initial_accumulator_value`` of your choice.
- A state array must be given exactly when the options need it (e.g. ``max_exp_avg_sq`` iff
  ``amsgrad=True``); giving one the options do not use is an error too, since it would silently
  not be updated.
- Everything (hyper-parameters, state names, every array's dtype, shape, layout and aliasing)
  is validated before any element is touched: a call that raises changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _core
from ._optimizer import Optimizer
from .optimizers import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, Lion, NAdam, RAdam, RMSprop

__all__ = [
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
]


def _step(
    fn: str,
    opt: type[Optimizer],
    param: np.ndarray,
    grad: np.ndarray,
    states: Mapping[str, np.ndarray | None],
    step: int,
    hyper: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """One update of `param` with `opt`'s kernel; returns the compiled hyper-parameter struct
    after the step (NAdam advances its ``mu_product`` there).

    `states`: state name -> array, or None where the caller did not give it, in the function's
    argument order.  `hyper`: the optimizer's hyper-parameters (the class's group entries),
    validated by the class's own check.  `extra`: compiled fields that are not hyper-parameters
    of the class (NAdam's running ``mu_product``).
    """
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"{fn}: step must be an int (the 1-based update number), got {step!r}")
    if step < 1:
        raise ValueError(f"{fn}: invalid step={step!r}: the first update is step=1")
    opt._check(hyper)
    # At step 1 every state buffer is fresh: what the class would have just created.
    fresh = set(states) if step == 1 else set()
    core = opt._hyper_type()
    for name, value in {**opt._core_values(hyper, fresh), **(extra or {})}.items():
        setattr(core, name, value)
    needed = list(core.state_names())
    given = {n: a for n, a in states.items() if a is not None}
    missing = [n for n in needed if n not in given]
    unused = [n for n in given if n not in needed]
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"needs state array(s) {', '.join(missing)}")
        if unused:
            parts.append(f"does not use state array(s) {', '.join(unused)} (pass None)")
        raise ValueError(
            f"{fn}: with these options ({', '.join(f'{k}={v!r}' for k, v in hyper.items())}) "
            f"the update {' and '.join(parts)}"
        )
    plan = _core.Plan([param], ["param"], needed, [[given[n]] for n in needed])
    opt._core_step(plan, core, int(step), grads=[grad])
    return core


def sgd_(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    momentum: float = 0,
    dampening: float = 0,
    weight_decay: float = 0,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    """One in-place SGD update (see :class:`fastoptim.SGD`).

    ``momentum_buffer`` is needed iff ``momentum != 0``.  Like torch, the buffer is *set* to the
    (effective) gradient on its first use instead of being decayed: that happens when
    ``step == 1``, whatever the buffer holds.  Count ``step`` from the update that first uses
    the buffer.
    """
    _step(
        "sgd_",
        SGD,
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
        ),
    )


def adagrad_(
    param: np.ndarray,
    grad: np.ndarray,
    sum: np.ndarray,  # torch's state name (shadows the builtin here only)
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0,
    weight_decay: float = 0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> None:
    """One in-place Adagrad update (see :class:`fastoptim.Adagrad`).

    ``sum`` starts at the class's ``initial_accumulator_value`` (0 by default); ``step`` drives
    the ``lr_decay``.
    """
    _step(
        "adagrad_",
        Adagrad,
        param,
        grad,
        {"sum": sum},
        step,
        dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=0,
            eps=eps,
            maximize=maximize,
        ),
    )


def rmsprop_(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    grad_avg: np.ndarray | None = None,
    momentum_buffer: np.ndarray | None = None,
    *,
    step: int,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum: float = 0,
    centered: bool = False,
    maximize: bool = False,
) -> None:
    """One in-place RMSprop update (see :class:`fastoptim.RMSprop`).

    ``grad_avg`` is needed iff ``centered``, ``momentum_buffer`` iff ``momentum > 0``.
    ``step`` does not change the update (it is required for uniformity).
    """
    _step(
        "rmsprop_",
        RMSprop,
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
        ),
    )


def adadelta_(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    acc_delta: np.ndarray,
    *,
    step: int,
    lr: float = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0,
    maximize: bool = False,
) -> None:
    """One in-place Adadelta update (see :class:`fastoptim.Adadelta`).

    ``step`` does not change the update (it is required for uniformity).
    """
    _step(
        "adadelta_",
        Adadelta,
        param,
        grad,
        {"square_avg": square_avg, "acc_delta": acc_delta},
        step,
        dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize),
    )


def adam_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    amsgrad: bool = False,
    max_exp_avg_sq: np.ndarray | None = None,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> None:
    """One in-place Adam update (see :class:`fastoptim.Adam`); ``decoupled_weight_decay=True``
    is AdamW (:func:`adamw_`).

    ``max_exp_avg_sq`` is needed iff ``amsgrad``.
    """
    _step(
        "adam_",
        Adam,
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
        ),
    )


def adamw_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    max_exp_avg_sq: np.ndarray | None = None,
    maximize: bool = False,
) -> None:
    """One in-place AdamW update (see :class:`fastoptim.AdamW`): Adam with decoupled weight
    decay.  ``max_exp_avg_sq`` is needed iff ``amsgrad``.
    """
    _step(
        "adamw_",
        AdamW,
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
            decoupled_weight_decay=True,
        ),
    )


def adamax_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_inf: np.ndarray,
    *,
    step: int,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    maximize: bool = False,
) -> None:
    """One in-place Adamax update (see :class:`fastoptim.Adamax`)."""
    _step(
        "adamax_",
        Adamax,
        param,
        grad,
        {"exp_avg": exp_avg, "exp_inf": exp_inf},
        step,
        dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize),
    )


def nadam_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    mu_product: float,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> float:
    r"""One in-place NAdam update (see :class:`fastoptim.NAdam`).

    ``mu_product`` (keyword, required) is the product :math:`\prod_{i<t}\mu_i` of the momentum
    schedule over the *previous* steps: ``1.0`` at the first step.  Returns the updated product
    (times :math:`\mu_t`): pass it to the next call.

        >>> mu = 1.0
        >>> for t in range(1, 4):                                  # doctest: +SKIP
        ...     mu = nadam_(p, g, m, v, step=t, mu_product=mu)
    """
    if isinstance(mu_product, (bool, np.bool_)) or not isinstance(
        mu_product, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"nadam_: mu_product must be a float, got {mu_product!r}")
    if not 0.0 <= mu_product <= 1.0:
        raise ValueError(
            f"nadam_: invalid mu_product={mu_product!r}: must be a number in [0, 1] "
            "(1.0 at the first step, then the value the previous call returned)"
        )
    core = _step(
        "nadam_",
        NAdam,
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
        ),
        extra={"mu_product": float(mu_product)},
    )
    return float(core.mu_product)


def radam_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    """One in-place RAdam update (see :class:`fastoptim.RAdam`)."""
    _step(
        "radam_",
        RAdam,
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
        ),
    )


def lion_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    *,
    step: int,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """One in-place Lion update (see :class:`fastoptim.Lion`).

    ``step`` does not change the update (it is required for uniformity).
    """
    _step(
        "lion_",
        Lion,
        param,
        grad,
        {"exp_avg": exp_avg},
        step,
        dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize),
    )
