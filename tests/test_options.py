"""compile() validates the keras_trainop options, in Keras's message style.

Oracles: the argument names and values themselves, TF1's constants
(`tf.compat.v1.train.Optimizer.GATE_*`, `tf.AggregationMethod`), and plain
Keras for the models that train.
"""

import copy
import pickle

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_trainop as kt
from conftest import max_abs_diff, mlp, regression_data

X, Y = regression_data()


def identity(grads_and_vars):
    return grads_and_vars


class FromModel:
    """A value that needs the model: `fn(model)`."""

    def __init__(self, fn):
        self.fn = fn


def moving_mean(model):
    return model.get_layer("bn").moving_mean


# case: (argument, bad value, a detail the message must contain[, other arguments])
BAD = {
    "aggregation_str": ("aggregation_method", "tree", "'tree'"),
    "aggregation_7": ("aggregation_method", 7, "=7"),
    "aggregation_neg": ("aggregation_method", -1, "=-1"),
    "aggregation_float": ("aggregation_method", 1.5, "=1.5"),
    "aggregation_true": ("aggregation_method", True, "=True"),
    "aggregation_false": ("aggregation_method", False, "=False"),
    "gate_3": ("gate_gradients", 3, "=3"),
    "gate_neg": ("gate_gradients", -1, "=-1"),
    "gate_str": ("gate_gradients", "op", "'op'"),
    "gate_none": ("gate_gradients", None, "=None"),
    "gate_true": ("gate_gradients", True, "=True"),
    "gate_float": ("gate_gradients", 1.0, "=1.0"),
    **{
        f"{name}_{label}": (name, value, f"={value!r}")
        for name in ("check_numerics", "summarize_gradients", "colocate_gradients_with_ops")
        for label, value in (("str", "yes"), ("int", 1), ("none", None), ("zero", 0))
    },
    "transform_fn_int": ("transform_grads_fn", 3, "=3"),
    "transform_fn_list": ("transform_grads_fn", [identity], "must be a callable or None"),
    "transforms_element": ("grad_transforms", [identity, 3], "Element 1 is not callable"),
    "transforms_int": ("grad_transforms", 3, "=3"),
    "transforms_str": ("grad_transforms", "clip", "'clip'"),
    "transforms_dict": ("grad_transforms", {"a": identity}, "{'a'"),
    "transforms_both": (
        "grad_transforms",
        [identity],
        "not both: `grad_transforms=[...]` is the list form of the same hook",
        {"transform_grads_fn": identity},
    ),
    "update_ops_tensor": ("update_ops", [tf.constant(1.0)], "Element 0 is not callable"),
    "update_ops_element": ("update_ops", [lambda: None, "op"], "Element 1 is not callable"),
    "update_ops_callable": ("update_ops", identity, "function identity"),
    "update_ops_str": ("update_ops", "op", "'op'"),
    "vars_bad_regex": ("variables_to_train", "out/(kernel", "'out/(kernel' is not"),
    "vars_int": ("variables_to_train", 3, "=3"),
    "vars_int_element": ("variables_to_train", ["out", 3], "type int"),
    "vars_empty": ("variables_to_train", [], "=[]"),
    "vars_non_trainable": (
        "variables_to_train",
        FromModel(lambda m: [m.get_layer("out").kernel, moving_mean(m)]),
        "'bn/moving_mean' (trainable=False)",
    ),
    "vars_only_non_trainable": (
        "variables_to_train",
        FromModel(lambda m: [moving_mean(m)]),
        "'bn/moving_mean' (trainable=False)",
    ),
    "vars_foreign": (
        "variables_to_train",
        FromModel(lambda m: [tf.Variable(1.0, name="foreign")]),
        "'foreign'",
    ),
    "vars_regex_no_match": (
        "variables_to_train",
        ["out/kernel", "^kernel"],
        "No match for: ['^kernel']",
    ),
    "vars_callable_empty": ("variables_to_train", lambda: [], "selects no variable"),
    "step_int": ("global_step", 0, "=0"),
    "step_float_constant": ("global_step", FromModel(lambda m: tf.constant(1.5)), "1.5"),
    "step_vector": (
        "global_step",
        FromModel(lambda m: tf.Variable([0, 0], dtype=tf.int64)),
        "shape=(2,)",
    ),
    "step_bool_variable": (
        "global_step",
        FromModel(lambda m: keras.Variable(False, dtype="bool")),
        "dtype=bool",
    ),
    "step_str": ("global_step", "global_step", "'global_step'"),
}


