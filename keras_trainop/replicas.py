"""The step under a distribution strategy: one all-reduce, and conds that work per replica."""

import tensorflow as tf

from keras_trainop import _keras_private as private


def in_replica_context():
    """Whether the step runs per replica, under a distribution strategy."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def all_reduce(grads_and_vars):
    """The pairs with each gradient summed over the replicas (None kept as None).

    One all-reduce for all gradients; IndexedSlices stay IndexedSlices.
    """
    present = [i for i, (g, _) in enumerate(grads_and_vars) if g is not None]
    if not present:
        return list(grads_and_vars)
    reduced = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, [grads_and_vars[i][0] for i in present]
    )
    pairs = list(grads_and_vars)
    for i, g in zip(present, reduced):
        pairs[i] = (g, pairs[i][1])
    return pairs


def any_replica(flags):
    """Bool tensor: each flag OR-ed over the replicas (one all-reduce)."""
    context = tf.distribute.get_replica_context()
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(flags, tf.int32)) > 0


def num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def cross_replica_cond(ok, true_fn, false_fn, args):
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


def replica_cond(pred, true_fn, false_fn, args=()):
    """`tf.cond(pred, true_fn(*args), false_fn(*args))`, also where branches call `merge_call`.

    Both branches return nothing. Under a strategy that synchronises through
    `merge_call`, through `cross_replica_cond`; elsewhere a plain `tf.cond`.
    Under a strategy each branch may run once per replica: everything it reads
    travels in `args`, never through a closure.
    """
    if private.needs_merge_call():
        cross_replica_cond(pred, true_fn, false_fn, args)
    else:
        tf.cond(pred, lambda: _then_none(true_fn, args), lambda: _then_none(false_fn, args))


def _then_none(fn, args):
    fn(*args)
