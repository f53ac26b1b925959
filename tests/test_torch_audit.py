"""``fastoptim.torch`` against the defects an audit found (skipped when torch is not installed):
options changed after the fast path took over, autograd's version counters, quantized state in
another memory layout or malformed in a checkpoint, gradients sharing memory, a parameter
listed twice, torch's ``fused``/``foreach`` rule and the names in the errors.  Each test with
a change between steps runs with the fast path on and off."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as fot  # noqa: E402


def _same(a: Any, b: Any) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change", [(0.0, 0.9), (0.9, 0.0), (0.9, 0.0, 0.5)])
def test_momentum_changed_after_fast_steps_like_torch(
    fast: bool, change: tuple[float, ...]
) -> None:
    """SGD's momentum switched on (the buffer created lazily, as torch does), off, and on
    again (the kept buffer reused, as torch does) after the fast path took over."""
    torch.manual_seed(0)
    p = torch.randn(6)
    q = p.clone()
    ref = torch.optim.SGD([p], lr=0.1, momentum=change[0])
    ours = fot.SGD([q], lr=0.1, momentum=change[0])
    changes = dict(zip(range(3, 3 + 2 * len(change), 2), change[1:]))  # (steps 3, 5...)
    for t in range(3 + 2 * len(change)):
        if t in changes:
            ref.param_groups[0]["momentum"] = ours.param_groups[0]["momentum"] = changes[t]
        g = torch.randn(6)
        p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        _same(q, p)
    assert ("momentum_buffer" in ours.state[q]) == ("momentum_buffer" in ref.state[p])
    if "momentum_buffer" in ref.state[p]:
        _same(ours.state[q]["momentum_buffer"], ref.state[p]["momentum_buffer"])


@pytest.mark.parametrize(
    "option, value, state",
    [
        ("master_weights", True, "master"),
        ("kahan", True, "compensation"),
        ("ema_decay", 0.5, "ema"),
        ("state_dtype", "bfloat16", None),
    ],
)
def test_precision_option_set_later_applies(
    fast: bool, option: str, value: Any, state: str | None
) -> None:
    """A precision option set on a group after the fast path took over applies at the next
    step, as if the group had it from the start on the state it had then."""
    torch.manual_seed(0)
    p = torch.randn(8).bfloat16()
    opt = fot.AdamW([p])
    for t in range(5):
        if t == 3:
            opt.param_groups[0][option] = value
        p.grad = torch.randn(8).bfloat16()
        opt.step()
    if state is not None:
        assert state in opt.state[p]
    if option == "state_dtype":
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    if option == "ema_decay":  # two steps with the EMA: from p after step 4, then decay 0.5
        before = opt.state[p]["ema"].clone()
        p.grad = torch.randn(8).bfloat16()
        opt.step()
        _same(opt.state[p]["ema"], 0.5 * before + 0.5 * p.float())


def test_bad_option_set_later_refused_naming_it(fast: bool) -> None:
    """An option combination refused at construction is refused at the step too (after the
    fast path took over), naming the options; nothing changes."""
    p = torch.randn(8).bfloat16()
    opt = fot.AdamW([p], master_weights=True)
    for _ in range(3):
        p.grad = torch.ones(8).bfloat16()
        opt.step()
    before = p.clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["kahan"] = True
    with pytest.raises(ValueError, match="master_weights and kahan"):
        opt.step()
    assert torch.equal(p, before[0])
    for k, v in before[1].items():
        assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_step_bumps_versions_like_torch(fast: bool, name: str) -> None:
    """Each step bumps the autograd version of the parameters: a graph that saved a parameter
    before the step refuses backward(), as torch."""
    for mod in (torch.optim, fot):
        w = torch.nn.Parameter(torch.ones(3))
        opt = getattr(mod, name)([w], lr=0.1, **({"momentum": 0.9} if name == "SGD" else {}))
        for _ in range(3):  # (the fast path from the third)
            w.grad = torch.ones(3)
            opt.step()
        loss = (w**2).sum()
        version = w._version
        opt.step()
        assert w._version > version, mod.__name__
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def _trained(p: torch.Tensor, state_dtype: str, steps: int = 3) -> Any:
    """An AdamW over `p` with `state_dtype`, after `steps` steps of random gradients."""
    opt = fot.AdamW([p], state_dtype=state_dtype)
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        opt.step()
    return opt


def _quantized_values(opt: Any, p: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    st = opt.state[p]
    return {
        n: fot._dequantized(st[n], st[n + "_absmax"], n, kind, tuple(p.shape), st.get(n + "_order"))
        for n in ("exp_avg", "exp_avg_sq")
    }


def _laid(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "transposed":  # (a conv weight stored (3, 3, 16, 32), used permuted)
        return t.permute(3, 2, 0, 1).contiguous().permute(2, 3, 1, 0)
    fmt = torch.channels_last if how == "channels_last" else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


@pytest.mark.parametrize(
    "kind, saved, resumed",
    [
        ("int8", "contiguous", "channels_last"),
        ("int4", "contiguous", "channels_last"),
        ("int4", "channels_last", "contiguous"),
        ("int4", "transposed", "contiguous"),
    ],
)
def test_quantized_state_resumed_in_another_layout(kind: str, saved: str, resumed: str) -> None:
    """Quantized blocks follow their parameter's memory order, which a state_dict records beside
    them (``exp_avg_order``) where it is not row-major (8-bit codes also keep its strides;
    4-bit ones are 1-D, packed).  Resumed in another layout, the state is requantized in the
    new memory order (exactly the quantization of the saved values in it), close to the saved
    values, and the next update close to the unchanged run's.  (Before: 8-bit read in the
    wrong blocks, updates 16% wrong; 4-bit read in the wrong order, updates 1.5x their size
    wrong.)"""
    four = kind == "int4"
    torch.manual_seed(0)
    a = _laid(torch.randn(32, 16, 3, 3), saved)
    oa = _trained(a, kind)
    ckpt = copy.deepcopy(oa.state_dict())
    assert ("exp_avg_order" in ckpt["state"][0]) == (saved != "contiguous")
    want = _quantized_values(oa, a, kind)
    b = _laid(a.detach().clone(), resumed)
    ob = fot.AdamW([b], state_dtype=kind)
    ob.load_state_dict(ckpt)
    b.grad = torch.zeros_like(b)
    ob._prepare(0, ob.param_groups[0], False)  # (lays out the state; touches no element)
    assert ("exp_avg_order" in ob.state[b]) == (resumed != "contiguous")
    if not four:
        assert ob.state[b]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    got = _quantized_values(ob, b, kind)
    for n, values in want.items():
        codes, absmax = fot._quantized_like(b, values, n, kind)
        assert torch.equal(ob.state[b][n], codes), n
        assert torch.equal(ob.state[b][n + "_absmax"], absmax), n
        scale = float(values.abs().max())
        assert float((got[n] - values).abs().max()) <= (0.15 if four else 0.02) * scale, n
    g = torch.randn_like(a)
    a.grad, b.grad = g.clone(), g.clone()
    a0 = a.detach().clone()
    oa.step()
    ob.step()
    ua, ub = a - a0, b - a0
    assert float((ua - ub).abs().max() / ua.abs().max()) < (0.4 if four else 0.05)


def test_int4_state_follows_a_parameter_changing_layout(fast: bool) -> None:
    """A parameter whose storage is replaced by another layout between steps (``p.data =``):
    its 4-bit state is requantized in the new memory order, as its 8-bit state is."""
    torch.manual_seed(0)
    p = torch.randn(32, 16, 3, 3)
    opt = _trained(p, "int4", 2)
    want = _quantized_values(opt, p, "int4")
    p.data = p.data.contiguous(memory_format=torch.channels_last)
    p.grad = torch.zeros_like(p)
    opt.step()  # (zero gradient: the states decay, exp_avg by beta1, exp_avg_sq by beta2)
    assert opt.state[p]["exp_avg_order"] == (0, 2, 3, 1)
    got = _quantized_values(opt, p, "int4")
    for n, beta in (("exp_avg", 0.9), ("exp_avg_sq", 0.999)):
        scale = float(want[n].abs().max())
        assert float((got[n] - beta * want[n]).abs().max()) <= 0.2 * scale, n


@pytest.mark.parametrize(
    "order, match",
    [
        ((0, 1, 1, 3), "permutation of the parameter's 4 dimensions"),
        ((0, 2, 3), "4 dimensions"),
        ("0231", "permutation"),
        (None, "permutation"),
    ],
)
def test_malformed_int4_order_refused_at_load(order: Any, match: str) -> None:
    torch.manual_seed(0)
    p = torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    opt = _trained(p, "int4", 1)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_order"] = order
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=f"state 'exp_avg_order' of param .*{match}"):
        opt.load_state_dict(sd)
    for k, v in before.items():
        assert (
            torch.equal(opt.state[p][k], v) if isinstance(v, torch.Tensor) else opt.state[p][k] == v
        )
    del sd["state"][0]["exp_avg_absmax"], sd["state"][0]["exp_avg_codes"]
    sd["state"][0]["exp_avg_order"] = (0, 2, 3, 1)
    with pytest.raises(ValueError, match=r"'exp_avg_order'.*a quantized state it lacks"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_codes_saved_under_their_own_names(kind: str) -> None:
    """A quantized state's codes are saved as ``name + "_codes"``: ``torch.optim.AdamW`` given
    such a checkpoint refuses at its first step, changing nothing (with the codes under
    ``exp_avg`` it had trained on them cast to float: an update at cosine 0.39 with the
    right one).  fastoptim.torch resumes from it and from a fastoptim 0.1 checkpoint (codes
    under the state's own name) to the same bits as the run that saved it; one with both
    names is refused, loading nothing."""
    torch.manual_seed(0)
    p = torch.randn(5000)
    opt = _trained(p, kind, 2)
    sd = opt.state_dict()
    for n in ("exp_avg", "exp_avg_sq"):
        assert n not in sd["state"][0]
        assert sd["state"][0][n + "_codes"] is opt.state[p][n]
    assert set(opt.state[p]) >= {"exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"}
    q = torch.nn.Parameter(p.detach().clone())
    plain = torch.optim.AdamW([q])
    plain.load_state_dict(copy.deepcopy(sd))
    q.grad = torch.ones(5000)
    with pytest.raises(KeyError, match="exp_avg"):
        plain.step()
    assert torch.equal(q.detach(), p)
    old = copy.deepcopy(sd)
    old["state"][0] = {k.removesuffix("_codes"): v for k, v in old["state"][0].items()}
    both = copy.deepcopy(sd)
    both["state"][0]["exp_avg"] = both["state"][0]["exp_avg_codes"].clone()
    saved, at_save = copy.deepcopy(sd), p.clone()
    p.grad = torch.ones(5000)
    opt.step()  # the run that saved it, on
    for ckpt in (saved, old):
        r = torch.nn.Parameter(at_save.clone())
        resumed = fot.AdamW([r], state_dtype=kind)
        resumed.load_state_dict(ckpt)
        r.grad = torch.ones(5000)
        resumed.step()
        assert torch.equal(r.detach(), p), "resumed parameter"
        assert set(resumed.state[r]) == set(opt.state[p])
        for n, v in opt.state[p].items():
            assert torch.equal(resumed.state[r][n], v), n
    fresh = fot.AdamW([torch.nn.Parameter(p.detach().clone())], state_dtype=kind)
    with pytest.raises(ValueError, match="param 0 of group 0: both 'exp_avg' and 'exp_avg_codes'"):
        fresh.load_state_dict(both)
    assert not fresh.state


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_state_of_a_parameter_of_another_shape_is_refused(kind: str) -> None:
    """A quantized state's entry records its parameter's shape (``param_shape``): the state of
    a 64x80 parameter is refused for an 80x64 one (4-bit codes are flat: it loaded and
    stepped), changing nothing; a malformed shape is named; without the entry (fastoptim
    0.1) it loads as before, and ``opt.state`` never holds it."""
    torch.manual_seed(0)
    sd = _trained(torch.randn(64, 80), kind, 1).state_dict()
    assert torch.equal(sd["state"][0]["param_shape"], torch.tensor([64, 80]))
    p = torch.randn(80, 64)
    opt = _trained(p, kind, 1)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    for shape, match in (
        (None, r"param 0 of group 0: the state of a parameter of shape \(64, 80\), this one is"),
        ([80, "64"], "param 0 of group 0: malformed param_shape"),
        (torch.tensor([80.5, 64.0]), "param 0 of group 0: malformed param_shape"),
    ):
        bad = copy.deepcopy(sd)
        if shape is not None:
            bad["state"][0]["param_shape"] = shape
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        assert set(opt.state[p]) == set(before)
        for k, v in before.items():
            assert torch.equal(opt.state[p][k], v), k
    q = torch.randn(64, 80)
    old = copy.deepcopy(sd)
    del old["state"][0]["param_shape"]
    cast = copy.deepcopy(sd)  # (as a loader that casts every tensor to float leaves it)
    cast["state"][0]["param_shape"] = cast["state"][0]["param_shape"].float()
    for ckpt in (old, sd, cast):
        fresh = fot.AdamW([q], state_dtype=kind)
        fresh.load_state_dict(copy.deepcopy(ckpt))
        assert "param_shape" not in fresh.state[q]
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[q][k], sd["state"][0][k + "_codes"]), k


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.(script|interface)` is deprecated:DeprecationWarning"
)
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_state_put_in_by_zero_redundancy_optimizer(kind: str, process_group: Any) -> None:
    """ZeroRedundancyOptimizer's load_state_dict writes its inner optimizer's ``state``
    directly (not through its load_state_dict), codes under ``<state>_codes``: the next step
    takes them under the state's name, bit for bit the run that saved them, after a skipped
    step (skip_nonfinite: it keeps what it renamed, creating nothing)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, 101))
    opts = {"optimizer_class": fot.AdamW, "lr": 1e-2, "state_dtype": kind}
    z = ZeroRedundancyOptimizer([p], skip_nonfinite=True, **opts)
    for _ in range(2):
        p.grad = torch.randn(50, 101)
        z.step()
    z.consolidate_state_dict(0)
    saved, at_save = copy.deepcopy(z.state_dict()), p.detach().clone()
    assert "exp_avg_codes" in saved["state"][0] and "exp_avg" not in saved["state"][0]
    p.grad = torch.ones(50, 101)
    z.step()
    q = torch.nn.Parameter(at_save.clone())
    z2 = ZeroRedundancyOptimizer([q], skip_nonfinite=True, **opts)
    z2.load_state_dict(saved)
    q.grad = torch.full((50, 101), float("nan"))
    z2.step()  # skipped
    assert torch.equal(q.detach(), at_save)
    q.grad = torch.ones(50, 101)
    z2.step()
    assert torch.equal(q.detach(), p.detach())
    assert set(z2.optim.state[q]) == set(z.optim.state[p])
    for n, v in z.optim.state[p].items():
        assert torch.equal(z2.optim.state[q][n], v), n


