"""Write the golden vectors both frameworks are held to.

Run once (``python tests/golden/generate.py``) when the reference changes; the
JSON files are committed. Inputs are seeded float32-representable values, the
expected outputs come from tests/reference.py in float64.

Layout of every file: ``{"cases": [case, ...]}``; a case has
- ``name``, ``hyperparams`` (the torch/optax-neutral names of the reference),
- ``learning_rates``: the learning rate of each step (a schedule when they differ),
- ``params``: ordered list of ``{"name", "shape", "value"}`` (flat row-major values),
- ``grads``: per step, one flat list per parameter (same order),
- ``expected``: per step, the parameters after that step (same order),
- ``expected_state``: per parameter, the final tensor-level scalars (STAM/STAMLite only).
STAC cases also carry ``layers`` (the layer each parameter belongs to, in order)
and ``last_n_layers``.
"""

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import reference  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
STEPS = 6


def f32(array):
    """Round to float32 so both frameworks see exactly the same inputs."""
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def make_inputs(rng, shapes):
    params = [f32(rng.normal(size=shape)) for _, shape in shapes]
    grads = [[f32(rng.normal(scale=0.5, size=shape)) for _, shape in shapes] for _ in range(STEPS)]
    return params, grads


def as_case(name, hyperparams, learning_rates, shapes, params, grads, expected, **extra):
    return {
        "name": name,
        "hyperparams": hyperparams,
        "learning_rates": learning_rates,
        "params": [
            {"name": pname, "shape": list(shape), "value": value.ravel().tolist()}
            for (pname, shape), value in zip(shapes, params)
        ],
        "grads": [[g.ravel().tolist() for g in step] for step in grads],
        "expected": [[p.ravel().tolist() for p in step] for step in expected],
        **extra,
    }


def run_per_tensor(step_fn, params, grads, learning_rates, hyperparams):
    states = [{} for _ in params]
    current = list(params)
    history = []
    for step_grads, lr in zip(grads, learning_rates):
        current = [step_fn(p, g, s, lr=lr, **hyperparams) for p, g, s in zip(current, step_grads, states)]
        history.append(current)
    return history, states


STAM_SHAPES = [("w", (4, 3)), ("b", (3,)), ("scalar", ())]


def stam_cases(rng):
    cases = []
    for name, hyperparams, learning_rates in [
        ("defaults", {}, [1e-3] * STEPS),
        ("strong_adaptation_and_schedule",
         {"b1_base": 0.85, "b2": 0.99, "weight_decay": 0.1, "adapt_strength": 0.5, "tau_decay": 0.9},
         [1e-2, 2e-2, 3e-2, 2e-2, 1e-2, 5e-3]),
        ("no_adaptation_is_adamw", {"adapt_strength": 0.0}, [1e-2] * STEPS),
    ]:
        params, grads = make_inputs(rng, STAM_SHAPES)
        history, states = run_per_tensor(reference.stam_step, params, grads, learning_rates, hyperparams)
        final_state = [{k: float(s[k]) for k in ("variance", "scale", "beta1", "beta1_product")} for s in states]
        cases.append(as_case(name, hyperparams, learning_rates, STAM_SHAPES, params, grads, history,
                             expected_state=final_state))
    return cases


def stam_lite_cases(rng):
    cases = []
    for name, hyperparams, learning_rates in [
        ("defaults", {}, [1e-3] * STEPS),
        ("lazy_every_two_and_schedule",
         {"b1_base": 0.95, "weight_decay": 0.05, "adapt_strength": 0.5, "moment_decay": 0.9,
          "beta1_update_interval": 2},
         [1e-2, 2e-2, 3e-2, 2e-2, 1e-2, 5e-3]),
    ]:
        params, grads = make_inputs(rng, STAM_SHAPES)
        history, states = run_per_tensor(reference.stam_lite_step, params, grads, learning_rates, hyperparams)
        final_state = [{k: float(s[k]) for k in ("grad_mean", "grad_sq_mean", "beta1", "beta1_product")}
                       for s in states]
        cases.append(as_case(name, hyperparams, learning_rates, STAM_SHAPES, params, grads, history,
                             expected_state=final_state))
    return cases


