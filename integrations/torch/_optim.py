"""What the update ceiling of ``clip="auto"`` needs from torch (see ``gradguard.clipping.update_ceiling``):
how far the optimizer moves the weights per unit of gradient norm, and the weights' norm."""

from __future__ import annotations

import torch

from gradguard import clipping
from gradguard.torch._ops import real_view
from gradguard.torch._sharding import Sharding, local


def unwrap(optimizer):
    """The torch optimizer inside a host's wrapper (Accelerate's ``AcceleratedOptimizer.optimizer``,
    Lightning's ``LightningOptimizer._optimizer``)."""
    for _ in range(4):  # (AcceleratedOptimizer is itself a torch Optimizer subclass: look inside first)
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def scaler_scale(scaler) -> torch.Tensor:
    """A ``GradScaler``'s current loss scale as a tensor: ``_scale``, on its device (``get_scale()``
    would wait for the device), or the initial scale before its first ``scale()``."""
    scale = getattr(scaler, "_scale", None)
    return scale if torch.is_tensor(scale) else torch.tensor(float(scaler.get_scale()))


def optimizer_gain(optimizer) -> float | None:
    """``clipping.sgd_gain`` of a ``torch.optim.SGD`` (the largest over its parameter groups: the ceiling
    then holds for every group); None for every other optimizer: Adam-like ones normalise the
    gradient (their step is the learning rate whatever the norm), and for an unknown one the relation
    is not known."""
    opt = unwrap(optimizer)
    if not isinstance(opt, torch.optim.SGD):
        return None
    gains = [clipping.sgd_gain(float(g["lr"]), float(g.get("momentum") or 0.0), float(g.get("dampening") or 0.0))
             for g in opt.param_groups if g["params"]]
    return None if not gains or any(g is None for g in gains) else max(gains)


def weight_norm(params: list[torch.Tensor], sharding: Sharding, device: torch.device) -> float:
    """Global L2 norm of the watched weights (whole model under FSDP2: local shards summed over the
    shard group). One pass over the weights: run once, when the state is built."""
    with torch.no_grad():
        norms = [real_view(local(p.detach())).norm(dtype=torch.float32).to(device) for p in params]
        if not norms:
            return 0.0
        sq = sharding.share(torch.stack(norms).square(), torch.arange(len(norms), device=device))
        return float(sharding.reduce(sq.sum().reshape(1))[0].sqrt())
