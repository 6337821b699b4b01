"""``GradGuardCallback`` for ``transformers.Trainer``: the torch engine at the Trainer's hook points.

Engine API used (``gradguard.torch.TorchEngine``): the constructor, ``before_step()``,
``after_step(stepped)``, ``findings``/``totals`` (pure looks), ``flush()``, ``monitor.history``,
``state_dict()``, ``load_state_dict()``, ``step_count``, ``close()``.

Hook points, per optimizer step (after gradient accumulation):

* ``on_step_begin``: if ``TrainingArguments.max_grad_norm > 0``, set it to 0 until the clip point has
  passed. The Trainer then only measures its ``grad_norm`` (``clip_grad_norm_`` with an infinite
  threshold, which also unscales fp16 gradients), so the gradients reach the next hook raw.
* ``on_pre_optimizer_step``: ``max_grad_norm`` is put back; the engine measures the raw, all-reduced
  gradients and clips them once: by the Trainer's ``max_grad_norm`` (same rule as ``clip_grad_norm_``)
  when it is > 0, else by ``clip=``. A non-finite step: gradients set to None, so ``optimizer.step()``
  leaves weights and optimizer state alone, and Accelerate's skipped-step flag is raised so the Trainer
  does not step the learning-rate scheduler (what it does for an fp16 overflow). On an accelerator, a
  fused torch optimizer (``fused=True``) without fp16's GradScaler gets the verdict and the clip factor
  on the device instead (the engine's sync-free gate): it skips a non-finite update itself, and since
  nothing reads the verdict on the host, the skipped-step flag stays down on such a non-log step (the
  learning-rate scheduler then advances, as ``global_step`` does); see ``_fused_gate_optimizer``.
* ``on_optimizer_step``: the engine finishes the step (detectors and a record on log steps).
* ``on_log``: the latest record's scalars join the Trainer's training log, so every ``report_to``
  target receives them at ``logging_steps``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState

from gradguard import clipping
from gradguard.options import Options, pop_wandb
from gradguard.findings import Finding
from gradguard.sinks import LogRecord, Sink, make_sinks
from gradguard.torch import TorchEngine
from gradguard.torch._optim import unwrap as unwrap_optimizer

__all__ = ["GradGuardCallback"]


class _TrainerLogs(Sink):
    """Keeps the latest record's scalars until the Trainer's next training log takes them."""

    def __init__(self) -> None:
        self.pending: dict[str, float] | None = None

    def log(self, record: LogRecord) -> None:
        self.pending = {k: float(v) for k, v in record.scalars.items()}


def _trainer_clip(max_norm: float) -> clipping.ClipPolicy:
    rule = clipping.fixed(max_norm)
    return rule._replace(describe=f"the Trainer's max_grad_norm={max_norm:g}, applied by gradguard after measuring")


def _jsonable(x: Any) -> Any:
    """trainer_state.json holds the callback's state: tensors and arrays become lists."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def _refuse_unsupported(args: Any) -> None:
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        raise ValueError("GradGuardCallback does not support DeepSpeed (TrainingArguments(deepspeed=...)): DeepSpeed "
                         "clips inside its own optimizer step and ZeRO partitions the gradients, so no Trainer hook "
                         "sees the raw full gradient. Train with DDP (torchrun / accelerate launch) instead.")
    if getattr(args, "fsdp", None):
        raise ValueError(f"GradGuardCallback does not support the Trainer's FSDP yet (TrainingArguments(fsdp="
                         f"{args.fsdp!r})); it supports single-device and DDP training.")


