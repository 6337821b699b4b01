"""gradguard.wandb with real wandb in offline mode, driven from plain PyTorch; what was logged is read
back from the run's .wandb transaction log (tests/wandb_offline.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

wandb = pytest.importorskip("wandb")

from gradguard import Finding  # noqa: E402
from gradguard.sinks import LogRecord  # noqa: E402
from gradguard.torch import GradGuard  # noqa: E402
from gradguard.wandb import WandbSink  # noqa: E402
from wandb_offline import read_run  # noqa: E402

LOG_EVERY = 5


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Every file wandb writes goes under tmp_path; no network."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
           "WANDB_DATA_DIR": tmp_path / "data", "WANDB_ARTIFACT_DIR": tmp_path / "artifacts"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    yield tmp_path
    if wandb.run is not None:  # a failed test must not leave its run active for the next one
        wandb.finish()


def start_run(path):
    return wandb.init(mode="offline", dir=path, project="gradguard-tests",
                      settings=wandb.Settings(x_disable_stats=True, console="off", disable_git=True, save_code=False))


def sigmoid_mlp(depth=10, width=16):
    """Deep sigmoid MLP: its early layers' gradients collapse (a vanishing finding within ~10 steps)."""
    torch.manual_seed(0)
    layers = [nn.Linear(8, width), nn.Sigmoid()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def gradguard_warnings(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and "WandbSink" in str(w.message)]


def test_scalars_histograms_heatmap_alert_and_summary_reach_the_run(wandb_dir):
    model = sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    run = start_run(wandb_dir)
    run_dir = run.settings.sync_dir
    guard = GradGuard(model, clip=1e6, log_every_n_steps=LOG_EVERY, sinks=[WandbSink(heatmap_every=2)])
    first = model[0]
    expected_global, expected_first, losses, every_step = [], [], [], []
    steps = 25
    for i in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        every_step.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        if (i + 1) % LOG_EVERY == 0:  # what the log step must report, measured independently
            expected_global.append(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])).item())
            expected_first.append(torch.linalg.vector_norm(
                torch.stack([first.weight.grad.norm(), first.bias.grad.norm()])).item())
        guard.step(opt)
        run.log({"loss": loss.item()}, step=i)  # the user's own step counter, explicit step=
        losses.append(loss.item())
    findings = guard.findings
    guard.close()
    run.finish()

    assert [f.kind for f in findings] == ["vanishing"]
    logged = read_run(run_dir)

    # the user's rows are all there: gradguard's rows did not push the run's step past the user's
    assert logged.values("loss") == pytest.approx(losses)

    # scalars, one row per log step, against gradguard/step
    rows = logged.rows_with("grad/norm/global")
    assert [r["gradguard/step"] for r in rows] == [4, 9, 14, 19, 24]
    assert [r["grad/norm/global"] for r in rows] == pytest.approx(expected_global, rel=1e-5)
    assert [r["grad/norm/0"] for r in rows] == pytest.approx(expected_first, rel=1e-5)
    for r in rows:
        assert r["gradguard/clip_threshold"] == pytest.approx(1e6)
        assert r["gradguard/skipped_steps"] == 0
        assert 0 < r["grad/depth_ratio"] < 1e-3  # the collapsed first layer
    assert rows[-1]["gradguard/findings"] == 1

    # a histogram of every layer's gradient values on every log step
    hist = rows[-1]["grad/hist/0"]
    assert hist["_type"] == "histogram"
    assert sum(hist["values"]) == first.weight.numel() + first.bias.numel()
    assert len(hist["bins"]) == len(hist["values"]) + 1
    assert all(f"grad/hist/{name}" in rows[0] for name in ("0", "2", "22"))

    # the heatmap: every 2nd log step and once more at close (step 24 was not drawn yet)
    images = logged.rows_with("gradguard/gradient_flow")
    assert [r["gradguard/step"] for r in images] == [9, 19, 24]
    for r in images:
        image = r["gradguard/gradient_flow"]
        assert image["_type"] == "image-file"
        png = logged.media_path(image)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert image["width"] > 100 and image["height"] > 100

    # the global norm of every optimizer step, as a table (and line chart) refreshed with the heatmap,
    # not as a row per step
    tables = logged.rows_with("gradguard/global_norm_per_step_table")
    assert [r["gradguard/step"] for r in tables] == [9, 19, 24]
    table = json.loads(logged.media_path(tables[-1]["gradguard/global_norm_per_step_table"]).read_text())
    assert table["columns"] == ["step", "global_norm", "clip_threshold", "event"]
    assert [row[0] for row in table["data"]] == list(range(steps))
    assert [row[1] for row in table["data"]] == pytest.approx(every_step, rel=1e-5)
    assert all(row[2] == pytest.approx(1e6) and row[3] == "" for row in table["data"])
    assert len(logged.rows_with("gradguard/step")) == 5 + 1  # a row per log step and one at close; none per step

    # x-axis declared for every gradguard key
    metrics = {m.get("name") or m.get("glob_name"): m.get("step_metric") for m in logged.metrics}
    assert metrics["gradguard/step"] is None
    assert metrics["grad/*"] == metrics["gradguard/*"] == "gradguard/step"

    # one alert, although the finding was updated on every later log step
    assert len(logged.alerts) == 1
    alert = logged.alerts[0]
    assert alert["title"] == "gradguard: vanishing gradients"
    assert "vanishing at step" in alert["text"] and "Likely cause: saturating sigmoid" in alert["text"]
    remedies = "\n".join(f"{i}. {r}" for i, r in enumerate(findings[0].remedies[:5], 1))
    assert "Remedies for this finding:\n" + remedies in alert["text"]  # the finding, linked to what to do
    assert "gradguard/finding/vanishing" in alert["text"]
    assert alert["level"] == ("ERROR" if alert["text"].startswith("CRITICAL") else "WARN")

    # the finding, in its latest form, in the summary
    summary = logged.summary["gradguard/finding/vanishing"]
    f = findings[0]
    assert (summary["step"], summary["severity"], summary["message"]) == (f.step, f.severity, f.message)
    assert summary["layers"] == list(f.layers) and summary["layers"][0] == "0"
    assert summary["remedies"] == list(f.remedies)
    assert logged.summary["gradguard/findings"] == 1
    assert logged.exit_code == 0


