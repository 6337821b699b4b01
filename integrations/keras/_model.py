"""What gradguard needs to know about a Keras model: its layers in model order and a few facts."""

from __future__ import annotations

import dataclasses
import math

import keras

from gradguard.keras import _compat as compat
from gradguard.layers import LayerInfo, ModelFacts

# Layers whose main weight's last axis holds the output units (a unit is dead when its column of
# the kernel gets no gradient). Conv*Transpose kernels keep the inputs on the last axis: left out.
_UNIT_TYPES = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_TRANSPOSE_TYPES = tuple(t for t in (getattr(keras.layers, n, None) for n in
                                     ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")) if t)
_RECURRENT = {"simplernn": "rnn", "simplernncell": "rnn", "lstm": "lstm", "lstmcell": "lstm", "gru": "gru",
              "grucell": "gru"}
_ACTIVATION_LAYERS = {"relu": "relu", "leakyrelu": "leaky_relu", "elu": "elu", "prelu": "prelu",
                      "softmax": "softmax"}


@dataclasses.dataclass
class ModelLayout:
    """Layers that own trainable variables, in model order, and which layer owns which variable."""

    layers: list[LayerInfo]
    facts: ModelFacts
    layer_of_var: dict[int, int]  # id(keras Variable) -> layer index
    unit_kernel: dict[int, int]  # layer index -> id of the kernel whose last axis holds the units


def activation_name(fn) -> str | None:
    if fn is None:
        return None
    name = getattr(fn, "__name__", None) or type(fn).__name__
    name = name.lower()
    return None if name in ("linear", "identity") else name


def _flatten_layers(model):
    return compat.flatten_layers(model)


def describe_model(model: "keras.Model") -> ModelLayout:
    """Layers (Keras layer names, model order) that directly own trainable variables, and the
    architecture facts that select likely causes (activations, normalization, recurrence)."""
    trainable = {id(v): v for v in model.trainable_variables}
    if not trainable:
        raise ValueError(f"model has no trainable variables to watch (model={model.name!r})")
    # A recurrent layer's weights belong to its cell (LSTMCell...); findings name the layer the
    # user built (``lstm``), not the cell (``lstm_cell``).
    flat = _flatten_layers(model)
    cell_owner = {id(l.cell): l for l in flat if isinstance(l, keras.layers.RNN) and getattr(l, "cell", None) is not None}
    owners: list = []
    at: dict[int, int] = {}
    seen: set[int] = set()
    for layer in flat:
        own = [v for v in compat.own_trainable_variables(layer) if id(v) in trainable and id(v) not in seen]
        if own:
            seen.update(id(v) for v in own)
            owner = cell_owner.get(id(layer), layer)
            if id(owner) in at:
                owners[at[id(owner)]][1].extend(own)
            else:
                at[id(owner)] = len(owners)
                owners.append((owner, own))
    # Variables no layer claims directly (rare: created on the model by a custom train loop).
    stray = [v for k, v in trainable.items() if k not in seen]
    groups: dict[str, list] = {}
    for v in stray:
        groups.setdefault(str(getattr(v, "path", v.name)).rsplit("/", 1)[0], []).append(v)

    names: list[str] = []
    layers: list[LayerInfo] = []
    layer_of_var: dict[int, int] = {}
    unit_kernel: dict[int, int] = {}
    parameterised = [layer for layer, _ in owners]
    last_layer = parameterised[-1] if parameterised else None
    for layer, own in owners:
        kernel = next((v for v in own if len(v.shape) >= 2), None)
        is_unit = (isinstance(layer, _UNIT_TYPES) and not isinstance(layer, _TRANSPOSE_TYPES)
                   and kernel is not None)
        units = int(kernel.shape[-1]) if is_unit else None
        fan_in = int(math.prod(kernel.shape[:-1])) if is_unit else None
        act = None
        # Recurrent cells' gate activations and the output head's activation (a sigmoid/softmax
        # head fed to its cross-entropy passes p - y back, it does not saturate) are not causes.
        if _RECURRENT.get(type(layer).__name__.lower()) is None and layer is not last_layer:
            act = activation_name(getattr(layer, "activation", None))
        info = LayerInfo(_unique(layer.name, names), type(layer).__name__,
                         int(sum(math.prod(v.shape) for v in own)), fan_in, units, act)
        names.append(info.name)
        index = len(layers)
        layers.append(info)
        for v in own:
            layer_of_var[id(v)] = index
        if is_unit:
            unit_kernel[index] = id(kernel)
    for group, vs in groups.items():
        info = LayerInfo(_unique(group or "variables", names), "Variable", int(sum(math.prod(v.shape) for v in vs)))
        names.append(info.name)
        for v in vs:
            layer_of_var[id(v)] = len(layers)
        layers.append(info)

    acts, norm, rec = set(), False, set()
    for layer in flat:
        cls = type(layer).__name__.lower()
        if "normalization" in cls and cls != "normalization":  # keras.layers.Normalization is preprocessing
            norm = True
        if cls in _RECURRENT:
            rec.add(_RECURRENT[cls])
        if cls in _ACTIVATION_LAYERS:
            acts.add(_ACTIVATION_LAYERS[cls])
        elif cls == "activation":
            name = activation_name(getattr(layer, "activation", None))
            if name:
                acts.add(name)
        elif layer is not last_layer and cls not in _RECURRENT:
            # The output layer's own activation (softmax/sigmoid heads) is not a cause of an
            # early-layer collapse; hidden layers' activations are.
            name = activation_name(getattr(layer, "activation", None))
            if name:
                acts.add(name)
    return ModelLayout(layers, ModelFacts.of(acts, norm, rec), layer_of_var, unit_kernel)


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    i = 1
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"
