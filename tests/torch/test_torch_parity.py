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
    "stac_factored_int8": lambda model, **kw: STAC(model, **{"lr": 1e-2, "sign_step_scale": "factored",
                                                             "sign_state_dtype": "int8", **kw}),
    "stam": lambda model, **kw: STAM(model.parameters(), **{"lr": 1e-2, **kw}),
    "stam_lite": lambda model, **kw: STAMLite(model.parameters(), **{"lr": 1e-2, "beta1_update_interval": 2, **kw}),
    "stam_lite_bf16_state": lambda model, **kw: STAMLite(
        model.parameters(), **{"lr": 1e-2, "state_dtype": torch.bfloat16, **kw}),
}
NAMES = list(OPTIMIZERS_UNDER_TEST)
# The kernel layer's paths: the C kernels (float32 CPU, the default), torch's foreach ops (fused, where the C
# kernels do not serve) and op by op, tensor by tensor (fused=False).
PATHS = ["cpu", "foreach", "per_tensor"]


def on_path(path, monkeypatch, factory, model, **hyperparameters):
    """``factory(model)`` whose steps run on the kernel layer's ``path`` (on "foreach" the C kernels are made
    unavailable, as where they cannot be built)."""
    if path == "foreach":
        from stac_stam.torch import _cpu_kernels

        monkeypatch.setattr(_cpu_kernels, "_library", False)
    return factory(model, fused=path != "per_tensor", **hyperparameters)


@pytest.fixture
def paths_taken(monkeypatch):
    """The kernel layer's GroupTensors of every group step, to check the path each one took."""
    from stac_stam.torch._kernels import GroupTensors

    groups = []
    init = GroupTensors.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        groups.append(self)

    monkeypatch.setattr(GroupTensors, "__init__", recording)
    return groups


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
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")])
def test_nonfinite_step_changes_nothing_and_is_counted_or_raises(name, path, bad_value, monkeypatch):
    model, inputs, targets = model_and_data()
    optimizer = on_path(path, monkeypatch, OPTIMIZERS_UNDER_TEST[name], model)
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
    # Tensors of 40K elements: several chunks of the C kernels, shared by two threads.
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


SCHEDULES = {
    "LambdaLR": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** step),
    # Cycles each group's betas[0] too: STAC's trunk momentum and cap beta1, STAM's and STAMLite's b1_base.
    "OneCycleLR": lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[float(group["lr"]) for group in optimizer.param_groups], total_steps=25),
    "cosine": lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20),
}


@pytest.mark.parametrize("name, schedule, backend", [
    ("stac_snr_scaled", "OneCycleLR", "inductor"), ("stam", "cosine", "eager"),
    ("stam_lite_bf16_state", "LambdaLR", "eager")])
def test_a_compiled_step_under_a_schedule_compiles_twice_at_most_and_equals_eager(name, schedule, backend):
    # A Tensor lr, as torch.optim takes it: the scheduler fills it in place, so no guard sees a new value; a cycled
    # beta only ever enters tensor arithmetic. The first step compiles, the second again (the state exists now),
    # then nothing. One run through Inductor (its code must round as eager does); the others count graphs only.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in (True, False):
        model, inputs, targets = model_and_data()
        optimizer = OPTIMIZERS_UNDER_TEST[name](model)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]))
        scheduler = SCHEDULES[schedule](optimizer)
        step = torch.compile(optimizer.step, backend=backend) if compiled else optimizer.step
        graphs = []
        for _ in range(20):
            optimizer.zero_grad()
            (model(inputs) - targets).pow(2).mean().backward()
            step()
            scheduler.step()
            graphs.append(counters["stats"]["unique_graphs"])
        runs.append(model)
        if compiled:
            assert graphs[0] > 0 and graphs[-1] == graphs[1], graphs
    for p, q in zip(*(model.parameters() for model in runs)):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("name, path", [(name, path) for name in NAMES for path in ("cpu", "foreach")])
