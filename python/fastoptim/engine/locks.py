"""The per-optimizer lock that serialises steps, made fork-safe: a child process (``fork``
while another thread of the parent held an optimizer's lock, mid-step) gets fresh locks, since
the thread that held the copied one does not exist there."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def new_lock(owner: Any) -> threading.Lock:
    """A lock for `owner` (kept as ``owner._lock``), renewed in a forked child."""
    _LIVE.add(owner)
    return threading.Lock()


def _renew_after_fork() -> None:
    for owner in list(_LIVE):
        owner._lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_renew_after_fork)
