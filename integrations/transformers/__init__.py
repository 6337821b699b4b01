"""gradguard for Hugging Face ``transformers.Trainer``: one callback.

    from gradguard.transformers import GradGuardCallback

    callback = GradGuardCallback(clip="auto")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    callback.findings      # the same gradguard.Finding list as GradGuard.findings

Once per optimizer step, after gradient accumulation, on the raw (pre-clip, all-reduced, unscaled)
gradients: measure, clip once, skip a non-finite step. Clipping rule (never twice):

* ``TrainingArguments(max_grad_norm=m)`` with ``m > 0`` (the Trainer's default 1.0): gradguard takes
  the clip over for the step (the Trainer measures its ``grad_norm`` unclipped, then gradguard
  measures and clips to ``m`` with ``clip_grad_norm_``'s rule); ``clip=`` is not applied.
* ``max_grad_norm=0``: the Trainer does not clip; gradguard clips by ``clip=`` (``"auto"``: off until
  a spike or explosion).

Scalars (``grad/norm/global``, ``grad/<stat>/<layer>``, ``gradguard/...``) join the Trainer's training
log, so every ``report_to`` target gets them at ``logging_steps``. A skipped step leaves weights,
optimizer state and the learning-rate schedule alone (as the Trainer does for an fp16 overflow).
The callback's state is saved in ``trainer_state.json`` with each checkpoint and restored by
``trainer.train(resume_from_checkpoint=...)``. DDP: every rank takes the same decision; the main
process logs. DeepSpeed and the Trainer's FSDP are refused with an error.
"""

from gradguard.transformers.callback import GradGuardCallback

__all__ = ["GradGuardCallback"]