def _int8_checkpoint() -> tuple[torch.Tensor, dict[str, Any]]:
    torch.manual_seed(0)
    p = torch.randn(5000)
    return p, _trained(p, "int8", 2).state_dict()


@pytest.mark.parametrize(
    "damage, match",
    [
        ("inf", "'exp_avg_absmax'.*finite"),
        ("negative", "'exp_avg_absmax'.*>= 0"),
        ("no absmax", "'exp_avg'.*without.*'exp_avg_absmax'"),
        ("no codes", "'exp_avg_absmax'.*no codes"),
        ("blocks", "'exp_avg_absmax'.*expected float32 \\(20,\\)"),
        ("float64 absmax", "'exp_avg_absmax'.*float64"),
        ("codes shape", "'exp_avg'.*uint8 \\(4999,\\)"),
    ],
)
def test_malformed_quantized_checkpoint_refused_at_load(damage: str, match: str) -> None:
    p, sd = _int8_checkpoint()
    sd = copy.deepcopy(sd)
    entry = sd["state"][0]
    if damage == "inf":
        entry["exp_avg_absmax"][0] = float("inf")
    elif damage == "negative":
        entry["exp_avg_absmax"][3] = -1.0
    elif damage == "no absmax":
        del entry["exp_avg_absmax"]
    elif damage == "no codes":
        del entry["exp_avg_codes"]
    elif damage == "blocks":
        entry["exp_avg_absmax"] = entry["exp_avg_absmax"][:-1]
    elif damage == "float64 absmax":
        entry["exp_avg_absmax"] = entry["exp_avg_absmax"].double()
    else:
        entry["exp_avg_codes"] = entry["exp_avg_codes"][:-1]
    q = p.detach().clone()
    opt = fot.AdamW([q], state_dtype="int8")
    q.grad = torch.ones(5000)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[q].items()}
    with pytest.raises(ValueError, match=f"AdamW.load_state_dict: state {match}"):
        opt.load_state_dict(sd)
    assert set(opt.state[q]) == set(before)
    for k, v in before.items():
        assert torch.equal(opt.state[q][k], v), k
    opt.load_state_dict(_int8_checkpoint()[1])  # (a sound one loads)


