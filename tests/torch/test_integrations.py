"""STAC with the libraries users train with: Hugging Face models (a tied and an untied LM head), Trainer and
Lightning (the examples, resumed from their checkpoints), and the parameters and param groups they hand an
optimizer. Everything is built from configs and generated data: nothing is downloaded. transformers and Lightning
are slow to import: this module imports them once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402
import runpy  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer,  # noqa: E402
                          TrainingArguments)

import reference  # noqa: E402
from stac_stam.torch import STAC  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
TIED_OUTPUT = "STAC: the output layer"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, and lose much when other work holds the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                      eos_token_id=0))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                        tie_word_embeddings=False))


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)


def build(params, **options):
    """STAC and the tied-output warnings its construction gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = STAC(params, fused=False, **options)
    return optimizer, [str(w.message) for w in caught if str(w.message).startswith(TIED_OUTPUT)]


# Tied weights --------------------------------------------------------------------------------------------------

def test_a_tied_gpt2_head_left_in_the_trunk_warns_once_naming_the_fix():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    optimizer, messages = build(model, last_n_layers=1)
    assert optimizer.partition.adamw_parameter_names == ("transformer.ln_f.weight", "transformer.ln_f.bias")
    assert messages == [
        "STAC: the output layer 'lm_head' uses the parameter 'transformer.wte.weight' of the earlier layer "
        "'transformer.wte' (tied weights); a shared parameter belongs to its first owner, so it takes sign updates "
        "in the trunk, and the AdamW cap holds 64 of the 28,032 trainable parameters (0.23%). Pass "
        "adamw_output_layer=True to put the output layer's parameters in the AdamW cap."]


@pytest.mark.parametrize("make_model, options", [
    (gpt2, dict(adamw_output_layer=True)),
    (gpt2, dict(last_n_layers=2)),  # a tied head in the trunk, but a cap of 15% the user chose
    (gpt2, dict(adamw_params=lambda name: name == "transformer.wte.weight")),
    (llama, dict()),  # an untied head: it is the last layer, in the cap
    (llama, dict(last_n_layers=0)),  # no cap and an untied head in the trunk: what the user asked for
    (mlp, dict(last_n_layers=0)),
])
def test_no_warning_for_a_head_in_the_cap_an_untied_head_or_a_cap_of_one_percent_or_more(make_model, options):
    _, messages = build(make_model(), **options)
    assert messages == []


@pytest.mark.parametrize("make_model, head, cap", [
    (gpt2, "lm_head", ("transformer.wte.weight",)),
    (llama, "lm_head", ("lm_head.weight",)),
    (mlp, "4", ("4.weight", "4.bias")),
])
def test_adamw_output_layer_puts_the_output_layers_weight_in_the_cap_tied_or_not(make_model, head, cap):
    model = make_model()
    optimizer, _ = build(model, last_n_layers=0, adamw_output_layer=True)
    assert optimizer.partition.adamw_parameter_names == cap
    [adamw_group] = [group for group in optimizer.param_groups if group["role"] == "adamw"]
    assert adamw_group["params"] == [param for _, param in model.get_submodule(head).named_parameters()]
    with_cap, _ = build(model, last_n_layers=1, adamw_output_layer=True)
    assert set(cap) <= set(with_cap.partition.adamw_parameter_names)


