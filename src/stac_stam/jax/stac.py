"""STAC for JAX/optax: the same trunk/cap split and the same numbers as the PyTorch STAC.

``from stac_stam.jax import stac, stac_partition`` (seed API: ``from stac_optimizer.optax import ...``), and
the presets ``stac_recommended`` and ``stac_compact`` (PyTorch's ``STAC.recommended`` and ``STAC.compact``).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from stac_stam.jax._common import (check_flag, check_floating_dtype, check_range, gradients_finite, saturated,
                                    scalar_dtype, skip_nonfinite_steps, skip_weights)
from stac_stam.learning_rates import COMPACT_SIGN_LR_SCALE, RECOMMENDED_SIGN_LR_SCALE, SIGN_LR_SCALE
from stac_stam.partition import check_last_n_layers, factored_shape, split_layers, tree_layers


def _path_key(jax_path):
    return tuple(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))) for entry in jax_path)


@dataclass(frozen=True)
class PytreePartition:
    """Which layers of a pytree are the sign trunk and which the AdamW cap.

    A layer is a mapping (or list) that directly holds array leaves, named by
    its path joined with ``/`` (``"<root>"`` for the top level). Labels are kept
    per leaf path, so they apply to the same tree whatever order its keys come in.
    """

    sign_layer_names: tuple
    adamw_layer_names: tuple
    label_by_path: Mapping  # leaf path (tuple of keys) -> "sign" or "adamw"

    # Seed 000's names.
    trunk_layer_names = property(lambda self: self.sign_layer_names)
    cap_layer_names = property(lambda self: self.adamw_layer_names)

    def labels(self, params):
        """A tree like ``params`` with ``"sign"`` or ``"adamw"`` at every leaf."""
        def label(path, _):
            key = _path_key(path)
            if key not in self.label_by_path:
                raise ValueError(f"parameter {'/'.join(map(str, key))} is not in the STAC partition; the partition "
                                 "was resolved from a different tree")
            return self.label_by_path[key]
        return jax.tree_util.tree_map_with_path(label, params)


def stac_partition(params, last_n_layers=1, *, adamw_norm_layers=False, adamw_output_layer=False, adamw_params=None):
    """Split a parameter pytree into a sign trunk and an AdamW cap, in the tree's insertion order.

    The order is the one the mappings were built in (definition order in
    flax.linen and flax.nnx pure dicts), NOT the sorted-key order of
    ``jax.tree_util`` flattening; call this on the tree as your model created
    it, before it has passed through ``jax.jit`` (which returns dicts with
    sorted keys). ``last_n_layers`` as in PyTorch: 0 keeps everything in the
    trunk, an oversized value moves everything to the cap.
    ``adamw_norm_layers=True`` also sends every layer whose name matches
    ``norm`` or ``ln`` to the cap; ``adamw_output_layer=True`` sends the last
    layer's leaves (a pytree shares nothing: its output layer is its last
    layer); ``adamw_params`` is a predicate over leaf paths
    (``"params/Dense_0/bias"``) that sends matching leaves to the cap. A flax
    head tied to the embedding (``nn.Embed.attend``) has no leaf of its own, so
    ``adamw_output_layer`` cannot see it: send the embedding with
    ``adamw_params=lambda path: path == "params/wte/embedding"``. A bare array
    as ``params`` is one layer, ``"<root>"``, whose leaf is named ``"0"``.
    """
    check_last_n_layers(last_n_layers)
    check_flag("adamw_norm_layers", adamw_norm_layers)
    check_flag("adamw_output_layer", adamw_output_layer)
    bare = hasattr(params, "shape") and hasattr(params, "dtype")
    layers = tree_layers([params] if bare else params)
    if not layers:
        raise ValueError("params has no array leaves: STAC needs at least one parameter")
    split = split_layers(layers, last_n_layers, adamw_norm_layers=adamw_norm_layers,
                         adamw_output_layer=adamw_output_layer, adamw_params=adamw_params)
    label_by_path = {path[1:] if bare else path: role
                     for role, part in (("sign", split.sign_layers), ("adamw", split.adamw_layers))
                     for layer in part for path in layer.parameters}
    return PytreePartition(split.sign_layer_names, split.adamw_layer_names, label_by_path)


class SignMomentumState(NamedTuple):
    """State of ``scale_by_sign_momentum``."""

    momentum: optax.Updates  # m, stored in sign_state_dtype


def scale_by_sign_momentum(sign_momentum, sign_state_dtype=None):
    """``sign(m)`` with ``m <- beta m + (1 - beta) g`` (``sign(g)`` and no state when beta = 0).

    m is updated in float32 at least and stored in ``sign_state_dtype``
    (default: the parameter's). ``update(..., finite=flag)``: when the 0-d
    ``flag`` is False the step is taken with g = 0 and beta = 1, which leaves m
    exactly as it was (see ``skip_nonfinite_steps``).
    """

    def init(params):
        if sign_momentum == 0:
            return optax.EmptyState()
        return SignMomentumState(jax.tree.map(lambda p: jnp.zeros_like(p, dtype=sign_state_dtype or p.dtype), params))

    def update(updates, state, params=None, finite=True):
        del params
        if sign_momentum == 0:
            return jax.tree.map(jnp.sign, updates), state
        beta, grad_weight = skip_weights(finite, sign_momentum)

        def leaf(grad, momentum):
            dtype = scalar_dtype(grad)
            g = jnp.where(finite, grad, 0).astype(dtype)
            # m stays finite in its dtype; a 16-bit m has the sign of its float32 value (same exponent range)
            new_momentum = saturated((beta * momentum.astype(dtype) + grad_weight * g).astype(momentum.dtype))
            return jnp.sign(new_momentum).astype(grad.dtype), new_momentum

        per_leaf = jax.tree.map(leaf, updates, state.momentum)
        direction, momentum = (jax.tree.map(lambda _, out: out[i], updates, per_leaf) for i in range(2))
        return direction, SignMomentumState(momentum)

    return optax.GradientTransformationExtraArgs(init, update)


class SNRSignState(NamedTuple):
    """State of ``scale_by_snr_sign``."""

    count: jax.Array  # int32, steps taken
    momentum: optax.Updates  # m, stored in sign_state_dtype
    grad_sq_mean: optax.Updates  # per tensor (0-d): v, EMA of mean(g^2)


def scale_by_snr_sign(sign_momentum, b2, eps, sign_state_dtype=None):
    """``s * sign(m)`` per tensor, ``s = mean|m_hat| / (sqrt(v_hat) + eps)`` (STAC's ``sign_step_scale="snr"``).

    ``m <- beta m + (1 - beta) g`` and ``v <- b2 v + (1 - b2) mean(g^2)``, both
    bias-corrected in ``s``; see ``stac_stam.torch.stac.sign_update`` for why.
    mean|m| is taken of m as stored: with a 16-bit ``sign_state_dtype`` that is
    the rounded m (the PyTorch STAC takes it before rounding; they differ by
    at most 2^-9 relative in bfloat16), so the step reads no float32 copy of m.
    ``update(..., finite=flag)`` as in ``scale_by_sign_momentum``.
    """

    def init(params):
        return SNRSignState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=sign_state_dtype or p.dtype), params),
            grad_sq_mean=jax.tree.map(lambda p: jnp.zeros([], scalar_dtype(p)), params))

    def update(updates, state, params=None, finite=True):
        del params
        count = jnp.where(finite, optax.safe_increment(state.count), state.count)
        beta, grad_weight = skip_weights(finite, sign_momentum)
        b2_step, b2_complement = skip_weights(finite, b2)

        def leaf(grad, momentum, grad_sq_mean):
            dtype, size = grad_sq_mean.dtype, max(grad.size, 1)  # an empty leaf's means are 0, not NaN
            # The mean of g itself, dropped on a skipped step: a mean of the zeroed g made XLA write that g out.
            square_mean = jnp.where(finite, jnp.sum(jnp.square(grad.astype(dtype))) / size, 0)
            new_momentum = beta * momentum.astype(dtype) + grad_weight * jnp.where(finite, grad, 0).astype(dtype)
            # m is written first (in place, kept within its dtype's range); then mean|m| and the step read the
            # stored m, each behind a barrier of its own. Computing m again for each, XLA wrote a float32 m out
            # and copied the old one; sharing one read, it wrote a float32 copy of a bf16 m out (256 and
            # 192 MiB of temporaries on 4 x 4096^2, 2.9x optax.adamw's step; 1.2x so). A 16-bit m has the sign
            # of its float32 value (the same exponents); mean|m| is the mean of the rounded m.
            stored = jax.lax.optimization_barrier(saturated(new_momentum.astype(momentum.dtype)))
            momentum_size = jnp.sum(jnp.abs(jax.lax.optimization_barrier(stored).astype(dtype))) / size
            grad_sq_mean = b2_step * grad_sq_mean + b2_complement * square_mean
            t = count.astype(dtype)
            # A scale that overflows (|g| > 1.8e19 makes v pass float32) is 0 for this step, and v is stored at
            # the largest float32, as the PyTorch STAC stores it.
            scale = momentum_size / (1 - sign_momentum ** t) / (jnp.sqrt(grad_sq_mean / (1 - b2 ** t)) + eps)
            scale = jnp.where(jnp.isfinite(scale), scale, 0)
            return (scale * jnp.sign(stored).astype(dtype)).astype(grad.dtype), stored, saturated(grad_sq_mean)

        per_leaf = jax.tree.map(leaf, updates, state.momentum, state.grad_sq_mean)
        direction, momentum, grad_sq_mean = (jax.tree.map(lambda _, out: out[i], updates, per_leaf) for i in range(3))
        return direction, SNRSignState(count, momentum, grad_sq_mean)

    return optax.GradientTransformationExtraArgs(init, update)


class FactoredState(NamedTuple):
    """State of ``scale_by_factored``: PyTorch's ``step``, ``exp_avg_sq_row``, ``exp_avg_sq_col``,
    ``momentum_buffer`` and ``momentum_scale`` (the last two None without momentum, the scales None unless the
    momentum is int8)."""

    count: jax.Array  # int32, steps taken
    row: optax.Updates  # per tensor: EMA of the row means of g^2 (factored_shape's rows)
    column: optax.Updates  # per tensor: EMA of the column means of g^2
    momentum: optax.Updates  # m of the normalized step, in sign_state_dtype (int8: codes), or None
    momentum_scale: optax.Updates  # int8 momentum: one scale per row, or None


def scale_by_factored(sign_momentum, b2, eps, sign_state_dtype=None):
    """Adafactor's normalized step (STAC's ``sign_step_scale="factored"``; see
    ``stac_stam.torch.stac.sign_update``), each tensor seen as the matrix ``factored_shape`` gives::

        R <- b2 R + (1 - b2) rowmean(g^2),   C <- b2 C + (1 - b2) colmean(g^2)
        u  = g / (sqrt(R C^T / mean(R) / (1 - b2^t)) + eps),   u <- u / max(1, rms(u))
        direction u, or with momentum m <- beta m + (1 - beta) u and direction m

    ``sign_state_dtype=jnp.int8`` keeps m as int8 codes with one scale per row
    (scale = the row's max |m| / 127, codes rounded to nearest, ties to even).
    ``update(..., finite=flag)`` as in ``scale_by_sign_momentum``; the int8
    codes of a skipped step are kept by a select.
    """
    int8 = sign_state_dtype is not None and jnp.dtype(sign_state_dtype) == jnp.int8

    def init(params):
        shapes = jax.tree.map(lambda p: factored_shape(p.shape), params)
        zeros = lambda index: jax.tree.map(  # noqa: E731
            lambda p, shape: jnp.zeros([shape[index]], scalar_dtype(p)), params, shapes)
        momentum = scale = None
        if sign_momentum != 0:
            momentum = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=sign_state_dtype or p.dtype), params)
            scale = zeros(0) if int8 else None
        return FactoredState(jnp.zeros([], jnp.int32), zeros(0), zeros(1), momentum, scale)

    def update(updates, state, params=None, finite=True):
        del params
        count = jnp.where(finite, optax.safe_increment(state.count), state.count)
        b2_step, b2_complement = skip_weights(finite, b2)
        beta, grad_weight = skip_weights(finite, sign_momentum)

        def leaf(grad, row, column, momentum=None, scale=None):
            dtype = row.dtype
            rows, columns = factored_shape(grad.shape)
            g = jnp.where(finite, grad, 0).astype(dtype)
            square = jnp.square(g).reshape(rows, columns)
            largest = jnp.finfo(dtype).max
            row = jnp.minimum(b2_step * row + b2_complement * jnp.sum(square, 1) / max(columns, 1), largest)
            column = jnp.minimum(b2_step * column + b2_complement * jnp.sum(square, 0) / max(rows, 1), largest)
            # R / mean(R) as (R / max R) / mean(R / max R): a mean of float32 maxima would overflow. Both scaled by
            # 2^-64 first when large: XLA's CPU divides through a reciprocal, which flushes 1 / 3e38 to 0.
            top = jnp.max(row, initial=0)
            shrink = jnp.where(top > 2.0 ** 64, 2.0 ** -64, 1.0).astype(dtype)
            relative = row * shrink / jnp.maximum(top * shrink, jnp.finfo(dtype).tiny)
            row_mean = jnp.maximum(jnp.mean(relative), jnp.finfo(dtype).tiny) if rows else jnp.ones([], dtype)
            # Divided in turn: row_mean (>= tiny) times 1 - b2^t can be subnormal, which XLA's CPU flushes to 0.
            row_rms = jnp.sqrt(relative / row_mean / (1 - b2 ** count.astype(dtype)))
            u = g / (jnp.outer(row_rms, jnp.sqrt(column)) + eps).reshape(grad.shape)
            u = u / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(u)) / max(u.size, 1)), 1)
            if momentum is None:
                return u.astype(grad.dtype), row, column, None, None
            old = momentum.astype(dtype) if scale is None else (
                momentum.astype(dtype).reshape(rows, columns) * scale[:, None]).reshape(grad.shape)
            new = beta * old + grad_weight * u
            if scale is None:
                return new.astype(grad.dtype), row, column, new.astype(momentum.dtype), None
            new_scale = jnp.max(jnp.abs(new.reshape(rows, columns)), axis=1, initial=0) / 127
            codes = jnp.clip(jnp.round(new.reshape(rows, columns) / jnp.maximum(new_scale, jnp.finfo(dtype).tiny)[
                :, None]), -127, 127).reshape(grad.shape).astype(momentum.dtype)
            return (new.astype(grad.dtype), row, column, jnp.where(finite, codes, momentum),
                    jnp.where(finite, new_scale, scale))

        trees = [updates, state.row, state.column] + [tree for tree in (state.momentum, state.momentum_scale)
                                                      if tree is not None]
        per_leaf = jax.tree.map(leaf, *trees)
        out = [jax.tree.map(lambda _, leaf_out: leaf_out[i], updates, per_leaf) for i in range(3)]
        extra = [jax.tree.map(lambda _, leaf_out: leaf_out[i], updates, per_leaf) if tree is not None else None
                 for i, tree in ((3, state.momentum), (4, state.momentum_scale))]
        return out[0], FactoredState(count, out[1], out[2], *extra)

    return optax.GradientTransformationExtraArgs(init, update)


def scale_by_adam(b1, b2, eps):
    """``optax.scale_by_adam``'s direction, written with the same expressions (so the cap equals
    ``optax.adamw``), plus ``update(..., finite=flag)`` as in ``scale_by_sign_momentum`` (b1 = b2 = 1, g = 0)."""

    def init(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params),
                                      nu=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None, finite=True):
        del params
        b1_step, b1_complement = skip_weights(finite, b1)
        b2_step, b2_complement = skip_weights(finite, b2)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, 0), updates)
        mu = jax.tree.map(lambda g, t: b1_complement * g + b1_step * t, grads, state.mu)
        nu = jax.tree.map(lambda g, t: b2_complement * g ** 2 + b2_step * t, grads, state.nu)
        count_inc = optax.safe_increment(state.count)
        mu_hat, nu_hat = optax.tree.bias_correction(mu, b1, count_inc), optax.tree.bias_correction(nu, b2, count_inc)
        direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return direction, optax.ScaleByAdamState(jnp.where(finite, count_inc, state.count), mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)


def _judged(directions):
    """``directions`` (blocks taking ``finite=``) as ``skip_nonfinite_steps`` wants them: each leaf's sum(g^2)
    decides the step (see ``gradients_finite``). The "snr" trunk takes the same sums, and XLA computes each
    once: the trunk's gradients are read once for both (a read of its own, sum(g - g), cost stac_recommended
    about 15% of its step on 4 x 4096^2)."""

    def update(updates, state, params=None):
        leaves = jax.tree.leaves(updates)
        finite = gradients_finite(updates, [jnp.sum(jnp.square(leaf.astype(scalar_dtype(leaf)))) for leaf in leaves])
        direction, state = directions.update(updates, state, params, finite=finite)
        return direction, state, finite

    return optax.GradientTransformation(directions.init, update)


def stac(learning_rate=1e-3, last_n_layers=1, *, sign_momentum=0.9, sign_step_scale=None, sign_state_dtype=None,
         b1=0.9, b2=0.999, betas=None, eps=1e-8, weight_decay=0.0, sign_weight_decay=None, adamw_weight_decay=None,
         sign_learning_rate=None, adamw_norm_layers=False, adamw_output_layer=False, adamw_params=None,
         partition=None):
    r"""STAC as an ``optax.GradientTransformation``: a sign-momentum trunk and an ``optax.adamw`` cap.

    The same algorithm, defaults and learning-rate split as ``stac_optimizer.STAC``
    (PyTorch), in optax spelling (``learning_rate``, ``b1``/``b2`` or ``betas``)::

        trunk:  p <- p (1 - lr_s wd_s);  m <- beta m + (1 - beta) g;  p <- p - lr_s s sign(m)
        cap:    optax.adamw(lr, b1, b2, eps, wd_a)     (equal to torch.optim.AdamW)

    with s = 1, or the per-tensor "snr" scale with ``sign_step_scale="snr"``
    (see ``scale_by_snr_sign``), or Adafactor's normalized step instead of
    s sign(m) with ``sign_step_scale="factored"`` (``scale_by_factored``;
    ``sign_state_dtype=jnp.int8`` for its int8 momentum); ``lr_s = 0.75 * learning_rate`` when there is
    a cap and ``learning_rate`` when every layer is in the trunk, unless
    ``sign_learning_rate`` gives it (either may be a schedule). The partition
    comes from ``stac_partition`` on the params given to ``init`` (call
    ``init`` eagerly on your model's own tree; ``adamw_norm_layers``,
    ``adamw_output_layer`` and ``adamw_params`` go to it), or from
    ``partition=stac_partition(params, ...)`` given explicitly — print
    ``partition.sign_layer_names`` / ``adamw_layer_names`` to check it before the
    first step. ``weight_decay`` is 0.0 by default, as in the PyTorch STAC and
    stac-optimizer 0.1.5. A step whose gradients hold NaN/Inf changes nothing and is
    counted in ``state.nonfinite_skipped_steps``; a gradient whose shape is not
    its parameter's is refused when the update is traced.

    Under ``optax.inject_hyperparams``, which builds the transformation anew
    for every update, give ``partition=`` and list ``last_n_layers`` and
    ``sign_momentum`` (they shape the state) in ``static_args``; the learning
    rates, betas, eps and weight decays can be injected.

    Example::

        partition = stac_partition(params, last_n_layers=1)
        optimizer = stac(learning_rate=1e-3, partition=partition)
        state = optimizer.init(params)
        updates, state = jax.jit(optimizer.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    """
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}")
        if (b1, b2) != (0.9, 0.999) and tuple(betas) != (b1, b2):
            raise ValueError(f"give betas or b1/b2, not both: got betas={betas!r}, b1={b1!r}, b2={b2!r}")
        b1, b2 = betas
    # Both shape the state (which layers have a cap, whether the trunk keeps a momentum): Python numbers only.
    if isinstance(last_n_layers, bool) or not isinstance(last_n_layers, int) or last_n_layers < 0:
        raise ValueError(f"last_n_layers must be an integer >= 0, got {last_n_layers!r} (under "
                         "optax.inject_hyperparams, list it in static_args)")
    if isinstance(sign_momentum, bool) or not isinstance(sign_momentum, (int, float)):
        raise ValueError(f"sign_momentum must be a number in [0, 1), got {sign_momentum!r} (under "
                         "optax.inject_hyperparams, list it in static_args)")
    check_range("learning_rate", learning_rate, 0.0, schedule=True)
    if sign_learning_rate is not None:
        check_range("sign_learning_rate", sign_learning_rate, 0.0, schedule=True)
    check_range("sign_momentum", sign_momentum, 0.0, 1.0, high_open=True)
    check_flag("adamw_norm_layers", adamw_norm_layers)
    check_flag("adamw_output_layer", adamw_output_layer)
    if partition is not None and not isinstance(partition, PytreePartition):
        raise ValueError(f"partition must be a PytreePartition from stac_partition, got {partition!r}")
    if sign_step_scale not in (None, "snr", "factored"):
        raise ValueError(f"sign_step_scale must be None, 'snr' or 'factored', got {sign_step_scale!r}")
    if sign_state_dtype is not None:
        try:
            int8_state = jnp.dtype(sign_state_dtype) == jnp.int8
        except TypeError:
            int8_state = False
        if int8_state and sign_step_scale != "factored":
            raise ValueError("sign_state_dtype=int8 stores the momentum of the factored trunk's normalized step; "
                             "it needs sign_step_scale='factored'")
        if not int8_state:
            check_floating_dtype("sign_state_dtype", sign_state_dtype, None)
    if sign_step_scale == "snr" and sign_momentum == 0:
        raise ValueError("sign_step_scale='snr' scales by the momentum's size; it needs sign_momentum > 0")
    check_range("b1", b1, 0.0, 1.0, high_open=True)
    check_range("b2", b2, 0.0, 1.0, high_open=True)
    check_range("eps", eps, 0.0)
    for name, value in (("weight_decay", weight_decay), ("sign_weight_decay", sign_weight_decay),
                        ("adamw_weight_decay", adamw_weight_decay)):
        if value is not None:
            check_range(name, value, 0.0)

    resolved = {"partition": partition}

    def trunk_learning_rate(count):
        if sign_learning_rate is not None:
            return sign_learning_rate(count) if callable(sign_learning_rate) else sign_learning_rate
        # Read when the update is traced, after init resolved the partition.
        part = resolved["partition"]
        scale = SIGN_LR_SCALE if part.sign_layer_names and part.adamw_layer_names else 1.0
        return scale * (learning_rate(count) if callable(learning_rate) else learning_rate)

    labels = lambda tree: resolved["partition"].labels(tree)  # noqa: E731
    if sign_step_scale == "snr":
        sign_direction = scale_by_snr_sign(sign_momentum, b2, eps, sign_state_dtype)
    elif sign_step_scale == "factored":
        sign_direction = scale_by_factored(sign_momentum, b2, eps, sign_state_dtype)
    else:
        sign_direction = scale_by_sign_momentum(sign_momentum, sign_state_dtype)
    directions = optax.partition({"sign": sign_direction, "adamw": scale_by_adam(b1, b2, eps)}, labels)
    rates = optax.partition({
        "sign": optax.chain(optax.add_decayed_weights(weight_decay if sign_weight_decay is None else sign_weight_decay),
                            optax.scale_by_learning_rate(trunk_learning_rate)),
        "adamw": optax.chain(optax.add_decayed_weights(weight_decay if adamw_weight_decay is None
                                                       else adamw_weight_decay),
                             optax.scale_by_learning_rate(learning_rate)),
    }, labels)
    transformation = skip_nonfinite_steps(_judged(directions), rates)

    def init(params):
        if resolved["partition"] is None:
            resolved["partition"] = stac_partition(params, last_n_layers, adamw_norm_layers=adamw_norm_layers,
                                                   adamw_output_layer=adamw_output_layer, adamw_params=adamw_params)
        return transformation.init(params)

    def update(updates, state, params=None, **extra_args):
        if resolved["partition"] is None:
            raise ValueError(
                "stac has no partition: call init on your model's own parameter tree first, or pass "
                "partition=stac_partition(params, ...) (needed when the transformation is built anew for the "
                "update, as optax.inject_hyperparams does)")
        return transformation.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init, update)


def _scaled(scale, learning_rate):
    """``scale`` times a rate or a schedule."""
    return (lambda count: scale * learning_rate(count)) if callable(learning_rate) else scale * learning_rate


def stac_recommended(learning_rate=3e-3, **overrides):
    """``stac`` at a quarter of AdamW's state, like ``STAC.recommended`` in PyTorch.

    SNR-scaled sign steps (``sign_step_scale="snr"``) with the trunk at
    ``3 * learning_rate``, and the trunk momentum in bfloat16; everything else
    at ``stac``'s defaults, and ``overrides`` go to ``stac`` and win.
    ``learning_rate`` may be a schedule.
    """
    check_range("learning_rate", learning_rate, 0.0, schedule=True)
    options = dict(sign_step_scale="snr", sign_state_dtype=jnp.bfloat16,
                   sign_learning_rate=_scaled(RECOMMENDED_SIGN_LR_SCALE, learning_rate))
    options.update(overrides)
    return stac(learning_rate, **options)


def stac_compact(learning_rate=3e-3, **overrides):
    """``stac`` under a quarter of AdamW's state, like ``STAC.compact`` in PyTorch: the factored trunk
    (``sign_step_scale="factored"``) with an int8 momentum at 3x the cap's rate, the output (last) layer and the
    normalization layers in the AdamW cap; everything else at ``stac``'s defaults, and ``overrides`` go to
    ``stac`` and win. ``learning_rate`` may be a schedule."""
    check_range("learning_rate", learning_rate, 0.0, schedule=True)
    options = dict(sign_step_scale="factored", sign_state_dtype=jnp.int8,
                   sign_learning_rate=_scaled(COMPACT_SIGN_LR_SCALE, learning_rate),
                   adamw_output_layer=True, adamw_norm_layers=True)
    options.update(overrides)
    return stac(learning_rate, **options)


__all__ = ["stac", "stac_recommended", "stac_compact", "stac_partition", "PytreePartition", "scale_by_sign_momentum",
           "scale_by_snr_sign", "scale_by_factored", "scale_by_adam"]
