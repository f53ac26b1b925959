"""Moving 8-bit optimizer state between ``fastoptim.torch`` and bitsandbytes.

fastoptim's ``state_dtype="int8"`` stores a state as bitsandbytes' 8-bit optimizers do: uint8
codes into the dynamic (tree) map and one float32 absmax per block of 256 elements
(:mod:`fastoptim.engine.precision`).  The two state_dict formats differ only in names:

==============================================  ==================================================
``fastoptim.torch``                             bitsandbytes (``Adam8bit``, ``AdamW8bit``, ...)
==============================================  ==================================================
``exp_avg_codes``, ``exp_avg_absmax``           ``state1``, ``absmax1``, ``qmap1`` (signed map)
``exp_avg_sq_codes``, ``exp_avg_sq_absmax``     ``state2``, ``absmax2``, ``qmap2`` (unsigned map)
``step`` (float32 tensor)                       ``step`` (int)
==============================================  ==================================================

(In ``opt.state`` the codes keep the state's own name, ``exp_avg``, where a state_dict of
fastoptim 0.1 has them too: both functions read those.)  bitsandbytes keeps its entries under
``"__bnb_optimizer_quant_state__"`` in its state_dict.  The pairs: ``Adam``/``AdamW`` <->
``Adam8bit``/``AdamW8bit``/``PagedAdam(W)8bit`` (``exp_avg``, ``exp_avg_sq``), ``Lion`` <->
``Lion8bit`` (``exp_avg``), ``SGD`` with momentum <-> ``SGD8bit`` (``momentum_buffer``),
``RMSprop`` <-> ``RMSprop8bit`` (``square_avg``), ``Adagrad`` <-> ``Adagrad8bit`` (``sum``).

- Codes and absmax move **bit for bit** where both sides use the same map: every state of
  Adam/AdamW, Lion and SGD.  bitsandbytes' 1-state optimizers quantize their one state with
  the *signed* map even when it is a sum of squares (RMSprop's ``square_avg``, Adagrad's
  ``sum``), which fastoptim stores with the unsigned map: those are re-quantized (decoded with
  the source's map and encoded with the target's, nearest value), an error of at most half a
  code step of the target map per element.
- bitsandbytes' codes are read and written in row-major order.  fastoptim's codes of a
  parameter not laid out row-major (transposed, channels-last) follow its memory order (the
  ``<state>_order`` its state records): they are decoded in that order and quantized again
  (to within a code step), not moved bit for bit.
- A state the target keeps in another layout (a parameter under the target's 8-bit size limit:
  float32 there; a target with ``state_dtype=None`` or ``"bfloat16"``) is decoded or encoded as
  needed.
- ``step``: bitsandbytes' ``SGD8bit`` and ``Lion8bit`` keep a step count that fastoptim's SGD and
  Lion keep only with ``rounding="stochastic"`` (whose random bits are keyed on it);
  :func:`to_bitsandbytes` writes the state_dict's count, or where it has none its ``step``
  argument (default 1).  bitsandbytes reads it only to recognise the first step (which starts
  the momentum buffer), so any count >= 1 gives the same next update.
  :func:`from_bitsandbytes` gives the count to the parameters whose group keeps one.
- Hyper-parameters: each target group keeps its own entries and takes the source's values of
  the entries both have (``lr``, ``betas``, ``eps``, ``weight_decay``...), and of those
  bitsandbytes keeps as ``betas``: ``SGD8bit``'s ``(momentum, dampening)``, ``RMSprop8bit``'s
  ``(alpha, momentum)``.
- The update rules of the two libraries are not identical (bitsandbytes' ``Adam8bit`` decays
  weights like AdamW, its CPU quantizer is approximate: see the README): moving a checkpoint
  moves the state exactly; the next steps follow the maths of the optimizer that takes them.

Both functions return a new state_dict (the arguments are not changed) for the target's
``load_state_dict``; a source that does not fit the target raises :class:`ValueError` naming the
parameter and entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fastoptim import _core
from fastoptim.engine import precision
from fastoptim.torch import (
    CODES,
    _dequantized,
    _exact_count,
    _loaded_entry,
    _recorded_order,
    _scalar_dtype,
)

__all__ = ["from_bitsandbytes", "to_bitsandbytes"]

#: fastoptim.torch class -> its states in bitsandbytes' order (state1, state2).
_STATES = {
    "Adam": ("exp_avg", "exp_avg_sq"),
    "AdamW": ("exp_avg", "exp_avg_sq"),
    "Lion": ("exp_avg",),
    "SGD": ("momentum_buffer",),
    "RMSprop": ("square_avg",),
    "Adagrad": ("sum",),
}
#: bitsandbytes class -> the fastoptim.torch class whose state it keeps.
_BNB = {
    "Adam8bit": "Adam",
    "AdamW8bit": "AdamW",
    "PagedAdam8bit": "Adam",
    "PagedAdamW8bit": "AdamW",
    "Adam": "Adam",
    "AdamW": "AdamW",
    "PagedAdam": "Adam",
    "PagedAdamW": "AdamW",
    "Lion8bit": "Lion",
    "PagedLion8bit": "Lion",
    "Lion": "Lion",
    "PagedLion": "Lion",
    "SGD8bit": "SGD",
    "SGD": "SGD",
    "RMSprop8bit": "RMSprop",
    "RMSprop": "RMSprop",
    "Adagrad8bit": "Adagrad",
    "Adagrad": "Adagrad",
}
_WRAPPED = "__bnb_optimizer_quant_state__"
_BLOCK = precision.QUANT_BLOCK


def _bnb_map(state: str) -> str:
    """bitsandbytes' map of `state`: its state2 (``exp_avg_sq``) unsigned, its state1 always
    signed (also a sum of squares: RMSprop's ``square_avg``, Adagrad's ``sum``)."""
    return "unsigned8" if state == "exp_avg_sq" else "signed8"


class _Value:
    """One state of one parameter on its way between the formats: codes + absmax + the map
    they index, or plain values."""

    def __init__(
        self,
        values: np.ndarray | None = None,
        codes: np.ndarray | None = None,
        absmax: np.ndarray | None = None,
        qmap: np.ndarray | None = None,
    ) -> None:
        self.values, self.codes, self.absmax, self.qmap = values, codes, absmax, qmap

    def decoded(self) -> np.ndarray:
        if self.values is not None:
            return self.values.astype(np.float32)
        assert self.codes is not None and self.absmax is not None and self.qmap is not None
        flat = self.codes.reshape(-1)
        scale = np.repeat(self.absmax, _BLOCK)[: flat.size]
        out: np.ndarray = (self.qmap[flat] * scale).reshape(self.codes.shape)
        return out

    def encoded(self, qmap_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Codes and absmax in map `qmap_name`: the source's own where it is that map."""
        target = _core.quant_map(qmap_name)
        if self.codes is not None and self.qmap is not None and _same(self.qmap, target):
            assert self.absmax is not None
            return self.codes.copy(), self.absmax.copy()
        values = np.ascontiguousarray(self.decoded(), np.float32)
        codes = np.empty(values.shape, np.uint8)
        absmax = np.empty(-(-values.size // _BLOCK), np.float32)
        _core.quantize_blockwise(values.reshape(-1), codes.reshape(-1), absmax, qmap_name)
        return codes, absmax


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def _np(t: Any, where: str, dtype: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A NumPy copy of tensor `t` checked for dtype and shape."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor, got {type(t).__name__}")
    want = torch.uint8 if dtype == np.uint8 else torch.float32
    if t.dtype != want:
        raise ValueError(f"{where}: expected {want}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:  # (or flattened: the same elements)
        if t.dim() != 1 or t.numel() != int(np.prod(shape)):
            raise ValueError(f"{where}: expected shape {shape}, got {tuple(t.shape)}")
    out: np.ndarray = t.detach().cpu().contiguous().numpy().copy()
    return out.reshape(shape) if shape is not None else out


def _check_groups(source: Mapping[str, Any], groups: list[dict[str, Any]], who: str) -> list[Any]:
    """The source's parameter keys in the order of the target's parameters."""
    saved = source.get("param_groups")
    if not isinstance(saved, list) or not isinstance(source.get("state"), Mapping):
        raise ValueError(f"{who}: not a state_dict (no 'state' / 'param_groups')")
    if len(saved) != len(groups):
        raise ValueError(
            f"{who}: the state_dict has {len(saved)} parameter groups, the optimizer {len(groups)}"
        )
    keys = []
    for i, (s, g) in enumerate(zip(saved, groups)):
        if not isinstance(s, Mapping) or not isinstance(s.get("params"), (list, tuple)):
            raise ValueError(
                f"{who}: param_groups[{i}] of the state_dict is not a group (a dict with a "
                f"'params' list), got {s!r:.60}"
            )
        if len(s["params"]) != len(g["params"]):
            raise ValueError(
                f"{who}: group {i} has {len(s['params'])} parameters in the state_dict, "
                f"{len(g['params'])} in the optimizer"
            )
        keys.extend(s["params"])
    return keys


#: fastoptim.torch class -> the hyper-parameters bitsandbytes keeps as its group's ``betas``
#: (``SGD8bit``: ``(momentum, dampening)``; ``RMSprop8bit``: ``(alpha, momentum)``).
_AS_BETAS = {"SGD": ("momentum", "dampening"), "RMSprop": ("alpha", "momentum")}


def _merged_groups(
    target: list[dict[str, Any]], source: list[Mapping[str, Any]], kind: str, to_bnb: bool
) -> list[Any]:
    """Each target group with the source's values of the entries both have, and those one side
    keeps as ``betas`` (`kind`: the fastoptim class; `to_bnb`: the target is bitsandbytes')."""
    out = []
    names = _AS_BETAS.get(kind)
    for t, s in zip(target, source):
        g = dict(t)
        g.update({k: s[k] for k in s if k in t and k != "params"})
        if names is not None and to_bnb and "betas" in g and all(n in s for n in names):
            g["betas"] = tuple(s[n] for n in names)
        elif names is not None and not to_bnb and _pair(s.get("betas")):
            g.update({n: s["betas"][i] for i, n in enumerate(names) if n in g})
        out.append(g)
    return out


def _pair(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2


def from_bitsandbytes(state_dict: Mapping[str, Any], optimizer: Any) -> dict[str, Any]:
    """A bitsandbytes 8-bit optimizer's ``state_dict()`` as a state_dict that `optimizer` (a
    ``fastoptim.torch`` Adam, AdamW, Lion, SGD, RMSprop or Adagrad over the same parameters, in
    the same groups and order, usually with ``state_dtype="int8"``) loads::

        opt = fastoptim.torch.AdamW(model.parameters(), lr=1e-4, state_dtype="int8")
        opt.load_state_dict(fastoptim.bnb.from_bitsandbytes(torch.load(path), opt))
    """
    cls = type(optimizer).__name__
    who = f"from_bitsandbytes({cls})"
    names = _STATES.get(cls)
    if names is None or not type(optimizer).__module__.startswith("fastoptim"):
        raise TypeError(
            f"from_bitsandbytes: optimizer must be a fastoptim.torch {', '.join(_STATES)}; "
            f"got {type(optimizer).__module__}.{cls}"
        )
    mine = optimizer.state_dict()
    keys = _check_groups(state_dict, mine["param_groups"], who)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = [g for g in optimizer.param_groups for _ in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for index, (key, p, group) in enumerate(zip(keys, params, groups)):
        entry = state_dict["state"].get(key)
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"{who}: state of parameter {key!r} is not a dict")
        entry = dict(entry)
        entry.update(entry.pop(_WRAPPED, {}))
        where = f"{who}: parameter {key!r}"
        shape = tuple(p.shape)
        layout = precision.buffers(
            group, precision.dtype_name(p.dtype) or "float32", names, p.numel()
        )
        out: dict[str, Any] = {}
        if any(n == "step" for n, _ in optimizer._scalars_of(group)):  # (as torch, or
            # SGD's and Lion's with stochastic rounding)
            out["step"] = torch.tensor(
                float(_step(entry, where)), dtype=_scalar_dtype(_exact_count("step", group))
            )
        for j, name in enumerate(names, start=1):
            value = _read_bnb(entry, j, shape, where)
            if value is None:
                raise ValueError(f"{where}: no state{j} (the {name} of {cls})")
            if layout.get(name) == precision.INT4:
                raise ValueError(
                    f"{where}: state_dtype='int4' ({name}): bitsandbytes has no 4-bit optimizer "
                    "state to convert from; build the optimizer with state_dtype='int8' (or "
                    "float), load, and change the policy afterwards"
                )
            if precision.quantized(layout, name):
                codes, absmax = value.encoded(precision.QUANT_MAPS[name])
                out[name + CODES] = torch.from_numpy(codes)
                out[name + precision.ABSMAX] = torch.from_numpy(absmax)
            else:
                dtype = getattr(torch, layout.get(name, "float32"))
                out[name] = torch.from_numpy(value.decoded()).to(dtype)
        for extra in (precision.EMA, precision.MASTER):
            if extra in layout:  # what a fresh start gives them: the parameter's values
                out[extra] = p.detach().to(getattr(torch, layout[extra]), copy=True)
        if precision.COMPENSATION in layout:
            out[precision.COMPENSATION] = torch.zeros_like(p)
        state[index] = out
    groups_out = _merged_groups(mine["param_groups"], state_dict["param_groups"], cls, False)
    return {"state": state, "param_groups": groups_out}


def _step(entry: Mapping[str, Any], where: str) -> int:
    step = entry.get("step", 0)
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if (
        isinstance(step, bool)
        or not isinstance(step, (int, float, np.integer, np.floating))
        or not float(step).is_integer()
        or step < 0
    ):
        raise ValueError(f"{where}: step must be a count >= 0, got {step!r}")
    return int(step)


def _blockwise(
    entry: Mapping[str, Any], codes_name: str, absmax_name: str, shape: tuple[int, ...], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """A block-wise 8-bit state's codes and absmax (either format's names), checked: one
    finite, non-negative absmax per block of 256 codes."""
    codes = _np(entry[codes_name], f"{where}: {codes_name}", np.uint8, shape)
    blocks = -(-codes.size // _BLOCK)
    absmax = _np(entry.get(absmax_name), f"{where}: {absmax_name}", np.float32).reshape(-1)
    if absmax.size != blocks:
        raise ValueError(
            f"{where}: {absmax_name} has {absmax.size} entries, {blocks} blocks of {_BLOCK} "
            "expected (block-wise 8-bit state)"
        )
    if bool(np.any(absmax < 0)) or bool(np.any(np.isinf(absmax))):
        raise ValueError(f"{where}: {absmax_name} holds negative or infinite scales")
    return codes, absmax


def _read_bnb(
    entry: Mapping[str, Any], j: int, shape: tuple[int, ...], where: str
) -> _Value | None:
    raw = entry.get(f"state{j}")
    if raw is None:
        return None
    if isinstance(raw, torch.Tensor) and raw.dtype == torch.uint8:
        codes, absmax = _blockwise(entry, f"state{j}", f"absmax{j}", shape, where)
        qmap = _np(entry.get(f"qmap{j}"), f"{where}: qmap{j}", np.float32).reshape(-1)
        if qmap.size != 256:
            raise ValueError(f"{where}: qmap{j} has {qmap.size} entries, 256 expected")
        return _Value(codes=codes, absmax=absmax, qmap=qmap)
    return _Value(values=_np(raw, f"{where}: state{j}", np.float32, shape))


def to_bitsandbytes(
    state_dict: Mapping[str, Any], optimizer: Any, *, step: int = 1
) -> dict[str, Any]:
    """A ``fastoptim.torch`` optimizer's ``state_dict()`` (Adam, AdamW, Lion, SGD, RMSprop or
    Adagrad; any ``state_dtype``) as a state_dict that `optimizer`, a bitsandbytes optimizer of
    the matching kind (``AdamW8bit``, ``Lion8bit``...) over the same parameters in the same
    groups and order, loads.  Each state is stored as that optimizer would store it (8-bit for
    parameters of at least its ``min_8bit_size`` elements when its ``optim_bits`` is 8, else
    float32).  `step`: the count written where `state_dict` has none (fastoptim's SGD and Lion
    keep one only with stochastic rounding)."""
    cls = type(optimizer).__name__
    who = f"to_bitsandbytes({cls})"
    kind = _BNB.get(cls)
    if kind is None or not type(optimizer).__module__.startswith("bitsandbytes"):
        raise TypeError(
            f"to_bitsandbytes: optimizer must be a bitsandbytes optimizer "
            f"({', '.join(sorted(_BNB))}); got {type(optimizer).__module__}.{cls}"
        )
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{who}: step must be an int >= 1, got {step!r}")
    names = _STATES[kind]
    groups = optimizer.param_groups
    keys = _check_groups(state_dict, groups, who)
    state: dict[int, dict[str, Any]] = {}
    index = 0
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            key = keys[index]
            entry = state_dict["state"].get(key)
            index += 1
            if entry is None:
                continue
            where = f"{who}: parameter {key!r}"
            entry = _loaded_entry(entry, where, p) if isinstance(entry, Mapping) else entry
            missing = [n for n in names if n not in entry]
            if missing:
                raise ValueError(
                    f"{where}: no {missing[0]!r} in the state_dict (a {cls} keeps "
                    f"{', '.join(names)}: is it a fastoptim.torch {kind} state_dict?)"
                )
            config = optimizer.get_config(gi, pi, group)
            quantize = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]
            n = int(_step(entry, where)) if "step" in entry else step
            quant: dict[str, torch.Tensor] = {}
            for j, name in enumerate(names, start=1):
                value = _read_fastoptim(entry, name, tuple(p.shape), where)
                if quantize:
                    qmap_name = _bnb_map(name)
                    codes, absmax = value.encoded(qmap_name)
                    quant[f"state{j}"] = torch.from_numpy(codes)
                    quant[f"qmap{j}"] = torch.from_numpy(_core.quant_map(qmap_name).copy())
                    quant[f"absmax{j}"] = torch.from_numpy(absmax)
                else:
                    quant[f"state{j}"] = torch.from_numpy(value.decoded())
            state[index - 1] = {"step": n, _WRAPPED: quant}
    saved = optimizer.state_dict()["param_groups"]
    merged = _merged_groups(saved, state_dict["param_groups"], kind, True)
    return {"state": state, "param_groups": merged}


def _read_fastoptim(
    entry: Mapping[str, Any], name: str, shape: tuple[int, ...], where: str
) -> _Value:
    raw = entry[name]
    absmax_name = name + precision.ABSMAX
    size = int(np.prod(shape))
    if (
        absmax_name in entry
        and isinstance(raw, torch.Tensor)
        and raw.dtype == torch.uint8
        and tuple(raw.shape) == ((size + 1) // 2,)
        and tuple(raw.shape) != shape
    ):  # a 4-bit state (state_dtype="int4"): decoded, then quantized in bitsandbytes' 8-bit map
        absmax4 = _np(entry[absmax_name], f"{where}: {absmax_name}", np.float32).reshape(-1)
        if absmax4.size != -(-size // precision.QUANT_BLOCK4):
            raise ValueError(
                f"{where}: {absmax_name} has {absmax4.size} entries, not one per block of "
                f"{precision.QUANT_BLOCK4} elements (a 4-bit state)"
            )
        if bool(np.any(absmax4 < 0)) or bool(np.any(np.isinf(absmax4))):
            raise ValueError(f"{where}: {absmax_name} holds negative or infinite scales")
        order = _recorded_order(entry, name, len(shape), f"{where}: {name + precision.ORDER}")
        values = _dequantized(raw, torch.from_numpy(absmax4), name, precision.INT4, shape, order)
        return _Value(values=values.numpy())
    if absmax_name in entry:
        codes, absmax = _blockwise(entry, name, absmax_name, shape, where)
        order = _recorded_order(entry, name, len(shape), f"{where}: {name + precision.ORDER}")
        if isinstance(raw, torch.Tensor) and (order is not None or not raw.is_contiguous()):
            # the codes of a parameter not laid out row-major: their blocks follow its memory
            # order (recorded; or, saved before it was, the codes' strides), bitsandbytes' the
            # row-major one (decoded, to be quantized again)
            values = _dequantized(raw, torch.from_numpy(absmax), name, order=order)
            return _Value(values=values.numpy())
        return _Value(codes=codes, absmax=absmax, qmap=_core.quant_map(precision.QUANT_MAPS[name]))
    if not isinstance(raw, torch.Tensor) or not raw.is_floating_point():
        raise ValueError(f"{where}: {name} must be a floating tensor")
    return _Value(values=_np(raw.float(), f"{where}: {name}", np.float32, shape))
