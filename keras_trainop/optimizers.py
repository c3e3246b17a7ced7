"""What keras_trainop needs to know about Keras optimizers that wrap others."""

import keras

from keras_trainop.gradients import warn_once


def is_loss_scale_optimizer(optimizer):
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def applying_optimizers(optimizer):
    """The optimizers that really apply gradients for `optimizer`, itself first.

    A LossScaleOptimizer applies through its `inner_optimizer`, a
    MultiOptimizer through each of its `optimizers` (known once it is built,
    when they come from a selector function); wrappers nest.
    """
    found = [optimizer]
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        found += applying_optimizers(inner)
    multi = getattr(keras.optimizers, "MultiOptimizer", None)  # Keras >= 3.15
    if multi is not None and isinstance(optimizer, multi):
        for sub in optimizer.optimizers:
            found += applying_optimizers(sub)
    return found


def own_accumulation_steps(optimizer):
    """The largest `gradient_accumulation_steps` of the optimizers that apply (None if none)."""
    steps = [getattr(o, "gradient_accumulation_steps", None) for o in applying_optimizers(optimizer)]
    return max((s for s in steps if s), default=None)


def check_accumulation(options, optimizer, warned):
    """Refuses accumulation asked of both keras_trainop and the optimizer; warns for the optimizer's alone."""
    own = own_accumulation_steps(optimizer)
    if own and options.accumulates:
        raise ValueError(
            "Pass `gradient_accumulation_steps` to keras_trainop or to the "
            "optimizer, not both (the optimizer's own would accumulate "
            "again what keras_trainop hands it). Received: "
            f"gradient_accumulation_steps={options.gradient_accumulation_steps!r} "
            f"and an optimizer with gradient_accumulation_steps={own!r}"
        )
    if own and (options.transforms or options.numerics.check_gradients):
        warn_once(
            warned,
            "optimizer-accumulation",
            "keras_trainop: the optimizer accumulates gradients itself "
            f"(gradient_accumulation_steps={own}), after keras_trainop's "
            "transforms and checks, which therefore act on each micro-batch. "
            "To clip the accumulated gradient, pass gradient_accumulation_steps "
            "to keras_trainop instead.",
        )
