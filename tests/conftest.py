"""Shared fixtures: the instruction-set fixture and a deterministic random generator."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import fastoptim
from fastoptim import _core


def isas_under_test() -> list[str]:
    """Every instruction set this build and CPU support, or only the one ``FASTOPT_ISA`` forces
    (CI reruns some test files under each other ISA that way: ``.ci/per-isa-tests``)."""
    forced = os.environ.get("FASTOPT_ISA", "").strip().lower()
    return [forced] if forced else fastoptim.available_isas()


# NumPy 2.4 deprecates setting an array's strides, 2.5 its dtype and shape (still possible):
# the tests marked ``re_views`` do that on purpose, as a user may, to check that steps refuse
# arrays re-viewed in place; the warning stays an error everywhere else.
RE_VIEWS = "ignore:Setting the (dtype|shape|strides) on a NumPy array:DeprecationWarning"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "re_views: sets an array's dtype, shape or strides in place on purpose"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``re_views`` ignore NumPy's deprecation of what they do (``RE_VIEWS``).
    With ``FASTOPT_ISA_RERUN`` set (CI's reruns under each other ISA), leave out the tests
    that take the ``isa`` fixture: the main run, with no ``FASTOPT_ISA``, ran them with every
    instruction set."""
    for item in items:
        if item.get_closest_marker("re_views") is not None:
            item.add_marker(pytest.mark.filterwarnings(RE_VIEWS))
    if not os.environ.get("FASTOPT_ISA_RERUN", "").strip():
        return
    if not os.environ.get("FASTOPT_ISA", "").strip():
        raise pytest.UsageError("FASTOPT_ISA_RERUN is for reruns under a FASTOPT_ISA: set both")
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (drop if "isa" in getattr(item, "fixturenames", ()) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=isas_under_test())
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the kernels of one instruction set; restores the previous one."""
    before = fastoptim.isa()
    _core.set_isa(request.param)
    try:
        assert fastoptim.isa() == request.param
        yield request.param
    finally:
        _core.set_isa(before)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """The thread count and chunk grain as they were before the test, after it."""
    threads, grain = fastoptim.get_num_threads(), _core.get_grain()
    yield
    fastoptim.set_num_threads(threads)
    _core.set_grain(grain)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's id: reproducible, and different for every test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=[True, False], ids=["fast", "general"])
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """fastoptim.torch's steps through its fast path (where this build has it) and through the
    general one (every check in Python)."""
    fot = pytest.importorskip("fastoptim.torch")
    if request.param and not fot._FAST:
        pytest.skip("this build has no fast path")
    monkeypatch.setattr(fot, "_FAST", request.param)
    return bool(request.param)


@pytest.fixture(scope="module")
def keras() -> Any:
    """Keras 3 on its torch backend (skipped where it does not import, or runs on another)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on the {keras.backend.backend()} backend, not torch")
    return keras


@pytest.fixture
def process_group(tmp_path: Any) -> Iterator[Any]:
    """torch.distributed with one process (gloo, a file store), destroyed after the test;
    the test is skipped where torch.distributed is not available."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
