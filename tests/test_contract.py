"""The contract every optimizer honours, whatever its maths:

- updates happen in place (same objects, same addresses), state and gradient buffers are views
  into one contiguous arena per group;
- parameters can be given as a list, a dict or a list of group dicts, gradients as a list, a
  dict or through the bound ``opt.grads``; hyper-parameter changes take effect at the next step;
- every rejected call raises TypeError/ValueError naming the offending parameter and what is
  wrong, and changes nothing (params, state, step counts: bit-identical);
- 0-d and empty arrays work; NaN/Inf gradients never crash;
- results do not depend on the thread count; the instruction set can be forced.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from cases import CASES, Case, once_not_per_isa, one_per_optimizer
from fastoptim import definitions

# Options that create every state buffer of each optimizer: these, and for every other
# optimizer its richest case of the shared table (cases.one_per_optimizer).
OPTIMIZERS: list[tuple[Any, dict[str, Any]]] = [
    (getattr(fo, c.opt), c.kwargs)
    for c in one_per_optimizer(
        [
            Case("SGD", dict(lr=0.1, momentum=0.9)),
            Case("Adagrad", dict(lr=0.1)),
            Case("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
            Case("Adadelta", dict(lr=1.0)),
            Case("Adam", dict(lr=0.01, amsgrad=True)),
            Case("AdamW", dict(lr=0.01, amsgrad=True)),
            Case("Adamax", dict(lr=0.01)),
            Case("NAdam", dict(lr=0.01)),
            Case("RAdam", dict(lr=0.01)),
            Case("Lion", dict(lr=0.01)),
        ]
    )
]
IDS = [c.__name__ for c, _ in OPTIMIZERS]
# Every state buffer, as the definitions name them (the kernels name them again in C++).
STATES = {d.name: [s.name for s in d.states] for d in definitions.ALL}
SHAPES = [(5,), (3, 4), (17,)]

every_optimizer = pytest.mark.parametrize(("cls", "kw"), OPTIMIZERS, ids=IDS)


def test_table_covers_every_optimizer() -> None:
    classes = {getattr(fo, n) for n in fo.__all__}
    optimizers = {c for c in classes if isinstance(c, type) and issubclass(c, fo.Optimizer)}
    host = {getattr(fo, d.name) for d in definitions.HOST}  # (test_muon.py, test_lbfgs.py)
    assert optimizers - {fo.Optimizer} - host == {c for c, _ in OPTIMIZERS}
    assert {c.opt for c in CASES} == {d.name for d in definitions.ALL}  # rows for each
    for cls, kw in OPTIMIZERS:  # each creates every state buffer
        assert set(cls([np.zeros(2)], **kw).state[0]) == {"step", *STATES[cls.__name__]}


# ---------------------------------------------------------------------------- helpers
def make_params(dtype: Any = np.float32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def make_grads(params: list[np.ndarray], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def root(a: np.ndarray) -> np.ndarray:
    """The array owning `a`'s memory (end of the .base chain)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def raw(a: np.ndarray) -> np.ndarray:
    return np.frombuffer(a.tobytes(), dtype=np.uint8)


def snapshot(opt: fo.Optimizer, *extra: np.ndarray) -> list[tuple[str, Any]]:
    """Raw bytes of every parameter and state array, every step count, and `extra` arrays."""
    snap: list[tuple[str, Any]] = []
    for gi, group in enumerate(opt.param_groups):
        ps = group["params"]
        for key, p in ps.items() if hasattr(ps, "items") else enumerate(ps):
            snap.append((f"group {gi} param {key}", raw(p)))
    for key, entry in opt.state.items():
        for name, value in entry.items():
            snap.append((f"state {key} {name}", value if name == "step" else raw(value)))
    for i, a in enumerate(extra):
        snap.append((f"extra {i}", raw(a)))
    return snap


def assert_same(before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> None:
    assert [k for k, _ in before] == [k for k, _ in after]
    for (k, b), (_, a) in zip(before, after):
        if isinstance(b, np.ndarray):
            assert np.array_equal(b, a), f"{k} changed"
        else:
            assert b == a, f"{k} changed"


def assert_step_rejected(
    opt: fo.Optimizer,
    grads: Any,
    exc: type[Exception] | tuple[type[Exception], ...],
    words: list[str] | tuple[str, ...] = (),
) -> None:
    """``opt.step(grads)`` raises `exc` with every one of `words` in its message, and changes
    nothing (see :func:`snapshot`)."""
    before = snapshot(opt)
    with pytest.raises(exc) as info:
        opt.step(grads)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert_same(before, snapshot(opt))


def stepped(cls: Any, kw: dict[str, Any], n: int = 2) -> tuple[Any, list[Any]]:
    """An optimizer over three float32 params that has taken `n` steps (non-trivial state)."""
    params = make_params()
    opt = cls(params, **kw)
    for i in range(n):
        opt.step(make_grads(params, seed=10 + i))
    return opt, params


# ---------------------------------------------------------------------------- in place
@every_optimizer
def test_in_place_same_objects_and_addresses(cls: Any, kw: dict[str, Any]) -> None:
    params = make_params()
    start = [p.copy() for p in params]
    addresses = [p.ctypes.data for p in params]
    opt = cls(params, **kw)
    for i in range(3):
        opt.step(make_grads(params, seed=i))
    assert [p.ctypes.data for p in params] == addresses
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params))
    for p, s in zip(params, start):
        assert not np.array_equal(p, s)
    for i in range(len(params)):
        assert opt.state[i]["step"] == 3


