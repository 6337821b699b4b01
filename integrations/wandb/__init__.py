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
  gradient L2 norm), redrawn every ``heatmap_every`` log steps and at ``close()``.

Findings: each new finding (and a finding whose severity rises to critical) becomes ``run.alert`` with
level WARN/ERROR, at most one alert per finding kind per ``alert_interval`` seconds (also passed to W&B
as ``wait_duration``, so the server deduplicates too). Every finding is kept up to date in the run
summary as ``summary["gradguard/finding/<kind>"]`` (a dict: severity, step, layers, message, remedies,
cause, evidence). Not ``summary["gradguard/findings"]``: that key is the logged count of findings.

A failing W&B call raises out of the sink, the monitor turns that into one warning and training goes
on; after a failure the sink stays quiet (no more rendering or logging).
"""

from __future__ import annotations

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
from gradguard.sinks import LogRecord, Sink

__all__ = ["WandbSink"]


class NoActiveRun(RuntimeError):
    """No run was given and ``wandb.run`` is None (yet): the next log step tries again."""


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
    """

    def __init__(self, run: Any = None, *, scalars: bool = True, histograms: bool = True, heatmap_every: int = 10,
                 alert_interval: float = 300.0, step_metric: str = "gradguard/step", max_heatmap_columns: int = 400):
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
        self._given_run = run
        self.scalars = scalars
        self.wants_histograms = histograms  # read by the adapters: compute histograms on log steps
        self.heatmap_every = heatmap_every
        self.alert_interval = float(alert_interval)
        self.step_metric = step_metric
        self.max_heatmap_columns = max_heatmap_columns
        self._run: Any = None
        self._failed = False
        self._last_step: int | None = None
        # heatmap: one column per kept log step; keep every `_stride`-th log step, doubling the
        # stride (and dropping every other column) when full, so columns stay evenly spaced.
        self._layer_names: tuple[str, ...] = ()
        self._columns: list[np.ndarray] = []
        self._column_steps: list[int] = []
        self._stride = 1
        self._seen = 0
        self._undrawn = False  # a column was added since the heatmap was last drawn
        self._alerted: dict[str, tuple[float, str]] = {}  # kind -> (time of last alert, its severity)

    # ------------------------------------------------------------------ the run

    def _get_run(self) -> Any:
        if self._run is None:
            run = self._given_run if self._given_run is not None else wandb.run
            if run is None:  # not fatal: a run started later is picked up at the next log step
                raise NoActiveRun("WandbSink: no active W&B run; call wandb.init() before training or pass run=")
            globs = ("grad/*", "gradguard/*") if self.scalars else ("grad/hist/*", "gradguard/gradient_flow")
            run.define_metric(self.step_metric)
            for key in globs:
                run.define_metric(key, step_metric=self.step_metric)
            self._run = run
        return self._run

    def _guarded(self, fn, *args) -> None:
        """Run one W&B interaction; after the first failure the sink goes quiet."""
        if self._failed:
            return
        try:
            fn(*args)
        except NoActiveRun:
            raise
        except Exception:
            self._failed = True
            raise

    # ------------------------------------------------------------------ Sink

    def log(self, record: LogRecord) -> None:
        self._guarded(self._log, record)

    def finding(self, finding: Finding, new: bool) -> None:
        self._guarded(self._finding, finding)

    def close(self) -> None:
        run = self._run
        if run is None or self._failed or getattr(run, "_is_finished", False):
            return  # nothing to add, or the user finished the run first: stay silent
        if self.heatmap_every and self._undrawn:
            self._guarded(lambda: run.log({self.step_metric: self._last_step, **self._heatmap()}))

    # ------------------------------------------------------------------ work

    def _log(self, record: LogRecord) -> None:
        run = self._get_run()
        self._last_step = record.step
        row: dict[str, Any] = {self.step_metric: record.step}
        if self.scalars:
            row.update(record.scalars)
        if self.wants_histograms and record.histograms:
            for layer, (counts, edges) in record.histograms.items():
                row[f"grad/hist/{layer}"] = wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
        if self.heatmap_every:
            self._add_column(record)
            if self._seen % self.heatmap_every == 0:
                row.update(self._heatmap())
        run.log(row)  # one row per log step, no step=: see the module docstring

    def _finding(self, f: Finding) -> None:
        run = self._get_run()
        run.summary[f"gradguard/finding/{f.kind}"] = _jsonable(f.to_dict())
        now = time.monotonic()
        last = self._alerted.get(f.kind)
        due = last is None or (_RANK[f.severity] > _RANK[last[1]])
        if due and (last is None or now - last[0] >= self.alert_interval):
            run.alert(title=f"gradguard: {f.kind} gradients"[:63], text=_alert_text(f),
                      level=_LEVELS[f.severity], wait_duration=max(self.alert_interval, 1.0))
            self._alerted[f.kind] = (now, f.severity)

    # ------------------------------------------------------------------ heatmap

    def _add_column(self, record: LogRecord) -> None:
        if record.layer_names != self._layer_names:  # a new layout starts a new picture
            self._layer_names = tuple(record.layer_names)
            self._columns, self._column_steps, self._stride, self._seen = [], [], 1, 0
        self._seen += 1
        if (self._seen - 1) % self._stride:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            col = np.log10(np.asarray(record.layer_norm_mean, dtype=np.float64))
        self._columns.append(np.where(np.isfinite(col), col, np.nan).astype(np.float32))
        self._column_steps.append(record.step)
        self._undrawn = True
        if len(self._columns) > self.max_heatmap_columns:
            self._columns, self._column_steps = self._columns[::2], self._column_steps[::2]
            self._stride *= 2

    def _heatmap(self) -> dict[str, Any]:
        self._undrawn = False
        image = render_heatmap(np.stack(self._columns, axis=1), self._layer_names, self._column_steps)
        return {} if image is None else {"gradguard/gradient_flow": wandb.Image(image, caption=(
            "log10 gradient L2 norm per layer (rows, forward order) and log step (columns)"))}


def render_heatmap(values: np.ndarray, layer_names: tuple[str, ...], steps: list[int]) -> np.ndarray | None:
    """An RGB image of ``values`` (layers x log steps, log10 norms). Uses matplotlib's Agg canvas
    directly, so the user's pyplot state and backend are left alone. None without matplotlib."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("gradguard.wandb: matplotlib is not installed, so no gradient-flow heatmap is drawn",
                      RuntimeWarning, stacklevel=2)
        return None
    n_layers, n_steps = values.shape
    fig = Figure(figsize=(8, min(2.0 + 0.22 * n_layers, 14)), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: no gradient (or exactly 0) in that window
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    rows = np.unique(np.linspace(0, n_layers - 1, min(n_layers, 40)).round().astype(int))
    ax.set_yticks(rows, [layer_names[i] for i in rows], fontsize=7)
    cols = np.unique(np.linspace(0, n_steps - 1, min(n_steps, 8)).round().astype(int))
    ax.set_xticks(cols, [str(steps[i]) for i in cols], fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (forward order)")
    ax.set_title("gradient flow: log10 per-layer gradient norm", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 L2 norm")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _alert_text(f: Finding) -> str:
    text = str(f)
    if f.remedies:
        text += "\nRemedies:\n" + "\n".join(f"- {r}" for r in f.remedies[:4])
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
