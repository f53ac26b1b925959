"""Random sequences of public calls against the plain-NumPy reference (hypothesis stateful).

Each machine drives one compiled optimizer and its :mod:`fastoptim.reference` twin (the same
engine, the arithmetic in NumPy) through steps with passed and bound gradients, edits of
``param_groups`` (variant switches included: momentum 0 -> x, amsgrad, centered), schedules,
``add_param_group``, ``zero_grad``, ``state_dict``/``load_state_dict`` and file round trips,
and rejected calls.  After every rule:

- the parameters and every state array agree with the reference (float64, a few ulps);
- a round trip through ``state_dict``/``load_state_dict`` or ``save``/``load`` succeeds and
  changes nothing (the same ``state_dict`` before and after), whatever came before;
- a rejected call changed nothing.

The example budget is small in CI (12 sequences of 25 calls); ``FASTOPT_STATEFUL_EXAMPLES=N``
runs more.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fastoptim as fo
from fastoptim import reference, schedules

EXAMPLES = int(os.environ.get("FASTOPT_STATEFUL_EXAMPLES", "12"))
# The engine's logic does not depend on the instruction set: CI's per-ISA runs skip this.
pytestmark = pytest.mark.skipif(
    bool(os.environ.get("FASTOPT_ISA")), reason="engine logic: run once, not once per ISA"
)

# Optimizer -> hyper-parameter edits (name -> values it may take).  Values 0 and non-zero of
# momentum, and the flags, switch variants on and off (state buffers appear).
EDITS: dict[str, dict[str, list[Any]]] = {
    "SGD": {
        "lr": [0.05, 0.1, schedules.linear(0.1, 0.01, 20)],
        "momentum": [0.0, 0.5, 0.9],
        "weight_decay": [0.0, 0.125],
        "maximize": [False, True],
    },
    "Adam": {
        "lr": [0.01, schedules.cosine(0.02, 30)],
        "amsgrad": [False, True],
        "weight_decay": [0.0, 0.125],
        "betas": [(0.9, 0.999), (0.8, 0.9), (schedules.linear(0.8, 0.95, 10), 0.99)],
    },
    "RMSprop": {
        "lr": [0.01, 0.005],
        "momentum": [0.0, 0.5],
        "centered": [False, True],
        "alpha": [0.99, 0.9],
    },
    "Adagrad": {"lr": [0.1, 0.05], "lr_decay": [0.0, 0.1], "weight_decay": [0.0, 0.125]},
    "NAdam": {"lr": [0.01, 0.002], "momentum_decay": [4e-3, 1e-2], "weight_decay": [0.0, 0.125]},
    "Lion": {"lr": [1e-3, 1e-4], "betas": [(0.9, 0.99), (0.5, 0.9)], "cautious": [False, True]},
    "ADOPT": {"lr": [0.01, 0.002], "clip": [True, False], "cautious": [False, True]},
    "Rprop": {
        "lr": [0.01, 0.1],
        "etas": [(0.5, 1.2), (0.3, 1.5)],
        "step_sizes": [(1e-6, 50), (1e-3, 0.05)],
    },
}
SHAPES = [(3,), (2, 5), (3,), (17,)]


def _state_bytes(opt: fo.Optimizer) -> dict[Any, dict[str, bytes]]:
    return {
        k: {n: a.tobytes() for n, a in st.items() if isinstance(a, np.ndarray)}
        for k, st in opt.state.items()
    }


def _summary(opt: fo.Optimizer) -> Any:
    """Everything observable: the state_dict's plain data and every array's bytes."""
    sd = opt.state_dict()
    meta = {k: v for k, v in sd.items() if k != "state"}
    arrays = {k: {n: a.tobytes() for n, a in s.items()} for k, s in sd["state"].items()}
    return repr(meta), arrays


class OptimizerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="fastoptim-stateful-"))

    @initialize(name=st.sampled_from(sorted(EDITS)), seed=st.integers(0, 2**16))
    def build(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.params = [self.rng.standard_normal(SHAPES[0]), self.rng.standard_normal(SHAPES[1])]
        self.twins = [p.copy() for p in self.params]
        self.opt = getattr(fo, name)([{"params": self.params[:1]}, {"params": self.params[1:]}])
        self.ref = getattr(reference, name)(
            [{"params": self.twins[:1]}, {"params": self.twins[1:]}]
        )

    # ----------------------------------------------------------------- steps
    def _grads(self) -> list[np.ndarray]:
        return [self.rng.standard_normal(p.shape) for p in self.params]

    @rule()
    def step_passed(self) -> None:
        grads = self._grads()
        self.opt.step(grads)
        self.ref.step([g.copy() for g in grads])

    @rule()
    def step_bound(self) -> None:
        for a, b, g in zip(self.opt.grads, self.ref.grads, self._grads()):
            a[...] = g
            b[...] = g
        self.opt.step()
        self.ref.step()

    @rule()
    def zero_grad(self) -> None:
        self.opt.zero_grad()
        self.ref.zero_grad()

    # ----------------------------------------------------------------- edits
    @rule(data=st.data())
    def edit(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(EDITS[self.name])))
        value = data.draw(st.sampled_from(EDITS[self.name][key]))
        gi = data.draw(st.integers(0, len(self.opt.param_groups) - 1))
        self.opt.param_groups[gi][key] = value
        self.ref.param_groups[gi][key] = value

    @precondition(lambda self: len(self.params) < len(SHAPES))
    @rule()
    def add_group(self) -> None:
        p = self.rng.standard_normal(SHAPES[len(self.params)])
        self.params.append(p)
        self.twins.append(p.copy())
        self.opt.add_param_group({"params": [p]})
        self.ref.add_param_group({"params": [self.twins[-1]]})

    # ----------------------------------------------------------------- round trips
    @rule()
    def state_dict_round_trip(self) -> None:
        for opt in (self.opt, self.ref):
            before = _summary(opt)
            opt.load_state_dict(opt.state_dict())
            assert _summary(opt) == before

    @rule()
    def file_round_trip(self) -> None:
        for opt in (self.opt, self.ref):
            before = _summary(opt)
            path = self.tmp / "ckpt.npz"
            fo.save(path, opt)
            fo.load(path, opt)
            assert _summary(opt) == before

    # ----------------------------------------------------------------- rejected calls
    def opt_params(self) -> list[np.ndarray]:
        return self.params

    @rule(kind=st.sampled_from(["shape", "dtype", "count", "alias"]))
    def rejected_step(self, kind: str) -> None:
        grads = self._grads()
        if kind == "shape":
            grads[0] = np.zeros(grads[0].size + 1)
        elif kind == "dtype":
            grads[-1] = grads[-1].astype(np.float32)
        elif kind == "count":
            grads = grads[:-1]
        else:
            # another group's parameter or state of the same shape (else the parameter itself)
            shape = self.params[-1].shape
            others = [p for p in self.params[:-1] if p.shape == shape] + [
                a
                for st_ in list(self.opt.state.values())[:-1]
                for a in st_.values()
                if isinstance(a, np.ndarray) and a.shape == shape
            ]
            grads[-1] = others[-1] if others else self.params[-1]
        # A group edit since the last step (e.g. amsgrad switched on) gets its new, fresh state
        # buffer when the optimizer next looks at the groups (state_dict, save, step): that is
        # the edit's doing, not the rejected step's.
        self.opt.state_dict()
        self.ref.state_dict()
        before = (
            [p.tobytes() for p in self.opt_params()],
            _state_bytes(self.opt),
            self.opt.step_count,
        )
        with pytest.raises((TypeError, ValueError)):
            self.opt.step(grads)
        after = (
            [p.tobytes() for p in self.opt_params()],
            _state_bytes(self.opt),
            self.opt.step_count,
        )
        assert after == before

    # ----------------------------------------------------------------- invariants
    @invariant()
    def agrees_with_the_reference(self) -> None:
        if not hasattr(self, "opt"):
            return
        assert self.opt.step_count == self.ref.step_count
        for i, (p, q) in enumerate(zip(self.params, self.twins)):
            np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-12, err_msg=f"param {i}")
        mine, theirs = self.opt.state, self.ref.state
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert mine[k].keys() == theirs[k].keys(), k
            for n, a in mine[k].items():
                if isinstance(a, np.ndarray):
                    np.testing.assert_allclose(a, theirs[k][n], rtol=1e-9, atol=1e-12)
                else:
                    assert a == theirs[k][n]

    def teardown(self) -> None:
        for f in self.tmp.iterdir():
            f.unlink()
        self.tmp.rmdir()


OptimizerMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOptimizerMachine = OptimizerMachine.TestCase
