"""Real ``model.fit`` runs for tests/test_keras.py, one backend per process.

The backend is fixed when Keras is imported, so test_keras.py runs this script once per backend
(``KERAS_BACKEND`` set, case names as arguments) and reads one JSON object per case from stdout,
each on a line starting with ``CASE ``. A case that raises reports its traceback instead.
The cases only measure; test_keras.py asserts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
import warnings

BACKEND = os.environ["KERAS_BACKEND"]
# test_keras.py runs the three backends side by side on a 2-core machine: one compute thread each.
if BACKEND == "jax":
    # Two logical CPU devices for keras.distribution; must be set before jax is imported.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                          "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
if BACKEND == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)  # the two replicas' all-reduce needs two
if BACKEND == "torch":
    import torch

    torch.set_num_threads(1)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradguard  # noqa: E402
from gradguard.keras import GradGuardCallback  # noqa: E402

N, BATCH = 512, 32  # 16 steps per epoch, every batch full (no retrace for a short last batch)


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x[:N] / 16.0).astype("float32"), y[:N].astype("int32")


def mlp(depth, act="relu", width=64, init="he_normal", seed=0, prefix="hidden"):
    keras.utils.set_random_seed(seed)
    if isinstance(init, float):
        init = keras.initializers.RandomNormal(stddev=init, seed=seed)
    layers = [keras.Input((64,))]
    layers += [keras.layers.Dense(width, activation=act, kernel_initializer=init, name=f"{prefix}_{i}")
               for i in range(depth)]
    layers.append(keras.layers.Dense(10, kernel_initializer=init if not isinstance(init, str) else "glorot_uniform",
                                     name="head"))
    return keras.Sequential(layers)


def compile_(model, optimizer, **kw):
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kw)
    return model


def np_loss(model, x, y):
    """Cross-entropy of a Dense-ReLU MLP, computed in numpy from its weights (no compiled
    test step to build just to read a loss)."""
    h = x.astype(np.float64)
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    for i, layer in enumerate(dense):
        kernel, bias = (np.asarray(w.numpy(), np.float64) for w in layer.weights)
        h = h @ kernel + bias
        if i < len(dense) - 1:
            h = np.maximum(h, 0.0)
    h = h - h.max(axis=1, keepdims=True)
    logp = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def weights(model):
    return [np.array(v.numpy()) for v in model.weights]


def opt_values(model):
    return [np.array(v.numpy()) for v in model.optimizer.variables if "gradguard" not in v.name]


def all_finite(arrays):
    return bool(all(np.isfinite(a).all() for a in arrays))


def findings(cb):
    return [{"kind": f.kind, "step": f.step, "layers": list(f.layers), "severity": f.severity,
             "cause": f.cause, "message": f.message, "remedies": list(f.remedies)} for f in cb.findings]


class Recorder(keras.callbacks.Callback):
    """Weights, optimizer values and logs around chosen batches (first epoch)."""

    def __init__(self, batches=(), keep_logs=False):
        super().__init__()
        self.batches = set(batches)
        self.keep_logs = keep_logs
        self.weights, self.opt, self.logs = {}, {}, []
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.keep_logs:
            self.logs.append({k: float(v) for k, v in (logs or {}).items()})
        if self.epoch == 0 and batch in self.batches:
            model = self.model
            self.weights[batch] = weights(model)
            self.opt[batch] = opt_values(model)


def plain(v):
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if np.isfinite(v) else str(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _history(h):
    return {k: [float(x) for x in v] for k, v in h.history.items()}


# ------------------------------------------------------------------------------------------- cases

class RecordingSink(gradguard.Sink):
    def __init__(self):
        self.steps, self.findings = [], []

    def log(self, record):
        self.steps.append(record.step)

    def finding(self, finding, new):
        self.findings.append((finding.kind, new))


class BrokenSink(gradguard.Sink):
    def log(self, record):
        raise RuntimeError("sink down")


def case_vanishing():
    """Deep sigmoid MLP; the callback also feeds a recording sink, a failing sink and a JSONL file."""
    x, y = digits()
    tmp = tempfile.mkdtemp()
    rec = RecordingSink()
    model = compile_(mlp(10, "sigmoid", width=32, init="glorot_uniform"), keras.optimizers.SGD(0.1))
    cb = GradGuardCallback(log_every_n_steps=10, sinks=[rec, BrokenSink(), tmp])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, shuffle=False, callbacks=[cb])
    cb.close()
    with open(os.path.join(tmp, "gradguard.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return {"findings": findings(cb), "layers": [l.name for l in cb.layers],
            "activations": [l.activation for l in cb.layers], "history": _history(h),
            "warned": sum(issubclass(w.category, gradguard.GradGuardWarning) for w in caught),
            "sink_steps": rec.steps, "sink_findings": rec.findings, "epochs_done": len(h.history["loss"]),
            "sink_warnings": sum("sink BrokenSink.log failed" in str(w.message) for w in caught),
            "jsonl_types": sorted({line["type"] for line in lines}), "jsonl_steps": len([l for l in lines if l["type"] == "step"])}


def case_exploding():
    x, y = digits()
    out = {}
    model = compile_(mlp(4, "relu", init=0.5), keras.optimizers.SGD(0.1))
    h = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, shuffle=False)
    out["plain_finite"] = all_finite(weights(model))
    out["plain_loss"] = _history(h)["loss"]
    model = compile_(mlp(4, "relu", init=0.5), keras.optimizers.SGD(0.1))
    cb = GradGuardCallback(clip="auto", log_every_n_steps=8)
    h = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, shuffle=False, callbacks=[cb])
    out.update(finite=all_finite(weights(model)), loss=_history(h)["loss"], findings=findings(cb),
               totals=cb.monitor.totals, clip_enabled_step=cb.monitor.clip_enabled_step,
               history=_history(h))
    return out


def _poisoned(row):
    x, y = digits()
    x = x.copy()
    x[row, 7] = np.inf
    return x, y


def case_inf_batch(jit_compile="auto", steps_per_execution=1, log_every=10, bad_batch=3, epochs=2):
    x, y = _poisoned(bad_batch * BATCH + 5)
    model = compile_(mlp(3, "relu"), keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit_compile,
                     steps_per_execution=steps_per_execution)
    x_clean, y_clean = digits()
    loss_before = np_loss(model, x_clean, y_clean)
    cb = GradGuardCallback(log_every_n_steps=log_every, logs="all")
    rec = Recorder(batches=range(16), keep_logs=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False, callbacks=[cb, rec])
    loss_after = np_loss(model, x_clean, y_clean)
    out = {"findings": findings(cb), "skipped": cb.skipped_steps, "totals": cb.monitor.totals,
           "finite": all_finite(weights(model)), "opt_finite": all_finite(opt_values(model)),
           "iterations": int(model.optimizer.iterations.numpy()), "steps": epochs * (N // BATCH),
           "loss_before": loss_before, "loss_after": loss_after, "history": _history(h),
           "warnings": [str(w.message)[:200] for w in caught if "gradguard" in str(w.message)
                        and not issubclass(w.category, gradguard.GradGuardWarning)],
           "log_keys": sorted({k for logs in rec.logs for k in logs}), "jit_compile": bool(model.jit_compile)}
    if steps_per_execution == 1:
        # Around the poisoned batch (executions of one step): the skipped step changed nothing.
        b = bad_batch
        out["skip_kept_weights"] = all(np.array_equal(p, q) for p, q in zip(rec.weights[b - 1], rec.weights[b]))
        out["skip_kept_slots"] = all(np.array_equal(p, q) for p, q in zip(rec.opt[b - 1], rec.opt[b]))
        out["next_step_moved"] = not all(np.array_equal(p, q) for p, q in zip(rec.weights[b], rec.weights[b + 1]))
    # Steps (not executions) after which batch logs carried gradguard's scalars.
    spe = steps_per_execution
    out["logged_at"] = [(i + 1) * spe for i, logs in enumerate(rec.logs) if "grad/norm/global" in logs]
    out["rms_logged_at"] = [(i + 1) * spe for i, logs in enumerate(rec.logs) if any(k.startswith("grad/rms/") for k in logs)]
    return out


def case_jit_compile():
    return case_inf_batch(jit_compile=True)


def case_steps_per_execution():
    # 16 steps per epoch in executions of 4; the poisoned batch sits inside the second execution;
    # log_every_n_steps=6 is rounded up to 8 with a warning.
    return case_inf_batch(steps_per_execution=4, log_every=6, bad_batch=5, epochs=1)


def case_healthy():
    """He-initialised ReLU net with Adam: no findings. Also: what CSVLogger and History receive,
    and how often the callback reads the device state (log steps and epoch ends only)."""
    from gradguard.keras import _graph

    x, y = digits()
    tmp = tempfile.mkdtemp()
    csv = os.path.join(tmp, "metrics.csv")
    reads = []
    original = _graph.ApplyHook.read

    def counting(self):
        reads.append(1)
        return original(self)

    _graph.ApplyHook.read = counting
    try:
        model = compile_(mlp(4, "relu"), keras.optimizers.Adam(1e-3))
        cb = GradGuardCallback(log_every_n_steps=20)
        h = model.fit(x, y, batch_size=BATCH, epochs=6, verbose=0, shuffle=False,
                      callbacks=[cb, keras.callbacks.CSVLogger(csv)])
    finally:
        _graph.ApplyHook.read = original
    with open(csv) as f:
        header = f.readline().strip().split(",")
        rows = [line.strip().split(",") for line in f]
    return {"findings": findings(cb), "loss": _history(h)["loss"], "totals": cb.monitor.totals,
            "history": _history(h), "csv_header": header, "csv_rows": rows, "reads": len(reads),
            "steps": 6 * N // BATCH, "epochs": 6, "log_every": 20}


def case_run_eagerly():
    """compile(run_eagerly=True): the hook runs eagerly, with the same measurements, skip and finding
    as in the compiled step."""
    x, y = digits()
    x = x.copy()
    x[5 * BATCH] = np.nan
    out = {}
    for eager in (False, True):
        model = compile_(mlp(3, "relu"), keras.optimizers.Adam(1e-3), run_eagerly=eager)
        cb = GradGuardCallback(log_every_n_steps=4)
        h = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        out["eager" if eager else "compiled"] = {
            "findings": [(f["kind"], f["step"]) for f in findings(cb)], "skipped": cb.skipped_steps,
            "finite": all_finite(weights(model)), "norm": h.history["grad/norm/global"]}
    return out


def case_lr_schedule():
    """SGD with a learning-rate schedule: the update ceiling of clip="auto" follows the schedule's
    current rate, read on log steps (a healthy run: no findings)."""
    from gradguard import clipping

    x, y = digits()
    sched = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=10, decay_rate=0.5)
    model = compile_(mlp(3, "relu"), keras.optimizers.SGD(sched, momentum=0.9))
    cb = GradGuardCallback(log_every_n_steps=10)
    gains = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            gains.append(cb.pipeline.optimizer_gain)

    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False, callbacks=[cb, Probe()])
    steps = 2 * (N // BATCH)
    expected = [clipping.sgd_gain(float(keras.ops.convert_to_numpy(sched(k))), 0.9) for k in range(steps + 1)]
    return {"gains": gains, "expected": expected, "findings": findings(cb), "steps": steps}


def case_switch_on():
    """A healthy run, clipping off; one batch scaled 1000x at step 12 is a spike: "auto" switches
    clipping on inside the compiled step, for that very step, with no retrace."""
    x, y = digits()
    x = x.copy()
    spike = 12
    x[spike * BATCH:(spike + 1) * BATCH] *= 1000.0
    lr = 0.01
    model = compile_(mlp(3, "relu"), keras.optimizers.SGD(lr))
    cb = GradGuardCallback(clip="auto", log_every_n_steps=1)
    rec = Recorder(batches=(spike - 1, spike), keep_logs=True)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb, rec])
    applied = float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(rec.weights[spike], rec.weights[spike - 1])))) / lr
    logs = rec.logs
    return {"raw_norms": [l.get("grad/norm/global") for l in logs], "applied_norm_at_spike": applied,
            "clip_enabled": [l.get("gradguard/clip_enabled") for l in logs],
            "threshold": [l.get("gradguard/clip_threshold") for l in logs],
            "clipped": [l.get("gradguard/clipped_steps") for l in logs], "spike": spike,
            "traces": cb.trace_count, "findings": findings(cb), "clip_enabled_step": cb.monitor.clip_enabled_step}


def case_clip_rules():
    """One SGD step on a net whose gradient norm is far above 1: the update is lr x the clip
    threshold. The optimizer's own global_clipnorm stays in charge (never clipped twice)."""
    x, y = digits()
    x, y = x[:BATCH], y[:BATCH]
    lr = 0.01
    out = {}
    for name, opt_kw, clip in [("ours", {}, 0.5), ("keras", {"global_clipnorm": 1.0}, 0.5),
                               ("keras_auto", {"global_clipnorm": 1.0}, "auto"), ("agc", {}, "agc")]:
        model = compile_(mlp(3, "relu", init=0.3), keras.optimizers.SGD(lr, **opt_kw))
        before = weights(model)
        cb = GradGuardCallback(clip=clip, log_every_n_steps=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        after = weights(model)
        hist = _history(h)
        if clip == "agc":
            # Unit-wise: every unit (a kernel's last axis; a bias element) moved at most
            # lr * 0.01 * max(|w_unit|, 1e-3).
            worst = 0.0
            for a, b in zip(after, before):
                axes = tuple(range(a.ndim - 1))
                step_norm = np.sqrt(np.sum((a - b) ** 2, axis=axes)) if axes else np.abs(a - b)
                w_norm = np.sqrt(np.sum(b ** 2, axis=axes)) if axes else np.abs(b)
                worst = max(worst, float(np.max(step_norm / lr / (0.01 * np.maximum(w_norm, 1e-3)))))
            out[name] = {"worst_unit_ratio": worst, "policy": cb.active_policy.name,
                         "raw_norm": _history(h)["grad/norm/global"][0],
                         "applied_norm": float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))) / lr}
            continue
        out[name] = {"applied_norm": float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))) / lr,
                     "raw_norm": hist["grad/norm/global"][0], "threshold": hist["gradguard/clip_threshold"][0],
                     "clipped": hist["gradguard/clipped_steps"][0], "policy": cb.active_policy.name,
                     "warnings": [str(w.message)[:160] for w in caught if "clips gradients itself" in str(w.message)]}
    # clip="auto" with SGD whose first update would dwarf the weights: held by the update ceiling,
    # |w| (1 - momentum) / lr, on the first step (no history yet)
    model = compile_(mlp(3, "relu", init=0.3), keras.optimizers.SGD(1.0, momentum=0.9))
    before = weights(model)
    cb = GradGuardCallback(clip="auto", log_every_n_steps=1, skip_nonfinite=False)
    h = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    after = weights(model)
    out["auto_ceiling"] = {"applied_norm": float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))),
                           "raw_norm": _history(h)["grad/norm/global"][0], "clipped": cb.totals["clipped"],
                           "ceiling": float(np.sqrt(sum(np.sum(b.astype(np.float64) ** 2) for b in before))) * 0.1}
    return out


