"""Overhead of GradGuardCallback over a plain ``model.fit``, on the TensorFlow, JAX and torch backends.

    python benchmarks/keras_overhead.py                 # all three backends, one after the other
    python benchmarks/keras_overhead.py --backends jax --reps 7
    python benchmarks/keras_overhead.py --quick         # a smoke run: 2 repetitions of 3 short epochs

Each backend runs in its own process (Keras fixes the backend at import). Inside it the
configurations are measured side by side, interleaved: for each repetition, one ``fit`` of
every configuration in turn, on its own copy of the same model. A ``fit`` runs ``--epochs``
epochs of ``--steps`` steps; its first epoch (which holds the hook's one trace/compile per
``fit``) is reported apart. Steady state: per-step time of the later epochs, as the fastest
epoch, the median epoch, and the median of paired ratios (each epoch against the same epoch of
the same repetition of ``plain``, run seconds apart, which cancels slow drifts of the load of a
shared machine). Wall clock and process CPU time are both reported.

Configurations:
  plain            model.fit, no callback
  keras_clipnorm   model.fit with Adam(global_clipnorm=1e6): Keras' own global-norm pass and scale
                   (never clips here), the reference for "one read of the gradients"
  noop_batch_cb    a callback with an empty on_train_batch_end (on JAX and torch this alone turns
                   Keras' asynchronous callback dispatch off; GradGuardCallback is async_safe and
                   keeps it on)
  gradguard        GradGuardCallback() at its defaults (clip="auto", log every 50 steps,
                   skip non-finite steps)
  monitor_only     GradGuardCallback(clip=None, skip_nonfinite=False)
  with --parts, also (what the gate and the clipping each add):
  no_skip          GradGuardCallback(skip_nonfinite=False)
  no_clip          GradGuardCallback(clip=None)

Target: gradguard within 3% of plain at the default logging interval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = ("plain", "keras_clipnorm", "noop_batch_cb", "gradguard", "monitor_only")
PARTS = ("no_skip", "no_clip")


def configs(args) -> tuple[str, ...]:
    return CONFIGS + PARTS if args.parts else CONFIGS


def limit_threads(backend: str, threads: int) -> None:
    """Pin the framework to a few threads: on a small shared machine this makes step times far
    steadier, and the ratio is what is measured."""
    if threads <= 0:
        return
    if backend == "tensorflow":
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif backend == "torch":
        import torch
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)


def run_backend(args) -> dict:
    backend = os.environ["KERAS_BACKEND"]
    if backend == "jax" and args.threads > 0:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
    limit_threads(backend, args.threads)
    import keras
    import numpy as np

    from gradguard.keras import GradGuardCallback

    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    shape = (args.features,) if args.model == "mlp" else (32, 32, 3)
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = rng.integers(0, 10, size=(n,)).astype("int32")

    def build(clipnorm=None):
        keras.utils.set_random_seed(0)
        layers = [keras.Input(shape)]
        if args.model == "mlp":
            layers += [keras.layers.Dense(args.width, activation="relu") for _ in range(args.depth)]
        else:  # a small CNN: far more compute per parameter than the MLP
            for filters in (32, 64, 64):
                layers += [keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
                           keras.layers.MaxPooling2D()]
            layers += [keras.layers.Flatten(), keras.layers.Dense(128, activation="relu")]
        layers.append(keras.layers.Dense(10))
        model = keras.Sequential(layers)
        model.compile(keras.optimizers.Adam(1e-4, global_clipnorm=clipnorm),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self._sync()
            self._t = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, epoch, logs=None):
            self._sync()
            self.times.append((time.perf_counter() - self._t[0], time.process_time() - self._t[1]))

        def _sync(self):
            # JAX dispatches asynchronously: wait for the epoch's work before reading the clock.
            np.asarray(self.model.trainable_variables[0].numpy())

    class NoopBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            pass

    def callbacks(config):
        if config == "noop_batch_cb":
            return [NoopBatch()]
        if config == "gradguard":
            return [GradGuardCallback()]
        if config == "monitor_only":
            return [GradGuardCallback(clip=None, skip_nonfinite=False)]
        if config == "no_skip":
            return [GradGuardCallback(skip_nonfinite=False)]
        if config == "no_clip":
            return [GradGuardCallback(clip=None)]
        return []

    names = configs(args)
    models = {c: build(1e6 if c == "keras_clipnorm" else None) for c in names}
    steady = {c: [] for c in names}  # (wall, cpu) seconds per step
    first = {c: [] for c in names}
    # Warm-up: the first fit of each model compiles its step.
    for c in names:
        models[c].fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False, callbacks=callbacks(c))
    for _ in range(args.reps):
        for c in names:
            timer = EpochTimer()
            models[c].fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0, shuffle=False,
                          callbacks=callbacks(c) + [timer])
            first[c].append(timer.times[0][0] / args.steps)
            steady[c].extend((w / args.steps, p / args.steps) for w, p in timer.times[1:])
    params = int(sum(np.prod(v.shape) for v in models["plain"].trainable_variables))
    return {
        "backend": keras.backend.backend(),
        "params": params,
        "wall_median_ms": {c: 1e3 * statistics.median(w for w, _ in v) for c, v in steady.items()},
        "wall_min_ms": {c: 1e3 * min(w for w, _ in v) for c, v in steady.items()},
        "cpu_median_ms": {c: 1e3 * statistics.median(p for _, p in v) for c, v in steady.items()},
        "cpu_min_ms": {c: 1e3 * min(p for _, p in v) for c, v in steady.items()},
        "paired_ratio": {c: statistics.median(a[0] / b[0] for a, b in zip(v, steady["plain"]))
                         for c, v in steady.items()},
        # Against a fit that already has a per-batch callback of the user's: on JAX and torch one
        # that is not async_safe turns Keras' asynchronous callback dispatch off.
        "paired_ratio_vs_noop_cb": {c: statistics.median(a[0] / b[0] for a, b in zip(v, steady["noop_batch_cb"]))
                                    for c, v in steady.items()},
        "first_epoch_ms": {c: 1e3 * statistics.median(v) for c, v in first.items()},
        "samples": {c: len(v) for c, v in steady.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit; the first is reported apart")
    parser.add_argument("--steps", type=int, default=50, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                        help="mlp: Dense stack (the worst case: least compute per gradient element); "
                             "cnn: 3 conv layers on 32x32x3 inputs and a Dense head")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="framework threads (0: its default)")
    parser.add_argument("--json", default="", help="also write the raw results here")
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 3 epochs of 20 steps")
    parser.add_argument("--parts", action="store_true", help="also GradGuardCallback without the non-finite gate "
                        "and without clipping (what each adds)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.reps, args.epochs, args.steps = 2, 3, 20
    if args.child:
        print("RESULT " + json.dumps(run_backend(args)), flush=True)
        return

    load_start = os.getloadavg()
    results = []
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        cmd = [sys.executable, os.path.abspath(__file__), "--child"] + [a for a in sys.argv[1:]]
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{backend}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        result = json.loads(line[7:])
        result["wall_s"] = time.perf_counter() - started
        results.append(result)

    print(f"\nthreads per framework: {args.threads or 'default'}")
    what = (f"MLP {args.features}-{'-'.join([str(args.width)] * args.depth)}-10" if args.model == "mlp"
            else "CNN conv32-conv64-conv64 (3x3, max-pool) on 32x32x3, dense 128, 10")
    print(f"{what}, batch {args.batch}, Adam; "
          f"{args.reps} interleaved repetitions x {args.epochs - 1} steady epochs x {args.steps} steps\n")
    names = configs(args)
    header = f"{'backend':<11} {'params':>8} " + " ".join(f"{c:>15}" for c in names)
    for key, title in [("wall_min_ms", "steady state, wall clock, fastest epoch: ms per step (ratio to plain)"),
                       ("wall_median_ms", "steady state, wall clock, median epoch: ms per step (ratio to plain)"),
                       ("cpu_min_ms", "steady state, process CPU time, fastest epoch: ms per step (ratio to plain)"),
                       ("cpu_median_ms", "steady state, process CPU time, median epoch: ms per step (ratio to plain)"),
                       ("first_epoch_ms", "first epoch of each fit (holds the hook's trace/compile), wall clock, median")]:
        print(title)
        print(header)
        for r in results:
            base = r[key]["plain"]
            cells = [f"{r[key][c]:7.2f} ({r[key][c] / base:5.3f})" for c in names]
            print(f"{r['backend']:<11} {r['params']:>8} " + " ".join(f"{c:>15}" for c in cells))
        print()
    print("steady state, wall clock: median of paired per-epoch ratios to plain (same repetition, same epoch)")
    print(header)
    for r in results:
        print(f"{r['backend']:<11} {r['params']:>8} " + " ".join(f"{r['paired_ratio'][c]:>15.3f}" for c in names))
    print()
    print("target (issue 9): GradGuardCallback() at most 3% over plain fit (paired wall-clock ratio)")
    for r in results:
        ratio = r["paired_ratio"]["gradguard"]
        print(f"{r['backend']:<11} gradguard {ratio:.3f}x plain: {'met' if ratio <= 1.03 else 'NOT met'}; "
              f"monitor_only {r['paired_ratio']['monitor_only']:.3f}x; an empty batch callback alone "
              f"{r['paired_ratio']['noop_batch_cb']:.3f}x; gradguard {r['paired_ratio_vs_noop_cb']['gradguard']:.3f}x "
              f"a fit with that empty batch callback")
    print()
    print("first epoch of a fit (the hooked step's trace/compile, once per fit), ratio to plain's first epoch")
    for r in results:
        f = r["first_epoch_ms"]
        print(f"{r['backend']:<11} gradguard {f['gradguard'] / f['plain']:.1f}x, monitor_only "
              f"{f['monitor_only'] / f['plain']:.1f}x ({args.steps} steps: "
              f"+{(f['gradguard'] - f['plain']) * args.steps / 1e3:.2f} s per fit)")
    print()
    print("load average (1, 5, 15 min) at the start: " + " ".join(f"{x:.2f}" for x in load_start)
          + "; at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    with open(args.json, "w") if args.json else open(os.devnull, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
