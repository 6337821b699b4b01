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
    ``{"type": "finding", "new": bool, ...}`` per new or updated finding. ``gradguard report`` (or
    ``python -m gradguard.report``) turns the file into an HTML report.

    A log must not vanish silently: before each write the sink checks that its file is still the one
    at ``path`` (one ``stat``). When the file or its directory was deleted or replaced mid-run, it
    warns once, writes everything it had written so far (read back from its still-open file) to a
    new file at ``path``, or next to it when another file took its place, and goes on there."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not path:
            raise ValueError("sinks='' is not a path: give a directory or a .jsonl file, or sinks=None for no log")
        if not path.endswith(".jsonl"):  # a directory: the file goes inside it
            path = os.path.join(path, "gradguard.jsonl")
        try:
            self._file = self._open(path)
        except OSError as exc:
            raise ValueError(f"sinks={os.fspath(path)!r}: cannot write the gradguard log there "
                             f"({exc.strerror or exc})") from exc
        self.path = path
        self._warned_lost = False

    @staticmethod
    def _open(path: str):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(21, "is a directory", path)
        return open(path, "a+", encoding="utf-8")  # a+: what was written can be read back to recover

    def _still_there(self) -> bool:
        try:
            here, ours = os.stat(self.path), os.fstat(self._file.fileno())
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def _recover(self) -> None:
        """The file at ``path`` is gone or is another file: write what we had to a new one."""
        self._file.flush()
        self._file.seek(0)
        written = self._file.read()
        target = self.path
        if os.path.exists(target):  # someone else's file took its place: do not write into it
            stem, n = self.path[: -len(".jsonl")], 1
            while os.path.exists(f"{stem}.recovered-{n}.jsonl"):
                n += 1
            target = f"{stem}.recovered-{n}.jsonl"
        try:
            new = self._open(target)
            new.write(written)
            new.flush()
        except OSError as exc:
            if not self._warned_lost:
                self._warned_lost = True
                warnings.warn(f"gradguard: the log {self.path} was deleted or replaced while the run was writing it, "
                              f"and it cannot be written again ({exc.strerror or exc}): the log is lost from here on; "
                              "training continues", RuntimeWarning, stacklevel=4)
            return
        old, self._file, self.path = self._file, new, target
        old.close()
        if not self._warned_lost:
            self._warned_lost = True
            warnings.warn(f"gradguard: the log was deleted or replaced while the run was writing it; gradguard wrote "
                          f"it again ({written.count(chr(10))} records) to {target} and goes on there",
                          RuntimeWarning, stacklevel=4)

    def _write(self, obj: Mapping[str, Any]) -> None:
        if not self._still_there():
            self._recover()
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
    or a list of those. Paths are opened here, in the constructor that takes ``sinks=``: an empty or
    unwritable path raises a ``ValueError`` naming ``sinks``."""
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