def case_save_load():
    x, y = digits()
    tmp = tempfile.mkdtemp()
    model = compile_(mlp(3, "relu"), keras.optimizers.Adam(1e-3))
    ref = compile_(mlp(3, "relu"), keras.optimizers.Adam(1e-3))
    ref.optimizer.build(ref.trainable_variables)
    n_opt_plain = len(ref.optimizer.variables)
    cb = GradGuardCallback(log_every_n_steps=10)
    ckpt = keras.callbacks.ModelCheckpoint(os.path.join(tmp, "epoch{epoch}.keras"))
    opt_during = {}

    class Peek(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            opt_during[epoch] = len(self.model.optimizer.variables)

    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False, callbacks=[cb, ckpt, Peek()])
    final = os.path.join(tmp, "final.keras")
    model.save(final)
    out = {"n_opt_plain": n_opt_plain, "n_opt_during_fit": opt_during.get(0), "n_opt_after": len(model.optimizer.variables)}
    for name in ("epoch1.keras", "final.keras"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = keras.models.load_model(os.path.join(tmp, name))
        out[name] = {"warnings": [str(w.message)[:200] for w in caught if "Skipping variable loading" in str(w.message)],
                     "n_opt": len(loaded.optimizer.variables),
                     "iterations": int(loaded.optimizer.iterations.numpy())}
        if name == "final.keras":
            out[name]["same_predictions"] = bool(np.allclose(loaded.predict(x[:64], verbose=0),
                                                             model.predict(x[:64], verbose=0), atol=1e-6))
            out[name]["same_slots"] = all(np.allclose(a.numpy(), b.numpy()) for a, b in
                                          zip(loaded.optimizer.variables, model.optimizer.variables))
            # The loaded model trains on (with a new callback) from the restored optimizer state.
            cb2 = GradGuardCallback(log_every_n_steps=10)
            loaded.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb2])
            out[name]["resumed_iterations"] = int(loaded.optimizer.iterations.numpy())
            out[name]["resumed_finite"] = all_finite(weights(loaded))
    return out


