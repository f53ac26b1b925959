"""The one table of optimizer cases, and the helpers shared by the tests that run it.

``CASES`` (optax style): every optimizer x its meaningful option sets.  ``test_kernels.py`` runs
each case against :mod:`fastoptim.reference` for ``Case.steps`` steps; ``test_torch.py`` runs
the same cases (but Lion, which ``torch.optim`` lacks) against ``torch.optim`` for a longer run,
with its per-consumer adjustments spelled out there.  Either way the learning rate is
multiplied by ``Case.new_lr_factor`` halfway through.

Both compare on one parameter group holding two "families" of tensors: unit-scale gradients
with about 10% exact zeros, and the same again with 1e-7-scale gradients, so that eps
conventions decide the result (see :func:`make_families`).  The tolerance is
:func:`check_close` with ``rtol = K * eps(dtype)`` and ``atol = K * eps(dtype) * M``, M the
largest |expected value| that kind of array has reached so far in its family
(:class:`Scales`); each test module measures and documents its own ``K``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from fastoptim import definitions

# ----------------------------------------------------------------------------- the table
# L2 weight decay uses a power of two: wd * p is then exact in either precision, and g + wd * p
# is one correctly rounded operation in float64, in fastoptim's float32 kernels (one fused
# multiply-add) and in torch (which adds alpha * p in two roundings) alike.  With a decimal like
# 0.1, the float32 gradient differs from the float64 one by the rounding of wd (~1e-8 * |wd p|),
# which where g + wd p nearly cancels is a large relative error that Adam / RMSprop normalise up
# to a learning-rate-sized change of the parameter: an ill-conditioned problem, not a kernel bug.
WD = 0.125
# fastoptim's own options of torch.optim's optimizers (Hyper.extension): SGD's cautious...
EXTENSIONS = {h.name for d in definitions.ALL for h in d.hyper if h.extension}
# fastoptim.torch takes only sparse gradients for these (SparseAdam, as torch.optim): the torch
# tests that step with dense gradients leave them out; test_sparse.py tests them.
SPARSE_ONLY = {d.name for d in definitions.ALL if d.torch_sparse_only}


@dataclass(frozen=True)
class Case:
    opt: str  # the class name, in fastoptim, fastoptim.reference and torch.optim alike
    kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 6  # test_kernels.py's run length (test_torch.py runs longer)
    new_lr_factor: float = 0.5  # the learning rate is multiplied by this halfway through
    label: str = ""

    @property
    def fastoptim_only(self) -> bool:
        """Whether the case uses an option fastoptim adds to a torch.optim optimizer
        (``cautious``): torch cannot run it."""
        return any(k in EXTENSIONS for k in self.kwargs)

    @property
    def id(self) -> str:
        return f"{self.opt}-{self.label}" if self.label else self.opt


def case(opt: str, label: str, steps: int = 6, **kwargs: Any) -> Case:
    return Case(opt, kwargs, steps, label=label)


CASES: list[Case] = [
    case("SGD", "plain", lr=0.1),
    case("SGD", "momentum", lr=0.1, momentum=0.9),
    case("SGD", "momentum-dampening", lr=0.1, momentum=0.9, dampening=0.3),
    case("SGD", "nesterov", lr=0.1, momentum=0.9, nesterov=True),
    case("SGD", "weight_decay", lr=0.1, weight_decay=WD),
    case("SGD", "momentum-weight_decay", lr=0.1, momentum=0.8, weight_decay=WD),
    case("SGD", "maximize", lr=0.1, momentum=0.9, maximize=True),
    # cautious (Liang et al. 2024, element-wise): the step where it agrees with g, else 0
    case("SGD", "cautious", lr=0.1, momentum=0.9, cautious=True),
    case(
        "SGD",
        "cautious-nesterov-wd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=WD,
        cautious=True,
    ),
    case("SGD", "cautious-plain", lr=0.1, cautious=True),  # no momentum: no effect
    case("Adagrad", "plain", lr=0.1),
    case("Adagrad", "lr_decay", lr=0.1, lr_decay=0.2),
    case("Adagrad", "initial_accumulator_value", lr=0.1, initial_accumulator_value=0.3),
    case("Adagrad", "weight_decay", lr=0.1, weight_decay=WD),
    case("Adagrad", "maximize", lr=0.1, maximize=True),
    case("RMSprop", "plain", lr=0.01),
    case("RMSprop", "centered", lr=0.01, centered=True),
    case("RMSprop", "momentum", lr=0.01, momentum=0.9),
    case("RMSprop", "centered-momentum", lr=0.01, centered=True, momentum=0.9),
    case("RMSprop", "weight_decay", lr=0.01, weight_decay=WD),
    case("RMSprop", "maximize", lr=0.01, alpha=0.9, maximize=True),  # and a non-default alpha
    case("Adadelta", "plain", lr=1.0),
    case("Adadelta", "weight_decay", lr=1.0, weight_decay=WD),
    case("Adadelta", "maximize", lr=0.5, rho=0.8, maximize=True),
    case("Adam", "plain", lr=0.01),
    case("Adam", "amsgrad", lr=0.01, betas=(0.9, 0.8), amsgrad=True),  # max matters sooner
    case("Adam", "weight_decay", lr=0.01, weight_decay=WD),
    case("Adam", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("Adam", "maximize", lr=0.01, maximize=True),
    case("Adam", "amsgrad-wd-maximize", lr=0.01, amsgrad=True, weight_decay=WD, maximize=True),
    case("Adam", "cautious", lr=0.01, weight_decay=WD, cautious=True),
    case("Adam", "cautious-amsgrad-max", lr=0.01, amsgrad=True, maximize=True, cautious=True),
    case("AdamW", "plain", lr=0.01),
    case("AdamW", "amsgrad", lr=0.01, amsgrad=True, weight_decay=0.05),
    case("AdamW", "cautious", lr=0.01, weight_decay=0.05, cautious=True),
    case("Adamax", "plain", lr=0.01),
    case("Adamax", "weight_decay", lr=0.01, weight_decay=WD),
    case("Adamax", "maximize", lr=0.01, maximize=True),
    case("NAdam", "plain", lr=0.01),
    case("NAdam", "weight_decay", lr=0.01, weight_decay=WD),
    case("NAdam", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("NAdam", "momentum_decay", lr=0.01, momentum_decay=0.3),  # mu_t varies faster
    case("NAdam", "maximize", lr=0.01, maximize=True),
    case(
        "NAdam", "cautious", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, cautious=True
    ),
    # rho_t > 5 first at step 6 (beta2 = 0.999): steps 1-5 unrectified, 6-9 rectified.
    case("RAdam", "plain", steps=9, lr=0.01),
    case("RAdam", "weight_decay", steps=9, lr=0.01, weight_decay=WD),
    case("RAdam", "decoupled", steps=9, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("RAdam", "maximize", steps=9, lr=0.01, maximize=True),
    case("RAdam", "cautious", steps=9, lr=0.01, weight_decay=WD, maximize=True, cautious=True),
    case("Lion", "plain", lr=1e-3),
    case("Lion", "weight_decay", lr=1e-3, weight_decay=0.5),
    case("Lion", "maximize", lr=1e-3, betas=(0.95, 0.98), maximize=True),
    case("Lion", "cautious", lr=1e-3, weight_decay=0.5, cautious=True),
    # Rprop: lr only fills step_size at creation (the halfway change does nothing, as in torch).
    case("Rprop", "plain", lr=0.01),
    case("Rprop", "maximize", lr=0.01, etas=(0.3, 1.5), maximize=True),
    case("Rprop", "etas", lr=2e-4, etas=(0.5, 1.5)),  # torch's optim_db options
    case("Rprop", "step_sizes", steps=9, lr=2e-4, step_sizes=(2e-6, 100)),
    # step_size clamped at both ends: 0.01 -> 0.02 (max) after 1.2^4; 0.01 * 0.1 -> 4e-3 (min)
    case("Rprop", "clamps", steps=8, lr=0.01, etas=(0.1, 1.2), step_sizes=(4e-3, 0.02)),
    case("Rprop", "large_lr", lr=100.0),  # clamped to step_sizes[1] = 50 at once
    # ASGD: eta and mu follow the lr one step late (as in torch); t0 small enough that the
    # averaging (mu < 1) starts within the run; torch's optim_db options (lambd, lr, t0,
    # maximize, weight_decay) with WD for the decay.
    case("ASGD", "plain", lr=0.02),
    case("ASGD", "lambd", lr=0.05, lambd=0.1, alpha=0.5),
    case("ASGD", "t0", steps=9, lr=0.02, t0=3),
    case("ASGD", "weight_decay", lr=0.02, weight_decay=WD, t0=2),
    case("ASGD", "maximize", lr=0.02, maximize=True, t0=2),
    case("ASGD", "wd-maximize", steps=9, lr=0.05, lambd=0.1, weight_decay=WD, maximize=True, t0=1),
    # ADOPT: step 1 only sets exp_avg_sq = g^2; from step 2 the clip c_t = (t - 1)^(1/4) binds
    # often on the unit family (|g_t| > c_t sqrt(v_{t-1})); with eps = 1e-6 the 1e-7 family is
    # divided by eps, with eps = 1e-8 by its own sqrt(v).
    case("ADOPT", "plain", lr=0.01),
    case("ADOPT", "no_clip", lr=0.01, clip=False),
    case("ADOPT", "weight_decay", lr=0.01, weight_decay=WD),
    case("ADOPT", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("ADOPT", "maximize", lr=0.01, betas=(0.8, 0.9), eps=1e-8, maximize=True),
    case(
        "ADOPT", "cautious", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, cautious=True
    ),
    # LAMB: per-tensor trust ratio min(||p||, max_weight_norm) / ||u|| (the families' tensors
    # have norms from ~0.1 to ~10: the "weight_norm" clamp binds for the larger ones)
    case("LAMB", "plain", lr=0.01),
    case("LAMB", "no_bias_correction", lr=0.01, bias_correction=False),
    case("LAMB", "weight_decay", lr=0.01, weight_decay=WD),
    case("LAMB", "decoupled", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("LAMB", "weight_norm", lr=0.01, max_weight_norm=0.5),
    case("LAMB", "trust_clip", lr=0.01, max_weight_norm=None, max_trust_ratio=0.02),
    case("LAMB", "maximize", lr=0.01, betas=(0.8, 0.9), eps=1e-8, maximize=True),
    # LARS: trust ratio trust_coefficient * ||p|| / (||g|| + wd ||p||), tensors with ndim <= 1
    # excluded (plain momentum SGD) unless exclude_1d=False
    case("LARS", "plain", lr=0.5, trust_coefficient=0.02),
    case("LARS", "no_momentum", lr=0.5, momentum=0, trust_coefficient=0.02),
    case("LARS", "nesterov", lr=0.5, nesterov=True, trust_coefficient=0.02),
    case("LARS", "weight_decay", lr=0.5, weight_decay=WD, dampening=0.3, trust_coefficient=0.02),
    case("LARS", "all_tensors", lr=0.5, weight_decay=WD, exclude_1d=False, trust_coefficient=0.02),
    case("LARS", "maximize", lr=0.2, momentum=0.5, maximize=True),
    # Schedule-Free (the schedulefree package's classes): warmup over the first steps, the
    # lr-squared weighting (weight_lr_power) and the polynomial one (r); the halfway lr drop
    # leaves lr_max (and so the weights) at the earlier, larger lr.
    case("AdamWScheduleFree", "plain", lr=0.01),
    case("AdamWScheduleFree", "warmup", lr=0.01, warmup_steps=4),
    case("AdamWScheduleFree", "weight_decay", lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
    case("AdamWScheduleFree", "r", lr=0.01, warmup_steps=2, r=1.0, weight_lr_power=0.0),
    case("AdamWScheduleFree", "maximize", lr=0.01, eps=1e-6, maximize=True),
    case("SGDScheduleFree", "plain", lr=0.1),
    case("SGDScheduleFree", "warmup", lr=0.1, momentum=0.5, warmup_steps=4),
    case("SGDScheduleFree", "weight_decay", lr=0.1, weight_decay=WD),
    case("SGDScheduleFree", "r", lr=0.1, warmup_steps=2, r=2.0, weight_lr_power=1.0),
    case("SGDScheduleFree", "maximize", lr=0.1, momentum=0.95, maximize=True),
    # SparseAdam with dense gradients (every element present): torch's optim_db options
    # (default, lr, maximize) and betas; its rows: tests/test_sparse.py
    case("SparseAdam", "plain", lr=0.01),
    case("SparseAdam", "betas", lr=0.02, betas=(0.8, 0.99), eps=1e-6),
    case("SparseAdam", "maximize", lr=0.01, maximize=True),
]


def richest(opt: str, curated: Iterable[Case] = ()) -> Case:
    """`opt`'s case in `curated` if there is one, else its first case in CASES among those whose
    options create the most state buffers: one option set per optimizer, so that a test's list
    covers every optimizer of ``fastoptim.definitions.ALL`` without naming it."""
    mine = [c for c in curated if c.opt == opt]
    if mine:
        return mine[0]
    d = next(d for d in definitions.ALL if d.name == opt)

    def nstates(c: Case) -> int:
        return len(d.compile({**d.defaults(), **c.kwargs}).state_names())

    return max((c for c in CASES if c.opt == opt), key=nstates)


def one_per_optimizer(curated: Iterable[Case] = ()) -> list[Case]:
    """:func:`richest` for every optimizer, in ``definitions.ALL`` order."""
    curated = list(curated)
    return [richest(d.name, curated) for d in definitions.ALL]


def each_case(cases: Iterable[Case]) -> pytest.MarkDecorator:
    """Parametrize a test's ``case`` argument over `cases`, with ids such as ``Adam-amsgrad``."""
    return pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in cases])


