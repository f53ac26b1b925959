"""The ``fastoptim`` command, end to end on tiny settings (timings are printed, never
asserted)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

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
