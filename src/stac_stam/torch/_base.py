"""The shell the library's PyTorch optimizers (STAC, STAM, STAMLite) share: range checks, the non-finite step
policy and checkpoints. The kernels they run are in ``_kernels.py`` and ``_cpu_kernels.py``."""

import operator

import torch

from stac_stam.torch._kernels import all_finite, dtensor_type


def check_range(name, value, low, high=None, low_open=False, high_open=True):
    """ValueError naming ``name`` unless ``value`` is a number in the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:
        interval = ("(" if low_open else "[") + f"{low}, " + (f"{high}" + (")" if high_open else "]") if high is not None else "inf)")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


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

    A step runs in two phases (the kernel layer, ``_kernels.py``). First every
    group's gradients are checked against their parameters, then
    ``_prepare_group(group, params, grads)`` reads every group and changes
    nothing: it returns ``(read, context)``, ``read`` the finiteness of the
    gradients and the per-tensor sums the update needs (STAM's residual
    moments, STAMLite's gradient moments, STAC's "snr" scale fold the
    finiteness test into that one read). Then, once ``all_finite`` has decided
    for the step (one host sync; under FSDP2 one collective per mesh, so every
    process decides alike), ``_update_group(group, params, grads, read,
    context)`` changes the parameters and the state.
    ``_check_checkpoint(state_dict)`` may refuse a checkpoint before anything
    changes.
    """

    def __init__(self, params, defaults, error_if_nonfinite, fused):
        super().__init__(params, defaults)
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.fused = bool(fused)
        self.nonfinite_skipped_steps = 0

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_skipped_steps", 0)
        self.__dict__.setdefault("error_if_nonfinite", False)
        self.__dict__.setdefault("fused", True)

    def _params_with_grads(self, group, group_index):
        """The group's parameters that have a gradient, and their gradients, checked: a gradient that is sparse
        or of another shape (assigned through ``.data``), dtype, device or kind than its parameter is refused
        with a RuntimeError naming the parameter. A DTensor gradient sharded otherwise than its parameter is
        redistributed to the parameter's placements."""
        params = [param for param in group["params"] if param.grad is not None]
        grads = [param.grad for param in params]
        # Compared list against list (at C speed); a mismatch is then found and named.
        if not set(map(operator.attrgetter("layout"), grads)) <= {torch.strided} or any(
                list(map(get, grads)) != list(map(get, params))
                for get in (operator.attrgetter("shape"), operator.attrgetter("dtype"), operator.attrgetter("device"),
                            _kind)):
            self._refuse_gradient(group, group_index)
        dtensor = dtensor_type()
        if dtensor is not None:
            grads = [grad.redistribute(param.device_mesh, param.placements)
                     if isinstance(grad, dtensor) and grad.placements != param.placements else grad
                     for param, grad in zip(params, grads)]
        return params, grads

    def _refuse_gradient(self, group, group_index):
        for index, param in enumerate(group["params"]):
            problem = None if param.grad is None else _gradient_problem(param, param.grad)
            if problem is None:
                continue
            names = group.get("param_names")
            name = names[index] if names else f"#{index} of param group {group_index}"
            if param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {name!r})")
            raise RuntimeError(f"{type(self).__name__}: the gradient of parameter {name!r} {problem}; the step "
                               f"changed nothing")

    @torch.no_grad()
    def step(self, closure=None):
        """One step. Returns the closure's loss, if a closure is given.

        All or nothing: every group's gradients are checked and read before any group changes.

        ``torch.compile(optimizer.step)`` traces the torch path; give ``lr`` as a 0-d tensor (as for
        ``torch.optim``) so a scheduler's new value is no new guard. ``fullgraph=True`` is not supported: the
        decision to skip is taken on the host (one sync), because a skipped step is counted in the Python
        int ``nonfinite_skipped_steps`` that ``state_dict`` carries, raises with ``error_if_nonfinite``, and
        leaves a first step's state uncreated. A device-side decision (torch's fused AdamW and its
        ``found_inf``) would have to apply every update through ``torch.where(finite, new, old)``, keep the
        count in a tensor and give up the error."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grads = [(group, *self._params_with_grads(group, index)) for index, group in enumerate(self.param_groups)]
        with_grads = [(group, params, grads) for group, params, grads in with_grads if params]
        prepared = [self._prepare_group(group, params, grads) for group, params, grads in with_grads]
        if prepared and not all_finite([read for read, _ in prepared]):
            if self.error_if_nonfinite:
                raise RuntimeError(f"{type(self).__name__}: a gradient holds NaN or Inf; parameters and state "
                                   "were left unchanged (error_if_nonfinite=True)")
            self.nonfinite_skipped_steps += 1
            return loss
        for (group, params, grads), (read, context) in zip(with_grads, prepared):
            self._update_group(group, params, grads, read, context)
        return loss

    def _prepare_group(self, group, params, grads):
        """The group's read phase, changing nothing: ``(read, context)``, ``read`` a ``_kernels.Read``."""
        raise NotImplementedError

    def _update_group(self, group, params, grads, read, context):
        """The group's update, once every read is finite on every process (``read``'s sums are whole-tensor
        sums by then)."""
        raise NotImplementedError

    def _states(self, group, params):
        """Each parameter's state; a parameter without one gets ``_initial_state(group, param)``, kept by
        ``_store_states`` once the step lands (a skipped first step leaves the state empty)."""
        get = self.state.get
        return [state if (state := get(param)) else self._initial_state(group, param) for param in params]

    def _initial_state(self, group, param):
        raise NotImplementedError

    def _store_states(self, params, states):
        for param, state in zip(params, states):
            self.state[param] = state

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

def _gradient_problem(param, grad):
    """What makes ``grad`` unfit for ``param`` (a phrase), or None."""
    if grad.layout != torch.strided:
        return f"has layout {grad.layout}; only dense gradients are supported"
    if grad.shape != param.shape:
        return f"has shape {tuple(grad.shape)}, the parameter {tuple(param.shape)}"
    if grad.dtype != param.dtype:
        return f"has dtype {grad.dtype}, the parameter {param.dtype}"
    if grad.device != param.device:
        return f"is on {grad.device}, the parameter on {param.device}"
    if _kind(grad) is not _kind(param):
        return f"is a {type(grad).__name__}, the parameter a {type(param).__name__}"
    return None


def _kind(tensor):
    """The tensor's class, a Parameter's counted as a Tensor's (a DTensor parameter's class is DTensor)."""
    return torch.Tensor if type(tensor) is torch.nn.Parameter else type(tensor)
