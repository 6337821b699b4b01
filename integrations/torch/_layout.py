"""Which layers there are, in which order: modules that own trainable parameters, sorted by the
order they first run in the forward pass (registration order for modules that never run)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from gradguard.layers import LayerInfo, ModelFacts

ROOT_NAME = "(root)"
"""The layer name of parameters owned by the root module itself (e.g. a positional embedding
``nn.Parameter`` on the model): stable whatever the model's class is called."""

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
UNIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SATURATING_MODULES = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign)
RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def unwrap(model: nn.Module) -> nn.Module:
    """DDP / DataParallel / torch.compile wrappers keep the user's names under .module / ._orig_mod."""
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
        if isinstance(m, NORM_TYPES) or "rmsnorm" in name:
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


class ForwardOrder:
    """Records the order in which modules first run (forward pre-hooks, removed at ``stop``).
    Every module that owns a parameter is watched, trainable or not, so a layer unfrozen later
    still takes its place in the forward order."""

    def __init__(self, model: nn.Module):
        self.registration = [n for n, _ in model.named_modules()]
        self.first_call: dict[str, int] = {}
        watched = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        watched += [("act:" + n, m) for n, m in model.named_modules() if isinstance(m, SATURATING_MODULES)]
        self._hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in watched]

    def _hook(self, name):
        def hook(module, args):
            self.first_call.setdefault(name, len(self.first_call))
        return hook

    def stop(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def keys(self) -> dict[str, float]:
        """Sort key per module name: its first call; modules that never ran (e.g.
        ``MultiheadAttention.out_proj``, used functionally) sit right after the nearest module
        before them in registration order that did run."""
        last, keys = -1.0, {}
        for n in self.registration:
            last = float(self.first_call[n]) if n in self.first_call else last + 1e-6
            keys[n] = last
        return keys

    def last_layer_call(self, owners) -> int:
        return max((self.first_call.get(n, -1) for n in owners), default=-1)


@dataclasses.dataclass
class Layout:
    """The watched layers and their parameters, fixed until the trainable set changes."""

    layers: list[LayerInfo]
    params: list[nn.Parameter]
    param_layer: list[int]  # layer index of each parameter
    unit_param: dict[int, tuple]  # layer index -> (weight whose rows are units, bias or None)
    trainable: tuple[bool, ...]  # requires_grad of every parameter of the model when built

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]


def trainable_key(all_params: list[nn.Parameter]) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in all_params)


def owners_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def build_layout(model: nn.Module, order: ForwardOrder, all_params: list[nn.Parameter]) -> Layout:
    keys = order.keys()
    reg_index = {n: i for i, n in enumerate(order.registration)}
    owners = sorted(owners_of(model), key=lambda nm: (keys.get(nm[0], math.inf), reg_index.get(nm[0], 0)))
    seen: set[int] = set()
    layers, params, param_layer, unit_param = [], [], [], {}
    for name, module in owners:
        # (a parameter with no elements has no gradient to measure: not a layer's, so no 0/0 statistics)
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen and p.numel() > 0]
        if not own:
            continue  # shared parameters belong to the first module that runs
        seen.update(id(p) for p in own)
        weight = next((p for p in own if p.dim() >= 2), None)
        units = weight.shape[0] if isinstance(module, UNIT_TYPES) and weight is not None else None
        fan_in = math.prod(weight.shape[1:]) if weight is not None else None
        layers.append(LayerInfo(name or ROOT_NAME, type(module).__name__, sum(p.numel() for p in own), fan_in, units))
        if units:
            bias = getattr(module, "bias", None)
            bias = bias if isinstance(bias, torch.Tensor) and bias.requires_grad else None
            unit_param[len(layers) - 1] = (weight, bias)
        for p in own:
            params.append(p)
            param_layer.append(len(layers) - 1)
    return Layout(layers, params, param_layer, unit_param, trainable_key(all_params))
