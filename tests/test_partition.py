"""STAC's partition rule (seeds 000/001) and the routing switches."""

import pytest
import torch
from torch import nn

from stac_stam.partition import partition_trainable_layers, same_parameter_names, without_wrapper_prefixes
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
