"""Checkpoints and the optimizer's lock, from an audit: states a checkpoint lacks, checkpoints
inside ``ema_weights()``, checkpoints taken while another thread steps, re-entrant calls,
destinations checked before a load changes anything, parameters in other groups, copy-out
arrays after a load, strict JSON metadata, file names and error messages."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from fastoptim import checkpoint, schedules
from test_checkpoint_files import snapshot

BF16 = np.dtype(ml_dtypes.bfloat16)


def grads(t: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(t)
    return {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}


def make(cls: Any = fo.Adam, **kw: Any) -> tuple[dict[str, np.ndarray], Any]:
    params = {
        "w": np.linspace(-1, 1, 600, dtype=np.float32).reshape(20, 30),
        "b": np.linspace(1, 2, 7, dtype=np.float32),
    }
    kw.setdefault("lr", 1e-2)
    return params, cls(params, **kw)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def finishes(fn: Callable[[], Any], timeout: float = 60) -> Any:
    """fn() in a daemon thread: its result, or its exception raised here; a hang fails the
    test instead of blocking the run."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung (a thread waiting for itself?)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


# --------------------------------------------------- a state the checkpoint does not have
OPTION_SWITCHES = [
    (fo.Adam, {"amsgrad": True}),
    (fo.SGD, {"momentum": 0.9}),
    (fo.RMSprop, {"centered": True, "momentum": 0.5}),
]


@pytest.mark.parametrize(("cls", "option"), OPTION_SWITCHES, ids=["amsgrad", "sgd", "rmsprop"])
@pytest.mark.parametrize("via", ["file", "state_dict"])
def test_state_the_checkpoint_lacks_is_as_in_a_new_optimizer(
    tmp_path: Path, cls: Any, option: dict[str, Any], via: str
) -> None:
    """Saved without an option's state, loaded into an optimizer built with the option (the
    checkpoint's hyper-parameters win): afterwards the optimizer is the saved one exactly.
    Its state_dict lists no state it has no array for, so it loads back (into itself, into a
    fresh optimizer), and setting the option again allocates the state anew, as in the saved
    optimizer."""
    ref_params, ref = make(cls)  # the run that was saved, continued without interruption
    params, saved = make(cls)
    for t in range(3):
        ref.step(grads(t, ref_params))
        saved.step(grads(t, params))
    path = tmp_path / "a.npz"
    fo.save(path, saved)
    params2, opt = make(cls, **option)
    if via == "file":
        fo.load(path, opt)
    else:
        opt.load_state_dict(saved.state_dict())
        for k in params2:
            np.copyto(params2[k], params[k])
    assert set(opt.state["w"]) == set(saved.state["w"])
    sd = opt.state_dict()
    assert sd["param_groups"][0]["states"] == sorted(n for n in saved.state["w"] if n != "step")
    opt.load_state_dict(sd)  # its own state_dict loads back
    fo.save(tmp_path / "b.npz", opt)
    fo.load(tmp_path / "b.npz", opt)
    fo.load(tmp_path / "b.npz", make(cls)[1])
    for t in range(3, 5):
        ref.step(grads(t, ref_params))
        opt.step(grads(t, params2))
    # the option switched on now: as in the saved run
    ref.param_groups[0].update(option)
    opt.param_groups[0].update(option)
    for t in range(5, 8):
        ref.step(grads(t, ref_params))
        opt.step(grads(t, params2))
    for k in ref_params:
        assert same_bits(ref_params[k], params2[k])
        assert set(ref.state[k]) == set(opt.state[k])
        for n, a in ref.state[k].items():
            if isinstance(a, np.ndarray):
                assert same_bits(a, opt.state[k][n]), n
    fo.save(tmp_path / "c.npz", opt)
    fo.load(tmp_path / "c.npz", make(cls, **option)[1])


