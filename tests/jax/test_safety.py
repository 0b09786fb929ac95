"""Issue 21 on the JAX side, for every optax transformation and seed 002's classes: what construction refuses,
what an update refuses, optax's common expectations (extra args, bare arrays, dtypes, MultiSteps, cond), copies
of the classes, and that no finite gradient makes a parameter or a state NaN."""

import copy
import functools
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference
from stac_stam.jax import STAM, STAMLite, stac, stac_compact, stac_partition, stac_recommended, stam, stam_lite

FACTORIES = {"stac": stac, "stac_recommended": stac_recommended, "stac_compact": stac_compact, "stam": stam,
             "stam_lite": stam_lite}
NAMES = sorted(FACTORIES)
LARGEST = float(jnp.finfo(jnp.float32).max)


def make_params():
    return {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.zeros(4)},
            "head": {"kernel": jnp.linspace(0.5, -0.5, 8).reshape(4, 2)}}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("factory", [stac, stac_recommended, stac_compact, stam, stam_lite, STAM, STAMLite],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("value, message", [
    (math.inf, r"learning_rate must be in \[0.0, inf\), got inf"),
    (math.nan, r"learning_rate must be in \[0.0, inf\), got nan"),
    (-1.0, r"learning_rate must be in \[0.0, inf\), got -1.0"),
    (jnp.array(jnp.inf), r"learning_rate must be in \[0.0, inf\)"),
    ("1e-3", r"learning_rate must be a number or a schedule, got '1e-3'"),
    (None, r"learning_rate must be a number or a schedule, got None"),
    (jnp.ones(2), r"learning_rate must be a number or a schedule, got an array of dtype float32 and shape \(2,\)"),
])
def test_a_bad_learning_rate_is_refused_at_construction(factory, value, message):
    with pytest.raises(ValueError, match=message):
        factory(value)


@pytest.mark.parametrize("factory, kwargs, message", [
    (stam, dict(b2="0.999"), r"b2 must be a number, got '0.999'"),
    (stam, dict(weight_decay=math.inf), r"weight_decay must be in \[0.0, inf\), got inf"),
    (stam, dict(eps=math.inf), r"eps must be in \(0.0, inf\), got inf"),
    (stam, dict(eps=1e-40), r"eps must be at least 1.17\d*e-38 \(float32's smallest normal number"),
    (STAMLite, dict(eps=1e-39), r"eps must be at least 1.17\d*e-38"),
    (stam, dict(adapt_strength=True), r"adapt_strength must be a number, got True"),
    (STAM, dict(tau_decay=[0.9]), r"tau_decay must be a number, got \[0.9\]"),
    (STAM, dict(error_if_nonfinite="yes"), r"error_if_nonfinite must be True or False, got 'yes'"),
    (stam_lite, dict(beta1_update_interval="5"), r"beta1_update_interval must be an integer >= 1, got '5'"),
    (stam_lite, dict(beta1_update_interval=2.0), r"beta1_update_interval must be an integer >= 1, got 2.0"),
    (stam_lite, dict(state_dtype="int8"), r"state_dtype must be a floating dtype"),
    (STAMLite, dict(moment_decay=math.nan), r"moment_decay must be in \(0.0, 1.0\), got nan"),
    (stac, dict(weight_decay=math.inf), r"weight_decay must be in \[0.0, inf\), got inf"),
    (stac, dict(sign_learning_rate=math.inf), r"sign_learning_rate must be in \[0.0, inf\), got inf"),
    (stac, dict(eps="1e-8"), r"eps must be a number, got '1e-8'"),
    (stac, dict(b2=None), r"b2 must be a number, got None"),
    (stac, dict(sign_state_dtype="bfloat"), r"sign_state_dtype must be a floating dtype"),
    (stac, dict(adamw_norm_layers="yes"), r"adamw_norm_layers must be True or False, got 'yes'"),
    (stac, dict(partition={"w": "sign"}), r"partition must be a PytreePartition from stac_partition"),
    (stac_recommended, dict(adamw_weight_decay=-1.0), r"adamw_weight_decay must be in \[0.0, inf\), got -1.0"),
])
def test_bad_hyperparameters_are_refused_at_construction_naming_the_argument(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(1e-3, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_numbers_arrays_and_schedules_are_learning_rates(name):
    for learning_rate in (1e-3, 1, np.float32(1e-3), jnp.array(1e-3), optax.constant_schedule(1e-3)):
        FACTORIES[name](learning_rate)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [3, 300])  # a small tensor (stacked with others) and a large one (alone)
def test_a_gradient_of_another_shape_is_refused_naming_the_parameter(name, size):
    # XLA broadcast a large tensor's (size, ) gradient silently onto a (size, size) parameter.
    params = {"a": {"w": jnp.ones((size, size))}, "b": {"w": jnp.ones(4)}}
    optimizer = FACTORIES[name](1e-3)
    state = optimizer.init(params)
    grads = {"a": {"w": jnp.ones(size)}, "b": {"w": jnp.ones(4)}}
    with pytest.raises(ValueError, match=rf"gradient of parameter 'a/w' has shape \({size},\), the parameter "
                                         rf"\({size}, {size}\)"):
        jax.jit(optimizer.update)(grads, state, params)
    with pytest.raises(ValueError, match="the gradients' tree is not the parameters'"):
        optimizer.update({"a": {"w": jnp.ones((size, size))}}, state, params)


@pytest.mark.parametrize("name", NAMES)
def test_a_bare_array_is_a_params_tree(name):
    # optax's common tests hand optimizers one array; the same array in a dict must step alike.
    param = jnp.array([-1.0, 10.0, 1.0])
    bare, boxed = FACTORIES[name](1e-2), FACTORIES[name](1e-2)
    bare_state, boxed_state = bare.init(param), boxed.init({"w": param})
    bare_update, boxed_update = jax.jit(bare.update), jax.jit(boxed.update)
    for step in range(2):
        grad = jnp.cos(param + step)
        bare_updates, bare_state = bare_update(grad, bare_state, param)
        boxed_updates, boxed_state = boxed_update({"w": grad}, boxed_state, {"w": param})
        np.testing.assert_array_equal(bare_updates, boxed_updates["w"])
        param = param + bare_updates


def test_a_bare_array_is_one_layer_of_stac():
    partition = stac_partition(jnp.ones(3), last_n_layers=0)
    assert partition.sign_layer_names == ("<root>",) and partition.adamw_layer_names == ()
    assert partition.labels(jnp.ones(3)) == "sign"


@pytest.mark.parametrize("name", NAMES)
def test_update_without_params_says_they_are_needed(name):
    # As optax.adamw: decoupled weight decay (and STAC's partition) read the parameters, even at weight_decay=0.
    params = make_params()
    optimizer = FACTORIES[name](1e-3)
    with pytest.raises(ValueError, match="requires the current value of parameters"):
        jax.jit(optimizer.update)(params, optimizer.init(params))  # refused while tracing: nothing compiles


@pytest.mark.parametrize("name", NAMES)
def test_update_takes_extra_args_and_does_not_recompile(name):
    # optax's test_optimizers_accept_extra_args: GradientTransformationExtraArgs, an unexpected keyword ignored.
    optimizer = FACTORIES[name](1e-2)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.tree.map(jnp.cos, params)
        updates, state = optimizer.update(grads, state, params, unexpected_extra_args_your_optimizer_doesnt_expect=1)
        return optax.apply_updates(params, updates), state

    params = make_params()
    state = optimizer.init(params)
    assert isinstance(optimizer, optax.GradientTransformationExtraArgs)
    for _ in range(2):
        params, state = step(params, state)
    assert len(traces) == 1
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", NAMES)
def test_optax_common_expectations_dtypes_multisteps_cond_and_map_params(name):
    dtype = jnp.bfloat16  # optax checks float32 too; bfloat16 is where a dtype slips
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(lambda x: jnp.sum(x.astype(jnp.float32) ** 2))(params)
    optimizer = FACTORIES[name](1e-3)
    # test_preserve_dtype: init jitted, updates in the parameters' dtype.
    state = jax.jit(optimizer.init)(params)
    updates, new_state = jax.jit(optimizer.update)(grads, state, params)
    assert updates.dtype == dtype
    # test_state_shape_dtype_shard_stability: a step and no step have the same state types (lax.cond).
    keep = jax.jit(lambda flag, state: jax.lax.cond(flag, lambda: optimizer.update(grads, state, params)[1],
                                                    lambda: state))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), keep(False, state), state)
    assert jax.tree.map(lambda leaf: leaf.dtype, keep(True, state)) == jax.tree.map(lambda leaf: leaf.dtype, state)
    # test_gradient_accumulation: optax.MultiSteps' first update (of four) is zero.
    accumulated = optax.MultiSteps(optimizer, every_k_schedule=4)
    updates, _ = jax.jit(accumulated.update)(grads, jax.jit(accumulated.init)(params), params)
    np.testing.assert_array_equal(updates, jnp.zeros_like(grads))
    # test_optimizers (tree_map_params): a no-op map over the parameter-shaped state keeps it.
    jax.tree.map(np.testing.assert_array_equal, optax.tree.map_params(optimizer, lambda v: v, new_state), new_state)


