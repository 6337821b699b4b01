"""The options every host takes, checked once, with the same names, defaults and errors everywhere.

    GradGuard(model, clip="auto", log_every_n_steps=50)          # torch
    GradGuardCallback(clip="zscore", max_logged_layers=None)     # Lightning, Keras

Each adapter passes its keyword arguments through ``Options.of(owner, kwargs, extra=...)``: an
unknown name raises ``TypeError`` naming it (and the closest known one); a bad value raises
``ValueError``/``TypeError`` naming the argument and the value, in the constructor, never at the
first step. Host-only options (Lightning's ``wandb=``, Keras' ``logs=``) are declared by the host
as ``extra`` and validated there.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import Any, Iterable, Mapping

from gradguard import clipping
from gradguard.detectors import DetectorConfig
from gradguard.sinks import check_sinks
from gradguard.stats import TrackerConfig

DEFAULT_LOG_EVERY = 50


def _int(name: str, value: Any, minimum: int) -> int:
    """An integer (numpy integers included, bools and floats refused) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if type(value).__name__ == "bool_":  # numpy.bool_
        value = bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Options:
    """gradguard's options, the same on every host (all keyword-only in the host constructors).

    Attributes:
        clip: ``"auto"`` (default: off until a spike or an explosion, then adaptive), ``"zscore"``
            (ZClip), ``"percentile"`` (AutoClip), ``"agc"`` (unit-wise, NFNets), a positive float
            (fixed max global norm), ``None`` (measure only) or a ``gradguard.ClipPolicy``.
        log_every_n_steps: optimizer steps between log steps (statistics leave the device, the
            detectors run, sinks log). ``None`` (default): the host's own cadence where it has one
            (Lightning: the Trainer's ``log_every_n_steps``), else 50.
        skip_nonfinite: skip an optimizer step whose gradients hold NaN/Inf (weights, optimizer
            state and normalization statistics untouched).
        sinks: ``None``, a directory or ``.jsonl`` path, a ``gradguard.Sink``, or a list of them.
        max_logged_layers: per-layer scalars for at most this many layers (an int >= 2), spread over
            depth, first and last always included; ``None``: every layer.
        measure_updates: on log steps, measure the update the optimizer applied (a sample of at
            most ``gradguard.pipeline.UPDATE_SAMPLE`` elements per parameter).
        histograms: per-layer gradient histograms on log steps; ``None``: when a sink asks for them.
        detector_config: a ``gradguard.DetectorConfig`` (thresholds of the detectors).
        tracker_config: a ``gradguard.TrackerConfig`` (the device-side spike tracker).
    """

    clip: Any = "auto"
    log_every_n_steps: int | None = None
    skip_nonfinite: bool = True
    sinks: Any = None
    max_logged_layers: int | None = 32
    measure_updates: bool = True
    histograms: bool | None = None
    detector_config: DetectorConfig | None = None
    tracker_config: TrackerConfig | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place)
        set_("policy", clipping.resolve(self.clip))  # raises naming clip=
        if self.log_every_n_steps is not None:
            set_("log_every_n_steps", _int("log_every_n_steps", self.log_every_n_steps, 1))
        set_("skip_nonfinite", _bool("skip_nonfinite", self.skip_nonfinite))
        check_sinks(self.sinks)  # the type, here; paths are opened where the host makes its sinks
        if self.max_logged_layers is not None:
            set_("max_logged_layers", _int("max_logged_layers", self.max_logged_layers, 2))
        set_("measure_updates", _bool("measure_updates", self.measure_updates))
        if self.histograms is not None:
            set_("histograms", _bool("histograms", self.histograms))
        if self.detector_config is not None and not isinstance(self.detector_config, DetectorConfig):
            raise TypeError(f"detector_config must be a gradguard.DetectorConfig, got {self.detector_config!r}")
        if self.tracker_config is not None and not isinstance(self.tracker_config, TrackerConfig):
            raise TypeError(f"tracker_config must be a gradguard.TrackerConfig, got {self.tracker_config!r}")

    policy: clipping.ClipPolicy = dataclasses.field(init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # the resolved policy holds closures: pickle (ddp_spawn) the user's values, resolve again
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "policy", clipping.resolve(self.clip))

    @property
    def tracker(self) -> TrackerConfig:
        return self.tracker_config or TrackerConfig()

    def every(self, host_default: int | None = None) -> int:
        """``log_every_n_steps`` resolved: the user's, else the host's cadence, else 50."""
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        if host_default is not None:
            try:
                return _int("log_every_n_steps", host_default, 1)
            except ValueError:
                pass
        return DEFAULT_LOG_EVERY

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def of(cls, owner: str, kwargs: Mapping[str, Any], extra: Iterable[str] = ()) -> "Options":
        """Options from a host constructor's keyword arguments. Names in ``extra`` are the host's
        own options (the host checks them); any other unknown name raises ``TypeError``."""
        known = set(cls.names())
        extra = set(extra)
        unknown = sorted(set(kwargs) - known - extra)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(known | extra), n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"{owner} got unexpected keyword argument(s) {', '.join(hints)}; "
                            f"options are {', '.join(sorted(known | extra))}")
        return cls(**{k: v for k, v in kwargs.items() if k in known})


def pop_wandb(kwargs: dict[str, Any]) -> bool | None:
    """The callbacks' host option ``wandb=`` (W&B extras: ``None`` = when a run is active), taken out
    of ``kwargs`` and checked, so the rest can go to ``Options.of``."""
    wandb = kwargs.pop("wandb", None)
    if wandb not in (None, True, False):
        raise TypeError(f"wandb must be None, True or False, got {wandb!r}")
    return wandb
