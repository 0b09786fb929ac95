"""What construction and add_param_group refuse, for every PyTorch optimizer: one rule per hyperparameter, the
same rule a checkpoint's param groups go through (tests/torch/test_checkpoints.py), and torch's own error inputs."""

import pytest
import torch
from torch import nn

from stac_stam.torch import STAC, STAM, STAMLite


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


CLASSES = {"stac": STAC, "stam": STAM, "stam_lite": STAMLite}
NAMES = list(CLASSES)


def build(name, model, **kwargs):
    return CLASSES[name](model if name == "stac" else model.parameters(), **kwargs)
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=INF), r"lr must be in \[0.0, inf\), got inf"),
    (dict(lr=NAN), r"lr must be in \[0.0, inf\), got nan"),
    (dict(lr=torch.tensor(INF)), r"lr must be in \[0.0, inf\), got tensor\(inf\)"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), r"lr must be a number or a 0-d floating tensor, got a torch.float32 "
                                           r"tensor of shape \(2,\)"),
    (dict(lr=torch.tensor(1)), r"lr must be a number or a 0-d floating tensor, got a torch.int64 tensor"),
    (dict(lr=True), r"lr must be a number or a 0-d floating tensor, got True"),
    (dict(weight_decay=INF), r"weight_decay must be in \[0.0, inf\), got inf"),
    (dict(eps=INF), r"eps must be in \(0.0, inf\), got inf"),
    (dict(eps=0.0), r"eps must be in \(0.0, inf\), got 0.0"),
    (dict(fused="yes"), r"fused must be True or False, got 'yes'"),
    (dict(error_if_nonfinite=1), r"error_if_nonfinite must be True or False, got 1"),
])
def test_every_optimizer_refuses_what_no_step_can_use(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(name, mlp(), **kwargs)


@pytest.mark.parametrize("name, kwargs, message", [
    ("stac", dict(maximize="no"), r"maximize must be True or False, got 'no'"),
    ("stac", dict(amsgrad=1), r"amsgrad must be True or False, got 1"),
    ("stac", dict(adamw_norm_layers=None), r"adamw_norm_layers must be True or False, got None"),
    ("stac", dict(sign_lr=INF), r"sign_lr must be in \[0.0, inf\), got inf"),
    ("stac", dict(adamw_weight_decay=NAN), r"adamw_weight_decay must be in \[0.0, inf\), got nan"),
    ("stac", dict(sign_momentum=NAN), r"sign_momentum must be in \[0.0, 1.0\), got nan"),
    ("stac", dict(sign_step_scale="snr", betas=(0.9, 0.0)), r"'snr' averages g\^2 with betas\[1\]; it needs "
                                                            r"betas\[1\] > 0"),
    ("stac", dict(sign_state_dtype=torch.float8_e4m3fn), r"sign_state_dtype must be a floating torch dtype"),
    ("stam", dict(b1_base=1.5), r"b1_base must be in \(0.0, 1.0\), got 1.5"),
    ("stam", dict(tau_decay=INF), r"tau_decay must be in \(0.0, 1.0\), got inf"),
    ("stam_lite", dict(beta1_update_interval=2.0), r"beta1_update_interval must be an integer >= 1, got 2.0"),
    ("stam_lite", dict(state_dtype="float8_e5m2"), r"state_dtype must be a floating torch dtype"),
])
def test_each_optimizer_refuses_its_own_bad_arguments(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(name, mlp(), **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_learning_rate_is_taken_as_torch_optim_takes_it(name):
    lr = torch.tensor(1e-2)
    optimizer = build(name, mlp(), lr=lr)
    assert all(torch.is_tensor(group["lr"]) for group in optimizer.param_groups)
    # Each group its own tensor: a scheduler fills every group's lr in place.
    assert len({id(group["lr"]) for group in optimizer.param_groups}) == len(optimizer.param_groups)
    assert STAC.recommended(mlp(), lr=lr).param_groups[0]["lr"] == 3.0 * lr
    if name == "stac":
        assert STAC(mlp(), sign_lr=lr, adamw_lr=lr).param_groups[1]["lr"] is not lr


def test_stac_defaults_to_no_weight_decay_as_stac_optimizer_0_1_5_does():
    optimizer = STAC(mlp())
    assert [(group["stac_role"], group["weight_decay"]) for group in optimizer.param_groups] == [
        ("sign", 0.0), ("adamw", 0.0)]


def test_recommended_checks_lr_before_using_it():
    with pytest.raises(ValueError, match=r"lr must be a number or a 0-d floating tensor, got 'fast'"):
        STAC.recommended(mlp(), lr="fast")


@pytest.mark.parametrize("name", ["stam", "stam_lite"])
@pytest.mark.parametrize("params, message", [
    (lambda: [nn.Parameter(torch.zeros(2, dtype=torch.complex64))],
     r"does not support complex parameters; param_groups\[0\] params\[0\] is torch.complex64"),
    (lambda: [nn.Parameter(torch.zeros(2, device="meta"))],
     r"param_groups\[0\] params\[0\] is on the meta device, which holds no values: materialize the model"),
    (lambda: [torch.zeros(2, dtype=torch.int64)], r"updates floating-point parameters; param_groups\[0\] "
                                                   r"params\[0\] is torch.int64"),
    (lambda: [("scale", nn.Parameter(torch.zeros(2, dtype=torch.complex128)))],
     r"parameter 'scale' is torch.complex128"),
])
def test_parameters_the_step_cannot_update_are_refused_at_construction(name, params, message):
    with pytest.raises(ValueError, match=message):
        CLASSES[name](params())


def test_complex_and_meta_parameters_are_refused_by_stac_by_name():
    complex_model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"does not support complex parameters; parameter '1.weight'"):
        STAC(complex_model)
    with pytest.raises(ValueError, match=r"parameter '0.weight' is on the meta device"):
        STAC(nn.Sequential(nn.Linear(2, 2, device="meta"), nn.Linear(2, 2)))


@pytest.mark.parametrize("optimizer_class", [STAM, STAMLite])
def test_a_parameter_listed_twice_is_refused_not_updated_twice(optimizer_class):
    param = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"params\[1\] appears twice in its param group"):
        optimizer_class([param, param])
    optimizer = optimizer_class([param])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        optimizer.add_param_group({"params": [param]})


@pytest.mark.parametrize("optimizer_class, key, value, message", [
    (STAM, "lr", INF, r"param_groups\[1\] lr must be in \[0.0, inf\), got inf"),
    (STAM, "b2", 1.0, r"param_groups\[1\] b2 must be in \(0.0, 1.0\), got 1.0"),
    (STAM, "betas", (0.9,), r"param_groups\[1\] betas must be a pair"),
    (STAMLite, "moment_decay", 0.0, r"param_groups\[1\] moment_decay must be in \(0.0, 1.0\), got 0.0"),
    (STAMLite, "beta1_update_interval", 0, r"param_groups\[1\] beta1_update_interval must be an integer >= 1"),
])
def test_add_param_group_checks_the_group_and_adds_nothing_it_refuses(optimizer_class, key, value, message):
    optimizer = optimizer_class([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))], key: value})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("optimizer_class, names", [(STAM, ("b1_base", "b2")), (STAMLite, ("b1_base", "moment_decay"))])
