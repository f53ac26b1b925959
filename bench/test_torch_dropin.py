"""``fastoptim.torch`` against ``torch.optim`` (for-loop, foreach and fused) on CPU tensors.

    python -m pytest bench/test_torch_dropin.py --benchmark-only --benchmark-columns=median
    python bench/test_torch_dropin.py     # the same steps, round-robin (see `interleaved`)
    python bench/test_torch_dropin.py --openmp   # one OpenMP runtime or two (see `openmp`)
    python bench/test_torch_dropin.py --overhead # a step's fixed and per-tensor cost, 1 thread

Workloads: one 16M-element tensor (memory-bound), a small MLP (784x256, 256, 256x256, 256,
256x10, 10: overhead-bound) and 4096 tensors of 4096 elements (per-tensor overhead).  float32.

Each timed call assigns new gradient tensors (alternating between two preallocated sets, as a
training loop with ``zero_grad(set_to_none=True)`` does) and steps: the same work for every
implementation.  ``fastoptim-samegrads`` keeps the same gradient tensors every step
(``zero_grad(set_to_none=False)``), fastoptim's fastest path.  After timing, every body replays
as many steps with ``torch.optim``'s for-loop on a sample of the tensors and checks the result
(a fast wrong step must not win).

pytest-benchmark repeats one implementation's step back to back, so a small model's tensors
stay in the caches; the round-robin table runs the implementations in turn, which evicts them
as a training step's forward and backward passes would, and spreads background load on a
shared machine evenly.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")

import fastoptim as fo  # noqa: E402
import fastoptim.torch as fot  # noqa: E402

WORKLOADS: dict[str, list[tuple[int, ...]]] = {
    "16M": [(1 << 24,)],
    "mlp": [(256, 784), (256,), (256, 256), (256,), (10, 256), (10,)],
    "4096x4096": [(4096,)] * 4096,
}
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=1e-2),
    "SGD": dict(lr=1e-2, momentum=0.9),
    "Adagrad": dict(lr=1e-2),
    "RMSprop": dict(lr=1e-3),
}
FUSED = {"Adam", "AdamW", "SGD", "Adagrad"}  # torch.optim's CPU fused kernels
IMPLS = ["fastoptim", "fastoptim-samegrads", "torch-forloop", "torch-foreach", "torch-fused"]
SAMPLE = 4096  # elements per checked tensor
ROUNDS = {"16M": 30, "mlp": 300, "4096x4096": 10}  # timed steps (the median is reported)
STATE_TENSORS = {"Adam": 2, "AdamW": 2, "SGD": 1, "Adagrad": 1, "RMSprop": 1}


def make_optimizer(impl: str, name: str, params: list[Any]) -> Any:
    kwargs = OPTIMIZERS[name]
    if impl.startswith("fastoptim"):
        return getattr(fot, name)(params, **kwargs)
    flags = {
        "torch-forloop": dict(foreach=False),
        "torch-foreach": dict(foreach=True),
        "torch-fused": dict(fused=True),
    }[impl]
    return getattr(torch.optim, name)(params, **kwargs, **flags)


def sample(t: Any) -> Any:
    return t.reshape(-1)[:SAMPLE]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_step(benchmark: Any, workload: str, name: str, impl: str) -> None:
    if impl == "torch-fused" and name not in FUSED:
        pytest.skip(f"torch.optim.{name} has no fused CPU kernel")
    gen = torch.Generator().manual_seed(0)
    shapes = WORKLOADS[workload]
    params = [torch.randn(s, generator=gen) for s in shapes]
    gradsets = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    checked = list(range(min(len(params), 4)))
    initial = [sample(params[i]).clone() for i in checked]
    opt = make_optimizer(impl, name, params)
    calls = [0]

    def step_new_grads() -> None:
        grads = gradsets[calls[0] % 2]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        calls[0] += 1

    def step_same_grads() -> None:
        opt.step()
        calls[0] += 1

    body: Callable[[], None] = step_new_grads
    if impl == "fastoptim-samegrads":
        for p, g in zip(params, gradsets[0]):
            p.grad = g
        body = step_same_grads
    elements = sum(p.numel() for p in params)
    benchmark.group = f"torch-{workload}-{name}"
    benchmark.extra_info.update(
        impl=impl,
        isa=fo.isa(),
        fastoptim_threads=fo.get_num_threads(),
        torch_threads=torch.get_num_threads(),
        tensors=len(params),
        elements=elements,
        bytes_moved=elements * 4 * (3 + 2 * STATE_TENSORS[name]),
    )
    benchmark.pedantic(body, rounds=ROUNDS[workload], iterations=1, warmup_rounds=2)

    # Replay the same steps with torch.optim's for-loop on samples of the checked tensors.
    ref_params = [p.clone() for p in initial]
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **OPTIMIZERS[name])
    for k in range(calls[0]):
        grads = gradsets[0 if impl == "fastoptim-samegrads" else k % 2]
        for j, i in enumerate(checked):
            ref_params[j].grad = sample(grads[i]).clone()
        ref.step()
    for j, i in enumerate(checked):
        torch.testing.assert_close(sample(params[i]), ref_params[j], rtol=1e-4, atol=1e-5)


def interleaved(rounds: dict[str, int] | None = None) -> None:
    """Print the median step time of every implementation and its range (fastest-slowest
    step), measured round-robin (one step of each implementation in turn, in a shuffled order
    every round) so that background load on a shared machine hits all of them alike:
    ``python bench/test_torch_dropin.py``."""
    import random
    import statistics
    import time

    rounds = rounds or {"16M": 40, "mlp": 400, "4096x4096": 20}
    print(
        f"fastoptim {fo.__version__} isa={fo.isa()} threads={fo.get_num_threads()}; "
        f"torch {torch.__version__} threads={torch.get_num_threads()}; ms per step: median "
        "[fastest-slowest] of the rounds"
    )
    print(f"{'workload':10} {'optimizer':8}" + "".join(f"{i:>27}" for i in IMPLS))
    for workload, shapes in WORKLOADS.items():
        for name in OPTIMIZERS:
            gen = torch.Generator().manual_seed(0)
            gradsets = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
            runs: dict[str, tuple[Any, list[Any], list[float]]] = {}
            for impl in IMPLS:
                if impl == "torch-fused" and name not in FUSED:
                    continue
                params = [torch.randn(s, generator=gen) for s in shapes]
                if impl == "fastoptim-samegrads":
                    for p, g in zip(params, gradsets[0]):
                        p.grad = g
                runs[impl] = (make_optimizer(impl, name, params), params, [])
            order = list(runs)
            for r in range(rounds[workload] + 2):
                random.shuffle(order)
                for impl in order:
                    opt, params, times = runs[impl]
                    if impl != "fastoptim-samegrads":
                        for p, g in zip(params, gradsets[r % 2]):
                            p.grad = g
                    start = time.perf_counter()
                    opt.step()
                    if r >= 2:
                        times.append(time.perf_counter() - start)
            cells = []
            for impl in IMPLS:
                if impl in runs:
                    times = runs[impl][2]
                    cell = (
                        f"{statistics.median(times) * 1e3:.3f} "
                        f"[{min(times) * 1e3:.3f}-{max(times) * 1e3:.3f}]"
                    )
                    cells.append(f"{cell:>27}")
                else:
                    cells.append(f"{'-':>27}")
            print(f"{workload:10} {name:8}" + "".join(cells), flush=True)
            del runs


OPENMP_CONFIGS = {  # import order, FASTOPT_TORCH_OPENMP
    "torch first": ("torch,fastoptim", "1"),
    "fastoptim first": ("fastoptim,torch", "1"),
    "fastoptim first, FASTOPT_TORCH_OPENMP=0": ("fastoptim,torch", "0"),
}


# Run in a fresh process (this module imports torch first): import in the order given, then
# print (JSON) the median time of a training iteration (784-256-256-10 MLP, batch 128: forward,
# backward, fastoptim.torch.Adam step), of a 256K-element Adam step right after a torch op, and
# of a torch op right after such a step.
OPENMP_CHILD = """
import importlib, json, statistics, sys, time
for name in sys.argv[1].split(","):
    importlib.import_module(name)
