r"""Every fastoptim optimizer again, in plain readable NumPy.

What it is for:

* **the test oracle**: ``tests/test_kernels.py`` runs each compiled optimizer against the class
  of the same name here (on float64 copies) and compares parameters and every state array
  elementwise;
* **the baseline** the benchmarks compare against (what a careful NumPy user would write);
* **documentation of the maths**: one short function per optimizer, operation for operation
  the single-tensor ("for-loop") implementation of ``torch.optim`` (``_single_tensor_adam``
  and friends), with plain ``a * b + c`` where the kernels may use fused multiply-adds.

The classes have exactly the signatures, defaults, validation, parameter groups, state names
(``opt.state[k]["exp_avg"]``...), gradient buffers and checkpoint layout of
:mod:`fastoptim.optimizers`: each one subclasses the compiled optimizer and replaces only the
arithmetic of a step (the ``_run`` hook).  Gradients are still validated (dtype, shape, layout,
aliasing) before anything is touched, exactly as in the compiled classes.  Nothing here calls
the compiled kernels.

All updates happen in place, in the arrays' own dtype.  Per-step scalars (learning rates, bias
corrections) are computed in Python floats (double precision), as torch does.  The precision
options are emulated as the kernels are specified: bfloat16/float16 arrays loaded into float32,
the float32 update, every result rounded into its array (to nearest or stochastically, with the
kernels' random bits), master copies and Kahan compensation; quantized state
(``state_dtype="int8"`` / ``"int4"``) dequantized into float32, the float32 update, and
quantized again by :func:`quantize_blockwise` / :func:`quantize_blockwise4` (stochastic codes
with the same random bits).

    >>> import numpy as np
    >>> from fastoptim import reference
    >>> w = np.zeros(3)
    >>> reference.Adam([w], lr=0.1).step([np.ones(3)])
    >>> w
    array([-0.1, -0.1, -0.1])
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import numpy as np

from . import keras as _keras
from . import optimizers as _fast
from .engine import precision as _precision
from .engine.optimizer import _Group

__all__ = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Lion",
    "Rprop",
    "SparseAdam",
    "sparse_adam_update",
    "rows_update",
    "create_dynamic_map",
    "create_map4",
    "quantize_blockwise4",
    "pack4",
    "unpack4",
    "dequantize_blockwise4",
    "dequantize_blockwise",
    "quantize_blockwise",
    "quantize_to_code",
    "quantize_to_code_stochastic",
    "bfloat16_bits",
    "random_bits",
    "random_bits16",
    "random_key",
    "rounding_bits",
    "round_to_bfloat16",
    "round_to_float16",
    "load_float16",
    "stochastic_bits",
    "ASGD",
    "ADOPT",
    "LAMB",
    "LARS",
    "AdamWScheduleFree",
    "SGDScheduleFree",
    "schedule_free_scalars",
    "Muon",
    "LBFGS",
    "newton_schulz",
    "Adafactor",
    "KerasSGD",
    "KerasRMSprop",
    "KerasAdagrad",
    "KerasAdadelta",
    "KerasAdam",
    "KerasAdamW",
    "KerasAdamax",
    "KerasNadam",
    "KerasLion",
]


# ----------------------------------------------------------------------------- helpers
def _effective_grad(
    param: np.ndarray, grad: np.ndarray, weight_decay: float, maximize: bool
) -> np.ndarray:
    """The gradient as torch's optimizers see it: negated when maximizing, plus L2 weight decay.
    Returns a new array: the caller's gradient is never modified."""
    grad = -grad if maximize else grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    return np.asarray(grad)


