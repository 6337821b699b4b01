"""Hand-made SVG charts for the report: no script, no library, readable offline and in any browser.

Every value a reader may want is in a ``<title>`` (the browser shows it on hover).
"""

from __future__ import annotations

import html
import math
from typing import Iterable, Sequence

import numpy as np

FONT = 'font-family="system-ui,sans-serif" font-size="11"'
SERIES = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
MARK = {"clipped": "#f39c12", "skipped": "#c0392b", "spike": "#8e44ad", "finding": "#555555",
        "threshold": "#e67e22", "clip_on": "#e67e22"}


DOTTED = ' stroke-dasharray="2,3"'


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def fmt(v: float) -> str:
    """A number as people write it: 0.003, 12.5, 4.2e+05, 1e-12."""
    if v is None or not math.isfinite(v):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e5:
        return f"{v:.3g}"
    return f"{v:.2g}"


def power_label(e: int) -> str:
    """10^e as a tick label: plain for small exponents, 1e-12 beyond."""
    if 0 <= e <= 4:
        return str(10 ** e)
    if -3 <= e < 0:
        return f"{10.0 ** e:g}"
    return f"1e{e}"


def log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Ticks for a log axis spanning [lo, hi] (log10 values): powers of ten (every k-th when the
    span is wide), with 2 and 5 between them when it is under two decades."""
    a, b = math.floor(lo), math.ceil(hi)
    step = max(1, math.ceil((b - a) / 8))
    ticks = [(float(e), power_label(e)) for e in range(a, b + 1) if e % step == 0]
    if b - a <= 2:
        for e in range(a, b):
            for m in ((2, 5) if hi - lo > 0.7 else (2, 3, 4, 5, 6, 8)):
                ticks.append((e + math.log10(m), fmt(m * 10.0 ** e)))
    return sorted(t for t in ticks if lo - 1e-9 <= t[0] <= hi + 1e-9)


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round-number ticks (1, 2, 5 x 10^k) for a linear axis."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_range(values: Iterable[float], pad: float = 0.05) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x) and x > 0], dtype=np.float64)
    if v.size == 0:
        return -1.0, 1.0
    lo, hi = float(np.log10(v.min())), float(np.log10(v.max()))
    if hi - lo < 0.5:
        mid = (hi + lo) / 2
        lo, hi = mid - 0.25, mid + 0.25
    span = hi - lo
    return lo - pad * span, hi + pad * span


def viridis(t: float) -> str:
    """t in [0, 1] -> viridis colour; NaN -> light grey."""
    if not math.isfinite(t):
        return "#e0e0e0"
    stops = [(68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
             (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)]
    x = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    a, b, f = stops[i], stops[i + 1], x - i
    return "#%02x%02x%02x" % tuple(int(round(a[k] + (b[k] - a[k]) * f)) for k in range(3))


class Frame:
    """A plot area with a linear x axis and a log10 y axis."""

    def __init__(self, width, height, x0, x1, ylo, yhi, left=58, right=12, top=10, bottom=34):
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.x0, self.x1 = float(x0), float(x1) if x1 > x0 else float(x0) + 1.0
        self.ylo, self.yhi = ylo, yhi

    def x(self, v) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def y(self, v) -> float:  # v: a positive value (log axis)
        lv = math.log10(v)
        lv = min(max(lv, self.ylo), self.yhi)
        return self.top + (self.yhi - lv) / (self.yhi - self.ylo) * (self.h - self.top - self.bottom)

    def axes(self, xlabel: str, ylabel: str, xticks: Sequence[tuple[float, str]] | None = None) -> list[str]:
        out = []
        bottom, right = self.h - self.bottom, self.w - self.right
        for lv, label in log_ticks(self.ylo, self.yhi):
            yy = self.top + (self.yhi - lv) / (self.yhi - self.ylo) * (self.h - self.top - self.bottom)
            major = abs(lv - round(lv)) < 1e-9
            out.append(f'<line x1="{self.left}" x2="{right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e5e5e5"'
                       f'{"" if major else DOTTED}/>'
                       f'<text x="{self.left - 4}" y="{yy + 3.5:.1f}" text-anchor="end">{esc(label)}</text>')
        if xticks is None:
            xticks = [(t, f"{t:g}") for t in nice_ticks(self.x0, self.x1)]
        for t, label in xticks:
            xx = self.x(t)
            out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{bottom}" y2="{bottom + 4}" stroke="#888"/>'
                       f'<text x="{xx:.1f}" y="{bottom + 15}" text-anchor="middle">{esc(label)}</text>')
        out.append(f'<rect x="{self.left}" y="{self.top}" width="{right - self.left}" height="{bottom - self.top}" '
                   'fill="none" stroke="#999"/>')
        out.append(f'<text x="{(self.left + right) / 2:.0f}" y="{self.h - 3}" text-anchor="middle" fill="#555">'
                   f'{esc(xlabel)}</text>')
        out.append(f'<text transform="translate(11,{(self.top + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle" '
                   f'fill="#555">{esc(ylabel)}</text>')
        return out


def svg(width, height, body: Sequence[str], part: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-part="{esc(part)}" role="img" '
            f'aria-label="{esc(label)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" {FONT}>'
            + "".join(body) + "</svg>")


def _polyline(frame: Frame, xs, ys, colour: str, width: float = 1.4, dash: str | None = None) -> list[str]:
    """Line segments through the finite positive points; gaps where a value is missing."""
    out, pts = [], []
    dashed = f'stroke-dasharray="{dash}" ' if dash else ""

    def flush():
        if len(pts) == 1:
            out.append(f'<circle cx="{pts[0][0]:.1f}" cy="{pts[0][1]:.1f}" r="1.5" fill="{colour}"/>')
        elif pts:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" {dashed}points="{d}"/>')
        pts.clear()

    for xv, yv in zip(xs, ys):
        if yv is None or not math.isfinite(yv) or yv <= 0:
            flush()
        else:
            pts.append((frame.x(xv), frame.y(yv)))
    flush()
    return out


def timeline_svg(run, width: int = 560, height: int = 230, window: tuple[int, int] | None = None,
                 focus: int | None = None, part: str = "timeline") -> str:
    """Global gradient norm of every optimizer step (log axis), the clip threshold (dashed), and
    marks: clipped steps (orange), skipped steps (red, at the top), spikes (purple rings), the
    steps where findings were established (grey lines) and where clipping switched on."""
    step, norm = run.step, run.global_norm
    if window is not None:
        sel = (step >= window[0]) & (step <= window[1])
    else:
        sel = np.ones(step.shape, bool)
    if sel.sum() == 0:
        return '<p class="nodata">No steps recorded.</p>'
    s, g, thr = step[sel], norm[sel], run.clip_threshold[sel]
    ylo, yhi = log_range(list(g) + [v for v in thr if math.isfinite(v)])
    x0, x1 = (window if window is not None else (float(s.min()), float(s.max())))
    f = Frame(width, height, x0, x1, ylo, yhi)
    body = f.axes("optimizer step", "global grad norm")
    body += _polyline(f, s, g, SERIES[0])
    if np.isfinite(thr).any():
        body += _polyline(f, s, thr, MARK["threshold"], 1.2, dash="5,3")
    marks = []
    for k, name in (("clipped", "clipped"), ("spike", "spike"), ("nonfinite", "skipped")):
        m = getattr(run, k)[sel]
        for st, gv, skipped in zip(s[m], g[m], run.skipped[sel][m]):
            xx = f.x(st)
            tip = f"step {st}: {name}, global norm {fmt(gv)}"
            if k == "nonfinite":
                what = "skipped (weights untouched)" if skipped else "reached the weights"
                marks.append(f'<path d="M{xx - 4:.1f},{f.top + 1} L{xx + 4:.1f},{f.top + 1} L{xx:.1f},{f.top + 8}Z" '
                             f'fill="{MARK[name] if skipped else "#7f0000"}" class="mark-skipped">'
                             f'<title>{esc(f"step {st}: non-finite gradients, {what}")}</title></path>')
            elif k == "spike":
                marks.append(f'<circle cx="{xx:.1f}" cy="{f.y(gv):.1f}" r="5" fill="none" stroke="{MARK[name]}" '
                             f'stroke-width="1.5" class="mark-spike"><title>{esc(tip)}</title></circle>')
            else:
                marks.append(f'<circle cx="{xx:.1f}" cy="{f.y(gv):.1f}" r="2.6" fill="{MARK[name]}" '
                             f'class="mark-clipped"><title>{esc(tip)}</title></circle>')
    on = run.clip_enabled_step
    if on is not None and x0 <= on <= x1:
        xx = f.x(on)
        body.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{f.top}" y2="{height - f.bottom}" stroke="{MARK["clip_on"]}" '
                    f'stroke-width="1.2" class="mark-clip-on"><title>step {on}: clipping switched on</title></line>')
    for k, fd in enumerate(run.findings):
        st = fd["step"]
        if x0 <= st <= x1:
            xx, tip = f.x(st), f"step {st}: {fd['kind']} established"
            body.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{f.top}" y2="{height - f.bottom}" stroke="{MARK["finding"]}" '
                        f'stroke-dasharray="3,2" class="mark-finding"><title>{esc(tip)}'
                        f'</title></line><text x="{xx + 2:.1f}" y="{f.top + 18 + 11 * (k % 4)}" fill="{MARK["finding"]}" font-size="10">'
                        f'{esc(fd["kind"])}</text>')
    if focus is not None and x0 <= focus <= x1:
        xx = f.x(focus)
        body.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{f.top}" y2="{height - f.bottom}" stroke="#c0392b" '
                    'stroke-width="1.5"/>')
    # one invisible hover band per step (values on hover) when there are few enough of them
    if sel.sum() <= 1500:
        half = max((f.x(x1) - f.x(x0)) / max(len(s), 1) / 2, 0.5)
        for st, gv, tv in zip(s, g, thr):
            xx = f.x(st)
            tip = f"step {st}: global norm {fmt(gv)}" + (f", clip threshold {fmt(tv)}" if math.isfinite(tv) else "")
            body.append(f'<rect x="{xx - half:.1f}" y="{f.top}" width="{2 * half:.1f}" height="{height - f.top - f.bottom}" '
                        f'fill="transparent"><title>{esc(tip)}</title></rect>')
    body += marks
    return svg(width, height, body, part, "global gradient norm per optimizer step")


def legend_html() -> str:
    items = [("line", SERIES[0], "global norm (every step)"), ("dash", MARK["threshold"], "clip threshold"),
             ("dot", MARK["clipped"], "clipped"), ("ring", MARK["spike"], "spike"), ("tri", MARK["skipped"], "skipped"),
             ("vline", MARK["clip_on"], "clipping switched on"), ("vdash", MARK["finding"], "finding established")]
    out = []
    for kind, colour, label in items:
        shape = {"line": f'<line x1="0" x2="16" y1="6" y2="6" stroke="{colour}" stroke-width="2"/>',
                 "dash": f'<line x1="0" x2="16" y1="6" y2="6" stroke="{colour}" stroke-dasharray="4,2" stroke-width="1.5"/>',
                 "dot": f'<circle cx="8" cy="6" r="3" fill="{colour}"/>',
                 "ring": f'<circle cx="8" cy="6" r="4.5" fill="none" stroke="{colour}" stroke-width="1.5"/>',
                 "tri": f'<path d="M3,2 L13,2 L8,10Z" fill="{colour}"/>',
                 "vline": f'<line x1="8" x2="8" y1="0" y2="12" stroke="{colour}" stroke-width="1.5"/>',
                 "vdash": f'<line x1="8" x2="8" y1="0" y2="12" stroke="{colour}" stroke-dasharray="3,2"/>'}[kind]
        out.append(f'<span class="key"><svg width="16" height="12">{shape}</svg> {esc(label)}</span>')
    return '<div class="legend">' + "".join(out) + "</div>"


def heatmap_svg(layers: Sequence[str], steps: Sequence[int], values: np.ndarray, what: str,
                width: int = 560, part: str = "heatmap") -> str:
    """``values``: (log steps, layers). Rows are layers (first layer on top), columns log steps,
    colour the log10 value, with a colour bar; every cell's value is in its hover title."""
    n_steps, n_layers = values.shape if values.ndim == 2 else (0, 0)
    if n_steps == 0 or n_layers == 0:
        return '<p class="nodata">No log steps recorded yet.</p>'
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.log10(np.where(values > 0, values, np.nan))
    finite = logv[np.isfinite(logv)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    label_w = min(150, 12 + 6 * max(len(n) for n in layers))
    bar_w, top = 78, 8
    cell_h = max(3, min(16, 420 // n_layers))
    plot_w = width - label_w - bar_w
    cell_w = plot_w / n_steps
    height = top + cell_h * n_layers + 40
    body = []
    label_every = max(1, math.ceil(11 / cell_h))
    for j in range(n_layers):
        y = top + j * cell_h
        if j % label_every == 0 or j == n_layers - 1:
            name = layers[j] if len(layers[j]) <= 24 else "…" + layers[j][-23:]
            body.append(f'<text x="{label_w - 4}" y="{y + cell_h / 2 + 3.5:.1f}" text-anchor="end" font-size="10">'
                        f'{esc(name)}<title>{esc(layers[j])}</title></text>')
        for i in range(n_steps):
            v = logv[i, j]
            tip = f"{layers[j]}, step {steps[i]}: {what} {fmt(values[i, j]) if np.isfinite(v) else 'n/a (no gradient)'}"
            body.append(f'<rect x="{label_w + i * cell_w:.2f}" y="{y}" width="{cell_w + 0.3:.2f}" height="{cell_h}" '
                        f'fill="{viridis((v - lo) / (hi - lo))}"><title>{esc(tip)}</title></rect>')
    yb = top + n_layers * cell_h
    for i in np.unique(np.linspace(0, n_steps - 1, min(n_steps, 7)).round().astype(int)):
        xx = label_w + (i + 0.5) * cell_w
        body.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{yb}" y2="{yb + 4}" stroke="#888"/>'
                    f'<text x="{xx:.1f}" y="{yb + 15}" text-anchor="middle">{steps[i]}</text>')
    body.append(f'<text x="{label_w + plot_w / 2:.0f}" y="{yb + 30}" text-anchor="middle" fill="#555">log step '
                '(each column: the mean over the steps since the previous one)</text>')
    # colour bar: log10 from lo (bottom) to hi (top), labelled at powers of ten
    bx, bh = width - bar_w + 10, cell_h * n_layers
    body.append('<g class="colorbar">')
    for k in range(40):
        t0 = k / 40
        body.append(f'<rect x="{bx}" y="{top + bh * (1 - (k + 1) / 40):.2f}" width="12" height="{bh / 40 + 0.4:.2f}" '
                    f'fill="{viridis(t0 + 0.0125)}"/>')
    for lv, label in log_ticks(lo, hi):
        yy = top + bh * (1 - (lv - lo) / (hi - lo))
        body.append(f'<line x1="{bx + 12}" x2="{bx + 15}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#555"/>'
                    f'<text x="{bx + 17}" y="{yy + 3.5:.1f}" font-size="10">{esc(label)}</text>')
    body.append(f'<text transform="translate({width - 2},{top + bh / 2:.0f}) rotate(-90)" text-anchor="middle" '
                f'font-size="10" fill="#555">{esc(what)}</text></g>')
    return svg(width, height, body, part, f"{what} per layer and log step")


def profile_svg(layers: Sequence[str], series: Sequence[tuple[str, np.ndarray]], what: str, width: int = 560,
                height: int = 230, part: str = "profile", highlight: Sequence[str] = ()) -> str:
    """The depth profile: one value per layer, first layer on the left, log y axis, one line per
    series (e.g. per chosen step). ``highlight``: layer names to mark (a finding's layers)."""
    n = len(layers)
    if n == 0 or not series:
        return '<p class="nodata">No layers recorded.</p>'
    ylo, yhi = log_range(np.concatenate([np.asarray(v, dtype=np.float64) for _, v in series]))
    f = Frame(width, height, 0, max(n - 1, 1), ylo, yhi, bottom=46)
    idx = np.unique(np.linspace(0, n - 1, min(n, 8)).round().astype(int))
    ticks = [(float(i), (layers[i] if len(layers[i]) <= 12 else "…" + layers[i][-11:])) for i in idx]
    body = f.axes("layer, first (input side) to last (output side)", what, xticks=ticks)
    hl = set(highlight)
    for i, name in enumerate(layers):
        if name in hl:
            xx = f.x(i)
            body.append(f'<rect x="{xx - 3:.1f}" y="{f.top}" width="6" height="{height - f.top - f.bottom}" '
                        f'fill="#c0392b" opacity="0.12"><title>{esc(name)} (named by the finding)</title></rect>')
    for k, (label, vals) in enumerate(series):
        colour = SERIES[k % len(SERIES)]
        body += _polyline(f, range(n), vals, colour, 1.6)
        for i, v in enumerate(vals):
            if v is not None and math.isfinite(v) and v > 0:
                body.append(f'<circle cx="{f.x(i):.1f}" cy="{f.y(v):.1f}" r="2.4" fill="{colour}">'
                            f'<title>{esc(f"{layers[i]} ({label}): {what} {fmt(v)}")}</title></circle>')
    lx = f.left + 6
    for k, (label, _) in enumerate(series):
        body.append(f'<text x="{lx}" y="{f.top + 13 + 13 * k}" fill="{SERIES[k % len(SERIES)]}" font-size="10">'
                    f'— {esc(label)}</text>')
    return svg(width, height, body, part, f"{what} per layer")
