"""Schedule-Free's train / eval modes for the NumPy tier (see
:class:`fastoptim.AdamWScheduleFree`): the base class of the generated
:class:`~fastoptim.AdamWScheduleFree` and :class:`~fastoptim.SGDScheduleFree`, and the modes'
public methods for both tiers (:class:`Modes`)."""

from __future__ import annotations

from typing import Any

from .optimizer import Grads, Optimizer, _Group
from .transforms import check_not_swapped

#: Schedule-Free's swaps draw their stochastic-rounding bits with step numbers from here on
#: (``SWAP_KEY + 2 * step`` for eval(), ``+ 1`` for train()), apart from every real step's.
SWAP_KEY = 2**62


def swap_weight(beta1: float, train: bool) -> float:
    """The ``lerp`` weight towards ``z`` that moves the parameters from x to y (`train`) or from
    y to x: ``1 - beta1``, ``1 - 1 / beta1``."""
    return 1.0 - beta1 if train else 1.0 - 1.0 / beta1


class Modes:
    """Schedule-Free's :meth:`train` / :meth:`eval` in both tiers (this one and
    ``fastoptim.torch``'s), over each tier's ``_set_mode(train)``."""

    def _set_mode(self, train: bool) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        """Move the parameters to y, where ``step()`` takes gradients (no-op in train mode).
        ``train(False)`` is :meth:`eval`.  RuntimeError inside ``ema_weights()``."""
        where = f"{type(self).__name__}.{'train' if mode else 'eval'}"
        check_not_swapped(self, where)  # (the swap would move the EMA, the exit undo it)
        self._set_mode(bool(mode))

    def eval(self) -> None:
        """Move the parameters to the averaged iterate x, to evaluate the model or save a
        checkpoint (no-op in eval mode).  RuntimeError inside ``ema_weights()``."""
        self.train(False)


class ScheduleFreeOptimizer(Modes, Optimizer):
    """An :class:`~fastoptim.engine.optimizer.Optimizer` whose parameters are in one of two
    places: :math:`y` (train mode, where gradients are taken and :meth:`step` works) or the
    average :math:`x` (eval mode, for evaluation and checkpoints).  The mode is per group
    (scalar state ``train_mode`` of the kernel's struct, saved with the state); ``train()``
    and ``eval()`` (:class:`Modes`) switch every group."""

    def _scalar_names(self) -> list[str]:
        return [*super()._scalar_names(), "train_mode"]

    @property
    def training(self) -> bool:
        """True in train mode (the parameters hold y), False in eval mode (x)."""
        return all(g.hyper.train_mode != 0 for g in self._groups)

    def _set_mode(self, train: bool) -> None:
        with self._lock:
            self._refresh()  # the groups' current values (betas, precision) are valid
            moves = []
            for g in self._groups:
                if (g.hyper.train_mode != 0) == train:
                    continue
                if g.step > 0 and "z" not in g.fresh:  # else z = y = x: nothing moves
                    moves.append((g, self._swap_plan(g)))
            for g, plan in moves:  # every group checked before any parameter moves
                if plan is not None:
                    try:
                        plan.bind_grads(list(g.states["z"]))  # (z in the gradient's place)
                    except ValueError as e:
                        where = "train" if train else "eval"
                        what = str(e).replace("grad for param", "state 'z' of param", 1)
                        raise ValueError(f"{type(self).__name__}.{where}: {what}") from None
            for g, plan in moves:
                key = SWAP_KEY + 2 * g.step + (1 if train else 0)
                self._swap(g, plan, swap_weight(g.hyper.beta1, train), key)
            for g in self._groups:
                g.hyper.train_mode = 1.0 if train else 0.0

    def _swap_plan(self, g: _Group) -> Any:
        """A plan of group `g`'s parameters (with their master copies, compensation and
        copy-outs) and no state: the swap kernel reads ``z`` in the gradient's place."""
        if self._python_run:
            return None
        plan = self._make_plan(g, [], g.outs)
        if g.plan.rounding != "nearest":
            plan.set_rounding(g.plan.rounding, g.plan.seed)
        return plan

    def _swap(self, g: _Group, plan: Any, weight: float, key: int) -> None:
        """``p = lerp(p, z, weight)`` for every parameter of `g` (the compiled swap variant;
        :mod:`fastoptim.reference` overrides it)."""
        h = self._hyper_type()
        h.swap, h.swap_weight = True, weight
        type(self)._core_step(plan, h, key, list(g.states["z"]), True)

    def step(self, grads: Grads | None = None, *, grad_scale: float | None = None) -> float | None:
        """As :meth:`fastoptim.Optimizer.step`; raises ``RuntimeError`` in eval mode (call
        ``train()`` first), changing nothing."""
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step: the optimizer is in eval mode (the parameters "
                "hold the averaged iterate x); call train() before step()"
            )
        return super().step(grads, grad_scale=grad_scale)
