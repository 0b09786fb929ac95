"""STAMLite for JAX, held to the float64 reference and to the golden vectors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from stac_stam.jax import STAMLite, per_tensor, stam_lite

GOLDEN = json.loads((pathlib.Path(__file__).resolve().parents[1] / "golden" / "stam_lite.json").read_text())


def golden_inputs(case, dtype):
    params = {e["name"]: jnp.asarray(e["value"], dtype).reshape(e["shape"]) for e in case["params"]}
    grads = [{e["name"]: jnp.asarray(g, dtype).reshape(e["shape"]) for e, g in zip(case["params"], step)}
             for step in case["grads"]]
    return params, grads


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_golden_vectors_float32(case):
    schedule = jnp.asarray(case["learning_rates"])
    optimizer = stam_lite(learning_rate=lambda count: schedule[count], **case["hyperparams"])
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
            np.testing.assert_allclose(per_tensor(getattr(inner, key), params)[entry["name"]], value, rtol=1e-5,
                                       atol=1e-9)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_every_step_and_state_match_the_float64_reference(case):
    with jax.enable_x64(True):
        optimizer = stam_lite(learning_rate=lambda count: jnp.asarray(case["learning_rates"])[count],
                              state_dtype=jnp.float64, **case["hyperparams"])
        params, grads = golden_inputs(case, jnp.float64)
        ref_params = {k: np.asarray(v) for k, v in params.items()}
        ref_states = {k: {} for k in params}
        state = optimizer.init(params)
        for step_grads, lr in zip(grads, case["learning_rates"]):
            updates, state = optimizer.update(step_grads, state, params)
            params = optax.apply_updates(params, updates)
            inner = state.inner_state[0]
            for name in params:
                ref_params[name] = reference.stam_lite_step(ref_params[name], np.asarray(step_grads[name]),
                                                            ref_states[name], lr=lr, **case["hyperparams"])
                np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-12, atol=1e-13)
                np.testing.assert_allclose(inner.mu[name], ref_states[name]["mu"], rtol=1e-12, atol=1e-14)
                for key in ("grad_mean", "grad_sq_mean", "beta1", "beta1_product"):
                    np.testing.assert_allclose(per_tensor(getattr(inner, key), params)[name], ref_states[name][key],
                                               rtol=1e-12, atol=1e-16)


def test_beta1_is_recomputed_only_every_k_steps():
    params = {"w": jnp.zeros(6)}
    optimizer = stam_lite(beta1_update_interval=3, adapt_strength=0.5)
    state = optimizer.init(params)
    used = []
    for step in range(7):
        grads = {"w": jnp.arange(6.0) * (step + 1) - 2.0 * step}
        _, state = optimizer.update(grads, state, params)
        used.append(float(state.inner_state[0].beta1[0]))
    assert used[0] == used[1] == used[2]
    assert used[3] == used[4] == used[5]
    assert used[2] != used[3] and used[5] != used[6]


def test_state_dtype_stores_the_moment_at_low_precision():
    params = {"w": jnp.ones((4, 4))}
    optimizer = stam_lite(state_dtype=jnp.bfloat16)
    state = optimizer.init(params)
    _, state = jax.jit(optimizer.update)({"w": jnp.full((4, 4), 0.3)}, state, params)
    assert state.inner_state[0].mu["w"].dtype == jnp.bfloat16
    assert state.inner_state[0].grad_sq_mean.dtype == jnp.float32


def test_keeps_one_moment_per_parameter_where_adamw_keeps_two():
    params = {"w": jnp.ones((64, 64)), "b": jnp.ones(64)}
    state_bytes = lambda state: sum(leaf.nbytes for leaf in jax.tree.leaves(state))  # noqa: E731
    lite, adamw = state_bytes(stam_lite().init(params)), state_bytes(optax.adamw(1e-3).init(params))
    assert lite < 0.51 * adamw


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=-1e-3), r"learning_rate must be in \[0.0, inf\)"),
    (dict(moment_decay=1.0), r"moment_decay must be in \(0.0, 1.0\), got 1.0"),
    (dict(beta1_update_interval=0), r"beta1_update_interval must be an integer >= 1, got 0"),
    (dict(beta1_update_interval=2.5), r"beta1_update_interval must be an integer >= 1, got 2.5"),
    (dict(state_dtype=jnp.int8), r"state_dtype must be a floating dtype"),
    (dict(adapt_strength=-0.1), r"adapt_strength must be in \[0.0, 0.5\]"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        STAMLite(**kwargs)
