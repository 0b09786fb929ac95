"""Checkpoints of every PyTorch optimizer: all or nothing, keyed by index or by name, through
torch.distributed.checkpoint, across model wrappers, from stac-optimizer 0.1.5 and from earlier versions of ours,
and through copy.deepcopy and pickle."""

import copy
import math
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from stac_stam.torch import STAC, STAM, STAMLite

OPTIMIZERS = {
    "stac": lambda model, **kw: STAC(model, lr=1e-2, **kw),
    "stac_recommended": lambda model, **kw: STAC.recommended(model, lr=1e-2, amsgrad=True, **kw),
    "stac_compact": lambda model, **kw: STAC.compact(model, lr=1e-2, **kw),
    "stam": lambda model, **kw: STAM(model.parameters(), lr=1e-2, **kw),
    "stam_lite_bf16_state": lambda model, **kw: STAMLite(model.parameters(), lr=1e-2, state_dtype=torch.bfloat16,
                                                         **kw),
}
NAMES = list(OPTIMIZERS)


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.randn(16, 4), torch.randn(16, 2)


def train(model, optimizer, inputs, targets, steps, nonfinite_at=None):
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        (model(inputs) - targets).pow(2).mean().backward()
        if step == nonfinite_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        optimizer.step()


def trained(name, seed=0, steps=3, **kwargs):
    model, inputs, targets = model_and_data(seed)
    optimizer = OPTIMIZERS[name](model, **kwargs)
    train(model, optimizer, inputs, targets, steps, nonfinite_at=1)
    return model, optimizer


def snapshot(optimizer):
    """Everything a load could change: the state, the groups' entries, the skipped-step count."""
    return ({id(param): {key: value.clone() for key, value in state.items()}
             for param, state in optimizer.state.items()},
            [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups],
            optimizer.nonfinite_skipped_steps)


def assert_same(before, after):
    assert before[0].keys() == after[0].keys()
    for param_id, state in before[0].items():
        assert state.keys() == after[0][param_id].keys()
        for key, value in state.items():
            assert value.dtype == after[0][param_id][key].dtype and torch.equal(value, after[0][param_id][key])
    assert before[1] == after[1] and before[2] == after[2]


def assert_resumes_exactly(model, optimizer, twin, resumed, steps=3):
    """Training on from the checkpoint equals training on without one, bit for bit: parameters and state."""
    _, inputs, targets = model_and_data()
    assert resumed.nonfinite_skipped_steps == optimizer.nonfinite_skipped_steps
    train(model, optimizer, inputs, targets, steps)
    train(twin, resumed, inputs, targets, steps)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == resumed.state[q].keys()
        for key, value in optimizer.state[p].items():
            assert value.dtype == resumed.state[q][key].dtype and torch.equal(value, resumed.state[q][key]), key


def last_state(state_dict):
    """The state entry of the checkpoint's last parameter: a bad value there must not leave the others loaded."""
    return state_dict["state"][max(state_dict["state"])]


# (edit of a good checkpoint, the refusal's message); each edit touches the last group or parameter, so a load
# that replaced state as it went would have replaced the rest by then.
def set_group(key, value, group=-1):
    def edit(state_dict, name):
        state_dict["param_groups"][group][key] = value
    return edit


def set_first_beta(value):
    def edit(state_dict, name):
        betas = state_dict["param_groups"][0]["betas"]
        state_dict["param_groups"][0]["betas"] = (value, betas[1])
    return edit


def set_state(key, make):
    def edit(state_dict, name):
        entry = last_state(state_dict)
        entry[key] = make(entry[key])
    return edit


def drop_state(key):
    def edit(state_dict, name):
        del last_state(state_dict)[key]
    return edit


def with_nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[-1] = float("nan")
    return tensor


