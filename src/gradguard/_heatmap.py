"""The gradient-flow heatmap as an image (for W&B and TensorBoard), drawn with matplotlib's Agg
canvas directly so the user's pyplot state and backend are left alone; and the bounded column
store both sinks keep it in."""

from __future__ import annotations

import warnings

import numpy as np


class HeatmapColumns:
    """One column (log10 window-mean gradient norm per layer) per kept log step. Keeps every
    ``stride``-th log step, doubling the stride (and dropping every other column) when full, so the
    columns stay evenly spaced and memory stays bounded. A new layer layout starts a new picture."""

    def __init__(self, max_columns: int = 400):
        self.max_columns = max_columns
        self.layer_names: tuple[str, ...] = ()
        self.columns: list[np.ndarray] = []
        self.steps: list[int] = []
        self.stride, self.seen, self.undrawn = 1, 0, False

    def add(self, layer_names, layer_norm_mean, step: int) -> None:
        if tuple(layer_names) != self.layer_names:
            self.layer_names = tuple(layer_names)
            self.columns, self.steps, self.stride, self.seen = [], [], 1, 0
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            col = np.log10(np.asarray(layer_norm_mean, dtype=np.float64))
        self.columns.append(np.where(np.isfinite(col), col, np.nan).astype(np.float32))
        self.steps.append(int(step))
        self.undrawn = True
        if len(self.columns) > self.max_columns:
            self.columns, self.steps = self.columns[::2], self.steps[::2]
            self.stride *= 2

    def render(self) -> np.ndarray | None:
        self.undrawn = False
        if not self.columns:
            return None
        return render_heatmap(np.stack(self.columns, axis=1), self.layer_names, self.steps)


def render_heatmap(values: np.ndarray, layer_names: tuple[str, ...], steps: list[int]) -> np.ndarray | None:
    """An RGB uint8 image (H, W, 3) of ``values`` (layers x log steps, log10 norms); None without
    matplotlib (with one warning)."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("gradguard: matplotlib is not installed, so no gradient-flow heatmap is drawn",
                      RuntimeWarning, stacklevel=2)
        return None
    n_layers, n_steps = values.shape
    fig = Figure(figsize=(8, min(2.0 + 0.22 * n_layers, 14)), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: no gradient (or exactly 0) in that window
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    rows = np.unique(np.linspace(0, n_layers - 1, min(n_layers, 40)).round().astype(int))
    ax.set_yticks(rows, [layer_names[i] for i in rows], fontsize=7)
    cols = np.unique(np.linspace(0, n_steps - 1, min(n_steps, 8)).round().astype(int))
    ax.set_xticks(cols, [str(steps[i]) for i in cols], fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (forward order)")
    ax.set_title("gradient flow: log10 per-layer gradient norm", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 L2 norm")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


