"""Everyday workflows on plain PyTorch and Lightning never break and never lie (issue 8, issue 13
item 1, issue 7's one surface): real loops, real optimizers, a real Trainer, tiny nets, few steps."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

import gradguard
from gradguard import clipping, stats
from gradguard.ops import numpy_ops
from gradguard.torch import GradGuard, torch_ops
from nets import ConvNet, TinyTransformer, digits, he, mlp


@pytest.fixture(autouse=True)
def quiet_findings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradguard.GradGuardWarning)
        yield


class Keep(gradguard.Sink):
    def __init__(self):
        self.records, self.findings = [], []

    def log(self, record):
        self.records.append(record)

    def finding(self, finding, is_new):
        self.findings.append((finding.kind, is_new))


def loop(model, guard, steps, lr=0.1, opt="sgd", poison_at=(), read=False, batch=32):
    """A plain loop over digits; ``read``: look at the results after every step."""
    x, y = digits(512)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr) if opt == "sgd" else torch.optim.Adam(
        model.parameters(), lr=lr)
    for step in range(steps):
        i = (step * batch) % 480
        xb = x[i:i + batch].clone()
        if step in poison_at:
            xb[0, 0] = float("nan")
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), y[i:i + batch]).backward()
        guard.step(optimizer)
        if read:
            guard.findings, guard.skipped_steps, guard.totals  # noqa: B018 (a look)
    return optimizer


def sigmoid_stack():
    torch.manual_seed(0)
    return mlp(10, nn.Sigmoid)


# ------------------------------------------------------------------------------- 4: reading is a pure look

def test_reading_results_inside_the_loop_changes_nothing():
    runs = []
    for read in (False, True):
        sink = Keep()
        model = sigmoid_stack()
        guard = GradGuard(model, log_every_n_steps=10, sinks=sink)
        loop(model, guard, 40, read=read)
        runs.append((sink, guard))
    (quiet, _), (peeked, guard) = runs
    assert [r.step for r in peeked.records] == [r.step for r in quiet.records] == [9, 19, 29, 39]
    assert peeked.findings == quiet.findings and runs[0][1].findings == guard.findings
    assert [f.kind for f in guard.findings] == ["vanishing"]
    assert [(f.step, f.evidence) for f in guard.findings] == [(f.step, f.evidence) for f in runs[0][1].findings]


def test_a_look_between_log_steps_sees_the_pending_steps():
    model = mlp(2, init=he)
    sink = Keep()
    guard = GradGuard(model, log_every_n_steps=50, sinks=sink)
    loop(model, guard, 7, poison_at=(3,))
    assert guard.skipped_steps == 1 and guard.totals["steps"] == 7  # evaluated ...
    assert [f.kind for f in guard.findings] == ["nonfinite"]
    assert sink.records == [] and sink.findings == []  # ... nothing reached the sink
    assert guard.engine.monitor.totals["steps"] == 1  # ... and not judged: the window goes on


# ------------------------------------------------------------------------------- 6: attaching twice

def test_attach_twice_and_attach_plus_step_count_each_step_once():
    model = mlp(2, init=he)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = GradGuard(model, log_every_n_steps=5)
    h1, h2 = guard.attach(opt), guard.attach(opt)  # a re-run cell
    x, y = digits(64)
    for step in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step % 2:
            opt.step()
        else:
            assert guard.step(opt)  # attach plus guard.step: still once
    assert guard.engine.step_count == 6 and guard.totals["steps"] == 6
    with pytest.raises(ValueError, match="another optimizer"):
        guard.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    # a new guard on the same optimizer (the cell that made the guard re-run): the old one lets go
    new = GradGuard(model, log_every_n_steps=5)
    with pytest.warns(UserWarning, match="already had a GradGuard attached"):
        new.attach(opt)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert guard.engine.step_count == 6 and new.engine.step_count == 1
    h1.remove(), h2.remove()
    engine = new.engine
    engine.before_step()
    with pytest.raises(RuntimeError, match="twice"):
        engine.before_step()


# ------------------------------------------------------------------------------- 1: closures

@pytest.mark.parametrize("how", ["guard.step", "attach"])
def test_a_closure_optimizer_step_measures_the_closures_gradients(how):
    torch.manual_seed(0)
    model = mlp(2, init=he)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sink = Keep()
    guard = GradGuard(model, log_every_n_steps=1, sinks=sink)
    if how == "attach":
        guard.attach(opt)
    x, y = digits(64)
    norms = []
    for step in range(6):
        def closure():
            opt.zero_grad()
            xb = x.clone()
            if step == 3:
                xb[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(model(xb), y)
            loss.backward()
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
            return loss

        before = [p.detach().clone() for p in model.parameters()]
        loss = guard.step(opt, closure) if how == "guard.step" else opt.step(closure)
        if how == "attach":
            assert torch.is_tensor(loss)  # the optimizer still returns the closure's loss
        if step == 3:  # the NaN step never reaches the weights
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.skipped_steps == 1 and [(f.kind, f.step) for f in guard.findings] == [("nonfinite", 3)]
    logged = {r.step: r.scalars["grad/norm/global"] for r in sink.records}
    for step in (1, 2, 4, 5):  # the gradients judged are the closure's own, of the same step
        assert logged[step] == pytest.approx(norms[step], rel=1e-4)


def test_lbfgs_is_refused_clearly():
    model = mlp(1)
    opt = torch.optim.LBFGS(model.parameters())
    guard = GradGuard(model)
    with pytest.raises(TypeError, match="LBFGS.*closure several times"):
        guard.attach(opt)
    with pytest.raises(TypeError, match="LBFGS"):
        guard.step(opt, lambda: torch.zeros(()))


# ------------------------------------------------------------------------------- 2: unfreezing

def test_parameters_unfrozen_after_the_first_steps_are_watched():
    torch.manual_seed(0)
    model = mlp(3, init=he)
    model[0].requires_grad_(False)
    guard = GradGuard(model, log_every_n_steps=5)
    opt = loop(model, guard, 5, poison_at=(2,))
    assert [l.name for l in guard.layers] == ["2", "4", "6"]
    tracked = float(guard.engine.state["trk_count"])
    model[0].requires_grad_(True)
    x, y = digits(64)
    with pytest.warns(UserWarning, match="trainable layers changed"):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            guard.step(opt)
    assert [l.name for l in guard.layers] == ["0", "2", "4", "6"]  # joined in forward order
    assert float(guard.engine.state["trk_count"]) == tracked + 5  # the tracker carried on
    assert [f.kind for f in guard.findings] == ["nonfinite"] and guard.totals["steps"] == 10
    assert guard.history[-1][1].shape == (4,) and math.isnan(guard.history[0][1][0])


# ------------------------------------------------------------------------------- 5, 11: resuming

@pytest.mark.parametrize("clip", ["zscore", 0.5, "percentile", None])
def test_resuming_under_another_clip_carries_what_carries(clip):
    model = mlp(2, init=he)
    first = GradGuard(model, clip="auto", log_every_n_steps=4)
    loop(model, first, 6, poison_at=(1,))
    saved = first.state_dict()
    resumed = GradGuard(model, clip=clip, log_every_n_steps=4)
    with pytest.warns(UserWarning, match=r"'auto'.*starts fresh"):
        resumed.load_state_dict(saved)
        loop(model, resumed, 6)
    assert resumed.totals["steps"] == 12 and resumed.skipped_steps == 1
    assert [f.kind for f in resumed.findings] == ["nonfinite"]


def test_a_state_from_a_model_with_other_shapes_is_refused():
    a = mlp(2, width=16)
    guard = GradGuard(a)
    loop(a, guard, 2)
    b = mlp(2, width=32)  # the same layer names
    other = GradGuard(b)
    other.load_state_dict(guard.state_dict())
    with pytest.raises(ValueError, match="different model: layer '0' had"):
        loop(b, other, 1)
    built = GradGuard(b)
    loop(b, built, 1)
    with pytest.raises(ValueError, match="different model"):
        built.load_state_dict(guard.state_dict())


# ------------------------------------------------------------------------------- 7: complex parameters

class ComplexNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(64, 8)
        self.mix = nn.Parameter(torch.randn(8, 8, dtype=torch.cfloat) / 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        z = self.proj(x).to(torch.cfloat) @ self.mix
        return self.head(z.abs())


def test_complex_parameters_are_measured_by_the_norm_of_their_complex_gradient():
    model = ComplexNet()
    sink = Keep()
    guard = GradGuard(model, log_every_n_steps=1, sinks=sink, clip=1e-3)
    x, y = digits(64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    raw = float(torch.linalg.vector_norm(model.mix.grad))
    assert guard.step(opt)
    assert sink.records[-1].scalars["grad/norm/(root)"] == pytest.approx(raw, rel=1e-5)
    clipped = float(torch.linalg.vector_norm(torch.cat([torch.view_as_real(p.grad).flatten() if p.is_complex()
                                                        else p.grad.flatten() for p in model.parameters()])))
    assert clipped == pytest.approx(1e-3, rel=1e-3) and torch.isfinite(model.mix).all()
    assert "(root)" in [l.name for l in guard.layers]


# ------------------------------------------------------------------------------- 9: constructor checks

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_logged_layers=-1), ValueError, "max_logged_layers.*-1"),
    (dict(max_logged_layers=1), ValueError, "max_logged_layers.*1"),
    (dict(max_logged_layers=2.5), ValueError, "max_logged_layers.*2.5"),
    (dict(measure_updates="no"), TypeError, "measure_updates.*'no'"),
    (dict(histograms=1), TypeError, "histograms"),
    (dict(clp="auto"), TypeError, "'clp'.*did you mean 'clip'"),
])
def test_constructor_checks_every_option(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradGuard(mlp(1), **kwargs)


def test_numpy_integers_are_accepted():
    guard = GradGuard(mlp(1), log_every_n_steps=np.int64(5), max_logged_layers=np.int32(4))
    assert guard.engine.log_every_n_steps == 5


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        GradGuard(mlp(1), "auto")


# ------------------------------------------------------------------------------- issue 13: BN statistics

def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were():
    torch.manual_seed(0)
    model = ConvNet(depth=2)
    guard = GradGuard(model, log_every_n_steps=50)
    x, y = digits(256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bn = model.body[1]
    for step in range(8):
        xb = x[step * 32:(step + 1) * 32].clone()
        if step == 5:
            xb[0, 0] = float("nan")
            saved = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), y[step * 32:(step + 1) * 32]).backward()
        assert guard.step(opt) == (step != 5)
        if step == 5:
            assert torch.equal(bn.running_mean, saved[0]) and torch.equal(bn.running_var, saved[1])
            assert int(bn.num_batches_tracked) == int(saved[2]) == 5
    assert int(bn.num_batches_tracked) == 7
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    assert all(torch.isfinite(b).all() for b in model.buffers())


# ------------------------------------------------------------------------------- names, warnings

def test_parameters_of_the_root_module_have_a_stable_name():
    model = TinyTransformer()
    guard = GradGuard(model)
    x, y = digits(32)
    nn.functional.cross_entropy(model(x), y).backward()
    guard.step(torch.optim.SGD(model.parameters(), lr=0.0))
    names = [l.name for l in guard.layers]
    assert gradguard.torch.ROOT_NAME == "(root)" and "(root)" in names and "TinyTransformer" not in names


def test_a_finding_is_one_warning_at_the_users_line(caplog):
    model = mlp(2, init=he)
    guard = GradGuard(model, log_every_n_steps=2)
    x, y = digits(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x * (float("nan") if step == 1 else 1.0)), y).backward()
            guard.step(opt)  # <- the line a finding points at
        guard.close()
    ours = [w for w in caught if issubclass(w.category, gradguard.GradGuardWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__ and "guard.step(opt)" in open(__file__).read().splitlines()[
        ours[0].lineno - 1]
    assert not [r for r in caplog.records if r.name == "gradguard" and r.levelname == "WARNING"]


# ------------------------------------------------------------------------------- Also: one step math, policies

class _Halve(NamedTuple):
    seen: object


def halving_policy(max_norm):
    """A custom rule: clip to ``max_norm``, counting the steps it saw (typed state)."""
    def init():
        return _Halve(0.0)

    def update(state, norm, signals, xp):
        return xp.minimum(norm * 0.0 + max_norm, float("inf")), _Halve(state.seen + 1.0)

    return clipping.ClipPolicy("halving", init, update, f"custom: clip to {max_norm}")


@pytest.mark.parametrize("policy", [clipping.auto(), clipping.zscore(warmup_steps=3), clipping.percentile(history=8),
                                    clipping.fixed(2.0), halving_policy(1.5)], ids=lambda p: p.name)
def test_device_step_is_the_same_under_numpy_and_torch(policy):
    rng = np.random.default_rng(0)
    n_layers = 4
    norms = np.exp(rng.normal(0, 0.2, size=(30, n_layers))).astype(np.float32)
    norms[12] *= 300  # a spike
    norms[13, 1] = np.nan  # an overflow right after it
    norms[20:23] *= 50
    has = np.ones(n_layers, np.float32)
    has[2] = 0.0
    s_np = stats.init_state(n_layers, policy)
    s_t = {k: torch.as_tensor(v) for k, v in s_np.items()}
    for row in norms:
        sq = (row ** 2).astype(np.float32)
        scale_n, fin_n, s_np = stats.device_step(s_np, sq, has, policy, numpy_ops)
        scale_t, fin_t, s_t = stats.device_step(s_t, torch.as_tensor(sq), torch.as_tensor(has), policy, torch_ops)
        assert float(scale_t) == pytest.approx(float(scale_n), rel=1e-5) and float(fin_t) == float(fin_n)
    for k in s_np:
        np.testing.assert_allclose(s_t[k].numpy(), np.asarray(s_np[k]), rtol=1e-5, err_msg=k)


def explosive():
    torch.manual_seed(0)
    model = mlp(4, init=he)
    return model


@pytest.mark.parametrize("clip", ["zscore", "percentile"])
def test_zscore_and_percentile_through_the_torch_adapter(clip):
    model = explosive()
    guard = GradGuard(model, clip=clip, log_every_n_steps=10)
    x, y = digits(512)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    clipped = []
    for step in range(40):
        opt.zero_grad()
        scale = 1e3 if step == 30 else 1.0
        i = torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(step))
        (scale * nn.functional.cross_entropy(model(x[i]), y[i])).backward()
        raw = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        guard.step(opt)
        after = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        clipped.append(after < raw * 0.999)
    assert clipped[30]  # the spike is cut
    if clip == "percentile":
        assert sum(clipped) > 20  # AutoClip (p=10) clips most steps a little
    assert guard.totals["clipped"] == sum(clipped)


def test_a_custom_policy_runs_end_to_end():
    model = mlp(2, init=he)
    guard = GradGuard(model, clip=halving_policy(0.25), log_every_n_steps=5)
    x, y = digits(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        guard.step(opt)
        after = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        assert after == pytest.approx(0.25, rel=1e-3)
    assert float(guard.engine.state["clip_seen"]) == 10 and guard.totals["clipped"] == 10
    assert guard.state_dict()["policy"] == "halving"


# =============================================================================== Lightning, real Trainer

@pytest.fixture
def pl():
    return pytest.importorskip("pytorch_lightning")


def lightning_module(pl, net, poison=(), spike=None, opt="sgd", lr=0.1):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.norms, self.poison = net, [], set(poison)

        def training_step(self, batch, batch_idx):
            x, y = batch
            step = self.global_step
            if step in self.poison:  # once: a second fit counts global_step from 0 again
                self.poison.discard(step)
                x = x * float("nan")
            loss = nn.functional.cross_entropy(self.net(x), y)
            return loss * spike[1] if spike is not None and step == spike[0] else loss

        def on_before_optimizer_step(self, optimizer):  # runs after the callback's hook
            grads = [p.grad.norm() for p in self.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None)

        def configure_optimizers(self):
            if opt == "lbfgs":
                return torch.optim.LBFGS(self.parameters())
            return (torch.optim.SGD if opt == "sgd" else torch.optim.Adam)(self.parameters(), lr=lr)

    return Module()


def data(n=256, batch=16):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*digits(n)), batch_size=batch, shuffle=False)


def fit(pl, tmp_path, module, callbacks, ckpt_path=None, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("enable_checkpointing", False)
    tr = pl.Trainer(callbacks=callbacks, logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=0),
                    default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradguard.GradGuardWarning)
        warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers|LightningModule).*")
        tr.fit(module, data(), ckpt_path=ckpt_path)
    return tr


def metrics(tmp_path):
    import csv

    return list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))


def test_lightning_reading_results_in_the_loop_changes_nothing(pl, tmp_path):
    from gradguard.lightning import GradGuardCallback

    class Reader(pl.Callback):
        def __init__(self, guard):
            self.guard, self.seen = guard, []

        def on_train_batch_end(self, *args):
            self.seen.append((len(self.guard.findings), self.guard.totals["steps"], self.guard.skipped_steps))

        def on_before_optimizer_step(self, *args):
            self.guard.findings  # noqa: B018 (a look inside the step)

    out = []
    for read in (False, True):
        cb = GradGuardCallback(log_every_n_steps=5)
        torch.manual_seed(0)
        extra = [Reader(cb)] if read else []
        fit(pl, tmp_path / str(read), lightning_module(pl, mlp(8, nn.Sigmoid), poison=(7,)), [cb, *extra])
        out.append((cb, metrics(tmp_path / str(read)), extra))
    (quiet, rows_q, _), (peeked, rows_p, (reader,)) = out
    assert rows_p == rows_q  # the loggers got the same rows
    assert peeked.findings == quiet.findings and peeked.totals == quiet.totals == {**quiet.totals, "steps": 16}
    assert reader.seen[7][1:] == (8, 1)  # the look saw the pending steps (a log step is every 5th)


def test_lightning_refuses_the_callback_twice(pl, tmp_path):
    from gradguard.lightning import GradGuardCallback

    # Lightning itself refuses two stateful callbacks of one type; the callback checks again at setup
    cb = GradGuardCallback()
    with pytest.raises((ValueError, RuntimeError), match="more than one .*GradGuardCallback|the same one twice"):
        fit(pl, tmp_path, lightning_module(pl, mlp(1)), [cb, cb])
    with pytest.raises((ValueError, RuntimeError), match="more than one .*GradGuardCallback|2 GradGuardCallback"):
        fit(pl, tmp_path, lightning_module(pl, mlp(1)), [GradGuardCallback(), GradGuardCallback()])


def test_lightning_fine_tuning_unfreeze_between_fits(pl, tmp_path):
    from gradguard.lightning import GradGuardCallback

    torch.manual_seed(0)
    net = mlp(3, init=he)
    net[0].requires_grad_(False)
    module = lightning_module(pl, net, poison=(3,))
    cb = GradGuardCallback(log_every_n_steps=4)
    fit(pl, tmp_path / "a", module, [cb])
    assert [l.name for l in cb.layers] == ["net.2", "net.4", "net.6"] and cb.skipped_steps == 1
    net.requires_grad_(True)
    fit(pl, tmp_path / "b", module, [cb])
    assert [l.name for l in cb.layers] == ["net.0", "net.2", "net.4", "net.6"]
    assert cb.totals["steps"] == 32 and cb.skipped_steps == 1 and [f.kind for f in cb.findings] == ["nonfinite"]


def test_lightning_resume_under_another_clip(pl, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from gradguard.lightning import GradGuardCallback

    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(pl, tmp_path / "a", lightning_module(pl, mlp(2, init=he), poison=(2,)),
        [GradGuardCallback(clip="auto", log_every_n_steps=4), ckpt], enable_checkpointing=True)
    resumed = GradGuardCallback(clip="zscore", log_every_n_steps=4)
    with pytest.warns(UserWarning, match=r"'auto'.*'zscore' policy starts fresh"):
        fit(pl, tmp_path / "b", lightning_module(pl, mlp(2, init=he)), [resumed], max_epochs=2,
            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.totals["steps"] == 32 and resumed.skipped_steps == 1


def test_lightning_state_of_a_model_with_other_shapes_is_refused(pl, tmp_path):
    from gradguard.lightning import GradGuardCallback

    first = GradGuardCallback(log_every_n_steps=4)
    fit(pl, tmp_path / "a", lightning_module(pl, mlp(2, width=16)), [first])
    other = GradGuardCallback(log_every_n_steps=4)
    other.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="different model"):
        fit(pl, tmp_path / "b", lightning_module(pl, mlp(2, width=32)), [other])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_logged_layers=2.5), ValueError, "max_logged_layers"), (dict(max_logged_layers=-1), ValueError, "-1"),
    (dict(measure_updates="no"), TypeError, "measure_updates"), (dict(clip_value=1.0), TypeError, "clip_value"),
])
def test_lightning_constructor_checks(pl, kwargs, error, match):
    from gradguard.lightning import GradGuardCallback

    with pytest.raises(error, match=match):
        GradGuardCallback(**kwargs)
    assert GradGuardCallback(log_every_n_steps=np.int64(4)).log_every_n_steps == 4


def test_lightning_skipped_step_leaves_batchnorm_statistics_finite(pl, tmp_path):
    from gradguard.lightning import GradGuardCallback

    torch.manual_seed(0)
    net = ConvNet(depth=2)
    cb = GradGuardCallback(log_every_n_steps=4)
    fit(pl, tmp_path, lightning_module(pl, net, poison=(5,), lr=0.05), [cb])
    assert cb.skipped_steps == 1
    assert all(torch.isfinite(b).all() for b in net.buffers()) and int(net.body[1].num_batches_tracked) == 15
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(digits(64)[0])).all()


@pytest.mark.parametrize("clip", ["zscore", "percentile"])
def test_lightning_zscore_and_percentile(pl, tmp_path, clip):
    from gradguard.lightning import GradGuardCallback

    torch.manual_seed(0)
    cb = GradGuardCallback(clip=clip, log_every_n_steps=4)
    module = lightning_module(pl, mlp(2, init=he), spike=(28, 1e3), lr=0.01)  # after ZClip's warm-up (25)
    fit(pl, tmp_path, module, [cb], max_epochs=2)
    assert cb.totals["clipped"] >= 1 and cb.state_dict()["engine"]["policy"] == clip
    assert module.norms[28] < 1e2  # the spike reached the optimizer clipped
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_lightning_custom_policy(pl, tmp_path):
    from gradguard.lightning import GradGuardCallback

    cb = GradGuardCallback(clip=halving_policy(0.25), log_every_n_steps=4)
    module = lightning_module(pl, mlp(2, init=he), lr=0.01)
    fit(pl, tmp_path, module, [cb])
    assert all(n == pytest.approx(0.25, rel=1e-3) for n in module.norms)
    assert cb.totals["clipped"] == 16


def test_lightning_lbfgs_is_refused(pl, tmp_path):
    from gradguard.lightning import GradGuardCallback

    with pytest.raises(TypeError, match="LBFGS"):
        fit(pl, tmp_path, lightning_module(pl, mlp(1), opt="lbfgs"), [GradGuardCallback()])
