"""One OpenMP runtime with torch: run before the compiled extension is loaded.

Since steps run on fastoptim's own worker pool (``run_chunks`` in ``cpp/src/dispatch.cpp``: an
OpenMP parallel region makes its caller wait for every thread of the team, even one the OS has
descheduled), the extension calls no OpenMP function and links no OpenMP runtime (the linker
drops the unused ``libgomp``, and a wheel vendors none), so :func:`share_torch_runtime` finds
nothing to share and does nothing.  It is kept, with its tests, until the build stops asking
for OpenMP altogether.  What follows describes the situation it was written for.

A binary wheel of fastoptim vendors its own copy of GCC's OpenMP runtime, renamed by auditwheel
(``fastoptim.libs/libgomp-<hash>.so.1.0.0``), and so does torch's wheel (``torch/lib/libgomp.so.1``
for torch 2.13).  Two copies under two names are two runtimes, each with its own thread pool.
When torch is imported first, it loads its copy into the global symbol scope
(``libtorch_global_deps``, ``RTLD_GLOBAL``), which the dynamic linker searches before an
extension's own dependencies: the extension's OpenMP calls bind to torch's runtime and the
vendored copy is loaded but unused.  When fastoptim is imported first, the extension binds to its
own copy, and the two pools fight for the cores: the threads of one spin (``GOMP_SPINCOUNT``)
while the other's wait for a core.  On a 2-core machine, a 256K-element Adam step right after a
torch op took 4 ms instead of 0.1 ms, and a training iteration of a small MLP 5.3-5.9 ms instead
of 1.3 ms (``python bench/test_torch_dropin.py --openmp`` with the wheel).

:func:`share_torch_runtime` makes both import orders behave like "torch first": when torch is
installed (found without importing it) and ships a runtime under another name than the one the
extension links, it loads torch's copy globally, exactly as ``import torch`` would, so that the
extension binds to it.  It does nothing when torch is not installed, on other systems than Linux
(macOS and Windows wheels use other runtimes and other loaders), when the extension links the
very runtime torch ships (a source build linking the system's ``libgomp.so.1`` while torch ships
``libgomp.so.1`` too: whichever loads first then serves both), or when
``FASTOPT_TORCH_OPENMP=0``.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from importlib.util import find_spec

ENV = "FASTOPT_TORCH_OPENMP"
_GOMP = re.compile(r"libgomp(-[0-9a-f]+)?\.so(\.[0-9]+)*")
_SONAME = "libgomp.so.1"  # what a source build links (GCC's runtime)

loaded: str | None = None  # the path share_torch_runtime() loaded, if any


def _runtimes(folder: str) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if _GOMP.fullmatch(n))


def torch_runtime() -> str | None:
    """The path of the GNU OpenMP runtime shipped in torch's wheel (``torch/lib``), found
    without importing torch; None if torch is not installed or ships none."""
    try:
        spec = find_spec("torch")
    except (ImportError, ValueError):  # a broken installation, or a torch without __spec__
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        names = _runtimes(os.path.join(folder, "lib"))
        if names:
            name = _SONAME if _SONAME in names else names[0]
            return os.path.join(folder, "lib", name)
    return None


def own_runtime() -> str:
    """The file name of the runtime the extension links: auditwheel's renamed copy in
    ``fastoptim.libs`` for a wheel, else ``libgomp.so.1``."""
    package = os.path.dirname(os.path.abspath(__file__))
    vendored = _runtimes(os.path.join(os.path.dirname(package), "fastoptim.libs"))
    return vendored[0] if vendored else _SONAME


def share_torch_runtime() -> str | None:
    """Load torch's OpenMP runtime globally if the extension would otherwise run a second one
    (see the module's docstring); the path loaded, or None."""
    global loaded
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = torch_runtime()
    if path is None or os.path.basename(path) == own_runtime():
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:  # pragma: no cover - an unloadable runtime: keep the extension's own
        return None
    loaded = path
    return path


share_torch_runtime()  # on import: fastoptim/__init__.py imports this module before _core
