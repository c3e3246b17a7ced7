"""The commit: a step's only writes, under its one decision.

The stages before it computed values; `update` is what a kept step writes:
the transforms' new state, the update ops, the optimizer's
`apply_gradients` and a `global_step` variable's increment (with
accumulation: the sums, or, every k-th step, the rest of the step on their
mean). A failed check writes instead the failure record, the skip policy's
counters, and puts back what was written outside the commit (what the forward
pass wrote: BatchNormalization statistics).

How the update is held back depends on the policy and the mode:

- no check: it runs;
- skip policy, and any policy under XLA (where `Assert` is dropped): one
  `tf.cond(kept, update, reject)`. Under XLA the gate also stays shut after a
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

    def __call__(self, verdict, step, update, args, put_back=(), names=(), on_kept=None, aux=None):
        """The writes of one step. Returns 1.0 if it was skipped, else 0.0 (float32).

        Args:
            verdict: the check's `Verdict`, or None without `check_numerics`.
            step: int64 scalar, the number of this update.
            update: callable writing what a kept step writes, from `args`.
            args: the tensors `update` works on. Under a strategy the update
                may run once per replica: what it reads travels in `args`.
            put_back: `(variable, value)` pairs to assign if the check fails.
            names: the `variable.path` of each checked gradient, for the error.
            on_kept, aux: with the skip policy, `on_kept(aux)` runs only in a
                kept step (the model's metrics: a skipped batch stays out of
                them), in the same cond as the update.
        """
        if self.record is None:
            update(*args)
            return tf.constant(0.0)
        self.record.names = list(names)
        in_xla = private.in_xla_context()
        if self.options.numerics.skip or in_xla:
            return self._gated(verdict, step, update, args, put_back, in_xla, on_kept, aux)
        return self._asserted(verdict, step, update, args, put_back)

    def apply(self, grads_and_vars, state=(), finite=None):
        """What an applied update writes: the transforms' state, the update ops, the optimizer, the global step.

        Args:
            grads_and_vars: the pairs to apply.
            state: `(variable, value before, new value)` of the transforms' state.
            finite: with a loss-scale optimizer, whether what it gets is
                finite (it skips the update otherwise, and the state stays).
        """
        for var, before, new in state:
            var.assign(new if finite is None else tf.where(finite, new, before))
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

    def _gated(self, verdict, step, update, args, put_back, in_xla, on_kept, aux):
        policy, record = self.options.numerics, self.record
        merge = private.needs_merge_call()
        gate = verdict.ok
        if in_xla:
            # Nothing raises inside XLA: no later step of the same call may
            # apply until the caller has read the record.
            gate = tf.logical_and(gate, tf.equal(record.failed_step, 0))
        flags = verdict.checked[0] if verdict.checked is not None else tf.constant(True)
        restored = [v for v, _ in put_back]

        def keep(args, saved, loss_ok, ok, flags, aux):
            del saved, loss_ok, ok, flags
            update(*args)
            if on_kept is not None:
                on_kept(aux)
            if policy.skip:
                record.consecutive.assign(0)

        def reject(args, saved, loss_ok, ok, flags, aux):
            del args, aux
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
        branch_args = (tuple(args), tuple(s for _, s in put_back), verdict.loss_ok, verdict.ok, flags, aux)
        replicas.replica_cond(gate, keep, reject, branch_args)
        if not in_xla and policy.skip and policy.max_consecutive is not None:
            with tf.control_dependencies([tf.convert_to_tensor(record.consecutive)]):
                failures.assertion(
                    record.consecutive <= policy.max_consecutive, step,
                    "(inf or nan) consecutive skips up to step",
                )
        return 1.0 - tf.cast(verdict.ok, tf.float32)

    # -- raise policy, eager and graph: an assertion the update's writes wait for ----

    def _asserted(self, verdict, step, update, args, put_back):
        record, ok = self.record, verdict.ok
        flags = verdict.checked[0] if verdict.checked is not None else tf.constant(True)
        if not private.needs_merge_call():
            # No tf.cond on the way to the update (it would add its latency to
            # every step): the record and what is put back are written with
            # `where`, a few cheap ops.
            bad = self._bad_in_name_order(verdict, flags, merge=False)
            what = None if bad is None else failures.cause(verdict.loss_ok, bad)
            ops = record.write(tf.logical_not(ok), step, what, bad)
            ops += [var.assign(tf.where(ok, tf.convert_to_tensor(var), saved)) for var, saved in put_back]
            failure = tf.group(ops)
        else:
            restored = [v for v, _ in put_back]

            def reject(saved, loss_ok, ok, flags):
                for var, value in zip(restored, saved):
                    var.assign(value)
                bad = self._bad_in_name_order(verdict, flags, merge=True)
                record.write(tf.logical_not(ok), step, failures.cause(loss_ok, bad), bad)

            # Writing the record syncs replicas: not inside a replica-context
            # cond. Each branch runs per replica, on its arguments.
            branch_args = (tuple(s for _, s in put_back), verdict.loss_ok, ok, flags)
            replicas.cross_replica_cond(ok, lambda *a: None, reject, branch_args)
            failure = record.failed_step.read_value()
        # A failed step stops here, before any state change of the update.
        with tf.control_dependencies([failure]):
            check = failures.assertion(ok, step)
        gating.run_after(check, update, args)
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
