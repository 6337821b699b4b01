"""What gradguard costs per step, measured side by side in one process, interleaved.

(a) One ``guard.step`` on fixed gradients (an optimizer that does nothing) against the floors:
    monitoring floor  ``torch._foreach_norm`` over the gradients (one read of gradient memory)
    clipping floor    ``torch._foreach_norm``, then ``torch._foreach_mul_`` by a Python float (one
                      read, one read-write)
    Targets (issue 9): ``clip=None, skip_nonfinite=False`` <= 1.1x the monitoring floor; the
    defaults (``clip="auto"``, skip on) <= 1.15x the monitoring floor on a healthy run; a policy
    that clips every step (``clip=<float below the norm>``) <= 1.1x the clipping floor. Log steps
    are included, amortised (every 50th step logs; a block of 100 calls holds 2).
    Every call starts from the same gradients: they are copied back between calls, untimed, so a
    clipping call clips every time.
(b) Cost against the number of parameter tensors (10..2000) at a fixed total size: the fixed,
    per-tensor and per-element parts of the cost, fitted by least squares.
(c) Whole training steps (forward, backward, Adam): plain and GradGuard at its defaults on the same
    model in alternate blocks, and ``wandb.watch(log="gradients", log_freq=1)`` in offline mode.
    Target: defaults within 5%.

    python benchmarks/overhead.py [--quick] [--device cuda] [--threads N] [--cpu-time] [--skip-sweep] [--skip-train]
                                  [--only NAME]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

from gradguard.torch import GradGuard

DEVICE = torch.device("cpu")
CLOCK = time.perf_counter  # --cpu-time: time.process_time (steadier on a shared machine, with --threads 1)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class NoOpOptimizer:
    """Does nothing; ``fused=True`` stands for a fused optimizer (takes a device-side found_inf)."""

    def __init__(self, fused: bool = False):
        self._step_supports_amp_scaling = fused

    def step(self):
        pass


class Block(nn.Module):
    """A pre-norm GPT block: 4 attention projections, a 4x MLP, two LayerNorms (16 tensors)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=512, d=256, depth=24, heads=4):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(128, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def describe(name, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return f"{name} ({sum(p.numel() for p in params) / 1e6:.1f}M params, {len(params)} tensors)"


def models():
    torch.manual_seed(0)
    wide = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(1024, 1024), nn.ReLU())], nn.Linear(1024, 10))
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    deep = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    big = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(2048, 2048), nn.ReLU())], nn.Linear(2048, 10))
    gpt = TinyGPT()
    d = DEVICE
    return {describe("mlp 8x1024", wide): (wide, lambda: torch.randn(64, 1024, device=d)),
            describe("transformer 12x256", deep): (deep, lambda: torch.randn(16, 32, 256, device=d)),
            describe("mlp 8x2048", big): (big, lambda: torch.randn(64, 2048, device=d)),
            describe("LLM-like: GPT 24x256", gpt): (gpt, lambda: torch.randint(0, 512, (8, 64), device=d))}


def loss_of(output):
    flat = output.float().reshape(-1, output.shape[-1])
    target = torch.arange(flat.shape[0], device=flat.device) % flat.shape[-1]
    return nn.functional.cross_entropy(flat, target)


def fill_grads(model, x):
    model.zero_grad()
    loss_of(model(x)).backward()


def timed_block(fn, n, restore):
    """Seconds per call over ``n`` calls; ``restore`` (untimed) runs between calls."""
    total = 0.0
    for _ in range(n):
        sync()
        t = CLOCK()
        fn()
        sync()
        total += CLOCK() - t
        restore()
    return total / n


def guard_variants(model, params, grads, fused):
    """The per-call variants on a model whose gradients are filled."""
    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    noop = NoOpOptimizer(fused=fused)
    monitor = GradGuard(model, clip=None, skip_nonfinite=False, log_every_n_steps=50)
    defaults = GradGuard(model)
    clipper = GradGuard(model, clip=norm / 2)  # clips every call

    def clip_floor():
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, min(1.0, norm / 2 / (float(total) + 1e-6)))

    return {
        "floor: _foreach_norm": lambda: torch._foreach_norm(grads),
        "floor: _foreach_norm + _foreach_mul_(float)": clip_floor,
        "ref: clip_grad_norm_(foreach=True)": lambda: nn.utils.clip_grad_norm_(params, norm / 2, foreach=True),
        "GradGuard(clip=None, skip_nonfinite=False)": lambda: monitor.step(noop),
        "GradGuard() defaults": lambda: defaults.step(noop),
        f"GradGuard(clip={norm / 2:.3g}) clips every step": lambda: clipper.step(noop),
    }, (monitor, defaults, clipper)


