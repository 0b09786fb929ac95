"""How STAC splits a model into a sign trunk and an AdamW cap: one rule for PyTorch and JAX (no framework import).

The rule (seeds 000 and 001): walk the model's layers in the order they were
built; a *layer* owns trainable parameters directly; frozen parameters are
skipped; a shared parameter belongs to its first owner; parameters owned by
the root form the layer ``"<root>"``. The last ``last_n_layers`` layers are
the AdamW cap, the rest the sign trunk. ``last_n_layers=0`` keeps every layer
in the trunk; a value larger than the number of layers moves every layer to
the cap.

Two opt-in routes send more parameters to the cap: ``adamw_norm_layers=True``
(every parameter of a normalization layer) and ``adamw_params`` (a predicate
over full parameter names).

Where the layers come from:

- PyTorch (``module_layers``): ``model.named_modules()`` in registration
  order; a layer is a module with parameters of its own
  (``named_parameters(recurse=False)``), named by its module path without the
  attributes wrappers hold the model under (DDP's ``module``,
  ``torch.compile``'s ``_orig_mod``, FSDP's ``_fsdp_wrapped_module``,
  activation checkpointing's ``_checkpoint_wrapped_module``), as
  ``torch.distributed.checkpoint`` names parameters: a bare, a DDP-wrapped and
  a compiled model have the same layer names; it is a
  normalization layer when its class or a base class has ``Norm`` in its name
  (``LayerNorm``, ``BatchNorm1d``, ``GroupNorm``, ``RMSNorm``, Hugging Face's
  ``LlamaRMSNorm``).
- JAX (``tree_layers``): a mapping or list that holds array
  leaves directly, in insertion order, named by its path joined with ``/``; a
  normalization layer when its own key matches ``NORM_LAYER_NAME``.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass

ROOT_LAYER_NAME = "<root>"
# Modules that hold the model they wrap under one attribute, by class name, and that attribute: it is no part of
# a parameter's name. (FSDP2's fully_shard keeps the module tree and its names.)
WRAPPED_ATTRIBUTE = {"DistributedDataParallel": "module", "DataParallel": "module", "OptimizedModule": "_orig_mod",
                     "FullyShardedDataParallel": "_fsdp_wrapped_module",
                     "CheckpointWrapper": "_checkpoint_wrapped_module", "OffloadWrapper": "_checkpoint_wrapped_module"}
# Names of saved checkpoints carry the wrappers' attributes as text: these anywhere, "module" at the front.
_PRIVATE_WRAPPED_ATTRIBUTES = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
# A pytree layer whose own key matches is a normalization layer (flax: LayerNorm_0, BatchNorm_1, RMSNorm, ln_f).
NORM_LAYER_NAME = re.compile(r"(norm|^ln(_|\d|$))", re.IGNORECASE)


@dataclass(frozen=True)
class LayerGroup:
    """One layer: its own trainable parameters (in JAX, their paths in the tree), with their full names."""

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
    sign_state_bytes_per_element: int | None = None  # None: the parameter's element size (see table())

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

    def table(self, sign_state_bytes_per_element=None):
        """A text table: layer, role, parameter count, optimizer-state bytes.

        AdamW keeps two moments per element in the parameter's dtype
        (``2 * element_size``); the trunk keeps one momentum of
        ``sign_state_bytes_per_element`` bytes per element (default: the
        partition's ``sign_state_bytes_per_element``, which STAC sets from its
        ``sign_state_dtype``, 0 for plain signSGD; None: the parameter's
        element size).
        """
        if sign_state_bytes_per_element is None:
            sign_state_bytes_per_element = self.sign_state_bytes_per_element
        rows = [("layer", "role", "params", "state bytes")]
        for role, layers in (("sign", self.sign_layers), ("adamw", self.adamw_layers)):
            for layer in layers:
                if role == "adamw":
                    state_bytes = sum(2 * p.numel() * p.element_size() for p in layer.parameters)
                else:
                    state_bytes = sum(p.numel() * (p.element_size() if sign_state_bytes_per_element is None
                                                   else sign_state_bytes_per_element) for p in layer.parameters)
                rows.append((layer.name, role, str(layer.numel), str(state_bytes)))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        )


def _is_norm_module(module):
    return any("Norm" in cls.__name__ for cls in type(module).__mro__)


def _wrapped_attribute(module):
    return next((WRAPPED_ATTRIBUTE[cls.__name__] for cls in type(module).__mro__ if cls.__name__ in WRAPPED_ATTRIBUTE),
                None)


def module_paths(model):
    """Each module of ``model.named_modules()`` with its path without the wrappers' attributes (see the module
    docstring), in order."""
    modules, names = {}, {}
    for path, module in model.named_modules():
        parent_path, _, attribute = path.rpartition(".")
        if path:  # a module comes after its parent, under its first path
            parent = modules[parent_path]
            inner = attribute == _wrapped_attribute(parent)
            names[path] = names[parent_path] if inner else ".".join(filter(None, (names[parent_path], attribute)))
        else:
            names[path] = ""
        modules[path] = module
        yield names[path], module


def without_wrapper_prefixes(name):
    """A saved parameter name without the wrappers' attributes: ``module._orig_mod.0.weight`` -> ``0.weight``."""
    parts = [part for part in name.split(".") if part not in _PRIVATE_WRAPPED_ATTRIBUTES]
    return ".".join(parts[1:] if parts[:1] == ["module"] and len(parts) > 1 else parts)


