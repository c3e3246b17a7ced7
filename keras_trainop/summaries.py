"""Gradient summaries: tag names and the `tf.summary` calls.

Tags follow slim's `<variable>/gradient` convention with Keras's stable
`variable.path` as the variable name, so that they sit next to the
`<path>/histogram` weight histograms of `keras.callbacks.TensorBoard`:

- histogram `<variable.path>/gradient`
- scalar `<variable.path>/gradient_norm` (the L2 norm of that one gradient;
  for IndexedSlices, of its `.values`, as in TF1)

`tf.summary` writes only when a default writer is active when the step is
traced. With no writer the ops are never built, so the option costs nothing.
"""

import logging

import tensorflow as tf

logger = logging.getLogger("keras_trainop")


def variable_name(variable):
    """The stable name of a variable: Keras's `path`, else the TF name without `:0`."""
    path = getattr(variable, "path", None)
    if path:
        return path
    name = variable.name
    return name[: -len(":0")] if name.endswith(":0") else name


def gradient_values(grad):
    """The dense values of a gradient (`.values` for IndexedSlices)."""
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def histogram_tag(variable):
    return f"{variable_name(variable)}/gradient"


def norm_tag(variable):
    return f"{variable_name(variable)}/gradient_norm"


def add_gradients_summaries(grads_and_vars, step=None):
    """Writes a histogram and a norm scalar per gradient, as TF1 did.

    Args:
        grads_and_vars: a list of `(gradient, variable)` pairs. A None gradient
            is logged at INFO level ("Var ... has no gradient") and skipped.
        step: the summary step; None uses `tf.summary.experimental.get_step()`.

    Returns:
        The list of the `tf.summary` results (bool tensors: whether each
        summary was written), two per non-None gradient.
    """
    results = []
    for grad, var in grads_and_vars:
        if grad is None:
            logger.info("Var %s has no gradient", variable_name(var))
            continue
        values = gradient_values(grad)
        # Tags are set explicitly so that an enclosing name scope cannot change them.
        with tf.name_scope(""):
            results.append(tf.summary.histogram(histogram_tag(var), values, step=step))
            results.append(
                tf.summary.scalar(
                    norm_tag(var), tf.linalg.global_norm([values]), step=step
                )
            )
    return results


# -- statistics computed in the step, written by the host -------------------------------
#
# `tf.summary` cannot run under XLA, and inside a traced step it writes at the
# step frozen at trace time. GradientTensorBoard therefore has the step compute
# its statistics with XLA-compatible ops into variables, and writes them from
# the host after the call, at the exact step.

BUCKETS = 30  # TensorBoard's default number of histogram buckets


def histogram_buckets(values, buckets=BUCKETS):
    """A TensorBoard histogram of the finite elements of `values`, XLA-compatible.

    Returns a float32 tensor of shape [buckets, 3]: left edge, right edge, count,
    with equal-width buckets between the smallest and the largest finite value
    (the last bucket includes its right edge). Non-finite elements are left out.
    If all finite values are equal, the buckets span [value - 0.5, value + 0.5]
    and the middle one holds them. With no finite value, all counts are 0.
    """
    flat = tf.reshape(tf.cast(values, tf.float32), [-1])
    finite = tf.math.is_finite(flat)
    safe = tf.where(finite, flat, tf.zeros_like(flat))
    big = tf.constant(3.0e38, tf.float32)
    low = tf.reduce_min(tf.where(finite, flat, big))
    high = tf.reduce_max(tf.where(finite, flat, -big))
    any_finite = tf.reduce_any(finite)
    low = tf.where(any_finite, low, 0.0)
    high = tf.where(any_finite, high, 0.0)
    singular = tf.equal(low, high)
    low = tf.where(singular, low - 0.5, low)
    high = tf.where(singular, high + 0.5, high)
    width = (high - low) / buckets
    index = tf.cast(tf.floor((safe - low) / width), tf.int32)
    index = tf.clip_by_value(index, 0, buckets - 1)
    counts = tf.math.unsorted_segment_sum(tf.cast(finite, tf.float32), index, buckets)
    edges = low + width * tf.range(buckets + 1, dtype=tf.float32)
    return tf.stack([edges[:-1], edges[1:], counts], axis=1)


def write_histogram(tag, buckets, step):
    """Writes precomputed `[k, 3]` buckets as a TensorBoard histogram (host side)."""
    from tensorboard.plugins.histogram import metadata

    return tf.summary.write(
        tag=tag,
        tensor=tf.cast(buckets, tf.float64),
        step=step,
        metadata=metadata.create_summary_metadata(display_name=tag, description=None),
    )
