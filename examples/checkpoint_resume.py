"""Checkpoints: save mid-run, load into a freshly built optimizer (as after a crash, in a new
process), and the resumed run equals the uninterrupted one bit for bit: parameters, Adam's
state and the position in the learning-rate schedule.  Run: python checkpoint_resume.py
"""

import os
import tempfile

import numpy as np

import fastoptim as fo

TOTAL, SAVE_AT = 40, 15


def gradient(params: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """Least squares on a mini-batch that depends on the step: deterministic."""
    rng = np.random.default_rng(step)
    a = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    r = a @ params["w"] + params["c"] - b
    return {"w": a.T @ r / 16, "c": np.array(r.mean(), np.float32)}


def build() -> tuple[dict[str, np.ndarray], fo.Optimizer]:
    params = {"w": np.zeros(8, np.float32), "c": np.zeros((), np.float32)}
    lr = fo.schedules.warmup_cosine(0.1, warmup_steps=5, total_steps=TOTAL)
    return params, fo.AdamW(params, lr=lr, weight_decay=0.01)


def train(params: dict[str, np.ndarray], opt: fo.Optimizer, steps: range) -> None:
    for t in steps:
        opt.step(gradient(params, t))


# 1. uninterrupted
straight, opt = build()
train(straight, opt, range(TOTAL))

# 2. interrupted: save after SAVE_AT steps, then a fresh model and optimizer load it
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "run.npz")
    params, opt = build()
    train(params, opt, range(SAVE_AT))
    fo.save(path, opt)  # parameters + state + step count + schedules, atomically

    params, opt = build()  # "a new process": zeros again
    fo.load(path, opt)  # restores the parameters in place, the state and the schedule
    print(f"resumed at step {opt.step_count}, lr {opt.param_groups[0]['lr']:.6f}")
    train(params, opt, range(SAVE_AT, TOTAL))

same = all(params[k].tobytes() == straight[k].tobytes() for k in params)
print(f"w = {np.array2string(params['w'], precision=4)}")
print(f"resumed == uninterrupted, bit for bit: {same}")
