"""STAMLite for PyTorch: STAM's adaptive beta1 from cheap tensor moments, RMS denominator (seed 002)."""

import math

import torch

from stac_stam.torch import _cpu_kernels
from stac_stam.torch._base import SkipNonfiniteOptimizer, check_pair, check_range, require_keys, resolve_state_dtype
from stac_stam.torch._kernels import TensorKernel, scalar_tensors, store_tensor_statistics


def _stam_lite_rule(g_mean, g_sq_mean, *, grad_mean, grad_sq_mean, beta1, beta1_product, step, lr, b1_base,
                    adapt_strength, moment_decay, one_minus_moment_decay, log_moment_decay, beta1_update_interval, eps):
    # The new per-tensor numbers from this step's mean(g) and mean(g^2). Elementwise: it serves one tensor (0-d
    # numbers) or a whole group at once (one value per tensor).
    new_step = step + 1
    new_mean = moment_decay * grad_mean + one_minus_moment_decay * g_mean
    new_sq_mean = moment_decay * grad_sq_mean + one_minus_moment_decay * g_sq_mean
    finite = new_mean.isfinite() & new_sq_mean.isfinite()
    new_mean = torch.where(finite, new_mean, grad_mean)
    new_sq_mean = torch.where(finite, new_sq_mean, grad_sq_mean)
    z = (new_sq_mean - new_mean.square()).clamp(min=0) / (new_sq_mean + eps)
    adapted = torch.clamp(b1_base * (1 - adapt_strength * z / (1 + z)), b1_base * (1 - adapt_strength), b1_base)
    refresh = torch.remainder(new_step - 1, beta1_update_interval) == 0
    new_beta1 = torch.where(finite, torch.where(refresh, adapted, beta1), b1_base)
    new_beta1_product = beta1_product * new_beta1
    rms = (new_sq_mean / -torch.expm1(new_step * log_moment_decay)).sqrt() + eps  # 1 - moment_decay^t
    return new_mean, new_sq_mean, new_beta1, new_beta1_product, new_step, lr / ((1 - new_beta1_product) * rms)


def _stam_lite_statistics(grad, *, mean, **numbers):
    # One read of g; every per-tensor number the update needs, none of the state changed.
    g = grad.to(numbers["grad_mean"].dtype)
    return torch.isfinite(grad).all(), *_stam_lite_rule(mean(g), mean(g.square()), **numbers)


def _stam_lite_tensor_step(param, grad, mu, *, beta1, step_size, decay):
    mu_full = beta1 * mu.to(step_size.dtype) + (1 - beta1) * grad.to(step_size.dtype)
    mu.copy_(mu_full)
    param.copy_(param * decay - mu_full * step_size)


_stam_lite_statistics_kernel = TensorKernel(_stam_lite_statistics)
_stam_lite_kernel = TensorKernel(_stam_lite_tensor_step, writes=("param", "mu"))

# The 0-d state entries, in the order _stam_lite_statistics returns their new values.
_TENSOR_STATISTICS = ("grad_mean", "grad_sq_mean", "beta1", "beta1_product", "step")


def stam_lite_statistics(grads, states, *, lr, b1_base, adapt_strength, moment_decay, beta1_update_interval, eps,
                         kernels, matrix=None):
    """Phase one of STAMLite's step: per tensor, whether g is finite and its new statistics; changes nothing.

    Returns ``(finite, statistics)``: ``finite`` 0-d bools, all True when every
    gradient is finite; ``statistics`` the new ``(grad_mean, grad_sq_mean,
    beta1, beta1_product, step, step_size)`` for ``stam_lite_update``, per
    tensor as 0-d tensors, or with ``kernels="cpu"`` each as one vector over
    the group's tensors (then ``matrix`` is the group's StatisticsTable matrix
    of the 0-d state entries).
    """
    # Complements are taken in Python's float64: 1 - 0.99 in float32 would be off by 1e-6.
    scalars = scalar_tensors(lr=lr, b1_base=b1_base, adapt_strength=adapt_strength, moment_decay=moment_decay,
                             one_minus_moment_decay=1 - moment_decay, log_moment_decay=math.log(moment_decay),
                             beta1_update_interval=beta1_update_interval, eps=eps)
    if kernels == "cpu":
        return _cpu_kernels.group_statistics("stam_lite_moments", [grads], _stam_lite_rule,
                                             dict(zip(_TENSOR_STATISTICS, matrix)),
                                             scalars(grads[0].device, torch.float32))
    return _stam_lite_statistics_kernel.map_statistics(
        kernels == "compiled", [(grad,) for grad in grads],
        [dict({key: state[key] for key in _TENSOR_STATISTICS}, **scalars(state["step"].device, state["step"].dtype))
         for state in states])


