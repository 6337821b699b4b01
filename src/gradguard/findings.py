"""What gradguard tells the user: a named problem, where, why, and what to do about it."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

KINDS = ("vanishing", "exploding", "nonfinite", "dead", "saturated")
SEVERITIES = ("warning", "critical")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosed problem.

    A persistent condition is one finding, updated as evidence accumulates: ``step`` stays the
    optimizer step at which it was first established, the other fields follow the latest evidence.
    """

    kind: str
    step: int
    layers: tuple[str, ...]
    severity: str
    message: str
    remedies: tuple[str, ...]
    evidence: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)
    cause: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Finding kind must be one of {KINDS}, got {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding severity must be one of {SEVERITIES}, got {self.severity!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "remedies", tuple(self.remedies))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "layers": list(self.layers),
            "severity": self.severity,
            "message": self.message,
            "remedies": list(self.remedies),
            "evidence": _plain(self.evidence),
            "cause": self.cause,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Finding":
        return cls(
            kind=data["kind"],
            step=int(data["step"]),
            layers=tuple(data["layers"]),
            severity=data["severity"],
            message=data["message"],
            remedies=tuple(data["remedies"]),
            evidence=dict(data.get("evidence", {})),
            cause=data.get("cause"),
        )

    def __str__(self) -> str:
        where = f" [{', '.join(self.layers[:4])}{', ...' if len(self.layers) > 4 else ''}]" if self.layers else ""
        return f"{self.severity.upper()} {self.kind} at step {self.step}{where}: {self.message}"


def _plain(value: Any) -> Any:
    """Evidence as JSON-ready Python values (numpy scalars and arrays included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float) and value != value:
        return None
    return value


# Remedies, worded once. Detectors pick from these by cause.
REMEDIES = {
    "relu": "Replace sigmoid/tanh hidden activations with the ReLU family (ReLU, LeakyReLU, GELU, SiLU).",
    "init_glorot_he": "Initialise weights for the activation: He (Kaiming) for ReLU-family, Glorot (Xavier) for tanh/sigmoid.",
    "init_smaller": "Initialise weights smaller: He (Kaiming) or Glorot (Xavier) scaling instead of a large fixed std.",
    "normalization": "Add normalization between layers (BatchNorm, LayerNorm or GroupNorm).",
    "residual": "Add residual (skip) connections so gradients reach early layers directly.",
    "lstm_gru": "For recurrent nets, use LSTM or GRU cells instead of a plain RNN.",
    "clipping": "Clip gradients: clip='auto' (GradGuard / GradGuardCallback) or a fixed maximum global norm.",
    "lower_lr": "Lower the learning rate, or add a learning-rate warm-up.",
    "check_data": "Check the batch for NaN/Inf inputs or labels and the loss for log(0) or division by zero.",
    "mixed_precision": "Under float16 use dynamic loss scaling (GradScaler), or train in bfloat16.",
    "leaky": "Use LeakyReLU, ELU or GELU so units cannot die, or lower the learning rate.",
    "bias_init": "Check bias initialisation: large negative biases switch ReLU units off for every input.",
}
