"""Gradient statistics on the JAX and PyTorch backends: recorded by the step, written by the host.

As on TensorFlow (`keras_trainop.telemetry`), an update that a reader wants
(its number a multiple of the reader's `every`) has its statistics computed
inside the step into a small ring buffer, and the host writes them after the
call at their exact steps, through the same readers (`telemetry.Reader`). The
buffer's variables ride in the step's state like the rest of it, and only an
applied update writes them. Writing the event files is the one place where
the JAX backend uses TensorFlow (`tf.summary`), as `keras.callbacks.TensorBoard`
does on JAX.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_trainop.summaries import BUCKETS, variable_name
from keras_trainop.telemetry import Record


def histogram_buckets(values, buckets=BUCKETS):
    """`summaries.histogram_buckets` in `keras.ops`: `[buckets, 3]` of left edge, right edge, count."""
    flat = ops.reshape(ops.cast(values, "float32"), [-1])
    finite = ops.isfinite(flat)
    safe = ops.where(finite, flat, 0.0)
    big = 3.0e38
    low = ops.min(ops.where(finite, flat, big))
    high = ops.max(ops.where(finite, flat, -big))
    any_finite = ops.any(finite)
    low = ops.where(any_finite, low, 0.0)
    high = ops.where(any_finite, high, 0.0)
    singular = low == high
    low = ops.where(singular, low - 0.5, low)
    high = ops.where(singular, high + 0.5, high)
    width = (high - low) / buckets
    index = ops.clip(ops.cast(ops.floor((safe - low) / width), "int32"), 0, buckets - 1)
    counts = ops.segment_sum(ops.cast(finite, "float32"), index, num_segments=buckets)
    edges = low + width * ops.arange(buckets + 1, dtype="float32")
    return ops.stack([edges[:-1], edges[1:], counts], axis=1)


def global_norm(grads):
    return ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads))


class GradientBuffer:
    """The ring buffer one configuration of readers records into.

    Records are made at multiples of `stride` (the greatest common divisor of
    the readers' `every`), at most `slots - 1` in one call of
    `steps_per_call` steps; record `step` goes to slot `(step // stride) % slots`.

    Args:
        steps_per_call: the model's `steps_per_execution`.
        readers: the readers recorded for.
        variables: the variables whose gradients are recorded.
        transformed: whether there are transforms (a clipped norm exists).
    """

    def __init__(self, steps_per_call, readers, variables, transformed):
        self.readers = list(readers)
        self.everies = sorted({r.every for r in self.readers})
        self.stride = math.gcd(*self.everies)
        self.slots = -(-steps_per_call // self.stride) + 1
        self.names = [variable_name(v) for v in variables]
        self.transformed = transformed
        self.histograms = any(r.histograms for r in self.readers)
        self.norms = any(r.norms for r in self.readers)
        k, n = self.slots, len(variables)
        shapes = {
            "step": ((k,), "int32"), "summary_step": ((k,), "int32"), "global": ((k, 2), "float32"),
            "norms": ((k, n if self.norms else 0), "float32"),
            "histograms": ((k, n if self.histograms else 0, BUCKETS, 3), "float32"),
        }
        self.variables = [
            keras.Variable(np.zeros(shape, dtype), trainable=False, name=f"keras_trainop_recorded_{name}")
            for name, (shape, dtype) in shapes.items()
        ]

    def record(self, old, step, summary_step, before, after, applies):
        """The buffer's new values: this update's statistics in its slot if a reader wants them."""
        due = ops.any(ops.stack([step % every == 0 for every in self.everies]))
        if applies is not None:
            due = due & applies

        def write():
            grads = [g for g, _ in after]
            before_norm = global_norm([g for g, _ in before])
            after_norm = global_norm(grads) if self.transformed else before_norm
            rows = [step, summary_step, ops.stack([before_norm, after_norm])]
            rows.append(ops.stack([global_norm([g]) for g in grads]) if self.norms else old[3][0])
            rows.append(ops.stack([histogram_buckets(g) for g in grads]) if self.histograms else old[4][0])
            slot = (step // self.stride) % self.slots
            here = ops.arange(self.slots) == slot
            return [
                ops.where(ops.reshape(here, (-1,) + (1,) * (len(o.shape) - 1)), ops.cast(r, o.dtype)[None], o)
                for r, o in zip(rows, old)
            ]

        return ops.cond(due, write, lambda: list(old))

    def read(self, values, after):
        """The records of updates after `after`, in step order (host side), from the buffer's values."""
        steps, summary_steps, global_norms, norms, histograms = (ops.convert_to_numpy(v) for v in values)
        order = sorted((int(s), i) for i, s in enumerate(steps) if s > after)
        return [
            Record(step, int(summary_steps[i]), global_norms[i], norms[i],
                   histograms[i] if self.histograms else None, self.names, self.transformed)
            for step, i in order
        ]
