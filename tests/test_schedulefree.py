"""Schedule-Free AdamW / SGD: against the ``schedulefree`` package (skipped when it is not
installed), train() / eval() in every precision layout, and checkpoints in eval mode.

The oracle is the package's ``AdamWScheduleFree`` / ``SGDScheduleFree`` (its for-loop path,
``foreach=False``), the classes whose names and maths fastoptim follows: the paper's algorithm
written in y and z (the package's ``...Reference`` classes store x and y too, with the same
maths; ``AdamWScheduleFreePaper`` folds the bias correction into the learning rate instead).
The table's Schedule-Free rows (``cases.CASES``) run for 60 steps with a learning-rate change
halfway and an eval() / train() round trip every 10 steps, in float32 and float64, on
test_torch_optim.py's mixed layouts; parameters (in train and in eval mode), every state tensor
and the group's running scalars are compared, with test_torch_optim.py's tolerance.  The NumPy
reference (:mod:`fastoptim.reference`, the paper's x / y / z form) is checked by
test_kernels.py like every optimizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from cases import CASES, Case, Scales, check_close, each_case, every_dtype
from fastoptim import reference
from fastoptim.engine.schedulefree import SWAP_KEY

SF_CASES = [c for c in CASES if c.opt.endswith("ScheduleFree")]
STEPS = 60


# ----------------------------------------------------------------------------- the package
@every_dtype
@each_case(SF_CASES)
def test_matches_the_schedulefree_package(case: Case, dtype: Any, rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    sf = pytest.importorskip("schedulefree")
    import fastoptim.torch as fot
    from test_torch_optim import RTOL_ULPS, make_run, set_grads

    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    ours, theirs, gscales, family = make_run(rng, dtype)
    kw = dict(case.kwargs)
    maximize = kw.pop("maximize", False)  # the package has none: it descends on -g instead
    fast = getattr(fot, case.opt)(ours, maximize=maximize, **kw)
    ref = getattr(sf, case.opt)(theirs, foreach=False, **kw)
    ref.train()  # the package starts in eval mode; fastoptim in train mode
    assert fast.training
    fast.train()  # a no-op
    scales = Scales(family)
    names = ("z", "exp_avg_sq") if "AdamW" in case.opt else ("z",)

    def compare(where: str) -> None:
        for i, b in enumerate(theirs):
            scales.update(i, "param", b.detach().numpy())
            for n in names:
                scales.update(i, n, ref.state[b][n].numpy())
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert set(fast.state[a]) == set(ref.state[b]) == set(names), where
            for n in names:
                got, want = fast.state[a][n], ref.state[b][n]
                assert got.dtype == want.dtype, where
                check_close(
                    f"{where} tensor {i} {n}", got.numpy(), want.numpy(), rtol, rtol * scales(i, n)
                )
            check_close(
                f"{where} tensor {i} param",
                a.detach().numpy(),
                b.detach().numpy(),
                rtol,
                rtol * scales(i, "param"),
            )
        g, h = fast.param_groups[0], ref.param_groups[0]
        for k in ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode"):
            assert g[k] == h[k], f"{where}: {k} {g[k]!r} != {h[k]!r}"

    for t in range(1, STEPS + 1):
        if t == STEPS // 2 + 1:
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = case.kwargs["lr"] * case.new_lr_factor
        set_grads(rng, gscales, t, ours, theirs)
        if maximize:
            for b in theirs:
                b.grad.neg_()
        fast.step()
        ref.step()
        if t % 10 == 0 or t in (1, 2, 3):
            compare(f"{case.id} step {t}")
        if t % 10 == 0:  # evaluate at x, then back to y
            fast.eval()
            ref.eval()
            compare(f"{case.id} eval after step {t}")
            fast.train()
            ref.train()
            compare(f"{case.id} train after step {t}")
    assert torch.is_tensor(ours[0])


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_checkpoints_move_between_fastoptim_and_the_package(
    name: str, rng: np.random.Generator
) -> None:
    """fastoptim.torch keeps the package's state (per group k, weight_sum, lr_max, train_mode;
    per parameter z, exp_avg_sq): each loads the other's state_dict saved in eval mode, and
    both continue alike."""
    torch = pytest.importorskip("torch")
    sf = pytest.importorskip("schedulefree")
    import fastoptim.torch as fot

    p0 = torch.tensor(rng.standard_normal(300), dtype=torch.float64)
    grads = [torch.tensor(rng.standard_normal(300), dtype=torch.float64) for _ in range(8)]
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    fast = getattr(fot, name)([a], lr=0.05, warmup_steps=2)
    theirs = getattr(sf, name)([b], lr=0.05, warmup_steps=2, foreach=False)
    theirs.train()
    for g in grads[:4]:
        a.grad, b.grad = g.clone(), g.clone()
        fast.step()
        theirs.step()
    fast.eval()
    theirs.eval()
    sd_fast, sd_theirs = fast.state_dict(), theirs.state_dict()
    # crossed over: the package continues from fastoptim's checkpoint and the reverse
    a2, b2 = b.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    fast2 = getattr(fot, name)([a2], lr=0.05, warmup_steps=2)
    theirs2 = getattr(sf, name)([b2], lr=0.05, warmup_steps=2, foreach=False)
    fast2.load_state_dict(sd_theirs)
    theirs2.load_state_dict(sd_fast)
    assert not fast2.training
    for opt in (fast2, theirs2):
        opt.train()
    for g in grads[4:]:
        a2.grad, b2.grad = g.clone(), g.clone()
        fast2.step()
        theirs2.step()
    torch.testing.assert_close(a2.detach(), b2.detach(), rtol=1e-13, atol=1e-13)
    assert fast2.param_groups[0]["k"] == theirs2.param_groups[0]["k"] == 8


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("tier", ["numpy", "torch", "reference"])
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_eval_moves_to_x_and_train_back(tier: str, name: str, rng: np.random.Generator) -> None:
    """eval(): p = y + (1 - 1/beta1)(z - y) (= x); train(): p = x + (1 - beta1)(z - x); each a
    no-op when repeated; before the first step (z = y) nothing moves; step() in eval mode
    raises and changes nothing."""
    beta = 0.6  # |1 - 1/beta| >= 0.5: torch.lerp's far-end formula
    kw = dict(betas=(beta, 0.99)) if "AdamW" in name else dict(momentum=beta)
    p0 = rng.standard_normal(257)
    if tier == "torch":
        torch = pytest.importorskip("torch")
        import fastoptim.torch as fot

        t = torch.tensor(p0, requires_grad=True)
        opt = getattr(fot, name)([t], lr=0.1, **kw)
        value = lambda: t.detach().numpy().copy()  # noqa: E731
        z = lambda: opt.state[t]["z"].numpy().copy()  # noqa: E731

        def step(g: np.ndarray) -> None:
            t.grad = torch.tensor(g)
            opt.step()

    else:
        w = p0.copy()
        opt = getattr(fo if tier == "numpy" else reference, name)([w], lr=0.1, **kw)
        value = lambda: w.copy()  # noqa: E731
        z = lambda: opt.state[0]["z"].copy()  # noqa: E731

        def step(g: np.ndarray) -> None:
            opt.step([g])

    opt.eval()  # before any step: x = y = z, nothing moves
    assert not opt.training
    np.testing.assert_array_equal(value(), p0)
    with pytest.raises(RuntimeError, match=r"eval mode.*train\(\)"):
        step(rng.standard_normal(257))
    np.testing.assert_array_equal(value(), p0)
    opt.train()
    for _ in range(3):
        step(rng.standard_normal(257))
    y, zz = value(), z()
    assert not np.allclose(y, zz)
    opt.eval()
    x = value()
    np.testing.assert_allclose(x, y + (1 - 1 / beta) * (zz - y), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(x, (y - (1 - beta) * zz) / beta, rtol=1e-13, atol=1e-13)
    opt.eval()  # already there
    np.testing.assert_array_equal(value(), x)
    opt.train()
    np.testing.assert_allclose(value(), y, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(z(), zz)
    opt.train()
    opt.train(False)  # is eval()
    assert not opt.training


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_z_starts_as_the_parameter_at_its_first_step(name: str) -> None:
    """The NumPy tier allocates z when the optimizer is built, and takes the parameter's value
    again at the first step (weights loaded in place after construction count)."""
    w = np.zeros(5)
    opt = getattr(fo, name)([w], lr=0.1)
    w[...] = 3.0  # e.g. pretrained weights copied in
    opt.step([np.zeros(5)])
    np.testing.assert_array_equal(opt.state[0]["z"], np.full(5, 3.0))
    np.testing.assert_array_equal(w, np.full(5, 3.0))


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_swap_in_every_layout_is_float32_swap_then_rounding(
    name: str, rounding: str, isa: str
) -> None:
    """eval() and train() of every precision layout: bit for bit the float32 swap of the
    layout's arrays loaded into float32, rounded by the reference (stochastically with the
    swap's own random bits); master copies, Kahan compensation follow."""
    from test_precision import LAYOUTS, SHAPES, round_to, same_bits

    cls = getattr(fo, name)
    for layout, (pdt, gdt, opts) in LAYOUTS.items():
        rng = np.random.default_rng(5)
        params = [np.asarray(rng.standard_normal(s) * 2, np.float32).astype(pdt) for s in SHAPES]
        opt = cls(params, lr=0.05, **opts, rounding=rounding, seed=7)
        mirror = [np.zeros(p.shape, np.float32) for p in params]
        ref = cls(mirror, lr=0.05)
        for _ in range(2):
            grads = [np.asarray(rng.standard_normal(p.shape), np.float32) for p in params]
            opt.step([g.astype(gdt) for g in grads])
            ref.step(grads)  # (its values are overwritten below: only its z must be used)
        master = opts.get("master_weights", False)
        for train, key in ((False, SWAP_KEY + 4), (True, SWAP_KEY + 5)):
            old = [
                np.array(opt.state[i]["master"] if master else p, np.float32)
                for i, p in enumerate(params)
            ]
            comps = [np.array(opt.state[i].get("compensation", 0)) for i in range(len(params))]
            for i in range(len(params)):
                mirror[i][...] = old[i]
                ref.state[i]["z"][...] = opt.state[i]["z"].astype(np.float32)
            opt.train(train)
            ref.train(train)
            for i, p in enumerate(params):
                where = f"{layout} {'train' if train else 'eval'} param {i}"
                bits = (
                    reference.rounding_bits(pdt, 7, key, i, 0, p.size).reshape(p.shape)
                    if rounding == "stochastic"
                    else None
                )
                if opts.get("kahan"):
                    u = comps[i].astype(np.float32) + (mirror[i] - old[i])
                    stored = round_to(old[i] + u, pdt, None)
                    same_bits(p, stored, where)
                    comp = round_to(u - (stored.astype(np.float32) - old[i]), pdt, None)
                    same_bits(opt.state[i]["compensation"], comp, where)
                else:
                    same_bits(p, round_to(mirror[i], pdt, bits), where)
                if master:
                    same_bits(opt.state[i]["master"], mirror[i], f"{where} master")


