"""The terminal summary, for a remote machine without a browser:

    gradguard summary RUN [RUN ...]

prints each run's findings with their remedies and a compact text timeline: a sparkline of the
global gradient norm (log scale, every step binned into the line's width, the largest norm of each
bin) and a line of marks under it (``X`` skipped, ``!`` spike, ``c`` clipped, ``^`` a finding
established, ``|`` clipping switched on).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import textwrap
from typing import Sequence

import numpy as np

from gradguard._svg import fmt
from gradguard.runlog import RunLog, RunLogError, read_run

BARS = "▁▂▃▄▅▆▇█"
ASCII_BARS = "_.-=+*#@"
# marks in order of precedence (the stronger wins a column)
MARKS = (("finding", "^"), ("skipped", "X"), ("clip_on", "|"), ("spike", "!"), ("clipped", "c"))


def _bins(n_steps: int, width: int) -> list[tuple[int, int]]:
    width = max(1, min(width, n_steps))
    edges = np.linspace(0, n_steps, width + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def timeline(run: RunLog, width: int = 72, ascii_only: bool = False) -> list[str]:
    """Three lines: the sparkline, the marks, and the step axis."""
    bars = ASCII_BARS if ascii_only else BARS
    if run.step.size == 0:
        return ["(no steps recorded)"]
    bins = _bins(run.step.size, width)
    g = run.global_norm
    peaks = []
    for a, b in bins:
        seg = g[a:b]
        seg = seg[np.isfinite(seg) & (seg > 0)]
        peaks.append(float(seg.max()) if seg.size else math.nan)
    finite = [p for p in peaks if math.isfinite(p)]
    lo, hi = (math.log10(min(finite)), math.log10(max(finite))) if finite else (0.0, 1.0)
    span = hi - lo or 1.0
    spark = "".join(" " if not math.isfinite(p) else bars[min(len(bars) - 1, int((math.log10(p) - lo) / span
                                                                                  * len(bars)))]
                    for p in peaks)
    found = {int(f["step"]) for f in run.findings}
    on = run.clip_enabled_step
    marks = []
    for a, b in bins:
        steps = run.step[a:b]
        present = {
            "finding": any(int(s) in found for s in steps),
            "skipped": bool(run.skipped[a:b].any() or run.nonfinite[a:b].any()),
            "clip_on": on is not None and int(steps[0]) <= on <= int(steps[-1]),
            "spike": bool(run.spike[a:b].any()),
            "clipped": bool(run.clipped[a:b].any()),
        }
        marks.append(next((m for k, m in MARKS if present[k]), " "))
    first, last = int(run.step[0]), int(run.step[-1])
    axis = f"step {first}".ljust(len(spark) - len(str(last))) + str(last)
    return [spark, "".join(marks), axis]


def summarize(run: RunLog, width: int = 72, ascii_only: bool = False) -> str:
    sc = run.last_scalars
    lines = [f"== {run.name}  ({run.path})"]
    n_steps = int(run.step.max()) + 1 if run.step.size else 0
    finite = run.global_norm[np.isfinite(run.global_norm)]
    stats = [f"{n_steps} steps", f"{len(run.layers)} layers",
             f"clipped {int(sc.get('gradguard/clipped_steps', run.clipped.sum()))}",
             f"skipped {int(sc.get('gradguard/skipped_steps', run.skipped.sum()))}"]
    if sc.get("gradguard/loss_scale_skipped_steps"):  # fp16: the GradScaler's own overflow skips
        stats.append(f"skipped by the loss scaler {int(sc['gradguard/loss_scale_skipped_steps'])}")
    if run.clip_enabled_step is not None:
        stats.append(f"clipping on from step {run.clip_enabled_step}")
    lines.append("   " + ", ".join(stats))
    for w in run.warnings:
        lines.append(f"   warning: {w}")
    lines.append("")
    if finite.size:
        lines.append(f"   global grad norm, log scale, {fmt(float(finite.min()))} .. {fmt(float(finite.max()))}"
                     + ("" if run.per_step else " (one point per log step: this log has no per-step trace)"))
    lines += ["   " + l for l in timeline(run, width, ascii_only)]
    lines.append("   marks: ^ finding established  X skipped/non-finite  | clipping on  ! spike  c clipped")
    lines.append("")
    if not run.findings:
        lines.append("   No findings: gradients look healthy.")
    wrap = max(40, width + 3)
    for f in run.findings:
        where = f" in {', '.join(f['layers'][:4])}{', ...' if len(f['layers']) > 4 else ''}" if f.get("layers") else ""
        lines.append(f"   {f['severity'].upper()} {f['kind']} at step {f['step']}{where}")
        lines += textwrap.wrap(f["message"], wrap, initial_indent="     ", subsequent_indent="     ")
        if f.get("cause"):
            lines += textwrap.wrap("Likely cause: " + f["cause"], wrap, initial_indent="     ",
                                   subsequent_indent="     ")
        for r in f.get("remedies", []):
            lines += textwrap.wrap(r, wrap, initial_indent="     - ", subsequent_indent="       ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a gradguard.jsonl file (or the directory holding it)")
    parser.add_argument("--width", type=int, default=None, help="timeline width in characters (default: the terminal's)")
    parser.add_argument("--ascii", action="store_true", help="plain ASCII, no block characters")


def run_command(args: argparse.Namespace) -> int:
    width = args.width or max(20, min(shutil.get_terminal_size((80, 24)).columns - 6, 120))
    if width < 10:
        print(f"gradguard: error: --width must be >= 10, got {width}", file=sys.stderr)
        return 2
    ascii_only = args.ascii or (sys.stdout.encoding or "").lower() not in ("utf-8", "utf8")
    try:
        runs = [read_run(p) for p in args.runs]
    except RunLogError as exc:
        print(f"gradguard: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summarize(r, width, ascii_only) for r in runs), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradguard summary", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
