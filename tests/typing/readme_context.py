"""What the README's Python examples use without defining it (a data loader, a backward pass,
the model...), typed as a user's code would have it.  ``.ci/typecheck-user-code`` checks each
```python block of README.md as its own module, which starts with ``from readme_context import
*``; the blocks build on each other like a reader's session, so the names an earlier block
defines (``fo``, ``params``) are here too."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import fastoptim
import fastoptim as fo

__all__ = [
    "Any",
    "np",
    "torch",
    "fastoptim",
    "fo",
    "data",
    "backward",
    "params",
    "epochs",
    "validation_loss",
    "model",
    "loader",
    "evaluate",
]

data: list[Any] = []  # batches
params: dict[str, np.ndarray] = {"w": np.zeros((784, 256), np.float32)}
epochs = 10
validation_loss = 0.0
model = torch.nn.Linear(784, 10)
loader: list[tuple[torch.Tensor, torch.Tensor]] = []


def evaluate(params: dict[str, np.ndarray]) -> None:
    """Evaluate the model with `params`."""


def backward(params: dict[str, np.ndarray], batch: Any, out: dict[str, np.ndarray]) -> None:
    """Write the gradients of the loss on `batch` into `out`."""
