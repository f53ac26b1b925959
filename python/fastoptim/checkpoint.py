"""Checkpoints: one ``.npz`` file with the parameters and the optimizer's whole state.

    >>> fastoptim.save("run.npz", opt)          # doctest: +SKIP
    >>> fastoptim.load("run.npz", opt)          # doctest: +SKIP

(``load``: into an optimizer of the same class over the same model, e.g. a fresh one after a
restart.)

The file is a NumPy ``.npz`` archive (zip) that ``np.load(path)`` can read without pickle:
one member per array (``p<i>`` for parameter ``i``, ``s<i>.<state name>`` for its state) and
``meta``, a UTF-8 JSON document holding everything else: the optimizer class, the step count,
every group's hyper-parameters (schedules described), the parameters' keys, dtypes and shapes,
the attached ReduceLROnPlateau's counters.  The metadata is strict JSON (RFC 8259): a
non-finite number (a plateau's ``best`` before its first metric is infinite) is written as the
object ``{"$float": "inf"}`` (``"-inf"``, ``"nan"``); files of earlier versions, which wrote
the non-standard token ``Infinity``, still load.

**Crash-safe**: :func:`save` writes a temporary file in the same directory, flushes it to disk,
then renames it over `path`; an interrupted save leaves the previous checkpoint intact, and the
temporary file a killed save leaves behind is removed by the next save to the same path.

**Checked**: :func:`load` reads and verifies the whole file (zip CRCs, every member present,
names, shapes and dtypes against the optimizer) before writing anything; a truncated, corrupted
or crafted file, another optimizer's checkpoint or mismatched shapes raise
:class:`CheckpointError` (a ``ValueError``) and change nothing.  (Then it reads the arrays
again, into place: an I/O error or an interrupt there leaves the optimizer partly loaded, and
it refuses to step, save, pickle or give its state dict until a load succeeds.)  Sizes are
checked before anything is decompressed or allocated: every member must have exactly the size
the optimizer's arrays imply, so a small file cannot make :func:`load` allocate or decompress
more than the optimizer's own parameters and state.  Parameters are restored **in place** into the
optimizer's own arrays, and so is the state: the file is read twice through one descriptor,
once to check it whole (nothing kept but the quantized states' scales), once into the arrays,
so a load needs about 2 MiB beyond them.

**Consistent**: both take the optimizer's lock, so a step running in another thread is in the
file (or the optimizer) whole or not at all; both are refused inside ``opt.ema_weights()``,
where the parameters hold their EMA.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import secrets
import socket
import stat
import zipfile
from typing import IO, Any, Union

import numpy as np

from .engine import precision
from .engine.optimizer import Optimizer, _dtype, _homes, _moved, _precision_mismatch

__all__ = ["save", "load", "CheckpointError"]

PathLike = Union[str, "os.PathLike[str]"]
_FORMAT_NAME = "fastoptim.checkpoint/"
_FORMAT = _FORMAT_NAME + "1"
_TMP_TAG = ".fastoptim-tmp-"
_CHUNK = 1 << 20  # bytes decompressed per read: no second copy of a large member
_MAX_NPY_HEADER = 1 << 16  # numpy writes headers of 128 bytes or so
_META_BASE = 16 << 20  # metadata size allowed: 16 MiB + 64 KiB per parameter
_META_PER_PARAM = 64 << 10
_FLOAT = "$float"  # a non-finite number in the metadata: {"$float": "inf" | "-inf" | "nan"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not match the optimizer.  ``torn``: why
    a load stopped after it had started writing into the optimizer (then partly loaded), else
    None."""

    torn: str | None = None


def _kind(dtype: np.dtype[Any]) -> str:
    """How the metadata names a dtype: NumPy's ``dtype.str`` (``"<f4"``), or ``"bfloat16"``
    (ml_dtypes' bfloat16, written as its uint16 bit patterns: ``.npy`` has no bfloat16)."""
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


def _stored(a: np.ndarray) -> np.ndarray:
    """`a` as written to its ``.npy`` member (bfloat16 as uint16 bits)."""
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


