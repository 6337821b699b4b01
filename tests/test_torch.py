"""gradguard.torch on real PyTorch training runs (scikit-learn digits, CPU)."""

import copy
import json
import math
import time
import warnings

import pytest
import torch
from torch import nn

import gradguard
from gradguard.torch import GradGuard
from nets import ConvNet, CountSyncs, ResidualMLP, RowLSTM, TinyTransformer, digits, he, mlp, train


@pytest.fixture(autouse=True)
def quiet_findings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradguard.GradGuardWarning)
        yield


def kinds(guard):
    return {f.kind: f for f in guard.findings}


def all_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------- diagnosis


def test_deep_sigmoid_mlp_vanishes_and_names_its_first_layers():
    torch.manual_seed(0)
    model = mlp(10, nn.Sigmoid)
    guard = GradGuard(model, log_every_n_steps=50)
    train(model, guard, steps=100, opt="sgd", lr=0.1)
    found = kinds(guard)
    assert set(found) == {"vanishing"}
    v = found["vanishing"]
    assert v.layers[:3] == ("0", "2", "4")  # names exactly as in model.named_modules()
    assert v.evidence["orders_of_magnitude"] > 6 and v.step == 49
    assert "sigmoid" in v.cause and any("ReLU" in r for r in v.remedies)
    assert guard.layers[0].name == "0" and guard.layers[-1].name == "20"


def test_tiny_init_tanh_vanishes_and_blames_the_init():
    torch.manual_seed(0)
    model = mlp(6, nn.Tanh, init=lambda l: (nn.init.normal_(l.weight, std=0.01), nn.init.zeros_(l.bias)))
    guard = GradGuard(model)
    train(model, guard, steps=100, opt="sgd", lr=0.1)
    v = kinds(guard)["vanishing"]
    assert v.layers[0] == "0" and "initialised too small" in v.cause
    assert any("Glorot" in r for r in v.remedies)


def explosive_mlp():
    torch.manual_seed(0)
    # std 0.25 at lr 0.5: diverges on any thread count (at std 0.2 the run is chaotic: it diverged on
    # 1 thread and not on 2, from float rounding alone)
    return mlp(4, init=lambda l: (nn.init.normal_(l.weight, std=0.25), nn.init.zeros_(l.bias)))


def test_bad_init_explodes_without_help():
    model = explosive_mlp()
    guard = GradGuard(model, clip=None, skip_nonfinite=False)
    losses = train(model, guard, steps=100, opt="sgd", lr=0.5)
    assert not math.isfinite(losses[-1]) and not all_finite(model)  # a real divergence
    assert {"exploding", "nonfinite"} <= set(kinds(guard))


def test_auto_clipping_rescues_the_same_run():
    model = explosive_mlp()
    guard = GradGuard(model, clip="auto")
    losses = train(model, guard, steps=150, opt="sgd", lr=0.5)
    assert all_finite(model) and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 1.0  # it went on learning
    # Protected on the device from the first step: auto's update ceiling (SGD: no step may move the
    # weights by more than 10% of their norm) holds the run before the tracker sees an explosion, so the
    # evidence a finding needs (growth sustained, an overflow, updates that dwarf the weights) never
    # arose: protection and diagnosis are separate (issue 12).
    monitor = guard.engine.monitor
    assert monitor.totals["clipped"] >= 1 and guard.skipped_steps == 0
    assert monitor.history and monitor.totals["explosions"] == 0


def test_dead_relu_units_are_found():
    torch.manual_seed(0)
    model = mlp(4, init=lambda l: (nn.init.kaiming_normal_(l.weight), nn.init.constant_(l.bias, -3.0)))
    guard = GradGuard(model)
    train(model, guard, steps=150, opt="sgd", lr=0.05)
    d = kinds(guard)["dead"]
    assert d.layers[0] == "0" and d.evidence["dead_fraction"]["0"] > 0.9
    assert any("LeakyReLU" in r for r in d.remedies)


