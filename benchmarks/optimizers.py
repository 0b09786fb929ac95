"""One registry table of every optimizer the benchmark runs: factory and learning-rate sweep grid.

Every factory takes the learning rate; PyTorch factories also take the model.
Weight decay is each optimizer's usual default (0.01 where decoupled, 0 for SGD).
"""

import torch

GRID_ADAM_LIKE = (3e-4, 1e-3, 3e-3)
# The ablation's grid, the same for every configuration and AdamW: a smaller trunk learning rate moves the best
# public lr up, and AdamW's best sat at the top of GRID_ADAM_LIKE on two tasks.
GRID_ABLATION = (3e-4, 1e-3, 3e-3, 1e-2)


def _torch_registry():
    from lion_pytorch import Lion

    from stac_optimizer import STAC
    from stam_optimizer.torch import STAM, STAMLite

    return {
        "STAC": (lambda m, lr: STAC(m, lr=lr), GRID_ADAM_LIKE),
        "STAC plain sign": (lambda m, lr: STAC(m, lr=lr, sign_momentum=0.0), GRID_ADAM_LIKE),
        "STAC bf16 state": (lambda m, lr: STAC(m, lr=lr, sign_state_dtype=torch.bfloat16), GRID_ADAM_LIKE),
        "STAC last 2": (lambda m, lr: STAC(m, lr=lr, last_n_layers=2), GRID_ADAM_LIKE),
        "STAM": (lambda m, lr: STAM(m.parameters(), lr=lr), GRID_ADAM_LIKE),
        "STAMLite": (lambda m, lr: STAMLite(m.parameters(), lr=lr), GRID_ADAM_LIKE),
        "AdamW": (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01), GRID_ADAM_LIKE),
        "Lion": (lambda m, lr: Lion(m.parameters(), lr=lr, weight_decay=0.01), (3e-5, 1e-4, 3e-4)),
        "SGD momentum": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), (1e-2, 3e-2, 1e-1)),
    }


def _jax_registry():
    import optax

    from stac_optimizer.optax import stac
    from stam_optimizer import stam, stam_lite

    return {
        "STAM": (lambda lr: stam(lr), GRID_ADAM_LIKE),
        "STAMLite": (lambda lr: stam_lite(lr), GRID_ADAM_LIKE),
        "STAC": (lambda lr: stac(lr), GRID_ADAM_LIKE),
        "adamw": (lambda lr: optax.adamw(lr, weight_decay=0.01), GRID_ADAM_LIKE),
        "lion": (lambda lr: optax.lion(lr, weight_decay=0.01), (3e-5, 1e-4, 3e-4)),
        "sgd momentum": (lambda lr: optax.sgd(lr, momentum=0.9), (1e-2, 3e-2, 1e-1)),
        "rmsprop": (lambda lr: optax.rmsprop(lr), GRID_ADAM_LIKE),
        "adagrad": (lambda lr: optax.adagrad(lr), (3e-3, 1e-2, 3e-2)),
        "nadam": (lambda lr: optax.nadam(lr), GRID_ADAM_LIKE),
        "lamb": (lambda lr: optax.lamb(lr), (1e-3, 3e-3, 1e-2)),
    }


def embedding_parameters(model):
    """A predicate for ``STAC(adamw_params=...)``: the parameters of the model's ``nn.Embedding`` layers."""
    names = {f"{module_name}.{name}" if module_name else name
             for module_name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)
             for name, _ in module.named_parameters(recurse=False)}
    return lambda name: name in names


def _snr_scaled_stac_class():
    from stac_optimizer import STAC

    class SNRScaledSTAC(STAC):
        """Ablation candidate (a per-layer scale on the sign step): each trunk tensor's step is scaled by
        mean(|m_hat|) / sqrt(mean(g^2)_hat), the average size an AdamW step would have on that tensor, so noisy
        layers step less. Op by op and without ``maximize``; only the benchmark uses it."""

        def _sign_step(self, group, params, grads):
            beta, lr, decay = group["sign_momentum"], group["lr"], 1.0 - group["lr"] * group["weight_decay"]
            for param, grad in zip(params, grads):
                state = self.state[param]
                if not state:
                    state.update(momentum_buffer=torch.zeros_like(param, dtype=self.sign_state_dtype or param.dtype),
                                 grad_sq_mean=torch.zeros(()), step=torch.zeros(()))
                g = grad.float()
                momentum = state["momentum_buffer"].float() * beta + g * (1 - beta)
                state["momentum_buffer"].copy_(momentum)
                state["step"] += 1
                state["grad_sq_mean"].mul_(0.999).add_(0.001 * g.square().mean())
                step = state["step"]
                rms = (state["grad_sq_mean"] / (1 - 0.999 ** step)).sqrt() + 1e-8
                scale = momentum.abs().mean() / (1 - beta ** step) / rms
                param.mul_(decay).sub_((lr * scale * torch.sign(momentum)).to(param.dtype))

    return SNRScaledSTAC


def _ablation_registry():
    """STAC's candidate changes (issue 6), each alone and combined, beside AdamW; every one gets the LR sweep."""
    from stac_optimizer import STAC

    snr_scaled = _snr_scaled_stac_class()

    def stac(trunk_lr_scale=None, norms_and_embeddings=False, lion=False, bf16=False, snr=False, **kwargs):
        def make(m, lr):
            options = dict(kwargs)
            if trunk_lr_scale is not None:
                options["sign_lr"] = trunk_lr_scale * lr
            if norms_and_embeddings:
                options.update(adamw_norm_layers=True, adamw_params=embedding_parameters(m))
            if lion:
                options.update(sign_interpolation=0.9, sign_momentum=0.99)
            if bf16:
                options["sign_state_dtype"] = torch.bfloat16
            return (snr_scaled if snr else STAC)(m, lr=lr, **options)
        return make, GRID_ABLATION

    return {
        "STAC seed defaults": stac(),
        "+ norms, embeddings in cap": stac(norms_and_embeddings=True),
        "+ trunk lr 0.5": stac(trunk_lr_scale=0.5),
        "+ trunk lr 0.25": stac(trunk_lr_scale=0.25),
        "+ Lion interpolation": stac(lion=True),
        "+ bf16 momentum": stac(bf16=True),
        "+ last 2 layers in cap": stac(last_n_layers=2),
        "+ SNR-scaled sign step": stac(snr=True),
        "+ SNR-scaled sign step, bf16": stac(snr=True, bf16=True),
        "all but Lion": stac(trunk_lr_scale=0.25, norms_and_embeddings=True, bf16=True),
        "all": stac(trunk_lr_scale=0.25, norms_and_embeddings=True, lion=True, bf16=True),
        "AdamW": (_torch_registry()["AdamW"][0], GRID_ABLATION),
    }


def registry(framework, suite="default"):
    if suite == "ablation":
        return _ablation_registry()
    return _torch_registry() if framework == "torch" else _jax_registry()
