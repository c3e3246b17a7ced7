"""Gradient noise: fixed scale (TF1's `optimize_loss(gradient_noise_scale=)`) and
annealed (Neelakantan et al., 2015; optax's `add_noise`).

Both are seeded and reproducible: the noise of step `t` for the `i`-th pair is
drawn with stateless random ops (Philox) from a key derived from
`(seed, t, i)`, where `t` is the transform's own step counter, a Keras
variable saved with the model. A run resumed from a checkpoint or a `.keras`
file therefore draws exactly the noise of an uninterrupted run. `i` is the
position of the pair in the list the transform receives.

Noise is added to every element of the variable, so an IndexedSlices gradient
becomes dense (as in TF1).

On TensorFlow the draws are Philox's bits from TensorFlow's stateless random
ops, made normal by the inverse normal CDF (`tf.math.ndtri`): the same
numbers eagerly, in a graph and under XLA (TensorFlow's own float draws
differ under XLA). On JAX and
PyTorch they are `keras.random`'s, from a seed made of `(seed, t, i)` the same
way: reproducible and resumable on each backend, but a different stream on
each (a resumed run draws the noise of its own backend).
"""

import random

import keras
import tensorflow as tf
from keras import ops

from keras_trainop.transforms.base import ON_TENSORFLOW, PACKAGE, GradientTransform, check_number

_ALG = "philox"  # the same stream on every device
_PAIRS = 1_000_003  # on JAX and PyTorch: the seed of step t, pair i is (seed, t * _PAIRS + i)
_BELOW_MINUS_2 = 0.022750131948179195  # P(Z < -2) for a standard normal Z


def _tf_uniform(shape, seed):
    """Uniform numbers in (0, 1), the same in every TensorFlow mode.

    TensorFlow's stateless float draws turn Philox's bits into floats one
    way in its kernels and another under XLA; its integer draws are the same
    bits in both. The top 24 bits of each make an exact float32 in (0, 1).
    """
    bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.uint32, alg=_ALG)
    top = tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32))
    return (tf.cast(top, tf.float32) + 0.5) * 2.0**-24


def _check_seed(seed):
    if seed is None:
        return random.randint(0, 2**31 - 1)
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63:
        return seed
    raise ValueError(
        f"`seed` must be None or an integer in [0, 2**63). Received: seed={seed!r}"
    )


class _Noise(GradientTransform):
    """Adds `stddev(t) * sample(shape, key)` to every gradient and counts steps."""

    def __init__(self, seed):
        super().__init__()
        self.seed = _check_seed(seed)
        self.step = None

    def build(self, variables):
        # (JAX has no int64 without jax_enable_x64; the two load into each other.)
        self.step = self.add_state("noise_step", "int64" if ON_TENSORFLOW else "int32")
        if not ON_TENSORFLOW:
            # keras.random draws from a SeedGenerator; its state is set for
            # each draw (below), so it is not part of the transform's state.
            self._generator = keras.random.SeedGenerator(0)
        super().build(variables)

    def update(self, grads_and_vars, state):
        (step,) = state
        stddev = self.stddev(ops.cast(step, "float32"))
        result = []
        for i, (grad, var) in enumerate(grads_and_vars):
            if grad is not None:
                grad = tf.convert_to_tensor(grad) if ON_TENSORFLOW else grad  # IndexedSlices: densified
                noise = self._draw(var.shape, step, i) * stddev
                grad = grad + ops.cast(noise, grad.dtype)
            result.append((grad, var))
        return result, [step + 1]

    def _draw(self, shape, step, i):
        """Standard noise of `shape` for pair `i` at step `step`, the same for the same `(seed, step, i)`."""
        if ON_TENSORFLOW:
            key = tf.random.experimental.stateless_fold_in(
                tf.constant([0, self.seed], tf.int64), step, alg=_ALG
            )
            return self.tf_sample(shape, tf.random.experimental.stateless_fold_in(key, i, alg=_ALG))
        generator = self._generator
        dtype = generator.state.dtype
        high = ops.cast((self.seed ^ (self.seed >> 32)) & 0x7FFFFFFF, dtype)
        low = ops.cast(ops.cast(step, dtype) * _PAIRS + i, dtype)
        with keras.StatelessScope(state_mapping=[(generator.state, ops.stack([high, low]))]):
            return self.keras_sample(shape, generator)


@keras.saving.register_keras_serializable(package=PACKAGE)
class AddScaledNoise(_Noise):
    """Adds `scale * truncated_normal()` to every gradient element.

    TF1's `optimize_loss(gradient_noise_scale=scale)`: a truncated standard
    normal (no draw beyond 2 standard deviations), times `scale`.

    Args:
        scale: the noise scale, > 0.
        seed: an integer, or None to draw one (then saved with the config).
    """

    def __init__(self, scale, *, seed=None):
        self.scale = check_number("scale", scale, low=0)
        super().__init__(seed)

    def stddev(self, step):
        del step
        return ops.convert_to_tensor(self.scale, "float32")

    def tf_sample(self, shape, seed):
        # The inverse CDF of the normal over [-2, 2]: truncated exactly, without resampling.
        below = _BELOW_MINUS_2
        return tf.math.ndtri(below + _tf_uniform(shape, seed) * (1.0 - 2.0 * below))

    def keras_sample(self, shape, generator):
        return keras.random.truncated_normal(shape, seed=generator)

    def get_config(self):
        return {"scale": self.scale, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AddNoise(_Noise):
    """Adds annealed Gaussian noise of variance `eta / (1 + t)**gamma` at step `t`.

    Neelakantan et al., 2015, "Adding Gradient Noise Improves Learning for
    Very Deep Networks" (arXiv:1511.06807); optax's `add_noise`. `t` counts
    this transform's calls from 0.

    Args:
        eta: the initial variance, > 0 (the paper uses 0.01, 0.3 or 1.0).
        gamma: the decay exponent, >= 0 (the paper uses 0.55).
        seed: an integer, or None to draw one (then saved with the config).
    """

    def __init__(self, eta, gamma=0.55, *, seed=None):
        self.eta = check_number("eta", eta, low=0)
        self.gamma = check_number("gamma", gamma, low=0, low_inclusive=True)
        super().__init__(seed)

    def stddev(self, step):
        return ops.sqrt(self.eta / ops.power(1.0 + step, self.gamma))

    def tf_sample(self, shape, seed):
        return tf.math.ndtri(_tf_uniform(shape, seed))

    def keras_sample(self, shape, generator):
        return keras.random.normal(shape, seed=generator)

    def get_config(self):
        return {"eta": self.eta, "gamma": self.gamma, "seed": self.seed}


def add_scaled_noise(scale, *, seed=None):
    """TF1's `gradient_noise_scale`: adds `scale * truncated_normal()`. Returns `AddScaledNoise`."""
    return AddScaledNoise(scale, seed=seed)


def add_noise(eta, gamma=0.55, *, seed=None):
    """Annealed noise, variance `eta / (1 + t)**gamma` (optax's `add_noise`). Returns `AddNoise`."""
    return AddNoise(eta, gamma, seed=seed)