@pytest.mark.parametrize("state_dtype", [None, "int8"])
@pytest.mark.parametrize("step", [float("nan"), float("inf"), -1.0, 2.5, 1e30, "3"])
def test_a_checkpoints_bad_step_is_refused_before_anything_loads(
    step: Any, state_dtype: str | None
) -> None:
    """A ``step`` that no step could count from is refused naming it, every parameter's state
    as it was.  A NaN had failed the load half done (every state already replaced) and then
    every later step; -1 and 1e30 had loaded and failed the next step; 2.5 had stepped with
    3 as its count."""
    ps = [torch.nn.Parameter(torch.randn(5000)) for _ in range(2)]
    opt = fot.AdamW(ps, lr=1e-2, state_dtype=state_dtype)
    for p in ps:
        p.grad = torch.randn(5000)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt.step()
    before = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    sd["state"][1]["step"] = step if isinstance(step, str) else torch.tensor(step)
    with pytest.raises(ValueError, match="load_state_dict: state 'step' of param 1 of group 0"):
        opt.load_state_dict(sd)
    for p, was in zip(ps, before):
        assert set(opt.state[p]) == set(was)
        for k, v in was.items():
            assert torch.equal(opt.state[p][k], v), k
    opt.step()  # (usable)


@pytest.mark.parametrize("how", ["one tensor", "autograd views"])
def test_gradients_sharing_memory_like_torch(fast: bool, how: str) -> None:
    """Gradients that share memory (one tensor for two parameters; autograd's views of one
    buffer) are only read: stepped as torch does, several times."""
    ps: list[list[torch.Tensor]] = []
    for _ in (torch.optim, fot):
        torch.manual_seed(0)
        ps.append([torch.nn.Parameter(torch.randn(2, 3)) for _ in range(2)])
    opts = [torch.optim.Adam(ps[0], lr=0.1), fot.Adam(ps[1], lr=0.1)]
    for _ in range(4):
        for params, opt in zip(ps, opts):
            if how == "one tensor":
                g = torch.ones(2, 3)
                params[0].grad = params[1].grad = g
            else:
                for p in params:
                    p.grad = None
                (params[0].view(6) + params[1].view(6)).exp().sum().backward()
                assert params[0].grad.data_ptr() == params[1].grad.data_ptr()
            opt.step()
        for a, b in zip(ps[1], ps[0]):
            _same(a.detach(), b.detach())


def test_gradient_copied_then_changed_in_place(fast: bool) -> None:
    """Gradients bound as copies (laid out otherwise than their parameter, or sharing memory),
    the same tensors at every step, changed in place between steps: each step reads their
    current values, as torch."""
    params = [torch.zeros(3, 4).t() for _ in range(3)]
    g, h = torch.zeros(4, 3), torch.zeros(3, 4).t()
    params[0].grad, params[1].grad, params[2].grad = g, h, h
    opt = fot.SGD(params, lr=1.0)
    for i in range(4):
        g.fill_(i + 1.0)
        h.fill_(i + 1.0)
        opt.step()
    for p in params:
        assert torch.all(p == -10.0)


def test_gradient_sharing_a_parameter_still_refused(fast: bool) -> None:
    a, b = torch.ones(4), torch.ones(4)
    opt = fot.Adam([a, b], lr=0.1)
    a.grad, b.grad = a.detach(), a.detach()
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    assert torch.equal(a, torch.ones(4)) and torch.equal(b, torch.ones(4))


