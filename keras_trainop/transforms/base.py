"""`GradientTransform`, the base of the built-in transforms, and their shared helpers.

A transform has TF1's `transform_grads_fn` contract: it takes a list of
`(gradient, variable)` pairs (None gradients included) and returns a new list.
It may change gradients or drop pairs, never add variables. Plain functions
with that contract work wherever a transform does.
"""

import contextlib
import functools
import math
import numbers
import re
import types
import warnings

import keras
import tensorflow as tf
from keras import ops

from keras_trainop.summaries import gradient_values, variable_name

PACKAGE = "keras_trainop"

# The math below is `keras.ops` (every backend) but where TensorFlow has what
# other backends lack: IndexedSlices gradients, `tf.nn.l2_loss`, float64
# constants. On JAX no TensorFlow op runs.
ON_TENSORFLOW = keras.backend.backend() == "tensorflow"


class GradientTransform:
    """Base class of the built-in gradient transforms.

    A stateless transform implements `call(grads_and_vars)`. A stateful one
    creates its state in `build(variables)` with `self.add_state(name,
    dtype)` and implements `update(grads_and_vars, state)`, which returns the
    new pairs and the new state without assigning anything: keras_trainop
    writes the new state when, and only when, the step's update is applied
    (a blocked, skipped or accumulating step leaves it as it was).
    Subclasses validate their arguments in `__init__` and return them from
    `get_config()`.

    ```python
    @keras.saving.register_keras_serializable()
    class ScaleByRunningNorm(kt.transforms.GradientTransform):
        def build(self, variables):
            self.mean = self.add_state("mean_norm", "float32", 1.0)
            super().build(variables)

        def update(self, grads_and_vars, state):
            (mean,) = state
            norm = kt.transforms.base.global_norm([g for g, _ in grads_and_vars])
            mean = 0.9 * mean + 0.1 * norm
            return [(None if g is None else g / mean, v) for g, v in grads_and_vars], [mean]
    ```

    Calling a transform outside keras_trainop's step (`transform(pairs)`)
    builds it if needed, runs `update` and writes the new state at once.
    """

    built = False  # class defaults: a subclass need not call __init__

    def __init__(self):
        self.built = False
        self._state = []

    @property
    def variables(self):
        """The state variables (non-trainable), in a fixed order."""
        return list(getattr(self, "_state", ()))

    def build(self, variables):
        """Creates the state for `variables` (a list); call it outside traced code."""
        del variables
        self.built = True

    def add_state(self, name, dtype, initial_value=0):
        """Creates, records and returns one scalar state variable."""
        variable = keras.Variable(initial_value, dtype=dtype, trainable=False, name=name)
        self._state = self.variables + [variable]
        return variable

    def __call__(self, grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        if not self.built:
            with init_scope():
                self.build([v for _, v in grads_and_vars])
        variables = self.variables
        result, new_state = self.update(grads_and_vars, read_state(variables))
        for variable, value in zip(variables, new_state):
            variable.assign(value)
        return result

    def update(self, grads_and_vars, state):
        """Returns `(pairs, new_state)`: the transformed pairs, and the new values of `self.variables`.

        Args:
            grads_and_vars: the list of `(gradient, variable)` pairs.
            state: the current values of `self.variables`, in order.

        The default is a stateless transform's: `call`, with the state as it
        is after it (so an older transform that assigns its own state in
        `call` still works; keras_trainop then puts that state back when the
        step is not applied).
        """
        del state
        result = self.call(grads_and_vars)
        return result, read_state(self.variables)

    def call(self, grads_and_vars):
        """Returns the transformed list of `(gradient, variable)` pairs."""
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_config().items())
        return f"{type(self).__name__}({args})"

    def _repr_config(self):
        return self.get_config()


def read_state(variables):
    """The current values of state variables (reads ordered after earlier writes in a graph)."""
    if ON_TENSORFLOW:
        return [tf.convert_to_tensor(v) for v in variables]
    return [ops.convert_to_tensor(v) for v in variables]  # a stateless scope's value, on JAX