def _adam_grad(
    param: np.ndarray,
    grad: np.ndarray,
    lr: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> np.ndarray:
    """The gradient of Adam, NAdam and RAdam.  With decoupled weight decay (AdamW) the parameter
    first shrinks, ``p *= 1 - lr * weight_decay``, and the gradient has no L2 term; otherwise
    L2 weight decay as in :func:`_effective_grad`."""
    if decoupled_weight_decay:
        g = _effective_grad(param, grad, 0, maximize)
        if weight_decay != 0:
            param *= 1 - lr * weight_decay
        return g
    return _effective_grad(param, grad, weight_decay, maximize)


def _cautious(update: np.ndarray, agree: np.ndarray) -> np.ndarray:
    """Cautious optimizers (Liang et al. 2024), element-wise: ``update * (agree > 0)``, the
    update where it agrees in sign with the gradient (``agree``: their product, or the
    product of same-signed values), 0 elsewhere.  The paper's rescaling by the tensor's mean
    of the mask is not applied.  A new array."""
    return np.asarray(update * (agree > 0).astype(update.dtype))


def _torch_sign(x: np.ndarray) -> np.ndarray:
    """torch.sign: like np.sign, but 0 for NaN."""
    return np.where(x > 0, 1, np.where(x < 0, -1, 0)).astype(x.dtype)


def _lerp_(a: np.ndarray, b: np.ndarray, weight: float) -> None:
    """a <- a + weight * (b - a)  (torch.Tensor.lerp_)."""
    a += weight * (b - a)


def _ema_sq_(avg: np.ndarray, x: np.ndarray, beta: float) -> None:
    """avg <- beta * avg + (1 - beta) * x * x  (torch: ``avg.mul_(beta)``, then
    ``avg.addcmul_(x, x, value=1 - beta)``)."""
    avg *= beta
    avg += (1 - beta) * x * x


def _adam_moments_(
    exp_avg: np.ndarray, exp_avg_sq: np.ndarray, g: np.ndarray, beta1: float, beta2: float
) -> None:
    """Adam's moment estimates: ``m = lerp(m, g, 1 - beta1)``,
    ``v = beta2 * v + (1 - beta2) * g * g``."""
    _lerp_(exp_avg, g, 1 - beta1)
    _ema_sq_(exp_avg_sq, g, beta2)


# ----------------------------------------------------------------------------- the updates
def sgd_update(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None,
    *,
    first_step: bool,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    cautious: bool = False,
) -> None:
    """SGD: ``b = momentum * b + (1 - dampening) * g`` (``b = g`` on the buffer's first use),
    ``d = g + momentum * b`` (nesterov) or ``b``; ``d *= (d * g > 0)`` when ``cautious`` (with
    momentum); ``p -= lr * d``."""
    g = _effective_grad(param, grad, weight_decay, maximize)
    if momentum != 0:
        assert momentum_buffer is not None
        if first_step:
            momentum_buffer[...] = g
        else:
            momentum_buffer *= momentum
            momentum_buffer += (1 - dampening) * g
        d = g + momentum * momentum_buffer if nesterov else momentum_buffer
        g = _cautious(d, d * g) if cautious else d
    param -= lr * g


def adagrad_update(
    param: np.ndarray,
    grad: np.ndarray,
    state_sum: np.ndarray,
    *,
    step: int,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Adagrad: ``s += g * g``; ``p -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)``."""
    g = _effective_grad(param, grad, weight_decay, maximize)
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum += g * g
    param -= clr * (g / (np.sqrt(state_sum) + eps))


def sparse_adam_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
) -> None:
    """SparseAdam (torch's ``_functional.sparse_adam``) on the elements given: ``m += (1 - beta1)
    * (g - m)``; ``v += (1 - beta2) * (g^2 - v)``; ``p -= lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    * m / (sqrt(v) + eps)``.  (With rows: the gathered rows, see :func:`rows_update`.)"""
    g = -grad if maximize else grad
    exp_avg_update = (g - exp_avg) * (1 - beta1)
    exp_avg += exp_avg_update
    exp_avg_sq_update = (g * g - exp_avg_sq) * (1 - beta2)
    exp_avg_sq += exp_avg_sq_update
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    param += -step_size * (exp_avg / (np.sqrt(exp_avg_sq) + eps))


def rows_update(
    update: Callable[..., None],
    param: np.ndarray,
    indices: np.ndarray,
    rows: np.ndarray,
    *states: np.ndarray | None,
    **hyper: Any,
) -> None:
    """A sparse row update in NumPy: `update` (one of the ``*_update`` functions) on the rows
    ``param[indices]`` and their state rows, gathered by fancy indexing, with the gradient
    `rows` (duplicate indices summed first, as torch coalesces), then scattered back.  The
    other rows are not touched."""
    n, w = param.shape[0], math.prod(param.shape[1:])  # (w: no -1, which 0 rows cannot infer)
    uniq, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
    grad = np.zeros((len(uniq), *param.shape[1:]), dtype=rows.dtype)
    np.add.at(grad, inverse.reshape(-1), rows)
    flat = [None if s is None else s.reshape(n, w) for s in states]
    sub_states = [None if s is None else s[uniq] for s in flat]
    sub = param.reshape(n, w)[uniq]
    update(sub, grad.reshape(len(uniq), w), *sub_states, **hyper)
    param.reshape(n, w)[uniq] = sub
    for s, sub_s in zip(flat, sub_states):
        if s is not None and sub_s is not None:
            s[uniq] = sub_s


def rmsprop_update(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    grad_avg: np.ndarray | None,
    momentum_buffer: np.ndarray | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """RMSprop: ``v = alpha * v + (1 - alpha) * g * g``; centered: ``m = lerp(m, g, 1 - alpha)``
    and ``max(v - m * m, 0)`` replaces ``v``; ``d = g / (sqrt(v) + eps)``; momentum:
    ``b = momentum * b + d``, ``p -= lr * b``; else ``p -= lr * d``."""
    g = _effective_grad(param, grad, weight_decay, maximize)
    _ema_sq_(square_avg, g, alpha)
    if centered:
        assert grad_avg is not None
        _lerp_(grad_avg, g, 1 - alpha)
        # clamped at 0 (NaN propagates), as the kernel: rounded averages can cross
        avg = np.sqrt(np.maximum(square_avg - grad_avg * grad_avg, 0)) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum > 0:
        assert momentum_buffer is not None
        momentum_buffer *= momentum
        momentum_buffer += g / avg
        param -= lr * momentum_buffer
    else:
        param -= lr * (g / avg)


def adadelta_update(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    acc_delta: np.ndarray,
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Adadelta: ``v = rho * v + (1 - rho) * g * g``;
    ``delta = sqrt(u + eps) / sqrt(v + eps) * g``; ``u = rho * u + (1 - rho) * delta * delta``;
    ``p -= lr * delta``."""
    g = _effective_grad(param, grad, weight_decay, maximize)
    _ema_sq_(square_avg, g, rho)
    std = np.sqrt(square_avg + eps)
    delta = np.sqrt(acc_delta + eps) / std * g
    _ema_sq_(acc_delta, delta, rho)
    param -= lr * delta


def adam_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    cautious: bool = False,
) -> None:
    """Adam / AdamW / AMSGrad: ``m = lerp(m, g, 1 - beta1)``,
    ``v = beta2 * v + (1 - beta2) * g * g``, ``v_hat = max(v_hat, v)`` (amsgrad);
    ``u = m / (sqrt(v_hat) / sqrt(1 - beta2^t) + eps)``, ``u *= (m * g > 0)`` when
    ``cautious``; ``p -= lr / (1 - beta1^t) * u``, after ``p *= 1 - lr * weight_decay`` when
    the decay is decoupled."""
    g = _adam_grad(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
    _adam_moments_(exp_avg, exp_avg_sq, g, beta1, beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    v = exp_avg_sq
    if amsgrad:
        assert max_exp_avg_sq is not None
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    denom = np.sqrt(v) / math.sqrt(bias_correction2) + eps
    u = exp_avg / denom
    if cautious:
        u = _cautious(u, exp_avg * g)
    param -= step_size * u


def adamax_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_inf: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Adamax: ``m = lerp(m, g, 1 - beta1)``, ``u = max(beta2 * u, |g| + eps)``;
    ``p -= lr / (1 - beta1^t) * m / u``."""
    g = _effective_grad(param, grad, weight_decay, maximize)
    _lerp_(exp_avg, g, 1 - beta1)
    exp_inf *= beta2
    np.maximum(exp_inf, np.abs(g) + eps, out=exp_inf)
    clr = lr / (1 - beta1**step)
    param -= clr * (exp_avg / exp_inf)


def nadam_momentum(beta1: float, momentum_decay: float, step: int) -> float:
    """NAdam's momentum schedule ``mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))``."""
    return float(beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay)))


def nadam_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    mu_product: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    cautious: bool = False,
) -> None:
    """NAdam.  ``mu_product`` is the product ``mu_1 ... mu_{t-1}`` (1 at the first step); the
    caller advances it by ``mu_t`` afterwards.  ``m``, ``v`` as Adam;
    ``d = sqrt(v / (1 - beta2^t)) + eps``;
    ``p -= lr * (1 - mu_t) / (1 - mu_1...mu_t) * g / d
             + lr * mu_{t+1} / (1 - mu_1...mu_{t+1}) * m / d``
    (``cautious``: that whole update ``u`` only where ``u * g > 0``)."""
    g = _adam_grad(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
    bias_correction2 = 1 - beta2**step
    mu = nadam_momentum(beta1, momentum_decay, step)
    mu_next = nadam_momentum(beta1, momentum_decay, step + 1)
    mu_product = mu_product * mu
    mu_product_next = mu_product * mu_next
    _adam_moments_(exp_avg, exp_avg_sq, g, beta1, beta2)
    denom = np.sqrt(exp_avg_sq / bias_correction2) + eps
    grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
    avg_coef = (-lr * mu_next) / (1.0 - mu_product_next)
    if cautious:  # u: the (negated) step; the step -u must agree with g
        u = grad_coef * (g / denom) + avg_coef * (exp_avg / denom)
        param += _cautious(u, -u * g)
        return
    param += grad_coef * (g / denom)
    param += avg_coef * (exp_avg / denom)


def radam_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    cautious: bool = False,
) -> None:
    """RAdam (``cautious``: the step below only where ``m * g > 0``): ``m``, ``v`` as Adam;
    ``m_hat = m / (1 - beta1^t)``;
    ``rho_inf = 2 / (1 - beta2) - 1``, ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)``;
    when ``rho_t > 5``: ``p -= m_hat * lr * sqrt(1 - beta2^t) / (sqrt(v) + eps) * r_t`` with
    the rectification ``r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))``,
    otherwise (the first few steps) ``p -= m_hat * lr``."""
    g = _adam_grad(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
    _adam_moments_(exp_avg, exp_avg_sq, g, beta1, beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    bias_corrected_exp_avg = exp_avg / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
    if rho_t > 5.0:
        rect = math.sqrt(
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        )
        adaptive_lr = math.sqrt(bias_correction2) / (np.sqrt(exp_avg_sq) + eps)
        update = bias_corrected_exp_avg * lr * adaptive_lr * rect
    else:
        update = bias_corrected_exp_avg * lr
    param -= _cautious(update, exp_avg * g) if cautious else update


def lion_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    cautious: bool = False,
) -> None:
    """Lion: ``p = p * (1 - lr * weight_decay) - lr * sign(beta1 * m + (1 - beta1) * g)``
    (``sign(0) = 0``; the sign step masked by ``(sign * g > 0)`` when ``cautious``), then
    ``m = beta2 * m + (1 - beta2) * g``."""
    g = _effective_grad(param, grad, 0, maximize)
    update = np.sign(beta1 * exp_avg + (1 - beta1) * g)
    if cautious:
        update = _cautious(update, update * g)
    param *= 1 - lr * weight_decay
    param -= lr * update
    exp_avg *= beta2
    exp_avg += (1 - beta2) * g


def rprop_update(
    param: np.ndarray,
    grad: np.ndarray,
    prev: np.ndarray,
    step_size: np.ndarray,
    *,
    etaminus: float,
    etaplus: float,
    step_size_min: float,
    step_size_max: float,
    maximize: bool,
) -> None:
    """Rprop: ``f = sign(g * prev)`` (torch's sign: 0 for NaN) with positives -> ``etaplus``,
    negatives -> ``etaminus``, zeros -> 1; ``step_size = clip(step_size * f, min, max)``;
    ``g = 0`` where ``f == etaminus``; ``p -= sign(g) * step_size``; ``prev = g``."""
    g = -grad if maximize else grad
    t = param.dtype.type
    factor = _torch_sign(g * prev)  # then, in torch's order: > 0, < 0, == 0
    factor = np.where(factor > 0, t(etaplus), factor)
    factor = np.where(factor < 0, t(etaminus), factor)
    factor = np.where(factor == 0, t(1), factor)
    step_size *= factor
    np.minimum(np.maximum(step_size, step_size_min), step_size_max, out=step_size)
    g = np.where(factor == t(etaminus), t(0), g)  # a new array: the caller's grad is intact
    param -= _torch_sign(g) * step_size
    prev[...] = g


def adopt_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    clip: bool,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    cautious: bool = False,
) -> None:
    """ADOPT (Taniguchi et al. 2024), as the authors' implementation.  Step 1:
    ``v += g * g`` and nothing else.  Then: ``n = g / max(sqrt(v), eps)`` (the previous
    ``v``), clipped to ``[-c, c]`` with ``c = (step - 1) ** 0.25`` when ``clip``;
    ``m = lerp(m, n, 1 - beta1)``; ``p -= lr * m``, after ``p *= 1 - lr * weight_decay``
    when the decay is decoupled (``p -= lr * m * (m * g > 0)`` when ``cautious``); then
    ``v = beta2 * v + (1 - beta2) * g * g``.  L2 weight decay (not decoupled) is in ``g``
    from the first step on."""
    g = _effective_grad(param, grad, 0 if decoupled_weight_decay else weight_decay, maximize)
    if step == 1:
        exp_avg_sq += g * g
        return
    if decoupled_weight_decay and weight_decay != 0:
        param *= 1 - lr * weight_decay
    root = np.sqrt(exp_avg_sq)
    normed = g / np.where(root < eps, eps, root)  # torch.clamp(min=eps): NaN stays NaN
    if clip:
        c = (step - 1) ** 0.25
        normed = np.where(normed < -c, -c, np.where(normed > c, c, normed))
    _lerp_(exp_avg, normed, 1 - beta1)
    param -= lr * (_cautious(exp_avg, exp_avg * g) if cautious else exp_avg)
    _ema_sq_(exp_avg_sq, g, beta2)


def _norm(x: np.ndarray) -> float:
    """The 2-norm of all elements of `x`, in float64."""
    return math.sqrt(float(np.sum(np.square(x, dtype=np.float64))))


