"""STAC's partition rule (seeds 000/001) and the routing switches."""

import pytest
import torch
from torch import nn

from stac_stam.partition import (module_output_layer, partition_trainable_layers, same_parameter_names, split_layers,
                                 tree_layers, without_wrapper_prefixes)
from stac_stam.torch import STAC


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_last_layer_is_the_cap_in_registration_order():
    partition = partition_trainable_layers(mlp(), last_n_layers=1)
    assert partition.sign_layer_names == ("0", "2")
    assert partition.adamw_layer_names == ("4",)
    assert partition.trunk_layer_names == ("0", "2")
    assert partition.cap_layer_names == ("4",)
    assert partition.adamw_parameter_names == ("4.weight", "4.bias")


def test_registration_order_not_alphabetical_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.zeta = nn.Linear(2, 2)
            self.alpha = nn.Linear(2, 2)
            self.mid = nn.Linear(2, 2)

    partition = partition_trainable_layers(Net(), last_n_layers=1)
    assert partition.sign_layer_names == ("zeta", "alpha")
    assert partition.adamw_layer_names == ("mid",)


def test_zero_keeps_everything_in_the_trunk_and_oversized_moves_everything_to_the_cap():
    assert partition_trainable_layers(mlp(), 0).adamw_layer_names == ()
    assert partition_trainable_layers(mlp(), 0).sign_layer_names == ("0", "2", "4")
    assert partition_trainable_layers(mlp(), 99).sign_layer_names == ()
    assert partition_trainable_layers(mlp(), 99).adamw_layer_names == ("0", "2", "4")


def test_frozen_parameters_are_skipped_when_counting_layers():
    model = mlp()
    model[4].requires_grad_(False)
    partition = partition_trainable_layers(model, 1)
    assert partition.adamw_layer_names == ("2",)
    model[2].bias.requires_grad_(False)
    assert partition_trainable_layers(model, 1).adamw_parameter_names == ("2.weight",)


def test_shared_parameter_belongs_to_its_first_owner_and_root_parameters_form_root():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.encoder = nn.Linear(2, 2, bias=False)
            self.decoder = nn.Linear(2, 2)
            self.decoder.weight = self.encoder.weight

    partition = partition_trainable_layers(Tied(), 1)
    assert partition.sign_layer_names == ("<root>", "encoder")
    assert partition.adamw_parameter_names == ("decoder.bias",)
    assert partition.sign_parameter_names == ("scale", "encoder.weight")


def test_norm_layers_switch_and_name_predicate_route_to_the_cap():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    default = partition_trainable_layers(model, 1)
    assert default.adamw_layer_names == ("4",)
    with_norms = partition_trainable_layers(model, 1, adamw_norm_layers=True)
    assert with_norms.sign_layer_names == ("0", "2")
    assert with_norms.adamw_layer_names == ("1", "3", "4")
    by_name = partition_trainable_layers(model, 1, adamw_params=lambda name: name.endswith("bias"))
    assert by_name.sign_parameter_names == ("0.weight", "1.weight", "2.weight", "3.weight")
    assert by_name.adamw_parameter_names == ("0.bias", "1.bias", "2.bias", "3.bias", "4.weight", "4.bias")


def test_a_norm_layer_is_known_by_its_class_name_not_by_torch_type():
    class LlamaRMSNorm(nn.Module):  # as Hugging Face writes it: not a subclass of nn.RMSNorm
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

    model = nn.Sequential(nn.Linear(3, 4), LlamaRMSNorm(4), nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    partition = partition_trainable_layers(model, 1, adamw_norm_layers=True)
    assert partition.adamw_layer_names == ("1", "3", "4")


def test_partition_table_lists_layers_roles_counts_and_state_bytes():
    table = STAC(mlp(), last_n_layers=1).partition.table()
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "role", "params", "state", "bytes"]
    assert lines[1].split() == ["0", "sign", "16", "64"]
    assert lines[3].split() == ["4", "adamw", "10", "80"]


