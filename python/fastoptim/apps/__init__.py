"""The applications of the ``fastoptim`` command, built on the library: :mod:`~.cli` (the
command line), :mod:`~.demo` (a NumPy MLP trained once per optimizer), :mod:`~.minimize` (test
functions), :mod:`~.bench` (benchmarks) and :mod:`~.mlp` (the demo's network).  Nothing in the
library imports them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def lookup(name: str, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """The entry of `names` that `name` (or its entry in `aliases`, keyed in lower case) spells
    in any case; KeyError if none."""
    wanted = (aliases or {}).get(name.strip().lower(), name.strip()).lower()
    for key in names:
        if key.lower() == wanted:
            return key
    raise KeyError(name)


def plural(n: int, word: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``, ``"28,760 updates"``: `n` (with thousands separators) and
    `word`, with an ``s`` unless `n` is 1."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def capped(threads: int | None) -> str:
    """A note when `threads` (``--threads``) is more than :func:`fastoptim.max_threads`, where
    :func:`fastoptim.set_num_threads` caps it."""
    from .. import max_threads

    if threads is None or threads <= max_threads():
        return ""
    return f" (--threads {threads} capped at the maximum)"
