"""Clipping: by value, by per-tensor norm (TF1's `clip_gradient_norms`), by global norm.

All three act on `.values` of IndexedSlices and keep them sparse. With
duplicate indices each `.values` row counts on its own (not the row sums of
the dense gradient), as in Keras's `clipvalue` / `clipnorm` /
`global_clipnorm`, `tf.clip_by_norm`, `tf.clip_by_global_norm` and TF1.
"""

import math

import keras
from keras import ops

from keras_trainop.transforms.base import (
    PACKAGE,
    GradientTransform,
    current_number,
    cast,
    check_number,
    compute_dtype,
    global_norm,
    is_real,
    is_tensor_or_variable,
    map_values,
    scale,
    warn_unsaved,
)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClipByValue(GradientTransform):
    """Clips every gradient element to `[clip_value_min, clip_value_max]`.

    Args:
        clip_value_min: the lower bound.
        clip_value_max: the upper bound, > `clip_value_min`.
    """

    def __init__(self, clip_value_min, clip_value_max):
        super().__init__()
        self.clip_value_min = check_number("clip_value_min", clip_value_min)
        self.clip_value_max = check_number("clip_value_max", clip_value_max)
        if not self.clip_value_min < self.clip_value_max:
            raise ValueError(
                "`clip_value_min` must be < `clip_value_max`. Received: "
                f"clip_value_min={clip_value_min!r}, clip_value_max={clip_value_max!r}"
            )

    def call(self, grads_and_vars):
        def clip(g):
            return ops.clip(
                g, cast(self.clip_value_min, g.dtype), cast(self.clip_value_max, g.dtype)
            )

        return [(map_values(clip, g), v) for g, v in grads_and_vars]

    def get_config(self):
        return {"clip_value_min": self.clip_value_min, "clip_value_max": self.clip_value_max}


def _clip_tensor_by_norm(t, clip_norm):
    # `tf.clip_by_norm`'s formula (also Keras's `clipnorm`), summed in float32
    # for half-precision gradients.
    x = ops.cast(t, compute_dtype(t.dtype))
    l2sum = ops.sum(ops.square(x))
    positive = l2sum > 0
    l2norm = ops.where(positive, ops.sqrt(ops.where(positive, l2sum, ops.ones_like(l2sum))), l2sum)
    clip_norm = cast(clip_norm, x.dtype)
    return ops.cast(x * clip_norm / ops.maximum(l2norm, clip_norm), t.dtype)


def check_norm_bound(name, value):
    """A finite number > 0 (returned as a float), or a scalar tensor or variable (read at every step)."""
    if is_tensor_or_variable(value):
        if tuple(value.shape) != ():
            raise ValueError(
                f"`{name}` must be a finite number > 0 or a scalar tensor. Received: "
                f"{name}={value!r} of shape {tuple(value.shape)}"
            )
        return value
    if not (is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(
            f"`{name}` must be a finite number > 0 or a scalar tensor. Received: {name}={value!r}"
        )
    return float(value)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClipByNorm(GradientTransform):
    """Rescales each gradient on its own so that its L2 norm is at most `clip_norm`.

    Per tensor, not global: TF1's `clip_gradient_norms` and Keras's `clipnorm`.
    `g * clip_norm / max(||g||, clip_norm)`.

    Args:
        clip_norm: the largest norm allowed for each gradient: a number > 0,
            or a scalar tensor or variable, read at every step (saved as its
            current value, with a warning).
    """

    def __init__(self, clip_norm):
        super().__init__()
        self.clip_norm = check_norm_bound("clip_norm", clip_norm)

    def call(self, grads_and_vars):
        return [
            (map_values(lambda t: _clip_tensor_by_norm(t, self.clip_norm), g), v)
            for g, v in grads_and_vars
        ]

    def get_config(self):
        clip_norm = self.clip_norm
        if not is_real(clip_norm):
            clip_norm = current_number(clip_norm)
            warn_unsaved(
                "`clip_by_norm`'s clip_norm is a tensor or variable; it is saved as its "
                f"current value {clip_norm!r}. After loading, set it again if something changes it."
            )
        return {"clip_norm": clip_norm}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClipByGlobalNorm(GradientTransform):
    """Rescales all gradients together so that their global norm is at most `clip_norm`.

    `g * clip_norm / max(global_norm, clip_norm)` for every gradient: Keras's
    `global_clipnorm`, `tf.clip_by_global_norm` and `optimize_loss(
    clip_gradients=<float>)`. A non-finite global norm makes every gradient
    NaN, as there.

    Args:
        clip_norm: the largest global norm allowed, > 0.
    """

    def __init__(self, clip_norm):
        super().__init__()
        self.clip_norm = check_number("clip_norm", clip_norm, low=0)

    def call(self, grads_and_vars):
        norm = global_norm([g for g, _ in grads_and_vars])
        # Keras's formula; `norm - norm` turns a non-finite norm into NaN.
        factor = self.clip_norm * ops.minimum(1.0 / norm, 1.0 / self.clip_norm) + (norm - norm)
        return [(scale(g, factor), v) for g, v in grads_and_vars]

    def get_config(self):
        return {"clip_norm": self.clip_norm}


def clip_by_value(clip_value_min, clip_value_max=None):
    """Clips gradient elements: to `[-c, c]` given one `c > 0` (Keras's
    `clipvalue=c`), else to `[clip_value_min, clip_value_max]` (`tf.clip_by_value`).

    Returns:
        A `ClipByValue` transform.
    """
    if clip_value_max is None:
        check_number("clip_value", clip_value_min, low=0)
        return ClipByValue(-clip_value_min, clip_value_min)
    return ClipByValue(clip_value_min, clip_value_max)


def clip_by_norm(clip_norm):
    """Clips each gradient to L2 norm `clip_norm`, per tensor. Returns a `ClipByNorm`."""
    return ClipByNorm(clip_norm)


def clip_by_global_norm(clip_norm):
    """Clips all gradients to global L2 norm `clip_norm`. Returns a `ClipByGlobalNorm`."""
    return ClipByGlobalNorm(clip_norm)
