"""Statistics records and the per-step math that fills them.

``device_step`` runs every optimizer step on the device, written once against ``xp`` (see
``gradguard.ops``). From the per-layer squared gradient norms of one step it

* accumulates the window since the last log step (per-layer sum/min/max of the L2 norm, counts of
  steps with a gradient, non-finite and all-zero steps; the global norm's sum/min/max),
* runs the spike tracker (EMA of log global norm, its spread, and spike flags),
* runs the clipping policy and returns the factor to scale the gradients by,

with no host synchronisation. On a log step the adapter reads the state once (``WindowStats``),
and the accumulators start again (``reset_window``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from gradguard.clipping import ClipPolicy, Signals, state_fields, state_like

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """The spike tracker: a step is a spike when its global norm is at least ``spike_factor`` times
    the run's running level *and* (after ``warmup_steps``) ``spike_z`` spreads above it, both in
    log space, so the test is scale-free and adapts to how noisy this run's gradients are, and at
    least ``step_factor`` above the step before it: a net escaping a plateau can raise its gradient
    50x over 20 steps at ~1.2x a step while its loss falls, which is learning, not a jump.

    A spike is not yet an explosion: late in training, or with tiny batches, one hard batch can lift
    the norm 10-40x for a single step (the heavy tail of the per-example errors) and the next step is
    back at the level. An *explosion* is confirmed when a spike is part of an excursion of at least
    ``explosion_steps`` consecutive elevated steps (unusual for the run's noise and at least
    sqrt(spike_factor) above the level), when a NaN/Inf follows a spike within two steps, or when one
    step is ``isolated_factor`` above the level (no healthy run measured came within 20x of that)."""

    alpha: float = 0.9  # ~10-step memory: slow healthy growth is followed, a jump within a few steps is not
    spike_factor: float = 10.0
    spike_z: float = 3.0
    warmup_steps: int = 10
    min_steps: int = 1  # steps seen before anything can be a spike: the second step already may be
    sigma_floor: float = 0.1  # log-space spread never assumed below ~10%
    explosion_steps: int = 2
    isolated_factor: float = 1e3
    step_factor: float = 2.0  # a spike also rises this much over the step before it

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not self.spike_factor > 1.0:
            raise ValueError(f"spike_factor must be > 1, got {self.spike_factor!r}")


# The window accumulators, packed so one step costs few device ops. Per-layer arrays have one more
# column than there are layers: the last column is the global norm, accumulated by the same ops.
SUM_NORM, OK_STEPS, NONFINITE, ZERO = range(4)  # rows of acc_sum: summed norm, and step counts
CLIPPED, SPIKES, EXPLOSIONS = range(3)  # acc_count
FIRST_NONFINITE, FIRST_SPIKE, FIRST_EXPLOSION = range(3)  # acc_first: index in the window, -1 for none
_WINDOW_KEYS = ("acc_sum", "acc_max", "acc_min", "acc_last", "acc_steps", "acc_count", "acc_first",
                "acc_max_jump", "acc_scale_min", "acc_max_run", "acc_scaler_skips")


def reset_window(n_layers: int) -> dict[str, np.ndarray]:
    """Fresh accumulator values (the part of the state that starts again on each log step)."""
    width = n_layers + 1
    return {
        "acc_sum": np.zeros((4, width), np.float32),
        "acc_max": np.zeros(width, np.float32),
        "acc_min": np.full(width, INF, np.float32),
        "acc_last": np.zeros(width, np.float32),
        "acc_steps": np.float32(0),
        "acc_count": np.zeros(3, np.float32),
        "acc_first": np.full(3, -1.0, np.float32),
        "acc_max_jump": np.float32(0),
        "acc_scale_min": np.float32(1),
        "acc_scaler_skips": np.float32(0),
        "acc_max_run": np.float32(0),
    }


def window_keys() -> tuple[str, ...]:
    return _WINDOW_KEYS


# The per-step trace: the last TRACE_SIZE optimizer steps, one row each, oldest first (a shift
# register: one concat of a (R, 4) array per step, so every step reaches the timeline without a
# host read; the rows come to the host with the window on log steps). Not part of the window: it
# is never reset, the window's step count says which rows are the window's.
TRACE_NORM, TRACE_THRESHOLD, TRACE_SCALE, TRACE_FLAGS = range(4)  # columns
FLAG_NONFINITE, FLAG_CLIPPED, FLAG_SPIKE, FLAG_EXPLOSION, FLAG_SCALER_SKIP = 1, 2, 4, 8, 16  # flags bits
TRACE_SIZE = 256


def init_state(n_layers: int, policy: ClipPolicy, trace_size: int = TRACE_SIZE) -> dict[str, np.ndarray]:
    """The whole device state as float32 numpy values; adapters move it to their device.
    ``trace_size``: optimizer steps kept in the per-step trace (at least the log interval, so no
    step between two log steps is lost; 0 turns the trace off)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers!r}")
    if isinstance(trace_size, bool) or not isinstance(trace_size, (int, np.integer)) or trace_size < 0:
        raise ValueError(f"trace_size must be an int >= 0, got {trace_size!r}")
    state = reset_window(n_layers)
    if trace_size:
        state["trace"] = np.zeros((int(trace_size), 4), np.float32)  # rows are read only once written
    state.update({"trk_count": np.float32(0), "trk_mean": np.float32(0), "trk_var": np.float32(0),
                  "trk_prev": np.float32(0), "trk_run": np.float32(0), "trk_run_spike": np.float32(0),
                  "trk_since_spike": np.float32(1e9),
                  "threshold": np.float32(INF)})
    for k, v in state_fields(policy.init()).items():
        state[POLICY_PREFIX + k] = np.asarray(v, np.float32)
    return state


