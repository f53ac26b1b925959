"""Every command-line mistake gets an argparse-style message on stderr and exit code 2, before
any work and without a traceback; option names agree between demo, minimize and bench."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastoptim.apps import cli

A_FILE = "@file"  # replaced by the path of an existing regular file

MISTAKES = [
    # (arguments, words the message must contain)
    (["demo", "--out", A_FILE], ["argument --out:", "exists and is not a directory"]),
    (["demo", "--seed", "-1"], ["argument --seed:", "must be >= 0"]),
    (["demo", "--seed", "1.5"], ["argument --seed:", "not an int"]),
    (["demo", "--batch-size", "0"], ["argument --batch-size:", ">= 1 or 'full'"]),
    (["demo", "--batch-size", "-3"], ["argument --batch-size:", ">= 1 or 'full'"]),
    (["demo", "--epochs", "0"], ["argument --epochs:", "must be > 0"]),
    (["demo", "--lr", "-1"], ["argument --lr:", "must be > 0"]),
    (["demo", "--lr", "tuned,0"], ["argument --lr:", "must be > 0"]),
    (["demo", "--lr", "nan"], ["argument --lr:", "must be finite"]),
    (["demo", "--lr", "fast"], ["argument --lr:", "not a number"]),
    (["demo", "--threads", "0"], ["argument --threads:", "must be > 0"]),
    (["demo", "--hidden", "16,0"], ["argument --hidden:", "ints >= 1"]),
    (["demo", "--train-size", "0"], ["argument --train-size:", "must be > 0"]),
    (["demo", "--dataset", "mnist"], ["argument --dataset:", "invalid choice"]),
    (["demo", "--lesson", "momentum"], ["argument --lesson:", "invalid choice"]),
    (["demo", "--optimizers", "adam,adamm"], ["argument --optimizers:", "unknown adamm"]),
    (["demo", "--lesson", "batch", "--schedule", "cosine"], ["--schedule: only for --lesson"]),
    (["minimize", "--out", A_FILE], ["argument --out:", "exists and is not a directory"]),
    (["minimize", "--sweep", "0.1,-1"], ["argument --sweep:", "learning rates > 0"]),
    (["minimize", "--sweep", "0"], ["argument --sweep:", "learning rates > 0"]),
    (["minimize", "--sweep", "0.1,inf"], ["argument --sweep:", "finite"]),
    (["minimize", "--tol", "-1"], ["argument --tol:", "must be >= 0"]),
    (["minimize", "--tol", "nan"], ["argument --tol:", "must be finite"]),
    (["minimize", "--max-steps", "0"], ["argument --max-steps:", "must be > 0"]),
    (["minimize", "--lr", "0"], ["argument --lr:", "must be > 0"]),
    (["minimize", "--start", "1,nan"], ["argument --start:", "finite"]),
    (["minimize", "--functions", "x2", "--start", "1,2"], ["argument --start: 2 coordinate"]),
    (["bench", "--plot", "--out", A_FILE], ["argument --out:", "exists and is not a directory"]),
    (["bench", "--repeats", "0"], ["argument --repeats:", "must be > 0"]),
    (["bench", "--rounds", "-2"], ["argument --rounds:", "must be > 0"]),
    (["bench", "--threads", "0"], ["argument --threads:", "must be > 0"]),
    (["bench", "--optimizers", "Adamm"], ["argument --optimizers:", "unknown Adamm"]),
    (["bench", "--workloads", "huge"], ["argument --workloads:", "unknown huge"]),
]


@pytest.mark.parametrize(("argv", "words"), MISTAKES, ids=lambda v: " ".join(v))
def test_mistake_is_a_usage_error(
    argv: list[str], words: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "a_file.png"
    a_file.write_bytes(b"")
    argv = [str(a_file) if a == A_FILE else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran: the mistake was found first
    assert captured.err.startswith(f"usage: fastoptim {argv[0]}")
    error = captured.err.splitlines()[-1]
    assert error.startswith(f"fastoptim {argv[0]}: error: ")
    assert all(w in error for w in words), error


def test_out_in_a_missing_or_unwritable_place(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "f"
    a_file.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:  # a directory below a file
        cli.main(["minimize", "--out", str(a_file / "sub"), "--functions", "x2"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"cannot write into {a_file / 'sub'}: Not a" in error
    # an --out that does not exist yet is fine: created when the charts are written
    args = ["minimize", "--functions", "x2", "--optimizers", "SGD", "--sweep", "0.1"]
    pytest.importorskip("matplotlib")
    assert cli.main([*args, "--out", str(tmp_path / "new" / "dir")]) == 0
    assert (tmp_path / "new" / "dir" / "minimize_x2.png").is_file()
    assert cli.main([*args, "--no-plot", "--out", str(a_file)]) == 0  # writes nothing: no check


def test_no_traceback_from_the_command() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "fastoptim", "demo", "--seed", "-1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert "Traceback" not in run.stderr and "argument --seed: must be >= 0" in run.stderr


@pytest.mark.parametrize("option", ["--optimizers", "--out", "--threads"])
def test_shared_options_have_one_name(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("demo", "minimize", "bench"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        if option == "--threads" and command == "minimize":
            continue  # minimize's arrays have 1 or 2 elements: no threads to set
        assert f"{option} " in text, (command, option)
        if option == "--optimizers":
            assert "any case" in text
