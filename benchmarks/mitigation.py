"""Does automatic clipping help? Runs that are unstable without help, each over several seeds, under
every clipping policy, through the public ``gradguard.torch.GradGuard`` API.

    python benchmarks/mitigation.py [--seeds 5] [--steps-scale 1.0] [--only REGEX] [--out FILE]

Scenarios (tiny models, short runs: the whole grid takes a few minutes on 2 CPU cores):

* ``transformer_lm``: a post-norm character Transformer LM on Python's own source files, Adam at a
  learning rate too high for it and no warm-up.
* ``deep_rnn``: a 3-layer ReLU RNN over 20 time steps, recurrent weights orthogonal x1.6, SGD with momentum.
* ``bad_init_mlp``: a 5-layer ReLU MLP initialised with std 0.25 (1.4x He, compounding) and SGD at 0.5 on digits.
* ``bad_batches``: a healthy regression MLP (Adam) fed, on 2% of its steps, a batch whose targets are
  corrupted by 1000x: rare loss spikes.
* ``healthy``: a He-initialised MLP with Adam on digits (nothing to mitigate: every policy should
  leave it alone); ``healthy_sgd``: the same with SGD 0.05 + momentum 0.9 (where ``auto``'s update
  ceiling is in force).

Policies: ``clip=None``, fixed global-norm clipping at several thresholds (the best one in hindsight is
picked per scenario), ``"auto"``, ``"zscore"``, ``"percentile"``, ``"agc"``. Every run uses
``skip_nonfinite=False``: gradguard's default skip would keep NaN steps from the weights under every
policy, and what is compared here is the clipping alone; the extra row ``auto+skip`` is gradguard's
default (``clip="auto"``, ``skip_nonfinite=True``).

Reported per scenario and policy: diverged runs (final loss non-finite or not below the loss at
initialisation), final loss (held-out, clean data; median and worst over seeds), steps clipped (median).
The final loss is a loss, not a timing: CPU contention does not change it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import time
import warnings

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

FIXED = (0.1, 0.3, 1.0, 3.0, 10.0)
LM_LR = 3e-2  # Adam on a post-norm Transformer: ~30x the usual 1e-3, no warm-up
RNN_GAIN = 1.6  # recurrent weights orthogonal x1.6 under ReLU: the forward and backward grow through time
RNN_LR = 0.05
INIT_STD = 0.25
POLICIES = [None, *FIXED, "auto", "zscore", "percentile", "agc", "auto+skip"]


def policy_name(p) -> str:
    return "None" if p is None else (f"fixed {p:g}" if isinstance(p, float) else p)


def policy_args(p) -> dict:
    """``"auto+skip"`` is gradguard's default (clip="auto", skip_nonfinite=True); every other policy
    runs with skip_nonfinite=False so that the clipping alone is compared."""
    if p == "auto+skip":
        return {"clip": "auto", "skip_nonfinite": True}
    return {"clip": p, "skip_nonfinite": False}


# ----------------------------------------------------------------------------------------- data

_TEXT = None


def python_text() -> str:
    """Python's own standard-library source as training text (no download)."""
    global _TEXT
    if _TEXT is None:
        import argparse as a, json.decoder as jd, textwrap as tw, string as st, functools as ft
        _TEXT = "".join(inspect.getsource(m) for m in (a, jd, tw, st, ft))
    return _TEXT


def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x, torch.tensor(y)


# ----------------------------------------------------------------------------------------- scenarios

class CharLM(nn.Module):
    def __init__(self, vocab, d=32, layers=2, heads=4, seq=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=False)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1))

    def forward(self, t):
        h = self.emb(t) + self.pos[: t.shape[1]]
        return self.head(self.enc(h, mask=self.mask[: t.shape[1], : t.shape[1]], is_causal=True))


def transformer_lm(seed, steps_scale):
    text = python_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    seq, bs = 32, 16
    g = torch.Generator().manual_seed(seed)
    model = CharLM(len(chars), seq=seq)
    opt = torch.optim.Adam(model.parameters(), lr=LM_LR)  # far too high for this model, and no warm-up

    def batch(step, generator=g):
        start = torch.randint(0, len(ids) - seq - 1, (bs,), generator=generator)
        x = torch.stack([ids[s:s + seq] for s in start])
        y = torch.stack([ids[s + 1:s + seq + 1] for s in start])
        return x, y

    def loss(m, b):
        return F.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())
    held = batch(0, torch.Generator().manual_seed(10_000))
    return dict(model=model, opt=opt, batch=batch, loss=loss, held=held, steps=int(100 * steps_scale))


