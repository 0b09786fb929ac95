"""STAC for optax: the PyTorch STAC's partition and numbers, in a pytree."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from stac_stam.jax import stac, stac_compact, stac_partition, stac_recommended

GOLDEN = {"cases": [case for filename in ("stac.json", "stac_factored.json") for case in json.loads(
    (pathlib.Path(__file__).resolve().parents[1] / "golden" / filename).read_text())["cases"]]}


def golden_tree(case, values, dtype):
    tree = {}
    for entry, value in zip(case["params"], values):
        layer, kind = entry["name"].split(".")
        tree.setdefault(layer, {})[kind] = jnp.asarray(value, dtype).reshape(entry["shape"])
    return tree


def make_stac(case):
    hyper = case["hyperparams"]
    return stac(hyper["lr"], case["last_n_layers"], sign_momentum=hyper.get("sign_momentum", 0.9),
                weight_decay=hyper["weight_decay"], betas=hyper.get("betas"), eps=hyper.get("eps", 1e-8),
                sign_step_scale=hyper.get("sign_step_scale"), sign_state_dtype=hyper.get("sign_state_dtype"))


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_golden_vectors_float32(case):
    optimizer = make_stac(case)
    params = golden_tree(case, [e["value"] for e in case["params"]], jnp.float32)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for grads, expected in zip(case["grads"], case["expected"]):
        updates, state = update(golden_tree(case, grads, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6), params,
                     golden_tree(case, expected, jnp.float32))


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_every_step_matches_the_float64_reference(case):
    hyper = case["hyperparams"]
    with jax.enable_x64(True):
        optimizer = make_stac(case)
        params = golden_tree(case, [e["value"] for e in case["params"]], jnp.float64)
        partition = stac_partition(params, case["last_n_layers"])
        sign_lr, adamw_lr = reference.stac_learning_rates(hyper["lr"], bool(partition.sign_layer_names),
                                                          bool(partition.adamw_layer_names))
        ref = {f"{layer}.{kind}": np.asarray(value) for layer, kinds in params.items() for kind, value in kinds.items()}
        ref_states = {name: {} for name in ref}
        state = optimizer.init(params)
        for grads in case["grads"]:
            grad_tree = golden_tree(case, grads, jnp.float64)
            updates, state = optimizer.update(grad_tree, state, params)
            params = optax.apply_updates(params, updates)
            for name in ref:
                layer, kind = name.split(".")
                g = np.asarray(grad_tree[layer][kind])
                if layer in partition.adamw_layer_names:
                    ref[name] = reference.adamw_step(ref[name], g, ref_states[name], lr=adamw_lr,
                                                     betas=tuple(hyper.get("betas", (0.9, 0.999))),
                                                     eps=hyper.get("eps", 1e-8), weight_decay=hyper["weight_decay"])
                else:
                    ref[name] = reference.sign_step(ref[name], g, ref_states[name], lr=sign_lr,
                                                    sign_momentum=hyper.get("sign_momentum", 0.9),
                                                    sign_step_scale=hyper.get("sign_step_scale"),
                                                    b2=hyper.get("betas", (0.9, 0.999))[1],
                                                    eps=hyper.get("eps", 1e-8), weight_decay=hyper["weight_decay"],
                                                    int8_momentum=hyper.get("sign_state_dtype") == "int8")
                np.testing.assert_allclose(params[layer][kind], ref[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [None, 1e-2])
def test_cap_only_is_optax_adamw(weight_decay):
    # None: stac's default weight decay, 0.0 as in the PyTorch STAC and stac-optimizer 0.1.5.
    params = {"a": {"w": jnp.linspace(-1, 1, 6).reshape(2, 3)}, "b": {"w": jnp.ones(3)}}
    ours = stac(1e-2, last_n_layers=5, **({} if weight_decay is None else {"weight_decay": weight_decay}))
    theirs = optax.adamw(1e-2, weight_decay=weight_decay or 0.0)
    sa, sb = ours.init(params), theirs.init(params)
    a = b = params
    for step in range(4):
        grads = jax.tree.map(lambda p: jnp.cos(p + step), params)
        ua, sa = ours.update(grads, sa, a)
        ub, sb = theirs.update(grads, sb, b)
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    jax.tree.map(np.testing.assert_array_equal, a, b)


class OutOfOrder(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(8, name="zeta")(x))
        x = nn.LayerNorm(name="norm")(x)
        x = nn.tanh(nn.Dense(8, name="alpha")(x))
        return nn.Dense(2, name="mid")(x)


def test_flax_model_partitions_in_definition_order_and_trains():
    model = OutOfOrder()
    inputs = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
    targets = jnp.sin(inputs[:, :2])
    params = model.init(jax.random.PRNGKey(1), inputs)
    partition = stac_partition(params, last_n_layers=1)
    assert partition.sign_layer_names == ("params/zeta", "params/norm", "params/alpha")
    assert partition.adamw_layer_names == ("params/mid",)
    assert stac_partition(params, 1, adamw_norm_layers=True).adamw_layer_names == ("params/norm", "params/mid")
    by_path = stac_partition(params, 1, adamw_params=lambda path: path.endswith("bias"))
    assert "params/zeta" in by_path.sign_layer_names and "params/zeta" in by_path.adamw_layer_names
    # jax.jit returns dicts with sorted keys; the partition found in the model's own tree still holds.
    sorted_params = jax.jit(lambda p: p)(params)
    assert list(sorted_params["params"]) == ["alpha", "mid", "norm", "zeta"]
    labels = partition.labels(sorted_params)
    assert labels["params"]["mid"]["kernel"] == "adamw" and labels["params"]["alpha"]["kernel"] == "sign"

    optimizer = stac(1e-2, partition=partition)
    state = optimizer.init(params)
    loss_fn = lambda p: jnp.mean((model.apply(p, inputs) - targets) ** 2)  # noqa: E731
    traces = []

    @jax.jit
    def train_step(params, state):
        traces.append(1)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(60):
        params, state, loss = train_step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert len(traces) == 1


def test_adamw_output_layer_sends_the_last_layer_to_the_cap_beside_the_trunk():
    # Issue 19: the output layer's weight in the cap whatever last_n_layers says (a pytree shares nothing, so its
    # output layer is its last layer); a tied flax head has no leaf of its own: adamw_params names the embedding.
    params = {"embed": {"embedding": jnp.ones((5, 2))}, "hidden": {"kernel": jnp.ones((2, 2))},
              "head": {"kernel": jnp.ones((2, 5)), "bias": jnp.zeros(5)}}
    partition = stac_partition(params, last_n_layers=0, adamw_output_layer=True)
    assert partition.adamw_layer_names == ("head",) and partition.sign_layer_names == ("embed", "hidden")
    tied = stac_partition(params, last_n_layers=0, adamw_params=lambda path: path == "embed/embedding")
    assert tied.labels(params)["embed"]["embedding"] == "adamw" and tied.labels(params)["head"]["kernel"] == "sign"
    optimizer = stac(1e-2, last_n_layers=0, adamw_output_layer=True)
    state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, _ = optimizer.update(grads, state, params)
    # First steps: the cap's AdamW step is -lr sign(g), the trunk's sign step -0.75 lr sign(g).
    np.testing.assert_allclose(updates["head"]["kernel"], -1e-2, rtol=1e-5)
    np.testing.assert_allclose(updates["hidden"]["kernel"], -0.75e-2, rtol=1e-6)
    with pytest.raises(ValueError, match="adamw_output_layer must be True or False, got 1"):
        stac(1e-2, adamw_output_layer=1)


def test_snr_scaled_trunk_matches_the_float64_reference():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = {"a": {"w": jnp.asarray(rng.standard_normal((3, 4)))}, "b": {"w": jnp.asarray(rng.standard_normal(4))}}
        optimizer = stac(1e-2, sign_step_scale="snr", sign_momentum=0.8, b2=0.99, eps=1e-6, weight_decay=0.1)
        state = optimizer.init(params)
        ref, ref_states = {k: np.asarray(v["w"]) for k, v in params.items()}, {"a": {}, "b": {}}
        for _ in range(5):
            grads = {k: {"w": jnp.asarray(rng.standard_normal(v["w"].shape))} for k, v in params.items()}
            updates, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            ref["a"] = reference.sign_step(ref["a"], np.asarray(grads["a"]["w"]), ref_states["a"], lr=0.75e-2,
                                           sign_momentum=0.8, sign_step_scale="snr", b2=0.99, eps=1e-6,
                                           weight_decay=0.1)
            ref["b"] = reference.adamw_step(ref["b"], np.asarray(grads["b"]["w"]), ref_states["b"], lr=1e-2,
                                            betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
            for key in ref:
                np.testing.assert_allclose(params[key]["w"], ref[key], rtol=1e-12, atol=1e-12)


def test_plain_sign_trunk_keeps_no_momentum_and_sign_state_dtype_is_kept():
    params = {"a": {"w": jnp.ones((4, 4))}, "b": {"w": jnp.ones(4)}}
    plain = stac(1e-2, sign_momentum=0.0).init(params)
    bf16 = stac(1e-2, sign_state_dtype=jnp.bfloat16).init(params)
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))  # noqa: E731
    assert nbytes(plain) < nbytes(bf16) < nbytes(stac(1e-2).init(params))
    assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(bf16))


@pytest.mark.parametrize("options", [{}, {"sign_step_scale": "snr", "sign_state_dtype": jnp.bfloat16},
                                     {"sign_momentum": 0.0}], ids=["default", "snr_bf16", "plain_sign"])
@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("bad_value", [jnp.inf, jnp.nan])
def test_nonfinite_step_changes_nothing_and_is_counted(options, steps_before, bad_value):
    params = {"a": {"w": jnp.linspace(-1, 1, 6).reshape(2, 3)}, "b": {"w": jnp.ones(3)}}
    # Schedules, so the learning-rate blocks have step counts of their own that must not move either.
    optimizer = stac(optax.linear_schedule(1e-2, 0.0, 10), **options)
    update = jax.jit(optimizer.update)
    state = optimizer.init(params)
    for step in range(steps_before):
        updates, state = update(jax.tree.map(lambda p: jnp.cos(p + step), params), state, params)
        params = optax.apply_updates(params, updates)
    bad = {"a": {"w": jnp.ones((2, 3)).at[1, 2].set(bad_value)}, "b": {"w": jnp.ones(3)}}
    updates, new_state = update(bad, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
    assert int(new_state.nonfinite_skipped_steps) == int(state.nonfinite_skipped_steps) + 1
    good = jax.tree.map(lambda p: jnp.sin(p), params)
    jax.tree.map(np.testing.assert_array_equal, update(good, new_state, params)[0], update(good, state, params)[0])


def test_inject_hyperparams_with_an_explicit_partition_matches_and_does_not_recompile():
    # Definition order zeta, alpha: sorted order (what jit hands back) would make zeta the cap.
    params = {"zeta": {"w": jnp.linspace(-1, 1, 6).reshape(2, 3)}, "alpha": {"w": jnp.ones(3)}}
    partition = stac_partition(params)
    injected = optax.inject_hyperparams(stac, static_args=("last_n_layers", "sign_momentum"))(
        learning_rate=1e-2, partition=partition)
    plain = stac(1e-2)
    traces = []

    @jax.jit
    def update(grads, state, params):
        traces.append(1)
        return injected.update(grads, state, params)

    state, plain_state = injected.init(params), plain.init(params)
    for step in range(3):
        state.hyperparams["learning_rate"] = jnp.asarray(1e-2)
        grads = jax.tree.map(lambda p: jnp.cos(p + step), params)
        updates, state = update(grads, state, params)
        expected, plain_state = plain.update(grads, plain_state, params)
        # Hyperparameters as arrays instead of folded constants: float32 rounding differs slightly.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), updates, expected)
    assert len(traces) == 1


def test_update_without_init_or_partition_says_what_to_do():
    params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(3)}}
    state = stac(1e-2).init(params)
    with pytest.raises(ValueError, match="partition"):
        stac(1e-2).update(params, state, params)


@pytest.mark.parametrize("name, other", [("last_n_layers", "sign_momentum"), ("sign_momentum", "last_n_layers")])
def test_state_shaping_arguments_must_be_static_under_inject_hyperparams(name, other):
    params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(3)}}
    injected = optax.inject_hyperparams(stac, static_args=(other,))(learning_rate=1e-2,
                                                                    partition=stac_partition(params))
    with pytest.raises(ValueError, match=f"{name}.*static_args"):
        injected.init(params)


def test_schedule_drives_both_roles():
    params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(3)}}
    optimizer = stac(optax.constant_schedule(0.0))
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params), params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("learning_rate", [2e-3, optax.constant_schedule(2e-3)], ids=["float", "schedule"])
def test_recommended_preset_is_stac_with_snr_scaled_bf16_trunk_at_three_times_the_rate(learning_rate):
    params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(3)}}
    grads = {"a": {"w": jnp.array([1.0, -2.0, 0.5])}, "b": {"w": jnp.array([1.0, -2.0, 0.5])}}
    optimizer = stac_recommended(learning_rate, weight_decay=0.0)
    state = optimizer.init(params)
    updates, state = jax.jit(optimizer.update)(grads, state, params)
    # First step: m_hat = g, so the snr scale is mean|g| / rms(g), with m stored in bfloat16 first (its mean is
    # the rounded m's, within 2^-9 of mean|g|); the trunk steps at 3 lr.
    g = np.asarray(grads["a"]["w"])
    stored = np.asarray((jnp.float32(1 - 0.9) * grads["a"]["w"]).astype(jnp.bfloat16), np.float64)
    scale = np.mean(np.abs(stored)) / (1 - 0.9) / (np.sqrt(np.mean(g * g)) + 1e-8)
    np.testing.assert_allclose(updates["a"]["w"], -3 * 2e-3 * scale * np.sign(g), rtol=1e-5)
    np.testing.assert_allclose(updates["b"]["w"], -2e-3 * np.sign(g), rtol=1e-4)  # AdamW's first step ~ lr sign(g)
    assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state))
    assert not any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(
        stac_recommended(learning_rate, sign_state_dtype=None).init(params)))


def test_compact_preset_is_the_factored_int8_trunk_with_the_last_layer_and_the_norms_in_the_cap():
    params = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.zeros(4)},
              "norm": {"scale": jnp.ones(4)}, "head": {"kernel": jnp.ones((4, 2))}}
    preset = stac_compact(2e-3)
    explicit = stac(2e-3, sign_step_scale="factored", sign_state_dtype=jnp.int8, sign_learning_rate=6e-3,
                    partition=stac_partition(params, 1, adamw_norm_layers=True, adamw_output_layer=True))
    results = []
    for optimizer in (preset, explicit):
        state, current = optimizer.init(params), params
        for step in range(3):
            updates, state = jax.jit(optimizer.update)(jax.tree.map(lambda p: jnp.cos(p + step), current), state,
                                                       current)
            current = optax.apply_updates(current, updates)
        results.append((current, state))
    jax.tree.map(np.testing.assert_array_equal, results[0][0], results[1][0])
    partition = stac_partition(params, 0, adamw_norm_layers=True, adamw_output_layer=True)
    assert partition.sign_layer_names == ("dense",) and set(partition.adamw_layer_names) == {"norm", "head"}
    int8_leaves = [leaf for leaf in jax.tree.leaves(results[0][1]) if leaf.dtype == jnp.int8]
    assert [leaf.shape for leaf in int8_leaves] == [(4,), (3, 4)]  # the trunk's momentum codes, nothing else


@pytest.mark.parametrize("sign_state_dtype", [None, jnp.int8])
def test_factored_trunk_keeps_params_and_state_finite_on_finite_gradients_of_any_size(sign_state_dtype):
    # As PyTorch's registry test: g^2 overflows float32 here, and XLA's CPU division flushed 1 / 3e38 to 0.
    params = {"a": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, "b": {"w": jnp.ones(4)}}
    optimizer = stac(1e-2, 0, sign_step_scale="factored", sign_state_dtype=sign_state_dtype)
    state, update = optimizer.init(params), jax.jit(optimizer.update)
    largest = float(jnp.finfo(jnp.float32).max)
    for value in (1e38, -largest, largest, -largest, 1e-45, 1e30, 0.0, -1e20):
        updates, state = update(jax.tree.map(lambda p: jnp.full_like(p, value), params), state, params)
        params = optax.apply_updates(params, updates)
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves((params, state))
               if jnp.issubdtype(leaf.dtype, jnp.floating))
    assert int(state.nonfinite_skipped_steps) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=-1.0), r"learning_rate must be in \[0.0, inf\)"),
    (dict(last_n_layers=-1), r"last_n_layers must be an integer >= 0, got -1"),
    (dict(sign_momentum=1.0), r"sign_momentum must be in \[0.0, 1.0\), got 1.0"),
    (dict(betas=(0.9,)), r"betas must be a pair"),
    (dict(betas=(0.9, 0.99), b1=0.8), r"give betas or b1/b2, not both"),
    (dict(adamw_weight_decay=-1.0), r"adamw_weight_decay must be in \[0.0, inf\)"),
    (dict(sign_learning_rate=-1e-3), r"sign_learning_rate must be in \[0.0, inf\)"),
    (dict(sign_step_scale="rms"), r"sign_step_scale must be None, 'snr' or 'factored', got 'rms'"),
    (dict(sign_state_dtype=jnp.int8), r"sign_state_dtype=int8 .* needs sign_step_scale='factored'"),
    (dict(sign_step_scale="snr", sign_momentum=0.0), r"needs sign_momentum > 0"),
])
def test_bad_input_names_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stac(**kwargs)
