"""The framework-free core: policies, per-step statistics, detectors, monitor, sinks (numpy only)."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

import gradguard
from gradguard import clipping, stats
from gradguard.ops import numpy_ops as xp


def test_import_gradguard_imports_no_framework():
    code = ("import sys, gradguard, gradguard.report\n"
            "bad = [m for m in ('torch', 'keras', 'tensorflow', 'jax', 'wandb', 'lightning', 'pytorch_lightning')"
            " if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def run_steps(norms, policy, layers=3, tracker=stats.TrackerConfig()):
    """Feed a sequence of global norms (spread evenly over ``layers``) through device_step."""
    state = stats.init_state(layers, policy)
    scales = []
    has = np.ones(layers, np.float32)
    for n in norms:
        layer_sq = np.full(layers, n * n / layers, np.float32)
        scale, finite, state = stats.device_step(state, layer_sq, has, policy, xp, tracker)
        scales.append(float(scale))
    return np.array(scales), state


def zclip_reference(norms, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6):
    """ZClip's published algorithm (zscore mode, adaptive scaling), step by step in plain Python."""
    buf, mean, var, out = [], None, None, []
    for g in norms:
        if mean is None:
            buf.append(g)
            if len(buf) >= warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            out.append(math.inf)
            continue
        std = var ** 0.5
        z = (g - mean) / (std + eps)
        thr = mean + z_thresh * std / (z / z_thresh) if z > z_thresh else math.inf
        seen = min(g, thr)
        mean = alpha * mean + (1 - alpha) * seen
        var = alpha * var + (1 - alpha) * (seen - mean) ** 2
        out.append(thr)
    return out


def test_zscore_policy_matches_zclip_reference():
    rng = np.random.default_rng(0)
    norms = list(np.abs(rng.normal(5.0, 1.0, 200)))
    norms[60] = norms[120] = 80.0  # spikes
    scales, _ = run_steps(norms, clipping.zscore())
    ref = zclip_reference(norms)
    expected = [min(1.0, t / (g + 1e-6)) if math.isfinite(t) else 1.0 for g, t in zip(norms, ref)]
    np.testing.assert_allclose(scales, expected, rtol=2e-4)
    assert scales[60] < 0.2 and scales[120] < 0.2
    assert (scales[:25] == 1.0).all()  # warm-up never clips


def test_auto_policy_is_off_while_healthy_and_latches_on_a_spike():
    rng = np.random.default_rng(1)
    healthy = list(np.exp(rng.normal(np.log(3.0), 0.3, 300)))
    scales, state = run_steps(healthy, clipping.auto())
    assert (scales == 1.0).all() and float(state["clip_enabled"]) == 0.0
    assert stats.WindowStats.from_state(state, 0).spikes == 0

    exploding = healthy[:100] + [3.0 * 4 ** k for k in range(1, 8)] + healthy[:50]
    scales, state = run_steps(exploding, clipping.auto())
    assert float(state["clip_enabled"]) == 1.0
    # Step 100 (4x the level) is within normal variation; step 101 (16x) is the spike that
    # switches clipping on, for itself and every step after: the explosion never gets through.
    assert int(np.flatnonzero(scales < 1)[0]) == 101
    clipped_norms = np.array(exploding) * scales
    assert clipped_norms[101:107].max() < 10.0


def test_healthy_growth_is_not_a_spike():
    # The norm rising 20x over 80 steps (a net leaving its loss plateau) is learning, not explosion.
    norms = list(0.2 * np.exp(np.linspace(0, np.log(20), 80)) * np.exp(np.random.default_rng(2).normal(0, 0.3, 80)))
    _, state = run_steps(norms, clipping.auto())
    assert stats.WindowStats.from_state(state, 0).spikes == 0


def test_fixed_policy_and_nonfinite_step():
    scales, state = run_steps([1.0, 10.0, float("nan"), 2.0], clipping.fixed(2.0))
    assert scales[0] == 1.0 and scales[1] == pytest.approx(0.2, rel=1e-5) and scales[3] == 1.0
    window = stats.WindowStats.from_state(state, last_step=3)
    assert window.nonfinite_steps == 1 and window.first_nonfinite_step == 2
    assert window.clipped_steps == 1
    assert window.global_norm_max == pytest.approx(10.0, rel=1e-5)
    assert window.global_norm_mean == pytest.approx(13.0 / 3, rel=1e-5)


def test_window_catches_a_spike_between_log_steps():
    norms = [1.0] * 36 + [500.0] + [1.0] * 13  # a spike at step 36 of a 50-step window
    _, state = run_steps(norms, clipping.no_clipping())
    w = stats.WindowStats.from_state(state, last_step=149)
    assert w.first_step == 100 and w.first_spike_step == 136 and w.spikes == 1
    assert w.global_norm_max == pytest.approx(500.0, rel=1e-5)
    assert w.global_norm_last == pytest.approx(1.0)


@pytest.mark.parametrize("bad, error", [("fast", ValueError), (-1.0, ValueError), (0, ValueError),
                                         (float("nan"), ValueError), ([1.0], TypeError), (True, TypeError)])
def test_clip_argument_is_checked(bad, error):
    with pytest.raises(error, match="clip"):
        clipping.resolve(bad)


def test_finding_validates_kind_and_severity():
    with pytest.raises(ValueError, match="kind"):
        gradguard.Finding("slow", 1, (), "warning", "m", ())
    with pytest.raises(ValueError, match="severity"):
        gradguard.Finding("dead", 1, (), "fatal", "m", ())
    f = gradguard.Finding("dead", 3, ["a"], "warning", "m", ["r"], {"x": np.float32(1.5)})
    assert f.layers == ("a",) and json.loads(json.dumps(f.to_dict()))["evidence"] == {"x": 1.5}
    assert gradguard.Finding.from_dict(f.to_dict()) == f


