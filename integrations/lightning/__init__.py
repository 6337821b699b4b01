"""gradguard for PyTorch Lightning: one callback.

    from gradguard.lightning import GradGuardCallback

    callback = GradGuardCallback(clip="auto")
    trainer = Trainer(callbacks=[callback], logger=WandbLogger(project="x"))
    trainer.fit(model)
    callback.findings      # the same gradguard.Finding list as GradGuard.findings

What it does, per optimizer step (not per micro-batch under ``accumulate_grad_batches``), in
``on_before_optimizer_step``, where the gradients are fully accumulated, unscaled under AMP and not
yet clipped by the Trainer: measures them on the device, clips them (``clip="auto"``, ``"zscore"``,
a float; ``None`` measures only) and skips a step whose gradients hold NaN/Inf by setting them to None,
so the optimizer step leaves the weights and the optimizer state alone. Training goes on.

* ``Trainer(gradient_clip_val=v)``: the Trainer clips and the callback does not clip a second time;
  it measures the raw gradients and reports the Trainer's threshold as ``gradguard/clip_threshold``.
* Scalars go to the Trainer's loggers (CSVLogger, TensorBoardLogger, WandbLogger, ...) from global
  rank zero, against the optimizer step, under the keys ``grad/norm/global``,
  ``grad/norm/global_mean``, ``grad/norm/global_max``, ``grad/depth_ratio``, ``grad/<stat>/<layer>``
  (``norm``, ``norm_max``, ``rms``, ``max_abs``, ``zero_frac``, ``grad_to_weight``,
  ``update_to_weight``; at most ``max_logged_layers`` layers), ``gradguard/clip_threshold``,
  ``gradguard/clip_enabled``, ``gradguard/clipped_steps``, ``gradguard/skipped_steps``,
  ``gradguard/nonfinite_steps``, ``gradguard/spikes``, ``gradguard/findings``.
* W&B extras (histograms, gradient-flow heatmap, alerts, findings in the run summary) through
  ``gradguard.wandb.WandbSink`` when the Trainer has a ``WandbLogger`` or ``wandb.run`` is active.
* DDP (``ddp``, ``ddp_spawn``): the gradients seen are the all-reduced ones, so every rank takes the
  same clip and skip decision; only global rank zero logs.
* Checkpoints: the callback's state (EMA statistics, findings, counters) is saved with the Trainer's
  checkpoint and restored on ``trainer.fit(ckpt_path=...)``.
* Manual optimization: works with one optimizer: each ``opt.step()`` of ``self.optimizers()`` is
  measured, clipped or skipped by the callback (do not clip yourself, or pass ``clip=None``).
  Several optimizers: a clear error at fit start; use ``gradguard.torch.GradGuard`` per sub-model.

Both ``pytorch_lightning`` and ``lightning.pytorch`` are accepted: the callback subclasses the
``Callback`` of every namespace installed.
"""

from gradguard.lightning.callback import GradGuardCallback, TrainerLoggerSink

__all__ = ["GradGuardCallback", "TrainerLoggerSink"]
