"""``fastoptim demo``: the lessons of the optimizer articles, on a small NumPy MLP
(:mod:`fastoptim.apps.mlp`) trained on scikit-learn's handwritten digits (1797 8x8 images that
ship inside scikit-learn: nothing is downloaded) or, with ``--dataset fashion-mnist --data-dir
DIR``, on Fashion-MNIST files you already have.

Three lessons (``--lesson``, default ``optimizers``; ``all`` runs the three):

* **optimizers**: SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam and NAdam, twice: each at its
  own tuned learning rate, then all at one common lr (0.001, the articles' Keras code): how
  far apart they end in each setting.
* **batch**: plain SGD with full-batch, mini-batch (32) and online (1 sample) gradient descent:
  updates, wall time and curves on one chart.
* **decay**: plain SGD on noisy mini-batches and single samples, with a constant learning rate
  and with a 1/t decay from a start lr that is too large to keep constant.

Every run starts from the same weights and sees the samples in the same order (both fixed by
``--seed``), so the curves differ only by what the lesson changes.  In the optimizers lesson each
run trains with the fastoptim class while the NumPy reference class of the same name
(:mod:`fastoptim.reference`) runs in lockstep on a copy of the parameters, fed the same
gradients: the table's step times compare the two on identical work, and ``max|diff|`` (largest
difference between the two final parameter sets) shows they computed the same thing.  Each
lesson ends with a reading of what the run shows, computed from its numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .. import __version__, get_num_threads, isa, max_threads, reference, schedules, set_num_threads
from .. import optimizers as fast
from ..engine.schedulefree import ScheduleFreeOptimizer
from . import capped, lookup, plural
from .mlp import MLP


@dataclass(frozen=True)
class Spec:
    """An optimizer as the demo names it: the fastoptim class, its options and a default
    learning rate for the digits MLP (mini-batches of 32)."""

    cls: str
    options: dict[str, Any]
    lr: float


# The articles' comparison (SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam, Nadam), then the
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
    "ASGD": Spec("ASGD", {}, 0.2),  # swept 0.02-0.5 on the digits (10 epochs): best at 0.2
    "ADOPT": Spec("ADOPT", {}, 3e-3),  # swept 3e-4-3e-2 (20 epochs): best loss 1e-2, unstable 3e-2
    # swept 1e-3-3e-2 (20 epochs, evaluated after eval()): lowest train loss at 1e-2 (3e-2:
    # test loss 1.1), lowest test loss at 3e-3
    "AdamWScheduleFree": Spec("AdamWScheduleFree", {}, 3e-3),
    # swept 0.1-3: lowest train loss at 1 (test loss 0.28), diverged at 3, best test loss 0.3
    "SGDScheduleFree": Spec("SGDScheduleFree", {}, 0.3),
    # SparseAdam with dense gradients (every element present): Adam with eps before the bias
    # correction.  Swept 3e-4-1e-2 (20 epochs): lowest train loss at 3e-3 and 1e-2 (4e-4),
    # test loss 0.049 at 3e-3, 0.18 at 1e-2
    "SparseAdam": Spec("SparseAdam", {}, 3e-3),
    # swept 3e-4-0.1 (20 epochs): lowest train and test loss at 1e-3 (3e-3 close), unstable 3e-2
    "LAMB": Spec("LAMB", {}, 1e-3),
    # swept 0.3-100 (20 epochs, trust_coefficient 1e-3): lowest train loss at 1 (best test loss
    # at 0.3), worse at 3, diverged at 10
    "LARS": Spec("LARS", {}, 1.0),
    # Muon updates the weight matrices; the biases (1-D) take AdamW at MUON_BIAS_LR, as torch's
    # Muon documentation recommends (see MuonAndAdamW).
    "Muon": Spec("Muon", {}, 5e-3),  # swept 2e-3-5e-2 (20 epochs): best test loss at 5e-3
    # Adafactor: lr caps the relative step size (rho_t = min(lr, 1/sqrt t), times RMS(p)).
    # Swept 1e-3-0.3 (20 epochs): train loss lowest at 0.1 (2e-5), 4e-5 at 3e-2; test loss
    # lowest at 1e-2 (0.038), 0.041 at 3e-2, 0.15 at 0.1; none diverged
    "Adafactor": Spec("Adafactor", {}, 3e-2),
    # L-BFGS on each mini-batch through a closure, a few line-searched iterations per batch.
    "LBFGS": Spec(
        "LBFGS", {"max_iter": 4, "history_size": 10, "line_search_fn": "strong_wolfe"}, 1.0
    ),
    # Rprop is meant for full batches (--batch-size full): only the gradient's sign moves a
    # weight, and a step size grows while that sign holds, so mini-batch noise defeats it.
    # Swept 1e-4-1e-2 (20 epochs): full batch, lowest test loss at 1e-3 (97.8%, 0.059),
    # training loss 0 from 3e-3; batches of 32, 80-87% at every lr (test loss 5.5-9.8)
    "Rprop": Spec("Rprop", {}, 1e-3),
}
#: other spellings (any case) of :data:`OPTIMIZERS` names, e.g. ``fastoptim bench``'s
ALIASES = {"sgd+momentum": "Momentum"}
MUON_BIAS_LR = 1e-3
COMPARED = ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "NAdam")
COMMON_LR = 1e-3  # the articles' Keras code gives every optimizer lr=0.001
LESSONS = ("optimizers", "batch", "decay", "all")

# The batch lesson: plain SGD, (batch size (0: full batch), lr).  Each batch size at a learning
# rate that suits it (measured on the digits, seed 0): full batch takes a large step (20 updates
# in 20 epochs), online SGD a small one (at 0.1 its single-sample noise keeps it at chance).
BATCH_RUNS: tuple[tuple[int, float], ...] = ((0, 0.5), (32, 0.1), (1, 0.01))
# The decay lesson: plain SGD, (batch size, lr, schedule).  For each batch size, the tuned
# constant lr, a start lr that is too large to keep constant, and that start lr with the 1/t
# decay ("inverse_time": lr / (1 + 9 t / T), lr/10 at the end).  Found by experiment (seeds 0-2,
# 20 epochs): kept constant, 1.0 on mini-batches and 0.03 on single samples diverged or stayed
# near chance in 5 of the 6 runs; decaying from there, SGD trained in all 6 (95-99% test
# accuracy).  Against the tuned constant lr, the decay gave the lower test loss in 3 of the 6
# (both batch sizes on seed 0): the reading says which, run by run.
DECAY_RUNS: tuple[tuple[int, float, str], ...] = (
    (32, 0.1, "constant"),
    (32, 1.0, "constant"),
    (32, 1.0, "inverse_time"),
    (1, 0.01, "constant"),
    (1, 0.03, "constant"),
    (1, 0.03, "inverse_time"),
)

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
    "inverse_time (the 1/t decay lr / (1 + 9 t / T) over the T updates: lr/10 at the end); "
    "linear (to 0); cosine (to 0); warmup_cosine (linear warm-up over the first 10%%, then "
    "cosine to 0); onecycle (torch's OneCycleLR with max_lr = lr)"
)


def canonical(name: str) -> str:
    """The :data:`OPTIMIZERS` key for `name` or an :data:`ALIASES` entry, ignoring case
    (``nadam`` -> ``NAdam``, ``SGD+momentum`` -> ``Momentum``)."""
    return lookup(name, OPTIMIZERS, ALIASES)


def make_schedule(
    name: str, lr: float, total_steps: int, steps_per_epoch: int
) -> float | schedules.Schedule:
    """The learning rate of a run of `total_steps` updates: `lr` itself for ``constant``, else a
    :mod:`fastoptim.schedules` schedule starting (or peaking) at `lr`.  (`steps_per_epoch` is
    kept for callers; no schedule depends on it.)"""
    del steps_per_epoch
    n = max(1, total_steps)
    if name == "constant":
        return lr
    if name == "step":
        return schedules.multistep(lr, [max(1, n // 3), max(1, 2 * n // 3)], gamma=0.1)
    if name == "exponential":
        return schedules.exponential(lr, gamma=0.01 ** (1.0 / n))
    if name == "inverse_time":
        return schedules.inverse_time(lr, decay_rate=9.0, decay_steps=n)
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
DATASETS = ("digits", "fashion-mnist")
FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist"
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataError(ValueError):
    """A data set that cannot be read: missing files, or files that are not what they claim."""


@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "digits (scikit-learn, 8x8 images)"
    classes: int = 10

    @property
    def chance(self) -> float:
        """Accuracy of guessing one class for everything (balanced classes)."""
        return 1.0 / self.classes


def _standardised(
    x_train: np.ndarray, x_test: np.ndarray, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Both sets standardised feature by feature with the training set's mean and std."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return (
        np.ascontiguousarray((x_train - mean) / std, dtype=dtype),
        np.ascontiguousarray((x_test - mean) / std, dtype=dtype),
    )


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
    x_train, x_test = _standardised(x[train], x[test], dtype)
    return Data(x_train, y[train], x_test, y[test])


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: zero bytes, a type code, the number of dimensions, the
    dimensions as big-endian uint32, then the data), gzipped when its name ends in ``.gz``."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # (a corrupted gzip stream: zlib.error)
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: {len(raw) - header} bytes of data, but the header's shape {shape} needs "
            f"{expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def fashion_mnist_files(data_dir: Path | None) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files in `data_dir` (each gzipped or not), or a
    :class:`DataError` that says which are missing and where to get them."""
    where = (
        f"download the four files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the Zalando Research "
        f"repository {FASHION_URL} (folder data/fashion) into a directory and pass it as "
        "--data-dir; fastoptim downloads nothing"
    )
    if data_dir is None:
        raise DataError(f"--dataset fashion-mnist needs --data-dir DIR: {where}")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: not a directory; {where}")
    found, missing = {}, []
    for key, stem in FASHION_FILES.items():
        for name in (stem, stem + ".gz"):
            if (data_dir / name).is_file():
                found[key] = data_dir / name
                break
        else:
            missing.append(stem + "[.gz]")
    if missing:
        raise DataError(f"--data-dir {data_dir}: missing {', '.join(missing)}; {where}")
    return found


