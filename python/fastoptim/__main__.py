"""``python -m fastoptim``: a short benchmark of one optimizer step, fastoptim against the NumPy
reference, with the bandwidth of a streaming kernel moving the same bytes measured in the same
run.  (The full command-line interface comes later.)"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np

import fastoptim as fo

# optimizer, its options, and the number of state buffers it keeps per parameter.
CASES: dict[str, tuple[Callable[..., fo.Optimizer], dict[str, object], int]] = {
    "SGD": (fo.SGD, {"lr": 1e-3}, 0),
    "SGD+momentum": (fo.SGD, {"lr": 1e-3, "momentum": 0.9}, 1),
    "Adagrad": (fo.Adagrad, {}, 1),
    "RMSprop": (fo.RMSprop, {}, 1),
    "Adadelta": (fo.Adadelta, {}, 2),
    "Adam": (fo.Adam, {}, 2),
    "AdamW": (fo.AdamW, {}, 2),
    "AMSGrad": (fo.Adam, {"amsgrad": True}, 3),
    "Adamax": (fo.Adamax, {}, 2),
    "NAdam": (fo.NAdam, {}, 2),
    "RAdam": (fo.RAdam, {}, 2),
    "Lion": (fo.Lion, {}, 1),
}


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastoptim", description=__doc__)
    parser.add_argument("--size", type=int, default=1 << 22, help="elements (default 4M)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per contender")
    parser.add_argument(
        "--optimizers",
        default="SGD,SGD+momentum,Adam,AdamW,NAdam,Lion",
        help=f"comma-separated, from: {', '.join(CASES)}",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown optimizer(s): {', '.join(unknown)}")
    n = args.size
    rng = np.random.default_rng(0)
    print(
        f"fastoptim {fo.__version__}: isa={fo.isa()} threads={fo.get_num_threads()} "
        f"float32, {n:,} elements, median of {args.repeats} steps (interleaved)"
    )
    header = (
        f"{'optimizer':14s} {'B/elem':>6s} {'fastoptim':>10s} {'ns/elem':>8s} {'GB/s':>6s} "
        f"{'roofline':>8s} {'NumPy ref':>10s} {'speed-up':>8s}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        cls, kwargs, nstate = CASES[name]
        bytes_per_elem = 4 * (2 + nstate) + 4 * (1 + nstate)  # read p, g, states; write p, states
        grad = rng.standard_normal(n, dtype=np.float32)
        fast = cls([rng.standard_normal(n, dtype=np.float32)], **kwargs)
        ref_cls = getattr(fo.reference, cls.__name__)
        ref = ref_cls([rng.standard_normal(n, dtype=np.float32)], **kwargs)
        stream = [rng.standard_normal(n, dtype=np.float32) for _ in range(2 + nstate)]
        fast.step([grad])
        ref.step([grad])
        t_fast, t_ref, t_stream = [], [], []
        for _ in range(3):  # A B C A B C ...: the machine's noise hits every contender alike
            t_fast.append(_median_time(partial(fast.step, [grad]), args.repeats))
            t_ref.append(_median_time(partial(ref.step, [grad]), max(1, args.repeats // 3)))
            t_stream.append(_median_time(partial(fo._core.stream, stream), args.repeats))
        tf, tr, ts = (float(np.median(t)) for t in (t_fast, t_ref, t_stream))
        print(
            f"{name:14s} {bytes_per_elem:6d} {tf * 1e3:8.2f}ms {tf / n * 1e9:8.3f} "
            f"{bytes_per_elem * n / tf / 1e9:6.1f} {ts / tf * 100:7.0f}% "
            f"{tr * 1e3:8.1f}ms {tr / tf:7.1f}x"
        )
    print("roofline: time of a streaming kernel moving the same bytes / time of the step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
