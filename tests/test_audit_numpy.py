"""Regression tests for faults an audit of the NumPy tier found (each named after its fault):
copy-out arrays changed after ``set_copy_out``, quantized state filled with large values,
copy-outs the step never writes, and the functional tier's quantized-state helpers."""

from __future__ import annotations

from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest

import fastoptim as fo
from cases import fail_second_reads
from fastoptim import functional as F

BF16 = np.dtype(ml_dtypes.bfloat16)
N = 5000  # at least MIN_QUANTIZED elements: quantized state


def _arrays(opt: Any, *extra: np.ndarray) -> list[bytes]:
    """The bytes of every parameter and state array of `opt`, and of `extra`."""
    params = [p for g in opt.param_groups for p in g["params"]]
    states = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
    return [np.ascontiguousarray(a).tobytes() for a in (*params, *states, *extra)]


def _copy_out_opt() -> tuple[Any, np.ndarray]:
    """AdamW on a float32 parameter with a bfloat16 copy-out, one step done."""
    opt = fo.AdamW([np.ones(N, np.float32)])
    c = np.zeros(N, BF16)
    opt.set_copy_out([c])
    opt.step([np.ones(N, np.float32)])
    return opt, c


def test_copy_out_resized_after_set_copy_out_is_refused() -> None:
    """A copy-out reallocated after set_copy_out was written through its old pointer (a
    segfault).  Now the step raises first, naming it, and changes nothing."""
    opt, c = _copy_out_opt()
    c.resize(100_000, refcheck=False)
    before = _arrays(opt, c)
    for _ in range(3):
        with pytest.raises(ValueError, match="copy-out of param 0: the array was resized"):
            opt.step([np.ones(N, np.float32)])
    assert _arrays(opt, c) == before
    opt.set_copy_out(None)  # removed: the step runs again
    opt.step([np.ones(N, np.float32)])


def test_copy_out_made_read_only_after_set_copy_out_is_refused() -> None:
    """A copy-out made read-only after set_copy_out was still written."""
    opt, c = _copy_out_opt()
    c.flags.writeable = False
    before = _arrays(opt, c)
    with pytest.raises(ValueError, match="copy-out of param 0: array was made read-only"):
        opt.step([np.ones(N, np.float32)])
    assert _arrays(opt, c) == before
    c.flags.writeable = True  # writeable again: written by the next step
    opt.step([np.ones(N, np.float32)])
    assert np.array_equal(c, opt.param_groups[0]["params"][0].astype(BF16))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_accumulator_filled_beyond_a_byte(kind: str) -> None:
    """Adagrad(initial_accumulator_value=256.0, state_dtype="int8") raised OverflowError: the
    value was written into the uint8 codes before their code was.  Now its state is
    functional.quantized_state's, and dequantizes to the value; so is a value changed in
    param_groups before the first step (which wrote the value into the codes as a byte)."""
    w = np.ones(N, np.float32)
    opt = fo.Adagrad([w], initial_accumulator_value=256.0, state_dtype=kind)
    for fill in (256.0, 2.0, 300.0):
        opt.param_groups[0]["initial_accumulator_value"] = fill
        opt.state_dict()  # (the groups as the next step sees them)
        state = opt.state[0]
        codes, absmax = F.quantized_state(w, "sum", fill=fill, dtype=kind)
        assert state["sum"].tobytes() == codes.tobytes()
        assert state["sum_absmax"].tobytes() == absmax.tobytes()
        got = F.dequantized((state["sum"], state["sum_absmax"]), "sum", w.shape, dtype=kind)
        assert np.array_equal(got, np.full(N, fill, np.float32)), (fill, got[:3])
    opt.step([np.ones(N, np.float32)])


@pytest.mark.parametrize(
    "make",
    [
        lambda w: fo.Muon([w], lr=0.1),
        lambda w: fo.Adafactor([w], lr=0.1),
        lambda w: fo.LBFGS([w]),
    ],
    ids=["Muon", "Adafactor", "LBFGS"],
)
def test_set_copy_out_refused_where_the_step_runs_in_numpy(make: Callable[..., Any]) -> None:
    """Muon, Adafactor and LBFGS accepted set_copy_out and never wrote the copies."""
    w = np.ones((64, 32), np.float32)
    opt = make(w)
    c = np.zeros((64, 32), BF16)
    name = type(opt).__name__
    with pytest.raises(TypeError, match=f"{name}.set_copy_out: .*takes no precision options"):
        opt.set_copy_out([c])
    assert not c.astype(np.float32).any() and (w == 1).all()
    opt.set_copy_out(None)  # (no copies: nothing to refuse)


@pytest.mark.parametrize(
    "make", [lambda t: fo.SparseAdam([t], lr=0.1), lambda t: fo.SGD([t], lr=0.1)],
    ids=["SparseAdam", "SGD"],
)  # fmt: skip
def test_step_rows_refuses_a_copy_out(make: Callable[..., Any]) -> None:
    """step_rows left the copy-out of the rows it updated stale.  Now it refuses, writing
    nothing, as it refuses the other precision options; without the copy-out it runs."""
    t = np.ones((1000, 8), np.float32)
    opt = make(t)
    c = np.zeros((1000, 8), BF16)
    opt.set_copy_out([c])
    rows = [(np.array([1, 2]), np.ones((2, 8), np.float32))]
    before = _arrays(opt, c)
    with pytest.raises(ValueError, match=r"step_rows: param 0: .*copy-out"):
        opt.step_rows(rows)
    assert _arrays(opt, c) == before
    opt.step_rows([None])  # (no rows for it: its copy stays right)
    opt.set_copy_out(None)
    opt.step_rows(rows)
    assert (t[1] != 1).all() and (t[0] == 1).all()


