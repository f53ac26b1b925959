"""``fastoptim minimize``: fastoptim's optimizers on classic test functions, with the stopping
rule of plain gradient descent, and the learning-rate trade-off on f(x) = x^2.

Each run updates a 1- or 2-element float64 array in place with a fastoptim optimizer, the
gradient written analytically into the optimizer's gradient buffer, and stops at the first of:

* **converged**: ``|f(k+1) - f(k)| <= tol`` (the gradient-descent rule: stop when the loss stops
  changing), provided the step itself was small too, ``|x(k+1) - x(k)| <= sqrt(tol)``.  Without
  that proviso the rule mistakes an oscillation for convergence: on x^2 with lr = 1, x jumps
  2 -> -2 -> 2 while f stays 4, so ``|f(k+1) - f(k)| = 0`` from the first step.  Nor does a
  step that leaves x where it was count, unless the gradient there is 0: ADOPT's first step
  only initialises its state, and Rprop skips the step of an element whose gradient changed
  sign;
* **oscillates**: the point and the optimizer state are exactly what they were two steps
  before, so the same two points repeat forever;
* **diverged**: a coordinate is not finite or beyond ``bound`` (1e6): the run stops there, before
  anything overflows (a start must lie within the bound);
* **step cap**: ``max_steps`` steps without any of the above.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import optimizers as fast
from .demo import COMPARED, OPTIMIZERS

Point = Sequence[Any]  # floats, or arrays of a grid (for contour plots)


def _x2(p: Point) -> Any:
    return p[0] * p[0]


def _x2_grad(p: Point, g: np.ndarray) -> None:
    g[0] = 2.0 * p[0]


def _rosenbrock(p: Point) -> Any:
    x, y = p[0], p[1]
    return (1.0 - x) * (1.0 - x) + 100.0 * (y - x * x) * (y - x * x)


def _rosenbrock_grad(p: Point, g: np.ndarray) -> None:
    x, y = p[0], p[1]
    g[0] = -2.0 * (1.0 - x) - 400.0 * x * (y - x * x)
    g[1] = 200.0 * (y - x * x)


def _saddle(p: Point) -> Any:
    return p[0] * p[0] - p[1] * p[1]


def _saddle_grad(p: Point, g: np.ndarray) -> None:
    g[0] = 2.0 * p[0]
    g[1] = -2.0 * p[1]


def _beale_terms(p: Point) -> tuple[Any, Any, Any]:
    x, y = p[0], p[1]
    return 1.5 - x + x * y, 2.25 - x + x * y * y, 2.625 - x + x * y * y * y


def _beale(p: Point) -> Any:
    a, b, c = _beale_terms(p)
    return a * a + b * b + c * c


def _beale_grad(p: Point, g: np.ndarray) -> None:
    x, y = p[0], p[1]
    a, b, c = _beale_terms(p)
    g[0] = 2.0 * (a * (y - 1.0) + b * (y * y - 1.0) + c * (y * y * y - 1.0))
    g[1] = 2.0 * x * (a + 2.0 * b * y + 3.0 * c * y * y)


def _himmelblau(p: Point) -> Any:
    x, y = p[0], p[1]
    u, v = x * x + y - 11.0, x + y * y - 7.0
    return u * u + v * v


def _himmelblau_grad(p: Point, g: np.ndarray) -> None:
    x, y = p[0], p[1]
    u, v = x * x + y - 11.0, x + y * y - 7.0
    g[0] = 4.0 * x * u + 2.0 * v
    g[1] = 2.0 * u + 4.0 * y * v


@dataclass(frozen=True)
class Function:
    """A test function: value, gradient (written into an array), default start, known minima
    (empty: unbounded below), plot box ``(xmin, xmax, ymin, ymax)`` and default learning rates
    (optimizer name -> lr; ``"*"`` for the others)."""

    name: str
    formula: str
    f: Callable[[Point], Any]
    grad: Callable[[Point, np.ndarray], None]
    start: tuple[float, ...]
    minima: tuple[tuple[float, ...], ...]
    box: tuple[float, float, float, float]
    lrs: Mapping[str, float]
    note: str = ""

    @property
    def dim(self) -> int:
        return len(self.start)

    def lr(self, optimizer: str) -> float:
        return self.lrs.get(optimizer, self.lrs["*"])


_SGDS = ("SGD", "Momentum", "Nesterov")


def _lrs(sgd: float, momentum: float, other: float, **special: float) -> dict[str, float]:
    lrs = {"SGD": sgd, "Momentum": momentum, "Nesterov": momentum, "*": other}
    lrs.update(special)
    return lrs


FUNCTIONS: dict[str, Function] = {
    "x2": Function(
        "x2",
        "f(x) = x^2",
        _x2,
        _x2_grad,
        (2.0,),
        ((0.0,),),
        (-4.0, 4.0, 0.0, 0.0),
        _lrs(0.1, 0.05, 0.1, AdaGrad=1.0, Adadelta=1.0),
    ),
    "rosenbrock": Function(
        "rosenbrock",
        "f(x, y) = (1 - x)^2 + 100 (y - x^2)^2",
        _rosenbrock,
        _rosenbrock_grad,
        (-1.5, 2.0),
        ((1.0, 1.0),),
        (-2.0, 2.0, -1.0, 3.0),
        _lrs(
            1e-3,
            2e-4,
            0.05,
            AdaGrad=0.5,
            RMSProp=1e-3,
            NAdam=0.01,
            RAdam=0.01,
            Lion=1e-3,
            Adadelta=0.03,
        ),
    ),
    "saddle": Function(
        "saddle",
        "f(x, y) = x^2 - y^2",
        _saddle,
        _saddle_grad,
        (-1.5, 0.01),
        (),
        (-2.0, 2.0, -2.0, 2.0),
        _lrs(0.1, 0.02, 0.05, AdaGrad=0.5, Adadelta=1.0),
        note="saddle point at (0, 0), unbounded below along y",
    ),
    "beale": Function(
        "beale",
        "f(x, y) = (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2",
        _beale,
        _beale_grad,
        (1.0, 1.5),
        ((3.0, 0.5),),
        (-1.0, 4.5, -1.5, 2.0),
        _lrs(0.01, 2e-3, 0.05, AdaGrad=0.5, RAdam=0.01, Lion=0.01, Adadelta=0.03),
    ),
    "himmelblau": Function(
        "himmelblau",
        "f(x, y) = (x^2 + y - 11)^2 + (x + y^2 - 7)^2",
        _himmelblau,
        _himmelblau_grad,
        (-0.5, 0.0),
        (
            (3.0, 2.0),
            (-2.805118086952745, 3.131312518250573),
            (-3.779310253377747, -3.283185991286170),
            (3.584428340330492, -1.848126526964404),
        ),
        (-5.0, 5.0, -5.0, 5.0),
        _lrs(0.01, 2e-3, 0.1, AdaGrad=1.0, RMSProp=0.03, RAdam=0.03, Lion=3e-3, Adadelta=0.03),
        note="four minima, f = 0",
    ),
}
ALIASES = {"x^2": "x2", "quadratic": "x2", "parabola": "x2"}

DEFAULT_SWEEP = (1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0, 1.1)
DEFAULT_TOL = 1e-8
DEFAULT_MAX_STEPS = 10_000
BOUND = 1e6


def function(name: str) -> Function:
    """The :data:`FUNCTIONS` entry for `name` (or an alias such as ``x^2``)."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    return FUNCTIONS[key]


