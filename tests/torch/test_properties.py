"""Properties of every PyTorch optimizer over random small models, hyperparameters in their ranges and finite
gradients from 1e-45 to 1e30 (hypothesis; seeded, derandomized, bounded):

- no NaN in a parameter or in the state, and no Inf but in averages of squared gradients (``MAY_HOLD_INF``: a
  square past float32's range, |g| > 1.8e19, is +Inf there, as torch's AdamW stores it; that coordinate then
  stops moving);
- the fused kernels (compiled, batched, C) give the numbers the op-by-op update gives, for gradients up to 1e18.
  Above, a square or a sum of squares can pass float32's range: the C kernels and the batched path square and
  sum in float64, the op-by-op path in float32, so one keeps a statistic the other discards as non-finite.

Second-moment decays (STAC's betas[1], STAM's b2, STAMLite's moment_decay) are drawn from [0.01, 1): a decay of
exactly 0 multiplies an Inf second moment by 0, a NaN (torch's AdamW does the same).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from torch import nn

from stac_stam.torch import STAC, STAM, STAMLite
from stac_stam.torch._base import MAY_HOLD_INF

STEPS = 3
# Gradients up to 10^EQUAL_UP_TO: every square and every float32 sum of a test model's squares fits float32.
EQUAL_UP_TO = 18
unit = st.floats(0.0, 0.999)  # a decay in [0, 1)
open_unit = st.floats(0.01, 0.999)  # a decay in (0, 1)
lr = st.floats(0.0, 1.0)
weight_decay = st.floats(0.0, 10.0)
eps = st.integers(-30, 0).map(lambda exponent: 10.0 ** exponent)

HYPERPARAMETERS = {
    "stac": st.fixed_dictionaries(dict(
        lr=lr, sign_momentum=unit, betas=st.tuples(unit, open_unit), eps=eps, weight_decay=weight_decay,
        sign_interpolation=st.none() | unit, amsgrad=st.booleans(), maximize=st.booleans(),
        sign_state_dtype=st.sampled_from([None, torch.bfloat16]), last_n_layers=st.integers(0, 3))),
    "stac_snr": st.fixed_dictionaries(dict(
        lr=lr, sign_momentum=open_unit, betas=st.tuples(unit, open_unit), eps=eps, weight_decay=weight_decay,
        maximize=st.booleans(), sign_state_dtype=st.sampled_from([None, torch.bfloat16]),
        last_n_layers=st.integers(0, 3))),
    "stam": st.fixed_dictionaries(dict(
        lr=lr, b1_base=open_unit, b2=open_unit, weight_decay=weight_decay, adapt_strength=st.floats(0.0, 0.5),
        tau_decay=open_unit, eps=eps)),
    "stam_lite": st.fixed_dictionaries(dict(
        lr=lr, b1_base=open_unit, weight_decay=weight_decay, adapt_strength=st.floats(0.0, 0.5),
        moment_decay=open_unit, beta1_update_interval=st.integers(1, 3), eps=eps,
        state_dtype=st.sampled_from([None, torch.bfloat16]))),
}


# Issue 21's case, run first for every optimizer: a one-element layer, lr = 1, a tiny eps, gradients of 1e20.
ISSUE_21_CASE = {
    "stac": dict(lr=1.0, sign_momentum=0.9, betas=(0.9, 0.999), eps=1e-30, weight_decay=0.0, sign_interpolation=None,
                 amsgrad=False, maximize=False, sign_state_dtype=None, last_n_layers=1),
    "stac_snr": dict(lr=1.0, sign_momentum=0.9, betas=(0.9, 0.999), eps=1e-30, weight_decay=0.0, maximize=False,
                     sign_state_dtype=None, last_n_layers=1),
    "stam": dict(lr=1.0, b1_base=0.9, b2=0.999, weight_decay=0.0, adapt_strength=0.2, tau_decay=0.99, eps=1e-30),
    "stam_lite": dict(lr=1.0, b1_base=0.9, weight_decay=0.0, adapt_strength=0.2, moment_decay=0.99,
                      beta1_update_interval=1, eps=1e-30, state_dtype=None),
}


def build(name, model, fused, hyperparameters):
    if name == "stac":
        return STAC(model, fused=fused, **hyperparameters)
    if name == "stac_snr":
        return STAC(model, fused=fused, sign_step_scale="snr", **hyperparameters)
    return {"stam": STAM, "stam_lite": STAMLite}[name](model.parameters(), fused=fused, **hyperparameters)


@st.composite
def cases(draw, name):
    """A model's layer widths, hyperparameters, and the gradients' magnitudes: 10^U(low, high) with random signs
    (and some zeros), low <= high in [-45, 30]."""
    widths = draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
    low = draw(st.integers(-45, 30))
    high = draw(st.integers(low, 30))
    return widths, draw(HYPERPARAMETERS[name]), low, high, draw(st.integers(0, 2 ** 16))


def gradients(model, low, high, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        grads = []
        for param in model.parameters():
            exponent = torch.empty(param.shape, dtype=torch.float64).uniform_(low, high, generator=generator)
            sign = torch.randint(0, 2, param.shape, generator=generator) * 2.0 - 1.0
            zero = torch.rand(param.shape, generator=generator) < 0.1
            grads.append(torch.where(zero, 0.0, sign * 10.0 ** exponent).float())
        yield grads


def check_finite(name, optimizer, model):
    for param_name, param in model.named_parameters():
        assert torch.isfinite(param).all(), f"{name}: parameter {param_name} is not finite"
    for param, state in optimizer.state.items():
        for key, value in state.items():
            assert not value.isnan().any(), f"{name}: state {key} holds NaN"
            if key not in MAY_HOLD_INF:
                assert torch.isfinite(value).all(), f"{name}: state {key} holds Inf"
            assert not (value == -math.inf).any(), f"{name}: state {key} holds -Inf"


def run_property(name, case):
    widths, hyperparameters, low, high, seed = case
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    twin = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    twin.load_state_dict(model.state_dict())
    fused, op_by_op = build(name, model, True, hyperparameters), build(name, twin, False, hyperparameters)
    for grads in gradients(model, low, high, seed):
        for net, optimizer in ((model, fused), (twin, op_by_op)):
            for param, grad in zip(net.parameters(), grads):
                param.grad = grad.clone()
            optimizer.step()
            check_finite(name, optimizer, net)
        assert fused.nonfinite_skipped_steps == op_by_op.nonfinite_skipped_steps == 0
        if high > EQUAL_UP_TO:
            continue
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
            for key, value in fused.state[p].items():
                torch.testing.assert_close(value, op_by_op.state[q][key], rtol=1e-4, atol=1e-30,
                                           msg=lambda message: f"{name} state {key}: {message}")


@pytest.mark.parametrize("name", ["stac", "stac_snr", "stam", "stam_lite"])
def test_finite_gradients_give_finite_parameters_and_fused_equals_op_by_op(name):
    # No shrinking: a failure prints the example as drawn, in bounded time.
    @settings(max_examples=25, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
    @given(cases(name))
    @example(([1, 1, 1], ISSUE_21_CASE[name], 20, 20, 0))
    def check(case):
        run_property(name, case)

    check()