def _fused_gate_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer``, for the engine's sync-free gate
    (a fused optimizer takes the verdict and the clip factor on the device as ``found_inf``/
    ``grad_scale``; ``AcceleratedOptimizer.step`` calls its ``step()`` directly, which reads them, and
    the engine takes them back at ``after_step``), or None where that cannot work: under fp16's
    ``GradScaler`` (``optimizer.scaler``), whose ``step`` sets the optimizer's ``found_inf``/``grad_scale``
    itself after this hook and deletes them, so the engine's would be lost; then the engine reads its gate.

    The skipped-step flag: with the device gate the verdict is not read on the host, so the flag is not
    raised and the Trainer steps the learning-rate scheduler on a skipped step. Raising it would mean
    reading the verdict (Accelerate's ``step_was_skipped`` is a host bool): the very sync the gate
    removes. Skips are rare events; one scheduler step each is the price of no read per step."""
    if getattr(optimizer, "scaler", None) is not None:
        return None
    return unwrap_optimizer(optimizer)


class GradGuardCallback(TrainerCallback, ExportableState):
    """Watch, diagnose and protect the gradients of a ``transformers.Trainer`` run.

    Args:
        clip: ``"auto"``, ``"zscore"``, ``"percentile"``, ``"agc"``, a float, ``None`` or a ``ClipPolicy``.
            Used when ``TrainingArguments(max_grad_norm=0)``; with ``max_grad_norm > 0`` (the Trainer's
            default 1.0) the gradients are clipped once, by ``max_grad_norm``, and ``clip=`` is not applied.
        log_every_n_steps: optimizer steps between log steps; ``None``: the Trainer's ``logging_steps``.
        skip_nonfinite: skip an optimizer step whose gradients hold NaN/Inf.
        max_logged_layers: per-layer scalars for at most this many layers (``None``: all).
        sinks: extra gradguard sinks on the main process (a path, a ``gradguard.Sink`` or a list).
        wandb: W&B extras through ``gradguard.wandb.WandbSink``; ``None``: when ``report_to`` holds
            ``"wandb"`` or a ``wandb.run`` is active.
        measure_updates, histograms, detector_config, tracker_config: see ``gradguard.Options``.

    Every option is keyword-only and the same as ``gradguard.torch.GradGuard``'s (one
    ``gradguard.Options``; here ``max_logged_layers`` defaults to 16); an unknown name raises ``TypeError``.
    Results (reading them never changes the run): ``findings``, ``totals``, ``skipped_steps``, ``history``.
    """

    def __init__(self, **options: Any):
        wandb = pop_wandb(options)
        options.setdefault("max_logged_layers", 16)
        self.options = Options.of("GradGuardCallback", options)  # one surface: names, defaults, checks
        self.clip = self.options.clip
        self.log_every_n_steps = self.options.log_every_n_steps
        self.skip_nonfinite = self.options.skip_nonfinite
        self.max_logged_layers = self.options.max_logged_layers
        self.sinks = self.options.sinks
        self.wandb = wandb
        self._engine: TorchEngine | None = None
        self._logs = _TrainerLogs()
        self._trainer_max_norm: float | None = None  # max_grad_norm taken over for the current step
        self._stepped: bool | None = None  # between on_pre_optimizer_step and on_optimizer_step
        self._flagged_optimizer: Any = None  # an AcceleratedOptimizer whose skipped-step flag we raised
        self._ordered = False

    # ------------------------------------------------------------------ results

    @property
    def engine(self) -> TorchEngine | None:
        return self._engine

    @property
    def findings(self) -> list[Finding]:
        """Findings so far, pending steps included (a pure look: reading never changes the run)."""
        return self._engine.findings if self._engine is not None else []

    @property
    def totals(self) -> dict[str, int]:
        """Counters over the whole run: steps, skipped, nonfinite, clipped, spikes, explosions."""
        return self._engine.totals if self._engine is not None else {}

    @property
    def skipped_steps(self) -> int:
        return self.totals.get("skipped", 0)

    @property
    def history(self) -> list:
        return list(self._engine.monitor.history) if self._engine is not None and self._engine.monitor else []

    # ------------------------------------------------------------------ setup

    def _move_ahead_of_reporters(self) -> None:
        """The Trainer hands its callbacks no reference to itself. The caller of this hook is the
        Trainer's CallbackHandler (checked by identity); moving this callback right after
        DefaultFlowCallback puts its scalars into the log dict before the report_to callbacks read it."""
        if self._ordered:
            return
        try:
            handler = sys._getframe(2).f_locals.get("self")  # this method <- our hook <- CallbackHandler.call_event
        except ValueError:  # called from the top of a stack, not by a Trainer
            handler = None
        if not isinstance(handler, CallbackHandler) or not any(cb is self for cb in handler.callbacks):
            warnings.warn("gradguard: could not find the Trainer's CallbackHandler; gradguard's scalars reach only "
                          "the callbacks listed after GradGuardCallback and state.log_history", RuntimeWarning,
                          stacklevel=3)
            self._ordered = True
            return
        cbs = handler.callbacks
        # Moving an element to an earlier index during call_event's loop skips and repeats nothing:
        # everything it jumps over has already been called for this event.
        cbs.remove(self)
        first = next((i + 1 for i, cb in enumerate(cbs) if isinstance(cb, DefaultFlowCallback)), 0)
        cbs.insert(first, self)
        self._ordered = True

    def on_init_end(self, args, state, control, **kwargs):
        _refuse_unsupported(args)
        self._move_ahead_of_reporters()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _refuse_unsupported(args)
        self._move_ahead_of_reporters()
        self._restore_max_norm(args)  # a previous train() stopped by an exception inside the window
        main = bool(state.is_world_process_zero)
        if args.max_grad_norm and args.max_grad_norm > 0:
            policy: Any = _trainer_clip(float(args.max_grad_norm))
            if self.clip is not None and main:
                warnings.warn(f"gradguard: TrainingArguments(max_grad_norm={args.max_grad_norm}) clips the gradients; "
                              f"gradguard applies that clip once, after measuring the raw gradients, and does not "
                              f"add GradGuardCallback(clip={self.clip!r}). Pass max_grad_norm=0 to let clip= decide, "
                              "or clip=None to silence this.", UserWarning, stacklevel=2)
        else:
            policy = self.clip
        every = self.log_every_n_steps or (int(state.logging_steps) if args.logging_strategy == "steps"
                                           and state.logging_steps and state.logging_steps >= 1 else 50)
        if self._engine is not None:
            self._engine.close()
        self._logs = _TrainerLogs()
        sinks = self._make_sinks(args) if main else []
        options = dataclasses.replace(self.options, clip=policy, log_every_n_steps=every, sinks=sinks)
        self._engine = TorchEngine(model, options=options, logging_rank=main)
        if state.global_step > 0:  # resumed: trainer_state.json carries this callback's state
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            saved = saved[0] if isinstance(saved, list) and saved else saved
            engine_state = (saved or {}).get("attributes", {}).get("_checkpoint_state") if isinstance(saved, dict) else None
            if engine_state:
                self._engine.load_state_dict(engine_state)
            else:
                self._engine.step_count = int(state.global_step)
        self._stepped = None

    def _make_sinks(self, args: Any) -> list[Sink]:
        sinks: list[Sink] = [self._logs]
        want = self.wandb
        if want is None:
            wandb_module = sys.modules.get("wandb")  # never import wandb just to look
            want = "wandb" in (args.report_to or []) or getattr(wandb_module, "run", None) is not None
        if want:
            from gradguard.wandb import WandbSink  # raises an ImportError naming the extra

            # scalars reach W&B through the Trainer's WandbCallback when report_to holds it
            sinks.append(WandbSink(scalars="wandb" not in (args.report_to or [])))
        return sinks + make_sinks(self.sinks)

    # ------------------------------------------------------------------ per optimizer step

    def on_step_begin(self, args, state, control, **kwargs):
        if self._engine is not None and args.max_grad_norm and args.max_grad_norm > 0:
            self._trainer_max_norm = float(args.max_grad_norm)
            args.max_grad_norm = 0.0  # until on_pre_optimizer_step: the Trainer measures, gradguard clips

    def _restore_max_norm(self, args: Any) -> None:
        if self._trainer_max_norm is not None:
            args.max_grad_norm, self._trainer_max_norm = self._trainer_max_norm, None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._restore_max_norm(args)
        if self._engine is None:
            return
        self._stepped = self._engine.before_step(_fused_gate_optimizer(optimizer), ceiling_from=optimizer,
                                                 scaler=getattr(optimizer, "scaler", None))  # fp16's GradScaler
        if not self._stepped and getattr(optimizer, "scaler", True) is None and hasattr(optimizer, "_is_overflow"):
            # Accelerate's flag for a skipped step (read by accelerator.optimizer_step_was_skipped): the
            # Trainer then leaves the LR scheduler alone. Under fp16 the GradScaler raises it itself.
            optimizer._is_overflow = True
            self._flagged_optimizer = optimizer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._stepped is not None:
            stepped, self._stepped = self._stepped, None
            self._engine.after_step(stepped)

    def on_step_end(self, args, state, control, **kwargs):
        if self._flagged_optimizer is not None:
            self._flagged_optimizer._is_overflow = False
            self._flagged_optimizer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._logs.pending is None:
            return
        scalars, self._logs.pending = self._logs.pending, None
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore_max_norm(args)
        if self._engine is not None:
            self._engine.flush()
            self._engine.close()

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """Saved by the Trainer in ``trainer_state.json`` with every checkpoint; read back at
        ``on_train_begin`` of a ``resume_from_checkpoint`` run."""
        plain = {k: v for k, v in (("clip", self.clip), ("log_every_n_steps", self.log_every_n_steps),
                                   ("skip_nonfinite", self.skip_nonfinite),
                                   ("max_logged_layers", self.max_logged_layers), ("wandb", self.wandb))
                 if v is None or isinstance(v, (str, int, float, bool))}
        engine_state = self._engine.state_dict() if self._engine is not None else {}
        return {"args": plain, "attributes": {"_checkpoint_state": _jsonable(engine_state)}}