def test_ema_the_checkpoint_lacks_is_dropped(tmp_path: Path) -> None:
    """Saved without ema_decay, loaded into an optimizer built with it: no EMA (as saved);
    setting ema_decay again starts one as in the optimizer that was saved."""
    params, opt = make(fo.AdamW)
    opt.step(grads(0, params))
    fo.save(tmp_path / "a.npz", opt)
    params2, opt2 = make(fo.AdamW, ema_decay=0.9)
    fo.load(tmp_path / "a.npz", opt2)
    assert opt2.param_groups[0]["ema_decay"] is None and "ema" not in opt2.state["w"]
    opt2.load_state_dict(opt2.state_dict())
    with pytest.raises(ValueError, match="no parameter has an EMA"), opt2.ema_weights():
        pass
    for o, p in ((opt, params), (opt2, params2)):
        o.param_groups[0]["ema_decay"] = 0.5
        o.step(grads(1, p))
    assert same_bits(opt.state["w"]["ema"], opt2.state["w"]["ema"])
    assert same_bits(params["w"], params2["w"])


# --------------------------------------------------------------------- ema_weights
def test_checkpoints_inside_ema_weights_are_refused(tmp_path: Path) -> None:
    """fo.save would record the EMA as the parameters, fo.load and load_state_dict would be
    undone by the block's exit, pickling would copy the EMA as the parameters: each raises,
    changing nothing.  state_dict() holds no parameter values: allowed."""
    params, opt = make(fo.AdamW, ema_decay=0.9)
    for t in range(3):
        opt.step(grads(t, params))
    fo.save(tmp_path / "good.npz", opt)
    sd = opt.state_dict()
    before = snapshot(opt, params)
    with opt.ema_weights():
        inside = {k: p.copy() for k, p in params.items()}
        with pytest.raises(RuntimeError, match=r"save: inside ema_weights\(\)"):
            fo.save(tmp_path / "x.npz", opt)
        with pytest.raises(RuntimeError, match=r"load\(.*\): inside ema_weights\(\)"):
            fo.load(tmp_path / "good.npz", opt)
        with pytest.raises(RuntimeError, match=r"load_state_dict: inside ema_weights\(\)"):
            opt.load_state_dict(sd)
        with pytest.raises(RuntimeError, match="pickling"):
            pickle.dumps(opt)
        with pytest.raises(RuntimeError, match="pickling"):
            copy.deepcopy(opt)
        assert all(same_bits(inside[k], params[k]) for k in params)
        assert repr(opt.state_dict()) == repr(sd)
    assert not (tmp_path / "x.npz").exists()
    assert [f for f in os.listdir(tmp_path) if "tmp" in f] == []
    assert snapshot(opt, params) == before


# --------------------------------------------------------------------- the lock
def test_checkpoints_taken_while_another_thread_steps_are_whole(tmp_path: Path) -> None:
    """Adagrad with gradient 1: state 'sum' == step count and every parameter element equal,
    in every consistent snapshot (a torn one mixes steps)."""
    params = {"w": np.zeros(1_000_000, np.float64)}
    opt = fo.Adagrad(params, lr=1.0)
    g = {"w": np.ones(1_000_000, np.float64)}
    stop = threading.Event()

    def trainer() -> None:
        while not stop.is_set():
            opt.step(g)

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        path = tmp_path / "c.npz"
        for _ in range(4):
            fo.save(path, opt)
            with np.load(path) as z:
                k = json.loads(z["meta"].tobytes())["optimizer"]["step_count"]
                s, p = z["s0.sum"], z["p0"]
            assert s.min() == s.max() == k and p.min() == p.max()
            sd = opt.state_dict()
            s = sd["state"]["w"]["sum"]
            assert s.min() == s.max() == sd["step_count"]
        for _ in range(3):  # a load between two steps of the other thread
            fo.load(path, opt)
            opt.load_state_dict(sd)
    finally:
        stop.set()
        thread.join()
    sd = opt.state_dict()
    assert sd["state"]["w"]["sum"].min() == sd["state"]["w"]["sum"].max() == sd["step_count"]