POLICY_PREFIX = "clip_"  # the policy's state fields live in the flat state under this prefix


def latch_key(policy: ClipPolicy) -> str | None:
    """The flat-state key of the policy's latch field (see ``ClipPolicy.latch``), or None."""
    return None if policy.latch is None else POLICY_PREFIX + policy.latch


def ceiling_key(policy: ClipPolicy) -> str | None:
    """The flat-state key of the policy's update-ceiling field (see ``ClipPolicy.ceiling``), or None."""
    return None if policy.ceiling is None else POLICY_PREFIX + policy.ceiling


def policy_keys(state: Mapping[str, Any]) -> list[str]:
    return [k for k in state if k.startswith(POLICY_PREFIX)]


def _track(s: dict[str, Any], gnorm: Any, finite: Any, xp, tracker: TrackerConfig,
           scaler_skip: Any = None) -> tuple[Any, ...]:
    """The spike tracker's part of one step (its ``trk_*`` fields and ``acc_max_run`` in ``s``, moved
    in place). Returns ``(spike, explosion, jump, overflow, level, spread)``: level and spread (log
    space) as they were before this step. ``scaler_skip``: 1.0 on a non-finite step a loss scaler
    skips itself, which is no overflow of the run's own."""
    # Spike tracker on log(norm): scale-free, so one rule serves every model size.
    count, mean, var = s["trk_count"], s["trk_mean"], s["trk_var"]
    usable = finite * xp.asfloat(gnorm > 0.0)
    x = xp.log(xp.maximum(gnorm, 1e-30))
    sigma = xp.maximum(xp.sqrt(var), tracker.sigma_floor)
    jump = (x - mean) * xp.asfloat(count >= tracker.min_steps) * usable
    unusual = xp.asfloat((count < tracker.warmup_steps) | (jump >= tracker.spike_z * sigma))
    rise = xp.asfloat(x - s["trk_prev"] >= math.log(tracker.step_factor))
    spike = xp.asfloat(jump >= math.log(tracker.spike_factor)) * unusual * rise
    # Explosion: a spike inside a run of consecutive elevated steps, a single enormous step, or a
    # NaN/Inf right after a spike (that step is skipped; the latch protects the next ones).
    elevated = xp.asfloat(jump >= 0.5 * math.log(tracker.spike_factor)) * unusual
    run = (s["trk_run"] + 1.0) * elevated
    run_spike = xp.maximum(s["trk_run_spike"] * elevated, spike)
    nonfinite = 1.0 - finite if scaler_skip is None else 1.0 - finite - scaler_skip
    overflow = nonfinite * xp.asfloat(s["trk_since_spike"] < 2.0)
    explosion = xp.maximum(xp.maximum(xp.asfloat(run * run_spike >= tracker.explosion_steps), overflow),
                           spike * xp.asfloat(jump >= math.log(tracker.isolated_factor)))
    s["trk_run"], s["trk_run_spike"] = run, run_spike
    s["trk_since_spike"] = xp.minimum((s["trk_since_spike"] + 1.0) * (1.0 - spike), 1e9)
    s["acc_max_run"] = xp.maximum(s["acc_max_run"], run * run_spike)
    # Winsorised EMA: a step beyond spike_z spreads is ingested at that edge and leaves the spread
    # alone, so neither a spike nor a running explosion drags the level up after itself.
    edge = mean + tracker.spike_z * sigma
    capped = xp.asfloat(x > edge) * xp.asfloat(count >= tracker.min_steps)
    seen = xp.where(capped > 0, edge, x)
    weight = xp.minimum(count / (count + 1.0), tracker.alpha)  # a running mean first, then the EMA
    new_mean = weight * mean + (1.0 - weight) * seen
    new_var = weight * var + (1.0 - weight) * (seen - new_mean) * (seen - new_mean)
    s["trk_mean"] = mean + usable * (new_mean - mean)
    s["trk_var"] = var + usable * (1.0 - capped) * (new_var - var)
    s["trk_count"] = count + usable
    s["trk_prev"] = s["trk_prev"] + usable * (x - s["trk_prev"])
    return spike, explosion, jump, overflow, mean, sigma


