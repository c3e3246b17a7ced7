"""The options of a training step, validated once and shared by every entry point.

`TrainOptions` is what `TrainOpModel.compile()`, `create_train_step` and
`create_train_op` all turn their keyword arguments into. Every check here runs
at construction time, so that a wrong argument fails before training starts,
with a message in Keras's style: "`x` must be .... Received: x=...".
"""

import inspect
import re
import types

import tensorflow as tf

from keras_trainop.numerics import NumericsPolicy

# The values of `tf.compat.v1.train.Optimizer.GATE_*`.
GATE_NONE = 0
GATE_OP = 1
GATE_GRAPH = 2
_GATE_VALUES = (GATE_NONE, GATE_OP, GATE_GRAPH)


class _UseGlobalStep:
    """Sentinel: count steps with the optimizer's own `iterations`."""

    _instance = None

    def __new__(cls):
        # One instance, also after a copy or a pickle round trip.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "kt.USE_GLOBAL_STEP"

    def __reduce__(self):
        return (_UseGlobalStep, ())


USE_GLOBAL_STEP = _UseGlobalStep()

_AGGREGATION_METHODS = {
    tf.AggregationMethod.ADD_N: "ADD_N",
    tf.AggregationMethod.EXPERIMENTAL_TREE: "EXPERIMENTAL_TREE",
    tf.AggregationMethod.EXPERIMENTAL_ACCUMULATE_N: "EXPERIMENTAL_ACCUMULATE_N",
}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validate_aggregation_method(value):
    # tf.AggregationMethod.DEFAULT == ADD_N == 0.
    if value is None or (_is_int(value) and value in _AGGREGATION_METHODS):
        return value
    raise ValueError(
        "`aggregation_method` must be None or one of tf.AggregationMethod.ADD_N, "
        "DEFAULT, EXPERIMENTAL_TREE, EXPERIMENTAL_ACCUMULATE_N "
        f"(the integers {sorted(_AGGREGATION_METHODS)}). "
        f"Received: aggregation_method={value!r}"
    )


def validate_gate_gradients(value):
    if _is_int(value) and value in _GATE_VALUES:
        return value
    raise ValueError(
        "`gate_gradients` must be one of kt.GATE_NONE (0), kt.GATE_OP (1) or "
        f"kt.GATE_GRAPH (2). Received: gate_gradients={value!r}"
    )


def validate_bool(name, value):
    if isinstance(value, bool):
        return value
    raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")


def validate_callable(name, value, allow_none=True):
    if (value is None and allow_none) or callable(value):
        return value
    what = "a callable or None" if allow_none else "a callable"
    raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")


def _factory_names():
    """Public factories whose *result* is a transform: kt.transforms.*, clip_gradient_norms_fn."""
    from keras_trainop import transforms

    return {n for n in transforms.__all__ if n.islower()} | {"clip_gradient_norms_fn"}


def _not_a_transform(value):
    """Why a callable cannot be a transform (one list of pairs in, one out), or None."""
    if isinstance(value, type):
        return f"is a class, not a transform: instantiate it ({value.__name__}(...))"
    if (
        isinstance(value, types.FunctionType)
        and value.__module__.startswith("keras_trainop.")
        and value.__name__ in _factory_names()
    ):
        return (
            f"is the factory `{value.__name__}`, not a transform: call it "
            f"({value.__name__}(...)) and pass what it returns"
        )
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin: nothing to check
        return None
    try:
        signature.bind([])
    except TypeError:
        return f"cannot be called with one argument, the list of pairs (signature {signature})"
    return None


def validate_transforms(grad_transforms, transform_grads_fn):
    """Returns the list of transforms to apply in order (maybe empty)."""
    validate_callable("transform_grads_fn", transform_grads_fn)
    problem = None if transform_grads_fn is None else _not_a_transform(transform_grads_fn)
    if problem:
        raise ValueError(
            "`transform_grads_fn` must be a callable taking and returning a list "
            f"of (gradient, variable) pairs. It {problem}. "
            f"Received: transform_grads_fn={transform_grads_fn!r}"
        )
    if grad_transforms is not None and transform_grads_fn is not None:
        raise ValueError(
            "Pass either `grad_transforms` or `transform_grads_fn`, not both: "
            "`grad_transforms=[...]` is the list form of the same hook. "
            f"Received: grad_transforms={grad_transforms!r}, "
            f"transform_grads_fn={transform_grads_fn!r}"
        )
    if transform_grads_fn is not None:
        return [transform_grads_fn]
    if grad_transforms is None:
        return []
    single = callable(grad_transforms)
    if single or isinstance(grad_transforms, (list, tuple)):
        listed = [grad_transforms] if single else list(grad_transforms)
        for i, t in enumerate(listed):
            problem = "is not callable" if not callable(t) else _not_a_transform(t)
            if problem:
                where = "It" if single else f"Element {i}"
                raise ValueError(
                    "`grad_transforms` must be a callable or a list of callables, "
                    "each taking and returning a list of (gradient, variable) "
                    f"pairs. {where} {problem}. "
                    f"Received: grad_transforms={grad_transforms!r}"
                )
        return listed
    raise ValueError(
        "`grad_transforms` must be a callable or a list of callables. "
        f"Received: grad_transforms={grad_transforms!r}"
    )


