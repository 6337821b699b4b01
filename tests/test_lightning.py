"""gradguard.lightning with a real Trainer (tiny models, few steps) and real wandb in offline mode.

What reached the loggers is read back from their files: CSVLogger's metrics.csv, the offline W&B run's
.wandb log (tests/wandb_offline.py).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from gradguard import Finding  # noqa: E402
from gradguard.lightning import GradGuardCallback  # noqa: E402
from gradguard.torch import GradGuard  # noqa: E402
from nets import CountSyncs  # noqa: E402

N_SAMPLES, BATCH = 256, 16  # 16 batches per epoch


# ----------------------------------------------------------------------------------- data and models

def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:N_SAMPLES] / 16.0, dtype=torch.float32), torch.tensor(y[:N_SAMPLES])


def loader():
    return DataLoader(TensorDataset(*digits()), batch_size=BATCH, shuffle=False)


def sigmoid_mlp(depth=16, width=32):
    """Deep sigmoid MLP: its early layers' gradients collapse (vanishing within ~10 steps)."""
    torch.manual_seed(0)
    layers, d = [], 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Sigmoid()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


def relu_mlp(depth=3, width=32):
    torch.manual_seed(0)
    layers, d = [], 64
    for _ in range(depth):
        linear = nn.Linear(d, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


def grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


class Classifier(pl.LightningModule):
    """``poison``: (epoch, batch_idx, rank or None) whose batch gets a NaN input. ``spike``: (batch_idx,
    factor) multiplies that batch's loss. Records the gradient norm the optimizer is about to use (after
    the callback, before the Trainer's clipping) and the norm of the update each step applied."""

    def __init__(self, net, lr=0.1, optimizer="sgd", poison=(), spike=None, out_dir=None):
        super().__init__()
        self.net, self.lr, self.optimizer_name = net, lr, optimizer
        self.poison, self.spike, self.out_dir = tuple(poison), spike, out_dir
        self.ref_norms, self.update_norms, self.snapshots, self.autocast_dtypes = [], [], {}, set()

    def poisoned(self, batch_idx):
        return any(e == self.current_epoch and b == batch_idx and r in (None, self.global_rank)
                   for e, b, r in self.poison)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.poisoned(batch_idx):
            x = x * float("nan")
        out = self.net(x)
        self.autocast_dtypes.add(out.dtype)
        loss = nn.functional.cross_entropy(out.float(), y)
        if self.spike is not None and batch_idx == self.spike[0]:
            loss = loss * self.spike[1]
        return loss

    def configure_optimizers(self):
        if self.optimizer_name in ("adam", "adam_fused"):
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.optimizer_name == "adam_fused")
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_before_optimizer_step(self, optimizer):
        self.ref_norms.append(grad_norm(self.parameters()) if any(p.grad is not None for p in self.parameters())
                              else None)

    def on_train_batch_start(self, batch, batch_idx):
        self._before = [p.detach().clone() for p in self.parameters()]
        if self.poisoned(batch_idx):
            self.snapshots["before"] = (self._before, copy.deepcopy(self.optimizers().optimizer.state_dict()))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        after = [p.detach().clone() for p in self.parameters()]
        delta = torch.linalg.vector_norm(torch.stack([(a - b).norm() for a, b in zip(after, self._before)]))
        self.update_norms.append(float(delta) / self.lr)
        if self.poisoned(batch_idx):
            self.snapshots["after"] = (after, copy.deepcopy(self.optimizers().optimizer.state_dict()))

    def on_train_end(self):
        if self.out_dir is not None:  # what each DDP rank ended with
            cb = next(c for c in self.trainer.callbacks if isinstance(c, GradGuardCallback))
            torch.save({"params": [p.detach().clone() for p in self.parameters()],
                        "optimizer": self.optimizers().optimizer.state_dict(),
                        "totals": cb.totals, "findings": [f.kind for f in cb.findings]},
                       Path(self.out_dir) / f"rank{self.global_rank}.pt")