class DeepRNN(nn.Module):
    def __init__(self, vocab=16, hidden=32, layers=3, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.rnn = nn.RNN(16, hidden, num_layers=layers, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, t):
        out, _ = self.rnn(self.emb(t))
        return self.head(out[:, -1])


def deep_rnn(seed, steps_scale):
    T, bs = 20, 32
    g = torch.Generator().manual_seed(seed)
    model = DeepRNN()
    for name, p in model.rnn.named_parameters():
        if name.startswith("weight_hh"):
            nn.init.orthogonal_(p, gain=RNN_GAIN)
    opt = torch.optim.SGD(model.parameters(), lr=RNN_LR, momentum=0.9)

    def batch(step, generator=g):
        t = torch.randint(0, 16, (bs, T), generator=generator)
        return t, t[:, T - 4] % 4  # a token 4 steps back: learnable when training is stable

    held = batch(0, torch.Generator().manual_seed(10_000))
    return dict(model=model, opt=opt, batch=batch, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), held=held,
                steps=int(150 * steps_scale))


def mlp(widths, act=nn.ReLU):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def bad_init_mlp(seed, steps_scale):
    x, y = digits()
    model = mlp([64, 64, 64, 64, 64, 10])
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=INIT_STD)  # 1.4x He for fan-in 64, compounding over 5 layers
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(seed)
    train_idx, held_idx = torch.arange(0, 1500), torch.arange(1500, len(x))

    def batch(step):
        idx = train_idx[torch.randint(0, len(train_idx), (64,), generator=g)]
        return x[idx], y[idx]
    return dict(model=model, opt=opt, batch=batch, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                held=(x[held_idx], y[held_idx]), steps=int(200 * steps_scale))