@every_optimizer
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_is_one_arena_per_group(cls: Any, kw: dict[str, Any], dtype: Any) -> None:
    g0, g1 = make_params(dtype), make_params(dtype, seed=5)
    opt = cls([{"params": g0}, {"params": g1}], **kw)
    opt.step(make_grads(g0 + g1))
    names = STATES[cls.__name__]
    roots: list[int] = []
    for gi, group in enumerate((range(0, 3), range(3, 6))):
        for name in names:
            views = [opt.state[i][name] for i in group]
            params = [(g0 + g1)[i] for i in group]
            block = root(views[0])
            lo, hi = block.ctypes.data, block.ctypes.data + block.nbytes
            for v, p in zip(views, params):
                assert root(v) is block, f"{name} of group {gi} is not in one arena"
                assert v.shape == p.shape and v.dtype == p.dtype
                assert v.flags.c_contiguous and v.flags.writeable
                assert lo <= v.ctypes.data and v.ctypes.data + v.nbytes <= hi
                assert v.ctypes.data % 64 == 0
            # the views are laid out in parameter order without overlap
            starts = [v.ctypes.data for v in views]
            assert all(a + v.nbytes <= b for a, v, b in zip(starts, views, starts[1:]))
            roots.append(id(block))
    assert len(set(roots)) == len(roots)  # one arena per (group, state)
    assert set(opt.state[0]) == {"step", *names}


@every_optimizer
def test_grads_buffer(cls: Any, kw: dict[str, Any]) -> None:
    g0, g1 = make_params(), make_params(seed=5)
    opt = cls([{"params": g0}, {"params": g1}], **kw)
    twin_params = [p.copy() for p in g0 + g1]
    twin = cls([{"params": twin_params[:3]}, {"params": twin_params[3:]}], **kw)
    grads = opt.grads
    assert isinstance(grads, list) and len(grads) == 6
    again = opt.grads
    assert isinstance(again, list) and all(x is y for x, y in zip(again, grads))  # same buffers
    for group in (grads[:3], grads[3:]):
        block = root(group[0])
        lo, hi = block.ctypes.data, block.ctypes.data + block.nbytes
        for g in group:
            assert root(g) is block
            assert lo <= g.ctypes.data and g.ctypes.data + g.nbytes <= hi
            assert g.flags.c_contiguous and g.flags.writeable
    assert root(grads[0]) is not root(grads[3])
    for g, p in zip(grads, g0 + g1):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert not g.any()
    for step in range(2):
        values = make_grads(g0 + g1, seed=20 + step)
        for g, v in zip(grads, values):
            g[...] = v
        opt.step()  # uses opt.grads
        twin.step(values)
        for a, b in zip(g0 + g1, twin_params):
            assert a.tobytes() == b.tobytes()
        assert all(np.array_equal(g, v) for g, v in zip(grads, values))  # grads only read
    opt.zero_grad()
    assert not any(g.any() for g in grads)
    # a step with explicit gradients, then back to the bound buffers
    values = make_grads(g0 + g1, seed=30)
    opt.step(values)
    twin.step(values)
    for g, v in zip(grads, values):
        g[...] = v
    opt.step()
    twin.step(values)
    for a, b in zip(g0 + g1, twin_params):
        assert a.tobytes() == b.tobytes()


def test_views_of_one_flat_buffer_and_read_only_grads() -> None:
    """Disjoint views of one buffer are fine as parameters (updated in the buffer); gradients
    are only read, so read-only ones are accepted."""
    flat = np.zeros(20, np.float32)
    opt = fo.SGD([flat[:5], flat[5:].reshape(3, 5)], lr=1.0)
    grads = [np.ones(5, np.float32), np.full((3, 5), 2.0, np.float32)]
    for g in grads:
        g.flags.writeable = False
    opt.step(grads)
    np.testing.assert_array_equal(flat, [-1.0] * 5 + [-2.0] * 15)


def test_zero_grad_before_grads_exist() -> None:
    """zero_grad() before any gradient buffer was asked for: no error, parameters untouched,
    and the buffers made afterwards are zeros that a step without gradients reads."""
    params = make_params()
    before = [p.copy() for p in params]
    opt = fo.SGD(params, lr=0.1)
    opt.zero_grad()
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)
    bound = opt.grads
    assert isinstance(bound, list) and len(bound) == len(params)
    for g, p in zip(bound, params):
        assert g.shape == p.shape and g.dtype == p.dtype and not g.any()
    opt.step()  # zero gradients: SGD leaves every parameter as it is
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)