def trainer(tmp_path, callbacks, logger=None, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    logger = CSVLogger(tmp_path, name="csv", version=0) if logger is None else logger
    return pl.Trainer(callbacks=callbacks, logger=logger, default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def csv_rows(tr) -> list[dict]:
    path = Path(tr.loggers[0].log_dir) / "metrics.csv"
    return list(csv.DictReader(path.open()))


def csv_series(rows, key) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def fit(tmp_path, module, callback, **kwargs):
    tr = trainer(tmp_path, [callback], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradguard's own finding warnings are checked elsewhere
        tr.fit(module, loader())
    return tr


def same_params(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------- findings and logged keys

def test_findings_match_plain_gradguard_and_metrics_csv_holds_the_keys(tmp_path):
    net = sigmoid_mlp()
    plain = nn.Module()  # the same module tree as the LightningModule, so layer names match
    plain.net = copy.deepcopy(net)
    callback = GradGuardCallback(clip="auto", max_logged_layers=4)
    tr = fit(tmp_path, Classifier(net), callback, log_every_n_steps=5)

    # the same run as a plain PyTorch loop
    guard = GradGuard(plain, clip="auto", log_every_n_steps=5, max_logged_layers=4)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in loader():
            opt.zero_grad()
            nn.functional.cross_entropy(plain.net(x), y).backward()
            guard.step(opt)
        expected = guard.findings
    found = callback.findings
    assert all(isinstance(f, Finding) for f in found)
    assert [(f.kind, f.step, f.layers, f.severity) for f in found] == \
           [(f.kind, f.step, f.layers, f.severity) for f in expected]
    vanishing = next(f for f in found if f.kind == "vanishing")
    assert vanishing.layers[:2] == ("net.0", "net.2")  # names as in named_modules(), first layers first
    assert tr.global_step == 16 and callback.totals["steps"] == 16

    rows = csv_rows(tr)
    norms = csv_series(rows, "grad/norm/global")
    assert sorted(norms) == [4, 9, 14, 15]  # every 5th optimizer step, and the partial window at train end
    assert all(math.isfinite(v) and v > 0 for v in norms.values())
    assert csv_series(rows, "grad/depth_ratio")[9] < 1e-8  # the collapse, in one number
    for key in ("gradguard/skipped_steps", "gradguard/clipped_steps", "gradguard/findings", "grad/norm/global_max"):
        assert set(csv_series(rows, key)) == set(norms), key
    assert csv_series(rows, "gradguard/findings")[15] == len(found)
    # a 33-layer-module net logs per-layer scalars for 4 layers spread over depth, first and last included
    per_layer = {k.split("/", 2)[2] for k in rows[0] if k.startswith("grad/norm/") and "global" not in k}
    assert per_layer == {"net.0", "net.10", "net.22", "net.32"}


# ----------------------------------------------------------------------------------- skipping non-finite steps

def test_nonfinite_step_is_skipped_weights_and_adam_state_untouched(tmp_path):
    module = Classifier(relu_mlp(), lr=1e-3, optimizer="adam", poison=[(0, 5, None)])
    callback = GradGuardCallback(log_every_n_steps=4)
    tr = fit(tmp_path, module, callback)

    before_w, before_opt = module.snapshots["before"]
    after_w, after_opt = module.snapshots["after"]
    assert same_params(before_w, after_w)  # the poisoned step never reached the weights ...
    for s_before, s_after in zip(before_opt["state"].values(), after_opt["state"].values()):
        assert all(torch.equal(s_before[k], s_after[k]) for k in s_before)  # ... nor Adam's moments and step
    assert tr.global_step == 16  # training went on
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert module.update_norms[6] > 0 and module.update_norms[5] == 0
    assert callback.skipped_steps == 1
    nonfinite = [f for f in callback.findings if f.kind == "nonfinite"]
    assert len(nonfinite) == 1 and nonfinite[0].step == 5
    assert {f.kind for f in callback.findings} == {"nonfinite"}  # a healthy net otherwise
    skipped = csv_series(csv_rows(tr), "gradguard/skipped_steps")
    assert skipped[3] == 0 and skipped[7] == 1 and skipped[15] == 1


def test_bf16_mixed_measures_and_skips(tmp_path):
    module = Classifier(relu_mlp(), lr=1e-3, optimizer="adam", poison=[(0, 9, None)])
    callback = GradGuardCallback(clip=None, log_every_n_steps=4)
    tr = fit(tmp_path, module, callback, precision="bf16-mixed")

    assert torch.bfloat16 in module.autocast_dtypes  # autocast really ran
    assert tr.global_step == 16 and callback.totals["steps"] == 16
    assert callback.skipped_steps == 1 and module.update_norms[9] == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert [f.kind for f in callback.findings] == ["nonfinite"]
    norms = csv_series(csv_rows(tr), "grad/norm/global")
    assert norms[3] == pytest.approx(module.ref_norms[3], rel=1e-5)  # fp32 gradients of the bf16 forward


@pytest.mark.parametrize("optimizer", ["adam", "adam_fused"])
def test_16_mixed_with_a_grad_scaler_measures_the_unscaled_gradients(tmp_path, optimizer):
    """A real GradScaler under Lightning's 16-mixed plugin (on the CPU): a fused optimizer's gradients
    are still scaled when the hook runs; the logged norm is the unscaled one either way, and a poisoned
    step at a loss scale above 1 is left to the scaler, which skips it and backs off: counted as its
    skip, not as gradguard's, and no finding (to gradguard it is an fp16 overflow like any other)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    module = Classifier(relu_mlp(), lr=1e-3, optimizer=optimizer, poison=[(0, 9, None)])
    callback = GradGuardCallback(clip=None, log_every_n_steps=4)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    tr = fit(tmp_path, module, callback, plugins=[plugin])

    assert tr.global_step == 16 and all(torch.isfinite(p).all() for p in module.parameters())
    assert module.update_norms[9] == 0 and module.update_norms[10] > 0
    assert callback.skipped_steps == 0 and callback.totals["loss_scale_skipped"] == 1
    assert callback.totals["nonfinite"] == 0 and not callback.findings
    rows = csv_rows(tr)
    assert csv_series(rows, "gradguard/loss_scale_skipped_steps") == {11: 1.0, 15: 1.0}
    norms = csv_series(rows, "grad/norm/global")
    # the hook (ref_norms) saw the fused optimizer's gradients scaled: by 1024, then by 512 once the
    # scaler backed off at the poisoned step (it saw that step's gradients non-finite)
    scales = {3: 1024.0, 7: 1024.0, 15: 512.0} if optimizer == "adam_fused" else {3: 1.0, 7: 1.0, 15: 1.0}
    for step, scale in scales.items():
        assert norms[step] == pytest.approx(module.ref_norms[step] / scale, rel=1e-4), step
    assert float(plugin.scaler.get_scale()) == 512.0  # the scaler saw the poisoned step and backed off, once


def test_16_mixed_at_a_loss_scale_of_one_a_nonfinite_step_is_a_finding(tmp_path):
    """At a loss scale of 1 the scaling cannot have caused a NaN: it is gradguard's non-finite step
    (skipped, reported), as without a scaler."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    module = Classifier(relu_mlp(), lr=1e-3, optimizer="adam", poison=[(0, 9, None)])
    callback = GradGuardCallback(clip=None, log_every_n_steps=4)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    tr = fit(tmp_path, module, callback, plugins=[plugin])

    assert tr.global_step == 16 and all(torch.isfinite(p).all() for p in module.parameters())
    assert callback.skipped_steps == 1 and callback.totals["loss_scale_skipped"] == 0
    assert [(f.kind, f.step) for f in callback.findings] == [("nonfinite", 9)]


def test_16_mixed_fp16_overflows_while_the_scale_settles_are_not_findings(tmp_path):
    """A real fp16 overflow: a loss scale of 2^28 overflows the float16 backward until the GradScaler
    has halved it enough (then now and again, at the edge of the range). Those steps are the scaler's
    routine: no finding, counted apart; the others train (their logged grad norms are finite)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from gradguard.report import render
    from gradguard.runlog import read_run
    from gradguard.summary import summarize

    module = Classifier(relu_mlp(), lr=1e-3, optimizer="adam")
    callback = GradGuardCallback(log_every_n_steps=4, sinks=str(tmp_path / "gg"))
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 28))
    tr = fit(tmp_path, module, callback, plugins=[plugin])

    overflowed = [i for i, n in enumerate(module.update_norms) if n == 0]  # the scaler's own skips
    assert tr.global_step == 16 and 3 <= len(overflowed) < 16 and overflowed[:3] == [0, 1, 2]
    assert float(plugin.scaler.get_scale()) == 2.0 ** (28 - len(overflowed))
    assert callback.totals["loss_scale_skipped"] == len(overflowed) and callback.skipped_steps == 0
    assert callback.totals["nonfinite"] == 0 and not callback.findings
    norms = csv_series(csv_rows(tr), "grad/norm/global")  # (a log step that overflowed logs inf, as measured)
    trained = [s for s in (3, 7, 11, 15) if s not in overflowed]
    assert trained and all(0 < norms[s] < math.inf for s in trained)
    run = read_run(tmp_path / "gg")  # the local report and the console summary say so
    said = f"skipped by the loss scaler {len(overflowed)}"
    assert said in summarize(run) and said.replace(" " + str(len(overflowed)), f" <b>{len(overflowed)}</b>") in render([run])




class AcceleratorPathCallback(GradGuardCallback):
    """The real callback on the accelerator path (no free host reads, as on a GPU), forced on this
    CPU; records, per optimizer step, the gate used and the host reads its hook made."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps: list[tuple[bool, str, int]] = []  # (log step, gate, host reads)

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self._engine.host_reads_free = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with CountSyncs() as mode:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.steps.append((self._engine._log_step, self._engine.gate, mode.count))


@pytest.mark.parametrize("fused", [True, False])
def test_a_fused_optimizer_gets_the_verdict_on_the_device_under_the_trainer(tmp_path, fused):
    """The Trainer hands the callback its optimizer: a fused Adam takes the non-finite verdict on the
    device (gate "optimizer", no host read on a non-log step) and skips the poisoned step itself,
    weights and moments untouched; a plain one is gated by one host read, as before."""
    module = Classifier(relu_mlp(), lr=1e-3, optimizer="adam_fused" if fused else "adam", poison=[(0, 5, None)])
    callback = AcceleratorPathCallback(log_every_n_steps=4)
    tr = fit(tmp_path, module, callback)

    plain = [(gate, reads) for log, gate, reads in callback.steps if not log]
    assert len(callback.steps) == 16 and len(plain) == 11  # steps 0, 3, 7, 11, 15 log
    assert set(plain) == ({("optimizer", 0)} if fused else {("host read", 1)})
    before_w, before_opt = module.snapshots["before"]
    after_w, after_opt = module.snapshots["after"]
    assert same_params(before_w, after_w)  # the poisoned step never reached the weights ...
    for s_before, s_after in zip(before_opt["state"].values(), after_opt["state"].values()):
        assert all(torch.equal(s_before[k], s_after[k]) for k in s_before)  # ... nor Adam's moments and step
    assert tr.global_step == 16 and module.update_norms[6] > 0 and module.update_norms[5] == 0
    assert callback.skipped_steps == 1 and [f.kind for f in callback.findings] == ["nonfinite"]
    optimizer = module.optimizers().optimizer
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")  # handed back


# ----------------------------------------------------------------------------------- accumulation

def test_accumulation_measures_once_per_optimizer_step_on_the_accumulated_gradient(tmp_path):
    module = Classifier(relu_mlp(), lr=0.05)
    callback = GradGuardCallback(clip=None, log_every_n_steps=1)
    tr = fit(tmp_path, module, callback, accumulate_grad_batches=4, log_every_n_steps=1)

    assert tr.global_step == 4 and callback.totals["steps"] == 4 and len(module.ref_norms) == 4
    norms = csv_series(csv_rows(tr), "grad/norm/global")
    assert sorted(norms) == [0, 1, 2, 3]  # one row per optimizer step, at Lightning's own step
    assert [norms[s] for s in range(4)] == pytest.approx(module.ref_norms, rel=1e-5)


# ----------------------------------------------------------------------------------- clipping

class LossScaled(Classifier):
    def __init__(self, net, factor, **kwargs):
        super().__init__(net, **kwargs)
        self.factor = factor

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * self.factor


@pytest.mark.parametrize("trainer_clip", [None, 0.5])
def test_clipping_by_the_callback_or_by_the_trainer_never_both(tmp_path, trainer_clip):
    module = LossScaled(relu_mlp(), factor=20.0, lr=1e-3)  # raw global norms well above both thresholds
    callback = GradGuardCallback(clip=0.05, log_every_n_steps=4)
    kwargs = {"gradient_clip_val": trainer_clip} if trainer_clip else {}
    tr = trainer(tmp_path, [callback], log_every_n_steps=4, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(module, loader())

    limit = trainer_clip or 0.05
    rows = csv_rows(tr)
    assert min(csv_series(rows, "grad/norm/global").values()) > 2 * 0.5  # measured: the raw gradient
    # what the optimizer applied (SGD: update / lr) was clipped once, to the one threshold in force
    assert module.update_norms == pytest.approx([limit] * 16, rel=1e-3)
    thresholds = csv_series(rows, "gradguard/clip_threshold")
    assert sorted(thresholds) == [3, 7, 11, 15] and list(thresholds.values()) == pytest.approx([limit] * 4)
    assert callback.totals["clipped"] == 16
    clash = [w for w in caught if "already clips" in str(w.message)]
    assert len(clash) == (1 if trainer_clip else 0)
    assert callback.trainer_clips == bool(trainer_clip)


def test_auto_clipping_switches_on_at_a_spike(tmp_path):
    module = Classifier(relu_mlp(), lr=1e-2, spike=(10, 1e4))
    callback = GradGuardCallback(clip="auto", log_every_n_steps=4)
    tr = fit(tmp_path, module, callback)

    rows = csv_rows(tr)
    raw_spike = csv_series(rows, "grad/norm/global_max")[11]  # the raw norm, measured before clipping
    typical = sorted(module.ref_norms[:10])[5]  # the module sees the gradients after the callback
    assert raw_spike > 1000 * typical
    assert module.ref_norms[10] < 10 * typical  # clipped on the device, at the spike itself
    assert module.update_norms[10] == pytest.approx(module.ref_norms[10], rel=1e-3)  # and that was applied
    assert module.update_norms[9] == pytest.approx(module.ref_norms[9], rel=1e-3)  # not clipping before it
    assert csv_series(rows, "gradguard/clip_enabled") == {3: 0.0, 7: 0.0, 11: 1.0, 15: 1.0}
    assert math.isfinite(csv_series(rows, "gradguard/clip_threshold")[11])
    assert tr.global_step == 16


# ----------------------------------------------------------------------------------- checkpoints

def test_resume_from_checkpoint_restores_ema_findings_and_counters(tmp_path):
    def run(path, ckpt=None):
        torch.manual_seed(1)
        module = Classifier(sigmoid_mlp(depth=12), poison=[(0, 6, None)])
        callback = GradGuardCallback(log_every_n_steps=5)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                      filename="{epoch}")
        tr = trainer(path, [callback, checkpoints], max_epochs=2, enable_checkpointing=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.fit(module, loader(), ckpt_path=ckpt)
        return callback, tr

    whole, _ = run(tmp_path / "whole")
    ckpt = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["GradGuardCallback"]  # plain, safe to load
    assert saved["engine"]["step_count"] == 16 and saved["engine"]["monitor"]["totals"]["skipped"] == 1

    resumed, tr = run(tmp_path / "resumed", ckpt=str(ckpt))
    assert tr.global_step == 32
    a, b = whole.state_dict()["engine"], resumed.state_dict()["engine"]
    assert a["step_count"] == b["step_count"] == 32
    for key, value in a["device_state"].items():  # EMA tracker, clip policy state, window accumulators
        assert torch.allclose(value, b["device_state"][key], rtol=1e-5, equal_nan=True), key
    assert a["monitor"]["totals"] == b["monitor"]["totals"]
    assert resumed.skipped_steps == 1  # the skip happened before the checkpoint, in the first run
    assert [(f.kind, f.step, f.layers) for f in resumed.findings] == \
           [(f.kind, f.step, f.layers) for f in whole.findings]
    assert {f.kind for f in resumed.findings} >= {"nonfinite", "vanishing"}


# ----------------------------------------------------------------------------------- manual optimization

class ManualClassifier(Classifier):
    def __init__(self, net, n_optimizers=1, **kwargs):
        super().__init__(net, **kwargs)
        self.automatic_optimization = False
        self.n_optimizers = n_optimizers

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt = opt[0] if isinstance(opt, list) else opt
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()  # the callback measures, clips or skips inside this call

    def configure_optimizers(self):
        if self.n_optimizers == 1:
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        half = len(self.net) // 2
        return [torch.optim.SGD(self.net[:half].parameters(), lr=self.lr),
                torch.optim.SGD(self.net[half:].parameters(), lr=self.lr)]


def test_manual_optimization_one_optimizer_works_several_is_a_clear_error(tmp_path):
    module = ManualClassifier(relu_mlp(), lr=0.05, poison=[(0, 3, None)])
    callback = GradGuardCallback(log_every_n_steps=4)
    tr = fit(tmp_path / "one", module, callback)
    assert tr.global_step == 16 and callback.totals["steps"] == 16
    assert callback.skipped_steps == 1 and module.update_norms[3] == 0
    assert [f.kind for f in callback.findings] == ["nonfinite"]

    with pytest.raises(ValueError, match="one optimizer.*got 2 optimizers"):
        fit(tmp_path / "two", ManualClassifier(relu_mlp(), n_optimizers=2), GradGuardCallback())


# ----------------------------------------------------------------------------------- model built late, crash

class LateModel(Classifier):
    """Builds its layers in configure_model (after the setup hook) and crashes at batch 6."""

    def __init__(self):
        super().__init__(None, poison=[(0, 2, None)])

    def configure_model(self):
        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10))  # sigmoid: a hook

    def training_step(self, batch, batch_idx):
        if batch_idx == 6:
            raise RuntimeError("user code failed")
        return super().training_step(batch, batch_idx)


def test_model_built_in_configure_model_and_a_crash_keeps_the_findings(tmp_path):
    callback = GradGuardCallback(log_every_n_steps=4)
    with pytest.raises(RuntimeError, match="user code failed"):
        fit(tmp_path, LateModel(), callback)
    assert callback.totals["steps"] == 6  # the window cut short by the crash was still evaluated
    assert callback.skipped_steps == 1 and [(f.kind, f.step) for f in callback.findings] == [("nonfinite", 2)]
    assert csv_series(csv_rows_of(tmp_path), "gradguard/skipped_steps") == {3: 1.0, 5: 1.0}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in callback.engine.model.modules())  # hooks gone


def csv_rows_of(tmp_path) -> list[dict]:
    return list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))


