"""The shell the library's PyTorch optimizers (STAC, STAM, STAMLite) share: validation, the non-finite step
policy and checkpoints. The kernels they run are in ``_kernels.py`` and ``_cpu_kernels.py``."""

import copy
import itertools
import math
import numbers
import operator
from collections.abc import Mapping

import torch

from stac_stam.partition import same_parameter_names
from stac_stam.torch import _cpu_kernels
from stac_stam.torch._kernels import all_finite, dtensor_type

# The dtypes optimizer state may be kept in (float8 has no arithmetic on most devices).
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# State entries whose meaning bounds them (a negative second moment would make a NaN of its square root), by name
# across the three optimizers: (low, high), None for no bound.
STATE_BOUNDS = {"step": (0.0, None), "exp_avg_sq": (0.0, None), "max_exp_avg_sq": (0.0, None),
                "variance": (0.0, None), "scale": (0.0, None), "grad_sq_mean": (0.0, None), "beta1": (0.0, 1.0),
                "beta1_product": (0.0, 1.0), "exp_avg_sq_row": (0.0, None), "exp_avg_sq_col": (0.0, None),
                "momentum_scale": (0.0, None)}
# STAC's int8 momentum codes, as its encoding writes them.
INT8_CODE_BOUNDS = (-127, 127)
# Averages of squared gradients, which hold +Inf where a square passed the dtype's range (as torch's AdamW stores
# it: that coordinate then stops moving); every other state value is finite.
MAY_HOLD_INF = {"exp_avg_sq", "max_exp_avg_sq", "grad_sq_mean"}


def check_range(name, value, low, high=None, low_open=False, high_open=True, tensor=False):
    """ValueError naming ``name`` unless ``value`` is a finite real number in the interval; with ``tensor``, a
    0-d floating tensor holding one is accepted too (torch.optim's form of a rate a scheduler fills in place)."""
    number = value
    if tensor and torch.is_tensor(value):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{name} must be a number or a 0-d floating tensor, got a {value.dtype} tensor of "
                             f"shape {tuple(value.shape)}")
        number = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {'a number or a 0-d floating tensor' if tensor else 'a number'}, "
                         f"got {value!r}")
    too_low = number <= low if low_open else number < low
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high or not math.isfinite(number):
        upper = "inf)" if high is None else f"{high}" + (")" if high_open else "]")
        interval = ("(" if low_open else "[") + f"{low}, {upper}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_pair(name, value):
    """The two entries of ``value``; ValueError naming ``name`` unless it is a pair."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return value


def check_names(name, value, count=None):
    """ValueError naming ``name`` unless ``value`` is a list or tuple of ``count`` strings."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value) \
            or (count is not None and len(value) != count):
        expected = "names" if count is None else f"{count} names"
        raise ValueError(f"{name} must be a list of {expected}, got {value!r}")


def require_keys(group, keys, where, kind):
    """ValueError unless the param group ``group`` has every entry in ``keys`` (a group of another optimizer
    lacks some)."""
    missing = [key for key in keys if key not in group]
    if missing:
        raise ValueError(f"{where}lacks {', '.join(map(repr, missing))}: it is not a {kind} param group "
                         f"(its entries: {sorted(group)})")


