"""The ``fastoptim`` command, end to end on tiny settings (timings are printed, never
asserted)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from fastoptim.apps import bench, cli


def test_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--optimizers", "SGD,Adam", "--workloads", "mlp", "--repeats", "1"]
    assert cli.main([*args, "--rounds", "1", "--no-torch", "--overhead"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(SGD|Adam)\s+(\d+)\s+([\d.]+) (us|ms)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%", line)
        if m:
            rows[m.group(1)] = m
    assert set(rows) == {"SGD", "Adam"}
    assert int(rows["SGD"].group(2)) == 12 and int(rows["Adam"].group(2)) == 28  # bytes/elem
    assert all(float(m.group(5)) > 0 and int(m.group(7)) > 0 for m in rows.values())
    assert "mlp: 6 tensor(s), 269,322 float32 elements" in out
    assert out.count("opt.step() overhead") == 3


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
