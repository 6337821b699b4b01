"""gradguard.transformers: a real ``transformers.Trainer`` on a tiny Llama-style LM built from a config,
trained on the bytes of Python's own ``json`` package (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer  # noqa: E402

from gradguard.transformers import GradGuardCallback  # noqa: E402
from hf_cases import json_text_dataset, tiny_llama, training_args  # noqa: E402
from nets import CountSyncs  # noqa: E402


def _train(tmp_path, callback=None, model=None, **args):
    model = model or tiny_llama()
    trainer = Trainer(model=model, args=training_args(str(tmp_path / "out"), **args),
                      train_dataset=json_text_dataset(), callbacks=[callback] if callback else None)
    trainer.train()
    return trainer, model


def _finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_healthy_llama_is_quiet_and_scalars_reach_every_report_to_target(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    cb = GradGuardCallback(clip="auto")
    trainer, model = _train(tmp_path, cb, max_grad_norm=0.0, report_to=["tensorboard"])
    assert cb.findings == []
    assert cb.totals["steps"] == 20 and cb.totals["skipped"] == 0 and cb.totals["clipped"] == 0
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for r in rows:  # measured on the raw gradients: the same number as the Trainer's own grad_norm
        assert r["grad/norm/global"] == pytest.approx(r["grad_norm"], rel=1e-5)
        assert r["gradguard/skipped_steps"] == 0 and "grad/norm/model.embed_tokens" in r
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    steps = [e.step for e in acc.Scalars("train/grad/norm/global")]
    assert steps == [5, 10, 15, 20]
    assert "train/gradguard/clipped_steps" in acc.Tags()["scalars"]


def test_clips_once_with_max_grad_norm_or_with_clip(tmp_path):
    """max_grad_norm > 0: gradguard measures the raw gradients and applies exactly the Trainer's clip,
    once. max_grad_norm=0 + clip=0.5: the same update. Both match the Trainer clipping on its own."""
    steps = dict(max_steps=8, logging_steps=4, lr_scheduler_type="constant", gradient_accumulation_steps=2)
    _, plain = _train(tmp_path / "a", max_grad_norm=0.5, **steps)
    with pytest.warns(UserWarning, match="max_grad_norm=0.5"):
        cb = GradGuardCallback(clip="auto")
        trainer, taken_over = _train(tmp_path / "b", cb, max_grad_norm=0.5, **steps)
    assert trainer.args.max_grad_norm == 0.5  # handed back after every step
    cb2 = GradGuardCallback(clip=0.5)
    _, by_clip = _train(tmp_path / "c", cb2, max_grad_norm=0.0, **steps)
    for p, q, r in zip(plain.parameters(), taken_over.parameters(), by_clip.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6)
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert all(r["grad/norm/global"] > 0.5 for r in rows)  # raw, not the clipped 0.5
    assert all(r["gradguard/clip_threshold"] == 0.5 for r in rows)
    assert cb.totals["steps"] == 8  # once per optimizer step, not per micro-batch
    assert cb.totals["clipped"] == cb2.totals["clipped"] == 8


def test_learning_rate_far_too_high_is_caught_and_contained(tmp_path):
    args = dict(max_steps=30, learning_rate=30.0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant")
    _, unguarded = _train(tmp_path / "a", **args)
    assert not _finite(unguarded)  # without gradguard this run ends in NaN weights
    cb = GradGuardCallback(clip="auto")
    _, model = _train(tmp_path / "b", cb, **args)
    kinds = {f.kind: f for f in cb.findings}
    assert "exploding" in kinds and kinds["exploding"].severity == "critical"
    assert cb.totals["clipped"] > 0 and _finite(model)


class _PoisonOnce:
    """A forward hook that turns one training forward pass's MLP output to NaN."""

    def __init__(self, at_call: int):
        self.at, self.calls = at_call, 0

    def __call__(self, module, args, out):
        self.calls += 1
        return out * float("nan") if self.calls == self.at else out