def test_swap_updates_the_copy_out() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal(1000).astype(np.float32)
    out = np.zeros(1000, reference.round_to_bfloat16(np.zeros(1)).dtype)
    opt = fo.AdamWScheduleFree([w], lr=0.01)
    opt.set_copy_out([out])
    for _ in range(3):
        opt.step([rng.standard_normal(1000).astype(np.float32)])
    y = w.copy()
    opt.eval()
    assert not np.array_equal(w, y)
    np.testing.assert_array_equal(out, reference.round_to_bfloat16(w))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("via", ["state_dict", "npz"])
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_checkpoint_in_eval_mode_round_trips_bit_exactly(
    name: str, via: str, tmp_path: Any, rng: np.random.Generator
) -> None:
    """eval(), save, load into a new optimizer, train(), go on: the same bits as an optimizer
    that never saved (with a bfloat16 master-weight parameter and stochastic rounding)."""
    import ml_dtypes

    start = [
        rng.standard_normal(100).astype(np.float32),
        rng.standard_normal((3, 7)).astype(ml_dtypes.bfloat16),
    ]
    grads = [[rng.standard_normal(p.shape).astype(p.dtype) for p in start] for _ in range(8)]
    kw = dict(lr=0.02, warmup_steps=3, master_weights=True, rounding="stochastic", seed=3)

    def build(params: list[np.ndarray]) -> Any:
        return getattr(fo, name)({"a": params[0], "b": params[1]}, **kw)

    a = [p.copy() for p in start]
    opt = build(a)
    for g in grads[:4]:
        opt.step({"a": g[0], "b": g[1]})
    opt.eval()
    if via == "npz":
        fo.save(tmp_path / "ckpt.npz", opt)
    else:
        sd = opt.state_dict()
    saved_params = [p.copy() for p in a]
    opt.train()
    for g in grads[4:]:
        opt.step({"a": g[0], "b": g[1]})

    b = [p.copy() for p in saved_params]  # the model's weights saved with the checkpoint (x)
    opt2 = build([np.zeros_like(p) for p in start]) if via == "npz" else build(b)
    if via == "npz":
        opt2 = build(b)
        fo.load(tmp_path / "ckpt.npz", opt2)
    else:
        opt2.load_state_dict(sd)
    assert not opt2.training
    opt2.train()
    for g in grads[4:]:
        opt2.step({"a": g[0], "b": g[1]})
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))
    for k in opt.state:
        for n, v in opt.state[k].items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(opt2.state[k][n]))
    assert (
        opt.state_dict()["param_groups"][0]["scalars"]
        == (opt2.state_dict()["param_groups"][0]["scalars"])
    )


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_torch_checkpoint_in_eval_mode_round_trips_bit_exactly(
    name: str, rng: np.random.Generator
) -> None:
    torch = pytest.importorskip("torch")
    import io

    import fastoptim.torch as fot

    p0 = torch.tensor(rng.standard_normal(500), dtype=torch.float32)
    grads = [torch.tensor(rng.standard_normal(500), dtype=torch.float32) for _ in range(8)]
    a = p0.clone().requires_grad_()
    opt = getattr(fot, name)([a], lr=0.02, warmup_steps=3)
    for g in grads[:4]:
        a.grad = g.clone()
        opt.step()
    opt.eval()
    buf = io.BytesIO()
    torch.save({"model": a.detach().clone(), "opt": opt.state_dict()}, buf)
    opt.train()
    for g in grads[4:]:
        a.grad = g.clone()
        opt.step()
    buf.seek(0)
    ck = torch.load(buf)
    b = ck["model"].clone().requires_grad_()
    opt2 = getattr(fot, name)([b], lr=0.02, warmup_steps=3)
    opt2.load_state_dict(ck["opt"])
    assert not opt2.training
    opt2.train()
    for g in grads[4:]:
        b.grad = g.clone()
        opt2.step()
    assert torch.equal(a.detach(), b.detach())
    assert torch.equal(opt.state[a]["z"], opt2.state[b]["z"])
    assert opt.param_groups[0]["weight_sum"] == opt2.param_groups[0]["weight_sum"]


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("name", "kw", "words"),
    [
        ("AdamWScheduleFree", dict(betas=(0.0, 0.999)), "betas\\[0\\]=0.0: must be in \\(0, 1\\)"),
        ("SGDScheduleFree", dict(momentum=0.0), "momentum=0.0: must be in \\(0, 1\\)"),
        ("SGDScheduleFree", dict(momentum=1.0), "momentum"),
        ("AdamWScheduleFree", dict(warmup_steps=-1), "warmup_steps"),
        ("SGDScheduleFree", dict(weight_lr_power=float("nan")), "weight_lr_power"),
    ],
)
def test_bad_hyper_parameters(name: str, kw: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        getattr(fo, name)([np.zeros(3)], **kw)


def test_functional_returns_the_running_scalars(rng: np.random.Generator) -> None:
    """adamwschedulefree_ with the scalars it returns follows the class bit for bit."""
    from fastoptim import functional as F

    w = rng.standard_normal(50)
    p, z, v = w.copy(), w.copy(), np.zeros(50)
    opt = fo.AdamWScheduleFree([w], lr=0.01, warmup_steps=2, weight_decay=0.1)
    ws, lm = 0.0, 0.0
    for t in range(1, 6):
        g = rng.standard_normal(50)
        opt.step([g])
        ws, lm = F.adamwschedulefree_(
            p, g, z, v, step=t, weight_sum=ws, lr_max=lm, lr=0.01, warmup_steps=2,
            weight_decay=0.1,
        )  # fmt: skip
    np.testing.assert_array_equal(p, w)
    np.testing.assert_array_equal(z, opt.state[0]["z"])
    assert (ws, lm) == (opt._groups[0].hyper.weight_sum, opt._groups[0].hyper.lr_max)


@pytest.mark.re_views
@pytest.mark.parametrize("cls", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_train_checks_every_group_before_any_parameter_moves(cls: str) -> None:
    """A parameter of group 1 re-viewed in place (same memory and size, another shape): train()
    is refused, naming its z, before group 0 moves; undone, train() then moves each group once."""
    rng = np.random.default_rng(0)
    p1, p2 = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    opt = getattr(fo, cls)([{"params": [p1]}, {"params": [p2]}], lr=0.1)
    for _ in range(3):
        opt.step([rng.standard_normal(64).astype(np.float32) for _ in range(2)])
    y1, y2 = p1.copy(), p2.copy()
    opt.eval()
    x1 = p1.copy()
    p2.shape = (8, 8)
    with pytest.raises(ValueError, match=rf"{cls}.train: state 'z' of param 1: shape"):
        opt.train()
    assert np.array_equal(p1, x1) and not opt.training
    p2.shape = (64,)
    opt.train()
    np.testing.assert_allclose(p1, y1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p2, y2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tier", ["numpy", "torch"])
def test_train_and_eval_refused_inside_ema_weights(tier: str) -> None:
    """train()/eval() inside ``ema_weights()`` moved the EMA the block had put in the
    parameters, and the block's exit put the old values back under the new mode: the next step
    took its gradient at the wrong point.  Refused now (as a step is), nothing moved."""
    g = np.array([1.0, -1.0, 0.5, 2.0], np.float32)
    if tier == "numpy":
        w = np.ones(4, np.float32)
        opt: Any = fo.AdamWScheduleFree([w], lr=0.1, ema_decay=0.9)
        for _ in range(5):
            opt.step([g])
        read = w.copy
    else:
        torch = pytest.importorskip("torch")
        import fastoptim.torch as fot

        t = torch.nn.Parameter(torch.ones(4))
        opt = fot.AdamWScheduleFree([t], lr=0.1, ema_decay=0.9)
        for _ in range(5):
            t.grad = torch.from_numpy(g.copy())
            opt.step()
        read = lambda: t.detach().numpy().copy()  # noqa: E731
    for call in ("eval", "train"):
        if call == "train":
            opt.eval()
        before, mode = read(), opt.training
        with opt.ema_weights():
            with pytest.raises(RuntimeError, match=f"{call}: inside ema_weights"):
                getattr(opt, call)()
        assert opt.training == mode
        np.testing.assert_array_equal(read(), before)
