"""clip="auto"'s update ceiling: the first step of a run explosive from its start is held to an update
no larger than the weights (SGD), while healthy runs and Adam-like optimizers are left alone."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradguard import clipping, stats
from gradguard.ops import numpy_ops as xp


def test_update_ceiling_is_the_norm_whose_update_reaches_its_limit():
    # one step may move the weights by 10% of their norm; one gradient, carried on by momentum, by 100%
    assert clipping.sgd_gain(0.1) == pytest.approx(1.0)  # the step's limit: |w| / gain = 0.1 |w| / lr
    assert clipping.sgd_gain(0.05, momentum=0.9) == pytest.approx(0.5)  # the two limits coincide at 0.9
    assert clipping.sgd_gain(0.05, momentum=0.99) == pytest.approx(5.0)  # momentum carries it 100x
    assert clipping.sgd_gain(0.1, momentum=0.99, dampening=0.99) == pytest.approx(1.0)
    assert clipping.sgd_gain(0.1, momentum=1.0) is None
    assert clipping.update_ceiling(20.0, 0.5) == pytest.approx(40.0)
    # no scale to compare with: Adam-like optimizers (no gain), all-zero weights, nothing known
    for w, gain in ((20.0, None), (0.0, 0.5), (None, 0.5), (math.inf, 0.5), (20.0, 0.0)):
        assert clipping.update_ceiling(w, gain) == math.inf


def feed(norms, ceiling, policy=None):
    policy = policy or clipping.auto()
    state = stats.init_state(2, policy)
    state[stats.ceiling_key(policy)] = np.float32(ceiling)
    scales, thresholds = [], []
    for n in norms:
        scale, _, state = stats.device_step(state, np.full(2, n * n / 2, np.float32), np.ones(2, np.float32),
                                            policy, xp)
        scales.append(float(scale))
        thresholds.append(float(state["threshold"]))
    return np.array(scales), np.array(thresholds), state


def test_auto_holds_every_step_under_the_ceiling_and_shows_it_only_where_it_binds():
    norms = [80.0, 3.0, 2.5, 3.1, 2.9]
    scales, thresholds, state = feed(norms, ceiling=10.0)
    assert scales[0] == pytest.approx(10.0 / 80.0, rel=1e-5)  # the first step: no history, held by the ceiling
    assert (scales[1:] == 1.0).all()
    assert thresholds[0] == pytest.approx(10.0) and np.isinf(thresholds[1:]).all()
    assert float(state["clip_enabled"]) == 0.0  # a bound, not a latch
    assert float(state["clip_ceiling"]) == pytest.approx(10.0)  # the policy keeps what the host wrote
    # no ceiling (inf, the default): the same steps are not clipped at all
    scales, thresholds, _ = feed(norms, ceiling=math.inf)
    assert (scales == 1.0).all() and np.isinf(thresholds).all()
    # latched: the adaptive threshold still applies below the ceiling
    scales, _, _ = feed([1.0] * 30 + [1e4, 1e4, 1.0], ceiling=500.0)
    assert scales[30] * 1e4 < 10.0


class Explosive(nn.Module):
    """A ReLU RNN whose recurrent weights are orthogonal x1.8: its gradient is huge from the first step."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(8, 32, num_layers=2, nonlinearity="relu", batch_first=True)
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.orthogonal_(p, gain=1.8)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def rnn_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 20, 8, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(n)]


def weight_norm(model):
    return float(torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in model.parameters()])))


def first_step(make_opt, clip="auto"):
    from gradguard.torch import GradGuard

    torch.manual_seed(0)
    model = Explosive()
    opt = make_opt(model.parameters())
    guard = GradGuard(model, clip=clip, skip_nonfinite=False)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = rnn_batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    raw = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    guard.step(opt)
    moved = float(torch.linalg.vector_norm(torch.stack([(p.detach() - b).norm() for p, b in
                                                        zip(model.parameters(), before)])))
    w0 = float(torch.linalg.vector_norm(torch.stack([b.norm() for b in before])))
    return raw, moved, w0, guard


def test_torch_sgd_first_step_is_held_to_an_update_the_size_of_the_weights():
    lr, momentum = 0.05, 0.9
    raw, moved, w0, guard = first_step(lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum))
    ceiling = w0 * (1 - momentum) / lr  # one gradient moves the weights lr/(1-momentum) x itself, all told
    assert raw > 10 * ceiling  # the case is what it claims: far above the ceiling at step 0
    assert guard.totals["clipped"] == 1
    assert moved == pytest.approx(lr * ceiling, rel=1e-3)  # the step applied lr x the ceiling
    # contained, and still diagnosed: the step it held was 10x+ over the ceiling (an update that would
    # have been larger than the weights), so the learning rate / init is wrong from the start
    (finding,) = [f for f in guard.findings if f.kind == "exploding"]
    assert finding.step == 0 and finding.severity == "critical"
    assert finding.evidence["held_by_update_ceiling"] == pytest.approx(raw / ceiling, rel=1e-3)
    # None: the raw step goes through; Adam: its step does not scale with the norm, so no ceiling
    raw_n, moved_n, _, _ = first_step(lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum), clip=None)
    assert moved_n == pytest.approx(lr * raw_n, rel=1e-3)
    _, _, _, adam = first_step(lambda p: torch.optim.Adam(p, lr=1e-3))
    assert adam.totals["clipped"] == 0 and math.isinf(float(adam.engine.state["clip_ceiling"]))


