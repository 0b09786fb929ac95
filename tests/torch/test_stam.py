"""STAM for PyTorch, held to the float64 reference, to torch.optim.AdamW and to the golden vectors."""

import json
import pathlib

import numpy as np
import pytest
import torch

import reference
from stac_stam.torch import STAM
from stac_stam.torch.stam import VARIANCE_CAP

GOLDEN = json.loads((pathlib.Path(__file__).resolve().parents[1] / "golden" / "stam.json").read_text())
STATE_KEYS = {"exp_avg": "mu", "exp_avg_sq": "nu", "variance": "variance", "scale": "scale", "beta1": "beta1",
              "beta1_product": "beta1_product"}


def golden_params(case, dtype):
    return [torch.nn.Parameter(torch.tensor(e["value"], dtype=dtype).reshape(e["shape"])) for e in case["params"]]


def test_the_constants_the_reference_fixes():
    assert VARIANCE_CAP == reference.STAM_VARIANCE_CAP


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_golden_vectors(case, dtype, tolerance):
    params = golden_params(case, dtype)
    optimizer = STAM(params, **case["hyperparams"])
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
            np.testing.assert_allclose(float(optimizer.state[param][key]), value, rtol=max(tolerance, 1e-6))


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_every_step_and_state_match_the_float64_reference(case):
    params = golden_params(case, torch.float64)
    optimizer = STAM(params, **case["hyperparams"])
    ref_params = [p.detach().numpy().copy() for p in params]
    ref_states = [{} for _ in params]
    for step_grads, lr in zip(case["grads"], case["learning_rates"]):
        optimizer.param_groups[0]["lr"] = lr
        for i, (param, grad) in enumerate(zip(params, step_grads)):
            param.grad = torch.tensor(grad, dtype=torch.float64).reshape(param.shape)
            ref_params[i] = reference.stam_step(ref_params[i], param.grad.numpy(), ref_states[i], lr=lr,
                                                **case["hyperparams"])
        optimizer.step()
        for param, ref_param, ref_state in zip(params, ref_params, ref_states):
            np.testing.assert_allclose(param.detach().numpy(), ref_param, rtol=1e-12, atol=1e-13)
            for key, ref_key in STATE_KEYS.items():
                np.testing.assert_allclose(optimizer.state[param][key].numpy(), ref_state[ref_key], rtol=1e-12,
                                           atol=1e-16)


def test_no_adaptation_is_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(3,
                                                                                                      dtype=torch.float64))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    stam = STAM(ours, lr=1e-2, adapt_strength=0.0, weight_decay=0.1)
    adamw = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.sin(a.detach() * (step + 1))
            b.grad = a.grad.clone()
        stam.step()
        adamw.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_overflowing_statistics_fall_back_to_base_beta1_and_keep_the_state_finite():
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = STAM([param], adapt_strength=0.5)
    param.grad = torch.ones(4)
    optimizer.step()
    variance, scale = optimizer.state[param]["variance"].clone(), optimizer.state[param]["scale"].clone()
    param.grad = torch.full((4,), 1e30)  # finite in float32, but its square overflows
    optimizer.step()
    state = optimizer.state[param]
    assert float(state["beta1"]) == pytest.approx(0.9)
    assert torch.equal(state["variance"], variance) and torch.equal(state["scale"], scale)
    assert optimizer.nonfinite_skipped_steps == 0
    assert torch.isfinite(state["exp_avg"]).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), r"lr must be in \[0.0, inf\), got -1.0"),
    (dict(b1_base=1.0), r"b1_base must be in \(0.0, 1.0\), got 1.0"),
    (dict(b2=0.0), r"b2 must be in \(0.0, 1.0\), got 0.0"),
    (dict(weight_decay=-0.1), r"weight_decay must be in \[0.0, inf\)"),
    (dict(adapt_strength=0.6), r"adapt_strength must be in \[0.0, 0.5\], got 0.6"),
    (dict(tau_decay=1.5), r"tau_decay must be in \(0.0, 1.0\)"),
    (dict(eps=0.0), r"eps must be in \(0.0, inf\)"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        STAM([torch.nn.Parameter(torch.zeros(2))], **kwargs)
