"""The monitor turns one window of statistics into findings, actions and a log record.

It decides; the adapters act (scale gradients, skip steps, switch clipping on). It is the same
object under every framework, so findings, remedies and logged keys are the same everywhere.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
import os
import sys
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from gradguard import detectors as det
from gradguard.clipping import ClipPolicy
from gradguard.findings import Finding
from gradguard.layers import LayerInfo, ModelFacts, check_layers
from gradguard.sinks import LogRecord, Sink, SinkSet
from gradguard import stats
from gradguard.stats import Snapshot, WindowStats

logger = logging.getLogger("gradguard")
logger.addHandler(logging.NullHandler())  # the host's logging configuration decides what is printed

_SEVERITY_RANK = {"warning": 0, "critical": 1}
# Counters over the run. "skipped": non-finite steps gradguard kept from the weights;
# "loss_scale_skipped": non-finite steps a loss scaler (fp16's GradScaler) skipped itself.
_TOTALS = {"steps": 0, "skipped": 0, "nonfinite": 0, "clipped": 0, "spikes": 0, "explosions": 0,
           "loss_scale_skipped": 0}


class GradGuardWarning(UserWarning):
    """Emitted once per new finding, located at the user's own line (the ``guard.step(...)``,
    ``optimizer.step()``, ``trainer.fit(...)`` or ``model.fit(...)`` call that led to it)."""


# Frames inside these packages are not the user's: a warning points past them.
_LIBRARY_PREFIXES = ("gradguard", "torch", "lightning", "pytorch_lightning", "lightning_fabric",
                     "lightning_utilities", "keras", "tensorflow", "jax", "jaxlib", "transformers", "accelerate",
                     "optree")
_GRADGUARD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_library_frame(frame) -> bool:
    module = frame.f_globals.get("__name__", "") or ""
    top = module.split(".", 1)[0]
    if top in _LIBRARY_PREFIXES:
        return True
    filename = frame.f_code.co_filename
    return filename.startswith(_GRADGUARD_DIR) or filename.startswith("<frozen ") or "/contextlib.py" in filename


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from the caller of this function that points at
    the first frame outside gradguard and the host frameworks (the user's call)."""
    frame = sys._getframe(2)  # the function that will call warnings.warn
    level = 1
    while frame is not None and _is_library_frame(frame):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` located at the user's line (see ``user_stacklevel``)."""
    warnings.warn(message, category, stacklevel=user_stacklevel() + 1)


@dataclasses.dataclass
class Decision:
    """What the adapter should do after a log step."""

    enable_clipping: bool = False
    new_findings: tuple[Finding, ...] = ()


def select_layers(n: int, max_layers: int | None) -> np.ndarray:
    """Indices of the layers that get per-layer scalars: all, or evenly spread over depth, always
    keeping the first and the last (where vanishing and explosion show first)."""
    if max_layers is None or n <= max_layers:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_layers)).astype(int))


class Monitor:
    """Decides, from one window at a time. ``policy`` tells it whether the clip policy has a latch
    it may close (``ClipPolicy.latch``); ``policy_name`` only names the policy in findings."""

    def __init__(self, layers: Sequence[LayerInfo], facts: ModelFacts = ModelFacts(), *, policy_name: str = "none",
                 skip_nonfinite: bool = True, sinks: Iterable[Sink] = (), config: det.DetectorConfig | None = None,
                 max_logged_layers: int | None = 32, logging_rank: bool = True, history_size: int = 10_000,
                 policy: ClipPolicy | None = None):
        self.layers = check_layers(layers)
        self.facts = facts
        self.policy_name = policy.name if policy is not None else policy_name
        # the state field that latches clipping on (None: the policy has no latch)
        self.latch = policy.latch if policy is not None else ("enabled" if policy_name == "auto" else None)
        self.skip_nonfinite = skip_nonfinite
        self.sinks = SinkSet(sinks)
        self.config = config or det.DetectorConfig()
        if max_logged_layers is not None and (isinstance(max_logged_layers, bool) or
                                              not isinstance(max_logged_layers, int) or max_logged_layers < 2):
            raise ValueError(f"max_logged_layers must be None or an int >= 2, got {max_logged_layers!r}")
        self.logged = select_layers(len(self.layers), max_logged_layers)
        self.logging_rank = logging_rank
        self._findings: dict[str, Finding] = {}
        self._det_state: dict[str, dict] = {k: {} for k in det.DETECTOR_STATES}
        self.totals = dict(_TOTALS)
        self.clip_enabled_step: int | None = None
        self.history: collections.deque = collections.deque(maxlen=history_size)
        self._unreported_trace: list[tuple[int, np.ndarray]] = []  # per-step rows of windows judged, not logged

    # ------------------------------------------------------------------ results

    @property
    def findings(self) -> list[Finding]:
        return sorted(self._findings.values(), key=lambda f: (f.step, f.kind))

    # ------------------------------------------------------------------ one log step

    def peek(self, window: WindowStats, snapshot: Snapshot | None = None) -> tuple[list[Finding], dict[str, int]]:
        """Findings and totals as if ``window`` were judged now, without judging it: nothing reaches
        the sinks or the warnings, and the monitor is left exactly as it was (a pure look)."""
        saved = (copy.deepcopy(self._findings), copy.deepcopy(self._det_state), dict(self.totals),
                 self.clip_enabled_step, self.history, self.sinks, self.logging_rank, list(self._unreported_trace))
        try:
            self.history = collections.deque(maxlen=1)
            self.sinks, self.logging_rank = SinkSet(()), False
            self.observe(window, snapshot, report=False)
            return self.findings, dict(self.totals)
        finally:
            (self._findings, self._det_state, self.totals, self.clip_enabled_step, self.history, self.sinks,
             self.logging_rank, self._unreported_trace) = saved

    def observe(self, window: WindowStats, snapshot: Snapshot | None = None, report: bool = True) -> Decision:
        """Run the detectors on one window; with ``report`` also log its record to the sinks (the
        first optimizer step is judged but not logged, so it never claims a row of the user's own
        step counter in W&B or the Trainer's loggers). New findings always reach the sinks."""
        if window.steps == 0:
            return Decision()
        t = self.totals
        t["steps"] += window.steps
        t["nonfinite"] += window.nonfinite_steps
        t["skipped"] += window.nonfinite_steps if self.skip_nonfinite else 0
        t["loss_scale_skipped"] += window.loss_scale_skipped
        t["clipped"] += window.clipped_steps
        t["spikes"] += window.spikes
        t["explosions"] += window.explosions
        enabled = self.latch is not None and window.policy_state.get(self.latch, 0.0) > 0
        newly_enabled = enabled and self.clip_enabled_step is None
        if newly_enabled:
            self.clip_enabled_step = (window.first_explosion_step if window.first_explosion_step is not None
                                      else window.last_step)

        cfg, L = self.config, self.layers
        st = self._det_state
        dead = det.dead(L, window, snapshot, self.facts, cfg, st["dead"])
        explosion = det.exploding(L, window, snapshot, self.facts, cfg, st["exploding"], self.policy_name)
        candidates = [
            # judged independently of dead units; a dead layer in the collapse is named as its cause
            det.vanishing(L, window, snapshot, self.facts, cfg, st["vanishing"],
                          dead_layers=tuple(dict.fromkeys((dead.layers if dead else ()) + (
                              self._findings["dead"].layers if "dead" in self._findings else ())))),
            explosion,
            det.nonfinite(L, window, self.facts, self.skip_nonfinite,
                          explosion is not None or "exploding" in self._findings, st["nonfinite"]),
            dead,
            det.saturated(window, snapshot, cfg, st["saturated"]),
        ]
        decision = Decision()
        new = []
        for c in candidates:
            if c is None:
                continue
            finding, is_new = self._merge(c, window.last_step)
            if is_new:
                new.append(finding)
            if self.logging_rank:
                self.sinks.finding(finding, is_new)
        if self.latch is not None and not enabled and "exploding" in {c.kind for c in candidates if c}:
            decision.enable_clipping = True  # an explosion the device-side tracker did not catch
            self.clip_enabled_step = window.last_step
        decision.new_findings = tuple(new)
        for f in new:
            self._emit(f)

        if window.trace is not None:  # every step reaches the log, also those of unreported windows
            self._unreported_trace = self._unreported_trace[-15:] + [(window.trace_first_step, window.trace)]
        if report:
            record = self._record(window, snapshot)
            record.per_step = per_step_record(self._unreported_trace, self.skip_nonfinite)
            record.layer_numel = np.array([l.numel for l in self.layers], dtype=np.int64)
            self._unreported_trace = []
            self.history.append((record.step, record.layer_norm_mean.astype(np.float32)))
            if self.logging_rank:  # every rank decides the same; only one reports
                self.sinks.log(record)
        return decision

    def _merge(self, c: det.Candidate, now: int) -> tuple[Finding, bool]:
        old = self._findings.get(c.kind)
        if old is None:
            f = Finding(c.kind, int(c.step), c.layers, c.severity, c.message, c.remedies, c.evidence, c.cause)
            self._findings[c.kind] = f
            return f, True
        layers = tuple(dict.fromkeys(old.layers + c.layers)) if c.kind in ("dead", "nonfinite", "saturated") else c.layers
        severity = max(old.severity, c.severity, key=_SEVERITY_RANK.__getitem__)
        # ``step`` stays the step at which the condition was first established; the latest evidence
        # says when it was last confirmed (the window's end), never a step of its own.
        f = dataclasses.replace(old, layers=layers, severity=severity, message=c.message, remedies=c.remedies,
                                evidence={**c.evidence, "updated_at_step": int(now)}, cause=c.cause or old.cause)
        self._findings[c.kind] = f
        return f, False

    def _emit(self, f: Finding) -> None:
        if not self.logging_rank:
            return
        text = f"gradguard: {f}" + (f" Remedies: {' '.join(f.remedies[:3])}" if f.remedies else "")
        logger.info(text)  # silent unless the host's logging asks for gradguard's INFO records
        warn_user(text, GradGuardWarning)

    # ------------------------------------------------------------------ the log record

    def _record(self, w: WindowStats, snap: Snapshot | None) -> LogRecord:
        names = tuple(l.name for l in self.layers)
        numel = np.array([l.numel for l in self.layers], dtype=np.float64)
        s: dict[str, float] = {
            "grad/norm/global": w.global_norm_last,
            "grad/norm/global_mean": w.global_norm_mean,
            "grad/norm/global_max": w.global_norm_max,
            "grad/depth_ratio": depth_ratio(w.layer_norm_mean / np.sqrt(numel), w.layer_steps),
        }
        norm = snap.norm if snap is not None and snap.norm is not None else w.layer_norm_last
        per_layer = {"norm": norm, "norm_max": w.layer_norm_max}
        if snap is not None:
            per_layer.update(rms=snap.rms, max_abs=snap.max_abs, zero_frac=snap.zero_frac)
            if snap.weight_norm is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    per_layer["grad_to_weight"] = norm / snap.weight_norm
                    if snap.update_norm is not None:
                        per_layer["update_to_weight"] = snap.update_norm / snap.weight_norm
        for stat, values in per_layer.items():
            if values is None:
                continue
            for i in self.logged:
                s[f"grad/{stat}/{names[i]}"] = float(values[i])
        t = self.totals
        enabled = (w.policy_state.get(self.latch, 0.0) > 0) if self.latch is not None else math.isfinite(w.threshold)
        s.update({
            "gradguard/clip_enabled": float(enabled and math.isfinite(w.threshold)),
            "gradguard/clipped_steps": float(t["clipped"]),
            "gradguard/skipped_steps": float(t["skipped"]),
            "gradguard/nonfinite_steps": float(t["nonfinite"]),
            "gradguard/spikes": float(t["spikes"]),
            "gradguard/findings": float(len(self._findings)),
        })
        if t["loss_scale_skipped"]:  # (only in runs with a loss scaler that skipped)
            s["gradguard/loss_scale_skipped_steps"] = float(t["loss_scale_skipped"])
        if math.isfinite(w.threshold):
            s["gradguard/clip_threshold"] = w.threshold
        return LogRecord(w.last_step, s, names, np.asarray(norm, dtype=np.float64),
                         np.asarray(w.layer_norm_mean, dtype=np.float64),
                         snap.histograms if snap is not None else None)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        def plain(d):
            return {k: (v.tolist() if isinstance(v, np.ndarray) else plain(v) if isinstance(v, dict) else v)
                    for k, v in d.items()}

        return {
            "findings": [f.to_dict() for f in self._findings.values()],
            "detectors": plain(self._det_state),
            "totals": dict(self.totals),
            "clip_enabled_step": self.clip_enabled_step,
            "history": [(step, row.tolist()) for step, row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._findings = {f["kind"]: Finding.from_dict(f) for f in state["findings"]}
        det_state = state["detectors"]
        # detectors read their state back with np.asarray, so plain lists from a checkpoint are fine
        self._det_state = {k: dict(det_state.get(k, {})) for k in det.DETECTOR_STATES}
        self.totals = {**_TOTALS, **state["totals"]}
        self.clip_enabled_step = state["clip_enabled_step"]
        self.history.clear()
        for step, row in state.get("history", []):
            self.history.append((int(step), np.asarray(row, dtype=np.float32)))

    def close(self) -> None:
        self.sinks.close()


def per_step_record(parts: Sequence[tuple[int, np.ndarray]], skip_nonfinite: bool) -> dict[str, list] | None:
    """The per-step trace rows (see ``stats.TRACE_*``) of one or more windows as plain lists, one
    entry per optimizer step: the JSON-lines record's ``per_step``. Non-finite norms and thresholds
    (no clipping) are None."""
    if not parts:
        return None
    steps = np.concatenate([np.arange(first, first + len(rows)) for first, rows in parts])
    rows = np.concatenate([rows for _, rows in parts]).astype(np.float64)
    flags = np.nan_to_num(rows[:, stats.TRACE_FLAGS]).astype(np.int64)

    def values(col):
        return [float(v) if math.isfinite(v) else None for v in rows[:, col]]

    nonfinite = (flags & stats.FLAG_NONFINITE) > 0
    return {
        "step": steps.tolist(),
        "global_norm": values(stats.TRACE_NORM),
        "clip_threshold": values(stats.TRACE_THRESHOLD),
        "scale": [float(v) for v in np.nan_to_num(rows[:, stats.TRACE_SCALE], nan=1.0)],
        "nonfinite": nonfinite.astype(int).tolist(),
        "skipped": (nonfinite & skip_nonfinite).astype(int).tolist(),
        "clipped": ((flags & stats.FLAG_CLIPPED) > 0).astype(int).tolist(),
        "spike": ((flags & stats.FLAG_SPIKE) > 0).astype(int).tolist(),
        "explosion": ((flags & stats.FLAG_EXPLOSION) > 0).astype(int).tolist(),
        "loss_scale_skipped": ((flags & stats.FLAG_SCALER_SKIP) > 0).astype(int).tolist(),
    }


def depth_ratio(rms: np.ndarray, layer_steps: np.ndarray) -> float:
    """First layer's gradient RMS over the last layer's (layers that had a gradient): the depth
    profile in one number. ~1e-12 in a collapsed sigmoid stack, 0.5 to 200 in healthy nets."""
    valid = np.flatnonzero((layer_steps > 0) & np.isfinite(rms))
    if len(valid) < 2 or rms[valid[-1]] <= 0:
        return math.nan
    return float(rms[valid[0]] / rms[valid[-1]])
