"""``GradGuardCallback``: the plain-PyTorch engine (``gradguard.torch.TorchEngine``) inside a Trainer.

Hook points, per optimizer step:

* ``on_before_optimizer_step``: the closure has run, so gradients are fully accumulated, unscaled
  under AMP, and the Trainer has not clipped yet. The engine measures, clips (unless the Trainer
  clips) and, for a non-finite step, sets the gradients to None so the optimizer step that follows
  leaves the weights and its state alone.
* ``on_train_batch_end`` (or the next ``on_before_optimizer_step``, whichever comes first): the
  optimizer has run; on log steps the detectors run and scalars go to the Trainer's loggers.
* ``on_train_end``: the partial window is evaluated; ``teardown``: sinks are closed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import tempfile
import uuid
import weakref
from typing import Any

import numpy as np
import torch

from gradguard import clipping
from gradguard.findings import Finding
from gradguard.monitor import warn_user
from gradguard.options import Options, pop_wandb
from gradguard.sinks import LogRecord, Sink, make_sinks
from gradguard.torch import TorchEngine
from gradguard.torch._optim import scaler_scale, unwrap as unwrap_optimizer


def _callback_bases() -> tuple[type, ...]:
    """The ``Callback`` of every Lightning namespace installed, so the callback is accepted by either
    Trainer (``pytorch_lightning`` and ``lightning.pytorch`` each check their own ``Callback``)."""
    bases = []
    try:
        import pytorch_lightning

        bases.append(pytorch_lightning.Callback)
    except ImportError:
        pass
    try:
        has_unified = importlib.util.find_spec("lightning") is not None
    except ValueError:  # a half-initialised "lightning" module in sys.modules
        has_unified = False
    if has_unified:
        try:
            from lightning.pytorch import Callback

            bases.append(Callback)
        except ImportError:
            pass
    if not bases:
        raise ImportError('gradguard.lightning needs PyTorch Lightning: pip install "gradguard[lightning]"')
    return tuple(bases)


def _is(obj: Any, class_name: str) -> bool:
    """Namespace-free isinstance by class name (``pytorch_lightning`` and ``lightning.pytorch``
    define the same classes twice)."""
    return any(c.__name__ == class_name for c in type(obj).__mro__)


# Strategies that shard gradients or own the optimizer step: a rank's gradients are not the
# all-reduced full gradients this callback needs.
# ModelParallelStrategy (FSDP2, DTensor parameters) is supported: the engine reduces its sums over the shard
# groups. FSDPStrategy (FSDP1) keeps flattened local shards whose layer shapes the engine cannot see yet.
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")


def _trainer_clips(max_norm: float) -> clipping.ClipPolicy:
    """What ``Trainer(gradient_clip_val=v)`` does (clip by global norm), described to the monitor so the
    logs show the Trainer's threshold and how often it bites. The callback itself does not clip."""
    rule = clipping.fixed(max_norm)
    return rule._replace(describe=f"clipped by the Trainer (gradient_clip_val={max_norm:g})")


def _trainer_clips_by_value(clip_value: float) -> clipping.ClipPolicy:
    none = clipping.no_clipping()
    return none._replace(name="trainer", describe=f"clipped by value by the Trainer (gradient_clip_val={clip_value:g})")


class TrainerLoggerSink(Sink):
    """Scalars to every logger of the Trainer (CSVLogger, TensorBoardLogger, WandbLogger, ...), the
    way ``LearningRateMonitor`` does, against the optimizer step the record covers. This step is
    Lightning's own logging step (``self.log`` rows of the same batch carry the same step)."""

    def __init__(self, trainer: Any):
        self._trainer = weakref.ref(trainer)

    def log(self, record: LogRecord) -> None:
        trainer = self._trainer()
        if trainer is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(dict(record.scalars), step=record.step)


