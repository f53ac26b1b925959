"""``python -m fastoptim``: the ``fastoptim`` command."""

from __future__ import annotations

from .apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