@every_optimizer
def test_params_as_dict(cls: Any, kw: dict[str, Any]) -> None:
    arrays = make_params()
    named = dict(zip(("a", "b", "c"), arrays))
    listed = [p.copy() for p in arrays]
    opt_d, opt_l = cls(named, **kw), cls(listed, **kw)
    assert set(opt_d.state) == {"a", "b", "c"}
    grads = make_grads(arrays)
    opt_d.step(dict(zip(("c", "a", "b"), (grads[2], grads[0], grads[1]))))  # any key order
    opt_l.step(grads)
    bound = opt_d.grads
    assert isinstance(bound, dict) and list(bound) == ["a", "b", "c"]
    for k, g in zip("abc", grads):
        bound[k][...] = g
    opt_d.step()
    opt_l.step(grads)
    for a, b in zip(arrays, listed):
        assert a.tobytes() == b.tobytes()
    assert opt_d.param_groups[0]["params"]["b"] is arrays[1]


@every_optimizer
def test_group_dicts_with_per_group_hyper(cls: Any, kw: dict[str, Any]) -> None:
    a, b = make_params(), make_params()  # identical values
    lr = kw["lr"]
    opt = cls([{"params": a}, {"params": b, "lr": lr / 4}], **kw)
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[1]["lr"] == lr / 4
    alone = [p.copy() for p in a]
    alone_opt = cls(alone, **{**kw, "lr": lr / 4})
    for s in range(3):
        grads = make_grads(a, seed=s)
        opt.step(grads + [g.copy() for g in grads])
        alone_opt.step(grads)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b)), "per-group lr ignored"
    for x, y in zip(b, alone):
        assert x.tobytes() == y.tobytes()


@every_optimizer
def test_group_mixing_dtypes(cls: Any, kw: dict[str, Any]) -> None:
    """float32 and float64 parameters in one group (one compiled call) update exactly as in
    single-dtype optimizers."""
    rng = np.random.default_rng(7)
    values = [rng.standard_normal(n) for n in (5, 300_001, 17, 0)]
    dtypes = [np.float32, np.float64, np.float64, np.float32]
    mixed = [v.astype(d) for v, d in zip(values, dtypes)]
    alone = [v.astype(d) for v, d in zip(values, dtypes)]
    opt = cls(mixed, **kw)
    singles = [cls([p], **kw) for p in alone]
    for s in range(3):
        grads = make_grads(mixed, seed=s)
        opt.step(grads)
        for single, g in zip(singles, grads):
            single.step([g])
    for x, y in zip(mixed, alone):
        assert x.dtype == y.dtype
        assert x.tobytes() == y.tobytes()
    for key, single in enumerate(singles):
        for name, value in single.state[0].items():
            if name != "step":
                assert opt.state[key][name].tobytes() == value.tobytes(), name


# What stops an optimizer's updates: lr = 0, but for Rprop, whose lr only sets the initial
# step size (as in torch), a zero step size range.
STOP: dict[str, dict[str, Any]] = {"Rprop": {"step_sizes": (0.0, 0.0)}}
# Steps before a new lr takes effect: ASGD computes the next step's eta from this step's lr.
LAG: dict[str, int] = {"ASGD": 1}


@every_optimizer
def test_lr_change_takes_effect_next_step(cls: Any, kw: dict[str, Any]) -> None:
    params = make_params()
    opt = cls(params, **kw)
    opt.step(make_grads(params, seed=0))
    stop = STOP.get(cls.__name__, {"lr": 0.0})
    old = {k: opt.param_groups[0][k] for k in stop}
    opt.param_groups[0].update(stop)
    for seed in range(LAG.get(cls.__name__, 0)):
        opt.step(make_grads(params, seed=10 + seed))
    before = [p.copy() for p in params]
    opt.step(make_grads(params, seed=1))
    for p, q in zip(params, before):
        assert p.tobytes() == q.tobytes(), f"{stop} still moved the parameters"
    opt.param_groups[0].update(old)
    for seed in range(LAG.get(cls.__name__, 0)):
        opt.step(make_grads(params, seed=20 + seed))
        assert all(p.tobytes() == q.tobytes() for p, q in zip(params, before))
    opt.step(make_grads(params, seed=2))
    assert all(not np.array_equal(p, q) for p, q in zip(params, before))


def test_rprop_lr_is_the_initial_step_size() -> None:
    """Rprop's lr fills step_size when the state is first used (a change before the first
    step counts, as in torch, where the state is created then); later it changes nothing."""
    a, b = make_params(), make_params()
    opt_a, opt_b = fo.Rprop(a, lr=0.5), fo.Rprop(b, lr=0.25)
    opt_a.param_groups[0]["lr"] = 0.25
    for i in range(3):
        if i == 1:
            opt_a.param_groups[0]["lr"] = opt_b.param_groups[0]["lr"] = 7.0
        opt_a.step(make_grads(a, seed=i))
        opt_b.step(make_grads(b, seed=i))
        for x, y in zip(a, b):
            assert x.tobytes() == y.tobytes()
    assert opt_a.state[0]["step_size"].max() <= 0.25 * 1.2**3