HEALTHY = {
    "relu_he_mlp": (lambda: mlp(6, init=he), dict(opt="adam", lr=1e-3)),
    "relu_he_mlp_sgd": (lambda: mlp(6, init=he), dict(opt="sgd", lr=0.05)),
    "residual_mlp": (lambda: ResidualMLP(depth=8), dict(opt="adam", lr=1e-3)),
    "bn_cnn": (lambda: ConvNet(depth=6), dict(opt="adam", lr=1e-3)),
    "lstm": (lambda: RowLSTM(), dict(opt="adam", lr=3e-3)),
    "transformer": (lambda: TinyTransformer(), dict(opt="adam", lr=1e-3)),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_nets_have_no_findings(name):
    make, kw = HEALTHY[name]
    torch.manual_seed(0)
    model = make()
    guard = GradGuard(model)
    losses = train(model, guard, steps=250, **kw)
    assert losses[-1] < 0.5 * losses[0]  # it really trained
    assert guard.findings == []
    assert guard.engine.monitor.totals["clipped"] == 0


def test_frozen_and_unused_parameters_are_neither_vanishing_nor_dead():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp(3, init=he)
            self.spare = nn.Linear(64, 64)  # never called

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = WithSpare()
    model.body[0].requires_grad_(False)
    guard = GradGuard(model)
    train(model, guard, steps=150)
    assert guard.findings == []
    names = [layer.name for layer in guard.layers]
    assert "body.0" not in names and names[0] == "body.2" and names[-1] == "spare"


# ------------------------------------------------------------------------------- mitigation


def test_a_poisoned_batch_is_skipped_exactly_once():
    torch.manual_seed(0)
    model = mlp(3, init=he)
    guard = GradGuard(model, log_every_n_steps=20)
    x, y = digits()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(60):
        xb, yb = x[step * 16:(step + 1) * 16].clone(), y[step * 16:(step + 1) * 16]
        if step == 30:
            xb[3, 5] = float("nan")
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        stepped = guard.step(opt)
        assert stepped == (step != 30)
        losses.append(loss.item())
        if step == 30:  # the optimizer never saw it
            assert all(p.grad is None for p in model.parameters())
            assert all(opt.state[p]["step"] == 30 for p in model.parameters())
    assert all_finite(model)
    assert all(torch.isfinite(t).all() for s in opt.state.values() for t in s.values())
    assert guard.skipped_steps == 1 and math.isfinite(losses[-1]) and losses[-1] < losses[0]
    n = kinds(guard)["nonfinite"]
    assert n.step == 30 and n.evidence["nonfinite_steps"] == 1 and n.severity == "warning"


def test_attach_does_the_same_inside_optimizer_step():
    torch.manual_seed(0)
    model = mlp(3, init=he)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = GradGuard(model, log_every_n_steps=10)
    handle = guard.attach(opt)
    x, y = digits(256)
    for step in range(40):
        xb = x[:64].clone()
        if step == 12:
            xb[0, 0] = float("inf")
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), y[:64]).backward()
        opt.step()  # the user's loop is unchanged
    handle.remove()
    assert all_finite(model) and guard.skipped_steps == 1
    assert kinds(guard)["nonfinite"].step == 12
    assert guard.engine.step_count == 40


def test_fixed_clip_bounds_the_global_norm():
    torch.manual_seed(0)
    model = mlp(3, init=he)
    guard = GradGuard(model, clip=0.05, log_every_n_steps=5)
    x, y = digits(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        guard.step(opt)
        clipped = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert raw > 0.05 and clipped == pytest.approx(0.05, rel=1e-3)
    assert guard.engine.monitor.totals["clipped"] == 10


# ------------------------------------------------------------------------------- no host sync




@pytest.fixture
def host_reads(monkeypatch):
    """Counts this thread's host reads (a background thread left by an earlier test, e.g. a
    compile of the per-step bookkeeping, may read too)."""
    import threading

    calls, me = {"n": 0}, threading.get_ident()
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, __original=original, **k):
            calls["n"] += threading.get_ident() == me
            return __original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("skip_nonfinite, fused, per_step",
                         [(False, False, 0), (False, True, 0), (True, False, 1), (True, True, 0)])
def test_no_host_sync_on_steps_that_do_not_log(host_reads, skip_nonfinite, fused, per_step):
    """The accelerator path (forced on this CPU): nothing leaves the device on a non-log step, except
    the one gate read when skipping with an optimizer that cannot take a device-side found_inf;
    a fused optimizer gets the verdict on the device and the step costs no read at all."""
    torch.manual_seed(0)
    model = ConvNet(depth=2)
    guard = GradGuard(model, clip="auto", skip_nonfinite=skip_nonfinite, log_every_n_steps=1000)
    guard.engine.host_reads_free = False  # as on a GPU
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3, fused=True) if fused
           else torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = digits(32)

    def backward():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    backward()
    guard.step(opt)  # the first step fixes the layout
    assert guard.engine.step_path == "eager"
    syncs, reads = 0, 0
    for _ in range(20):
        backward()
        with CountSyncs() as mode:
            before = host_reads["n"]
            assert guard.engine.before_step(opt)
            reads += host_reads["n"] - before
        syncs += mode.count
        opt.step()  # the optimizer's own work is not ours to count
        with CountSyncs() as mode:
            before = host_reads["n"]
            guard.engine.after_step()
            reads += host_reads["n"] - before
        syncs += mode.count
    assert syncs == 20 * per_step and reads == 20 * per_step
    assert guard.engine.gate == ("none" if not skip_nonfinite else "optimizer" if fused else "host read")
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")  # handed back after each step


@pytest.mark.parametrize("clip, skip_nonfinite, reads_per_step", [("auto", True, "norms"), (None, True, "norms"),
                                                                    (None, False, "norms"), (0.5, True, 1)])
