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


# Most of the step's values are float32 scalars (the tracker, the policy): numpy's ufuncs cost a
# microsecond or more each on a scalar, plain comparisons a tenth of that. The scalar paths below
# compute what numpy's scalar loops compute (``maximum``: ``a >= b or isnan(a) ? a : b``), in
# float32 (a Python float meets a float32 as a float32, as in the ufunc).
_SCALARS = (float, np.float32)


def _where(c, a, b):
    if type(c) is np.bool_ and type(a) in _SCALARS and type(b) in _SCALARS:
        return np.float32(a if c else b)
    r = np.where(c, a, b)
    return r if r.dtype == np.float32 else r.astype(np.float32)


def _maximum(a, b):
    if type(a) is np.float32 and type(b) in _SCALARS:
        return a if (a >= b or a != a) else np.float32(b)
    return np.maximum(a, b)


def _minimum(a, b):
    if type(a) is np.float32 and type(b) in _SCALARS:
        return a if (a <= b or a != a) else np.float32(b)
    return np.minimum(a, b)


_ONE, _ZERO = np.float32(1.0), np.float32(0.0)


def _asfloat(x):
    if type(x) is np.bool_:
        return _ONE if x else _ZERO  # (np.float32(x) costs ~10x a branch; the scalars are immutable)
    return np.asarray(x, dtype=np.float32)


# The core's numpy namespace with the slow generic helpers swapped for direct calls (``np.stack``
# is a Python-level function; ``np.array`` of float32 values builds the same array several times
# faster) and scalar fast paths. Same values, same dtypes: checked against ``numpy_ops`` in the
# tests. Hosts that run the bookkeeping on the CPU in numpy (``gradguard.torch``, Keras on torch) use it.
fast_numpy_ops = types.SimpleNamespace(**{**vars(numpy_ops), "where": _where, "maximum": _maximum,
                                          "minimum": _minimum, "asfloat": _asfloat,
                                          "stack": lambda xs: np.array(xs, dtype=np.float32)})
