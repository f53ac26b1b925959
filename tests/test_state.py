"""Schedules inside the optimizers, state_dict / load_state_dict, and ``fastoptim.save`` /
``fastoptim.load`` checkpoints: bit-exact resume for every case of the shared table, with and
without schedules; every rejected checkpoint leaves every array and setting as it was."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from cases import CASES, DTYPES, Case, each_case
from fastoptim import reference, schedules

SHAPES = {"w": (5, 3), "b": (7,), "v": (33,)}


def make_params(rng: np.random.Generator, dtype: Any, named: bool = True) -> Any:
    arrays = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    return arrays if named else list(arrays.values())


def make_grads(rng: np.random.Generator, params: Any, n: int) -> list[Any]:
    out = []
    for _ in range(n):
        if isinstance(params, dict):
            out.append({k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()})
        else:
            out.append([rng.standard_normal(p.shape).astype(p.dtype) for p in params])
    return out


def copy_params(params: Any) -> Any:
    if isinstance(params, dict):
        return {k: v.copy() for k, v in params.items()}
    return [v.copy() for v in params]


def values(params: Any) -> list[np.ndarray]:
    return list(params.values()) if isinstance(params, dict) else list(params)


def scheduled(case: Case) -> dict[str, Any]:
    """The case's options with the learning rate (and Adam-family beta1 / SGD momentum) on
    schedules, so that resuming must restore the schedule's position."""
    kw = dict(case.kwargs)
    kw["lr"] = schedules.warmup_cosine(kw.get("lr", 1e-3), 2, 9, end=1e-4)
    defaults = getattr(fo, case.opt)._definition.defaults()
    if "betas" in defaults:
        b1, b2 = kw.get("betas", defaults["betas"])
        kw["betas"] = (schedules.linear(b1 - 0.2, b1, 5), b2)
    if kw.get("momentum"):
        kw["momentum"] = schedules.piecewise([3], [kw["momentum"] / 2, kw["momentum"]])
    return kw


def state_bytes(opt: fo.Optimizer) -> dict[Any, dict[str, bytes]]:
    return {
        k: {n: v.tobytes() for n, v in entry.items() if isinstance(v, np.ndarray)}
        for k, entry in opt.state.items()
    }


