"""Regression checks from the held-out style runs (validation/heldout.py), with the real frameworks:
divergence that starts after hundreds of healthy steps is found after it starts (torch and Lightning),
a learning-rate warm-up that grows the update 1000x is not divergence, and zero gradients by design
(unrouted mixture-of-experts experts, gradient checkpointing) are not findings."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def digits(bs, seed=0):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    g = torch.Generator().manual_seed(seed)

    def batch(step):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        return x[idx], y[idx]
    return batch


def tanh_mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))


def train(model, opt, steps, log_every, lr_at=None, batch=None, **opts):
    from gradguard.torch import GradGuard
    guard = GradGuard(model, clip=None, log_every_n_steps=log_every, **opts)
    batch = batch or digits(64)
    losses, findings_before = [], None
    for step in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        if step == 300:
            findings_before = list(guard.findings)
        opt.zero_grad()
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(float(loss))
        guard.step(opt)
    return guard, losses, findings_before


@pytest.mark.parametrize("log_every", [10, 50])
def test_divergence_after_300_healthy_steps_is_exploding_once_it_starts(log_every):
    """SGD learns for 300 steps, then its learning rate grows 3% a step. tanh features and cross-entropy
    bound the gradient (it grows ~25x, not 100x), but the weights run away (20x): exploding, after the
    ramp began and before the run ends, and nothing during the healthy part."""
    torch.manual_seed(0)
    m = tanh_mlp()
    opt = torch.optim.SGD(m.parameters(), 0.02, momentum=0.9)
    guard, losses, before = train(m, opt, 600, log_every, lr_at=lambda s: 0.02 * 1.03 ** max(0, s - 300))
    assert before == []
    assert losses[-1] > 100 * min(losses)  # the run really diverged
    kinds = {f.kind: f for f in guard.findings}
    assert "exploding" in kinds
    # established as the loss leaves its floor (~step 420), not only once single updates reach 30% of the
    # weights (~step 590)
    assert 300 <= kinds["exploding"].step <= 460


def test_a_learning_rate_warmup_is_not_divergence():
    """Adam's update grows 1000x during a warm-up from 1e-6 to 1e-3, the gradient moves with the loss:
    the weights do not run away, so it is not divergence (nor anything else)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(m.parameters(), 1e-6)
    guard, losses, _ = train(m, opt, 400, 10, lr_at=lambda s: 1e-6 * 1000 ** min(1.0, s / 200))
    assert losses[-1] < 0.5 * losses[0]
    assert guard.findings == []


def test_lightning_divergence_after_300_healthy_steps(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    from gradguard.lightning import GradGuardCallback
    torch.manual_seed(0)
    batch = digits(64)

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tanh_mlp()

        def training_step(self, b, i):
            return F.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), 0.02, momentum=0.9)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.03 ** max(0, s - 300))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self):
            return torch.utils.data.DataLoader([batch(i) for i in range(600)], batch_size=None)
    cb = GradGuardCallback(clip=None)
    trainer = pl.Trainer(max_steps=600, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[cb], log_every_n_steps=50)
    trainer.fit(M())
    kinds = {f.kind: f for f in cb.findings}
    assert "exploding" in kinds and 300 <= kinds["exploding"].step < 600


def test_mixture_of_experts_with_checkpointing_is_not_a_finding():
    """Qwen2-MoE from its config, top-2 of 8 experts: every step leaves some experts without a token
    (exactly zero gradient by design), under gradient checkpointing. A healthy run: no finding."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from gradguard.torch import GradGuard
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=32, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                      max_position_embeddings=64, use_cache=False, router_aux_loss_coef=0.0)
    m = transformers.Qwen2MoeForCausalLM(cfg)
    m.gradient_checkpointing_enable()
    m.train()
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    guard = GradGuard(m, log_every_n_steps=10)
    g = torch.Generator().manual_seed(0)
    unrouted = 0
    for step in range(120):
        a = torch.randint(1, 31, (2, 6), generator=g)
        s = torch.cat([a, torch.full((2, 1), 31), a], 1)
        labels = s.clone()
        labels[:, :7] = -100
        opt.zero_grad()
        m(input_ids=s, labels=labels).loss.backward()
        # transformers fuses the experts into one (experts, out, in) parameter: an unrouted expert is a zero slice
        unrouted += sum(int((p.grad.flatten(1).abs().amax(1) == 0).sum()) for n, p in m.named_parameters()
                        if ".experts." in n and p.grad is not None and p.dim() == 3)
        guard.step(opt)
    assert unrouted > 0  # the premise: some experts really got no gradient
    assert guard.findings == []
    names = {n for n, _ in m.named_modules()}
    assert all(layer.name in names for layer in guard.layers)


@pytest.mark.slow  # a subprocess per Keras backend
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_keras_divergence_after_300_healthy_steps(tmp_path, backend):
    """The same ramp under model.fit, through validation/heldout.py in a subprocess (Keras fixes its
    backend at import). On JAX the saturated softmax then zeroes the gradient exactly (Keras clips the
    probabilities), so only the weights show the divergence: their norm grew 6x in one log interval."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, os.path.join(root, "validation", "heldout.py"), "--host", f"keras-{backend}",
                    "--only", "keras_mlp_lr_ramp_after_300", "--out", str(out), "--child"],
                   env=env, cwd=str(tmp_path), check=True, capture_output=True, timeout=900)
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert r["ok"], r
    exploding = [f for f in r["found"] if f["kind"] == "exploding"]
    assert exploding and 300 <= exploding[0]["step"] <= 500