def validate_update_ops(value):
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        for i, op in enumerate(value):
            if not callable(op):
                raise ValueError(
                    "`update_ops` must be None or a list of zero-argument "
                    f"callables. Element {i} is not callable (a TF2 step cannot "
                    "re-run a tensor or an op: wrap it in a function). "
                    f"Received: update_ops={value!r}"
                )
        return list(value)
    raise ValueError(
        "`update_ops` must be None or a list of zero-argument callables. "
        f"Received: update_ops={value!r}"
    )


def _is_variable(value):
    import keras

    return isinstance(value, (tf.Variable, keras.Variable))


def validate_variables_to_train(value):
    """Checks the form of `variables_to_train`; the selection is resolved later."""
    if value is None or callable(value):
        return value
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and items:
        for item in items:
            if isinstance(item, str):
                try:
                    re.compile(item)
                except re.error as e:
                    raise ValueError(
                        "`variables_to_train` strings must be valid regular "
                        f"expressions. {item!r} is not: {e}. "
                        f"Received: variables_to_train={value!r}"
                    ) from None
            elif not _is_variable(item):
                raise ValueError(
                    "`variables_to_train` must be None, a callable, or a "
                    "non-empty list of variables and/or regular expressions "
                    f"on `variable.path`. Found {item!r} of type "
                    f"{type(item).__name__}. Received: variables_to_train={value!r}"
                )
        return list(items)
    raise ValueError(
        "`variables_to_train` must be None, a callable, or a non-empty list of "
        "variables and/or regular expressions on `variable.path`. "
        f"Received: variables_to_train={value!r}"
    )


def validate_global_step(value):
    if value is USE_GLOBAL_STEP or value is None:
        return value
    if _is_variable(value):
        dtype = tf.as_dtype(value.dtype)
        if dtype.is_integer and len(value.shape) == 0:
            return value
    raise ValueError(
        "`global_step` must be kt.USE_GLOBAL_STEP (count with "
        "`optimizer.iterations`), None (no extra counter), or a scalar integer "
        f"tf.Variable or keras.Variable. Received: global_step={value!r}"
    )


def validate_accumulation_steps(value):
    if value is None or (_is_int(value) and value >= 1):
        return value
    raise ValueError(
        "`gradient_accumulation_steps` must be None or an int >= 1 (the number "
        "of micro-batches whose gradients make one update; 1: every step "
        f"updates). Received: gradient_accumulation_steps={value!r}"
    )


class TrainOptions:
    """The validated options of one training step.

    Args:
        grad_transforms: None, a callable or a list of callables with the TF1
            contract `list[(grad, var)] -> list[(grad, var)]`, applied in order.
        transform_grads_fn: TF1's single transform. Exclusive with
            `grad_transforms`.
        aggregation_method: a `tf.AggregationMethod` value or None.
        gate_gradients: `GATE_NONE`, `GATE_OP` or `GATE_GRAPH`.
        colocate_gradients_with_ops: whether each gradient op is placed with
            the forward op it differentiates (TF1's option; graph mode only).
        check_numerics: False, True / "loss", "all", "skip" or a
            `SkipNonFinite` (see `NumericsPolicy`).
        update_ops: None or a list of zero-argument callables.
        variables_to_train: None, a callable, or a list of variables and/or
            regular expressions searched in `variable.path`.
        summarize_gradients: whether to write gradient summaries.
        global_step: `USE_GLOBAL_STEP`, None, or a scalar variable.
        gradient_accumulation_steps: None or an int >= 1: apply one update
            from the mean gradient of this many consecutive steps.
    """

    def __init__(
        self,
        *,
        grad_transforms=None,
        transform_grads_fn=None,
        aggregation_method=None,
        gate_gradients=GATE_OP,
        colocate_gradients_with_ops=False,
        check_numerics=True,
        update_ops=None,
        variables_to_train=None,
        summarize_gradients=False,
        global_step=USE_GLOBAL_STEP,
        gradient_accumulation_steps=None,
    ):
        self.transforms = validate_transforms(grad_transforms, transform_grads_fn)
        # Kept as given, for get_compile_config.
        self.grad_transforms = grad_transforms
        self.transform_grads_fn = transform_grads_fn
        self.aggregation_method = validate_aggregation_method(aggregation_method)
        self.gate_gradients = validate_gate_gradients(gate_gradients)
        self.colocate_gradients_with_ops = validate_bool(
            "colocate_gradients_with_ops", colocate_gradients_with_ops
        )
        self.numerics = NumericsPolicy(check_numerics)
        self.check_numerics = check_numerics
        self.update_ops = validate_update_ops(update_ops)
        self.variables_to_train = validate_variables_to_train(variables_to_train)
        self.summarize_gradients = validate_bool(
            "summarize_gradients", summarize_gradients
        )
        self.global_step = validate_global_step(global_step)
        self.gradient_accumulation_steps = validate_accumulation_steps(
            gradient_accumulation_steps
        )

    @property
    def accumulates(self):
        """Whether updates are made from several steps' gradients."""
        return (self.gradient_accumulation_steps or 1) > 1

    @property
    def uses_tf_gradients(self):
        """Whether gradients must come from TF1's `gradients` (graph mode only).

        `GATE_OP` is the default and needs no extra work in TF2: inside a
        `tf.function`, automatic control dependencies already order every read
        of a variable before its update, which is the race `GATE_OP` prevented
        in TF1. `GradientTape` serves it, at no cost.
        """
        return (
            self.aggregation_method is not None
            or self.gate_gradients != GATE_OP
            or self.colocate_gradients_with_ops
        )