DTYPES = [np.float32, np.float64]
every_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)

#: For a test whose result cannot depend on the instruction set (imports, OpenMP runtimes,
#: torch's option lists: no kernel's numbers checked).  CI runs the suite once with every ISA,
#: then the files of ``.ci/per-isa-tests`` once per other ``FASTOPT_ISA``; such a test runs in
#: the first only.
once_not_per_isa = pytest.mark.skipif(
    bool(os.environ.get("FASTOPT_ISA", "").strip()),
    reason="does not depend on the instruction set: run once, not once per ISA",
)


# ----------------------------------------------------------------------------- the problem
def make_problem(
    rng: np.random.Generator, shapes: list[tuple[int, ...]], grad_scale: float = 1.0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Initial parameters (float64 holding float32-representable values, about 0.1 in size so
    that a few steps move them noticeably even in float32) and per-element gradient scales: 0
    for about 10% of the elements (exact zeros at every step), else `grad_scale`."""
    params, scales = [], []
    for shape in shapes:
        p = np.asarray(0.1 * rng.standard_normal(shape))
        params.append(p.astype(np.float32).astype(np.float64))
        scales.append(np.where(np.asarray(rng.random(shape)) < 0.1, 0.0, grad_scale))
    return params, scales


def make_families(
    rng: np.random.Generator, shapes: list[tuple[int, ...]], tiny_shapes: list[tuple[int, ...]]
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """One group of tensors in two gradient families: `shapes` with unit-scale gradients
    (family 0), then `tiny_shapes` with 1e-7-scale ones (family 1).  Returns the initial
    parameters, the gradient scales (see :func:`make_problem`) and each tensor's family."""
    p0, scales = make_problem(rng, shapes)
    p_tiny, s_tiny = make_problem(rng, tiny_shapes, grad_scale=1e-7)
    family = [0] * len(shapes) + [1] * len(tiny_shapes)
    return p0 + p_tiny, scales + s_tiny, family


def make_grads(rng: np.random.Generator, scales: list[np.ndarray]) -> list[np.ndarray]:
    """float64 gradients that are exactly representable in float32."""
    return [
        np.asarray(rng.standard_normal(s.shape) * s).astype(np.float32).astype(np.float64)
        for s in scales
    ]


# ----------------------------------------------------------------------------- the tolerance
class Scales:
    """The largest |value| each kind of array (``"param"``, a state name...) has reached so far,
    per gradient family: the M of ``atol = K * eps * M``.  Rounding errors are absolute at the
    scale of the operands, which M bounds, and the tiny family has its own M, so that its
    1e-7..1e-14 states are judged at their own scale."""

    def __init__(self, family: list[int]) -> None:
        self.family = family  # the family of each tensor, by index
        self._biggest: dict[tuple[int, str], float] = {}

    def update(self, i: int, kind: str, value: np.ndarray) -> None:
        """Take tensor `i`'s current `kind` array into account."""
        if value.size:
            key = (self.family[i], kind)
            self._biggest[key] = max(self._biggest.get(key, 0.0), float(np.max(np.abs(value))))

    def __call__(self, i: int, kind: str) -> float:
        """M for tensor `i`'s `kind` array (KeyError if its family has none yet)."""
        return self._biggest[self.family[i], kind]

    def get(self, i: int, kind: str) -> float:
        """M for tensor `i`'s `kind` array, 0 if its family has none yet."""
        return self._biggest.get((self.family[i], kind), 0.0)


def check_close(
    what: str,
    got: np.ndarray,
    want: np.ndarray,
    rtol: float,
    atol: float,
    mask: np.ndarray | None = None,
) -> None:
    """Same shape, and |got - want| <= atol + rtol * |want| elementwise in float64 (NaN fails),
    outside `mask` if given."""
    assert np.shape(got) == np.shape(want), f"{what}: shape {np.shape(got)} != {np.shape(want)}"
    want = np.asarray(want, dtype=np.float64)
    err = np.abs(np.asarray(got, dtype=np.float64) - want)
    ok = err <= atol + rtol * np.abs(want)
    if mask is not None:
        ok |= mask
    if not ok.all():
        bad = np.flatnonzero(~ok.ravel())
        i = bad[0]
        raise AssertionError(
            f"{what}: {bad.size} of {ok.size} elements differ beyond atol={atol:.3g} + "
            f"rtol={rtol:.3g} * |want|; first at flat index {i}: got={got.ravel()[i]!r} "
            f"want={want.ravel()[i]!r}; largest error {np.nanmax(np.where(ok, 0, err)):.3g}"
        )


def check_close_nonfinite(
    what: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float
) -> None:
    """NaN exactly where `want` has NaN, +-Inf exactly where it has +-Inf, and the finite
    elements within :func:`check_close`'s tolerance."""
    finite = np.isfinite(want)
    assert np.array_equal(np.isnan(got), np.isnan(want)), what
    infinite = ~finite & ~np.isnan(want)
    assert np.array_equal(got[infinite], want[infinite]), what
    check_close(what, got[finite], want[finite], rtol, atol)


def fail_second_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``fastoptim.load``'s second read (into the live arrays, after every check passed)
    fail with an I/O error, as a disk can; its first reads (the checks) work."""
    from fastoptim import checkpoint

    read = checkpoint._read_array

    def failing(*args: Any, into: Any = None, **kwargs: Any) -> Any:
        if into is not None:
            raise OSError(5, "Input/output error")
        return read(*args, into=into, **kwargs)

    monkeypatch.setattr(checkpoint, "_read_array", failing)
