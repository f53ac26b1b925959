"""``fastoptim demo`` and the NumPy MLP behind it, on tiny settings (timings are printed, never
asserted).  The end-to-end tests need scikit-learn and matplotlib (the ``demo`` extra)."""

from __future__ import annotations

import dataclasses
import gzip
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import fastoptim as fo
from fastoptim import reference, schedules
from fastoptim.apps import cli, demo
from fastoptim.apps.mlp import MLP

ROW = re.compile(
    r"^(?P<name>\w+)\s+(?P<lr>[\d.e+-]+)\s+(?P<train>[\d.]+)\s+(?P<test>[\d.]+)\s+"
    r"(?P<acc>[\d.]+)%\s+(?P<secs>[\d.]+)\s+(?P<step>[\d.]+|-)\s+(?P<numpy>[\d.]+|-)\s+"
    r"(?P<speedup>[\d.]+x|-)\s+(?P<diff>[\d.e+-]+|-)$"
)
DIVERGED = re.compile(r"^(?P<name>\w+)\s+(?P<lr>[\d.e+-]+)\s+diverged at epoch (?P<epoch>\d+)\s")


def needs_demo_extra() -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")


def table(out: str, view: int = 0) -> dict[str, dict[str, str]]:
    """The rows of the comparison's table number `view` (0: the first) by optimizer name."""
    tables: list[dict[str, dict[str, str]]] = []
    for line in out.splitlines():
        if line.startswith("optimizer "):
            tables.append({})
        m = ROW.match(line)
        if m:
            tables[-1][m.group("name")] = m.groupdict()
    return tables[view]


def reading(out: str) -> list[str]:
    """The lines of every "What this run shows" section."""
    lines, inside = [], False
    for line in out.splitlines():
        if line == "What this run shows:":
            inside = True
        elif inside and line.startswith(("- ", "  ")):
            lines.append(line)
        else:
            inside = False
    return lines


