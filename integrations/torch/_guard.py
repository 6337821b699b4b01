"""``GradGuard``: gradguard in a plain PyTorch loop (``guard.step(optimizer)`` or ``guard.attach``)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from gradguard.findings import Finding
from gradguard.layers import LayerInfo
from gradguard.monitor import warn_user
from gradguard.options import Options
from gradguard.torch._engine import TorchEngine

# optimizer -> the guard attached to it (a re-run notebook cell makes a new guard for the same optimizer)
_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, GradGuard]" = weakref.WeakKeyDictionary()

# Optimizers that evaluate the closure several times per step (a line search): only one evaluation's
# gradients could be measured and gated, so they are refused rather than half-protected.
_MULTI_EVAL = (torch.optim.LBFGS,)


def _refuse_multi_eval(optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, _MULTI_EVAL):
        raise TypeError(f"gradguard cannot protect {type(optimizer).__name__}: it evaluates the closure several "
                        "times per step (a line search), and each evaluation's gradients reach the weights "
                        "before any could be measured. Train without GradGuard, or use a first-order optimizer")


class _EvaluatedClosure:
    """Stands in for the user's closure once gradguard has run it (and measured, clipped and gated its
    gradients): the optimizer gets the loss without a second backward."""

    def __init__(self, loss: Any, optimizer: torch.optim.Optimizer):
        self.loss, self.calls, self.optimizer = loss, 0, optimizer

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(f"{type(self.optimizer).__name__}.step() called its closure more than once; "
                               "gradguard measured only the first evaluation's gradients. Optimizers that "
                               "re-evaluate the closure are not supported")
        return self.loss


def _run_closure(closure):
    with torch.enable_grad():
        return closure()


class GradGuard:
    """Watch, diagnose and protect a PyTorch model's gradients.

        guard = GradGuard(model, clip="auto")
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            guard.step(optimizer)      # measure, detect, clip, skip a non-finite step, optimizer.step()
        print(guard.findings)

    Args:
        model: the ``nn.Module`` being trained (a DDP/compiled wrapper is unwrapped for names).
        clip: ``"auto"`` (default: off until a spike or explosion, then adaptive), ``"zscore"``
            (ZClip), ``"percentile"`` (AutoClip), ``"agc"`` (unit-wise, NFNets), a float (fixed max
            global norm), ``None`` (monitor only), or a ``gradguard.ClipPolicy``.
        log_every_n_steps: how often statistics leave the device, detectors run and sinks log
            (default 50).
        skip_nonfinite: skip a step whose gradients hold NaN/Inf: weights, optimizer state and
            BatchNorm running statistics untouched.
        sinks: ``None``, a directory or ``.jsonl`` path, a ``gradguard.Sink``, or a list of them.
        max_logged_layers, measure_updates, histograms, detector_config, tracker_config: see
            ``gradguard.Options``. Every option is keyword-only; an unknown name raises ``TypeError``.

    Results (reading them never changes the run): ``findings``, ``totals``, ``skipped_steps``,
    ``history``, ``layers``. ``close()`` judges the last partial window, removes hooks, closes sinks.
    """

    def __init__(self, model: nn.Module, **options: Any):
        self.engine = TorchEngine(model, options=Options.of("GradGuard", options))
        self._attached: torch.optim.Optimizer | None = None
        self._hook_handles: list = []
        self._last_ok = True

    # ------------------------------------------------------------------ stepping

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> bool:
        """Measure, clip, then ``optimizer.step(*args, **kwargs)``, unless the gradients are
        non-finite: then the step is skipped and the gradients are cleared. With a closure
        (``guard.step(opt, closure)``) the closure runs first and its gradients are the ones judged.
        Returns whether the optimizer stepped. (A fused optimizer, ``fused=True``, on an accelerator
        is handed the verdict on the device instead, as ``GradScaler`` does, so a non-log step never
        waits for the host: it skips a non-finite update itself, the gradients stay, and this
        returns True; the skip is counted in ``totals``.)"""
        if self._attached is not None:
            if optimizer is not self._attached:
                raise ValueError("this GradGuard is attached to another optimizer; calling guard.step() too "
                                 "would count every step twice. Use one: attach() or guard.step()")
            optimizer.step(*args, **kwargs)  # the attached hooks do the work, once
            return self._last_ok
        closure = args[0] if args else kwargs.pop("closure", None)
        if closure is not None:
            _refuse_multi_eval(optimizer)
            loss = _run_closure(closure)
            args = (_EvaluatedClosure(loss, optimizer),)
        ok = self.engine.before_step(optimizer)
        try:
            if ok:
                optimizer.step(*args, **kwargs)
        finally:
            self.engine.after_step(ok)
        return ok

    def attach(self, optimizer: torch.optim.Optimizer):
        """Do the work of ``step`` inside ``optimizer.step()`` through its step hooks. A non-finite
        step reaches the optimizer with no gradients, so it changes nothing. A closure passed to
        ``optimizer.step(closure)`` is run first and its gradients are the ones judged. Attaching
        again to the same optimizer changes nothing; a new guard attached to an optimizer replaces
        the old one (a re-run notebook cell), with a warning. Returns a handle with ``remove()``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _refuse_multi_eval(optimizer)
        if self._attached is optimizer:
            return _Handle(self)
        if self._attached is not None:
            raise ValueError("this GradGuard is already attached to another optimizer; one guard watches one "
                             "optimizer step (remove the first handle, or use a GradGuard per optimizer)")
        previous = _ATTACHED.get(optimizer)
        if previous is not None and previous is not self:
            warn_user("gradguard: this optimizer already had a GradGuard attached (a re-run cell?); it is "
                      "detached so each step is counted and clipped once")
            previous.detach()
        engine = self.engine

        def pre(opt, args, kwargs):
            # args holds the optimizer itself first, then step()'s own positional arguments
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            if closure is not None and not isinstance(closure, _EvaluatedClosure):
                loss = _run_closure(closure)
                evaluated = _EvaluatedClosure(loss, opt)
                if len(args) > 1:
                    args = (args[0], evaluated, *args[2:])
                else:
                    kwargs = {**kwargs, "closure": evaluated}
            self._last_ok = engine.before_step(opt)
            return (args, kwargs) if closure is not None else None

        def post(opt, args, kwargs):
            engine.after_step(self._last_ok)

        self._hook_handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        self._attached = optimizer
        _ATTACHED[optimizer] = self
        return _Handle(self)

    def detach(self) -> None:
        """Remove the optimizer hooks of ``attach`` (the guard keeps its results)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        if self._attached is not None and _ATTACHED.get(self._attached) is self:
            del _ATTACHED[self._attached]
        self._attached = None

    # ------------------------------------------------------------------ results (pure looks)

    @property
    def findings(self) -> list[Finding]:
        """Findings so far, the steps since the last log step included (evaluated, not judged:
        reading never writes to sinks or changes later findings)."""
        return self.engine.peek()[0]

    @property
    def totals(self) -> dict[str, int]:
        """Counters over the run: ``steps``, ``skipped``, ``nonfinite``, ``clipped``, ``spikes``,
        ``explosions`` (the steps since the last log step included)."""
        return {k: int(v) for k, v in self.engine.peek()[1].items()}

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients."""
        return int(self.totals.get("skipped", 0))

    @property
    def layers(self) -> list[LayerInfo]:
        """The watched layers in forward order (known after the first step)."""
        return self.engine.layers

    @property
    def history(self) -> list:
        """``(step, per-layer window-mean gradient norm)`` per log step, for reports and heatmaps."""
        return list(self.engine.monitor.history) if self.engine.monitor else []

    # ------------------------------------------------------------------ checkpoints, closing

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def close(self) -> None:
        """Judge the last partial window, remove hooks, close sinks."""
        self.engine.flush()
        self.detach()
        self.engine.close()


class _Handle:
    def __init__(self, guard: GradGuard):
        self._guard = guard

    def remove(self) -> None:
        self._guard.detach()
