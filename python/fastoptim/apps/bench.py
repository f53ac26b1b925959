"""The benchmark behind ``python -m fastoptim bench``: one optimizer step per contender and
workload, timed interleaved (A B C A B C ...) and reported as medians, next to a streaming
kernel that moves the same bytes (the roofline, measured in the same run).

Contenders: fastoptim (gradients bound: ``opt.step()``), the NumPy reference
(:mod:`fastoptim.reference`) and, when torch is installed, ``torch.optim`` with its for-loop,
foreach and fused implementations (whichever exist for that optimizer on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _core, reference
from .. import optimizers as fast

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
}

# Contenders timed with one step per sample (a step takes long).
_SLOW = frozenset({"NumPy reference", "torch for-loop"})

# torch.optim has fused CPU kernels for these only.
_TORCH_FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}


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
    """One optimizer on one workload: median seconds per step of each contender."""

    optimizer: str
    workload: str
    elements: int
    tensors: int
    nstate: int
    times: dict[str, float] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.elements * bytes_per_element(self.nstate)


def _median_step(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_contenders(
    cls_name: str, kwargs: dict[str, Any], arrays: Sequence[np.ndarray], grads: Sequence[Any]
) -> dict[str, Callable[[], object]]:
    try:
        import torch
    except ImportError:
        return {}
    cls = getattr(torch.optim, cls_name, None)
    if cls is None:  # e.g. Lion
        return {}
    modes = {"torch for-loop": {"foreach": False}, "torch foreach": {"foreach": True}}
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
    slow: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Median seconds per step of each contender: a warm-up step each (first touch, state
    allocation), then `rounds` interleaved rounds (noise hits every contender alike) of
    `repeats` steps (one for the `slow` contenders)."""
    for fn in contenders.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            n = 1 if name in slow else repeats
            samples[name].append(_median_step(fn, n))
    return {k: statistics.median(v) for k, v in samples.items()}


def run(
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
    workloads: Sequence[str] = DEFAULT_WORKLOADS,
    repeats: int = 5,
    rounds: int = 3,
    torch: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure every optimizer on every workload (float32); see the module docstring."""
    rows = []
    for wname in workloads:
        shapes = WORKLOADS[wname]()
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        grads = [rng.standard_normal(s, dtype=np.float32) * np.float32(0.1) for s in shapes]
        total = sum(a.size for a in arrays)
        for oname in optimizers:
            cls_name, kwargs, nstate = OPTIMIZERS[oname]
            if progress:
                progress(f"{wname}: {oname}")
            contenders = _contenders(cls_name, kwargs, arrays, grads, torch)
            streams = [np.ones(total, np.float32) for _ in range(2 + nstate)]
            contenders["roofline"] = functools.partial(_core.stream, streams)
            times = _interleaved(contenders, rounds, repeats, _SLOW)
            rows.append(Row(oname, wname, total, len(shapes), nstate, times))
            del streams, contenders
            gc.collect()
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """One table per workload: time/step, ns/element, GB/s, % of roofline, speed-ups."""
    out = []
    for wname in dict.fromkeys(r.workload for r in rows):
        wrows = [r for r in rows if r.workload == wname]
        r0 = wrows[0]
        out.append(
            f"\n{wname}: {r0.tensors} tensor(s), {r0.elements:,} float32 elements\n"
            f"{'optimizer':13s} {'B/el':>4s} {'time/step':>10s} {'ns/el':>7s} {'GB/s':>6s} "
            f"{'roofline':>8s} {'vs NumPy':>8s} {'vs torch':>9s}  best torch"
        )
        out.append("-" * 86)
        for r in wrows:
            t = r.times["fastoptim"]
            torch_times = {k: v for k, v in r.times.items() if k.startswith("torch")}
            best = min(torch_times, key=lambda k: torch_times[k]) if torch_times else None
            vs_torch = f"{torch_times[best] / t:8.1f}x" if best else f"{'-':>9s}"
            out.append(
                f"{r.optimizer:13s} {bytes_per_element(r.nstate):4d} "
                f"{_fmt_time(t):>10s} {t / r.elements * 1e9:7.3f} {r.bytes / t / 1e9:6.1f} "
                f"{r.times['roofline'] / t * 100:7.0f}% "
                f"{r.times['NumPy reference'] / t:7.1f}x {vs_torch}  "
                f"{best.removeprefix('torch ') if best else '-'}"
            )
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


def size_sweep(
    sizes: Sequence[int], optimizer: str = "Adam", repeats: int = 5, rounds: int = 3
) -> dict[str, list[float]]:
    """Nanoseconds per element of one step on one float32 array of each size, for fastoptim,
    the NumPy reference and torch.optim's contenders (when installed)."""
    cls_name, kwargs, _ = OPTIMIZERS[optimizer]
    result: dict[str, list[float]] = {}
    for n in sizes:
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(n, dtype=np.float32)]
        grads = [rng.standard_normal(n, dtype=np.float32)]
        reps = max(repeats, int(2e6 // n))  # small sizes: more steps per sample
        times = _interleaved(_contenders(cls_name, kwargs, arrays, grads), rounds, reps)
        for name, t in times.items():
            result.setdefault(name, []).append(t / n * 1e9)
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
    (1, default, 1, default ...), `rounds` samples each of the median of `repeats` steps."""
    default = _core.get_num_threads()
    rows = []
    try:
        for n in sizes:
            w = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
            opt = fast.Adam([w])
            for grad in opt.grads:
                assert isinstance(grad, np.ndarray)
                grad[...] = 0.01
            samples: dict[int, list[float]] = {1: [], default: []}
            reps = repeats * max(1, 1_000_000 // n)
            for _ in range(rounds):
                for threads in (1, default):
                    _core.set_num_threads(threads)
                    opt.step()
                    samples[threads].append(_median_step(opt.step, reps) * 1e3)
            rows.append(ThreadRow(n, samples[1], samples[default]))
    finally:
        _core.set_num_threads(default)
    return rows


def format_threads(rows: Sequence[ThreadRow], processes: int, threads: int) -> str:
    """ms per step: median [p25-p75] of the samples, 1 thread against the default count."""

    def cell(v: list[float]) -> str:
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0], v[0], v[0]]
        return f"{statistics.median(v):.3f} [{q[0]:.3f}-{q[2]:.3f}]"

    out = [
        f"\nAdam, one float32 array, {processes} busy background process(es): ms per step, "
        f"median [p25-p75] of {len(rows[0].one) if rows else 0} interleaved samples",
        f"{'elements':>10s} {'1 thread':>24s} {f'{threads} threads (default)':>24s} {'ratio':>6s}",
    ]
    for r in rows:
        ratio = statistics.median(r.default) / statistics.median(r.one)
        out.append(f"{r.elements:10,d} {cell(r.one):>24s} {cell(r.default):>24s} {ratio:6.2f}")
    return "\n".join(out)