def test_groups_hold_betas_and_a_group_may_still_name_them(optimizer_class, names):
    first, second = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = optimizer_class([{"params": [first]}, {"params": [second], names[0]: 0.7}], **{names[1]: 0.95})
    assert [group["betas"] for group in optimizer.param_groups] == [(0.9, 0.95), (0.7, 0.95)]
    assert not any(name in group for group in optimizer.param_groups for name in names)


# torch's optimizer test suite's error inputs (torch.testing._internal.common_optimizers), those a torch user
# could give ours: every one must be refused, with the error type torch raises (a parameter listed twice in a
# group is only a warning in torch; ours refuse it, as torch says it will).
OUR_ARGUMENTS = {"stac": {"lr", "betas", "weight_decay"}, "stam": {"lr", "weight_decay"},
                 "stam_lite": {"lr", "weight_decay"}}


def torch_error_inputs(name):
    # Imported here, not at collection: it takes seconds.
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_error_inputs_func_adamw

    for error_input in optim_error_inputs_func_adamw("cpu", torch.float32):
        given = error_input.optimizer_error_input
        if error_input.error_on != OptimizerErrorEnum.CONSTRUCTION_ERROR:
            continue
        kwargs = dict(given.kwargs)
        if name != "stac" and "betas" in kwargs:  # STAM's and STAMLite's constructors name the betas
            beta_names = ("b1_base", "b2") if name == "stam" else ("b1_base", "moment_decay")
            kwargs.update(zip(beta_names, kwargs.pop("betas")))
        if not set(kwargs) <= OUR_ARGUMENTS[name] | {"b1_base", "b2", "moment_decay"}:
            continue  # foreach, capturable, differentiable: flags ours do not have
        if given.params is not None and name == "stac":
            continue  # STAC takes a model, not a parameter list
        yield pytest.param(given.params, kwargs, error_input.error_type, id=given.desc)


@pytest.mark.parametrize("name", NAMES)
def test_torch_error_inputs_are_refused(name):
    cases = list(torch_error_inputs(name))
    assert len(cases) >= (3 if name == "stac" else 8)
    for case in cases:
        params, kwargs, error_type = case.values
        expected = ValueError if error_type is UserWarning else error_type
        with pytest.raises(expected):
            if params is None:
                build(name, mlp(), **kwargs)
            else:
                CLASSES[name](params, **kwargs)