def test_negative_view_parameter_refused_at_construction() -> None:
    """A parameter with the negative bit (``torch._neg_view``: its memory holds -p) has no
    in-place NumPy view of its values: refused when the optimizer is built, naming it, not
    with NumPy's error at the first step."""
    p = torch._neg_view(torch.ones(3))
    with pytest.raises(TypeError, match=r"SGD: param 1 of group 0 is a negative view"):
        fot.SGD([torch.zeros(3), p], lr=0.1)
    opt = fot.SGD([torch.zeros(3)], lr=0.1)
    with pytest.raises(TypeError, match="param 0 of group 1 is a negative view"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_duplicate_parameter_refused_at_construction() -> None:
    p, q = torch.zeros(3), torch.zeros(3)
    with (
        pytest.warns(UserWarning, match="duplicate"),
        pytest.raises(ValueError, match="SGD: param 2 of group 0 is param 0 of group 0 again"),
    ):
        fot.SGD([p, q, p], lr=0.1)
    opt = fot.SGD([q], lr=0.1)
    with (
        pytest.warns(UserWarning, match="duplicate"),
        pytest.raises(ValueError, match="param 1 of group 1 is param 0 of group 1 again"),
    ):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["params"].append(q)  # (added behind its back: named at the step)
    q.grad = torch.ones(3)
    with pytest.raises(ValueError, match="SGD: param 1 of group 0 is param 0 of group 0 again"):
        opt.step()
    assert torch.equal(q, torch.zeros(3))


def test_fused_and_foreach_and_tensor_lr_errors() -> None:
    for mod in (torch.optim, fot):
        with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
            mod.Adam([torch.zeros(3)], fused=True, foreach=True)
    with pytest.raises(ValueError, match=r"Adam: lr of group 0: .*one element"):
        fot.Adam([torch.zeros(3)], lr=torch.tensor([0.1, 0.2]))
    p = torch.zeros(3)
    opt = fot.Adam([p], lr=0.1)
    opt.param_groups[0]["betas"] = (torch.tensor([0.9, 0.8]), 0.999)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"Adam: betas of group 0: .*one element"):
        opt.step()
    assert torch.equal(p, torch.zeros(3))


def test_module_docstring_current() -> None:
    doc = fot.__doc__ or ""
    assert "bfloat16/float16/complex" not in doc
    assert "share one runtime" not in doc and "libgomp" not in doc
    fot.Adam([torch.zeros(3, dtype=torch.bfloat16)])  # (accepted, as the docstring says)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_sparse_index_out_of_range_refused(transposed: bool) -> None:
    """A sparse gradient's index beyond its dimension (torch does not check it by default): an
    IndexError naming the parameter, the index and the dimension, nothing written (a transposed
    parameter's offsets folded (2, 0) of a (2, 3) tensor onto a valid element)."""
    p = torch.nn.Parameter(torch.zeros(3, 2).t() if transposed else torch.zeros(2, 3))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[2], [0]]), torch.tensor([1.0]), (2, 3))
    opt = fot.SparseAdam([p], lr=0.1)
    want = r"param 0 of group 0: .*index 2 is out of range for dimension 0 of size 2"
    with pytest.raises(IndexError, match=want):
        opt.step()
    assert not p.detach().any()
    assert not opt.state[p]  # no state created either


@pytest.mark.parametrize("name", ["Muon", "Adafactor", "LBFGS"])
def test_set_copy_out_refused_where_the_step_runs_in_numpy(name: str) -> None:
    """Their steps never wrote a copy-out: refused, as in the NumPy tier."""
    p = torch.nn.Parameter(torch.zeros(64, 8))
    opt = getattr(fot, name)([p])
    with pytest.raises(TypeError, match=f"{name}.set_copy_out: {name} computes its step in NumPy"):
        opt.set_copy_out([torch.zeros(64, 8, dtype=torch.bfloat16)])
    opt.set_copy_out(None)  # (removing none is fine)


def test_copy_out_storage_replaced_between_steps() -> None:
    """A copy-out whose storage was replaced (``set_``) after the fast path took over: the next
    step writes the new storage (it wrote the old one, leaving the tensor stale); a new storage
    of another shape is refused naming the copy-out, the parameter untouched."""
    p = torch.nn.Parameter(torch.ones(5000))
    opt = fot.AdamW([p], lr=0.01)
    c = torch.zeros(5000, dtype=torch.bfloat16)
    opt.set_copy_out([c])
    for _ in range(3):
        p.grad = torch.ones(5000)
        opt.step()
    c.set_(torch.zeros(10_000, dtype=torch.bfloat16)[:5000])
    opt.step()
    assert torch.equal(c, p.detach().to(torch.bfloat16))
    c.set_(torch.zeros(100, dtype=torch.bfloat16))
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"copy-out of param 0 of group 0: shape \(100,\)"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("source", ["torch", "fastoptim"])
def test_asgd_float64_after_a_load_keeps_torchs_scalars(source: str) -> None:
    """torch computes ASGD's next eta and mu as default-dtype (float32) tensors and copies them
    into the state; after a load into float64 parameters that state is float64, and fastoptim
    computed the values in float64 (params 1.6e-9 relative off torch's within 3 steps)."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, dtype=torch.float64, generator=gen)
    grads = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(6)]
    ours, theirs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    kw: dict[str, Any] = {"lr": 0.01, "t0": 0.0, "foreach": False}
    first = (torch.optim.ASGD if source == "torch" else fot.ASGD)([theirs], **kw)
    for g in grads[:3]:
        theirs.grad = g.clone()
        first.step()
    ours.data.copy_(theirs.detach())
    o, t = fot.ASGD([ours], **kw), torch.optim.ASGD([theirs], **kw)
    o.load_state_dict(copy.deepcopy(first.state_dict()))
    t.load_state_dict(copy.deepcopy(first.state_dict()))
    for g in grads[3:]:
        ours.grad, theirs.grad = g.clone(), g.clone()
        o.step()
        t.step()
    assert torch.equal(ours.detach(), theirs.detach())
    for k in ("eta", "mu", "ax"):
        assert o.state[ours][k].dtype == t.state[theirs][k].dtype
        assert torch.equal(o.state[ours][k], t.state[theirs][k]), k


def test_options_a_loaded_checkpoint_lacks_keep_the_groups_values() -> None:
    """Loading a torch.optim checkpoint (which has no fastoptim option) replaced options set
    per group (``cautious``, ``state_dtype``, ``maximize``...) by the constructor's defaults:
    the next step went the other way with ``maximize``, and a bfloat16 state became float32."""
    torch.manual_seed(0)
    x = torch.randn(8, requires_grad=True)
    y = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    ref = torch.optim.Adam([x.detach().clone().requires_grad_()], lr=0.1)
    ref.param_groups[0]["params"][0].grad = torch.ones(8)
    ref.step()
    opt = fot.Adam(
        [
            {"params": [x], "cautious": True, "maximize": True},
            {"params": [y], "state_dtype": "bfloat16"},
        ],
        lr=0.1,
    )
    sd = copy.deepcopy(ref.state_dict())
    del sd["param_groups"][0]["maximize"]  # (as schedulefree's checkpoints lack it)
    sd["param_groups"].append({**sd["param_groups"][0], "params": [1]})
    sd["state"][1] = {
        "step": torch.tensor(1.0),
        "exp_avg": torch.zeros(8, dtype=torch.bfloat16),
        "exp_avg_sq": torch.zeros(8, dtype=torch.bfloat16),
    }
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["cautious"] is True and opt.param_groups[0]["maximize"] is True
    assert opt.param_groups[1]["state_dtype"] == "bfloat16"
    assert opt.param_groups[1]["cautious"] is False  # (what neither had: the default)
    before = x.detach().clone()
    x.grad, y.grad = torch.ones(8), torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    assert (x.detach() > before).all()  # maximize: up the gradient
    assert opt.state[y]["exp_avg_sq"].dtype == torch.bfloat16


def _twins(make: Any, n: int = 1000, **kw: Any) -> tuple[Any, ...]:
    """The same optimizer over the same values, torch.optim's (for-loop) and fastoptim's."""
    a = torch.nn.Parameter(torch.zeros(n))
    b = torch.nn.Parameter(torch.zeros(n))
    ref = getattr(torch.optim, make)([a], foreach=False, **kw)
    opt = getattr(fot, make)([b], **kw)
    return a, ref, b, opt


def _step_both(a: Any, ref: Any, b: Any, opt: Any, g: float) -> None:
    for p, o in ((a, ref), (b, opt)):
        p.grad = torch.full_like(p, g)
        o.step()


@pytest.mark.parametrize("move", ["share_memory_", "data", "set_"])
def test_a_state_tensor_whose_storage_moved(fast: bool, move: str) -> None:
    """A state tensor whose storage was replaced in place (``share_memory_()`` as Hogwild's
    shared optimizers do, ``.data =``, ``set_()``) left the plan's array on the old memory:
    steps went on there (the state seen in opt.state frozen, a reset ignored), and after
    share_memory_(), which frees the old memory, they wrote into freed memory."""
    a, ref, b, opt = _twins("Adam", lr=0.1)
    for _ in range(3):
        _step_both(a, ref, b, opt, 1.0)
    for o, p in ((ref, a), (opt, b)):
        for name, v in o.state[p].items():
            if name == "step":
                continue
            if move == "share_memory_":
                v.share_memory_()
            elif move == "data":
                v.data = torch.zeros_like(v)  # a reset, on new storage
            else:
                v.set_(torch.zeros_like(v))
    for _ in range(3):
        _step_both(a, ref, b, opt, -1.0)
    _same(b, a)
    for name in ("exp_avg", "exp_avg_sq"):
        _same(opt.state[b][name], ref.state[a][name])


def test_a_step_count_edited_in_place(fast: bool) -> None:
    """One parameter's state reset in place (its ``step`` zeroed): the fast path advanced every
    parameter's count as the first one's (steps [5, 5] where torch has [5, 2])."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    ref = torch.optim.Adam(ps[:2], lr=0.1, foreach=False)
    opt = fot.Adam(ps[2:], lr=0.1)
    for k in range(5):
        for p in ps:
            p.grad = torch.ones(3)
        ref.step()
        opt.step()
        if k == 2:
            for o, p in ((ref, ps[1]), (opt, ps[3])):
                for v in o.state[p].values():
                    v.zero_()
    assert [float(opt.state[p]["step"]) for p in ps[2:]] == [5.0, 2.0]
    _same(ps[2], ps[0])
    _same(ps[3], ps[1])