def current_number(value):
    """The current value of a scalar tensor or variable, as a Python float (on the host)."""
    if ON_TENSORFLOW:
        return float(tf.convert_to_tensor(value).numpy())
    return float(ops.convert_to_numpy(value))


def init_scope():
    """Where state variables are created: outside any traced function (TensorFlow's init scope)."""
    return tf.init_scope() if ON_TENSORFLOW else contextlib.nullcontext()


def self_written_variables(transform):
    """The state variables a transform assigns itself (the older protocol), not through `update`.

    A plain function or object with `variables`, or a `GradientTransform`
    that keeps state but implements only `call`. keras_trainop puts them back
    when a step is not applied.
    """
    if not isinstance(transform, GradientTransform):
        return child_variables(transform)
    children = getattr(transform, "children", None)
    if callable(children):
        return [v for child in children() for v in self_written_variables(child)]
    if type(transform).update is GradientTransform.update:
        return transform.variables
    return []


def run_transform(transform, grads_and_vars, state):
    """`(pairs, new_state)` of any transform: a `GradientTransform`'s `update`, else a call.

    A plain function (TF1's `transform_grads_fn`) or object has no explicit
    state; if it keeps variables (`transform.variables`), it assigns them
    itself, and its "new state" is their value after the call.
    """
    if isinstance(transform, GradientTransform):
        return transform.update(list(grads_and_vars), list(state))
    result = transform(list(grads_and_vars))
    return result, read_state(child_variables(transform))


def run_transforms(transforms, grads_and_vars):
    """The transforms in order: the pairs to apply, and `(variable, before, new)` of their state.

    What the step (on every backend) runs: each transform's output is checked
    (`check_output`), and its new state is returned, not written.
    """
    allowed = {id(v) for _, v in grads_and_vars}
    state = []
    for i, transform in enumerate(transforms):
        state_variables = child_variables(transform)
        before = read_state(state_variables)
        result, new = run_transform(transform, grads_and_vars, before)
        if len(new) != len(state_variables):
            raise ValueError(
                f"Gradient transform {i} ({transform!r}) must return one new value per "
                f"state variable ({len(state_variables)}). Received: {len(new)} values"
            )
        grads_and_vars = check_output(i, transform, result, allowed)
        state += zip(state_variables, before, new)
    return grads_and_vars, state


# -- gradients ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def dtype_name(dtype):
    """Keras's name of a dtype of any backend (`standardize_dtype`), remembered:
    off TensorFlow the transforms run every step, several times a gradient."""
    return keras.backend.standardize_dtype(dtype)


def compute_dtype(dtype):
    """float32 for half-precision gradients (no overflow in sums of squares), as a dtype name."""
    name = dtype_name(dtype)
    return "float32" if name in ("float16", "bfloat16") else name


# A gradient's values: `.values` for IndexedSlices, else the tensor.
values_of = gradient_values


def map_values(fn, grad):
    """Applies `fn` to a gradient's values; IndexedSlices keep their indices."""
    if grad is None:
        return None
    if is_sparse(grad):
        return tf.IndexedSlices(fn(grad.values), grad.indices, grad.dense_shape)
    return fn(grad)


def is_sparse(grad):
    """Whether a gradient is a `tf.IndexedSlices` (only TensorFlow makes them)."""
    return ON_TENSORFLOW and isinstance(grad, tf.IndexedSlices)


def dense(grad):
    """A gradient as a dense tensor (IndexedSlices scattered)."""
    return tf.convert_to_tensor(grad) if ON_TENSORFLOW else ops.convert_to_tensor(grad)


def cast(value, dtype):
    """`ops.cast(value, dtype)`, except that a Python number becomes a float64
    constant directly for float64: `tf.cast` would round it to float32 first
    (0.1 -> 0.10000000149), a 3e-8 error in float64 clip bounds and factors."""
    if is_real(value) and keras.backend.standardize_dtype(dtype) == "float64":
        return ops.convert_to_tensor(value, "float64")
    return ops.cast(value, dtype)


