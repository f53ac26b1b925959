"""``fastoptim minimize``: the test functions' gradients, the stopping rule, and the x^2
learning-rate trade-off of the gradient-descent seed, asserted exactly."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

import fastoptim as fo
from fastoptim.apps import cli
from fastoptim.apps import minimize as mz

X2 = mz.FUNCTIONS["x2"]


def check_png(path: Path) -> tuple[int, ...]:
    """`path` is a PNG that matplotlib reads back; returns its array shape."""
    image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shape: tuple[int, ...] = image.imread(path).shape
    assert len(shape) == 3 and shape[0] > 100 and shape[1] > 100 and shape[2] in (3, 4)
    return shape


@pytest.mark.parametrize("name", list(mz.FUNCTIONS))
def test_gradients_match_finite_differences(name: str, rng: np.random.Generator) -> None:
    fn = mz.FUNCTIONS[name]
    for _ in range(5):
        p = rng.uniform(-2, 2, fn.dim)
        g = np.empty(fn.dim)
        fn.grad(list(p), g)
        h = 1e-6
        numeric = [
            (fn.f(list(p + h * e)) - fn.f(list(p - h * e))) / (2 * h) for e in np.eye(fn.dim)
        ]
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["x2", "rosenbrock", "beale", "himmelblau"])
def test_minima_are_minima(name: str) -> None:
    fn = mz.FUNCTIONS[name]
    for m in fn.minima:
        g = np.empty(fn.dim)
        fn.grad(list(m), g)
        assert fn.f(list(m)) == pytest.approx(0, abs=1e-20)
        np.testing.assert_allclose(g, 0, atol=1e-9)


def test_x2_lr_1_oscillates_exactly() -> None:
    run = mz.minimize(X2, "SGD", 1.0)
    assert run.status == "oscillates"
    assert run.path == [[2.0], [-2.0], [2.0]] and run.values == [4.0, 4.0, 4.0]
    assert run.detail == "oscillates: 2, -2, 2, -2, ... forever"
    # and it really does go on forever: the plain optimizer, 1000 steps
    x = np.array([2.0])
    opt = fo.SGD([x], lr=1.0)
    for k in range(1, 1001):
        opt.step([2 * x])
        assert x[0] == (-2.0 if k % 2 else 2.0)


def test_x2_rule_alone_would_stop_on_the_oscillation() -> None:
    # |f(1) - f(0)| = 0 <= tol after the first step: the proviso on the step length is what
    # keeps "converged" from being reported at x = -2.
    run = mz.minimize(X2, "SGD", 1.0, max_steps=1)
    assert run.status == "step cap" and run.path == [[2.0], [-2.0]]


def test_x2_small_lrs_converge_or_crawl() -> None:
    fast = mz.minimize(X2, "SGD", 0.1)
    assert fast.status == "converged" and 40 <= fast.iterations <= 50
    assert abs(fast.final[0]) < 2e-4
    assert [p[0] for p in fast.path[:4]] == pytest.approx([2, 1.6, 1.28, 1.024])
    half = mz.minimize(X2, "SGD", 0.5)  # one step to the minimum, exactly
    assert half.status == "converged" and half.path == [[2.0], [0.0], [0.0]]
    zigzag = mz.minimize(X2, "SGD", 0.9)  # x(k) = 2 (-0.8)^k
    assert zigzag.status == "converged" and zigzag.path[1][0] == pytest.approx(-1.6)
    crawl = mz.minimize(X2, "SGD", 1e-4, max_steps=1000)
    assert crawl.status == "step cap" and crawl.iterations == 1000
    assert crawl.final[0] == pytest.approx(2 * 0.9998**1000)


def test_x2_lr_above_1_diverges_without_overflow() -> None:
    run = mz.minimize(X2, "SGD", 1.1)
    # x(k) = 2 (-1.2)^k leaves |x| <= 1e6 at k = 72
    assert run.status == "diverged" and run.iterations == 72
    assert run.detail == "diverged at iteration 72 (|x| > 1e+06)"
    assert all(abs(p[0]) <= 1e6 for p in run.path) and len(run.path) == 72
    huge = mz.minimize(X2, "SGD", 1e300)  # the step itself overflows to -inf: still reported
    assert huge.status == "diverged" and huge.iterations == 1


def test_saddle_and_rosenbrock() -> None:
    saddle = mz.minimize(mz.FUNCTIONS["saddle"], "SGD")
    assert saddle.status == "diverged" and saddle.distance() is None  # unbounded below
    stuck = mz.minimize(mz.FUNCTIONS["saddle"], "SGD", start=[1.0, 0.0])  # on the ridge
    assert stuck.status == "converged" and stuck.final[1] == 0.0 and abs(stuck.final[0]) < 1e-3
    adam = mz.minimize(mz.FUNCTIONS["rosenbrock"], "Adam")
    assert adam.status == "converged" and (adam.distance() or 1) < 0.01


def test_start_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="start must have 2"):
        mz.minimize(mz.FUNCTIONS["beale"], "Adam", start=[1.0])


def _sweep_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d.e+-]+)\s+(\d+)\s+(.*?, \.\.\.)\s+(\S+)\s+(\S+)\s+(.*)$", line)
        if m:
            rows[m.group(1)] = list(m.groups()[1:])
    return rows


def test_cli_sweep_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["minimize", "--functions", "x^2", "--optimizers", "sgd,Adam", "--no-plot"]
    assert cli.main([*args, "--sweep", "0.001,0.1,0.5,1,1.1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _sweep_rows(out)
    assert set(rows) == {"0.001", "0.1", "0.5", "1", "1.1"}
    assert rows["1"] == [
        "2",
        "2, -2, 2, ...",
        "2",
        "4",
        "oscillates: 2, -2, 2, -2, ... forever",
    ]
    assert rows["1.1"][0] == "72" and rows["1.1"][-1] == "diverged at iteration 72 (|x| > 1e+06)"
    assert rows["0.5"][:4] == ["2", "2, 0, 0, ...", "0", "0"]
    assert rows["0.1"][-1].startswith("converged") and rows["0.001"][-1].startswith("converged")
    assert int(rows["0.001"][0]) > 10 * int(rows["0.1"][0])  # too small crawls
    optimizer_rows = re.findall(r"^(SGD|Adam)\s+([\d.e-]+)\s+(\d+)\s.*\s(\w+)$", out, re.M)
    assert [(r[0], r[3]) for r in optimizer_rows] == [("SGD", "converged"), ("Adam", "converged")]
    assert list(tmp_path.iterdir()) == []  # --no-plot: no file


def test_cli_plots_and_determinism(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    args = ["minimize", "--functions", "x2,rosenbrock,saddle", "--max-steps", "300"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 0
    second = capsys.readouterr().out
    assert first.replace("/a/", "/") == second.replace("/b/", "/")  # no timings: all equal
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["minimize_rosenbrock.png", "minimize_saddle.png", "minimize_x2.png"]
    for name in names:
        check_png(tmp_path / "a" / name)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_cli_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["minimize", "--functions", "rastrigin"])
    assert "unknown rastrigin" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["minimize", "--functions", "x2,beale", "--start", "3", "--no-plot"])
    assert exit_info.value.code == 2
    assert "argument --start: 1 coordinate(s) but beale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["minimize", "--lr", "-1"])
    assert "must be > 0" in capsys.readouterr().err


def test_cli_start(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["minimize", "--functions", "x2", "--optimizers", "SGD", "--no-plot"]
    assert cli.main([*args, "--start", "-3", "--sweep", "1", "--max-steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "f(x) = x^2 from x = -3, SGD:" in out
    assert "oscillates: -3, 3, -3, 3, ... forever" in out
    assert math.isfinite(float(re.search(r"^SGD\s+\S+\s+\d+\s+(\S+)", out, re.M).group(1)))  # type: ignore[union-attr]
