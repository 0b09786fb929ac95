"""STAC for PyTorch: a SignSGD trunk and an AdamW cap."""

import array
import ctypes
import dataclasses
import warnings
from collections.abc import Mapping

import torch
from torch.optim.adamw import adamw as adamw_functional

from stac_stam.learning_rates import COMPACT_SIGN_LR_SCALE, RECOMMENDED_SIGN_LR_SCALE, SIGN_LR_SCALE
from stac_stam.partition import factored_shape, partition_trainable_layers, same_parameter_names
from stac_stam.torch import _cpu_kernels
from stac_stam.torch._base import (SkipNonfiniteOptimizer, check_flag, check_names, check_pair, check_range,
                                   require_keys, resolve_state_dtype)
from stac_stam.torch._cpu_kernels import statistics_table
from stac_stam.torch._kernels import (GroupTensors, TensorStatistics, compute_dtype, dtensor_type, largest_finite,
                                      mark_written, one_minus_power, read_finite, read_sums, saturate_, sum_over_shards,
                                      traced_number, update, wide_dtype, widened, write_back)

# Seed 000's argument names and the current names they stand for.
ALIASES = {
    "trunk_momentum": "sign_momentum",
    "trunk_lr": "sign_lr",
    "cap_lr": "adamw_lr",
    "trunk_weight_decay": "sign_weight_decay",
    "cap_weight_decay": "adamw_weight_decay",
}


_FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _adamw_fusable(param):
    return param.device.type in _FUSED_ADAMW_DEVICES and param.is_floating_point()


# State entries that are one number per tensor (in the order snr_rule returns their new values); every other
# state tensor has its parameter's shape.
TENSOR_STATISTICS = ("grad_sq_mean", "step")


def _momentum_direction(g, m, *, sign_momentum, grad_weight, interpolation, interpolation_grad_weight, bound):
    """The trunk's direction ``alpha m + (1 - alpha) g`` (with the old m), then ``m <- beta m + (1 - beta) g`` in
    place, kept within [-bound, bound]; ``g`` and ``m`` lists in the compute dtype."""
    direction = torch._foreach_add(torch._foreach_mul(m, interpolation),
                                   torch._foreach_mul(g, interpolation_grad_weight))
    torch._foreach_mul_(m, sign_momentum)
    torch._foreach_add_(m, torch._foreach_mul(g, grad_weight))
    saturate_(m, bound)
    return direction


def _decoded(codes, scales, dtype):
    """int8 momentum codes times their rows' scales (``factored_shape``'s rows), in ``dtype``."""
    return [code.to(dtype).reshape(len(scale), factored_shape(tuple(code.shape))[1]).mul_(scale.to(dtype)[:, None])
            .reshape(code.shape) for code, scale in zip(codes, scales)]


def _encode(values, codes, scales):
    """Store ``values`` as int8 codes, in place: per row, scale = max|value| / 127 and code = round(value /
    scale) (to nearest, ties to even)."""
    for value, code, scale in zip(values, codes, scales):
        if not value.numel():
            continue
        rows = value.reshape(len(scale), -1)
        new_scale = rows.abs().amax(1) / 127
        scale.copy_(new_scale)
        code.copy_(rows.div(new_scale.clamp(min=torch.finfo(new_scale.dtype).tiny)[:, None]).round_()
                   .clamp_(-127, 127).reshape(code.shape))


def _store_saturated(stored, value):
    stored.copy_(value.clamp_(max=largest_finite(stored.dtype)))


def _factored_update(tensors, *, b2, eps, **numbers):
    """The trunk's update with ``sign_step_scale="factored"`` (see ``sign_update``): the factored statistics and
    the clipped normalized step u tensor by tensor (the statistics in float64: a float32 g^2 may overflow;
    stored saturated at their dtype's largest value), then ``_factored_apply`` over the lists.

    Under FSDP2 a process holds whole rows of each tensor's matrix (its shard of dim 0, maybe none), so R and
    the int8 row scales are local; C's sums, mean(R)'s and rms(u)'s are added over the shards, one
    ``sum_over_shards`` of the group for the statistics and one for rms(u). On the C path (float32 CPU
    tensors, int8 momentum or none, no DTensor) the kernel ``factored_step`` does all of it in one call."""
    lists = tensors.lists
    if tensors.path == "cpu":
        _factored_c_step(tensors, b2=b2, eps=eps, **numbers)
        return
    wide = wide_dtype(lists["params"][0].device)
    rows_and_columns = [factored_shape(shape) for shape in tensors.shapes]  # the whole tensors'
    statistics = []  # per tensor: the column sums of g^2, then the sum of the new R
    for grad, row, step, (_, n_columns) in zip(lists["grads"], lists["rows"], lists["steps"], rows_and_columns):
        step.add_(1)
        square = grad.to(wide).square().reshape(len(row), n_columns)
        _store_saturated(row, b2 * row.to(wide) + (1 - b2) * square.sum(1) / max(n_columns, 1))
        statistics.append(torch.cat([square.sum(0), row.to(wide).sum().view(1)]))
    sum_over_shards(tensors, statistics)
    normalized, squares = [], []
    for grad, row, column, step, (n_rows, _), sums in zip(lists["grads"], lists["rows"], lists["columns"],
                                                          lists["steps"], rows_and_columns, statistics):
        dtype = compute_dtype(grad)
        _store_saturated(column, b2 * column.to(wide) + (1 - b2) * sums[:-1] / max(n_rows, 1))
        row_mean = (sums[-1] / max(n_rows, 1)).clamp(min=torch.finfo(wide).tiny)
        row_rms = (row.to(wide) / (row_mean * one_minus_power(b2, step.to(wide)))).sqrt().to(dtype)
        u = grad.to(dtype) / torch.outer(row_rms, column.to(wide).sqrt().to(dtype)).add_(eps).reshape(grad.shape)
        normalized.append(u)
        squares.append(u.to(wide).square().sum().view(1))
    sum_over_shards(tensors, squares)
    for u, square, numel in zip(normalized, squares, tensors.numels):
        u.div_((square[0] / max(numel, 1)).sqrt().clamp(min=1.0).to(u.dtype))  # an RMS over 1 clipped to 1
    lists["normalized"] = normalized
    names = ["params", "normalized"] + [name for name in ("momenta", "momentum_scales") if name in lists]
    update(tensors, None, _factored_apply, names, numbers=numbers)


