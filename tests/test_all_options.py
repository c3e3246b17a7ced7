"""Every option at once, in every mode and with steps_per_execution > 1, each one observed.

Oracle: plain Keras with the equivalent built-ins, trained on the same data
without its one bad micro-batch:

- `variables_to_train=["out"]`: the hidden layer frozen;
- a transform that makes the output bias's gradient NaN, then `zero_nans`:
  the output bias frozen too (were `zero_nans` ignored, the clip would turn
  every gradient into NaN);
- `clip_by_global_norm`: `SGD(global_clipnorm=)`;
- `gradient_accumulation_steps=2`: a batch twice as large;
- `check_numerics="skip"`: the bad micro-batch left out of the data.

Each option is also observed on its own: the update op's and the global
step's counts, the skip count in the logs, TF1's gradient options reaching
`tf.compat.v1.gradients` (a warning instead when eager), the summaries and the
callback's records read back from their event files.
"""

import contextlib
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, max_abs_diff, mlp, mode_kwargs, regression_data
from tensorboard.backend.event_processing import event_accumulator

import keras_trainop as kt
from keras_trainop import gradients as gradients_module

MICRO = 8
CLIP = 0.3
N = 9 * MICRO  # 9 micro-batches an epoch ...
BAD = 4  # ... the 5th of which has a NaN target: 4 updates an epoch from the 8 others
EPOCHS = 2
UPDATES = 4 * EPOCHS
T = kt.transforms


def data():
    x, y = regression_data(n=N)
    bad_y = y.copy()
    bad_y[BAD * MICRO + 1] = np.nan
    keep = np.r_[0 : BAD * MICRO, (BAD + 1) * MICRO : N]
    return x, bad_y, x[keep], y[keep]


def every_option(update_runs, counter):
    return dict(
        grad_transforms=[T.chain(T.multiply({"out/bias": float("nan")}), T.zero_nans(),
                                 T.clip_by_global_norm(CLIP))],
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


@pytest.fixture
def tf1_gradient_calls(monkeypatch):
    """The keyword arguments of each call to TF1's `gradients`, and the count of `tf.tuple` calls."""
    calls = {"gradients": [], "tuple": 0}
    real_gradients, real_tuple = tf.compat.v1.gradients, tf.tuple

    def gradients(*args, **kwargs):
        calls["gradients"].append(kwargs)
        return real_gradients(*args, **kwargs)

    def gated(*args, **kwargs):
        calls["tuple"] += 1
        return real_tuple(*args, **kwargs)

    monkeypatch.setattr(gradients_module.tf.compat.v1, "gradients", gradients)
    monkeypatch.setattr(gradients_module.tf, "tuple", gated)
    return calls


def read(logdir):
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def steps_of(acc, tag):
    return [e.step for e in acc.Tensors(tag)]


def value_of(event):
    return float(tf.make_ndarray(event.tensor_proto))


@pytest.mark.parametrize("steps_per_execution", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_every_option_at_once(mode, steps_per_execution, tf1_gradient_calls, tmp_path):
    x, bad_y, good_x, good_y = data()
    reference = mlp(keras.Model)
    reference.get_layer("hidden").trainable = False
    reference.get_layer("out").bias.trainable = False
    reference.compile(keras.optimizers.SGD(0.05, momentum=0.9, global_clipnorm=CLIP), "mse")
    reference.fit(good_x, good_y, batch_size=2 * MICRO, epochs=EPOCHS, verbose=0, shuffle=False)

    update_runs = tf.Variable(0, dtype=tf.int64)
    counter = tf.Variable(0, dtype=tf.int64)
    ours = mlp(kt.Model)
    initial_hidden = [v.numpy() for v in ours.get_layer("hidden").weights]
    initial_bias = ours.get_layer("out").bias.numpy()
    ours.compile(
        keras.optimizers.SGD(0.05, momentum=0.9), "mse", steps_per_execution=steps_per_execution,
        **every_option(update_runs, counter), **mode_kwargs(mode),
    )
    writer = tf.summary.create_file_writer(str(tmp_path / "summaries"))
    eager = mode == "eager"
    warns = pytest.warns(UserWarning, match="cannot act when the step runs eagerly") if eager else contextlib.nullcontext()
    with warns, writer.as_default():
        history = ours.fit(
            x, bad_y, batch_size=MICRO, epochs=EPOCHS, verbose=0, shuffle=False,
            callbacks=[kt.GradientTensorBoard(str(tmp_path / "logs"), update_freq=2, metrics=True)],
        )
    writer.close()

    # Together: the plain-Keras oracle.
    trained = [v.numpy() for v in ours.trainable_weights]
    assert max_abs_diff(trained, reference.get_weights()) <= 1e-6
    # variables_to_train and zero_nans: what they keep still did not move.
    assert max_abs_diff([v.numpy() for v in ours.get_layer("hidden").weights], initial_hidden) == 0
    np.testing.assert_array_equal(ours.get_layer("out").bias.numpy(), initial_bias)
    # update_ops, global_step, accumulation: one count per update.
    assert int(ours.optimizer.iterations.numpy()) == int(counter.numpy()) == int(update_runs.numpy()) == UPDATES
    # check_numerics="skip": the bad micro-batch, once an epoch.
    assert history.history["skipped_steps"] == [1.0] * EPOCHS
    # aggregation_method, gate_gradients, colocate_gradients_with_ops: TF1's
    # gradients with exactly these (in eager mode: the warning above instead).
    if eager:
        assert tf1_gradient_calls == {"gradients": [], "tuple": 0}
    else:
        assert tf1_gradient_calls["gradients"]
        for call in tf1_gradient_calls["gradients"]:
            assert call["aggregation_method"] == tf.AggregationMethod.EXPERIMENTAL_TREE
            assert call["gate_gradients"] is False  # GATE_GRAPH: not per op ...
            assert call["colocate_gradients_with_ops"] is True
        assert tf1_gradient_calls["tuple"] >= 1  # ... but over all gradients at once

    # summarize_gradients: every update, the trained variables, at the global step.
    summaries = read(str(tmp_path / "summaries"))
    paths = ["out/kernel", "out/bias"]
    assert set(summaries.Tags()["tensors"]) == {f"{p}/{t}" for p in paths for t in ("gradient", "gradient_norm")}
    for p in paths:
        assert steps_of(summaries, f"{p}/gradient_norm") == list(range(1, UPDATES + 1))
    assert [value_of(e) for e in summaries.Tensors("out/bias/gradient_norm")] == [0.0] * UPDATES
    # The callback: every 2nd update, clipped, with the skip count and the logged norm.
    records = read(os.path.join(str(tmp_path / "logs"), "train"))
    assert steps_of(records, "global_norm/gradient_norm") == list(range(2, UPDATES + 1, 2))
    assert max(value_of(e) for e in records.Tensors("global_norm/clipped_gradient_norm")) <= CLIP + 1e-6
    assert [value_of(e) for e in records.Tensors("skipped_steps/total")][-1] == EPOCHS
    assert np.all(np.isfinite(history.history["grad_norm"]))
    assert max(history.history["clipped_grad_norm"]) <= CLIP + 1e-6
