"""Detectors: pure functions from one window of statistics (plus their own small state) to a
candidate finding. They run on log steps, on the host, in numpy.

They judge the physics, not a few models' numbers:

* vanishing is orders of magnitude: the early layers' gradient RMS sits ``vanishing_ratio`` (1e-4)
  or further below the later layers' for the whole window. Healthy nets, deep normalized CNNs
  included, stay within about three orders of magnitude; a factor of 2 to 10 means nothing.
* exploding is growth over time (the global norm jumping an order of magnitude above the run's own
  running level) or updates that dwarf the weights they change, measured on what the optimizer
  actually applied. A large gradient alone is not an explosion: Adam turns it into a small step.
* dead units have a gradient of exactly zero on every sampled step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from gradguard.findings import REMEDIES
from gradguard.layers import PLAIN_RNN, SATURATING, LayerInfo, ModelFacts
from gradguard.stats import Snapshot, WindowStats


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    vanishing_ratio: float = 1e-4  # early-layer RMS / later-layer RMS below this: vanishing
    vanishing_critical_ratio: float = 1e-8
    vanishing_median_ratio: float = 1e-2  # ...and this far below the later half's median layer
    min_steps: int = 10  # a condition must hold over this many optimizer steps to be a finding
    dead_fraction: float = 0.5  # at least this share of a layer's units dead
    dead_snapshots: int = 3  # consecutive log steps on which a unit's gradient was exactly zero
    update_ratio_warning: float = 0.3  # one step changed the weights by a third of their norm (healthy: 0.1-5%)
    update_ratio: float = 1.0  # update norm / weight norm above this: the update dwarfs the weights
    saturation_fraction: float = 0.5  # share of activations in the flat tails
    small_init_gain: float = 0.25  # weight RMS * sqrt(fan_in) below this: initialised too small

    def __post_init__(self):
        for name in ("vanishing_ratio", "vanishing_critical_ratio"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if not 0.0 < self.dead_fraction <= 1.0:
            raise ValueError(f"dead_fraction must be in (0, 1], got {self.dead_fraction!r}")
        if self.min_steps < 1 or self.dead_snapshots < 1:
            raise ValueError("min_steps and dead_snapshots must be >= 1")


@dataclasses.dataclass
class Candidate:
    """What a detector concluded from this window; the monitor turns it into a ``Finding``."""

    kind: str
    step: int
    layers: tuple[str, ...]
    severity: str
    message: str
    remedies: tuple[str, ...]
    evidence: dict[str, Any]
    cause: str | None = None


def _names(layers: Sequence[LayerInfo], idx) -> tuple[str, ...]:
    return tuple(layers[i].name for i in idx)


def _short(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _init_gain(layers: Sequence[LayerInfo], snapshot: Snapshot | None) -> float | None:
    """Median of weight RMS * sqrt(fan_in): ~0.6-1.4 for default, Glorot and He init."""
    if snapshot is None or snapshot.weight_rms is None:
        return None
    gains = [snapshot.weight_rms[i] * math.sqrt(l.fan_in) for i, l in enumerate(layers)
             if l.fan_in and l.units and np.isfinite(snapshot.weight_rms[i])]
    return float(np.median(gains)) if gains else None


# --------------------------------------------------------------------------------------- vanishing

def vanishing(layers: Sequence[LayerInfo], window: WindowStats, snapshot: Snapshot | None,
              facts: ModelFacts, cfg: DetectorConfig, state: dict) -> Candidate | None:
    """Early-layer collapse from the depth profile (window-mean RMS per layer, forward order), or,
    for recurrent modules, through time (``snapshot.temporal``)."""
    numel = np.array([l.numel for l in layers], dtype=np.float64)
    rms = window.layer_norm_mean / np.sqrt(numel)
    # Layers with an exactly zero gradient are the dead detector's; layers without one are ignored.
    # Embeddings are lookups, not depth: only the rows of this batch's tokens get a gradient, so
    # their RMS over the whole table is diluted by the vocabulary, not by vanishing.
    lookup = np.array(["embedding" in l.kind.lower() for l in layers])
    valid = np.flatnonzero((window.layer_steps > 0) & np.isfinite(rms) & (rms > 0) & ~lookup)
    holds = False
    if len(valid) >= 2:
        later = valid[len(valid) // 2:]
        ref = float(np.max(rms[later]))
        ratio = rms[valid] / ref
        earlier = valid[: max(1, len(valid) // 2)]
        collapsed = [i for i, r in zip(valid, ratio) if i in set(earlier) and r < cfg.vanishing_ratio]
        # The gradient must shrink going back through the network, not merely sit far below one
        # large head (a converged classifier's last layer can dwarf every other layer).
        below_median = rms[valid[0]] < cfg.vanishing_median_ratio * float(np.median(rms[later]))
        holds = bool(collapsed) and collapsed[0] == valid[0] and below_median
        if holds and snapshot is not None and snapshot.dead_units is not None:
            # Starved through dead ReLUs (in the collapse or right after it): the dead detector's finding.
            after = [i for i in valid if i > collapsed[-1]][:1]
            holds = not any(snapshot.dead_units[i] is not None and np.mean(snapshot.dead_units[i]) >= cfg.dead_fraction
                            for i in list(collapsed) + after)
    if not holds:
        state["steps"] = 0
        return vanishing_through_time(window, snapshot, facts, cfg, state)
    state["steps"] = state.get("steps", 0) + window.steps
    if state["steps"] < cfg.min_steps:
        return None

    first_ratio = float(ratio[0])
    orders = -math.log10(first_ratio)
    log_rms = np.log10(rms[valid])
    slope = float(np.polyfit(np.arange(len(valid)), log_rms, 1)[0]) if len(valid) >= 3 else math.nan
    names = _names(layers, collapsed)
    gain = _init_gain(layers, snapshot)
    saturating = sorted(facts.saturating | {l.activation.lower() for l in layers
                                            if l.activation and l.activation.lower() in SATURATING})
    causes, remedies = [], []
    if saturating:
        causes.append(f"saturating {'/'.join(saturating)} activations (their slope is at most "
                      f"{'0.25' if 'sigmoid' in saturating else '1'} and near 0 in the tails)")
        remedies += [REMEDIES["relu"], REMEDIES["init_glorot_he"]]
    if gain is not None and gain < cfg.small_init_gain:
        causes.append(f"weights initialised too small (median RMS*sqrt(fan_in) = {gain:.2g}, "
                      "Glorot/He give about 1)")
        remedies.append(REMEDIES["init_glorot_he"])
    if facts.recurrent & PLAIN_RNN:
        causes.append("a plain RNN")
        remedies.append(REMEDIES["lstm_gru"])
    if len(valid) >= 4 and slope > 0:
        if not facts.normalization:
            causes.append(f"depth without skip paths or normalization (the gradient shrinks about "
                          f"{10 ** slope:.2g}x per layer going back)")
        remedies += [REMEDIES["residual"], REMEDIES["normalization"]]
    remedies += [REMEDIES["normalization"], REMEDIES["residual"], REMEDIES["relu"]]
    cause = "; ".join(causes) if causes else None
    severity = "critical" if first_ratio < cfg.vanishing_critical_ratio else "warning"
    message = (f"Vanishing gradients: the early layers {_short(names)} get gradients {orders:.1f} orders "
               f"of magnitude smaller than the later layers, so they barely learn"
               + (f"; likely cause: {cause}." if cause else "."))
    evidence = {
        "first_to_last_rms_ratio": first_ratio,
        "orders_of_magnitude": orders,
        "rms_by_layer": {layers[i].name: float(rms[i]) for i in valid},
        "log10_rms_per_layer_slope": slope,
        "steps": state["steps"],
    }
    if gain is not None:
        evidence["init_gain"] = gain
    return Candidate("vanishing", window.last_step, names, severity, message, tuple(dict.fromkeys(remedies)), evidence, cause)


def vanishing_through_time(window: WindowStats, snapshot: Snapshot | None, facts: ModelFacts,
                           cfg: DetectorConfig, state: dict) -> Candidate | None:
    """A recurrence is one module, so the depth profile cannot see it; the adapter measures the
    gradient reaching each time step's input on log steps. The first time step getting
    ``vanishing_ratio`` of the last one's, on two log steps in a row, is vanishing through time."""
    temporal = snapshot.temporal if snapshot is not None and snapshot.temporal else {}
    streak = state.setdefault("temporal_streak", {})
    hot = {}
    for name, per_t in temporal.items():
        per_t = np.asarray(per_t, dtype=np.float64)
        first, last = float(per_t[0]), float(per_t[-1])
        ratio = first / last if last > 0 else math.nan
        holds = len(per_t) >= 2 and last > 0 and ratio < cfg.vanishing_ratio
        streak[name] = streak.get(name, 0) + 1 if holds else 0
        if streak[name] >= 2:
            k = min(20, len(per_t))  # the per-step factor where the profile has not underflowed
            a = float(per_t[-k])
            per_step = (a / last) ** (1.0 / (k - 1)) if a > 0 and k > 1 else 0.0
            hot[name] = (ratio, len(per_t), per_step)
    if not hot:
        return None
    name, (ratio, steps, per_step) = min(hot.items(), key=lambda kv: kv[1][0])
    orders = -math.log10(ratio) if ratio > 0 else math.inf
    plain = bool(facts.recurrent & PLAIN_RNN)
    cause = (f"a plain RNN over {steps} time steps" if plain else f"a recurrence over {steps} time steps") + (
        f": the gradient shrinks about {1 / per_step:.2g}x per step going back in time" if per_step > 0 else "")
    remedies = ((REMEDIES["lstm_gru"],) if plain else ()) + (
        "Shorten the sequences (truncated backpropagation through time) or add attention/skip connections "
        "across time.", REMEDIES["init_glorot_he"])
    size = f"{orders:.1f} orders of magnitude smaller than" if math.isfinite(orders) else "exactly 0 (underflow), against"
    message = (f"Vanishing gradients through time: in {name} the gradient reaching the first of {steps} time steps "
               f"is {size} the last, so early inputs barely influence learning; likely cause: {cause}.")
    severity = "critical" if not ratio >= cfg.vanishing_critical_ratio else "warning"
    evidence = {"first_to_last_time_step_ratio": ratio, "orders_of_magnitude": orders if math.isfinite(orders) else None,
                "time_steps": steps, "per_step_factor": per_step, "modules": {n: h[0] for n, h in hot.items()}}
    return Candidate("vanishing", window.last_step, tuple(hot), severity, message, remedies, evidence, cause)


