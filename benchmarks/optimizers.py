"""The registry of every optimizer the benchmark runs: one row each, the optimizer's import path, its options and
its learning-rate sweep grid.

A row imports nothing until a run builds its optimizer, so the main job can
print its plan before torch and jax load. Weight decay is 0.01 wherever it is
decoupled (AdamW and its 8-bit and factored peers, Lion, STAM, STAMLite), 0 for
SGD with momentum and for optax's Adafactor (whose decay is not scaled by the
rate); STAC's rows run at STAC's own default, 0 (stac-optimizer 0.1.5's). The ``default`` suite is what the main job compares; the ``ablation``
suite is STAC's candidate changes, each alone and combined: a new
candidate is one row of ``ablation_registry``.
"""

import importlib
from dataclasses import dataclass, field

GRID_ADAM_LIKE = (1e-3, 3e-3, 1e-2)
GRID_LION = (1e-4, 3e-4, 1e-3)
GRID_SGD = (1e-2, 3e-2, 1e-1)


def resolve(path):
    """``"package.module:Name.attribute"`` -> the object."""
    module, _, qualname = path.partition(":")
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


@dataclass(frozen=True)
class Row:
    """An optimizer: ``path`` called with the model (``takes="model"``, as STAC), its parameters (PyTorch) or
    nothing (optax), then ``lr`` and ``options``. ``sign_lr_scale`` sets STAC's ``sign_lr`` to that multiple of
    the run's rate; ``partition`` gives optax STAC the model's own partition."""
    path: str
    grid: tuple = GRID_ADAM_LIKE
    options: dict = field(default_factory=dict)
    takes: str = "params"
    suite: str = "default"
    sign_lr_scale: float = None
    partition: bool = False

    def make(self, model_or_params, lr):
        options = dict(self.options)
        if self.sign_lr_scale is not None:
            options["sign_lr"] = self.sign_lr_scale * lr
        if self.partition:
            options["partition"] = resolve("stac_stam.jax:stac_partition")(model_or_params)
        build = resolve(self.path)
        if self.takes == "model":
            return build(model_or_params, lr=lr, **options)
        if self.takes == "params":
            return build(model_or_params.parameters(), lr=lr, **options)
        return build(lr, **options)  # optax: the transformation alone


def stac_row(**options):
    """An ablation row: STAC with these options (``sign_lr_scale`` as in ``Row``)."""
    sign_lr_scale = options.pop("sign_lr_scale", None)
    return Row("stac_stam.torch:STAC", options=options, takes="model", suite="ablation", sign_lr_scale=sign_lr_scale)


def ablation_registry():
    """STAC's candidate changes; the seeds' STAC, ``STAC.recommended``, ``STAC.compact`` and the peers are the
    default suite's rows."""
    return {
        "STAC plain sign": stac_row(sign_momentum=0.0),
        "STAC bf16 state": stac_row(sign_state_dtype="bfloat16"),
        "STAC last 2": stac_row(last_n_layers=2),
        "STAC + SNR step, trunk lr x3": stac_row(sign_step_scale="snr", sign_lr_scale=3.0),
        # STAC.compact's changes, each alone and combined (all of them: the default suite's "STAC compact", whose
        # trunk steps at 3x the cap's rate); the trunk at the cap's rate unless the name says otherwise.
        "STAC factored trunk": stac_row(sign_step_scale="factored", sign_momentum=0.0, sign_lr_scale=1.0),
        "STAC factored trunk + int8 momentum": stac_row(sign_step_scale="factored", sign_state_dtype="int8",
                                                        sign_lr_scale=1.0),
        "STAC factored trunk + int8 momentum, trunk lr x3": stac_row(
            sign_step_scale="factored", sign_state_dtype="int8", sign_lr_scale=3.0),
        "STAC + output layer, norms in cap": stac_row(adamw_output_layer=True, adamw_norm_layers=True),
        "STAC factored trunk, output layer, norms in cap": stac_row(
            sign_step_scale="factored", sign_momentum=0.0, sign_lr_scale=1.0, adamw_output_layer=True,
            adamw_norm_layers=True),
        "STAC compact, trunk at the cap's lr": stac_row(
            sign_step_scale="factored", sign_state_dtype="int8", sign_lr_scale=1.0, adamw_output_layer=True,
            adamw_norm_layers=True),
        "STAC compact with bf16 momentum": stac_row(
            sign_step_scale="factored", sign_state_dtype="bfloat16", sign_lr_scale=3.0, adamw_output_layer=True,
            adamw_norm_layers=True),
    }


def torch_registry():
    decay = {"weight_decay": 0.01}
    return {
        "AdamW": Row("torch.optim:AdamW", options=decay),
        "AdamW8bit": Row("torchao.optim:AdamW8bit", options=decay),
        "Adafactor": Row("torch.optim:Adafactor", options=decay),
        "Lion": Row("lion_pytorch:Lion", GRID_LION, options=decay),
        "SGD momentum": Row("torch.optim:SGD", GRID_SGD, options={"momentum": 0.9}),
        "STAC": Row("stac_stam.torch:STAC", takes="model"),
        "STAC recommended": Row("stac_stam.torch:STAC.recommended", takes="model"),
        "STAC compact": Row("stac_stam.torch:STAC.compact", takes="model"),
        "STAM": Row("stac_stam.torch:STAM"),
        "STAMLite": Row("stac_stam.torch:STAMLite"),
        **ablation_registry(),
    }


def jax_registry():
    # STAC takes its partition from the model's own tree: inject_hyperparams builds the transformation anew for
    # every update, so it cannot resolve the partition from the jitted tree.
    return {
        "adamw": Row("optax:adamw", options={"weight_decay": 0.01}, takes="nothing"),
        # optax.adafactor's weight_decay_rate is not scaled by the learning rate: 0.01 shrank every weight by 1% a
        # step, and digits stayed at chance (val loss 2.06 at its best rate, 0.052 without it), so it has none.
        "adafactor": Row("optax:adafactor", takes="nothing"),
        "lion": Row("optax:lion", GRID_LION, options={"weight_decay": 0.01}, takes="nothing"),
        "sgd momentum": Row("optax:sgd", GRID_SGD, options={"momentum": 0.9}, takes="nothing"),
        "rmsprop": Row("optax:rmsprop", takes="nothing"),
        "adagrad": Row("optax:adagrad", (3e-3, 1e-2, 3e-2), takes="nothing"),
        "nadam": Row("optax:nadam", takes="nothing"),
        "lamb": Row("optax:lamb", takes="nothing"),
        "STAC": Row("stac_stam.jax:stac", takes="nothing", partition=True),
        "STAC recommended": Row("stac_stam.jax:stac_recommended", takes="nothing", partition=True),
        "STAC compact": Row("stac_stam.jax:stac_compact", takes="nothing", partition=True),
        "STAM": Row("stac_stam.jax:stam", takes="nothing"),
        "STAMLite": Row("stac_stam.jax:stam_lite", takes="nothing"),
    }


def registry(framework, suites=("default",)):
    """``{name: Row}`` of the framework's optimizers in the given suites (JAX has the default suite only)."""
    rows = torch_registry() if framework == "torch" else jax_registry()
    return {name: row for name, row in rows.items() if row.suite in suites}
