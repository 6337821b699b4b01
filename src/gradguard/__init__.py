"""gradguard: watch gradient flow while a network trains, name what goes wrong, act on it, show it.

The core is framework-free (numpy only). The adapters live in ``gradguard.torch``,
``gradguard.lightning``, ``gradguard.keras`` and ``gradguard.wandb`` and import their framework lazily.
"""

from gradguard.clipping import ClipPolicy, agc, auto, fixed, no_clipping, percentile, zscore
from gradguard.detectors import DetectorConfig
from gradguard.findings import KINDS, SEVERITIES, Finding
from gradguard.layers import LayerInfo, ModelFacts
from gradguard.monitor import Decision, GradGuardWarning, Monitor
from gradguard.sinks import JsonlSink, LoggingSink, LogRecord, Sink
from gradguard.stats import Snapshot, TrackerConfig, WindowStats

__version__ = "0.1.0"

__all__ = [
    "ClipPolicy", "agc", "auto", "fixed", "no_clipping", "percentile", "zscore", "DetectorConfig", "KINDS", "SEVERITIES", "Finding",
    "LayerInfo", "ModelFacts", "Decision", "GradGuardWarning", "Monitor", "JsonlSink", "LoggingSink", "LogRecord",
    "Sink", "Snapshot", "TrackerConfig", "WindowStats", "__version__",
]