# --------------------------------------------------------------------------------------- exploding

def exploding(layers: Sequence[LayerInfo], window: WindowStats, snapshot: Snapshot | None,
              facts: ModelFacts, cfg: DetectorConfig, state: dict, policy_name: str,
              clip_enabled_now: bool) -> Candidate | None:
    """Growth that feeds on itself, judged from the tracker's confirmed explosions (a spike held
    over consecutive steps, an enormous one, or one that overflowed), or an update that rewrote the
    weights. A lone spike whose neighbours are back at the level is the heavy tail of per-batch
    gradients: ``clip='auto'`` clips that step, but it is not a finding."""
    reasons, evidence, severity, step = [], {}, "warning", None
    if window.spikes > 0:
        evidence.update(spikes=window.spikes, max_jump_factor=math.exp(window.max_jump),
                        running_level=window.tracker_level, global_norm_max=window.global_norm_max,
                        longest_elevated_run=window.max_spike_run)
    if window.explosions > 0:
        factor = math.exp(window.max_jump)
        how = (f"stayed far above it for {window.max_spike_run} consecutive steps" if window.max_spike_run >= 2
               else "then overflowed to NaN/Inf" if window.nonfinite_steps > 0 else "in a single step")
        reasons.append(f"the global gradient norm jumped {factor:.3g}x above its running level and {how}")
        step = window.first_explosion_step
        if factor >= 1e3 or window.nonfinite_steps > 0:
            severity = "critical"
    update_ratio = None
    if snapshot is not None and snapshot.update_norm is not None and snapshot.weight_norm is not None:
        u, w = np.nan_to_num(snapshot.update_norm), np.nan_to_num(snapshot.weight_norm)
        if w.sum() > 0:
            update_ratio = float(math.sqrt((u ** 2).sum()) / math.sqrt((w ** 2).sum()))
            evidence["update_to_weight_ratio"] = update_ratio
            evidence["update_measured_at_step"] = window.last_step
            if update_ratio > cfg.update_ratio_warning:
                reasons.append(f"one optimizer step changed the weights by {update_ratio:.3g}x their norm")
                if update_ratio > cfg.update_ratio:
                    severity = "critical"
                step = window.last_step if step is None else step
    if not reasons:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        swing = window.layer_norm_max / window.layer_norm_min  # how far each layer's norm moved
    grew = np.flatnonzero(np.nan_to_num(swing, nan=0.0, posinf=np.inf) >= 10.0)
    names = _names(layers, grew) if len(grew) else tuple(l.name for l in layers)
    lr_hint = update_ratio is not None and update_ratio > cfg.update_ratio_warning
    remedies = [REMEDIES["clipping"], REMEDIES["lower_lr"], REMEDIES["init_smaller"], REMEDIES["normalization"]]
    if lr_hint:
        remedies.insert(0, remedies.pop(1))
    if policy_name == "auto" and clip_enabled_now:
        tail = " Clipping is now on (clip='auto')."
    elif policy_name == "none":
        tail = " Gradients are not being clipped (clip=None)."
    else:
        tail = ""
    message = "Exploding gradients: " + " and ".join(reasons) + "." + tail
    cause = ("a learning rate too large for these weights" if lr_hint else
             "a positive feedback between large updates and larger gradients (learning rate, initialisation)")
    return Candidate("exploding", int(step), names, severity, message, tuple(remedies), evidence, cause)