def _state_kinds(
    opt: Optimizer, key: Any, p: np.ndarray, names: list[str], saved: list[Any]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The dtypes (as :func:`_kind` names them) and shapes that state `names` of parameter
    `key` have in `opt` once the checkpoint (group records `saved`) is loaded: its precision
    policy decides them (quantized states have uint8 codes and per-block scales), with the
    checkpoint's ``ema_decay`` (its hyper-parameters win); a name it gives no buffer is
    absent."""
    for gi, (g, group) in enumerate(zip(opt._groups, opt.param_groups)):
        if key in g.keys:
            rec = saved[gi] if gi < len(saved) else None
            hyper = rec.get("hyper") if isinstance(rec, dict) else None
            if isinstance(hyper, dict) and precision.EMA_DECAY in hyper:
                group = {**group, precision.EMA_DECAY: hyper[precision.EMA_DECAY]}
            kinds = precision.buffers(group, _dtype(p.dtype).name, tuple(names), p.size)
            out = {}
            for n, k in kinds.items():
                own = opt._definition.state_shape(n, p.shape)  # (Adafactor's factored state)
                if own is None:
                    continue
                dtype, shape = precision.storage(k, own)
                out[n] = (_kind(_dtype(dtype)), shape)
            return out
    return {}


def _params(opt: Optimizer) -> list[tuple[Any, np.ndarray]]:
    """(key, array) of every parameter of `opt`, in order."""
    return [(k, p) for g in opt._groups for k, p in zip(g.keys, g.params)]


# ------------------------------------------------------------------------------------ save
def save(path: PathLike, opt: Optimizer) -> None:
    """Write the parameters of `opt` and its whole state to `path` (an ``.npz`` file),
    atomically: a crash during the save never destroys an existing file at `path`.

    The file is written to a temporary file next to the target, named
    ``.<name>.fastoptim-tmp-<host>-<pid>-<random>``, flushed to disk (``fsync``) and renamed
    over the target; the directory is then flushed too.  A save killed before the rename
    (``kill -9``, power loss) leaves that temporary file; the next save to the same path
    removes such leftovers when they come from this host and their process is gone (never the
    file of a save still running, in this or another process).

    - **Permissions**: a new file gets the mode ``open(path, "w")`` would give it (``0o666``
      less the umask); a file that is replaced keeps its permission bits.
    - **Symbolic links**: if `path` is a symlink, the file it points to is replaced and the
      link is kept, as writing through ``open(path, "w")`` would do (a dangling link gets its
      target created).
    - **Threads**: the save holds the optimizer's lock (a step in another thread waits for
      it), so the file holds the state between two steps, never part of one.
    - Refused (``RuntimeError``) inside ``opt.ema_weights()``, where the parameters hold
      their EMA.  An error creating or replacing the file is an ``OSError`` naming `path`
      and its directory.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"save: opt must be a fastoptim optimizer, got {type(opt).__name__}")
    host = opt._definition.host
    if host is not None and host.closure is not None:
        raise TypeError(
            f"save: {type(opt).__name__}'s history (lists of vectors) has no place in a "
            "checkpoint file; pickle the optimizer, or its state_dict(), instead"
        )
    target = os.path.realpath(os.fspath(path))  # through symlinks: replace the file, keep links
    with opt._lock:  # (the arrays are the live state: written before the lock is released)
        opt._check_not_swapped("save")
        _write(path, target, _contents(opt))


def _contents(opt: Optimizer) -> dict[str, np.ndarray]:
    """The members of `opt`'s checkpoint: views of its parameters and state, and ``meta``."""
    pairs, sd = _params(opt), opt._state_dict(copy=False)
    arrays: dict[str, np.ndarray] = {}
    params, state = [], []
    for i, (key, p) in enumerate(pairs):
        arrays[f"p{i}"] = _stored(p)
        params.append({"key": key, "dtype": _kind(p.dtype), "shape": list(p.shape)})
        names = sorted(sd["state"][key])
        for n in names:
            arrays[f"s{i}.{n}"] = _stored(sd["state"][key][n])
        state.append(names)
    meta = {
        "format": _FORMAT,
        "params": params,
        "state": state,
        "optimizer": {k: v for k, v in sd.items() if k != "state"},
    }
    text = json.dumps(_strict_json(meta), allow_nan=False)
    arrays["meta"] = np.frombuffer(text.encode(), dtype=np.uint8)
    return arrays


