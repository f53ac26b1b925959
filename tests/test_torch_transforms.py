"""fastoptim.torch's gradient transforms against torch: clip_grad_norm_ / clip_grad_value_
before a torch.optim step, torch.amp.GradScaler (torch.optim unscales in a pass of its own;
fastoptim.torch takes the scale into the update, as torch's fused optimizers) and the EMA of
torch.optim.swa_utils.  (Clipping across processes: test_distributed.py, with MPI.)"""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as ft  # noqa: E402
from cases import SPARSE_ONLY, Case, each_case, one_per_optimizer  # noqa: E402

TORCH_CASES = [
    c for c in one_per_optimizer() if hasattr(torch.optim, c.opt) and c.opt not in SPARSE_ONLY
]


def _model(dtype: Any = torch.float32) -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)).to(
        dtype
    )


def _data(dtype: Any = torch.float32) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 12, generator=g, dtype=dtype), torch.randn(64, 3, generator=g,
                                                                       dtype=dtype)  # fmt: skip


def _close(m1: Any, m2: Any, rtol: float, atol: float) -> None:
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda s, n=name: f"{n}: {s}")


@each_case(TORCH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("clip", ["norm", "value", "both"])
def test_clipping_matches_torch(case: Case, dtype: Any, clip: str) -> None:
    if case.fastoptim_only:
        pytest.skip("fastoptim's own option")
    X, y = _data(dtype)
    m1, m2 = _model(dtype), _model(dtype)
    o1 = getattr(torch.optim, case.opt)(m1.parameters(), **case.kwargs)
    opts: dict[str, Any] = {}
    if clip in ("norm", "both"):
        opts["max_grad_norm"] = 0.2
    if clip in ("value", "both"):
        opts["max_grad_value"] = 0.01
    o2 = getattr(ft, case.opt)(m2.parameters(), **case.kwargs, **opts)
    for _ in range(8):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(X), y).backward()
        if "max_grad_value" in opts:
            torch.nn.utils.clip_grad_value_(m1.parameters(), 0.01)
        norm = None
        if "max_grad_norm" in opts:
            norm = float(torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.2))
        o1.step()
        o2.step()
        if norm is not None:
            assert o2.grad_norm is not None
            assert abs(o2.grad_norm - norm) <= (1e-6 if dtype == torch.float32 else 1e-12) * norm
        else:
            assert o2.grad_norm is None
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    _close(m1, m2, tol, tol)


@pytest.mark.parametrize("opt", ["Adam", "AdamW", "SGD", "RMSprop"])
@pytest.mark.parametrize("unscale", [False, True], ids=["fused", "unscaled-and-clipped"])
def test_grad_scaler_matches_torch(opt: str, unscale: bool) -> None:
    """GradScaler with an overflowing step: torch.optim (GradScaler unscales the gradients)
    and fastoptim.torch (the scale folded into the step; or, when the user unscales to clip,
    only found_inf) skip the same step and end equal."""
    X, y = _data()
    m1, m2 = _model(), _model()
    kw = dict(lr=0.01, momentum=0.9) if opt in ("SGD", "RMSprop") else dict(lr=0.01)
    o1 = getattr(torch.optim, opt)(m1.parameters(), **kw)
    o2 = getattr(ft, opt)(m2.parameters(), **kw)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(8):
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(X), y)
            if step == 3:
                loss = loss * math.inf
            s.scale(loss).backward()
            if unscale:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            s.step(o)
            s.update()
        assert s1.get_scale() == s2.get_scale()
        assert o2.step_skipped == (step == 3)
    assert not hasattr(o2, "grad_scale") and not hasattr(o2, "found_inf")
    _close(m1, m2, 2e-5, 2e-5)
    p = next(m2.parameters())
    if "step" in o2.state[p]:
        assert float(o2.state[p]["step"]) == float(o1.state[next(m1.parameters())]["step"]) == 7


