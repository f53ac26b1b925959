"""Checkpoints: one ``.npz`` file with the parameters and the optimizer's whole state.

    >>> fastoptim.save("run.npz", opt)          # doctest: +SKIP
    >>> fastoptim.load("run.npz", opt)          # doctest: +SKIP  (a fresh optimizer, same model)

The file is a NumPy ``.npz`` archive (zip) that ``np.load(path)`` can read without pickle:
one member per array (``p<i>`` for parameter ``i``, ``s<i>.<state name>`` for its state) and
``meta``, a UTF-8 JSON document holding everything else: the optimizer class, the step count,
every group's hyper-parameters (schedules described), the parameters' keys, dtypes and shapes,
the attached ReduceLROnPlateau's counters.

**Crash-safe**: :func:`save` writes a temporary file in the same directory, flushes it to disk,
then renames it over `path`; an interrupted save leaves the previous checkpoint intact.

**Checked**: :func:`load` reads and verifies the whole file (zip CRCs, every member present,
names, shapes and dtypes against the optimizer) before writing anything; a truncated or corrupted
file, another optimizer's checkpoint or mismatched shapes raise :class:`CheckpointError` (a
``ValueError``) and change nothing.  Parameters are restored **in place** into the optimizer's
own arrays.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Union

import numpy as np

from .engine.optimizer import Optimizer

__all__ = ["save", "load", "CheckpointError"]

PathLike = Union[str, "os.PathLike[str]"]
_FORMAT = "fastoptim.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not match the optimizer."""


def _params(opt: Optimizer) -> list[tuple[Any, np.ndarray]]:
    """(key, array) of every parameter of `opt`, in order."""
    return [(k, p) for g in opt._groups for k, p in zip(g.keys, g.params)]


def save(path: PathLike, opt: Optimizer) -> None:
    """Write the parameters of `opt` and its whole state to `path` (an ``.npz`` file),
    atomically: a crash during the save never destroys an existing file at `path`."""
    if not isinstance(opt, Optimizer):
        raise TypeError(f"save: opt must be a fastoptim optimizer, got {type(opt).__name__}")
    path = os.fspath(path)
    pairs, sd = _params(opt), opt._state_dict(copy=False)
    arrays: dict[str, np.ndarray] = {}
    params, state = [], []
    for i, (key, p) in enumerate(pairs):
        arrays[f"p{i}"] = p
        params.append({"key": key, "dtype": p.dtype.str, "shape": list(p.shape)})
        names = sorted(sd["state"][key])
        for n in names:
            arrays[f"s{i}.{n}"] = sd["state"][key][n]
        state.append(names)
    meta = {
        "format": _FORMAT,
        "params": params,
        "state": state,
        "optimizer": {k: v for k, v in sd.items() if k != "state"},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def load(path: PathLike, opt: Optimizer, strict: bool = True) -> None:
    """Restore a :func:`save` checkpoint: the parameters **in place** into `opt`'s arrays and
    the whole optimizer state (as :meth:`~fastoptim.Optimizer.load_state_dict`, same `strict`).

    `opt` must be built like the saved one (same class, same parameter names or order, shapes
    and dtypes; an attached ReduceLROnPlateau if the checkpoint has one).  Everything is read
    and verified before anything is written; any problem raises :class:`CheckpointError`
    naming it, and changes nothing."""
    if not isinstance(opt, Optimizer):
        raise TypeError(f"load: opt must be a fastoptim optimizer, got {type(opt).__name__}")
    path = os.fspath(path)
    meta, arrays = _read(path)
    pairs = _params(opt)
    where = f"load({path!r})"
    try:
        params, state_names = meta["params"], meta["state"]
        sd = dict(meta["optimizer"])
        if len(params) != len(state_names):
            raise ValueError("inconsistent metadata")
        keys = [p["key"] for p in params]
        by_key = dict(zip(keys, range(len(keys))))
        sd["state"] = {
            k: {n: arrays[f"s{i}.{n}"] for n in names}
            for i, (k, names) in enumerate(zip(keys, state_names))
        }
        # JSON turned int keys into ints already (they are list entries), tuples into lists.
        for rec in sd["param_groups"]:
            rec["params"] = list(rec["params"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: malformed checkpoint metadata ({e!r})") from None
    problems = []
    mine = [k for k, _ in pairs]
    missing = [k for k in mine if k not in by_key]
    unexpected = [k for k in keys if k not in set(mine)]
    if strict and (missing or unexpected):
        problems.append(f"parameters: missing {missing}, unexpected {unexpected}")
    copies = []
    for k, p in pairs:
        if k not in by_key:
            continue
        a = arrays[f"p{by_key[k]}"]
        if a.dtype != p.dtype or a.shape != p.shape:
            problems.append(
                f"parameter {k!r}: {a.dtype} {a.shape} in the file, {p.dtype} {p.shape} here"
            )
        copies.append((p, a))
    if problems:
        raise CheckpointError(
            f"{where}: the checkpoint does not match:\n  - " + "\n  - ".join(problems)
        )
    try:
        apply = opt._loader(sd, strict, where)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    apply()
    for p, a in copies:
        np.copyto(p, a)


def _read(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every member of the archive, fully read (so the zip CRCs are checked), and the meta."""
    where = f"load({path!r})"
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # zipfile, zlib, struct, numpy header errors: a damaged file
        raise CheckpointError(
            f"{where}: not a readable checkpoint (truncated or corrupted?): {e}"
        ) from None
    if "meta" not in arrays:
        raise CheckpointError(f"{where}: not a fastoptim checkpoint (no 'meta' member)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: corrupted metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointError(f"{where}: not a fastoptim checkpoint (format != {_FORMAT!r})")
    try:
        n = len(meta["params"])
        wanted = {f"p{i}" for i in range(n)} | {
            f"s{i}.{s}" for i, names in enumerate(meta["state"]) for s in names
        }
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: malformed checkpoint metadata ({e!r})") from None
    if set(arrays) != wanted:
        raise CheckpointError(
            f"{where}: members missing {sorted(wanted - set(arrays))}, "
            f"unexpected {sorted(set(arrays) - wanted)}"
        )
    for i, p in enumerate(meta["params"]):
        a = arrays[f"p{i}"]
        if a.dtype.str != p.get("dtype") or list(a.shape) != p.get("shape"):
            raise CheckpointError(f"{where}: member p{i} does not match its metadata")
    return meta, arrays
