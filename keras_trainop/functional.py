"""The functional API for custom training loops, and TF1's gradient helpers.

- `create_train_step`: TF-Agents' function; returns a callable running one step.
- `create_train_op`: TF1's graph-mode function, for use inside a `tf.function`.
- `clip_gradient_norms`, `clip_gradient_norms_fn`, `multiply_gradients`,
  `add_gradients_summaries`: TF1's helpers, with TF1's semantics.

All of them run the same `StepPipeline` as `TrainOpModel`.
"""

import numbers
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_trainop import _keras_private as private
from keras_trainop.gradients import tf_gradients, warn_once
from keras_trainop.failures import FailureRecord
from keras_trainop.options import (
    GATE_OP,
    USE_GLOBAL_STEP,
    TrainOptions,
    validate_callable,
)
from keras_trainop.pipeline import StepPipeline
from keras_trainop.summaries import add_gradients_summaries  # noqa: F401 (public)
from keras_trainop.summaries import variable_name
from keras_trainop.transforms.clipping import ClipByNorm, check_norm_bound
from keras_trainop.transforms.scaling import Multiply


_WARNED = weakref.WeakKeyDictionary()  # create_train_op's warnings given, per optimizer


def _require_tensorflow(name):
    """Both functions run the TensorFlow step (a tape, `tf.function`): refused elsewhere."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise NotImplementedError(
            f"`kt.{name}` runs TensorFlow's step and needs Keras's TensorFlow backend. "
            f"Received: KERAS_BACKEND={backend!r}. On JAX and PyTorch, train with `model.fit` "
            "and the options of `compile()` (docs/backends.md)."
        )


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_number_or_tensor(value):
    return tf.is_tensor(value) or _is_number(value) or isinstance(value, np.ndarray)


def _total_loss(values, total_loss_fn, loss):
    if total_loss_fn is not None:
        total = total_loss_fn(values)
        if not _is_number_or_tensor(total):
            raise ValueError(
                "`total_loss_fn` must return the scalar loss tensor to minimise. "
                f"Received: total_loss_fn={total_loss_fn!r}, which returned {total!r}"
            )
        return total
    leaves = tf.nest.flatten(values)
    if not leaves or not all(map(_is_number_or_tensor, leaves)):
        raise ValueError(
            "`loss` must return a loss tensor or a nested structure of loss "
            "tensors (or pass `total_loss_fn` to pick the loss out of what it "
            f"returns). Received: loss={loss!r}, which returned {values!r}"
        )
    # A nested loss with no total_loss_fn: minimise the sum, which is what
    # differentiating the whole structure means.
    return leaves[0] if len(leaves) == 1 else tf.add_n(leaves)


def _warn_if_xla_cannot_raise(pipeline, how_to_raise):
    """Under XLA a failed check blocks the update but cannot raise: say so once."""
    if pipeline.failures is None or not private.in_xla_context():
        return
    warn_once(
        pipeline.warned,
        "xla-cannot-raise",
        "keras_trainop: inside a jit_compile=True function nothing can raise, so "
        "`check_numerics` cannot stop a non-finite step with an error. The step's "
        "update is still blocked, and so is every later step's, until you call "
        f"{how_to_raise} after the call: it raises the kt.NonFiniteError of the "
        "failed step and clears the record. Pass check_numerics=False to turn the "
        "check off instead.",
    )


def raise_if_failed(owner):
    """Raises the `kt.NonFiniteError` of a failed step, if any, and clears the record.

    The one way to report a failed check, for every entry point and mode
    (docs/numerics.md, "When a check fails"): fit calls it after every call;
    call it after your own call of a step inside a `jit_compile=True` function,
    where nothing can raise and the failed step (and every later one) is blocked
    until it is called; and after catching the `tf.errors.InvalidArgumentError`
    that a failed check raises inside your own `tf.function`, to get the
    `kt.NonFiniteError` that says what failed. Where nothing failed, it does
    nothing.

    Args:
        owner: what runs the step: a function made by `kt.create_train_step`,
            a `TrainOpModel`, or the optimizer of `kt.create_train_op`.
    """
    pipeline = getattr(owner, "pipeline", None) or getattr(owner, "train_pipeline", None)
    if pipeline is not None:
        record = pipeline.failures
    elif isinstance(owner, keras.optimizers.Optimizer):
        record = FailureRecord.of_optimizer(owner)
    else:
        raise ValueError(
            "`owner` must be a step of kt.create_train_step, a keras_trainop model, or "
            f"the optimizer of kt.create_train_op. Received: owner={owner!r}"
        )
    if record is not None:
        record.raise_if_failed()


def create_train_step(
    loss,
    optimizer,
    global_step=USE_GLOBAL_STEP,
    total_loss_fn=None,
    update_ops=None,
    variables_to_train=None,
    transform_grads_fn=None,
    summarize_gradients=False,
    gate_gradients=GATE_OP,
    aggregation_method=None,
    check_numerics=True,
    gradient_accumulation_steps=None,
):
    """Creates a function that runs one training step, as TF-Agents' did.

    ```python
    step = kt.create_train_step(lambda x, y: loss_fn(model(x), y), optimizer)
    for x, y in dataset:
        loss_value = step(x, y)     # eagerly, or inside a tf.function
    ```

    Args:
        loss: a callable; `step(*args)` calls `loss(*args)`, which returns a
            loss tensor or a nested structure of loss tensors.
        optimizer: a Keras optimizer.
        global_step: `kt.USE_GLOBAL_STEP` (the optimizer's `iterations`),
            None, or a scalar variable incremented by 1 per applied update.
        total_loss_fn: maps the nested loss to the scalar to minimise. None:
            the loss itself, or the sum of its leaves.
        update_ops, variables_to_train, transform_grads_fn,
        summarize_gradients, gate_gradients, aggregation_method,
        check_numerics, gradient_accumulation_steps: as in
        `TrainOpModel.compile()`. `variables_to_train=None`
            trains the trainable variables that the loss reads.

    Returns:
        A callable `step(*args, **kwargs)` that runs one step and returns the
        nested loss values computed before the update. With the skip policy,
        `step.skipped_steps` counts the skipped steps. It also has
        `step.raise_if_failed()`: inside your own `jit_compile=True` function,
        where nothing can raise, a non-finite step is still blocked (and every
        later one, until this is called), and this raises its
        `kt.NonFiniteError`.

    Raises:
        ValueError: if `loss` or `total_loss_fn` is not callable, or an option
            is invalid; at the first call, if `loss` returns something that is
            not a loss tensor (or `total_loss_fn` does).
    """
    if not callable(loss):
        raise ValueError(
            "`loss` must be a callable returning a loss or a nested structure "
            "of losses (TF2 has no graph to keep a loss tensor in between steps). "
            f"Received: loss={loss!r}"
        )
    validate_callable("total_loss_fn", total_loss_fn)
    _require_tensorflow("create_train_step")
    options = TrainOptions(
        transform_grads_fn=transform_grads_fn,
        aggregation_method=aggregation_method,
        gate_gradients=gate_gradients,
        check_numerics=check_numerics,
        update_ops=update_ops,
        variables_to_train=variables_to_train,
        summarize_gradients=summarize_gradients,
        global_step=global_step,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    pipeline = StepPipeline(options, optimizer)

    def step(*args, **kwargs):
        _warn_if_xla_cannot_raise(pipeline, "`step.raise_if_failed()`")

        def forward():
            values = loss(*args, **kwargs)
            return _total_loss(values, total_loss_fn, loss), values

        if not tf.executing_eagerly() or pipeline.failures is None:
            return pipeline.run(forward)[0]
        return pipeline.failures.call_translating(pipeline.run, forward)[0]

    step.pipeline = pipeline
    step.raise_if_failed = lambda: raise_if_failed(step)
    # With check_numerics="skip": the number of skipped steps (an int64 variable).
    record = pipeline.failures
    step.skipped_steps = record.skipped_total if record is not None else None
    return step


def create_train_op(
    total_loss,
    optimizer,
    global_step=USE_GLOBAL_STEP,
    update_ops=None,
    variables_to_train=None,
    transform_grads_fn=None,
    summarize_gradients=False,
    gate_gradients=GATE_OP,
    aggregation_method=None,
    colocate_gradients_with_ops=False,
    check_numerics=True,
):
    """TF1's `create_train_op`, for use inside a `tf.function`.

    Computes the gradients of `total_loss` with `tf.gradients`, applies them
    and returns the loss tensor (its value from before the update).

    ```python
    @tf.function
    def train(x, y):
        loss = loss_fn(model(x), y)
        return kt.create_train_op(loss, optimizer)
    ```

    Args:
        total_loss: a scalar loss tensor computed in the same `tf.function`.
        optimizer: a Keras optimizer.
        variables_to_train: None trains the trainable variables the loss reads
            in this function (TF2 has no global collection); otherwise as in
            `TrainOpModel.compile()`.
        Other arguments: as in `TrainOpModel.compile()`.

    Returns:
        `total_loss`, ordered after the update.

    Inside a `jit_compile=True` function a failed `check_numerics` cannot
    raise: the update is blocked (and every later one) until
    `kt.raise_if_failed(optimizer)` is called, which raises the error.

    Raises:
        ValueError: if called eagerly (use `create_train_step`), if
            `total_loss` is not a tensor, or for an invalid option.
    """
    _require_tensorflow("create_train_op")
    if tf.executing_eagerly():
        raise ValueError(
            "`create_train_op` must be called inside a `tf.function`: it builds "
            "the update from a loss tensor, and an eager loss tensor has no graph "
            "to differentiate. To train eagerly, use "
            "`kt.create_train_step(loss_fn, optimizer, ...)`, which takes a loss "
            f"function instead. Received: total_loss={total_loss!r}"
        )
    if not tf.is_tensor(total_loss):
        raise ValueError(
            "`total_loss` must be a loss tensor computed in the same "
            "`tf.function` (to train with a loss function, use "
            f"`kt.create_train_step`). Received: total_loss={total_loss!r}"
        )
    options = TrainOptions(
        transform_grads_fn=transform_grads_fn,
        aggregation_method=aggregation_method,
        gate_gradients=gate_gradients,
        colocate_gradients_with_ops=colocate_gradients_with_ops,
        check_numerics=check_numerics,
        update_ops=update_ops,
        variables_to_train=variables_to_train,
        summarize_gradients=summarize_gradients,
        global_step=global_step,
    )
    # Traced anew in every trace of the caller's function: one failure record
    # per optimizer, which `kt.raise_if_failed(optimizer)` reads.
    record = FailureRecord.for_optimizer(optimizer, options.numerics) if options.numerics.enabled else None
    pipeline = StepPipeline(options, optimizer, record=record)
    # And one set of warnings given: a warning once per optimizer, not per trace.
    pipeline.warned = _WARNED.setdefault(optimizer, set())
    watched = private.function_watched_variables() or []
    read = [v for v in watched if v.trainable]
    if options.variables_to_train is None:
        # Keep only what the loss reads: the variables it has a gradient for.
        probe = tf.gradients(total_loss, read) if read else []
        read = [v for v, g in zip(read, probe) if g is not None]
    variables = pipeline.variables(read, owner="what the loss reads in this function")
    _warn_if_xla_cannot_raise(pipeline, "`kt.raise_if_failed(optimizer)`")
    # A loss-scale optimizer divides what it is given by its scale.
    grads = tf_gradients(optimizer.scale_loss(total_loss), variables, options)
    pipeline.update(total_loss, list(zip(grads, variables)))
    with tf.control_dependencies([tf.convert_to_tensor(optimizer.iterations)]):
        return tf.identity(total_loss)


# -- TF1 helpers: thin wrappers over the registered transforms ---------------


def clip_gradient_norms(gradients_to_variables, max_norm):
    """Clips each gradient to L2 norm at most `max_norm`, one tensor at a time.

    TF1 semantics: per tensor, not global. None gradients pass through;
    IndexedSlices keep their indices and are clipped on their `.values`.
    The same as `kt.transforms.clip_by_norm(max_norm)(gradients_to_variables)`.

    Args:
        gradients_to_variables: a list of `(gradient, variable)` pairs.
        max_norm: the largest norm allowed for each gradient: a finite number
            > 0, or a scalar tensor.

    Returns:
        A new list of `(clipped_gradient, variable)` pairs.
    """
    return clip_gradient_norms_fn(max_norm)(list(gradients_to_variables))


def clip_gradient_norms_fn(max_norm):
    """TF1's `transform_grads_fn` factory: returns `kt.transforms.ClipByNorm(max_norm)`.

    A registered transform, so a model compiled with it saves and loads it.
    """
    return ClipByNorm(check_norm_bound("max_norm", max_norm))


def multiply_gradients(grads_and_vars, gradient_multipliers):
    """Multiplies chosen gradients by constants or tensors, as TF1's slim did.

    Keras 3 and TF2 variables are unhashable, so TF1's dict keyed by variable
    cannot be built: key the dict by `variable.ref()`, by `variable.path` (for
    a plain `tf.Variable`, its name without `:0`), or by a regular
    expression searched in that path. The rules are those of
    `kt.transforms.multiply` (which this applies).

    Args:
        grads_and_vars: a list of `(gradient, variable)` pairs.
        gradient_multipliers: a non-empty dict from those keys to a float or
            a scalar tensor / variable (cast to the gradient's dtype).

    Returns:
        A new list of pairs; variables with no multiplier pass through.

    Raises:
        ValueError: if `grads_and_vars` is not a list, `gradient_multipliers`
            is empty or not a dict, a key or a value has the wrong type, no
            key names any variable of a non-empty `grads_and_vars` (keys that
            name nothing while others match pass, as in TF1), or a multiplier
            is given for a None gradient.
    """
    if not isinstance(grads_and_vars, list):
        raise ValueError(
            f"`grads_and_vars` must be a list. Received: grads_and_vars={grads_and_vars!r}"
        )
    if not gradient_multipliers:
        raise ValueError(
            "`gradient_multipliers` is empty. "
            f"Received: gradient_multipliers={gradient_multipliers!r}"
        )
    if not isinstance(gradient_multipliers, dict):
        raise ValueError(
            "`gradient_multipliers` must be a dict. "
            f"Received: gradient_multipliers={gradient_multipliers!r}"
        )
    transform = Multiply.from_tf1(gradient_multipliers)
    if grads_and_vars and all(transform.multiplier_for(var) is None for _, var in grads_and_vars):
        # TF1 let keys that name nothing pass; when none names anything, the
        # call does nothing, which is never what was meant (a TF1 op name, a
        # name with ':0', a Keras variable keyed by `.name` instead of `.path`).
        raise ValueError(
            "No key of `gradient_multipliers` names a variable of "
            "`grads_and_vars` (keys match `variable.ref()`, `variable.path`, a "
            "tf.Variable's name without ':0', or are regular expressions searched "
            "in it). Variables: "
            f"{[variable_name(v) for _, v in grads_and_vars]}. "
            f"Received: gradient_multipliers={gradient_multipliers!r}"
        )
    return transform(grads_and_vars)