def test_add_param_group_later() -> None:
    a, b = make_params(), make_params(seed=3)
    opt = fo.Adam(a, lr=0.1)
    opt.add_param_group({"params": b, "lr": 0.01})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    opt.step(make_grads(a + b))
    assert opt.state[3]["step"] == 1


# ---------------------------------------------------------------------------- rejections
def _bad_grads(case: str, params: list[np.ndarray]) -> list[Any]:
    """Gradients for `params` (3 of them) with parameter 1 (or 2) at fault."""
    g = make_grads(params, seed=7)
    if case == "shape":
        g[1] = np.zeros((4, 3), np.float32)
    elif case == "dtype-f64":
        g[1] = g[1].astype(np.float64)
    elif case == "dtype-u16":  # (float16 and bfloat16 gradients are read: test_precision.py)
        g[1] = g[1].astype(np.uint16)
    elif case == "dtype-i32":
        g[1] = g[1].astype(np.int32)
    elif case == "dtype-complex":
        g[1] = g[1].astype(np.complex64)
    elif case == "transposed":
        g[1] = np.ascontiguousarray(g[1].T).T
    elif case == "strided":
        g[2] = np.zeros(34, np.float32)[::2]
    elif case == "byteswapped":
        g[1] = g[1].astype(">f4")
    elif case == "missing":
        del g[2]
    elif case == "extra":
        g.append(g[0].copy())
    elif case == "alias-param":
        g[1] = params[1]
    elif case == "alias-param-view":
        g[1] = params[1].reshape(3, 4)[:, :]  # a view of the same memory
    elif case == "alias-grad":
        buf = np.zeros(20, np.float32)
        g[0], g[2] = buf[:5], buf[3:]
    elif case == "list-item":
        g[1] = g[1].tolist()
    else:
        raise AssertionError(case)
    return g


GRAD_CASES: list[tuple[str, type[Exception], list[str]]] = [
    ("shape", ValueError, ["param 1", "shape"]),
    ("dtype-f64", TypeError, ["param 1", "float64"]),
    ("dtype-u16", TypeError, ["param 1", "uint16"]),
    ("dtype-i32", TypeError, ["param 1", "int32"]),
    ("dtype-complex", TypeError, ["param 1", "complex64"]),
    ("transposed", ValueError, ["param 1", "contiguous"]),
    ("strided", ValueError, ["param 2", "contiguous"]),
    ("byteswapped", TypeError, ["param 1", "byte order"]),
    ("missing", ValueError, ["expected 3 gradients, got 2"]),
    ("extra", ValueError, ["expected 3 gradients, got 4"]),
    ("alias-param", ValueError, ["grad for param 1", "shares memory", "param 1"]),
    ("alias-param-view", ValueError, ["grad for param 1", "shares memory"]),
    ("alias-grad", ValueError, ["grad for param", "shares memory"]),
    ("list-item", TypeError, ["param 1", "ndarray", "list"]),
]