def test_poisoned_batch_is_skipped_weights_optimizer_and_schedule_untouched(tmp_path):
    model = tiny_llama()
    model.model.layers[0].mlp.register_forward_hook(_PoisonOnce(at_call=7))
    cb = GradGuardCallback(clip="auto")
    trainer, model = _train(tmp_path, cb, model=model, max_grad_norm=0.0)
    assert cb.skipped_steps == 1 and cb.totals["nonfinite"] == 1 and cb.totals["steps"] == 20
    assert "nonfinite" in {f.kind for f in cb.findings}
    assert _finite(model)
    # the skipped step reached neither the optimizer's state nor the LR scheduler
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {19}
    assert trainer.lr_scheduler.last_epoch == 19
    assert trainer.state.log_history[1]["gradguard/skipped_steps"] == 1  # the row of step 10


class _AcceleratorPathCallback(GradGuardCallback):
    """The real callback on the accelerator path (no free host reads, as on a GPU), forced on this CPU;
    records, per optimizer step, the gate used and the host reads its hook made, and the weights and
    optimizer state around the optimizer step ``watch_step``."""

    def __init__(self, watch_step: int, **kwargs):
        super().__init__(**kwargs)
        self.watch_step = watch_step
        self.steps: list[tuple[bool, str, int]] = []  # (log step, gate, host reads)
        self.snapshots: dict[str, tuple] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._engine.host_reads_free = False

    def _snapshot(self, name, state, model, optimizer):
        if state.global_step == self.watch_step:
            weights = [p.detach().clone() for p in model.parameters()]
            moments = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
            self.snapshots[name] = (weights, moments)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._snapshot("before", state, model, optimizer)
        with CountSyncs() as mode:
            super().on_pre_optimizer_step(args, state, control, optimizer=optimizer, **kwargs)
        self.steps.append((self._engine._log_step, self._engine.gate, mode.count))

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._snapshot("after", state, model, optimizer)
        super().on_optimizer_step(args, state, control, **kwargs)


@pytest.mark.parametrize("fused", [True, False])
def test_a_fused_optimizer_gets_the_verdict_on_the_device_under_the_trainer(tmp_path, fused):
    """Through Accelerate's AcceleratedOptimizer, a fused AdamW takes the non-finite verdict on the device
    (gate "optimizer", no host read on a non-log step) and skips the poisoned step itself, weights and
    moments untouched; a plain one is gated by one host read, as before."""
    model = tiny_llama()
    model.model.layers[0].mlp.register_forward_hook(_PoisonOnce(at_call=7))  # optimizer step 6: not a log step
    cb = _AcceleratorPathCallback(watch_step=6, clip="auto")
    trainer, model = _train(tmp_path, cb, model=model, max_grad_norm=0.0, max_steps=10,
                            optim="adamw_torch_fused" if fused else "adamw_torch")
    inner = trainer.optimizer.optimizer
    assert getattr(inner, "_step_supports_amp_scaling", False) == fused

    plain = [(gate, reads) for log, gate, reads in cb.steps if not log]
    assert len(cb.steps) == 10 and len(plain) == 7  # steps 0, 4, 9 log
    assert set(plain) == ({("optimizer", 0)} if fused else {("host read", 1)})
    before_w, before_opt = cb.snapshots["before"]
    after_w, after_opt = cb.snapshots["after"]
    assert all(torch.equal(p, q) for p, q in zip(before_w, after_w))  # the poisoned step never reached the weights
    for s_before, s_after in zip(before_opt, after_opt, strict=True):  # ... nor AdamW's moments and step
        assert all(torch.equal(s_before[k], s_after[k]) for k in s_before)
    assert {int(s["step"]) for s in inner.state.values()} == {9} and _finite(model)
    assert cb.skipped_steps == 1 and cb.totals["nonfinite"] == 1 and cb.totals["steps"] == 10
    assert "nonfinite" in {f.kind for f in cb.findings}
    for opt in (inner, trainer.optimizer):  # handed back after the step
        assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    # The skipped-step flag needs the verdict on the host: with the device gate it stays down, so the LR
    # scheduler advances on the skipped step (as global_step does); the host-read gate holds it.
    assert trainer.lr_scheduler.last_epoch == (10 if fused else 9)


