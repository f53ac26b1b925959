"""``fastoptim demo``: train a small NumPy MLP (:mod:`fastoptim.apps.mlp`) on scikit-learn's
handwritten digits (1797 8x8 images that ship inside scikit-learn: nothing is downloaded) once
per optimizer, print a table and plot the loss curves.

Every optimizer starts from the same weights and sees the mini-batches in the same order (both
fixed by ``--seed``), so the curves differ only by the optimizer.  Each run trains with the
fastoptim class; the NumPy reference class of the same name (:mod:`fastoptim.reference`) runs in
lockstep on a copy of the parameters and is fed the same gradients, so the table's step times
compare the two on identical work, and ``max|diff|`` (largest difference between the two final
parameter sets) shows they computed the same thing.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .. import __version__, get_num_threads, isa, reference, schedules, set_num_threads
from .. import optimizers as fast
from .mlp import MLP


@dataclass(frozen=True)
class Spec:
    """An optimizer as the demo names it: the fastoptim class, its options and a default
    learning rate for the digits MLP (mini-batches of 32)."""

    cls: str
    options: dict[str, Any]
    lr: float


# The seed articles' chart (SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam, Nadam), then the
# rest of fastoptim.  Learning rates: from a sweep in factors of ~3 on the default problem
# (batch 32, 20 epochs, seed 0), a value at or next to the lowest final training loss, and at
# least 3x below the first rate that goes unstable.
OPTIMIZERS: dict[str, Spec] = {
    "SGD": Spec("SGD", {}, 0.1),
    "Momentum": Spec("SGD", {"momentum": 0.9}, 0.02),
    "Nesterov": Spec("SGD", {"momentum": 0.9, "nesterov": True}, 0.02),
    "AdaGrad": Spec("Adagrad", {}, 0.02),
    "RMSProp": Spec("RMSprop", {}, 1e-3),
    "Adam": Spec("Adam", {}, 1e-3),
    "NAdam": Spec("NAdam", {}, 2e-3),
    "Adadelta": Spec("Adadelta", {}, 1.0),
    "AdamW": Spec("AdamW", {}, 1e-3),
    "Adamax": Spec("Adamax", {}, 2e-3),
    "RAdam": Spec("RAdam", {}, 3e-3),
    "Lion": Spec("Lion", {}, 1e-4),
    "AMSGrad": Spec("Adam", {"amsgrad": True}, 1e-3),
}
SEED_CHART = ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "NAdam")

SCHEDULES = (
    "constant",
    "step",
    "exponential",
    "inverse_time",
    "linear",
    "cosine",
    "warmup_cosine",
    "onecycle",
)
SCHEDULE_HELP = (
    "constant; step (x0.1 at 1/3 and 2/3 of the updates); exponential (down to lr/100); "
    "inverse_time (lr / (1 + epoch), the 1/t decay); linear (to 0); cosine (to 0); "
    "warmup_cosine (linear warm-up over the first 10%%, then cosine to 0); onecycle "
    "(torch's OneCycleLR with max_lr = lr)"
)


def canonical(name: str) -> str:
    """The :data:`OPTIMIZERS` key for `name`, ignoring case (``nadam`` -> ``NAdam``)."""
    for key in OPTIMIZERS:
        if key.lower() == name.strip().lower():
            return key
    raise KeyError(name)


def make_schedule(
    name: str, lr: float, total_steps: int, steps_per_epoch: int
) -> float | schedules.Schedule:
    """The learning rate of a run of `total_steps` updates: `lr` itself for ``constant``, else a
    :mod:`fastoptim.schedules` schedule starting (or peaking) at `lr`."""
    n = max(1, total_steps)
    if name == "constant":
        return lr
    if name == "step":
        return schedules.multistep(lr, [max(1, n // 3), max(1, 2 * n // 3)], gamma=0.1)
    if name == "exponential":
        return schedules.exponential(lr, gamma=0.01 ** (1.0 / n))
    if name == "inverse_time":
        return schedules.inverse_time(lr, decay_rate=1.0, decay_steps=max(1, steps_per_epoch))
    if name == "linear":
        return schedules.linear(lr, 0.0, n)
    if name == "cosine":
        return schedules.cosine(lr, n)
    if name == "warmup_cosine":
        return schedules.warmup_cosine(lr, n // 10, n)
    if name == "onecycle":
        return schedules.onecycle(lr, n)
    raise ValueError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(seed: int, dtype: Any = np.float32, test_fraction: float = 0.2) -> Data:
    """scikit-learn's digits (no download), split into train and test sets by `seed`
    (stratified by nothing: a random permutation), features standardised with the training
    set's mean and standard deviation."""
    datasets = importlib.import_module("sklearn.datasets")
    digits = datasets.load_digits()
    x = np.asarray(digits.data, dtype=np.float64)
    y = np.asarray(digits.target, dtype=np.intp)
    perm = np.random.default_rng([seed, 0]).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return Data(
        np.ascontiguousarray(x[train], dtype=dtype),
        y[train],
        np.ascontiguousarray(x[test], dtype=dtype),
        y[test],
    )


