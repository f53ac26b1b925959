"""The ``fastoptim`` command, end to end on tiny settings (timings are printed, never
asserted)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastoptim as fo
from fastoptim.apps import bench, cli

BENCH_ROW = re.compile(
    r"^(?P<name>SGD|Adam)\s+(?P<bytes>\d+)\s+(?P<time>[\d.]+) (?P<unit>us|ms)\s+(?P<spread>\d+)%\s+"
    r"(?P<ns>[\d.]+)\s+(?P<gbps>[\d.]+)\s+(?P<roof>\d+)%(?P<mark>[! ])\s*(?P<numpy>[\d.]+)x"
)


def test_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--optimizers", "sgd,ADAM", "--workloads", "MLP", "--repeats", "1"]
    assert cli.main([*args, "--rounds", "1", "--no-torch", "--overhead"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    rows = {m["name"]: m for line in out.splitlines() if (m := BENCH_ROW.match(line))}
    assert set(rows) == {"SGD", "Adam"}  # names in any case
    assert int(rows["SGD"]["bytes"]) == 12 and int(rows["Adam"]["bytes"]) == 28  # bytes/elem
    assert all(float(m["gbps"]) > 0 and int(m["roof"]) > 0 for m in rows.values())
    for m in rows.values():  # "!" exactly on rooflines above 110% (printed rounded)
        assert int(m["roof"]) >= 110 if m["mark"] == "!" else int(m["roof"]) <= 110
    assert "mlp: 6 tensor(s), 269,322 float32 elements" in out
    assert out.count("opt.step() overhead") == 3
    assert re.search(r"^bench took \d+ s$", out, re.M)
    # progress on stderr by default, one line per cell
    assert "[1/2] mlp: SGD" in captured.err and "[2/2] mlp: Adam" in captured.err
    assert cli.main([*args, "--rounds", "1", "--no-torch", "--optimizers", "sgd", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_bench_table_columns_fit_long_names(capsys: pytest.CaptureFixture[str]) -> None:
    """The optimizer column widens to the longest name: every row's numbers stay under their
    headers."""
    args = ["bench", "--optimizers", "sgd,AdamWScheduleFree", "--workloads", "mlp"]
    assert cli.main([*args, "--repeats", "1", "--rounds", "1", "--no-torch", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("optimizer"))
    end = header.index("B/el") + 4  # B/el is right-aligned under its header
    rows = [line for line in lines if line.startswith(("SGD ", "AdamWScheduleFree "))]
    assert len(rows) == 2
    for line in rows:
        assert line[end - 4 : end].strip().isdigit() and line[end] == " ", line
        assert line.index(" ") <= end - 5  # the name leaves the B/el field alone


def _row(**times: tuple[float, float, float]) -> bench.Row:
    """A bench row with (low, median, high) seconds per contender: mlp-sized, SGD."""
    row = bench.Row("SGD", "mlp", 1 << 20, 1, 0)
    row.low = {k: v[0] for k, v in times.items()}
    row.times = {k: v[1] for k, v in times.items()}
    row.high = {k: v[2] for k, v in times.items()}
    row.steps = dict.fromkeys(times, 10)
    row.rounds = 3
    return row


def test_bench_checks_flag_impossible_cells() -> None:
    sane = _row(
        fastoptim=(1.0e-3, 1.0e-3, 1.1e-3),
        roofline=(0.9e-3, 0.9e-3, 0.95e-3),
        **{"NumPy reference": (5e-3, 5e-3, 5.2e-3)},
    )
    assert bench.problems(sane, 1e-9) == []
    fast = _row(
        fastoptim=(1e-5, 1e-5, 1e-5),
        roofline=(1e-3, 1e-3, 1e-3),
        **{"NumPy reference": (5e-3, 5e-3, 5e-3)},
    )
    assert bench.problems(fast, 1e-9) == ["roofline 10000% > 110%"]
    noisy = _row(
        fastoptim=(1e-3, 1e-3, 4e-3),
        roofline=(0.9e-3, 0.9e-3, 0.9e-3),
        **{"NumPy reference": (5e-3, 5e-3, 5e-3)},
    )
    assert bench.problems(noisy, 1e-9) == ["rounds spread > +-25%: fastoptim"]
    starved = _row(  # 12 MB at 0.5 GB/s: slower than one core streams
        fastoptim=(24e-3, 24e-3, 25e-3),
        roofline=(1e-3, 1e-3, 1e-3),
        **{"NumPy reference": (50e-3, 50e-3, 50e-3)},
    )
    assert bench.problems(starved, 1e-9)[0].startswith("fastoptim below 1 GB/s")
    assert bench.problems(sane, 1e-3) == [  # a clock that ticks every ms
        "samples near the clock's granularity: fastoptim, roofline, NumPy reference"
    ]
    fast.flags = bench.problems(fast, 1e-9)
    noisy.flags = []
    table = bench.format_table([fast, noisy])
    assert "10000%!" in table  # marked in the cell...
    assert "! SGD, after 3 rounds: roofline 10000% > 110%. Do not trust this row." in table
    assert re.search(r"\s5\.0x\?", table)  # 5 ms / 1-4 ms: a ratio the rounds cannot pin down
    assert re.search(r"\s500\.0x ", table)  # 5 ms / 10 us in every round: certain, if flagged
    assert noisy.ratio("NumPy reference") == (5.0, 1.25, 5.0)


def test_bench_remeasures_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_stream(streams: object) -> None:  # a roofline that cannot be beaten honestly
        time.sleep(0.2)  # 16 MB/s: any real step beats it, busy machine or not

    monkeypatch.setattr(bench._core, "stream", slow_stream)
    seen: list[str] = []
    threads = fo.get_num_threads()
    fo.set_num_threads(1)  # no OpenMP region waiting for a busy core
    try:
        (row,) = bench.run(["SGD"], ["mlp"], repeats=1, rounds=1, torch=False, progress=seen.append)
    finally:
        fo.set_num_threads(threads)
    assert row.remeasured == bench.MAX_REMEASURE and row.rounds == 1 + bench.MAX_REMEASURE
    assert any(f.startswith("roofline") and f.endswith("> 110%") for f in row.flags), row.flags
    assert seen[0] == "[1/1] mlp: SGD" and seen[1].startswith("    re-measuring (roofline")


def test_bench_size_sweep_honours_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    ranges: dict[str, list[tuple[float, float]]] = {}
    curves = bench.size_sweep(
        [16, 256], repeats=1, rounds=3, torch=False, progress=seen.append, ranges=ranges
    )
    assert set(curves) == set(ranges) == {"fastoptim", "NumPy reference"}  # no torch
    assert all(len(v) == 2 and min(v) > 0 for v in curves.values())
    for name, medians in curves.items():
        assert all(lo <= m <= hi for m, (lo, hi) in zip(medians, ranges[name]))
    assert seen == ["[1/2] Adam, 16 elements", "[2/2] Adam, 256 elements"]


def test_bench_plot_into_new_directory(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "SWEEP_SIZES", (16, 64))
    out = tmp_path / "new" / "dir"
    args = ["bench", "--optimizers", "SGD", "--workloads", "mlp", "--rounds", "1", "--no-torch"]
    assert cli.main([*args, "--repeats", "1", "--plot", "--out", str(out)]) == 0
    assert f"wrote {out / 'bench_adam_sizes.png'}" in capsys.readouterr().out
    assert (out / "bench_adam_sizes.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--optimizers", "Adamm"])
    assert "unknown Adamm" in capsys.readouterr().err


def test_workload_shapes() -> None:
    def size(shapes: list[tuple[int, ...]]) -> int:
        return sum(math.prod(s) for s in shapes)

    bert = bench.WORKLOADS["bert"]()
    assert 190 <= len(bert) <= 210 and 105e6 < size(bert) < 115e6
    assert size(bench.WORKLOADS["mlp"]()) == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert bench.WORKLOADS["many"]() == [(4096,)] * 4096
    assert bench.bytes_per_element(0) == 12 and bench.bytes_per_element(2) == 28
    assert bench.bytes_per_element(3) == 36 and bench.bytes_per_element(2, itemsize=8) == 56


def test_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastoptim", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "bench" in out and "demo" in out and "minimize" in out


@pytest.mark.parametrize("command", ["demo", "minimize", "bench"])
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastoptim {command}") and "--optimizers" in out


# ------------------------------------------------- the other bench modes: accounting and flags
def _stat(median: float, spread: float = 0.0) -> bench.Stat:
    return (median, median * (1 - spread), median * (1 + spread))


def test_one_rule_for_impossible_speeds() -> None:
    """Every table flags by over_limit (ROOFLINE_LIMIT): 110% of what the reference allows
    passes, more does not; check_timings also names starved and noisy contenders."""
    assert bench.ROOFLINE_LIMIT == 1.10
    assert not bench.over_limit(1.10) and bench.over_limit(1.11)
    times = {"row": _stat(1.0), "ref": _stat(1.08), "noisy": _stat(1.0, 0.3)}
    assert bench.check_timings(times, [("row", "ref", 1.0)]) == []  # 108%: not flagged
    times["ref"] = _stat(1.2)
    assert bench.check_timings(times, [("row", "ref", 1.0)]) == [
        "row at 120% of what ref allows > 110%"
    ]
    assert bench.check_timings(times, [("row", "ref", 1.2)]) == []  # a reference's ceiling
    # 2 MB in 1 s: starved; under 1 MB (ref) a fixed cost may dominate: not judged
    found = bench.check_timings(times, moved={"row": 2e6, "ref": 1e5}, noisy=["noisy", "row"])
    assert found == [
        "row below 1 GB/s: threads waiting for busy cores (try --threads 1)",
        "rounds spread > +-25%: noisy",
    ]


def test_timed_remeasures_then_flags() -> None:
    calls: list[str] = []
    seen: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times, flags, rounds = bench._timed(fns, 2, 1, lambda t: ["always"], seen.append, 0.0)
    assert set(times) == {"a", "b"} and flags == ["always"]
    assert rounds == 2 * (1 + bench.MAX_REMEASURE)
    assert seen == ["    re-measuring every contender (always)"] * bench.MAX_REMEASURE
    assert calls[-4:] == ["a", "b", "a", "b"]  # interleaved
    times, flags, rounds = bench._timed(fns, 2, 1, lambda t: [], seen.append, 0.0)
    assert flags == [] and rounds == 2


def test_transforms_flag_at_the_shared_limit() -> None:
    """--transforms marks a % above 110% (it used 105%), prints the baseline's range too, and
    lists its flagged rows."""
    ok = bench.TransformRow("AdamW", 28, "stream 28 B", _stat(1e-3), _stat(1.08e-3, 0.01))
    bad = bench.TransformRow(
        "AdamW both", 40, "stream 36 B + read 4 B", _stat(1e-3), _stat(1.2e-3), 9, ["x"]
    )
    table = bench.format_transforms([ok, bad], 1000)
    lines = table.splitlines()
    assert lines[1].endswith(" 108% ") and lines[2].endswith(" 120%!")
    assert "1069.200-1090.800]" in lines[1]  # the baseline's [lowest-highest]
    assert lines[3] == "  ! AdamW both, after 9 rounds: x. Do not trust this row."
    times = {"AdamW": _stat(1e-3), "stream 28 B": _stat(1.2e-3)}
    times.update({k: _stat(1.0) for k in ("norm pass", "stream read 4 B", "stream 36 B")})
    times.update({k: _stat(1.0) for k in ("AdamW max_grad_norm", "AdamW ema_decay")})
    times["AdamW both"] = _stat(2.0)
    found = bench.transform_checks(1000, times, only="AdamW")
    assert found == ["AdamW at 120% of what stream 28 B allows > 110%"]
    assert bench.transform_checks(1000, times, only="AdamW both") == []  # 36 B + 4 B: 2 s


def test_rows_table_flags_and_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "ROWS_UPDATED", 10)
    monkeypatch.setattr(bench, "ROWS_WIDTH", 100)  # 1000 updated elements
    times = {"fastoptim": _stat(1e-6), "stream": _stat(1.5e-6, 0.1), "NumPy reference": _stat(1)}
    row = bench.RowsRow("SGD", 0, times, 3, bench.rows_checks(0, times))
    assert row.flags == ["fastoptim at 150% of what stream allows > 110%"]
    table = bench.format_rows([row])
    line = next(x for x in table.splitlines() if x.startswith("SGD "))
    assert "1.500 [1.350-1.650]" in line and " 150%!" in line
    assert "! SGD, after 3 rounds: fastoptim at 150%" in table


def test_muon_rates_flag_beyond_the_sgemm() -> None:
    """NS counted as gemms can show up to 1.2x (square) - 4/3x the sgemm's rate (X X^T by
    syrk); beyond that, +10%, a cell is flagged (an NS bf16 row at 149% was printed plain)."""
    row = bench.MuonRow((768, 3072))
    m, n = 768, 3072
    assert row.flops == 5 * (4 * m * m * n + 2 * m**3)
    assert row.ceiling == pytest.approx(18 / 14)
    assert bench.MuonRow((1024, 1024)).ceiling == pytest.approx(1.2)
    sgemm = 1.0
    nominal = row.flops / (2 * n**3)  # NS time at the sgemm's nominal rate

    def times(bf16_pct: float) -> dict[str, bench.Stat]:
        t = {k: _stat(nominal) for k in ("products", "float32", "float64", "step")}
        return {**t, "sgemm": _stat(sgemm), "bfloat16": _stat(nominal / bf16_pct)}

    assert bench.muon_checks(row, times(1.25)) == []  # 125% of sgemm: possible with syrk
    (flag,) = bench.muon_checks(row, times(1.49))
    assert flag.startswith("bfloat16 at 116% of what sgemm allows > 110%"), flag
    row.times, row.rounds, row.flags = times(1.49), 3, [flag]
    row.sgemm, row.step, row.products = sgemm, nominal, nominal
    row.ns = {k: row.times[k][0] for k in ("bfloat16", "float32", "float64")}
    table = bench.format_muon([row])
    assert "   149%!" in table and "   100% " in table
    assert table.count("+-") == 7 and "! 768x3072, after 3 rounds: bfloat16 at 116%" in table
    # no A/B timing in the row (an OpenBLAS without the threading callback): a dash
    assert bench.OWN_THREADS not in row.ns and table.splitlines()[2].rstrip().endswith(" -")


def test_adafactor_bytes_and_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix moves 24 B/el (factored: no full-size state), a vector 32 (its full-size
    variance read and written, then read again: host.adafactor_update), and the streaming
    kernels of each row move exactly those bytes."""
    vec, mat = bench.AdafactorRow((1000,)), bench.AdafactorRow((20, 50))
    assert (vec.bytes, mat.bytes) == (32, 24) and bench.AdafactorRow(()).bytes == 32
    opt = fo.Adafactor([np.ones(1000, np.float32), np.ones((20, 50), np.float32)])
    opt.grads[0][...] = opt.grads[1][...] = 1.0
    opt.step()
    assert opt.state[0]["variance"].shape == (1000,) and "variance" not in opt.state[1]
    moved: list[int] = []
    monkeypatch.setattr(bench._core, "stream_read", lambda a: moved.append(a.nbytes))
    monkeypatch.setattr(
        bench._core,
        "stream_mixed",
        lambda rw, grad: moved.append(sum(2 * a.nbytes for a in rw) + grad.nbytes),
    )
    p, g = np.ones(1000, np.float32), np.ones(1000, np.float32)
    bench._adafactor_streams(p, g, np.ones(1000, np.float32))
    assert sum(moved) == 32 * 1000
    moved.clear()
    bench._adafactor_streams(p, g, None)
    assert sum(moved) == 24 * 1000
    t = {k: _stat(1.0) for k in ("step", "read", "reduction")}
    t["stream"] = _stat(1.2)
    mat.times, mat.rounds = t, 3
    mat.step, mat.read, mat.reduction, mat.stream = 1.0, 1.0, 1.0, 1.2
    mat.flags = bench.adafactor_checks(mat, t)
    assert mat.flags == ["step at 120% of what stream allows > 110%"]
    table = bench.format_adafactor([mat])
    assert "     120%! " in table and "! 20x50, after 3 rounds: step at 120%" in table


