"""Containers the optimizers build anew at each access (``opt.grads``, ``opt.state``).

They hold the optimizer's own arrays, so writing *into* an array changes the optimizer
(``opt.grads[0][...] = g``), but replacing an entry would only change a container that the
next access builds again: ``opt.state[k]["exp_avg"] = x`` or ``opt.grads[0] = g`` would be
silently lost.  These subclasses of ``list`` and ``dict`` read like the plain ones (and are
``isinstance`` of them) and refuse every change to the container with a ``TypeError`` that
says what to do instead.  Copies (``copy.copy``, ``copy.deepcopy``, ``pickle``, ``.copy()``,
``list(...)``, ``dict(...)``) are plain, writable lists and dicts; a shallow copy of
``opt.state`` still holds the read-only per-parameter dicts (a deep copy or pickle does not).
"""

from __future__ import annotations

from typing import Any, NoReturn, SupportsIndex, TypeVar

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

GRADS_HINT = (
    "write into the buffer in place (opt.grads[i][...] = g) or pass the gradients to step()"
)
STATE_HINT = (
    "write into a state array in place (opt.state[k]['exp_avg'][...] = x), or set a whole "
    "state, step counts included, with load_state_dict()"
)


def _refuse(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    """Every mutator of the two classes: the TypeError saying what to do instead."""
    raise TypeError(
        f"{self._what} is built anew at each access: changing it would change nothing in the "
        f"optimizer; {self._hint}"
    )


class ReadOnlyList(list[T]):
    """A ``list`` whose entries cannot be replaced, added or removed (see the module)."""

    __slots__ = ("_hint", "_what")

    def __init__(self, items: Any, what: str, hint: str) -> None:
        super().__init__(items)
        self._what, self._hint = what, hint

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = remove = clear = sort = reverse = pop = _refuse

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (list, (list(self),))


class ReadOnlyDict(dict[K, V]):
    """A ``dict`` whose entries cannot be replaced, added or removed (see the module)."""

    __slots__ = ("_hint", "_what")

    def __init__(self, items: Any, what: str, hint: str) -> None:
        super().__init__(items)
        self._what, self._hint = what, hint

    __setitem__ = __delitem__ = __ior__ = _refuse
    update = clear = popitem = pop = _refuse

    def setdefault(self, key: K, default: Any = None) -> V:
        if key in self:
            return self[key]
        _refuse(self)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (dict, (dict(self),))
