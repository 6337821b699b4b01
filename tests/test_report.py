"""The per-step trace, the HTML report (also in a real headless Chromium), the terminal summary and
the ``gradguard`` command, on logs written by real torch runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradguard import clipping, stats
from gradguard.ops import numpy_ops as xp

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from gradguard.report import PARTS, render, write_report  # noqa: E402
from gradguard.runlog import RunLogError, read_run  # noqa: E402
from gradguard.torch import GradGuard  # noqa: E402

from nets import digits, he, mlp  # noqa: E402

SPIKE_AT, NAN_AT, STEPS, EVERY = 33, 45, 60, 10


# ---------------------------------------------------------------------------------------------- the trace

def test_trace_keeps_every_step_of_the_window_under_numpy_ops():
    policy = clipping.auto()
    state = stats.init_state(3, policy, trace_size=8)
    norms = [1.0, 1.1, 0.9, 1.0, 50.0, 1.0, float("nan"), 1.2]
    has = np.ones(3, np.float32)
    for n in norms:
        state = stats.device_step(state, np.full(3, n * n / 3, np.float32), has, policy, xp)[2]
    w = stats.WindowStats.from_state(state, last_step=7)
    assert w.trace_first_step == 0 and w.trace.shape == (8, 4)
    np.testing.assert_allclose(w.trace[[0, 1, 2, 3, 4, 5, 7], stats.TRACE_NORM],
                               [1.0, 1.1, 0.9, 1.0, 50.0, 1.0, 1.2], rtol=1e-5)
    assert math.isnan(w.trace[6, stats.TRACE_NORM])
    flags = w.trace[:, stats.TRACE_FLAGS].astype(int)
    assert flags[4] & stats.FLAG_SPIKE and not flags[3] & stats.FLAG_SPIKE
    assert flags[6] == stats.FLAG_NONFINITE | stats.FLAG_EXPLOSION  # a NaN right after a spike confirms it
    # the threshold in force at each step: none, then the lone spike clipped on its own step, none again,
    # and (the NaN confirmed an explosion) on for good from the next finite step
    thr = w.trace[:, stats.TRACE_THRESHOLD]
    assert np.isfinite(thr).tolist() == [False] * 4 + [True, False, False, True]
    np.testing.assert_allclose(w.trace[4, stats.TRACE_SCALE],
                               w.trace[4, stats.TRACE_THRESHOLD] / 50.0, rtol=1e-4)
    assert bool(flags[4] & stats.FLAG_CLIPPED) == (w.trace[4, stats.TRACE_SCALE] < 1)

    # a new window: only its own steps are the window's; a window longer than the trace keeps its last steps
    state.update(stats.reset_window(3))
    for n in [2.0] * 11:
        state = stats.device_step(state, np.full(3, n * n / 3, np.float32), has, policy, xp)[2]
    w = stats.WindowStats.from_state(state, last_step=18)
    assert w.steps == 11 and w.trace.shape == (8, 4) and w.trace_first_step == 11
    np.testing.assert_allclose(w.trace[:, stats.TRACE_NORM], 2.0, rtol=1e-5)


def test_trace_can_be_turned_off_and_old_states_still_step():
    policy = clipping.auto()
    state = stats.init_state(2, policy, trace_size=0)
    assert "trace" not in state
    state = stats.device_step(state, np.ones(2, np.float32), np.ones(2, np.float32), policy, xp)[2]
    assert stats.WindowStats.from_state(state, 0).trace is None
    with pytest.raises(ValueError, match="trace_size"):
        stats.init_state(2, policy, trace_size=-1)


def spiky_run(path, clip="auto", seed=0):
    """A small ReLU net; at SPIKE_AT the loss is scaled 1e4 (a gradient spike between two log steps),
    at NAN_AT a NaN input (a skipped step). Returns the true global norm of every step."""
    torch.manual_seed(seed)
    model = mlp(2, nn.ReLU, width=32, init=he)
    x, y = digits(512)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = GradGuard(model, clip=clip, sinks=path, log_every_n_steps=EVERY)
    true = []
    for step in range(STEPS):
        idx = torch.randint(0, len(x), (32,))
        xb = x[idx].clone()
        if step == NAN_AT:
            xb[0, 0] = float("nan")
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), y[idx]) * (1e4 if step == SPIKE_AT else 1.0)
        loss.backward()
        true.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        guard.step(opt)
        guard.findings  # a pure look every step: the log must still hold each step exactly once
    guard.close()
    return true


def sigmoid_run(path):
    torch.manual_seed(0)
    model = mlp(8, nn.Sigmoid, width=32)
    x, y = digits(512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(model, sinks=path, log_every_n_steps=EVERY)
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        guard.step(opt)
    guard.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    true = spiky_run(d / "spiky.jsonl")
    sigmoid_run(d / "sigmoid")  # a directory: gradguard.jsonl inside it
    return {"dir": d, "spiky": d / "spiky.jsonl", "sigmoid": d / "sigmoid", "true": true}


def test_every_step_reaches_the_jsonl_log_through_the_real_torch_guard(runs):
    lines = [json.loads(l) for l in runs["spiky"].read_text().splitlines()]
    records = [l for l in lines if l["type"] == "step"]
    assert [r["step"] for r in records] == [9, 19, 29, 39, 49, 59]
    steps = [s for r in records for s in r["per_step"]["step"]]
    assert steps == list(range(STEPS))  # every optimizer step exactly once (step 0, judged not logged, too)
    for r in records:
        ps = r["per_step"]
        assert set(ps) == {"step", "global_norm", "clip_threshold", "scale", "nonfinite", "skipped", "clipped",
                           "spike", "explosion", "loss_scale_skipped"}
        assert all(len(v) == len(ps["step"]) for v in ps.values())
        assert r["layer_numel"] == [64 * 32 + 32, 32 * 32 + 32, 32 * 10 + 10]
    col = {k: [v for r in records for v in r["per_step"][k]] for k in records[0]["per_step"]}
    true = runs["true"]
    for s in range(STEPS):
        if s == NAN_AT:
            assert col["global_norm"][s] is None and col["skipped"][s] == 1 and col["nonfinite"][s] == 1
        else:
            assert col["global_norm"][s] == pytest.approx(true[s], rel=1e-4)
    # the spike between two log steps is at its own step, and switched clipping on
    assert col["spike"][SPIKE_AT] == 1 and sum(col["spike"]) <= 2
    assert col["clip_threshold"][SPIKE_AT - 1] is None and col["clip_threshold"][SPIKE_AT] is not None
    assert col["clipped"][SPIKE_AT] == 1 and col["scale"][SPIKE_AT] < 1e-2
    assert sum(col["skipped"]) == 1


# ---------------------------------------------------------------------------------------------- reading and HTML

def test_read_run_assembles_the_timeline(runs):
    run = read_run(runs["spiky"])
    assert run.name == "spiky" and run.per_step and run.step.tolist() == list(range(STEPS))
    assert run.clip_enabled_step == SPIKE_AT and run.spike[SPIKE_AT] and run.skipped[NAN_AT]
    assert run.layer_rms is not None and run.layer_rms.shape == (6, 3)
    sig = read_run(runs["sigmoid"])  # the directory given as sinks=
    assert sig.name == "sigmoid" and [f["kind"] for f in sig.findings] == ["vanishing"]


def test_report_has_every_part_for_every_run(runs, tmp_path):
    out = write_report([runs["sigmoid"], runs["spiky"]], tmp_path / "r.html")
    page = Path(out).read_text()
    for part in PARTS:
        assert page.count(f"data-part='{part}'") == 1, part
    assert page.count('data-part="timeline"') == 2 and page.count('data-part="heatmap"') == 2
    assert page.count('data-part="profile"') == 2
    assert page.count('data-part="evidence"') == len(read_run(runs["sigmoid"]).findings) + len(
        read_run(runs["spiky"]).findings)
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "class=\"colorbar\"" in page
    # marks at their own steps, values on hover, sane tick labels
    assert f"step {SPIKE_AT}: spike" in page and f"step {SPIKE_AT}: clipping switched on" in page
    assert f"step {NAN_AT}: non-finite gradients, skipped" in page
    assert "vanishing established" in page
    assert re.search(r"<title>0, step 9: gradient RMS [0-9.e+-]+</title>", page)
    labels = re.findall(r"<text[^>]*>([^<]*)", page)  # every label drawn in a chart
    assert labels and not [t for t in labels if re.search(r"e[+-]?0|e-?\d+\.\d", t)], labels
    # the vanishing finding's evidence is a depth profile spanning orders of magnitude
    assert "Replace sigmoid/tanh" in page


def test_single_run_keeps_the_old_entry_point(runs, tmp_path):
    src = tmp_path / "one.jsonl"
    shutil.copy(runs["spiky"], src)
    assert write_report(src) == str(tmp_path / "one.html")
    assert "data-part=\"timeline\"" in (tmp_path / "one.html").read_text()


def test_old_logs_without_a_trace_still_render(runs, tmp_path):
    old = tmp_path / "old.jsonl"
    with open(old, "w") as f:
        for line in runs["spiky"].read_text().splitlines():
            obj = json.loads(line)
            obj.pop("per_step", None)
            obj.pop("layer_numel", None)
            f.write(json.dumps(obj) + "\n")
    run = read_run(old)
    assert not run.per_step and run.step.tolist() == [9, 19, 29, 39, 49, 59]
    assert "no per-step trace" in render([run])


# ---------------------------------------------------------------------------------------------- bad input

def bad_inputs(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "binary.jsonl").write_bytes(b'{"type": "step"}\n\xff\xfe\x00garbage\n')
    (tmp_path / "foreign.jsonl").write_text('{"event": "epoch", "loss": 0.3}\n{"event": "epoch", "loss": 0.2}\n')
    (tmp_path / "notjson.jsonl").write_text('{"type": "step"\nhello\n{}\n')
    (tmp_path / "adir").mkdir()
    return {
        "empty": (tmp_path / "empty.jsonl", "is empty; the run stopped before its first log step"),
        "missing": (tmp_path / "nope.jsonl", "no such file"),
        "directory": (tmp_path / "adir", "is a directory without a gradguard.jsonl"),
        "non-utf8": (tmp_path / "binary.jsonl", "not UTF-8 text"),
        "foreign": (tmp_path / "foreign.jsonl", "line 1 is not a gradguard record"),
        "not json": (tmp_path / "notjson.jsonl", "line 1 is not JSON"),
    }


@pytest.mark.parametrize("command", ["report", "summary"])
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(runs, tmp_path, capsys, command):
    from gradguard.cli import main

    for case, (path, message) in bad_inputs(tmp_path, runs["spiky"]).items():
        rc = main([command, str(path)] + (["-o", str(tmp_path / "x.html")] if command == "report" else []))
        out, err = capsys.readouterr()
        assert rc == 2, case
        assert err.count("\n") == 1 and err.startswith("gradguard: error: ") and message in err, (case, err)
        assert str(path) in err and "Traceback" not in err and out == "", case
    assert not (tmp_path / "x.html").exists()


def test_truncated_last_line_is_skipped_with_a_warning_and_the_rest_rendered(runs, tmp_path):
    data = runs["spiky"].read_text()
    cut = tmp_path / "killed.jsonl"
    cut.write_text(data[: len(data) - 40])  # killed mid-write of its last record
    out = subprocess.run([sys.executable, "-m", "gradguard.report", str(cut), "-o", str(tmp_path / "k.html")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("\n") == 1 and "is truncated" in out.stderr and "skipped it" in out.stderr
    page = (tmp_path / "k.html").read_text()
    assert "is truncated" in page and 'data-part="timeline"' in page
    assert read_run(cut).log_steps.tolist() == [9, 19, 29, 39, 49]
    # a broken line that is not the last one is an error, not a skip
    broken = tmp_path / "broken.jsonl"
    lines = data.splitlines()
    broken.write_text("\n".join(lines[:2] + [lines[2][:30]] + lines[3:]) + "\n")
    with pytest.raises(RunLogError, match="line 3 is not JSON"):
        read_run(broken)


# ---------------------------------------------------------------------------------------------- summary, CLI

def test_summary_prints_findings_remedies_and_a_timeline(runs):
    out = subprocess.run([sys.executable, "-m", "gradguard.cli", "summary", str(runs["sigmoid"]),
                          str(runs["spiky"]), "--width", "60"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "== sigmoid" in text and "== spiky" in text
    assert re.search(r"(WARNING|CRITICAL) vanishing at step \d+", text) and "- Replace sigmoid/tanh" in text
    lines = text.splitlines()
    spark = [l for l in lines if set(l.strip()) & set("▁▂▃▄▅▆▇█")][-1]  # the spiky run's
    marks = lines[lines.index(spark) + 1]
    assert len(spark.strip()) == 60  # 60 bins of one step each
    col = 3 + SPIKE_AT  # indent + one step per column
    assert spark[col] == "█"  # the spike is the tallest bar, at its own step
    assert marks[col] in "^|!"  # a finding was established there, clipping switched on, a spike
    assert marks[3 + NAN_AT] in "^X"  # the nonfinite finding at the skipped step
    assert marks.count("X") + marks.count("^") + marks.count("!") + marks.count("|") + marks.count("c") == len(
        marks.strip().replace(" ", ""))


def test_console_script_and_module_entry_points(runs, tmp_path):
    exe = shutil.which("gradguard", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the gradguard console script is not installed in this environment")
    out = subprocess.run([exe, "report", str(runs["sigmoid"]), str(runs["spiky"]), "-o", str(tmp_path / "c.html"),
                          "--name", "broken", "--name", "fix"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "c.html"), out.stderr
    assert "data-run='broken'" in (tmp_path / "c.html").read_text()


# ---------------------------------------------------------------------------------------------- real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Injected into a copy of the page for the test only (the report itself has no script): collects script
# errors, then checks that each part is laid out with a real size, per run.
_ERRORS = "<script>window.__errors=[];addEventListener('error',e=>__errors.push(String(e.message)));</script>"
_CHECK = """<script>
addEventListener('load', () => {
  const out = {errors: window.__errors, parts: {}, runs: document.querySelectorAll("[data-part='header'] .panel").length};
  for (const part of %s) {
    const row = document.querySelector(`[data-part='${part}']`);
    out.parts[part] = row ? [...row.querySelectorAll('.panel')].map(p => {
      const el = part === 'findings' ? p : p.querySelector('svg.chart');
      if (!el) return 0;
      const r = el.getBoundingClientRect();
      return Math.round(r.width) * (r.height > 20 ? 1 : 0);
    }) : [];
  }
  out.evidence = [...document.querySelectorAll("svg[data-part='evidence']")].filter(
      s => s.getBoundingClientRect().height > 50).length;
  out.colorbars = document.querySelectorAll('g.colorbar').length;
  out.titles = document.querySelectorAll('svg title').length;
  document.body.setAttribute('data-check', JSON.stringify(out));
});
</script>"""


def chromium(args, tmp_path, timeout=120):
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def browser_check(page: Path, tmp_path: Path) -> dict:
    html = page.read_text()
    probe = tmp_path / ("probe-" + page.name)
    probe.write_text(html.replace("<head>", "<head>" + _ERRORS, 1)
                     .replace("</body>", _CHECK % json.dumps(list(PARTS)) + "</body>", 1))
    out = chromium(["--window-size=1280,2000", "--dump-dom", probe.as_uri()], tmp_path)
    m = re.search(r"data-check=\"([^\"]*)\"", out.stdout)
    assert m, f"the page did not finish loading in Chromium: {out.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def check_is_complete(check: dict, n_runs: int) -> list[str]:
    """What is missing from a browser check (empty when the page shows every part for every run)."""
    missing = [f"script error: {e}" for e in check["errors"]]
    if check["runs"] != n_runs:
        missing.append(f"{check['runs']} run headers instead of {n_runs}")
    for part in PARTS:
        sizes = check["parts"].get(part, [])
        if len(sizes) != n_runs or min(sizes, default=0) < 200:
            missing.append(f"{part}: {sizes}")
    if check["colorbars"] != n_runs:
        missing.append(f"{check['colorbars']} colour bars")
    return missing


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    page = Path(write_report([runs["sigmoid"], runs["spiky"]], tmp_path / "report.html"))
    check = browser_check(page, tmp_path)
    assert check_is_complete(check, 2) == []
    n_findings = len(read_run(runs["sigmoid"]).findings) + len(read_run(runs["spiky"]).findings)
    assert check["evidence"] == n_findings and check["titles"] > 250  # values on hover

    # the check fails when a part is missing: the same page without its heatmaps
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'<svg [^>]*data-part="heatmap".*?</svg>', "", page.read_text(), flags=re.S))
    assert any(m.startswith("heatmap") for m in check_is_complete(browser_check(broken, tmp_path), 2))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_screenshot_shows_heatmap_and_timeline(runs, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    page = Path(write_report([runs["sigmoid"], runs["spiky"]], tmp_path / "report.html"))

    def shot(p: Path) -> np.ndarray:
        png = tmp_path / (p.stem + ".png")
        chromium(["--window-size=1280,3200", f"--screenshot={png}", p.as_uri()], tmp_path)
        assert png.exists() and png.stat().st_size > 10_000
        return np.asarray(PIL.open(png).convert("RGB")).astype(int)

    def share(img, colour, tol=12):
        return float((np.abs(img - np.array(colour)).max(axis=2) <= tol).mean())

    img = shot(page)
    heat_dark, heat_yellow, line_blue = (68, 1, 84), (253, 231, 37), (31, 119, 180)
    assert share(img, heat_dark) > 1e-3  # the heatmap's collapsed (dark) rows
    assert share(img, heat_yellow) > 1e-4  # and its bright end / colour bar top
    assert share(img, line_blue, tol=30) > 1e-4  # the timeline and profile lines

    no_heat = tmp_path / "noheat.html"
    no_heat.write_text(re.sub(r'<svg [^>]*data-part="heatmap".*?</svg>', "", page.read_text(), flags=re.S))
    assert share(shot(no_heat), heat_yellow) < share(img, heat_yellow) / 3


# ---------------------------------------------------------------------------------------------- the JSON-lines sink

def test_sinks_path_is_checked_in_the_constructor(tmp_path):
    (tmp_path / "afile").write_text("x")
    model = mlp(1, nn.ReLU, width=8)
    with pytest.raises(ValueError, match=r"sinks='' is not a path"):
        GradGuard(model, sinks="")
    with pytest.raises(ValueError, match=r"sinks='.*afile/run.jsonl': cannot write the gradguard log there"):
        GradGuard(model, sinks=str(tmp_path / "afile" / "run.jsonl"))
    with pytest.raises(ValueError, match=r"sinks=.*cannot write"):
        GradGuard(model, sinks=[tmp_path / "ok", tmp_path / "afile" / "sub"])
    (tmp_path / "adir.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"sinks=.*adir.jsonl"):
        GradGuard(model, sinks=tmp_path / "adir.jsonl")


def _train_with_hook(sinks, hook_at, hook, steps=40, every=10):
    torch.manual_seed(0)
    model = mlp(2, nn.ReLU, width=16, init=he)
    x, y = digits(256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = GradGuard(model, sinks=sinks, log_every_n_steps=every)
    with pytest.warns(RuntimeWarning) as caught:
        for step in range(steps):
            if step == hook_at:
                hook()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
            guard.step(opt)
        guard.close()
    return [w for w in caught if "gradguard" in str(w.message)]


def test_log_directory_deleted_mid_run_is_said_once_and_the_log_written_again(tmp_path):
    run_dir = tmp_path / "run"
    said = _train_with_hook(run_dir, 15, lambda: shutil.rmtree(run_dir))
    assert len(said) == 1 and "deleted or replaced" in str(said[0].message)
    assert str(run_dir / "gradguard.jsonl") in str(said[0].message)
    run = read_run(run_dir)
    assert run.log_steps.tolist() == [9, 19, 29, 39] and run.step.tolist() == list(range(40))  # nothing lost


def test_log_directory_replaced_mid_run_leaves_the_new_file_alone(tmp_path):
    run_dir = tmp_path / "run"

    def replace():
        run_dir.rename(tmp_path / "moved")
        run_dir.mkdir()
        (run_dir / "gradguard.jsonl").write_text("someone else's\n")

    said = _train_with_hook(run_dir, 25, replace)
    assert len(said) == 1 and "gradguard.recovered-1.jsonl" in str(said[0].message)
    assert (run_dir / "gradguard.jsonl").read_text() == "someone else's\n"
    assert read_run(run_dir / "gradguard.recovered-1.jsonl").log_steps.tolist() == [9, 19, 29, 39]


def test_depth_profile_at_chosen_steps(runs, tmp_path):
    from gradguard.cli import main

    assert main(["report", str(runs["sigmoid"]), "-o", str(tmp_path / "p.html"), "--profile-steps", "15,59"]) == 0
    page = (tmp_path / "p.html").read_text()
    profile = re.search(r'<svg [^>]*data-part="profile".*?</svg>', page, flags=re.S).group(0)
    assert re.findall(r"— step (\d+)", profile) == ["19", "59"]  # the log step at or after each one asked for
