"""STAMLite for PyTorch, held to the float64 reference and to the golden vectors."""

import json
import pathlib

import numpy as np
import pytest
import torch

import reference
from stac_stam.torch import STAMLite

GOLDEN = json.loads((pathlib.Path(__file__).resolve().parents[1] / "golden" / "stam_lite.json").read_text())
STATE_KEYS = {"exp_avg": "mu", "grad_mean": "grad_mean", "grad_sq_mean": "grad_sq_mean", "beta1": "beta1",
              "beta1_product": "beta1_product"}


def golden_params(case, dtype):
    return [torch.nn.Parameter(torch.tensor(e["value"], dtype=dtype).reshape(e["shape"])) for e in case["params"]]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_golden_vectors(case, dtype, tolerance):
    params = golden_params(case, dtype)
    optimizer = STAMLite(params, **case["hyperparams"])
    for step_grads, expected, lr in zip(case["grads"], case["expected"], case["learning_rates"]):
        optimizer.param_groups[0]["lr"] = lr
        for param, entry, grad in zip(params, case["params"], step_grads):
            param.grad = torch.tensor(grad, dtype=dtype).reshape(entry["shape"])
        optimizer.step()
        for param, values in zip(params, expected):
            np.testing.assert_allclose(param.detach().double().numpy().ravel(), values, rtol=tolerance,
                                       atol=tolerance / 10)
    for param, scalars in zip(params, case["expected_state"]):
        for key, value in scalars.items():
            np.testing.assert_allclose(float(optimizer.state[param][key]), value, rtol=max(tolerance, 1e-5),
                                       atol=1e-9)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_every_step_and_state_match_the_float64_reference(case):
    params = golden_params(case, torch.float64)
    optimizer = STAMLite(params, **case["hyperparams"])
    ref_params = [p.detach().numpy().copy() for p in params]
    ref_states = [{} for _ in params]
    for step_grads, lr in zip(case["grads"], case["learning_rates"]):
        optimizer.param_groups[0]["lr"] = lr
        for i, (param, grad) in enumerate(zip(params, step_grads)):
            param.grad = torch.tensor(grad, dtype=torch.float64).reshape(param.shape)
            ref_params[i] = reference.stam_lite_step(ref_params[i], param.grad.numpy(), ref_states[i], lr=lr,
                                                     **case["hyperparams"])
        optimizer.step()
        for param, ref_param, ref_state in zip(params, ref_params, ref_states):
            np.testing.assert_allclose(param.detach().numpy(), ref_param, rtol=1e-12, atol=1e-13)
            for key, ref_key in STATE_KEYS.items():
                np.testing.assert_allclose(optimizer.state[param][key].numpy(), ref_state[ref_key], rtol=1e-12,
                                           atol=1e-16)


def test_state_dtype_stores_the_moment_at_low_precision_and_keeps_it_through_checkpoints():
    param = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = STAMLite([param], state_dtype=torch.bfloat16)
    param.grad = torch.full((4, 4), 0.3)
    optimizer.step()
    saved = optimizer.state_dict()
    resumed = STAMLite([param], state_dtype=torch.bfloat16)
    resumed.load_state_dict(saved)
    assert resumed.state[param]["exp_avg"].dtype == torch.bfloat16
    assert resumed.state[param]["grad_sq_mean"].dtype == torch.float32


def test_keeps_one_moment_per_parameter_where_adamw_keeps_two():
    params = [torch.nn.Parameter(torch.ones(64, 64))]
    lite, adamw = STAMLite(params), torch.optim.AdamW(params)
    params[0].grad = torch.ones(64, 64)
    lite.step()
    adamw.step()
    state_bytes = lambda opt: sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))  # noqa: E731
    assert state_bytes(lite) < 0.51 * state_bytes(adamw)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), r"lr must be in \[0.0, inf\)"),
    (dict(moment_decay=1.0), r"moment_decay must be in \(0.0, 1.0\), got 1.0"),
    (dict(beta1_update_interval=0), r"beta1_update_interval must be an integer >= 1, got 0"),
    (dict(state_dtype=torch.int8), r"state_dtype must be a floating torch dtype"),
    (dict(adapt_strength=-0.1), r"adapt_strength must be in \[0.0, 0.5\]"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        STAMLite([torch.nn.Parameter(torch.zeros(2))], **kwargs)
