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
    min_steps: int = 10  # a condition must hold over this many optimizer steps to be a finding
    dead_fraction: float = 0.5  # at least this share of a layer's units dead
    dead_snapshots: int = 3  # consecutive log steps on which a unit's gradient was exactly zero
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
    """Early-layer collapse from the depth profile (window-mean RMS per layer, forward order)."""
    numel = np.array([l.numel for l in layers], dtype=np.float64)
    rms = window.layer_norm_mean / np.sqrt(numel)
    # Layers with an exactly zero gradient are the dead detector's; layers without one are ignored.
    valid = np.flatnonzero((window.layer_steps > 0) & np.isfinite(rms) & (rms > 0))
    holds = False
    if len(valid) >= 2:
        later = valid[len(valid) // 2:]
        ref = float(np.max(rms[later]))
        ratio = rms[valid] / ref
        earlier = valid[: max(1, len(valid) // 2)]
        collapsed = [i for i, r in zip(valid, ratio) if i in set(earlier) and r < cfg.vanishing_ratio]
        holds = bool(collapsed) and collapsed[0] == valid[0]
    if not holds:
        state["steps"] = 0
        return None
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


# --------------------------------------------------------------------------------------- exploding

def exploding(layers: Sequence[LayerInfo], window: WindowStats, snapshot: Snapshot | None,
              facts: ModelFacts, cfg: DetectorConfig, state: dict, policy_name: str,
              clip_enabled_now: bool) -> Candidate | None:
    """A spike or growth an order of magnitude above the run's own level, or updates that dwarf the
    weights they change."""
    reasons, evidence, severity, step = [], {}, "warning", None
    if window.spikes > 0:
        factor = math.exp(window.max_jump)
        reasons.append(f"the global gradient norm jumped {factor:.3g}x above its running level "
                       f"({window.spikes} spike step{'s' if window.spikes > 1 else ''})")
        evidence.update(spikes=window.spikes, max_jump_factor=factor, running_level=window.tracker_level,
                        global_norm_max=window.global_norm_max)
        step = window.first_spike_step
        if factor >= 1e3 or window.nonfinite_steps > 0:
            severity = "critical"
    update_ratio = None
    if snapshot is not None and snapshot.update_norm is not None and snapshot.weight_norm is not None:
        u, w = np.nan_to_num(snapshot.update_norm), np.nan_to_num(snapshot.weight_norm)
        if w.sum() > 0:
            update_ratio = float(math.sqrt((u ** 2).sum()) / math.sqrt((w ** 2).sum()))
            evidence["update_to_weight_ratio"] = update_ratio
            if update_ratio > cfg.update_ratio:
                reasons.append(f"the optimizer's update was {update_ratio:.3g}x the size of the weights it changed")
                severity = "critical"
                step = window.last_step if step is None else step
    if not reasons:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        swing = window.layer_norm_max / window.layer_norm_min  # how far each layer's norm moved
    grew = np.flatnonzero(np.nan_to_num(swing, nan=0.0, posinf=np.inf) >= 10.0)
    names = _names(layers, grew) if len(grew) else tuple(l.name for l in layers)
    lr_hint = update_ratio is not None and update_ratio > cfg.update_ratio
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
