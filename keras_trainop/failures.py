"""A step's failure record: which step failed and why, and how the host reports it.

Each step owner has its own record (a model's step, a `create_train_step`;
`create_train_op`, traced anew in every trace of the user's function, one per
optimizer). The step writes it when its check fails: the step's number, what
failed (bits: loss 1, gradients 2, the skip policy's consecutive limit 4) and
one flag per checked gradient. The names of the variables are worked out on
the host, from the flags, only when a failure is reported.

How a failure reaches the user, in every mode:

- an in-graph `tf.debugging.Assert` raises `tf.errors.InvalidArgumentError`
  with `_MARKER` in its text (eager and graph mode); where keras_trainop calls
  the step (fit, `create_train_step` called eagerly) it is turned into a
  `kt.NonFiniteError` (`translate`);
- under XLA nothing raises inside the step: the update is blocked, as is every
  later step's until the record is read, and the host raises after the call
  (`raise_if_failed`; fit does it after every call).
"""

import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_trainop.numerics import NonFiniteError
from keras_trainop.variables import state_variable

MARKER = "keras_trainop: non-finite training step"

# What a failure record says (`failed_what`).
LOSS, GRADIENTS, CONSECUTIVE = 1, 2, 4

_BY_OPTIMIZER = weakref.WeakKeyDictionary()


class FailureRecord:
    """The failure record of one step owner, and the skip policy's counters.

    Args:
        policy: the `NumericsPolicy` of the step.

    Attributes:
        failed_step: int64 variable, 0 or the step that failed.
        failed_what: int32 variable, the bits of what failed.
        skipped_total, consecutive: the skipped steps (only the skip policy
            counts them; then they are saved with a model, so a resumed run
            goes on counting where it stopped).
    """

    @classmethod
    def for_optimizer(cls, optimizer, policy):
        """The record of `create_train_op` steps with `optimizer` (one per optimizer)."""
        record = _BY_OPTIMIZER.get(optimizer)
        if record is None:
            record = _BY_OPTIMIZER[optimizer] = cls(policy)
        record._skip = record._skip or policy.skip
        record.max_consecutive = policy.max_consecutive
        return record

    @classmethod
    def of_optimizer(cls, optimizer):
        return _BY_OPTIMIZER.get(optimizer)

    def __init__(self, policy):
        self.failed_step = state_variable(0, tf.int64, "keras_trainop_failed_step")
        self.failed_what = state_variable(0, tf.int32, "keras_trainop_failed_what")
        self._skip = policy.skip
        with tf.init_scope():
            self.skipped_total = _counter("skipped_steps_total")
            self.consecutive = _counter("consecutive_skipped_steps")
        self._flags = {}
        self.names = []  # the variable.path of each checked gradient, for the error
        self.max_consecutive = policy.max_consecutive

    @property
    def counters(self):
        """The skip policy's counters (saved with a model), or [] without the skip policy."""
        return [self.skipped_total, self.consecutive] if self._skip else []

    def flags_variable(self, size):
        if size not in self._flags:
            self._flags[size] = state_variable(
                np.zeros([size], bool), tf.bool, "keras_trainop_bad_gradients"
            )
        return self._flags[size]

    # -- in the step --------------------------------------------------------

    def write(self, write, step, what=None, bad=None):
        """Writes the record where the bool scalar `write` is True; returns the assign ops.

        Args:
            write: whether to record this step.
            step: int64 scalar, the step's number.
            what: int32 scalar, the bits of what failed; None when only the
                loss is checked (a record without bits says "loss": two ops
                less on every step of the default policy).
            bad: None, or the bool vector of non-finite gradients in name order.
        """
        ops = [self.failed_step.assign(tf.where(write, step, self.failed_step))]
        if what is not None:
            ops.append(self.failed_what.assign(tf.where(write, what, self.failed_what)))
        if bad is not None:
            flags = self.flags_variable(len(self.names))
            ops.append(flags.assign(tf.where(write, bad, flags)))
        return ops

    # -- on the host ----------------------------------------------------------

    def take(self):
        """Returns `(step, what_bits, variable_names)` and clears the record."""
        step = int(self.failed_step.numpy())
        if not step:
            return 0, 0, []
        what = int(self.failed_what.numpy()) or LOSS  # no bits: only the loss is checked
        names = []
        if what & GRADIENTS and len(self.names) in self._flags:
            flags = self._flags[len(self.names)].numpy()
            names = [n for n, bad in zip(self.names, flags) if bad]
        self.failed_step.assign(0)
        self.failed_what.assign(0)
        return step, what, names

    def error(self, cause=None):
        """The `NonFiniteError` of the recorded failure (clearing it), or None."""
        step, what, names = self.take()
        if not step:
            return None
        kinds = ("loss" if what & LOSS else "") + (" gradients" if what & GRADIENTS else "")
        kinds = {"loss": "loss", " gradients": "gradients"}.get(kinds, "loss and gradients")
        consecutive = self.max_consecutive + 1 if what & CONSECUTIVE else None
        return NonFiniteError(step, kinds, names, consecutive=consecutive, cause=cause)

    def raise_if_failed(self):
        error = self.error()
        if error is not None:
            raise error

    def translate(self, error):
        """Turns the `Assert` error of a failed step into a `NonFiniteError` (else returns it)."""
        if MARKER not in str(error):
            return error
        return self.error(cause=error) or error

    def call_translating(self, function, *args, **kwargs):
        """`function(*args, **kwargs)`, raising a failed step's `NonFiniteError`."""
        try:
            return function(*args, **kwargs)
        except tf.errors.InvalidArgumentError as e:
            translated = e if isinstance(e, NonFiniteError) else self.translate(e)
            if translated is e:
                raise
            raise translated from e


def cause(loss_ok, bad=None):
    """The `what` bits of a failure: `LOSS` unless `loss_ok`, `GRADIENTS` if any of `bad`."""
    what = tf.where(loss_ok, 0, LOSS)
    if bad is not None:
        what += tf.where(tf.reduce_any(bad), GRADIENTS, 0)
    return what


def in_name_order(bad, indices, count):
    """`bad[j]` placed at `indices[j]` of a vector of `count` flags (False elsewhere)."""
    position = {i: j for j, i in enumerate(indices)}
    padded = tf.concat([bad, [False]], 0)
    return tf.gather(padded, [position.get(i, len(indices)) for i in range(count)])


def assertion(ok, step, what="(inf or nan) at step"):
    """The in-graph check: raises, with `MARKER`, where `ok` is False (not under XLA)."""
    # String and int32 data keep `Assert` a single op: with any other dtype TF
    # wraps it in a tf.cond ("AssertGuard"), which would hold back the update.
    return tf.debugging.Assert(ok, [MARKER, what, tf.cast(step, tf.int32)])


def _counter(name):
    return keras.Variable(0, dtype="int64", trainable=False, aggregation="only_first_replica", name=name)
