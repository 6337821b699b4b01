"""gradguard in Weights & Biases: scalars, gradient histograms, a gradient-flow heatmap, alerts.

    import wandb
    from gradguard.torch import GradGuard
    from gradguard.wandb import WandbSink

    run = wandb.init(project="x")
    guard = GradGuard(model, sinks=[WandbSink()])   # or WandbSink(run)
    # under Lightning: WandbSink(wandb_logger.experiment, scalars=False)

What is written to the run, on every log step, as ONE ``run.log`` row (no ``step=``):

- ``gradguard/step``: the optimizer step of the record (0-based, as ``Finding.step``). Every gradguard key
  is declared with ``run.define_metric(key_glob, step_metric="gradguard/step")``, so W&B plots it against
  the optimizer step whatever the run's own ``_step`` is. This is W&B's documented pattern for a custom
  x-axis and what Lightning's ``WandbLogger`` does with ``trainer/global_step``. Each log step adds
  exactly one row (the run's ``_step`` + 1). A user who logs without ``step=`` is unaffected; a user who
  passes ``step=`` to ``run.log`` needs a counter that grows at least one per gradguard row in between
  (the optimizer step does), or W&B drops the user's rows as out of order.
- the record's scalars (``grad/norm/global``, ``grad/norm/<layer>``, ``grad/depth_ratio``,
  ``gradguard/clip_threshold``, ``gradguard/skipped_steps``, ...) unless ``scalars=False`` (under
  Lightning they already reach W&B through the Trainer's logger);
- ``grad/hist/<layer>``: a ``wandb.Histogram`` of each logged layer's gradient values;
- ``gradguard/gradient_flow``: a heatmap image (layer by log step, log10 of the window-mean per-layer
  gradient L2 norm), redrawn every ``heatmap_every`` log steps and at ``close()``;
- ``gradguard/global_norm_per_step``: the global norm of EVERY optimizer step (not only log steps), as a
  line chart over a ``wandb.Table`` (columns ``step``, ``global_norm``, ``clip_threshold``, ``event``:
  "clipped", "spike", "skipped", "non-finite" or ""), refreshed with the heatmap, so a spike between two log
  steps is visible at its own step without adding a row per step to the run. Kept to ``max_table_steps``
  rows (beyond that every other ordinary step is dropped; steps with an event are always kept).

Findings: each new finding (and a finding whose severity rises to critical) becomes ``run.alert`` with
level WARN/ERROR (its text: the finding, its likely cause, and the remedies, numbered), at most one alert per finding kind per ``alert_interval`` seconds (also passed to W&B
as ``wait_duration``, so the server deduplicates too). Every finding is kept up to date in the run
summary as ``summary["gradguard/finding/<kind>"]`` (a dict: severity, step, layers, message, remedies,
cause, evidence). Not ``summary["gradguard/findings"]``: that key is the logged count of findings.

The run: ``run=None`` follows ``wandb.run``. A sink built before ``wandb.init()`` waits quietly and
attaches to the run when it appears (the heatmap and the per-step table then include the steps before
it; the findings so far go to its summary); when that run finishes and the user starts another one,
the sink attaches to the new one. When the run goes away while training goes on, the sink warns once
that gradguard's records are not reaching W&B until a new run starts.

A failing W&B call raises out of the sink, the monitor turns that into one warning and training goes
on; after a failure the sink stays quiet (no more rendering or logging) until a new run appears.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import numpy as np

try:
    import wandb
except ImportError as exc:  # the extra is not installed
    raise ImportError('gradguard.wandb needs Weights & Biases: pip install "gradguard[wandb]"') from exc

from gradguard.findings import Finding
from gradguard._heatmap import HeatmapColumns, render_heatmap  # noqa: F401  (render_heatmap: public here before)
from gradguard.sinks import LogRecord, Sink

__all__ = ["WandbSink"]

logger = logging.getLogger("gradguard")


_LEVELS = {"warning": "WARN", "critical": "ERROR"}
_RANK = {"warning": 0, "critical": 1}


class WandbSink(Sink):
    """Send gradguard's log records and findings to a W&B run.

    Args:
        run: a ``wandb`` run (e.g. ``WandbLogger.experiment``). ``None``: the active ``wandb.run``,
            looked up at the first log step, so the sink may be built before ``wandb.init()``.
        scalars: log the record's scalars (turn off when another logger already sends them).
        histograms: per-layer gradient histograms on log steps (makes the adapter compute them).
        heatmap_every: redraw the gradient-flow heatmap every this many log steps (and at close);
            ``0`` turns the heatmap off. Needs matplotlib.
        alert_interval: seconds between two alerts of the same finding kind.
        step_metric: the x-axis key written with every row.
        max_heatmap_columns: the heatmap keeps at most this many log steps, evenly spread.
        max_table_steps: the per-step global-norm table keeps about this many steps (0: no table).
    """

    def __init__(self, run: Any = None, *, scalars: bool = True, histograms: bool = True, heatmap_every: int = 10,
                 alert_interval: float = 300.0, step_metric: str = "gradguard/step", max_heatmap_columns: int = 400,
                 max_table_steps: int = 20_000):
        for name, value in (("scalars", scalars), ("histograms", histograms)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if isinstance(heatmap_every, bool) or not isinstance(heatmap_every, int) or heatmap_every < 0:
            raise ValueError(f"heatmap_every must be an int >= 0, got {heatmap_every!r}")
        if not isinstance(alert_interval, (int, float)) or not alert_interval >= 0:
            raise ValueError(f"alert_interval must be a number of seconds >= 0, got {alert_interval!r}")
        if not isinstance(step_metric, str) or not step_metric:
            raise ValueError(f"step_metric must be a non-empty string, got {step_metric!r}")
        if isinstance(max_heatmap_columns, bool) or not isinstance(max_heatmap_columns, int) or max_heatmap_columns < 2:
            raise ValueError(f"max_heatmap_columns must be an int >= 2, got {max_heatmap_columns!r}")
        if isinstance(max_table_steps, bool) or not isinstance(max_table_steps, int) or max_table_steps < 0:
            raise ValueError(f"max_table_steps must be an int >= 0, got {max_table_steps!r}")
        self._given_run = run
        self.scalars = scalars
        self.wants_histograms = histograms  # read by the adapters: compute histograms on log steps
        self.heatmap_every = heatmap_every
        self.alert_interval = float(alert_interval)
        self.step_metric = step_metric
        self.max_heatmap_columns = max_heatmap_columns
        self.max_table_steps = max_table_steps
        self._run: Any = None
        self._failed = False
        self._warned_gone = False
        self._last_step: int | None = None
        self._heat = HeatmapColumns(max_heatmap_columns)
        self._seen = 0  # log steps seen (the heatmap is redrawn every heatmap_every of them)
        self._table: list[list] = []  # per-step rows: step, global norm, clip threshold, event
        self._table_dirty = False
        self._findings: dict[str, Finding] = {}  # the latest of each kind, for a run that appears later
        self._alerted: dict[str, tuple[float, str]] = {}  # kind -> (time of last alert, its severity)

    # ------------------------------------------------------------------ the run

    def _current_run(self) -> Any:
        """The run to write to now, or None (no run yet, or ours finished and no new one started)."""
        if self._given_run is not None:
            run = self._given_run
            if getattr(run, "_is_finished", False):
                self._say_gone(run)
                return None
        else:
            run = wandb.run
            if run is None or getattr(run, "_is_finished", False):
                if self._run is not None:
                    self._say_gone(self._run)
                return None
        if run is not self._run:
            self._attach(run)
        return run

    def _attach(self, run: Any) -> None:
        """A new run (the first one, or the next ``wandb.init()``): declare the x-axis, send it the
        findings so far, and start afresh (a failure on the old run says nothing about this one)."""
        globs = ("grad/*", "gradguard/*") if self.scalars else (
            "grad/hist/*", "gradguard/gradient_flow", "gradguard/global_norm_per_step*")
        run.define_metric(self.step_metric)
        for key in globs:
            run.define_metric(key, step_metric=self.step_metric)
        first = self._run is None
        self._run, self._failed, self._warned_gone, self._alerted = run, False, False, {}
        self._table_dirty = self._table_dirty or bool(self._table)
        self._heat.undrawn = self._heat.undrawn or bool(self._heat.columns)
        if not first:
            logger.info("gradguard: WandbSink attached to the new W&B run %s", getattr(run, "id", run))
        for f in self._findings.values():
            self._finding(run, f)

    def _say_gone(self, run: Any) -> None:
        if not self._warned_gone:
            self._warned_gone = True
            warnings.warn(f"gradguard: WandbSink: the W&B run {getattr(run, 'id', '')} finished while training goes "
                          "on; gradguard's records do not reach W&B until a new wandb.init() run starts (the sink "
                          "attaches to it)", RuntimeWarning, stacklevel=4)

    def _guarded(self, fn, *args) -> None:
        """Run one W&B interaction; after the first failure the sink goes quiet (until a new run)."""
        try:
            run = self._current_run()
        except Exception:
            self._failed = True
            raise
        if run is None or self._failed:
            return
        try:
            fn(run, *args)
        except Exception:
            self._failed = True
            raise

    # ------------------------------------------------------------------ Sink

    def log(self, record: LogRecord) -> None:
        self._last_step = record.step
        self._seen += 1
        if self.heatmap_every:  # kept even while there is no run: it is drawn when one appears
            self._heat.add(record.layer_names, record.layer_norm_mean, record.step)
        if self.max_table_steps:
            self._add_steps(record.per_step)
        self._guarded(self._log, record)

    def finding(self, finding: Finding, new: bool) -> None:
        self._findings[finding.kind] = finding
        self._guarded(self._finding, finding)

    def close(self) -> None:
        run = self._run
        if run is None or self._failed or getattr(run, "_is_finished", False) or (
                self._given_run is None and wandb.run is not run):
            return  # nothing to add, or the user finished the run first: stay silent
        extra = self._charts(final=True)
        if extra:
            self._guarded(lambda r: r.log({self.step_metric: self._last_step, **extra}))

    # ------------------------------------------------------------------ work

    def _log(self, run: Any, record: LogRecord) -> None:
        row: dict[str, Any] = {self.step_metric: record.step}
        if self.scalars:
            row.update(record.scalars)
        if self.wants_histograms and record.histograms:
            for layer, (counts, edges) in record.histograms.items():
                row[f"grad/hist/{layer}"] = wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
        row.update(self._charts(final=False))
        run.log(row)  # one row per log step, no step=: see the module docstring

    def _charts(self, final: bool) -> dict[str, Any]:
        """The heatmap and the per-step table, every ``heatmap_every`` log steps (or at the end)."""
        out: dict[str, Any] = {}
        if not self.heatmap_every or not (final or self._seen % self.heatmap_every == 0):
            return out
        if self._heat.undrawn:
            out.update(self._heatmap())
        if self._table_dirty and self._table:
            self._table_dirty = False
            table = wandb.Table(columns=["step", "global_norm", "clip_threshold", "event"], data=self._table)
            out["gradguard/global_norm_per_step"] = wandb.plot.line(
                table, "step", "global_norm", title="gradguard: global gradient norm, every optimizer step")
        return out

    def _add_steps(self, per_step: Any) -> None:
        if not per_step:
            return
        for i, step in enumerate(per_step["step"]):
            g, thr = per_step["global_norm"][i], per_step["clip_threshold"][i]
            event = ("skipped" if per_step["skipped"][i] else "non-finite" if per_step["nonfinite"][i]
                     else "spike" if per_step["spike"][i] else "clipped" if per_step["clipped"][i] else "")
            self._table.append([int(step), g, thr, event])
        self._table_dirty = True
        if len(self._table) > self.max_table_steps:  # thin ordinary steps, keep every event
            self._table = [r for k, r in enumerate(self._table) if r[3] or k % 2 == 0]

    def _finding(self, run: Any, f: Finding) -> None:
        run.summary[f"gradguard/finding/{f.kind}"] = _jsonable(f.to_dict())
        now = time.monotonic()
        last = self._alerted.get(f.kind)
        due = last is None or (_RANK[f.severity] > _RANK[last[1]])
        if due and (last is None or now - last[0] >= self.alert_interval):
            run.alert(title=f"gradguard: {f.kind} gradients"[:63], text=_alert_text(f),
                      level=_LEVELS[f.severity], wait_duration=max(self.alert_interval, 1.0))
            self._alerted[f.kind] = (now, f.severity)

    # ------------------------------------------------------------------ heatmap

    def _add_column(self, record: LogRecord) -> None:  # kept for tests and subclasses
        self._heat.add(record.layer_names, record.layer_norm_mean, record.step)

    def _heatmap(self) -> dict[str, Any]:
        image = self._heat.render()
        return {} if image is None else {"gradguard/gradient_flow": wandb.Image(image, caption=(
            "log10 gradient L2 norm per layer (rows, forward order) and log step (columns)"))}


def _alert_text(f: Finding) -> str:
    """The finding, why it happens, and what to do about it; the full record is in the run summary."""
    text = str(f)
    if f.cause:
        text += f"\nLikely cause: {f.cause}."
    if f.remedies:
        text += "\nRemedies for this finding:\n" + "\n".join(f"{i}. {r}" for i, r in enumerate(f.remedies[:5], 1))
    text += f"\nDetails: run summary gradguard/finding/{f.kind}."
    return text[:2000]


def _jsonable(value: Any) -> Any:
    """Summary values as plain JSON: non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
