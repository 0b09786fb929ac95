"""How STAC splits a model into a sign trunk and an AdamW cap.

The rule (seeds 000 and 001): walk ``model.named_modules()`` in registration
order; a *layer* is a module that directly owns trainable parameters
(``named_parameters(recurse=False)``); frozen parameters are skipped; a shared
parameter belongs to its first owner; parameters owned by the root module form
the layer ``"<root>"``. The last ``last_n_layers`` layers are the AdamW cap,
the rest the sign trunk. ``last_n_layers=0`` keeps every layer in the trunk;
a value larger than the number of layers moves every layer to the cap.

Two opt-in routes send more parameters to the cap: ``adamw_norm_layers=True``
(every parameter of a normalization module) and ``adamw_params`` (a predicate
over full parameter names).
"""

from dataclasses import dataclass

from torch import nn

ROOT_LAYER_NAME = "<root>"

NORM_MODULE_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class LayerGroup:
    """One layer: a module's own trainable parameters, with their full names."""

    name: str
    parameter_names: tuple
    parameters: tuple
    is_norm: bool = False

    @property
    def numel(self):
        return sum(p.numel() for p in self.parameters)


@dataclass(frozen=True)
class STACPartition:
    """The sign trunk and the AdamW cap of a model, each a tuple of ``LayerGroup``."""

    sign_layers: tuple
    adamw_layers: tuple

    @property
    def sign_layer_names(self):
        return tuple(layer.name for layer in self.sign_layers)

    @property
    def adamw_layer_names(self):
        return tuple(layer.name for layer in self.adamw_layers)

    # Seed 000's names.
    trunk_layer_names = sign_layer_names
    cap_layer_names = adamw_layer_names

    @property
    def sign_parameter_names(self):
        return tuple(name for layer in self.sign_layers for name in layer.parameter_names)

    @property
    def adamw_parameter_names(self):
        return tuple(name for layer in self.adamw_layers for name in layer.parameter_names)

    @property
    def sign_parameters(self):
        return [p for layer in self.sign_layers for p in layer.parameters]

    @property
    def adamw_parameters(self):
        return [p for layer in self.adamw_layers for p in layer.parameters]

    def table(self, sign_state_bytes_per_element=4):
        """A text table: layer, role, parameter count, optimizer-state bytes.

        AdamW keeps two fp32-sized moments per element (``2 * element_size``);
        the trunk keeps one momentum of ``sign_state_bytes_per_element`` (0 for
        plain signSGD).
        """
        rows = [("layer", "role", "params", "state bytes")]
        for role, layers in (("sign", self.sign_layers), ("adamw", self.adamw_layers)):
            for layer in layers:
                if role == "adamw":
                    state_bytes = sum(2 * p.numel() * p.element_size() for p in layer.parameters)
                else:
                    state_bytes = layer.numel * sign_state_bytes_per_element
                rows.append((layer.name, role, str(layer.numel), str(state_bytes)))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        )


def discover_layers(model):
    """The trainable layers of ``model`` in registration order (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen = set()
    layers = []
    for module_name, module in model.named_modules():
        names, params = [], []
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            names.append(f"{module_name}.{param_name}" if module_name else param_name)
            params.append(param)
        if params:
            layers.append(LayerGroup(
                name=module_name or ROOT_LAYER_NAME,
                parameter_names=tuple(names),
                parameters=tuple(params),
                is_norm=isinstance(module, NORM_MODULE_TYPES),
            ))
    if not layers:
        raise ValueError("model has no trainable parameters: STAC needs at least one parameter with requires_grad=True")
    return layers


def _split_layer(layer, to_adamw):
    """Split one layer's parameters by the predicate; returns (sign part, adamw part), either may be None."""
    parts = []
    for wanted in (False, True):
        picked = [(n, p) for n, p in zip(layer.parameter_names, layer.parameters) if to_adamw(n) == wanted]
        parts.append(LayerGroup(layer.name, tuple(n for n, _ in picked), tuple(p for _, p in picked), layer.is_norm)
                     if picked else None)
    return parts


def partition_trainable_layers(model, last_n_layers=1, *, adamw_norm_layers=False, adamw_params=None):
    """Split ``model`` into a sign trunk and an AdamW cap.

    Args:
        model: the ``nn.Module`` to partition.
        last_n_layers: how many of the last trainable layers use AdamW (>= 0).
        adamw_norm_layers: also send every normalization-layer parameter to AdamW.
        adamw_params: a predicate ``name -> bool`` over full parameter names; a
            parameter for which it returns True also goes to AdamW.

    Returns:
        A ``STACPartition``. A layer split by ``adamw_params`` appears in both roles,
        each with its own parameters.
    """
    if isinstance(last_n_layers, bool) or not isinstance(last_n_layers, int) or last_n_layers < 0:
        raise ValueError(f"last_n_layers must be an integer >= 0, got {last_n_layers!r}")
    if adamw_params is not None and not callable(adamw_params):
        raise TypeError("adamw_params must be a callable taking a parameter name and returning a bool")
    layers = discover_layers(model)
    first_cap = max(len(layers) - last_n_layers, 0)
    sign_layers, adamw_layers = [], []
    for index, layer in enumerate(layers):
        if index >= first_cap or (adamw_norm_layers and layer.is_norm):
            adamw_layers.append(layer)
        elif adamw_params is None:
            sign_layers.append(layer)
        else:
            sign_part, adamw_part = _split_layer(layer, lambda name: bool(adamw_params(name)))
            if sign_part:
                sign_layers.append(sign_part)
            if adamw_part:
                adamw_layers.append(adamw_part)
    return STACPartition(tuple(sign_layers), tuple(adamw_layers))
