"""fastoptim: deep-learning optimizers (torch.optim's maths) as multi-threaded SIMD kernels that
update NumPy arrays in place.

    >>> import numpy as np, fastoptim as fo
    >>> w = np.zeros(4, np.float32)
    >>> opt = fo.Adam([w], lr=0.1)
    >>> opt.step([np.ones(4, np.float32)])
    >>> w
    array([-0.1, -0.1, -0.1, -0.1], dtype=float32)
"""

from __future__ import annotations

import operator
import os
from importlib.metadata import PackageNotFoundError, version

import numpy as _np

from . import _openmp  # noqa: F401  # isort: skip  # (no-op since the own thread pool)
from . import _core, functional, keras, reference, schedules, transforms
from .checkpoint import CheckpointError, load, save
from .engine.optimizer import Optimizer
from .optimizers import (
    ADOPT,
    ASGD,
    LAMB,
    LARS,
    LBFGS,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    AdamWScheduleFree,
    Lion,
    Muon,
    NAdam,
    RAdam,
    RMSprop,
    Rprop,
    SGDScheduleFree,
    SparseAdam,
)

try:
    __version__ = version("fastoptim")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Lion",
    "Rprop",
    "ASGD",
    "ADOPT",
    "LAMB",
    "LARS",
    "AdamWScheduleFree",
    "SGDScheduleFree",
    "SparseAdam",
    "Muon",
    "LBFGS",
    "Adafactor",
    "Optimizer",
    "schedules",
    "save",
    "load",
    "CheckpointError",
    "functional",
    "keras",
    "reference",
    "transforms",
    "isa",
    "available_isas",
    "set_num_threads",
    "get_num_threads",
    "max_threads",
    "available_cpus",
    "__version__",
]


def isa() -> str:
    """The instruction set the kernels run with: ``"scalar"`` (baseline x86-64), ``"avx2"``,
    ``"avx512"`` or ``"neon"``.  The best one the CPU supports unless ``FASTOPT_ISA`` is set."""
    return str(_core.isa())


def available_isas() -> list[str]:
    """Instruction sets compiled into this build that this CPU supports, best last."""
    return list(_core.available_isas())


def set_num_threads(n: int) -> None:
    """Use up to `n` threads (this one and ``n - 1`` of fastoptim's own workers) for large
    steps.  `n` is an int >= 1; above :func:`max_threads` (4 x the CPUs available to the
    process) the maximum is used.  Default: ``OMP_NUM_THREADS`` (its first entry, if an
    integer >= 1) or :func:`available_cpus`; 1 in a forked child until it calls this.
    Results never depend on the thread count."""
    if isinstance(n, (bool, _np.bool_)) or not hasattr(type(n), "__index__"):
        raise ValueError(f"set_num_threads: n must be an int >= 1, got {n!r}")
    count = operator.index(n)
    if count < 1:
        raise ValueError(f"set_num_threads: n must be an int >= 1, got {count}")
    _core.set_num_threads(min(count, max_threads()))


def get_num_threads() -> int:
    """Threads a large step uses."""
    return int(_core.get_num_threads())


def max_threads() -> int:
    """The most threads a step uses: 4 x :func:`available_cpus` (a step is bound by memory
    bandwidth; more threads than cores only add wake-ups)."""
    return int(_core.max_threads())


def available_cpus() -> int:
    """The CPUs available to the process when fastoptim was imported, at least 1: its
    affinity mask (``os.sched_getaffinity``; elsewhere than Linux the machine's count),
    capped by its cgroups' CPU quota where one is set (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, the smallest over its cgroup and their
    ancestors; a fraction counts as the next integer).  A container limited to 2 CPUs on a
    64-CPU host (``docker run --cpus 2``, a Kubernetes CPU limit) has 2, where
    ``os.cpu_count()`` and the affinity mask say 64: threads beyond the quota make a step
    slower, since once the quota is spent the kernel stops every thread of the container
    until its next period.  The default thread count (:func:`set_num_threads`)."""
    return int(_core.available_cpus())


def _apply_isa_env() -> None:
    wanted = os.environ.get("FASTOPT_ISA", "").strip().lower()
    if not wanted:
        return
    if wanted not in available_isas():
        raise ImportError(
            f"FASTOPT_ISA={wanted!r} is not available on this machine "
            f"(available: {', '.join(available_isas())})"
        )
    _core.set_isa(wanted)


_apply_isa_env()
