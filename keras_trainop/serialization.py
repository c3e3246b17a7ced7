"""Carrying the training options through `model.save` and `load_model`.

Saved: registered transforms and functions (`@keras.saving.
register_keras_serializable`), `aggregation_method`, `gate_gradients`, the
booleans, `global_step=USE_GLOBAL_STEP` or None, and `variables_to_train` given
as regular expressions or as variables of the model (saved by their index in
`model.trainable_variables`, since Keras may give a reloaded model other paths). What cannot be saved (a lambda or unregistered function, an update
op, a global-step variable) is left out with a warning at save time, which
says what to pass to `compile()` again after loading.
"""

import warnings

import keras

from keras_trainop.numerics import SkipNonFinite
from keras_trainop.options import USE_GLOBAL_STEP
from keras_trainop.summaries import variable_name
from keras_trainop.transforms.base import is_registered

_KEY = "keras_trainop"


def _warn_unsaved(what, value, advice):
    warnings.warn(
        f"keras_trainop: `{what}` cannot be saved with the model and is left out "
        f"of its compile config: {value!r}. {advice}",
        UserWarning,
        stacklevel=4,
    )


def _serialize_callables(name, values):
    saved = []
    for value in values:
        if is_registered(value):
            saved.append(keras.saving.serialize_keras_object(value))
        else:
            _warn_unsaved(
                name,
                value,
                "Register it with @keras.saving.register_keras_serializable() "
                f"(and give a class a get_config()), or pass `{name}` to "
                "compile() again after loading.",
            )
    return saved


def _variable_index(variable, trainable_variables):
    for i, candidate in enumerate(trainable_variables):
        if candidate is variable or getattr(candidate, "value", None) is variable:
            return i
    raise ValueError(
        f"Cannot save `variables_to_train`: {variable_name(variable)!r} is not a "
        "trainable variable of the model."
    )


def serialize_options(options, trainable_variables):
    """The JSON-able part of `options`, under one key of the compile config.

    Args:
        options: the model's `TrainOptions`.
        trainable_variables: the model's trainable variables, by which selected
            variables are saved.
    """
    config = {
        "aggregation_method": options.aggregation_method,
        "gate_gradients": options.gate_gradients,
        "colocate_gradients_with_ops": options.colocate_gradients_with_ops,
        "check_numerics": keras.saving.serialize_keras_object(options.check_numerics)
        if isinstance(options.check_numerics, SkipNonFinite)
        else options.check_numerics,
        "summarize_gradients": options.summarize_gradients,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
    }
    if options.transform_grads_fn is not None:
        saved = _serialize_callables("transform_grads_fn", [options.transform_grads_fn])
        config["transform_grads_fn"] = saved[0] if saved else None
    elif options.grad_transforms is not None:
        config["grad_transforms"] = _serialize_callables(
            "grad_transforms", options.transforms
        )
    if options.update_ops:
        config["update_ops"] = _serialize_callables("update_ops", options.update_ops)
    selection = options.variables_to_train
    if callable(selection):
        saved = _serialize_callables("variables_to_train", [selection])
        config["variables_to_train"] = saved[0] if saved else None
    elif selection is not None:
        config["variables_to_train"] = [
            item
            if isinstance(item, str)
            else {"trainable_index": _variable_index(item, trainable_variables)}
            for item in selection
        ]
    if options.global_step is USE_GLOBAL_STEP:
        config["global_step"] = "use_global_step"
    elif options.global_step is None:
        config["global_step"] = None
    elif isinstance(options.global_step, keras.Variable):
        # A Keras variable is one of the model's weights (see
        # StepPipeline.state_variables): loading makes a new one, and the
        # weights give it its value.
        config["global_step"] = {
            "keras_variable": options.global_step.name,
            "dtype": options.global_step.dtype,
        }
    else:
        _warn_unsaved(
            "global_step",
            options.global_step,
            "After loading, the default (the optimizer's `iterations`) is used "
            "unless you pass `global_step` to compile() again.",
        )
    return {_KEY: config}


def deserialize_options(config, trainable_variables):
    """Pops the keras_trainop options out of a compile config, as compile() kwargs.

    Args:
        config: the compile config (modified: the options are removed).
        trainable_variables: the loaded model's trainable variables, in the
            order Keras loads weights, to resolve saved indices.
    """
    saved = dict(config.pop(_KEY, None) or {})

    def load(value):
        return keras.saving.deserialize_keras_object(value)

    for name in ("transform_grads_fn",):
        if saved.get(name) is not None:
            saved[name] = load(saved[name])
    for name in ("grad_transforms", "update_ops"):
        if name in saved:
            saved[name] = [load(v) for v in saved[name]]
    if isinstance(saved.get("check_numerics"), dict):
        saved["check_numerics"] = load(saved["check_numerics"])
    selection = saved.get("variables_to_train")
    if isinstance(selection, dict):
        saved["variables_to_train"] = load(selection)
    elif isinstance(selection, list):
        saved["variables_to_train"] = [
            trainable_variables[item["trainable_index"]] if isinstance(item, dict) else item
            for item in selection
        ]
    step = saved.get("global_step")
    if isinstance(step, dict):
        saved["global_step"] = keras.Variable(
            0, dtype=step["dtype"], trainable=False, name=step["keras_variable"]
        )
    elif step == "use_global_step" or "global_step" not in saved:
        saved["global_step"] = USE_GLOBAL_STEP
    return saved
