"""``TorchEngine``: the per-optimizer-step machinery shared by ``GradGuard``, the Lightning callback
and the Hugging Face Trainer callback.

    engine.before_step() -> bool     # measure, clip, gate (False: skip; the gradients are None)
    optimizer.step()                 # only if before_step() returned True
    engine.after_step(stepped)       # count the step; on a log step read the window, judge, report

Every step runs on the gradients' device with torch foreach kernels: one ``_foreach_norm`` pass for
the per-layer norms, the core's ``stats.device_step`` on a vector of layer norms (``_fused``: numpy
on a CPU device, compiled in the background on an accelerator) and, when the policy clips, one
``_foreach_mul_``. On an accelerator nothing is copied to the host on a step that does not log:
with ``skip_nonfinite=True`` the verdict either goes to the optimizer as a device-side
``found_inf`` (the fused optimizers, driven the way ``GradScaler`` drives them: ``gate ==
"optimizer"``) or is read as one boolean (the gate ``GradScaler`` uses for the others: ``gate ==
"host read"``). On a CPU device a read costs nothing, so the verdict is read there and the
multiply is by a Python float. Everything host-side (log-step rule, window read, snapshot
assembly, checkpoint format) is the core's ``gradguard.pipeline``.
"""

from __future__ import annotations

import logging
from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import numpy as np
import torch
from torch import nn

from gradguard import pipeline, stats
from gradguard.findings import Finding
from gradguard.monitor import Decision, Monitor, warn_user
from gradguard.options import Options
from gradguard.sinks import make_sinks
from gradguard.torch import _fused, _optim, _snapshots
from gradguard.torch._layout import ForwardOrder, Layout, build_layout, describe_model, trainable_key, unwrap
from gradguard.torch._normstats import NormStats
from gradguard.torch._ops import real_view, torch_ops
from gradguard.torch._probes import Probes
from gradguard.torch._sharding import Sharding, local


_requires_grad = attrgetter("requires_grad")


class _Built:
    """Everything fixed once the layout is known, made in one place (``TorchEngine._build``) and
    replaced as a whole when the trainable set changes."""

    def __init__(self, layout: Layout, pipe: pipeline.Pipeline, device: torch.device, all_params: list):
        self.layout = layout
        self.pipeline = pipe
        self.device = device
        self.n_layers = len(layout.layers)
        self.param_layer_t = torch.tensor(layout.param_layer, device=device)
        self.sharding = Sharding(layout.params, device)
        self.step_fn: _fused.NumpyStep | _fused.TorchStep | None = None  # runs stats.device_step, owns the state
        # which parameters had a gradient at the last step, and the index tensors that follow from it
        self.present: tuple[bool, ...] | None = None
        self.all_present = False
        # parameters not watched (frozen when the layout was built): one that is unfrozen rebuilds it
        self.frozen = [p for p in all_params if not p.requires_grad]
        self.idx_t = self.present_idx_t = self.has_t = None
        self._param_to_layer: _fused.ParamToLayer | None = None  # the CPU path's layer sums, numpy
        self.plain_grads: bool | None = None  # dense, real, one device, no DTensor: the fast path
        self.extras: _snapshots.Extras | None = None  # what log steps read, fixed with the gradients' set
        self.ceiling_written = False  # the policy's update ceiling, written on the first step after a build

    def set_present(self, present: tuple[bool, ...]) -> None:
        self.present = present
        self.all_present = all(present)
        self.plain_grads = None
        self.extras = None
        idx = [self.layout.param_layer[i] for i, ok in enumerate(present) if ok]
        self.idx_t = torch.tensor(idx, device=self.device, dtype=torch.long)
        self.present_idx_t = torch.tensor([i for i, ok in enumerate(present) if ok], device=self.device,
                                          dtype=torch.long)
        self._param_to_layer = None
        has = torch.zeros(self.n_layers, device=self.device)
        if idx:
            has[torch.tensor(sorted(set(idx)), device=self.device)] = 1.0
        self.has_t = has

    @property
    def param_to_layer(self) -> _fused.ParamToLayer:
        """The CPU path's per-layer sums for the present gradients (made on first use)."""
        if self._param_to_layer is None:
            self._param_to_layer = _fused.ParamToLayer(self.idx_t.tolist(), self.n_layers)
        return self._param_to_layer

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.step_fn.state