def scale(grad, factor):
    """`grad * factor`, sparse-preserving. Half-precision gradients are multiplied
    in float32 and cast back: a small factor cast to float16 would be subnormal
    or 0 (a clip factor of 1e-6 would lose its digits or zero the gradient)."""

    def multiply(g):
        dtype = compute_dtype(g.dtype)
        if g.dtype == getattr(factor, "dtype", None) and dtype == dtype_name(g.dtype):
            return g * factor  # no cast (on PyTorch each op costs microseconds a gradient)
        return ops.cast(ops.cast(g, dtype) * cast(factor, dtype), g.dtype)

    return map_values(multiply, grad)


def global_norm(grads):
    """The L2 norm of all gradients together, as `tf.linalg.global_norm` computes it.

    IndexedSlices count with their `.values`: duplicate indices are not summed
    first (as in Keras's `global_clipnorm`, `tf.clip_by_global_norm` and TF1).
    Half-precision gradients are summed in float32. One fused `l2_loss`
    kernel per tensor: cheaper than Keras's square-then-sum, equal up to
    float rounding.
    """
    values = [values_of(g) for g in grads if g is not None]
    wide = any(dtype_name(v.dtype) == "float64" for v in values)
    dtype = "float64" if wide else "float32"
    if not ON_TENSORFLOW:
        # (No cast where none is needed, and a Python sum: on PyTorch each op
        # costs microseconds a gradient, more than the arithmetic of a small one.)
        same = [dtype_name(v.dtype) == dtype for v in values]
        return ops.sqrt(sum(ops.sum(ops.square(v if s else ops.cast(v, dtype))) for v, s in zip(values, same)))
    halves = [tf.nn.l2_loss(tf.cast(v, dtype)) for v in values]
    return tf.sqrt(2.0 * tf.reduce_sum(tf.stack(halves)))


def summed_rows(slices):
    """The rows of an IndexedSlices with duplicate indices summed, without densifying.

    Returns a tensor with as many rows as `slices.values` (trailing rows zero),
    whose nonzero rows are the distinct rows of the dense gradient. Static
    shapes only (a sort and a segment sum), so it compiles under XLA.
    """
    n = tf.shape(slices.indices)[0]
    order = tf.argsort(slices.indices)
    indices = tf.gather(slices.indices, order)
    previous = tf.concat([indices[:1] - 1, indices[:-1]], axis=0)  # empty-safe
    starts = tf.not_equal(indices, previous)
    segments = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    return tf.math.unsorted_segment_sum(tf.gather(slices.values, order), segments, n)


# -- argument validation -------------------------------------------------------


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_tensor_or_variable(value):
    """A tensor of the backend, or a Keras or TensorFlow variable (not a Python number)."""
    if isinstance(value, keras.Variable) or keras.ops.is_tensor(value):
        return True
    return ON_TENSORFLOW and (tf.is_tensor(value) or isinstance(value, tf.Variable))


def check_number(name, value, low=None, low_inclusive=False, allow_none=False):
    """Validates a finite real number (optionally > or >= `low`); returns it as float."""
    if value is None and allow_none:
        return None
    ok = is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if not ok:
        bound = "" if low is None else f" {'>=' if low_inclusive else '>'} {low}"
        what = f"a finite number{bound}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return float(value)


def is_pattern(value):
    """Whether `value` is a string that compiles as a regular expression."""
    if not isinstance(value, str):
        return False
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def check_patterns(name, value):
    """A regular expression or a non-empty list of them; returns the list."""
    patterns = [value] if isinstance(value, str) else value
    if not (isinstance(patterns, (list, tuple)) and patterns and all(map(is_pattern, patterns))):
        raise ValueError(
            f"`{name}` must be a regular expression (searched in `variable.path`) "
            f"or a non-empty list of them. Received: {name}={value!r}"
        )
    return list(patterns)


def matches(patterns, variable):
    name = variable_name(variable)
    return any(re.search(p, name) for p in patterns)


# -- serialization ---------------------------------------------------------------


def is_registered(obj):
    """Whether Keras can load `obj` back: a registered function or class instance."""
    target = obj if isinstance(obj, types.FunctionType) else type(obj)
    if target.__name__ == "<lambda>":
        return False
    name = keras.saving.get_registered_name(target)
    return keras.saving.get_registered_object(name) is target


