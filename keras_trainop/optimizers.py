"""What keras_trainop needs to know about Keras optimizers that wrap others."""

import keras


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
