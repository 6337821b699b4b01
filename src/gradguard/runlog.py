"""Reading a run back: the JSON-lines file a ``JsonlSink`` wrote, as arrays the report and the
terminal summary draw from.

Bad input is said in one line (``RunLogError``), never as a traceback: a missing file, a directory
without ``gradguard.jsonl``, a file that is not UTF-8 text, an empty file (a run stopped before its
first log step), a JSON-lines file some other program wrote. A truncated *last* line (a run killed
mid-write) is skipped with a warning and the rest is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np


class RunLogError(ValueError):
    """A run log that cannot be read; the message is one line naming the file and what is wrong."""


@dataclasses.dataclass
class RunLog:
    path: str
    name: str  # a short label for the run
    steps: list[dict]  # the "step" records, in order
    findings: list[dict]  # the latest version of each finding, by the step it was established
    layers: list[str]  # the layer names of the last record (forward order)
    log_steps: np.ndarray  # optimizer step of each record with that layout
    layer_norm_mean: np.ndarray  # (records, layers) window-mean per-layer gradient L2 norm
    layer_rms: np.ndarray | None  # the same as RMS (norm / sqrt(numel)) when the log has layer_numel
    # every optimizer step (from the records' per_step; a log without it: one point per log step)
    step: np.ndarray
    global_norm: np.ndarray  # raw global norm, NaN when non-finite
    clip_threshold: np.ndarray  # NaN when not clipping
    skipped: np.ndarray  # bool
    nonfinite: np.ndarray
    clipped: np.ndarray
    spike: np.ndarray
    explosion: np.ndarray
    per_step: bool  # True when every step is there, False for the one-point-per-log-step fallback
    warnings: list[str]

    @property
    def depth_values(self) -> tuple[np.ndarray, str]:
        """Per-layer values for depth profiles and the heatmap, and what they are."""
        if self.layer_rms is not None:
            return self.layer_rms, "gradient RMS"
        return self.layer_norm_mean, "gradient L2 norm"

    @property
    def last_scalars(self) -> dict[str, Any]:
        return self.steps[-1]["scalars"] if self.steps else {}

    @property
    def clip_enabled_step(self) -> int | None:
        """The first optimizer step with a finite clip threshold, if any."""
        idx = np.flatnonzero(np.isfinite(self.clip_threshold))
        return int(self.step[idx[0]]) if idx.size else None


def resolve_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, "gradguard.jsonl")
        if not os.path.isfile(inner):
            raise RunLogError(f"{path}: is a directory without a gradguard.jsonl in it; pass the .jsonl file "
                              "a JsonlSink wrote (or the directory given as sinks=)")
        return inner
    if not os.path.exists(path):
        raise RunLogError(f"{path}: no such file")
    return path


def run_name(path: str) -> str:
    base = os.path.basename(path)
    if base == "gradguard.jsonl":  # sinks=DIR: the directory names the run
        return os.path.basename(os.path.dirname(os.path.abspath(path))) or base
    return os.path.splitext(base)[0]


def read_run(path: str | os.PathLike, name: str | None = None) -> RunLog:
    """Read one run log (a ``.jsonl`` file, or a directory holding ``gradguard.jsonl``)."""
    path = resolve_path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise RunLogError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunLogError(f"{path}: not a gradguard log (not UTF-8 text: byte 0x{data[exc.start]:02x} at "
                          f"offset {exc.start})") from None
    if not text.strip():
        raise RunLogError(f"{path}: is empty; the run stopped before its first log step, so there is nothing "
                          "to report yet")
    lines = text.split("\n")
    complete = text.endswith("\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    warnings_: list[str] = []
    steps: list[dict] = []
    findings: dict[str, dict] = {}
    first_seen: dict[str, int] = {}
    for k, (lineno, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except ValueError:
            if k == len(numbered) - 1 and not complete:  # the run was killed while writing it
                warnings_.append(f"{path}: line {lineno} is truncated (the run stopped mid-write); skipped it")
                continue
            raise RunLogError(f"{path}: line {lineno} is not JSON; is this a gradguard log?") from None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "step" and _is_step(obj):
            steps.append(obj)
        elif kind == "finding" and _is_finding(obj):
            findings[obj["kind"]] = obj
            first_seen.setdefault(obj["kind"], int(obj["step"]))
        else:
            raise RunLogError(f"{path}: line {lineno} is not a gradguard record (expected a JSON object with "
                              "\"type\": \"step\" or \"finding\"); is this a gradguard log?")
    if not steps and not findings:
        raise RunLogError(f"{path}: holds no complete record; the run stopped before its first log step")
    return _assemble(path, name or run_name(path), steps, findings, warnings_)


def _is_step(obj: dict) -> bool:
    return (isinstance(obj.get("step"), int) and isinstance(obj.get("scalars"), dict)
            and isinstance(obj.get("layers"), list) and isinstance(obj.get("layer_norm_mean"), list)
            and len(obj["layer_norm_mean"]) == len(obj["layers"]))


def _is_finding(obj: dict) -> bool:
    return all(k in obj for k in ("kind", "step", "severity", "message")) and isinstance(obj["step"], int)


def _floats(values) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _assemble(path, name, steps, findings, warnings_) -> RunLog:
    layers = steps[-1]["layers"] if steps else []
    rows = [s for s in steps if s["layers"] == layers]  # the last layout (a fine-tuning run may change it)
    norms = np.array([_floats(s["layer_norm_mean"]) for s in rows], dtype=np.float64).reshape(len(rows), len(layers))
    numel = rows[-1].get("layer_numel") if rows else None
    rms = None
    if isinstance(numel, list) and len(numel) == len(layers) and all(isinstance(n, int) and n > 0 for n in numel):
        rms = norms / np.sqrt(np.asarray(numel, dtype=np.float64))
    cols: dict[str, list] = {k: [] for k in ("step", "global_norm", "clip_threshold", "skipped", "nonfinite",
                                              "clipped", "spike", "explosion")}
    per_step = bool(steps) and all(isinstance(s.get("per_step"), dict) for s in steps)
    for s in steps:
        if per_step:
            ps = s["per_step"]
            n = len(ps.get("step", []))
            for k in cols:
                col = list(ps.get(k, [0] * n))
                cols[k] += col if len(col) == n else [None] * n
        else:  # an older log: one point per log step (the largest norm since the last one)
            sc = s["scalars"]
            cols["step"].append(s["step"])
            cols["global_norm"].append(sc.get("grad/norm/global_max", sc.get("grad/norm/global")))
            cols["clip_threshold"].append(sc.get("gradguard/clip_threshold"))
            for k in ("skipped", "nonfinite", "clipped", "spike", "explosion"):
                cols[k].append(0)
    step = np.array([math.nan if v is None else v for v in cols["step"]], dtype=np.float64)
    keep = np.isfinite(step)
    # a resumed run can log the same steps twice: keep the last write of each step
    order = np.argsort(step[keep], kind="stable")
    step = step[keep][order]
    arrays = {k: _floats(v)[keep][order] for k, v in cols.items() if k != "step"}
    if step.size:
        last = np.r_[step[1:] != step[:-1], True]
        step = step[last]
        arrays = {k: v[last] for k, v in arrays.items()}
    thr = arrays["clip_threshold"]
    thr[~(thr < 1e300)] = math.nan  # inf (written as 1e308) or none: not clipping
    flag = {k: np.nan_to_num(arrays[k]) > 0 for k in ("skipped", "nonfinite", "clipped", "spike", "explosion")}
    return RunLog(path=path, name=name, steps=steps,
                  findings=sorted(findings.values(), key=lambda f: (f["step"], f["kind"])),
                  layers=list(layers), log_steps=np.array([s["step"] for s in rows], dtype=np.int64),
                  layer_norm_mean=norms, layer_rms=rms, step=step.astype(np.int64),
                  global_norm=arrays["global_norm"], clip_threshold=thr, per_step=per_step, warnings=warnings_,
                  **flag)
