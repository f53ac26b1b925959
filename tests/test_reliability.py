"""Regression tests for faults an outside attack found in v0.1 (each named after its fault)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import fastoptim as fo

# A variant switched on through param_groups needs a state buffer the optimizer did not have.
SWITCHES: list[tuple[Callable[[list[np.ndarray]], Any], str, Any]] = [
    (lambda ps: fo.SGD(ps, lr=0.1), "momentum", 0.9),
    (lambda ps: fo.RMSprop(ps), "momentum", 0.5),
    (lambda ps: fo.RMSprop(ps), "centered", True),
    (lambda ps: fo.Adam(ps), "amsgrad", True),
]


def _everything(opt: Any) -> list[Any]:
    sd = opt.state_dict()
    arrays = [a.tobytes() for st in sd["state"].values() for a in st.values()]
    return [repr({k: v for k, v in sd.items() if k != "state"}), arrays]


@pytest.mark.parametrize(("make", "key", "value"), SWITCHES, ids=lambda x: str(x)[:12])
def test_checkpoint_after_switching_a_variant_loads(
    make: Callable[[list[np.ndarray]], Any], key: str, value: Any, tmp_path: Path
) -> None:
    """Saving right after switching a variant on wrote a file load rejected (even into the
    optimizer that wrote it).  Now state_dict/save see the groups as the next step will: the
    round trips succeed, change nothing, and the run continues as without them."""
    params = [np.zeros(4, np.float32)]
    twin = [np.zeros(4, np.float32)]
    opt, ref = make(params), make(twin)
    g = np.linspace(-1, 1, 4, dtype=np.float32)
    for o in (opt, ref):
        o.step([g])
        o.param_groups[0][key] = value
    before = _everything(opt)
    opt.load_state_dict(opt.state_dict())
    fo.save(tmp_path / "run.npz", opt)
    fo.load(tmp_path / "run.npz", opt)
    assert _everything(opt) == before
    for _ in range(3):
        opt.step([g])
        ref.step([g])
    assert params[0].tobytes() == twin[0].tobytes()
    for name in ref.state[0]:
        assert np.array_equal(opt.state[0][name], ref.state[0][name]), name


def test_memory_shared_across_groups_is_rejected() -> None:
    """A state view or a gradient buffer of one group used as another group's parameter or
    gradient was accepted (and corrupted state); within one group it always was rejected."""
    a, b = np.zeros(4), np.zeros(4)
    opt = fo.Adam([{"params": [a]}])
    opt.step([np.ones(4)])
    before = [x.copy() for x in (a, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"])]
    with pytest.raises(ValueError, match="param 1 shares memory with the 'exp_avg' state"):
        opt.add_param_group({"params": [opt.state[0]["exp_avg"]]})
    with pytest.raises(ValueError, match="gradient buffers"):
        opt.add_param_group({"params": [opt.grads[0]]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b]})
    with pytest.raises(ValueError, match="grad for param 1 shares memory with the 'exp_avg_sq'"):
        opt.step([np.ones(4), opt.state[0]["exp_avg_sq"]])
    with pytest.raises(ValueError, match="grad for param 1 shares memory with param 0"):
        opt.step([np.ones(4), a])
    after = (a, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"])
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    assert not b.any() and opt.step_count == 1


@pytest.mark.parametrize("value", [10**309, -(10**309), float("inf"), float("nan")])
def test_huge_hyper_parameter_is_a_value_error(value: Any) -> None:
    """lr=10**309 raised OverflowError from deep inside the check."""
    w = np.zeros(3)
    with pytest.raises(ValueError, match="invalid lr="):
        fo.SGD([w], lr=value)
    opt = fo.SGD([w], lr=0.1)
    opt.param_groups[0]["lr"] = value
    with pytest.raises(ValueError, match="invalid lr="):
        opt.step([np.ones(3)])
    assert not w.any()