def test_a_tied_weight_in_the_cap_takes_one_adamw_step_from_both_of_its_uses():
    model = gpt2().double()
    tied = model.lm_head.weight
    expected = tied.detach().numpy().copy()
    state = {}
    optimizer, _ = build(model, lr=1e-2, weight_decay=0.1, adamw_output_layer=True)
    tokens = torch.arange(32).reshape(2, 16) % 64
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()  # the embedding's and the head's gradients, summed
        expected = reference.adamw_step(expected, tied.grad.numpy().copy(), state, lr=1e-2, weight_decay=0.1)
        optimizer.step()
        np.testing.assert_allclose(tied.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


# Parameters and param groups -----------------------------------------------------------------------------------

def test_parameters_or_named_parameters_with_the_model_make_the_same_stac_as_the_model():
    model = mlp()
    expected = STAC(model, fused=False)
    for params in (model.parameters(), model.named_parameters(), [{"params": list(model.parameters())}]):
        optimizer = STAC(params, model=model, fused=False)
        assert [(g["role"], g["param_names"], g["params"]) for g in optimizer.param_groups] == [
            (g["role"], g["param_names"], g["params"]) for g in expected.param_groups]
    assert STAC(model=model).partition.adamw_parameter_names == ("4.weight", "4.bias")  # seed 000 called it model
    recommended = STAC.recommended(model.parameters(), model=model, fused=False)
    assert [g["param_names"] for g in recommended.param_groups] == [g["param_names"] for g in expected.param_groups]


def test_params_choose_what_stac_optimizes():
    model = mlp()
    optimizer = STAC([model[0].weight, model[2].weight, model[2].bias], model=model, fused=False)
    assert optimizer.partition.sign_parameter_names == ("0.weight",)
    assert optimizer.partition.adamw_parameter_names == ("2.weight", "2.bias")


def test_each_param_groups_weight_decay_holds_in_both_roles_against_the_float64_reference():
    model = mlp(torch.float64)
    biases = [p for p in model.parameters() if p.ndim == 1]
    weights = [p for p in model.parameters() if p.ndim == 2]
    optimizer = STAC([{"params": weights}, {"params": biases, "weight_decay": 0.0}], model=model, lr=1e-2,
                     weight_decay=0.5, fused=False)
    assert [(g["role"], g["weight_decay"], g["param_names"]) for g in optimizer.param_groups] == [
        ("sign", 0.5, ["0.weight", "2.weight"]), ("sign", 0.0, ["0.bias", "2.bias"]),
        ("adamw", 0.5, ["4.weight"]), ("adamw", 0.0, ["4.bias"])]
    expected = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    states = {name: {} for name in expected}
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for name, p in model.named_parameters():
            decay = 0.5 if p.ndim == 2 else 0.0
            step_of = reference.adamw_step if name.startswith("4.") else reference.sign_step
            expected[name] = step_of(expected[name], p.grad.numpy(), states[name],
                                     lr=1e-2 if name.startswith("4.") else 0.75e-2, weight_decay=decay)
        optimizer.step()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), expected[name], rtol=1e-12, atol=1e-12)


def test_what_stac_cannot_take_is_refused_naming_the_argument():
    model, other = mlp(), mlp()
    params = list(model.parameters())
    cases = [
        (lambda: STAC(params), TypeError,
         "STAC splits a model into layers, so it needs the model (a torch.nn.Module); got params (a list) and no "
         "model=. Pass STAC(model, ...), or STAC(params, model=model, ...) to choose the parameters or give param "
         "groups their own weight_decay. With Hugging Face Trainer, put the model in the kwargs: "
         "optimizer_cls_and_kwargs=(STAC, {'model': model, ...})."),
        (lambda: STAC(params, model=params), TypeError, "model must be a torch.nn.Module, got list"),
        (lambda: STAC(model, model=other), ValueError, "STAC got two models"),
        (lambda: STAC(params[0], model=model), TypeError, "params must be an iterable of parameters, of (name, "
                                                          "parameter) pairs or of param group dicts, got a Parameter"),
        (lambda: STAC([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], model=model), ValueError,
         "params[1] sets 'lr': a param group given to STAC may set its own weight_decay only; lr, betas and eps are "
         "per role (lr, sign_lr, adamw_lr, betas, eps, sign_momentum)"),
        (lambda: STAC([{"params": params, "weight_decay": -1.0}], model=model), ValueError,
         "params[0]['weight_decay'] must be in [0.0, inf), got -1.0"),
        (lambda: STAC([params[0], other[0].weight], model=model), ValueError,
         "params[1] (a tensor of shape (4, 3)) is not a parameter of model"),
        (lambda: STAC([{"params": params}, {"params": params[:1]}], model=model), ValueError,
         "params[1]['params'][0] appears twice in params: list each parameter once"),
        (lambda: STAC([params[0], "4.weight"], model=model), TypeError,
         "params[1] must be a parameter of model or a (name, parameter) pair, got str"),
        (lambda: STAC(model, adamw_output_layer="yes"), ValueError, "adamw_output_layer must be True or False"),
    ]
    for make, error, message in cases:
        with pytest.raises(error) as raised:
            make()
        assert str(raised.value).startswith(message), str(raised.value)


