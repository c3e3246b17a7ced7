"""Gradient accumulation: one update from the gradients of several micro-batches.

With `gradient_accumulation_steps=k`, each step adds its (reduced, unscaled)
gradients to a sum; every k-th step hands the mean of the k micro-batches on
to the transforms and the optimizer, which apply it once, and the sum starts
again from zero. With a mean loss over equal micro-batches, that mean is the
gradient of one batch k times larger, and the transforms (a clip by global
norm, say) act on it, not on each micro-batch. Without control flow: the new
sums are selected with `tf.where` (the step's commit writes them), and only
the update waits for the k-th step.
"""

import keras
import numpy as np
import tensorflow as tf


class GradientAccumulator:
    """The running sums of the gradients of one step's variables.

    Args:
        steps: int >= 2, the number of micro-batches per update.
    """

    def __init__(self, steps):
        self.steps = steps
        self.sums = []
        self.count = None
        self._built_for = None

    def build(self, variables):
        """Creates one float sum per variable (its shape and dtype) and the counter."""
        ids = [id(v) for v in variables]
        if self._built_for == ids:
            return
        with tf.init_scope():
            # Keras variables: tracked with the model's weights, so saved in
            # `.keras` files and checkpoints; under a strategy the replicas
            # write the same (reduced) values and the first one's count.
            self.sums = [
                keras.Variable(
                    np.zeros(v.shape, tf.as_dtype(v.dtype).as_numpy_dtype),
                    trainable=False,
                    aggregation="only_first_replica",
                    name="accumulated_gradient",
                )
                for v in variables
            ]
            self.count = keras.Variable(
                0, dtype="int64", trainable=False, aggregation="only_first_replica", name="accumulated_steps"
            )
        self._built_for = ids

    @property
    def variables(self):
        return [] if self.count is None else self.sums + [self.count]

    def add(self, grads_and_vars, ok):
        """Adds a micro-batch's gradients, if `ok`, as values; assigns nothing.

        Args:
            grads_and_vars: the micro-batch's `(gradient, variable)` pairs, in
                the order the accumulator was built for (None gradients stay
                None: such a variable gets no update).
            ok: bool scalar; False leaves the sums and the count as they were
                (a non-finite micro-batch adds nothing).

        Returns:
            `(pairs, ready, writes)`: the pairs with the mean gradient of the
            micro-batches so far (the one to apply when `ready`); `ready`,
            True at the k-th added micro-batch, where the sums start again
            from zero; and the `(variable, new value)` writes of the sums and
            the counter, for the step's commit.
        """
        count = tf.convert_to_tensor(self.count)
        added = count + 1
        ready = tf.logical_and(ok, added >= self.steps)
        writes = [(self.count, tf.where(ready, tf.zeros_like(count), tf.where(ok, added, count)))]
        pairs = []
        for (grad, var), acc in zip(grads_and_vars, self.sums):
            if grad is None:
                pairs.append((None, var))
                continue
            current = tf.convert_to_tensor(acc)
            total = _add(current, grad)
            writes.append((acc, tf.where(ready, tf.zeros_like(current), tf.where(ok, total, current))))
            pairs.append((total / tf.cast(self.steps, total.dtype), var))
        return pairs, ready, writes


def _add(dense, grad):
    """`dense + grad`, with an IndexedSlices gradient added row by row (no warning, XLA-safe)."""
    if isinstance(grad, tf.IndexedSlices):
        indices = tf.expand_dims(tf.cast(grad.indices, tf.int64), -1)
        return tf.tensor_scatter_nd_add(dense, indices, tf.cast(grad.values, dense.dtype))
    return dense + tf.cast(grad, dense.dtype)
