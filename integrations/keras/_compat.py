"""Every use of Keras internals by ``gradguard.keras``, in one place.

Keras 3 has no public hook for "the gradients of a training step", so the adapter reaches into a
few private attributes of the optimizer, the model and TensorFlow. Each access is one small
function here, so a Keras upgrade is checked (and fixed) in this file only.

Tested against Keras 3.15.1 and 3.12.0 (TensorFlow, JAX and torch backends). The ``keras`` extras
allow ``keras>=3.12,<3.16``; outside that range gradguard warns once at import. (Older Keras failed:
3.6.0 refuses the Variables' ``aggregation="none"``; on JAX, 3.10.0 records the train step's sharding
specs before gradguard's optimizer Variables exist (an IndexError; that code is gone from 3.12).)
"""

from __future__ import annotations

import warnings
from typing import Any

import keras

TESTED_KERAS = ("3.15.1", "3.12.0")
SUPPORTED_RANGE = ((3, 12), (3, 16))  # [low, high)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_keras_version(version: str | None = None) -> bool:
    """Warn (once, at import) when this Keras is outside the supported range."""
    version = version or keras.__version__
    low, high = SUPPORTED_RANGE
    ok = low <= _version_tuple(version)[:2] < high
    if not ok:
        warnings.warn(f"gradguard.keras is tested with Keras {', '.join(TESTED_KERAS)} (supported "
                      f">={low[0]}.{low[1]},<{high[0]}.{high[1]}); this is Keras {version}. It uses a few "
                      "Keras internals (gradguard/keras/_compat.py) that may have changed.", UserWarning,
                      stacklevel=3)
    return ok


# ------------------------------------------------------------------------------ optimizer

def optimizer_trainable_variables(optimizer) -> list:
    """The variables the optimizer was built with, in its order (``apply(grads)`` without
    variables refers to these)."""
    return list(optimizer._trainable_variables)


def optimizer_variable_index(optimizer, variable) -> int:
    return optimizer._get_variable_index(variable)


def untrack_optimizer_variable(optimizer, variable) -> None:
    optimizer._untrack_variable(variable)


def build_optimizer_in_trace(optimizer, trainable_variables) -> None:
    """What ``apply`` does on its first call (TensorFlow builds the optimizer in the first trace)."""
    from keras.src import backend as kbackend

    with kbackend.name_scope(optimizer.name, caller=optimizer):
        optimizer.build(trainable_variables)
    optimizer.built = True


def accumulation_steps(optimizer) -> int:
    """``gradient_accumulation_steps`` (a public constructor argument), 0 when off."""
    return int(getattr(optimizer, "gradient_accumulation_steps", None) or 0)


def micro_step_counter(optimizer):
    """The optimizer's raw call counter. Under gradient accumulation ``optimizer.iterations`` is
    this divided by the accumulation steps; an update happens when ``(counter + 1) % steps == 0``."""
    return optimizer._iterations


def gradient_accumulator(optimizer, variable):
    """The accumulator Variable Keras keeps for ``variable`` under gradient accumulation."""
    return optimizer._accumulated_gradients[optimizer._get_variable_index(variable)]


def optimizer_distribution_strategy(optimizer):
    return getattr(optimizer, "_distribution_strategy", None)


# ------------------------------------------------------------------------------ model / layers

def flatten_layers(model) -> list:
    """Depth first in attribute/model order; for Sequential and functional models this is the
    order of ``model.layers``, nested models and custom layers expanded in place."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def own_trainable_variables(layer) -> list:
    """The trainable variables a layer created itself (not those of its sublayers)."""
    return list(getattr(layer, "_trainable_variables", []))


def forward_state_variables(model) -> list:
    """Non-trainable variables a training forward pass may write: those a trainable layer owns
    itself (BatchNormalization's moving mean and variance, ...), not a frozen layer's weights (a
    frozen layer runs in inference mode and writes nothing)."""
    out, seen = [], set()
    for layer in flatten_layers(model):
        if not layer.trainable:
            continue
        for v in getattr(layer, "_non_trainable_variables", []):
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def model_distribute_strategy(model):
    """The ``tf.distribute`` strategy a TensorFlow-backend model was created under (or None)."""
    return getattr(model, "_distribute_strategy", None)


def callback_model_no_sync(callback) -> Any:
    """``callback.model`` without its JAX state sync (for when fit has synced already)."""
    return callback._model


# ------------------------------------------------------------------------------ TensorFlow

def tf_strategy_supports_no_merge_call() -> bool:
    import tensorflow as tf

    return tf.__internal__.distribute.strategy_supports_no_merge_call()