def test_on_a_cpu_device_the_verdict_is_read_for_free(host_reads, clip, skip_nonfinite, reads_per_step):
    """A CPU device runs the bookkeeping in numpy. A quiet step of ``auto`` and ``clip=None`` read each
    parameter's norm once (free on a CPU) and leave the rest for later; a fixed threshold needs the
    exact float32 norm: one zero-copy view of the stacked norms."""
    torch.manual_seed(0)
    model = ConvNet(depth=2)
    guard = GradGuard(model, clip=clip, skip_nonfinite=skip_nonfinite, log_every_n_steps=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    n_params = len(list(model.parameters()))
    x, y = digits(32)
    waited = 0
    for step in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pending = len(guard.engine._built.step_fn._pending) if guard.engine.built else 0
        with CountSyncs() as mode:
            before = host_reads["n"]
            guard.step(opt)
            reads = host_reads["n"] - before
        if step > 0:
            expected = n_params if reads_per_step == "norms" else reads_per_step
            if reads == expected:
                waited += len(guard.engine._built.step_fn._pending) > pending
                assert mode.count == reads - (reads_per_step == 1)  # item() dispatches a read, numpy() does not
            else:  # (auto: a step that may be a spike is judged exactly: its norms read, then one view)
                assert clip == "auto" and reads == n_params + 1, step
    assert waited >= 4  # (auto's first steps are quiet on this net; allow one that is not)
    assert guard.engine.step_path == "numpy (cpu)"
    assert guard.engine.gate == ("host read (cpu)" if skip_nonfinite else "none")
    assert guard.engine._built.step_fn._pending  # the steps' bookkeeping is still waiting
    assert guard.totals["steps"] == 6 and not guard.engine._built.step_fn._pending  # a look runs it


@pytest.mark.parametrize("attach", [False, True])
def test_a_fused_optimizer_skips_a_nonfinite_step_on_the_device(attach):
    """The sync-free gate: a NaN step leaves weights, Adam's moments and step count and BatchNorm's
    running statistics exactly as they were; a clipping step's factor reaches the fused kernel."""
    torch.manual_seed(0)
    model = ConvNet(depth=2)
    guard = GradGuard(model, clip=0.5, log_every_n_steps=1000)
    guard.engine.host_reads_free = False  # as on a GPU
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    if attach:
        guard.attach(opt)
    x, y = digits(64)

    def step(xb):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), y[:32]).backward()
        return opt.step() if attach else guard.step(opt)

    for _ in range(3):
        step(x[:32])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    poisoned = x[32:64].clone()
    poisoned[3, 5] = float("nan")
    step(poisoned)
    assert guard.engine.gate == "optimizer"
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        for k, v in opt.state[p].items():
            assert torch.equal(v, moments[id(p)][k]), (n, k)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    # a healthy step goes on, clipped inside the fused kernel: the same weights as clipping by hand
    twin = ConvNet(depth=2)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3, fused=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict would share the moments)
    step(x[:32])
    twin_opt.zero_grad()
    nn.functional.cross_entropy(twin(x[:32]), y[:32]).backward()
    nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    twin_opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert all(int(opt.state[p]["step"]) == 4 for p in model.parameters())
    assert guard.skipped_steps == 1 and guard.totals["nonfinite"] == 1 and guard.totals["clipped"] >= 4


@pytest.mark.parametrize("host_reads_free", [None, False])
@pytest.mark.parametrize("clip", [0.05, "agc"])
def test_a_grad_scaler_driving_a_fused_optimizer_is_measured_and_clipped_unscaled(host_reads_free, clip):
    """GradScaler leaves a fused optimizer's gradients scaled (its kernel divides by ``grad_scale``):
    gradguard measures and clips the unscaled gradients, so norms, max-abs and weights match a run
    without a scaler (the accelerator path, forced, also hands its clip factor to the kernel)."""

    def run(scaler):
        torch.manual_seed(0)
        model = mlp(3, init=he)
        logged = []

        class Keep(gradguard.Sink):
            def log(self, record):
                logged.append({k: v for k, v in record.scalars.items() if k.startswith("grad/")})

        guard = GradGuard(model, clip=clip, log_every_n_steps=2, sinks=Keep())
        guard.engine.host_reads_free = host_reads_free
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
        guard.attach(opt)
        x, y = digits(64)
        for _ in range(6):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return logged, list(model.parameters()), guard.totals

    plain, plain_w, plain_totals = run(None)
    scaled, scaled_w, scaled_totals = run(torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert len(scaled) == len(plain) == 3
    for a, b in zip(plain, scaled):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-9), k
    for p, q in zip(plain_w, scaled_w):
        torch.testing.assert_close(p, q)
    assert scaled_totals == plain_totals and (clip == "agc" or plain_totals["clipped"] == 6)


@pytest.mark.parametrize("host_reads_free", [None, False])
@pytest.mark.parametrize("init_scale", [1024.0, 1.0])
def test_a_grad_scaler_s_own_skips_through_attach_are_not_findings(host_reads_free, init_scale):
    """GradScaler.step drives a fused optimizer through ``attach``: a NaN batch at a loss scale above 1
    is the scaler's skip (its ``found_inf`` makes the kernel skip the update): counted apart, no
    finding, on a CPU (verdict read at once) and on the accelerator path (forced here: the verdict
    stays on the device, the skip is counted there and read on the log step). At a scale of 1 it is
    a non-finite step of the run's own, as without a scaler."""
    torch.manual_seed(0)
    model = mlp(3, init=he)
    guard = GradGuard(model, log_every_n_steps=4)
    guard.engine.host_reads_free = host_reads_free
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    guard.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    x, y = digits(64)
    moved = []
    for step in range(8):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        xs = x.clone()
        if step == 5:  # a non-log step (log steps: 0, 3, 7)
            xs[0, 0] = float("nan")
        scaler.scale(nn.functional.cross_entropy(model(xs), y)).backward()
        scaler.step(opt)
        scaler.update()
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
    assert moved == [True] * 5 + [False] + [True] * 2 and all(torch.isfinite(p).all() for p in model.parameters())
    totals = guard.totals
    if init_scale > 1:
        assert totals["loss_scale_skipped"] == 1 and totals["nonfinite"] == 0 and not guard.findings
    else:
        assert totals["loss_scale_skipped"] == 0 and totals["nonfinite"] == 1
        assert [(f.kind, f.step) for f in guard.findings] == [("nonfinite", 5)]