@pytest.mark.parametrize("options, dtype, sign_bytes", [
    (dict(), torch.float32, 64), (dict(sign_state_dtype=torch.bfloat16), torch.float32, 32),
    (dict(sign_momentum=0.0), torch.float32, 0), (dict(), torch.float64, 128),
    (dict(sign_state_dtype="float32"), torch.bfloat16, 64),
])
def test_partition_table_counts_the_trunk_momentum_in_the_dtype_it_is_stored_in(options, dtype, sign_bytes):
    model = mlp().to(dtype)
    optimizer = STAC(model, last_n_layers=1, fused=False, **options)  # op by op: no kernel to compile
    lines = optimizer.partition.table().splitlines()
    assert lines[1].split() == ["0", "sign", "16", str(sign_bytes)]
    model(torch.randn(2, 3, dtype=dtype)).sum().backward()
    optimizer.step()
    stored = sum(state["momentum_buffer"].nbytes for state in optimizer.state.values() if "momentum_buffer" in state)
    assert stored == sum(int(line.split()[3]) for line in lines[1:] if line.split()[1] == "sign")
    assert partition_trainable_layers(model).table(sign_state_bytes_per_element=1).splitlines()[1].split()[3] == "16"


@pytest.mark.parametrize("options, first_layer_bytes", [
    (dict(sign_momentum=0.0), 48),  # weight (4, 3): 4 + 3 float32; bias (4,): 4 + 1
    (dict(sign_state_dtype=torch.bfloat16), 48 + 2 * 16),
])
def test_partition_table_counts_the_factored_trunk_statistics_as_stored(options, first_layer_bytes):
    model = mlp()
    optimizer = STAC(model, last_n_layers=1, sign_step_scale="factored", **options)
    lines = optimizer.partition.table().splitlines()
    assert lines[1].split() == ["0", "sign", "16", str(first_layer_bytes)]
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    trunk = {id(param) for param in optimizer.partition.sign_parameters}
    stored = sum(value.nbytes for param, state in optimizer.state.items() if id(param) in trunk
                 for key, value in state.items() if key != "step")  # 0-d counts, as AdamW's step, are not counted
    assert stored == sum(int(line.split()[3]) for line in lines[1:] if line.split()[1] == "sign")


class DistributedDataParallel(nn.Module):  # torch's wrappers are known by class name (this module imports no torch)
    def __init__(self, module):
        super().__init__()
        self.module = module


class CheckpointWrapper(nn.Module):
    def __init__(self, module):
        super().__init__()
        self._checkpoint_wrapped_module = module


def test_layer_and_parameter_names_leave_out_the_attributes_wrappers_hold_the_model_under():
    bare = partition_trainable_layers(mlp(), 1)
    inner = mlp()
    inner[2] = CheckpointWrapper(inner[2])
    for model in (DistributedDataParallel(mlp()), torch.compile(mlp()), DistributedDataParallel(torch.compile(mlp())),
                  inner):
        partition = partition_trainable_layers(model, 1, adamw_params=lambda name: name == "2.bias")
        assert partition.sign_layer_names == bare.sign_layer_names
        assert partition.sign_parameter_names == ("0.weight", "0.bias", "2.weight")
        assert partition.adamw_parameter_names == ("2.bias", "4.weight", "4.bias")


def test_a_module_that_merely_has_an_attribute_named_module_keeps_it():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    assert partition_trainable_layers(Block(), 0).sign_parameter_names == ("module.weight", "module.bias")


@pytest.mark.parametrize("saved, current, same", [
    (["module.0.weight"], ["0.weight"], True), (["_orig_mod.0.weight"], ["0.weight"], True),
    (["module._orig_mod.blocks.1._checkpoint_wrapped_module.weight"], ["blocks.1.weight"], True),
    (["_fsdp_wrapped_module.0.weight"], ["0.weight"], True), (["module.weight"], ["module.weight"], True),
    (["0.weight"], ["1.weight"], False), (["module.0.weight", "0.bias"], ["0.weight"], False),
    (["<root>"], ["<root>"], True),
])
def test_saved_names_match_whatever_wrappers_the_saving_model_was_in(saved, current, same):
    assert same_parameter_names(saved, current) is same
    assert without_wrapper_prefixes("module") == "module"