def load_fashion_mnist(data_dir: Path | None, dtype: Any = np.float32) -> Data:
    """Fashion-MNIST from the standard IDX files in `data_dir`: the 60,000 training and 10,000
    test images (28x28, flattened to 784 features standardised with the training set's mean and
    standard deviation), labels 0-9."""
    arrays = {key: read_idx(path) for key, path in fashion_mnist_files(data_dir).items()}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise DataError(
                f"Fashion-MNIST {part} files: images {x.shape} and labels {y.shape} do not match "
                "(expected (n, rows, cols) and (n,))"
            )
        if y.min() < 0 or y.max() >= len(FASHION_CLASSES):
            raise DataError(f"Fashion-MNIST {part} labels outside 0-9")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        train, test = ("x".join(map(str, arrays[k].shape[1:])) for k in ("x_train", "x_test"))
        raise DataError(
            f"Fashion-MNIST images: {train} pixels in the train files, {test} in the test files "
            "(both sets need the same image size)"
        )
    x_train, x_test = _standardised(
        arrays["x_train"].reshape(len(arrays["y_train"]), -1).astype(np.float64),
        arrays["x_test"].reshape(len(arrays["y_test"]), -1).astype(np.float64),
        dtype,
    )
    rows, cols = arrays["x_train"].shape[1:]
    return Data(
        x_train,
        arrays["y_train"].astype(np.intp),
        x_test,
        arrays["y_test"].astype(np.intp),
        name=f"Fashion-MNIST ({rows}x{cols} images)",
    )