def lamb_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    max_weight_norm: float,
    max_trust_ratio: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """LAMB (You et al. 2020, algorithm 2) on one tensor: Adam's moments;
    ``u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * p`` (``bc = 1 - beta^step``, or 1 without
    ``bias_correction``; no ``wd * p`` when the decay is decoupled, ``p *= 1 - lr * wd`` first
    instead); trust ratio ``r = min(||p||, max_weight_norm) / ||u||`` (1 if either norm is 0),
    at most ``max_trust_ratio`` (``inf``: no clamp); ``p -= lr * r * u``."""
    g = _effective_grad(param, grad, 0, maximize)
    _lerp_(exp_avg, g, 1 - beta1)
    _ema_sq_(exp_avg_sq, g, beta2)
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    u = (exp_avg / bc1) / (np.sqrt(exp_avg_sq) / math.sqrt(bc2) + eps)
    if decoupled_weight_decay:
        if weight_decay != 0:
            param *= 1 - lr * weight_decay
    elif weight_decay != 0:
        u = u + weight_decay * param
    w = min(_norm(param), max_weight_norm)
    n = _norm(u)
    r = 1.0 if w == 0 or n == 0 else w / n
    param -= (lr * min(r, max_trust_ratio)) * u


def lars_update(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    trust_coefficient: float,
    nesterov: bool,
    exclude_1d: bool,
    maximize: bool,
) -> None:
    """LARS (You et al. 2017), as ``pytorch_optimizer.LARS``, on one tensor: unless excluded
    (``exclude_1d`` and ``param.ndim <= 1``), ``g = (g + wd * p) * r`` with the trust ratio
    ``r = trust_coefficient * ||p|| / (||g|| + wd * ||p||)`` (1 if ``||p|| == 0`` or the
    denominator is 0); then ``b = momentum * b + (1 - dampening) * g``,
    ``d = g + momentum * b`` (nesterov) or ``b``, ``p -= lr * d`` (``d = g`` without
    momentum)."""
    g = _effective_grad(param, grad, 0, maximize)
    if not (exclude_1d and param.ndim <= 1):
        pn, gn = _norm(param), _norm(g)
        den = gn + weight_decay * pn
        r = trust_coefficient * pn / den if pn > 0 and den > 0 else 1.0
        if weight_decay != 0:
            g = g + weight_decay * param
        g = g * r
    if momentum > 0:
        assert momentum_buffer is not None
        momentum_buffer *= momentum
        momentum_buffer += (1 - dampening) * g
        g = g + momentum * momentum_buffer if nesterov else momentum_buffer.copy()
    param -= lr * g


def schedule_free_scalars(
    *,
    step: int,
    lr: float,
    warmup_steps: float,
    r: float,
    weight_lr_power: float,
    weight_sum: float,
    lr_max: float,
) -> tuple[float, float, float, float]:
    """Schedule-Free's per-step scalars (Defazio et al. 2024; the ``schedulefree`` package's
    warmup and weighting): ``lr_t = lr * min(1, t / warmup_steps)``; the averaging weight
    ``c = w_t / (w_1 + ... + w_t)`` with ``w_t = t^r * max(lr_1..lr_t)^weight_lr_power`` (0
    when that sum is 0).  Returns ``(lr_t, c, weight_sum + w_t, max(lr_max, lr_t))``."""
    k = step - 1
    lr_t = lr * ((k + 1) / warmup_steps if k < warmup_steps else 1.0)
    lr_max = max(lr_t, lr_max)
    weight = (k + 1) ** r * lr_max**weight_lr_power
    weight_sum = weight_sum + weight
    return lr_t, (weight / weight_sum if weight_sum != 0 else 0.0), weight_sum, lr_max


def _schedule_free_(
    param: np.ndarray, z: np.ndarray, u: np.ndarray, lr: float, c: float, beta1: float
) -> None:
    """The paper's averaging with the parameter holding y: ``x = (y - (1 - beta1) z) / beta1``
    (the average, not stored); ``z -= lr * u``; ``x = (1 - c) x + c z``;
    ``y = beta1 x + (1 - beta1) z``."""
    x = (param - (1 - beta1) * z) / beta1
    z -= lr * u
    x = (1 - c) * x + c * z
    param[...] = beta1 * x + (1 - beta1) * z


