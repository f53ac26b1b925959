"""Regression tests for the second audit of the ``fastoptim`` command (demo, minimize, bench):
every test failed before its fix.  Tiny sizes only: the whole file runs in seconds."""

from __future__ import annotations

import functools
import gzip
import re
import signal
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fastoptim as fo
from fastoptim.apps import bench, cli, demo, minimize, plural

QUICK_BENCH = ["bench", "--workloads", "mlp", "--rounds", "1", "--repeats", "1", "--no-torch", "-q"]
TINY_DEMO = ["demo", "--epochs", "1", "--hidden", "8", "--train-size", "100", "--no-plot", "-q"]


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    """bench --threads sets fastoptim's thread count for the process: put it back."""
    threads = fo.get_num_threads()
    yield
    fo.set_num_threads(threads)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The error line of a command-line mistake: exit code 2, nothing run (no stdout)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    error = captured.err.splitlines()[-1]
    assert error.startswith(f"fastoptim {argv[0]}: error: "), error
    return error


def _needs(module: str) -> None:
    pytest.importorskip(module)


# ------------------------------------------------------------------- 1, 2: minimize's stops
def test_a_step_that_does_not_move_is_not_convergence() -> None:
    x2 = minimize.FUNCTIONS["x2"]
    adopt = minimize.minimize(x2, "ADOPT")  # its first step only initialises its state
    assert adopt.status == "converged" and adopt.iterations > 1
    assert adopt.distance() is not None and adopt.distance() < 1e-3  # type: ignore[operator]
    rprop = minimize.minimize(x2, "Rprop")  # skips the step where the gradient flips sign
    assert rprop.status == "converged" and rprop.distance() < 1e-3  # type: ignore[operator]
    at_minimum = minimize.minimize(x2, "SGD", start=[0.0])  # zero gradient: done at once
    assert at_minimum.status == "converged" and at_minimum.iterations == 1


def test_start_beyond_the_divergence_bound(capsys: pytest.CaptureFixture[str]) -> None:
    error = _usage_error(["minimize", "--functions", "x2", "--start", "1e7", "--no-plot"], capsys)
    assert "argument --start: each coordinate must lie within +-1e+06" in error
    with pytest.raises(ValueError, match="within"):
        minimize.minimize(minimize.FUNCTIONS["x2"], "SGD", start=[1e300])
    args = ["minimize", "--functions", "x2", "--optimizers", "SGD", "--no-sweep", "--no-plot"]
    assert cli.main([*args, "--start", "1e6"]) == 0  # on the bound: converges
    assert re.search(r"^SGD .* converged$", capsys.readouterr().out, re.M)