def test_functional_quantized_state_checks() -> None:
    """functional.quantized_state filled a second moment of -1 as 0; dequantized raised
    KeyError for a state that cannot be quantized, and its shape errors said 'quantized:'."""
    w = np.zeros(N, np.float32)
    with pytest.raises(ValueError, match="quantized_state: state 'exp_avg_sq' is never negative"):
        F.quantized_state(w, "exp_avg_sq", fill=-1.0)
    signed = F.dequantized(F.quantized_state(w, "exp_avg", fill=-1.0), "exp_avg")
    assert np.allclose(signed, -1.0, rtol=1e-2)  # (a first moment may be negative)
    m = F.quantized_state(w, "exp_avg_sq")
    for where in ("quantized_state", "dequantized"):
        with pytest.raises(ValueError, match=rf"{where}: state 'ax' cannot be quantized \(quant"):
            F.quantized_state(w, "ax") if where == "quantized_state" else F.dequantized(m, "ax")
    with pytest.raises(ValueError, match=r"^dequantized: 8-bit codes: shape \(5000,\)"):
        F.dequantized(m, "exp_avg_sq", (5001,))


def test_changing_quantized_kind_names_both_kinds() -> None:
    """Changing state_dtype from int4 to int8 once the state exists was refused saying it
    exists as uint8 and would become uint8.  Now the refusal names the kinds."""
    opt = fo.AdamW([np.ones(N, np.float32)], state_dtype="int4")
    opt.step([np.ones(N, np.float32)])
    before = _arrays(opt)
    opt.param_groups[0]["state_dtype"] = "int8"
    with pytest.raises(ValueError, match=r"'exp_avg' of param 0 exists as int4; .* make it int8"):
        opt.step([np.ones(N, np.float32)])
    assert _arrays(opt) == before


# ------------------------------------------------- what a user can do to the groups between steps
def test_an_equal_value_of_another_type_still_checkpoints() -> None:
    """An entry set to a value equal to its own but of a refused type (seed=0.0 for 0, lr as a
    1-element array) is not a change the step sees; the checkpoints now hold the validated
    value (the optimizer's own state_dict did not load), and a fresh state buffer's first step
    no longer re-read the live group (it raised after the kernels: group 1's count stayed 0)."""
    p = [np.ones(4, np.float32)]
    opt = fo.Adam(p, lr=0.1)
    opt.param_groups[0]["seed"] = 0.0
    opt.step([np.ones(4, np.float32)])
    opt.load_state_dict(opt.state_dict())
    fo.Adam([np.ones(4, np.float32)], lr=0.1).load_state_dict(opt.state_dict())
    a, b = np.ones(3, np.float32), np.ones(3, np.float32)
    opt = fo.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    opt.param_groups[0]["lr"] = np.array([0.1])
    for _ in range(2):
        opt.step([np.ones(3, np.float32), np.ones(3, np.float32)])
    assert [opt.state[k]["step"] for k in (0, 1)] == [2, 2]
    np.testing.assert_array_equal(a, b)
    opt.load_state_dict(opt.state_dict())


def test_a_deleted_entry_is_refused() -> None:
    p = np.ones(3, np.float32)
    opt = fo.SGD([p], lr=0.1)
    del opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match=r"\['lr'\] were deleted"):
        opt.step([np.ones(3, np.float32)])
    np.testing.assert_array_equal(p, 1.0)
    opt.param_groups[0]["lr"] = 0.1
    opt.step([np.ones(3, np.float32)])
    np.testing.assert_allclose(p, 0.9)


