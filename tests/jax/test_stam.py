"""STAM for JAX, held to the float64 reference, to optax.adamw and to the golden vectors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from stac_stam.jax import STAM, per_tensor, stam
from stac_stam.jax.stam import VARIANCE_CAP

GOLDEN = json.loads((pathlib.Path(__file__).resolve().parents[1] / "golden" / "stam.json").read_text())


def golden_inputs(case, dtype):
    params = {e["name"]: jnp.asarray(e["value"], dtype).reshape(e["shape"]) for e in case["params"]}
    grads = [{e["name"]: jnp.asarray(g, dtype).reshape(e["shape"]) for e, g in zip(case["params"], step)}
             for step in case["grads"]]
    return params, grads


def test_the_constants_the_reference_fixes():
    assert VARIANCE_CAP == reference.STAM_VARIANCE_CAP


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_golden_vectors_float32(case):
    schedule = jnp.asarray(case["learning_rates"])
    optimizer = stam(learning_rate=lambda count: schedule[count], **case["hyperparams"])
    params, grads = golden_inputs(case, jnp.float32)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for step_grads, expected in zip(grads, case["expected"]):
        updates, state = update(step_grads, state, params)
        params = optax.apply_updates(params, updates)
        for entry, values in zip(case["params"], expected):
            np.testing.assert_allclose(np.ravel(params[entry["name"]]), values, rtol=2e-6, atol=2e-7)
    inner = state.inner_state[0]
    for entry, scalars in zip(case["params"], case["expected_state"]):
        for key, value in scalars.items():
            np.testing.assert_allclose(per_tensor(getattr(inner, key), params)[entry["name"]], value, rtol=1e-5)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_every_step_and_state_match_the_float64_reference(case):
    with jax.enable_x64(True):
        optimizer = stam(learning_rate=lambda count: jnp.asarray(case["learning_rates"])[count],
                         **case["hyperparams"])
        params, grads = golden_inputs(case, jnp.float64)
        ref_params = {k: np.asarray(v) for k, v in params.items()}
        ref_states = {k: {} for k in params}
        state = optimizer.init(params)
        for step_grads, lr in zip(grads, case["learning_rates"]):
            updates, state = optimizer.update(step_grads, state, params)
            params = optax.apply_updates(params, updates)
            inner = state.inner_state[0]
            for name in params:
                ref_params[name] = reference.stam_step(ref_params[name], np.asarray(step_grads[name]),
                                                       ref_states[name], lr=lr, **case["hyperparams"])
                np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-12, atol=1e-13)
                np.testing.assert_allclose(inner.mu[name], ref_states[name]["mu"], rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(inner.nu[name], ref_states[name]["nu"], rtol=1e-12, atol=1e-16)
                for key in ("variance", "scale", "beta1", "beta1_product"):
                    np.testing.assert_allclose(per_tensor(getattr(inner, key), params)[name], ref_states[name][key],
                                               rtol=1e-12)


def test_no_adaptation_is_optax_adamw_in_float64():
    with jax.enable_x64(True):
        params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float64).reshape(3, 4), "b": jnp.ones(4, jnp.float64)}
        ours, theirs = stam(learning_rate=1e-2, adapt_strength=0.0, weight_decay=0.1), optax.adamw(
            1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
        a, b = params, params
        sa, sb = ours.init(a), theirs.init(b)
        for step in range(5):
            grads = jax.tree.map(lambda p: jnp.sin(p * (step + 1)), params)
            ua, sa = ours.update(grads, sa, a)
            ub, sb = theirs.update(grads, sb, b)
            a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
        for key in params:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-14, atol=1e-15)


def test_variance_cap_is_active_on_the_first_step():
    # tau starts at 0, so on step 1 sigma^2 = 1e-3 mean(g^2) exceeds 10 tau^2 = 1e-3 mean(|g|)^2.
    params = {"w": jnp.zeros(16)}
    grads = {"w": jnp.arange(16.0) - 3.0}
    optimizer = stam(adapt_strength=0.5)
    _, state = optimizer.update(grads, optimizer.init(params), params)
    (variance,), (scale,), (beta1,) = (state.inner_state[0].variance, state.inner_state[0].scale,
                                       state.inner_state[0].beta1)
    np.testing.assert_allclose(variance, VARIANCE_CAP * scale ** 2, rtol=1e-6)
    z = VARIANCE_CAP * scale ** 2 / (scale ** 2 + 1e-8)
    np.testing.assert_allclose(beta1, 0.9 * (1 - 0.5 * z / (1 + z)), rtol=1e-6)


def test_overflowing_statistics_fall_back_to_base_beta1_and_keep_the_state_finite():
    params = {"w": jnp.zeros(4)}
    optimizer = stam(adapt_strength=0.5)
    state = optimizer.init(params)
    _, state = optimizer.update({"w": jnp.ones(4)}, state, params)
    before = state.inner_state[0]
    # Finite in float32, but its square overflows: mean(r^2) is inf.
    updates, state = optimizer.update({"w": jnp.full(4, 1e30)}, state, params)
    inner = state.inner_state[0]
    assert float(inner.beta1[0]) == pytest.approx(0.9)
    assert float(inner.variance[0]) == float(before.variance[0])
    assert float(inner.scale[0]) == float(before.scale[0])
    assert int(state.nonfinite_skipped_steps) == 0
    assert bool(jnp.all(jnp.isfinite(inner.mu["w"])))


def test_beta1_stays_within_its_bounds_under_any_gradients():
    params = {"w": jnp.zeros(8), "v": jnp.zeros(3)}
    optimizer = stam(adapt_strength=0.5, b1_base=0.8)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for step in range(20):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(step), p.shape) * 10.0 ** (step % 5 - 2),
                             params)
        _, state = update(grads, state, params)
        beta1 = state.inner_state[0].beta1
        assert beta1.shape == (2,)
        assert bool(jnp.all((0.8 * 0.5 - 1e-7 <= beta1) & (beta1 <= 0.8 + 1e-7)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=-1.0), r"learning_rate must be in \[0.0, inf\), got -1.0"),
    (dict(b1_base=1.0), r"b1_base must be in \(0.0, 1.0\), got 1.0"),
    (dict(b2=0.0), r"b2 must be in \(0.0, 1.0\), got 0.0"),
    (dict(weight_decay=-0.1), r"weight_decay must be in \[0.0, inf\)"),
    (dict(adapt_strength=0.6), r"adapt_strength must be in \[0.0, 0.5\], got 0.6"),
    (dict(tau_decay=1.5), r"tau_decay must be in \(0.0, 1.0\)"),
    (dict(eps=0.0), r"eps must be in \(0.0, inf\)"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        STAM(**kwargs)
    with pytest.raises(ValueError, match=message):
        stam(**kwargs)


def test_class_api_raises_on_nonfinite_when_asked():
    params = {"w": jnp.zeros(3)}
    optimizer = STAM(error_if_nonfinite=True)
    state = optimizer.init(params)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        optimizer.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params)
    updates, _ = optimizer.update({"w": jnp.ones(3)}, state, params)
    # The seed's convention: the user subtracts the updates, so they point along the gradient.
    assert bool(jnp.all(updates["w"] > 0))
