"""Log-step measurements on the device -> ``gradguard.pipeline.LayerSums`` (the core assembles the
``Snapshot``): max-abs (exact) and zero counts (sampled) for the logged layers, weight norms and the
update the optimizer applied (from one weight sample: exact for tensors under
``2 * pipeline.UPDATE_SAMPLE`` elements, estimated above), dead units (the core's
``DEAD_UNIT_RULE``, exact), histograms.

What can be fixed once per layout (which parameters are logged, the update sample's views and
segments) is kept in ``Extras``, rebuilt when the parameters, their storage or the set of gradients
changes; a log step then runs a few batched ops, not a few ops per parameter. On a CPU device the
dead-unit rows are read in numpy (a host read is free there)."""

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
    if values.device.type == "cpu" and not built.sharding.active:  # numpy: a few small ops, not a few torch ones
        layer = built.idx_t.numpy() if pick is None else built.idx_t.numpy()[pick]
        v = values.detach().numpy().astype(np.float64)
        if reduce == "sum":
            return np.bincount(layer, weights=v, minlength=built.n_layers)
        out = np.zeros(built.n_layers)  # (values are >= 0: max-abs)
        np.maximum.at(out, layer, v)
        return out
    if pick is not None:
        index, positions = index[pick], positions[pick]
    out = torch.zeros(built.n_layers, device=built.device, dtype=torch.float32)
    if reduce == "sum":
        out.index_add_(0, index, built.sharding.share(values, positions))
    else:
        out.scatter_reduce_(0, index, values, "amax")
    return built.sharding.reduce(out, reduce).cpu().numpy().astype(np.float64)


ZERO_SAMPLE, ZERO_CHUNK = 1 << 16, 1 << 12
"""Elements per gradient tensor read for its zero count: ``ZERO_SAMPLE // ZERO_CHUNK`` contiguous
chunks of ``ZERO_CHUNK`` elements spread evenly over the tensor (exact for smaller tensors). A
fraction, so 65k elements estimate it to ~0.2%; contiguous chunks keep the count vectorised (a
strided element-by-element sample is ~10x slower per element on a CPU), and 16 chunks of 16 KB cost
a third less than 64 of 4 KB on a CPU, where each chunk starts with a cache miss."""

UPDATE_CHUNKS = 256
"""The weight sample of a parameter of at least twice ``pipeline.UPDATE_SAMPLE`` elements (for its
weight norm and its update's; smaller ones are read whole, exactly): that many elements as
``UPDATE_CHUNKS`` contiguous chunks (16 float32 elements: one cache line) spread evenly over it. A
sample strided element by element touches every cache line of a tensor whose stride is under 16:
on a CPU it read the whole of the weights, twice per log step."""


