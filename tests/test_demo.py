"""``fastoptim demo`` and the NumPy MLP behind it, on tiny settings (timings are printed, never
asserted).  The end-to-end tests need scikit-learn and matplotlib (the ``demo`` extra)."""

from __future__ import annotations

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


def table(out: str) -> dict[str, dict[str, str]]:
    """The demo table's rows by optimizer name."""
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group("name")] = m.groupdict()
    return rows


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
    for spec in demo.OPTIMIZERS.values():  # each builds, fastoptim and reference alike
        for module in (fo, reference):
            getattr(module, spec.cls)([np.zeros(3, np.float32)], lr=spec.lr, **spec.options)
    assert set(demo.SEED_CHART) <= set(demo.OPTIMIZERS)


def test_schedules() -> None:
    assert demo.make_schedule("constant", 0.1, 100, 10) == 0.1
    made = {name: demo.make_schedule(name, 0.1, 100, 10) for name in demo.SCHEDULES[1:]}
    assert all(isinstance(s, schedules.Schedule) for s in made.values())
    s = {name: sched for name, sched in made.items() if isinstance(sched, schedules.Schedule)}
    assert s["cosine"](0) == pytest.approx(0.1) and s["cosine"](100) == 0
    assert s["inverse_time"](10) == pytest.approx(0.05)  # lr / (1 + epoch)
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
    rows = table(out)
    assert list(rows) == ["SGD", "Momentum", "Adam", "NAdam", "RMSProp"]
    for name, r in rows.items():
        assert float(r["lr"]) == pytest.approx(demo.OPTIMIZERS[name].lr)
        assert 0 < float(r["train"]) < math.log(10)  # below chance level after 2 epochs
        assert 0 < float(r["test"]) < 10
        assert 20 < float(r["acc"]) <= 100  # chance: 10%
        assert float(r["step"]) > 0 and float(r["numpy"]) > 0 and r["speedup"].endswith("x")
        assert float(r["diff"]) < 1e-5  # fastoptim and the NumPy reference agree
    assert "1438 train / 359 test" in out and "MLP 64-16-10" in out
    assert "batch 32 (mini-batch, 45 updates/epoch), 2 epochs" in out
    assert [p.name for p in tmp_path.iterdir()] == ["demo_loss.png"]
    check_png(tmp_path / "demo_loss.png")


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
    assert "batch 1438 (full batch, 1 updates/epoch), 3 epochs, schedule warmup_cosine" in out
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


def test_cli_demo_names_missing_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import fails, installed or not
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"needs scikit-learn and matplotlib: pip install"):
        cli.main(["demo"])
    with pytest.raises(SystemExit, match=r"needs scikit-learn: pip install 'fastoptim\[demo\]'"):
        cli.main(["demo", "--no-plot"])