BAD_CHECKPOINTS = {
    "nan lr": (set_group("lr", float("nan")), r"checkpoint param_groups\[\d\] lr must be in \[0.0, inf\), got nan"),
    "negative lr": (set_group("lr", -5.0), r"lr must be in \[0.0, inf\), got -5.0"),
    "tensor lr of two values": (set_group("lr", torch.tensor([1e-2, 1e-2])), r"lr must be a number or a 0-d"),
    "first beta 1.5": (set_first_beta(1.5), r"checkpoint param_groups\[0\] (b1_base|sign_momentum) must be in "
                                            r"\[?\(?0.0, 1.0\), got 1.5"),
    "weight decay a string": (set_group("weight_decay", "0.1"), r"weight_decay must be a number, got '0.1'"),
    "eps missing": (lambda sd, name: sd["param_groups"][-1].pop("eps"), r"lacks 'eps'"),
    "nan in the first moment": (set_state("exp_avg", with_nan), r"checkpoint state 'exp_avg' of parameter .* holds "
                                                                r"NaN or Inf"),
    "int64 first moment": (set_state("exp_avg", lambda t: t.long()), r"'exp_avg' of parameter .* must be a floating "
                                                                     r"tensor, got a torch.int64 tensor"),
    "first moment of another shape": (set_state("exp_avg", lambda t: t.view(-1)[:-1].clone()),
                                      r"'exp_avg' of parameter .* has shape \(\d+,\), the parameter has"),
    "negative step": (set_state("step", lambda t: t - 100), r"'step' of parameter .* must lie in \[0.0, inf\]"),
    "step missing": (drop_state("step"), r"checkpoint state of parameter .* holds \[.*\]; with its param group's "
                                         r"settings \w+ keeps \[.*'step'.*\]"),
    "a parameter it lacks": (lambda sd, name: sd["state"].update({99: dict(last_state(sd))}),
                             r"checkpoint state refers to parameter 99, which this optimizer lacks"),
    "one group more": (lambda sd, name: sd["param_groups"].append(dict(sd["param_groups"][-1], params=[])),
                       r"(checkpoint has \d param groups, this optimizer \d|checkpoint roles)"),
    "skipped steps negative": (set_group("nonfinite_skipped_steps", -1), r"nonfinite_skipped_steps must be one "
                                                                          r"integer >= 0"),
    "not a dict": (lambda sd, name: sd.pop("state"), r"state_dict must be a dict with 'state' and 'param_groups'"),
}


@pytest.mark.parametrize("name", ["stac", "stam", "stam_lite_bf16_state"])
@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_refused_checkpoint_changes_nothing(name, case):
    edit, message = BAD_CHECKPOINTS[case]
    _, optimizer = trained(name)
    _, source = trained(name, seed=1, steps=5)
    checkpoint = copy.deepcopy(source.state_dict())
    edit(checkpoint, name)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(checkpoint)
    assert_same(before, snapshot(optimizer))


def set_code(value):
    def edit(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[0] = value
        return tensor
    return edit


# STAC.compact's trunk state (the int8 momentum codes, their row scales, the factored statistics) refused at load:
# (key of the state of '2.weight', the trunk's last weight, of shape (8, 8); its edit or None to drop it; message).
BAD_COMPACT_STATES = {
    "row scales of another shape": ("momentum_scale", lambda t: t[:-1].clone(),
                                    r"'momentum_scale' of parameter '2.weight' has shape \(7,\); for the parameter of "
                                    r"shape \(8, 8\) it must have shape \(8,\)"),
    "negative row scales": ("momentum_scale", torch.neg, r"'momentum_scale' of parameter '2.weight' must lie in "
                                                         r"\[0.0, inf\]"),
    "codes as float32": ("momentum_buffer", lambda t: t.float(), r"'momentum_buffer' of parameter '2.weight' must be "
                                                                 r"an int8 tensor, got a torch.float32 tensor"),
    "codes as int16": ("momentum_buffer", lambda t: t.short(), r"must be an int8 tensor, got a torch.int16 tensor"),
    "codes of another shape": ("momentum_buffer", lambda t: t.view(-1).clone(),
                               r"'momentum_buffer' of parameter '2.weight' has shape \(64,\), the parameter has "
                               r"\(8, 8\)"),
    "a code of -128": ("momentum_buffer", set_code(-128), r"'momentum_buffer' of parameter '2.weight' must lie in "
                                                          r"\[-127, 127\]"),
    "column statistics of another shape": ("exp_avg_sq_col", lambda t: t[:4].clone(),
                                           r"'exp_avg_sq_col' .* has shape \(4,\); .* it must have shape \(8,\)"),
    "negative column statistics": ("exp_avg_sq_col", torch.neg, r"'exp_avg_sq_col' of parameter '2.weight' must lie in "
                                                               r"\[0.0, inf\]"),
    "a NaN row statistic": ("exp_avg_sq_row", with_nan, r"'exp_avg_sq_row' of parameter '2.weight' holds NaN or Inf"),
    "row statistics missing": ("exp_avg_sq_row", None,
                               r"checkpoint state of parameter '2.weight' holds \['exp_avg_sq_col', 'momentum_buffer', "
                               r"'momentum_scale', 'step'\]; with its param group's settings STAC keeps "
                               r"\['exp_avg_sq_col', 'exp_avg_sq_row', 'momentum_buffer', 'momentum_scale', 'step'\]"),
}


@pytest.mark.parametrize("case", list(BAD_COMPACT_STATES))
def test_a_refused_compact_checkpoint_changes_nothing(case):
    key, edit, message = BAD_COMPACT_STATES[case]
    _, optimizer = trained("stac_compact")
    _, source = trained("stac_compact", seed=1, steps=5)
    checkpoint = copy.deepcopy(source.state_dict())
    assert checkpoint["param_groups"][0]["param_names"][2] == "2.weight"
    entry = checkpoint["state"][2]
    if edit is None:
        del entry[key]
    else:
        entry[key] = edit(entry[key])
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(checkpoint)
    assert_same(before, snapshot(optimizer))


def test_stac_refuses_an_integer_trunk_momentum_which_would_truncate_the_momentum():
    _, optimizer = trained("stac")
    _, source = trained("stac", seed=1)
    checkpoint = copy.deepcopy(source.state_dict())
    checkpoint["state"][0]["momentum_buffer"] = (checkpoint["state"][0]["momentum_buffer"] * 100).long()
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter '0.weight' must be a floating tensor, got "
                                         r"a torch.int64 tensor"):
        optimizer.load_state_dict(checkpoint)
    assert_same(before, snapshot(optimizer))


