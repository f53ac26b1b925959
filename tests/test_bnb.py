"""fastoptim.bnb: 8-bit optimizer state to and from bitsandbytes' state_dict format.

The format tests build bitsandbytes-format state_dicts with fastoptim.reference's readable
quantizer (they run without bitsandbytes); the interoperability tests train with the real
package where it installs and move its state both ways."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as fot  # noqa: E402
from fastoptim import bnb as fb  # noqa: E402
from fastoptim import reference as ref  # noqa: E402

SIGNED = ref.create_dynamic_map(signed=True)
UNSIGNED = ref.create_dynamic_map(signed=False)
BIG, SMALL = (48, 100), (10,)  # 4800 elements (quantized: >= 4096, a short last block), 10

# fastoptim.torch class, its options, its states with (bitsandbytes' map, fastoptim's map)
KINDS: dict[str, tuple[dict[str, Any], list[tuple[str, np.ndarray, np.ndarray]]]] = {
    "AdamW": ({}, [("exp_avg", SIGNED, SIGNED), ("exp_avg_sq", UNSIGNED, UNSIGNED)]),
    "Adam": ({}, [("exp_avg", SIGNED, SIGNED), ("exp_avg_sq", UNSIGNED, UNSIGNED)]),
    "Lion": ({}, [("exp_avg", SIGNED, SIGNED)]),
    "SGD": ({"momentum": 0.9}, [("momentum_buffer", SIGNED, SIGNED)]),
    "RMSprop": ({}, [("square_avg", SIGNED, UNSIGNED)]),
    "Adagrad": ({}, [("sum", SIGNED, UNSIGNED)]),
}


def _values(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    v = rng.standard_normal(shape).astype(np.float32) * np.float32(0.1)
    if name in ("exp_avg_sq", "square_avg", "sum"):
        v = v * v
    v.reshape(-1)[:256] *= np.float32(1e-3)  # blocks of very different scales
    return v


def _bnb_state_dict(kind: str, rng: np.random.Generator, step: int = 7) -> dict[str, Any]:
    """What bitsandbytes' 8-bit optimizer of `kind` saves for one big and one small parameter."""
    _, states = KINDS[kind]
    state: dict[int, Any] = {}
    for i, shape in enumerate((BIG, SMALL)):
        quant: dict[str, Any] = {}
        for j, (name, bmap, _) in enumerate(states, start=1):
            v = _values(rng, name, shape)
            if shape == BIG:
                codes, absmax = ref.quantize_blockwise(v, bmap)
                quant[f"state{j}"] = torch.from_numpy(codes)
                quant[f"absmax{j}"] = torch.from_numpy(absmax)
                quant[f"qmap{j}"] = torch.from_numpy(bmap.copy())
            else:
                quant[f"state{j}"] = torch.from_numpy(v)
        state[i] = {"step": step, "__bnb_optimizer_quant_state__": quant}
    groups = [{"lr": 0.0123, "weight_decay": 0.02, "params": [0, 1]}]
    return {"state": state, "param_groups": groups}


