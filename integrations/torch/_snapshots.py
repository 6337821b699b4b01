"""Log-step measurements on the device -> ``gradguard.pipeline.LayerSums`` (the core assembles the
``Snapshot``): max-abs and zero counts for the logged layers, weight norms, dead units (the core's
``DEAD_UNIT_RULE``), histograms, and the update the optimizer applied (the core's sampling rule)."""

from __future__ import annotations

import numpy as np
import torch

from gradguard import pipeline
from gradguard.torch._ops import real_view
from gradguard.torch._sharding import local


def per_layer(built, values: torch.Tensor, reduce: str = "sum", pick: list[int] | None = None) -> np.ndarray:
    """Per-parameter values of the parameters with a gradient (or of ``pick``, positions in that
    list), summed or maxed per layer, over every shard."""
    index, positions = built.idx_t, built.present_idx_t
    if pick is not None:
        index, positions = index[pick], positions[pick]
    out = torch.zeros(built.n_layers, device=built.device, dtype=torch.float32)
    if reduce == "sum":
        out.index_add_(0, index, built.sharding.share(values, positions))
    else:
        out.scatter_reduce_(0, index, values, "amax")
    return built.sharding.reduce(out, reduce).cpu().numpy().astype(np.float64)


ZERO_SAMPLE, ZERO_CHUNK = 1 << 16, 1 << 10
"""Elements per gradient tensor read for its zero count: ``ZERO_SAMPLE // ZERO_CHUNK`` contiguous
chunks of ``ZERO_CHUNK`` elements spread evenly over the tensor (exact for smaller tensors). A
fraction, so 65k elements estimate it to ~0.2%; contiguous chunks keep the count vectorised (a
strided element-by-element sample is ~10x slower per element on a CPU)."""


