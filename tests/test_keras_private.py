"""Fails loudly when a Keras / TF release moves a private hook keras_trainop uses.

Each test checks the hook still exists and still means what
`keras_trainop/_keras_private.py` says it means.
"""

import inspect

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


WRAPPERS = {
    "plain": lambda sgd: sgd,
    "loss_scale": keras.optimizers.LossScaleOptimizer,
    "multi": lambda sgd: keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(sgd)),
    "loss_scale_multi": lambda sgd: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(sgd))
    ),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_apply_gradients_as_given_stops_the_optimizers_all_reduce(wrapper):
    if "multi" in wrapper and not hasattr(keras.optimizers, "MultiOptimizer"):
        pytest.skip("keras.optimizers.MultiOptimizer is new in Keras 3.15")
    # Keras sums gradients over replicas in this method of each optimizer that
    # applies (a LossScaleOptimizer's inner one, a MultiOptimizer's
    # sub-optimizers); if it moves, this fails.
    sgd = keras.optimizers.SGD(1.0)
    optimizer = WRAPPERS[wrapper](sgd)
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


def test_is_functional_call_and_functional_class_are_what_keras_model_uses():
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1)(inputs)
    assert private.is_functional_call((inputs, outputs), {})
    assert private.is_functional_call((), {"inputs": inputs, "outputs": outputs})
    assert not private.is_functional_call((), {"name": "net"})
    assert type(keras.Model(inputs, outputs)) is private.functional_class()


def test_default_summary_writer_is_the_writer_made_default(tmp_path):
    assert private.default_summary_writer() is None
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        assert private.default_summary_writer() is writer
    assert private.default_summary_writer() is None


# -- the workaround for model.fit under MultiWorkerMirroredStrategy ----------
# That Keras still needs it, and that it works: tests/test_multiworker.py.


def fit_patch_targets():
    from keras.src.backend.tensorflow import trainer  # where the patches go

    return [(private.tensorflow_trainer_class(), "_maybe_symbolic_build"), (trainer, "reduce_per_replica")]


@pytest.fixture
def keras_as_released(monkeypatch):
    """Keras's own functions during the test; what was installed before, after it."""
    for owner, name in fit_patch_targets():
        current = getattr(owner, name)
        monkeypatch.setattr(owner, name, getattr(current, "keras_trainop_original", current))


def fit_and_log(strategy):
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 1), "float32")
    with strategy.scope():
        model = compiled_model()
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    return model.get_weights(), history.history["loss"]


def test_fit_calls_the_patched_functions_by_name(keras_as_released, monkeypatch):
    # The patches replace a method and a module function; Keras must still
    # call them there, with these arguments.
    (trainer_class, _), (trainer_module, _) = fit_patch_targets()
    build, reduce = trainer_class._maybe_symbolic_build, trainer_module.reduce_per_replica
    assert list(inspect.signature(build).parameters) == ["self", "iterator", "data_batch"]
    assert list(inspect.signature(reduce).parameters) == ["values", "strategy", "reduction"]
    calls = []

    def spy_build(self, iterator=None, data_batch=None):
        calls.append(("build", iterator is not None))
        return build(self, iterator=iterator, data_batch=data_batch)

    def spy_reduce(values, strategy, reduction):
        calls.append(("reduce", reduction))
        return reduce(values, strategy, reduction)

    monkeypatch.setattr(trainer_class, "_maybe_symbolic_build", spy_build)
    monkeypatch.setattr(trainer_module, "reduce_per_replica", spy_reduce)
    fit_and_log(tf.distribute.get_strategy())
    assert ("build", True) in calls and ("reduce", "auto") in calls


def test_fit_patch_is_idempotent_and_keeps_the_originals(keras_as_released):
    originals = [getattr(owner, name) for owner, name in fit_patch_targets()]
    private.patch_fit_for_multi_worker()
    patched = [getattr(owner, name) for owner, name in fit_patch_targets()]
    private.patch_fit_for_multi_worker()
    assert all(a is b for a, b in zip(patched, [getattr(o, n) for o, n in fit_patch_targets()]))
    assert all(p is not o for p, o in zip(patched, originals))
    assert all(p.keras_trainop_original is o for p, o in zip(patched, originals))
    assert [p.__name__ for p in patched] == ["_maybe_symbolic_build", "reduce_per_replica"]


@pytest.mark.parametrize(
    "make_strategy",
    [tf.distribute.get_strategy, lambda: tf.distribute.MirroredStrategy(["/cpu:0"])],
    ids=["default", "mirrored"],
)
def test_fit_patch_changes_nothing_off_multi_worker(keras_as_released, make_strategy):
    strategy = make_strategy()
    assert private.is_multi_worker(strategy) is False
    private.patch_fit_for_strategy(strategy)
    assert all(not hasattr(getattr(o, n), "keras_trainop_original") for o, n in fit_patch_targets())
    # Oracle: the same fit with Keras as released.
    weights, losses = fit_and_log(strategy)
    private.patch_fit_for_multi_worker()
    patched_weights, patched_losses = fit_and_log(strategy)
    assert patched_losses == losses
    for a, b in zip(patched_weights, weights):
        np.testing.assert_array_equal(a, b)


def _gated_increment(v):
    @tf.function
    def step(ok):
        check = tf.debugging.Assert(ok, ["not ok"])
        write = v.assign_add(1.0, read_value=False)
        private.add_control_input(write, check)
        assert check in write.control_inputs

    return step


def test_add_control_input_makes_a_built_op_wait():
    v = tf.Variable(0.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not ok"):
        _gated_increment(v)(tf.constant(False))
    assert v.numpy() == 0.0


def test_add_control_input_lets_the_op_run_after_the_control():
    v = tf.Variable(0.0)
    _gated_increment(v)(tf.constant(True))
    assert v.numpy() == 1.0


def test_tensorflow_devices_initialized_sees_tensorflow_in_use():
    # The JAX backend's test (tests/test_backends.py) asserts it stays False there.
    tf.constant(1.0) + 1.0
    assert private.tensorflow_devices_initialized()