def test_alerts_are_rate_limited_per_kind_and_escalate_by_severity(wandb_dir):
    run = start_run(wandb_dir)
    run_dir = run.settings.sync_dir
    exploding = Finding("exploding", 3, ("fc",), "warning", "Gradients grow.", ("Clip gradients.",),
                        evidence={"growth": float("inf"), "z": 7.5})
    slow = WandbSink(run, alert_interval=3600)
    slow.finding(exploding, True)  # alert
    slow.finding(exploding, False)  # same kind, same severity: no alert
    slow.finding(dataclasses.replace(exploding, severity="critical"), False)  # escalated, but within the interval
    slow.finding(Finding("dead", 5, ("fc",), "warning", "Units are dead.", ()), True)  # another kind: alert
    nonfinite = Finding("nonfinite", 7, ("fc",), "warning", "NaN in the gradients.", ())
    fast = WandbSink(run, alert_interval=0)
    fast.finding(nonfinite, True)  # alert
    fast.finding(nonfinite, False)  # no alert: nothing new
    fast.finding(dataclasses.replace(nonfinite, severity="critical"), False)  # escalated: alert
    fast.finding(dataclasses.replace(nonfinite, severity="critical"), False)  # no alert
    run.finish()

    logged = read_run(run_dir)
    assert [(a["title"], a["level"]) for a in logged.alerts] == [
        ("gradguard: exploding gradients", "WARN"), ("gradguard: dead gradients", "WARN"),
        ("gradguard: nonfinite gradients", "WARN"), ("gradguard: nonfinite gradients", "ERROR")]
    assert logged.alerts[0]["wait_duration_ms"] == 3600 * 1000
    # the summary follows every update, alerted or not; non-finite evidence becomes null
    assert logged.summary["gradguard/finding/exploding"]["severity"] == "critical"
    assert logged.summary["gradguard/finding/exploding"]["evidence"] == {"growth": None, "z": 7.5}
    assert logged.summary["gradguard/finding/nonfinite"]["severity"] == "critical"
    assert logged.summary["gradguard/finding/dead"]["message"] == "Units are dead."