def device_step(state: Mapping[str, Any], layer_sq: Any, has_grad: Any, policy: ClipPolicy, xp,
                tracker: TrackerConfig = TrackerConfig(), scaler_active: Any = None
                ) -> tuple[Any, Any, dict[str, Any]]:
    """One optimizer step's bookkeeping. ``layer_sq``: per-layer sum of squared gradients (L,);
    ``has_grad``: 1.0 for layers that received a gradient this step, else 0.0 (L,);
    ``scaler_active``: 1.0 (0-d) when a loss scaler skips a non-finite step itself at this step
    (fp16's GradScaler at a scale above 1: an overflow is its routine), None or 0.0 otherwise.

    Returns ``(scale, finite, new_state)``: multiply the gradients by ``scale`` (1 when not
    clipping); ``finite`` is 1.0 when every gradient is finite. A non-finite step leaves the
    tracker and the policy untouched; one the loss scaler skips is counted apart
    (``acc_scaler_skips``, ``FLAG_SCALER_SKIP``), not as a non-finite step of the run's own.
    """
    s = dict(state)
    ones = has_grad[:1] * 0.0 + 1.0
    sq = xp.concat([layer_sq, xp.sum(layer_sq)[None]])  # the global norm rides along as a last column
    has = xp.concat([has_grad, ones])
    norms = xp.sqrt(sq)
    ok_mask = (has > 0) & xp.isfinite(norms)
    ok = xp.asfloat(ok_mask)
    clean = xp.where(ok_mask, norms, 0.0)
    gnorm, finite = clean[-1], ok[-1]
    nonfinite, layer_nonfinite, scaler_skip = 1.0 - finite, has - ok, None
    if scaler_active is not None:  # the scaler's skip is not a non-finite step of the run's own
        scaler_skip = nonfinite * scaler_active
        nonfinite = nonfinite - scaler_skip
        layer_nonfinite = layer_nonfinite * (1.0 - scaler_skip)

    s["acc_sum"] = s["acc_sum"] + xp.stack([clean, ok, layer_nonfinite, xp.asfloat(clean == 0.0) * ok])
    s["acc_max"] = xp.maximum(s["acc_max"], clean)
    s["acc_min"] = xp.where(ok_mask, xp.minimum(s["acc_min"], clean), s["acc_min"])
    s["acc_last"] = norms * has

    spike, explosion, jump, overflow, mean, sigma = _track(s, gnorm, finite, xp, tracker, scaler_skip)

    # Clipping policy; its state only moves on finite steps.
    n = len(POLICY_PREFIX)
    pol_fields = {k[n:]: v for k, v in s.items() if k.startswith(POLICY_PREFIX)}
    pol_state = state_like(policy.init(), pol_fields)
    threshold, new_pol = policy.update(pol_state, gnorm, Signals(spike, explosion, mean, sigma), xp)
    for k, v in state_fields(new_pol).items():
        s[POLICY_PREFIX + k] = xp.where(finite > 0, v, pol_fields[k])
    clip = finite * xp.asfloat(gnorm > threshold)
    scale = xp.where(clip > 0, threshold / (gnorm + 1e-6), 1.0)
    s["threshold"] = xp.where(finite > 0, threshold, s["threshold"])
    latch = latch_key(policy)
    if latch is not None:  # a latch also closes on an overflow right after a spike (a skipped step)
        s[latch] = xp.maximum(s[latch], overflow)

    index = s["acc_steps"]
    events = xp.stack([nonfinite, spike, explosion])
    s["acc_first"] = xp.where((events > 0) & (s["acc_first"] < 0), index, s["acc_first"])
    s["acc_count"] = s["acc_count"] + xp.stack([clip, spike, explosion])
    s["acc_max_jump"] = xp.maximum(s["acc_max_jump"], jump)
    s["acc_scale_min"] = xp.minimum(s["acc_scale_min"], scale)
    s["acc_steps"] = index + 1.0
    if scaler_skip is not None:
        s["acc_scaler_skips"] = s["acc_scaler_skips"] + scaler_skip
    if "trace" in s:  # (states saved before the trace existed have none)
        flags = nonfinite * FLAG_NONFINITE + clip * FLAG_CLIPPED + spike * FLAG_SPIKE + explosion * FLAG_EXPLOSION
        if scaler_skip is not None:
            flags = flags + scaler_skip * FLAG_SCALER_SKIP
        row = xp.stack([norms[-1], s["threshold"], scale, flags])
        s["trace"] = xp.concat([s["trace"][1:], row[None]])
    return scale, finite, s