def test_checkpoint_carries_the_callback_state_and_resume_restores_it(tmp_path):
    model = tiny_llama()
    model.model.layers[0].mlp.register_forward_hook(_PoisonOnce(at_call=3))
    cb = GradGuardCallback(clip="auto")
    _train(tmp_path, cb, model=model, max_grad_norm=0.0, max_steps=20, save_strategy="steps", save_steps=10)
    saved = json.loads((tmp_path / "out" / "checkpoint-10" / "trainer_state.json").read_text())
    engine_state = saved["stateful_callbacks"]["GradGuardCallback"]["attributes"]["_checkpoint_state"]
    assert engine_state["step_count"] == 10 and engine_state["monitor"]["totals"]["skipped"] == 1

    resumed = GradGuardCallback(clip="auto")
    trainer = Trainer(model=tiny_llama(), args=training_args(str(tmp_path / "out"), max_grad_norm=0.0, max_steps=20),
                      train_dataset=json_text_dataset(), callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
    assert resumed.totals["steps"] == 20 and resumed.skipped_steps == 1
    assert resumed.engine.step_count == 20
    assert [f.kind for f in resumed.findings] == [f.kind for f in cb.findings]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_take_one_decision(tmp_path):
    """torchrun, 2 CPU processes (gloo): NaN on rank 1 only reaches both ranks through the all-reduce,
    both skip the same step and measure the same global norm."""
    worker = Path(__file__).with_name("hf_ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                           str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["world_size"] == 2
    assert results[0]["totals"] == results[1]["totals"]
    assert results[0]["totals"]["skipped"] == 1 and results[0]["totals"]["steps"] == 10
    assert results[0]["weights"] == pytest.approx(results[1]["weights"], rel=1e-6)
    assert results[0]["logged_norm"] and results[1]["logged_norm"] == []  # only the main process logs


@pytest.mark.parametrize("field, value, match", [
    ("deepspeed", {"zero_optimization": {"stage": 2}}, "does not support DeepSpeed"),
    ("fsdp", "full_shard", "does not support the Trainer's FSDP"),
])
def test_deepspeed_and_fsdp_are_refused_with_a_clear_error(tmp_path, field, value, match):
    args = training_args(str(tmp_path / "out"))
    setattr(args, field, value)  # set after construction: deepspeed is not installed, FSDP needs an accelerator
    with pytest.raises(ValueError, match=match):
        GradGuardCallback().on_init_end(args, None, None)


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip="sometimes"), "clip"), (dict(log_every_n_steps=0), "log_every_n_steps"),
    (dict(skip_nonfinite="yes"), "skip_nonfinite"), (dict(max_logged_layers=1), "max_logged_layers"),
    (dict(wandb="on"), "wandb"), (dict(sinks=3), "sinks"), (dict(histogram=True), "unexpected keyword"),
])
def test_bad_arguments_raise_in_the_constructor(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GradGuardCallback(**kwargs)


def test_wandb_report_to_gets_scalars_from_the_trainer_and_extras_from_gradguard(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb_offline import read_run

    env = {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true", "WANDB_PROJECT": "gradguard-tests",
           "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
           "WANDB_DATA_DIR": tmp_path / "data", "WANDB_ARTIFACT_DIR": tmp_path / "artifacts"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    # The Trainer's WandbCallback configures W&B through these variables only; wandb reads them once per
    # process (its setup singleton), so a run made earlier in this process would send this one elsewhere.
    wandb.teardown()
    model = tiny_llama()
    model.model.layers[0].mlp.register_forward_hook(_PoisonOnce(at_call=3))
    cb = GradGuardCallback(clip="auto")
    try:
        _train(tmp_path, cb, model=model, max_grad_norm=0.0, max_steps=10, report_to=["wandb"])
    finally:
        if wandb.run is not None:
            wandb.finish()
    logged = read_run(tmp_path)
    assert len(logged.values("train/grad/norm/global")) == 2  # through the Trainer's WandbCallback, steps 5, 10
    assert logged.values("train/gradguard/skipped_steps")[-1] == 1
    assert any(k.startswith("grad/hist/") for row in logged.history for k in row)  # gradguard's own extras
    assert logged.alerts and "gradguard/finding/nonfinite" in logged.summary
