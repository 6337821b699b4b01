"""gradguard in TensorBoard: scalars, the global norm of every step, gradient histograms, the
gradient-flow heatmap as an image, and findings as text.

    from gradguard.tensorboard import TensorBoardSink

    guard = GradGuard(model, sinks=[TensorBoardSink("runs/exp1")])            # plain PyTorch
    model.fit(..., callbacks=[GradGuardCallback(sinks=[TensorBoardSink("runs/exp1")])])   # Keras
    TensorBoardSink(writer=summary_writer)   # an existing torch / tensorboardX SummaryWriter, e.g.
                                             # Lightning's TensorBoardLogger.experiment

What is written, against the optimizer step (0-based, as ``Finding.step``):

- the record's scalars under their logged keys (``grad/norm/global``, ``grad/norm/<layer>``, ...),
  unless ``scalars=False`` (Lightning's TensorBoardLogger already gets them from the Trainer);
- ``grad/norm/global_every_step`` and ``gradguard/clip_threshold_every_step``: every optimizer step, not
  only log steps (from the record's per-step trace), so a spike between two log steps shows at its step;
- ``grad/hist/<layer>``: a histogram of each logged layer's gradient values on log steps;
- ``gradguard/gradient_flow``: the heatmap image (layer by log step, log10 window-mean gradient norm),
  every ``heatmap_every`` log steps and at ``close()`` (needs matplotlib);
- ``gradguard/finding/<kind>``: each new or updated finding as text, with its cause and remedies.

Dependency: with a path, the sink writes event files with the ``tensorboard`` package alone (its
``EventFileWriter`` and protos, which ``torch.utils.tensorboard`` itself uses): ``torch.utils.tensorboard``
would make Keras users on TensorFlow or JAX install torch, and ``tensorboardX`` is a separate copy of the
same protos maintained apart from TensorBoard. With ``writer=`` any object with the ``SummaryWriter``
methods (``add_scalar``, ``add_histogram_raw``, ``add_image``, ``add_text``) is used as it is and the
``tensorboard`` package is not needed here.
"""

from __future__ import annotations

import io
import math
import os
import time
from typing import Any

import numpy as np

from gradguard._heatmap import HeatmapColumns
from gradguard.findings import Finding
from gradguard.sinks import LogRecord, Sink

__all__ = ["TensorBoardSink"]


