"""One registry of the library's optax transformations drives the behaviours every one must have."""

import functools
import pickle
import subprocess
import sys
import textwrap

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from stac_stam.jax import per_tensor, stam, stam_lite

# name -> factory(learning_rate, **hyperparameters) of an optax GradientTransformation.
OPTIMIZERS_UNDER_TEST = {
    "stam": stam,
    "stam_lite": functools.partial(stam_lite, beta1_update_interval=2),
}
NAMES = sorted(OPTIMIZERS_UNDER_TEST)
# name -> (float64 reference step of one tensor, the tensor-level state fields it keeps, the hyperparameters
# that keep every state in float64).
REFERENCES = {
    "stam": (reference.stam_step, ("variance", "scale", "beta1", "beta1_product"), {}),
    "stam_lite": (functools.partial(reference.stam_lite_step, beta1_update_interval=2),
                  ("grad_mean", "grad_sq_mean", "beta1", "beta1_product"), {"state_dtype": jnp.float64}),
}


def make(name, **hyperparameters):
    return OPTIMIZERS_UNDER_TEST[name](**{"learning_rate": 1e-2, **hyperparameters})


def make_params():
    return {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.zeros(4)},
            "scale": jnp.ones(())}


def grads_at(step, params):
    return jax.tree.map(lambda p: jnp.cos(p * 3.0 + step) + 0.1 * step, params)


