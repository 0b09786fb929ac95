"""The benchmark's PyTorch tasks: a model, a batch schedule, a loss and a validation metric each."""

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks import data


@dataclass
class Task:
    name: str
    build: Callable  # () -> nn.Module (call after seeding)
    batch: Callable  # (rng, step) -> (inputs, targets)
    loss: Callable  # (model, inputs, targets) -> scalar tensor
    evaluate: Callable  # (model) -> (val_loss, val_accuracy or None)
    steps: int
    eval_every: int


def _classification(name, arrays, build, steps, batch_size=64):
    x_train, y_train, x_val, y_val = (torch.from_numpy(a) for a in arrays)

    def batch(rng, step):
        index = torch.from_numpy(rng.integers(0, len(x_train), batch_size))
        return x_train[index], y_train[index]

    def evaluate(model):
        with torch.no_grad():
            logits = model(x_val)
        return F.cross_entropy(logits, y_val).item(), (logits.argmax(1) == y_val).float().mean().item()

    return Task(name, build, batch, lambda m, x, y: F.cross_entropy(m(x), y), evaluate, steps, max(steps // 10, 1))


def digits_mlp(steps):
    build = lambda: nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),  # noqa: E731
                                  nn.Linear(128, 10))
    return _classification("digits_mlp", data.digits(), build, steps)


def mnist_cnn(steps):
    build = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))
    return _classification("mnist_cnn", data.mnist(), build, steps)


class CharTransformer(nn.Module):
    """A small pre-LayerNorm causal transformer over characters."""

    def __init__(self, vocab, context, width=64, heads=4, blocks=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids):
        h = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[: ids.shape[1], : ids.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def shakespeare_lm(steps, batch_size=32, context=64):
    train, val, vocab = data.shakespeare(context=context)
    train, val = torch.from_numpy(train), torch.from_numpy(val[:512])

    def loss(model, windows, _):
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

    def evaluate(model):
        with torch.no_grad():
            return loss(model, val, None).item(), None

    return Task("shakespeare_lm", lambda: CharTransformer(vocab, context), lambda rng, step: (
        train[torch.from_numpy(rng.integers(0, len(train), batch_size))], None), loss, evaluate, steps,
        max(steps // 10, 1))


class ResidualMLP(nn.Module):
    def __init__(self, dim=32, width=64, depth=6):
        super().__init__()
        self.stem = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                                  nn.Linear(width, width)) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _regression(name, phases, build, steps, batch_sizes):
    """Regression over one or more phases; training moves to the next phase at equal intervals."""
    tensors = [[torch.from_numpy(a) for a in phase] for phase in phases]

    def batch(rng, step):
        x_train, y_train = tensors[min(step * len(tensors) // steps, len(tensors) - 1)][:2]
        index = torch.from_numpy(rng.integers(0, len(x_train), batch_sizes[step % len(batch_sizes)]))
        return x_train[index], y_train[index]

    def evaluate(model):
        x_val, y_val = tensors[-1][2:]
        with torch.no_grad():
            return F.mse_loss(model(x_val), y_val).item(), None

    return Task(name, build, batch, lambda m, x, y: F.mse_loss(m(x), y), evaluate, steps, max(steps // 10, 1))


def residual_regression(steps):
    return _regression("residual_regression", [data.teacher_regression()], ResidualMLP, steps, [64])


def nonstationary(steps):
    build = lambda: nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),  # noqa: E731
                                  nn.Linear(64, 1))
    return _regression("nonstationary", data.nonstationary(), build, steps, [4, 8, 32])


TASKS = {  # name -> (factory(steps), default steps)
    "digits_mlp": (digits_mlp, 400),
    "mnist_cnn": (mnist_cnn, 200),
    "shakespeare_lm": (shakespeare_lm, 200),
    "residual_regression": (residual_regression, 400),
    "nonstationary": (nonstationary, 400),
}


def state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def train(task, make_optimizer, lr, seed):
    """One run: the same init, data order and batch schedule for every optimizer at a given seed."""
    torch.manual_seed(seed)
    model = task.build()
    optimizer = make_optimizer(model, lr)
    rng = np.random.default_rng(seed)
    curve, step_seconds = [], []
    import time
    for step in range(task.steps):
        inputs, targets = task.batch(rng, step)
        loss = task.loss(model, inputs, targets)
        if not math.isfinite(loss.item()):
            curve.append((float("inf"), None))
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        step_seconds.append(time.perf_counter() - start)
        if (step + 1) % task.eval_every == 0:
            curve.append(task.evaluate(model))
    val_loss, val_accuracy = curve[-1]
    return {"val_loss": val_loss if math.isfinite(val_loss) else None, "val_accuracy": val_accuracy,
            "curve": [c[0] if math.isfinite(c[0]) else None for c in curve],
            "state_bytes": state_bytes(optimizer),
            "step_ms": 1e3 * float(np.median(step_seconds)) if step_seconds else None}
