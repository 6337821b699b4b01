"""A local report that needs no account: one self-contained HTML file (inline SVG, no script, no CDN).

    gradguard report RUN [RUN ...] -o report.html
    python -m gradguard.report RUN [RUN ...] -o report.html

RUN is the ``.jsonl`` file a ``JsonlSink`` wrote (``sinks="runs/x"`` or ``sinks="runs/x.jsonl"``), or
the directory holding its ``gradguard.jsonl``. Two or more runs are shown side by side (a run and
its fix). The page shows, per run:

- the findings first, each with its evidence as a small chart (vanishing, dead, saturated: the
  gradient RMS per layer, first to last, on a log axis; exploding, non-finite: the global norm of
  every step around the step it happened);
- the timeline: the global gradient norm of every optimizer step on a log axis, the clip threshold,
  clipped, skipped and spike steps, where clipping switched on and where findings were established;
- the gradient-flow heatmap (layer by log step, log colour scale with a colour bar, values on hover);
- the depth profile (gradient RMS per layer, first to last) at chosen log steps.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Sequence

import numpy as np

from gradguard import _svg
from gradguard._svg import esc, fmt
from gradguard.runlog import RunLog, RunLogError, read_run

PARTS = ("findings", "timeline", "heatmap", "profile")  # the sections every report has, per run

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1280px;color:#222;
padding:0 1em;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1em;margin:.2em 0 .4em}.sub{color:#666;font-size:.9em;margin:.2em 0 .8em}
.row{display:grid;gap:1.2em;grid-template-columns:repeat(var(--runs),minmax(0,1fr))}
.panel{min-width:0}.chart{width:100%;height:auto;display:block}
.f{padding:.5em .9em;margin:.6em 0;background:#fafafa;border-radius:4px}
.critical{border-left:5px solid #c0392b}.warning{border-left:5px solid #e6a23c}
.f p{margin:.3em 0}.f ul{margin:.3em 0 .5em 1.1em;padding:0}.cause{color:#555}
.sev{font-weight:700;font-size:.8em;padding:.1em .4em;border-radius:3px;color:#fff;margin-right:.4em}
.sev.critical{background:#c0392b;border:0}.sev.warning{background:#e6a23c;border:0}
.ok{color:#2e7d32}.stats{font-size:.9em;color:#444;margin:.2em 0}.stats b{color:#222}
.legend{font-size:.82em;color:#444;margin:.2em 0 .6em}.key{margin-right:1em;white-space:nowrap}
.key svg{vertical-align:middle}.warn{color:#a15c00;font-size:.9em}.nodata{color:#888}
"""


def profile_steps(run: RunLog, chosen: Sequence[int] | None = None, limit: int = 5) -> list[int]:
    """Indices into ``run.log_steps`` for the depth profile: the requested steps (nearest log step at
    or after each), or the first and last log step and those where findings were established."""
    ls = run.log_steps
    if ls.size == 0:
        return []

    def at(step):
        i = int(np.searchsorted(ls, step))
        return min(i, ls.size - 1)

    if chosen:
        wanted = [at(s) for s in chosen]
    else:
        wanted = [0] + [at(f["step"]) for f in run.findings] + [ls.size - 1]
    return sorted(dict.fromkeys(wanted))[:limit]


