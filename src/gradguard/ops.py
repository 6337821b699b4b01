"""The few array operations the per-step math needs, so it is written once for every framework.

The per-step math (``stats.device_step`` and the clipping policies) is written against a small
namespace ``xp`` with: ``where, sqrt, log, exp, maximum, minimum, isfinite, sum, asfloat, asint, concat, stack,
sort, take``
(and indexing ``x[-1]``, ``x[None]``, ``x[:1]``).
``maximum``/``minimum`` accept a Python float as their second argument. Operators
(``+ - * / < >= &``) work on the framework's own arrays. Adapters pass their framework's
namespace (torch tensors on the gradients' device, ``keras.ops`` inside the compiled train step);
``numpy_ops`` here is the reference used by the core's own tests.
"""

from __future__ import annotations

import types

import numpy as np


def _np_asfloat(x):
    return np.asarray(x, dtype=np.float32)


numpy_ops = types.SimpleNamespace(
    where=lambda c, a, b: np.where(c, a, b).astype(np.float32),
    sqrt=np.sqrt,
    log=np.log,
    exp=np.exp,
    maximum=np.maximum,
    minimum=np.minimum,
    isfinite=np.isfinite,
    sum=lambda x: np.sum(x, dtype=np.float32),
    asfloat=_np_asfloat,
    asint=lambda x: np.asarray(x).astype(np.int64),
    concat=np.concatenate,
    stack=np.stack,
    sort=np.sort,
    take=lambda x, i: np.take(x, np.asarray(i).astype(np.int64)),
)