def same_parameter_names(saved, current):
    """Whether two lists of parameter names name the same parameters, whatever wrappers the model was in."""
    return list(map(without_wrapper_prefixes, saved)) == list(map(without_wrapper_prefixes, current))


def module_layers(model):
    """The trainable layers of a PyTorch ``model`` in registration order (see the module docstring)."""
    if not callable(getattr(model, "named_modules", None)):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen = set()
    layers = []
    for module_name, module in module_paths(model):
        names, params = [], []
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            names.append(f"{module_name}.{param_name}" if module_name else param_name)
            params.append(param)
        if params:
            layers.append(LayerGroup(name=module_name or ROOT_LAYER_NAME, parameter_names=tuple(names),
                                     parameters=tuple(params), is_norm=_is_norm_module(module)))
    return layers


def _is_array(leaf):
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def tree_layers(node, path=()):
    """The layers of a JAX parameter tree (dicts, lists and tuples of arrays) in insertion order, depth
    first, as ``LayerGroup``s whose ``parameters`` are the leaves' paths (tuples of keys)."""
    if isinstance(node, Mapping):
        items = list(node.items())
    elif isinstance(node, (list, tuple)):
        items = list(enumerate(node))
    else:
        raise TypeError(f"stac_partition walks dicts, lists and tuples of arrays; got {type(node).__name__} at "
                        f"{'/'.join(map(str, path)) or ROOT_LAYER_NAME}: pass flax/equinox state as a pure dict "
                        "(e.g. nnx.State.to_pure_dict()) or give partition= explicitly")
    leaf_paths = tuple(path + (key,) for key, child in items if _is_array(child))
    layers = []
    if leaf_paths:
        layers.append(LayerGroup(name="/".join(map(str, path)) or ROOT_LAYER_NAME,
                                 parameter_names=tuple("/".join(map(str, leaf)) for leaf in leaf_paths),
                                 parameters=leaf_paths,
                                 is_norm=bool(path) and bool(NORM_LAYER_NAME.search(str(path[-1])))))
    for key, child in items:
        if not _is_array(child) and child is not None:
            layers += tree_layers(child, path + (key,))
    return layers


def _split_layer(layer, to_adamw):
    """Split one layer's parameters by the predicate; returns (sign part, adamw part), either may be None."""
    parts = []
    for wanted in (False, True):
        picked = [(n, p) for n, p in zip(layer.parameter_names, layer.parameters) if to_adamw(n) == wanted]
        parts.append(LayerGroup(layer.name, tuple(n for n, _ in picked), tuple(p for _, p in picked), layer.is_norm)
                     if picked else None)
    return parts


def check_last_n_layers(last_n_layers):
    if isinstance(last_n_layers, bool) or not isinstance(last_n_layers, int) or last_n_layers < 0:
        raise ValueError(f"last_n_layers must be an integer >= 0, got {last_n_layers!r}")


def split_layers(layers, last_n_layers=1, *, adamw_norm_layers=False, adamw_params=None):
    """The partition of ``layers`` (``LayerGroup``s in model order) by the rule in the module docstring.

    A layer split by ``adamw_params`` appears in both roles, each with its own parameters.
    """
    check_last_n_layers(last_n_layers)
    if adamw_params is not None and not callable(adamw_params):
        raise TypeError("adamw_params must be a callable taking a parameter name and returning a bool")
    if not layers:
        raise ValueError("model has no trainable parameters: STAC needs at least one parameter with "
                         "requires_grad=True")
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


def partition_trainable_layers(model, last_n_layers=1, *, adamw_norm_layers=False, adamw_params=None):
    """Split a PyTorch ``model`` into a sign trunk and an AdamW cap.

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
    check_last_n_layers(last_n_layers)
    return split_layers(module_layers(model), last_n_layers, adamw_norm_layers=adamw_norm_layers,
                        adamw_params=adamw_params)