def test_a_parameter_reshaped_or_retyped_on_the_same_memory(fast: bool) -> None:
    """``p.data`` replaced by a view of the same memory with another shape (stateless SGD:
    refused with a message naming the old shape) or another dtype (float16 over bfloat16:
    updated as bfloat16)."""
    p = torch.nn.Parameter(torch.randn(6))
    q = torch.nn.Parameter(p.detach().clone())
    ref, opt = torch.optim.SGD([p], lr=0.1), fot.SGD([q], lr=0.1)
    for o, t in ((ref, p), (opt, q)):
        for _ in range(2):
            t.grad = torch.ones(6)
            o.step()
        t.data = t.data[:3]
        t.grad = torch.ones(3)
        o.step()
    _same(q, p)
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = fot.SGD([p], lr=0.5)
    for _ in range(2):
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()
    p.data = p.data.view(torch.float16)
    before = p.detach().clone()
    p.grad = torch.ones(4, dtype=torch.float16)
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.5, rtol=0, atol=0)


def test_reduce_grad_stats_runs_where_a_clipping_group_has_no_gradient() -> None:
    """With reduce_grad_stats (FSDP2, torch's ZeroRedundancyOptimizer) every process must join
    the reduction: a process whose clipping group had no gradient this step (an empty shard,
    grad None) skipped it and left the others blocked in their all_reduce."""
    w = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = fot.AdamW([{"params": [w], "max_grad_norm": 1.0}, {"params": [b]}], lr=0.1)
    calls: list[Any] = []

    def reduce(stats: Any) -> Any:  # as if another process held the whole norm
        calls.append(stats.copy())
        return stats + torch.tensor([9.0, 0.0], dtype=torch.float64).numpy()

    opt.reduce_grad_stats = reduce
    b.grad = torch.ones(4)  # w has none here (the norm is over every group's gradients)
    opt.step()
    assert len(calls) == 1 and calls[0].tolist() == [4.0, 0.0]
    assert opt.grad_norm == pytest.approx(13**0.5)
    torch.testing.assert_close(w.detach(), torch.ones(4))  # no gradient: unchanged
    w.grad, b.grad = torch.full((4,), 3.0), None  # now only the clipping group has one
    opt.step()
    assert len(calls) == 2 and calls[1].tolist() == [36.0, 0.0]
    assert opt.grad_norm == pytest.approx(45**0.5)


_LOAD_LAYOUTS = {
    "int8": (torch.float32, {"state_dtype": "int8"}),
    "int4": (torch.float32, {"state_dtype": "int4"}),
    "bf16-master": (torch.bfloat16, {"master_weights": True}),
    "f32-bf16state": (torch.float32, {"state_dtype": "bfloat16"}),
}


@pytest.mark.parametrize("layout", list(_LOAD_LAYOUTS))
def test_load_state_dict_never_casts_the_policys_states(layout: str, monkeypatch: Any) -> None:
    """torch's loader casts every state to its parameter's dtype: 8-bit/4-bit codes became
    float32 for a moment (3.9x the state's memory, undone by a copy after), float32 state of
    bfloat16 parameters was rounded then copied again, bfloat16 state of float32 parameters
    stayed float32 (twice its memory) until the next step.  Now those states are never given
    to the cast: they keep the saved tensors (aliased, as torch aliases what it does not
    cast), and the next step is that of a load that copied."""
    dtype, opts = _LOAD_LAYOUTS[layout]
    torch.manual_seed(0)
    make = lambda: [torch.nn.Parameter(torch.randn(5000).to(dtype)) for _ in range(2)]  # noqa: E731
    src_params = make()
    src = fot.AdamW(src_params, lr=0.01, **opts)
    grads = [[torch.randn(5000).to(dtype) for _ in range(2)] for _ in range(4)]
    for gs in grads[:3]:
        for p, g in zip(src_params, gs):
            p.grad = g.clone()
        src.step()
    sd = src.state_dict()
    kept = copy.deepcopy(sd)
    cast: list[Any] = []
    policy = torch.optim.Optimizer._process_value_according_to_param_policy

    def spy(param: Any, value: Any, param_id: Any, groups: Any, key: Any = None) -> Any:
        cast.append(key)
        return policy(param, value, param_id, groups, key)

    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", spy)
    params, twin_params = make(), make()
    for a, b, c in zip(params, twin_params, src_params):
        a.data.copy_(c.detach())
        b.data.copy_(c.detach())
    opt, twin = fot.AdamW(params, lr=0.01, **opts), fot.AdamW(twin_params, lr=0.01, **opts)
    opt.load_state_dict(sd)
    assert set(cast) <= {"step"}, cast
    for i, p in enumerate(params):
        for name, value in opt.state[p].items():
            if name != "step":
                saved = sd["state"][i]  # (quantized codes saved as name + "_codes")
                assert value is saved.get(name + "_codes", saved.get(name)), name  # (itself)
    assert opt.state_bytes() == src.state_bytes()
    monkeypatch.undo()
    twin.load_state_dict(kept)
    for p, q, g in zip(params, twin_params, grads[3]):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        for name in opt.state[p]:
            assert torch.equal(opt.state[p][name], twin.state[q][name]), name