# ----------------------------------------------------------------------------- training
@dataclass
class Config:
    optimizers: Sequence[str] = SEED_CHART
    epochs: int = 20
    batch_size: int = 32  # 0: the whole training set (full batch)
    lr: float | None = None  # None: each optimizer's default
    schedule: str = "constant"
    seed: int = 0
    hidden: Sequence[int] = (128, 128)
    dtype: Any = np.float32
    reference: bool = True
    threads: int = 1  # fastoptim's threads (see single_threaded_blas for why 1)


@dataclass
class Result:
    name: str
    lr: float
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)  # epoch 0 (initial) .. last
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # forward, backward and fastoptim step
    step_seconds: float = 0.0  # fastoptim steps only
    reference_seconds: float | None = None  # NumPy reference steps (same gradients)
    max_diff: float | None = None  # max |fastoptim - reference| over the final parameters
    diverged_epoch: int | None = None


class Progress:
    """A one-line progress bar on `stream`, redrawn in place when it is a terminal; elsewhere
    (a log, a pipe) one line per finished run.  No dependency."""

    def __init__(self, stream: TextIO | None, width: int = 24) -> None:
        self.stream = stream
        self.tty = stream is not None and stream.isatty()
        self.width = width

    def update(self, label: str, done: int, total: int, info: str) -> None:
        if self.stream is None or not self.tty:
            return
        filled = self.width * done // max(1, total)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r  {label:<9} [{bar}] {done}/{total} epochs  {info}\x1b[K")
        self.stream.flush()

    def finish(self, label: str, info: str) -> None:
        if self.stream is None:
            return
        self.stream.write(("\r" if self.tty else "") + f"  {label:<9} {info}")
        self.stream.write("\x1b[K\n" if self.tty else "\n")
        self.stream.flush()


def batch_size(config: Config, n: int) -> int:
    """Samples per update for a training set of `n`: ``config.batch_size``, at most `n` (0:
    the whole set)."""
    return n if config.batch_size <= 0 else min(config.batch_size, n)