def stam_lite_update(params, grads, states, statistics, *, lr, weight_decay, kernels, matrix=None):
    r"""Phase two of STAMLite's step (seed 002, "STAMLite Approximation"): the state and the parameters, in place.

    Per tensor, at step t, with gradient g and k = beta1_update_interval::

        E[g]_t   = moment_decay E[g]_{t-1}   + (1 - moment_decay) mean(g)
        E[g^2]_t = moment_decay E[g^2]_{t-1} + (1 - moment_decay) mean(g^2)
        z        = max(E[g^2]_t - E[g]_t^2, 0) / (E[g^2]_t + eps)
        beta1    = clip(b1_base (1 - adapt_strength z / (1 + z)), b1_base (1 - adapt_strength), b1_base)
                   recomputed on steps 1, 1 + k, 1 + 2k, ..., held in between
        mu_t     = beta1 mu_{t-1} + (1 - beta1) g                  (stored in state_dtype)
        p       <- p (1 - lr weight_decay) - lr [mu_t / (1 - prod beta1)] / (sqrt(E[g^2]_t / (1 - moment_decay^t)) + eps)

    Non-finite moments: beta1 = b1_base and the moments keep their old values.
    ``statistics`` come from ``stam_lite_statistics`` (everything but mu_t
    and p, from one read of g); here each tensor is one pass updating mu and
    p. ``kernels``: ``"cpu"`` runs the group's float32 CPU tensors as one call
    of the C kernels in ``_cpu_kernels.c`` (storing the statistics into
    ``matrix``), ``"compiled"`` each tensor compiled, ``"op_by_op"`` eagerly.
    """
    mus = [state["exp_avg"] for state in states]
    if kernels == "cpu":
        _cpu_kernels.store_statistics(matrix, statistics)
        _, _, beta1, _, _, step_size = statistics
        _cpu_kernels.run("stam_lite_step", [params, grads, mus], [beta1, step_size], [1 - lr * weight_decay])
        return
    scalars = scalar_tensors(decay=1 - lr * weight_decay)
    store_tensor_statistics(states, _TENSOR_STATISTICS, statistics)
    _stam_lite_kernel.map(kernels == "compiled", [(param, grad, mu) for param, grad, mu in zip(params, grads, mus)],
                          [dict(beta1=beta1, step_size=step_size, **scalars(step_size.device, step_size.dtype))
                           for _, _, beta1, _, _, step_size in statistics])


