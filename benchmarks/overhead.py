"""What gradguard costs per step, measured side by side in one process, interleaved.

(a) One ``guard.step`` on fixed gradients (a no-op optimizer) against the floors:
    ``torch._foreach_norm`` over the gradients (one read of gradient memory: the floor for monitoring)
    and ``clip_grad_norm_(foreach=True)`` (the floor for monitoring plus clipping).
    Targets: ``clip=None, skip_nonfinite=False`` within 1.1x of the monitoring floor, the defaults
    within 1.1x of the clipping floor, logging steps included (amortised over log_every_n_steps=50).
(b) Whole training steps (forward, backward, Adam): plain, GradGuard at its defaults, and
    ``wandb.watch(log="gradients", log_freq=1)`` in offline mode.

    python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

from gradguard.torch import GradGuard


class NoOpOptimizer:
    def step(self):
        pass


def models():
    torch.manual_seed(0)
    wide = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(1024, 1024), nn.ReLU())], nn.Linear(1024, 10))
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    deep = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    big = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(2048, 2048), nn.ReLU())], nn.Linear(2048, 10))
    return {"mlp 8x1024 (8.4M params, 18 tensors)": (wide, lambda: torch.randn(64, 1024)),
            "transformer 12x256 (9.5M params, 144 tensors)": (deep, lambda: torch.randn(16, 32, 256)),
            "mlp 8x2048 (33.6M params, 18 tensors)": (big, lambda: torch.randn(64, 2048))}


def loss_of(output):
    flat = output.float().reshape(-1, output.shape[-1])
    target = torch.arange(flat.shape[0]) % flat.shape[-1]
    return nn.functional.cross_entropy(flat, target)


def fill_grads(model, x):
    model.zero_grad()
    loss_of(model(x)).backward()


def time_calls(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def per_call_costs(model, x, reps, n):
    fill_grads(model, x)
    params = [p for p in model.parameters()]
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    monitor = GradGuard(model, clip=None, skip_nonfinite=False, log_every_n_steps=50)
    defaults = GradGuard(model)
    noop = NoOpOptimizer()

    def restore():  # clipping scales the gradients in place; keep them identical for every variant
        torch._foreach_copy_(grads, saved)

    variants = {
        "floor: _foreach_norm": lambda: torch._foreach_norm(grads),
        "floor: clip_grad_norm_(foreach)": lambda: nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
        "GradGuard(clip=None, skip_nonfinite=False)": lambda: monitor.step(noop),
        "GradGuard() defaults": lambda: defaults.step(noop),
    }
    for fn in variants.values():  # warm-up, and the guards fix their layout
        fn()
        restore()
    times = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(time_calls(fn, n))
            restore()
    return {k: statistics.median(v) for k, v in times.items()}


def training_costs(model_fn, x_fn, reps, n):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    x = x_fn()
    variants = {}
    for name in ("plain", "GradGuard() defaults", "wandb.watch(log='gradients', log_freq=1)"):
        torch.manual_seed(0)
        model = model_fn()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        guard = GradGuard(model) if name.startswith("GradGuard") else None
        if name.startswith("wandb"):
            run = wandb.init(mode="offline", dir=tempfile.mkdtemp(), project="gradguard-bench")
            run.watch(model, log="gradients", log_freq=1)

        def step(model=model, opt=opt, guard=guard):
            opt.zero_grad()
            loss_of(model(x)).backward()
            guard.step(opt) if guard else opt.step()

        step()
        variants[name] = step
    times = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(time_calls(fn, n))
    if wandb.run is not None:
        wandb.finish()
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args()
    reps, n = (3, 20) if args.quick else (9, 100)  # n=100: two log steps per timed block
    torch.set_flush_denormal(True)  # denormal gradients make CPU multiplies ~10x slower and the floors noise
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {reps} interleaved "
          f"blocks of {n} calls\n")
    for name, (model, x_fn) in models().items():
        costs = per_call_costs(model, x_fn(), reps, n)
        mon_floor, clip_floor = costs["floor: _foreach_norm"], costs["floor: clip_grad_norm_(foreach)"]
        print(f"(a) per-step cost on fixed gradients, {name}")
        print(f"    {'variant':46s} {'us/step':>9s} {'vs monitoring floor':>20s} {'vs clipping floor':>18s}")
        for k, v in costs.items():
            print(f"    {k:46s} {v * 1e6:9.1f} {v / mon_floor:19.2f}x {v / clip_floor:17.2f}x")
        print()
    for name, (model, x_fn) in list(models().items())[:1]:  # whole steps: the MLP (the Transformer takes ~3 s a step on 2 cores)
        make = (lambda m=model: __import__("copy").deepcopy(m))
        costs = training_costs(make, x_fn, max(3, reps // 2), max(10, n // 4))
        base = costs["plain"]
        print(f"(b) whole training step (forward, backward, Adam), {name}")
        for k, v in costs.items():
            print(f"    {k:46s} {v * 1e3:9.2f} ms {v / base:7.3f}x")
        print()


if __name__ == "__main__":
    sys.exit(main())
