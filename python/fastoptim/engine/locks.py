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
from threading import get_ident
from typing import Any

_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


class OptimizerLock:
    """A ``threading.Lock`` that records the thread holding it: ``with lock:`` from that thread
    again raises ``RuntimeError`` (naming the method that asked) rather than deadlocking."""

    __slots__ = ("_lock", "_owner")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread ident of the holder

    def __enter__(self) -> None:
        me = get_ident()
        if self._owner == me:  # (only this thread sets its own ident: no race)
            raise RuntimeError(
                f"{_caller()} was called re-entrantly: this thread is already inside a call of "
                "the same optimizer (a step, a checkpoint...) that called back into it (from a "
                "schedule, a closure or a hook), and would wait for itself forever; call it "
                "after that call returns"
            )
        self._lock.acquire()
        self._owner = me

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()


def _caller() -> str:
    """``Class.method`` (or ``module.function``) that entered the lock, for the re-entrancy
    message: looked up only when raising, so that a step pays nothing for it."""
    frame = sys._getframe(2)  # (0: here, 1: __enter__)
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
