"""Where results go. A sink receives one ``LogRecord`` per log step and every new or updated finding.

Sinks never stop training: the monitor calls them through ``SinkSet``, which turns an exception
into one warning per sink and carries on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gradguard.findings import Finding

logger = logging.getLogger("gradguard")


@dataclasses.dataclass
class LogRecord:
    """What one log step produced."""

    step: int
    scalars: dict[str, float]  # stable keys, see README "Logged keys"
    layer_names: tuple[str, ...]  # every layer, forward order
    layer_norm: np.ndarray  # this step's per-layer gradient L2 norm (all layers)
    layer_norm_mean: np.ndarray  # window mean per layer (the heatmap's row)
    histograms: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None  # layer -> (counts, edges)
    # Every optimizer step since the last record (see ``monitor.per_step_record``): lists of equal
    # length under "step", "global_norm", "clip_threshold", "scale", "nonfinite", "skipped",
    # "clipped", "spike", "explosion". None when the adapter keeps no trace.
    per_step: Mapping[str, list] | None = None
    layer_numel: np.ndarray | None = None  # parameters per layer (gradient RMS = norm / sqrt(numel))

    def to_json(self) -> dict[str, Any]:
        out = {
            "type": "step",
            "step": self.step,
            "scalars": {k: _num(v) for k, v in self.scalars.items()},
            "layers": list(self.layer_names),
            "layer_norm": [_num(v) for v in self.layer_norm],
            "layer_norm_mean": [_num(v) for v in self.layer_norm_mean],
        }
        if self.layer_numel is not None:
            out["layer_numel"] = [int(v) for v in self.layer_numel]
        if self.per_step is not None:
            out["per_step"] = {k: list(v) for k, v in self.per_step.items()}
        return out


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else (None if math.isnan(v) else (1e308 if v > 0 else -1e308))


class Sink:
    """Base class: override what you need."""

    def log(self, record: LogRecord) -> None:
        pass

    def finding(self, finding: Finding, new: bool) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """``path``: a ``.jsonl`` file, or a directory to write ``gradguard.jsonl`` into.

    One JSON object per line: ``{"type": "step", ...}`` per log step and
    ``{"type": "finding", "new": bool, ...}`` per new or updated finding. ``gradguard.report``
    turns the file into an HTML report."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not path.endswith(".jsonl"):  # a directory: the file goes inside it
            path = os.path.join(path, "gradguard.jsonl")
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def _write(self, obj: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(obj, allow_nan=False) + "\n")
        self._file.flush()

    def log(self, record: LogRecord) -> None:
        self._write(record.to_json())

    def finding(self, finding: Finding, new: bool) -> None:
        self._write({"type": "finding", "new": new, **json.loads(json.dumps(finding.to_dict(), default=str))})

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class LoggingSink(Sink):
    """A one-line summary per log step through ``logging`` (logger ``gradguard``)."""

    def __init__(self, level: int = logging.INFO, log: logging.Logger | None = None):
        self.level = level
        self.logger = log or logger

    def log(self, record: LogRecord) -> None:
        s = record.scalars
        self.logger.log(self.level, "step %d: global grad norm %.4g (max %.4g since last log), depth ratio %.3g, "
                        "clipped %d, skipped %d", record.step, s.get("grad/norm/global", math.nan),
                        s.get("grad/norm/global_max", math.nan), s.get("grad/depth_ratio", math.nan),
                        s.get("gradguard/clipped_steps", 0), s.get("gradguard/skipped_steps", 0))


class SinkSet:
    """Calls every sink; a failing sink warns once and training goes on."""

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)
        self._warned: set[int] = set()

    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:  # a sink must never stop training
            if id(sink) not in self._warned:
                self._warned.add(id(sink))
                warnings.warn(f"gradguard: sink {type(sink).__name__}.{method} failed ({exc!r}); "
                              "training continues, later failures of this sink are silent", RuntimeWarning,
                              stacklevel=3)

    def log(self, record: LogRecord) -> None:
        for sink in self.sinks:
            self._call(sink, "log", record)

    def finding(self, finding: Finding, new: bool) -> None:
        for sink in self.sinks:
            self._call(sink, "finding", finding, new)

    def close(self) -> None:
        for sink in self.sinks:
            self._call(sink, "close")


def make_sinks(sinks: Any) -> list[Sink]:
    """``sinks=`` accepts None (no sinks), a directory or ``.jsonl`` path (JSON-lines file), a Sink,
    or a list of those."""
    if sinks is None:
        return []
    if isinstance(sinks, (str, os.PathLike)):
        return [JsonlSink(sinks)]
    if isinstance(sinks, Sink):
        return [sinks]
    if isinstance(sinks, Sequence):
        out: list[Sink] = []
        for s in sinks:
            out += make_sinks(s)
        return out
    raise TypeError(f"sinks must be None, a path, a gradguard.Sink or a list of them, got {sinks!r}")
