"""The per-optimizer lock that serialises steps (and checkpoints) across threads.

- **Not re-entrant, and says so**: the thread that holds it and asks for it again (a schedule
  or a closure that calls back into the optimizer while a step runs it) gets a
  ``RuntimeError`` naming the call, instead of waiting for itself forever.  Other threads wait
  as with any lock.
- **Fork-safe**: a child process (``fork`` while another thread of the parent held an
  optimizer's lock, mid-step) gets fresh locks, since the thread that held the copied one does
  not exist there.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Any

_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


class _CheckedEnter:
    """``OptimizerLock.__enter__``: looking it up (which ``with`` does before calling it)
    raises the re-entrancy error when the calling thread holds the lock, else gives the lock's
    own ``__enter__``, a C function."""

    def __get__(self, lock: OptimizerLock | None, owner: type | None = None) -> Any:
        if lock is None:
            return self
        if lock._lock._is_owned():
            raise RuntimeError(
                f"{_caller()} was called re-entrantly: this thread is already inside a call of "
                "the same optimizer (a step, a checkpoint...) that called back into it (from a "
                "schedule, a closure or a hook), and would wait for itself forever; call it "
                "after that call returns"
            )
        return lock._lock.__enter__


class _Exit:
    """``OptimizerLock.__exit__``: the lock's own ``__exit__``, a C function."""

    def __get__(self, lock: OptimizerLock | None, owner: type | None = None) -> Any:
        return self if lock is None else lock._lock.__exit__


class OptimizerLock:
    """A lock that knows the thread holding it: ``with lock:`` from that thread again raises
    ``RuntimeError`` (naming the method that asked) rather than deadlocking.

    Entering and leaving are the C functions of a ``threading.RLock`` (held once at most: the
    re-entrancy check refuses a second entry), looked up through descriptors, so that no Python
    code runs between acquiring the lock and the point from which ``with`` is sure to release
    it: a KeyboardInterrupt landing at the start of a Python ``__exit__`` (or just after a
    Python ``__enter__`` acquired) left the lock held for good (every later step of that
    optimizer refused or waiting forever)."""

    __slots__ = ("_lock",)

    __enter__ = _CheckedEnter()
    __exit__ = _Exit()

    def __init__(self) -> None:
        self._lock: Any = threading.RLock()


def _caller() -> str:
    """``Class.method`` (or ``module.function``) that entered the lock, for the re-entrancy
    message: looked up only when raising, so that a step pays nothing for it."""
    frame = sys._getframe(2)  # (0: here, 1: the __enter__ lookup)
    owner = frame.f_locals.get("self")
    where = type(owner).__name__ if owner is not None else frame.f_globals.get("__name__", "?")
    return f"{where}.{frame.f_code.co_name}"


def new_lock(owner: Any) -> OptimizerLock:
    """A lock for `owner` (kept as ``owner._lock``), renewed in a forked child."""
    _LIVE.add(owner)
    return OptimizerLock()


def _renew_after_fork() -> None:
    for owner in list(_LIVE):
        owner._lock = OptimizerLock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_renew_after_fork)
