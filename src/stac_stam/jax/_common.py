"""Pieces STAM and STAMLite (JAX) share: range checks, the non-finite policy, the seed's class API."""

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Below this many elements, per_tensor_sums sums tensors of one size as rows of one stacked array.
SMALL_TENSOR = 1 << 16
# per_tensor_scalars hands out at most this many tensors' entries per variadic reduction.
SCALARS_PER_REDUCTION = 48


def check_range(name, value, low, high=None, *, low_open=False, high_open=False, schedule=False):
    """ValueError naming ``name`` unless ``value`` is a finite real number in the interval (as torch's side
    checks it): a Python or NumPy number, or a 0-d real array; with ``schedule``, a callable (an optax schedule)
    is accepted too.

    A traced array is not checked: under ``jit`` and ``optax.inject_hyperparams``
    hyperparameters are data and the caller owns their values.
    """
    if schedule and callable(value):
        return
    kind = "a number or a schedule" if schedule else "a number"
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if value.ndim != 0 or not (jnp.issubdtype(value.dtype, jnp.floating)
                                   or jnp.issubdtype(value.dtype, jnp.integer)):
            raise ValueError(f"{name} must be {kind}, got an array of dtype {value.dtype} and shape {value.shape}")
        if isinstance(value, jax.core.Tracer):
            return
        number = float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    else:
        number = float(value)
    too_low = number <= low if low_open else number < low
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high or not math.isfinite(number):
        upper = "inf)" if high is None else f"{high}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {upper}, got {value!r}")


def check_eps(value):
    """``eps`` in (0, inf) and, as a number, at least float32's smallest normal number: XLA's CPU flushes smaller
    (subnormal) values to 0, and an eps of 0 divides 0 by 0 where a tensor's gradients are all 0."""
    check_range("eps", value, 0.0, low_open=True)
    tiny = float(jnp.finfo(jnp.float32).tiny)
    if isinstance(value, numbers.Real) and value < tiny:
        raise ValueError(f"eps must be at least {tiny} (float32's smallest normal number: XLA's CPU flushes smaller "
                         f"values to 0), got {value!r}")