# ------------------------------------------------------------------- 3, 4: threads
def test_threads_beyond_the_maximum_are_capped_and_said(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _needs("sklearn")
    most = plural(fo.max_threads(), "thread")
    assert cli.main([*TINY_DEMO, "--optimizers", "sgd", "--lr", "0.1", "--threads", "1000000"]) == 0
    assert f"{most} (--threads 1000000 capped at the maximum)" in capsys.readouterr().out
    assert cli.main([*QUICK_BENCH, "--optimizers", "sgd", "--threads", "1000000"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"threads={fo.max_threads()} (--threads 1000000 capped at the maximum) " in header
    assert f" cpus={fo.available_cpus()}, " in header
    assert "median and range of 1 interleaved round (" in header
    assert "each sample timing a block of 1 call (" in header


def test_thread_table(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    error = _usage_error(["bench", "--threads", "1", "--background-load", "0"], capsys)
    assert "--threads 1 leaves nothing to compare" in error
    fo.set_num_threads(1)  # a default of 1: two columns of 1 thread, each with its own samples
    (row,) = bench.thread_scaling(sizes=(1000,), rounds=3, repeats=1)
    assert len(row.one) == len(row.default) == 3
    table = bench.format_threads([row], 1, 1)
    assert "1 busy background process(es):" in table and "3 interleaved samples" in table
    assert "1 thread (default)" in table
    fo.set_num_threads(2)
    small = functools.partial(bench.thread_scaling, sizes=(1000,))
    monkeypatch.setattr(bench, "thread_scaling", small)
    assert cli.main([*QUICK_BENCH, "--optimizers", "sgd", "--background-load", "0"]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert re.match(r"bench took \d+ s$", lines[-1])  # after the thread table
    (head,) = [i for i, line in enumerate(lines) if "2 threads (default)" in line]
    assert lines[head + 1].lstrip().startswith("1,000 ")


# ------------------------------------------------------------------- 5: demo --lr
def test_demo_views_in_any_order(capsys: pytest.CaptureFixture[str]) -> None:
    _needs("sklearn")
    argv = [*TINY_DEMO, "--optimizers", "sgd,adam", "--lr", "0.001,tuned", "--no-reference"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "- from lr 0.001 to its tuned lr: " in out
    assert "Adam already tuned at 0.001 (same run)" in out


# ------------------------------------------------------------------- 6: --out
def test_out_is_created_and_written_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    for command in ("demo", "minimize"):
        error = _usage_error([command, "--out", "/proc/fastoptim-audit"], capsys)
        assert "argument --out: cannot write into /proc/fastoptim-audit" in error
    error = _usage_error(["bench", "--plot", "--out", "/proc/fastoptim-audit"], capsys)
    assert "argument --out: cannot write into" in error
    new = tmp_path / "a" / "b"
    with pytest.raises(SystemExit):  # an option's own mistake is found first: nothing made
        cli.main(["minimize", "--out", str(new), "--lr", "0"])
    capsys.readouterr()
    assert not new.exists()
    _needs("matplotlib")
    args = ["minimize", "--functions", "x2", "--optimizers", "sgd", "--no-sweep"]
    assert cli.main([*args, "--out", str(new)]) == 0
    assert [p.name for p in new.iterdir()] == ["minimize_x2.png"]


# ------------------------------------------------------------------- 7, 8: pipes and Ctrl-C
@pytest.mark.parametrize(
    "argv",
    [
        ["minimize", "--functions", "x2", "--no-plot"],
        ["bench", "--optimizers", "sgd", "--workloads", "mlp", "--rounds", "1", "--no-torch"],
    ],
    ids=lambda argv: argv[0],
)
def test_closed_pipe_ends_quietly(argv: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastoptim", *argv, "-q" if argv[0] == "bench" else "--no-sweep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line (| head -0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err == b"", err.decode()


def test_ctrl_c_keeps_the_rows_measured() -> None:
    argv = ["bench", "--optimizers", "sgd,adam,adamw,nadam", "--workloads", "mlp"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastoptim", *argv, "--rounds", "50", "--no-torch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # progress: the second cell starts when the first is measured
        if "[2/4]" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "fastoptim bench: interrupted" in err
    assert "\ninterrupted: the 1 row measured so far\n" in out or "the 2 rows" in out
    assert re.search(r"^SGD +12 ", out, re.M) and "bench took" not in out


# ------------------------------------------------------------------- 9: Fashion-MNIST files
def _idx(path: Path, array: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    raw = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw, compresslevel=0) if path.suffix == ".gz" else raw)


def _fashion(where: Path, test_side: int = 4, gz: bool = False) -> Path:
    where.mkdir()
    labels = np.arange(6) % 10
    _idx(where / ("train-images-idx3-ubyte" + ".gz" * gz), np.zeros((6, 4, 4)))
    _idx(where / "train-labels-idx1-ubyte", labels)
    _idx(where / "t10k-images-idx3-ubyte", np.zeros((6, test_side, test_side)))
    _idx(where / "t10k-labels-idx1-ubyte", labels)
    return where


def test_bad_fashion_mnist_files_are_data_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["demo", "--dataset", "fashion-mnist", "--no-plot", "-q", "--data-dir"]
    sizes = _fashion(tmp_path / "sizes", test_side=3)
    error = _usage_error([*args, str(sizes)], capsys)
    assert "4x4 pixels in the train files, 3x3 in the test files" in error
    corrupt = _fashion(tmp_path / "gz", gz=True)
    path = corrupt / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[11] ^= 0xFF  # the stored block's length: a corrupted deflate stream
    path.write_bytes(bytes(raw))
    with pytest.raises(zlib.error):  # (what gzip raised, uncaught)
        gzip.decompress(bytes(raw))
    error = _usage_error([*args, str(corrupt)], capsys)
    assert f"cannot read {path}: Error -3" in error


# ------------------------------------------------------------------- 10: memory
def test_demo_hidden_beyond_memory(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")  # (without the demo extra, the demo says that first)
    error = _usage_error(["demo", "--no-plot", "--hidden", str(10**11)], capsys)
    assert "argument --hidden: needs at least" in error


def test_sizes_beyond_memory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    error = _usage_error(["bench", "--transforms", "--size", str(10**14)], capsys)
    assert "argument --size: needs at least" in error and "GiB of memory" in error

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(minimize, "main", no_memory)
    assert cli.main(["minimize", "--no-plot"]) == 1
    assert (
        capsys.readouterr().err == "fastoptim minimize: error: out of memory (try smaller sizes)\n"
    )


# ------------------------------------------------------------------- 11, 15, 16: options
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["bench", "--rows", "--muon"], "argument --muon: not allowed with argument --rows"),
        (["bench", "--layouts", "--transforms"], "not allowed with argument --layouts"),
        (["bench", "--muon", "--optimizers", "sgd"], "--optimizers: only for the optimizer tab"),
        (["bench", "--adafactor", "--workloads", "mlp"], "--workloads: only for the optimizer"),
        (["bench", "--rows", "--size", "10"], "--size: only with --layouts or --transforms"),
        (["bench", "--optimizers", "nesterov"], "unknown nesterov (choose from SGD, SGD+mom"),
        (["bench", "--optimizers", "Muon"], "; Muon: see --muon"),
        (["demo", "--optimizers", "adam,adamm"], "unknown adamm (choose from SGD, Momentum"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bench_options_that_do_not_go_together(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert words in _usage_error(argv, capsys)


def test_missing_dependencies_are_usage_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, installed or not
    error = _usage_error(["minimize", "--functions", "x2"], capsys)
    assert "needs matplotlib: pip install 'fastoptim[demo]'" in error
    assert cli.main(["minimize", "--functions", "x2", "--no-plot", "--no-sweep"]) == 0
    capsys.readouterr()
    assert "--plot needs matplotlib" in _usage_error(["bench", "--plot"], capsys)
    assert "needs matplotlib" in _usage_error(["demo", "--dataset", "fashion-mnist"], capsys)


def test_one_set_of_optimizer_names(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["minimize", "--functions", "x2,X2,x^2", "--no-sweep", "--no-plot", "--optimizers"]
    assert cli.main([*args, "SGD+Momentum,rprop,adam,ADAM,sgd,momentum"]) == 0
    out = capsys.readouterr().out
    names = re.findall(r"^(\w+) +[\d.e-]+ +\d+ ", out, re.M)
    assert names == ["Momentum", "Rprop", "Adam", "SGD"]  # each once, in order; one table
    assert out.count("x2: f(x) = x^2") == 1
    assert cli.main([*QUICK_BENCH, "--optimizers", "momentum,adagrad,RMSPROP,sgd,SGD"]) == 0
    rows = re.findall(r"^(\S+) +\d+ +[\d.]+ [mu]s", capsys.readouterr().out, re.M)
    assert rows == ["SGD+momentum", "Adagrad", "RMSprop", "SGD"]
    assert cli.main([*QUICK_BENCH, "--optimizers", "sgd", "--workloads", "mlp,MLP"]) == 0
    assert capsys.readouterr().out.count("mlp: 6 tensor(s)") == 1


def test_rprop_in_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    _needs("sklearn")
    assert "Rprop" in demo.OPTIMIZERS and demo.canonical("RPROP") == "Rprop"
    argv = [*TINY_DEMO, "--optimizers", "rprop", "--batch-size", "full", "--lr", "tuned"]
    assert cli.main(argv) == 0
    row = re.search(r"^Rprop +0\.001 .* ([\d.]+e[-+]\d+)$", capsys.readouterr().out, re.M)
    assert row is not None and float(row.group(1)) < 1e-5  # the NumPy reference agrees


# ------------------------------------------------------------------- 12, 18: bench's texts
def test_layout_problems_name_their_contender() -> None:
    row = bench.Row("torch fused bf16", "layouts", 1 << 22, 1, 2, bpe=14, rounds=1)
    row.contender = "torch fused bf16"
    row.times = {"fastoptim": 1.0, "roofline": 1e-3}  # 58 MB in 1 s: below 1 GB/s
    row.low, row.high = dict(row.times), dict(row.times)
    row.steps = {"fastoptim": 1, "roofline": 1}
    (found,) = bench.problems(row, 1e-9)
    assert found.startswith("torch fused bf16 below 1 GB/s")
    result = bench.run_layouts(
        4096, repeats=1, rounds=1, torch=False, compute_size=4096, compute_samples=1
    )
    who = {r.optimizer: r.contender for r in result.rows}
    assert who["cast around fp32 step"] == "cast around fp32 step" and who["fp32"] == "fastoptim"
    table = bench.format_layouts(result)
    assert "are set for 16,777,216+ elements (the default --size); at 4,096 elements" in table


def test_bench_help_is_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for internal in ("TWO_PASS", "run_layouts", "LAYOUTS", "_core", "stream_mixed"):
        assert internal not in text, internal
    assert "[--layouts | --rows | --transforms | --muon | --adafactor]" in " ".join(text.split())


# ------------------------------------------------------------------- 19: cosmetics
def test_long_names_keep_the_columns() -> None:
    r = demo.Result("AdamWScheduleFree", 3e-3, 32, train_loss=[1.0], test_loss=[1.0])
    r.test_acc = [0.5]
    head, _, line = demo.format_table([r]).splitlines()
    assert line.index("0.003") + 5 == head.index("lr") + 2  # lr right-aligned under its header
    run = minimize.minimize(minimize.FUNCTIONS["x2"], "AdamWScheduleFree")
    _, head, _, line = minimize.format_runs([run]).splitlines()
    assert line.index(f"{run.lr:g}") + len(f"{run.lr:g}") == head.index("lr") + 2


def test_singular_words() -> None:
    data = demo.Data(np.zeros((1, 64)), np.zeros(1, int), np.zeros((1, 64)), np.zeros(1, int))
    text = demo.describe(data, demo.Config(epochs=1, batch_size=0, hidden=(4,)))
    assert "batch 1 (full batch, 1 update/epoch), 1 epoch, schedule constant" in text
    assert "1 thread;" in text
    r = demo.Result("SGD", 0.1, train_loss=[2.0, 1.0], test_acc=[0.1, 0.5])
    assert demo._trend(r).endswith("over the last epoch")


def test_plots_show_the_start() -> None:
    x2 = minimize.FUNCTIONS["x2"]
    runs = [minimize.minimize(x2, "SGD", start=[10.0])]
    lo, hi = minimize._limits(runs, 0)
    assert lo < 0 < 10 < hi
    himmelblau = minimize.FUNCTIONS["himmelblau"]
    runs = [minimize.minimize(himmelblau, "Adam", start=[5.0, -5.0])]
    assert minimize._limits(runs, 0)[1] > 5 and minimize._limits(runs, 1)[0] < -5
    assert minimize._limits([minimize.minimize(himmelblau, "Adam")], 0) == (-5.0, 5.0)