def layer_sizes(data: Data, config: Config) -> list[int]:
    """The MLP's layer widths: the digits' 64 features, the hidden layers, 10 classes."""
    return [data.x_train.shape[1], *config.hidden, 10]


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    if batch_size <= 0 or batch_size >= n:
        return [np.arange(n)]
    perm = rng.permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def train(name: str, data: Data, config: Config, progress: Progress | None = None) -> Result:
    """Train a fresh MLP with optimizer `name` (an :data:`OPTIMIZERS` key) and return its
    curves and timings."""
    spec = OPTIMIZERS[name]
    lr = spec.lr if config.lr is None else config.lr
    n = len(data.y_train)
    bs = batch_size(config, n)
    per_epoch = -(-n // bs)
    total = per_epoch * config.epochs
    net = MLP(
        layer_sizes(data, config),
        rng=np.random.default_rng([config.seed, 1]),
        dtype=config.dtype,
    )
    opt = getattr(fast, spec.cls)(
        net.params, lr=make_schedule(config.schedule, lr, total, per_epoch), **spec.options
    )
    grads: dict[str, np.ndarray] = opt.grads
    ref: Any = None
    if config.reference:
        ref_params = {k: v.copy() for k, v in net.params.items()}
        ref = getattr(reference, spec.cls)(
            ref_params, lr=make_schedule(config.schedule, lr, total, per_epoch), **spec.options
        )
        ref_grads: dict[str, np.ndarray] = ref.grads
    result = Result(name, lr, reference_seconds=0.0 if ref is not None else None)
    shuffle = np.random.default_rng([config.seed, 2])  # same batches for every optimizer
    clock = time.perf_counter

    def evaluate() -> bool:
        result.train_loss.append(net.loss(data.x_train, data.y_train))
        result.test_loss.append(net.loss(data.x_test, data.y_test))
        result.test_acc.append(net.accuracy(data.x_test, data.y_test))
        return math.isfinite(result.train_loss[-1])

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        evaluate()
        for epoch in range(1, config.epochs + 1):
            for idx in _batches(n, bs, shuffle):
                t0 = clock()
                net.loss_and_grad(data.x_train[idx], data.y_train[idx], out=grads)
                t1 = clock()
                opt.step()
                t2 = clock()
                result.train_seconds += t2 - t0
                result.step_seconds += t2 - t1
                result.steps += 1
                if ref is not None:
                    for k, g in grads.items():
                        np.copyto(ref_grads[k], g)
                    t3 = clock()
                    ref.step()
                    result.reference_seconds = (result.reference_seconds or 0.0) + clock() - t3
            ok = evaluate()
            if progress is not None:
                info = f"train loss {result.train_loss[-1]:.4f}"
                progress.update(name, epoch, config.epochs, info)
            if not ok:
                result.diverged_epoch = epoch
                break
        if ref is not None:
            result.max_diff = max(
                float(np.max(np.abs(net.params[k] - ref_params[k]))) for k in net.params
            )
    if progress is not None:
        if result.diverged_epoch is not None:
            summary = f"diverged at epoch {result.diverged_epoch}"
        else:
            summary = (
                f"train loss {result.train_loss[-1]:.4f}, test accuracy "
                f"{100 * result.test_acc[-1]:.2f}%, {result.train_seconds:.2f} s"
            )
        progress.finish(name, summary)
    return result


def single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """BLAS (NumPy's matrix products) limited to one thread, through threadpoolctl (a
    dependency of scikit-learn) when it is installed.

    The MLP's products are tiny (a batch of 32 by 64-128 features), so BLAS threads gain nothing
    there, and after each product OpenBLAS's worker threads keep spinning on the cores for a
    while: an optimizer step that runs OpenMP threads right then waits for a core.  Measured on
    a 2-core machine: a 26K-parameter Adam step took 5 ms instead of 14 us."""
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        return contextlib.nullcontext()
    limits: contextlib.AbstractContextManager[Any] = threadpoolctl.threadpool_limits(
        limits=1, user_api="blas"
    )
    return limits


@contextlib.contextmanager
def threads(config: Config) -> Iterator[None]:
    """BLAS on one thread and fastoptim on ``config.threads`` for the duration (restored
    after).  One thread by default: the MLP's 26K parameters are far below the size where a
    second thread pays, the NumPy reference runs on one core too, and on a loaded machine an
    OpenMP region that has to wait for a busy core turns a 10 us step into milliseconds."""
    before = get_num_threads()
    set_num_threads(config.threads)
    try:
        with single_threaded_blas():
            yield
    finally:
        set_num_threads(before)


# ----------------------------------------------------------------------------- output
def describe(data: Data, config: Config) -> str:
    n = len(data.y_train)
    bs = batch_size(config, n)
    kind = "full batch" if bs == n else ("online" if bs == 1 else "mini-batch")
    sizes = layer_sizes(data, config)
    n_params = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    dtype = np.dtype(config.dtype).name
    return (
        f"digits (scikit-learn, 8x8 images): {n} train / {len(data.y_test)} test, seed "
        f"{config.seed}\nMLP {'-'.join(map(str, sizes))} (ReLU, softmax cross-entropy; "
        f"{n_params:,} {dtype} parameters), batch {bs} ({kind}, {-(-n // bs)} updates/epoch), "
        f"{config.epochs} epochs, schedule {config.schedule}\nfastoptim {__version__}, isa "
        f"{isa()}, {config.threads} thread{'s' if config.threads > 1 else ''}; NumPy's BLAS "
        "on 1 thread"
    )


def _us(seconds: float | None, steps: int) -> str:
    return "-" if seconds is None or steps == 0 else f"{1e6 * seconds / steps:.1f}"


def format_table(results: Sequence[Result]) -> str:
    """One row per optimizer: final training loss (whole training set), test loss and accuracy,
    training wall time, microseconds per optimizer step with fastoptim and with the NumPy
    reference on the same gradients, their ratio, and the largest parameter difference."""
    head = (
        f"{'optimizer':<10}{'lr':>8}{'train loss':>12}{'test loss':>11}{'test acc':>10}"
        f"{'train s':>9}{'step us':>9}{'NumPy us':>10}{'speedup':>9}{'max|diff|':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        speedup = "-"
        if r.reference_seconds is not None and r.step_seconds > 0:
            speedup = f"{r.reference_seconds / r.step_seconds:.1f}x"
        diff = "-" if r.max_diff is None else f"{r.max_diff:.1e}"
        if r.diverged_epoch is not None:
            stats = f"{'diverged at epoch ' + str(r.diverged_epoch):>33}"
        else:
            stats = (
                f"{r.train_loss[-1]:>12.4f}{r.test_loss[-1]:>11.4f}{100 * r.test_acc[-1]:>9.2f}%"
            )
        lines.append(
            f"{r.name:<10}{r.lr:>8.3g}{stats}{r.train_seconds:>9.3f}"
            f"{_us(r.step_seconds, r.steps):>9}{_us(r.reference_seconds, r.steps):>10}"
            f"{speedup:>9}{diff:>11}"
        )
    return "\n".join(lines)


FOOTNOTE = (
    "train/test loss and accuracy after the last epoch (whole sets); train s = forward, backward "
    "and fastoptim step;\nstep us = one fastoptim step; NumPy us = one step of "
    "fastoptim.reference on the same gradients, in lockstep;\nmax|diff| = largest "
    "|fastoptim - reference| over the final parameters."
)


def plot(results: Sequence[Result], path: Path, title: str) -> None:
    """Training loss (log scale) and test accuracy against the epoch, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = np.arange(len(r.train_loss))
        loss = np.asarray(r.train_loss)
        keep = np.isfinite(loss)
        (line,) = ax_loss.plot(epochs[keep], loss[keep], label=r.name, lw=1.6)
        ax_acc.plot(epochs, 100 * np.asarray(r.test_acc), color=line.get_color(), lw=1.6)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    best = max((max(r.test_acc) for r in results if r.test_acc), default=1.0)
    ax_acc.set_ylim(max(0.0, 100 * best - 15), 100.5)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_acc.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(
    config: Config,
    out: Path | None,
    *,
    progress: TextIO | None = sys.stderr,
    echo: Callable[[str], None] = print,
) -> list[Result]:
    """What ``fastoptim demo`` does: train, print the table, write ``demo_loss.png`` into
    directory `out` (None: no plot)."""
    data = load_digits(config.seed, dtype=config.dtype)
    echo(describe(data, config))
    echo("")
    sys.stdout.flush()  # before the progress lines on stderr
    bar = Progress(progress)
    with threads(config):
        results = [train(name, data, config, bar) for name in config.optimizers]
    echo(format_table(results))
    echo("")
    echo(FOOTNOTE)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "demo_loss.png"
        bs = batch_size(config, len(data.y_train))
        plot(
            results,
            path,
            f"MLP {'-'.join(map(str, layer_sizes(data, config)))} on digits, batch {bs}, "
            f"schedule {config.schedule}, seed {config.seed}",
        )
        echo(f"wrote {path}")
    return results
