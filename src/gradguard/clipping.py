"""Clipping policies: small pure ``init``/``update`` pairs with explicit state, one per rule.

Each rule is written once, against the array namespace ``xp`` (see ``gradguard.ops``), and runs
on the device inside the host framework: torch tensors in ``gradguard.torch``, ``keras.ops`` inside
the compiled train step in ``gradguard.keras``. State is a typed ``NamedTuple`` of float32 scalars
(or fixed-size vectors), in the optax manner, so that adapters can hold it as tensors or framework
Variables and checkpoint it (a plain ``dict`` is accepted too, for custom policies).

``update(state, norm, signals, xp) -> (max_norm, new_state)`` receives the global gradient norm of
this step (finite: non-finite steps never reach a policy) and the spike tracker's ``Signals``, and
returns the largest global norm allowed this step (``inf`` for "do not clip").

What a policy *is* is said by its fields, never by its name: ``scales_global`` (the adapter applies
the returned factor to every gradient), ``unitwise`` (the adapter scales units itself) and ``latch``
(the state field that, once 1.0, keeps clipping switched on; the core closes it on an overflow right
after a spike and the monitor closes it on an explosion the device tracker did not see) and
``ceiling`` (the state field the host fills with ``update_ceiling``: the largest global norm whose
SGD update stays within what the weights bear, 10% of their norm per step, their whole norm carried
on by momentum).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

INF = float("inf")


class Signals(NamedTuple):
    """What the spike tracker saw this step, before it ingested the step."""

    spike: Any  # 1.0 when this step's norm is a spike, else 0.0
    explosion: Any  # 1.0 when this step confirms an explosion (a sustained or enormous spike)
    log_level: Any  # running level of log(norm)
    log_sigma: Any  # running spread of log(norm), floored


class ClipPolicy(NamedTuple):
    """A clipping rule: ``init() -> state`` and ``update(state, norm, signals, xp) -> (max_norm, state)``.

    Fields that say what the rule does (adapters and the monitor read these, never ``name``):

    * ``scales_global``: the adapter multiplies the gradients by the factor the core derives from
      ``max_norm`` (False for rules that never clip the global norm: ``no_clipping``, ``agc``).
    * ``unitwise``: ``(grad unit norms, weight unit norms, xp) -> factors`` for unit-wise rules (AGC).
    * ``latch``: name of a 0/1 field of the state that switches clipping on for good (``auto``:
      ``"enabled"``), or None.
    * ``ceiling``: name of a field of the state that the host writes with ``update_ceiling`` (at the
      first step and on log steps; ``inf`` where the optimizer's update does not scale with the
      gradient), or None. Only ``latch`` and ``ceiling`` are ever written from outside the policy.
    * ``verdict_without_state``: when a host may give this step's verdict before the rest of the
      bookkeeping has run (the CPU path runs that later, back to back): ``"always"`` (``update``
      ignores ``signals``, returns its state unchanged and a threshold that does not depend on the
      norm), ``"quiet"`` (``update`` returns ``inf`` and its state unchanged whenever the latch is
      open, the step is neither a spike nor an explosion and the norm is at most the ceiling), or
      None (never: the verdict needs the whole step; the default).
    """

    name: str
    init: Callable[[], Any]
    update: Callable[[Any, Any, Signals, Any], tuple[Any, Any]]
    describe: str
    unitwise: Callable[[Any, Any, Any], Any] | None = None
    scales_global: bool = True
    latch: str | None = None
    ceiling: str | None = None
    verdict_without_state: str | None = None


class NoState(NamedTuple):
    """State of a rule that keeps none."""


class FixedState(NamedTuple):
    max_norm: Any


class ZScoreState(NamedTuple):
    count: Any
    mean: Any
    var: Any


class AutoState(NamedTuple):
    enabled: Any  # 1.0 once clipping is switched on (the latch)
    log_anchor: Any  # while latched: the policy's own level of log(norm), moved by unclipped steps (inf before)
    ceiling: Any  # written by the host (``update_ceiling``): no step's norm may exceed it (inf: unknown)


class PercentileState(NamedTuple):
    count: Any
    window: Any  # the last ``history`` global norms, oldest first (inf: not seen yet)


def state_fields(state: Any) -> dict[str, Any]:
    """A policy state (NamedTuple or dict) as a dict of its fields."""
    return dict(state._asdict()) if hasattr(state, "_asdict") else dict(state)


def state_like(template: Any, fields: Mapping[str, Any]) -> Any:
    """``fields`` rebuilt as the type of ``template`` (a policy's ``init()`` value)."""
    return type(template)(**fields) if hasattr(template, "_asdict") else dict(fields)


def _keep(state, norm, signals, xp):
    return INF, state


def no_clipping() -> ClipPolicy:
    return ClipPolicy("none", NoState, _keep, "no clipping", scales_global=False, verdict_without_state="always")


def fixed(max_norm: float) -> ClipPolicy:
    """Clip the global norm to a constant (what ``clip_grad_norm_`` and ``global_clipnorm`` do)."""
    max_norm = _positive("clip", max_norm)

    def init():
        return FixedState(max_norm)

    def update(state, norm, signals, xp):
        return state.max_norm, state

    return ClipPolicy("fixed", init, update, f"fixed max global norm {max_norm:g}", verdict_without_state="always")


def zscore(alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6) -> ClipPolicy:
    """ZClip: EMA mean/variance of the global norm; a norm whose z-score exceeds ``z_thresh`` is
    clipped to ``mean + z_thresh**2 / z * std`` (adaptive scaling: larger outliers are cut harder),
    and the EMA ingests the clipped value so a spike does not inflate the statistics.
    The first ``warmup_steps`` only gather the mean and variance.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    z_thresh = _positive("z_thresh", z_thresh)
    if int(warmup_steps) != warmup_steps or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be a positive integer, got {warmup_steps!r}")

    def init():
        return ZScoreState(0.0, 0.0, 0.0)

    def update(state, norm, signals, xp):
        count, mean, var = state
        warm = count >= warmup_steps
        std = xp.sqrt(var)
        z = (norm - mean) / (std + eps)
        outlier = warm & (z > z_thresh)
        # Where the threshold is used z > z_thresh; the maximum only keeps the other branch finite.
        threshold = xp.where(outlier, mean + z_thresh * z_thresh * std / xp.maximum(z, z_thresh), INF)
        seen = xp.where(outlier, threshold, norm)
        # Warm-up: running mean and (population) variance; afterwards the EMA.
        n = count + 1.0
        w_mean = mean + (seen - mean) / n
        w_var = (var * count + (seen - mean) * (seen - w_mean)) / n
        e_mean = alpha * mean + (1.0 - alpha) * seen
        e_var = alpha * var + (1.0 - alpha) * (seen - e_mean) * (seen - e_mean)
        return threshold, ZScoreState(count + 1.0, xp.where(warm, e_mean, w_mean), xp.where(warm, e_var, w_var))

    return ClipPolicy("zscore", init, update, f"ZClip z-score (alpha={alpha:g}, z={z_thresh:g}, warm-up {warmup_steps})")


def auto(clip_z: float = 2.5, fall: float = 0.9, rise: float = 0.1, latched_sigma: float = 0.6) -> ClipPolicy:
    """Off while gradients are healthy. A lone spike (a norm an order of magnitude above the running
    level, and unusual for this run's noise) is clipped on its own step; an explosion (the tracker's
    confirmation: a sustained or enormous spike, or an overflow right after one) switches clipping
    on, on the device, for that very step and every step after. The host may also switch it on (the
    latch field ``enabled``) when it diagnoses an explosion the tracker did not see (updates that
    dwarf weights).

    The threshold is ``level + band`` in log space, ``band = clip_z`` spreads of the run's own noise,
    and an outlier beyond the band is cut to ``level + band**2 / jump`` (ZClip's reciprocal scaling,
    in log space: the larger the outlier, the closer to the level it is cut). Before the latch the
    level is the tracker's. Once latched, the policy keeps its own level (the anchor), started at the
    tracker's level before the excursion and moved only by the steps it does not clip: it falls to a calmer
    step almost at once (``fall``) and rises at the tracker's ~10-step memory (``rise``), so the
    threshold does not follow an explosion upward. While latched the spread is read as at most ``latched_sigma``: in a run
    explosive from its first steps the tracker's spread measures the explosion, not the noise.

    The first step has no history to judge against, and a run explosive from its start does its
    damage there. So, independently of the latch, no step may exceed the *update ceiling* the host
    writes into the state (``ceiling``, see ``update_ceiling``): the global norm at which the
    optimizer's step would move the weights by 10% of their norm, or the gradient, carried on by
    momentum, by their whole norm. It is known only for optimizers whose update scales with the
    gradient (SGD, with or without momentum); for the others it is inf and never binds.
    """
    clip_z = _positive("clip_z", clip_z)
    latched_sigma = _positive("latched_sigma", latched_sigma)
    for name, value in (("fall", fall), ("rise", rise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")

    def init():
        return AutoState(0.0, INF, INF)

    def update(state, norm, signals, xp):
        enabled = xp.maximum(state.enabled, signals.explosion)
        # A lone spike whose update the weights absorb is left alone (growth that does not feed on
        # itself is not an explosion): under a tenth of the update ceiling, an SGD step of at most 1%
        # of the weights (10% carried on by momentum 0.9). Where the ceiling is unknown (Adam-like
        # optimizers) every spike is clipped on its own step.
        absorbed = xp.asfloat(xp.isfinite(state.ceiling)) * xp.asfloat(norm < SPIKE_SHARE_OF_CEILING * state.ceiling)
        active = xp.maximum(enabled, signals.spike * (1.0 - absorbed))
        latched = enabled > 0
        # The anchor starts at the tracker's level on the latch step (or when the host closed the latch).
        anchor = xp.where(xp.isfinite(state.log_anchor), state.log_anchor, signals.log_level)
        level = xp.where(latched, anchor, signals.log_level)
        band = clip_z * xp.where(latched, xp.minimum(signals.log_sigma, latched_sigma), signals.log_sigma)
        jump = xp.log(xp.maximum(norm, 1e-30)) - level
        log_threshold = level + band * band / xp.maximum(jump, band)
        # A clipped step leaves the anchor where it is (an excursion must not lift the level it is
        # judged against); a step under the threshold pulls it, down almost at once, up slowly.
        x = level + jump
        weight = xp.where(jump > log_threshold - level, 0.0, xp.where(x < anchor, fall, rise))
        new_anchor = xp.where(latched, anchor + weight * (x - anchor), INF)
        threshold = xp.where(active > 0, xp.exp(log_threshold), INF)
        # The update ceiling, shown as the threshold only on the steps it binds (a healthy run's log
        # stays free of a threshold it never meets).
        threshold = xp.minimum(threshold, xp.where(norm > state.ceiling, state.ceiling, INF))
        return threshold, AutoState(enabled, new_anchor, state.ceiling)

    return ClipPolicy("auto", init, update, "auto: off until a spike or an explosion, then adaptive "
                      "(held below an explosion); never above the update ceiling", latch="enabled",
                      ceiling="ceiling", verdict_without_state="quiet")


# How far SGD may move the weights, relative to their norm, before the step itself is the divergence.
# One step: 10% (healthy runs apply 0.01%..5% per step, see DetectorConfig; LARS-style trust ratios
# keep it near 0.1%). One gradient, all told (momentum carries it on): the weights' own norm, the
# exploding detector's ``update_ratio``. With momentum 0.9 the two coincide. Over the validation
# suite's healthy SGD runs (lr up to 0.1, momentum 0.9, the first 60 steps) the largest was 0.046 per
# step and 0.46 all told (a 20-layer BN MLP's first step): a margin of 2x.
STEP_UPDATE_RATIO = 0.1
CARRIED_UPDATE_RATIO = 1.0
# A lone spike below this share of the ceiling moves the weights by at most 1% in one SGD step: inside
# what healthy runs do, so ``auto`` does not clip it (the late-training spikes of healthy SGD runs, a
# batch 10x+ above a level near zero, sit at 1-3% of their ceiling).
SPIKE_SHARE_OF_CEILING = 0.1


def sgd_gain(lr: float, momentum: float = 0.0, dampening: float = 0.0) -> float | None:
    """How much SGD's update, measured against its limit, grows per unit of gradient norm: the step
    applies ``lr * g`` (limit: ``STEP_UPDATE_RATIO`` of the weights), and momentum carries the same
    gradient on, ``momentum**k`` of it k steps later, so one gradient moves the weights by
    ``lr * (1 - dampening) / (1 - momentum)`` times itself all told (limit: ``CARRIED_UPDATE_RATIO``;
    Nesterov's look-ahead shifts when, not how much). ``update_ceiling`` divides the weights' norm
    by this. None where momentum is not below 1."""
    if not 0.0 <= momentum < 1.0:
        return None  # (not a momentum SGD can run with)
    lr, carried = float(lr), float(lr) * (1.0 - float(dampening)) / (1.0 - float(momentum))
    return max(lr / STEP_UPDATE_RATIO, carried / CARRIED_UPDATE_RATIO)


def update_ceiling(weight_norm: float | None, gain: float | None) -> float:
    """The largest global gradient norm whose update stays within its limits: ``|w| / gain`` (see
    ``sgd_gain``). ``inf`` (no ceiling) when the optimizer's update does not scale with the gradient
    (``gain`` None: Adam and other normalising optimizers, whose step size is their learning rate
    whatever the norm, so a clip does not bound it) or when the weights have no scale yet (all zero)."""
    if gain is None or not 0 < gain < INF or weight_norm is None or not math.isfinite(weight_norm) or not weight_norm > 0:
        return INF
    return float(weight_norm / gain)


def percentile(p: float = 10.0, history: int = 1000) -> ClipPolicy:
    """AutoClip: clip to the ``p``-th percentile of the global norms seen so far (the last
    ``history`` steps, this one included). AutoClip's default p=10 clips most steps a little;
    that is the method, not a spike guard."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 100.0:
        raise ValueError(f"p must be in (0, 100], got {p!r}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"history must be a positive integer, got {history!r}")

    def init():
        return PercentileState(0.0, [INF] * history)  # unfilled slots sort last

    def update(state, norm, signals, xp):
        window = xp.concat([state.window[1:], norm[None]])  # a shift register of the last norms
        seen = xp.minimum(state.count + 1.0, float(history))
        rank = xp.asint((seen - 1.0) * (p / 100.0))
        threshold = xp.take(xp.sort(window), rank)  # unfilled slots (inf) sort after the real norms
        return threshold, PercentileState(state.count + 1.0, window)

    return ClipPolicy("percentile", init, update, f"AutoClip {p:g}th percentile of the last {history} norms")


def agc(clipping: float = 0.01, eps: float = 1e-3) -> ClipPolicy:
    """Adaptive gradient clipping (Brock et al., NFNets): each unit's gradient (a row of a weight,
    an output channel of a conv kernel, an element of a bias) is scaled down so that
    ``|g_unit| <= clipping * max(|w_unit|, eps)``; the global norm is not clipped."""
    clipping = _positive("clipping", clipping)
    eps = _positive("eps", eps)

    def unit_scale(grad_norm, weight_norm, xp):
        max_norm = clipping * xp.maximum(weight_norm, eps)
        return xp.where(grad_norm > max_norm, max_norm / xp.maximum(grad_norm, 1e-6), 1.0)

    return ClipPolicy("agc", NoState, _keep, f"AGC unit-wise, clipping={clipping:g}", unit_scale,
                      scales_global=False)


CLIP_NAMES = ("auto", "zscore", "percentile", "agc")


def resolve(clip: Any) -> ClipPolicy:
    """Turn the user's ``clip=`` argument into a policy; raises naming the argument and value."""
    if clip is None:
        return no_clipping()
    if isinstance(clip, ClipPolicy):
        return clip
    if isinstance(clip, str):
        if clip == "auto":
            return auto()
        if clip == "zscore":
            return zscore()
        if clip == "percentile":
            return percentile()
        if clip == "agc":
            return agc()
        raise ValueError(f"clip must be None, 'auto', 'zscore', 'percentile', 'agc', a positive float or a "
                         f"ClipPolicy, got {clip!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        raise TypeError(f"clip must be None, 'auto', 'zscore', 'percentile', 'agc', a positive float or a "
                        f"ClipPolicy, got {clip!r}")
    return fixed(float(clip))


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