@pytest.mark.parametrize("name", ["stac", "stam"])
def test_second_moments_that_overflowed_to_inf_load_and_nan_does_not(name):
    # A gradient of 1e30 squares past float32's range: AdamW's exp_avg_sq (STAC's cap, STAM's nu) holds +Inf, the
    # state our own step writes and so must load. A NaN, or -Inf, is refused.
    model, optimizer = trained(name)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30)
    optimizer.step()
    checkpoint = copy.deepcopy(optimizer.state_dict())
    assert last_state(checkpoint)["exp_avg_sq"].isinf().all()
    _, resumed = trained(name, seed=1)
    resumed.load_state_dict(checkpoint)
    assert resumed.state[resumed.param_groups[-1]["params"][-1]]["exp_avg_sq"].isinf().all()
    for bad in (float("nan"), -float("inf")):
        last_state(checkpoint)["exp_avg_sq"].view(-1)[0] = bad
        with pytest.raises(ValueError, match=r"'exp_avg_sq' of parameter .* holds NaN or Inf"):
            resumed.load_state_dict(checkpoint)


@pytest.mark.parametrize("source, target, message", [
    ("stam_lite_bf16_state", "stam", r"lacks 'tau_decay': it is not a STAM param group"),
    ("stam", "stam_lite_bf16_state", r"lacks 'beta1_update_interval': it is not a STAMLite param group"),
    ("stam", "stac", r"checkpoint roles \[None\] do not match this optimizer's \['sign', 'adamw'\]"),
    ("stac", "stam", r"checkpoint has 2 param groups, this optimizer 1"),
])
def test_a_checkpoint_of_another_optimizer_is_refused_at_load_not_at_the_next_step(source, target, message):
    _, saved = trained(source)
    _, optimizer = trained(target)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(saved.state_dict())
    assert_same(before, snapshot(optimizer))


def test_stam_refuses_the_stamlite_state_of_a_parameter_even_under_stam_hyperparameters():
    _, lite = trained("stam_lite_bf16_state")
    _, optimizer = trained("stam")
    checkpoint = lite.state_dict()
    checkpoint["param_groups"] = optimizer.state_dict()["param_groups"]
    with pytest.raises(ValueError, match=r"holds \['beta1', 'beta1_product', 'exp_avg', 'grad_mean', 'grad_sq_mean', "
                                         r"'step'\]; with its param group's settings STAM keeps \['beta1', "
                                         r"'beta1_product', 'exp_avg', 'exp_avg_sq', 'scale', 'step', 'variance'\]"):
        optimizer.load_state_dict(checkpoint)


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_with_plain_number_steps_loads_and_resumes(name):
    # torch's older form: 'step' a Python number (torch.optim.Adam wrote it so before 1.12).
    model, optimizer = trained(name)
    twin, resumed = trained(name, seed=1)
    checkpoint = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the live state's dicts
    steps = [entry for entry in checkpoint["state"].values() if "step" in entry]
    assert steps
    for entry in steps:
        entry["step"] = entry["step"].item()
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(checkpoint)
    assert_resumes_exactly(model, optimizer, twin, resumed)


