"""gradguard validation suite: real small training runs (healthy and pathological) through the
public API, with machine-readable verdicts.

    python validation/suite.py [--quick] [--only REGEX] [--out FILE] [--shard I/N]

--quick     one variant per case (log_every_n_steps=50, clip="auto"), 200 steps at most
Writes one JSON line per run (default validation/results.jsonl), then prints a summary table
(summarize.py does the same from the files). The HF transformers cases need `pip install transformers`
(models are built from their configs, nothing is downloaded); without it they are reported as errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS_FULL = [(50, "auto"), (10, "auto"), (50, None), (10, None)]


def variants_for(case, log_every, clip, quick):
    """(10, None) only for pathological cases: keeps the full suite within the compute budget."""
    if not quick and (log_every, clip) == (10, None) and case.group != "pathological":
        return False
    return True
VARIANTS_QUICK = [(50, "auto")]


def _trim_evidence(ev):
    out = {}
    for k, v in ev.items():
        if isinstance(v, dict) and len(v) > 8:
            items = list(v.items())
            out[k] = dict(items[:3] + [("...", f"{len(items) - 6} more")] + items[-3:])
        else:
            out[k] = v
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if math.isnan(x) else (str(x) if math.isinf(x) else x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


class TimeProbe:
    """Through-time gradient profile of a recurrent module: RMS of dL/d(input_t) per time step,
    measured on the module's input (made a leaf that requires grad when it is raw data)."""

    def __init__(self, module):
        self.rows = []
        self._x = None
        module.register_forward_pre_hook(self._pre)

    def _pre(self, mod, args):
        x = args[0]
        if not torch.is_grad_enabled():
            return None
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        x.retain_grad()
        self._x = x
        return (x,) + tuple(args[1:])

    def collect(self):
        x = self._x
        if x is None or x.grad is None:
            return
        g = x.grad.detach()
        if not torch.isfinite(g).all():
            return
        per_t = g.pow(2).mean(dim=(0, 2)).sqrt()  # batch_first: (B, T, F)
        self.rows.append(per_t.numpy())
        self._x = None

    def summary(self):
        if not self.rows:
            return None
        r = np.mean(self.rows[-20:], axis=0)
        T = len(r)
        k = min(20, T)
        a, b = r[T - k], r[T - 1]
        decay = (a / b) ** (1.0 / (k - 1)) if a > 0 and b > 0 else 0.0
        return {"first_t_rms": float(r[0]), "mid_t_rms": float(r[T // 2]), "last_t_rms": float(r[-1]),
                "first_over_last": float(r[0] / max(r[-1], 1e-38)), "T": int(T),
                "per_step_factor_last20": float(decay)}


_UNIT_DIM = lambda out: 1 if out.dim() == 4 else -1


def activation_census(model, loss_fn, batch_fn, n_batches=8):
    """Ground truth measured on the activations (not by gradguard): per nn.ReLU module the share of
    units that output exactly 0 for every sample of n_batches batches; per nn.Sigmoid/nn.Tanh the
    share of outputs in the flat tails (same cut-offs as gradguard)."""
    from torch import nn
    alive, sat, hooks = {}, {}, []

    def relu_hook(name):
        def h(mod, args, out):
            d = _UNIT_DIM(out)
            o = out.detach().movedim(d, -1).reshape(-1, out.shape[d])
            a = (o != 0).any(0)
            alive[name] = a if name not in alive else (alive[name] | a)
        return h

    def sat_hook(name, lo, hi):
        def h(mod, args, out):
            o = out.detach()
            sat.setdefault(name, []).append(float(((o <= lo) | (o >= hi)).float().mean()))
        return h

    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            hooks.append(m.register_forward_hook(relu_hook(name)))
        elif isinstance(m, nn.Sigmoid):
            hooks.append(m.register_forward_hook(sat_hook(name, 0.01, 0.99)))
        elif isinstance(m, nn.Tanh):
            hooks.append(m.register_forward_hook(sat_hook(name, -0.99, 0.99)))
    if hooks:
        with torch.no_grad():
            for i in range(n_batches):
                try:
                    loss_fn(model, batch_fn(10 ** 6 + i))
                except Exception:
                    break
    for h in hooks:
        h.remove()
    return ({k: round(1.0 - float(v.float().mean()), 4) for k, v in alive.items()},
            {k: round(float(np.mean(v)), 4) for k, v in sat.items()})


def run_one(case, log_every, clip, max_steps=None, seed=0):
    from gradguard.torch import GradGuard

    torch.manual_seed(seed)
    np.random.seed(seed)
    spec = case.build()
    model, opt, batch_fn, loss_fn = spec["model"], spec["opt"], spec["batch"], spec["loss"]
    sched, accum, on_step = spec.get("sched"), spec.get("accum", 1), spec.get("on_step")
    probe = TimeProbe(spec["time_probe"]) if spec.get("time_probe") is not None else None
    steps = min(case.steps, max_steps) if max_steps else case.steps
    model.train()
    _, sat_init = activation_census(model, loss_fn, spec.get("census_batch", batch_fn), 2)
    torch.manual_seed(seed + 1)
    guard = GradGuard(model, clip=clip, log_every_n_steps=log_every)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    losses, gnorms, upd, wnorm = [], [], [], []
    t0 = time.time()
    micro = 0
    for step in range(steps):
        if on_step is not None:
            on_step(step, opt)
        opt.zero_grad(set_to_none=True)
        tot = 0.0
        for _ in range(accum):
            b = batch_fn(micro)
            micro += 1
            loss = loss_fn(model, b)
            loss.backward()
            tot += float(loss.detach()) * (accum if accum > 1 else 1) / accum
        if probe is not None:
            probe.collect()
        with torch.no_grad():
            sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in params if p.grad is not None)
        gnorms.append(math.sqrt(sq) if math.isfinite(sq) else float("nan"))
        losses.append(tot)
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
        guard.step(opt)
        with torch.no_grad():
            d2 = sum(float((p.detach() - b).float().pow(2).sum()) for p, b in zip(params, before))
            w2 = sum(float(b.float().pow(2).sum()) for b in before)
        upd.append(math.sqrt(d2 / w2) if w2 > 0 and math.isfinite(d2) else float("nan"))
        wnorm.append(math.sqrt(w2))
        if sched is not None:
            sched.step()
    elapsed = time.time() - t0
    findings = guard.findings
    layers = guard.layers
    numel = np.array([l.numel for l in layers], dtype=np.float64)
    hist = guard.history

    def profile(row):
        rms = np.asarray(row, dtype=np.float64) / np.sqrt(numel)
        ok = np.isfinite(rms) & (rms > 0)
        if ok.sum() < 2:
            return None
        idx = np.flatnonzero(ok)
        return {"first_layer": layers[idx[0]].name, "last_layer": layers[idx[-1]].name,
                "first_over_last": float(rms[idx[0]] / rms[idx[-1]]),
                "min_over_max": float(rms[idx].min() / rms[idx].max()),
                "argmin": layers[idx[np.argmin(rms[idx])]].name, "argmax": layers[idx[np.argmax(rms[idx])]].name,
                "first_over_max_later_half": float(rms[idx[0]] / rms[idx[len(idx) // 2:]].max())}

    g = np.array(gnorms)
    fin = np.isfinite(g) & (g > 0)
    jump = 1.0
    for t in range(5, len(g)):
        prev = g[max(0, t - 20):t]
        prev = prev[np.isfinite(prev) & (prev > 0)]
        if len(prev) >= 3 and np.isfinite(g[t]):
            jump = max(jump, g[t] / np.median(prev))
    move = {}
    for n, p in model.named_parameters():
        if n in w0 and p.dim() >= 2:
            d0 = float(w0[n].norm())
            move[n] = float((p.detach() - w0[n]).norm() / max(d0, 1e-12)) if math.isfinite(float(p.detach().norm())) else None
    mv = list(move.items())
    dead_gt, sat_end = activation_census(model, loss_fn, batch_fn)
    U, W = np.array(upd), np.array(wnorm)
    uf = np.isfinite(U)
    L = np.array(losses)
    lf = L[np.isfinite(L)]
    rec = {
        "name": case.name, "group": case.group, "log_every": log_every, "clip": clip, "steps": steps,
        "expected": sorted(case.expected), "acceptable": sorted(case.acceptable),
        "found": {f.kind: f.severity for f in findings},
        "loss_first": float(np.mean(lf[:10])) if len(lf) else None,
        "loss_last": float(np.mean(lf[-20:])) if len(lf) else None,
        "loss_nonfinite_steps": int((~np.isfinite(L)).sum()),
        "skipped_steps": guard.skipped_steps,
        "grad_norm": {"first": float(g[0]) if len(g) else None, "median": float(np.median(g[fin])) if fin.any() else None,
                      "max": float(g[fin].max()) if fin.any() else None, "last": float(g[-1]),
                      "nonfinite": int((~np.isfinite(g)).sum()), "max_jump_over_median20": float(jump)},
        "depth_profile_first_window": profile(hist[0][1]) if hist else None,
        "depth_profile_last_window": profile(hist[-1][1]) if hist else None,
        "weight_move_first_last": (mv[0], mv[-1]) if mv else None,
        "update_ratio": {"step0": float(U[0]) if len(U) else None, "max": float(U[uf].max()) if uf.any() else None,
                         "argmax": int(np.nanargmax(np.where(uf, U, -1))) if uf.any() else None,
                         "median": float(np.median(U[uf])) if uf.any() else None},
        "weight_norm_growth_max": float(np.nanmax(W) / W[0]) if len(W) and W[0] > 0 else None,
        "gt_dead_units": dead_gt, "gt_saturation_init": sat_init, "gt_saturation_end": sat_end,
        "time_probe": probe.summary() if probe else None,
        "findings": [{"kind": f.kind, "severity": f.severity, "step": f.step, "layers": list(f.layers[:5]),
                      "n_layers": len(f.layers), "cause": f.cause, "evidence": _trim_evidence(dict(f.evidence))}
                     for f in findings],
        "seconds": round(elapsed, 2),
    }
    found = set(rec["found"])
    rec["false_negative"] = sorted(case.expected - found)
    rec["false_positive"] = sorted(found - case.expected - case.acceptable)
    rec["ok"] = not rec["false_negative"] and not rec["false_positive"]
    guard.close()
    series = {"name": case.name, "log_every": log_every, "clip": clip,
              "loss": [float(f"{v:.4g}") for v in losses], "gnorm": [float(f"{v:.4g}") for v in gnorms],
              "upd": [float(f"{v:.4g}") for v in upd], "wnorm": [float(f"{v:.4g}") for v in wnorm]}
    return _jsonable(rec), _jsonable(series)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="regex on case names")
    ap.add_argument("--out", default=None)
    ap.add_argument("--shard", default=None, help="I/N: run every N-th case starting at I")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    logging.getLogger("gradguard").setLevel(logging.ERROR)
    import cases as C

    sel = [c for c in C.CASES if args.only is None or re.search(args.only, c.name)]
    if args.shard:
        i, n = map(int, args.shard.split("/"))
        sel = sel[i::n]
    variants = VARIANTS_QUICK if args.quick else VARIANTS_FULL
    out = args.out or os.path.join(HERE, "results.jsonl")
    if not args.shard and os.path.exists(out):
        os.remove(out)
    t0 = time.time()
    series_path = out.replace(".jsonl", ".series.jsonl")
    if not args.shard and os.path.exists(series_path):
        os.remove(series_path)
    with open(out, "a") as fh, open(series_path, "a") as sh:
        for c in sel:
            for log_every, clip in variants:
                if variants_for(c, log_every, clip, args.quick) is False:
                    continue
                series = None
                try:
                    rec, series = run_one(c, log_every, clip, max_steps=200 if args.quick else None)
                except Exception as e:  # a broken case must not stop the suite
                    import traceback
                    traceback.print_exc()
                    rec = {"name": c.name, "log_every": log_every, "clip": clip, "error": repr(e)[:500],
                           "expected": sorted(c.expected), "ok": False}
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                if series is not None:
                    sh.write(json.dumps(series) + "\n")
                    sh.flush()
                print(f"{c.name:45s} n={log_every:<3d} clip={str(clip):5s} exp={','.join(sorted(c.expected)) or '-':22s}"
                      f" found={','.join(f'{k}:{v[0]}' for k, v in rec.get('found', {}).items()) or '-':34s}"
                      f" {'ok' if rec.get('ok') else 'FP' + str(rec.get('false_positive')) + ' FN' + str(rec.get('false_negative')) if 'error' not in rec else 'ERROR ' + rec['error']}"
                      f"  loss {rec.get('loss_first') or 0:.3g}->{rec.get('loss_last') or 0:.3g} {rec.get('seconds', 0)}s",
                      flush=True)
    print(f"total {time.time() - t0:.0f}s -> {out}")
    if not args.shard:
        import summarize
        summarize.table(summarize.load(out), f"results: {out}")


if __name__ == "__main__":
    main()
