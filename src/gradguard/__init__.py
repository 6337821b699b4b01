"""gradguard: watch gradient flow while a network trains, name what goes wrong, act on it, show it.

The core is framework-free (numpy only). The adapters live in ``gradguard.torch``,
``gradguard.lightning``, ``gradguard.keras`` and ``gradguard.wandb`` and import their framework lazily.

What users need is exported here; the machinery adapters share lives in its modules
(``gradguard.pipeline``, ``gradguard.monitor``, ``gradguard.stats``, ``gradguard.ops``).
"""

from gradguard.clipping import ClipPolicy, Signals, agc, fixed, no_clipping, percentile, zscore
from gradguard.clipping import auto as auto_clip
from gradguard.detectors import DetectorConfig
from gradguard.findings import KINDS, SEVERITIES, Finding
from gradguard.monitor import GradGuardWarning
from gradguard.options import Options
from gradguard.sinks import JsonlSink, LoggingSink, LogRecord, Sink
from gradguard.stats import TrackerConfig

__version__ = "0.1.0"

__all__ = [
    # results
    "Finding", "KINDS", "SEVERITIES", "GradGuardWarning",
    # options and clipping policies (clip= accepts these, or "auto"/"zscore"/"percentile"/"agc"/float/None)
    "Options", "ClipPolicy", "Signals", "auto_clip", "fixed", "zscore", "percentile", "agc", "no_clipping",
    "DetectorConfig", "TrackerConfig",
    # where results go
    "Sink", "JsonlSink", "LoggingSink", "LogRecord",
    "__version__",
]

# Names exported before the public list was trimmed; still importable, not part of the API.
_MOVED = {"auto": ("gradguard.clipping", "auto"), "Monitor": ("gradguard.monitor", "Monitor"),
          "Decision": ("gradguard.monitor", "Decision"), "WindowStats": ("gradguard.stats", "WindowStats"),
          "Snapshot": ("gradguard.stats", "Snapshot"), "LayerInfo": ("gradguard.layers", "LayerInfo"),
          "ModelFacts": ("gradguard.layers", "ModelFacts")}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        module, attr = _MOVED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
