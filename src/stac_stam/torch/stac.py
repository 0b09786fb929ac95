"""STAC for PyTorch: a SignSGD trunk and an AdamW cap."""

import math

import torch
from torch.optim.adamw import adamw as adamw_functional

from stac_stam.learning_rates import RECOMMENDED_SIGN_LR_SCALE, SIGN_LR_SCALE
from stac_stam.partition import partition_trainable_layers
from stac_stam.torch._base import SkipNonfiniteOptimizer, check_range
from stac_stam.torch._cpu_kernels import statistics_table
from stac_stam.torch._kernels import (GroupTensors, TensorStatistics, compute_dtype, largest_finite, read_finite,
                                      read_sums, saturate_, update, wide_dtype, widened, write_back)

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
        direction = torch._foreach_add(torch._foreach_mul(m, interpolation),
                                       torch._foreach_mul(g, interpolation_grad_weight))
        torch._foreach_mul_(m, sign_momentum)
        torch._foreach_add_(m, torch._foreach_mul(g, grad_weight))
        saturate_(m, bound)
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
    # -expm1(t log x) = 1 - x^t, the bias corrections of m and of mean(g^2)
    momentum_size = momentum_abs_mean / -torch.expm1(new_step * math.log(sign_momentum))
    rms = (new_grad_sq_mean / -torch.expm1(new_step * math.log(b2))).sqrt() + eps
    return torch.clamp(new_grad_sq_mean, max=largest), new_step, lr * momentum_size / rms


