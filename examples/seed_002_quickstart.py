# Seed 002's quickstart (STAM 0.1.0), as written, for both classes. The seed's
# placeholder `training_loop` is a real loop here: gradients of a least-squares
# fit of a fixed linear map, so the printed losses must fall.
import jax
import jax.numpy as jnp

from stam_optimizer import STAM, STAMLite

inputs = jax.random.normal(jax.random.PRNGKey(0), (64, 10))
true_w = jax.random.normal(jax.random.PRNGKey(1), (10, 5))
targets = inputs @ true_w + 0.5


def loss_fn(params):
    return jnp.mean((inputs @ params['w'] + params['b'] - targets) ** 2)


def training_loop(get_params, steps=200):
    for _ in range(steps):
        yield jax.grad(loss_fn)(get_params())


# --- STAM, as in the seed ---
from stam_optimizer import STAM
import jax
# Initialize optimizer
optimizer = STAM(
    learning_rate=1e-3,
    b1_base=0.9, # base momentum
    b2=0.999, # second moment decay
    weight_decay=0.01, # decoupled weight decay
    adapt_strength=0.2 # adaptation strength [0, 0.5]
)
# Initialize state
params = {'w': jax.numpy.zeros((10, 5)), 'b': jax.numpy.zeros(5)}
state = optimizer.init(params)
initial_loss = float(loss_fn(params))
# Training loop
for grads in training_loop(lambda: params):
    updates, state = optimizer.update(grads, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p - u, params, updates)
print(f"STAM loss: {initial_loss:.4f} -> {float(loss_fn(params)):.4f}")

# --- STAMLite, as in the seed ---
from stam_optimizer import STAMLite
import jax
optimizer = STAMLite(
    learning_rate=1e-3,
    b1_base=0.9,
    weight_decay=0.01,
    adapt_strength=0.2
)
params = {'w': jax.numpy.zeros((10, 5)), 'b': jax.numpy.zeros(5)}
state = optimizer.init(params)
initial_loss = float(loss_fn(params))
for grads in training_loop(lambda: params):
    updates, state = optimizer.update(grads, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p - u, params, updates)
print(f"STAMLite loss: {initial_loss:.4f} -> {float(loss_fn(params)):.4f}")
