"""gradguard for Keras 3 (TensorFlow, JAX and torch backends).

    from gradguard.keras import GradGuardCallback
    guard = GradGuardCallback(clip="auto")
    model.fit(x, y, callbacks=[guard])
    print(guard.findings)          # list of gradguard.Finding

Keras callbacks never see gradients, so the callback hooks the optimizer's ``apply`` (every
backend's train step goes through it) for the duration of ``fit``. The hook runs inside the
compiled step: statistics with ``keras.ops``, clipping with a threshold held in a Variable,
a non-finite step skipped with a conditional (weights and optimizer slots untouched). The state
lives in three Variables tracked by the optimizer; the callback reads them on log steps only, runs
the core's detectors and puts the scalars into ``logs`` (History, CSVLogger, TensorBoard and
W&B's WandbMetricsLogger see them). See ``_graph.py`` for the in-graph half.

What is measured: the gradients the optimizer receives (the all-reduced ones under
``tf.distribute``; the global ones under ``jax.jit`` with ``keras.distribution``), before the
optimizer's own ``clipnorm``/``global_clipnorm``, unscaled by ``loss_scale_factor``. With a
``LossScaleOptimizer`` the inner optimizer is hooked: gradguard sees the unscaled gradients of
the steps the loss scaler lets through, and leaves the loss scaler's own skips to it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any

import keras
import numpy as np

from gradguard import clipping, stats
from gradguard.detectors import DetectorConfig
from gradguard.findings import Finding
from gradguard.layers import LayerInfo
from gradguard.monitor import Monitor
from gradguard.sinks import LogRecord, Sink, make_sinks

from gradguard.keras import _compat
from gradguard.keras._graph import ApplyHook, keras_ops, make_hook
from gradguard.keras._model import describe_model

__all__ = ["GradGuardCallback", "describe_model", "keras_ops"]

logger = logging.getLogger("gradguard")
_compat.check_keras_version()

_LOGS_MODES = ("norms", "all", None)
_KERAS_CLIP_ARGS = ("global_clipnorm", "clipnorm", "clipvalue")


class _LastRecord(Sink):
    """Keeps the monitor's latest log record, so its scalars can go into Keras ``logs``."""

    def __init__(self):
        self.record: LogRecord | None = None

    def log(self, record: LogRecord) -> None:
        self.record = record