@pytest.mark.parametrize("call", ["step", "state_dict", "save"])
def test_reentrant_call_from_a_schedule_raises(tmp_path: Path, call: str) -> None:
    """A schedule that calls back into the optimizer while its step runs it: an error naming
    the call (the schedule's error, raised by the next step), never a hang."""
    w = np.ones(4, np.float32)
    g = [np.ones(4, np.float32)]
    opt: Any = None

    def lr(t: int) -> float:
        if opt is not None and t >= 1:
            if call == "step":
                opt.step(g)
            elif call == "state_dict":
                opt.state_dict()
            else:
                fo.save(tmp_path / "r.npz", opt)
        return 0.1

    opt = fo.SGD([w], lr=lr)
    name = {"step": "SGD.step", "state_dict": "SGD.state_dict", "save": "checkpoint.save"}[call]
    finishes(lambda: opt.step(g))  # the schedule's error waits for the next step
    with pytest.raises(ValueError, match=rf"{name} was called re-entrantly") as info:
        finishes(lambda: opt.step(g))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert opt.step_count == 1
    assert not (tmp_path / "r.npz").exists()


def test_reentrant_step_from_an_lbfgs_closure_raises() -> None:
    p = np.ones(4, np.float32)
    opt = fo.LBFGS([p], lr=0.1)
    depth = [0]

    def closure() -> Any:
        depth[0] += 1
        if depth[0] == 1:
            opt.step(closure)
        return float((p**2).sum()), [2 * p]

    with pytest.raises(RuntimeError, match=r"LBFGS\.step was called re-entrantly"):
        finishes(lambda: opt.step(closure))
    finishes(lambda: opt.step(closure))  # the lock was released


def test_other_threads_still_wait_for_the_lock() -> None:
    """Only the thread holding the lock gets the re-entrancy error; another one waits."""
    w = np.ones(4, np.float32)
    entered, go = threading.Event(), threading.Event()

    def lr(t: int) -> float:
        if t == 1:  # after the first update, inside the step (holding the lock)
            entered.set()
            assert go.wait(60)
        return 0.1

    opt = fo.SGD([w], lr=lr)
    stepper = threading.Thread(target=opt.step, args=([np.ones(4, np.float32)],))
    stepper.start()
    assert entered.wait(60)
    result: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: result.update(sd=opt.state_dict()))
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()  # waiting for the step
    go.set()
    stepper.join(60)
    reader.join(60)
    assert result["sd"]["step_count"] == 1


def test_lock_renewed_after_fork_is_the_same_kind() -> None:
    from fastoptim.engine import locks

    params, opt = make()
    locks._renew_after_fork()
    assert isinstance(opt._lock, locks.OptimizerLock)
    opt.step(grads(0, params))


# --------------------------------------------------------- destinations checked first
def test_load_into_a_read_only_parameter_changes_nothing(tmp_path: Path) -> None:
    params, opt = make()
    for t in range(3):
        opt.step(grads(t, params))
    fo.save(tmp_path / "a.npz", opt)
    sd = opt.state_dict()
    params2, opt2 = make(lr=0.5)
    params2["b"].flags.writeable = False
    before = snapshot(opt2, params2)
    with pytest.raises(checkpoint.CheckpointError, match="param 'b' was made read-only"):
        fo.load(tmp_path / "a.npz", opt2)
    with pytest.raises(ValueError, match="param 'b' was made read-only"):
        opt2.load_state_dict(sd)
    assert snapshot(opt2, params2) == before


