"""Detectors: pure functions from one window of statistics (plus their own small state) to a
candidate finding. They run on log steps, on the host, in numpy. Every threshold that decides a
finding is a ``DetectorConfig`` field, with the physics behind its value.

They judge the physics, not a few models' numbers:

* vanishing is orders of magnitude: the early layers' gradient RMS sits ``vanishing_ratio`` (1e-4)
  or further below the later layers' for the whole window. Healthy nets, deep normalized CNNs
  included, stay within about three orders of magnitude; a factor of 2 to 10 means nothing.
  Through time (recurrent modules) it must persist: the first steps of a net that learns are a phase.
* exploding is growth that feeds on itself and shows in what the optimizer applies: a norm that
  stays far above the run's level, updates that dwarf the weights, an overflow right after a spike,
  or a level rising window after window. A burst that returns by itself is not an explosion, and a
  large gradient alone is not either: Adam turns it into a small step.
* dead units have a gradient of exactly zero for longer than the run's own noise explains, while
  gradient still reaches their layer; zero gradients by design (unrouted experts, unused rows,
  frozen parts) are not death.
* every finding's ``step`` is the optimizer step at which its condition was established.
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
    """Every threshold that decides a finding, with the physics behind its value.

    Counts of "steps" are optimizer steps, never log steps: a finding must not depend on how often
    the user logs (``log_every_n_steps``)."""

    # -- vanishing (depth) --------------------------------------------------------------------------
    # Collapsed sigmoid/tiny-init stacks put their first layer 1e-6..1e-14 below the head; healthy nets,
    # deep BN CNNs whose first layer gets ~170x *more* than the head included, stay within ~3 orders.
    vanishing_ratio: float = 1e-4  # early-layer RMS / largest later-layer RMS below this: vanishing
    vanishing_critical_ratio: float = 1e-8  # 8 orders: the early layers do not learn at all in float32
    # ...and the first layer this far below the later half's *median* layer: the gradient shrinks going
    # back, rather than one large head (a converged classifier's last layer) dwarfing every other layer.
    vanishing_median_ratio: float = 1e-2
    min_steps: int = 10  # a condition must hold over this many optimizer steps (~the tracker's memory)

    # -- vanishing through time (recurrent modules) -------------------------------------------------
    # An LSTM that learns starts with the gradient to its first time step 5 orders under the last one's
    # and clears within a few tens of steps as its gates open (measured: 1e-5 at steps 0-20, 0.5 at step
    # 40). Only a collapse held on every measurement for this many optimizer steps is a finding.
    temporal_min_steps: int = 100
    temporal_min_measurements: int = 2  # ...seen on at least this many log steps (never one batch)

    # -- exploding ------------------------------------------------------------------------------------
    # Healthy runs apply updates of 0.01%..5% of the weights' norm per step (Adam at 1e-3 on He-init
    # weights: ~0.1%). A step that moves the weights by 30% is far outside that; twice in a row (two
    # measurements) it is a learning rate the weights cannot sustain.
    update_ratio_warning: float = 0.3
    update_ratio: float = 1.0  # one update larger than the weights themselves: divergence at once
    # ...or a large one followed by the weights' norm doubling by the next measurement: the update fed on
    # itself (after an ordinary step the total weight norm moves by a few percent, not 2x).
    # The same factor within weight_runaway_steps steps, with the applied update >= explosion_update_growth
    # x the run's quietest, is a divergence too: where the gradient cannot grow (tanh features, a softmax
    # saturating to an exactly zero gradient) the weights still show it (measured: 19 -> 112 in 50 steps).
    weight_growth: float = 2.0
    weight_runaway_steps: int = 50  # ...within this many optimizer steps (a 4%/step runaway doubles in 18)
    # ...or, under clip='auto' with SGD, a step whose gradient was this many times over the update ceiling
    # (the norm at which the step moves the weights by 10%, or the gradient carried on by momentum by 100%):
    # an update that would have been >= 100% of the weights in one step. Healthy SGD runs stay under 0.5x
    # of the ceiling (validation suite); runs explosive from their first step reach 24-1000x.
    ceiling_excess: float = 10.0
    # The spike tracker confirms an excursion from 2 elevated steps, which is right for clipping (it must
    # protect at once) but not for a finding: recurrent nets and large-batch nets late in training show
    # bursts of 2-5 steps of 10-70x that return by themselves. An explosion feeds on itself: the norm
    # stays elevated (>= sqrt(spike_factor) over the pre-excursion level) for this many consecutive steps,
    # about the tracker's memory, during which a real divergence has grown by orders of magnitude.
    explosion_sustain_steps: int = 10
    # ...and it shows in what the optimizer applies: an update measured during the excursion that did not
    # grow at least this much over the run's own typical update (Adam normalises a large gradient into an
    # ordinary step) vetoes it. sqrt(10): SGD's update grows with the gradient, which is elevated >= 3.2x.
    explosion_update_growth: float = 3.0
    # Slow divergence (no single jump; the tracker's level follows it): the global norm grows this much
    # over its lowest level of the run, rising on each of ``divergence_windows`` log windows that span at
    # least ``divergence_min_steps`` steps, while the applied update grows by explosion_update_growth.
    divergence_factor: float = 100.0
    # ...or this much (sqrt(divergence_factor)) when the weights themselves ran away too: their total norm
    # grew ``weight_growth`` (2x) over its lowest value of the run (after the first min_steps). A bounded loss (tanh
    # features, LayerNorm, cross-entropy) caps how far the gradient can grow, so a learning rate that
    # outgrows the weights shows as 10-30x in the gradient and 2-1000x in the weights (measured: a tanh MLP
    # whose SGD lr ramps up after 300 healthy steps: gradient 25x, weights 20x; a Transformer under AdamW:
    # gradient 28x, weights 2.5x as its loss rose). Healthy training moves the total weight norm by a few
    # percent to ~1.5x (weight decay shrinks it), and its gradient does not climb 10x with it.
    divergence_factor_runaway: float = 10.0
    divergence_windows: int = 3
    divergence_min_steps: int = 30

    # -- dead units -----------------------------------------------------------------------------------
    dead_fraction: float = 0.5  # at least this share of a layer's units dead (a few dead ReLUs are normal)
    dead_snapshots: int = 3  # a unit is never judged dead from fewer zero-gradient snapshots than this
    # A unit's gradient is exactly zero on a batch when it is inactive for every sample of it. With a
    # large batch a live unit is almost never silent; with a batch of one, half of the ReLUs are silent
    # on any sample. The streak a unit needs is the one a live unit of this layer (silent on a share q of
    # snapshots, measured on the run itself) would reach by chance with probability ``dead_chance``:
    # log(dead_chance)/log(q) snapshots (3 at q=0.1, 10 at q=0.5, 31 at q=0.8). Per unit 1e-3 is ample:
    # a layer is reported only when half of its units are dead at once.
    dead_chance: float = 1e-3
    dead_min_steps: int = 50  # ...and the streak spans at least this many optimizer steps

    # -- saturation -----------------------------------------------------------------------------------
    saturation_fraction: float = 0.5  # share of activations in the flat tails (|tanh| > 0.99, sigmoid < 0.01 or > 0.99)
    saturation_snapshots: int = 2  # on this many log steps in a row, spanning at least min_steps steps

    # -- causes (not findings) ------------------------------------------------------------------------
    small_init_gain: float = 0.25  # weight RMS * sqrt(fan_in) below this: initialised too small (Glorot/He ~1)

    def __post_init__(self):
        for name in ("vanishing_ratio", "vanishing_critical_ratio", "vanishing_median_ratio", "dead_chance"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if not 0.0 < self.dead_fraction <= 1.0:
            raise ValueError(f"dead_fraction must be in (0, 1], got {self.dead_fraction!r}")
        if not 0.0 < self.saturation_fraction <= 1.0:
            raise ValueError(f"saturation_fraction must be in (0, 1], got {self.saturation_fraction!r}")
        for name in ("min_steps", "dead_snapshots", "dead_min_steps", "temporal_min_steps",
                     "temporal_min_measurements", "explosion_sustain_steps", "divergence_windows",
                     "divergence_min_steps", "saturation_snapshots", "weight_runaway_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("update_ratio_warning", "update_ratio", "small_init_gain"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.update_ratio < self.update_ratio_warning:
            raise ValueError(f"update_ratio ({self.update_ratio!r}) must be >= update_ratio_warning "
                             f"({self.update_ratio_warning!r})")
        for name in ("explosion_update_growth", "divergence_factor", "divergence_factor_runaway", "weight_growth",
                     "ceiling_excess"):
            value = getattr(self, name)
            if not value > 1.0:
                raise ValueError(f"{name} must be > 1, got {value!r}")


DETECTOR_STATES = ("vanishing", "exploding", "nonfinite", "dead", "saturated")  # each keeps a small dict


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
              facts: ModelFacts, cfg: DetectorConfig, state: dict,
              dead_layers: Sequence[str] = ()) -> Candidate | None:
    """Early-layer collapse from the depth profile (window-mean RMS per layer, forward order), or,
    for recurrent modules, through time (``snapshot.temporal``).

    ``dead_layers``: layers the dead detector holds as dead. A collapse and dead units are judged
    independently; when both hold, both are reported, and a dead layer at or after the start of the
    collapse is named as its likely cause (nothing flows back through a switched-off ReLU)."""
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
        earlier = set(valid[: max(1, len(valid) // 2)].tolist())
        collapsed = [i for i, r in zip(valid, ratio) if i in earlier and r < cfg.vanishing_ratio]
        # The gradient must shrink going back through the network, not merely sit far below one
        # large head (a converged classifier's last layer can dwarf every other layer).
        below_median = rms[valid[0]] < cfg.vanishing_median_ratio * float(np.median(rms[later]))
        holds = bool(collapsed) and collapsed[0] == valid[0] and below_median
    through_time = vanishing_through_time(window, snapshot, facts, cfg, state)
    if not holds:
        state["steps"] = 0
        state.pop("since", None)
        state.pop("established", None)
        return through_time
    if not state.get("steps"):
        state["since"] = window.first_step
    state["steps"] = state.get("steps", 0) + window.steps
    if state["steps"] < cfg.min_steps:
        return through_time
    # Established at the end of the window in which the collapse had held for min_steps steps.
    state.setdefault("established", window.last_step)

    first_ratio = float(ratio[0])
    orders = -math.log10(first_ratio)
    log_rms = np.log10(rms[valid])
    slope = float(np.polyfit(np.arange(len(valid)), log_rms, 1)[0]) if len(valid) >= 3 else math.nan
    names = _names(layers, collapsed)
    gain = _init_gain(layers, snapshot)
    saturating = sorted(facts.saturating | {l.activation.lower() for l in layers
                                            if l.activation and l.activation.lower() in SATURATING})
    causes, remedies = [], []
    position = {l.name: i for i, l in enumerate(layers)}
    blocking = [n for n in dead_layers if position.get(n, -1) >= collapsed[0]]
    if blocking:
        causes.append(f"dead units in {_short(blocking)} (no gradient flows back through a switched-off "
                      "ReLU, so the layers below it starve)")
        remedies += [REMEDIES["leaky"], REMEDIES["bias_init"]]
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
        "holding_since_step": state["since"],
    }
    if blocking:
        evidence["dead_layers_at_or_after_collapse"] = list(blocking)
    if gain is not None:
        evidence["init_gain"] = gain
    return Candidate("vanishing", int(state["established"]), names, severity, message,
                     tuple(dict.fromkeys(remedies)), evidence, cause)


def vanishing_through_time(window: WindowStats, snapshot: Snapshot | None, facts: ModelFacts,
                           cfg: DetectorConfig, state: dict) -> Candidate | None:
    """A recurrence is one module, so the depth profile cannot see it; the adapter measures the
    gradient reaching each time step's input on log steps. The first time step getting under
    ``vanishing_ratio`` of the last one's on every measurement for ``temporal_min_steps`` optimizer
    steps (``temporal_min_measurements`` log steps at least) is vanishing through time. Persistence is
    counted in optimizer steps, so how often the user logs does not change the verdict, and the early
    phase of a recurrent net that learns (its gates open within tens of steps) is not a finding."""
    temporal = snapshot.temporal if snapshot is not None and snapshot.temporal else {}
    runs = state.setdefault("temporal", {})  # module -> [first step held, measurements, established or -1]
    hot = {}
    for name, per_t in temporal.items():
        per_t = np.asarray(per_t, dtype=np.float64)
        first, last = float(per_t[0]), float(per_t[-1])
        ratio = first / last if last > 0 else math.nan
        holds = len(per_t) >= 2 and last > 0 and ratio < cfg.vanishing_ratio
        if not holds:
            runs.pop(name, None)
            continue
        run = runs.setdefault(name, [window.last_step, 0, -1])
        run[1] += 1
        held_steps = window.last_step - run[0] + 1
        if run[2] < 0 and run[1] >= cfg.temporal_min_measurements and held_steps >= cfg.temporal_min_steps:
            run[2] = window.last_step
        if run[2] >= 0:
            k = min(20, len(per_t))  # the per-step factor where the profile has not underflowed
            a = float(per_t[-k])
            per_step = (a / last) ** (1.0 / (k - 1)) if a > 0 and k > 1 else 0.0
            hot[name] = (ratio, len(per_t), per_step, held_steps, run[2])
    if not hot:
        return None
    name, (ratio, steps, per_step, held, established) = min(hot.items(), key=lambda kv: kv[1][0])
    orders = -math.log10(ratio) if ratio > 0 else math.inf
    plain = bool(facts.recurrent & PLAIN_RNN)
    cause = (f"a plain RNN over {steps} time steps" if plain else f"a recurrence over {steps} time steps") + (
        f": the gradient shrinks about {1 / per_step:.2g}x per step going back in time" if per_step > 0 else "")
    remedies = ((REMEDIES["lstm_gru"],) if plain else ()) + (
        "Shorten the sequences (truncated backpropagation through time) or add attention/skip connections "
        "across time.", REMEDIES["init_glorot_he"])
    size = f"{orders:.1f} orders of magnitude smaller than" if math.isfinite(orders) else "exactly 0 (underflow), against"
    message = (f"Vanishing gradients through time: in {name} the gradient reaching the first of {steps} time steps "
               f"is {size} the last, and has been for {held} steps, so early inputs barely influence learning; "
               f"likely cause: {cause}.")
    severity = "critical" if not ratio >= cfg.vanishing_critical_ratio else "warning"
    evidence = {"first_to_last_time_step_ratio": ratio, "orders_of_magnitude": orders if math.isfinite(orders) else None,
                "time_steps": steps, "per_step_factor": per_step, "held_for_steps": held,
                "modules": {n: h[0] for n, h in hot.items()}}
    return Candidate("vanishing", int(min(h[4] for h in hot.values())), tuple(hot), severity, message, remedies,
                     evidence, cause)


# --------------------------------------------------------------------------------------- exploding

def update_to_weight(snapshot: Snapshot | None) -> float | None:
    """Norm of what the optimizer applied on the snapshot's step over the weights' norm (all layers)."""
    if snapshot is None or snapshot.update_norm is None or snapshot.weight_norm is None:
        return None
    u, w = np.nan_to_num(np.asarray(snapshot.update_norm, np.float64)), np.nan_to_num(
        np.asarray(snapshot.weight_norm, np.float64))
    if not w.sum() > 0:
        return None
    return float(math.sqrt((u ** 2).sum()) / math.sqrt((w ** 2).sum()))


def exploding(layers: Sequence[LayerInfo], window: WindowStats, snapshot: Snapshot | None,
              facts: ModelFacts, cfg: DetectorConfig, state: dict, policy_name: str) -> Candidate | None:
    """Growth that feeds on itself and shows in what the optimizer applies. Established by any of:

    * **overflow**: the gradients turned NaN/Inf right after the norm spiked (the tracker's
      confirmation);
    * **updates that dwarf the weights**: one measured update larger than the weights
      (``update_ratio``), or above ``update_ratio_warning`` on two measurements in a row;
    * **a sustained excursion**: the norm held far above the run's level for
      ``explosion_sustain_steps`` consecutive steps (counted on the device, so every step counts),
      unless an update measured while it was still elevated shows the optimizer did not apply it
      (no growth over the run's own typical update: Adam normalised it away);
    * **slow divergence**: the norm rising window after window to ``divergence_factor`` over its
      lowest level, with the applied update growing along.

    A burst of a few steps that returns by itself (a hard batch, a recurrent net's burst, a
    large-batch net late in training) is none of these: ``clip='auto'`` may clip it (the device-side
    latch protects at once), it is counted in ``gradguard/spikes``, and it is not a finding.
    Loss is not seen by the core; a rising loss would be the third witness (see README)."""
    ratio = update_to_weight(snapshot)
    level = window.tracker_level
    elevated_factor = math.sqrt(10.0)  # the tracker's "elevated": sqrt(spike_factor) over its level
    quiet = window.spikes == 0 and window.explosions == 0 and window.nonfinite_steps == 0
    evidence: dict[str, Any] = {}
    if window.spikes > 0:
        evidence.update(spikes=window.spikes, max_jump_factor=math.exp(window.max_jump),
                        running_level=level, global_norm_max=window.global_norm_max,
                        longest_elevated_run=window.max_spike_run)
        if window.first_spike_step is not None:
            state["last_spike_step"] = int(window.first_spike_step)
    if ratio is not None:
        evidence["update_to_weight_ratio"] = ratio
        evidence["update_measured_at_step"] = window.last_step

    # The run's own typical update (geometric mean over quiet log steps) and level, for comparison.
    base_update = state.get("base_update")
    base_level = state.get("base_level")
    reasons: list[str] = []
    severity, step = "warning", None

    # 1. overflow right after growth
    spike_at = state.get("last_spike_step")
    if (window.nonfinite_steps > 0 and window.explosions > 0 and spike_at is not None
            and window.first_nonfinite_step is not None and window.first_nonfinite_step >= spike_at):
        reasons.append(f"the global gradient norm jumped {math.exp(window.max_jump):.3g}x above its running "
                       "level and then overflowed to NaN/Inf")
        severity, step = "critical", window.first_nonfinite_step
        evidence["growth_started_at_step"] = spike_at

    # 2. updates that dwarf the weights: larger than the weights at once, or a large one that fed on
    # itself (another large one at the next measurement, or the weights' norm running away after it)
    weight_norm = None
    if snapshot is not None and snapshot.weight_norm is not None:
        w = np.nan_to_num(np.asarray(snapshot.weight_norm, np.float64))
        weight_norm = float(math.sqrt((w ** 2).sum())) if np.isfinite(snapshot.weight_norm).all() else math.inf
    previous = state.get("large_update")  # [step, ratio, weight norm] of the last measurement above warning
    grew = (previous is not None and weight_norm is not None and previous[2] > 0
            and weight_norm >= cfg.weight_growth * previous[2])
    if ratio is not None:
        if ratio > cfg.update_ratio:
            reasons.append(f"one optimizer step changed the weights by {ratio:.3g}x their norm")
            severity = "critical"
            step = window.last_step if step is None else min(step, window.last_step)
        elif previous is not None and (ratio > cfg.update_ratio_warning or grew):
            reasons.append(f"an optimizer step at step {previous[0]} changed the weights by {previous[1]:.3g}x their "
                           "norm and " + (f"the next measured one by {ratio:.3g}x" if ratio > cfg.update_ratio_warning
                                          else f"the weights' norm has grown {weight_norm / previous[2]:.3g}x since"))
            step = window.last_step if step is None else min(step, window.last_step)
        state["large_update"] = [window.last_step, ratio, weight_norm or 0.0] if ratio > cfg.update_ratio_warning \
            else None

    # 2b. updates that would have dwarfed the weights, held by clip='auto''s update ceiling (SGD): the
    # measured update then stays small, but the learning rate or init is wrong from the start. As for
    # measured updates, it takes two such steps (one bad batch is not a learning rate the weights cannot
    # sustain), or the very first step (no history: the init or learning rate itself).
    ceiling = window.policy_state.get("ceiling")
    if (ceiling is not None and 0 < ceiling < math.inf and window.global_norm_max >= cfg.ceiling_excess * ceiling
            and window.trace is not None and window.trace_first_step is not None):
        over = np.flatnonzero(window.trace[:, 0] >= cfg.ceiling_excess * ceiling)
        first = window.trace_first_step + int(over[0]) if len(over) else None
        held = first is not None and (len(over) >= 2 or first == 0)
    else:
        held, first = False, None
    if held:
        excess = window.global_norm_max / ceiling
        at = first if first == 0 else window.trace_first_step + int(over[1])
        reasons.append(f"an optimizer step would have changed the weights {excess:.3g}x more than they bear (10% "
                       "of their norm per step, their whole norm carried on by momentum); clip='auto' held it")
        severity = "critical"
        step = at if step is None else min(step, at)
        evidence["held_by_update_ceiling"] = excess
    # 2c. the weights ran away: their total norm at least doubled (``weight_growth``) within
    # ``weight_runaway_steps`` optimizer steps (against the smallest measurement in that span, or the last
    # one when the user logs less often), while the applied update is far above the run's quietest
    # (``explosion_update_growth``). A learning rate that outgrew the weights does this even where the
    # gradient cannot grow (tanh features, a softmax that saturates to a zero gradient).
    seen = state.setdefault("weights_seen", [])  # [step, total weight norm] of recent measurements
    recent = [w for s_, w in seen if s_ >= window.last_step - cfg.weight_runaway_steps]
    ref = min(recent) if recent else (seen[-1][1] if seen else None)
    ref_step = next((s_ for s_, w in seen if w == ref), None)
    quietest = state.get("floor_update")
    if (weight_norm is not None and ref is not None and ref > 0 and ref_step is not None
            and ref_step >= cfg.min_steps and weight_norm >= cfg.weight_growth * ref
            and ratio is not None and quietest and ratio >= cfg.explosion_update_growth * quietest):
        reasons.append(f"the weights' norm grew {weight_norm / ref:.3g}x between steps {ref_step} and "
                       f"{window.last_step} while the applied update was {ratio / quietest:.3g}x the run's quietest")
        step = window.last_step if step is None else min(step, window.last_step)
        evidence.update(weight_growth_in_span=weight_norm / ref, update_growth_over_quietest=ratio / quietest)
    last_w = seen[-1] if seen else None
    if weight_norm is not None and math.isfinite(weight_norm) and weight_norm > 0:
        seen.append([window.last_step, weight_norm])
        # keep the span, plus the last measurement before it
        while len(seen) > 2 and seen[1][0] < window.last_step - cfg.weight_runaway_steps:
            seen.pop(0)

    # 3. a sustained excursion that the optimizer applied
    if window.max_spike_run >= cfg.explosion_sustain_steps:
        still_up = (base_level is not None and math.isfinite(window.global_norm_last)
                    and window.global_norm_last >= elevated_factor * base_level)
        absorbed = (still_up and ratio is not None and base_update is not None and window.clipped_steps == 0
                    and ratio < cfg.explosion_update_growth * base_update)
        evidence["longest_elevated_run"] = window.max_spike_run
        if absorbed:
            evidence["update_growth_during_excursion"] = ratio / base_update
        else:
            reasons.append(f"the global gradient norm rose {math.exp(window.max_jump):.3g}x above its running "
                           f"level and stayed far above it for {window.max_spike_run} consecutive steps")
            start = window.first_explosion_step if window.first_explosion_step is not None else window.first_step
            at = min(window.last_step, start + cfg.explosion_sustain_steps - 1)
            step = at if step is None else min(step, at)
            if window.max_jump >= math.log(1e3):
                severity = "critical"

    # 4. slow divergence: the level climbs segment after segment (segments of a fixed number of
    # optimizer steps, so the verdict does not depend on how often the user logs), the update with it
    seg_len = max(1, -(-cfg.divergence_min_steps // cfg.divergence_windows))
    finite_steps = window.steps - window.nonfinite_steps
    if finite_steps > 0 and math.isfinite(window.global_norm_mean):
        seg = state.setdefault("segment", [window.first_step, 0, 0.0])
        seg[1] += finite_steps
        seg[2] += window.global_norm_mean * finite_steps
        if seg[1] >= seg_len:
            mean = seg[2] / seg[1]
            rising = state.setdefault("rising", [])  # [first step, mean] of consecutive rising segments
            if rising and mean <= rising[-1][1]:
                rising.clear()
            rising.append([seg[0], mean])
            del rising[:-cfg.divergence_windows]
            state["segment"] = [window.last_step + 1, 0, 0.0]
            floor = state.get("floor")
            # the update compared with the run's typical update when its norm was at its lowest (a running
            # baseline would follow a slow rise)
            before = state.get("floor_update")
            update_grew = ratio is None or (before is not None and ratio >= cfg.explosion_update_growth * before)
            # the weights running away are a second witness: a smaller gradient growth suffices
            w_floor = state.get("floor_weight")
            w_now = weight_norm if weight_norm is not None else (last_w[1] if last_w else None)  # last measured
            ran_away = w_now is not None and w_floor is not None and w_floor > 0 and w_now >= cfg.weight_growth * w_floor
            factor = cfg.divergence_factor_runaway if ran_away else cfg.divergence_factor
            # ...and well above where the run started too: a healthy run whose gradient fell 100x as its
            # loss went to zero and then rose back towards its early level is not diverging.
            early = state.get("early")
            above_start = early is None or mean >= math.sqrt(cfg.divergence_factor) * early
            if (floor is not None and floor > 0 and mean >= factor * floor and above_start
                    and len(rising) >= cfg.divergence_windows and update_grew):
                span = window.last_step - rising[0][0] + 1
                reasons.append(f"the global gradient norm has grown {mean / floor:.3g}x over its lowest level "
                               f"and kept rising for {span} steps"
                               + (f", while the weights' norm grew {w_now / w_floor:.3g}x" if ran_away else ""))
                step = window.last_step if step is None else min(step, window.last_step)
                evidence.update(growth_over_floor=mean / floor, rising_for_steps=span)
                if ran_away:
                    evidence["weight_growth_over_floor"] = w_now / w_floor
            if seg[0] >= cfg.min_steps and mean > 0:  # the first steps' norm is the init's, not the run's level
                if floor is None or mean < floor:
                    # the references stay the quietest the run has been: a gradient that dips while the run
                    # diverges (its loss back at chance) must not re-base them to the ramped-up update
                    update_now = base_update if base_update is not None else ratio
                    old_update = state.get("floor_update")
                    state["floor"] = mean
                    state["floor_update"] = update_now if old_update is None or update_now is None \
                        else min(old_update, update_now)
                if weight_norm is not None and math.isfinite(weight_norm) and weight_norm > 0:
                    state["floor_weight"] = min(state.get("floor_weight", weight_norm), weight_norm)
                state.setdefault("early", mean)

    # The run's own baselines, from log steps with nothing unusual in their window.
    if quiet and math.isfinite(level) and level > 0:
        state["base_level"] = level
        if ratio is not None and ratio > 0 and window.last_step > 0:  # step 0's Adam update is sign(g)*lr
            prev = state.get("base_update")
            state["base_update"] = ratio if prev is None else math.exp(0.7 * math.log(prev) + 0.3 * math.log(ratio))

    if not reasons:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        swing = window.layer_norm_max / window.layer_norm_min  # how far each layer's norm moved
    grew = np.flatnonzero(np.nan_to_num(swing, nan=0.0, posinf=np.inf) >= 10.0)
    names = _names(layers, grew) if len(grew) else tuple(l.name for l in layers)
    lr_hint = any("changed the weights" in r for r in reasons)
    remedies = [REMEDIES["clipping"], REMEDIES["lower_lr"], REMEDIES["init_smaller"], REMEDIES["normalization"]]
    if lr_hint:
        remedies.insert(0, remedies.pop(1))
    if policy_name == "auto":  # (the monitor closes the latch on every exploding finding, if not yet closed)
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
    return Candidate("nonfinite", int(state["first"]), names, severity, message, remedies,
                     evidence, cause)


# --------------------------------------------------------------------------------------- dead

def _required_streak(silence: float | None, cfg: DetectorConfig) -> int:
    """Zero-gradient snapshots in a row that a live unit, silent on a share ``silence`` of snapshots,
    would reach by chance with probability ``cfg.dead_chance`` at most."""
    if silence is None or silence <= 0.0:
        return cfg.dead_snapshots
    q = min(float(silence), 0.99)
    return max(cfg.dead_snapshots, int(math.ceil(math.log(cfg.dead_chance) / math.log(q))))


def _mix_silence(us: dict, rate: float) -> None:
    """Fold this snapshot's silence rate into the layer's (about 20 snapshots of memory)."""
    n = min(us["n"], 20)
    us["silence"] = rate if us["silence"] is None else (us["silence"] * n + rate) / (n + 1)


def dead(layers: Sequence[LayerInfo], window: WindowStats, snapshot: Snapshot | None, facts: ModelFacts,
         cfg: DetectorConfig, state: dict) -> Candidate | None:
    """Units switched off for every input: their gradient stays exactly zero while gradient still
    reaches the layer.

    * Units (rows of a Linear/Conv weight) from the per-unit zero masks of log-step snapshots. A unit
      is dead after a streak of zero snapshots long enough that a live unit of this layer would not
      sit it out by chance (``_required_streak``: the layer's silence rate is measured on the run
      itself, so a batch of one, where half the ReLUs are silent on any sample, needs a much longer
      streak than a batch of 256), spanning at least ``dead_min_steps`` optimizer steps.
      A snapshot in which the whole layer got no gradient at all says nothing about its units (an
      unrouted expert, a branch not taken) and is skipped.
    * Whole layers, from every step of the window: a unit layer whose gradient is exactly zero on
      every step for ``min_steps`` steps *and* cuts the flow: every layer before it gets zero too,
      while a later layer still learns. Zero gradients by design (unrouted mixture-of-experts
      experts, unused embedding rows, frozen or detached parts) leave the layers below them learning,
      and are not death.
    """
    units_state: dict[str, dict] = state.setdefault("units", {})
    whole = state.setdefault("whole", {})
    established = state.setdefault("established", {})
    fractions: dict[str, float] = {}
    how: dict[str, str] = {}
    has = window.layer_steps > 0
    zero = has & (window.layer_zero == window.layer_steps)
    learning = has & ~zero
    # per layer: some layer before it learns / some layer after it learns (one pass, not two per layer)
    learns_before, learns_after = np.zeros_like(learning), np.zeros_like(learning)
    learns_before[1:] = np.logical_or.accumulate(learning)[:-1]
    learns_after[:-1] = np.logical_or.accumulate(learning[::-1])[::-1][1:]
    cuts = zero & ~learns_before & learns_after
    for i, layer in enumerate(layers):
        if not has[i] and window.layer_nonfinite[i] == 0:
            continue  # no gradient at all (frozen or unused): neither dead nor alive
        if not layer.units:
            continue  # embeddings, normalization, biases only: no units whose death would mean anything
        # whole layer: zero on every step, the flow cut below it, something above it still learning
        whole[layer.name] = whole.get(layer.name, 0) + window.steps if cuts[i] else 0
        if whole[layer.name] >= cfg.min_steps:
            fractions[layer.name], how[layer.name] = 1.0, "whole layer"
            continue
        if snapshot is None or snapshot.dead_units is None or snapshot.dead_units[i] is None:
            continue
        silent = np.asarray(snapshot.dead_units[i], dtype=bool)
        if silent.all():
            continue  # nothing reached the layer on this step: no information about its units
        us = units_state.get(layer.name)
        if us is None or len(us["streak"]) != len(silent):
            us = units_state[layer.name] = {"streak": np.zeros(len(silent), np.int64),
                                            "since": np.zeros(len(silent), np.int64), "silence": None, "n": 0}
        streak, since = np.asarray(us["streak"], np.int64), np.asarray(us["since"], np.int64)
        if us["n"] > 0 and not silent.any() and not streak.any():
            # every unit active now and on the last snapshot (the common case): a silence rate of 0,
            # streaks stay 0, nothing is dead
            _mix_silence(us, 0.0)
            us["n"] += 1
            continue
        # the layer's silence rate: the share of units active on the previous snapshot silent now
        was_active = streak == 0
        if us["n"] > 0 and was_active.any():
            _mix_silence(us, int(np.count_nonzero(silent & was_active)) / int(np.count_nonzero(was_active)))
        elif us["silence"] is None:
            us["silence"] = int(np.count_nonzero(silent)) / len(silent)  # first look: an upper bound for live units
        us["n"] += 1
        since = np.where(silent & (streak == 0), window.last_step, since)
        streak = np.where(silent, streak + 1, 0)
        us["streak"], us["since"] = streak, since
        need = _required_streak(us["silence"], cfg)
        is_dead = (streak >= need) & (window.last_step - since + 1 >= cfg.dead_min_steps)
        share = int(np.count_nonzero(is_dead)) / len(is_dead)
        if share >= cfg.dead_fraction:
            fractions[layer.name], how[layer.name] = share, f"{need} zero snapshots in a row"
    if not fractions:
        return None
    for name in fractions:
        established.setdefault(name, window.last_step)
    names = tuple(l.name for l in layers if l.name in fractions)
    severity = "critical" if any(f >= 0.999 for f in fractions.values()) else "warning"
    relu = not facts.saturating
    message = (f"Dead units: {_short([f'{n} ({fractions[n]:.0%})' for n in names])} of units get exactly "
               "zero gradient on every sampled step, so they never learn.")
    remedies = (REMEDIES["leaky"], REMEDIES["lower_lr"], REMEDIES["bias_init"], REMEDIES["init_glorot_he"])
    cause = "ReLU units switched off for every input (a large update or negative bias)" if relu else \
        "units stuck in a flat region of their activation"
    evidence = {"dead_fraction": fractions, "judged_by": how,
                "silence_rate": {n: units_state[n]["silence"] for n in names if n in units_state}}
    return Candidate("dead", int(min(established[n] for n in names)), names, severity, message, remedies,
                     evidence, cause)


# --------------------------------------------------------------------------------------- saturated

def saturated(window: WindowStats, snapshot: Snapshot | None, cfg: DetectorConfig,
              state: dict) -> Candidate | None:
    """Sigmoid/tanh outputs stuck in their flat tails on ``saturation_snapshots`` log steps in a row
    spanning at least ``min_steps`` optimizer steps."""
    if snapshot is None or not snapshot.saturation:
        return None
    runs: dict[str, list] = state.setdefault("runs", {})  # module -> [first step, snapshots, established or -1]
    hot = {}
    for name, frac in snapshot.saturation.items():
        if not frac >= cfg.saturation_fraction:
            runs.pop(name, None)
            continue
        run = runs.setdefault(name, [window.last_step, 0, -1])
        run[1] += 1
        if run[2] < 0 and run[1] >= cfg.saturation_snapshots and window.last_step - run[0] + 1 >= cfg.min_steps:
            run[2] = window.last_step
        if run[2] >= 0:
            hot[name] = float(frac)
    if not hot:
        return None
    names = tuple(hot)
    message = (f"Saturated activations: {_short([f'{n} ({hot[n]:.0%})' for n in names])} of outputs sit in the "
               "flat tails of sigmoid/tanh, where the gradient is nearly zero.")
    remedies = (REMEDIES["relu"], REMEDIES["init_glorot_he"], REMEDIES["normalization"], REMEDIES["lower_lr"])
    return Candidate("saturated", int(min(runs[n][2] for n in names)), names, "warning", message, remedies,
                     {"saturated_fraction": hot}, "pre-activations too large for sigmoid/tanh")
