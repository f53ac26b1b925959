"""fastoptim.torch inside torch.distributed's harnesses, with real processes (``mpiexec -n 2``
and ``-n 3`` start tests/torch_dist_worker.py; gloo on the CPU): DistributedDataParallel,
ZeroRedundancyOptimizer(optimizer_class=fastoptim.torch.AdamW) and FSDP2 (DTensor
parameters, an empty shard with 3 ranks), each compared bit for bit with one process stepping
fastoptim.torch.AdamW on the mean of the ranks' gradients."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as ft  # noqa: E402
from test_distributed import MPIEXEC, launch  # noqa: E402
from torch_dist_worker import ADAMW, CLIP, INT8, STEPS, batch, make_model  # noqa: E402

WORKER = Path(__file__).resolve().parent / "torch_dist_worker.py"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and an mpiexec (pip install 'fastoptim[mpi]')",
)


def one_process(n: int, case: str) -> list[np.ndarray]:
    """The same training in one process: each rank's gradient computed apart, their mean (as
    the harnesses reduce them: the sum of the ranks' gradients / n), one AdamW step."""
    model = make_model(case)
    kw = INT8 if case.endswith("8") else {}
    clip = CLIP if case.startswith("ddp") else None
    opt = ft.AdamW(model.parameters(), **ADAMW, **kw, max_grad_norm=clip)
    params = list(model.parameters())
    if kw:  # (the first weight's state is quantized)
        assert params[0].numel() >= 4096
    for t in range(STEPS):
        per_rank = []
        for r in range(n):
            opt.zero_grad()
            x, y = batch(t, r, case)
            torch.nn.functional.mse_loss(model(x), y).backward()
            per_rank.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            total = per_rank[0][i] / n
            for g in per_rank[1:]:
                total = total + g[i] / n
            p.grad = total
        opt.step()
    return [p.detach().numpy().copy() for p in params]


@pytest.fixture(scope="module", params=[2, 3])
def run(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[Any]]:
    n = request.param
    out = tmp_path_factory.mktemp(f"torch{n}")
    launch(n, out, script=WORKER)
    ranks = []
    for r in range(n):
        with np.load(out / f"torch-n{n}-rank{r}.npz") as f:
            ranks.append(dict(f))
    return n, ranks


@pytest.mark.parametrize("case", ["ddp", "zero", "fsdp", "ddp8", "zero8"])
def test_matches_one_process(case: str, run: tuple[int, list[Any]]) -> None:
    n, ranks = run
    want = one_process(n, case)
    for r, res in enumerate(ranks):
        for i, w in enumerate(want):
            got = res[f"{case}/p{i}"]
            if n == 2:  # (g0 / 2 + g1 / 2 is exact in any order)
                np.testing.assert_array_equal(got, w, err_msg=f"{case} rank {r} param {i}")
            else:  # three terms: the harness's summation order may differ in the last bit
                np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "start"),
    [
        ("int8", "AdamW: param 0 of group 0: state_dtype 'int8' quantizes whole "),
        ("lamb", "LAMB: param 0 of group 0: a trust ratio needs each whole parameter's norms"),
        ("muon", "Muon: param 0 of group 0: the update is not element-wise (it needs each whole"),
        ("adafactor", "Adafactor: param 0 of group 0: the update is not element-wise (it needs"),
        ("lbfgs", "LBFGS: param 0 of group 0: the update is not element-wise (it needs all the"),
    ],
)
def test_fsdp_refuses_what_needs_whole_parameters(
    kind: str, start: str, run: tuple[int, list[Any]]
) -> None:
    """FSDP2 where a shard's update would differ from the whole parameter's (int8 state's
    blocks, a trust ratio, Muon's orthogonalisation, Adafactor's factored moments, LBFGS's
    directions): every rank's step is refused before any state is made or parameter changed
    (the worker checks), naming the parameter and why.  (int8 state raised torch's
    "aten.fill_.Tensor does not have a sharding strategy registered"; Muon and LBFGS stepped
    each rank's shard as if it were the whole, silently wrong; Adafactor raised NumPy's
    broadcasting error.)"""
    _, ranks = run
    for res in ranks:
        msg = str(res[f"refused/{kind}"])
        assert msg.startswith(start), msg
        assert "DTensor (FSDP2)" in msg
