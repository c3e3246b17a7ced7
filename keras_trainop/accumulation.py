"""Gradient accumulation: one update from the gradients of several micro-batches.

With `gradient_accumulation_steps=k`, every step whose check passes either
adds its (reduced, unscaled) gradients to the sums, or, at the k-th, hands the
mean of the k micro-batches to the rest of the step (the transforms, the
statistics, the optimizer), which applies it once, and the sums start again
from zero. With a mean loss over equal micro-batches, that mean is the
gradient of one batch k times larger, and the transforms (a clip by global
norm, say) act on it, not on each micro-batch. One `tf.cond(ready, update,
add)` per step, as Keras's own `gradient_accumulation_steps`: the
accumulating steps pay for the sums only.
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

    def ready(self):
        """Whether this micro-batch completes an update (bool scalar; read before `add` or `mean`)."""
        return tf.convert_to_tensor(self.count) + 1 >= self.steps

    def add(self, grads_and_vars):
        """Adds a micro-batch's gradients to the sums (a step that does not update)."""
        for (grad, _), acc in zip(grads_and_vars, self.sums):
            if isinstance(grad, tf.IndexedSlices):
                acc.assign(_add(tf.convert_to_tensor(acc), grad))
            elif grad is not None:
                acc.assign_add(tf.cast(grad, acc.dtype))
        self.count.assign_add(1)

    def mean(self, grads_and_vars):
        """The pairs with the mean gradient of the micro-batches, this one included.

        None gradients stay None: such a variable gets no update.
        """
        pairs = []
        for (grad, var), acc in zip(grads_and_vars, self.sums):
            if grad is None:
                pairs.append((None, var))
                continue
            total = _add(tf.convert_to_tensor(acc), grad)
            pairs.append((total / tf.cast(self.steps, total.dtype), var))
        return pairs

    def reset(self):
        """The sums and the counter start again from zero (after an update)."""
        for acc in self.sums:
            acc.assign(tf.zeros_like(acc))
        self.count.assign(0)


def _add(dense, grad):
    """`dense + grad`, with an IndexedSlices gradient added row by row (no warning, XLA-safe)."""
    if isinstance(grad, tf.IndexedSlices):
        indices = tf.expand_dims(tf.cast(grad.indices, tf.int64), -1)
        return tf.tensor_scatter_nd_add(dense, indices, tf.cast(grad.values, dense.dtype))
    return dense + tf.cast(grad, dense.dtype)
