"""Deliberately naive float64 references for every algorithm of the library.

Written for reading, not speed: one tensor at a time, NumPy float64, no code
shared with the package. The production code in both frameworks is held to
these functions (directly, and through the golden vectors in tests/golden/).

Each ``*_step`` takes the parameter, its gradient and a dict of state, and
returns the new parameter; the state dict is updated in place. Step counts are
1-based (the first update is t = 1). ``lr`` is the learning rate of this step.
"""

import numpy as np

# Constants of STAM that the seed names but does not give a value; the
# packages define the same numbers (checked by the tests).
STAM_VARIANCE_CAP = 10.0  # sigma^2 is capped at VARIANCE_CAP * tau^2


def adamw_step(p, g, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
               amsgrad=False, maximize=False):
    """torch.optim.AdamW, written out (decoupled decay, eps outside the sqrt)."""
    beta1, beta2 = betas
    if maximize:
        g = -g
    t = state.get("step", 0) + 1
    m = state.get("exp_avg", np.zeros_like(p))
    v = state.get("exp_avg_sq", np.zeros_like(p))
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    if amsgrad:
        v_max = np.maximum(state.get("max_exp_avg_sq", np.zeros_like(p)), v)
        state["max_exp_avg_sq"] = v_max
        v_used = v_max
    else:
        v_used = v
    bias_correction1 = 1.0 - beta1 ** t
    bias_correction2 = 1.0 - beta2 ** t
    denom = np.sqrt(v_used) / np.sqrt(bias_correction2) + eps
    p = p - (lr / bias_correction1) * m / denom
    state.update(step=t, exp_avg=m, exp_avg_sq=v)
    return p


def sign_step(p, g, state, *, lr, sign_momentum=0.9, sign_interpolation=None, sign_step_scale=None, b2=0.999,
              eps=1e-8, weight_decay=0.0, maximize=False, int8_momentum=False):
    """STAC's trunk: decoupled decay, then p -= lr * sign(EMA(g)).

    With sign_momentum == 0 this is textbook signSGD and keeps no state. With
    sign_interpolation = a, the sign is taken of a * m_old + (1 - a) * g (Lion).
    With sign_step_scale == "snr" the step is scaled by the tensor's
    bias-corrected mean |m| over its bias-corrected gradient RMS. With
    sign_step_scale == "factored" the step is Adafactor's instead: u = g /
    (sqrt(v_hat) + eps), v_hat from ``factored_second_moment``, clipped to RMS 1,
    then p -= lr * u, or with momentum p -= lr * (alpha * m_old + (1 - alpha) * u)
    and m = beta * m + (1 - beta) * u; with int8_momentum, m is kept as int8
    codes and a scale per row (the first dimension): m = codes * scale.
    """
    if maximize:
        g = -g
    p = p * (1.0 - lr * weight_decay)
    if sign_step_scale == "factored":
        u = g / (np.sqrt(factored_second_moment(g, state, b2)) + eps)
        u = u / max(1.0, np.sqrt(np.mean(u * u)))
        if sign_momentum == 0.0:
            return p - lr * u
        m = state.get("momentum_buffer", np.zeros_like(p))
        rows = p.shape[0] if p.ndim else 1
        if int8_momentum:  # codes times their row's scale
            m = (m.reshape(rows, -1) * state.get("momentum_scale", np.zeros(rows))[:, None]).reshape(p.shape)
        alpha = sign_momentum if sign_interpolation is None else sign_interpolation
        new_m = sign_momentum * m + (1.0 - sign_momentum) * u
        state["momentum_buffer"] = new_m
        if int8_momentum:  # per row: scale = max |m| / 127, codes rounded to nearest (ties to even)
            scale = np.abs(new_m.reshape(rows, -1)).max(axis=1) / 127.0
            safe = np.where(scale > 0, scale, 1.0)
            state["momentum_scale"] = scale
            state["momentum_buffer"] = np.round(new_m.reshape(rows, -1) / safe[:, None]).reshape(p.shape)
        return p - lr * (alpha * m + (1.0 - alpha) * u)
    if sign_momentum == 0.0:
        return p - lr * np.sign(g)
    m = state.get("momentum_buffer", np.zeros_like(p))
    alpha = sign_momentum if sign_interpolation is None else sign_interpolation
    direction = alpha * m + (1.0 - alpha) * g
    m = sign_momentum * m + (1.0 - sign_momentum) * g
    state["momentum_buffer"] = m
    scale = 1.0
    if sign_step_scale == "snr":
        t = state.get("step", 0) + 1
        v = b2 * state.get("grad_sq_mean", 0.0) + (1.0 - b2) * np.mean(g * g)
        state["step"], state["grad_sq_mean"] = t, v
        scale = np.mean(np.abs(m)) / (1.0 - sign_momentum ** t) / (np.sqrt(v / (1.0 - b2 ** t)) + eps)
    return p - lr * scale * np.sign(direction)