import torch, fastoptim, fastoptim.torch as fot
torch.set_num_threads(2)
fastoptim.set_num_threads(2)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 10),
)
opt = fot.Adam(model.parameters(), lr=1e-3)
x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
a, b, c, p = torch.randn(1 << 18), torch.randn(1 << 18), torch.empty(1 << 18), torch.randn(1 << 18)
p.grad = torch.randn(1 << 18)
small = fot.Adam([p], lr=1e-6)
times = {"train_ms": [], "step_after_op_us": [], "op_after_step_us": []}
for i in range(170):
    t0 = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    t1 = time.perf_counter()
    torch.add(a, b, out=c)
    t2 = time.perf_counter()
    small.step()
    t3 = time.perf_counter()
    torch.add(a, b, out=c)
    t4 = time.perf_counter()
    if i >= 20:
        times["train_ms"].append((t1 - t0) * 1e3)
        times["step_after_op_us"].append((t3 - t2) * 1e6)
        times["op_after_step_us"].append((t4 - t3) * 1e6)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def openmp(rounds: int = 10) -> None:
    """Two OpenMP runtimes or one: each configuration of :data:`OPENMP_CONFIGS` in its own
    process, round-robin (shuffled every round), ``rounds`` processes each; prints the median
    over processes of each process's medians, and their range.  With a source build every
    configuration shares one runtime; with the binary wheel (vendored libgomp), ``fastoptim first,
    FASTOPT_TORCH_OPENMP=0`` runs two:  ``python bench/test_torch_dropin.py --openmp``."""
    import json
    import os
    import random
    import statistics
    import subprocess
    import sys

    results: dict[str, list[dict[str, float]]] = {k: [] for k in OPENMP_CONFIGS}
    for _ in range(rounds):
        order = list(OPENMP_CONFIGS)
        random.shuffle(order)
        for name in order:
            imports, share = OPENMP_CONFIGS[name]
            env = dict(os.environ, FASTOPT_TORCH_OPENMP=share)
            out = subprocess.run(
                [sys.executable, "-c", OPENMP_CHILD, imports],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[name].append(json.loads(out))
    print(
        f"fastoptim {fo.__version__} from {os.path.dirname(fo.__file__)}; torch {torch.__version__}"
    )
    print("median [lowest-highest] over the processes")
    print(f"{'configuration':42} {'MLP iteration':>24} {'step after op':>20} {'op after step':>20}")
    for name, runs in results.items():
        cells = []
        for k, (digits, unit) in zip(runs[0], ((2, "ms"), (0, "us"), (0, "us"))):
            v, f = [r[k] for r in runs], f".{digits}f"
            cells.append(f"{statistics.median(v):{f}} [{min(v):{f}}-{max(v):{f}}] {unit}")
        print(f"{name:42} {cells[0]:>24} {cells[1]:>20} {cells[2]:>20}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--openmp"]:
        openmp()
    elif sys.argv[1:2] == ["--overhead"]:  # fixed and per-tensor cost of a step (1 thread)
        from fastoptim.apps import bench

        torch.set_num_threads(1)
        fo.set_num_threads(1)
        print(bench.format_torch_overhead(bench.torch_step_overhead()))
    else:
        interleaved()