def load(
    dataset: str,
    seed: int,
    dtype: Any = np.float32,
    data_dir: Path | None = None,
    train_size: int | None = None,
) -> Data:
    """The data set `dataset` (see :data:`DATASETS`); with `train_size`, a random subset of the
    training set of that size (chosen by `seed`)."""
    if dataset == "digits":
        data = load_digits(seed, dtype)
    elif dataset == "fashion-mnist":
        data = load_fashion_mnist(data_dir, dtype)
    else:
        raise ValueError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    if train_size is not None and train_size < len(data.y_train):
        perm = np.random.default_rng([seed, 3]).permutation(len(data.y_train))
        keep = np.sort(perm[:train_size])
        data.x_train = np.ascontiguousarray(data.x_train[keep])
        data.y_train = data.y_train[keep]
    return data


# ----------------------------------------------------------------------------- training
@dataclass
class Config:
    optimizers: Sequence[str] = COMPARED
    epochs: int = 20
    batch_size: int = 32  # 0: the whole training set (full batch)
    lr: float | None = None  # one run's lr; None: the optimizer's tuned lr
    schedule: str = "constant"
    seed: int = 0
    hidden: Sequence[int] = (128, 128)
    dtype: Any = np.float32
    reference: bool = True
    threads: int = 1  # fastoptim's threads (see single_threaded_blas for why 1)
    lrs: Sequence[float | None] = (None, COMMON_LR)  # the optimizers lesson: one view per lr
    lesson: str = "optimizers"
    dataset: str = "digits"
    data_dir: Path | None = None
    train_size: int | None = None  # None: the whole training set


@dataclass
class Result:
    name: str
    lr: float
    batch_size: int = 0  # samples per update
    schedule: str = "constant"
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)  # epoch 0 (initial) .. last
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training seconds so far, per epoch
    train_seconds: float = 0.0  # forward, backward and fastoptim step
    step_seconds: float = 0.0  # fastoptim steps only
    reference_seconds: float | None = None  # NumPy reference steps (same gradients)
    max_diff: float | None = None  # max |fastoptim - reference| over the final parameters
    diverged_epoch: int | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_epoch is not None

    @property
    def accuracy(self) -> float:
        """Final test accuracy in percent."""
        return 100.0 * self.test_acc[-1]


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
        self.stream.write(f"\r  {label:<18} [{bar}] {done}/{total} epochs  {info}\x1b[K")
        self.stream.flush()

    def finish(self, label: str, info: str) -> None:
        if self.stream is None:
            return
        self.stream.write(("\r" if self.tty else "") + f"  {label:<18} {info}")
        self.stream.write("\x1b[K\n" if self.tty else "\n")
        self.stream.flush()


def batch_size(config: Config, n: int) -> int:
    """Samples per update for a training set of `n`: ``config.batch_size``, at most `n` (0:
    the whole set)."""
    return n if config.batch_size <= 0 else min(config.batch_size, n)


