"""A local report that needs no account: one self-contained HTML file (inline SVG, no scripts).

    python -m gradguard.report runs/gradguard.jsonl -o report.html

It shows the findings with their remedies, the gradient-flow heatmap (layer by log step, log10 of
the window-mean gradient norm) and the global norm over time.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Steps and the latest version of each finding from a JsonlSink file."""
    steps, findings = [], {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("type") == "step":
                steps.append(obj)
            elif obj.get("type") == "finding":
                findings[obj["kind"]] = obj
    return steps, sorted(findings.values(), key=lambda f: (f["step"], f["kind"]))


def _color(t: float) -> str:
    """t in [0, 1] -> a dark-blue to yellow ramp (viridis-like); NaN -> grey."""
    if not math.isfinite(t):
        return "#dddddd"
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    x = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    a, b, f = stops[i], stops[i + 1], x - i
    return "#%02x%02x%02x" % tuple(int(a[k] + (b[k] - a[k]) * f) for k in range(3))


def heatmap_svg(layers: Sequence[str], steps: Sequence[int], norms: np.ndarray, width: int = 760) -> str:
    """``norms``: (n_steps, n_layers). Rows are layers (first layer on top), columns are log steps."""
    n_steps, n_layers = norms.shape
    if n_steps == 0 or n_layers == 0:
        return "<p>No data.</p>"
    with np.errstate(divide="ignore", invalid="ignore"):
        logn = np.log10(np.where(norms > 0, norms, np.nan))
    finite = logn[np.isfinite(logn)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo or 1.0
    label_w, cell_h = 180, max(4, min(18, 480 // n_layers))
    cell_w = max(1.0, (width - label_w) / n_steps)
    height = cell_h * n_layers + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10" '
             'font-family="sans-serif">']
    for j in range(n_layers):
        y = j * cell_h
        if cell_h >= 8 or j in (0, n_layers - 1):
            parts.append(f'<text x="{label_w - 4}" y="{y + cell_h - 2}" text-anchor="end">'
                         f'{html.escape(layers[j][:28])}</text>')
        for i in range(n_steps):
            v = logn[i, j]
            title = f"{layers[j]} @ step {steps[i]}: " + (f"{norms[i, j]:.3g}" if np.isfinite(v) else "n/a")
            parts.append(f'<rect x="{label_w + i * cell_w:.1f}" y="{y}" width="{cell_w + 0.5:.1f}" height="{cell_h}" '
                         f'fill="{_color((v - lo) / span)}"><title>{html.escape(title)}</title></rect>')
    y0 = n_layers * cell_h + 14
    parts.append(f'<text x="{label_w}" y="{y0}">step {steps[0]}</text>')
    parts.append(f'<text x="{width}" y="{y0}" text-anchor="end">step {steps[-1]}</text>')
    parts.append(f'<text x="{label_w}" y="{y0 + 16}">colour: log10 gradient norm, {lo:.1f} (dark) to {hi:.1f} '
                 '(yellow); first layer on top</text></svg>')
    return "".join(parts)


def line_svg(xs: Sequence[float], ys: Sequence[float], width: int = 760, height: int = 180) -> str:
    pts = [(x, math.log10(y)) for x, y in zip(xs, ys) if y is not None and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return "<p>Not enough data.</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    sx = (width - 60) / ((x1 - x0) or 1)
    sy = (height - 30) / ((y1 - y0) or 1)
    path = " ".join(f"{50 + (x - x0) * sx:.1f},{height - 20 - (y - y0) * sy:.1f}" for x, y in pts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10" '
            f'font-family="sans-serif"><polyline fill="none" stroke="#3b528b" stroke-width="1.5" points="{path}"/>'
            f'<text x="2" y="12">1e{y1:.1f}</text><text x="2" y="{height - 20}">1e{y0:.1f}</text>'
            f'<text x="50" y="{height - 4}">step {x0:g}</text>'
            f'<text x="{width}" y="{height - 4}" text-anchor="end">step {x1:g}</text></svg>')


def render(steps: list[dict], findings: Iterable[dict], title: str = "gradguard report") -> str:
    findings = list(findings)
    layers = steps[-1]["layers"] if steps else []
    rows = [s for s in steps if s["layers"] == layers]
    norms = np.array([[np.nan if v is None else v for v in s["layer_norm_mean"]] for s in rows], dtype=float)
    xs = [s["step"] for s in rows]
    gmax = [s["scalars"].get("grad/norm/global_max") for s in rows]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:820px;margin:2em auto;color:#222}"
           ".critical{border-left:5px solid #c0392b}.warning{border-left:5px solid #e6a23c}"
           ".f{padding:.4em 1em;margin:.8em 0;background:#fafafa}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    if steps:
        last = steps[-1]["scalars"]
        out.append(f"<p>{len(steps)} log steps up to step {steps[-1]['step']}; {len(layers)} layers. "
                   f"Skipped steps: {int(last.get('gradguard/skipped_steps', 0))}, clipped steps: "
                   f"{int(last.get('gradguard/clipped_steps', 0))}.</p>")
    out.append(f"<h2>Findings ({len(findings)})</h2>")
    if not findings:
        out.append("<p>No findings: gradients look healthy.</p>")
    for f in findings:
        out.append(f"<div class='f {html.escape(f['severity'])}'><b>{html.escape(f['severity'].upper())} "
                   f"{html.escape(f['kind'])}</b> at step {f['step']}"
                   + (f" in {html.escape(', '.join(f['layers'][:8]))}" if f.get("layers") else "")
                   + f"<p>{html.escape(f['message'])}</p><ul>"
                   + "".join(f"<li>{html.escape(r)}</li>" for r in f.get("remedies", [])) + "</ul></div>")
    out.append("<h2>Gradient flow</h2>" + heatmap_svg(layers, xs, norms))
    out.append("<h2>Largest global gradient norm between log steps (log scale)</h2>" + line_svg(xs, gmax))
    out.append("</body></html>")
    return "".join(out)


def write_report(jsonl_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> str:
    """Render the JSON-lines file written by ``JsonlSink`` to HTML; returns the HTML file's path."""
    steps, findings = read_jsonl(jsonl_path)
    out_path = os.fspath(out_path or os.path.splitext(os.fspath(jsonl_path))[0] + ".html")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(render(steps, findings))
    return out_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gradguard.report", description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", help="the gradguard.jsonl file a JsonlSink wrote")
    parser.add_argument("-o", "--output", help="HTML file to write (default: next to the input)")
    args = parser.parse_args(argv)
    print(write_report(args.jsonl, args.output))


if __name__ == "__main__":
    main()
