"""Normalization statistics of a skipped step: the forward pass of a poisoned batch has already
written NaN into BatchNorm's running mean/var (and counted the batch) before gradguard sees the
gradients. Each norm module with running statistics keeps, on the device, a copy of its buffers
taken at its first training forward of the step; a skipped step copies them back. Healthy steps
cost one small device copy per buffer and no host sync; when the optimizer gates the step on the
device (``restore_where``), one small ``where`` per buffer."""

from __future__ import annotations

import torch
from torch import nn


class NormStats:
    def __init__(self, model: nn.Module):
        self._saved: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._hooks = [m.register_forward_pre_hook(self._hook)
                       for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]

    def _hook(self, module, args):
        if module.training and id(module) not in self._saved:
            with torch.no_grad():
                self._saved[id(module)] = [(b, b.detach().clone()) for b in
                                           (module.running_mean, module.running_var, module.num_batches_tracked)
                                           if isinstance(b, torch.Tensor)]

    def restore(self) -> None:
        """Put back the statistics as they were before this step's forward passes."""
        with torch.no_grad():
            for pairs in self._saved.values():
                for live, saved in pairs:
                    live.copy_(saved)
        self._saved = {}

    def restore_where(self, finite: torch.Tensor) -> None:
        """``restore`` decided on the device (no host read): each buffer keeps its new value where
        ``finite`` is 1 and gets the saved one back where it is 0."""
        if self._saved:
            with torch.no_grad():
                keep = finite > 0
                for pairs in self._saved.values():
                    for live, saved in pairs:
                        live.copy_(torch.where(keep, live, saved))
        self._saved = {}

    def next_step(self) -> None:
        """The step is over (applied or skipped): the next forward takes a new copy."""
        self._saved = {}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._saved = [], {}
