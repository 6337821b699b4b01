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


def test_auto_threshold_does_not_follow_an_explosion_from_the_first_steps():
    # A run explosive from its start: step 1 is 1e4x step 0 (an explosion: the latch closes), and
    # the norm keeps growing 3x a step. The tracker's level climbs after it; the latched threshold
    # must not: it stays at the level held from before the excursion.
    norms = [100.0, 1e6] + [1e6 * 3.0 ** k for k in range(1, 15)]
    scales, state = run_steps(norms, clipping.auto())
    assert float(state["clip_enabled"]) == 1.0
    let_through = np.array(norms) * scales
    assert let_through[1:].max() < 110.0, let_through  # (following the level: 128 rising to 266)
    # Then the run calms to ~1 (its quiet level); a later burst of 50x is cut near that level,
    # not near the explosive one, and steps under the threshold are left alone.
    calm = list(np.exp(np.random.default_rng(3).normal(0.0, 0.2, 40)))
    scales, _ = run_steps(norms + calm + [50.0] + calm[:5], clipping.auto())
    tail = (np.array(norms + calm + [50.0] + calm[:5]) * scales)[len(norms):]
    assert tail[len(calm)] < 2.0, tail[len(calm)]  # (following the level: 5.4)
    assert (scales[len(norms):len(norms) + len(calm)] == 1.0).all()


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


@pytest.mark.parametrize("n_layers, trace_size", [(7, 256), (300, 16)])
@pytest.mark.parametrize("policy", [clipping.no_clipping(), clipping.fixed(3.0), clipping.auto()],
                         ids=lambda p: p.name)
def test_waited_steps_are_device_steps_bit_for_bit(policy, n_layers, trace_size):
    """``stats.waited_steps`` on batches of 1 to 40 rows gives the state k ``device_step`` calls give,
    bit for bit: NaN and overflowing steps, layers without a gradient, all-zero layers, lone spikes
    and a sustained excursion (``auto``: quiet steps only, as the CPU path batches them), sums over
    300 layers (numpy's pairwise reduction), a trace shorter than the batch."""
    from gradguard.ops import fast_numpy_ops

    rng = np.random.default_rng(3)
    tracker = stats.TrackerConfig()
    quiet_only = policy.verdict_without_state == "quiet"
    rows, has_rows = [], []
    for i in range(400):
        scale = 1.0 if quiet_only else (1e4 if i % 37 == 36 or 300 <= i < 306 else 1.0)
        sq = (rng.random(n_layers) * scale * np.exp(rng.normal(0, 3))).astype(np.float32)
        has = np.ones(n_layers, np.float32)
        if i % 13 == 5:
            has[1], sq[1] = 0.0, 0.0
        if i % 17 == 3:
            sq[2] = 0.0
        if not quiet_only and i % 50 == 49:
            sq[3] = np.nan if i % 100 == 49 else np.inf
        rows.append(sq)
        has_rows.append(has)
    ref = stats.init_state(n_layers, policy, trace_size=trace_size)
    got = dict(ref)
    i, sizes = 0, [1, 2, 40, 7, 33, 3, 64]
    while i < 400:
        k = min(sizes[i % len(sizes)], 400 - i)
        for j in range(i, i + k):
            _, _, ref = stats.device_step(ref, rows[j], has_rows[j], policy, fast_numpy_ops, tracker)
        got = stats.waited_steps(got, np.stack(rows[i:i + k]), np.stack(has_rows[i:i + k]), policy, tracker)
        assert set(got) == set(ref)
        for key in ref:
            assert np.array_equal(np.asarray(got[key], np.float32), np.asarray(ref[key], np.float32),
                                  equal_nan=True), (i, key)
        i += k
    window = stats.WindowStats.from_state(ref, last_step=399)
    assert window.nonfinite_steps == (0 if quiet_only else 8) and window.layer_zero[2] > 0
    assert quiet_only or (window.spikes > 0 and window.explosions > 0)
    assert not quiet_only or float(ref["clip_enabled"]) == 0.0  # (batched as the CPU path batches: latch open)


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


# ---------------------------------------------------------------------------------- the one pipeline