def test_load_state_dict_hooks_see_tensors() -> None:
    """The loader hides some states from torch's cast: the user's pre- and post-hooks still
    see tensors, never the holders."""
    p = torch.nn.Parameter(torch.ones(5000))
    opt = fot.AdamW([p], state_dtype="int8")
    p.grad = torch.ones(5000)
    opt.step()
    seen: list[Any] = []
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: seen.extend(type(v) for v in sd["state"][0].values())
    )
    opt.register_load_state_dict_post_hook(
        lambda o: seen.extend(type(v) for v in o.state[p].values())
    )
    opt.load_state_dict(opt.state_dict())
    assert seen and set(seen) == {torch.Tensor}, seen


@pytest.mark.parametrize("where", ["same group", "other group"])
def test_parameter_listed_twice_by_editing_param_groups_is_refused(where: str) -> None:
    """A parameter listed twice by editing ``param_groups[i]["params"]`` after steps (which
    add_param_group's check does not see) is refused by the step, naming both places and
    changing nothing: in another group its moments were updated twice with one ``step``
    count (9e-4 off torch.optim, silently)."""
    a, b = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5))
    opt = fot.Adam([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.01)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    gi = 0 if where == "same group" else 1
    opt.param_groups[gi]["params"].append(a)
    before = {
        p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in (a, b)
    }
    label = "param 1 of group 0" if gi == 0 else "param 1 of group 1"
    with pytest.raises(ValueError, match=f"Adam: {label} is param 0 of group 0 again"):
        opt.step()
    for p, (value, state) in before.items():
        assert torch.equal(p.detach(), value)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    opt.param_groups[gi]["params"].pop()
    opt.step()  # (listed once again: it steps)
    assert not torch.equal(a.detach(), before[a][0])


def test_a_state_tensor_re_viewed_in_place(fast: bool) -> None:
    """A state tensor re-viewed on the same memory (``as_strided_``) after steps: with another
    shape, refused as torch refuses it (the plan had kept stepping the old view's memory, so
    the state read back permuted); with the parameter's shape and transposed strides, read as
    the tensor now says, as torch.optim reads it."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = fot.Adam([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(4, 6)
        opt.step()
    opt.state[p]["exp_avg"].as_strided_((6, 4), (1, 6))
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"state 'exp_avg' of param 0 .* shape \(4, 6\)"):
        opt.step()
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)

    p = torch.nn.Parameter(torch.randn(5, 5))
    q = torch.nn.Parameter(p.detach().clone())
    ref, opt = torch.optim.Adam([p], lr=0.1), fot.Adam([q], lr=0.1)
    for o, t in ((ref, p), (opt, q)):
        for i in range(3):
            t.grad = torch.arange(25.0).reshape(5, 5) * (i + 1) - 7
            o.step()
            if i == 1:
                o.state[t]["exp_avg"].as_strided_((5, 5), (1, 5))
                o.state[t]["exp_avg_sq"].as_strided_((5, 5), (1, 5))
    _same(q, p)
    _same(opt.state[q]["exp_avg"], ref.state[p]["exp_avg"])


@pytest.mark.parametrize(
    "before, after",
    [
        ("int8", None),
        ("int8", "bfloat16"),
        ("int4", "float32"),
        ("int8", "int4"),
        ("int4", "int8"),
        ("int8", {"exp_avg": "bfloat16", "exp_avg_sq": "float32"}),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_state_dtype_switched_away_from_quantized_state(
    before: str, after: Any, layout: str
) -> None:
    """A group's ``state_dtype`` changed from a quantized kind between steps: the next step takes
    the state from its dequantized values, as it takes a float state that it converts.  (It
    raised "build it with the state_dtype that saved the state": audit E01.)  The twin holds
    those values as float32 state from the start of the switch: both steps agree bit for bit,
    parameters and state."""
    import numpy as np

    from fastoptim import functional

    torch.manual_seed(0)
    w = torch.randn(16, 32, 4, 4)  # 8192 elements: quantized
    if layout == "channels_last":
        w = w.to(memory_format=torch.channels_last)
    a = torch.nn.Parameter(w.clone())
    b = torch.nn.Parameter(w.clone())
    opt = fot.AdamW([a], lr=1e-2, state_dtype=before)
    for _ in range(2):
        a.grad = torch.randn_like(a)
        opt.step()
    twin = fot.AdamW([b], lr=1e-2)
    b.grad = torch.zeros_like(b)
    twin.step()  # (creates its float32 state; all overwritten below)
    with torch.no_grad():
        b.copy_(a)
    four = before == "int4"
    perm = (0, 2, 3, 1) if layout == "channels_last" else (0, 1, 2, 3)
    for name in ("exp_avg", "exp_avg_sq"):
        codes = opt.state[a][name]
        mem = codes if four else codes.permute(perm)  # (blocks run in the memory order)
        values = functional.dequantized(
            (np.ascontiguousarray(mem.numpy()), opt.state[a][name + "_absmax"].numpy()),
            name,
            tuple(a.permute(perm).shape),
            dtype=before,
        )
        with torch.no_grad():
            twin.state[b][name].copy_(torch.from_numpy(values).permute(np.argsort(perm).tolist()))
        twin.state[b]["step"].fill_(opt.state[a]["step"].item())
    opt.param_groups[0]["state_dtype"] = after
    twin.param_groups[0]["state_dtype"] = after
    g = torch.randn_like(a)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    _same(a, b)
    assert set(opt.state[a]) == set(twin.state[b])
    for k, v in opt.state[a].items():
        _same(v, twin.state[b][k])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_sharded_dtensor_parameters_refuse_quantized_state(kind: str, process_group: Any) -> None:
    """A DTensor (FSDP2) parameter holds a shard: quantized state, whose blocks and 4096-element
    rule follow whole parameters, is refused by the step with a ValueError naming the parameter,
    before any state is made (it raised torch's NotImplementedError "aten.fill_.Tensor does
    not have a sharding strategy registered" from inside the state's creation).  A parameter
    under 4096 elements (float32 state either way) and bfloat16 state still step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))

    def param(rows: int) -> Any:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(rows, 64), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn(rows, 64), mesh, [Shard(0)])
        return p

    small, big = param(2), param(100)
    before = [p.detach().full_tensor().clone() for p in (small, big)]
    opt = fot.AdamW([small, big], state_dtype=kind)
    with pytest.raises(ValueError, match=f"AdamW: param 1 of group 0: state_dtype '{kind}'"):
        opt.step()
    assert not opt.state
    for p, b in zip((small, big), before):
        assert torch.equal(p.detach().full_tensor(), b)
    fot.AdamW([small], state_dtype=kind).step()
    fot.AdamW([big], state_dtype="bfloat16").step()
    assert not torch.equal(big.detach().full_tensor(), before[1])