# --------------------------------------------------------------------------------------- nonfinite

def nonfinite(layers: Sequence[LayerInfo], window: WindowStats, facts: ModelFacts, skipping: bool,
              after_growth: bool, state: dict) -> Candidate | None:
    if window.nonfinite_steps == 0:
        return None
    state["total"] = state.get("total", 0) + window.nonfinite_steps
    state.setdefault("first", window.first_nonfinite_step)
    idx = np.flatnonzero(window.layer_nonfinite > 0)
    names = _names(layers, idx)
    share = window.nonfinite_steps / max(window.steps, 1)
    severity = "critical" if (not skipping or share > 0.5) else "warning"
    action = ("they were skipped: the weights and optimizer state are untouched" if skipping
              else "they reached the weights (skip_nonfinite=False)")
    message = (f"Non-finite gradients (NaN/Inf) on {state['total']} step{'s' if state['total'] > 1 else ''} "
               f"so far, first at step {state['first']}, {window.nonfinite_steps} of the last {window.steps}; "
               f"{action}.")
    if after_growth:
        cause = "exploding gradients overflowed"
        remedies = (REMEDIES["clipping"], REMEDIES["lower_lr"], REMEDIES["mixed_precision"], REMEDIES["check_data"])
    else:
        cause = "a NaN/Inf in the data, the loss, or a numerical overflow"
        remedies = (REMEDIES["check_data"], REMEDIES["lower_lr"], REMEDIES["mixed_precision"], REMEDIES["clipping"])
    evidence = {"nonfinite_steps": state["total"], "first_nonfinite_step": state["first"],
                "window_nonfinite_steps": window.nonfinite_steps, "window_steps": window.steps,
                "layers_nonfinite_steps": {layers[i].name: int(window.layer_nonfinite[i]) for i in idx}}
    return Candidate("nonfinite", int(window.first_nonfinite_step), names, severity, message, remedies,
                     evidence, cause)