def run(optimizer, steps=4, params=None, update=None):
    params = make_params() if params is None else params
    state = optimizer.init(params)
    update = update or jax.jit(optimizer.update)
    for step in range(steps):
        updates, state = update(grads_at(step, params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def assert_trees_close(a, b, **tolerance):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


@pytest.mark.parametrize("name", NAMES)
def test_jitted_equals_eager_and_does_not_recompile(name):
    optimizer = make(name)
    traces = []

    def counted_update(grads, state, params):
        traces.append(1)
        return optimizer.update(grads, state, params)

    jitted, _ = run(optimizer, update=jax.jit(counted_update))
    eager, _ = run(optimizer, update=optimizer.update)
    assert len(traces) == 1
    assert_trees_close(jitted, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_matches_and_changing_them_does_not_recompile(name):
    injected = optax.inject_hyperparams(OPTIMIZERS_UNDER_TEST[name])(learning_rate=1e-2, adapt_strength=0.3)
    plain = make(name, adapt_strength=0.3)
    # Hyperparameters as arrays instead of folded constants: float32 rounding differs slightly.
    assert_trees_close(run(injected)[0], run(plain)[0], rtol=1e-5, atol=1e-7)

    traces = []
    params = make_params()
    state = injected.init(params)

    @jax.jit
    def update(grads, state, params):
        traces.append(1)
        return injected.update(grads, state, params)

    for step in range(3):
        state.hyperparams["learning_rate"] = jnp.asarray(1e-2 / (step + 1))
        state.hyperparams["adapt_strength"] = jnp.asarray(0.1 * step)
        _, state = update(grads_at(step, params), state, params)
    assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps_accumulation_equals_one_step_on_the_mean_gradient(name):
    params = make_params()
    accumulated = optax.MultiSteps(make(name), every_k_schedule=2)
    state = accumulated.init(params)
    g0, g1 = grads_at(0, params), grads_at(1, params)
    updates0, state = accumulated.update(g0, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates0))
    updates, _ = accumulated.update(g1, state, params)
    single = make(name)
    expected, _ = single.update(jax.tree.map(lambda a, b: (a + b) / 2, g0, g1), single.init(params), params)
    assert_trees_close(updates, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_clipping_schedules_and_masks(name):
    clipped = optax.chain(optax.clip_by_global_norm(1e-3), make(name))
    assert jax.tree.structure(run(clipped)[0]) == jax.tree.structure(make_params())
    schedule = optax.linear_schedule(1e-2, 0.0, 4)
    scheduled_final, _ = run(make(name, learning_rate=schedule), steps=6)
    after_four, _ = run(make(name, learning_rate=schedule), steps=4)
    assert_trees_close(scheduled_final, after_four, rtol=0, atol=0)  # learning rate 0 after step 4
    # Weight decay only where the mask says so: with zero gradients only masked leaves move.
    params = make_params()
    masked = make(name, weight_decay=0.5, mask={"dense": {"kernel": True, "bias": False},
                                                                  "scale": False})
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = masked.update(zero, masked.init(params), params)
    assert bool(jnp.any(updates["dense"]["kernel"] != 0))
    assert float(updates["scale"]) == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("bad_value", [jnp.inf, jnp.nan])
def test_nonfinite_step_changes_nothing_and_is_counted(name, steps_before, bad_value):
    # A schedule, so the learning-rate block has a step count of its own that must not move either.
    optimizer = make(name, learning_rate=optax.linear_schedule(1e-2, 0.0, 10))
    params, state = run(optimizer, steps=steps_before)
    bad = jax.tree.map(jnp.ones_like, params)
    bad["dense"]["bias"] = bad["dense"]["bias"].at[1].set(bad_value)
    updates, new_state = jax.jit(optimizer.update)(bad, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    jax.tree.map(lambda new, old: np.testing.assert_array_equal(new, old), new_state.inner_state, state.inner_state)
    assert int(new_state.nonfinite_skipped_steps) == int(state.nonfinite_skipped_steps) + 1
    # The next finite step is the step the optimizer would have taken without the bad one.
    good = grads_at(steps_before, params)
    assert_trees_close(jax.jit(optimizer.update)(good, new_state, params)[0],
                       jax.jit(optimizer.update)(good, state, params)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_finite_gradients_whose_statistics_overflow_are_not_skipped(name):
    # Finiteness is judged from the step's tensor means; 1e30 is finite in float32, its square is not.
    optimizer = make(name)
    params, state = run(optimizer, steps=2)
    huge = jax.tree.map(lambda p: jnp.full_like(p, 1e30), params)
    updates, new_state = jax.jit(optimizer.update)(huge, state, params)
    assert int(new_state.nonfinite_skipped_steps) == 0
    assert int(new_state.inner_state[0].count) == int(state.inner_state[0].count) + 1
    assert all(bool(jnp.all(jnp.isfinite(u) & (u != 0))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_leaf_is_not_a_nonfinite_gradient(name):
    # The mean over an empty leaf is NaN, so the step's finiteness is settled by reading the gradients.
    params = {**make_params(), "empty": jnp.zeros((0, 3))}
    optimizer = make(name)
    updates, state = jax.jit(optimizer.update)(grads_at(0, params), optimizer.init(params), params)
    assert int(state.nonfinite_skipped_steps) == 0
    assert bool(jnp.all(updates["dense"]["kernel"] != 0))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("name", NAMES)
def test_each_tensor_keeps_its_own_statistics_whatever_its_size_and_place_in_the_tree(name):
    # Small tensors are summed stacked by size and put back in tree order; a large one is summed alone.
    shapes = {"large": (300, 256), "b": (7,), "c": (3, 5), "d": (7,), "e": (15,), "f": ()}
    with jax.enable_x64(True):
        params = {key: jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float64).reshape(shape) * (i + 1))
                  for i, (key, shape) in enumerate(shapes.items())}
        reference_step, fields, float64_state = REFERENCES[name]
        reference_params = {key: np.asarray(value) for key, value in params.items()}
        reference_states = {key: {} for key in params}
        optimizer = make(name, **float64_state)
        state = optimizer.init(params)
        for step in range(3):
            grads = grads_at(step, params)
            updates, state = jax.jit(optimizer.update)(grads, state, params)
            params = optax.apply_updates(params, updates)
            for key in params:
                reference_params[key] = reference_step(reference_params[key], np.asarray(grads[key]),
                                                       reference_states[key], lr=1e-2)
        inner = state.inner_state[0]
        for key in params:
            np.testing.assert_allclose(params[key], reference_params[key], rtol=1e-12, atol=1e-14)
            for field in fields:
                np.testing.assert_allclose(per_tensor(getattr(inner, field), params)[key],
                                           reference_states[key][field], rtol=1e-12)


def test_per_tensor_scalars_hand_each_tensor_its_entries_bit_for_bit():
    # The update kernels read their coefficients through these; zeros' signs, NaN and infinities included,
    # nothing may change, and no entry may land at another tensor across the reductions' chunks. (Subnormals
    # are left out: XLA's CPU kernels flush them to zero in any arithmetic.)
    from stac_stam.jax._common import SCALARS_PER_REDUCTION, per_tensor_scalars

    specials = np.array([1.5, -0.0, 0.0, np.nan, np.inf, -np.inf, 1.2e-38, -3.4e38, 0.9], np.float32)
    count = 2 * SCALARS_PER_REDUCTION + 5
    values = np.concatenate([specials, np.arange(count - len(specials), dtype=np.float32)])
    others = values[::-1].copy()
    entries = jax.jit(per_tensor_scalars)(jnp.asarray(values), jnp.asarray(others))
    assert len(entries) == len(values)
    for i, (value, other) in enumerate(entries):
        assert np.asarray(value).view(np.uint32) == values[i].view(np.uint32)
        assert np.asarray(other).view(np.uint32) == others[i].view(np.uint32)


def test_per_tensor_sums_stack_small_tensors_without_changing_a_sum():
    # Small tensors of one size (and dtype) are stacked before the element-wise function runs; each sum must
    # still be its own tensor's, in its tensor's place, an empty tensor's 0.
    from stac_stam.jax._common import SMALL_TENSOR, per_tensor_sums

    rng = np.random.default_rng(3)
    shapes_and_dtypes = [((272,), jnp.float32), ((300, 300), jnp.float32), ((272,), jnp.bfloat16), ((0,), jnp.float32),
                         ((3, 5), jnp.float32), ((272,), jnp.float32), ((16, 17), jnp.float32)]
    assert 300 * 300 >= SMALL_TENSOR > 272
    grads = [jnp.asarray(rng.standard_normal(shape), dtype) for shape, dtype in shapes_and_dtypes]
    mus = [jnp.asarray(rng.standard_normal(shape), dtype) for shape, dtype in shapes_and_dtypes]

    def squared_residual(grad, mu):
        return jnp.square((grad - mu).astype(jnp.float32))

    sums = jax.jit(lambda g, m: per_tensor_sums(squared_residual, (g, m), jnp.float32))(grads, mus)
    expected = [np.sum((np.asarray(g, np.float64) - np.asarray(m, np.float64)) ** 2) for g, m in zip(grads, mus)]
    np.testing.assert_allclose(np.asarray(sums), expected, rtol=1e-6)
    assert sums.dtype == jnp.float32 and sums[3] == 0


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_flax_serialization_and_pickle_and_resumes_exactly(name):
    optimizer = make(name)
    params, state = run(optimizer, steps=3)
    template = optimizer.init(params)
    restored = flax.serialization.from_bytes(template, flax.serialization.to_bytes(state))
    pickled = pickle.loads(pickle.dumps(jax.device_get(state)))
    update = jax.jit(optimizer.update)
    outcomes = []
    for resumed in (state, restored, pickled):
        current = params
        for step in range(3, 5):
            updates, resumed = update(grads_at(step, current), resumed, current)
            current = optax.apply_updates(current, updates)
        outcomes.append(current)
    assert_trees_close(outcomes[0], outcomes[1], rtol=0, atol=0)
    assert_trees_close(outcomes[0], outcomes[2], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_init_from_shapes_with_eval_shape(name):
    optimizer = make(name)
    shapes = jax.eval_shape(optimizer.init, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                                                         make_params()))
    concrete = optimizer.init(make_params())
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(lambda a: (a.shape, a.dtype), concrete)


SHARDING_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from stac_stam.jax import stam, stam_lite

    mesh = Mesh(np.array(jax.devices()).reshape(4), ("model",))
    params = {"kernel": jnp.arange(64.0).reshape(8, 8) / 64.0, "bias": jnp.linspace(-1, 1, 8)}
    shardings = {"kernel": NamedSharding(mesh, P("model", None)), "bias": NamedSharding(mesh, P("model"))}
    for make in (stam, stam_lite):
        optimizer = make(learning_rate=1e-2)
        sharded = jax.device_put(params, shardings)
        # init eagerly: state leaves take the parameters' shardings (under jit, XLA would place
        # fresh zeros on one device, for optax's own optimizers too).
        state = optimizer.init(sharded)
        assert state.inner_state[0].mu["kernel"].sharding.is_equivalent_to(shardings["kernel"], 2)
        update = jax.jit(optimizer.update)
        plain, plain_state = params, optimizer.init(params)
        for step in range(3):
            grads = jax.tree.map(lambda p: jnp.sin(p + step), sharded)
            updates, state = update(grads, state, sharded)
            sharded = optax.apply_updates(sharded, updates)
            updates, plain_state = optimizer.update(jax.tree.map(lambda p: jnp.sin(p + step), plain), plain_state,
                                                    plain)
            plain = optax.apply_updates(plain, updates)
        assert sharded["kernel"].sharding.is_equivalent_to(shardings["kernel"], 2)
        assert state.inner_state[0].mu["kernel"].sharding.is_equivalent_to(shardings["kernel"], 2)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), sharded, plain)
    print("sharded ok", len(jax.devices()))
""")


def test_sharded_state_follows_the_parameters_and_matches_the_unsharded_run():
    result = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sharded ok 4" in result.stdout