@pytest.mark.parametrize("cls", ["Adam", "NAdam", "Adafactor"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), 2.5, None])
def test_a_bad_step_count_in_one_parameters_state_changes_nothing(cls: str, bad: Any) -> None:
    """One parameter's ``state["step"]`` set to a negative, NaN, fractional or missing value:
    the step is refused naming that parameter before any update or counter moves (a negative
    one was refused by the kernel after the other parameters had been updated; a NaN one
    after the other counters had advanced; 2.5 was stepped as 3).  Put right, the next step
    is a twin's that never saw it."""

    def build() -> tuple[list[Any], Any]:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
        opt = getattr(fot, cls)(ps, lr=0.01)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps, opt

    ps, opt = build()
    twin_ps, twin = build()
    before = [p.detach().clone() for p in ps]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    good = opt.state[ps[1]]["step"]
    opt.state[ps[1]]["step"] = bad if bad is None else torch.tensor(bad)
    err = TypeError if bad is None else ValueError
    with pytest.raises(err, match=f"^{cls}(.step)?: param 1 of group 0: its state's step is"):
        opt.step()
    for p, b, s in zip(ps, before, states):
        assert torch.equal(p.detach(), b)
        for k, v in s.items():
            if p is not ps[1] or k != "step":
                assert torch.equal(opt.state[p][k], v), k
    opt.state[ps[1]]["step"] = good
    opt.step()
    twin.step()
    for p, q in zip(ps, twin_ps):
        assert torch.equal(p.detach(), q.detach())
        for k, v in twin.state[q].items():
            assert torch.equal(opt.state[p][k], v), k


def test_a_refused_step_leaves_the_masters_as_they_were() -> None:
    """bfloat16 parameters with master copies: a parameter re-pointed (``.data =``) at memory
    that overlaps another's is refused, and its master no longer follows the refused data
    first (it did: after the edit was undone the run differed from a twin's)."""

    def build() -> tuple[Any, list[Any], Any]:
        torch.manual_seed(0)
        buf = torch.randn(24).bfloat16()
        a = torch.nn.Parameter(torch.randn(3, 5).bfloat16())
        v = torch.nn.Parameter(buf[:12].view(3, 4))
        w = torch.nn.Parameter(buf[12:].view(3, 4))
        opt = fot.Adam([a, v, w], lr=0.01, master_weights=True)
        for p in (a, v, w):
            p.grad = torch.randn(p.shape).bfloat16()
        opt.step()
        for p in (a, v, w):
            p.grad = torch.randn(p.shape).bfloat16()
        return buf, [a, v, w], opt

    buf, ps, opt = build()
    _, twin_ps, twin = build()
    a = ps[0]
    old, master = a.data, opt.state[a]["master"].clone()
    a.data = buf[:15].view(3, 5)  # (overlaps v)
    with pytest.raises(ValueError, match="shares memory with param 0 of group 0"):
        opt.step()
    assert torch.equal(opt.state[a]["master"], master)
    a.data = old
    opt.step()
    twin.step()
    for p, q in zip(ps, twin_ps):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["master"], twin.state[q]["master"])


def test_malformed_state_dicts_change_nothing() -> None:
    """``load_state_dict`` with a parameter's state that is not a dict, a ``state`` that is
    a list, ``param_groups`` that are not a list of dicts: a ValueError naming it, nothing
    loaded (``state[0] = 5`` was loaded, then every step raised AttributeError)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4))
    opt = fot.Adam([a])
    a.grad = torch.ones(4)
    opt.step()
    good = opt.state_dict()
    state = {k: v.clone() for k, v in opt.state[a].items()}
    for sd, match in (
        ({**good, "state": {0: 5}}, "the state of param 0 of group 0 must be a dict, got int"),
        ({**good, "state": []}, "'state' must be a dict"),
        ({**good, "param_groups": 3}, "'param_groups' is a list of dicts"),
        ({"state": {}}, "'param_groups' is a list of dicts"),
        (5, "expected a dict"),
    ):
        with pytest.raises(ValueError, match=re.escape(match)):
            opt.load_state_dict(sd)  # type: ignore[arg-type]
        assert set(opt.state[a]) == set(state)
        assert all(torch.equal(opt.state[a][k], v) for k, v in state.items())
    opt.step()


@pytest.mark.parametrize("lr, err, match", [(None, TypeError, "lr must be a number"),
                                            (1e300, ValueError, "overflows a float")])  # fmt: skip
def test_schedule_free_lr_errors_are_named(lr: Any, err: type, match: str) -> None:
    """Schedule-Free's averages were computed before its group was checked: lr=None raised
    float()'s TypeError, lr=1e300 Python's OverflowError (34, 'Numerical result out of
    range'); now the optimizer's words, nothing advanced."""
    a = torch.nn.Parameter(torch.randn(4))
    opt = fot.AdamWScheduleFree([a])
    a.grad = torch.ones(4)
    opt.step()
    k = opt.param_groups[0]["k"]
    opt.param_groups[0]["lr"] = lr
    with pytest.raises(err, match=match):
        opt.step()
    assert opt.param_groups[0]["k"] == k


def test_state_that_cannot_be_stepped_is_named() -> None:
    """A sparse state tensor (set in ``opt.state`` or loaded) and a state that is not a dict:
    refused in the optimizer's words, naming the parameter and the entry (torch's "Cannot
    access data pointer of Tensor that doesn't have storage", an AttributeError, and a
    loaded one torch's "copy_() between dense and sparse Tensors"), nothing changed."""

    def build() -> tuple[Any, Any]:
        a = torch.nn.Parameter(torch.randn(4, 3))
        opt = fot.Adam([a])
        a.grad = torch.ones(4, 3)
        opt.step()
        return a, opt

    a, opt = build()
    before = a.detach().clone()
    opt.state[a]["exp_avg"] = opt.state[a]["exp_avg"].to_sparse()
    with pytest.raises(TypeError, match=r"of group 0: its state's 'exp_avg' is a torch\.sp"):
        opt.step()
    assert torch.equal(a.detach(), before)
    a, opt = build()
    opt.state[a] = 5  # type: ignore[assignment]
    with pytest.raises(TypeError, match="the state of param 0 of group 0 must be a dict, got int"):
        opt.step()
    a, opt = build()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to_sparse()
    state = {k: v.clone() for k, v in opt.state[a].items()}
    with pytest.raises(ValueError, match=r"of group 0: its state's 'exp_avg' is a torch\.s"):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[a][k], v) for k, v in state.items())


# ------------------------------------------------- torch.distributed.checkpoint (DCP)
_DCP_SINGLE = "ignore:torch.distributed is disabled:UserWarning"  # (DCP without a group)


