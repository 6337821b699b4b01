"""The host side of every adapter, written once: what happens between the device and the monitor.

An adapter (``gradguard.torch``, ``gradguard.keras``, ...) supplies only what is truly
framework-specific: how to list parameters and layers, how to compute per-layer sums on the device,
how to scale or drop gradients and how to hook the host's step. Everything else lives here:

* **which steps log**: ``is_log_step`` / ``is_report_step`` (the first step is judged, not logged);
* **state layout**: ``StateLayout`` packs the core's state dict into one float32 vector (one
  Variable / one copy to the host) and back;
* **the window read**: ``Pipeline.observe`` turns the host copy of the state into ``WindowStats``,
  runs the monitor, and returns the state to write back (window restarted, latch closed when the
  monitor saw an explosion the device tracker did not);
* **snapshot assembly**: ``Pipeline.snapshot(LayerSums)`` turns per-layer sums measured on a log
  step into a ``Snapshot`` (numel, RMS, fractions, masks of layers without a gradient);
* **update sampling**: ``UPDATE_SAMPLE``, ``sample_plan``, ``update_sq_from_sample``;
* **dead units**: ``DEAD_UNIT_RULE`` / ``dead_units``: one rule for every host;
* **histograms**: ``HIST_BINS``, ``histogram`` (host values) and ``histogram_from_counts`` (device bins);
* **checkpoints**: ``Pipeline.state_dict`` / ``Pipeline.restore``: one format; a checkpoint from
  other layers is re-mapped by layer name, one from other shapes is refused, one from another clip
  policy keeps tracker, findings and totals and starts the new policy fresh.

Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from gradguard import clipping, stats
from gradguard.layers import LayerInfo, ModelFacts, check_layers
from gradguard.monitor import Decision, Monitor, warn_user
from gradguard.options import Options
from gradguard.sinks import Sink

# ------------------------------------------------------------------------------------- constants

UPDATE_SAMPLE = 4096
"""Elements per parameter remembered on a log step to measure the update the optimizer applied."""

HIST_BINS = 64
"""Bins of a per-layer gradient histogram (equal bins between the finite min and max)."""

CHECKPOINT_VERSION = 2

DEAD_UNIT_RULE = ("a unit (a row of a torch Linear/Conv weight, the last axis of a Keras kernel) is dead on a "
                  "log step when its whole weight-row gradient is exactly zero; a zero bias gradient only "
                  "selects the rows worth reading (a non-zero one proves the unit alive)")


# ------------------------------------------------------------------------------------- log steps

def is_log_step(step: int, every: int) -> bool:
    """Steps (0-based optimizer steps) whose extras are measured and whose window is judged: every
    ``every``-th step, and the first step (its update shows a learning rate or an init wrong from
    the start, before the run has a level to spike from)."""
    return step == 0 or (step + 1) % every == 0


def is_report_step(step: int, every: int) -> bool:
    """Log steps whose record goes to the sinks (the first step is judged but not reported, so it
    never claims a row of the user's own step counter in W&B or the host's loggers)."""
    return (step + 1) % every == 0


# ------------------------------------------------------------------------------------- state layout

class StateLayout:
    """The core's state dict (``stats.init_state``) packed into one float32 vector: one Variable,
    one read and one write per step, one copy to the host on a log step."""

    def __init__(self, template: Mapping[str, Any]):
        self.keys = list(template)
        self.shapes = {k: tuple(np.shape(v)) for k, v in template.items()}
        self.slices: dict[str, tuple[int, int]] = {}
        offset = 0
        for k in self.keys:
            n = int(np.prod(self.shapes[k], dtype=np.int64)) if self.shapes[k] else 1
            self.slices[k] = (offset, n)
            offset += n
        self.size = offset

    def pack_np(self, state: Mapping[str, Any]) -> np.ndarray:
        return np.concatenate([np.asarray(state[k], np.float32).reshape(-1) for k in self.keys]).astype(np.float32)

    def unpack_np(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        return self.unpack(np.asarray(vec, np.float32), lambda v, shape: v.reshape(shape))

    def pack(self, state: Mapping[str, Any], flatten: Callable[[Any], Any], concat: Callable[[list], Any]) -> Any:
        """Pack framework arrays: ``flatten(x)`` -> 1-D float32, ``concat(list)`` -> one vector."""
        return concat([flatten(state[k]) for k in self.keys])

    def unpack(self, vec: Any, reshape: Callable[[Any, tuple], Any]) -> dict[str, Any]:
        """Unpack a framework vector (``vec[o]`` / ``vec[a:b]`` slicing, ``reshape(x, shape)``)."""
        out = {}
        for k in self.keys:
            o, n = self.slices[k]
            shape = self.shapes[k]
            out[k] = vec[o] if not shape else vec[o:o + n] if len(shape) == 1 else reshape(vec[o:o + n], shape)
        return out

    def fits(self, state: Mapping[str, Any]) -> bool:
        return list(state) == self.keys and all(tuple(np.shape(state[k])) == self.shapes[k] for k in self.keys)


# ------------------------------------------------------------------------------------- update sampling

def sample_plan(numels: Sequence[int]) -> list[tuple[int, int]]:
    """Per parameter ``(stride, count)``: at most ``UPDATE_SAMPLE`` elements, every ``stride``-th
    (or, where strided reads are slow, the first ``count``)."""
    plan = []
    for numel in numels:
        stride = max(1, int(numel) // UPDATE_SAMPLE)
        plan.append((stride, len(range(0, int(numel), stride))))
    return plan


def update_sq_from_sample(sample_sq: Any, numel: int, count: int) -> Any:
    """The squared norm of a whole parameter's update estimated from its sample's."""
    return sample_sq * (float(numel) / max(int(count), 1))


# ------------------------------------------------------------------------------------- dead units

def dead_units(row_max_abs: np.ndarray) -> np.ndarray:
    """``DEAD_UNIT_RULE``: per unit, the max |gradient| over its weight row -> dead (exactly zero)."""
    return np.asarray(row_max_abs) == 0


# ------------------------------------------------------------------------------------- histograms

def histogram_edges(lo: float, hi: float) -> np.ndarray:
    return np.linspace(lo, hi, HIST_BINS + 1)


def histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``HIST_BINS`` equal bins between the finite minimum and maximum (None when nothing finite)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    counts, edges = np.histogram(v, bins=HIST_BINS)
    return counts.astype(np.int64), edges


def histogram_from_counts(counts: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray] | None:
    """A histogram binned on the device (``HIST_BINS`` counts between ``lo`` and ``hi``)."""
    counts = np.asarray(counts)
    if counts.sum() <= 0 or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return counts.astype(np.int64), histogram_edges(lo, hi)


# ------------------------------------------------------------------------------------- log-step sums

@dataclasses.dataclass
class LayerSums:
    """What an adapter measures per layer on a log step (numpy, layer order; NaN where not
    measured). ``Pipeline.snapshot`` turns it into the monitor's ``Snapshot``."""

    has_grad: np.ndarray  # bool: the layer received a gradient this step
    norm_sq: np.ndarray  # sum of squared gradients
    max_abs: np.ndarray | None = None
    zeros: np.ndarray | None = None  # count of exactly-zero gradient elements
    weight_sq: np.ndarray | None = None
    update_sq: np.ndarray | None = None  # squared norm of the applied update (see sample_plan)
    dead: Sequence[np.ndarray | None] | None = None  # per layer: bool per unit (DEAD_UNIT_RULE) or None
    histograms: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None  # layer index -> (counts, edges)
    saturation: Mapping[str, float] | None = None
    temporal: Mapping[str, np.ndarray] | None = None