@pytest.mark.parametrize("cls", [STAM, STAMLite], ids=lambda c: c.__name__)
def test_the_seed_classes_copy_and_pickle_with_their_settings(cls):
    optimizer = cls(learning_rate=2e-3, b1_base=0.8, weight_decay=0.0, error_if_nonfinite=True)
    for twin in (copy.copy(optimizer), copy.deepcopy(optimizer)):
        assert type(twin) is cls and twin.hyperparameters == optimizer.hyperparameters
        assert twin.error_if_nonfinite is True
    twin = pickle.loads(pickle.dumps(optimizer))
    assert type(twin) is cls and twin.hyperparameters == optimizer.hyperparameters
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    grads = {"w": jnp.sin(params["w"])}
    assert_trees_equal(twin.update(grads, twin.init(params), params),
                       optimizer.update(grads, optimizer.init(params), params))
    with pytest.raises(FloatingPointError):
        twin.update({"w": grads["w"] * jnp.nan}, twin.init(params), params)


def test_stam_lite_moves_a_parameter_by_about_lr_on_a_gradient_whose_square_overflows_float32():
    # mean(g^2) overflows float32: the step used to keep E[g^2] = 0 and divide by eps (1e20 moved a zero
    # parameter to -1e25). As the PyTorch STAMLite (float64 moments, stored saturated): the float64 reference.
    optimizer = stam_lite(1e-3, weight_decay=0.0)
    update = jax.jit(optimizer.update)
    params = {"w": jnp.zeros(4), "b": jnp.ones(3)}
    for gradient in (1e20, 1e30, 3e38):
        check_one_overflowing_step(optimizer, update, params, {"w": jnp.full(4, gradient), "b": jnp.full(3, 0.5)})