def _finding_html(run: RunLog, f: dict, width: int) -> str:
    sev = f.get("severity", "warning")
    layers = f.get("layers") or []
    where = (" in " + esc(", ".join(layers[:6])) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")) if layers else ""
    out = [f"<div class='f {esc(sev)}' data-kind='{esc(f['kind'])}'><h3><span class='sev {esc(sev)}'>"
           f"{esc(sev.upper())}</span>{esc(f['kind'])} <span class='sub'>established at step {f['step']}{where}</span>"
           f"</h3><p>{esc(f['message'])}</p>"]
    if f.get("cause"):
        out.append(f"<p class='cause'>Likely cause: {esc(f['cause'])}</p>")
    if f.get("remedies"):
        out.append("<b>Remedies</b><ul>" + "".join(f"<li>{esc(r)}</li>" for r in f["remedies"]) + "</ul>")
    out.append(evidence_chart(run, f, width))
    out.append("</div>")
    return "".join(out)


def evidence_chart(run: RunLog, f: dict, width: int = 520) -> str:
    """The chart that shows why a finding was made."""
    kind, step = f["kind"], int(f["step"])
    if kind in ("exploding", "nonfinite") or run.log_steps.size == 0:
        lo, hi = step - 40, step + 40
        if run.step.size:
            lo, hi = max(lo, int(run.step.min())), min(hi, int(run.step.max()))
        return _svg.timeline_svg(run, width=width, height=170, window=(lo, max(hi, lo + 1)), focus=step,
                                 part="evidence")
    values, what = run.depth_values
    usable = np.flatnonzero((np.nan_to_num(values) > 0).any(axis=1))  # log steps with finite gradients
    if usable.size == 0:
        return "<p class='nodata'>No finite per-layer gradients were recorded.</p>"
    i = profile_steps(run, [step])[0]
    if i not in usable:  # e.g. every step of that window was non-finite: the latest usable one before it
        before = usable[usable <= i]
        i = int(before[-1] if before.size else usable[0])
    series = [(f"step {run.log_steps[i]} (window mean)", values[i])]
    if i != usable[-1]:
        series.append((f"step {run.log_steps[usable[-1]]} (last usable log step)", values[usable[-1]]))
    return _svg.profile_svg(run.layers, series, what, width=width, height=180, part="evidence",
                            highlight=f.get("layers") or ())


def _run_stats(run: RunLog) -> str:
    sc = run.last_scalars
    n_steps = int(run.step.max()) + 1 if run.step.size else 0
    parts = [f"<b>{n_steps}</b> optimizer steps", f"<b>{run.log_steps.size}</b> log steps",
             f"<b>{len(run.layers)}</b> layers",
             f"clipped <b>{int(sc.get('gradguard/clipped_steps', run.clipped.sum()))}</b>",
             f"skipped <b>{int(sc.get('gradguard/skipped_steps', run.skipped.sum()))}</b>"]
    if sc.get("gradguard/loss_scale_skipped_steps"):  # fp16: the GradScaler's own overflow skips
        parts.append(f"skipped by the loss scaler <b>{int(sc['gradguard/loss_scale_skipped_steps'])}</b>")
    on = run.clip_enabled_step
    if on is not None:
        parts.append(f"clipping on from step <b>{on}</b>")
    finite = run.global_norm[np.isfinite(run.global_norm)]
    if finite.size:
        parts.append(f"global norm {fmt(float(finite.min()))} to {fmt(float(finite.max()))}")
    out = "<p class='stats'>" + ", ".join(parts) + "</p>"
    if not run.per_step:
        out += ("<p class='warn'>This log has no per-step trace (written by an older gradguard): one point per "
                "log step, the largest norm since the one before.</p>")
    for w in run.warnings:
        out += f"<p class='warn'>{esc(w)}</p>"
    return out


def render(runs: Sequence[RunLog], title: str = "gradguard report", profile_at: Sequence[int] | None = None) -> str:
    """The report of one or more runs as one HTML page (runs side by side)."""
    runs = list(runs)
    # columns: one run alone; pairs (a run and its fix) two by two; otherwise three abreast
    n = 1 if len(runs) <= 1 else 2 if len(runs) % 2 == 0 else 3
    width = 900 if n == 1 else 560 if n == 2 else 420

    def row(part: str, cells: Iterable[str]) -> str:
        return (f"<div class='row' data-part='{part}'>" +
                "".join(f"<div class='panel' data-run='{esc(r.name)}'>{c}</div>" for r, c in zip(runs, cells)) + "</div>")

    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{esc(title)}</title>"
           f"<style>{_CSS}</style></head><body style='--runs:{n}'>",
           f"<h1>{esc(title)}</h1><p class='sub'>{len(runs)} run{'s' * (len(runs) > 1)}: "
           + ", ".join(f"<b>{esc(r.name)}</b> <span class='sub'>({esc(r.path)})</span>" for r in runs) + "</p>"]
    out.append(row("header", (f"<h2>{esc(r.name)}</h2>" + _run_stats(r) for r in runs)))

    def findings_cell(r: RunLog) -> str:
        if not r.findings:
            return "<p class='ok'>No findings: gradients look healthy.</p>"
        return "".join(_finding_html(r, f, width) for f in r.findings)

    out.append("<h2>Findings</h2>" + row("findings", (findings_cell(r) for r in runs)))
    out.append("<h2>Global gradient norm, every optimizer step</h2>" + _svg.legend_html()
               + row("timeline", (_svg.timeline_svg(r, width=width) for r in runs)))

    def heat(r: RunLog) -> str:
        values, what = r.depth_values
        return _svg.heatmap_svg(r.layers, [int(s) for s in r.log_steps], values, what, width=width)

    out.append("<h2>Gradient flow: layer by log step</h2><p class='sub'>First layer on top. Hover a cell for its "
               "value; grey: no gradient in that window.</p>" + row("heatmap", (heat(r) for r in runs)))

    def profile(r: RunLog) -> str:
        values, what = r.depth_values
        idx = profile_steps(r, profile_at)
        if not idx:
            return "<p class='nodata'>No log steps recorded yet.</p>"
        return _svg.profile_svg(r.layers, [(f"step {r.log_steps[i]}", values[i]) for i in idx], what, width=width)

    out.append("<h2>Depth profile</h2><p class='sub'>Gradient RMS per layer, first layer to last, at chosen log "
               "steps (window means). Healthy nets stay within a few orders of magnitude; a collapse toward the "
               "input side is vanishing gradients.</p>" + row("profile", (profile(r) for r in runs)))
    out.append("<p class='sub'>Written by gradguard.</p></body></html>")
    return "".join(out)