def per_call_costs(model, x, reps, n, fused=False):
    fill_grads(model, x)
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore():
        torch._foreach_copy_(grads, saved)

    variants, guards = guard_variants(model, params, grads, fused)
    for fn in variants.values():  # warm-up; the guards fix their layout
        for _ in range(3):
            fn()
            restore()
    times = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(timed_block(fn, n, restore))
    # The log steps of the monitor-only guard apart, each call paired with a floor call just before it
    # (both after a restore): a non-log step's and a log step's cost in floors, and the log steps'
    # amortised share.
    monitor, step_monitor = guards[0], variants["GradGuard(clip=None, skip_nonfinite=False)"]
    floor = variants["floor: _foreach_norm"]
    split = {True: [], False: []}
    for _ in range(4 * 50):
        f = timed_block(floor, 1, restore)
        d = timed_block(step_monitor, 1, restore)
        split[monitor.engine._log_step].append(d / f)
    paths = {g.engine.step_path for g in guards}
    gates = {g.engine.gate for g in guards}
    for g in guards:
        g.close()
    split_ratios = {"log step": statistics.median(split[True]), "non-log step": statistics.median(split[False]),
                    "non-log step, mean": statistics.mean(split[False])}
    # Ratios block by block (each variant's block against the floors' blocks of the same round),
    # then their median: slow drifts of the machine (clock, cache placement) cancel within a round.
    floors = {"monitoring": times["floor: _foreach_norm"], "clipping": times["floor: _foreach_norm + _foreach_mul_(float)"]}
    ratios = {(k, f): statistics.median(t / b for t, b in zip(v, base)) for k, v in times.items()
              for f, base in floors.items()}
    return {k: statistics.median(v) for k, v in times.items()}, ratios, split_ratios, paths, gates


def report_per_call(name, costs, ratios, split, paths, gates):
    print(f"(a) per-step cost on fixed gradients, {name}; bookkeeping: {', '.join(sorted(paths))}; "
          f"gate: {', '.join(sorted(gates))}; ratios: median over the rounds of each round's ratio")
    print(f"    {'variant':48s} {'us/step':>10s} {'/ monitoring floor':>19s} {'/ clipping floor':>17s}")
    for k, v in costs.items():
        print(f"    {k:48s} {v * 1e6:10.1f} {ratios[k, 'monitoring']:18.2f}x {ratios[k, 'clipping']:16.2f}x")
    log, plain = split["log step"], split["non-log step"]
    print(f"    clip=None, each call against a floor call just before it: a non-log step {plain:.2f}x the floor "
          f"(mean {split['non-log step, mean']:.2f}x), a log step {log:.1f} floors; log steps' amortised share "
          f"(1 in 50) {(log - plain) / 50 * 100:.1f}% of the floor")
    print()


def sweep(reps, n, total=4_000_000, counts=(10, 30, 100, 300, 1000, 2000)):
    """Cost against the number of tensors at a fixed total size, and at two sizes for 100 tensors."""
    rows = []
    shapes = [(c, total) for c in counts] + [(100, total // 4), (100, total * 2)]
    for count, size in shapes:
        k = max(1, int(round((size / count) ** 0.5)))
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(k, k, bias=False) for _ in range(count)]).to(DEVICE)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        grads = [p.grad for p in model.parameters()]
        saved = [g.clone() for g in grads]

        def restore():
            torch._foreach_copy_(grads, saved)

        monitor = GradGuard(model, clip=None, skip_nonfinite=False, log_every_n_steps=50)
        defaults = GradGuard(model)
        noop = NoOpOptimizer()
        variants = {"floor": lambda: torch._foreach_norm(grads), "monitor": lambda: monitor.step(noop),
                    "defaults": lambda: defaults.step(noop)}
        for fn in variants.values():
            for _ in range(3):
                fn()
                restore()
        times = {kk: [] for kk in variants}
        for _ in range(reps):
            for kk, fn in variants.items():
                times[kk].append(timed_block(fn, n, restore))
        med = {kk: statistics.median(v) for kk, v in times.items()}
        rows.append((count, count * k * k, med))
        monitor.close()
        defaults.close()
    print(f"(b) cost against the number of parameter tensors (square weights, ~{total / 1e6:.0f}M elements; "
          "two extra rows vary the size at 100 tensors)")
    print(f"    {'tensors':>8s} {'elements':>10s} {'floor us':>10s} {'clip=None us':>13s} {'defaults us':>12s} "
          f"{'clip=None/floor':>16s} {'defaults/floor':>15s}")
    for count, elems, med in rows:
        print(f"    {count:8d} {elems:10d} {med['floor'] * 1e6:10.1f} {med['monitor'] * 1e6:13.1f} "
              f"{med['defaults'] * 1e6:12.1f} {med['monitor'] / med['floor']:15.2f}x {med['defaults'] / med['floor']:14.2f}x")
    # least squares: cost = fixed + per_tensor * tensors + per_element * elements
    a = np.array([[1.0, c, e] for c, e, _ in rows])
    for kk in ("floor", "monitor", "defaults"):
        coef, *_ = np.linalg.lstsq(a, np.array([m[kk] for _, _, m in rows]), rcond=None)
        print(f"    fit {kk:9s}: {coef[0] * 1e6:8.1f} us fixed + {coef[1] * 1e6:6.2f} us/tensor + "
              f"{coef[2] * 1e12:7.1f} ps/element")
    print()


