"""Every option at once, in every mode and with steps_per_execution > 1.

Oracle: plain Keras with the equivalent built-ins: the hidden layer frozen
(`variables_to_train`), `SGD(global_clipnorm=)` (the clip), and a batch twice
as large (the accumulation).
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, max_abs_diff, mlp, mode_kwargs, regression_data

import keras_trainop as kt

MICRO = 8
CLIP = 0.3


def every_option(update_runs, counter):
    return dict(
        grad_transforms=[kt.transforms.chain(kt.transforms.zero_nans(), kt.transforms.clip_by_global_norm(CLIP))],
        aggregation_method=tf.AggregationMethod.EXPERIMENTAL_TREE,
        gate_gradients=kt.GATE_GRAPH,
        colocate_gradients_with_ops=True,
        check_numerics="skip",
        update_ops=[lambda: update_runs.assign_add(1)],
        variables_to_train=["out"],
        summarize_gradients=True,
        global_step=counter,
        gradient_accumulation_steps=2,
    )


# What cannot act in a mode says so, once.
WARNINGS = {
    "eager": "cannot act when the step runs eagerly",
    "jit": "cannot write summaries from inside an XLA-compiled step",
}


@pytest.mark.parametrize("steps_per_execution", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_every_option_at_once(mode, steps_per_execution, tmp_path):
    x, y = regression_data()
    reference = mlp(keras.Model)
    reference.get_layer("hidden").trainable = False
    reference.compile(keras.optimizers.SGD(0.05, momentum=0.9, global_clipnorm=CLIP), "mse")
    reference.fit(x, y, batch_size=2 * MICRO, epochs=2, verbose=0, shuffle=False)

    update_runs = tf.Variable(0, dtype=tf.int64)
    counter = tf.Variable(0, dtype=tf.int64)
    ours = mlp(kt.Model)
    ours.compile(
        keras.optimizers.SGD(0.05, momentum=0.9), "mse", steps_per_execution=steps_per_execution,
        **every_option(update_runs, counter), **mode_kwargs(mode),
    )
    writer = tf.summary.create_file_writer(str(tmp_path / "summaries"))
    expected = WARNINGS.get(mode)
    warns = pytest.warns(UserWarning, match=expected) if expected else contextlib.nullcontext()
    with warns, writer.as_default():
        history = ours.fit(
            x, y, batch_size=MICRO, epochs=2, verbose=0, shuffle=False,
            callbacks=[kt.GradientTensorBoard(str(tmp_path / "logs"), update_freq=2, metrics=True)],
        )
    writer.close()
    trained = [v.numpy() for v in ours.trainable_weights]
    assert max_abs_diff(trained, reference.get_weights()) <= 1e-6
    assert int(ours.optimizer.iterations.numpy()) == int(counter.numpy()) == int(update_runs.numpy()) == 8
    assert history.history["skipped_steps"] == [0.0, 0.0]
    assert np.all(np.isfinite(history.history["grad_norm"]))