def write_report(runs: str | os.PathLike | Sequence[str | os.PathLike], out_path: str | os.PathLike | None = None,
                 *, names: Sequence[str] | None = None, title: str | None = None,
                 profile_at: Sequence[int] | None = None) -> str:
    """Render one or more JSON-lines logs written by ``JsonlSink`` to one HTML file (runs side by
    side); returns its path. Default output: next to the (first) log, with ``.html``. Raises
    ``RunLogError`` (one line) for a log that cannot be read or a report that cannot be written."""
    paths = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    if not paths:
        raise ValueError("write_report needs at least one run")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"names must have one entry per run ({len(paths)}), got {list(names)!r}")
    logs = [read_run(p, names[i] if names else None) for i, p in enumerate(paths)]
    return _write(logs, out_path, title, profile_at)


def _write(logs: Sequence[RunLog], out_path, title, profile_at) -> str:
    out_path = os.fspath(out_path) if out_path is not None else os.path.splitext(logs[0].path)[0] + ".html"
    page = render(logs, title or "gradguard report: " + " vs ".join(r.name for r in logs), profile_at)
    try:
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise RunLogError(f"{out_path}: cannot write the report ({exc.strerror or exc})") from None
    return out_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a gradguard.jsonl file (or the directory holding it); two or more are shown side by side")
    parser.add_argument("-o", "--output", help="HTML file to write (default: next to the first run, .html)")
    parser.add_argument("--name", action="append", dest="names", metavar="NAME",
                        help="a label per run, in order (default: the file or directory name)")
    parser.add_argument("--title", help="the page title")
    parser.add_argument("--profile-steps", metavar="STEPS", type=_int_list,
                        help="comma-separated optimizer steps for the depth profile (default: first, last, and "
                             "where findings were established)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.names and len(args.names) != len(args.runs):
            raise RunLogError(f"--name given {len(args.names)} times for {len(args.runs)} runs")
        logs = [read_run(p, args.names[i] if args.names else None) for i, p in enumerate(args.runs)]
        for log in logs:
            for w in log.warnings:
                print(f"gradguard: warning: {w}", file=sys.stderr)
        out = _write(logs, args.output, args.title, args.profile_steps)
    except RunLogError as exc:
        print(f"gradguard: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradguard.report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