# --------------------------------------------------------------------------------------- dead

def dead(layers: Sequence[LayerInfo], window: WindowStats, snapshot: Snapshot | None, facts: ModelFacts,
         cfg: DetectorConfig, state: dict) -> Candidate | None:
    """Units (or whole layers) whose gradient stays exactly zero.

    Whole layers: from every step of the window. Units: from the per-unit zero masks of the
    log-step snapshots, a unit counting as dead after ``dead_snapshots`` zero snapshots in a row."""
    streaks: dict[str, np.ndarray] = state.setdefault("streaks", {})
    whole = state.setdefault("whole", {})
    fractions: dict[str, float] = {}
    for i, layer in enumerate(layers):
        if window.layer_steps[i] == 0 and window.layer_nonfinite[i] == 0:
            continue  # no gradient at all (frozen or unused): neither dead nor alive
        all_zero = window.layer_steps[i] > 0 and window.layer_zero[i] == window.layer_steps[i]
        whole[layer.name] = whole.get(layer.name, 0) + window.steps if all_zero else 0
        if whole[layer.name] >= cfg.min_steps:
            fractions[layer.name] = 1.0
            continue
        if layer.units and snapshot is not None and snapshot.dead_units is not None:
            mask = snapshot.dead_units[i]
            if mask is None:
                continue
            prev = streaks.get(layer.name)
            cur = np.asarray(mask, dtype=np.int64)
            streaks[layer.name] = cur if prev is None or prev.shape != cur.shape else (prev + 1) * cur
            dead_share = float(np.mean(streaks[layer.name] >= cfg.dead_snapshots))
            if dead_share >= cfg.dead_fraction:
                fractions[layer.name] = dead_share
    if not fractions:
        return None
    names = tuple(l.name for l in layers if l.name in fractions)
    severity = "critical" if any(f >= 0.999 for f in fractions.values()) else "warning"
    relu = not facts.saturating
    message = (f"Dead units: {_short([f'{n} ({fractions[n]:.0%})' for n in names])} of units get exactly "
               "zero gradient on every sampled step, so they never learn.")
    remedies = (REMEDIES["leaky"], REMEDIES["lower_lr"], REMEDIES["bias_init"], REMEDIES["init_glorot_he"])
    cause = "ReLU units switched off for every input (a large update or negative bias)" if relu else \
        "units stuck in a flat region of their activation"
    return Candidate("dead", window.last_step, names, severity, message, remedies,
                     {"dead_fraction": fractions}, cause)


# --------------------------------------------------------------------------------------- saturated

def saturated(window: WindowStats, snapshot: Snapshot | None, cfg: DetectorConfig,
              state: dict) -> Candidate | None:
    """Sigmoid/tanh outputs stuck in their flat tails on consecutive log steps."""
    if snapshot is None or not snapshot.saturation:
        return None
    streak: dict[str, int] = state.setdefault("streak", {})
    hot = {}
    for name, frac in snapshot.saturation.items():
        streak[name] = streak.get(name, 0) + 1 if frac >= cfg.saturation_fraction else 0
        if streak[name] >= 2:
            hot[name] = float(frac)
    if not hot:
        return None
    names = tuple(hot)
    message = (f"Saturated activations: {_short([f'{n} ({hot[n]:.0%})' for n in names])} of outputs sit in the "
               "flat tails of sigmoid/tanh, where the gradient is nearly zero.")
    remedies = (REMEDIES["relu"], REMEDIES["init_glorot_he"], REMEDIES["normalization"], REMEDIES["lower_lr"])
    return Candidate("saturated", window.last_step, names, "warning", message, remedies,
                     {"saturated_fraction": hot}, "pre-activations too large for sigmoid/tanh")