def serialize_child(transform, where):
    """The Keras config of a child transform; a ValueError if it cannot be saved."""
    if transform is None:
        return None
    if not is_registered(transform):
        raise ValueError(
            f"{where} ({transform!r}) cannot be saved: register it with "
            "@keras.saving.register_keras_serializable() (and give a class a "
            "get_config()), or give it to compile() outside the combinator, where "
            "what cannot be saved is left out with a warning."
        )
    return keras.saving.serialize_keras_object(transform)


def deserialize_child(config):
    return None if config is None else keras.saving.deserialize_keras_object(config)


def warn_unsaved(message):
    warnings.warn(f"keras_trainop: {message}", UserWarning, stacklevel=3)


def build_child(transform, variables):
    build = getattr(transform, "build", None)
    if callable(build) and not getattr(transform, "built", False):
        build(list(variables))


def child_variables(transform):
    return list(getattr(transform, "variables", ()) or ())


# -- what a transform returns -------------------------------------------------


def check_output(index, transform, result, allowed):
    """The pairs a transform returned, as a list, if they are fit to apply; else a ValueError.

    Args:
        index: the transform's position, for the error.
        transform: the transform, for the error.
        result: what it returned.
        allowed: the ids of the variables being trained.
    """
    if isinstance(result, tuple):
        result = list(result)
    if not isinstance(result, list) or not all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in result
    ):
        raise ValueError(
            f"Gradient transform {index} ({transform!r}) must return a list of "
            "(gradient, variable) pairs, as TF1's `transform_grads_fn` did. "
            f"Received: {result!r}"
        )
    seen = set()
    for grad, var in result:
        if id(var) not in allowed:
            raise ValueError(
                f"Gradient transform {index} ({transform!r}) returned a pair for "
                f"variable {_describe(var)}, which is not one of the "
                "variables being trained. A transform may drop pairs or change "
                "gradients, never add variables."
            )
        if id(var) in seen:
            raise ValueError(
                f"Gradient transform {index} ({transform!r}) returned more than one "
                f"pair for variable {_describe(var)}: it would be updated twice. "
                f"Received: {len(result)} pairs for {len(allowed)} variables"
            )
        seen.add(id(var))
        if grad is not None:
            _check_gradient(index, transform, grad, var)
    return [tuple(p) for p in result]


def _describe(var):
    try:
        return repr(variable_name(var))
    except AttributeError:  # not a variable at all
        return repr(var)


def _check_gradient(index, transform, grad, var):
    """A transform's gradient must fit its variable: a tensor of its shape and dtype."""
    values = gradient_values(grad)
    shape, dtype = getattr(values, "shape", None), getattr(values, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(
            f"Gradient transform {index} ({transform!r}) returned, for variable "
            f"{_describe(var)}, a gradient that is not a tensor, tf.IndexedSlices "
            f"or None. Received: gradient={grad!r}"
        )
    # (Keras's dtype names: a JAX or PyTorch dtype is not TensorFlow's.)
    if not is_sparse(grad) and tuple(shape) == tuple(var.shape) and dtype_name(dtype) == dtype_name(var.dtype):
        return  # the common case, cheaply: on PyTorch this runs at every step
    shape, dtype = tf.TensorShape(tuple(shape)), tf.as_dtype(keras.backend.standardize_dtype(dtype))
    var_shape, var_dtype = tf.TensorShape(tuple(var.shape)), tf.as_dtype(keras.backend.standardize_dtype(var.dtype))
    if isinstance(grad, tf.IndexedSlices):  # rows of the variable
        fits = shape.rank is None or (
            shape.rank == var_shape.rank and shape[1:].is_compatible_with(var_shape[1:])
        )
    else:
        fits = shape.is_compatible_with(var_shape)
    if not fits or dtype != var_dtype:
        raise ValueError(
            f"Gradient transform {index} ({transform!r}) returned, for variable "
            f"{_describe(var)} of shape {var_shape} and dtype {var_dtype.name}, a "
            "gradient that does not fit it: a transform must keep each gradient's "
            f"shape and dtype. Received: gradient of shape {shape} and dtype {dtype.name}"
        )
