"""The monitor turns one window of statistics into findings, actions and a log record.

It decides; the adapters act (scale gradients, skip steps, switch clipping on). It is the same
object under every framework, so findings, remedies and logged keys are the same everywhere.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from gradguard import detectors as det
from gradguard.findings import Finding
from gradguard.layers import LayerInfo, ModelFacts, check_layers
from gradguard.sinks import LogRecord, Sink, SinkSet
from gradguard.stats import Snapshot, WindowStats

logger = logging.getLogger("gradguard")

_SEVERITY_RANK = {"warning": 0, "critical": 1}


class GradGuardWarning(UserWarning):
    """Emitted once per finding."""


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
    def __init__(self, layers: Sequence[LayerInfo], facts: ModelFacts = ModelFacts(), *, policy_name: str = "none",
                 skip_nonfinite: bool = True, sinks: Iterable[Sink] = (), config: det.DetectorConfig | None = None,
                 max_logged_layers: int | None = 32, logging_rank: bool = True, history_size: int = 10_000):
        self.layers = check_layers(layers)
        self.facts = facts
        self.policy_name = policy_name
        self.skip_nonfinite = skip_nonfinite
        self.sinks = SinkSet(sinks)
        self.config = config or det.DetectorConfig()
        if max_logged_layers is not None and (not isinstance(max_logged_layers, int) or max_logged_layers < 2):
            raise ValueError(f"max_logged_layers must be None or an int >= 2, got {max_logged_layers!r}")
        self.logged = select_layers(len(self.layers), max_logged_layers)
        self.logging_rank = logging_rank
        self._findings: dict[str, Finding] = {}
        self._det_state: dict[str, dict] = {k: {} for k in det.DETECTOR_STATES}
        self.totals = {"steps": 0, "skipped": 0, "nonfinite": 0, "clipped": 0, "spikes": 0, "explosions": 0}
        self.clip_enabled_step: int | None = None
        self.history: collections.deque = collections.deque(maxlen=history_size)

    # ------------------------------------------------------------------ results

    @property
    def findings(self) -> list[Finding]:
        return sorted(self._findings.values(), key=lambda f: (f.step, f.kind))

    # ------------------------------------------------------------------ one log step

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
        t["clipped"] += window.clipped_steps
        t["spikes"] += window.spikes
        t["explosions"] += window.explosions
        enabled = window.policy_state.get("enabled", 0.0) > 0
        newly_enabled = enabled and self.clip_enabled_step is None
        if newly_enabled:
            self.clip_enabled_step = (window.first_explosion_step if window.first_explosion_step is not None
                                      else window.last_step)

        cfg, L = self.config, self.layers
        st = self._det_state
        dead = det.dead(L, window, snapshot, self.facts, cfg, st["dead"])
        explosion = det.exploding(L, window, snapshot, self.facts, cfg, st["exploding"], self.policy_name, enabled)
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
        if self.policy_name == "auto" and not enabled and "exploding" in {c.kind for c in candidates if c}:
            decision.enable_clipping = True  # an explosion the device-side tracker did not catch
            self.clip_enabled_step = window.last_step
        decision.new_findings = tuple(new)
        for f in new:
            self._emit(f)

        if report:
            record = self._record(window, snapshot)
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
        logger.warning(text)
        warnings.warn(text, GradGuardWarning, stacklevel=4)

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
        enabled = w.policy_state.get("enabled", 1.0 if math.isfinite(w.threshold) else 0.0) > 0
        s.update({
            "gradguard/clip_enabled": float(enabled and math.isfinite(w.threshold)),
            "gradguard/clipped_steps": float(t["clipped"]),
            "gradguard/skipped_steps": float(t["skipped"]),
            "gradguard/nonfinite_steps": float(t["nonfinite"]),
            "gradguard/spikes": float(t["spikes"]),
            "gradguard/findings": float(len(self._findings)),
        })
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
        self.totals = dict(state["totals"])
        self.clip_enabled_step = state["clip_enabled_step"]
        self.history.clear()
        for step, row in state.get("history", []):
            self.history.append((int(step), np.asarray(row, dtype=np.float32)))

    def close(self) -> None:
        self.sinks.close()


def depth_ratio(rms: np.ndarray, layer_steps: np.ndarray) -> float:
    """First layer's gradient RMS over the last layer's (layers that had a gradient): the depth
    profile in one number. ~1e-12 in a collapsed sigmoid stack, 0.5 to 200 in healthy nets."""
    valid = np.flatnonzero((layer_steps > 0) & np.isfinite(rms))
    if len(valid) < 2 or rms[valid[-1]] <= 0:
        return math.nan
    return float(rms[valid[0]] / rms[valid[-1]])