# ----------------------------------------------------------------------------------- W&B

@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Every file wandb writes goes under tmp_path; no network."""
    wandb = pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
           "WANDB_DATA_DIR": tmp_path / "data", "WANDB_ARTIFACT_DIR": tmp_path / "artifacts"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()


def wandb_logger(path):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    return WandbLogger(save_dir=str(path), offline=True, project="gradguard-tests",
                       settings=wandb.Settings(x_disable_stats=True, console="off", disable_git=True,
                                               save_code=False))


def test_wandb_logger_run_holds_scalars_histograms_and_the_alert(wandb_dir):
    import wandb
    from wandb_offline import read_run

    callback = GradGuardCallback(log_every_n_steps=5, max_logged_layers=4)
    tr = trainer(wandb_dir, [callback], logger=wandb_logger(wandb_dir), log_every_n_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Classifier(sigmoid_mlp()), loader())
    wandb.finish()
    run = read_run(wandb_dir)
    assert tr.global_step == 16
    assert not [w for w in caught if "gradguard: sink" in str(w.message)]  # no sink failed

    rows = run.rows_with("grad/norm/global")  # scalars came through the WandbLogger, at the Trainer's step
    assert [r["trainer/global_step"] for r in rows] == [4, 9, 14, 15], [
        (r.get("trainer/global_step"), r.get("gradguard/step")) for r in run.history]
    assert all("gradguard/skipped_steps" in r and "grad/depth_ratio" in r for r in rows)
    hist = run.rows_with("grad/hist/net.0")  # W&B extras through WandbSink
    assert hist and hist[0]["grad/hist/net.0"]["_type"] == "histogram"
    assert sum(hist[0]["grad/hist/net.0"]["values"]) == 64 * 32 + 32  # every gradient value of net.0
    assert not any("grad/norm/global" in r for r in run.history if "grad/hist/net.0" in r)  # no duplicate scalars
    vanishing = [a for a in run.alerts if "vanishing" in a["title"]]
    assert len(vanishing) == 1 and vanishing[0]["level"] == "ERROR" and "net.0" in vanishing[0]["text"]
    assert run.summary["gradguard/finding/vanishing"]["layers"][:2] == ["net.0", "net.2"]
    assert [f.kind for f in callback.findings] == ["vanishing"]


def test_a_wandb_failure_mid_run_warns_once_and_training_goes_on(wandb_dir):
    import wandb

    class FinishRun(pl.Callback):  # the user's code ends the W&B run under the Trainer's feet
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 6:
                wandb.finish()

    callback = GradGuardCallback(log_every_n_steps=2)
    module = Classifier(relu_mlp(), poison=[(0, 9, None)])
    tr = trainer(wandb_dir, [callback, FinishRun()], logger=wandb_logger(wandb_dir), log_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(module, loader())
    failures = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                and "gradguard: sink" in str(w.message)]
    # one warning per sink (the Trainer's loggers, the W&B extras), naming W&B's own error
    assert sorted(m.split()[2].split(".")[0] for m in failures) == ["TrainerLoggerSink", "WandbSink"], failures
    assert all("is finished" in m for m in failures)
    assert tr.global_step == 16  # training went on
    assert callback.skipped_steps == 1 and [f.kind for f in callback.findings] == ["nonfinite"]


# ----------------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_ddp_spawn_poisoned_batch_on_one_rank_skips_everywhere_and_rank_zero_logs(tmp_path):
    module = Classifier(relu_mlp(), lr=1e-3, optimizer="adam", poison=[(0, 3, 1)], out_dir=str(tmp_path))
    callback = GradGuardCallback(log_every_n_steps=2, sinks=str(tmp_path / "gradguard.jsonl"))
    tr = trainer(tmp_path, [callback], strategy="ddp_spawn", devices=2, log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(module, loader())

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert same_params(ranks[0]["params"], ranks[1]["params"])  # replicas never diverged
    assert all(torch.isfinite(p).all() for p in ranks[0]["params"])
    for s0, s1 in zip(ranks[0]["optimizer"]["state"].values(), ranks[1]["optimizer"]["state"].values()):
        assert all(torch.equal(s0[k], s1[k]) and torch.isfinite(s0[k]).all() for k in s0)
        assert int(s0["step"]) == 7  # 8 steps per rank, the poisoned one skipped on both
    assert ranks[0]["totals"] == ranks[1]["totals"] and ranks[0]["totals"]["skipped"] == 1
    assert ranks[0]["findings"] == ranks[1]["findings"] == ["nonfinite"]

    # only rank zero logged: one finding record, one row per log step
    lines = [json.loads(line) for line in (tmp_path / "gradguard.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines if r["type"] == "finding" and r["new"]] == [("nonfinite", 3)]
    assert [r["step"] for r in lines if r["type"] == "step"] == [1, 3, 5, 7]
    assert csv_series(csv_rows(tr), "gradguard/skipped_steps") == {1: 0.0, 3: 1.0, 5: 1.0, 7: 1.0}
    # the launching process gets rank zero's results back
    assert [(f.kind, f.step) for f in callback.findings] == [("nonfinite", 3)] and callback.skipped_steps == 1


# ----------------------------------------------------------------------------------- arguments, namespaces

def test_bad_arguments_name_the_argument_and_value():
    with pytest.raises(ValueError, match="clip.*'sometimes'"):
        GradGuardCallback(clip="sometimes")
    with pytest.raises(ValueError, match="log_every_n_steps.*0"):
        GradGuardCallback(log_every_n_steps=0)
    with pytest.raises(ValueError, match="max_logged_layers.*1"):
        GradGuardCallback(max_logged_layers=1)
    with pytest.raises(TypeError, match="skip_nonfinite.*'yes'"):
        GradGuardCallback(skip_nonfinite="yes")
    with pytest.raises(TypeError, match="wandb.*'on'"):
        GradGuardCallback(wandb="on")
    with pytest.raises(TypeError, match="unexpected.*colour"):
        GradGuardCallback(colour="red")
    with pytest.raises(TypeError, match="sinks.*42"):
        GradGuardCallback(sinks=42)
    assert isinstance(GradGuardCallback(), pl.Callback)


def test_lightning_pytorch_namespace_trainer_accepts_the_callback(tmp_path):
    lp = pytest.importorskip("lightning.pytorch")
    assert isinstance(GradGuardCallback(), lp.Callback)

    class Module(lp.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = relu_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x * float("nan") if batch_idx == 2 else x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = GradGuardCallback(log_every_n_steps=4)
    tr = lp.Trainer(max_epochs=1, callbacks=[callback], logger=lp.loggers.CSVLogger(tmp_path),
                    default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(Module(), loader())
    assert callback.skipped_steps == 1 and [f.kind for f in callback.findings] == ["nonfinite"]
