"""Adaptive clipping: unit-wise AGC (Brock et al., 2021) and TF1's adaptive
global-norm rule (`optimize_loss`'s `adaptive_clipping_fn`, arXiv:1412.1602).
"""

import keras
from keras import ops

from keras_trainop.transforms.base import (
    PACKAGE,
    GradientTransform,
    check_number,
    compute_dtype,
    global_norm,
    is_sparse,
    read_state,
    scale,
    summed_rows,
)


def _unit_axes(rank):
    """Axes reduced for a unit-wise norm: all but the last (the output unit)."""
    return list(range(rank)) if rank <= 1 else list(range(rank - 1))


def _unit_norm(x, axes):
    return ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=True))


@keras.saving.register_keras_serializable(package=PACKAGE)
class AdaptiveGradClip(GradientTransform):
    """Unit-wise adaptive gradient clipping (AGC).

    Brock et al., 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization" (arXiv:2102.06171); optax's `adaptive_grad_clip`.
    For each unit (output unit: the norm runs over all axes but the last of a
    kernel of rank >= 2; over the whole tensor for a bias or a scalar), with
    `max = clipping * max(||w||, eps)`, the gradient becomes
    `g * max / ||g||` where `||g|| > max`, and stays `g` elsewhere.

    IndexedSlices stay sparse and the result equals AGC of the dense gradient:
    the unit norms are computed from the rows with duplicate indices summed
    (without densifying), and the per-unit factor scales `.values`.

    Args:
        clipping: the largest ratio of gradient norm to weight norm, > 0.
        eps: the smallest weight norm used, >= 0 (so that zero-initialised
            weights can still move).
    """

    def __init__(self, clipping, eps=1e-3):
        super().__init__()
        self.clipping = check_number("clipping", clipping, low=0)
        self.eps = check_number("eps", eps, low=0, low_inclusive=True)

    def _factor(self, grad, var):
        rank = len(var.shape)
        axes = _unit_axes(rank)
        dtype = compute_dtype(var.dtype)
        (value,) = read_state([var])
        w_norm = _unit_norm(ops.cast(value, dtype), axes)
        max_norm = ops.maximum(w_norm, self.eps) * self.clipping
        rows = summed_rows(grad) if is_sparse(grad) else grad
        g_norm = _unit_norm(ops.cast(rows, dtype), axes)
        clipped = max_norm / ops.maximum(g_norm, 1e-6)
        return ops.where(g_norm < max_norm, ops.ones_like(g_norm), clipped)

    def call(self, grads_and_vars):
        return [
            (None if g is None else scale(g, self._factor(g, v)), v) for g, v in grads_and_vars
        ]

    def get_config(self):
        return {"clipping": self.clipping, "eps": self.eps}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AdaptiveClipByGlobalNorm(GradientTransform):
    """TF1's `optimize_loss(clip_gradients=adaptive_clipping_fn(...))`.

    Keeps moving averages of the log global norm and of its square
    (arXiv:1412.1602, section 3.2.1). At each step, with `n = ||g||` (the
    global norm; IndexedSlices by `.values`):

        mean    <- mean    - (mean    - log(n + epsilon))   * (1 - decay)
        sq_mean <- sq_mean - (sq_mean - log(n + epsilon)^2) * (1 - decay)
        std = sqrt(max(epsilon, sq_mean - mean^2))
        factor = 1 if n < exp(mean + std_factor * std) else exp(mean) / n
        factor = min(static_max_norm / n, factor)    (if static_max_norm)

    and every gradient is multiplied by `factor`. The averages start at 0 and
    are two float32 state variables, saved with the model.

    Args:
        std_factor: how many standard deviations above the mean log norm a
            norm may be before it is clipped.
        decay: the moving averages' decay, in [0, 1).
        static_max_norm: None, or a hard upper bound on the norm (> 0).
        epsilon: a small positive number.
        warmup: TF1's `global_step` argument: if True, the decay at the
            `k`-th step (from 0) is `min(decay, k / (k + 1))`, counted by a
            third state variable.
    """

    def __init__(self, std_factor=2.0, decay=0.95, static_max_norm=None, epsilon=1e-8,
                 warmup=False):
        super().__init__()
        self.std_factor = check_number("std_factor", std_factor)
        self.decay = check_number("decay", decay, low=0, low_inclusive=True)
        if not self.decay < 1:
            raise ValueError(f"`decay` must be in [0, 1). Received: decay={decay!r}")
        self.static_max_norm = check_number("static_max_norm", static_max_norm, low=0,
                                            allow_none=True)
        self.epsilon = check_number("epsilon", epsilon, low=0)
        if not isinstance(warmup, bool):
            raise ValueError(f"`warmup` must be a bool. Received: warmup={warmup!r}")
        self.warmup = warmup

    def build(self, variables):
        self.mean = self.add_state("adaptive_max_norm_mean", "float32", 0.0)
        self.sq_mean = self.add_state("adaptive_max_norm_sq_mean", "float32", 0.0)
        if self.warmup:
            self.count = self.add_state("adaptive_max_norm_step", "int64")
        super().build(variables)

    def update(self, grads_and_vars, state):
        mean, sq_mean = state[:2]
        new_state = []
        norm = ops.cast(global_norm([g for g, _ in grads_and_vars]), "float32")
        log_norm = ops.log(norm + self.epsilon)
        decay = ops.convert_to_tensor(self.decay, "float32")
        if self.warmup:
            count = state[2]
            n = ops.cast(count, "float32")
            decay = ops.minimum(decay, n / (n + 1.0))
            new_state = [count + 1]
        mean = mean - (mean - log_norm) * (1.0 - decay)
        sq_mean = sq_mean - (sq_mean - ops.square(log_norm)) * (1.0 - decay)
        new_state = [mean, sq_mean] + new_state
        std = ops.sqrt(ops.maximum(self.epsilon, sq_mean - ops.square(mean)))
        max_norm = ops.exp(mean + self.std_factor * std)
        # 0 where the norm is 0: a negative std_factor can underflow max_norm to
        # 0, and an all-zero gradient would then be multiplied by inf, giving NaN.
        nonzero = norm != 0
        clipped = ops.where(nonzero, ops.exp(mean) / ops.where(nonzero, norm, 1.0), 0.0)
        factor = ops.where(norm < max_norm, ops.ones_like(norm), clipped)
        if self.static_max_norm is not None:
            factor = ops.minimum(self.static_max_norm / norm, factor)
        return [(scale(g, factor), v) for g, v in grads_and_vars], new_state

    def get_config(self):
        return {
            "std_factor": self.std_factor,
            "decay": self.decay,
            "static_max_norm": self.static_max_norm,
            "epsilon": self.epsilon,
            "warmup": self.warmup,
        }


def adaptive_grad_clip(clipping, eps=1e-3):
    """Unit-wise AGC (optax's `adaptive_grad_clip`). Returns an `AdaptiveGradClip`."""
    return AdaptiveGradClip(clipping, eps)


def adaptive_clip_by_global_norm(std_factor=2.0, decay=0.95, static_max_norm=None,
                                 epsilon=1e-8, warmup=False):
    """TF1's `adaptive_clipping_fn` rule. Returns an `AdaptiveClipByGlobalNorm`."""
    return AdaptiveClipByGlobalNorm(std_factor, decay, static_max_norm, epsilon, warmup)