def test_load_into_a_read_only_state_changes_nothing(tmp_path: Path) -> None:
    params, opt = make()
    opt.step(grads(0, params))
    fo.save(tmp_path / "a.npz", opt)
    sd = opt.state_dict()
    params2, opt2 = make(lr=0.5)
    opt2.state["b"]["exp_avg_sq"].flags.writeable = False
    before = snapshot(opt2, params2)
    with pytest.raises(ValueError, match="state 'exp_avg_sq' of param 'b' was made read-only"):
        opt2.load_state_dict(sd)
    with pytest.raises(checkpoint.CheckpointError, match="was made read-only"):
        fo.load(tmp_path / "a.npz", opt2)
    assert snapshot(opt2, params2) == before


def test_load_with_a_read_only_copy_out_changes_nothing(tmp_path: Path) -> None:
    params, opt = make()
    opt.step(grads(0, params))
    fo.save(tmp_path / "a.npz", opt)
    params2, opt2 = make(lr=0.5)
    out = np.zeros(params2["w"].shape, BF16)
    opt2.set_copy_out({"w": out})
    out.flags.writeable = False
    before = snapshot(opt2, params2)
    with pytest.raises(checkpoint.CheckpointError, match="copy-out of param 'w'"):
        fo.load(tmp_path / "a.npz", opt2)
    assert snapshot(opt2, params2) == before and not out.any()


# --------------------------------------------------------- parameters in other groups
@pytest.mark.parametrize("strict", [True, False])
def test_parameters_in_other_groups_are_refused(tmp_path: Path, strict: bool) -> None:
    """strict=False skips parameters one side does not have; one both have in different
    groups (its state and hyper-parameters would not follow it) is refused, nothing loaded."""

    def arrays() -> dict[str, np.ndarray]:
        return {"a": np.linspace(-1, 1, 8, dtype=np.float32), "b": np.linspace(1, 2, 8)}

    x = arrays()
    opt = fo.Adam([{"params": {"a": x["a"]}, "lr": 0.1}, {"params": {"b": x["b"]}, "lr": 0.01}])
    for t in range(3):
        opt.step(grads(t, x))
    fo.save(tmp_path / "g.npz", opt)
    sd = opt.state_dict()
    y = arrays()
    opt2 = fo.Adam([{"params": {"b": y["b"]}, "lr": 0.01}, {"params": {"a": y["a"]}, "lr": 0.1}])
    before = snapshot(opt2, y)
    message = r"'b' \(group 0 here, 1 in the state\), 'a' \(group 1 here, 0 in the state\)"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        fo.load(tmp_path / "g.npz", opt2, strict=strict)
    with pytest.raises(ValueError, match=message):
        opt2.load_state_dict(sd, strict=strict)
    assert snapshot(opt2, y) == before


def test_nonstrict_load_still_skips_parameters_one_side_lacks(tmp_path: Path) -> None:
    x = {"a": np.linspace(-1, 1, 8, dtype=np.float32)}
    opt = fo.Adam([{"params": x}, {"params": {"c": np.ones(3, np.float32)}}])
    opt.step({"a": np.ones(8, np.float32), "c": np.ones(3, np.float32)})
    fo.save(tmp_path / "g.npz", opt)
    y = {"a": np.zeros(8, np.float32), "b": np.full(5, 7, np.float32)}
    opt2 = fo.Adam([{"params": y}, {"params": {"d": np.ones(3, np.float32)}}])
    fo.load(tmp_path / "g.npz", opt2, strict=False)
    assert same_bits(y["a"], x["a"]) and (y["b"] == 7).all()
    assert same_bits(opt2.state["a"]["exp_avg"], opt.state["a"]["exp_avg"])
    assert not opt2.state["b"]["exp_avg"].any()


