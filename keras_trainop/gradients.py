"""Gradients: `GradientTape`, or TF1's `gradients` where TF1's options must act.

`tf.GradientTape.gradient` has no `aggregation_method`, no gating and no
colocation, so those options go through `tf.compat.v1.gradients` (TF1's own,
which TF2's `tf.gradients` wraps without `colocate_gradients_with_ops`). It
only exists in graph mode (inside a `tf.function`, XLA included). Both give
the same values; the tape is the fallback when eager, with a warning that the
options cannot act there.
"""

import warnings

import tensorflow as tf

from keras_trainop.options import GATE_GRAPH, GATE_OP

def warn_once(warned, key, message):
    """Warns the first time `key` is added to the set `warned` (one per step owner)."""
    if key not in warned:
        warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def gradient_sources(variables):
    """What to differentiate with respect to: the TF variable under a Keras one.

    Passing the variable itself (not a fresh read of it) keeps the gradient
    connected to the reads the forward pass made.
    """
    import keras

    return [v.value if isinstance(v, keras.Variable) else v for v in variables]


def compute_gradients(tape, loss, variables, options, warned):
    """Returns the gradients of `loss` with respect to `variables`, as a list.

    Args:
        tape: the `tf.GradientTape` that recorded the forward pass.
        loss: the scalar to differentiate (already scaled by a loss-scale
            optimizer, if any).
        variables: the variables to differentiate with respect to.
        options: the `TrainOptions` of the step.
        warned: the set of warnings already given by this step's owner.
    """
    if not options.uses_tf_gradients:
        return list(tape.gradient(loss, variables))
    if tf.executing_eagerly():
        warn_once(
            warned,
            "eager-gradients",
            "keras_trainop: `aggregation_method`, `gate_gradients` and "
            "`colocate_gradients_with_ops` cannot act when the step runs eagerly "
            "(run_eagerly=True or outside a tf.function): they exist only in "
            "`tf.gradients`, which needs a graph. Gradients come from "
            "tf.GradientTape instead; their values are the same.",
        )
        return list(tape.gradient(loss, variables))
    return tf_gradients(loss, variables, options)


def tf_gradients(loss, variables, options):
    """TF1's `gradients` with `gate_gradients`, `aggregation_method` and colocation (graph only)."""
    grads = tf.compat.v1.gradients(
        loss,
        gradient_sources(variables),
        gate_gradients=options.gate_gradients == GATE_OP,
        aggregation_method=options.aggregation_method,
        colocate_gradients_with_ops=options.colocate_gradients_with_ops,
    )
    if options.gate_gradients == GATE_GRAPH:
        # TF1's GATE_GRAPH: no gradient is used before all are computed.
        present = [i for i, g in enumerate(grads) if g is not None]
        gated = tf.tuple([grads[i] for i in present]) if present else []
        for i, g in zip(present, gated):
            grads[i] = g
    return list(grads)
