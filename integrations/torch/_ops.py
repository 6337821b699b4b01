"""``torch_ops``: the array namespace (``gradguard.ops``) on torch tensors, for the core's device step."""

from __future__ import annotations

import types

import torch


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


def real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real view (``[..., 2]``): its L2 norm is the complex tensor's."""
    return torch.view_as_real(t) if t.is_complex() else t