def layer_sizes(data: Data, config: Config) -> list[int]:
    """The MLP's layer widths: the data's features, the hidden layers, the classes."""
    return [data.x_train.shape[1], *config.hidden, data.classes]


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    if batch_size <= 0 or batch_size >= n:
        return [np.arange(n)]
    perm = rng.permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def train(
    name: str,
    data: Data,
    config: Config,
    progress: Progress | None = None,
    label: str | None = None,
) -> Result:
    """Train a fresh MLP with optimizer `name` (an :data:`OPTIMIZERS` key) at ``config.lr``
    (None: its tuned lr), batch size and schedule, and return its curves and timings."""
    spec = OPTIMIZERS[name]
    lr = spec.lr if config.lr is None else config.lr
    label = label or name
    n = len(data.y_train)
    bs = batch_size(config, n)
    per_epoch = -(-n // bs)
    total = per_epoch * config.epochs
    net = MLP(
        layer_sizes(data, config),
        rng=np.random.default_rng([config.seed, 1]),
        dtype=config.dtype,
    )
    opt = make_optimizer(
        fast, spec, net.params, make_schedule(config.schedule, lr, total, per_epoch)
    )
    grads: dict[str, np.ndarray] = opt.grads
    closure = spec.cls == "LBFGS"  # step(closure): it evaluates the batch's loss itself
    ref: Any = None
    if config.reference and not closure:  # (reference.LBFGS is fastoptim.LBFGS: no lockstep)
        ref_params = {k: v.copy() for k, v in net.params.items()}
        ref = make_optimizer(
            reference, spec, ref_params, make_schedule(config.schedule, lr, total, per_epoch)
        )
        ref_grads: dict[str, np.ndarray] = ref.grads
    result = Result(name, lr, bs, config.schedule)
    result.reference_seconds = 0.0 if ref is not None else None
    shuffle = np.random.default_rng([config.seed, 2])  # same batches for every optimizer
    clock = time.perf_counter

    def evaluate() -> bool:
        swap = isinstance(opt, ScheduleFreeOptimizer)  # evaluated at the average x
        if swap:
            opt.eval()
        result.train_loss.append(net.loss(data.x_train, data.y_train))
        result.test_loss.append(net.loss(data.x_test, data.y_test))
        result.test_acc.append(net.accuracy(data.x_test, data.y_test))
        result.seconds.append(result.train_seconds)
        if swap:
            opt.train()
        return math.isfinite(result.train_loss[-1])

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        evaluate()
        for epoch in range(1, config.epochs + 1):
            for idx in _batches(n, bs, shuffle):
                t0 = clock()
                xb, yb = data.x_train[idx], data.y_train[idx]
                if closure:  # the step's time includes its evaluations of the batch
                    t1 = clock()
                    opt.step(lambda xb=xb, yb=yb: net.loss_and_grad(xb, yb, out=grads))
                else:
                    net.loss_and_grad(xb, yb, out=grads)
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
                progress.update(label, epoch, config.epochs, info)
            if not ok:
                result.diverged_epoch = epoch
                break
        if ref is not None:
            result.max_diff = max(
                float(np.max(np.abs(net.params[k] - ref_params[k]))) for k in net.params
            )
    if progress is not None:
        if result.diverged:
            summary = f"diverged at epoch {result.diverged_epoch}"
        else:
            summary = (
                f"train loss {result.train_loss[-1]:.4f}, test accuracy "
                f"{result.accuracy:.2f}%, {result.train_seconds:.2f} s"
            )
        progress.finish(label, summary)
    return result


class MuonAndAdamW:
    """Muon for the 2-D parameters (weight matrices) and AdamW for the others (biases), as
    one optimizer: ``grads`` (both groups' buffers, by name) and ``step()``."""

    def __init__(self, module: Any, params: dict[str, np.ndarray], lr: Any) -> None:
        matrices = {k: v for k, v in params.items() if v.ndim == 2}
        others = {k: v for k, v in params.items() if v.ndim != 2}
        self.muon = module.Muon(matrices, lr=lr)
        self.adamw = module.AdamW(others, lr=MUON_BIAS_LR) if others else None
        self.grads: dict[str, np.ndarray] = dict(self.muon.grads)
        if self.adamw is not None:
            self.grads.update(self.adamw.grads)

    def step(self) -> None:
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()


def make_optimizer(module: Any, spec: Spec, params: dict[str, np.ndarray], lr: Any) -> Any:
    """`spec`'s optimizer from `module` (fastoptim or fastoptim.reference) over `params`."""
    if spec.cls == "Muon":
        return MuonAndAdamW(module, params, lr)
    return getattr(module, spec.cls)(params, lr=lr, **spec.options)


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


# ----------------------------------------------------------------------------- lessons
def view_title(lr: float | None) -> str:
    return "each optimizer at its tuned lr" if lr is None else f"every optimizer at lr {lr:g}"


def compare_optimizers(data: Data, config: Config, bar: Progress) -> list[list[Result]]:
    """The optimizers lesson: every optimizer once per entry of ``config.lrs`` (a run that
    two views share, an optimizer tuned at the common lr, is trained once)."""
    done: dict[tuple[str, float], Result] = {}
    views = []
    for view_lr in config.lrs:
        view = []
        for name in config.optimizers:
            lr = OPTIMIZERS[name].lr if view_lr is None else view_lr
            if (name, lr) not in done:
                cfg = dataclasses.replace(config, lr=lr)
                done[name, lr] = train(name, data, cfg, bar, f"{name} lr {lr:g}")
            view.append(done[name, lr])
        views.append(view)
    return views


def batch_kind(bs: int, n: int) -> str:
    if bs >= n:
        return "full batch"
    return "online" if bs == 1 else f"mini-batch {bs}"


def run_label(r: Result, n: int, *, lr: bool = True) -> str:
    text = batch_kind(r.batch_size, n)
    if lr:
        text += f", {'1/t decay from' if r.schedule == 'inverse_time' else 'lr'} {r.lr:g}"
    return text


def batch_lesson(data: Data, config: Config, bar: Progress) -> list[Result]:
    """Plain SGD with full-batch, mini-batch and online gradient descent (:data:`BATCH_RUNS`)."""
    n = len(data.y_train)
    out = []
    for bs, lr in BATCH_RUNS:
        cfg = dataclasses.replace(
            config, batch_size=bs, lr=lr, schedule="constant", reference=False
        )
        out.append(train("SGD", data, cfg, bar, batch_kind(batch_size(cfg, n), n)))
    return out


def decay_lesson(data: Data, config: Config, bar: Progress) -> list[Result]:
    """Plain SGD, constant vs decaying learning rate, on noisy batches (:data:`DECAY_RUNS`)."""
    n = len(data.y_train)
    out = []
    for bs, lr, schedule in DECAY_RUNS:
        cfg = dataclasses.replace(config, batch_size=bs, lr=lr, schedule=schedule, reference=False)
        r = Result("SGD", lr, batch_size(cfg, n), schedule)
        out.append(train("SGD", data, cfg, bar, run_label(r, n)))
    return out


# ----------------------------------------------------------------------------- reading
def _trend(r: Result) -> str:
    """How the training loss moved over the last quarter of the epochs."""
    q = max(1, (len(r.train_loss) - 1) // 4)
    before, last = r.train_loss[-1 - q], r.train_loss[-1]
    if not (before > 0 and math.isfinite(before)):
        return ""
    change = last / before - 1
    what = "still falling" if change < -0.1 else ("flat" if change <= 0.1 else "rising")
    last_epochs = "the last epoch" if q == 1 else f"the last {q} epochs"
    return f"training loss {what}: {100 * change:+.0f}% over {last_epochs}"


def _state(r: Result, data: Data) -> str:
    if r.diverged:
        return f"diverged at epoch {r.diverged_epoch}"
    if r.accuracy < 100 * data.chance + 5:
        return f"{r.accuracy:.1f}%, at chance level ({100 * data.chance:.0f}%)"
    return f"{r.accuracy:.1f}%"


def read_view(results: Sequence[Result], data: Data, lr: float | None) -> str:
    """One sentence on one view of the optimizers lesson, from its numbers."""
    ok = [r for r in results if not r.diverged]
    text = f"- {view_title(lr)}: "
    if not ok:
        return text + "every run diverged."
    best = max(r.accuracy for r in ok)
    worst = min(r.accuracy for r in ok)
    if len(ok) > 1:
        text += f"test accuracy {worst:.1f}-{best:.1f}% (spread {best - worst:.1f} points); "
    leaders = sorted((r for r in ok if r.accuracy >= best - 0.5), key=lambda r: -r.accuracy)
    text += f"best {leaders[0].name} {leaders[0].accuracy:.1f}%"
    if len(leaders) > 1:
        text += f", within 0.5 points of it: {', '.join(r.name for r in leaders[1:])}"
    behind = sorted((r for r in ok if r.accuracy < best - 2), key=lambda r: r.accuracy)
    if behind:
        text += "; more than 2 points behind: " + "; ".join(
            f"{r.name} {_state(r, data)} ({_trend(r)})" for r in behind
        )
    elif len(ok) > 1:
        text += "; none more than 2 points behind"
    diverged = [r for r in results if r.diverged]
    if diverged:
        text += "; diverged: " + ", ".join(f"{r.name} (epoch {r.diverged_epoch})" for r in diverged)
    if len(ok) > 1:
        text += ".\n  Final training loss, lowest first: " + " < ".join(
            f"{r.name} {r.train_loss[-1]:.2g}" for r in sorted(ok, key=lambda r: r.train_loss[-1])
        )
    return text + "."


def _lr_name(lr: float | None) -> str:
    return "its tuned lr" if lr is None else f"lr {lr:g}"


def read_optimizers(
    views: Sequence[Sequence[Result]], lrs: Sequence[float | None], data: Data
) -> str:
    lines = [read_view(v, data, lr) for v, lr in zip(views, lrs)]
    if len(views) >= 2:
        first = {r.name: r for r in views[0]}
        for view, lr in zip(views[1:], lrs[1:]):
            changes, same = [], []
            for r in view:
                r0 = first.get(r.name)
                if r0 is None:
                    continue
                if r0.lr == r.lr:
                    same.append(r.name)
                elif r.diverged or r0.diverged:
                    changes.append((-math.inf if r.diverged else math.inf, r.name, r0, r))
                else:
                    changes.append((r.accuracy - r0.accuracy, r.name, r0, r))
            changes.sort(key=lambda c: c[0])
            moved = [c for c in changes if not abs(c[0]) <= 1]
            text = f"- from {_lr_name(lrs[0])} to {_lr_name(lr)}: "
            if moved:
                text += ", ".join(
                    f"{name} {'diverged' if r.diverged else f'{d:+.1f} points'} "
                    f"(lr {r0.lr:g} -> {r.lr:g})"
                    for d, name, r0, r in moved
                )
            else:
                text += "no optimizer moved by more than 1 point"
            steady = [c[1] for c in changes if abs(c[0]) <= 1]
            if steady and moved:
                text += f"; within 1 point: {', '.join(steady)}"
            if same:
                shared = lr if lr is not None else lrs[0]  # (the views' lrs differ)
                text += f"; {', '.join(same)} already tuned at {shared:g} (same run)"
            lines.append(text + ".")
    return "\n".join(lines)


def _reach(r: Result, target: float) -> tuple[int, float] | None:
    """(epoch, training seconds) when `r` first reached `target` % test accuracy."""
    for epoch, (acc, secs) in enumerate(zip(r.test_acc, r.seconds)):
        if 100 * acc >= target:
            return epoch, secs
    return None


def read_batch(results: Sequence[Result], data: Data) -> str:
    n = len(data.y_train)
    lines = [
        "- "
        + "; ".join(
            f"{run_label(r, n)}: {plural(r.steps, 'update')} in {r.train_seconds:.2f} s, "
            f"{_state(r, data)}"
            for r in results
        )
        + "."
    ]
    ok = [r for r in results if not r.diverged and len(r.train_loss) > 1]
    if len(ok) > 1:
        first = sorted(ok, key=lambda r: r.train_loss[1])
        lines.append(
            "- after one epoch (one pass over the data), training loss: "
            + " < ".join(f"{batch_kind(r.batch_size, n)} {r.train_loss[1]:.4f}" for r in first)
            + "."
        )
        target = min(95.0, math.floor(min(r.accuracy for r in ok)))
        reached = [(x, r) for r in ok if (x := _reach(r, target)) is not None]
        reached.sort(key=lambda xr: xr[0][1])
        lines.append(
            f"- first to {target:g}% test accuracy in training time: "
            + ", ".join(
                f"{batch_kind(r.batch_size, n)} {secs:.3f} s (epoch {epoch})"
                for (epoch, secs), r in reached
            )
            + "."
        )
    return "\n".join(lines)


def read_decay(results: Sequence[Result], data: Data) -> str:
    n = len(data.y_train)
    lines = []
    for bs in dict.fromkeys(r.batch_size for r in results):
        group = [r for r in results if r.batch_size == bs]
        text = f"- {batch_kind(bs, n)}: " + "; ".join(
            f"{run_label(r, n).split(', ', 1)[1]} -> {_state(r, data)}"
            + ("" if r.diverged else f", test loss {r.test_loss[-1]:.3f}")
            for r in group
        )
        decayed = [r for r in group if r.schedule != "constant"]
        constant = [r for r in group if r.schedule == "constant" and not r.diverged]
        if decayed and constant and not decayed[0].diverged:
            d = decayed[0]
            best = min(constant, key=lambda r: r.test_loss[-1])
            if d.test_loss[-1] < best.test_loss[-1]:
                text += (
                    f". The decay from {d.lr:g} gives the lowest test loss, "
                    f"{d.test_loss[-1]:.3f} against {best.test_loss[-1]:.3f} for the best "
                    f"constant lr ({best.lr:g})"
                )
            else:
                text += (
                    f". Here the decay from {d.lr:g} does not beat the constant lr {best.lr:g} "
                    f"(test loss {d.test_loss[-1]:.3f} vs {best.test_loss[-1]:.3f})"
                )
        lines.append(text + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output
def describe(data: Data, config: Config) -> str:
    n = len(data.y_train)
    sizes = layer_sizes(data, config)
    n_params = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    dtype = np.dtype(config.dtype).name
    if config.lesson == "optimizers":
        bs = batch_size(config, n)
        kind = "full batch" if bs == n else ("online" if bs == 1 else "mini-batch")
        run = (
            f"batch {bs} ({kind}, {plural(-(-n // bs), 'update')}/epoch), "
            f"{plural(config.epochs, 'epoch')}, schedule {config.schedule}"
        )
    else:
        run = plural(config.epochs, "epoch")
    threads = min(config.threads, max_threads())  # (set_num_threads caps it there)
    return (
        f"{data.name}: {n} train / {len(data.y_test)} test, seed "
        f"{config.seed}\nMLP {'-'.join(map(str, sizes))} (ReLU, softmax cross-entropy; "
        f"{n_params:,} {dtype} parameters), {run}\nfastoptim {__version__}, isa "
        f"{isa()}, {plural(threads, 'thread')}{capped(config.threads)}; NumPy's BLAS on 1 thread"
    )


def _us(seconds: float | None, steps: int) -> str:
    return "-" if seconds is None or steps == 0 else f"{1e6 * seconds / steps:.1f}"


def _stats(r: Result) -> str:
    if r.diverged:
        return f"{'diverged at epoch ' + str(r.diverged_epoch):>33}"
    return f"{r.train_loss[-1]:>12.4f}{r.test_loss[-1]:>11.4f}{r.accuracy:>9.2f}%"


def format_table(results: Sequence[Result]) -> str:
    """One row per optimizer: final training loss (whole training set), test loss and accuracy,
    training wall time, microseconds per optimizer step with fastoptim and with the NumPy
    reference on the same gradients, their ratio, and the largest parameter difference."""
    w = max([10, *(len(r.name) + 1 for r in results)])  # the names' column
    head = (
        f"{'optimizer':<{w}}{'lr':>8}{'train loss':>12}{'test loss':>11}{'test acc':>10}"
        f"{'train s':>9}{'step us':>9}{'NumPy us':>10}{'speedup':>9}{'max|diff|':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        speedup = "-"
        if r.reference_seconds is not None and r.step_seconds > 0:
            speedup = f"{r.reference_seconds / r.step_seconds:.1f}x"
        diff = "-" if r.max_diff is None else f"{r.max_diff:.1e}"
        lines.append(
            f"{r.name:<{w}}{r.lr:>8.3g}{_stats(r)}{r.train_seconds:>9.3f}"
            f"{_us(r.step_seconds, r.steps):>9}{_us(r.reference_seconds, r.steps):>10}"
            f"{speedup:>9}{diff:>11}"
        )
    return "\n".join(lines)


def format_runs(results: Sequence[Result], n: int) -> str:
    """The batch and decay lessons' table: one row per SGD run."""
    head = (
        f"{'run':<18}{'batch':>6}{'lr':>7}{'schedule':>13}{'updates':>9}{'train loss':>12}"
        f"{'test loss':>11}{'test acc':>10}{'train s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{batch_kind(r.batch_size, n):<18}{r.batch_size:>6}{r.lr:>7.3g}{r.schedule:>13}"
            f"{r.steps:>9,}{_stats(r)}{r.train_seconds:>9.3f}"
        )
    return "\n".join(lines)


FOOTNOTE = (
    "train/test loss and accuracy after the last epoch (whole sets); train s = forward, backward "
    "and fastoptim step;\nstep us = one fastoptim step; NumPy us = one step of "
    "fastoptim.reference on the same gradients, in lockstep;\nmax|diff| = largest "
    "|fastoptim - reference| over the final parameters."
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(ax_loss: Any, ax_acc: Any, r: Result, label: str, **style: Any) -> None:
    epochs = np.arange(len(r.train_loss))
    loss = np.asarray(r.train_loss)
    keep = np.isfinite(loss)
    (line,) = ax_loss.plot(epochs[keep], loss[keep], label=label, lw=1.6, **style)
    style.setdefault("color", line.get_color())
    ax_acc.plot(epochs, 100 * np.asarray(r.test_acc), label=label, lw=1.6, **style)


def _axes(ax_loss: Any, ax_acc: Any, data: Data, x: str = "epoch") -> None:
    import matplotlib.ticker

    ax_loss.set_yscale("log")
    ax_loss.set_xlabel(x)
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_ylim(0, 101)  # from 0: a run at chance level stays on the chart
    ax_acc.axhline(100 * data.chance, color="gray", ls=":", lw=1)
    ax_acc.text(0, 100 * data.chance + 1, f"chance ({100 * data.chance:.0f}%)", fontsize=7)
    ax_acc.grid(True, alpha=0.3)
    for ax in (ax_loss, ax_acc):
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def plot_optimizers(
    views: Sequence[Sequence[Result]],
    lrs: Sequence[float | None],
    data: Data,
    path: Path,
    title: str,
) -> None:
    """One row per view: training loss (log scale) and test accuracy against the epoch, one
    line per optimizer, its lr in the legend."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(views), 2, figsize=(10, 3.6 * len(views)), squeeze=False)
    for (ax_loss, ax_acc), view, lr in zip(axes, views, lrs):
        for r in view:
            _curves(ax_loss, ax_acc, r, f"{r.name} (lr {r.lr:g})")
        _axes(ax_loss, ax_acc, data)
        ax_loss.set_title(view_title(lr), fontsize=9)
        ax_acc.set_title(view_title(lr), fontsize=9)
        ax_acc.legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_batch(results: Sequence[Result], data: Data, path: Path, title: str) -> None:
    """Training loss against the epoch and against training seconds, test accuracy against the
    epoch: one line per batch size."""
    plt = _pyplot()
    n = len(data.y_train)
    fig, (ax_loss, ax_time, ax_acc) = plt.subplots(1, 3, figsize=(13, 3.9))
    for r in results:
        label = f"{run_label(r, n)} ({plural(r.steps, 'update')})"
        _curves(ax_loss, ax_acc, r, label)
        loss = np.asarray(r.train_loss)
        keep = np.isfinite(loss)
        ax_time.plot(np.asarray(r.seconds)[keep], loss[keep], lw=1.6, marker=".", label=label)
    _axes(ax_loss, ax_acc, data)
    ax_time.set_xscale("symlog", linthresh=1e-2)
    ax_time.set_yscale("log")
    ax_time.set_xlabel("training seconds (wall time)")
    ax_time.set_ylabel("training loss")
    ax_time.grid(True, which="both", alpha=0.3)
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_decay(results: Sequence[Result], data: Data, path: Path, title: str) -> None:
    """One row per batch size: training loss and test accuracy against the epoch, constant
    learning rates solid, decaying ones dashed."""
    plt = _pyplot()
    n = len(data.y_train)
    sizes = list(dict.fromkeys(r.batch_size for r in results))
    fig, axes = plt.subplots(len(sizes), 2, figsize=(10, 3.6 * len(sizes)), squeeze=False)
    for (ax_loss, ax_acc), bs in zip(axes, sizes):
        for r in (r for r in results if r.batch_size == bs):
            ls = "-" if r.schedule == "constant" else "--"
            _curves(ax_loss, ax_acc, r, run_label(r, n).split(", ", 1)[1], ls=ls)
        _axes(ax_loss, ax_acc, data)
        ax_loss.set_title(f"SGD, {batch_kind(bs, n)}", fontsize=9)
        ax_acc.set_title(f"SGD, {batch_kind(bs, n)}", fontsize=9)
        ax_acc.legend(fontsize=7, loc="lower right")
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
) -> dict[str, list[Result]]:
    """What ``fastoptim demo`` does: run the lesson(s) of ``config.lesson``, print their tables
    and readings, write their charts into directory `out` (None: no charts).  Returns the runs
    by lesson."""
    data = load(config.dataset, config.seed, config.dtype, config.data_dir, config.train_size)
    n = len(data.y_train)
    lessons = LESSONS[:-1] if config.lesson == "all" else (config.lesson,)
    echo(describe(data, config))
    sys.stdout.flush()  # before the progress lines on stderr
    bar = Progress(progress)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    shape = f"MLP {'-'.join(map(str, layer_sizes(data, config)))} on {data.name.split(' (')[0]}"
    written: list[Path] = []
    results: dict[str, list[Result]] = {}
    with threads(config):
        for lesson in lessons:
            echo("")
            if lesson == "optimizers":
                views = compare_optimizers(data, config, bar)
                for view, lr in zip(views, config.lrs):
                    echo(f"{view_title(lr)[0].upper()}{view_title(lr)[1:]}:")
                    echo(format_table(view))
                    echo("")
                echo(FOOTNOTE)
                echo("\nWhat this run shows:")
                echo(read_optimizers(views, config.lrs, data))
                results[lesson] = [r for v in views for r in v]
                if out is not None:
                    written.append(out / "demo_loss.png")
                    bs = batch_size(config, n)
                    plot_optimizers(
                        views,
                        config.lrs,
                        data,
                        written[-1],
                        f"{shape}, batch {bs}, schedule {config.schedule}, seed {config.seed}",
                    )
            else:  # batch or decay: plain SGD runs, a table, a reading, a chart
                title, run, read, plot, caption = {
                    "batch": (
                        "Batch, mini-batch and online gradient descent (plain SGD):",
                        batch_lesson,
                        read_batch,
                        plot_batch,
                        f"{shape}, SGD, seed {config.seed}",
                    ),
                    "decay": (
                        "Constant vs decaying learning rate (plain SGD, 1/t decay to lr/10):",
                        decay_lesson,
                        read_decay,
                        plot_decay,
                        f"{shape}, seed {config.seed}",
                    ),
                }[lesson]
                echo(title)
                runs = run(data, config, bar)
                echo(format_runs(runs, n))
                echo("\nWhat this run shows:")
                echo(read(runs, data))
                results[lesson] = runs
                if out is not None:
                    written.append(out / f"demo_{lesson}.png")
                    plot(runs, data, written[-1], caption)
    if written:
        echo("")
    for path in written:
        echo(f"wrote {path}")
    return results
