"""Finiteness: block a non-finite step before it reaches any variable, then say so.

`tf.debugging.check_numerics` is not enough: in TF1 graph mode it did not
block the update, and under XLA it is silently dropped. keras_trainop instead
computes one finiteness flag, runs the whole update under
`tf.cond(flag, update, record_failure)`, and raises `NonFiniteError` after
the step:

- eagerly and in graph mode, an in-graph `tf.debugging.Assert` raises at the
  failing step (no host synchronisation on the success path);
- under XLA, where `Assert` is dropped too, the failing step is recorded in a
  variable, every later step of the same execution is blocked as well, and
  the caller reads the record after each call (`raise_if_failed`).
"""

import weakref

import tensorflow as tf

from keras_trainop import _keras_private as private

_MARKER = "keras_trainop: non-finite training step"


def _cross_replica_cond(ok, true_fn, false_fn, args):
    """`tf.cond(ok, true_fn(*args), false_fn(*args))` around code that calls `merge_call`.

    A strategy that synchronises through `merge_call` (MirroredStrategy on CPU,
    for one) cannot run a `tf.cond` in replica context whose branch calls it,
    and `optimizer.apply_gradients` does. As Keras's LossScaleOptimizer does,
    the cond runs in cross-replica context and each branch runs per replica.
    """

    def cross_replica(distribution, ok, args):
        ok = distribution.experimental_local_results(ok)[0]

        def per_replica(fn):
            return lambda: distribution.extended.call_for_each_replica(fn, args=args)

        tf.cond(ok, per_replica(true_fn), per_replica(false_fn))

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(ok, args))


class NonFiniteError(tf.errors.InvalidArgumentError):
    """A training step met an inf or nan; its update was not applied.

    A subclass of `tf.errors.InvalidArgumentError`, the error TF1's
    `check_numerics` raised, so existing `except` clauses keep working.

    Attributes:
        step: the 1-based number of the failing step (`optimizer.iterations`
            after the step, had it been applied).
        what: what was not finite, e.g. `"loss"`.
    """

    def __init__(self, step, what="loss", cause=None):
        self.step = step
        self.what = what
        message = (
            f"keras_trainop: the {what} is inf or nan at step {step}. The update of "
            f"step {step} was not applied: weights, optimizer state and "
            "`iterations` are as they were before it."
        )
        super().__init__(None, None, message)
        self.__cause__ = cause


def all_finite(tensors):
    """A scalar bool tensor: True when every element of every tensor is finite."""
    flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors]
    return flags[0] if len(flags) == 1 else tf.reduce_all(tf.stack(flags))


_GUARDS = weakref.WeakKeyDictionary()


class FailureGuard:
    """Records the failing step and turns it into a `NonFiniteError`.

    The record is a non-trainable int64 variable outside the model's weights:
    0 when no step failed, else the number of the failing step. There is one
    guard per optimizer (`FailureGuard.for_optimizer`), so that a step traced
    again (as `tf.function` does) reuses its variable instead of creating one.
    """

    @classmethod
    def for_optimizer(cls, optimizer):
        guard = _GUARDS.get(optimizer)
        if guard is None:
            guard = _GUARDS[optimizer] = cls()
        return guard

    def __init__(self):
        with tf.init_scope():
            self.failed_step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="keras_trainop_failed_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def guard(self, finite, step, update, restore=None, args=(), in_xla=False):
        """Runs `update(*args)` only if `finite` (under XLA: and no step failed before).

        Args:
            finite: scalar bool tensor.
            step: int64 scalar, the number of this step.
            update: callable doing the whole update from `args`.
            restore: optional callable run with `args` instead, on failure
                (puts back state that the forward pass changed).
            args: the tensors `update` and `restore` work on. They are passed
                explicitly because under a distribution strategy both run once
                per replica, each on its own replica's values.
            in_xla: whether the step is being compiled by XLA, where
                `Assert` does nothing.
        """
        if private.needs_merge_call():
            # Every replica must take the same branch: finite only if all are.
            context = tf.distribute.get_replica_context()
            bad = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(~finite, tf.int32))
            finite = tf.equal(bad, 0)
        ok = finite
        if in_xla:
            # Nothing raises inside XLA: later steps of the same call must not
            # apply either, until the caller has read the record.
            ok = tf.logical_and(finite, tf.equal(self.failed_step, 0))

        def on_failure(*args):
            if restore is not None:
                restore(*args)
            if in_xla:
                # Keep the first failure of the call: the later steps were
                # blocked because of it.
                return tf.where(tf.equal(self.failed_step, 0), step, self.failed_step)
            # The Assert below raises now; a record left over from a failure
            # caught inside the user's own tf.function must not win.
            return step

        def record_failure(*args):
            self.failed_step.assign(on_failure(*args))

        if private.needs_merge_call():
            _cross_replica_cond(ok, update, record_failure, args)
        else:
            tf.cond(ok, lambda: update(*args), lambda: record_failure(*args))
        if not in_xla:
            with tf.control_dependencies([self.failed_step.read_value()]):
                tf.debugging.Assert(finite, [_MARKER, "(inf or nan) at step", step])

    def take_failure(self):
        """Returns the recorded failing step (0 if none) and clears the record."""
        step = int(self.failed_step.numpy())
        if step:
            self.failed_step.assign(0)
        return step

    def raise_if_failed(self):
        step = self.take_failure()
        if step:
            raise NonFiniteError(step)

    def translate(self, error):
        """Turns the `Assert` error of a failed step into a `NonFiniteError`."""
        if _MARKER not in str(error):
            return error
        step = self.take_failure()
        return NonFiniteError(step, cause=error)

    def wrap(self, function, host_check):
        """Wraps a train function so that a failed step raises `NonFiniteError`.

        Args:
            function: the callable to wrap.
            host_check: read the failure record after every call (needed
                under XLA only).
        """

        def checked(*args, **kwargs):
            try:
                result = function(*args, **kwargs)
            except tf.errors.InvalidArgumentError as e:
                translated = e if isinstance(e, NonFiniteError) else self.translate(e)
                if translated is e:
                    raise
                raise translated from e
            if host_check:
                self.raise_if_failed()
            return result

        checked.__wrapped__ = function
        return checked