def test_ema_matches_swa_utils() -> None:
    """ema_decay against torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn, created
    (copying the parameters) before training and updated after each step."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    X, y = _data()
    m1, m2 = _model(), _model()
    o1 = torch.optim.AdamW(m1.parameters(), lr=0.01)
    avg = AveragedModel(m1, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    avg.update_parameters(m1)  # (its first call copies)
    o2 = ft.AdamW(m2.parameters(), lr=0.01, ema_decay=0.9)
    for _ in range(6):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(X), y).backward()
            o.step()
        avg.update_parameters(m1)
    _close(m1, m2, 2e-5, 2e-5)
    for a, p in zip(avg.module.parameters(), m2.parameters()):
        torch.testing.assert_close(o2.state[p]["ema"], a.detach(), rtol=2e-5, atol=2e-6)
    before = [p.detach().clone() for p in m2.parameters()]
    with o2.ema_weights():
        for a, p in zip(avg.module.parameters(), m2.parameters()):
            torch.testing.assert_close(p.detach(), a.detach(), rtol=2e-5, atol=2e-6)
    for b, p in zip(before, m2.parameters()):
        assert torch.equal(b, p.detach())
    with o2.ema_weights():
        o2.state_dict()  # anything but a step may run inside
        with pytest.raises(RuntimeError, match="inside ema_weights"):
            o2.step()
    for b, p in zip(before, m2.parameters()):
        assert torch.equal(b, p.detach())


def test_skip_nonfinite_changes_nothing() -> None:
    X, y = _data()
    m = _model()
    o = ft.Adam(m.parameters(), lr=0.01, skip_nonfinite=True, ema_decay=0.5)
    for _ in range(2):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(X), y).backward()
        o.step()
    before = [p.detach().clone() for p in m.parameters()]
    state = {id(p): {k: v.clone() for k, v in o.state[p].items()} for p in m.parameters()}
    o.zero_grad()
    (torch.nn.functional.mse_loss(m(X), y) * math.nan).backward()
    o.step()
    assert o.step_skipped
    for b, p in zip(before, m.parameters()):
        assert torch.equal(b, p.detach())
        for k, v in state[id(p)].items():
            assert torch.equal(v, o.state[p][k]), k


@pytest.mark.parametrize(
    ("opt", "kw"),
    [
        ("Rprop", dict(lr=0.01)),  # step_size starts at the lr of the step that creates it
        ("ASGD", dict(lr=0.01)),  # eta likewise
        ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),  # the buffer starts as the grad
        ("AdamW", dict(lr=0.01, state_dtype="bfloat16")),
    ],
)
@pytest.mark.parametrize("how", ["found_inf", "skip_nonfinite", "refused"])
def test_first_step_skipped_or_refused_creates_no_state(opt: str, kw: Any, how: str) -> None:
    """torch.optim creates its state at the first step that runs (GradScaler does not call a
    step it skips): a first step skipped (GradScaler's found_inf, skip_nonfinite) or refused
    leaves no state, and the run then follows torch.optim's, through a checkpoint taken right
    after the skip too, with the lr changing every iteration (as a scheduler does)."""
    X, y = _data()
    m1, m2 = _model(), _model()
    torch_kw = {k: v for k, v in kw.items() if k != "state_dtype"}

    def groups(m: Any) -> list[dict[str, Any]]:  # (two: the second refused)
        params = list(m.parameters())
        return [{"params": params[:-1]}, {"params": params[-1:]}]

    o1 = getattr(torch.optim, opt)(groups(m1), **torch_kw)
    extra = dict(skip_nonfinite=True) if how == "skip_nonfinite" else {}
    o2 = getattr(ft, opt)(groups(m2), **kw, **extra)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    o2.zero_grad()
    loss = torch.nn.functional.mse_loss(m2(X), y) * math.inf
    (s2.scale(loss) if how == "found_inf" else loss).backward()
    if how == "found_inf":
        s2.step(o2)
        assert o2.step_skipped
    elif how == "skip_nonfinite":
        o2.step()
        assert o2.step_skipped
    else:
        o2.param_groups[1]["lr"] = -1.0  # (refused after the first group's state is built)
        with pytest.raises(ValueError, match="lr"):
            o2.step()
        o2.param_groups[1]["lr"] = kw["lr"]
    assert len(o2.state) == 0
    saved = o2.state_dict()
    assert saved["state"] == {}
    o2 = getattr(ft, opt)(groups(m2), **kw)  # resumed from that checkpoint
    o2.load_state_dict(saved)
    for _ in range(5):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(X), y).backward()
            o.step()
            for g in o.param_groups:
                g["lr"] *= 0.5
    tol = 1e-2 if "state_dtype" in kw else 2e-6
    _close(m1, m2, tol, tol)
    if "state_dtype" not in kw:
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            for k, v in o1.state[p1].items():
                torch.testing.assert_close(o2.state[p2][k], v, rtol=2e-6, atol=2e-6)


def test_bf16_model_with_clipping_and_ema_matches_fp32_reference_run() -> None:
    """A bfloat16 model with master weights: clipping and the EMA run on the float32 masters
    (the norm is taken from the bfloat16 gradients)."""
    X, y = _data()
    m = _model(torch.bfloat16)
    o = ft.AdamW(m.parameters(), lr=0.01, master_weights=True, max_grad_norm=0.5, ema_decay=0.9)
    for _ in range(3):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(X.bfloat16()).float(), y).backward()
        want = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in m.parameters()))
        o.step()
        assert o.grad_norm is not None and abs(o.grad_norm - want) <= 1e-6 * want
    for p in m.parameters():
        assert o.state[p]["ema"].dtype == torch.float32
        assert o.state[p]["master"].dtype == torch.float32


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (dict(), dict(state_dtype="int8")),  # float32 state quantized
        (dict(), dict(state_dtype="int4")),
        (dict(state_dtype="int8"), dict(state_dtype="int4")),  # requantized
        (dict(state_dtype="int4"), dict(state_dtype=None)),  # dequantized
        (dict(), dict(state_dtype="bfloat16")),  # moved to another dtype
        (dict(state_dtype="bfloat16"), dict(state_dtype={"exp_avg": "int8"})),
        (dict(kahan=True), dict(kahan=False)),  # its compensation dropped
    ],
)
@pytest.mark.parametrize("how", ["found_inf", "skip_nonfinite", "refused"])
def test_a_step_that_does_not_run_converts_no_state(
    before: dict[str, Any], after: dict[str, Any], how: str
) -> None:
    """A step skipped (GradScaler's found_inf, skip_nonfinite) or refused (a bad lr in another
    group) after a group's precision policy changed leaves every state entry as it was (the
    same tensors, the same bits: the float state was quantized, or the codes dequantized, in
    place and kept: later steps failed for want of scales, or read codes as moments), and
    the run then follows a twin that never saw that step, bit for bit."""
    big = 4096 + 904  # (quantized: 4096 elements or more)
    dtype = torch.bfloat16 if "kahan" in before else torch.float32
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(big, generator=g).to(dtype), torch.randn(big, generator=g).to(dtype)]
    grads = [[torch.randn(big, generator=g).to(dtype) for _ in init] for _ in range(4)]

    def build() -> tuple[list[torch.nn.Parameter], Any]:
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": ps[:1], **before}, {"params": ps[1:]}]
        extra = dict(skip_nonfinite=True) if how == "skip_nonfinite" else {}
        opt = ft.AdamW(groups, lr=1e-2, **extra)
        for p, gr in zip(ps, grads[0]):
            p.grad = gr.clone()
        opt.step()
        opt.param_groups[0].update(after)
        return ps, opt

    ps, opt = build()
    twin_ps, twin = build()
    held = {k: (v, v.clone()) for k, v in opt.state[ps[0]].items()}
    for p, gr in zip(ps, grads[1]):
        p.grad = gr.clone()
    params = [p.detach().clone() for p in ps]
    if how == "refused":
        opt.param_groups[1]["lr"] = -1.0
        with pytest.raises(ValueError, match="invalid lr"):
            opt.step()
        opt.param_groups[1]["lr"] = 1e-2
    else:
        ps[1].grad[5] = math.inf
        if how == "found_inf":
            scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
            scaler.scale(torch.ones(()))  # (as a scaled loss would: the scale is made)
            scaler.step(opt)  # (unscale_ finds the inf: the step is skipped)
        else:
            opt.step()
        assert opt.step_skipped
    assert sorted(opt.state[ps[0]]) == sorted(held)
    for k, (tensor, bits) in held.items():
        assert opt.state[ps[0]][k] is tensor, k
        assert _same_bits(tensor, bits), k
    for p, q in zip(ps, params):
        assert _same_bits(p.detach(), q)
    for gs in grads[1:]:
        for o, qs in ((opt, ps), (twin, twin_ps)):
            for p, gr in zip(qs, gs):
                p.grad = gr.clone()
            o.step()
    for p, q in zip(ps, twin_ps):
        assert _same_bits(p.detach(), q.detach())
    for k, v in twin.state[twin_ps[0]].items():
        assert _same_bits(opt.state[ps[0]][k], v), k


@pytest.mark.parametrize("how", ["found_inf", "lr 0"])
def test_masters_survive_a_switch_from_stochastic_to_nearest_rounding(how: str) -> None:
    """bfloat16 parameters with master copies written with stochastic rounding are either value
    around their masters; after ``rounding="nearest"`` the follow rule took those for edits
    and overwrote about a quarter of the masters (at a step GradScaler skipped, too, which
    did not put them back).  Now the masters keep their bits: after a skipped step, and
    after a step with lr 0."""
    g = torch.Generator().manual_seed(4)
    init = torch.randn(1000, generator=g).to(torch.bfloat16)
    grads = [torch.randn(1000, generator=g).to(torch.bfloat16) for _ in range(3)]
    w = torch.nn.Parameter(init.clone())
    opt = ft.AdamW([w], lr=1e-2, master_weights=True, rounding="stochastic")
    for gr in grads[:2]:
        w.grad = gr.clone()
        opt.step()
    master = opt.state[w]["master"]
    before = master.clone()
    opt.param_groups[0]["rounding"] = "nearest"
    if how == "found_inf":
        w.grad = grads[2].clone()
        w.grad[3] = math.inf
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        scaler.scale(torch.ones(()))
        scaler.step(opt)
        assert opt.step_skipped
    else:
        opt.param_groups[0]["lr"] = 0.0
        opt.param_groups[0]["weight_decay"] = 0.0
        w.grad = grads[2].clone()
        opt.step()
    assert opt.state[w]["master"] is master
    assert _same_bits(master, before)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether tensors `a` and `b` hold the same bytes (0-d ones too; NaNs compared bitwise)."""
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