def test_fused_paths_match_the_op_by_op_update(name, path, monkeypatch, paths_taken):
    # The C kernels round as the torch code does; the per-tensor statistics are float64 sums in another order.
    model, inputs, targets = model_and_data()
    twin, _, _ = model_and_data()
    fused, op_by_op = on_path(path, monkeypatch, OPTIMIZERS_UNDER_TEST[name], model), \
        OPTIMIZERS_UNDER_TEST[name](twin, fused=False)
    train(model, fused, inputs, targets, 5)
    taken = {group.path for group in paths_taken}
    train(twin, op_by_op, inputs, targets, 5)
    assert taken == {path} and {group.path for group in paths_taken} == {path, "per_tensor"}
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in fused.state[p].items():
            torch.testing.assert_close(value, op_by_op.state[q][key], rtol=1e-6, atol=1e-7)
    if path == "foreach":  # the same torch code over lists: the same bits
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("name, path", [(name, path) for name in NAMES for path in PATHS]
                         + [("stac", "compiled")])  # STAC's cap: torch's fused AdamW, which bumps none on CPU
def test_a_step_bumps_the_versions_of_what_it_writes_as_torchs_in_place_ops_do(name, path, monkeypatch,
                                                                                paths_taken):
    # So autograd refuses a backward through a graph that saved a parameter before the step, as after a
    # torch.optim step; the gradients, which a step only reads, keep their versions.
    model, inputs, targets = model_and_data()
    optimizer = on_path("foreach" if path == "compiled" else path, monkeypatch, OPTIMIZERS_UNDER_TEST[name], model)
    train(model, optimizer, inputs, targets, 1)
    loss = (model(inputs) - targets).pow(2).mean()
    loss.backward(retain_graph=True)
    params = list(model.parameters())
    versions = [[t._version for t in [p, *optimizer.state[p].values()]] for p in params]
    grad_versions = [p.grad._version for p in params]
    (torch.compile(optimizer.step, backend="aot_eager") if path == "compiled" else optimizer.step)()
    assert {group.path for group in paths_taken} == {"foreach" if path == "compiled" else path}
    for p, before in zip(params, versions):
        after = [t._version for t in [p, *optimizer.state[p].values()]]
        assert len(after) == len(before) and all(map(int.__gt__, after, before)), (before, after)
    assert [p.grad._version for p in params] == grad_versions
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", ["stam", "stam_lite", "stac_snr_scaled"])
def test_tensor_statistics_edited_between_steps_are_the_ones_the_next_step_reads(name):
    # The C path keeps these 0-d entries as views of one matrix per group; a replaced or edited entry must win.
    model, inputs, targets = model_and_data()
    twin, _, _ = model_and_data()
    fused, op_by_op = OPTIMIZERS_UNDER_TEST[name](model), OPTIMIZERS_UNDER_TEST[name](twin, fused=False)
    for optimizer, net in ((fused, model), (op_by_op, twin)):
        train(net, optimizer, inputs, targets, 3)
        params = list(net.parameters())
        optimizer.state[params[0]]["step"] = torch.tensor(7.0)  # replaced
        optimizer.state[params[1]]["step"].fill_(100.0)  # edited in place
        train(net, optimizer, inputs, targets, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
        for key, value in fused.state[p].items():
            torch.testing.assert_close(value, op_by_op.state[q][key])
    assert fused.state[list(model.parameters())[1]]["step"] == 102.0


class AwkwardNet(nn.Module):
    """A learnable 0-d temperature, a zero-size layer and an ordinary one."""

    def __init__(self, dtype):
        super().__init__()
        self.linear = nn.Linear(3, 2).to(dtype)
        self.empty = nn.Linear(3, 0).to(dtype)
        self.temperature = nn.Parameter(torch.tensor(1.5, dtype=dtype))

    def forward(self, inputs):
        return self.linear(inputs) * self.temperature + self.empty(inputs).sum()


def awkward_optimizer(name, model, **options):
    """The optimizer of ``name``; STAM's and STAMLite's with the 0-d temperature alone in its group."""
    if name.startswith("stac"):
        return OPTIMIZERS_UNDER_TEST[name](model, **options)
    rest = [p for n, p in model.named_parameters() if n != "temperature"]
    return OPTIMIZERS_UNDER_TEST[name](
        ParamsOnly([{"params": [model.temperature]}, {"params": rest}]), **options)


class ParamsOnly:
    """A stand-in model whose ``parameters()`` are given param groups (the registry's STAM factories call it)."""

    def __init__(self, groups):
        self.groups = groups

    def parameters(self):
        return self.groups


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_zero_d_and_zero_size_parameters_step_on_every_path(name, dtype, monkeypatch):
    # A 0-d parameter failed op by op (shape [] against [1]) after earlier groups had stepped; zero-size ones
    # crashed STAM and STAMLite op by op.
    results = {}
    for path in PATHS:
        torch.manual_seed(0)
        model = AwkwardNet(dtype)
        inputs = torch.randn(4, 3, dtype=dtype)
        optimizer = on_path(path, monkeypatch, lambda m, **kw: awkward_optimizer(name, m, **kw), model)
        for _ in range(3):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
        results[path] = {n: p.detach().clone() for n, p in model.named_parameters()}
        monkeypatch.undo()
    for path in ("cpu", "foreach"):
        for key, value in results[path].items():
            torch.testing.assert_close(value, results["per_tensor"][key], rtol=1e-6, atol=1e-7)
    if dtype != torch.bfloat16:  # a bf16 1.5 does not move by 3 steps of ~1e-2 times a bf16 ulp
        assert results["per_tensor"]["temperature"] != 1.5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_a_gradient_unfit_for_its_parameter_is_refused_before_any_group_changes(name, bad):
    model, inputs, targets = model_and_data()
    optimizer = OPTIMIZERS_UNDER_TEST[name](model)
    train(model, optimizer, inputs, targets, 1)
    (model(inputs) - targets).pow(2).mean().backward()
    last = list(model.parameters())[-1]  # in the last group: every other group is read (and would step) first
    last.grad.data = torch.zeros(last.numel() + 1) if bad == "shape" else last.grad.data.double()
    before = snapshot(model, optimizer)
    with pytest.raises(RuntimeError, match=f"gradient of parameter .* has {bad}"):
        optimizer.step()
    assert_same(before, snapshot(model, optimizer))


@pytest.mark.parametrize("fused", [True, False])
def test_stam_lite_moves_a_parameter_by_about_lr_on_a_gradient_whose_square_overflows_float32(fused):
    # g = 1e20: mean(g^2) = 1e40 overflows float32. It used to count as non-finite, keep E[g^2] = 0 and divide by
    # eps: one step moved a zero parameter to -1e25. AdamW's first step moves it by lr.
    for gradient in (1e20, 1e30, 3e38):
        param = nn.Parameter(torch.zeros(4))
        optimizer = STAMLite([param], lr=1e-3, weight_decay=0.0, fused=fused)
        param.grad = torch.full((4,), gradient)
        optimizer.step()
        torch.testing.assert_close(param.detach(), torch.full((4,), -1e-3), rtol=1e-3, atol=0)
        assert optimizer.nonfinite_skipped_steps == 0
        assert all(value.isfinite().all() for value in optimizer.state[param].values())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", PATHS)
def test_finite_gradients_never_make_a_parameter_or_a_state_nan(name, path, monkeypatch):
    # Decided (issue 21, root cause 7): from finite gradients of any size no parameter becomes NaN or Inf and no
    # state NaN; a second moment (AdamW's and STAM's exp_avg_sq, elementwise) may overflow to Inf, as in
    # torch's AdamW, and that coordinate then stops moving. Momenta are kept within their dtype's range; 0-d
    # statistics keep their old value where a new one would overflow. STAC's cap is torch's AdamW, whose
    # lerp overflows to NaN on alternating gradients of +-3.4e38: every layer is in the trunk here.
    options = {"last_n_layers": 0} if name.startswith("stac") else {}
    model, inputs, targets = model_and_data()
    optimizer = on_path(path, monkeypatch, OPTIMIZERS_UNDER_TEST[name], model, **options)
    largest = torch.finfo(torch.float32).max
    for value in (1e38, -largest, largest, -largest, 1e-45, 1e30, 0.0, -1e20):
        for param in model.parameters():
            param.grad = torch.full_like(param, value)
        optimizer.step()
        assert all(param.isfinite().all() for param in model.parameters()), value
        for state in optimizer.state.values():
            for key, tensor in state.items():
                assert not tensor.isnan().any(), (key, value)
                assert key == "exp_avg_sq" or tensor.isfinite().all(), (key, value)
    assert optimizer.nonfinite_skipped_steps == 0
