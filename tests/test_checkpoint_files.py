"""``fastoptim.save`` / ``fastoptim.load`` against hostile and unlucky files: crafted archives
(zip bombs, lying headers), killed saves and their temporary files, permissions, symlinks, and
edited metadata that must be rejected whole (all or nothing, ``CheckpointError`` only)."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from cases import fail_second_reads
from fastoptim import checkpoint, schedules

SHAPES = {"w": (5, 3), "b": (7,)}


def build(rng: np.random.Generator, cls: Any = fo.Adam, **kw: Any) -> tuple[fo.Optimizer, Any]:
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    return cls(params, **kw), params


def grads(rng: np.random.Generator, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}


def snapshot(opt: fo.Optimizer, params: Any) -> str:
    """Every parameter byte, every state byte, every setting and counter."""

    def plain(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return (x.dtype.str, x.shape, x.tobytes())
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return repr(([p.tobytes() for p in params.values()], plain(opt.state_dict())))


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_zip(path: Path, files: dict[str, bytes | Callable[[Any], None]]) -> None:
    """An archive with these members; a callable writes its member as a stream, deflated."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            if callable(data):
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with z.open(info, "w", force_zip64=True) as f:
                    data(f)
            else:
                z.writestr(name, data)


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


# ------------------------------------------------------------------------------- zip bombs
BOMB = 128 << 20  # bytes of zeros behind each bomb's few hundred KB


