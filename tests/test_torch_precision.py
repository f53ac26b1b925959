"""fastoptim.torch with bfloat16/float16 tensors: against torch.optim's fused CPU kernels (Adam,
AdamW and Adagrad accept bfloat16/float16 and compute in float32), and against the NumPy tier
(the same driver: bit for bit) for every optimizer and precision layout."""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim as fo  # noqa: E402
import fastoptim.torch as fot  # noqa: E402
from cases import SPARSE_ONLY, Case, each_case, one_per_optimizer  # noqa: E402
from fastoptim.torch import _numpy_of  # noqa: E402

LOW = [torch.bfloat16, torch.float16]


def _pair(dtype: Any, n: int = 3001, seed: int = 0) -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen).to(dtype).requires_grad_()
    return a, a.detach().clone().requires_grad_()


# Conventions that differ in the last float32 bit, so that the tests choose coefficients exact in
# both: torch's fused bfloat16/float16 Adagrad rounds lr and eps to the parameter's dtype
# (``fVec(scalar_t(clr))``; fastoptim keeps per-step scalars in double), and its AdamW computes
# ``p - p * (lr * wd)`` where fastoptim's kernel computes ``p * (1 - lr * wd)`` (the same value
# when lr * wd is a power of two).
FUSED = [
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("Adam", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    ("AdamW", {"lr": 2.0**-7, "weight_decay": 0.125}),
    ("Adagrad", {"lr": 2.0**-6, "eps": 2.0**-20, "weight_decay": 0.25}),
]


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize(
    ("name", "kwargs"), FUSED, ids=[f[0] + str(i) for i, f in enumerate(FUSED)]
)
def test_matches_torch_fused(dtype: Any, name: str, kwargs: dict[str, Any]) -> None:
    """Ten steps with state in the parameter's dtype (``state_dtype="param"``, torch's
    convention): parameters and state as torch.optim's fused kernel computes them."""
    a, b = _pair(dtype)
    ref = getattr(torch.optim, name)([a], fused=True, **kwargs)
    ours = getattr(fot, name)([b], state_dtype="param", **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        g = torch.randn(a.shape, generator=gen).to(dtype)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        _close(a, b, "param")
        for k, v in ref.state[a].items():
            if k != "step":
                assert ours.state[b][k].dtype == dtype
                _close(v, ours.state[b][k], k)


def _ordered(t: Any) -> Any:
    """16-bit floats as integers in the order of their values (one apart: one unit apart;
    +0 and -0 equal), so that differences count units across zero too."""
    bits = t.detach().view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _close(x: Any, y: Any, what: str) -> None:
    """Bit-identical but for rare elements a unit apart: both compute in float32, in a
    different order where fastoptim's kernels fuse a multiply-add (a different last float32
    bit decides a low-precision rounding about once in 10^4 elements).  The baseline x86-64
    build has no FMA (``fmadd`` is a * b + c there, two roundings, and a cancellation that
    torch's FMA leaves at 1e-10 may be exactly 0): two units relative to the value or to the
    array's scale."""
    if fo.isa() == "scalar":
        eps = torch.finfo(x.dtype).eps
        scale = float(x.detach().float().abs().max())
        torch.testing.assert_close(y.float(), x.float(), rtol=2 * eps, atol=eps * scale, msg=what)
        return
    ulps = (_ordered(x) - _ordered(y)).abs()
    assert int(ulps.max()) <= 1, what
    assert int((ulps > 0).sum()) <= max(1, x.numel() // 1000), what


def _raw(a: np.ndarray) -> np.ndarray:
    """The bytes of an array (0-d included)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


LAYOUTS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "bf16": (torch.bfloat16, torch.bfloat16, {}),
    "f16-f16state": (torch.float16, torch.float16, {"state_dtype": "float16"}),
    "bf16-master-sr": (torch.bfloat16, torch.bfloat16, {"master_weights": True,
                                                         "rounding": "stochastic"}),
    "bf16-kahan": (torch.bfloat16, torch.float32, {"kahan": True}),
    "f32-bf16grad": (torch.float32, torch.bfloat16, {}),
    "bf16-bf16state-sr": (torch.bfloat16, torch.bfloat16, {"state_dtype": torch.bfloat16,
                                                            "rounding": "stochastic"}),
}  # fmt: skip


# NAdam's mu_product and ASGD's eta/mu are computed in torch's float32 scalar tensors by
# fastoptim.torch (to match torch), in double by the NumPy tier: the tiers differ there anyway.
SAME_SCALARS = [
    c
    for c in one_per_optimizer()
    if not getattr(fo, c.opt)._definition.scalars and c.opt not in SPARSE_ONLY
]


@each_case(SAME_SCALARS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_bits_as_numpy_tier(case: Case, layout: str) -> None:
    """fastoptim.torch on low-precision tensors runs the NumPy tier's driver: the same bits,
    state included, for every optimizer (but those of SAME_SCALARS' note) and layout (two
    groups: stochastic rounding keys on the tensor's number in the optimizer)."""
    pdt, gdt, opts = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (33,), (), (300,)]
    tensors = [torch.randn(s, generator=gen).to(pdt) for s in shapes]
    arrays = [_numpy_of(t.clone()).copy() for t in tensors]
    kw = {**case.kwargs, **opts, "seed": 5}
    groups_t = [{"params": tensors[:2]}, {"params": tensors[2:], "lr": kw["lr"] / 2}]
    groups_n = [{"params": arrays[:2]}, {"params": arrays[2:], "lr": kw["lr"] / 2}]
    ours_t = getattr(fot, case.opt)(groups_t, **kw)
    ours_n = getattr(fo, case.opt)(groups_n, **kw)
    for _ in range(4):
        grads = [torch.randn(s, generator=gen).to(gdt) for s in shapes]
        for t, g in zip(tensors, grads):
            t.grad_dtype = None  # torch >= 2.9 asks for mixed dtypes to be declared
            t.grad = g
        ours_t.step()
        ours_n.step([_numpy_of(g.contiguous()) for g in grads])
        for i, (t, a) in enumerate(zip(tensors, arrays)):
            np.testing.assert_array_equal(_raw(_numpy_of(t)), _raw(a))
            for k, v in ours_n.state[i].items():
                if k != "step":
                    s = ours_t.state[t][k]
                    assert str(s.dtype).removeprefix("torch.") == v.dtype.name, k
                    np.testing.assert_array_equal(_raw(_numpy_of(s)), _raw(v))


def test_default_policy_and_state_dict_round_trip() -> None:
    """bfloat16 parameters: float32 state by default, a float32 master copy on request; the
    torch-format state_dict keeps those dtypes through torch.save/load into a new optimizer,
    which then continues bit-identically."""
    a, b = _pair(torch.bfloat16, 257)
    opt = fot.AdamW([a], lr=1e-3, master_weights=True, rounding="stochastic", seed=9)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(a.shape, generator=gen).to(torch.bfloat16) for _ in range(6)]
    for g in grads[:3]:
        a.grad = g
        opt.step()
    st = opt.state[a]
    assert st["exp_avg"].dtype == torch.float32 and st["master"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    b.data.copy_(a.detach())
    other = fot.AdamW([b], lr=1e-3, master_weights=True, rounding="stochastic", seed=9)
    other.load_state_dict(torch.load(buf))
    assert other.state[b]["master"].dtype == torch.float32
    assert torch.equal(other.state[b]["master"], st["master"])
    for g in grads[3:]:
        a.grad, b.grad = g, g.clone()
        opt.step()
        other.step()
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["master"], other.state[b]["master"])


def test_low_precision_gradients_into_float32_parameters() -> None:
    """The offload case: bfloat16 gradients read into float32 parameters (no copy of them)."""
    p = torch.zeros(100, requires_grad=True)
    q = torch.zeros(100, requires_grad=True)
    g = torch.linspace(-1, 1, 100).to(torch.bfloat16)
    p.grad_dtype = None  # torch >= 2.9 asks for mixed dtypes to be declared
    p.grad, q.grad = g, g.float()
    fot.SGD([p], lr=0.5, momentum=0.9).step()
    fot.SGD([q], lr=0.5, momentum=0.9).step()
    assert torch.equal(p, q)
    r = torch.zeros(100, dtype=torch.float64, requires_grad=True)
    r.grad_dtype = None
    r.grad = g
    with pytest.raises(TypeError, match="grad of param 0"):
        fot.SGD([r], lr=0.5).step()
    assert torch.equal(r, torch.zeros(100, dtype=torch.float64))


def test_copy_out_offload_layout() -> None:
    """float32 parameters and state, bfloat16 gradients in, bfloat16 copies out in the same
    pass: the copies are the rounded parameters (nearest; stochastic with the NumPy tier's
    bits); a bad copy-out is refused with nothing changed; pickling drops the copies."""
    import pickle

    from fastoptim import reference

    gen = torch.Generator().manual_seed(4)
    w = [torch.randn(300, generator=gen), torch.randn(4, 5, generator=gen)]
    arrays = [t.numpy().copy() for t in w]
    outs = [torch.zeros(300, dtype=torch.bfloat16), None]
    opt = fot.AdamW(w, lr=1e-2, rounding="stochastic", seed=8)
    opt.set_copy_out(outs)
    twin = fo.AdamW(arrays, lr=1e-2, rounding="stochastic", seed=8)
    twin_out = [np.zeros(300, reference.round_to_bfloat16(np.zeros(1)).dtype), None]
    twin.set_copy_out(twin_out)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen).to(torch.bfloat16) for t in w]
        for t, g in zip(w, grads):
            t.grad_dtype = None
            t.grad = g
        opt.step()
        twin.step([_numpy_of(g) for g in grads])
        for t, a in zip(w, arrays):
            np.testing.assert_array_equal(t.detach().numpy(), a)
        np.testing.assert_array_equal(_raw(_numpy_of(outs[0])), _raw(twin_out[0]))
    bits = reference.bfloat16_bits(8, 3, 0, 0, 300)
    np.testing.assert_array_equal(
        _raw(_numpy_of(outs[0])), _raw(reference.round_to_bfloat16(arrays[0], bits))
    )
    before = outs[0].clone()
    shared = torch.zeros(310, dtype=torch.bfloat16)  # (two copies on one buffer: overlapping)
    for bad, exc in (([torch.zeros(300), None], TypeError),
                     ([torch.zeros(30, dtype=torch.bfloat16), None], ValueError),
                     ([w[1], None], TypeError), ("nope", TypeError),
                     ([shared[:300], shared[290:].view(4, 5)], ValueError)):  # fmt: skip
        with pytest.raises(exc):
            opt.set_copy_out(bad)
    w[0].grad = torch.zeros(300)  # the copies set before the rejected calls still work
    w[1].grad = None
    opt.step()
    bits = reference.bfloat16_bits(8, 4, 0, 0, 300)
    np.testing.assert_array_equal(
        _raw(_numpy_of(outs[0])), _raw(reference.round_to_bfloat16(w[0].detach().numpy(), bits))
    )
    assert not torch.equal(outs[0], before)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone._copy_out == {}


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("edit", ["clamp_", "load zeros", "data replaced", "none"])
def test_master_copy_follows_the_parameter_changed_outside(rounding: str, edit: str) -> None:
    """With master_weights, a bfloat16 parameter changed outside the optimizer (clipped in
    place, a model.load_state_dict, its storage replaced by ``.data =``) is what the next
    step starts from, as in torch.optim: the master copy had been written back over the
    change (a clipped weight came back at 4.1).  Elements left alone keep the master's
    precision, so a resume that loads the model and the optimizer in either order stays bit
    for bit the straight run (the parameter is one of its master's roundings)."""
    torch.manual_seed(0)
    grads = [torch.randn(64, 80).to(torch.bfloat16) for _ in range(6)]

    def run(do_edit: bool) -> tuple[torch.Tensor, Any]:
        p = torch.nn.Parameter(torch.randn(64, 80).to(torch.bfloat16))
        opt = fot.AdamW([p], lr=0.05, master_weights=True, rounding=rounding, seed=3)
        for g in grads[:3]:
            p.grad = g.clone()
            opt.step()
        if do_edit:
            with torch.no_grad():
                if edit == "clamp_":
                    p.clamp_(-0.1, 0.1)
                elif edit == "load zeros":
                    torch.nn.ParameterDict({"w": p}).load_state_dict({"w": torch.zeros(64, 80)})
                elif edit == "data replaced":
                    p.data = torch.zeros(64, 80, dtype=torch.bfloat16)
        return p, opt

    p, opt = run(True)
    edited = p.detach().clone()
    master = opt.state[p]["master"]
    p.grad = torch.zeros(64, 80, dtype=torch.bfloat16)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()  # (lr 0: the parameter stays as edited)
    if rounding == "nearest":
        assert torch.equal(p.detach(), edited)
        if edit != "none":
            assert torch.equal(opt.state[p]["master"].to(torch.bfloat16), edited)
    else:  # (each step rounds the master again: to either neighbour, one ulp at most; an
        # edit onto the neighbour its master could round to cannot be told from a step's)
        ulp = edited.float().abs() * 2**-7 + 1e-38
        assert ((p.detach().float() - edited.float()).abs() <= ulp).all()
    if edit == "none":  # (untouched: the master keeps its float32 bits)
        assert not torch.equal(master, master.to(torch.bfloat16).float())
    # a resume: model and optimizer state loaded in either order, bit for bit
    p, opt = run(False)
    saved_p, saved = p.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
    for order in ("model first", "optimizer first"):
        q = torch.nn.Parameter(torch.randn(64, 80).to(torch.bfloat16))
        resumed = fot.AdamW([q], lr=0.05, master_weights=True, rounding=rounding, seed=3)
        model = torch.nn.ParameterDict({"w": q})
        if order == "model first":
            model.load_state_dict({"w": saved_p})
        resumed.load_state_dict(copy.deepcopy(saved))
        if order == "optimizer first":
            model.load_state_dict({"w": saved_p})
        for g in grads[3:]:
            q.grad = g.clone()
            resumed.step()
        assert torch.equal(q.detach(), p.detach()), order
        assert torch.equal(resumed.state[q]["master"], opt.state[p]["master"]), order


