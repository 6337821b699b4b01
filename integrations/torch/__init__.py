"""gradguard for plain PyTorch loops.

    guard = GradGuard(model, clip="auto")
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        guard.step(optimizer)          # measure, detect, clip, skip a non-finite step, optimizer.step()
    print(guard.findings)

or, without touching the loop: ``guard.attach(optimizer)``.

Every step runs on the gradients' device with torch foreach kernels: one ``_foreach_norm`` pass for
the per-layer norms, a few tiny ops on a vector of layer norms, and (when a policy may clip) one
``_foreach_mul_``. Nothing is copied to the host on a step that does not log, except one boolean
when ``skip_nonfinite=True`` (the same gate ``GradScaler`` uses) to decide whether to step.
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from gradguard import clipping, stats
from gradguard.detectors import DetectorConfig
from gradguard.findings import Finding
from gradguard.layers import LayerInfo, ModelFacts
from gradguard.monitor import Decision, Monitor
from gradguard.sinks import make_sinks

__all__ = ["GradGuard", "TorchEngine", "torch_ops", "describe_model"]

_UPDATE_SAMPLE = 4096  # elements per parameter remembered on a log step to measure the applied update


def _maximum(a, b):
    return torch.maximum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, min=b)


def _minimum(a, b):
    return torch.minimum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, max=b)


torch_ops = types.SimpleNamespace(
    where=torch.where, sqrt=torch.sqrt, log=torch.log, exp=torch.exp, maximum=_maximum, minimum=_minimum,
    isfinite=torch.isfinite, sum=torch.sum, asfloat=lambda b: b.to(torch.float32), concat=torch.cat,
    stack=torch.stack, asint=lambda x: x.to(torch.long), sort=lambda x: torch.sort(x).values,
    take=lambda x, i: torch.take(x, torch.as_tensor(i, device=x.device).to(torch.long)),
)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_UNIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SATURATING_MODULES = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign)
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel / torch.compile wrappers keep the user's names under .module / ._orig_mod
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def describe_model(model: nn.Module) -> ModelFacts:
    """Architecture facts read off the module tree (activations used as modules, norms, RNN cells)."""
    acts, norm, rec = set(), False, set()
    for m in model.modules():
        name = type(m).__name__.lower()
        if isinstance(m, _NORM_TYPES) or "rmsnorm" in name:
            norm = True
        if isinstance(m, nn.LSTM):
            rec.add("lstm")
        elif isinstance(m, nn.GRU):
            rec.add("gru")
        elif isinstance(m, nn.RNN):
            rec.add("rnn")
        if m.__class__.__module__ == "torch.nn.modules.activation":
            acts.add(name)
    return ModelFacts.of(acts, norm, rec)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t if type(t) is torch.Tensor or not hasattr(t, "to_local") else t.to_local()


def _is_sharded(p: torch.Tensor) -> bool:
    return hasattr(p, "placements") and any(pl.is_shard() for pl in p.placements)


class TorchEngine:
    """The per-step machinery shared by ``GradGuard`` and the Lightning callback.

    ``before_step()`` measures, clips and gates (returns False when the step must be skipped: the
    gradients have been set to None); ``after_step()`` finishes a log step once the optimizer ran.
    """

    def __init__(self, model: nn.Module, *, clip: Any = "auto", log_every_n_steps: int = 50,
                 skip_nonfinite: bool = True, sinks: Any = None, max_logged_layers: int | None = 32,
                 detector_config: DetectorConfig | None = None, tracker_config: stats.TrackerConfig | None = None,
                 measure_updates: bool = True, histograms: bool | None = None, logging_rank: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        self.model = _unwrap(model)
        self.policy = clipping.resolve(clip)
        self.log_every_n_steps = log_every_n_steps
        self.skip_nonfinite = skip_nonfinite
        self.tracker = tracker_config or stats.TrackerConfig()
        self.measure_updates = measure_updates
        self._sink_list = make_sinks(sinks)
        self.histograms = histograms if histograms is not None else any(
            getattr(s, "wants_histograms", False) for s in self._sink_list)
        self._detector_config = detector_config
        self._max_logged_layers = max_logged_layers
        self._logging_rank = logging_rank
        self.clipping_allowed = True  # the Lightning callback turns this off when the Trainer clips

        owners = [(n, m) for n, m in self.model.named_modules()
                  if any(p.requires_grad for p in m.parameters(recurse=False))]
        if not owners:
            raise ValueError(f"model has no trainable parameters to watch (model={type(model).__name__})")
        self._registration = [n for n, _ in self.model.named_modules()]
        self._first_call: dict[str, int] = {}
        self._order_hooks = [m.register_forward_pre_hook(self._order_hook(n)) for n, m in owners]
        # Activations join the forward order too: one after which no layer runs is the model's output.
        self._order_hooks += [m.register_forward_pre_hook(self._order_hook("act:" + n))
                              for n, m in self.model.named_modules() if isinstance(m, _SATURATING_MODULES)]
        self._owners = owners
        self._saturation_hooks: list = []
        self._saturation: dict[str, float] = {}
        self._temporal: dict[str, torch.Tensor] = {}
        self._temporal_hooks = [m.register_forward_pre_hook(self._temporal_hook(n, m))
                                for n, m in self.model.named_modules() if isinstance(m, _RECURRENT)]
        self.step_count = 0  # optimizer steps seen, skipped ones included
        self._built = False
        self._pending_state: dict | None = None
        self.monitor: Monitor | None = None

    # ------------------------------------------------------------------ layout, fixed at the first step

    def _order_hook(self, name):
        def hook(module, args):
            self._first_call.setdefault(name, len(self._first_call))
        return hook

    def _build(self) -> None:
        for h in self._order_hooks:
            h.remove()
        self._order_hooks = []
        reg_index = {n: i for i, n in enumerate(self._registration)}
        # Modules that never ran (e.g. MultiheadAttention.out_proj, used functionally) sit right after
        # the nearest module before them in registration order that did run.
        last_key = -1.0
        keys = {}
        for n in self._registration:
            if n in self._first_call:
                last_key = float(self._first_call[n])
                keys[n] = last_key
            else:
                last_key += 1e-6
                keys[n] = last_key
        owners = sorted(self._owners, key=lambda nm: (keys[nm[0]], reg_index[nm[0]]))
        seen: set[int] = set()
        self.layers: list[LayerInfo] = []
        self.params: list[nn.Parameter] = []
        param_layer: list[int] = []
        self._unit_param: dict[int, tuple] = {}  # layer index -> (weight whose rows are units, bias or None)
        for name, module in owners:
            own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
            if not own:
                continue
            seen.update(id(p) for p in own)
            weight = next((p for p in own if p.dim() >= 2), None)
            units = weight.shape[0] if isinstance(module, _UNIT_TYPES) and weight is not None else None
            fan_in = math.prod(weight.shape[1:]) if weight is not None else None
            self.layers.append(LayerInfo(name or type(module).__name__, type(module).__name__,
                                         sum(p.numel() for p in own), fan_in, units))
            if units:
                bias = getattr(module, "bias", None)
                bias = bias if isinstance(bias, torch.Tensor) and bias.requires_grad else None
                self._unit_param[len(self.layers) - 1] = (weight, bias)
            for p in own:
                self.params.append(p)
                param_layer.append(len(self.layers) - 1)
        self.param_layer = param_layer
        p0 = self.params[0]
        self.device = p0.device if p0.device.type != "meta" else torch.device("cpu")
        self._param_layer_t = torch.tensor(param_layer, device=self.device)
        self.n_layers = len(self.layers)
        self._setup_sharding()
        self.monitor = Monitor(self.layers, describe_model(self.model), policy=self.policy,
                               skip_nonfinite=self.skip_nonfinite, sinks=self._sink_list,
                               config=self._detector_config, max_logged_layers=self._max_logged_layers,
                               logging_rank=self._is_logging_rank())
        self.state = {k: torch.as_tensor(v, dtype=torch.float32, device=self.device)
                      for k, v in stats.init_state(self.n_layers, self.policy).items()}
        self._present_key = None
        self._install_saturation_hooks()
        self._built = True
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    def _setup_sharding(self) -> None:
        """FSDP2 (``fully_shard``) parameters are DTensors: each rank holds a shard. Statistics are
        computed on the local shards and summed (or maxed) over the shard groups, one small
        collective per step; parameters that are replicated count 1/world each, so once in the sum."""
        self._shard_groups: list = []
        self._param_share = None
        sharded = [_is_sharded(p) for p in self.params]
        if not any(sharded):
            return
        first = self.params[sharded.index(True)]
        dims = [i for i, pl in enumerate(first.placements) if pl.is_shard()]
        self._shard_groups = [first.device_mesh.get_group(i) for i in dims]
        world = math.prod(first.device_mesh.size(i) for i in dims)
        self._param_share = torch.tensor([1.0 if s else 1.0 / world for s in sharded], device=self.device)
        self._unit_param = {}  # units are split across ranks: judge dead units by whole layers only

    def _reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self._shard_groups:
            d = torch.distributed
            for group in self._shard_groups:
                d.all_reduce(values, op=d.ReduceOp.SUM if op == "sum" else d.ReduceOp.MAX, group=group)
        return values

    def _share(self, per_param: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Weights per-parameter sums (parameters at ``positions`` of ``self.params``) so replicated
        parameters count once after the shard-group sum."""
        return per_param if self._param_share is None else per_param * self._param_share[positions]

    def _is_logging_rank(self) -> bool:
        if self._logging_rank is not None:
            return self._logging_rank
        d = torch.distributed
        return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0

    def _is_log_step(self, step: int) -> bool:
        # The first step is measured and judged too (not logged): its update shows a learning rate
        # or an init that is wrong from the start, before the run has a level to spike from.
        return step == 0 or (step + 1) % self.log_every_n_steps == 0

    def _measuring_forward(self, module: nn.Module) -> bool:
        """The training forward pass whose backward feeds a log step."""
        return self._is_log_step(self.step_count) and torch.is_grad_enabled() and module.training

    def _install_saturation_hooks(self) -> None:
        """Sigmoid/tanh modules report the share of outputs in their flat tails, on the forward pass
        that precedes a log step only. An output activation (no layer runs after it) is left out:
        with its matched loss (BCE on a sigmoid) the flat slope cancels exactly, and saturation there
        only means confident predictions."""
        last_layer = max((self._first_call.get(n, -1) for n, _ in self._owners), default=-1)
        for name, m in self.model.named_modules():
            if isinstance(m, _SATURATING_MODULES) and self._first_call.get("act:" + name, -1) < last_layer:
                self._saturation_hooks.append(m.register_forward_hook(self._saturation_hook(name, m)))

    def _saturation_hook(self, name, module):
        lo, hi = (0.01, 0.99) if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)) else (-0.99, 0.99)

        def hook(mod, args, out):
            if self._measuring_forward(mod):
                with torch.no_grad():
                    self._saturation[name] = ((out <= lo) | (out >= hi)).float().mean()
        return hook

    def _temporal_hook(self, name, module):
        """On the forward pass before a log step, watch the gradient that reaches each time step of a
        recurrent module's input (vanishing through time is invisible to per-layer statistics)."""
        def pre(mod, args):
            x = args[0] if args else None
            if not (isinstance(x, torch.Tensor) and x.dim() == 3 and self._measuring_forward(mod)):
                return None  # PackedSequence, unbatched input, or not a measuring pass
            replaced = not x.requires_grad
            if replaced:  # raw data: a leaf just for this measurement
                x = x.detach().requires_grad_(True)
            time_dim = 1 if mod.batch_first else 0

            def grad_hook(g):
                with torch.no_grad():
                    self._temporal[name] = g.float().square().movedim(time_dim, 0).flatten(1).mean(1).sqrt()

            x.register_hook(grad_hook)
            return (x, *args[1:]) if replaced else None
        return pre

    # ------------------------------------------------------------------ per step

    def _grads(self):
        grads = [p.grad for p in self.params]
        present = tuple(g is not None for g in grads)
        if present != self._present_key:
            self._present_key = present
            idx = [self.param_layer[i] for i, ok in enumerate(present) if ok]
            self._idx_t = torch.tensor(idx, device=self.device, dtype=torch.long)
            self._present_idx_t = torch.tensor([i for i, ok in enumerate(present) if ok], device=self.device,
                                               dtype=torch.long)
            has = torch.zeros(self.n_layers, device=self.device)
            if idx:
                has[torch.tensor(sorted(set(idx)))] = 1.0
            self._has_t = has
        return [g for g in grads if g is not None]

    def _layer_sq(self, grads) -> torch.Tensor:
        grads = [_local(g) for g in grads]
        dense = all(not g.is_sparse for g in grads)
        same = dense and all(g.device == self.device for g in grads)
        if same:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        else:  # sparse gradients or several devices: one norm at a time
            norms = [(g.coalesce()._values() if g.is_sparse else g).norm(dtype=torch.float32).to(self.device)
                     for g in grads]
        sq = self._share(torch.stack(norms).square(), self._present_idx_t)
        return self._reduce(torch.zeros(self.n_layers, device=self.device).index_add_(0, self._idx_t, sq))

    def before_step(self) -> bool:
        """Measure, clip, and gate. Returns False when the step must be skipped (non-finite
        gradients and ``skip_nonfinite``): the watched gradients are then set to None."""
        if not self._built:
            self._build()
        self._log_step = self._is_log_step(self.step_count)
        grads = self._grads()
        if not grads:
            self._snapshot = None
            return True
        layer_sq = self._layer_sq(grads)
        scale, finite, self.state = stats.device_step(self.state, layer_sq, self._has_t, self.policy, torch_ops,
                                                     self.tracker)
        self._snapshot = self._take_snapshot(grads, layer_sq) if self._log_step else None
        if self.policy.unitwise is not None and self.clipping_allowed:
            self._clip_unitwise(grads)
        may_clip = self.policy.scales_global and self.clipping_allowed
        if self.skip_nonfinite:
            # The one host read of a non-log step (GradScaler's gate): 0 = non-finite, 1 = finite,
            # 2 = finite and to be clipped; so the clipping pass runs only when it changes something.
            verdict = int(finite * (1.0 + (scale < 1.0).float()))
            if verdict == 0:
                for p in self.params:
                    p.grad = None
                return False
            if verdict == 2 and may_clip:
                torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        elif may_clip:  # no host read allowed: scale unconditionally (by 1 while not clipping)
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        if self._snapshot is not None and self.measure_updates:
            self._remember_weights()
        return True

    def _clip_unitwise(self, grads) -> None:
        """AGC: per-unit norms of gradient and weight, the policy's rule, one multiply per tensor.
        (A non-finite step is skipped afterwards anyway; NaN units simply stay NaN.)"""
        present = [p for p, ok in zip(self.params, self._present_key) if ok]
        with torch.no_grad():
            for p, g in zip(present, grads):
                g, w = _local(g), _local(p.detach())
                dims = tuple(range(1, g.dim()))
                g_norm = g.float().norm(dim=dims, keepdim=True) if dims else g.float().abs()
                w_norm = w.float().norm(dim=dims, keepdim=True) if dims else w.float().abs()
                g.mul_(self.policy.unitwise(g_norm, w_norm, torch_ops).to(g.dtype))

    def after_step(self, stepped: bool = True) -> Decision | None:
        """Call once the optimizer has run (or was skipped). On a log step: read the window, run the
        detectors, report."""
        self.step_count += 1
        if not self._log_step:
            return None
        snap = self._snapshot
        if snap is not None and self.measure_updates and stepped and getattr(self, "_before", None) is not None:
            snap.update_norm = self._applied_update()
        self._before = None
        # the first step is judged even when it is not a log step; only log steps are reported
        return self._observe(snap, report=self.step_count % self.log_every_n_steps == 0)

    def flush(self) -> Decision | None:
        """Evaluate the steps since the last log step now (used at the end of training)."""
        if not self._built or float(self.state["acc_steps"]) == 0:
            return None
        return self._observe(None)

    def _observe(self, snap: stats.Snapshot | None, report: bool = True) -> Decision:
        keys = list(self.state)
        flat = torch.cat([self.state[k].reshape(-1) for k in keys]).cpu().numpy()  # one copy to the host
        host, offset = {}, 0
        for k in keys:
            n = self.state[k].numel()
            host[k] = flat[offset:offset + n].reshape(self.state[k].shape)
            offset += n
        window = stats.WindowStats.from_state(host, last_step=self.step_count - 1)
        for k, v in stats.reset_window(self.n_layers).items():
            self.state[k] = torch.as_tensor(v, dtype=torch.float32, device=self.device)
        if snap is not None and self._saturation:
            snap.saturation = {k: float(v) for k, v in self._saturation.items()}
        if snap is not None and self._temporal:
            snap.temporal = {k: v.cpu().double().numpy() for k, v in self._temporal.items()}
        self._saturation, self._temporal = {}, {}
        decision = self.monitor.observe(window, snap, report=report)
        latch = stats.latch_key(self.policy)
        if decision.enable_clipping and latch is not None:
            self.state[latch] = torch.ones((), device=self.device)
        return decision

    # ------------------------------------------------------------------ log-step measurements

    def _per_layer(self, values: torch.Tensor, reduce: str = "sum", pick: list[int] | None = None) -> np.ndarray:
        """Per-parameter values of the parameters with a gradient (or of ``pick``, positions in that
        list), summed or maxed per layer, over every shard."""
        index, positions = self._idx_t, self._present_idx_t
        if pick is not None:
            index, positions = index[pick], positions[pick]
        out = torch.zeros(self.n_layers, device=self.device, dtype=torch.float32)
        if reduce == "sum":
            out.index_add_(0, index, self._share(values, positions))
        else:
            out.scatter_reduce_(0, index, values, "amax")
        return self._reduce(out, reduce).cpu().numpy().astype(np.float64)

    def _take_snapshot(self, grads, layer_sq) -> stats.Snapshot:
        with torch.no_grad():
            dense = [_local(g) for g in grads if not g.is_sparse]
            if len(dense) != len(grads):
                return stats.Snapshot(norm=layer_sq.sqrt().cpu().numpy().astype(np.float64))
            numel = np.array([l.numel for l in self.layers], dtype=np.float64)
            norm = layer_sq.sqrt().cpu().numpy().astype(np.float64)
            # max-abs and zero counts only feed the logged keys: take them for the logged layers only
            logged = set(self.monitor.logged.tolist())
            owner = self._idx_t.tolist()
            pick = [j for j, layer in enumerate(owner) if layer in logged]
            sub = [dense[j] for j in pick]
            max_abs = self._per_layer(torch.stack(torch._foreach_norm(sub, float("inf"), dtype=torch.float32)),
                                      "amax", pick)
            nonzero = torch.stack([torch.count_nonzero(g).float() for g in sub])
            sub_numel = torch.tensor([float(g.numel()) for g in sub], device=self.device)
            zeros = self._per_layer(sub_numel - nonzero, "sum", pick)
            present = [p for p, ok in zip(self.params, self._present_key) if ok]
            w_sq = torch.stack(torch._foreach_norm([_local(p.detach()) for p in present], 2,
                                                   dtype=torch.float32)).square()
            weight_norm = np.sqrt(self._per_layer(w_sq))
            dead = [None] * self.n_layers
            for i, (weight, bias) in self._unit_param.items():
                if weight.grad is not None:
                    dead[i] = self._dead_units(weight.grad.detach(), None if bias is None else bias.grad)
            hist = None
            if self.histograms:
                hist = {}
                for i in self.monitor.logged:
                    gs = [g.detach().float().flatten() for g, l in zip(dense, self._idx_t.tolist()) if l == i]
                    if gs:
                        v = torch.cat(gs)
                        v = v[torch.isfinite(v)]
                        if v.numel():
                            counts, edges = np.histogram(v.cpu().numpy(), bins=64)
                            hist[self.layers[i].name] = (counts, edges)
            has = self._has_t.cpu().numpy() > 0
            nan = np.full(self.n_layers, np.nan)
            measured = has & np.isin(np.arange(self.n_layers), list(logged))
            return stats.Snapshot(
                norm=np.where(has, norm, nan), rms=np.where(has, norm / np.sqrt(numel), nan),
                max_abs=np.where(measured, max_abs, nan), zero_frac=np.where(measured, zeros / numel, nan),
                weight_norm=weight_norm, weight_rms=weight_norm / np.sqrt(numel), dead_units=dead, histograms=hist)

    @staticmethod
    def _dead_units(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> np.ndarray:
        """Units whose whole gradient row is exactly zero. A non-zero bias gradient already proves a
        unit alive, so only the other rows are read (all of them for a bias-free layer)."""
        rows = weight_grad.flatten(1)
        suspect = torch.arange(rows.shape[0], device=rows.device)
        if bias_grad is not None:
            suspect = torch.nonzero(bias_grad.detach() == 0).flatten()
        dead = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        if suspect.numel():
            dead[suspect] = torch.count_nonzero(rows[suspect], dim=1) == 0
        return dead.cpu().numpy()

    def _remember_weights(self) -> None:
        """A strided sample of each parameter (at most 4096 elements), so the update the optimizer
        applies on this log step can be measured without a full copy of the weights."""
        self._before = []
        with torch.no_grad():
            for p in self.params:
                flat = _local(p.detach()).reshape(-1)
                stride = max(1, flat.numel() // _UPDATE_SAMPLE)
                self._before.append((stride, flat[::stride].clone()))

    def _applied_update(self) -> np.ndarray:
        with torch.no_grad():
            sq = []
            for p, (stride, old) in zip(self.params, self._before):
                local = _local(p.detach()).reshape(-1)
                sample = local[::stride]
                d = (sample.float() - old.float()).square().sum() * (local.numel() / max(sample.numel(), 1))
                sq.append(d)
            every = torch.arange(len(self.params), device=self.device)
            out = torch.zeros(self.n_layers, device=self.device).index_add_(
                0, self._param_layer_t, self._share(torch.stack(sq).to(self.device), every))
            self._reduce(out)
        return np.sqrt(out.cpu().numpy().astype(np.float64))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        if not self._built:
            return dict(self._pending_state or {})
        return {
            "version": 1,
            "layers": [l.name for l in self.layers],
            "step_count": self.step_count,
            "device_state": {k: v.detach().cpu().clone() for k, v in self.state.items()},
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if not self._built:
            self._pending_state = state  # applied when the layout is fixed at the first step
            self.step_count = int(state["step_count"])
            return
        self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        names = [l.name for l in self.layers]
        if state["layers"] != names:
            raise ValueError(f"state_dict was saved for layers {state['layers'][:5]}..., this model has {names[:5]}...")
        self.step_count = int(state["step_count"])
        self.state = {k: torch.as_tensor(v, dtype=torch.float32).to(self.device) for k, v in state["device_state"].items()}
        self.monitor.load_state_dict(state["monitor"])

    def close(self) -> None:
        for h in self._saturation_hooks + self._order_hooks + self._temporal_hooks:
            h.remove()
        self._saturation_hooks, self._order_hooks, self._temporal_hooks = [], [], []
        if self.monitor is not None:
            self.monitor.close()


class GradGuard:
    """Watch, diagnose and protect a PyTorch model's gradients.

    Args:
        model: the ``nn.Module`` being trained (a DDP/compiled wrapper is unwrapped for names).
        clip: ``"auto"`` (default: off until a spike or explosion, then adaptive), ``"zscore"``
            (ZClip), a float (fixed max global norm), ``None`` (monitor only), or a ``ClipPolicy``.
        log_every_n_steps: how often statistics leave the device, detectors run and sinks log.
        skip_nonfinite: skip a step whose gradients hold NaN/Inf (weights and optimizer state untouched).
        sinks: ``None``, a directory or ``.jsonl`` path, a ``gradguard.Sink``, or a list of them.
        max_logged_layers: per-layer scalars for at most this many layers, spread over depth (None: all).
    """

    def __init__(self, model: nn.Module, clip: Any = "auto", log_every_n_steps: int = 50,
                 skip_nonfinite: bool = True, sinks: Any = None, **options: Any):
        self.engine = TorchEngine(model, clip=clip, log_every_n_steps=log_every_n_steps,
                                  skip_nonfinite=skip_nonfinite, sinks=sinks, **options)
        self._handles: list = []

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> bool:
        """Measure, clip, then ``optimizer.step(*args, **kwargs)``, unless the gradients are
        non-finite: then the step is skipped and the gradients are cleared. Returns whether the
        optimizer stepped."""
        ok = self.engine.before_step()
        if ok:
            optimizer.step(*args, **kwargs)
        self.engine.after_step(ok)
        return ok

    def attach(self, optimizer: torch.optim.Optimizer):
        """Do the work of ``step`` inside ``optimizer.step()`` through its step hooks. A non-finite
        step reaches the optimizer with no gradients, so it changes nothing. Returns a handle with
        ``remove()``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        state = {"ok": True}

        def pre(opt, args, kwargs):
            state["ok"] = self.engine.before_step()

        def post(opt, args, kwargs):
            self.engine.after_step(state["ok"])

        handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        self._handles += handles

        class _Handle:
            def remove(_self):
                for h in handles:
                    h.remove()

        return _Handle()

    @property
    def findings(self) -> list[Finding]:
        """Findings so far; steps since the last log step are evaluated first."""
        self.engine.flush()
        return self.engine.monitor.findings if self.engine.monitor else []

    @property
    def layers(self) -> list[LayerInfo]:
        return list(self.engine.layers) if self.engine._built else []

    @property
    def history(self):
        """``(step, per-layer window-mean gradient norm)`` per log step, for reports and heatmaps."""
        return list(self.engine.monitor.history) if self.engine.monitor else []

    @property
    def skipped_steps(self) -> int:
        self.engine.flush()
        return self.engine.monitor.totals["skipped"] if self.engine.monitor else 0

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def close(self) -> None:
        """Flush, remove hooks, close sinks."""
        self.engine.flush()
        for h in self._handles:
            h.remove()
        self.engine.close()
