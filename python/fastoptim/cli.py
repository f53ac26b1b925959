"""The ``fastoptim`` command (also ``python -m fastoptim``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from . import __version__, bench, get_num_threads, isa, set_num_threads


def _csv(choices: Sequence[str]) -> argparse._ActionType:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad) or 'empty list'} (choose from {', '.join(choices)})"
            )
        return items

    return parse


def _bench(args: argparse.Namespace) -> int:
    if args.threads:
        set_num_threads(args.threads)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    print(
        f"fastoptim {__version__} bench: isa={isa()} threads={get_num_threads()}, float32, "
        f"median of {args.rounds} interleaved rounds x {args.repeats} steps"
    )
    rows = bench.run(
        args.optimizers,
        args.workloads,
        repeats=args.repeats,
        rounds=args.rounds,
        torch=not args.no_torch,
        progress=(lambda s: print(f"  measuring {s}...", file=sys.stderr))
        if args.verbose
        else None,
    )
    print(bench.format_table(rows))
    print(
        "\nroofline = time of a streaming kernel moving the same bytes / time of the step; "
        "vs torch = best torch.optim path (for-loop, foreach, fused) / fastoptim"
    )
    if args.overhead:
        for n in (1, 100, 4096):
            t = bench.step_overhead(n)
            print(f"opt.step() overhead, {n:5d} tensor(s): {t * 1e6:7.2f} us")
    if args.plot:
        _plot(args.plot, args.rounds)
    return 0


def _plot(path: str, rounds: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fastoptim[demo]'") from None
    sizes = [int(s) for s in np.unique(np.logspace(3, 25, 23, base=2).astype(int))]
    curves = bench.size_sweep(sizes, "Adam", rounds=rounds)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, ns in curves.items():
        ax.loglog(sizes, ns, marker="o", ms=3, label=name)
    ax.set_xlabel("elements (one float32 array)")
    ax.set_ylabel("ns per element per step")
    ax.set_title(f"Adam step, {isa()}, {get_num_threads()} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastoptim", description="fastoptim: torch.optim's maths, in place on NumPy arrays."
    )
    parser.add_argument("--version", action="version", version=f"fastoptim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench",
        help="time one optimizer step against NumPy, torch.optim and the memory roofline",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--optimizers",
        type=_csv(list(bench.OPTIMIZERS)),
        default=list(bench.OPTIMIZERS),
        help="comma-separated (default: all): " + ", ".join(bench.OPTIMIZERS),
    )
    b.add_argument(
        "--workloads",
        type=_csv(list(bench.WORKLOADS)),
        default=list(bench.DEFAULT_WORKLOADS),
        help="comma-separated from large (16M elements), mlp (a small MLP), many (4096 x 4096), "
        "bert (BERT-base's ~200 tensors, 110M elements) (default: large,mlp,many)",
    )
    b.add_argument("--repeats", type=int, default=5, help="steps per sample (default 5)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    b.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    b.add_argument("--no-torch", action="store_true", help="skip torch.optim even if installed")
    b.add_argument("--overhead", action="store_true", help="also measure the fixed step cost")
    b.add_argument("--plot", metavar="PNG", help="also write ns/element vs array size (Adam)")
    b.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    b.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1 or getattr(args, "rounds", 1) < 1:
        parser.error("--repeats and --rounds must be >= 1")
    result: int = args.run(args)
    return result