def bad_options(case, model):
    name, value, _, *others = BAD[case]
    value = value.fn(model) if isinstance(value, FromModel) else value
    return {name: value, **(others[0] if others else {})}


def bn_model():
    return mlp(kt.Model, batchnorm=True)


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_option_raises_keras_style_value_error(case):
    name, _, detail, *_ = BAD[case]
    model = bn_model()
    with pytest.raises(ValueError) as info:
        model.compile(optimizer="sgd", loss="mse", **bad_options(case, model))
    message = str(info.value)
    assert f"`{name}`" in message
    assert f"Received: {name}=" in message
    assert detail in message


@pytest.mark.parametrize(
    "case",
    sorted(BAD),
)
def test_invalid_option_keeps_previous_compiled_state(case):
    model = bn_model()
    optimizer = keras.optimizers.SGD(0.05)
    model.compile(optimizer=optimizer, loss="mse", transform_grads_fn=identity)

    def state():
        return (model.optimizer, model.loss, model.train_options, model.train_pipeline)

    previous = state()
    with pytest.raises(ValueError):
        model.compile(optimizer="adam", loss="mae", **bad_options(case, model))
    assert state() == previous
    assert model.train_options.transforms == [identity]


@pytest.mark.parametrize(
    "case", ["aggregation_str", "vars_foreign"]
)
def test_model_trains_as_before_after_rejected_compile(case):
    model = bn_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    with pytest.raises(ValueError):
        model.compile(optimizer="adam", loss="mae", **bad_options(case, model))
    # Oracle: one SGD step on the MSE loss, as plain Keras takes it.
    plain = mlp(keras.Model, batchnorm=True)
    plain.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(X, Y, batch_size=64, epochs=1, verbose=0)
    plain.fit(X, Y, batch_size=64, epochs=1, verbose=0)
    assert max_abs_diff(model.get_weights(), plain.get_weights()) < 1e-6


# -- valid values ---------------------------------------------------------------

AGGREGATION_NAMES = sorted(
    n
    for n in dir(tf.AggregationMethod)
    if n.isupper() and isinstance(getattr(tf.AggregationMethod, n), int)
)
GATE_NAMES = ["GATE_NONE", "GATE_OP", "GATE_GRAPH"]


@pytest.mark.parametrize(
    "name, value",
    [
        pytest.param("aggregation_method", getattr(tf.AggregationMethod, n), id=n)
        for n in AGGREGATION_NAMES
    ]
    + [pytest.param("aggregation_method", None, id="aggregation_None")]
    + [
        pytest.param("gate_gradients", getattr(tf.compat.v1.train.Optimizer, g), id=g)
        for g in GATE_NAMES
    ],
)
def test_valid_gradient_options_are_stored_and_train_like_keras(name, value):
    model = mlp(kt.Model)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", **{name: value})
    assert getattr(model.train_options, name) == value
    plain = mlp(keras.Model)
    plain.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    plain.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert max_abs_diff(model.get_weights(), plain.get_weights()) < 1e-6


@pytest.mark.parametrize("name", GATE_NAMES)
def test_gate_constants_equal_tf1(name):
    assert getattr(kt, name) == getattr(tf.compat.v1.train.Optimizer, name)


@pytest.mark.parametrize(
    "name", ["check_numerics", "summarize_gradients", "colocate_gradients_with_ops"]
)
@pytest.mark.parametrize("value", [True, False])
def test_bool_options_are_stored(name, value):
    model = mlp(kt.Model)
    model.compile(optimizer="sgd", loss="mse", **{name: value})
    assert getattr(model.train_options, name) is value