@dataclass
class Run:
    """One optimizer on one function: the points ``x(0) .. x(k)`` and values, the outcome."""

    function: Function
    optimizer: str
    lr: float
    path: list[list[float]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    status: str = "step cap"  # converged | oscillates | diverged | step cap
    iterations: int = 0  # optimizer steps taken (the diverging one included)
    detail: str = ""

    @property
    def final(self) -> list[float]:
        return self.path[-1]

    def distance(self) -> float | None:
        """Distance from the last point to the nearest known minimum (None: no minimum)."""
        if not self.function.minima:
            return None
        return min(math.dist(self.final, m) for m in self.function.minima)


def _gradient(fn: Function, point: Sequence[float]) -> np.ndarray:
    g = np.zeros(fn.dim)
    fn.grad(point, g)
    return g


def minimize(
    fn: Function,
    optimizer: str,
    lr: float | None = None,
    *,
    start: Sequence[float] | None = None,
    tol: float = DEFAULT_TOL,
    max_steps: int = DEFAULT_MAX_STEPS,
    bound: float = BOUND,
) -> Run:
    """Run `optimizer` (a :data:`fastoptim.apps.demo.OPTIMIZERS` name) on `fn` from `start`
    (default: the function's) until it converges, oscillates, diverges or takes `max_steps`
    steps (see the module docstring)."""
    spec = OPTIMIZERS[optimizer]
    rate = fn.lr(optimizer) if lr is None else float(lr)
    x = np.array(fn.start if start is None else start, dtype=np.float64)
    if x.shape != (fn.dim,):
        raise ValueError(f"{fn.name}: start must have {fn.dim} coordinate(s), got {list(x)}")
    if not np.all(np.abs(x) <= bound):  # (NaN included)
        raise ValueError(f"start {list(x)}: every coordinate must lie within +-{bound:g}")
    closure = None
    if spec.cls == "LBFGS":  # one line-searched iteration per step: every iterate is drawn
        rate = 1.0 if lr is None else float(lr)
        opt: Any = fast.LBFGS([x], lr=rate, max_iter=1, max_eval=25, line_search_fn="strong_wolfe")

        def closure() -> float:
            fn.grad(x.tolist(), opt.grads[0])
            return float(fn.f(x.tolist()))

    elif spec.cls == "Muon":  # x as a 1 x dim matrix (a view): the step is the normalised
        opt = fast.Muon([x.reshape(1, -1)], lr=rate, weight_decay=0.0)  # momentum, times lr
    else:
        opt = getattr(fast, spec.cls)([x], lr=rate, **spec.options)
    grad: np.ndarray = opt.grads[0].reshape(-1)

    def snapshot() -> list[np.ndarray]:
        return [v.copy() for v in opt.state[0].values() if isinstance(v, np.ndarray)]

    run = Run(fn, optimizer, rate)
    point: list[float] = x.tolist()
    f_prev = float(fn.f(point))
    run.path.append(point)
    run.values.append(f_prev)
    states: deque[list[np.ndarray]] = deque([snapshot()], maxlen=3)
    for k in range(1, max_steps + 1):
        run.iterations = k
        if closure is not None:
            opt.step(closure)
        else:
            fn.grad(point, grad)
            opt.step()
        new: list[float] = x.tolist()
        if not all(math.isfinite(v) and abs(v) <= bound for v in new):
            run.status = "diverged"
            run.detail = f"diverged at iteration {k} (|x| > {bound:g})"
            break
        f_new = float(fn.f(new))
        if not math.isfinite(f_new):  # pragma: no cover - |x| <= bound keeps f finite here
            run.status = "diverged"
            run.detail = f"diverged at iteration {k} (f not finite)"
            break
        run.path.append(new)
        run.values.append(f_new)
        states.append(snapshot())
        idle = new == point and _gradient(fn, point).any()  # no move, not at a stationary point
        point = new
        if (
            not idle
            and abs(f_new - f_prev) <= tol
            and math.dist(new, run.path[-2]) <= math.sqrt(tol)
        ):
            run.status = "converged"
            run.detail = "converged"
            break
        if (
            k >= 2
            and new == run.path[-3]
            and new != run.path[-2]
            and all(np.array_equal(a, b) for a, b in zip(states[0], states[-1]))
        ):
            run.status = "oscillates"
            a, b = _point(new), _point(run.path[-2])
            run.detail = f"oscillates: {a}, {b}, {a}, {b}, ... forever"
            break
        f_prev = f_new
    else:
        run.detail = f"step cap: not converged in {max_steps} steps"
    return run


def sweep(
    lrs: Sequence[float],
    *,
    fn: Function | None = None,
    optimizer: str = "SGD",
    start: Sequence[float] | None = None,
    tol: float = DEFAULT_TOL,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> list[Run]:
    """The learning-rate trade-off: `optimizer` on `fn` (default x^2 from x = 2) at each lr."""
    f = FUNCTIONS["x2"] if fn is None else fn
    return [minimize(f, optimizer, lr, start=start, tol=tol, max_steps=max_steps) for lr in lrs]


# ----------------------------------------------------------------------------- output
def _num(v: float) -> str:
    return f"{v:.6g}"


def _point(p: Sequence[float]) -> str:
    return _num(p[0]) if len(p) == 1 else "(" + ", ".join(_num(v) for v in p) + ")"


def format_sweep(runs: Sequence[Run], *, first: int = 4) -> str:
    """The sweep table: lr, iterations, the first iterates, the final point and value, the
    outcome."""
    fn = runs[0].function
    head = (
        f"{'lr':>8}{'iterations':>12}  {'x(0), x(1), x(2), ...':<32}{'final x':>13}"
        f"{'f(x)':>11}  result"
    )
    rows = []
    for r in runs:
        iterates = ", ".join(_num(p[0]) for p in r.path[:first])
        rows.append(
            f"{r.lr:>8g}{r.iterations:>12}  {iterates + ', ...':<32}{_num(r.final[0]):>13}"
            f"{r.values[-1]:>11.4g}  {r.detail}"
        )
    title = f"{fn.formula} from x = {_point(runs[0].path[0])}, {runs[0].optimizer}:"
    return "\n".join([title, head, "-" * max(map(len, [head, *rows])), *rows])


def format_runs(runs: Sequence[Run]) -> str:
    """One function's table: optimizer, lr, iterations, final point, f, distance to the nearest
    minimum, outcome."""
    fn = runs[0].function
    minima = (
        "minimum 0 at " + ", ".join(_point(m) for m in fn.minima[:1])
        if len(fn.minima) == 1
        else fn.note
    )
    w = max([10, *(len(r.optimizer) + 1 for r in runs)])  # the names' column
    head = (
        f"{'optimizer':<{w}}{'lr':>8}{'iterations':>12}  {'final point':<26}{'f':>11}"
        f"{'to min':>9}  result"
    )
    rows = []
    for r in runs:
        d = r.distance()
        rows.append(
            f"{r.optimizer:<{w}}{r.lr:>8g}{r.iterations:>12}  {_point(r.final):<26}"
            f"{r.values[-1]:>11.3g}{'-' if d is None else f'{d:.2g}':>9}  {r.status}"
        )
    title = f"{fn.name}: {fn.formula}, from {_point(runs[0].path[0])}; {minima}"
    return "\n".join([title, head, "-" * max(map(len, [head, *rows])), *rows])


def _label(r: Run, with_name: bool) -> str:
    what = {"step cap": f"cap {r.iterations}"}.get(r.status, f"{r.status} {r.iterations}")
    return f"{r.optimizer + ' ' if with_name else ''}lr={r.lr:g} ({what})"


def _extended(r: Run, steps: int) -> list[list[float]]:
    """The run's points up to iteration `steps`, an oscillating run's 2-cycle repeated (it is
    exact: the optimizer would produce exactly these points)."""
    pts = list(r.path[: steps + 1])
    if r.status == "oscillates":
        while len(pts) < steps + 1:
            pts.append(pts[-2])
    return pts


def _limits(runs: Sequence[Run], axis: int) -> tuple[float, float]:
    """The plot's range along `axis`: the function's box, widened (with a margin of 5%) where
    the start or a point of a run that stays bounded (converged, oscillating) lies on its edge
    or beyond.  A run that diverges or runs away on a function unbounded below leaves the
    plot."""
    lo, hi = runs[0].function.box[2 * axis : 2 * axis + 2]
    seen = [runs[0].path[0][axis]]
    seen += [p[axis] for r in runs if r.status in ("converged", "oscillates") for p in r.path]
    if min(seen) > lo and max(seen) < hi:
        return lo, hi
    lo, hi = min(lo, *seen), max(hi, *seen)
    return lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)


def plot_1d(runs: Sequence[Run], path: Path, *, steps: int = 40) -> None:
    """x(k) against k (first `steps` iterations) and the first steps on the curve f(x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fn = runs[0].function
    names = {r.optimizer for r in runs}
    fig, (ax_x, ax_f) = plt.subplots(1, 2, figsize=(10, 4))
    lo, hi = _limits(runs, 0)
    grid = np.linspace(lo, hi, 400)
    ax_f.plot(grid, fn.f([grid]), color="0.6", lw=1)
    for r in runs:
        xs = np.array([p[0] for p in _extended(r, steps)])
        (line,) = ax_x.plot(
            np.arange(len(xs)), xs, marker="o", ms=2.5, lw=1.2, label=_label(r, len(names) > 1)
        )
        few = xs[:9]
        ax_f.plot(few, fn.f([few]), marker="o", ms=3, lw=1, color=line.get_color())
    ax_x.set_ylim(lo - 0.5, hi + 0.5)
    ax_x.axhline(0, color="0.5", lw=0.6)
    ax_x.set_xlabel("iteration k")
    ax_x.set_ylabel("x(k)")
    ax_x.set_title(
        f"{', '.join(sorted(names))} on {fn.formula} from x = {_num(runs[0].path[0][0])}",
        fontsize=10,
    )
    ax_x.legend(fontsize=7, loc="lower right")
    ax_x.grid(True, alpha=0.3)
    ax_f.set_xlim(lo, hi)
    ax_f.set_ylim(-0.5, float(np.max(fn.f([grid]))) + 0.5)
    ax_f.set_xlabel("x")
    ax_f.set_ylabel("f(x)")
    ax_f.set_title("the first 8 steps on the curve", fontsize=10)
    ax_f.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_2d(runs: Sequence[Run], path: Path) -> None:
    """The trajectories over the function's contours, and f(x(k)) - min f against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fn = runs[0].function
    (x0, x1), (y0, y1) = _limits(runs, 0), _limits(runs, 1)
    gx, gy = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    z = fn.f([gx, gy])
    fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": (1, 1.1)})
    if fn.minima:
        ax.contour(gx, gy, np.log10(z - z.min() + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    else:
        ax.contour(gx, gy, z, levels=25, cmap="Greys", linewidths=0.6)
    for r in runs:
        pts = np.array(r.path)
        short = len(pts) <= 300
        (line,) = ax.plot(pts[:, 0], pts[:, 1], lw=1.3, marker="o" if short else "", ms=2)
        ax.plot(*pts[-1], marker="x", ms=7, color=line.get_color())
        k = np.arange(1, len(pts) + 1)
        if fn.minima:
            ax_f.loglog(
                k,
                np.maximum(np.array(r.values), 1e-16),
                color=line.get_color(),
                lw=1.3,
                label=_label(r, True),
            )
        else:
            ax_f.semilogx(k, r.values, color=line.get_color(), lw=1.3, label=_label(r, True))
    ax.plot(*runs[0].path[0], marker="o", ms=7, color="black", ls="none")
    for m in fn.minima:
        ax.plot(*m, marker="*", ms=12, color="crimson", ls="none")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(fn.formula, fontsize=9)
    if fn.minima:
        ax_f.set_ylabel("f(x(k)) (minimum 0)")
    else:
        ax_f.set_yscale("symlog")
        ax_f.set_ylabel("f(x(k)) (unbounded below)")
    ax_f.set_xlabel("iteration k + 1")
    ax_f.set_title(f"from {_point(runs[0].path[0])} (black dot); x: last point", fontsize=9)
    ax_f.grid(True, which="major", alpha=0.3)
    ax_f.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(
    functions: Sequence[str] = tuple(FUNCTIONS),
    optimizers: Sequence[str] = COMPARED,
    *,
    lr: float | None = None,
    sweep_lrs: Sequence[float] = DEFAULT_SWEEP,
    start: Sequence[float] | None = None,
    tol: float = DEFAULT_TOL,
    max_steps: int = DEFAULT_MAX_STEPS,
    out: Path | None = Path("."),
    echo: Callable[[str], None] = print,
) -> dict[str, list[Run]]:
    """What ``fastoptim minimize`` does: the x^2 sweep (when x2 is among `functions` and
    `sweep_lrs` is not empty), then every optimizer on every function; tables on `echo`, one
    PNG per function in `out` (None: no plots).  Returns the runs by function name
    (``"x2 sweep"`` for the sweep)."""
    fns = [function(name) for name in functions]
    plots = out is not None and have_matplotlib()
    if out is not None and not plots:
        echo("(no plots: matplotlib is missing; pip install 'fastoptim[demo]')\n")
    if out is not None and plots:
        out.mkdir(parents=True, exist_ok=True)
    echo(
        f"stopping rule: |f(k+1) - f(k)| <= {tol:g} with |x(k+1) - x(k)| <= "
        f"{math.sqrt(tol):g}, or {max_steps} steps; diverged: |x| > {BOUND:g}\n"
    )
    results: dict[str, list[Run]] = {}
    for fn in fns:
        runs = [
            minimize(fn, name, lr, start=start, tol=tol, max_steps=max_steps) for name in optimizers
        ]
        results[fn.name] = runs
        drawn = runs
        if fn.name == "x2" and sweep_lrs:
            swept = sweep(sweep_lrs, fn=fn, start=start, tol=tol, max_steps=max_steps)
            results["x2 sweep"] = swept
            echo(format_sweep(swept))
            echo("")
            drawn = swept
        if runs:
            echo(format_runs(runs))
            echo("")
        if plots and out is not None and drawn:
            png = out / f"minimize_{fn.name}.png"
            (plot_1d if fn.dim == 1 else plot_2d)(drawn, png)
            echo(f"wrote {png}\n")
    return results