def waited_steps(state: Mapping[str, Any], layer_sq: np.ndarray, has_grad: np.ndarray, policy: ClipPolicy,
                 tracker: TrackerConfig = TrackerConfig()) -> dict[str, Any]:
    """``device_step`` for k steps at once, in numpy: ``layer_sq`` and ``has_grad`` are (k, L), one
    row per step, oldest first. Only for steps whose verdict was given without the state
    (``ClipPolicy.verdict_without_state``: on each of them the policy leaves its state as it was).
    The new state is the one k calls of ``device_step`` with ``gradguard.ops.fast_numpy_ops`` give,
    bit for bit: the per-layer work runs once on the (k, L) rows, in the same order of float32
    operations; the tracker, which carries from step to step, runs step by step. (Under numpy 2's
    promotion rules, NEP 50. numpy 1.x computes a float32 scalar met by a Python float in float64,
    so there the two may differ in the last bits.)"""
    from gradguard.ops import fast_numpy_ops as xp

    f32 = np.float32
    s = dict(state)
    k = layer_sq.shape[0]
    sq = np.concatenate([layer_sq, layer_sq.sum(axis=1, dtype=f32)[:, None]], axis=1)
    has = np.concatenate([has_grad, np.ones((k, 1), f32)], axis=1)
    norms = np.sqrt(sq)
    ok_mask = (has > 0) & np.isfinite(norms)
    ok = ok_mask.astype(f32)
    clean = np.where(ok_mask, norms, f32(0.0))
    zero = (clean == 0.0).astype(f32) * ok
    rows = np.stack([clean, ok, has - ok, zero], axis=1)
    acc_sum = s["acc_sum"]
    for i in range(k):  # (added one step after the other, as device_step adds them)
        acc_sum = acc_sum + rows[i]
    s["acc_sum"] = acc_sum
    s["acc_max"] = np.maximum(s["acc_max"], clean.max(axis=0))
    s["acc_min"] = np.minimum(s["acc_min"], np.where(ok_mask, clean, f32(INF)).min(axis=0))
    s["acc_last"] = norms[-1] * has[-1]

    gnorm, finite = clean[:, -1], ok[:, -1]
    signals = np.zeros((6, k), f32)  # spike, explosion, jump, overflow, level, spread
    for i in range(k):
        signals[:, i] = _track(s, gnorm[i], finite[i], xp, tracker)
    spike, explosion, jump, overflow, level, spread = signals
    n = len(POLICY_PREFIX)
    pol_fields = {key[n:]: v for key, v in s.items() if key.startswith(POLICY_PREFIX)}
    threshold, _ = policy.update(state_like(policy.init(), pol_fields), gnorm,
                                 Signals(spike, explosion, level, spread), xp)
    threshold = np.broadcast_to(np.asarray(threshold, f32), (k,))
    clip = finite * (gnorm > threshold).astype(f32)
    scale = np.where(clip > 0, threshold / (gnorm + f32(1e-6)), f32(1.0)).astype(f32)
    # the threshold in force after each step: a non-finite step keeps the one before it
    last_finite = np.maximum.accumulate(np.where(finite > 0, np.arange(k), -1))
    in_force = np.where(last_finite >= 0, threshold[np.maximum(last_finite, 0)], s["threshold"]).astype(f32)
    s["threshold"] = in_force[-1]
    latch = latch_key(policy)
    if latch is not None:
        s[latch] = xp.maximum(s[latch], overflow.max())

    events = np.stack([1.0 - finite, spike, explosion])
    index = s["acc_steps"] + np.arange(k, dtype=f32)
    seen = events > 0
    first = np.where(seen.any(axis=1), index[seen.argmax(axis=1)], f32(-1.0))
    s["acc_first"] = np.where(s["acc_first"] < 0, first, s["acc_first"]).astype(f32)
    s["acc_count"] = s["acc_count"] + np.stack([clip, spike, explosion]).sum(axis=1, dtype=f32)
    s["acc_max_jump"] = xp.maximum(s["acc_max_jump"], jump.max())
    s["acc_scale_min"] = xp.minimum(s["acc_scale_min"], scale.min())
    s["acc_steps"] = s["acc_steps"] + f32(k)
    if "trace" in s:
        flags = (1.0 - finite) * FLAG_NONFINITE + clip * FLAG_CLIPPED + spike * FLAG_SPIKE + explosion * FLAG_EXPLOSION
        trace_rows = np.stack([norms[:, -1], in_force, scale, flags], axis=1).astype(f32)
        size = s["trace"].shape[0]
        s["trace"] = np.concatenate([s["trace"][min(k, size):], trace_rows[max(0, k - size):]])
    return s