def _remove_if_exists(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class GradGuardCallback(*_callback_bases()):
    """Watch, diagnose and protect the gradients of a LightningModule.

    Every option is keyword-only and the same as ``gradguard.torch.GradGuard``'s (one
    ``gradguard.Options``); an unknown name raises ``TypeError``.

    Args:
        clip: ``"auto"`` (default: off until a spike or explosion, then adaptive), ``"zscore"`` (ZClip),
            ``"percentile"`` (AutoClip), ``"agc"`` (unit-wise, NFNets), a float (fixed max global
            norm), ``None`` (measure only), or a ``gradguard.ClipPolicy``.
            If the Trainer clips (``gradient_clip_val``), the callback does not clip a second time:
            it measures the raw gradients and reports the Trainer's threshold.
        log_every_n_steps: optimizer steps between log steps (statistics leave the device, detectors
            run, scalars are logged). ``None``: the Trainer's ``log_every_n_steps``, so gradguard's
            rows line up with the Trainer's own.
        skip_nonfinite: skip an optimizer step whose gradients hold NaN/Inf (weights, optimizer state
            and BatchNorm running statistics untouched); on every DDP rank alike, since the gradients
            are the all-reduced ones.
        max_logged_layers: per-layer scalars for at most this many layers, spread over depth, first
            and last always included (``None``: every layer).
        sinks: extra gradguard sinks on global rank zero: ``None``, a directory or ``.jsonl`` path, a
            ``gradguard.Sink`` or a list of them (pass a path, not an open sink, under ``ddp_spawn``).
        wandb: W&B extras (histograms, gradient-flow heatmap, alerts, findings in the summary) through
            ``gradguard.wandb.WandbSink``. ``None`` (default): when the Trainer has a ``WandbLogger`` or
            a ``wandb.run`` is active. ``True``: always (raises if wandb is missing). ``False``: never.
        measure_updates, histograms, detector_config, tracker_config: see ``gradguard.Options``.

    Results (reading them never changes the run): ``findings``, ``totals``, ``skipped_steps``,
    ``history``, ``layers``; ``close()``.
    """

    def __init__(self, **options: Any):
        wandb = pop_wandb(options)
        self.options = Options.of("GradGuardCallback", options)
        self.clip = self.options.clip
        self.log_every_n_steps = self.options.log_every_n_steps
        self.skip_nonfinite = self.options.skip_nonfinite
        self.max_logged_layers = self.options.max_logged_layers
        self.sinks = self.options.sinks
        self.wandb = wandb

        self._engine: TorchEngine | None = None
        self._pending_state: dict | None = None  # loaded before setup, or carried from a worker process
        self._state_loaded = False
        self._in_step: bool | None = None  # set between before_step and after_step: did the step go ahead
        self._live = False  # an engine is attached to a running fit
        self._plan: tuple[Any, bool] | None = None  # (policy, clipping allowed), decided at setup
        self.trainer_clips = False
        # ddp_spawn / ddp_fork run fit in worker processes; global rank zero hands its state back
        # through this file so ``findings`` works in the launching process too.
        self._origin_pid = os.getpid()
        self._handoff = os.path.join(tempfile.gettempdir(), f"gradguard-lightning-{uuid.uuid4().hex}.pt")
        self._finalizer = weakref.finalize(self, _remove_if_exists, self._handoff, self._origin_pid)

    # ------------------------------------------------------------------ results

    @property
    def engine(self) -> TorchEngine | None:
        """The ``TorchEngine`` of the current (or last) fit, on this process."""
        return self._engine

    @property
    def findings(self) -> list[Finding]:
        """The same ``gradguard.Finding`` list as ``GradGuard.findings``; the steps since the last log
        step are included (evaluated, not judged: reading never writes to the loggers or changes
        later findings)."""
        return self._peek()[0]

    @property
    def totals(self) -> dict[str, int]:
        """Counters over the whole run: steps, skipped, nonfinite, clipped, spikes, explosions."""
        return {k: int(v) for k, v in self._peek()[1].items()}

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients."""
        return int(self.totals.get("skipped", 0))

    @property
    def layers(self) -> list:
        """The watched layers in forward order (known after the first optimizer step)."""
        return self._engine.layers if self._engine is not None else []

    @property
    def history(self) -> list:
        """``(step, per-layer window-mean gradient norm)`` per log step."""
        self._collect_worker_result()
        if self._engine is not None and self._engine.monitor is not None:
            return list(self._engine.monitor.history)
        rows = (self._pending_state or {}).get("monitor", {}).get("history", [])
        return [(int(step), np.asarray(row, dtype=np.float32)) for step, row in rows]

    def _peek(self) -> tuple[list[Finding], dict]:
        self._collect_worker_result()
        if self._engine is not None and self._engine.built:
            return self._engine.peek()
        mon = (self._pending_state or {}).get("monitor", {})
        found = sorted((Finding.from_dict(f) for f in mon.get("findings", [])), key=lambda f: (f.step, f.kind))
        return found, dict(mon.get("totals", {}))

    def close(self) -> None:
        """Judge the last partial window, remove the hooks, close the sinks (done by the Trainer at
        the end of ``fit``; for use outside a Trainer)."""
        if self._engine is not None and self._live:
            if self._in_step is None:
                self._engine.flush()
            self._engine.close()
            self._live = False

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the configuration early; the engine is built in ``on_fit_start``, once
        ``configure_model`` and the strategy have run."""
        if stage != "fit":
            return
        ours = [c for c in trainer.callbacks if _is(c, "GradGuardCallback")]
        if len(ours) > 1:
            raise ValueError(f"the Trainer holds {len(ours)} GradGuardCallback entries"
                             f"{' (the same one twice)' if all(c is self for c in ours) else ''}: each optimizer "
                             "step would be measured, clipped and counted more than once. Pass one callback")
        strategy = trainer.strategy
        for name in _UNSUPPORTED_STRATEGIES:
            if _is(strategy, name):
                raise ValueError(f"GradGuardCallback supports single-device, DDP and ModelParallelStrategy (FSDP2: "
                                 f"use it instead of FSDPStrategy) strategies, got "
                                 f"strategy={type(strategy).__name__}: it shards the gradients (or owns the "
                                 "optimizer step), so no rank sees the full gradient to measure")
        self._plan = self._clip_plan(trainer, pl_module, bool(trainer.is_global_zero))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if len(optimizers) > 1:
            raise ValueError(f"GradGuardCallback watches one optimizer stepping the whole model, got "
                             f"{len(optimizers)} optimizers (manual optimization). Use gradguard.torch.GradGuard "
                             "on each sub-model in training_step instead: guard.step(opt) in place of opt.step().")
        for opt in optimizers:
            inner = getattr(opt, "optimizer", opt)  # Lightning wraps optimizers
            if isinstance(inner, torch.optim.LBFGS):
                raise TypeError("GradGuardCallback cannot protect LBFGS: it evaluates the closure several times "
                                "per step (a line search), and each evaluation's gradients reach the weights "
                                "before any could be measured")
        rank_zero = bool(trainer.is_global_zero)
        policy, clipping_allowed = self._plan or self._clip_plan(trainer, pl_module, rank_zero)
        carry = self._carry_state(pl_module)
        if self._engine is not None and self._live:
            self._engine.close()
        every = self.options.every(getattr(trainer, "log_every_n_steps", None))
        sinks = self._make_sinks(trainer) if rank_zero else []
        options = dataclasses.replace(self.options, clip=policy, log_every_n_steps=every, sinks=sinks)
        engine = TorchEngine(pl_module, options=options, logging_rank=rank_zero)
        engine.clipping_allowed = clipping_allowed
        if carry:
            engine.load_state_dict(carry)
        self._engine, self._live, self._in_step = engine, True, None

    def _clip_plan(self, trainer: Any, pl_module: Any, rank_zero: bool) -> tuple[Any, bool]:
        """Never clip twice: an explicit ``Trainer(gradient_clip_val=...)`` wins; the callback then
        only measures and reports the Trainer's threshold."""
        clip_val = getattr(trainer, "gradient_clip_val", None)
        self.trainer_clips = clip_val is not None and clip_val > 0
        if self.trainer_clips:
            algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
            if self.clip is not None and rank_zero:
                warn_user(f"gradguard: Trainer(gradient_clip_val={clip_val}) already clips the gradients, so "
                          f"GradGuardCallback(clip={self.clip!r}) measures only and does not clip a second "
                          "time. Pass clip=None to silence this, or drop gradient_clip_val to let gradguard "
                          "clip.")
            if algorithm == "norm":
                return _trainer_clips(float(clip_val)), False
            return _trainer_clips_by_value(float(clip_val)), False
        if self.clip is not None and rank_zero and _overrides(pl_module, "configure_gradient_clipping"):
            warn_user(f"gradguard: {type(pl_module).__name__} overrides configure_gradient_clipping. If it "
                      f"clips, pass GradGuardCallback(clip=None) so the gradients are not clipped twice "
                      f"(GradGuardCallback clips first, with clip={self.clip!r}).")
        return self.clip, True

    def _carry_state(self, pl_module: Any) -> dict | None:
        """State to continue from: one loaded before fit start (a checkpoint, ``load_state_dict``,
        a worker's hand-off), else the previous fit's of the same model."""
        self._collect_worker_result()
        state, self._pending_state = self._pending_state, None
        if state:
            return state
        if self._engine is not None and self._engine.model is pl_module:
            return self._engine.state_dict() or None
        return None

    def _make_sinks(self, trainer: Any) -> list[Sink]:
        sinks: list[Sink] = [TrainerLoggerSink(trainer)]
        wandb_loggers = [lg for lg in trainer.loggers if _is(lg, "WandbLogger")]
        want = self.wandb
        if want is None:
            active_run = getattr(sys.modules.get("wandb"), "run", None)  # never import wandb just to look
            want = bool(wandb_loggers) or active_run is not None
        if want:
            from gradguard.wandb import WandbSink  # raises an ImportError naming the extra

            if wandb_loggers:  # scalars already reach W&B through the logger
                sinks += [WandbSink(lg.experiment, scalars=False) for lg in wandb_loggers]
            else:
                sinks.append(WandbSink())
        # TensorBoardLogger already gets the scalars through the Trainer; add histograms, every step and the heatmap
        tb_loggers = [lg for lg in trainer.loggers if _is(lg, "TensorBoardLogger")]
        if tb_loggers:
            from gradguard.tensorboard import TensorBoardSink

            sinks += [TensorBoardSink(writer=lg.experiment, scalars=False) for lg in tb_loggers]
        return sinks + make_sinks(self.sinks)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        engine = self._engine
        if engine is not None and not self._state_loaded and engine.step_count == 0 and trainer.global_step:
            # resumed from a checkpoint that holds no gradguard state: count from the Trainer's step
            engine.step_count = int(trainer.global_step)

    # ------------------------------------------------------------------ per optimizer step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._engine is None:
            return
        if self._in_step is not None:  # several optimizer steps in one batch (manual optimization)
            self._finish_step()
        self._in_step = self._engine.before_step(self._fused_gate_optimizer(trainer, optimizer),
                                                 loss_scale=_pending_loss_scale(trainer, optimizer),
                                                 ceiling_from=optimizer, scaler=_scaler(trainer))

    @staticmethod
    def _fused_gate_optimizer(trainer: Any, optimizer: Any) -> Any:
        """The torch optimizer about to step, for the engine's sync-free gate (a fused optimizer takes
        the verdict and the clip factor on the device), or None where that cannot work: under a
        ``GradScaler`` (16-mixed), which sets the optimizer's ``found_inf``/``grad_scale`` itself
        after this hook, so the engine's would be overwritten; then the engine reads its gate."""
        if _scaler(trainer) is not None:
            return None
        return unwrap_optimizer(optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._in_step is not None:
            self._finish_step()

    def _finish_step(self) -> None:
        stepped, self._in_step = self._in_step, None
        self._engine.after_step(bool(stepped))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._engine is None:
            return
        if self._in_step is not None:
            self._finish_step()
        self._engine.flush()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._engine is None or not self._live:
            return
        if self._in_step is not None:
            self._finish_step()
        if os.getpid() != self._origin_pid and trainer.is_global_zero:
            state = self._engine.state_dict()
            if state:
                torch.save(state, self._handoff)
        self._engine.close()
        self._live = False

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # The Trainer skips teardown after an exception: report what was seen, remove the hooks, close
        # the sinks; the findings stay readable.
        if self._engine is None or not self._live:
            return
        try:
            if self._in_step is not None:
                self._in_step = False  # whether the optimizer ran is unknown: count it as not stepped
                self._finish_step()
            self._engine.flush()
        finally:
            self._engine.close()
            self._live = False

    def _collect_worker_result(self) -> None:
        if self._engine is None and os.getpid() == self._origin_pid and os.path.exists(self._handoff):
            self._pending_state = torch.load(self._handoff, weights_only=True)
            self._state_loaded = True
            os.remove(self._handoff)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        self._collect_worker_result()
        state = self._engine.state_dict() if self._engine is not None else dict(self._pending_state or {})
        return {"version": 1, "engine": state} if state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("version") != 1 or "engine" not in state_dict:
            raise ValueError(f"state_dict is not a GradGuardCallback state (keys {sorted(state_dict)[:5]})")
        self._state_loaded = True
        if self._engine is not None and self._live:
            self._engine.load_state_dict(state_dict["engine"])
        else:  # applied when the engine is built at fit start
            self._pending_state = state_dict["engine"]

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into ddp_spawn workers: carry the engine's state, not the engine (hooks, model refs).
        state = self.__dict__.copy()
        engine = state.pop("_engine", None)
        if engine is not None:
            state["_pending_state"] = engine.state_dict() or None
        state.update(_engine=None, _in_step=None, _finalizer=None, _live=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _overrides(pl_module: Any, method: str) -> bool:
    for cls in type(pl_module).__mro__:
        if method in cls.__dict__:
            return not cls.__module__.startswith(("pytorch_lightning.", "lightning.pytorch."))
    return False


def _scaler(trainer: Any) -> Any:
    """The 16-mixed plugin's ``GradScaler`` (it skips a non-finite step after this hook), or None."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def _pending_loss_scale(trainer: Any, optimizer: Any) -> torch.Tensor | None:
    """Under a ``GradScaler`` (16-mixed) Lightning unscales the gradients before this hook, except for
    an optimizer that unscales inside its own kernel (``fused=True``): its gradients are still
    multiplied by the scaler's scale here, so the engine is given that scale to measure them unscaled."""
    scaler = _scaler(trainer)
    if scaler is None:
        return None
    if not getattr(unwrap_optimizer(optimizer), "_step_supports_amp_scaling", False):
        return None  # unscaled already (GradScaler.unscale_ ran before this hook)
    return scaler_scale(scaler)