def case_state_roundtrip():
    """Two fits with a state_dict/load_state_dict hand-over (through JSON) end where one fit does."""
    x, y = digits()

    def run(split):
        model = compile_(mlp(4, "relu", init=0.3), keras.optimizers.SGD(0.05))
        cb = GradGuardCallback(log_every_n_steps=10)
        if not split:
            model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
            return cb
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        state = json.loads(json.dumps(cb.state_dict()))
        cb2 = GradGuardCallback(log_every_n_steps=10)
        cb2.load_state_dict(state)
        model.fit(x, y, batch_size=BATCH, epochs=2, initial_epoch=1, verbose=0, shuffle=False, callbacks=[cb2])
        return cb2

    a, b = run(False), run(True)
    sa, sb = a.state_dict(), b.state_dict()
    return {"findings_a": findings(a), "findings_b": findings(b), "totals_a": a.monitor.totals,
            "totals_b": b.monitor.totals, "step_a": sa["step_count"], "step_b": sb["step_count"],
            "tracker_a": [sa["device_state"][k] for k in ("trk_count", "trk_mean", "trk_var", "clip_enabled")],
            "tracker_b": [sb["device_state"][k] for k in ("trk_count", "trk_mean", "trk_var", "clip_enabled")]}


def case_bad_args():
    out = {}
    for kw in ({"log_every_n_steps": 0}, {"log_every_n_steps": -5}, {"clip": "sometimes"}, {"clip": -1.0},
               {"clip": [1]}, {"skip_nonfinite": "yes"}, {"logs": "everything"}, {"max_logged_layers": 1},
               {"sinks": 3}):
        try:
            GradGuardCallback(**kw)
            out[repr(kw)] = None
        except (TypeError, ValueError) as exc:
            out[repr(kw)] = f"{type(exc).__name__}: {exc}"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    try:
        model.fit(np.zeros((8, 4), "float32"), np.zeros((8, 2), "float32"), verbose=0,
                  callbacks=[GradGuardCallback()])
        out["not compiled"] = None
    except (TypeError, ValueError, RuntimeError) as exc:
        out["not compiled"] = f"{type(exc).__name__}: {exc}"
    return out


