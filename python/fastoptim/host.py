r"""The steps that are not element-wise, in NumPy: :class:`~fastoptim.Muon`'s Newton-Schulz
orthogonalisation (through NumPy's ``@``, i.e. the BLAS NumPy links: OpenBLAS in the wheels)
and :class:`~fastoptim.LBFGS`'s two-loop recursion and strong-Wolfe line search.

The engine runs them in place of a compiled kernel (see
:class:`fastoptim.engine.definition.Host`); every tier (the NumPy classes, the functional
tier, :mod:`fastoptim.torch`) calls the same functions here on NumPy arrays (zero-copy views of
torch tensors in :mod:`fastoptim.torch`), so there is one implementation of each.

Nothing here imports the compiled extension: :mod:`fastoptim.definitions` (read by the code
generator without the build) names these functions.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:  # (typing.ParamSpec is Python 3.10+; the annotations are never evaluated)
    from typing import ParamSpec

    _P = ParamSpec("_P")
_R = TypeVar("_R")


def _silent(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `fn` under ``np.errstate(all="ignore")``: overflow, underflow and invalid results
    become Inf/0/NaN silently, as in torch's and in the compiled kernels' arithmetic (NumPy's
    warnings, or FloatingPointError under ``np.seterr(all="raise")``, would otherwise escape a
    step whose results are torch's)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- Muon
#: Keller Jordan's quintic Newton-Schulz coefficients (torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: How the Newton-Schulz iteration computes: "bfloat16" (torch.optim.Muon's convention: every
#: matrix product's inputs and outputs rounded to bfloat16, float32 accumulation), "float32",
#: "float64".
NS_DTYPES = ("bfloat16", "float32", "float64")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def round_bfloat16_(x: np.ndarray) -> np.ndarray:
    """Round the C-contiguous float32 array `x` to the nearest bfloat16 (ties to even) in
    place, keeping float32 storage: what torch stores in a bfloat16 tensor (a finite value at
    the top of the range carries into Inf, as torch's; NaN stays NaN, quiet).  On all threads
    (``fastoptim._core.round_bfloat16``).  Returns `x`."""
    from fastoptim import _core  # (not at import: codegen reads this module without it)

    _core.round_bfloat16(x)
    return x


class _Blas:
    """The library NumPy itself calls for BLAS (the OpenBLAS of NumPy's wheels, found beside
    NumPy and checked against ``numpy.show_config``), through :mod:`ctypes`, for two things:

    - ``?syrk`` (:meth:`syrk`): the upper triangle of :math:`X X^T` in one multithreaded call,
      on NumPy's own BLAS threads.  NumPy's ``x @ x.T`` calls the same ``syrk`` and then copies
      the other triangle on one thread, column by column: at 1024 x 1024 that copy took as long
      as the product itself on two threads (and more on sixteen).  :func:`gram_` completes the
      matrix with :func:`fastoptim._core.symmetrize` on all threads, rounding to bfloat16 in
      the same pass; the bits are NumPy's (the same call: the tests compare both routes).
    - OpenBLAS's threading callback (>= 0.3.28; :meth:`on_pool`): while it is set, OpenBLAS
      runs its threaded operations' jobs on fastoptim's pool, so that Newton-Schulz's products
      and the passes between them take turns on one set of threads (OpenBLAS's own workers
      busy-wait for about 0.1 s after each call on x86-64, on the CPUs the next pass wants).
      The same jobs, so the same bits.  Only while the process runs no other Python thread.

    Where the library is not found (another BLAS, another platform's layout) or
    ``FASTOPT_DIRECT_BLAS=0`` is set, neither is used: :func:`gram_` calls ``x @ x.T`` and
    :meth:`on_pool` does nothing."""

    def __init__(self) -> None:
        self.fns: dict[np.dtype[Any], Callable[..., None]] = {}
        self.setter: int | None = None  # openblas_set_threads_callback_function's address
        import os

        if os.environ.get("FASTOPT_DIRECT_BLAS", "1") == "0":
            return
        try:
            self._find()
        except (OSError, AttributeError, KeyError, TypeError, ImportError):  # pragma: no cover
            self.fns, self.setter = {}, None

    def _find(self) -> None:
        import ctypes
        import glob
        import os

        config = getattr(np, "__config__", None)
        blas = getattr(config, "CONFIG", {}).get("Build Dependencies", {}).get("blas", {})
        if blas.get("name") != "scipy-openblas":
            return
        root = os.path.dirname(os.path.abspath(np.__file__))
        found = []
        for pattern in (
            os.path.join(root + ".libs", "*scipy_openblas*"),  # Linux / Windows wheels
            os.path.join(root, ".dylibs", "*scipy_openblas*"),  # macOS wheels
        ):
            found += sorted(glob.glob(pattern))
        if len(found) != 1:
            return
        lib = ctypes.CDLL(found[0])  # (already loaded by NumPy: the same handle and threads)
        # scipy-openblas64 (64-bit integers) names its symbols scipy_cblas_*64_ and
        # scipy_openblas_*64_, the 32-bit integer build scipy_cblas_* and scipy_openblas_*
        ilp64 = hasattr(lib, "scipy_cblas_ssyrk64_")
        suffix, index = ("64_", ctypes.c_int64) if ilp64 else ("", ctypes.c_int)
        for dtype, scalar, name in (
            (np.float32, ctypes.c_float, "ssyrk"),
            (np.float64, ctypes.c_double, "dsyrk"),
        ):
            fn = getattr(lib, f"scipy_cblas_{name}{suffix}")
            fn.restype = None
            fn.argtypes = [ctypes.c_int] * 3 + [index, index, scalar, ctypes.c_void_p, index]
            fn.argtypes += [scalar, ctypes.c_void_p, index]
            self.fns[np.dtype(dtype)] = fn
        setter = getattr(lib, f"scipy_openblas_set_threads_callback_function{suffix}", None)
        if setter is not None:  # (OpenBLAS < 0.3.28 has none)
            self.setter = ctypes.cast(setter, ctypes.c_void_p).value

    def syrk(self, x: np.ndarray, out: np.ndarray) -> bool:
        """The upper triangle of ``out = x @ x.T`` (C-contiguous, same dtype, ``(m, m)``);
        False when no direct call is available for these arrays (nothing written: NumPy's
        ``@`` then checks them)."""
        fn = self.fns.get(x.dtype)
        m, k = x.shape
        if (
            fn is None
            or out.dtype != x.dtype
            or out.shape != (m, m)
            or not (x.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable)
        ):
            return False
        # row-major (101), upper (121), no transpose (111): C = 1 A A^T + 0 C
        fn(101, 121, 111, m, k, 1.0, x.ctypes.data, max(k, 1), 0.0, out.ctypes.data, max(m, 1))
        return True

    def on_pool(self) -> contextlib.AbstractContextManager[None]:
        """A context manager: OpenBLAS's threaded jobs on fastoptim's pool inside its block
        (``_core.BlasOnPool``; nested blocks count: the callback is unset when the outermost
        one ends), where the process runs no other Python thread.  OpenBLAS runs a callback's
        job ``i`` in its own slot ``i`` of per-thread status and buffers, the slots its own
        workers use: another thread's OpenBLAS call running on OpenBLAS's threads at the same
        time (one that started before the callback was set) could have its job dropped (a
        hang, seen) or its buffers shared.  With other Python threads (the way into NumPy's
        OpenBLAS besides this one), OpenBLAS keeps its own threads: a ``nullcontext``."""
        import sys

        from fastoptim import _core

        setter = self.setter
        if setter is None or len(sys._current_frames()) > 1:
            return contextlib.nullcontext()
        return _core.BlasOnPool(setter)

    @contextlib.contextmanager
    def own_threads(self) -> Iterator[None]:
        """Inside its block :meth:`on_pool` does nothing: OpenBLAS runs its jobs on its own
        threads, as where its threading callback is missing (the A/B of the benchmark and the
        tests).  Not thread-safe: it changes this process-wide object."""
        setter, self.setter = self.setter, None
        try:
            yield
        finally:
            self.setter = setter


_BLAS: _Blas | None = None


def _blas() -> _Blas:
    global _BLAS
    if _BLAS is None:
        _BLAS = _Blas()
    return _BLAS


def gram_(x: np.ndarray, out: np.ndarray, bf16: bool = False) -> np.ndarray:
    """``out = x @ x.T`` for a C-contiguous 2-D float32/float64 `x` (`out` C-contiguous,
    ``(m, m)``, same dtype), rounded to bfloat16 (kept in float32) when `bf16`: BLAS syrk
    called directly where NumPy's BLAS is found (see :class:`_Blas`), else NumPy's ``@``.
    Returns `out`."""
    from fastoptim import _core

    if x.shape[0] > 0 and x.shape[1] > 0 and _blas().syrk(x, out):
        _core.symmetrize(out, bf16)
        return out
    np.matmul(x, x.T, out=out)
    if bf16:
        _core.round_bfloat16(out)
    return out


class _Workspace(threading.local):
    """Scratch arrays of :func:`newton_schulz`, kept between calls, one set per thread (two
    threads may orthogonalise at once): flat buffers grown to the largest iteration seen, lent
    out as C-contiguous views.  Fresh arrays at every call cost more than their products at 16
    threads: the first write to each new page faults (about 2,500 page faults per 1024 x 1024
    iteration), inside the BLAS calls."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, np.dtype[Any]], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type[np.floating[Any]]) -> np.ndarray:
        size = math.prod(shape)
        key = (name, np.dtype(dtype))
        buf = self.buffers.get(key)
        if buf is None or buf.size < size:
            buf = self.buffers[key] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the calling thread's Newton-Schulz scratch arrays (:class:`fastoptim.Muon` keeps
    ``2 m^2 + m n`` values of its largest ``m x n`` matrix, m <= n, per thread that stepped it,
    and ``m n`` more for a tall parameter's transposed update; the next step allocates them
    again)."""
    _WORKSPACE.buffers.clear()


def newton_schulz(
    g: np.ndarray,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: str = "bfloat16",
) -> np.ndarray:
    r"""The approximate orthogonalisation :math:`\mathrm{NS}^{(a,b,c)}_k(G)` of the 2-D array
    `g` (a new array; `g` is not modified), as ``torch.optim.Muon`` computes it:
    :math:`X_0 = G / \max(\|G\|_F, \epsilon)`, transposed when :math:`G` has more rows than
    columns, then `steps` times :math:`A = X X^T`, :math:`B = b A + c A^2`,
    :math:`X \leftarrow a X + B X`, transposed back.

    ``dtype="bfloat16"`` (torch's): :math:`G`, :math:`\|G\|_F`, :math:`X_0` and the result of
    each product (:math:`A`, :math:`B`, :math:`X`) are rounded to bfloat16 (to nearest), the
    products accumulate in float32 (NumPy's float32 ``@``: exact products of bfloat16 inputs,
    float32 sums, as torch's bfloat16 matmul), and the result holds bfloat16 values in a float32
    array.  ``"float32"`` / ``"float64"``: the same iteration without any rounding to
    bfloat16, in that dtype.
    """
    from fastoptim import _core

    work = np.float64 if dtype == "float64" else np.float32
    low = dtype == "bfloat16"
    tall = g.shape[0] > g.shape[1]
    m, n = g.shape[::-1] if tall else g.shape
    # X alternates between the returned array and a scratch one (_Workspace), and starts in
    # the one that holds it after the last step; A and B are scratch too.
    result = np.empty((m, n), work)
    scratch = _WORKSPACE.get("x", (m, n), work)
    x, nxt = (scratch, result) if max(steps, 0) % 2 else (result, scratch)
    # (a float64 gradient reaches bfloat16 through float32, as torch's .bfloat16())
    if tall and g.dtype == work and g.flags.c_contiguous:
        _core.transpose(x, g)  # (NumPy's transposing copy runs on one thread)
    else:
        np.copyto(x, g.T if tall else g, casting="unsafe")
    if low:
        round_bfloat16_(x)
    # OpenBLAS on fastoptim's pool from the norm (a threaded dot) to the last product
    with _blas().on_pool():
        norm = work(math.sqrt(float(np.dot(x.ravel(), x.ravel()))))
        floor = work(eps)
        if low:
            norm = round_bfloat16_(np.array([norm], np.float32))[0]
            floor = round_bfloat16_(np.array([eps], np.float32))[0]
        norm = max(norm, floor)  # (a NaN norm stays NaN, as torch's clamp)
        _core.divide(x, float(norm), low)  # (np.divide's bits, on all threads)
        a, b, c = (work(v) for v in coefficients)
        gram = _WORKSPACE.get("gram", (m, m), work)
        poly = _WORKSPACE.get("poly", (m, m), work)

        # Between the BLAS products, one multithreaded pass each (_core.combine: each product
        # rounded to the working dtype, then the sum, then bfloat16 when `low`).
        for _ in range(steps):
            gram_(x, gram, low)  # A = X X^T
            np.matmul(gram, gram, out=poly)  # B = b A + c A A
            _core.combine(poly, poly, gram, float(c), float(b), low)
            np.matmul(poly, x, out=nxt)  # X = a X + B X
            _core.combine(nxt, nxt, x, 1.0, float(a), low)
            x, nxt = nxt, x
    assert x is result
    return result.T if tall else result


def muon_lr_ratio(adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """torch.optim.Muon's learning-rate factor for a parameter of `shape` (A, B):
    ``sqrt(max(1, A / B))`` ("original", the default), ``0.2 * sqrt(max(A, B))``
    ("match_rms_adamw")."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def _lerp_(a: np.ndarray, b: np.ndarray, weight: float, out: np.ndarray | None = None) -> None:
    """``out = lerp(a, b, weight)`` (default: into `a`) as torch evaluates it, from the nearer
    end, with the weight in the arrays' dtype."""
    w = a.dtype.type(weight)
    target = a if out is None else out
    if w < 0.5:
        d = b - a
        d *= w
        np.add(a, d, out=target)
    else:
        d = b - a
        d *= a.dtype.type(1) - w
        np.subtract(b, d, out=target)


def _threaded(*arrays: np.ndarray) -> bool:
    """Whether `arrays` suit fastoptim's multithreaded element-wise passes (``_core.lerp`` /
    ``_core.combine``): ndarrays of one dtype, float32 or float64, C-contiguous and aligned, of
    one size, the first writeable, and each other one either the first itself (same memory) or
    apart from it (NumPy's route computes its temporaries first: a partial overlap would read
    elements already written)."""
    out = arrays[0]
    if not (
        type(out) is np.ndarray
        and out.dtype in (np.float32, np.float64)
        and out.flags.writeable
        and out.flags.c_contiguous
        and out.flags.aligned
    ):
        return False
    for x in arrays[1:]:
        if not (
            type(x) is np.ndarray
            and x.dtype == out.dtype
            and x.size == out.size
            and x.flags.c_contiguous
            and x.flags.aligned
        ):
            return False
        if x.ctypes.data != out.ctypes.data and np.may_share_memory(x, out):
            return False
    return True


def _lerp_threaded_(
    a: np.ndarray, b: np.ndarray, weight: float, out: np.ndarray | None = None
) -> None:
    """:func:`_lerp_` (the same bits: torch's formula from the nearer end, each operation
    rounded to the arrays' dtype) on all threads through ``_core.lerp`` where the arrays allow
    it (:func:`_threaded`), else NumPy's passes."""
    from fastoptim import _core

    target = a if out is None else out
    if _threaded(target, a, b):
        _core.lerp(target, a, b, weight)
    else:
        _lerp_(a, b, weight, out)


@_silent
def muon_update(
    group: Mapping[str, Any],
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    states: Mapping[str, Sequence[np.ndarray]],
    step: int,
) -> None:
    """One Muon update of `params` in place (see :class:`fastoptim.Muon`), tensor by tensor:
    the momentum buffer ``buf = lerp(buf, g, 1 - momentum)`` and the Nesterov blend
    ``lerp(g, buf, momentum)`` (torch's lerp from the nearer end), the orthogonalisation `O`
    through BLAS, then ``p = p * (1 - lr * wd) + (-lr * ratio) * O`` (each product rounded to
    the parameter's dtype, then the sum).  The element-wise passes run on all threads
    (``_core.lerp``, ``_core.combine``, ``_core.transpose`` for a tall parameter's `O`) with
    NumPy's bits; NumPy computes them for arrays those passes do not take (not C-contiguous,
    dtypes other than float32/float64)."""
    from fastoptim import _core

    lr, wd, mu = float(group["lr"]), float(group["weight_decay"]), float(group["momentum"])
    coefficients, steps, eps = group["ns_coefficients"], int(group["ns_steps"]), group["eps"]
    ns_dtype = group.get("ns_dtype", "bfloat16")
    for p, g, buf in zip(params, grads, states["momentum_buffer"]):
        if p.size == 0:  # (nothing to update; an (A, 0) one's lr ratio would divide by 0)
            continue
        g = np.asarray(g, dtype=p.dtype)  # (a bfloat16 gradient of a float32 parameter)
        _lerp_threaded_(buf, g, 1 - mu)
        if group["nesterov"]:
            direction = np.empty_like(buf)
            _lerp_threaded_(g, buf, mu, out=direction)
        else:
            direction = buf
        o = newton_schulz(direction, coefficients, steps, float(eps), ns_dtype)
        scale = -lr * muon_lr_ratio(group["adjust_lr_fn"], p.shape)
        decay = 1 - lr * wd
        tall_view = not o.flags.c_contiguous and o.T.flags.c_contiguous
        if o.dtype == p.dtype and tall_view and _threaded(p):
            # a tall parameter's O: the transposed view of a C-contiguous result
            update = _WORKSPACE.get("update", p.shape, p.dtype.type)
            _core.transpose(update, o.T)
            o = update
        else:  # (converted to p's dtype, C order: one NumPy pass)
            o = np.asarray(o, dtype=p.dtype, order="C")
        if _threaded(p, o):
            _core.combine(p, p, o, decay, scale)  # (the products rounded to p's dtype)
        else:
            p *= p.dtype.type(decay)
            o *= p.dtype.type(scale)
            p += o


def check_muon_param(owner: str, label: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ValueError(
            f"{owner}: Muon only updates 2-D parameters (matrices), {label} has shape "
            f"{tuple(shape)}; optimize the others (biases, norms, embeddings) with e.g. AdamW"
        )


# ----------------------------------------------------------------------------- Adafactor
#: Elements per block of the reductions (a few hundred KiB of float64 squares: in cache).
_BLOCK = 1 << 15


def _ravel(x: np.ndarray) -> np.ndarray:
    """`x`'s elements as a 1-D array in memory order (a view when `x` is dense)."""
    return np.ravel(x, order="K")


def sum_squares(x: np.ndarray) -> float:
    """The sum of the squares of `x`'s elements, accumulated in float64 block by block in a
    fixed order (NumPy's pairwise sums within blocks of ``_BLOCK`` elements, the blocks added
    in turn): deterministic, independent of threads, about float64-exact for float32 data."""
    flat = _ravel(x)
    total = 0.0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK].astype(np.float64)
        block *= block
        total += float(block.sum())
    return total


def _norm(x: np.ndarray) -> float:
    """``x.norm(2).item()`` as torch gives it: the 2-norm rounded to `x`'s dtype."""
    return float(x.dtype.type(math.sqrt(sum_squares(x))))


def row_col_means(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The means of ``g * g`` over the last dimension (shape ``(..., R, 1)``) and over the
    second-to-last one (``(..., 1, C)``) of the >= 2-D `g`, in `g`'s dtype, as torch.optim's
    Adafactor computes them: ``norm(g, dim).square_().div_(n)`` (each norm rounded to the
    dtype, then squared and divided in the dtype).  One pass over `g`: per block of rows, the
    squares in float64, their row sums and the running column sums (fixed order; any memory
    layout, read through views)."""
    *lead, rows, cols = g.shape
    rsum = np.empty((*lead, rows), np.float64)
    csum = np.zeros((*lead, cols), np.float64)
    step = max(1, _BLOCK // max(cols, 1))
    for idx in np.ndindex(*lead):
        g2, rs, cs = g[idx], rsum[idx], csum[idx]
        for r in range(0, rows, step):
            sq = g2[r : r + step].astype(np.float64)
            sq *= sq
            rs[r : r + step] = sq.sum(axis=1)
            cs += sq.sum(axis=0)
    dt = g.dtype.type
    row = np.sqrt(rsum).astype(g.dtype)
    row *= row
    row /= dt(cols)
    col = np.sqrt(csum).astype(g.dtype)
    col *= col
    col /= dt(rows)
    return row.reshape(*lead, rows, 1), col.reshape(*lead, 1, cols)


class _Block:
    """A piece of one parameter (a block of rows of one matrix, or of a vector's elements):
    views of the parameter, gradient and state it reads, and how its update U is computed:
    ``row * col / mean`` (factored) or ``variance`` (a copy), then
    ``g / sqrt(max(., eps1^2))``, as torch's operations on the whole tensor."""

    __slots__ = ("col", "g", "mean", "p", "row", "variance")

    def __init__(
        self,
        p: np.ndarray,
        g: np.ndarray,
        row: np.ndarray | None = None,
        col: np.ndarray | None = None,
        mean: np.ndarray | None = None,
        variance: np.ndarray | None = None,
    ) -> None:
        self.p, self.g, self.row, self.col, self.mean = p, g, row, col, mean
        self.variance = variance

    def update(self, out: np.ndarray, eps_sq: Any) -> np.ndarray:
        """U of this block, into `out` (a scratch array of the block's shape)."""
        if self.variance is None:
            assert self.row is not None and self.col is not None
            np.multiply(self.row, self.col, out=out)  # row_var @ col_var: an outer product
            out /= self.mean
        else:
            np.copyto(out, self.variance)
        np.maximum(out, eps_sq, out=out)  # (a NaN stays NaN, as torch's clamp)
        np.sqrt(out, out=out)
        np.divide(out.dtype.type(1), out, out=out)
        out *= self.g
        return out


def _blocks(
    p: np.ndarray,
    g: np.ndarray,
    row: np.ndarray | None,
    col: np.ndarray | None,
    mean: np.ndarray | None,
    variance: np.ndarray | None,
) -> list[_Block]:
    """`p` in blocks of about ``_BLOCK`` elements: rows of each matrix of a >= 2-D parameter
    (its leading dimensions one by one), stretches of a 0-D/1-D one."""
    if variance is not None:
        pf, gf, vf = p.reshape(-1), g.reshape(-1), variance.reshape(-1)  # (views: dense 0/1-D)
        return [
            _Block(pf[i : i + _BLOCK], gf[i : i + _BLOCK], variance=vf[i : i + _BLOCK])
            for i in range(0, pf.size, _BLOCK)
        ]
    assert row is not None and col is not None and mean is not None
    *lead, rows, cols = p.shape
    step = max(1, _BLOCK // max(cols, 1))
    out = []
    for idx in np.ndindex(*lead):
        p2, g2, r2, c2, m2 = p[idx], g[idx], row[idx], col[idx], mean[idx]
        for r in range(0, rows, step):
            out.append(_Block(p2[r : r + step], g2[r : r + step], r2[r : r + step], c2, m2))
    return out


#: The key of a group dict given to an update that names the hyper-parameters torch holds as
#: tensors (``{"lr": "float32"}``: fastoptim.torch sets it for a tensor ``lr``), whose arithmetic
#: torch then does in that dtype.
TORCH_TENSORS = "_torch_tensors"


def check_adafactor_eps(owner: str, name: str, value: Any) -> None:
    """``eps``: a pair (eps1, eps2), eps1 None (the dtype's machine epsilon) or a finite number
    >= 0, eps2 a finite number >= 0."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{owner}: {name} must be a pair (eps1 or None, eps2), got {value!r}")
    for i, v in enumerate(value):
        if i == 0 and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{owner}: {name}[{i}] must be a number, got {v!r}")
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{owner}: invalid {name}[{i}]={v!r}: must be finite and >= 0")


def check_beta2_decay(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value <= 0):
        raise ValueError(f"{owner}: invalid {name}={value!r}: must be finite and <= 0")


def check_clip_threshold(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{owner}: invalid {name}={value!r}: must be finite and >= 1")


def row_var_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Adafactor's ``row_var`` for a parameter of `shape`: ``(..., R, 1)`` (>= 2-D only)."""
    return (*shape[:-1], 1) if len(shape) > 1 else None


def col_var_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Adafactor's ``col_var``: ``(..., 1, C)`` (>= 2-D only)."""
    return (*shape[:-2], 1, shape[-1]) if len(shape) > 1 else None


def variance_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Adafactor's ``variance``: the parameter's shape (0-D and 1-D only)."""
    return tuple(shape) if len(shape) <= 1 else None


@_silent
def adafactor_update(
    group: Mapping[str, Any],
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    states: Mapping[str, Sequence[np.ndarray | None]],
    step: int | Sequence[float],
) -> None:
    r"""One Adafactor update of `params` in place (see :class:`fastoptim.Adafactor`), tensor by
    tensor, operation for operation torch.optim.Adafactor's for-loop path: the scalars
    (:math:`\hat\beta_{2t}`, :math:`\rho_t`, :math:`\alpha_t`) in double, every tensor
    operation in the parameter's dtype with torch's roundings (norms rounded to the dtype);
    the reductions (row/column means of :math:`g^2`, the RMS of the parameter and of the
    update) accumulate in float64 in a fixed order.  `step`: the group's update number, or
    one per parameter (fastoptim.torch: torch's per-parameter ``step``).

    No full-size temporary: per tensor, a pass reading the parameter (its RMS), the
    reduction pass over the gradient (row and column means of :math:`g^2`; none for a
    vector), a pass computing the update :math:`U` block by block for its RMS (a vector's
    ``variance`` is updated there), and a pass computing :math:`U` again, block by block (the
    same operations: the same bits), to decay and update the parameter: the parameter read
    twice and written once, the gradient read three times."""
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    beta2_decay, d = float(group["beta2_decay"]), float(group["d"])
    eps1, eps2 = group["eps"]
    eps2 = float(eps2)
    maximize = bool(group["maximize"])
    if eps1 is None and params:  # torch: the first parameter's dtype, for the whole group
        eps1 = float(np.finfo(params[0].dtype).eps)
    eps1 = float(eps1) if eps1 is not None else 0.0
    # torch keeps a tensor lr as a 0-d tensor: rho_t, alpha_t, the decay factor and the step's
    # scale are then computed in its dtype (fastoptim.torch names it; see TORCH_TENSORS)
    tensor = group.get(TORCH_TENSORS, {}).get("lr")
    f = np.float64 if tensor == "float64" else np.float32
    none: list[np.ndarray | None] = [None] * len(params)  # (the functional tier: given ones)
    row_vars, col_vars = states.get("row_var", none), states.get("col_var", none)
    variances = states.get("variance", none)
    for i, (p, g) in enumerate(zip(params, grads)):
        t = float(step) if isinstance(step, (int, float, np.integer)) else float(step[i])
        dt = p.dtype.type
        g = np.asarray(g, dtype=p.dtype)  # (a bfloat16 gradient of a float32 parameter)
        if maximize:
            g = np.negative(g)
        if p.size == 0:
            continue  # (torch divides 0.0 by 0 here: ZeroDivisionError)
        one_minus_beta2 = t**beta2_decay
        rms = max(eps2, _norm(p) / (p.size**0.5))
        if tensor is None:
            rho = min(lr, 1 / (t**0.5))
            alpha: Any = rms * rho
            decay = 1 - lr * wd
        else:  # (as torch's tensor arithmetic with Python numbers: in the tensor's dtype)
            small = f(1 / (t**0.5)) < f(lr)
            alpha = rms / (t**0.5) if small else f(f(rms) * f(lr))
            decay = float(f(1) - f(f(lr) * f(wd)))
        row_var, col_var, variance = row_vars[i], col_vars[i], variances[i]
        mean = None
        if p.ndim > 1:
            assert row_var is not None and col_var is not None
            row_mean, col_mean = row_col_means(g)
            _lerp_(row_var, row_mean, one_minus_beta2)
            _lerp_(col_var, col_mean, one_minus_beta2)
            # row_var.mean(dim=-2): the float32 sum (float64 here, then rounded) / R
            mean = row_var.astype(np.float64).sum(axis=-2, keepdims=True).astype(p.dtype)
            mean /= dt(row_var.shape[-2])
            np.maximum(mean, dt(eps1), out=mean)
            variance = None
        else:
            assert variance is not None
        blocks = _blocks(p, g, row_var, col_var, mean, variance)
        scratch = np.empty(max(b.p.size for b in blocks), p.dtype)
        eps_sq = dt(eps1 * eps1)
        total = 0.0
        for b in blocks:
            if b.variance is not None:  # torch: variance.lerp_(grad * grad, 1 - beta2_t)
                _lerp_(b.variance, b.g * b.g, one_minus_beta2)
            u = b.update(scratch[: b.p.size].reshape(b.p.shape), eps_sq)
            total += sum_squares(u)
        denom = max(1.0, float(dt(math.sqrt(total))) / ((p.size**0.5) * d))
        scale = float(f(-alpha) / f(denom)) if isinstance(alpha, np.floating) else -alpha / denom
        for b in blocks:
            u = b.update(scratch[: b.p.size].reshape(b.p.shape), eps_sq)
            if wd != 0:
                b.p *= dt(decay)
            u *= dt(scale)
            b.p += u


# ----------------------------------------------------------------------------- L-BFGS
def _loss_float(loss: Any) -> float:
    """A closure's loss as a float (an object with ``detach``, a torch tensor that requires
    grad: detached first, as torch's ``float(loss)`` warns)."""
    detach = getattr(loss, "detach", None)
    return float(detach() if callable(detach) else loss)


class Objective:
    """What :func:`lbfgs_step` needs of the parameters of one group, seen as one vector
    (fastoptim keeps parameters in place: the vector is never materialised; gradients are
    *gathered* into a new flat array at each evaluation, updates *scattered* into each
    parameter's slice, as torch does)."""

    def __init__(
        self,
        params: Sequence[np.ndarray],
        evaluate: Callable[[], tuple[Any, Sequence[np.ndarray]]],
        to_float: Callable[[Any], float] = _loss_float,
    ) -> None:
        self.params = list(params)
        # Views of the parameters as given, through which a failed step puts them back even
        # where the closure made one read-only or re-viewed it in place (then refused).
        self._given = [p.view() for p in self.params]
        self._evaluate = evaluate  # the closure: (loss as returned, gradient arrays)
        self._to_float = to_float  # the loss as a float (a torch tensor: detached first)
        self.dtype = np.result_type(*params)  # (mixed float32/float64: float64, as torch)
        self.sizes = [p.size for p in self.params]

    def evaluate(self) -> tuple[Any, float, np.ndarray]:
        """Call the closure: its loss as returned and as a float, and the gathered flat
        gradient (a new array)."""
        loss, grads = self._evaluate()
        if loss is None:  # (float(None)'s bare TypeError otherwise, later)
            raise TypeError(
                "LBFGS.step: the closure returned None; it must return the loss (a number or "
                "a one-element tensor), and set the gradients"
            )
        try:
            value = self._to_float(loss)
        except (TypeError, ValueError) as e:  # (a string, a list, a vector: Python's words)
            raise TypeError(
                "LBFGS.step: the closure must return the loss as a number (or a one-element "
                f"tensor), got {type(loss).__name__} {loss!r:.60} ({e})"
            ) from None
        flat = np.empty(sum(self.sizes), self.dtype)
        o = 0
        for g, n in zip(grads, self.sizes):
            flat[o : o + n] = np.reshape(g, -1)
            o += n
        return loss, value, flat

    def add(self, t: Any, d: np.ndarray) -> None:
        """params += t * d (each parameter its slice), as torch's ``p.add_(d, alpha=t)``."""
        o = 0
        alpha = self.dtype.type(t)
        for p, n in zip(self.params, self.sizes):
            p += alpha * d[o : o + n].reshape(p.shape)
            o += n

    def clone(self) -> list[np.ndarray]:
        return [p.copy() for p in self.params]

    def restore(self, saved: Sequence[np.ndarray]) -> None:
        for p, s in zip(self._given, saved):
            np.copyto(p, s)

    def directional(self, x: Sequence[np.ndarray], t: Any, d: np.ndarray) -> tuple[float, Any]:
        """f and the gradient at x + t d; the parameters are then reset to x."""
        self.add(t, d)
        _, value, flat = self.evaluate()
        self.restore(x)
        return value, flat


def _cubic_interpolate(
    x1: Any, f1: Any, g1: Any, x2: Any, f2: Any, g2: Any, bounds: Any = None
) -> Any:
    """The minimiser of the cubic interpolating (x1, f1, g1), (x2, f2, g2), within `bounds`
    (default: between x1 and x2), or the middle of the bounds if the cubic has none (torch's
    ``_cubic_interpolate``, after minFunc)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    with np.errstate(divide="ignore", invalid="ignore"):  # (inf/NaN as torch's, silently)
        d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
        d2_square = d1**2 - g1 * g2
        if d2_square >= 0:
            d2 = np.sqrt(d2_square)
            if x1 <= x2:
                min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
            else:
                min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
            return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(
    obj: Objective,
    x: list[np.ndarray],
    t: Any,
    d: np.ndarray,
    f: float,
    g: np.ndarray,
    gtd: Any,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> tuple[float, np.ndarray, Any, int]:
    """A step length t satisfying the strong Wolfe conditions along `d` from `x` (bracketing,
    then zooming with safeguarded cubic interpolation: torch's ``_strong_wolfe``, after
    minFunc).  Returns (f, gradient, t) at that point and the evaluations it made."""
    d_norm = np.abs(d).max()
    g = g.copy()
    f_new, g_new = obj.directional(x, t, d)
    ls_func_evals = 1
    gtd_new = g_new.dot(d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    bracket: list[Any] = []
    bracket_f: list[Any] = []
    bracket_g: list[np.ndarray] = []
    bracket_gtd: list[Any] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new.copy()], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new.copy()], [gtd_prev, gtd_new]
            break
        # interpolate
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(
            t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step)
        )
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new.copy(), gtd_new
        f_new, g_new = obj.directional(x, t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
    if ls_iter == max_ls:  # reached the maximum number of iterations
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # zoom: refine the bracket until a point satisfies the conditions
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break  # the bracket is too small
        t = _cubic_interpolate(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        # too close to a boundary: move 0.1 of the bracket away from it if the previous
        # step also made insufficient progress, or t is at a boundary
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = obj.directional(x, t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not satisfied, or not lower than the lowest point
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new.copy(), gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True  # Wolfe conditions satisfied
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # the old high becomes the new low
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            # the new point becomes the new low
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new.copy(), gtd_new
    t = bracket[low_pos]
    return bracket_f[low_pos], bracket_g[low_pos], t, ls_func_evals


@_silent
def lbfgs_step(obj: Objective, state: dict[str, Any], group: Mapping[str, Any]) -> Any:
    """One ``LBFGS.step(closure)``: up to ``max_iter`` L-BFGS iterations (``max_eval``
    evaluations of the closure), updating the parameters in place and `state` (torch's keys:
    ``func_evals``, ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``,
    ``prev_flat_grad``, ``prev_loss``, ``al``; vectors as flat arrays of the parameters' dtype,
    scalars as NumPy scalars of that dtype where torch keeps 0-d tensors).  Operation for
    operation torch.optim.LBFGS.step (itself after minFunc).  Returns the closure's first
    loss, as returned.

    A step that raises (a gradient refused at a later evaluation, the closure's own
    exception, an interrupt) restores the parameters and `state` as they were before it
    (torch's is left part-way: moved parameters, ``n_iter`` advanced without the history
    it counts, every later step failing)."""
    x0 = obj.clone()
    saved = {
        k: list(v) if isinstance(v, list) else v.copy() if isinstance(v, np.ndarray) else v
        for k, v in state.items()
    }  # (in place: the history lists, al, prev_flat_grad; every other entry is replaced)
    try:
        return _lbfgs_iterations(obj, state, group)
    except BaseException:
        state.clear()
        state.update(saved)
        obj.restore(x0)
        raise


def _lbfgs_iterations(obj: Objective, state: dict[str, Any], group: Mapping[str, Any]) -> Any:
    lr = float(group["lr"])
    max_iter, max_eval = int(group["max_iter"]), group["max_eval"]
    max_eval = max_iter * 5 // 4 if max_eval is None else int(max_eval)
    tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
    line_search_fn, history_size = group["line_search_fn"], int(group["history_size"])

    state.setdefault("func_evals", 0)
    state.setdefault("n_iter", 0)
    orig_loss, loss, flat_grad = obj.evaluate()
    current_evals = 1
    state["func_evals"] += 1
    if flat_grad.size == 0:  # (no element to move: torch fails on the max of nothing)
        return orig_loss
    opt_cond = np.abs(flat_grad).max() <= tolerance_grad
    if opt_cond:  # already optimal
        return orig_loss

    d, t = state.get("d"), state.get("t")
    old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
    h_diag, prev_flat_grad = state.get("H_diag"), state.get("prev_flat_grad")
    prev_loss = state.get("prev_loss")
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        state["n_iter"] += 1
        # the descent direction
        if state["n_iter"] == 1:
            d = -flat_grad
            old_dirs, old_stps, ro = [], [], []
            h_diag = 1
        else:
            assert d is not None and old_dirs is not None and old_stps is not None
            assert ro is not None and prev_flat_grad is not None
            y = flat_grad - prev_flat_grad
            s = d * flat_grad.dtype.type(t)
            ys = y.dot(s)
            if ys > 1e-10:  # update the memory (limited: drop the oldest pair)
                if len(old_dirs) == history_size:
                    old_dirs.pop(0)
                    old_stps.pop(0)
                    ro.pop(0)
                old_dirs.append(y)
                old_stps.append(s)
                ro.append(1.0 / ys)
                h_diag = ys / y.dot(y)  # scale of the initial inverse Hessian
            num_old = len(old_dirs)
            if "al" not in state:
                state["al"] = [None] * history_size
            al = state["al"]
            # two-loop recursion, with one buffer
            q = -flat_grad
            for i in range(num_old - 1, -1, -1):
                al[i] = old_stps[i].dot(q) * ro[i]
                q -= flat_grad.dtype.type(al[i]) * old_dirs[i]
            d = r = q * flat_grad.dtype.type(h_diag)
            for i in range(num_old):
                be_i = old_dirs[i].dot(r) * ro[i]
                r += flat_grad.dtype.type(al[i] - be_i) * old_stps[i]
        if prev_flat_grad is None:
            prev_flat_grad = flat_grad.copy()
        else:
            np.copyto(prev_flat_grad, flat_grad)
        prev_loss = loss
        # the step length
        if state["n_iter"] == 1:
            t = min(1.0, 1.0 / np.abs(flat_grad).sum()) * lr
        else:
            t = lr
        gtd = flat_grad.dot(d)
        if gtd > -tolerance_change:
            break  # the directional derivative is below tolerance
        ls_func_evals = 0
        if line_search_fn is not None:
            x_init = obj.clone()
            # (a spent budget, max_eval 0: as max_eval 1, one trial; torch fails with an
            # UnboundLocalError there)
            budget = max(0, max_eval - current_evals)
            loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                obj, x_init, t, d, loss, flat_grad, gtd, max_ls=budget
            )
            obj.add(t, d)
            opt_cond = np.abs(flat_grad).max() <= tolerance_grad
        else:
            obj.add(t, d)  # a fixed step
            if n_iter != max_iter:  # re-evaluated except after the last iteration
                _, loss, flat_grad = obj.evaluate()
                opt_cond = np.abs(flat_grad).max() <= tolerance_grad
                ls_func_evals = 1
        current_evals += ls_func_evals
        state["func_evals"] += ls_func_evals
        # the stopping conditions
        if n_iter == max_iter or current_evals >= max_eval or opt_cond:
            break
        if np.abs(d * flat_grad.dtype.type(t)).max() <= tolerance_change:
            break  # lack of progress
        if abs(loss - prev_loss) < tolerance_change:
            break
    state["d"], state["t"] = d, t
    state["old_dirs"], state["old_stps"], state["ro"] = old_dirs, old_stps, ro
    state["H_diag"], state["prev_flat_grad"], state["prev_loss"] = h_diag, prev_flat_grad, prev_loss
    return orig_loss


LINE_SEARCH_FNS = (None, "strong_wolfe")


def lbfgs_defaults(defaults: dict[str, Any]) -> None:
    """``max_eval=None`` means ``max_iter * 5 // 4``, fixed at construction as torch does."""
    it = defaults.get("max_iter")
    if defaults.get("max_eval") is None and isinstance(it, (int, np.integer)) and it is not True:
        defaults["max_eval"] = int(it) * 5 // 4  # (else the check names max_iter)
