"""The ``fastoptim`` command (also ``python -m fastoptim``)."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .. import __version__, get_num_threads, isa, set_num_threads
from . import bench, demo, minimize


def _names(resolve: Callable[[str], str], choices: Sequence[str]) -> argparse._ActionType:
    """A comma-separated list of names, each mapped through `resolve` (KeyError: unknown)."""

    def parse(text: str) -> list[str]:
        items, bad = [], []
        for t in (t.strip() for t in text.split(",")):
            if t:
                try:
                    items.append(resolve(t))
                except KeyError:
                    bad.append(t)
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad) or 'empty list'} (choose from {', '.join(choices)})"
            )
        return items

    return parse


def _csv(choices: Sequence[str]) -> argparse._ActionType:
    """A comma-separated list of names from `choices`, exactly as written."""

    def exact(name: str) -> str:
        if name not in choices:
            raise KeyError(name)
        return name

    return _names(exact, choices)


def _add_optimizers(parser: argparse.ArgumentParser) -> None:
    """The ``--optimizers`` option of demo and minimize (the demo's names, any case)."""
    names = list(demo.OPTIMIZERS)
    parser.add_argument(
        "--optimizers",
        type=_names(demo.canonical, names),
        default=list(demo.SEED_CHART),
        help=f"comma-separated, any case (default: {','.join(demo.SEED_CHART)}); also "
        + ", ".join(n for n in names if n not in demo.SEED_CHART),
    )


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def _positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _widths(text: str) -> list[int]:
    try:
        widths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        widths = [0]
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints >= 1: {text!r}")
    return widths


def _batch_size(text: str) -> int:
    if text.strip().lower() in ("full", "all", "0"):
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 or 'full', got {text!r}")
    return value


def _plain(doc: str | None) -> str:
    """A module docstring as --help text: without reST markup."""
    text = re.sub(r":\w+:`([^`]*)`", r"\1", doc or "")
    return text.replace("``", "").replace("**", "")


def _missing(*modules: str) -> list[str]:
    out = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            out.append(m)
    return out


def _demo(args: argparse.Namespace) -> int:
    needs = ["sklearn"] + ([] if args.no_plot else ["matplotlib"])
    missing = _missing(*needs)
    if missing:
        names = [{"sklearn": "scikit-learn"}.get(m, m) for m in missing]
        raise SystemExit(
            f"fastoptim demo needs {' and '.join(names)}: pip install 'fastoptim[demo]'"
        )
    config = demo.Config(
        optimizers=args.optimizers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        seed=args.seed,
        hidden=args.hidden,
        dtype=np.dtype(args.dtype),
        reference=not args.no_reference,
        threads=args.threads,
    )
    demo.main(
        config,
        None if args.no_plot else Path(args.out),
        progress=None if args.quiet else sys.stderr,
    )
    return 0


def _minimize(args: argparse.Namespace) -> int:
    functions = [minimize.function(name) for name in args.functions]
    if args.start is not None:
        bad = [f.name for f in functions if f.dim != len(args.start)]
        if bad:
            raise SystemExit(
                f"fastoptim minimize: --start has {len(args.start)} coordinate(s) but "
                f"{', '.join(bad)} take(s) another number; choose --functions accordingly"
            )
    minimize.main(
        [f.name for f in functions],
        args.optimizers,
        lr=args.lr,
        sweep_lrs=[] if args.no_sweep else args.sweep,
        start=args.start,
        tol=args.tol,
        max_steps=args.max_steps,
        out=None if args.no_plot else Path(args.out),
    )
    return 0


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


def _bench_under_load(args: argparse.Namespace) -> int:
    """``bench --background-load N``: the whole run with N busy processes beside it, and the
    thread table (1 thread against the default, Adam at 100K/800K/4M elements)."""
    if args.background_load is None:
        return _bench(args)
    if args.background_load < 0:
        raise SystemExit("bench: --background-load must be >= 0")
    with bench.background_load(args.background_load):
        rc = _bench(args)
        rows = bench.thread_scaling(rounds=max(args.rounds, 9), repeats=args.repeats)
        print(bench.format_threads(rows, args.background_load, get_num_threads()))
    return rc


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
    d = sub.add_parser(
        "demo",
        help="train a NumPy MLP on handwritten digits once per optimizer: table + loss curves",
        description=_plain(demo.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_optimizers(d)
    d.add_argument(
        "--epochs",
        type=_positive(int),
        default=20,
        help="passes over the training set (default 20)",
    )
    d.add_argument(
        "--batch-size",
        type=_batch_size,
        default=32,
        metavar="N|full",
        help="samples per update: 'full' = batch gradient descent, 1 = online SGD "
        "(default 32: mini-batch)",
    )
    d.add_argument(
        "--lr",
        type=_positive(float),
        help="learning rate for every optimizer (default: each "
        "optimizer's own, shown in the table)",
    )
    d.add_argument(
        "--schedule",
        choices=demo.SCHEDULES,
        default="constant",
        help="learning-rate schedule over the run's updates, starting or peaking at the lr: "
        + demo.SCHEDULE_HELP
        + " (default constant)",
    )
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the initial "
        "weights and the batch order (default 0): same seed, same numbers",
    )
    d.add_argument(
        "--hidden",
        type=_widths,
        default=[128, 128],
        metavar="H1,H2,...",
        help="hidden layer widths (default 128,128)",
    )
    d.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="parameter and data type (default float32)",
    )
    d.add_argument(
        "--threads",
        type=_positive(int),
        default=1,
        help="fastoptim threads (default 1: the model is small, the NumPy reference is "
        "single-threaded too, and a second thread only waits for a core on a busy machine)",
    )
    d.add_argument(
        "--no-reference",
        action="store_true",
        help="do not run the NumPy reference in lockstep (no step-time comparison)",
    )
    d.add_argument(
        "--out",
        metavar="DIR",
        default=".",
        help="directory for demo_loss.png (default: the current directory)",
    )
    d.add_argument("--no-plot", action="store_true", help="write no file")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    d.set_defaults(run=_demo)

    m = sub.add_parser(
        "minimize",
        help="optimizers on x^2, Rosenbrock, a saddle, Beale, Himmelblau: the lr trade-off, "
        "iterations, trajectories",
        description=_plain(minimize.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "--functions",
        type=_names(lambda t: minimize.function(t).name, list(minimize.FUNCTIONS)),
        default=list(minimize.FUNCTIONS),
        help="comma-separated (default: all): " + ", ".join(minimize.FUNCTIONS),
    )
    _add_optimizers(m)
    m.add_argument(
        "--lr",
        type=_positive(float),
        help="learning rate for every optimizer (default: one per function and "
        "optimizer, shown in the tables)",
    )
    m.add_argument(
        "--sweep",
        type=_floats,
        default=list(minimize.DEFAULT_SWEEP),
        metavar="LR,LR,...",
        help="learning rates of the SGD sweep on x^2 from x = 2, run when x2 is among the "
        "functions (default: " + ",".join(f"{v:g}" for v in minimize.DEFAULT_SWEEP) + ")",
    )
    m.add_argument("--no-sweep", action="store_true", help="skip the x^2 sweep")
    m.add_argument(
        "--start",
        type=_floats,
        metavar="X[,Y]",
        help="starting point (default: each function's own)",
    )
    m.add_argument(
        "--tol",
        type=float,
        default=minimize.DEFAULT_TOL,
        help=f"stop when |f(k+1) - f(k)| <= tol (default {minimize.DEFAULT_TOL:g})",
    )
    m.add_argument(
        "--max-steps",
        type=_positive(int),
        default=minimize.DEFAULT_MAX_STEPS,
        help=f"step cap (default {minimize.DEFAULT_MAX_STEPS})",
    )
    m.add_argument(
        "--out",
        metavar="DIR",
        default=".",
        help="directory for minimize_<function>.png (default: the current directory)",
    )
    m.add_argument("--no-plot", action="store_true", help="write no file")
    m.set_defaults(run=_minimize)

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
        "bert (BERT-base's ~200 tensors, 110M elements) (default: large,mlp; many and bert take "
        "minutes with torch installed)",
    )
    b.add_argument("--repeats", type=int, default=5, help="steps per sample (default 5)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    b.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    b.add_argument("--no-torch", action="store_true", help="skip torch.optim even if installed")
    b.add_argument("--overhead", action="store_true", help="also measure the fixed step cost")
    b.add_argument("--plot", metavar="PNG", help="also write ns/element vs array size (Adam)")
    b.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    b.add_argument(
        "--background-load",
        type=int,
        metavar="N",
        help="run N CPU-bound busy processes for the duration (a busy machine), and add a table "
        "of Adam steps on 1 thread vs the default thread count (100K, 800K, 4M elements)",
    )
    b.set_defaults(run=_bench_under_load)
    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1 or getattr(args, "rounds", 1) < 1:
        parser.error("--repeats and --rounds must be >= 1")
    result: int = args.run(args)
    return result