def _distributed_fit(distributed, x, y, log_every=1):
    if distributed and BACKEND == "tensorflow":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = compile_(mlp(3, "relu", init=0.2), keras.optimizers.SGD(0.05, momentum=0.9))
    elif distributed and BACKEND == "jax":
        dist = keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")[:2])
        with dist.scope():
            model = compile_(mlp(3, "relu", init=0.2), keras.optimizers.SGD(0.05, momentum=0.9))
            cb = GradGuardCallback(log_every_n_steps=log_every)
            h = model.fit(x, y, batch_size=2 * BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        return model, cb, h, dist
    else:
        model = compile_(mlp(3, "relu", init=0.2), keras.optimizers.SGD(0.05, momentum=0.9))
        strategy = None
    cb = GradGuardCallback(log_every_n_steps=log_every)
    h = model.fit(x, y, batch_size=2 * BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    return model, cb, h, strategy


def case_distributed():
    """The gradients gradguard sees under data parallelism are the aggregated ones: the first
    step's norms equal a single-device run's on the same global batch; a NaN on one replica's
    half of a batch skips the step on every replica."""
    x, y = digits()
    x, y = x[:4 * BATCH], y[:4 * BATCH]  # 2 global batches of 64
    ref_model, ref_cb, ref_h, _ = _distributed_fit(False, x, y)
    model, cb, h, strategy = _distributed_fit(True, x, y)
    out = {"replicas": (strategy.num_replicas_in_sync if BACKEND == "tensorflow"
                        else len(strategy.device_mesh.devices.reshape(-1)))}
    out["ref_norms"] = _history(ref_h)
    out["dist_norms"] = _history(h)
    out["same_weights"] = all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(weights(ref_model), weights(model)))
    # Poison one sample in the second half of the second global batch (replica 1's share).
    xp = x.copy()
    xp[2 * BATCH + BATCH + 3, 5] = np.nan
    model, cb, h, strategy = _distributed_fit(True, xp, y, log_every=10)
    out["poisoned"] = {"skipped": cb.skipped_steps, "finite": all_finite(weights(model)),
                       "opt_finite": all_finite(opt_values(model)), "findings": findings(cb),
                       "iterations": int(model.optimizer.iterations.numpy())}
    if BACKEND == "tensorflow":
        replicas_equal = True
        for v in model.weights:
            parts = [np.array(p) for p in strategy.experimental_local_results(v.value)]
            replicas_equal &= all(np.array_equal(parts[0], p) for p in parts[1:])
        out["poisoned"]["replicas_equal"] = bool(replicas_equal) and len(parts) == 2
    return out


def case_loss_scale():
    """mixed_float16 with a LossScaleOptimizer: the loss scaler's own overflow skips are its
    business, gradguard measures the unscaled gradients of the steps it applies."""
    x, y = digits()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = compile_(mlp(3, "relu"), keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3)))
        cb = GradGuardCallback(log_every_n_steps=10)
        h = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return {"findings": findings(cb), "finite": all_finite(weights(model)), "history": _history(h),
            "steps": cb.monitor.totals["steps"]}


def case_subclassed():
    """A subclassed model that is not built before fit (on TF it is built by the first trace of the
    train step, so the callback configures itself inside that trace)."""

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.first = keras.layers.Dense(32, activation="relu", name="first")
            self.second = keras.layers.Dense(10, name="second")

        def call(self, x):
            return self.second(self.first(x))

    x, y = _poisoned(2 * BATCH + 1)
    keras.utils.set_random_seed(0)
    model = compile_(Net(), keras.optimizers.SGD(0.05, momentum=0.9))
    built_before = bool(model.built)
    cb = GradGuardCallback(log_every_n_steps=5)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    return {"built_before": built_before, "layers": [l.name for l in cb.layers], "skipped": cb.skipped_steps,
            "finite": all_finite(weights(model)), "findings": findings(cb), "traces": cb.trace_count}


