"""Whether a step's loss and gradients are finite: one verdict per step, in few ops.

`tf.debugging.check_numerics` is not enough: in TF1 graph mode it did not
block the update, and under XLA it is silently dropped. The step computes one
flag instead (the loss, and with `check_numerics="all"` or the skip policy
every gradient, in a few grouped sums), and the commit decides on it.
"""

import collections

import tensorflow as tf

from keras_trainop import _keras_private as private
from keras_trainop.replicas import any_replica
from keras_trainop.summaries import gradient_values


class Verdict(collections.namedtuple("Verdict", ["checked", "loss_ok", "ok"])):
    """A step's finiteness: `ok` (bool scalar: the step may apply), `loss_ok`,
    and `checked`, None or a `(flags, indices)` pair: a bool vector (True:
    finite) and the index among the gradients given (None gradients are not
    checked) of each flag's gradient."""


def verdict(policy, loss, grads):
    """Whether the step is finite, as `policy` (a `NumericsPolicy`) asks.

    Args:
        policy: the `NumericsPolicy`.
        loss: the unscaled scalar loss.
        grads: the gradients to check (None entries allowed), if the policy
            checks gradients.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    loss_ok, ok, checked = tf.reduce_all(tf.math.is_finite(loss)), None, None
    if policy.check_gradients and present:
        flags, order = gradient_flags([gradient_values(grads[i]) for i in present])
        checked = (flags, [present[j] for j in order])
        ok = tf.logical_and(loss_ok, tf.reduce_all(flags))
    ok = loss_ok if ok is None else ok
    if private.needs_merge_call():
        # Every replica must take the same decision (finite only if all are)
        # and report the same cause.
        bad = any_replica(tf.stack([tf.logical_not(ok), tf.logical_not(loss_ok)]))
        ok, loss_ok = tf.unstack(tf.logical_not(bad))
    return Verdict(checked, loss_ok, ok)


def all_finite(tensors):
    """A scalar bool tensor: True when every element of every tensor is finite.

    The same grouped sums as the gradient check (`gradient_flags`), reduced.
    """
    return tf.reduce_all(gradient_flags(tensors)[0])


_IN_PLACE = 1 << 16  # elements: a larger gradient is checked where it is, not copied


def gradient_flags(grads):
    """Per-tensor finiteness of `grads` (no None), in few ops whatever their number.

    A large gradient is reduced where it is; small ones are stacked per
    (dtype, shape), one reduction per group that keeps one flag per tensor.
    Each reduction is a plain sum: a sum is finite only if every element is,
    and a float sum is several times faster on a CPU than
    `reduce_all(is_finite(x))` (a bool reduction) or a sum of `x * 0` (a
    second pass). A sum of finite elements can still overflow, so when any
    sum is not finite the flags are worked out again, exactly, from sums of
    `x * 0` (0 where every element is finite, nan otherwise, and a sum of
    zeros cannot overflow), in a `tf.cond` branch that a finite step never
    runs. A nested XLA cluster would fuse it all into one kernel, but its
    launch waits for every gradient and measured slower on a CPU than these
    few ops.

    Returns:
        `(flags, order)`: a bool vector with one flag per gradient, True when
        finite, and the index in `grads` of each flag.
    """
    parts, order, groups = [], [], {}  # parts: (tensor, axes to reduce)
    for i, t in enumerate(grads):
        size = t.shape.num_elements()
        if size is not None and size <= _IN_PLACE:
            groups.setdefault((t.dtype, tuple(t.shape)), []).append(i)
        else:
            parts.append((tf.reshape(t, [1, -1]), [1]))
            order.append(i)
    for (_, shape), indices in groups.items():
        members = [grads[i] for i in indices]
        # One member: a reshape, not a copy.
        stacked = tf.stack(members) if len(members) > 1 else tf.expand_dims(members[0], 0)
        parts.append((stacked, list(range(1, len(shape) + 1))))
        order.extend(indices)

    def flags_of(reduce):
        flags = [tf.math.is_finite(reduce(t, axes)) for t, axes in parts]
        return flags[0] if len(flags) == 1 else tf.concat(flags, 0)

    quick = flags_of(tf.reduce_sum)
    flags = tf.cond(tf.reduce_all(quick), lambda: quick, lambda: flags_of(_sum_of_zeros))
    return flags, order


def _sum_of_zeros(t, axes):
    # x * 0 is 0 where x is finite and nan elsewhere; a sum of zeros cannot overflow.
    return tf.reduce_sum(t * tf.zeros([], t.dtype), axis=axes)
