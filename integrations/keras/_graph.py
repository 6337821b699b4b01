"""The in-graph half of the Keras callback: a hook on the optimizer's ``apply``.

Every Keras backend passes the gradients of a training step through ``optimizer.apply``:
TensorFlow via ``apply_gradients``, JAX via ``stateless_apply`` (which calls ``apply`` inside a
``StatelessScope``), torch directly. The hook replaces ``apply`` on the optimizer *instance* for
the duration of ``fit``; it runs inside the compiled step (``tf.function``, ``jax.jit``, XLA) and

1. measures the per-layer squared gradient norms (one read of the gradients; the all-reduced
   gradients under ``tf.distribute``; the accumulated ones under ``gradient_accumulation_steps``),
2. runs the core's ``stats.device_step`` (window accumulators, spike tracker, clipping policy)
   on state held in optimizer-tracked Variables, so JAX threads it through its jitted step,
3. scales the gradients by the policy's factor (threshold held in a Variable: switching
   clipping on mid-run needs no retrace),
4. applies the update only when every gradient is finite, in-graph (as ``LossScaleOptimizer``
   does), so a skipped step leaves weights, optimizer slots and the iteration counter alone,
5. keeps the log-step extras of a ``Snapshot`` in a Variable, written on log steps only.

This module holds what every backend shares; how a step runs (the conditional, the cost
trade-offs measured on each) is in ``_backend_tf.py``, ``_backend_jax.py`` and
``_backend_torch.py``, one subclass each, picked once by ``make_hook``. Every access to Keras
internals goes through ``_compat.py``.

Nothing here talks to the host, except on torch (eager) the one read of the non-finite gate when
``skip_nonfinite=True``: the callback reads the Variables on log steps.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from gradguard import pipeline, stats
from gradguard.clipping import ClipPolicy
from gradguard.pipeline import HIST_BINS
from gradguard.keras import _compat as compat

F32 = "float32"


def backend_name() -> str:
    return keras.backend.backend()


# ---------------------------------------------------------------------------------- array ops

def _maximum(a, b):
    return ops.maximum(a, ops.cast(b, F32) if isinstance(b, (int, float)) else b)


def _minimum(a, b):
    return ops.minimum(a, ops.cast(b, F32) if isinstance(b, (int, float)) else b)


def _where(c, a, b):
    return ops.cast(ops.where(c, a, b), F32)


keras_ops = types.SimpleNamespace(
    where=_where, sqrt=ops.sqrt, log=ops.log, exp=ops.exp, maximum=_maximum, minimum=_minimum,
    isfinite=ops.isfinite, sum=ops.sum, asfloat=lambda x: ops.cast(x, F32),
    concat=lambda xs: ops.concatenate(xs, axis=0), stack=lambda xs: ops.stack(xs, axis=0),
    asint=lambda x: ops.cast(x, "int32"), sort=ops.sort, take=lambda x, i: ops.take(x, ops.cast(i, "int32")),
)
"""The ``xp`` namespace of ``gradguard.ops`` on ``keras.ops``; works inside tf.function and jax.jit."""


# ---------------------------------------------------------------------------------- log-step extras

class ExtrasLayout:
    """What the log-step conditional writes: [step, finite, norm_sq(L), max_abs(L), zeros(L),
    weight_sq(L), update_sq(L), dead units (sum of units), histogram counts and ranges]."""

    def __init__(self, n_layers: int, unit_sizes: dict[int, int], hist_layers: Sequence[int]):
        self.n_layers = n_layers
        self.unit_sizes = dict(unit_sizes)
        self.hist_layers = list(hist_layers)
        self.size = 2 + 5 * n_layers + sum(self.unit_sizes.values()) + len(self.hist_layers) * (HIST_BINS + 2)

    def parse(self, vec: np.ndarray) -> dict[str, Any]:
        L = self.n_layers
        vec = np.asarray(vec, dtype=np.float64)
        out = {"step": int(round(vec[0])), "finite": bool(vec[1] > 0)}
        o = 2
        for name in ("norm_sq", "max_abs", "zeros", "weight_sq", "update_sq"):
            out[name] = vec[o:o + L]
            o += L
        dead = [None] * L
        for i, n in self.unit_sizes.items():
            dead[i] = vec[o:o + n] > 0.5
            o += n
        out["dead"] = dead
        hist = {}
        for i in self.hist_layers:
            counts = vec[o:o + HIST_BINS]
            lo, hi = vec[o + HIST_BINS], vec[o + HIST_BINS + 1]
            o += HIST_BINS + 2
            h = pipeline.histogram_from_counts(counts, lo, hi)
            if h is not None:
                hist[i] = h
        out["hist"] = hist
        return out


# ---------------------------------------------------------------------------------- the hook

def make_hook(optimizer, configure) -> "ApplyHook":
    """The hook for the active Keras backend (the one place the backend is chosen)."""
    backend = backend_name()
    if backend == "tensorflow":
        from gradguard.keras._backend_tf import TFApplyHook as cls
    elif backend == "jax":
        from gradguard.keras._backend_jax import JaxApplyHook as cls
    elif backend == "torch":
        from gradguard.keras._backend_torch import TorchApplyHook as cls
    else:
        raise ValueError(f"gradguard.keras supports the tensorflow, jax and torch backends, not {backend!r}")
    return cls(optimizer, configure)


class ApplyHook:
    """Replaces ``optimizer.apply`` on the instance; see the module docstring. Subclasses supply
    ``_step`` (how one step runs on that backend) and override the few array primitives that
    are cheaper done natively there."""

    xp = keras_ops  # the array namespace the core's device step runs on
    samples_weights = True  # keep a sample of the weights in a Variable (compiled backends)

    def __init__(self, optimizer, configure):
        self.optimizer = optimizer
        self._configure = configure  # called once the model's variables exist (see ``configure``)
        self.configured = False
        self.variables: list = []
        self.state_var = self.step_var = self.extras_var = self.samples_var = None
        self._init_state: np.ndarray | None = None
        self._init_step = 0
        self._orig: dict[str, Any] = {}
        self.accumulation = compat.accumulation_steps(optimizer)
        self.traces = 0  # how many times the step was traced (eager backends: called)
        self.step_finite = None  # this step's finite flag (tensor) while a step is traced/run

    def configure(self, *, layout: pipeline.StateLayout, layers, layer_of_var: dict[int, int],
                  unit_kernel: dict[int, int], policy: ClipPolicy,
                  tracker: stats.TrackerConfig, skip_nonfinite: bool, apply_clip: bool, snapshot_every: int,
                  hist_layers: Sequence[int], measure_updates: bool) -> None:
        self.layers = list(layers)
        self.n_layers = len(self.layers)
        self.layer_of_var = dict(layer_of_var)
        self.unit_kernel = dict(unit_kernel)
        self.policy = policy
        self.tracker = tracker
        self.skip_nonfinite = skip_nonfinite
        self.apply_clip = apply_clip
        self.snapshot_every = int(snapshot_every)
        self.measure_updates = measure_updates
        self.layout = layout  # the core's packing of the state into one vector
        self.unit_sizes = {i: int(self.layers[i].units) for i in self.unit_kernel}
        self.extras_layout = ExtrasLayout(self.n_layers, self.unit_sizes, hist_layers)
        self.configured = True

    # ------------------------------------------------------------ variables

    def set_initial(self, state: dict[str, np.ndarray], step: int) -> None:
        """Values the Variables get when created, or now if they exist."""
        self._init_state = self.layout.pack_np(state)
        self._init_step = int(step)
        if self.state_var is not None:
            self.state_var.assign(self._init_state)
            self.step_var.assign(self._init_step)

    def creation_scope(self):
        """Where the Variables are created (TF: the model's strategy, outside the trace)."""
        return contextlib.nullcontext()

    def ensure_variables(self) -> None:
        if self.state_var is not None:
            return
        opt = self.optimizer
        init = self._init_state if self._init_state is not None else self.layout.pack_np(
            stats.init_state(self.n_layers, self.policy))

        def const(value, dtype):
            def initializer(shape, dtype=dtype):
                return ops.cast(ops.convert_to_tensor(np.asarray(value).reshape(shape)), dtype)
            return initializer

        with self.creation_scope():
            # aggregation "none": under tf.distribute each replica writes its own copy, and every
            # replica computes the same values from the all-reduced gradients.
            self.state_var = opt.add_variable((self.layout.size,), initializer=const(init, F32), dtype=F32,
                                              aggregation="none", name="gradguard_state")
            self.step_var = opt.add_variable((), initializer=const(self._init_step, "int32"), dtype="int32",
                                             aggregation="none", name="gradguard_step")
            self.extras_var = opt.add_variable((self.extras_layout.size,),
                                               initializer=const(np.full(self.extras_layout.size, -1.0), F32),
                                               dtype=F32, aggregation="none", name="gradguard_extras")
            self.variables = [self.state_var, self.step_var, self.extras_var]
            if self.samples_weights:
                # Samples of the weights after the last step (see _compiled_extras), starting
                # from the weights as they are now.
                tvars = compat.optimizer_trainable_variables(opt)
                plan = self._sample_plan(tvars)
                first = np.concatenate([np.asarray(tvars[i].numpy(), np.float32).reshape(-1)[:n]
                                        for i, _, n in plan]) if plan else np.zeros(0, np.float32)
                self.samples_var = opt.add_variable(first.shape, initializer=const(first, F32), dtype=F32,
                                                    aggregation="none", name="gradguard_samples")
                self.variables.append(self.samples_var)

    def remove_variables(self) -> None:
        for v in self.variables:
            compat.untrack_optimizer_variable(self.optimizer, v)
        self.variables = []
        self.state_var = self.step_var = self.extras_var = self.samples_var = None

    # ------------------------------------------------------------ install

    def install(self) -> None:
        opt = self.optimizer
        if getattr(opt, "_gradguard_hook", None) is not None:
            opt._gradguard_hook.uninstall()  # a previous fit that raised left its hook behind
        self._orig = {name: opt.__dict__.get(name) for name in ("apply", "save_own_variables", "load_own_variables")}
        self._apply = opt.apply  # bound original (or whatever was installed before us)
        self._save = opt.save_own_variables
        self._load = opt.load_own_variables
        object.__setattr__(opt, "apply", self)
        object.__setattr__(opt, "save_own_variables", self._save_without_ours)
        object.__setattr__(opt, "load_own_variables", self._load_without_ours)
        object.__setattr__(opt, "_gradguard_hook", self)

    def uninstall(self) -> None:
        opt = self.optimizer
        for name, value in self._orig.items():
            if value is None:
                opt.__dict__.pop(name, None)
            else:
                object.__setattr__(opt, name, value)
        opt.__dict__.pop("_gradguard_hook", None)
        self._orig = {}

    def _save_without_ours(self, store):
        """model.save during fit writes the optimizer exactly as without gradguard, so
        keras.models.load_model restores it into a fresh optimizer."""
        ours = {id(v) for v in self.variables}
        for i, v in enumerate(v for v in self.optimizer.variables if id(v) not in ours):
            store[str(i)] = v.numpy()

    def _load_without_ours(self, store):
        ours = {id(v) for v in self.variables}
        theirs = [v for v in self.optimizer.variables if id(v) not in ours]
        if len(store.keys()) != len(theirs):
            return self._load(store)  # let Keras warn about the mismatch as usual
        for i, v in enumerate(theirs):
            v.assign(store[str(i)])

    # ------------------------------------------------------------ forward state (BN statistics)

    def guard_forward_state(self, model) -> None:
        """A skipped step must leave every piece of model state as it was, including what its
        forward pass wrote (BatchNormalization's moving statistics): wrap ``model.train_step`` for
        the fit so that the values from before the step come back when the step is skipped, with
        no host sync on healthy steps (``_guarded_train_step``, per backend)."""
        watched = compat.forward_state_variables(model)
        if not watched or not self._can_guard_forward_state(model):
            return
        self._guarded_model, self._watched = model, watched
        self._orig_train_step = model.__dict__.get("train_step")
        self._train_step = model.train_step
        object.__setattr__(model, "train_step", self._guarded_train_step)

    def unguard_forward_state(self) -> None:
        model = getattr(self, "_guarded_model", None)
        if model is None:
            return
        if self._orig_train_step is None:
            model.__dict__.pop("train_step", None)
        else:
            object.__setattr__(model, "train_step", self._orig_train_step)
        self._guarded_model = None

    def _can_guard_forward_state(self, model) -> bool:
        return True

    def _guarded_train_step(self, *args):
        raise NotImplementedError

    # ------------------------------------------------------------ host side

    def read(self) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
        vec = np.asarray(self.state_var.numpy(), dtype=np.float32)
        return self.layout.unpack_np(vec), int(self.step_var.numpy()), np.asarray(self.extras_var.numpy())

    def write_state(self, state: dict[str, Any]) -> None:
        self.state_var.assign(self.layout.pack_np(state))

    # ------------------------------------------------------------ the step (shared front half)

    def __call__(self, grads, trainable_variables=None):
        opt = self.optimizer
        if trainable_variables is None:
            tvars = compat.optimizer_trainable_variables(opt)
        else:
            tvars = list(trainable_variables)
            if not opt.built:  # as apply() would (TF builds the optimizer in the first trace)
                compat.build_optimizer_in_trace(opt, tvars)
        if not self.configured:
            self._configure()  # TF: a model built by its first trace; configures and creates the Variables
        self.ensure_variables()
        self.traces += 1
        grads = list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present or not self._measures_this_call():
            return self._apply(grads, trainable_variables)
        step = types.SimpleNamespace(grads=grads, trainable_variables=trainable_variables, present=present)
        step.pvars = [tvars[i] for i in present]
        step.lidx = [self._layer_index(v) for v in step.pvars]
        raw = [grads[i] for i in present]
        step.acc, step.is_update = None, None
        if self.accumulation:
            # Judge the gradients the optimizer will apply: the mean over the accumulation window.
            step.acc = [compat.gradient_accumulator(opt, v) for v in step.pvars]
            raw = [ops.add(ops.cast(self.dense(g), a.dtype), self.value_now(a)) / self.accumulation
                   for g, a in zip(raw, step.acc)]
            step.is_update = self._is_update_step()
        step.meas = self.aggregate([self._measured(g) for g in raw])
        if self.policy.unitwise is not None:  # the statistics are of the raw gradients
            step.grads = self._unitwise(step)
        key = tuple(id(v) for v in step.pvars)
        if getattr(self, "_plan_key", None) != key:  # eager torch calls this every step
            self._plan_key, self._plan = key, self._sample_plan(step.pvars)
        step.samples = self._plan
        state_now, step_now = self.value_now(self.state_var), self.value_now(self.step_var)
        step.layer_sq, has_grad = self._layer_squares(step.meas, step.lidx, state_now)
        self._step(step, state_now, step_now, has_grad)
        return None

    def _layer_squares(self, meas, lidx, state_now):
        """(per-layer squared gradient norms, 1.0 for layers that got a gradient)."""
        per_layer: list[list] = [[] for _ in range(self.n_layers)]
        for sq, li in zip(self.sum_squares(meas), lidx):
            if li >= 0:
                per_layer[li].append(sq)
        return self.layer_sums(per_layer, state_now)

    def _step(self, step, state_now, step_now, has_grad) -> None:
        raise NotImplementedError

    def _measures_this_call(self) -> bool:
        """False for a call the host knows is an accumulation micro-step (eager backends)."""
        return True

    def _is_update_step(self):
        """In-graph: whether this call completes an accumulation window (the optimizer steps)."""
        return ops.equal(ops.mod(compat.micro_step_counter(self.optimizer) + 1, self.accumulation), 0)

    def _layer_index(self, v) -> int:
        i = self.layer_of_var.get(id(v))
        if i is None:
            opt = self.optimizer
            try:
                ref = compat.optimizer_trainable_variables(opt)[compat.optimizer_variable_index(opt, v)]
                i = self.layer_of_var.get(id(ref), -1)
            except (KeyError, IndexError, AttributeError):
                i = -1
        return i

    def _measured(self, g):
        g = self.values(g)
        if keras.backend.standardize_dtype(g.dtype) != F32:
            g = ops.cast(g, F32)
        factor = getattr(self.optimizer, "loss_scale_factor", None)
        if factor:
            g = g / factor
        return g

    def _device_step(self, state_vec, layer_sq, has_grad):
        scale, finite, new_state = stats.device_step(self.layout.unpack(state_vec, ops.reshape), layer_sq,
                                                    has_grad, self.policy, self.xp, self.tracker)
        return scale, finite, self.pack(new_state)

    def _unitwise(self, step):
        """Unit-wise rules (AGC): each output unit's gradient against its weights. Keras kernels keep
        the output units on their last axis (Dense, Conv), so a unit's norm is taken over the other
        axes; a bias is unit-wise elementwise. The gradient norms are those of the measured
        gradients (all-reduced under tf.distribute, unscaled by ``loss_scale_factor``; under
        accumulation the window's mean, scaled on the update step only)."""
        rule, grads, out = self.policy.unitwise, step.grads, list(step.grads)
        for j, (i, m, v) in enumerate(zip(step.present, step.meas, step.pvars)):
            g = grads[i]
            if not self.is_dense(g) or tuple(m.shape) != tuple(g.shape):
                continue  # embedding rows as IndexedSlices: left alone
            w = ops.cast(v.value, F32)
            axes = tuple(range(len(g.shape) - 1))
            if axes:
                g_norm = ops.sqrt(ops.sum(ops.square(m), axis=axes, keepdims=True))
                w_norm = ops.sqrt(ops.sum(ops.square(w), axis=axes, keepdims=True))
            else:
                g_norm, w_norm = ops.abs(m), ops.abs(w)
            factor = ops.cast(rule(g_norm, w_norm, self.xp), g.dtype)
            if step.acc is not None and step.is_update is not None:
                factor = ops.where(step.is_update, factor, ops.ones_like(factor))  # micro-steps: as they are
            out[i] = g * factor
            if step.acc is not None:  # Keras applies (g + acc) / k: the earlier micro-batches alike
                a = step.acc[j]
                a.assign(self.value_now(a) * ops.cast(factor, a.dtype))
        return out

    def _scaled(self, step, scale):
        """The gradients scaled by ``scale``. Under accumulation Keras applies (g + acc) / k, so the
        accumulators (the window's earlier micro-batches) are scaled alike; only called on update
        steps, or with scale 1 on micro-steps."""
        out = list(step.grads)
        for j, i in enumerate(step.present):
            out[i] = self.scale(out[i], scale)
            if step.acc is not None:
                a = step.acc[j]
                a.assign(self.value_now(a) * ops.cast(scale, a.dtype))
        return out

    def _skip_effects(self) -> None:
        """What a skipped step does besides not applying: under accumulation the window's
        micro-batches are dropped (accumulators zeroed) and the optimizer's counter goes back to
        the window's start, so ``optimizer.iterations`` and the schedule do not move."""
        if not self.accumulation:
            return
        opt = self.optimizer
        for v in compat.optimizer_trainable_variables(opt):
            acc = compat.gradient_accumulator(opt, v)
            acc.assign(ops.zeros(acc.shape, acc.dtype))
        counter = compat.micro_step_counter(opt)
        counter.assign(counter - (self.accumulation - 1))

    def _is_snap(self, step_now):
        """``pipeline.is_log_step`` in-graph: the first step, then every ``snapshot_every``-th."""
        return ops.logical_or(ops.equal(step_now, 0), ops.equal(ops.mod(step_now + 1, self.snapshot_every), 0))

    # ------------------------------------------------------------ primitives (overridden per backend)

    def sum_squares(self, meas):
        """Per-variable sum of squared gradients: one read of gradient memory, the floor of any
        monitoring (and NaN/Inf anywhere shows in it)."""
        return [ops.sum(ops.square(m)) for m in meas]

    def layer_sums(self, per_layer, state_now):
        """(per-layer squared norms, 1.0 for layers that got a gradient) as device vectors."""
        zero = ops.zeros((), F32)
        layer_sq = ops.stack([_add(p) if p else zero for p in per_layer])
        return layer_sq, ops.convert_to_tensor(np.array([1.0 if p else 0.0 for p in per_layer], np.float32))

    def pack(self, state):
        return self.layout.pack(state, _flat_f32, lambda parts: ops.concatenate(parts, axis=0))

    def value_now(self, variable):
        """The variable's value now."""
        return variable.value

    def aggregate(self, meas):
        """The gradients as the optimizer will sum them across replicas (TF overrides)."""
        return meas

    def values(self, g):
        return g

    def dense(self, g):
        return g

    def is_dense(self, g) -> bool:
        return True

    def scale(self, g, scale):
        return g * ops.cast(scale, g.dtype)

    def cond(self, pred, true_fn, false_fn):
        if isinstance(pred, bool):
            return true_fn() if pred else false_fn()
        return ops.cond(pred, true_fn, false_fn)

    # ------------------------------------------------------------ log-step extras (TF and JAX)

    def _samples_now(self, step):
        return ops.concatenate([ops.cast(ops.reshape(v.value, (-1,))[:n], F32)
                                for v, (_, _, n) in zip(step.pvars, step.samples)], axis=0)

    def _compiled_extras(self, step, step_now, finite, is_snap, store_samples=True):
        """The log-step extras (TF and JAX), computed in a conditional taken only on log steps and
        on the step before each (see each backend's ``_extras``):

        * dead units from the kernels' columns (the core's rule),
        * a contiguous sample (at most 4096 elements) of each weight *after* the update, kept in a
          Variable from the step before a log step: the applied update is the log step's sample
          minus that one, the weight norms before the update are estimated from that one.

        Max-abs and zero counts are not taken: they cost passes over the gradients (on TF a
        conditional holding every gradient cost as much as all the rest of gradguard, measured).
        Histograms, when a sink wants them, are a conditional over the gradients (log steps only)."""
        L = self.n_layers
        zero = ops.zeros((), F32)
        weight_sq = update_sq = ops.full((L,), np.nan, F32)
        if (self.samples_var is not None
                and len(step.pvars) == len(compat.optimizer_trainable_variables(self.optimizer))):
            prev = self.value_now(self.samples_var)
            after = self._samples_now(step)
            if store_samples:
                self.samples_var.assign(after)
            w_parts: list[list] = [[] for _ in range(L)]
            u_parts: list[list] = [[] for _ in range(L)]
            o = 0
            for (i, _, n), li in zip(step.samples, step.lidx):
                if li >= 0:
                    numel = math.prod(step.pvars[i].shape)
                    w_parts[li].append(pipeline.update_sq_from_sample(ops.sum(ops.square(prev[o:o + n])), numel, n))
                    u_parts[li].append(pipeline.update_sq_from_sample(
                        ops.sum(ops.square(after[o:o + n] - prev[o:o + n])), numel, n))
                o += n
            weight_sq = ops.stack([_add(p) if p else zero for p in w_parts])
            update_sq = ops.stack([_add(p) if p else zero for p in u_parts])
        unknown = ops.full((L,), np.nan, F32)
        parts = [ops.reshape(ops.cast(step_now, F32), (1,)), ops.reshape(finite, (1,)), step.layer_sq,
                 unknown, unknown, weight_sq, update_sq]
        if self.unit_kernel:  # the core's DEAD_UNIT_RULE, on log steps only
            size = sum(self.unit_sizes.values())
            parts.append(self.cond(is_snap, lambda: ops.concatenate(self._dead_units(step), axis=0),
                                   lambda: ops.zeros((size,), F32)))
        if self.extras_layout.hist_layers:
            size = len(self.extras_layout.hist_layers) * (HIST_BINS + 2)
            parts.append(self.cond(is_snap, lambda: ops.concatenate(self._histograms(step.meas, step.lidx), axis=0),
                                   lambda: ops.zeros((size,), F32)))
        return ops.concatenate(parts, axis=0)

    def _sample_plan(self, pvars):
        """Per variable: (index, stride, count) of the core's update sample (torch takes them
        strided; TF/JAX take the first ``count`` contiguous ones, which XLA and TF read far cheaper)."""
        plan = pipeline.sample_plan([math.prod(v.shape) for v in pvars])
        return [(i, stride, count) for i, (stride, count) in enumerate(plan)]

    def _dead_units(self, step):
        """``pipeline.DEAD_UNIT_RULE``: a unit is dead when its whole kernel column (Keras keeps the
        output units on a kernel's last axis) got exactly zero gradient. 1.0 per dead unit."""
        by_id = {id(v): m for v, m in zip(step.pvars, step.meas)}
        parts = []
        for li, kid in self.unit_kernel.items():
            kernel = by_id.get(kid)
            if kernel is None or not self.is_dense(kernel):
                parts.append(ops.zeros((self.unit_sizes[li],), F32))
                continue
            axes = tuple(range(len(kernel.shape) - 1))
            parts.append(ops.cast(ops.equal(ops.max(ops.abs(kernel), axis=axes), 0.0), F32))
        return parts

    def _histograms(self, meas, lidx):
        parts = []
        for li in self.extras_layout.hist_layers:
            vals = [ops.reshape(m, (-1,)) for m, l in zip(meas, lidx) if l == li]
            parts.extend(_histogram(ops.concatenate(vals, axis=0)) if vals else
                         [ops.zeros((HIST_BINS,), F32), ops.zeros((2,), F32)])
        return parts


def _flat_f32(v):
    if isinstance(v, (int, float)):
        v = np.float32(v)
    return ops.reshape(ops.cast(v, F32), (-1,))


def _histogram(vals):
    """``HIST_BINS`` equal bins between the finite minimum and maximum (np.histogram's convention)."""
    ok = ops.isfinite(vals)
    lo = ops.min(ops.where(ok, vals, np.float32(np.inf)))
    hi = ops.max(ops.where(ok, vals, np.float32(-np.inf)))
    empty = lo > hi
    lo = ops.where(empty, 0.0, lo)
    hi = ops.where(empty, 0.0, hi)
    width = ops.maximum(hi - lo, 1e-30)
    clean = ops.where(ok, vals, lo)
    idx = ops.cast(ops.clip(ops.floor((clean - lo) / width * HIST_BINS), 0, HIST_BINS - 1), "int32")
    counts = ops.segment_sum(ops.cast(ok, F32), idx, num_segments=HIST_BINS)
    return [ops.cast(counts, F32), ops.cast(ops.stack([lo, hi]), F32)]


def _add(xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _max(xs):
    out = xs[0]
    for x in xs[1:]:
        out = ops.maximum(out, x)
    return out
