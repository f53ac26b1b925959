"""The ``fastoptim`` command (also ``python -m fastoptim``)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, available_cpus, get_num_threads, isa, set_num_threads
from . import bench, capped, demo, lookup, minimize, plural


def _names(
    resolve: Callable[[str], str],
    choices: Sequence[str],
    elsewhere: Mapping[str, str] | None = None,
) -> argparse._ActionType:
    """A comma-separated list of names, each mapped through `resolve` (KeyError: unknown), each
    once (the first time, in order); `elsewhere`: a note for a name that is unknown here but
    known to another subcommand (lower-case name -> where it is)."""

    def parse(text: str) -> list[str]:
        items, bad = [], []
        for t in (t.strip() for t in text.split(",")):
            if t:
                try:
                    name = resolve(t)
                except KeyError:
                    bad.append(t)
                    continue
                if name not in items:
                    items.append(name)
        if bad or not items:
            where = elsewhere or {}
            notes = "".join(f"; {t}: {where[t.lower()]}" for t in bad if t.lower() in where)
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad) or 'empty list'} (choose from {', '.join(choices)})"
                + notes
            )
        return items

    return parse


def _any_case(choices: Sequence[str]) -> argparse._ActionType:
    """A comma-separated list of names from `choices`, in any case (mapped to the choice)."""
    return _names(lambda name: lookup(name, choices), choices)


def _aliases(aliases: Mapping[str, str]) -> str:
    return "; " + ", ".join(f"{a} = {n}" for a, n in aliases.items())


def _add_optimizers(parser: argparse.ArgumentParser, default: Sequence[str] | None) -> None:
    """The ``--optimizers`` option of demo and minimize (the demo's names, any case)."""
    names = list(demo.OPTIMIZERS)
    parser.add_argument(
        "--optimizers",
        type=_names(demo.canonical, names),
        default=None if default is None else list(default),
        help="comma-separated, any case, repeats ignored (default: "
        + f"{','.join(demo.COMPARED)}); also "
        + ", ".join(n for n in names if n not in demo.COMPARED)
        + _aliases(demo.ALIASES),
    )


# demo's and minimize's optimizers that bench's optimizer tables lack, and why
_NOT_IN_BENCH = {
    "nesterov": "not timed (SGD+momentum's step, same bytes)",
    "muon": "see --muon",
    "adafactor": "see --adafactor",
    "lbfgs": "not timed (a closure's evaluations dominate its step)",
}


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
    """``--out DIR``, checked before any work: created if needed (with its parents) and
    written to (a temporary file, removed at once)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        parser.error(f"argument --out: {text} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        parser.error(f"argument --out: cannot write into {text}: {e.strerror or e}")
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


_DEMO_EXTRA = "pip install 'fastoptim[demo]'"


def _require(parser: argparse.ArgumentParser, what: str, *modules: str, install: str) -> None:
    """A missing optional dependency is an error of the environment, reported as a usage error
    (exit code 2) before any work: `what` needs `modules`, installed by `install`."""
    missing = _missing(*modules)
    if missing:
        names = [{"sklearn": "scikit-learn"}.get(m, m) for m in missing]
        parser.error(f"{what} needs {' and '.join(names)}: {install}")


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # (not every OS says)
        return None


def _check_memory(parser: argparse.ArgumentParser, option: str, needed: float) -> None:
    """A size that needs more than the machine's memory (at least `needed` bytes) is refused
    before any work."""
    memory = _physical_memory()
    if memory is not None and needed > memory:
        parser.error(
            f"argument {option}: needs at least {needed / 2**30:,.0f} GiB of memory; this "
            f"machine has {memory / 2**30:,.0f} GiB"
        )


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
    what = "fastoptim demo" if args.no_plot else "fastoptim demo (without --no-plot)"
    _require(parser, what, *needs, *([] if args.no_plot else ["matplotlib"]), install=_DEMO_EXTRA)
    # the network's parameters and their gradients at least (digits: 64 input features; a
    # Fashion-MNIST file's image size is known once it is read: 1 for the bound)
    sizes = [64 if args.dataset == "digits" else 1, *args.hidden, 10]
    weights = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    _check_memory(parser, "--hidden", 2 * weights * np.dtype(args.dtype).itemsize)
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
    except demo.DataError as e:  # the files' contents: found while loading them, before training
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
        if max(abs(v) for v in args.start) > minimize.BOUND:
            parser.error(
                f"argument --start: each coordinate must lie within +-{minimize.BOUND:g} (a run "
                "beyond that counts as diverged)"
            )
    if not args.no_plot:
        _require(
            parser, "fastoptim minimize (without --no-plot)", "matplotlib", install=_DEMO_EXTRA
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


# bench's measurements besides the optimizer tables (one at most): option -> what it measures
_BENCH_MODES = {
    "layouts": "precision layouts",
    "rows": "sparse row updates",
    "transforms": "gradient transforms",
    "muon": "Muon",
    "adafactor": "Adafactor",
}


def _bench_mode(args: argparse.Namespace) -> str | None:
    return next((m for m in _BENCH_MODES if getattr(args, m)), None)


def _check_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """bench's options that cannot go together, missing dependencies, sizes beyond the
    machine's memory: usage errors, before any work.  Fills in the defaults."""
    mode = _bench_mode(args)
    if mode is not None:
        given = [f"--{k}" for k in ("optimizers", "workloads") if getattr(args, k) is not None]
        if given:
            parser.error(f"{', '.join(given)}: only for the optimizer tables, not with --{mode}")
    if args.size is not None and mode not in ("layouts", "transforms"):
        parser.error("--size: only with --layouts or --transforms")
    if args.background_load is not None and args.threads == 1:
        parser.error(
            "--background-load: its thread table compares 1 thread with --threads N (default: "
            "all cores); --threads 1 leaves nothing to compare"
        )
    if args.plot:
        _require(parser, "--plot", "matplotlib", install=_DEMO_EXTRA)
    if mode == "layouts":
        _require(parser, "--layouts", "ml_dtypes", install="pip install ml_dtypes")
    if args.size is None:
        args.size = bench.LAYOUT_SIZE
    else:  # --layouts or --transforms: float32 p, g, m, v at least: 16 bytes per element
        _check_memory(parser, "--size", 16 * args.size)
    args.optimizers = args.optimizers or list(bench.OPTIMIZERS)
    args.workloads = args.workloads or list(bench.DEFAULT_WORKLOADS)


def _measure(args: argparse.Namespace, progress: Callable[[str], None] | None) -> None:
    """The table of bench's mode (see _BENCH_MODES; None: the optimizer tables) and its legend.
    Ctrl-C prints the rows measured so far, then goes on up."""
    torch = not args.no_torch
    size = args.size
    tables: dict[str | None, tuple[Callable[[], Any], Callable[[Any], str], str]] = {
        None: (
            lambda: bench.run(
                args.optimizers, args.workloads, args.repeats, args.rounds, torch, progress
            ),
            bench.format_table,
            _TABLE_LEGEND,
        ),
        "rows": (
            lambda: bench.run_rows(args.repeats, args.rounds, torch, progress),
            bench.format_rows,
            _ROWS_LEGEND,
        ),
        "transforms": (
            lambda: bench.run_transforms(size, args.repeats, args.rounds, progress),
            lambda rows: bench.format_transforms(rows, size),
            _TRANSFORMS_LEGEND,
        ),
        "muon": (
            lambda: bench.run_muon(rounds=args.rounds, progress=progress),
            bench.format_muon,
            bench.MUON_LEGEND,
        ),
        "adafactor": (
            lambda: bench.run_adafactor(rounds=args.rounds, progress=progress, torch=torch),
            bench.format_adafactor,
            bench.ADAFACTOR_LEGEND,
        ),
        "layouts": (
            lambda: bench.run_layouts(
                size, repeats=args.repeats, rounds=args.rounds, torch=torch, progress=progress
            ),
            bench.format_layouts,
            _LAYOUTS_LEGEND,
        ),
    }
    run, table, legend = tables[_bench_mode(args)]
    try:
        result = run()
    except bench.Interrupted as e:
        if e.rows:
            print(f"\ninterrupted: the {plural(len(e.rows), 'row')} measured so far")
            print(table(e.rows))
        raise
    print(table(result))
    print(legend)


@contextlib.contextmanager
def _threads(threads: int | None, torch: bool) -> Iterator[None]:
    """fastoptim's thread count (and torch's, with `torch`) set to `threads` (None: left as it
    is) for the block, then put back (``main`` may run inside another program)."""
    before = get_num_threads()
    torch_module: Any = None
    if threads and torch:
        with contextlib.suppress(ImportError):  # (torch takes seconds to import: only if used)
            torch_module = importlib.import_module("torch")
    torch_before = torch_module.get_num_threads() if torch_module is not None else 0
    try:
        if threads:
            set_num_threads(threads)
            if torch_module is not None:
                torch_module.set_num_threads(get_num_threads())
        yield
    finally:
        set_num_threads(before)
        if torch_module is not None:
            torch_module.set_num_threads(torch_before)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_bench(args, parser)
    with _threads(args.threads, torch=not args.no_torch):
        _run_bench(args)
    return 0


def _run_bench(args: argparse.Namespace) -> None:
    progress = None if args.quiet else (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    mode = _bench_mode(args)
    # (every mode re-measures what fails its checks, bench.MAX_REMEASURE times at most; --muon
    # and --adafactor time one call per sample, whatever --repeats says)
    block = (
        "one call (more where one lasts under 2 ms)"
        if mode in ("muon", "adafactor")
        else f"{plural(args.repeats, 'call')} (more where they last under 2 ms; fewer, down to "
        f"1, where they would last over {bench.MAX_SAMPLE_S:g} s)"
    )
    print(
        f"fastoptim {__version__} bench: isa={isa()} threads={get_num_threads()}"
        f"{capped(args.threads)} cpus={available_cpus()}, "
        f"{'float32' if mode is None else _BENCH_MODES[mode]}, "
        f"median and range of {plural(args.rounds, 'interleaved round')} (and up to "
        f"{bench.MAX_REMEASURE * args.rounds} more where a check fails), each sample timing a "
        f"block of {block}",
        flush=True,
    )
    busy = _busy()
    if busy:
        print(busy, flush=True)
    with bench.background_load(args.background_load or 0):
        _measure(args, progress)
        if args.overhead:
            for n in (1, 100, 4096):
                t = bench.step_overhead(n)
                print(f"opt.step() overhead, {n:5d} tensor(s): {t * 1e6:7.2f} us")
            if not args.no_torch and importlib.util.find_spec("torch") is not None:
                print(bench.format_torch_overhead(bench.torch_step_overhead()))
        if args.plot:
            _plot(args, progress)
        if args.background_load is not None:
            if get_num_threads() == 1:
                print("\n(no thread table: fastoptim runs 1 thread by default on this machine)")
            else:
                rows = bench.thread_scaling(rounds=max(args.rounds, 9), repeats=args.repeats)
                print(bench.format_threads(rows, args.background_load, get_num_threads()))
    if not busy and _busy():
        print(_busy())
    print(f"bench took {time.perf_counter() - start:.0f} s")


# (every table's "!", one rule: bench.over_limit and the checks each mode runs)
_FLAG_LEGEND = (
    "\n! = faster than the memory (or the machine's sgemm) allows: a measurement error; a row "
    "whose rounds spread too far, or whose checks fail, is flagged too, its problems listed "
    "under its table"
)
_TABLE_LEGEND = (
    "\n+- = half the range of the rounds, % of the median; roofline = time of a "
    "streaming kernel moving the same bytes / time of the step;\nvs torch = best "
    "torch.optim path (for-loop, foreach, fused; pytorch_optimizer's for LAMB and LARS) "
    "/ fastoptim; ? = ratio uncertain (the "
    "rounds allow values more than 1.5x apart);" + _FLAG_LEGEND
)
_ROWS_LEGEND = (
    "\nB/el = bytes per updated element (param, grad and state read, param and state "
    "written); stream = the streaming kernel moving the same bytes (a dense pass over "
    "as many elements); % = its time / fastoptim's; NumPy ref = fancy indexing "
    "(fastoptim.reference); torch = torch.optim with a sparse COO gradient (for-loop)"
    + _FLAG_LEGEND
)
_TRANSFORMS_LEGEND = (
    "\nB/el = bytes per element moved (AdamW fp32: p, m, v read and written, g read; the "
    "norm pass reads g once more; the EMA is one more array read and written); "
    "[lowest-highest] of the rounds; % = the streaming work's time / the row's" + _FLAG_LEGEND
)
_LAYOUTS_LEGEND = (
    "\nB/el = bytes per element one step must move (read + write; p = parameter, g = gradient, "
    "m, v = AdamW's state);\n+- = half the range of the rounds, % of the median; roofline = "
    "time of a streaming kernel moving the same bytes with arrays of the same widths / time of "
    "the step;\nt/t(fp32) = time / the fp32 row's time (below 1: faster); ? = ratio uncertain "
    "(the rounds allow values more than 1.5x apart);" + _FLAG_LEGEND + ".\nContenders (torch "
    "fused, cast around an fp32 step) are charged the bytes of the fastoptim layout doing the "
    "same work; the cast-around baseline moves more "
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
        "for the cores, so timings vary; see each table's spread (+- or [range]) and the flags "
        "under it"
    )


_BENCH_DESCRIPTION = """\
Times one optimizer step of fastoptim against the NumPy reference (fastoptim.reference) and,
when installed, torch.optim (its for-loop, foreach and fused versions; pytorch_optimizer's for
LAMB and LARS), next to a streaming kernel that moves the same bytes through memory (the
roofline, measured in the same run).

Contenders run interleaved (A B C A B C ...), so that noise hits them alike: each cell is the
median of --rounds rounds, each round timing a block of steps that lasts at least 2 ms.  A row
whose numbers cannot be right (faster than 110% of the streaming kernel, moving its bytes at
under 1 GB/s, or rounds more than +-25% apart, as when other processes compete for the cores)
is measured again, up to twice; what is still wrong is flagged under its table ("Do not trust
this row").  A speed-up the rounds cannot pin down (their ranges allow values more than 1.5x
apart) is marked "?".  LAMB and LARS take two passes (a reduction, then the update): their rows
count both passes' bytes.

By default: the optimizer tables (--optimizers on each of --workloads).  One of --layouts,
--rows, --transforms, --muon or --adafactor measures something else instead."""


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
    ax.set_ylabel("ns per element per step\n(median; band: fastest-slowest round)")
    title = f"Adam step, {isa()}, {plural(get_num_threads(), 'thread')}, "
    title += plural(args.rounds, "round")
    load = bench.machine_load()
    if _busy() and load is not None:
        title += f"\nmachine busy (load {load[0]:.1f} on {load[1]} cores): timings vary"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
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
        help="fastoptim threads, capped at fastoptim.max_threads() (default 1: the model is "
        "small, the NumPy reference is single-threaded too, and a second thread only waits for "
        "a core on a busy machine)",
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
        help="comma-separated, any case, repeats ignored (default: all): "
        + ", ".join(minimize.FUNCTIONS),
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
        help=f"starting point, each coordinate within +-{minimize.BOUND:g} (the divergence "
        "bound; default: each function's own)",
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
        description=_BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--optimizers",
        type=_names(bench.canonical, list(bench.OPTIMIZERS), _NOT_IN_BENCH),
        help="optimizer tables: comma-separated, any case, repeats ignored (default: all): "
        + ", ".join(bench.OPTIMIZERS)
        + _aliases(bench.ALIASES),
    )
    b.add_argument(
        "--workloads",
        type=_any_case(list(bench.WORKLOADS)),
        help="optimizer tables: comma-separated, any case, repeats ignored, from large (16M "
        "elements), mlp (a small MLP), many (4096 x 4096), bert (BERT-base's ~200 tensors, 110M "
        "elements) (default: large,mlp; many and bert take minutes with torch installed)",
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
    mode = b.add_mutually_exclusive_group()  # instead of the optimizer tables: one at most
    mode.add_argument(
        "--layouts",
        action="store_true",
        help="instead of the optimizer tables: AdamW in every precision layout (fp32; bf16/fp16 "
        "parameters with float32, 16-bit or master state; the offload layout; stochastic "
        "rounding; torch's fused AdamW and casting around an fp32 step), with bytes per "
        "element and %% of a streaming kernel moving the same bytes",
    )
    mode.add_argument(
        "--rows",
        action="store_true",
        help="instead of the optimizer tables: sparse row updates (step_rows) of an embedding "
        "table, SGD / Adagrad / SparseAdam, against the streaming kernel moving the same bytes, "
        "the NumPy reference and torch.optim with sparse gradients",
    )
    mode.add_argument(
        "--transforms",
        action="store_true",
        help="instead of the optimizer tables: the gradient transforms (the norm pass of "
        "max_grad_norm against a read-only streaming pass; AdamW with max_grad_norm and "
        "ema_decay against the streaming kernels moving their bytes), --size elements",
    )
    mode.add_argument(
        "--muon",
        action="store_true",
        help="instead of the optimizer tables: Muon's Newton-Schulz iteration (bfloat16 "
        "convention, float32, float64) on hidden-layer-sized matrices against the machine's "
        "sgemm rate measured in the same run, and a whole Muon step",
    )
    mode.add_argument(
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
        "16M; the issues' targets that --layouts prints are set for that size)",
    )
    b.add_argument(
        "--threads",
        type=_positive(int),
        help="fastoptim threads, capped at fastoptim.max_threads() (default: all cores)",
    )
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
        "of Adam steps on 1 thread vs the default thread count or --threads (100K, 800K, 4M "
        "elements)",
    )
    b.set_defaults(run=_bench)
    parsers = {"demo": d, "minimize": m, "bench": b}
    args = parser.parse_args(argv)
    sub_parser = parsers[args.command]
    writes = args.plot if args.command == "bench" else not args.no_plot
    args.out = _check_out(sub_parser, args.out) if writes else None
    try:
        result: int = args.run(args, sub_parser)
        sys.stdout.flush()  # (a closed pipe shows here, not at the interpreter's exit)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        _discard_stdout()
        return 1
    except KeyboardInterrupt:
        print(f"fastoptim {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(
            f"fastoptim {args.command}: error: out of memory (try smaller sizes)", file=sys.stderr
        )
        return 1
    return result


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is left in its
    buffer does not fail again (Python's documented recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a file descriptor (a test's capture)
        pass
