"""Gradient accumulation (`gradient_accumulation_steps`).

Oracle: plain Keras on one batch k times larger (`SGD(global_clipnorm=)` for
the clip), which is what k accumulated micro-batches of a mean loss must equal.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, layer_weights, max_abs_diff, mlp, mode_kwargs, optimizer_state, regression_data
from test_transforms_model import embedding_model, token_data

import keras_trainop as kt

MICRO = 8
K = 4
CLIP = 0.3


def sgd(**kwargs):
    return keras.optimizers.SGD(0.05, momentum=0.9, **kwargs)


def large_batch_reference(mode, x, y, epochs=2, model=None, **optimizer_kwargs):
    reference = model or mlp(keras.Model)
    reference.compile(sgd(global_clipnorm=CLIP, **optimizer_kwargs), "mse", **mode_kwargs(mode))
    reference.fit(x, y, batch_size=MICRO * K, epochs=epochs, verbose=0, shuffle=False)
    return reference


def accumulating(mode, model=None, optimizer=None, **options):
    model = model or mlp(kt.Model)
    options.setdefault("grad_transforms", [kt.transforms.clip_by_global_norm(CLIP)])
    options.setdefault("gradient_accumulation_steps", K)
    model.compile(optimizer or sgd(), "mse", **options, **mode_kwargs(mode))
    return model


def fit(model, x, y, epochs=2, **kwargs):
    return model.fit(x, y, batch_size=MICRO, epochs=epochs, verbose=0, shuffle=False, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_k_micro_batches_equal_one_batch_k_times_larger_with_the_clip_applied_once(mode):
    x, y = regression_data()
    reference = large_batch_reference(mode, x, y)
    ours = accumulating(mode)
    fit(ours, x, y)
    # The clip acts (a micro-batch clipped alone would give other weights).
    assert max_abs_diff(layer_weights(ours), layer_weights(reference)) <= 1e-6
    assert max_abs_diff(optimizer_state(ours), optimizer_state(reference)) <= 1e-6
    assert int(ours.optimizer.iterations.numpy()) == 4  # updates, not micro-batches
    unclipped = mlp(keras.Model)
    unclipped.compile(sgd(), "mse", **mode_kwargs(mode))
    unclipped.fit(x, y, batch_size=MICRO * K, epochs=2, verbose=0, shuffle=False)
    assert max_abs_diff(layer_weights(unclipped), layer_weights(reference)) > 1e-3  # the clip acts


@pytest.mark.parametrize("mode", ["graph", "jit"])
@pytest.mark.parametrize("steps_per_execution", [3, 4])
def test_accumulation_with_steps_per_execution(mode, steps_per_execution):
    x, y = regression_data()
    reference = large_batch_reference(mode, x, y)
    ours = accumulating(mode, steps_per_execution=steps_per_execution)
    fit(ours, x, y)
    assert max_abs_diff(layer_weights(ours), layer_weights(reference)) <= 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_sparse_gradients_accumulate(mode):
    # Without a clip: Keras's global norm of IndexedSlices with repeated indices
    # is not the norm of the gradient, while the accumulated gradient is dense.
    x, y = token_data()
    reference = embedding_model(keras.Model)
    reference.compile(sgd(), "mse", **mode_kwargs(mode))
    reference.fit(x, y, batch_size=MICRO * K, epochs=2, verbose=0, shuffle=False)
    ours = accumulating(mode, model=embedding_model(kt.Model), grad_transforms=None)
    fit(ours, x, y)
    assert max_abs_diff(layer_weights(ours), layer_weights(reference)) <= 1e-6


def low_scale_lso():
    # A scale low enough that no micro-batch overflows by itself.
    return keras.optimizers.LossScaleOptimizer(sgd(), initial_scale=2.0**8)


@pytest.mark.parametrize("mode", MODES)
def test_accumulation_under_mixed_precision_equals_the_float32_large_batch(mode, mixed_float16):
    x, y = regression_data()
    ours = accumulating(mode, optimizer=low_scale_lso())
    fit(ours, x, y)
    keras.mixed_precision.set_dtype_policy("float32")
    reference = large_batch_reference(mode, x, y)
    assert int(ours.optimizer.iterations.numpy()) == 4
    assert max_abs_diff(layer_weights(ours), layer_weights(reference)) <= 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_an_overflowing_micro_batch_skips_its_whole_update(mode, mixed_float16):
    # As one large batch containing it would: the loss-scale optimizer skips
    # the update and halves the scale, and the sums start again.
    x, y = regression_data()
    big = y.copy()
    big[5 * MICRO : 6 * MICRO] *= 1e4  # the second micro-batch of the second update
    ours = accumulating(mode, optimizer=low_scale_lso())
    fit(ours, x, big, epochs=1)
    assert int(ours.optimizer.iterations.numpy()) == 1
    assert float(ours.optimizer.dynamic_scale.numpy()) == 2.0**7
    assert int(ours.train_pipeline.accumulator.count.numpy()) == 0
    keras.mixed_precision.set_dtype_policy("float32")
    # Oracle: float32 on the first large batch only.
    reference = large_batch_reference(mode, x[: MICRO * K], y[: MICRO * K], epochs=1)
    assert max_abs_diff(layer_weights(ours), layer_weights(reference)) <= 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_update_ops_and_global_step_count_updates(mode):
    x, y = regression_data()
    runs = tf.Variable(0, dtype=tf.int64)
    counter = tf.Variable(0, dtype=tf.int64)
    ours = accumulating(mode, update_ops=[lambda: runs.assign_add(1)], global_step=counter)
    fit(ours, x, y)
    assert int(runs.numpy()) == int(counter.numpy()) == 4


@pytest.mark.parametrize("mode", MODES)
def test_a_skipped_micro_batch_adds_nothing(mode):
    x, y = regression_data()
    bad = y.copy()
    bad[MICRO + 1] = np.nan  # the second micro-batch
    ours = accumulating(mode, check_numerics="skip")
    history = fit(ours, x, bad, epochs=1)
    assert history.history["skipped_steps"] == [1.0]
    # Oracle: the same accumulation over the data without that micro-batch
    # (the update comes after k finite micro-batches).
    keep = np.r_[0:MICRO, 2 * MICRO : len(x)]
    reference = accumulating(mode, check_numerics="skip")
    fit(reference, x[keep], y[keep], epochs=1)
    assert max_abs_diff(layer_weights(ours), layer_weights(reference)) == 0
    assert max_abs_diff(
        ours.train_pipeline.accumulator_variables(), reference.train_pipeline.accumulator_variables()
    ) == 0
    assert int(ours.train_pipeline.failures.skipped_total.numpy()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_non_finite_micro_batch_raises_and_changes_nothing(mode):
    x, y = regression_data()
    bad = y.copy()
    bad[5 * MICRO + 1] = np.nan  # the second micro-batch of the second update
    ours = accumulating(mode)
    before = None

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            nonlocal before
            if batch == 4:  # the first micro-batch of the second update
                before = [v.numpy() for v in ours.weights + ours.optimizer.variables]

    with pytest.raises(kt.NonFiniteError, match="inf or nan at step 2"):
        fit(ours, x, bad, epochs=1, callbacks=[Snapshot()])
    assert max_abs_diff([v.numpy() for v in ours.weights + ours.optimizer.variables], before) == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_resumed_run_equals_an_uninterrupted_one(mode, tmp_path):
    # Saved in the middle of an accumulation: the sums and the count travel in the file.
    x, y = regression_data()
    uninterrupted = accumulating(mode)
    fit(uninterrupted, x, y, epochs=1)
    first = accumulating(mode)
    fit(first, x[: 6 * MICRO], y[: 6 * MICRO], epochs=1)
    path = os.path.join(tmp_path, "m.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert resumed.train_options.gradient_accumulation_steps == K
    fit(resumed, x[6 * MICRO :], y[6 * MICRO :], epochs=1)
    assert max_abs_diff(layer_weights(resumed), layer_weights(uninterrupted)) <= 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_gradient_tensorboard_records_only_updates(mode, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    x, y = regression_data()
    ours = accumulating(mode, grad_transforms=None)
    fit(ours, x, y, epochs=1, callbacks=[kt.GradientTensorBoard(str(tmp_path), update_freq=1)])
    acc = event_accumulator.EventAccumulator(str(tmp_path / "train"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("global_norm/gradient_norm")
    assert [e.step for e in events] == [1, 2]
    # Oracle: the tape gradient of the first large batch.
    model = mlp(keras.Model)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y[: MICRO * K], model(x[: MICRO * K]))
    norm = float(tf.linalg.global_norm(tape.gradient(loss, model.trainable_variables)))
    assert abs(float(tf.make_ndarray(events[0].tensor_proto)) - norm) <= 1e-5 * norm


def test_create_train_step_accumulates():
    x, y = regression_data()
    reference = large_batch_reference("graph", x, y, epochs=1)
    model = mlp(keras.Model)
    optimizer = sgd()
    step = kt.create_train_step(
        lambda xb, yb: keras.losses.MeanSquaredError()(yb, model(xb, training=True)),
        optimizer,
        transform_grads_fn=kt.transforms.clip_by_global_norm(CLIP),
        gradient_accumulation_steps=K,
    )
    traced = tf.function(step)
    for start in range(0, len(x), MICRO):
        traced(x[start : start + MICRO], y[start : start + MICRO])
    assert int(optimizer.iterations.numpy()) == 2
    assert max_abs_diff(layer_weights(model), layer_weights(reference)) <= 1e-6


@pytest.mark.parametrize(
    "value", [0, -2, 2.0, "4", True], ids=["zero", "negative", "float", "str", "bool"]
)
def test_bad_values_are_refused_at_compile(value):
    with pytest.raises(ValueError, match=r"`gradient_accumulation_steps` must be None or an int >= 1.*Received: gradient_accumulation_steps="):
        mlp(kt.Model).compile(sgd(), "mse", gradient_accumulation_steps=value)


def test_accumulating_in_both_places_is_refused():
    with pytest.raises(ValueError, match="not both"):
        mlp(kt.Model).compile(sgd(gradient_accumulation_steps=2), "mse", gradient_accumulation_steps=2)


def test_the_optimizers_own_accumulation_with_transforms_warns():
    with pytest.warns(UserWarning, match="act on each micro-batch"):
        mlp(kt.Model).compile(
            sgd(gradient_accumulation_steps=2), "mse", grad_transforms=[kt.transforms.clip_by_global_norm(1.0)]
        )


def test_one_step_is_no_accumulation():
    x, y = regression_data()
    ours, plain = mlp(kt.Model), mlp(kt.Model)
    ours.compile(sgd(), "mse", gradient_accumulation_steps=1)
    plain.compile(sgd(), "mse")
    fit(ours, x, y, epochs=1)
    fit(plain, x, y, epochs=1)
    assert ours.train_pipeline.accumulator is None
    assert max_abs_diff(layer_weights(ours), layer_weights(plain)) == 0