@every_optimizer
@pytest.mark.parametrize(("case", "exc", "words"), GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_bad_grads_change_nothing(
    cls: Any, kw: dict[str, Any], case: str, exc: type[Exception], words: list[str]
) -> None:
    opt, params = stepped(cls, kw)
    assert_step_rejected(opt, _bad_grads(case, params), exc, words)
    opt.step(make_grads(params))  # still usable
    assert opt.state[0]["step"] == 3


@every_optimizer
def test_bad_grads_in_second_group_leave_first_untouched(cls: Any, kw: dict[str, Any]) -> None:
    a, b = make_params(), make_params(seed=4)
    opt = cls([{"params": a}, {"params": b, "lr": kw["lr"] / 2}], **kw)
    opt.step(make_grads(a + b))
    for bad in ("shape", "dtype-f64", "alias-grad", "list-item"):
        assert_step_rejected(opt, make_grads(a) + _bad_grads(bad, b), (TypeError, ValueError))
    # a gradient of group 1 that is a parameter of group 0, and vice versa
    for grads in ([*make_grads(a), a[0], *make_grads(b)[1:]], [b[0], *make_grads(a + b)[1:]]):
        assert_step_rejected(opt, grads, ValueError, ["shares memory"])


def test_grad_aliasing_param_of_other_group_message() -> None:
    a, b = [np.zeros(4, np.float32)], [np.ones(4, np.float32)]
    opt = fo.Adam([{"params": a}, {"params": b}])
    assert_step_rejected(
        opt, [b[0], np.zeros(4, np.float32)], ValueError, ["grad for param 0", "param 1"]
    )


def test_grads_not_a_list() -> None:
    opt, params = stepped(fo.Adam, dict(lr=0.1))
    assert_step_rejected(opt, np.zeros(5, np.float32), TypeError, ["list"])
    assert_step_rejected(opt, {"0": params[0]}, TypeError, ["dict"])


@every_optimizer
def test_bad_grad_dicts(cls: Any, kw: dict[str, Any]) -> None:
    arrays = make_params()
    opt = cls(dict(zip("abc", arrays)), **kw)
    grads = dict(zip("abc", make_grads(arrays)))
    opt.step(grads)
    cases: list[tuple[dict[str, Any], type[Exception], list[str]]] = [
        ({**grads, "d": grads["a"].copy()}, ValueError, ["'d'", "unexpected"]),
        ({k: v for k, v in grads.items() if k != "b"}, ValueError, ["'b'", "missing"]),
        ({**grads, "b": grads["b"].astype(np.float64)}, TypeError, ["param 'b'", "dtype"]),
        ({**grads, "c": np.zeros(16, np.float32)}, ValueError, ["param 'c'", "shape"]),
        ({**grads, "b": arrays[1]}, ValueError, ["param 'b'", "shares memory"]),
    ]
    for bad, exc, words in cases:
        assert_step_rejected(opt, bad, exc, words)


# Bad parameters: rejected at construction and by add_param_group.
def _bad_param(case: str) -> tuple[list[Any], list[str]]:
    good = np.ones(6, np.float32)
    if case == "transposed":
        bad: Any = np.ones((3, 4), np.float32).T
        return [good, bad], ["param 1", "contiguous"]
    if case == "strided":
        return [good, np.ones(12, np.float32)[::2]], ["param 1", "contiguous"]
    if case in ("uint16", "int32", "complex64"):
        return [good, np.ones(6, case)], ["param 1", case]
    if case == "byteswapped":
        return [good, np.ones(6, ">f4")], ["param 1", "byte order"]
    if case == "read-only":
        bad = np.ones(6, np.float32)
        bad.flags.writeable = False
        return [good, bad], ["param 1", "read-only"]
    if case == "twice":
        return [good, good], ["param 1", "shares memory", "param 0"]
    if case == "overlap":
        buf = np.ones(10, np.float32)
        return [buf[:6], buf[4:]], ["param", "shares memory"]
    if case == "list":
        return [good, [1.0, 2.0]], ["param 1", "ndarray"]
    if case == "unaligned":
        buf = np.zeros(6 * 4 + 1, np.uint8)
        bad = buf[1:].view(np.float32)
        assert not bad.flags.aligned
        return [good, bad], ["param 1", "aligned"]
    raise AssertionError(case)


PARAM_CASES = [
    ("transposed", ValueError),
    ("strided", ValueError),
    ("uint16", TypeError),  # float16 and bfloat16 parameters: test_precision.py
    ("int32", TypeError),
    ("complex64", TypeError),
    ("byteswapped", TypeError),
    ("read-only", ValueError),
    ("twice", ValueError),
    ("overlap", ValueError),
    ("list", TypeError),
    ("unaligned", ValueError),
]


@every_optimizer
@pytest.mark.parametrize(("case", "exc"), PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_params_rejected(cls: Any, kw: dict[str, Any], case: str, exc: type[Exception]) -> None:
    params, words = _bad_param(case)
    before = [raw(np.asarray(p)) for p in params]
    with pytest.raises(exc) as info:
        cls(params, **kw)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert all(np.array_equal(b, raw(np.asarray(p))) for b, p in zip(before, params))
    # the same arrays offered to an existing optimizer: rejected, optimizer unchanged
    opt, _ = stepped(cls, kw)
    snap = snapshot(opt)
    with pytest.raises(exc):
        opt.add_param_group({"params": params})
    assert len(opt.param_groups) == 1
    assert_same(snap, snapshot(opt))
    opt.step(make_grads(make_params()))


@every_optimizer
def test_param_already_in_another_group(cls: Any, kw: dict[str, Any]) -> None:
    opt, params = stepped(cls, kw)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="shares memory"):
        opt.add_param_group({"params": [params[1]]})
    assert len(opt.param_groups) == 1
    assert_same(snap, snapshot(opt))


def test_torch_tensors_rejected() -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros(4)
    with pytest.raises(TypeError, match=r"param 0.*Tensor.*tensor\.numpy\(\)"):
        fo.Adam([t])
    opt, params = stepped(fo.Adam, dict(lr=0.1))
    before = snapshot(opt)
    grads: list[Any] = make_grads(params)
    grads[1] = torch.from_numpy(grads[1])
    with pytest.raises(TypeError, match=r"param 1.*tensor\.numpy\(\)"):
        opt.step(grads)
    assert_same(before, snapshot(opt))


def test_structure_rejections() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        fo.Adam([])
    with pytest.raises(ValueError, match="empty parameter list"):
        fo.Adam({})
    with pytest.raises(ValueError, match="empty parameter list"):
        fo.SGD([{"params": []}])
    with pytest.raises(TypeError, match="single array"):
        fo.Adam(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"unknown hyper-parameter.*'foo'"):
        fo.Adam([{"params": [np.zeros(3, np.float32)], "foo": 1}])
    with pytest.raises(TypeError, match="same way"):
        mixed: list[Any] = [
            {"params": [np.zeros(3, np.float32)]},
            {"params": {"b": np.zeros(3, np.float32)}},
        ]
        fo.Adam(mixed)
    with pytest.raises(ValueError, match="'a' appears in two groups"):
        fo.Adam(
            [{"params": {"a": np.zeros(3, np.float32)}}, {"params": {"a": np.zeros(3, np.float32)}}]
        )


def _defaults(cls: Any) -> dict[str, Any]:
    return dict(cls._definition.defaults())


# Invalid hyper-parameters: (class, kwargs, words in the message).
HYPER_CASES: list[tuple[Any, dict[str, Any], list[str]]] = [
    *[(c, {**kw, "lr": -1.0}, ["lr"]) for c, kw in OPTIMIZERS],
    *[(c, {**kw, "lr": float("nan")}, ["lr"]) for c, kw in OPTIMIZERS],
    *[(c, {**kw, "eps": -1e-8}, ["eps"]) for c, kw in OPTIMIZERS if "eps" in _defaults(c)],
    *[
        (c, {**kw, "betas": betas}, [name])
        for c, kw in OPTIMIZERS
        if "betas" in _defaults(c)
        for betas, name in (
            ((1.0, 0.9), "betas[0]"),
            ((-0.1, 0.9), "betas[0]"),
            ((0.9, 1.0), "betas[1]"),
        )
    ],
    (fo.SGD, dict(lr=0.1, nesterov=True), ["nesterov", "momentum"]),
    (fo.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.1), ["nesterov", "dampening"]),
    (fo.SGD, dict(lr=0.1, momentum=-0.9), ["momentum"]),
    (fo.RMSprop, dict(alpha=1.5), ["alpha"]),
    (fo.Adadelta, dict(rho=-0.5), ["rho"]),
    (fo.Adam, dict(weight_decay=-1.0), ["weight_decay"]),
    (fo.Adam, dict(amsgrad=1), ["amsgrad"]),
    (fo.NAdam, dict(momentum_decay=-1.0), ["momentum_decay"]),
    (fo.Adagrad, dict(lr_decay=-1.0), ["lr_decay"]),
    (fo.Lion, dict(weight_decay=float("inf")), ["weight_decay"]),
    (fo.LAMB, dict(max_weight_norm=-1.0), ["max_weight_norm"]),
    (fo.LAMB, dict(max_trust_ratio=0.0), ["max_trust_ratio"]),
    (fo.LAMB, dict(max_trust_ratio="1"), ["max_trust_ratio"]),
    (fo.LARS, dict(momentum=1.5), ["momentum"]),
    (fo.LARS, dict(trust_coefficient=-1e-3), ["trust_coefficient"]),
    (fo.LARS, dict(exclude_1d=0), ["exclude_1d"]),
    (fo.LAMB, dict(bias_correction=0), ["bias_correction"]),
    (fo.Rprop, dict(etas=(1.0, 1.2)), ["etas"]),
    (fo.Rprop, dict(etas=(0.0, 1.2)), ["etas"]),
    (fo.Rprop, dict(etas=(0.5, 1.0)), ["etas"]),
    (fo.Rprop, dict(etas=(-0.5, 1.2)), ["etas[0]"]),
    (fo.Rprop, dict(etas=0.5), ["etas", "pair"]),
    (fo.Rprop, dict(step_sizes=(1e-6, float("inf"))), ["step_sizes[1]"]),
    (fo.Rprop, dict(step_sizes=(-1e-6, 50)), ["step_sizes[0]"]),
    (fo.Rprop, dict(step_sizes=(1.0, 0.5)), ["step_sizes"]),
    (fo.Rprop, dict(step_sizes=(1e-6, "50")), ["step_sizes[1]"]),
]
HYPER_IDS = [
    f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw, _ in HYPER_CASES
]


