"""The functional tier's one update (see :mod:`fastoptim.functional`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import _core
from . import precision, transforms
from .definition import Definition, is_number, named_refusals
from .precision import EMA_DECAY


def check_step(fn: str, step: Any) -> None:
    """A functional update's `step`: an int from 1 (the first update) that the kernels'
    int64 holds; TypeError / ValueError naming `fn` otherwise."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"{fn}: step must be an int (the 1-based update number), got {step!r}")
    if step < 1:
        raise ValueError(f"{fn}: invalid step={step!r}: the first update is step=1")
    if step > 2**63 - 1:
        raise ValueError(f"{fn}: invalid step={step!r}: must be at most 2**63 - 1 (int64)")


def step(
    defn: Definition,
    param: np.ndarray,
    grad: np.ndarray,
    states: Mapping[str, np.ndarray | None],
    step: int,
    hyper: Mapping[str, Any],
    scalars: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray | None] | None = None,
) -> Any:
    """One update of `param` with `defn`'s kernel.

    `states`: state name -> array, or None where the caller did not give it, or a pair
    ``(codes, absmax)`` for a block-wise quantized state (see
    :func:`fastoptim.functional.quantized_state`), whose kind (8-bit or 4-bit) ``state_dtype``
    in `hyper` names, as for the classes: ``"int8"``, ``"int4"`` or a dict per state; never
    read from the codes' shape.  `hyper`: the
    function's hyper-parameters (those the class's groups hold; the others take their
    defaults), validated by the definition.  `scalars`: the scalar state (NAdam's running
    ``mu_product``; ASGD's ``eta`` and ``mu``), checked by the definition; when given, the
    updated values are returned: a float, or a tuple of floats for several.  `arrays`: the
    optional ``master`` / ``compensation`` / ``copy_out`` / ``ema`` arrays
    (:data:`fastoptim.engine.precision.FUNCTIONAL_ARRAYS`), None where not given.  `hyper` may
    hold ``grad_scale`` (the gradient is divided by it: :mod:`fastoptim.engine.transforms`)
    and ``tensor`` (the tensor number of the random bits of stochastic rounding).
    """
    fn = defn.name.lower() + "_"
    hyper = dict(hyper)
    grad_scale = transforms.check_grad_scale(fn, hyper.pop("grad_scale", 1.0))
    tensor = hyper.pop("tensor", 0)
    precision.check_seed(fn, tensor, "tensor")
    check_step(fn, step)
    for name, v in (scalars or {}).items():
        if not is_number(v):
            raise TypeError(f"{fn}: {name} must be a float, got {v!r}")
        problem = defn.scalar_problem(name, v)
        if problem is not None:
            fill = dict(defn.scalars)[name]
            first = f"the {fill}" if isinstance(fill, str) else f"{fill}"
            raise ValueError(
                f"{fn}: invalid {name}={v!r}: {problem} ({first} at the first step, then the "
                "value the previous call returned)"
            )
    group = {**defn.defaults(), **hyper}
    with named_refusals(fn, replacing=f"{defn.name}:"):  # ("Adam: invalid lr": adam_'s)
        defn.check(group)
    if defn.host is not None:
        return _host_step(defn, fn, param, grad, states, step, group)
    # At step 1 every state buffer is fresh: what the class would have just created.
    fresh = set(states) if step == 1 else set()
    core = defn.compile(group, fresh)
    for name, v in (scalars or {}).items():
        setattr(core, name, float(v))
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
    qmaps = precision.qmaps(group[precision.STATE_DTYPE], needed)
    for n, qm in zip(needed, qmaps):
        if isinstance(given[n], tuple) and not qm:
            raise ValueError(
                f"{fn}: state {n!r} is a (codes, absmax) pair: pass state_dtype='int8' or 'int4' "
                f"(or {{{n!r}: 'int4', ...}}) to say which kind"
                + ("" if n in precision.QUANT_MAPS else f"; but {n!r} cannot be quantized")
            )
    # A float state in the dtype the precision options say, as the class keeps it.
    pname = precision.dtype_name(param.dtype) if isinstance(param, np.ndarray) else None
    kinds = precision.buffers(group, pname, tuple(needed), param.size) if pname else {}
    for n in needed:
        a, want = given[n], kinds.get(n)
        if not isinstance(a, np.ndarray) or want is None:
            continue  # (a pair; the plan says what else is wrong)
        if want in precision.QUANT_KINDS:
            raise ValueError(
                f"{fn}: state {n!r}: state_dtype={group[precision.STATE_DTYPE]!r} keeps it "
                f"{want}-quantized: pass the (codes, absmax) pair quantized_state makes"
            )
        if precision.dtype_name(a.dtype) != want:
            raise TypeError(
                f"{fn}: state {n!r} is {a.dtype}; state_dtype="
                f"{group[precision.STATE_DTYPE]!r} keeps it as {want} for a {pname} parameter"
            )
    extra = arrays or {}
    ema = extra.get("ema")
    if (ema is None) != (group[EMA_DECAY] is None):
        raise ValueError(
            f"{fn}: ema_decay and ema go together (the ema array is the average that "
            "ema_decay updates: start it as a copy of param)"
        )
    want = kinds.get(precision.EMA)
    if isinstance(ema, np.ndarray) and want and want not in precision.QUANT_KINDS:
        if precision.dtype_name(ema.dtype) != want:
            raise TypeError(
                f"{fn}: ema is {ema.dtype}; state_dtype={group[precision.STATE_DTYPE]!r} keeps "
                f"the average as {want} for a {pname} parameter"
            )
    with named_refusals(fn):
        plan = _core.Plan(
            [param],
            [""],
            needed,
            [[given[n]] for n in needed],
            masters=[extra.get("master")],
            comps=[extra.get("compensation")],
            outs=[extra.get("copy_out")],
            emas=[ema],
            qmaps=qmaps,
            ids=[int(tensor)],
        )
    for n in needed:  # (the caller's scales, at every call, once the plan took their layout:
        # a negative or infinite one would decode its block as NaN or the negated moment)
        pair = given[n]
        if isinstance(pair, tuple):
            problem = precision.absmax_problem(pair[1])
            if problem:
                raise ValueError(f"{fn}: state {n!r}: {problem}")
    if group["rounding"] != "nearest":
        plan.set_rounding(group["rounding"], int(group["seed"]))
    if ema is not None:
        plan.set_ema_decay(float(group[EMA_DECAY]))
    # (one tensor: no norm to clip, no step to skip; the value clip and the scale)
    transforms.set_transform(plan, *transforms.decide([[plan]], [group], grad_scale).transforms[0])
    with named_refusals(fn):
        defn.core_step(plan, core, int(step), grads=[grad])
    if scalars:
        values = tuple(float(getattr(core, name)) for name in scalars)
        return values[0] if len(values) == 1 else values
    return None


