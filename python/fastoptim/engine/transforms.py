"""Gradient transforms folded into the step, for every tier.

Four options every optimizer takes (keyword-only; defined once in
:data:`fastoptim.engine.definition.COMMON`), and the loss scale of a step:

``max_grad_norm``
    Clip the gradients to this global L2 norm, as ``torch.nn.utils.clip_grad_norm_`` over every
    parameter of the optimizer (all groups): each gradient is multiplied by
    ``min(1, max_grad_norm / (norm + 1e-6))``.  The norm is computed by one pass that reads the
    gradients (deterministic: the same bits for any thread count and instruction set), the
    multiplication is folded into the update: no pass over the parameters or state is added,
    and the gradients themselves are never written.  ``None`` (default): no clipping.  The
    NumPy and Keras steps return the norm, and ``opt.grad_norm`` keeps it (:mod:`fastoptim.torch`'s
    ``step()`` returns what torch's does).
``max_grad_value``
    Clamp every gradient element to ``[-max_grad_value, max_grad_value]`` (as
    ``clip_grad_value_``), in the update itself.  Applied before the norm is taken.
``skip_nonfinite``
    When a gradient of the group holds an infinity or a NaN (after ``grad_scale``), skip the
    step: nothing is modified in any group (a step is skipped whole, as GradScaler skips it),
    the step is not counted, schedules do not advance, and ``opt.step_skipped`` is True.  Only
    the gradients themselves decide, never their norm (finite gradients whose squares overflow
    are finite).  (Groups without it: non-finite gradients go into the update as in torch.)
``ema_decay``
    Keep an exponential moving average of every parameter of the group (state ``"ema"``,
    starting as a copy of the parameter), updated in the same pass as the parameter:
    ``ema = lerp(ema, p, 1 - ema_decay)`` after each update, as torch's
    ``swa_utils.get_ema_multi_avg_fn``.  Its dtype follows ``state_dtype`` (float32 for
    low-precision parameters by default).  ``opt.ema_weights()`` swaps it in for evaluation.

``grad_scale`` (an argument of the step; ``torch.amp.GradScaler``'s scale in fastoptim.torch):
the gradients are divided by it (multiplied by its reciprocal: the same result for the powers of
two GradScaler uses) before anything else, so loss-scaled gradients need no unscaling pass.

Order, per element: ``x = clamp(g / grad_scale, -max_grad_value, max_grad_value)``; the norm is
that of the ``x``; the kernel gets ``x * min(1, max_grad_norm / (norm + 1e-6))``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .precision import EMA_DECAY

MAX_GRAD_NORM = "max_grad_norm"
MAX_GRAD_VALUE = "max_grad_value"
SKIP_NONFINITE = "skip_nonfinite"
OPTIONS = (MAX_GRAD_NORM, MAX_GRAD_VALUE, SKIP_NONFINITE, EMA_DECAY)

#: A combination of the per-process gradient statistics across processes: takes a float64
#: array ``[sum of squares, number of processes that saw a non-finite gradient]`` and returns
#: the element-wise sum over all processes (every process the same values).
Reduce = Callable[[np.ndarray], Any]


def is_number(value: Any) -> bool:
    """A real number: a Python or NumPy int or float, not a bool.  (Here, not in
    :mod:`.definition`, which imports this module.)"""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def check_positive(cls: str, name: str, value: Any) -> None:
    """None, or a finite number > 0."""
    if value is None:
        return
    if not is_number(value):
        raise TypeError(f"{cls}: {name} must be a number or None, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{cls}: invalid {name}={value!r}: must be finite and > 0 (or None)")


def check_decay(cls: str, value: Any) -> None:
    """None, or a number in [0, 1]."""
    if value is None:
        return
    if not is_number(value):
        raise TypeError(f"{cls}: ema_decay must be a number or None, got {type(value).__name__}")
    if not 0 <= value <= 1:
        raise ValueError(f"{cls}: invalid ema_decay={value!r}: must be in [0, 1] (or None)")


#: The loss scales whose inverse, the kernels' gradient factor, is a normal float32 (float32
#: kernels multiply by it: a smaller scale would make every gradient infinite, a larger one 0
#: or denormal).
GRAD_SCALE_RANGE = (1 / 3.4028234663852886e38, 1 / 1.1754943508222875e-38)


def check_grad_scale(where: str, value: Any) -> float:
    """The loss scale of a step as a float: a finite number > 0 whose inverse is a normal
    float32 (:data:`GRAD_SCALE_RANGE`)."""
    if not is_number(value):
        raise TypeError(f"{where}: grad_scale must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{where}: invalid grad_scale={value!r}: must be finite and > 0")
    lo, hi = GRAD_SCALE_RANGE
    if not lo <= v <= hi:
        raise ValueError(
            f"{where}: invalid grad_scale={value!r}: the gradients are multiplied by "
            f"1/grad_scale in float32, which needs grad_scale in [{lo:.3g}, {hi:.3g}]"
        )
    return v


def active(groups: Sequence[Any]) -> bool:
    """Whether any group clips or skips (the step then needs the decisions of :func:`decide`)."""
    for group in groups:
        get = group.get
        if get(MAX_GRAD_NORM) is not None or get(MAX_GRAD_VALUE) is not None or get(SKIP_NONFINITE):
            return True
    return False


class Decision:
    """What a step does with its gradients: skip it, or run each plan with (mul, clip)."""

    __slots__ = ("norm", "skip", "transforms")

    def __init__(self, norm: float | None, skip: bool, transforms: list[tuple[float, float]]):
        self.norm = norm
        self.skip = skip
        self.transforms = transforms


def decide(
    plans: Sequence[Sequence[Any]],
    groups: Sequence[Any],
    grad_scale: float | None = None,
    found_inf: bool = False,
    reduce: Reduce | None = None,
) -> Decision:
    """Decide a step's gradient transform: `plans[i]` are group i's compiled plans (gradients
    bound), `groups[i]` its hyper-parameters.  Reads the gradients once when a group clips the
    norm or skips non-finite steps (and `found_inf` does not already skip it); modifies no
    array (it sets each plan's transform, which only a step uses)."""
    inv = 1.0 if grad_scale is None else 1.0 / grad_scale
    clips = []
    for group in groups:
        v = group.get(MAX_GRAD_VALUE)
        clips.append(math.inf if v is None else float(v))
    transforms = [(inv, clip) for clip in clips]
    if found_inf:
        return Decision(None, True, transforms)
    want_norm = any(group.get(MAX_GRAD_NORM) is not None for group in groups)
    want_check = any(group.get(SKIP_NONFINITE) for group in groups)
    if not (want_norm or want_check):
        return Decision(None, False, transforms)
    sumsq, bad = 0.0, 0.0
    for group_plans, group, t in zip(plans, groups, transforms):
        checked = bool(group.get(SKIP_NONFINITE))  # (only these groups' gradients can skip)
        for plan in group_plans:
            set_transform(plan, *t)
            s, finite = plan.grad_stats()
            sumsq += s
            bad = 1.0 if checked and not finite else bad
    if reduce is not None:
        combined = np.asarray(reduce(np.array([sumsq, bad], dtype=np.float64)), dtype=np.float64)
        if combined.shape != (2,):
            raise ValueError(
                "reduce_grad_stats must return an array of 2 numbers (the sums over all "
                f"processes), got shape {combined.shape}"
            )
        sumsq, bad = float(combined[0]), float(combined[1])
    norm = math.sqrt(sumsq)
    if bad != 0:
        return Decision(norm if want_norm else None, True, transforms)
    if want_norm:
        out = []
        for group, (mul, clip) in zip(groups, transforms):
            limit = group.get(MAX_GRAD_NORM)
            if limit is not None:
                coef = float(limit) / (norm + 1e-6)
                # torch.clamp(coef, max=1): NaN stays NaN (then so does the update, as torch)
                c = coef if (coef < 1.0 or coef != coef) else 1.0
                # c * clamp(x, -clip, clip) as one clamp: clamp(x * c, -clip * c, clip * c)
                mul, clip = mul * c, (clip * c if c == c and clip != math.inf else clip)
            out.append((mul, clip))
        transforms = out
    return Decision(norm if want_norm else None, False, transforms)


def set_transform(plan: Any, mul: float, clip: float) -> None:
    """Set a plan's gradient transform when it differs from the one it has."""
    if plan.grad_mul != mul or plan.grad_clip != clip:
        plan.set_grad_transform(mul, clip)


#: The docstring of ``ema_weights()`` in both tiers.
EMA_WEIGHTS_DOC = """Within the ``with`` block, every parameter that has an EMA
(``ema_decay``) holds it (rounded to the parameter's dtype); on exit the parameters get back
exactly the values they had.  For evaluation with the averaged weights::

    with opt.ema_weights():
        evaluate(model)

A :meth:`step` inside the block raises ``RuntimeError``, and so do, in the NumPy tier,
:func:`fastoptim.save`, :func:`fastoptim.load`, ``load_state_dict`` and pickling the optimizer
(they would record the EMA as the parameters, or be undone by the block's exit); anything else
may run (``state_dict()`` holds no parameter values)."""


@contextlib.contextmanager
def ema_swapped(
    owner: Any,
    where: str,
    pairs: Sequence[tuple[Any, Any]],
    copy: Callable[[Any, Any], Any],
    clone: Callable[[Any], Any],
) -> Iterator[None]:
    """``ema_weights()`` of both tiers: each (parameter, EMA) pair's EMA copied into the
    parameter (`copy(dst, src)`, rounding to the parameter's dtype), and the parameters' own
    values (saved with `clone`) copied back on exit, exactly.  The optimizer's lock is held
    while copying only, so the block may call anything but a step (or a checkpoint, in the
    NumPy tier), which raises while ``owner._ema_swapped`` is set."""
    with owner._lock:
        if getattr(owner, "_ema_swapped", False):
            raise RuntimeError(f"{where}: already inside ema_weights()")
        if not pairs:
            raise ValueError(f"{where}: no parameter has an EMA (set ema_decay, then step)")
        saved = [clone(p) for p, _ in pairs]
        for p, ema in pairs:
            copy(p, ema)
        owner._ema_swapped = True
    try:
        yield
    finally:
        with owner._lock:
            for (p, _), old in zip(pairs, saved):
                copy(p, old)
            owner._ema_swapped = False


def check_not_swapped(owner: Any, where: str) -> None:
    """RuntimeError for a step (or a checkpoint) inside ``ema_weights()``."""
    if getattr(owner, "_ema_swapped", False):
        raise RuntimeError(
            f"{where}: inside ema_weights() the parameters hold their EMA, not their trained "
            "values; call it after the with block"
        )
