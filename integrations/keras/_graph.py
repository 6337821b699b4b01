"""The in-graph half of the Keras callback: a hook on the optimizer's ``apply``.

Every Keras backend passes the gradients of a training step through ``optimizer.apply``:
TensorFlow via ``apply_gradients``, JAX via ``stateless_apply`` (which calls ``apply`` inside a
``StatelessScope``), torch directly. The hook replaces ``apply`` on the optimizer *instance* for
the duration of ``fit``; it runs inside the compiled step (``tf.function``, ``jax.jit``, XLA) and

1. measures the per-layer squared gradient norms (one read of the gradients; the all-reduced
   gradients under ``tf.distribute``: one extra all-reduce for the measurement),
2. runs the core's ``stats.device_step`` (window accumulators, spike tracker, clipping policy)
   on state held in optimizer-tracked Variables, so JAX threads it through its jitted step,
3. scales the gradients by the policy's factor (threshold held in a Variable: switching
   clipping on mid-run needs no retrace),
4. applies the update only when every gradient is finite, in-graph (``tf.switch_case`` /
   ``lax.cond``, as ``LossScaleOptimizer`` does), so a skipped step leaves weights, optimizer
   slots and the iteration counter alone,
5. keeps the log-step extras of a ``Snapshot`` (weight norm and applied update from weight
   samples, dead units from the bias gradients, histograms when a sink wants them) in a Variable,
   written on log steps only (TF: conditionals around log steps; JAX: small vectors selected on
   log steps; torch: the host knows the log step). What each costs was measured; see the
   comments at ``_tf_extras`` and ``_jax_step``.

Nothing here talks to the host, except on torch (eager) the one read of the non-finite gate when
``skip_nonfinite=True``: the callback reads the Variables on log steps.
"""

from __future__ import annotations

import math
import types
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from gradguard import stats
from gradguard.clipping import ClipPolicy

_UPDATE_SAMPLE = 4096  # elements per variable sampled to measure the applied update
HIST_BINS = 64
XLA_BOOKKEEPING = True  # TensorFlow: compile the core's device step with XLA (see ApplyHook._tf_step)
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


def array_ops():
    """keras.ops for TensorFlow and JAX (traced once, so Python dispatch costs nothing per step);
    torch runs eagerly, so there the torch adapter's leaner namespace is used on the same tensors."""
    if backend_name() == "torch":
        from gradguard.torch import torch_ops
        return torch_ops
    return keras_ops


# ---------------------------------------------------------------------------------- state layout