def by_name(state_dict, model):
    """``state_dict`` keyed by parameter name, as torch.distributed.checkpoint hands it to load_state_dict."""
    names = [name for name, _ in model.named_parameters()]
    return dict(state_dict, state={names[index]: entry for index, entry in state_dict["state"].items()},
                param_groups=[dict(group, params=[names[index] for index in group["params"]])
                              for group in state_dict["param_groups"]])


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_keyed_by_parameter_name_loads_and_resumes(name):
    model, optimizer = trained(name)
    twin, resumed = trained(name, seed=1)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(by_name(optimizer.state_dict(), model))
    assert_resumes_exactly(model, optimizer, twin, resumed)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("keys", ["index", "name"])
def test_a_checkpoint_of_another_model_is_refused_whatever_its_keys(name, keys):
    _, optimizer = trained(name)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    other_optimizer = OPTIMIZERS[name](other)
    inputs = torch.randn(16, 4)
    other(inputs).sum().backward()
    other_optimizer.step()
    checkpoint = other_optimizer.state_dict()
    if keys == "name":
        checkpoint = by_name(checkpoint, other)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"of parameter ('4.weight'|#4) has shape \(3, 8\), the parameter has "
                                         r"\(2, 8\)"):
        optimizer.load_state_dict(checkpoint)
    assert_same(before, snapshot(optimizer))


def test_stac_refuses_a_name_keyed_checkpoint_of_other_parameter_names():
    model, optimizer = trained("stac")
    checkpoint = by_name(optimizer.state_dict(), model)
    checkpoint["state"] = {f"body.{key}": value for key, value in checkpoint["state"].items()}
    for group in checkpoint["param_groups"]:
        group["params"] = [f"body.{key}" for key in group["params"]]
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"checkpoint param_groups\[0\] holds parameters \['body.0.weight', "
                                         r"'body.0.bias', .*\]; this optimizer's are \['0.weight', '0.bias', .*\]"):
        optimizer.load_state_dict(checkpoint)
    assert_same(before, snapshot(optimizer))


@pytest.mark.parametrize("name", ["stac", "stam"])
def test_a_tensor_learning_rate_loads_as_a_tensor_of_its_own(name):
    model, inputs, targets = model_and_data()
    optimizer = OPTIMIZERS[name](model)
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(3e-3)
    train(model, optimizer, inputs, targets, 2)
    checkpoint = optimizer.state_dict()
    _, resumed = trained(name, seed=1)
    resumed.load_state_dict(checkpoint)
    lr = resumed.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr == optimizer.param_groups[0]["lr"] and lr is not optimizer.param_groups[0]["lr"]


def test_state_dict_carries_the_skipped_steps_in_every_param_group():
    _, optimizer = trained("stac")
    assert optimizer.nonfinite_skipped_steps == 1
    assert [group["nonfinite_skipped_steps"] for group in optimizer.state_dict()["param_groups"]] == [1, 1]
    assert "nonfinite_skipped_steps" not in optimizer.param_groups[0]


@pytest.mark.parametrize("name", NAMES)
def test_distributed_checkpoint_round_trip_resumes_bit_for_bit(name, tmp_path):
    # One process: get/set_optimizer_state_dict key state by parameter name and keep only state and param_groups.
    model, optimizer = trained(name)
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=tmp_path)
    twin, _, _ = model_and_data(seed=1)
    resumed = OPTIMIZERS[name](twin)
    loaded = {"model": get_model_state_dict(twin), "optimizer": get_optimizer_state_dict(twin, resumed)}
    dcp.load(loaded, checkpoint_id=tmp_path)
    set_model_state_dict(twin, loaded["model"])
    set_optimizer_state_dict(twin, resumed, loaded["optimizer"])
    assert resumed.nonfinite_skipped_steps == 1
    assert_resumes_exactly(model, optimizer, twin, resumed)