def test_bad_partition_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="last_n_layers must be an integer >= 0, got -1"):
        partition_trainable_layers(mlp(), -1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        partition_trainable_layers(mlp().requires_grad_(False))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        partition_trainable_layers([torch.zeros(2)])


class TiedHead(nn.Module):
    """An embedding, a block and a norm, and a head whose weight is the embedding's (GPT-2's layout)."""

    def __init__(self, norm_width=2, vocab=9, width=22):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(norm_width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight


def test_the_output_layer_is_the_last_module_holding_a_trainable_parameter_shared_or_not():
    model = TiedHead()
    output = module_output_layer(model)
    assert (output.name, output.parameter_names) == ("head", ("embed.weight",))
    assert output.parameters[0] is model.head.weight
    assert partition_trainable_layers(model).output_layer == output
    assert module_output_layer(mlp()).parameter_names == ("4.weight", "4.bias")
    frozen_head = mlp()
    frozen_head[4].requires_grad_(False)
    assert module_output_layer(frozen_head).name == "2"
    assert module_output_layer(mlp(), params=list(mlp().parameters())) is None  # another model's parameters


@pytest.mark.parametrize("model, last_n_layers, default_adamw, sign, adamw", [
    (TiedHead(), 1, ("norm.weight",), (), ("embed.weight", "norm.weight")),
    (TiedHead(), 0, (), ("norm.weight",), ("embed.weight",)),
    (mlp(), 0, (), ("0.weight", "0.bias", "2.weight", "2.bias"), ("4.weight", "4.bias")),
    (mlp(), 1, ("4.weight", "4.bias"), ("0.weight", "0.bias", "2.weight", "2.bias"), ("4.weight", "4.bias")),
])
def test_adamw_output_layer_puts_the_output_layers_parameters_in_the_cap_tied_or_not(model, last_n_layers,
                                                                                     default_adamw, sign, adamw):
    assert partition_trainable_layers(model, last_n_layers).adamw_parameter_names == default_adamw
    routed = partition_trainable_layers(model, last_n_layers, adamw_output_layer=True)
    assert routed.sign_parameter_names == sign
    assert routed.adamw_parameter_names == adamw


def test_a_pytree_output_layer_is_its_last_layer():
    import numpy as np  # a pytree of NumPy arrays: the rule the JAX partition runs, without JAX

    tree = {"embed": {"table": np.zeros((8, 4))}, "block": {"kernel": np.zeros((4, 4)), "bias": np.zeros(4)},
            "head": {"kernel": np.zeros((4, 8))}}
    partition = split_layers(tree_layers(tree), 0, adamw_output_layer=True)
    assert partition.adamw_parameter_names == ("head/kernel",)
    assert partition.sign_layer_names == ("embed", "block")
    assert partition.tied_output_warning() is None  # a pytree shares no parameter


@pytest.mark.parametrize("norm_width, options, warns", [
    (1, dict(), True),  # the cap: 1 of 199 parameters, under 1%
    (2, dict(), False),  # 2 of 200: 1%, a cap the user chose
    (1, dict(adamw_output_layer=True), False),
    (1, dict(adamw_params=lambda name: name == "embed.weight"), False),
])
def test_the_tied_output_warning_needs_a_tied_output_weight_in_the_trunk_and_a_cap_under_one_percent(
        norm_width, options, warns):
    partition = partition_trainable_layers(TiedHead(norm_width), 1, **options)
    assert (partition.tied_output_warning() is not None) is warns


def test_a_parameter_shared_inside_the_trunk_is_no_tied_output():
    model = mlp()
    model[2] = nn.Linear(4, 4)
    model[3] = nn.Linear(4, 4)
    model[3].weight = model[2].weight  # a weight used twice in the trunk (ALBERT's sharing), an untied head
    partition = partition_trainable_layers(model, 0)  # an empty cap: under 1% of anything
    assert partition.sign_parameter_names == ("0.weight", "0.bias", "2.weight", "2.bias", "3.bias", "4.weight",
                                              "4.bias")
    assert partition.tied_output_warning() is None


def test_params_choose_the_parameters_and_the_others_count_as_frozen():
    model = mlp()
    partition = partition_trainable_layers(model, 1, params=[model[0].weight, model[2].weight])
    assert partition.sign_parameter_names == ("0.weight",)
    assert partition.adamw_parameter_names == ("2.weight",)
    with pytest.raises(ValueError, match="adamw_output_layer must be True or False, got 1"):
        partition_trainable_layers(model, adamw_output_layer=1)