from gradguard import pipeline  # noqa: E402
from gradguard.options import Options  # noqa: E402


@pytest.mark.parametrize("kwargs, error", [
    ({"max_logged_layers": -1}, ValueError), ({"max_logged_layers": 1}, ValueError),
    ({"max_logged_layers": 2.5}, ValueError), ({"measure_updates": "no"}, TypeError),
    ({"log_every_n_steps": 0}, ValueError), ({"log_every_n_steps": 2.0}, ValueError),
    ({"skip_nonfinite": 1}, TypeError), ({"histograms": "yes"}, TypeError), ({"clip": "fast"}, ValueError),
    ({"detector_config": {}}, TypeError),
])
def test_options_are_checked_when_made(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        Options(**kwargs)


def test_options_accept_numpy_integers_and_name_unknown_ones():
    opts = Options.of("GradGuard", {"log_every_n_steps": np.int64(5), "max_logged_layers": np.int32(4)})
    assert opts.log_every_n_steps == 5 and type(opts.log_every_n_steps) is int and opts.max_logged_layers == 4
    with pytest.raises(TypeError, match=r"'clp' \(did you mean 'clip'\?\)"):
        Options.of("GradGuard", {"clp": "auto"})
    assert Options.of("X", {"wandb": True}, extra=["wandb"]).clip == "auto"
    assert Options().every() == 50 and Options().every(host_default=7) == 7 and Options(log_every_n_steps=3).every(7) == 3


def test_public_exports_hold_no_internals():
    assert "Signals" in gradguard.__all__ and "Monitor" not in gradguard.__all__
    assert "WindowStats" not in gradguard.__all__ and "auto" not in gradguard.__all__
    assert all(hasattr(gradguard, n) for n in gradguard.__all__)


def test_custom_policy_state_key_named_enabled_is_left_alone():
    """Only the field a policy declares as its latch is ever written from outside it."""
    def init():
        return {"enabled": 0.25}

    def update(state, norm, signals, xp):
        return clipping.INF, {"enabled": state["enabled"]}

    custom = clipping.ClipPolicy("mine", init, update, "custom")
    # spike then NaN: the auto latch would close here
    scales, state = run_steps([1.0] * 20 + [1000.0, math.nan], custom)
    assert float(state["clip_enabled"]) == pytest.approx(0.25)
    _, auto_state = run_steps([1.0] * 20 + [1000.0, math.nan], clipping.auto())
    assert float(auto_state["clip_enabled"]) == 1.0


def test_policies_say_what_they_do_through_fields():
    assert clipping.auto().latch == "enabled" and clipping.zscore().latch is None
    assert not clipping.agc().scales_global and clipping.agc().unitwise is not None
    assert not clipping.no_clipping().scales_global and clipping.fixed(1.0).scales_global
    assert isinstance(clipping.zscore().init(), clipping.ZScoreState)


def test_state_layout_round_trip():
    layout = pipeline.StateLayout(stats.init_state(3, clipping.percentile(history=5)))
    state = stats.init_state(3, clipping.percentile(history=5))
    state["acc_sum"] = np.arange(16, dtype=np.float32).reshape(4, 4)
    vec = layout.pack_np(state)
    assert vec.shape == (layout.size,)
    back = layout.unpack_np(vec)
    assert all(np.array_equal(np.asarray(back[k]), np.asarray(state[k])) for k in state)
    assert layout.fits(back)


def test_log_step_rule():
    assert [s for s in range(10) if pipeline.is_log_step(s, 4)] == [0, 3, 7]
    assert [s for s in range(10) if pipeline.is_report_step(s, 4)] == [3, 7]
    assert [s for s in range(3) if pipeline.is_report_step(s, 1)] == [0, 1, 2]


def test_sampling_dead_units_histograms():
    assert pipeline.sample_plan([10, 4096, 10_000]) == [(1, 10), (1, 4096), (2, 5000)]
    assert pipeline.update_sq_from_sample(2.0, 10_000, 5000) == 4.0
    assert pipeline.dead_units(np.array([0.0, 1e-30, 0.0])).tolist() == [True, False, True]
    counts, edges = pipeline.histogram(np.array([0.0, 1.0, np.nan, 0.5]))
    assert counts.sum() == 3 and len(edges) == pipeline.HIST_BINS + 1
    assert pipeline.histogram(np.array([np.inf])) is None


def feed(pipe, state, norms_per_layer):
    for layer_norms in norms_per_layer:
        sq = np.square(np.asarray(layer_norms, np.float32))
        _, _, state = stats.device_step(state, sq, np.ones(len(sq), np.float32), pipe.policy, xp, pipe.tracker)
        pipe.step += 1
    return state


def test_snapshot_from_sums_masks_layers_without_gradient():
    layers = make_layers(3)
    snap = pipeline.snapshot_from_sums(layers, pipeline.LayerSums(
        has_grad=np.array([True, False, True]), norm_sq=np.array([4.0, 0.0, 9.0]),
        max_abs=np.array([1.0, 0.0, 2.0]), zeros=np.array([10.0, 0.0, 0.0]), weight_sq=np.array([1.0, 1.0, 4.0])))
    assert snap.norm[0] == 2.0 and math.isnan(snap.norm[1]) and snap.rms[2] == pytest.approx(3.0 / 10.0)
    assert snap.zero_frac[0] == pytest.approx(0.1) and snap.weight_norm.tolist() == [1.0, 1.0, 2.0]
    assert snap.update_norm is None


def test_pipeline_observe_restarts_window_and_peek_changes_nothing(tmp_path):
    sink = gradguard.JsonlSink(tmp_path)
    pipe = pipeline.Pipeline(make_layers(4), gradguard.ModelFacts(), Options(log_every_n_steps=5), sinks=[sink])
    state = feed(pipe, pipe.initial_state(), [[1e-9, 1e-6, 1e-3, 1.0]] * 12)
    before = (pipe.monitor.state_dict(), sorted(tmp_path.iterdir()))
    found, totals = pipe.monitor.peek(pipe.window(state, pipe.step - 1))
    assert [f.kind for f in found] == ["vanishing"] and totals["steps"] == 12
    assert pipe.monitor.state_dict() == before[0] and pipe.monitor.findings == []
    with pytest.warns(gradguard.GradGuardWarning, match="vanishing") as caught:
        decision, fresh = pipe.observe(pipe.layout.pack_np(state), pipe.step - 1)
    assert caught[0].filename == __file__  # located at the user's line, not inside gradguard
    assert [f.kind for f in decision.new_findings] == ["vanishing"]
    assert float(fresh["acc_steps"]) == 0 and float(fresh["trk_count"]) == 12


def test_loss_scaler_skips_are_counted_apart_from_nonfinite_steps():
    """Non-finite steps at an active loss scaler (its scale above 1) are its own skips: counted apart,
    flagged apart in the trace, no overflow after a spike (no explosion, the latch stays open); a NaN
    of the run's own in the same window is still one, in its own layer, at its own step."""
    inf, nan = float("inf"), float("nan")
    rows = [[1.0, 1.0, 1.0]] * 10
    rows[1] = [300.0, 300.0, 300.0]  # a spike
    rows[2] = rows[3] = [inf, 1.0, inf]  # overflows right after it
    rows[6] = [1.0, nan, 1.0]  # a NaN in layer 1
    scaler_at = {2: 1.0, 3: 1.0, 6: 0.0}  # (a scale of 1 or less at step 6: the scaling is not the cause)

    def run(with_scaler):
        pipe = pipeline.Pipeline(make_layers(3), gradguard.ModelFacts(), Options(clip="auto", log_every_n_steps=10))
        state = pipe.initial_state()
        for i, row in enumerate(rows):
            sq = np.square(np.asarray(row, np.float32))
            active = np.float32(scaler_at[i]) if with_scaler and i in scaler_at else None
            _, _, state = stats.device_step(state, sq, np.ones(3, np.float32), pipe.policy, xp, pipe.tracker, active)
            pipe.step += 1
        return pipe, state

    pipe, state = run(with_scaler=True)
    w = pipe.window(state, 9)
    assert (w.nonfinite_steps, w.first_nonfinite_step, w.loss_scale_skipped) == (1, 6, 2)
    assert w.layer_nonfinite.tolist() == [0, 1, 0] and w.explosions == 0
    flags = w.trace[:, stats.TRACE_FLAGS].astype(int)
    assert [i for i, f in enumerate(flags) if f & stats.FLAG_SCALER_SKIP] == [2, 3]
    assert [i for i, f in enumerate(flags) if f & stats.FLAG_NONFINITE] == [6]
    with pytest.warns(gradguard.GradGuardWarning, match="nonfinite at step 6"):
        _, fresh = pipe.observe(state, 9)
    assert pipe.monitor.totals["loss_scale_skipped"] == 2 and pipe.monitor.totals["nonfinite"] == 1
    assert [(f.kind, f.step) for f in pipe.monitor.findings] == [("nonfinite", 6)]
    assert float(fresh["acc_scaler_skips"]) == 0 and float(fresh["clip_enabled"]) == 0  # window restarted, latch open

    bare, bare_state = run(with_scaler=False)  # the same steps without a scaler: three non-finite, an explosion
    b = bare.window(bare_state, 9)
    assert (b.nonfinite_steps, b.loss_scale_skipped, b.layer_nonfinite.tolist()) == (3, 0, [2, 1, 2])
    assert b.explosions >= 1 and float(bare_state["clip_enabled"]) == 1

    saved = json.loads(json.dumps(pipe.state_dict({k: np.asarray(v).tolist() for k, v in state.items()})))
    del saved["device_state"]["acc_scaler_skips"]  # a checkpoint from before the counter
    saved["monitor"]["totals"].pop("loss_scale_skipped")
    older = pipeline.Pipeline(make_layers(3), gradguard.ModelFacts(), Options(clip="auto", log_every_n_steps=10))
    got = older.restore(saved)
    assert float(got["acc_scaler_skips"]) == 0 and older.monitor.totals["loss_scale_skipped"] == 0


def test_restore_follows_layers_by_name_and_refuses_other_shapes():
    opts = Options(clip="auto")
    a = pipeline.Pipeline(make_layers(3), gradguard.ModelFacts(), opts)
    state = feed(a, a.initial_state(), [[1.0, 2.0, 3.0]] * 4)
    saved = a.state_dict({k: np.asarray(v).tolist() for k, v in state.items()})
    saved = json.loads(json.dumps(saved))
    # l1 left, l3 joined
    layers = [gradguard.LayerInfo(n, "Linear", 100, fan_in=10, units=10) for n in ("l0", "l2", "l3")]
    b = pipeline.Pipeline(layers, gradguard.ModelFacts(), opts)
    got = b.restore(saved)
    assert b.step == 4 and b.layout.fits({k: got[k] for k in b.layout.keys})
    np.testing.assert_allclose(got["acc_sum"][0], [4.0, 12.0, 0.0, 4 * math.sqrt(14)], rtol=1e-5)
    assert float(got["trk_count"]) == 4
    other = [gradguard.LayerInfo("l0", "Linear", 200, fan_in=20, units=10)]
    with pytest.raises(ValueError, match="'l0' had 100 parameters, this model's has 200"):
        pipeline.Pipeline(other, gradguard.ModelFacts(), opts).restore(saved)


def test_restore_under_another_policy_carries_tracker_and_starts_policy_fresh():
    a = pipeline.Pipeline(make_layers(2), gradguard.ModelFacts(), Options(clip="auto"))
    state = feed(a, a.initial_state(), [[1.0, 1.0]] * 6)
    saved = a.state_dict(state)
    for clip in ("zscore", 1.0, "percentile", None):
        b = pipeline.Pipeline(make_layers(2), gradguard.ModelFacts(), Options(clip=clip))
        with pytest.warns(UserWarning, match="'auto'"):
            got = b.restore(saved)
        assert float(got["trk_count"]) == 6 and "clip_enabled" not in got
        state_b = feed(b, got, [[1.0, 1.0]])  # the new policy runs from its fresh state
        assert float(state_b["trk_count"]) == 7