def snapshot(opt: fo.Optimizer, params: Any) -> tuple[Any, ...]:
    """Everything a rejected load must leave alone."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return (
        [p.tobytes() for p in values(params)],
        state_bytes(opt),
        repr(groups),
        opt.step_count,
        [opt.schedules(i) for i in range(len(opt.param_groups))],
    )


MODES = ["plain", "scheduled"]


# ----------------------------------------------------------------------------- resume
@each_case(CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_resume_is_bit_exact(
    case: Case, dtype: Any, mode: str, via: str, rng: np.random.Generator, tmp_path: Path
) -> None:
    """N steps straight == k steps, checkpoint, a fresh optimizer over fresh arrays, load,
    N - k steps: parameters and every state array identical to the bit."""
    kw = scheduled(case) if mode == "scheduled" else case.kwargs
    cls = getattr(fo, case.opt)
    p0 = make_params(rng, dtype)
    grads = make_grads(rng, p0, 9)
    straight = copy_params(p0)
    a = cls(straight, **kw)
    for g in grads:
        a.step(g)

    first = copy_params(p0)
    b = cls(first, **kw)
    for g in grads[:4]:
        b.step(g)
    if via == "file":
        fo.save(tmp_path / "ck.npz", b)
    else:
        sd = b.state_dict()
        at_checkpoint = copy_params(first)  # state_dict holds no parameters: the user saves them
    for g in grads[4:6]:  # the checkpoint must not see later steps (state_dict copies)
        b.step(g)

    resumed = {k: np.full_like(v, np.nan) for k, v in p0.items()}  # fresh, different arrays
    c = cls(resumed, **kw)
    if via == "file":
        fo.load(tmp_path / "ck.npz", c)
    else:
        c.load_state_dict(sd)
        for k in resumed:
            resumed[k][...] = at_checkpoint[k]
    assert c.step_count == 4
    for g in grads[4:]:
        c.step(g)
    for k in p0:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    assert state_bytes(c) == state_bytes(a)
    assert repr(c.param_groups) == repr(a.param_groups)


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "RMSprop"])
def test_reference_optimizers_resume_too(name: str, rng: np.random.Generator) -> None:
    p0 = make_params(rng, np.float64, named=False)
    grads = make_grads(rng, p0, 6)
    kw: dict[str, Any] = {"lr": schedules.exponential(0.01, 0.9)}
    if name in ("SGD", "RMSprop"):
        kw["momentum"] = 0.5
    cls = getattr(reference, name)
    straight = copy_params(p0)
    a = cls(straight, **kw)
    for g in grads:
        a.step(g)
    half = copy_params(p0)
    b = cls(half, **kw)
    for g in grads[:3]:
        b.step(g)
    c = cls(half, **kw)  # the same arrays: a restarted process with reloaded parameters
    c.load_state_dict(b.state_dict())
    for g in grads[3:]:
        c.step(g)
    for x, y in zip(half, straight):
        np.testing.assert_array_equal(x, y)


def test_state_dict_content(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32)
    opt = fo.NAdam(params, lr=schedules.cosine(0.1, 10), betas=(0.9, schedules.constant(0.99)))
    opt.step(make_grads(rng, params, 1)[0])
    sd = opt.state_dict()
    assert sd["format"] == "fastoptim.state/1" and sd["optimizer"] == "NAdam"
    assert sd["step_count"] == 1 and sd["plateau"] is None
    (rec,) = sd["param_groups"]
    assert rec["params"] == ["w", "b", "v"] and rec["step"] == 1
    assert rec["hyper"]["lr"] == {
        "schedule": "cosine",
        "args": {"init": 0.1, "total_steps": 10, "end": 0.0},
    }
    assert rec["hyper"]["betas"] == [0.9, {"schedule": "constant", "args": {"value": 0.99}}]
    assert rec["hyper"]["eps"] == 1e-8 and rec["hyper"]["maximize"] is False
    assert rec["states"] == ["exp_avg", "exp_avg_sq"] and rec["fresh"] == []
    mu = 0.9 * (1 - 0.5 * 0.96 ** (1 * 4e-3))
    assert rec["scalars"] == {"mu_product": mu}
    json.dumps({k: v for k, v in sd.items() if k != "state"})  # plain data
    for k, p in params.items():
        for n in ("exp_avg", "exp_avg_sq"):
            a = sd["state"][k][n]
            assert a.dtype == p.dtype and a.shape == p.shape
            np.testing.assert_array_equal(a, opt.state[k][n])
            assert not np.shares_memory(a, opt.state[k][n])  # a copy: later steps don't leak


def test_list_params_are_keyed_by_position(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float64, named=False)
    opt = fo.Adagrad([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}])
    sd = opt.state_dict()
    assert [r["params"] for r in sd["param_groups"]] == [[0], [1, 2]]
    assert set(sd["state"]) == {0, 1, 2}
    assert sd["param_groups"][1]["hyper"]["lr"] == 0.5


def test_load_restores_hyper_parameters_and_variant(rng: np.random.Generator) -> None:
    """Loaded hyper-parameters win (as in torch), including those that decide which state
    buffers exist: momentum 0 -> 0.9 allocates the momentum buffer, and back resets it."""
    params = make_params(rng, np.float32)
    grads = make_grads(rng, params, 3)
    src = fo.SGD(copy_params(params), lr=0.1, momentum=0.9, nesterov=True)
    src.step(grads[0])
    dst = fo.SGD(copy_params(params), lr=0.3)
    dst.load_state_dict(src.state_dict())
    assert dst.param_groups[0]["momentum"] == 0.9 and dst.param_groups[0]["nesterov"] is True
    np.testing.assert_array_equal(
        dst.state["w"]["momentum_buffer"], src.state["w"]["momentum_buffer"]
    )
    plain = fo.SGD(copy_params(params), lr=0.2)
    dst.load_state_dict(plain.state_dict())
    assert dst.param_groups[0]["momentum"] == 0 and dst.param_groups[0]["lr"] == 0.2


def test_fresh_momentum_buffer_survives_a_checkpoint(rng: np.random.Generator) -> None:
    """SGD's first momentum step copies the gradient (torch's lazy buffer): a checkpoint taken
    before any step must keep that, not start from a zero buffer."""
    params = make_params(rng, np.float64)
    grads = make_grads(rng, params, 2)
    a_params, b_params = copy_params(params), copy_params(params)
    a = fo.SGD(a_params, lr=0.1, momentum=0.9, dampening=0.5)
    b = fo.SGD(b_params, lr=0.1, momentum=0.9, dampening=0.5)
    b.load_state_dict(fo.SGD(copy_params(params), lr=0.1, momentum=0.9, dampening=0.5).state_dict())
    for g in grads:
        a.step(g)
        b.step(g)
    for k in params:
        np.testing.assert_array_equal(a_params[k], b_params[k])


# ----------------------------------------------------------------------------- rejections
def _mismatches() -> list[tuple[str, Callable[[dict[str, Any]], Any], str]]:
    def shape(sd: dict[str, Any]) -> None:
        sd["state"]["w"]["exp_avg"] = np.zeros((3, 5), np.float32)

    def dtype(sd: dict[str, Any]) -> None:
        sd["state"]["b"]["exp_avg_sq"] = sd["state"]["b"]["exp_avg_sq"].astype(np.float64)

    def missing_param(sd: dict[str, Any]) -> None:
        sd["param_groups"][0]["params"].remove("v")
        del sd["state"]["v"]

    def unexpected_param(sd: dict[str, Any]) -> None:
        sd["param_groups"][0]["params"].append("extra")
        sd["state"]["extra"] = {n: np.zeros(2, np.float32) for n in ("exp_avg", "exp_avg_sq")}

    def missing_state(sd: dict[str, Any]) -> None:
        del sd["state"]["w"]["exp_avg_sq"]

    def optimizer(sd: dict[str, Any]) -> None:
        sd["optimizer"] = "Adamax"

    def bad_schedule(sd: dict[str, Any]) -> None:
        sd["param_groups"][0]["hyper"]["lr"] = {"schedule": "nope", "args": {}}

    def invalid_value(sd: dict[str, Any]) -> None:
        sd["param_groups"][0]["hyper"]["eps"] = -1.0

    def unknown_hyper(sd: dict[str, Any]) -> None:
        sd["param_groups"][0]["hyper"]["momentum"] = 0.9

    def groups(sd: dict[str, Any]) -> None:
        sd["param_groups"].append(sd["param_groups"][0])

    def format_(sd: dict[str, Any]) -> None:
        sd["format"] = "something else"

    def plateau(sd: dict[str, Any]) -> None:
        sd["plateau"] = {"best": 1.0}

    def step(sd: dict[str, Any]) -> None:
        sd["step_count"] = -1

    return [
        (
            "shape",
            shape,
            r"state 'exp_avg' of param 'w': float32 \(3, 5\), expected float32 \(5, 3\)",
        ),
        ("dtype", dtype, r"state 'exp_avg_sq' of param 'b': float64 \(7,\), expected float32"),
        ("missing_param", missing_param, r"missing \['v'\], unexpected \[\]"),
        ("unexpected_param", unexpected_param, r"missing \[\], unexpected \['extra'\]"),
        ("missing_state", missing_state, r"state of parameter 'w': has \['exp_avg'\]"),
        ("optimizer", optimizer, "the state of Adamax, not of Adam"),
        ("bad_schedule", bad_schedule, "not a schedule description"),
        ("invalid_value", invalid_value, "invalid eps=-1.0"),
        ("unknown_hyper", unknown_hyper, r"unexpected \['momentum'\]"),
        ("groups", groups, "the state has 2 parameter groups, this optimizer has 1"),
        ("format", format_, "not a fastoptim optimizer state"),
        ("plateau", plateau, "attach one first"),
        ("step", step, "step_count must be an int >= 0"),
    ]


@pytest.mark.parametrize(
    ("what", "edit", "message"), _mismatches(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_mismatched_state_is_rejected_and_changes_nothing(
    what: str, edit: Callable[[dict[str, Any]], Any], message: str, rng: np.random.Generator
) -> None:
    params = make_params(rng, np.float32)
    grads = make_grads(rng, params, 3)
    other = fo.Adam(copy_params(params), lr=schedules.exponential(0.1, 0.5))
    other.step(grads[0])
    other.step(grads[1])
    sd = other.state_dict()
    edit(sd)
    opt = fo.Adam(params, lr=0.01)
    opt.step(grads[2])
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert snapshot(opt, params) == before


def test_all_problems_are_listed_at_once(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32)
    sd = fo.Adam(copy_params(params)).state_dict()
    sd["state"]["w"]["exp_avg"] = np.zeros(1, np.float32)
    sd["state"]["b"]["exp_avg_sq"] = np.zeros(7, np.float64)
    with pytest.raises(ValueError) as info:
        fo.Adam(params).load_state_dict(sd)
    text = str(info.value)
    assert "'w'" in text and "'b'" in text and text.count("\n  - ") == 2


def test_non_strict_load_keeps_unlisted_state(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32)
    grads = make_grads(rng, params, 2)
    src = fo.Adam({k: params[k].copy() for k in ("w", "b")})
    src.step({k: grads[0][k] for k in ("w", "b")})
    opt = fo.Adam(params)
    opt.step(grads[1])
    v_before = opt.state["v"]["exp_avg"].copy()
    with pytest.raises(ValueError, match=r"missing \['v'\]"):
        opt.load_state_dict(src.state_dict())
    opt.load_state_dict(src.state_dict(), strict=False)
    np.testing.assert_array_equal(opt.state["w"]["exp_avg"], src.state["w"]["exp_avg"])
    np.testing.assert_array_equal(opt.state["v"]["exp_avg"], v_before)


def test_user_callable_schedule(rng: np.random.Generator) -> None:
    """A plain function works as a schedule; a checkpoint names it, and loading needs the
    optimizer to have been built with a function of the same name."""

    def halving(t: int) -> float:
        return 0.1 * 0.5**t

    params = make_params(rng, np.float64)
    opt = fo.SGD(params, lr=halving)
    opt.step(make_grads(rng, params, 1)[0])
    assert opt.param_groups[0]["lr"] == 0.05
    sd = opt.state_dict()
    assert sd["param_groups"][0]["hyper"]["lr"]["schedule"] == "callable"
    again = fo.SGD(copy_params(params), lr=halving)
    again.load_state_dict(sd)
    assert again.schedules()["lr"] is halving and again.param_groups[0]["lr"] == 0.05
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        fo.SGD(copy_params(params), lr=0.1).load_state_dict(sd)


# ----------------------------------------------------------------------------- schedules
def test_group_shows_the_value_of_the_next_update(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32)
    f = schedules.step_decay(0.1, 2, gamma=0.5)
    opt = fo.SGD(params, lr=f, momentum=0.9)
    seen = [opt.param_groups[0]["lr"]]
    for g in make_grads(rng, params, 5):
        opt.step(g)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == [f(t) for t in range(6)]
    assert opt.step_count == 5 and opt.schedules() == {"lr": f}


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Lion"])
def test_schedule_equals_setting_the_value_by_hand(name: str, rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32)
    grads = make_grads(rng, params, 8)
    lr = schedules.onecycle(0.05, 8)
    wd = schedules.linear(0.0, 0.25, 4)
    by_hand = copy_params(params)
    cls = getattr(fo, name)
    a = cls(params, lr=lr, weight_decay=wd)
    b = cls(by_hand, lr=0.0, weight_decay=0.0)
    for t, g in enumerate(grads):
        b.param_groups[0]["lr"], b.param_groups[0]["weight_decay"] = lr(t), wd(t)
        a.step(g)
        b.step(g)
    for k in params:
        np.testing.assert_array_equal(params[k], by_hand[k])


def test_overriding_and_replacing_a_schedule(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32)
    grads = make_grads(rng, params, 4)
    opt = fo.Adam(params, lr=schedules.exponential(0.1, 0.5))
    opt.step(grads[0])
    opt.param_groups[0]["lr"] = 0.01  # a constant replaces the schedule
    opt.step(grads[1])
    assert opt.schedules() == {} and opt.param_groups[0]["lr"] == 0.01
    f = schedules.linear(1.0, 0.0, 10)
    opt.param_groups[0]["lr"] = f  # evaluated at the current count, not restarted
    opt.step(grads[2])
    assert opt.param_groups[0]["lr"] == f(3)
    opt.param_groups[0]["betas"] = [schedules.constant(0.5), 0.9]
    opt.step(grads[3])
    assert opt.param_groups[0]["betas"] == (0.5, 0.9)


def test_invalid_scheduled_value_is_rejected_before_any_change(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32)
    grads = make_grads(rng, params, 3)
    opt = fo.SGD(params, lr=schedules.piecewise([2], [0.1, -0.1]), momentum=0.9)
    opt.step(grads[0])
    opt.step(grads[1])
    before = snapshot(opt, params)
    with pytest.raises(
        ValueError, match=r"invalid lr=-0.1.*at update 2 of the schedules lr=piecewise"
    ):
        opt.step(grads[2])
    assert snapshot(opt, params) == before
    with pytest.raises(ValueError, match=r"invalid momentum=-0\.5"):
        fo.SGD(params, lr=0.1, momentum=schedules.constant(-0.5))
    with pytest.raises(TypeError, match="maximize is a flag"):
        fo.SGD(params, maximize=schedules.constant(1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="returned 'x' at update 0, not a number"):
        fo.SGD(params, lr=lambda t: "x")  # type: ignore[arg-type]


def test_groups_may_have_their_own_schedules(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32, named=False)
    f = schedules.cosine(0.1, 4)
    opt = fo.Adam([{"params": params[:2], "lr": f}, {"params": params[2:]}], lr=0.01)
    for g in make_grads(rng, params, 2):
        opt.step(g)
    assert opt.param_groups[0]["lr"] == f(2) and opt.param_groups[1]["lr"] == 0.01
    assert opt.schedules(1) == {}


# ----------------------------------------------------------------------------- plateau
def test_plateau_on_a_constant_lr_is_torchs_arithmetic(rng: np.random.Generator) -> None:
    params = make_params(rng, np.float32)
    opt = fo.SGD(params, lr=0.1)
    plateau = schedules.ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=0.02)
    lrs = []
    for metric in [5, 4, 4, 4, 4, 4, 4, 4]:
        plateau.step(metric)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02]


def test_plateau_scales_a_scheduled_lr_and_is_checkpointed(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    params = make_params(rng, np.float64)
    grads = make_grads(rng, params, 6)
    f = schedules.cosine(0.1, 100)

    def build(arrays: Any) -> tuple[fo.Optimizer, schedules.ReduceLROnPlateau]:
        opt = fo.Adam(arrays, lr=f)
        return opt, schedules.ReduceLROnPlateau(opt, factor=0.1, patience=0)

    opt, plateau = build(params)
    for i, g in enumerate(grads[:3]):
        opt.step(g)
        plateau.step(1.0 if i else 2.0)  # no improvement at i = 2: reduce
    assert opt.param_groups[0]["lr"] == pytest.approx(f(3) * 0.1, rel=1e-15)
    assert opt.schedules() == {"lr": f}  # still scheduled
    fo.save(tmp_path / "ck.npz", opt)
    for g in grads[3:]:
        opt.step(g)

    fresh = {k: np.zeros_like(v) for k, v in params.items()}
    opt2, plateau2 = build(fresh)
    fo.load(tmp_path / "ck.npz", opt2)
    assert plateau2.best == 1.0 and plateau2.last_epoch == 3
    assert opt2.param_groups[0]["lr"] == pytest.approx(f(3) * 0.1, rel=1e-15)
    for g in grads[3:]:
        opt2.step(g)
    for k in params:
        np.testing.assert_array_equal(fresh[k], params[k])

    no_plateau = fo.Adam({k: np.zeros_like(v) for k, v in params.items()}, lr=f)
    with pytest.raises(fo.CheckpointError, match="attach one first"):
        fo.load(tmp_path / "ck.npz", no_plateau)
    other, _ = build({k: np.zeros_like(v) for k, v in params.items()})
    other._plateau.factor = 0.5
    with pytest.raises(ValueError, match="configured differently"):
        fo.load(tmp_path / "ck.npz", other)


# ----------------------------------------------------------------------------- files
def test_checkpoint_file_layout(rng: np.random.Generator, tmp_path: Path) -> None:
    """A plain .npz: readable with np.load without pickle, JSON metadata, one member per
    array; parameters restored in place into the optimizer's own arrays."""
    params = make_params(rng, np.float32)
    opt = fo.RMSprop(params, momentum=0.5, centered=True)
    opt.step(make_grads(rng, params, 1)[0])
    path = tmp_path / "ck.npz"
    fo.save(str(path), opt)
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        assert sorted(z.files) == sorted(
            ["meta"]
            + [f"p{i}" for i in range(3)]
            + [f"s{i}.{n}" for i in range(3) for n in ("grad_avg", "momentum_buffer", "square_avg")]
        )
        np.testing.assert_array_equal(z["p0"], params["w"])
        np.testing.assert_array_equal(z["s1.square_avg"], opt.state["b"]["square_avg"])
    assert meta["format"] == "fastoptim.checkpoint/1"
    assert [p["key"] for p in meta["params"]] == ["w", "b", "v"]
    assert meta["optimizer"]["optimizer"] == "RMSprop"
    assert os.listdir(tmp_path) == ["ck.npz"]  # no temporary file left behind

    targets = {k: np.zeros_like(v) for k, v in params.items()}
    ids = {k: id(v) for k, v in targets.items()}
    opt2 = fo.RMSprop(targets, momentum=0.5, centered=True)
    fo.load(path, opt2)
    for k in params:
        assert id(opt2.param_groups[0]["params"][k]) == ids[k]
        np.testing.assert_array_equal(targets[k], params[k])