def adamw_schedule_free_update(
    param: np.ndarray,
    grad: np.ndarray,
    z: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float,
    c: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Schedule-Free AdamW (Defazio et al. 2024, Algorithm 1 with the bias correction on
    ``v``, as ``schedulefree.AdamWScheduleFree``) at the warmed-up ``lr`` and averaging weight
    ``c`` of :func:`schedule_free_scalars`: ``v = beta2 v + (1 - beta2) g^2``;
    ``u = g / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * y``; then the averaging of
    :func:`_schedule_free_`."""
    g = _effective_grad(param, grad, 0, maximize)
    _ema_sq_(exp_avg_sq, g, beta2)
    u = g / (np.sqrt(exp_avg_sq / (1 - beta2**step)) + eps) + weight_decay * param
    _schedule_free_(param, z, u, lr, c, beta1)


def sgd_schedule_free_update(
    param: np.ndarray,
    grad: np.ndarray,
    z: np.ndarray,
    *,
    lr: float,
    c: float,
    beta1: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Schedule-Free SGD (Defazio et al. 2024; ``beta1`` is ``momentum``):
    ``u = g + weight_decay * y``, then the averaging of :func:`_schedule_free_`."""
    u = _effective_grad(param, grad, weight_decay, maximize)
    _schedule_free_(param, z, u, lr, c, beta1)


def schedule_free_swap(param: np.ndarray, z: np.ndarray, *, weight: float) -> None:
    """Schedule-Free's train() / eval(): ``p = lerp(p, z, weight)`` as torch.lerp computes it
    (``p + weight * (z - p)`` when ``|weight| < 0.5``, else ``z - (z - p) * (1 - weight)``)."""
    d = z - param
    param[...] = param + weight * d if abs(weight) < 0.5 else z - d * (1 - weight)


# ----------------------------------------------------------------------------- storage formats
# bfloat16/float16 storage as the compiled driver does it (cpp/include/fastoptim/convert.hpp):
# loads are exact (a float16 NaN loads quieted); every float32 result is rounded to nearest-even
# or stochastically with counter-based random bits.  Written on the bit patterns with NumPy
# integer arithmetic.
_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def random_key(seed: int, step: int, tensor: int, array: int, index_high: int = 0) -> int:
    """The 32-bit key of one stream of stochastic-rounding bits: (seed, step, tensor number in
    the optimizer, array: 0 for the parameter, 1 + j for the j-th state of the kernel, and the
    element index divided by 2**32)."""
    k = _splitmix64(seed & _M64)
    k = _splitmix64(k ^ (step & _M64))
    k = _splitmix64(k ^ (tensor & _M64))
    k = _splitmix64(k ^ ((array << 32 | (index_high & 0xFFFFFFFF)) & _M64))
    return k >> 32


def random_bits(key: int, index: np.ndarray) -> np.ndarray:
    """32 random bits (uint32) for each element index (its low 32 bits) under `key`."""
    with np.errstate(over="ignore"):
        x = (np.asarray(index).astype(np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        x = (x * np.uint32(0x9E3779B1)) ^ np.uint32(key)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def random_bits16(key: int, index: np.ndarray) -> np.ndarray:
    """16 random bits (uint32 below 2**16) for each element index of a bfloat16 array under
    `key`: one hash serves two elements 16 apart.  Element e takes ``random_bits(key, (e >> 5
    << 4) | (e & 15))``, its low half when ``e & 16`` is 0, else its high half (the 32 elements
    from a multiple of 32 take both halves of 16 consecutive hashes)."""
    e = (np.asarray(index).astype(np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    x = random_bits(key, ((e >> np.uint32(5)) << np.uint32(4)) | (e & np.uint32(15)))
    high = (e & np.uint32(16)) != 0
    return np.where(high, x >> np.uint32(16), x & np.uint32(0xFFFF)).astype(np.uint32)


def _stream(
    draw: Callable[[int, np.ndarray], np.ndarray],
    seed: int,
    step: int,
    tensor: int,
    array: int,
    size: int,
) -> np.ndarray:
    index = np.arange(size, dtype=np.uint64)
    out = np.empty(size, np.uint32)
    for high in range(0, max(size - 1, 0) // 2**32 + 1):
        sel = slice(high * 2**32, (high + 1) * 2**32)
        out[sel] = draw(random_key(seed, step, tensor, array, high), index[sel])
    return out


def stochastic_bits(seed: int, step: int, tensor: int, array: int, size: int) -> np.ndarray:
    """The 32 random bits (:func:`random_bits`) of elements 0 .. size - 1 of one stored array
    at one step: float16 stores and stochastically rounded quantization codes."""
    return _stream(random_bits, seed, step, tensor, array, size)


def bfloat16_bits(seed: int, step: int, tensor: int, array: int, size: int) -> np.ndarray:
    """The 16 random bits (:func:`random_bits16`, two elements per hash) of elements
    0 .. size - 1 of one stored bfloat16 array at one step."""
    return _stream(random_bits16, seed, step, tensor, array, size)


def rounding_bits(
    dtype: Any, seed: int, step: int, tensor: int, array: int, size: int
) -> np.ndarray:
    """The random bits stochastic rounding into `dtype` draws for elements 0 .. size - 1 of one
    stored array at one step: :func:`bfloat16_bits` for bfloat16, else
    :func:`stochastic_bits`."""
    if np.dtype(dtype).name == "bfloat16":
        return bfloat16_bits(seed, step, tensor, array, size)
    return stochastic_bits(seed, step, tensor, array, size)


def _bits32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def round_to_bfloat16(x: np.ndarray, bits: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bfloat16 (``ml_dtypes.bfloat16``): to nearest, ties to even (denormals kept;
    NaN stays a quiet NaN with its sign; from the midpoint above the largest bfloat16, Inf) or,
    given random `bits` per element (low 16 used: :func:`bfloat16_bits`), stochastically: up
    in magnitude with probability equal to the dropped fraction; a value that nearest keeps
    finite never becomes Inf (the largest bfloat16 instead)."""
    import ml_dtypes

    b = _bits32(x)
    a = b & np.uint32(0x7FFFFFFF)
    nan = a > np.uint32(0x7F800000)
    with np.errstate(over="ignore"):
        nearest = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    out = np.where(nan, (b >> np.uint32(16)) | np.uint32(0x40), nearest)
    if bits is not None:
        sign = (b >> np.uint32(16)) & np.uint32(0x8000)
        r = np.asarray(bits, np.uint32) & np.uint32(0xFFFF)
        m = np.minimum((a + r) >> np.uint32(16), np.uint32(0x7F7F))
        out = np.where(a >= np.uint32(0x7F7F8000), out, sign | m)
    rounded: np.ndarray = out.astype(np.uint16).view(ml_dtypes.bfloat16).reshape(np.shape(x))
    return rounded


def load_float16(h: np.ndarray) -> np.ndarray:
    """float16 -> float32 as the driver loads it (convert.hpp ``f16_load``): exact, except that a
    signaling NaN is quieted (its sign and payload kept, the quiet bit 0x00400000 set), as F16C's
    ``vcvtph2ps`` and ARM's ``FCVT`` convert it.  (NumPy's cast keeps the signaling bit.)"""
    h = np.ascontiguousarray(h, dtype=np.float16)
    with np.errstate(invalid="ignore"):  # (a signaling NaN raises "invalid" on aarch64)
        out = h.astype(np.float32)
    b = out.view(np.uint32)
    b[np.isnan(out)] |= np.uint32(0x00400000)
    return out


def round_to_float16(x: np.ndarray, bits: np.ndarray | None = None) -> np.ndarray:
    """float32 -> float16: to nearest, ties to even (NumPy's own conversion; a NaN becomes the
    quiet NaN 0x7E00 with its sign) or, given 32 random `bits` per element, stochastically onto
    the float16 grid (2**-24 apart below 2**-14): up in magnitude with probability equal to the
    dropped fraction; below 2**-24, 2**-24 when the top 24 bits, as an integer, are below
    ``|x| * 2**48``: with probability ``|x| / 2**-24`` rounded up to a multiple of ``2**-24``
    (unbiased to within ``2**-48`` in value; a nonzero ``|x|`` under ``2**-48`` becomes
    ``2**-24`` with probability ``2**-24``); a value that nearest keeps finite
    (``|x| < 65520``) never becomes Inf (65504 instead; NaN as to nearest)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        nearest = x.astype(np.float16)
    nan = np.isnan(x)
    if nan.any():
        sign = (x.view(np.uint32)[nan] >> np.uint32(16)) & np.uint32(0x8000)
        nearest.view(np.uint16)[nan] = (sign | np.uint32(0x7E00)).astype(np.uint16)
    if bits is None:
        return nearest
    b = _bits32(x)
    a = b & np.uint32(0x7FFFFFFF)
    e = a >> np.uint32(23)
    r = np.asarray(bits, np.uint32)
    d = np.where(e >= 113, 13, np.where(e >= 103, 126 - e.astype(np.int64), 23)).astype(np.uint32)
    mask = (np.uint32(1) << d) - np.uint32(1)
    y = (a + (r & mask)) & ~mask
    y = np.minimum(y, np.uint32(0x477FE000))  # 65504
    with np.errstate(over="ignore"):
        up = (r >> np.uint32(8)).astype(np.float32) < a.view(np.float32) * np.float32(2.0**48)
    y = np.where(e < 103, np.where(up, np.uint32(0x33800000), np.uint32(0)), y)
    magnitude = y.view(np.float32).astype(np.float16)  # exact: on the grid
    signed = np.where(b >> np.uint32(31) == 1, -magnitude, magnitude)
    return np.where(a >= np.uint32(0x477FF000), nearest, signed).astype(np.float16)


# ----------------------------------------------------------------------------- quantized state
# Block-wise quantization of optimizer state as bitsandbytes stores it (Dettmers et al. 2022) and
# the compiled driver does it (cpp/include/fastoptim/quantize.hpp): one code per element, one
# float32 absmax per block; element = code_map[code] * absmax.


def _linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)``: a float32 step; the first half
    of the values counted up from `start`, the rest down from `end`, each rounded once."""
    s, e = np.float32(start), np.float32(end)
    step = np.float32((e - s) / np.float32(steps - 1))
    i = np.arange(steps)
    up = np.float64(s) + np.float64(step) * i
    down = np.float64(e) - np.float64(step) * (steps - 1 - i)
    out: np.ndarray = np.where(i < steps // 2, up, down).astype(np.float32)
    return out


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
    """bitsandbytes' dynamic (tree) quantization map (``bitsandbytes.functional.
    create_dynamic_map``): for each exponent ``i < max_exponent_bits``, the midpoints of
    ``n_i + 1`` evenly spaced points of [0.1, 1] scaled by ``10**(i - max_exponent_bits + 1)``
    (``n_i = 2**(i + total_bits - 1 - max_exponent_bits)``, twice that when unsigned), with both
    signs when `signed`; then 0 and 1.  Sorted float32 values, ``2**total_bits`` of them
    (bitsandbytes pads shorter maps with zeros to 256 entries; this does not).  Signed 8-bit:
    127 negative values down to -0.993 (there is no -1), 0, 127 positive ones and 1."""
    data: list[np.ndarray] = []
    non_sign = total_bits - 1
    extra = 2 ** (non_sign - max_exponent_bits) - 1

    def add(items: int, i: int) -> None:
        b = _linspace_float32(0.1, 1.0, items)
        means = (b[:-1] + b[1:]) / np.float32(2)
        v = np.float32(10.0 ** (i - (max_exponent_bits - 1))) * means  # a float32 product
        data.append(v)
        if signed:
            data.append(-v)

    for i in range(max_exponent_bits):
        add(2 ** (i + non_sign - max_exponent_bits + (0 if signed else 1)) + 1, i)
    if extra > 0:
        add(extra + 1, max_exponent_bits - 1)
    data.append(np.array([0.0, 1.0], np.float32))
    return np.sort(np.concatenate(data)).astype(np.float32)


def quantize_to_code(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """The index of the nearest value of the sorted map `code` to each float32 `x`: between
    neighbours ``code[c]`` and ``code[c + 1]`` the float32 midpoint ``(code[c] + code[c + 1]) *
    0.5`` decides; a value exactly on it takes the even index (as the binary search of
    bitsandbytes' GPU quantizer).  `x` must not hold NaN."""
    mid = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    x = np.asarray(x, np.float32)
    k = np.searchsorted(mid, x, side="left")  # midpoints below x
    tie = (k < mid.size) & (mid[np.minimum(k, mid.size - 1)] == x) & (k % 2 == 1)
    out: np.ndarray = (k + tie).astype(np.uint8)
    return out


def quantize_to_code_stochastic(x: np.ndarray, code: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Stochastic rounding onto the sorted map `code`: each float32 `x` between neighbouring
    values ``a = code[c] <= x < b = code[c + 1]`` takes index ``c + 1`` with probability
    ``(x - a) / (b - a)`` (the expected value is `x`), decided by its 32 random `bits` (uint32):
    up when ``float32(bits >> 8) * 2**-24 * (b - a) < x - a`` in float32 arithmetic.  A value
    on a map value keeps its index; below the first value or from the last one on, the index of
    that value.  `x` must not hold NaN."""
    x = np.asarray(x, np.float32)
    code = np.asarray(code, np.float32)
    c = quantize_to_code(x, code).astype(np.int64)
    lo = np.where(code[c] <= x, c, c - 1)
    k = np.clip(lo, 0, code.size - 2)
    a = code[k]
    w = code[k + 1] - a
    u = (np.asarray(bits, np.uint32) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    up = u * w < x - a
    out = np.where(lo < 0, 0, np.where(lo >= code.size - 1, code.size - 1, lo + up))
    result: np.ndarray = out.astype(np.uint8)
    return result


def quantize_blockwise(
    x: np.ndarray, code: np.ndarray, blocksize: int = 256, bits: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise quantization of float32 `x` (flattened, blocks of `blocksize` consecutive
    elements, the last one possibly shorter): ``(codes, absmax)``, codes uint8 shaped like `x`,
    absmax float32 with one entry per block.  Per block: ``absmax = max |x|``; each element
    ``x * float32(1 / absmax)`` (``x / absmax`` when ``1 / absmax`` overflows) takes the nearest
    code (:func:`quantize_to_code`), or with `bits` (uint32 random bits, one per element of
    `x`) a stochastically rounded one (:func:`quantize_to_code_stochastic`).  A block of zeros
    stores absmax 0; a block holding NaN or Inf stores absmax NaN: both take the code of 0
    everywhere."""
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    rbits = None if bits is None else np.asarray(bits, np.uint32).reshape(-1)
    codes = np.empty(flat.size, np.uint8)
    nblocks = -(-flat.size // blocksize)
    absmax = np.empty(nblocks, np.float32)
    zero = quantize_to_code(np.zeros(1, np.float32), code)[0]
    for b in range(nblocks):
        v = flat[b * blocksize : (b + 1) * blocksize]
        m = np.max(np.abs(v))
        if not np.isfinite(m):
            absmax[b], codes[b * blocksize : b * blocksize + v.size] = np.nan, zero
            continue
        absmax[b] = m
        with np.errstate(divide="ignore", over="ignore"):
            inv = np.float32(1) / m if m > 0 else np.float32(0)
            scaled = v / m if np.isinf(inv) else v * inv
        sel = slice(b * blocksize, b * blocksize + v.size)
        codes[sel] = (
            quantize_to_code(scaled, code)
            if rbits is None
            else quantize_to_code_stochastic(scaled, code, rbits[sel])
        )
    return codes.reshape(np.shape(x)), absmax


def dequantize_blockwise(
    codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int = 256
) -> np.ndarray:
    """float32 values of block-wise quantized state: ``code[codes] * absmax`` of each block."""
    flat = np.asarray(codes).reshape(-1)
    scale = np.repeat(np.asarray(absmax, np.float32), blocksize)[: flat.size]
    out: np.ndarray = (np.asarray(code, np.float32)[flat] * scale).reshape(np.shape(codes))
    return out


# 4-bit state (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"; torchao's
# 4-bit AdamW): blocks of 128, codes packed two per byte.


def create_map4(signed: bool) -> np.ndarray:
    """torchao's 4-bit maps: signed (first moments) ``create_dynamic_map(True, 3, 4)``, 16
    values from -0.8875 to 1 with 0 among them; unsigned (second moments) the linear map
    ``linspace(0, 1, 17)[1:]`` = k/16 for k = 1..16, without 0 (a second moment never
    dequantizes to 0: Adam would divide by eps alone)."""
    if signed:
        return create_dynamic_map(True, 3, 4)
    out: np.ndarray = _linspace_float32(0.0, 1.0, 17)[1:]
    return out


def pack4(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (uint8 values < 16, flattened) two per byte, torchao's order: element
    ``2i`` in the high nibble, ``2i + 1`` in the low one; an odd count leaves the last byte's
    low nibble 0."""
    c = np.asarray(codes, np.uint8).reshape(-1)
    if c.size % 2:
        c = np.r_[c, np.uint8(0)]
    out: np.ndarray = ((c[0::2] << np.uint8(4)) | c[1::2]).astype(np.uint8)
    return out


def unpack4(packed: np.ndarray, size: int) -> np.ndarray:
    """The first `size` 4-bit codes of `packed` (:func:`pack4`'s inverse)."""
    b = np.asarray(packed, np.uint8).reshape(-1)
    out: np.ndarray = np.stack([b >> np.uint8(4), b & np.uint8(15)], axis=1).reshape(-1)[:size]
    return out


def quantize_blockwise4(
    x: np.ndarray, code: np.ndarray, bits: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """4-bit block-wise quantization of float32 `x` (flattened): :func:`quantize_blockwise`
    with blocks of 128 and a 16-value map `code` (:func:`create_map4`), the codes packed
    (:func:`pack4`).  Returns ``(packed, absmax)``: ``(x.size + 1) // 2`` bytes and one float32
    absmax per block."""
    codes, absmax = quantize_blockwise(x, code, blocksize=128, bits=bits)
    return pack4(codes), absmax


def dequantize_blockwise4(
    packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """float32 values (of `shape`) of a 4-bit block-wise quantized state."""
    size = int(np.prod(shape))
    flat = dequantize_blockwise(unpack4(packed, size), absmax, code, blocksize=128)
    return flat.reshape(shape)


def _load(a: np.ndarray) -> np.ndarray:
    """A float32 copy of `a` (bfloat16/float16/float32) as the driver loads it."""
    if np.asarray(a).dtype == np.float16:
        return load_float16(a).reshape(np.shape(a))
    return np.array(a, dtype=np.float32)


def kept_compensation(param: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """The Kahan compensation a step uses (float32): `comp` where it is at most half the
    spacing next to `param` on the side it points to (what a store rounding `param` can have
    lost): ``2^floor(log2 |param|) * 2^-(m + 1)`` (m = 7 for bfloat16, 10 for float16), halved
    below a power of two, 0 below the smallest float32 normal; else 0: a larger one belongs to
    a value the parameter no longer holds (changed since: zeroed, clamped, loaded)."""
    p, c = _load(param), _load(comp)
    b = p.view(np.uint32)
    above = (b & np.uint32(0x7F800000)).view(np.float32) * np.float32(
        2.0**-8 if param.dtype.name == "bfloat16" else 2.0**-11
    )
    below = ((b & np.uint32(0x007FFFFF)) == 0) & (((b ^ c.view(np.uint32)) >> 31) == 1)
    with np.errstate(invalid="ignore", over="ignore"):
        keep = np.abs(c) <= np.where(below, np.float32(0.5) * above, above)
    return np.where(keep, c, np.float32(0)).astype(np.float32)


def _store(value: np.ndarray, into: np.ndarray, bits: Callable[[Any], np.ndarray] | None) -> None:
    """Round float32 `value` into `into` (bfloat16/float16, or float32: copied); `bits(dtype)`:
    the random bits of a stochastic store into `dtype`."""
    name = into.dtype.name
    r = None if bits is None or name not in ("bfloat16", "float16") else bits(into.dtype)
    if name == "bfloat16":
        into[...] = round_to_bfloat16(value, r)
    elif name == "float16":
        into[...] = round_to_float16(value, r)
    else:
        into[...] = value


def _update_stored(
    update: Callable[..., None],
    param: np.ndarray,
    grad: np.ndarray,
    states: list[np.ndarray | None],
    kernel_index: list[int],
    master: np.ndarray | None,
    comp: np.ndarray | None,
    out: np.ndarray | None,
    key: tuple[str, int, int, int] | None,
    kwargs: dict[str, Any],
) -> None:
    """One update of a parameter whose arrays are not all of the compute dtype: every array
    loaded into float32, the update in float32, every result rounded into its array (random
    bits from `key` = (rounding, seed, step, tensor) when stochastic; stream 0 for the
    parameter, 1 + kernel_index[j] for state j)."""
    p32 = _load(master if master is not None else param)
    old = p32.copy()
    s32 = [None if s is None else _load(s) for s in states]
    update(p32, _load(grad), *s32, **kwargs)

    def bits(array: int) -> Callable[[Any], np.ndarray] | None:
        if key is None or key[0] != "stochastic":
            return None
        _, seed, step, tensor = key
        return lambda dtype: rounding_bits(dtype, seed, step, tensor, array, p32.size).reshape(
            p32.shape
        )

    if comp is not None:  # Kahan: the update plus what rounding lost last time, to nearest
        u = kept_compensation(param, comp) + (p32 - old)
        stored = np.empty_like(param)
        _store(old + u, stored, None)
        _store(u - (_load(stored) - old), comp, None)
        param[...] = stored
    elif master is not None:
        master[...] = p32
        _store(p32, param, bits(0))
    else:
        _store(p32, param, bits(0))
    for s, s_new, j in zip(states, s32, kernel_index):
        if s is not None and s_new is not None:
            _store(s_new, s, bits(1 + j))
    if out is not None:
        _store(p32, out, bits(0))


def asgd_update(
    param: np.ndarray,
    grad: np.ndarray,
    ax: np.ndarray,
    *,
    eta: float,
    mu: float,
    lambd: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """ASGD with the step's learning rate ``eta`` and averaging weight ``mu``:
    ``p *= 1 - lambd * eta``; ``p -= eta * g``; ``ax += mu * (p - ax)`` (``ax = p`` while
    ``mu == 1``).  The caller computes the next ``eta`` and ``mu`` (:func:`asgd_scalars`)."""
    g = _effective_grad(param, grad, weight_decay, maximize)
    param *= 1 - lambd * eta
    param -= eta * g
    if mu != 1:
        ax += (param - ax) * mu
    else:
        ax[...] = param


def asgd_scalars(
    lr: float, lambd: float, alpha: float, t0: float, step: int
) -> tuple[float, float]:
    """ASGD's ``eta`` and ``mu`` for the step after `step`:
    ``lr / (1 + lambd * lr * step)^alpha`` and ``1 / max(1, step - t0)``."""
    return lr / (1 + lambd * lr * step) ** alpha, 1 / max(1, step - t0)


# ----------------------------------------------------------------------------- Keras's rules
# fastoptim.keras: each rule as Keras 3's ``update_step`` writes it (its operation order), with
# the struct's names for the hyper-parameters (lr = learning_rate, beta1 = beta_1, eps =
# epsilon, alpha = RMSprop's rho).  Keras's weight decay is decoupled and comes first.
def _keras_decay_(param: np.ndarray, lr: float, weight_decay: float) -> None:
    """``p = p - p * wd * lr`` (Keras's ``_apply_weight_decay``), when there is a decay."""
    if weight_decay != 0:
        param -= param * weight_decay * lr


def keras_sgd_update(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> None:
    """Keras's SGD: ``m = m * momentum - g * lr``; ``p += m`` (Nesterov:
    ``p += m * momentum - g * lr``); without momentum ``p -= g * lr``."""
    _keras_decay_(param, lr, weight_decay)
    if momentum_buffer is None:
        param -= grad * lr
        return
    momentum_buffer[...] = momentum_buffer * momentum - grad * lr
    if nesterov:
        param += momentum_buffer * momentum - grad * lr
    else:
        param += momentum_buffer


def keras_rmsprop_update(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    grad_avg: np.ndarray | None,
    momentum_buffer: np.ndarray | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """Keras's RMSprop (``alpha`` is Keras's ``rho``): ``v = rho v + (1 - rho) g^2``;
    centered: ``a = rho a + (1 - rho) g``, ``d = max(v - a^2, 0) + eps``, else ``d = v + eps``;
    ``s = lr * g / sqrt(d)``; ``m = momentum * m + s``, ``p -= m`` (or ``p -= s``)."""
    _keras_decay_(param, lr, weight_decay)
    rho = alpha
    square_avg[...] = rho * square_avg + (1 - rho) * np.square(grad)
    if grad_avg is not None:
        grad_avg[...] = rho * grad_avg + (1 - rho) * grad
        denominator = np.maximum(square_avg - np.square(grad_avg), 0) + eps
    else:
        denominator = square_avg + eps
    increment = (lr * grad) / np.sqrt(denominator)
    if momentum_buffer is not None:
        momentum_buffer[...] = momentum * momentum_buffer + increment
        param -= momentum_buffer
    else:
        param -= increment


def keras_adagrad_update(
    param: np.ndarray,
    grad: np.ndarray,
    sum: np.ndarray,
    *,
    lr: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Keras's Adagrad: ``s += g^2``; ``p -= lr * g / sqrt(s + eps)``."""
    _keras_decay_(param, lr, weight_decay)
    sum += np.square(grad)
    param -= (lr * grad) / np.sqrt(sum + eps)


def keras_adadelta_update(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    acc_delta: np.ndarray,
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Keras's Adadelta: ``a = rho a + (1 - rho) g^2``;
    ``delta = -sqrt(u + eps) * g / sqrt(a + eps)``; ``u = rho u + (1 - rho) delta^2``;
    ``p += lr * delta``."""
    _keras_decay_(param, lr, weight_decay)
    square_avg[...] = rho * square_avg + (1 - rho) * np.square(grad)
    delta = -(np.sqrt(acc_delta + eps) * grad) / np.sqrt(square_avg + eps)
    acc_delta[...] = rho * acc_delta + (1 - rho) * np.square(delta)
    param += lr * delta


def keras_adam_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Keras's Adam: ``m += (g - m)(1 - beta_1)``; ``v += (g^2 - v)(1 - beta_2)``
    (AMSGrad: ``v_hat = max(v_hat, v)``); ``p -= m * alpha / (sqrt(v) + eps)`` with
    ``alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)``."""
    _keras_decay_(param, lr, weight_decay)
    alpha = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    exp_avg += (grad - exp_avg) * (1 - beta1)
    exp_avg_sq += (np.square(grad) - exp_avg_sq) * (1 - beta2)
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    param -= (exp_avg * alpha) / (np.sqrt(v) + eps)


def keras_adamax_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_inf: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Keras's Adamax: ``m += (g - m)(1 - beta_1)``; ``u = max(beta_2 u, |g|)``;
    ``p -= lr * m / ((1 - beta_1^t)(u + eps))``."""
    _keras_decay_(param, lr, weight_decay)
    exp_avg += (grad - exp_avg) * (1 - beta1)
    exp_inf[...] = np.maximum(beta2 * exp_inf, np.abs(grad))
    param -= (lr * exp_avg) / ((1 - beta1**step) * (exp_inf + eps))


def keras_nadam_momentum(beta1: float, step: int) -> float:
    """Keras's Nadam schedule ``u_t = beta_1 (1 - 0.5 * 0.96^t)``."""
    return float(beta1 * (1.0 - 0.5 * 0.96**step))


def keras_nadam_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    mu_product: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Keras's Nadam.  ``mu_product`` is Keras's ``u_product`` before this step (1 at the
    first); ``m``, ``v`` as Keras's Adam;
    ``m_hat = u_{t+1} m / (1 - u_1..u_{t+1}) + (1 - u_t) g / (1 - u_1..u_t)``;
    ``p -= m_hat * lr / (sqrt(v / (1 - beta_2^t)) + eps)``."""
    _keras_decay_(param, lr, weight_decay)
    u_t = keras_nadam_momentum(beta1, step)
    u_t_1 = keras_nadam_momentum(beta1, step + 1)
    u_product_t = mu_product * u_t
    u_product_t_1 = u_product_t * u_t_1
    exp_avg += (grad - exp_avg) * (1 - beta1)
    exp_avg_sq += (np.square(grad) - exp_avg_sq) * (1 - beta2)
    m_hat = (u_t_1 * exp_avg) / (1 - u_product_t_1) + ((1 - u_t) * grad) / (1 - u_product_t)
    v_hat = exp_avg_sq / (1 - beta2**step)
    param -= (m_hat * lr) / (np.sqrt(v_hat) + eps)


def keras_lion_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Keras's Lion: ``p -= lr * sign(m beta_1 + g (1 - beta_1))``;
    ``m = m beta_2 + g (1 - beta_2)``."""
    _keras_decay_(param, lr, weight_decay)
    param -= lr * np.sign(exp_avg * beta1 + grad * (1.0 - beta1))
    exp_avg[...] = exp_avg * beta2 + grad * (1.0 - beta2)


# ----------------------------------------------------------------------------- the classes
EMA_STREAM = 4  # the random-bit stream of an EMA's stochastic rounding (after 3 states)


def ema_update(
    ema: np.ndarray, param: np.ndarray, decay: float, key: tuple[str, int, int, int]
) -> None:
    """``ema = lerp(ema, param, 1 - decay)`` in the compute dtype (float64 for float64, else
    float32), rounded into `ema`'s dtype (`key` = (rounding, seed, step, tensor))."""
    compute = np.float64 if param.dtype == np.float64 else np.float32
    e = np.array(ema, dtype=compute)
    _lerp_(e, np.asarray(param, dtype=compute), 1.0 - decay)
    rounding, seed, step, tensor = key

    def bits(dtype: Any) -> np.ndarray:
        return rounding_bits(dtype, seed, step, tensor, EMA_STREAM, e.size).reshape(e.shape)

    _store(e, ema, bits if rounding == "stochastic" else None)


def transform_grads(
    grads: list[list[np.ndarray]], groups: list[dict[str, Any]], grad_scale: float | None
) -> tuple[float | None, bool, list[list[np.ndarray]]]:
    """The gradient transforms of :mod:`fastoptim.engine.transforms`, readably: every
    gradient divided by `grad_scale` (times its reciprocal), clamped to its group's
    ``max_grad_value``; the global L2 norm of those (float64 sums); the step skipped if a group
    has ``skip_nonfinite`` and a gradient is not finite; each group with ``max_grad_norm``
    multiplied by ``min(1, max_grad_norm / (norm + 1e-6))`` (torch's order: unscale, clamp,
    multiply; the kernels fold both into one factor, and so may differ in the last bit).
    Returns (norm or None, skip, the transformed gradients)."""
    inv = 1.0 if grad_scale is None else 1.0 / grad_scale

    def scaled(g: np.ndarray, mul: float, clip: float | None) -> np.ndarray:
        dt: Any = np.float64 if g.dtype == np.float64 else np.float32
        x: np.ndarray = np.asarray(g, dtype=dt) * dt(mul)
        return x if clip is None else np.clip(x, -dt(clip), dt(clip))

    xs = [[scaled(g, inv, gr.get("max_grad_value")) for g in gs] for gs, gr in zip(grads, groups)]
    want_norm = any(gr.get("max_grad_norm") is not None for gr in groups)
    want_check = any(gr.get("skip_nonfinite") for gr in groups)
    norm = None
    if want_norm or want_check:
        sumsq = sum(float(np.sum(np.square(x.astype(np.float64)))) for gx in xs for x in gx)
        norm = math.sqrt(sumsq)
        finite = all(bool(np.isfinite(np.asarray(g, dtype=np.float64)).all())
                     for gs in grads for g in gs)  # fmt: skip
        if want_check and not (finite and math.isfinite(norm)):
            return (norm if want_norm else None), True, grads
    out = []
    for gx, gr in zip(xs, groups):
        limit = gr.get("max_grad_norm")
        if limit is not None:  # as clip_grad_norm_: x * clamp(coef, max=1) in x's dtype
            assert norm is not None
            coef = limit / (norm + 1e-6)
            c = coef if (coef < 1.0 or coef != coef) else 1.0
            gx = [x * x.dtype.type(c) for x in gx]
        out.append(gx)
    return (norm if want_norm else None), False, out


class _Reference:
    """The gradient transforms of a step computed in NumPy (:func:`transform_grads`), for
    the reference optimizers, instead of the compiled statistics pass."""

    param_groups: list[dict[str, Any]]
    _pending: list[list[np.ndarray]]
    _after_step: Callable[[], None]

    def _decide(self, scale: float | None, per_group: list[list[np.ndarray]]) -> Any:
        from .engine.transforms import Decision

        norm, skip, pending = transform_grads(per_group, self.param_groups, scale)
        self._pending = [] if skip else pending  # (a skipped step keeps no gradient alive)
        return Decision(norm, skip, [])

    def _transform(self, decision: Any, i: int, grads: list[np.ndarray]) -> list[np.ndarray]:
        out, self._pending[i] = self._pending[i], []  # (used once: not kept after the step)
        return out

    def _run_rows(self, work: list[tuple[Any, int, np.ndarray, np.ndarray, Any]]) -> None:
        for g, i, index, rows, _ in work:
            self._row_update(g, i, index, rows)
        self._after_step()

    def _row_update(self, g: Any, i: int, index: np.ndarray, rows: np.ndarray) -> None:
        """The row update of parameter `i` of group `g` (the optimizers with row updates)."""
        raise NotImplementedError


def _torch_lerp(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """torch.lerp(a, b, weight) (a new array), evaluated from the nearer end as torch does,
    with the weight in the arrays' dtype."""
    w = a.dtype.type(weight)
    if w < 0.5:
        return np.asarray(a + w * (b - a))
    return np.asarray(b - (b - a) * (1 - w))


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest), as float32."""
    return round_to_bfloat16(np.asarray(x, np.float32)).astype(np.float32)


def newton_schulz(
    g: np.ndarray,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    ns_dtype: str = "bfloat16",
) -> np.ndarray:
    """Muon's Newton-Schulz orthogonalisation, line for line torch's
    ``_zeropower_via_newtonschulz``; ``ns_dtype="bfloat16"`` rounds what torch stores in
    bfloat16 tensors (the input, the norm, every product's result)."""
    work = np.float64 if ns_dtype == "float64" else np.float32

    def rnd(v: np.ndarray) -> np.ndarray:
        return _to_bf16(v) if ns_dtype == "bfloat16" else np.asarray(v, work)

    a, b, c = coefficients
    x = rnd(g.astype(np.float32) if ns_dtype == "bfloat16" else g)
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    norm = rnd(np.sqrt(np.sum(x.astype(np.float64) ** 2)))
    x = rnd(x / np.maximum(norm, rnd(np.asarray(eps))))
    for _ in range(steps):
        gram = rnd(x @ x.T)
        update = rnd(b * gram + c * (gram @ gram))
        x = rnd(a * x + update @ x)
    return x.T if tall else x


def muon_update(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
    ns_dtype: str,
) -> None:
    """torch's ``_single_tensor_muon`` for one 2-D parameter."""
    momentum_buffer[...] = _torch_lerp(momentum_buffer, grad, 1 - momentum)
    update = _torch_lerp(grad, momentum_buffer, momentum) if nesterov else momentum_buffer
    o = newton_schulz(update, ns_coefficients, ns_steps, eps, ns_dtype)
    rows, cols = param.shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    else:  # "match_rms_adamw"
        ratio = 0.2 * math.sqrt(max(rows, cols))
    param *= 1 - lr * weight_decay
    param += (-lr * ratio) * o.astype(param.dtype)


def _rms(x: np.ndarray) -> float:
    """torch's ``x.norm(2).item() / (x.numel() ** 0.5)``: the norm rounded to x's dtype."""
    norm = float(x.dtype.type(np.sqrt(np.sum(x.astype(np.float64) ** 2))))
    return norm / math.sqrt(x.size)


def _mean_sq(g: np.ndarray, axis: int) -> np.ndarray:
    """torch's ``norm(g, dim=axis, keepdim=True).square_().div_(g.size(axis))`` in g's dtype."""
    norm = np.sqrt(np.sum(g.astype(np.float64) ** 2, axis=axis, keepdims=True)).astype(g.dtype)
    return np.asarray(norm * norm / g.dtype.type(g.shape[axis]))


def adafactor_update(
    param: np.ndarray,
    grad: np.ndarray,
    row_var: np.ndarray | None,
    col_var: np.ndarray | None,
    variance: np.ndarray | None,
    *,
    step: int,
    lr: float,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """torch's ``_single_tensor_adafactor`` for one parameter (`eps1` already resolved: the
    machine epsilon of the group's first parameter's dtype when the group's is None)."""
    if param.size == 0:
        return  # (torch divides 0.0 by 0: ZeroDivisionError)
    dt = param.dtype.type
    g = -grad if maximize else grad
    one_minus_beta2_t = step**beta2_decay
    rho_t = min(lr, 1 / (step**0.5))
    alpha = max(eps2, _rms(param)) * rho_t
    if weight_decay != 0:
        param *= dt(1 - lr * weight_decay)
    if param.ndim > 1:
        assert row_var is not None and col_var is not None
        row_var[...] = _torch_lerp(row_var, _mean_sq(g, -1), one_minus_beta2_t)
        col_var[...] = _torch_lerp(col_var, _mean_sq(g, -2), one_minus_beta2_t)
        var_estimate = row_var @ col_var
        var_estimate = var_estimate / np.maximum(row_var.mean(axis=-2, keepdims=True), dt(eps1))
    else:
        assert variance is not None
        variance[...] = _torch_lerp(variance, g * g, one_minus_beta2_t)
        var_estimate = variance.copy()
    update = dt(1) / np.sqrt(np.maximum(var_estimate, dt(eps1 * eps1))) * g
    denom = max(1.0, _rms(update) / d)
    param += dt(-alpha / denom) * update


@functools.cache
def _keywords(update: Callable[..., None]) -> tuple[str, ...]:
    """The keyword-only parameters of an update function."""
    params = inspect.signature(update).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _for_each(
    g: _Group,
    grads: list[np.ndarray],
    update: Callable[..., None],
    state_names: tuple[str, ...],
    **extra: Any,
) -> None:
    """Call ``update(param, grad, *states, **hyper, **extra)`` for every parameter of group
    `g`.  A state the current hyper-parameters do not use is passed as None; every keyword of
    `update` not in `extra` (the per-step values) is the group's hyper-parameter of that name
    (``lr``, ``beta1``...)."""
    hyper = {k: getattr(g.hyper, k) for k in _keywords(update) if k not in extra}
    order = list(g.hyper.state_names())  # the kernel's state order: the random-bit streams
    none: list[np.ndarray | None] = [None] * len(g.params)
    masters = g.states.get("master") or none
    comps = g.states.get("compensation") or none
    emas = g.states.get("ema") or none
    outs = g.outs or [None] * len(g.params)
    key = (g.plan.rounding, g.plan.seed, g.step + 1)
    qmaps = dict(zip(order, _precision.qmaps(g.state_dtype, order)))
    for i, (param, grad) in enumerate(zip(g.params, grads)):
        states = [g.states[n][i] if n in order else None for n in state_names]
        # Quantized states (state_dtype "int8" / "int4"): dequantized into float32, the
        # float32 step, then quantized again as the kernels are specified.
        quantized = []
        for k, n in enumerate(state_names):
            scales = g.states.get(n + _precision.ABSMAX)
            codes = states[k]
            if codes is not None and scales is not None and scales[i] is not None:
                quantized.append((k, n, codes, scales[i]))
                states[k] = _dequantize_state(codes, scales[i], qmaps[n], param.shape)
        arrays = [param, grad, *states, masters[i], comps[i], outs[i]]
        plain = param.dtype in (np.float32, np.float64)
        if plain and all(a is None or a.dtype == param.dtype for a in arrays):
            update(param, grad, *states, **hyper, **extra)  # float32 or float64 throughout
        else:
            _update_stored(
                update,
                param,
                grad,
                states,
                [order.index(n) if n in order else -1 for n in state_names],
                masters[i],
                comps[i],
                outs[i],
                (*key, g.first_id + i),
                {**hyper, **extra},
            )
        for k, n, codes, absmax in quantized:
            values = states[k]
            assert values is not None
            bits = None
            if key[0] == "stochastic":  # (the codes' random bits: the state's stream)
                bits = stochastic_bits(
                    key[1], key[2], g.first_id + i, 1 + order.index(n), param.size
                )
            codes[...], absmax[...] = _quantize_state(values, qmaps[n], bits)
        ema, master = emas[i], masters[i]
        if ema is not None:
            source = param if master is None else master
            ema_update(ema, source, g.plan.ema_decay, (*key, g.first_id + i))


def _map_values(qmap: str) -> np.ndarray:
    """The values of quantization map `qmap` ("signed8", "unsigned8", "signed4", "unsigned4")."""
    signed = qmap.startswith("signed")
    return create_map4(signed) if qmap.endswith("4") else create_dynamic_map(signed)


def _dequantize_state(
    codes: np.ndarray, absmax: np.ndarray, qmap: str, shape: tuple[int, ...]
) -> np.ndarray:
    """The float32 values (of `shape`) of a quantized state stored with map `qmap`."""
    if qmap.endswith("4"):
        return dequantize_blockwise4(codes, absmax, _map_values(qmap), shape)
    return dequantize_blockwise(codes, absmax, _map_values(qmap)).reshape(shape)


def _quantize_state(
    values: np.ndarray, qmap: str, bits: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, absmax)`` of float32 `values` with map `qmap` (stochastic with `bits`)."""
    if qmap.endswith("4"):
        return quantize_blockwise4(values, _map_values(qmap), bits)
    codes, absmax = quantize_blockwise(values, _map_values(qmap), bits=bits)
    return codes.reshape(values.shape), absmax


def _on_rows(
    g: _Group,
    i: int,
    index: np.ndarray,
    rows: np.ndarray,
    update: Callable[..., None],
    state_names: tuple[str, ...],
    **extra: Any,
) -> None:
    """:func:`rows_update` of parameter `i` of group `g` with the group's hyper-parameters."""
    hyper = {k: getattr(g.hyper, k) for k in _keywords(update) if k not in extra}
    order = list(g.hyper.state_names())
    states = [g.states[n][i] if n in order else None for n in state_names]
    rows_update(update, g.params[i], index, rows, *states, **hyper, **extra)


class SGD(_Reference, _fast.SGD):
    __doc__ = _fast.SGD.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(
            g, grads, sgd_update, ("momentum_buffer",), first_step="momentum_buffer" in g.fresh
        )

    def _row_update(self, g: _Group, i: int, index: np.ndarray, rows: np.ndarray) -> None:
        _on_rows(g, i, index, rows, sgd_update, ("momentum_buffer",), first_step=False)


class Adagrad(_Reference, _fast.Adagrad):
    __doc__ = _fast.Adagrad.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, adagrad_update, ("sum",), step=g.step + 1)

    def _row_update(self, g: _Group, i: int, index: np.ndarray, rows: np.ndarray) -> None:
        _on_rows(g, i, index, rows, adagrad_update, ("sum",), step=g.step + 1)


class SparseAdam(_Reference, _fast.SparseAdam):
    __doc__ = _fast.SparseAdam.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, sparse_adam_update, ("exp_avg", "exp_avg_sq"), step=g.step + 1)

    def _row_update(self, g: _Group, i: int, index: np.ndarray, rows: np.ndarray) -> None:
        _on_rows(g, i, index, rows, sparse_adam_update, ("exp_avg", "exp_avg_sq"), step=g.step + 1)


class RMSprop(_Reference, _fast.RMSprop):
    __doc__ = _fast.RMSprop.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, rmsprop_update, ("square_avg", "grad_avg", "momentum_buffer"))


class Adadelta(_Reference, _fast.Adadelta):
    __doc__ = _fast.Adadelta.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, adadelta_update, ("square_avg", "acc_delta"))


class Adam(_Reference, _fast.Adam):
    __doc__ = _fast.Adam.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(
            g, grads, adam_update, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), step=g.step + 1
        )


class AdamW(_fast.AdamW, Adam):
    __doc__ = _fast.AdamW.__doc__


class Adamax(_Reference, _fast.Adamax):
    __doc__ = _fast.Adamax.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, adamax_update, ("exp_avg", "exp_inf"), step=g.step + 1)


class NAdam(_Reference, _fast.NAdam):
    __doc__ = _fast.NAdam.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        h = g.hyper
        step = g.step + 1
        _for_each(g, grads, nadam_update, ("exp_avg", "exp_avg_sq"), step=step)
        # The group's running product mu_1 ... mu_t (the compiled step advances it in C++).
        h.mu_product = h.mu_product * nadam_momentum(h.beta1, h.momentum_decay, step)


class RAdam(_Reference, _fast.RAdam):
    __doc__ = _fast.RAdam.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, radam_update, ("exp_avg", "exp_avg_sq"), step=g.step + 1)


class Lion(_Reference, _fast.Lion):
    __doc__ = _fast.Lion.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, lion_update, ("exp_avg",))


class Rprop(_Reference, _fast.Rprop):
    __doc__ = _fast.Rprop.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, rprop_update, ("prev", "step_size"))


class ASGD(_Reference, _fast.ASGD):
    __doc__ = _fast.ASGD.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        h = g.hyper
        _for_each(g, grads, asgd_update, ("ax",))
        # The group's eta and mu for the next step (the compiled step computes them in C++).
        h.eta, h.mu = asgd_scalars(h.lr, h.lambd, h.alpha, h.t0, g.step + 1)


class ADOPT(_Reference, _fast.ADOPT):
    __doc__ = _fast.ADOPT.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, adopt_update, ("exp_avg", "exp_avg_sq"), step=g.step + 1)


class LAMB(_Reference, _fast.LAMB):
    __doc__ = _fast.LAMB.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, lamb_update, ("exp_avg", "exp_avg_sq"), step=g.step + 1)


class LARS(_Reference, _fast.LARS):
    __doc__ = _fast.LARS.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, lars_update, ("momentum_buffer",))


class _ScheduleFree:
    """The reference's Schedule-Free step and train() / eval() (NumPy arithmetic)."""

    _update: Callable[..., None]
    _states: tuple[str, ...]

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        h = g.hyper
        step = g.step + 1
        lr, c, h.weight_sum, h.lr_max = schedule_free_scalars(
            step=step,
            lr=h.lr,
            warmup_steps=h.warmup_steps,
            r=h.r,
            weight_lr_power=h.weight_lr_power,
            weight_sum=h.weight_sum,
            lr_max=h.lr_max,
        )
        extra = {"lr": lr, "c": c} | ({"step": step} if "step" in _keywords(self._update) else {})
        _for_each(g, grads, type(self)._update, self._states, **extra)

    def _swap(self, g: _Group, plan: Any, weight: float, key: int) -> None:
        """``schedule_free_swap`` of every parameter towards its ``z`` (in float32 and rounded
        like a step for reduced-precision layouts, with the random bits of step `key`)."""
        saved, g.step = g.step, key - 1  # _for_each keys the rounding on g.step + 1
        try:
            _for_each(g, list(g.states["z"]), schedule_free_swap, (), weight=weight)
        finally:
            g.step = saved


class AdamWScheduleFree(_Reference, _ScheduleFree, _fast.AdamWScheduleFree):
    __doc__ = _fast.AdamWScheduleFree.__doc__
    _update = staticmethod(adamw_schedule_free_update)
    _states = ("z", "exp_avg_sq")


class SGDScheduleFree(_Reference, _ScheduleFree, _fast.SGDScheduleFree):
    __doc__ = _fast.SGDScheduleFree.__doc__
    _update = staticmethod(sgd_schedule_free_update)
    _states = ("z",)


class Muon(_fast.Muon):
    __doc__ = _fast.Muon.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, muon_update, ("momentum_buffer",))


class Adafactor(_fast.Adafactor):
    __doc__ = _fast.Adafactor.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        eps1, eps2 = g.hyper.eps
        if eps1 is None:  # torch: the machine epsilon of the group's first parameter's dtype
            eps1 = float(np.finfo(g.params[0].dtype).eps)
        states = ("row_var", "col_var", "variance")
        _for_each(g, grads, adafactor_update, states, step=g.step + 1, eps1=eps1, eps2=eps2)


class LBFGS(_fast.LBFGS):
    """:class:`fastoptim.LBFGS` itself: its search is already plain NumPy
    (:func:`fastoptim.host.lbfgs_step`, operation for operation ``torch.optim.LBFGS``);
    ``torch.optim.LBFGS`` is its oracle."""


# Keras's optimizers (fastoptim.keras), with Keras's rules above.
class KerasSGD(_Reference, _keras.SGD):
    __doc__ = _keras.SGD.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, keras_sgd_update, ("momentum_buffer",))


class KerasRMSprop(_Reference, _keras.RMSprop):
    __doc__ = _keras.RMSprop.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        states = ("square_avg", "grad_avg", "momentum_buffer")
        _for_each(g, grads, keras_rmsprop_update, states)


class KerasAdagrad(_Reference, _keras.Adagrad):
    __doc__ = _keras.Adagrad.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, keras_adagrad_update, ("sum",))


class KerasAdadelta(_Reference, _keras.Adadelta):
    __doc__ = _keras.Adadelta.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, keras_adadelta_update, ("square_avg", "acc_delta"))


class KerasAdam(_Reference, _keras.Adam):
    __doc__ = _keras.Adam.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        states = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        _for_each(g, grads, keras_adam_update, states, step=g.step + 1)


class KerasAdamW(_keras.AdamW, KerasAdam):
    __doc__ = _keras.AdamW.__doc__


class KerasAdamax(_Reference, _keras.Adamax):
    __doc__ = _keras.Adamax.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, keras_adamax_update, ("exp_avg", "exp_inf"), step=g.step + 1)


class KerasNadam(_Reference, _keras.Nadam):
    __doc__ = _keras.Nadam.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        h = g.hyper
        step = g.step + 1
        _for_each(g, grads, keras_nadam_update, ("exp_avg", "exp_avg_sq"), step=step)
        h.mu_product = h.mu_product * keras_nadam_momentum(h.beta1, step)


class KerasLion(_Reference, _keras.Lion):
    __doc__ = _keras.Lion.__doc__

    def _run(self, g: _Group, grads: list[np.ndarray]) -> None:
        _for_each(g, grads, keras_lion_update, ("exp_avg",))