class StateLayout:
    """The core's state dict packed into one float32 vector: one Variable, one read and one
    write per step, one copy to the host on a log step."""

    def __init__(self, template: dict[str, np.ndarray]):
        self.keys = list(template)
        self.shapes = {k: np.shape(v) for k, v in template.items()}
        self.slices = {}
        offset = 0
        for k in self.keys:
            n = int(np.prod(self.shapes[k], dtype=np.int64)) if self.shapes[k] else 1
            self.slices[k] = (offset, n)
            offset += n
        self.size = offset

    def pack_np(self, state: dict[str, Any]) -> np.ndarray:
        return np.concatenate([np.asarray(state[k], np.float32).reshape(-1) for k in self.keys]).astype(np.float32)

    def unpack_np(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for k in self.keys:
            o, n = self.slices[k]
            out[k] = vec[o] if not self.shapes[k] else vec[o:o + n].reshape(self.shapes[k])
        return out

    def unpack(self, vec) -> dict[str, Any]:
        out = {}
        for k in self.keys:
            o, n = self.slices[k]
            shape = self.shapes[k]
            out[k] = vec[o] if not shape else vec[o:o + n] if len(shape) == 1 else ops.reshape(vec[o:o + n], shape)
        return out

    def pack(self, state: dict[str, Any]):
        if backend_name() == "torch":  # eager: keras.ops' per-call dispatch would dominate
            import torch
            parts = [v.reshape(-1).float() if isinstance(v, torch.Tensor) else torch.tensor([float(v)])
                     for v in (state[k] for k in self.keys)]
            device = next((p.device for p in parts if p.device.type != "cpu"), parts[0].device)
            return torch.cat([p.to(device) for p in parts])
        parts = []
        for k in self.keys:
            v = state[k]
            if isinstance(v, (int, float)):
                v = np.float32(v)
            parts.append(ops.reshape(ops.cast(v, F32), (-1,)))
        return ops.concatenate(parts, axis=0)


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
            if counts.sum() > 0 and np.isfinite(lo) and np.isfinite(hi):
                hist[i] = (counts.astype(np.int64), np.linspace(lo, hi, HIST_BINS + 1))
        out["hist"] = hist
        return out


# ---------------------------------------------------------------------------------- the hook

class ApplyHook:
    """Replaces ``optimizer.apply`` on the instance; see the module docstring."""

    def __init__(self, optimizer, configure):
        self.optimizer = optimizer
        self._configure = configure  # called once the model's variables exist (see ``configure``)
        self.configured = False
        self.backend = backend_name()
        self.xp = array_ops()
        self.variables: list = []
        self.state_var = self.step_var = self.extras_var = self.samples_var = None
        self._init_state: np.ndarray | None = None
        self._init_step = 0
        self._orig: dict[str, Any] = {}
        self._py_step = 0  # torch only: the step count, known on the host without a sync
        self.traces = 0  # how many times the step was traced (eager backends: called)

    def configure(self, *, layers, layer_of_var: dict[int, int], unit_kernel: dict[int, int],
                  unit_bias: dict[int, int] | None = None, policy: ClipPolicy,
                  tracker: stats.TrackerConfig, skip_nonfinite: bool, apply_clip: bool, snapshot_every: int,
                  hist_layers: Sequence[int], measure_updates: bool) -> None:
        self.layers = list(layers)
        self.n_layers = len(self.layers)
        self.layer_of_var = dict(layer_of_var)
        self.unit_kernel = dict(unit_kernel)
        self.unit_bias = dict(unit_bias or {})
        self.policy = policy
        self.tracker = tracker
        self.skip_nonfinite = skip_nonfinite
        self.apply_clip = apply_clip
        self.snapshot_every = int(snapshot_every)
        self.measure_updates = measure_updates
        self.layout = StateLayout(stats.init_state(self.n_layers, policy))
        self.unit_sizes = {i: int(self.layers[i].units) for i in self.unit_kernel}
        self.extras_layout = ExtrasLayout(self.n_layers, self.unit_sizes, hist_layers)
        self.configured = True

    # ------------------------------------------------------------ variables

    def set_initial(self, state: dict[str, np.ndarray], step: int) -> None:
        """Values the Variables get when created, or now if they exist."""
        self._init_state = self.layout.pack_np(state)
        self._init_step = int(step)
        self._py_step = int(step)
        if self.state_var is not None:
            self.state_var.assign(self._init_state)
            self.step_var.assign(self._init_step)

    def ensure_variables(self) -> None:
        if self.state_var is not None:
            return
        opt = self.optimizer
        init = self._init_state if self._init_state is not None else self.layout.pack_np(
            stats.init_state(self.n_layers, self.policy))
        step0 = self._init_step

        def const(value, dtype):
            def initializer(shape, dtype=dtype):
                return ops.cast(ops.convert_to_tensor(np.asarray(value).reshape(shape)), dtype)
            return initializer

        with _creation_scope(opt):
            # aggregation "none": under tf.distribute each replica writes its own copy, and every
            # replica computes the same values from the all-reduced gradients.
            self.state_var = opt.add_variable((self.layout.size,), initializer=const(init, F32), dtype=F32,
                                              aggregation="none", name="gradguard_state")
            self.step_var = opt.add_variable((), initializer=const(step0, "int32"), dtype="int32",
                                             aggregation="none", name="gradguard_step")
            self.extras_var = opt.add_variable((self.extras_layout.size,),
                                               initializer=const(np.full(self.extras_layout.size, -1.0), F32),
                                               dtype=F32, aggregation="none", name="gradguard_extras")
            self.variables = [self.state_var, self.step_var, self.extras_var]
            if self.backend in ("jax", "tensorflow"):
                # Samples of the weights after the last step (see _compiled_extras), starting
                # from the weights as they are now.
                tvars = list(opt._trainable_variables)
                plan = self._sample_plan(tvars)
                first = np.concatenate([np.asarray(tvars[i].numpy(), np.float32).reshape(-1)[:n]
                                        for i, _, n in plan]) if plan else np.zeros(0, np.float32)
                self.samples_var = opt.add_variable(first.shape, initializer=const(first, F32), dtype=F32,
                                                    aggregation="none", name="gradguard_samples")
                self.variables.append(self.samples_var)

    def remove_variables(self) -> None:
        opt = self.optimizer
        for v in self.variables:
            opt._untrack_variable(v)
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

    # ------------------------------------------------------------ host side

    def read(self) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
        vec = np.asarray(self.state_var.numpy(), dtype=np.float32)
        return self.layout.unpack_np(vec), int(self.step_var.numpy()), np.asarray(self.extras_var.numpy())

    def write_state(self, state: dict[str, Any]) -> None:
        self.state_var.assign(self.layout.pack_np(state))

    # ------------------------------------------------------------ the step

    def _layer_index(self, v) -> int:
        i = self.layer_of_var.get(id(v))
        if i is None:
            opt = self.optimizer
            try:
                ref = opt._trainable_variables[opt._get_variable_index(v)]
                i = self.layer_of_var.get(id(ref), -1)
            except (KeyError, IndexError, AttributeError):
                i = -1
        return i

    def _measured(self, g):
        if self.backend == "tensorflow":
            import tensorflow as tf
            if isinstance(g, tf.IndexedSlices):
                g = g.values  # rows of an embedding: the norm of the rows that got a gradient
        if keras.backend.standardize_dtype(g.dtype) != F32:
            g = ops.cast(g, F32)
        factor = getattr(self.optimizer, "loss_scale_factor", None)
        if factor:
            g = g / factor
        return g

    def __call__(self, grads, trainable_variables=None):
        opt = self.optimizer
        if trainable_variables is None:
            tvars = list(opt._trainable_variables)
        else:
            tvars = list(trainable_variables)
            if not opt.built:  # as apply() would (TF builds the optimizer in the first trace)
                from keras.src import backend as kbackend
                with kbackend.name_scope(opt.name, caller=opt):
                    opt.build(tvars)
                opt.built = True
        if not self.configured:
            self._configure()  # TF: a model built by its first trace; configures and creates the Variables
        self.ensure_variables()
        self.traces += 1
        grads = list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return self._apply(grads, trainable_variables)
        step = types.SimpleNamespace(grads=grads, trainable_variables=trainable_variables)
        step.pvars = [tvars[i] for i in present]
        step.lidx = [self._layer_index(v) for v in step.pvars]
        step.meas = self._aggregate([self._measured(grads[i]) for i in present])
        if self.policy.unitwise is not None:  # the statistics are of the raw gradients
            step.grads = self._unitwise(grads, present, step.meas, step.pvars)
        key = tuple(id(v) for v in step.pvars)
        if getattr(self, "_plan_key", None) != key:  # eager torch calls this every step
            self._plan_key, self._plan = key, self._sample_plan(step.pvars)
        step.samples = self._plan

        per_layer: list[list] = [[] for _ in range(self.n_layers)]
        for sq, li in zip(self._sum_squares(step.meas), step.lidx):
            if li >= 0:
                per_layer[li].append(sq)
        state_now, step_now = self._read(self.state_var), self._read(self.step_var)
        if self.backend == "torch":  # eager: plain torch calls, keras.ops' per-call dispatch is not free
            import torch
            zero = torch.zeros((), device=state_now.device)
            step.layer_sq = torch.stack([_add(p) if p else zero for p in per_layer])
            key = tuple(bool(p) for p in per_layer)
            if getattr(self, "_has_key", None) != key:
                self._has_key = key
                self._has_grad = torch.tensor([float(k) for k in key], device=state_now.device)
            has_grad = self._has_grad
        else:
            zero = ops.zeros((), F32)
            step.layer_sq = ops.stack([_add(p) if p else zero for p in per_layer])
            has_grad = ops.convert_to_tensor(np.array([1.0 if p else 0.0 for p in per_layer], np.float32))
        if self.backend == "tensorflow":
            self._tf_step(step, state_now, step_now, has_grad)
        elif self.backend == "jax":
            self._jax_step(step, state_now, step_now, has_grad)
        else:
            self._torch_step(step, state_now, step_now, has_grad)
        return None

    def _sum_squares(self, meas):
        """Per-variable sum of squared gradients: one read of gradient memory, the floor of any
        monitoring (and NaN/Inf anywhere shows in it). The fastest form measured per backend."""
        if self.backend == "jax":
            import jax.numpy as jnp
            return [jnp.vdot(m.reshape(-1), m.reshape(-1)) for m in meas]  # measured: cheaper than sum(square)
        if self.backend == "torch":
            import torch
            return [n * n for n in torch._foreach_norm(list(meas), 2)]  # one fused kernel launch
        return [ops.sum(ops.square(m)) for m in meas]

    def _read(self, variable):
        """The variable's value now. (Keras' convert_to_tensor hands a tf.Variable back as is, so a
        later use would read it after this step's assignment.)"""
        if self.backend == "tensorflow":
            import tensorflow as tf
            return tf.convert_to_tensor(variable.value)
        return variable.value

    def _device_step(self, state_vec, layer_sq, has_grad):
        scale, finite, new_state = stats.device_step(self.layout.unpack(state_vec), layer_sq, has_grad,
                                                    self.policy, self.xp, self.tracker)
        return scale, finite, self.layout.pack(new_state)

    def _unitwise(self, grads, present, meas, pvars):
        """Unit-wise rules (AGC): each output unit's gradient against its weights. Keras kernels keep
        the output units on their last axis (Dense, Conv), so a unit's norm is taken over the other
        axes; a bias is unit-wise elementwise. The gradient norms are those of the measured
        gradients (all-reduced under tf.distribute, unscaled by ``loss_scale_factor``)."""
        rule, out = self.policy.unitwise, list(grads)
        for i, m, v in zip(present, meas, pvars):
            g = grads[i]
            if not _dense(g) or tuple(m.shape) != tuple(g.shape):
                continue  # embedding rows as IndexedSlices: left alone
            w = ops.cast(v.value, F32)
            axes = tuple(range(len(g.shape) - 1))
            if axes:
                g_norm = ops.sqrt(ops.sum(ops.square(m), axis=axes, keepdims=True))
                w_norm = ops.sqrt(ops.sum(ops.square(w), axis=axes, keepdims=True))
            else:
                g_norm, w_norm = ops.abs(m), ops.abs(w)
            out[i] = g * ops.cast(rule(g_norm, w_norm, self.xp), g.dtype)
        return out

    def _scaled(self, grads, scale):
        return [None if g is None else _scale(g, scale) for g in grads]

    def _snapshot(self, step, finite, update):
        """Run ``update`` between the two halves of the log-step extras (the weights before it are
        needed to measure what it applied) and write the extras Variable."""
        before = self._before(step.pvars, step.lidx, step.samples)
        update()
        return self._extras(step.step_f, finite, step.layer_sq, step.meas, step.pvars, step.lidx, before,
                            step.samples)

    # ------------------------------------------------------------ TensorFlow

    def _tf_step(self, step, state_now, step_now, has_grad):
        """The bookkeeping is one XLA-compiled call (its ~200 tiny ops would otherwise each pay the
        graph executor's per-op cost) that also picks the branch; one ``switch_case`` runs the
        update, the clipped update or nothing (it is what the in-graph skip costs, as in Keras'
        LossScaleOptimizer); the extras come around log steps only (``_tf_extras``)."""
        import tensorflow as tf

        if (tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()
                and not tf.__internal__.distribute.strategy_supports_no_merge_call()):
            return self._tf_merge_call_step(step, state_now, step_now, has_grad)
        kinds = self._kinds()
        fn = getattr(self, "_tf_bookkeeping", None)
        if fn is None:
            fn = self._tf_bookkeeping = tf.function(self._bookkeeping_and_branch, jit_compile=XLA_BOOKKEEPING,
                                                    autograph=False)
        scale, finite, new_vec, index = fn(state_now, step_now, step.layer_sq, has_grad)
        self.state_var.assign(new_vec)
        self.step_var.assign(step_now + 1)
        apply, tv = self._apply, step.trainable_variables
        updates = {"update": lambda: apply(step.grads, tv),
                   "clipped": lambda: apply(self._scaled(step.grads, scale), tv),
                   "skip": lambda: None}
        if len(kinds) > 1:
            tf.switch_case(index % len(kinds), [updates[k] for k in kinds])
        else:
            apply(step.grads, tv)
        self._tf_extras(step, step_now, finite, index >= len(kinds))

    def _tf_extras(self, step, step_now, finite, is_snap):
        """On TensorFlow every extra read of the weights in the step cost about as much as all the
        rest of gradguard (measured: ~0.5-1 ms on a 1M-parameter MLP), so the weights are sampled
        only around log steps, under conditionals: after the update of the step before a log step
        (the log step's "before") and on the log step itself."""
        import tensorflow as tf

        def extras():
            self.extras_var.assign(self._compiled_extras(step, step_now, finite, True, store_samples=False))
            return tf.constant(0)

        tf.cond(is_snap, extras, lambda: tf.constant(0))
        if self.samples_var is not None:
            def store():
                self.samples_var.assign(self._samples_now(step))
                return tf.constant(0)

            ahead = tf.equal(tf.math.floormod(step_now + 2, self.snapshot_every), 0)
            tf.cond(ahead, store, lambda: tf.constant(0))

    def _is_snap(self, step_now):
        """The log steps: the first step (the initial depth profile and the first update, where a
        learning rate or an init wrong from the start shows), then every ``snapshot_every``-th."""
        return ops.logical_or(ops.equal(step_now, 0), ops.equal(ops.mod(step_now + 1, self.snapshot_every), 0))

    def _kinds(self) -> list[str]:
        return ["update"] + (["clipped"] if self.apply_clip else []) + (["skip"] if self.skip_nonfinite else [])

    def _bookkeeping_and_branch(self, state_vec, step_now, layer_sq, has_grad):
        import tensorflow as tf
        scale, finite, new_vec = self._device_step(state_vec, layer_sq, has_grad)
        kinds = self._kinds()
        kind = tf.constant(0)
        if self.apply_clip:
            kind = tf.where(scale < 1.0, kinds.index("clipped"), kind)
        if self.skip_nonfinite:
            kind = tf.where(finite > 0, kind, kinds.index("skip"))
        snap = tf.cast(self._is_snap(step_now), kind.dtype)
        return scale, finite, new_vec, kind + len(kinds) * snap

    def _tf_merge_call_step(self, step, state_now, step_now, has_grad):
        """tf.distribute strategies that update through merge_call (MirroredStrategy on CPU): the
        update cannot sit in a conditional in replica context, so the choice is made in
        cross-replica context, as LossScaleOptimizer does. Every replica computed the same choice
        from the all-reduced gradients."""
        import tensorflow as tf
        scale, finite, new_vec = self._device_step(state_now, step.layer_sq, has_grad)
        self.state_var.assign(new_vec)
        self.step_var.assign(step_now + 1)
        is_snap = self._is_snap(step_now)
        index = tf.constant(0)  # 0: update, 1: clipped update, 2: skip
        if self.apply_clip:
            index = tf.where(scale < 1.0, 1, index)
        if self.skip_nonfinite:
            index = tf.where(finite > 0, index, 2)
        apply, tv, scaled = self._apply, step.trainable_variables, self._scaled

        def cross_replica(distribution, index, grads, scale):
            first = distribution.experimental_local_results(index)[0]
            each = distribution.extended.call_for_each_replica
            tf.switch_case(first, [
                lambda: each(apply, args=(grads, tv)),
                lambda: each(lambda g, s: apply(scaled(g, s), tv), args=(grads, scale)),
                lambda: None])

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(index, step.grads, scale))
        self._tf_extras(step, step_now, finite, is_snap)

    # ------------------------------------------------------------ JAX

    def _jax_step(self, step, state_now, step_now, has_grad):
        """No conditional and no read of a pre-update weight besides the update itself: under jit
        the update writes the weights and slots in place, and anything else that reads them first
        (an XLA conditional, a strided slice) made XLA spend about a millisecond a step on a
        1M-parameter MLP, several times the rest of gradguard. The log-step extras are the small
        vectors of ``_compiled_extras``, kept by a select on log steps."""
        import jax.numpy as jnp
        scale, finite, new_vec = self._device_step(state_now, step.layer_sq, has_grad)
        self.state_var.assign(new_vec)
        self.step_var.assign(step_now + 1)
        is_snap = self._is_snap(step_now)
        out = self._scaled(step.grads, scale) if self.apply_clip else step.grads  # XLA fuses the multiply
        if self.skip_nonfinite:
            self._jax_guarded_apply(finite, out, step.trainable_variables)
        else:
            self._apply(out, step.trainable_variables)
        extras = self._compiled_extras(step, step_now, finite, is_snap)
        self.extras_var.assign(jnp.where(is_snap, extras, self.extras_var.value))

    def _samples_now(self, step):
        return ops.concatenate([ops.cast(ops.reshape(v.value, (-1,))[:n], F32)
                                for v, (_, _, n) in zip(step.pvars, step.samples)], axis=0)

    def _compiled_extras(self, step, step_now, finite, is_snap, store_samples=True):
        """The log-step extras from small vectors computed on every step (TF and JAX):

        * dead units from the bias gradients (a kernel's columns when a layer has no bias),
        * a contiguous sample (at most 4096 elements) of each weight *after* each update, kept in a
          Variable: the applied update is this step's sample minus the last step's, the weight
          norms before the update are estimated from the last step's sample.

        Max-abs and zero counts are not taken: they cost passes over the gradients on every step on
        JAX, and on TF a conditional holding every gradient costs as much as all the rest of
        gradguard (measured). Histograms, when a sink wants them, are a conditional over the
        gradients (log steps only)."""
        L = self.n_layers
        zero = ops.zeros((), F32)
        weight_sq = update_sq = ops.full((L,), np.nan, F32)
        if self.samples_var is not None and len(step.pvars) == len(self.optimizer._trainable_variables):
            prev = self._read(self.samples_var)
            after = self._samples_now(step)
            if store_samples:
                self.samples_var.assign(after)
            w_parts: list[list] = [[] for _ in range(L)]
            u_parts: list[list] = [[] for _ in range(L)]
            o = 0
            for (i, _, n), li in zip(step.samples, step.lidx):
                if li >= 0:
                    factor = math.prod(step.pvars[i].shape) / n
                    w_parts[li].append(ops.sum(ops.square(prev[o:o + n])) * factor)
                    u_parts[li].append(ops.sum(ops.square(after[o:o + n] - prev[o:o + n])) * factor)
                o += n
            weight_sq = ops.stack([_add(p) if p else zero for p in w_parts])
            update_sq = ops.stack([_add(p) if p else zero for p in u_parts])
        unknown = ops.full((L,), np.nan, F32)
        parts = [ops.reshape(ops.cast(step_now, F32), (1,)), ops.reshape(finite, (1,)), step.layer_sq,
                 unknown, unknown, weight_sq, update_sq]
        by_id = {id(v): m for v, m in zip(step.pvars, step.meas)}
        for li, kid in self.unit_kernel.items():
            # A unit is dead when its bias gets exactly zero gradient (tiny to test, and a ReLU unit
            # that is off for every input gets none); a layer without a bias: its kernel columns.
            bias, kernel = by_id.get(self.unit_bias.get(li)), by_id.get(kid)
            if bias is not None and _dense(bias):
                parts.append(ops.cast(ops.equal(bias, 0.0), F32))
            elif kernel is not None and _dense(kernel):
                axes = tuple(range(len(kernel.shape) - 1))
                parts.append(ops.cast(ops.equal(ops.max(ops.abs(kernel), axis=axes), 0.0), F32))
            else:
                parts.append(ops.zeros((self.unit_sizes[li],), F32))
        if self.extras_layout.hist_layers:
            size = len(self.extras_layout.hist_layers) * (HIST_BINS + 2)
            parts.append(self._cond(is_snap, lambda: ops.concatenate(self._histograms(step.meas, step.lidx), axis=0),
                                    lambda: ops.zeros((size,), F32)))
        return ops.concatenate(parts, axis=0)

    def _cond(self, pred, true_fn, false_fn):
        if isinstance(pred, bool):
            return true_fn() if pred else false_fn()
        if self.backend == "jax":
            import jax
            return jax.lax.cond(pred, true_fn, false_fn)
        import tensorflow as tf
        return tf.cond(pred, true_fn, false_fn)

    # ------------------------------------------------------------ torch (eager)

    def _torch_step(self, step, state_now, step_now, has_grad):
        step.step_f = step_now.float()  # a copy: the Variable is updated in place below
        scale, finite, new_vec = self._device_step(state_now, step.layer_sq, has_grad)
        # In place, as Variable.assign would (the step runs under torch.no_grad), without its dispatch.
        self.state_var.value.copy_(new_vec)
        self.step_var.value.add_(1)
        is_snap = self._py_step == 0 or (self._py_step + 1) % self.snapshot_every == 0  # host-counted: no sync
        self._py_step += 1
        apply, tv = self._apply, step.trainable_variables
        if not self.skip_nonfinite:
            def update():
                apply(self._scaled(step.grads, scale) if self.apply_clip else step.grads, tv)  # no host sync
        else:
            # The one host sync of a non-log step (as GradScaler has) decides both: skip, and
            # whether the clipping pass changes anything.
            code = int(finite + 2.0 * (scale < 1.0)) if self.apply_clip else int(finite)

            def update():
                if code & 1:
                    apply(self._scaled(step.grads, scale) if code & 2 else step.grads, tv)
        if is_snap:
            self.extras_var.assign(self._snapshot(step, finite, update))
        else:
            update()

    # ------------------------------------------------------------ backend specifics

    def _aggregate(self, meas):
        """Under tf.distribute the optimizer all-reduces (sums) the replicas' gradients later; the
        statistics and the decisions need that sum now, identical on every replica."""
        if self.backend != "tensorflow":
            return meas  # JAX: jit over sharded arrays already yields the global gradient
        import tensorflow as tf
        if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
            return meas
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync <= 1:
            return meas
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, meas)

    def _jax_guarded_apply(self, finite, grads, trainable_variables):
        """Inside jit the update is a function of the variables' values: run it in a nested
        StatelessScope under lax.cond and keep the old values when a gradient is not finite (as
        LossScaleOptimizer does). Measured: cheaper than computing the update and selecting."""
        import jax
        opt = self.optimizer
        ours = {id(v) for v in self.variables}
        variables = list(opt._trainable_variables) + [v for v in opt.variables if id(v) not in ours]
        current = [v.value for v in variables]
        apply = self._apply

        def run():
            with keras.StatelessScope(state_mapping=list(zip(variables, current))) as scope:
                apply(grads, trainable_variables)
            return [scope.get_current_value(v) for v in variables]

        new = jax.lax.cond(finite > 0, run, lambda: current)
        for v, value in zip(variables, new):
            v.assign(value)

    # ------------------------------------------------------------ log-step extras

    def _sample_plan(self, pvars):
        """Per variable: (index, stride, count) of at most 4096 elements (torch takes them strided;
        TF/JAX take the first ``count`` contiguous ones, which XLA and TF read far cheaper)."""
        plan = []
        for i, v in enumerate(pvars):
            numel = int(math.prod(v.shape))
            stride = max(1, numel // _UPDATE_SAMPLE)
            plan.append((i, stride, len(range(0, numel, stride))))
        return plan

    def _before(self, pvars, lidx, samples):
        """torch, log steps: [weight sum of squares per layer, strided weight samples], taken
        before the update (copies: torch updates the weights in place)."""
        per_layer: list[list] = [[] for _ in range(self.n_layers)]
        for v, li in zip(pvars, lidx):
            if li >= 0:
                per_layer[li].append(ops.sum(ops.square(ops.cast(v.value, F32))))
        zero = ops.zeros((), F32)
        picked = [ops.cast(ops.reshape(pvars[i].value, (-1,))[::stride], F32) for i, stride, _ in samples]
        return ops.concatenate([ops.stack([_add(p) if p else zero for p in per_layer])] + picked, axis=0)

    def _extras(self, step_f, finite, layer_sq, meas, pvars, lidx, before, samples):
        """torch, log steps: the exact extras vector (see ``ExtrasLayout``), after the update."""
        L = self.n_layers
        zero = ops.zeros((), F32)
        max_abs: list[list] = [[] for _ in range(L)]
        zeros: list[list] = [[] for _ in range(L)]
        update: list[list] = [[] for _ in range(L)]
        for m, li in zip(meas, lidx):
            if li >= 0:
                max_abs[li].append(ops.max(ops.abs(m)))
                zeros[li].append(ops.sum(ops.cast(ops.equal(m, 0.0), F32)))
        o = L
        for i, stride, n in samples:
            li = lidx[i]
            old = before[o:o + n]
            o += n
            if li >= 0:
                new = ops.cast(ops.reshape(pvars[i].value, (-1,))[::stride], F32)
                update[li].append(ops.sum(ops.square(new - old)) * (math.prod(pvars[i].shape) / n))
        parts = [ops.reshape(step_f, (1,)), ops.reshape(finite, (1,)), layer_sq,
                 ops.stack([_max(p) if p else zero for p in max_abs]),
                 ops.stack([_add(p) if p else zero for p in zeros]),
                 before[:L],
                 ops.stack([_add(p) if p else zero for p in update])]
        by_id = {id(v): m for v, m in zip(pvars, meas)}
        for li, kid in self.unit_kernel.items():
            m = by_id.get(kid)
            if m is None:
                parts.append(ops.zeros((self.unit_sizes[li],), F32))
            else:
                axes = tuple(range(len(m.shape) - 1))
                parts.append(ops.cast(ops.equal(ops.max(ops.abs(m), axis=axes), 0.0), F32))
        parts.extend(self._histograms(meas, lidx))
        return ops.concatenate(parts, axis=0)

    def _histograms(self, meas, lidx):
        parts = []
        for li in self.extras_layout.hist_layers:
            vals = [ops.reshape(m, (-1,)) for m, l in zip(meas, lidx) if l == li]
            parts.extend(_histogram(ops.concatenate(vals, axis=0)) if vals else
                         [ops.zeros((HIST_BINS,), F32), ops.zeros((2,), F32)])
        return parts


def _histogram(vals):
    """64 equal bins between the finite minimum and maximum (np.histogram's convention)."""
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


def _dense(g) -> bool:
    if backend_name() == "tensorflow":
        import tensorflow as tf
        return not isinstance(g, tf.IndexedSlices)
    return True


def _scale(g, scale):
    if backend_name() == "tensorflow":
        import tensorflow as tf
        if isinstance(g, tf.IndexedSlices):
            return tf.IndexedSlices(g.values * tf.cast(scale, g.values.dtype), g.indices, g.dense_shape)
    return g * ops.cast(scale, g.dtype)


class _creation_scope:
    """Create the Variables where the model's own live: under its tf.distribute strategy, in
    the init scope when the first trace of a tf.function creates them."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __enter__(self):
        self._stack = []
        if backend_name() == "tensorflow":
            import tensorflow as tf
            init = tf.init_scope()
            init.__enter__()
            self._stack.append(init)
            strategy = getattr(self.optimizer, "_distribution_strategy", None)
            if (strategy is not None and not tf.distribute.has_strategy()
                    and strategy is not tf.distribute.get_strategy()):
                scope = strategy.scope()
                scope.__enter__()
                self._stack.append(scope)
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self._stack):
            ctx.__exit__(*exc)
        return False
