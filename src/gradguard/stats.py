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

from gradguard.clipping import ClipPolicy, Signals

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """The spike tracker: a step is a spike when its global norm is at least ``spike_factor`` times
    the run's running level *and* (after ``warmup_steps``) ``spike_z`` spreads above it, both in
    log space, so the test is scale-free and adapts to how noisy this run's gradients are."""

    alpha: float = 0.9  # ~10-step memory: slow healthy growth is followed, a jump within a few steps is not
    spike_factor: float = 10.0
    spike_z: float = 3.0
    warmup_steps: int = 10
    min_steps: int = 2  # steps seen before anything can be a spike
    sigma_floor: float = 0.1  # log-space spread never assumed below ~10%

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not self.spike_factor > 1.0:
            raise ValueError(f"spike_factor must be > 1, got {self.spike_factor!r}")


# Keys of the per-window accumulators; everything else in the state persists across windows.
_LAYER_ACC = ("acc_layer_sum", "acc_layer_max", "acc_layer_min", "acc_layer_steps", "acc_layer_nonfinite",
              "acc_layer_zero", "acc_layer_last")
_SCALAR_ACC = ("acc_steps", "acc_nonfinite", "acc_clipped", "acc_spikes", "acc_first_spike",
               "acc_first_nonfinite", "acc_max_jump", "acc_gnorm_sum", "acc_gnorm_max", "acc_gnorm_min",
               "acc_gnorm_last", "acc_scale_min")


def _window_init(n_layers: int) -> dict[str, np.ndarray]:
    zeros = np.zeros(n_layers, np.float32)
    state = {k: zeros.copy() for k in _LAYER_ACC}
    state["acc_layer_min"] = np.full(n_layers, INF, np.float32)
    for k in _SCALAR_ACC:
        state[k] = np.float32(0.0)
    state["acc_first_spike"] = np.float32(-1.0)
    state["acc_first_nonfinite"] = np.float32(-1.0)
    state["acc_gnorm_min"] = np.float32(INF)
    state["acc_scale_min"] = np.float32(1.0)
    return state


