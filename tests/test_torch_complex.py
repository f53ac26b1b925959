"""``fastoptim.torch`` on complex parameters (complex64 / complex128).

torch.optim updates a complex parameter as its real view (``torch.view_as_real``: the real and
imaginary parts are independent elements, state included; SGD's arithmetic is the same on
either view), and fills a new state's real and imaginary parts alike (Adagrad's
``initial_accumulator_value``, Rprop's step sizes).  fastoptim.torch does the same: the kernels
run on the real views of the parameter, its gradient and its complex state.

Checked here: (1) every case of the shared table that torch.optim runs, in every layout,
against torch.optim's for-loop path on the same complex tensors (state compared through its
real view, the tolerance of test_torch_optim.py); (2) every case, the optimizers torch lacks
included, bit for bit against the same class run on float tensors holding the real views; (3)
LBFGS against torch's; (4) checkpoints in both directions; (5) what is refused.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as fot  # noqa: E402
from cases import (  # noqa: E402
    CASES,
    SPARSE_ONLY,
    Case,
    Scales,
    check_close,
    each_case,
    every_dtype,
    make_families,
)
from test_torch_optim import LAYOUTS, RTOL_ULPS, laid_out  # noqa: E402

PERMS = [perm for _, perm in LAYOUTS] * 2  # (two gradient families)
COMPLEX = {np.float32: np.complex64, np.float64: np.complex128}
STEPS = 40


def real(t: Any) -> np.ndarray:
    """A complex tensor's real view as a NumPy array (real and imaginary parts last)."""
    return torch.view_as_real(t.detach()).numpy() if t.is_complex() else t.detach().numpy()