class _EventWriter:
    """The few ``SummaryWriter`` methods the sink needs, on TensorBoard's own event-file writer."""

    def __init__(self, log_dir: str):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.plugins.text.summary_v2 import text_pb
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise ImportError('TensorBoardSink(log_dir) needs TensorBoard: pip install "gradguard[tensorboard]" '
                              "(or pass writer= an existing SummaryWriter)") from exc
        self._event_pb2, self._summary_pb2, self._text_pb = event_pb2, summary_pb2, text_pb
        self._writer = EventFileWriter(log_dir, flush_secs=10)

    def _add(self, value, step: int) -> None:
        summary = self._summary_pb2.Summary(value=[value])
        self._writer.add_event(self._event_pb2.Event(summary=summary, wall_time=time.time(), step=int(step)))

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self._add(self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value)), global_step)

    def add_histogram_raw(self, tag, min, max, num, sum, sum_squares, bucket_limits, bucket_counts, global_step):
        hist = self._summary_pb2.HistogramProto(min=float(min), max=float(max), num=float(num), sum=float(sum),
                                                sum_squares=float(sum_squares), bucket_limit=list(map(float, bucket_limits)),
                                                bucket=list(map(float, bucket_counts)))
        self._add(self._summary_pb2.Summary.Value(tag=tag, histo=hist), global_step)

    def add_image(self, tag: str, img: np.ndarray, global_step: int, dataformats: str = "HWC") -> None:
        from matplotlib.image import imsave

        buf = io.BytesIO()
        imsave(buf, img, format="png")
        image = self._summary_pb2.Summary.Image(height=img.shape[0], width=img.shape[1], colorspace=3,
                                                encoded_image_string=buf.getvalue())
        self._add(self._summary_pb2.Summary.Value(tag=tag, image=image), global_step)

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        summary = self._text_pb(tag, text)
        self._writer.add_event(self._event_pb2.Event(summary=summary, wall_time=time.time(), step=int(global_step)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TensorBoardSink(Sink):
    """Send gradguard's records and findings to TensorBoard.

    Args:
        log_dir: the directory for the event files (created if needed). Give this or ``writer``.
        writer: an existing ``SummaryWriter`` (torch.utils.tensorboard or tensorboardX), e.g.
            ``TensorBoardLogger.experiment``; it is flushed but not closed by the sink.
        scalars: write the record's scalars (off when another logger already writes them).
        histograms: per-layer gradient histograms on log steps (makes the adapter compute them).
        every_step: the global norm and clip threshold of every optimizer step.
        heatmap_every: draw the gradient-flow heatmap every this many log steps (and at close); 0: off.
        max_heatmap_columns: the heatmap keeps at most this many log steps, evenly spread.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None, scalars: bool = True,
                 histograms: bool = True, every_step: bool = True, heatmap_every: int = 10,
                 max_heatmap_columns: int = 400):
        if (log_dir is None) == (writer is None):
            raise ValueError(f"give TensorBoardSink either log_dir or writer, got log_dir={log_dir!r}, writer={writer!r}")
        for name, value in (("scalars", scalars), ("histograms", histograms), ("every_step", every_step)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if isinstance(heatmap_every, bool) or not isinstance(heatmap_every, int) or heatmap_every < 0:
            raise ValueError(f"heatmap_every must be an int >= 0, got {heatmap_every!r}")
        if isinstance(max_heatmap_columns, bool) or not isinstance(max_heatmap_columns, int) or max_heatmap_columns < 2:
            raise ValueError(f"max_heatmap_columns must be an int >= 2, got {max_heatmap_columns!r}")
        if writer is not None:
            missing = [m for m in ("add_scalar", "add_histogram_raw", "add_image", "add_text") if not hasattr(writer, m)]
            if missing:
                raise TypeError(f"writer must be a SummaryWriter (has {', '.join(missing)}), got {type(writer).__name__}")
            self.writer, self._owns_writer = writer, False
        else:
            log_dir = os.fspath(log_dir)
            if not log_dir:
                raise ValueError("log_dir must be a directory path, got ''")
            try:
                os.makedirs(log_dir, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"log_dir={log_dir!r}: cannot create it ({exc.strerror or exc})") from exc
            self.writer, self._owns_writer = _EventWriter(log_dir), True
        self.log_dir = log_dir
        self.scalars = scalars
        self.wants_histograms = histograms  # read by the adapters: compute histograms on log steps
        self.every_step = every_step
        self.heatmap_every = heatmap_every
        self._heat = HeatmapColumns(max_heatmap_columns)
        self._seen = 0
        self._last_step = 0
        self._closed = False

    def log(self, record: LogRecord) -> None:
        w, step = self.writer, record.step
        self._last_step = step
        if self.scalars:
            for key, value in record.scalars.items():
                w.add_scalar(key, value, step)
        if self.every_step and record.per_step:
            ps = record.per_step
            for s, g, thr in zip(ps["step"], ps["global_norm"], ps["clip_threshold"]):
                w.add_scalar("grad/norm/global_every_step", math.nan if g is None else g, s)
                if thr is not None:
                    w.add_scalar("gradguard/clip_threshold_every_step", thr, s)
        if self.wants_histograms and record.histograms:
            for layer, (counts, edges) in record.histograms.items():
                counts, edges = np.asarray(counts, np.float64), np.asarray(edges, np.float64)
                centers = (edges[:-1] + edges[1:]) / 2
                w.add_histogram_raw(f"grad/hist/{layer}", min=edges[0], max=edges[-1], num=counts.sum(),
                                    sum=float((counts * centers).sum()), sum_squares=float((counts * centers ** 2).sum()),
                                    bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)
        self._seen += 1
        if self.heatmap_every:
            self._heat.add(record.layer_names, record.layer_norm_mean, step)
            if self._seen % self.heatmap_every == 0:
                self._draw(step)
        w.flush()

    def _draw(self, step: int) -> None:
        image = self._heat.render()
        if image is not None:
            self.writer.add_image("gradguard/gradient_flow", image, step, dataformats="HWC")

    def finding(self, finding: Finding, new: bool) -> None:
        f = finding
        lines = [f"**{f.severity.upper()} {f.kind}** at step {f.step}"
                 + (f" in {', '.join(f.layers[:8])}" if f.layers else ""), "", f.message]
        if f.cause:
            lines += ["", f"Likely cause: {f.cause}."]
        if f.remedies:
            lines += ["", "Remedies:"] + [f"{i}. {r}" for i, r in enumerate(f.remedies, 1)]
        step = int(f.evidence.get("updated_at_step", f.step)) if not new else f.step
        self.writer.add_text(f"gradguard/finding/{f.kind}", "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.heatmap_every and self._heat.undrawn:
            self._draw(self._last_step)
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()