def _followed(p: torch.Tensor, m: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """The follow rule element by element with torch's nextafter: the master takes the
    parameter's value where it is not what a step writes from the master (nearest; stochastic:
    also the next value toward the master, unless the master is representable)."""
    near = m.to(p.dtype)
    stale = (p != near) & ~(p.isnan() & m.isnan())
    if stochastic:
        inf = torch.tensor(float("inf"), dtype=p.dtype)
        other = torch.nextafter(near, torch.where(m > near.float(), inf, -inf))
        stale &= (p != other) | (m == near.float())
    return torch.where(stale, p.float(), m)


@pytest.mark.parametrize("strides", ["contiguous", "both transposed", "param transposed"])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masters_follow_an_edit_by_the_rule(
    dtype: torch.dtype, stochastic: bool, strides: str
) -> None:
    """fastoptim.torch's master copies follow an edited parameter by the NumPy tier's rule
    (``engine.precision.follow``, which compares 16-bit patterns), checked against the rule
    written with torch's nextafter: bit for bit on masters around, on and between the
    parameter's values, edits one or two values up or down, NaN, infinities, signed zeros,
    masters beyond the dtype's range; the parameter and master in the same or different
    memory orders.  A master that is a value of the parameter's dtype is all a step writes
    (stochastic rounding too): the value below it is an edit."""
    from fastoptim.torch import _follow

    g = torch.Generator().manual_seed(5)
    p16 = torch.randn(4000, generator=g).to(dtype)
    m = p16.float()  # representable masters, and masters between two values:
    m[1000:] += torch.rand(3000, generator=g) * (p16[1000:].float().abs() * 2**-11)
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-45, 3.4e38, -3.4e38, 65504.0, 65520.0, 1e5, -1e5]
    special += [float("inf"), float("-inf"), float("nan")]
    m[3900:3940] = torch.tensor(special).repeat(3)[:40]
    inf = torch.tensor(float("inf"), dtype=dtype)
    p = m.to(dtype)
    p[::3] = torch.nextafter(p[::3], -inf)
    p[1::3] = torch.nextafter(p[1::3], inf)
    p[5::11] = torch.nextafter(torch.nextafter(p[5::11], inf), inf)
    p[7::50] = float("nan")
    p[3950:3960] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0], dtype=dtype)[
        torch.arange(10) % 5
    ]
    m, p = m.reshape(80, 50), p.reshape(80, 50)
    if strides != "contiguous":
        p = p.t().contiguous().t()
    if strides == "both transposed":
        m = m.t().contiguous().t()
    if strides == "param transposed":
        assert m.stride() != p.stride()
    expected = _followed(p, m, stochastic)
    followed = m.clone(memory_format=torch.preserve_format)
    _follow(p, followed, stochastic)
    number = ~expected.isnan()  # (NaNs: their payloads may differ; -0 and +0 may not)
    assert torch.equal(followed.isnan(), ~number)
    assert torch.equal(followed.view(torch.int32)[number], expected.view(torch.int32)[number])
    edited_exact = (p[:20] != m[:20].to(dtype)) & ~p[:20].isnan()
    assert edited_exact.any()
    assert torch.equal(followed[:20][edited_exact], p[:20][edited_exact].float())