def check_flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_interval(name, value):
    """ValueError naming ``name`` unless ``value`` is an integer >= 1 (a Python int or a 0-d integer array;
    a traced one is not checked)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and value.ndim == 0 \
            and jnp.issubdtype(value.dtype, jnp.integer):
        if isinstance(value, jax.core.Tracer) or int(value) >= 1:
            return
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_floating_dtype(name, value, default):
    """``value`` as a floating ``jnp.dtype`` (``default`` when it is None); ValueError naming ``name`` when it is
    not one."""
    try:
        dtype = jnp.dtype(default if value is None else value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype such as jnp.bfloat16, got {value!r}")
    return dtype


def check_gradients(grads, params):
    """ValueError naming the first parameter whose gradient has another shape (or a tree of another structure):
    XLA would broadcast some of them silently. Checked when the update is traced, so a refused update changes
    nothing."""
    if params is None:
        return
    grad_leaves, grad_tree = jax.tree_util.tree_flatten_with_path(grads)
    param_leaves, param_tree = jax.tree_util.tree_flatten_with_path(params)
    if grad_tree != param_tree:
        raise ValueError(f"the gradients' tree is not the parameters': {grad_tree} against {param_tree}")
    for (path, grad), (_, param) in zip(grad_leaves, param_leaves):
        if jnp.shape(grad) != jnp.shape(param):
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
            raise ValueError(f"the gradient of parameter {name or '<root>'!r} has shape {jnp.shape(grad)}, the "
                             f"parameter {jnp.shape(param)}; nothing was updated")


def saturated(x):
    """``x`` with +-Inf replaced by its dtype's largest finite value, +-max: a moment, a weighted average of
    values within that range, exceeds it only by rounding (or by a cast to a narrower dtype), so this keeps it
    finite as the PyTorch optimizers' saturating kernels do. A select, which XLA fuses into the update: with
    ``jnp.clip`` it wrote each new moment out and copied the old one (256 MiB for STAM on 4 x 4096^2)."""
    return jnp.where(jnp.isinf(x), jnp.copysign(jnp.finfo(x.dtype).max, x).astype(x.dtype), x)


def scalar_dtype(param):
    """Tensor-level statistics are kept in at least float32 (float64 for float64 parameters)."""
    return jnp.promote_types(param.dtype, jnp.float32)


def per_tensor_vector(params, value):
    """``value`` once per leaf of ``params``, as one vector in ``jax.tree.leaves`` order.

    STAM and STAMLite keep their tensor-level statistics this way, not as a
    0-d array per leaf: the tensor-level rule then runs as a few vector
    operations, where per leaf it was about ten scalar kernels (launched every
    step, compiled once each). On the benchmark's 195-tensor stack (runs at
    87c93a5 and 0a2e196) this took STAM's step from 1.79x to 1.45x
    ``optax.adamw``'s and STAMLite's from 1.36x to 0.91x, and their compile
    time from 8.5x to 4.2x and 6.4x to 4.4x. The updates read their entries
    through ``per_tensor_scalars``. The dtype is the widest of the leaves'
    ``scalar_dtype``; ``per_tensor`` maps a vector back onto the parameters'
    tree.
    """
    leaves = jax.tree.leaves(params)
    dtype = jnp.result_type(*map(scalar_dtype, leaves)) if leaves else jnp.float32
    return jnp.full([len(leaves)], value, dtype)


def per_tensor(vector, params):
    """A tensor-level state field of STAM or STAMLite (``beta1``, ``variance``, ...) as a pytree like
    ``params``, one 0-d array per leaf: ``per_tensor(state.inner_state[0].beta1, params)["dense"]["kernel"]``."""
    return jax.tree.unflatten(jax.tree.structure(params), list(vector))


def per_tensor_sums(elementwise, operands, dtype):
    """``[sum(elementwise(*tensors)) for tensors in zip(*operands)]`` as one vector of ``dtype`` (empty when
    the lists in ``operands`` are), for an element-wise ``elementwise`` that returns ``dtype``.

    Tensors under ``SMALL_TENSOR`` elements are stacked by size (and dtype) *before*
    ``elementwise`` runs, and each stack is summed as one row reduction: on
    XLA's CPU backend a reduction of a small tensor is about three kernel
    launches, and biases and norms are half of a transformer's tensors.
    Stacked after it, each small tensor's ``elementwise`` was a kernel of its
    own: on the benchmark's 195-tensor stack STAM's step had 1321 fused kernels
    for XLA to compile, 812 stacked first (STAMLite 999 to 618, STAC 722 to 469;
    measured at 9a8094a).
    """
    if not operands[0]:
        return jnp.zeros([0], dtype)
    order, sums, small = [], [], {}
    for index, tensors in enumerate(zip(*operands)):
        if 0 < tensors[0].size < SMALL_TENSOR:
            small.setdefault((tensors[0].size, *(t.dtype for t in tensors)), []).append(index)
        else:
            order.append(index)
            sums.append(jnp.sum(elementwise(*tensors))[None])
    for indices in small.values():
        order += indices
        stacks = [jnp.stack([jnp.ravel(tensors[i]) for i in indices]) for tensors in operands]
        sums.append(jnp.sum(elementwise(*stacks), axis=1))
    return jnp.concatenate(sums)[np.argsort(order)]


def per_tensor_means(elementwise, operands, dtype):
    """``per_tensor_sums`` divided by each tensor's size (an empty tensor's mean is NaN, as ``jnp.mean``'s)."""
    return per_tensor_sums(elementwise, operands, dtype) / np.array([t.size for t in operands[0]], dtype)


