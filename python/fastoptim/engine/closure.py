"""The NumPy tier's base of the optimizers whose step takes a closure (L-BFGS): one parameter
group, a whole-group state, ``step(closure)``.  Everything else (signature, validation,
schedules of ``lr``, gradient buffers and their checks, ``param_groups``, pickling) is
:class:`~fastoptim.engine.optimizer.Optimizer`'s."""

from __future__ import annotations

import copy as _copy
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from ..host import Objective
from .optimizer import Key, Optimizer, Params
from .readonly import STATE_HINT, ReadOnlyDict


class ClosureOptimizer(Optimizer):
    """An optimizer whose :meth:`step` re-evaluates the objective through a closure, as many
    times as it needs (see :class:`fastoptim.LBFGS`).  Its definition's
    :class:`~fastoptim.engine.definition.Host` ``closure`` runs the step."""

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        host = self._definition.host
        assert host is not None
        defaults = host.closure_defaults(defaults)
        Optimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """The one parameter group (a second raises ValueError, as torch)."""
        if self.param_groups:
            raise ValueError(
                f"{type(self).__name__} doesn't support per-parameter options (parameter groups)"
            )
        self._cstate: dict[str, Any] = {}
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """One optimization step: calls `closure` as often as the search needs (see the class
        docstring for what it returns) and returns its first loss.  The group is validated
        first, every gradient the closure gives before it is used."""
        cls = type(self).__name__
        if not callable(closure):
            raise TypeError(
                f"{cls}.step: needs a closure that re-evaluates the objective and returns the "
                f"loss (gradients in opt.grads) or (loss, grads), got {type(closure).__name__}"
            )
        host = self._definition.host
        assert host is not None and host.closure is not None
        with self._lock:
            self._prepare(None)
            g = self._groups[0]
            g.plan.check()  # (what the compiled step checks before it writes anything)

            def evaluate() -> tuple[Any, list[np.ndarray]]:
                out = closure()
                try:  # (a parameter the closure made read-only or re-viewed: before a write)
                    g.plan.check()
                except ValueError as e:
                    raise ValueError(f"{cls}.step: after the closure: {e}") from None
                if isinstance(out, tuple):
                    if len(out) != 2:
                        raise TypeError(
                            f"{cls}.step: the closure returned a tuple of {len(out)}; "
                            "return the loss, or (loss, grads)"
                        )
                    loss, grads = out
                    grads = self._split_grads(grads)[0]
                    g.plan.bind_grads(grads)  # dtypes, shapes, layout: as step(grads)
                    g.bound_own = False
                    return loss, grads
                return out, self._own_grads(g)

            try:
                loss = host.closure(Objective(g.params, evaluate), self._cstate, g.synced)
            finally:
                self._release_passed()  # (the closure's gradients are not kept alive)
            self._after_step()
        return loss

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> dict[Key, dict[str, Any]]:
        """The group's state (torch's names and layout: under the first parameter), live:
        ``func_evals``, ``n_iter``, and from the first step on ``d``, ``t``, ``old_dirs``,
        ``old_stps``, ``ro``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``.  The
        outer dict and the other parameters' empty dicts are built at each access and refuse
        changes (``TypeError``)."""
        g = self._groups[0]
        out: dict[Key, dict[str, Any]] = {
            k: ReadOnlyDict({}, f"opt.state[{k!r}]", STATE_HINT) for k in g.keys
        }
        out[g.keys[0]] = self._cstate
        return ReadOnlyDict(out, "opt.state", STATE_HINT)

    def _state_dict(self, copy: bool) -> dict[str, Any]:
        sd = super()._state_dict(copy)
        first = self._groups[0].keys[0]
        sd["state"][first] = _copy.deepcopy(self._cstate) if copy else dict(self._cstate)
        return sd

    def _loader(self, sd: Mapping[str, Any], strict: bool, where: str) -> Callable[[], None]:
        g = self._groups[0]
        state = sd.get("state") if isinstance(sd, Mapping) else None
        if not isinstance(state, Mapping):
            return super()._loader(sd, strict, where)  # (raises the malformed-state error)
        first = g.keys[0]
        mine = state.get(first, {})
        n = sum(p.size for p in g.params)
        problems = _check_state(mine, n, g.params[0].dtype)
        if problems:
            raise ValueError(
                f"{where}: the state does not match this {type(self).__name__}:\n  - "
                + "\n  - ".join(problems)
            )
        rest = {k: ({} if k == first else v) for k, v in state.items()}
        apply = super()._loader({**sd, "state": rest}, strict, where)
        loaded = _copy.deepcopy(dict(mine))

        def both() -> None:
            apply()
            self._cstate = loaded

        return both


_VECTORS = ("d", "prev_flat_grad")
_LISTS = ("old_dirs", "old_stps")
_SCALARS = ("t", "H_diag", "prev_loss")
_COUNTS = ("func_evals", "n_iter")


def _check_state(state: Any, n: int, dtype: np.dtype[Any]) -> list[str]:
    """What is wrong with an L-BFGS state for `n` parameters of `dtype` (torch's names)."""
    if not isinstance(state, Mapping):
        return [f"the state must be a dict, got {type(state).__name__}"]
    known = {*_VECTORS, *_LISTS, *_SCALARS, *_COUNTS, "ro", "al"}
    problems = [f"unexpected state entry {k!r}" for k in state if k not in known]

    def vector(v: Any, what: str) -> None:
        if not isinstance(v, np.ndarray) or v.shape != (n,) or v.dtype != dtype:
            got = f"{v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
            problems.append(f"{what}: {got}, expected {dtype} ({n},)")

    for k in _VECTORS:
        if state.get(k) is not None:
            vector(state[k], k)
    for k in _LISTS:
        v = state.get(k)
        if v is not None:
            if not isinstance(v, list):
                problems.append(f"{k} must be a list of vectors")
            else:
                for i, a in enumerate(v):
                    vector(a, f"{k}[{i}]")
    for k in ("ro", "al"):
        v = state.get(k)
        if v is not None and not isinstance(v, list):
            problems.append(f"{k} must be a list")
    for k in _COUNTS:
        v = state.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            problems.append(f"{k} must be an int >= 0, got {v!r}")
    if state.get("old_dirs") is not None and state.get("ro") is not None:
        if not len(state["old_dirs"]) == len(state.get("old_stps") or ()) == len(state["ro"]):
            problems.append("old_dirs, old_stps and ro must have the same length")
    return problems
