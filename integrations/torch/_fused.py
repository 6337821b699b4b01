"""The per-step bookkeeping (the core's ``stats.device_step``) run the cheapest way the device allows.

* ``NumpyStep`` (a CPU device): the state lives in numpy arrays and the core's numpy namespace runs
  the step. On a CPU device a "host read" costs nothing, and numpy runs the ~100 small operations
  of the step about 5x faster than torch's eager dispatch. The verdict comes back as Python floats,
  so the clipping multiply uses a Python float (``_foreach_mul_`` by a 0-d tensor costs several
  times a multiply by a float on CPU).
* ``TorchStep`` (an accelerator): the state stays on the device as tensors and nothing is read
  back. The step runs eagerly (about a hundred tiny kernels) until ``torch.compile`` of it is ready:
  compiled in a background thread once ``COMPILE_AFTER`` steps have run, on copies of the state,
  so no step of the user's run waits for the compiler. Where the compiler is missing or fails,
  the eager step stays (and a compiled step that fails later falls back to it). ``path`` says which
  one runs; the switch is logged at debug level on the ``gradguard`` logger. ``GRADGUARD_COMPILE=0``
  keeps the eager step. (Dynamo compiles one function at a time: a model of the user's that
  recompiles while this compile runs waits for it, once.)

Both give the same numbers (the core's tests check numpy == torch for ``device_step``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any, Mapping

import numpy as np
import torch

from gradguard import stats
from gradguard.clipping import Signals, state_like
from gradguard.ops import fast_numpy_ops
from gradguard.torch._ops import torch_ops

log = logging.getLogger("gradguard")


COMPILE_AFTER = 50  # eager steps before the background compile starts (short runs never compile)


DEFER_MAX = 64  # steps whose bookkeeping may wait (see NumpyStep)
_NO_SIGNALS = Signals(np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0))
_F32_MAX = float(np.finfo(np.float32).max)


class ParamToLayer:
    """Per-layer sums of per-parameter squared norms, in numpy, for one set of present gradients:
    ``layer_sq(rows)`` maps (k, P) squared norms to (k, L) layer sums, each layer's parameters added
    one after another in parameter order (the order ``index_add_`` adds them in), so one step gives
    the same float32 sums whether it runs at once or with others later."""

    def __init__(self, param_layer: list[int], n_layers: int):
        n_params = len(param_layer)
        counts = np.bincount(np.asarray(param_layer, np.int64), minlength=n_layers) if n_params else np.zeros(1)
        gather = np.full((max(1, int(counts.max())), n_layers), n_params, np.int64)  # n_params: a zero column
        filled = np.zeros(n_layers, np.int64)
        for j, layer in enumerate(param_layer):
            gather[filled[layer], layer] = j
            filled[layer] += 1
        self.n_params, self._gather = n_params, gather

    def layer_sq(self, norms: np.ndarray) -> np.ndarray:
        """(k, P) per-parameter norms -> (k, L) per-layer sums of their squares (float32)."""
        sq = np.zeros((norms.shape[0], self.n_params + 1), np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN stay, as in torch
            np.multiply(norms, norms, out=sq[:, :-1])
        gather = self._gather
        out = sq[:, gather[0]]
        for row in gather[1:]:  # each layer's next parameter, added in order (a numpy sum may pair them)
            out += sq[:, row]
        return out


class NumpyStep:
    """The device step on a CPU device: numpy state, Python-float verdict.

    Where the verdict needs nothing the step moves (``clip=None``, a fixed max norm, and ``auto``
    on a quiet step: latch open, the norm within sqrt(spike_factor) of the lowest level the tracker
    can have reached) the step returns its verdict at once, computed by ``stats.device_step``'s own
    expressions, and keeps the rest of the bookkeeping (window, tracker, trace) for later: it runs
    for up to ``DEFER_MAX`` steps in a row, before any other step and any read of the state. Same
    numbers, same order; run back to back, the ~100 small numpy operations of a step cost a
    fraction of what they cost right after a pass over the gradients has pushed them out of the
    caches.

    ``from_norms`` goes one further, for a caller holding the per-parameter norms (``torch.
    _foreach_norm``'s list of 0-d tensors): a step whose verdict needs no exact float32 global norm
    (nothing to clip with a finite threshold: ``clip=None``, ``auto`` on a quiet step) reads each
    norm once as a Python float (cheaper than a stack right after a pass over the gradients) and
    turns them into layer sums later, with the other waiting steps; the waiting steps' bookkeeping
    then runs as one batch (``stats.waited_steps``)."""

    path = "numpy (cpu)"
    reads_free = True

    def __init__(self, state: Mapping[str, Any], policy, tracker):
        self._state_now = {k: np.array(np.asarray(v, np.float32)) for k, v in state.items()}
        self._policy, self._tracker = policy, tracker
        self._has: tuple[torch.Tensor, np.ndarray] | None = None
        # (``ClipPolicy.verdict_without_state``: "quiet" steps need no spike and no explosion, and a
        # spike needs the norm at least sqrt(spike_factor) above the tracker's level.)
        self._defer = policy.verdict_without_state
        self._latch, self._ceiling = stats.latch_key(policy), stats.ceiling_key(policy)
        if (self._defer == "always" and self._latch is not None) or (self._defer == "quiet" and self._latch is None):
            self._defer = None
        self._quiet_jump = 0.5 * math.log(tracker.spike_factor) - 1e-3  # (margin: float32 rounding)
        # waiting steps, oldest first: (layer_sq, has) or (per-parameter norms as floats, ParamToLayer, has)
        self._pending: list[tuple] = []
        self._pending_min_x = math.inf
        self._pol_state = None
        self._never_clips: bool | None = None  # an "always" policy whose threshold is inf (clip=None)

    def _has_np(self, has_t: torch.Tensor) -> np.ndarray:
        if self._has is None or self._has[0] is not has_t:
            self._has = (has_t, has_t.numpy().astype(np.float32))
        return self._has[1]

    def __call__(self, layer_sq: torch.Tensor | np.ndarray, has_t: torch.Tensor,
                 scaler_active: float | None = None) -> tuple[float, float]:
        has = self._has_np(has_t)
        sq = layer_sq.numpy() if torch.is_tensor(layer_sq) else layer_sq
        if self._defer is not None:
            verdict = self._verdict(sq)
            # (a non-finite step under a loss scaler runs now: the waiting steps' batch knows no scaler)
            if verdict is not None and (verdict[1] > 0 or not scaler_active):
                self._wait((sq, has))
                return verdict
            self._flush()
        active = None if scaler_active is None else np.float32(scaler_active)
        scale, finite, self._state_now = stats.device_step(self._state_now, sq, has, self._policy,
                                                           fast_numpy_ops, self._tracker, active)
        return float(scale), float(finite)

    def from_norms(self, norms: list[torch.Tensor], layers: ParamToLayer, has_t: torch.Tensor, *,
                   need_scale: bool, need_finite: bool, now: bool = False
                   ) -> tuple[float, float | None, np.ndarray | None]:
        """The step from per-parameter norms (float32 0-d tensors on the CPU). ``need_scale``: the
        caller multiplies by the scale; ``need_finite``: it gates on the finite flag (else the flag
        may come back None, not computed); ``now``: the caller needs the layer sums (a log step).
        Returns ``(scale, finite, layer_sq)``; ``layer_sq`` is None when the step waits with its
        norms read as floats and its layer sums not made yet."""
        has = self._has_np(has_t)
        if self._defer is not None and not now:
            verdict = self._lazy_verdict(norms, need_scale, need_finite)
            if verdict is not None:
                scale, finite, values = verdict
                self._wait((values, layers, has))
                return scale, finite, None
        sq = layers.layer_sq(torch.stack(norms).numpy()[None])[0]
        scale, finite = self(sq, has_t)
        return scale, finite, sq

    def _lazy_verdict(self, norms, need_scale: bool, need_finite: bool
                      ) -> tuple[float, float | None, list[float]] | None:
        """The verdict of a step that can wait with its norms read as Python floats (returned), or
        None."""
        if self._defer == "always":
            if self._never_clips is None:
                self._never_clips = self._threshold(np.float32(1.0)) == math.inf
            if need_scale and not self._never_clips:
                return None  # a finite threshold: the scale needs the exact float32 norm
        # One read of each norm, now: cheaper on a CPU than a stack, and than reading the 0-d tensors
        # later, when they have left the caches.
        values = list(map(torch.Tensor.item, norms))
        if self._defer == "always" and not need_finite:
            return 1.0, None, values
        total = 0.0
        for v in values:
            total += v * v
        if not total < 0.999 * _F32_MAX:  # non-finite, or so close to float32's overflow that it may be
            return None
        if self._defer == "always":
            return 1.0, 1.0, values
        # (a relative margin at the ceiling: a float64 sum stands in for device_step's float32 one)
        verdict = self._quiet(math.sqrt(total), ceiling_margin=1.0 + 1e-4)
        return None if verdict is None else (*verdict, values)

    def _quiet(self, gnorm: float, ceiling_margin: float = 1.0) -> tuple[float, float] | None:
        """``auto``'s verdict for a finite step that is quiet (``(1.0, 1.0)``), or None: the latch is
        open, the norm under the update ceiling and too low for a spike."""
        if float(self._state_now[self._latch]) > 0:
            return None
        if self._ceiling is not None and not gnorm * ceiling_margin <= float(self._state_now[self._ceiling]):
            return None  # the update ceiling may bind
        x = math.log(max(gnorm, 1e-30))
        # The tracker's level after the pending steps is at least the lowest of its level now and
        # their log norms (an EMA of values each at least min(level, x)): below sqrt(spike_factor)
        # above that, this step is neither a spike nor elevated, so no explosion: threshold inf.
        if x - min(float(self._state_now["trk_mean"]), self._pending_min_x) >= self._quiet_jump:
            return None
        self._pending_min_x = min(self._pending_min_x, x)
        return 1.0, 1.0

    def _wait(self, entry: tuple) -> None:
        self._pending.append(entry)
        if len(self._pending) >= DEFER_MAX:
            self._flush()

    def _threshold(self, gnorm):
        if self._pol_state is None:  # (constant for these policies until the state is written)
            n = len(stats.POLICY_PREFIX)
            fields = {k[n:]: v for k, v in self._state_now.items() if k.startswith(stats.POLICY_PREFIX)}
            self._pol_state = state_like(self._policy.init(), fields)
        return self._policy.update(self._pol_state, gnorm, _NO_SIGNALS, fast_numpy_ops)[0]

    def _verdict(self, layer_sq: np.ndarray) -> tuple[float, float] | None:
        """``device_step``'s scale and finite flag, by its own expressions, or None when this step
        needs the whole step now."""
        xp = fast_numpy_ops
        norm = xp.sqrt(xp.sum(layer_sq))
        finite = xp.asfloat(xp.isfinite(norm))
        gnorm = xp.where(finite > 0, norm, 0.0)
        if self._defer == "quiet":
            return self._quiet(float(gnorm)) if finite else None
        threshold = self._threshold(gnorm)
        clip = finite * xp.asfloat(gnorm > threshold)
        scale = xp.where(clip > 0, threshold / (gnorm + 1e-6), 1.0)
        return float(scale), float(finite)

    def _flush(self) -> None:
        pending, self._pending, self._pending_min_x = self._pending, [], math.inf
        if not pending:
            return
        rows = _layer_rows(pending)
        self._state_now = stats.waited_steps(self._state_now, np.stack([sq for sq, _ in rows]),
                                             np.stack([has for _, has in rows]), self._policy, self._tracker)

    @property
    def _state(self) -> dict[str, Any]:
        if self._pending:
            self._flush()
        return self._state_now

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in self._state.items()}

    def host(self) -> dict[str, np.ndarray]:
        return {k: np.array(v, np.float32) for k, v in self._state.items()}  # copies: the caller may keep them

    def write(self, values: Mapping[str, Any]) -> None:
        state = self._state
        for k, v in values.items():
            state[k] = np.array(np.asarray(v, np.float32))
        self._pol_state = None
        self._never_clips = None


def _layer_rows(pending: list[tuple]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The waiting steps as (layer_sq, has) rows, in order; the per-parameter norms of the steps
    that wait with them become layer sums in one pass per set of gradients."""
    rows: list = [None] * len(pending)
    by_layers: dict[int, list[int]] = {}
    for i, entry in enumerate(pending):
        if len(entry) == 2:
            rows[i] = entry
        else:
            by_layers.setdefault(id(entry[1]), []).append(i)
    for at in by_layers.values():
        layers = pending[at[0]][1]
        flat: list[float] = []
        for i in at:
            flat += pending[i][0]
        sums = layers.layer_sq(np.array(flat, np.float32).reshape(len(at), layers.n_params))
        for row, i in enumerate(at):
            rows[i] = (sums[row], pending[i][2])
    return rows


class TorchStep:
    """The device step on an accelerator: tensor state, tensor verdict, never read here."""

    reads_free = False

    def __init__(self, state: Mapping[str, Any], policy, tracker, device: torch.device,
                 compile_after: int | None = COMPILE_AFTER):
        self.device = device
        self._state = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in state.items()}
        self._policy, self._tracker = policy, tracker
        self._steps = 0
        self._compiled = None
        self._thread: threading.Thread | None = None
        self.path = "eager"
        if os.environ.get("GRADGUARD_COMPILE", "1") == "0" or not hasattr(torch, "compile"):
            compile_after = None
        self._compile_after = compile_after

    def _eager(self, state, layer_sq, has, scaler_active=None):
        return stats.device_step(state, layer_sq, has, self._policy, torch_ops, self._tracker, scaler_active)

    def _compile(self, state, layer_sq, has, scaler_active) -> None:
        try:
            fn = torch.compile(self._eager, dynamic=False, fullgraph=True)
            fn({k: v.clone() for k, v in state.items()}, layer_sq.clone(), has.clone(),
               None if scaler_active is None else scaler_active.clone())  # compile, on copies
            self._compiled = fn
            self.path = "compiled"
            log.debug("gradguard: the per-step bookkeeping runs compiled (torch.compile)")
        except Exception as e:  # no compiler (no C++ toolchain / triton), or an unsupported op
            self.path = "eager"
            log.debug("gradguard: torch.compile of the per-step bookkeeping failed (%s: %s); it stays eager",
                      type(e).__name__, str(e).splitlines()[0] if str(e) else "")

    def __call__(self, layer_sq: torch.Tensor, has_t: torch.Tensor,
                 scaler_active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._steps += 1
        fn = self._compiled
        if fn is None:
            if self._compile_after is not None and self._thread is None and self._steps > self._compile_after:
                self.path = "eager (compiling)"
                self._thread = threading.Thread(target=self._compile,
                                                args=(self._state, layer_sq, has_t, scaler_active),
                                                name="gradguard-compile", daemon=True)
                self._thread.start()
            fn = self._eager
        try:
            scale, finite, self._state = fn(self._state, layer_sq, has_t, scaler_active)
        except Exception as e:  # a compiled step that fails later (a recompile): eager from now on
            if fn is self._eager:
                raise
            log.debug("gradguard: the compiled per-step bookkeeping failed (%s); eager from now on", type(e).__name__)
            self._compiled, self._compile_after, self.path = None, None, "eager"
            scale, finite, self._state = self._eager(self._state, layer_sq, has_t, scaler_active)  # (pure)
        return scale, finite

    def wait_compiled(self, timeout: float | None = None) -> str:
        """Block until a background compile has finished (tests, benchmarks); returns ``path``."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.path

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self._state

    def host(self) -> dict[str, np.ndarray]:
        keys = list(self._state)
        flat = torch.cat([self._state[k].reshape(-1) for k in keys]).cpu().numpy()  # one copy to the host
        out, o = {}, 0
        for k in keys:
            n = self._state[k].numel()
            out[k] = flat[o:o + n].reshape(tuple(self._state[k].shape))
            o += n
        return out

    def write(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self._state[k] = torch.as_tensor(np.asarray(v), dtype=torch.float32, device=self.device)


def make_step(state: Mapping[str, Any], policy, tracker, device: torch.device, reads_free: bool | None = None):
    """The step for ``device``; ``reads_free=False`` forces the accelerator path (tests on CPU)."""
    if reads_free is None:
        reads_free = device.type == "cpu"
    if reads_free and device.type == "cpu":
        return NumpyStep(state, policy, tracker)
    return TorchStep(state, policy, tracker, device)