def sign_update(tensors, read, statistics, *, lr, sign_momentum, sign_interpolation, sign_step_scale, snr_b2,
                snr_eps, weight_decay, maximize):
    """The trunk's update, in place, over a parameter group (``tensors``, a ``GroupTensors``).

    For each parameter p with gradient g (negated when ``maximize``)::

        p <- p * (1 - lr * weight_decay)          decoupled weight decay
        d <- alpha * m + (1 - alpha) * g          alpha = sign_interpolation (default: beta)
        m <- beta * m + (1 - beta) * g            beta = sign_momentum, in float32 at least
        p <- p - lr * s * sign(d)                 s = 1, or with sign_step_scale="snr":
        s  = mean(|m|) / (1 - beta^t) / (sqrt(v / (1 - b2^t)) + eps),   v <- b2 v + (1 - b2) mean(g^2)

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
    if sign_momentum == 0.0:  # sign(-g) = -sign(g): maximizing flips the step
        update(tensors, "plain_sign_step", _sign_step, ["params", "grads"],
               numbers=dict(lr=grad_sign * lr, decay=decay))
        return
    if sign_interpolation is None:
        sign_interpolation = sign_momentum
    rate = lr
    if sign_step_scale == "snr":
        device = read.sums.device
        values = statistics.values(device)
        grad_sq_mean, step, rate = snr_rule(*read.means(), **values, lr=lr, sign_momentum=sign_momentum, b2=snr_b2,
                                            eps=snr_eps, largest=statistics.largest(device))
        statistics.store(dict(grad_sq_mean=grad_sq_mean, step=step))
    momentum_dtype = tensors.lists["momenta"][0].dtype
    update(tensors, "sign_step", _sign_step, ["params", "grads", "momenta"], vectors=dict(lr=rate),
           numbers=dict(decay=decay, sign_momentum=sign_momentum, grad_weight=grad_sign * (1.0 - sign_momentum),
                        interpolation=sign_interpolation,
                        interpolation_grad_weight=grad_sign * (1.0 - sign_interpolation),
                        bound=largest_finite(momentum_dtype)))


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


def _resolve_dtype(sign_state_dtype):
    if sign_state_dtype is None:
        return None
    if isinstance(sign_state_dtype, str):
        name = sign_state_dtype.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"sign_state_dtype must be a floating torch dtype or its name, got {sign_state_dtype!r}")
        sign_state_dtype = dtype
    if not isinstance(sign_state_dtype, torch.dtype) or not sign_state_dtype.is_floating_point:
        raise ValueError(f"sign_state_dtype must be a floating torch dtype or its name, got {sign_state_dtype!r}")
    return sign_state_dtype


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
    beta                          ``sign_momentum`` (0: plain signSGD, no state)
    sign of alpha m + (1-alpha) g ``sign_interpolation`` alpha (default: the new m)
    step scale s                  ``sign_step_scale`` (None: 1; "snr": per tensor,
                                  mean|m_hat| / (sqrt(v_hat) + eps), v with betas[1])
    lr_a                          ``adamw_lr`` (default ``lr``)
    lr_s                          ``sign_lr`` (default ``0.75 * lr`` when there is a
                                  cap, ``lr`` when every layer is in the trunk)
    wd_s / wd_a                   ``sign_weight_decay`` / ``adamw_weight_decay``
                                  (default ``weight_decay``)
    storage dtype of m            ``sign_state_dtype`` (default: the parameter's)
    ============================  ===================================================

    Seed 000's names still work: ``trunk_momentum``, ``trunk_lr``, ``cap_lr``,
    ``trunk_weight_decay``, ``cap_weight_decay``; giving one with a different
    value from its current name is a ValueError.

    Each role is one param group (``group["role"]`` is ``"sign"`` or
    ``"adamw"``) with its own ``lr``, so ``torch.optim.lr_scheduler`` schedulers
    drive both. Optimizer state: the trunk keeps ``momentum_buffer`` per
    parameter (and, with "snr", the 0-d ``grad_sq_mean`` and ``step``); the
    cap keeps ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``
    with amsgrad), as ``torch.optim.AdamW`` does.

    A step whose dense gradients hold a NaN or an Inf changes nothing and is
    counted in ``nonfinite_skipped_steps``; with ``error_if_nonfinite=True`` it
    raises RuntimeError instead, still changing nothing.

    Routing beyond "last N": ``adamw_norm_layers=True`` also sends every
    normalization-layer parameter (BatchNorm, LayerNorm, GroupNorm, RMSNorm)
    to the cap, as Zhao et al. (ICLR 2025) find adaptivity matters there;
    ``adamw_params`` is a predicate over full parameter names for anything else.

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
    """

    def __init__(self, model, *, lr=1e-3, last_n_layers=1, sign_momentum=None, sign_interpolation=None,
                 sign_step_scale=None, sign_state_dtype=None,
                 betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, sign_weight_decay=None,
                 adamw_weight_decay=None, sign_lr=None, adamw_lr=None, amsgrad=False, maximize=False,
                 error_if_nonfinite=False, adamw_norm_layers=False, adamw_params=None, fused=True,
                 trunk_momentum=None, trunk_lr=None, cap_lr=None, trunk_weight_decay=None,
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

        check_range("lr", lr, 0.0)
        check_range("sign_momentum", sign_momentum, 0.0, 1.0)
        if sign_interpolation is not None:
            check_range("sign_interpolation", sign_interpolation, 0.0, 1.0)
        if sign_step_scale not in (None, "snr"):
            raise ValueError(f"sign_step_scale must be None or 'snr', got {sign_step_scale!r}")
        if sign_step_scale == "snr" and sign_momentum == 0.0:
            raise ValueError("sign_step_scale='snr' scales by the momentum's size; it needs sign_momentum > 0")
        check_range("eps", eps, 0.0)
        check_range("weight_decay", weight_decay, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for index, beta in enumerate(betas):
            check_range(f"betas[{index}]", beta, 0.0, 1.0)
        for name, value in (("sign_lr", sign_lr), ("adamw_lr", adamw_lr), ("sign_weight_decay", sign_weight_decay),
                            ("adamw_weight_decay", adamw_weight_decay)):
            if value is not None:
                check_range(name, value, 0.0)
        sign_state_dtype = _resolve_dtype(sign_state_dtype)

        self.partition = partition_trainable_layers(
            model, last_n_layers, adamw_norm_layers=adamw_norm_layers, adamw_params=adamw_params)
        hybrid = bool(self.partition.sign_layers) and bool(self.partition.adamw_layers)
        if sign_lr is None:
            sign_lr = SIGN_LR_SCALE * lr if hybrid else lr
        self.sign_state_dtype = sign_state_dtype

        groups = []
        if self.partition.sign_layers:
            groups.append({
                "params": self.partition.sign_parameters, "role": "sign", "lr": sign_lr,
                "sign_momentum": sign_momentum, "sign_interpolation": sign_interpolation,
                "sign_step_scale": sign_step_scale, "snr_b2": betas[1], "snr_eps": eps,
                "weight_decay": weight_decay if sign_weight_decay is None else sign_weight_decay,
                "maximize": bool(maximize),
                "layer_names": list(self.partition.sign_layer_names),
                "param_names": list(self.partition.sign_parameter_names),
            })
        if self.partition.adamw_layers:
            groups.append({
                "params": self.partition.adamw_parameters, "role": "adamw",
                "lr": lr if adamw_lr is None else adamw_lr, "betas": tuple(betas), "eps": eps,
                "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay,
                "amsgrad": bool(amsgrad), "maximize": bool(maximize),
                "layer_names": list(self.partition.adamw_layer_names),
                "param_names": list(self.partition.adamw_parameter_names),
            })
        super().__init__(groups, {}, error_if_nonfinite, fused)
        self._groups_built = True

    @classmethod
    def recommended(cls, model, lr=3e-3, **overrides):
        r"""STAC as the benchmark's ablation recommends it: SNR-scaled sign steps at 3x the rate, bf16 momentum.

        ``STAC(model, lr=lr, sign_step_scale="snr", sign_lr=RECOMMENDED_SIGN_LR_SCALE * lr,
        sign_state_dtype=torch.bfloat16)``, everything else at STAC's defaults;
        ``overrides`` go to ``STAC`` and win. A plain sign step moves every
        coordinate by the full rate, where AdamW's normalized step moves noisy
        coordinates by a fraction of it; the "snr" scale gives each trunk
        tensor that average size (``mean|m_hat| / rms(g)``, about 0.1-0.5 on
        noisy layers, 1 on consistent ones), and the 3x trunk rate gives the
        size back on average while keeping the per-layer differences. The bf16
        momentum keeps the trunk at a quarter of AdamW's state. The evidence,
        per task and seed, is in ``docs/benchmark/ablation``.

        Example::

            optimizer = STAC.recommended(model, lr=3e-3)
        """
        options = dict(sign_step_scale="snr", sign_lr=RECOMMENDED_SIGN_LR_SCALE * lr,
                       sign_state_dtype=torch.bfloat16)
        options.update(overrides)
        return cls(model, lr=lr, **options)

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
        if group["sign_momentum"] == 0.0:
            return {}
        state = dict(momentum_buffer=torch.zeros_like(param, dtype=self.sign_state_dtype or param.dtype,
                                                      memory_format=torch.preserve_format))
        if group["sign_step_scale"] == "snr":
            stat_dtype = torch.promote_types(param.dtype, torch.float32)
            state.update(grad_sq_mean=torch.zeros((), dtype=stat_dtype, device=param.device),
                         step=torch.zeros((), dtype=stat_dtype, device=param.device))
        return state

    def _prepare_group(self, group, params, grads):
        states = self._states(group, params)
        if group["role"] == "adamw":
            lists = dict(params=params, grads=grads, exp_avg=[state["exp_avg"] for state in states],
                         exp_avg_sq=[state["exp_avg_sq"] for state in states])
            if group["amsgrad"]:
                lists["max_exp_avg_sq"] = [state["max_exp_avg_sq"] for state in states]
            tensors = GroupTensors(self.fused, lists)
            return read_finite(tensors), (states, tensors, None)
        if group["sign_momentum"] == 0.0:
            tensors = GroupTensors(self.fused, dict(params=params, grads=grads))
            return read_finite(tensors), (states, tensors, None)
        tensors = GroupTensors(self.fused, dict(params=params, grads=grads,
                                                momenta=[state["momentum_buffer"] for state in states]),
                               bf16_lists=("momenta",))
        if group["sign_step_scale"] != "snr":
            return read_finite(tensors), (states, tensors, None)
        statistics = TensorStatistics(tensors, states, TENSOR_STATISTICS,
                                      statistics_table(self, group, TENSOR_STATISTICS))
        beta = group["sign_momentum"]
        read = read_sums(tensors, "snr_moments", ["grads", "momenta"], _snr_sums,
                         numbers=(beta, (-1.0 if group["maximize"] else 1.0) * (1.0 - beta),
                                  largest_finite(tensors.lists["momenta"][0].dtype)))
        return read, (states, tensors, statistics)

    def _update_group(self, group, params, grads, read, context):
        states, tensors, statistics = context
        self._store_states(params, states)
        if group["role"] == "sign":
            sign_update(tensors, read, statistics, lr=group["lr"], sign_momentum=group["sign_momentum"],
                        sign_interpolation=group["sign_interpolation"], sign_step_scale=group["sign_step_scale"],
                        snr_b2=group["snr_b2"], snr_eps=group["snr_eps"], weight_decay=group["weight_decay"],
                        maximize=group["maximize"])
            return
        lists = tensors.lists
        beta1, beta2 = group["betas"]
        adamw_functional(lists["params"], lists["grads"], lists["exp_avg"], lists["exp_avg_sq"],
                         lists.get("max_exp_avg_sq", []), [state["step"] for state in states],
                         fused=all(map(_adamw_fusable, lists["params"])), foreach=False, amsgrad=group["amsgrad"],
                         beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                         eps=group["eps"], maximize=group["maximize"])

    # Checkpoints -------------------------------------------------------------------------------

    def _check_checkpoint(self, state_dict):
        """Refuse a checkpoint of another model: roles, layer and parameter names, state shapes must match."""
        super()._check_checkpoint(state_dict)
        saved_groups = state_dict["param_groups"]
        if [g.get("role") for g in saved_groups] != [g["role"] for g in self.param_groups]:
            raise ValueError(f"checkpoint roles {[g.get('role') for g in saved_groups]} do not match this "
                             f"optimizer's {[g['role'] for g in self.param_groups]}")
        flat_params = []
        for saved, group in zip(saved_groups, self.param_groups):
            role = group["role"]
            for key in ("layer_names", "param_names"):
                if list(saved.get(key, [])) != list(group[key]):
                    raise ValueError(f"checkpoint {role} {key.replace('_', ' ')} {list(saved.get(key, []))} do not "
                                     f"match this model's {list(group[key])}")
            flat_params.extend(zip(group["params"], group["param_names"]))
        for index, saved in state_dict["state"].items():
            if not isinstance(index, int) or not 0 <= index < len(flat_params):
                raise ValueError(f"checkpoint state refers to parameter index {index!r}, which this optimizer lacks")
            param, name = flat_params[index]
            for key, value in saved.items():
                if key not in TENSOR_STATISTICS and torch.is_tensor(value) and value.shape != param.shape:
                    raise ValueError(f"checkpoint state {key!r} of parameter {name!r} has shape "
                                     f"{tuple(value.shape)}, the parameter has {tuple(param.shape)}")