@pytest.mark.parametrize(("cls", "kw", "words"), HYPER_CASES, ids=HYPER_IDS)
def test_invalid_hyper_parameters(cls: Any, kw: dict[str, Any], words: list[str]) -> None:
    # at construction
    with pytest.raises((TypeError, ValueError)) as info:
        cls(make_params(), **kw)
    for w in words:
        assert w in str(info.value), str(info.value)
    # in a group dict
    with pytest.raises((TypeError, ValueError)):
        cls([{"params": make_params(), **kw}])
    # set later through param_groups (in the second group): the step raises, changes nothing
    a, b = make_params(), make_params(seed=3)
    opt = cls([{"params": a}, {"params": b}])
    opt.step(make_grads(a + b))
    old = dict(opt.param_groups[1])
    opt.param_groups[1].update(kw)
    for grads in (make_grads(a + b), None):
        assert_step_rejected(opt, grads, (TypeError, ValueError), words)
    opt.param_groups[1].update({k: old[k] for k in kw})
    opt.step(make_grads(a + b))  # usable again
    assert opt.state[5]["step"] == 2


@every_optimizer
def test_unknown_hyper_parameter_set_later(cls: Any, kw: dict[str, Any]) -> None:
    opt, params = stepped(cls, kw)
    opt.param_groups[0]["lrr"] = 0.5
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"unknown hyper-parameter.*'lrr'"):
        opt.step(make_grads(params))
    assert_same(before, snapshot(opt))
    del opt.param_groups[0]["lrr"]
    opt.step(make_grads(params))