def _chunks(flat: torch.Tensor, count: int, chunks: int) -> torch.Tensor:
    """``count`` elements of a 1-D tensor as a ``(chunks, count // chunks)`` view: contiguous chunks
    spread evenly (the whole tensor, 1-D, when it has at most ``count``)."""
    n = flat.numel()
    if n <= count:
        return flat
    step = n // chunks
    return flat[:step * chunks].view(chunks, step)[:, :count // chunks]


def _drifting_chunks(flat: torch.Tensor, count: int, chunks: int) -> torch.Tensor:
    """Like ``_chunks``, the whole of a tensor under ``2 * count`` elements, and an odd distance
    between chunks: a weight's rows are an even number of elements wide, so successive chunks start
    at every column in turn instead of the same few (a sample aligned with the columns misses
    whole dead or frozen input features)."""
    n = flat.numel()
    if n < 2 * count:
        return flat
    step = n // chunks - (1 - (n // chunks) % 2)
    return flat[:step * chunks].view(chunks, step)[:, :count // chunks]


def _max_abs(grads: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor max |g|, exact. On a CPU ``aminmax`` is one vectorised pass (the inf-norm
    reduction is not, ~10x slower; numpy's max and min are two passes over memory the norm pass
    has already pushed out of the caches); an accelerator's ``_foreach_norm(inf)`` is one fused
    kernel."""
    if grads and grads[0].device.type == "cpu":
        lo, hi = zip(*[torch.aminmax(g) if g.numel() else (torch.zeros(()),) * 2 for g in grads])
        # (+0.0 turns an all-zero tensor's -0.0 into 0.0)
        return torch.maximum(torch.stack(hi), -torch.stack(lo)).float() + 0.0
    return torch.stack(torch._foreach_norm(grads, float("inf"), dtype=torch.float32))


def _zero_count(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per tensor, the number of exactly-zero elements, from evenly spread chunks (``ZERO_SAMPLE``)."""
    counts, sampled, numel = [], [], []
    for g in grads:
        f = g.reshape(-1)
        x = _chunks(f, ZERO_SAMPLE, ZERO_SAMPLE // ZERO_CHUNK)
        counts.append(torch.count_nonzero(x))
        sampled.append(float(x.numel()))
        numel.append(float(f.numel()))
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


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _dead_units_numpy(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> np.ndarray | None:
    """``DEAD_UNIT_RULE`` read in numpy (a CPU tensor: no copy); None where numpy cannot view it."""
    if weight_grad.dtype not in _NUMPY_DTYPES or (bias_grad is not None and bias_grad.dtype not in _NUMPY_DTYPES):
        return None
    if bias_grad is None:
        return ~weight_grad.detach().flatten(1).numpy().any(axis=1)
    bias = bias_grad.detach().numpy()
    dead = np.zeros(weight_grad.shape[0], dtype=bool)
    if bias.all():  # every unit's bias gradient is non-zero: all alive, no row to read (the common case)
        return dead
    suspect = np.flatnonzero(bias == 0)
    dead[suspect] = ~weight_grad.detach().flatten(1).numpy()[suspect].any(axis=1)
    return dead


def _dead(built) -> list:
    dead = [None] * built.n_layers
    if built.sharding.active:  # units are split across ranks when sharded
        return dead
    owners, row_max = [], []
    for i, (weight, bias) in built.layout.unit_param.items():
        g = weight.grad
        if g is None:
            continue
        b = None if bias is None else bias.grad
        if g.device.type == "cpu" and type(g) is torch.Tensor and (b is None or type(b) is torch.Tensor):
            dead[i] = _dead_units_numpy(g, b)
            if dead[i] is not None:
                continue
        owners.append(i)
        row_max.append(unit_row_max(g.detach(), b))
    if owners:  # one copy to the host for every layer
        flat = torch.cat([r.to(built.device) for r in row_max]).cpu().numpy()
        bounds = np.cumsum([0] + [r.numel() for r in row_max])
        for i, a, z in zip(owners, bounds[:-1], bounds[1:]):
            dead[i] = pipeline.dead_units(flat[a:z])
    return dead


class Extras:
    """What the log-step extras read, fixed while the layout, the parameters' storage and the set
    of gradients stay: the logged parameters and the weight sample's views and segments (the
    sample gives the weight norms and, compared after the optimizer step, the update's)."""

    def __init__(self, built):
        params = built.layout.params
        self.key = _storage_key(params)
        logged = set(built.pipeline.logged.tolist())
        owner = built.idx_t.tolist()
        self.pick = [j for j, layer in enumerate(owner) if layer in logged]
        self.measured = np.isin(np.arange(built.n_layers), list(logged))
        plain = not built.sharding.active and all(type(p) is torch.Tensor or type(p) is torch.nn.Parameter
                                                  for p in params)
        with torch.no_grad():
            flats = [real_view(local(p.detach())).reshape(-1) for p in params]
        # the update sample: large parameters as (UPDATE_CHUNKS, k) views, small ones whole
        count = pipeline.UPDATE_SAMPLE
        self.large = [j for j, f in enumerate(flats) if f.numel() >= 2 * count]
        self.small = [j for j, f in enumerate(flats) if f.numel() < 2 * count]
        self.large_views = [_drifting_chunks(flats[j], count, UPDATE_CHUNKS) for j in self.large]
        self.small_views = [flats[j] for j in self.small]
        self.large_size = sum(v.numel() for v in self.large_views)
        self.one_device = all(f.device == built.device for f in flats)
        self.stable = plain  # views of DTensor shards are taken afresh each time
        dev = built.device
        sizes = [f.numel() for f in self.small_views]
        self.device, self.small_size = dev, sum(sizes)
        # The small parameters' segment sums: on a CPU by ``segment_reduce``, the same sums as
        # ``index_add_`` bit for bit, which costs ~3 ns an element there (14 ms against 5 ms for 2000
        # tensors of 2025 elements; numpy's reduceat, ~1 ms, sums in another order: the last bits
        # move, and the chaotic bad-init run of the demo with them); elsewhere by ``index_add_`` over
        # an owner index (one entry per element, so it is made only there).
        if dev.type == "cpu":
            self.small_lengths = torch.tensor(sizes, dtype=torch.long)
        else:
            self.small_owner = torch.repeat_interleave(torch.arange(len(sizes), device=dev),
                                                       torch.tensor(sizes, device=dev, dtype=torch.long))
        n_sampled = [count if f.numel() >= 2 * count else f.numel() for f in flats]
        factor = [pipeline.update_sq_from_sample(1.0, f.numel(), c) for f, c in zip(flats, n_sampled)]
        order = self.large + self.small
        self.factor = torch.tensor([factor[j] for j in order], device=dev)
        self.layer_of = torch.tensor([built.layout.param_layer[j] for j in order], device=dev, dtype=torch.long)
        self.positions = torch.tensor(order, device=dev, dtype=torch.long)
        self.per_large = (count // UPDATE_CHUNKS) * UPDATE_CHUNKS
        self.same_dtype = all(f.dtype == torch.float32 for f in flats)
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, size: int) -> torch.Tensor:
        """A float32 vector kept here and reused (a fresh multi-megabyte allocation each log step
        costs its page faults on a CPU)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() != size:
            buf = self._buffers[name] = torch.empty(size, device=self.device)
        return buf

    def sample(self, into: str) -> torch.Tensor:
        """The update sample now, into the buffer ``into``: one float32 vector, large parameters'
        chunks first."""
        dev = self.device
        buf = self.buffer(into, self.large_size + self.small_size)
        large = [v.to(dev) for v in self.large_views] if not self.one_device else self.large_views
        small = [v.to(dev) for v in self.small_views] if not self.one_device else self.small_views
        if self.same_dtype:  # straight into the buffer
            if large:
                torch.cat(large, out=buf[:self.large_size].view(-1, large[0].shape[1]))
            if small:
                torch.cat(small, out=buf[self.large_size:])
        else:
            if large:
                buf[:self.large_size].copy_(torch.cat([v.float() for v in large]).reshape(-1))
            if small:
                buf[self.large_size:].copy_(torch.cat([v.float() for v in small]))
        return buf

    def lines_up_with(self, other: "Extras") -> bool:
        """Whether a sample taken by ``other`` matches this one's element for element: the same
        object, or (views taken afresh each time: sharded parameters) the same parameters, storage
        and sample layout."""
        return other is self or (other.key == self.key and other.large == self.large and other.small == self.small
                                 and other.large_size == self.large_size and other.small_size == self.small_size)

    def per_param_sq(self, diff_sq: torch.Tensor) -> torch.Tensor:
        """Segment sums of a sample-shaped vector, in ``large + small`` order."""
        out = []
        if self.large_views:
            out.append(diff_sq[:self.large_size].view(len(self.large_views), self.per_large).sum(dim=1))
        if self.small_views:
            small = diff_sq[self.large_size:]
            if self.device.type == "cpu":
                out.append(torch.segment_reduce(small, "sum", lengths=self.small_lengths))
            else:
                out.append(torch.zeros(len(self.small_views), device=diff_sq.device)
                           .index_add_(0, self.small_owner, small))
        return torch.cat(out) if len(out) > 1 else out[0]

    def layer_sums(self, built, per_param: torch.Tensor) -> np.ndarray:
        """Per-parameter values in ``large + small`` order summed per layer, over every shard."""
        sq = built.sharding.share(per_param.to(built.device), self.positions)
        out = torch.zeros(built.n_layers, device=built.device).index_add_(0, self.layer_of, sq)
        return built.sharding.reduce(out).cpu().numpy().astype(np.float64)


def _storage_key(params) -> tuple:
    """Changes when a parameter's storage is replaced (``p.data = ...``, ``model.to(...)``)."""
    try:
        return tuple([p.data_ptr() for p in params])
    except Exception:  # a tensor subclass without storage
        return ()


def extras(built) -> Extras:
    """The cached ``Extras`` of ``built`` (rebuilt when something it holds went stale)."""
    e = built.extras
    if e is None or not e.stable or e.key != _storage_key(built.layout.params) or not e.key:
        e = built.extras = Extras(built)
    return e


def measure(built, grads: list[torch.Tensor], layer_sq: torch.Tensor, histograms: bool,
            unscale: float = 1.0) -> tuple[pipeline.LayerSums, torch.Tensor | None]:
    """``layer_sq`` is already unscaled; ``unscale`` undoes a loss scale still on ``grads``. Returns
    the sums and the weight sample taken for them (the "before" of ``UpdateSample``), or None."""
    has = built.has_t.cpu().numpy() > 0
    norm_sq = layer_sq.cpu().numpy().astype(np.float64)
    with torch.no_grad():
        dense = [local(g) for g in grads if not g.is_sparse] if not built.plain_grads else grads
        if len(dense) != len(grads):  # sparse gradients: norms only
            return pipeline.LayerSums(has_grad=has, norm_sq=norm_sq), None
        ex = extras(built)
        # max-abs and zero counts only feed the logged keys: take them for the logged layers only
        sub = [dense[j].abs() if dense[j].is_complex() else dense[j] for j in ex.pick]
        max_abs = per_layer(built, _max_abs(sub), "amax", ex.pick) * unscale
        zeros = per_layer(built, _zero_count(sub, built.device), "sum", ex.pick)
        # weight norms from the update sample (exact below 2 * UPDATE_SAMPLE elements, estimated
        # above); the same sample is the "before" of the update measured after the optimizer step
        before = ex.sample(into="before")
        squares = torch.mul(before, before, out=ex.buffer("squares", before.numel()))
        weight_sq = ex.layer_sums(built, ex.per_param_sq(squares) * ex.factor)
        dead = _dead(built)
        hist = None
        if histograms:
            hist = {}
            owner = built.idx_t.tolist()
            for i in built.pipeline.logged:
                gs = [real_view(g.detach()).float().flatten() for g, l in zip(dense, owner) if l == i]
                if gs:
                    hist[int(i)] = pipeline.histogram(torch.cat(gs).cpu().numpy() * unscale)
        nan = np.full(built.n_layers, np.nan)
        return pipeline.LayerSums(has_grad=has, norm_sq=norm_sq, max_abs=np.where(ex.measured, max_abs, nan),
                                  zeros=np.where(ex.measured, zeros, nan), weight_sq=weight_sq, dead=dead,
                                  histograms=hist), before


class UpdateSample:
    """A sample of each parameter taken before the optimizer runs on a log step (``UPDATE_CHUNKS``
    evenly spread chunks of ``pipeline.UPDATE_SAMPLE`` elements, the whole of smaller ones), so
    the update it applies can be measured without a full copy of the weights; scaled up by the
    core's ``update_sq_from_sample``. Batched: one concatenated sample, one subtract/square and
    one segment sum for all parameters. ``before``: that sample, when ``measure`` took it this step
    (for the weight norms), taken here otherwise."""

    def __init__(self, built, before: torch.Tensor | None = None):
        self._built = built
        with torch.no_grad():
            self._extras = extras(built)
            self._before = self._extras.sample(into="before") if before is None else before

    def applied_sq(self) -> np.ndarray:
        """Per layer, the squared norm of the update the optimizer applied since the sample."""
        b = self._built
        with torch.no_grad():
            ex = extras(b)
            if not ex.lines_up_with(self._extras):  # the storage moved during the step: nothing comparable
                return np.full(b.n_layers, np.nan)
            diff_sq = ex.sample(into="after").sub_(self._before).square_()
            return ex.layer_sums(b, ex.per_param_sq(diff_sq) * ex.factor)