@dataclasses.dataclass
class WindowStats:
    """Everything measured between two log steps, read from the device once, as numpy.

    ``first_step``..``last_step`` are the optimizer steps covered (inclusive). Per-layer arrays follow
    the layer order. Norms are of the raw gradients, before clipping.
    """

    first_step: int
    last_step: int
    steps: int
    layer_norm_mean: np.ndarray  # over steps where the layer had a finite gradient
    layer_norm_min: np.ndarray
    layer_norm_max: np.ndarray
    layer_norm_last: np.ndarray
    layer_steps: np.ndarray  # steps where the layer had a finite gradient
    layer_nonfinite: np.ndarray
    layer_zero: np.ndarray  # steps where the layer's whole gradient was exactly zero
    global_norm_mean: float
    global_norm_min: float
    global_norm_max: float
    global_norm_last: float
    nonfinite_steps: int
    first_nonfinite_step: int | None
    clipped_steps: int
    min_scale: float
    spikes: int
    first_spike_step: int | None
    explosions: int  # steps that confirmed an explosion (see TrackerConfig)
    first_explosion_step: int | None
    max_spike_run: int  # longest run of consecutive elevated steps holding a spike
    max_jump: float  # largest log-norm jump above the tracker level (natural log)
    tracker_level: float  # exp of the tracker's log level
    threshold: float  # the clip threshold in force (inf when not clipping)
    policy_state: dict[str, float]
    # Every optimizer step of the window (the last ``trace_size`` of them when the window is
    # longer), oldest first: rows of (raw global norm, clip threshold in force, scale applied,
    # flags: FLAG_* bits). ``trace_first_step`` is the optimizer step of the first row.
    trace: np.ndarray | None = None
    trace_first_step: int | None = None
    # Non-finite steps a loss scaler (fp16's GradScaler) skipped itself: not in the non-finite
    # counts above (``device_step``'s ``scaler_active``).
    loss_scale_skipped: int = 0

    @classmethod
    def from_state(cls, state: Mapping[str, Any], last_step: int) -> "WindowStats":
        st = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
        steps = int(round(float(st["acc_steps"])))
        first = last_step - steps + 1
        acc = st["acc_sum"]
        lsteps = acc[OK_STEPS, :-1]
        finite_steps = int(round(acc[OK_STEPS, -1]))
        scaler_skips = int(round(float(st["acc_scaler_skips"])))

        def step_of(i):
            v = float(st["acc_first"][i])
            return None if v < 0 else first + int(round(v))

        def per_layer(values):
            return np.where(lsteps > 0, values, np.nan)

        trace = trace_first = None
        if "trace" in st and steps > 0:
            kept = min(steps, len(st["trace"]))
            trace = st["trace"][len(st["trace"]) - kept:].copy()
            trace_first = last_step - kept + 1
        return cls(
            trace=trace,
            trace_first_step=trace_first,
            first_step=first,
            last_step=last_step,
            steps=steps,
            layer_norm_mean=per_layer(acc[SUM_NORM, :-1] / np.maximum(lsteps, 1)),
            layer_norm_min=per_layer(st["acc_min"][:-1]),
            layer_norm_max=per_layer(st["acc_max"][:-1]),
            layer_norm_last=st["acc_last"][:-1],
            layer_steps=lsteps.astype(np.int64),
            layer_nonfinite=acc[NONFINITE, :-1].astype(np.int64),
            layer_zero=acc[ZERO, :-1].astype(np.int64),
            global_norm_mean=float(acc[SUM_NORM, -1]) / finite_steps if finite_steps else math.nan,
            global_norm_min=float(st["acc_min"][-1]) if finite_steps else math.nan,
            global_norm_max=float(st["acc_max"][-1]) if finite_steps else math.nan,
            global_norm_last=float(st["acc_last"][-1]),
            nonfinite_steps=steps - finite_steps - scaler_skips,
            loss_scale_skipped=scaler_skips,
            first_nonfinite_step=step_of(FIRST_NONFINITE),
            clipped_steps=int(round(float(st["acc_count"][CLIPPED]))),
            min_scale=float(st["acc_scale_min"]),
            spikes=int(round(float(st["acc_count"][SPIKES]))),
            first_spike_step=step_of(FIRST_SPIKE),
            explosions=int(round(float(st["acc_count"][EXPLOSIONS]))),
            first_explosion_step=step_of(FIRST_EXPLOSION),
            max_spike_run=int(round(float(st["acc_max_run"]))),
            max_jump=float(st["acc_max_jump"]),
            tracker_level=math.exp(float(st["trk_mean"])) if float(st["trk_count"]) > 0 else math.nan,
            threshold=float(st["threshold"]),
            policy_state={k[len(POLICY_PREFIX):]: float(v) for k, v in st.items()
                          if k.startswith(POLICY_PREFIX) and v.ndim == 0},
        )


@dataclasses.dataclass
class Snapshot:
    """Extra per-layer measurements an adapter takes on a log step only (numpy, layer order).

    Any field may be ``None`` when the adapter cannot measure it.
    """

    norm: np.ndarray | None = None  # L2 norm of this step's gradient
    rms: np.ndarray | None = None
    max_abs: np.ndarray | None = None
    zero_frac: np.ndarray | None = None
    weight_norm: np.ndarray | None = None
    weight_rms: np.ndarray | None = None
    update_norm: np.ndarray | None = None  # norm of what the optimizer applied this step
    dead_units: Sequence[np.ndarray | None] | None = None  # per layer: bool per unit, zero gradient
    saturation: Mapping[str, float] | None = None  # activation-module name -> saturated fraction
    temporal: Mapping[str, np.ndarray] | None = None  # recurrent module -> gradient RMS per time step
    histograms: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None  # layer -> (counts, edges)
