"""GradGuardCallback with real ``model.fit`` on the TensorFlow, JAX and torch backends.

Keras fixes its backend at import, so each backend runs ``tests/keras_cases.py`` in its own
process, all its cases in one go (the three processes start together on first use); each case
prints its measurements as JSON and the tests here assert on them.
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow  # subprocesses: every Keras backend / several ranks

from gradguard.findings import REMEDIES
from keras_runner import BACKENDS, CaseRunner

COMMON = ["vanishing", "exploding", "inf_batch", "healthy", "lr_schedule", "run_eagerly", "switch_on", "clip_rules", "save_load",
          "state_roundtrip", "bad_args", "loss_scale", "subclassed", "device_step_ops"]
EXTRA = {"tensorflow": ["jit_compile", "steps_per_execution", "distributed", "wandb"],
         "jax": ["steps_per_execution", "distributed"],
         "torch": []}
NOT_APPLICABLE = {
    ("torch", "steps_per_execution"): "Keras allows only steps_per_execution=1 on the torch backend",
    ("torch", "distributed"): "Keras' torch backend distributes through torch DDP processes, not tested here",
    ("torch", "jit_compile"): "torch.compile of the Keras train step takes minutes on 2 CPU cores",
    ("jax", "jit_compile"): "JAX's default train step is already jax.jit-compiled (checked in test_inf_batch_is_skipped)",
    ("jax", "wandb"): "the W&B round trip is backend-independent on gradguard's side; run on TensorFlow",
    ("torch", "wandb"): "the W&B round trip is backend-independent on gradguard's side; run on TensorFlow",
}

_runner = CaseRunner({backend: COMMON + EXTRA[backend] for backend in BACKENDS})


def case(backend: str, name: str) -> dict:
    if (backend, name) in NOT_APPLICABLE:
        pytest.skip(NOT_APPLICABLE[(backend, name)])
    return _runner.case(backend, name)


def num(v) -> float:
    return float(v)  # the runner writes non-finite floats as the strings "nan"/"inf"


def kinds(r) -> list[str]:
    return [f["kind"] for f in r["findings"]]


def the(r, kind):
    found = [f for f in r["findings"] if f["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} finding, got {r['findings']}"
    return found[0]


backends = pytest.mark.parametrize("backend", BACKENDS)


@backends
def test_vanishing_names_the_first_dense_layers(backend):
    r = case(backend, "vanishing")
    assert kinds(r) == ["vanishing"]
    f = the(r, "vanishing")
    assert f["layers"][0] == "hidden_0"  # Keras layer names, model order
    assert 2 <= len(f["layers"]) <= 5 and set(f["layers"]) <= {f"hidden_{i}" for i in range(5)}
    assert "sigmoid" in f["cause"]  # from the Dense layers' own activation
    assert REMEDIES["relu"] in f["remedies"]
    assert r["activations"] == ["sigmoid"] * 10 + [None]  # the head's activation is not a cause
    assert r["layers"] == [f"hidden_{i}" for i in range(10)] + ["head"]
    # Orders of magnitude: first-to-last gradient RMS, logged at every epoch end.
    assert all(num(v) < 1e-4 for v in r["history"]["grad/depth_ratio"])
    assert r["warned"] == 1  # once through warnings, not once per log step


@backends
def test_sinks_get_records_and_findings_and_a_failing_sink_does_not_stop_training(backend):
    r = case(backend, "vanishing")
    assert r["epochs_done"] == 3
    assert r["sink_steps"] == sorted(r["sink_steps"]) and len(r["sink_steps"]) >= 4
    assert r["sink_findings"][0] == ["vanishing", True]
    assert all(new is False for _, new in r["sink_findings"][1:])  # one finding, updated
    assert r["sink_warnings"] == 1
    assert r["jsonl_types"] == ["finding", "step"] and r["jsonl_steps"] == len(r["sink_steps"])


@backends
def test_bad_init_diverges_without_help_and_auto_clipping_rescues_it(backend):
    r = case(backend, "exploding")
    assert not r["plain_finite"]  # plain fit: the weights become NaN/Inf
    assert r["finite"]
    assert all(math.isfinite(num(v)) for v in r["loss"])
    # Protected on the device from the first epoch: by auto's update ceiling (SGD: no step may move the
    # weights by more than 10% of their norm) or by the tracker's latch, whichever binds first. Whether
    # a finding follows depends on evidence the clipping removes (issue 12: a finding needs growth that
    # is sustained, an overflow, or updates that dwarf the weights), so it is not asserted.
    assert num(r["history"]["gradguard/clipped_steps"][0]) >= 1
    assert r["clip_enabled_step"] is None or r["clip_enabled_step"] <= 3
    for f in r["findings"]:
        if f["kind"] == "exploding":
            assert "Clipping is now on" in f["message"] and REMEDIES["clipping"] in f["remedies"]


def _check_skip(r, skipped, steps):
    assert r["skipped"] == skipped and r["totals"]["nonfinite"] == skipped
    assert r["finite"] and r["opt_finite"]
    assert r["iterations"] == steps - skipped  # the optimizer never saw the skipped steps
    assert kinds(r) == ["nonfinite"]  # a NaN in the data is not an explosion
    assert "data" in the(r, "nonfinite")["cause"]


@backends
def test_inf_batch_is_skipped(backend):
    r = case(backend, "inf_batch")
    _check_skip(r, skipped=2, steps=32)  # the poisoned batch, once per epoch
    assert the(r, "nonfinite")["step"] == 3
    assert r["skip_kept_weights"] and r["skip_kept_slots"]  # momentum untouched too
    assert r["next_step_moved"]
    assert r["loss_after"] < r["loss_before"] * 0.6  # training went on
    assert r["logged_at"] == [10, 20, 30]  # (the first step is judged, not logged)
    assert r["rms_logged_at"] == [10, 20, 30]  # log-step extras, taken inside the compiled step
    assert r["jit_compile"] == (backend == "jax")  # JAX compiles the step by default


@backends
def test_jit_compile(backend):
    r = case(backend, "jit_compile")
    assert r["jit_compile"]
    _check_skip(r, skipped=2, steps=32)
    assert r["skip_kept_weights"] and r["skip_kept_slots"]
    assert r["rms_logged_at"] == [10, 20, 30]


@backends
def test_steps_per_execution(backend):
    r = case(backend, "steps_per_execution")
    # Every step of every execution is measured; logging is rounded up to whole executions.
    assert any("logging every 8 steps" in w for w in r["warnings"])
    _check_skip(r, skipped=1, steps=16)
    assert r["totals"]["steps"] == 16
    assert the(r, "nonfinite")["step"] == 5  # the step inside the execution, not the execution
    assert r["logged_at"] == [8, 16] and r["rms_logged_at"] == [8, 16]


@backends
def test_healthy_net_has_no_findings_and_logs_reach_history_and_csv(backend):
    r = case(backend, "healthy")
    assert r["findings"] == []
    assert num(r["loss"][-1]) < 0.5 * num(r["loss"][0])
    for key in ("grad/norm/global", "grad/norm/hidden_0", "grad/norm/head", "grad/depth_ratio",
                "gradguard/clip_threshold", "gradguard/skipped_steps", "gradguard/clipped_steps"):
        assert key in r["csv_header"], key
        assert len(r["history"][key]) == r["epochs"], key
    assert len(r["csv_rows"]) == r["epochs"]
    col = r["csv_header"].index("grad/norm/global")
    assert all(math.isfinite(float(row[col])) and float(row[col]) > 0 for row in r["csv_rows"])
    assert 0.3 < num(r["history"]["grad/depth_ratio"][-1]) < 30
    # The device state leaves the graph on log steps and epoch ends only (no reads on other steps).
    assert r["reads"] <= 1 + r["steps"] // r["log_every"] + r["epochs"] + 1


@backends
def test_run_eagerly_measures_skips_and_finds_as_the_compiled_step(backend):
    r = case(backend, "run_eagerly")
    eager, compiled = r["eager"], r["compiled"]
    assert [num(v) for v in eager.pop("norm")] == pytest.approx([num(v) for v in compiled.pop("norm")], rel=1e-5)
    assert eager == compiled
    assert r["eager"]["findings"] == [["nonfinite", 5]] and r["eager"]["skipped"] == 1 and r["eager"]["finite"]


@backends
def test_the_update_ceiling_follows_a_learning_rate_schedule(backend):
    """SGD with ExponentialDecay: the gain behind clip="auto"'s update ceiling is re-read on log steps,
    each time the schedule's rate at the optimizer's iteration then (it halves every 10 steps)."""
    r = case(backend, "lr_schedule")
    assert r["findings"] == [] and len(r["gains"]) == r["steps"]
    used = [g for i, g in enumerate(r["gains"]) if i == 0 or g != r["gains"][i - 1]]  # each value, in order
    assert len(used) >= 3 and used == sorted(used, reverse=True)
    for g in used:
        assert any(g == pytest.approx(e, rel=1e-6) for e in r["expected"]), (g, r["expected"])
    assert used[-1] < 0.25 * r["expected"][0]  # (the rate fell by 4x or more, and the gain with it)


@backends
def test_auto_clipping_switches_on_inside_the_compiled_step(backend):
    r = case(backend, "switch_on")
    s = r["spike"]
    assert [num(v) for v in r["clip_enabled"][:s]] == [0.0] * s
    assert [num(v) for v in r["clip_enabled"][s:]] == [1.0] * (len(r["clip_enabled"]) - s)
    raw, applied = num(r["raw_norms"][s]), r["applied_norm_at_spike"]
    threshold = num(r["threshold"][s])
    assert raw > 100 * max(num(v) for v in r["raw_norms"][:s])
    # The spike step itself was clipped to the threshold the device computed, on the device.
    assert applied == pytest.approx(threshold, rel=1e-3)
    assert applied < raw / 100
    assert [num(v) for v in r["clipped"][s:]][0] == 1.0
    # One bad batch clipped on its own step is protection, not a diagnosis: a lone spike that does not
    # persist is not growth feeding on itself (issue 12), so it is not an `exploding` finding.
    assert r["clip_enabled_step"] == s and "exploding" not in [f["kind"] for f in r["findings"]]
    if backend != "torch":  # torch runs the step eagerly, every call is a "trace"
        assert r["traces"] == 1  # switched on without retracing


@backends
def test_clip_rules_and_the_optimizers_own_clipping(backend):
    r = case(backend, "clip_rules")
    ours = r["ours"]
    assert ours["raw_norm"] > 5 and ours["applied_norm"] == pytest.approx(0.5, rel=1e-3)
    assert ours["threshold"] == 0.5 and ours["clipped"] == 1.0 and ours["policy"] == "fixed"
    # The optimizer's global_clipnorm stays in charge; gradguard never clips on top of it.
    for name in ("keras", "keras_auto"):
        k = r[name]
        assert k["applied_norm"] == pytest.approx(1.0, rel=1e-3), name
        assert k["threshold"] == 1.0 and k["clipped"] == 1.0 and k["policy"] == "keras_global_clipnorm"
    assert len(r["keras"]["warnings"]) == 1 and "clip=0.5" in r["keras"]["warnings"][0]
    # As the Lightning callback does for gradient_clip_val: any clip= other than None is told.
    assert len(r["keras_auto"]["warnings"]) == 1 and "clip='auto'" in r["keras_auto"]["warnings"][0]
    agc = r["agc"]  # unit-wise: no unit moved more than 1% of its weight norm (x lr)
    assert agc["policy"] == "agc" and agc["worst_unit_ratio"] <= 1.001
    assert agc["applied_norm"] < agc["raw_norm"] / 10
    ceiling = r["auto_ceiling"]  # SGD(1.0, momentum=0.9): the first update held to (1 - 0.9) |w|
    assert ceiling["raw_norm"] > 3 * ceiling["ceiling"] and ceiling["clipped"] == 1
    assert ceiling["applied_norm"] == pytest.approx(ceiling["ceiling"], rel=1e-3)


@backends
def test_save_and_load_model(backend):
    r = case(backend, "save_load")
    # gradguard's Variables (3, and a weight sample on TF/JAX) ride with the optimizer during fit
    assert r["n_opt_during_fit"] == r["n_opt_plain"] + (3 if backend == "torch" else 4)
    assert r["n_opt_after"] == r["n_opt_plain"]  # and leave with fit
    for name, iterations in (("epoch1.keras", 16), ("final.keras", 32)):  # saved during and after fit
        loaded = r[name]
        assert loaded["warnings"] == [], name
        assert loaded["n_opt"] == r["n_opt_plain"] and loaded["iterations"] == iterations, name
    final = r["final.keras"]
    assert final["same_predictions"] and final["same_slots"]
    assert final["resumed_iterations"] == 48 and final["resumed_finite"]


@backends
def test_state_dict_round_trip(backend):
    r = case(backend, "state_roundtrip")
    assert r["totals_a"] == r["totals_b"] and r["step_a"] == r["step_b"] == 32
    assert r["tracker_b"] == pytest.approx(r["tracker_a"], rel=1e-5, abs=1e-6)
    assert r["findings_a"] == r["findings_b"]


@backends
def test_bad_arguments(backend):
    r = case(backend, "bad_args")
    for kw, error in r.items():
        if kw == "not compiled":
            assert error is not None
            continue
        assert error is not None, kw
        name, value = kw.strip("{}").split(": ", 1)
        assert name.strip("'") in error and value in error, (kw, error)


@backends
def test_distributed_sees_the_aggregated_gradients(backend):
    r = case(backend, "distributed")
    assert r["replicas"] == 2
    ref, dist = r["ref_norms"], r["dist_norms"]
    for key in ("grad/norm/global", "grad/norm/hidden_0", "grad/norm/head"):
        assert num(dist[key][0]) == pytest.approx(num(ref[key][0]), rel=1e-4), key
    assert r["same_weights"]
    p = r["poisoned"]  # a NaN in one replica's share of the batch
    assert p["skipped"] == 1 and p["finite"] and p["opt_finite"] and p["iterations"] == 1
    assert [f["kind"] for f in p["findings"]] == ["nonfinite"]
    if backend == "tensorflow":
        assert p["replicas_equal"]


@backends
def test_loss_scale_optimizer(backend):
    r = case(backend, "loss_scale")
    assert r["finite"]
    assert r["findings"] == []  # the loss scaler's own overflow skips are not gradguard findings
    assert 0 < r["steps"] <= 32
    assert math.isfinite(num(r["history"]["grad/norm/global"][-1]))


@backends
def test_subclassed_model_built_by_fit(backend):
    r = case(backend, "subclassed")
    assert r["layers"] == ["first", "second"]
    assert r["skipped"] == 1 and r["finite"]
    assert [f["kind"] for f in r["findings"]] == ["nonfinite"]
    if backend == "tensorflow":
        # Configured inside the first trace; tf.function traces once more after creating variables.
        assert not r["built_before"] and r["traces"] <= 2


@backends
def test_wandb_gets_scalars_histograms_and_alerts(backend):
    r = case(backend, "wandb")
    # Scalars through Keras logs -> WandbMetricsLogger; histograms and the alert from WandbSink.
    assert any(k.endswith("grad/norm/global") for k in r["keys"]), r["keys"]
    assert any(k.endswith("grad/depth_ratio") for k in r["keys"])
    assert r["histograms"] >= 2, r["hist_sample"]
    assert any("anishing" in a for a in r["alerts"]), r["alerts"]
    assert "gradguard/finding/vanishing" in r["summary_keys"]


@backends
def test_device_step_is_the_same_under_keras_ops_and_numpy(backend):
    worst = case(backend, "device_step_ops")
    assert set(worst) == {"auto", "auto_ceiling", "zscore", "percentile", "fixed"}
    for name, diff in worst.items():
        assert diff["scale"] < 1e-5 and diff["state"] < 1e-4, (name, diff)
