"""PyTorch CPU training with fastoptim.torch.AdamW, a drop-in for torch.optim.AdamW, driven by
one of torch's own LR schedulers.  The same run with torch.optim.AdamW gives the same weights
to rounding.  Run: python torch_training.py (needs torch)
"""

import torch

import fastoptim.torch as fot


def train(optimizer_class: type) -> tuple[list[float], torch.nn.Module]:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(512, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = optimizer_class(model.parameters(), lr=0.02, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=150)
    losses = []
    for _ in range(150):
        batch = torch.randint(0, 512, (64,))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, model


losses, model = train(fot.AdamW)
print(f"loss: {sum(losses[:10]) / 10:.4f} -> {sum(losses[-10:]) / 10:.4f} (mean of 10 steps)")
_, reference = train(torch.optim.AdamW)
diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
print(f"max |fastoptim.torch - torch.optim| over the weights: {diff:.2e}")