def test_sink_built_before_wandb_init_attaches_to_the_run_and_to_the_next_one(wandb_dir):
    """No run yet is not a failure (nothing said, the sink's one warning is kept for real failures);
    the sink attaches when the run appears, says once that records are lost while no run is active,
    and a second ``wandb.init()`` run gets the data too."""
    assert wandb.run is None
    model = sigmoid_mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    guard = GradGuard(model, clip=None, log_every_n_steps=2, sinks=[WandbSink(scalars=False, heatmap_every=0)])

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            guard.step(opt)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(4)  # log steps 1 and 3: no run yet
        assert gradguard_warnings(caught) == []
        run = start_run(wandb_dir)
        run_dir = run.settings.sync_dir
        train(4)  # log steps 5 and 7 reach the run
        run.finish()
        train(2)  # log step 9: the run is gone while training goes on
        gone = gradguard_warnings(caught)
        second = start_run(wandb_dir)
        second_dir = second.settings.sync_dir
        train(4)  # log steps 11 and 13 reach the second run
        guard.close()
        second.finish()
    assert len(gone) == 1 and "finished while training goes on" in str(gone[0].message)
    assert len(gradguard_warnings(caught)) == 1  # said once, nothing more

    for path, expected in ((run_dir, [5, 7]), (second_dir, [11, 13])):
        logged = read_run(path)
        rows = logged.rows_with("gradguard/step")
        assert [r["gradguard/step"] for r in rows] == expected
        assert all("grad/hist/0" in r for r in rows)
        assert not any(key.startswith("grad/norm") for r in logged.history for key in r)  # scalars=False
        assert not logged.rows_with("gradguard/gradient_flow")  # heatmap_every=0
        metrics = {m.get("name") or m.get("glob_name"): m.get("step_metric") for m in logged.metrics}
        assert metrics == {"gradguard/step": None, "grad/hist/*": "gradguard/step",
                           "gradguard/gradient_flow": "gradguard/step",
                           "gradguard/global_norm_per_step*": "gradguard/step"}


def test_findings_made_before_the_run_reach_its_summary(wandb_dir):
    sink = WandbSink(heatmap_every=0)
    f = Finding("exploding", 3, ("fc",), "critical", "Gradients grow.", ("Clip gradients.",), cause="lr too high")
    sink.finding(f, True)  # no run yet: kept
    run = start_run(wandb_dir)
    run_dir = run.settings.sync_dir
    sink.log(LogRecord(5, {"grad/norm/global": 1.0}, ("fc",), np.ones(1), np.ones(1)))
    sink.close()
    run.finish()
    logged = read_run(run_dir)
    assert logged.summary["gradguard/finding/exploding"]["message"] == "Gradients grow."
    assert len(logged.alerts) == 1 and logged.alerts[0]["level"] == "ERROR"
    assert "Likely cause: lr too high." in logged.alerts[0]["text"]
    assert "Remedies for this finding:\n1. Clip gradients." in logged.alerts[0]["text"]


