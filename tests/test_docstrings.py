"""The examples in the public modules' docstrings run and print what they show (doctest).
Examples marked ``+SKIP`` (a file written, a model assumed) are only parsed: a malformed
directive still fails here."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "fastoptim",
    "fastoptim.checkpoint",
    "fastoptim.engine.optimizer",
    "fastoptim.functional",
    "fastoptim.reference",
    "fastoptim.schedules",
    "fastoptim.transforms",
    "fastoptim.apps.mlp",
]
OPTIONAL = {"fastoptim.torch": "torch", "fastoptim.keras": "keras"}


@pytest.mark.parametrize("name", MODULES + list(OPTIONAL))
def test_docstring_examples(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    if name in OPTIONAL:
        if name == "fastoptim.keras":
            monkeypatch.setenv("KERAS_BACKEND", "torch")
        pytest.importorskip(OPTIONAL[name])
    monkeypatch.chdir(tmp_path)  # (an example that writes a file writes it there)
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    tests = finder.find(module)  # (a malformed directive raises ValueError here)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed"