# --------------------------------------------------------- copy-out arrays after a load
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bfloat16", "float16"])
def test_load_rounds_the_parameters_into_their_copy_outs(tmp_path: Path, dtype: Any) -> None:
    """The training loop reads the 16-bit copies: after a load they hold the loaded parameters
    rounded as a step (rounding="nearest") leaves them, so the resume is bit-exact."""
    target = np.linspace(-3, 3, 512).astype(np.float32)

    def build() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]:
        w = {"w": np.zeros(512, np.float32)}
        out = {"w": np.zeros(512, dtype)}
        opt = fo.AdamW(w, lr=0.05)
        opt.set_copy_out(out)
        return w, out, opt

    def train(opt: Any, out: dict[str, np.ndarray], n: int) -> None:
        for _ in range(n):  # the gradient of 0.5 (x - target)^2 at the 16-bit copy
            opt.step({"w": out["w"].astype(np.float32) - target})

    wa, ca, oa = build()
    train(oa, ca, 10)
    _, cb, ob = build()
    train(ob, cb, 5)
    fo.save(tmp_path / "c.npz", ob)
    wc, cc, oc = build()
    fo.load(tmp_path / "c.npz", oc)
    assert same_bits(cc["w"], cb["w"])
    train(oc, cc, 5)
    assert same_bits(wa["w"], wc["w"]) and same_bits(ca["w"], cc["w"])


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bfloat16", "float16"])
def test_load_writes_a_nan_parameters_copy_out_as_a_step_does(tmp_path: Path, dtype: Any) -> None:
    """NaN parameters with payloads (and every other value class): the copy-out a load writes
    has the bits a step writes.  NumPy's cast had kept float16 NaN payloads (0x7E09 where a step
    writes 0x7E00) and canonicalised bfloat16 ones (0x7FC0 where a step keeps 0x7FC1)."""
    bits = [0x7FC12345, 0xFFA00001, 0x7F800001, 0x7F800000, 0x477FF000, 0x3F800001, 0x00000001]
    p = np.array(bits, np.uint32).view(np.float32).copy()
    p = np.concatenate([p, np.linspace(-70000, 70000, 57, dtype=np.float32)])
    c = np.zeros(p.size, dtype)
    opt = fo.SGD([p], lr=0.0)
    opt.set_copy_out([c])
    opt.step([np.zeros(p.size, np.float32)])
    stepped = c.copy()
    fo.save(tmp_path / "c.npz", opt)
    c[...] = 0
    fo.load(tmp_path / "c.npz", opt)
    np.testing.assert_array_equal(c.view(np.uint16), stepped.view(np.uint16))


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("n", [0, 1, 17, 3 * 2**15 + 7])
def test_round_to_matches_the_reference_rounding_bit_for_bit(dtype: Any, n: int) -> None:
    """``_core.round_to`` (what ``fo.load`` writes into copy-outs) against the reference's
    round-to-nearest on random float32 bit patterns (NaNs, Infs, denormals among them), over
    sizes that span several threaded chunks; the bad calls raise and write nothing."""
    from fastoptim import _core, reference

    rng = np.random.default_rng(n)
    x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    if n > 17:
        x[::5] = rng.standard_normal(x[::5].size).astype(np.float32)  # (ordinary values too)
    out = np.full(n, 7, np.uint16).view(dtype)
    _core.round_to(out, x)
    rnd = reference.round_to_bfloat16 if dtype == BF16 else reference.round_to_float16
    np.testing.assert_array_equal(out.view(np.uint16), rnd(x).view(np.uint16))
    before = out.copy()
    bad: list[tuple[Any, Any, type[Exception]]] = [
        (out, np.zeros(n, np.float64), TypeError),
        (out.view(np.int16), x, TypeError),
        (np.zeros(n + 1, dtype), np.zeros(n + 1, np.float32)[1:], ValueError),
        (out, np.zeros(n + 1, np.float32), ValueError),
    ]
    if n:
        bad.append((np.frombuffer(out.tobytes(), dtype), x, ValueError))  # (read-only)
        both = np.zeros(2 * n, np.float32)
        bad.append((both.view(dtype)[:n], both[:n], ValueError))  # (overlapping)
    for o, a, err in bad:
        with pytest.raises(err):
            _core.round_to(o, a)
    np.testing.assert_array_equal(out.view(np.uint16), before.view(np.uint16))