def test_bench_header_per_mode(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header says what each mode does: --muon and --adafactor time one call per sample;
    every mode re-measures what fails its checks and prints a spread."""
    import functools

    monkeypatch.setattr(bench, "run_muon", functools.partial(bench.run_muon, [(8, 16)]))
    assert cli.main(["bench", "--muon", "--rounds", "1", "-q"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "median and range of 1 interleaved round (and up to 2 more where a check" in header
    assert "each sample timing a block of one call (more where one lasts under 2 ms)" in header
    assert "+-" in out.split("\n", 2)[1]
    args = ["bench", "--optimizers", "sgd", "--workloads", "mlp", "--rounds", "1", "--no-torch"]
    assert cli.main([*args, "--repeats", "3", "-q"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "a block of 3 calls (more where they last under 2 ms; fewer, down to 1," in header


def test_step_benchmarks_record_two_pass_bytes() -> None:
    """bench/test_step.py records LAMB's and LARS's bytes of both passes (40, 28), grouped
    apart from the one-pass rooflines."""
    import importlib.util
    import types

    path = Path(__file__).resolve().parent.parent / "bench" / "test_step.py"
    if not path.is_file():  # (the suite copied away from the source tree: CI's wheel stage)
        pytest.skip("bench/ is not beside tests/")
    spec = importlib.util.spec_from_file_location("bench_test_step", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = [np.ones(10, np.float32)]
    for name, want in (("LAMB", 40), ("LARS", 28), ("Adam", 28), ("SGD", 12)):
        info = types.SimpleNamespace(group="", extra_info={})
        module._info(info, "mlp", bench.OPTIMIZERS[name][2], params, name)
        assert info.extra_info["bytes_per_element"] == want, name
        assert info.extra_info["bytes_moved"] == 10 * want
        assert info.group.endswith("two-pass") == (name in bench.TWO_PASS)
    assert bench.two_pass_bytes("LAMB")[0] == 40 and bench.two_pass_bytes("LARS")[0] == 28