def bad_batches(seed, steps_scale):
    d = 32
    gen = torch.Generator().manual_seed(1234)  # the task is the same for every seed
    w1 = torch.randn(d, 64, generator=gen) / math.sqrt(d)
    w2 = torch.randn(64, 1, generator=gen) / 8.0
    g = torch.Generator().manual_seed(seed)
    model = mlp([d, 64, 64, 1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = int(300 * steps_scale)
    bad = set(torch.randperm(steps, generator=g)[: max(1, steps // 50)].tolist())

    def make(n, generator):
        x = torch.randn(n, d, generator=generator)
        return x, torch.tanh(x @ w1) @ w2 * 3.0

    def batch(step):
        x, y = make(64, g)
        if step in bad:
            y = y * 1000.0  # a corrupted batch: targets off by 1000x
        return x, y
    return dict(model=model, opt=opt, batch=batch, loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
                held=make(1024, torch.Generator().manual_seed(10_000)), steps=steps)


def healthy(seed, steps_scale):
    x, y = digits()
    model = mlp([64, 128, 128, 10])
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    train_idx, held_idx = torch.arange(0, 1500), torch.arange(1500, len(x))

    def batch(step):
        idx = train_idx[torch.randint(0, len(train_idx), (64,), generator=g)]
        return x[idx], y[idx]
    return dict(model=model, opt=opt, batch=batch, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                held=(x[held_idx], y[held_idx]), steps=int(200 * steps_scale))


def healthy_sgd(seed, steps_scale):
    """The healthy MLP with SGD + momentum, where ``auto``'s update ceiling is in force (and must never bind)."""
    spec = healthy(seed, steps_scale)
    spec["opt"] = torch.optim.SGD(spec["model"].parameters(), lr=0.05, momentum=0.9)
    return spec


SCENARIOS = {"transformer_lm": transformer_lm, "deep_rnn": deep_rnn, "bad_init_mlp": bad_init_mlp,
             "bad_batches": bad_batches, "healthy": healthy, "healthy_sgd": healthy_sgd}


# ----------------------------------------------------------------------------------------- one run

def held_loss(spec) -> float:
    model = spec["model"]
    model.eval()
    with torch.no_grad():
        value = float(spec["loss"](model, spec["held"]))
    model.train()
    return value


def run(scenario: str, policy, seed: int, steps_scale: float = 1.0) -> dict:
    from gradguard.torch import GradGuard

    torch.manual_seed(seed)
    spec = SCENARIOS[scenario](seed, steps_scale)
    model, opt = spec["model"], spec["opt"]
    initial = held_loss(spec)
    guard = GradGuard(model, log_every_n_steps=50, **policy_args(policy))
    train_losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(spec["steps"]):
            b = spec["batch"](step)
            opt.zero_grad(set_to_none=True)
            loss = spec["loss"](model, b)
            loss.backward()
            guard.step(opt)
            train_losses.append(float(loss.detach()))
        guard.close()
    final = held_loss(spec)
    monitor = guard.engine.monitor
    diverged = not math.isfinite(final) or final >= initial
    return {"scenario": scenario, "policy": policy_name(policy), "seed": seed, "initial_loss": initial,
            "final_loss": final if math.isfinite(final) else None, "diverged": diverged,
            "clipped_steps": int(monitor.totals["clipped"]), "skipped_steps": int(monitor.totals["skipped"]),
            "findings": sorted({f.kind for f in monitor.findings}),
            "train_loss_last10": float(np.mean(train_losses[-10:])) if train_losses else None}


# ----------------------------------------------------------------------------------------- table

def summarize(rows: list[dict]) -> str:
    out = []
    by = {}
    for r in rows:
        by.setdefault(r["scenario"], {}).setdefault(r["policy"], []).append(r)
    for scenario, pols in by.items():
        def med(rs):
            v = [r["final_loss"] if r["final_loss"] is not None else math.inf for r in rs]
            return float(np.median(v))
        fixed = {p: med(rs) for p, rs in pols.items() if p.startswith("fixed")}
        best = min(fixed, key=fixed.get) if fixed else None
        survives = {p for p, rs in pols.items() if p.startswith("fixed") and not any(r["diverged"] for r in rs)}
        out.append(f"\n### {scenario} ({len(next(iter(pols.values())))} seeds; best fixed threshold in hindsight: "
                   f"{best})\n")
        out.append("| policy | diverged | final loss median | final loss worst | steps clipped (median) | vs best fixed |")
        out.append("|---|---|---|---|---|---|")
        for p, rs in pols.items():
            losses = [r["final_loss"] if r["final_loss"] is not None else math.inf for r in rs]
            m, worst = float(np.median(losses)), float(np.max(losses))
            rel = (m / fixed[best] - 1.0) * 100 if best and math.isfinite(m) and fixed[best] > 0 else math.nan
            clipped = "n/a (unit-wise)" if p == "agc" else f"{np.median([r['clipped_steps'] for r in rs]):g}"
            out.append(f"| {p} | {sum(r['diverged'] for r in rs)}/{len(rs)} | {m:.4g} | {worst:.4g} | {clipped} | "
                       f"{'' if math.isnan(rel) else '> +1000%' if rel > 1000 else f'{rel:+.1f}%'} |")
        if "auto" in pols:
            auto = pols["auto"]
            notes = []
            if survives and any(r["diverged"] for r in auto):
                notes.append("auto diverged where a fixed threshold survived")
            if best and med(auto) > 1.02 * fixed[best] and not scenario.startswith("healthy"):  # (there: change nothing)
                rel = (med(auto) / fixed[best] - 1) * 100
                notes.append("auto's median is " + ("far" if not rel < 1000 else f"{rel:.1f}%")
                             + " above the best fixed threshold")
            if scenario.startswith("healthy") and "None" in pols:
                same = all(a["final_loss"] == n["final_loss"] for a, n in zip(
                    sorted(auto, key=lambda r: r["seed"]), sorted(pols["None"], key=lambda r: r["seed"])))
                notes.append(f"auto clipped {sum(r['clipped_steps'] for r in auto)} steps; final loss identical to "
                             f"clip=None on every seed: {same}")
            out.append("\n" + ("; ".join(notes) if notes else "auto: targets met") + ".")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps-scale", type=float, default=1.0)
    ap.add_argument("--only", default=None, help="regex on scenario names")
    ap.add_argument("--policies", default=None, help="regex on policy names")
    ap.add_argument("--out", default=None, help="also write one JSON line per run here")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(1)
    import logging
    logging.getLogger("gradguard").setLevel(logging.ERROR)
    rows = []
    t0 = time.time()
    with open(args.out or os.devnull, "w") as fh:
        for scenario in SCENARIOS:
            if args.only and not re.search(args.only, scenario):
                continue
            for policy in POLICIES:
                if args.policies and not re.search(args.policies, policy_name(policy)):
                    continue
                for seed in range(args.seeds):
                    r = run(scenario, policy, seed, args.steps_scale)
                    rows.append(r)
                    fh.write(json.dumps(r) + "\n")
                    fh.flush()
                print(f"{scenario:15s} {policy_name(policy):11s} diverged "
                      f"{sum(r['diverged'] for r in rows[-args.seeds:])}/{args.seeds} final "
                      f"{np.median([r['final_loss'] if r['final_loss'] is not None else math.inf for r in rows[-args.seeds:]]):.4g}"
                      f"  ({time.time() - t0:.0f}s)", flush=True)
    print(summarize(rows))


if __name__ == "__main__":
    main()
