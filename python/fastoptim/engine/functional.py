"""The functional tier's one update (see :mod:`fastoptim.functional`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import _core
from . import precision
from .definition import Definition, is_number


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
    ``(codes, absmax)`` for a block-wise quantized state (uint8 codes shaped like the parameter,
    float32 absmax with one entry per block of 256 elements; see
    :func:`fastoptim.functional.quantized_state`).  `hyper`: the
    function's hyper-parameters (those the class's groups hold; the others take their
    defaults), validated by the definition.  `scalars`: the scalar state (NAdam's running
    ``mu_product``; ASGD's ``eta`` and ``mu``), checked by the definition; when given, the
    updated values are returned: a float, or a tuple of floats for several.  `arrays`: the
    optional ``master`` / ``compensation`` / ``copy_out`` arrays
    (:data:`fastoptim.engine.precision.FUNCTIONAL_ARRAYS`), None where not given.
    """
    fn = defn.name.lower() + "_"
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"{fn}: step must be an int (the 1-based update number), got {step!r}")
    if step < 1:
        raise ValueError(f"{fn}: invalid step={step!r}: the first update is step=1")
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
    defn.check(group)
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
    extra = arrays or {}
    plan = _core.Plan(
        [param],
        ["param"],
        needed,
        [[given[n]] for n in needed],
        masters=[extra.get("master")],
        comps=[extra.get("compensation")],
        outs=[extra.get("copy_out")],
        qmaps=[precision.QUANT_MAPS.get(n, "") for n in needed],
    )
    if group["rounding"] != "nearest":
        plan.set_rounding(group["rounding"], int(group["seed"]))
    defn.core_step(plan, core, int(step), grads=[grad])
    if scalars:
        values = tuple(float(getattr(core, name)) for name in scalars)
        return values[0] if len(values) == 1 else values
    return None