def test_load_overflowing_copy_out_raises_no_warning(tmp_path: Path) -> None:
    """A float32 parameter beyond float16's range: a step writes Inf into its float16 copy
    silently, and so does a load, also where warnings are errors or NumPy raises on overflow
    (a load that raised there had already applied the checkpoint)."""
    import warnings

    p = np.array([1.0, 70000.0], np.float32)
    c = np.zeros(2, np.float16)
    opt = fo.SGD([p], lr=0.1)
    opt.set_copy_out([c])
    opt.step([np.ones(2, np.float32)])
    stepped = c.copy()
    assert np.isinf(stepped[1])
    fo.save(tmp_path / "c.npz", opt)
    c[...] = 0
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        fo.load(tmp_path / "c.npz", opt)
    assert same_bits(c, stepped)


def test_longdouble_hyperparameter_saves(tmp_path: Path) -> None:
    """A NumPy longdouble lr (its item() is itself, which JSON refuses) is saved as a float."""
    w = {"w": np.zeros(8, np.float32)}
    opt = fo.SGD(w, lr=np.longdouble("0.01"))
    opt.step({"w": np.ones(8, np.float32)})
    fo.save(tmp_path / "c.npz", opt)
    w2 = {"w": np.zeros(8, np.float32)}
    opt2 = fo.SGD(w2, lr=0.5)
    fo.load(tmp_path / "c.npz", opt2)
    assert opt2.param_groups[0]["lr"] == 0.01
    assert same_bits(w2["w"], w["w"])


@pytest.mark.parametrize("bad", [None, 5, [["w"]], "w", [True]])
def test_malformed_group_parameter_keys_are_named(bad: Any) -> None:
    params, opt = make()
    opt.step(grads(0, params))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["params"] = bad
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="group 0: malformed parameter keys"):
        opt.load_state_dict(sd)
    assert snapshot(opt, params) == before


@pytest.mark.parametrize("state_dtype", [None, "int8", "int4"])
def test_state_of_a_parameter_of_another_shape_is_refused(state_dtype: str | None) -> None:
    """A state_dict records its parameters' shapes: the state of a 64x80 parameter is refused
    for an 80x64 one, changing nothing (4-bit codes are flat, ``(numel + 1) // 2`` bytes:
    their shape could not tell, and the transposed state loaded); a record without shapes
    (fastoptim 0.1) still loads; malformed shapes are named."""
    rng = np.random.default_rng(0)

    def trained(shape: tuple[int, ...]) -> tuple[dict[str, np.ndarray], Any]:
        params = {"w": rng.standard_normal(shape).astype(np.float32)}
        opt = fo.AdamW(params, lr=1e-2, state_dtype=state_dtype)
        opt.step({"w": rng.standard_normal(shape).astype(np.float32)})
        return params, opt

    sd = trained((64, 80))[1].state_dict()
    assert sd["param_groups"][0]["shapes"] == [[64, 80]]
    params, opt = trained((80, 64))
    before = snapshot(opt, params)
    with pytest.raises(
        ValueError, match=r"param 'w': the state of a parameter of shape \(64, 80\), "
    ):
        opt.load_state_dict(copy.deepcopy(sd))
    assert snapshot(opt, params) == before
    for bad in ([[64, 80], [1]], [[-1, 80]], [(64, 80)], "64x80"):
        wrong = copy.deepcopy(sd)
        wrong["param_groups"][0]["shapes"] = bad
        with pytest.raises(ValueError, match="group 0: malformed parameter shapes"):
            opt.load_state_dict(wrong)
        assert snapshot(opt, params) == before
    params, opt = trained((64, 80))
    old = copy.deepcopy(sd)
    del old["param_groups"][0]["shapes"]
    opt.load_state_dict(old)
    again = trained((64, 80))[1]
    again.load_state_dict(sd)
    assert snapshot(opt, params) == snapshot(again, params)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_reordered_parameters_with_stochastic_rounding_warn(rounding: str) -> None:
    """Stochastic rounding draws by a parameter's position, checkpoints are keyed by name: a
    dict listing the same parameters in another order resumes with other draws, so the load
    warns (RuntimeWarning: an error under -W error, refusing the load whole); in the saved
    order, or with rounding to nearest (bit for bit either way), it does not."""
    names = ["a", "b"]

    def opt_for(order: list[str]) -> tuple[dict[str, np.ndarray], Any]:
        r = np.random.default_rng(0)
        p = {n: r.standard_normal(4096).astype(np.float32).astype(BF16) for n in names}
        kw = {"state_dtype": "bfloat16", "rounding": rounding, "seed": 1}
        return p, fo.AdamW({n: p[n] for n in order}, lr=1e-2, **kw)

    p, src = opt_for(names)
    src.step(grads(0, p))
    sd = src.state_dict()
    same = opt_for(names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same[1].load_state_dict(sd)
    p2, other = opt_for(names[::-1])
    before = snapshot(other, p2)
    if rounding == "nearest":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other.load_state_dict(sd)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match=r"group 0's parameters are \['b', 'a'\]"):
            other.load_state_dict(sd)
    assert snapshot(other, p2) == before  # (refused whole)
    with pytest.warns(RuntimeWarning, match="stochastic rounding draws by a parameter's position"):
        other.load_state_dict(sd)
    assert snapshot(other, p2) != before