def init_state(n_layers: int, policy: ClipPolicy) -> dict[str, np.ndarray]:
    """The whole device state as float32 numpy values; adapters move it to their device."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers!r}")
    state = _window_init(n_layers)
    state.update({"trk_count": np.float32(0), "trk_mean": np.float32(0), "trk_var": np.float32(0),
                  "threshold": np.float32(INF)})
    for k, v in policy.init().items():
        state["clip_" + k] = np.float32(v)
    return state


def reset_window(n_layers: int) -> dict[str, np.ndarray]:
    """Fresh accumulator values (the subset of the state that starts again on each log step)."""
    return _window_init(n_layers)


def window_keys() -> tuple[str, ...]:
    return _LAYER_ACC + _SCALAR_ACC


def device_step(state: Mapping[str, Any], layer_sq: Any, has_grad: Any, policy: ClipPolicy, xp,
                tracker: TrackerConfig = TrackerConfig()) -> tuple[Any, Any, dict[str, Any]]:
    """One optimizer step's bookkeeping. ``layer_sq``: per-layer sum of squared gradients (L,);
    ``has_grad``: 1.0 for layers that received a gradient this step, else 0.0 (L,).

    Returns ``(scale, finite, new_state)``: multiply the gradients by ``scale`` (1 when not
    clipping); ``finite`` is 1.0 when every gradient is finite. A non-finite step leaves the
    tracker and the policy untouched.
    """
    s = dict(state)
    norms = xp.sqrt(layer_sq)
    gnorm = xp.sqrt(xp.sum(layer_sq))
    finite = xp.asfloat(xp.isfinite(gnorm))
    ok = has_grad * xp.asfloat(xp.isfinite(norms))
    clean = xp.where(ok > 0, norms, 0.0)
    index = s["acc_steps"]

    # Window accumulators (per layer, then global).
    s["acc_layer_sum"] = s["acc_layer_sum"] + clean
    s["acc_layer_max"] = xp.maximum(s["acc_layer_max"], clean)
    s["acc_layer_min"] = xp.where(ok > 0, xp.minimum(s["acc_layer_min"], clean), s["acc_layer_min"])
    s["acc_layer_steps"] = s["acc_layer_steps"] + ok
    s["acc_layer_nonfinite"] = s["acc_layer_nonfinite"] + has_grad - ok
    s["acc_layer_zero"] = s["acc_layer_zero"] + xp.where(clean == 0.0, ok, 0.0)
    s["acc_layer_last"] = xp.where(has_grad > 0, norms, 0.0)
    clean_g = xp.where(finite > 0, gnorm, 0.0)
    s["acc_gnorm_sum"] = s["acc_gnorm_sum"] + clean_g
    s["acc_gnorm_max"] = xp.maximum(s["acc_gnorm_max"], clean_g)
    s["acc_gnorm_min"] = xp.where(finite > 0, xp.minimum(s["acc_gnorm_min"], clean_g), s["acc_gnorm_min"])
    s["acc_gnorm_last"] = gnorm
    s["acc_nonfinite"] = s["acc_nonfinite"] + 1.0 - finite
    s["acc_first_nonfinite"] = xp.where((finite < 1) & (s["acc_first_nonfinite"] < 0), index,
                                        s["acc_first_nonfinite"])

    # Spike tracker on log(norm): scale-free, so one rule serves every model size.
    count, mean, var = s["trk_count"], s["trk_mean"], s["trk_var"]
    positive = finite * xp.asfloat(clean_g > 0.0)
    x = xp.log(xp.maximum(clean_g, 1e-30))
    sigma = xp.maximum(xp.sqrt(var), tracker.sigma_floor)
    jump = x - mean
    z_ok = xp.asfloat((count < tracker.warmup_steps) | (jump >= tracker.spike_z * sigma))
    spike = positive * xp.asfloat(count >= tracker.min_steps) * xp.asfloat(jump >= math.log(tracker.spike_factor)) * z_ok
    s["acc_spikes"] = s["acc_spikes"] + spike
    s["acc_first_spike"] = xp.where((spike > 0) & (s["acc_first_spike"] < 0), index, s["acc_first_spike"])
    s["acc_max_jump"] = xp.maximum(s["acc_max_jump"], xp.where((positive > 0) & (count >= tracker.min_steps), jump, 0.0))
    # Winsorised EMA: a step beyond spike_z spreads is ingested at that edge and leaves the spread
    # alone, so neither a spike nor a running explosion drags the level up after itself.
    edge = mean + tracker.spike_z * sigma
    capped = xp.asfloat(x > edge) * xp.asfloat(count >= tracker.min_steps)
    seen = xp.where(capped > 0, edge, x)
    weight = xp.minimum(count / (count + 1.0), tracker.alpha)  # running mean first, then the EMA
    new_mean = xp.where(count > 0, weight * mean + (1.0 - weight) * seen, seen)
    new_var = xp.where(count > 0, weight * var + (1.0 - weight) * (seen - new_mean) * (seen - new_mean), 0.0)
    s["trk_mean"] = xp.where(positive > 0, new_mean, mean)
    s["trk_var"] = xp.where((positive > 0) & (capped < 1), new_var, var)
    s["trk_count"] = count + positive

    # Clipping policy; its state only moves on finite steps.
    pol_state = {k[5:]: v for k, v in s.items() if k.startswith("clip_")}
    threshold, new_pol = policy.update(pol_state, clean_g, Signals(spike, mean, sigma), xp)
    for k, v in new_pol.items():
        s["clip_" + k] = xp.where(finite > 0, v, pol_state[k])
    scale = xp.where((finite > 0) & (clean_g > threshold), threshold / (clean_g + 1e-6), 1.0)
    s["threshold"] = xp.where(finite > 0, threshold, s["threshold"])
    s["acc_clipped"] = s["acc_clipped"] + xp.asfloat(scale < 1.0)
    s["acc_scale_min"] = xp.minimum(s["acc_scale_min"], scale)
    s["acc_steps"] = index + 1.0
    return scale, finite, s


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
    max_jump: float  # largest log-norm jump above the tracker level (natural log)
    tracker_level: float  # exp of the tracker's log level
    threshold: float  # the clip threshold in force (inf when not clipping)
    policy_state: dict[str, float]

    @classmethod
    def from_state(cls, state: Mapping[str, Any], last_step: int) -> "WindowStats":
        st = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
        steps = int(round(float(st["acc_steps"])))
        first = last_step - steps + 1
        lsteps = st["acc_layer_steps"]
        finite_steps = steps - int(round(float(st["acc_nonfinite"])))

        def step_of(key):
            v = float(st[key])
            return None if v < 0 else first + int(round(v))

        return cls(
            first_step=first,
            last_step=last_step,
            steps=steps,
            layer_norm_mean=np.where(lsteps > 0, st["acc_layer_sum"] / np.maximum(lsteps, 1), np.nan),
            layer_norm_min=np.where(lsteps > 0, st["acc_layer_min"], np.nan),
            layer_norm_max=np.where(lsteps > 0, st["acc_layer_max"], np.nan),
            layer_norm_last=st["acc_layer_last"],
            layer_steps=lsteps.astype(np.int64),
            layer_nonfinite=st["acc_layer_nonfinite"].astype(np.int64),
            layer_zero=st["acc_layer_zero"].astype(np.int64),
            global_norm_mean=float(st["acc_gnorm_sum"]) / finite_steps if finite_steps else math.nan,
            global_norm_min=float(st["acc_gnorm_min"]) if finite_steps else math.nan,
            global_norm_max=float(st["acc_gnorm_max"]) if finite_steps else math.nan,
            global_norm_last=float(st["acc_gnorm_last"]),
            nonfinite_steps=steps - finite_steps,
            first_nonfinite_step=step_of("acc_first_nonfinite"),
            clipped_steps=int(round(float(st["acc_clipped"]))),
            min_scale=float(st["acc_scale_min"]),
            spikes=int(round(float(st["acc_spikes"]))),
            first_spike_step=step_of("acc_first_spike"),
            max_jump=float(st["acc_max_jump"]),
            tracker_level=math.exp(float(st["trk_mean"])) if float(st["trk_count"]) > 0 else math.nan,
            threshold=float(st["threshold"]),
            policy_state={k[5:]: float(v) for k, v in st.items() if k.startswith("clip_")},
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
    histograms: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None  # layer -> (counts, edges)
