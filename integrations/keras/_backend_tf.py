"""TensorFlow: the step inside ``tf.function`` (and under ``tf.distribute``)."""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from gradguard.keras import _compat as compat
from gradguard.keras._graph import ApplyHook

XLA_BOOKKEEPING = True  # compile the core's device step with XLA (see TFApplyHook._step)


class TFApplyHook(ApplyHook):

    # ------------------------------------------------------------ primitives

    def value_now(self, variable):
        # Keras' convert_to_tensor hands a tf.Variable back as is, so a later use would read it
        # after this step's assignment; take the value now.
        return tf.convert_to_tensor(variable.value)

    def values(self, g):
        if isinstance(g, tf.IndexedSlices):
            return g.values  # rows of an embedding: the norm of the rows that got a gradient
        return g

    def dense(self, g):
        return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g

    def is_dense(self, g) -> bool:
        return not isinstance(g, tf.IndexedSlices)

    def scale(self, g, scale):
        if isinstance(g, tf.IndexedSlices):
            return tf.IndexedSlices(g.values * tf.cast(scale, g.values.dtype), g.indices, g.dense_shape)
        return g * ops.cast(scale, g.dtype)

    def aggregate(self, meas):
        """Under tf.distribute the optimizer all-reduces (sums) the replicas' gradients later; the
        statistics and the decisions need that sum now, identical on every replica."""
        if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
            return meas
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync <= 1:
            return meas
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, meas)

    def creation_scope(self):
        """Create the Variables where the model's own live: under its tf.distribute strategy, in
        the init scope when the first trace of a tf.function creates them."""
        return _creation_scope(self.optimizer)

    # ------------------------------------------------------------ forward state

    def _can_guard_forward_state(self, model) -> bool:
        # Under a multi-replica strategy BN statistics are synchronised by the strategy itself;
        # a conditional write in replica context is not allowed there: not guarded.
        strategy = compat.model_distribute_strategy(model)
        return strategy is None or strategy.num_replicas_in_sync <= 1

    def _guarded_train_step(self, data):
        # Read before the forward pass (automatic control dependencies keep program order).
        before = [tf.identity(v.value) for v in self._watched]
        self.step_finite = None
        logs = self._train_step(data)
        finite = self.step_finite
        if finite is not None:
            def restore():
                for v, value in zip(self._watched, before):
                    v.assign(value)
                return tf.constant(0)

            tf.cond(finite > 0, lambda: tf.constant(0), restore)
        return logs

    # ------------------------------------------------------------ the step

    def _uses_merge_call(self) -> bool:
        return (tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()
                and not compat.tf_strategy_supports_no_merge_call())

    def sum_squares(self, meas):
        """Half the sum of squares per variable (``L2Loss``: one op and one pass, no temporary;
        measured ~25% cheaper than Square then Sum, and ~3x cheaper than the same reductions
        inside the XLA-compiled bookkeeping call); doubled once per layer below (exact)."""
        return [tf.nn.l2_loss(m) for m in meas]

    def _layer_squares(self, meas, lidx, state_now):
        half, has_grad = super()._layer_squares(meas, lidx, state_now)
        return half * 2.0, has_grad

    def _step(self, step, state_now, step_now, has_grad):
        """The bookkeeping is one XLA-compiled call (its ~200 tiny ops would otherwise each pay the
        graph executor's per-op cost) that also picks the branch; one ``switch_case`` runs the
        update, the clipped update or nothing (it is what the in-graph skip costs, as in Keras'
        LossScaleOptimizer); the extras come around log steps only (``_extras``)."""
        if self._uses_merge_call():
            return self._merge_call_step(step, state_now, step_now, has_grad)
        kinds = self._kinds()
        fn = getattr(self, "_bookkeeping", None)
        if fn is None:
            fn = self._bookkeeping = tf.function(self._bookkeeping_and_branch, jit_compile=XLA_BOOKKEEPING,
                                                 autograph=False)
        is_update = step.is_update if step.is_update is not None else tf.constant(True)
        scale, finite, new_vec, new_step, index = fn(state_now, step_now, step.layer_sq, has_grad, is_update)
        self.step_finite = finite
        self.state_var.assign(new_vec)
        self.step_var.assign(new_step)
        apply, tv = self._apply, step.trainable_variables

        def skip():
            self._skip_effects()

        updates = {"update": lambda: apply(step.grads, tv),
                   "clipped": lambda: apply(self._scaled(step, scale), tv),
                   "skip": skip}
        if len(kinds) > 1:
            tf.switch_case(index % len(kinds), [updates[k] for k in kinds])
        else:
            apply(step.grads, tv)
        self._extras(step, step_now, finite, index >= len(kinds))

    def _extras(self, step, step_now, finite, is_snap):
        """On TensorFlow every extra read of the weights in the step cost about as much as all the
        rest of gradguard (measured: ~0.5-1 ms on a 1M-parameter MLP), so the weights are sampled
        only around log steps, in one conditional: after the update of the step before a log step
        (the log step's "before") and on the log step itself, where the extras are written."""
        ahead = tf.equal(tf.math.floormod(step_now + 2, self.snapshot_every), 0)
        if step.is_update is not None:
            ahead = tf.logical_and(ahead, step.is_update)
        samples = self.samples_var
        whole = samples is not None and len(step.pvars) == len(compat.optimizer_trainable_variables(self.optimizer))

        def around_log_step():
            extras = self._compiled_extras(step, step_now, finite, True, store_samples=False)
            self.extras_var.assign(tf.where(is_snap, extras, self.value_now(self.extras_var)))
            if whole:  # the weights after this update: the next log step's "before"
                samples.assign(self._samples_now(step))
            return tf.constant(0)

        tf.cond(tf.logical_or(is_snap, ahead), around_log_step, lambda: tf.constant(0))

    def _kinds(self) -> list[str]:
        return ["update"] + (["clipped"] if self.apply_clip else []) + (["skip"] if self.skip_nonfinite else [])

    def _bookkeeping_and_branch(self, state_vec, step_now, layer_sq, has_grad, is_update):
        scale, finite, new_vec = self._device_step(state_vec, layer_sq, has_grad)
        # An accumulation micro-step only adds to Keras' accumulators: plain update, no bookkeeping.
        new_vec = tf.where(is_update, new_vec, state_vec)
        new_step = step_now + tf.cast(is_update, step_now.dtype)
        kinds = self._kinds()
        kind = tf.constant(0)
        if self.apply_clip:
            kind = tf.where(scale < 1.0, kinds.index("clipped"), kind)
        if self.skip_nonfinite:
            kind = tf.where(finite > 0, kind, kinds.index("skip"))
        kind = tf.where(is_update, kind, 0)
        snap = tf.cast(tf.logical_and(self._is_snap(step_now), is_update), kind.dtype)
        return scale, finite, new_vec, new_step, kind + len(kinds) * snap

    def _merge_call_step(self, step, state_now, step_now, has_grad):
        """tf.distribute strategies that update through merge_call (MirroredStrategy on CPU): the
        update cannot sit in a conditional in replica context, so the choice is made in
        cross-replica context, as LossScaleOptimizer does. Every replica computed the same choice
        from the all-reduced gradients."""
        if self.accumulation:
            raise ValueError("gradguard: gradient_accumulation_steps under a tf.distribute strategy that "
                             "updates through merge_call is not supported")
        scale, finite, new_vec = self._device_step(state_now, step.layer_sq, has_grad)
        self.step_finite = finite
        self.state_var.assign(new_vec)
        self.step_var.assign(step_now + 1)
        is_snap = self._is_snap(step_now)
        index = tf.constant(0)  # 0: update, 1: clipped update, 2: skip
        if self.apply_clip:
            index = tf.where(scale < 1.0, 1, index)
        if self.skip_nonfinite:
            index = tf.where(finite > 0, index, 2)
        apply, tv = self._apply, step.trainable_variables
        scaled = self._scaled

        def cross_replica(distribution, index, grads, scale):
            first = distribution.experimental_local_results(index)[0]
            each = distribution.extended.call_for_each_replica
            tf.switch_case(first, [
                lambda: each(apply, args=(grads, tv)),
                lambda: each(lambda g, s: apply(scaled(_with_grads(step, g), s), tv), args=(grads, scale)),
                lambda: None])

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(index, step.grads, scale))
        self._extras(step, step_now, finite, is_snap)


def _with_grads(step, grads):
    out = type(step)(**vars(step))
    out.grads = grads
    return out


class _creation_scope:
    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __enter__(self):
        self._stack = []
        init = tf.init_scope()
        init.__enter__()
        self._stack.append(init)
        strategy = compat.optimizer_distribution_strategy(self.optimizer)
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


class strategy_scope:
    """Enter the model's tf.distribute strategy (when not already inside one)."""

    def __init__(self, model):
        self.model = model
        self._ctx = None

    def __enter__(self):
        strategy = compat.model_distribute_strategy(self.model)
        if strategy is not None and not tf.distribute.has_strategy():
            self._ctx = strategy.scope()
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False