def test_interrupted_save_keeps_the_previous_checkpoint(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = make_params(rng, np.float32)
    opt = fo.Adam(params)
    path = tmp_path / "ck.npz"
    fo.save(path, opt)
    good = path.read_bytes()
    opt.step(make_grads(rng, params, 1)[0])

    def crash(file: Any, **arrays: Any) -> None:
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # e.g. the job was killed mid-write

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        fo.save(path, opt)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ck.npz"]


def _damaged(good: bytes) -> list[tuple[str, bytes]]:
    z = zipfile.ZipFile(__import__("io").BytesIO(good))
    data_at = z.infolist()[1].header_offset + 100  # inside the second member's array bytes
    flipped = bytearray(good)
    flipped[data_at] ^= 0x01
    return [
        ("truncated", good[: len(good) // 2]),
        ("cut at the end", good[:-10]),
        ("one bit flipped", bytes(flipped)),
        ("empty", b""),
        ("not a zip", b"hello" * 100),
    ]


@pytest.mark.parametrize("damage", range(5))
def test_damaged_files_are_rejected_and_change_nothing(
    damage: int, rng: np.random.Generator, tmp_path: Path
) -> None:
    params = make_params(rng, np.float32)
    grads = make_grads(rng, params, 2)
    src = fo.Adam(copy_params(params))
    src.step(grads[0])
    path = tmp_path / "ck.npz"
    fo.save(path, src)
    label, data = _damaged(path.read_bytes())[damage]
    path.write_bytes(data)
    opt = fo.Adam(params)
    opt.step(grads[1])
    before = snapshot(opt, params)
    with pytest.raises(fo.CheckpointError, match="load"):
        fo.load(path, opt)
    assert snapshot(opt, params) == before, label


def _other_checkpoints() -> list[tuple[str, Callable[[dict[str, np.ndarray]], fo.Optimizer], str]]:
    return [
        (
            "another optimizer",
            lambda p: fo.SGD(p, momentum=0.9),
            "state of SGD, not of Adam",
        ),
        (
            "a different shape",
            lambda p: fo.Adam({**p, "b": np.zeros(8, np.float32)}),
            r"parameter 'b': float32 \(8,\)",
        ),
        (
            "a different dtype",
            lambda p: fo.Adam({**p, "v": p["v"].astype(np.float64)}),
            "parameter 'v': float64",
        ),
        (
            "another parameter",
            lambda p: fo.Adam({**p, "u": np.zeros(2, np.float32)}),
            r"unexpected \['u'\]",
        ),
    ]


@pytest.mark.parametrize(
    ("label", "build", "message"),
    _other_checkpoints(),
    ids=lambda x: x if isinstance(x, str) and " " in x else "",
)
def test_mismatched_checkpoint_is_rejected_and_changes_nothing(
    label: str,
    build: Callable[[dict[str, np.ndarray]], fo.Optimizer],
    message: str,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    params = make_params(rng, np.float32)
    src = build(copy_params(params))
    src.step({k: np.ones_like(p) for k, p in src.param_groups[0]["params"].items()})
    path = tmp_path / "ck.npz"
    fo.save(path, src)
    opt = fo.Adam(params)
    opt.step(make_grads(rng, params, 1)[0])
    before = snapshot(opt, params)
    with pytest.raises(fo.CheckpointError, match=message):
        fo.load(path, opt)
    assert snapshot(opt, params) == before


def test_save_and_load_check_their_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="opt must be a fastoptim optimizer"):
        fo.save(tmp_path / "x.npz", object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="opt must be a fastoptim optimizer"):
        fo.load(tmp_path / "x.npz", object())  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        fo.load(tmp_path / "missing.npz", fo.SGD([np.zeros(2)]))
