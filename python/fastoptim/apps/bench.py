"""The benchmark behind ``python -m fastoptim bench``: one optimizer step per contender and
workload, timed interleaved (A B C A B C ...) and reported as medians with their spread, next
to a streaming kernel that moves the same bytes (the roofline, measured in the same run).

Each sample times a block of steps lasting at least 2 ms (far above the clock's granularity).
A row whose numbers cannot be right (fastoptim faster than 110% of the streaming kernel, or
moving its bytes at under 1 GB/s, or its rounds more than +-25% apart, as happens when other
processes compete for the cores) is measured again; what is still wrong after that is flagged
in the table, never printed as a plain fact.  A speed-up the rounds cannot pin down (their
ranges allow values more than 1.5x apart) is marked "?".  The other modes (``--rows``,
``--transforms``, ``--muon``, ``--adafactor``) go through the same machinery (:func:`_timed`,
:func:`check_timings`) and the same rule for an impossible cell (:func:`over_limit`), and
print each time with its spread.

Contenders: fastoptim (gradients bound: ``opt.step()``), the NumPy reference
(:mod:`fastoptim.reference`) and, when torch is installed, ``torch.optim`` with its for-loop,
foreach and fused implementations (whichever exist for that optimizer on CPU); for LAMB and
LARS, which torch.optim lacks, ``pytorch_optimizer``'s ``Lamb`` / ``LARS`` (for-loop and foreach)
when that is installed.

LAMB and LARS take two passes (:data:`TWO_PASS`): a per-tensor reduction pass (the norms of the
trust ratio) and the update.  Their rows report the bytes of both passes and compare with a
streaming workload of the same bytes in the same mix of reads and writes, and a note under the
table spells out each pass's bytes.

``--layouts`` (:func:`run_layouts`): AdamW on one tensor in each precision layout of
:data:`LAYOUTS`, each next to ``_core.stream_mixed`` moving exactly its bytes per element with
arrays of the same widths (float32 p/g/m/v 28; bf16 p/g + fp32 state 22; all-bf16 14; bf16 p/g
+ fp32 master 28: master, m, v read and written, bf16 g read, bf16 p written only; offload 28:
fp32 p, m, v read and written, bf16 g read, bf16 copy written; fp16 likewise), torch's fused
AdamW (bf16 with bf16 state, fp32) and casting around an fp32 step, all in the same
interleaved rounds.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _core, reference
from .. import optimizers as fast
from . import lookup, plural

# name -> (class name, options, state buffers per parameter)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], int]] = {
    "SGD": ("SGD", {"lr": 1e-3}, 0),
    "SGD+momentum": ("SGD", {"lr": 1e-3, "momentum": 0.9}, 1),
    "Adagrad": ("Adagrad", {}, 1),
    "RMSprop": ("RMSprop", {}, 1),
    "Adadelta": ("Adadelta", {}, 2),
    "Adam": ("Adam", {}, 2),
    "AdamW": ("AdamW", {}, 2),
    "AMSGrad": ("Adam", {"amsgrad": True}, 3),
    "Adamax": ("Adamax", {}, 2),
    "NAdam": ("NAdam", {}, 2),
    "RAdam": ("RAdam", {}, 2),
    "Lion": ("Lion", {}, 1),
    "Rprop": ("Rprop", {}, 2),
    "ASGD": ("ASGD", {}, 1),
    "ADOPT": ("ADOPT", {}, 2),
    "AdamWScheduleFree": ("AdamWScheduleFree", {}, 2),
    "SGDScheduleFree": ("SGDScheduleFree", {}, 1),
    "SparseAdam": ("SparseAdam", {}, 2),  # (every row present; its row updates: bench --rows)
    "LAMB": ("LAMB", {}, 2),
    "LARS": ("LARS", {}, 1),
}
#: other spellings (any case) of :data:`OPTIMIZERS` names, e.g. ``fastoptim demo``'s
ALIASES = {"momentum": "SGD+momentum"}


def canonical(name: str) -> str:
    """The :data:`OPTIMIZERS` key for `name` or an :data:`ALIASES` entry, ignoring case
    (``adam`` -> ``Adam``, ``Momentum`` -> ``SGD+momentum``)."""
    return lookup(name, OPTIMIZERS, ALIASES)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a measurement: `rows`, the rows measured before it."""

    def __init__(self, rows: Sequence[Any]) -> None:
        super().__init__()
        self.rows = list(rows)


@contextlib.contextmanager
def _keep(rows: Sequence[Any]) -> Iterator[None]:
    """A KeyboardInterrupt in the block as :class:`Interrupted`, carrying `rows` (so far)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(rows) from None


# The two-pass optimizers (a per-tensor reduction pass before the update; see step.cpp): name
# -> (arrays pass 1 reads, of which it writes, arrays pass 2 reads, of which it writes).  Their
# rows move these bytes, and their streaming kernel moves the same bytes with the same mix of
# reads and writes: one fused pass reading and writing the written arrays (plus one read-only
# array, as _core.stream does) and a read-only pass (_core.stream_read) over each other read.
TWO_PASS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # pass 1: Adam's moments and the norms of p and u; pass 2: u again from m, v, p moves
    "LAMB": (("p", "g", "m", "v"), ("m", "v"), ("m", "v", "p"), ("p",)),
    # pass 1: the norms of p and g; pass 2: the momentum update
    "LARS": (("p", "g"), (), ("p", "g", "buf"), ("p", "buf")),
}


def two_pass_bytes(name: str, itemsize: int = 4) -> tuple[int, int, int, int]:
    """(bytes per element, of pass 1, arrays read, arrays written) of a two-pass optimizer."""
    r1, w1, r2, w2 = TWO_PASS[name]
    reads, writes = len(r1) + len(r2), len(w1) + len(w2)
    return itemsize * (reads + writes), itemsize * (len(r1) + len(w1)), reads, writes


def _two_pass_roofline(name: str, total: int) -> tuple[Callable[[], object], list[np.ndarray]]:
    """A streaming workload of `name`'s bytes and read/write mix (see TWO_PASS)."""
    _, _, reads, writes = two_pass_bytes(name)
    fused = [np.ones(total, np.float32) for _ in range(writes + 1)]  # reads all, writes all but 1
    extra = [np.ones(total, np.float32) for _ in range(reads - writes - 1)]

    def run() -> None:
        _core.stream(fused)
        for a in extra:
            _core.stream_read(a)

    return run, fused + extra


# torch.optim has fused CPU kernels for these only.
_TORCH_FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}
# torch.optim lacks these: the torch contenders are pytorch_optimizer's classes when installed.
_PYTORCH_OPTIMIZER = {"LAMB": "Lamb", "LARS": "LARS"}


def _bert_base_shapes() -> list[tuple[int, ...]]:
    """~110M parameters in ~200 tensors, shaped like BERT-base's."""
    shapes: list[tuple[int, ...]] = [(30522, 768), (512, 768), (2, 768), (768,), (768,)]
    for _ in range(12):
        shapes += [(768, 768), (768,)] * 4  # query, key, value, attention output
        shapes += [(768,), (768,)]  # attention layer norm
        shapes += [(3072, 768), (3072,), (768, 3072), (768,)]  # feed-forward
        shapes += [(768,), (768,)]  # output layer norm
    shapes += [(768, 768), (768,)]  # pooler
    return shapes


WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "large": lambda: [(1 << 24,)],  # 16M elements: far beyond the caches
    "mlp": lambda: [(784, 256), (256,), (256, 256), (256,), (256, 10), (10,)],
    "many": lambda: [(4096,)] * 4096,  # 4096 tensors of 4096 elements
    "bert": _bert_base_shapes,
}
DEFAULT_WORKLOADS = ("large", "mlp")  # "many" and "bert" take minutes with torch installed


def bytes_per_element(nstate: int, itemsize: int = 4) -> int:
    """Memory traffic of one step: read param, grad and each state; write param and states."""
    return itemsize * ((2 + nstate) + (1 + nstate))


@dataclass
class Row:
    """One optimizer on one workload: per contender, the median, fastest and slowest seconds
    per step over the interleaved rounds, and what the checks found."""

    optimizer: str
    workload: str
    elements: int
    tensors: int
    nstate: int
    times: dict[str, float] = field(default_factory=dict)  # median
    low: dict[str, float] = field(default_factory=dict)  # fastest round
    high: dict[str, float] = field(default_factory=dict)  # slowest round
    steps: dict[str, int] = field(default_factory=dict)  # steps per sample
    rounds: int = 0
    remeasured: int = 0  # extra passes the checks asked for
    flags: list[str] = field(default_factory=list)  # what stayed wrong after re-measuring
    bpe: int = 0  # bytes per element when not bytes_per_element(nstate) (bench --layouts)
    contender: str = "fastoptim"  # who the "fastoptim" entries time (bench --layouts: a layout)

    @property
    def bytes(self) -> int:
        return self.elements * (self.bpe or bytes_per_element(self.nstate))

    def spread(self, name: str) -> float:
        """Half the fastest-to-slowest range of `name`'s rounds, relative to its median."""
        return (self.high[name] - self.low[name]) / 2 / self.times[name]

    def ratio(self, slow: str, fast: str = "fastoptim") -> tuple[float, float, float]:
        """times[slow] / times[fast]: (median, lowest, highest the rounds allow)."""
        return (
            self.times[slow] / self.times[fast],
            self.low[slow] / self.high[fast],
            self.high[slow] / self.low[fast],
        )

    @property
    def roofline(self) -> float:
        """Fraction of the streaming kernel's speed: time of the stream / time of the step."""
        return self.times["roofline"] / self.times["fastoptim"]


# A cell is re-measured (up to MAX_REMEASURE more passes of the rounds) and then flagged when:
ROOFLINE_LIMIT = 1.10  # fastoptim faster than 110% of the streaming kernel moving its bytes
NOISE_LIMIT = 0.25  # fastoptim's or the streaming kernel's rounds more than +-25% apart
MIN_GBPS = 1.0  # fastoptim or the streaming kernel moving its bytes slower than 1 GB/s: a single
# core streams 5-20 GB/s, so the threads were waiting for cores other processes hold
MAX_REMEASURE = 2
MIN_SAMPLE_S = 2e-3  # a sample (a block of steps timed at once) lasts at least this long...
MAX_SAMPLE_S = 0.1  # ...and, when one step allows it, at most this long


def clock_granularity() -> float:
    """The smallest nonzero difference between two readings of time.perf_counter (at least
    its advertised resolution)."""
    best = math.inf
    for _ in range(2000):
        t0 = time.perf_counter()
        t1 = time.perf_counter()
        while t1 == t0:
            t1 = time.perf_counter()
        best = min(best, t1 - t0)
    return max(best, time.get_clock_info("perf_counter").resolution)


