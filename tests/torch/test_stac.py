"""STAC for PyTorch, held to the float64 reference, to torch.optim.AdamW and to the golden vectors."""

import json
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

import reference
from stac_stam.torch import STAC

GOLDEN = {"cases": [case for filename in ("stac.json", "stac_factored.json") for case in json.loads(
    (pathlib.Path(__file__).resolve().parents[1] / "golden" / filename).read_text())["cases"]]}


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)


def set_grads(model, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return params, state


def assert_same(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    assert before[1].keys() == after[1].keys()
    for key in before[1]:
        for name, value in before[1][key].items():
            assert torch.equal(value, after[1][key][name])


@pytest.mark.parametrize("options", [
    dict(last_n_layers=1, lr=1e-2, weight_decay=1e-2),
    dict(last_n_layers=2, lr=3e-2, sign_momentum=0.0, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
    dict(last_n_layers=1, lr=1e-2, sign_momentum=0.5, maximize=True, amsgrad=True, weight_decay=0.0),
    dict(last_n_layers=1, lr=1e-2, sign_momentum=0.99, sign_interpolation=0.9, maximize=True, weight_decay=1e-2),
    dict(last_n_layers=1, lr=1e-2, sign_step_scale="snr", maximize=True, betas=(0.9, 0.99), eps=1e-6,
         weight_decay=1e-2),
    dict(last_n_layers=0, lr=1e-2, sign_momentum=0.8, sign_step_scale="snr", weight_decay=0.0),
    dict(last_n_layers=0, lr=1e-2, weight_decay=1e-2),
    dict(last_n_layers=1, lr=1e-2, sign_momentum=0.0, sign_step_scale="factored", weight_decay=1e-2),
    dict(last_n_layers=0, lr=1e-2, sign_momentum=0.9, sign_interpolation=0.5, sign_step_scale="factored",
         maximize=True, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1),
    dict(last_n_layers=1, lr=1e-2, sign_step_scale="factored", sign_state_dtype="int8", maximize=True,
         weight_decay=1e-2),
    dict(last_n_layers=1, lr=1e-2, sign_lr=5e-3, adamw_lr=2e-2, weight_decay=1e-2, sign_weight_decay=0.5,
         adamw_weight_decay=0.0),
])
def test_every_step_matches_the_float64_reference(options):
    model = mlp(torch.float64)
    optimizer = STAC(model, **options)
    partition = optimizer.partition
    ref_params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    ref_states = {n: {} for n in ref_params}
    hybrid = bool(partition.sign_layers) and bool(partition.adamw_layers)
    sign_lr, adamw_lr = reference.stac_learning_rates(options["lr"], bool(partition.sign_layers),
                                                      bool(partition.adamw_layers))
    sign_lr = options.get("sign_lr", sign_lr)
    adamw_lr = options.get("adamw_lr", adamw_lr)
    assert hybrid == (options["last_n_layers"] > 0)
    for step in range(6):
        set_grads(model, seed=step)
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        optimizer.step()
        for name in ref_params:
            if name in partition.adamw_parameter_names:
                ref_params[name] = reference.adamw_step(
                    ref_params[name], grads[name], ref_states[name], lr=adamw_lr,
                    betas=options.get("betas", (0.9, 0.999)), eps=options.get("eps", 1e-8),
                    weight_decay=options.get("adamw_weight_decay", options["weight_decay"]),
                    amsgrad=options.get("amsgrad", False), maximize=options.get("maximize", False))
            else:
                ref_params[name] = reference.sign_step(
                    ref_params[name], grads[name], ref_states[name], lr=sign_lr,
                    sign_momentum=options.get("sign_momentum", 0.9),
                    sign_interpolation=options.get("sign_interpolation"),
                    sign_step_scale=options.get("sign_step_scale"), b2=options.get("betas", (0.9, 0.999))[1],
                    eps=options.get("eps", 1e-8),
                    weight_decay=options.get("sign_weight_decay", options["weight_decay"]),
                    maximize=options.get("maximize", False), int8_momentum=options.get("sign_state_dtype") == "int8")
        for name, param in model.named_parameters():
            np.testing.assert_allclose(param.detach().numpy(), ref_params[name], rtol=1e-12, atol=1e-12)
            state = optimizer.state[param]
            for key in ("momentum_buffer", "grad_sq_mean", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                        "exp_avg_sq_row", "exp_avg_sq_col", "momentum_scale"):
                assert (key in state) == (key in ref_states[name]), key
                if key in state:
                    np.testing.assert_allclose(state[key].numpy(), ref_states[name][key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_golden_vectors(case, dtype, tolerance):
    model = mlp(dtype)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for entry in case["params"]:
            named[entry["name"]].copy_(torch.tensor(entry["value"], dtype=dtype).reshape(entry["shape"]))
    hyper = case["hyperparams"]
    optimizer = STAC(model, last_n_layers=case["last_n_layers"], lr=hyper["lr"],
                     sign_momentum=hyper.get("sign_momentum", 0.9), sign_step_scale=hyper.get("sign_step_scale"),
                     sign_state_dtype=hyper.get("sign_state_dtype"),
                     weight_decay=hyper["weight_decay"],
                     betas=tuple(hyper.get("betas", (0.9, 0.999))), eps=hyper.get("eps", 1e-8))
    for step_grads, expected in zip(case["grads"], case["expected"]):
        for entry, grad in zip(case["params"], step_grads):
            named[entry["name"]].grad = torch.tensor(grad, dtype=dtype).reshape(entry["shape"])
        optimizer.step()
        for entry, values in zip(case["params"], expected):
            np.testing.assert_allclose(named[entry["name"]].detach().double().numpy().ravel(), values,
                                       rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True, maximize=True, weight_decay=0.3, betas=(0.8, 0.9))])
def test_cap_only_is_torch_adamw(options):
    model, twin = mlp(), mlp()
    stac = STAC(model, last_n_layers=10, lr=1e-2, **options)
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True, **{"weight_decay": 0.0, **options})
    assert stac.partition.sign_layer_names == ()
    for step in range(5):
        set_grads(model, step)
        set_grads(twin, step)
        stac.step()
        adamw.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_learning_rates_of_each_role_and_seed_000_aliases():
    optimizer = STAC(mlp(), lr=1e-3)
    assert [(g["role"], g["lr"]) for g in optimizer.param_groups] == [("sign", 0.75e-3), ("adamw", 1e-3)]
    assert STAC(mlp(), lr=1e-3, last_n_layers=0).param_groups[0]["lr"] == 1e-3
    old = STAC(mlp(), lr=1e-3, trunk_momentum=0.8, trunk_lr=8e-4, cap_lr=2e-3, trunk_weight_decay=0.1,
               cap_weight_decay=0.2)
    sign, cap = old.param_groups
    assert (sign["betas"][0], sign["lr"], sign["weight_decay"]) == (0.8, 8e-4, 0.1)
    assert (cap["lr"], cap["weight_decay"]) == (2e-3, 0.2)
    assert STAC(mlp(), sign_momentum=0.8, trunk_momentum=0.8).param_groups[0]["betas"][0] == 0.8
    with pytest.raises(ValueError, match="trunk_momentum is seed 000's name for sign_momentum"):
        STAC(mlp(), sign_momentum=0.9, trunk_momentum=0.8)
    with pytest.raises(ValueError, match="cap_weight_decay is seed 000's name for adamw_weight_decay"):
        STAC(mlp(), adamw_weight_decay=0.0, cap_weight_decay=0.1)


def assert_same_steps(model, optimizer, twin, twin_optimizer, steps=3):
    """The two optimizers, given the same gradients, leave their models bit-identical."""
    for step in range(steps):
        set_grads(model, seed=step)
        set_grads(twin, seed=step)
        optimizer.step()
        twin_optimizer.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_recommended_preset_is_stac_with_snr_scaled_bf16_trunk_at_three_times_the_rate():
    model, twin = mlp(), mlp()
    preset = STAC.recommended(model, lr=2e-3)
    explicit = STAC(twin, lr=2e-3, sign_step_scale="snr", sign_lr=3 * 2e-3, sign_state_dtype=torch.bfloat16)
    assert [(g["role"], g["lr"]) for g in preset.param_groups] == [("sign", 6e-3), ("adamw", 2e-3)]
    assert_same_steps(model, preset, twin, explicit)
    assert preset.state[model[0].weight]["momentum_buffer"].dtype == torch.bfloat16
    overridden = STAC.recommended(mlp(), lr=1e-3, sign_state_dtype=None, sign_lr=1e-4)
    assert overridden.sign_state_dtype is None and overridden.param_groups[0]["lr"] == 1e-4


def test_compact_preset_is_the_factored_trunk_with_int8_momentum_and_the_output_layer_and_norms_in_the_cap():
    model, twin = mlp(), mlp()
    preset = STAC.compact(model, lr=2e-3)
    explicit = STAC(twin, lr=2e-3, sign_lr=6e-3, sign_step_scale="factored", sign_state_dtype="int8",
                    adamw_output_layer=True, adamw_norm_layers=True)
    assert [(g["role"], g["lr"]) for g in preset.param_groups] == [("sign", 6e-3), ("adamw", 2e-3)]
    assert_same_steps(model, preset, twin, explicit)
    state = preset.state[model[0].weight]
    assert state["momentum_buffer"].dtype == torch.int8 and state["momentum_scale"].shape == (4,)
    assert state["exp_avg_sq_row"].shape == (4,) and state["exp_avg_sq_col"].shape == (3,)
    assert STAC.compact(mlp(), lr=1e-3, sign_momentum=0.0).state_dict()["param_groups"][0]["betas"][0] == 0.0


@pytest.mark.parametrize("options", [dict(sign_state_dtype="int8"), dict(sign_momentum=0.0, maximize=True),
                                     dict(sign_state_dtype="int8", sign_interpolation=0.5, weight_decay=0.1)])
def test_the_factored_trunks_c_kernel_steps_as_its_torch_code_on_tensors_of_many_blocks(options, monkeypatch):
    # The C kernel sums g^2 and u^2 over blocks of at most 4096 columns and about 2^18 values, and updates rows in
    # blocks of about 16384 values: these tensors span several of each, and a parameter of no columns.
    from stac_stam.torch._kernels import GroupTensors

    def model(seed):
        torch.manual_seed(seed)
        return nn.ParameterList([torch.randn(shape) for shape in ((3000, 100), (12, 5000), (7,), (), (5, 0))])

    def train(params, threads, **kwargs):
        optimizer = STAC(params, last_n_layers=0, lr=1e-2, sign_step_scale="factored", **options, **kwargs)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for step in range(3):
                set_grads(params, seed=step)
                optimizer.step()
        finally:
            torch.set_num_threads(previous)
        return optimizer

    paths = []
    init = GroupTensors.__init__
    monkeypatch.setattr(GroupTensors, "__init__", lambda self, *a, **k: (init(self, *a, **k), paths.append(self))[0])
    runs = [(params := model(0), train(params, threads, **kwargs)) for threads, kwargs in
            ((2, {}), (1, {}), (1, dict(fused=False)))]
    assert [group.path for group in paths] == ["cpu"] * 6 + ["per_tensor"] * 3
    (c_params, c_optimizer), (one_thread_params, one_thread_optimizer), (torch_params, torch_optimizer) = runs
    for p, q, r in zip(c_params, one_thread_params, torch_params):
        assert torch.equal(p, q)  # the same bits on any thread count
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
        for key, value in c_optimizer.state[p].items():
            assert torch.equal(value, one_thread_optimizer.state[q][key])
            torch.testing.assert_close(value, torch_optimizer.state[r][key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), r"lr must be in \[0.0, inf\), got -1.0"),
    (dict(sign_momentum=1.0), r"sign_momentum must be in \[0.0, 1.0\), got 1.0"),
    (dict(betas=(0.9, 1.5)), r"betas\[1\] must be in \[0.0, 1.0\), got 1.5"),
    (dict(betas=0.9), r"betas must be a pair"),
    (dict(eps=-1e-8), r"eps must be in"),
    (dict(weight_decay=-0.1), r"weight_decay must be in"),
    (dict(adamw_lr=-1.0), r"adamw_lr must be in"),
    (dict(lr="fast"), r"lr must be a number or a 0-d floating tensor, got 'fast'"),
    (dict(sign_state_dtype=torch.int16), r"sign_state_dtype must be a floating torch dtype"),
    (dict(sign_state_dtype="bfloat17"), r"sign_state_dtype must be a floating torch dtype"),
    (dict(last_n_layers=1.5), r"last_n_layers must be an integer >= 0"),
    (dict(sign_interpolation=1.0), r"sign_interpolation must be in \[0.0, 1.0\), got 1.0"),
    (dict(sign_step_scale="rms"), r"sign_step_scale must be None, 'snr' or 'factored', got 'rms'"),
    (dict(sign_step_scale="snr", sign_momentum=0.0), r"needs sign_momentum > 0"),
    (dict(sign_state_dtype="int8"), r"sign_state_dtype=int8 .* needs sign_step_scale='factored'"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        STAC(mlp(), **kwargs)


def test_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="cautios"):
        STAC(mlp(), cautios=True)


def test_nonfinite_gradient_skips_the_whole_step_or_raises():
    model = mlp()
    optimizer = STAC(model)
    set_grads(model, 0)
    optimizer.step()
    set_grads(model, 1)
    model[0].weight.grad[0, 0] = float("nan")
    before = snapshot(model, optimizer)
    optimizer.step()
    assert optimizer.nonfinite_skipped_steps == 1
    assert_same(before, snapshot(model, optimizer))

    strict = STAC(model, error_if_nonfinite=True)
    model[4].bias.grad[0] = float("inf")
    before = snapshot(model, strict)
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        strict.step()
    assert_same(before, snapshot(model, strict))


def test_sparse_gradients_and_add_param_group_are_refused():
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2))
    optimizer = STAC(model)
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients \\(parameter '0.weight'\\)"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="add_param_group\\(\\) is not supported"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_missing_grad_frozen_and_zero_size_parameters():
    model = nn.Sequential(nn.Linear(3, 0), nn.Linear(0, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    optimizer = STAC(model)
    for step in range(2):
        set_grads(model, step)
        if step == 1:
            model[2].bias.grad = None
        bias_before = model[2].bias.detach().clone()
        optimizer.step()
    assert torch.equal(model[2].bias, bias_before)  # no grad on the last step: untouched
    assert model[1].bias not in optimizer.state


def test_state_dict_round_trip_keeps_bf16_state_and_resumes_exactly(tmp_path):
    model, twin = mlp(), mlp()
    optimizer = STAC(model, sign_state_dtype="bfloat16")
    for step in range(3):
        set_grads(model, step)
        optimizer.step()
    model[0].weight.grad[0, 0] = float("nan")
    optimizer.step()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    twin.load_state_dict(checkpoint["model"])
    resumed = STAC(twin, sign_state_dtype=torch.bfloat16)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.state[twin[0].weight]["momentum_buffer"].dtype == torch.bfloat16
    assert resumed.nonfinite_skipped_steps == 1
    for step in range(3, 6):
        set_grads(model, step)
        set_grads(twin, step)
        optimizer.step()
        resumed.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_another_model_and_changes_nothing():
    model = mlp()
    optimizer = STAC(model)
    set_grads(model, 0)
    optimizer.step()
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    other_optimizer = STAC(other)
    set_grads(other, 0)
    other_optimizer.step()
    before = snapshot(model, optimizer)
    groups_before = [dict(g, params=None) for g in optimizer.param_groups]
    with pytest.raises(ValueError, match="'exp_avg' of parameter '4.weight' has shape \\(3, 4\\)"):
        optimizer.load_state_dict(other_optimizer.state_dict())
    renamed = STAC(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="sign layer names \\['0', '1'\\] do not match this model's \\['0', '2'\\]"):
        optimizer.load_state_dict(renamed.state_dict())
    with pytest.raises(ValueError, match="roles"):
        optimizer.load_state_dict(STAC(mlp(), last_n_layers=0).state_dict())
    assert_same(before, snapshot(model, optimizer))
    assert [dict(g, params=None) for g in optimizer.param_groups] == groups_before


def test_lr_scheduler_drives_both_roles():
    model = mlp()
    optimizer = STAC(model, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    set_grads(model, 0)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.75e-2 * 0.5, 1e-2 * 0.5]


def test_closure_and_step_hooks():
    model = mlp()
    optimizer = STAC(model)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    inputs = torch.randn(8, 3)

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = model(inputs).pow(2).mean()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert torch.is_tensor(loss) and calls == ["pre", "post"]
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_bf16_parameters_train():
    model = mlp(torch.bfloat16)
    optimizer = STAC(model, lr=1e-2)
    inputs, targets = torch.randn(32, 3, dtype=torch.bfloat16), torch.randn(32, 2, dtype=torch.bfloat16)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = (model(inputs) - targets).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]


def test_compiled_training_step_matches_eager():
    model, twin = mlp(), mlp()
    optimizer, eager = STAC(model, lr=1e-2), STAC(twin, lr=1e-2)
    inputs, targets = torch.randn(16, 3), torch.randn(16, 2)

    def train_step(net, opt):
        opt.zero_grad(set_to_none=True)
        loss = (net(inputs) - targets).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend="eager")
    for _ in range(3):
        compiled(model, optimizer)
        train_step(twin, eager)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
