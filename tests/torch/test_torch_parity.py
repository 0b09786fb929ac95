"""One registry of the library's PyTorch optimizers drives the behaviours every one must have."""

import pytest
import torch
from torch import nn

from stac_stam.torch import STAC, STAM, STAMLite

# name -> factory(model, **hyperparameters)
OPTIMIZERS_UNDER_TEST = {
    "stac": lambda model, **kw: STAC(model, **{"lr": 1e-2, **kw}),
    "stac_bf16_state": lambda model, **kw: STAC(model, **{"lr": 1e-2, "sign_state_dtype": torch.bfloat16, **kw}),
    "stac_snr_scaled": lambda model, **kw: STAC(model, **{"lr": 1e-2, "sign_step_scale": "snr", **kw}),
    "stam": lambda model, **kw: STAM(model.parameters(), **{"lr": 1e-2, **kw}),
    "stam_lite": lambda model, **kw: STAMLite(model.parameters(), **{"lr": 1e-2, "beta1_update_interval": 2, **kw}),
    "stam_lite_bf16_state": lambda model, **kw: STAMLite(
        model.parameters(), **{"lr": 1e-2, "state_dtype": torch.bfloat16, **kw}),
}
NAMES = list(OPTIMIZERS_UNDER_TEST)


def model_and_data(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    inputs = torch.randn(32, 4, dtype=dtype)
    targets = torch.randn(32, 2, dtype=dtype)
    return model, inputs, targets


def train(model, optimizer, inputs, targets, steps):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = (model(inputs) - targets).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def snapshot(model, optimizer):
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in optimizer.state.values()])


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert len(a[1]) == len(b[1])
    for sa, sb in zip(a[1], b[1]):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", NAMES)
def test_trains(name):
    model, inputs, targets = model_and_data()
    losses = train(model, OPTIMIZERS_UNDER_TEST[name](model), inputs, targets, 40)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kernels", ["default", "compiled"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")])
def test_nonfinite_step_changes_nothing_and_is_counted_or_raises(name, kernels, bad_value, request):
    # default: small tensors batched (STAM's and STAMLite's in one C call, the finiteness test from its sums);
    # compiled: the finiteness test from each optimizer's compiled statistics kernel.
    if kernels == "compiled":
        request.getfixturevalue("compile_every_tensor")
    model, inputs, targets = model_and_data()
    optimizer = OPTIMIZERS_UNDER_TEST[name](model)
    train(model, optimizer, inputs, targets, 2)
    (model(inputs) - targets).pow(2).mean().backward()
    # The last tensor: every other tensor's update must wait for its verdict.
    list(model.parameters())[-1].grad.view(-1)[-1] = bad_value
    before = snapshot(model, optimizer)
    optimizer.step()
    assert optimizer.nonfinite_skipped_steps == 1
    assert_same(before, snapshot(model, optimizer))
    optimizer.error_if_nonfinite = True
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        optimizer.step()
    assert_same(before, snapshot(model, optimizer))


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skips_the_step_on_inf_and_unscales_otherwise(name):
    model, inputs, targets = model_and_data()
    twin, _, _ = model_and_data()
    optimizer, plain = OPTIMIZERS_UNDER_TEST[name](model), OPTIMIZERS_UNDER_TEST[name](twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        optimizer.zero_grad()
        plain.zero_grad()
        scaler.scale((model(inputs) - targets).pow(2).mean()).backward()
        (twin(inputs) - targets).pow(2).mean().backward()
        scaler.step(optimizer)
        scaler.update()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    optimizer.zero_grad()
    scaler.scale((model(inputs) - targets).pow(2).mean()).backward()
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    before = snapshot(model, optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert_same(before, snapshot(model, optimizer))
    assert scaler.get_scale() == 512.0 and optimizer.nonfinite_skipped_steps == 0


@pytest.mark.parametrize("name", NAMES)
def test_steps_are_deterministic(name):
    # Tensors of 40K elements: below the compiled-per-tensor size, so they run as one batch (STAM's and
    # STAMLite's as one C call), large enough for the per-tensor statistics to be reduced by two threads.
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 200))
        inputs, targets = torch.randn(64, 200), torch.randn(64, 200)
        train(model, OPTIMIZERS_UNDER_TEST[name](model), inputs, targets, 3)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*results))