# Trainers ------------------------------------------------------------------------------------------------------

def test_hf_trainer_without_the_model_in_its_kwargs_gets_the_fix(tmp_path):
    model = mlp()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(STAC, {"lr": 1e-3}))
    with pytest.raises(TypeError, match=r"optimizer_cls_and_kwargs=\(STAC, \{'model': model, \.\.\.\}\)"):
        trainer.create_optimizer()


def run_example(name, tmp_path):
    """The example's namespace, and what its ``main`` returned."""
    namespace = runpy.run_path(str(EXAMPLES / name))
    return namespace, namespace["main"](tmp_path)


def test_hf_trainer_example_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        example, (uninterrupted, resumed) = run_example("hf_trainer.py", tmp_path)
    assert not [w for w in caught if str(w.message).startswith(TIED_OUTPUT)]
    optimizer = uninterrupted.optimizer.optimizer  # Trainer's accelerate wrapper holds STAC
    assert isinstance(optimizer, STAC)
    assert "transformer.wte.weight" in optimizer.partition.adamw_parameter_names
    assert resumed.state.global_step == uninterrupted.state.global_step == 8
    trained, initial = uninterrupted.model.state_dict(), example["tiny_gpt2"](0).state_dict()
    assert not torch.equal(trained["transformer.wte.weight"], initial["transformer.wte.weight"])
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_lightning_example_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    example, (uninterrupted, resumed) = run_example("lightning_module.py", tmp_path)
    assert resumed.trainer.global_step == uninterrupted.trainer.global_step == 8
    initial = example["TinyLlama"](seed=0).state_dict()
    assert not torch.equal(uninterrupted.state_dict()["model.lm_head.weight"], initial["model.lm_head.weight"])
    optimizer = uninterrupted.optimizers().optimizer
    norms = [name for name, p in uninterrupted.named_parameters() if p.ndim == 1]
    assert [(g["role"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("sign", 0.1), ("sign", 0.0), ("adamw", 0.1)]
    assert optimizer.param_groups[1]["param_names"] == norms
    trained = uninterrupted.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, trained[name]), name


@pytest.mark.parametrize("make_model", [gpt2, llama])
def test_compact_puts_the_output_layer_and_the_norms_in_the_cap_and_keeps_a_quarter_of_adamws_state(make_model):
    # The issue-19 budget: state tensors as stored (int8 codes, their row scales, the factored statistics and the
    # cap's two moments) at most 25% of AdamW's bytes.
    model = make_model()
    optimizer = STAC.compact(model, lr=1e-3)
    names = optimizer.partition.adamw_parameter_names
    output = {"transformer.wte.weight"} if make_model is gpt2 else {"lm_head.weight"}
    norms = {f"{module_name}.{own}" for module_name, module in model.named_modules()
             if "Norm" in type(module).__name__ for own, _ in module.named_parameters(recurse=False)}
    assert output | norms <= set(names) and norms
    adamw = torch.optim.AdamW(make_model().parameters())
    for opt in (optimizer, adamw):
        for param in (p for group in opt.param_groups for p in group["params"]):
            param.grad = torch.ones_like(param)
        opt.step()
    stored = sum(v.nbytes for state in optimizer.state.values() for v in state.values() if v.dim())
    assert stored <= 0.25 * sum(v.nbytes for state in adamw.state.values() for v in state.values() if v.dim())
    partition_bytes = sum(int(line.split()[3]) for line in optimizer.partition.table().splitlines()[1:])
    assert partition_bytes == stored