def factored_second_moment(g, state, b2):
    """Adafactor's estimate of AdamW's bias-corrected v for g seen as a matrix (the first dimension by the
    product of the others; a vector is one column, a 0-d value one element): EMAs of the row and column means
    of g^2, v_hat = R C^T / mean(R) / (1 - b2^t). Keeps ``exp_avg_sq_row``, ``exp_avg_sq_col`` and ``step``."""
    rows = g.shape[0] if g.ndim else 1
    columns = int(np.prod(g.shape[1:])) if g.ndim else 1
    square = (g * g).reshape(rows, columns)
    t = state.get("step", 0) + 1
    r = b2 * state.get("exp_avg_sq_row", np.zeros(rows)) + (1.0 - b2) * square.mean(axis=1)
    c = b2 * state.get("exp_avg_sq_col", np.zeros(columns)) + (1.0 - b2) * square.mean(axis=0)
    state.update(step=t, exp_avg_sq_row=r, exp_avg_sq_col=c)
    return (np.outer(r, c) / r.mean() / (1.0 - b2 ** t)).reshape(g.shape)


def stac_learning_rates(lr, has_sign_layers, has_adamw_layers):
    """The learning rate of each role: 0.75 * lr in the trunk when there is a cap."""
    sign_lr = 0.75 * lr if (has_sign_layers and has_adamw_layers) else lr
    return sign_lr, lr


def stam_step(p, g, state, *, lr, b1_base=0.9, b2=0.999, weight_decay=0.01,
              adapt_strength=0.2, tau_decay=0.99, eps=1e-8):
    """STAM (seed 002, "Core Update Rules"), term by term."""
    t = state.get("count", 0) + 1
    mu = state.get("mu", np.zeros_like(p))
    nu = state.get("nu", np.zeros_like(p))
    variance = state.get("variance", 0.0)
    scale = state.get("scale", 0.0)
    beta1_product = state.get("beta1_product", 1.0)

    residual = g - mu
    new_variance = b2 * variance + (1.0 - b2) * np.mean(residual ** 2)
    new_scale = tau_decay * scale + (1.0 - tau_decay) * np.mean(np.abs(residual))
    beta1_min = b1_base * (1.0 - adapt_strength)
    if np.isfinite(new_variance) and np.isfinite(new_scale):
        # Variance explosion guard.
        new_variance = min(new_variance, STAM_VARIANCE_CAP * new_scale ** 2)
        z = new_variance / (new_scale ** 2 + eps)
        s = z / (1.0 + z)
        beta1 = b1_base * (1.0 - adapt_strength * s)
        beta1 = min(max(beta1, beta1_min), b1_base)
        variance, scale = new_variance, new_scale
    else:
        # NaN/Inf fallback: base beta1, statistics left as they were.
        beta1 = b1_base

    mu = beta1 * mu + (1.0 - beta1) * g
    nu = b2 * nu + (1.0 - b2) * g * g
    beta1_product = beta1_product * beta1
    mu_hat = mu / (1.0 - beta1_product)
    nu_hat = nu / (1.0 - b2 ** t)
    p = p * (1.0 - lr * weight_decay) - lr * mu_hat / (np.sqrt(nu_hat) + eps)
    state.update(count=t, mu=mu, nu=nu, variance=variance, scale=scale,
                 beta1=beta1, beta1_product=beta1_product)
    return p


def stam_lite_step(p, g, state, *, lr, b1_base=0.9, weight_decay=0.01, adapt_strength=0.2,
                   moment_decay=0.99, beta1_update_interval=5, eps=1e-8):
    """STAMLite (seed 002, "STAMLite Approximation"), term by term.

    beta1 is recomputed on steps 1, 1 + k, 1 + 2k, ... (k = beta1_update_interval)
    and held in between; the denominator is the tensor-level RMS of the gradient.
    """
    t = state.get("count", 0) + 1
    mu = state.get("mu", np.zeros_like(p))
    grad_mean = state.get("grad_mean", 0.0)
    grad_sq_mean = state.get("grad_sq_mean", 0.0)
    beta1 = state.get("beta1", b1_base)
    beta1_product = state.get("beta1_product", 1.0)

    new_mean = moment_decay * grad_mean + (1.0 - moment_decay) * np.mean(g)
    new_sq_mean = moment_decay * grad_sq_mean + (1.0 - moment_decay) * np.mean(g * g)
    if not (np.isfinite(new_mean) and np.isfinite(new_sq_mean)):
        # NaN/Inf fallback: base beta1, statistics left as they were.
        beta1 = b1_base
    else:
        grad_mean, grad_sq_mean = new_mean, new_sq_mean
        if (t - 1) % beta1_update_interval == 0:
            variance = max(grad_sq_mean - grad_mean ** 2, 0.0)
            z = variance / (grad_sq_mean + eps)
            s = z / (1.0 + z)
            beta1 = b1_base * (1.0 - adapt_strength * s)
            beta1 = min(max(beta1, b1_base * (1.0 - adapt_strength)), b1_base)

    mu = beta1 * mu + (1.0 - beta1) * g
    beta1_product = beta1_product * beta1
    mu_hat = mu / (1.0 - beta1_product)
    rms = np.sqrt(grad_sq_mean / (1.0 - moment_decay ** t)) + eps
    p = p * (1.0 - lr * weight_decay) - lr * mu_hat / rms
    state.update(count=t, mu=mu, grad_mean=grad_mean, grad_sq_mean=grad_sq_mean,
                 beta1=beta1, beta1_product=beta1_product)
    return p
