"""The commit: a step's only writes, under its one decision.

The stages before it computed values. The commit writes them:

- the update, when the step applies: the update ops, the optimizer's
  `apply_gradients`, and a `global_step` variable's increment;
- the transforms' new state, selected with `tf.where` (it moves only when the
  update is applied) and the gradient sums and counter of accumulation;
- when the check failed: the failure record, the skip policy's counters, and
  what the forward pass wrote (BatchNormalization statistics) put back.

How the update is held back depends on the policy and the mode:

- no check: it runs (under `tf.cond(ready)` when accumulating);
- skip policy, and any policy under XLA (where `Assert` is dropped): one
  `tf.cond(gate, apply, reject)`. Under XLA the gate also stays shut after a
  failure until the host has read the record, so no later step of the same
  call applies;
- raise policy in eager and graph mode: an in-graph `Assert` of the verdict,
  and every state change of the update waits for it (`gating.run_after`); the
  update's arithmetic does not, and it is not inside a `tf.cond`.
"""

import functools

import keras
import tensorflow as tf

from keras_trainop import _keras_private as private
from keras_trainop import failures
from keras_trainop import gating
from keras_trainop import replicas
from keras_trainop.options import USE_GLOBAL_STEP


def all_of(*flags):
    """The conjunction of the bool scalars that are not None; None if all are."""
    flags = [f for f in flags if f is not None]
    return functools.reduce(tf.logical_and, flags) if flags else None


class Decision:
    """What a step's commit decides on.

    Args:
        verdict: the check's `Verdict`, or None without `check_numerics`.
        ready: with accumulation, whether this step updates (else None).
        finite: with a loss-scale optimizer that is handed unscaled values,
            whether what it gets is finite: it skips the update otherwise.
    """

    def __init__(self, verdict=None, ready=None, finite=None):
        self.verdict = verdict
        self.ready = ready
        self.finite = finite

    @property
    def ok(self):
        return None if self.verdict is None else self.verdict.ok

    @property
    def applies(self):
        """Whether the optimizer's update will be applied (None: always)."""
        return all_of(self.ok, self.ready, self.finite)


