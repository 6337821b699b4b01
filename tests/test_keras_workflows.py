"""Everyday Keras workflows with real ``model.fit`` on the TensorFlow, JAX and torch backends:
gradient accumulation, fine-tuning, a callback reused on another model, reading results
mid-run, resuming under another ``clip=``, zscore/percentile, BatchNormalization statistics after
a skipped step, recurrent layer names, the one options surface (issues 7, 8, 13).

Like test_keras.py: each backend runs its cases from ``tests/keras_cases.py`` in one subprocess
(the three start together on first use); the tests assert on the JSON they print.
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow  # subprocesses: every Keras backend / several ranks

from keras_runner import BACKENDS, CaseRunner

CASES = ["async_dispatch", "partial_execution", "accumulation", "fine_tune", "other_model", "pure_look", "clip_change", "policies", "bn_skip",
         "lstm_names", "surface", "dead_units", "other_shapes", "own_optimizers"]
_runner = CaseRunner({backend: CASES for backend in BACKENDS})


def case(backend: str, name: str) -> dict:
    return _runner.case(backend, name)


def kinds(findings) -> list[str]:
    return [f["kind"] for f in findings]


backends = pytest.mark.parametrize("backend", BACKENDS)


@backends
def test_gradient_accumulation_measures_clips_and_skips_per_optimizer_step(backend):
    r = case(backend, "accumulation")
    c = r["clip"]  # 8 micro-batches, accumulation 4: two optimizer steps
    assert c["steps"] == 2 and c["iterations"] == 2
    assert c["still_during_window"]  # micro-batches only accumulate
    # What the optimizer applied is the accumulated gradient clipped to 0.5, once per step.
    assert c["applied_first"] == pytest.approx(0.5, rel=2e-3)
    assert c["applied_second"] == pytest.approx(0.5, rel=2e-3)
    assert c["clipped"] == 2 and c["policy"] == "fixed"
    raw = [float(v) for v in c["raw_norms"] if v is not None]
    assert len(raw) == 2 and all(v > 0.5 for v in raw)  # logged once per optimizer step
    agc = r["agc"]
    assert agc["worst_unit_ratio"] <= 1.001 and agc["moved"] > 0
    s = r["skip"]  # 16 micro-batches: 4 optimizer steps, the second poisoned
    assert s["steps"] == 4 and s["skipped"] == 1
    assert s["iterations"] == 3  # the optimizer (and its schedule) never counted the skipped step
    assert s["finite"] and s["opt_finite"] and s["skip_kept_weights"] and s["next_moved"]
    assert kinds(s["findings"]) == ["nonfinite"] and s["findings"][0]["step"] == 1


@backends
def test_fine_tuning_freeze_fit_unfreeze_fit_with_the_same_callback(backend):
    r = case(backend, "fine_tune")
    assert r["first"]["layers"] == ["hidden_0", "head"] and r["first"]["steps"] == 16
    assert r["layers"] == ["hidden_0", "hidden_1", "hidden_2", "head"]
    assert r["steps"] == 32 and r["skipped"] == 1  # totals stay
    assert kinds(r["findings"]) == ["nonfinite"]  # findings stay
    assert float(r["trk_count"]) == float(r["first"]["trk_count"]) + 16  # the tracker went on
    assert r["finite"] and r["history_width"] == 4


@backends
def test_a_callback_reused_on_another_model_starts_fresh(backend):
    r = case(backend, "other_model")
    assert kinds(r["first"]["findings"]) == ["nonfinite"] and r["first"]["steps"] == 16
    assert len(r["warnings"]) == 1
    assert r["findings"] == [] and r["steps"] == 4  # nothing of the first model's run
    assert r["layers"] == ["other_0", "other_1", "head"]


@backends
def test_reading_results_is_a_pure_look(backend):
    r = case(backend, "pure_look")
    plain, peeked = r["plain"], r["peeked"]
    assert peeked["sink_steps"] == plain["sink_steps"]  # no extra records
    assert peeked["sink_findings"] == plain["sink_findings"]
    assert peeked["findings"] == plain["findings"] and peeked["totals"] == plain["totals"]
    assert set(kinds(plain["findings"])) >= {"nonfinite", "vanishing"}
    seen = peeked["seen"]
    # The pending steps are evaluated: the skipped step 3 shows at once, not at the next log step.
    assert [s[2] for s in seen[:5]] == [0, 0, 0, 1, 1]
    assert [s[1] for s in seen[:5]] == [1, 2, 3, 4, 5]


@backends
def test_resume_under_another_clip_policy(backend):
    r = case(backend, "clip_change")
    for clip, policy in (("zscore", "zscore"), ("0.5", "fixed"), ("percentile", "percentile")):
        c = r[clip]
        assert c["policy"] == policy, clip
        assert c["steps"] == 32 and c["skipped"] == 1, clip  # totals carried
        assert kinds(c["findings"]) == ["nonfinite"], clip  # findings carried
        assert len(c["warnings"]) == 1 and "'auto'" in c["warnings"][0] and policy in c["warnings"][0], clip
        assert c["finite"], clip


@backends
def test_zscore_and_percentile_clip_through_keras(backend):
    r = case(backend, "policies")
    z, p = r["zscore"], r["percentile"]
    assert z["policy"] == "zscore" and z["finite"] and z["totals"]["clipped"] >= 1
    assert all(math.isfinite(v) for v in z["loss"])
    assert p["policy"] == "percentile" and p["finite"]
    assert p["totals"]["clipped"] >= p["totals"]["steps"] // 2  # AutoClip p=10 clips most steps


@backends
def test_skipped_step_restores_batchnorm_statistics(backend):
    r = case(backend, "bn_skip")
    assert r["skipped"] == 1 and kinds(r["findings"]) == ["nonfinite"]
    assert r["skip_kept_all"]  # weights, moving mean and variance as before the poisoned step
    assert r["weights_finite"] and r["predict_finite"]
    assert r["stats_moved"]  # healthy steps still update the statistics


@backends
def test_recurrent_layer_is_named_not_its_cell(backend):
    r = case(backend, "lstm_names")
    assert r["layers"] == ["embedding", "lstm", "head"]
    assert "grad/norm/lstm" in r["keys"] and not any("cell" in k for k in r["keys"])


@backends
def test_one_options_surface(backend):
    r = case(backend, "surface")
    assert r["unknown"] is not None and "colour" in r["unknown"]
    assert r["measure_updates"] is not None and "measure_updates" in r["measure_updates"] and "'no'" in r["measure_updates"]
    assert r["numpy_int"] == 7
    assert r["before_fit"] == {"findings": [], "totals": {}, "skipped": 0, "history": [], "layers": []}


@backends
def test_dead_units_by_the_core_rule(backend):
    r = case(backend, "dead_units")
    dead = [f for f in r["findings"] if f["kind"] == "dead"]
    assert len(dead) == 1 and dead[0]["layers"] == ["hidden_1"], r["findings"]


@backends
def test_state_of_another_model_is_refused(backend):
    r = case(backend, "other_shapes")
    assert r["wider"] is not None and "hidden_0" in r["wider"] and "different model" in r["wider"]
    assert r["renamed"] is not None and "no layer in common" in r["renamed"]


@backends
def test_a_train_step_with_optimizers_of_its_own_is_said_not_silently_unwatched(backend):
    r = case(backend, "own_optimizers")
    if r.get("skipped"):
        pytest.skip("JAX's stateless train_step: the case is written for TensorFlow and torch")
    assert r["trained"]  # the model did learn, through its own optimizer
    assert len(r["warnings"]) == 1 and "4 batches" in r["warnings"][0]


@backends
def test_batch_ends_dispatched_to_worker_threads_change_nothing(backend):
    r = case(backend, "async_dispatch")
    pairs = [("async", "sync")] + ([("async_spe", "sync_spe")] if backend == "jax" else [])
    for a, s in pairs:
        run, ref = r[a], r[s]
        # Keras dispatches batch ends asynchronously only where its backend is thread-safe.
        assert run["on_worker"] == (backend != "tensorflow")
        assert not ref["on_worker"]
        for key in ("sink_steps", "sink_findings", "norms", "findings", "totals", "history", "iterations"):
            assert run[key] == ref[key], (a, key)
        assert set(kinds(run["findings"])) >= {"nonfinite", "vanishing"}
        assert run["totals"]["skipped"] == 3  # the NaN batch, once per epoch
        # Stopped in the third epoch after 7 batches (12 in executions of 4); every step up to
        # the stop is judged, the last in the epoch-end flush.
        steps = 16 + 16 + (12 if a == "async_spe" else 7)
        assert run["totals"]["steps"] == steps and run["iterations"] == steps - 3
        assert run["sink_steps"][-1] == steps - 1
        assert len(run["history"]["grad/norm/global"]) == 3
        # Reading totals on every batch end: on the fit's thread the pending steps are judged; on a
        # worker thread it reads what the last log step committed (the fit went on, unharmed).
        spe = 4 if a == "async_spe" else 1
        assert ref["seen"][:5] == [spe * k for k in range(1, 6)]
        assert len(run["seen"]) == len(ref["seen"])
        assert max(run["seen"]) <= steps
        assert [c for c, _ in ref["saved"][:3]] == [spe, 2 * spe, 3 * spe]
        assert max(c for c, _ in run["saved"]) <= steps
        assert all(whole for _, whole in run["saved"] + ref["saved"])  # never a half-committed log step
        # Loading a state from a worker thread mid-fit is refused, clearly.
        assert len(run["refused"]) == run["on_worker"] and all("fit's thread" in e for e in run["refused"])


@backends
def test_a_partial_last_execution_is_counted_as_the_steps_it_ran(backend):
    r = case(backend, "partial_execution")
    if r.get("skipped"):
        pytest.skip("Keras allows only steps_per_execution=1 on the torch backend")
    first, second = r["first"], r["second"]
    assert first["iterations"] == first["host_steps"] == first["totals_steps"] == 20  # not 24
    assert second["iterations"] == second["host_steps"] == second["totals_steps"] == 30
    # Executions end at steps 2, 5, 8, then 9 (partial): each one holding a report step reports
    # (the epoch end flushes the partial one); the second epoch's end on 12, 15, 18, 19.
    assert first["sink_steps"] == [2, 5, 8, 9, 12, 15, 18, 19]
    assert second["sink_steps"][len(first["sink_steps"]):] == [22, 25, 28, 29]