def snapshot_from_sums(layers: Sequence[LayerInfo], sums: LayerSums) -> stats.Snapshot:
    """Per-layer sums -> ``Snapshot``: norms, RMS over each layer's numel, zero fractions; layers
    without a gradient this step are NaN (not zero: no gradient is not a dead gradient)."""
    numel = np.array([l.numel for l in layers], dtype=np.float64)
    has = np.asarray(sums.has_grad, dtype=bool)
    nan = np.full(len(layers), np.nan)

    def masked(x):
        return None if x is None else np.where(has, np.asarray(x, np.float64), nan)

    def finite_or_none(x):
        return None if x is None or not np.isfinite(x).all() else np.asarray(x, np.float64)

    norm = masked(np.sqrt(np.asarray(sums.norm_sq, np.float64)))
    max_abs = masked(sums.max_abs)
    zero_frac = None if sums.zeros is None else masked(np.asarray(sums.zeros, np.float64) / numel)
    if max_abs is not None and not np.isfinite(max_abs).any():
        max_abs = zero_frac = None  # not measured on this host
    weight_sq = finite_or_none(sums.weight_sq)
    weight_norm = None if weight_sq is None else np.sqrt(weight_sq)
    update_sq = finite_or_none(sums.update_sq)
    hist = None
    if sums.histograms:
        hist = {layers[i].name: h for i, h in sums.histograms.items() if h is not None} or None
    return stats.Snapshot(
        norm=norm, rms=norm / np.sqrt(numel), max_abs=max_abs, zero_frac=zero_frac,
        weight_norm=weight_norm, weight_rms=None if weight_norm is None else weight_norm / np.sqrt(numel),
        update_norm=None if update_sq is None else np.sqrt(update_sq),
        dead_units=list(sums.dead) if sums.dead is not None else None, histograms=hist,
        saturation=dict(sums.saturation) if sums.saturation else None,
        temporal=dict(sums.temporal) if sums.temporal else None)


