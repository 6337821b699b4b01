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
import math
import threading
import weakref
from typing import Any

import keras
import numpy as np

from gradguard import clipping, pipeline
from gradguard.findings import Finding
from gradguard.layers import LayerInfo
from gradguard.monitor import Monitor, warn_user
from gradguard.options import Options
from gradguard.sinks import LogRecord, Sink, make_sinks

from gradguard.keras import _compat, _optim
from gradguard.keras._graph import ApplyHook, keras_ops, make_hook
from gradguard.keras._model import describe_model

__all__ = ["GradGuardCallback", "describe_model", "keras_ops"]

_compat.check_keras_version()

_LOGS_MODES = ("norms", "all", None)
# Held while the fit's thread counts steps or commits a log step, and while results are read: a
# worker thread (an async_safe callback's batch end) never sees a half-committed log step.
_LOCK = threading.RLock()
_KERAS_CLIP_ARGS = ("global_clipnorm", "clipnorm", "clipvalue")


class _LastRecord(Sink):
    """Keeps the monitor's latest log record, so its scalars can go into Keras ``logs``."""

    def __init__(self):
        self.record: LogRecord | None = None

    def log(self, record: LogRecord) -> None:
        self.record = record


class GradGuardCallback(keras.callbacks.Callback):
    """Watch, diagnose and protect a Keras model's gradients inside ``model.fit``.

    Takes gradguard's options, keyword-only, with the same names, defaults and checks as every
    other host (see ``gradguard.Options``): ``clip`` (``"auto"``, ``"zscore"``, ``"percentile"``,
    ``"agc"`` (a unit is a kernel's last axis), a float, ``None`` or a ``gradguard.ClipPolicy``),
    ``log_every_n_steps`` (default 50; with ``steps_per_execution=k`` rounded up to a multiple of
    k), ``skip_nonfinite``, ``sinks``, ``max_logged_layers``, ``measure_updates``, ``histograms``,
    ``detector_config``, ``tracker_config``. An unknown option raises ``TypeError`` naming it.

    Keras' own option:
        logs: which scalars go into Keras ``logs`` on log steps and epoch ends: ``"norms"``
            (default: ``grad/norm/*``, ``grad/depth_ratio`` and ``gradguard/*``), ``"all"``
            (every scalar the sinks get) or ``None``.

    If the optimizer clips itself (``clipnorm``, ``global_clipnorm``, ``clipvalue``), that
    clipping stays in charge: gradguard measures the gradients before it, never clips a second
    time, and warns when ``clip`` is not ``None`` (as the Lightning callback does for
    ``gradient_clip_val``). A step is one optimizer step: under ``gradient_accumulation_steps``
    gradguard judges, clips and skips the accumulated gradients once per optimizer step.

    Results: ``findings``, ``totals``, ``skipped_steps``, ``history``, ``layers`` (reading them is
    a pure look: it never writes to sinks or changes later findings), ``close()``,
    ``state_dict()`` / ``load_state_dict()``.
    """

    # Keras runs batch-end callbacks on a worker thread when every callback passed to fit allows it
    # (JAX and torch backends; its own progress bar and History count as allowing it), so the fit
    # loop never waits on a step's logs. gradguard allows it: its log step reads and writes the
    # train step's state, which only the fit's own thread may do, so a batch whose end ran on a
    # worker is accounted for when the next batch begins or the epoch ends (its scalars reach the
    # epoch's logs).
    async_safe = True

    def __init__(self, *, logs: str | None = "norms", **options: Any):
        super().__init__()
        self.options = Options.of("GradGuardCallback", options)
        if logs not in _LOGS_MODES:
            raise ValueError(f"logs must be one of {_LOGS_MODES}, got {logs!r}")
        self.logs_mode = logs
        self.clip = self.options.clip
        self.policy = self.options.policy
        self.log_every_n_steps = self.options.every()
        self._last = _LastRecord()
        self._sinks = make_sinks(self.options.sinks)
        self.histograms = self.options.histograms if self.options.histograms is not None else any(
            getattr(s, "wants_histograms", False) for s in self._sinks)
        self.pipeline: pipeline.Pipeline | None = None
        self.active_policy: clipping.ClipPolicy | None = None  # what runs: may be the optimizer's own clipping
        self._hook: ApplyHook | None = None
        self._ceiling_optimizer: Any = None  # whose learning rate bounds the update ceiling (clip="auto")
        self._carry: dict | None = None  # checkpoint to continue from: load_state_dict's, or the last fit's
        self._model_ref: weakref.ref | None = None  # the model of the last fit
        self._host_steps = 0  # optimizer steps completed (skipped ones included)
        self._every = self.log_every_n_steps
        self._fit_step0 = self._fit_batches = self._epoch_batches = self._micro0 = 0
        self._accumulation = 0
        self._fit_thread: int | None = None  # the thread that runs fit (batch ends may run elsewhere)
        self._worker_batch = -1  # the last batch whose end ran on a worker thread, this epoch
        self._left_on_device: tuple[dict, int] | None = None
        self.trace_count = 0  # times the hooked step was traced (TF/JAX) or run (torch, eager)

    # ------------------------------------------------------------------ results (pure looks)

    @property
    def monitor(self) -> Monitor | None:
        return self.pipeline.monitor if self.pipeline is not None else None

    @property
    def layers(self) -> list[LayerInfo]:
        return list(self.pipeline.layers) if self.pipeline is not None else []

    @property
    def findings(self) -> list[Finding]:
        """Findings so far, the steps since the last log step included (judged without changing
        anything: the window goes on, sinks see nothing)."""
        return self._peek()[0]

    @property
    def totals(self) -> dict[str, int]:
        """Counters so far: steps, skipped, nonfinite, clipped, spikes, explosions."""
        return self._peek()[1]

    @property
    def skipped_steps(self) -> int:
        return int(self.totals.get("skipped", 0))

    @property
    def history(self):
        """``(step, per-layer window-mean gradient norm)`` per log step, for reports and heatmaps."""
        return list(self.monitor.history) if self.monitor is not None else []

    def _peek(self) -> tuple[list[Finding], dict[str, int]]:
        if self.pipeline is None:
            return [], {}
        with _LOCK:
            live = self._read_live()
            if live is not None:
                state, step, _ = live
                decision_or_peek, _ = self.pipeline.observe(state, last_step=step - 1, commit=False)
                return decision_or_peek
            return self.monitor.findings, dict(self.monitor.totals)

    def _off_fit_thread(self) -> bool:
        return self._hook is not None and threading.get_ident() != self._fit_thread

    def _read_live(self) -> tuple[dict, int, np.ndarray] | None:
        """The train step's state, step count and log-step extras now; None outside a fit, and off the fit's thread (an
        ``async_safe`` callback's batch end), where the state belongs to the fit's loop (JAX
        donates its buffers: syncing them from another thread crashed the fit)."""
        hook = self._hook
        if hook is None or hook.state_var is None or self._off_fit_thread():
            return None
        _ = self.model  # on JAX this syncs the jitted step's state into the Variables
        return hook.read()

    # ------------------------------------------------------------------ fit lifecycle

    def on_train_begin(self, logs=None):
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("GradGuardCallback needs a compiled model with an optimizer (model.optimizer is None)")
        self._start_fresh_if_other_model(model)
        self._fit_thread = threading.get_ident()
        target = optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            target = optimizer.inner_optimizer  # unscaled gradients, only the steps the scaler applies
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        self._every = self.log_every_n_steps
        if self._every % spe:
            self._every = -(-self._every // spe) * spe
            warn_user(f"gradguard: log_every_n_steps={self.log_every_n_steps} is not a multiple of "
                      f"steps_per_execution={spe}; logging every {self._every} steps")
        self._accumulation = _compat.accumulation_steps(target)
        self._micro0 = (int(np.asarray(_compat.micro_step_counter(target).numpy())) % self._accumulation
                        if self._accumulation else 0)
        self._fit_step0, self._fit_batches, self._epoch_batches = self._host_steps, 0, 0
        self._hook = make_hook(target, configure=lambda: self._configure(model, target))
        if model.trainable_variables:
            if not optimizer.built:  # TF without a strategy builds it in the first trace; do it now
                with _strategy_scope(model):
                    optimizer.build(model.trainable_variables)
            self._configure(model, target)
        # else (TF, a model built by its first trace): configured inside that trace
        self._hook.install()
        if self.options.skip_nonfinite:
            self._hook.guard_forward_state(model)
        model.make_train_function(force=True)  # retrace with the hook in place

    def _start_fresh_if_other_model(self, model) -> None:
        """A callback carries its state from one fit to the next of the same model (fine-tuning
        included); on another model it starts fresh instead of judging it by the old one's EMA."""
        previous = self._model_ref() if self._model_ref is not None else None
        if self._model_ref is not None and previous is not model:
            warn_user(f"gradguard: this GradGuardCallback watched another model before ({getattr(previous, 'name', '?')!r}"
                      f"); it starts fresh for {model.name!r} (the other model's findings, totals and tracker are "
                      "dropped). Use one GradGuardCallback per model.")
            self.pipeline, self._carry, self._host_steps, self._left_on_device = None, None, 0, None
        self._model_ref = weakref.ref(model)

    def _configure(self, model, target) -> None:
        """Build the pipeline for the model as it is now (its trainable layers), continuing from
        the last fit or a loaded checkpoint: layers that stay keep their state by name, layers that
        join start fresh, findings and totals stay (the core's ``Pipeline.restore``)."""
        layout = describe_model(model)
        self.active_policy, apply_clip = self._policy_for(target)
        carry = self._carry
        if carry is None and self.pipeline is not None and self._left_on_device is not None:
            carry = self._checkpoint(*self._left_on_device, host_steps=self._host_steps)
        self.pipeline = pipeline.Pipeline(layout.layers, layout.facts, self.options, sinks=[self._last] + self._sinks,
                                          policy=self.active_policy, log_every_n_steps=self._every)
        device_state = self.pipeline.restore(carry) if carry else self.pipeline.initial_state()
        self._set_ceiling(device_state, target, model)
        step = int(carry["step_count"]) if carry else 0
        self._carry = None
        hook = self._hook
        hist_layers = [int(i) for i in self.pipeline.logged] if self.histograms else []
        hook.configure(layout=self.pipeline.layout, layers=self.pipeline.layers, layer_of_var=layout.layer_of_var,
                       unit_kernel=layout.unit_kernel, policy=self.active_policy, tracker=self.options.tracker,
                       skip_nonfinite=self.options.skip_nonfinite, apply_clip=apply_clip,
                       snapshot_every=self._every, hist_layers=hist_layers,
                       measure_updates=self.options.measure_updates)
        hook.set_initial(device_state, step)
        self._left_on_device = (device_state, step)
        hook.ensure_variables()

    def _policy_for(self, optimizer) -> tuple[clipping.ClipPolicy, bool]:
        """The policy that runs, and whether gradguard applies its global scale. Never clip twice:
        the optimizer's own clipping, if set, stays in charge."""
        own = [(name, getattr(optimizer, name, None)) for name in _KERAS_CLIP_ARGS]
        own = [(name, value) for name, value in own if value]
        if not own:  # a unit-wise rule (AGC) scales units itself, the global factor stays 1
            return self.policy, self.policy.scales_global
        name, value = own[0]
        if self.clip is not None:
            warn_user(f"gradguard: the optimizer clips gradients itself ({name}={value!r}), so "
                      f"GradGuardCallback(clip={self.clip!r}) measures only and does not clip a second time. "
                      f"Pass clip=None to silence this, or drop {name} to let gradguard clip.")
        if name == "global_clipnorm":
            rule = clipping.fixed(float(value))
            return clipping.ClipPolicy("keras_global_clipnorm", rule.init, rule.update,
                                       f"the optimizer's global_clipnorm={value:g} (Keras clips)"), False
        rule = clipping.no_clipping()
        return clipping.ClipPolicy(f"keras_{name}", rule.init, rule.update,
                                   f"the optimizer's {name}={value:g} (Keras clips)", scales_global=False), False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_batches = self._fit_batches
        self._worker_batch = -1

    def on_train_batch_begin(self, batch, logs=None):
        if batch > 0:  # the previous batch ends at batch - 1 (steps_per_execution included)
            self._batch_done(int(batch) - 1, None)  # nothing left to do when its end ran here

    def on_train_batch_end(self, batch, logs=None):
        if threading.get_ident() != self._fit_thread:
            with _LOCK:  # dispatched asynchronously (workers may finish out of order)
                self._worker_batch = max(self._worker_batch, int(batch))
            return  # accounted for on the fit's thread
        self._batch_done(int(batch), logs)

    def _batch_done(self, batch: int, logs: dict | None) -> None:
        """Count the optimizer steps up to the end of ``batch`` (of this epoch) and, if a log step
        is among them, judge the window. Idempotent: a batch already counted changes nothing."""
        steps = (self.params or {}).get("steps")
        if steps:  # Keras names the end of a partial last execution as if it were whole
            batch = min(batch, int(steps) - 1)
        with _LOCK:
            batches = self._epoch_batches + batch + 1
            if batches <= self._fit_batches:
                return  # counted already
            self._fit_batches = batches
            done = self._fit_step0 + (self._micro0 + batches) // max(self._accumulation, 1)
            before, self._host_steps = self._host_steps, done
            if self.pipeline is None or done == before:
                return  # an accumulation micro-step: the optimizer did not step
            if not any(self.pipeline.is_log_step(s) for s in range(before, done)):
                return
            # An execution of several steps reports when one of them is a report step (after a
            # partial execution they no longer end on one).
            record = self._observe(report=any(self.pipeline.is_report_step(s) for s in range(before, done)))
        if record is not None and logs is not None:
            logs.update(self._logs_scalars(record))

    def on_epoch_end(self, epoch, logs=None):
        if self._worker_batch >= 0:  # Keras waited for its workers before calling this
            self._batch_done(self._worker_batch, None)
        self._observe()  # the steps since the last log step
        if logs is not None and self._last.record is not None:
            logs.update(self._logs_scalars(self._last.record))

    def on_train_end(self, logs=None):
        hook = self._hook
        if hook is None:
            return
        try:
            if hook.traces == 0 and self._fit_batches > 0:
                # Never silent: a train step that applies its gradients through other optimizers
                # (a GAN's own d_optimizer/g_optimizer) or none never reaches the hook.
                warn_user(f"gradguard: GradGuardCallback measured no optimizer step in this fit of "
                          f"{self._fit_batches} batches: the model's train step never applied gradients "
                          f"through model.optimizer (a custom train_step with optimizers of its own, e.g. "
                          f"a GAN's?), so nothing was measured, clipped or protected")
            if hook.state_var is not None:
                self._observe()
        finally:
            self.trace_count += hook.traces
            hook.uninstall()
            hook.unguard_forward_state()
            if hook.state_var is not None:
                hook.remove_variables()
            self._hook = None
            model = _compat.callback_model_no_sync(self)  # no JAX sync needed: fit has synced already
            model.train_function = None  # the next fit traces without the hook

    def _set_ceiling(self, device_state, optimizer, model) -> None:
        """The policy's update ceiling for this fit's weights and optimizer (``clip="auto"``); on log
        steps the pipeline follows the weights and the optimizer's current learning rate."""
        self._ceiling_optimizer = optimizer
        if self.pipeline.ceiling is not None:
            self.pipeline.optimizer_gain = _optim.optimizer_gain(optimizer)
            self.pipeline.set_ceiling(device_state, _optim.weight_norm(model.trainable_variables))

    # ------------------------------------------------------------------ log steps

    def _observe(self, report: bool = True) -> LogRecord | None:
        with _LOCK:
            live = self._read_live()
            if live is None:
                return None
            state, step, extras = live
            self._left_on_device = (state, step)
            if float(state["acc_steps"]) == 0:
                return None
            self._last.record = None
            self.pipeline.step = step
            snapshot = self._snapshot(self._hook, extras, self.pipeline.window(state, last_step=step - 1))
            if self.pipeline.ceiling is not None:
                self.pipeline.optimizer_gain = _optim.optimizer_gain(self._ceiling_optimizer)
            _, fresh = self.pipeline.observe(state, last_step=step - 1, snapshot=snapshot, report=report)
            self._hook.write_state(fresh)
            self._left_on_device = (fresh, step)
            return self._last.record

    def _snapshot(self, hook: ApplyHook, extras_vec, window):
        ex = hook.extras_layout.parse(extras_vec)
        if not window.first_step <= ex["step"] <= window.last_step:
            return None  # no log-step extras in this window (e.g. an epoch-end flush)
        # A layer is NaN in the snapshot when it had no gradient in the window (not zero: no
        # gradient is not a dead gradient).
        has = window.layer_steps + window.layer_nonfinite > 0
        update = ex["update_sq"] if self.options.measure_updates and ex["finite"] else None
        return self.pipeline.snapshot(pipeline.LayerSums(
            has_grad=has, norm_sq=ex["norm_sq"], max_abs=ex["max_abs"], zeros=ex["zeros"],
            weight_sq=ex["weight_sq"], update_sq=update, dead=ex["dead"], histograms=ex["hist"]))

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

    def _checkpoint(self, state: dict, step: int, host_steps: int) -> dict[str, Any]:
        saved = self.pipeline.state_dict({k: np.asarray(v).tolist() for k, v in state.items()},
                                         host_steps=int(host_steps))
        saved["step_count"] = int(step)  # the state's own step (the pipeline's is the fit thread's)
        return saved

    def state_dict(self) -> dict[str, Any]:
        """The core's checkpoint (``gradguard.pipeline``): monitor (findings, detector state,
        totals) and device state (tracker, clipping policy, the open window), JSON-ready. The
        optimizer's Variables are not in ``model.save``: save this next to the model to resume
        with the same EMA, findings and counters."""
        if self.pipeline is None:
            return dict(self._carry) if self._carry else {}
        with _LOCK:
            live = self._read_live()
            if live is not None:
                return self._checkpoint(*live[:2], host_steps=self._host_steps)
            if self._left_on_device is None:
                return {}
            state, step = self._left_on_device
            # Off the fit's thread during a fit: the last log step's state, counted to its own step
            # (the fit's thread has counted further).
            return self._checkpoint(state, step, host_steps=step if self._off_fit_thread() else self._host_steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output at the next fit (on this or a rebuilt model:
        layers are matched by name; other shapes under the same names are refused; another
        ``clip`` keeps tracker, findings and totals and starts the new policy fresh)."""
        if not state:
            return
        if self._off_fit_thread():
            raise RuntimeError("GradGuardCallback.load_state_dict during a fit must be called on the fit's thread "
                               "(not from an async_safe callback's batch end, which Keras runs on a worker thread)")
        if state.get("version") not in (1, pipeline.CHECKPOINT_VERSION) or "device_state" not in state:
            raise ValueError(f"not a gradguard state dict (version {state.get('version')!r}, keys {sorted(state)[:6]})")
        self._carry = dict(state)
        self._host_steps = int(state.get("host_steps", state["step_count"]))
        self._model_ref = None  # the state is meant for the model of the next fit
        self._left_on_device = None
        if self._hook is not None and self._hook.state_var is not None:  # during fit: now
            _ = self.model
            device = self.pipeline.restore(self._carry)
            self._hook.set_initial(device, int(state["step_count"]))
            self._carry = None

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        else:
            for sink in self._sinks:
                with contextlib.suppress(Exception):
                    sink.close()


def _strategy_scope(model):
    if keras.backend.backend() == "tensorflow":
        from gradguard.keras._backend_tf import strategy_scope
        return strategy_scope(model)
    return contextlib.nullcontext()