GLOBAL_STEPS = {
    "use_global_step": lambda: kt.USE_GLOBAL_STEP,
    "none": lambda: None,
    "keras_int64": lambda: keras.Variable(0, dtype="int64", trainable=False),
    "tf_int32": lambda: tf.Variable(0, dtype=tf.int32, trainable=False),
}


@pytest.mark.parametrize("case", sorted(GLOBAL_STEPS))
def test_valid_global_step_is_stored(case):
    step = GLOBAL_STEPS[case]()
    model = mlp(kt.Model)
    model.compile(optimizer="sgd", loss="mse", global_step=step)
    assert model.train_options.global_step is step


def test_global_step_defaults_to_use_global_step():
    model = mlp(kt.Model)
    model.compile(optimizer="sgd", loss="mse")
    assert model.train_options.global_step is kt.USE_GLOBAL_STEP


SELECTIONS = {
    # name: (variables_to_train given the model's variables by path, what trains)
    "regex": (lambda v: "out/", {"out/kernel", "out/bias"}),
    "regex_list": (lambda v: ["hidden/bias", "^out/k"], {"hidden/bias", "out/kernel"}),
    "variables": (
        lambda v: [v["out/kernel"], v["hidden/kernel"]],
        {"out/kernel", "hidden/kernel"},
    ),
    "tuple": (lambda v: (v["out/bias"],), {"out/bias"}),
    "callable": (lambda v: lambda: [v["hidden/kernel"]], {"hidden/kernel"}),
    "mixed": (lambda v: [v["out/bias"], "hidden/k"], {"out/bias", "hidden/kernel"}),
}


@pytest.mark.parametrize("case", sorted(SELECTIONS))
def test_valid_variables_to_train_train_only_the_selection(case):
    select, expected = SELECTIONS[case]
    model = mlp(kt.Model)
    variables = {v.path: v for v in model.trainable_variables}
    model.compile(
        optimizer=keras.optimizers.SGD(0.05), loss="mse", variables_to_train=select(variables)
    )
    before = {p: keras.ops.convert_to_numpy(v) for p, v in variables.items()}
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    after = {p: keras.ops.convert_to_numpy(v) for p, v in variables.items()}
    changed = {p for p in variables if np.any(after[p] != before[p])}
    assert changed == expected


def unbuilt(cls):
    keras.utils.set_random_seed(0)
    return cls([keras.layers.Dense(8, name="hidden"), keras.layers.Dense(1, name="out")])


@pytest.mark.parametrize(
    "selection, frozen", [(None, []), ("out/", ["hidden"]), ("hidden/", ["out"])]
)
def test_model_built_by_fit_resolves_selection(selection, frozen):
    # Oracle: plain Keras with the unselected layers frozen.
    model = unbuilt(kt.Sequential)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", variables_to_train=selection)
    plain = unbuilt(keras.Sequential)
    for name in frozen:
        plain.get_layer(name).trainable = False
    plain.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    plain.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations) == 2
    assert max_abs_diff(model.get_weights(), plain.get_weights()) < 1e-6


# -- kt.USE_GLOBAL_STEP ---------------------------------------------------------


@pytest.mark.parametrize(
    "round_trip",
    [
        pytest.param(copy.copy, id="copy"),
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda v: copy.deepcopy({"step": [v]})["step"][0], id="deepcopy_nested"),
    ]
    + [
        pytest.param(lambda v, p=p: pickle.loads(pickle.dumps(v, protocol=p)), id=f"pickle{p}")
        for p in range(pickle.HIGHEST_PROTOCOL + 1)
    ],
)
def test_use_global_step_is_a_singleton(round_trip):
    assert round_trip(kt.USE_GLOBAL_STEP) is kt.USE_GLOBAL_STEP
    assert type(kt.USE_GLOBAL_STEP)() is kt.USE_GLOBAL_STEP
    assert repr(kt.USE_GLOBAL_STEP) == "kt.USE_GLOBAL_STEP"