def _factored_c_step(tensors, *, b2, eps, lr, decay, grad_sign, sign_momentum=0.0, grad_weight=0.0,
                     interpolation=0.0, interpolation_grad_weight=0.0, bound=0.0):
    """``_factored_update`` on the C path: ``factored_step`` over the group (null codes and scales without
    momentum), given each tensor's bias correction 1 - b2^t computed as the torch path computes it."""
    lists = tensors.lists
    names = ["params", "grads", "rows", "columns", "steps"]
    if "momenta" in lists:
        names += ["momenta", "momentum_scales"]
        pointers = tensors.c_arrays(names)
    else:  # no momentum: null codes and scales
        pointers = tensors.c_arrays(names) + [array.array("Q", bytes(8 * len(lists["params"])))] * 2
        lr = grad_sign * lr
    counts = [array.array("q", map(torch.Tensor.numel, lists[name])) for name in ("rows", "columns")]
    corrections = one_minus_power(b2, torch.stack(lists["steps"]).to(torch.float64) + 1)  # as the torch path's
    _cpu_kernels.run("factored_step", pointers + counts, [corrections],
                     [ctypes.c_double(b2), eps, lr, decay, sign_momentum, grad_weight, interpolation,
                      interpolation_grad_weight, bound])
    mark_written(tensors, names)


def _factored_apply(params, normalized, momenta=None, momentum_scales=None, *, lr, decay, grad_sign, **momentum):
    """The factored trunk's step from its clipped normalized steps u, over lists: ``p <- p decay - lr u``, or
    the momentum of u (grad_sign in its weights), from and back to int8 codes with their row scales."""
    dtype = compute_dtype(params[0])
    p = widened(params, dtype)
    if momenta is None:
        direction, lr = normalized, grad_sign * lr
    else:
        m = widened(momenta, dtype) if momentum_scales is None else _decoded(momenta, momentum_scales, dtype)
        direction = _momentum_direction(normalized, m, **momentum)
        if momentum_scales is None:
            write_back(momenta, m)
        else:
            _encode(m, momenta, momentum_scales)
    torch._foreach_mul_(p, decay)
    torch._foreach_sub_(p, torch._foreach_mul(direction, lr))
    write_back(params, p)


def _sign_step(params, grads, momenta=None, *, lr, decay, sign_momentum=None, grad_weight=None, interpolation=None,
               interpolation_grad_weight=None, bound=None):
    """The trunk's update over lists (``torch._foreach_*``); the C kernels ``sign_step``/``plain_sign_step`` do
    the same float32 operations. ``lr``: one number, or one 0-d tensor per tensor."""
    dtype = compute_dtype(params[0])
    p, g = widened(params, dtype), widened(grads, dtype)
    if momenta is None:  # plain signSGD
        direction = g
    else:
        m = widened(momenta, dtype)
        direction = _momentum_direction(g, m, sign_momentum=sign_momentum, grad_weight=grad_weight,
                                        interpolation=interpolation,
                                        interpolation_grad_weight=interpolation_grad_weight, bound=bound)
        write_back(momenta, m)  # a 16-bit momentum rounded back
    step = torch._foreach_sign(direction)
    torch._foreach_mul_(step, lr)
    torch._foreach_mul_(p, decay)
    torch._foreach_sub_(p, step)
    write_back(params, p)


def _snr_sums(grad, momentum, sign_momentum, grad_weight, bound):
    # Over one tensor: sum(g^2) and sum(|m'|), m' the momentum the update will store (before its rounding to a
    # 16-bit dtype), as the C kernel snr_moments sums them.
    dtype, wide = compute_dtype(grad), wide_dtype(grad.device)
    new_momentum = (momentum.to(dtype) * sign_momentum + grad.to(dtype) * grad_weight).clamp_(-bound, bound)
    return torch.stack([grad.to(wide).square().sum(), new_momentum.abs().sum(dtype=wide)])


def snr_rule(grad_sq_sum_mean, momentum_abs_mean, *, grad_sq_mean, step, lr, sign_momentum, b2, eps, largest):
    """The "snr" scale's per-tensor numbers (float64 vectors, one value per tensor), from this step's mean(g^2)
    and mean(|m|): the new ``grad_sq_mean`` (stored saturated at ``largest``, its dtype's largest value, where
    it overflows that dtype; this step's scale uses the float64 value), the new ``step`` and the scaled rate
    ``lr * s``."""
    new_step = step + 1
    new_grad_sq_mean = b2 * grad_sq_mean + (1 - b2) * grad_sq_sum_mean
    momentum_correction, grad_sq_correction = one_minus_power([sign_momentum, b2], new_step)  # bias corrections
    momentum_size = momentum_abs_mean / momentum_correction
    rms = (new_grad_sq_mean / grad_sq_correction).sqrt() + eps
    return torch.clamp(new_grad_sq_mean, max=largest), new_step, lr * momentum_size / rms


def _momentum_compute_dtype(tensors):
    """The dtype the group's momentum is kept within: its own, or its compute dtype for int8 codes."""
    dtype = tensors.lists["momenta"][0].dtype
    return dtype if dtype.is_floating_point else compute_dtype(tensors.lists["params"][0])


