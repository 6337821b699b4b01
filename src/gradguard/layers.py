"""What the core knows about a model: its layers in forward order, and a few facts for diagnosis."""

from __future__ import annotations

import dataclasses
from typing import Iterable

SATURATING = frozenset({"sigmoid", "tanh", "hard_sigmoid", "hardsigmoid", "hardtanh", "softsign", "logsigmoid"})
PLAIN_RNN = frozenset({"rnn", "simplernn"})


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A layer: a module that directly owns trainable parameters.

    ``units`` is the number of output units of its main weight (rows of a torch ``Linear``/``Conv``
    weight, the last axis of a Keras ``Dense``/``Conv`` kernel) or ``None`` when the layer has no
    units whose death would mean anything (embeddings, normalization, biases only).
    ``fan_in`` is the main weight's fan-in, used to judge the initialisation scale.
    """

    name: str
    kind: str
    numel: int
    fan_in: int | None = None
    units: int | None = None
    activation: str | None = None  # the activation this layer applies itself (Keras), if any


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """Architecture facts an adapter can read off the model; they select likely causes."""

    activations: frozenset[str] = frozenset()  # lower-case names: "sigmoid", "tanh", "relu", ...
    normalization: bool = False
    recurrent: frozenset[str] = frozenset()  # "rnn", "lstm", "gru"

    @property
    def saturating(self) -> frozenset[str]:
        return self.activations & SATURATING

    @classmethod
    def of(cls, activations: Iterable[str] = (), normalization: bool = False,
           recurrent: Iterable[str] = ()) -> "ModelFacts":
        return cls(frozenset(a.lower() for a in activations), bool(normalization),
                   frozenset(r.lower() for r in recurrent))


def check_layers(layers: Iterable[LayerInfo]) -> tuple[LayerInfo, ...]:
    layers = tuple(layers)
    if not layers:
        raise ValueError("the model has no trainable parameters to watch (layers=())")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique, got {names!r}")
    return layers
