"""The main demo: gradguard on real PyTorch training runs on scikit-learn's digits (no download).

1. A deep sigmoid MLP whose early layers collapse: gradguard names them, the cause and the remedies;
   the same depth with ReLU and He init trains and gets no findings.
2. A badly initialised ReLU net with a high SGD learning rate: without help it diverges to NaN;
   with ``clip="auto"`` gradguard switches clipping on at the first spike and the run trains.

    python examples/digits_demo.py [--out DIR]

Writes a JSON-lines log per run into DIR (default: ./gradguard_runs) and one HTML report,
DIR/report.html, with each broken run beside its fix (``gradguard report`` draws the same from the logs;
``gradguard summary DIR/*.jsonl`` prints it in the terminal).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import warnings

import torch
from torch import nn

import gradguard
from gradguard.report import write_report
from gradguard.torch import GradGuard


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def mlp(depth, act, init=None, width=64):
    layers, d = [], 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    model = nn.Sequential(*layers, nn.Linear(d, 10))
    for m in model.modules():
        if init is not None and isinstance(m, nn.Linear):
            init(m)
    return model


def run(title, model, optimizer, out_dir, steps=300, **guard_args):
    torch.manual_seed(0)
    x, y = digits()
    path = os.path.join(out_dir, title.replace(" ", "_").replace(",", "").replace("=", "-") + ".jsonl")
    if os.path.exists(path):
        os.remove(path)
    # A log step every 10 steps gives the report's heatmap 30 columns; the timeline has every step anyway.
    guard = GradGuard(model, sinks=path, log_every_n_steps=10, **guard_args)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        guard.step(optimizer)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    findings = guard.findings
    guard.close()
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    print(f"\n=== {title}")
    print(f"    final loss {loss.item():.4g}, accuracy {accuracy:.1%}, weights finite: {finite}, "
          f"skipped steps: {guard.engine.monitor.totals['skipped']}, clipped steps: "
          f"{guard.engine.monitor.totals['clipped']}")
    if not findings:
        print("    no findings: gradients look healthy")
    for f in findings:
        print(f"    {f}")
        if f.cause:
            print(f"      likely cause: {f.cause}")
        for r in f.remedies[:3]:
            print(f"      - {r}")
    return findings, loss.item(), path


def he(layer):
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)


def too_large(layer):
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.zeros_(layer.bias)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gradguard_runs", help="directory for logs and reports")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # The demo prints the findings itself; in a real run they also arrive as a warning and a log line.
    warnings.simplefilter("ignore", gradguard.GradGuardWarning)
    logging.getLogger("gradguard").setLevel(logging.ERROR)

    torch.manual_seed(0)
    model = mlp(10, nn.Sigmoid)
    *_, sigmoid_log = run("deep sigmoid MLP", model, torch.optim.SGD(model.parameters(), lr=0.1), args.out)
    torch.manual_seed(0)
    model = mlp(10, nn.ReLU, init=he)
    *_, relu_log = run("same depth, ReLU and He init", model, torch.optim.SGD(model.parameters(), lr=0.05), args.out)

    torch.manual_seed(0)
    model = mlp(4, nn.ReLU, init=too_large)
    _, loss, unclipped_log = run("bad init, clip=None", model, torch.optim.SGD(model.parameters(), lr=0.5), args.out,
                  clip=None, skip_nonfinite=False)
    torch.manual_seed(0)
    model = mlp(4, nn.ReLU, init=too_large)
    _, rescued, auto_log = run("bad init, clip=auto", model, torch.optim.SGD(model.parameters(), lr=0.5), args.out,
                     clip="auto")
    print(f"\nWithout help the bad-init run ends with loss {loss:.3g}; with clip='auto' it ends with "
          f"{rescued:.3g}." + (" gradguard rescued it." if not math.isfinite(loss) and math.isfinite(rescued) else ""))
    # One report: each broken run beside its fix.
    report = write_report([sigmoid_log, relu_log, unclipped_log, auto_log], os.path.join(args.out, "report.html"),
                          title="gradguard demo: broken runs and their fixes")
    print(f"\nReport (each broken run beside its fix): {report}")


if __name__ == "__main__":
    main()
