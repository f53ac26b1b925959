"""ADOPT against the published implementations (each skipped when it is not installed).

``fastoptim.torch.ADOPT`` runs the table's ADOPT cases (``cases.CASES``) next to:

* the authors' implementation (``pip install torch-adopt``, module ``adopt``), the definition
  fastoptim follows: every case, its ``clip_lambda=None`` for ``clip=False`` and its
  ``decouple`` for ``decoupled_weight_decay``;
* ``pytorch_optimizer.ADOPT``, which differs from the authors' in two documented places that
  are mapped here rather than followed: its clip schedule is evaluated at the 1-based step
  (``clip_lambda(t) = t**0.25``, where the authors' is ``(t - 1)**0.25``: the test passes
  ``lambda t: (t - 1) ** 0.25``), and its decoupled decay also shrinks the parameter at the
  initialising first step (the decoupled case is left out).

The NumPy reference (``fastoptim.reference.ADOPT``) is checked by test_kernels.py like every
optimizer.  Same run as test_torch_optim.py's trajectory test: 120 steps, a learning-rate
change halfway, float32 and float64, every layout of LAYOUTS; parameters and every state
tensor compared element by element with ``rtol = RTOL_ULPS * eps(dtype)`` and
``atol = rtol * M`` (M: the largest |value| of that array's kind in its gradient family).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim  # noqa: E402
import fastoptim.torch as fot  # noqa: E402
from cases import CASES, Case, Scales, check_close, each_case, every_dtype  # noqa: E402
from test_torch_optim import RTOL_ULPS, make_run, set_grads  # noqa: E402

STEPS = 120
ADOPT_CASES = [
    c for c in CASES if c.opt == "ADOPT" and not c.kwargs.get("cautious")
]  # theirs: no mask


def _authors(params: list[Any], kwargs: dict[str, Any]) -> Any:
    adopt = pytest.importorskip("adopt")
    if not hasattr(adopt, "ADOPT"):
        pytest.skip("the module 'adopt' is not the authors' torch-adopt")
    kw = dict(kwargs)
    if not kw.pop("clip", True):
        kw["clip_lambda"] = None
    if "decoupled_weight_decay" in kw:
        kw["decouple"] = kw.pop("decoupled_weight_decay")
    return adopt.ADOPT(params, foreach=False, **kw)


def _pytorch_optimizer(params: list[Any], kwargs: dict[str, Any]) -> Any:
    po = pytest.importorskip("pytorch_optimizer")
    kw = dict(kwargs)
    clip = kw.pop("clip", True)
    assert not kw.get("decoupled_weight_decay"), "not comparable (see the module docstring)"
    kw.pop("decoupled_weight_decay", None)
    return po.ADOPT(
        params, foreach=False, clip_lambda=(lambda t: (t - 1) ** 0.25) if clip else None, **kw
    )


def run_against(
    case: Case,
    dtype: Any,
    rng: np.random.Generator,
    make_ref: Callable[[list[Any], dict[str, Any]], Any],
) -> None:
    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    ours, theirs, gscales, family = make_run(rng, dtype)
    ref = make_ref(theirs, case.kwargs)
    fast = fot.ADOPT(ours, **case.kwargs)
    scales = Scales(family)
    # As in test_torch_optim.py: with L2 weight decay the elements with zero or tiny gradients
    # oscillate around 0 where an ulp decides the next sign; compared for 10 steps only.
    l2 = case.kwargs.get("weight_decay", 0) and not case.kwargs.get("decoupled_weight_decay")
    chaotic = [s < 1e-3 if l2 else None for s in gscales]
    if l2 and fastoptim.isa() == "scalar":
        # The baseline x86-64 build has no FMA (two roundings where torch fuses): with L2 decay,
        # g / max(sqrt(v), eps) of the elements whose gradient is exactly 0 divides two
        # nearly equal small numbers, which doubles those differences by step 10.
        rtol *= 4
    for t in range(1, STEPS + 1):
        if t == STEPS // 2 + 1:
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = case.kwargs["lr"] * case.new_lr_factor
        set_grads(rng, gscales, t, ours, theirs)
        fast.step()
        ref.step()
        if not (t % 10 == 0 or t in (1, 2, 3, STEPS // 2 + 1)):
            continue
        if t == 1:  # the initialising step: the parameters and exp_avg are untouched
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b)
                assert not fast.state[a]["exp_avg"].any()
        masks = chaotic if t > 10 else [None] * len(ours)
        for i, b in enumerate(theirs):
            scales.update(i, "param", b.detach().numpy())
            for n in ("exp_avg", "exp_avg_sq"):
                scales.update(i, n, ref.state[b][n].numpy())
        for i, (a, b) in enumerate(zip(ours, theirs)):
            where = f"{case.id} step {t} tensor {i}"
            for n in ("exp_avg", "exp_avg_sq"):
                got, want = fast.state[a][n], ref.state[b][n]
                assert got.dtype == want.dtype and got.shape == want.shape, where
                check_close(
                    f"{where} {n}", got.numpy(), want.numpy(), rtol, rtol * scales(i, n), masks[i]
                )
            check_close(
                f"{where} param",
                a.detach().numpy(),
                b.detach().numpy(),
                rtol,
                rtol * scales(i, "param"),
                masks[i],
            )
            if "step" in ref.state[b]:
                assert float(fast.state[a]["step"]) == float(ref.state[b]["step"]) == t


# torch-adopt 0.1.0 calls torch helpers that recent torch deprecates.
AUTHORS_WARNINGS = (
    "ignore:Use _accelerator_graph_capture_health_check:DeprecationWarning",
    "ignore:`torch._utils.is_compiling` is deprecated:UserWarning",
)


@pytest.mark.filterwarnings(*AUTHORS_WARNINGS)
@every_dtype
@each_case(ADOPT_CASES)
def test_matches_the_authors_adopt(case: Case, dtype: Any, rng: np.random.Generator) -> None:
    run_against(case, dtype, rng, _authors)


@every_dtype
@each_case([c for c in ADOPT_CASES if not c.kwargs.get("decoupled_weight_decay")])
def test_matches_pytorch_optimizer_adopt(case: Case, dtype: Any, rng: np.random.Generator) -> None:
    run_against(case, dtype, rng, _pytorch_optimizer)


@pytest.mark.filterwarnings(*AUTHORS_WARNINGS)
def test_defaults_are_the_authors() -> None:
    """lr, betas, eps, weight_decay and the clipping schedule's presence, as the authors'."""
    adopt = pytest.importorskip("adopt")
    if not hasattr(adopt, "ADOPT"):
        pytest.skip("the module 'adopt' is not the authors' torch-adopt")
    p = torch.zeros(2, requires_grad=True)
    theirs = adopt.ADOPT([p]).defaults
    ours = fot.ADOPT([torch.zeros(2, requires_grad=True)]).defaults
    for k in ("lr", "betas", "eps", "weight_decay", "maximize"):
        assert ours[k] == theirs[k], k
    assert ours["decoupled_weight_decay"] == theirs["decouple"]
    assert ours["clip"] is True