def sign_update(tensors, read, statistics, *, lr, sign_momentum, sign_interpolation, sign_step_scale, snr_b2,
                snr_eps, weight_decay, maximize):
    """The trunk's update, in place, over a parameter group (``tensors``, a ``GroupTensors``).

    For each parameter p with gradient g (negated when ``maximize``)::

        p <- p * (1 - lr * weight_decay)          decoupled weight decay
        d <- alpha * m + (1 - alpha) * g          alpha = sign_interpolation (default: beta)
        m <- beta * m + (1 - beta) * g            beta = sign_momentum, in float32 at least
        p <- p - lr * s * sign(d)                 s = 1, or with sign_step_scale="snr":
        s  = mean(|m|) / (1 - beta^t) / (sqrt(v / (1 - b2^t)) + eps),   v <- b2 v + (1 - b2) mean(g^2)

    With sign_step_scale="factored" the trunk takes Adafactor's normalized
    step instead (Shazeer & Stern, 2018), g seen as a matrix (``factored_shape``:
    the first dimension by the others; a vector is one column)::

        R <- b2 R + (1 - b2) rowmean(g^2),   C <- b2 C + (1 - b2) colmean(g^2)
        u  = g / (sqrt(R C^T / mean(R) / (1 - b2^t)) + eps)
        u <- u / max(1, rms(u))                   a step of RMS over 1 clipped to 1
        p <- p - lr * u                           sign_momentum = 0, or with momentum:
        d <- alpha * m + (1 - alpha) * u,   m <- beta * m + (1 - beta) * u,   p <- p - lr * d

    R C^T / mean(R) is the rank-1 estimate of AdamW's v (exact for a vector),
    kept in (rows + columns) numbers per tensor: the state ``exp_avg_sq_row``,
    ``exp_avg_sq_col`` (float32 at least, saturated at their largest value)
    and ``step``; the momentum is Adafactor's, of the normalized step. On
    float32 CPU tensors with int8 momentum or none it is one C call for the
    group (``factored_step``: three reads of g, one of p and m, one write of
    each). Under FSDP2 (``fully_shard``: dim 0 sharded) it runs on the torch
    path: a process holds whole rows, so R and the int8 row scales are its
    own (DTensors placed as their parameters); C's sums, mean(R) and rms(u)
    are added over the shards (two ``all_reduce`` calls per group and step).

    With alpha = beta (the seeds' rule) d is the new m; alpha < beta is Lion's
    update (Chen et al., 2023), which weights the fresh gradient more. The
    "snr" scale s is the tensor's bias-corrected momentum size over its
    gradient RMS: about 1 where the gradient is consistent, well below 1 where
    it is noise, the size AdamW's normalized step has on average. Its two
    means come from ``read`` (``read_snr``: one read of g and m, over the whole
    tensor under FSDP2), ``v`` and ``t`` from ``statistics`` (the 0-d state
    entries ``grad_sq_mean`` and ``step``), stored back here.

    State: ``momentum_buffer`` (none when ``sign_momentum == 0``: textbook
    signSGD, ``p <- p - lr * sign(g)``), stored in its own dtype (a 16-bit
    momentum is updated in float32 and rounded back) and kept within that
    dtype's finite range. On float32 CPU tensors the update is one C call for
    the group reading p, g, m and writing p, m (20 bytes per parameter, 16 with
    a bf16 m, 12 without m).
    """
    grad_sign = -1.0 if maximize else 1.0
    decay = 1 - lr * weight_decay
    if sign_interpolation is None:
        sign_interpolation = sign_momentum
    momentum = {} if "momenta" not in tensors.lists else dict(
        sign_momentum=sign_momentum, grad_weight=grad_sign * (1.0 - sign_momentum), interpolation=sign_interpolation,
        interpolation_grad_weight=grad_sign * (1.0 - sign_interpolation),
        bound=largest_finite(_momentum_compute_dtype(tensors)))
    if sign_step_scale == "factored":
        _factored_update(tensors, b2=snr_b2, eps=snr_eps, lr=lr, decay=decay, grad_sign=grad_sign, **momentum)
        return
    if not momentum:  # sign_momentum == 0; sign(-g) = -sign(g): maximizing flips the step
        update(tensors, "plain_sign_step", _sign_step, ["params", "grads"],
               numbers=dict(lr=grad_sign * lr, decay=decay))
        return
    rate = lr
    if sign_step_scale == "snr":
        device = read.sums.device
        values = statistics.values(device)
        grad_sq_mean, step, rate = snr_rule(*read.means(), **values, lr=lr, sign_momentum=sign_momentum, b2=snr_b2,
                                            eps=snr_eps, largest=statistics.largest(device))
        statistics.store(dict(grad_sq_mean=grad_sq_mean, step=step))
    update(tensors, "sign_step", _sign_step, ["params", "grads", "momenta"], vectors=dict(lr=rate),
           numbers=dict(decay=decay, **momentum))


def _resolve_alias(given, current_name, current_value):
    """The value of ``current_name``, taking seed 000's alias into account."""
    for alias, name in ALIASES.items():
        if name != current_name or alias not in given:
            continue
        alias_value = given[alias]
        if current_value is not None and current_value != alias_value:
            raise ValueError(
                f"{alias} is seed 000's name for {current_name}; got {alias}={alias_value!r} "
                f"and {current_name}={current_value!r}: give one of them")
        return alias_value
    return current_value


def _check_whole_rows(partition):
    """Refuse trunk DTensors whose processes would not hold whole rows of their ``factored_shape`` matrix: the
    factored trunk takes them sharded over dim 0 (``Shard(0)``, as FSDP2's ``fully_shard``) or replicated."""
    dtensor = dtensor_type()
    if dtensor is None:
        return
    from torch.distributed.tensor import Shard

    for name, param in zip(partition.sign_parameter_names, partition.sign_parameters):
        if isinstance(param, dtensor) and not all(placement.is_replicate() or (type(placement) is Shard
                                                                               and placement.dim == 0)
                                                  for placement in param.placements):
            raise ValueError(f"sign_step_scale='factored' keeps a row statistic per row of dim 0, so a sharded trunk "
                             f"parameter must be sharded over dim 0 only (Shard(0), as fully_shard does) or "
                             f"replicated; {name!r} has placements {tuple(param.placements)}")


def _per_row(param, dtype):
    """Zeros, one per row of ``param``'s ``factored_shape`` matrix; for a DTensor, a DTensor placed as it is (a
    process's shard of dim 0 is its rows)."""
    rows = factored_shape(tuple(param.shape))[0]
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import zeros

        return zeros(rows, dtype=dtype, device_mesh=param.device_mesh, placements=param.placements)
    return torch.zeros(rows, dtype=dtype, device=param.device)


# Each role's param group entries besides ``params``.
GROUP_KEYS = {
    "sign": ("role", "stac_role", "lr", "betas", "sign_interpolation", "sign_step_scale", "snr_eps", "weight_decay",
             "maximize", "layer_names", "param_names"),
    "adamw": ("role", "stac_role", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "layer_names",
              "param_names"),
}