def per_tensor_scalars(*vectors):
    """``[tuple(v[i] for v in vectors) for i in range(n)]``: each tensor's entries of ``vectors`` (one
    entry per tensor each) as 0-d arrays that come out of variadic reductions.

    Read as ``v[i]`` in a tensor's update, the index ``i`` would be part of
    that update's fused kernel, and XLA would compile the kernel for that
    tensor alone (5-10 ms each on the CPU: 390 of them were most of STAMLite's
    compile time on a 195-tensor model). Out of a reduction the entries are
    buffers of their own, and all tensors of one shape share one kernel. Each
    entry is summed with -0.0 alone, which leaves every value exactly as it
    was (NaN and infinities too; a subnormal may come out as zero, as from any
    arithmetic in XLA's CPU kernels, which flush them). A reduction serves at
    most ``SCALARS_PER_REDUCTION`` tensors: for 195 tensors XLA's CPU compile
    took 1.2 s of CPU time with one reduction, 0.77-0.84 s with four to eight.
    """
    rows = jnp.stack(vectors)
    padding = jnp.full_like(rows[:, :1], -0.0)
    pairs = [jnp.concatenate([rows[:, i:i + 1], padding], axis=1) for i in range(rows.shape[1])]
    entries = []
    for start in range(0, len(pairs), SCALARS_PER_REDUCTION):
        chunk = pairs[start:start + SCALARS_PER_REDUCTION]
        entries += jax.lax.reduce(chunk, [jnp.array(-0.0, rows.dtype)] * len(chunk),
                                  lambda xs, ys: [x + y for x, y in zip(xs, ys)], (1,))
    return [tuple(tensor_entries) for tensor_entries in entries]


class SkipNonfiniteState(NamedTuple):
    """State of ``skip_nonfinite_steps``."""

    inner_state: Any
    nonfinite_skipped_steps: jax.Array  # int32: steps skipped because a gradient held NaN or Inf


def _count_skip(state, finite):
    """``state.nonfinite_skipped_steps``, one more when the step is not ``finite``."""
    return state.nonfinite_skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32)


def skip_nonfinite_steps(scaling, *rest):
    """``optax.chain(scaling, *rest)`` under the library's non-finite policy: a step whose gradients hold NaN or
    Inf changes nothing and is counted in ``nonfinite_skipped_steps``, without a ``lax.cond``.

    ``scaling.update(updates, state, params)`` returns ``(direction, state,
    finite)``: it judges the step itself (see ``gradients_finite``) and, when
    ``finite`` is False, returns its state exactly as it was; STAM's,
    STAMLite's and STAC's blocks do, by taking that step with g = 0 and
    beta1 = b2 = 1. The state of ``rest`` (small: a schedule's count) is kept
    here by a select, and the updates are zero. Under ``lax.cond`` XLA's CPU
    backend writes the updates out and copies moments between the branches'
    buffers: STAM's step took 2.0x the time it takes without a skip on
    4 x 4096^2 parameters, STAMLite's 2.6x. ``inner_state`` is the chain's
    tuple. Keyword arguments of ``update`` beyond ``params`` go to ``rest``
    (optax's ``GradientTransformationExtraArgs``), and gradients of another
    shape than their parameters are refused (``check_gradients``).
    """
    rest = optax.chain(*rest)

    def init(params):
        return SkipNonfiniteState((scaling.init(params), *rest.init(params)), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, **extra_args):
        check_gradients(updates, params)
        scaling_state, *rest_state = state.inner_state
        direction, scaling_state, finite = scaling.update(updates, scaling_state, params)
        new_updates, new_rest_state = rest.update(direction, tuple(rest_state), params, **extra_args)
        new_rest_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_rest_state, tuple(rest_state))
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, 0), new_updates)
        return new_updates, SkipNonfiniteState((scaling_state, *new_rest_state), _count_skip(state, finite))

    return optax.GradientTransformationExtraArgs(init, update)


def skip_weights(finite, beta):
    """``(beta, 1 - beta)`` for a step, ``(1, 0)`` for a skipped one: ``beta m + (1 - beta) g`` then keeps m
    exactly (with g zeroed). The complement is taken in Python's float64, as optax takes it."""
    return jnp.where(finite, beta, 1), jnp.where(finite, 1 - beta, 0)