# ------------------------------------------------------------ step counts beyond float32's 2^24
@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_stochastic_rounding_keeps_counting_beyond_two_to_the_24(cls: str) -> None:
    """With rounding="stochastic" the step number keys the random bits: the step count is kept
    in float64 (a float32 count, torch's under its default dtype and what a torch.optim
    checkpoint holds, stops at 2^24: every later step drew the same bits).  Each step below
    starts from the same parameter, gradient and moments: only the step number differs, so
    the rounded results differ between steps (4096 elements whose updates are below half a
    bfloat16 ulp: the same bits would round every one of them alike)."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 4096, dtype=torch.bfloat16))
    opt = getattr(fot, cls)([p], lr=1e-3, rounding="stochastic", seed=1)
    p.grad = torch.full_like(p, 1e-3)
    opt.step()
    assert opt.state[p]["step"].dtype == torch.float64
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.tensor(float(2**24 - 1), dtype=torch.float32)
    opt.load_state_dict(sd)
    p0 = p.detach().clone()
    state0 = {k: v.clone() for k, v in opt.state[p].items() if k != "step"}
    results, counts = [], []
    for _ in range(4):
        with torch.no_grad():
            p.copy_(p0)
            for k, v in state0.items():
                opt.state[p][k].copy_(v)
        opt.step()
        results.append(p.detach().view(torch.int16).numpy().copy())
        counts.append(float(opt.state[p]["step"]))
    assert counts == [2**24, 2**24 + 1, 2**24 + 2, 2**24 + 3]
    assert opt.state[p]["step"].dtype == torch.float64
    for a, b in zip(results, results[1:]):
        assert not np.array_equal(a, b)


def _from_two_to_the_24(make: Any, w: np.ndarray, grads: list[Any], reset: bool) -> Any:
    """Adagrad (lr = 2^24, lr_decay = 1) from `w`: one step with a zero gradient, then one
    step per gradient from a float32 count of 2^24 - 1 (set back before each step where
    `reset`); the parameter and the counts after each step."""
    p = torch.nn.Parameter(torch.from_numpy(w.copy()))
    opt = make([p], lr=2.0**24, lr_decay=1.0)
    p.grad = grads[0] * 0
    opt.step()
    counts = []
    for g in grads:
        if reset or not counts:
            opt.state[p]["step"] = torch.tensor(float(2**24 - 1), dtype=torch.float32)
        p.grad = g.clone()
        opt.step()
        counts.append(float(opt.state[p]["step"]))
    return p.detach().clone(), counts


@pytest.mark.filterwarnings("ignore::UserWarning")  # (torch's sparse COO invariant checks)
@pytest.mark.parametrize("sparse", [False, True])
def test_step_count_stops_at_two_to_the_24_as_torch_optim(sparse: bool) -> None:
    """Without stochastic rounding the count is torch's (float32 under torch's default dtype):
    from 2^24 it stops, as torch.optim's, and the step number the update uses is the stored
    count, as torch.optim's: the coefficients stay those of step 2^24 (Adagrad's lr / (1 +
    (step - 1) lr_decay) with lr = 2^24 and lr_decay = 1: 1 at step 2^24, the float32 below 1
    at 2^24 + 1, which changed ~half of these elements).  So four steps from a count of
    2^24 - 1 equal four steps each taken from a count set back to 2^24 - 1; on the dense and
    the row (sparse gradients) paths."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((50, 8)).astype(np.float32)
    grads = [torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32)) for _ in range(4)]
    if sparse:
        keep = torch.zeros(50, 1)
        keep[[1, 3, 7, 20]] = 1.0
        grads = [(g * keep).to_sparse(1) for g in grads]
    frozen, counts = _from_two_to_the_24(fot.Adagrad, w, grads, reset=False)
    reset_each_time, _ = _from_two_to_the_24(fot.Adagrad, w, grads, reset=True)
    _, torch_counts = _from_two_to_the_24(torch.optim.Adagrad, w, grads, reset=False)
    assert counts == torch_counts == [2.0**24] * 4
    assert torch.equal(frozen, reset_each_time)