def case_wandb():
    """W&B offline: Keras' WandbMetricsLogger (after GradGuardCallback) logs gradguard's scalars from
    ``logs``; gradguard.wandb.WandbSink (scalars off) adds histograms, the heatmap and the alert."""
    tmp = tempfile.mkdtemp()
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=tmp, WANDB_SILENT="true", WANDB_CONSOLE="off")
    import wandb
    from wandb.integration.keras import WandbMetricsLogger

    from gradguard.wandb import WandbSink
    from wandb_offline import read_run

    x, y = digits()
    run = wandb.init(project="gradguard-keras", dir=tmp, mode="offline")
    try:
        model = compile_(mlp(10, "sigmoid", width=32, init="glorot_uniform"), keras.optimizers.SGD(0.1))
        cb = GradGuardCallback(log_every_n_steps=10, sinks=[WandbSink(scalars=False)])
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False,
                  callbacks=[cb, WandbMetricsLogger(log_freq=10)])
        cb.close()
    finally:
        run.finish()
    logged = read_run(tmp)
    keys = sorted({k for row in logged.history for k in row})
    hist = logged.values("grad/hist/hidden_0")
    return {"keys": keys, "histograms": len(hist), "hist_sample": str(hist[0])[:300] if hist else None,
            "alerts": [a["title"] for a in logged.alerts], "summary_keys": sorted(logged.summary),
            "findings": findings(cb)}



# ----------------------------------------------------------------------- everyday workflows (issue 8, 13)

def _applied_norm(after, before, lr):
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))) / lr


def case_accumulation():
    """gradient_accumulation_steps=4: measured, clipped and skipped once per optimizer step, on
    the accumulated gradients."""
    x, y = digits()
    lr, k = 0.01, 4
    out = {}
    # (a) a fixed clip: each applied update is lr x 0.5 (the accumulated norm is far above it).
    model = compile_(mlp(3, "relu", init=0.3), keras.optimizers.SGD(lr, gradient_accumulation_steps=k))
    cb = GradGuardCallback(clip=0.5, log_every_n_steps=1, logs="all")
    rec = Recorder(batches=range(8), keep_logs=True)
    before = weights(model)
    model.fit(x[:8 * BATCH], y[:8 * BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb, rec])
    out["clip"] = {
        "steps": cb.totals["steps"], "iterations": int(np.asarray(model.optimizer.iterations)),
        "still_during_window": all(np.array_equal(a, b) for i in (0, 1, 2) for a, b in zip(rec.weights[i], before)),
        "applied_first": _applied_norm(rec.weights[3], before, lr),
        "applied_second": _applied_norm(rec.weights[7], rec.weights[3], lr),
        "raw_norms": [l.get("grad/norm/global") for l in rec.logs],
        "clipped": cb.totals["clipped"], "policy": cb.active_policy.name}
    # (b) AGC on the accumulated gradient: no unit moved more than 1% of its weight norm (x lr).
    model = compile_(mlp(3, "relu", init=0.3), keras.optimizers.SGD(lr, gradient_accumulation_steps=k))
    before = weights(model)
    rec = Recorder(batches=(3,))
    model.fit(x[:4 * BATCH], y[:4 * BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False,
              callbacks=[GradGuardCallback(clip="agc", log_every_n_steps=1), rec])
    worst = 0.0
    for a, b in zip(rec.weights[3], before):
        axes = tuple(range(a.ndim - 1))
        step_norm = np.sqrt(np.sum((a - b) ** 2, axis=axes)) if axes else np.abs(a - b)
        w_norm = np.sqrt(np.sum(b ** 2, axis=axes)) if axes else np.abs(b)
        worst = max(worst, float(np.max(step_norm / lr / (0.01 * np.maximum(w_norm, 1e-3)))))
    out["agc"] = {"worst_unit_ratio": worst, "moved": _applied_norm(rec.weights[3], before, lr)}
    # (c) a NaN in one micro-batch of the second window: that optimizer step is skipped.
    xp = x.copy()
    xp[5 * BATCH + 2, 3] = np.nan
    model = compile_(mlp(3, "relu"), keras.optimizers.SGD(0.05, momentum=0.9, gradient_accumulation_steps=k))
    cb = GradGuardCallback(log_every_n_steps=2)
    rec = Recorder(batches=range(16))
    model.fit(xp, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb, rec])
    out["skip"] = {
        "steps": cb.totals["steps"], "skipped": cb.skipped_steps, "findings": findings(cb),
        "iterations": int(np.asarray(model.optimizer.iterations)), "finite": all_finite(weights(model)),
        "opt_finite": all_finite(opt_values(model)),
        "skip_kept_weights": all(np.array_equal(a, b) for a, b in zip(rec.weights[7], rec.weights[3])),
        "next_moved": not all(np.array_equal(a, b) for a, b in zip(rec.weights[11], rec.weights[7]))}
    return out


