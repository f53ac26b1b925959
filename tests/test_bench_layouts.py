"""``fastoptim bench --layouts``: every precision layout's row, its exact bytes, and the checks
that flag impossible cells (timings are printed, never asserted)."""

from __future__ import annotations

import importlib.util
import re
import time

import numpy as np
import pytest

import fastoptim as fo
from fastoptim.apps import bench, cli

pytest.importorskip("ml_dtypes")

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NUMBER = r"[\d.]+"
ROW = re.compile(
    rf"^(?P<name>.+?)\s+(?P<bytes>\d+)\s+(?P<ns>{NUMBER})\s+(?P<spread>\d+)%\s+"
    rf"(?P<gbps>{NUMBER})\s+(?P<roof>\d+)%(?P<mark>[! ])\s+(?P<rel>{NUMBER})x(?P<sure>[? ])\s+"
    r"(?P<traffic>\S.*)$"
)
# The bytes per element each layout must move (read + write), worked out by hand:
EXPECTED = {
    "fp32": 28,  # p, m, v float32 read and written (3 x 8) + float32 gradient read (4)
    "bf16 p/g, fp32 state": 22,  # p 2+2, g 2, m and v 4+4 each
    "all-bf16": 14,  # p, m, v 2+2 each, g 2
    "all-bf16, stochastic": 14,
    "bf16 p/g, fp32 master": 28,  # master, m, v 4+4 each, g 2, the bf16 parameter written 2
    "offload": 28,  # p, m, v 4+4 each, bf16 g 2, bf16 copy written 2
    "offload, stochastic": 28,
    "fp32 p/g, int8 state": 16,  # p 4+4, g 4, m and v codes 1+1 each (absmax: 1/16 B)
    "bf16 p/g, int8 state": 10,  # p 2+2, g 2, m and v codes 1+1 each
    "fp32 p/g, int4 state": 14,  # p 4+4, g 4, m and v codes .5+.5 each (absmax: 1/8 B)
    "bf16 p/g, int4 state": 8,  # p 2+2, g 2, m and v codes .5+.5 each
    "fp16 p/g, fp32 state": 22,
    "all-fp16": 14,
    "torch fused bf16": 14,  # torch keeps bf16 state for bf16 parameters
    "torch fused fp32": 28,
    "DeepSpeed CPUAdam fp32": 28,  # where deepspeed is installed
    "DeepSpeed CPUAdam bf16": 22,  # bf16 p/g, fp32 state (fp32_optimizer_states=True)
    "cast around fp32 step": 28,  # the work of the master layout (it moves more)
}


def _rows(out: str) -> dict[str, re.Match[str]]:
    return {m["name"]: m for line in out.splitlines() if (m := ROW.match(line))}