def _write(path: PathLike, target: str, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to the file `target` (`path` as the caller gave it) atomically."""
    directory, name = os.path.split(target)
    _remove_stale_temporaries(directory, name)
    fd, tmp = _create_temporary(directory, name, path)
    try:
        with os.fdopen(fd, "wb") as f:  # (closes fd whatever fails below)
            try:
                mode = stat.S_IMODE(os.stat(target).st_mode)
            except FileNotFoundError:
                pass
            except OSError as e:  # e.g. a name too long, a symbolic link loop
                raise _named(e, path, f"cannot read the permissions of {target!r}") from None
            else:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, mode)
            try:
                np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:  # e.g. no space left on the device
                raise _named(e, path, f"cannot write {target!r}") from None
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise _named(e, path, f"cannot replace {target!r}") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _host() -> str:
    """This machine's name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _strict_json(x: Any) -> Any:
    """`x` (JSON-able data) with every non-finite float as ``{"$float": "inf"}`` (``"-inf"``,
    ``"nan"``): what ``json.dumps(..., allow_nan=False)`` takes.  :func:`_float_hook` reads
    them back."""
    if isinstance(x, float) and not math.isfinite(x):
        return {_FLOAT: repr(float(x))}
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    return x


def _float_hook(obj: dict[str, Any]) -> Any:
    """``json.loads``'s object hook: ``{"$float": "inf"}`` (see :func:`_strict_json`) -> inf."""
    if len(obj) == 1 and obj.get(_FLOAT) in ("inf", "-inf", "nan"):
        return float(obj[_FLOAT])
    return obj


def _version() -> str:
    from . import __version__

    return __version__


def _named(e: OSError, path: PathLike, what: str) -> OSError:
    """`e` (about the temporary file) as an error of the same type naming the user's `path`."""
    return type(e)(e.errno, f"save: {what}: {e.strerror}", os.fspath(path))


def _tmp_prefix(name: str) -> str:
    # The target's name is shortened to 120 bytes (whole characters) so that the temporary
    # name stays under the usual limit of 255 bytes.
    while len(os.fsencode(name)) > 120:
        name = name[:-1]
    return f".{name}{_TMP_TAG}"


def _create_temporary(directory: str, name: str, path: PathLike) -> tuple[int, str]:
    """A new file for writing, ``.<name>.fastoptim-tmp-<host>-<pid>-<random>`` in
    `directory`, created with mode 0o666 less the umask (as ``open(path, "w")`` does).  An
    error (no such directory, no permission) names `path` and `directory`, not the temporary
    file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(
            directory, f"{_tmp_prefix(name)}{_host()}-{os.getpid()}-{secrets.token_hex(6)}"
        )
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        except OSError as e:
            raise _named(e, path, f"cannot create a file in the directory {directory!r}") from None
    raise FileExistsError(f"save: could not create a temporary file in {directory!r}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be saving right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours, or cannot tell: keep its file
    return True


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Remove the temporary files of saves to `name` killed before their rename: those of
    this host whose process no longer exists.  Best effort: errors are ignored."""
    if os.name != "posix":  # os.kill(pid, 0) only probes a process on POSIX
        return
    pattern = re.compile(re.escape(_tmp_prefix(name)) + r"([A-Za-z0-9]+)-([0-9]+)-[0-9a-f]{12}")
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    host = _host()
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m is None or m.group(1) != host or _pid_alive(int(m.group(2))):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
        except OSError:
            pass


# ------------------------------------------------------------------------------------ load
def load(path: PathLike, opt: Optimizer, strict: bool = True) -> None:
    """Restore a :func:`save` checkpoint: the parameters **in place** into `opt`'s arrays and
    the whole optimizer state (as :meth:`~fastoptim.Optimizer.load_state_dict`, same `strict`).

    `opt` must be built like the saved one (same class, same parameter names or order, shapes
    and dtypes; an attached ReduceLROnPlateau if the checkpoint has one).  Everything is read
    and verified before anything is written; any problem raises :class:`CheckpointError`
    naming it, and changes nothing.  The arrays are then read a second time, straight into
    place: an I/O error (:class:`CheckpointError`) or an interrupt there leaves `opt` partly
    loaded, and it refuses (``RuntimeError``) to step, save, pickle or give its state dict
    until a load (or ``load_state_dict``) succeeds.

    **The checkpoint's hyper-parameters win**, as with torch's ``load_state_dict``: every
    group's hyper-parameters and schedules become the saved ones, whatever `opt` was built
    with (e.g. loading a checkpoint saved with ``amsgrad=False`` into an optimizer built with
    ``amsgrad=True`` turns AMSGrad off).  Set them again after loading to change them.

    Sizes are checked before anything is decompressed or allocated: each member must hold
    exactly the dtype and shape of the optimizer's array it restores, so a crafted file (a
    "zip bomb") is rejected without allocating more than the optimizer's own arrays.  With
    ``strict=False`` the arrays of parameters `opt` does not have are skipped unread, and the
    parameters the file does not have keep their values and state; a parameter both have
    must still be in the same group in both (its state and its group's hyper-parameters go
    together).

    Every destination is checked too: a parameter or a state array made read-only, a
    copy-out array resized or made read-only, raise :class:`CheckpointError` before any
    change.  The copy-out arrays (:meth:`~fastoptim.Optimizer.set_copy_out`) get their
    parameters' loaded values rounded to nearest, which is what a step with
    ``rounding="nearest"`` writes there, so a resume is bit-exact; with
    ``rounding="stochastic"`` the step's random rounding of the copies is not reproduced (the
    first gradient after the load is taken at the nearest copies).

    The load holds the optimizer's lock (a step in another thread waits for it), and is
    refused (``RuntimeError``) inside ``opt.ema_weights()``, whose exit would overwrite the
    loaded parameters."""
    if not isinstance(opt, Optimizer):
        raise TypeError(f"load: opt must be a fastoptim optimizer, got {type(opt).__name__}")
    host = opt._definition.host
    if host is not None and host.closure is not None:
        raise TypeError(f"load: {type(opt).__name__} has no checkpoint files (see save)")
    path = os.fspath(path)
    where = f"load({path!r})"
    with opt._lock:
        opt._check_not_swapped(where, loading=True)
        _load(path, opt, strict, where)
        opt._torn = None


def _load(path: str, opt: Optimizer, strict: bool, where: str) -> None:
    """:func:`load`, under the optimizer's lock."""
    pairs = _params(opt)
    mine = dict(pairs)
    mode = os.stat(path).st_mode  # (a missing path: FileNotFoundError, as open's)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # (open would wait on a FIFO's writer)
        raise CheckpointError(f"{where}: not a regular file (a pipe, socket or device)")
    with open(path, "rb") as fh:
        try:
            archive = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise CheckpointError(
                f"{where}: not a readable checkpoint (truncated or corrupted?): {e}"
            ) from None
        with archive:
            members = _members(archive, where)
            meta = _read_meta(archive, members, len(pairs), where)
            keys, state_names = _layout(meta, where)
            wanted = (
                {"meta"}
                | {f"p{i}" for i in range(len(keys))}
                | {f"s{i}.{n}" for i, names in enumerate(state_names) for n in names}
            )
            if set(members) != wanted:
                raise CheckpointError(
                    f"{where}: members missing {sorted(wanted - set(members))}, "
                    f"unexpected {sorted(set(members) - wanted)}"
                )
            problems = []
            records = meta["optimizer"].get("param_groups")
            if not isinstance(records, list):
                records = []  # (the loader reports the damage)
            if len(records) == len(opt.param_groups):
                for gi, (rec, group) in enumerate(zip(records, opt.param_groups)):
                    hyper = rec.get("hyper") if isinstance(rec, dict) else None
                    if isinstance(hyper, dict):  # (else the loader reports the damage)
                        problems.append(_precision_mismatch(f"group {gi}", hyper, group))
                try:  # (the loader says it too; first here, where the states' kinds need it)
                    problems.append(_moved(opt._groups, _homes(records)))
                except TypeError:  # unhashable keys: the loader reports the damage
                    pass
            problems = [p for p in problems if p]
            missing = [k for k in mine if k not in set(keys)]
            unexpected = [k for k in keys if k not in mine]
            if strict and (missing or unexpected):
                problems.append(f"parameters: missing {missing}, unexpected {unexpected}")
            for k, rec in zip(keys, meta["params"]):
                p = mine.get(k)
                if p is not None and (rec["dtype"] != _kind(p.dtype) or rec["shape"] != [*p.shape]):
                    dtype = _dtype_name(rec["dtype"])
                    shape = tuple(rec["shape"])
                    problems.append(
                        f"parameter {k!r}: {dtype} {shape} in the file, {p.dtype} {p.shape} here"
                    )
            if problems:
                raise CheckpointError(
                    f"{where}: the checkpoint does not match:\n  - " + "\n  - ".join(problems)
                )
            # Check every member this optimizer uses against the array it restores, reading
            # it whole (its zip CRC too) but keeping only the quantized states' scales, whose
            # values the loader checks: the others are read again, after every check passed,
            # straight into their arrays (no second copy of the parameters and state).
            arrays: dict[str, np.ndarray] = {}
            later: list[tuple[str, str, tuple[int, ...], Any, str | None]] = []
            for i, (k, names) in enumerate(zip(keys, state_names)):
                p = mine.get(k)
                if p is None:
                    continue  # strict=False: a parameter this optimizer does not have
                later.append((f"p{i}", _kind(p.dtype), p.shape, k, None))
                kinds = _state_kinds(opt, k, p, names, records)
                for n in names:
                    if n not in kinds:
                        raise CheckpointError(
                            f"{where}: the checkpoint has a state {n!r} for parameter {k!r}; "
                            "its precision options (state_dtype, master_weights, kahan, "
                            "ema_decay) give it none"
                        )
                    kind, shape = kinds[n]
                    member = f"s{i}.{n}"
                    if n.endswith(precision.ABSMAX):
                        arrays[member] = _read_array(archive, members[member], kind, shape, where)
                    else:
                        later.append((member, kind, shape, k, n))
            for member, kind, shape, _, state in later:
                stand_in = _read_array(archive, members[member], kind, shape, where, verify=True)
                if state is not None:
                    arrays[member] = stand_in
            try:
                sd = dict(meta["optimizer"])
                sd["state"] = {
                    k: {n: arrays[f"s{i}.{n}"] for n in names}
                    for i, (k, names) in enumerate(zip(keys, state_names))
                    if k in mine
                }
                records = sd["param_groups"]
                if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                    raise CheckpointError(
                        f"{where}: malformed checkpoint metadata (param_groups must be a list "
                        "of objects)"
                    )
                # JSON turned tuples into lists; parameter keys are list entries.
                sd["param_groups"] = [{**r, "params": list(r.get("params", ()))} for r in records]
                apply = opt._loader(sd, strict, where)
            except CheckpointError:
                raise
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            except (
                TypeError,
                KeyError,
                IndexError,
                AttributeError,
                OverflowError,
                RecursionError,
            ) as e:
                # The metadata is checked before any change: a field of the wrong type is
                # reported as a damaged file, never as an error from deep inside the loader.
                raise CheckpointError(f"{where}: malformed checkpoint metadata ({e!r})") from None
            try:
                apply()  # the plateau's configuration is compared first, before any change
            except CheckpointError:
                raise
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            # Every check passed (the file too, through the descriptor still open: a save
            # replacing it meanwhile does not change what is read): the arrays, read again.
            live = opt.state
            try:
                for member, kind, shape, k, state in later:
                    into = mine[k] if state is None else live[k][state]
                    _read_array(archive, members[member], kind, shape, where, into=into)
            except BaseException as e:  # an I/O error, Ctrl-C, MemoryError...
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                opt._torn = (
                    f"the optimizer is partly loaded ({where} stopped after it had started "
                    f"writing: {why}); load a checkpoint (or a state dict) again first"
                )
                if isinstance(e, Exception):
                    err = CheckpointError(f"{where}: {opt._torn}")
                    err.torn = why
                    raise err from None
                raise
    opt._write_copy_outs()


def _dtype_name(descr: str) -> str:
    try:
        return str(np.dtype(descr))
    except (TypeError, ValueError):
        return repr(descr)


def _members(archive: zipfile.ZipFile, where: str) -> dict[str, zipfile.ZipInfo]:
    """Member name (without ``.npy``) -> its zip entry; names must be unique ``.npy`` files."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename
        if not name.endswith(".npy") or name[:-4] in members:
            raise CheckpointError(f"{where}: unexpected or repeated member {name!r}")
        members[name[:-4]] = info
    if "meta" not in members:
        raise CheckpointError(f"{where}: not a fastoptim checkpoint (no 'meta' member)")
    return members


def _read_meta(
    archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], n_params: int, where: str
) -> dict[str, Any]:
    """The JSON metadata, its size bounded before it is read."""
    limit = _META_BASE + _META_PER_PARAM * n_params
    info = members["meta"]
    if info.file_size > limit:
        raise CheckpointError(
            f"{where}: member 'meta' declares {info.file_size} bytes (more than {limit}): "
            "not a checkpoint of this optimizer"
        )
    raw = _read_member(archive, info, "meta", None, where)
    try:
        meta = json.loads(raw.tobytes().decode(), object_hook=_float_hook)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: corrupted metadata ({e!r})") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(fmt, str) and fmt.startswith(_FORMAT_NAME) and fmt != _FORMAT:
        raise CheckpointError(
            f"{where}: a checkpoint of format {fmt!r}, which this fastoptim "
            f"({_version()}) does not read: it reads {_FORMAT!r} (written by a newer version?)"
        )
    if not isinstance(meta, dict) or fmt != _FORMAT:
        raise CheckpointError(f"{where}: not a fastoptim checkpoint (format != {_FORMAT!r})")
    return meta


def _layout(meta: dict[str, Any], where: str) -> tuple[list[Any], list[list[str]]]:
    """The parameters' keys and state names from `meta`, every field's type checked."""
    params, state = meta.get("params"), meta.get("state")
    bad = None
    if set(meta) != {"format", "params", "state", "optimizer"}:
        bad = f"fields {sorted(meta)}"
    elif not isinstance(params, list) or not isinstance(state, list) or len(params) != len(state):
        bad = "'params' and 'state' must be lists of the same length"
    elif not isinstance(meta["optimizer"], dict):
        bad = "'optimizer' must be an object"
    else:
        for i, (rec, names) in enumerate(zip(params, state)):
            if not (isinstance(rec, dict) and set(rec) == {"key", "dtype", "shape"}):
                bad = f"params[{i}] must be an object with key, dtype and shape"
            elif isinstance(rec["key"], bool) or not isinstance(rec["key"], (str, int)):
                bad = f"params[{i}]: key {rec['key']!r} is not a name or a position"
            elif not isinstance(rec["dtype"], str):
                bad = f"params[{i}]: dtype {rec['dtype']!r}"
            elif not (
                isinstance(rec["shape"], list)
                and all(type(n) is int and n >= 0 for n in rec["shape"])
            ):
                bad = f"params[{i}]: shape {rec['shape']!r}"
            elif not (
                isinstance(names, list)
                and all(isinstance(n, str) and re.fullmatch(r"\w+", n) for n in names)
                and len(set(names)) == len(names)
            ):
                bad = f"state[{i}]: state names {names!r}"
            if bad:
                break
        keys = [rec["key"] for rec in params] if bad is None else []
        if bad is None and len(set(keys)) != len(keys):
            bad = "repeated parameter keys"
    if bad is not None:
        raise CheckpointError(f"{where}: malformed checkpoint metadata ({bad})")
    assert isinstance(state, list)
    return keys, state


def _read_array(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    kind: str,
    shape: tuple[int, ...],
    where: str,
    *,
    verify: bool = False,
    into: np.ndarray | None = None,
) -> np.ndarray:
    """A parameter or state member: of dtype `kind` (see :func:`_kind`) and `shape` (the
    array's it restores); `verify`: read and checked, not kept (a stand-in of that dtype and
    shape, no memory, is returned); `into`: read into that array (C-contiguous, that dtype
    and shape)."""
    name = info.filename[:-4]
    dtype = _dtype("bfloat16") if kind == "bfloat16" else np.dtype(kind)
    bits = np.dtype(np.uint16) if kind == "bfloat16" else dtype
    if verify:
        _read_member(archive, info, name, (bits, shape), where, verify=True)
        return np.broadcast_to(np.zeros((), dtype), shape)
    if into is not None:
        assert into.dtype == dtype and into.shape == shape and into.flags.c_contiguous
        return _read_member(archive, info, name, (bits, shape), where, into=into.view(bits))
    return _read_member(archive, info, name, (bits, shape), where).view(dtype)


def _read_member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    name: str,
    expected: tuple[np.dtype[Any], tuple[int, ...]] | None,
    where: str,
    *,
    verify: bool = False,
    into: np.ndarray | None = None,
) -> np.ndarray:
    """Read one ``.npy`` member: its header first, checked against `expected` (dtype, shape;
    None: a 1-d uint8 array), then its declared size against the header's, and only then the
    data, decompressed in chunks straight into the result (the zip CRC is checked at the end):
    a new array, `into` (of the expected dtype and shape), or, `verify`, a 1 MiB scratch buffer
    (the data is checked, not kept: an empty array is returned)."""
    try:
        with archive.open(info) as f:
            dtype, shape, offset = _npy_header(f, name, where)
            if expected is None:
                ok = dtype == np.dtype(np.uint8) and len(shape) == 1
                want = "a 1-d uint8 array"
            else:
                ok = dtype == expected[0] and shape == expected[1]
                want = f"{expected[0]} {expected[1]}"
            if not ok:
                raise CheckpointError(
                    f"{where}: member {name!r} holds {dtype} {shape}, expected {want}"
                )
            nbytes = math.prod(shape) * dtype.itemsize
            if info.file_size != offset + nbytes:
                raise CheckpointError(
                    f"{where}: member {name!r} declares {info.file_size} bytes, its "
                    f"{dtype} {shape} array needs {offset + nbytes}"
                )
            out = np.empty(0 if verify else shape, dtype) if into is None else into
            buf = out.reshape(-1).view(np.uint8)
            scratch = np.empty(min(_CHUNK, nbytes) if verify else 0, np.uint8)
            pos = 0
            while pos < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - pos))
                if not chunk:
                    raise CheckpointError(f"{where}: member {name!r} is truncated")
                dest = scratch[: len(chunk)] if verify else buf[pos : pos + len(chunk)]
                dest[...] = np.frombuffer(chunk, np.uint8)
                pos += len(chunk)
            if f.read(1):  # also makes zipfile check the CRC if it has not yet
                raise CheckpointError(f"{where}: member {name!r} is longer than declared")
    except CheckpointError:
        raise
    except Exception as e:  # zipfile, zlib, struct errors: a damaged file
        raise CheckpointError(
            f"{where}: not a readable checkpoint (truncated or corrupted?): member {name!r}: {e}"
        ) from None
    return out


def _npy_header(f: IO[bytes], name: str, where: str) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """Parse a ``.npy`` header (format versions 1-3) without trusting any length in it:
    (dtype, shape, offset of the data)."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: member {name!r} is not a valid .npy array ({why})")

    start = f.read(8)
    if len(start) != 8 or start[:6] != b"\x93NUMPY" or start[6] not in (1, 2, 3):
        raise bad("no .npy signature")
    size_bytes = 2 if start[6] == 1 else 4
    hlen = int.from_bytes(f.read(size_bytes), "little")
    if hlen > _MAX_NPY_HEADER:
        raise bad(f"header of {hlen} bytes")
    text = f.read(hlen)
    if len(text) != hlen:
        raise bad("truncated header")
    try:
        header = ast.literal_eval(text.decode("utf-8" if start[6] == 3 else "latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        raise bad("unreadable header") from None
    if not (
        isinstance(header, dict)
        and set(header) == {"descr", "fortran_order", "shape"}
        and isinstance(header["descr"], str)
        and header["fortran_order"] is False
        and isinstance(header["shape"], tuple)
        and all(type(n) is int and n >= 0 for n in header["shape"])
    ):
        raise bad(f"header {header!r}"[:200])
    try:
        dtype = np.dtype(header["descr"])
    except (TypeError, ValueError):
        raise bad(f"dtype {header['descr']!r}") from None
    return dtype, header["shape"], 8 + size_bytes + hlen