def _host_step(
    defn: Definition,
    fn: str,
    param: np.ndarray,
    grad: np.ndarray,
    states: Mapping[str, np.ndarray | None],
    step: int,
    group: Mapping[str, Any],
) -> None:
    """One update by a host definition's Python step (Muon): the arrays are checked as the
    compiled plan checks them (a plan is built for that only), then updated in place."""
    host = defn.host
    assert host is not None and host.update is not None
    given = {n: a for n, a in states.items() if a is not None}
    shape = getattr(param, "shape", ())
    needed = {s.name: defn.state_shape(s.name, shape) for s in defn.states}
    missing = [n for n, sh in needed.items() if sh is not None and n not in given]
    unused = [n for n in given if needed.get(n) is None]
    if missing or unused:
        parts = [f"needs state array(s) {', '.join(missing)}"] if missing else []
        if unused:
            parts.append(f"does not use state array(s) {', '.join(unused)} (pass None)")
        where = f" for a param of shape {tuple(shape)}" if defn.shaped else ""
        raise ValueError(f"{fn}: {' and '.join(parts)}{where}")
    for a, what in ((param, "param"), (grad, "grad"), *((a, n) for n, a in given.items())):
        if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(f"{fn}: {what} must be a float32 or float64 array, got {got}")
        if a.dtype != param.dtype:
            raise TypeError(f"{fn}: {what} has dtype {a.dtype}, param has {param.dtype}")
    if host.check_param is not None:
        host.check_param(fn, "param", param.shape)
    names = [n for n in given if n not in defn.shaped]
    with named_refusals(fn):
        plan = _core.Plan([param], [""], names, [[given[n]] for n in names])
        plan.bind_grads([grad])  # shapes, layout, aliasing: as the classes check them
    own = [n for n in given if n in defn.shaped]  # (Adafactor's factored state)
    for n in own:  # (every check before the update writes any of them)
        if not given[n].flags.c_contiguous or not given[n].flags.writeable:
            raise ValueError(
                f"{fn}: {n} must be a writeable C-contiguous array (it is updated in place)"
            )
        if given[n].shape != needed[n]:
            raise ValueError(
                f"{fn}: {n} has shape {given[n].shape}, expected {needed[n]} for a param of "
                f"shape {param.shape}"
            )
    if own:
        arrays = [param, grad, *(given[n] for n in own)]
        with named_refusals(fn):
            _core.check_disjoint(arrays, ["param", "grad", *own])
    host.update(group, [param], [grad], {n: [a] for n, a in given.items()}, int(step))