# ------------------------------------------------------------------------------- state, sinks, arguments


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = mlp(6, nn.Sigmoid)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def run(model, opt, guard, steps, start):
        x, y = digits()
        for step in range(start, start + steps):
            g = torch.Generator().manual_seed(step)
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            scale = 1e4 if step == 70 else 1.0  # a spike after the checkpoint
            (scale * nn.functional.cross_entropy(model(x[idx]), y[idx])).backward()
            guard.step(opt)

    model, opt = fresh()
    whole = GradGuard(model, clip="auto", log_every_n_steps=20)
    run(model, opt, whole, 120, 0)

    model, opt = fresh()
    first = GradGuard(model, clip="auto", log_every_n_steps=20)
    run(model, opt, first, 55, 0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": first.state_dict()}, path)

    model, opt = fresh()
    ckpt = torch.load(path, weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    resumed = GradGuard(model, clip="auto", log_every_n_steps=20)
    resumed.load_state_dict(ckpt["guard"])
    run(model, opt, resumed, 65, 55)

    a, b = whole.state_dict(), resumed.state_dict()
    assert a["step_count"] == b["step_count"] == 120
    for k in a["device_state"]:
        torch.testing.assert_close(a["device_state"][k], b["device_state"][k], rtol=0, atol=0, msg=k)
    assert json.dumps(a["monitor"], sort_keys=True) == json.dumps(b["monitor"], sort_keys=True)
    # the 1e4x step after the checkpoint is confirmed and clipped by the tracker (a lone step that
    # clip="auto" contained is not an exploding finding, issue 12); the vanishing finding spans the resume
    assert {f.kind for f in whole.findings} >= {"vanishing"}
    assert whole.engine.monitor.totals["explosions"] >= 1 and resumed.engine.monitor.totals["explosions"] >= 1
    assert whole.findings == resumed.findings


def test_jsonl_sink_and_report(tmp_path):
    torch.manual_seed(0)
    model = mlp(8, nn.Sigmoid)
    guard = GradGuard(model, sinks=tmp_path / "run", log_every_n_steps=25)
    train(model, guard, steps=100, opt="sgd", lr=0.1)
    guard.close()
    lines = [json.loads(l) for l in (tmp_path / "run" / "gradguard.jsonl").read_text().splitlines()]
    steps = [l for l in lines if l["type"] == "step"]
    assert [s["step"] for s in steps] == [24, 49, 74, 99]
    keys = steps[-1]["scalars"]
    for key in ("grad/norm/global", "grad/norm/0", "grad/rms/0", "grad/max_abs/0", "grad/zero_frac/0",
                "grad/grad_to_weight/0", "grad/update_to_weight/0", "grad/depth_ratio",
                "gradguard/skipped_steps", "gradguard/clipped_steps"):
        assert key in keys, key
    assert keys["grad/depth_ratio"] < 1e-6
    assert any(l["type"] == "finding" and l["kind"] == "vanishing" for l in lines)
    from gradguard.report import write_report

    html = open(write_report(tmp_path / "run" / "gradguard.jsonl")).read()
    assert "vanishing" in html and "<svg" in html and "ReLU" in html


def test_big_models_log_a_bounded_number_of_layers():
    records = []

    class Keep(gradguard.Sink):
        def log(self, record):
            records.append(record)

    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(100)])
    guard = GradGuard(model, log_every_n_steps=1, max_logged_layers=10, sinks=Keep())
    model(torch.randn(4, 8)).sum().backward()
    guard.step(torch.optim.SGD(model.parameters(), lr=0.0))
    layer_keys = [k for k in records[-1].scalars if k.startswith("grad/norm/") and "global" not in k]
    assert len(layer_keys) == 10 and "grad/norm/0" in layer_keys and "grad/norm/99" in layer_keys
    assert len(records[-1].layer_norm) == 100  # the heatmap still sees every layer


def test_a_torch_compiled_model_compiles_a_few_graphs_not_one_per_step():
    """Under ``torch.compile`` gradguard's forward hooks are traced with the model. They decide on a
    bool (a log step next or not), so dynamo compiles a few graphs; they read the step count before,
    and every step was a new graph until dynamo's recompile limit (8) sent the model back to eager.
    Skips and their BatchNorm restore work compiled as they do eagerly."""
    def run(compiled):
        torch.manual_seed(0)
        graphs = []

        def counting_backend(gm, example_inputs):  # a dynamo backend that runs the graph as traced
            graphs.append(gm)
            return gm.forward

        layers = [nn.Linear(16, 32), nn.Tanh()]
        for _ in range(4):
            layers += [nn.Linear(32, 32), nn.Tanh()]
        net = nn.Sequential(*layers, nn.BatchNorm1d(32), nn.Linear(32, 4))
        model = torch.compile(net, backend=counting_backend) if compiled else net
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = GradGuard(model, log_every_n_steps=5)
        probes, take = guard.engine._probes, guard.engine._probes.take
        taken = []  # what the traced forward hooks measured, per step (saturation of the Tanh modules)
        probes.take = lambda: taken.append(take()[0]) or (taken[-1], None)
        x, y = 4.0 * torch.randn(64, 16), torch.randint(0, 4, (64,))
        for step in range(30):
            opt.zero_grad()
            xs = x.clone()
            if step == 12:
                xs[0, 0] = float("nan")
            nn.functional.cross_entropy(model(xs), y).backward()
            guard.step(opt)
        return graphs, guard, net, taken

    torch._dynamo.reset()
    graphs, guard, net, taken = run(compiled=True)
    _, eager, eager_net, eager_taken = run(compiled=False)
    assert 1 <= len(graphs) <= 4, len(graphs)
    # log steps 0, 4, 9, ..., 29; the probes are in place from the first step's end
    assert len(taken) == len(eager_taken) == 7 and taken[0] is None and all(len(t) == 5 for t in taken[1:])
    assert max(taken[-1].values()) > 0.05  # (inputs large enough to saturate some tanh outputs)
    for t, e in zip(taken[1:], eager_taken[1:]):
        assert t.keys() == e.keys() and all(t[k] == pytest.approx(e[k], abs=1e-6) for k in t)
    assert guard.skipped_steps == eager.skipped_steps == 1
    assert [(f.kind, f.step) for f in guard.findings] == [(f.kind, f.step) for f in eager.findings] == [("nonfinite", 12)]
    bn, eager_bn = net[-2], eager_net[-2]
    assert torch.isfinite(bn.running_mean).all() and int(bn.num_batches_tracked) == 29  # step 12's put back
    torch.testing.assert_close(bn.running_var, eager_bn.running_var)