# ---------------------------------------------------------------------------- special arrays
@every_optimizer
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_dim_and_empty(cls: Any, kw: dict[str, Any], dtype: Any) -> None:
    scalar = np.array(0.5, dtype)
    params = [scalar, np.zeros(0, dtype), np.zeros((2, 0, 3), dtype), np.full(4, 0.5, dtype)]
    single = [np.array([0.5], dtype)]
    opt, ref = cls(params, **kw), cls(single, **kw)
    for s in range(3):
        g = dtype(0.25 * (s + 1))
        opt.step(
            [
                np.array(g, dtype),
                np.zeros(0, dtype),
                np.zeros((2, 0, 3), dtype),
                np.full(4, g, dtype),
            ]
        )
        ref.step([np.array([g], dtype)])
    assert scalar.shape == () and scalar != 0.5
    assert scalar.tobytes() == single[0].tobytes()
    assert (params[3] == scalar).all()  # same maths on the 0-d and the 1-d array
    assert opt.state[1]["step"] == 3 and opt.state[0][STATES[cls.__name__][0]].shape == ()
    # a group of empty arrays only
    empty = cls([np.zeros(0, dtype)], **kw)
    empty.step([np.zeros(0, dtype)])
    empty.step()


@every_optimizer
def test_nan_inf_gradients(cls: Any, kw: dict[str, Any]) -> None:
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(64).astype(np.float32)
    dirty, clean = p0.copy(), p0.copy()
    opt_d, opt_c = cls([dirty], **kw), cls([clean], **kw)
    bad = np.array([3, 10, 20])
    for _ in range(3):
        g = rng.standard_normal(64).astype(np.float32)
        gd = g.copy()
        gd[bad] = [np.nan, np.inf, -np.inf]
        opt_d.step([gd])
        opt_c.step([g])
    ok = np.ones(64, bool)
    ok[bad] = False
    for name in STATES[cls.__name__]:
        assert np.isfinite(opt_d.state[0][name][ok]).all()
    if cls._definition.per_tensor and cls.__name__ == "LAMB":
        # the trust ratio's norms take every element: a non-finite update norm makes the whole
        # tensor's step non-finite (as pytorch_optimizer.Lamb); LARS's 1-D tensor is excluded
        assert not np.isfinite(dirty).any()
        return
    assert np.isfinite(dirty[ok]).all()
    assert dirty[ok].tobytes() == clean[ok].tobytes()  # elementwise: others unaffected
    # NaN propagates into its own element: the parameter, or at least its state (Rprop moves by
    # the gradient's sign, and torch.sign(NaN) = 0, but keeps the NaN gradient as ``prev``)
    here = [dirty[3], *(opt_d.state[0][n][3] for n in STATES[cls.__name__])]
    assert not np.isfinite(here).all()
    for name in STATES[cls.__name__]:
        assert np.isfinite(opt_d.state[0][name][ok]).all()


# ---------------------------------------------------------------------------- threads, ISA
@pytest.fixture
def restore_threads() -> Any:
    n = fo.get_num_threads()
    yield n
    fo.set_num_threads(n)


def test_num_threads_round_trip(restore_threads: int) -> None:
    assert restore_threads >= 1
    for n in (1, 2, 3):
        fo.set_num_threads(n)
        assert fo.get_num_threads() == n
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="set_num_threads"):
            fo.set_num_threads(bad)  # type: ignore[arg-type]
    assert fo.get_num_threads() == 3