def _from_stac_optimizer_0_1_5(state_dict):
    """A checkpoint of stac-optimizer 0.1.5 (seed 001) in this STAC's form; other checkpoints as they are.

    0.1.5 keeps the role in ``stac_role`` (none in ``role``), every hyperparameter of both roles in each group
    (the trunk's momentum in ``sign_momentum``, the cap's ``betas``), and the trunk's momentum in the state key
    ``sign_momentum_buffer``. Its ``sign_state_dtype``, ``sign_weight_decay``, ``adamw_weight_decay`` and
    ``error_if_nonfinite`` group entries are dropped: this STAC keeps the momentum in its own
    ``sign_state_dtype``, each group's ``weight_decay`` is the one its role steps with, and
    ``error_if_nonfinite`` is the optimizer's."""
    groups = state_dict["param_groups"]
    if not any(isinstance(group, Mapping) and "stac_role" in group and "role" not in group for group in groups):
        return state_dict
    converted, trunk_ids = [], set()
    for saved in groups:
        role = saved.get("stac_role")
        group = {key: saved[key] for key in GROUP_KEYS.get(role, ()) + ("params",) if key in saved}
        group["role"] = group["stac_role"] = role
        if role == "sign":
            trunk_ids.update(saved.get("params", ()))
            group.update(sign_interpolation=None, sign_step_scale=None)
            if "eps" in saved:
                group["snr_eps"] = saved["eps"]
            betas = saved.get("betas")
            if "sign_momentum" in saved and isinstance(betas, (tuple, list)) and len(betas) == 2:
                group["betas"] = (saved["sign_momentum"], betas[1])
        converted.append(group)
    state = {}
    for saved_id, saved_state in state_dict["state"].items():
        if saved_id in trunk_ids and isinstance(saved_state, Mapping):
            saved_state = {"momentum_buffer" if key == "sign_momentum_buffer" else key: value
                           for key, value in saved_state.items()}
        state[saved_id] = saved_state
    return dict(state_dict, param_groups=converted, state=state)


# What a param group given to STAC may hold besides its parameters: its own decoupled weight decay (the no-decay
# group of biases and norms that Hugging Face's Trainer and minGPT build). The other hyperparameters are per role.
USER_GROUP_KEYS = ("params", "weight_decay")


def _is_module(value):
    return callable(getattr(value, "named_modules", None))


def _model_and_param_groups(params, model):
    """The model STAC partitions and the param groups given with it, each ``{"params": [tensors]}`` plus its
    ``weight_decay`` if it sets one (None: the model alone, every trainable parameter in one group)."""
    if _is_module(params):
        if model is not None and model is not params:
            raise ValueError("STAC got two models: pass the model as the first argument or as model=, not both")
        return params, None
    if model is None:
        given = "nothing" if params is None else f"params (a {type(params).__name__})"
        raise TypeError(f"STAC splits a model into layers, so it needs the model (a torch.nn.Module); got {given} "
                        "and no model=. Pass STAC(model, ...), or STAC(params, model=model, ...) to choose the "
                        "parameters or give param groups their own weight_decay. With Hugging Face Trainer, put "
                        "the model in the kwargs: optimizer_cls_and_kwargs=(STAC, {'model': model, ...}).")
    if not _is_module(model):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if params is None:
        return model, None
    if torch.is_tensor(params) or isinstance(params, (Mapping, str)):
        raise TypeError(f"params must be an iterable of parameters, of (name, parameter) pairs or of param group "
                        f"dicts, got a {type(params).__name__}")
    params = list(params)
    as_groups = bool(params) and all(isinstance(group, Mapping) for group in params)
    model_params = {id(param) for param in model.parameters()}
    groups, seen = [], set()
    for index, group in enumerate(params if as_groups else [{"params": params}]):
        where = f"params[{index}]" if as_groups else "params"
        unknown = sorted(set(group) - set(USER_GROUP_KEYS))
        if unknown:
            raise ValueError(f"{where} sets {', '.join(map(repr, unknown))}: a param group given to STAC may set "
                             "its own weight_decay only; lr, betas and eps are per role (lr, sign_lr, adamw_lr, "
                             "betas, eps, sign_momentum)")
        if "weight_decay" in group:
            check_range(f"{where}['weight_decay']", group["weight_decay"], 0.0)
        tensors = group.get("params", [])
        tensors = [tensors] if torch.is_tensor(tensors) else list(tensors)
        where = f"{where}['params']" if as_groups else where
        for position, tensor in enumerate(tensors):
            if isinstance(tensor, tuple) and len(tensor) == 2:  # (name, parameter), as model.named_parameters()
                tensors[position] = tensor = tensor[1]
            if not torch.is_tensor(tensor):
                raise TypeError(f"{where}[{position}] must be a parameter of model or a (name, parameter) pair, "
                                f"got {type(tensor).__name__}")
            if id(tensor) not in model_params:
                raise ValueError(f"{where}[{position}] (a tensor of shape {tuple(tensor.shape)}) is not a parameter "
                                 "of model")
            if id(tensor) in seen:
                raise ValueError(f"{where}[{position}] appears twice in params: list each parameter once")
            seen.add(id(tensor))
        groups.append(dict(group, params=tensors))
    return model, groups


def _param_group(layers, given, hyperparameters):
    """The param group of the parameters of ``layers`` (one role's) that the given param group ``given`` holds:
    ``hyperparameters``, with ``given``'s own weight_decay if it sets one."""
    chosen = {id(param) for param in given["params"]}
    members = [(layer.name, name, param) for layer in layers
               for name, param in zip(layer.parameter_names, layer.parameters) if id(param) in chosen]
    return dict(hyperparameters, weight_decay=given.get("weight_decay", hyperparameters["weight_decay"]),
                layer_names=list(dict.fromkeys(layer for layer, _, _ in members)),
                param_names=[name for _, name, _ in members], params=[param for _, _, param in members])