def test_parameters_with_no_elements_are_not_layers():
    """A zero-size parameter (a Linear to 0 features, a placeholder) has no gradient to measure: it
    is not a layer, and log steps divide nothing by its zero size (no RuntimeWarning)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Initializing zero-element tensors is a no-op"
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 0), nn.Linear(0, 3))
    model.placeholder = nn.Parameter(torch.zeros(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GradGuard(model, log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(6):
            opt.zero_grad()
            (model(torch.randn(16, 4)).square().mean() + model.placeholder.sum()).backward()
            guard.step(opt)
        findings = guard.findings
    assert [l.name for l in guard.layers] == ["0", "3"] and [l.numel for l in guard.layers] == [40, 3]
    assert guard.totals["steps"] == 6 and not findings


@pytest.mark.parametrize("kwargs, match", [
    (dict(log_every_n_steps=-1), "log_every_n_steps"), (dict(log_every_n_steps=0), "log_every_n_steps"),
    (dict(log_every_n_steps=2.5), "log_every_n_steps"), (dict(clip="sometimes"), "clip"),
    (dict(clip=-1.0), "clip"), (dict(skip_nonfinite="yes"), "skip_nonfinite"), (dict(sinks=42), "sinks"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        GradGuard(mlp(1), **kwargs)
    assert repr(list(kwargs.values())[0]) in str(info.value)


def test_a_model_without_trainable_parameters_is_rejected():
    frozen = mlp(1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradGuard(frozen)
    with pytest.raises(TypeError, match="model"):
        GradGuard("not a model")


def test_agc_bounds_each_unit_by_its_weight():
    torch.manual_seed(0)
    model = mlp(2, init=he)
    guard = GradGuard(model, clip="agc", log_every_n_steps=5)
    x, y = digits(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.zero_grad()
    (1e3 * nn.functional.cross_entropy(model(x), y)).backward()
    guard.step(opt)
    for p in model.parameters():
        if p.dim() == 2:
            ratio = p.grad.norm(dim=1) / p.detach().norm(dim=1).clamp_min(1e-3)
            assert ratio.max() <= 0.01 * (1 + 1e-4)
        else:
            assert (p.grad.abs() <= 0.01 * p.detach().abs().clamp_min(1e-3) * (1 + 1e-4)).all()


# ------------------------------------------------------------------------------- physics edges


class MemoryRNN(nn.Module):
    """Label = the first of T tokens: the net must carry it across all T steps."""

    def __init__(self, cell=nn.RNN, T=100):
        super().__init__()
        self.T = T
        self.emb = nn.Embedding(16, 16)
        self.rnn = cell(16, 64, batch_first=True)
        self.head = nn.Linear(64, 4)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out[:, -1])


def test_vanishing_through_time_in_a_plain_rnn():
    torch.manual_seed(0)
    model = MemoryRNN()
    guard = GradGuard(model, log_every_n_steps=25)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(125):  # through-time vanishing must persist 100 optimizer steps to be a finding
        tokens = torch.randint(0, 16, (32, model.T), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), tokens[:, 0] % 4).backward()
        guard.step(opt)
    v = kinds(guard)["vanishing"]
    assert v.layers == ("rnn",) and v.evidence["time_steps"] == 100
    assert "plain RNN" in v.cause and any("LSTM" in r for r in v.remedies)
    assert v.step == 99 and v.evidence["held_for_steps"] >= 100  # measured at 0, 24, 49, 74, 99: held 100 steps


def test_a_lone_spike_is_clipped_but_not_an_explosion():
    # Late in training one hard batch can lift the norm 10-40x for a single step; the next step is
    # back at the level. clip="auto" clips that step; it is not a finding.
    torch.manual_seed(0)
    model = mlp(3, init=he)
    guard = GradGuard(model, log_every_n_steps=50)
    x, y = digits()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(150):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x[idx]), y[idx]) * (40.0 if step == 120 else 1.0)).backward()
        guard.step(opt)
    assert guard.findings == []
    totals = guard.engine.monitor.totals
    assert totals["spikes"] == 1 and totals["clipped"] == 1 and totals["explosions"] == 0


def test_a_run_exploded_from_its_first_step():
    # A deep linear net with orthogonal gain 2: the first update rewrites the weights, NaN next.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32 if i < 9 else 1, bias=False) for i in range(10)])
    for layer in model:
        nn.init.orthogonal_(layer.weight, gain=2.0)
    guard = GradGuard(model, clip=None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(64, 32, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x[:, :1]).backward()
        guard.step(opt)
    e = kinds(guard)["exploding"]
    assert e.step == 0 and e.severity == "critical" and e.evidence["update_to_weight_ratio"] > 1
    assert all_finite(model)  # the NaN steps that followed were skipped


def test_a_confident_sigmoid_output_is_not_saturation():
    torch.manual_seed(0)
    model = nn.Sequential(mlp(2, init=he)[:-1], nn.Linear(64, 1), nn.Sigmoid())
    guard = GradGuard(model, log_every_n_steps=25)
    x, y = digits()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        nn.functional.binary_cross_entropy(model(x[idx]), (y[idx] < 5).float()[:, None]).backward()
        guard.step(opt)
    assert guard.findings == []


def test_hidden_tanh_with_large_init_saturates():
    torch.manual_seed(0)
    model = mlp(2, nn.Tanh, width=128, init=lambda l: nn.init.normal_(l.weight, std=1.0))
    guard = GradGuard(model, log_every_n_steps=25)
    train(model, guard, steps=100, opt="sgd", lr=0.01)
    s = kinds(guard)["saturated"]
    assert set(s.layers) <= {"1", "3"}  # the hidden nn.Tanh modules, named as in named_modules()
    assert all(s.evidence["saturated_fraction"][n] > 0.5 for n in s.layers)
    assert any("ReLU" in r for r in s.remedies)


def test_the_compiled_bookkeeping_matches_the_eager_one_and_never_blocks_a_step():
    """TorchStep compiles stats.device_step in a background thread; steps go on eagerly meanwhile,
    then run compiled with the same numbers (or stay eager, saying so, where no compiler works)."""
    from gradguard import stats
    from gradguard.torch import _fused

    policy = gradguard.options.Options.of("GradGuard", {"clip": "zscore"}).policy
    init = stats.init_state(5, policy, trace_size=8)
    compiled = _fused.TorchStep(init, policy, gradguard.TrackerConfig(), torch.device("cpu"), compile_after=2)
    eager = _fused.TorchStep(init, policy, gradguard.TrackerConfig(), torch.device("cpu"), compile_after=None)
    has = torch.ones(5)
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        layer_sq = torch.rand(5, generator=gen) * (100.0 if i == 30 else 1.0)
        start = time.perf_counter()
        out = compiled(layer_sq, has)
        if i == 2:  # this step started the compile and did not wait for it
            returned = time.perf_counter() - start
            assert compiled.path in ("eager (compiling)", "compiled")
            assert compiled.wait_compiled(timeout=600) in ("compiled", "eager")
            if compiled.path == "compiled":
                assert returned < (time.perf_counter() - start) / 2
        for a, b in zip(out, eager(layer_sq, has)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for k, v in eager.state.items():
        assert torch.allclose(compiled.state[k], v, rtol=1e-5, atol=1e-6, equal_nan=True), k
    assert eager.path == "eager"


@pytest.mark.parametrize("clip", ["auto", "zscore", "percentile", 1.0, None])
def test_the_cpu_bookkeeping_gives_the_core_numbers_exactly(clip):
    """NumpyStep's faster namespace: bit-identical to the core's numpy reference, NaN steps included."""
    import numpy as np

    from gradguard import stats
    from gradguard.ops import numpy_ops
    from gradguard.ops import fast_numpy_ops

    policy = gradguard.options.Options.of("GradGuard", {"clip": clip}).policy
    ref = fast = stats.init_state(7, policy, trace_size=16)
    rng = np.random.default_rng(0)
    for i in range(150):
        sq = (rng.random(7) * (1e4 if i % 37 == 36 else 1.0)).astype(np.float32)
        if i % 50 == 49:
            sq[2] = np.nan
        has = (rng.random(7) > 0.1).astype(np.float32)
        a, b = stats.device_step(ref, sq, has, policy, numpy_ops), stats.device_step(fast, sq, has, policy, fast_numpy_ops)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        ref, fast = a[2], b[2]
        for k in ref:
            assert np.asarray(fast[k]).dtype == np.float32 and np.array_equal(ref[k], fast[k], equal_nan=True), (i, k)


def test_the_accelerator_path_trains_exactly_like_the_cpu_path(monkeypatch):
    """Forced on this CPU: torch bookkeeping and the fused optimizer's device-side gate against numpy
    bookkeeping and the host gate, through two poisoned batches and log steps: the same weights, the
    same skips and findings."""
    monkeypatch.setenv("GRADGUARD_COMPILE", "0")

    def run(accelerator):
        torch.manual_seed(0)
        model = ConvNet(depth=2)
        guard = GradGuard(model, log_every_n_steps=10)
        if accelerator:
            guard.engine.host_reads_free = False
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        x, y = digits(256)
        gates = set()
        for step in range(40):
            xb, yb = x[(step % 8) * 32:(step % 8 + 1) * 32].clone(), y[(step % 8) * 32:(step % 8 + 1) * 32]
            if step in (15, 27):
                xb[0, 0] = float("nan")
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            guard.step(opt)
            gates.add(guard.engine.gate)
        found = [(f.kind, f.step) for f in guard.findings]
        return [p.detach().clone() for p in model.parameters()], guard.totals, found, gates, guard.engine.step_path

    fast, cpu = run(True), run(False)
    assert fast[3] == {"optimizer", "host read"} and fast[4] == "eager"
    assert cpu[3] == {"host read (cpu)"} and cpu[4] == "numpy (cpu)"
    assert all(torch.equal(p, q) for p, q in zip(fast[0], cpu[0]))
    assert fast[1] == cpu[1] and fast[1]["skipped"] == 2 and fast[2] == cpu[2] == [("nonfinite", 15)]


@pytest.mark.parametrize("accelerator", [False, True])
def test_log_step_extras_match_a_direct_measurement(accelerator):
    """What a log step measures against the same quantities computed directly: exact max-abs and
    dead units (with and without a bias: both sides of the rule), weight norms exact below 8192
    elements, and the sampled estimates (zero share, weight norms of larger tensors, the update)
    within a few percent."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(3000, 32), nn.Flatten(), nn.Linear(4 * 32, 96), nn.ReLU(),
                          nn.Linear(96, 128, bias=False), nn.ReLU(), nn.LayerNorm(128), nn.Linear(128, 10))
    with torch.no_grad():
        model[2].bias[:40] = -50.0  # 40 units that never fire: dead, found through the bias gradient
        model[4].weight[:24] = -model[4].weight[:24].abs() - 0.1  # inputs are >= 0: 24 dead units, no bias
    guard = GradGuard(model, clip=None, log_every_n_steps=5)
    if accelerator:
        guard.engine.host_reads_free = False
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    captured = {}
    for step in range(10):
        x, y = torch.randint(0, 3000, (64, 4)), torch.randint(0, 10, (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            guard.step(opt)
            pipe = guard.engine._built.pipeline
            snapshot = pipe.snapshot
            pipe.snapshot = lambda sums: captured.setdefault("snap", snapshot(sums))
            continue
        if step == 9:  # a log step: the reference, from the same gradients and weights
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        captured.clear()
        guard.step(opt)
    snap = captured["snap"]
    names = [layer.name for layer in guard.layers]
    for i, name in enumerate(names):
        own = [n for n in grads if n.rsplit(".", 1)[0] == name]
        g = torch.cat([grads[n].flatten() for n in own])
        w = torch.cat([before[n].flatten() for n in own])
        u = torch.cat([(dict(model.named_parameters())[n].detach() - before[n]).flatten() for n in own])
        assert snap.max_abs[i] == g.abs().max().item(), name
        sampled = max(before[n].numel() for n in own) >= 8192  # weight norms estimated from the sample
        assert snap.weight_norm[i] == pytest.approx(w.norm().item(), rel=0.02 if sampled else 1e-5), name
        assert snap.zero_frac[i] == pytest.approx((g == 0).float().mean().item(), abs=0.02), name
        assert snap.update_norm[i] == pytest.approx(u.norm().item(), rel=0.05), name
    dead = {names[i]: d for i, d in enumerate(snap.dead_units) if d is not None}
    assert set(dead) == {"2", "4", "7"}
    for name in dead:
        assert dead[name].tolist() == (grads[name + ".weight"] == 0).all(dim=1).tolist(), name
    assert dead["2"][:40].all() and dead["4"][:24].all() and not dead["7"].any()
    # the update sample's chunks are tested on the embedding and on layer 4 (40 dead input columns)
    assert model[0].weight.numel() > 8192 and model[4].weight.numel() > 8192


@pytest.mark.parametrize("clip", [None, 0.5, "auto"])
def test_the_cpu_bookkeeping_deferred_gives_the_same_verdicts_and_state(clip):
    """``clip=None``, a fixed max norm and ``auto`` on quiet steps: the verdict at once, the rest of
    the step later (up to DEFER_MAX steps, or before the next step that needs it whole, or at the
    next read of the state), bit-identical to the step run at once: NaN steps, lone spikes (clipped
    by auto on their own step), an overflow right after a spike that latches auto on, a sustained
    excursion, reads and window resets."""
    import numpy as np

    from gradguard import stats
    from gradguard.ops import numpy_ops
    from gradguard.torch import _fused

    policy = gradguard.options.Options.of("GradGuard", {"clip": clip}).policy
    tracker = stats.TrackerConfig()
    ref = stats.init_state(7, policy, trace_size=256)
    step = _fused.NumpyStep(ref, policy, tracker)
    assert step._defer == ("quiet" if clip == "auto" else "always")
    rng = np.random.default_rng(1)
    has_t, verdicts, deferred = torch.ones(7), [], 0
    for i in range(400):
        sq = (rng.random(7) * (1e4 if i % 37 == 36 or 300 <= i < 306 else 1.0)).astype(np.float32)
        if i % 50 == 49:
            sq[2] = np.nan
        scale, finite, ref = stats.device_step(ref, sq, np.ones(7, np.float32), policy, numpy_ops, tracker)
        pending = len(step._pending)
        assert step(torch.from_numpy(sq.copy()), has_t) == (float(scale), float(finite)), i
        deferred += len(step._pending) > pending
        verdicts.append((float(scale), float(finite)))
        if i % 90 == 89 or i % 41 == 40:  # a read (a log step, peek) and, sometimes, a window reset
            host = step.host()
            assert all(np.array_equal(host[k], np.asarray(ref[k], np.float32), equal_nan=True) for k in ref), i
            if i % 90 == 89:
                step.write(stats.reset_window(7))
                ref = {**ref, **stats.reset_window(7)}
    assert sum(f == 0.0 for _, f in verdicts) == 8  # the NaN steps
    clipped = sum(s < 1.0 for s, _ in verdicts)
    assert clipped > 100 if clip == 0.5 else (clipped > 10 if clip == "auto" else clipped == 0)
    if clip == "auto":
        # quiet steps waited; the NaN right after the spike at step 147 latched clipping on: nothing since
        assert ref["clip_enabled"] == 1.0 and 100 < deferred < 150
    else:
        assert deferred == 400


@pytest.mark.parametrize("param_layer", [[0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6], [0] * 9],
                         ids=["seven layers", "one layer of nine"])
@pytest.mark.parametrize("skip_nonfinite", [True, False])
@pytest.mark.parametrize("clip", [None, 0.5, "auto"])
def test_the_cpu_bookkeeping_from_norms_read_as_floats_is_the_step_run_at_once(clip, skip_nonfinite, param_layer):
    """``NumpyStep.from_norms``: steps that wait with their per-parameter norms read as floats, made
    into layer sums later with the others, give the verdicts and the state of the step run at once on
    layer sums made by ``index_add_``, bit for bit: NaN steps, norms whose squares overflow float32,
    lone spikes, a sustained excursion, layers of several parameters (nine in one: numpy would sum
    them pairwise), a parameter without a gradient on some steps (two sets of gradients waiting in
    one batch), log steps (``now``), a finite update ceiling (``auto``), reads and window resets."""
    import numpy as np

    from gradguard import stats
    from gradguard.ops import numpy_ops
    from gradguard.torch import _fused

    policy = gradguard.options.Options.of("GradGuard", {"clip": clip}).policy
    tracker = stats.TrackerConfig()
    n_params, n_layers = len(param_layer), max(param_layer) + 1
    ref = stats.init_state(n_layers, policy, trace_size=256)
    if clip == "auto":
        ref["clip_ceiling"] = np.float32(30.0)  # spikes (norms ~100x) go over it, the other steps stay under
    step = _fused.NumpyStep(ref, policy, tracker)
    all_present = (_fused.ParamToLayer(param_layer, n_layers), torch.tensor(param_layer))
    one_missing = (_fused.ParamToLayer(param_layer[:-1], n_layers), torch.tensor(param_layer[:-1]))
    rng = np.random.default_rng(2)
    waited, expected_at_once = 0, set()
    for i in range(400):
        norms = (rng.random(n_params) * (1e2 if i % 37 == 36 or 300 <= i < 306 else 1.0)).astype(np.float32)
        if i % 50 == 49:
            norms[3] = np.nan
        if i % 70 == 69:
            norms[5] = 2e19  # finite, but its square is not in float32
        missing, now = i % 11 == 3, i % 23 == 0
        layers, index = one_missing if missing else all_present
        norms = norms[:-1] if missing else norms
        has_t = torch.zeros(n_layers).index_fill_(0, index, 1.0)
        sq_ref = torch.zeros(n_layers).index_add_(0, index, torch.from_numpy(norms).square()).numpy()
        scale, finite, ref = stats.device_step(ref, sq_ref, has_t.numpy(), policy, numpy_ops, tracker)
        got_scale, got_finite, sq = step.from_norms([torch.tensor(v) for v in norms], layers, has_t,
                                                    need_scale=policy.scales_global, need_finite=skip_nonfinite,
                                                    now=now)
        waited += sq is None
        if now or (skip_nonfinite and (i % 50 == 49 or i % 70 == 69)):
            expected_at_once.add(i)
        assert got_scale == float(scale) and (got_finite is None or got_finite == float(finite)), i
        assert got_finite is not None or not skip_nonfinite
        assert sq is not None or not now
        assert sq is None or np.array_equal(sq, sq_ref, equal_nan=True), i
        if i % 90 == 89 or i % 41 == 40:
            host = step.host()
            assert all(np.array_equal(host[k], np.asarray(ref[k], np.float32), equal_nan=True) for k in ref), i
            if i % 90 == 89:
                step.write(stats.reset_window(n_layers))
                ref = {**ref, **stats.reset_window(n_layers)}
    host = step.host()
    assert all(np.array_equal(host[k], np.asarray(ref[k], np.float32), equal_nan=True) for k in ref)
    if clip == 0.5:
        assert waited == 0  # a finite threshold needs the exact norm: read now, the rest waits
    elif clip is None:
        assert waited == 400 - len(expected_at_once)
    else:
        assert 50 < waited < 400 - len(expected_at_once)  # quiet steps until the latch closed
        assert float(ref["clip_enabled"]) == 1.0 and ref["acc_count"][0] > 0  # clipped at the ceiling


def test_the_cpu_sample_sums_are_index_add_s_bit_for_bit():
    """The weight/update sample's per-parameter sums on a CPU (``segment_reduce``) equal the sums
    ``index_add_`` gives, bit for bit, zero-size segments included (an FSDP rank's empty shard of a
    small parameter): they feed the weight norms and so the update ceiling, where a last-bit change
    moves a chaotic run (the demo's bad-init run did)."""
    from gradguard.torch import _snapshots

    lengths = torch.tensor([3, 0, 5, 0, 0, 2])
    values = torch.rand(int(lengths.sum()))
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    assert torch.equal(torch.segment_reduce(values, "sum", lengths=lengths),
                       torch.zeros(len(lengths)).index_add_(0, owner, values))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 4), nn.Linear(4, 3000), nn.Linear(3000, 2))
    guard = GradGuard(model, log_every_n_steps=1)
    model(torch.randn(8, 5)).sum().backward()
    guard.step(torch.optim.SGD(model.parameters(), lr=0.01))
    ex = _snapshots.extras(guard.engine._built)
    sizes = [f.numel() for f in ex.small_views]
    assert len(sizes) == 7 and len(ex.large_views) == 1
    values = torch.rand(ex.large_size + ex.small_size)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    expected = torch.zeros(len(sizes)).index_add_(0, owner, values[ex.large_size:])
    got = ex.per_param_sq(values)
    assert torch.equal(got[len(ex.large_views):], expected)
    assert torch.equal(got[0], values[:ex.large_size].sum())