def resolve_state_dtype(name, value):
    """None, or the torch dtype ``value`` is or names (``torch.bfloat16``, ``"bfloat16"``), one of
    ``STATE_DTYPES``."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    if value is not None and value not in STATE_DTYPES:
        raise ValueError(f"{name} must be a floating torch dtype ({', '.join(map(str, STATE_DTYPES))}) or its "
                         f"name, got {value!r}")
    return value


def value_range(tensor):
    """``(least, greatest, holds NaN)`` over the values of ``tensor`` (an empty one: ``(inf, -inf, False)``); of
    a DTensor, over all its shards and the same on every rank (each rank reads its shard, then one all-reduce:
    DTensor's own aminmax gives one shard's numbers on torch 2.13)."""
    mesh = getattr(tensor, "device_mesh", None)
    local = tensor.to_local() if mesh is not None else tensor
    # -least, greatest, holds NaN: three numbers to all-reduce by MAX (a NaN's least and greatest count as 0)
    numbers = torch.tensor([-math.inf, -math.inf, 0.0], dtype=torch.float64, device=local.device)
    if local.numel():
        least, most = torch.aminmax(local)
        numbers = torch.stack([-least.double(), most.double(), local.isnan().any().double()])
        numbers = numbers.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf)
    if mesh is not None:
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(numbers, torch.distributed.ReduceOp.MAX, group=mesh.get_group(dim))
    least, most, nan = numbers.tolist()
    return -least, most, bool(nan)


class SkipNonfiniteOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` with the library's validation, step and checkpoint rules.

    - Construction, ``add_param_group`` and ``load_state_dict`` check every
      hyperparameter of every param group through one method,
      ``_check_group(group, where)`` (a ValueError naming the entry and the
      form it must have), and refuse parameters the step cannot update:
      complex, non-floating or meta-device tensors, and a parameter listed twice.
    - A step whose dense gradients hold a NaN or an Inf changes no parameter and
      no state and is counted in ``nonfinite_skipped_steps``; with
      ``error_if_nonfinite=True`` it raises RuntimeError instead, still changing
      nothing. Sparse gradients are refused.
    - ``state_dict()`` is torch's, with ``nonfinite_skipped_steps`` in every
      param group (``torch.distributed.checkpoint`` keeps only ``state`` and
      ``param_groups``). ``load_state_dict`` takes state keyed by parameter
      index or by parameter name (the form ``set_optimizer_state_dict``
      gives), checks the whole checkpoint against this optimizer and its
      parameters, builds the new state, and only then replaces the old one: a
      refused checkpoint changes nothing. Each state tensor comes back in the
      dtype and on the device this optimizer keeps it in (its
      ``_initial_state``), so a bf16 moment stays bf16 and a float32 statistic
      of a bf16 parameter stays float32.
    - ``copy.deepcopy`` and ``pickle`` keep every setting (``_settings``).

    A step runs in two phases (the kernel layer, ``_kernels.py``). First every
    group's gradients are checked against their parameters, then
    ``_prepare_group(group, params, grads)`` reads every group and changes
    nothing: it returns ``(read, context)``, ``read`` the finiteness of the
    gradients and the per-tensor sums the update needs (STAM's residual
    moments, STAMLite's gradient moments, STAC's "snr" scale fold the
    finiteness test into that one read). Then, once ``all_finite`` has decided
    for the step (one host sync at most; under FSDP2 one collective per mesh, so every
    process decides alike), ``_update_group(group, params, grads, read,
    context)`` changes the parameters and the state.
    """

    # Attributes pickle and copy.deepcopy keep besides torch's defaults, state and param_groups.
    _settings = ("error_if_nonfinite", "fused", "nonfinite_skipped_steps")
    # The former names of betas[0] and betas[1] in a param group (older checkpoints and pickles, user groups).
    BETA_NAMES = ()

    def __init__(self, params, defaults, error_if_nonfinite, fused):
        check_flag("error_if_nonfinite", error_if_nonfinite)
        check_flag("fused", fused)
        if fused:
            _cpu_kernels.prepare()  # the C kernels build (where they must) while the rest of the setup runs
        super().__init__(params, defaults)
        self.error_if_nonfinite = error_if_nonfinite
        self.fused = fused
        self.nonfinite_skipped_steps = 0

    def __getstate__(self):
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._settings})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_skipped_steps", 0)
        self.__dict__.setdefault("error_if_nonfinite", False)
        self.__dict__.setdefault("fused", True)
        for group in self.param_groups:
            self._upgrade_group(group)

    def _check_group(self, group, where=""):
        """ValueError naming the entry (prefixed by ``where``) unless every hyperparameter of ``group`` is one
        this optimizer's step can run with."""
        raise NotImplementedError

    def _upgrade_group(self, group):
        """``group`` (changed in place and returned) with ``betas`` in place of its entries under their former
        names (``BETA_NAMES``), one of which may be given alone (the other then comes from the defaults)."""
        if any(name in group for name in self.BETA_NAMES):
            betas = list(group.get("betas", self.defaults.get("betas", (None, None))))
            for index, name in enumerate(self.BETA_NAMES):
                if name in group:
                    betas[index] = group.pop(name)
            group["betas"] = tuple(betas)
        return group

    def add_param_group(self, param_group):
        """torch's ``add_param_group``, after checking the group's hyperparameters and parameters."""
        if isinstance(param_group, dict):  # torch refuses anything else
            params = param_group.get("params")
            if params is not None and not torch.is_tensor(params) and not isinstance(params, set):
                param_group["params"] = list(params)  # as torch does; here first, so a generator is read once
            self._upgrade_group(param_group)
            where = f"param_groups[{len(self.param_groups)}] "
            self._check_group({**self.defaults, **param_group}, where)
            self._check_params(param_group.get("params", []), param_group.get("param_names"), where)
        super().add_param_group(param_group)

    def _check_params(self, params, names, where):
        """Refuse what the step cannot update: a complex, non-floating or meta-device parameter, or one listed
        twice in its group (it would be updated twice per step)."""
        if torch.is_tensor(params):
            params = [params]
        seen = set()
        for index, param in enumerate(params):
            if isinstance(param, tuple) and len(param) == 2:  # (name, tensor), as torch takes named parameters
                name, param = param
            else:
                name = names[index] if names and index < len(names) else None
            if not torch.is_tensor(param):
                continue  # torch's add_param_group refuses it
            label = f"parameter {name!r}" if name is not None else f"{where}params[{index}]"
            if param.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters; {label} is "
                                 f"{param.dtype} (optimize its real and imaginary parts as a real parameter, e.g. "
                                 f"through torch.view_as_real)")
            if not param.is_floating_point():
                raise ValueError(f"{type(self).__name__} updates floating-point parameters; {label} is {param.dtype}")
            if param.device.type == "meta":
                raise ValueError(f"{label} is on the meta device, which holds no values: materialize the model "
                                 f"(e.g. model.to_empty(device=...), then initialize it) before building "
                                 f"{type(self).__name__}")
            if param in seen:
                raise ValueError(f"{label} appears twice in its param group; list each parameter once (it would "
                                 f"be updated twice per step)")
            seen.add(param)

    def _params_with_grads(self, group, group_index):
        """The group's parameters that have a gradient, and their gradients, checked: a gradient that is sparse
        or of another shape (assigned through ``.data``), dtype, device or kind than its parameter is refused
        with a RuntimeError naming the parameter. A DTensor gradient sharded otherwise than its parameter is
        redistributed to the parameter's placements."""
        params = group["params"]
        grads = list(map(_GRAD, params))
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            params = [param for param in params if param.grad is not None]
            grads = list(map(_GRAD, params))
        # Compared list against list (at C speed); a mismatch is then found and named. Plain tensors and
        # Parameters are all of one kind, without a call of _kind each.
        checks = [_SHAPE_DTYPE_DEVICE]
        if not set(map(type, grads)) | set(map(type, params)) <= _PLAIN:
            checks.append(_kind)
        if not set(map(_LAYOUT, grads)) <= {torch.strided} or any(
                list(map(get, grads)) != list(map(get, params)) for get in checks):
            self._refuse_gradient(group, group_index)
        dtensor = dtensor_type()
        if dtensor is not None and any(map(isinstance, grads, itertools.repeat(dtensor))):
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
        decision to skip is taken on the host (one sync at most), because a skipped step is counted in the Python
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
        """Each parameter's state, and the ``(parameter, state)`` pairs of those made here: a parameter without
        a state gets ``_initial_state(group, param)``, kept by ``_store_states`` once the step lands (a skipped
        first step leaves the state empty)."""
        states = list(map(self.state.get, params))
        if all(states):
            return states, []
        created = [(param, self._initial_state(group, param)) for param, state in zip(params, states) if not state]
        made = iter(created)
        return [state or next(made)[1] for state in states], created

    def _initial_state(self, group, param):
        raise NotImplementedError

    def _store_states(self, created):
        """Keep the states ``_states`` made (each step looks every state up; only new ones are stored)."""
        for param, state in created:
            self.state[param] = state

    # Checkpoints -------------------------------------------------------------------------------

    def state_dict(self):
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group["nonfinite_skipped_steps"] = self.nonfinite_skipped_steps
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict):
        """Load ``state_dict`` (from ``state_dict()``, keyed by parameter index, or from
        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``, keyed by parameter name) all or nothing:
        every param group and state entry is checked and the new state built before anything of this optimizer
        changes; a refused checkpoint (ValueError naming the entry) leaves it as it was. Hooks run as in torch."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict with 'state' and 'param_groups', as "
                             f"{type(self).__name__}.state_dict() returns; got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        param_groups, state, nonfinite_skipped_steps = self._loaded(state_dict)
        self.__setstate__({"state": state, "param_groups": param_groups})
        self.nonfinite_skipped_steps = nonfinite_skipped_steps
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _migrate_checkpoint(self, state_dict):
        """``state_dict`` in this library's form (STAC reads stac-optimizer 0.1.5's); never changes its argument."""
        return state_dict

    def _loaded(self, state_dict):
        """The param groups, state and ``nonfinite_skipped_steps`` ``state_dict`` holds, built anew from this
        optimizer's parameters; nothing of the optimizer changes."""
        if not isinstance(state_dict.get("state"), Mapping) or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError(f"state_dict must be a dict with 'state' and 'param_groups', as "
                             f"{type(self).__name__}.state_dict() returns")
        state_dict = self._migrate_checkpoint(state_dict)
        saved_groups = []
        for index, saved in enumerate(state_dict["param_groups"]):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"checkpoint param_groups[{index}] must be a dict with a list 'params'")
            saved_groups.append(self._upgrade_group(copy.deepcopy(dict(saved))))
        self._check_saved_layout(saved_groups)
        groups, targets = [], {}  # saved parameter id -> (parameter, its new group, its name for messages)
        for index, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"checkpoint param_groups[{index}] "
            group = {key: value for key, value in saved.items() if key != "nonfinite_skipped_steps"}
            group["params"] = current["params"]
            if "param_names" in current:  # torch keeps the current names when the checkpoint has none
                group.setdefault("param_names", current["param_names"])
            self._check_loaded_group(group, current, saved["params"], where)
            # Parameters are named in messages by name, else by the checkpoint's key.
            labels = [repr(name) for name in group.get("param_names") or ()] or [
                f"#{saved_id}" if isinstance(saved_id, int) else repr(saved_id) for saved_id in saved["params"]]
            for saved_id, param, label in zip(saved["params"], current["params"], labels):
                if saved_id in targets:
                    raise ValueError(f"{where}lists parameter {saved_id!r} twice")
                targets[saved_id] = (param, group, label)
            groups.append(group)
        state = {}
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in targets:
                raise ValueError(f"checkpoint state refers to parameter {saved_id!r}, which this optimizer lacks")
            param, group, label = targets[saved_id]
            state[param] = self._loaded_state(saved_state, param, group, label)
        return groups, state, self._loaded_skipped_steps(state_dict, saved_groups)

    def _check_saved_layout(self, saved_groups):
        """Refuse a checkpoint whose param groups do not pair with this optimizer's, group by group."""
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"checkpoint param_groups[{index}] has {len(saved['params'])} parameters, this "
                                 f"optimizer's {len(group['params'])}")

    def _check_loaded_group(self, group, current, saved_ids, where):
        """Refuse a checkpoint's param group ``group`` (its ``params`` already this optimizer's) for the group
        ``current``: its hyperparameters, and its parameter names when the checkpoint keys state by name."""
        self._check_group(group, where)
        names = current.get("param_names")
        if names is not None and all(isinstance(saved_id, str) for saved_id in saved_ids) \
                and not same_parameter_names(saved_ids, names):
            raise ValueError(f"{where}holds parameters {list(saved_ids)}; this optimizer's are {list(names)}")

    def _loaded_state(self, saved, param, group, label):
        """The state of ``param`` built from the checkpoint's entry ``saved``: the entries ``_initial_state``
        makes, each checked (a floating tensor, or for STAC's int8 codes an int8 one within ``INT8_CODE_BOUNDS``, of
        the right shape, finite but for ``MAY_HOLD_INF``, within ``STATE_BOUNDS``) and copied in (a ``step`` given
        as a plain number, torch's older form, is read as a 0-d tensor)."""
        if not isinstance(saved, Mapping):
            raise ValueError(f"checkpoint state of parameter {label} must be a dict, got {type(saved).__name__}")
        if not saved:
            return {}
        state = self._initial_state(group, param)
        if set(saved) != set(state):
            raise ValueError(f"checkpoint state of parameter {label} holds {sorted(saved)}; with its param "
                             f"group's settings {type(self).__name__} keeps {sorted(state)}")
        for key, target in state.items():
            value = saved[key]
            if key == "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                value = torch.tensor(float(value))
            codes = target.dtype == torch.int8  # STAC's int8 momentum codes: int8 only, as a float would truncate
            if not torch.is_tensor(value) or (value.dtype != target.dtype
                                              and (codes or value.dtype not in STATE_DTYPES)):
                form = f"a {value.dtype} tensor" if torch.is_tensor(value) else repr(value)
                raise ValueError(f"checkpoint state {key!r} of parameter {label} must be "
                                 f"{'an int8' if codes else 'a floating'} tensor, got {form}")
            if value.shape != target.shape:
                expected = (f", the parameter has {tuple(param.shape)}" if target.shape == param.shape else
                            f"; for the parameter of shape {tuple(param.shape)} it must have shape "
                            f"{tuple(target.shape)}")
                raise ValueError(f"checkpoint state {key!r} of parameter {label} has shape {tuple(value.shape)}"
                                 f"{expected}")
            least, most, nan = value_range(value)
            if nan or least == -math.inf or (most == math.inf and key not in MAY_HOLD_INF):
                raise ValueError(f"checkpoint state {key!r} of parameter {label} holds NaN or Inf")
            low, high = INT8_CODE_BOUNDS if codes else STATE_BOUNDS.get(key, (None, None))
            if (low is not None and least < low) or (high is not None and most > high):
                raise ValueError(f"checkpoint state {key!r} of parameter {label} must lie in "
                                 f"[{low}, {'inf' if high is None else high}], holds values in [{least}, {most}]")
            target.copy_(value)
        return state

    def _loaded_skipped_steps(self, state_dict, saved_groups):
        """``nonfinite_skipped_steps`` from the checkpoint's param groups (or its top level, where checkpoints
        before these kept it); 0 when it has none (torch's and stac-optimizer 0.1.5's)."""
        counts = [group["nonfinite_skipped_steps"] for group in saved_groups if "nonfinite_skipped_steps" in group]
        count = counts[0] if counts else state_dict.get("nonfinite_skipped_steps", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or any(c != count for c in counts):
            raise ValueError(f"checkpoint nonfinite_skipped_steps must be one integer >= 0, got "
                             f"{counts or count!r}")
        return count


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


_GRAD, _LAYOUT = operator.attrgetter("grad"), operator.attrgetter("layout")
_SHAPE_DTYPE_DEVICE = operator.attrgetter("shape", "dtype", "device")
_PLAIN = {torch.Tensor, torch.nn.Parameter}


def _kind(tensor):
    """The tensor's class, a Parameter's counted as a Tensor's (a DTensor parameter's class is DTensor)."""
    return torch.Tensor if type(tensor) is torch.nn.Parameter else type(tensor)