def zeros_stream(header: bytes, n: int) -> Callable[[Any], None]:
    def write(f: Any) -> None:
        f.write(header)
        chunk = bytes(1 << 20)
        for _ in range(n // len(chunk)):
            f.write(chunk)

    return write


def _bombs() -> list[tuple[str, str, Callable[[dict[str, bytes]], None]]]:
    def huge_shape(files: dict[str, Any]) -> None:  # a parameter claims 32M elements
        files["p0.npy"] = zeros_stream(npy_header("<f4", (BOMB // 4,)), BOMB)

    def huge_state(files: dict[str, Any]) -> None:  # so does a state array
        files["s1.exp_avg.npy"] = zeros_stream(npy_header("<f4", (BOMB // 4,)), BOMB)

    def honest_header_long_data(files: dict[str, Any]) -> None:  # right header, 128 MB after
        files["p1.npy"] = zeros_stream(npy_header("<f4", (7,)), BOMB)

    def huge_meta(files: dict[str, Any]) -> None:  # the JSON member
        files["meta.npy"] = zeros_stream(npy_header("|u1", (BOMB,)), BOMB)

    def huge_header(files: dict[str, Any]) -> None:  # a .npy header of 4 GB (format 2.0)
        files["p0.npy"] = b"\x93NUMPY\x02\x00" + (0xFFFFFFF0).to_bytes(4, "little")

    return [
        ("a parameter member declares a huge shape", "'p0'", huge_shape),
        ("a state member declares a huge shape", "'s1.exp_avg'", huge_state),
        ("a member longer than its header says", "'p1' declares", honest_header_long_data),
        ("the metadata member is huge", "'meta'", huge_meta),
        ("a .npy header declares 4 GB", "'p0'", huge_header),
    ]


@pytest.mark.parametrize(("label", "names", "craft"), _bombs(), ids=[b[0] for b in _bombs()])
def test_zip_bombs_are_rejected_before_any_large_allocation(
    label: str,
    names: str,
    craft: Callable[[dict[str, Any]], None],
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    opt, params = build(rng)
    opt.step(grads(rng, params))
    good = tmp_path / "good.npz"
    fo.save(good, opt)
    files: dict[str, Any] = dict(members(good))
    craft(files)
    bomb = tmp_path / "bomb.npz"
    write_zip(bomb, files)
    assert bomb.stat().st_size < BOMB // 100  # small on disk
    before = snapshot(opt, params)
    tracemalloc.start()
    try:
        with pytest.raises(fo.CheckpointError, match=f"member {names}") as err:
            fo.load(bomb, opt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, (label, peak)  # nothing near the declared size was allocated
    assert "load(" in str(err.value)
    assert snapshot(opt, params) == before


def test_npz_members_in_other_layouts_are_rejected(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    """Byte-swapped, Fortran-ordered, other-dtype, extra and repeated members: each named."""
    opt, params = build(rng)
    good = tmp_path / "good.npz"
    fo.save(good, opt)
    files = members(good)
    w = params["w"]
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(w))
    cases: list[tuple[dict[str, bytes], str]] = [
        ({**files, "p0.npy": _npy(w.astype(">f4"))}, r"member 'p0' holds >f4"),
        ({**files, "p0.npy": _npy(w.astype(np.float64))}, r"member 'p0' holds float64"),
        ({**files, "p0.npy": _npy(w.reshape(3, 5))}, r"member 'p0' holds float32 \(3, 5\)"),
        ({**files, "p0.npy": buf.getvalue()}, r"member 'p0' is not a valid \.npy"),
        ({**files, "p0.npy": b"\x93NUMPY\x01\x00\x04\x00{'a'"}, r"member 'p0' is not a valid"),
        ({**files, "p0.npy": _npy(np.array([object()]), pickle=True)}, "member 'p0'"),
        ({**files, "readme.txt": b"hi"}, "unexpected or repeated member 'readme.txt'"),
    ]
    for files2, message in cases:
        path = tmp_path / "bad.npz"
        write_zip(path, files2)
        before = snapshot(opt, params)
        with pytest.raises(fo.CheckpointError, match=message):
            fo.load(path, opt)
        assert snapshot(opt, params) == before
    # a repeated member name (zipfile warns about the duplicate while writing it)
    path = tmp_path / "dup.npz"
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(path, "w") as z:
            for name, data in [*files.items(), ("p0.npy", files["p0.npy"])]:
                z.writestr(name, data)
    with pytest.raises(fo.CheckpointError, match=r"repeated member 'p0\.npy'"):
        fo.load(path, opt)


def _npy(a: np.ndarray, pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=pickle)
    return buf.getvalue()


def test_compressed_checkpoints_still_load(rng: np.random.Generator, tmp_path: Path) -> None:
    """A checkpoint re-zipped with deflate (e.g. by a zip tool) is read chunk by chunk."""
    opt, params = build(rng)
    opt.step(grads(rng, params))
    fo.save(tmp_path / "a.npz", opt)
    with zipfile.ZipFile(tmp_path / "b.npz", "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members(tmp_path / "a.npz").items():
            z.writestr(name, data)
    opt2, params2 = build(np.random.default_rng(1))
    fo.load(tmp_path / "b.npz", opt2)
    assert snapshot(opt2, params2) == snapshot(opt, params)


# ------------------------------------------------------------------------- temporary files
TMP = re.compile(r"\.ck\.npz\.fastoptim-tmp-([A-Za-z0-9]+)-([0-9]+)-[0-9a-f]{12}")


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.name != "posix", reason="stale temporaries are found by pid on POSIX")
def test_next_save_removes_temporaries_of_killed_saves_only(
    rng: np.random.Generator, tmp_path: Path, dead_pid: int, live_pid: int
) -> None:
    host = checkpoint._host()
    stale = f".ck.npz.fastoptim-tmp-{host}-{dead_pid}-0123456789ab"
    kept = [
        f".ck.npz.fastoptim-tmp-{host}-{live_pid}-0123456789ab",  # a save still running
        f".ck.npz.fastoptim-tmp-{host}-{os.getpid()}-0123456789ab",  # this process's (thread)
        f".ck.npz.fastoptim-tmp-{host}x-{dead_pid}-0123456789ab",  # another host's
        f".other.npz.fastoptim-tmp-{host}-{dead_pid}-0123456789ab",  # another target's
        ".ck.npz.fastoptim-tmp-notes.txt",  # the user's, not ours
        "ck.npz.bak",
    ]
    for name in [stale, *kept]:
        (tmp_path / name).write_bytes(b"PK\x03\x04 partial")
    opt, params = build(rng)
    fo.save(tmp_path / "ck.npz", opt)
    assert sorted(os.listdir(tmp_path)) == sorted(["ck.npz", *kept])
    opt2, params2 = build(np.random.default_rng(5))
    fo.load(tmp_path / "ck.npz", opt2)
    assert snapshot(opt2, params2) == snapshot(opt, params)


_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import fastoptim as fo

    path = sys.argv[1]
    params = {"w": np.full(1000, 1.0, np.float32)}
    opt = fo.SGD(params, lr=0.5)
    fo.save(path, opt)  # a complete checkpoint first
    opt.step({"w": np.ones(1000, np.float32)})
    savez = np.savez

    def write_then_hang(file, **arrays):
        savez(file, **arrays)
        file.flush()
        print("written", flush=True)
        time.sleep(60)  # killed here: after the write, before the rename

    np.savez = write_then_hang
    fo.save(path, opt)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_save_killed_with_sigkill_leaves_the_previous_file_and_the_next_save_cleans_up(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ck.npz"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "written\n"
        orphans = [n for n in os.listdir(tmp_path) if n != "ck.npz"]
        assert len(orphans) == 1
        m = TMP.fullmatch(orphans[0])
        assert m is not None and int(m.group(2)) == child.pid and m.group(1) == checkpoint._host()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / orphans[0]).stat().st_size > 4000  # the new, never renamed, checkpoint
    params = {"w": np.zeros(1000, np.float32)}
    opt = fo.SGD(params, lr=0.5)
    fo.load(path, opt)  # the previous checkpoint, intact
    assert opt.step_count == 0 and np.all(params["w"] == 1.0)
    opt.step({"w": np.ones(1000, np.float32)})
    fo.save(path, opt)
    assert os.listdir(tmp_path) == ["ck.npz"]


def test_an_error_during_the_save_removes_its_temporary_file(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opt, _ = build(rng)

    def fail(file: Any, **arrays: Any) -> None:
        file.write(b"PK")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="No space") as info:
        fo.save(tmp_path / "ck.npz", opt)
    assert os.listdir(tmp_path) == []
    # the error names the user's path and what failed (it was the bare OSError)
    assert info.value.errno == 28 and info.value.filename == str(tmp_path / "ck.npz")
    assert str(info.value).startswith("[Errno 28] save: cannot write ")
    monkeypatch.undo()  # a previous checkpoint survives a failing save
    fo.save(tmp_path / "ck.npz", opt)
    saved = (tmp_path / "ck.npz").read_bytes()
    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="No space"):
        fo.save(tmp_path / "ck.npz", opt)
    assert os.listdir(tmp_path) == ["ck.npz"] and (tmp_path / "ck.npz").read_bytes() == saved


def test_a_zip_of_an_unknown_version_is_a_checkpoint_error(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    """A corrupted "version needed to extract" in the zip's directory: CheckpointError (it
    was zipfile's NotImplementedError('zip file version 21.0')), nothing changed."""
    opt, params = build(rng)
    path = tmp_path / "ck.npz"
    fo.save(path, opt)
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")  # the first central directory record
    data[at + 6 : at + 8] = (210).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    before = snapshot(opt, params)
    with pytest.raises(fo.CheckpointError, match=r"not a readable checkpoint.*version 21"):
        fo.load(path, opt)
    assert snapshot(opt, params) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")
def test_loading_a_named_pipe_is_refused_without_waiting(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    """A FIFO at the path: CheckpointError at once (open() waited for a writer, forever).
    (A writer comes after 2 s, so a regression fails rather than hangs.)"""
    import threading

    opt, params = build(rng)
    fifo = tmp_path / "ck.npz"
    os.mkfifo(fifo)

    def writer() -> None:
        time.sleep(2)
        try:  # (releases a reader blocked in open(); ENXIO where there is none)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    before = snapshot(opt, params)
    with pytest.raises(fo.CheckpointError, match="not a regular file"):
        fo.load(fifo, opt)
    assert snapshot(opt, params) == before
    t.join()


# ------------------------------------------------------------------------------ permissions
@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027, 0o000])
def test_new_files_honour_the_umask(umask: int, rng: np.random.Generator, tmp_path: Path) -> None:
    opt, _ = build(rng)
    old = os.umask(umask)
    try:
        fo.save(tmp_path / "ck.npz", opt)
        with open(tmp_path / "plain", "w"):  # what open(path, "w") gives, for comparison
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "ck.npz").stat().st_mode)
    assert mode == 0o666 & ~umask
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_a_replaced_file_keeps_its_mode(
    mode: int, rng: np.random.Generator, tmp_path: Path
) -> None:
    opt, params = build(rng)
    path = tmp_path / "ck.npz"
    fo.save(path, opt)
    path.chmod(mode)
    opt.step(grads(rng, params))
    old = os.umask(0o022)
    try:
        fo.save(path, opt)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    opt2, params2 = build(np.random.default_rng(3))
    fo.load(path, opt2)
    assert snapshot(opt2, params2) == snapshot(opt, params)


# --------------------------------------------------------------------------------- symlinks
@pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix", reason="POSIX symlinks")
@pytest.mark.parametrize("relative", [False, True])
def test_saving_onto_a_symlink_replaces_its_target_and_keeps_the_link(
    relative: bool, rng: np.random.Generator, tmp_path: Path
) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "run").mkdir()
    target = tmp_path / "store" / "ck.npz"
    target.write_bytes(b"old")
    link = tmp_path / "run" / "latest.npz"
    link.symlink_to(os.path.join("..", "store", "ck.npz") if relative else target)
    link_text = os.readlink(link)
    opt, params = build(rng)
    opt.step(grads(rng, params))
    fo.save(link, opt)
    assert link.is_symlink() and os.readlink(link) == link_text
    assert os.listdir(tmp_path / "run") == ["latest.npz"]  # no temporary left beside the link
    assert os.listdir(tmp_path / "store") == ["ck.npz"]
    for source in (link, target):
        opt2, params2 = build(np.random.default_rng(9))
        fo.load(source, opt2)
        assert snapshot(opt2, params2) == snapshot(opt, params)


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix", reason="POSIX symlinks")
def test_saving_onto_a_dangling_symlink_creates_its_target(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    link = tmp_path / "latest.npz"
    link.symlink_to(tmp_path / "ck.npz")
    opt, _ = build(rng)
    fo.save(link, opt)
    assert link.is_symlink() and (tmp_path / "ck.npz").is_file()
    assert sorted(os.listdir(tmp_path)) == ["ck.npz", "latest.npz"]


# ------------------------------------------------------------------------ edited metadata
def edit_meta(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    files = members(path)
    meta = json.loads(np.load(io.BytesIO(files["meta.npy"])).tobytes())
    edit(meta)
    files["meta.npy"] = _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8))
    write_zip(path, dict(files))


def _set(*where: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        node = meta
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = value

    return edit


def _raw(text: bytes) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        raise _Raw(text)

    return edit


class _Raw(Exception):
    pass


META_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("params not a list", _set("params", value={"w": 1})),
    ("a parameter key is a list", _set("params", 0, "key", value=["w"])),
    ("a parameter key is a bool", _set("params", 0, "key", value=True)),
    ("a shape of strings", _set("params", 0, "shape", value=["5", "3"])),
    ("a negative shape", _set("params", 0, "shape", value=[-5, -3])),
    ("a dtype number", _set("params", 0, "dtype", value=4)),
    ("state names not a list", _set("state", 0, value="exp_avg")),
    ("a state name with a slash", _set("state", 0, value=["../exp_avg"])),
    ("repeated keys", _set("params", 1, "key", value="w")),
    ("optimizer not an object", _set("optimizer", value=[1, 2])),
    ("param_groups not a list", _set("optimizer", "param_groups", value=7)),
    ("a group record not an object", _set("optimizer", "param_groups", 0, value=3)),
    ("group params a number", _set("optimizer", "param_groups", 0, "params", value=3)),
    ("group params of lists", _set("optimizer", "param_groups", 0, "params", value=[[1]])),
    ("hyper not an object", _set("optimizer", "param_groups", 0, "hyper", value=3)),
    ("lr a string", _set("optimizer", "param_groups", 0, "hyper", "lr", value="0.1")),
    ("lr a list", _set("optimizer", "param_groups", 0, "hyper", "lr", value=[1])),
    ("betas a number", _set("optimizer", "param_groups", 0, "hyper", "betas", value=0.9)),
    ("betas of strings", _set("optimizer", "param_groups", 0, "hyper", "betas", value=["a", 1])),
    ("a nested schedule", _set("optimizer", "param_groups", 0, "hyper", "lr", value={"a": {}})),
    ("step a float", _set("optimizer", "param_groups", 0, "step", value=1.5)),
    ("step negative", _set("optimizer", "param_groups", 0, "step", value=-1)),
    ("step_count a string", _set("optimizer", "step_count", value="3")),
    ("step_count beyond int64", _set("optimizer", "step_count", value=2**64)),
    ("another optimizer class", _set("optimizer", "optimizer", value="SGD")),
    ("scalars a list", _set("optimizer", "param_groups", 0, "scalars", value=[])),
    ("a newer format", _set("format", value="fastoptim.checkpoint/2")),
    ("unknown field", _set("extra", value=1)),
    ("JSON nested 100000 deep", _raw(b"[" * 100_000 + b"]" * 100_000)),
    ("JSON not an object", _raw(b"[1, 2]")),
    ("not UTF-8", _raw(b"\xff\xfe{}")),
    ("not JSON", _raw(b"{'format': 1}")),
]


@pytest.mark.parametrize(("label", "edit"), META_EDITS, ids=[c[0] for c in META_EDITS])
def test_edited_metadata_is_rejected_whole(
    label: str, edit: Callable[[dict[str, Any]], Any], rng: np.random.Generator, tmp_path: Path
) -> None:
    """CheckpointError (never TypeError, KeyError, RecursionError...) and nothing changes."""
    src, src_params = build(rng, amsgrad=True)
    for _ in range(3):
        src.step(grads(rng, src_params))
    path = tmp_path / "ck.npz"
    fo.save(path, src)
    try:
        edit_meta(path, edit)
    except _Raw as raw:
        files = members(path)
        files["meta.npy"] = _npy(np.frombuffer(raw.args[0], np.uint8))
        write_zip(path, dict(files))
    opt, params = build(np.random.default_rng(2), amsgrad=True)
    opt.step(grads(rng, params))
    before = snapshot(opt, params)
    with pytest.raises(fo.CheckpointError, match=re.escape(f"load({str(path)!r})")):
        fo.load(path, opt)
    assert snapshot(opt, params) == before


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            _set("format", value="fastoptim.checkpoint/2"),
            "a checkpoint of format 'fastoptim.checkpoint/2', which this fastoptim",
        ),
        (
            _set("optimizer", "param_groups", 0, "scalars", value=[]),
            "group 0: the scalar state must be a dict of [], got list []",
        ),
    ],
    ids=["newer format", "scalars a list"],
)
def test_edited_metadata_messages(
    edit: Callable[[dict[str, Any]], Any], words: str, rng: np.random.Generator, tmp_path: Path
) -> None:
    """What two of those edits are called: a newer format is not "not a fastoptim
    checkpoint", a list of scalars is not "scalar state [] != []"."""
    opt, _ = build(rng)
    path = tmp_path / "ck.npz"
    fo.save(path, opt)
    edit_meta(path, edit)
    with pytest.raises(fo.CheckpointError, match=re.escape(words)):
        fo.load(path, opt)


def test_loaded_hyper_parameters_win(rng: np.random.Generator, tmp_path: Path) -> None:
    """As torch: the checkpoint's settings replace the optimizer's (amsgrad off, lr, betas)."""
    src, src_params = build(rng, lr=0.01, betas=(0.8, 0.9), amsgrad=False)
    src.step(grads(rng, src_params))
    fo.save(tmp_path / "ck.npz", src)
    opt, params = build(np.random.default_rng(4), lr=0.5, amsgrad=True)
    fo.load(tmp_path / "ck.npz", opt)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["amsgrad"]) == (0.01, (0.8, 0.9), False)
    g = grads(rng, params)
    src.step(g)
    opt.step(g)
    for k in params:  # the same trajectory as the saved optimizer's: no AMSGrad
        assert params[k].tobytes() == src_params[k].tobytes()
        for n in ("exp_avg", "exp_avg_sq"):
            assert opt.state[k][n].tobytes() == src.state[k][n].tobytes()


# ---------------------------------------------- checks the optimizer engine does not make yet
# The values below reach Optimizer._loader / _load_group (python/fastoptim/_optimizer.py),
# which accept them, or fail half-way through applying them.  Each case runs through
# load_state_dict and through fastoptim.load.


def _nadam(rng: np.random.Generator) -> tuple[fo.Optimizer, dict[str, np.ndarray]]:
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    opt = fo.NAdam([{"params": {"w": params["w"]}}, {"params": {"b": params["b"]}, "lr": 0.01}])
    return opt, params


def _plateau(rng: np.random.Generator) -> tuple[fo.Optimizer, dict[str, np.ndarray]]:
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    opt = fo.Adam(
        [{"params": {"w": params["w"]}}, {"params": {"b": params["b"]}}],
        lr=schedules.cosine(0.1, 20),
    )
    schedules.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    return opt, params


def _adam(rng: np.random.Generator) -> tuple[fo.Optimizer, dict[str, np.ndarray]]:
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    return fo.Adam([{"params": {"w": params["w"]}}, {"params": {"b": params["b"]}}]), params


def _group1(field: str, *sub: str) -> Callable[[Any], None]:
    """Set field (or field[sub]) of the *second* group's record: the first group's record is
    valid, so applying one group at a time shows as a half-loaded optimizer."""

    def make(value: Any) -> Callable[[dict[str, Any]], None]:
        def edit(sd: dict[str, Any]) -> None:
            rec = sd["param_groups"][1]
            if sub:
                rec[field][sub[0]] = value
            else:
                rec[field] = value

        return edit

    return make


_BAD_ENGINE_VALUES = [
    *(
        (f"NAdam mu_product={v!r}", _nadam, _group1("scalars", "mu_product")(v))
        for v in ("abc", math.nan, 1.5, -0.5, math.inf, None)
    ),
    *((f"plateau lr_scale={v!r}", _plateau, _group1("lr_scale")(v)) for v in (-0.5, 2.0)),
    *((f"plateau lr_floor={v!r}", _plateau, _group1("lr_floor")(v)) for v in (math.nan, -1.0)),
    (f"group step={2**63 - 1}", _adam, _group1("step")(2**63 - 1)),
]
# Rejected before the engine validated these fields too (the scheduled lr is evaluated with
# them while checking).
_REJECTED_VALUES = [
    *(
        (f"plateau lr_scale={v!r}", _plateau, _group1("lr_scale")(v))
        for v in ("abc", None, [0.5], math.nan, math.inf)
    ),
    *((f"plateau lr_floor={v!r}", _plateau, _group1("lr_floor")(v)) for v in ("abc", None)),
    ("group step=-1", _adam, _group1("step")(-1)),
    ("group step=1.0", _adam, _group1("step")(1.0)),
    ("NAdam scalars missing", _nadam, _group1("scalars")({})),
]


_BAD_VALUES = _BAD_ENGINE_VALUES + _REJECTED_VALUES


@pytest.mark.parametrize("via", ["load_state_dict", "file"])
@pytest.mark.parametrize(("label", "make", "edit"), _BAD_VALUES, ids=[c[0] for c in _BAD_VALUES])
def test_bad_state_values_are_rejected_whole(
    label: str,
    make: Callable[[np.random.Generator], tuple[fo.Optimizer, dict[str, np.ndarray]]],
    edit: Callable[[dict[str, Any]], None],
    via: str,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    check_rejected_whole(make, edit, via, rng, tmp_path)


def check_rejected_whole(
    make: Callable[[np.random.Generator], tuple[fo.Optimizer, dict[str, np.ndarray]]],
    edit: Callable[[dict[str, Any]], None],
    via: str,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """`edit` applied to a state saved after 4 steps must make loading it into an optimizer
    after 1 step raise ValueError (CheckpointError from a file), and change nothing."""
    src, src_params = make(rng)
    plateau = src._plateau
    for _ in range(4):
        src.step(grads(rng, src_params))
        if plateau is not None:
            plateau.step(1.0)  # no improvement: the lr is scaled down
    opt, params = make(np.random.default_rng(8))
    opt.step(grads(rng, params))
    before = snapshot(opt, params)
    if via == "file":
        path = tmp_path / "ck.npz"
        fo.save(path, src)
        edit_meta(path, lambda meta: edit(meta["optimizer"]))
        with pytest.raises(fo.CheckpointError):
            fo.load(path, opt)
    else:
        sd = src.state_dict()
        edit(sd)
        with pytest.raises(ValueError) as err:
            opt.load_state_dict(sd)
        assert type(err.value) in (ValueError, fo.CheckpointError), err.value
    assert snapshot(opt, params) == before


@pytest.mark.parametrize(
    "opts",
    [{}, {"state_dtype": "int8"}, {"master_weights": True}],
    ids=["float32", "int8", "bf16-master"],
)
def test_load_reads_into_the_arrays_without_a_second_copy(
    opts: dict[str, Any], rng: np.random.Generator, tmp_path: Path
) -> None:
    """``load`` read every member into new arrays and held them all until it applied them:
    parameters plus state again (+1x P+S, 84 GB for a 7B-parameter AdamW offload).  It now
    checks the whole file first (each member's CRC through a 1 MiB buffer, keeping only the
    quantized scales), then reads each member straight into its array; the result is that of
    a copy, bit for bit."""
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if opts.get("master_weights") else np.float32
    n = 1 << 20
    params = {k: rng.standard_normal(n).astype(dtype) for k in ("a", "b")}
    opt = fo.AdamW(params, lr=0.01, **opts)
    for _ in range(2):
        opt.step({k: rng.standard_normal(n).astype(dtype) for k in params})
    path = tmp_path / "ck.npz"
    fo.save(path, opt)
    want = opt.state_dict()
    want_params = {k: p.copy() for k, p in params.items()}
    opt.step({k: rng.standard_normal(n).astype(dtype) for k in params})
    size = sum(p.nbytes for p in params.values()) + opt.state_bytes()
    tracemalloc.start()
    try:
        fo.load(path, opt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (4 << 20) + size // 50, (peak, size)  # the scales (int8: 1/64), buffers
    got = opt.state_dict()
    for k in params:
        assert params[k].tobytes() == want_params[k].tobytes()
        for name, v in want["state"][k].items():
            assert np.asarray(got["state"][k][name]).tobytes() == np.asarray(v).tobytes(), name
    assert got["step_count"] == want["step_count"]


def test_a_read_failing_after_the_checks_says_what_was_loaded(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: Any
) -> None:
    """The second read (into the arrays) follows a complete check of the file through the
    same descriptor: only an I/O error can stop it.  Then the error says that the parameters
    and state are partly loaded, and loading again restores everything."""
    opt, params = build(rng)
    opt.step(grads(rng, params))
    path = tmp_path / "ck.npz"
    fo.save(path, opt)
    want = {k: p.copy() for k, p in params.items()}
    opt.step(grads(rng, params))
    fail_second_reads(monkeypatch)
    with pytest.raises(fo.CheckpointError, match=r"partly loaded .*Input/output error.*again"):
        fo.load(path, opt)
    monkeypatch.undo()
    # Until a load succeeds, nothing may use or record the torn state (a save would overwrite
    # a good checkpoint with it).
    other = tmp_path / "other.npz"
    for use in (
        lambda: opt.step(grads(rng, params)),
        lambda: fo.save(other, opt),
        opt.state_dict,
        lambda: pickle.dumps(opt),
        lambda: opt._check_ready("DataParallel.step"),  # (what the ranks agree on first)
    ):
        with pytest.raises(RuntimeError, match="partly loaded"):
            use()
    assert not other.exists()
    fo.load(path, opt)
    for k, p in params.items():
        assert p.tobytes() == want[k].tobytes()
    opt.step(grads(rng, params))  # usable again


def test_an_interrupted_load_leaves_the_optimizer_refusing_until_a_load_succeeds(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: Any
) -> None:
    """Ctrl-C during the second read (minutes for a large checkpoint) left zeroed moments and
    partly loaded parameters that stepped and saved normally: the usual ``except
    KeyboardInterrupt: fo.save(path, opt)`` overwrote a good checkpoint with them."""
    opt, params = build(rng)
    opt.step(grads(rng, params))
    path = tmp_path / "ck.npz"
    fo.save(path, opt)
    read = checkpoint._read_array

    def interrupted(*args: Any, into: Any = None, **kwargs: Any) -> Any:
        if into is not None:
            raise KeyboardInterrupt
        return read(*args, into=into, **kwargs)

    monkeypatch.setattr(checkpoint, "_read_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fo.load(path, opt)
    monkeypatch.undo()
    saved = path.read_bytes()
    with pytest.raises(RuntimeError, match=r"partly loaded .*KeyboardInterrupt"):
        fo.save(path, opt)
    assert path.read_bytes() == saved
    opt.load_state_dict(build(rng)[0].state_dict())  # a state dict clears it too
    opt.step(grads(rng, params))
