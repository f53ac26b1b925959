"""The ``fastoptim`` command (also ``python -m fastoptim``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import re
import sys
import time
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


def _any_case(choices: Sequence[str]) -> argparse._ActionType:
    """A comma-separated list of names from `choices`, in any case (mapped to the choice)."""

    def resolve(name: str) -> str:
        for choice in choices:
            if choice.lower() == name.lower():
                return choice
        raise KeyError(name)

    return _names(resolve, choices)


def _add_optimizers(parser: argparse.ArgumentParser, default: Sequence[str] | None) -> None:
    """The ``--optimizers`` option of demo and minimize (the demo's names, any case)."""
    names = list(demo.OPTIMIZERS)
    parser.add_argument(
        "--optimizers",
        type=_names(demo.canonical, names),
        default=None if default is None else list(default),
        help=f"comma-separated, any case (default: {','.join(demo.COMPARED)}); also "
        + ", ".join(n for n in names if n not in demo.COMPARED),
    )


def _number(kind: Callable[[str], float | int], text: str) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not {'an int' if kind is int else 'a number'}: {text!r}"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = _number(kind, text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _nonnegative(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"not a list of finite numbers: {text!r}")
    return values


def _positive_floats(text: str) -> list[float]:
    values = _floats(text)
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of learning rates > 0: {text!r}"
        )
    return values


def _view_lrs(text: str) -> list[float | None]:
    """``tuned`` (None: each optimizer's own lr) and/or learning rates > 0, comma-separated."""
    out: list[float | None] = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        value = None if t.lower() == "tuned" else _positive(float)(t)
        if value not in out:
            out.append(value)
    if not out:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return out


def _widths(text: str) -> list[int]:
    try:
        widths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        widths = [0]
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints >= 1: {text!r}")
    return widths


def _batch_size(text: str) -> int:
    if text.strip().lower() in ("full", "all"):
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 or 'full', got {text!r}")
    return value


