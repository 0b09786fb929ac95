"""How STAC splits a model into a sign trunk and an AdamW cap: one rule for PyTorch and JAX (no framework import).

The rule (seeds 000 and 001): walk the model's layers in the order they were
built; a *layer* owns trainable parameters directly; frozen parameters are
skipped; a shared parameter belongs to its first owner; parameters owned by
the root form the layer ``"<root>"``. The last ``last_n_layers`` layers are
the AdamW cap, the rest the sign trunk. ``last_n_layers=0`` keeps every layer
in the trunk; a value larger than the number of layers moves every layer to
the cap.

Three opt-in routes send more parameters to the cap: ``adamw_norm_layers=True``
(every parameter of a normalization layer), ``adamw_output_layer=True`` (the
output layer's parameters, see below) and ``adamw_params`` (a predicate over
full parameter names).

The *output layer* is the last module, in registration order, that holds a
trainable parameter of its own, shared or not: an MLP's last ``Linear``, an
untied ``lm_head``, and also a tied ``lm_head`` whose weight is the input
embedding's (Hugging Face GPT-2: ``lm_head.weight is transformer.wte.weight``).
The seeds' rule gives that shared weight to its first owner, the embedding,
so with ``last_n_layers=1`` a tied LM head is updated by signs in the trunk and
only the final norm is in the cap; ``adamw_output_layer=True`` moves the shared
weight to the cap (it is one tensor, so the embedding gets AdamW too), where it
keeps its first owner's name and layer (``transformer.wte``). A pytree shares
nothing: its output layer is its last layer. ``STACPartition.tied_output_warning``
tells when a tied output layer is left in the trunk beside a cap of under 1%.

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


# The share of the trainable parameters under which a cap is small enough for STAC to warn about a tied output
# layer left in the trunk (tied_output_warning).
SMALL_CAP_FRACTION = 0.01


@dataclass(frozen=True)
class STACPartition:
    """The sign trunk and the AdamW cap of a model, each a tuple of ``LayerGroup``, and the model's output layer
    (see the module docstring) as a ``LayerGroup`` whose parameters are named as in the layers (a tied weight
    under its first owner's name)."""

    sign_layers: tuple
    adamw_layers: tuple
    sign_state_bytes_per_element: int | None = None  # None: the parameter's element size (see table())
    output_layer: LayerGroup | None = None
    factored_second_moment: bool = False  # the trunk's sign_step_scale="factored" statistics (see table())
    row_scaled_momentum: bool = False  # an int8 trunk momentum with a float32 scale per row (see table())

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

    def tied_output_warning(self):
        """The text of STAC's warning about a tied output layer left in the trunk, or None when there is none.

        It applies when the output layer uses a parameter an earlier layer owns (a tied LM head), that parameter
        is in the sign trunk, and the AdamW cap holds under ``SMALL_CAP_FRACTION`` (1%) of the trainable
        parameters: the cap the user asked for then misses the layer it was meant for.
        """
        output = self.output_layer
        if output is None:
            return None
        owner_of = {name: layer.name for layer in self.sign_layers for name in layer.parameter_names}
        tied = [name for name in output.parameter_names if owner_of.get(name, output.name) != output.name]
        if not tied:
            return None
        cap = sum(layer.numel for layer in self.adamw_layers)
        total = cap + sum(layer.numel for layer in self.sign_layers)
        if cap >= SMALL_CAP_FRACTION * total:
            return None
        return (f"STAC: the output layer {output.name!r} uses the parameter {tied[0]!r} of the earlier layer "
                f"{owner_of[tied[0]]!r} (tied weights); a shared parameter belongs to its first owner, so it takes "
                f"sign updates in the trunk, and the AdamW cap holds {cap:,} of the {total:,} trainable parameters "
                f"({cap / total:.2%}). Pass adamw_output_layer=True to put the output layer's parameters in the "
                f"AdamW cap.")

    def table(self, sign_state_bytes_per_element=None):
        """A text table: layer, role, parameter count, optimizer-state bytes.

        AdamW keeps two moments per element in the parameter's dtype
        (``2 * element_size``); the trunk keeps one momentum of
        ``sign_state_bytes_per_element`` bytes per element (default: the
        partition's ``sign_state_bytes_per_element``, which STAC sets from its
        ``sign_state_dtype``, 0 for plain signSGD; None: the parameter's
        element size). With ``factored_second_moment`` (STAC's
        ``sign_step_scale="factored"``) the trunk also keeps, per tensor, a
        row and a column of second moments (``factored_shape``) in float32 at
        least; with ``row_scaled_momentum`` (an int8 momentum), a scale per row.
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
                    for counted, numbers in ((self.factored_second_moment, sum),
                                             (self.row_scaled_momentum, lambda shape: shape[0])):
                        if counted:
                            state_bytes += sum(numbers(factored_shape(tuple(p.shape))) * max(p.element_size(), 4)
                                               for p in layer.parameters)
                rows.append((layer.name, role, str(layer.numel), str(state_bytes)))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        )


def factored_shape(shape):
    """The matrix a trunk tensor of ``shape`` is seen as by the factored second moment: (rows, columns), the first
    dimension by the product of the others; a vector is one column, a 0-d tensor one element."""
    rows = shape[0] if shape else 1
    columns = 1
    for size in shape[1:]:
        columns *= size
    return rows, columns


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


def _check_model(model):
    if not callable(getattr(model, "named_modules", None)):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _trainable_parameters_by_module(model, params):
    """``(module name, module, [(parameter name, parameter), ...])`` for each module of ``model`` (see
    ``module_paths``) holding trainable parameters of its own, shared ones included, in registration order. A
    parameter is trainable when it requires grad and, unless ``params`` is None, is one of ``params``."""
    chosen = None if params is None else {id(param) for param in params}
    for module_name, module in module_paths(model):
        own = [(f"{module_name}.{name}" if module_name else name, param)
               for name, param in module.named_parameters(recurse=False)
               if param.requires_grad and (chosen is None or id(param) in chosen)]
        if own:
            yield module_name, module, own


def module_layers(model, params=None):
    """The trainable layers of a PyTorch ``model`` in registration order (see the module docstring); with
    ``params``, only those parameters count as trainable (the others as frozen)."""
    _check_model(model)
    seen = set()
    layers = []
    for module_name, module, own in _trainable_parameters_by_module(model, params):
        new = [(name, param) for name, param in own if id(param) not in seen]
        seen.update(id(param) for _, param in new)
        if new:
            layers.append(LayerGroup(name=module_name or ROOT_LAYER_NAME, parameter_names=tuple(n for n, _ in new),
                                     parameters=tuple(p for _, p in new), is_norm=_is_norm_module(module)))
    return layers


def module_output_layer(model, params=None):
    """The output layer of a PyTorch ``model`` (see the module docstring): a ``LayerGroup`` named by its module,
    holding its trainable parameters under the names ``module_layers`` gives them (a tied weight under its
    first owner's); None when nothing is trainable."""
    _check_model(model)
    first_names, output = {}, None
    for module_name, module, own in _trainable_parameters_by_module(model, params):
        for name, param in own:
            first_names.setdefault(id(param), name)
        output = module_name, module, own
    if output is None:
        return None
    module_name, module, own = output
    return LayerGroup(name=module_name or ROOT_LAYER_NAME, parameter_names=tuple(first_names[id(p)] for _, p in own),
                      parameters=tuple(p for _, p in own), is_norm=_is_norm_module(module))


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


def split_layers(layers, last_n_layers=1, *, adamw_norm_layers=False, adamw_output_layer=False, adamw_params=None,
                 output_layer=None):
    """The partition of ``layers`` (``LayerGroup``s in model order) by the rule in the module docstring.

    ``output_layer`` is the model's output layer, a ``LayerGroup`` whose parameters are named as in ``layers``
    (from ``module_output_layer``); None: the last of ``layers``, which it is when no parameter is shared (a
    pytree). With ``adamw_output_layer=True`` its parameters go to the cap. A layer split by ``adamw_params`` or
    ``adamw_output_layer`` appears in both roles, each with its own parameters.
    """
    check_last_n_layers(last_n_layers)
    if not isinstance(adamw_output_layer, bool):
        raise ValueError(f"adamw_output_layer must be True or False, got {adamw_output_layer!r}")
    if adamw_params is not None and not callable(adamw_params):
        raise TypeError("adamw_params must be a callable taking a parameter name and returning a bool")
    if not layers:
        raise ValueError("model has no trainable parameters: STAC needs at least one parameter with "
                         "requires_grad=True")
    if output_layer is None:
        output_layer = layers[-1]
    output_names = set(output_layer.parameter_names) if adamw_output_layer else set()

    def to_adamw(name):
        return name in output_names or (adamw_params is not None and bool(adamw_params(name)))

    first_cap = max(len(layers) - last_n_layers, 0)
    sign_layers, adamw_layers = [], []
    for index, layer in enumerate(layers):
        if index >= first_cap or (adamw_norm_layers and layer.is_norm):
            adamw_layers.append(layer)
            continue
        sign_part, adamw_part = _split_layer(layer, to_adamw)
        if sign_part:
            sign_layers.append(sign_part)
        if adamw_part:
            adamw_layers.append(adamw_part)
    return STACPartition(tuple(sign_layers), tuple(adamw_layers), output_layer=output_layer)


def partition_trainable_layers(model, last_n_layers=1, *, adamw_norm_layers=False, adamw_output_layer=False,
                               adamw_params=None, params=None):
    """Split a PyTorch ``model`` into a sign trunk and an AdamW cap.

    Args:
        model: the ``nn.Module`` to partition.
        last_n_layers: how many of the last trainable layers use AdamW (>= 0).
        adamw_norm_layers: also send every normalization-layer parameter to AdamW.
        adamw_output_layer: also send the output layer's parameters to AdamW, tied or not (see the module
            docstring).
        adamw_params: a predicate ``name -> bool`` over full parameter names; a
            parameter for which it returns True also goes to AdamW.
        params: the parameters to partition (None: every parameter of ``model``); the model's other
            parameters count as frozen.

    Returns:
        A ``STACPartition`` holding the model's output layer. A layer split by ``adamw_params`` or
        ``adamw_output_layer`` appears in both roles, each with its own parameters.
    """
    return split_layers(module_layers(model, params), last_n_layers, adamw_norm_layers=adamw_norm_layers,
                        adamw_output_layer=adamw_output_layer, adamw_params=adamw_params,
                        output_layer=module_output_layer(model, params))
