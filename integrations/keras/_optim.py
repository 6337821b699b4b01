"""What the update ceiling of ``clip="auto"`` needs from Keras (see ``gradguard.clipping.update_ceiling``):
how far the optimizer moves the weights per unit of gradient norm, and the weights' norm."""

from __future__ import annotations

import math

import keras
import numpy as np

from gradguard import clipping


def optimizer_gain(optimizer) -> float | None:
    """``clipping.sgd_gain`` of a ``keras.optimizers.SGD`` at its current learning rate (a schedule's
    value at the optimizer's iteration); None for every other optimizer (Adam-like ones normalise the
    gradient, so a clip does not bound their step) and where the rate cannot be read."""
    if not isinstance(optimizer, keras.optimizers.SGD):
        return None
    try:
        lr = float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    except Exception:  # (a symbolic value inside a trace)
        return None
    return clipping.sgd_gain(lr, float(getattr(optimizer, "momentum", 0.0) or 0.0))


def weight_norm(variables) -> float | None:
    """Global L2 norm of ``variables`` (one pass over the weights, once per fit); None where they
    cannot be read here (inside a trace)."""
    try:
        sq = sum(float(np.sum(np.square(np.asarray(keras.ops.convert_to_numpy(v), np.float64)))) for v in variables)
    except Exception:
        return None
    return math.sqrt(sq)