def check_one_overflowing_step(optimizer, update, params, grads):
    updates, state = update(grads, optimizer.init(params), params)
    inner = state.inner_state[0]
    assert int(state.nonfinite_skipped_steps) == 0
    for index, key in enumerate(["b", "w"]):  # leaves order
        ref_state = {}
        expected = reference.stam_lite_step(np.asarray(params[key], np.float64), np.asarray(grads[key], np.float64),
                                            ref_state, lr=1e-3, weight_decay=0.0)
        np.testing.assert_allclose(params[key] + updates[key], expected, rtol=1e-5)
        np.testing.assert_allclose(inner.grad_mean[index], ref_state["grad_mean"], rtol=1e-5)
        np.testing.assert_allclose(inner.grad_sq_mean[index], min(ref_state["grad_sq_mean"], LARGEST), rtol=1e-5)
        np.testing.assert_allclose(inner.beta1[index], ref_state["beta1"], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_a_skipped_step_with_overflowing_statistics_leaves_the_state_bit_identical(name):
    # A NaN in one leaf beside a finite gradient whose square overflows (the rare path): nothing changes.
    optimizer = FACTORIES[name](1e-2, **ALL_TRUNK.get(name, {}))
    params = make_params()
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    _, state = update(jax.tree.map(jnp.cos, params), state, params)
    bad = jax.tree.map(lambda p: jnp.full_like(p, 1e30), params)
    bad["head"]["kernel"] = bad["head"]["kernel"].at[0, 0].set(jnp.nan)
    updates, new_state = update(bad, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert_trees_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.nonfinite_skipped_steps) == 1


# Issue 21, root cause 7, decided as in the PyTorch optimizers: from finite gradients no parameter becomes NaN
# or Inf and no state NaN; only an elementwise average of squared gradients (STAM's nu, the AdamW cap's nu) may
# overflow to Inf, where |g| > 1.8e19, and that coordinate then stops moving. STAC's cap is optax.adamw's rule,
# which overflows as optax's does: every layer is in the trunk here.
MAY_HOLD_INF = {"nu"}
ALL_TRUNK = {"stac": dict(last_n_layers=0), "stac_recommended": dict(last_n_layers=0),
             "stac_compact": dict(last_n_layers=0, adamw_output_layer=False, adamw_norm_layers=False),
             "stac_plain": dict(last_n_layers=0, sign_momentum=0.0)}
SAFETY_FACTORIES = {**FACTORIES, "stac_plain": stac}


def check_finite(name, params, state):
    for leaf in jax.tree.leaves(params):
        assert bool(jnp.all(jnp.isfinite(leaf))), f"{name}: a parameter is not finite"
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        fields = {getattr(entry, "name", None) for entry in path}
        assert not bool(jnp.any(jnp.isnan(leaf))), f"{name}: state {path} holds NaN"
        if not fields & MAY_HOLD_INF:
            assert bool(jnp.all(jnp.isfinite(leaf))), f"{name}: state {path} holds Inf"


@pytest.mark.parametrize("name", sorted(SAFETY_FACTORIES))
def test_finite_gradients_never_make_a_parameter_or_a_state_nan(name):
    optimizer = SAFETY_FACTORIES[name](1.0, **ALL_TRUNK.get(name, {}))
    params = make_params()
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for value in (1e38, -LARGEST, LARGEST, -LARGEST, 1e-45, 1e30, 0.0, -1e20):
        updates, state = update(jax.tree.map(lambda p: jnp.full_like(p, value), params), state, params)
        params = optax.apply_updates(params, updates)
        check_finite(name, params, state)
    assert int(state.nonfinite_skipped_steps) == 0


def test_the_factored_trunk_takes_gradients_whose_squares_flush_to_zero():
    # (1e-19)^2 is subnormal in float32, which XLA's CPU flushes to 0: the row statistics were 0, their mean (held
    # at float32's tiny) times 1 - b2^t flushed to 0 too, and 0 / 0 made every trunk parameter NaN.
    optimizer = stac_compact(1e-3, **ALL_TRUNK["stac_compact"])
    params = make_params()
    updates, state = jax.jit(optimizer.update)(jax.tree.map(lambda p: jnp.full_like(p, 1e-19), params),
                                               optimizer.init(params), params)
    check_finite("stac_compact", optax.apply_updates(params, updates), state)
    assert all(bool(jnp.all(u < 0)) for u in jax.tree.leaves(updates))


# Property (hypothesis; bounded, derandomized): hyperparameters in range, gradients 10^U(low, high) with random
# signs and zeros, low <= high in [-45, 30]. The hyperparameters are injected, so each optimizer compiles once.
unit = st.floats(0.01, 0.999)
HYPERPARAMETERS = {
    "stam": st.fixed_dictionaries(dict(learning_rate=st.floats(0.0, 1.0), b1_base=unit, b2=unit,
                                       weight_decay=st.floats(0.0, 10.0), adapt_strength=st.floats(0.0, 0.5),
                                       tau_decay=unit, eps=st.integers(-30, 0).map(lambda e: 10.0 ** e))),
    "stam_lite": st.fixed_dictionaries(dict(learning_rate=st.floats(0.0, 1.0), b1_base=unit,
                                            weight_decay=st.floats(0.0, 10.0), adapt_strength=st.floats(0.0, 0.5),
                                            moment_decay=unit, eps=st.integers(-30, 0).map(lambda e: 10.0 ** e))),
    "stac_recommended": st.fixed_dictionaries(dict(learning_rate=st.floats(0.0, 1.0), b2=unit,
                                                   eps=st.integers(-30, 0).map(lambda e: 10.0 ** e),
                                                   weight_decay=st.floats(0.0, 10.0))),
}
HYPERPARAMETERS["stac_compact"] = HYPERPARAMETERS["stac_recommended"]


def injected_factory(name):
    params = make_params()
    if name.startswith("stac"):  # the preset's trunk, with a trunk-only partition
        factory = optax.inject_hyperparams(FACTORIES[name],
                                           static_args=("sign_state_dtype", "sign_momentum", "last_n_layers"))
        return functools.partial(factory, partition=stac_partition(params, last_n_layers=0))
    return optax.inject_hyperparams(FACTORIES[name])


def random_gradients(params, low, high, seed):
    rng = np.random.default_rng(seed)
    for _ in range(3):
        def draw(p):
            magnitude = 10.0 ** rng.uniform(low, high, p.shape)
            sign = rng.choice([-1.0, 0.0, 1.0], p.shape, p=[0.45, 0.1, 0.45])
            return jnp.asarray((sign * magnitude).astype(np.float32))
        yield jax.tree.map(draw, params)


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
def test_property_finite_gradients_give_finite_parameters_and_no_nan_state(name):
    params = make_params()
    factory = injected_factory(name)
    compiled = {}

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(hyperparameters=HYPERPARAMETERS[name], low=st.integers(-45, 30), spread=st.integers(0, 75),
           seed=st.integers(0, 2 ** 16))
    def check(hyperparameters, low, spread, seed):
        optimizer = factory(**hyperparameters)
        if "update" not in compiled:
            compiled["update"] = jax.jit(optimizer.update)
        state = optimizer.init(params)
        current = params
        for grads in random_gradients(params, low, min(low + spread, 30), seed):
            updates, state = compiled["update"](grads, state, current)
            current = optax.apply_updates(current, updates)
            check_finite(name, current, state)
        assert int(state.inner_state.nonfinite_skipped_steps) == 0

    check()
