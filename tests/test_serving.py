"""Trained with keras_trainop, served with plain Keras.

A kt model's weights are exactly its architecture's: the step's own state
(skip counters, transform state, gradient sums, a Keras global step) is saved
next to the optimizer's state, not among `model.weights`. Oracle: the same
architecture built as a plain Keras model.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, max_abs_diff, mode_kwargs, regression_data

import keras_trainop as kt

BATCH = 8


def every_stateful_option():
    return dict(
        check_numerics="skip",
        grad_transforms=[kt.transforms.add_noise(0.01, seed=1), kt.transforms.adaptive_clip_by_global_norm()],
        gradient_accumulation_steps=2,
        global_step=keras.Variable(0, dtype="int64", trainable=False, name="global_step"),
    )


OPTIONS = {
    "skip": lambda: dict(check_numerics="skip"),
    "stateful_transforms": lambda: dict(grad_transforms=[kt.transforms.add_noise(0.01, seed=1)]),
    "accumulation": lambda: dict(gradient_accumulation_steps=2),
    "keras_global_step": lambda: dict(global_step=keras.Variable(0, dtype="int64", trainable=False)),
    "all": every_stateful_option,
}


class PlainNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.bn = keras.layers.BatchNormalization()
        self.out = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.out(self.bn(self.hidden(x), training=training))


class Net(kt.TrainOpModel, PlainNet):
    pass


def sequential(cls):
    return cls([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                keras.layers.BatchNormalization(), keras.layers.Dense(1)])


def functional(cls):
    inputs = keras.Input((4,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(8, activation="tanh")(inputs))
    return cls(inputs, keras.layers.Dense(1)(h))


def subclassed(cls):
    model = cls()
    model(np.zeros((1, 4), "float32"))  # built before compile(), as a served model is
    return model


ARCHITECTURES = {
    "sequential": lambda kt_side: sequential(kt.Sequential if kt_side else keras.Sequential),
    "functional": lambda kt_side: functional(kt.Model if kt_side else keras.Model),
    "subclassed": lambda kt_side: subclassed(Net if kt_side else PlainNet),
}


def trained(architecture, options, mode="graph", **fit_kwargs):
    x, y = regression_data()
    keras.utils.set_random_seed(0)
    model = ARCHITECTURES[architecture](True)
    model.compile(keras.optimizers.Adam(0.01), "mse", **OPTIONS[options](), **mode_kwargs(mode))
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False, **fit_kwargs)
    assert model.train_step_state.state_variables  # the step does keep state
    return model


def plain(architecture):
    keras.utils.set_random_seed(1)  # other initial weights: loading must replace them
    return ARCHITECTURES[architecture](False)


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_weights_are_exactly_the_architectures(architecture, options):
    ours, theirs = trained(architecture, options), plain(architecture)
    assert [tuple(v.shape) for v in ours.weights] == [tuple(v.shape) for v in theirs.weights]
    assert [v.trainable for v in ours.weights] == [v.trainable for v in theirs.weights]
    assert ours.count_params() == theirs.count_params()
    theirs.set_weights(ours.get_weights())
    x, _ = regression_data()
    np.testing.assert_array_equal(theirs.predict(x, verbose=0), ours.predict(x, verbose=0))


def param_lines(model):
    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    return [line for line in "\n".join(lines).splitlines() if "params" in line]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_summary_counts_the_architectures_parameters(architecture):
    # Both compiled with Adam and trained: the optimizer's parameters count alike.
    ours, theirs = trained(architecture, "all"), plain(architecture)
    x, y = regression_data()
    theirs.compile(keras.optimizers.Adam(0.01), "mse")
    theirs.fit(x, y, batch_size=BATCH, verbose=0)
    assert param_lines(ours) == param_lines(theirs)


@pytest.mark.parametrize("compiled", [False, True], ids=["uncompiled", "compiled"])
@pytest.mark.parametrize("mode", MODES)
def test_a_model_checkpoint_weights_file_loads_into_the_plain_architecture(mode, compiled, tmp_path):
    path = str(tmp_path / "best.weights.h5")
    ours = trained("functional", "all", mode, callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    theirs = plain("functional")
    if compiled:
        # Built optimizer: its state loads too (nothing lost on the way to plain Keras).
        theirs.compile(keras.optimizers.Adam(0.01), "mse")
        theirs.optimizer.build(theirs.trainable_variables)
    theirs.load_weights(path)
    assert max_abs_diff(theirs.get_weights(), ours.get_weights()) == 0
    x, _ = regression_data()
    # (ours predicts in its own execution mode: equal up to float rounding.)
    np.testing.assert_allclose(theirs.predict(x, verbose=0), ours.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    if compiled:
        assert max_abs_diff([v.numpy() for v in theirs.optimizer.variables],
                            [v.numpy() for v in ours.optimizer.variables]) == 0


def test_an_exported_kt_model_serves_like_the_plain_architecture(tmp_path):
    ours, theirs = trained("functional", "all"), plain("functional")
    theirs.set_weights(ours.get_weights())
    ours.export(str(tmp_path / "ours"), verbose=False)
    theirs.export(str(tmp_path / "theirs"), verbose=False)
    served, reference = tf.saved_model.load(str(tmp_path / "ours")), tf.saved_model.load(str(tmp_path / "theirs"))
    x, _ = regression_data()
    np.testing.assert_array_equal(served.serve(x).numpy(), reference.serve(x).numpy())
    assert len(served.variables) == len(reference.variables)


def test_a_weights_file_from_other_options_loads_the_weights_and_warns(tmp_path):
    ours = trained("functional", "all")
    ours.save_weights(tmp_path / "w.weights.h5")
    other = functional(kt.Model)
    other.compile(keras.optimizers.Adam(0.01), "mse", check_numerics="skip")
    with pytest.warns(UserWarning, match="skipping the step's state"):
        other.load_weights(tmp_path / "w.weights.h5")
    assert max_abs_diff(other.get_weights(), ours.get_weights()) == 0