class TorchEngine:
    """Measure, clip and gate one torch model's gradients, one optimizer step at a time.

    Args:
        model: the ``nn.Module`` (DDP / DataParallel / ``torch.compile`` wrappers are unwrapped).
        logging_rank: whether this process reports (default: rank 0 of an initialised process group).
        **options: ``gradguard.Options`` (``clip``, ``log_every_n_steps``, ``skip_nonfinite``, ``sinks``,
            ``max_logged_layers``, ``measure_updates``, ``histograms``, ``detector_config``,
            ``tracker_config``); an unknown name raises ``TypeError``.

    ``clipping_allowed = False`` makes it measure only (a host that clips itself).
    """

    def __init__(self, model: nn.Module, *, logging_rank: bool | None = None, options: Options | None = None,
                 **kwargs: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if options is not None and kwargs:
            raise TypeError("pass either options= or keyword options, not both")
        self.options = options or Options.of(type(self).__name__, kwargs)
        self.model = unwrap(model)
        if not any(p.requires_grad and p.numel() > 0 for p in self.model.parameters()):
            raise ValueError(f"model has no trainable parameters to watch (model={type(model).__name__})")
        self.policy = self.options.policy
        self.log_every_n_steps = self.options.every()
        self.skip_nonfinite = self.options.skip_nonfinite
        self.measure_updates = self.options.measure_updates
        self._sinks = make_sinks(self.options.sinks)
        self.histograms = self.options.histograms if self.options.histograms is not None else any(
            getattr(s, "wants_histograms", False) for s in self._sinks)
        self._logging_rank = logging_rank
        self.clipping_allowed = True  # False: a host that clips itself (Lightning's gradient_clip_val)
        self._all_params = list(self.model.parameters())
        self._order = ForwardOrder(self.model)
        self._probes = Probes(self.model, self._measuring_forward)
        self._norm_stats = NormStats(self.model)
        self._built: _Built | None = None
        self._pending: dict | None = None  # a checkpoint loaded before the layout is known
        self._steps_before_build = 0
        self._measure_next = pipeline.is_log_step(0, self.log_every_n_steps)  # see _measuring_forward
        self._in_step = False
        self._log_step = False
        self._sums: pipeline.LayerSums | None = None
        self._update: _snapshots.UpdateSample | None = None
        # None: decide from the device (a CPU device reads the verdict, which costs nothing there);
        # False forces the accelerator path (no host read), e.g. to test it on a CPU.
        self.host_reads_free: bool | None = None
        self.gate = "host read" if self.skip_nonfinite else "none"  # how the last step was gated
        self._gates_logged: set[str] = set()
        self._handed: tuple | None = None  # (optimizer, found_inf, grad_scale, set by us) during a step

    # ------------------------------------------------------------------ results

    @property
    def built(self) -> bool:
        return self._built is not None

    @property
    def monitor(self) -> Monitor | None:
        return self._built.pipeline.monitor if self._built else None

    @property
    def layers(self) -> list:
        return list(self._built.layout.layers) if self._built else []

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The device state (window accumulators, spike tracker, policy state)."""
        return self._built.state if self._built else {}

    @property
    def step_path(self) -> str | None:
        """How the per-step bookkeeping runs: ``"numpy (cpu)"``, ``"eager"``, ``"eager (compiling)"``
        or ``"compiled"`` (None before the first step)."""
        return self._built.step_fn.path if self._built else None

    @property
    def step_count(self) -> int:
        """Optimizer steps seen, skipped ones included."""
        return self._built.pipeline.step if self._built else self._steps_before_build

    @step_count.setter
    def step_count(self, value: int) -> None:
        if self._built:
            self._built.pipeline.step = int(value)
        else:
            self._steps_before_build = int(value)
        self._step_moved()

    def _step_moved(self) -> None:
        self._measure_next = pipeline.is_log_step(self.step_count, self.log_every_n_steps)

    def peek(self) -> tuple[list[Finding], dict[str, int]]:
        """Findings and totals including the steps since the last log step, without judging them:
        nothing reaches the sinks, the window goes on, later findings are unchanged."""
        b = self._built
        if b is None:
            mon = (self._pending or {}).get("monitor", {})
            found = sorted((Finding.from_dict(f) for f in mon.get("findings", [])), key=lambda f: (f.step, f.kind))
            return found, dict(mon.get("totals", {}))
        host = self._host_state()
        if float(host["acc_steps"]) == 0:
            return b.pipeline.monitor.findings, dict(b.pipeline.monitor.totals)
        last = self.step_count if self._in_step else self.step_count - 1  # inside a step: it is measured
        return b.pipeline.monitor.peek(b.pipeline.window(host, last))

    @property
    def findings(self) -> list[Finding]:
        """Findings so far, pending steps included (a pure look, see ``peek``)."""
        return self.peek()[0]

    @property
    def totals(self) -> dict[str, int]:
        """Counters so far, pending steps included (a pure look, see ``peek``)."""
        return {k: int(v) for k, v in self.peek()[1].items()}

    # ------------------------------------------------------------------ the layout, built in one place

    def _build(self, carry: dict | None = None) -> _Built:
        self._order.stop()
        layout = build_layout(self.model, self._order, self._all_params)
        p0 = layout.params[0]
        device = p0.device if p0.device.type != "meta" else torch.device("cpu")
        logging_rank = self._is_logging_rank()
        pipe = pipeline.Pipeline(layout.layers, describe_model(self.model), self.options, sinks=self._sinks,
                                 policy=self.policy, log_every_n_steps=self.log_every_n_steps,
                                 logging_rank=logging_rank)
        pipe.step = self._steps_before_build
        built = _Built(layout, pipe, device, self._all_params)
        host = pipe.initial_state()
        saved = carry if carry is not None else self._pending
        if saved:
            host = pipe.restore(saved, to_numpy=lambda v: v.detach().cpu().numpy() if torch.is_tensor(v) else v)
        built.step_fn = _fused.make_step({k: host[k] for k in pipe.layout.keys}, self.policy, pipe.tracker,
                                         device, self.host_reads_free)
        logging.getLogger("gradguard").debug("gradguard: per-step bookkeeping: %s; non-finite gate: %s",
                                             built.step_fn.path, self.gate)
        if self._built is None:
            self._probes.install_saturation(self._order, [n for n, _ in self.model.named_modules()])
        self._built, self._pending = built, None
        self._step_moved()
        return built

    def _rebuild_if_trainable_changed(self) -> None:
        """Parameters frozen or unfrozen since the layout was built: layers join or leave; the state
        of layers that stay is kept by name, new layers start fresh, findings stay."""
        if trainable_key(self._all_params) == self._built.layout.trainable:
            return
        if not any(p.requires_grad and p.numel() > 0 for p in self._all_params):
            return  # everything frozen: nothing to measure, keep the last layout
        saved = self.state_dict()
        before = set(self._built.layout.names)
        built = self._build(carry=saved)
        after = set(built.layout.names)
        if before != after:
            warn_user(f"gradguard: the trainable layers changed (joined: {sorted(after - before)[:5]}, left: "
                      f"{sorted(before - after)[:5]}); the layers that stay keep their statistics")

    def _is_logging_rank(self) -> bool:
        if self._logging_rank is not None:
            return self._logging_rank
        d = torch.distributed
        return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0

    def _measuring_forward(self, module: nn.Module) -> bool:
        """The training forward pass whose backward feeds a log step. (A bool kept up to date, not the
        step count: under ``torch.compile`` the forward hooks are traced, and a guard on a bool gives
        a few compiled graphs, where one on the count recompiled on every step until dynamo gave up.)"""
        return self._measure_next and torch.is_grad_enabled() and module.training

    # ------------------------------------------------------------------ per step

    def _grads(self, b: _Built) -> tuple[_Built, list[torch.Tensor]]:
        """The layout (rebuilt if parameters were frozen or unfrozen) and its present gradients.
        The common step (every watched parameter still trainable and with a gradient, none of the
        others unfrozen) touches each parameter once."""
        grads = [p.grad if p.requires_grad else None for p in b.layout.params]
        if any(map(is_, grads, repeat(None))) or any(map(_requires_grad, b.frozen)):
            if trainable_key(self._all_params) != b.layout.trainable:
                self._rebuild_if_trainable_changed()
                b = self._built
            grads = [p.grad for p in b.layout.params]
            present = tuple([g is not None for g in grads])
            if present != b.present:
                b.set_present(present)
            return b, [g for g in grads if g is not None]
        if not b.all_present:
            b.set_present((True,) * len(grads))
        return b, grads

    def _plain(self, b: _Built, grads) -> bool:
        """Dense, real gradients on the layout's device, no DTensor: the fast paths."""
        if b.plain_grads is None:  # checked once per set of gradients (these facts follow the parameters)
            b.plain_grads = all(type(g) is torch.Tensor and not g.is_complex() and not g.is_sparse
                                and g.device == b.device for g in grads) and not b.sharding.active
        return b.plain_grads

    def _layer_sq(self, b: _Built, grads) -> torch.Tensor:
        if self._plain(b, grads):  # the common case, without a Python pass over the tensors' attributes
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        else:
            grads = [real_view(local(g)) for g in grads]
            if all(not g.is_sparse and g.device == b.device for g in grads):
                norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            else:  # sparse gradients or several devices: one norm at a time
                norms = [(g.coalesce()._values() if g.is_sparse else g).norm(dtype=torch.float32).to(b.device)
                         for g in grads]
        sq = b.sharding.share(torch.stack(norms).square(), b.present_idx_t)
        return b.sharding.reduce(torch.zeros(b.n_layers, device=b.device).index_add_(0, b.idx_t, sq))

    def before_step(self, optimizer: torch.optim.Optimizer | None = None,
                    loss_scale: torch.Tensor | None = None, ceiling_from: Any = None,
                    scaler: Any = None) -> bool:
        """Measure, clip and gate the gradients now in ``.grad``. Returns False when the step must be
        skipped (non-finite gradients and ``skip_nonfinite``): the watched gradients are then set to
        None and the normalization statistics of this step's forward passes are put back.

        ``optimizer``: the optimizer about to step. When it is a fused one (``fused=True``: it takes
        a device-side ``found_inf``/``grad_scale`` the way ``GradScaler`` drives it), a non-log step
        on an accelerator hands it the verdict and the clip factor instead of reading them: no host
        sync; the optimizer then skips a non-finite update itself (weights, moments and its step
        count unchanged), the gradients stay as they were, and this returns True.

        ``loss_scale``: the factor the gradients are still multiplied by, passed by a host whose
        ``GradScaler`` checks them after this call (Lightning's 16-mixed with an optimizer that
        unscales inside its own kernel, ``fused=True``): a skipped step's gradients are then left
        non-finite for the scaler to skip, not removed. Without it, a scale set on the optimizer by
        ``GradScaler.step`` (``optimizer.grad_scale``: the hooks of ``attach`` run inside it) is used.
        Statistics, the clip threshold and AGC see the unscaled gradients; the clip multiplies the
        scaled ones.

        ``ceiling_from``: the optimizer whose learning rate bounds the policy's update ceiling when
        ``optimizer`` is not given (hosts that keep the one host read).

        ``scaler``: the host's ``torch.amp.GradScaler`` when it checks these gradients after this
        call and skips a non-finite step itself (Lightning's 16-mixed, the Trainer's fp16). A
        non-finite step at a loss scale above 1 is then its overflow, fp16's routine while the scale
        settles: counted on the device as the scaler's skip (``totals["loss_scale_skipped"]``), not
        as a non-finite step of the run's own, so not a finding; at a scale of 1 or less the scaling
        did not cause it, and it is one. The same holds when ``GradScaler.step`` drives a fused
        optimizer through ``attach`` (the scale it sets as the optimizer's ``grad_scale``). The step
        itself is gated as any other (the scaler skips it too)."""
        if self._in_step:
            raise RuntimeError("gradguard: before_step() ran twice without after_step(): the same guard is "
                               "hooked twice into one optimizer step (attach() plus guard.step(), or two "
                               "attach() calls on different optimizers)")
        b, grads = self._grads(self._built or self._build())
        self._in_step = True
        self._log_step = b.pipeline.is_log_step()
        self._sums, self._update = None, None
        if not grads:
            return True
        scaler_checks_next = loss_scale is not None  # a host's scaler, yet to check the gradients
        scaler_scale = _optim.scaler_scale(scaler) if scaler is not None else None
        if loss_scale is None:
            loss_scale = self._loss_scale_of(optimizer)
            if scaler_scale is None:
                scaler_scale = loss_scale  # GradScaler.step driving a fused optimizer (attach)
        scaler_active = None if scaler_scale is None else _scaler_active(scaler_scale, b)
        may_clip = self.policy.scales_global and self.clipping_allowed
        if self._log_step and b.pipeline.ceiling is not None:
            self._refresh_ceiling(b, optimizer if optimizer is not None else ceiling_from)
        if b.step_fn.reads_free and loss_scale is None and scaler_active is None and self._plain(b, grads):
            # A CPU device: the step reads the norms itself (most steps once each, as floats, the rest later).
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            scale, finite, sq = b.step_fn.from_norms(norms, b.param_to_layer, b.has_t, need_scale=may_clip,
                                                     need_finite=self.skip_nonfinite, now=self._log_step)
            layer_sq = None if sq is None else torch.from_numpy(sq)
        else:
            layer_sq = self._layer_sq(b, grads)
            if loss_scale is not None:  # still multiplied by a GradScaler's loss scale: measure them unscaled
                layer_sq = layer_sq / loss_scale.detach().to(layer_sq).square()
            scale, finite = b.step_fn(layer_sq, b.has_t, scaler_active)
        weights = None  # a log step's sample of the weights before the update
        if self._log_step:
            unscale = 1.0 if loss_scale is None else 1.0 / float(loss_scale)  # (a log step reads the host)
            self._sums, weights = _snapshots.measure(b, grads, layer_sq, self.histograms, unscale)
        if self.policy.unitwise is not None and self.clipping_allowed:
            self._clip_unitwise(b, grads, loss_scale)
        if b.step_fn.reads_free:
            # A CPU device: the verdict is already a Python float; multiply by a float, only when clipping.
            self._set_gate("host read (cpu)" if self.skip_nonfinite else "none")
            if self.skip_nonfinite and finite == 0.0:
                return self._skip(b, grads, scaler_checks_next)
            if may_clip and scale < 1.0:
                torch._foreach_mul_(grads, scale)
        elif self.skip_nonfinite and not self._log_step and _takes_found_inf(optimizer):
            # The fused optimizer skips a non-finite step itself and folds the clip factor into its
            # kernel (it divides by grad_scale): no host read, no extra pass over the gradients.
            self._set_gate("optimizer")
            self._hand_to(optimizer, 1.0 - finite, 1.0 / scale if may_clip else None)
            self._norm_stats.restore_where(finite)
        elif self.skip_nonfinite:
            # The one host read of a non-log step (GradScaler's gate): 0 = non-finite, 1 = finite,
            # 2 = finite and to be clipped; so the clipping pass runs only when it changes something.
            self._set_gate("host read")
            verdict = int(finite * (1.0 + (scale < 1.0).float()))
            if verdict == 0:
                return self._skip(b, grads, scaler_checks_next)
            if verdict == 2 and may_clip:
                torch._foreach_mul_(grads, scale.to(torch.float32))
        elif may_clip and not self._log_step and _takes_found_inf(optimizer):
            self._hand_to(optimizer, None, 1.0 / scale)  # the fused kernel scales: no extra pass
        elif may_clip:  # no host read allowed: scale unconditionally (by 1 while not clipping)
            torch._foreach_mul_(grads, scale.to(torch.float32))
        if self._sums is not None and self.measure_updates:
            self._update = _snapshots.UpdateSample(b, weights)
        return True

    def _loss_scale_of(self, optimizer) -> torch.Tensor | None:
        """The scale ``GradScaler.step`` sets on a fused optimizer for the step it drives (gradients
        stay scaled until the optimizer's kernel divides them), unless it is ours from ``_hand_to``."""
        scale = getattr(optimizer, "grad_scale", None) if optimizer is not None else None
        if not torch.is_tensor(scale) or (self._handed is not None and scale is self._handed[2]):
            return None
        return scale

    def _refresh_ceiling(self, b: _Built, optimizer) -> None:
        """Log steps: the optimizer's gain (a scheduled learning rate moves it); the ceiling itself
        follows from the snapshot's weight norms at ``_observe``, and on the first step after a build
        from one pass over the weights."""
        b.pipeline.optimizer_gain = _optim.optimizer_gain(optimizer)
        if not b.ceiling_written:
            b.ceiling_written = True
            fresh: dict[str, Any] = {}
            weights = (None if b.pipeline.optimizer_gain is None else  # (no ceiling: no pass over the weights)
                       _optim.weight_norm(b.layout.params, b.sharding, b.device))
            b.pipeline.set_ceiling(fresh, weights)
            b.step_fn.write(fresh)

    def _set_gate(self, gate: str) -> None:
        if gate not in self._gates_logged:  # (log steps read the host even with a fused optimizer: once each)
            self._gates_logged.add(gate)
            logging.getLogger("gradguard").debug("gradguard: non-finite gate: %s", gate)
        self.gate = gate

    def _skip(self, b: _Built, grads, scaler_checks_next: bool = False) -> bool:
        if scaler_checks_next:
            # A GradScaler checks these gradients after us and fails on none at all: leave them
            # non-finite (NaN), so that it skips the update itself (and backs off its scale).
            torch._foreach_mul_(grads, float("nan"))
        else:
            for p in b.layout.params:
                p.grad = None
        self._norm_stats.restore()
        return False

    def _hand_to(self, optimizer, found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None) -> None:
        """Set the optimizer's ``found_inf``/``grad_scale`` for this step, combined with a
        GradScaler's own (which sets them before calling step() and deletes them after)."""
        theirs_inf, theirs_scale = getattr(optimizer, "found_inf", None), getattr(optimizer, "grad_scale", None)
        if self._handed is not None and self._handed[0] is optimizer:  # left over from a step that raised
            theirs_inf = None if theirs_inf is self._handed[1] else theirs_inf
            theirs_scale = None if theirs_scale is self._handed[2] else theirs_scale
        ours = theirs_inf is None and theirs_scale is None
        if theirs_inf is not None:
            found_inf = theirs_inf if found_inf is None else torch.maximum(found_inf, theirs_inf.to(found_inf))
        if theirs_scale is not None:
            grad_scale = theirs_scale if grad_scale is None else theirs_scale * grad_scale
        optimizer.found_inf, optimizer.grad_scale = found_inf, grad_scale
        self._handed = (optimizer, found_inf, grad_scale, ours)

    def _take_back(self) -> None:
        if self._handed is None:
            return
        optimizer, found_inf, grad_scale, ours = self._handed
        self._handed = None
        if ours:  # a GradScaler deletes its own after step()
            for name, value in (("found_inf", found_inf), ("grad_scale", grad_scale)):
                if getattr(optimizer, name, None) is value:
                    delattr(optimizer, name)

    def _clip_unitwise(self, b: _Built, grads, loss_scale: torch.Tensor | None = None) -> None:
        """AGC: per-unit norms of gradient and weight, the policy's rule, one multiply per tensor.
        (A non-finite step is skipped afterwards anyway; NaN units simply stay NaN.) Gradients still
        under a loss scale are judged unscaled and scaled in place."""
        present = [p for p, ok in zip(b.layout.params, b.present) if ok]
        with torch.no_grad():
            for p, g in zip(present, grads):
                g, w = local(g), local(p.detach())
                gr, wr = real_view(g), real_view(w)
                dims = tuple(range(1, gr.dim()))
                g_norm = gr.float().norm(dim=dims) if dims else gr.float().abs()
                if loss_scale is not None:
                    g_norm = g_norm / loss_scale.detach().to(g_norm)
                w_norm = wr.float().norm(dim=dims) if dims else wr.float().abs()
                factor = self.policy.unitwise(g_norm, w_norm, torch_ops)
                g.mul_(factor.reshape(factor.shape + (1,) * (g.dim() - factor.dim())).to(g.real.dtype))

    def after_step(self, stepped: bool = True) -> Decision | None:
        """Call once the optimizer has run (``stepped``) or was skipped. On a log step: read the
        window, run the detectors, report."""
        if not self._in_step:
            raise RuntimeError("gradguard: after_step() without before_step()")
        self._in_step = False
        self._take_back()
        self._norm_stats.next_step()
        b = self._built
        step = b.pipeline.step
        b.pipeline.step += 1
        self._step_moved()
        if not self._log_step:
            return None
        sums, self._sums = self._sums, None
        update, self._update = self._update, None
        snap = None
        if sums is not None:
            if update is not None and stepped:
                sums.update_sq = update.applied_sq()
            sums.saturation, sums.temporal = self._probes.take()
            snap = b.pipeline.snapshot(sums)
        else:
            self._probes.take()
        return self._observe(snap, report=b.pipeline.is_report_step(step))

    def flush(self) -> Decision | None:
        """Judge and report the steps since the last log step now (end of training, ``close``)."""
        if self._built is None or self._in_step:
            return None
        host = self._host_state()
        if float(host["acc_steps"]) == 0:
            return None
        return self._observe(None, host=host)

    def _host_state(self) -> dict[str, np.ndarray]:
        return self._built.step_fn.host()  # one copy to the host

    def _observe(self, snap, report: bool = True, host: dict | None = None) -> Decision:
        b = self._built
        host = self._host_state() if host is None else host
        decision, fresh = b.pipeline.observe(host, last_step=b.pipeline.step - 1, snapshot=snap, report=report)
        written = {k: fresh[k] for k in stats.window_keys()}
        if decision.enable_clipping and b.pipeline.latch is not None:
            written[b.pipeline.latch] = np.float32(1.0)
        if b.pipeline.ceiling is not None and snap is not None:
            written[b.pipeline.ceiling] = fresh[b.pipeline.ceiling]
        b.step_fn.write(written)
        return decision

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The core's checkpoint format (``gradguard.pipeline``), device state as CPU tensors."""
        if self._built is None:
            return dict(self._pending or {})
        b = self._built
        return b.pipeline.state_dict({k: v.detach().cpu().clone() for k, v in b.state.items()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: other layers are re-mapped by name, other shapes refused, a
        different clip policy starts fresh (see ``gradguard.pipeline.Pipeline.restore``)."""
        if not state:
            return
        if state.get("version") not in (1, pipeline.CHECKPOINT_VERSION) or "device_state" not in state:
            raise ValueError(f"state_dict is not a gradguard state (keys {sorted(state)[:6]})")
        if self._built is None:
            self._pending = dict(state)  # applied when the layout is fixed at the first step
            self.step_count = int(state["step_count"])
            return
        self._build(carry=state)

    def close(self) -> None:
        self._order.stop()
        self._probes.close()
        self._norm_stats.close()
        if self._built is not None:
            self._built.pipeline.monitor.close()
        else:
            for s in self._sinks:
                s.close()


def _scaler_active(scale: torch.Tensor, b: _Built) -> Any:
    """``device_step``'s ``scaler_active``: 1.0 where the loss scale is above 1 (an overflow there is
    the scaler's to skip), on the step's device; a Python float on a CPU, where reading is free."""
    active = (scale.detach() > 1.0).to(device=b.device, dtype=torch.float32)
    return float(active) if b.step_fn.reads_free else active


def _takes_found_inf(optimizer) -> bool:
    """Optimizers whose step() reads a device-side ``found_inf``/``grad_scale`` (``fused=True``)."""
    return optimizer is not None and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