def test_layouts_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--layouts", "--size", "20000", "--rounds", "1", "--repeats", "1"]
    assert cli.main([*args, "--threads", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    rows = _rows(out)
    want = {k for k in EXPECTED if HAVE_TORCH or not k.startswith("torch")}
    if not (HAVE_TORCH and HAVE_DEEPSPEED):
        want -= {k for k in want if k.startswith("DeepSpeed")}
    assert set(rows) == want, out
    for name, m in rows.items():
        assert int(m["bytes"]) == EXPECTED[name], name
        assert float(m["ns"]) > 0 and float(m["gbps"]) > 0 and int(m["roof"]) > 0
        # "!" exactly on rooflines above 110% (printed rounded)
        assert int(m["roof"]) >= 110 if m["mark"] == "!" else int(m["roof"]) <= 110
    assert rows["fp32"]["rel"] == "1.00"
    assert "one tensor of 20,000 elements" in out
    streams = re.findall(
        r"^ +(\d+) B/el: +[\d.]+ ns/el \+-\d+%, +[\d.]+ GB/s  \((.*)\)$", out, re.M
    )
    assert sorted(int(b) for b, _ in streams) == [8, 10, 14, 14, 16, 22, 28, 28]
    assert "fastoptim layouts below 90% of their roofline:" in out
    # each layout listed below 90%: its compute floor beside its streaming kernel's time, and
    # "compute-bound" exactly where the floor alone keeps it under 90%
    listed = re.findall(
        r"^    (.+?) (\d+)% \(compute alone ([\d.]+) ns/el, its streaming kernel ([\d.]+)"
        r"(: compute-bound)?\)$",
        out,
        re.M,
    )
    for name, roof, floor, stream, bound in listed:
        assert name in rows and int(roof) == int(rows[name]["roof"]) <= 90, name  # (rounded)
        assert bool(bound) == (float(floor) > float(stream) / 0.9 + 1e-3) or (
            abs(float(floor) - float(stream) / 0.9) <= 1e-3  # (printed rounded)
        ), name
    fastoptim_layouts = {lay.name for lay in bench.LAYOUTS if lay.contender is None}
    ours = {k: int(m["roof"]) for k, m in rows.items() if k in fastoptim_layouts}
    assert {k for k, r in ours.items() if r < 90} <= {x[0] for x in listed}, out
    assert ("torch fused bf16 / offload time:" in out) == HAVE_TORCH
    assert re.search(r"^bench took \d+ s$", out, re.M)
    assert "[1/" in captured.err and "set up fp32" in captured.err  # progress on stderr
    assert cli.main([*args, "--no-torch", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and not any(k.startswith("torch") for k in _rows(captured.out))


def _stream_traffic(s: bench.Stream) -> tuple[float, float]:
    """(bytes read, bytes written) per element by a streaming configuration: each array read
    and written once, the gradient read, the 16-bit copy written."""
    rw = 4 * s.rw32 + 2 * s.rw16 + (1 if s.codes else 0)
    return rw + s.grad, rw + (2 if s.out else 0)


def test_layout_bytes_match_the_arrays() -> None:
    """Each fastoptim layout's bytes, counted from the arrays its optimizer really holds, equal
    its streaming kernel's, in the same mix of reads and writes: the same widths read and
    written, gradient read, written only (a plain store also reads the line first, so a
    written-only array stands for nothing but a written-only array)."""
    for lay in bench.LAYOUTS:
        if lay.contender:
            continue
        policy = dict(lay.options).get("state_dtype")
        quantized = policy in ("int8", "int4")
        n = 4096 if quantized else 64  # (smaller tensors keep float32 state)
        pdt, gdt = bench._np_dtype(lay.param), bench._np_dtype(lay.grad)
        opt = fo.AdamW([np.ones(n, pdt)], **bench.ADAMW, **dict(lay.options))
        writes: list[int] = []
        if lay.copy_out:
            copy = np.zeros(n, bench._np_dtype(lay.copy_out))
            opt.set_copy_out([copy])
            writes.append(copy.itemsize)
        opt.step([np.ones(n, gdt)])
        state = {k: v for k, v in opt.state[0].items() if k != "step"}
        scales = sum(v.nbytes for k, v in state.items() if k.endswith("_absmax"))
        block = 128 if policy == "int4" else 256
        assert scales == (2 * 4 * n // block if quantized else 0), lay.name
        # bytes per element of each array read and written (a 4-bit code array: 0.5)
        rw = [v.nbytes / n for k, v in state.items() if not k.endswith("_absmax")]
        if quantized:
            assert sorted(rw) == ([1, 1] if policy == "int8" else [0.5, 0.5]), lay.name
        if "master" in state:  # computed on the master: the parameter is written only
            writes.append(pdt.itemsize)
        else:
            rw.append(pdt.itemsize)
        s = lay.stream
        assert _stream_traffic(s) == (sum(rw) + gdt.itemsize, sum(rw) + sum(writes)), lay.name
        assert gdt.itemsize == s.grad and len(writes) == s.out, lay.name
        assert 2 * sum(rw) + gdt.itemsize + sum(writes) == lay.bytes == EXPECTED[lay.name]
    for lay in bench.LAYOUTS:  # contenders are charged the bytes of the same work
        assert lay.bytes == EXPECTED[lay.name]


def test_int4_streams_read_and_write_the_codes() -> None:
    """The 4-bit layouts' streaming kernels read and write 1 B per element for the two packed
    code arrays (not a 16-bit array written only: a plain store reads the line too, so that
    stood for ~4 B): 9 B read + 5 B written (fp32 p/g), 5 + 3 (bf16 p/g)."""
    assert bench.Q4 == bench.Stream(1, 0, 4, codes=True) and bench.Q4.bytes == 14
    assert bench.Q4_LOW == bench.Stream(0, 1, 2, codes=True) and bench.Q4_LOW.bytes == 8
    assert _stream_traffic(bench.Q4) == (9, 5) and _stream_traffic(bench.Q4_LOW) == (5, 3)
    assert "1 B r/w" in bench.Q4.label and "16-bit w" not in bench.Q4.label
    n = 4096  # the kernel itself: every array read, the written ones written, codes too
    pool = {
        "f32": [np.full(n, 2.0, np.float32)],
        "h16": [np.ones(n, bench._np_dtype("bfloat16"))],
        "g32": [np.full(n, 4.0, np.float32)],
        "g16": [np.ones(n, bench._np_dtype("bfloat16"))],
        "out": [],
        "codes": [np.full(n, 6, np.uint8)],
    }
    bench._stream_step(bench.Q4, pool)()
    assert (pool["f32"][0] == 4.0).all()  # (2 + 4 + 6) / 3
    assert (pool["codes"][0] == pool["codes"][0][0]).all() and pool["codes"][0][0] != 6
    assert (pool["g32"][0] == 4.0).all()  # the gradient is only read


def test_layouts_remeasure_then_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """A streaming kernel that cannot be beaten honestly: every row is re-measured, then
    flagged, with "!" in its roofline cell."""

    def slow(rw: object, grad: object, out: object = None, codes: object = None) -> None:
        time.sleep(0.05)  # 20,000 x 28 B in 50 ms: 11 MB/s

    monkeypatch.setattr(bench._core, "stream_mixed", slow)
    seen: list[str] = []
    threads = fo.get_num_threads()
    fo.set_num_threads(1)
    try:
        result = bench.run_layouts(
            20000,
            repeats=1,
            rounds=1,
            torch=False,
            progress=seen.append,
            compute_size=4096,
            compute_samples=1,
        )
    finally:
        fo.set_num_threads(threads)
    assert fo.get_num_threads() == threads
    assert [r.optimizer for r in result.rows] == [
        lay.name for lay in bench.LAYOUTS if lay.contender not in ("torch", "deepspeed")
    ]
    for r in result.rows:
        assert r.remeasured == bench.MAX_REMEASURE and r.rounds == 1 + bench.MAX_REMEASURE
        assert any(f.startswith("roofline") and f.endswith("> 110%") for f in r.flags), r.flags
    assert sum(s.startswith("    re-measuring every contender") for s in seen) == 2
    table = bench.format_layouts(result)
    assert "%!" in table and "offload, after 3 rounds: roofline" in table
    assert "Do not trust this row." in table
    assert "(skipped: " not in table  # torch=False: not asked for, so not "skipped"
    # every fastoptim layout's compute cost, in its row and against issue #17's targets
    ours = [lay.name for lay in bench.LAYOUTS if lay.contender is None]
    assert sorted(result.compute) == sorted(ours) and result.threads == 1
    for name in ours:
        cost = result.compute[name]
        assert 0 < cost < 1e-6, (name, cost)  # under 1 us per element
        row = next(line for line in table.splitlines() if line.startswith(f"{name:24s} "))
        assert f"{cost * 1e9:7.3f}" in row, (name, row)
    cast = next(line for line in table.splitlines() if line.startswith("cast around"))
    assert f"{'-':>7s}  needs as bf16 master" in cast  # contenders: no compute column
    floor, adamw = (result.compute[k] * 1e9 for k in ("fp32 p/g, int8 state", "fp32"))
    assert f"compute alone at 1 thread(s): {floor:.3f}, fp32-state AdamW's {adamw:.3f}" in table


def test_compute_cost_one_thread_then_restored() -> None:
    """compute_cost runs the layout on one thread (CPU time of the caller: a step dispatched to
    another thread would read as zero) and puts the thread count back."""
    threads = fo.get_num_threads()
    lay = next(lay for lay in bench.LAYOUTS if lay.name == "fp32")
    cost = bench.compute_cost(lay, size=8192, samples=3)
    assert fo.get_num_threads() == threads
    # AdamW reads and writes 28 B per element: no core does that in under 0.01 ns
    assert 1e-11 < cost < 1e-6
    # 8-bit state does the float32 step's arithmetic and decodes and encodes two states: more
    # CPU time per element (about twice; CPU time is not the wall time other processes steal)
    q8 = next(lay for lay in bench.LAYOUTS if lay.name == "fp32 p/g, int8 state")
    assert bench.compute_cost(q8, size=65536, samples=5) > bench.compute_cost(
        lay, size=65536, samples=5
    )


def test_size_only_with_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--size", "1000"])
    assert "--size: only with --layouts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--layouts", "--size", "0"])
    assert "must be > 0" in capsys.readouterr().err


def test_contender_targets_and_their_ceiling() -> None:
    """A contender's time over ours, and the most any step could show: the contender's time
    over the streaming kernel of our layout's bytes."""
    n = 1000

    def row(name: str, t: float, roof: float) -> bench.Row:
        lay = next(lay for lay in bench.LAYOUTS if lay.name == name)
        r = bench.Row(name, "layouts", n, 1, 2, bpe=lay.bytes, rounds=1)
        r.times = {"fastoptim": t, "roofline": roof}
        r.low, r.high = dict(r.times), dict(r.times)
        r.steps = {"fastoptim": 1, "roofline": 1}
        return r

    result = bench.LayoutResult(
        n,
        [
            row("all-bf16", 1.0e-6, 0.9e-6),
            row("torch fused bf16", 1.5e-6, 0.9e-6),
            row("bf16 p/g, fp32 state", 2.0e-6, 1.6e-6),
            row("DeepSpeed CPUAdam bf16", 3.0e-6, 1.6e-6),
        ],
        {},
    )
    table = bench.format_layouts(result)
    assert (
        "torch fused bf16 / all-bf16 time: 1.50 [1.50-1.50] (>= 2; at most 1.67 for a step at "
        "its streaming kernel's speed)" in table
    ), table
    assert (
        "DeepSpeed CPUAdam bf16 / bf16 p/g, fp32 state time: 1.50 [1.50-1.50] (>= 1.25; at "
        "most 1.88" in table
    ), table
    assert "torch fused bf16 / offload" not in table  # no offload row
