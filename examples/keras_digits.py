"""gradguard in Keras 3 ``model.fit`` on scikit-learn's digits (no download), on any backend.

    python examples/keras_digits.py                          # backend from KERAS_BACKEND, else tensorflow
    python examples/keras_digits.py --backend jax --out runs

1. A deep sigmoid MLP whose early layers collapse: gradguard names them (Keras layer names), the
   cause (their sigmoid activations) and the remedies; the same depth with ReLU and He init trains
   and gets no findings.
2. A badly initialised ReLU net with a high SGD learning rate: without help it diverges to NaN;
   with ``clip="auto"`` clipping switches itself on inside the compiled train step at the first
   spike and the weights stay finite (the first, unclipped steps still switch many ReLU units
   off for good: gradguard reports those dead units too).
3. A batch holding a NaN: that step is skipped in-graph, training goes on.

Per run, DIR gets the CSVLogger file (gradguard's scalars next to the loss), a JSON-lines log and
an HTML report.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--out", default="gradguard_runs", help="directory for logs and reports")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend  # fixed when Keras is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.makedirs(args.out, exist_ok=True)

    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import gradguard
    from gradguard.keras import GradGuardCallback
    from gradguard.report import write_report

    # The demo prints the findings itself; in a real run they also arrive as a warning and a log line.
    warnings.simplefilter("ignore", gradguard.GradGuardWarning)
    logging.getLogger("gradguard").setLevel(logging.ERROR)

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype("float32"), y.astype("int32")
    x, y = x[:1792], y[:1792]  # 56 full batches of 32

    def mlp(depth, activation, init, seed=0):
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((64,))]
        layers += [keras.layers.Dense(64, activation=activation, kernel_initializer=init, name=f"dense_{i}")
                   for i in range(depth)]
        head_init = init if isinstance(init, keras.initializers.Initializer) else "glorot_uniform"
        layers.append(keras.layers.Dense(10, kernel_initializer=head_init, name="logits"))
        return keras.Sequential(layers)

    def run(title, model, optimizer, data=(x, y), **guard_args):
        slug = title.replace(" ", "_").replace(",", "").replace("=", "-").replace("'", "")
        jsonl, csv = os.path.join(args.out, slug + ".jsonl"), os.path.join(args.out, slug + ".csv")
        if os.path.exists(jsonl):
            os.remove(jsonl)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        guard = GradGuardCallback(sinks=jsonl, log_every_n_steps=25, **guard_args)
        # GradGuardCallback goes first, so the loggers after it see its scalars in `logs`.
        history = model.fit(*data, batch_size=32, epochs=args.epochs, verbose=0, shuffle=False,
                            callbacks=[guard, keras.callbacks.CSVLogger(csv)])
        guard.close()
        h = history.history
        finite = all(np.isfinite(v.numpy()).all() for v in model.weights)
        loss, accuracy = model.evaluate(x, y, batch_size=256, verbose=0)  # on the clean data
        print(f"\n=== {title}  [{keras.backend.backend()}]")
        print(f"    loss {loss:.4g}, accuracy {accuracy:.1%}, weights finite: {finite}, "
              f"skipped steps: {guard.skipped_steps}, clipped steps: {guard.totals['clipped']}")
        print(f"    grad/depth_ratio by epoch: {', '.join(f'{v:.2g}' for v in h['grad/depth_ratio'])}")
        if not guard.findings:
            print("    no findings: gradients look healthy")
        for f in guard.findings:
            print(f"    {f}")
            if f.cause:
                print(f"      likely cause: {f.cause}")
            for r in f.remedies[:3]:
                print(f"      - {r}")
        print(f"    CSV: {csv}\n    report: {write_report(jsonl)}")
        return loss

    run("deep sigmoid MLP", mlp(10, "sigmoid", "glorot_uniform"), keras.optimizers.SGD(0.1))
    run("same depth, ReLU and He init", mlp(10, "relu", "he_normal"), keras.optimizers.SGD(0.05))

    too_large = keras.initializers.RandomNormal(stddev=0.5, seed=0)
    lost = run("bad init, clip=None", mlp(4, "relu", too_large), keras.optimizers.SGD(0.1),
               clip=None, skip_nonfinite=False)
    rescued = run("bad init, clip=auto", mlp(4, "relu", too_large), keras.optimizers.SGD(0.1), clip="auto")
    print(f"\nWithout help the bad-init run ends with loss {lost:.3g}; with clip='auto' it ends with "
          f"{rescued:.3g}." + (" gradguard rescued it." if not math.isfinite(lost) and math.isfinite(rescued) else ""))

    poisoned = x.copy()
    poisoned[5 * 32 + 3, 10] = np.nan  # one sample of the sixth batch
    run("a NaN in one batch", mlp(4, "relu", "he_normal"), keras.optimizers.Adam(1e-3), data=(poisoned, y))
    return 0


if __name__ == "__main__":
    sys.exit(main())