class GradGuardCallback(keras.callbacks.Callback):
    """Watch, diagnose and protect a Keras model's gradients inside ``model.fit``.

    Args:
        clip: ``"auto"`` (default: off until a spike or explosion, then adaptive), ``"zscore"``
            (ZClip), ``"percentile"`` (AutoClip), ``"agc"`` (unit-wise, NFNets; a unit is a kernel's
            last axis), a float (fixed max global norm), ``None`` (monitor only), or a
            ``gradguard.ClipPolicy``. If the optimizer has its own ``clipnorm``,
            ``global_clipnorm`` or ``clipvalue``, that clipping stays in charge and gradguard
            does not clip on top of it (it measures the gradients before it; a
            ``global_clipnorm`` is reported as ``gradguard/clip_threshold``).
        log_every_n_steps: how often statistics leave the device, detectors run and scalars are
            logged (plus the end of every epoch; the first step is judged too, not logged). With
            ``steps_per_execution=k`` it is rounded up to a multiple of k.
        skip_nonfinite: skip a step whose gradients hold NaN/Inf, in-graph: the weights and the
            optimizer's slots and iteration counter are untouched.
        sinks: ``None``, a directory or ``.jsonl`` path, a ``gradguard.Sink`` (for example
            ``gradguard.wandb.WandbSink()``), or a list of them.
        max_logged_layers: per-layer scalars for at most this many layers, spread over depth.
        logs: which scalars go into Keras ``logs`` on log steps and epoch ends: ``"norms"``
            (default: ``grad/norm/*``, ``grad/depth_ratio`` and ``gradguard/*``), ``"all"``
            (every scalar the sinks get) or ``None``.
        histograms: per-layer gradient histograms on log steps (default: when a sink asks for them).
        measure_updates: measure the update the optimizer applied on log steps (a strided sample of
            at most 4096 elements per variable), for the "updates dwarf the weights" test.
    """

    def __init__(self, clip: Any = "auto", log_every_n_steps: int = 50, skip_nonfinite: bool = True,
                 sinks: Any = None, *, max_logged_layers: int | None = 32, logs: str | None = "norms",
                 histograms: bool | None = None, measure_updates: bool = True,
                 detector_config: DetectorConfig | None = None,
                 tracker_config: stats.TrackerConfig | None = None):
        super().__init__()
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        if logs not in _LOGS_MODES:
            raise ValueError(f"logs must be one of {_LOGS_MODES}, got {logs!r}")
        if max_logged_layers is not None and (isinstance(max_logged_layers, bool) or
                                              not isinstance(max_logged_layers, int) or max_logged_layers < 2):
            raise ValueError(f"max_logged_layers must be None or an int >= 2, got {max_logged_layers!r}")
        self.clip = clip
        self.policy = clipping.resolve(clip)  # raises on a bad clip= now, not at fit time
        self.log_every_n_steps = log_every_n_steps
        self.skip_nonfinite = skip_nonfinite
        self.logs_mode = logs
        self.max_logged_layers = max_logged_layers
        self.measure_updates = bool(measure_updates)
        self.detector_config = detector_config
        self.tracker = tracker_config or stats.TrackerConfig()
        self._last = _LastRecord()
        self._sinks = make_sinks(sinks)
        self.histograms = histograms if histograms is not None else any(
            getattr(s, "wants_histograms", False) for s in self._sinks)
        self.monitor: Monitor | None = None
        self.layers: list[LayerInfo] = []
        self.active_policy: clipping.ClipPolicy | None = None  # what runs: may be the optimizer's own clipping
        self._hook: ApplyHook | None = None
        self._device: tuple[dict, int] | None = None  # state carried between fit calls / from load_state_dict
        self._pending_monitor: dict | None = None
        self._host_steps = 0
        self._epoch_base = 0
        self._next_log = log_every_n_steps
        self._every = log_every_n_steps
        self.trace_count = 0  # times the hooked step was traced (TF/JAX) or run (torch, eager)

    # ------------------------------------------------------------------ results

    @property
    def findings(self) -> list[Finding]:
        """Findings so far (steps since the last log step are evaluated at the end of every epoch
        and of ``fit``)."""
        return self.monitor.findings if self.monitor is not None else []

    @property
    def skipped_steps(self) -> int:
        return self.monitor.totals["skipped"] if self.monitor is not None else 0

    @property
    def history(self):
        """``(step, per-layer window-mean gradient norm)`` per log step, for reports and heatmaps."""
        return list(self.monitor.history) if self.monitor is not None else []

    # ------------------------------------------------------------------ fit lifecycle

    def on_train_begin(self, logs=None):
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("GradGuardCallback needs a compiled model with an optimizer (model.optimizer is None)")
        target = optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            target = optimizer.inner_optimizer  # unscaled gradients, only the steps the scaler applies
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        self._every = self.log_every_n_steps
        if self._every % spe:
            self._every = -(-self._every // spe) * spe
            warnings.warn(f"gradguard: log_every_n_steps={self.log_every_n_steps} is not a multiple of "
                          f"steps_per_execution={spe}; logging every {self._every} steps", stacklevel=2)
        self._next_log = (self._host_steps // self._every + 1) * self._every
        self._hook = make_hook(target, configure=lambda: self._configure(model, target))
        if model.trainable_variables:
            if not optimizer.built:  # TF without a strategy builds it in the first trace; do it now
                with _strategy_scope(model):
                    optimizer.build(model.trainable_variables)
            self._configure(model, target)
        # else (TF, a model built by its first trace): configured inside that trace
        self._hook.install()
        model.make_train_function(force=True)  # retrace with the hook in place

    def _configure(self, model, target) -> None:
        hook = self._hook
        layout = describe_model(model)
        names = [l.name for l in layout.layers]
        if self.monitor is None:
            self.layers = layout.layers
            self.active_policy, apply_clip = self._policy_for(target)
            self.monitor = Monitor(self.layers, layout.facts, policy_name=self.active_policy.name,
                                   skip_nonfinite=self.skip_nonfinite, sinks=[self._last] + self._sinks,
                                   config=self.detector_config, max_logged_layers=self.max_logged_layers)
            if self._pending_monitor is not None:
                self._check_layers(self._pending_monitor["layers"], names)
                self.monitor.load_state_dict(self._pending_monitor["monitor"])
                self._pending_monitor = None
        else:
            self._check_layers([l.name for l in self.layers], names)
            self.active_policy, apply_clip = self._policy_for(target)
        hist_layers = [int(i) for i in self.monitor.logged] if self.histograms else []
        hook.configure(layers=self.layers, layer_of_var=layout.layer_of_var, unit_kernel=layout.unit_kernel,
                       unit_bias=layout.unit_bias,
                       policy=self.active_policy, tracker=self.tracker, skip_nonfinite=self.skip_nonfinite,
                       apply_clip=apply_clip, snapshot_every=self._every, hist_layers=hist_layers,
                       measure_updates=self.measure_updates)
        if self._device is not None:
            state, step = self._device
            if set(state) != set(hook.layout.keys):
                raise ValueError("saved gradguard state does not fit this model/clip policy "
                                 f"(keys {sorted(state)[:4]}..., expected {hook.layout.keys[:4]}...)")
            hook.set_initial(state, step)
        hook.ensure_variables()

    def _policy_for(self, optimizer) -> tuple[clipping.ClipPolicy, bool]:
        """The policy that runs, and whether gradguard applies its scale. Never clip twice: the
        optimizer's own clipping, if set, stays in charge."""
        own = [(name, getattr(optimizer, name, None)) for name in _KERAS_CLIP_ARGS]
        own = [(name, value) for name, value in own if value]
        if not own:  # a unit-wise rule (AGC) scales units itself, the global factor stays 1
            return self.policy, self.policy.name != "none" and self.policy.unitwise is None
        name, value = own[0]
        if self.clip is not None and self.clip != "auto":
            warnings.warn(f"gradguard: the optimizer clips gradients itself ({name}={value!r}); "
                          f"GradGuardCallback(clip={self.clip!r}) will not clip on top of it", stacklevel=3)
        if name == "global_clipnorm":
            rule = clipping.fixed(float(value))
            return clipping.ClipPolicy("keras_global_clipnorm", rule.init, rule.update,
                                       f"the optimizer's global_clipnorm={value:g} (Keras clips)"), False
        rule = clipping.no_clipping()
        return clipping.ClipPolicy(f"keras_{name}", rule.init, rule.update,
                                   f"the optimizer's {name}={value:g} (Keras clips)"), False

    @staticmethod
    def _check_layers(saved, names):
        if list(saved) != list(names):
            raise ValueError(f"gradguard state was saved for layers {list(saved)[:5]}..., "
                             f"this model has {list(names)[:5]}...")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_base = self._host_steps

    def on_train_batch_end(self, batch, logs=None):
        first = self._host_steps == 0
        self._host_steps = self._epoch_base + int(batch) + 1
        if self._host_steps < self._next_log and not first:
            return
        self._next_log = (self._host_steps // self._every + 1) * self._every
        # The very first step is judged (its update shows a learning rate or an init wrong from the
        # start) but, as in the torch adapter, reported only when it is a regular log step.
        record = self._observe(report=self._host_steps % self._every == 0)
        if record is not None and logs is not None:
            logs.update(self._logs_scalars(record))

    def on_epoch_end(self, epoch, logs=None):
        self._observe()  # the steps since the last log step
        if logs is not None and self._last.record is not None:
            logs.update(self._logs_scalars(self._last.record))

    def on_train_end(self, logs=None):
        hook = self._hook
        if hook is None:
            return
        try:
            if hook.state_var is not None:
                self._observe()
                self._device = self._left_on_device
        finally:
            self.trace_count += hook.traces
            hook.uninstall()
            if hook.state_var is not None:
                hook.remove_variables()
            self._hook = None
            model = _compat.callback_model_no_sync(self)  # no JAX sync needed: fit has synced already
            model.train_function = None  # the next fit traces without the hook

    # ------------------------------------------------------------------ log steps

    def _observe(self, report: bool = True) -> LogRecord | None:
        hook = self._hook
        if hook is None or hook.state_var is None:
            return None
        _ = self.model  # on JAX this syncs the jitted step's state into the Variables
        state, step, extras = hook.read()
        self._left_on_device = (state, step)
        if float(state["acc_steps"]) == 0:
            return None
        window = stats.WindowStats.from_state(state, last_step=step - 1)
        snapshot = self._snapshot(hook, extras, window)
        self._last.record = None
        decision = self.monitor.observe(window, snapshot, report=report)
        fresh = dict(state)
        fresh.update(stats.reset_window(len(self.layers)))
        if decision.enable_clipping and "clip_enabled" in fresh:
            fresh["clip_enabled"] = np.float32(1.0)  # an explosion the device-side tracker did not catch
        hook.write_state(fresh)
        self._left_on_device = (fresh, step)
        return self._last.record

    def _snapshot(self, hook: ApplyHook, extras_vec, window) -> stats.Snapshot | None:
        ex = hook.extras_layout.parse(extras_vec)
        if not window.first_step <= ex["step"] <= window.last_step:
            return None  # no log-step extras in this window (e.g. an epoch-end flush)
        numel = np.array([l.numel for l in self.layers], dtype=np.float64)
        has = window.layer_steps + window.layer_nonfinite > 0
        nan = np.full(len(self.layers), np.nan)
        norm = np.where(has, np.sqrt(ex["norm_sq"]), nan)
        weight_norm = np.sqrt(ex["weight_sq"]) if np.isfinite(ex["weight_sq"]).all() else None
        update = (np.sqrt(ex["update_sq"]) if self.measure_updates and ex["finite"]
                  and np.isfinite(ex["update_sq"]).all() else None)
        hist = {self.layers[i].name: h for i, h in ex["hist"].items()} or None
        measured = np.isfinite(ex["max_abs"]).any()  # not measured on JAX (see _graph.ApplyHook._jax_step)
        return stats.Snapshot(norm=norm, rms=norm / np.sqrt(numel),
                              max_abs=np.where(has, ex["max_abs"], nan) if measured else None,
                              zero_frac=np.where(has, ex["zeros"] / numel, nan) if measured else None,
                              weight_norm=weight_norm,
                              weight_rms=None if weight_norm is None else weight_norm / np.sqrt(numel),
                              update_norm=update,
                              dead_units=ex["dead"], histograms=hist)

    def _logs_scalars(self, record: LogRecord) -> dict[str, float]:
        if self.logs_mode is None:
            return {}
        scalars = dict(record.scalars)
        # Present from the first record on, so CSVLogger (which fixes its columns then) keeps it.
        scalars.setdefault("gradguard/clip_threshold", math.nan)
        if self.logs_mode == "all":
            return scalars
        return {k: v for k, v in scalars.items()
                if not k.startswith("grad/") or k.startswith("grad/norm/") or k == "grad/depth_ratio"}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The monitor (findings, detector state, totals) and the device state (tracker, clipping
        policy, the open window), JSON-ready. The optimizer's Variables are not in ``model.save``:
        save this next to the model to resume with the same EMA, findings and counters."""
        if self._hook is not None and self._hook.state_var is not None:
            _ = self.model
            state, step, _ = self._hook.read()
        elif self._device is not None:
            state, step = self._device
        else:
            return {}
        return {
            "version": 1,
            "layers": [l.name for l in self.layers],
            "step_count": int(step),
            "host_steps": int(self._host_steps),
            "device_state": {k: np.asarray(v).tolist() for k, v in state.items()},
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("version") != 1:
            raise ValueError(f"unknown gradguard state version {state.get('version')!r}")
        device = {k: np.asarray(v, dtype=np.float32) for k, v in state["device_state"].items()}
        self._device = (device, int(state["step_count"]))
        self._host_steps = int(state.get("host_steps", state["step_count"]))
        if self.monitor is None:
            self._pending_monitor = {"layers": state["layers"], "monitor": state["monitor"]}
        else:
            self._check_layers(state["layers"], [l.name for l in self.layers])
            self.monitor.load_state_dict(state["monitor"])
        if self._hook is not None and self._hook.state_var is not None:
            _ = self.model
            self._hook.set_initial(*self._device)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def _strategy_scope(model):
    if keras.backend.backend() == "tensorflow":
        from gradguard.keras._backend_tf import strategy_scope
        return strategy_scope(model)
    return contextlib.nullcontext()
