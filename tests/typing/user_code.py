"""User code exercising fastoptim's public API, for the type checkers only (never imported by the
test-suite): ``.ci/typecheck-user-code`` runs ``mypy --strict`` and ``basedpyright`` (strict
mode) on it together with the README's Python examples, so that code written as the README
shows keeps type-checking.  Keep it free of ``# type: ignore`` and ``cast``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import fastoptim
import fastoptim as fo
import fastoptim.functional as F
import fastoptim.torch as fot
from fastoptim import schedules


def named_params() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def listed_params() -> list[np.ndarray]:
    return [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]


def mixed_dtypes() -> None:
    """Arrays of different dtypes and shapes in one list (a group may mix dtypes)."""
    w, b = np.zeros((4, 3), np.float32), np.zeros(3, np.float64)
    opt = fo.Adam([w, b], lr=1e-3)
    opt.step([np.ones((4, 3), np.float32), np.ones(3, np.float64)])
    opt.step((np.ones((4, 3), np.float32), np.ones(3, np.float64)))
    fo.SGD((a for a in (w, b)), lr=0.1)
    fo.SGD(named_params().values(), lr=0.1)
    fo.SGD({"w": w, "b": b}, lr=0.1).step({"w": w, "b": b})


def every_optimizer() -> list[fo.Optimizer]:
    """Each optimizer with plain numbers, schedules and lambdas (also inside ``betas``)."""
    cos = schedules.cosine(0.1, total_steps=100)
    warm = schedules.warmup_cosine(1e-3, warmup_steps=10, total_steps=100)
    return [
        fo.SGD(named_params(), lr=cos, momentum=0.9, nesterov=True),
        fo.SGD(listed_params(), lr=lambda t: 0.1 / (1 + t), momentum=lambda t: 0.9),
        fo.Adagrad(named_params(), lr=schedules.exponential(0.01, 0.99), eps=1e-10),
        fo.RMSprop(named_params(), lr=0.01, alpha=lambda t: 0.99, centered=True),
        fo.Adadelta(named_params(), lr=schedules.constant(1.0), rho=0.9),
        fo.Adam(named_params(), lr=warm, betas=(0.9, 0.999)),
        fo.Adam(named_params(), lr=1e-3, betas=(schedules.linear(0.85, 0.95, 100), 0.999)),
        fo.Adam(named_params(), betas=(lambda t: 0.9, lambda t: 1 - 0.001 * math.exp(-t))),
        fo.AdamW(named_params(), lr=warm, weight_decay=lambda t: 1e-2, amsgrad=True),
        fo.Adamax(named_params(), lr=schedules.step_decay(2e-3, step_size=10)),
        fo.NAdam(named_params(), lr=2e-3, momentum_decay=4e-3, decoupled_weight_decay=True),
        fo.RAdam(named_params(), lr=schedules.multistep(1e-3, [10, 20])),
        fo.Lion(named_params(), lr=1e-4, betas=(0.9, schedules.constant(0.99)), maximize=True),
        fo.Rprop(named_params(), lr=0.01, etas=(0.5, 1.2), step_sizes=(1e-6, 50)),
    ]


def groups() -> fo.Optimizer:
    """Parameter groups as dicts, per-group hyper-parameters, schedules inside groups."""
    w, b = np.zeros((4, 3), np.float32), np.zeros(3, np.float64)

    def beta2(t: int) -> float:  # a group is a plain dict[str, Any]: a lambda in it has no
        return 0.99 - 0.09 * 0.5**t  # parameter type for pyright's strict mode, a def has

    opt = fo.Adam(
        [
            {"params": [w], "lr": schedules.cosine(1e-3, total_steps=100)},
            {"params": [b], "lr": 1e-2, "betas": (0.8, beta2)},
            {"params": {"extra": np.ones(2, np.float32)}, "betas": (0.9, schedules.constant(0.9))},
        ],
        lr=1e-3,
    )
    opt.param_groups[0]["lr"] = 1e-4
    opt.add_param_group({"params": [np.ones(2, np.float32)], "weight_decay": 0.1})
    return opt


def grads_by_name() -> float:
    params = named_params()
    opt = fo.AdamW(params, lr=1e-3)
    opt.grads["w"][...] = 1.0  # index the optimizer's buffers by name...
    opt.grads["b"].fill(0.5)
    for name, g in opt.grads.items():  # ...or walk them like the dict they are
        g *= 0.5
        assert isinstance(name, str)
    total = sum(float(g.sum()) for g in opt.grads.values())
    grads: dict[str, np.ndarray] = opt.grads  # an annotation checks the rest of the code
    grads["w"] += 1.0
    opt.step()
    opt.step({"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)})
    opt.zero_grad()
    return total


def grads_by_position() -> None:
    opt = fo.SGD(listed_params(), lr=0.1, momentum=0.9)
    opt.grads[0][...] = 1.0  # by position when the parameters were a list
    for g in opt.grads:
        g += 1.0
    first: np.ndarray = opt.grads[0]
    grads: list[np.ndarray] = opt.grads
    assert first is grads[0]
    opt.step()
    opt.step([np.ones((4, 3), np.float32), np.ones(3, np.float32)])


def state_and_checkpoints(path: Path) -> None:
    opt = fo.Adam(named_params(), lr=schedules.cosine(1e-3, total_steps=100))
    plateau = schedules.ReduceLROnPlateau(opt, patience=3)
    opt.step()
    plateau.step(0.5)
    exp_avg: np.ndarray = opt.state["w"]["exp_avg"]
    print(exp_avg.shape, opt.state_dict()["format"])
    fastoptim.save(path, opt)
    fastoptim.save(str(path), opt)
    fo.load(path, opt)
    fo.load(str(path), opt, strict=False)
    opt.load_state_dict(opt.state_dict())


def functional() -> None:
    p, g = np.zeros(8, np.float32), np.ones(8, np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    F.adam_(p, g, m, v, step=1, lr=1e-3, betas=(0.9, 0.999))
    F.adam_(p, g, m, v, step=2, lr=schedules.cosine(1e-3, total_steps=10), betas=(0.9, 0.999))
    F.adamw_(p, g, m, v, step=3, lr=lambda t: 1e-3, weight_decay=1e-2)
    F.sgd_(p, g, np.zeros_like(p), step=1, lr=0.1, momentum=0.9)
    F.lion_(p, g, np.zeros_like(p), step=1, lr=1e-4, betas=(0.9, 0.99))


def torch_training() -> float:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = fot.AdamW(
        model.parameters(),
        lr=fastoptim.schedules.warmup_cosine(1e-3, warmup_steps=5, total_steps=50),
        betas=(0.9, lambda t: 0.999),
        weight_decay=1e-2,
    )
    sgd = fot.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}],
        lr=lambda t: 0.01,
        momentum=torch.tensor(0.9),
    )
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=10)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sgd.step()
        scheduler.step()
    torch.save(opt.state_dict(), "/dev/null")
    return float(loss.item())


def machine() -> str:
    fo.set_num_threads(fo.max_threads())
    return f"{fo.isa()} {fo.available_isas()} {fo.get_num_threads()}"
