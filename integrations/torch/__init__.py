"""gradguard for plain PyTorch loops.

    guard = GradGuard(model, clip="auto")
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        guard.step(optimizer)          # measure, detect, clip, skip a non-finite step, optimizer.step()
    print(guard.findings)

or, without touching the loop: ``guard.attach(optimizer)``.

Modules, one responsibility each: ``_layout`` (which layers, in forward order), ``_probes``
(saturation and through-time measurements on the forward pass), ``_sharding`` (FSDP2),
``_normstats`` (BatchNorm statistics of a skipped step), ``_snapshots`` (log-step measurements),
``_engine`` (the per-step machinery, ``TorchEngine``), ``_guard`` (``GradGuard``). The host-side
pipeline they feed is the core's ``gradguard.pipeline``.
"""

from gradguard.torch._engine import TorchEngine
from gradguard.torch._guard import GradGuard
from gradguard.torch._layout import ROOT_NAME, describe_model
from gradguard.torch._ops import torch_ops

__all__ = ["GradGuard", "TorchEngine", "torch_ops", "describe_model", "ROOT_NAME"]
