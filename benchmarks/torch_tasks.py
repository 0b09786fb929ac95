"""The benchmark's PyTorch tasks: a model, a batch schedule, a loss and a validation loss each, and one training run."""

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks import data
from benchmarks.protocol import lr_factor


@dataclass
class Task:
    build: Callable  # () -> nn.Module (call after seeding)
    batch: Callable  # (rng, step) -> (inputs, targets)
    loss: Callable  # (model, inputs, targets) -> scalar tensor
    evaluate: Callable  # (model) -> (val_loss, val_accuracy or None)
    steps: int
    clip_grad_norm: float = None  # the transformer recipe: gradients clipped to this global norm


def _classification(arrays, build, steps, batch_size=64):
    x_train, y_train, x_val, y_val = (torch.from_numpy(a) for a in arrays)

    def batch(rng, step):
        index = torch.from_numpy(rng.integers(0, len(x_train), batch_size))
        return x_train[index], y_train[index]

    def evaluate(model):
        with torch.no_grad():
            logits = model(x_val)
        return F.cross_entropy(logits, y_val).item(), (logits.argmax(1) == y_val).float().mean().item()

    return Task(build, batch, lambda m, x, y: F.cross_entropy(m(x), y), evaluate, steps)


def digits_mlp(steps):
    build = lambda: nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),  # noqa: E731
                                  nn.Linear(128, 10))
    return _classification(data.digits(), build, steps)


def mnist_cnn(steps):
    build = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))
    return _classification(data.mnist(), build, steps)


def shakespeare_gpt2(steps, batch_size=32, context=64):
    """Hugging Face GPT-2 built from ``GPT2Config`` (no download), next character on Shakespeare; its LM head is
    tied to the token embedding, as in GPT-2, and its gradients are clipped to norm 1, as GPT-2 recipes do (at the
    rate AdamW's sweep picks, one seed in two went unstable unclipped)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    train, val, vocab = data.shakespeare(context=context)
    train, val = torch.from_numpy(train), torch.from_numpy(val)
    offsets = torch.arange(context + 1)
    config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)

    def batch(rng, step):
        starts = torch.from_numpy(rng.integers(0, len(train) - context, batch_size))
        return train[starts[:, None] + offsets], None

    def loss(model, windows, _):
        logits = model(windows[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

    def evaluate(model):
        with torch.no_grad():
            return loss(model, val, None).item(), None

    return Task(lambda: GPT2LMHeadModel(config), batch, loss, evaluate, steps, clip_grad_norm=1.0)


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


def _regression(phases, build, steps, batch_sizes):
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

    return Task(build, batch, lambda m, x, y: F.mse_loss(m(x), y), evaluate, steps)


def residual_regression(steps):
    return _regression([data.teacher_regression()], ResidualMLP, steps, [64])


def nonstationary(steps):
    build = lambda: nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),  # noqa: E731
                                  nn.Linear(64, 1))
    return _regression(data.nonstationary(), build, steps, [4, 8, 32])


def storage_bytes(tensors):
    """Bytes of the tensors' real storage, each storage once: a quantized state (torchao's ``OptimState8bit``, a
    tensor subclass of uint8 codes and float scales) counts its inner tensors, not its logical fp32 size."""
    seen, total = set(), 0
    stack = [t for t in tensors if torch.is_tensor(t)]
    while stack:
        tensor = stack.pop()
        if hasattr(tensor, "__tensor_flatten__"):
            names, _ = tensor.__tensor_flatten__()
            stack += [getattr(tensor, name) for name in names]
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def state_bytes(optimizer):
    return storage_bytes([value for state in optimizer.state.values() for value in state.values()])


def train(task, make_optimizer, lr, seed):
    """One run: the same initialization, data order and batch schedule for every optimizer at a given seed; the
    learning rate follows ``lr_factor`` (linear warmup, cosine decay) through a ``LambdaLR``."""
    torch.manual_seed(seed)
    model = task.build()
    optimizer = make_optimizer(model, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, task.steps))
    rng = np.random.default_rng(seed)
    for step in range(task.steps):
        inputs, targets = task.batch(rng, step)
        loss = task.loss(model, inputs, targets)
        if not math.isfinite(loss.item()):
            return {"val_loss": None, "val_accuracy": None, "state_bytes": state_bytes(optimizer)}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if task.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.clip_grad_norm)
        optimizer.step()
        schedule.step()
    val_loss, val_accuracy = task.evaluate(model)
    return {"val_loss": val_loss if math.isfinite(val_loss) else None, "val_accuracy": val_accuracy,
            "state_bytes": state_bytes(optimizer)}