def case_other_shapes():
    """A state dict from a model with the same layer names but other shapes is refused at fit
    start, naming the layer; one with no layer in common too."""
    x, y = digits()
    model = compile_(mlp(2, "relu"), keras.optimizers.SGD(0.05))
    cb = GradGuardCallback(log_every_n_steps=5)
    model.fit(x[:4 * BATCH], y[:4 * BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    state = json.loads(json.dumps(cb.state_dict()))
    out = {}
    renamed = keras.Sequential([keras.Input((64,))] + [keras.layers.Dense(10, name=f"x{i}") for i in range(2)])
    for name, other in (("wider", mlp(2, "relu", width=32)), ("renamed", renamed)):
        compile_(other, keras.optimizers.SGD(0.05))
        cb2 = GradGuardCallback(log_every_n_steps=5)
        cb2.load_state_dict(state)
        try:
            other.fit(x[:2 * BATCH], y[:2 * BATCH], batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb2])
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def case_fine_tune():
    """Freeze part, fit, unfreeze, fit again with the same callback: layers that stay keep their
    state, new ones start fresh, findings and totals stay."""
    # The first layer stays trainable, so the poisoned input reaches a gradient directly: behind
    # frozen layers TensorFlow's oneDNN fused MatMul+ReLU (on CPUs that have it) can turn a non-finite
    # input into finite activations, and then there is nothing to skip.
    x, y = _poisoned(2 * BATCH + 1)
    model = mlp(3, "relu")
    for layer in model.layers[1:3]:
        layer.trainable = False
    compile_(model, keras.optimizers.SGD(0.05, momentum=0.9))
    cb = GradGuardCallback(log_every_n_steps=5)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    first = {"layers": [l.name for l in cb.layers], "steps": cb.totals["steps"],
             "trk_count": cb.state_dict()["device_state"]["trk_count"]}
    for layer in model.layers:
        layer.trainable = True
    compile_(model, keras.optimizers.SGD(0.05, momentum=0.9))
    x_clean, _ = digits()
    model.fit(x_clean, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    state = cb.state_dict()
    return {"first": first, "layers": [l.name for l in cb.layers], "steps": cb.totals["steps"],
            "skipped": cb.skipped_steps, "findings": findings(cb), "trk_count": state["device_state"]["trk_count"],
            "finite": all_finite(weights(model)), "history_width": len(cb.history[-1][1])}



def case_own_optimizers():
    """A custom train_step that applies its gradients through an optimizer of its own (as a GAN's
    does) never reaches the callback's hook: the fit must say so, not report a quiet run.
    (TensorFlow and torch; JAX's train_step is stateless and written differently.)"""
    if BACKEND == "jax":
        return {"skipped": True}
    x, y = digits()

    class OwnOptimizer(keras.Sequential):
        def train_step(self, data):
            xb, yb = data
            if BACKEND == "tensorflow":
                with tf.GradientTape() as tape:
                    loss = self.compute_loss(x=xb, y=yb, y_pred=self(xb, training=True))
                grads = tape.gradient(loss, self.trainable_variables)
            else:
                self.zero_grad()
                loss = self.compute_loss(x=xb, y=yb, y_pred=self(xb, training=True))
                loss.backward()
                grads = [v.value.grad for v in self.trainable_variables]
            self.own_optimizer.apply(grads, self.trainable_variables)
            return {"loss": loss}

    model = OwnOptimizer([keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
    model.own_optimizer = keras.optimizers.SGD(0.05)
    compile_(model, keras.optimizers.SGD(0.05))
    before = [np.array(w) for w in model.get_weights()]
    cb = GradGuardCallback(log_every_n_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x[:4 * BATCH], y[:4 * BATCH], batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    return {"trained": any(not np.array_equal(a, np.array(b)) for a, b in zip(before, model.get_weights())),
            "warnings": [str(w.message)[:200] for w in caught if "measured no optimizer step" in str(w.message)]}

def case_other_model():
    """The same callback on another model starts fresh (with a warning), never judging it by the
    first model's EMA or reporting its totals."""
    x, y = _poisoned(2 * BATCH + 1)
    cb = GradGuardCallback(log_every_n_steps=5)
    a = compile_(mlp(3, "relu"), keras.optimizers.SGD(0.05))
    a.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    first = {"findings": findings(cb), "steps": cb.totals["steps"]}
    b = compile_(mlp(2, "relu", prefix="other"), keras.optimizers.SGD(0.05))
    x_clean, _ = digits()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b.fit(x_clean[:4 * BATCH], y[:4 * BATCH], batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    return {"first": first, "findings": findings(cb), "steps": cb.totals["steps"],
            "layers": [l.name for l in cb.layers],
            "warnings": [str(w.message)[:200] for w in caught if "starts fresh" in str(w.message)]}


def case_pure_look():
    """Reading findings/totals/skipped_steps on every batch changes nothing: the same records
    reach the sinks and the same findings come out as in a run nobody peeks at."""
    x, y = _poisoned(3 * BATCH + 1)

    def run(peek):
        rec = RecordingSink()
        model = compile_(mlp(10, "sigmoid", width=32, init="glorot_uniform"), keras.optimizers.SGD(0.1))
        cb = GradGuardCallback(log_every_n_steps=10, sinks=[rec])
        seen = []

        class Peek(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                seen.append((len(cb.findings), cb.totals.get("steps", 0), cb.skipped_steps))

        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False,
                  callbacks=[cb] + ([Peek()] if peek else []))
        return {"sink_steps": rec.steps, "sink_findings": rec.findings, "findings": findings(cb),
                "totals": cb.totals, "seen": seen}

    return {"plain": run(False), "peeked": run(True)}


def case_async_dispatch():
    """Keras runs batch ends on worker threads when every callback is ``async_safe`` (JAX, torch):
    the same records, findings, totals and epoch logs as a fit whose batch ends run in order on
    the fit's thread (forced by a batch callback that is not async-safe). A NaN batch, a
    vanishing net and a stop in the middle of the last epoch; on JAX also steps_per_execution.
    The spy reads ``totals`` and ``state_dict()`` at every batch end, on a worker thread in the
    asynchronous fit."""
    import threading

    x, y = _poisoned(3 * BATCH + 1)

    def run(async_ok, spe=1):
        rec = RecordingSink()
        norms = []

        class Norms(gradguard.Sink):
            def log(self, record):
                norms.append(record.scalars["grad/norm/global"])

        model = compile_(mlp(10, "sigmoid", width=32, init="glorot_uniform"), keras.optimizers.SGD(0.1),
                         steps_per_execution=spe)
        cb = GradGuardCallback(log_every_n_steps=8, sinks=[rec, Norms()])
        on_worker, seen, saved, refused = [], [], [], []

        class Spy(keras.callbacks.Callback):
            async_safe = async_ok

            def on_train_batch_end(self, batch, logs=None):
                on_worker.append(threading.get_ident() != threading.main_thread().ident)
                seen.append(cb.totals.get("steps", 0))  # on a worker: the last log step's (JAX donates the state)
                st = cb.state_dict()
                if st:  # a whole log step's state: its totals and open window add up to its step count
                    whole = st["monitor"]["totals"]["steps"] + float(st["device_state"]["acc_steps"])
                    saved.append((st["step_count"], whole == st["step_count"] == st["host_steps"]))
                    if on_worker[-1] and not refused:
                        try:
                            cb.load_state_dict(st)
                        except RuntimeError as e:
                            refused.append(str(e))

        class StopMidEpoch(keras.callbacks.Callback):  # a batch-begin hook keeps dispatch asynchronous
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_begin(self, batch, logs=None):
                if self.epoch == 2 and batch >= 6:
                    self.model.stop_training = True

        h = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, shuffle=False,
                      callbacks=[cb, Spy(), StopMidEpoch()])
        return {"on_worker": any(on_worker), "on_fit_thread": not all(on_worker), "sink_steps": rec.steps,
                "sink_findings": rec.findings, "norms": norms, "findings": findings(cb), "totals": cb.totals,
                "history": {k: v for k, v in _history(h).items() if k.startswith(("grad", "gradguard"))},
                "iterations": int(model.optimizer.iterations.numpy()), "seen": seen,
                "saved": saved, "refused": refused}

    out = {"async": run(True), "sync": run(False)}
    if BACKEND == "jax":
        out["async_spe"], out["sync_spe"] = run(True, spe=4), run(False, spe=4)
    return out


def case_partial_execution():
    """steps_per_execution=3 over 10 batches an epoch: the last execution of each epoch is partial,
    and Keras still names its end as batch 11. Steps are counted as the optimizer took them, across
    epochs and into a second fit; every execution holding a report step reports."""
    if BACKEND == "torch":
        return {"skipped": True}  # Keras allows only steps_per_execution=1 on the torch backend
    x, y = digits()
    x, y = x[:10 * BATCH], y[:10 * BATCH]
    rec = RecordingSink()
    model = compile_(mlp(3, "relu"), keras.optimizers.SGD(0.05), steps_per_execution=3)
    cb = GradGuardCallback(log_every_n_steps=3, sinks=[rec])
    out = {}
    for fit in ("first", "second"):
        model.fit(x, y, batch_size=BATCH, epochs=2 if fit == "first" else 1, verbose=0, shuffle=False, callbacks=[cb])
        out[fit] = {"iterations": int(model.optimizer.iterations.numpy()), "host_steps": cb.state_dict()["host_steps"],
                    "totals_steps": cb.totals["steps"], "sink_steps": list(rec.steps)}
    return out


def case_clip_change():
    """state_dict saved under clip="auto", resumed under another clip=: tracker, findings and
    totals carry, the new policy starts fresh, with a warning naming both."""
    x, y = _poisoned(2 * BATCH + 1)
    model = compile_(mlp(3, "relu"), keras.optimizers.SGD(0.05, momentum=0.9))
    cb = GradGuardCallback(log_every_n_steps=5)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    state = json.loads(json.dumps(cb.state_dict()))
    out = {}
    x_clean, _ = digits()
    for clip in ("zscore", 0.5, "percentile"):
        cb2 = GradGuardCallback(clip=clip, log_every_n_steps=5)
        cb2.load_state_dict(state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x_clean, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb2])
        out[str(clip)] = {"steps": cb2.totals["steps"], "skipped": cb2.skipped_steps, "findings": findings(cb2),
                          "policy": cb2.active_policy.name, "finite": all_finite(weights(model)),
                          "warnings": [str(w.message)[:200] for w in caught if "clip policy" in str(w.message)]}
    return out


def case_policies():
    """zscore and percentile through Keras: a 1000x batch after ZClip's 25-step warm-up is
    clipped; AutoClip's 10th percentile clips most steps."""
    x, y = digits()
    x3, y3 = np.concatenate([x, x, x]), np.concatenate([y, y, y])  # 48 steps
    spike = 40
    out = {}
    for clip in ("zscore", "percentile"):
        xs = x3.copy()
        if clip == "zscore":
            xs[spike * BATCH:(spike + 1) * BATCH] *= 1000.0
        model = compile_(mlp(3, "relu"), keras.optimizers.SGD(0.01))
        cb = GradGuardCallback(clip=clip, log_every_n_steps=8)
        h = model.fit(xs, y3, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        out[clip] = {"policy": cb.active_policy.name, "totals": cb.totals, "finite": all_finite(weights(model)),
                     "loss": _history(h)["loss"]}
    return out


def case_device_step_ops():
    """The core's per-step math under this backend's array namespace against numpy's reference, on
    norms with a spike, an overflow and a layer without gradient (one rule, written once)."""
    from gradguard import clipping, stats
    from gradguard.keras import keras_ops as xp  # (Keras' torch backend runs the step on torch_ops, tested in torch)
    from gradguard.ops import numpy_ops

    rng = np.random.default_rng(0)
    n_layers = 4
    norms = np.exp(rng.normal(0, 0.2, size=(30, n_layers))).astype(np.float32)
    norms[12] *= 300  # a spike
    norms[13, 1] = np.nan  # an overflow right after it
    norms[20:23] *= 50
    has = np.ones(n_layers, np.float32)
    has[2] = 0.0
    worst = {}
    for name, policy, ceiling in (("auto", clipping.auto(), None), ("auto_ceiling", clipping.auto(), 2.1),
                                  ("zscore", clipping.zscore(warmup_steps=3), None),
                                  ("percentile", clipping.percentile(history=8), None),
                                  ("fixed", clipping.fixed(2.0), None)):
        s_np = stats.init_state(n_layers, policy)
        if ceiling is not None:  # the host-written update ceiling (binds on about half the steps)
            s_np[stats.ceiling_key(policy)] = np.float32(ceiling)
        s_k = {k: keras.ops.convert_to_tensor(v) for k, v in s_np.items()}
        scale_diff = 0.0
        for row in norms:
            sq = (row ** 2).astype(np.float32)
            scale_n, fin_n, s_np = stats.device_step(s_np, sq, has, policy, numpy_ops)
            scale_k, fin_k, s_k = stats.device_step(s_k, keras.ops.convert_to_tensor(sq),
                                                    keras.ops.convert_to_tensor(has), policy, xp)
            scale_diff = max(scale_diff, abs(float(keras.ops.convert_to_numpy(scale_k)) - float(scale_n)) / float(scale_n))
            assert float(keras.ops.convert_to_numpy(fin_k)) == float(fin_n)
        state_diff = 0.0
        for k, v in s_np.items():
            a, b = np.asarray(keras.ops.convert_to_numpy(s_k[k]), np.float64), np.asarray(v, np.float64)
            both = np.isfinite(a) & np.isfinite(b)
            assert (np.isfinite(a) == np.isfinite(b)).all(), k
            state_diff = max(state_diff, float(np.max(np.abs(a[both] - b[both]) / (np.abs(b[both]) + 1e-6), initial=0.0)))
        worst[name] = {"scale": scale_diff, "state": state_diff}
    return worst


def case_bn_skip():
    """A NaN batch through BatchNormalization: the skipped step leaves the moving statistics as
    they were, so inference stays finite; healthy steps still update them."""
    x, y = _poisoned(3 * BATCH + 5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, name="dense"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
                              keras.layers.Dense(10, name="head")])
    compile_(model, keras.optimizers.SGD(0.05, momentum=0.9))
    bn = model.get_layer("bn")
    stats_before = [np.array(v.numpy()) for v in (bn.moving_mean, bn.moving_variance)]
    cb = GradGuardCallback(log_every_n_steps=5)
    rec = Recorder(batches=range(6))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb, rec])
    x_clean, _ = digits()
    pred = model.predict(x_clean[:64], verbose=0)
    stats_after = [np.array(v.numpy()) for v in (bn.moving_mean, bn.moving_variance)]
    return {"skipped": cb.skipped_steps, "findings": findings(cb),
            "weights_finite": all_finite(model.get_weights()), "predict_finite": bool(np.isfinite(pred).all()),
            "skip_kept_all": all(np.array_equal(a, b) for a, b in zip(rec.weights[2], rec.weights[3])),
            "stats_moved": not all(np.allclose(a, b) for a, b in zip(stats_before, stats_after))}


def case_lstm_names():
    """Findings and logged keys name the recurrent layer the user built, not its cell."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(64, 8)).astype("int32")
    y = (x[:, 0] > 10).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,), dtype="int32"), keras.layers.Embedding(20, 8, name="embedding"),
                              keras.layers.LSTM(8, name="lstm"), keras.layers.Dense(2, name="head")])
    compile_(model, keras.optimizers.Adam(1e-2))
    cb = GradGuardCallback(log_every_n_steps=2, logs="all")
    h = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    return {"layers": [l.name for l in cb.layers], "keys": sorted(k for k in h.history if k.startswith("grad/norm/"))}


def case_surface():
    """One surface: unknown options raise naming them; results and close() exist."""
    out = {}
    try:
        GradGuardCallback(colour="red")
        out["unknown"] = None
    except TypeError as exc:
        out["unknown"] = str(exc)
    try:
        GradGuardCallback(log_every_n_steps=np.int64(7), measure_updates="no")
        out["measure_updates"] = None
    except TypeError as exc:
        out["measure_updates"] = str(exc)
    cb = GradGuardCallback(log_every_n_steps=np.int64(7))
    out["numpy_int"] = cb.log_every_n_steps
    out["before_fit"] = {"findings": cb.findings, "totals": cb.totals, "skipped": cb.skipped_steps,
                         "history": cb.history, "layers": cb.layers}
    cb.close()
    return out


def case_dead_units():
    """Three quarters of hidden_1's ReLU units switched off for every input (bias -50): their
    kernel columns get exactly zero gradient, the core's DEAD_UNIT_RULE, on every backend."""
    x, y = digits()
    model = compile_(mlp(3, "relu"), keras.optimizers.SGD(0.01))
    layer = model.get_layer("hidden_1")
    bias = np.array(layer.bias.numpy())
    bias[: 3 * len(bias) // 4] = -50.0
    layer.bias.assign(bias)
    cb = GradGuardCallback(log_every_n_steps=4)
    # 64 steps: death is judged over at least DetectorConfig.dead_min_steps (50) optimizer steps
    model.fit(x, y, batch_size=BATCH, epochs=4, verbose=0, shuffle=False, callbacks=[cb])
    return {"findings": findings(cb)}

CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main(names):
    warnings.filterwarnings("ignore", category=gradguard.GradGuardWarning)
    for name in names:
        started = time.perf_counter()
        try:
            result = {"ok": True, "result": CASES[name]()}
        except Exception:
            result = {"ok": False, "error": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - started, 2)
        result["case"] = name
        print("CASE " + json.dumps(plain(result)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