# ------------------------------------------------------------------------------------- the pipeline

class Pipeline:
    """One adapter's host-side state: layers, policy, monitor, step counter, checkpoint format.

    Built in one place (the adapter's build step, once the layers are known). The adapter keeps the
    device state (``initial_state()`` moved to its device); on a log step it copies the packed state
    to the host and calls ``observe``, then writes back what ``observe`` returns.

    Args:
        layers: the watched layers, forward order (unique names).
        facts: architecture facts (``ModelFacts``).
        options: the user's ``Options``.
        sinks: the sinks to report to (the adapter may add its own, e.g. the host's loggers).
        policy: the policy that runs (default ``options.policy``; an adapter may substitute the
            host's own clipping, described as a policy).
        log_every_n_steps: the resolved cadence (``options.every(host_default)``).
        logging_rank: whether this process reports (every rank decides the same; one reports).
    """

    def __init__(self, layers: Sequence[LayerInfo], facts: ModelFacts, options: Options, *,
                 sinks: Iterable[Sink] = (), policy: clipping.ClipPolicy | None = None,
                 log_every_n_steps: int | None = None, logging_rank: bool = True):
        self.layers = check_layers(layers)
        self.names = [l.name for l in self.layers]
        self.n_layers = len(self.layers)
        self.options = options
        self.policy = policy or options.policy
        self.tracker = options.tracker
        self.every = log_every_n_steps or options.every()
        self.monitor = Monitor(self.layers, facts, policy_name=self.policy.name, policy=self.policy,
                               skip_nonfinite=options.skip_nonfinite, sinks=sinks, config=options.detector_config,
                               max_logged_layers=options.max_logged_layers, logging_rank=logging_rank)
        # the per-step trace keeps at least one log interval (no step between two log steps is lost)
        self.trace_size = min(max(stats.TRACE_SIZE, self.every), 4096)
        self.layout = StateLayout(self.initial_state())
        self.latch = stats.latch_key(self.policy)
        self.ceiling = stats.ceiling_key(self.policy)
        # How far the optimizer moves the weights per unit of gradient norm (``clipping.sgd_gain``), set
        # by the adapter from its optimizer; None where the update does not scale with the gradient.
        self.optimizer_gain: float | None = None
        self.step = 0  # optimizer steps seen, skipped ones included

    # -------------------------------------------------------------- per step

    def initial_state(self) -> dict[str, np.ndarray]:
        return stats.init_state(self.n_layers, self.policy, trace_size=self.trace_size)

    def is_log_step(self, step: int | None = None) -> bool:
        return is_log_step(self.step if step is None else step, self.every)

    def is_report_step(self, step: int | None = None) -> bool:
        return is_report_step(self.step if step is None else step, self.every)

    @property
    def logged(self) -> np.ndarray:
        """Indices of the layers that get per-layer scalars."""
        return self.monitor.logged

    def snapshot(self, sums: LayerSums) -> stats.Snapshot:
        return snapshot_from_sums(self.layers, sums)

    # -------------------------------------------------------------- the window read

    def window(self, host_state: Mapping[str, Any] | np.ndarray, last_step: int) -> stats.WindowStats:
        """The window measured since the last log step, from the host copy of the state (a dict or
        the packed vector)."""
        state = self.layout.unpack_np(host_state) if isinstance(host_state, np.ndarray) else host_state
        return stats.WindowStats.from_state(state, last_step=last_step)

    def observe(self, host_state: Mapping[str, Any] | np.ndarray, last_step: int,
                snapshot: stats.Snapshot | None = None, report: bool = True,
                commit: bool = True) -> tuple[Decision, dict[str, np.ndarray]]:
        """Judge the window ending at ``last_step``: returns the monitor's decision and the state to
        write back to the device (window restarted; the latch closed when the monitor asks).

        With ``commit=False`` nothing is written anywhere: the decision's findings are those the
        window would add, the monitor is left as it was and the state comes back unchanged. This is
        the pure look used when the user reads results mid-run.
        """
        state = dict(self.layout.unpack_np(host_state) if isinstance(host_state, np.ndarray) else host_state)
        window = self.window(state, last_step)
        if not commit:
            return self.monitor.peek(window, snapshot), state
        decision = self.monitor.observe(window, snapshot, report=report)
        state.update(stats.reset_window(self.n_layers))
        if decision.enable_clipping and self.latch is not None:
            state[self.latch] = np.float32(1.0)
        if snapshot is not None and snapshot.weight_norm is not None:
            self.set_ceiling(state, float(np.sqrt(np.nansum(np.square(np.asarray(snapshot.weight_norm, np.float64))))))
        return decision, state

    def set_ceiling(self, state: dict[str, Any], weight_norm: float | None) -> None:
        """Write the policy's update ceiling (``clipping.update_ceiling``) for weights of norm
        ``weight_norm`` (the trainable weights, all layers) and the adapter's ``optimizer_gain``."""
        if self.ceiling is not None:
            state[self.ceiling] = np.float32(clipping.update_ceiling(weight_norm, self.optimizer_gain))

    def enable_clipping(self, state: dict[str, Any], one: Any) -> None:
        """Close the policy's latch in ``state`` (``one``: a 1.0 of the state's array type)."""
        if self.latch is not None:
            state[self.latch] = one

    # -------------------------------------------------------------- checkpoints

    def state_dict(self, device_state: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        """The one checkpoint format (adapters choose the array type of ``device_state``: tensors
        for torch checkpoints, lists for JSON)."""
        return {
            "version": CHECKPOINT_VERSION,
            "layers": list(self.names),
            "numel": [int(l.numel) for l in self.layers],
            "policy": self.policy.name,
            "step_count": int(self.step),
            "device_state": dict(device_state),
            "monitor": self.monitor.state_dict(),
            **extra,
        }

    def restore(self, saved: Mapping[str, Any], to_numpy: Callable[[Any], np.ndarray] = np.asarray
                ) -> dict[str, np.ndarray]:
        """Load a checkpoint into the monitor and the step counter; returns the device state (numpy)
        fitted to this model:

        * other shapes under the same layer names: ``ValueError`` (a different model);
        * layers that joined or left (fine-tuning): state of the layers that stay is kept by name,
          new layers start fresh, findings and totals stay;
        * another clip policy (its state fields differ): tracker, findings and totals carry, the new
          policy starts fresh, with a warning naming both.
        """
        version = saved.get("version")
        if version not in (1, CHECKPOINT_VERSION) or "device_state" not in saved:
            raise ValueError(f"not a gradguard checkpoint (version {version!r}, keys {sorted(saved)[:6]})")
        old_names = list(saved["layers"])
        old_numel = saved.get("numel")
        if old_numel is not None:
            mine = {l.name: l.numel for l in self.layers}
            other = [(n, int(k), mine[n]) for n, k in zip(old_names, old_numel) if n in mine and int(k) != mine[n]]
            if other:
                n, k, m = other[0]
                raise ValueError(f"gradguard state was saved for a different model: layer {n!r} had {k} "
                                 f"parameters, this model's has {m} ({len(other)} layer(s) differ); "
                                 "start a fresh GradGuard for a different model")
        if not set(old_names) & set(self.names):
            raise ValueError(f"gradguard state was saved for layers {old_names[:5]}..., this model has "
                             f"{self.names[:5]}... (no layer in common: a different model)")
        old = {k: np.asarray(to_numpy(v), np.float32) for k, v in saved["device_state"].items()}
        fresh = self.initial_state()
        state = remap_layers(old, fresh, old_names, self.names)
        old_policy = saved.get("policy")
        old_pol = sorted(k for k in old if k.startswith(stats.POLICY_PREFIX))
        new_pol = sorted(k for k in fresh if k.startswith(stats.POLICY_PREFIX))
        if old_policy == self.policy.name and set(old_pol) < set(new_pol):
            old_pol = new_pol  # the same policy saved before a field was added: the new field starts fresh
        same_policy = old_pol == new_pol and all(k not in old or np.shape(old[k]) == np.shape(fresh[k])
                                                 for k in new_pol) and (
            old_policy is None or old_policy == self.policy.name)
        if not same_policy:
            warn_user(f"gradguard: the checkpoint's clip policy was {old_policy or old_pol!r}, this run's is "
                      f"{self.policy.name!r}: the spike tracker, findings and totals carry over, the "
                      f"{self.policy.name!r} policy starts fresh")
            for k in new_pol:
                state[k] = fresh[k]
            state["threshold"] = fresh["threshold"]
        monitor_state = dict(saved["monitor"])
        if old_names != self.names:
            monitor_state["history"] = [(step, remap_row(row, old_names, self.names))
                                        for step, row in monitor_state.get("history", [])]
        self.monitor.load_state_dict(monitor_state)
        self.step = int(saved["step_count"])
        return state


# Window accumulators with one column per layer (plus the global one). Not every window field is
# per layer: acc_count/acc_first have a fixed width of 3, which a 2-layer model's width matches.
_PER_LAYER_WINDOW_KEYS = ("acc_sum", "acc_max", "acc_min", "acc_last")


def remap_row(row: Sequence[float], old_names: Sequence[str], new_names: Sequence[str]) -> list[float]:
    """A per-layer row re-ordered by name (NaN for layers the old row did not have)."""
    at = {n: i for i, n in enumerate(old_names)}
    return [float(row[at[n]]) if n in at and at[n] < len(row) else math.nan for n in new_names]


def remap_layers(old: Mapping[str, np.ndarray], fresh: Mapping[str, np.ndarray], old_names: Sequence[str],
                 new_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Device state saved for ``old_names`` fitted to ``new_names``: per-layer columns of the window
    accumulators follow their layer by name (new layers fresh), the global column and every other
    field are kept; fields the old state lacks start fresh."""
    if list(old_names) == list(new_names) and all(k in old and np.shape(old[k]) == np.shape(v)
                                                  for k, v in fresh.items()):
        return {k: np.array(old[k], np.float32) for k in fresh}
    at = {n: i for i, n in enumerate(old_names)}
    src = [at.get(n, -1) for n in new_names]
    width_old = len(old_names) + 1
    out = {}
    for k, v in fresh.items():
        o = old.get(k)
        if o is None:
            out[k] = np.array(v, np.float32)
        elif k in _PER_LAYER_WINDOW_KEYS and np.ndim(o) >= 1 and np.shape(o)[-1] == width_old:
            new = np.array(v, np.float32)
            for j, i in enumerate(src):
                if i >= 0:
                    new[..., j] = o[..., i]
            new[..., -1] = o[..., -1]
            out[k] = new
        elif np.shape(o) == np.shape(v):
            out[k] = np.array(o, np.float32)
        else:
            out[k] = np.array(v, np.float32)
    return out