def _max_abs(grads: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor max |g|, exact. On a CPU ``aminmax`` is one vectorised pass (the inf-norm
    reduction is not, ~10x slower); an accelerator's ``_foreach_norm(inf)`` is one fused kernel."""
    if grads and grads[0].device.type == "cpu":
        return torch.stack([_cpu_max_abs(g) for g in grads])
    return torch.stack(torch._foreach_norm(grads, float("inf"), dtype=torch.float32))


def _cpu_max_abs(g: torch.Tensor) -> torch.Tensor:
    if not g.numel():
        return torch.zeros((), device=g.device)
    lo, hi = torch.aminmax(g)
    return torch.maximum(hi, -lo).float() + 0.0  # (+0.0 turns an all-zero tensor's -0.0 into 0.0)


def _zero_count(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per tensor, the number of exactly-zero elements, from evenly spread chunks (``ZERO_SAMPLE``)."""
    chunks = ZERO_SAMPLE // ZERO_CHUNK
    counts, sampled, numel = [], [], []
    for g in grads:
        f = g.reshape(-1)
        n = f.numel()
        x = f if n <= ZERO_SAMPLE else f[:(n // chunks) * chunks].view(chunks, n // chunks)[:, :ZERO_CHUNK]
        counts.append(torch.count_nonzero(x))
        sampled.append(float(x.numel()))
        numel.append(float(n))
    nonzero = torch.stack(counts).float()
    sampled_t = torch.tensor(sampled, device=device)
    return (sampled_t - nonzero) / sampled_t.clamp(min=1.0) * torch.tensor(numel, device=device)


def dead_units(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> np.ndarray:
    """``pipeline.DEAD_UNIT_RULE`` for one layer (see ``unit_row_max``)."""
    return pipeline.dead_units(unit_row_max(weight_grad, bias_grad).cpu().numpy())


def unit_row_max(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """Per unit, max |g| over its weight row, on the device: the rule's input. A non-zero bias
    gradient already proves a unit alive (1.0 here), so only the other rows are read."""
    rows = weight_grad.flatten(1)
    suspect = torch.arange(rows.shape[0], device=rows.device)
    if bias_grad is not None:
        suspect = torch.nonzero(bias_grad.detach() == 0).flatten()
    row_max = torch.ones(rows.shape[0], device=rows.device)
    if suspect.numel():
        row_max[suspect] = rows[suspect].abs().amax(dim=1).float()
    return row_max


def measure(built, grads: list[torch.Tensor], layer_sq: torch.Tensor, histograms: bool,
            unscale: float = 1.0) -> pipeline.LayerSums:
    """``layer_sq`` is already unscaled; ``unscale`` undoes a loss scale still on ``grads``."""
    has = built.has_t.cpu().numpy() > 0
    norm_sq = layer_sq.cpu().numpy().astype(np.float64)
    with torch.no_grad():
        dense = [local(g) for g in grads if not g.is_sparse]
        if len(dense) != len(grads):  # sparse gradients: norms only
            return pipeline.LayerSums(has_grad=has, norm_sq=norm_sq)
        L = built.n_layers
        # max-abs and zero counts only feed the logged keys: take them for the logged layers only
        logged = set(built.pipeline.logged.tolist())
        owner = built.idx_t.tolist()
        pick = [j for j, layer in enumerate(owner) if layer in logged]
        sub = [dense[j].abs() if dense[j].is_complex() else dense[j] for j in pick]
        max_abs = per_layer(built, _max_abs(sub), "amax", pick) * unscale
        zeros = per_layer(built, _zero_count(sub, built.device), "sum", pick)
        measured = np.isin(np.arange(L), list(logged))
        present = [p for p, ok in zip(built.layout.params, built.present) if ok]
        w_sq = torch.stack(torch._foreach_norm([real_view(local(p.detach())) for p in present], 2,
                                               dtype=torch.float32)).square()
        weight_sq = per_layer(built, w_sq)
        dead = [None] * L
        if not built.sharding.active:  # units are split across ranks when sharded
            owners, row_max = [], []
            for i, (weight, bias) in built.layout.unit_param.items():
                if weight.grad is not None:
                    owners.append(i)
                    row_max.append(unit_row_max(weight.grad.detach(), None if bias is None else bias.grad))
            if owners:  # one copy to the host for every layer
                flat = torch.cat([r.to(built.device) for r in row_max]).cpu().numpy()
                bounds = np.cumsum([0] + [r.numel() for r in row_max])
                for i, a, z in zip(owners, bounds[:-1], bounds[1:]):
                    dead[i] = pipeline.dead_units(flat[a:z])
        hist = None
        if histograms:
            hist = {}
            for i in built.pipeline.logged:
                gs = [real_view(g.detach()).float().flatten() for g, l in zip(dense, owner) if l == i]
                if gs:
                    hist[int(i)] = pipeline.histogram(torch.cat(gs).cpu().numpy() * unscale)
        nan = np.full(L, np.nan)
        return pipeline.LayerSums(has_grad=has, norm_sq=norm_sq, max_abs=np.where(measured, max_abs, nan),
                                  zeros=np.where(measured, zeros, nan), weight_sq=weight_sq, dead=dead,
                                  histograms=hist)


class UpdateSample:
    """A sample of each parameter taken before the optimizer runs on a log step (the core's
    ``sample_plan``), so the update it applies can be measured without a full copy of the weights.
    Batched: one concatenated sample, one subtract/square and one segment sum for all parameters
    (a few ops per parameter in all, not a few per parameter each)."""

    def __init__(self, built):
        self._built = built
        params = built.layout.params
        with torch.no_grad():
            flats = [real_view(local(p.detach())).reshape(-1) for p in params]
            self._plan = pipeline.sample_plan([f.numel() for f in flats])
            self._before = self._take(flats)
            dev = self._before.device
            counts = torch.tensor([count for _, count in self._plan], device=dev)
            self._owner = torch.repeat_interleave(torch.arange(len(params), device=dev), counts)
            # the core's estimate, per parameter: sample_sq * numel / count
            self._factor = torch.tensor([pipeline.update_sq_from_sample(1.0, f.numel(), count)
                                         for f, (_, count) in zip(flats, self._plan)], device=dev)

    def _take(self, flats) -> torch.Tensor:
        dev = self._built.device  # (a model spread over devices: the samples meet on the layout's)
        return torch.cat([f[::stride].float().to(dev) for f, (stride, _) in zip(flats, self._plan)])

    def applied_sq(self) -> np.ndarray:
        """Per layer, the squared norm of the update the optimizer applied since the sample."""
        b = self._built
        with torch.no_grad():
            after = self._take([real_view(local(p.detach())).reshape(-1) for p in b.layout.params])
            diff_sq = (after - self._before).square()
            per_param = torch.zeros(len(self._factor), device=diff_sq.device).index_add_(0, self._owner, diff_sq)
            sq = (per_param * self._factor).to(b.device)
            every = torch.arange(len(b.layout.params), device=b.device)
            out = torch.zeros(b.n_layers, device=b.device).index_add_(0, b.param_layer_t, b.sharding.share(sq, every))
            b.sharding.reduce(out)
        return out.cpu().numpy().astype(np.float64)