def training_costs(model, x_fn, reps, n, warmup=10):
    """Whole steps. The plain step and GradGuard's run on the very same model and optimizer, in
    alternate blocks: a guard is made for each of its blocks and closed after it (its hooks do not
    run in the plain blocks), so both see the same memory placement (two identical copies of a model
    differ by 2-10% per block on this CPU, as much as the target). Each block: ``warmup`` untimed
    steps (a fresh guard's tracker warms up over its first 10 steps), then ``n`` = 50 timed ones:
    the guard's log step (its step 49) is among them, 1 in 50 as in a run, and the bookkeeping of
    the warm-up steps, which waited for it, runs inside the timed steps about as much as that of the
    steps after it runs outside them. ``wandb.watch`` runs
    on a copy of its own (its cost is far above the noise)."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    x = x_fn()
    torch.manual_seed(0)
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    watched = copy.deepcopy(model)
    opt_w = torch.optim.Adam(watched.parameters(), lr=1e-4)
    run = wandb.init(mode="offline", dir=tempfile.mkdtemp(), project="gradguard-bench")
    run.watch(watched, log="gradients", log_freq=1)

    def block(model_, opt_, guard=None):
        def step():
            opt_.zero_grad()
            loss_of(model_(x)).backward()
            guard.step(opt_) if guard else opt_.step()
        for _ in range(warmup):
            step()
        return timed_block(step, n, lambda: None)

    def guarded(model_, opt_):
        guard = GradGuard(model_)
        try:
            return block(model_, opt_, guard)
        finally:
            guard.close()

    variants = {"plain": lambda: block(m, opt),
                "GradGuard() defaults (same model, alternate blocks)": lambda: guarded(m, opt),
                "wandb.watch(log='gradients', log_freq=1) (a copy)": lambda: block(watched, opt_w)}
    if DEVICE.type == "cuda":  # the sync-free gate: a fused optimizer takes the verdict on the device
        m_f = copy.deepcopy(model)
        opt_f = torch.optim.Adam(m_f.parameters(), lr=1e-4, fused=True)
        variants["plain, Adam(fused=True)"] = lambda: block(m_f, opt_f)
        variants["GradGuard() defaults, Adam(fused=True)"] = lambda: guarded(m_f, opt_f)
    times = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(fn())
    wandb.finish()
    return times


def main():
    global DEVICE, CLOCK
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--only", default="", help="substring of the model names to run in (a)")
    parser.add_argument("--cpu-time", action="store_true", help="time by the process's CPU time, not the wall "
                        "clock: steadier while other jobs share the cores (use with --threads 1; CPU only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is "
                        "far steadier on a loaded machine (OpenMP barriers stall when a core is taken)")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    reps, n = (3, 50) if args.quick else (11, 100)  # n=100: two log steps per timed block
    torch.set_flush_denormal(True)  # denormal gradients make CPU multiplies ~10x slower and the floors noise
    warnings.simplefilter("ignore")
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; median of {reps} interleaved blocks of {n} calls; "
          f"{'process CPU time' if args.cpu_time else 'wall clock'}; load average at start "
          f"{os.getloadavg()[0]:.1f}\n")
    if DEVICE.type == "cpu":
        g = [torch.randn(1024, 1024) for _ in range(8)]
        one = torch.ones(())
        f = statistics.median(timed_block(lambda: torch._foreach_mul_(g, 1.0), 20, lambda: None) for _ in range(3))
        t = statistics.median(timed_block(lambda: torch._foreach_mul_(g, one), 20, lambda: None) for _ in range(3))
        print(f"    _foreach_mul_ over 8.4M elements: by a Python float {f * 1e3:.2f} ms, by a 0-d tensor "
              f"{t * 1e3:.2f} ms\n")
    for name, (model, x_fn) in models().items():
        if args.only and args.only not in name:
            continue
        model.to(DEVICE)
        report_per_call(name, *per_call_costs(model, x_fn(), reps, n))
        if DEVICE.type == "cuda":  # the sync-free gate of a fused optimizer
            report_per_call(name + " [fused optimizer]", *per_call_costs(model, x_fn(), reps, n, fused=True))
    if not args.skip_sweep:
        sweep(max(3, reps // 2), n // 2)
    if not args.skip_train:
        for name, (model, x_fn) in list(models().items())[:1]:  # the Transformers take seconds a step on 2 cores
            times = training_costs(model.to(DEVICE), x_fn, reps, 50)
            base = statistics.median(times["plain"])
            print(f"(c) whole training step (forward, backward, Adam), {name}; median of {reps} blocks")
            for k, v in times.items():
                paired = sorted(t / p for t, p in zip(v, times["plain"]))  # block by block, against the plain block before it
                print(f"    {k:52s} {statistics.median(v) * 1e3:8.2f} ms {statistics.median(v) / base:7.3f}x   "
                      f"(per block: {paired[0]:.3f}x .. {paired[-1]:.3f}x)")
            print()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