def _check_out(parser: argparse.ArgumentParser, text: str) -> Path:
    """``--out DIR``, checked before any work: a directory, or a path whose nearest existing
    ancestor is a writable directory (the directory is created when the files are written)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        parser.error(f"argument --out: {text} exists and is not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        parser.error(f"argument --out: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"argument --out: {existing} is not writable")
    return path


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


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    comparison = args.lesson in ("optimizers", "all")
    if not comparison:
        given = [
            f"--{k.replace('_', '-')}"
            for k in ("optimizers", "lr", "batch_size", "schedule")
            if getattr(args, k) is not None
        ]
        if given:
            parser.error(
                f"{', '.join(given)}: only for --lesson optimizers or all (the {args.lesson} "
                "lesson runs plain SGD at its own batch sizes and learning rates)"
            )
    needs = ["sklearn"] if args.dataset == "digits" else []
    missing = _missing(*needs, *([] if args.no_plot else ["matplotlib"]))
    if missing:
        names = [{"sklearn": "scikit-learn"}.get(m, m) for m in missing]
        raise SystemExit(
            f"fastoptim demo needs {' and '.join(names)}: pip install 'fastoptim[demo]'"
        )
    data_dir = None if args.data_dir is None else Path(args.data_dir)
    if args.dataset == "fashion-mnist":
        try:
            demo.fashion_mnist_files(data_dir)
        except demo.DataError as e:
            parser.error(str(e))
    config = demo.Config(
        optimizers=args.optimizers or list(demo.COMPARED),
        epochs=args.epochs,
        batch_size=32 if args.batch_size is None else args.batch_size,
        schedule=args.schedule or "constant",
        seed=args.seed,
        hidden=args.hidden,
        dtype=np.dtype(args.dtype),
        reference=not args.no_reference,
        threads=args.threads,
        lrs=[None, demo.COMMON_LR] if args.lr is None else args.lr,
        lesson=args.lesson,
        dataset=args.dataset,
        data_dir=data_dir,
        train_size=args.train_size,
    )
    try:
        demo.main(config, args.out, progress=None if args.quiet else sys.stderr)
    except demo.DataError as e:
        parser.error(str(e))
    return 0


def _minimize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    functions = [minimize.function(name) for name in args.functions]
    if args.start is not None:
        bad = [f.name for f in functions if f.dim != len(args.start)]
        if bad:
            parser.error(
                f"argument --start: {len(args.start)} coordinate(s) but {', '.join(bad)} "
                "take(s) another number; choose --functions accordingly"
            )
    minimize.main(
        [f.name for f in functions],
        args.optimizers or list(demo.COMPARED),
        lr=args.lr,
        sweep_lrs=[] if args.no_sweep else args.sweep,
        start=args.start,
        tol=args.tol,
        max_steps=args.max_steps,
        out=args.out,
    )
    return 0


def _bench_kind(args: argparse.Namespace) -> str:
    if args.rows:
        return "sparse row updates"
    if args.muon:
        return "Muon"
    if args.adafactor:
        return "Adafactor"
    if args.layouts:
        return "precision layouts"
    return "gradient transforms" if args.transforms else "float32"


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.plot and _missing("matplotlib"):
        parser.error("--plot needs matplotlib: pip install 'fastoptim[demo]'")
    if args.size is not None and not (args.layouts or args.transforms):
        parser.error("--size: only with --layouts or --transforms")
    if args.layouts and _missing("ml_dtypes"):
        parser.error("--layouts needs ml_dtypes (NumPy's bfloat16): pip install ml_dtypes")
    if args.size is None:
        args.size = bench.LAYOUT_SIZE
    if args.threads:
        set_num_threads(args.threads)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    progress = None if args.quiet else (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    print(
        f"fastoptim {__version__} bench: isa={isa()} threads={get_num_threads()}, "
        f"{_bench_kind(args)}, "
        f"median of {args.rounds} "
        "interleaved rounds (more where a check fails), each timing a block of >= "
        f"{args.repeats} steps (>= 2 ms)",
        flush=True,
    )
    busy = _busy()
    if busy:
        print(busy, flush=True)
    if args.rows:
        print(
            bench.format_rows(
                bench.run_rows(args.repeats, args.rounds, not args.no_torch, progress)
            )
        )
        print(
            "\nB/el = bytes per updated element (param, grad and state read, param and state "
            "written); stream = the streaming kernel moving the same bytes (a dense pass over "
            "as many elements); % = its time / fastoptim's; NumPy ref = fancy indexing "
            "(fastoptim.reference); torch = torch.optim with a sparse COO gradient (for-loop)"
        )
    elif args.transforms:
        transform_rows = bench.run_transforms(args.size, args.repeats, args.rounds, progress)
        print(bench.format_transforms(transform_rows, args.size))
        print(
            "\nB/el = bytes per element moved (AdamW fp32: p, m, v read and written, g read; the "
            "norm pass reads g once more; the EMA is one more array read and written); "
            "[lowest-highest] of the rounds; % = the streaming work's time / the row's"
        )
    elif args.muon:
        print(bench.format_muon(bench.run_muon(rounds=args.rounds, progress=progress)))
        print(bench.MUON_LEGEND)
    elif args.adafactor:
        adafactor_rows = bench.run_adafactor(
            rounds=args.rounds, progress=progress, torch=not args.no_torch
        )
        print(bench.format_adafactor(adafactor_rows))
        print(bench.ADAFACTOR_LEGEND)
    elif args.layouts:
        result = bench.run_layouts(
            args.size,
            repeats=args.repeats,
            rounds=args.rounds,
            torch=not args.no_torch,
            progress=progress,
        )
        print(bench.format_layouts(result))
        print(_LAYOUTS_LEGEND)
    else:
        rows = bench.run(
            args.optimizers,
            args.workloads,
            repeats=args.repeats,
            rounds=args.rounds,
            torch=not args.no_torch,
            progress=progress,
        )
        print(bench.format_table(rows))
        print(
            "\n+- = half the range of the rounds, % of the median; roofline = time of a "
            "streaming kernel moving the same bytes / time of the step;\nvs torch = best "
            "torch.optim path (for-loop, foreach, fused; pytorch_optimizer's for LAMB and LARS) "
            "/ fastoptim; ? = ratio uncertain (the "
            "rounds allow values more than 1.5x apart);\n! = faster than the memory allows: a "
            "measurement error; a flagged row's problems are listed under its table"
        )
    if args.overhead:
        for n in (1, 100, 4096):
            t = bench.step_overhead(n)
            print(f"opt.step() overhead, {n:5d} tensor(s): {t * 1e6:7.2f} us")
        if not args.no_torch and importlib.util.find_spec("torch") is not None:
            print(bench.format_torch_overhead(bench.torch_step_overhead()))
    if args.plot:
        _plot(args, progress)
    if not busy and _busy():
        print(_busy())
    print(f"bench took {time.perf_counter() - start:.0f} s")
    return 0


_LAYOUTS_LEGEND = (
    "\nB/el = bytes per element one step must move (read + write; p = parameter, g = gradient, "
    "m, v = AdamW's state);\n+- = half the range of the rounds, % of the median; roofline = "
    "time of _core.stream_mixed moving the same bytes with arrays of the same widths / time of "
    "the step;\nt/t(fp32) = time / the fp32 row's time (below 1: faster); ? = ratio uncertain "
    "(the rounds allow values more than 1.5x apart);\n! = faster than the memory allows: a "
    "measurement error.  Contenders (torch fused, cast around an fp32 step) are charged the "
    "bytes of the fastoptim layout\ndoing the same work; the cast-around baseline moves more "
    "(and allocates temporaries) by construction.  The fp16 rows' roofline converts as "
    "bfloat16 (same bytes).\nL2 1thr = ns/el of the same step on 65,536 elements (in L2), one "
    "thread, CPU time: the step's compute alone;\ndivided by the thread count, a floor that no "
    "run from memory can beat."
)


def _busy() -> str:
    """A warning when other processes load the machine (the bench's numbers then vary)."""
    load = bench.machine_load()
    if load is None or load[0] < 0.5 * load[1]:
        return ""
    return (
        f"warning: load average {load[0]:.1f} on {load[1]} core(s): other processes compete "
        "for the cores, so timings vary; see +- and the flags"
    )


def _bench_under_load(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``bench --background-load N``: the whole run with N busy processes beside it, and the
    thread table (1 thread against the default, Adam at 100K/800K/4M elements)."""
    if args.background_load is None:
        return _bench(args, parser)
    with bench.background_load(args.background_load):
        rc = _bench(args, parser)
        rows = bench.thread_scaling(rounds=max(args.rounds, 9), repeats=args.repeats)
        print(bench.format_threads(rows, args.background_load, get_num_threads()))
    return rc


def _plot(args: argparse.Namespace, progress: Callable[[str], None] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(bench.SWEEP_SIZES)
    if progress:
        progress(f"size sweep for --plot: Adam on {len(sizes)} array sizes")
    ranges: dict[str, list[tuple[float, float]]] = {}
    curves = bench.size_sweep(
        sizes,
        "Adam",
        repeats=args.repeats,
        rounds=args.rounds,
        torch=not args.no_torch,
        progress=progress,
        ranges=ranges,
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, ns in curves.items():
        (line,) = ax.loglog(sizes, ns, marker="o", ms=3, label=name)
        low, high = zip(*ranges[name])
        ax.fill_between(sizes, low, high, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("elements (one float32 array)")
    ax.set_ylabel("ns per element per step (median; band: fastest-slowest round)")
    title = f"Adam step, {isa()}, {get_num_threads()} threads, {args.rounds} rounds"
    load = bench.machine_load()
    if _busy() and load is not None:
        title += f"\nmachine busy (load {load[0]:.1f} on {load[1]} cores): timings vary"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_adam_sizes.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _add_common(parser: argparse.ArgumentParser, png: str) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=".",
        help=f"directory for {png} (default: the current directory; created if needed)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastoptim", description="fastoptim: torch.optim's maths, in place on NumPy arrays."
    )
    parser.add_argument("--version", action="version", version=f"fastoptim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="the optimizer articles' lessons on a NumPy MLP: optimizers compared at tuned and "
        "common learning rates, batch vs mini-batch vs online, learning-rate decay",
        description=_plain(demo.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "--lesson",
        choices=demo.LESSONS,
        default="optimizers",
        help="optimizers (default): the optimizers at tuned and at one common lr; batch: full "
        "batch vs mini-batch vs online SGD; decay: constant vs decaying lr; all: the three",
    )
    _add_optimizers(d, None)
    d.add_argument(
        "--lr",
        type=_view_lrs,
        metavar="tuned|LR,...",
        help="learning rates of the comparison, one table and chart row each: 'tuned' (each "
        f"optimizer's own) or a number for every optimizer (default: tuned,{demo.COMMON_LR:g},"
        " the articles' common lr)",
    )
    d.add_argument(
        "--epochs",
        type=_positive(int),
        default=20,
        help="passes over the training set (default 20)",
    )
    d.add_argument(
        "--batch-size",
        type=_batch_size,
        metavar="N|full",
        help="samples per update in the comparison: 'full' = batch gradient descent, 1 = "
        "online SGD (default 32: mini-batch)",
    )
    d.add_argument(
        "--schedule",
        choices=demo.SCHEDULES,
        help="learning-rate schedule of the comparison over the run's updates, starting or "
        "peaking at the lr: " + demo.SCHEDULE_HELP + " (default constant)",
    )
    d.add_argument(
        "--dataset",
        choices=demo.DATASETS,
        default="digits",
        help="digits (default: scikit-learn's 8x8 digits, 1797 images) or fashion-mnist (the "
        "articles' data set, read from --data-dir; nothing is downloaded)",
    )
    d.add_argument(
        "--data-dir",
        metavar="DIR",
        help="directory with Fashion-MNIST's IDX files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; gzipped .gz "
        f"or not), from {demo.FASHION_URL}",
    )
    d.add_argument(
        "--train-size",
        type=_positive(int),
        metavar="N",
        help="train on a random subset of N samples (default: the whole training set)",
    )
    d.add_argument(
        "--seed",
        type=_nonnegative(int),
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
    _add_common(d, "demo_loss.png, demo_batch.png, demo_decay.png")
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
        help="comma-separated, any case (default: all): " + ", ".join(minimize.FUNCTIONS),
    )
    _add_optimizers(m, demo.COMPARED)
    m.add_argument(
        "--lr",
        type=_positive(float),
        help="learning rate for every optimizer (default: one per function and "
        "optimizer, shown in the tables)",
    )
    m.add_argument(
        "--sweep",
        type=_positive_floats,
        default=list(minimize.DEFAULT_SWEEP),
        metavar="LR,LR,...",
        help="learning rates (> 0) of the SGD sweep on x^2 from x = 2, run when x2 is among "
        "the functions (default: " + ",".join(f"{v:g}" for v in minimize.DEFAULT_SWEEP) + ")",
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
        type=_nonnegative(float),
        default=minimize.DEFAULT_TOL,
        help=f"stop when |f(k+1) - f(k)| <= tol, tol >= 0 (default {minimize.DEFAULT_TOL:g})",
    )
    m.add_argument(
        "--max-steps",
        type=_positive(int),
        default=minimize.DEFAULT_MAX_STEPS,
        help=f"step cap (default {minimize.DEFAULT_MAX_STEPS})",
    )
    _add_common(m, "minimize_<function>.png")
    m.add_argument("--no-plot", action="store_true", help="write no file")
    m.set_defaults(run=_minimize)

    b = sub.add_parser(
        "bench",
        help="time one optimizer step against NumPy, torch.optim and the memory roofline",
        description=_plain(bench.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--optimizers",
        type=_any_case(list(bench.OPTIMIZERS)),
        default=list(bench.OPTIMIZERS),
        help="comma-separated, any case (default: all): " + ", ".join(bench.OPTIMIZERS),
    )
    b.add_argument(
        "--workloads",
        type=_any_case(list(bench.WORKLOADS)),
        default=list(bench.DEFAULT_WORKLOADS),
        help="comma-separated from large (16M elements), mlp (a small MLP), many (4096 x 4096), "
        "bert (BERT-base's ~200 tensors, 110M elements) (default: large,mlp; many and bert take "
        "minutes with torch installed)",
    )
    b.add_argument(
        "--repeats",
        type=_positive(int),
        default=5,
        help="steps per timed block, at least (default 5; more for short steps, so that a "
        "block lasts >= 2 ms; fewer, down to 1, for steps over 20 ms)",
    )
    b.add_argument(
        "--rounds",
        type=_positive(int),
        default=3,
        help="interleaved rounds (default 3; rows that fail a check get up to 2x more)",
    )
    b.add_argument(
        "--layouts",
        action="store_true",
        help="instead of the optimizer tables: AdamW in every precision layout (fp32; bf16/fp16 "
        "parameters with float32, 16-bit or master state; the offload layout; stochastic "
        "rounding; torch's fused AdamW and casting around an fp32 step), with bytes per "
        "element and %% of a streaming kernel moving the same bytes",
    )
    b.add_argument(
        "--rows",
        action="store_true",
        help="instead of the optimizer tables: sparse row updates (step_rows) of an embedding "
        "table, SGD / Adagrad / SparseAdam, against the streaming kernel moving the same bytes, "
        "the NumPy reference and torch.optim with sparse gradients",
    )
    b.add_argument(
        "--transforms",
        action="store_true",
        help="instead of the optimizer tables: the gradient transforms (the norm pass of "
        "max_grad_norm against a read-only streaming pass; AdamW with max_grad_norm and "
        "ema_decay against the streaming kernels moving their bytes), --size elements",
    )
    b.add_argument(
        "--muon",
        action="store_true",
        help="instead of the optimizer tables: Muon's Newton-Schulz iteration (bfloat16 "
        "convention, float32, float64) on hidden-layer-sized matrices against the machine's "
        "sgemm rate measured in the same run, and a whole Muon step",
    )
    b.add_argument(
        "--adafactor",
        action="store_true",
        help="instead of the optimizer tables: Adafactor (a NumPy step) on a 16M-element "
        "matrix, hidden-layer matrices and a 16M-element vector, its extra reduction pass (row "
        "and column means of g^2) against a read-only streaming pass, the step against "
        "streaming kernels moving the bytes of a fused step, and torch's for-loop step",
    )
    b.add_argument(
        "--size",
        type=_positive(int),
        metavar="N",
        help=f"elements of the --layouts / --transforms tensor (default {bench.LAYOUT_SIZE:,}: "
        "16M)",
    )
    b.add_argument("--threads", type=_positive(int), help="fastoptim threads (default: all cores)")
    b.add_argument("--no-torch", action="store_true", help="skip torch.optim even if installed")
    b.add_argument(
        "--overhead",
        action="store_true",
        help="also measure the fixed step cost (and, with torch installed, fastoptim.torch's: "
        "fixed and per tensor, same and new gradient tensors)",
    )
    b.add_argument(
        "--plot",
        action="store_true",
        help="also sweep Adam over 11 array sizes (16 to 16M elements) and write "
        "bench_adam_sizes.png, ns/element vs size, into --out (honours --no-torch, --repeats, "
        "--rounds)",
    )
    _add_common(b, "bench_adam_sizes.png (with --plot)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    b.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)  # the old
    # opt-in to progress, now the default: accepted so that existing scripts keep working
    b.add_argument(
        "--background-load",
        type=_nonnegative(int),
        metavar="N",
        help="run N CPU-bound busy processes for the duration (a busy machine), and add a table "
        "of Adam steps on 1 thread vs the default thread count (100K, 800K, 4M elements)",
    )
    b.set_defaults(run=_bench_under_load)
    parsers = {"demo": d, "minimize": m, "bench": b}
    args = parser.parse_args(argv)
    sub_parser = parsers[args.command]
    writes = args.plot if args.command == "bench" else not args.no_plot
    args.out = _check_out(sub_parser, args.out) if writes else None
    result: int = args.run(args, sub_parser)
    return result