@every_optimizer
def test_thread_count_does_not_change_results(
    cls: Any, kw: dict[str, Any], restore_threads: int
) -> None:
    rng = np.random.default_rng(0)
    n = 300_000
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    results = []
    for threads in (1, 2):
        fo.set_num_threads(threads)
        p = p0.copy()
        opt = cls([p], **kw)
        for g in grads:
            opt.step([g])
        results.append((p, {k: v.copy() for k, v in opt.state[0].items() if k != "step"}))
    (p1, s1), (p2, s2) = results
    assert p1.tobytes() == p2.tobytes()
    for k in s1:
        assert s1[k].tobytes() == s2[k].tobytes()


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, FASTOPT_ISA only as `env` sets it (the tests built on it
    are once_not_per_isa: CI's per-ISA runs would repeat them exactly)."""
    full_env = {k: v for k, v in os.environ.items() if k != "FASTOPT_ISA"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=60
    )


def test_version_is_the_installed_distribution() -> None:
    from importlib.metadata import version

    assert fo.__version__ == version("fastoptim") != "0+unknown"


def test_isa() -> None:
    assert fo.isa() in fo.available_isas()
    assert "scalar" in fo.available_isas() or "neon" in fo.available_isas()


@once_not_per_isa
def test_isa_forced_by_environment() -> None:
    baseline = "scalar" if "scalar" in fo.available_isas() else fo.available_isas()[0]
    r = _python("import fastoptim; print(fastoptim.isa())", FASTOPT_ISA=baseline)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == baseline


@once_not_per_isa
def test_invalid_isa_environment_fails_at_import() -> None:
    r = _python("import fastoptim", FASTOPT_ISA="sse9")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "FASTOPT_ISA" in r.stderr and "sse9" in r.stderr


@once_not_per_isa
def test_every_isa_gives_a_sane_step() -> None:
    """Each available instruction set runs an Adam step in a subprocess (same answer up to
    FMA rounding differences between ISAs)."""
    code = (
        "import numpy as np, fastoptim as fo\n"
        "p = np.linspace(-1, 1, 37).astype(np.float32)\n"
        "opt = fo.Adam([p], lr=0.1)\n"
        "opt.step([np.linspace(1, -2, 37).astype(np.float32)])\n"
        "print(fo.isa(), *p.tolist())\n"
    )
    outputs = {}
    for isa in fo.available_isas():
        r = _python(code, FASTOPT_ISA=isa)
        assert r.returncode == 0, r.stderr
        name, *values = r.stdout.split()
        assert name == isa
        outputs[isa] = np.array(values, float)
    first = next(iter(outputs.values()))
    for v in outputs.values():
        np.testing.assert_allclose(v, first, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ Keras keyword hints
KERAS_HINTS = [  # (class name, Keras keyword, what the message must name)
    ("Adam", "beta_1", ["'beta_1'", "betas=(beta_1, beta_2)", "fastoptim.keras.Adam"]),
    ("AdamW", "beta_2", ["'beta_2'", "betas=(beta_1, beta_2)", "fastoptim.keras.AdamW"]),
    ("NAdam", "epsilon", ["'epsilon'", "eps=epsilon", "fastoptim.keras.Nadam"]),
    ("SGD", "learning_rate", ["'learning_rate'", "lr=learning_rate", "fastoptim.keras.SGD"]),
    ("RMSprop", "rho", ["'rho'", "alpha=rho", "fastoptim.keras.RMSprop"]),
    ("Lion", "beta_1", ["'beta_1'", "betas=(beta_1, beta_2)", "fastoptim.keras.Lion"]),
    ("Adagrad", "epsilon", ["'epsilon'", "eps=epsilon", "fastoptim.keras.Adagrad"]),
    ("SGD", "epsilon", ["'epsilon'", "SGD has no such option", "fastoptim.keras.SGD"]),
    ("Adam", "rho", ["'rho'", "Adam has no such option", "fastoptim.keras.Adam"]),
    ("Rprop", "beta_1", ["'beta_1'", "Rprop has no such option"]),  # no Keras counterpart
    # ASGD's alpha is not Keras's rho (a power of its step size decay, not an average's decay)
    ("ASGD", "rho", ["'rho'", "ASGD has no such option"]),
]


def test_keras_epsilon_is_not_adafactors_pair() -> None:
    """Adafactor's eps is a pair (eps1, eps2): Keras's epsilon is not offered as it."""
    with pytest.raises(TypeError) as info:
        fo.Adafactor([np.zeros((3, 3))], epsilon=1e-3)
    assert str(info.value) == "Adafactor: unknown argument 'epsilon'; Adafactor has no such option"


@pytest.mark.parametrize(("name", "keyword", "words"), KERAS_HINTS)
def test_keras_keyword_hint(name: str, keyword: str, words: list[str]) -> None:
    """A Keras keyword given to a torch-convention class or function raises a TypeError
    naming the torch equivalent and the fastoptim.keras class."""
    p = np.zeros(3)
    with pytest.raises(TypeError) as info:
        getattr(fo, name)([p], **{keyword: 0.5})
    assert str(info.value).startswith(f"{name}: unknown argument")
    for w in words:
        assert w in str(info.value)
    fn = getattr(fo.functional, name.lower() + "_")
    with pytest.raises(TypeError) as info:
        fn(p, np.zeros(3), *([np.zeros(3)] * 3), step=1, **{keyword: 0.5})
    assert str(info.value).startswith(f"{name.lower()}_: unknown argument")
    for w in words:
        assert w in str(info.value)
    assert not p.any()  # nothing happened


def test_keras_keyword_hint_torch() -> None:
    torch = pytest.importorskip("torch")
    import fastoptim.torch as fot

    with pytest.raises(TypeError, match=r"Adam: unknown argument 'beta_1'.*betas=\(beta_1"):
        fot.Adam([torch.zeros(2, requires_grad=True)], beta_1=0.9)


def test_other_unknown_keywords_unchanged() -> None:
    """Any other unknown keyword: Python's own TypeError; Keras names a signature has are
    fine (Adadelta's rho, Adagrad's initial_accumulator_value)."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        fo.Adam([np.zeros(3)], foo=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        fo.functional.adam_(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), step=1, foo=1)
    fo.Adadelta([np.zeros(3)], rho=0.5)
    fo.Adagrad([np.zeros(3)], initial_accumulator_value=0.5)