def _params() -> list[Any]:
    return [torch.nn.Parameter(torch.randn(*s)) for s in (BIG, SMALL)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_from_bitsandbytes_moves_codes_exactly(kind: str) -> None:
    rng = np.random.default_rng(0)
    options, states = KINDS[kind]
    src = _bnb_state_dict(kind, rng)
    opt = getattr(fot, kind)(_params(), state_dtype="int8", **options)
    out = fb.from_bitsandbytes(src, opt)
    opt.load_state_dict(out)
    big, small = opt.param_groups[0]["params"]
    assert opt.param_groups[0]["lr"] == 0.0123 and opt.param_groups[0]["weight_decay"] == 0.02
    for j, (name, bmap, fmap) in enumerate(states, start=1):
        q = src["state"][0]["__bnb_optimizer_quant_state__"]
        codes, absmax = opt.state[big][name].numpy(), opt.state[big][name + "_absmax"].numpy()
        if bmap is fmap:  # the same map: bit for bit
            np.testing.assert_array_equal(codes, q[f"state{j}"].numpy())
            np.testing.assert_array_equal(absmax, q[f"absmax{j}"].numpy())
        else:  # bitsandbytes' signed map for a sum of squares: re-quantized, nearest value
            before = ref.dequantize_blockwise(q[f"state{j}"].numpy(), q[f"absmax{j}"].numpy(), bmap)
            want_codes, want_absmax = ref.quantize_blockwise(before, fmap)
            np.testing.assert_array_equal(codes, want_codes)
            np.testing.assert_array_equal(absmax, want_absmax)
            after = ref.dequantize_blockwise(codes, absmax, fmap)  # the nearest map value
            scale = np.repeat(absmax, 256)[: after.size].reshape(-1, 1).astype(np.float64)
            every = np.abs(fmap[None, :] * scale - before.reshape(-1, 1))
            err = np.abs(after - before).reshape(-1)
            assert np.all(err <= every.min(axis=1) + 1e-6 * scale.reshape(-1))
        small_src = src["state"][1]["__bnb_optimizer_quant_state__"][f"state{j}"]
        assert opt.state[small][name].dtype == torch.float32
        assert torch.equal(opt.state[small][name], small_src)
    if "step" in opt.state[big]:
        assert float(opt.state[big]["step"]) == 7.0
    # and it steps on from there
    for p in (big, small):
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in (big, small))


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_from_bitsandbytes_into_unquantized_state_decodes(state_dtype: str | None) -> None:
    rng = np.random.default_rng(1)
    src = _bnb_state_dict("AdamW", rng)
    opt = fot.AdamW(_params(), state_dtype=state_dtype)
    opt.load_state_dict(fb.from_bitsandbytes(src, opt))
    big = opt.param_groups[0]["params"][0]
    q = src["state"][0]["__bnb_optimizer_quant_state__"]
    want = ref.dequantize_blockwise(q["state1"].numpy(), q["absmax1"].numpy(), SIGNED)
    got = opt.state[big]["exp_avg"]
    assert "exp_avg_absmax" not in opt.state[big]
    if state_dtype is None:
        np.testing.assert_array_equal(got.numpy(), want)
    else:  # bfloat16 state: rounded to nearest (torch's load_state_dict gives float32
        # parameters' state their dtype: the policy's dtype comes back at the next step)
        rounded = torch.from_numpy(want).bfloat16().float()
        assert not torch.equal(rounded, torch.from_numpy(want))
        assert torch.equal(got.float(), rounded)


def test_from_bitsandbytes_gives_master_copies_the_parameters_values() -> None:
    rng = np.random.default_rng(2)
    src = _bnb_state_dict("AdamW", rng)
    params = [torch.nn.Parameter(torch.randn(*s).bfloat16()) for s in (BIG, SMALL)]
    opt = fot.AdamW(params, state_dtype="int8", master_weights=True)
    opt.load_state_dict(fb.from_bitsandbytes(src, opt))
    for p in params:
        assert torch.equal(opt.state[p]["master"], p.detach().float())
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = torch.randn_like(params[1])
    opt.step()


def _fastoptim_trained(kind: str, steps: int = 3) -> Any:
    options, _ = KINDS[kind]
    torch.manual_seed(3)
    opt = getattr(fot, kind)(_params(), state_dtype="int8", lr=1e-3, **options)
    for _ in range(steps):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