def gradients_finite(grads, statistics, rare=None, usual=None):
    """True (a 0-d bool array) when no leaf of ``grads`` holds a NaN or an Inf, judged from ``statistics``.

    ``statistics`` are vectors of per-leaf means the step takes anyway, each of
    a value that is NaN or Inf wherever g is (``g - mu``, ``g^2``): a mean over a leaf
    holding a NaN or an Inf is not finite, so finite statistics prove finite
    gradients without a pass of their own (that pass took 10 of STAM's 103 ms
    on 4 x 4096^2 parameters). A statistic that is not finite may still come
    from finite gradients (its square overflowed, or the leaf is empty); only
    then does ``all_finite_flag`` read the gradients, under a ``lax.cond``
    whose result is one bool. The cond is also what keeps XLA from fusing
    every tensor's statistics into every consumer of the flag: with the flag
    taken straight from the statistics, STAM on 195 tensors took 417 s to
    compile.

    With ``rare`` (a function of ``grads``) it returns ``(flag, rare(grads))``
    from that path and ``(True, usual)`` from the other: a step that needs a
    second look at its gradients takes it under the same cond (a cond of its
    own over the gradients made XLA copy them: 256 MiB for STAMLite on
    4 x 4096^2).
    """
    statistics = jax.tree.leaves(statistics)
    if not statistics and rare is None:
        return jnp.array(True)
    statistics_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(statistic)) for statistic in statistics]))
    if rare is None:
        return jax.lax.cond(statistics_finite, lambda _: jnp.array(True), all_finite_flag, grads)
    return jax.lax.cond(statistics_finite, lambda _: (jnp.array(True), usual),
                        lambda tree: (all_finite_flag(tree), rare(tree)), grads)


def all_finite_flag(tree):
    """True (a 0-d bool array) when no leaf holds a NaN or an Inf.

    Each leaf's ``sum(leaf - leaf)`` is 0 when the leaf is finite and NaN
    otherwise (Inf - Inf is NaN, and a NaN survives the sum); it cannot
    overflow, and XLA's CPU sum runs about 3.5x faster than
    ``all(isfinite(leaf))`` (2.7 against 9.9 ms on a 16.7M tensor).
    """
    leaves = jax.tree.leaves(tree)
    differences = per_tensor_sums(lambda leaf: (leaf - leaf).astype(jnp.float32), (leaves,), jnp.float32)
    return jnp.all(jnp.isfinite(differences))


def all_finite(tree):
    return bool(all_finite_flag(tree))


class SeedOptimizer:
    """The seed's object API over an optax transformation.

    ``updates, state = opt.update(grads, state, params)`` returns updates the
    user *subtracts* (``params - updates``), as seed 002's quickstart does; they
    are the negated optax updates. The update is one jitted computation over the
    whole pytree. ``hyperparameters`` holds the factory's arguments; ``copy``,
    ``deepcopy`` and ``pickle`` keep them and ``error_if_nonfinite``, and rebuild
    the transformation from them.
    """

    def __init__(self, factory, hyperparameters, error_if_nonfinite):
        self.hyperparameters = dict(hyperparameters)
        self.transformation = factory(**self.hyperparameters)
        check_flag("error_if_nonfinite", error_if_nonfinite)
        self.error_if_nonfinite = error_if_nonfinite
        self._update = jax.jit(self._subtractive_update)

    def __getstate__(self):
        return {"hyperparameters": self.hyperparameters, "error_if_nonfinite": self.error_if_nonfinite}

    def __setstate__(self, state):
        type(self).__init__(self, **state["hyperparameters"], error_if_nonfinite=state["error_if_nonfinite"])

    def _subtractive_update(self, grads, state, params):
        updates, state = self.transformation.update(grads, state, params)
        return jax.tree.map(jnp.negative, updates), state

    def init(self, params):
        return self.transformation.init(params)

    def update(self, grads, state, params=None):
        if self.error_if_nonfinite and not all_finite(grads):
            raise FloatingPointError(
                f"{type(self).__name__}: a gradient holds NaN or Inf (error_if_nonfinite=True); "
                "no update was computed and the state is unchanged")
        return self._update(grads, state, params)
