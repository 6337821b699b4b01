"""FSDP2 (``fully_shard``): parameters are DTensors and each rank holds a shard. Statistics are
computed on the local shards and summed (or maxed) over the shard groups, one small collective per
step; parameters that are replicated count 1/world each, so once in the sum."""

from __future__ import annotations

import math

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t if type(t) is torch.Tensor or not hasattr(t, "to_local") else t.to_local()


def is_sharded(p: torch.Tensor) -> bool:
    return hasattr(p, "placements") and any(pl.is_shard() for pl in p.placements)


class Sharding:
    def __init__(self, params: list[torch.Tensor], device: torch.device):
        self.groups: list = []
        self.param_share: torch.Tensor | None = None
        sharded = [is_sharded(p) for p in params]
        if not any(sharded):
            return
        first = params[sharded.index(True)]
        dims = [i for i, pl in enumerate(first.placements) if pl.is_shard()]
        self.groups = [first.device_mesh.get_group(i) for i in dims]
        world = math.prod(first.device_mesh.size(i) for i in dims)
        self.param_share = torch.tensor([1.0 if s else 1.0 / world for s in sharded], device=device)

    @property
    def active(self) -> bool:
        """Units are split across ranks when sharded: dead units are then judged by whole layers."""
        return bool(self.groups)

    def reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.groups:
            d = torch.distributed
            for group in self.groups:
                d.all_reduce(values, op=d.ReduceOp.SUM if op == "sum" else d.ReduceOp.MAX, group=group)
        return values

    def share(self, per_param: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Weights per-parameter sums (parameters at ``positions``) so replicated parameters count
        once after the shard-group sum."""
        return per_param if self.param_share is None else per_param * self.param_share[positions]