@pytest.mark.parametrize("name", NAMES)
def test_a_skipped_first_step_creates_no_state(name):
    model, inputs, targets = model_and_data()
    optimizer = OPTIMIZERS_UNDER_TEST[name](model)
    (model(inputs) - targets).pow(2).mean().backward()
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert optimizer.nonfinite_skipped_steps == 1 and not any(optimizer.state.values())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    model.zero_grad()
    (model(inputs) - targets).pow(2).mean().backward()
    optimizer.step()
    assert len(optimizer.state) == len(before)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_keeps_dtypes_and_resumes_exactly(name, tmp_path):
    model, inputs, targets = model_and_data()
    twin, _, _ = model_and_data(seed=1)
    optimizer = OPTIMIZERS_UNDER_TEST[name](model)
    train(model, optimizer, inputs, targets, 3)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    twin.load_state_dict(checkpoint["model"])
    resumed = OPTIMIZERS_UNDER_TEST[name](twin)
    resumed.load_state_dict(checkpoint["optimizer"])
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in optimizer.state[p].items():
            if torch.is_tensor(value):
                assert resumed.state[q][key].dtype == value.dtype, key
    train(model, optimizer, inputs, targets, 3)
    train(twin, resumed, inputs, targets, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("optimizer_class", [STAM, STAMLite])
def test_param_groups_with_their_own_hyperparameters_step_as_separate_optimizers(optimizer_class):
    # Groups share nothing but the step's non-finite verdict: two groups in one optimizer (one C call per group
    # on the default path) must step exactly as two optimizers, one per group.
    first, second = {"lr": 1e-2, "weight_decay": 0.1, "adapt_strength": 0.5}, {"lr": 3e-3, "b1_base": 0.8}
    model, inputs, targets = model_and_data()
    twin, _, _ = model_and_data()
    head = lambda net: list(net[0].parameters())  # noqa: E731
    rest = lambda net: [p for layer in list(net)[1:] for p in layer.parameters()]  # noqa: E731
    grouped = optimizer_class([{"params": head(model), **first}, {"params": rest(model), **second}])
    separate = [optimizer_class(head(twin), **first), optimizer_class(rest(twin), **second)]
    for _ in range(3):
        grouped.zero_grad()
        (model(inputs) - targets).pow(2).mean().backward()
        grouped.step()
        for optimizer in separate:
            optimizer.zero_grad()
        (twin(inputs) - targets).pow(2).mean().backward()
        for optimizer in separate:
            optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), model_and_data()[0].parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_closure_and_missing_grads(name):
    model, inputs, targets = model_and_data()
    optimizer = OPTIMIZERS_UNDER_TEST[name](model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    initial = [g["lr"] for g in optimizer.param_groups]

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = (model(inputs) - targets).pow(2).mean()
        loss.backward()
        model[4].bias.grad = None  # a parameter without a gradient this step
        return loss

    bias = model[4].bias.detach().clone()
    assert torch.is_tensor(optimizer.step(closure))
    scheduler.step()
    assert torch.equal(model[4].bias, bias)
    assert [g["lr"] for g in optimizer.param_groups] == [lr * 0.5 for lr in initial]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters_keep_their_dtype_and_train(name):
    model, inputs, targets = model_and_data(torch.bfloat16)
    losses = train(model, OPTIMIZERS_UNDER_TEST[name](model), inputs, targets, 30)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", ["stam", "stam_lite"])
def test_compiled_training_step_matches_eager_while_the_lr_changes(name):
    model, inputs, targets = model_and_data()
    twin, _, _ = model_and_data()
    optimizer, eager = OPTIMIZERS_UNDER_TEST[name](model), OPTIMIZERS_UNDER_TEST[name](twin)

    def train_step(net, opt):
        opt.zero_grad(set_to_none=True)
        loss = (net(inputs) - targets).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend="eager")
    for step in range(3):
        for opt in (optimizer, eager):
            opt.param_groups[0]["lr"] = 1e-2 / (step + 1)
        compiled(model, optimizer)
        train_step(twin, eager)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


@pytest.fixture
def without_cpu_kernels(monkeypatch):
    """STAM and STAMLite run TensorKernel's forms, as where the C kernels cannot be built."""
    from stac_stam.torch import _cpu_kernels

    monkeypatch.setattr(_cpu_kernels, "_library", False)


