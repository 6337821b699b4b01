"""Forward-pass probes, active on the training forward pass that precedes a log step only:
saturation of sigmoid/tanh modules and the gradient reaching each time step of a recurrent module."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from gradguard.torch._layout import RECURRENT, SATURATING_MODULES, ForwardOrder


class Probes:
    def __init__(self, model: nn.Module, measuring: Callable[[nn.Module], bool]):
        self._model = model
        self._measuring = measuring
        self._saturation: dict[str, torch.Tensor] = {}
        self._temporal: dict[str, torch.Tensor] = {}
        self._hooks = [m.register_forward_pre_hook(self._temporal_hook(n, m))
                       for n, m in model.named_modules() if isinstance(m, RECURRENT)]

    def install_saturation(self, order: ForwardOrder, owner_names) -> None:
        """Sigmoid/tanh modules report the share of outputs in their flat tails. An output activation
        (no layer runs after it) is left out: with its matched loss (BCE on a sigmoid) the flat slope
        cancels exactly, and saturation there only means confident predictions."""
        last_layer = order.last_layer_call(owner_names)
        for name, m in self._model.named_modules():
            if isinstance(m, SATURATING_MODULES) and order.first_call.get("act:" + name, -1) < last_layer:
                self._hooks.append(m.register_forward_hook(self._saturation_hook(name, m)))

    def _saturation_hook(self, name, module):
        lo, hi = (0.01, 0.99) if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)) else (-0.99, 0.99)

        def hook(mod, args, out):
            if self._measuring(mod):
                with torch.no_grad():
                    self._saturation[name] = ((out <= lo) | (out >= hi)).float().mean()
        return hook

    def _temporal_hook(self, name, module):
        """Vanishing through time is invisible to per-layer statistics: watch the gradient that
        reaches each time step of the recurrent module's input."""
        def pre(mod, args):
            x = args[0] if args else None
            if not (isinstance(x, torch.Tensor) and x.dim() == 3 and self._measuring(mod)):
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

    def take(self) -> tuple[dict[str, float] | None, dict[str, np.ndarray] | None]:
        """What the last measuring pass saw (host copies), and forget it."""
        sat = {k: float(v) for k, v in self._saturation.items()} or None
        tmp = {k: v.cpu().double().numpy() for k, v in self._temporal.items()} or None
        self._saturation, self._temporal = {}, {}
        return sat, tmp

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