def test_torch_learning_rate_schedule_moves_the_ceiling_on_log_steps():
    from gradguard.torch import GradGuard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GradGuard(model, log_every_n_steps=5)
    ceilings = []
    for step in range(10):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        guard.step(opt)
        ceilings.append(float(guard.engine.state["clip_ceiling"]))
        if step == 2:
            for g in opt.param_groups:
                g["lr"] = 0.1
    assert ceilings[0] == pytest.approx(0.1 * weight_norm(model) / 0.01, rel=0.05)
    assert ceilings[3] == ceilings[0]  # between log steps the ceiling stays
    assert ceilings[4] == pytest.approx(ceilings[0] / 10, rel=0.05)  # the log step at step 4 read lr=0.1
    assert guard.totals["clipped"] == 0


def test_healthy_sgd_run_is_untouched():
    from gradguard.torch import GradGuard

    def run(clip):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        guard = GradGuard(model, clip=clip, log_every_n_steps=10)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(60):
            x = torch.randn(32, 16, generator=g)
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())
            opt.zero_grad()
            loss.backward()
            guard.step(opt)
            losses.append(float(loss))
        return losses, guard

    auto, guard = run("auto")
    none, _ = run(None)
    assert auto == none and guard.totals["clipped"] == 0 and not guard.findings
    assert math.isfinite(float(guard.engine.state["clip_ceiling"]))  # it was there, and never met


def test_lightning_passes_its_optimizer_to_the_ceiling(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from gradguard.lightning import GradGuardCallback

    lr = 0.05

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Explosive()
            self.moved = []

        def training_step(self, batch, batch_idx):
            self._before = [p.detach().clone() for p in self.parameters()]
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def on_train_batch_end(self, *args):
            self.moved.append(float(torch.linalg.vector_norm(torch.stack(
                [(p.detach() - b).norm() for p, b in zip(self.parameters(), self._before)]))))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    module = Module()
    w0 = weight_norm(module)
    callback = GradGuardCallback(clip="auto", skip_nonfinite=False)
    tr = pl.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                    default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(module, torch.utils.data.DataLoader(rnn_batches(1), batch_size=None))
    assert callback.totals["clipped"] == 1
    assert module.moved[0] == pytest.approx(w0 * 0.1, rel=1e-3)  # lr x ceiling = (1 - momentum) |w|


def test_hf_trainer_passes_its_optimizer_to_the_ceiling(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer

    from gradguard.transformers import GradGuardCallback
    from hf_cases import json_text_dataset, tiny_llama, training_args

    lr = 100.0  # plain SGD far too fast for the model: its first step would dwarf the weights
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    callback = GradGuardCallback(clip="auto", skip_nonfinite=False)
    args = training_args(str(tmp_path / "out"), max_steps=1, max_grad_norm=0.0, optim="sgd", learning_rate=lr,
                         lr_scheduler_type="constant", weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=json_text_dataset(), callbacks=[callback]).train()
    moved = float(torch.linalg.vector_norm(torch.stack([(p.detach() - b).norm() for p, b in
                                                        zip(model.parameters(), before)])))
    w0 = float(torch.linalg.vector_norm(torch.stack([b.norm() for b in before])))
    assert callback.totals["clipped"] == 1
    assert moved == pytest.approx(0.1 * w0, rel=1e-3)  # lr x ceiling: a step of 10% of the weights


def test_auto_state_saved_before_the_ceiling_existed_resumes_with_its_latch():
    import gradguard
    from gradguard import pipeline
    from gradguard.options import Options

    layers = [gradguard.LayerInfo(f"l{i}", "linear", 10, 10, 1) for i in range(2)]
    pipe = pipeline.Pipeline(layers, gradguard.ModelFacts(), Options(clip="auto"))
    state = pipe.initial_state()
    state["clip_enabled"] = np.float32(1.0)
    state["clip_log_anchor"] = np.float32(0.5)
    saved = pipe.state_dict({k: v for k, v in state.items() if k != "clip_ceiling"})  # an older checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "policy starts fresh" warning
        restored = pipeline.Pipeline(layers, gradguard.ModelFacts(), Options(clip="auto")).restore(saved)
    assert float(restored["clip_enabled"]) == 1.0 and float(restored["clip_log_anchor"]) == 0.5
    assert math.isinf(float(restored["clip_ceiling"]))