def machine_load() -> tuple[float, int] | None:
    """(1-minute load average, usable cores), or None where the OS does not say."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return load, cores


def _steps_per_sample(fn: Callable[[], object], repeats: int, min_sample: float) -> int:
    """Steps per timed block: `repeats`, fewer when one step is long (a block of at most
    MAX_SAMPLE_S, at least one step), more when it is short (a block of at least `min_sample`,
    far above the clock's granularity)."""
    t = math.inf
    for _ in range(3):  # the fastest of three: one step delayed by a busy core misleads
        t0 = time.perf_counter()
        fn()
        t = min(t, max(time.perf_counter() - t0, 1e-9))
        if t > MAX_SAMPLE_S:
            break
    n = repeats
    if t * n > MAX_SAMPLE_S:
        n = max(1, int(MAX_SAMPLE_S / t))
    if t * n < min_sample:
        n = math.ceil(min_sample / t)
    return n


def _block(fn: Callable[[], object], n: int) -> float:
    """Seconds per step over `n` steps timed as one block."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _median_step(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(_block(fn, 1) for _ in range(repeats))


def _torch_contenders(
    cls_name: str, kwargs: dict[str, Any], arrays: Sequence[np.ndarray], grads: Sequence[Any]
) -> dict[str, Callable[[], object]]:
    try:
        import torch
    except ImportError:
        return {}
    cls = getattr(torch.optim, cls_name, None)
    prefix = "torch"
    if cls is None and cls_name in _PYTORCH_OPTIMIZER:  # LAMB, LARS: pytorch_optimizer's
        try:  # (an oracle package: not a dependency, so not typed here)
            oracle = importlib.import_module("pytorch_optimizer")
        except ImportError:
            return {}
        cls = getattr(oracle, _PYTORCH_OPTIMIZER[cls_name])
        prefix = "torch pytorch_optimizer"
    if cls is None or cls_name == "SparseAdam":  # e.g. Lion; SparseAdam takes sparse grads only
        return {}
    modes = {f"{prefix} for-loop": {"foreach": False}, f"{prefix} foreach": {"foreach": True}}
    if cls_name in _TORCH_FUSED:
        modes["torch fused"] = {"fused": True}
    out: dict[str, Callable[[], object]] = {}
    for label, mode in modes.items():
        params = [torch.from_numpy(a.copy()) for a in arrays]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        opt = cls(params, **kwargs, **mode)
        out[label] = opt.step
    return out


def _contenders(
    cls_name: str,
    kwargs: dict[str, Any],
    arrays: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    torch: bool = True,
) -> dict[str, Callable[[], object]]:
    """One step of each contender on copies of `arrays`: fastoptim (gradients bound), the NumPy
    reference and, with `torch`, torch.optim's implementations."""
    mine = getattr(fast, cls_name)([a.copy() for a in arrays], **kwargs)
    for dst, src in zip(mine.grads, grads):
        assert isinstance(dst, np.ndarray)
        dst[...] = src
    ref = getattr(reference, cls_name)([a.copy() for a in arrays], **kwargs)
    contenders: dict[str, Callable[[], object]] = {
        "fastoptim": mine.step,
        "NumPy reference": functools.partial(ref.step, grads),
    }
    if torch:
        contenders.update(_torch_contenders(cls_name, kwargs, arrays, grads))
    return contenders


def _interleaved(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    repeats: int,
    min_sample: float = MIN_SAMPLE_S,
    settle: Mapping[str, float] | None = None,
) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Steps per sample and `rounds` samples (seconds per step) of each contender: a warm-up
    step each (first touch, state allocation), a calibration step, then `rounds` interleaved
    rounds (A B C A B C ...: noise hits every contender alike)."""
    for fn in contenders.values():
        fn()
    steps = {k: _steps_per_sample(fn, repeats, min_sample) for k, fn in contenders.items()}
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    _more(contenders, steps, samples, rounds, settle)
    return steps, samples


def _more(
    contenders: dict[str, Callable[[], object]],
    steps: dict[str, int],
    samples: dict[str, list[float]],
    rounds: int,
    settle: Mapping[str, float] | None = None,
) -> None:
    """`rounds` more interleaved rounds of samples; after a sample of a contender named in
    `settle`, that many seconds of sleep (untimed: threads it leaves spinning go to sleep)."""
    for _ in range(rounds):
        for name, fn in contenders.items():
            samples[name].append(_block(fn, steps[name]))
            if settle and name in settle:
                time.sleep(settle[name])


def _fill(row: Row, steps: dict[str, int], samples: dict[str, list[float]]) -> None:
    row.steps = dict(steps)
    row.rounds = len(samples["fastoptim"])
    stats = {k: _stat(v) for k, v in samples.items()}
    row.times = {k: v[0] for k, v in stats.items()}
    row.low = {k: v[1] for k, v in stats.items()}
    row.high = {k: v[2] for k, v in stats.items()}


#: A contender's seconds per call over the rounds: (median, fastest, slowest).
Stat = tuple[float, float, float]


def _stat(samples: Sequence[float]) -> Stat:
    return statistics.median(samples), min(samples), max(samples)


def spread(s: Stat) -> float:
    """Half the fastest-to-slowest range of a :data:`Stat`'s rounds, relative to its median."""
    return (s[2] - s[1]) / 2 / s[0]


def over_limit(fraction: float) -> bool:
    """The one rule, in every table, for a speed that cannot be physical: `fraction` (what was
    reached over the most its reference allows; for a streaming kernel moving the same bytes,
    the kernel's time / the row's) above ROOFLINE_LIMIT.  Such a cell is a measurement error."""
    return fraction > ROOFLINE_LIMIT


def _mark(fraction: float) -> str:
    """ "!" after a cell that :func:`over_limit` rejects, else a space."""
    return "!" if over_limit(fraction) else " "


def check_timings(
    times: Mapping[str, Stat],
    against: Sequence[tuple[str, str, float]] = (),
    moved: Mapping[str, float] | None = None,
    noisy: Sequence[str] = (),
) -> list[str]:
    """What makes timings (of the modes other than the optimizer tables and --layouts, whose
    rows :func:`problems` checks by the same rules) untrustworthy: for each (name, reference,
    ceiling) of `against`, `name` faster than its reference allows (the reference's median
    time / name's, over `ceiling`, the most that ratio can physically be, rejected by
    :func:`over_limit`); each contender of `moved` (name -> bytes per call, from 1 MB) moving
    them slower than MIN_GBPS; each contender of `noisy` with rounds spread over NOISE_LIMIT."""
    found = []
    for name, ref, ceiling in against:
        fraction = times[ref][0] / times[name][0] / ceiling
        if over_limit(fraction):
            found.append(
                f"{name} at {100 * fraction:.0f}% of what {ref} allows > "
                f"{100 * ROOFLINE_LIMIT:.0f}%"
            )
    slow = [
        k for k, b in (moved or {}).items() if b >= 1 << 20 and b / times[k][0] < MIN_GBPS * 1e9
    ]
    if slow:
        found.append(
            f"{' and '.join(slow)} below {MIN_GBPS:g} GB/s: threads waiting for busy cores "
            "(try --threads 1)"
        )
    wide = [k for k in noisy if spread(times[k]) > NOISE_LIMIT]
    if wide:
        found.append(f"rounds spread > +-{100 * NOISE_LIMIT:.0f}%: {', '.join(wide)}")
    return found


def _timed(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    repeats: int,
    check: Callable[[dict[str, Stat]], list[str]],
    progress: Callable[[str], None] | None = None,
    min_sample: float = MIN_SAMPLE_S,
    settle: Mapping[str, float] | None = None,
) -> tuple[dict[str, Stat], list[str], int]:
    """`rounds` interleaved rounds of `contenders` (:func:`_interleaved`) and, while `check`
    finds problems in their timings, up to MAX_REMEASURE more passes of `rounds` rounds of
    every contender: (the timings, what `check` still finds: the flags, the rounds run).
    `settle`: seconds of sleep after each sample of the contenders it names (:func:`_more`)."""
    steps, samples = _interleaved(contenders, rounds, repeats, min_sample, settle)

    def stats() -> dict[str, Stat]:
        return {k: _stat(v) for k, v in samples.items()}

    passes = _remeasure(
        contenders, steps, samples, rounds, lambda: check(stats()), progress, settle=settle
    )
    times = stats()
    return times, check(times), rounds * (1 + passes)


def _remeasure(
    contenders: dict[str, Callable[[], object]],
    steps: dict[str, int],
    samples: dict[str, list[float]],
    rounds: int,
    check: Callable[[], list[str]],
    progress: Callable[[str], None] | None = None,
    what: str = "re-measuring every contender",
    settle: Mapping[str, float] | None = None,
) -> int:
    """Every mode's re-measuring: while `check` (of `samples` as they stand) finds problems,
    up to MAX_REMEASURE more passes of `rounds` interleaved rounds of `contenders` into
    `samples`, each said to `progress` ("    {what} (the problems)").  Returns the passes."""
    passes = 0
    while passes < MAX_REMEASURE and (found := check()):
        if progress:
            progress(f"    {what} ({'; '.join(found)})")
        passes += 1
        _more(contenders, steps, samples, rounds, settle)
    return passes


def _flag_notes(flagged: Sequence[tuple[str, int, Sequence[str]]]) -> list[str]:
    """The lines under a table for its flagged rows: (row, rounds run, flags)."""
    return [
        f"  ! {name}, after {rounds} rounds: {'; '.join(flags)}. Do not trust this row."
        for name, rounds, flags in flagged
        if flags
    ]


def problems(row: Row, granularity: float) -> list[str]:
    """What makes `row` untrustworthy: a roofline above ROOFLINE_LIMIT (faster than moving the
    bytes allows), fastoptim or the streaming kernel below MIN_GBPS (slower than one core
    streams), fastoptim's or the streaming kernel's rounds spread more than NOISE_LIMIT, or a
    sample not far above the clock's granularity."""
    found = []

    def names(keys: Sequence[str]) -> str:
        return ", ".join(row.contender if k == "fastoptim" else k for k in keys)

    if over_limit(row.roofline):
        found.append(f"roofline {100 * row.roofline:.0f}% > {100 * ROOFLINE_LIMIT:.0f}%")
    slow = [k for k in ("fastoptim", "roofline") if row.bytes / row.times[k] < MIN_GBPS * 1e9]
    if slow and row.bytes >= 1 << 20:  # below 1 MB a step's fixed cost may dominate
        found.append(
            f"{names(slow).replace(', ', ' and ')} below {MIN_GBPS:g} GB/s: threads waiting "
            "for busy cores "
            "(try --threads 1)"
        )
    # the row's own numbers (time, GB/s, roofline); another contender's noise shows as a "?"
    # on its ratio instead
    noisy = [k for k in ("fastoptim", "roofline") if row.spread(k) > NOISE_LIMIT]
    if noisy:
        found.append(f"rounds spread > +-{100 * NOISE_LIMIT:.0f}%: {names(noisy)}")
    coarse = [k for k in row.times if row.low[k] * row.steps[k] < 100 * granularity]
    if coarse:
        found.append(f"samples near the clock's granularity: {names(coarse)}")
    return found


def _refilled(
    row: Row, steps: dict[str, int], samples: dict[str, list[float]], granularity: float
) -> list[str]:
    """:func:`problems` of `row` filled from `samples` as they stand."""
    _fill(row, steps, samples)
    return problems(row, granularity)


def run(
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
    workloads: Sequence[str] = DEFAULT_WORKLOADS,
    repeats: int = 5,
    rounds: int = 3,
    torch: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure every optimizer on every workload (float32); see the module docstring.  A row
    the checks (:func:`problems`) find wrong is measured again, up to MAX_REMEASURE more times
    `rounds` rounds; what is still wrong then is left in ``row.flags``."""
    rows: list[Row] = []
    total_cells = len(workloads) * len(optimizers)
    granularity = clock_granularity()
    min_sample = max(MIN_SAMPLE_S, 1000 * granularity)
    with _keep(rows):  # Ctrl-C: the rows measured so far go with the exception
        for wname in workloads:
            shapes = WORKLOADS[wname]()
            rng = np.random.default_rng(0)
            arrays = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
            grads = [rng.standard_normal(s, dtype=np.float32) * np.float32(0.1) for s in shapes]
            total = sum(a.size for a in arrays)
            for oname in optimizers:
                cls_name, kwargs, nstate = OPTIMIZERS[oname]
                if progress:
                    progress(f"[{len(rows) + 1}/{total_cells}] {wname}: {oname}")
                contenders = _contenders(cls_name, kwargs, arrays, grads, torch)
                bpe = 0
                if oname in TWO_PASS:  # its bytes, in its mix of reads and writes
                    contenders["roofline"], streams = _two_pass_roofline(oname, total)
                    bpe = two_pass_bytes(oname)[0]
                else:
                    streams = [np.ones(total, np.float32) for _ in range(2 + nstate)]
                    contenders["roofline"] = functools.partial(_core.stream, streams)
                steps, samples = _interleaved(contenders, rounds, repeats, min_sample)
                row = Row(oname, wname, total, len(shapes), nstate, bpe=bpe)
                check = functools.partial(_refilled, row, steps, samples, granularity)
                row.remeasured = _remeasure(
                    contenders, steps, samples, rounds, check, progress, "re-measuring"
                )
                row.flags = check()
                rows.append(row)
                del streams, contenders
                gc.collect()
    return rows


def _ratio(row: Row, slow: str) -> str:
    median, low, high = row.ratio(slow)
    mark = "?" if high / low > 1.5 else " "
    return f"{median:7.1f}x{mark}"


def format_table(rows: Sequence[Row]) -> str:
    """One table per workload: time/step (median of the rounds, +- half their range),
    ns/element, GB/s, % of roofline, speed-ups; marks on cells the checks distrust, and the
    rows' problems listed under the table."""
    out = []
    for wname in dict.fromkeys(r.workload for r in rows):
        wrows = [r for r in rows if r.workload == wname]
        r0 = wrows[0]
        w = max(13, *(len(r.optimizer) for r in wrows))  # the names' column
        out.append(
            f"\n{wname}: {r0.tensors} tensor(s), {r0.elements:,} float32 elements\n"
            f"{'optimizer':{w}s} {'B/el':>4s} {'time/step':>10s} {'+-':>4s} {'ns/el':>7s} "
            f"{'GB/s':>6s} {'roofline':>9s} {'vs NumPy':>9s} {'vs torch':>9s}  best torch"
        )
        out.append("-" * (79 + w))
        notes = []
        for r in wrows:
            t = r.times["fastoptim"]
            torch_times = {k: v for k, v in r.times.items() if k.startswith("torch")}
            best = min(torch_times, key=lambda k: torch_times[k]) if torch_times else None
            vs_torch = _ratio(r, best) if best else f"{'-':>9s}"
            roof = f"{100 * r.roofline:7.0f}%{_mark(r.roofline)}"
            out.append(
                f"{r.optimizer:{w}s} {r.bpe or bytes_per_element(r.nstate):4d} "
                f"{_fmt_time(t):>10s} {100 * r.spread('fastoptim'):3.0f}% "
                f"{t / r.elements * 1e9:7.3f} {r.bytes / t / 1e9:6.1f} {roof} "
                f"{_ratio(r, 'NumPy reference')} {vs_torch}  "
                f"{best.removeprefix('torch ') if best else '-'}"
            )
            if r.optimizer in TWO_PASS:
                r1, w1, r2, w2 = TWO_PASS[r.optimizer]
                b, b1, reads, writes = two_pass_bytes(r.optimizer)
                notes.append(
                    f"  {r.optimizer}: two passes, {b} B/el: a per-tensor reduction pass (reads "
                    f"{', '.join(r1)}{'; writes ' + ', '.join(w1) if w1 else ''}: {b1} B) and "
                    f"the update (reads {', '.join(r2)}; writes {', '.join(w2)}: {b - b1} B); "
                    f"roofline: streaming {reads} reads + {writes} writes per element"
                )
            if r.flags:
                notes.append(
                    f"  ! {r.optimizer}, after {r.rounds} rounds: {'; '.join(r.flags)}. "
                    "Do not trust this row."
                )
        out.extend(notes)
    return "\n".join(out)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def step_overhead(tensors: int, repeats: int = 2000) -> float:
    """Seconds per ``opt.step()`` (Adam, bound gradients) on `tensors` one-element tensors:
    the fixed cost of a step, with no memory traffic to speak of."""
    params = [np.zeros(1, np.float32) for _ in range(tensors)]
    opt = fast.Adam(params)
    opt.step()
    return min(_median_step(opt.step, repeats) for _ in range(3))


TORCH_OVERHEAD_TENSORS = (1, 64, 256)  # tensors of 16 elements: fixed cost, per-tensor slope


def torch_step_overhead(
    tensors: Sequence[int] = TORCH_OVERHEAD_TENSORS,
    repeats: int = 400,
    rounds: int = 5,
    size: int = 16,
) -> dict[tuple[int, bool], float]:
    """Median seconds of a ``fastoptim.torch.Adam`` step on `tensors` tensors of `size`
    elements: (tensors, new_grads) -> seconds.  ``new_grads``: before every step (outside
    the timed interval) each ``p.grad`` is a new tensor, as autograd makes them after
    ``zero_grad(set_to_none=True)`` (the old one is freed first, so its memory may come back
    at the same address); else the same gradient tensors every step.  The configurations
    run in turn, ``rounds`` times ``repeats`` steps each, so background load hits them alike.
    Needs torch."""
    import torch

    import fastoptim.torch as fot

    runs: dict[tuple[int, bool], tuple[Any, list[Any], list[float]]] = {}
    for n in tensors:
        for new in (False, True):
            params = [torch.zeros(size) for _ in range(n)]
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
            opt = fot.Adam(params, lr=1e-6)
            opt.step()
            runs[(n, new)] = (opt, params, [])
    clock = time.perf_counter
    for _ in range(rounds):
        for (_, new), (opt, params, times) in runs.items():
            for _ in range(repeats):
                if new:
                    for p in params:
                        p.grad = None
                    for p in params:
                        p.grad = torch.full_like(p, 1e-3)
                t0 = clock()
                opt.step()
                times.append(clock() - t0)
    return {key: statistics.median(times) for key, (_, _, times) in runs.items()}


def format_torch_overhead(times: Mapping[tuple[int, bool], float]) -> str:
    """The fixed cost (one tensor) and the per-tensor slope of :func:`torch_step_overhead`'s
    result, for the same and new gradients."""
    counts = sorted({n for n, _ in times})
    lo, hi = counts[0], counts[-1]
    out = []
    for new, what in ((False, "same grads"), (True, "new grads ")):
        cells = "  ".join(f"{n} t: {times[(n, new)] * 1e6:6.2f} us" for n in counts)
        slope = (times[(hi, new)] - times[(lo, new)]) / max(hi - lo, 1)
        out.append(
            f"fastoptim.torch step, {what}: {cells}   fixed {times[(lo, new)] * 1e6:5.2f} us, "
            f"per tensor {slope * 1e6:5.3f} us"
        )
    return "\n".join(out)


SWEEP_SIZES = tuple(4**k for k in range(2, 13))  # 16 .. 16M elements


def size_sweep(
    sizes: Sequence[int] = SWEEP_SIZES,
    optimizer: str = "Adam",
    repeats: int = 5,
    rounds: int = 3,
    torch: bool = True,
    progress: Callable[[str], None] | None = None,
    ranges: dict[str, list[tuple[float, float]]] | None = None,
) -> dict[str, list[float]]:
    """Nanoseconds per element of one step (median of `rounds` interleaved rounds) on one
    float32 array of each size, for fastoptim, the NumPy reference and, with `torch`,
    torch.optim's contenders (when installed).  `ranges`, when given, receives each point's
    (fastest, slowest) round in the same unit."""
    cls_name, kwargs, _ = OPTIMIZERS[optimizer]
    min_sample = max(MIN_SAMPLE_S, 1000 * clock_granularity())
    result: dict[str, list[float]] = {}
    for i, n in enumerate(sizes, 1):
        if progress:
            progress(f"[{i}/{len(sizes)}] {optimizer}, {n:,} elements")
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(n, dtype=np.float32)]
        grads = [rng.standard_normal(n, dtype=np.float32)]
        contenders = _contenders(cls_name, kwargs, arrays, grads, torch)
        _, samples = _interleaved(contenders, rounds, repeats, min_sample)
        for name, times in samples.items():
            result.setdefault(name, []).append(statistics.median(times) / n * 1e9)
            if ranges is not None:
                ranges.setdefault(name, []).append((min(times) / n * 1e9, max(times) / n * 1e9))
        del contenders
        gc.collect()
    return result


# ---------------------------------------------------- a busy machine (--background-load)
THREAD_SIZES = (100_000, 800_000, 4_000_000)

# A CPU-bound loop that also ends when its parent is gone (checked every ~10 ms), so that no
# process outlives the benchmark even if it is killed.
_BUSY_LOOP = (
    "import os\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(200_000):\n"
    "        pass\n"
)


@contextlib.contextmanager
def background_load(processes: int) -> Iterator[None]:
    """Run `processes` CPU-bound busy loops (separate Python processes) for the duration of the
    block; they are killed and reaped on exit, whatever happens in the block."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]))
        time.sleep(0.2 if processes else 0)  # let them start spinning
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@dataclass
class ThreadRow:
    """Adam on one float32 array: ms per step of each sample, 1 thread and the default."""

    elements: int
    one: list[float]
    default: list[float]


def thread_scaling(
    sizes: Sequence[int] = THREAD_SIZES, rounds: int = 9, repeats: int = 5
) -> list[ThreadRow]:
    """Adam steps at each size on 1 thread and on the default thread count, interleaved
    (1, default, 1, default ...), `rounds` samples each of the median of `repeats` steps.  (With
    a default of 1 thread, both columns time 1 thread.)"""
    default = _core.get_num_threads()
    rows = []
    try:
        for n in sizes:
            w = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
            opt = fast.Adam([w])
            for grad in opt.grads:
                assert isinstance(grad, np.ndarray)
                grad[...] = 0.01
            row = ThreadRow(n, [], [])
            reps = repeats * max(1, 1_000_000 // n)
            for _ in range(rounds):
                for threads, samples in ((1, row.one), (default, row.default)):
                    _core.set_num_threads(threads)
                    opt.step()
                    samples.append(_median_step(opt.step, reps) * 1e3)
            rows.append(row)
    finally:
        _core.set_num_threads(default)
    return rows


def format_threads(rows: Sequence[ThreadRow], processes: int, threads: int) -> str:
    """ms per step: median [p25-p75] of the samples, 1 thread against the default count."""

    def cell(v: list[float]) -> str:
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0], v[0], v[0]]
        return f"{statistics.median(v):.3f} [{q[0]:.3f}-{q[2]:.3f}]"

    samples = plural(len(rows[0].one) if rows else 0, "interleaved sample")
    out = [
        f"\nAdam, one float32 array, {processes} busy background process(es): ms per step, "
        f"median [p25-p75] of {samples} per column",
        f"{'elements':>10s} {'1 thread':>24s} {plural(threads, 'thread') + ' (default)':>24s} "
        f"{'ratio':>6s}",
    ]
    for r in rows:
        ratio = statistics.median(r.default) / statistics.median(r.one)
        out.append(f"{r.elements:10,d} {cell(r.one):>24s} {cell(r.default):>24s} {ratio:6.2f}")
    return "\n".join(out)


# ------------------------------------------------------ reduced precision (bench --layouts)
LAYOUT_SIZE = 1 << 24  # 16M elements: far beyond the caches
#: ``bench --layouts``' compute column: each fastoptim layout on this many elements (its arrays
#: in L2), one thread, CPU time: what a step costs a core when memory is not the limit.  That
#: cost divided by the thread count is a floor no run from memory can beat.
COMPUTE_SIZE = 1 << 16
ADAMW: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.01}


@dataclass(frozen=True)
class Stream:
    """The arrays of one streaming-kernel configuration (:func:`fastoptim._core.stream_mixed`):
    `rw32` float32 and `rw16` 16-bit arrays read and written, one gradient read (`grad`
    bytes: 4 or 2), a 16-bit array written only (`out`) and a 1-byte array read and written
    (`codes`: a 4-bit state's two packed code arrays), all in one pass."""

    rw32: int
    rw16: int
    grad: int
    out: bool = False
    codes: bool = False

    @property
    def bytes(self) -> int:
        """Bytes moved per element: 8 per float32 and 4 per 16-bit array read and written, the
        gradient read, 2 for the 16-bit array written, 2 for the 1-byte array read and
        written."""
        return (
            8 * self.rw32
            + 4 * self.rw16
            + self.grad
            + (2 if self.out else 0)
            + (2 if self.codes else 0)
        )

    @property
    def label(self) -> str:
        parts = [f"{k} x{n} r/w" for k, n in (("f32", self.rw32), ("16-bit", self.rw16)) if n]
        if self.codes:
            parts.append("1 B r/w")
        parts.append(f"grad {'f32' if self.grad == 4 else '16-bit'} r")
        if self.out:
            parts.append("16-bit w")
        return ", ".join(parts)


FP32 = Stream(3, 0, 4)  # p, m, v float32 r/w; grad float32 r
LOW_P_G = Stream(2, 1, 2)  # m, v float32 r/w; p 16-bit r/w; grad 16-bit r
ALL_LOW = Stream(0, 3, 2)  # p, m, v 16-bit r/w; grad 16-bit r
MASTER_OUT = Stream(3, 0, 2, out=True)  # p (or master), m, v float32 r/w; grad 16-bit r; 16-bit w
# 8-bit state: the two code arrays (1+1 B each) move the bytes of one 16-bit array r/w (their
# per-block scales, 2 x 8 B per 256 elements, are left out: 0.06 B/element)
Q8 = Stream(1, 1, 4)  # p float32 r/w; m, v codes r/w; grad float32 r: 16 B
Q8_LOW = Stream(0, 2, 2)  # p 16-bit r/w; m, v codes r/w; grad 16-bit r: 10 B
# 4-bit state: the two packed code arrays (0.5 B each) are read and written: one 1-byte array
# r/w, 1 B read and 1 B written per element (scales: 2 x 8 B per 128 elements, left out:
# 0.125 B/element)
Q4 = Stream(1, 0, 4, codes=True)  # p float32 r/w; m, v codes r/w; grad float32 r: 14 B
Q4_LOW = Stream(0, 1, 2, codes=True)  # p 16-bit r/w; m, v codes r/w; grad 16-bit r: 8 B


@dataclass(frozen=True)
class Layout:
    """One row of ``bench --layouts``: AdamW on one tensor, in a precision layout (a fastoptim
    layout, or a contender doing the same work), and the streaming kernel it is compared with
    (the bytes the layout must move: read and write the parameter or its master and each
    state, read the gradient, write the 16-bit parameter or copy)."""

    name: str
    stream: Stream
    traffic: str  # the bytes per element, array by array
    param: str = "float32"  # the parameter's dtype
    grad: str = "float32"  # the gradient's dtype
    options: tuple[tuple[str, Any], ...] = ()  # precision options
    copy_out: str | None = None  # the offload layout: dtype of the copy-out
    contender: str | None = None  # "torch", "deepspeed", "cast": not fastoptim's layouts

    @property
    def bytes(self) -> int:
        return self.stream.bytes


SR = (("rounding", "stochastic"), ("seed", 0))
LAYOUTS: tuple[Layout, ...] = (
    Layout("fp32", FP32, "p 4+4, m 4+4, v 4+4, g 4"),
    Layout("bf16 p/g, fp32 state", LOW_P_G, "p 2+2, g 2, m 4+4, v 4+4", "bfloat16", "bfloat16"),
    Layout(
        "all-bf16",
        ALL_LOW,
        "p 2+2, g 2, m 2+2, v 2+2",
        "bfloat16",
        "bfloat16",
        (("state_dtype", "bfloat16"),),
    ),
    Layout(
        "all-bf16, stochastic",
        ALL_LOW,
        "p 2+2, g 2, m 2+2, v 2+2",
        "bfloat16",
        "bfloat16",
        (("state_dtype", "bfloat16"), *SR),
    ),
    Layout(
        "bf16 p/g, fp32 master",
        MASTER_OUT,
        "master 4+4, m 4+4, v 4+4, g 2, p 2 (written only)",
        "bfloat16",
        "bfloat16",
        (("master_weights", True),),
    ),
    Layout(
        "offload",
        MASTER_OUT,
        "p 4+4, m 4+4, v 4+4, g 2, copy 2",
        grad="bfloat16",
        copy_out="bfloat16",
    ),
    Layout(
        "offload, stochastic",
        MASTER_OUT,
        "p 4+4, m 4+4, v 4+4, g 2, copy 2",
        grad="bfloat16",
        options=SR,
        copy_out="bfloat16",
    ),
    Layout(
        "fp32 p/g, int8 state",
        Q8,
        "p 4+4, g 4, m 1+1, v 1+1 (+ absmax 2 x 4+4 per 256)",
        options=(("state_dtype", "int8"),),
    ),
    Layout(
        "bf16 p/g, int8 state",
        Q8_LOW,
        "p 2+2, g 2, m 1+1, v 1+1 (+ absmax 2 x 4+4 per 256)",
        "bfloat16",
        "bfloat16",
        (("state_dtype", "int8"),),
    ),
    Layout(
        "fp32 p/g, int4 state",
        Q4,
        "p 4+4, g 4, m .5+.5, v .5+.5 (+ absmax 2 x 4+4 per 128)",
        options=(("state_dtype", "int4"),),
    ),
    Layout(
        "bf16 p/g, int4 state",
        Q4_LOW,
        "p 2+2, g 2, m .5+.5, v .5+.5 (+ absmax 2 x 4+4 per 128)",
        "bfloat16",
        "bfloat16",
        (("state_dtype", "int4"),),
    ),
    Layout("fp16 p/g, fp32 state", LOW_P_G, "p 2+2, g 2, m 4+4, v 4+4", "float16", "float16"),
    Layout(
        "all-fp16",
        ALL_LOW,
        "p 2+2, g 2, m 2+2, v 2+2",
        "float16",
        "float16",
        (("state_dtype", "float16"),),
    ),
    Layout(
        "torch fused bf16",
        ALL_LOW,
        "as all-bf16 (torch keeps state in the param dtype)",
        "bfloat16",
        "bfloat16",
        contender="torch",
    ),
    Layout("torch fused fp32", FP32, "as fp32", contender="torch"),
    Layout("DeepSpeed CPUAdam fp32", FP32, "as fp32", contender="deepspeed"),
    Layout(
        "DeepSpeed CPUAdam bf16",
        LOW_P_G,
        "as bf16 p/g, fp32 state (fp32_optimizer_states=True)",
        "bfloat16",
        "bfloat16",
        contender="deepspeed",
    ),
    Layout(
        "cast around fp32 step",
        MASTER_OUT,
        "needs as bf16 master; moves g 2+4, step 28, master 4 -> p 2 (+ temporaries)",
        "bfloat16",
        "bfloat16",
        contender="cast",
    ),
)
STREAMS: dict[Stream, str] = {
    s: f"{s.bytes} B ({s.label})"
    for s in (FP32, LOW_P_G, ALL_LOW, MASTER_OUT, Q8, Q8_LOW, Q4, Q4_LOW)
}


def _np_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(name)


def _layout_step(lay: Layout, p32: np.ndarray, g32: np.ndarray) -> Callable[[], object]:
    """One AdamW step of `lay` on copies of `p32` and `g32` (rounded to its dtypes)."""
    pdt, gdt = _np_dtype(lay.param), _np_dtype(lay.grad)
    if lay.contender == "torch":
        import torch

        tdt = getattr(torch, lay.param)
        p = torch.from_numpy(p32.copy()).to(tdt)
        p.grad = torch.from_numpy(g32).to(tdt)
        topt = torch.optim.AdamW([p], **ADAMW, fused=True)
        return topt.step
    if lay.contender == "deepspeed":  # the anchor of CPU offload: DeepSpeed's CPU Adam
        import torch

        adam = importlib.import_module("deepspeed.ops.adam")  # (untyped)
        tdt = getattr(torch, lay.param)
        p = torch.nn.Parameter(torch.from_numpy(p32.copy()).to(tdt))
        p.grad = torch.from_numpy(g32).to(tdt)
        ds = adam.DeepSpeedCPUAdam([p], adamw_mode=True, fp32_optimizer_states=True, **ADAMW)
        step: Callable[[], object] = ds.step
        return step
    if lay.contender == "cast":  # what a user without fastoptim does
        param, grad = p32.astype(pdt), g32.astype(gdt)
        master = param.astype(np.float32)
        inner = fast.AdamW([master], **ADAMW)

        def cast_around() -> None:
            inner.step([grad.astype(np.float32)])
            param[...] = master.astype(pdt)

        return cast_around
    opt = fast.AdamW([p32.astype(pdt)], **ADAMW, **dict(lay.options))
    if lay.copy_out:
        opt.set_copy_out([np.zeros(p32.shape, _np_dtype(lay.copy_out))])
    if np.dtype(gdt) == pdt:  # gradients bound: opt.step()
        for dst in opt.grads:
            dst[...] = g32.astype(gdt)
        return opt.step
    return functools.partial(opt.step, [g32.astype(gdt)])  # the offload layout's bf16 grads


def compute_cost(lay: Layout, size: int = COMPUTE_SIZE, samples: int = 15) -> float:
    """Seconds per element of one `lay` step on `size` elements on one thread: the calling
    thread's CPU time (which other processes disturb much less than wall time), median of
    `samples` blocks of steps, after warm-up steps."""
    rng = np.random.default_rng(1)
    p32 = rng.standard_normal(size, dtype=np.float32)
    g32 = rng.standard_normal(size, dtype=np.float32) * np.float32(0.1)
    step = _layout_step(lay, p32, g32)
    threads = _core.get_num_threads()
    _core.set_num_threads(1)
    try:
        for _ in range(3):
            step()
        reps = max(1, 2_000_000 // size)
        times = []
        for _ in range(samples):
            t0 = time.thread_time_ns()
            for _ in range(reps):
                step()
            times.append((time.thread_time_ns() - t0) * 1e-9 / reps / size)
    finally:
        _core.set_num_threads(threads)
    return statistics.median(times)


def _stream_step(stream: Stream, pool: dict[str, list[np.ndarray]]) -> Callable[[], object]:
    grad = pool["g16"][0] if stream.grad == 2 else pool["g32"][0]
    out = pool["out"][0] if stream.out else None
    rw = pool["f32"][: stream.rw32] + pool["h16"][: stream.rw16]
    if stream.codes:
        return functools.partial(_core.stream_mixed, rw, grad, out, pool["codes"][0])
    return functools.partial(_core.stream_mixed, rw, grad, out)


@dataclass
class LayoutResult:
    """``bench --layouts``: a :class:`Row` per layout (its times under ``"fastoptim"``, even
    for a contender; those of its streaming kernel under ``"roofline"``; its bytes in
    ``bpe``), and each streaming kernel's own row."""

    elements: int
    rows: list[Row]
    streams: dict[Stream, Row]
    skipped: list[str] = field(default_factory=list)
    #: fastoptim layout -> seconds per element of a step on one thread from L2
    #: (:func:`compute_cost`), and the thread count of the rows
    compute: dict[str, float] = field(default_factory=dict)
    threads: int = 1


def run_layouts(
    size: int = LAYOUT_SIZE,
    repeats: int = 5,
    rounds: int = 3,
    torch: bool = True,
    progress: Callable[[str], None] | None = None,
    compute_size: int = COMPUTE_SIZE,
    compute_samples: int = 15,
) -> LayoutResult:
    """AdamW (lr 1e-3, weight decay 0.01) on one tensor of `size` elements in every layout of
    :data:`LAYOUTS` (torch's contenders with `torch` when it is installed) and the streaming
    kernels of their bytes, all interleaved in the same rounds; checked and re-measured as
    :func:`run` does, but as a whole (a re-measuring pass times every contender again).  Then
    each fastoptim layout's :func:`compute_cost` on `compute_size` elements."""
    granularity = clock_granularity()
    min_sample = max(MIN_SAMPLE_S, 1000 * granularity)
    skipped = []
    have_torch = False
    if torch:
        try:
            import torch as _torch  # noqa: F401

            have_torch = True
        except ImportError:
            skipped.append("torch contenders (torch is not installed)")
    have_deepspeed = False
    if have_torch:
        try:  # (its CPU Adam is compiled at the first use: minutes, once)
            importlib.import_module("deepspeed")
            have_deepspeed = True
        except Exception:  # an ImportError, or a broken install
            skipped.append("DeepSpeed's CPU Adam (deepspeed does not import)")
    have = {"torch": have_torch, "deepspeed": have_deepspeed}
    layouts = [lay for lay in LAYOUTS if lay.contender in (None, "cast") or have[lay.contender]]
    rng = np.random.default_rng(0)
    p32 = rng.standard_normal(size, dtype=np.float32)
    g32 = rng.standard_normal(size, dtype=np.float32) * np.float32(0.1)
    contenders: dict[str, Callable[[], object]] = {}
    for i, lay in enumerate(layouts, 1):
        if progress:
            progress(f"[{i}/{len(layouts)}] set up {lay.name}")
        contenders[lay.name] = _layout_step(lay, p32, g32)
    pool = {  # disjoint arrays: any configuration takes a prefix of each list
        "f32": [np.ones(size, np.float32) for _ in range(3)],
        "h16": [np.ones(size, _np_dtype("bfloat16")) for _ in range(3)],
        "g32": [np.ones(size, np.float32)],
        "g16": [np.ones(size, _np_dtype("bfloat16"))],
        "out": [np.ones(size, _np_dtype("bfloat16"))],
        "codes": [np.ones(size, np.uint8)],
    }
    used = list(dict.fromkeys(lay.stream for lay in layouts))
    for s in used:
        contenders[STREAMS[s]] = _stream_step(s, pool)
    del p32, g32
    gc.collect()
    if progress:
        progress(f"timing {len(contenders)} contenders interleaved, {rounds} round(s)")
    steps, samples = _interleaved(contenders, rounds, repeats, min_sample)

    def rows() -> tuple[list[Row], dict[Stream, Row]]:
        out, streams = [], {}
        for lay in layouts:
            who = "fastoptim" if lay.contender is None else lay.name
            row = Row(lay.name, "layouts", size, 1, 2, bpe=lay.bytes, contender=who)
            picked = {"fastoptim": lay.name, "roofline": STREAMS[lay.stream]}
            _fill(
                row,
                {k: steps[v] for k, v in picked.items()},
                {k: samples[v] for k, v in picked.items()},
            )
            out.append(row)
        for s in used:
            row = Row(STREAMS[s], "streams", size, 1, 2, bpe=s.bytes)
            _fill(
                row,
                {"fastoptim": steps[STREAMS[s]], "roofline": steps[STREAMS[s]]},
                {"fastoptim": samples[STREAMS[s]], "roofline": samples[STREAMS[s]]},
            )
            streams[s] = row
        return out, streams

    def check() -> list[str]:
        bad = [
            f"{r.optimizer}: {'; '.join(problems(r, granularity))}"
            for r in rows()[0]
            if problems(r, granularity)
        ]
        return [" | ".join(bad)] if bad else []

    remeasured = _remeasure(contenders, steps, samples, rounds, check, progress)
    found, streams = rows()
    for r in found:
        r.remeasured = remeasured
        r.flags = problems(r, granularity)
    del contenders, pool
    gc.collect()
    compute = {}
    for lay in layouts:
        if lay.contender is None:
            if progress:
                progress(f"compute cost of {lay.name}: 1 thread, {compute_size:,} elements")
            compute[lay.name] = compute_cost(lay, compute_size, compute_samples)
    return LayoutResult(size, found, streams, skipped, compute, _core.get_num_threads())


def _between(a: Row, b: Row) -> tuple[float, float, float]:
    """a's time / b's time (the rows' "fastoptim" entries): median, lowest, highest the rounds
    allow."""
    ta, tb = a.times["fastoptim"], b.times["fastoptim"]
    return (
        ta / tb,
        a.low["fastoptim"] / b.high["fastoptim"],
        a.high["fastoptim"] / b.low["fastoptim"],
    )


def _range(r: tuple[float, float, float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(r[0])} [{fmt.format(r[1])}-{fmt.format(r[2])}]"


def format_layouts(result: LayoutResult) -> str:
    """The layouts table: bytes per element, ns per element (median, +- half the rounds'
    range), GB/s, % of the streaming kernel of the same bytes, time relative to the fp32 row;
    then the streaming kernels, the issue's targets as measured, and the flagged rows."""
    n = result.elements
    out = [
        f"\nAdamW (lr 1e-3, weight decay 0.01), one tensor of {n:,} elements, per layout",
        f"{'layout':24s} {'B/el':>4s} {'ns/el':>7s} {'+-':>4s} {'GB/s':>6s} {'roofline':>9s} "
        f"{'t/t(fp32)':>10s} {'L2 1thr':>7s}  bytes per element (read+write)",
        "-" * 108,
    ]
    by_name = {r.optimizer: r for r in result.rows}
    base = by_name.get("fp32")
    notes = []
    for r in result.rows:
        lay = next(lay for lay in LAYOUTS if lay.name == r.optimizer)
        t = r.times["fastoptim"]
        roof = f"{100 * r.roofline:7.0f}%{_mark(r.roofline)}"
        if base is not None:
            rel = _between(r, base)
            vs = f"{rel[0]:9.2f}x{'?' if rel[2] / rel[1] > 1.5 else ' '}"
        else:
            vs = f"{'-':>10s} "
        cost = result.compute.get(r.optimizer)
        l2 = f"{cost * 1e9:7.3f}" if cost is not None else f"{'-':>7s}"
        out.append(
            f"{r.optimizer:24s} {r.bytes // n:4d} {t / n * 1e9:7.3f} "
            f"{100 * r.spread('fastoptim'):3.0f}% {r.bytes / t / 1e9:6.1f} {roof} {vs} "
            f"{l2}  {lay.traffic}"
        )
        if r.flags:
            notes.append(
                f"  ! {r.optimizer}, after {r.rounds} rounds: {'; '.join(r.flags)}. "
                "Do not trust this row."
            )
    out.extend(notes)
    out.append("\nstreaming kernels (moving each layout's bytes), same run:")
    for s, r in result.streams.items():
        t = r.times["fastoptim"]
        out.append(
            f"  {s.bytes:2d} B/el: {t / n * 1e9:6.3f} ns/el +-{100 * r.spread('fastoptim'):.0f}%"
            f", {r.bytes / t / 1e9:5.1f} GB/s  ({s.label})"
        )
    if n >= LAYOUT_SIZE:
        out.append(
            "\nthe issues' targets (#13, #17), as measured here (median [range the rounds allow]):"
        )
    else:  # in the caches, a step is not bound by memory as the targets assume
        out.append(
            f"\nthe issues' targets (#13, #17) are set for {LAYOUT_SIZE:,}+ elements (the default "
            f"--size); at {n:,} elements these readings do not test them (median [range the "
            "rounds allow]):"
        )

    def ns(name: str) -> str:
        r, k = by_name[name], "fastoptim"
        return _range((r.times[k] / n * 1e9, r.low[k] / n * 1e9, r.high[k] / n * 1e9), "{:.3f}")

    def alone(name: str) -> float | None:
        """The layout's compute floor at this run's thread count (L2 1thr / threads), ns/el."""
        cost = result.compute.get(name)
        return None if cost is None else cost * 1e9 / result.threads

    def floors(name: str, limit: float) -> str:
        """What bounds an absolute target: the layout's compute alone and float32 AdamW's."""
        floor, adamw = alone(name), alone("fp32")
        if floor is None:
            return ""
        text = f"; compute alone at {result.threads} thread(s): {floor:.3f}"
        if adamw is not None:
            text += f", fp32-state AdamW's {adamw:.3f}"
            if adamw > limit:
                text += " (the target is below AdamW's own arithmetic)"
        return text

    targets = []
    if "bf16 p/g, fp32 state" in by_name:
        targets.append(f"  bf16 p/g + fp32 state: {ns('bf16 p/g, fp32 state')} ns/el (<= 0.45)")
    if "all-bf16" in by_name:
        targets.append(f"  all-bf16: {ns('all-bf16')} ns/el (<= 0.30){floors('all-bf16', 0.30)}")
    if "offload" in by_name and base is not None:
        targets.append(
            f"  offload / fp32 time: {_range(_between(by_name['offload'], base))} (<= 1.10)"
        )
    # A contender's time over ours, and over the streaming kernel of our layout's bytes: the
    # most that any step moving those bytes could show (above it, the target cannot be met).
    for them, ours, limit in (
        ("torch fused bf16", "offload", 2),
        ("torch fused bf16", "all-bf16", 2),
        ("DeepSpeed CPUAdam bf16", "bf16 p/g, fp32 state", 1.25),
        ("DeepSpeed CPUAdam bf16", "offload", 1.25),
    ):
        if them in by_name and ours in by_name:
            speed = _between(by_name[them], by_name[ours])
            most = by_name[them].times["fastoptim"] / by_name[ours].times["roofline"]
            targets.append(
                f"  {them} / {ours} time: {_range(speed)} (>= {limit}; at most "
                f"{most:.2f} for a step at its streaming kernel's speed)"
            )
    for a, b in (("all-bf16, stochastic", "all-bf16"), ("offload, stochastic", "offload")):
        if a in by_name and b in by_name:
            targets.append(
                f"  {a} / {b} time: {_range(_between(by_name[a], by_name[b]))} (<= 1.10)"
            )
    for name, limit in (("fp32 p/g, int8 state", 0.35), ("bf16 p/g, int8 state", 0.25)):
        if name in by_name:
            line = f"  issue #17, {name}: {ns(name)} ns/el (<= {limit})"
            targets.append(line + floors(name, limit))

    def why(r: Row) -> str:
        """Whether a layout's compute alone keeps it below 90% of its roofline."""
        floor = alone(r.optimizer)
        if floor is None:
            return ""
        stream = r.times["roofline"] / n * 1e9
        bound = ": compute-bound" if floor > stream / 0.9 else ""
        return f" (compute alone {floor:.3f} ns/el, its streaming kernel {stream:.3f}{bound})"

    below = [
        f"{r.optimizer} {100 * r.roofline:.0f}%{why(r)}"
        for r in result.rows
        if not next(x for x in LAYOUTS if x.name == r.optimizer).contender and r.roofline < 0.9
    ]
    targets.append(f"  fastoptim layouts below 90% of their roofline: {'' if below else 'none'}")
    targets.extend(f"    {b}" for b in below)
    out.extend(targets)
    for skip in result.skipped:
        out.append(f"(skipped: {skip})")
    return "\n".join(out)


# ----------------------------------------------------------------------------- Muon
#: ``bench --muon``'s matrices (rows x cols): square, wide and tall, sizes of hidden layers.
MUON_SHAPES: tuple[tuple[int, int], ...] = ((512, 512), (1024, 1024), (768, 3072), (3072, 768))


@dataclass
class MuonRow:
    """One matrix: the time of a Newton-Schulz orthogonalisation (5 iterations) per
    ``ns_dtype``, of a whole ``Muon.step`` (bfloat16), and of a square sgemm of its larger
    dimension, all medians of interleaved rounds; `times` holds each one's (median, fastest,
    slowest) under ``"sgemm"``, ``"products"``, ``"step"`` and the ns_dtypes."""

    shape: tuple[int, int]
    ns: dict[str, float] = field(default_factory=dict)  # ns_dtype -> seconds
    step: float = 0.0
    sgemm: float = 0.0  # seconds of one n x n x n float32 product, n = max(shape)
    products: float = 0.0  # seconds of the float32 iteration's BLAS products alone (5 x 3)
    times: dict[str, Stat] = field(default_factory=dict)
    rounds: int = 0
    flags: list[str] = field(default_factory=list)  # what stayed wrong after re-measuring

    @property
    def flops(self) -> float:
        """Nominal flops of 5 iterations, each product counted as a gemm (2 m n k): X X^T
        (m x n by n x m), A A (m^3), B X (m x m by m x n), with m <= n."""
        m, n = sorted(self.shape)
        return 5 * (2 * m * m * n + 2 * m**3 + 2 * m * m * n)

    @property
    def least_flops(self) -> float:
        """The fewest flops the BLAS can spend on those products: X X^T by syrk (half of it)."""
        m, n = sorted(self.shape)
        return 5 * (m * m * n + 2 * m**3 + 2 * m * m * n)

    @property
    def sgemm_rate(self) -> float:
        return 2 * max(self.shape) ** 3 / self.sgemm

    @property
    def ceiling(self) -> float:
        """The most a nominal rate (:attr:`flops` / time) can be over the sgemm rate: the
        products at the sgemm's rate, X X^T by syrk."""
        return self.flops / self.least_flops

    def rate(self, ns_dtype: str) -> float:
        return self.flops / self.ns[ns_dtype]


def muon_checks(row: MuonRow, times: Mapping[str, Stat]) -> list[str]:
    """:func:`check_timings` on a Muon row: every Newton-Schulz and the products alone at most
    the sgemm's rate on the fewest flops (:attr:`MuonRow.least_flops`); noise of every
    timing."""
    most = 2 * max(row.shape) ** 3 / row.least_flops  # sgemm time / NS time, at most
    timed = [k for k in times if k not in ("sgemm", "step")]
    return check_timings(times, [(k, "sgemm", most) for k in timed], noisy=list(times))


def _ns_products(x: np.ndarray, gram: np.ndarray, poly: np.ndarray, nxt: np.ndarray) -> None:
    """The BLAS products of :func:`fastoptim.host.newton_schulz` (5 iterations, float32) with
    nothing between them."""
    from .. import host

    for _ in range(5):
        host.gram_(x, gram)
        np.matmul(gram, gram, out=poly)
        np.matmul(poly, x, out=nxt)


#: ``run_muon``'s key for the bfloat16 iteration with OpenBLAS's jobs on its own threads.
OWN_THREADS = "bfloat16, OpenBLAS's threads"
#: Seconds after a sample that ran OpenBLAS's own threads before the next one: they busy-wait
#: 2^28 cycles (OpenBLAS's THREAD_TIMEOUT default) before sleeping, ~0.1 s at 2.5 GHz.
OPENBLAS_SETTLE_S = 0.25


def _ns_own_threads(g: np.ndarray) -> np.ndarray:
    """``host.newton_schulz(g)`` (bfloat16) with OpenBLAS's jobs on OpenBLAS's own threads
    rather than fastoptim's pool (as where its threading callback is missing)."""
    from .. import host

    with host._blas().own_threads():
        return host.newton_schulz(g)


def run_muon(
    shapes: Sequence[tuple[int, int]] = MUON_SHAPES,
    rounds: int = 3,
    progress: Callable[[str], None] | None = None,
    repeats: int = 1,
) -> list[MuonRow]:
    """Time Muon's Newton-Schulz iteration (``fastoptim.host.newton_schulz``, NumPy's ``@``)
    against a float32 sgemm (NumPy's ``@`` too: the machine's BLAS) in the same interleaved
    rounds (:func:`_timed`: re-measured, then flagged, where :func:`muon_checks` fails), per
    matrix of `shapes`; each sample times `repeats` calls (more where they last under 2 ms)."""
    from .. import host

    rng = np.random.default_rng(0)
    rows: list[MuonRow] = []
    with _keep(rows):  # Ctrl-C: the rows measured so far go with the exception
        for shape in shapes:
            if progress is not None:
                progress(f"Muon {shape[0]}x{shape[1]}")
            g = rng.standard_normal(shape).astype(np.float32)
            n = max(shape)
            a = rng.standard_normal((n, n)).astype(np.float32)
            b = rng.standard_normal((n, n)).astype(np.float32)
            c = np.empty((n, n), np.float32)
            w = rng.standard_normal(shape).astype(np.float32)
            opt = fast.Muon([w])
            opt.grads[0][...] = g
            row = MuonRow(shape)
            x = np.ascontiguousarray(g if shape[0] <= shape[1] else g.T) / np.float32(1e3)
            gram = np.empty((x.shape[0],) * 2, np.float32)
            poly, nxt = np.empty_like(gram), np.empty_like(x)

            fns: dict[str, Callable[[], object]] = {
                "sgemm": functools.partial(np.matmul, a, b, out=c),
                "products": functools.partial(_ns_products, x, gram, poly, nxt),
                "step": opt.step,
                **{d: functools.partial(host.newton_schulz, g, dtype=d) for d in host.NS_DTYPES},
            }
            if host._blas().setter is not None:  # (the A/B of fastoptim's pool for OpenBLAS)
                fns[OWN_THREADS] = functools.partial(_ns_own_threads, g)
            # What runs OpenBLAS's jobs on its own threads leaves them busy-waiting for ~0.1 s
            # on x86-64: the next samples would share the CPUs with them.
            settle = dict.fromkeys(("sgemm", "products", OWN_THREADS), OPENBLAS_SETTLE_S)
            row.times, row.flags, row.rounds = _timed(
                fns, rounds, repeats, functools.partial(muon_checks, row), progress, settle=settle
            )
            med = {k: v[0] for k, v in row.times.items()}
            row.sgemm, row.step = med.pop("sgemm"), med.pop("step")
            row.products = med.pop("products")
            row.ns = med
            rows.append(row)
    return rows


def _pm(times: Mapping[str, Stat], key: str) -> str:
    """+- half the range of `key`'s rounds, % of its median."""
    return f"{100 * spread(times[key]):3.0f}%"


def format_muon(rows: Sequence[MuonRow]) -> str:
    """The table of :func:`run_muon`: per matrix, the sgemm rate, each ns_dtype's
    Newton-Schulz rate and its % of the sgemm rate ("!" where faster than the sgemm allows),
    and the whole step's time, each with +- half the range of its rounds; then the flagged
    rows' problems."""

    def pct(r: MuonRow, rate: float) -> str:  # of the sgemm rate; "!": beyond what it allows
        return f"{100 * rate / r.sgemm_rate:6.0f}%{_mark(rate / r.sgemm_rate / r.ceiling)}"

    head = (
        f"{'matrix':>11}  {'sgemm GF/s':>10} {'+-':>4}  {'NS bf16 GF/s':>12} {'+-':>4} "
        f"{'% sgemm':>8}  {'NS fp32 GF/s':>12} {'+-':>4} {'% sgemm':>8}  {'products GF/s':>13} "
        f"{'+-':>4} {'% sgemm':>8}  {'NS fp64 GF/s':>12} {'+-':>4}  {'Muon.step':>9} {'+-':>4}"
        f"  {'bf16, BLAS own threads':>22} {'+-':>4}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        s, pm = r.sgemm_rate, functools.partial(_pm, r.times)
        lines.append(
            f"{r.shape[0]:>5}x{r.shape[1]:<5}  {s / 1e9:10.1f} {pm('sgemm')}  "
            f"{r.rate('bfloat16') / 1e9:12.1f} {pm('bfloat16')} {pct(r, r.rate('bfloat16'))}  "
            f"{r.rate('float32') / 1e9:12.1f} {pm('float32')} {pct(r, r.rate('float32'))}  "
            f"{r.flops / r.products / 1e9:13.1f} {pm('products')} "
            f"{pct(r, r.flops / r.products)}  {r.rate('float64') / 1e9:12.1f} "
            f"{pm('float64')}  {_fmt_time(r.step):>9} {pm('step')}"
            + (
                f"  {pct(r, r.rate(OWN_THREADS)):>22} {pm(OWN_THREADS)}"
                if OWN_THREADS in r.ns
                else f"  {'-':>22} {'':>4}"
            )
        )
    lines += _flag_notes([(f"{r.shape[0]}x{r.shape[1]}", r.rounds, r.flags) for r in rows])
    return "\n".join(lines)


MUON_LEGEND = (
    "\nNS = Newton-Schulz, 5 iterations (fastoptim.host.newton_schulz), GF/s counting each "
    "product as a gemm (2mnk; NumPy computes X X^T with syrk, half of that);\nsgemm = NumPy's "
    "float32 @ on two n x n matrices, n = the larger dimension, in the same interleaved rounds; "
    "% sgemm = NS rate / sgemm rate\n(bf16: torch's convention, products rounded to bfloat16; "
    "fp32/fp64: ns_dtype='float32'/'float64'); products = the float32 iteration's BLAS products "
    "alone (X X^T, A A, B X, 5 times;\nthe rate the iteration would reach with free element-wise "
    "passes); Muon.step = a whole bf16 step (momentum, NS, update); bf16, BLAS own threads = "
    "the bf16 NS's % sgemm with OpenBLAS's jobs on\nOpenBLAS's threads instead of fastoptim's "
    "pool ('-': NumPy's OpenBLAS has no threading callback, < 0.3.28); +- = half the range of "
    "the rounds, % of the median\n(after each sample that ran OpenBLAS's own threads, sgemm, "
    "products and that column, a 0.25 s untimed pause: they busy-wait ~0.1 s after a call);"
    "\n! = over 110% of the most the sgemm rate allows (X X^T by syrk: "
    "products at the sgemm's rate show 120% (square) to 133% of it): a measurement error; a "
    "flagged row's problems are listed under the table"
)


# ----------------------------------------------------------------------------- Adafactor
#: ``bench --adafactor``'s tensors: a 16M-element matrix, hidden-layer matrices (wide, tall) and
#: a 16M-element vector (no factorisation: no reduction pass).
ADAFACTOR_SHAPES: tuple[tuple[int, ...], ...] = ((4096, 4096), (768, 3072), (3072, 768), (1 << 24,))
#: Bytes per element a fused step must move at least on a matrix: read p and g (RMS of p,
#: row/column sums of g^2), read g (RMS of the update, recomputed from g and the factors), read
#: g and read and write p (the update).
ADAFACTOR_BYTES = 24
#: ... and on a vector (0-D or 1-D: a full-size ``variance``, no factors): read p (RMS of p),
#: read g and read and write the variance (RMS of the update), read g and the variance and read
#: and write p (the update): 4 + 12 + 16.
ADAFACTOR_VECTOR_BYTES = 32


@dataclass
class AdafactorRow:
    """One tensor: medians of interleaved rounds (seconds) of a whole ``Adafactor.step``
    (float32, default options), of its reduction pass alone (``host.row_col_means``: the row
    and column means of g^2; 0 for a vector), of a read-only streaming pass over the gradient
    (the reduction's bytes), of the streaming kernels moving :attr:`bytes` per element in the
    passes of a step (``stream``), and of torch.optim.Adafactor's for-loop step (0 without
    torch); `times` holds each one's (median, fastest, slowest) under those names."""

    shape: tuple[int, ...]
    step: float = 0.0
    reduction: float = 0.0
    read: float = 0.0
    stream: float = 0.0
    torch: float = 0.0
    times: dict[str, Stat] = field(default_factory=dict)
    rounds: int = 0
    flags: list[str] = field(default_factory=list)  # what stayed wrong after re-measuring

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        """Bytes per element a fused step moves: ADAFACTOR_BYTES, or ADAFACTOR_VECTOR_BYTES."""
        return ADAFACTOR_BYTES if len(self.shape) > 1 else ADAFACTOR_VECTOR_BYTES


def adafactor_checks(row: AdafactorRow, times: Mapping[str, Stat]) -> list[str]:
    """:func:`check_timings` on an Adafactor row: the step no faster than the streaming kernels
    of its bytes, the reduction no faster than a read-only pass over g; the streaming kernels
    moving their bytes; noise of each (torch's aside)."""
    against = [("step", "stream", 1.0)]
    if "reduction" in times:
        against.append(("reduction", "read", 1.0))
    moved = {"stream": row.elements * row.bytes, "read": row.elements * 4}
    return check_timings(times, against, moved, [k for k in times if k != "torch"])


def _adafactor_streams(p: np.ndarray, g: np.ndarray, variance: np.ndarray | None) -> None:
    """Streaming kernels moving an Adafactor step's bytes in its passes: RMS(p) (p read); a
    matrix's reduction (g read), RMS of the update (g read) and the update (p read and
    written, g read); a vector's (`variance` given) RMS of the update (g read, the variance
    read and written) and the update (g and the variance read, p read and written)."""
    _core.stream_read(p)
    if variance is None:
        _core.stream_read(g)
        _core.stream_read(g)
        _core.stream_mixed([p], g)
    else:
        _core.stream_mixed([variance], g)
        _core.stream_mixed([p], g)
        _core.stream_read(variance)


def run_adafactor(
    shapes: Sequence[tuple[int, ...]] = ADAFACTOR_SHAPES,
    rounds: int = 3,
    progress: Callable[[str], None] | None = None,
    torch: bool = True,
    repeats: int = 1,
) -> list[AdafactorRow]:
    """Time Adafactor (a NumPy step: :func:`fastoptim.host.adafactor_update`) per tensor of
    `shapes`, its extra reduction pass, the streaming kernels moving the same bytes and, with
    `torch`, torch.optim.Adafactor (for-loop), all in the same interleaved rounds
    (:func:`_timed`: re-measured, then flagged, where :func:`adafactor_checks` fails); each
    sample times `repeats` calls (more where they last under 2 ms)."""
    from .. import host

    rng = np.random.default_rng(0)
    rows: list[AdafactorRow] = []
    with _keep(rows):  # Ctrl-C: the rows measured so far go with the exception
        for shape in shapes:
            if progress is not None:
                progress(f"Adafactor {'x'.join(map(str, shape))}")
            w = rng.standard_normal(shape, dtype=np.float32)
            g = rng.standard_normal(shape, dtype=np.float32)
            opt = fast.Adafactor([w.copy()])
            opt.grads[0][...] = g
            p1, g1 = w.reshape(-1).copy(), g.reshape(-1)
            v1 = np.ones(p1.size, np.float32) if len(shape) <= 1 else None  # variance
            fns: dict[str, Callable[[], object]] = {
                "step": opt.step,
                "read": functools.partial(_core.stream_read, g1),
                "stream": functools.partial(_adafactor_streams, p1, g1, v1),
            }
            if len(shape) > 1:
                fns["reduction"] = functools.partial(host.row_col_means, g)
            if torch:
                fns.update(
                    {
                        "torch" if k == "torch for-loop" else k: f
                        for k, f in _torch_contenders("Adafactor", {}, [w], [g]).items()
                        if k == "torch for-loop"
                    }
                )
            row = AdafactorRow(shape)
            row.times, row.flags, row.rounds = _timed(
                fns, rounds, repeats, functools.partial(adafactor_checks, row), progress
            )
            for k, v in row.times.items():
                setattr(row, k, v[0])
            rows.append(row)
    return rows


def format_adafactor(rows: Sequence[AdafactorRow]) -> str:
    """The table of :func:`run_adafactor`, each time with +- half the range of its rounds, "!"
    on a % beyond :func:`over_limit`; then the flagged rows' problems."""
    head = (
        f"{'tensor':>12} {'B/el':>4}  {'step':>9} {'+-':>4} {'GB/s':>6} {'% stream':>9}  "
        f"{'reduction':>9} {'+-':>4} {'% read':>7} {'% step':>6}  {'stream':>9} {'+-':>4}  "
        f"{'torch loop':>10} {'+-':>4}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        pm = functools.partial(_pm, r.times)
        gbps = r.elements * r.bytes / r.step / 1e9
        red = (
            f"{_fmt_time(r.reduction):>9} {pm('reduction')} {100 * r.read / r.reduction:6.0f}%"
            f"{_mark(r.read / r.reduction)}{100 * r.reduction / r.step:5.0f}%"
            if r.reduction
            else f"{'-':>9} {'-':>4} {'-':>7} {'-':>6}"
        )
        torch = f"{_fmt_time(r.torch):>10} {pm('torch')}" if r.torch else f"{'-':>10} {'-':>4}"
        lines.append(
            f"{'x'.join(map(str, r.shape)):>12} {r.bytes:4d}  {_fmt_time(r.step):>9} {pm('step')} "
            f"{gbps:6.1f} {100 * r.stream / r.step:8.0f}%{_mark(r.stream / r.step)} {red}  "
            f"{_fmt_time(r.stream):>9} {pm('stream')}  {torch}"
        )
    lines += _flag_notes([("x".join(map(str, r.shape)), r.rounds, r.flags) for r in rows])
    return "\n".join(lines)


ADAFACTOR_LEGEND = (
    "\nstep = a whole Adafactor.step (float32, default options; NumPy: fastoptim.host), GB/s "
    f"counting the B/el a fused step must move: a matrix {ADAFACTOR_BYTES} (read p and g: RMS(p), "
    "row/column sums of g^2; read g: RMS of the update; read g, read and write p: the update), "
    f"a vector {ADAFACTOR_VECTOR_BYTES}\n(read p: RMS(p); read g, read and write its variance: "
    "RMS of the update; read g and the variance, read and write p: the update); % stream = the "
    "time of streaming kernels moving those bytes in those passes / the step's;\nreduction = "
    "the extra pass of a factored step alone (row and column means of g^2, float64 accumulation "
    "in a fixed block order; % read = a read-only streaming pass over g / the reduction's time;"
    "\n% step = its share of the step); a vector has no reduction pass; torch loop = "
    "torch.optim.Adafactor(foreach=False).step, same run; +- = half the range of the rounds, % "
    "of the median;\n! = faster than the streaming kernels allow (over 110%): a measurement "
    "error; a flagged row's problems are listed under the table"
)


# ------------------------------------------------------ gradient transforms (bench --transforms)
@dataclass
class TransformRow:
    """One row of ``bench --transforms``: a contender and the streaming work it is compared
    with (both timed in the same interleaved rounds): seconds per step, median and range."""

    name: str
    bytes: int  # bytes per element the contender must move
    baseline: str  # what it is compared with
    time: Stat = (0.0, 0.0, 0.0)  # median, lowest, highest (seconds)
    base: Stat = (0.0, 0.0, 0.0)
    rounds: int = 0
    flags: list[str] = field(default_factory=list)  # what stayed wrong after re-measuring


#: ``bench --transforms``' rows: (name, bytes per element, contender, the streaming
#: contenders whose times add up to its baseline)
TRANSFORMS: tuple[tuple[str, int, str, tuple[str, ...]], ...] = (
    ("norm pass (grad_stats)", 4, "norm pass", ("stream read 4 B",)),
    ("AdamW", 28, "AdamW", ("stream 28 B",)),
    ("AdamW max_grad_norm", 32, "AdamW max_grad_norm", ("stream 28 B", "stream read 4 B")),
    ("AdamW ema_decay", 36, "AdamW ema_decay", ("stream 36 B",)),
    ("AdamW both", 40, "AdamW both", ("stream 36 B", "stream read 4 B")),
)


def _label(parts: tuple[str, ...]) -> str:
    """A baseline's name: "stream 28 B", "stream 28 B + read 4 B"."""
    return " + ".join([parts[0], *(p.removeprefix("stream ") for p in parts[1:])])


def _baselines(times: Mapping[str, Stat]) -> dict[str, Stat]:
    """`times` and each baseline of :data:`TRANSFORMS` made of several streams (the sum of
    their medians, of their lowest and of their highest), under its :func:`_label`."""
    out = dict(times)
    for *_, parts in TRANSFORMS:
        if len(parts) > 1:
            out[_label(parts)] = (
                sum(times[p][0] for p in parts),
                sum(times[p][1] for p in parts),
                sum(times[p][2] for p in parts),
            )
    return out


def transform_checks(size: int, times: Mapping[str, Stat], only: str | None = None) -> list[str]:
    """:func:`check_timings` on the rows of :data:`TRANSFORMS` (or on the row named `only`):
    each contender no faster than its baseline, both moving their bytes, neither noisy."""
    every = _baselines(times)
    found: list[str] = []
    for name, nbytes, key, parts in TRANSFORMS:
        if only is None or name == only:
            base = _label(parts)
            moved = {key: nbytes * size, base: nbytes * size}
            found += check_timings(every, [(key, base, 1.0)], moved, (key, base))
    return list(dict.fromkeys(found))  # (a stream shared by two rows: its problems once)


def run_transforms(
    size: int = LAYOUT_SIZE,
    repeats: int = 5,
    rounds: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[TransformRow]:
    """The gradient transforms on one float32 tensor of `size` elements: the norm pass alone
    against a read-only streaming pass over the gradient (``_core.stream_read``); AdamW plain,
    with ``max_grad_norm`` (one more read of the gradient), with ``ema_decay`` (one more array
    read and written) and with both, each against the streaming kernels moving its bytes; all
    interleaved in the same rounds, every contender re-measured while a row fails
    :func:`transform_checks` (up to MAX_REMEASURE times), what still fails flagged."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal(size, dtype=np.float32) * np.float32(0.1)
    plan = _core.Plan([np.zeros(size, np.float32)], ["p"], [], [])
    plan.bind_grads([g])

    def adamw(**options: Any) -> Callable[[], object]:
        opt = fast.AdamW([rng.standard_normal(size, dtype=np.float32)], **ADAMW, **options)
        opt.grads[0][...] = g
        return opt.step

    pool = [np.ones(size, np.float32) for _ in range(5)]
    # Each read-only contender follows one that writes (in the round-robin order): the caches'
    # dirty lines that the previous contender left are written back during the next one, so a
    # read-only pass timed after another read-only pass would look faster than it is.
    contenders: dict[str, Callable[[], object]] = {
        "stream 28 B": functools.partial(_core.stream, pool[:4]),
        "norm pass": plan.grad_stats,
        "stream 36 B": functools.partial(_core.stream, pool[:5]),
        "stream read 4 B": functools.partial(_core.stream_read, g),
        "AdamW": adamw(),
        "AdamW max_grad_norm": adamw(max_grad_norm=1.0),
        "AdamW ema_decay": adamw(ema_decay=0.999),
        "AdamW both": adamw(max_grad_norm=1.0, ema_decay=0.999),
    }
    if progress:
        progress(f"timing {len(contenders)} contenders interleaved, {rounds} round(s)")
    times, _, done = _timed(
        contenders, rounds, repeats, functools.partial(transform_checks, size), progress
    )
    every = _baselines(times)
    rows = []
    for name, nbytes, key, parts in TRANSFORMS:
        base = _label(parts)
        flags = transform_checks(size, times, only=name)
        rows.append(TransformRow(name, nbytes, base, every[key], every[base], done, flags))
    del contenders, pool, plan
    gc.collect()
    return rows


def format_transforms(rows: Sequence[TransformRow], size: int) -> str:
    """The ``bench --transforms`` table: ns per element (median [lowest-highest] of the
    rounds), GB/s, the streaming work of the same bytes (the same), and the % of it (its
    median time / the contender's; "!" where :func:`over_limit` rejects it: faster than memory
    allows, a measurement error); then the flagged rows' problems."""

    def ns(t: Stat) -> str:
        return f"{t[0] / size * 1e9:7.3f} [{t[1] / size * 1e9:.3f}-{t[2] / size * 1e9:.3f}]"

    lines = [
        f"{'':24} {'B/el':>4} {'ns/el':>21} {'GB/s':>6}  {'roofline: streaming':24} "
        f"{'ns/el':>21} {'%':>5}"
    ]
    for r in rows:
        t, b = r.time, r.base
        lines.append(
            f"{r.name:24} {r.bytes:4d} {ns(t):>21} {r.bytes * size / t[0] / 1e9:6.1f}  "
            f"{r.baseline:24} {ns(b):>21} {100 * b[0] / t[0]:4.0f}%{_mark(b[0] / t[0])}"
        )
    lines += _flag_notes([(r.name, r.rounds, r.flags) for r in rows])
    return "\n".join(lines)


# ----------------------------------------------------------- sparse row updates (bench --rows)
#: ``bench --rows``: an embedding table of ROWS_TABLE rows of ROWS_WIDTH float32 elements (16M
#: elements, far beyond the caches), ROWS_UPDATED distinct random rows updated per step (a
#: quarter: 4M elements, so that the streaming kernel moving the same bytes runs beyond the
#: caches too).
ROWS_TABLE, ROWS_WIDTH, ROWS_UPDATED = 1 << 18, 64, 1 << 16
ROWS_OPTIMIZERS: dict[str, tuple[str, dict[str, Any], int]] = {
    "SGD": ("SGD", {"lr": 1e-3}, 0),
    "Adagrad": ("Adagrad", {}, 1),
    "SparseAdam": ("SparseAdam", {}, 2),
}


@dataclass
class RowsRow:
    """One optimizer of ``bench --rows``: seconds per step (median, lowest, highest) of each
    contender, timed in the same interleaved rounds."""

    name: str
    nstate: int
    times: dict[str, Stat]
    rounds: int = 0
    flags: list[str] = field(default_factory=list)  # what stayed wrong after re-measuring


def rows_checks(nstate: int, times: Mapping[str, Stat]) -> list[str]:
    """:func:`check_timings` on a ``bench --rows`` row: fastoptim no faster than the streaming
    kernel of its bytes, both moving them, neither noisy."""
    moved = ROWS_UPDATED * ROWS_WIDTH * bytes_per_element(nstate)
    pair = ("fastoptim", "stream")
    return check_timings(times, [(*pair, 1.0)], dict.fromkeys(pair, moved), pair)


def run_rows(
    repeats: int = 5,
    rounds: int = 5,
    torch: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[RowsRow]:
    """Sparse row updates of an embedding table (``step_rows``; ROWS_UPDATED random rows of
    ROWS_WIDTH float32 elements out of ROWS_TABLE): fastoptim's row kernel, the NumPy
    reference (fancy indexing), torch.optim with a sparse COO gradient (for-loop path) when
    installed, and the streaming kernel moving the same bytes as the update (a dense pass over
    ROWS_UPDATED x ROWS_WIDTH elements), interleaved."""
    rng = np.random.default_rng(0)
    k, w = ROWS_UPDATED, ROWS_WIDTH
    idx = np.sort(rng.choice(ROWS_TABLE, size=k, replace=False)).astype(np.int64)
    rows = rng.standard_normal((k, w), dtype=np.float32) * np.float32(0.1)
    table = rng.standard_normal((ROWS_TABLE, w), dtype=np.float32)
    out: list[RowsRow] = []
    with _keep(out):  # Ctrl-C: the rows measured so far go with the exception
        for name, (cls_name, kwargs, nstate) in ROWS_OPTIMIZERS.items():
            mine = getattr(fast, cls_name)([table.copy()], **kwargs)
            ref = getattr(reference, cls_name)([table.copy()], **kwargs)
            pool = [np.ones(k * w, np.float32) for _ in range(nstate + 2)]
            contenders: dict[str, Callable[[], object]] = {
                "fastoptim": functools.partial(mine.step_rows, [(idx, rows)]),
                "stream": functools.partial(_core.stream, pool),
                "NumPy reference": functools.partial(ref.step_rows, [(idx, rows)]),
            }
            if torch:
                try:
                    import torch as _torch
                except ImportError:
                    pass
                else:
                    p = _torch.from_numpy(table.copy())
                    p.grad = _torch.sparse_coo_tensor(
                        _torch.from_numpy(idx)[None],
                        _torch.from_numpy(rows),
                        p.shape,
                        check_invariants=False,
                    ).coalesce()
                    loop = {} if cls_name == "SparseAdam" else {"foreach": False}
                    contenders["torch for-loop"] = getattr(_torch.optim, cls_name)(
                        [p], **kwargs, **loop
                    ).step
            if progress:
                progress(f"{name}: {len(contenders)} contenders interleaved, {rounds} round(s)")
            with warnings.catch_warnings():  # (torch's Adagrad builds unchecked sparse tensors)
                warnings.filterwarnings("ignore", message="Sparse invariant checks")
                check = functools.partial(rows_checks, nstate)
                times, flags, done = _timed(contenders, rounds, repeats, check, progress)
            out.append(RowsRow(name, nstate, times, done, flags))
            del contenders, mine, ref, pool
            gc.collect()
    return out


def format_rows(rows: Sequence[RowsRow]) -> str:
    """The ``bench --rows`` table: ns per updated element (median [lowest-highest]) of
    fastoptim and of the streaming kernel for the same bytes, the % of it ("!" where
    :func:`over_limit` rejects it), the NumPy reference's and torch's; then the flagged rows'
    problems."""
    n = ROWS_UPDATED * ROWS_WIDTH

    def ns(t: Stat, width: int = 7) -> str:
        return f"{t[0] / n * 1e9:{width}.3f} [{t[1] / n * 1e9:.3f}-{t[2] / n * 1e9:.3f}]"

    lines = [
        f"{ROWS_UPDATED} rows x {ROWS_WIDTH} float32 of a {ROWS_TABLE}-row table per step; "
        "ns per updated element",
        f"{'':11} {'B/el':>4} {'fastoptim':>21} {'GB/s':>6} {'stream':>21} {'%':>5} "
        f"{'NumPy ref':>10} {'torch':>8}",
    ]
    for r in rows:
        t, s = r.times["fastoptim"], r.times["stream"]
        nbytes = bytes_per_element(r.nstate)
        numpy_ns = r.times["NumPy reference"][0] / n * 1e9
        torch_t = r.times.get("torch for-loop")
        torch_ns = f"{torch_t[0] / n * 1e9:8.2f}" if torch_t else f"{'-':>8}"
        lines.append(
            f"{r.name:11} {nbytes:4d} {ns(t):>21} {nbytes * n / t[0] / 1e9:6.1f} {ns(s):>21} "
            f"{100 * s[0] / t[0]:4.0f}%{_mark(s[0] / t[0])}{numpy_ns:10.2f} {torch_ns}"
        )
    lines += _flag_notes([(r.name, r.rounds, r.flags) for r in rows])
    return "\n".join(lines)
