"""One registry table of every optimizer the benchmark runs: factory and learning-rate sweep grid.

Every factory takes the learning rate; PyTorch factories also take the model.
Weight decay is each optimizer's usual default (0.01 where decoupled, 0 for SGD).
"""

import torch

GRID_ADAM_LIKE = (3e-4, 1e-3, 3e-3)


def _torch_registry():
    from lion_pytorch import Lion

    from stac_optimizer import STAC
    from stam_optimizer.torch import STAM, STAMLite

    return {
        "STAC": (lambda m, lr: STAC(m, lr=lr), GRID_ADAM_LIKE),
        "STAC plain sign": (lambda m, lr: STAC(m, lr=lr, sign_momentum=0.0), GRID_ADAM_LIKE),
        "STAC bf16 state": (lambda m, lr: STAC(m, lr=lr, sign_state_dtype=torch.bfloat16), GRID_ADAM_LIKE),
        "STAC last 2": (lambda m, lr: STAC(m, lr=lr, last_n_layers=2), GRID_ADAM_LIKE),
        "STAC recommended": (lambda m, lr: STAC.recommended(m, lr=lr), GRID_ADAM_LIKE),
        "STAM": (lambda m, lr: STAM(m.parameters(), lr=lr), GRID_ADAM_LIKE),
        "STAMLite": (lambda m, lr: STAMLite(m.parameters(), lr=lr), GRID_ADAM_LIKE),
        "AdamW": (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01), GRID_ADAM_LIKE),
        "Lion": (lambda m, lr: Lion(m.parameters(), lr=lr, weight_decay=0.01), (3e-5, 1e-4, 3e-4)),
        "SGD momentum": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), (1e-2, 3e-2, 1e-1)),
    }


def _jax_registry():
    import optax

    from stac_optimizer.optax import stac, stac_partition, stac_recommended
    from stam_optimizer import stam, stam_lite

    # (params, lr): params is the model's own tree, from which STAC takes its partition (inject_hyperparams builds
    # the transformation anew for every update, so it cannot resolve the partition from the jitted tree).
    return {
        "STAM": (lambda params, lr: stam(lr), GRID_ADAM_LIKE),
        "STAMLite": (lambda params, lr: stam_lite(lr), GRID_ADAM_LIKE),
        "STAC": (lambda params, lr: stac(lr, partition=stac_partition(params)), GRID_ADAM_LIKE),
        "STAC recommended": (lambda params, lr: stac_recommended(lr, partition=stac_partition(params)),
                             GRID_ADAM_LIKE),
        "adamw": (lambda params, lr: optax.adamw(lr, weight_decay=0.01), GRID_ADAM_LIKE),
        "lion": (lambda params, lr: optax.lion(lr, weight_decay=0.01), (3e-5, 1e-4, 3e-4)),
        "sgd momentum": (lambda params, lr: optax.sgd(lr, momentum=0.9), (1e-2, 3e-2, 1e-1)),
        "rmsprop": (lambda params, lr: optax.rmsprop(lr), GRID_ADAM_LIKE),
        "adagrad": (lambda params, lr: optax.adagrad(lr), (3e-3, 1e-2, 3e-2)),
        "nadam": (lambda params, lr: optax.nadam(lr), GRID_ADAM_LIKE),
        "lamb": (lambda params, lr: optax.lamb(lr), (1e-3, 3e-3, 1e-2)),
    }


def embedding_parameters(model):
    """A predicate for ``STAC(adamw_params=...)``: the parameters of the model's ``nn.Embedding`` layers."""
    names = {f"{module_name}.{name}" if module_name else name
             for module_name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)
             for name, _ in module.named_parameters(recurse=False)}
    return lambda name: name in names


def _ablation_registry():
    """STAC's candidate changes (issue 6), each alone and combined, beside AdamW; every one gets the LR sweep."""
    from stac_optimizer import STAC

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
            if snr:
                options["sign_step_scale"] = "snr"
            return STAC(m, lr=lr, **options)
        return make, GRID_ADAM_LIKE

    return {
        "STAC seed defaults": stac(),
        "+ norms, embeddings in cap": stac(norms_and_embeddings=True),
        "+ trunk lr 0.5": stac(trunk_lr_scale=0.5),
        "+ trunk lr 0.25": stac(trunk_lr_scale=0.25),
        "+ Lion interpolation": stac(lion=True),
        "+ bf16 momentum": stac(bf16=True),
        "+ last 2 layers in cap": stac(last_n_layers=2),
        "+ SNR-scaled sign step": stac(snr=True),
        # The SNR scale is ~0.1-0.5 on noisy layers: a larger trunk rate gives back the size, keeps the adaptivity.
        "+ SNR-scaled, trunk lr 3": stac(snr=True, trunk_lr_scale=3.0),
        "STAC recommended: SNR, trunk lr 3, bf16": (lambda m, lr: STAC.recommended(m, lr=lr), GRID_ADAM_LIKE),
        "recommended + norms, embeddings in cap": stac(snr=True, trunk_lr_scale=3.0, bf16=True,
                                                       norms_and_embeddings=True),
        "AdamW": _torch_registry()["AdamW"],
    }


def registry(framework, suite="default"):
    if suite == "ablation":
        return _ablation_registry()
    return _torch_registry() if framework == "torch" else _jax_registry()