@pytest.fixture
def compile_every_tensor(monkeypatch, without_cpu_kernels):
    """Run even the test models' small tensors through the compiled kernels; yields a count of compiled calls."""
    from stac_stam.torch import _kernels, stac, stam, stam_lite
    from stac_stam.torch._kernels import TensorKernel

    monkeypatch.setattr(TensorKernel, "compiled_min_numel", 0)
    compiled_calls = []
    kernels = [value for module in (_kernels, stac, stam, stam_lite) for value in vars(module).values()
               if isinstance(value, TensorKernel)]
    assert len(kernels) == 8
    for kernel in kernels:
        for form in ("compiled", "compiled_narrow"):  # the second serves tensors with 16-bit elements
            def counting(*args, compiled=getattr(kernel, form), **kwargs):
                compiled_calls.append(1)
                return compiled(*args, **kwargs)
            monkeypatch.setattr(kernel, form, counting)
    yield compiled_calls


@pytest.fixture
def count_batches(monkeypatch):
    """Count the calls that run several small tensors as one flat batch."""
    from stac_stam.torch._kernels import TensorKernel

    batches = []
    run_batch = TensorKernel._batch

    def counting(self, operands, scalars):
        batches.append(len(operands))
        return run_batch(self, operands, scalars)

    monkeypatch.setattr(TensorKernel, "_batch", counting)
    yield batches


@pytest.fixture
def count_cpu_kernel_calls(monkeypatch):
    """Count the calls of the C kernels, by name."""
    from stac_stam.torch import _cpu_kernels

    calls = []
    run = _cpu_kernels.run

    def counting(name, *args, **kwargs):
        calls.append(name)
        return run(name, *args, **kwargs)

    monkeypatch.setattr(_cpu_kernels, "run", counting)
    yield calls


@pytest.mark.parametrize("name, kernels", [(name, kernels) for name in NAMES for kernels in ("compiled", "batched")]
                         + [("stam", "cpu"), ("stam_lite", "cpu")])
def test_fused_kernels_match_the_op_by_op_update(name, kernels, count_batches, count_cpu_kernel_calls, request):
    if kernels == "compiled":
        compiled_calls = request.getfixturevalue("compile_every_tensor")
    if kernels == "batched":
        request.getfixturevalue("without_cpu_kernels")
    model, inputs, targets = model_and_data()
    twin, _, _ = model_and_data()
    fused, op_by_op = OPTIMIZERS_UNDER_TEST[name](model), OPTIMIZERS_UNDER_TEST[name](twin, fused=False)
    train(model, fused, inputs, targets, 5)
    train(twin, op_by_op, inputs, targets, 5)
    if kernels == "compiled":
        assert len(compiled_calls) >= 5 * len(fused.state) // 2 and not count_batches  # most tensors compiled
    elif kernels == "batched":  # the test model's tensors are all small: each step runs batches of several tensors
        assert len(count_batches) >= 5 and min(count_batches) >= 2
    else:  # each step: one statistics call and one update call for the whole group
        assert count_cpu_kernel_calls.count(f"{name}_step") == 5 and not count_batches
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in fused.state[p].items():
            torch.testing.assert_close(value, op_by_op.state[q][key])


@pytest.mark.parametrize("name", ["stam", "stam_lite"])
def test_tensor_statistics_edited_between_steps_are_the_ones_the_next_step_reads(name):
    # The C path keeps these 0-d entries as views of one matrix per group; a replaced or edited entry must win.
    model, inputs, targets = model_and_data()
    twin, _, _ = model_and_data()
    fused, op_by_op = OPTIMIZERS_UNDER_TEST[name](model), OPTIMIZERS_UNDER_TEST[name](twin, fused=False)
    for optimizer, net in ((fused, model), (op_by_op, twin)):
        train(net, optimizer, inputs, targets, 3)
        params = list(net.parameters())
        optimizer.state[params[0]]["beta1_product"] = torch.tensor(0.5)  # replaced
        optimizer.state[params[-1]]["step"].fill_(100.0)  # edited in place
        train(net, optimizer, inputs, targets, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
        for key, value in fused.state[p].items():
            torch.testing.assert_close(value, op_by_op.state[q][key])
    assert fused.state[list(model.parameters())[-1]]["step"] == 102.0


@pytest.mark.parametrize("name", NAMES)
def test_a_learning_rate_schedule_compiles_no_new_kernel(name, compile_every_tensor):
    from torch._dynamo.utils import counters

    model, inputs, targets = model_and_data(seed=1)
    optimizer = OPTIMIZERS_UNDER_TEST[name](model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    train(model, optimizer, inputs, targets, 1)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        train(model, optimizer, inputs, targets, 1)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 1e-2 / 3
    assert counters["stats"]["unique_graphs"] == graphs
