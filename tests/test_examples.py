"""The scripts in examples/ run, quickly, and what they print means what it says: the loss went
down, the model learned, the resumed run is bit for bit the uninterrupted one."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if not EXAMPLES.is_dir():  # the suite copied away from the source tree (CI's wheel stage)
    pytest.skip("examples/ is not beside tests/", allow_module_level=True)


def run(name: str) -> str:
    """Run examples/`name` in a fresh interpreter from an empty directory; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no warning either
    return proc.stdout


def number(pattern: str, text: str) -> list[float]:
    m = re.search(pattern, text)
    assert m is not None, (pattern, text)
    return [float(g) for g in m.groups()]


def test_numpy_mlp_learns() -> None:
    out = run("numpy_mlp.py")
    first, final = number(r"loss: ([\d.]+) -> ([\d.]+)", out)
    assert first > 0.5 and final < first / 5  # from chance (ln 2) to a fit
    (acc,) = number(r"train accuracy: ([\d.]+)%", out)
    assert acc > 95.0  # XOR is not linearly separable: the hidden layer learned


def test_checkpoint_resume_is_bit_exact() -> None:
    out = run("checkpoint_resume.py")
    assert "resumed at step 15," in out
    assert out.rstrip().endswith("resumed == uninterrupted, bit for bit: True")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torch_training_learns_and_matches_torch() -> None:
    out = run("torch_training.py")
    first, final = number(r"loss: ([\d.]+) -> ([\d.]+)", out)
    assert final < first / 10
    (diff,) = number(r"over the weights: ([\d.e+-]+)", out)
    assert diff < 1e-5  # the same trajectory as torch.optim.AdamW, to rounding


def test_every_example_is_tested() -> None:
    # mpi_mlp.py: tests/test_distributed.py (it runs under mpiexec)
    tested = {"numpy_mlp.py", "checkpoint_resume.py", "torch_training.py", "mpi_mlp.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