def make_run(rng: np.random.Generator, dtype: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """Two identical lists of complex tensors laid out as LAYOUTS, their gradient scales and
    families (the real and imaginary parts drawn as test_torch_optim's real values)."""
    shapes = [s for s, _ in LAYOUTS]
    re, gscales, family = make_families(rng, shapes, shapes)
    im, _, _ = make_families(rng, shapes, shapes)
    values = [(a + 1j * b).astype(COMPLEX[dtype]) for a, b in zip(re, im)]
    return (
        [laid_out(v, perm) for v, perm in zip(values, PERMS)],
        [laid_out(v, perm) for v, perm in zip(values, PERMS)],
        [gscales, family],
    )


def set_grads(rng: np.random.Generator, gscales: list[np.ndarray], *groups: list[Any]) -> None:
    """New complex gradients (the same values) for every list of tensors in `groups`."""
    for i, s in enumerate(gscales):
        g = rng.standard_normal(s.shape) * s + 1j * rng.standard_normal(s.shape) * s
        for params in groups:
            p = params[i]
            p.grad = laid_out(g, PERMS[i]).to(p.dtype)


TORCH_CASES = [
    c
    for c in CASES
    if hasattr(torch.optim, c.opt) and not c.fastoptim_only and c.opt not in SPARSE_ONLY
]


@every_dtype
@each_case(TORCH_CASES)
def test_trajectory_matches_torch(case: Case, dtype: Any, rng: np.random.Generator) -> None:
    rtol = RTOL_ULPS * float(np.finfo(dtype).eps)
    ours, theirs, (gscales, family) = make_run(rng, dtype)
    ptrs = [p.data_ptr() for p in ours]
    fast = getattr(fot, case.opt)(ours, **case.kwargs)
    ref = getattr(torch.optim, case.opt)(theirs, foreach=False, **case.kwargs)
    scales = Scales(family)
    l2 = case.kwargs.get("weight_decay", 0) and not (
        case.opt == "AdamW" or case.kwargs.get("decoupled_weight_decay")
    )  # (elements driven by wd * p alone turn chaotic: see test_torch_optim.run_against_torch)
    chaotic = [np.broadcast_to((s < 1e-3)[..., None], (*s.shape, 2)) for s in gscales]
    for t in range(1, STEPS + 1):
        if t == STEPS // 2 + 1:
            for opt in (fast, ref):
                opt.param_groups[0]["lr"] = case.kwargs["lr"] * case.new_lr_factor
        set_grads(rng, gscales, ours, theirs)
        fast.step()
        ref.step()
        if t % 10 and t not in (1, 2, 3):
            continue
        for i, b in enumerate(theirs):
            scales.update(i, "param", real(b))
            for n, want in ref.state[b].items():
                if isinstance(want, torch.Tensor) and want.dim():
                    scales.update(i, n, real(want))
        for i, (a, b) in enumerate(zip(ours, theirs)):
            mask = chaotic[i] if l2 and t > 10 else None
            where = f"{case.id} step {t} tensor {i}"
            sa, sb = fast.state[a], ref.state[b]
            assert set(sa) == set(sb), f"{where}: state names {sorted(sa)} != {sorted(sb)}"
            for n, want in sb.items():
                got = sa[n]
                assert got.dtype == want.dtype and got.shape == want.shape, f"{where} {n}"
                if n in ("step", "mu_product", "eta", "mu"):
                    assert float(got) == pytest.approx(float(want), rel=4 * rtol), f"{where} {n}"
                elif want.dim():
                    atol = rtol * scales(i, n)
                    check_close(f"{where} {n}", real(got), real(want), rtol, atol, mask)
            check_close(f"{where} param", real(a), real(b), rtol, rtol * scales(i, "param"), mask)
    assert [p.data_ptr() for p in ours] == ptrs  # updated in place
    assert all(p.dtype == torch.complex64 or dtype is np.float64 for p in ours)


@each_case([c for c in CASES if c.opt not in SPARSE_ONLY])
def test_same_bits_as_the_real_view(case: Case, rng: np.random.Generator) -> None:
    """A complex parameter is updated exactly as a float tensor holding its real view (the
    same layout: the kernels see the same elements in the same order)."""
    ours, _, (gscales, _) = make_run(rng, np.float32)
    twins = [torch.view_as_real(z).clone() for z in ours]  # (clone keeps the strides)
    fast = getattr(fot, case.opt)(ours, **case.kwargs)
    ref = getattr(fot, case.opt)(twins, **case.kwargs)
    for _ in range(12):
        set_grads(rng, gscales, ours)
        for z, w in zip(ours, twins):
            w.grad = torch.view_as_real(z.grad).clone()
        fast.step()
        ref.step()
    for i, (z, w) in enumerate(zip(ours, twins)):
        np.testing.assert_array_equal(real(z), w.numpy(), err_msg=f"{case.id} param {i}")
        for n, s in ref.state[w].items():
            got = fast.state[z][n]
            if s.dim():
                assert got.dtype == z.dtype, f"{case.id} {n}: {got.dtype}"
                np.testing.assert_array_equal(real(got), s.numpy(), err_msg=f"{case.id} {n}")
            else:
                assert float(got) == float(s), f"{case.id} {n}"


@every_dtype
def test_lbfgs_matches_torch(dtype: Any, rng: np.random.Generator) -> None:
    """LBFGS on a complex least-squares problem: bit for bit fastoptim's LBFGS on the real
    view, and torch's LBFGS (which flattens the real views too) to test_lbfgs.py's tolerance
    relative to the largest value."""
    ctype = torch.complex64 if dtype is np.float32 else torch.complex128
    a = torch.tensor(rng.standard_normal((6, 4)) + 1j * rng.standard_normal((6, 4)), dtype=ctype)
    y = torch.tensor(rng.standard_normal(6) + 1j * rng.standard_normal(6), dtype=ctype)

    def run(cls: Any, as_complex: bool) -> tuple[list[float], np.ndarray]:
        z = torch.zeros(4, dtype=ctype)
        z = (z if as_complex else torch.view_as_real(z).clone()).requires_grad_()
        opt = cls([z], lr=0.5, max_iter=5, line_search_fn="strong_wolfe")

        def closure() -> Any:
            opt.zero_grad()
            loss = (a @ (z if as_complex else torch.view_as_complex(z)) - y).abs().square().sum()
            loss.backward()
            return loss

        losses = [float(torch.as_tensor(opt.step(closure)).detach()) for _ in range(3)]
        return losses, real(z).copy()

    want_losses, want = run(torch.optim.LBFGS, True)
    got_losses, got = run(fot.LBFGS, True)
    twin_losses, twin = run(fot.LBFGS, False)
    assert twin_losses == got_losses and np.array_equal(twin, got)
    rtol = 1e-3 if dtype is np.float32 else 1e-8  # (an ulp here and there, amplified)
    np.testing.assert_allclose(got_losses, want_losses, rtol=rtol)
    assert np.abs(got - want).max() <= rtol * np.abs(want).max()
    assert want_losses[-1] < want_losses[0] and np.abs(want).max() > 0.01  # (it moved)


@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("Adam", {"amsgrad": True}), ("Adagrad", {"initial_accumulator_value": 0.3}), ("Rprop", {})],
)
def test_checkpoints_move_between_torch_and_ours(
    name: str, kwargs: dict[str, Any], direction: str
) -> None:
    """A complex model's checkpoint saved by one loads into the other (complex state, through
    torch.save), and both continue alike."""
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(5, 3, dtype=torch.complex64, generator=gen)
    grads = [torch.randn(5, 3, dtype=torch.complex64, generator=gen) for _ in range(6)]
    first, second = (torch.optim, fot) if direction == "torch-to-ours" else (fot, torch.optim)
    za = z0.clone().requires_grad_()
    oa = getattr(first, name)([za], lr=0.01, **kwargs)
    for g in grads[:3]:
        za.grad = g.clone()
        oa.step()
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    zb = za.detach().clone().requires_grad_()
    ob = getattr(second, name)([zb], lr=0.01, **kwargs)
    ob.load_state_dict(torch.load(buf, weights_only=True))
    for g in grads[3:]:
        za.grad, zb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for n, s in oa.state[za].items():
        assert ob.state[zb][n].dtype == s.dtype, n
        np.testing.assert_allclose(real(ob.state[zb][n]), real(s), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(real(zb), real(za), rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_refused_with_nothing_changed() -> None:
    z = torch.randn(4, 3, dtype=torch.complex64)
    for cls in (fot.Muon, fot.Adafactor):
        with pytest.raises(TypeError, match=f"{cls.__name__} does not support complex parameters"):
            cls([z])
    with pytest.raises(ValueError, match="SparseAdam does not support complex parameters"):
        fot.SparseAdam([z])
    with pytest.raises(TypeError, match="complex32"):
        fot.Adam([torch.zeros(3, dtype=torch.complex32)])
    with pytest.raises(TypeError, match=r"param 0 of group 0 is a conjugate view.*resolve_conj"):
        fot.Adam([z.conj()])

    def refused(opt: Any, params: list[Any], error: Any, match: str) -> None:
        before = [p.detach().clone() for p in params]
        states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
        with pytest.raises(error, match=match):
            opt.step()
        for p, b in zip(params, before):
            assert torch.equal(p, b)
            assert {k: v for k, v in opt.state[p].items()}.keys() == states[id(p)].keys()
            for k, v in opt.state[p].items():
                assert torch.equal(v, states[id(p)][k]), k

    w, z = torch.randn(3), torch.randn(4, 3, dtype=torch.complex64)
    opt = fot.Adam([w, z], lr=0.1, state_dtype="bfloat16")
    w.grad, z.grad = torch.ones(3), torch.ones(4, 3, dtype=torch.complex64)
    refused(
        opt, [w, z], TypeError, r"param 1 of group 0 is complex64: .* not state_dtype='bfloat16'"
    )
    opt.param_groups[0]["state_dtype"] = None
    opt.step()  # (a float policy: taken)
    assert z.grad is not None and opt.state[z]["exp_avg"].dtype == torch.complex64
    z.grad = torch.eye(4, 3, dtype=torch.complex64).to_sparse()
    refused(opt, [w, z], RuntimeError, "does not support sparse gradients")
    sgd = fot.SGD([w, z], lr=0.1)
    z.grad = torch.eye(4, 3, dtype=torch.complex64).to_sparse()
    refused(sgd, [w, z], TypeError, "complex64; sparse gradients update floating-point parameters")
    with pytest.raises(TypeError, match="set_copy_out: param 1 is complex64"):
        opt.set_copy_out([None, torch.zeros(4, 3, dtype=torch.bfloat16)])


def test_conjugate_gradient_and_state_are_read_as_values() -> None:
    """A gradient with the conjugate bit (its memory holds conj(g)) is read as g; a state
    tensor with it is replaced by a resolved copy."""
    z0 = torch.randn(6, dtype=torch.complex64)
    g = torch.randn(6, dtype=torch.complex64)
    runs = []
    for conj in (False, True):
        z = z0.clone()
        opt = fot.SGD([z], lr=0.1, momentum=0.9)
        z.grad = g.conj().resolve_conj().conj() if conj else g.clone()
        assert z.grad.is_conj() == conj
        opt.step()
        buf = opt.state[z]["momentum_buffer"]
        if conj:
            opt.state[z]["momentum_buffer"] = buf.conj().resolve_conj().conj()
        z.grad = g.clone()
        opt.step()
        runs.append((z, opt.state[z]["momentum_buffer"]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert not runs[1][1].is_conj()


def test_storage_changed_between_real_and_complex_refused() -> None:
    """A parameter whose storage became complex (or real: ``p.data =``) keeps a state of the
    other kind: refused naming it, nothing changed (copying it would drop the imaginary half,
    or start it at 0 where a new complex state starts at complex(v, v)); torch.optim fails
    there too."""
    for before, after in ((torch.complex64, torch.float32), (torch.float32, torch.complex64)):
        p = torch.randn(3, dtype=before)
        opt = fot.Rprop([p], lr=0.01)
        p.grad = torch.randn(3, dtype=before)
        opt.step()
        p.data = torch.randn(3, dtype=after)
        p.grad = torch.randn(3, dtype=after)
        kept = p.detach().clone()
        state = {k: v.clone() for k, v in opt.state[p].items()}
        with pytest.raises(ValueError, match=r"state 'prev' of param 0 of group 0 is "):
            opt.step()
        assert torch.equal(p, kept)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
        del opt.state[p]  # (what the message says: a new state, filled as torch fills it)
        opt.step()
        assert opt.state[p]["step_size"].dtype == after


def test_negative_view_state_read_by_value() -> None:
    """A state tensor that is a negative view (its memory holds -s) is replaced by a copy of
    its values before the step uses it (it made the step fail in numpy())."""
    runs = []
    for neg in (False, True):
        p = torch.ones(4)
        opt = fot.SGD([p], lr=0.1, momentum=0.9)
        p.grad = torch.ones(4)
        opt.step()
        if neg:
            buf = opt.state[p]["momentum_buffer"]
            opt.state[p]["momentum_buffer"] = torch._neg_view(-buf)
        opt.step()
        runs.append((p.clone(), opt.state[p]["momentum_buffer"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_fast_path_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Complex parameters take the fast path too (Plan.bind_torch binds their real views):
    with nothing changed but the gradients, no step rechecks the group in Python (a gradient
    that is a view of a bigger buffer included, as DDP's bucket views are; not a conjugate
    one, whose memory holds conj(g))."""
    if not fot._FAST:
        pytest.skip("torch has no DLPack exchange API: every step takes the general path")
    params = [
        torch.zeros(8, dtype=torch.complex64),
        torch.zeros(3, 5, dtype=torch.complex128).t(),  # (transposed)
        torch.zeros(4),
        torch.zeros(6, dtype=torch.complex64),
    ]
    opt = fot.AdamW(params, lr=0.1)
    calls = []
    sig = fot.Optimizer._sig
    monkeypatch.setattr(fot.Optimizer, "_sig", lambda *a: calls.append(1) or sig(*a))
    for t in range(6):
        for p in params[:3]:
            p.grad = torch.ones_like(p)
        params[3].grad = torch.ones(10, dtype=torch.complex64)[2:8]  # (a view)
        opt.step()
        if t == 1:
            calls.clear()
    assert calls == []
    params[3].grad = torch.ones(6, dtype=torch.complex64).conj()  # (read by value: in Python)
    opt.step()
    assert calls


def test_changes_between_steps_as_the_real_view(fast: bool) -> None:
    """Gradients that change between steps (a conjugate or negative view, another layout, new
    storage for a parameter): the fast path declines what it cannot read by value, and every
    step equals the same class's on float tensors holding the real views."""
    gen = torch.Generator().manual_seed(5)
    ours = [
        torch.randn(6, 4, dtype=torch.complex64, generator=gen),
        torch.randn(5, dtype=torch.complex128, generator=gen),
    ]
    twins = [torch.view_as_real(z).clone() for z in ours]
    opt, ref = fot.Adam(ours, lr=0.1), fot.Adam(twins, lr=0.1)
    for t in range(10):
        grads = [torch.randn(z.shape, dtype=z.dtype, generator=gen) for z in ours]
        given = list(grads)
        if t == 3:  # a conjugate view: its memory holds conj(g)
            given[0] = grads[0].conj().resolve_conj().conj()
        if t == 4:  # a negative view
            given[1] = torch._neg_view(-grads[1])
        if t == 5:  # another layout than the parameter's
            given[0] = grads[0].t().contiguous().t()
        if t == 6:  # new storage for a parameter, in the same layout (and its twin's)
            ours[1].data = ours[1].data.clone()
        for z, w, g, g_given in zip(ours, twins, grads, given):
            z.grad = g_given
            w.grad = torch.view_as_real(g).clone()
        opt.step()
        ref.step()
        for z, w in zip(ours, twins):
            assert torch.equal(torch.view_as_real(z), w), t
