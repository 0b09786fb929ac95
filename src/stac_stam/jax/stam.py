"""STAM for JAX/optax: AdamW with a variance-adaptive beta1 (seed 002)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from stac_stam.jax._common import (SeedOptimizer, check_eps, check_range, gradients_finite, per_tensor_means,
                                    per_tensor_scalars, per_tensor_vector, saturated, skip_nonfinite_steps, skip_weights)

# sigma^2 is capped at VARIANCE_CAP * tau^2 (the seed's "variance explosion" guard).
VARIANCE_CAP = 10.0


class STAMState(NamedTuple):
    """State of ``scale_by_stam``. ``mu`` and ``nu`` are pytrees like the parameters; the tensor-level fields
    are vectors with one entry per parameter tensor, in ``jax.tree.leaves(params)`` order (see
    ``per_tensor_vector``)."""

    count: jax.Array  # int32, steps taken
    mu: optax.Updates  # first moment, decayed with the adaptive beta1
    nu: optax.Updates  # second moment, decayed with b2
    variance: jax.Array  # per tensor: EMA of mean(r^2), r = g - mu
    scale: jax.Array  # per tensor: EMA of mean(|r|), the running scale tau
    beta1: jax.Array  # per tensor: the beta1 used at the last step (for logging)
    beta1_product: jax.Array  # per tensor: product of every beta1 used, for bias correction


def _residual_moments(grads, mus, stat_dtype):
    """Vectors of each tensor's mean(r^2) and mean(|r|), r = g - mu: the read before STAM's update."""
    # Two reductions of one residual: XLA's CPU backend writes the residual out and reads it twice (31 ms
    # against 10 ms on a 16.7M tensor); behind the barrier each reduction computes the residual itself.
    return (per_tensor_means(lambda grad, mu: jnp.square((grad - mu).astype(stat_dtype)), (grads, mus), stat_dtype),
            per_tensor_means(lambda grad, mu: jnp.abs((jax.lax.optimization_barrier(grad) - mu).astype(stat_dtype)),
                             (grads, mus), stat_dtype))


def scale_by_stam(b1_base=0.9, b2=0.999, adapt_strength=0.2, tau_decay=0.99, eps=1e-8):
    r"""STAM's direction, as a block for ``skip_nonfinite_steps``: ``mu_hat / (sqrt(nu_hat) + eps)``.

    Per tensor, at step t (1-based), with gradient g::

        r      = g - mu_{t-1}
        var_t  = b2 var_{t-1} + (1 - b2) mean(r^2)          capped at 10 tau_t^2
        tau_t  = tau_decay tau_{t-1} + (1 - tau_decay) mean(|r|)
        z      = var_t / (tau_t^2 + eps),   s = z / (1 + z)
        beta1  = clip(b1_base (1 - adapt_strength s), b1_base (1 - adapt_strength), b1_base)
        mu_t   = beta1 mu_{t-1} + (1 - beta1) g
        nu_t   = b2 nu_{t-1} + (1 - b2) g^2
        out    = [mu_t / (1 - prod_i beta1_i)] / (sqrt(nu_t / (1 - b2^t)) + eps)

    If var_t or tau_t is not finite, beta1 falls back to b1_base and both keep
    their previous values. mu is kept within its dtype's range; nu, an
    elementwise average of g^2, overflows to Inf where |g| > 1.8e19 (float32),
    as optax's and torch's AdamW's does, and that coordinate's step is then 0:
    no finite gradient makes a parameter NaN or Inf. The tensor-level rule runs once over vectors of all
    tensors' statistics. Hyperparameters may be arrays (``inject_hyperparams``).
    ``update`` returns ``(direction, state, finite)``: ``finite`` is False when
    a gradient holds NaN or Inf (judged from the residual means, see
    ``gradients_finite``), and then the state is returned exactly as it was,
    without a ``lax.cond``: see ``skip_nonfinite_steps``.
    """

    def init(params):
        return STAMState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
            variance=per_tensor_vector(params, 0),
            scale=per_tensor_vector(params, 0),
            beta1=per_tensor_vector(params, b1_base),
            beta1_product=per_tensor_vector(params, 1),
        )

    def update(updates, state, params=None):
        del params
        grads, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        stat_dtype = state.variance.dtype
        square_mean, abs_mean = _residual_moments(grads, mus, stat_dtype)
        finite = gradients_finite(updates, (square_mean, abs_mean))
        count = jnp.where(finite, optax.safe_increment(state.count), state.count)

        # The statistics of a skipped step are dropped.
        new_variance = b2 * state.variance + (1 - b2) * square_mean
        new_scale = tau_decay * state.scale + (1 - tau_decay) * abs_mean
        statistics_finite = jnp.isfinite(new_variance) & jnp.isfinite(new_scale)
        new_variance = jnp.minimum(new_variance, VARIANCE_CAP * jnp.square(new_scale))
        z = new_variance / (jnp.square(new_scale) + eps)
        adapted = jnp.clip(b1_base * (1 - adapt_strength * z / (1 + z)), b1_base * (1 - adapt_strength), b1_base)
        beta1_used = jnp.where(statistics_finite, adapted, b1_base).astype(stat_dtype)
        keep = finite & statistics_finite
        variance = jnp.where(keep, new_variance, state.variance)
        scale = jnp.where(keep, new_scale, state.scale)
        # A skipped step is taken with g = 0 and beta1 = b2 = 1, which leaves mu and nu exactly as they were.
        beta1_step = jnp.where(finite, beta1_used, 1).astype(stat_dtype)
        b2_step, b2_complement_step = skip_weights(finite, b2)
        beta1_product = state.beta1_product * beta1_step
        # XLA divides a tensor by a scalar as a multiply by its reciprocal; taken here, it is one vector
        # operation, not a kernel per tensor.
        inverse_correction = 1 / (1 - beta1_product)
        nu_correction = 1 - b2 ** count.astype(stat_dtype)

        directions, new_mus, new_nus = [], [], []
        coefficients = per_tensor_scalars(beta1_step, inverse_correction)
        for grad, mu, nu, (tensor_beta1, tensor_correction) in zip(grads, mus, nus, coefficients):
            grad = jnp.where(finite, grad, 0)
            # mu stays finite; nu may overflow to Inf, and then the step is 0
            mu = saturated((tensor_beta1 * mu + (1 - tensor_beta1) * grad).astype(mu.dtype))
            nu = (b2_step * nu + b2_complement_step * jnp.square(grad)).astype(nu.dtype)
            directions.append((mu * (tensor_correction / (jnp.sqrt(nu / nu_correction) + eps))).astype(grad.dtype))
            new_mus.append(mu)
            new_nus.append(nu)
        state = STAMState(count, treedef.unflatten(new_mus), treedef.unflatten(new_nus), variance, scale,
                          jnp.where(finite, beta1_used, state.beta1), beta1_product)
        return treedef.unflatten(directions), state, finite

    return optax.GradientTransformation(init, update)


def stam(learning_rate=1e-3, b1_base=0.9, b2=0.999, weight_decay=0.01, adapt_strength=0.2, tau_decay=0.99,
         eps=1e-8, mask=None):
    r"""STAM as an ``optax.GradientTransformation`` (optax's sign: ``optax.apply_updates`` adds it).

    ``params <- params - learning_rate * (direction + weight_decay * params)``, with
    ``direction`` from ``scale_by_stam``; ``learning_rate`` is a float or an optax
    schedule, ``mask`` selects the parameters that get weight decay (as in
    ``optax.adamw``). A step whose gradients hold NaN or Inf changes nothing and is
    counted in ``state.nonfinite_skipped_steps``.

    ===============  ==========  ========  =====================================
    argument         default     range     meaning
    ===============  ==========  ========  =====================================
    learning_rate    1e-3        >= 0      step size (or schedule)
    b1_base          0.9         (0, 1)    base first-moment decay
    b2               0.999       (0, 1)    second-moment and variance decay
    weight_decay     0.01        >= 0      decoupled weight decay
    adapt_strength   0.2         [0, 0.5]  how far beta1 may drop below b1_base
    tau_decay        0.99        (0, 1)    decay of the running scale tau
    eps              1e-8        > 0       denominator guard
    ===============  ==========  ========  =====================================

    With ``adapt_strength=0`` this is ``optax.adamw``. Example::

        optimizer = stam(learning_rate=1e-3)
        state = optimizer.init(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    """
    check_range("learning_rate", learning_rate, 0.0, schedule=True)
    check_range("b1_base", b1_base, 0.0, 1.0, low_open=True, high_open=True)
    check_range("b2", b2, 0.0, 1.0, low_open=True, high_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("adapt_strength", adapt_strength, 0.0, 0.5)
    check_range("tau_decay", tau_decay, 0.0, 1.0, low_open=True, high_open=True)
    check_eps(eps)
    return skip_nonfinite_steps(
        scale_by_stam(b1_base, b2, adapt_strength, tau_decay, eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


class STAM(SeedOptimizer):
    """STAM with seed 002's API: ``updates, state = opt.update(grads, state, params)``; ``params - updates``.

    Arguments as ``stam`` (without ``mask``), plus ``error_if_nonfinite``: raise
    FloatingPointError on a NaN/Inf gradient instead of skipping the step (checked
    on the host before the jitted update, so it costs one device sync per step).
    """

    def __init__(self, learning_rate=1e-3, b1_base=0.9, b2=0.999, weight_decay=0.01, adapt_strength=0.2,
                 tau_decay=0.99, eps=1e-8, error_if_nonfinite=False):
        super().__init__(stam, dict(learning_rate=learning_rate, b1_base=b1_base, b2=b2, weight_decay=weight_decay,
                                    adapt_strength=adapt_strength, tau_decay=tau_decay, eps=eps),
                         error_if_nonfinite)
