"""STAMLite for PyTorch: STAM's adaptive beta1 from cheap tensor moments, RMS denominator (seed 002)."""

import math

import torch

from stac_optimizer._torch_common import SkipNonfiniteOptimizer, TensorKernel, check_range, scalar_tensors


def _stam_lite_tensor_step(param, grad, mu, *, grad_mean, grad_sq_mean, beta1, beta1_product, step, lr, decay,
                           b1_base, adapt_strength, moment_decay, one_minus_moment_decay, log_moment_decay,
                           beta1_update_interval, eps):
    g = grad.to(grad_mean.dtype)
    step.add_(1)
    new_mean = moment_decay * grad_mean + one_minus_moment_decay * g.mean()
    new_sq_mean = moment_decay * grad_sq_mean + one_minus_moment_decay * g.square().mean()
    finite = new_mean.isfinite() & new_sq_mean.isfinite()
    grad_mean.copy_(torch.where(finite, new_mean, grad_mean))
    grad_sq_mean.copy_(torch.where(finite, new_sq_mean, grad_sq_mean))
    z = (grad_sq_mean - grad_mean.square()).clamp(min=0) / (grad_sq_mean + eps)
    adapted = torch.clamp(b1_base * (1 - adapt_strength * z / (1 + z)), b1_base * (1 - adapt_strength), b1_base)
    refresh = torch.remainder(step - 1, beta1_update_interval) == 0
    beta1.copy_(torch.where(finite, torch.where(refresh, adapted, beta1), b1_base))
    beta1_product.mul_(beta1)

    mu_full = beta1 * mu.to(g.dtype) + (1 - beta1) * g
    mu.copy_(mu_full)
    rms = (grad_sq_mean / -torch.expm1(step * log_moment_decay)).sqrt() + eps  # 1 - moment_decay^t
    param.copy_(param * decay - mu_full * (lr / ((1 - beta1_product) * rms)))


_stam_lite_kernel = TensorKernel(_stam_lite_tensor_step)


def stam_lite_update(params, grads, exp_avgs, grad_means, grad_sq_means, beta1s, beta1_products, steps, *, lr,
                     b1_base, weight_decay, adapt_strength, moment_decay, beta1_update_interval, eps, fused):
    r"""STAMLite's update, in place, one tensor at a time (seed 002, "STAMLite Approximation").

    Per tensor, at step t, with gradient g and k = beta1_update_interval::

        E[g]_t   = moment_decay E[g]_{t-1}   + (1 - moment_decay) mean(g)
        E[g^2]_t = moment_decay E[g^2]_{t-1} + (1 - moment_decay) mean(g^2)
        z        = max(E[g^2]_t - E[g]_t^2, 0) / (E[g^2]_t + eps)
        beta1    = clip(b1_base (1 - adapt_strength z / (1 + z)), b1_base (1 - adapt_strength), b1_base)
                   recomputed on steps 1, 1 + k, 1 + 2k, ..., held in between
        mu_t     = beta1 mu_{t-1} + (1 - beta1) g                  (stored in state_dtype)
        p       <- p (1 - lr weight_decay) - lr [mu_t / (1 - prod beta1)] / (sqrt(E[g^2]_t / (1 - moment_decay^t)) + eps)

    Non-finite moments: beta1 = b1_base and the moments keep their old values.
    With ``fused`` each tensor is one compiled kernel: a read pass over g for
    the moments, then one pass updating mu and p; otherwise the same code runs
    op by op.
    """
    # Complements are taken in Python's float64: 1 - 0.99 in float32 would be off by 1e-6.
    scalars = scalar_tensors(lr=lr, decay=1 - lr * weight_decay, b1_base=b1_base, adapt_strength=adapt_strength,
                             moment_decay=moment_decay, one_minus_moment_decay=1 - moment_decay,
                             log_moment_decay=math.log(moment_decay), beta1_update_interval=beta1_update_interval,
                             eps=eps)
    for param, grad, mu, grad_mean, grad_sq_mean, beta1, beta1_product, step in zip(
            params, grads, exp_avgs, grad_means, grad_sq_means, beta1s, beta1_products, steps):
        _stam_lite_kernel(fused, param, grad, mu, grad_mean=grad_mean, grad_sq_mean=grad_sq_mean, beta1=beta1,
                          beta1_product=beta1_product, step=step, **scalars(grad_mean.device, grad_mean.dtype))


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

    State per parameter (JAX name in brackets): ``step`` [count], ``exp_avg``
    [mu], ``grad_mean``, ``grad_sq_mean``, ``beta1``, ``beta1_product``.
    Non-finite steps change nothing and are counted in ``nonfinite_skipped_steps``.
    """

    def __init__(self, params, lr=1e-3, b1_base=0.9, weight_decay=0.01, adapt_strength=0.2, moment_decay=0.99,
                 beta1_update_interval=5, state_dtype=None, eps=1e-8, error_if_nonfinite=False, fused=True):
        check_range("lr", lr, 0.0)
        check_range("b1_base", b1_base, 0.0, 1.0, low_open=True)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("adapt_strength", adapt_strength, 0.0, 0.5, high_open=False)
        check_range("moment_decay", moment_decay, 0.0, 1.0, low_open=True)
        if isinstance(beta1_update_interval, bool) or not isinstance(beta1_update_interval, int) \
                or beta1_update_interval < 1:
            raise ValueError(f"beta1_update_interval must be an integer >= 1, got {beta1_update_interval!r}")
        if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point):
            raise ValueError(f"state_dtype must be a floating torch dtype such as torch.bfloat16, got {state_dtype!r}")
        check_range("eps", eps, 0.0, low_open=True)
        defaults = dict(lr=lr, b1_base=b1_base, weight_decay=weight_decay, adapt_strength=adapt_strength,
                        moment_decay=moment_decay, beta1_update_interval=beta1_update_interval, eps=eps)
        self.state_dtype = state_dtype
        self.fused = bool(fused)
        super().__init__(params, defaults, error_if_nonfinite)

    def _update_group(self, group, params, grads):
        for param in params:
            state = self.state[param]
            if not state:
                stat_dtype = torch.promote_types(param.dtype, torch.float32)
                scalar = lambda value: torch.full((), value, dtype=stat_dtype, device=param.device)  # noqa: E731
                state.update(step=scalar(0.0), exp_avg=torch.zeros_like(param, dtype=self.state_dtype or stat_dtype),
                             grad_mean=scalar(0.0), grad_sq_mean=scalar(0.0), beta1=scalar(group["b1_base"]),
                             beta1_product=scalar(1.0))
        states = [self.state[p] for p in params]
        stam_lite_update(params, grads, *([s[key] for s in states] for key in (
            "exp_avg", "grad_mean", "grad_sq_mean", "beta1", "beta1_product", "step")),
            lr=group["lr"], b1_base=group["b1_base"], weight_decay=group["weight_decay"],
            adapt_strength=group["adapt_strength"], moment_decay=group["moment_decay"],
            beta1_update_interval=group["beta1_update_interval"], eps=group["eps"], fused=self.fused)
