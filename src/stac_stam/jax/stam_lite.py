"""STAMLite for JAX/optax: STAM's adaptive beta1 from cheap tensor moments, RMS denominator (seed 002)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from stac_stam.jax._common import (SeedOptimizer, check_eps, check_floating_dtype, check_interval, check_range,
                                    gradients_finite, per_tensor_means, per_tensor_scalars, per_tensor_vector,
                                    saturated, skip_nonfinite_steps)


class STAMLiteState(NamedTuple):
    """State of ``scale_by_stam_lite``. ``mu`` is a pytree like the parameters; the tensor-level fields are
    vectors with one entry per parameter tensor, in ``jax.tree.leaves(params)`` order (see
    ``per_tensor_vector``)."""

    count: jax.Array  # int32, steps taken
    mu: optax.Updates  # first moment, stored in state_dtype
    grad_mean: jax.Array  # per tensor: EMA of mean(g)
    grad_sq_mean: jax.Array  # per tensor: EMA of mean(g^2)
    beta1: jax.Array  # per tensor: the beta1 in use (recomputed every beta1_update_interval steps)
    beta1_product: jax.Array  # per tensor: product of every beta1 used, for bias correction


def _moments_in_units(grads, state, moment_decay, e1, e2):
    """``(e1, e2, u)``: each tensor's new moments E[g]_t / u and E[g^2]_t / u^2 and its unit u, a vector each,
    for a step where ``e1`` or ``e2`` (the moments in the state's dtype) is not finite.

    That happens to finite gradients when a mean of squares passes float32's
    range (|g| > 1.8e19); the PyTorch STAMLite takes the moments in float64,
    where they do not. Here those tensors' moments are taken again in units of
    u = 2^(3 max_exp / 4) (2^96 for float32): (g / u)^2 and its sums over up to
    2^(max_exp / 2) values cannot overflow, and the squares that flush to zero
    there (|g| < 2^33 for float32) are negligible beside a sum that overflowed
    (n 2^66 at most, against 2^128). The other tensors keep u = 1 and their
    moments as given. So a gradient of 1e20 moves a parameter by about the
    learning rate, as AdamW's first step does, never by learning_rate / eps.
    """
    dtype = e1.dtype
    unit = 2.0 ** (3 * jnp.finfo(dtype).maxexp // 4)
    overflowed = ~(jnp.isfinite(e1) & jnp.isfinite(e2))
    mean = per_tensor_means(lambda grad: grad.astype(dtype) / unit, (grads,), dtype)
    # Behind the barrier each sum scales g itself: sharing g / u, XLA wrote it out (64 MiB per 4096^2 tensor).
    square_mean = per_tensor_means(lambda grad: jnp.square(jax.lax.optimization_barrier(grad).astype(dtype) / unit),
                                   (grads,), dtype)
    scaled_e1 = moment_decay * (state.grad_mean / unit) + (1 - moment_decay) * mean
    scaled_e2 = moment_decay * (state.grad_sq_mean / unit / unit) + (1 - moment_decay) * square_mean
    return (jnp.where(overflowed, scaled_e1, e1), jnp.where(overflowed, scaled_e2, e2),
            jnp.where(overflowed, unit, 1).astype(dtype))


def scale_by_stam_lite(b1_base=0.9, adapt_strength=0.2, moment_decay=0.99, beta1_update_interval=5,
                       state_dtype=jnp.float32, eps=1e-8):
    r"""STAMLite's direction, as a block for ``skip_nonfinite_steps``: ``mu_hat / RMS``.

    Per tensor, at step t (1-based), with gradient g and k = beta1_update_interval::

        E[g]_t   = moment_decay E[g]_{t-1}   + (1 - moment_decay) mean(g)
        E[g^2]_t = moment_decay E[g^2]_{t-1} + (1 - moment_decay) mean(g^2)
        z        = max(E[g^2]_t - E[g]_t^2, 0) / (E[g^2]_t + eps),   s = z / (1 + z)
        beta1    = clip(b1_base (1 - adapt_strength s), b1_base (1 - adapt_strength), b1_base)
                   recomputed on steps 1, 1 + k, 1 + 2k, ..., held in between
        mu_t     = beta1 mu_{t-1} + (1 - beta1) g                 (stored in state_dtype)
        out      = [mu_t / (1 - prod_i beta1_i)] / (sqrt(E[g^2]_t / (1 - moment_decay^t)) + eps)

    No per-parameter second moment: the denominator is one number per tensor.
    If the moments are not finite, beta1 falls back to b1_base and they keep
    their previous values. Moments of finite gradients never overflow (see
    ``_moments_in_units``); they are stored saturated at the largest finite
    value of their dtype, and mu is kept within its dtype's range, as in the
    PyTorch STAMLite: no finite gradient makes the state or the step NaN or Inf. The tensor-level rule runs once over vectors of all
    tensors' statistics. ``update`` returns ``(direction, state, finite)``:
    ``finite`` is False when a gradient holds NaN or Inf (judged from the
    moments' means, see ``gradients_finite``), and then the state is returned
    exactly as it was, without a ``lax.cond``: see ``skip_nonfinite_steps``.
    """

    def init(params):
        return STAMLiteState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=state_dtype), params),  # keeps p's sharding
            grad_mean=per_tensor_vector(params, 0),
            grad_sq_mean=per_tensor_vector(params, 0),
            beta1=per_tensor_vector(params, b1_base),
            beta1_product=per_tensor_vector(params, 1),
        )

    def update(updates, state, params=None):
        del params
        grads, treedef = jax.tree.flatten(updates)
        stat_dtype = state.grad_mean.dtype
        mean = per_tensor_means(lambda grad: grad.astype(stat_dtype), (grads,), stat_dtype)
        square_mean = per_tensor_means(lambda grad: jnp.square(grad.astype(stat_dtype)), (grads,), stat_dtype)
        # e1 = E[g]_t / u and e2 = E[g^2]_t / u^2, per tensor, where u = 1 unless a moment of finite gradients
        # overflowed (see _moments_in_units). The statistics of a skipped step are dropped.
        e1 = moment_decay * state.grad_mean + (1 - moment_decay) * mean
        e2 = moment_decay * state.grad_sq_mean + (1 - moment_decay) * square_mean
        finite, (e1, e2, unit) = gradients_finite(
            updates, (mean, square_mean, e1, e2), rare=lambda tree: _moments_in_units(jax.tree.leaves(tree), state, moment_decay, e1, e2),
            usual=(e1, e2, jnp.ones_like(e1)))
        count = jnp.where(finite, optax.safe_increment(state.count), state.count)
        moments_finite = jnp.isfinite(e1) & jnp.isfinite(e2)
        keep = finite & moments_finite
        e1, e2 = jnp.where(keep, e1, state.grad_mean), jnp.where(keep, e2, state.grad_sq_mean)
        unit = jnp.where(keep, unit, 1)
        z = jnp.maximum(e2 - jnp.square(e1), 0) / (e2 + eps / unit / unit)
        adapted = jnp.clip(b1_base * (1 - adapt_strength * z / (1 + z)), b1_base * (1 - adapt_strength), b1_base)
        refresh = (count - 1) % beta1_update_interval == 0
        beta1 = jnp.where(finite, jnp.where(moments_finite, jnp.where(refresh, adapted, state.beta1), b1_base),
                          state.beta1).astype(stat_dtype)
        # A skipped step is taken with g = 0 and beta1 = 1, which leaves mu exactly as it was.
        beta1_step = jnp.where(finite, beta1, 1).astype(stat_dtype)
        beta1_product = state.beta1_product * beta1_step
        # XLA divides a tensor by a scalar as a multiply by its reciprocal; taken here, the reciprocals are
        # two vector operations, not two kernels per tensor.
        inverse_correction = 1 / (1 - beta1_product)
        # 1 / (u rms): in units of u a step of a 3e38 gradient is not a product with a subnormal (XLA flushes them)
        inverse_rms = 1 / (jnp.sqrt(e2 / (1 - moment_decay ** count.astype(stat_dtype))) + eps / unit)
        # Stored saturated at the largest finite value, as the PyTorch STAMLite stores them.
        largest = jnp.finfo(stat_dtype).max
        grad_mean = jnp.clip(unit * e1, -largest, largest)
        grad_sq_mean = jnp.minimum(unit * (unit * e2), largest)

        directions, mus = [], []
        coefficients = per_tensor_scalars(beta1_step, 1 / unit, inverse_correction * inverse_rms)
        for grad, mu, (tensor_beta1, inverse_unit, step_scale) in zip(grads, treedef.flatten_up_to(state.mu),
                                                                        coefficients):
            mu_full = saturated(tensor_beta1 * mu.astype(stat_dtype) + (1 - tensor_beta1) * jnp.where(
                finite, grad.astype(stat_dtype), 0))
            directions.append((mu_full * inverse_unit * step_scale).astype(grad.dtype))
            mus.append(mu_full if mu.dtype == stat_dtype else saturated(mu_full.astype(mu.dtype)))
        state = STAMLiteState(count, treedef.unflatten(mus), grad_mean, grad_sq_mean, beta1, beta1_product)
        return treedef.unflatten(directions), state, finite

    return optax.GradientTransformation(init, update)


def stam_lite(learning_rate=1e-3, b1_base=0.9, weight_decay=0.01, adapt_strength=0.2, moment_decay=0.99,
              beta1_update_interval=5, state_dtype=None, eps=1e-8, mask=None):
    r"""STAMLite as an ``optax.GradientTransformation`` (optax's sign: ``optax.apply_updates`` adds it).

    ``params <- params - learning_rate * (direction + weight_decay * params)``,
    ``direction`` from ``scale_by_stam_lite``. Cheaper than STAM: one moment per
    parameter (AdamW keeps two), tensor-level statistics only. Non-finite steps
    change nothing and are counted in ``state.nonfinite_skipped_steps``.

    =====================  ==========  ========  ==================================
    argument               default     range     meaning
    =====================  ==========  ========  ==================================
    learning_rate          1e-3        >= 0      step size (or schedule)
    b1_base                0.9         (0, 1)    base first-moment decay
    weight_decay           0.01        >= 0      decoupled weight decay
    adapt_strength         0.2         [0, 0.5]  how far beta1 may drop below b1_base
    moment_decay           0.99        (0, 1)    decay of the gradient moments
    beta1_update_interval  5           >= 1      recompute beta1 every k steps
    state_dtype            None        dtype     storage dtype of mu (None: float32)
    eps                    1e-8        > 0       denominator guard
    =====================  ==========  ========  ==================================
    """
    check_range("learning_rate", learning_rate, 0.0, schedule=True)
    check_range("b1_base", b1_base, 0.0, 1.0, low_open=True, high_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("adapt_strength", adapt_strength, 0.0, 0.5)
    check_range("moment_decay", moment_decay, 0.0, 1.0, low_open=True, high_open=True)
    check_interval("beta1_update_interval", beta1_update_interval)
    # The default is None, not jnp.float32: optax.inject_hyperparams would take the callable
    # jnp.float32 for a schedule. Under inject_hyperparams pass it in static_args.
    state_dtype = check_floating_dtype("state_dtype", state_dtype, jnp.float32)
    check_eps(eps)
    return skip_nonfinite_steps(
        scale_by_stam_lite(b1_base, adapt_strength, moment_decay, beta1_update_interval, state_dtype, eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


class STAMLite(SeedOptimizer):
    """STAMLite with seed 002's API: ``updates, state = opt.update(grads, state, params)``; ``params - updates``.

    Arguments as ``stam_lite`` (without ``mask``), plus ``error_if_nonfinite`` (see ``STAM``).
    """

    def __init__(self, learning_rate=1e-3, b1_base=0.9, weight_decay=0.01, adapt_strength=0.2, moment_decay=0.99,
                 beta1_update_interval=5, state_dtype=None, eps=1e-8, error_if_nonfinite=False):
        super().__init__(stam_lite, dict(learning_rate=learning_rate, b1_base=b1_base, weight_decay=weight_decay,
                                         adapt_strength=adapt_strength, moment_decay=moment_decay,
                                         beta1_update_interval=beta1_update_interval, state_dtype=state_dtype,
                                         eps=eps), error_if_nonfinite)
