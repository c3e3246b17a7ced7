"""Fails loudly when a Keras / TF release moves a private hook keras_trainop uses.

Each test checks the hook still exists and still means what
`keras_trainop/_keras_private.py` says it means.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

from keras_trainop import _keras_private as private


def compiled_model():
    model = mlp(keras.Model)
    model.compile("sgd", "mse")
    return model


def test_loss_tracker_is_the_loss_metric_of_the_logs():
    model = compiled_model()
    tracker = private.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean)
    assert tracker is model.metrics[0] and tracker.name == "loss"


def test_call_has_training_arg_tracks_the_call_signature():
    class NoTraining(keras.Model):
        def call(self, x):
            return x

    class WithTraining(keras.Model):
        def call(self, x, training=False):
            return x

    assert private.call_has_training_arg(WithTraining()) is True
    assert private.call_has_training_arg(NoTraining()) is False


def test_compute_loss_wrapper_matches_the_public_compute_loss():
    model = compiled_model()
    x = np.ones((2, 4), "float32")
    y = np.zeros((2, 1), "float32")
    y_pred = model(x)
    expected = model.compute_loss(x, y, y_pred, training=True)
    np.testing.assert_allclose(private.compute_loss(model, x, y, y_pred, None), expected)


def test_function_watched_variables_lists_what_the_function_read():
    a, b, unread = tf.Variable(1.0, name="a"), tf.Variable(2.0, name="b"), tf.Variable(3.0)
    seen = []

    @tf.function
    def f():
        product = a * b
        seen.extend(private.function_watched_variables())
        return product

    f()
    assert {id(v) for v in seen} == {id(a), id(b)}
    assert private.function_watched_variables() is None or tf.executing_eagerly()


def test_in_xla_context_tells_jit_compiled_traces_apart():
    seen = []

    def record():
        seen.append(private.in_xla_context())
        return tf.constant(0.0)

    tf.function(record, jit_compile=True)()
    tf.function(record)()
    assert seen == [True, False]
    assert private.in_xla_context() is False


def test_needs_merge_call_is_true_in_a_mirrored_replica_only():
    seen = []
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])

    @tf.function
    def replica_step():
        seen.append(private.needs_merge_call())
        return tf.constant(0.0)

    strategy.run(replica_step)
    assert seen == [True]
    assert private.needs_merge_call() is False  # default strategy
    with strategy.scope():
        assert private.needs_merge_call() is False  # cross-replica context


@pytest.mark.parametrize("wrapped", [False, True])
def test_apply_gradients_as_given_stops_the_optimizers_all_reduce(wrapped):
    # Keras sums gradients over replicas in this method of the optimizer that
    # applies (a LossScaleOptimizer's inner one); if it moves, this fails.
    sgd = keras.optimizers.SGD(1.0)
    optimizer = keras.optimizers.LossScaleOptimizer(sgd) if wrapped else sgd
    assert callable(type(sgd)._all_reduce_sum_gradients)
    assert not private.applies_gradients_as_given(optimizer)
    private.apply_gradients_as_given(optimizer)
    private.apply_gradients_as_given(optimizer)  # idempotent
    assert private.applies_gradients_as_given(optimizer)
    assert private.applies_gradients_as_given(sgd)
    pairs = [(tf.constant([1.0]), "v")]
    assert sgd._all_reduce_sum_gradients(pairs) == pairs
    # Only that optimizer: a fresh one still reduces as Keras does.
    assert not private.applies_gradients_as_given(keras.optimizers.SGD(1.0))


def test_default_summary_writer_is_the_writer_made_default(tmp_path):
    assert private.default_summary_writer() is None
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        assert private.default_summary_writer() is writer
    assert private.default_summary_writer() is None