@pytest.mark.parametrize("kind", ["Lion", "SGD"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_step_count_given_to_groups_that_keep_one(kind: str, rounding: str) -> None:
    """fastoptim's SGD and Lion keep a step count only with stochastic rounding (its random
    bits are keyed on it): from_bitsandbytes gives them bitsandbytes' count then (it restarted
    at 0, and the resumed steps drew the random bits of the first ones)."""
    options, _ = KINDS[kind]
    opt = getattr(fot, kind)(_params(), state_dtype="int8", rounding=rounding, **options)
    converted = fb.from_bitsandbytes(_bnb_state_dict(kind, np.random.default_rng(5), step=7), opt)
    opt.load_state_dict(converted)
    for p in opt.param_groups[0]["params"]:
        if rounding == "stochastic":
            assert float(opt.state[p]["step"]) == 7.0
        else:
            assert "step" not in opt.state[p]


def test_errors_name_what_does_not_fit() -> None:
    rng = np.random.default_rng(4)
    src = _bnb_state_dict("AdamW", rng)
    opt = fot.AdamW(_params(), state_dtype="int8")
    with pytest.raises(TypeError, match=r"fastoptim\.torch"):
        fb.from_bitsandbytes(src, torch.optim.AdamW(_params()))
    with pytest.raises(TypeError, match=r"fastoptim\.torch"):
        fb.from_bitsandbytes(src, fot.NAdam(_params()))
    with pytest.raises(ValueError, match=r"group 0 has 2 parameters in the state_dict, 1"):
        fb.from_bitsandbytes(src, fot.AdamW(_params()[:1]))
    with pytest.raises(ValueError, match="not a state_dict"):
        fb.from_bitsandbytes({"state": {}}, opt)

    def broken(key: str, value: Any) -> dict[str, Any]:
        s = _bnb_state_dict("AdamW", np.random.default_rng(4))
        s["state"][0]["__bnb_optimizer_quant_state__"][key] = value
        return s

    with pytest.raises(ValueError, match="absmax1 has 3 entries, 19 blocks"):
        fb.from_bitsandbytes(broken("absmax1", torch.ones(3)), opt)
    with pytest.raises(ValueError, match="negative or infinite"):
        fb.from_bitsandbytes(broken("absmax2", -torch.ones(19)), opt)
    with pytest.raises(ValueError, match="qmap1 has 255 entries"):
        fb.from_bitsandbytes(broken("qmap1", torch.zeros(255)), opt)
    with pytest.raises(ValueError, match="state2: expected shape"):
        fb.from_bitsandbytes(broken("state2", torch.zeros(7, dtype=torch.uint8)), opt)
    with pytest.raises(ValueError, match=r"absmax1: expected torch\.float32"):
        fb.from_bitsandbytes(broken("absmax1", torch.ones(19, dtype=torch.float64)), opt)
    s = _bnb_state_dict("Lion", np.random.default_rng(4))
    with pytest.raises(ValueError, match="no state2 \\(the exp_avg_sq of AdamW\\)"):
        fb.from_bitsandbytes(s, opt)
    s = _bnb_state_dict("AdamW", np.random.default_rng(4))
    s["state"][0]["step"] = -1
    with pytest.raises(ValueError, match="step must be a count"):
        fb.from_bitsandbytes(s, opt)
    for step in ("3", None, torch.ones(2)):  # (were TypeErrors from a comparison or float())
        s["state"][0]["step"] = step
        with pytest.raises(ValueError, match="step must be a count"):
            fb.from_bitsandbytes(s, opt)
    s = _bnb_state_dict("AdamW", np.random.default_rng(4))
    del s["param_groups"][0]["params"]  # (was a bare KeyError)
    with pytest.raises(ValueError, match=r"param_groups\[0\] of the state_dict is not a group"):
        fb.from_bitsandbytes(s, opt)
    transposed = _bnb_state_dict("AdamW", np.random.default_rng(4))["state"][0]
    codes = transposed["__bnb_optimizer_quant_state__"]["state1"]
    # (the same count of codes in another shape: its blocks would be read in another order)
    with pytest.raises(ValueError, match=r"state1: expected shape \(48, 100\), got \(100, 48\)"):
        fb.from_bitsandbytes(broken("state1", codes.reshape(100, 48)), opt)
    flat = broken("state1", codes.reshape(-1))  # (flattened: the same order, taken)
    assert fb.from_bitsandbytes(flat, opt)["state"][0]["exp_avg_codes"].shape == BIG
    # nothing was changed: the optimizer has no state, the source still loads
    assert len(opt.state) == 0
    opt.load_state_dict(fb.from_bitsandbytes(src, opt))


# ---------------------------------------------------------------- the real bitsandbytes

BNB_CLASSES = {
    "AdamW": "AdamW8bit",
    "Adam": "Adam8bit",
    "Lion": "Lion8bit",
    "SGD": "SGD8bit",
    "RMSprop": "RMSprop8bit",
    "Adagrad": "Adagrad8bit",
}


def _bnb() -> Any:
    return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_through_bitsandbytes_is_bit_exact(kind: str) -> None:
    bnb = _bnb()
    options, states = KINDS[kind]
    opt = _fastoptim_trained(kind)
    params = opt.param_groups[0]["params"]
    target = getattr(bnb.optim, BNB_CLASSES[kind])(params, lr=1e-3, **options)
    target.load_state_dict(fb.to_bitsandbytes(opt.state_dict(), target))
    big = params[0]
    for j, (name, bmap, fmap) in enumerate(states, start=1):
        got = target.state[big]
        np.testing.assert_array_equal(got[f"qmap{j}"].numpy(), bmap)
        if bmap is fmap:
            assert torch.equal(got[f"state{j}"], opt.state[big][name])
            assert torch.equal(got[f"absmax{j}"], opt.state[big][name + "_absmax"])
        assert torch.equal(target.state[params[1]][f"state{j}"], opt.state[params[1]][name])
    if kind in ("Adam", "AdamW", "RMSprop", "Adagrad"):
        assert target.state[big]["step"] == 3
    back = getattr(fot, kind)(params, state_dtype="int8", lr=1e-3, **options)
    back.load_state_dict(fb.from_bitsandbytes(target.state_dict(), back))
    for p in params:
        for name, bmap, fmap in states:
            if bmap is fmap or p is params[1]:
                assert torch.equal(back.state[p][name], opt.state[p][name])


@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
def test_codes_under_either_name(kind: str) -> None:
    """fastoptim.torch saves codes as ``<state>_codes``; to_bitsandbytes reads those and a
    fastoptim 0.1 state_dict's (under the state's name) to the same tensors, and
    from_bitsandbytes writes the new name, which loads to the same codes."""
    bnb = _bnb()
    options, states = KINDS[kind]
    opt = _fastoptim_trained(kind)
    params = opt.param_groups[0]["params"]
    sd = opt.state_dict()
    old = {
        **sd,
        "state": {
            k: {n.removesuffix("_codes"): v for n, v in e.items()} for k, e in sd["state"].items()
        },
    }
    target = getattr(bnb.optim, BNB_CLASSES[kind])(params, lr=1e-3, **options)
    new_out, old_out = fb.to_bitsandbytes(sd, target), fb.to_bitsandbytes(old, target)
    for i in new_out["state"]:
        a, b = new_out["state"][i], old_out["state"][i]
        assert a["step"] == b["step"]
        qa, qb = a["__bnb_optimizer_quant_state__"], b["__bnb_optimizer_quant_state__"]
        assert set(qa) == set(qb) and all(torch.equal(qa[k], qb[k]) for k in qa), i
    target.load_state_dict(new_out)
    back = getattr(fot, kind)(params, state_dtype="int8", lr=1e-3, **options)
    converted = fb.from_bitsandbytes(target.state_dict(), back)
    for name, _, _ in states:
        assert name not in converted["state"][0]
        assert torch.equal(converted["state"][0][name + "_codes"], opt.state[params[0]][name])
    back.load_state_dict(converted)
    for name, _, _ in states:
        assert torch.equal(back.state[params[0]][name], opt.state[params[0]][name])


@pytest.mark.parametrize("kind", ["AdamW", "Lion"])
def test_bitsandbytes_state_continues_in_fastoptim(kind: str) -> None:
    """bitsandbytes trains 3 steps; its state moves to fastoptim (codes bit for bit); both take a
    4th step with the same gradients: the parameters agree to float32 rounding (both update
    from the same dequantized state)."""
    bnb = _bnb()
    options, _ = KINDS[kind]
    torch.manual_seed(5)
    a = _params()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    theirs = getattr(bnb.optim, BNB_CLASSES[kind])(a, lr=1e-3, weight_decay=0.01, **options)
    for _ in range(3):
        for p in a:
            p.grad = torch.randn_like(p)
        theirs.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    ours = getattr(fot, kind)(b, lr=1e-3, weight_decay=0.01, state_dtype="int8", **options)
    ours.load_state_dict(fb.from_bitsandbytes(theirs.state_dict(), ours))
    assert torch.equal(ours.state[b[0]]["exp_avg"], theirs.state[a[0]]["state1"])
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    theirs.step()
    ours.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_to_bitsandbytes_rejects_what_does_not_fit() -> None:
    bnb = _bnb()
    opt = _fastoptim_trained("Lion")
    params = opt.param_groups[0]["params"]
    with pytest.raises(ValueError, match="no 'exp_avg_sq'"):
        fb.to_bitsandbytes(opt.state_dict(), bnb.optim.AdamW8bit(params))
    with pytest.raises(TypeError, match="bitsandbytes optimizer"):
        fb.to_bitsandbytes(opt.state_dict(), fot.Lion(params))
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        fb.to_bitsandbytes(opt.state_dict(), bnb.optim.Lion8bit(params), step=0)


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_to_bitsandbytes_from_a_channels_last_parameter(state_dtype: str, contiguous: bool) -> None:
    """fastoptim's codes of a parameter not laid out row-major follow its memory order (4-bit:
    the order the state_dict records); bitsandbytes' state_dict codes are read row-major: the
    state is decoded in fastoptim's order and quantized again (to within a code step of the
    8-bit map), never reinterpreted.  (Before, the 8-bit codes were reordered away from their
    blocks' scales and the 4-bit ones read row-major: errors as large as the state.)  Codes
    made contiguous since (the same values) convert alike: their order is recorded."""
    bnb = _bnb()
    torch.manual_seed(4)
    p = torch.nn.Parameter(torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last))
    opt = fot.AdamW([p], lr=1e-3, state_dtype=state_dtype)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    target = bnb.optim.AdamW8bit([p], lr=1e-3)
    sd = opt.state_dict()
    if contiguous:
        entry = sd["state"][0]
        for name in ("exp_avg_codes", "exp_avg_sq_codes"):
            entry[name] = entry[name].contiguous()
    target.load_state_dict(fb.to_bitsandbytes(sd, target))
    got = target.state[p]
    for j, (name, qmap) in enumerate((("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED)), start=1):
        want = fot._dequantized(
            st[name], st[name + "_absmax"], name, state_dtype, tuple(p.shape),
            st.get(name + "_order"),
        ).numpy()  # fmt: skip
        codes = got[f"state{j}"].contiguous().numpy().reshape(-1)
        values = ref.dequantize_blockwise(codes, got[f"absmax{j}"].numpy(), qmap)
        values = values.reshape(p.shape)
        np.testing.assert_allclose(values, want, rtol=0, atol=0.02 * float(np.abs(want).max()))


@pytest.mark.parametrize(
    ("kind", "names", "values"),
    [
        ("SGD", ("momentum", "dampening"), (0.5, 0.25)),
        ("RMSprop", ("alpha", "momentum"), (0.95, 0.0)),
    ],
)
def test_hyper_parameters_bitsandbytes_keeps_as_betas_move(
    kind: str, names: tuple[str, str], values: tuple[float, float]
) -> None:
    """bitsandbytes keeps SGD8bit's momentum and dampening, RMSprop8bit's alpha (and
    momentum), as its group's ``betas``: the converters left the target's own values."""
    src = _bnb_state_dict(kind, np.random.default_rng(0))
    src["param_groups"][0]["betas"] = values
    opt = getattr(fot, kind)(_params(), state_dtype="int8", **KINDS[kind][0])
    out = fb.from_bitsandbytes(src, opt)
    assert tuple(out["param_groups"][0][n] for n in names) == values
    opt.load_state_dict(out)
    assert tuple(opt.param_groups[0][n] for n in names) == values
    bnb = pytest.importorskip("bitsandbytes")
    target = getattr(bnb.optim, kind + "8bit")(_params(), lr=0.1, **KINDS[kind][0])
    back = fb.to_bitsandbytes(opt.state_dict(), target)
    assert tuple(back["param_groups"][0]["betas"]) == values