def test_run_finished_mid_training_warns_once_and_training_goes_on(wandb_dir):
    model = sigmoid_mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    run = start_run(wandb_dir)
    run_dir = run.settings.sync_dir
    guard = GradGuard(model, clip="auto", log_every_n_steps=2, sinks=[WandbSink(heatmap_every=1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(10):
            if i == 4:
                run.finish()  # W&B goes away under the guard's feet
                weights_at_finish = model[0].weight.detach().clone()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            assert guard.step(opt)
        guard.close()  # the run is finished: close adds nothing and says nothing
    sink_warnings = gradguard_warnings(caught)
    assert len(sink_warnings) == 1, [str(w.message) for w in sink_warnings]
    assert "finished while training goes on" in str(sink_warnings[0].message)
    assert guard.engine.step_count == 10
    assert not torch.equal(model[0].weight, weights_at_finish)  # training went on
    assert guard.engine.monitor.totals["steps"] == 10  # and so did the monitor
    assert [r["gradguard/step"] for r in read_run(run_dir).rows_with("grad/norm/global")] == [1, 3]


def test_close_after_the_user_finished_the_run_is_silent(wandb_dir):
    """``with wandb.init(): train`` then ``guard.close()``: the undrawn heatmap is dropped, no warning."""
    model = sigmoid_mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    guard = GradGuard(model, clip=None, log_every_n_steps=2, sinks=[WandbSink(heatmap_every=100)])
    with start_run(wandb_dir) as run:
        run_dir = run.settings.sync_dir
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            guard.step(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard.close()
    assert gradguard_warnings(caught) == []
    logged = read_run(run_dir)
    assert [r["gradguard/step"] for r in logged.rows_with("grad/norm/global")] == [1, 3]
    assert not logged.rows_with("gradguard/gradient_flow")


_KILL_CORE = textwrap.dedent("""
    import json, os, signal, sys, warnings
    import torch
    from torch import nn
    import wandb
    from gradguard.torch import GradGuard
    from gradguard.wandb import WandbSink

    def wandb_core_pids():  # the W&B service this process started
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                except OSError:
                    continue
                name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
                if int(rest[1]) == os.getpid() and "wandb-core" in name:
                    pids.append(int(entry))
        return pids

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    run = wandb.init(mode="offline", dir=sys.argv[1], settings=wandb.Settings(x_disable_stats=True, console="off"))
    guard = GradGuard(model, log_every_n_steps=2, sinks=[WandbSink(heatmap_every=1)])
    pids = wandb_core_pids()
    out = {"core_pids": len(pids)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(12):
            if i == 4:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                before = model[0].weight.detach().clone()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            guard.step(opt)
        guard.close()
    out["warnings"] = [str(w.message) for w in caught if "WandbSink" in str(w.message)]
    out["steps"] = guard.engine.step_count
    out["trained_on"] = not torch.equal(model[0].weight, before)
    out["finite"] = bool(torch.isfinite(model[0].weight).all())
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # wandb's own exit hook would only complain that its service is gone
""")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the wandb-core process through /proc")
def test_wandb_service_dying_mid_run_warns_once_and_training_goes_on(wandb_dir):
    # WANDB_SERVICE would connect the child to this process's own service: the child must start its own
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    proc = subprocess.run([sys.executable, "-c", _KILL_CORE, str(wandb_dir)], capture_output=True, text=True,
                          timeout=120, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, proc.stdout + proc.stderr
    out = json.loads(line[len("RESULT "):])
    assert out["core_pids"] == 1
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "Connection" in out["warnings"][0]  # e.g. ConnectionResetError('Connection lost')
    assert out["steps"] == 12 and out["trained_on"] and out["finite"]


def test_import_without_wandb_names_the_extra_and_import_stays_light():
    hidden = ("import sys; sys.modules['wandb'] = None\n"
              "try:\n    import gradguard.wandb\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, timeout=60)
    assert 'ImportError: gradguard.wandb needs Weights & Biases: pip install "gradguard[wandb]"' in out.stdout, \
        out.stdout + out.stderr
    light = ("import sys, gradguard.wandb\n"
             "print(sorted(m for m in ('torch', 'matplotlib', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="heatmap_every"):
        WandbSink(heatmap_every=-1)
    with pytest.raises(ValueError, match="alert_interval"):
        WandbSink(alert_interval="soon")
    with pytest.raises(TypeError, match="scalars"):
        WandbSink(scalars="yes")
    with pytest.raises(ValueError, match="max_heatmap_columns"):
        WandbSink(max_heatmap_columns=1)


def test_heatmap_keeps_evenly_spaced_columns_when_full():
    sink = WandbSink(max_heatmap_columns=4)
    names = ("a", "b")
    for step in range(10):
        sink._add_column(LogRecord(step, {}, names, np.ones(2), np.array([10.0 ** -step, 0.0])))
    heat = sink._heat
    assert heat.steps == [0, 4, 8]  # stride doubled twice, columns stay evenly spaced
    assert len(heat.columns) <= 4
    assert heat.columns[1][0] == pytest.approx(-4.0) and np.isnan(heat.columns[1][1])  # log10; 0 -> no value
