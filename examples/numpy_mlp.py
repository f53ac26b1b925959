"""Train a small NumPy multilayer perceptron with fastoptim.AdamW and a cosine schedule.

The backward pass writes the gradients straight into the optimizer's own buffers
(``opt.grads``), so ``opt.step()`` has nothing to convert or copy.  Run: python numpy_mlp.py
"""

import numpy as np

import fastoptim as fo

rng = np.random.default_rng(0)
# Points in the plane, labelled by quadrant parity (XOR): not linearly separable.
X = rng.uniform(-1, 1, (1024, 2)).astype(np.float32)
y = (X[:, 0] * X[:, 1] > 0).astype(np.int64)

hidden = 32
params = {
    "W1": (rng.standard_normal((2, hidden)) * 1.0).astype(np.float32),
    "b1": np.zeros(hidden, np.float32),
    "W2": (rng.standard_normal((hidden, 2)) / np.sqrt(hidden)).astype(np.float32),
    "b2": np.zeros(2, np.float32),
}
steps = 300
opt = fo.AdamW(params, lr=fo.schedules.cosine(0.05, steps), weight_decay=1e-4)
grads = opt.grads  # dict name -> buffer, filled by backward() below


def forward(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.maximum(x @ p["W1"] + p["b1"], 0)
    return h, h @ p["W2"] + p["b2"]


def loss_and_backward(x: np.ndarray, labels: np.ndarray) -> float:
    """Softmax cross-entropy; writes d(loss)/d(param) into ``grads``."""
    h, logits = forward(params, x)
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    d = probs
    d[np.arange(len(labels)), labels] -= 1
    d /= len(labels)
    np.matmul(h.T, d, out=grads["W2"])
    d.sum(axis=0, out=grads["b2"])
    dh = (d @ params["W2"].T) * (h > 0)
    np.matmul(x.T, dh, out=grads["W1"])
    dh.sum(axis=0, out=grads["b1"])
    return float(loss)


def accuracy() -> float:
    return float((forward(params, X)[1].argmax(axis=1) == y).mean())


first = None
for step in range(steps):
    batch = rng.choice(len(X), 64, replace=False)
    loss = loss_and_backward(X[batch], y[batch])
    first = loss if first is None else first
    opt.step()
    if step % 100 == 0:
        print(f"step {step:3d}  loss {loss:.4f}  lr {opt.param_groups[0]['lr']:.4f}")

_, logits = forward(params, X)
z = logits - logits.max(axis=1, keepdims=True)
final = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))
print(f"loss: {first:.4f} -> {final:.4f}")
print(f"train accuracy: {100 * accuracy():.1f}%")