# An MLP Linear(3, 4) -> Linear(4, 4) -> Linear(4, 2), layer names as nn.Sequential gives
# them with activations between the Linears; weights are (out, in) as in torch.
STAC_LAYERS = [("0", (4, 3)), ("2", (4, 4)), ("4", (2, 4))]
STAC_SHAPES = [(f"{layer}.{kind}", shape) for layer, (out_f, in_f) in STAC_LAYERS
               for kind, shape in (("weight", (out_f, in_f)), ("bias", (out_f,)))]


def stac_cases(rng, configurations):
    """A case per ``(name, last_n_layers, hyperparams)``; hyperparams hold lr, weight_decay and optionally
    sign_momentum, sign_step_scale, sign_state_dtype ("int8" only), betas and eps, as STAC's arguments."""
    cases = []
    for name, last_n_layers, hyperparams in configurations:
        params, grads = make_inputs(rng, STAC_SHAPES)
        layer_of = [pname.split(".")[0] for pname, _ in STAC_SHAPES]
        layer_names = [layer for layer, _ in STAC_LAYERS]
        adamw_layers = set(layer_names[len(layer_names) - min(last_n_layers, len(layer_names)):])
        has_sign = len(adamw_layers) < len(layer_names)
        sign_lr, adamw_lr = reference.stac_learning_rates(hyperparams["lr"], has_sign, bool(adamw_layers))
        states = [{} for _ in params]
        current = list(params)
        history = []
        for step_grads in grads:
            updated = []
            for layer, p, g, state in zip(layer_of, current, step_grads, states):
                if layer in adamw_layers:
                    updated.append(reference.adamw_step(
                        p, g, state, lr=adamw_lr, betas=tuple(hyperparams.get("betas", (0.9, 0.999))),
                        eps=hyperparams.get("eps", 1e-8), weight_decay=hyperparams["weight_decay"]))
                else:
                    updated.append(reference.sign_step(
                        p, g, state, lr=sign_lr, sign_momentum=hyperparams.get("sign_momentum", 0.9),
                        sign_step_scale=hyperparams.get("sign_step_scale"),
                        b2=hyperparams.get("betas", (0.9, 0.999))[1], eps=hyperparams.get("eps", 1e-8),
                        weight_decay=hyperparams["weight_decay"],
                        int8_momentum=hyperparams.get("sign_state_dtype") == "int8"))
            current = updated
            history.append(current)
        cases.append(as_case(name, hyperparams, [hyperparams["lr"]] * STEPS, STAC_SHAPES, params, grads,
                             history, layers=layer_of, last_n_layers=last_n_layers))
    return cases


STAC_CONFIGURATIONS = [
    ("defaults", 1, {"lr": 1e-2, "sign_momentum": 0.9, "weight_decay": 1e-2}),
    ("plain_sign_two_adamw_layers", 2,
     {"lr": 3e-2, "sign_momentum": 0.0, "weight_decay": 0.0, "betas": [0.8, 0.99], "eps": 1e-6}),
    ("all_sign", 0, {"lr": 1e-2, "sign_momentum": 0.5, "weight_decay": 0.1}),
    ("all_adamw", 10, {"lr": 1e-2, "weight_decay": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8}),
]
# STAC's factored trunk (sign_step_scale="factored"), in its own file (and random stream): the files above keep
# their values.
STAC_FACTORED_CONFIGURATIONS = [
    ("factored", 1, {"lr": 1e-2, "sign_momentum": 0.0, "sign_step_scale": "factored", "weight_decay": 1e-2}),
    ("factored_momentum_all_trunk", 0, {"lr": 3e-2, "sign_momentum": 0.9, "sign_step_scale": "factored",
                                         "weight_decay": 0.1, "betas": [0.9, 0.99], "eps": 1e-6}),
    ("factored_int8_momentum", 1, {"lr": 1e-2, "sign_momentum": 0.9, "sign_step_scale": "factored",
                                   "sign_state_dtype": "int8", "weight_decay": 1e-2}),
]


def main():
    rng = np.random.default_rng(20261124)
    for filename, cases in [("stac.json", stac_cases(rng, STAC_CONFIGURATIONS)), ("stam.json", stam_cases(rng)),
                            ("stam_lite.json", stam_lite_cases(rng)),
                            ("stac_factored.json", stac_cases(np.random.default_rng(20261202),
                                                              STAC_FACTORED_CONFIGURATIONS))]:
        (HERE / filename).write_text(json.dumps({"cases": cases}, indent=1) + "\n")
        print("wrote", HERE / filename)


if __name__ == "__main__":
    main()
