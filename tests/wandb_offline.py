"""Read back what an offline W&B run wrote, for tests (no network, no wandb internals beyond the protobuf).

    run = wandb.init(mode="offline", dir=tmp_path)
    ...
    run.finish()
    logged = read_run(tmp_path)              # or read_run(run.settings.sync_dir) / the .wandb file
    logged.values("grad/norm/global")        # every logged value of a key, in order
    logged.history                           # rows as dicts; media and histograms as nested dicts
    logged.summary, logged.alerts, logged.metrics, logged.config, logged.exit_code

A run writes its records to ``<dir>/wandb/offline-run-*/run-<id>.wandb``: a LevelDB-style log
(32 KiB blocks of chunks with a 7-byte header: crc32c, length, type) after a 7-byte W&B header, each
record a ``wandb_internal_pb2.Record``. ``wandb leet inspect --json RUN_DIR`` prints the same records;
this reader is in-process and needs no subprocess.

``run.finish()`` can return a few milliseconds before wandb-core has flushed the file (seen with
wandb 0.31: an empty read right after ``finish()``), so ``read_run`` waits until the run's ``exit``
record is there (``timeout`` seconds; ``timeout=None`` reads whatever is there now, e.g. for a run
whose service was killed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def run_dirs(path: str | os.PathLike) -> list[Path]:
    """The offline run directories under ``path`` (a WANDB_DIR or its ``wandb`` folder), oldest first."""
    root = Path(path)
    if (root / "wandb").is_dir():
        root = root / "wandb"
    return sorted(root.glob("offline-run-*"), key=lambda p: p.name)


def wandb_file(path: str | os.PathLike) -> Path:
    """The ``.wandb`` file of ``path``: the file itself, a run directory, or a directory holding
    exactly one offline run."""
    p = Path(path)
    if p.is_file():
        return p
    found = list(p.glob("run-*.wandb"))
    if not found:
        runs = run_dirs(p)
        if len(runs) != 1:
            raise FileNotFoundError(f"expected one offline run under {p}, found {[r.name for r in runs]}")
        found = list(runs[0].glob("run-*.wandb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb file in {p}, found {found}")
    return found[0]


def read_records(path: str | os.PathLike) -> list:
    """Every record of a run, as ``wandb.proto.wandb_internal_pb2.Record`` messages, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = wandb_file(path).read_bytes()
    if len(data) < 7:
        return []  # not flushed yet
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (starts with {data[:7]!r})")
    chunks, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            chunks.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            chunks.append(pending + payload)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _items_to_dict(items) -> dict[str, Any]:
    """History/summary items (``key`` or ``nested_key`` path, ``value_json``) as one nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


@dataclasses.dataclass
class OfflineRun:
    dir: Path  # the run directory (offline-run-...); media files are under dir / "files"
    records: list  # raw protobuf records
    history: list[dict[str, Any]]  # one dict per history row, in order
    summary: dict[str, Any]  # the final summary (all updates and removals applied)
    alerts: list[dict[str, Any]]  # {"title", "text", "level", "wait_duration_ms"}
    metrics: list[dict[str, Any]]  # define_metric records: {"name" or "glob_name", "step_metric", ...}
    config: dict[str, Any]
    exit_code: int | None

    def values(self, key: str) -> list[Any]:
        """The value of ``key`` in every history row that has it, in order."""
        return [row[key] for row in self.history if key in row]

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def media_path(self, value: dict[str, Any]) -> Path:
        """The file of a logged media value (e.g. an image row value with a ``path``)."""
        return self.dir / "files" / value["path"]


def read_run(path: str | os.PathLike, timeout: float | None = 10.0) -> OfflineRun:
    """Parse a finished offline run: a WANDB_DIR holding one run, a run directory, or a .wandb file.
    Waits up to ``timeout`` seconds for the run's exit record (None: no wait, no exit record needed)."""
    from google.protobuf.json_format import MessageToDict

    file = wandb_file(path)
    deadline = time.monotonic() + (timeout or 0.0)
    while True:
        records = read_records(file)
        if timeout is None or any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{file}: no exit record after {timeout} s; was run.finish() called?")
        time.sleep(0.01)
    history, summary, alerts, metrics, config, exit_code = [], {}, [], [], {}, None
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append(_items_to_dict(r.history.item))
        elif kind == "summary":
            _merge(summary, _items_to_dict(r.summary.update))
            for item in r.summary.remove:
                summary.pop(item.key or item.nested_key[0], None)
        elif kind == "alert":
            alerts.append({"title": r.alert.title, "text": r.alert.text, "level": r.alert.level,
                           "wait_duration_ms": r.alert.wait_duration})
        elif kind == "metric":
            metrics.append(MessageToDict(r.metric, preserving_proto_field_name=True))
        elif kind in ("config", "run"):
            cfg = r.config if kind == "config" else r.run.config
            _merge(config, _items_to_dict(cfg.update))
        elif kind == "exit":
            exit_code = r.exit.exit_code
    return OfflineRun(file.parent, records, history, summary, alerts, metrics, config, exit_code)
