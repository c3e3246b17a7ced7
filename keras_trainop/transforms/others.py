"""Gradient centralization (Yong et al., 2020) and `zero_nans`."""

import keras
from keras import ops

from keras_trainop.transforms.base import PACKAGE, GradientTransform, compute_dtype, dense, map_values


@keras.saving.register_keras_serializable(package=PACKAGE)
class Centralize(GradientTransform):
    """Subtracts, from the gradient of every kernel of rank > 1, its mean per output unit.

    Yong et al., 2020, "Gradient Centralization: A New Optimization Technique
    for Deep Neural Networks" (arXiv:2004.01461); optax's `centralize`. The
    mean runs over all axes but the last (Keras kernels are `(..., in, out)`).
    Gradients of rank <= 1 (biases, scales) pass through. The mean covers
    every row, so an IndexedSlices gradient of rank > 1 becomes dense.
    """

    def call(self, grads_and_vars):
        result = []
        for grad, var in grads_and_vars:
            rank = len(var.shape)
            if grad is not None and rank > 1:
                full = dense(grad)
                x = ops.cast(full, compute_dtype(full.dtype))
                mean = ops.mean(x, axis=tuple(range(rank - 1)), keepdims=True)
                grad = ops.cast(x - mean, full.dtype)
            result.append((grad, var))
        return result


@keras.saving.register_keras_serializable(package=PACKAGE)
class ZeroNans(GradientTransform):
    """Replaces NaN gradient elements by 0 (optax's `zero_nans`); infinities stay."""

    def call(self, grads_and_vars):
        def zero(g):
            return ops.where(ops.isnan(g), ops.zeros_like(g), g)

        return [(map_values(zero, g), v) for g, v in grads_and_vars]


def centralize():
    """Gradient centralization for kernels of rank > 1. Returns a `Centralize`."""
    return Centralize()


def zero_nans():
    """Replaces NaN gradient elements by 0. Returns a `ZeroNans`."""
    return ZeroNans()