# ------------------------------------------------------------------------------- detectors


def make_layers(n):
    return [gradguard.LayerInfo(f"l{i}", "Linear", 100, fan_in=10, units=10) for i in range(n)]


def window_from_rms(rms, steps=50, last_step=49):
    """A window whose per-layer gradient RMS is ``rms`` on every step (layers of 100 elements)."""
    norms = np.asarray(rms, np.float32) * 10.0
    state = stats.init_state(len(rms), clipping.no_clipping())
    has = np.ones(len(rms), np.float32)
    for _ in range(steps):
        _, _, state = stats.device_step(state, norms ** 2, has, clipping.no_clipping(), xp)
    return stats.WindowStats.from_state(state, last_step=last_step)


@pytest.mark.parametrize("profile, expected", [
    ([1e-12, 1e-10, 1e-7, 1e-4, 1e-2, 1.0], ("l0", "l1", "l2")),  # a collapsed sigmoid stack
    ([170.0, 50.0, 10.0, 3.0, 1.0, 1.0], None),  # healthy BN conv net: early layers *larger*
    ([0.1, 0.3, 0.5, 1.0, 2.0, 1.0], None),  # a factor of 2 to 20 is not a finding
    ([2e-3, 1e-2, 0.1, 0.5, 1.0, 1.0], None),  # under three orders of magnitude: not a finding
    ([1e-7, 1e-7, 1e-8, 1e-7, 1e-7, 1e-3], None),  # a converged classifier's head alone dwarfs the rest
])
def test_vanishing_is_orders_of_magnitude(profile, expected):
    mon = gradguard.Monitor(make_layers(len(profile)))
    mon.observe(window_from_rms(profile))
    found = [f for f in mon.findings if f.kind == "vanishing"]
    if expected is None:
        assert found == []
    else:
        assert found[0].layers == expected and found[0].evidence["orders_of_magnitude"] == pytest.approx(12, abs=0.1)


def test_a_persistent_condition_is_one_updated_finding(recwarn):
    mon = gradguard.Monitor(make_layers(4))
    for k in range(4):
        mon.observe(window_from_rms([1e-9, 1e-6, 1e-3, 1.0], last_step=49 + 50 * k))
    found = mon.findings
    assert [f.kind for f in found] == ["vanishing"] and found[0].step == 49
    assert found[0].evidence["updated_at_step"] == 199
    assert len([w for w in recwarn.list if issubclass(w.category, gradguard.GradGuardWarning)]) == 1


def test_short_transients_are_not_findings():
    mon = gradguard.Monitor(make_layers(4))
    mon.observe(window_from_rms([1e-9, 1e-6, 1e-3, 1.0], steps=3, last_step=2))
    mon.observe(window_from_rms([1.0, 1.0, 1.0, 1.0], steps=50, last_step=52))
    assert mon.findings == []


def test_monitor_state_round_trip():
    mon = gradguard.Monitor(make_layers(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon.observe(window_from_rms([1e-9, 1e-6, 1e-3, 1.0]))
    state = json.loads(json.dumps(mon.state_dict()))
    other = gradguard.Monitor(make_layers(4))
    other.load_state_dict(state)
    assert other.findings == mon.findings and other.totals == mon.totals


def test_failing_sink_warns_once_and_jsonl_sink_writes(tmp_path):
    class Broken(gradguard.Sink):
        def log(self, record):
            raise ConnectionError("W&B is down")

    jsonl = gradguard.JsonlSink(tmp_path)
    mon = gradguard.Monitor(make_layers(3), sinks=[Broken(), jsonl])
    with pytest.warns(RuntimeWarning, match="W&B is down") as caught:
        for k in range(3):
            mon.observe(window_from_rms([1.0, 1.0, 1.0], last_step=49 + 50 * k))
    assert len([w for w in caught if "Broken" in str(w.message)]) == 1
    jsonl.close()
    lines = [json.loads(line) for line in (tmp_path / "gradguard.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [49, 99, 149]
    assert lines[0]["scalars"]["grad/norm/l0"] == pytest.approx(10.0, rel=1e-5)
    assert "grad/depth_ratio" in lines[0]["scalars"]


def test_percentile_policy_is_autoclip():
    rng = np.random.default_rng(3)
    norms = list(np.abs(rng.normal(5.0, 1.0, 60)))
    scales, _ = run_steps(norms, clipping.percentile(p=10.0, history=20))
    for t, (g, s) in enumerate(zip(norms, scales)):
        seen = np.array(norms[max(0, t - 19):t + 1])
        expected = np.sort(seen)[int((len(seen) - 1) * 0.10)]
        assert min(g, expected) == pytest.approx(g * s, rel=1e-4), t
    assert (scales < 1).mean() > 0.8  # AutoClip clips most steps a little, by design


def test_escaping_a_plateau_is_not_an_explosion():
    # Measured on a deep ReLU MLP with Adam: the gradient norm rose 50x in 20 steps at ~1.2x a step
    # while the loss fell from 2.3 to 0.5. Learning, not an explosion.
    norms = [0.03 * 1.22 ** k for k in range(22)] + [1.5, 1.3, 1.0, 0.75, 0.3, 0.1, 0.06]
    scales, state = run_steps(norms, clipping.auto())
    w = stats.WindowStats.from_state(state, 0)
    assert w.spikes == 0 and w.explosions == 0 and (scales == 1.0).all()
