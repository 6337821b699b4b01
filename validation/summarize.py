"""Summarise suite results: a case x variant table and the list of false positives / negatives.

    python validation/summarize.py validation/results.jsonl [other_results.jsonl]
(with two files: before/after side by side). Globs like results.s*.jsonl are merged.
"""

from __future__ import annotations

import glob
import os
import json
import sys

ABBR = {"vanishing": "V", "exploding": "E", "nonfinite": "N", "dead": "D", "saturated": "S"}
VAR = [(50, "auto"), (10, "auto"), (50, None), (10, None)]


def load(pattern):
    rows = []
    for path in sorted(glob.glob(pattern)):
        if ".series." in path:
            continue
        rows += [json.loads(l) for l in open(path)]
    return rows


def score(r):
    """FP/FN against the case's labels, corrected by the measured ground truth for dead units: a run
    whose ReLU modules (measured on 8 batches after training) have >= 50% units dead may report
    'dead'; an expected 'dead' that did not physically happen (< 50%) is not required."""
    if "error" in r:
        return False, [], [], None
    exp, acc, found = set(r["expected"]), set(r["acceptable"]), set(r["found"])
    gt = r.get("gt_dead_units") or {}
    note = None
    if gt:
        worst = max(gt.values())
        if worst >= 0.5:
            acc.add("dead")
        elif "dead" in exp:
            exp.discard("dead")
            acc.add("dead")
            note = f"dead not physically present (max dead share {worst:.2f})"
    fn, fp = sorted(exp - found), sorted(found - exp - acc)
    return not fn and not fp, fp, fn, note


def cell(r):
    if r is None:
        return "."
    if "error" in r:
        return "ERR"
    ok, fp, fn, note = score(r)
    s = "".join(ABBR[k] + ("!" if v == "critical" else "") for k, v in sorted(r["found"].items())) or "-"
    return s + ("" if ok else "*") + ("g" if note else "")


def table(rows, title):
    by = {}
    order = []
    for r in rows:
        if r["name"] not in by:
            order.append(r["name"])
        by.setdefault(r["name"], {})[(r["log_every"], r["clip"])] = r
    print(f"\n## {title}\n")
    print("legend: V vanishing, E exploding, N nonfinite, D dead, S saturated; ! critical; * wrong (FP or FN); "
          "g: label corrected by measured dead-unit share; . not run")
    print(f"{'case':44s} {'expected':10s} {'accept':8s} " + " ".join(f"{f'{n}/{c}':>9s}" for n, c in VAR) + "  loss first->last")
    n_ok = n_all = 0
    fp_runs, fn_runs = [], []
    for name in order:
        v = by[name]
        any_r = next(iter(v.values()))
        exp = "".join(ABBR[k] for k in any_r.get("expected", [])) or "-"
        acc = "".join(ABBR[k] for k in any_r.get("acceptable", [])) or ""
        loss = next((f"{r['loss_first']:.3g}->{r['loss_last']:.3g}" for r in v.values()
                     if r.get("loss_first") is not None and r.get("loss_last") is not None), "nan")
        print(f"{name:44s} {exp:10s} {acc:8s} " + " ".join(f"{cell(v.get(k)):>9s}" for k in VAR) + f"  {loss}")
        for r in v.values():
            ok, fp, fn, note = score(r)
            n_all += 1
            n_ok += ok
            if fp:
                fp_runs.append((r, fp))
            if fn:
                fn_runs.append((r, fn))
    n_fp_cases = len({r["name"] for r, _ in fp_runs})
    n_fn_cases = len({r["name"] for r, _ in fn_runs})
    print(f"\nruns correct: {n_ok}/{n_all}; runs with a false positive: {len(fp_runs)} ({n_fp_cases} cases); "
          f"runs with a false negative: {len(fn_runs)} ({n_fn_cases} cases)")
    groups = {}
    for name, v in by.items():
        for r in v.values():
            g = groups.setdefault(r.get("group", "?"), [0, 0])
            g[0] += score(r)[0]
            g[1] += 1
    print("by group: " + ", ".join(f"{k} {a}/{b} correct" for k, (a, b) in sorted(groups.items())))
    print("false positives (run: kinds):")
    for r, fp in fp_runs:
        print(f"   {r['name']} {r['log_every']}/{r['clip']}: {fp}")
    print("false negatives (run: kinds):")
    for r, fn in fn_runs:
        print(f"   {r['name']} {r['log_every']}/{r['clip']}: {fn}")
    return by


def main(argv):
    before = table(load(argv[0]), f"results: {argv[0]}")
    if len(argv) > 1:
        after = table(load(argv[1]), f"results: {argv[1]}")
        print("\n## changed verdicts (before -> after)\n")
        for name, v in before.items():
            for k, r in v.items():
                a = after.get(name, {}).get(k)
                if a is not None and cell(a) != cell(r):
                    print(f"{name:44s} {k[0]}/{k[1]}: {cell(r):>8s} -> {cell(a):8s}")


if __name__ == "__main__":
    main(sys.argv[1:] or [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")])