@pytest.fixture
def one_rank_process_group():
    # The store binds a port the system picks (a port probed free beforehand can be taken before it binds).
    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", 0, 1, is_master=True), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_stac_checkpoint_moves_between_a_bare_a_ddp_wrapped_and_a_compiled_model(one_rank_process_group):
    model, optimizer = trained("stac")
    wrapped = {"ddp": nn.parallel.DistributedDataParallel(model), "compiled": torch.compile(model),
               "ddp of compiled": nn.parallel.DistributedDataParallel(torch.compile(model))}
    for wrapper in wrapped.values():
        assert STAC(wrapper).param_groups[0]["param_names"] == optimizer.param_groups[0]["param_names"]
        assert STAC(wrapper).partition.adamw_layer_names == ("4",)
    for kind, wrapper in wrapped.items():
        for source_model, target_model in ((model, wrapper), (wrapper, model)):
            source = STAC(source_model, lr=1e-2)
            source.load_state_dict(optimizer.state_dict())
            for checkpoint in (source.state_dict(), get_optimizer_state_dict(source_model, source)):
                twin, _, _ = model_and_data(seed=1)
                twin.load_state_dict(model.state_dict())
                target = STAC(wrapper if target_model is wrapper else twin, lr=1e-2)
                target.load_state_dict(checkpoint)
                assert target.nonfinite_skipped_steps == 1, kind
                for p, q in zip(model.parameters(), [*target.param_groups[0]["params"],
                                                      *target.param_groups[1]["params"]]):
                    for key, value in optimizer.state[p].items():
                        assert torch.equal(value, target.state[q][key]), (kind, key)


def test_a_sharded_stac_resumes_from_a_distributed_checkpoint_bit_for_bit(one_rank_process_group, tmp_path):
    # FSDP2 on one rank: parameters and state are DTensors, checked shard by shard at load. (STAC op by op is the
    # step that runs on DTensors on this branch; the other optimizers join with the shard-aware step.)
    from torch.distributed.fsdp import fully_shard

    def sharded(seed):
        model = model_and_data(seed)[0]
        for layer in (model[0], model[2], model[4], model):
            fully_shard(layer)
        return model, STAC(model, lr=1e-2, fused=False)

    model, optimizer = sharded(0)
    _, inputs, targets = model_and_data()
    train(model, optimizer, inputs, targets, 3, nonfinite_at=1)
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=tmp_path)
    twin, resumed = sharded(1)
    loaded = {"model": get_model_state_dict(twin), "optimizer": get_optimizer_state_dict(twin, resumed)}
    dcp.load(loaded, checkpoint_id=tmp_path)
    set_model_state_dict(twin, loaded["model"])
    set_optimizer_state_dict(twin, resumed, loaded["optimizer"])
    assert type(resumed.state[twin[0].weight]["momentum_buffer"]).__name__ == "DTensor"
    assert_resumes_exactly(model, optimizer, twin, resumed)


# stac-optimizer 0.1.5's checkpoint format (seed 001; issue 21): every param group holds stac_role, layer_names,
# param_names and every hyperparameter of both roles; a trunk parameter's state is {'sign_momentum_buffer'} in
# sign_state_dtype, a cap parameter's {'step' (0-d float32), 'exp_avg', 'exp_avg_sq'}; nothing else at top level.
def stac_optimizer_0_1_5_checkpoint(reference, sign_state_dtype, prefix=""):
    """The checkpoint 0.1.5 writes for the model and state of ``reference`` (our STAC on the same model after the
    same steps, with weight_decay=0.0, 0.1.5's default), built by hand."""
    hyperparameters = dict(lr=1e-2, weight_decay=0.0, sign_momentum=0.9, sign_state_dtype=sign_state_dtype,
                           betas=(0.9, 0.999), eps=1e-8, sign_weight_decay=0.0, adamw_weight_decay=0.0,
                           amsgrad=False, maximize=False, error_if_nonfinite=False)
    groups, state, index = [], {}, 0
    for group in reference.param_groups:
        role = group["role"]
        params = list(range(index, index + len(group["params"])))
        groups.append(dict(hyperparameters, stac_role=role, lr=group["lr"], params=params,
                           layer_names=[prefix + name for name in group["layer_names"]],
                           param_names=[prefix + name for name in group["param_names"]]))
        for param_index, param in zip(params, group["params"]):
            saved = reference.state[param]
            if role == "sign":
                state[param_index] = {"sign_momentum_buffer": saved["momentum_buffer"].to(sign_state_dtype).clone()}
            else:
                state[param_index] = {key: saved[key].clone() for key in ("step", "exp_avg", "exp_avg_sq")}
                assert state[param_index]["step"].dtype == torch.float32 and state[param_index]["step"].dim() == 0
        index += len(params)
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("sign_state_dtype, prefix", [(torch.float32, ""), (torch.bfloat16, "module.")])
def test_a_stac_optimizer_0_1_5_checkpoint_loads_and_resumes(sign_state_dtype, prefix):
    model, optimizer = trained("stac", sign_state_dtype=sign_state_dtype)
    checkpoint = stac_optimizer_0_1_5_checkpoint(optimizer, sign_state_dtype, prefix)
    twin, resumed = trained("stac", seed=1, sign_state_dtype=sign_state_dtype)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(checkpoint)
    assert [group["stac_role"] for group in resumed.param_groups] == ["sign", "adamw"]
    assert resumed.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert resumed.state[twin[0].weight]["momentum_buffer"].dtype == sign_state_dtype
    optimizer.nonfinite_skipped_steps = 0  # 0.1.5 does not save it
    assert_resumes_exactly(model, optimizer, twin, resumed)