# --------------------------------------------------------- EMA: the checkpoint wins
def test_ema_checkpoint_loads_into_an_optimizer_built_without_ema(tmp_path: Path) -> None:
    """fo.load agrees with load_state_dict: the checkpoint's ema_decay wins."""
    ref_params, ref = make(fo.AdamW, ema_decay=0.9)
    params, opt = make(fo.AdamW, ema_decay=0.9)
    for t in range(3):
        ref.step(grads(t, ref_params))
        opt.step(grads(t, params))
    fo.save(tmp_path / "e.npz", opt)
    params2, opt2 = make(fo.AdamW)
    fo.load(tmp_path / "e.npz", opt2)
    _, opt3 = make(fo.AdamW)
    opt3.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["ema_decay"] == opt3.param_groups[0]["ema_decay"] == 0.9
    assert repr(opt2.state_dict()) == repr(opt3.state_dict())
    for t in range(3, 6):
        ref.step(grads(t, ref_params))
        opt2.step(grads(t, params2))
    assert same_bits(ref.state["w"]["ema"], opt2.state["w"]["ema"])
    assert same_bits(ref_params["w"], params2["w"])


def test_ema_state_without_ema_decay_is_refused_naming_it(tmp_path: Path) -> None:
    params, opt = make(fo.AdamW, ema_decay=0.9)
    opt.step(grads(0, params))
    path = tmp_path / "e.npz"
    fo.save(path, opt)
    files = dict(np.load(path))
    meta = json.loads(files["meta"].tobytes())
    meta["optimizer"]["param_groups"][0]["hyper"]["ema_decay"] = None
    files["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **files)
    params2, opt2 = make(fo.AdamW)
    before = snapshot(opt2, params2)
    with pytest.raises(checkpoint.CheckpointError, match=r"state 'ema'.*ema_decay"):
        fo.load(path, opt2)
    assert snapshot(opt2, params2) == before


# --------------------------------------------------------- files: names, messages, JSON
def test_long_multibyte_file_name(tmp_path: Path) -> None:
    name = "\u4e2d" * 80 + ".npz"  # 244 bytes in UTF-8: a valid name
    assert len(checkpoint._tmp_prefix(name).encode()) <= 120 + len(".fastoptim-tmp-") + 1
    params, opt = make()
    opt.step(grads(0, params))
    fo.save(tmp_path / name, opt)
    fo.save(tmp_path / name, opt)  # (replacing it)
    fo.load(tmp_path / name, make()[1])
    assert os.listdir(tmp_path) == [name]


def test_missing_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "x.npz"
    with pytest.raises(FileNotFoundError) as info:
        fo.save(path, make()[1])
    message = str(info.value)
    assert str(tmp_path / "no" / "such") in message and info.value.filename == str(path)
    assert "fastoptim-tmp" not in message


def test_path_that_is_a_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        fo.save(tmp_path / "d", make()[1])
    assert "fastoptim-tmp" not in str(info.value)
    assert info.value.filename == str(tmp_path / "d")
    assert os.listdir(tmp_path) == ["d"]


def _strict(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_metadata_is_strict_json(tmp_path: Path, mode: str) -> None:
    """A plateau that has seen no metric has best = +-inf: written as {"$float": "inf"}."""
    _, opt = make()
    schedules.ReduceLROnPlateau(opt, mode=mode)
    path = tmp_path / "m.npz"
    fo.save(path, opt)
    with np.load(path) as z:
        meta = _strict(z["meta"].tobytes().decode())
    best = meta["optimizer"]["plateau"]["best"]
    assert best == {"$float": "inf" if mode == "min" else "-inf"}
    _, opt2 = make()
    plateau = schedules.ReduceLROnPlateau(opt2, mode=mode)
    plateau.best = 1.0
    fo.load(path, opt2)
    assert plateau.best == (np.inf if mode == "min" else -np.inf)


def test_metadata_of_earlier_versions_with_bare_infinity_loads(tmp_path: Path) -> None:
    _, opt = make()
    schedules.ReduceLROnPlateau(opt)
    path = tmp_path / "old.npz"
    fo.save(path, opt)
    with zipfile.ZipFile(path) as z:
        files = {i.filename: z.read(i) for i in z.infolist()}
    meta = json.loads(np.load(path)["meta"].tobytes())
    meta["optimizer"]["plateau"]["best"] = float("inf")
    old = json.dumps(meta)  # the earlier writer: allow_nan=True
    assert "Infinity" in old
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            if name == "meta.npy":
                buf = io.BytesIO()
                np.save(buf, np.frombuffer(old.encode(), np.uint8))
                data = buf.getvalue()
            z.writestr(name, data)
    _, opt2 = make()
    plateau = schedules.ReduceLROnPlateau(opt2)
    plateau.best = 1.0
    fo.load(path, opt2)
    assert plateau.best == np.inf


def test_strict_json_round_trips_every_non_finite_number() -> None:
    data = {"a": [1.5, float("inf"), {"b": -float("inf")}], "c": float("nan"), "d": (2, "x")}
    text = json.dumps(checkpoint._strict_json(data), allow_nan=False)
    back = json.loads(text, object_hook=checkpoint._float_hook)
    assert back["a"][:2] == [1.5, float("inf")] and back["a"][2] == {"b": -float("inf")}
    assert np.isnan(back["c"]) and back["d"] == [2, "x"]


# --------------------------------------------------------- schedules: freezing an entry
def test_assigning_the_shown_value_keeps_the_schedule_constant_freezes_it() -> None:
    """The group holds plain numbers: assigning the value a schedule shows cannot be told from
    no assignment (the schedule stays, as documented); schedules.constant(v) freezes it."""
    w = np.zeros(3, np.float32)
    g = [np.ones(3, np.float32)]
    opt = fo.SGD([w], lr=schedules.cosine(0.1, 10))
    for _ in range(3):
        opt.step(g)
    shown = float(opt.param_groups[0]["lr"])
    opt.param_groups[0]["lr"] = shown
    opt.step(g)
    assert "lr" in opt.schedules(0) and opt.param_groups[0]["lr"] != shown
    shown = float(opt.param_groups[0]["lr"])
    opt.param_groups[0]["lr"] = schedules.constant(shown)
    for _ in range(3):
        opt.step(g)
        assert opt.param_groups[0]["lr"] == shown