def check_png(path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shape = image.imread(path).shape
    assert len(shape) == 3 and shape[0] > 100 and shape[1] > 100 and shape[2] in (3, 4)


# ----------------------------------------------------------------------------- the MLP
def test_mlp_gradient_matches_finite_differences(rng: np.random.Generator) -> None:
    net = MLP([5, 7, 6, 3], rng=rng, dtype=np.float64)
    for p in net.params.values():  # nonzero biases, so their gradients are exercised
        p += 0.1 * rng.standard_normal(p.shape)
    x, y = rng.standard_normal((9, 5)), rng.integers(0, 3, 9)
    grads = {k: np.empty_like(v) for k, v in net.params.items()}
    loss = net.loss_and_grad(x, y, out=grads)
    assert loss == pytest.approx(net.loss(x, y), rel=1e-12)
    h = 1e-6
    for name, p in net.params.items():
        numeric = np.empty_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = net.loss(x, y)
            p[i] = old - h
            down = net.loss(x, y)
            p[i] = old
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_mlp_trains_in_place_with_an_optimizer(rng: np.random.Generator) -> None:
    net = MLP([4, 16, 3], rng=rng)
    assert net.size() == 4 * 16 + 16 + 16 * 3 + 3
    x = rng.standard_normal((60, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)
    opt = fo.Adam(net.params, lr=0.02)
    addresses = {k: v.ctypes.data for k, v in net.params.items()}
    first = net.loss(x, y)
    grads = opt.grads
    assert isinstance(grads, dict)  # named parameters: gradient buffers by name
    for _ in range(200):
        net.loss_and_grad(x, y, out=grads)
        opt.step()
    assert net.loss(x, y) < first / 4 and net.accuracy(x, y) > 0.9
    assert {k: v.ctypes.data for k, v in net.params.items()} == addresses
    assert all(v.dtype == np.float32 for v in net.params.values())


def test_mlp_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        MLP([3], rng=np.random.default_rng(0))
    with pytest.raises(TypeError):
        MLP([3, 2], rng=np.random.default_rng(0), dtype=np.int32)


# ----------------------------------------------------------------------------- names, schedules
def test_optimizer_names() -> None:
    assert [demo.canonical(n) for n in ("nadam", "ADAGRAD", " rmsprop ", "amsgrad")] == [
        "NAdam",
        "AdaGrad",
        "RMSProp",
        "AMSGrad",
    ]
    with pytest.raises(KeyError):
        demo.canonical("adamm")
    params = {"W1": np.zeros((3, 2), np.float32), "b1": np.zeros(2, np.float32)}
    for spec in demo.OPTIMIZERS.values():  # each builds, fastoptim and reference alike
        for module in (fo, reference):
            opt = demo.make_optimizer(module, spec, params, spec.lr)
            assert set(opt.grads) == set(params)
    assert set(demo.COMPARED) <= set(demo.OPTIMIZERS)


def test_muon_and_lbfgs_train() -> None:
    """The new names run: Muon on the weights with AdamW on the biases (the biases move by
    AdamW's rule), and LBFGS through a closure per batch; both lower the training loss."""
    pytest.importorskip("sklearn")
    data = demo.load_digits(seed=0)
    for name in ("Muon", "LBFGS"):
        config = demo.Config(epochs=2, hidden=(16,), reference=name == "Muon")
        result = demo.train(name, data, config)
        assert result.train_loss[-1] < result.train_loss[0], name
        if name == "Muon":
            assert result.max_diff is not None and result.max_diff < 1e-5


def test_schedules() -> None:
    assert demo.make_schedule("constant", 0.1, 100, 10) == 0.1
    made = {name: demo.make_schedule(name, 0.1, 100, 10) for name in demo.SCHEDULES[1:]}
    assert all(isinstance(s, schedules.Schedule) for s in made.values())
    s = {name: sched for name, sched in made.items() if isinstance(sched, schedules.Schedule)}
    assert s["cosine"](0) == pytest.approx(0.1) and s["cosine"](100) == 0
    assert s["inverse_time"](50) == pytest.approx(0.1 / 5.5)  # lr / (1 + 9 t / T)
    assert s["inverse_time"](100) == pytest.approx(0.01)  # lr / 10 at the end
    assert s["step"](32) == pytest.approx(0.1) and s["step"](33) == pytest.approx(0.01)
    assert s["step"](66) == pytest.approx(0.001)
    assert s["exponential"](100) == pytest.approx(0.001)
    assert s["warmup_cosine"](0) == 0 and s["warmup_cosine"](10) == pytest.approx(0.1)
    assert s["onecycle"](0) == pytest.approx(0.1 / 25) and s["onecycle"](29) == pytest.approx(0.1)
    assert s["linear"](50) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="unknown schedule"):
        demo.make_schedule("cyclic", 0.1, 100, 10)


# ----------------------------------------------------------------------------- end to end
TINY = ["demo", "--epochs", "2", "--hidden", "16", "-q"]


def test_cli_demo_table_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    needs_demo_extra()
    args = [*TINY, "--optimizers", "sgd,Momentum,adam,NAdam,rmsprop", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    tuned, common = table(out, 0), table(out, 1)
    assert "Each optimizer at its tuned lr:" in out and "Every optimizer at lr 0.001:" in out
    assert list(tuned) == list(common) == ["SGD", "Momentum", "Adam", "NAdam", "RMSProp"]
    for name, r in tuned.items():
        assert float(r["lr"]) == pytest.approx(demo.OPTIMIZERS[name].lr)
        assert float(common[name]["lr"]) == 0.001
        assert 0 < float(r["train"]) < math.log(10)  # below chance level after 2 epochs
        assert 0 < float(r["test"]) < 10
        assert 20 < float(r["acc"]) <= 100  # chance: 10%
        assert float(r["step"]) > 0 and float(r["numpy"]) > 0 and r["speedup"].endswith("x")
        assert float(r["diff"]) < 1e-5  # fastoptim and the NumPy reference agree
    assert tuned["Adam"] == common["Adam"]  # tuned at 0.001: the same run, the same numbers
    # at lr 0.001 plain SGD barely moves in 2 epochs: the articles' finding
    assert float(common["SGD"]["acc"]) < float(tuned["SGD"]["acc"])
    assert "1438 train / 359 test" in out and "MLP 64-16-10" in out
    assert "batch 32 (mini-batch, 45 updates/epoch), 2 epochs" in out
    assert [p.name for p in tmp_path.iterdir()] == ["demo_loss.png"]
    check_png(tmp_path / "demo_loss.png")


def test_cli_demo_reading_matches_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    needs_demo_extra()
    assert cli.main([*TINY, "--optimizers", "SGD,AdaGrad,Adam,RMSProp", "--no-plot"]) == 0
    out = capsys.readouterr().out
    lines = reading(out)
    assert lines[0].startswith("- each optimizer at its tuned lr: test accuracy")
    assert lines[2].startswith("- every optimizer at lr 0.001: test accuracy")
    for view, line in ((0, lines[0]), (1, lines[2])):
        rows = table(out, view)
        accs = {n: float(r["acc"]) for n, r in rows.items()}
        m = re.search(r"best (\w+) ([\d.]+)%", line)
        assert m is not None and accs[m.group(1)] == max(accs.values())
        assert float(m.group(2)) == pytest.approx(max(accs.values()), abs=0.051)
        behind = line.split("more than 2 points behind:")[1] if "behind:" in line else ""
        for name, acc in accs.items():
            assert (f"{name} " in behind) == (acc < max(accs.values()) - 2), (name, line)
    sgd = float(table(out, 1)["SGD"]["acc"]) - float(table(out, 0)["SGD"]["acc"])
    m = re.search(r"SGD ([+-][\d.]+) points \(lr 0.1 -> 0.001\)", lines[4])
    assert m is not None and float(m.group(1)) == pytest.approx(sgd, abs=0.051)
    assert "Adam, RMSProp already tuned at 0.001 (same run)" in lines[4]


def test_cli_demo_single_view(capsys: pytest.CaptureFixture[str]) -> None:
    needs_demo_extra()
    assert cli.main([*TINY, "--optimizers", "adam", "--lr", "0.01", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "Every optimizer at lr 0.01:" in out and "tuned" not in out
    assert float(table(out)["Adam"]["lr"]) == 0.01
    with pytest.raises(IndexError):
        table(out, 1)
    args = [*TINY, "--optimizers", "adam", "--lr", "TUNED,0.01,0.01,tuned", "--no-plot"]
    assert cli.main(args) == 0  # duplicates dropped, any case
    out = capsys.readouterr().out
    assert len(table(out, 1)) == 1 and "from its tuned lr to lr 0.01" in out
    with pytest.raises(IndexError):
        table(out, 2)


def test_reading_names_failures() -> None:
    data = demo.Data(np.zeros((1, 2)), np.zeros(1, int), np.zeros((1, 2)), np.zeros(1, int))

    def result(name: str, acc: float, diverged: int | None = None) -> demo.Result:
        r = demo.Result(name, 0.1, train_loss=[2.3, 1.0, 0.5, 0.5, 0.5], test_acc=[0.1, acc])
        r.diverged_epoch = diverged
        return r

    text = demo.read_view(
        [result("Adam", 0.98), result("SGD", 0.09), result("AdaGrad", 0.5, diverged=3)],
        data,
        0.001,
    )
    assert "best Adam 98.0%" in text
    assert "SGD 9.0%, at chance level (10%) (training loss flat: +0% over the last epoch)" in (text)
    assert "diverged: AdaGrad (epoch 3)" in text
    assert demo.read_view([result("SGD", 0.5, diverged=1)], data, None).endswith(
        "every run diverged."
    )
    assert "none more than 2 points behind" in demo.read_view(
        [result("Adam", 0.98), result("SGD", 0.97)], data, None
    )


def test_reading_of_the_decay_lesson_follows_the_numbers() -> None:
    data = demo.Data(np.zeros((64, 2)), np.zeros(64, int), np.zeros((1, 2)), np.zeros(1, int))

    def run(lr: float, schedule: str, test_loss: float) -> demo.Result:
        return demo.Result("SGD", lr, 1, schedule, test_loss=[2.0, test_loss], test_acc=[0.1, 0.9])

    better = demo.read_decay([run(0.01, "constant", 0.2), run(0.03, "inverse_time", 0.1)], data)
    assert "The decay from 0.03 gives the lowest test loss, 0.100 against 0.200" in better
    worse = demo.read_decay([run(0.01, "constant", 0.1), run(0.03, "inverse_time", 0.2)], data)
    assert "does not beat the constant lr 0.01 (test loss 0.200 vs 0.100)" in worse


def test_plot_shows_lr_and_accuracy_from_zero(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    needs_demo_extra()
    plt = demo._pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    data = demo.load_digits(0)
    config = demo.Config(epochs=1, hidden=(8,), reference=False)
    views = [[demo.train("SGD", data, dataclasses.replace(config, lr=lr))] for lr in (None, 1e-3)]
    demo.plot_optimizers(views, [None, 1e-3], data, tmp_path / "x.png", "title")
    (fig,) = figures
    axes = fig.axes
    assert [ax.get_title() for ax in axes[::2]] == [
        "each optimizer at its tuned lr",
        "every optimizer at lr 0.001",
    ]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes[1::2]]
    assert legends == [["SGD (lr 0.1)"], ["SGD (lr 0.001)"]]
    assert all(ax.get_ylim()[0] == 0 for ax in axes[1::2])  # accuracy from 0: chance visible
    plt.close(fig)


def test_cli_demo_is_deterministic(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    needs_demo_extra()
    numbers = []
    for run, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        args = [*TINY, "--optimizers", "RMSProp,AdaGrad", "--seed", seed]
        assert cli.main([*args, "--out", str(tmp_path / run)]) == 0
        rows = table(capsys.readouterr().out)
        numbers.append(
            {n: (r["lr"], r["train"], r["test"], r["acc"], r["diff"]) for n, r in rows.items()}
        )
    assert numbers[0] == numbers[1] and len(numbers[0]) == 2
    assert numbers[0] != numbers[2]  # another split, other weights
    png = [(tmp_path / run / "demo_loss.png").read_bytes() for run in "abc"]
    assert png[0] == png[1] != png[2]


def test_batch_sizes_and_schedule() -> None:
    needs_demo_extra()
    data = demo.load_digits(0)
    n = len(data.y_train)
    base = dict(optimizers=["SGD"], epochs=2, hidden=(8,))
    full = demo.train("SGD", data, demo.Config(**base, batch_size=0))  # type: ignore[arg-type]
    assert full.steps == 2 and len(full.train_loss) == 3
    online = demo.train("SGD", data, demo.Config(**base, batch_size=1, reference=False))  # type: ignore[arg-type]
    assert online.steps == 2 * n and online.reference_seconds is None and online.max_diff is None
    plain = demo.train("Adam", data, demo.Config(**base, batch_size=64))  # type: ignore[arg-type]
    cosine = demo.train("Adam", data, demo.Config(**base, batch_size=64, schedule="cosine"))  # type: ignore[arg-type]
    assert plain.train_loss[0] == cosine.train_loss[0]  # same start...
    assert plain.train_loss[-1] != cosine.train_loss[-1]  # ...the schedule changes the run
    assert cosine.max_diff is not None and cosine.max_diff < 1e-5  # reference follows it too


def test_cli_demo_schedule_and_batch_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    needs_demo_extra()
    args = [*TINY, "--optimizers", "Nesterov", "--batch-size", "full", "--epochs", "3"]
    assert cli.main([*args, "--schedule", "warmup_cosine", "--lr", "0.5", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "batch 1438 (full batch, 1 update/epoch), 3 epochs, schedule warmup_cosine" in out
    rows = table(out)
    assert float(rows["Nesterov"]["lr"]) == 0.5 and float(rows["Nesterov"]["diff"]) < 1e-5
    with pytest.raises(SystemExit):
        cli.main([*TINY, "--batch-size", "0.5"])
    with pytest.raises(SystemExit):
        cli.main([*TINY, "--schedule", "cyclic"])
    with pytest.raises(SystemExit):
        cli.main([*TINY, "--optimizers", "Adamm"])
    assert "unknown Adamm" in capsys.readouterr().err


def test_cli_demo_reports_divergence(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    needs_demo_extra()
    args = [*TINY, "--optimizers", "SGD,Adam", "--lr", "1e4", "--out", str(tmp_path)]
    assert cli.main(args) == 0  # no overflow warning escapes (warnings are errors here)
    out = capsys.readouterr().out
    diverged = [m.group("name") for line in out.splitlines() if (m := DIVERGED.match(line))]
    assert "SGD" in diverged
    check_png(tmp_path / "demo_loss.png")


def test_cli_demo_names_missing_dependencies(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import fails, installed or not
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_info:  # a usage error, as bench's
        cli.main(["demo"])
    assert exit_info.value.code == 2
    assert "needs scikit-learn and matplotlib: pip install" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--no-plot"])
    assert exit_info.value.code == 2
    assert "needs scikit-learn: pip install 'fastoptim[demo]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- lessons
def test_cli_demo_batch_lesson(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    needs_demo_extra()
    args = ["demo", "--lesson", "batch", "--epochs", "1", "--hidden", "8", "-q"]
    assert cli.main([*args, "--train-size", "200", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    runs = re.findall(
        r"^(full batch|mini-batch 32|online)\s+(\d+)\s+([\d.]+)\s+constant\s+(\d+)", out, re.M
    )
    assert runs == [
        ("full batch", "200", "0.5", "1"),
        ("mini-batch 32", "32", "0.1", "7"),
        ("online", "1", "0.01", "200"),
    ]  # 200 samples: 1, ceil(200/32), 200 updates
    (line,) = [line for line in reading(out) if line.startswith("- full batch, lr 0.5: 1 update ")]
    assert "mini-batch 32, lr 0.1: 7 updates" in line and "online, lr 0.01: 200 updates" in line
    assert any(line.startswith("- after one epoch") for line in reading(out))
    assert any(line.startswith("- first to ") for line in reading(out))
    assert "200 train / 359 test" in out and "Each optimizer" not in out
    assert [p.name for p in tmp_path.iterdir()] == ["demo_batch.png"]
    check_png(tmp_path / "demo_batch.png")


def test_decay_lesson_runs(tmp_path: Path) -> None:
    needs_demo_extra()
    data = demo.load("digits", 0, train_size=100)
    config = demo.Config(epochs=1, hidden=(8,), lesson="decay")
    runs = demo.decay_lesson(data, config, demo.Progress(None))
    assert [(r.batch_size, r.lr, r.schedule) for r in runs] == list(demo.DECAY_RUNS)
    assert [r.steps for r in runs] == [4, 4, 4, 100, 100, 100]
    same_start = runs[1], runs[2]  # constant 1.0 and 1/t decay from 1.0: same first update...
    assert same_start[0].train_loss[0] == same_start[1].train_loss[0]
    assert same_start[0].train_loss[-1] != same_start[1].train_loss[-1]  # ...then they differ
    text = demo.read_decay(runs, data)
    assert text.startswith("- mini-batch 32: lr 0.1 -> ") and "\n- online: lr 0.01 -> " in text
    demo.plot_decay(runs, data, tmp_path / "decay.png", "t")
    check_png(tmp_path / "decay.png")


def test_lesson_options_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    for option in (["--optimizers", "adam"], ["--lr", "0.1"], ["--batch-size", "8"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["demo", "--lesson", "decay", *option])
        assert exit_info.value.code == 2
        assert "only for --lesson optimizers or all" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Fashion-MNIST
def write_idx(path: Path, array: np.ndarray) -> None:
    """`array` (uint8) as an IDX file, gzipped when `path` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def fake_fashion(directory: Path, rng: np.random.Generator, n_train: int = 60) -> None:
    """Small Fashion-MNIST-shaped IDX files: training set gzipped, test set not."""
    directory.mkdir(exist_ok=True)
    for part, n, suffix in (("train", n_train, ".gz"), ("t10k", 20, "")):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 50, (n, 28, 28)) + (labels * 20)[:, None, None]  # learnable
        write_idx(directory / f"{part}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{part}-labels-idx1-ubyte{suffix}", labels)


def test_read_idx_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, (3, 4, 5)).astype(np.uint8)
    for name in ("a", "a.gz"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(demo.read_idx(tmp_path / name), a)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(demo.DataError, match="not an IDX file"):
        demo.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(demo.DataError, match="3 bytes of data, but the header's shape"):
        demo.read_idx(tmp_path / "short")


def test_fashion_mnist_loads(tmp_path: Path, rng: np.random.Generator) -> None:
    fake_fashion(tmp_path, rng)
    data = demo.load("fashion-mnist", 0, data_dir=tmp_path, train_size=50)
    assert data.x_train.shape == (50, 784) and data.x_test.shape == (20, 784)
    assert data.x_train.dtype == np.float32 and data.classes == 10 and data.chance == 0.1
    assert abs(float(data.x_train.mean())) < 0.1  # standardised


def test_cli_demo_on_fashion_mnist(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rng: np.random.Generator
) -> None:
    pytest.importorskip("matplotlib")
    fake_fashion(tmp_path / "data", rng)
    args = [*TINY, "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data")]
    assert cli.main([*args, "--optimizers", "adam", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Fashion-MNIST (28x28 images): 60 train / 20 test" in out and "MLP 784-16-10" in out
    assert set(table(out)) == {"Adam"}
    check_png(tmp_path / "out" / "demo_loss.png")


def test_cli_demo_fashion_mnist_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rng: np.random.Generator
) -> None:
    fake_fashion(tmp_path, rng)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    cases = {
        (): "--dataset fashion-mnist needs --data-dir DIR",
        ("--data-dir", str(tmp_path / "nowhere")): "not a directory",
        ("--data-dir", str(tmp_path)): "missing t10k-labels-idx1-ubyte[.gz]",
    }
    for extra, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["demo", "--dataset", "fashion-mnist", "--no-plot", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "github.com/zalandoresearch/fashion-mnist" in err
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"not idx")  # there, but broken
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--dataset", "fashion-mnist", "--no-plot", "--data-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "not an IDX file" in capsys.readouterr().err