class STAC(SkipNonfiniteOptimizer):
    r"""SignSGD Trunk, AdamW Cap.

    The model's trainable layers, in registration order, are split in two (see
    ``stac_stam.partition``): the last ``last_n_layers`` form the AdamW
    *cap*, the earlier ones the sign *trunk*. Per parameter, with gradient g::

        trunk:  p <- p (1 - lr_s wd_s);  m <- beta m + (1 - beta) g;  p <- p - lr_s sign(m)
        cap:    torch.optim.AdamW with (lr_a, betas, eps, wd_a, amsgrad)

    (``sign_update`` has the trunk's two variants: Lion's interpolation and
    the per-tensor "snr" step scale.)

    ============================  ===================================================
    symbol                        argument
    ============================  ===================================================
    beta                          ``sign_momentum`` (0: plain signSGD, no state;
                                  the trunk group's ``betas[0]``)
    sign of alpha m + (1-alpha) g ``sign_interpolation`` alpha (default: the new m)
    step scale s                  ``sign_step_scale`` (None: 1; "snr": per tensor,
                                  mean|m_hat| / (sqrt(v_hat) + eps), v with betas[1];
                                  "factored": Adafactor's d / sqrt(v_hat) instead
                                  of sign(d), see ``sign_update``)
    lr_a                          ``adamw_lr`` (default ``lr``)
    lr_s                          ``sign_lr`` (default ``0.75 * lr`` when there is a
                                  cap, ``lr`` when every layer is in the trunk)
    wd_s / wd_a                   ``sign_weight_decay`` / ``adamw_weight_decay``
                                  (default ``weight_decay``, 0.0 as in stac-optimizer 0.1.5)
    storage dtype of m            ``sign_state_dtype`` (default: the parameter's;
                                  ``torch.int8`` with "factored": codes and a
                                  float32 scale per row, ``momentum_scale``)
    ============================  ===================================================

    ``STAC.compact`` is the configuration under a quarter of AdamW's state
    (the factored trunk with int8 momentum, the output layer and the norms in
    the cap); ``STAC.recommended`` the earlier sign-trunk one.

    Seed 000's names still work: ``trunk_momentum``, ``trunk_lr``, ``cap_lr``,
    ``trunk_weight_decay``, ``cap_weight_decay``; giving one with a different
    value from its current name is a ValueError.

    Each role is one param group (``group["role"]``, and as in stac-optimizer
    0.1.5 ``group["stac_role"]``, is ``"sign"`` or ``"adamw"``) with its own
    ``lr`` and ``betas``, so ``torch.optim.lr_scheduler`` schedulers drive both:
    the cap's ``betas`` are AdamW's, the trunk's are ``(sign_momentum, b2)``,
    b2 being ``betas[1]``, the decay of the "snr" scale's v. A scheduler that
    cycles momentum (``OneCycleLR``, ``CyclicLR``) cycles the cap's beta1 and the
    trunk's momentum (a plain-signSGD trunk then gains momentum, as
    ``torch.optim.SGD`` does). ``lr`` may be a 0-d tensor, as in torch.optim.
    Optimizer state: the trunk keeps ``momentum_buffer`` per
    parameter (and, with "snr", the 0-d ``grad_sq_mean`` and ``step``); the
    cap keeps ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``
    with amsgrad), as ``torch.optim.AdamW`` does.

    Checkpoints: ``load_state_dict`` refuses (changing nothing) a checkpoint of
    another model (roles, layer and parameter names, state shapes), of another
    optimizer, or with a value the constructor would refuse; names ignore
    wrapper prefixes (``module.``, ``_orig_mod.``), so a checkpoint moves
    between a bare, a DDP-wrapped and a compiled model. It loads stac-optimizer
    0.1.5's checkpoints (the trunk's momentum in this STAC's
    ``sign_state_dtype``).

    A step whose dense gradients hold a NaN or an Inf changes nothing and is
    counted in ``nonfinite_skipped_steps``; with ``error_if_nonfinite=True`` it
    raises RuntimeError instead, still changing nothing.

    Routing beyond "last N": ``adamw_norm_layers=True`` also sends every
    normalization-layer parameter (BatchNorm, LayerNorm, GroupNorm, RMSNorm)
    to the cap, as Zhao et al. (ICLR 2025) find adaptivity matters there;
    ``adamw_output_layer=True`` sends the output layer's parameters (the last
    module holding a trainable parameter, shared or not: an MLP's last Linear,
    an untied ``lm_head``, a tied ``lm_head`` whose weight is the embedding's,
    the layer where Zhao et al. find adaptivity matters most) to the cap;
    ``adamw_params`` is a predicate over full parameter names for anything else.

    Tied weights: a shared parameter belongs to its first owner (the seeds'
    rule), so a tied LM head (Hugging Face GPT-2: ``lm_head.weight is
    transformer.wte.weight``) is no layer of its own and its weight, the
    embedding's, takes sign updates; ``last_n_layers=1`` then caps only the
    final norm. When the cap holds under 1% of the trainable parameters while
    the output layer's weight is an earlier trunk layer's, STAC warns once at
    construction (a ``UserWarning`` naming the layers, the counts and the fix,
    ``adamw_output_layer=True``; ``partition.tied_output_warning()`` is its text).

    What STAC receives: the model, ``STAC(model, ...)`` (every trainable
    parameter), or parameters with the model, ``STAC(params, model=model,
    ...)``, where ``params`` is an iterable of the model's parameters, of
    ``(name, parameter)`` pairs (``model.named_parameters()``) or of param group
    dicts. The model gives the layers (their order, names, classes and shared
    parameters); ``params`` chooses the parameters (the model's others count as
    frozen), and a group may set its own ``weight_decay``, which its parameters
    get in both roles (the no-decay group of biases and norms of Hugging Face's
    Trainer and minGPT). STAC then has one param group per role and given group
    that holds parameters, in that order. A group's other hyperparameters
    (``lr``, ``betas``, ...) are refused: STAC sets them per role.
    Hugging Face ``Trainer(optimizer_cls_and_kwargs=(STAC, {"model": model,
    ...}))`` passes the model itself (Trainer takes ``model`` out of the kwargs
    and drops its own param groups, so ``TrainingArguments.weight_decay`` does
    not reach STAC: give ``weight_decay`` in the kwargs); Lightning's
    ``configure_optimizers`` returns ``STAC(self, ...)`` or ``STAC(groups,
    model=self, ...)``. Both resume from their checkpoints exactly
    (``examples/hf_trainer.py``, ``examples/lightning_module.py``).

    Speed: each role is one read of every gradient (the non-finite check;
    with "snr", the statistics read of g and m that makes it) and one update,
    each one call over the whole group on float32 CPU tensors (the C kernels of
    ``_kernels.py``'s "cpu" path; bf16 momentum included) and ``torch._foreach_*``
    calls elsewhere; the cap runs torch's fused AdamW kernel. ``fused=False``
    runs the same torch code tensor by tensor. Nothing is compiled.

    References: Bernstein et al., signSGD (2018); Sun et al., Momentum ensures
    convergence of SIGNSGD (ICML 2023); Loshchilov & Hutter, Decoupled weight
    decay (ICLR 2019); Zhao et al., Deconstructing what makes a good optimizer
    for autoregressive language models (ICLR 2025).

    Example::

        optimizer = STAC(model, lr=1e-3, last_n_layers=1, weight_decay=1e-2)
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(optimizer.partition.table())

        # A tied LM head in the cap, and no weight decay on biases and norms:
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = STAC([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], model=model,
                         lr=1e-3, weight_decay=0.1, adamw_output_layer=True)
    """

    _settings = SkipNonfiniteOptimizer._settings + ("sign_state_dtype", "partition", "_groups_built")

    def __init__(self, params=None, *, model=None, lr=1e-3, last_n_layers=1, sign_momentum=None,
                 sign_interpolation=None, sign_step_scale=None, sign_state_dtype=None,
                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, sign_weight_decay=None,
                 adamw_weight_decay=None, sign_lr=None, adamw_lr=None, amsgrad=False, maximize=False,
                 error_if_nonfinite=False, adamw_norm_layers=False, adamw_output_layer=False, adamw_params=None,
                 fused=True, trunk_momentum=None, trunk_lr=None, cap_lr=None, trunk_weight_decay=None,
                 cap_weight_decay=None):
        given_aliases = {name: value for name, value in [
            ("trunk_momentum", trunk_momentum), ("trunk_lr", trunk_lr), ("cap_lr", cap_lr),
            ("trunk_weight_decay", trunk_weight_decay), ("cap_weight_decay", cap_weight_decay),
        ] if value is not None}
        sign_momentum = _resolve_alias(given_aliases, "sign_momentum", sign_momentum)
        sign_lr = _resolve_alias(given_aliases, "sign_lr", sign_lr)
        adamw_lr = _resolve_alias(given_aliases, "adamw_lr", adamw_lr)
        sign_weight_decay = _resolve_alias(given_aliases, "sign_weight_decay", sign_weight_decay)
        adamw_weight_decay = _resolve_alias(given_aliases, "adamw_weight_decay", adamw_weight_decay)
        if sign_momentum is None:
            sign_momentum = 0.9

        # The arguments no param group holds under their own name; the groups' entries are checked by _check_group.
        check_range("lr", lr, 0.0, tensor=True)
        for name, value in (("sign_lr", sign_lr), ("adamw_lr", adamw_lr)):
            if value is not None:
                check_range(name, value, 0.0, tensor=True)
        for name, value in (("sign_weight_decay", sign_weight_decay), ("adamw_weight_decay", adamw_weight_decay)):
            if value is not None:
                check_range(name, value, 0.0)
        check_flag("adamw_norm_layers", adamw_norm_layers)
        check_flag("adamw_output_layer", adamw_output_layer)
        betas = tuple(check_pair("betas", betas))
        if sign_state_dtype in ("int8", "torch.int8", torch.int8):
            if sign_step_scale != "factored":
                raise ValueError("sign_state_dtype=int8 stores the momentum of the factored trunk's normalized step "
                                 "(values of about 1, which 8-bit codes hold); it needs sign_step_scale='factored'")
            sign_state_dtype = torch.int8
        else:
            sign_state_dtype = resolve_state_dtype("sign_state_dtype", sign_state_dtype)
        model, param_groups = _model_and_param_groups(params, model)

        partition = partition_trainable_layers(
            model, last_n_layers, adamw_norm_layers=adamw_norm_layers, adamw_output_layer=adamw_output_layer,
            adamw_params=adamw_params,
            params=None if param_groups is None else [param for group in param_groups for param in group["params"]])
        if sign_lr is None:
            sign_lr = SIGN_LR_SCALE * lr if partition.sign_layers and partition.adamw_layers else lr
        if adamw_lr is None:
            adamw_lr = lr
        if adamw_lr is sign_lr and torch.is_tensor(adamw_lr):  # a scheduler fills each group's lr tensor in place
            adamw_lr = adamw_lr.clone()
        roles = {
            "sign": dict(lr=sign_lr, betas=(sign_momentum, betas[1]), sign_interpolation=sign_interpolation,
                         sign_step_scale=sign_step_scale, snr_eps=eps,
                         weight_decay=weight_decay if sign_weight_decay is None else sign_weight_decay),
            "adamw": dict(lr=adamw_lr, betas=betas, eps=eps, amsgrad=amsgrad,
                          weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay),
        }
        if param_groups is None:  # the model alone: one given group, with no weight_decay of its own
            param_groups = [{"params": partition.sign_parameters + partition.adamw_parameters}]
        groups = []  # one per role and given group, in that order
        for role, layers in (("sign", partition.sign_layers), ("adamw", partition.adamw_layers)):
            hyperparameters = dict(roles[role], role=role, stac_role=role, maximize=maximize)
            self._check_group(dict(hyperparameters, layer_names=[], param_names=[]))  # every role's, used or not
            groups += [group for given in param_groups
                       if (group := _param_group(layers, given, hyperparameters))["params"]]

        # What partition.table() counts per trunk element: no momentum, or one in sign_state_dtype (None: the
        # parameter's dtype).
        momentum_bytes = 0 if sign_momentum == 0.0 else sign_state_dtype.itemsize if sign_state_dtype else None
        self.partition = dataclasses.replace(
            partition, sign_state_bytes_per_element=momentum_bytes,
            factored_second_moment=sign_step_scale == "factored",
            row_scaled_momentum=sign_state_dtype == torch.int8 and sign_momentum != 0.0)
        if sign_step_scale == "factored":
            _check_whole_rows(partition)
        self.sign_state_dtype = sign_state_dtype
        # The defaults every group holds: OneCycleLR and CyclicLR look for betas in them.
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(groups, defaults, error_if_nonfinite, fused)
        self._groups_built = True
        tied_output_warning = partition.tied_output_warning()
        if tied_output_warning:
            warnings.warn(tied_output_warning, UserWarning, stacklevel=2)

    @classmethod
    def recommended(cls, params=None, lr=3e-3, **overrides):
        r"""STAC at a quarter of AdamW's state: SNR-scaled sign steps at 3x the rate, bf16 momentum.

        ``STAC(model, lr=lr, sign_step_scale="snr", sign_lr=RECOMMENDED_SIGN_LR_SCALE * lr,
        sign_state_dtype=torch.bfloat16)``, everything else at STAC's defaults;
        ``overrides`` go to ``STAC`` and win. A plain sign step moves every
        coordinate by the full rate, where AdamW's normalized step moves noisy
        coordinates by a fraction of it; the "snr" scale gives each trunk
        tensor that average size (``mean|m_hat| / rms(g)``, about 0.1-0.5 on
        noisy layers, 1 on consistent ones), and the 3x trunk rate gives the
        size back on average while keeping the per-layer differences. The bf16
        momentum keeps the trunk at a quarter of AdamW's state. The evidence,
        per task and seed, is in ``docs/benchmark/README.md``.

        Example::

            optimizer = STAC.recommended(model, lr=3e-3)
        """
        check_range("lr", lr, 0.0, tensor=True)
        options = dict(sign_step_scale="snr", sign_lr=RECOMMENDED_SIGN_LR_SCALE * lr,
                       sign_state_dtype=torch.bfloat16)
        options.update(overrides)
        return cls(params, lr=lr, **options)

    @classmethod
    def compact(cls, params=None, lr=3e-3, **overrides):
        r"""STAC under a quarter of AdamW's state: a factored trunk with an int8 momentum, the output layer and
        the normalization layers in the AdamW cap.

        ``STAC(model, lr=lr, sign_step_scale="factored", sign_state_dtype=torch.int8,
        sign_lr=COMPACT_SIGN_LR_SCALE * lr, adamw_output_layer=True, adamw_norm_layers=True)``
        (the scale is 3), everything else at
        STAC's defaults (``sign_momentum=0.9``); ``overrides`` go to ``STAC``
        and win. The trunk takes Adafactor's normalized step (a factored second
        moment: a row and a column per tensor, Shazeer & Stern 2018) with the
        momentum of that step (values of about 1) kept in int8 codes with one
        float32 scale per row; the cap gets the output layer, tied or not, and
        the norms, where Zhao et al. (ICLR 2025) find adaptivity matters most.
        State: about 1 byte per trunk parameter (12.5% of AdamW's 8) plus the
        cap's 8. The trunk steps at 3x the cap's ``lr``: the momentum of a
        clipped normalized step wants a larger rate than AdamW does. The evidence, per task and seed, is
        in ``docs/benchmark/README.md``. Under FSDP2 it gives the numbers of
        one process (see ``sign_update``).

        Example::

            optimizer = STAC.compact(model, lr=3e-3)
        """
        check_range("lr", lr, 0.0, tensor=True)
        options = dict(sign_step_scale="factored", sign_state_dtype=torch.int8, sign_lr=COMPACT_SIGN_LR_SCALE * lr,
                       adamw_output_layer=True, adamw_norm_layers=True)
        options.update(overrides)
        return cls(params, lr=lr, **options)

    def add_param_group(self, param_group):
        if getattr(self, "_groups_built", False):
            raise RuntimeError(
                "STAC derives its parameter groups from the model's structure; add_param_group() is not "
                "supported. Build a new STAC from the model instead.")
        super().add_param_group(param_group)

    def _initial_state(self, group, param):
        if group["role"] == "adamw":
            zeros = lambda: torch.zeros_like(param, memory_format=torch.preserve_format)  # noqa: E731
            # The fused kernel wants its step count as a float32 tensor on the parameter's device.
            state = dict(step=torch.zeros((), dtype=torch.float32, device=param.device if _adamw_fusable(param)
                                          else "cpu"), exp_avg=zeros(), exp_avg_sq=zeros())
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = zeros()
            return state
        state = {}
        if group["sign_step_scale"] == "factored":
            stat_dtype = torch.promote_types(param.dtype, torch.float32)
            state.update(exp_avg_sq_row=_per_row(param, stat_dtype),
                         exp_avg_sq_col=torch.zeros(factored_shape(tuple(param.shape))[1], dtype=stat_dtype,
                                                    device=param.device),
                         step=torch.zeros((), dtype=stat_dtype, device=param.device))
        if group["betas"][0] == 0.0:
            return state
        state["momentum_buffer"] = torch.zeros_like(param, dtype=self.sign_state_dtype or param.dtype,
                                                    memory_format=torch.preserve_format)
        if self.sign_state_dtype == torch.int8:  # codes, and a scale per row
            state["momentum_scale"] = _per_row(param, torch.promote_types(param.dtype, torch.float32))
        if group["sign_step_scale"] == "snr":
            stat_dtype = torch.promote_types(param.dtype, torch.float32)
            state.update(grad_sq_mean=torch.zeros((), dtype=stat_dtype, device=param.device),
                         step=torch.zeros((), dtype=stat_dtype, device=param.device))
        return state

    def _prepare_group(self, group, params, grads):
        states, created = self._states(group, params)
        if group["role"] == "adamw":
            lists = dict(params=params, grads=grads, exp_avg=[state["exp_avg"] for state in states],
                         exp_avg_sq=[state["exp_avg_sq"] for state in states])
            if group["amsgrad"]:
                lists["max_exp_avg_sq"] = [state["max_exp_avg_sq"] for state in states]
            tensors = GroupTensors(self.fused, lists)
            return read_finite(tensors), (states, created, tensors, None)
        if group["sign_step_scale"] == "factored":
            lists = dict(params=params, grads=grads, rows=[state["exp_avg_sq_row"] for state in states],
                         columns=[state["exp_avg_sq_col"] for state in states],
                         steps=[state["step"] for state in states])
            if group["betas"][0] != 0.0:
                lists["momenta"] = [state["momentum_buffer"] for state in states]
            if self.sign_state_dtype == torch.int8 and group["betas"][0] != 0.0:
                lists["momentum_scales"] = [state["momentum_scale"] for state in states]
            tensors = GroupTensors(self.fused, lists, int8_lists=("momenta",))
            if tensors.shard_meshes:
                tensors.demote()  # the C kernel takes whole tensors: no sums over shards
            return read_finite(tensors), (states, created, tensors, None)
        if group["betas"][0] == 0.0:  # plain signSGD
            tensors = GroupTensors(self.fused, dict(params=params, grads=grads))
            return read_finite(tensors), (states, created, tensors, None)
        tensors = GroupTensors(self.fused, dict(params=params, grads=grads,
                                                momenta=[state["momentum_buffer"] for state in states]),
                               bf16_lists=("momenta",))
        if group["sign_step_scale"] != "snr":
            return read_finite(tensors), (states, created, tensors, None)
        statistics = TensorStatistics(tensors, states, TENSOR_STATISTICS,
                                      statistics_table(self, group, TENSOR_STATISTICS))
        beta = traced_number(group["betas"][0])
        read = read_sums(tensors, "snr_moments", ["grads", "momenta"], _snr_sums,
                         numbers=(beta, (-1.0 if group["maximize"] else 1.0) * (1.0 - beta),
                                  largest_finite(tensors.lists["momenta"][0].dtype)))
        return read, (states, created, tensors, statistics)

    def _update_group(self, group, params, grads, read, context):
        states, created, tensors, statistics = context
        self._store_states(created)
        if group["role"] == "sign":
            sign_update(tensors, read, statistics, lr=group["lr"], sign_momentum=traced_number(group["betas"][0]),
                        sign_interpolation=group["sign_interpolation"], sign_step_scale=group["sign_step_scale"],
                        snr_b2=group["betas"][1], snr_eps=group["snr_eps"], weight_decay=group["weight_decay"],
                        maximize=group["maximize"])
            return
        lists = tensors.lists
        beta1, beta2 = group["betas"]
        adamw_functional(lists["params"], lists["grads"], lists["exp_avg"], lists["exp_avg_sq"],
                         lists.get("max_exp_avg_sq", []), [state["step"] for state in states],
                         fused=all(map(_adamw_fusable, lists["params"])), foreach=False, amsgrad=group["amsgrad"],
                         beta1=traced_number(beta1), beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                         eps=group["eps"], maximize=group["maximize"])
        mark_written(tensors, list(lists))  # torch's fused AdamW (2.13, CPU) leaves the version counters as they were

    # Validation and checkpoints --------------------------------------------------------------

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("sign_state_dtype", None)
        self.__dict__.setdefault("partition", None)
        self.__dict__.setdefault("_groups_built", True)

    def _upgrade_group(self, group):
        """A group of an earlier STAC (the role only in ``role``; the trunk's momentum and "snr" b2 as
        ``sign_momentum`` and ``snr_b2``) in the current form, in place."""
        if "role" in group:
            group.setdefault("stac_role", group["role"])
        if group.get("role") == "sign" and "sign_momentum" in group and "snr_b2" in group:
            group["betas"] = (group.pop("sign_momentum"), group.pop("snr_b2"))
        return group

    def _check_group(self, group, where=""):
        role = group.get("role")
        if role not in GROUP_KEYS:
            raise ValueError(f"{where}role must be 'sign' or 'adamw', got {role!r}")
        require_keys(group, GROUP_KEYS[role], where, f"STAC {role}")
        if group["stac_role"] != role:
            raise ValueError(f"{where}stac_role must be the group's role {role!r}, got {group['stac_role']!r}")
        check_range(f"{where}lr", group["lr"], 0.0, tensor=True)
        check_range(f"{where}weight_decay", group["weight_decay"], 0.0)
        check_flag(f"{where}maximize", group["maximize"])
        check_names(f"{where}layer_names", group["layer_names"])
        check_names(f"{where}param_names", group["param_names"], len(group["params"]) if "params" in group else None)
        beta1, beta2 = check_pair(f"{where}betas", group["betas"])
        if role == "adamw":
            check_range(f"{where}betas[0]", beta1, 0.0, 1.0)
            check_range(f"{where}betas[1]", beta2, 0.0, 1.0)
            # eps = 0 would make 0/0 of a zero gradient's first step
            check_range(f"{where}eps", group["eps"], 0.0, low_open=True)
            check_flag(f"{where}amsgrad", group["amsgrad"])
            return
        check_range(f"{where}sign_momentum", beta1, 0.0, 1.0)
        check_range(f"{where}betas[1]", beta2, 0.0, 1.0)
        if group["sign_interpolation"] is not None:
            check_range(f"{where}sign_interpolation", group["sign_interpolation"], 0.0, 1.0)
        check_range(f"{where}eps", group["snr_eps"], 0.0, low_open=True)
        if group["sign_step_scale"] not in (None, "snr", "factored"):
            raise ValueError(f"{where}sign_step_scale must be None, 'snr' or 'factored', got "
                             f"{group['sign_step_scale']!r}")
        if group["sign_step_scale"] == "snr" and beta1 == 0.0:
            raise ValueError(f"{where}sign_step_scale='snr' scales by the momentum's size; it needs "
                             "sign_momentum > 0")
        if group["sign_step_scale"] == "snr" and beta2 == 0.0:
            raise ValueError(f"{where}sign_step_scale='snr' averages g^2 with betas[1]; it needs betas[1] > 0")

    def _migrate_checkpoint(self, state_dict):
        return _from_stac_optimizer_0_1_5(state_dict)

    def _check_saved_layout(self, saved_groups):
        """Refuse a checkpoint of another model or partition: roles, then layer and parameter names (up to
        wrapper prefixes), then the groups' sizes."""
        saved_roles = [group.get("role") for group in saved_groups]
        if saved_roles != [group["role"] for group in self.param_groups]:
            raise ValueError(f"checkpoint roles {saved_roles} do not match this optimizer's "
                             f"{[group['role'] for group in self.param_groups]}")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            for key in ("layer_names", "param_names"):
                check_names(f"checkpoint param_groups[{index}] {key}", saved.get(key))
                if not same_parameter_names(saved[key], group[key]):
                    raise ValueError(f"checkpoint {group['role']} {key.replace('_', ' ')} {list(saved[key])} do "
                                     f"not match this model's {list(group[key])}")
        super()._check_saved_layout(saved_groups)

    def _check_loaded_group(self, group, current, saved_ids, where):
        super()._check_loaded_group(group, current, saved_ids, where)
        # The checkpoint's names may carry a wrapper's prefix; this model's are the ones to keep.
        group["layer_names"], group["param_names"] = current["layer_names"], current["param_names"]
