"""What the library's PyTorch optimizers (STAC, STAM, STAMLite) share: range checks, the non-finite policy and
the compiled per-tensor kernels."""

import warnings

import torch


def check_range(name, value, low, high=None, low_open=False, high_open=True):
    """ValueError naming ``name`` unless ``value`` is a number in the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:
        interval = ("(" if low_open else "[") + f"{low}, " + (f"{high}" + (")" if high_open else "]") if high is not None else "inf)")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def all_finite(tensors):
    """True when no tensor holds a NaN or an Inf.

    One min/max pass per tensor (a NaN propagates through both, an Inf shows in
    one) and one host sync for the whole step, instead of an
    ``isfinite().all().item()`` per tensor. The tensors are only read.
    """
    extremes_by_kind = {}
    for tensor in tensors:
        if tensor.numel():  # an empty tensor has no min or max
            extremes_by_kind.setdefault((tensor.device, tensor.dtype), []).extend(torch.aminmax(tensor))
    return all(bool(torch.stack(extremes).isfinite().all()) for extremes in extremes_by_kind.values())


class TensorKernel:
    """A one-tensor update, run compiled (``fused=True``) or op by op (``fused=False``).

    ``kernel(*elementwise, **scalars)`` updates its tensors in place (and may
    return a per-tensor number, as STAC's "snr" rate does). Compiled
    by ``torch.compile`` with dynamic shapes, it is one pass over memory with no
    temporaries, and one kernel serves every tensor size: the elementwise
    tensors are passed as flat views, and the hyperparameters come as 0-d
    tensors, so a learning-rate schedule never recompiles. Eagerly (also for
    non-contiguous tensors), the same code runs op by op. Where
    ``torch.compile`` cannot build the kernel for a device (no C++ compiler, no
    Triton) that device runs eagerly, after one warning; inside a
    ``torch.compile``d training step the eager code is what gets traced.

    Tensors below ``compiled_min_numel`` elements also run eagerly: calling a
    compiled kernel costs about 30 us, op by op a small tensor costs about 10
    us (2 CPU threads, torch 2.13), and the extra passes of the eager form only
    cost more than that from about 64K elements on.
    """

    compiled_min_numel = 1 << 16

    def __init__(self, kernel):
        self.kernel = kernel
        # Not fullgraph: past dynamo's recompile limit (8 dtype/size variants) a call runs eagerly, not fails.
        self.compiled = torch.compile(kernel, dynamic=True)
        self.eager_devices = set()

    def __call__(self, fused, *elementwise, **scalars):
        device = elementwise[0].device.type
        if (not fused or device in self.eager_devices or torch.compiler.is_compiling()
                or elementwise[0].numel() < self.compiled_min_numel
                or not all(t.is_contiguous() for t in elementwise)):
            return self.kernel(*elementwise, **scalars)
        elementwise = [t.view(-1) for t in elementwise]
        # 0-d tensors go in as 1-element views: compiled for float64 on the CPU, Inductor drops writes to 0-d inputs.
        scalars = {name: value.view(1) if torch.is_tensor(value) else value for name, value in scalars.items()}
        try:
            return self.compiled(*elementwise, **scalars)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # raised before the kernel touches memory
            warnings.warn(f"torch.compile cannot build the {self.kernel.__name__} kernel on {device} ({error}); "
                          f"running it op by op (pass fused=False to choose that)", RuntimeWarning, stacklevel=3)
            self.eager_devices.add(device)
            return self.kernel(*elementwise, **scalars)


def scalar_tensors(**values):
    """Hyperparameters as 0-d tensors, the form TensorKernel wants: ``scalars(device, dtype)`` gives the dict,
    built once per device and dtype (a step over tensors of several kinds makes each dict once)."""
    built = {}

    def scalars(device, dtype):
        if (device, dtype) not in built:
            built[device, dtype] = {name: torch.tensor(value, dtype=dtype, device=device)
                                    for name, value in values.items()}
        return built[device, dtype]

    return scalars


class SkipNonfiniteOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` with the library's step and checkpoint rules.

    - A step whose dense gradients hold a NaN or an Inf changes no parameter and
      no state and is counted in ``nonfinite_skipped_steps``; with
      ``error_if_nonfinite=True`` it raises RuntimeError instead, still changing
      nothing. Sparse gradients are refused.
    - ``state_dict()`` carries ``nonfinite_skipped_steps``; ``load_state_dict``
      keeps every state tensor in the dtype it was saved in (torch would cast
      floating state to the parameter's dtype: a bf16 moment would come back
      fp32, an fp32 statistic of a bf16 parameter would come back bf16).

    Subclasses implement ``_update_group(group, params, grads)`` and may override
    ``_check_checkpoint(state_dict)`` to refuse a checkpoint before anything changes.
    """

    def __init__(self, params, defaults, error_if_nonfinite):
        super().__init__(params, defaults)
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.nonfinite_skipped_steps = 0

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_skipped_steps", 0)
        self.__dict__.setdefault("error_if_nonfinite", False)

    def _params_with_grads(self, group):
        params, grads = [], []
        names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
        for param, name in zip(group["params"], names):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {name!r})")
            params.append(param)
            grads.append(param.grad)
        return params, grads

    @torch.no_grad()
    def step(self, closure=None):
        """One step. Returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grads = [self._params_with_grads(group) for group in self.param_groups]
        if not all_finite([g for _, grads in with_grads for g in grads]):
            if self.error_if_nonfinite:
                raise RuntimeError(f"{type(self).__name__}: a gradient holds NaN or Inf; parameters and state "
                                   "were left unchanged (error_if_nonfinite=True)")
            self.nonfinite_skipped_steps += 1
            return loss
        for group, (params, grads) in zip(self.param_groups, with_grads):
            if params:
                self._update_group(group, params, grads)
        return loss

    def _update_group(self, group, params, grads):
        raise NotImplementedError

    def _check_checkpoint(self, state_dict):
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"state_dict must be a dict with 'state' and 'param_groups', as "
                             f"{type(self).__name__}.state_dict() returns")

    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["nonfinite_skipped_steps"] = self.nonfinite_skipped_steps
        return state_dict

    def load_state_dict(self, state_dict):
        self._check_checkpoint(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "nonfinite_skipped_steps"})
        flat_params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            state = self.state[flat_params[index]]
            for key, value in saved.items():
                if torch.is_tensor(value) and state[key].dtype != value.dtype:
                    state[key] = value.detach().to(device=state[key].device, copy=True)
        self.nonfinite_skipped_steps = int(state_dict.get("nonfinite_skipped_steps", 0))