class STAMLite(SkipNonfiniteOptimizer):
    r"""STAMLite: STAM's variance-adaptive beta1 at lower cost (seed 002).

    One moment per parameter (AdamW keeps two) and a tensor-level RMS
    denominator; beta1 is recomputed every ``beta1_update_interval`` steps. See
    ``stam_lite_update`` for the math. Arguments and defaults are the JAX
    STAMLite's, with torch's ``lr`` for ``learning_rate``:

    =====================  ==========  ========  ==================================
    argument               default     range     meaning
    =====================  ==========  ========  ==================================
    lr                     1e-3        >= 0      step size
    b1_base                0.9         (0, 1)    base first-moment decay
    weight_decay           0.01        >= 0      decoupled weight decay
    adapt_strength         0.2         [0, 0.5]  how far beta1 may drop below b1_base
    moment_decay           0.99        (0, 1)    decay of the gradient moments
    beta1_update_interval  5           >= 1      recompute beta1 every k steps
    state_dtype            None        dtype     storage dtype of exp_avg (None: float32,
                                                 or float64 for float64 parameters)
    eps                    1e-8        > 0       denominator guard
    =====================  ==========  ========  ==================================

    Each param group holds ``betas = (b1_base, moment_decay)``, torch's name:
    ``moment_decay`` is the decay of the squared-gradient average that makes
    the denominator, AdamW's beta2 for a tensor-level RMS. A scheduler that
    cycles momentum (``OneCycleLR``, ``CyclicLR``) moves ``b1_base``; ``lr``
    may be a 0-d tensor, as in torch.optim. A group given to
    ``add_param_group`` may set ``b1_base`` or ``moment_decay`` by name.

    State per parameter (JAX name in brackets): ``step`` [count], ``exp_avg``
    [mu], ``grad_mean``, ``grad_sq_mean``, ``beta1``, ``beta1_product``.
    Non-finite steps change nothing and are counted in ``nonfinite_skipped_steps``.
    """

    BETA_NAMES = ("b1_base", "moment_decay")
    _settings = SkipNonfiniteOptimizer._settings + ("state_dtype",)

    def __init__(self, params, lr=1e-3, b1_base=0.9, weight_decay=0.01, adapt_strength=0.2, moment_decay=0.99,
                 beta1_update_interval=5, state_dtype=None, eps=1e-8, error_if_nonfinite=False, fused=True):
        defaults = dict(lr=lr, betas=(b1_base, moment_decay), weight_decay=weight_decay,
                        adapt_strength=adapt_strength, beta1_update_interval=beta1_update_interval, eps=eps)
        self._check_group(defaults)
        self.state_dtype = resolve_state_dtype("state_dtype", state_dtype)
        super().__init__(params, defaults, error_if_nonfinite, fused)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("state_dtype", None)

    def _check_group(self, group, where=""):
        require_keys(group, ("lr", "betas", "weight_decay", "adapt_strength", "beta1_update_interval", "eps"), where,
                     "STAMLite")
        check_range(f"{where}lr", group["lr"], 0.0, tensor=True)
        b1_base, moment_decay = check_pair(f"{where}betas", group["betas"])
        check_range(f"{where}b1_base", b1_base, 0.0, 1.0, low_open=True)
        check_range(f"{where}moment_decay", moment_decay, 0.0, 1.0, low_open=True)
        check_range(f"{where}weight_decay", group["weight_decay"], 0.0)
        check_range(f"{where}adapt_strength", group["adapt_strength"], 0.0, 0.5, high_open=False)
        interval = group["beta1_update_interval"]
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"{where}beta1_update_interval must be an integer >= 1, got {interval!r}")
        check_range(f"{where}eps", group["eps"], 0.0, low_open=True)

    def _initial_state(self, group, param):
        stat_dtype = torch.promote_types(param.dtype, torch.float32)
        scalar = lambda value: torch.full((), value, dtype=stat_dtype, device=param.device)  # noqa: E731
        return dict(step=scalar(0.0), exp_avg=torch.zeros_like(param, dtype=self.state_dtype or stat_dtype),
                    grad_mean=scalar(0.0), grad_sq_mean=scalar(0.0), beta1=scalar(group["betas"][0]),
                    beta1_product=scalar(1.0))

    def _prepare_group(self, group, params, grads):
        states = self._states(group, params)
        kernels, matrix = _cpu_kernels.choose(
            self.fused, [params, grads, [state["exp_avg"] for state in states]],
            _cpu_kernels.statistics_table(self, group, _TENSOR_STATISTICS), states)
        finite, statistics = stam_lite_statistics(
            grads, states, lr=group["lr"], b1_base=group["betas"][0], adapt_strength=group["adapt_strength"],
            moment_decay=group["betas"][1], beta1_update_interval=group["beta1_update_interval"],
            eps=group["eps"], kernels=kernels, matrix=matrix)
        return finite, (states, kernels, matrix, statistics)

    def _update_group(self, group, params, grads, statistics):
        states, kernels, matrix, statistics = statistics
        self._store_states(params, states)
        stam_lite_update(params, grads, states, statistics, lr=group["lr"], weight_decay=group["weight_decay"],
                         kernels=kernels, matrix=matrix)