def test_a_stac_optimizer_0_1_5_checkpoint_of_another_split_is_refused():
    _, optimizer = trained("stac")
    checkpoint = stac_optimizer_0_1_5_checkpoint(optimizer, torch.float32)
    other = STAC(model_and_data()[0], last_n_layers=2)
    with pytest.raises(ValueError, match=r"checkpoint sign layer names \['0', '2'\] do not match this model's "
                                         r"\['0'\]"):
        other.load_state_dict(checkpoint)


def older_form(state_dict, name):
    """``state_dict`` as this library wrote it before groups held betas: STAM's b1_base and b2, STAMLite's b1_base
    and moment_decay, STAC's trunk sign_momentum and snr_b2 (no stac_role), nonfinite_skipped_steps at the top."""
    state_dict = copy.deepcopy(state_dict)
    names = {"stam": ("b1_base", "b2"), "stam_lite_bf16_state": ("b1_base", "moment_decay")}.get(name)
    for group in state_dict["param_groups"]:
        state_dict["nonfinite_skipped_steps"] = group.pop("nonfinite_skipped_steps")
        if name.startswith("stac"):
            group.pop("stac_role")
            if group["role"] == "sign":
                group["sign_momentum"], group["snr_b2"] = group.pop("betas")
        else:
            group.update(zip(names, group.pop("betas")))
    return state_dict


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_of_earlier_versions_load_and_resume(name):
    model, optimizer = trained(name)
    twin, resumed = trained(name, seed=1)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(older_form(optimizer.state_dict(), name))
    assert [group.keys() for group in resumed.param_groups] == [group.keys() for group in optimizer.param_groups]
    assert_resumes_exactly(model, optimizer, twin, resumed)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_every_setting_and_step_as_the_original(name, how):
    _, optimizer = trained(name, fused=False, error_if_nonfinite=False)
    optimizer.error_if_nonfinite = True
    copied = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    for setting in optimizer._settings:
        if setting != "partition":
            assert getattr(copied, setting) == getattr(optimizer, setting), setting
    assert copied.nonfinite_skipped_steps == 1 and copied.fused is False and copied.error_if_nonfinite is True
    if name.startswith("stac"):
        assert copied.partition.sign_layer_names == optimizer.partition.sign_layer_names
        assert copied.partition.table() == optimizer.partition.table()
        with pytest.raises(RuntimeError, match="add_param_group"):
            copied.add_param_group({"params": [nn.Parameter(torch.ones(1))]})
    originals = [p for group in optimizer.param_groups for p in group["params"]]
    copies = [p for group in copied.param_groups for p in group["params"]]
    for seed in range(2):
        for p, q in zip(originals, copies):
            q.grad = p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
        optimizer.step()
        copied.step()
    for p, q in zip(originals, copies):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert value.dtype == copied.state[q][key].dtype and torch.equal(value, copied.state[q][key])
    originals[0].grad.view(-1)[0] = math.nan
    with pytest.raises(RuntimeError, match="error_if_nonfinite=True"):
        copied.step()
