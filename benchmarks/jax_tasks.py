"""The benchmark's JAX tasks (plain jax MLPs whose parameter dicts are built in layer order), and one training run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import data
from benchmarks.protocol import lr_factor


def init_mlp(key, sizes):
    params = {}
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        bound = 1.0 / math.sqrt(fan_in)
        params[f"dense_{index}"] = {"w": jax.random.uniform(sub, (fan_in, fan_out), minval=-bound, maxval=bound),
                                    "b": jnp.zeros(fan_out)}
    return params


def mlp(params, x, activation):
    layers = list(params.values())
    for layer in layers[:-1]:
        x = activation(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


class JaxTask:
    def __init__(self, name, sizes, activation, phases, classification, steps, batch_sizes):
        self.name, self.sizes, self.activation = name, sizes, activation
        self.phases, self.classification, self.steps, self.batch_sizes = phases, classification, steps, batch_sizes

    def loss(self, params, x, y):
        out = mlp(params, x, self.activation)
        if self.classification:
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return jnp.mean((out - y) ** 2)

    def accuracy(self, params, x, y):
        return jnp.mean(jnp.argmax(mlp(params, x, self.activation), -1) == y) if self.classification else None


def digits_mlp(steps):
    return JaxTask("digits_mlp", [64, 128, 128, 10], jax.nn.gelu, [data.digits()], True, steps, [64])


def nonstationary(steps):
    return JaxTask("nonstationary", [16, 64, 64, 1], jnp.tanh, data.nonstationary(), False, steps, [4, 8, 32])


_COMPILED = {}


def _compiled(task, optimizer_name, make_optimizer):
    """One jitted step per (task, optimizer): the learning rate is data, so sweeps and seeds reuse it."""
    key = (task.name, task.steps, optimizer_name)
    if key not in _COMPILED:
        template = init_mlp(jax.random.PRNGKey(0), task.sizes)  # the model's own tree, for STAC's partition
        optimizer = optax.inject_hyperparams(lambda learning_rate: make_optimizer(template, learning_rate))(
            learning_rate=0.0)

        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(task.loss)(params, x, y)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        _COMPILED[key] = (optimizer, jax.jit(step, donate_argnums=(0, 1)),
                          jax.jit(lambda p, x, y: (task.loss(p, x, y), task.accuracy(p, x, y))))
    return _COMPILED[key]


def train(task, optimizer_name, make_optimizer, lr, seed):
    """One run, as ``benchmarks.torch_tasks.train``: the rate is set on the host before every jitted step."""
    optimizer, step, evaluate = _compiled(task, optimizer_name, make_optimizer)
    params = init_mlp(jax.random.PRNGKey(seed), task.sizes)
    state = optimizer.init(params)
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.inner_state))
    rng = np.random.default_rng(seed)
    for index in range(task.steps):
        x_train, y_train = task.phases[min(index * len(task.phases) // task.steps, len(task.phases) - 1)][:2]
        batch = rng.integers(0, len(x_train), task.batch_sizes[index % len(task.batch_sizes)])
        state.hyperparams["learning_rate"] = jnp.asarray(lr * lr_factor(index, task.steps))
        params, state, loss = step(params, state, x_train[batch], y_train[batch])
        loss = float(loss)
        if not math.isfinite(loss):
            return {"val_loss": None, "val_accuracy": None, "state_bytes": int(state_bytes)}
    val_loss, accuracy = evaluate(params, *task.phases[-1][2:])
    return {"val_loss": float(val_loss) if math.isfinite(val_loss) else None,
            "val_accuracy": None if accuracy is None else float(accuracy), "state_bytes": int(state_bytes)}
