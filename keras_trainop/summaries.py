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
