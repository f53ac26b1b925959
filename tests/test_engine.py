"""The engine: every tier is generated from one definition per optimizer, options common to
all optimizers are defined once, and schedules fail before a step changes anything."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastoptim as fo
from fastoptim import definitions, functional, optimizers
from fastoptim.engine import codegen
from fastoptim.engine import definition as engine_definition
from fastoptim.engine.definition import Hyper

ALL = definitions.ALL


def test_every_definition_makes_a_class_and_a_function() -> None:
    assert len({d.name for d in ALL}) == len(ALL)
    for d in ALL:
        cls = getattr(optimizers, d.name)
        assert cls._definition is d and getattr(fo, d.name) is cls
        assert cls.__doc__ is not None and cls.__doc__.strip().startswith(d.doc.split("\n")[0])
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]
        assert [(p.name, p.default) for p in params] == [(h.name, h.default) for h in d.options]
        assert [p.kind is inspect.Parameter.KEYWORD_ONLY for p in params] == [
            h.keyword for h in d.options
        ]
        fn = getattr(functional, d.name.lower() + "_")
        fparams = inspect.signature(fn).parameters
        assert [n for n in fparams][2 : 2 + len(d.states)] == [s.name for s in d.states]
        for h in d.options:
            if h.functional:
                assert fparams[h.name].default == h.default


def test_definitions_validate_like_the_classes() -> None:
    w = np.zeros(3)
    with pytest.raises(ValueError, match="Adam: invalid eps=-1"):
        definitions.ADAM.check({**definitions.ADAM.defaults(), "eps": -1})
    with pytest.raises(ValueError, match="Adam: invalid eps=-1"):
        fo.Adam([w], eps=-1)
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        fo.SGD([w], nesterov=True)
    assert fo.AdamW([w]).param_groups[0]["decoupled_weight_decay"] is True


def test_common_options_reach_every_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """An option added to engine.definition.COMMON appears, keyword-only, in the generated
    signature of every class and function of every tier, and is validated by its rule."""
    opt = Hyper("example_option", 0.0, keyword=True)
    monkeypatch.setattr(engine_definition, "COMMON", (opt,))
    d = dataclasses.replace(definitions.LION)  # a fresh definition: no cached rules
    assert d.options[-1] is opt and d.defaults()["example_option"] == 0.0
    assert "        example_option: Value = 0.0," in codegen.numpy_class(d)
    assert "    example_option: Value = 0.0," in codegen.functional_function(d)
    if importlib.util.find_spec("torch") is not None:
        assert "        example_option: TorchValue = 0.0," in codegen.torch_class(d)
    with pytest.raises(ValueError, match="example_option"):
        d.check({**d.defaults(), "example_option": -1.0})


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None or importlib.util.find_spec("torch") is None,
    reason="the code generator formats with ruff and reads torch's signatures",
)
def test_generated_code_is_up_to_date() -> None:
    script = Path(codegen.__file__)
    if not (script.parent.parent.parent.parent / "pyproject.toml").exists():
        pytest.skip("installed package: the generated files are checked in the source tree")
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_failing_schedule_raises_before_the_step_changes_anything() -> None:
    """A schedule that raises (or returns a non-number) when asked for the next update's value
    does not fail the step that just ran; the next step raises it, before touching anything,
    and the optimizer stays usable once the entry gets a valid value."""

    def fails_at_2(t: int) -> float:
        if t >= 2:
            raise RuntimeError("no value")
        return 0.1

    w = np.ones(4)
    opt = fo.Adam([w], lr=fails_at_2)
    g = np.full(4, 0.5)
    opt.step([g])
    opt.step([g])  # asks for update 2's value: kept for the next step
    before = (w.copy(), opt.state[0]["exp_avg"].copy(), opt.state[0]["step"], opt.step_count)
    with pytest.raises(ValueError, match=r"fails_at_2.*RuntimeError.*update 2"):
        opt.step([g])
    assert np.array_equal(w, before[0]) and np.array_equal(opt.state[0]["exp_avg"], before[1])
    assert (opt.state[0]["step"], opt.step_count) == before[2:]
    opt.param_groups[0]["lr"] = 0.01  # a constant replaces the schedule
    opt.step([g])
    assert opt.step_count == 3 and not np.array_equal(w, before[0])

    opt = fo.SGD([w], lr=lambda t: 0.1 if t < 1 else "x")  # type: ignore[arg-type, return-value]
    opt.step([g])
    kept = w.copy()
    with pytest.raises(TypeError, match="returned 'x' at update 1, not a number"):
        opt.step([g])
    assert np.array_equal(w, kept) and opt.step_count == 1
