"""A small multilayer perceptron in plain NumPy: forward pass, softmax cross-entropy loss and the
backward pass, written for the ``fastoptim demo`` command (and as an example of feeding an
optimizer's gradient buffers).

Layers are ``x @ W + b`` with ReLU between them and a softmax on the last one.  The parameters
are a dict ``{"W1": (n_in, h1), "b1": (h1,), "W2": ..., ...}`` of C-contiguous arrays, which is
what every fastoptim optimizer takes; :meth:`MLP.loss_and_grad` writes the gradients into arrays
you give it (``opt.grads``), so a training step allocates no parameter-sized arrays:

    >>> import numpy as np, fastoptim as fo
    >>> from fastoptim.apps.mlp import MLP
    >>> net = MLP([4, 8, 3], rng=np.random.default_rng(0))
    >>> opt = fo.Adam(net.params, lr=1e-2)
    >>> x, y = np.ones((5, 4), np.float32), np.array([0, 1, 2, 0, 1])
    >>> loss = net.loss_and_grad(x, y, out=opt.grads)
    >>> opt.step()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MLP", "softmax_cross_entropy"]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(`logits`) against integer `labels`, and the probabilities
    (computed stably: the row maximum is subtracted first)."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    picked = z[np.arange(n), labels]
    loss = float(-np.log(np.maximum(picked, np.finfo(z.dtype).tiny)).mean())
    return loss, z


class MLP:
    """A ReLU multilayer perceptron with layer sizes `sizes` (``[n_in, hidden..., n_out]``).

    Weights are drawn from He's normal initialisation (``N(0, 2 / fan_in)``) with generator
    `rng`, biases start at zero; `dtype` is float32 or float64.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        rng: np.random.Generator,
        dtype: Any = np.float32,
    ) -> None:
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"MLP: sizes must be at least [n_in, n_out], all >= 1, got {sizes}")
        self.sizes = [int(s) for s in sizes]
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"MLP: dtype must be float32 or float64, got {self.dtype}")
        self.params: dict[str, np.ndarray] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes, self.sizes[1:]), start=1):
            w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
            self.params[f"W{i}"] = np.ascontiguousarray(w, dtype=self.dtype)
            self.params[f"b{i}"] = np.zeros(fan_out, dtype=self.dtype)

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def size(self) -> int:
        """Number of scalar parameters."""
        return sum(a.size for a in self.params.values())

    def logits(self, x: np.ndarray, params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The last layer's outputs (before the softmax) for inputs `x` of shape (n, n_in)."""
        p = self.params if params is None else params
        a = np.asarray(x, dtype=self.dtype)
        for i in range(1, self.n_layers + 1):
            a = a @ p[f"W{i}"] + p[f"b{i}"]
            if i < self.n_layers:
                np.maximum(a, 0, out=a)
        return a

    def loss(
        self, x: np.ndarray, y: np.ndarray, params: Mapping[str, np.ndarray] | None = None
    ) -> float:
        """Mean softmax cross-entropy on (`x`, `y`)."""
        return softmax_cross_entropy(self.logits(x, params), y)[0]

    def accuracy(
        self, x: np.ndarray, y: np.ndarray, params: Mapping[str, np.ndarray] | None = None
    ) -> float:
        """Fraction of rows of `x` whose largest logit is the label."""
        return float((self.logits(x, params).argmax(axis=1) == y).mean())

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, out: Mapping[str, np.ndarray]) -> float:
        """Mean softmax cross-entropy on the batch (`x`, `y`); the gradient of that loss with
        respect to every parameter is written into ``out[name]`` (arrays shaped like the
        parameters, e.g. an optimizer's ``grads``).  Returns the loss."""
        p = self.params
        n = x.shape[0]
        acts = [np.asarray(x, dtype=self.dtype)]
        for i in range(1, self.n_layers + 1):
            z = acts[-1] @ p[f"W{i}"]
            z += p[f"b{i}"]
            if i < self.n_layers:
                np.maximum(z, 0, out=z)
            acts.append(z)
        loss, delta = softmax_cross_entropy(acts[-1], y)
        delta[np.arange(n), y] -= 1  # d loss / d logits = (softmax - onehot) / n
        delta /= n
        for i in range(self.n_layers, 0, -1):
            np.matmul(acts[i - 1].T, delta, out=out[f"W{i}"])
            np.sum(delta, axis=0, out=out[f"b{i}"])
            if i > 1:
                back = delta @ p[f"W{i}"].T
                back *= acts[i - 1] > 0  # ReLU'
                delta = back
        return loss