class Commit:
    """Writes one step's results for a pipeline.

    Args:
        options: the step's `TrainOptions`.
        optimizer: its Keras optimizer.
        record: its `FailureRecord`, or None without `check_numerics`.
    """

    def __init__(self, options, optimizer, record):
        self.options = options
        self.optimizer = optimizer
        self.record = record

    def __call__(self, decision, step, grads_and_vars, state, sums, forward, names):
        """The writes of one step. Returns 1.0 if it was skipped, else 0.0 (float32).

        Args:
            decision: the step's `Decision`.
            step: int64 scalar, the number of this update.
            grads_and_vars: the pairs to apply.
            state: `(variable, value before, new value)` of the transforms' state.
            sums: `(variable, new value)` of the accumulation's sums.
            forward: `(variable, value before the forward pass)` to put back on failure.
            names: the `variable.path` of each checked gradient, for the error.
        """
        in_xla = private.in_xla_context()
        policy = self.options.numerics
        skip_or_xla = self.record is not None and (policy.skip or in_xla)
        gate = decision.ok
        if skip_or_xla and in_xla:
            # Nothing raises inside XLA: no later step of the same call may
            # apply until the caller has read the record.
            gate = tf.logical_and(gate, tf.equal(self.record.failed_step, 0))
        applies = all_of(gate, decision.ready, decision.finite)
        for var, value in sums:
            var.assign(value)
        # The transforms' state moves only with an applied update. (A transform
        # that assigns its own state has already: this puts it back.)
        state_written = [
            var.assign(new if applies is None else tf.where(applies, new, before))
            for var, before, new in state
        ]
        if self.record is None:
            self._update(grads_and_vars, decision.ready)
            return tf.constant(0.0)
        self.record.names = list(names)
        if skip_or_xla:
            return self._gated(decision, gate, step, grads_and_vars, forward, in_xla)
        return self._asserted(decision, step, grads_and_vars, forward, state_written)

    # -- the update --------------------------------------------------------

    def _update(self, grads_and_vars, ready=None):
        """The update ops, the optimizer's update and the global step; every k-th step with accumulation."""
        if ready is None:
            self._apply(grads_and_vars)
        else:
            # A cond: the optimizer's update is the expensive part, and it
            # changes its own state.
            replicas.replica_cond(ready, self._apply, lambda *a: None, (grads_and_vars,))

    def _apply(self, grads_and_vars):
        outputs = [op() for op in self.options.update_ops]
        with tf.control_dependencies(_control_inputs(outputs)):
            counter = self.options.global_step
            if counter is None or counter is USE_GLOBAL_STEP:
                self.optimizer.apply_gradients(grads_and_vars)
                return
            iterations_before = tf.convert_to_tensor(self.optimizer.iterations)
            self.optimizer.apply_gradients(grads_and_vars)
            # +1 per update the optimizer really applied (a loss-scale
            # optimizer skips overflowing steps without counting them).
            applied = tf.convert_to_tensor(self.optimizer.iterations) - iterations_before
            counter.assign_add(tf.cast(applied, counter.dtype))

    # -- skip policy, and XLA: one cond -----------------------------------------

    def _gated(self, decision, gate, step, grads_and_vars, forward, in_xla):
        policy, record = self.options.numerics, self.record
        verdict = decision.verdict
        merge = private.needs_merge_call()
        flags = verdict.checked[0] if verdict.checked is not None else tf.constant(True)
        restored = [v for v, _ in forward]

        def apply(grads_and_vars, saved, loss_ok, ok, flags):
            del saved, loss_ok, ok, flags
            self._update(grads_and_vars, decision.ready)
            if policy.skip:
                record.consecutive.assign(0)

        def reject(grads_and_vars, saved, loss_ok, ok, flags):
            del grads_and_vars
            for var, value in zip(restored, saved):
                var.assign(value)
            failed = tf.logical_not(ok)  # False for a step blocked by an earlier failure
            bad = self._bad_in_name_order(verdict, flags, merge)
            what = failures.cause(loss_ok, bad)
            if policy.skip:
                record.skipped_total.assign_add(tf.cast(failed, tf.int64))
                record.consecutive.assign_add(tf.cast(failed, tf.int64))
                if policy.max_consecutive is None:
                    return
                over = record.consecutive > policy.max_consecutive
                what = tf.where(over, what + failures.CONSECUTIVE, what)
                failed = tf.logical_and(failed, over)
            # Under XLA keep the first failure of the call (later steps were
            # blocked because of it); elsewhere this step raises now.
            first = tf.logical_or(tf.equal(record.failed_step, 0), not in_xla)
            record.write(tf.logical_and(failed, first), step, what, bad)

        # Under a strategy each branch runs once per replica: everything it
        # reads travels as an argument, never through a closure.
        args = (grads_and_vars, tuple(s for _, s in forward), verdict.loss_ok, verdict.ok, flags)
        replicas.replica_cond(gate, apply, reject, args)
        if not in_xla and policy.skip and policy.max_consecutive is not None:
            with tf.control_dependencies([tf.convert_to_tensor(record.consecutive)]):
                failures.assertion(
                    record.consecutive <= policy.max_consecutive, step,
                    "(inf or nan) consecutive skips up to step",
                )
        return 1.0 - tf.cast(verdict.ok, tf.float32)

    # -- raise policy, eager and graph: an assertion the update's writes wait for ----

    def _asserted(self, decision, step, grads_and_vars, forward, state_written):
        record, verdict = self.record, decision.verdict
        ok = verdict.ok
        flags = verdict.checked[0] if verdict.checked is not None else tf.constant(True)
        if not private.needs_merge_call():
            # No tf.cond on the way to the update (it would add its latency to
            # every step): the record and the forward pass's state are written
            # with `where`, a few cheap ops.
            bad = self._bad_in_name_order(verdict, flags, merge=False)
            ops = record.write(tf.logical_not(ok), step, failures.cause(verdict.loss_ok, bad), bad)
            ops += [var.assign(tf.where(ok, tf.convert_to_tensor(var), saved)) for var, saved in forward]
            failure = tf.group(ops + state_written)
        else:
            restored = [v for v, _ in forward]

            def reject(saved, loss_ok, ok, flags):
                for var, value in zip(restored, saved):
                    var.assign(value)
                bad = self._bad_in_name_order(verdict, flags, merge=True)
                record.write(tf.logical_not(ok), step, failures.cause(loss_ok, bad), bad)

            # Writing the record syncs replicas: not inside a replica-context
            # cond. Each branch runs per replica, on its arguments.
            args = (tuple(s for _, s in forward), verdict.loss_ok, ok, flags)
            replicas.cross_replica_cond(ok, lambda *a: None, reject, args)
            failure = tf.group([record.failed_step.read_value()] + state_written)
        # A failed step stops here, before any state change of the update.
        with tf.control_dependencies([failure]):
            check = failures.assertion(ok, step)
        gating.run_after(check, self._update, (grads_and_vars, decision.ready))
        return tf.constant(0.0)

    def _bad_in_name_order(self, verdict, flags, merge):
        """The non-finite gradients, one flag per checked name (None if gradients are not checked)."""
        if verdict.checked is None:
            return None
        bad = tf.logical_not(flags)
        if merge:
            bad = replicas.any_replica(bad)  # a gradient bad on any replica is named
        return failures.in_name_order(bad, verdict.checked[1], len(self.record.names))


def _control_inputs(outputs):
    """The tensors and ops among what update ops returned, to order the apply after."""
    deps = []
    for out in tf.nest.flatten(outputs, expand_composites=False):
        if isinstance(out, (tf.Tensor, tf.Operation)):
            deps.append(out)
        elif isinstance(out, (tf.Variable, keras.Variable)):
            deps.append(tf.convert_to_tensor(out))
    return deps
