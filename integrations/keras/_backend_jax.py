"""JAX: the step inside ``jax.jit`` (``stateless_apply`` runs ``apply`` in a ``StatelessScope``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras

from gradguard.keras import _compat as compat
from gradguard.keras._graph import ApplyHook


class JaxApplyHook(ApplyHook):

    def sum_squares(self, meas):
        return [jnp.vdot(m.reshape(-1), m.reshape(-1)) for m in meas]  # measured: cheaper than sum(square)

    def _guarded_train_step(self, state, data):
        """JAX's train step is a pure function of the state: select the non-trainable values from
        before the step where the step was skipped (XLA fuses the select)."""
        self.step_finite = None
        logs, new_state = self._train_step(state, data)
        finite = self.step_finite
        if finite is None:
            return logs, new_state
        trainable, non_trainable, optimizer_vars, metrics = new_state
        watched = {id(v) for v in self._watched}
        positions = [i for i, v in enumerate(self._guarded_model.non_trainable_variables) if id(v) in watched]
        non_trainable = list(non_trainable)
        for i in positions:
            non_trainable[i] = jnp.where(finite > 0, non_trainable[i], state[1][i])
        return logs, (trainable, non_trainable, optimizer_vars, metrics)

    def _step(self, step, state_now, step_now, has_grad):
        """No read of a pre-update weight besides the update itself: under jit the update writes
        the weights and slots in place, and anything else that reads them first (an XLA
        conditional, a strided slice) made XLA spend about a millisecond a step on a
        1M-parameter MLP, several times the rest of gradguard. Every step: the per-variable
        squared sums, the core's bookkeeping, the (clipped) update or the skip; the log-step
        extras sit in one conditional that reads the weights after the update (``_extras``)."""
        scale, finite, new_vec = self._device_step(state_now, step.layer_sq, has_grad)
        self.step_finite = finite
        is_update = step.is_update
        if is_update is not None:
            # An accumulation micro-step only adds to Keras' accumulators: no bookkeeping, no gate.
            new_vec = jnp.where(is_update, new_vec, state_now)
            scale = jnp.where(is_update, scale, 1.0)
            go = jnp.logical_or(jnp.logical_not(is_update), finite > 0)
            new_step = step_now + is_update.astype(step_now.dtype)
            is_snap = jnp.logical_and(self._is_snap(step_now), is_update)
        else:
            go, new_step, is_snap = finite > 0, step_now + 1, self._is_snap(step_now)
        out = self._scaled(step, scale) if self.apply_clip else step.grads  # XLA fuses the multiply
        if self.skip_nonfinite:
            self._guarded_apply(go, out, step.trainable_variables)
        else:
            self._apply(out, step.trainable_variables)
        # gradguard's own Variables last: the optimizer's update may have written all of its variables.
        self.state_var.assign(new_vec)
        self.step_var.assign(new_step)
        self._extras(step, step_now, finite, is_snap)

    def _extras(self, step, step_now, finite, is_snap):
        """The log-step extras and the weight samples in one ``lax.cond`` taken on log steps and
        on the step before each (whose weights after its update are the log step's "before"):
        computed every step and selected, they were ~110 of the step's ~175 XLA fusions and
        most of gradguard's cost (measured on the 0.9M-parameter Dense stack). The branch reads
        the weights *after* the update only, so the in-place update stays in place."""
        samples = self.samples_var
        whole = samples is not None and len(step.pvars) == len(compat.optimizer_trainable_variables(self.optimizer))
        ahead = jnp.equal(jnp.mod(step_now + 2, self.snapshot_every), 0)
        if step.is_update is not None:
            ahead = jnp.logical_and(ahead, step.is_update)
        extras_old = self.extras_var.value
        samples_old = samples.value if samples is not None else None

        def taken():
            extras = self._compiled_extras(step, step_now, finite, True, store_samples=False)
            extras = jnp.where(is_snap, extras, extras_old)
            return extras, (self._samples_now(step) if whole else samples_old)

        def not_taken():
            return extras_old, samples_old

        extras, new_samples = jax.lax.cond(jnp.logical_or(is_snap, ahead), taken, not_taken)
        self.extras_var.assign(extras)
        if samples is not None:
            samples.assign(new_samples)

    def _guarded_apply(self, go, grads, trainable_variables):
        """Inside jit the update is a function of the variables' values: run it in a nested
        StatelessScope under lax.cond and keep the old values when a gradient is not finite (as
        LossScaleOptimizer does). Measured: cheaper than computing the update and selecting."""
        opt = self.optimizer
        ours = {id(v) for v in self.variables}
        theirs = [v for v in opt.variables if id(v) not in ours]
        variables = compat.optimizer_trainable_variables(opt) + theirs
        everything = variables + [v for v in opt.variables if id(v) in ours]
        current = [v.value for v in everything]
        apply = self._apply

        def run():
            with keras.StatelessScope(state_mapping=list(zip(everything, current))) as scope:
                apply(grads, trainable_variables)
            return [scope.get_current_value(v) for v in variables]

        def skip():
            with keras.StatelessScope(state_mapping=list(zip(everything, current))) as scope:
                self._skip_effects()
            return [scope.get_current_value(v) for v in variables]

        new = jax.lax.cond(go, run, skip)
        for v, value in zip(variables, new):
            v.assign(value)