@pytest.mark.parametrize("edit", ["pop", "append"])
def test_groups_removed_or_appended_by_hand_are_refused(edit: str) -> None:
    """param_groups.pop(): the removed group was still stepped (its count no longer advanced,
    its state no longer saved); append: the new group was never stepped."""
    a, b = np.ones(3, np.float32), np.ones(3, np.float32)
    opt = fo.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    opt.step([np.ones(3, np.float32), np.ones(3, np.float32)])
    if edit == "pop":
        opt.param_groups.pop()
    else:
        opt.param_groups.append({**opt.param_groups[0], "params": [np.ones(2, np.float32)]})
    before = (a.copy(), b.copy())
    with pytest.raises(ValueError, match="groups are added by add_param_group"):
        opt.step([np.ones(3, np.float32), np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="groups are added by add_param_group"):
        opt.state_dict()
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(b, before[1])


def test_a_state_dtype_dict_is_never_shared() -> None:
    """A per-state ``state_dtype`` dict was the same object in the group, the step's snapshot
    and state_dict()'s output: editing either in place was ignored by the steps, and the
    optimizer's own checkpoint then failed to load."""
    p = [np.ones(4, np.float32)]
    opt = fo.Adam(p, lr=0.1, state_dtype={"exp_avg": "float32"})
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    sd["param_groups"][0]["hyper"]["state_dtype"]["exp_avg"] = "bfloat16"
    assert opt.param_groups[0]["state_dtype"] == {"exp_avg": "float32"}
    opt.step([np.ones(4, np.float32)])
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["state_dtype"]["exp_avg"] = "bfloat16"  # in place: now seen (refused)
    with pytest.raises(ValueError, match="state_dtype"):
        opt.step([np.ones(4, np.float32)])


@pytest.mark.re_views
@pytest.mark.parametrize("edit", ["dtype", "byteorder", "shape", "strides", "copy-out"])
def test_an_array_re_viewed_in_place_is_refused(edit: str) -> None:
    """An array whose dtype, byte order, shape or strides were changed in place (the same
    memory read another way) was stepped as before: float16 bits updated as bfloat16, a
    transposed parameter's elements matched to the wrong gradients."""
    p = np.ones((4, 6), np.float32 if edit != "dtype" else np.float16)
    out = np.zeros((4, 6), np.float16)
    opt = fo.SGD([p], lr=0.5)
    if edit == "copy-out":
        opt.set_copy_out([out])
    opt.step([np.ones_like(p)])
    if edit == "dtype":
        p.dtype = ml_dtypes.bfloat16
    elif edit == "byteorder":
        p.dtype = np.dtype(">f4")
    elif edit == "shape":
        p.shape = (6, 4)
    elif edit == "strides":
        p.shape, p.strides = (6, 4), (4, 24)  # the transposed layout of the same memory
    else:
        out.dtype = ml_dtypes.bfloat16
    before, copied = p.copy(), out.copy()
    # (another byte order: the gradient buffers' check says it first)
    match = "non-native byte order" if edit == "byteorder" else "changed in place"
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step()
    np.testing.assert_array_equal(p, before)
    np.testing.assert_array_equal(out, copied)


# --------------------------------------------- opt.grads / opt.state are built at each access
def _refused_edits(named: bool) -> list[tuple[str, Callable[[Any], Any]]]:
    """Every way of changing `opt.grads` and `opt.state` as containers (not their arrays)."""
    k = "w" if named else 0
    g = np.zeros(8, np.float32)
    return [
        ("grads[k] =", lambda o: o.grads.__setitem__(k, g)),
        ("del grads[k]", lambda o: o.grads.__delitem__(k)),
        ("grads.pop", lambda o: o.grads.pop(k) if named else o.grads.pop()),
        ("grads.clear", lambda o: o.grads.clear()),
        ("grads +=/|=", lambda o: o.grads.__ior__({}) if named else o.grads.__iadd__([g])),
        ("state[k] =", lambda o: o.state.__setitem__(k, {})),
        ("state.pop", lambda o: o.state.pop(k)),
        ("state.update", lambda o: o.state.update({k: {}})),
        ("state[k][exp_avg] =", lambda o: o.state[k].__setitem__("exp_avg", g)),
        ("state[k][step] =", lambda o: o.state[k].__setitem__("step", 0)),
        ("del state[k][exp_avg]", lambda o: o.state[k].__delitem__("exp_avg")),
        ("state[k].update", lambda o: o.state[k].update(step=0)),
        ("state[k].setdefault new", lambda o: o.state[k].setdefault("other", g)),
        ("state[k].popitem", lambda o: o.state[k].popitem()),
    ]


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("edit", range(14))
def test_replacing_an_entry_of_grads_or_state_is_refused(named: bool, edit: int) -> None:
    """``opt.grads`` and ``opt.state`` are built at each access: ``opt.state[k]["exp_avg"] =
    x`` or ``opt.grads[0] = g`` changed a temporary container and nothing in the optimizer,
    silently.  Every change to the containers raises a TypeError saying what to do, and the
    next steps are those of an untouched optimizer."""
    what, change = _refused_edits(named)[edit]

    def make() -> Any:
        p = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
        opt = fo.AdamW({"w": p} if named else [p], lr=0.1)
        opt.step({"w": np.ones(8, np.float32)} if named else [np.ones(8, np.float32)])
        return opt

    opt, untouched = make(), make()
    with pytest.raises(
        TypeError, match=r"opt\.(grads|state).* is built anew at each access.*in place"
    ):
        change(opt)
    for o in (opt, untouched):
        o.grads["w" if named else 0][...] = 0.5
        o.step()
    assert _arrays(opt) == _arrays(untouched), what
    assert [s["step"] for s in opt.state.values()] == [2]


def test_writing_into_the_arrays_of_grads_and_state_still_changes_the_optimizer() -> None:
    """The arrays are the optimizer's own: in-place writes are what the containers are for."""
    p, twin = np.ones(8, np.float32), np.ones(8, np.float32)
    opt, ref = fo.Adam([p], lr=0.1), fo.Adam([twin], lr=0.1)
    g = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    opt.grads[0][...] = g
    opt.step()
    ref.step([g])
    np.testing.assert_array_equal(p, twin)
    opt.state[0]["exp_avg"][...] = 0.0
    opt.state[0].setdefault("exp_avg")[...] += 1.0  # (an existing key: its value, no change)
    assert (opt.state[0]["exp_avg"] == 1.0).all()


def test_copies_of_grads_and_state_are_plain_and_writable() -> None:
    import copy
    import pickle

    p = np.ones(8, np.float32)
    opt = fo.Adam({"w": p}, lr=0.1)
    opt.step({"w": np.ones(8, np.float32)})
    for state in (
        copy.deepcopy(opt.state),
        pickle.loads(pickle.dumps(opt.state)),
        copy.copy(opt.state),
        opt.state.copy(),
        dict(opt.state),
    ):
        assert type(state) is dict
        state["w"] = {"step": 5}  # (a copy: the optimizer's state is untouched)
    inner = copy.deepcopy(opt.state["w"])
    assert type(inner) is dict and inner["step"] == 1
    inner["exp_avg"][...] = 7.0  # a deep copy's array is its own
    assert not (opt.state["w"]["exp_avg"] == 7.0).any()
    grads = pickle.loads(pickle.dumps(opt.grads))
    assert type(grads) is dict and set(grads) == {"w"}
    listed = fo.SGD([p], lr=0.1).grads
    assert isinstance(listed, list) and type(copy.copy(listed)) is list
    assert type(listed * 1) is list and type(list(listed)) is list


def test_lbfgs_state_is_live_under_its_first_parameter_only() -> None:
    """LBFGS keeps torch's layout (its whole state under the first parameter): that dict is
    the live one (documented), the others and the outer dict refuse changes."""
    a, b = np.ones(3), np.ones(2)
    opt = fo.LBFGS([a, b], lr=0.1)
    opt.state[0]["n_iter"] = 7
    assert opt.state[0]["n_iter"] == 7
    with pytest.raises(TypeError, match=r"opt\.state\[1\] is built anew"):
        opt.state[1]["n_iter"] = 7
    with pytest.raises(TypeError, match=r"opt\.state is built anew"):
        opt.state[1] = {}


def test_zero1_grads_refuse_replacement() -> None:
    mpi = pytest.importorskip("mpi4py.MPI")
    from fastoptim import distributed

    w = np.zeros(16, np.float32)
    zero = distributed.ZeroRedundancyOptimizer([w], fo.SGD, comm=mpi.COMM_SELF, lr=0.5)
    with pytest.raises(TypeError, match="grads is built anew"):
        zero.grads[0] = np.ones(16, np.float32)
    zero.grads[0][...] = 1.0
    zero.step()
    np.testing.assert_array_equal(w, np.full(16, -0.5, np.float32))


def test_zero1_load_stopped_part_way_leaves_the_optimizer_unchanged(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZeroRedundancyOptimizer.load reads each shard file into a temporary optimizer first: an
    I/O error in that read's second pass leaves the temporary one partly loaded, not this one.
    The error says so (it said "the optimizer is partly loaded ... load again"), and this
    optimizer steps on unchanged."""
    mpi = pytest.importorskip("mpi4py.MPI")
    from fastoptim import distributed

    w = np.linspace(-1, 1, 5000, dtype=np.float32)
    zero = distributed.ZeroRedundancyOptimizer([w], fo.AdamW, comm=mpi.COMM_SELF, lr=0.1)
    zero.grads[0][...] = 0.5
    zero.step()
    zero.save(tmp_path / "ck")
    zero.step()
    before = w.copy()
    state = {k: v.copy() for k, v in zero.optimizer.state[0].items() if isinstance(v, np.ndarray)}
    fail_second_reads(monkeypatch)
    with pytest.raises(fo.CheckpointError) as info:
        zero.load(tmp_path / "ck")
    message = str(info.value)
    assert "stopped part-way (OSError: [Errno 5] Input/output error)" in message
    assert "this optimizer was not changed" in message and "partly loaded" not in message
    monkeypatch.undo()
    np.testing.assert_array_equal(w, before)
    for k, v in state.items():
        np.testing.assert_array_equal(zero.optimizer.state[0][k], v)
    zero.step()  # (not refused: nothing was torn here)
    zero.load(tmp_path / "ck")  # and a load that succeeds


@pytest.mark.re_views
@pytest.mark.parametrize("cls", ["Muon", "Adafactor", "LBFGS"])
@pytest.mark.parametrize("edit", ["read-only", "reshaped in place"])
def test_steps_in_numpy_check_every_parameter_before_writing(cls: str, edit: str) -> None:
    """The optimizers whose step runs in NumPy check what the compiled step checks (no array
    made read-only or re-viewed in place since the optimizer took it) before they write
    anything: the second parameter refused, the first and every state untouched."""
    rng = np.random.default_rng(0)
    p1, p2 = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    grads = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2)]
    opt = getattr(fo, cls)([p1, p2], lr=0.1)

    def step() -> None:
        if cls == "LBFGS":
            opt.step(lambda: (float((p1**2).sum()), [2 * p1, 2 * p2]))
        else:
            opt.step(grads)

    step()
    if edit == "read-only":
        p2.flags.writeable = False
        match = "param 1: array was made read-only"
    else:
        p2.shape = (4, 16)  # (its gradient's shape no longer fits either: refused first)
        match = "param 1: "
    before = (p1.copy(), p2.copy(), repr(opt.state_dict()), opt.step_count)
    with pytest.raises(ValueError, match=match):
        step()
    assert np.array_equal(p1, before[0]) and np.array_equal(p2, before[1])
    assert repr(opt.state_dict()) == before[2] and opt.step_count == before[3]


@pytest.mark.parametrize("name", ["bogus", "step", "a/b", "", "exp_avg_sq_absmax_absmax"])
def test_load_state_dict_refuses_unknown_state_names(name: str) -> None:
    """A state name this optimizer never keeps (audit D08) is refused, changing nothing; it
    was loaded as a buffer of its own ("step" then shadowed the step count in ``opt.state``,
    and "a/b" gave an optimizer whose file fo.load refused).  Every name fastoptim saves
    still loads (AMSGrad, an EMA, master copies, int8 scales)."""
    import copy

    opt = fo.AdamW([np.ones(64, np.float32)])
    opt.step([np.ones(64, np.float32)])
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["states"].append(name)
    sd["state"][0][name] = np.full(64, 7.0, np.float32)
    before = _arrays(opt)
    with pytest.raises(ValueError, match=rf"group 0: unexpected state names \['{name}'\]"):
        opt.load_state_dict(sd)
    assert _arrays(opt) == before
    assert set(opt.state[0]) == {"step", "exp_avg", "exp_avg_sq"}
    for kw, dtype in (
        ({"amsgrad": True, "ema_decay": 0.9}, np.float32),
        ({"master_weights": True}, BF16),
        ({"state_dtype": "int8"}, np.float32),
    ):
        src = fo.AdamW([np.ones(N, dtype)], **kw)
        src.step([np.ones(N, dtype)])
        dst = fo.AdamW([np.ones(N, dtype)], **kw)
        dst.load_state_dict(src.state_dict())
        assert set(dst.state[0]) == set(src.state[0]) > {"step", "exp_avg", "exp_avg_sq"}
        for k, v in src.state[0].items():
            assert np.asarray(dst.state[0][k]).tobytes() == np.asarray(v).tobytes(), k


@pytest.mark.re_views
@pytest.mark.parametrize(
    "change",
    ["ema_decay", "amsgrad", "copy_out", "step_rows"],
)
def test_parameter_re_viewed_in_place_is_refused_without_the_plan(change: str) -> None:
    """A parameter re-viewed in place (bfloat16 bits given a float16 dtype; SGD's table given
    another shape) is refused by what runs without the plan that records it (audit D05,
    D06): a plan built anew after a hyper-parameter or copy-out change adopted the array as
    it is now and updated the bfloat16 bits as float16; a stateless SGD's row updates wrote
    the re-viewed table.  Now each raises as step() does, changing nothing."""
    if change == "step_rows":
        p = np.zeros((16, 4), np.float32)
        opt: Any = fo.SGD([p], lr=1.0)
        p.shape = (8, 8)
    else:
        p = np.full(64, 1.0, BF16)
        opt = fo.AdamW([p], lr=0.1)
        opt.step([np.ones(64, np.float32)])
        p.dtype = np.float16
        if change == "copy_out":
            opt.set_copy_out([None])
        else:
            opt.param_groups[0][change] = 0.9 if change == "ema_decay" else True
    before = p.tobytes()
    with pytest.raises(
        ValueError, match="param 0: the array's dtype, shape or strides were changed"
    ):
        if change == "step_rows":
            opt.step_rows([(np.array([1]), np.ones((1, 8), np.float32))])
        else:
            opt.step([np.ones(64, np.float32)])
    assert p.tobytes() == before


def test_functional_messages_name_the_argument() -> None:
    """Bad functional arguments are named (audit D10): a step past int64 (pybind11's
    signature dump before), states given as a list to sparse_rows_ ("unhashable")."""
    p, g, m, v = (np.zeros(8, np.float32) for _ in range(4))
    with pytest.raises(ValueError, match=r"adam_: invalid step=9223372036854775808: must be at"):
        F.adam_(p, g, m, v, step=2**63)
    F.adam_(p, g, m, v, step=2**63 - 1)  # (the largest)
    t = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="sparse_rows_: invalid step=9223372036854775808"):
        F.sparse_rows_("SGD", t, [0], np.ones((1, 2), np.float32), {}, step=2**63)
    with pytest.raises(TypeError, match="sparse_rows_: states must be a dict from state name"):
        F.sparse_rows_("SparseAdam", t, [0], np.ones((1, 2), np.float32), [t.copy()] * 2, step=1)
    assert not t.any()


@pytest.mark.re_views
def test_grad_of_a_re_viewed_parameter_names_the_re_view() -> None:
    """A float32 parameter re-viewed in place as float64 with a float64 gradient: the error
    is the re-view's, not "dtype float64 does not go with the float64 parameter"."""
    w = np.zeros((16, 4), np.float32)
    opt = fo.SGD([w], lr=1.0)
    w.dtype = np.float64
    with pytest.raises(ValueError, match="param 0: the array was resized or its memory"):
        opt.step([np.ones(w.shape, np.float64)])
    w2 = np.zeros((16, 4), np.float32)
    opt = fo.SGD([w2], lr=1.0)
    w2.dtype = np.int32  # (same size)
    with pytest.raises(ValueError, match="param 0: the array's dtype, shape or strides"):
        opt.step([np.ones(w2.shape, np.float32)])


def test_accumulate_errors_name_the_gradient_and_the_buffer() -> None:
    """``accumulate``'s errors are in its own words: the gradient by its parameter, the
    optimizer's buffers as ``opt.grads[k]``.  (They read "grad for param opt.grads[0] shares
    memory with param opt.grads[1]" and "SGD.step: expected 2 gradients".)  Nothing changes."""
    opt = fo.SGD([np.zeros(N, np.float32), np.zeros(N, np.float32)])
    opt.grads[0][...], opt.grads[1][...] = 1.0, 10.0
    g = np.ones(N, np.float32)
    for grads, err, match in (
        ([opt.grads[1], g], ValueError, r"grad for param 0 shares memory with opt\.grads\[1\]"),
        ([opt.grads[0], g], ValueError, r"grad for param 0 shares memory with opt\.grads\[0\]"),
        ([g, np.ones(N + 1, np.float32)], ValueError, rf"grad for param 1: shape \({N + 1},\)"),
        ([g, np.ones(N, np.float64)], TypeError, "grad for param 1: dtype float64"),
        ([g, [1.0] * N], TypeError, "grad for param 1: expected a numpy.ndarray"),
        ([g], ValueError, "expected 2 gradients, got 1"),
        ({"a": g}, TypeError, "grads is a dict"),
    ):
        with pytest.raises(err, match="^SGD.accumulate: " + match):
            opt.accumulate(grads)  # type: ignore[arg-type]
        assert (opt.grads[0] == 1.0).all() and (opt.grads[1] == 10.0).all()


@pytest.mark.parametrize("cls", [fo.SGD, fo.Adam, fo.Lion])
def test_step_errors_name_the_call(cls: type[fo.Optimizer]) -> None:
    """Every refusal of ``step`` begins with "<class>.step: ", the compiled plans' checks
    included (they read "grad for param 0: ..." alone), with its type; nothing changes."""
    w, v = np.ones(N, np.float32), np.ones(N, np.float32)
    opt = cls([w, v], lr=0.1)
    opt.step([np.ones(N, np.float32), np.ones(N, np.float32)])
    before = [w.copy(), v.copy()]
    g = np.ones(N, np.float32)
    name = cls.__name__
    for grads, err, match in (
        ([v, g], ValueError, "grad for param 0 shares memory with param 1"),
        ([g, np.ones(N + 1, np.float32)], ValueError, rf"grad for param 1: shape \({N + 1},\)"),
        ([g, np.ones(N, np.float64)], TypeError, "grad for param 1: dtype float64"),
        ([g, np.ones(2 * N, np.float32)[::2]], ValueError, "grad for param 1: array is not C-"),
        ([g, None], TypeError, "grad for param 1: expected a numpy.ndarray"),
        ([g], ValueError, "expected 2 gradients, got 1"),
        ({"a": g}, TypeError, "grads is a dict"),
    ):
        with pytest.raises(err, match=f"^{name}.step: " + match):
            opt.step(grads)  # type: ignore[arg-type]
        np.testing.assert_array_equal(w, before[0])
        np.testing.assert_array_equal(v, before[1])
    opt.param_groups[0]["lr"] = -1.0  # (the hyper-parameters' refusal: "<class>: ...")
    with pytest.raises(ValueError, match=f"^{name}: invalid lr=-1"):
        opt.step([g, g])
    opt.param_groups[0]["lr"] = 0.1
    v.setflags(write=False)
    with pytest.raises(ValueError, match=f"^{name}.step: param 1: array was made read-only"):
        opt.step([g, g])
    np.testing.assert_array_equal(w, before[0])


def test_construction_errors_name_the_class() -> None:
    """A parameter refused when the optimizer is built (or a group added) is named after the
    class, as the hyper-parameters are ("Adam: param 0: dtype must be ...": it read "param 0:
    ..." alone); same types."""
    ok = np.ones(3, np.float32)
    for params, err, match in (
        ([np.ones(3, np.int32)], TypeError, "param 0: dtype must be float32"),
        ([ok, np.ones((4, 4), np.float32).T], ValueError, "param 1: array is not C-contiguous"),
        ([ok, ok], ValueError, "param 1 shares memory with param 0"),
    ):
        with pytest.raises(err, match="^Adam: " + match):
            fo.Adam(params)
    opt = fo.Adam([ok])
    with pytest.raises(TypeError, match=r"^Adam: param 1: dtype must be float32"):
        opt.add_param_group({"params": [np.ones(3, np.int32)]})
    assert len(opt.param_groups) == 1


def test_accumulate_refuses_another_groups_buffer() -> None:
    """A gradient that is another group's gradient buffer (which the same call writes) is
    refused as within one group (audit D07: it was read before or after its update,
    depending on the group order), changing no buffer."""
    opt = fo.SGD([{"params": [np.zeros(N, np.float32)]}, {"params": [np.zeros(N, np.float32)]}])
    opt.grads[0][...], opt.grads[1][...] = 1.0, 10.0
    g = np.full(N, 100.0, np.float32)
    for grads, match in (
        ([opt.grads[1], g], "grad for param 0 shares memory with opt.grads\\[1\\]"),
        ([g, opt.grads[0][::-1][::-1]], "grad for param 1 shares memory with opt.grads\\[0\\]"),
    ):
        with pytest.raises(ValueError, match="SGD.accumulate: " + match):
            opt.accumulate(grads)
        assert (opt.grads[0] == 1.0).all() and (opt.grads[1] == 10.0).all()
    opt.accumulate([g, g.copy()], scale=0.5)
    assert (opt.grads[0] == 51.0).all() and (opt.grads[1] == 60.0).all()


@pytest.mark.parametrize(
    "state_dtype, dtype, match",
    [
        (None, BF16, "'exp_avg' is bfloat16; state_dtype=None keeps it as float32"),
        ("bfloat16", np.float32, "'exp_avg' is float32; state_dtype='bfloat16' keeps it as bf"),
        ("param", np.float16, "'exp_avg' is float16; state_dtype='param' keeps it as float32"),
        ("int8", np.float32, "'exp_avg': state_dtype='int8' keeps it int8-quantized: pass the"),
    ],
)
def test_functional_float_state_follows_state_dtype(
    state_dtype: Any, dtype: Any, match: str
) -> None:
    """The functional tier takes a float state in the dtype ``state_dtype`` says, as its
    docstring promises and the class keeps it (audit D09: any float32/bfloat16/float16 state
    was taken, ``state_dtype`` then silently without effect); nothing changes on refusal,
    and the states it says are taken."""
    p, g = np.zeros(N, np.float32), np.ones(N, np.float32)
    m, v = np.zeros(N, dtype), np.zeros(N, dtype)
    with pytest.raises((TypeError, ValueError), match=match):
        F.adam_(p, g, m, v, step=1, lr=0.1, state_dtype=state_dtype)
    assert not p.any() and not m.any() and not v.any()
    if state_dtype == "int8":
        m2, v2 = (F.quantized_state(p, n) for n in ("exp_avg", "exp_avg_sq"))
    else:
        want = np.float32 if state_dtype in (None, "param") else BF16
        m2, v2 = np.zeros(N, want), np.zeros(N, want)
    F.adam_(p, g, m2, v2, step=1, lr=0.1, state_dtype=state_dtype)
    assert (p != 0).all()


def test_a_bfloat16_parameters_master_is_its_value_of_record() -> None:
    """NumPy tier, as the README says: an edit made to a bfloat16 parameter with a master copy
    is overwritten by the next step (written from the master, never read back: audit E02 asked
    whether that was meant); an edit made to the master is what the parameter follows."""
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    w = np.linspace(-1, 1, 64, dtype=np.float32).astype(bf16)
    opt = fo.AdamW([w], lr=0.0, weight_decay=0.0, master_weights=True)
    zero = np.zeros(64, bf16)
    opt.step([zero])
    before = w.copy()
    w[:4] = 0
    opt.step([zero])  # lr 0: the master unchanged, the parameter written from it
    np.testing.assert_array_equal(w.view(np.uint16), before.view(np.uint16))
    opt.state[0]["master"][:4] = 0
    opt.step([zero])
    assert (w[:4] == 0).all()
    np.testing.assert_array_equal(w[4:].view(np.uint16), before[4:].view(np.uint16))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_a_master_starts_as_its_parameter_at_the_first_step(dtype: Any) -> None:
    """The master copies are taken from the parameters at their first step (as an EMA is): a
    parameter loaded into after the optimizer was built keeps what was loaded (it was
    overwritten by the value it had at construction)."""
    w = np.ones(64, dtype)
    opt = fo.SGD([w], lr=0.0, master_weights=True)
    loaded = np.linspace(-3, 3, 64, dtype=np.float32).astype(dtype)
    w[...] = loaded
    opt.step([np.zeros(64, dtype)])
    np.testing.assert_array_equal(w.view(np.uint16), loaded.view(np.uint16))
    np.testing.assert_array_equal(opt.state[0]["master"], loaded.astype(np.float32))


def _between(m: np.ndarray, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """The two values of `dtype` adjacent around each float32 `m` (lo <= m <= hi; both the
    value itself where `m` is representable), element by element."""
    lo, hi = np.empty(m.shape, dtype), np.empty(m.shape, dtype)
    top = np.array(np.inf, dtype)
    for i, x in enumerate(m):
        near = np.array(x).astype(dtype)
        if np.isnan(x) or float(near) == float(x):
            lo[i] = hi[i] = near
        elif float(near) < float(x):
            lo[i], hi[i] = near, np.nextafter(near, top)
        else:
            lo[i], hi[i] = np.nextafter(near, -top), near
    return lo, hi


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_follow_params(dtype: Any, rounding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``follow_params``: each element of a parameter edited in place (not what a step writes
    from its master: the nearest value, or with stochastic rounding either value around it)
    gives the master its value; every other master element keeps its float32 bits; the next
    step (lr 0) leaves the edits in the parameter.  In blocks (7 elements here) as whole."""
    from fastoptim.engine import precision

    monkeypatch.setattr(precision, "_FOLLOW_BLOCK", 7)
    n = 300
    rng = np.random.default_rng(1)
    w = rng.standard_normal(n).astype(np.float32).astype(dtype)
    opt = fo.Adam([w], lr=1e-2, master_weights=True, rounding=rounding)
    for _ in range(3):
        opt.step([rng.standard_normal(n).astype(dtype)])
    master = opt.state[0]["master"]
    master[:3] = [1.0, np.nan, 2.0**-30]  # (representable in float32, not all in `dtype`)
    w[:3] = np.array(master[:3]).astype(dtype)
    before_m, before_w = master.copy(), w.copy()
    assert opt.follow_params() == 0  # nothing edited: nothing taken
    np.testing.assert_array_equal(master.view(np.uint32), before_m.view(np.uint32))
    lo, hi = _between(before_m, dtype)
    w[10:20] = 0.5  # plain edits
    w[20] = np.nan
    w[21] = np.inf
    w[22:40] = hi[22:40]  # one value up / down: an edit unless the master could round there
    w[40:60] = lo[40:60]
    w[60:70] = np.nextafter(hi[60:70], np.array(np.inf, dtype))  # two away: always an edit
    w[1] = 0.0  # (the NaN master's element)
    allowed = (w == lo) | (w == hi) if rounding == "stochastic" else (w == before_w)
    allowed |= np.isnan(w) & np.isnan(before_m)
    taken = ~allowed
    assert taken[10:22].all() and taken[60:70].all() and taken[1]
    if rounding == "stochastic":  # (values a step may write: kept)
        assert not taken[22:60].any()
    else:
        assert taken[22:60].any() and not taken[22:60].all()
    assert opt.follow_params() == int(taken.sum())
    np.testing.assert_array_equal(master[taken], w[taken].astype(np.float32))
    np.testing.assert_array_equal(master[~taken].view(np.uint32), before_m[~taken].view(np.uint32))
    opt.param_groups[0]["lr"] = 0.0
    edited = w.copy()
    opt.step([np.zeros(n, dtype)])
    np.testing.assert_array_equal(w[taken].view(np.uint16), edited[taken].view(np.uint16))


@pytest.mark.re_views
def test_follow_params_refusals() -> None:
    """``follow_params`` is refused inside ``ema_weights`` (the parameters hold their EMA) and
    for a parameter re-viewed in place; no master changes.  Without master copies it takes
    nothing."""
    w = np.ones(8, ml_dtypes.bfloat16)
    opt = fo.SGD([w], lr=0.1, master_weights=True, ema_decay=0.5)
    opt.step([np.ones(8, ml_dtypes.bfloat16)])
    master = opt.state[0]["master"].copy()
    with opt.ema_weights():
        with pytest.raises(RuntimeError, match=r"SGD\.follow_params: .*ema_weights"):
            opt.follow_params()
    w[:2] = 5.0
    w.dtype = np.int16
    with pytest.raises(ValueError, match=r"SGD\.follow_params: param 0: the array's dtype"):
        opt.follow_params()
    np.testing.assert_array_equal(opt.state[0]["master"], master)
    assert fo.SGD([np.ones(8, np.float32)], master_weights=True).follow_params() == 0


@pytest.mark.re_views
@pytest.mark.parametrize(
    "cls, kw, name",
    [
        (fo.SGDScheduleFree, {"lr": 1.0}, "z"),
        (fo.AdamWScheduleFree, {}, "z"),
        (fo.AdamW, {"ema_decay": 0.9}, "ema"),
    ],
)
def test_a_refused_first_step_leaves_state_copied_from_the_parameter(
    cls: Any, kw: dict[str, Any], name: str
) -> None:
    """A parameter re-viewed in place before the first step (``p.dtype = np.int32``): the
    step is refused, and the state that starts as a copy of the parameter (Schedule-Free's
    ``z``, an EMA) is not filled from the re-viewed bytes first (fuzz audit F01: 2.0 became
    1.07e9 in the state, and in a checkpoint taken then)."""
    a = np.array([-0.116, 2.0], np.float32)
    b = np.array([1.5], np.float64)
    opt = cls({"a": a, "b": b}, **kw)
    before = {k: np.array(opt.state[k][name]) for k in ("a", "b")}
    a.dtype = np.int32
    with pytest.raises(ValueError, match="param 'a': the array's dtype, shape or strides"):
        opt.step({"a": np.ones(2, np.float32), "b": np.ones(1)})
    a.dtype = np.float32
    for k in ("a", "b"):
        np.testing.assert_array_equal(opt.state[k][name], before[k])


@pytest.mark.parametrize("shape", [(), (7,)])
def test_adafactor_refuses_a_gradient_that_is_its_own_state(shape: tuple[int, ...]) -> None:
    """Adafactor's factored statistics are shaped apart from the plans: a gradient that is one
    of them (a 0-D or 1-D parameter's ``variance``) was accepted and read while it was
    updated (fuzz audit F02)."""
    p = np.ones(shape, np.float32)
    opt = fo.Adafactor([p])
    opt.step([np.full(shape, 0.5, np.float32)])
    var = opt.state[0]["variance"]
    before, pb = var.copy(), p.copy()
    with pytest.raises(ValueError, match="grad for param 0 shares memory with the 'variance'"):
        opt.step([var])
    np.testing.assert_array_equal(var, before)
    np.testing.assert_array_equal(p, pb)


@pytest.mark.parametrize(
    ("complex_dtype", "real"), [(np.complex64, "float32"), (np.complex128, "float64")]
)
def test_complex_arrays_are_refused_with_their_real_view_named(
    complex_dtype: Any, real: str
) -> None:
    """The NumPy and functional tiers take float arrays: a complex one is refused with a
    TypeError naming the zero-copy real view to pass, which then works in place (each part an
    element, as torch.optim updates complex parameters), as a float array of those values."""
    rng = np.random.default_rng(0)
    z = (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(complex_dtype)
    g = (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(complex_dtype)
    before = z.copy()
    name = np.dtype(complex_dtype).name
    hint = rf"got {name}: pass a complex array's real view, z\.view\(np\.{real}\)"
    with pytest.raises(TypeError, match=hint):
        fo.Adam([z], lr=0.1)
    with pytest.raises(TypeError, match=hint):
        F.adam_(z, g, np.zeros_like(z), np.zeros_like(z), step=1, lr=0.1)
    assert np.array_equal(z, before)
    twin = z.view(real).copy()
    fo.Adam([z.view(real)], lr=0.1).step([g.view(real)])
    fo.Adam([twin], lr=0.1).step([g.view(real).copy()])
    assert np.array_equal(z.view(real), twin)
    assert not np.array_equal(z, before)