def _dcp_run(steps: int, dcp_first: bool = False) -> tuple[Any, Any, list[float]]:
    from fastoptim import schedules

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = fot.AdamW(
        model.parameters(), lr=schedules.warmup_cosine(1e-2, warmup_steps=3, total_steps=10)
    )
    if dcp_first:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        get_optimizer_state_dict(model, opt)
    return model, opt, _dcp_train(model, opt, steps)


def _dcp_train(model: Any, opt: Any, steps: int, start: int = 0) -> list[float]:
    lrs = []
    for t in range(start, start + steps):
        opt.zero_grad()
        model(torch.full((3, 4), 1.0 + t)).square().sum().backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.filterwarnings(_DCP_SINGLE)
def test_dcp_state_initialisation_keeps_the_schedules() -> None:
    """DCP's get_optimizer_state_dict / get_state_dict / set_state_dict on an optimizer without
    state set every lr to 0, step with zero gradients, and put the lr back: the schedules stay
    (an assigned lr replaced its schedule by a constant: the run went on at lr 0 from a warmup
    starting at 0), at the same update; the step's state stays, as torch.optim's (each
    parameter's step is 1)."""
    model, opt, _ = _dcp_run(0, dcp_first=True)
    assert list(opt.schedules(0)) == ["lr"] and opt.step_count == 0
    assert opt.param_groups[0]["lr"] == 0.0  # (warmup_cosine's value at update 0)
    assert all(float(opt.state[p]["step"]) == 1 for p in model.parameters())
    _, _, plain = _dcp_run(5)
    _, _, after = _dcp_run(5, dcp_first=True)
    assert after == plain


@pytest.mark.filterwarnings(_DCP_SINGLE)
def test_dcp_save_and_load_resume_a_scheduled_run(tmp_path: Any) -> None:
    """The usual DCP resume (a fresh model and optimizer, get_state_dict as dcp.load's target,
    set_state_dict): the schedules and the run continue as if never stopped, bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    model, _, lrs = _dcp_run(6)
    for full in (False, True):
        options = StateDictOptions(full_state_dict=full)
        first, opt1, head = _dcp_run(3)
        msd, osd = get_state_dict(first, opt1, options=options)
        where = tmp_path / f"ckpt{int(full)}"
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(where))
        again, opt2, _ = _dcp_run(0)
        msd2, osd2 = get_state_dict(again, opt2, options=options)
        target = {"model": msd2, "optim": osd2}
        dcp.load(target, checkpoint_id=str(where))
        set_state_dict(
            again,
            opt2,
            model_state_dict=target["model"],
            optim_state_dict=target["optim"],
            options=options,
        )
        assert opt2.step_count == 3 and list(opt2.schedules(0)) == ["lr"]
        tail = _dcp_train(again, opt2, 3, start=3)
        assert head + tail == lrs
        for a, b in zip(again.parameters(), model.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["NAdam", "Adam", "AdamW", "RAdam", "Adamax", "ASGD"])
def test_float64_tensor_hyperparameters_agree_to_float64_rounding(name: str) -> None:
    """A float64 tensor ``lr`` and ``betas`` on float64 parameters: torch's steps to float64
    rounding, as the README says.  (NAdam's ``mu_product``, a float32 tensor, is multiplied by
    a float64 tensor factor there: in float64, rounded once; it was multiplied in float32,
    1e-10 apart after 20 steps.)"""
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(2)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(20)]
    runs = []
    for cls in (getattr(torch.optim, name), getattr(fot, name)):
        params = [p.clone() for p in start]
        kw: dict[str, Any] = {"lr": torch.tensor(0.01, dtype=torch.float64)}
        if name != "ASGD":
            kw["betas"] = tuple(torch.tensor(b, dtype=torch.float64) for b in (0.9, 0.999))
        if cls.__module__.startswith("torch"):
            kw["foreach"] = False
        opt = cls(params, **kw)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt.state))
    (tp, ts), (fp, fs) = runs
    for a, b in zip(tp, fp):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)
    for a, b in zip(tp, fp):
        for key, value in ts[a].items():
            torch.testing.assert_close(fs[b][key], value, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("name", "switch", "key"),
    [
        ("Adam", {"amsgrad": True}, "max_exp_avg_sq"),
        ("AdamW", {"amsgrad": True}, "max_exp_avg_sq"),
        ("RMSprop", {"momentum": 0.9}, "momentum_buffer"),
        ("RMSprop", {"centered": True}, "grad_avg"),
        ("SGD", {"momentum": 0.9}, None),
    ],
)
def test_a_variant_switched_on_mid_run_starts_its_buffer_as_a_first_step(
    name: str, switch: dict[str, Any], key: str | None
) -> None:
    """torch.optim raises KeyError for the buffer it never made; fastoptim makes it as a first
    step does: the same as torch.optim given a zero buffer (SGD: none, the gradient taken)."""
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    runs = []
    for ours in (False, True):
        p = start.clone()
        opt = getattr(fot, name)([p]) if ours else getattr(torch.optim, name)([p], foreach=False)
        for t, g in enumerate(grads):
            p.grad = g.clone()
            if t == 2:
                opt.param_groups[0].update(switch)
                if not ours and key is not None:
                    opt.state[p][key] = torch.zeros_like(p)
            opt.step()
        runs.append((p, opt.state[p]))
    (tp, ts), (fp, fs) = runs
    torch.testing.assert_close(fp, tp, rtol=1e-14, atol=1e-15)
    assert set(fs) == set(ts)
    for k, v in ts.items():
        torch.testing.assert_close(fs[k], v, rtol=1e-13, atol=1e-14)


def test_nesterov_made_invalid_mid_run_raises_and_changes_nothing() -> None:
    p = torch.ones(3)
    opt = fot.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    p.grad = torch.ones(3)
    opt.step()
    for change in ({"momentum": 0.0}, {"dampening": 0.5}):
        group = opt.param_groups[0]
        before, buf = p.clone(), opt.state[p]["momentum_buffer"].clone()
        saved = {k: group[k] for k in change}
        group.update(change)
        with pytest.raises(ValueError, match="nesterov=True requires momentum > 0 and dampening"):
            opt.step()
        assert torch.equal(p, before) and torch.equal(opt.state[p]["momentum_buffer"], buf)
        group.update(saved)


def test_nadam_betas_tensors_that_require_grad() -> None:
    """NAdam's factor from ``betas`` tensors that require grad: read without torch's warning
    about converting such a tensor to a number (an error where warnings are: the step then
    stopped half done), as torch.optim.NAdam reads them."""
    start = torch.linspace(-1, 1, 6, dtype=torch.float64)
    runs = []
    for cls in (torch.optim.NAdam, fot.NAdam):
        p = start.clone()
        betas = tuple(torch.tensor(b, dtype=torch.float64, requires_grad=True) for b in (0.9, 0.99))
        opt = cls([p], lr=0.01, betas=betas)
        for t in range(3):
            p.grad = torch.full_like(p, 0.5 - t)
            opt.step()
        runs.append((p, opt.state[p]["mu_product"]))
    (tp, tm), (fp, fm) = runs
    assert torch.equal(fm, tm)
    torch.testing.assert_close(fp, tp, rtol=1e-14, atol=1e-15)
